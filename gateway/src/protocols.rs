//! What gRPC, gRPC-Web and Connect share on the gateway's side: the
//! message codecs, which headers are the call's metadata, and Connect's
//! error JSON and end-of-stream message. [`crate::rpc`] serves the
//! protocols, [`crate::translate`] turns answers into them.

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderName};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::json;
use tonic::{Code, Status};

use crate::envelope::{self, END_STREAM};
use crate::transcode::ProtoJson;

/// The services the gateway answers itself.
pub const LOCAL: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// How a message is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Protobuf's binary form.
    Proto,
    /// The proto3 JSON mapping.
    Json,
}

/// Headers that describe this hop or this protocol, not the call.
pub(crate) fn hop_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    matches!(
        name,
        "host"
            | "connection"
            | "keep-alive"
            | "upgrade"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "content-length"
            | "content-type"
            | "content-encoding"
            | "accept"
            | "accept-encoding"
            | "accept-language"
            | "origin"
            | "referer"
            | "cookie"
            | "user-agent"
            | "x-grpc-web"
            | "x-user-agent"
            | "grpc-timeout"
            | "priority"
    ) || name.starts_with("connect-")
        || name.starts_with("sec-")
        || name.starts_with("access-control-")
        || name.starts_with("proxy-")
}

/// Headers of the backend that are the call's metadata, under `prefix`.
pub(crate) fn metadata_headers(from: &HeaderMap, prefix: &str) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in from {
        let n = name.as_str();
        if n.starts_with("grpc-") || hop_header(name) || n == "date" {
            continue;
        }
        if prefix.is_empty() {
            out.append(name.clone(), value.clone());
        } else if let Ok(prefixed) = HeaderName::from_bytes(format!("{prefix}{n}").as_bytes()) {
            out.append(prefixed, value.clone());
        }
    }
    out
}

/// Connect's name for a code.
pub fn connect_code(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "canceled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// Connect's error JSON: code, message, and each detail with its type,
/// its bytes (base64) and, when the type is known, its JSON as `debug`.
pub fn connect_error_json(pool: &DescriptorPool, status: &Status) -> serde_json::Value {
    let details: Vec<serde_json::Value> = tonic_types::Status::decode(status.details())
        .map(|s| s.details)
        .unwrap_or_default()
        .into_iter()
        .map(|any| {
            let name = any
                .type_url
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned();
            let mut detail = json!({
                "type": name,
                "value": base64::engine::general_purpose::STANDARD_NO_PAD.encode(&any.value),
            });
            if let Some(descriptor) = pool.get_message_by_name(&name)
                && let Ok(message) = DynamicMessage::decode(descriptor, any.value.as_slice())
                && let Ok(debug) = serde_json::to_value(ProtoJson(&message))
            {
                detail["debug"] = debug;
            }
            detail
        })
        .collect();
    let mut error = json!({"code": connect_code(status.code())});
    if !status.message().is_empty() {
        error["message"] = json!(status.message());
    }
    if !details.is_empty() {
        error["details"] = json!(details);
    }
    error
}

/// Connect's end-of-stream envelope: the error unless `status` is OK, and
/// the trailers' metadata.
pub fn end_stream(pool: &DescriptorPool, status: Option<&Status>, trailers: &HeaderMap) -> Bytes {
    let mut metadata = serde_json::Map::new();
    for (name, value) in &metadata_headers(trailers, "") {
        let entry = metadata
            .entry(name.as_str().to_owned())
            .or_insert_with(|| json!([]));
        if let (Some(list), Ok(value)) = (entry.as_array_mut(), value.to_str()) {
            list.push(json!(value));
        }
    }
    let mut end = json!({});
    if !metadata.is_empty() {
        end["metadata"] = serde_json::Value::Object(metadata);
    }
    if let Some(status) = status
        && status.code() != Code::Ok
    {
        end["error"] = connect_error_json(pool, status);
    }
    envelope::encode(END_STREAM, end.to_string().as_bytes())
}

/// A backend's status, as the client should read it: tonic servers end a
/// call whose `grpc-timeout` passed with CANCELLED, which past the
/// client's deadline is DEADLINE_EXCEEDED (as grpc-go says it). `None`
/// when `status` stands.
pub fn past_deadline(status: &Status, ends: tokio::time::Instant) -> Option<Status> {
    (status.code() == Code::Cancelled && tokio::time::Instant::now() >= ends)
        .then(|| Status::deadline_exceeded(format!("the deadline passed ({})", status.message())))
}
