//! Spreading calls: address sets become a tower `Discover` stream; each
//! endpoint is a lazily connecting tonic `Channel`, wrapped in `PeakEwma`
//! (tonic channels have no `Load`), balanced by power-of-two-choices that
//! knows which endpoints a call's earlier attempts used, behind
//! a `Buffer` so the result is cheap to clone; above it, the retry and
//! hedging policies and the deadline (`policy.rs`). Round robin is there to
//! compare against (`cli/benches/balancing.rs`).

use std::collections::{BTreeSet, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::wrappers::WatchStream;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::Channel;
use tower::Layer as _;
use tower::buffer::Buffer;
use tower::discover::Change;
use tower::load::{Load as _, PeakEwma, TrackCompletion};
use tower::util::BoxCloneSyncService;

use crate::client::{InvalidAddress, connect_lazy, endpoint};
use crate::ejection::{Ejecting, Ejections, Standing};
use crate::instrument::ClientLayer;

use super::policy::{Policied, Policies, Tried};
use super::resolve::{Addresses, Source, resolve};

/// A balanced channel: clone it freely, one per client.
///
/// A newtype with a concrete error type, rather than a boxed service with
/// `BoxError`: tonic clients over a `Box<dyn Error>` error leave the
/// compiler unable to prove their futures `Send` in generic code.
#[derive(Clone)]
pub struct Balanced {
    inner: BoxCloneSyncService<http::Request<Body>, http::Response<Body>, tower::BoxError>,
    /// The addresses known now, as the resolver tells them.
    addresses: watch::Receiver<Addresses>,
}

impl std::fmt::Debug for Balanced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Balanced")
    }
}

/// A call through a [`Balanced`] channel failed below gRPC (no endpoint,
/// connection refused, …); the cause is its `source()`.
#[derive(Debug)]
pub struct CallError(tower::BoxError);

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "balanced call failed: {}", self.0)
    }
}

impl std::error::Error for CallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

impl tower::Service<http::Request<Body>> for Balanced {
    type Response = http::Response<Body>;
    type Error = CallError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, CallError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        self.inner.poll_ready(cx).map_err(CallError)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let call = self.inner.call(request);
        Box::pin(async move {
            match call.await {
                Ok(response) => Ok(response),
                // Failed below gRPC: tonic's own reading of the error (an
                // expired deadline, a refused connection), except that what
                // it cannot name (the endpoint died mid-call, a reset) is
                // UNAVAILABLE, as gRPC names a connection failure, never
                // UNKNOWN; the caller may retry an idempotent call.
                Err(error) => {
                    let status = tonic::Status::from_error(error);
                    let status = if status.code() == tonic::Code::Unknown {
                        tonic::Status::unavailable(format!(
                            "the call's endpoint failed: {}",
                            status.message()
                        ))
                    } else {
                        status
                    };
                    Ok(status.into_http())
                }
            }
        })
    }
}

impl Balanced {
    /// Whether any address is known, waiting up to `patience` for the
    /// first one: a caller with none answers UNAVAILABLE at once instead
    /// of waiting out its deadline for an instance that may never come.
    pub async fn known(&self, patience: Duration) -> bool {
        let mut addresses = self.addresses.clone();
        if !addresses.borrow().is_empty() {
            return true;
        }
        matches!(
            tokio::time::timeout(patience, addresses.wait_for(|set| !set.is_empty())).await,
            Ok(Ok(_))
        )
    }
}

/// How a balanced channel picks an endpoint for each call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Balancing {
    /// Power of two random choices, the one with less peak-EWMA latency ×
    /// in-flight calls: slow or busy endpoints get less.
    #[default]
    P2c,
    /// As `p2c`, with a call in flight until its response stream ends, not
    /// until its headers come: for server streams whose length is the
    /// work (a station brewing a part), so that P2C sees the parts each
    /// replica is still making.
    P2cStreams,
    /// Each endpoint in turn, however it performs (the baseline): only
    /// failures eject, not latency.
    RoundRobin,
}

/// A channel balanced over the addresses `source` reports: P2C over
/// peak-EWMA latency, with brewmesh's retry and hedging policies
/// ([`Policies::brewmesh`]). Must be called inside a Tokio runtime.
pub fn balanced(source: Source) -> Result<Balanced, InvalidAddress> {
    balanced_with(source, Balancing::P2c, Policies::brewmesh())
}

/// A channel balanced over the addresses `source` reports, by `balancing`,
/// each call under `policies`. Must be called inside a Tokio runtime.
pub fn balanced_with(
    source: Source,
    balancing: Balancing,
    policies: Policies,
) -> Result<Balanced, InvalidAddress> {
    let target = match &source {
        Source::Static(addresses) => addresses.join(","),
        Source::Dns { name, .. } => name.clone(),
        Source::Registry { service, .. } => service.clone(),
    };
    let addresses = resolve(source)?;
    let known = addresses.clone();
    let changes = Changes {
        updates: WatchStream::new(addresses),
        current: BTreeSet::new(),
        pending: VecDeque::new(),
        ejections: Ejections::new(target, balancing != Balancing::RoundRobin),
    };
    let policies = Arc::new(policies);
    // Traced outside the policies: the client span covers every attempt
    // and the wait for an endpoint, as the caller sees it. Requests beyond
    // the buffer's 1024 queue in callers instead of here.
    if balancing == Balancing::RoundRobin {
        let round_robin = RoundRobin {
            changes,
            endpoints: Vec::new(),
            next: 0,
        };
        let buffered = Buffer::new(round_robin, 1024);
        return Ok(Balanced {
            inner: BoxCloneSyncService::new(ClientLayer.layer(Policied::new(buffered, policies))),
            addresses: known,
        });
    }
    let buffered = Buffer::new(
        P2c {
            changes,
            endpoints: Vec::new(),
            completion: Completion {
                until_end: balancing == Balancing::P2cStreams,
            },
        },
        1024,
    );
    Ok(Balanced {
        inner: BoxCloneSyncService::new(ClientLayer.layer(Policied::new(buffered, policies))),
        addresses: known,
    })
}

/// One endpoint of [`P2c`], with its peak-EWMA load.
struct Slot {
    key: String,
    service: PeakEwma<Ejecting<Channel>, Completion>,
    standing: Standing,
    ready: bool,
}

/// Power of two random choices over peak-EWMA load (latency × calls in
/// flight), picking when the call is known: among the ready endpoints its
/// earlier attempts did not use ([`Tried`]), if there are any, and never a
/// second call at once to an endpoint on probation after a latency
/// ejection ([`Standing::held_back`]) while another is ready.
///
/// A new endpoint's first guess is optimistic (1 ms): P2C compares loads,
/// so a pessimistic guess would starve a new replica of the very traffic
/// that measures it; the first response replaces the guess. Decay: a
/// latency peak counts at once and fades with a 1 s time constant: a
/// longer one let a spike on a fast replica send traffic to a slow one for
/// seconds (BENCHMARKS.md, balancing, has the figures).
struct P2c {
    changes: Changes,
    endpoints: Vec<Slot>,
    completion: Completion,
}

/// When a call stops counting as in flight toward its endpoint's load: at
/// its response's headers, or (`until_end`) once its body ended.
#[derive(Debug, Clone, Copy)]
struct Completion {
    until_end: bool,
}

impl<H: Send + Unpin + 'static> TrackCompletion<H, http::Response<Body>> for Completion {
    type Output = http::Response<Body>;

    fn track_completion(&self, handle: H, response: http::Response<Body>) -> Self::Output {
        if !self.until_end {
            return response; // `handle` dropped: done at the headers
        }
        response.map(|body| {
            Body::new(UntilEnd {
                body,
                handle: Some(handle),
            })
        })
    }
}

/// A response body that holds its call's load handle until it ends (its
/// last frame, an error, or dropped unread).
struct UntilEnd<H> {
    body: Body,
    handle: Option<H>,
}

impl<H: Unpin> http_body::Body for UntilEnd<H> {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Ready(Some(Ok(frame))) => frame.is_trailers(),
            Poll::Pending => false,
        };
        if ended {
            self.handle = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl tower::Service<http::Request<Body>> for P2c {
    type Response = http::Response<Body>;
    type Error = tower::BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        while let Some(change) = self.changes.next_ready(cx) {
            match change {
                Change::Insert(key, endpoint) => {
                    self.endpoints.retain(|slot| slot.key != key);
                    let standing = endpoint.standing();
                    let service = PeakEwma::new(
                        endpoint,
                        Duration::from_millis(1),
                        Duration::from_secs(1).as_nanos() as f64,
                        self.completion,
                    );
                    self.endpoints.push(Slot {
                        key,
                        service,
                        standing,
                        ready: false,
                    });
                }
                Change::Remove(key) => self.endpoints.retain(|slot| slot.key != key),
            }
        }
        // Every endpoint polled each time: one ejected or skipped since it
        // was last ready is not picked, and each not ready wakes us.
        let mut any = false;
        for slot in &mut self.endpoints {
            slot.ready = matches!(slot.service.poll_ready(cx), Poll::Ready(Ok(())));
            any |= slot.ready;
        }
        if any {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let tried = request.extensions().get::<Tried>().cloned();
        let mut ready: Vec<usize> = (0..self.endpoints.len())
            .filter(|&i| self.endpoints[i].ready)
            .collect();
        // One on probation with a call out waits for its verdict.
        if ready
            .iter()
            .any(|&i| !self.endpoints[i].standing.held_back())
        {
            ready.retain(|&i| !self.endpoints[i].standing.held_back());
        }
        let fresh: Vec<usize> = match &tried {
            Some(tried) => (ready.iter().copied())
                .filter(|&i| !tried.contains(&self.endpoints[i].key))
                .collect(),
            None => Vec::new(),
        };
        let pool = if fresh.is_empty() { &ready } else { &fresh };
        let chosen = match pool.len() {
            0 => return Box::pin(async { Err("no endpoint is ready".into()) }),
            1 => pool[0],
            n => {
                let a = fastrand::usize(0..n);
                let b = (a + 1 + fastrand::usize(0..n - 1)) % n;
                let (a, b) = (pool[a], pool[b]);
                if self.endpoints[b].service.load() < self.endpoints[a].service.load() {
                    b
                } else {
                    a
                }
            }
        };
        let slot = &mut self.endpoints[chosen];
        slot.ready = false;
        if let Some(tried) = tried {
            tried.push(&slot.key);
        }
        let call = slot.service.call(request);
        Box::pin(async move { Ok(call.await?) })
    }
}

/// Round robin over the discovered endpoints.
struct RoundRobin {
    changes: Changes,
    endpoints: Vec<(String, Ejecting<Channel>)>,
    next: usize,
}

impl tower::Service<http::Request<Body>> for RoundRobin {
    type Response = http::Response<Body>;
    type Error = tower::BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        while let Some(change) = self.changes.next_ready(cx) {
            match change {
                Change::Insert(key, endpoint) => {
                    self.endpoints.retain(|(k, _)| *k != key);
                    self.endpoints.push((key, endpoint));
                }
                Change::Remove(key) => self.endpoints.retain(|(k, _)| *k != key),
            }
        }
        // The next endpoint in turn that is ready (not ejected, connected).
        let count = self.endpoints.len();
        for offset in 0..count {
            let index = (self.next + offset) % count;
            if let Poll::Ready(Ok(())) =
                tower::Service::poll_ready(&mut self.endpoints[index].1, cx)
            {
                self.next = index;
                return Poll::Ready(Ok(()));
            }
        }
        // None ready: each one polled (or the discovery stream) will wake us.
        Poll::Pending
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let index = self.next;
        self.next = self.next.wrapping_add(1);
        match self.endpoints.get_mut(index) {
            Some((_, endpoint)) => {
                let call = tower::Service::call(endpoint, request);
                Box::pin(async move { Ok(call.await?) })
            }
            None => Box::pin(async { Err("no endpoint".into()) }),
        }
    }
}

/// Turns successive address sets into tower `Change`s.
struct Changes {
    updates: WatchStream<Addresses>,
    current: BTreeSet<String>,
    pending: VecDeque<Change<String, Ejecting<Channel>>>,
    ejections: Arc<Ejections>,
}

impl Changes {
    /// The next change already known, if any (the resolver wakes `cx`
    /// with the next one).
    fn next_ready(&mut self, cx: &mut Context<'_>) -> Option<Change<String, Ejecting<Channel>>> {
        match Pin::new(self).poll_next(cx) {
            Poll::Ready(Some(Ok(change))) => Some(change),
            _ => None,
        }
    }
}

impl Stream for Changes {
    type Item = Result<Change<String, Ejecting<Channel>>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            let Some(next) = std::task::ready!(Pin::new(&mut self.updates).poll_next(cx)) else {
                return Poll::Ready(None);
            };
            let this = &mut *self;
            for gone in this.current.difference(&next) {
                this.pending.push_back(Change::Remove(gone.clone()));
            }
            for new in next.difference(&this.current) {
                match endpoint(new) {
                    Ok(endpoint) => {
                        let endpoint = Ejecting::new(
                            connect_lazy(&endpoint),
                            new.clone(),
                            Arc::clone(&this.ejections),
                        );
                        this.pending
                            .push_back(Change::Insert(new.clone(), endpoint));
                    }
                    Err(error) => tracing::warn!(address = %new, %error, "skipping an endpoint"),
                }
            }
            this.current = next.as_ref().clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::watch;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn address_changes_become_inserts_and_removes() {
        let (tx, rx) = watch::channel(Arc::new(BTreeSet::from([
            "127.0.0.1:1".to_owned(),
            "127.0.0.1:2".to_owned(),
        ])));
        let mut changes = Changes {
            updates: WatchStream::new(rx),
            current: BTreeSet::new(),
            pending: VecDeque::new(),
            ejections: Ejections::new("test", true),
        };
        let mut inserted = Vec::new();
        for _ in 0..2 {
            match changes.next().await.unwrap().unwrap() {
                Change::Insert(key, _) => inserted.push(key),
                Change::Remove(key) => panic!("removed {key}"),
            }
        }
        assert_eq!(inserted, ["127.0.0.1:1", "127.0.0.1:2"]);
        tx.send_replace(Arc::new(BTreeSet::from([
            "127.0.0.1:2".to_owned(),
            "127.0.0.1:3".to_owned(),
        ])));
        let mut seen = Vec::new();
        for _ in 0..2 {
            seen.push(match changes.next().await.unwrap().unwrap() {
                Change::Insert(key, _) => format!("+{key}"),
                Change::Remove(key) => format!("-{key}"),
            });
        }
        assert_eq!(seen, ["-127.0.0.1:1", "+127.0.0.1:3"]);
    }
}
