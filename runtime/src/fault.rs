//! Faults injected per RPC while a process runs, in the spirit of Envoy's
//! fault filter: a delay before a call is handled, or an abort with a gRPC
//! code instead of handling it, for a share of one method's calls (or a
//! service's, or every call's) on this instance.
//!
//! Set at start with `--fault` (repeated), and switched while running at
//! `/admin/faults` on the server's port (`GET` lists, `PUT` replaces with a
//! JSON array of specs, `DELETE` clears), which needs the registry token as
//! a bearer token, like registering does. A spec reads
//! `brewmesh.payment.v1.Payments/Authorize=abort:UNAVAILABLE@50%`,
//! `brewmesh.barista.v1.Barista/*=delay:50ms` or `*=delay:1s@10%`.
//!
//! Every fault injected is an event (`fault injected`) and the
//! `brewmesh.fault` attribute on the call's server span, and is counted in
//! `rpc_server_injected_faults` by service, method and kind.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, header};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tonic::Code;
use tonic::body::Body;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::metrics::code_name;
use crate::secret::Secret;

/// What a fault does to a call it hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Waits this long, then handles the call.
    Delay(Duration),
    /// Answers this code at once, without handling the call.
    Abort(Code),
}

/// One fault: which calls, what it does, and to what share of them.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// `package.Service/Method`, `package.Service/*`, or `*`.
    pub method: String,
    /// What it does.
    pub action: Action,
    /// The share of matching calls hit, 0 to 100.
    pub percent: f64,
}

impl Fault {
    /// Whether the call to `path` (`/package.Service/Method`) is one of
    /// this fault's.
    fn covers(&self, path: &str) -> bool {
        let path = path.trim_start_matches('/');
        match self.method.strip_suffix("/*") {
            _ if self.method == "*" => true,
            Some(service) => path.split_once('/').is_some_and(|(s, _)| s == service),
            None => path == self.method,
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.action {
            Action::Delay(by) => write!(
                f,
                "{}=delay:{}",
                self.method,
                humantime::format_duration(by)
            )?,
            Action::Abort(code) => write!(f, "{}=abort:{}", self.method, code_name(code))?,
        }
        if self.percent < 100.0 {
            write!(f, "@{}%", self.percent)?;
        }
        Ok(())
    }
}

/// A spec that does not read as a fault.
#[derive(Debug, thiserror::Error)]
#[error(
    "{0:?} is not a fault: write METHOD=delay:50ms or METHOD=abort:UNAVAILABLE, optionally @PERCENT%"
)]
pub struct BadFault(String);

fn code_named(name: &str) -> Option<Code> {
    (0..=16)
        .map(Code::from_i32)
        .find(|c| code_name(*c).eq_ignore_ascii_case(name))
}

impl FromStr for Fault {
    type Err = BadFault;

    fn from_str(spec: &str) -> Result<Self, BadFault> {
        let bad = || BadFault(spec.to_owned());
        let (method, rest) = spec.trim().split_once('=').ok_or_else(bad)?;
        let (what, percent) = match rest.split_once('@') {
            Some((what, percent)) => {
                let percent: f64 = percent.trim_end_matches('%').parse().map_err(|_| bad())?;
                (what, percent)
            }
            None => (rest, 100.0),
        };
        if !(0.0..=100.0).contains(&percent) {
            return Err(bad());
        }
        let action = match what.split_once(':').ok_or_else(bad)? {
            ("delay", by) => Action::Delay(humantime::parse_duration(by).map_err(|_| bad())?),
            ("abort", code) => Action::Abort(
                code_named(code)
                    .filter(|c| *c != Code::Ok)
                    .ok_or_else(bad)?,
            ),
            _ => return Err(bad()),
        };
        let method = method.trim();
        let shaped = method == "*"
            || method
                .split_once('/')
                .is_some_and(|(s, m)| !s.is_empty() && !m.is_empty() && !m.contains('/'));
        if !shaped {
            return Err(bad());
        }
        Ok(Fault {
            method: method.to_owned(),
            action,
            percent,
        })
    }
}

/// The faults in force on this instance.
#[derive(Debug, Default)]
pub struct Faults {
    faults: RwLock<Vec<Fault>>,
    /// Whether there are any: every call reads this, and only this, when
    /// there are none.
    any: std::sync::atomic::AtomicBool,
}

impl Faults {
    /// Faults `initial` in force.
    pub fn new(initial: Vec<Fault>) -> Arc<Self> {
        let faults = Arc::new(Faults::default());
        faults.set(initial);
        faults
    }

    /// The faults in force.
    pub fn list(&self) -> Vec<Fault> {
        self.faults
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the faults in force.
    pub fn set(&self, faults: Vec<Fault>) {
        let mut current = self.faults.write().unwrap_or_else(|e| e.into_inner());
        self.any
            .store(!faults.is_empty(), std::sync::atomic::Ordering::Relaxed);
        *current = faults;
    }

    /// The first fault covering `path` that hits this call (by its share).
    fn pick(&self, path: &str) -> Option<Fault> {
        if !self.any.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let faults = self.faults.read().unwrap_or_else(|e| e.into_inner());
        faults
            .iter()
            .find(|f| f.covers(path) && fastrand::f64() * 100.0 < f.percent)
            .cloned()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabels {
    service: String,
    method: String,
    kind: &'static str,
}

fn injected() -> &'static Family<FaultLabels, Counter> {
    static INJECTED: OnceLock<Family<FaultLabels, Counter>> = OnceLock::new();
    INJECTED.get_or_init(|| {
        let family = Family::default();
        crate::metrics::register(
            "rpc_server_injected_faults",
            "Faults injected into calls this server answered, by service, method and kind (delay, abort)",
            family.clone(),
        );
        family
    })
}

/// Injects the faults in force into the calls it serves: inside the
/// server's span, so a fault shows in the trace of the call it hit.
#[derive(Debug, Clone)]
pub struct FaultLayer(pub Arc<Faults>);

impl<S> tower::Layer<S> for FaultLayer {
    type Service = Faulty<S>;

    fn layer(&self, inner: S) -> Faulty<S> {
        Faulty {
            inner,
            faults: Arc::clone(&self.0),
        }
    }
}

/// See [`FaultLayer`].
#[derive(Debug, Clone)]
pub struct Faulty<S> {
    inner: S,
    faults: Arc<Faults>,
}

impl<S> tower::Service<http::Request<Body>> for Faulty<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<http::Response<Body>, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        let grpc = path.len() > 1 && path[1..].contains('/') && !path.starts_with("/admin/");
        let Some(fault) = grpc.then(|| self.faults.pick(path)).flatten() else {
            return Box::pin(self.inner.call(request));
        };
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .map(|(s, m)| (s.to_owned(), m.to_owned()))
            .unwrap_or_default();
        // Take the service that was polled ready; leave a fresh clone.
        let mut ready = self.inner.clone();
        std::mem::swap(&mut ready, &mut self.inner);
        Box::pin(async move {
            let kind = match fault.action {
                Action::Delay(_) => "delay",
                Action::Abort(_) => "abort",
            };
            let described = fault.to_string();
            // A warning: an injected fault is abnormal by design, and the
            // call's span keeps it as an event (spans keep warnings only).
            tracing::warn!(target: "brewmesh_runtime::fault", fault = %described, "fault injected");
            tracing::Span::current().set_attribute("brewmesh.fault", described.clone());
            injected()
                .get_or_create(&FaultLabels {
                    service,
                    method,
                    kind,
                })
                .inc();
            match fault.action {
                Action::Delay(by) => {
                    tokio::time::sleep(by).await;
                    ready.call(request).await
                }
                Action::Abort(code) => Ok(tonic::Status::new(
                    code,
                    format!("injected fault ({described})"),
                )
                .into_http()),
            }
        })
    }
}

/// `/admin/faults`: the routes to read and switch the faults, open to
/// holders of `token` only (none: closed).
pub fn admin(faults: Arc<Faults>, token: Option<Secret>) -> axum::Router {
    use axum::routing::get;
    let state = Arc::new((faults, token));
    axum::Router::new()
        .route("/admin/faults", get(list).put(replace).delete(clear))
        .with_state(state)
}

type AdminState = State<Arc<(Arc<Faults>, Option<Secret>)>>;

fn answer(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn refusal(code: Code, message: &str) -> Response {
    let status = match code {
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        _ => StatusCode::BAD_REQUEST,
    };
    let mut response = answer(
        status,
        serde_json::json!({"code": code as i32, "message": message, "details": []}),
    );
    if code == Code::Unauthenticated {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
    }
    response
}

/// `None` when `headers` carry the token; the refusal otherwise.
fn guard(token: Option<&Secret>, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = token else {
        return Some(refusal(
            Code::PermissionDenied,
            "fault injection needs --registry-token (BREWMESH_REGISTRY_TOKEN) on this process",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if token.matches(given) => None,
        _ => Some(refusal(
            Code::Unauthenticated,
            "send the registry token: Authorization: Bearer …",
        )),
    }
}

fn listed(faults: &Faults) -> Response {
    let specs: Vec<String> = faults.list().iter().map(Fault::to_string).collect();
    answer(StatusCode::OK, serde_json::json!({ "faults": specs }))
}

async fn list(State(state): AdminState, headers: HeaderMap) -> Response {
    guard(state.1.as_ref(), &headers).unwrap_or_else(|| listed(&state.0))
}

async fn replace(
    State(state): AdminState,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(refused) = guard(state.1.as_ref(), &headers) {
        return refused;
    }
    let specs: Vec<String> = match serde_json::from_slice(&body) {
        Ok(specs) => specs,
        Err(error) => {
            return refusal(
                Code::InvalidArgument,
                &format!("the body must be a JSON array of fault specs: {error}"),
            );
        }
    };
    let faults: Result<Vec<Fault>, BadFault> = specs.iter().map(|s| s.parse()).collect();
    match faults {
        Ok(faults) => {
            tracing::warn!(faults = ?specs, "faults switched");
            state.0.set(faults);
            listed(&state.0)
        }
        Err(error) => refusal(Code::InvalidArgument, &error.to_string()),
    }
}

async fn clear(State(state): AdminState, headers: HeaderMap) -> Response {
    if let Some(refused) = guard(state.1.as_ref(), &headers) {
        return refused;
    }
    tracing::warn!("faults cleared");
    state.0.set(Vec::new());
    listed(&state.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_read_and_print_back() {
        let fault: Fault = "brewmesh.payment.v1.Payments/Authorize=abort:UNAVAILABLE@50%"
            .parse()
            .unwrap();
        assert_eq!(fault.action, Action::Abort(Code::Unavailable));
        assert_eq!(fault.percent, 50.0);
        assert_eq!(
            fault.to_string(),
            "brewmesh.payment.v1.Payments/Authorize=abort:UNAVAILABLE@50%"
        );
        let delay: Fault = "brewmesh.barista.v1.Barista/*=delay:50ms".parse().unwrap();
        assert_eq!(delay.action, Action::Delay(Duration::from_millis(50)));
        assert!(delay.covers("/brewmesh.barista.v1.Barista/GetMenu"));
        assert!(!delay.covers("/brewmesh.payment.v1.Payments/Authorize"));
        assert!(fault.covers("/brewmesh.payment.v1.Payments/Authorize"));
        assert!(!fault.covers("/brewmesh.payment.v1.Payments/Capture"));
        assert!("*=delay:1s@10%".parse::<Fault>().unwrap().covers("/a.B/C"));
        for bad in [
            "nothing",
            "a.B/C=abort:OK",
            "a.B/C=abort:NOPE",
            "a.B/C=delay:soon",
            "a.B/C=explode:1",
            "a.B/C=delay:1s@150%",
            "a.B=delay:1s",
        ] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_fault_hits_its_share_of_calls() {
        let faults = Faults::new(vec!["a.B/C=delay:1ms@0%".parse().unwrap()]);
        assert!((0..1000).all(|_| faults.pick("/a.B/C").is_none()));
        faults.set(vec!["a.B/C=delay:1ms".parse().unwrap()]);
        assert!((0..1000).all(|_| faults.pick("/a.B/C").is_some()));
        assert!(faults.pick("/a.B/D").is_none());
    }
}
