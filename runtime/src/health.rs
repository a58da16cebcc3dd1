//! `grpc.health.v1` as the health-checking protocol has it, with Watch
//! streams that end once a drain has told them NOT_SERVING.
//!
//! Two places where tonic-health departs from the protocol, which is why
//! this is written here: a Watch of a service the server does not know ends
//! the call with NOT_FOUND, where the protocol sends SERVICE_UNKNOWN and keeps
//! the call open so that the client learns when the service appears; and its
//! Watch streams never end, so a single watcher (the registry, a load
//! balancer) would hold every graceful drain until its deadline. Here each
//! watcher receives the NOT_SERVING update of a drain, and then its stream
//! ends, as WatchOrder's do.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

/// The serving status of each service a process serves ("" is the whole
/// server), as its Health service reports them. Clones share the statuses.
#[derive(Clone, Debug)]
pub struct HealthStatuses {
    statuses: Arc<watch::Sender<BTreeMap<String, ServingStatus>>>,
}

impl Default for HealthStatuses {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthStatuses {
    /// No service known yet: a Check of any is NOT_FOUND, a Watch is told
    /// SERVICE_UNKNOWN until the service is set.
    pub fn new() -> Self {
        Self {
            statuses: Arc::new(watch::Sender::new(BTreeMap::new())),
        }
    }

    /// Sets `service`'s status; watchers hear of it only if it changed.
    pub fn set(&self, service: &str, status: ServingStatus) {
        self.statuses.send_if_modified(|statuses| {
            statuses.insert(service.to_owned(), status) != Some(status)
        });
    }

    /// `service`'s status, `ServiceUnknown` if it was never set.
    pub fn get(&self, service: &str) -> ServingStatus {
        status_of(&self.statuses.borrow(), service)
    }

    /// The gRPC service answering for these statuses. `draining` is
    /// cancelled when the drain starts, before the statuses turn NOT_SERVING.
    pub fn service(&self, draining: CancellationToken) -> HealthServer<HealthService> {
        HealthServer::new(HealthService {
            statuses: self.clone(),
            draining,
        })
    }
}

fn status_of(statuses: &BTreeMap<String, ServingStatus>, service: &str) -> ServingStatus {
    statuses
        .get(service)
        .copied()
        .unwrap_or(ServingStatus::ServiceUnknown)
}

/// The `grpc.health.v1.Health` service over [`HealthStatuses`].
#[derive(Debug)]
pub struct HealthService {
    statuses: HealthStatuses,
    draining: CancellationToken,
}

fn response(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = request.into_inner().service;
        match self.statuses.statuses.borrow().get(&service) {
            Some(status) => Ok(Response::new(response(*status))),
            None => Err(Status::not_found(format!(
                "this server does not serve {service:?}"
            ))),
        }
    }

    type WatchStream = ReceiverStream<Result<HealthCheckResponse, Status>>;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let service = request.into_inner().service;
        let mut statuses = self.statuses.statuses.subscribe();
        let draining = self.draining.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let mut sent = None;
            loop {
                let status = status_of(&statuses.borrow_and_update(), &service);
                if sent != Some(status) {
                    if tx.send(Ok(response(status))).await.is_err() {
                        return;
                    }
                    sent = Some(status);
                }
                let told_not_serving = sent == Some(ServingStatus::NotServing);
                if told_not_serving && draining.is_cancelled() {
                    return;
                }
                tokio::select! {
                    changed = statuses.changed() => if changed.is_err() { return },
                    () = draining.cancelled(), if told_not_serving => return,
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
