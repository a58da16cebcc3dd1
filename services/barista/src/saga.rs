//! The order saga: one order from ACCEPTED to READY, or to FAILED or
//! CANCELLED with nothing charged.
//!
//! `Run`: the order goes BREWING; the authorization and the brewing
//! (espresso and milk at the same time) run concurrently. A declined card
//! ends the order FAILED at once. A failed station or a cancel moves the
//! order to `Compensate`; a made drink with an authorized payment moves it
//! to `Complete`.
//!
//! `Complete`: capture, then READY. `Compensate`: learn the payment by
//! repeating the (idempotent) authorization, void it if it is authorized,
//! then FAILED or CANCELLED.
//!
//! Each step is stored before the next begins, and every payment call
//! carries an idempotency key derived from the order, so a barista that dies
//! anywhere picks the order up at its stored step on restart and neither
//! charges twice nor leaves a charge without a drink. Each final transition
//! writes its events in the same transaction, so a retried step never
//! repeats history.
//!
//! Every write of a saga is fenced by its owner: once another barista took
//! the order over (this one stalled past its lease), the guard refuses the
//! write, and the saga reads the order back before it releases anything. A
//! guard that refused is never taken to mean a cancel.
//!
//! The saga reaches the world through two small traits, [`Orders`] and
//! [`Payments`], so its tests below run in paused time without a network.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::Instrument as _;

use brewmesh::pb::barista::v1::{MenuItem, OrderEvent, OrderEventType as E, OrderState as S};
use brewmesh::pb::payment::v1::{
    AuthorizeRequest, CaptureRequest, Payment, PaymentState, VoidRequest,
};

use crate::menu;
use crate::payments::{Payments, Refused};
use crate::stations::{Admission, Place, Station, Stations};
use crate::store::{Change, OrderRecord, Step};

/// The longest wait before a failed step is tried again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The saga's view of the orders: guarded changes, and reads.
#[tonic::async_trait]
pub(crate) trait Orders: Send + Sync {
    /// Applies `change` with `events` if its guard holds; `None` if not.
    async fn record(
        &self,
        order_id: &str,
        events: &[(E, &str)],
        change: Change<'_>,
    ) -> Result<Option<Vec<OrderEvent>>, sqlx::Error>;

    /// The order as stored now.
    async fn get(&self, order_id: &str) -> Result<Option<OrderRecord>, sqlx::Error>;
}

/// How a saga begins.
#[derive(Debug)]
pub(crate) enum Begin {
    /// Just placed, with the stations' places it took.
    Placed(Admission),
    /// Picked up again (after a restart, or from a barista that is gone):
    /// it waits for its places.
    Resumed,
}

/// How the concurrent part of step `Run` settled.
enum Settled {
    /// The drink is made and the payment authorized.
    Made,
    /// The card was declined.
    Declined(Payment),
    /// The payment service refused the authorization for good.
    Refused(Status),
    /// A station failed.
    BrewFailed(String),
    /// The order was cancelled.
    Cancelled,
}

/// Why a saga step did not finish.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SagaError {
    /// A station failed: the drink cannot be made.
    #[error("{0}")]
    BrewFailed(String),
    /// The payment service refused a call for good.
    #[error(transparent)]
    PaymentRefused(#[from] Refused),
    /// The store failed; the step is retried.
    #[error("order store: {0}")]
    Store(#[from] sqlx::Error),
}

/// One order's saga, driven by the barista `owner`.
pub(crate) struct Saga<'a> {
    pub(crate) orders: &'a dyn Orders,
    pub(crate) payments: &'a dyn Payments,
    pub(crate) stations: &'a Stations,
    /// The barista driving the saga: every write is fenced by it.
    pub(crate) owner: &'a str,
    /// Cancelled when the order is.
    pub(crate) cancel: &'a CancellationToken,
}

impl Saga<'_> {
    /// Runs the saga to its end, retrying steps that failed for a passing
    /// reason (the store) with backoff. Returns when the order is final, or
    /// no longer this barista's.
    pub(crate) async fn drive(&self, mut record: OrderRecord, begin: Begin) {
        let order_id = record.order.order_id.clone();
        let (mut admission, mut resumed) = match begin {
            Begin::Placed(admission) => (Some(admission), false),
            Begin::Resumed => (None, true),
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = match record.step {
                Step::Run => self.run(&record, admission.take(), resumed).await,
                Step::Complete => self.complete(&record).await,
                Step::Compensate => self.compensate(&record, None).await,
                Step::Done => {
                    if record.order.state() == S::Failed {
                        brewmesh::telemetry::fail(
                            &tracing::Span::current(),
                            &record.order.failure_reason,
                        );
                    }
                    return;
                }
            };
            if let Err(error) = result {
                tracing::warn!(%order_id, %error, "saga step failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            resumed = false;
            match self.orders.get(&order_id).await {
                Ok(Some(fresh)) if fresh.owner != self.owner => {
                    // Our lease ran out (this process stalled) and another
                    // barista took the order over: it is theirs now.
                    tracing::warn!(%order_id, owner = %fresh.owner, "order taken over by another barista");
                    return;
                }
                Ok(Some(fresh)) => record = fresh,
                Ok(None) => {
                    tracing::error!(%order_id, "the order is gone from the store");
                    return;
                }
                Err(error) => {
                    tracing::warn!(%order_id, %error, "reloading order failed; retrying");
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    /// A change fenced by this saga's owner.
    fn change<'c>(&'c self, change: Change<'c>) -> Change<'c> {
        Change {
            owner: Some(self.owner),
            ..change
        }
    }

    /// Applies `change` (fenced) with `events`; `None` if its guard refused.
    async fn record(
        &self,
        order_id: &str,
        events: &[(E, &str)],
        change: Change<'_>,
    ) -> Result<Option<Vec<OrderEvent>>, sqlx::Error> {
        self.orders
            .record(order_id, events, self.change(change))
            .await
    }

    /// The order as stored now, if it is still this barista's.
    async fn still_ours(&self, order_id: &str) -> Result<Option<OrderRecord>, sqlx::Error> {
        Ok(self
            .orders
            .get(order_id)
            .await?
            .filter(|record| record.owner == self.owner))
    }

    /// Step `Run`: authorize while brewing.
    async fn run(
        &self,
        record: &OrderRecord,
        admission: Option<Admission>,
        resumed: bool,
    ) -> Result<(), SagaError> {
        let order_id = record.order.order_id.as_str();
        let Some(item) = menu::find(&record.order.item_id) else {
            // Only a menu change under a stored order gets here.
            let reason = format!("{:?} is no longer on the menu", record.order.item_id);
            self.finish_failed(order_id, Step::Run, &reason).await?;
            return Ok(());
        };
        let (event, detail) = if resumed {
            (E::Resumed, "picked up again after a restart")
        } else {
            (E::BrewingStarted, "")
        };
        let started = self
            .record(
                order_id,
                &[(event, detail)],
                Change {
                    from: &[S::Accepted, S::Brewing],
                    from_step: Some(Step::Run),
                    state: Some(S::Brewing),
                    ..Change::default()
                },
            )
            .await?;
        if started.is_none() {
            return Ok(()); // cancelled or taken over: the reloaded order says what is next
        }
        let admission = match admission {
            Some(admission) => admission,
            None => self.stations.admit(item.steamed_milk).await,
        };

        // Deadlock rule: one task must never await a write while a sibling
        // future that may hold an open write transaction sits unpolled (a
        // `select!` arm body, or after a `break`). So the authorized event is
        // written inside the authorization's own future, `brew` is dropped
        // before anything else is written, and an authorization still under
        // way is settled before the next write.
        let authorize = async {
            let payment = self.authorize(record).await?;
            if payment.state() == PaymentState::Authorized {
                self.record(
                    order_id,
                    &[(E::PaymentAuthorized, "")],
                    Change {
                        from: &[S::Brewing],
                        payment_id: Some(&payment.payment_id),
                        ..Change::default()
                    },
                )
                .await?;
            }
            Ok::<_, SagaError>(payment)
        };
        tokio::pin!(authorize);
        let mut payment: Option<Payment> = None;
        let settled = {
            let brew = self.brew(order_id, &item, admission);
            tokio::pin!(brew);
            let mut brewed = false;
            loop {
                if brewed && payment.is_some() {
                    break Settled::Made;
                }
                tokio::select! {
                    result = &mut authorize, if payment.is_none() => match result {
                        Ok(p) if p.state() == PaymentState::Authorized => payment = Some(p),
                        Ok(declined) => break Settled::Declined(declined),
                        Err(SagaError::PaymentRefused(Refused(status))) => break Settled::Refused(status),
                        Err(other) => return Err(other),
                    },
                    result = &mut brew, if !brewed => match result {
                        Ok(()) => brewed = true,
                        Err(SagaError::BrewFailed(reason)) => break Settled::BrewFailed(reason),
                        Err(other) => return Err(other),
                    },
                    () = self.cancel.cancelled() => break Settled::Cancelled,
                }
            }
        }; // `brew` is dropped here, with any place or transaction it held.

        let mut failure = None;
        match settled {
            Settled::Made => {
                let moved = self
                    .record(
                        order_id,
                        &[],
                        Change {
                            from: &[S::Brewing],
                            from_step: Some(Step::Run),
                            step: Some(Step::Complete),
                            ..Change::default()
                        },
                    )
                    .await?;
                if moved.is_some() {
                    return Ok(()); // `Complete` follows
                }
                // Refused: a cancel came first, or the order is another
                // barista's now. The read below tells which.
            }
            Settled::Declined(declined) => {
                // Nothing is held, so nothing to release.
                let reason = format!("payment declined: {}", declined.decline_reason);
                self.record(
                    order_id,
                    &[
                        (E::PaymentDeclined, &declined.decline_reason),
                        (E::Failed, &reason),
                    ],
                    Change {
                        from: &[S::Brewing],
                        from_step: Some(Step::Run),
                        state: Some(S::Failed),
                        step: Some(Step::Done),
                        payment_id: Some(&declined.payment_id),
                        failure_reason: Some(&reason),
                        ..Change::default()
                    },
                )
                .await?;
                return Ok(());
            }
            Settled::Refused(status) => {
                let reason = format!("payment refused: {}", status.message());
                self.finish_failed(order_id, Step::Run, &reason).await?;
                return Ok(());
            }
            Settled::BrewFailed(reason) => failure = Some(format!("brewing failed: {reason}")),
            Settled::Cancelled => {}
        }

        // Settle the authorization under way (dropping it would leave its
        // outcome unknown) before writing anything else.
        let payment = match payment {
            Some(payment) => Some(payment),
            None => match authorize.await {
                Ok(payment) => Some(payment),
                Err(SagaError::PaymentRefused(_)) => None,
                Err(other) => return Err(other),
            },
        };
        if let Some(reason) = failure {
            // Refused if a cancel came first (compensating serves both) or
            // the order is another barista's: the read below tells.
            self.record(
                order_id,
                &[(E::BrewingFailed, &reason)],
                Change {
                    from: &[S::Brewing],
                    from_step: Some(Step::Run),
                    step: Some(Step::Compensate),
                    failure_reason: Some(&reason),
                    ..Change::default()
                },
            )
            .await?;
        }
        // Release nothing before the store says the order is to be
        // compensated, and still ours.
        match self.still_ours(order_id).await? {
            Some(fresh) if fresh.step == Step::Compensate => self.compensate(&fresh, payment).await,
            _ => Ok(()), // `drive` reloads: another barista's, or moved on
        }
    }

    /// The drink: espresso, and milk at the same time if the drink has milk.
    async fn brew(
        &self,
        order_id: &str,
        item: &MenuItem,
        admission: Admission,
    ) -> Result<(), SagaError> {
        let shots = format!("{} shot(s)", item.espresso_shots);
        let espresso = self.station_step(
            order_id,
            &self.stations.espresso,
            admission.espresso,
            (E::EspressoStarted, E::EspressoDone),
            &shots,
        );
        match admission.milk {
            Some(place) => {
                let milk = self.station_step(
                    order_id,
                    &self.stations.milk,
                    place,
                    (E::MilkStarted, E::MilkDone),
                    "",
                );
                tokio::try_join!(espresso, milk).map(|_| ())
            }
            None => espresso.await,
        }
    }

    /// One station's part of the drink, between its `(started, done)` events.
    async fn station_step(
        &self,
        order_id: &str,
        station: &Station,
        place: Place,
        (started, done): (E, E),
        detail: &str,
    ) -> Result<(), SagaError> {
        let span = tracing::info_span!("station", otel.name = station.name, order_id);
        let work = async {
            // Holding the place until the step ends keeps the queue bound honest.
            let _place = place;
            let _machine = station.machine().await;
            let brewing = Change {
                from: &[S::Brewing],
                ..Change::default()
            };
            self.record(order_id, &[(started, detail)], brewing.clone())
                .await?;
            tokio::time::sleep(station.duration).await;
            if station.fails() {
                return Err(SagaError::BrewFailed(format!(
                    "the {} station failed",
                    station.name
                )));
            }
            self.record(order_id, &[(done, "")], brewing).await?;
            Ok(())
        };
        traced(span, work).await
    }

    /// Step `Complete`: capture, then READY.
    async fn complete(&self, record: &OrderRecord) -> Result<(), SagaError> {
        let order_id = record.order.order_id.as_str();
        let span = tracing::info_span!("capture", otel.name = "capture", order_id);
        let request = CaptureRequest {
            payment_id: record.order.payment_id.clone(),
            idempotency_key: format!("{order_id}:capture"),
        };
        let captured = traced(span, async { Ok(self.payments.capture(request).await?) }).await;
        match captured {
            Ok(payment) => {
                // Refused only if the order is another barista's now.
                self.record(
                    order_id,
                    &[(E::PaymentCaptured, ""), (E::Ready, "")],
                    Change {
                        from: &[S::Brewing],
                        from_step: Some(Step::Complete),
                        state: Some(S::Ready),
                        step: Some(Step::Done),
                        payment_id: Some(&payment.payment_id),
                        ..Change::default()
                    },
                )
                .await?;
                Ok(())
            }
            Err(SagaError::PaymentRefused(Refused(status))) => {
                // The ledger will not capture (someone voided it by hand): the
                // drink goes uncharged, and the order says why.
                tracing::error!(order_id, %status, "capture refused");
                let reason = format!("capture refused: {}", status.message());
                self.finish_failed(order_id, Step::Complete, &reason)
                    .await?;
                Ok(())
            }
            Err(other) => Err(other),
        }
    }

    /// Step `Compensate`: release the payment, then FAILED or CANCELLED.
    ///
    /// Without a known payment, the order's authorization is repeated with
    /// its idempotency key: that returns the payment if the first attempt
    /// reached the ledger (also one still in flight from a dead process), or
    /// authorizes now so that the void below releases it. Either way no hold
    /// is left behind.
    async fn compensate(
        &self,
        record: &OrderRecord,
        payment: Option<Payment>,
    ) -> Result<(), SagaError> {
        let order_id = record.order.order_id.as_str();
        let payment = match payment {
            Some(payment) => Some(payment),
            None => match self.authorize(record).await {
                Ok(payment) => Some(payment),
                Err(SagaError::PaymentRefused(Refused(status))) => {
                    tracing::warn!(order_id, %status, "authorization refused; nothing to void");
                    None
                }
                Err(other) => return Err(other),
            },
        };
        let mut events: Vec<(E, &str)> = Vec::new();
        // A replayed authorization answers as it first did, so AUTHORIZED here
        // may already be voided; the void's own key makes repeating it safe.
        if let Some(payment) = payment
            .as_ref()
            .filter(|p| p.state() == PaymentState::Authorized)
        {
            let span = tracing::info_span!("void", otel.name = "void", order_id);
            let request = VoidRequest {
                payment_id: payment.payment_id.clone(),
                idempotency_key: format!("{order_id}:void"),
            };
            let voided = traced(span, async { Ok(self.payments.void(request).await?) }).await;
            match voided {
                Ok(_) => events.push((E::PaymentVoided, "")),
                Err(SagaError::PaymentRefused(Refused(status))) => {
                    tracing::error!(order_id, %status, "void refused; the payment needs a look by hand");
                }
                Err(other) => return Err(other),
            }
        }
        let (state, final_event) = match record.order.state() {
            S::Cancelling => (S::Cancelled, E::Cancelled),
            _ => (S::Failed, E::Failed),
        };
        events.push((final_event, &record.order.failure_reason));
        self.record(
            order_id,
            &events,
            Change {
                from: &[S::Accepted, S::Brewing, S::Cancelling],
                from_step: Some(Step::Compensate),
                state: Some(state),
                step: Some(Step::Done),
                payment_id: payment.as_ref().map(|p| p.payment_id.as_str()),
                ..Change::default()
            },
        )
        .await?;
        Ok(())
    }

    async fn finish_failed(
        &self,
        order_id: &str,
        from_step: Step,
        reason: &str,
    ) -> Result<(), SagaError> {
        self.record(
            order_id,
            &[(E::Failed, reason)],
            Change {
                from: &[S::Accepted, S::Brewing],
                from_step: Some(from_step),
                state: Some(S::Failed),
                step: Some(Step::Done),
                failure_reason: Some(reason),
                ..Change::default()
            },
        )
        .await?;
        Ok(())
    }

    /// The order's authorization, keyed by the order so it is made once.
    async fn authorize(&self, record: &OrderRecord) -> Result<Payment, SagaError> {
        let order_id = record.order.order_id.as_str();
        let span = tracing::info_span!("authorize", otel.name = "authorize", order_id);
        let request = AuthorizeRequest {
            idempotency_key: format!("{order_id}:authorize"),
            order_id: order_id.to_owned(),
            amount: record.order.price.clone(),
            card_token: record.card_token.clone(),
        };
        let authorized = traced(span.clone(), async {
            Ok(self.payments.authorize(request).await?)
        })
        .await;
        if let Ok(payment) = &authorized
            && payment.state() == PaymentState::Declined
        {
            let reason = format!("card declined: {}", payment.decline_reason);
            brewmesh::telemetry::fail(&span, &reason);
        }
        authorized
    }
}

/// Runs a saga step in `span`; an error marks the span failed.
async fn traced<T>(
    span: tracing::Span,
    step: impl Future<Output = Result<T, SagaError>>,
) -> Result<T, SagaError> {
    let result = step.instrument(span.clone()).await;
    if let Err(error) = &result {
        brewmesh::telemetry::fail(&span, &error.to_string());
    }
    result
}
