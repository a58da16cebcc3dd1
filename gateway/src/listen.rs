//! The gateway's connections: what each may take before it is closed, so a
//! client that connects and stalls holds neither a task nor memory for
//! long (Slowloris), and one that opens many streams is bounded.
//!
//! - a request's headers must arrive within `--header-timeout` (HTTP/1.1);
//! - a connection with no request in flight for `--idle-timeout` is closed
//!   (HTTP/1.1 at once, HTTP/2 with a GOAWAY), one that never sent a byte
//!   too;
//! - HTTP/2: at most `--max-streams` streams at once per connection, a
//!   16 KiB header list, and a ping every 20 s that a dead peer fails;
//! - a request's body must arrive whole within `--body-timeout`
//!   ([`crate::proxy::read_body`]: 408).
//!
//! Each request is let in by [`crate::admission`] first (its client's rate,
//! the in-flight cap, the unread answers' budget), carries its
//! connection's peer address (`ConnectInfo`), and its answer goes out
//! paced ([`crate::admission::Paced`]).
//! Shutdown stops accepting at once; [`Draining::finish`] then asks each
//! connection to end and waits until they have, under the drain deadline.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use axum::response::{IntoResponse as _, Response};

use crate::admission::Refusal;
use crate::errors::GatewayError;
use crate::rpc;
use crate::state::Gateway;

/// What a connection may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// HTTP/1.1: to send a request's headers.
    pub header_timeout: Duration,
    /// With no request in flight, for this long: closed.
    pub idle_timeout: Duration,
    /// HTTP/2: streams open at once on one connection.
    pub max_streams: u32,
}

/// The connections still open once accepting stopped.
pub struct Draining {
    drain: watch::Sender<bool>,
    open: mpsc::Receiver<()>,
}

impl Draining {
    /// Asks every connection to end (HTTP/2 GOAWAY, HTTP/1.1 closed after
    /// its request) and waits until they have.
    pub async fn finish(mut self) {
        let _ = self.drain.send(true);
        // Each connection holds a sender: none left, none open.
        while self.open.recv().await.is_some() {}
    }
}

/// Requests in flight on one connection, and when the last one ended.
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// Returns once no request has been in flight for `limit`.
    async fn idle_for(&self, limit: Duration) {
        loop {
            let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
            if self.in_flight.load(Ordering::Acquire) == 0 && last.elapsed() >= limit {
                return;
            }
            let due = if self.in_flight.load(Ordering::Acquire) == 0 {
                last + limit
            } else {
                Instant::now() + limit
            };
            tokio::time::sleep_until(due).await;
        }
    }
}

/// One request in flight, until its response's body is done or dropped;
/// with its place under the gateway's in-flight cap.
struct InFlight {
    activity: Arc<Activity>,
    /// Given back when this is dropped.
    _place: Option<OwnedSemaphorePermit>,
}

impl InFlight {
    fn begin(activity: &Arc<Activity>, place: Option<OwnedSemaphorePermit>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        InFlight {
            activity: Arc::clone(activity),
            _place: place,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.activity.touch();
        self.activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The router for one connection: every request let in (or refused) by
/// the admission, its peer address on it, and counted in flight until its
/// answer ends.
#[derive(Clone)]
struct Tracked {
    app: Router,
    gateway: Arc<Gateway>,
    peer: SocketAddr,
    activity: Arc<Activity>,
}

/// A refused request's answer, in its protocol's own form, with
/// `Retry-After`.
fn refused<B>(gateway: &Gateway, request: &http::Request<B>, refusal: Refusal) -> Response<Body> {
    let protocol = rpc::Protocol::of(request.method(), request.headers(), request.uri().query());
    match protocol {
        Some(protocol) if rpc::rpc_path(request.uri().path()).is_some() => {
            let mut response = protocol.error(&gateway.pool, &refusal.status());
            response.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from(refusal.retry_after()),
            );
            response
        }
        // Its own answer carries the Retry-After.
        _ => GatewayError::Refused(refusal).into_response(),
    }
}

impl<B> tower::Service<http::Request<B>> for Tracked
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // Probes and scrapes get through a flood.
        let path = request.uri().path();
        let place = match path == "/healthz" || path == "/metrics" {
            true => None,
            false => match self.gateway.admission.admit(self.peer.ip()) {
                Ok(place) => Some(place),
                Err(refusal) => {
                    let answer = refused(&self.gateway, &request, refusal);
                    return Box::pin(std::future::ready(Ok(answer)));
                }
            },
        };
        let in_flight = InFlight::begin(&self.activity, place);
        request
            .extensions_mut()
            .insert(ConnectInfo::<SocketAddr>(self.peer));
        let answer = tower::Service::call(&mut self.app, request.map(Body::new));
        let gateway = Arc::clone(&self.gateway);
        Box::pin(async move {
            let response = answer.await?;
            // Handed out as the client takes it; in flight until it is sent.
            Ok(response.map(|body| Body::new(gateway.admission.pace(body, in_flight))))
        })
    }
}

/// Serves `app` on `listener` until `stop`, then stops accepting.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    gateway: Arc<Gateway>,
    limits: Limits,
    stop: impl Future<Output = ()>,
) -> Draining {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams)
        .max_header_list_size(16 * 1024)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(10));
    let (drain, draining) = watch::channel(false);
    let (open, all_closed) = mpsc::channel::<()>(1);
    tokio::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, most likely: let some close.
                    tracing::warn!(%error, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        // Nagle's algorithm would hold small answers back for tens of ms.
        let _ = tcp.set_nodelay(true);
        let activity = Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
        });
        let service = Tracked {
            app: app.clone(),
            gateway: Arc::clone(&gateway),
            peer,
            activity: Arc::clone(&activity),
        };
        let (builder, mut draining, open) = (builder.clone(), draining.clone(), open.clone());
        tokio::spawn(async move {
            let _open = open;
            let connection =
                builder.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service));
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => Some(ended),
                _ = draining.wait_for(|d| *d) => None,
                () = activity.idle_for(limits.idle_timeout) => None,
            };
            let ended = match ended {
                Some(ended) => ended,
                None => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = ended {
                tracing::debug!(%peer, error = %error, "connection ended");
            }
        });
    }
    Draining {
        drain,
        open: all_closed,
    }
}
