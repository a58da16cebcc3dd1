//! The server side: accepted connections become TLS connections whose
//! peer identity every request carries (as its [`Peer`] extension).
//!
//! Handshakes run beside the accept loop, each under a deadline and at
//! most [`MAX_HANDSHAKES`] at once, so a client that connects and says
//! nothing holds neither the loop nor memory for long.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

use super::identity::Identity;
use super::material::MeshTls;

/// How long a connection may take to start TLS (or its first byte).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; connections beyond are closed.
const MAX_HANDSHAKES: usize = 1024;
/// The first byte of a TLS record carrying a handshake.
const TLS_HANDSHAKE: u8 = 0x16;

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The remote address.
    pub addr: SocketAddr,
    /// The identity its certificate carries; `None` on plaintext or when
    /// it presented no certificate.
    pub identity: Option<Identity>,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// An accepted connection, TLS or (for health and metrics only)
/// plaintext.
pub struct Conn {
    io: Io,
    peer: Peer,
}

/// Accepts on `listener` until the stream is dropped (which closes the
/// listener), handing over each connection once its handshake is done.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Arc<MeshTls>,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (stream, addr) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, most likely: let some close.
                    tracing::warn!(%error, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
                tracing::debug!(%addr, "too many handshakes in progress; closed");
                continue;
            };
            let (tx, tls) = (tx.clone(), Arc::clone(&tls));
            tokio::spawn(async move {
                let started = tokio::time::timeout(HANDSHAKE_TIMEOUT, start(stream, addr, &tls));
                match started.await {
                    Ok(Ok(conn)) => {
                        drop(permit);
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%addr, %error, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%addr, "no TLS handshake in time; closed"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn start(stream: TcpStream, addr: SocketAddr, tls: &MeshTls) -> io::Result<Conn> {
    stream.set_nodelay(true)?;
    let mut first = [0u8; 1];
    if stream.peek(&mut first).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if first[0] != TLS_HANDSHAKE {
        let peer = Peer {
            addr,
            identity: None,
        };
        return Ok(Conn {
            io: Io::Plain(stream),
            peer,
        });
    }
    let config = tls.server_config();
    let stream = tokio_rustls::TlsAcceptor::from(config)
        .accept(stream)
        .await?;
    // The verifier has checked the chain; the identity is in the leaf.
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| Identity::of_certificate(leaf));
    Ok(Conn {
        io: Io::Tls(Box::new(stream)),
        peer: Peer { addr, identity },
    })
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
