//! The orders' history as this process writes and follows it: every change
//! goes to the store, then to the watchers of that order in this process.
//!
//! A write here wakes that order's watchers only and hands them its events;
//! other processes' writes (replicas sharing the database) are heard at
//! once on PostgreSQL (LISTEN/NOTIFY), and found by one poll for all
//! watched orders on both databases. One broadcast of every order to every watcher,
//! or a poll per watcher, cost a busy shop most of its reads (BENCHMARKS.md,
//! "the barista's write path").

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use brewmesh::pb::barista::v1::{OrderEvent, OrderEventType as E};

use crate::store::{Change, OrderRecord, OrderStore};

/// The store, and who in this process follows which order.
#[derive(Debug)]
pub(crate) struct Journal {
    store: OrderStore,
    watched: Watched,
}

impl Journal {
    /// Writes to and reads from `store`.
    pub(crate) fn new(store: OrderStore) -> Self {
        Self {
            store,
            watched: Arc::default(),
        }
    }

    /// The store, for reads and for the writes watchers need not hear of.
    pub(crate) fn store(&self) -> &OrderStore {
        &self.store
    }

    /// Follows `order_id`'s writes in this process: [`OrderWatch::changed`]
    /// returns once there are new events since the last call (or since
    /// this one).
    pub(crate) fn watch(&self, order_id: &str) -> OrderWatch {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let receiver = watched
            .entry(order_id.into())
            .or_insert_with(|| watch::channel(Written::default()).0)
            .subscribe();
        OrderWatch {
            order_id: order_id.into(),
            receiver,
            watched: Arc::clone(&self.watched),
        }
    }

    /// Every `poll` until `stop`: finds the watched orders that other
    /// processes (replicas on the same database) wrote to, with one query
    /// per 500 orders, and wakes their watchers to read.
    pub(crate) async fn follow_others(self: Arc<Self>, poll: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let ids: Vec<Arc<str>> = self
                .watched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned()
                .collect();
            for chunk in ids.chunks(500) {
                let latest = match self.store.latest_sequences(chunk).await {
                    Ok(latest) => latest,
                    Err(error) => {
                        tracing::warn!(%error, "polling watched orders failed");
                        break;
                    }
                };
                let watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
                for (order_id, sequence) in latest {
                    stored_elsewhere(&watched, &order_id, sequence);
                }
            }
        }
    }

    /// Until `stop`, on PostgreSQL: hears every commit of order events
    /// (`LISTEN`; the store's trigger sends `order_id sequence` pairs) and
    /// wakes the watchers of those orders at once, so a watch served by one
    /// replica follows another's writes without waiting for the poll. The
    /// poll stays, for what a lost connection missed.
    pub(crate) async fn hear_others(self: Arc<Self>, url: String, stop: CancellationToken) {
        loop {
            let heard = self.listen(&url);
            let failed = tokio::select! {
                Err(error) = heard => error,
                () = stop.cancelled() => return,
            };
            tracing::warn!(error = %failed, "listening for other replicas' order events failed; polling until it is back");
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// Listens on [`crate::store::EVENTS_CHANNEL`] and wakes the watchers
    /// it names, until the connection fails.
    async fn listen(&self, url: &str) -> Result<std::convert::Infallible, sqlx::Error> {
        let mut listener = sqlx::postgres::PgListener::connect(url).await?;
        listener.listen(crate::store::EVENTS_CHANNEL).await?;
        loop {
            let notification = listener.recv().await?;
            let watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
            for pair in notification.payload().split(',') {
                if let Some((order_id, sequence)) = pair.split_once(' ')
                    && let Ok(sequence) = sequence.parse()
                {
                    stored_elsewhere(&watched, order_id, sequence);
                }
            }
        }
    }
}

/// Another process stored `order_id`'s events up to `sequence`: its
/// watchers here, if any, read them.
fn stored_elsewhere(
    watched: &HashMap<Arc<str>, watch::Sender<Written>>,
    order_id: &str,
    sequence: i64,
) {
    if let Some(sender) = watched.get(order_id) {
        sender.send_if_modified(|written| {
            let newer = sequence > written.latest;
            if newer {
                written.latest = sequence;
                written.events = Arc::from([]);
            }
            newer
        });
    }
}

/// The saga's writes and reads, and CancelOrder's write.
#[tonic::async_trait]
impl crate::saga::Orders for Journal {
    /// Applies `change` with `events`, and tells the order's watchers.
    /// `None` if the change's guard refused it.
    async fn record(
        &self,
        order_id: &str,
        events: &[(E, &str)],
        change: Change<'_>,
    ) -> Result<Option<Vec<OrderEvent>>, sqlx::Error> {
        let stored = self.store.record(order_id, events, change).await?;
        if let Some(stored) = &stored {
            for event in stored {
                // Per order and event: debug, since a busy shop writes
                // thousands a second.
                tracing::debug!(order_id, sequence = event.sequence, event = ?event.r#type(), state = ?event.state(), detail = %event.detail, "order event");
                let outcome = match event.r#type() {
                    E::Ready => Some("ready"),
                    E::Failed => Some("failed"),
                    E::Cancelled => Some("cancelled"),
                    _ => None,
                };
                if let Some(outcome) = outcome {
                    crate::observe::order_finished(outcome);
                }
            }
            let watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
            if let (Some(sender), Some(last)) = (watched.get(order_id), stored.last()) {
                sender.send_modify(|written| {
                    written.latest = written.latest.max(last.sequence);
                    written.events = Arc::from(stored.as_slice());
                });
            }
        }
        Ok(stored)
    }

    async fn get(&self, order_id: &str) -> Result<Option<OrderRecord>, sqlx::Error> {
        self.store.get(order_id).await
    }
}

/// What the watchers of an order are told; see [`Journal::watch`].
#[derive(Debug, Clone)]
pub(crate) struct Written {
    /// The events of this process's latest write of the order (empty after
    /// a poll found newer ones).
    pub(crate) events: Arc<[OrderEvent]>,
    /// The highest sequence known to be stored, by any process.
    pub(crate) latest: i64,
}

impl Default for Written {
    fn default() -> Self {
        Self {
            events: Arc::from([]),
            latest: 0,
        }
    }
}

/// Per watched order, what its watchers are told.
type Watched = Arc<Mutex<HashMap<Arc<str>, watch::Sender<Written>>>>;

/// One watcher's view of an order's writes in this process; see
/// [`Journal::watch`].
#[derive(Debug)]
pub(crate) struct OrderWatch {
    order_id: Arc<str>,
    receiver: watch::Receiver<Written>,
    watched: Watched,
}

impl OrderWatch {
    /// Returns when the order has news since the last call: the events of
    /// this process's latest write, and the highest sequence stored. Writes
    /// in between are not among the events: a watcher tells by their
    /// sequence numbers, and reads.
    pub(crate) async fn changed(&mut self) -> Written {
        // The sender lives in the map while this receiver does.
        if self.receiver.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.receiver.borrow_and_update().clone()
    }
}

impl Drop for OrderWatch {
    fn drop(&mut self) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        // The last watcher of the order takes its entry away.
        if watched
            .get(&self.order_id)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            watched.remove(&self.order_id);
        }
    }
}
