//! The order path's writes: an order's insert, and its changes with the
//! events that explain them, each applied in a transaction it may share.
//!
//! On SQLite one task writes: it takes the writes queued meanwhile (up to
//! [`MAX_BATCH`]) and applies them in one transaction. SQLite has one
//! writer, and here one connection (see `brewmesh_runtime::db`); a transaction per
//! write paid BEGIN, COMMIT and the connection's hand-over for every write
//! while every other write waited (BENCHMARKS.md, "the barista's write
//! path"). Batched, those costs are shared — and so are the statements:
//! each one is a round trip to sqlx's SQLite thread, which a profile showed
//! to be most of the barista's CPU, so a batch is written with a few
//! multi-row statements (the new orders in one INSERT, their events in
//! another; then the changes in rounds — the first change of each order,
//! then the second, … — each round one `UPDATE … FROM (VALUES …)` and one
//! INSERT of its events). Each write still sees the ones before it (two
//! steps of one order in one batch apply in turn), its guard still decides
//! alone, and if any write fails, the batch is rolled back and each write
//! is applied again alone, so one bad write fails only itself. On
//! PostgreSQL each write has a transaction of its own (a batch of new
//! orders, one multi-row INSERT).

use sqlx::{Any, AnyPool, Row, Transaction};
use tokio::sync::{mpsc, oneshot};

use brewmesh::pb::barista::v1::{OrderEvent, OrderEventType, OrderState};
use brewmesh_runtime::db;
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

/// Applies `batch` in one transaction, with few statements (see the
/// module's documentation): the new orders first (none of the changes can
/// be to them: a saga starts once its insert is answered), then the
/// changes in rounds.
async fn write_together(pool: &AnyPool, batch: &mut [Queued]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let now = now_micros();
    let singles: Vec<(&NewOrder, &str, i64)> = batch
        .iter()
        .filter_map(|q| match q {
            Queued::Insert(job) => Some((
                &job.write.new,
                job.write.owner.as_str(),
                job.write.lease_until,
            )),
            _ => None,
        })
        .collect();
    let mut inserted = insert_many(&mut tx, &singles, now).await?.into_iter();
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    let mut changes = std::collections::HashMap::<&str, usize>::new();
    for (i, queued) in batch.iter().enumerate() {
        if let Queued::Update(job) = queued {
            let round = changes.entry(job.write.order_id.as_str()).or_default();
            if rounds.len() <= *round {
                rounds.push(Vec::new());
            }
            rounds[*round].push(i);
            *round += 1;
        }
    }
    let mut updated: Vec<Option<Option<Vec<OrderEvent>>>> = batch.iter().map(|_| None).collect();
    for round in &rounds {
        let updates: Vec<&Update> = round
            .iter()
            .filter_map(|&i| match &batch[i] {
                Queued::Update(job) => Some(&job.write),
                _ => None,
            })
            .collect();
        for (&i, outcome) in round
            .iter()
            .zip(update_round(&mut tx, &updates, now).await?)
        {
            updated[i] = Some(outcome);
        }
    }
    for (queued, updated) in batch.iter_mut().zip(updated) {
        match queued {
            Queued::Insert(job) => job.applied = inserted.next(),
            Queued::InsertAll(job) => job.apply(&mut tx, now).await?,
            Queued::Update(job) => job.applied = updated,
        }
    }
    tx.commit().await
}

/// Applies one round of changes, each to another order, with one UPDATE
/// and one INSERT of their events per [`ROWS`] changes: for each, the
/// events as stored, or `None` where its guard refused it.
async fn update_round(
    tx: &mut Tx,
    updates: &[&Update],
    now: i64,
) -> Result<Vec<Option<Vec<OrderEvent>>>, sqlx::Error> {
    let mut states = std::collections::HashMap::new();
    for chunk in updates.chunks(ROWS) {
        // Per row: the order, its new values (NULL keeps the old one), and
        // its guard: the states it may be in as a bit mask, the step and
        // the owner it must have (NULL: any).
        let sql = format!(
            "UPDATE orders SET state = COALESCE(v.column2, state), saga_step = COALESCE(v.column3, saga_step), \
             payment_id = COALESCE(v.column4, payment_id), failure_reason = COALESCE(v.column5, failure_reason), \
             update_time = $1 FROM (VALUES {}) AS v WHERE orders.order_id = v.column1 \
             AND ((v.column6 >> orders.state) & 1) = 1 \
             AND (v.column7 IS NULL OR orders.saga_step = v.column7) \
             AND (v.column8 IS NULL OR orders.owner = v.column8) RETURNING order_id, state",
            db::rows(chunk.len(), 8, 2)
        );
        let mut query = sqlx::query(&sql).bind(now);
        for u in chunk {
            let mask = u
                .from
                .iter()
                .fold(0i64, |m, s| m | 1i64.checked_shl(*s as u32).unwrap_or(0));
            query = query
                .bind(u.order_id.as_str())
                .bind(u.state)
                .bind(u.step)
                .bind(u.payment_id.as_deref())
                .bind(u.failure_reason.as_deref())
                .bind(mask)
                .bind(u.from_step)
                .bind(u.owner.as_deref());
        }
        for row in query.fetch_all(&mut **tx).await? {
            let order_id: String = row.try_get("order_id")?;
            states.insert(order_id, rows::order_state(row.try_get("state")?)?);
        }
    }
    let events: Vec<(&str, OrderEventType, OrderState, &str)> = updates
        .iter()
        .filter_map(|u| states.get(&u.order_id).map(|state| (u, *state)))
        .flat_map(|(u, state)| {
            u.events.iter().map(move |(event_type, detail)| {
                (u.order_id.as_str(), *event_type, state, detail.as_str())
            })
        })
        .collect();
    let mut stored = append_events(tx, &events, now)
        .await?
        .into_iter()
        .peekable();
    let mut outcomes = Vec::with_capacity(updates.len());
    for u in updates {
        if !states.contains_key(&u.order_id) {
            outcomes.push(None);
            continue;
        }
        let mine: Vec<OrderEvent> = (0..u.events.len()).filter_map(|_| stored.next()).collect();
        outcomes.push(Some(mine));
    }
    Ok(outcomes)
}

/// Rows of a multi-row statement: 17 columns × 50 rows stays far below
/// SQLite's limit on parameters.
const ROWS: usize = 50;

/// The highest event sequence of each of `order_ids` that has events, in
/// one statement.
pub(super) async fn last_sequences<'c, E: sqlx::Executor<'c, Database = Any>>(
    executor: E,
    order_ids: &[&str],
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    if order_ids.is_empty() {
        return Ok(Vec::new());
    }
    let sql = format!(
        "SELECT order_id, MAX(sequence) AS latest FROM order_events \
         WHERE order_id IN ({}) GROUP BY order_id",
        db::placeholders(1, order_ids.len())
    );
    let mut query = sqlx::query(&sql);
    for order_id in order_ids {
        query = query.bind(*order_id);
    }
    let rows = query.fetch_all(executor).await?;
    rows.iter()
        .map(|row| Ok((row.try_get("order_id")?, row.try_get("latest")?)))
        .collect()
}

/// Appends `events` (order, type, the order's state after it, detail), in
/// order, each after its order's last: one read of the last sequences and
/// one INSERT per [`ROWS`] events. The caller changed each order's row
/// first in the same transaction, so no other append can come between.
async fn append_events(
    tx: &mut Tx,
    events: &[(&str, OrderEventType, OrderState, &str)],
    now: i64,
) -> Result<Vec<OrderEvent>, sqlx::Error> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids: Vec<&str> = events.iter().map(|e| e.0).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut latest = std::collections::HashMap::<String, i64>::new();
    for chunk in ids.chunks(ROWS * 4) {
        latest.extend(last_sequences(&mut **tx, chunk).await?);
    }
    let stored: Vec<OrderEvent> = events
        .iter()
        .map(|(order_id, event_type, state, detail)| {
            let sequence = latest.entry((*order_id).to_owned()).or_insert(0);
            *sequence += 1;
            OrderEvent {
                order_id: (*order_id).to_owned(),
                sequence: *sequence,
                r#type: *event_type as i32,
                state: *state as i32,
                time: Some(timestamp(now)),
                detail: (*detail).to_owned(),
            }
        })
        .collect();
    for chunk in stored.chunks(ROWS) {
        let sql = format!(
            "INSERT INTO order_events (order_id, sequence, event_type, state, detail, event_time) VALUES {}",
            db::rows(chunk.len(), 6, 1)
        );
        let mut query = sqlx::query(&sql);
        for e in chunk {
            query = query
                .bind(e.order_id.as_str())
                .bind(e.sequence)
                .bind(i64::from(e.r#type))
                .bind(i64::from(e.state))
                .bind(e.detail.as_str())
                .bind(now);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(stored)
}

/// Stores each new order of `news` (with its owner and lease's end),
/// ACCEPTED with its first event, or finds what its key was used for
/// before: one INSERT per [`ROWS`] orders, one for their events, and a
/// read for each key used before.
async fn insert_many(
    tx: &mut Tx,
    news: &[(&NewOrder, &str, i64)],
    now: i64,
) -> Result<Vec<Inserted>, sqlx::Error> {
    if news.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = news
        .iter()
        .map(|_| brewmesh_runtime::ids::new("ord"))
        .collect();
    let mut records = std::collections::HashMap::new();
    for (chunk, chunk_ids) in news.chunks(ROWS).zip(ids.chunks(ROWS)) {
        // RETURNING gives the new rows back in the same round trip; a key
        // used before returns nothing, and its earlier order is read.
        let sql = format!(
            "INSERT INTO orders (idempotency_key, fingerprint, {COLUMNS}, lease_until) VALUES {} \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING {COLUMNS}",
            db::rows(chunk.len(), 17, 1)
        );
        let mut query = sqlx::query(&sql);
        for ((new, owner, lease_until), order_id) in chunk.iter().zip(chunk_ids) {
            query = query
                .bind(&new.idempotency_key)
                .bind(&new.fingerprint)
                .bind(order_id)
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
                .bind(*owner)
                .bind(&new.customer)
                .bind(*lease_until);
        }
        for row in query.fetch_all(&mut **tx).await? {
            let record = rows::record(&row)?;
            records.insert(record.order.order_id.clone(), record);
        }
    }
    let mut inserted = Vec::with_capacity(news.len());
    for ((new, _, _), order_id) in news.iter().zip(&ids) {
        inserted.push(match records.remove(order_id) {
            Some(record) => Inserted::New(record),
            None => {
                let row = sqlx::query(&format!(
                    "SELECT fingerprint, {COLUMNS} FROM orders WHERE idempotency_key = $1"
                ))
                .bind(&new.idempotency_key)
                .fetch_one(&mut **tx)
                .await?;
                rows::existing(&row, &new.fingerprint)?
            }
        });
    }
    let accepted: Vec<(&str, OrderEventType, OrderState, &str)> = inserted
        .iter()
        .filter_map(|i| match i {
            Inserted::New(record) => Some((
                record.order.order_id.as_str(),
                OrderEventType::Accepted,
                OrderState::Accepted,
                "",
            )),
            _ => None,
        })
        .collect();
    append_events(tx, &accepted, now).await?;
    Ok(inserted)
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
        let new = [(&self.new, self.owner.as_str(), self.lease_until)];
        let mut inserted = insert_many(tx, &new, now).await?;
        inserted
            .pop()
            .ok_or_else(|| sqlx::Error::Protocol("an insert answered nothing".into()))
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
        let news: Vec<(&NewOrder, &str, i64)> = self
            .news
            .iter()
            .map(|new| (new, self.owner.as_str(), self.lease_until))
            .collect();
        let stored = insert_many(tx, &news, now).await?;
        if let Some(index) = stored.iter().position(|i| matches!(i, Inserted::KeyReused)) {
            sqlx::query("ROLLBACK TO SAVEPOINT insert_all")
                .execute(&mut **tx)
                .await?;
            sqlx::query("RELEASE SAVEPOINT insert_all")
                .execute(&mut **tx)
                .await?;
            return Ok(InsertedAll::KeyReused(index));
        }
        sqlx::query("RELEASE SAVEPOINT insert_all")
            .execute(&mut **tx)
            .await?;
        Ok(InsertedAll::Stored(stored))
    }
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
