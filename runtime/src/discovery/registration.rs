//! Being found: an instance registers with **every** registry replica and
//! keeps each lease alive over its own KeepAlive stream. When a replica
//! forgets the lease (it restarted) or goes away, that replica's loop
//! registers again with backoff, so registration resumes by itself when a
//! registry returns. Replicas share nothing; each knows every instance from
//! the instances themselves.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::client::{InvalidAddress, connect_lazy, endpoint};
use crate::secret::Secret;
use brewmesh::pb::registry::v1::registry_client::RegistryClient;
use brewmesh::pb::registry::v1::{DeregisterRequest, Instance, KeepAliveRequest, RegisterRequest};
use humantime::parse_duration;

use super::resolve::MAX_BACKOFF;

/// Flags of every service that registers, and of every caller that
/// resolves through the registry.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RegistryArgs {
    /// Registry replica addresses; an instance registers with each one.
    #[arg(long = "registry", env = "BREWMESH_REGISTRY", value_delimiter = ',')]
    pub registries: Vec<String>,

    /// The registry's shared token (needed to register).
    #[arg(
        long = "registry-token",
        env = "BREWMESH_REGISTRY_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<Secret>,

    /// The address other processes reach this one at [default: the
    /// listener's address].
    #[arg(long, env = "BREWMESH_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,

    /// The failure domain this instance runs in (e.g. an availability zone).
    #[arg(long, env = "BREWMESH_ZONE", default_value = "")]
    pub zone: String,

    /// The lease time-to-live this instance asks for.
    #[arg(long, env = "BREWMESH_LEASE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub lease_ttl: Duration,
}

impl RegistryArgs {
    /// Whether a registry is configured.
    pub fn enabled(&self) -> bool {
        !self.registries.is_empty()
    }
}

/// Why registration could not start.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// A registry address is not valid.
    #[error(transparent)]
    Address(#[from] InvalidAddress),
    /// Registering needs the token.
    #[error("--registry is set but --registry-token (BREWMESH_REGISTRY_TOKEN) is not")]
    NoToken,
    /// The listener's address cannot be reached by others.
    #[error("listening on {0}, which others cannot reach: set --advertise-addr")]
    Unroutable(std::net::SocketAddr),
}

/// This process's registrations, one per (registry replica, service).
#[derive(Debug)]
pub struct Registration {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    leases: Arc<std::sync::Mutex<HashMap<(String, String), String>>>,
    clients: Vec<(String, RegistryClient<Channel>)>,
    token: Secret,
}

impl Registration {
    /// Registers `services` served at `listening` with every registry in
    /// `args`, and keeps the leases alive until [`Self::deregister`].
    pub fn start(
        args: &RegistryArgs,
        listening: std::net::SocketAddr,
        services: &[&str],
    ) -> Result<Self, RegistrationError> {
        let token = args.token.clone().ok_or(RegistrationError::NoToken)?;
        let address = match &args.advertise_addr {
            Some(address) => address.clone(),
            None if listening.ip().is_unspecified() => {
                return Err(RegistrationError::Unroutable(listening));
            }
            None => listening.to_string(),
        };
        // The random tail of a UUIDv7 tells this process apart.
        let suffix = uuid::Uuid::now_v7().simple().to_string();
        let stop = CancellationToken::new();
        let leases = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let mut clients = Vec::new();
        let mut tasks = Vec::new();
        for registry in &args.registries {
            let client = RegistryClient::new(connect_lazy(&endpoint(registry)?));
            clients.push((registry.clone(), client.clone()));
            for service in services {
                let instance = Instance {
                    instance_id: format!("{}-{}", role(service), &suffix[24..]),
                    service: (*service).to_owned(),
                    address: address.clone(),
                    zone: args.zone.clone(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    ..Default::default()
                };
                tasks.push(tokio::spawn(keep_registered(
                    client.clone(),
                    registry.clone(),
                    instance,
                    args.lease_ttl,
                    token.clone(),
                    Arc::clone(&leases),
                    stop.clone(),
                )));
            }
        }
        Ok(Self {
            stop,
            tasks,
            leases,
            clients,
            token,
        })
    }

    /// Stops renewing and removes every lease (each registry gets one
    /// second to answer; a lease it misses runs out on its own).
    pub async fn deregister(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        let leases: Vec<((String, String), String)> = self
            .leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        let calls = leases.into_iter().filter_map(|((registry, _), lease_id)| {
            let (_, client) = self.clients.iter().find(|(r, _)| *r == registry)?;
            let mut client = client.clone();
            let request = authorized(DeregisterRequest { lease_id }, &self.token);
            Some(async move {
                tokio::time::timeout(Duration::from_secs(1), client.deregister(request)).await
            })
        });
        for call in calls.collect::<Vec<_>>() {
            if !matches!(call.await, Ok(Ok(_))) {
                tracing::debug!(
                    "a registry did not confirm deregistration; the lease will run out"
                );
            }
        }
        tracing::info!("deregistered");
    }
}

/// `brewmesh.payment.v1.Payments` → `payment`.
fn role(service: &str) -> &str {
    service.split('.').nth(1).unwrap_or(service)
}

fn authorized<T>(message: T, token: &Secret) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(value) = format!("Bearer {}", token.expose()).parse() {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// Registers `instance` with one registry and renews the lease until
/// `stop`; registers again whenever the lease is lost.
async fn keep_registered(
    mut client: RegistryClient<Channel>,
    registry: String,
    instance: Instance,
    ttl: Duration,
    token: Secret,
    leases: Arc<std::sync::Mutex<HashMap<(String, String), String>>>,
    stop: CancellationToken,
) {
    let key = (registry.clone(), instance.service.clone());
    let mut backoff = Duration::from_millis(100);
    let mut failing = false;
    loop {
        let attempt = async {
            let request = RegisterRequest {
                instance: Some(instance.clone()),
                ttl: prost_types::Duration::try_from(ttl).ok(),
            };
            let granted = match client.register(authorized(request, &token)).await {
                Ok(granted) => granted.into_inner(),
                Err(status) => return status,
            };
            leases
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.clone(), granted.lease_id.clone());
            tracing::info!(%registry, grpc_service = %instance.service, lease_id = %granted.lease_id, "registered");
            let ttl = granted
                .ttl
                .and_then(|t| Duration::try_from(t).ok())
                .unwrap_or(ttl);
            renew(&mut client, &granted.lease_id, ttl, &token).await
        };
        let status = tokio::select! {
            status = attempt => status,
            () = stop.cancelled() => return,
        };
        leases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        if status.code() == tonic::Code::Unauthenticated {
            tracing::error!(%registry, "the registry refused the token");
        } else if !failing {
            tracing::warn!(%registry, code = ?status.code(), message = status.message(), "lost the registry; registering again");
        }
        failing = true;
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
        if status.code() == tonic::Code::NotFound {
            backoff = Duration::from_millis(100); // the registry is there: go at once
        }
    }
}

/// Renews `lease_id` every third of its TTL until the registry says no or
/// the stream breaks; returns why.
async fn renew(
    client: &mut RegistryClient<Channel>,
    lease_id: &str,
    ttl: Duration,
    token: &Secret,
) -> tonic::Status {
    let (tx, rx) = mpsc::channel(1);
    let mut answers = match client
        .keep_alive(authorized(ReceiverStream::new(rx), token))
        .await
    {
        Ok(answers) => answers.into_inner(),
        Err(status) => return status,
    };
    let mut tick = tokio::time::interval(ttl / 3);
    loop {
        tick.tick().await;
        if tx
            .send(KeepAliveRequest {
                lease_id: lease_id.to_owned(),
            })
            .await
            .is_err()
        {
            return tonic::Status::unavailable("keepalive stream closed");
        }
        match tokio::time::timeout(ttl / 3, answers.message()).await {
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => return tonic::Status::unavailable("keepalive stream ended"),
            Ok(Err(status)) => return status,
            Err(_) => return tonic::Status::deadline_exceeded("keepalive unanswered"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_come_from_the_package() {
        assert_eq!(role("brewmesh.payment.v1.Payments"), "payment");
        assert_eq!(role("Plain"), "Plain");
    }
}
