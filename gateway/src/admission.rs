//! Who is let in at all, before anything else is done for a request:
//!
//! - per client IP, a token bucket (`--rate-limit` a second, bursts of
//!   `--rate-burst`; GCRA, from governor): over it, 429 with
//!   `Retry-After`, RESOURCE_EXHAUSTED;
//! - for everyone together, at most `--max-in-flight` requests (streams
//!   too, until their answers end): over it, 503 with `Retry-After: 1`,
//!   UNAVAILABLE — shed at once, never queued;
//! - and while the answers made for clients that do not read them hold
//!   more than `--max-held-bytes`, the same 503: each answer goes out a
//!   16 KiB piece at a time, as its client's flow-control window lets it
//!   ([`Paced`]), and what waits is counted until sent or dropped with its
//!   connection, so a client that asks and never reads holds at most that
//!   much of the gateway's memory, however many streams it opens.
//!
//! `/healthz` and `/metrics` are not limited: probes and scrapes must get
//! through a flood. The buckets of clients gone quiet are forgotten, so
//! what many addresses can make the gateway hold stays bounded.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use governor::clock::Clock as _;
use governor::{DefaultKeyedRateLimiter, Quota};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a request was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// This client is over its rate: try again after this.
    RateLimited(Duration),
    /// The gateway is full.
    Full,
    /// The gateway holds too many answers its clients have not read.
    Holding,
}

/// The rate limits and the in-flight cap.
pub struct Admission {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    in_flight: Arc<Semaphore>,
    checks: AtomicU64,
    /// Bytes of answers waiting for their clients ([`Paced`]).
    held: Arc<AtomicUsize>,
    max_held: usize,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("rate_limited", &self.limiter.is_some())
            .field("free", &self.in_flight.available_permits())
            .field("held", &self.held.load(Ordering::Relaxed))
            .finish()
    }
}

/// Once in this many checks, buckets back to full are dropped.
const SWEEP_EVERY: u64 = 4096;

impl Admission {
    /// `rate` requests a second per client IP (none: no limit), bursts of
    /// `burst`, at most `max_in_flight` at once, and none while answers of
    /// more than `max_held` bytes wait for their clients.
    pub fn new(
        rate: Option<NonZeroU32>,
        burst: Option<NonZeroU32>,
        max_in_flight: usize,
        max_held: usize,
    ) -> Self {
        let limiter = rate.map(|rate| {
            let burst = burst.unwrap_or(rate);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Admission {
            limiter,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            checks: AtomicU64::new(0),
            held: Arc::new(AtomicUsize::new(0)),
            max_held,
        }
    }

    /// `body`, handed out a piece at a time, what waits counted; `keep`
    /// lives as long as the body.
    pub fn pace<B, K>(&self, body: B, keep: K) -> Paced<B, K> {
        Paced {
            inner: body,
            pending: Bytes::new(),
            held: Arc::clone(&self.held),
            _keep: keep,
        }
    }

    /// Lets a request from `client` in (the permit is held until its
    /// answer ends: `listen.rs`), or says why not.
    pub fn admit(&self, client: IpAddr) -> Result<OwnedSemaphorePermit, Refusal> {
        if let Some(limiter) = &self.limiter {
            if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
            if let Err(not_until) = limiter.check_key(&client) {
                let wait = not_until.wait_time_from(limiter.clock().now());
                return Err(Refusal::RateLimited(wait));
            }
        }
        if self.held.load(Ordering::Relaxed) > self.max_held {
            return Err(Refusal::Holding);
        }
        Arc::clone(&self.in_flight)
            .try_acquire_owned()
            .map_err(|_| Refusal::Full)
    }
}

/// The most of an answer handed to hyper at once: HTTP/2's frame size. It
/// asks for the next piece only once its client's window has room.
const PIECE: usize = 16 * 1024;

/// An answer's body, a [`PIECE`] at a time; the rest of a larger frame
/// waits here, counted in [`Admission`]'s held bytes until it is sent or
/// the body dropped.
pub struct Paced<B, K> {
    inner: B,
    pending: Bytes,
    held: Arc<AtomicUsize>,
    _keep: K,
}

impl<B, K> http_body::Body for Paced<B, K>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    K: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if !this.pending.is_empty() {
            let piece = this.pending.split_to(this.pending.len().min(PIECE));
            this.held.fetch_sub(piece.len(), Ordering::Relaxed);
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        match frame.into_data() {
            Ok(mut data) if data.len() > PIECE => {
                let piece = data.split_to(PIECE);
                this.held.fetch_add(data.len(), Ordering::Relaxed);
                this.pending = data;
                Poll::Ready(Some(Ok(Frame::data(piece))))
            }
            Ok(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Err(trailers) => Poll::Ready(Some(Ok(trailers))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let pending = self.pending.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + pending);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + pending);
        }
        hint
    }
}

impl<B, K> Drop for Paced<B, K> {
    fn drop(&mut self) {
        self.held.fetch_sub(self.pending.len(), Ordering::Relaxed);
    }
}

impl Refusal {
    /// The `Retry-After` seconds: at least 1.
    pub fn retry_after(&self) -> u64 {
        match self {
            Refusal::RateLimited(wait) => wait.as_secs_f64().ceil().max(1.0) as u64,
            Refusal::Full | Refusal::Holding => 1,
        }
    }

    /// The refusal as a gRPC status.
    pub fn status(&self) -> tonic::Status {
        match self {
            Refusal::RateLimited(wait) => tonic::Status::resource_exhausted(format!(
                "this client is over its rate limit; try again in {} ms",
                wait.as_millis().max(1)
            )),
            Refusal::Full => tonic::Status::unavailable(
                "the gateway is at its limit of requests in flight; try again shortly",
            ),
            Refusal::Holding => tonic::Status::unavailable(
                "the gateway holds as many unread answers as it may; try again shortly",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn a_client_over_its_rate_waits_while_others_pass() {
        let admission = Admission::new(NonZeroU32::new(1), NonZeroU32::new(2), 100, 1 << 20);
        let _held = [
            admission.admit(ip(1)).unwrap(),
            admission.admit(ip(1)).unwrap(),
        ];
        let refused = admission.admit(ip(1)).unwrap_err();
        assert!(matches!(refused, Refusal::RateLimited(_)), "{refused:?}");
        assert_eq!(refused.retry_after(), 1);
        assert!(admission.admit(ip(2)).is_ok());
    }

    #[tokio::test]
    async fn unread_answers_past_the_budget_shed_new_requests_until_sent_or_dropped() {
        use http_body_util::{BodyExt as _, Full};
        let admission = Admission::new(None, None, 100, 64 * 1024);
        let answer = || Full::new(Bytes::from(vec![b'x'; 200 * 1024]));
        // The first piece handed out, the rest waits, counted.
        let mut sent = admission.pace(answer(), ());
        let first = sent.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first.len(), PIECE);
        assert_eq!(admission.admit(ip(1)).unwrap_err(), Refusal::Holding);
        // Read to its end: nothing waits.
        let rest = sent.collect().await.unwrap().to_bytes();
        assert_eq!(rest.len(), 200 * 1024 - PIECE);
        assert!(admission.admit(ip(1)).is_ok());
        // Dropped unread (its connection gone): given back too.
        let mut dropped = admission.pace(answer(), ());
        dropped.frame().await.unwrap().unwrap();
        assert!(admission.admit(ip(1)).is_err());
        drop(dropped);
        assert!(admission.admit(ip(1)).is_ok());
    }

    #[test]
    fn a_full_gateway_sheds_at_once_and_takes_again_when_a_request_ends() {
        let admission = Admission::new(None, None, 1, 1 << 20);
        let first = admission.admit(ip(1)).unwrap();
        assert_eq!(admission.admit(ip(2)).unwrap_err(), Refusal::Full);
        drop(first);
        assert!(admission.admit(ip(2)).is_ok());
    }
}
