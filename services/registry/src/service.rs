//! The `brewmesh.registry.v1.Registry` gRPC service, and the health
//! follower that keeps each registered instance's status current.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use brewmesh::pb::registry::v1::registry_server::Registry as RegistryApi;
use brewmesh::pb::registry::v1::{
    DeregisterRequest, DeregisterResponse, HealthStatus, Instance, KeepAliveRequest,
    KeepAliveResponse, ListInstancesRequest, ListInstancesResponse, ListServicesRequest,
    ListServicesResponse, RegisterRequest, RegisterResponse, ResolveRequest, ResolveResponse,
    WatchRequest, WatchResponse,
};
use brewmesh_runtime::secret::Secret;
use brewmesh_runtime::validate::Validate as _;

use crate::registry::Registry;

/// Lease lengths the registry grants.
#[derive(Debug, Clone, Copy)]
pub struct Ttl {
    /// Granted when the instance asks for none.
    pub default: Duration,
    /// The shortest granted.
    pub min: Duration,
    /// The longest granted.
    pub max: Duration,
}

/// The gRPC face of the [`Registry`].
#[derive(Debug, Clone)]
pub struct RegistryService {
    registry: Arc<Registry>,
    token: Secret,
    ttl: Ttl,
    /// How long to wait before checking an unreachable instance again.
    health_retry: Duration,
    shutdown: CancellationToken,
}

impl RegistryService {
    /// Serves `registry`; writes need `token`.
    pub fn new(
        registry: Arc<Registry>,
        token: Secret,
        ttl: Ttl,
        health_retry: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            registry,
            token,
            ttl,
            health_retry,
            shutdown,
        }
    }

    /// Writes need `authorization: Bearer <token>`.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            Some(token) if self.token.matches(token) => Ok(()),
            Some(_) => Err(Status::unauthenticated("the registry token is wrong")),
            None => Err(Status::unauthenticated(
                "registering needs the registry token as `authorization: Bearer <token>`",
            )),
        }
    }

    /// Deregistering is also open to an operator the gateway vouches for
    /// over mutual TLS (a token with the `registry` scope): taking a bad
    /// instance out of rotation.
    fn authorize_removal<T>(&self, request: &Request<T>) -> Result<(), Status> {
        use brewmesh_runtime::caller::{Caller, scope};
        if Caller::proven(request).has_scope(scope::REGISTRY) {
            return Ok(());
        }
        self.authorize(request)
    }
}

/// Responses of a server stream.
pub type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl RegistryApi for RegistryService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        self.authorize(&request)?;
        let identity = brewmesh_runtime::mtls::peer_identity(&request).cloned();
        let request = request.into_inner();
        request.validate()?;
        let instance = request.instance.unwrap_or_default();
        // Over mutual TLS an instance registers only its own role's
        // services: a barista cannot stand in for the ledger.
        if let Some(identity) = identity
            && brewmesh_runtime::mtls::role_of_service(&instance.service) != Some(identity.role())
        {
            return Err(Status::permission_denied(format!(
                "{identity} may register only its own role's services, not {:?}",
                instance.service
            )));
        }
        // Unset or zero asks for the default; a negative one was refused.
        let asked = (request.ttl.and_then(|ttl| Duration::try_from(ttl).ok()))
            .filter(|ttl| !ttl.is_zero())
            .unwrap_or(self.ttl.default);
        let ttl = asked.clamp(self.ttl.min, self.ttl.max);
        let instance = Instance {
            health: HealthStatus::Unspecified as i32,
            lease_expire_time: None,
            ..instance
        };
        let granted = self.registry.register(instance.clone(), ttl);
        tracing::info!(lease_id = %granted.lease_id, instance_id = %instance.instance_id, grpc_service = %instance.service, address = %instance.address, ?ttl, "registered");
        tokio::spawn(follow_health(
            Arc::clone(&self.registry),
            granted.lease_id.clone(),
            instance,
            granted.follower,
            self.health_retry,
        ));
        Ok(Response::new(RegisterResponse {
            lease_id: granted.lease_id,
            ttl: prost_types::Duration::try_from(ttl).ok(),
        }))
    }

    type KeepAliveStream = ResponseStream<KeepAliveResponse>;

    async fn keep_alive(
        &self,
        request: Request<Streaming<KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        self.authorize(&request)?;
        let mut renewals = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let registry = Arc::clone(&self.registry);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = renewals.message() => next,
                    () = shutdown.cancelled() => return,
                };
                let Ok(Some(renewal)) = next else { return };
                let answer = match registry.renew(&renewal.lease_id) {
                    Some(expire) => Ok(KeepAliveResponse {
                        lease_id: renewal.lease_id,
                        lease_expire_time: Some(expire.into()),
                    }),
                    None => Err(Status::not_found(format!(
                        "lease {} is unknown or expired; register again",
                        renewal.lease_id
                    ))),
                };
                let last = answer.is_err();
                if tx.send(answer).await.is_err() || last {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        self.authorize_removal(&request)?;
        let request = request.into_inner();
        request.validate()?;
        let lease_id = request.lease_id;
        // Removing a lease that is already gone is what the caller wanted.
        if self.registry.deregister(&lease_id) {
            tracing::info!(%lease_id, "deregistered");
        }
        Ok(Response::new(DeregisterResponse {}))
    }

    async fn resolve(
        &self,
        request: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        let request = request.into_inner();
        request.validate()?;
        let service = request.service;
        Ok(Response::new(ResolveResponse {
            instances: self.registry.resolve(&service),
        }))
    }

    type WatchStream = ResponseStream<WatchResponse>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let request = request.into_inner();
        request.validate()?;
        let service = request.service;
        let mut snapshots = self.registry.watch(&service);
        let (tx, rx) = mpsc::channel(4);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let snapshot = snapshots.borrow_and_update().clone();
                let response = WatchResponse {
                    instances: snapshot.instances.as_ref().clone(),
                    revision: snapshot.revision,
                };
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
                tokio::select! {
                    changed = snapshots.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                    () = shutdown.cancelled() => {
                        // Watchers move to another replica; don't hold the drain.
                        let _ = tx.send(Err(Status::unavailable("the registry is shutting down"))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_instances(
        &self,
        request: Request<ListInstancesRequest>,
    ) -> Result<Response<ListInstancesResponse>, Status> {
        let request = request.into_inner();
        request.validate()?;
        let service = Some(request.service.as_str()).filter(|s| !s.is_empty());
        Ok(Response::new(ListInstancesResponse {
            instances: self.registry.list(service),
        }))
    }

    async fn list_services(
        &self,
        _request: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        Ok(Response::new(ListServicesResponse {
            services: self.registry.services(),
        }))
    }
}

/// Follows one instance's `grpc.health.v1` status until its lease ends.
///
/// A Watch stream pushes NOT_SERVING the moment the instance starts to
/// drain; HTTP/2 keepalive pings (every 500 ms, 1 s timeout) notice an
/// instance that hangs or vanishes without closing its connection. Either
/// way the instance leaves the healthy set within about a second, and comes
/// back when a check succeeds again.
async fn follow_health(
    registry: Arc<Registry>,
    lease_id: String,
    instance: Instance,
    stop: CancellationToken,
    retry: Duration,
) {
    let uri = format!("http://{}", instance.address);
    let Ok(endpoint) = Endpoint::from_shared(uri) else {
        registry.set_health(&lease_id, HealthStatus::Unreachable);
        return;
    };
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(1))
        .http2_keep_alive_interval(Duration::from_millis(500))
        .keep_alive_timeout(Duration::from_secs(1))
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    loop {
        let check = async {
            let channel = brewmesh_runtime::client::connect(&endpoint)
                .await
                .map_err(|e| e.to_string())?;
            let mut statuses = HealthClient::new(channel)
                .watch(HealthCheckRequest {
                    service: instance.service.clone(),
                })
                .await
                .map_err(|s| s.to_string())?
                .into_inner();
            while let Some(status) = statuses.message().await.map_err(|s| s.to_string())? {
                let health = match status.status() {
                    ServingStatus::Serving => HealthStatus::Serving,
                    _ => HealthStatus::NotServing,
                };
                registry.set_health(&lease_id, health);
            }
            Ok::<(), String>(())
        };
        tokio::select! {
            result = check => {
                if let Err(error) = result {
                    tracing::debug!(%lease_id, %error, "health check failed");
                    registry.set_health(&lease_id, HealthStatus::Unreachable);
                }
            }
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = stop.cancelled() => return,
        }
    }
}
