//! Finding peers and being found: registration with the registry, and
//! client channels balanced over whatever a resolver reports.
//!
//! # Registration
//!
//! An instance registers with **every** registry replica and keeps each
//! lease alive over its own KeepAlive stream. When a replica forgets the
//! lease (it restarted) or goes away, that replica's loop registers again
//! with backoff, so registration resumes by itself when a registry returns.
//! Replicas share nothing; each knows every instance from the instances
//! themselves.
//!
//! # Resolution
//!
//! A [`Source`] yields the set of addresses of a service: a fixed list, a
//! DNS name (a Kubernetes headless Service), or the registry. The registry
//! resolver watches every replica at once and uses the union of their
//! healthy sets: a replica that just restarted and knows only part of the
//! picture cannot shrink it. While no replica answers, and whenever the
//! union would become empty, the last known set stays in use.
//!
//! # Balancing
//!
//! Address sets become a tower `Discover` stream; each endpoint is a lazily
//! connecting tonic `Channel`, wrapped in `PeakEwma` (tonic channels have no
//! `Load`), balanced by power-of-two-choices, behind a `Buffer` so the
//! result is cheap to clone.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, WatchStream};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::Channel;
use tower::Layer as _;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::Change;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover};
use tower::util::BoxCloneSyncService;

use crate::client::{InvalidAddress, endpoint};
use crate::ejection::{Ejecting, Ejections};
use crate::instrument::ClientLayer;
use crate::pb::registry::v1::registry_client::RegistryClient;
use crate::pb::registry::v1::{
    DeregisterRequest, Instance, KeepAliveRequest, RegisterRequest, WatchRequest,
};
use crate::secret::Secret;
use crate::server::parse_duration;

/// The longest wait between two attempts to reach a registry.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A balanced channel: clone it freely, one per client.
///
/// A newtype with a concrete error type, rather than a boxed service with
/// `BoxError`: tonic clients over a `Box<dyn Error>` error leave the
/// compiler unable to prove their futures `Send` in generic code.
#[derive(Clone)]
pub struct Balanced(
    BoxCloneSyncService<http::Request<Body>, http::Response<Body>, tower::BoxError>,
);

impl std::fmt::Debug for Balanced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Balanced")
    }
}

/// A call through a [`Balanced`] channel failed below gRPC (no endpoint,
/// connection refused, …); the cause is its `source()`.
#[derive(Debug)]
pub struct CallError(tower::BoxError);

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "balanced call failed: {}", self.0)
    }
}

impl std::error::Error for CallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

impl tower::Service<http::Request<Body>> for Balanced {
    type Response = http::Response<Body>;
    type Error = CallError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, CallError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), CallError>> {
        self.0.poll_ready(cx).map_err(CallError)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let call = self.0.call(request);
        Box::pin(async move { call.await.map_err(CallError) })
    }
}

/// The set of addresses a service has now.
pub type Addresses = Arc<BTreeSet<String>>;

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
            let client = RegistryClient::new(endpoint(registry)?.connect_lazy());
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

/// Where a caller learns a service's addresses.
#[derive(Debug, Clone)]
pub enum Source {
    /// A fixed list of `host:port` addresses.
    Static(Vec<String>),
    /// A DNS name (`host:port`), looked up again every `every`; on
    /// Kubernetes, a headless Service.
    Dns {
        /// `host:port` to look up.
        name: String,
        /// How often to look it up.
        every: Duration,
    },
    /// The registry's healthy instances of `service`.
    Registry {
        /// The registry replicas, all watched at once.
        registries: Vec<String>,
        /// The gRPC service name.
        service: String,
    },
}

/// Follows `source`; the receiver always holds its latest address set.
/// Must be called inside a Tokio runtime.
pub fn resolve(source: Source) -> Result<watch::Receiver<Addresses>, InvalidAddress> {
    match source {
        Source::Static(addresses) => {
            for address in &addresses {
                endpoint(address)?;
            }
            let (tx, rx) = watch::channel(Arc::new(addresses.into_iter().collect()));
            // The sender must live, or the receiver reports a closed channel.
            tokio::spawn(async move { tx.closed().await });
            Ok(rx)
        }
        Source::Dns { name, every } => {
            let (tx, rx) = watch::channel(Addresses::default());
            tokio::spawn(follow_dns(name, every, tx));
            Ok(rx)
        }
        Source::Registry {
            registries,
            service,
        } => {
            let clients = registries
                .iter()
                .map(|r| Ok((r.clone(), RegistryClient::new(endpoint(r)?.connect_lazy()))))
                .collect::<Result<Vec<_>, InvalidAddress>>()?;
            let (tx, rx) = watch::channel(Addresses::default());
            tokio::spawn(follow_registries(clients, service, tx));
            Ok(rx)
        }
    }
}

async fn follow_dns(name: String, every: Duration, tx: watch::Sender<Addresses>) {
    loop {
        match tokio::net::lookup_host(name.as_str()).await {
            Ok(found) => {
                let found: BTreeSet<String> = found.map(|a| a.to_string()).collect();
                if !found.is_empty() && **tx.borrow() != found {
                    tracing::info!(%name, addresses = ?found, "dns endpoints changed");
                    tx.send_replace(Arc::new(found));
                }
            }
            Err(error) => {
                tracing::warn!(%name, %error, "dns lookup failed; keeping the last endpoints")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = tx.closed() => return,
        }
    }
}

/// Watches every registry replica; publishes the union of what the
/// connected ones report.
async fn follow_registries(
    clients: Vec<(String, RegistryClient<Channel>)>,
    service: String,
    tx: watch::Sender<Addresses>,
) {
    // Each replica's latest set, `None` while it is not connected.
    let (updates_tx, mut updates) = mpsc::channel::<(usize, Option<BTreeSet<String>>)>(16);
    for (index, (registry, client)) in clients.into_iter().enumerate() {
        tokio::spawn(watch_replica(
            index,
            registry,
            client,
            service.clone(),
            updates_tx.clone(),
        ));
    }
    drop(updates_tx);
    let mut sets: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    loop {
        let update = tokio::select! {
            update = updates.recv() => update,
            () = tx.closed() => return,
        };
        let Some((index, set)) = update else { return };
        match set {
            Some(set) => sets.insert(index, set),
            None => sets.remove(&index),
        };
        let union: BTreeSet<String> = sets.values().flatten().cloned().collect();
        if union.is_empty() && !tx.borrow().is_empty() {
            // No replica answers, or none knows an instance yet (they just
            // restarted): keep calling the ones we knew.
            continue;
        }
        if **tx.borrow() != union {
            tracing::info!(grpc_service = %service, addresses = ?union, "endpoints changed");
            tx.send_replace(Arc::new(union));
        }
    }
}

async fn watch_replica(
    index: usize,
    registry: String,
    mut client: RegistryClient<Channel>,
    service: String,
    updates: mpsc::Sender<(usize, Option<BTreeSet<String>>)>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = async {
            let mut stream = client
                .watch(WatchRequest {
                    service: service.clone(),
                })
                .await?
                .into_inner();
            while let Some(update) = stream.message().await? {
                backoff = Duration::from_millis(100);
                let set = update.instances.into_iter().map(|i| i.address).collect();
                if updates.send((index, Some(set))).await.is_err() {
                    return Ok(());
                }
            }
            Err(tonic::Status::unavailable("watch ended"))
        };
        let status: Result<(), tonic::Status> = result.await;
        if status.is_ok() || updates.send((index, None)).await.is_err() {
            return; // nobody listens any more
        }
        if let Err(status) = status {
            tracing::debug!(%registry, code = ?status.code(), "registry watch broke; retrying");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// How a balanced channel picks an endpoint for each call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Balancing {
    /// Power of two random choices, the one with less peak-EWMA latency ×
    /// in-flight calls: slow or busy endpoints get less.
    #[default]
    P2c,
    /// Each endpoint in turn, however it performs (the baseline).
    RoundRobin,
}

/// A channel balanced over the addresses `source` reports: P2C over
/// peak-EWMA latency. Must be called inside a Tokio runtime.
pub fn balanced(source: Source) -> Result<Balanced, InvalidAddress> {
    balanced_with(source, Balancing::P2c)
}

/// A channel balanced over the addresses `source` reports, by `balancing`.
/// Must be called inside a Tokio runtime.
pub fn balanced_with(source: Source, balancing: Balancing) -> Result<Balanced, InvalidAddress> {
    let addresses = resolve(source)?;
    let changes = Changes {
        updates: WatchStream::new(addresses),
        current: BTreeSet::new(),
        pending: VecDeque::new(),
        ejections: Arc::default(),
    };
    if balancing == Balancing::RoundRobin {
        let round_robin = RoundRobin {
            changes,
            endpoints: Vec::new(),
            next: 0,
        };
        return Ok(Balanced(BoxCloneSyncService::new(
            ClientLayer.layer(Buffer::new(round_robin, 1024)),
        )));
    }
    // A new endpoint's first guess is optimistic (1 ms): P2C compares loads,
    // so a pessimistic guess would starve a new replica of the very traffic
    // that measures it; the first response replaces the guess. Decay: a
    // latency peak counts at once and fades with a 1 s time constant. With
    // 10 s, one spike on a fast replica sent traffic to a slow one for
    // seconds: 4-5% of calls reached a +50 ms replica with 10 s, 2-4% with
    // 1 s, and 300 ms was no better (BENCHMARKS.md, balancing).
    let discover = PeakEwmaDiscover::new(
        changes,
        Duration::from_millis(1),
        Duration::from_secs(1),
        CompleteOnResponse::default(),
    );
    let balance = Balance::new(discover);
    // Requests beyond this many queue in callers instead of here.
    // Traced outside the buffer: the client span covers the wait for an
    // endpoint, as the caller sees it.
    Ok(Balanced(BoxCloneSyncService::new(
        ClientLayer.layer(Buffer::new(balance, 1024)),
    )))
}

/// Round robin over the discovered endpoints.
struct RoundRobin {
    changes: Changes,
    endpoints: Vec<(String, Ejecting<Channel>)>,
    next: usize,
}

impl tower::Service<http::Request<Body>> for RoundRobin {
    type Response = http::Response<Body>;
    type Error = tower::BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        while let Poll::Ready(Some(Ok(change))) = Pin::new(&mut self.changes).poll_next(cx) {
            match change {
                Change::Insert(key, endpoint) => {
                    self.endpoints.retain(|(k, _)| *k != key);
                    self.endpoints.push((key, endpoint));
                }
                Change::Remove(key) => self.endpoints.retain(|(k, _)| *k != key),
            }
        }
        // The next endpoint in turn that is ready (not ejected, connected).
        let count = self.endpoints.len();
        for offset in 0..count {
            let index = (self.next + offset) % count;
            if let Poll::Ready(Ok(())) =
                tower::Service::poll_ready(&mut self.endpoints[index].1, cx)
            {
                self.next = index;
                return Poll::Ready(Ok(()));
            }
        }
        // None ready: each one polled (or the discovery stream) will wake us.
        Poll::Pending
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let index = self.next;
        self.next = self.next.wrapping_add(1);
        match self.endpoints.get_mut(index) {
            Some((_, endpoint)) => {
                let call = tower::Service::call(endpoint, request);
                Box::pin(async move { Ok(call.await?) })
            }
            None => Box::pin(async { Err("no endpoint".into()) }),
        }
    }
}

/// Turns successive address sets into tower `Change`s.
struct Changes {
    updates: WatchStream<Addresses>,
    current: BTreeSet<String>,
    pending: VecDeque<Change<String, Ejecting<Channel>>>,
    ejections: Arc<Ejections>,
}

impl Stream for Changes {
    type Item = Result<Change<String, Ejecting<Channel>>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            let Some(next) = std::task::ready!(Pin::new(&mut self.updates).poll_next(cx)) else {
                return Poll::Ready(None);
            };
            let this = &mut *self;
            for gone in this.current.difference(&next) {
                this.pending.push_back(Change::Remove(gone.clone()));
            }
            for new in next.difference(&this.current) {
                match endpoint(new) {
                    Ok(endpoint) => {
                        let endpoint = Ejecting::new(
                            endpoint.connect_lazy(),
                            new.clone(),
                            Arc::clone(&this.ejections),
                        );
                        this.pending
                            .push_back(Change::Insert(new.clone(), endpoint));
                    }
                    Err(error) => tracing::warn!(address = %new, %error, "skipping an endpoint"),
                }
            }
            this.current = next.as_ref().clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn a_dns_name_resolves_to_its_addresses_and_a_static_list_to_itself() {
        let source = Source::Dns {
            name: "localhost:4242".into(),
            every: Duration::from_secs(60),
        };
        let mut dns = resolve(source).unwrap();
        let found =
            tokio::time::timeout(Duration::from_secs(10), dns.wait_for(|set| !set.is_empty()))
                .await
                .expect("localhost resolves")
                .unwrap()
                .clone();
        assert!(
            found
                .iter()
                .all(|a| a == "127.0.0.1:4242" || a == "[::1]:4242"),
            "{found:?}"
        );

        let fixed = resolve(Source::Static(vec![
            "127.0.0.1:1".into(),
            "127.0.0.1:2".into(),
        ]))
        .unwrap();
        assert_eq!(fixed.borrow().len(), 2);
        assert!(resolve(Source::Static(vec!["not an address".into()])).is_err());
    }

    #[test]
    fn roles_come_from_the_package() {
        assert_eq!(role("brewmesh.payment.v1.Payments"), "payment");
        assert_eq!(role("Plain"), "Plain");
    }

    #[tokio::test]
    async fn address_changes_become_inserts_and_removes() {
        let (tx, rx) = watch::channel(Arc::new(BTreeSet::from([
            "127.0.0.1:1".to_owned(),
            "127.0.0.1:2".to_owned(),
        ])));
        let mut changes = Changes {
            updates: WatchStream::new(rx),
            current: BTreeSet::new(),
            pending: VecDeque::new(),
            ejections: Arc::default(),
        };
        let mut inserted = Vec::new();
        for _ in 0..2 {
            match changes.next().await.unwrap().unwrap() {
                Change::Insert(key, _) => inserted.push(key),
                Change::Remove(key) => panic!("removed {key}"),
            }
        }
        assert_eq!(inserted, ["127.0.0.1:1", "127.0.0.1:2"]);
        tx.send_replace(Arc::new(BTreeSet::from([
            "127.0.0.1:2".to_owned(),
            "127.0.0.1:3".to_owned(),
        ])));
        let mut seen = Vec::new();
        for _ in 0..2 {
            seen.push(match changes.next().await.unwrap().unwrap() {
                Change::Insert(key, _) => format!("+{key}"),
                Change::Remove(key) => format!("-{key}"),
            });
        }
        assert_eq!(seen, ["-127.0.0.1:1", "+127.0.0.1:3"]);
    }
}
