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
    // All at once: one slow backend must not add to another's wait.
    let mut checks = tokio::task::JoinSet::new();
    for (service, channel) in &gateway.upstreams {
        let (service, channel) = (service.clone(), channel.clone());
        checks.spawn(async move {
            let status = match check(channel, &service, Duration::from_secs(2)).await {
                Ok(serving) => serving,
                Err(code) => brewmesh_runtime::metrics::code_name(code).to_owned(),
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

/// One `grpc.health.v1` Check of `service` over `channel`: the status's
/// name (`SERVING`, `NOT_SERVING`, …), or the code of the failed call
/// (DEADLINE_EXCEEDED past `deadline`).
pub(crate) async fn check<T>(channel: T, service: &str, deadline: Duration) -> Result<String, Code>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let mut client = HealthClient::new(channel);
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    request.set_timeout(deadline);
    match tokio::time::timeout(deadline + Duration::from_secs(1), client.check(request)).await {
        Ok(Ok(answer)) => Ok(answer
            .into_inner()
            .status()
            .as_str_name()
            .trim_start_matches("SERVING_STATUS_")
            .to_owned()),
        Ok(Err(status)) => Err(status.code()),
        Err(_) => Err(Code::DeadlineExceeded),
    }
}

/// `/openapi.json`.
pub async fn openapi(State(gateway): State<Arc<Gateway>>) -> Response {
    json_response(StatusCode::OK, gateway.openapi.clone())
}
