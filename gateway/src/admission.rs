//! Who is let in at all, before anything else is done for a request:
//!
//! - per client IP, a token bucket (`--rate-limit` a second, bursts of
//!   `--rate-burst`; GCRA, from governor): over it, 429 with
//!   `Retry-After`, RESOURCE_EXHAUSTED;
//! - for everyone together, at most `--max-in-flight` requests (streams
//!   too, until their answers end): over it, 503 with `Retry-After: 1`,
//!   UNAVAILABLE — shed at once, never queued.
//!
//! `/healthz` and `/metrics` are not limited: probes and scrapes must get
//! through a flood. The buckets of clients gone quiet are forgotten, so
//! what many addresses can make the gateway hold stays bounded.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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
}

/// The rate limits and the in-flight cap.
pub struct Admission {
    limiter: Option<DefaultKeyedRateLimiter<IpAddr>>,
    in_flight: Arc<Semaphore>,
    checks: AtomicU64,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("rate_limited", &self.limiter.is_some())
            .field("free", &self.in_flight.available_permits())
            .finish()
    }
}

/// Once in this many checks, buckets back to full are dropped.
const SWEEP_EVERY: u64 = 4096;

impl Admission {
    /// `rate` requests a second per client IP (none: no limit), bursts of
    /// `burst`, and at most `max_in_flight` at once.
    pub fn new(rate: Option<NonZeroU32>, burst: Option<NonZeroU32>, max_in_flight: usize) -> Self {
        let limiter = rate.map(|rate| {
            let burst = burst.unwrap_or(rate);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Admission {
            limiter,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
            checks: AtomicU64::new(0),
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
        Arc::clone(&self.in_flight)
            .try_acquire_owned()
            .map_err(|_| Refusal::Full)
    }
}

impl Refusal {
    /// The `Retry-After` seconds: at least 1.
    pub fn retry_after(&self) -> u64 {
        match self {
            Refusal::RateLimited(wait) => wait.as_secs_f64().ceil().max(1.0) as u64,
            Refusal::Full => 1,
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
        let admission = Admission::new(NonZeroU32::new(1), NonZeroU32::new(2), 100);
        let _held = [
            admission.admit(ip(1)).unwrap(),
            admission.admit(ip(1)).unwrap(),
        ];
        let refused = admission.admit(ip(1)).unwrap_err();
        assert!(matches!(refused, Refusal::RateLimited(_)), "{refused:?}");
        assert_eq!(refused.retry_after(), 1);
        assert!(admission.admit(ip(2)).is_ok());
    }

    #[test]
    fn a_full_gateway_sheds_at_once_and_takes_again_when_a_request_ends() {
        let admission = Admission::new(None, None, 1);
        let first = admission.admit(ip(1)).unwrap();
        assert_eq!(admission.admit(ip(2)).unwrap_err(), Refusal::Full);
        drop(first);
        assert!(admission.admit(ip(2)).is_ok());
    }
}
