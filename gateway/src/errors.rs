//! gRPC statuses as HTTP answers: the status code grpc-gateway maps each
//! gRPC code to, and a JSON `google.rpc.Status` body with its details.

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::json;
use tonic::Code;

use crate::transcode::{ProtoJson, Violation};

/// The HTTP status for a gRPC code, as grpc-gateway's `HTTPStatusFromCode`.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The JSON `google.rpc.Status` of an upstream status, with the details
/// the upstream sent (as JSON when their types are in `pool`).
pub fn status_json(pool: &DescriptorPool, status: &tonic::Status) -> serde_json::Value {
    let plain = || {
        json!({
            "code": status.code() as i32,
            "message": status.message(),
            "details": [],
        })
    };
    if status.details().is_empty() {
        return plain();
    }
    let Some(descriptor) = pool.get_message_by_name("google.rpc.Status") else {
        return plain();
    };
    let Ok(decoded) = DynamicMessage::decode(descriptor, status.details()) else {
        return plain();
    };
    // Fails when a detail's type is not in the pool: keep code and message.
    match serde_json::to_value(ProtoJson(&decoded)) {
        Ok(mut value) => {
            value["code"] = json!(status.code() as i32);
            value["message"] = json!(status.message());
            if value.get("details").is_none() {
                value["details"] = json!([]);
            }
            value
        }
        Err(_) => plain(),
    }
}

/// An HTTP answer with a JSON `google.rpc.Status` body.
pub fn status_response(http: StatusCode, body: &serde_json::Value) -> Response {
    let mut response = (http, Bytes::from(body.to_string())).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// An error the gateway itself answers, with `code`'s HTTP status.
pub fn gateway_error(code: Code, message: impl Into<String>) -> Response {
    let body = json!({
        "code": code as i32,
        "message": message.into(),
        "details": [],
    });
    status_response(http_status(code), &body)
}

/// INVALID_ARGUMENT with a BadRequest naming each field.
pub fn bad_request(violations: &[Violation]) -> Response {
    let message = violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    let body = json!({
        "code": Code::InvalidArgument as i32,
        "message": message,
        "details": [{
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": violations
                .iter()
                .map(|v| json!({"field": v.field, "description": v.description}))
                .collect::<Vec<_>>(),
        }],
    });
    status_response(StatusCode::BAD_REQUEST, &body)
}
