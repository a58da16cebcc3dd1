//! gRPC, gRPC-Web and Connect on the gateway's own port, beside REST: a
//! request to `/package.Service/Method` is told apart by its content type
//! and goes to the service's balanced backend (or, for health and
//! reflection, to the gateway's own) as plain gRPC.
//!
//! - `application/grpc*`: passed through as it is, any kind of stream.
//! - `application/grpc-web[-text][+proto]`: the same frames over HTTP/1.1
//!   or HTTP/2, the trailers as the body's last frame (base64 for `-text`).
//! - `application/json` and `application/proto` (POST, or GET for methods
//!   marked `NO_SIDE_EFFECTS`): Connect's unary calls, the message bare,
//!   errors as Connect's error JSON with their HTTP status.
//! - `application/connect+json` / `+proto`: Connect's streams, envelopes
//!   and the end-of-stream message.
//!
//! A request message is checked here before it goes anywhere (its
//! envelopes, that it decodes as the method's input); a malformed one is
//! INVALID_ARGUMENT in the protocol's own form. The body types that
//! translate a backend's answer are in [`crate::translate`].

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MethodDescriptor};
use serde_json::json;
use tonic::{Code, Status};
use tower::ServiceExt as _;

use brewmesh_runtime::ejection::grpc_timeout_value;

use crate::auth::Principal;
use crate::compression::{self, Encoding, InflateError};
use crate::envelope::{self, COMPRESSED};
use crate::errors::{GatewayError, http_status, json_response};
use crate::metadata::MAX_METADATA_BYTES;
pub use crate::protocols::Codec;
use crate::protocols::{
    LOCAL, connect_error_json, end_stream, hop_header, metadata_headers, past_deadline,
};
use crate::state::Gateway;
use crate::transcode;
use crate::translate::{Mode, Translated};

/// The headers that name how a protocol's messages are compressed.
const MESSAGE_ENCODING: [&str; 4] = [
    "grpc-encoding",
    "grpc-accept-encoding",
    "connect-content-encoding",
    "connect-accept-encoding",
];

/// What every RPC content type says, for a 415's `Accept-Post`.
const ACCEPTED: &str = "application/grpc, application/grpc-web, application/grpc-web+proto, \
    application/grpc-web-text, application/grpc-web-text+proto, application/json, \
    application/proto, application/connect+json, application/connect+proto";

/// The protocol a request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC over HTTP/2.
    Grpc,
    /// gRPC-Web; `text` is the base64 form.
    GrpcWeb {
        /// `application/grpc-web-text`.
        text: bool,
    },
    /// A Connect unary call (POST, or GET).
    ConnectUnary(Codec),
    /// A Connect stream.
    ConnectStream(Codec),
}

impl Protocol {
    /// The protocol of a request with these method and headers, `None` for
    /// a content type no RPC protocol has.
    pub fn of(method: &Method, headers: &HeaderMap, query: Option<&str>) -> Option<Self> {
        if method == Method::GET {
            let encoding = query_param(query, "encoding");
            return match encoding.as_deref() {
                Some("json") => Some(Protocol::ConnectUnary(Codec::Json)),
                Some("proto") => Some(Protocol::ConnectUnary(Codec::Proto)),
                _ => None,
            };
        }
        let mime = headers
            .get(header::CONTENT_TYPE)?
            .to_str()
            .ok()?
            .split(';')
            .next()?
            .trim()
            .to_ascii_lowercase();
        Some(match mime.as_str() {
            "application/grpc" | "application/grpc+proto" => Protocol::Grpc,
            "application/grpc-web" | "application/grpc-web+proto" => {
                Protocol::GrpcWeb { text: false }
            }
            "application/grpc-web-text" | "application/grpc-web-text+proto" => {
                Protocol::GrpcWeb { text: true }
            }
            "application/json" => Protocol::ConnectUnary(Codec::Json),
            "application/proto" => Protocol::ConnectUnary(Codec::Proto),
            "application/connect+json" => Protocol::ConnectStream(Codec::Json),
            "application/connect+proto" => Protocol::ConnectStream(Codec::Proto),
            _ => return None,
        })
    }

    /// Whether the content type alone says RPC (REST takes JSON too).
    fn unmistakable(headers: &HeaderMap) -> bool {
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                let v = v.trim_start().to_ascii_lowercase();
                v.starts_with("application/grpc") || v.starts_with("application/connect+")
            })
    }

    /// How this protocol answers a failed call.
    pub fn error(self, pool: &DescriptorPool, status: &Status) -> Response {
        match self {
            Protocol::Grpc => grpc_error(status, "application/grpc"),
            Protocol::GrpcWeb { text } => grpc_error(status, grpc_web_type(text)),
            Protocol::ConnectUnary(_) => connect_error(pool, status),
            Protocol::ConnectStream(codec) => {
                let end = end_stream(pool, Some(status), &HeaderMap::new());
                let mut response = Response::new(Body::from(end));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(connect_stream_type(codec)),
                );
                response
            }
        }
    }
}

fn grpc_web_type(text: bool) -> &'static str {
    if text {
        "application/grpc-web-text+proto"
    } else {
        "application/grpc-web+proto"
    }
}

fn connect_stream_type(codec: Codec) -> &'static str {
    match codec {
        Codec::Proto => "application/connect+proto",
        Codec::Json => "application/connect+json",
    }
}

fn connect_unary_type(codec: Codec) -> &'static str {
    match codec {
        Codec::Proto => "application/proto",
        Codec::Json => "application/json",
    }
}

/// `/package.Service/Method` → its two names.
pub fn rpc_path(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    (service.contains('.') && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

/// In front of the router: RPC paths of services the gateway knows (and
/// any path with a gRPC or Connect-stream content type) are answered here,
/// everything else goes on to REST.
pub async fn intercept(
    State(gateway): State<Arc<Gateway>>,
    request: Request,
    next: Next,
) -> Response {
    let Some((service, method)) = rpc_path(request.uri().path()) else {
        return next.run(request).await;
    };
    if !gateway.serves(service) && !Protocol::unmistakable(request.headers()) {
        return next.run(request).await;
    }
    let (service, method) = (service.to_owned(), method.to_owned());
    handle(&gateway, &service, &method, request).await
}

async fn handle(gateway: &Arc<Gateway>, service: &str, method: &str, request: Request) -> Response {
    let Some(protocol) = Protocol::of(request.method(), request.headers(), request.uri().query())
    else {
        return unsupported(request.method(), request.uri().path());
    };
    if request.method() != Method::POST && request.method() != Method::GET {
        return GatewayError::MethodNotAllowed {
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
            allow: "POST".to_owned(),
        }
        .into_response();
    }
    let pool = &gateway.pool;
    let Some(descriptor) = gateway
        .serves(service)
        .then(|| pool.get_service_by_name(service))
        .flatten()
        .and_then(|s| s.methods().find(|m| m.name() == method))
    else {
        let status = Status::unimplemented(format!("unknown method {service}/{method}"));
        return protocol.error(pool, &status);
    };
    // Only Connect's unary calls come as GETs (`Protocol::of`), and only
    // for methods safe to repeat.
    if request.method() == Method::GET && !no_side_effects(&descriptor) {
        return GatewayError::MethodNotAllowed {
            method: Method::GET,
            path: request.uri().path().to_owned(),
            allow: "POST".to_owned(),
        }
        .into_response();
    }
    let arrived = tokio::time::Instant::now();
    let principal = match gateway.auth.check(request.headers(), service, method) {
        Ok(principal) => principal,
        Err(denied) => {
            let mut response = protocol.error(pool, &denied.status());
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, denied.challenge());
            return response;
        }
    };
    let call = call(
        gateway,
        protocol,
        &descriptor,
        service,
        request,
        principal.as_deref(),
        arrived,
    );
    match call.await {
        Ok(response) => response,
        Err(status) => protocol.error(pool, &status),
    }
}

/// A 415 that names what would have been taken.
fn unsupported(method: &Method, path: &str) -> Response {
    let what = if method == Method::GET {
        "a GET of an RPC needs ?encoding=json or ?encoding=proto and ?message=".to_owned()
    } else {
        format!("{path} takes one of {ACCEPTED}")
    };
    let body = json!({"code": Code::InvalidArgument as i32, "message": what, "details": []});
    let mut response = json_response(StatusCode::UNSUPPORTED_MEDIA_TYPE, body.to_string());
    response
        .headers_mut()
        .insert("accept-post", HeaderValue::from_static(ACCEPTED));
    response
}

async fn call(
    gateway: &Arc<Gateway>,
    protocol: Protocol,
    method: &MethodDescriptor,
    service: &str,
    request: Request,
    principal: Option<&Principal>,
    arrived: tokio::time::Instant,
) -> Result<Response, Status> {
    let (parts, body) = request.into_parts();
    let streaming = method.is_client_streaming() || method.is_server_streaming();
    let timeout = match timeout_of(protocol, &parts.headers)? {
        Some(timeout) => timeout,
        None if streaming => gateway.stream_timeout,
        None => gateway.timeout,
    };
    let ends = arrived + timeout;
    let limit = gateway.max_body_bytes;
    let floor = usize::from(gateway.compress_min_bytes);
    let upstream_body = match protocol {
        Protocol::Grpc => tonic::body::Body::new(body),
        Protocol::GrpcWeb { text: false } | Protocol::ConnectStream(Codec::Proto)
            if method.is_client_streaming() =>
        {
            // A client stream goes on as it comes: the envelopes are
            // gRPC's own.
            tonic::body::Body::new(body)
        }
        Protocol::GrpcWeb { text } => {
            let raw = read(body, &parts.headers, limit, gateway.body_timeout).await?;
            let raw = if text { from_base64(&raw)? } else { raw };
            checked_envelopes(method, &raw, &parts.headers, limit, Codec::Proto)?
        }
        Protocol::ConnectStream(codec) => {
            let raw = read(body, &parts.headers, limit, gateway.body_timeout).await?;
            checked_envelopes(method, &raw, &parts.headers, limit, codec)?
        }
        Protocol::ConnectUnary(codec) => {
            // `read` inflates a POST's Content-Encoding.
            let raw = if parts.method == Method::GET {
                get_message(parts.uri.query(), limit)?
            } else {
                read(body, &parts.headers, limit, gateway.body_timeout).await?
            };
            let message = input_message(method, &raw, codec)?;
            tonic::body::Body::new(Full::new(envelope::encode(0, &message)))
        }
    };
    let mut upstream = upstream_request(protocol, &parts, method, upstream_body, ends)?;
    if let Some(principal) = principal {
        principal.pass_on_headers(upstream.headers_mut());
    }
    let answer = tokio::time::timeout_at(ends, forward(gateway, service, upstream))
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("the deadline passed")))?;
    let (pool, plans) = (gateway.pool.clone(), Arc::clone(&gateway.plans));
    Ok(match protocol {
        Protocol::Grpc => answer.map(Body::new),
        Protocol::GrpcWeb { text } => {
            let (mut head, body) = answer.into_parts();
            let h = &mut head.headers;
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(grpc_web_type(text)),
            );
            h.remove(header::CONTENT_LENGTH);
            if let Some(status) = Status::from_header_map(h)
                && let Some(status) = past_deadline(&status, ends)
            {
                // A trailers-only answer, too late.
                return Ok(grpc_error(&status, grpc_web_type(text)));
            }
            let encoding = compression::negotiate(&parts.headers, "grpc-accept-encoding");
            encoding_headers(h, encoding, "grpc-encoding", "grpc-accept-encoding");
            let body = Translated::new(body, Mode::GrpcWeb { text }, limit, ends, pool, plans)
                .compressed(encoding, floor);
            Response::from_parts(head, Body::new(body))
        }
        Protocol::ConnectStream(codec) => {
            let (mut head, body) = answer.into_parts();
            let mode = Mode::Connect {
                codec,
                output: method.output(),
                status: Status::from_header_map(&head.headers),
            };
            let h = &mut head.headers;
            *h = metadata_headers(h, "");
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(connect_stream_type(codec)),
            );
            let encoding = compression::negotiate(&parts.headers, "connect-accept-encoding");
            encoding_headers(
                h,
                encoding,
                "connect-content-encoding",
                "connect-accept-encoding",
            );
            let body =
                Translated::new(body, mode, limit, ends, pool, plans).compressed(encoding, floor);
            Response::from_parts(head, Body::new(body))
        }
        Protocol::ConnectUnary(codec) => {
            connect_unary_answer(gateway, method, codec, answer, limit, ends).await?
        }
    })
}

/// A stream's message encoding headers: the one its messages are
/// compressed with (if any), and the ones this gateway takes.
fn encoding_headers(
    h: &mut HeaderMap,
    encoding: Option<Encoding>,
    used: &'static str,
    accepted: &'static str,
) {
    h.remove(used);
    if let Some(encoding) = encoding {
        h.insert(used, compression::header_value(encoding));
    }
    h.insert(accepted, HeaderValue::from_static(compression::ACCEPTED));
}

/// A Connect unary answer from the backend's gRPC one, read whole.
async fn connect_unary_answer(
    gateway: &Gateway,
    method: &MethodDescriptor,
    codec: Codec,
    answer: http::Response<tonic::body::Body>,
    limit: usize,
    ends: tokio::time::Instant,
) -> Result<Response, Status> {
    let (pool, plans) = (&gateway.pool, &gateway.plans);
    let (head, body) = answer.into_parts();
    if let Some(status) = Status::from_header_map(&head.headers)
        && status.code() != Code::Ok
    {
        let status = past_deadline(&status, ends).unwrap_or(status);
        return Ok(connect_error_with(pool, &status, &head.headers, None));
    }
    let collected = tokio::time::timeout_at(ends, body.collect())
        .await
        .map_err(|_| Status::deadline_exceeded("the deadline passed"))?
        .map_err(|e| Status::unavailable(format!("the backend went away: {e}")))?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status = Status::from_header_map(&trailers)
        .unwrap_or_else(|| Status::internal("the backend's answer has no grpc-status"));
    if status.code() != Code::Ok {
        let status = past_deadline(&status, ends).unwrap_or(status);
        return Ok(connect_error_with(
            pool,
            &status,
            &head.headers,
            Some(&trailers),
        ));
    }
    let data = collected.to_bytes();
    let message = match envelope::decode_all(&data, limit) {
        Ok(envelopes) if envelopes.len() == 1 && envelopes[0].flags & COMPRESSED == 0 => envelopes
            .into_iter()
            .next()
            .map(|e| e.data)
            .unwrap_or_default(),
        Ok(envelopes) => {
            return Err(Status::internal(format!(
                "the backend answered {} messages to a unary call",
                envelopes.len()
            )));
        }
        Err(error) => return Err(Status::internal(format!("the backend's answer: {error}"))),
    };
    let body = match codec {
        Codec::Proto => message,
        Codec::Json => plans
            .json(&method.output(), &message)
            .map(Bytes::from)
            .map_err(|e| Status::internal(format!("decoding the answer: {e}")))?,
    };
    let mut headers = metadata_headers(&head.headers, "");
    headers.extend(metadata_headers(&trailers, "trailer-"));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(connect_unary_type(codec)),
    );
    let mut response = Response::new(Body::from(body));
    *response.headers_mut() = headers;
    Ok(response)
}

/// The backend's call: the gateway's own services, or the balanced
/// channel of `service`.
async fn forward(
    gateway: &Gateway,
    service: &str,
    request: http::Request<tonic::body::Body>,
) -> Result<http::Response<tonic::body::Body>, Status> {
    if LOCAL.contains(&service) {
        let Ok(response) = gateway.local.clone().oneshot(request).await;
        return Ok(response);
    }
    let Some(upstream) = gateway.known_upstream(service).await else {
        return Err(Status::unavailable(
            GatewayError::NoInstance(service.to_owned()).message(),
        ));
    };
    upstream
        .clone()
        .oneshot(request)
        .await
        .map_err(|e| Status::unavailable(format!("backend unavailable: {e}")))
}

/// The backend's request: gRPC, the client's metadata, what is left of
/// the deadline as `grpc-timeout`.
fn upstream_request(
    protocol: Protocol,
    parts: &http::request::Parts,
    method: &MethodDescriptor,
    body: tonic::body::Body,
    ends: tokio::time::Instant,
) -> Result<http::Request<tonic::body::Body>, Status> {
    let path = format!("/{}/{}", method.parent_service().full_name(), method.name());
    let mut request = http::Request::new(body);
    *request.method_mut() = Method::POST;
    *request.uri_mut() = path
        .parse()
        .map_err(|_| Status::invalid_argument("the method's path is not a URI"))?;
    let headers = request.headers_mut();
    let mut size = 0;
    for (name, value) in &parts.headers {
        // The messages go upstream uncompressed, whatever this client's
        // protocol did with them.
        let encoding = protocol != Protocol::Grpc && MESSAGE_ENCODING.contains(&name.as_str());
        // Who the caller is, the gateway says ([`crate::auth`]), never the
        // client.
        if hop_header(name) || encoding || brewmesh_runtime::caller::reserved(name.as_str()) {
            continue;
        }
        size += name.as_str().len() + value.len();
        headers.append(name.clone(), value.clone());
    }
    if size > MAX_METADATA_BYTES {
        return Err(Status::resource_exhausted(format!(
            "the request's headers carry {size} bytes of metadata; at most {MAX_METADATA_BYTES} are passed on"
        )));
    }
    let content_type = match protocol {
        Protocol::Grpc => parts
            .headers
            .get(header::CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("application/grpc")),
        _ => HeaderValue::from_static("application/grpc"),
    };
    headers.insert(header::CONTENT_TYPE, content_type);
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    let left = ends.saturating_duration_since(tokio::time::Instant::now());
    if left.is_zero() {
        return Err(Status::deadline_exceeded("the deadline passed"));
    }
    headers.insert("grpc-timeout", grpc_timeout_value(left));
    Ok(request)
}

/// The client's deadline: `grpc-timeout`, or Connect's
/// `connect-timeout-ms`.
fn timeout_of(protocol: Protocol, headers: &HeaderMap) -> Result<Option<Duration>, Status> {
    match protocol {
        Protocol::ConnectUnary(_) | Protocol::ConnectStream(_) => {
            let Some(value) = headers.get("connect-timeout-ms") else {
                return Ok(None);
            };
            value
                .to_str()
                .ok()
                .filter(|v| !v.is_empty() && v.len() <= 10)
                .and_then(|v| v.parse::<u64>().ok())
                .map(|ms| Some(Duration::from_millis(ms)))
                .ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "Connect-Timeout-Ms {value:?}: expected 1 to 10 digits"
                    ))
                })
        }
        Protocol::Grpc | Protocol::GrpcWeb { .. } => {
            crate::metadata::deadline(headers).map_err(Status::invalid_argument)
        }
    }
}

/// Whether the proto marks `method` `idempotency_level = NO_SIDE_EFFECTS`.
pub fn no_side_effects(method: &MethodDescriptor) -> bool {
    use prost_types::method_options::IdempotencyLevel;
    method
        .method_descriptor_proto()
        .options
        .as_ref()
        .is_some_and(|o| o.idempotency_level() == IdempotencyLevel::NoSideEffects)
}

async fn read(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    patience: Duration,
) -> Result<Bytes, Status> {
    crate::proxy::read_body(body, headers, limit, patience)
        .await
        .map_err(|error| match &error {
            GatewayError::SlowBody { .. } => Status::deadline_exceeded(error.message()),
            GatewayError::TooLarge { limit } => {
                Status::resource_exhausted(format!("the request body is larger than {limit} bytes"))
            }
            GatewayError::UnsupportedEncoding(_) => Status::unimplemented(error.message()),
            other => Status::invalid_argument(other.message()),
        })
}

/// gRPC-Web-text's body: base64, possibly several padded pieces one after
/// the other.
fn from_base64(text: &[u8]) -> Result<Bytes, Status> {
    let clean: Vec<u8> = text
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if !clean.len().is_multiple_of(4) {
        return Err(Status::invalid_argument(
            "the grpc-web-text body is not base64 (its length is not a multiple of 4)",
        ));
    }
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    // Each padded piece ends a decodable run.
    let mut start = 0;
    for (i, quad) in clean.chunks(4).enumerate() {
        let end = (i + 1) * 4;
        if quad.contains(&b'=') || end == clean.len() {
            base64::engine::general_purpose::STANDARD
                .decode_vec(&clean[start..end], &mut out)
                .map_err(|e| {
                    Status::invalid_argument(format!("the grpc-web-text body is not base64: {e}"))
                })?;
            start = end;
        }
    }
    Ok(Bytes::from(out))
}

/// The request's envelopes, checked: one message for a method that takes
/// one, each decoding as its input (and turned from JSON into protobuf for
/// Connect's JSON); the body for the backend.
fn checked_envelopes(
    method: &MethodDescriptor,
    raw: &[u8],
    headers: &HeaderMap,
    limit: usize,
    codec: Codec,
) -> Result<tonic::body::Body, Status> {
    let envelopes = envelope::decode_all(raw, limit).map_err(|e| match e {
        envelope::EnvelopeError::TooLarge { .. } => Status::resource_exhausted(e.to_string()),
        _ => Status::invalid_argument(format!("malformed request: {e}")),
    })?;
    if !method.is_client_streaming() && envelopes.len() != 1 {
        return Err(Status::invalid_argument(format!(
            "{} takes one request message; the body has {}",
            method.full_name(),
            envelopes.len()
        )));
    }
    let encoding = message_encoding(headers)?;
    // What every message inflates to, together, stays under the limit.
    let mut budget = limit;
    let mut out = Vec::with_capacity(raw.len());
    for e in envelopes {
        if e.flags & !COMPRESSED != 0 {
            return Err(Status::invalid_argument(format!(
                "malformed request: unknown envelope flags {:#04x}",
                e.flags
            )));
        }
        let data = if e.flags & COMPRESSED == 0 {
            e.data
        } else {
            let Some(encoding) = encoding else {
                return Err(Status::invalid_argument(
                    "malformed request: a compressed message without a message encoding header",
                ));
            };
            inflate(encoding, &e.data, budget)?
        };
        budget = budget.saturating_sub(data.len());
        let message = input_message(method, &data, codec)?;
        out.extend_from_slice(&envelope::encode(0, &message));
    }
    Ok(tonic::body::Body::new(Full::new(Bytes::from(out))))
}

/// The messages' encoding, from `grpc-encoding` (gRPC-Web) or
/// `connect-content-encoding` (Connect streams); UNIMPLEMENTED for one not
/// known here, as gRPC says.
fn message_encoding(headers: &HeaderMap) -> Result<Option<Encoding>, Status> {
    let Some(value) = headers
        .get("grpc-encoding")
        .or_else(|| headers.get("connect-content-encoding"))
    else {
        return Ok(None);
    };
    Encoding::parse(&String::from_utf8_lossy(value.as_bytes())).map_err(|name| {
        Status::unimplemented(format!(
            "message encoding {name:?} is not supported; use {}",
            compression::ACCEPTED
        ))
    })
}

/// A compressed message inflated, at most `limit` bytes.
fn inflate(encoding: Encoding, data: &[u8], limit: usize) -> Result<Bytes, Status> {
    encoding.decompress(data, limit).map_err(|e| match e {
        InflateError::TooLarge { .. } => Status::resource_exhausted(e.to_string()),
        InflateError::Corrupt { .. } => Status::invalid_argument(format!("malformed request: {e}")),
    })
}

/// The request message as protobuf, checked against the method's input;
/// a message that does not fit is INVALID_ARGUMENT with a BadRequest.
fn input_message(method: &MethodDescriptor, raw: &[u8], codec: Codec) -> Result<Bytes, Status> {
    match codec {
        Codec::Json => {
            let blank = raw.iter().all(u8::is_ascii_whitespace);
            let message = if blank {
                DynamicMessage::new(method.input())
            } else {
                transcode::from_json(method.input(), raw)
                    .map_err(|v| bad_request(&v.field, &v.description))?
            };
            Ok(Bytes::from(message.encode_to_vec()))
        }
        Codec::Proto => {
            DynamicMessage::decode(method.input(), raw).map_err(|e| {
                bad_request(
                    "body",
                    &format!("not a {} message: {e}", method.input().full_name()),
                )
            })?;
            Ok(Bytes::copy_from_slice(raw))
        }
    }
}

/// INVALID_ARGUMENT with a `google.rpc.BadRequest` naming `field`.
fn bad_request(field: &str, description: &str) -> Status {
    use tonic_types::{ErrorDetails, StatusExt as _};
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {description}"),
        ErrorDetails::with_bad_request_violation(field, description),
    )
}

/// A query parameter, decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// A Connect GET's message: `?message=`, base64url when `base64=1`.
fn get_message(query: Option<&str>, limit: usize) -> Result<Bytes, Status> {
    let encoding = Encoding::parse(&query_param(query, "compression").unwrap_or_default())
        .map_err(|name| {
            Status::unimplemented(format!(
                "compression {name:?} is not supported; use {}",
                compression::ACCEPTED
            ))
        })?;
    let raw = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("message="))
        .unwrap_or_default();
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
    let message = if query_param(query, "base64").as_deref() == Some("1") {
        let text: Vec<u8> = bytes.into_iter().filter(|b| *b != b'=').collect();
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&text)
            .map(Bytes::from)
            .map_err(|e| Status::invalid_argument(format!("?message= is not base64url: {e}")))?
    } else {
        Bytes::from(bytes)
    };
    match encoding {
        Some(encoding) => inflate(encoding, &message, limit),
        None => Ok(message),
    }
}

/// A trailers-only gRPC answer.
fn grpc_error(status: &Status, content_type: &'static str) -> Response {
    let mut response: http::Response<Body> = status.clone().into_http();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A Connect unary error.
pub fn connect_error(pool: &DescriptorPool, status: &Status) -> Response {
    connect_error_with(pool, status, &HeaderMap::new(), None)
}

fn connect_error_with(
    pool: &DescriptorPool,
    status: &Status,
    headers: &HeaderMap,
    trailers: Option<&HeaderMap>,
) -> Response {
    let body = connect_error_json(pool, status).to_string();
    let mut response = json_response(http_status(status.code()), body);
    let h = response.headers_mut();
    h.extend(metadata_headers(headers, ""));
    if let Some(trailers) = trailers {
        h.extend(metadata_headers(trailers, "trailer-"));
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_paths_are_two_names_the_first_with_a_package() {
        assert_eq!(
            rpc_path("/brewmesh.barista.v1.Barista/GetMenu"),
            Some(("brewmesh.barista.v1.Barista", "GetMenu"))
        );
        assert_eq!(rpc_path("/v1/orders"), None);
        assert_eq!(rpc_path("/a.B/"), None);
        assert_eq!(rpc_path("/a.B/c/d"), None);
    }

    #[test]
    fn content_types_name_their_protocol() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            Protocol::of(&Method::POST, &h, None)
        };
        assert_eq!(with("application/grpc"), Some(Protocol::Grpc));
        assert_eq!(
            with("application/grpc-web-text+proto"),
            Some(Protocol::GrpcWeb { text: true })
        );
        assert_eq!(
            with("application/json; charset=utf-8"),
            Some(Protocol::ConnectUnary(Codec::Json))
        );
        assert_eq!(
            with("application/connect+proto"),
            Some(Protocol::ConnectStream(Codec::Proto))
        );
        assert_eq!(with("text/plain"), None);
        assert_eq!(
            Protocol::of(
                &Method::GET,
                &HeaderMap::new(),
                Some("encoding=json&message=%7B%7D")
            ),
            Some(Protocol::ConnectUnary(Codec::Json))
        );
    }

    #[test]
    fn grpc_web_text_takes_concatenated_padded_pieces() {
        let one = base64::engine::general_purpose::STANDARD.encode(b"ab");
        let two = base64::engine::general_purpose::STANDARD.encode(b"cde");
        let joined = format!("{one}{two}");
        assert_eq!(&from_base64(joined.as_bytes()).unwrap()[..], b"abcde");
        assert!(from_base64(b"abc").is_err());
        assert!(from_base64(b"a===").is_err());
    }

    #[test]
    fn get_messages_are_plain_or_base64url() {
        assert_eq!(
            &get_message(Some("encoding=json&message=%7B%7D"), 100).unwrap()[..],
            b"{}"
        );
        assert_eq!(
            &get_message(Some("encoding=proto&base64=1&message=CgFh"), 100).unwrap()[..],
            b"\n\x01a"
        );
        // Compressed, then base64url, as connect-web sends it.
        let gzipped = Encoding::Gzip.compress(b"{}");
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&gzipped);
        let query = format!("encoding=json&compression=gzip&base64=1&message={text}");
        assert_eq!(&get_message(Some(&query), 100).unwrap()[..], b"{}");
        assert!(get_message(Some("encoding=json&compression=gzip&message=x"), 100).is_err());
        let refused = get_message(Some("encoding=json&compression=br&message=x"), 100);
        assert_eq!(refused.unwrap_err().code(), Code::Unimplemented);
    }
}
