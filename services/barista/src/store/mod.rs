//! Orders and their event history in SQL (SQLite by default, PostgreSQL by
//! URL).
//!
//! Every change of an order updates the order row (guarded by the states it
//! may change from) and appends the events that explain it, in one
//! transaction, so the history and the row never disagree, and a change
//! that lost a race (a cancel against the drink being finished) leaves no
//! trace. The UPDATE comes first so SQLite takes its write lock before any
//! read. On SQLite, changes queued at the same time share a transaction
//! (see [`writer`]).

mod rows;
mod schema;

pub(crate) use schema::EVENTS_CHANNEL;
mod writer;

use std::sync::Arc;

use sqlx::{AnyPool, Row};
use tokio::sync::mpsc;

use brewmesh::pb::barista::v1::{Order, OrderEvent, OrderEventType, OrderState};
use brewmesh::pb::payment::v1::Money;

use schema::{COLUMNS, MIGRATIONS};
use writer::{InsertOrder, InsertOrders, Job, MAX_BATCH, Queued, Update};

/// The owner of an unfinished order no barista could read: claimed by
/// nobody until an operator mends the row and sets its owner back
/// (`UPDATE orders SET owner = '', lease_until = 0 WHERE order_id = …`).
pub const QUARANTINED: &str = "quarantined";

/// Where an order's saga is: what is left to do, also after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Authorize and brew (again, after a crash: both are idempotent).
    Run,
    /// The drink is made: capture the payment, then READY.
    Complete,
    /// Release the payment (if any), then FAILED or CANCELLED.
    Compensate,
    /// Nothing left to do.
    Done,
}

impl Step {
    fn as_str(self) -> &'static str {
        match self {
            Step::Run => "run",
            Step::Complete => "complete",
            Step::Compensate => "compensate",
            Step::Done => "done",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "run" => Step::Run,
            "complete" => Step::Complete,
            "compensate" => Step::Compensate,
            "done" => Step::Done,
            _ => return None,
        })
    }
}

/// An order as the saga sees it: the public order plus what the saga needs.
#[derive(Debug, Clone)]
pub struct OrderRecord {
    /// The order as clients see it.
    pub order: Order,
    /// The card token, to repeat the authorization idempotently.
    pub card_token: String,
    /// What the saga has left to do.
    pub step: Step,
    /// The barista instance driving the saga.
    pub owner: String,
    /// Whose order it is (the subject the gateway authenticated), or ''.
    pub customer: String,
}

/// A new order for [`OrderStore::insert`].
#[derive(Debug, Clone)]
pub struct NewOrder {
    /// The client's idempotency key.
    pub idempotency_key: String,
    /// The request's fingerprint, to tell a retry from a reused key.
    pub fingerprint: String,
    /// The drink.
    pub item_id: String,
    /// Whom to call.
    pub customer_name: String,
    /// How to pay.
    pub card_token: String,
    /// The drink's price.
    pub price: Money,
    /// Whose order it is (the subject the gateway authenticated), or ''.
    pub customer: String,
}

/// What [`OrderStore::insert`] did.
#[derive(Debug)]
pub enum Inserted {
    /// A new order, with its ACCEPTED event.
    New(OrderRecord),
    /// The key's earlier order, for a retry of the same request.
    Existing(Order),
    /// The key was used before for a different request.
    KeyReused,
}

/// What [`OrderStore::insert_all`] did.
#[derive(Debug)]
pub enum InsertedAll {
    /// Every order stored, or found as its key's earlier order: an
    /// [`Inserted::New`] or [`Inserted::Existing`] for each, in order.
    Stored(Vec<Inserted>),
    /// The key of the order at this index was used before for a different
    /// request: nothing was stored.
    KeyReused(usize),
}

/// A change to an order: the event that explains it and the fields it sets.
#[derive(Debug, Clone, Default)]
pub struct Change<'a> {
    /// The states the order must be in for the change to apply.
    pub from: &'a [OrderState],
    /// If set, the saga step the order must be at as well.
    pub from_step: Option<Step>,
    /// The new state, if it changes.
    pub state: Option<OrderState>,
    /// The new saga step, if it changes.
    pub step: Option<Step>,
    /// If set, the barista that must hold the order: a saga's writes carry
    /// its owner, so a saga whose order was taken over writes nothing.
    pub owner: Option<&'a str>,
    /// The payment id, once known.
    pub payment_id: Option<&'a str>,
    /// Why the order failed or was cancelled.
    pub failure_reason: Option<&'a str>,
}

/// Orders and their history.
#[derive(Debug, Clone)]
pub struct OrderStore {
    pool: AnyPool,
    /// On SQLite, the queue of the one task that writes orders; see
    /// [`writer`]. On PostgreSQL each write has a transaction of its own,
    /// on one of the pool's connections.
    writer: Option<mpsc::Sender<Queued>>,
}

impl OrderStore {
    /// Opens (and if need be creates) the store `database` names.
    pub async fn open(
        database: &brewmesh_runtime::db::DatabaseArgs,
    ) -> Result<Self, brewmesh_runtime::db::OpenError> {
        let pool = database.open("barista.db", MIGRATIONS).await?;
        if !database.is_sqlite() {
            schema::notify_on_events(&pool)
                .await
                .map_err(brewmesh_runtime::db::OpenError::from)?;
        }
        let writer = database.is_sqlite().then(|| {
            let (writer, queue) = mpsc::channel(4 * MAX_BATCH);
            tokio::spawn(writer::write_in_batches(pool.clone(), queue));
            writer
        });
        Ok(Self { pool, writer })
    }

    /// Runs `write` in the writer's next batch, or alone.
    async fn write<W: writer::Apply>(
        &self,
        write: W,
        queued: fn(Job<W>) -> Queued,
    ) -> Result<W::Output, sqlx::Error> {
        let Some(writer) = &self.writer else {
            // Boxed: the query's future is large, and every write waiting
            // for the writer would carry it inline.
            return Box::pin(writer::write_alone(&self.pool, &write)).await;
        };
        let (job, outcome) = Job::new(write);
        writer
            .send(queued(job))
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        outcome.await.map_err(|_| sqlx::Error::PoolClosed)?
    }

    /// The order placed earlier with `key`, if any; [`Inserted::KeyReused`]
    /// is reported by [`Self::insert`] and [`Self::by_key`] alike.
    pub async fn by_key(
        &self,
        key: &str,
        fingerprint: &str,
    ) -> Result<Option<Inserted>, sqlx::Error> {
        let row = sqlx::query(&format!(
            "SELECT fingerprint, {COLUMNS} FROM orders WHERE idempotency_key = $1"
        ))
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| rows::existing(&row, fingerprint)).transpose()
    }

    /// Stores a new order (ACCEPTED, with its first event), or tells what
    /// the key was used for before.
    /// The new order is leased to `owner` until `lease_until` (micros).
    pub async fn insert(
        &self,
        new: NewOrder,
        owner: &str,
        lease_until: i64,
    ) -> Result<Inserted, sqlx::Error> {
        let write = InsertOrder {
            new,
            owner: owner.to_owned(),
            lease_until,
        };
        self.write(write, Queued::Insert).await
    }

    /// Stores every order of `news` (each ACCEPTED, with its first event)
    /// in one transaction, or for a key used before its earlier order; if
    /// one key was used for a different request, none of them. Leased to
    /// `owner` until `lease_until` (micros).
    pub async fn insert_all(
        &self,
        news: Vec<NewOrder>,
        owner: &str,
        lease_until: i64,
    ) -> Result<InsertedAll, sqlx::Error> {
        let write = InsertOrders {
            news,
            owner: owner.to_owned(),
            lease_until,
        };
        self.write(write, Queued::InsertAll).await
    }

    /// For each of `keys` (an idempotency key and the fingerprint of the
    /// request now carrying it), what it was used for before, if anything.
    pub async fn by_keys(
        &self,
        keys: &[(&str, &str)],
    ) -> Result<Vec<Option<Inserted>>, sqlx::Error> {
        let mut found = std::collections::HashMap::new();
        for chunk in keys.chunks(500) {
            let sql = format!(
                "SELECT idempotency_key, fingerprint, {COLUMNS} FROM orders \
                 WHERE idempotency_key IN ({})",
                brewmesh_runtime::db::placeholders(1, chunk.len())
            );
            let mut query = sqlx::query(&sql);
            for (key, _) in chunk {
                query = query.bind(*key);
            }
            for row in query.fetch_all(&self.pool).await? {
                let key: String = row.try_get("idempotency_key")?;
                found.insert(key, row);
            }
        }
        keys.iter()
            .map(|(key, fingerprint)| {
                found
                    .get(*key)
                    .map(|row| rows::existing(row, fingerprint))
                    .transpose()
            })
            .collect()
    }

    /// Applies `change` and appends `events` (each with its detail), if the
    /// order is in one of the states (and step) the change needs. Returns
    /// the events as stored, or `None` if the order had moved on.
    pub async fn record(
        &self,
        order_id: &str,
        events: &[(OrderEventType, &str)],
        change: Change<'_>,
    ) -> Result<Option<Vec<OrderEvent>>, sqlx::Error> {
        let write = Update {
            order_id: order_id.to_owned(),
            state: change.state.map(|s| s as i64),
            step: change.step.map(Step::as_str),
            payment_id: change.payment_id.map(str::to_owned),
            failure_reason: change.failure_reason.map(str::to_owned),
            from: change.from.iter().map(|s| *s as i64).collect(),
            from_step: change.from_step.map(Step::as_str),
            owner: change.owner.map(str::to_owned),
            events: events
                .iter()
                .map(|(event_type, detail)| (*event_type, (*detail).to_owned()))
                .collect(),
        };
        self.write(write, Queued::Update).await
    }

    /// One order, with what the saga needs.
    pub async fn get(&self, order_id: &str) -> Result<Option<OrderRecord>, sqlx::Error> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM orders WHERE order_id = $1"))
            .bind(order_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(rows::record).transpose()
    }

    /// Up to `limit` orders older than `before`, newest first, only those in
    /// `state` unless it is UNSPECIFIED, and only `customer`'s if given (an
    /// unreadable one skipped); and, when more follow, the id to continue
    /// before.
    pub async fn list(
        &self,
        state: OrderState,
        customer: Option<&str>,
        before: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<Order>, Option<String>), sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM orders WHERE ($1 = 0 OR state = $1) AND ($2 = '' OR order_id < $2) \
             AND ($4 = '' OR customer = $4) ORDER BY order_id DESC LIMIT $3"
        ))
        .bind(state as i64)
        .bind(before.unwrap_or(""))
        .bind(i64::from(limit) + 1)
        .bind(customer.unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        let more = rows.len() > limit as usize;
        let page = &rows[..rows.len().min(limit as usize)];
        // The next page starts after this page's last row, read or not.
        let last = match page.last() {
            Some(row) if more => Some(row.try_get("order_id")?),
            _ => None,
        };
        let orders = rows::readable(page, "orders", |row| rows::record(row).map(|r| r.order));
        Ok((orders, last))
    }

    /// The order's events after sequence `after`, in order.
    pub async fn events_after(
        &self,
        order_id: &str,
        after: i64,
    ) -> Result<Vec<OrderEvent>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT order_id, sequence, event_type, state, detail, event_time FROM order_events \
             WHERE order_id = $1 AND sequence > $2 ORDER BY sequence",
        )
        .bind(order_id)
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows::readable(&rows, "order_events", rows::event))
    }

    /// The highest event sequence of each of `order_ids` that has events.
    pub async fn latest_sequences(
        &self,
        order_ids: &[Arc<str>],
    ) -> Result<Vec<(String, i64)>, sqlx::Error> {
        let order_ids: Vec<&str> = order_ids.iter().map(AsRef::as_ref).collect();
        writer::last_sequences(&self.pool, &order_ids).await
    }

    /// Extends the leases `owner` holds on unfinished orders to `until`.
    pub async fn renew_leases(&self, owner: &str, until: i64) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query(
            "UPDATE orders SET lease_until = $1 WHERE owner = $2 AND saga_step <> 'done'",
        )
        .bind(until)
        .bind(owner)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Takes over the unfinished orders whose lease ran out before `now`
    /// (its barista died or stopped), `room` of them at most, leasing them
    /// to `owner` until `until`; then returns every unfinished order
    /// `owner` holds, oldest first.
    ///
    /// The claim is one conditional UPDATE, its condition checked again on
    /// each row it locks: of several baristas claiming at once, each order
    /// goes to exactly one. An order that cannot be read
    /// is quarantined (its owner becomes [`QUARANTINED`]) and skipped.
    pub async fn claim_orphans(
        &self,
        owner: &str,
        now: i64,
        until: i64,
        room: Option<usize>,
    ) -> Result<Vec<OrderRecord>, sqlx::Error> {
        let room = room.map_or(i64::MAX, |room| i64::try_from(room).unwrap_or(i64::MAX));
        sqlx::query(
            "UPDATE orders SET owner = $1, lease_until = $2 WHERE order_id IN \
             (SELECT order_id FROM orders \
              WHERE saga_step <> 'done' AND lease_until < $3 AND owner <> $4 \
              ORDER BY order_id LIMIT $5) \
             AND saga_step <> 'done' AND lease_until < $3 AND owner <> $4",
        )
        .bind(owner)
        .bind(until)
        .bind(now)
        .bind(QUARANTINED)
        .bind(room)
        .execute(&self.pool)
        .await?;
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM orders WHERE owner = $1 AND saga_step <> 'done' ORDER BY order_id"
        ))
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        let (mut held, mut unreadable) = (Vec::with_capacity(rows.len()), Vec::new());
        for row in &rows {
            match rows::record(row) {
                Ok(record) => held.push(record),
                Err(error) => {
                    let order_id: String = row.try_get("order_id")?;
                    tracing::warn!(%order_id, %error, owner = QUARANTINED, "unreadable unfinished order: quarantined");
                    crate::observe::unreadable_row("orders");
                    unreadable.push(order_id);
                }
            }
        }
        // Out of every barista's way until an operator mends it and sets
        // its owner back: nobody renews, claims or runs it.
        for order_id in unreadable {
            sqlx::query("UPDATE orders SET owner = $1 WHERE order_id = $2 AND owner = $3")
                .bind(QUARANTINED)
                .bind(&order_id)
                .bind(owner)
                .execute(&self.pool)
                .await?;
        }
        Ok(held)
    }

    /// Gives up `owner`'s leases at once, so another barista takes its
    /// unfinished orders over without waiting for them to run out.
    pub async fn release_leases(&self, owner: &str) -> Result<u64, sqlx::Error> {
        Ok(sqlx::query(
            "UPDATE orders SET lease_until = 0 WHERE owner = $1 AND saga_step <> 'done'",
        )
        .bind(owner)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

    use super::*;

    async fn store(dir: &std::path::Path) -> OrderStore {
        let database = brewmesh_runtime::db::DatabaseArgs {
            data_dir: dir.to_owned(),
            database_url: None,
            sqlite_synchronous: brewmesh_runtime::db::Synchronous::Normal,
        };
        OrderStore::open(&database).await.unwrap()
    }

    /// A latte for Ada under `key`.
    fn latte(key: &str) -> NewOrder {
        NewOrder {
            idempotency_key: key.into(),
            fingerprint: key.into(),
            item_id: "latte".into(),
            customer_name: "Ada".into(),
            card_token: "tok_visa".into(),
            price: Money {
                currency_code: "EUR".into(),
                amount_minor: 350,
            },
            customer: String::new(),
        }
    }

    async fn placed(store: &OrderStore, key: &str) -> String {
        match store
            .insert(latte(key), "barista-test", i64::MAX)
            .await
            .unwrap()
        {
            Inserted::New(record) => record.order.order_id,
            other => panic!("not inserted: {other:?}"),
        }
    }

    fn brewing<'a>() -> Change<'a> {
        Change {
            from: &[OrderState::Accepted],
            state: Some(OrderState::Brewing),
            ..Change::default()
        }
    }

    /// A barista with room for one more saga takes one orphan, the
    /// oldest; the next claim takes the rest.
    #[tokio::test]
    async fn a_claim_takes_no_more_orphans_than_there_is_room_for() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        let mut orphans = Vec::new();
        for key in ["a", "b", "c"] {
            // Leased until 1 µs: run out long ago.
            match store.insert(latte(key), "gone", 1).await.unwrap() {
                Inserted::New(record) => orphans.push(record.order.order_id),
                other => panic!("not inserted: {other:?}"),
            }
        }
        orphans.sort();
        let now = brewmesh_runtime::time::now_micros();
        let ids = |records: Vec<OrderRecord>| -> Vec<String> {
            records.into_iter().map(|r| r.order.order_id).collect()
        };
        let held = store
            .claim_orphans("me", now, i64::MAX, Some(1))
            .await
            .unwrap();
        assert_eq!(ids(held), orphans[..1]);
        let held = store
            .claim_orphans("me", now, i64::MAX, Some(0))
            .await
            .unwrap();
        assert_eq!(ids(held), orphans[..1], "no room: nothing more taken");
        let held = store
            .claim_orphans("me", now, i64::MAX, None)
            .await
            .unwrap();
        assert_eq!(ids(held), orphans);
    }

    /// Writes queued together are applied with a few multi-row
    /// statements: each order's changes in turn (the second sees the
    /// first), each guard deciding alone, a new order beside them.
    #[tokio::test]
    async fn a_batch_applies_each_orders_changes_in_turn() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        let (a, b) = (placed(&store, "a").await, placed(&store, "b").await);
        let ready = Change {
            from: &[OrderState::Brewing],
            state: Some(OrderState::Ready),
            payment_id: Some("pay_1"),
            ..Change::default()
        };
        let refused = Change {
            from: &[OrderState::Ready],
            state: Some(OrderState::Failed),
            ..Change::default()
        };
        let started = [(OrderEventType::BrewingStarted, "")];
        let two = [
            (OrderEventType::Ready, ""),
            (OrderEventType::PaymentCaptured, "x"),
        ];
        let new = latte("c");
        // Sent before the writer runs again (one thread): one batch.
        let (first, second, not_b, again, c) = tokio::join!(
            store.record(&a, &started, brewing()),
            store.record(&a, &two, ready),
            store.record(&b, &started, refused),
            store.record(&a, &started, brewing()),
            store.insert(new, "barista-test", i64::MAX),
        );
        let (first, second) = (first.unwrap().unwrap(), second.unwrap().unwrap());
        assert_eq!(first.iter().map(|e| e.sequence).collect::<Vec<_>>(), [2]);
        assert_eq!(
            second.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            [3, 4]
        );
        assert_eq!(second[1].detail, "x");
        assert!(second.iter().all(|e| e.state() == OrderState::Ready));
        let mut both = first.clone();
        both.extend(second);
        assert_eq!(both, store.events_after(&a, 1).await.unwrap());
        let record = store.get(&a).await.unwrap().unwrap();
        assert_eq!(record.order.state(), OrderState::Ready);
        assert_eq!(record.order.payment_id, "pay_1");
        assert_eq!(not_b.unwrap(), None, "b's guard refused");
        assert_eq!(
            store.get(&b).await.unwrap().unwrap().order.state(),
            OrderState::Accepted
        );
        assert_eq!(again.unwrap(), None, "a was no longer ACCEPTED");
        let Inserted::New(c) = c.unwrap() else {
            panic!("c not inserted")
        };
        let events = store.events_after(&c.order.order_id, 0).await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].r#type(), OrderEventType::Accepted);
    }

    /// Writes queued together share a transaction; one that fails fails
    /// alone, and the others are stored, each with its events in order.
    #[tokio::test]
    async fn one_failing_write_in_a_batch_fails_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path()).await;
        let (a, b) = (placed(&store, "a").await, placed(&store, "b").await);
        // A write that fails in SQLite itself: a trigger refuses it.
        sqlx::query(
            "CREATE TRIGGER refuse_boom BEFORE UPDATE ON orders WHEN NEW.failure_reason = 'boom' \
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        let broken = Change {
            from: &[OrderState::Accepted, OrderState::Brewing],
            failure_reason: Some("boom"),
            ..Change::default()
        };
        let started = [(OrderEventType::BrewingStarted, "")];
        // Sent before the writer runs again (one thread): one batch.
        let (first, failed, second, again) = tokio::join!(
            store.record(&a, &started, brewing()),
            store.record(&a, &[], broken),
            store.record(&b, &started, brewing()),
            // The guard sees the write before it in the batch: no change.
            store.record(&a, &started, brewing()),
        );
        assert!(failed.is_err());
        for (order_id, stored) in [(&a, first), (&b, second)] {
            let stored = stored.unwrap().expect("the guard passed");
            assert_eq!(stored.len(), 1);
            assert_eq!(stored[0].sequence, 2);
            assert_eq!(stored, store.events_after(order_id, 1).await.unwrap());
            let record = store.get(order_id).await.unwrap().unwrap();
            assert_eq!(record.order.state(), OrderState::Brewing);
        }
        assert_eq!(again.unwrap(), None);
    }
}
