//! The request path: find the route, build the request message, call the
//! backend with the client's metadata and deadline, answer in JSON — a
//! document, newline-delimited JSON or Server-Sent Events.

use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};

use crate::cache::none_match;
use crate::codec::RawCodec;
use crate::compression::{Encoding, InflateError};
use crate::errors::{GatewayError, json_response};
use crate::metadata::{Unforwardable, add_metadata, deadline, forward_headers};
use crate::protocols::past_deadline;
use crate::routes::{BodyRule, Matched, Route};
use crate::state::Gateway;
use crate::streaming::{accepts_event_stream, stream_response};
use crate::transcode;

/// The REST routes, behind [`crate::observe::layer`], which found the
/// route.
pub async fn handle(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let Some(matched) = parts.extensions.remove::<Matched>() else {
        return gateway
            .no_route(&parts.method, parts.uri.path())
            .into_response();
    };
    respond(&gateway, &parts, body, matched)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn respond(
    gateway: &Arc<Gateway>,
    parts: &http::request::Parts,
    body: Body,
    Matched { route, bindings }: Matched,
) -> Result<Response, GatewayError> {
    let route = &*route;
    // The deadline runs from the request's arrival: what reading the body
    // and finding an instance took is not the backend's to spend.
    let arrived = tokio::time::Instant::now();
    let has_body = !matches!(route.body, BodyRule::None);
    if has_body && !json_content(&parts.headers) {
        return Err(GatewayError::NotJson);
    }
    // Before the body is read: a client not let in costs no more.
    let principal = gateway
        .auth
        .check(&parts.headers, &route.rpc.service, route.rpc.method.name())
        .map_err(GatewayError::Denied)?;
    let body = read_body(
        body,
        &parts.headers,
        gateway.max_body_bytes,
        gateway.body_timeout,
    )
    .await?;
    let message = transcode::request(route, &bindings, parts.uri.query(), &body)
        .map_err(GatewayError::BadRequest)?;

    // Cached: safe GETs only, and never a caller's personal answer (a
    // route open to anyone, when tokens are checked, has none).
    let public = gateway.auth.on() && principal.is_none();
    let cache_key = (route.method == Method::GET
        && route.rpc.cache_ttl.is_some()
        && (public || !parts.headers.contains_key(header::AUTHORIZATION)))
    .then(|| parts.uri.to_string());
    if let Some(key) = &cache_key
        && let Some(entry) = gateway.cache.get(key).await
    {
        return Ok(cached(&parts.headers, &entry, "HIT"));
    }

    let Some(upstream) = gateway.known_upstream(&route.rpc.service).await else {
        return Err(GatewayError::NoInstance(route.rpc.service.clone()));
    };
    let mut grpc = tonic::client::Grpc::new(upstream.clone());
    let streaming = route.rpc.method.is_server_streaming();
    let mut call = tonic::Request::new(message);
    forward_headers(&parts.headers, call.metadata_mut()).map_err(|e| match e {
        Unforwardable::NotBase64(reason) => GatewayError::Invalid(reason),
        Unforwardable::TooLarge(size) => GatewayError::HeadersTooLarge { size },
    })?;
    if let Some(principal) = &principal {
        principal.pass_on(call.metadata_mut());
    }
    let timeout = match deadline(&parts.headers).map_err(GatewayError::Invalid)? {
        Some(timeout) => timeout,
        None if streaming => gateway.stream_timeout,
        None => gateway.timeout,
    };
    // Upstream as grpc-timeout, less the time spent here so far; enforced
    // here too, for the time spent waiting for a backend that never
    // answers, and on a stream's body.
    let ends = arrived + timeout;
    let timeout = ends.saturating_duration_since(tokio::time::Instant::now());
    call.set_timeout(timeout);
    let path = route.rpc.path.clone();
    let sse = accepts_event_stream(&parts.headers);
    let exchange = async {
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("backend unavailable: {e}")))?;
        if streaming {
            grpc.server_streaming(call, path, RawCodec)
                .await
                .map(|r| stream_response(gateway, route, r, sse, ends))
        } else {
            let response = grpc.unary(call, path, RawCodec).await?;
            unary_response(gateway, route, &parts.headers, cache_key, response).await
        }
    };
    let outcome = tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("the deadline passed")))
        .map_err(|status| past_deadline(&status, ends).unwrap_or(status));
    outcome.map_err(|status| GatewayError::upstream(&gateway.pool, status))
}

async fn unary_response(
    gateway: &Gateway,
    route: &Route,
    headers: &HeaderMap,
    cache_key: Option<String>,
    response: tonic::Response<Bytes>,
) -> Result<Response, tonic::Status> {
    let (metadata, bytes, _) = response.into_parts();
    let json = Bytes::from(gateway.plans.answer(route, &bytes)?);
    if let (Some(key), Some(ttl)) = (cache_key, route.rpc.cache_ttl) {
        let entry = gateway.cache.put(key, json, ttl).await;
        let mut answer = cached(headers, &entry, "MISS");
        add_metadata(answer.headers_mut(), &metadata);
        return Ok(answer);
    }
    let status = if route.rpc.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut answer = json_response(status, json);
    add_metadata(answer.headers_mut(), &metadata);
    Ok(answer)
}

fn json_content(headers: &HeaderMap) -> bool {
    match headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        None => true,
        Some(value) => {
            let mime = value.split(';').next().unwrap_or_default().trim();
            // Not text/plain or a form, which grpc-gateway reads as JSON
            // too: a page on any origin may send those without a CORS
            // preflight, so reading them would let it place an order
            // behind the allow-list's back.
            mime.eq_ignore_ascii_case("application/json")
                || mime.to_ascii_lowercase().ends_with("+json")
        }
    }
}

/// The request's body, at most `limit` bytes, inflated as its
/// `Content-Encoding` says (to at most `limit` bytes too), arrived whole
/// within `patience`.
pub(crate) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    patience: std::time::Duration,
) -> Result<Bytes, GatewayError> {
    let too_large = || GatewayError::TooLarge { limit };
    let encoding = match headers.get(header::CONTENT_ENCODING) {
        None => None,
        Some(value) => Encoding::parse(&String::from_utf8_lossy(value.as_bytes()))
            .map_err(GatewayError::UnsupportedEncoding)?,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    // A body already here (the common case) needs no timer.
    let mut collecting = std::pin::pin!(Limited::new(body, limit).collect());
    let first = std::future::poll_fn(|cx| Poll::Ready(collecting.as_mut().poll(cx))).await;
    let collected = match first {
        Poll::Ready(collected) => collected,
        Poll::Pending => tokio::time::timeout(patience, collecting)
            .await
            .map_err(|_| GatewayError::SlowBody { patience })?,
    };
    let raw = match collected {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
        Err(error) => return Err(GatewayError::Invalid(format!("reading the body: {error}"))),
    };
    let Some(encoding) = encoding else {
        return Ok(raw);
    };
    // What it inflates to is bounded by the same limit.
    encoding
        .decompress(&raw, limit)
        .map_err(|error| match error {
            InflateError::TooLarge { .. } => too_large(),
            InflateError::Corrupt { .. } => GatewayError::Invalid(error.to_string()),
        })
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
        json_response(StatusCode::OK, entry.body.clone())
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
