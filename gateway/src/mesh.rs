//! `/mesh`: every process of the mesh as one JSON answer, for the web
//! page's view of it — the instances the registry lists (healthy or not),
//! the registry replicas, and this gateway — each with the request,
//! error and latency counters from its own `/metrics` ([`crate::scrape`]).
//!
//! Counters are cumulative, as the processes keep them; whoever polls
//! takes rates and percentiles from the difference of two answers, so any
//! number of viewers can poll without sharing a window. The gateway
//! scrapes on demand, every process at once, each under a deadline: one
//! process that hangs costs a poll that long, never longer.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::State;
use axum::response::{IntoResponse as _, Response};
use http::StatusCode;
use serde::Serialize;

use brewmesh::pb::registry::v1::registry_client::RegistryClient;
use brewmesh::pb::registry::v1::{HealthStatus, ListInstancesRequest};

use crate::errors::json_response;
use crate::scrape::{Counters, DEADLINE, scrape, summarize};
use crate::state::Gateway;

const REGISTRY: &str = "brewmesh.registry.v1.Registry";

/// The whole answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Mesh {
    /// When the gateway answered, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Every process, by service and instance id.
    pub instances: Vec<Process>,
    /// Why the registry's list is missing, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registry_error: Option<String>,
}

/// One process.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    /// `gateway`, or the gRPC service it serves.
    pub service: String,
    /// The instance's id (`barista-3f2a`), `gateway`, or `registry@addr`.
    pub instance_id: String,
    /// `host:port`.
    pub address: String,
    /// Its zone, when it has one.
    pub zone: String,
    /// The software version it runs.
    pub version: String,
    /// `SERVING`, `NOT_SERVING`, `UNREACHABLE` or `UNKNOWN`.
    pub health: String,
    /// Its counters; `None` when the scrape failed.
    pub metrics: Option<Counters>,
    /// Why the scrape failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_error: Option<String>,
}

/// `GET /mesh`.
pub async fn handle(State(gateway): State<Arc<Gateway>>, headers: http::HeaderMap) -> Response {
    // The topology is the registry's to show: its scope, as ListInstances.
    let registry = "brewmesh.registry.v1.Registry";
    if let Err(denied) = gateway.auth.check(&headers, registry, "ListInstances") {
        return crate::errors::GatewayError::Denied(denied).into_response();
    }
    let mesh = gather(&gateway).await;
    let body = serde_json::to_vec(&mesh).unwrap_or_default();
    let mut response = json_response(StatusCode::OK, body);
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}

/// Asks the registry and every process, all at once.
pub async fn gather(gateway: &Arc<Gateway>) -> Mesh {
    let mut processes = tokio::task::JoinSet::new();
    let me = Process {
        service: "gateway".to_owned(),
        instance_id: "gateway".to_owned(),
        address: gateway
            .address
            .get()
            .map(ToString::to_string)
            .unwrap_or_default(),
        zone: String::new(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        health: "SERVING".to_owned(),
        metrics: Some(summarize(
            &brewmesh_runtime::metrics::render(),
            &gateway.pool,
        )),
        metrics_error: None,
    };
    for (address, channel) in &gateway.registries {
        let (gateway, address, channel) = (Arc::clone(gateway), address.clone(), channel.clone());
        processes.spawn(async move {
            let health = crate::admin::check(channel, "", DEADLINE)
                .await
                .unwrap_or_else(|_| "UNREACHABLE".to_owned());
            let mut process = Process {
                service: REGISTRY.to_owned(),
                instance_id: format!("registry@{address}"),
                address,
                zone: String::new(),
                version: String::new(),
                health,
                metrics: None,
                metrics_error: None,
            };
            scrape_into(&gateway, &mut process).await;
            process
        });
    }
    let mut registry_error = None;
    match gateway.upstreams.get(REGISTRY) {
        None => registry_error = Some("this gateway fronts no registry".to_owned()),
        Some(upstream) => {
            let mut client = RegistryClient::new(upstream.clone());
            let mut request = tonic::Request::new(ListInstancesRequest::default());
            request.set_timeout(DEADLINE);
            match tokio::time::timeout(DEADLINE, client.list_instances(request)).await {
                Ok(Ok(answer)) => {
                    for instance in answer.into_inner().instances {
                        let gateway = Arc::clone(gateway);
                        processes.spawn(async move {
                            let health = match instance.health() {
                                HealthStatus::Unspecified => "UNKNOWN".to_owned(),
                                other => other
                                    .as_str_name()
                                    .trim_start_matches("HEALTH_STATUS_")
                                    .to_owned(),
                            };
                            let mut process = Process {
                                service: instance.service,
                                instance_id: instance.instance_id,
                                address: instance.address,
                                zone: instance.zone,
                                version: instance.version,
                                health,
                                metrics: None,
                                metrics_error: None,
                            };
                            scrape_into(&gateway, &mut process).await;
                            process
                        });
                    }
                }
                Ok(Err(status)) => registry_error = Some(status.message().to_owned()),
                Err(_) => registry_error = Some("the registry did not answer in time".to_owned()),
            }
        }
    }
    let mut instances = processes.join_all().await;
    instances.push(me);
    instances.sort_by(|a, b| (&a.service, &a.instance_id).cmp(&(&b.service, &b.instance_id)));
    let time_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    Mesh {
        time_ms,
        instances,
        registry_error,
    }
}

async fn scrape_into(gateway: &Gateway, process: &mut Process) {
    match scrape(&gateway.scraper, &process.address).await {
        Ok(text) => process.metrics = Some(summarize(&text, &gateway.pool)),
        Err(why) => process.metrics_error = Some(why),
    }
}
