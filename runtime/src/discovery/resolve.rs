//! Finding peers: a [`Source`] yields the set of addresses of a service: a
//! fixed list, a DNS name (a Kubernetes headless Service), or the registry.
//! The registry resolver watches every replica at once and uses the union
//! of their healthy sets: a replica that just restarted and knows only part
//! of the picture cannot shrink it. While no replica answers, and whenever
//! the union would become empty, the last known set stays in use.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use crate::client::{InvalidAddress, connect_lazy, endpoint};
use brewmesh::pb::registry::v1::WatchRequest;
use brewmesh::pb::registry::v1::registry_client::RegistryClient;
use brewmesh::pb::registry::v1::registry_server;

/// The set of addresses a service has now.
pub type Addresses = Arc<BTreeSet<String>>;

/// The longest wait between two attempts to reach a registry (to resolve,
/// or to register: `registration.rs` waits the same).
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(5);

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

impl Source {
    /// Where to find `service`, in the one order every role uses: the
    /// `addresses` given, else the `dns` name, else the registry (the
    /// registry itself is its `registries` list), else the default address
    /// of a brewmesh service; `None` when nothing applies.
    pub fn pick(
        service: &str,
        addresses: &[String],
        dns: Option<&str>,
        registries: &[String],
    ) -> Option<Source> {
        if !addresses.is_empty() {
            Some(Source::Static(addresses.to_vec()))
        } else if let Some(name) = dns {
            Some(Source::Dns {
                name: name.to_owned(),
                every: DNS_EVERY,
            })
        } else if service == registry_server::SERVICE_NAME && !registries.is_empty() {
            Some(Source::Static(registries.to_vec()))
        } else if !registries.is_empty() {
            Some(Source::Registry {
                registries: registries.to_vec(),
                service: service.to_owned(),
            })
        } else {
            crate::defaults::service_addr(service).map(|a| Source::Static(vec![a.to_owned()]))
        }
    }
}

/// How often a DNS name is looked up again.
const DNS_EVERY: Duration = Duration::from_secs(5);

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
                .map(|r| Ok((r.clone(), RegistryClient::new(connect_lazy(&endpoint(r)?)))))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_picks_its_source_in_one_order() {
        let payments = "brewmesh.payment.v1.Payments";
        let (given, registries) = (vec!["10.0.0.1:1".to_owned()], vec!["r:1".to_owned()]);
        let static_of = |s: Option<Source>| match s {
            Some(Source::Static(list)) => list,
            other => panic!("a static list, not {other:?}"),
        };
        assert_eq!(
            static_of(Source::pick(payments, &given, Some("dns:1"), &registries)),
            given
        );
        assert!(matches!(
            Source::pick(payments, &[], Some("dns:1"), &registries),
            Some(Source::Dns { name, .. }) if name == "dns:1"
        ));
        assert!(matches!(
            Source::pick(payments, &[], None, &registries),
            Some(Source::Registry { service, .. }) if service == payments
        ));
        assert_eq!(
            static_of(Source::pick(
                "brewmesh.registry.v1.Registry",
                &[],
                None,
                &registries
            )),
            registries
        );
        assert_eq!(
            static_of(Source::pick(payments, &[], None, &[])),
            [crate::defaults::PAYMENT_ADDR]
        );
        assert!(Source::pick("echo.v1.Echo", &[], None, &[]).is_none());
    }

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
}
