//! The order path's writes: an order's insert, and its changes with the
//! events that explain them, each applied in a transaction it may share.
//!
//! On SQLite one task writes: it takes the writes queued meanwhile (up to
//! [`MAX_BATCH`]) and applies them in one transaction. SQLite has one
//! writer, and here one connection (see `brewmesh_runtime::db`); a transaction per
//! write paid BEGIN, COMMIT and the connection's hand-over for every write
//! while every other write waited (BENCHMARKS.md, "the barista's write
//! path"). Batched, those costs are shared. Each write still sees the ones
//! before it (two steps of one order in one batch apply in turn), its guard
//! still decides alone, and if any write fails, the batch is rolled back
//! and each write is applied again alone, so one bad write fails only
//! itself. On PostgreSQL each write has a transaction of its own.

use sqlx::{Any, AnyPool, Row, Transaction};
use tokio::sync::{mpsc, oneshot};

use brewmesh::pb::barista::v1::{OrderEvent, OrderEventType, OrderState};
use brewmesh_runtime::time::{now_micros, timestamp};

use super::schema::COLUMNS;
use super::{Inserted, InsertedAll, NewOrder, Step, rows};

/// At most this many writes share a transaction.
pub(super) const MAX_BATCH: usize = 128;

type Tx = Transaction<'static, Any>;

/// A write of the order path, applied inside a transaction.
pub(super) trait Apply {
    /// What the write tells its caller once committed.
    type Output: Send;
    /// Applies the write in `tx` at time `now` (micros).
    fn apply(
        &self,
        tx: &mut Tx,
        now: i64,
    ) -> impl Future<Output = Result<Self::Output, sqlx::Error>> + Send;
}

/// A new order, leased to `owner` until `lease_until` (micros).
#[derive(Debug)]
pub(super) struct InsertOrder {
    pub(super) new: NewOrder,
    pub(super) owner: String,
    pub(super) lease_until: i64,
}

/// New orders stored together or not at all, each leased to `owner` until
/// `lease_until` (micros).
#[derive(Debug)]
pub(super) struct InsertOrders {
    pub(super) news: Vec<NewOrder>,
    pub(super) owner: String,
    pub(super) lease_until: i64,
}

/// A guarded change of one order and the events it explains (see
/// [`super::Change`]), owned so that it can wait in the writer's queue.
#[derive(Debug)]
pub(super) struct Update {
    pub(super) order_id: String,
    pub(super) state: Option<i64>,
    pub(super) step: Option<&'static str>,
    pub(super) payment_id: Option<String>,
    pub(super) failure_reason: Option<String>,
    pub(super) from: Vec<i64>,
    pub(super) from_step: Option<&'static str>,
    pub(super) owner: Option<String>,
    pub(super) events: Vec<(OrderEventType, String)>,
}

/// A write waiting for its transaction, and where its outcome goes once
/// that transaction commits.
#[derive(Debug)]
pub(super) struct Job<W: Apply> {
    write: W,
    reply: oneshot::Sender<Result<W::Output, sqlx::Error>>,
    /// The write's outcome in the batch's transaction, kept until it commits.
    applied: Option<W::Output>,
}

impl<W: Apply> Job<W> {
    /// `write`, and the receiver of its outcome.
    pub(super) fn new(write: W) -> (Self, oneshot::Receiver<Result<W::Output, sqlx::Error>>) {
        let (reply, outcome) = oneshot::channel();
        let job = Self {
            write,
            reply,
            applied: None,
        };
        (job, outcome)
    }

    async fn apply(&mut self, tx: &mut Tx, now: i64) -> Result<(), sqlx::Error> {
        self.applied = Some(self.write.apply(tx, now).await?);
        Ok(())
    }

    /// Tells the caller what its committed write did.
    fn answer(self) {
        if let Some(output) = self.applied {
            let _ = self.reply.send(Ok(output));
        }
    }

    /// Applies the write in a transaction of its own, and answers.
    async fn alone(self, pool: &AnyPool) {
        let outcome = write_alone(pool, &self.write).await;
        let _ = self.reply.send(outcome);
    }
}

/// Any write in the writer's queue.
// An insert's slot holds the new order until commit: a box per write would
// cost more than the queue's few hundred bytes a slot.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(super) enum Queued {
    Insert(Job<InsertOrder>),
    InsertAll(Job<InsertOrders>),
    Update(Job<Update>),
}

impl Queued {
    async fn apply(&mut self, tx: &mut Tx, now: i64) -> Result<(), sqlx::Error> {
        match self {
            Queued::Insert(job) => job.apply(tx, now).await,
            Queued::InsertAll(job) => job.apply(tx, now).await,
            Queued::Update(job) => job.apply(tx, now).await,
        }
    }

    fn answer(self) {
        match self {
            Queued::Insert(job) => job.answer(),
            Queued::InsertAll(job) => job.answer(),
            Queued::Update(job) => job.answer(),
        }
    }

    async fn alone(self, pool: &AnyPool) {
        match self {
            Queued::Insert(job) => job.alone(pool).await,
            Queued::InsertAll(job) => job.alone(pool).await,
            Queued::Update(job) => job.alone(pool).await,
        }
    }
}

/// The SQLite writer; see the module's documentation.
pub(super) async fn write_in_batches(pool: AnyPool, mut queue: mpsc::Receiver<Queued>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        if batch.len() > 1 {
            match write_together(&pool, &mut batch).await {
                Ok(()) => {
                    batch.drain(..).for_each(Queued::answer);
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, writes = batch.len(), "a batch of writes failed; writing each alone");
                }
            }
        }
        for queued in batch.drain(..) {
            queued.alone(&pool).await;
        }
    }
}

/// Applies `batch` in one transaction.
async fn write_together(pool: &AnyPool, batch: &mut [Queued]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    for queued in batch.iter_mut() {
        queued.apply(&mut tx, now_micros()).await?;
    }
    tx.commit().await
}

/// Applies `write` in a transaction of its own.
pub(super) async fn write_alone<W: Apply>(
    pool: &AnyPool,
    write: &W,
) -> Result<W::Output, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let output = write.apply(&mut tx, now_micros()).await?;
    tx.commit().await?;
    Ok(output)
}

impl Apply for InsertOrder {
    type Output = Inserted;

    /// Stores the new order with its ACCEPTED event, or finds what its key
    /// was used for before.
    async fn apply(&self, tx: &mut Tx, now: i64) -> Result<Inserted, sqlx::Error> {
        insert(tx, &self.new, &self.owner, self.lease_until, now).await
    }
}

impl Apply for InsertOrders {
    type Output = InsertedAll;

    /// Stores every new order with its ACCEPTED event, or finds what its
    /// key was used for before; if one key was used for another request,
    /// none of them. A savepoint takes back what the batch wrote so far,
    /// and nothing of the writes sharing its transaction.
    async fn apply(&self, tx: &mut Tx, now: i64) -> Result<InsertedAll, sqlx::Error> {
        sqlx::query("SAVEPOINT insert_all")
            .execute(&mut **tx)
            .await?;
        let mut stored = Vec::with_capacity(self.news.len());
        for (index, new) in self.news.iter().enumerate() {
            match insert(tx, new, &self.owner, self.lease_until, now).await? {
                Inserted::KeyReused => {
                    sqlx::query("ROLLBACK TO SAVEPOINT insert_all")
                        .execute(&mut **tx)
                        .await?;
                    sqlx::query("RELEASE SAVEPOINT insert_all")
                        .execute(&mut **tx)
                        .await?;
                    return Ok(InsertedAll::KeyReused(index));
                }
                inserted => stored.push(inserted),
            }
        }
        sqlx::query("RELEASE SAVEPOINT insert_all")
            .execute(&mut **tx)
            .await?;
        Ok(InsertedAll::Stored(stored))
    }
}

/// Stores `new`, leased to `owner` until `lease_until`, with its ACCEPTED
/// event, or finds what its key was used for before.
async fn insert(
    tx: &mut Tx,
    new: &NewOrder,
    owner: &str,
    lease_until: i64,
    now: i64,
) -> Result<Inserted, sqlx::Error> {
    let order_id = brewmesh_runtime::ids::new("ord");
    // RETURNING gives the new row back in the same round trip; on a
    // conflict it returns nothing and the key's earlier order is read.
    let inserted = sqlx::query(&format!(
        "INSERT INTO orders (idempotency_key, fingerprint, {COLUMNS}, lease_until) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17) \
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
    .bind("") // payment_id: none yet
    .bind("") // failure_reason
    .bind(now) // create_time
    .bind(now) // update_time
    .bind(owner)
    .bind(&new.customer)
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
        return rows::existing(&row, &new.fingerprint);
    };
    let record = rows::record(&row)?;
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

impl Apply for Update {
    /// The events as stored, or `None` if the guard refused the change.
    type Output = Option<Vec<OrderEvent>>;

    async fn apply(&self, tx: &mut Tx, now: i64) -> Result<Self::Output, sqlx::Error> {
        // $1..$6 are the new values (NULL keeps the old one), then the guard.
        let mut sql = String::from(
            "UPDATE orders SET state = COALESCE($1, state), saga_step = COALESCE($2, saga_step), \
             payment_id = COALESCE($3, payment_id), failure_reason = COALESCE($4, failure_reason), \
             update_time = $5 WHERE order_id = $6 AND state IN (",
        );
        let mut last = 6;
        let mut param = || {
            last += 1;
            format!("${last}")
        };
        let placeholders: Vec<String> = self.from.iter().map(|_| param()).collect();
        sql.push_str(&placeholders.join(", "));
        sql.push(')');
        if self.from_step.is_some() {
            sql.push_str(&format!(" AND saga_step = {}", param()));
        }
        if self.owner.is_some() {
            sql.push_str(&format!(" AND owner = {}", param()));
        }
        sql.push_str(" RETURNING state");
        let mut query = sqlx::query(&sql)
            .bind(self.state)
            .bind(self.step)
            .bind(self.payment_id.as_deref())
            .bind(self.failure_reason.as_deref())
            .bind(now)
            .bind(self.order_id.as_str());
        for state in &self.from {
            query = query.bind(*state);
        }
        if let Some(step) = self.from_step {
            query = query.bind(step);
        }
        if let Some(owner) = &self.owner {
            query = query.bind(owner.as_str());
        }
        let Some(state) = query.fetch_optional(&mut **tx).await? else {
            return Ok(None);
        };
        let state = rows::order_state(state.try_get("state")?)?;
        let mut stored = Vec::with_capacity(self.events.len());
        for (event_type, detail) in &self.events {
            stored.push(append_event(tx, &self.order_id, *event_type, state, detail, now).await?);
        }
        Ok(Some(stored))
    }
}

async fn append_event(
    tx: &mut Tx,
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
