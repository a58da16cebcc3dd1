//! Tower layers that trace and measure gRPC calls: [`ServerLayer`] around a
//! server's routes (a server span continuing the caller's trace, and the
//! RPC metrics), [`ClientLayer`] around a channel (a client span, and the
//! trace context put into the request's headers).
//!
//! Span names and attributes follow the OpenTelemetry RPC conventions,
//! old or new names as [`crate::telemetry::semconv`] says. A call ends when
//! its response body ends (its trailers carry the status), so a stream's
//! span and latency cover the whole stream.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body_util::BodyExt as _;
use tonic::Code;
use tonic::body::Body;
use tracing::Instrument as _;

use crate::metrics::{Handles, RpcCodeLabels, SERVER_FAULTS, code_name, rpc_handles};
use crate::telemetry::{
    Traced, extract, fail, inject, request_span, semconv, tracing_enabled, unsampled,
};

/// The service and method of a gRPC path (`/package.Service/Method`).
fn split_path(path: &str) -> (&str, &str) {
    let path = path.trim_start_matches('/');
    path.split_once('/').unwrap_or((path, ""))
}

/// Health checks and reflection are plumbing: measured, not traced.
fn plumbing(service: &str) -> bool {
    service.starts_with("grpc.health.") || service.starts_with("grpc.reflection.")
}

/// The gRPC status in a header map (headers of a trailers-only response,
/// or trailers).
fn status_in(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(Code::from_i32)
}

/// An RPC span of `$kind` named `$name`, with `$fields`.
macro_rules! grpc_span {
    ($kind:literal, $name:expr, $($fields:tt)*) => {
        tracing::info_span!(
            target: "brewmesh::rpc",
            "grpc",
            otel.name = %$name,
            otel.kind = $kind,
            $($fields)*
        )
    };
}

/// A span with the RPC attributes of `service`/`method`. The attributes are
/// the span's fields, given at creation: each later `set_attribute` would
/// cost a trip through the subscriber.
fn rpc_span(kind: &'static str, service: &str, method: &str) -> tracing::Span {
    use tracing::field::Empty;
    let name = format!("{service}/{method}");
    let conventions = semconv();
    // `rpc.method` is the one key both sets use, with different values: the
    // new, fully qualified one wins when both are asked for.
    match (kind, conventions.old, conventions.new) {
        ("server", true, false) => grpc_span!("server", name,
            rpc.system = "grpc", rpc.service = %service, rpc.method = %method,
            rpc.grpc.status_code = Empty),
        ("server", false, _) => grpc_span!("server", name,
            rpc.system.name = "grpc", rpc.method = %name, rpc.response.status_code = Empty),
        ("server", true, true) => grpc_span!("server", name,
            rpc.system = "grpc", rpc.system.name = "grpc", rpc.service = %service,
            rpc.method = %name, rpc.grpc.status_code = Empty, rpc.response.status_code = Empty),
        (_, true, false) => grpc_span!("client", name,
            rpc.system = "grpc", rpc.service = %service, rpc.method = %method,
            rpc.grpc.status_code = Empty),
        (_, false, _) => grpc_span!("client", name,
            rpc.system.name = "grpc", rpc.method = %name, rpc.response.status_code = Empty),
        (_, true, true) => grpc_span!("client", name,
            rpc.system = "grpc", rpc.system.name = "grpc", rpc.service = %service,
            rpc.method = %name, rpc.grpc.status_code = Empty, rpc.response.status_code = Empty),
    }
}

/// Records the outcome on the span: status attributes, and an error status
/// for the codes the conventions count as errors.
fn finish_span(span: &tracing::Span, kind: &'static str, code: Code, message: Option<&str>) {
    // A field the span was not made with is not recorded.
    span.record("rpc.grpc.status_code", code as i64);
    span.record("rpc.response.status_code", code_name(code));
    // Server spans: only codes that say the server failed are errors;
    // client spans: every non-OK code (OpenTelemetry's gRPC conventions).
    let error = match kind {
        "server" => SERVER_FAULTS.contains(&code),
        _ => code != Code::Ok,
    };
    if error {
        fail(span, message.unwrap_or(code_name(code)));
    }
}

/// Traces and measures every call a gRPC server answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerLayer;

impl<S> tower::Layer<S> for ServerLayer {
    type Service = Server<S>;

    fn layer(&self, inner: S) -> Server<S> {
        Server { inner }
    }
}

/// See [`ServerLayer`].
#[derive(Debug, Clone)]
pub struct Server<S> {
    inner: S,
}

/// The end of one call: metrics and span, recorded once, when the body
/// ends or is dropped.
struct CallEnd {
    /// The RPC metrics, on the server side.
    measured: Option<Arc<Handles<RpcCodeLabels>>>,
    started: Instant,
    span: Option<tracing::Span>,
    kind: &'static str,
    done: AtomicBool,
}

impl CallEnd {
    fn finish(&self, code: Code, message: Option<&str>) {
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(handles) = &self.measured {
            // A sampled call's trace is its latency bucket's exemplar.
            let trace = self.span.as_ref().map(crate::telemetry::trace_id_of);
            #[allow(clippy::cast_sign_loss)]
            handles.end(self.started.elapsed(), code as i32 as u16, trace);
        }
        if let Some(span) = &self.span {
            finish_span(span, self.kind, code, message);
        }
    }
}

impl Drop for CallEnd {
    fn drop(&mut self) {
        // The body was dropped before its end: the caller went away.
        self.finish(Code::Cancelled, Some("the call ended early"));
    }
}

/// Ends `outcome` with the status in the response's headers (a
/// trailers-only answer) or, failing that, its trailers.
fn watch_body(response: http::Response<Body>, outcome: Arc<CallEnd>) -> http::Response<Body> {
    if let Some(code) = status_in(response.headers()) {
        let message = response
            .headers()
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        outcome.finish(code, message.as_deref());
        return response;
    }
    let (parts, body) = response.into_parts();
    let watched = body.map_frame(move |frame| {
        if let Some(trailers) = frame.trailers_ref() {
            let message = trailers.get("grpc-message").and_then(|v| v.to_str().ok());
            outcome.finish(status_in(trailers).unwrap_or(Code::Unknown), message);
        }
        frame
    });
    http::Response::from_parts(parts, Body::new(watched))
}

impl<S, B> tower::Service<http::Request<B>> for Server<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = split_path(request.uri().path());
        // Anything else on the port (/metrics) is not an RPC.
        let is_rpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        if !is_rpc {
            return Box::pin(self.inner.call(request));
        }
        // A call whose deadline has already passed is not started.
        let expired = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| crate::ejection::grpc_timeout(v.to_str().ok()?))
            .is_some_and(|left| left.is_zero());
        if expired {
            return Box::pin(async {
                Ok(tonic::Status::deadline_exceeded("the call's deadline had passed").into_http())
            });
        }
        let handles = crate::metrics::enabled().then(|| rpc_handles(request.uri().path()));
        // Sampled or not, decided here once; an unsampled call has no span
        // (telemetry/sampling.rs).
        let traced = (tracing_enabled() && !plumbing(service)).then(|| {
            request_span(extract(request.headers()), || {
                rpc_span("server", service, method)
            })
        });
        let span = traced.as_ref().and_then(Traced::span).cloned();
        if let Some(handles) = &handles {
            handles.begin();
        }
        let outcome = Arc::new(CallEnd {
            measured: handles,
            started: Instant::now(),
            span: span.clone(),
            kind: "server",
            done: AtomicBool::new(false),
        });
        let call = self.inner.call(request);
        let call = async move {
            let response = call.await?;
            Ok(watch_body(response, outcome))
        };
        match traced {
            Some(traced) => Box::pin(traced.attach(call)),
            None => Box::pin(call),
        }
    }
}

/// Traces every call through a channel, and sends the trace context along.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientLayer;

impl<S> tower::Layer<S> for ClientLayer {
    type Service = Client<S>;

    fn layer(&self, inner: S) -> Client<S> {
        Client { inner }
    }
}

/// See [`ClientLayer`].
#[derive(Debug, Clone)]
pub struct Client<S> {
    inner: S,
}

impl<S> tower::Service<http::Request<Body>> for Client<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Send,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        if !tracing_enabled() {
            return Box::pin(self.inner.call(request));
        }
        let (service, method) = split_path(request.uri().path());
        if plumbing(service) {
            return Box::pin(self.inner.call(request));
        }
        // Inside a request that is not sampled: no span, only its trace
        // context, sampled flag off, for the next hop.
        if let Some(ids) = unsampled() {
            if let Ok(value) = http::HeaderValue::from_str(&ids.traceparent()) {
                request.headers_mut().insert("traceparent", value);
            }
            return Box::pin(self.inner.call(request));
        }
        let span = rpc_span("client", service, method);
        inject(&span, request.headers_mut());
        let outcome = Arc::new(CallEnd {
            measured: None,
            started: Instant::now(),
            span: Some(span.clone()),
            kind: "client",
            done: AtomicBool::new(false),
        });
        let call = self.inner.call(request);
        let failed = Arc::clone(&outcome);
        Box::pin(
            async move {
                match call.await {
                    Ok(response) => Ok(watch_body(response, outcome)),
                    Err(error) => {
                        failed.finish(Code::Unavailable, Some("the call did not reach a server"));
                        Err(error)
                    }
                }
            }
            .instrument(span),
        )
    }
}
