//! Outlier ejection: an endpoint that keeps failing, or stays much slower
//! than its peers, is taken out of the balancer for a while, as Envoy's
//! outlier detection does; an endpoint that says it is full is skipped for
//! as long as it asks.
//!
//! - **Failures**: five in a row eject an endpoint for one second, doubling
//!   with each ejection in a row up to 30 s; a success resets the count.
//! - **Latency**: each endpoint keeps an EWMA of its answers' latency. One
//!   whose EWMA, over at least [`MIN_LATENCY_SAMPLES`] answers since it was
//!   last let back in ([`RETURNING_SAMPLES`] after a latency ejection), is
//!   above [`SLOW_FACTOR`] × the median of its peers'
//!   (and at least [`SLOW_GAP`] above it) is ejected the same way. Relative
//!   to the peers, so a whole set that slows together ejects nobody. When it
//!   comes back its samples start afresh: its next answers decide, and a
//!   replica that recovered stays in (the doubling then resets).
//! - **Pushback**: an answer RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms`
//!   or a `RetryInfo` delay skips the endpoint for that long (at most
//!   [`MAX_SKIP`]), so the balancer sends the next calls to replicas with
//!   room. At least one endpoint is never skipped: when every replica is
//!   full, the caller hears so instead of waiting.
//!
//! An ejected or skipped endpoint reports not-ready, so P2C picks among the
//! others; when its time is up it is ready again. At most half of a
//! balancer's endpoints are ejected at once: a caller whose every endpoint
//! fails keeps trying them rather than ejecting itself into a stall. The
//! registry takes dead instances out within about a second; ejection covers
//! what it cannot see (an instance this caller cannot reach while the
//! registry can, or one too slow while its health check still answers) and
//! the time before.
//!
//! A failure is a transport error; `UNAVAILABLE`, `DEADLINE_EXCEEDED` or
//! `CANCELLED` in a trailers-only answer (tonic's server ends an expired
//! call with CANCELLED "Timeout expired"); or a call the caller gave up
//! on (its future dropped) once its `grpc-timeout` had passed. A call
//! dropped before its deadline (a caller that went away, a hedge that
//! lost) says nothing. Latency is measured to the answer's headers.
//!
//! Each endpoint's latency EWMA and whether it is out are gauges
//! (`rpc_client_endpoint_latency_seconds`, `rpc_client_endpoint_out`), by
//! target and endpoint.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
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
/// Answers an endpoint needs, since it was last let back in, before its
/// latency is judged.
pub const MIN_LATENCY_SAMPLES: u32 = 5;
/// Answers an endpoint let back in after a latency ejection needs before it
/// is judged again.
pub const RETURNING_SAMPLES: u32 = 2;
/// How many times its peers' median latency an endpoint's may reach.
pub const SLOW_FACTOR: f64 = 3.0;
/// How far above its peers' median an endpoint's latency must also be:
/// below a millisecond, "three times slower" is noise.
pub const SLOW_GAP: Duration = Duration::from_millis(1);
/// The weight of each new answer in an endpoint's latency EWMA.
const LATENCY_WEIGHT: f64 = 0.1;
/// The longest an endpoint that pushed back is skipped.
pub const MAX_SKIP: Duration = Duration::from_secs(10);

/// What the endpoints of one balancer share: how many there are, how many
/// are out, and each one's outcomes, to compare latencies.
#[derive(Debug, Default)]
pub struct Ejections {
    /// What the endpoints serve (the service name, or the addresses).
    target: String,
    /// Whether latency ejects (round robin, the baseline, ignores it).
    by_latency: bool,
    endpoints: AtomicUsize,
    ejected: AtomicUsize,
    skipped: AtomicUsize,
    members: Mutex<Vec<(String, Arc<Outcomes>)>>,
}

impl Ejections {
    /// The shared state of a balancer over `target`'s endpoints, ejecting
    /// much slower endpoints too if `by_latency`; its endpoints' latencies
    /// are gauges from now on.
    pub fn new(target: impl Into<String>, by_latency: bool) -> Arc<Self> {
        let shared = Arc::new(Self {
            target: target.into(),
            by_latency,
            ..Self::default()
        });
        let mut balancers = every_balancer().lock().unwrap_or_else(|e| e.into_inner());
        balancers.retain(|b| b.strong_count() > 0);
        balancers.push(Arc::downgrade(&shared));
        drop(balancers);
        shared
    }

    /// Takes an ejection slot if fewer than half the endpoints are out.
    fn try_eject(&self) -> bool {
        let limit = self.endpoints.load(Ordering::Relaxed) / 2;
        take(&self.ejected, limit)
    }

    /// Takes a skip slot if another endpoint would still be in.
    fn try_skip(&self) -> bool {
        let limit = (self.endpoints.load(Ordering::Relaxed))
            .saturating_sub(self.ejected.load(Ordering::Relaxed) + 1);
        take(&self.skipped, limit)
    }

    /// The median latency EWMA of `address`'s peers that have been judged
    /// (enough samples) and are in rotation; `None` with no such peer.
    fn peers_median(&self, address: &str) -> Option<f64> {
        let members = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let mut peers: Vec<f64> = members
            .iter()
            .filter(|(a, _)| a != address)
            .filter_map(|(_, o)| {
                let state = o.state.lock().unwrap_or_else(|e| e.into_inner());
                (state.ejected_until.is_none() && state.samples >= MIN_LATENCY_SAMPLES)
                    .then_some(state.latency_ewma)
            })
            .collect();
        if peers.is_empty() {
            return None;
        }
        peers.sort_by(f64::total_cmp);
        let middle = peers.len() / 2;
        Some(if peers.len().is_multiple_of(2) {
            (peers[middle - 1] + peers[middle]) / 2.0
        } else {
            peers[middle]
        })
    }
}

fn take(count: &AtomicUsize, limit: usize) -> bool {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then_some(n + 1)
        })
        .is_ok()
}

fn give_back(count: &AtomicUsize) {
    let _ = count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
}

/// Every balancer of this process, for the gauges.
fn every_balancer() -> &'static Mutex<Vec<Weak<Ejections>>> {
    static BALANCERS: OnceLock<Mutex<Vec<Weak<Ejections>>>> = OnceLock::new();
    BALANCERS.get_or_init(|| {
        crate::metrics::register_gauges(
            "rpc_client_endpoint_latency_seconds",
            "Each balanced endpoint's latency to the answer's headers (EWMA), as its callers see it",
            || gauges(|state| (state.samples > 0).then_some(state.latency_ewma / 1e6)),
        );
        crate::metrics::register_gauges(
            "rpc_client_endpoint_out",
            "1 while a balanced endpoint is out of rotation (ejected for failures or latency, or skipped after pushing back)",
            || {
                let now = Instant::now();
                gauges(|state| {
                    let out = state.ejected_until.is_some_and(|u| u > now)
                        || state.skipped_until.is_some_and(|u| u > now);
                    Some(f64::from(u8::from(out)))
                })
            },
        );
        Mutex::new(Vec::new())
    })
}

fn gauges(value: impl Fn(&State) -> Option<f64>) -> Vec<(crate::metrics::Labels, f64)> {
    let mut balancers = every_balancer().lock().unwrap_or_else(|e| e.into_inner());
    balancers.retain(|b| b.strong_count() > 0);
    let mut out = Vec::new();
    for shared in balancers.iter().filter_map(Weak::upgrade) {
        let members = shared.members.lock().unwrap_or_else(|e| e.into_inner());
        for (address, outcomes) in members.iter() {
            let state = outcomes.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = value(&state) {
                let labels = vec![
                    ("target".to_owned(), shared.target.clone()),
                    ("endpoint".to_owned(), address.clone()),
                ];
                out.push((labels, v));
            }
        }
    }
    out
}

/// Why an endpoint is out of rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Failing,
    Slow,
}

#[derive(Debug, Default)]
struct State {
    ejected_until: Option<Instant>,
    why: Option<Why>,
    /// Ejections in a row (each doubles the next).
    ejections: u32,
    skipped_until: Option<Instant>,
    /// Latency EWMA in microseconds, and the answers it is made of since
    /// the endpoint was last let back in.
    latency_ewma: f64,
    samples: u32,
}

#[derive(Debug, Default)]
struct Outcomes {
    failures: AtomicU32,
    /// Calls sent and not yet answered or given up.
    in_flight: AtomicU32,
    state: Mutex<State>,
}

impl Outcomes {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How an endpoint stands, as its balancer reads it when picking.
#[derive(Debug, Clone)]
pub struct Standing(Arc<Outcomes>);

impl Standing {
    /// Whether the endpoint is on probation (let back in after being slow,
    /// not judged again yet) with a call already out: it gets one call at
    /// a time until it is judged. Its load estimate decayed while it was
    /// out, so without this a balancer would send it a burst — slow again
    /// if it still is, and piled up if it recovered.
    pub fn held_back(&self) -> bool {
        let state = self.0.state();
        state.why == Some(Why::Slow)
            && state.ejected_until.is_none()
            && state.samples < RETURNING_SAMPLES
            && self.0.in_flight.load(Ordering::Relaxed) > 0
    }
}

/// An endpoint that leaves rotation when it keeps failing, stays slow, or
/// pushes back.
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
        let outcomes = Arc::<Outcomes>::default();
        (shared.members.lock().unwrap_or_else(|e| e.into_inner()))
            .push((address.clone(), Arc::clone(&outcomes)));
        Self {
            inner,
            address,
            outcomes,
            shared,
            timer: None,
        }
    }
}

impl<S> Drop for Ejecting<S> {
    fn drop(&mut self) {
        self.shared.endpoints.fetch_sub(1, Ordering::Relaxed);
        (self
            .shared
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner()))
        .retain(|(_, o)| !Arc::ptr_eq(o, &self.outcomes));
        let state = self.outcomes.state();
        if state.ejected_until.is_some() {
            give_back(&self.shared.ejected);
        }
        if state.skipped_until.is_some() {
            give_back(&self.shared.skipped);
        }
    }
}

impl<S> Ejecting<S> {
    /// A handle on this endpoint's standing, for the balancer.
    pub fn standing(&self) -> Standing {
        Standing(Arc::clone(&self.outcomes))
    }

    /// Lets the endpoint back in for what has run out; the earliest time
    /// it is still out until, if any.
    fn out_until(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut state = self.outcomes.state();
        if let Some(until) = state.ejected_until
            && until <= now
        {
            // Time is up: back in rotation; its next answers decide.
            state.ejected_until = None;
            state.samples = 0;
            give_back(&self.shared.ejected);
            tracing::info!(address = %self.address, why = ?state.why, "endpoint back in rotation after ejection");
        }
        if let Some(until) = state.skipped_until
            && until <= now
        {
            state.skipped_until = None;
            give_back(&self.shared.skipped);
        }
        match (state.ejected_until, state.skipped_until) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
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
        while let Some(until) = self.out_until() {
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
            timer.as_mut().reset(until);
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        self.timer = None;
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let deadline = deadline_of(request.headers());
        let call = self.inner.call(request);
        self.outcomes.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut pending = Pending {
            outcomes: Arc::clone(&self.outcomes),
            shared: Arc::clone(&self.shared),
            address: self.address.clone(),
            deadline,
            done: false,
        };
        let started = Instant::now();
        Box::pin(async move {
            let result = call.await;
            let outcome = match &result {
                Err(_) => Outcome::Failed,
                // A trailers-only answer carries its status in the headers.
                Ok(response) => Outcome::of(response.headers(), started.elapsed()),
            };
            pending.done = true;
            record(
                &pending.outcomes,
                &pending.shared,
                &pending.address,
                outcome,
            );
            result
        })
    }
}

/// What one answer says about its endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outcome {
    Failed,
    /// Answered (whatever the status) after this long.
    Answered(Duration),
    /// RESOURCE_EXHAUSTED, asking to be left alone this long.
    Full(Duration),
}

impl Outcome {
    fn of(headers: &http::HeaderMap, latency: Duration) -> Self {
        match headers.get("grpc-status").map(|s| s.as_bytes()) {
            Some(b"14" | b"4" | b"1") => Outcome::Failed,
            Some(b"8") => match pushback(headers) {
                Some(wait) => Outcome::Full(wait),
                None => Outcome::Answered(latency),
            },
            _ => Outcome::Answered(latency),
        }
    }
}

/// How long a RESOURCE_EXHAUSTED answer asks its caller to wait: its
/// `grpc-retry-pushback-ms` (a negative one means "do not retry": none),
/// else its `RetryInfo` detail's delay.
pub fn pushback(headers: &http::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers.get("grpc-retry-pushback-ms") {
        let ms: i64 = ms.to_str().ok()?.trim().parse().ok()?;
        return u64::try_from(ms).ok().map(Duration::from_millis);
    }
    use tonic_types::StatusExt as _;
    let status = tonic::Status::from_header_map(headers)?;
    status.get_details_retry_info()?.retry_delay
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
        self.outcomes.in_flight.fetch_sub(1, Ordering::Relaxed);
        if !self.done && self.deadline.is_some_and(|d| Instant::now() >= d) {
            record(&self.outcomes, &self.shared, &self.address, Outcome::Failed);
        }
    }
}

/// When a call whose headers are `headers` must be answered by, from its
/// `grpc-timeout`.
pub fn deadline_of(headers: &http::HeaderMap) -> Option<Instant> {
    let timeout = grpc_timeout(headers.get("grpc-timeout")?.to_str().ok()?)?;
    Some(Instant::now() + timeout)
}

/// A `grpc-timeout` header's value (`100m`, `10S`): digits and a unit.
pub fn grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
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

/// `left` as a `grpc-timeout` value: microseconds while they fit the
/// header's eight digits (below 99 s), milliseconds beyond (at most eight
/// digits of them).
pub fn grpc_timeout_value(left: Duration) -> http::HeaderValue {
    let value = if left < Duration::from_secs(99) {
        format!("{}u", left.as_micros().max(1))
    } else {
        format!("{}m", left.as_millis().min(99_999_999))
    };
    http::HeaderValue::from_str(&value).unwrap_or(http::HeaderValue::from_static("1S"))
}

fn record(outcomes: &Outcomes, shared: &Ejections, address: &str, outcome: Outcome) {
    let latency = match outcome {
        Outcome::Full(wait) => {
            let mut state = outcomes.state();
            if state.skipped_until.is_none() && shared.try_skip() {
                state.skipped_until = Some(Instant::now() + wait.min(MAX_SKIP));
            }
            outcomes.failures.store(0, Ordering::Relaxed);
            return;
        }
        Outcome::Answered(latency) => latency,
        Outcome::Failed => {
            let failures = outcomes.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if failures >= FAILURES_TO_EJECT && eject(outcomes, shared, address, Why::Failing) {
                outcomes.failures.store(0, Ordering::Relaxed);
            }
            return;
        }
    };
    outcomes.failures.store(0, Ordering::Relaxed);
    let ewma = {
        let mut state = outcomes.state();
        if state.ejected_until.is_some() {
            // An answer to a call sent before the ejection.
            return;
        }
        if state.why == Some(Why::Failing) {
            // A success ends a series of failure ejections.
            state.why = None;
            state.ejections = 0;
        }
        // The plain mean of the first answers, then the EWMA: one slow
        // first answer must not weigh like ten.
        let micros = latency.as_secs_f64() * 1e6;
        state.samples = state.samples.saturating_add(1);
        let weight = LATENCY_WEIGHT.max(1.0 / f64::from(state.samples));
        state.latency_ewma += weight * (micros - state.latency_ewma);
        // One let back in after being slow is judged sooner: each of its
        // answers may be a slow one.
        let needed = if state.why == Some(Why::Slow) {
            RETURNING_SAMPLES
        } else {
            MIN_LATENCY_SAMPLES
        };
        if !shared.by_latency || state.samples < needed {
            return;
        }
        state.latency_ewma
    };
    let Some(median) = shared.peers_median(address) else {
        return;
    };
    let gap = SLOW_GAP.as_secs_f64() * 1e6;
    if ewma > median * SLOW_FACTOR && ewma > median + gap {
        eject(outcomes, shared, address, Why::Slow);
    } else {
        let mut state = outcomes.state();
        if state.why == Some(Why::Slow) {
            // Judged again and found in line with its peers: recovered.
            state.why = None;
            state.ejections = 0;
        }
    }
}

/// Ejects the endpoint for the next length in its series, if a slot is
/// free; whether it did.
fn eject(outcomes: &Outcomes, shared: &Ejections, address: &str, why: Why) -> bool {
    let mut state = outcomes.state();
    if state.ejected_until.is_some() || !shared.try_eject() {
        return false;
    }
    let length = BASE_EJECTION
        .saturating_mul(1 << state.ejections.min(5))
        .min(MAX_EJECTION);
    state.ejections += 1;
    state.why = Some(why);
    state.ejected_until = Some(Instant::now() + length);
    let latency = Duration::from_micros(state.latency_ewma as u64);
    drop(state);
    match why {
        Why::Failing => tracing::warn!(%address, ?length, "endpoint keeps failing: ejected"),
        Why::Slow => {
            tracing::warn!(%address, ?length, ?latency, "endpoint much slower than its peers: ejected")
        }
    }
    true
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
        let shared = Ejections::new("test", true);
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
        assert_eq!(endpoint.outcomes.state().ejections, 0, "a success resets");
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
        let shared = Ejections::new("test", true);
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

    #[test]
    fn timeouts_above_99_seconds_go_in_milliseconds_and_read_back() {
        assert_eq!(grpc_timeout_value(Duration::from_millis(1500)), "1500000u");
        assert_eq!(grpc_timeout_value(Duration::from_secs(300)), "300000m");
        // Eight digits at most, whatever the deadline.
        let far = grpc_timeout_value(Duration::from_secs(400_000));
        assert_eq!(far, "99999999m");
        assert!(grpc_timeout(far.to_str().unwrap()).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_half_the_endpoints_are_ejected() {
        let shared = Ejections::new("test", true);
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

    /// A stand-in endpoint that answers after `delay_ms`, with `status`
    /// (and a pushback of 200 ms when it is RESOURCE_EXHAUSTED).
    #[derive(Clone)]
    struct Timed {
        delay_ms: Arc<std::sync::atomic::AtomicU64>,
        status: Option<&'static str>,
    }

    impl Timed {
        fn new(ms: u64) -> Self {
            Self {
                delay_ms: Arc::new(ms.into()),
                status: None,
            }
        }
    }

    impl Service<http::Request<Body>> for Timed {
        type Response = http::Response<Body>;
        type Error = &'static str;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            let delay = Duration::from_millis(self.delay_ms.load(Ordering::Relaxed));
            let status = self.status;
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                let mut response = http::Response::new(Body::empty());
                if let Some(status) = status {
                    let headers = response.headers_mut();
                    headers.insert("grpc-status", http::HeaderValue::from_static(status));
                    headers.insert(
                        "grpc-retry-pushback-ms",
                        http::HeaderValue::from_static("200"),
                    );
                }
                Ok(response)
            })
        }
    }

    async fn answer<S: Service<http::Request<Body>>>(endpoint: &mut S) {
        let _ = endpoint
            .ready()
            .await
            .ok()
            .unwrap()
            .call(http::Request::new(Body::empty()))
            .await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_much_slower_than_its_peers_leaves_rotation_until_it_recovers() {
        let shared = Ejections::new("test", true);
        let slow = Timed::new(50);
        let mut endpoints: Vec<_> = [Timed::new(2), Timed::new(3), slow.clone()]
            .into_iter()
            .enumerate()
            .map(|(n, t)| Ejecting::new(t, format!("e{n}"), shared.clone()))
            .collect();
        for _ in 0..MIN_LATENCY_SAMPLES {
            for endpoint in &mut endpoints {
                answer(endpoint).await;
            }
        }
        assert!(is_ready(&mut endpoints[0]) && is_ready(&mut endpoints[1]));
        assert!(!is_ready(&mut endpoints[2]), "50 ms against peers' 2-3 ms");

        // Recovered while out: back after the ejection, judged afresh, in.
        slow.delay_ms.store(3, Ordering::Relaxed);
        tokio::time::advance(BASE_EJECTION).await;
        assert!(is_ready(&mut endpoints[2]));
        for _ in 0..MIN_LATENCY_SAMPLES * 2 {
            for endpoint in &mut endpoints {
                answer(endpoint).await;
            }
        }
        assert!(is_ready(&mut endpoints[2]), "in line with its peers now");
        assert_eq!(endpoints[2].outcomes.state().ejections, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_set_that_slows_together_ejects_nobody() {
        let shared = Ejections::new("test", true);
        let mut endpoints: Vec<_> = (0..3)
            .map(|n| Ejecting::new(Timed::new(40 + n * 10), format!("e{n}"), shared.clone()))
            .collect();
        for _ in 0..MIN_LATENCY_SAMPLES * 4 {
            for endpoint in &mut endpoints {
                answer(endpoint).await;
            }
        }
        assert!(endpoints.iter_mut().all(is_ready));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_endpoint_is_skipped_for_its_pushback_but_never_the_last_one() {
        let shared = Ejections::new("test", true);
        let full = Timed {
            status: Some("8"),
            ..Timed::new(0)
        };
        let mut a = Ejecting::new(full.clone(), "a".into(), shared.clone());
        let mut b = Ejecting::new(full, "b".into(), shared.clone());
        answer(&mut a).await;
        assert!(!is_ready(&mut a), "skipped for its 200 ms");
        answer(&mut b).await;
        assert!(
            is_ready(&mut b),
            "the last one in stays in: the caller hears it is full"
        );
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(is_ready(&mut a), "back after its pushback");
    }
}
