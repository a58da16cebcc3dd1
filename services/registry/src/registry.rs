//! The registry's soft state: leases, the instances they hold, their health,
//! and the set each service's watchers see.
//!
//! One std mutex guards it all: every critical section is a few map
//! operations with no await inside, so contention stays below the cost of
//! anything finer. Watchers get a `tokio::sync::watch` channel per service
//! holding the current healthy set; a change is published only when that
//! set really changes (not on every renewal).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use brewmesh::pb::registry::v1::{HealthStatus, Instance, ServiceSummary};

/// The healthy instances of one service, as watchers see them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Increases with every change the registry publishes.
    pub revision: i64,
    /// Healthy instances, ordered by instance id.
    pub instances: Arc<Vec<Instance>>,
}

#[derive(Debug)]
struct Entry {
    instance: Instance,
    ttl: Duration,
    expires: Instant,
    health: HealthStatus,
    /// Stops this instance's health follower.
    follower: CancellationToken,
}

#[derive(Debug, Default)]
struct State {
    leases: HashMap<String, Entry>,
    /// (service, instance id) → lease id: a re-registration replaces.
    by_instance: HashMap<(String, String), String>,
    watchers: HashMap<String, watch::Sender<Snapshot>>,
    revision: i64,
}

/// A new lease, and the follower token of the lease it replaced, if any.
#[derive(Debug)]
pub struct Granted {
    /// The lease id.
    pub lease_id: String,
    /// When it runs out unless renewed.
    pub ttl: Duration,
    /// Cancelled when the lease ends: the health follower's stop signal.
    pub follower: CancellationToken,
}

/// The registry's state.
#[derive(Debug, Default)]
pub struct Registry {
    state: Mutex<State>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many instances each service has, by health.
    pub fn counts(&self) -> Vec<(String, HealthStatus, usize)> {
        let mut counts: HashMap<(String, HealthStatus), usize> = HashMap::new();
        for entry in self.lock().leases.values() {
            *counts
                .entry((entry.instance.service.clone(), entry.health))
                .or_default() += 1;
        }
        counts
            .into_iter()
            .map(|((service, health), n)| (service, health, n))
            .collect()
    }

    /// Adds `instance` under a new lease of `ttl`, replacing an earlier
    /// lease of the same instance. Its health is unknown until its follower
    /// reports, so it is not resolvable yet.
    pub fn register(&self, instance: Instance, ttl: Duration) -> Granted {
        let lease_id = brewmesh_runtime::ids::new("lease");
        let follower = CancellationToken::new();
        let key = (instance.service.clone(), instance.instance_id.clone());
        let mut state = self.lock();
        if let Some(old) = state.by_instance.insert(key, lease_id.clone())
            && let Some(old) = state.leases.remove(&old)
        {
            old.follower.cancel();
        }
        let service = instance.service.clone();
        state.leases.insert(
            lease_id.clone(),
            Entry {
                instance,
                ttl,
                expires: Instant::now() + ttl,
                health: HealthStatus::Unspecified,
                follower: follower.clone(),
            },
        );
        // A replaced lease may have been serving: republish.
        publish(&mut state, &service);
        Granted {
            lease_id,
            ttl,
            follower,
        }
    }

    /// Renews a lease; `None` if it is unknown or expired.
    pub fn renew(&self, lease_id: &str) -> Option<SystemTime> {
        let mut state = self.lock();
        let entry = state.leases.get_mut(lease_id)?;
        entry.expires = Instant::now() + entry.ttl;
        Some(SystemTime::now() + entry.ttl)
    }

    /// Removes a lease; whether it existed.
    pub fn deregister(&self, lease_id: &str) -> bool {
        let mut state = self.lock();
        let Some(entry) = remove(&mut state, lease_id) else {
            return false;
        };
        publish(&mut state, &entry.instance.service);
        true
    }

    /// Records what a lease's instance answered its health check.
    pub fn set_health(&self, lease_id: &str, health: HealthStatus) {
        let mut state = self.lock();
        let Some(entry) = state.leases.get_mut(lease_id) else {
            return;
        };
        if entry.health == health {
            return;
        }
        entry.health = health;
        let service = entry.instance.service.clone();
        tracing::info!(lease_id, instance_id = %entry.instance.instance_id, address = %entry.instance.address, ?health, "instance health changed");
        publish(&mut state, &service);
    }

    /// Drops every lease that ran out; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut state = self.lock();
        let expired: Vec<String> = state
            .leases
            .iter()
            .filter(|(_, e)| e.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for lease_id in &expired {
            if let Some(entry) = remove(&mut state, lease_id) {
                tracing::info!(lease_id, instance_id = %entry.instance.instance_id, "lease expired");
                publish(&mut state, &entry.instance.service);
            }
        }
        // A name nobody watches any more is forgotten: anyone may watch
        // any made-up name, and each would otherwise stay for good. A new
        // watch starts again from the current set.
        state
            .watchers
            .retain(|_, sender| sender.receiver_count() > 0);
        // And the table they took is given back once it is mostly empty.
        if state.watchers.capacity() > 4 * state.watchers.len().max(256) {
            state.watchers.shrink_to_fit();
        }
        expired.len()
    }

    /// The healthy instances of `service`, with their lease expiry.
    pub fn resolve(&self, service: &str) -> Vec<Instance> {
        let state = self.lock();
        let now = (Instant::now(), SystemTime::now());
        serving(&state, service)
            .map(|e| Instance {
                lease_expire_time: Some(
                    (now.1 + e.expires.saturating_duration_since(now.0)).into(),
                ),
                ..e.instance.clone()
            })
            .collect()
    }

    /// Every instance (of `service` only, when given), healthy or not, with
    /// its health and lease expiry, by service and instance id.
    pub fn list(&self, service: Option<&str>) -> Vec<Instance> {
        let state = self.lock();
        let now = (Instant::now(), SystemTime::now());
        let mut instances: Vec<Instance> = state
            .leases
            .values()
            .filter(|e| service.is_none_or(|s| e.instance.service == s))
            .map(|e| Instance {
                health: e.health.into(),
                lease_expire_time: Some(
                    (now.1 + e.expires.saturating_duration_since(now.0)).into(),
                ),
                ..e.instance.clone()
            })
            .collect();
        instances.sort_by(|a, b| (&a.service, &a.instance_id).cmp(&(&b.service, &b.instance_id)));
        instances
    }

    /// A receiver of `service`'s healthy set, starting with the current one.
    pub fn watch(&self, service: &str) -> watch::Receiver<Snapshot> {
        let mut state = self.lock();
        if !state.watchers.contains_key(service) {
            let snapshot = Snapshot {
                revision: state.revision,
                instances: Arc::new(healthy(&state, service)),
            };
            state
                .watchers
                .insert(service.to_owned(), watch::channel(snapshot).0);
        }
        state.watchers[service].subscribe()
    }

    /// Every service with a lease, with its instance counts.
    pub fn services(&self) -> Vec<ServiceSummary> {
        let state = self.lock();
        let mut summaries: HashMap<&str, ServiceSummary> = HashMap::new();
        for entry in state.leases.values() {
            let summary =
                summaries
                    .entry(&entry.instance.service)
                    .or_insert_with(|| ServiceSummary {
                        service: entry.instance.service.clone(),
                        ..Default::default()
                    });
            summary.instances += 1;
            if entry.health == HealthStatus::Serving {
                summary.serving += 1;
            }
        }
        let mut summaries: Vec<_> = summaries.into_values().collect();
        summaries.sort_by(|a, b| a.service.cmp(&b.service));
        summaries
    }
}

fn remove(state: &mut State, lease_id: &str) -> Option<Entry> {
    let entry = state.leases.remove(lease_id)?;
    entry.follower.cancel();
    let key = (
        entry.instance.service.clone(),
        entry.instance.instance_id.clone(),
    );
    if state.by_instance.get(&key).is_some_and(|l| l == lease_id) {
        state.by_instance.remove(&key);
    }
    Some(entry)
}

/// The serving leases of `service`, ordered by instance id: what Resolve
/// and Watch both show.
fn serving<'a>(state: &'a State, service: &str) -> impl Iterator<Item = &'a Entry> {
    let mut entries: Vec<&Entry> = state
        .leases
        .values()
        .filter(|e| e.instance.service == service && e.health == HealthStatus::Serving)
        .collect();
    entries.sort_by(|a, b| a.instance.instance_id.cmp(&b.instance.instance_id));
    entries.into_iter()
}

fn healthy(state: &State, service: &str) -> Vec<Instance> {
    serving(state, service)
        .map(|e| e.instance.clone())
        .collect()
}

/// Sends `service`'s healthy set to its watchers if it changed.
fn publish(state: &mut State, service: &str) {
    let instances = healthy(state, service);
    let Some(sender) = state.watchers.get(service) else {
        return;
    };
    if *sender.borrow().instances == instances {
        return;
    }
    state.revision += 1;
    let snapshot = Snapshot {
        revision: state.revision,
        instances: Arc::new(instances),
    };
    sender.send_replace(snapshot);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str) -> Instance {
        Instance {
            instance_id: id.into(),
            service: "svc".into(),
            address: format!("127.0.0.1:{}", id.len()),
            ..Default::default()
        }
    }

    #[test]
    fn an_instance_is_resolvable_only_while_serving() {
        let registry = Registry::default();
        let lease = registry
            .register(instance("a"), Duration::from_secs(10))
            .lease_id;
        assert!(registry.resolve("svc").is_empty(), "not checked yet");
        registry.set_health(&lease, HealthStatus::Serving);
        assert_eq!(registry.resolve("svc").len(), 1);
        registry.set_health(&lease, HealthStatus::NotServing);
        assert!(registry.resolve("svc").is_empty());
        assert_eq!(registry.services()[0].instances, 1);
        assert_eq!(registry.services()[0].serving, 0);
    }

    #[test]
    fn watchers_see_changes_but_not_renewals() {
        let registry = Registry::default();
        let mut rx = registry.watch("svc");
        let lease = registry
            .register(instance("a"), Duration::from_secs(10))
            .lease_id;
        registry.set_health(&lease, HealthStatus::Serving);
        assert!(rx.has_changed().unwrap());
        let seen = rx.borrow_and_update().clone();
        assert_eq!(seen.instances.len(), 1);
        registry.renew(&lease);
        assert!(!rx.has_changed().unwrap());
        assert!(registry.deregister(&lease));
        assert!(rx.borrow_and_update().instances.is_empty());
    }

    #[test]
    fn names_nobody_watches_any_more_are_forgotten() {
        let registry = Registry::default();
        let kept = registry.watch("svc");
        let made_up: Vec<_> = (0..40_000)
            .map(|n| registry.watch(&format!("made-up-{n}")))
            .collect();
        assert_eq!(registry.lock().watchers.len(), 40_001);
        drop(made_up);
        registry.expire(Instant::now());
        assert_eq!(registry.lock().watchers.len(), 1);
        // The one still watched still gets the changes.
        let lease = registry
            .register(instance("a"), Duration::from_secs(10))
            .lease_id;
        registry.set_health(&lease, HealthStatus::Serving);
        assert!(kept.has_changed().unwrap());
    }

    #[test]
    fn expired_leases_are_dropped_and_reregistration_replaces() {
        let registry = Registry::default();
        let first = registry.register(instance("a"), Duration::from_secs(10));
        let second = registry.register(instance("a"), Duration::from_secs(10));
        assert!(
            first.follower.is_cancelled(),
            "the replaced lease's follower stops"
        );
        assert!(registry.renew(&first.lease_id).is_none());
        registry.set_health(&second.lease_id, HealthStatus::Serving);
        assert_eq!(registry.expire(Instant::now()), 0);
        assert_eq!(registry.expire(Instant::now() + Duration::from_secs(11)), 1);
        assert!(registry.resolve("svc").is_empty());
        assert!(second.follower.is_cancelled());
    }
}
