//! Orders and their event history in SQL (SQLite by default, PostgreSQL by
//! URL).
//!
//! Every change of an order updates the order row (guarded by the states it
//! may change from) and appends the events that explain it, in one
//! transaction, so the history and the row never disagree, and a change
//! that lost a race (a cancel against the drink being finished) leaves no
//! trace. The UPDATE comes first so SQLite takes its write lock before any
//! read. On SQLite, changes queued at the same time share a transaction
//! (see [`write_in_batches`]).

use std::sync::Arc;

use sqlx::any::AnyRow;
use sqlx::{Any, AnyPool, Row, Transaction};
use tokio::sync::{mpsc, oneshot};

use brewmesh::pb::barista::v1::{Order, OrderEvent, OrderEventType, OrderState};
use brewmesh::pb::payment::v1::Money;
use brewmesh::time::{now_micros, timestamp};

/// The schema's migrations, oldest first (see `brewmesh::db::Migration`):
/// append, never edit.
const MIGRATIONS: &[brewmesh::db::Migration] = &[&[
    "CREATE TABLE IF NOT EXISTS orders (
        order_id        TEXT PRIMARY KEY,
        idempotency_key TEXT NOT NULL UNIQUE,
        fingerprint     TEXT NOT NULL,
        item_id         TEXT NOT NULL,
        customer_name   TEXT NOT NULL,
        card_token      TEXT NOT NULL,
        currency_code   TEXT NOT NULL,
        amount_minor    BIGINT NOT NULL,
        state           BIGINT NOT NULL,
        saga_step       TEXT NOT NULL,
        payment_id      TEXT NOT NULL,
        failure_reason  TEXT NOT NULL,
        create_time     BIGINT NOT NULL,
        update_time     BIGINT NOT NULL,
        owner           TEXT NOT NULL,
        lease_until     BIGINT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS orders_unfinished ON orders (saga_step, lease_until)",
    "CREATE TABLE IF NOT EXISTS order_events (
        order_id    TEXT NOT NULL,
        sequence    BIGINT NOT NULL,
        event_type  BIGINT NOT NULL,
        state       BIGINT NOT NULL,
        detail      TEXT NOT NULL,
        event_time  BIGINT NOT NULL,
        PRIMARY KEY (order_id, sequence)
    )",
]];

const COLUMNS: &str = "order_id, item_id, customer_name, card_token, currency_code, amount_minor, \
                       state, saga_step, payment_id, failure_reason, create_time, update_time, \
                       owner, lease_until";

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
    /// Until when (micros) the owner's lease holds.
    pub lease_until: i64,
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
    /// [`write_in_batches`]. On PostgreSQL each write has a transaction of
    /// its own, on one of the pool's connections.
    writer: Option<mpsc::Sender<Queued>>,
}

/// At most this many writes share a transaction.
const MAX_BATCH: usize = 128;

impl OrderStore {
    /// Opens (and if need be creates) the store `database` names.
    pub async fn open(
        database: &brewmesh::db::DatabaseArgs,
    ) -> Result<Self, brewmesh::db::OpenError> {
        let pool = database.open("barista.db", MIGRATIONS).await?;
        let sqlite = database
            .database_url
            .as_deref()
            .is_none_or(|url| url.starts_with("sqlite:"));
        let writer = sqlite.then(|| {
            let (writer, queue) = mpsc::channel(4 * MAX_BATCH);
            tokio::spawn(write_in_batches(pool.clone(), queue));
            writer
        });
        Ok(Self { pool, writer })
    }

    /// Runs `write` in the writer's next batch, or alone.
    async fn write(&self, write: Write) -> Result<Outcome, sqlx::Error> {
        let Some(writer) = &self.writer else {
            return write_alone(&self.pool, &write).await;
        };
        let (reply, outcome) = oneshot::channel();
        writer
            .send((write, reply))
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
        row.map(|row| existing(&row, fingerprint)).transpose()
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
        let write = Write::Insert {
            new,
            owner: owner.to_owned(),
            lease_until,
        };
        match self.write(write).await? {
            Outcome::Inserted(inserted) => Ok(*inserted),
            Outcome::Recorded(_) => Err(mismatch()),
        }
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
        let write = Write::Record {
            order_id: order_id.to_owned(),
            state: change.state.map(|s| s as i64),
            step: change.step.map(Step::as_str),
            payment_id: change.payment_id.map(str::to_owned),
            failure_reason: change.failure_reason.map(str::to_owned),
            from: change.from.iter().map(|s| *s as i64).collect(),
            from_step: change.from_step.map(Step::as_str),
            events: events
                .iter()
                .map(|(event_type, detail)| (*event_type, (*detail).to_owned()))
                .collect(),
        };
        match self.write(write).await? {
            Outcome::Recorded(stored) => Ok(stored),
            Outcome::Inserted(_) => Err(mismatch()),
        }
    }

    /// One order, with what the saga needs.
    pub async fn get(&self, order_id: &str) -> Result<Option<OrderRecord>, sqlx::Error> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM orders WHERE order_id = $1"))
            .bind(order_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(record_from_row).transpose()
    }

    /// Up to `limit` orders older than `before`, newest first, only those in
    /// `state` unless it is UNSPECIFIED; and whether more follow.
    pub async fn list(
        &self,
        state: OrderState,
        before: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<Order>, bool), sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM orders WHERE ($1 = 0 OR state = $1) AND ($2 = '' OR order_id < $2) \
             ORDER BY order_id DESC LIMIT $3"
        ))
        .bind(state as i64)
        .bind(before.unwrap_or(""))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        let more = rows.len() > limit as usize;
        let orders = rows
            .iter()
            .take(limit as usize)
            .map(|row| record_from_row(row).map(|r| r.order))
            .collect::<Result<_, _>>()?;
        Ok((orders, more))
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
        rows.iter().map(event_from_row).collect()
    }

    /// The highest event sequence of each of `order_ids` that has events.
    pub async fn latest_sequences(
        &self,
        order_ids: &[Arc<str>],
    ) -> Result<Vec<(String, i64)>, sqlx::Error> {
        if order_ids.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders: Vec<String> = (1..=order_ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT order_id, MAX(sequence) AS latest FROM order_events \
             WHERE order_id IN ({}) GROUP BY order_id",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for order_id in order_ids {
            query = query.bind(order_id.as_ref());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| Ok((row.try_get("order_id")?, row.try_get("latest")?)))
            .collect()
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

    /// Takes over every unfinished order whose lease ran out before `now`
    /// (its barista died or stopped), leasing it to `owner` until `until`;
    /// then returns every unfinished order `owner` holds, oldest first.
    ///
    /// The claim is one conditional UPDATE: of several baristas claiming at
    /// once, each order goes to exactly one.
    pub async fn claim_orphans(
        &self,
        owner: &str,
        now: i64,
        until: i64,
    ) -> Result<Vec<OrderRecord>, sqlx::Error> {
        sqlx::query(
            "UPDATE orders SET owner = $1, lease_until = $2 WHERE saga_step <> 'done' AND lease_until < $3",
        )
        .bind(owner)
        .bind(until)
        .bind(now)
        .execute(&self.pool)
        .await?;
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM orders WHERE owner = $1 AND saga_step <> 'done' ORDER BY order_id"
        ))
        .bind(owner)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record_from_row).collect()
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

/// A write of the order path, owned so that it can go to the writer.
#[derive(Debug)]
enum Write {
    /// See [`OrderStore::insert`].
    Insert {
        new: NewOrder,
        owner: String,
        lease_until: i64,
    },
    /// See [`OrderStore::record`]: the UPDATE's new values and guard, and
    /// the events it explains.
    Record {
        order_id: String,
        state: Option<i64>,
        step: Option<&'static str>,
        payment_id: Option<String>,
        failure_reason: Option<String>,
        from: Vec<i64>,
        from_step: Option<&'static str>,
        events: Vec<(OrderEventType, String)>,
    },
}

/// What a [`Write`] did.
#[derive(Debug)]
enum Outcome {
    Inserted(Box<Inserted>),
    Recorded(Option<Vec<OrderEvent>>),
}

fn mismatch() -> sqlx::Error {
    sqlx::Error::Protocol("the writer answered a different kind of write".into())
}

/// A write and where its outcome goes.
type Queued = (Write, oneshot::Sender<Result<Outcome, sqlx::Error>>);

/// The SQLite writer: takes the writes queued meanwhile (up to
/// [`MAX_BATCH`]) and applies them in one transaction.
///
/// SQLite has one writer, and here one connection (see `brewmesh::db`).
/// A transaction per write paid, for every write, BEGIN and COMMIT and
/// the connection's hand-over between tasks: round trips through the
/// connection's thread while every other write waited. Under load the
/// queue for the connection, not SQLite, set the orders/s. Batched, those
/// costs are shared. Each write still sees the ones before it (two steps of
/// one order in one batch apply in turn), its guard still decides alone,
/// and if any write fails, the batch is rolled back and each write is
/// applied again alone, so one bad write fails only itself.
async fn write_in_batches(pool: AnyPool, mut queue: mpsc::Receiver<Queued>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let outcomes = if batch.len() == 1 {
            Err(None)
        } else {
            write_together(&pool, &batch).await.map_err(Some)
        };
        match outcomes {
            Ok(outcomes) => {
                for ((_, reply), outcome) in batch.drain(..).zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(error) => {
                if let Some(error) = error {
                    tracing::warn!(%error, writes = batch.len(), "a batch of writes failed; writing each alone");
                }
                for (write, reply) in batch.drain(..) {
                    let _ = reply.send(write_alone(&pool, &write).await);
                }
            }
        }
    }
}

/// Applies `batch` in one transaction.
async fn write_together(pool: &AnyPool, batch: &[Queued]) -> Result<Vec<Outcome>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for (write, _) in batch {
        outcomes.push(apply(&mut tx, write).await?);
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// Applies `write` in a transaction of its own.
async fn write_alone(pool: &AnyPool, write: &Write) -> Result<Outcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let outcome = apply(&mut tx, write).await?;
    tx.commit().await?;
    Ok(outcome)
}

async fn apply(tx: &mut Transaction<'static, Any>, write: &Write) -> Result<Outcome, sqlx::Error> {
    let now = now_micros();
    match write {
        Write::Insert {
            new,
            owner,
            lease_until,
        } => insert(tx, new, owner, *lease_until, now)
            .await
            .map(|inserted| Outcome::Inserted(Box::new(inserted))),
        Write::Record {
            order_id,
            state,
            step,
            payment_id,
            failure_reason,
            from,
            from_step,
            events,
        } => {
            // $1..$6 are the new values (NULL keeps the old one), then the guard.
            let mut sql = String::from(
                "UPDATE orders SET state = COALESCE($1, state), saga_step = COALESCE($2, saga_step), \
                 payment_id = COALESCE($3, payment_id), failure_reason = COALESCE($4, failure_reason), \
                 update_time = $5 WHERE order_id = $6 AND state IN (",
            );
            let placeholders: Vec<String> =
                (0..from.len()).map(|i| format!("${}", i + 7)).collect();
            sql.push_str(&placeholders.join(", "));
            sql.push(')');
            if from_step.is_some() {
                sql.push_str(&format!(" AND saga_step = ${}", from.len() + 7));
            }
            sql.push_str(" RETURNING state");
            let mut query = sqlx::query(&sql)
                .bind(*state)
                .bind(*step)
                .bind(payment_id.as_deref())
                .bind(failure_reason.as_deref())
                .bind(now)
                .bind(order_id.as_str());
            for state in from {
                query = query.bind(*state);
            }
            if let Some(step) = from_step {
                query = query.bind(*step);
            }
            let Some(state) = query.fetch_optional(&mut **tx).await? else {
                return Ok(Outcome::Recorded(None));
            };
            let state = order_state(state.try_get("state")?)?;
            let mut stored = Vec::with_capacity(events.len());
            for (event_type, detail) in events {
                stored.push(append_event(tx, order_id, *event_type, state, detail, now).await?);
            }
            Ok(Outcome::Recorded(Some(stored)))
        }
    }
}

/// Stores `new`, or finds what its key was used for before.
async fn insert(
    tx: &mut Transaction<'static, Any>,
    new: &NewOrder,
    owner: &str,
    lease_until: i64,
    now: i64,
) -> Result<Inserted, sqlx::Error> {
    let order_id = brewmesh::ids::new("ord");
    // RETURNING gives the new row back in the same round trip; on a
    // conflict it returns nothing and the key's earlier order is read.
    let inserted = sqlx::query(&format!(
        "INSERT INTO orders (idempotency_key, fingerprint, {COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, '', '', $11, $11, $12, $13) \
         ON CONFLICT (idempotency_key) DO NOTHING RETURNING {COLUMNS}"
    ))
    .bind(&new.idempotency_key)
    .bind(&new.fingerprint)
    .bind(&order_id)
    .bind(&new.item_id)
    .bind(&new.customer_name)
    .bind(&new.card_token)
    .bind(&new.price.currency_code)
    .bind(new.price.amount_minor)
    .bind(OrderState::Accepted as i64)
    .bind(Step::Run.as_str())
    .bind(now)
    .bind(owner)
    .bind(lease_until)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(row) = inserted else {
        let row = sqlx::query(&format!(
            "SELECT fingerprint, {COLUMNS} FROM orders WHERE idempotency_key = $1"
        ))
        .bind(&new.idempotency_key)
        .fetch_one(&mut **tx)
        .await?;
        return existing(&row, &new.fingerprint);
    };
    let record = record_from_row(&row)?;
    append_event(
        tx,
        &order_id,
        OrderEventType::Accepted,
        OrderState::Accepted,
        "",
        now,
    )
    .await?;
    Ok(Inserted::New(record))
}

async fn append_event(
    tx: &mut Transaction<'static, Any>,
    order_id: &str,
    event_type: OrderEventType,
    state: OrderState,
    detail: &str,
    now: i64,
) -> Result<OrderEvent, sqlx::Error> {
    // The next sequence is computed in the INSERT itself: one round trip.
    // Concurrent appends to one order cannot race: the caller's UPDATE of the
    // order row (or its INSERT) came first in the same transaction.
    let sequence: i64 = sqlx::query_scalar(
        "INSERT INTO order_events (order_id, sequence, event_type, state, detail, event_time) \
         SELECT $1, COALESCE(MAX(sequence), 0) + 1, $2, $3, $4, $5 FROM order_events \
         WHERE order_id = $1 RETURNING sequence",
    )
    .bind(order_id)
    .bind(event_type as i64)
    .bind(state as i64)
    .bind(detail)
    .bind(now)
    .fetch_one(&mut **tx)
    .await?;
    Ok(OrderEvent {
        order_id: order_id.to_owned(),
        sequence,
        r#type: event_type as i32,
        state: state as i32,
        time: Some(timestamp(now)),
        detail: detail.to_owned(),
    })
}

fn existing(row: &AnyRow, fingerprint: &str) -> Result<Inserted, sqlx::Error> {
    let stored: String = row.try_get("fingerprint")?;
    if stored != fingerprint {
        return Ok(Inserted::KeyReused);
    }
    Ok(Inserted::Existing(record_from_row(row)?.order))
}

fn corrupt(what: String) -> sqlx::Error {
    sqlx::Error::Decode(what.into())
}

fn order_state(value: i64) -> Result<OrderState, sqlx::Error> {
    i32::try_from(value)
        .ok()
        .and_then(|v| OrderState::try_from(v).ok())
        .ok_or_else(|| corrupt(format!("unknown order state {value}")))
}

fn record_from_row(row: &AnyRow) -> Result<OrderRecord, sqlx::Error> {
    let step: String = row.try_get("saga_step")?;
    let step = Step::parse(&step).ok_or_else(|| corrupt(format!("unknown saga step {step:?}")))?;
    Ok(OrderRecord {
        order: Order {
            order_id: row.try_get("order_id")?,
            item_id: row.try_get("item_id")?,
            customer_name: row.try_get("customer_name")?,
            price: Some(Money {
                currency_code: row.try_get("currency_code")?,
                amount_minor: row.try_get("amount_minor")?,
            }),
            state: order_state(row.try_get("state")?)? as i32,
            payment_id: row.try_get("payment_id")?,
            failure_reason: row.try_get("failure_reason")?,
            create_time: Some(timestamp(row.try_get("create_time")?)),
            update_time: Some(timestamp(row.try_get("update_time")?)),
        },
        card_token: row.try_get("card_token")?,
        step,
        owner: row.try_get("owner")?,
        lease_until: row.try_get("lease_until")?,
    })
}

fn event_from_row(row: &AnyRow) -> Result<OrderEvent, sqlx::Error> {
    let event_type: i64 = row.try_get("event_type")?;
    let event_type = i32::try_from(event_type)
        .ok()
        .and_then(|v| OrderEventType::try_from(v).ok())
        .ok_or_else(|| corrupt(format!("unknown event type {event_type}")))?;
    Ok(OrderEvent {
        order_id: row.try_get("order_id")?,
        sequence: row.try_get("sequence")?,
        r#type: event_type as i32,
        state: order_state(row.try_get("state")?)? as i32,
        time: Some(timestamp(row.try_get("event_time")?)),
        detail: row.try_get("detail")?,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

    use super::*;

    async fn store(dir: &std::path::Path) -> OrderStore {
        let database = brewmesh::db::DatabaseArgs {
            data_dir: dir.to_owned(),
            database_url: None,
            sqlite_synchronous: brewmesh::db::Synchronous::Normal,
        };
        OrderStore::open(&database).await.unwrap()
    }

    async fn placed(store: &OrderStore, key: &str) -> String {
        let new = NewOrder {
            idempotency_key: key.into(),
            fingerprint: key.into(),
            item_id: "latte".into(),
            customer_name: "Ada".into(),
            card_token: "tok_visa".into(),
            price: Money {
                currency_code: "EUR".into(),
                amount_minor: 350,
            },
        };
        match store.insert(new, "barista-test", i64::MAX).await.unwrap() {
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
