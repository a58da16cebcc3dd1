//! Outlier ejection: an endpoint that keeps failing is taken out of the
//! balancer for a while, as Envoy's outlier detection does.
//!
//! Five consecutive failures eject an endpoint for one second, doubling with each ejection in a row up to 30 s;
//! a success resets both. An ejected endpoint reports not-ready, so P2C
//! picks among the others; when the time is up it is ready again and its
//! next call decides. At most half of a balancer's endpoints are ejected at
//! once: a caller whose every endpoint fails keeps trying them rather than
//! ejecting itself into a stall. The registry takes dead instances out
//! within about a second; ejection covers what it cannot see (an instance
//! this caller cannot reach while the registry can, or one too slow for
//! the caller's deadline while its health check still answers) and the
//! time before.
//!
//! A failure is a transport error; `UNAVAILABLE`, `DEADLINE_EXCEEDED` or
//! `CANCELLED` in a trailers-only answer (tonic's server ends an expired
//! call with CANCELLED "Timeout expired"); or a call the caller gave up
//! on (its future dropped) once its `grpc-timeout` had passed. A call
//! dropped before its deadline (a caller that went away) says nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::codegen::http;

/// Consecutive failures that eject an endpoint.
pub const FAILURES_TO_EJECT: u32 = 5;
/// The first ejection's length; each further one in a row doubles it.
pub const BASE_EJECTION: Duration = Duration::from_secs(1);
/// The longest ejection.
pub const MAX_EJECTION: Duration = Duration::from_secs(30);

/// What the endpoints of one balancer share: how many there are and how
/// many are ejected.
#[derive(Debug, Default)]
pub struct Ejections {
    endpoints: AtomicUsize,
    ejected: AtomicUsize,
}

impl Ejections {
    /// Takes an ejection slot if fewer than half the endpoints are out.
    fn try_eject(&self) -> bool {
        let limit = self.endpoints.load(Ordering::Relaxed) / 2;
        self.ejected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    fn restore(&self) {
        let _ = self
            .ejected
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
}

#[derive(Debug, Default)]
struct Outcomes {
    failures: AtomicU32,
    ejections: AtomicU32,
    ejected_until: Mutex<Option<Instant>>,
}

/// An endpoint that ejects itself when it keeps failing.
pub struct Ejecting<S> {
    inner: S,
    address: String,
    outcomes: Arc<Outcomes>,
    shared: Arc<Ejections>,
    timer: Option<Pin<Box<Sleep>>>,
}

impl<S> Ejecting<S> {
    /// Wraps the endpoint at `address`, one of the balancer's `shared`.
    pub fn new(inner: S, address: String, shared: Arc<Ejections>) -> Self {
        shared.endpoints.fetch_add(1, Ordering::Relaxed);
        Self {
            inner,
            address,
            outcomes: Arc::default(),
            shared,
            timer: None,
        }
    }
}

impl<S> Drop for Ejecting<S> {
    fn drop(&mut self) {
        self.shared.endpoints.fetch_sub(1, Ordering::Relaxed);
        if self
            .outcomes
            .ejected_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            self.shared.restore();
        }
    }
}

impl<S> tower::Service<http::Request<Body>> for Ejecting<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        let until = *self
            .outcomes
            .ejected_until
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(until) = until {
            if Instant::now() < until {
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                timer.as_mut().reset(until);
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            // Time is up: back in rotation; the next call decides.
            *self
                .outcomes
                .ejected_until
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
            self.timer = None;
            self.shared.restore();
            tracing::info!(address = %self.address, "endpoint back in rotation after ejection");
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| grpc_timeout(v.to_str().ok()?))
            .map(|timeout| Instant::now() + timeout);
        let call = self.inner.call(request);
        let mut pending = Pending {
            outcomes: Arc::clone(&self.outcomes),
            shared: Arc::clone(&self.shared),
            address: self.address.clone(),
            deadline,
            done: false,
        };
        Box::pin(async move {
            let result = call.await;
            let failed = match &result {
                Err(_) => true,
                // A trailers-only answer carries its status in the headers.
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .is_some_and(|s| s == "14" || s == "4" || s == "1"),
            };
            pending.done = true;
            record(&pending.outcomes, &pending.shared, &pending.address, failed);
            result
        })
    }
}

/// A call on its way: if it is dropped unanswered past its deadline, the
/// endpoint was too slow, and that counts as a failure.
struct Pending {
    outcomes: Arc<Outcomes>,
    shared: Arc<Ejections>,
    address: String,
    deadline: Option<Instant>,
    done: bool,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done && self.deadline.is_some_and(|d| Instant::now() >= d) {
            record(&self.outcomes, &self.shared, &self.address, true);
        }
    }
}

/// A `grpc-timeout` header's value (`100m`, `10S`): digits and a unit.
fn grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn record(outcomes: &Outcomes, shared: &Ejections, address: &str, failed: bool) {
    if !failed {
        outcomes.failures.store(0, Ordering::Relaxed);
        outcomes.ejections.store(0, Ordering::Relaxed);
        return;
    }
    let failures = outcomes.failures.fetch_add(1, Ordering::Relaxed) + 1;
    if failures < FAILURES_TO_EJECT {
        return;
    }
    let mut until = outcomes
        .ejected_until
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if until.is_some() || !shared.try_eject() {
        return;
    }
    let ejections = outcomes.ejections.fetch_add(1, Ordering::Relaxed);
    let length = BASE_EJECTION
        .saturating_mul(1 << ejections.min(5))
        .min(MAX_EJECTION);
    *until = Some(Instant::now() + length);
    outcomes.failures.store(0, Ordering::Relaxed);
    tracing::warn!(%address, ?length, "endpoint keeps failing: ejected");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use tower::{Service, ServiceExt};

    /// A stand-in endpoint that fails while `failing` is set.
    #[derive(Clone)]
    struct Flaky(Arc<AtomicBool>);

    impl Service<http::Request<Body>> for Flaky {
        type Response = http::Response<Body>;
        type Error = &'static str;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            std::future::ready(if self.0.load(Ordering::Relaxed) {
                Err("down")
            } else {
                Ok(http::Response::new(Body::empty()))
            })
        }
    }

    fn is_ready<S: Service<http::Request<Body>>>(service: &mut S) -> bool {
        let waker = std::task::Waker::noop();
        service
            .poll_ready(&mut Context::from_waker(waker))
            .is_ready()
    }

    #[tokio::test(start_paused = true)]
    async fn five_failures_in_a_row_eject_for_a_growing_while() {
        let shared = Arc::new(Ejections::default());
        let failing = Arc::new(AtomicBool::new(true));
        let mut endpoint = Ejecting::new(Flaky(failing.clone()), "a".into(), shared.clone());
        let _other = Ejecting::new(Flaky(Arc::default()), "b".into(), shared.clone());

        for _ in 0..FAILURES_TO_EJECT {
            assert!(is_ready(&mut endpoint));
            assert!(
                endpoint
                    .ready()
                    .await
                    .unwrap()
                    .call(http::Request::new(Body::empty()))
                    .await
                    .is_err()
            );
        }
        assert!(
            !is_ready(&mut endpoint),
            "ejected after {FAILURES_TO_EJECT} failures"
        );
        tokio::time::advance(BASE_EJECTION).await;
        assert!(is_ready(&mut endpoint), "back after the first ejection");

        // Still failing: the second ejection lasts twice as long.
        for _ in 0..FAILURES_TO_EJECT {
            let _ = endpoint
                .ready()
                .await
                .unwrap()
                .call(http::Request::new(Body::empty()))
                .await;
        }
        tokio::time::advance(BASE_EJECTION).await;
        assert!(!is_ready(&mut endpoint), "the second ejection is longer");
        tokio::time::advance(BASE_EJECTION).await;
        assert!(is_ready(&mut endpoint));

        failing.store(false, Ordering::Relaxed);
        assert!(
            endpoint
                .ready()
                .await
                .unwrap()
                .call(http::Request::new(Body::empty()))
                .await
                .is_ok()
        );
        assert_eq!(
            endpoint.outcomes.ejections.load(Ordering::Relaxed),
            0,
            "a success resets"
        );
    }

    /// An endpoint that never answers.
    #[derive(Clone)]
    struct Hung;

    impl Service<http::Request<Body>> for Hung {
        type Response = http::Response<Body>;
        type Error = &'static str;
        type Future = std::future::Pending<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            std::future::pending()
        }
    }

    /// A server that ends each call as tonic ends an expired one.
    #[derive(Clone)]
    struct Expiring;

    impl Service<http::Request<Body>> for Expiring {
        type Response = http::Response<Body>;
        type Error = &'static str;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            let mut response = http::Response::new(Body::empty());
            response
                .headers_mut()
                .insert("grpc-status", http::HeaderValue::from_static("1"));
            std::future::ready(Ok(response))
        }
    }

    fn with_deadline(timeout: &'static str) -> http::Request<Body> {
        let mut request = http::Request::new(Body::empty());
        request
            .headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static(timeout));
        request
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_slower_than_the_deadline_leaves_rotation() {
        let shared = Arc::new(Ejections::default());
        let mut slow = Ejecting::new(Hung, "slow".into(), shared.clone());
        let _fast = Ejecting::new(Flaky(Arc::default()), "fast".into(), shared.clone());
        for _ in 0..FAILURES_TO_EJECT {
            let call = slow.ready().await.unwrap().call(with_deadline("100m"));
            // The caller gives up at its deadline.
            assert!(
                tokio::time::timeout(Duration::from_millis(100), call)
                    .await
                    .is_err()
            );
        }
        assert!(
            !is_ready(&mut slow),
            "ejected after {FAILURES_TO_EJECT} timeouts"
        );

        // Calls dropped before their deadline (callers gone) say nothing.
        tokio::time::advance(BASE_EJECTION * 4).await;
        assert!(is_ready(&mut slow));
        for _ in 0..FAILURES_TO_EJECT {
            let call = slow.ready().await.unwrap().call(with_deadline("10S"));
            drop(call);
        }
        assert!(is_ready(&mut slow), "no deadline had passed");

        // tonic's own answer to an expired call counts the same.
        let mut expiring = Ejecting::new(Expiring, "expiring".into(), shared.clone());
        let _third = Ejecting::new(Flaky(Arc::default()), "third".into(), shared.clone());
        for _ in 0..FAILURES_TO_EJECT {
            let _ = expiring
                .ready()
                .await
                .unwrap()
                .call(with_deadline("1S"))
                .await;
        }
        assert!(!is_ready(&mut expiring), "CANCELLED answers eject");
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit() {
        assert_eq!(grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(grpc_timeout("2M"), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout("5u"), Some(Duration::from_micros(5)));
        assert_eq!(grpc_timeout("x"), None);
        assert_eq!(grpc_timeout(""), None);
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_half_the_endpoints_are_ejected() {
        let shared = Arc::new(Ejections::default());
        let down = Arc::new(AtomicBool::new(true));
        let mut a = Ejecting::new(Flaky(down.clone()), "a".into(), shared.clone());
        let mut b = Ejecting::new(Flaky(down.clone()), "b".into(), shared.clone());
        for _ in 0..FAILURES_TO_EJECT {
            let _ = a
                .ready()
                .await
                .unwrap()
                .call(http::Request::new(Body::empty()))
                .await;
            let _ = b
                .ready()
                .await
                .unwrap()
                .call(http::Request::new(Body::empty()))
                .await;
        }
        assert_eq!(
            usize::from(!is_ready(&mut a)) + usize::from(!is_ready(&mut b)),
            1,
            "one of two stays in"
        );
    }
}
