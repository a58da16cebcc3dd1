//! Orders and their event history in SQL (SQLite by default, PostgreSQL by
//! URL).
//!
//! Every change of an order is one transaction that updates the order row
//! (guarded by the states it may change from) and appends the event that
//! explains it, so the history and the row never disagree, and a change that
//! lost a race (a cancel against the drink being finished) leaves no trace.
//! The UPDATE comes first so SQLite takes its write lock before any read.

use sqlx::any::AnyRow;
use sqlx::{Any, AnyPool, Row, Transaction};

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
}

impl OrderStore {
    /// Opens (and if need be creates) the store `database` names.
    pub async fn open(
        database: &brewmesh::db::DatabaseArgs,
    ) -> Result<Self, brewmesh::db::OpenError> {
        Ok(Self {
            pool: database.open("barista.db", MIGRATIONS).await?,
        })
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
        let mut tx = self.pool.begin().await?;
        let now = now_micros();
        let order_id = brewmesh::ids::new("ord");
        let inserted = sqlx::query(&format!(
            "INSERT INTO orders (idempotency_key, fingerprint, {COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, '', '', $11, $11, $12, $13) \
             ON CONFLICT (idempotency_key) DO NOTHING"
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
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            let row = sqlx::query(&format!(
                "SELECT fingerprint, {COLUMNS} FROM orders WHERE idempotency_key = $1"
            ))
            .bind(&new.idempotency_key)
            .fetch_one(&mut *tx)
            .await?;
            return existing(&row, &new.fingerprint);
        }
        append_event(
            &mut tx,
            &order_id,
            OrderEventType::Accepted,
            OrderState::Accepted,
            "",
            now,
        )
        .await?;
        let record = fetch(&mut tx, &order_id)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        tx.commit().await?;
        Ok(Inserted::New(record))
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
        let mut tx = self.pool.begin().await?;
        let now = now_micros();
        // $1..$6 are the new values (NULL keeps the old one), then the guard.
        let mut sql = String::from(
            "UPDATE orders SET state = COALESCE($1, state), saga_step = COALESCE($2, saga_step), \
             payment_id = COALESCE($3, payment_id), failure_reason = COALESCE($4, failure_reason), \
             update_time = $5 WHERE order_id = $6 AND state IN (",
        );
        let placeholders: Vec<String> = (0..change.from.len())
            .map(|i| format!("${}", i + 7))
            .collect();
        sql.push_str(&placeholders.join(", "));
        sql.push(')');
        if change.from_step.is_some() {
            sql.push_str(&format!(" AND saga_step = ${}", change.from.len() + 7));
        }
        let mut query = sqlx::query(&sql)
            .bind(change.state.map(|s| s as i64))
            .bind(change.step.map(Step::as_str))
            .bind(change.payment_id)
            .bind(change.failure_reason)
            .bind(now)
            .bind(order_id);
        for state in change.from {
            query = query.bind(*state as i64);
        }
        if let Some(step) = change.from_step {
            query = query.bind(step.as_str());
        }
        if query.execute(&mut *tx).await?.rows_affected() == 0 {
            return Ok(None);
        }
        let state: i64 = sqlx::query_scalar("SELECT state FROM orders WHERE order_id = $1")
            .bind(order_id)
            .fetch_one(&mut *tx)
            .await?;
        let state = order_state(state)?;
        let mut stored = Vec::with_capacity(events.len());
        for (event_type, detail) in events {
            stored.push(append_event(&mut tx, order_id, *event_type, state, detail, now).await?);
        }
        tx.commit().await?;
        Ok(Some(stored))
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

async fn append_event(
    tx: &mut Transaction<'static, Any>,
    order_id: &str,
    event_type: OrderEventType,
    state: OrderState,
    detail: &str,
    now: i64,
) -> Result<OrderEvent, sqlx::Error> {
    let sequence: i64 = sqlx::query_scalar(
        "SELECT COALESCE(MAX(sequence), 0) + 1 FROM order_events WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_one(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO order_events (order_id, sequence, event_type, state, detail, event_time) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(order_id)
    .bind(sequence)
    .bind(event_type as i64)
    .bind(state as i64)
    .bind(detail)
    .bind(now)
    .execute(&mut **tx)
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

async fn fetch(
    tx: &mut Transaction<'static, Any>,
    order_id: &str,
) -> Result<Option<OrderRecord>, sqlx::Error> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM orders WHERE order_id = $1"))
        .bind(order_id)
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(record_from_row).transpose()
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
