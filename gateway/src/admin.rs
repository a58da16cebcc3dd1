//! The gateway's own endpoints: `/healthz` (every backend's health),
//! `/openapi.json` and `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::json;
use tonic::Code;

use crate::state::Gateway;

/// `/healthz`: every backend's `grpc.health.v1`, 200 when all serve; a
/// backend that cannot answer shows the gRPC code of the failed check
/// (`UNAVAILABLE`).
pub async fn healthz(State(gateway): State<Arc<Gateway>>) -> Response {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    // All at once: one slow backend must not add to another's wait.
    let mut checks = tokio::task::JoinSet::new();
    for (service, channel) in &gateway.upstreams {
        let mut client = HealthClient::new(channel.clone());
        let service = service.clone();
        checks.spawn(async move {
            let mut request = tonic::Request::new(HealthCheckRequest {
                service: service.clone(),
            });
            request.set_timeout(Duration::from_secs(2));
            let status = match tokio::time::timeout(Duration::from_secs(3), client.check(request))
                .await
            {
                Ok(Ok(answer)) => answer
                    .into_inner()
                    .status()
                    .as_str_name()
                    .trim_start_matches("SERVING_STATUS_")
                    .to_owned(),
                Ok(Err(status)) => brewmesh_runtime::metrics::code_name(status.code()).to_owned(),
                Err(_) => brewmesh_runtime::metrics::code_name(Code::DeadlineExceeded).to_owned(),
            };
            (service, status)
        });
    }
    let results: Vec<(String, String)> = checks.join_all().await;
    let serving = results.iter().all(|(_, s)| s == "SERVING");
    let body = json!({
        "status": if serving { "SERVING" } else { "NOT_SERVING" },
        "services": results
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect::<serde_json::Map<_, _>>(),
    });
    let code = if serving {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = (code, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `/openapi.json`.
pub async fn openapi(State(gateway): State<Arc<Gateway>>) -> Response {
    let mut response = gateway.openapi.clone().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `/metrics`: the gateway's metrics (HTTP, and its balanced channels'
/// metrics) in the Prometheus text format.
pub async fn metrics() -> Response {
    // Registered on first use: make the families exist before a request.
    let _ = crate::observe::http();
    let mut response = brewmesh_runtime::metrics::render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    response
}
