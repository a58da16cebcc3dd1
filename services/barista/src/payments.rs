//! The saga's view of the payment service: authorize, capture and void,
//! each repeated until the ledger answers for good.
//!
//! [`Payments`] is what the saga needs; [`PaymentService`] is the real one,
//! over a balanced gRPC channel, with a deadline per attempt and a retry
//! budget shared by every saga, so a struggling payment service is not
//! buried under retries. Every request carries an idempotency key derived
//! from the order, which is what makes repeating it safe.
//!
//! Calls of one kind share a [`Line`]: a saga calling while no other is
//! calls alone (the unary RPC, in its own trace); one calling while others
//! are waits in the line, and the line sends whatever is waiting as one
//! batch RPC (BatchAuthorize, BatchCapture, BatchVoid) as soon as one of
//! its few calls in flight is free — smart batching: no delay is added to
//! wait for company, and a busier shop sends bigger batches.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tonic::{Code, Request, Status};
use tower::retry::budget::{Budget as _, TpsBudget};
use tracing::Instrument as _;

use brewmesh::pb::payment::v1::payment_outcome::Outcome;
use brewmesh::pb::payment::v1::payments_client::PaymentsClient;
use brewmesh::pb::payment::v1::{
    AuthorizeRequest, BatchAuthorizeRequest, BatchCaptureRequest, BatchVoidRequest, CaptureRequest,
    Payment, PaymentOutcome, VoidRequest,
};
use brewmesh_runtime::discovery::Balanced;

/// At most this many calls share one batch RPC.
const MAX_BATCH: usize = 1000;

/// Batch RPCs of one kind in flight at once, to spread over replicas.
const IN_FLIGHT: usize = 4;

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
    authorizations: Line<AuthorizeRequest>,
    captures: Line<CaptureRequest>,
    voids: Line<VoidRequest>,
}

/// A payment call that can also go in a batch.
pub(crate) trait Call: prost::Message + Clone + Default + 'static {
    /// The call alone.
    fn one(
        client: PaymentsClient<Balanced>,
        request: Request<Self>,
    ) -> impl Future<Output = Result<Payment, Status>> + Send;
    /// The calls `requests` in one batch: an outcome for each, in order.
    fn many(
        client: PaymentsClient<Balanced>,
        requests: Vec<Self>,
        timeout: Duration,
    ) -> impl Future<Output = Result<Vec<PaymentOutcome>, Status>> + Send;
}

/// `message` with the deadline the server sees (`grpc-timeout`).
fn request<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    request
}

impl Call for AuthorizeRequest {
    async fn one(
        mut client: PaymentsClient<Balanced>,
        request: Request<Self>,
    ) -> Result<Payment, Status> {
        Ok(client.authorize(request).await?.into_inner())
    }
    async fn many(
        mut client: PaymentsClient<Balanced>,
        requests: Vec<Self>,
        timeout: Duration,
    ) -> Result<Vec<PaymentOutcome>, Status> {
        let batch = request(BatchAuthorizeRequest { requests }, timeout);
        Ok(client.batch_authorize(batch).await?.into_inner().outcomes)
    }
}

impl Call for CaptureRequest {
    async fn one(
        mut client: PaymentsClient<Balanced>,
        request: Request<Self>,
    ) -> Result<Payment, Status> {
        Ok(client.capture(request).await?.into_inner())
    }
    async fn many(
        mut client: PaymentsClient<Balanced>,
        requests: Vec<Self>,
        timeout: Duration,
    ) -> Result<Vec<PaymentOutcome>, Status> {
        let batch = request(BatchCaptureRequest { requests }, timeout);
        Ok(client.batch_capture(batch).await?.into_inner().outcomes)
    }
}

impl Call for VoidRequest {
    async fn one(
        mut client: PaymentsClient<Balanced>,
        request: Request<Self>,
    ) -> Result<Payment, Status> {
        Ok(client.void(request).await?.into_inner())
    }
    async fn many(
        mut client: PaymentsClient<Balanced>,
        requests: Vec<Self>,
        timeout: Duration,
    ) -> Result<Vec<PaymentOutcome>, Status> {
        let batch = request(BatchVoidRequest { requests }, timeout);
        Ok(client.batch_void(batch).await?.into_inner().outcomes)
    }
}

/// A call waiting in a [`Line`]: the request, the span of the saga that
/// made it, and where its answer goes.
type Waiting<R> = (R, tracing::Span, oneshot::Sender<Result<Payment, Status>>);

/// The calls of one kind on their way; see the module's documentation.
#[derive(Debug)]
struct Line<R> {
    /// Calls of this kind under way (alone or waiting).
    busy: Arc<AtomicUsize>,
    queue: mpsc::UnboundedSender<Waiting<R>>,
}

/// Counts a call out of its line when it is done, however it ends.
struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<R: Call + Send> Line<R> {
    /// A line to `client`, its batches bounded by `timeout`; its task ends
    /// with the line.
    fn new(client: PaymentsClient<Balanced>, timeout: Duration) -> Self {
        // Unbounded, yet bounded by the sagas: each waits on one call at a
        // time, and the stations' admission bounds how many run.
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(send_in_batches(client, timeout, waiting));
        Self {
            busy: Arc::new(AtomicUsize::new(0)),
            queue,
        }
    }

    /// Sends `request`: alone if no other call of its kind is under way,
    /// or else in the line's next batch.
    async fn call(
        &self,
        client: PaymentsClient<Balanced>,
        request: R,
        timeout: Duration,
    ) -> Result<Payment, Status> {
        let alone = self.busy.fetch_add(1, Ordering::AcqRel) == 0;
        let _busy = Busy(Arc::clone(&self.busy));
        if alone {
            // Boxed: a call's future is large, and every saga waiting in
            // the line would carry it inline.
            return Box::pin(R::one(client, self::request(request, timeout))).await;
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((request, tracing::Span::current(), reply))
            .map_err(|_| Status::unavailable("the payment line is closed"))?;
        answer
            .await
            .unwrap_or_else(|_| Err(Status::unavailable("the payment batch was dropped")))
    }
}

/// The line's task: whatever waits, as one batch, whenever one of the
/// [`IN_FLIGHT`] calls is free.
async fn send_in_batches<R: Call + Send>(
    client: PaymentsClient<Balanced>,
    timeout: Duration,
    mut queue: mpsc::UnboundedReceiver<Waiting<R>>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut waiting = Vec::new();
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        if queue.recv_many(&mut waiting, MAX_BATCH).await == 0 {
            return; // the line is gone
        }
        let batch = std::mem::take(&mut waiting);
        let client = client.clone();
        tokio::spawn(async move {
            send(client, timeout, batch).await;
            drop(slot);
        });
    }
}

/// Sends `batch` (alone if it is one call), in the span of its first
/// saga, and answers each call.
async fn send<R: Call + Send>(
    client: PaymentsClient<Balanced>,
    timeout: Duration,
    batch: Vec<Waiting<R>>,
) {
    let span = batch
        .first()
        .map_or_else(tracing::Span::none, |w| w.1.clone());
    if batch.len() == 1 {
        for (call, span, reply) in batch {
            let answer = R::one(client.clone(), request(call, timeout))
                .instrument(span)
                .await;
            let _ = reply.send(answer);
        }
        return;
    }
    let (calls, replies): (Vec<R>, Vec<_>) = batch.into_iter().map(|(c, _, r)| (c, r)).unzip();
    let (calls_again, client_again) = (calls.clone(), client.clone());
    let count = calls.len();
    let answered = tokio::time::timeout(timeout, R::many(client, calls, timeout).instrument(span))
        .await
        .unwrap_or_else(|_| Err(Status::deadline_exceeded("payment batch timed out")));
    match answered {
        Ok(outcomes) if outcomes.len() == count => {
            for (outcome, reply) in outcomes.into_iter().zip(replies) {
                let _ = reply.send(answer_of(outcome));
            }
        }
        Ok(outcomes) => {
            let status = Status::internal(format!(
                "the payment batch answered {} outcomes for {count} calls",
                outcomes.len()
            ));
            replies
                .into_iter()
                .for_each(|r| drop(r.send(Err(status.clone()))));
        }
        // One malformed call refuses the whole batch: each is sent again
        // alone, so that only that one is refused.
        Err(status) if status.code() == Code::InvalidArgument => {
            for (call, reply) in calls_again.into_iter().zip(replies) {
                let client = client_again.clone();
                tokio::spawn(async move {
                    let _ = reply.send(R::one(client, request(call, timeout)).await);
                });
            }
        }
        Err(status) => replies
            .into_iter()
            .for_each(|r| drop(r.send(Err(status.clone())))),
    }
}

/// One entry's outcome as the call alone would have answered.
fn answer_of(outcome: PaymentOutcome) -> Result<Payment, Status> {
    use prost::Message as _;
    match outcome.outcome {
        Some(Outcome::Payment(payment)) => Ok(payment),
        Some(Outcome::Error(status)) => Err(Status::with_details(
            Code::from(status.code),
            status.message.clone(),
            tonic::codegen::Bytes::from(status.encode_to_vec()),
        )),
        None => Err(Status::internal("a payment batch entry without an outcome")),
    }
}

impl PaymentService {
    /// Calls through `client`, each attempt bounded by `timeout`.
    pub(crate) fn new(client: PaymentsClient<Balanced>, timeout: Duration) -> Self {
        Self {
            authorizations: Line::new(client.clone(), timeout),
            captures: Line::new(client.clone(), timeout),
            voids: Line::new(client.clone(), timeout),
            client,
            timeout,
            // As linkerd's default: retries may add 20% to the calls of the
            // last 10 s, plus 10 a second so a quiet shop can still retry.
            retries: TpsBudget::new(Duration::from_secs(10), 10, 0.2),
        }
    }

    /// Calls the payment service until it answers, backing off between
    /// attempts.
    async fn call<R: Call + Send>(
        &self,
        what: &str,
        key: &str,
        message: R,
        line: &Line<R>,
    ) -> Result<Payment, Refused> {
        self.retries.deposit();
        let mut backoff = Duration::from_millis(100);
        loop {
            let call = line.call(self.client.clone(), message.clone(), self.timeout);
            let attempt = tokio::time::timeout(self.timeout, call).await;
            let status = match attempt {
                Ok(Ok(payment)) => return Ok(payment),
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
        self.call("authorize", &key, request, &self.authorizations)
            .await
    }

    async fn capture(&self, request: CaptureRequest) -> Result<Payment, Refused> {
        let key = request.idempotency_key.clone();
        self.call("capture", &key, request, &self.captures).await
    }

    async fn void(&self, request: VoidRequest) -> Result<Payment, Refused> {
        let key = request.idempotency_key.clone();
        self.call("void", &key, request, &self.voids).await
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
