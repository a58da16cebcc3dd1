//! Retries and hedging as policy, gRPC's way (gRFC A6): a service config's
//! `retryPolicy` and `hedgingPolicy` per method, applied by a layer above
//! the balancer, so each attempt is balanced on its own.
//!
//! - **Only what is safe to send again.** A method's proto
//!   `idempotency_level` decides: a retry policy applies to `IDEMPOTENT`
//!   and `NO_SIDE_EFFECTS` methods (brewmesh's writes that carry an
//!   idempotency key are `IDEMPOTENT`), hedging only to `NO_SIDE_EFFECTS`
//!   unary methods. A write without a key is neither, whatever the config
//!   says; client-streaming calls are never buffered or repeated.
//! - **Retries**: after a retryable code, up to `maxAttempts` in all, with
//!   exponential backoff and full jitter. An answer RESOURCE_EXHAUSTED that
//!   asks for a pause (`grpc-retry-pushback-ms`, `RetryInfo`) is retried at
//!   once: its replica is skipped for that pause (`ejection.rs`), so the
//!   next attempt goes to one with room. A call is committed once an answer
//!   with a body begins; a stream is never retried after its first message.
//! - **Hedging**: when no answer has come after the hedging delay, another
//!   attempt goes out, up to `maxAttempts`; the first answer that is not a
//!   `nonFatalStatusCodes` failure wins and the others are cancelled.
//!   Without a `hedgingDelay` the delay is the method's observed p95
//!   latency, so about one call in twenty is hedged.
//! - **Elsewhere**: each attempt goes to an endpoint the call has not
//!   tried yet when one is ready (`balance.rs`'s P2C reads [`Tried`]).
//! - **One budget**: every extra attempt is withdrawn from a token budget
//!   per channel (as linkerd's: 20% of the calls of the last 10 s, plus a
//!   few a second); when it is empty, the first answer stands.
//! - **One deadline**: the call's `grpc-timeout` covers every attempt; each
//!   attempt carries what is left of it, and none starts once it has passed
//!   (DEADLINE_EXCEEDED without reaching a backend). Attempts after the
//!   first carry `grpc-previous-rpc-attempts`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::time::Instant;
use tonic::Code;
use tonic::body::Body;
use tonic::codegen::http;
use tower::retry::budget::Budget as _;
/// The budget of extra attempts (tower's, as linkerd's).
pub use tower::retry::budget::TpsBudget;

use crate::ejection::{deadline_of, grpc_timeout_value, pushback};

/// How safe a method is to send more than once: its proto
/// `idempotency_level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Safety {
    /// A write that may not be repeated (no idempotency key).
    Unsafe,
    /// Repeating it has the effect of doing it once.
    Idempotent,
    /// A read.
    NoSideEffects,
}

/// One method as the policies see it.
#[derive(Debug, Clone)]
pub struct Method {
    /// `package.Service`.
    pub service: String,
    /// The method's name.
    pub name: String,
    /// Its idempotency level.
    pub safety: Safety,
    /// Whether the client sends a stream (never buffered or repeated).
    pub client_streaming: bool,
    /// Whether the server answers with a stream (never hedged).
    pub server_streaming: bool,
}

impl Method {
    fn path(&self) -> String {
        format!("/{}/{}", self.service, self.name)
    }
}

/// Every method of an encoded `FileDescriptorSet`, with its safety.
pub fn methods_of(descriptor_set: &[u8]) -> Result<Vec<Method>, prost::DecodeError> {
    use prost::Message as _;
    use prost_types::method_options::IdempotencyLevel;
    let set = prost_types::FileDescriptorSet::decode(descriptor_set)?;
    let mut methods = Vec::new();
    for file in &set.file {
        for service in &file.service {
            let service_name = match file.package() {
                "" => service.name().to_owned(),
                package => format!("{package}.{}", service.name()),
            };
            for method in &service.method {
                let level = method
                    .options
                    .as_ref()
                    .map(|o| o.idempotency_level())
                    .unwrap_or_default();
                methods.push(Method {
                    service: service_name.clone(),
                    name: method.name().to_owned(),
                    safety: match level {
                        IdempotencyLevel::NoSideEffects => Safety::NoSideEffects,
                        IdempotencyLevel::Idempotent => Safety::Idempotent,
                        IdempotencyLevel::IdempotencyUnknown => Safety::Unsafe,
                    },
                    client_streaming: method.client_streaming(),
                    server_streaming: method.server_streaming(),
                });
            }
        }
    }
    Ok(methods)
}

/// A `retryPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (2 to 5).
    pub max_attempts: u32,
    /// The first backoff's upper bound.
    pub initial_backoff: Duration,
    /// The largest backoff.
    pub max_backoff: Duration,
    /// How much each backoff grows.
    pub backoff_multiplier: f64,
    /// The codes worth another attempt.
    pub retryable: Vec<Code>,
}

/// A `hedgingPolicy`.
#[derive(Debug, Clone, PartialEq)]
pub struct HedgingPolicy {
    /// Attempts in all, the first included (2 to 5).
    pub max_attempts: u32,
    /// The wait before each further attempt; `None`: the method's observed
    /// p95 latency.
    pub delay: Option<Duration>,
    /// Failures that do not end the call while attempts are left (another
    /// goes out at once).
    pub non_fatal: Vec<Code>,
}

/// What a method's config asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Repeat {
    /// Retry after a failure.
    Retry(RetryPolicy),
    /// Send more attempts when the first is slow.
    Hedge(HedgingPolicy),
}

/// A gRPC service config's `methodConfig`s: which methods get which policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServiceConfig {
    /// Each entry's names (`(service, method)`: `("", "")` is every method,
    /// `(service, "")` every method of a service) and its policy.
    pub entries: Vec<(Vec<(String, String)>, Repeat)>,
}

/// A service config that is not one.
#[derive(Debug, thiserror::Error)]
#[error("not a service config: {0}")]
pub struct BadConfig(String);

impl ServiceConfig {
    /// Reads the JSON of a gRPC service config (`methodConfig` with `name`,
    /// `retryPolicy` or `hedgingPolicy`; other keys are ignored).
    pub fn from_json(json: &str) -> Result<Self, BadConfig> {
        let bad = |what: &str| BadConfig(what.to_owned());
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|e| BadConfig(e.to_string()))?;
        let mut entries = Vec::new();
        let configs = match value.get("methodConfig") {
            None => return Ok(Self::default()),
            Some(configs) => configs
                .as_array()
                .ok_or_else(|| bad("methodConfig is a list"))?,
        };
        for config in configs {
            let names = (config.get("name").and_then(|n| n.as_array()))
                .ok_or_else(|| bad("each methodConfig has a name list"))?
                .iter()
                .map(|name| {
                    let field = |key: &str| {
                        name.get(key)
                            .and_then(|v| v.as_str())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let (service, method) = (field("service"), field("method"));
                    if service.is_empty() && !method.is_empty() {
                        return Err(bad("a name with a method names its service"));
                    }
                    Ok((service, method))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let policy = match (config.get("retryPolicy"), config.get("hedgingPolicy")) {
                (Some(_), Some(_)) => return Err(bad("retryPolicy or hedgingPolicy, not both")),
                (Some(retry), None) => Repeat::Retry(RetryPolicy {
                    max_attempts: attempts(retry)?,
                    initial_backoff: duration(retry, "initialBackoff")?
                        .ok_or_else(|| bad("retryPolicy.initialBackoff"))?,
                    max_backoff: duration(retry, "maxBackoff")?
                        .ok_or_else(|| bad("retryPolicy.maxBackoff"))?,
                    backoff_multiplier: (retry.get("backoffMultiplier"))
                        .and_then(|m| m.as_f64())
                        .filter(|m| *m > 0.0)
                        .ok_or_else(|| bad("retryPolicy.backoffMultiplier > 0"))?,
                    retryable: codes(retry, "retryableStatusCodes")?,
                }),
                (None, Some(hedge)) => Repeat::Hedge(HedgingPolicy {
                    max_attempts: attempts(hedge)?,
                    delay: duration(hedge, "hedgingDelay")?,
                    non_fatal: codes(hedge, "nonFatalStatusCodes")?,
                }),
                (None, None) => continue,
            };
            entries.push((names, policy));
        }
        Ok(Self { entries })
    }

    /// The policy for `method`: the entry naming it, else its service's,
    /// else the default (an empty name), as gRPC picks.
    fn policy_for(&self, method: &Method) -> Option<&Repeat> {
        let mut best: Option<(u8, &Repeat)> = None;
        for (names, policy) in &self.entries {
            for (service, name) in names {
                let rank = match (service.as_str(), name.as_str()) {
                    ("", _) => 1,
                    (s, "") if s == method.service => 2,
                    (s, n) if s == method.service && n == method.name => 3,
                    _ => continue,
                };
                if best.is_none_or(|(b, _)| rank > b) {
                    best = Some((rank, policy));
                }
            }
        }
        best.map(|(_, policy)| policy)
    }
}

fn attempts(policy: &serde_json::Value) -> Result<u32, BadConfig> {
    // gRPC caps attempts at 5, whatever the config says.
    match policy.get("maxAttempts").and_then(|m| m.as_u64()) {
        Some(n) if n >= 2 => Ok(n.min(5) as u32),
        _ => Err(BadConfig("maxAttempts is at least 2".into())),
    }
}

/// A JSON duration (`"0.1s"`), if present.
fn duration(policy: &serde_json::Value, key: &str) -> Result<Option<Duration>, BadConfig> {
    let Some(value) = policy.get(key) else {
        return Ok(None);
    };
    value
        .as_str()
        .and_then(|s| s.strip_suffix('s'))
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Some(Duration::from_secs_f64(s)))
        .ok_or_else(|| BadConfig(format!("{key} is a duration like \"0.1s\"")))
}

fn codes(policy: &serde_json::Value, key: &str) -> Result<Vec<Code>, BadConfig> {
    let Some(list) = policy.get(key) else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or_else(|| BadConfig(format!("{key} is a list")))?;
    list.iter()
        .map(|code| {
            code.as_str()
                .and_then(code_named)
                .ok_or_else(|| BadConfig(format!("{key}: {code} is not a gRPC code")))
        })
        .collect()
}

fn code_named(name: &str) -> Option<Code> {
    (0..=16)
        .map(Code::from_i32)
        .find(|code| crate::metrics::code_name(*code).eq_ignore_ascii_case(name))
}

/// The endpoints a call's earlier attempts went to, in each attempt's
/// extensions: `balance.rs`'s P2C sends the next attempt elsewhere
/// when another endpoint is ready, so a hedge does not join the stalled
/// call it hedges and a retry does not go back to the replica that failed.
#[derive(Debug, Clone, Default)]
pub struct Tried(Arc<std::sync::Mutex<Vec<String>>>);

impl Tried {
    pub(super) fn contains(&self, key: &str) -> bool {
        (self.0.lock().unwrap_or_else(|e| e.into_inner()))
            .iter()
            .any(|k| k == key)
    }

    pub(super) fn push(&self, key: &str) {
        (self.0.lock().unwrap_or_else(|e| e.into_inner())).push(key.to_owned());
    }
}

/// What a layer applies: each known method's policy, and the budget that
/// bounds the extra attempts of them all.
#[derive(Debug)]
pub struct Policies {
    by_path: HashMap<String, Arc<Planned>>,
    budget: TpsBudget,
}

#[derive(Debug)]
struct Planned {
    repeat: Repeat,
    /// The latencies of the method's last answers, for the hedging delay.
    latencies: Mutex<Latencies>,
}

impl Policies {
    /// Each of `methods` with the policy `config` gives it, where the
    /// method is safe for it; `budget` bounds the extra attempts.
    pub fn new(config: &ServiceConfig, methods: &[Method], budget: TpsBudget) -> Self {
        let mut by_path = HashMap::new();
        for method in methods {
            let Some(repeat) = config.policy_for(method) else {
                continue;
            };
            let allowed = !method.client_streaming
                && match repeat {
                    Repeat::Retry(_) => method.safety != Safety::Unsafe,
                    Repeat::Hedge(_) => {
                        method.safety == Safety::NoSideEffects && !method.server_streaming
                    }
                };
            if allowed {
                let planned = Planned {
                    repeat: repeat.clone(),
                    latencies: Mutex::default(),
                };
                by_path.insert(method.path(), Arc::new(planned));
            }
        }
        Self { by_path, budget }
    }

    /// brewmesh's own service config ([`brewmesh_config`]) over brewmesh's
    /// methods, with the default budget.
    pub fn brewmesh() -> Self {
        static METHODS: std::sync::OnceLock<Vec<Method>> = std::sync::OnceLock::new();
        let methods = METHODS.get_or_init(|| {
            #[allow(clippy::expect_used)]
            methods_of(brewmesh::FILE_DESCRIPTOR_SET).expect("the compiled-in descriptors decode")
        });
        Self::new(brewmesh_config(), methods, default_budget())
    }

    /// No policy for anything: every call is sent once.
    pub fn none() -> Self {
        Self::new(&ServiceConfig::default(), &[], default_budget())
    }

    /// The policy of the method at `path`, if it has one.
    pub fn repeat(&self, path: &str) -> Option<&Repeat> {
        self.by_path.get(path).map(|p| &p.repeat)
    }
}

/// brewmesh's service config, `proto/service_config.json`
/// ([`brewmesh::SERVICE_CONFIG`]).
pub fn brewmesh_config() -> &'static ServiceConfig {
    static CONFIG: std::sync::OnceLock<ServiceConfig> = std::sync::OnceLock::new();
    CONFIG.get_or_init(|| {
        #[allow(clippy::expect_used)]
        ServiceConfig::from_json(brewmesh::SERVICE_CONFIG)
            .expect("proto/service_config.json is a service config (a unit test reads it)")
    })
}

/// The budget of extra attempts per channel, as linkerd's default: 20% of
/// the calls of the last 10 s, plus 10 a second so a quiet caller can
/// still retry.
pub fn default_budget() -> TpsBudget {
    TpsBudget::new(Duration::from_secs(10), 10, 0.2)
}

/// The last answers' latencies of one method, and their p95.
#[derive(Debug, Default)]
struct Latencies {
    ring: Vec<Duration>,
    next: usize,
    p95: Option<Duration>,
}

/// Latencies kept per method for its p95.
const LATENCY_WINDOW: usize = 128;
/// Answers needed before the p95 is trusted.
const MIN_FOR_P95: usize = 20;
/// The hedging delay before there is a p95.
const FIRST_HEDGING_DELAY: Duration = Duration::from_millis(50);
/// The shortest hedging delay from a p95.
const MIN_HEDGING_DELAY: Duration = Duration::from_millis(1);

impl Latencies {
    fn record(&mut self, latency: Duration) {
        if self.ring.len() < LATENCY_WINDOW {
            self.ring.push(latency);
        } else {
            self.ring[self.next] = latency;
        }
        self.next = (self.next + 1) % LATENCY_WINDOW;
        // Recomputed every 16 answers: a sort of 128 is cheap at that rate.
        if self.ring.len() >= MIN_FOR_P95 && self.next.is_multiple_of(16) {
            let mut sorted = self.ring.clone();
            sorted.sort_unstable();
            self.p95 = Some(sorted[sorted.len() * 95 / 100]);
        }
    }

    fn hedging_delay(&self) -> Duration {
        self.p95
            .map_or(FIRST_HEDGING_DELAY, |p| p.max(MIN_HEDGING_DELAY))
    }
}

fn repeats() -> &'static Family<Vec<(String, String)>, Counter> {
    static REPEATS: std::sync::OnceLock<Family<Vec<(String, String)>, Counter>> =
        std::sync::OnceLock::new();
    REPEATS.get_or_init(|| {
        let family = Family::default();
        crate::metrics::register(
            "rpc_client_extra_attempts",
            "Attempts a client sent beyond a call's first, by method and why (retry, hedge), and those the budget refused (denied)",
            family.clone(),
        );
        family
    })
}

fn count(path: &str, kind: &str) {
    repeats()
        .get_or_create(&vec![
            ("method".to_owned(), path.trim_start_matches('/').to_owned()),
            ("kind".to_owned(), kind.to_owned()),
        ])
        .inc();
}

/// Applies [`Policies`] and the call's deadline to every call through `S`.
#[derive(Clone)]
pub struct Policied<S> {
    inner: S,
    policies: Arc<Policies>,
}

impl<S> Policied<S> {
    /// `inner` with `policies`.
    pub fn new(inner: S, policies: Arc<Policies>) -> Self {
        Self { inner, policies }
    }
}

type Answer = Result<http::Response<Body>, tower::BoxError>;

/// What the layer sends attempts through (the balancer's buffer): cloned
/// for each attempt after the first.
pub trait Attempts:
    tower::Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = tower::BoxError,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> Attempts for S where
    S: tower::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = tower::BoxError,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

impl<S: Attempts> tower::Service<http::Request<Body>> for Policied<S> {
    type Response = http::Response<Body>;
    type Error = tower::BoxError;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), tower::BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let deadline = deadline_of(request.headers());
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Box::pin(async { Ok(expired()) });
        }
        let Some(planned) = self.policies.by_path.get(request.uri().path()).cloned() else {
            return Box::pin(self.inner.call(request));
        };
        // The service polled ready takes the first attempt; a clone takes
        // any other.
        let ready = self.inner.clone();
        let first = std::mem::replace(&mut self.inner, ready);
        let policies = Arc::clone(&self.policies);
        Box::pin(async move {
            policies.budget.deposit();
            let (parts, body) = request.into_parts();
            use http_body_util::BodyExt as _;
            let body = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) => return Err(error.into()),
            };
            let call = Call {
                parts,
                body,
                deadline,
                inner: first,
                policies,
                planned,
                tried: Tried::default(),
            };
            call.run().await
        })
    }
}

/// An answer that a deadline passed before any attempt could start.
fn expired() -> http::Response<Body> {
    tonic::Status::deadline_exceeded("the deadline passed before the call was sent").into_http()
}

/// One call with a policy, its request kept for each attempt.
struct Call<S> {
    parts: http::request::Parts,
    body: bytes::Bytes,
    deadline: Option<Instant>,
    inner: S,
    policies: Arc<Policies>,
    planned: Arc<Planned>,
    /// Where the attempts went, so the next one goes elsewhere.
    tried: Tried,
}

/// The gRPC status of an answer that has one in its headers (a
/// trailers-only answer); `None` for an answer whose status will come in
/// its trailers, after a body: such a call is committed.
fn status_of(answer: &Answer) -> Option<Code> {
    match answer {
        Err(_) => Some(Code::Unavailable),
        Ok(response) => response
            .headers()
            .get("grpc-status")
            .and_then(|s| s.to_str().ok()?.parse::<i32>().ok())
            .map(Code::from_i32),
    }
}

impl<S: Attempts> Call<S> {
    /// Attempt number `previous + 1`, with what is left of the deadline;
    /// `None` once it has passed.
    fn request(&self, previous: u32) -> Option<http::Request<Body>> {
        let mut parts = self.parts.clone();
        parts.extensions.insert(self.tried.clone());
        if let Some(deadline) = self.deadline {
            let left = deadline.checked_duration_since(Instant::now())?;
            if left.is_zero() {
                return None;
            }
            parts
                .headers
                .insert("grpc-timeout", grpc_timeout_value(left));
        }
        if previous > 0 {
            parts.headers.insert(
                "grpc-previous-rpc-attempts",
                http::HeaderValue::from(previous),
            );
        }
        Some(http::Request::from_parts(
            parts,
            Body::new(http_body_util::Full::new(self.body.clone())),
        ))
    }

    async fn run(mut self) -> Answer {
        let started = Instant::now();
        let answer = match self.planned.repeat.clone() {
            Repeat::Retry(policy) => self.retry(&policy).await,
            Repeat::Hedge(policy) => self.hedge(&policy).await,
        };
        if matches!(status_of(&answer), None | Some(Code::Ok)) {
            (self
                .planned
                .latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner()))
            .record(started.elapsed());
        }
        answer
    }

    async fn retry(&mut self, policy: &RetryPolicy) -> Answer {
        let path = self.parts.uri.path().to_owned();
        let mut backoff = policy.initial_backoff;
        let mut attempt = 0;
        let mut inner = self.inner.clone();
        loop {
            let Some(request) = self.request(attempt) else {
                return Ok(expired());
            };
            let answer = if attempt == 0 {
                self.inner.call(request).await
            } else {
                use tower::ServiceExt as _;
                match inner.ready().await {
                    Ok(ready) => ready.call(request).await,
                    Err(error) => Err(error),
                }
            };
            attempt += 1;
            let Some(code) = status_of(&answer) else {
                return answer;
            };
            if code == Code::Ok
                || !policy.retryable.contains(&code)
                || attempt >= policy.max_attempts
            {
                return answer;
            }
            // A replica that pushed back is skipped for its pause: the
            // next attempt goes elsewhere at once. A negative pushback
            // means do not retry.
            let wait = match (code, &answer) {
                (Code::ResourceExhausted, Ok(response)) => {
                    let headers = response.headers();
                    if headers.get("grpc-retry-pushback-ms").is_some()
                        && pushback(headers).is_none()
                    {
                        return answer;
                    }
                    pushback(headers).map(|_| Duration::ZERO)
                }
                _ => None,
            };
            let wait = wait.unwrap_or_else(|| {
                let jittered = Duration::from_secs_f64(backoff.as_secs_f64() * fastrand::f64());
                backoff = Duration::from_secs_f64(
                    (backoff.as_secs_f64() * policy.backoff_multiplier)
                        .min(policy.max_backoff.as_secs_f64()),
                );
                jittered
            });
            if self.deadline.is_some_and(|d| Instant::now() + wait >= d) {
                return answer;
            }
            if !self.policies.budget.withdraw() {
                count(&path, "denied");
                return answer;
            }
            count(&path, "retry");
            tokio::time::sleep(wait).await;
        }
    }

    async fn hedge(&mut self, policy: &HedgingPolicy) -> Answer {
        use tower::ServiceExt as _;
        let path = self.parts.uri.path().to_owned();
        let delay = policy.delay.unwrap_or_else(|| {
            (self
                .planned
                .latencies
                .lock()
                .unwrap_or_else(|e| e.into_inner()))
            .hedging_delay()
        });
        let mut attempts = tokio::task::JoinSet::new();
        let Some(request) = self.request(0) else {
            return Ok(expired());
        };
        attempts.spawn(self.inner.call(request));
        let mut sent = 1;
        let mut last: Option<Answer> = None;
        loop {
            let more = sent < policy.max_attempts;
            let next = tokio::select! {
                joined = attempts.join_next() => match joined {
                    Some(Ok(answer)) => Some(answer),
                    Some(Err(error)) => Some(Err(error.into())),
                    None => None,
                },
                () = tokio::time::sleep(delay), if more => None,
            };
            match next {
                Some(answer) => {
                    let fatal = match status_of(&answer) {
                        None | Some(Code::Ok) => true,
                        Some(code) => !policy.non_fatal.contains(&code),
                    };
                    if fatal {
                        return answer;
                    }
                    last = Some(answer);
                    if !more {
                        if attempts.is_empty() {
                            break;
                        }
                        continue;
                    }
                    // A non-fatal failure: the next attempt goes at once.
                }
                None if !more => break,
                None => {}
            }
            if !self.policies.budget.withdraw() {
                count(&path, "denied");
                if attempts.is_empty() {
                    break;
                }
                // No more attempts: wait for those out.
                sent = policy.max_attempts;
                continue;
            }
            let Some(request) = self.request(sent) else {
                break;
            };
            count(&path, "hedge");
            let mut inner = self.inner.clone();
            attempts.spawn(async move { inner.ready().await?.call(request).await });
            sent += 1;
        }
        last.unwrap_or_else(|| Ok(expired()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn method(name: &str, safety: Safety) -> Method {
        Method {
            service: "pkg.Shop".into(),
            name: name.into(),
            safety,
            client_streaming: false,
            server_streaming: false,
        }
    }

    #[test]
    fn a_service_config_reads_as_grpc_writes_it() {
        let config = ServiceConfig::from_json(
            r#"{"methodConfig": [
              {"name": [{}], "retryPolicy": {"maxAttempts": 9, "initialBackoff": "0.05s",
                "maxBackoff": "1s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "resource_exhausted"]}},
              {"name": [{"service": "pkg.Shop", "method": "Get"}],
               "hedgingPolicy": {"maxAttempts": 3, "nonFatalStatusCodes": ["UNAVAILABLE"]}}
            ]}"#,
        )
        .unwrap();
        let Repeat::Retry(retry) = &config.entries[0].1 else {
            panic!("a retry policy first")
        };
        assert_eq!(retry.max_attempts, 5, "gRPC's cap");
        assert_eq!(retry.initial_backoff, Duration::from_millis(50));
        assert_eq!(
            retry.retryable,
            [Code::Unavailable, Code::ResourceExhausted]
        );
        let Some(Repeat::Hedge(hedge)) = config.policy_for(&method("Get", Safety::NoSideEffects))
        else {
            panic!("the method's own entry wins")
        };
        assert_eq!(hedge.delay, None, "no delay given: the observed p95");
        for bad in [
            r#"{"methodConfig": [{"name": [{}], "retryPolicy": {"maxAttempts": 1}}]}"#,
            r#"{"methodConfig": [{"name": [{"method": "Get"}], "hedgingPolicy": {"maxAttempts": 2}}]}"#,
            r#"{"methodConfig": [{"name": [{}], "hedgingPolicy": {"maxAttempts": 2, "hedgingDelay": "soon"}}]}"#,
            r#"{"methodConfig": [{"name": [{}], "hedgingPolicy": {"maxAttempts": 2, "nonFatalStatusCodes": ["NOPE"]}}]}"#,
        ] {
            assert!(ServiceConfig::from_json(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn brewmeshs_own_config_retries_keyed_writes_and_hedges_reads() {
        let policies = Policies::brewmesh();
        let repeat = |path: &str| policies.repeat(path).cloned();
        assert!(matches!(
            repeat("/brewmesh.barista.v1.Barista/PlaceOrder"),
            Some(Repeat::Retry(_))
        ));
        assert!(matches!(
            repeat("/brewmesh.payment.v1.Payments/Authorize"),
            Some(Repeat::Retry(_))
        ));
        assert!(matches!(
            repeat("/brewmesh.barista.v1.Barista/GetOrder"),
            Some(Repeat::Hedge(_))
        ));
        assert!(
            matches!(
                repeat("/brewmesh.barista.v1.Barista/WatchOrder"),
                Some(Repeat::Retry(_))
            ),
            "a stream is retried before its first answer, never hedged"
        );
        assert_eq!(repeat("/brewmesh.barista.v1.Barista/CancelOrder"), None);
        assert_eq!(repeat("/brewmesh.registry.v1.Registry/Register"), None);
        assert_eq!(repeat("/brewmesh.registry.v1.Registry/KeepAlive"), None);
    }

    #[test]
    fn only_what_is_safe_to_repeat_gets_a_policy() {
        let config = ServiceConfig::from_json(
            r#"{"methodConfig": [
              {"name": [{}], "retryPolicy": {"maxAttempts": 2, "initialBackoff": "0.1s",
                "maxBackoff": "1s", "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}},
              {"name": [{"service": "pkg.Shop", "method": "Get"}, {"service": "pkg.Shop", "method": "Put"}],
               "hedgingPolicy": {"maxAttempts": 2}}
            ]}"#,
        )
        .unwrap();
        let mut stream = method("Stream", Safety::Idempotent);
        stream.client_streaming = true;
        let policies = Policies::new(
            &config,
            &[
                method("Get", Safety::NoSideEffects),
                method("Put", Safety::Idempotent),
                method("Cancel", Safety::Unsafe),
                method("Keyed", Safety::Idempotent),
                stream,
            ],
            default_budget(),
        );
        assert!(matches!(
            policies.repeat("/pkg.Shop/Get"),
            Some(Repeat::Hedge(_))
        ));
        assert_eq!(
            policies.repeat("/pkg.Shop/Put"),
            None,
            "a write is never hedged"
        );
        assert_eq!(
            policies.repeat("/pkg.Shop/Cancel"),
            None,
            "nor retried without a key"
        );
        assert!(matches!(
            policies.repeat("/pkg.Shop/Keyed"),
            Some(Repeat::Retry(_))
        ));
        assert_eq!(policies.repeat("/pkg.Shop/Stream"), None);
    }

    #[test]
    fn the_hedging_delay_follows_the_observed_p95() {
        let mut latencies = Latencies::default();
        assert_eq!(latencies.hedging_delay(), FIRST_HEDGING_DELAY);
        for ms in 1..=100 {
            latencies.record(Duration::from_millis(ms));
        }
        let delay = latencies.hedging_delay();
        assert!(
            delay >= Duration::from_millis(90) && delay <= Duration::from_millis(100),
            "{delay:?}"
        );
    }
}
