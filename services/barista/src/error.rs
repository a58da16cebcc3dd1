//! What can go wrong in the barista service, and the one place where it
//! turns into a gRPC status.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// A barista operation that did not happen.
#[derive(Debug, thiserror::Error)]
pub enum BaristaError {
    /// No order has this id.
    #[error("order {0} not found")]
    NotFound(String),

    /// The menu has no item with this id.
    #[error("{0:?} is not on the menu (see GetMenu)")]
    NotOnTheMenu(String),

    /// Entries of a batch name drinks that are not on the menu.
    #[error("requests[{}].item_id {item_id:?} is not on the menu (see GetMenu); nothing in the batch was stored", entries[0])]
    NotOnTheMenuIn {
        /// The first entry's drink.
        item_id: String,
        /// Every such entry's index.
        entries: Vec<usize>,
    },

    /// A station and its queue are full.
    #[error("the shop is full: every {station} machine is busy and its queue is full; retry later")]
    ShopFull {
        /// The full station.
        station: &'static str,
        /// About when a place frees up.
        retry_after: Duration,
    },

    /// The barista drives as many orders as it may (`--max-orders`).
    #[error(
        "the barista is busy: it drives {orders} orders, as many as it takes at once (its memory's bound); retry later"
    )]
    Busy {
        /// The bound.
        orders: usize,
        /// About when an order ends.
        retry_after: Duration,
    },

    /// As many orders as the barista takes in at once are being placed.
    #[error(
        "the barista is busy: {placing} orders are being placed ahead of this request, as many as it takes in at once; retry later"
    )]
    Crowded {
        /// The orders in placement at once, at most.
        placing: usize,
        /// About when an order ends.
        retry_after: Duration,
    },

    /// A batch has more new orders than the barista drives at once.
    #[error(
        "the batch has {needed} new orders, and this barista drives at most {orders} at once (its memory's bound); split it"
    )]
    BatchOverBound {
        /// The new orders of the batch.
        needed: usize,
        /// The bound.
        orders: usize,
    },

    /// The idempotency key was used before for a different request.
    #[error("idempotency key was already used with a different request")]
    KeyReused,

    /// A batch needs more places at a station than it has in all.
    #[error(
        "the batch has {needed} new orders for the {station} station, which takes at most {places} at a time (machines and queue); split it"
    )]
    BatchTooLarge {
        /// The station too small.
        station: &'static str,
        /// The places the batch needs there.
        needed: usize,
        /// The places the station has.
        places: usize,
    },

    /// The idempotency key of a batch's entry was used before for a
    /// different request.
    #[error(
        "requests[{index}].idempotency_key was already used with a different request; nothing in the batch was stored"
    )]
    KeyReusedIn {
        /// The entry's index in the batch.
        index: usize,
    },

    /// The order cannot be cancelled any more.
    #[error("order {order_id} cannot be cancelled: {why}")]
    NotCancellable {
        /// The order.
        order_id: String,
        /// Why not.
        why: String,
    },

    /// The database failed.
    #[error("order database error")]
    Store(#[from] sqlx::Error),
}

impl BaristaError {
    /// The shop is full at `station`: a place frees up in about one drink's
    /// time there.
    pub(crate) fn full(station: &crate::stations::Station) -> Self {
        BaristaError::ShopFull {
            station: station.name,
            retry_after: station.duration,
        }
    }
}

impl From<BaristaError> for Status {
    fn from(error: BaristaError) -> Self {
        match &error {
            BaristaError::NotFound(_) => Status::not_found(error.to_string()),
            // The item a request names does not exist, as AIP-193 has it:
            // NOT_FOUND with the resource named, not a malformed request.
            BaristaError::NotOnTheMenu(item_id) => Status::with_error_details(
                Code::NotFound,
                error.to_string(),
                ErrorDetails::with_resource_info(
                    "brewmesh.barista.v1.MenuItem",
                    item_id,
                    "",
                    "not on the menu; GetMenu lists what is",
                ),
            ),
            // NOT_FOUND as for one order, with each entry named as well.
            BaristaError::NotOnTheMenuIn { item_id, entries } => {
                let mut details = ErrorDetails::with_resource_info(
                    "brewmesh.barista.v1.MenuItem",
                    item_id,
                    "",
                    "not on the menu; GetMenu lists what is",
                );
                let violations: Vec<tonic_types::FieldViolation> = entries
                    .iter()
                    .take(brewmesh::validate::MAX_VIOLATIONS)
                    .map(|i| {
                        tonic_types::FieldViolation::new(
                            format!("requests[{i}].item_id"),
                            "is not on the menu (see GetMenu)",
                        )
                    })
                    .collect();
                details.set_bad_request(violations);
                Status::with_error_details(Code::NotFound, error.to_string(), details)
            }
            // RetryInfo for people and REST clients; grpc-retry-pushback-ms
            // (gRFC A6) for gRPC clients, which skip this replica that long.
            BaristaError::ShopFull { retry_after, .. }
            | BaristaError::Busy { retry_after, .. }
            | BaristaError::Crowded { retry_after, .. } => {
                brewmesh_station::machines::full(error.to_string(), *retry_after)
            }
            BaristaError::BatchTooLarge { station, .. } => {
                too_large(error.to_string(), format!("stations/{station}"))
            }
            BaristaError::BatchOverBound { .. } => {
                too_large(error.to_string(), "barista/orders_in_flight".into())
            }
            BaristaError::KeyReused => brewmesh_runtime::idempotency::reused(error.to_string()),
            BaristaError::KeyReusedIn { index } => brewmesh_runtime::idempotency::reused_at(
                error.to_string(),
                &format!("requests[{index}].idempotency_key"),
            ),
            BaristaError::NotCancellable { order_id, why } => Status::with_error_details(
                Code::FailedPrecondition,
                error.to_string(),
                ErrorDetails::with_precondition_failure_violation(
                    "STATE",
                    format!("orders/{order_id}"),
                    why,
                ),
            ),
            BaristaError::Store(source) => brewmesh_runtime::db::status(source, "order"),
        }
    }
}

/// More than the shop holds: no retry can help (a negative pushback says
/// so, gRFC A6), the batch must be split.
fn too_large(message: String, subject: String) -> Status {
    let mut metadata = tonic::metadata::MetadataMap::new();
    metadata.insert(
        "grpc-retry-pushback-ms",
        tonic::metadata::MetadataValue::from(-1i64),
    );
    let details = ErrorDetails::with_quota_failure_violation(subject, message.clone());
    Status::with_error_details_and_metadata(Code::ResourceExhausted, message, details, metadata)
}
