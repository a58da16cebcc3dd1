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
use brewmesh_runtime::db::{placeholders, rows};
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

/// One entry of a batch: its idempotency key, its request's fingerprint,
/// and what it asks for.
#[derive(Debug, Clone)]
pub struct Entry<T> {
    /// The entry's idempotency key.
    pub key: String,
    /// The fingerprint of the entry's request.
    pub fingerprint: String,
    /// The new payment, or the payment to move.
    pub ask: T,
}

/// What each entry of a batch came to, in the batch's order.
pub type Outcomes = Vec<Result<Payment, PaymentError>>;

/// Rows of a multi-row statement per round trip: 10 columns × 100 rows
/// stays far below SQLite's and PostgreSQL's limits on parameters.
const CHUNK: usize = 100;

impl Ledger {
    /// Records every new payment of `entries`, each under its key (or
    /// returns what its key made), as [`Self::authorize`] does for one —
    /// in one transaction, with a few statements for the whole batch: the
    /// keys are claimed together with their responses, the payments
    /// inserted together.
    pub async fn authorize_all(
        &self,
        entries: &[Entry<NewPayment>],
    ) -> Result<Outcomes, PaymentError> {
        let now = now_micros();
        let mut tx = self.pool.begin().await?;
        let firsts = firsts(entries);
        let built: Vec<Payment> = entries
            .iter()
            .map(|e| {
                let (state, decline_reason) = match &e.ask.outcome {
                    Ok(()) => (PaymentState::Authorized, String::new()),
                    Err(reason) => (PaymentState::Declined, reason.clone()),
                };
                Payment {
                    payment_id: brewmesh_runtime::ids::new("pay"),
                    order_id: e.ask.order_id.clone(),
                    amount: Some(e.ask.amount.clone()),
                    state: state as i32,
                    decline_reason,
                    card_last4: e.ask.card_last4.clone(),
                    refund_reason: String::new(),
                    create_time: Some(timestamp(now)),
                    update_time: Some(timestamp(now)),
                }
            })
            .collect();
        let Claimed { mine, mut outcomes } = claim_batch(
            &mut tx,
            entries,
            &firsts,
            |i| to_hex(&built[i].encode_to_vec()),
            now,
        )
        .await?;
        let new: Vec<&Payment> = mine.iter().map(|&i| &built[i]).collect();
        for chunk in new.chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO payments ({COLUMNS}) VALUES {}",
                rows(chunk.len(), 10, 1)
            );
            let mut query = sqlx::query(&sql);
            for p in chunk {
                let amount = p.amount.clone().unwrap_or_default();
                query = query
                    .bind(&p.payment_id)
                    .bind(&p.order_id)
                    .bind(amount.currency_code)
                    .bind(amount.amount_minor)
                    .bind(i64::from(p.state))
                    .bind(&p.decline_reason)
                    .bind(&p.card_last4)
                    .bind("")
                    .bind(now)
                    .bind(now);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        for &i in &mine {
            outcomes[i] = Some(Ok(built[i].clone()));
        }
        Ok(repeat_for_duplicates(entries, &firsts, outcomes))
    }

    /// Moves every payment of `entries` through `transition`, each under
    /// its key, as [`Self::transition`] does for one — in one transaction:
    /// the keys claimed together, the payments moved by one UPDATE per
    /// [`CHUNK`], and the keys of entries that moved nothing given back.
    pub async fn transition_all(
        &self,
        entries: &[Entry<String>],
        transition: Transition<'_>,
    ) -> Result<Outcomes, PaymentError> {
        let now = now_micros();
        let mut tx = self.pool.begin().await?;
        let firsts = firsts(entries);
        // Claimed without a response yet: it is known once the payment moved.
        let Claimed { mine, mut outcomes } =
            claim_batch(&mut tx, entries, &firsts, |_| String::new(), now).await?;

        // The first claimed entry of each payment moves it; another entry
        // for the same payment comes after it, as two calls would.
        let mut movers = std::collections::HashMap::new();
        let mut after = Vec::new();
        for &i in &mine {
            match movers.entry(entries[i].ask.as_str()) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(i);
                }
                std::collections::hash_map::Entry::Occupied(_) => after.push(i),
            }
        }
        let (from, to) = transition.states();
        let reason = match transition {
            Transition::Refund(reason) => reason,
            Transition::Capture | Transition::Void => "",
        };
        let ids: Vec<&str> = movers.keys().copied().collect();
        let mut moved = std::collections::HashMap::new();
        for chunk in ids.chunks(CHUNK) {
            let sql = format!(
                "UPDATE payments SET state = $1, refund_reason = $2, update_time = $3 \
                 WHERE state = $4 AND payment_id IN ({}) RETURNING {COLUMNS}",
                placeholders(5, chunk.len())
            );
            let mut query = sqlx::query(&sql)
                .bind(to as i64)
                .bind(reason)
                .bind(now)
                .bind(from as i64);
            for id in chunk {
                query = query.bind(*id);
            }
            for row in query.fetch_all(&mut *tx).await? {
                let payment = payment_from_row(&row)?;
                moved.insert(payment.payment_id.clone(), payment);
            }
        }
        // Those that did not move: why, read as they stand.
        let stuck: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| !moved.contains_key(*id))
            .collect();
        let mut current = std::collections::HashMap::new();
        for chunk in stuck.chunks(CHUNK) {
            let sql = format!(
                "SELECT {COLUMNS} FROM payments WHERE payment_id IN ({})",
                placeholders(1, chunk.len())
            );
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(*id);
            }
            for row in query.fetch_all(&mut *tx).await? {
                let payment = payment_from_row(&row)?;
                current.insert(payment.payment_id.clone(), payment);
            }
        }
        let refused = |payment_id: &str, state: Option<PaymentState>| match state {
            None => PaymentError::NotFound(payment_id.to_owned()),
            Some(state) => PaymentError::IllegalTransition {
                payment_id: payment_id.to_owned(),
                from: state,
                action: transition.name(),
                needed: from,
            },
        };
        // Every claimed key is given back, then those that moved a payment
        // stored again with their responses.
        let mut answered = Vec::new();
        for (&payment_id, &i) in &movers {
            outcomes[i] = Some(match moved.get(payment_id) {
                Some(payment) => {
                    answered.push((
                        entries[i].key.as_str(),
                        entries[i].fingerprint.as_str(),
                        to_hex(&payment.encode_to_vec()),
                    ));
                    Ok(payment.clone())
                }
                None => Err(refused(
                    payment_id,
                    current.get(payment_id).map(|p| p.state()),
                )),
            });
        }
        for &i in &after {
            let payment_id = entries[i].ask.as_str();
            let state = match moved.get(payment_id) {
                Some(_) => Some(to),
                None => current.get(payment_id).map(|p| p.state()),
            };
            outcomes[i] = Some(Err(refused(payment_id, state)));
        }
        let released: Vec<&str> = mine.iter().map(|&i| entries[i].key.as_str()).collect();
        for chunk in released.chunks(CHUNK) {
            let sql = format!(
                "DELETE FROM idempotency_keys WHERE idempotency_key IN ({})",
                placeholders(1, chunk.len())
            );
            let mut query = sqlx::query(&sql);
            for key in chunk {
                query = query.bind(*key);
            }
            query.execute(&mut *tx).await?;
        }
        claim_all(&mut tx, &answered, now).await?;
        tx.commit().await?;
        Ok(repeat_for_duplicates(entries, &firsts, outcomes))
    }
}

/// For each entry, the index of the first entry with its key.
fn firsts<T>(entries: &[Entry<T>]) -> Vec<usize> {
    let mut first = std::collections::HashMap::new();
    entries
        .iter()
        .enumerate()
        .map(|(i, e)| *first.entry(e.key.as_str()).or_insert(i))
        .collect()
}

/// A batch's keys once claimed: the entries whose keys this batch holds
/// now (the first entry of each key), and the outcomes so far — those of
/// the entries whose keys were used before, replayed or refused.
struct Claimed {
    mine: Vec<usize>,
    outcomes: Vec<Option<Result<Payment, PaymentError>>>,
}

/// Claims the key of each first entry of its key (`firsts`, from
/// [`firsts`]) with `response(index)` as its response, and answers the
/// entries whose keys were taken from what those keys made.
async fn claim_batch<T>(
    tx: &mut Transaction<'static, Any>,
    entries: &[Entry<T>],
    firsts: &[usize],
    response: impl Fn(usize) -> String,
    now: i64,
) -> Result<Claimed, PaymentError> {
    let fresh: Vec<usize> = (0..entries.len()).filter(|i| firsts[*i] == *i).collect();
    let claims: Vec<(&str, &str, String)> = fresh
        .iter()
        .map(|&i| {
            (
                entries[i].key.as_str(),
                entries[i].fingerprint.as_str(),
                response(i),
            )
        })
        .collect();
    let claimed = claim_all(tx, &claims, now).await?;
    let (mine, taken): (Vec<usize>, Vec<usize>) = fresh
        .into_iter()
        .partition(|&i| claimed.contains(&entries[i].key));
    let mut outcomes = (0..entries.len()).map(|_| None).collect::<Vec<_>>();
    replays(tx, entries, &taken, &mut outcomes).await?;
    Ok(Claimed { mine, outcomes })
}

/// Inserts each free key of `claims` (key, fingerprint, response) and
/// returns those it inserted; a key another request holds is left alone.
async fn claim_all(
    tx: &mut Transaction<'static, Any>,
    claims: &[(&str, &str, String)],
    now: i64,
) -> Result<std::collections::HashSet<String>, PaymentError> {
    let mut claimed = std::collections::HashSet::with_capacity(claims.len());
    // In key order: two batches sharing keys on PostgreSQL wait for each
    // other in the same order, never in a circle.
    let mut claims: Vec<&(&str, &str, String)> = claims.iter().collect();
    claims.sort_unstable_by_key(|c| c.0);
    for chunk in claims.chunks(CHUNK) {
        let sql = format!(
            "INSERT INTO idempotency_keys (idempotency_key, fingerprint, response, create_time) \
             VALUES {} ON CONFLICT (idempotency_key) DO NOTHING RETURNING idempotency_key",
            rows(chunk.len(), 4, 1)
        );
        let mut query = sqlx::query(&sql);
        for (key, fingerprint, response) in chunk.iter().copied() {
            query = query
                .bind(*key)
                .bind(*fingerprint)
                .bind(response.as_str())
                .bind(now);
        }
        for row in query.fetch_all(&mut **tx).await? {
            claimed.insert(row.try_get("idempotency_key")?);
        }
    }
    Ok(claimed)
}

/// The outcomes of the entries at `taken`, whose keys were used before:
/// the stored response, or [`PaymentError::KeyReused`].
async fn replays<T>(
    tx: &mut Transaction<'static, Any>,
    entries: &[Entry<T>],
    taken: &[usize],
    outcomes: &mut [Option<Result<Payment, PaymentError>>],
) -> Result<(), PaymentError> {
    for chunk in taken.chunks(CHUNK) {
        let sql = format!(
            "SELECT idempotency_key, fingerprint, response FROM idempotency_keys \
             WHERE idempotency_key IN ({})",
            placeholders(1, chunk.len())
        );
        let mut query = sqlx::query(&sql);
        for &i in chunk {
            query = query.bind(entries[i].key.as_str());
        }
        let rows = query.fetch_all(&mut **tx).await?;
        let mut by_key = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            by_key.insert(row.try_get::<String, _>("idempotency_key")?, row);
        }
        for &i in chunk {
            outcomes[i] = Some(match by_key.get(&entries[i].key) {
                Some(row) => stored_response(row, &entries[i].fingerprint),
                None => Err(PaymentError::Corrupt(format!(
                    "idempotency key {} vanished",
                    entries[i].key
                ))),
            });
        }
    }
    Ok(())
}

/// The outcomes with each repeated key's entry answered as its first entry
/// was, or [`PaymentError::KeyReused`] for another request.
fn repeat_for_duplicates<T>(
    entries: &[Entry<T>],
    firsts: &[usize],
    mut outcomes: Vec<Option<Result<Payment, PaymentError>>>,
) -> Outcomes {
    for i in 0..entries.len() {
        let first = firsts[i];
        if first == i {
            continue;
        }
        outcomes[i] = Some(if entries[i].fingerprint != entries[first].fingerprint {
            Err(PaymentError::KeyReused)
        } else {
            match &outcomes[first] {
                Some(Ok(payment)) => Ok(payment.clone()),
                Some(Err(error)) => Err(error.again()),
                None => Err(PaymentError::Corrupt("no outcome".into())),
            }
        });
    }
    outcomes
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err(PaymentError::Corrupt("no outcome".into()))))
        .collect()
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
