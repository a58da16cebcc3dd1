//! The `brewmesh.payment.v1.Payments` gRPC service: validation, the
//! processing delay, and the ledger.

use std::time::Duration;

use tonic::{Request, Response, Status};
use tracing::Instrument as _;

use brewmesh::pb::payment::v1::payments_server::Payments;
use brewmesh::pb::payment::v1::{
    AuthorizeRequest, CaptureRequest, GetPaymentRequest, ListPaymentsRequest, ListPaymentsResponse,
    Money, Payment, PaymentState, RefundRequest, VoidRequest,
};
use brewmesh_runtime::idempotency::fingerprint;
use brewmesh_runtime::validate::{MAX_KEY_LEN, Violations, next_page_token, page_size};

use crate::ledger::{Ledger, NewPayment, Transition};

/// The card token that is always declined, for exercising failure paths.
pub const DECLINED_CARD_TOKEN: &str = "tok_declined";

const MAX_CARD_TOKEN_LEN: usize = 64;
const MAX_REASON_LEN: usize = 512;

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

    /// Capture, Void and Refund: check the payment id and key (plus what
    /// `violations` already holds), then move the payment under the key.
    async fn transition(
        &self,
        method: &str,
        request: &impl prost::Message,
        (payment_id, key): (&str, &str),
        mut violations: Violations,
        transition: Transition<'_>,
    ) -> Result<Response<Payment>, Status> {
        violations.id("payment_id", "pay", payment_id);
        violations.idempotency_key("idempotency_key", key);
        violations.check()?;
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

#[tonic::async_trait]
impl Payments for PaymentService {
    async fn authorize(
        &self,
        request: Request<AuthorizeRequest>,
    ) -> Result<Response<Payment>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        violations.idempotency_key("idempotency_key", &request.idempotency_key);
        violations.required("order_id", &request.order_id, MAX_KEY_LEN);
        money(&mut violations, "amount", request.amount.as_ref());
        violations.required("card_token", &request.card_token, MAX_CARD_TOKEN_LEN);
        violations.check()?;

        let fingerprint = fingerprint("Authorize", &request);
        let key = &request.idempotency_key;
        if let Some(payment) = self.ledger.replay(key, &fingerprint).await? {
            return Ok(Response::new(payment));
        }
        tokio::time::sleep(self.processing_delay).await;
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
        let new = NewPayment {
            order_id: request.order_id.clone(),
            amount: request.amount.clone().unwrap_or_default(),
            outcome,
            card_last4,
        };
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
        let ids = (
            request.payment_id.as_str(),
            request.idempotency_key.as_str(),
        );
        self.transition(
            "Capture",
            &request,
            ids,
            Violations::new(),
            Transition::Capture,
        )
        .await
    }

    async fn void(&self, request: Request<VoidRequest>) -> Result<Response<Payment>, Status> {
        let request = request.into_inner();
        let ids = (
            request.payment_id.as_str(),
            request.idempotency_key.as_str(),
        );
        self.transition("Void", &request, ids, Violations::new(), Transition::Void)
            .await
    }

    async fn refund(&self, request: Request<RefundRequest>) -> Result<Response<Payment>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        violations.at_most("reason", &request.reason, MAX_REASON_LEN);
        let ids = (
            request.payment_id.as_str(),
            request.idempotency_key.as_str(),
        );
        self.transition(
            "Refund",
            &request,
            ids,
            violations,
            Transition::Refund(&request.reason),
        )
        .await
    }

    async fn get_payment(
        &self,
        request: Request<GetPaymentRequest>,
    ) -> Result<Response<Payment>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        violations.id("payment_id", "pay", &request.payment_id);
        violations.check()?;
        Ok(Response::new(self.ledger.get(&request.payment_id).await?))
    }

    async fn list_payments(
        &self,
        request: Request<ListPaymentsRequest>,
    ) -> Result<Response<ListPaymentsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = Violations::new();
        let limit = page_size(&mut violations, "page_size", request.page_size, 50, 1000);
        violations.at_most("order_id", &request.order_id, MAX_KEY_LEN);
        violations.page_token("page_token", "pay", &request.page_token);
        violations.check()?;
        let before = Some(request.page_token.as_str()).filter(|t| !t.is_empty());
        let (payments, more) = self.ledger.list(&request.order_id, before, limit).await?;
        let next_page_token = next_page_token(more, payments.last().map(|p| p.payment_id.as_str()));
        Ok(Response::new(ListPaymentsResponse {
            payments,
            next_page_token,
        }))
    }
}

fn money(violations: &mut Violations, field: &str, value: Option<&Money>) {
    let Some(money) = value else {
        violations.add(field, "is required");
        return;
    };
    let code = &money.currency_code;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
        violations.add(
            format!("{field}.currency_code"),
            "must be an ISO 4217 code: three upper-case letters",
        );
    }
    if money.amount_minor <= 0 {
        violations.add(format!("{field}.amount_minor"), "must be positive");
    }
}
