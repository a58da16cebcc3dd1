//! What the gateway tells of each REST request: its metrics (requests by
//! method, route and status, latency to the response's headers, requests
//! in flight), its server span and its access line, all from one layer.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use brewmesh_runtime::telemetry::tracing_enabled;

use brewmesh_runtime::metrics::{Red, RedHelp};
use prometheus_client::encoding::EncodeLabelSet;

use crate::state::Gateway;

/// A route: the HTTP method and the template (`/v1/orders/{order_id}`),
/// never the raw path, so the label set stays bounded.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path template, or `unmatched`.
    pub route: String,
}

/// A route and the status answered.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpStatusLabels {
    /// `GET`, `POST`, …
    pub method: String,
    /// The path template, or `unmatched`.
    pub route: String,
    /// The HTTP status code.
    pub status: u16,
}

/// The gateway's HTTP metrics: answers by status, time to the response's
/// headers (a stream's body takes longer), requests being answered.
pub type HttpMetrics = Red<HttpLabels, HttpStatusLabels>;

/// The process's [`HttpMetrics`], registered on first use.
pub fn http() -> &'static HttpMetrics {
    static HTTP: OnceLock<HttpMetrics> = OnceLock::new();
    HTTP.get_or_init(|| {
        Red::register(
            "http_server",
            RedHelp {
                requests: "HTTP requests answered, by method, route and status",
                duration: "HTTP latency to the response headers, by method and route",
                in_flight: "HTTP requests being answered",
            },
        )
    })
}

/// The tower layer around the REST routes: each request in an HTTP server
/// span (continuing the client's trace context), counted by route and
/// status, and logged at debug in the span. The route is found here, once.
pub async fn layer(
    State(gateway): State<Arc<Gateway>>,
    mut request: Request,
    next: Next,
) -> Response {
    let matched = gateway.find(request.method(), request.uri().path());
    let route_name = matched
        .as_ref()
        .map_or("unmatched", |m| m.route.template.source())
        .to_owned();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let labels = HttpLabels {
        method: method.as_str().to_owned(),
        route: route_name,
    };
    // Sampled or not, decided here once, for every hop below.
    let traced = tracing_enabled().then(|| {
        let parent = brewmesh_runtime::telemetry::extract(request.headers());
        brewmesh_runtime::telemetry::request_span(parent, || {
            let route = labels.route.as_str();
            // Attributes as fields at creation: one trip through the subscriber.
            tracing::info_span!(
                target: "brewmesh_gateway::http",
                "http",
                otel.name = %format!("{method} {route}"),
                otel.kind = "server",
                http.request.method = method.as_str(),
                http.route = route,
                url.path = path.as_str(),
                url.scheme = "http",
                http.response.status_code = tracing::field::Empty,
            )
        })
    });
    if let Some(matched) = matched {
        request.extensions_mut().insert(matched);
    }

    http().begin(&labels);
    let started = Instant::now();
    let response = match &traced {
        Some(traced) => traced.clone().attach(next.run(request)).await,
        None => next.run(request).await,
    };
    let status = response.status();
    let elapsed = started.elapsed();
    let outcome = HttpStatusLabels {
        method: labels.method.clone(),
        route: labels.route.clone(),
        status: status.as_u16(),
    };
    http().end(&labels, elapsed, &outcome);
    let access = || {
        tracing::debug!(
            target: "brewmesh_gateway::access",
            %method,
            path,
            status = status.as_u16(),
            elapsed_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    };
    match &traced {
        Some(traced) => {
            if let Some(span) = traced.span() {
                span.record("http.response.status_code", i64::from(status.as_u16()));
                if status.is_server_error() {
                    brewmesh_runtime::telemetry::fail(span, status.as_str());
                }
            }
            // In the request's trace: the line carries the trace id.
            traced.in_scope(access);
        }
        None => access(),
    }
    response
}
