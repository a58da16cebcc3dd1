//! Keeping the mesh up, as Kubernetes keeps a pod: a child that exits
//! unexpectedly is started again on the address it had, after a backoff
//! that grows with each restart in a row (the other replicas serve
//! meanwhile). A role that keeps dying — [`MAX_RESTARTS`] within
//! [`WINDOW`] — is a restart storm: reported, and the mesh stops rather
//! than spin. A signal stops everything, cleanly, at any point.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use anyhow::bail;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::child::{Exit, Instance, Launch, start};

/// Restarts of one role allowed within [`WINDOW`].
pub(super) const MAX_RESTARTS: usize = 5;
/// The window [`MAX_RESTARTS`] counts in.
pub(super) const WINDOW: Duration = Duration::from_secs(60);
/// The wait before the first restart in a row; it doubles with each.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// Recent restarts, by label.
#[derive(Debug, Default)]
pub(super) struct Restarts(HashMap<String, VecDeque<Instant>>);

impl Restarts {
    /// Counts a restart of `label` now: the wait before it, or `None` when
    /// this one would make a storm.
    pub(super) fn next(&mut self, label: &str, now: Instant) -> Option<Duration> {
        let recent = self.0.entry(label.to_owned()).or_default();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > WINDOW)
        {
            recent.pop_front();
        }
        if recent.len() >= MAX_RESTARTS {
            return None;
        }
        let wait = FIRST_BACKOFF
            .saturating_mul(1 << recent.len().min(16))
            .min(MAX_BACKOFF);
        recent.push_back(now);
        Some(wait)
    }
}

/// The arguments of `role` with its `--listen` set to `addr`: a restarted
/// child keeps the address its peers know.
fn listening_on(role: &[String], addr: std::net::SocketAddr) -> Vec<String> {
    let mut role = role.to_vec();
    if let Some(i) = role.iter().position(|a| a == "--listen")
        && let Some(value) = role.get_mut(i + 1)
    {
        *value = addr.to_string();
    }
    role
}

/// Restarts children as they exit until `signal` (`Ok`) or a restart
/// storm (an error).
pub(super) async fn supervise(
    launch: &Launch<'_>,
    instances: &mut [Instance],
    exits: &mut mpsc::Receiver<Exit>,
    signal: &mut tokio::task::JoinHandle<&'static str>,
) -> anyhow::Result<()> {
    let mut restarts = Restarts::default();
    loop {
        let (label, pid, status) = tokio::select! {
            name = &mut *signal => {
                eprintln!("\n{} received: stopping the mesh", name.unwrap_or("signal"));
                return Ok(());
            }
            Some(exit) = exits.recv() => exit,
        };
        let Some(slot) = instances
            .iter_mut()
            .find(|i| i.label == label && i.pid == pid)
        else {
            continue; // an instance already replaced
        };
        loop {
            let Some(wait) = restarts.next(&label, Instant::now()) else {
                bail!(
                    "{label} exited ({status}) {} times within {WINDOW:?}: a restart storm; stopping the mesh",
                    MAX_RESTARTS + 1
                );
            };
            eprintln!("{label} exited unexpectedly ({status}); restarting it in {wait:?}");
            tokio::select! {
                name = &mut *signal => {
                    eprintln!("\n{} received: stopping the mesh", name.unwrap_or("signal"));
                    return Ok(());
                }
                () = tokio::time::sleep(wait) => {}
            }
            let role = listening_on(&slot.role, slot.addr);
            match start(launch, &label, &role).await {
                Ok(instance) => {
                    eprintln!(
                        "{label} restarted (pid {}) on {}",
                        instance.pid, instance.addr
                    );
                    *slot = instance;
                    break;
                }
                Err(error) => eprintln!("{label} did not come back: {error:#}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_and_a_storm_is_refused() {
        let mut restarts = Restarts::default();
        let start = Instant::now();
        let waits: Vec<Option<Duration>> = (0..=MAX_RESTARTS)
            .map(|n| restarts.next("barista-1", start + Duration::from_secs(n as u64)))
            .collect();
        assert_eq!(waits[0], Some(FIRST_BACKOFF));
        assert_eq!(waits[1], Some(FIRST_BACKOFF * 2));
        assert_eq!(waits[MAX_RESTARTS], None, "a storm: {waits:?}");
        // Another role is counted on its own; and the window forgets.
        assert_eq!(restarts.next("payment-1", start), Some(FIRST_BACKOFF));
        let later = start + WINDOW + Duration::from_secs(MAX_RESTARTS as u64 + 1);
        assert_eq!(restarts.next("barista-1", later), Some(FIRST_BACKOFF));
    }

    #[test]
    fn a_restarted_child_listens_where_it_did() {
        let role: Vec<String> = [
            "barista",
            "--listen",
            "127.0.0.1:0",
            "--drain-timeout",
            "1s",
        ]
        .map(String::from)
        .to_vec();
        let addr = "127.0.0.1:4242".parse().unwrap();
        assert_eq!(
            listening_on(&role, addr),
            [
                "barista",
                "--listen",
                "127.0.0.1:4242",
                "--drain-timeout",
                "1s"
            ]
        );
    }
}
