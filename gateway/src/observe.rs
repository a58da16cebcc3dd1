//! The gateway's HTTP metrics: requests by method, route and status,
//! latency to the response's headers, requests in flight.

use std::sync::OnceLock;

use brewmesh_runtime::metrics::{latency_histogram, register};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

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

/// The gateway's HTTP metrics.
#[derive(Debug, Clone)]
pub struct HttpMetrics {
    /// Answers by status.
    pub requests: Family<HttpStatusLabels, Counter>,
    /// Time to the response's headers (a stream's body takes longer).
    pub duration: Family<HttpLabels, Histogram>,
    /// Requests being answered.
    pub in_flight: Family<HttpLabels, Gauge>,
}

/// The process's [`HttpMetrics`], registered on first use.
pub fn http() -> &'static HttpMetrics {
    static HTTP: OnceLock<HttpMetrics> = OnceLock::new();
    HTTP.get_or_init(|| {
        let metrics = HttpMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            in_flight: Family::default(),
        };
        register(
            "http_server_requests",
            "HTTP requests answered, by method, route and status",
            metrics.requests.clone(),
        );
        register(
            "http_server_duration_seconds",
            "HTTP latency to the response headers, by method and route",
            metrics.duration.clone(),
        );
        register(
            "http_server_in_flight_requests",
            "HTTP requests being answered",
            metrics.in_flight.clone(),
        );
        metrics
    })
}
