//! The `brewmesh.payment.v1.Payments` gRPC service: validation, the
//! processing delay, and the ledger.

use std::time::Duration;

use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use brewmesh::pb::payment::v1::payments_server::Payments;
use brewmesh::pb::payment::v1::{
    AuthorizeRequest, BatchAuthorizeRequest, BatchAuthorizeResponse, BatchCaptureRequest,
    BatchCaptureResponse, BatchVoidRequest, BatchVoidResponse, CaptureRequest, GetPaymentRequest,
    ListPaymentsRequest, ListPaymentsResponse, Payment, PaymentOutcome, PaymentState,
    RefundRequest, VoidRequest,
};
use brewmesh_runtime::idempotency::fingerprint;
use brewmesh_runtime::validate::{Validate as _, next_page_token, page_size};

use crate::error::PaymentError;
use crate::ledger::{Entry, Ledger, NewPayment, Outcomes, Transition};

/// The card token that is always declined, for exercising failure paths.
pub const DECLINED_CARD_TOKEN: &str = "tok_declined";

/// The gRPC face of the [`Ledger`].
#[derive(Debug, Clone)]
pub struct PaymentService {
    ledger: Ledger,
    processing_delay: Duration,
}

impl PaymentService {
    /// Serves `ledger`, taking `processing_delay` for every write that is
    /// not a replay, as a card network would.
    pub fn new(ledger: Ledger, processing_delay: Duration) -> Self {
        Self {
            ledger,
            processing_delay,
        }
    }

    /// Capture, Void and Refund, their requests checked: move the payment
    /// under the key.
    async fn transition(
        &self,
        method: &str,
        request: &impl prost::Message,
        (payment_id, key): (&str, &str),
        transition: Transition<'_>,
    ) -> Result<Response<Payment>, Status> {
        let fingerprint = fingerprint(method, request);
        if let Some(payment) = self.ledger.replay(key, &fingerprint).await? {
            return Ok(Response::new(payment));
        }
        tokio::time::sleep(self.processing_delay).await;
        let span =
            tracing::info_span!("ledger", otel.name = %format!("ledger {method}"), payment_id);
        let payment = self
            .ledger
            .transition(key, &fingerprint, payment_id, transition)
            .instrument(span.clone())
            .await
            .inspect_err(|e| brewmesh_runtime::telemetry::fail(&span, &e.to_string()))?;
        tracing::info!(method, payment_id, order_id = %payment.order_id, state = ?payment.state(), "payment updated");
        Ok(Response::new(payment))
    }
}

/// The payment `request` asks for: authorized, or declined for the test
/// card.
fn new_payment(request: &AuthorizeRequest) -> NewPayment {
    let outcome = if request.card_token == DECLINED_CARD_TOKEN {
        Err("card declined: the test token tok_declined is always declined".to_owned())
    } else {
        Ok(())
    };
    let token = &request.card_token;
    let card_last4 = token
        .char_indices()
        .rev()
        .nth(3)
        .map_or(token.as_str(), |(i, _)| &token[i..])
        .to_owned();
    NewPayment {
        order_id: request.order_id.clone(),
        amount: request.amount.clone().unwrap_or_default(),
        outcome,
        card_last4,
    }
}

/// An entry's outcome as the batch answers it.
fn outcome(result: Result<Payment, Status>) -> PaymentOutcome {
    use brewmesh::pb::payment::v1::payment_outcome::Outcome;
    PaymentOutcome {
        outcome: Some(match result {
            Ok(payment) => Outcome::Payment(payment),
            Err(status) => Outcome::Error(rpc_status(&status)),
        }),
    }
}

/// `status` as a google.rpc.Status, with its details.
fn rpc_status(status: &Status) -> brewmesh::pb::google::rpc::Status {
    use prost::Message as _;
    brewmesh::pb::google::rpc::Status::decode(status.details())
        .ok()
        .filter(|s| s.code == status.code() as i32)
        .unwrap_or_else(|| brewmesh::pb::google::rpc::Status {
            code: status.code() as i32,
            message: status.message().to_owned(),
            details: Vec::new(),
        })
}

impl PaymentService {
    /// A batch of `method` (its `count` entries, checked whole already: a
    /// malformed entry refuses the batch, as the document says) written by
    /// `write`, the ledger's call for all of them: the card network takes
    /// its time once for the batch; each entry's outcome in order.
    async fn batch(
        &self,
        method: &str,
        count: usize,
        write: impl Future<Output = Result<Outcomes, PaymentError>>,
    ) -> Result<Vec<PaymentOutcome>, Status> {
        tokio::time::sleep(self.processing_delay).await;
        let span =
            tracing::info_span!("ledger", otel.name = %format!("ledger {method}"), entries = count);
        let results = write
            .instrument(span.clone())
            .await
            .inspect_err(|e| brewmesh_runtime::telemetry::fail(&span, &e.to_string()))?;
        tracing::info!(method, entries = count, "batch of payments updated");
        Ok(results
            .into_iter()
            .map(|result| outcome(result.map_err(Status::from)))
            .collect())
    }
}

/// Each request of a batch of `method` as the ledger takes it: its key,
/// its fingerprint, and `ask(request)`.
fn entries<R: prost::Message, T>(
    method: &str,
    requests: &[R],
    key: impl Fn(&R) -> &str,
    ask: impl Fn(&R) -> T,
) -> Vec<Entry<T>> {
    requests
        .iter()
        .map(|request| Entry {
            key: key(request).to_owned(),
            fingerprint: fingerprint(method, request),
            ask: ask(request),
        })
        .collect()
}

#[tonic::async_trait]
impl Payments for PaymentService {
    async fn batch_authorize(
        &self,
        request: Request<BatchAuthorizeRequest>,
    ) -> Result<Response<BatchAuthorizeResponse>, Status> {
        let request = request.into_inner();
        request.validate()?;
        let entries = entries(
            "Authorize",
            &request.requests,
            |r| &r.idempotency_key,
            new_payment,
        );
        let write = self.ledger.authorize_all(&entries);
        let outcomes = self.batch("Authorize", entries.len(), write).await?;
        Ok(Response::new(BatchAuthorizeResponse { outcomes }))
    }

    async fn batch_capture(
        &self,
        request: Request<BatchCaptureRequest>,
    ) -> Result<Response<BatchCaptureResponse>, Status> {
        let request = request.into_inner();
        request.validate()?;
        let entries = entries(
            "Capture",
            &request.requests,
            |r| &r.idempotency_key,
            |r| r.payment_id.clone(),
        );
        let write = self.ledger.transition_all(&entries, Transition::Capture);
        let outcomes = self.batch("Capture", entries.len(), write).await?;
        Ok(Response::new(BatchCaptureResponse { outcomes }))
    }

    async fn batch_void(
        &self,
        request: Request<BatchVoidRequest>,
    ) -> Result<Response<BatchVoidResponse>, Status> {
        let request = request.into_inner();
        request.validate()?;
        let entries = entries(
            "Void",
            &request.requests,
            |r| &r.idempotency_key,
            |r| r.payment_id.clone(),
        );
        let write = self.ledger.transition_all(&entries, Transition::Void);
        let outcomes = self.batch("Void", entries.len(), write).await?;
        Ok(Response::new(BatchVoidResponse { outcomes }))
    }

    async fn authorize(
        &self,
        request: Request<AuthorizeRequest>,
    ) -> Result<Response<Payment>, Status> {
        let request = request.into_inner();
        request.validate()?;

        let fingerprint = fingerprint("Authorize", &request);
        let key = &request.idempotency_key;
        if let Some(payment) = self.ledger.replay(key, &fingerprint).await? {
            return Ok(Response::new(payment));
        }
        tokio::time::sleep(self.processing_delay).await;
        let new = new_payment(&request);
        // The ledger write, in the trace of the order that asked for it.
        let span = tracing::info_span!("ledger", otel.name = "ledger Authorize", order_id = %request.order_id);
        let payment = self
            .ledger
            .authorize(key, &fingerprint, new)
            .instrument(span.clone())
            .await
            .inspect_err(|e| brewmesh_runtime::telemetry::fail(&span, &e.to_string()))?;
        if payment.state() == PaymentState::Declined {
            brewmesh_runtime::telemetry::fail(&span, &payment.decline_reason);
        }
        tracing::info!(method = "Authorize", payment_id = %payment.payment_id, order_id = %payment.order_id, state = ?payment.state(), "payment updated");
        Ok(Response::new(payment))
    }

    async fn capture(&self, request: Request<CaptureRequest>) -> Result<Response<Payment>, Status> {
        let request = request.into_inner();
        request.validate()?;
        let ids = (
            request.payment_id.as_str(),
            request.idempotency_key.as_str(),
        );
        self.transition("Capture", &request, ids, Transition::Capture)
            .await
    }

    async fn void(&self, request: Request<VoidRequest>) -> Result<Response<Payment>, Status> {
        let request = request.into_inner();
        request.validate()?;
        let ids = (
            request.payment_id.as_str(),
            request.idempotency_key.as_str(),
        );
        self.transition("Void", &request, ids, Transition::Void)
            .await
    }

    async fn refund(&self, request: Request<RefundRequest>) -> Result<Response<Payment>, Status> {
        let request = request.into_inner();
        request.validate()?;
        let ids = (
            request.payment_id.as_str(),
            request.idempotency_key.as_str(),
        );
        self.transition("Refund", &request, ids, Transition::Refund(&request.reason))
            .await
    }

    async fn get_payment(
        &self,
        request: Request<GetPaymentRequest>,
    ) -> Result<Response<Payment>, Status> {
        let request = request.into_inner();
        request.validate()?;
        Ok(Response::new(self.ledger.get(&request.payment_id).await?))
    }

    async fn list_payments(
        &self,
        request: Request<ListPaymentsRequest>,
    ) -> Result<Response<ListPaymentsResponse>, Status> {
        let request = request.into_inner();
        request.validate()?;
        let limit = page_size(request.page_size, 50, 1000);
        let before = Some(request.page_token.as_str()).filter(|t| !t.is_empty());
        let (payments, more) = self.ledger.list(&request.order_id, before, limit).await?;
        let next_page_token = next_page_token(more, payments.last().map(|p| p.payment_id.as_str()));
        Ok(Response::new(ListPaymentsResponse {
            payments,
            next_page_token,
        }))
    }
}
