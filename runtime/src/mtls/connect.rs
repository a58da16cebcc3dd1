//! The client side: a connector for tonic channels that dials TCP (with
//! TCP_NODELAY, as every brewmesh client) and starts TLS with this
//! process's certificate, as loaded at that moment.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::material::MeshTls;

/// Dials a peer and starts mutual TLS (see [`crate::client`]).
#[derive(Debug, Clone)]
pub struct Connector {
    tls: Arc<MeshTls>,
}

impl Connector {
    /// A connector presenting `tls`'s certificate.
    pub fn new(tls: Arc<MeshTls>) -> Connector {
        Connector { tls }
    }
}

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let tls = Arc::clone(&self.tls);
        Box::pin(async move {
            let invalid =
                || io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}"));
            let host = uri.host().ok_or_else(invalid)?;
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let stream = TcpStream::connect((host.as_str(), port)).await?;
            stream.set_nodelay(true)?;
            // Sent as SNI; the server's identity is checked, not this name.
            let name = ServerName::try_from(host)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let config = tls.client_config();
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await?;
            Ok(TokioIo::new(stream))
        })
    }
}
