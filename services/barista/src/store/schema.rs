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
