//! The request path: find the route, build the request message, call the
//! backend with the client's metadata and deadline, answer in JSON — a
//! document, newline-delimited JSON or Server-Sent Events.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use prost_reflect::DynamicMessage;
use tonic::Code;

use brewmesh_runtime::telemetry::tracing_enabled;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::cache::none_match;
use crate::codec::DynamicCodec;
use crate::errors::{bad_request, gateway_error, http_status, status_json, status_response};
use crate::metadata::{add_metadata, deadline, forward_headers};
use crate::observe::{HttpLabels, HttpStatusLabels};
use crate::routes::{BodyRule, Route};
use crate::state::Gateway;
use crate::streaming::{accepts_event_stream, stream_response};
use crate::transcode;

/// The REST routes: each request in an HTTP server span (continuing the
/// client's trace context) and counted by route and status.
pub async fn handle(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    let found = find(&gateway, &parts.method, path);
    let route_name = found
        .as_ref()
        .map_or("unmatched", |(route, _)| route.template.source());
    let labels = HttpLabels {
        method: parts.method.as_str().to_owned(),
        route: route_name.to_owned(),
    };
    let metrics = crate::observe::http();
    metrics.in_flight.get_or_create(&labels).inc();
    let started = Instant::now();
    let span = tracing_enabled().then(|| {
        // Attributes as fields at creation: one trip through the subscriber.
        let span = tracing::info_span!(
            target: "brewmesh_gateway::http",
            "http",
            otel.name = %format!("{} {route_name}", parts.method),
            otel.kind = "server",
            http.request.method = parts.method.as_str(),
            http.route = route_name,
            url.path = path,
            url.scheme = "http",
            http.response.status_code = tracing::field::Empty,
        );
        let _ = span.set_parent(brewmesh_runtime::telemetry::extract(&parts.headers));
        span
    });
    let answer = respond(&gateway, &parts, body, found);
    let response = match &span {
        Some(span) => answer.instrument(span.clone()).await,
        None => answer.await,
    };
    let status = response.status();
    let elapsed = started.elapsed();
    metrics.in_flight.get_or_create(&labels).dec();
    metrics
        .duration
        .get_or_create(&labels)
        .observe(elapsed.as_secs_f64());
    metrics
        .requests
        .get_or_create(&HttpStatusLabels {
            method: labels.method,
            route: labels.route,
            status: status.as_u16(),
        })
        .inc();
    let access = || {
        tracing::debug!(
            target: "brewmesh_gateway::access",
            method = %parts.method,
            path,
            status = status.as_u16(),
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    };
    match &span {
        Some(span) => {
            span.record("http.response.status_code", i64::from(status.as_u16()));
            if status.is_server_error() {
                brewmesh_runtime::telemetry::fail(span, status.as_str());
            }
            // In the span: the line carries the trace id.
            span.in_scope(access);
        }
        None => access(),
    }
    response
}

async fn respond(
    gateway: &Arc<Gateway>,
    parts: &http::request::Parts,
    body: Body,
    found: Option<(&Route, Vec<(&str, String)>)>,
) -> Response {
    let path = parts.uri.path();
    let Some((route, bindings)) = found else {
        return no_route(gateway, &parts.method, path);
    };

    let has_body = !matches!(route.body, BodyRule::None);
    if has_body && !json_content(&parts.headers) {
        return gateway_error(
            Code::InvalidArgument,
            "the body must be JSON (Content-Type: application/json)",
        )
        .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
    let body = match read_body(body, &parts.headers, gateway.max_body_bytes).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let message = match transcode::request(route, bindings, parts.uri.query(), &body) {
        Ok(message) => message,
        Err(violations) => return bad_request(&violations),
    };

    // Cached: safe GETs only, and never a caller's personal answer.
    let cache_key = (route.method == Method::GET
        && route.rpc.cache_ttl.is_some()
        && !parts.headers.contains_key(header::AUTHORIZATION))
    .then(|| parts.uri.to_string());
    if let Some(key) = &cache_key
        && let Some(entry) = gateway.cache.get(key).await
    {
        return cached(&parts.headers, &entry, "HIT");
    }

    let Some(upstream) = gateway.upstreams.get(&route.rpc.service) else {
        return gateway_error(
            Code::Unavailable,
            format!("no backend for {}", route.rpc.service),
        );
    };
    let mut grpc = tonic::client::Grpc::new(upstream.clone());
    let streaming = route.rpc.method.is_server_streaming();
    let mut call = tonic::Request::new(message);
    if let Err(message) = forward_headers(&parts.headers, call.metadata_mut()) {
        return gateway_error(Code::InvalidArgument, message);
    }
    let timeout = match deadline(&parts.headers) {
        Ok(Some(timeout)) => Some(timeout),
        // Streams (WatchOrder) last as long as the client wants.
        Ok(None) if !streaming => Some(gateway.timeout),
        Ok(None) => None,
        Err(message) => return gateway_error(Code::InvalidArgument, message),
    };
    if let Some(timeout) = timeout {
        // Upstream as grpc-timeout; enforced here too, for the time spent
        // waiting for a backend that never answers.
        call.set_timeout(timeout);
    }
    let codec = DynamicCodec::new(route.rpc.method.output());
    let path = route.rpc.path.clone();
    let sse = accepts_event_stream(&parts.headers);
    let exchange = async {
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("backend unavailable: {e}")))?;
        if streaming {
            grpc.server_streaming(call, path, codec)
                .await
                .map(|r| stream_response(gateway, route, r, sse))
        } else {
            let response = grpc.unary(call, path, codec).await?;
            Ok(unary_response(gateway, route, &parts.headers, cache_key, response).await)
        }
    };
    let started = Instant::now();
    let outcome = match timeout {
        Some(timeout) => tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("the deadline passed")))
            .map_err(|status| {
                // tonic servers end an expired call with CANCELLED; past
                // the client's deadline that is a deadline, as in grpc-go.
                if status.code() == Code::Cancelled && started.elapsed() >= timeout {
                    tonic::Status::deadline_exceeded(status.message())
                } else {
                    status
                }
            }),
        None => exchange.await,
    };
    outcome.unwrap_or_else(|status| error_response(gateway, &status))
}

async fn unary_response(
    gateway: &Gateway,
    route: &Route,
    headers: &HeaderMap,
    cache_key: Option<String>,
    response: tonic::Response<DynamicMessage>,
) -> Response {
    let (metadata, message, _) = response.into_parts();
    let json = Bytes::from(transcode::response_json(route, &message));
    if let (Some(key), Some(ttl)) = (cache_key, route.rpc.cache_ttl) {
        let entry = gateway.cache.put(key, json, ttl).await;
        let mut answer = cached(headers, &entry, "MISS");
        add_metadata(answer.headers_mut(), &metadata);
        return answer;
    }
    let status = if route.rpc.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut answer = (status, json).into_response();
    answer.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    add_metadata(answer.headers_mut(), &metadata);
    answer
}

/// The first route of `method` whose template matches `path`.
fn find<'g>(
    gateway: &'g Gateway,
    method: &Method,
    path: &str,
) -> Option<(&'g Route, Vec<(&'g str, String)>)> {
    // HEAD is GET without the body (hyper leaves the body out).
    let method = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    gateway
        .routes
        .get(method)?
        .iter()
        .find_map(|route| route.template.matches(path).map(|bound| (route, bound)))
}

/// 405 with `Allow` when the path exists under other methods, else 404.
fn no_route(gateway: &Gateway, method: &Method, path: &str) -> Response {
    let mut allowed: Vec<&str> = gateway
        .routes
        .iter()
        .filter(|(_, routes)| routes.iter().any(|r| r.template.matches(path).is_some()))
        .map(|(m, _)| m.as_str())
        .collect();
    if allowed.is_empty() {
        return gateway_error(Code::NotFound, format!("no route for {method} {path}"));
    }
    allowed.sort_unstable();
    let allow = allowed.join(", ");
    let mut response = gateway_error(
        Code::Unimplemented,
        format!("{method} is not allowed on {path}; allowed: {allow}"),
    )
    .with_status(StatusCode::METHOD_NOT_ALLOWED);
    if let Ok(value) = HeaderValue::from_str(&allow) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}

trait WithStatus {
    fn with_status(self, status: StatusCode) -> Self;
}

impl WithStatus for Response {
    fn with_status(mut self, status: StatusCode) -> Self {
        *self.status_mut() = status;
        self
    }
}

fn json_content(headers: &HeaderMap) -> bool {
    match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        None => true,
        Some(value) => {
            let mime = value.split(';').next().unwrap_or_default().trim();
            // `curl -d` without `-H` says form encoding, and grpc-gateway
            // reads that as JSON too; other types are refused.
            [
                "application/json",
                "application/x-www-form-urlencoded",
                "text/plain",
            ]
            .iter()
            .any(|m| mime.eq_ignore_ascii_case(m))
                || mime.ends_with("+json")
        }
    }
}

async fn read_body(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, Response> {
    let too_large = || {
        gateway_error(
            Code::InvalidArgument,
            format!("the body is larger than {limit} bytes"),
        )
        .with_status(StatusCode::PAYLOAD_TOO_LARGE)
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(error) => Err(gateway_error(
            Code::InvalidArgument,
            format!("reading the body: {error}"),
        )),
    }
}

fn error_response(gateway: &Gateway, status: &tonic::Status) -> Response {
    let mut response = status_response(
        http_status(status.code()),
        &status_json(&gateway.pool, status),
    );
    add_metadata(response.headers_mut(), status.metadata());
    if status.code() == Code::Unauthenticated {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// A cached answer, or 304 when the client has it already.
fn cached(headers: &HeaderMap, entry: &crate::cache::Entry, how: &'static str) -> Response {
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| none_match(v, &entry.etag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = (StatusCode::OK, entry.body.clone()).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    };
    let h = response.headers_mut();
    if let Ok(etag) = HeaderValue::from_str(&entry.etag) {
        h.insert(header::ETAG, etag);
    }
    if let Ok(control) =
        HeaderValue::from_str(&format!("max-age={}", entry.max_age(Instant::now())))
    {
        h.insert(header::CACHE_CONTROL, control);
    }
    h.insert("x-cache", HeaderValue::from_static(how));
    response
}
