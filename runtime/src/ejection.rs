//! Outlier ejection: an endpoint that keeps failing is taken out of the
//! balancer for a while, as Envoy's outlier detection does.
//!
//! Five consecutive failures (a transport error, or `UNAVAILABLE`) eject an
//! endpoint for one second, doubling with each ejection in a row up to 30 s;
//! a success resets both. An ejected endpoint reports not-ready, so P2C
//! picks among the others; when the time is up it is ready again and its
//! next call decides. At most half of a balancer's endpoints are ejected at
//! once: a caller whose every endpoint fails keeps trying them rather than
//! ejecting itself into a stall. The registry takes dead instances out
//! within about a second; ejection covers what it cannot see (an instance
//! this caller cannot reach while the registry can) and the time before.

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
        let call = self.inner.call(request);
        let (outcomes, shared, address) = (
            Arc::clone(&self.outcomes),
            Arc::clone(&self.shared),
            self.address.clone(),
        );
        Box::pin(async move {
            let result = call.await;
            let failed = match &result {
                Err(_) => true,
                // A trailers-only UNAVAILABLE carries its status in the headers.
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .is_some_and(|s| s == "14"),
            };
            record(&outcomes, &shared, &address, failed);
            result
        })
    }
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
