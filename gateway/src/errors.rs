//! gRPC statuses as HTTP answers: the status code grpc-gateway maps each
//! gRPC code to, and a JSON `google.rpc.Status` body with its details.

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::json;
use tonic::Code;

use crate::metadata::add_metadata;
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

/// A JSON answer: the one place the gateway writes its content type.
pub fn json_response(http: StatusCode, body: impl Into<Body>) -> Response {
    let mut response = (http, body.into()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// An HTTP answer with a JSON `google.rpc.Status` body.
pub fn status_response(http: StatusCode, body: &serde_json::Value) -> Response {
    json_response(http, Bytes::from(body.to_string()))
}

/// Every way a request fails, answered once, as a JSON `google.rpc.Status`
/// with the HTTP status of its gRPC code (or a more precise one).
#[derive(Debug)]
pub enum GatewayError {
    /// No route has this path: 404.
    NoRoute {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
    },
    /// The path exists under other methods: 405 with `Allow`.
    MethodNotAllowed {
        /// The request's method.
        method: Method,
        /// The request's path.
        path: String,
        /// The methods the path has, `GET, POST`.
        allow: String,
    },
    /// A body that is not JSON: 415.
    NotJson,
    /// A body that did not arrive whole in time: 408, DEADLINE_EXCEEDED.
    SlowBody {
        /// How long it may take.
        patience: std::time::Duration,
    },
    /// Headers to forward upstream over the limit
    /// ([`crate::metadata::MAX_METADATA_BYTES`]): 431, RESOURCE_EXHAUSTED.
    HeadersTooLarge {
        /// The request's header bytes.
        size: usize,
    },
    /// A body over the limit: 413.
    TooLarge {
        /// The most bytes a body may have.
        limit: usize,
    },
    /// A body in a `Content-Encoding` not known here: 415 with
    /// `Accept-Encoding`.
    UnsupportedEncoding(String),
    /// A malformed request (its body could not be read, a header): 400.
    Invalid(String),
    /// Fields that do not fit the request message: 400 with a BadRequest.
    BadRequest(Vec<Violation>),
    /// No instance of the route's service is known: 503, at once.
    NoInstance(String),
    /// Not let in ([`crate::admission`]): 429 or 503, with `Retry-After`.
    Refused(crate::admission::Refusal),
    /// No valid token, or not the scope ([`crate::auth`]): 401 or 403,
    /// with `WWW-Authenticate`.
    Denied(crate::auth::Denied),
    /// The backend's own status, with its details as JSON when their
    /// types are known, and its trailers.
    Upstream {
        /// The backend's status.
        status: Box<tonic::Status>,
        /// Its JSON `google.rpc.Status`.
        body: serde_json::Value,
    },
}

impl GatewayError {
    /// The backend's `status`, its details decoded with `pool`.
    pub fn upstream(pool: &DescriptorPool, status: tonic::Status) -> Self {
        let body = status_json(pool, &status);
        GatewayError::Upstream {
            status: Box::new(status),
            body,
        }
    }

    /// The gRPC code this error stands for.
    pub fn code(&self) -> Code {
        match self {
            GatewayError::NoRoute { .. } => Code::NotFound,
            GatewayError::MethodNotAllowed { .. } => Code::Unimplemented,
            GatewayError::NotJson
            | GatewayError::TooLarge { .. }
            | GatewayError::Invalid(_)
            | GatewayError::BadRequest(_) => Code::InvalidArgument,
            GatewayError::UnsupportedEncoding(_) => Code::Unimplemented,
            GatewayError::NoInstance(_) => Code::Unavailable,
            GatewayError::HeadersTooLarge { .. } => Code::ResourceExhausted,
            GatewayError::SlowBody { .. } => Code::DeadlineExceeded,
            GatewayError::Refused(refusal) => refusal.status().code(),
            GatewayError::Denied(denied) => denied.status().code(),
            GatewayError::Upstream { status, .. } => status.code(),
        }
    }

    /// The HTTP status answered.
    pub fn http_status(&self) -> StatusCode {
        match self {
            GatewayError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::NotJson | GatewayError::UnsupportedEncoding(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            GatewayError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::SlowBody { .. } => StatusCode::REQUEST_TIMEOUT,
            _ => http_status(self.code()),
        }
    }

    pub(crate) fn message(&self) -> String {
        match self {
            GatewayError::NoRoute { method, path } => format!("no route for {method} {path}"),
            GatewayError::MethodNotAllowed {
                method,
                path,
                allow,
            } => format!("{method} is not allowed on {path}; allowed: {allow}"),
            GatewayError::NotJson => {
                "the body must be JSON (Content-Type: application/json)".to_owned()
            }
            GatewayError::TooLarge { limit } => format!("the body is larger than {limit} bytes"),
            GatewayError::Refused(refusal) => refusal.status().message().to_owned(),
            GatewayError::Denied(denied) => denied.status().message().to_owned(),
            GatewayError::SlowBody { patience } => {
                format!("the request's body did not arrive whole within {patience:?}")
            }
            GatewayError::HeadersTooLarge { size } => format!(
                "the request's headers carry {size} bytes; at most {} of metadata \
                 (Authorization, trace context, Grpc-Metadata-*) are passed on",
                crate::metadata::MAX_METADATA_BYTES
            ),
            GatewayError::UnsupportedEncoding(encoding) => format!(
                "Content-Encoding {encoding:?} is not supported; send the body as gzip, zstd or identity"
            ),
            GatewayError::Invalid(message) => message.clone(),
            GatewayError::BadRequest(violations) => violations
                .iter()
                .map(|v| format!("{}: {}", v.field, v.description))
                .collect::<Vec<_>>()
                .join("; "),
            GatewayError::NoInstance(service) => format!("no instance of {service} is known"),
            GatewayError::Upstream { status, .. } => status.message().to_owned(),
        }
    }
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let http = self.http_status();
        let details = match &self {
            GatewayError::Upstream { status, body } => {
                let mut response = status_response(http, body);
                add_metadata(response.headers_mut(), status.metadata());
                if status.code() == Code::Unauthenticated {
                    response
                        .headers_mut()
                        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                }
                return response;
            }
            GatewayError::Denied(denied) => {
                let mut response = status_response(http, &denied.json());
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, denied.challenge());
                return response;
            }
            GatewayError::BadRequest(violations) => json!([{
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": violations
                    .iter()
                    .map(|v| json!({"field": v.field, "description": v.description}))
                    .collect::<Vec<_>>(),
            }]),
            _ => json!([]),
        };
        let body = json!({
            "code": self.code() as i32,
            "message": self.message(),
            "details": details,
        });
        let mut response = status_response(http, &body);
        if let GatewayError::MethodNotAllowed { allow, .. } = &self
            && let Ok(value) = HeaderValue::from_str(allow)
        {
            response.headers_mut().insert(header::ALLOW, value);
        }
        if let GatewayError::Refused(refusal) = &self {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(refusal.retry_after()),
            );
        }
        if let GatewayError::UnsupportedEncoding(_) = &self {
            response.headers_mut().insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static(crate::compression::ACCEPTED),
            );
        }
        response
    }
}
