//! What can go wrong in the payment service, and the one place where it turns
//! into a gRPC status.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use brewmesh::pb::payment::v1::PaymentState;

/// A payment operation that did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PaymentError {
    /// No payment has this id.
    #[error("payment {0} not found")]
    NotFound(String),

    /// The state machine does not allow the transition.
    #[error("payment {payment_id} is {}; {action} needs it {}", state_name(*.from), state_name(*.needed))]
    IllegalTransition {
        /// The payment.
        payment_id: String,
        /// Its current state.
        from: PaymentState,
        /// The operation refused.
        action: &'static str,
        /// The state the operation needs.
        needed: PaymentState,
    },

    /// The idempotency key was used before for a different request.
    #[error("idempotency key was already used with a different request")]
    KeyReused,

    /// A stored payment or response could not be read back.
    #[error("the ledger holds an unreadable record: {0}")]
    Corrupt(String),

    /// The database failed.
    #[error("ledger database error")]
    Database(#[from] sqlx::Error),
}

impl PaymentError {
    /// The same error once more, for a batch's entry that repeats another
    /// (a database error is told by its message).
    pub fn again(&self) -> Self {
        match self {
            PaymentError::NotFound(id) => PaymentError::NotFound(id.clone()),
            PaymentError::IllegalTransition {
                payment_id,
                from,
                action,
                needed,
            } => PaymentError::IllegalTransition {
                payment_id: payment_id.clone(),
                from: *from,
                action,
                needed: *needed,
            },
            PaymentError::KeyReused => PaymentError::KeyReused,
            PaymentError::Corrupt(what) => PaymentError::Corrupt(what.clone()),
            PaymentError::Database(error) => PaymentError::Corrupt(error.to_string()),
        }
    }
}

fn state_name(state: PaymentState) -> &'static str {
    state
        .as_str_name()
        .strip_prefix("PAYMENT_STATE_")
        .unwrap_or("UNKNOWN")
}

impl From<PaymentError> for Status {
    fn from(error: PaymentError) -> Self {
        match &error {
            PaymentError::NotFound(_) => Status::not_found(error.to_string()),
            PaymentError::IllegalTransition { payment_id, .. } => Status::with_error_details(
                Code::FailedPrecondition,
                error.to_string(),
                ErrorDetails::with_precondition_failure_violation(
                    "STATE",
                    format!("payments/{payment_id}"),
                    error.to_string(),
                ),
            ),
            PaymentError::KeyReused => brewmesh_runtime::idempotency::reused(error.to_string()),
            PaymentError::Corrupt(_) => {
                tracing::error!(%error, "corrupt ledger record");
                Status::internal(error.to_string())
            }
            PaymentError::Database(source) => brewmesh_runtime::db::status(source, "ledger"),
        }
    }
}
