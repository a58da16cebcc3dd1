//! What the gateway tells of each REST request: its metrics (requests by
//! method, route and status, latency to the response's headers, requests
//! in flight), its server span and its access line, all from one layer.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use brewmesh_runtime::telemetry::tracing_enabled;

use brewmesh_runtime::metrics::{Handles, OtelNames, Red, RedHelp};
use brewmesh_runtime::telemetry::Traced;
use opentelemetry::KeyValue;
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
            OtelNames {
                duration: "http.server.request.duration",
                requests: "http.server.requests",
                outcome: "http.response.status_code",
            },
        )
    })
}

/// Most (method, route) pairs whose handles are kept: routes are a fixed
/// table, methods a handful; past it each request resolves its own.
const MAX_ROUTES: usize = 4096;

/// The metrics of `method` on `route` (a template, or `unmatched`): a
/// look-up by borrowed strings; labels are made once per pair.
fn handles(method: &http::Method, route: &str) -> Arc<Handles<HttpStatusLabels>> {
    type ByRoute = HashMap<http::Method, HashMap<Box<str>, Arc<Handles<HttpStatusLabels>>>>;
    static CACHE: OnceLock<RwLock<ByRoute>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(found) = (cache.read().unwrap_or_else(|p| p.into_inner()))
        .get(method)
        .and_then(|by_route| by_route.get(route))
    {
        return Arc::clone(found);
    }
    let labels = HttpLabels {
        method: method.as_str().to_owned(),
        route: route.to_owned(),
    };
    let outcome = labels.clone();
    let attributes = || {
        vec![
            KeyValue::new("http.request.method", labels.method.clone()),
            KeyValue::new("http.route", labels.route.clone()),
        ]
    };
    let made = Arc::new(http().handles(
        &labels,
        move |status| HttpStatusLabels {
            method: outcome.method.clone(),
            route: outcome.route.clone(),
            status,
        },
        attributes,
    ));
    let mut cache = cache.write().unwrap_or_else(|p| p.into_inner());
    if cache.values().map(HashMap::len).sum::<usize>() >= MAX_ROUTES {
        return made;
    }
    let by_route = cache.entry(method.clone()).or_default();
    Arc::clone(by_route.entry(route.into()).or_insert(made))
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
        .map_or("unmatched", |m| m.route.template.source());
    let method = request.method().clone();
    let metrics = brewmesh_runtime::metrics::enabled().then(|| handles(&method, route_name));
    // Sampled or not, decided here once, for every hop below.
    let traced = tracing_enabled().then(|| {
        let parent = brewmesh_runtime::telemetry::extract(request.headers());
        brewmesh_runtime::telemetry::request_span(parent, || {
            let route = route_name;
            let path = request.uri().path();
            // Attributes as fields at creation: one trip through the subscriber.
            tracing::info_span!(
                target: "brewmesh_gateway::http",
                "http",
                otel.name = %format!("{method} {route}"),
                otel.kind = "server",
                http.request.method = method.as_str(),
                http.route = route,
                url.path = path,
                url.scheme = "http",
                http.response.status_code = tracing::field::Empty,
            )
        })
    });
    if let Some(matched) = matched {
        request.extensions_mut().insert(matched);
    }

    if let Some(metrics) = &metrics {
        metrics.begin();
    }
    let started = Instant::now();
    let path = request.uri().path().to_owned();
    let response = match &traced {
        Some(traced) => traced.clone().attach(next.run(request)).await,
        None => next.run(request).await,
    };
    let status = response.status();
    let elapsed = started.elapsed();
    // A sampled request's trace is its latency bucket's exemplar.
    if let Some(metrics) = &metrics {
        let trace = traced.as_ref().and_then(Traced::sampled_trace_id);
        metrics.end(elapsed, status.as_u16(), trace);
    }
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
