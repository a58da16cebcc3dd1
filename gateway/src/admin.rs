//! The gateway's own endpoints: `/healthz` (every backend's health) and
//! `/openapi.json`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::Response;
use http::StatusCode;
use serde_json::json;
use tonic::Code;

use crate::errors::json_response;
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
    json_response(code, body.to_string())
}

/// `/openapi.json`.
pub async fn openapi(State(gateway): State<Arc<Gateway>>) -> Response {
    json_response(StatusCode::OK, gateway.openapi.clone())
}
