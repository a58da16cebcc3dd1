//! The payments ledger in SQL (SQLite by default, PostgreSQL by URL).
//!
//! Every write runs in one transaction that first claims its idempotency key
//! and last stores its response beside it, so a key either has no effect or
//! has exactly one, and a retry gets back the first response byte for byte.
//! Claiming the key with an INSERT, before any read, makes the transaction
//! take SQLite's write lock at once (waiting out `busy_timeout`), instead of
//! failing when a read lock later needs upgrading.

use prost::Message;
use sqlx::AnyPool;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use brewmesh::pb::payment::v1::{Money, Payment, PaymentState};
use brewmesh_runtime::idempotency::{from_hex, to_hex};
use brewmesh_runtime::time::{now_micros, timestamp};

use crate::error::PaymentError;

/// The schema's migrations, oldest first (see `brewmesh_runtime::db::Migration`):
/// append, never edit.
const MIGRATIONS: &[brewmesh_runtime::db::Migration] = &[&[
    "CREATE TABLE IF NOT EXISTS payments (
        payment_id     TEXT PRIMARY KEY,
        order_id       TEXT NOT NULL,
        currency_code  TEXT NOT NULL,
        amount_minor   BIGINT NOT NULL,
        state          BIGINT NOT NULL,
        decline_reason TEXT NOT NULL,
        card_last4     TEXT NOT NULL,
        refund_reason  TEXT NOT NULL,
        create_time    BIGINT NOT NULL,
        update_time    BIGINT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS payments_by_order ON payments (order_id, payment_id)",
    "CREATE TABLE IF NOT EXISTS idempotency_keys (
        idempotency_key TEXT PRIMARY KEY,
        fingerprint     TEXT NOT NULL,
        response        TEXT NOT NULL,
        create_time     BIGINT NOT NULL
    )",
]];

const COLUMNS: &str = "payment_id, order_id, currency_code, amount_minor, state, \
                       decline_reason, card_last4, refund_reason, create_time, update_time";

/// A payment about to be recorded by [`Ledger::authorize`].
#[derive(Debug, Clone)]
pub struct NewPayment {
    /// The merchant's reference.
    pub order_id: String,
    /// The amount to hold.
    pub amount: Money,
    /// AUTHORIZED, or DECLINED with a reason.
    pub outcome: Result<(), String>,
    /// The last four characters of the card token.
    pub card_last4: String,
}

/// A state change of an existing payment.
#[derive(Debug, Clone, Copy)]
pub enum Transition<'a> {
    /// AUTHORIZED → CAPTURED.
    Capture,
    /// AUTHORIZED → VOIDED.
    Void,
    /// CAPTURED → REFUNDED, with a reason.
    Refund(&'a str),
}

impl Transition<'_> {
    fn name(self) -> &'static str {
        match self {
            Transition::Capture => "capture",
            Transition::Void => "void",
            Transition::Refund(_) => "refund",
        }
    }

    fn states(self) -> (PaymentState, PaymentState) {
        match self {
            Transition::Capture => (PaymentState::Authorized, PaymentState::Captured),
            Transition::Void => (PaymentState::Authorized, PaymentState::Voided),
            Transition::Refund(_) => (PaymentState::Captured, PaymentState::Refunded),
        }
    }
}

/// The ledger: payments and the idempotency keys that made them.
#[derive(Debug, Clone)]
pub struct Ledger {
    pool: AnyPool,
}

impl Ledger {
    /// Opens (and if need be creates) the ledger `database` names.
    pub async fn open(
        database: &brewmesh_runtime::db::DatabaseArgs,
    ) -> Result<Self, brewmesh_runtime::db::OpenError> {
        Ok(Self {
            pool: database.open("payment.db", MIGRATIONS).await?,
        })
    }

    /// The stored response for `key`, if a request with that key already
    /// succeeded; [`PaymentError::KeyReused`] if that request was different.
    pub async fn replay(
        &self,
        key: &str,
        fingerprint: &str,
    ) -> Result<Option<Payment>, PaymentError> {
        let row = sqlx::query(
            "SELECT fingerprint, response FROM idempotency_keys WHERE idempotency_key = $1",
        )
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| stored_response(&row, fingerprint))
            .transpose()
    }

    /// Records a new payment under `key` (or returns the one `key` made).
    pub async fn authorize(
        &self,
        key: &str,
        fingerprint: &str,
        new: NewPayment,
    ) -> Result<Payment, PaymentError> {
        let mut tx = self.pool.begin().await?;
        if let Some(replayed) = claim(&mut tx, key, fingerprint).await? {
            return Ok(replayed);
        }
        let now = now_micros();
        let payment_id = brewmesh_runtime::ids::new("pay");
        let (state, decline_reason) = match new.outcome {
            Ok(()) => (PaymentState::Authorized, String::new()),
            Err(reason) => (PaymentState::Declined, reason),
        };
        sqlx::query(&format!(
            "INSERT INTO payments ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, '', $8, $8)"
        ))
        .bind(&payment_id)
        .bind(&new.order_id)
        .bind(&new.amount.currency_code)
        .bind(new.amount.amount_minor)
        .bind(state as i64)
        .bind(&decline_reason)
        .bind(&new.card_last4)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        finish(tx, key, &payment_id).await
    }

    /// Moves payment `payment_id` through `transition` under `key`.
    pub async fn transition(
        &self,
        key: &str,
        fingerprint: &str,
        payment_id: &str,
        transition: Transition<'_>,
    ) -> Result<Payment, PaymentError> {
        let mut tx = self.pool.begin().await?;
        if let Some(replayed) = claim(&mut tx, key, fingerprint).await? {
            return Ok(replayed);
        }
        let (from, to) = transition.states();
        let reason = match transition {
            Transition::Refund(reason) => reason,
            Transition::Capture | Transition::Void => "",
        };
        let updated = sqlx::query(
            "UPDATE payments SET state = $1, refund_reason = $2, update_time = $3 \
             WHERE payment_id = $4 AND state = $5",
        )
        .bind(to as i64)
        .bind(reason)
        .bind(now_micros())
        .bind(payment_id)
        .bind(from as i64)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 0 {
            // Nothing moved: say why, and roll back the key's claim so the
            // key stays free for a retry once the cause is fixed.
            let current = fetch(&mut *tx, payment_id).await?;
            return Err(match current {
                None => PaymentError::NotFound(payment_id.to_owned()),
                Some(payment) => PaymentError::IllegalTransition {
                    payment_id: payment_id.to_owned(),
                    from: payment.state(),
                    action: transition.name(),
                    needed: from,
                },
            });
        }
        finish(tx, key, payment_id).await
    }

    /// One payment.
    pub async fn get(&self, payment_id: &str) -> Result<Payment, PaymentError> {
        let mut conn = self.pool.acquire().await?;
        fetch(&mut *conn, payment_id)
            .await?
            .ok_or_else(|| PaymentError::NotFound(payment_id.to_owned()))
    }

    /// Up to `limit` payments older than `before` (all when `None`), newest
    /// first, only those for `order_id` unless it is empty; and whether more
    /// follow.
    pub async fn list(
        &self,
        order_id: &str,
        before: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<Payment>, bool), PaymentError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM payments \
             WHERE ($1 = '' OR order_id = $1) AND ($2 = '' OR payment_id < $2) \
             ORDER BY payment_id DESC LIMIT $3"
        ))
        .bind(order_id)
        .bind(before.unwrap_or(""))
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        let more = rows.len() > limit as usize;
        let payments = rows
            .iter()
            .take(limit as usize)
            .map(payment_from_row)
            .collect::<Result<_, _>>()?;
        Ok((payments, more))
    }
}

/// Claims `key` inside `tx`: `None` if it was free (the caller goes on), the
/// first response if the same request used it before.
async fn claim(
    tx: &mut Transaction<'static, Any>,
    key: &str,
    fingerprint: &str,
) -> Result<Option<Payment>, PaymentError> {
    let inserted = sqlx::query(
        "INSERT INTO idempotency_keys (idempotency_key, fingerprint, response, create_time) \
         VALUES ($1, $2, '', $3) ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(key)
    .bind(fingerprint)
    .bind(now_micros())
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT fingerprint, response FROM idempotency_keys WHERE idempotency_key = $1",
    )
    .bind(key)
    .fetch_one(&mut **tx)
    .await?;
    stored_response(&row, fingerprint).map(Some)
}

/// Stores the payment's new state as the key's response and commits.
async fn finish(
    mut tx: Transaction<'static, Any>,
    key: &str,
    payment_id: &str,
) -> Result<Payment, PaymentError> {
    let payment = fetch(&mut *tx, payment_id)
        .await?
        .ok_or_else(|| PaymentError::NotFound(payment_id.to_owned()))?;
    sqlx::query("UPDATE idempotency_keys SET response = $1 WHERE idempotency_key = $2")
        .bind(to_hex(&payment.encode_to_vec()))
        .bind(key)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(payment)
}

fn stored_response(row: &AnyRow, fingerprint: &str) -> Result<Payment, PaymentError> {
    let stored: String = row.try_get("fingerprint")?;
    if stored != fingerprint {
        return Err(PaymentError::KeyReused);
    }
    let response: String = row.try_get("response")?;
    let bytes = from_hex(&response)
        .ok_or_else(|| PaymentError::Corrupt("idempotency response is not hex".into()))?;
    Payment::decode(bytes.as_slice()).map_err(|e| PaymentError::Corrupt(e.to_string()))
}

async fn fetch<'c, E>(executor: E, payment_id: &str) -> Result<Option<Payment>, PaymentError>
where
    E: sqlx::Executor<'c, Database = Any>,
{
    sqlx::query(&format!(
        "SELECT {COLUMNS} FROM payments WHERE payment_id = $1"
    ))
    .bind(payment_id)
    .fetch_optional(executor)
    .await?
    .as_ref()
    .map(payment_from_row)
    .transpose()
}

fn payment_from_row(row: &AnyRow) -> Result<Payment, PaymentError> {
    let state: i64 = row.try_get("state")?;
    let state = i32::try_from(state)
        .ok()
        .and_then(|s| PaymentState::try_from(s).ok())
        .ok_or_else(|| PaymentError::Corrupt(format!("unknown payment state {state}")))?;
    Ok(Payment {
        payment_id: row.try_get("payment_id")?,
        order_id: row.try_get("order_id")?,
        amount: Some(Money {
            currency_code: row.try_get("currency_code")?,
            amount_minor: row.try_get("amount_minor")?,
        }),
        state: state as i32,
        decline_reason: row.try_get("decline_reason")?,
        card_last4: row.try_get("card_last4")?,
        refund_reason: row.try_get("refund_reason")?,
        create_time: Some(timestamp(row.try_get("create_time")?)),
        update_time: Some(timestamp(row.try_get("update_time")?)),
    })
}
