//! The shop: the orders, the stations and the payment service, and the
//! sagas this barista drives over them — which orders it holds, taking over
//! those of baristas that are gone, and placing new ones.
//!
//! A barista holds an order by a lease in the order's row, renewed every
//! third of its length; an order whose lease ran out is adopted by whoever
//! looks first (a replica, or this barista after a restart). The saga
//! itself is in [`crate::saga`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use brewmesh::pb::barista::v1::{MenuItem, Order};

use crate::error::BaristaError;
use crate::journal::Journal;
use crate::payments::Payments;
use crate::saga::{Begin, Saga};
use crate::stations::Stations;
use crate::store::{Inserted, InsertedAll, NewOrder, OrderRecord, OrderStore, Step};

/// Everything the handlers and the sagas share.
#[derive(Debug)]
pub(crate) struct Shop {
    journal: Arc<Journal>,
    pub(crate) stations: Stations,
    payments: Box<dyn Payments>,
    sagas: TaskTracker,
    /// Cancel tokens of the sagas running in this process, by order id. An
    /// entry is also the claim that this process drives the order.
    running: Mutex<HashMap<String, CancellationToken>>,
    /// This barista, as the `owner` of the orders it drives.
    owner: String,
    /// How long an order stays this barista's without a renewal.
    lease: Duration,
    /// The orders this barista may drive at once (`--max-orders`), and a
    /// permit for each running saga; `None`: no bound.
    bound: Option<(usize, Arc<Semaphore>)>,
    /// A permit for each order being placed now, from its key's lookup to
    /// its saga's start; see [`PLACING`].
    placing: Semaphore,
}

/// The orders that may be in placement at once, looking up their keys and
/// being stored: past this many, a placement is turned away before it
/// queues for the database. Otherwise a crowd at the door (3,000,000
/// customers at once, in batches, each coming back when turned away) holds
/// the order store's connection with lookups while the sagas wait behind
/// them to write, and the shop stops ending orders (BENCHMARKS.md, "The
/// talk's memory wall").
const PLACING: usize = 4096;

/// A running saga's share of the bound, given back when it ends.
type Slot = Option<OwnedSemaphorePermit>;

impl Shop {
    /// A shop over `store` and `stations`, paying through `payments`; its
    /// orders are leased for `lease` at a time, and at most `max_orders`
    /// driven at once.
    pub(crate) fn new(
        store: OrderStore,
        stations: Stations,
        payments: Box<dyn Payments>,
        lease: Duration,
        max_orders: Option<usize>,
    ) -> Self {
        Self {
            journal: Arc::new(Journal::new(store)),
            stations,
            payments,
            sagas: TaskTracker::new(),
            running: Mutex::new(HashMap::new()),
            owner: brewmesh_runtime::ids::new("barista"),
            lease,
            bound: max_orders.map(|orders| {
                let permits = orders.min(Semaphore::MAX_PERMITS);
                (permits, Arc::new(Semaphore::new(permits)))
            }),
            placing: Semaphore::new(PLACING),
        }
    }

    /// Places for `count` orders among those being placed now, or why not.
    fn placing(&self, count: usize) -> Result<SemaphorePermit<'_>, BaristaError> {
        let count = u32::try_from(count.min(PLACING)).unwrap_or(u32::MAX);
        self.placing
            .try_acquire_many(count)
            .map_err(|_| BaristaError::Crowded {
                placing: PLACING,
                retry_after: self.stations.espresso.duration,
            })
    }

    /// Room for `count` more sagas under the bound, taken now, or why not.
    fn room_for(&self, count: usize) -> Result<Slot, BaristaError> {
        let Some((orders, permits)) = &self.bound else {
            return Ok(None);
        };
        if count > *orders {
            return Err(BaristaError::BatchOverBound {
                needed: count,
                orders: *orders,
            });
        }
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        Arc::clone(permits)
            .try_acquire_many_owned(count)
            .map(Some)
            .map_err(|_| BaristaError::Busy {
                orders: *orders,
                retry_after: self.stations.espresso.duration,
            })
    }

    /// The orders' history, to write and to watch.
    pub(crate) fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    /// The order store, for reads.
    pub(crate) fn store(&self) -> &OrderStore {
        self.journal.store()
    }

    /// The end of a lease taken now, in micros.
    fn lease_until(&self) -> i64 {
        brewmesh_runtime::time::now_micros()
            .saturating_add(i64::try_from(self.lease.as_micros()).unwrap_or(i64::MAX))
    }

    /// The running sagas, to wait for while draining.
    pub(crate) fn sagas(&self) -> &TaskTracker {
        &self.sagas
    }

    /// Places `new` (a drink of `item`): a retry of an earlier request is
    /// answered with its order, before a full shop could turn it away; a new
    /// order takes its places at the stations, is stored, and its saga
    /// starts. With [`PLACING`] orders in placement already, neither is
    /// looked at: the request is turned away at the door.
    pub(crate) async fn place(
        self: &Arc<Self>,
        new: NewOrder,
        item: &MenuItem,
    ) -> Result<Order, BaristaError> {
        let _placing = self.placing(1)?;
        match self
            .store()
            .by_key(&new.idempotency_key, &new.fingerprint)
            .await?
        {
            Some(Inserted::Existing(order)) => return Ok(order),
            Some(Inserted::KeyReused) => return Err(BaristaError::KeyReused),
            Some(Inserted::New(_)) | None => {}
        }
        let slot = self.room_for(1)?;
        let admission = self
            .stations
            .try_admit(item.steamed_milk)
            .map_err(BaristaError::full)?;
        match self
            .store()
            .insert(new, &self.owner, self.lease_until())
            .await?
        {
            Inserted::New(record) => {
                let order = record.order.clone();
                tracing::info!(order_id = %order.order_id, item_id = %order.item_id, "order accepted");
                crate::observe::order_placed();
                self.start(record, Begin::Placed(admission), slot);
                Ok(order)
            }
            Inserted::Existing(order) => Ok(order),
            Inserted::KeyReused => Err(BaristaError::KeyReused),
        }
    }

    /// Places every order of `batch` (each a drink of the item beside it),
    /// all or none: an entry repeating an earlier request is answered with
    /// its order; the new ones each take their places at the stations —
    /// all of them, or the batch is turned away — and are stored in one
    /// transaction; then their sagas start. The orders come back in the
    /// batch's order. A batch that would take the orders in placement past
    /// [`PLACING`] is turned away at the door.
    pub(crate) async fn place_all(
        self: &Arc<Self>,
        batch: Vec<(NewOrder, &MenuItem)>,
    ) -> Result<Vec<Order>, BaristaError> {
        let _placing = self.placing(batch.len())?;
        let keys: Vec<(&str, &str)> = batch
            .iter()
            .map(|(new, _)| (new.idempotency_key.as_str(), new.fingerprint.as_str()))
            .collect();
        let earlier = self.store().by_keys(&keys).await?;
        let mut answers: Vec<Option<Order>> = Vec::with_capacity(batch.len());
        let mut unplaced = Vec::new();
        for (index, ((new, item), earlier)) in batch.into_iter().zip(earlier).enumerate() {
            match earlier {
                Some(Inserted::Existing(order)) => answers.push(Some(order)),
                Some(Inserted::KeyReused) => return Err(BaristaError::KeyReusedIn { index }),
                Some(Inserted::New(_)) | None => {
                    answers.push(None);
                    unplaced.push((index, new, item.steamed_milk));
                }
            }
        }
        // A batch no shop this size could take is not worth a retry.
        let milk = unplaced.iter().filter(|(_, _, milk)| *milk).count();
        for (station, needed) in [
            (&self.stations.espresso, unplaced.len()),
            (&self.stations.milk, milk),
        ] {
            if needed > station.places() {
                return Err(BaristaError::BatchTooLarge {
                    station: station.name,
                    needed,
                    places: station.places(),
                });
            }
        }
        let mut slots = self.room_for(unplaced.len())?;
        // The entries to store: their index in the batch, and their places.
        let (mut fresh, mut news) = (Vec::new(), Vec::new());
        for (index, new, steamed_milk) in unplaced {
            let admission = self
                .stations
                .try_admit(steamed_milk)
                .map_err(BaristaError::full)?;
            fresh.push((index, admission));
            news.push(new);
        }
        if !news.is_empty() {
            let stored = self
                .store()
                .insert_all(news, &self.owner, self.lease_until())
                .await?;
            let stored = match stored {
                InsertedAll::Stored(stored) => stored,
                InsertedAll::KeyReused(at) => {
                    return Err(BaristaError::KeyReusedIn { index: fresh[at].0 });
                }
            };
            let mut placed = 0;
            for ((index, admission), inserted) in fresh.into_iter().zip(stored) {
                match inserted {
                    Inserted::New(record) => {
                        tracing::debug!(order_id = %record.order.order_id, item_id = %record.order.item_id, "order accepted");
                        crate::observe::order_placed();
                        answers[index] = Some(record.order.clone());
                        let slot = slots.as_mut().and_then(|slots| slots.split(1));
                        self.start(record, Begin::Placed(admission), slot);
                        placed += 1;
                    }
                    // Stored meanwhile by a concurrent request with its key.
                    Inserted::Existing(order) => answers[index] = Some(order),
                    // Never: a batch with a reused key is stored not at all.
                    Inserted::KeyReused => return Err(BaristaError::KeyReusedIn { index }),
                }
            }
            tracing::info!(orders = answers.len(), placed, "batch of orders accepted");
        }
        Ok(answers.into_iter().flatten().collect())
    }

    /// Starts driving `record`'s saga in the background, holding `slot`
    /// until it ends, unless this process already does.
    fn start(self: &Arc<Self>, record: OrderRecord, begin: Begin, slot: Slot) {
        let cancel = CancellationToken::new();
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if running.contains_key(&record.order.order_id) {
                return;
            }
            running.insert(record.order.order_id.clone(), cancel.clone());
        }
        let shop = Arc::clone(self);
        let resumed = matches!(begin, Begin::Resumed);
        // A child of the PlaceOrder call, sampled or not as it is (or, for
        // an order taken over, a trace of its own): the saga outlives the
        // call, as in a trace of HotROD.
        let order_id = &record.order.order_id;
        let make =
            || tracing::info_span!("saga", otel.name = "order saga", order_id = %order_id, resumed);
        let traced = if brewmesh_runtime::telemetry::tracing_enabled() {
            brewmesh_runtime::telemetry::child_or_root(make)
        } else {
            brewmesh_runtime::telemetry::Traced::Span(make())
        };
        self.sagas.spawn(traced.attach(async move {
            let order_id = record.order.order_id.clone();
            let saga = Saga {
                orders: &*shop.journal,
                payments: &*shop.payments,
                stations: &shop.stations,
                owner: &shop.owner,
                cancel: &cancel,
            };
            saga.drive(record, begin).await;
            drop(slot);
            shop.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&order_id);
        }));
    }

    /// Tells this process's saga of `order_id` that the order was cancelled.
    /// An order another barista drives is cancelled by that barista, which
    /// notices at its next lease renewal; an orphan, by whoever adopts it.
    pub(crate) fn cancel(&self, order_id: &str) {
        let token = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(order_id)
            .cloned();
        if let Some(token) = token {
            token.cancel();
        }
    }

    /// Takes over orders whose barista is gone (their lease ran out), starts
    /// every unfinished order this barista holds that is not running here,
    /// and passes on cancels that another replica recorded. Returns how many
    /// sagas it started.
    pub(crate) async fn adopt(self: &Arc<Self>) -> Result<usize, sqlx::Error> {
        let held = self
            .store()
            .claim_orphans(
                &self.owner,
                brewmesh_runtime::time::now_micros(),
                self.lease_until(),
                self.bound
                    .as_ref()
                    .map(|(_, permits)| permits.available_permits()),
            )
            .await?;
        let (mut started, mut waiting) = (0, 0);
        for record in held {
            let running = self
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&record.order.order_id)
                .cloned();
            match running {
                Some(token) if record.step == Step::Compensate => token.cancel(),
                Some(_) => {}
                None => {
                    // At the bound, it waits (held) for a saga to end.
                    let Ok(slot) = self.room_for(1) else {
                        waiting += 1;
                        continue;
                    };
                    tracing::info!(order_id = %record.order.order_id, step = ?record.step, "taking over an unfinished order");
                    self.start(record, Begin::Resumed, slot);
                    started += 1;
                }
            }
        }
        if waiting > 0 {
            tracing::info!(
                orders = waiting,
                "unfinished orders held wait for room under --max-orders"
            );
        }
        Ok(started)
    }

    /// Every third of the lease: renews this barista's leases until `stop`,
    /// and adopts orphans until `draining` (a draining barista takes on no
    /// new work).
    ///
    /// After a stall — a renewal that failed or came late: this process was
    /// paused, or the database held still (another process paused with its
    /// write lock) — it adopts nothing for a whole lease: the others'
    /// leases ran out in the same stall, and they get a lease's time to
    /// renew them before anyone may call their orders orphans.
    pub(crate) async fn keep_leases(
        self: Arc<Self>,
        draining: CancellationToken,
        stop: CancellationToken,
    ) {
        let every = self.lease / 3;
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewed = tokio::time::Instant::now();
        let mut calm_from = renewed;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let renewal = self
                .store()
                .renew_leases(&self.owner, self.lease_until())
                .await;
            let now = tokio::time::Instant::now();
            let late = now.duration_since(renewed) > every * 2;
            match renewal {
                Ok(_) if !late => renewed = now,
                Ok(_) => {
                    tracing::warn!(since_last = ?now.duration_since(renewed), "order leases renewed late: adopting nothing for a lease");
                    renewed = now;
                    calm_from = now + self.lease;
                }
                Err(error) => {
                    tracing::warn!(%error, "renewing order leases failed: adopting nothing for a lease");
                    calm_from = now + self.lease;
                }
            }
            if !draining.is_cancelled()
                && now >= calm_from
                && let Err(error) = self.adopt().await
            {
                tracing::warn!(%error, "adopting orphaned orders failed");
            }
        }
    }

    /// Gives up the leases of the orders still unfinished here, so another
    /// barista takes them over at once.
    pub(crate) async fn release(&self) {
        match self.store().release_leases(&self.owner).await {
            Ok(0) => {}
            Ok(count) => tracing::info!(
                orders = count,
                "released unfinished orders to other baristas"
            ),
            Err(error) => {
                tracing::warn!(%error, "releasing order leases failed; they run out on their own")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use brewmesh::pb::payment::v1::{AuthorizeRequest, CaptureRequest, Payment, VoidRequest};
    use brewmesh_runtime::db::{DatabaseArgs, Synchronous};
    use tonic::Code;
    use tonic_types::StatusExt;

    use super::*;
    use crate::payments::Refused;
    use crate::stations::Station;

    /// No saga gets as far as paying in these tests.
    #[derive(Debug)]
    struct Unpaid;

    #[tonic::async_trait]
    impl Payments for Unpaid {
        async fn authorize(&self, _: AuthorizeRequest) -> Result<Payment, Refused> {
            Err(Refused(tonic::Status::unavailable(
                "no payment service here",
            )))
        }
        async fn capture(&self, _: CaptureRequest) -> Result<Payment, Refused> {
            Err(Refused(tonic::Status::unavailable(
                "no payment service here",
            )))
        }
        async fn void(&self, _: VoidRequest) -> Result<Payment, Refused> {
            Err(Refused(tonic::Status::unavailable(
                "no payment service here",
            )))
        }
    }

    fn espresso(key: &str) -> NewOrder {
        NewOrder {
            idempotency_key: key.into(),
            fingerprint: key.into(),
            item_id: "espresso".into(),
            customer_name: "Ada".into(),
            card_token: "tok_visa".into(),
            price: Default::default(),
            customer: String::new(),
        }
    }

    /// With as many orders in placement as the barista takes in at once,
    /// one more — alone or in a batch, new or a retry — is turned away at
    /// the door as busy, told when to come back, and nothing is stored.
    #[tokio::test]
    async fn past_placing_an_order_is_turned_away_before_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = OrderStore::open(&DatabaseArgs {
            data_dir: dir.path().to_owned(),
            database_url: None,
            sqlite_synchronous: Synchronous::Normal,
        })
        .await
        .unwrap();
        let station = |name| Station::new(name, 8, 8, Duration::from_secs(3600), 0.0);
        let stations = Stations {
            espresso: station("espresso"),
            milk: station("milk"),
            remote: None,
        };
        let shop = Arc::new(Shop::new(
            store,
            stations,
            Box::new(Unpaid),
            Duration::from_secs(60),
            None,
        ));
        let item = crate::menu::find("espresso").unwrap();

        let crowd = shop
            .placing
            .try_acquire_many(u32::try_from(PLACING).unwrap())
            .unwrap();
        let refused = shop.place(espresso("k1"), &item).await.unwrap_err();
        assert!(
            matches!(refused, BaristaError::Crowded { .. }),
            "{refused:?}"
        );
        let refused = shop
            .place_all(vec![(espresso("b1"), &item), (espresso("b2"), &item)])
            .await
            .unwrap_err();
        let status = tonic::Status::from(refused);
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("being placed"), "{status:?}");
        assert!(status.get_details_retry_info().is_some(), "{status:?}");
        assert!(status.metadata().get("grpc-retry-pushback-ms").is_some());
        let stored = shop.store().by_keys(&[("k1", "k1"), ("b1", "b1")]).await;
        assert!(stored.unwrap().iter().all(Option::is_none));

        // Once the crowd is in, the door is open again.
        drop(crowd);
        let order = shop.place(espresso("k1"), &item).await.unwrap();
        let again = shop.place(espresso("k1"), &item).await.unwrap();
        assert_eq!(again.order_id, order.order_id);
    }
}
