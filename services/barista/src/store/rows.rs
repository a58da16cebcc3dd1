//! Rows into the saga's and the API's types; a value the code does not know
//! (a state, a step, an event type) is a decode error naming it, and
//! [`readable`] reads a set of rows past the ones that fail: one bad row
//! must stop neither a replica nor a page.

use sqlx::Row;
use sqlx::any::AnyRow;

use brewmesh::pb::barista::v1::{Order, OrderEvent, OrderEventType, OrderState};
use brewmesh::pb::payment::v1::Money;
use brewmesh_runtime::time::timestamp;

use super::{Inserted, OrderRecord, Step};

fn corrupt(what: String) -> sqlx::Error {
    sqlx::Error::Decode(what.into())
}

/// The rows `read` can read; each one it cannot is reported (a warning
/// naming the order and why, and `brewmesh_unreadable_rows`) and skipped.
pub(super) fn readable<T>(
    rows: &[AnyRow],
    table: &'static str,
    read: impl Fn(&AnyRow) -> Result<T, sqlx::Error>,
) -> Vec<T> {
    rows.iter()
        .filter_map(|row| match read(row) {
            Ok(value) => Some(value),
            Err(error) => {
                let order_id: String = row.try_get("order_id").unwrap_or_default();
                tracing::warn!(table, %order_id, %error, "unreadable row: skipped");
                crate::observe::unreadable_row(table);
                None
            }
        })
        .collect()
}

/// The state stored as `value`.
pub(super) fn order_state(value: i64) -> Result<OrderState, sqlx::Error> {
    i32::try_from(value)
        .ok()
        .and_then(|v| OrderState::try_from(v).ok())
        .ok_or_else(|| corrupt(format!("unknown order state {value}")))
}

/// An order row (selected with [`super::schema::COLUMNS`]).
pub(super) fn record(row: &AnyRow) -> Result<OrderRecord, sqlx::Error> {
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
        customer: row.try_get("customer")?,
    })
}

/// The key's earlier order (a row with its `fingerprint`), or
/// [`Inserted::KeyReused`] if it was placed by a different request.
pub(super) fn existing(row: &AnyRow, fingerprint: &str) -> Result<Inserted, sqlx::Error> {
    let stored: String = row.try_get("fingerprint")?;
    if stored != fingerprint {
        return Ok(Inserted::KeyReused);
    }
    Ok(Inserted::Existing(record(row)?.order))
}

/// An `order_events` row.
pub(super) fn event(row: &AnyRow) -> Result<OrderEvent, sqlx::Error> {
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
