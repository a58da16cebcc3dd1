//! The order tables: their migrations, and the column list every read of an
//! order selects.

/// The schema's migrations, oldest first (see `brewmesh_runtime::db::Migration`):
/// append, never edit.
pub(super) const MIGRATIONS: &[brewmesh_runtime::db::Migration] = &[
    &[
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
    ],
    &[
        // Whose order it is: the subject the gateway authenticated ('' for an
        // order placed by a service, or before this column).
        "ALTER TABLE orders ADD COLUMN customer TEXT NOT NULL DEFAULT ''",
        "CREATE INDEX IF NOT EXISTS orders_customer ON orders (customer, order_id)",
    ],
];

/// The columns [`super::rows::record`] reads, in every query that returns
/// orders. The lease's end is not among them: only SQL reads it.
pub(super) const COLUMNS: &str = "order_id, item_id, customer_name, card_token, currency_code, \
                                  amount_minor, state, saga_step, payment_id, failure_reason, \
                                  create_time, update_time, owner, customer";

/// The PostgreSQL channel on which every commit of order events is
/// announced: `order_id sequence` pairs (the order's last event in the
/// statement), comma-separated, at most 100 orders per notification (a
/// payload stays under PostgreSQL's 8000 bytes).
pub(crate) const EVENTS_CHANNEL: &str = "brewmesh_order_events";

/// On PostgreSQL: the trigger that announces the order events each
/// statement inserts on [`EVENTS_CHANNEL`] (delivered when the transaction
/// commits). Replaced at every start, under a lock, so replicas starting
/// together do not collide.
const NOTIFY_ON_EVENTS: &str = "DO $do$ BEGIN
    PERFORM pg_advisory_xact_lock(7346210451);
    CREATE OR REPLACE FUNCTION brewmesh_order_events_notify() RETURNS trigger AS $fn$
    DECLARE payload TEXT;
    BEGIN
        FOR payload IN
            SELECT string_agg(order_id || ' ' || latest, ',')
            FROM (SELECT order_id, MAX(sequence) AS latest,
                         (ROW_NUMBER() OVER (ORDER BY order_id) - 1) / 100 AS page
                  FROM new_events GROUP BY order_id) AS last
            GROUP BY page
        LOOP
            PERFORM pg_notify('brewmesh_order_events', payload);
        END LOOP;
        RETURN NULL;
    END $fn$ LANGUAGE plpgsql;
    CREATE OR REPLACE TRIGGER order_events_notify AFTER INSERT ON order_events
        REFERENCING NEW TABLE AS new_events
        FOR EACH STATEMENT EXECUTE FUNCTION brewmesh_order_events_notify();
END $do$";

/// Installs (or replaces) the trigger behind [`EVENTS_CHANNEL`].
pub(super) async fn notify_on_events(pool: &sqlx::AnyPool) -> Result<(), sqlx::Error> {
    sqlx::query(NOTIFY_ON_EVENTS).execute(pool).await?;
    Ok(())
}
