//! The saga's view of the payment service: authorize, capture and void,
//! each repeated until the ledger answers for good.
//!
//! [`Payments`] is what the saga needs; [`PaymentService`] is the real one,
//! over a balanced gRPC channel, with a deadline per attempt and a retry
//! budget shared by every saga, so a struggling payment service is not
//! buried under retries. Every request carries an idempotency key derived
//! from the order, which is what makes repeating it safe.

use std::time::Duration;

use tonic::{Code, Request, Response, Status};
use tower::retry::budget::{Budget as _, TpsBudget};

use brewmesh::pb::payment::v1::payments_client::PaymentsClient;
use brewmesh::pb::payment::v1::{AuthorizeRequest, CaptureRequest, Payment, VoidRequest};
use brewmesh_runtime::discovery::Balanced;

/// The longest wait between two attempts of one call.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The payment service refused a call for good (a retry would get the same
/// answer).
#[derive(Debug, thiserror::Error)]
#[error("payment refused: {0}")]
pub(crate) struct Refused(pub(crate) Status);

/// The payment calls of the saga. Each returns once the ledger has
/// answered: a payment, or a refusal that repeating cannot change.
#[tonic::async_trait]
pub(crate) trait Payments: Send + Sync + std::fmt::Debug {
    /// Holds the order's price on the card (a declined card is a payment
    /// in state DECLINED, not an error).
    async fn authorize(&self, request: AuthorizeRequest) -> Result<Payment, Refused>;
    /// Takes the held amount.
    async fn capture(&self, request: CaptureRequest) -> Result<Payment, Refused>;
    /// Releases the hold.
    async fn void(&self, request: VoidRequest) -> Result<Payment, Refused>;
}

/// The payment service over gRPC.
#[derive(Debug)]
pub(crate) struct PaymentService {
    client: PaymentsClient<Balanced>,
    /// The deadline of each attempt.
    timeout: Duration,
    /// Bounds retries of payment calls across every saga.
    retries: TpsBudget,
}

impl PaymentService {
    /// Calls through `client`, each attempt bounded by `timeout`.
    pub(crate) fn new(client: PaymentsClient<Balanced>, timeout: Duration) -> Self {
        Self {
            client,
            timeout,
            // As linkerd's default: retries may add 20% to the calls of the
            // last 10 s, plus 10 a second so a quiet shop can still retry.
            retries: TpsBudget::new(Duration::from_secs(10), 10, 0.2),
        }
    }

    /// Calls the payment service until it answers, backing off between
    /// attempts.
    async fn call<T, F, Fut>(
        &self,
        what: &str,
        key: &str,
        message: T,
        mut call: F,
    ) -> Result<Payment, Refused>
    where
        T: Clone,
        F: FnMut(PaymentsClient<Balanced>, Request<T>) -> Fut,
        Fut: Future<Output = Result<Response<Payment>, Status>>,
    {
        self.retries.deposit();
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut request = Request::new(message.clone());
            // The deadline the server sees (`grpc-timeout`).
            request.set_timeout(self.timeout);
            let attempt =
                tokio::time::timeout(self.timeout, call(self.client.clone(), request)).await;
            let status = match attempt {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) if !retryable(status.code()) => return Err(Refused(status)),
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded("payment call timed out"),
            };
            // Within the budget, retry after a short, growing wait; over it
            // (payment is struggling for everyone), wait the longest, so
            // sagas do not pile retries onto it.
            let wait = if self.retries.withdraw() {
                backoff
            } else {
                MAX_BACKOFF
            };
            tracing::warn!(call = what, idempotency_key = key, code = ?status.code(), error = status.message(), retry_in = ?wait, "payment call failed");
            tokio::time::sleep(
                wait + Duration::from_millis(fastrand::u64(0..=wait.as_millis() as u64 / 2)),
            )
            .await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

#[tonic::async_trait]
impl Payments for PaymentService {
    async fn authorize(&self, request: AuthorizeRequest) -> Result<Payment, Refused> {
        let key = request.idempotency_key.clone();
        self.call(
            "authorize",
            &key,
            request,
            |mut client, request| async move { client.authorize(request).await },
        )
        .await
    }

    async fn capture(&self, request: CaptureRequest) -> Result<Payment, Refused> {
        let key = request.idempotency_key.clone();
        self.call("capture", &key, request, |mut client, request| async move {
            client.capture(request).await
        })
        .await
    }

    async fn void(&self, request: VoidRequest) -> Result<Payment, Refused> {
        let key = request.idempotency_key.clone();
        self.call("void", &key, request, |mut client, request| async move {
            client.void(request).await
        })
        .await
    }
}

/// Whether a payment call may be repeated in the hope of another answer.
fn retryable(code: Code) -> bool {
    !matches!(
        code,
        Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::OutOfRange
    )
}
