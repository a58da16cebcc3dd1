//! Cross-origin requests: which other origins' pages may call the gateway
//! (`--cors-origin`, none by default), their preflights answered here
//! without a backend call, the headers REST, gRPC-Web and Connect need
//! allowed and exposed.
//!
//! A request from an origin that is neither the gateway's own nor allowed
//! is refused with PERMISSION_DENIED in its protocol's form — a browser
//! sends `Origin` with every cross-origin request, so a page elsewhere
//! cannot place an order with a form or a "simple" `text/plain` POST,
//! which no preflight would have stopped.

use axum::extract::Request;
use axum::response::Response;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use serde_json::json;
use tonic::Code;

use crate::errors::json_response;

/// Methods a page elsewhere may use.
const METHODS: &str = "GET, POST, PUT, PATCH, DELETE";

/// Request headers a page elsewhere may send: the protocols' own, the
/// trace context, authorization, caching; and any `Grpc-Metadata-*`.
const ALLOWED: &[&str] = &[
    "accept",
    "authorization",
    "baggage",
    "connect-accept-encoding",
    "connect-content-encoding",
    "connect-protocol-version",
    "connect-timeout-ms",
    "content-encoding",
    "content-type",
    "grpc-accept-encoding",
    "grpc-encoding",
    "grpc-timeout",
    "if-none-match",
    "traceparent",
    "tracestate",
    "x-grpc-web",
    "x-user-agent",
];

/// Response headers a page elsewhere may read.
const EXPOSED: &str = "grpc-status, grpc-message, grpc-status-details-bin, grpc-encoding, \
    grpc-accept-encoding, connect-content-encoding, connect-accept-encoding, content-encoding, \
    etag, location, retry-after, traceparent, x-cache";

/// How long a browser may keep a preflight's answer.
const MAX_AGE_SECONDS: &str = "7200";

/// The allowed origins.
#[derive(Debug, Clone, Default)]
pub struct Cors {
    origins: Vec<String>,
    any: bool,
    credentials: bool,
}

impl Cors {
    /// `origins` as `--cors-origin` gives them (`*` for any).
    pub fn new(origins: &[String], credentials: bool) -> Self {
        Self {
            any: origins.iter().any(|o| o == "*"),
            origins: origins.iter().filter(|o| *o != "*").cloned().collect(),
            credentials,
        }
    }

    fn allows(&self, origin: &str) -> bool {
        self.any || self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }

    /// The headers every answer to `origin` carries.
    pub fn decorate(&self, origin: &str, headers: &mut HeaderMap) {
        let echoed = self.credentials || !self.any;
        let value = if echoed {
            HeaderValue::from_str(origin).ok()
        } else {
            Some(HeaderValue::from_static("*"))
        };
        if let Some(value) = value {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        }
        if self.credentials {
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        headers.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSED),
        );
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }

    /// The answer to a preflight from an allowed `origin`; 403 when it asks
    /// for a method or headers that are not allowed.
    fn preflight(&self, origin: &str, request: &HeaderMap) -> Response {
        let method = request
            .get(header::ACCESS_CONTROL_REQUEST_METHOD)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !METHODS.split(", ").any(|m| m == method) {
            return refusal(format!(
                "method {method:?} is not allowed from another origin; allowed: {METHODS}"
            ));
        }
        let asked: Vec<String> = request
            .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        let refused: Vec<&str> = asked
            .iter()
            .map(String::as_str)
            .filter(|h| !ALLOWED.contains(h) && !h.starts_with("grpc-metadata-"))
            .collect();
        if !refused.is_empty() {
            return refusal(format!(
                "headers not allowed from another origin: {}",
                refused.join(", ")
            ));
        }
        let mut response = Response::new(axum::body::Body::empty());
        *response.status_mut() = StatusCode::NO_CONTENT;
        let h = response.headers_mut();
        self.decorate(origin, h);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(METHODS),
        );
        if let Ok(value) = HeaderValue::from_str(&asked.join(", "))
            && !asked.is_empty()
        {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, value);
        }
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static(MAX_AGE_SECONDS),
        );
        h.append(
            header::VARY,
            HeaderValue::from_static(
                "Access-Control-Request-Method, Access-Control-Request-Headers",
            ),
        );
        response
    }
}

/// 403 with a JSON `google.rpc.Status`.
fn refusal(message: String) -> Response {
    let body = json!({"code": Code::PermissionDenied as i32, "message": message, "details": []});
    json_response(StatusCode::FORBIDDEN, body.to_string())
}

/// Whether `origin` is the gateway's own: the host the request was sent
/// to, whatever the scheme (TLS may end in front of it).
fn same_origin(request: &Request, origin: &str) -> bool {
    let host = request
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            (request.headers().get(header::HOST))
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let Some(host) = host else {
        return false;
    };
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|o| o.eq_ignore_ascii_case(&host))
}

/// What to do with a request, by its `Origin`.
#[derive(Debug)]
pub enum Verdict {
    /// No origin, or the gateway's own: nothing to add.
    Pass,
    /// An allowed origin: answer, then [`Cors::decorate`] the answer.
    Allowed(String),
    /// A preflight, answered.
    Preflight(Response),
    /// An origin not allowed: refuse, with this message.
    Refused(String),
}

impl Cors {
    /// The verdict on `request`.
    pub fn check(&self, request: &Request) -> Verdict {
        let Some(origin) = (request.headers().get(header::ORIGIN))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
        else {
            return Verdict::Pass;
        };
        if same_origin(request, &origin) {
            return Verdict::Pass;
        }
        if !self.allows(&origin) {
            return Verdict::Refused(format!(
                "origin {origin:?} is not allowed to call this gateway (see --cors-origin)"
            ));
        }
        let preflight = request.method() == Method::OPTIONS
            && (request.headers()).contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if preflight {
            return Verdict::Preflight(self.preflight(&origin, request.headers()));
        }
        Verdict::Allowed(origin)
    }

    /// A refusal as a JSON `google.rpc.Status` (the form of REST and of
    /// preflights).
    pub fn refusal(message: String) -> Response {
        refusal(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_star_allows_any_origin_and_is_not_echoed_without_credentials() {
        let cors = Cors::new(&["*".to_owned()], false);
        assert!(cors.allows("https://anywhere.example"));
        let mut h = HeaderMap::new();
        cors.decorate("https://anywhere.example", &mut h);
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        assert!(!h.contains_key(header::ACCESS_CONTROL_ALLOW_CREDENTIALS));
    }

    #[test]
    fn named_origins_only_and_echoed() {
        let cors = Cors::new(&["https://shop.example".to_owned()], true);
        assert!(cors.allows("https://shop.example"));
        assert!(!cors.allows("https://evil.example"));
        let mut h = HeaderMap::new();
        cors.decorate("https://shop.example", &mut h);
        assert_eq!(
            h[header::ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://shop.example"
        );
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
    }

    #[test]
    fn a_preflight_asking_for_an_unknown_header_is_refused() {
        let cors = Cors::new(&["https://shop.example".to_owned()], false);
        let mut asked = HeaderMap::new();
        asked.insert(
            header::ACCESS_CONTROL_REQUEST_METHOD,
            HeaderValue::from_static("POST"),
        );
        asked.insert(
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            HeaderValue::from_static("content-type, x-evil"),
        );
        assert_eq!(
            cors.preflight("https://shop.example", &asked).status(),
            StatusCode::FORBIDDEN
        );
        asked.insert(
            header::ACCESS_CONTROL_REQUEST_HEADERS,
            HeaderValue::from_static("Content-Type, Connect-Protocol-Version, grpc-metadata-x"),
        );
        let ok = cors.preflight("https://shop.example", &asked);
        assert_eq!(ok.status(), StatusCode::NO_CONTENT);
        assert!(
            ok.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS]
                .to_str()
                .unwrap()
                .contains("connect-protocol-version")
        );
    }
}
