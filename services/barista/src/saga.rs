//! The order saga: one order from ACCEPTED to READY, or to FAILED or
//! CANCELLED with nothing charged.
//!
//! `Run`: the order goes BREWING; the authorization and the brewing
//! (espresso and milk at the same time) run concurrently. A declined card
//! ends the order FAILED at once. A failed station or a cancel moves the
//! order to `Compensate`; a made drink with an authorized payment moves it
//! to `Complete`.
//!
//! `Complete`: the drink is handed over — READY is stored as the step
//! begins — and its authorization captured after, as a card network
//! settles, so the customer waits for the longer of payment and brewing,
//! not for both. `Compensate`: learn the payment by
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
//! [`Payments`], and the stations it is handed (local machines, or station
//! replicas through [`crate::remote`]), so its tests below run in paused
//! time without a network.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::Instrument as _;

use brewmesh::pb::barista::v1::{MenuItem, OrderEvent, OrderEventType as E, OrderState as S};
use brewmesh::pb::payment::v1::{
    AuthorizeRequest, CaptureRequest, Payment, PaymentState, VoidRequest,
};

use crate::menu;
use crate::payments::{Payments, Refused};
use crate::remote::Part;
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
                        brewmesh_runtime::telemetry::fail(
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

    /// Applies `change` (fenced) with `events`; `None` if its guard refused.
    async fn record(
        &self,
        order_id: &str,
        events: &[(E, &str)],
        change: Change<'_>,
    ) -> Result<Option<Vec<OrderEvent>>, sqlx::Error> {
        let fenced = Change {
            owner: Some(self.owner),
            ..change
        };
        self.orders.record(order_id, events, fenced).await
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
                // The customer gets the drink now; the capture settles after.
                if self.hand_over(order_id, Step::Run).await?.is_some() {
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
            (&self.stations.espresso, admission.espresso),
            Part::Espresso {
                shots: item.espresso_shots,
            },
            (E::EspressoStarted, E::EspressoDone),
            &shots,
        );
        match admission.milk {
            Some(place) => {
                let milk = self.station_step(
                    order_id,
                    (&self.stations.milk, place),
                    Part::Milk,
                    (E::MilkStarted, E::MilkDone),
                    "",
                );
                tokio::try_join!(espresso, milk).map(|_| ())
            }
            None => espresso.await,
        }
    }

    /// One station's part of the drink, between its `(started, done)` events:
    /// on this process's machines, or sent to a station replica (whose id
    /// the started event names; a replica lost mid-brew starts it again).
    async fn station_step(
        &self,
        order_id: &str,
        (station, place): (&Station, Place),
        part: Part,
        (started, done): (E, E),
        detail: &str,
    ) -> Result<(), SagaError> {
        let span = tracing::info_span!("station", otel.name = station.name, order_id);
        let work = move || async move {
            // Holding the place until the step ends keeps the queue bound honest.
            let _place = place;
            let _machine = station.machine().await;
            let brewing = Change {
                from: &[S::Brewing],
                ..Change::default()
            };
            let Some(remote) = &self.stations.remote else {
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
                return Ok(());
            };
            let (at_tx, mut at) = mpsc::channel(4);
            // Boxed: the call's future is large, and every order in flight
            // would carry it inline, also where the stations are local.
            let mut call = Box::pin(remote.brew(order_id, part, &at_tx));
            loop {
                tokio::select! {
                    // A start the call reported is written before its end.
                    biased;
                    Some(replica) = at.recv() => {
                        let detail = match detail {
                            "" => format!("at {replica}"),
                            detail => format!("{detail} at {replica}"),
                        };
                        self.record(order_id, &[(started, &detail)], brewing.clone())
                            .await?;
                    }
                    made = &mut call => {
                        made.map_err(SagaError::BrewFailed)?;
                        break;
                    }
                }
            }
            self.record(order_id, &[(done, "")], brewing).await?;
            Ok(())
        };
        traced(span, work).await
    }

    /// READY with its event, the saga moving on to the capture (`Complete`),
    /// in one write; `None` if the guard refused (a cancel came first, or
    /// the order is another barista's now).
    async fn hand_over(
        &self,
        order_id: &str,
        from_step: Step,
    ) -> Result<Option<Vec<OrderEvent>>, sqlx::Error> {
        self.record(
            order_id,
            &[(E::Ready, "")],
            Change {
                from: &[S::Brewing],
                from_step: Some(from_step),
                state: Some(S::Ready),
                step: Some(Step::Complete),
                ..Change::default()
            },
        )
        .await
    }

    /// Step `Complete`: the drink is READY (handed over); capture its
    /// authorization. An order stored at this step by an earlier version,
    /// still BREWING, is made READY first.
    async fn complete(&self, record: &OrderRecord) -> Result<(), SagaError> {
        let order_id = record.order.order_id.as_str();
        if record.order.state() == S::Brewing
            && self.hand_over(order_id, Step::Complete).await?.is_none()
        {
            return Ok(()); // cancelled or taken over: `drive` reloads
        }
        let span = tracing::info_span!("capture", otel.name = "capture", order_id);
        let request = CaptureRequest {
            payment_id: record.order.payment_id.clone(),
            idempotency_key: format!("{order_id}:capture"),
        };
        let captured = traced(span, || async { Ok(self.payments.capture(request).await?) }).await;
        let settled = Change {
            from: &[S::Ready],
            from_step: Some(Step::Complete),
            step: Some(Step::Done),
            ..Change::default()
        };
        match captured {
            Ok(payment) => {
                // Refused only if the order is another barista's now.
                self.record(
                    order_id,
                    &[(E::PaymentCaptured, "")],
                    Change {
                        payment_id: Some(&payment.payment_id),
                        ..settled
                    },
                )
                .await?;
                Ok(())
            }
            Err(SagaError::PaymentRefused(Refused(status))) => {
                // The ledger will not capture (someone voided it by hand): the
                // drink is handed over uncharged, and the order says why.
                tracing::error!(order_id, %status, "capture refused; the drink went uncharged");
                let reason = format!("capture refused: {}", status.message());
                self.record(order_id, &[(E::PaymentCaptureRefused, &reason)], settled)
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
            let voided = traced(span, || async { Ok(self.payments.void(request).await?) }).await;
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
        let authorized = traced(span.clone(), || async {
            Ok(self.payments.authorize(request).await?)
        })
        .await;
        if let Ok(payment) = &authorized
            && payment.state() == PaymentState::Declined
        {
            let reason = format!("card declined: {}", payment.decline_reason);
            brewmesh_runtime::telemetry::fail(&span, &reason);
        }
        authorized
    }
}

/// Runs a saga step in `span`; an error marks the span failed.
///
/// The step is made here, not handed over made: an `async fn` holds a
/// future argument twice (as the argument, and as what it awaits), and
/// every order in flight would carry the copy.
async fn traced<T, F: Future<Output = Result<T, SagaError>>>(
    span: tracing::Span,
    step: impl FnOnce() -> F,
) -> Result<T, SagaError> {
    let result = step().instrument(span.clone()).await;
    if let Err(error) = &result {
        brewmesh_runtime::telemetry::fail(&span, &error.to_string());
    }
    result
}

#[cfg(test)]
mod tests {
    //! The saga against an in-memory order store and ledger, in paused time:
    //! each test runs an order to its end in an instant, with the stations'
    //! 2 s steps and the payment delays played out on the virtual clock.
    #![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

    use std::collections::{HashMap, VecDeque};
    use std::sync::Mutex;

    use brewmesh::pb::barista::v1::Order;
    use brewmesh::pb::payment::v1::Money;

    use super::*;

    const A: &str = "barista-a";
    const B: &str = "barista-b";

    /// Orders in memory, with the guards the SQL store applies.
    #[derive(Default)]
    struct MemoryOrders {
        orders: Mutex<HashMap<String, (OrderRecord, Vec<OrderEvent>)>>,
    }

    impl MemoryOrders {
        fn put(&self, record: OrderRecord) {
            let id = record.order.order_id.clone();
            self.orders.lock().unwrap().insert(id, (record, Vec::new()));
        }

        fn order(&self, order_id: &str) -> OrderRecord {
            self.orders.lock().unwrap()[order_id].0.clone()
        }

        fn events(&self, order_id: &str) -> Vec<E> {
            let orders = self.orders.lock().unwrap();
            orders[order_id].1.iter().map(|e| e.r#type()).collect()
        }

        /// What `claim_orphans` does for a lease that ran out.
        fn take_over(&self, order_id: &str, owner: &str) {
            let mut orders = self.orders.lock().unwrap();
            orders.get_mut(order_id).unwrap().0.owner = owner.to_owned();
        }
    }

    #[tonic::async_trait]
    impl Orders for MemoryOrders {
        async fn record(
            &self,
            order_id: &str,
            events: &[(E, &str)],
            change: Change<'_>,
        ) -> Result<Option<Vec<OrderEvent>>, sqlx::Error> {
            let mut orders = self.orders.lock().unwrap();
            let Some((record, history)) = orders.get_mut(order_id) else {
                return Ok(None);
            };
            let guard = change.from.contains(&record.order.state())
                && change.from_step.is_none_or(|step| step == record.step)
                && change.owner.is_none_or(|owner| owner == record.owner);
            if !guard {
                return Ok(None);
            }
            if let Some(state) = change.state {
                record.order.state = state as i32;
            }
            if let Some(step) = change.step {
                record.step = step;
            }
            if let Some(payment_id) = change.payment_id {
                record.order.payment_id = payment_id.to_owned();
            }
            if let Some(reason) = change.failure_reason {
                record.order.failure_reason = reason.to_owned();
            }
            let mut stored = Vec::new();
            for (event_type, detail) in events {
                let event = OrderEvent {
                    order_id: order_id.to_owned(),
                    sequence: history.len() as i64 + 1,
                    r#type: *event_type as i32,
                    state: record.order.state,
                    time: None,
                    detail: (*detail).to_owned(),
                };
                history.push(event.clone());
                stored.push(event);
            }
            Ok(Some(stored))
        }

        async fn get(&self, order_id: &str) -> Result<Option<OrderRecord>, sqlx::Error> {
            let orders = self.orders.lock().unwrap();
            Ok(orders.get(order_id).map(|(record, _)| record.clone()))
        }
    }

    /// A ledger in memory: one payment per order, idempotent as the real one.
    #[derive(Debug, Default)]
    struct MemoryLedger {
        payments: Mutex<HashMap<String, Payment>>,
        /// How long each authorization takes to answer (after the ledger
        /// wrote it), in the order they are made; then none.
        authorize_delays: Mutex<VecDeque<Duration>>,
        /// How long a capture takes before the ledger applies it.
        capture_delay: Duration,
        voids: Mutex<usize>,
    }

    impl MemoryLedger {
        fn state(&self, order_id: &str) -> PaymentState {
            self.payments.lock().unwrap()[&payment_id(order_id)].state()
        }

        fn voids(&self) -> usize {
            *self.voids.lock().unwrap()
        }

        fn authorized(&self, order_id: &str) {
            let payment = Payment {
                payment_id: payment_id(order_id),
                order_id: order_id.to_owned(),
                state: PaymentState::Authorized as i32,
                ..Payment::default()
            };
            self.payments
                .lock()
                .unwrap()
                .insert(payment.payment_id.clone(), payment);
        }

        /// Moves the payment to `to` if it is in `from` (or already in `to`).
        fn settle(
            &self,
            payment_id: &str,
            from: PaymentState,
            to: PaymentState,
        ) -> Result<Payment, Refused> {
            let mut payments = self.payments.lock().unwrap();
            let Some(payment) = payments.get_mut(payment_id) else {
                return Err(Refused(Status::not_found(payment_id.to_owned())));
            };
            if payment.state() == from {
                payment.state = to as i32;
            }
            if payment.state() != to {
                let message = format!("payment {payment_id} is {:?}", payment.state());
                return Err(Refused(Status::failed_precondition(message)));
            }
            Ok(payment.clone())
        }
    }

    fn payment_id(order_id: &str) -> String {
        format!("pay_{order_id}")
    }

    #[tonic::async_trait]
    impl Payments for MemoryLedger {
        async fn authorize(&self, request: AuthorizeRequest) -> Result<Payment, Refused> {
            let payment = self
                .payments
                .lock()
                .unwrap()
                .entry(payment_id(&request.order_id))
                .or_insert_with(|| {
                    let declined = request.card_token == "tok_declined";
                    Payment {
                        payment_id: payment_id(&request.order_id),
                        order_id: request.order_id.clone(),
                        state: if declined {
                            PaymentState::Declined
                        } else {
                            PaymentState::Authorized
                        } as i32,
                        decline_reason: if declined { "test card" } else { "" }.to_owned(),
                        ..Payment::default()
                    }
                })
                .clone();
            let delay = self.authorize_delays.lock().unwrap().pop_front();
            tokio::time::sleep(delay.unwrap_or_default()).await;
            Ok(payment)
        }

        async fn capture(&self, request: CaptureRequest) -> Result<Payment, Refused> {
            tokio::time::sleep(self.capture_delay).await;
            self.settle(
                &request.payment_id,
                PaymentState::Authorized,
                PaymentState::Captured,
            )
        }

        async fn void(&self, request: VoidRequest) -> Result<Payment, Refused> {
            let voided = self.settle(
                &request.payment_id,
                PaymentState::Authorized,
                PaymentState::Voided,
            );
            if voided.is_ok() {
                *self.voids.lock().unwrap() += 1;
            }
            voided
        }
    }

    fn stations(failure_rate: f64) -> Stations {
        let station = |name| Station::new(name, 2, 4, Duration::from_secs(2), failure_rate);
        Stations {
            espresso: station("espresso"),
            milk: station("milk"),
            remote: None,
        }
    }

    /// An order of a latte, held by barista A, at `step` in `state`.
    fn latte(card: &str, state: S, step: Step) -> OrderRecord {
        OrderRecord {
            order: Order {
                order_id: "ord_1".into(),
                item_id: "latte".into(),
                customer_name: "Ada".into(),
                price: Some(Money {
                    currency_code: "USD".into(),
                    amount_minor: 400,
                }),
                state: state as i32,
                ..Order::default()
            },
            card_token: card.into(),
            step,
            owner: A.into(),
            customer: String::new(),
        }
    }

    /// One barista's view of the shared orders and ledger.
    struct Barista<'a> {
        orders: &'a MemoryOrders,
        ledger: &'a MemoryLedger,
        stations: Stations,
        owner: &'static str,
        cancel: CancellationToken,
    }

    impl<'a> Barista<'a> {
        fn new(orders: &'a MemoryOrders, ledger: &'a MemoryLedger, owner: &'static str) -> Self {
            Self::failing(orders, ledger, owner, 0.0)
        }

        fn failing(
            orders: &'a MemoryOrders,
            ledger: &'a MemoryLedger,
            owner: &'static str,
            failure_rate: f64,
        ) -> Self {
            Self {
                orders,
                ledger,
                stations: stations(failure_rate),
                owner,
                cancel: CancellationToken::new(),
            }
        }

        fn saga(&self) -> Saga<'_> {
            Saga {
                orders: self.orders,
                payments: self.ledger,
                stations: &self.stations,
                owner: self.owner,
                cancel: &self.cancel,
            }
        }

        /// Drives `order_id` as stored, from `begin`.
        async fn drive(&self, order_id: &str, begin: Begin) {
            let record = self.orders.order(order_id);
            self.saga().drive(record, begin).await;
        }

        /// Places a new latte and drives it to its end.
        async fn place(&self, card: &str) -> String {
            self.orders.put(latte(card, S::Accepted, Step::Run));
            let admission = self.stations.try_admit(true).unwrap();
            self.drive("ord_1", Begin::Placed(admission)).await;
            "ord_1".into()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_made_drink_is_captured_once_and_ready() {
        let (orders, ledger) = (MemoryOrders::default(), MemoryLedger::default());
        let id = Barista::new(&orders, &ledger, A).place("tok_visa").await;
        let order = orders.order(&id);
        assert_eq!((order.order.state(), order.step), (S::Ready, Step::Done));
        assert_eq!(order.order.payment_id, payment_id(&id));
        assert_eq!(ledger.state(&id), PaymentState::Captured);
        let events = orders.events(&id);
        assert_eq!(events.first(), Some(&E::BrewingStarted));
        assert_eq!(events[events.len() - 2..], [E::Ready, E::PaymentCaptured]);
        for step in [E::PaymentAuthorized, E::EspressoDone, E::MilkDone] {
            assert!(events.contains(&step), "{step:?} missing from {events:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_declined_card_fails_the_order_and_holds_nothing() {
        let (orders, ledger) = (MemoryOrders::default(), MemoryLedger::default());
        let id = Barista::new(&orders, &ledger, A)
            .place("tok_declined")
            .await;
        let order = orders.order(&id);
        assert_eq!(order.order.state(), S::Failed);
        assert!(order.order.failure_reason.contains("declined"));
        assert_eq!(ledger.state(&id), PaymentState::Declined);
        assert_eq!(ledger.voids(), 0);
        let events = orders.events(&id);
        assert_eq!(events[events.len() - 2..], [E::PaymentDeclined, E::Failed]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_station_voids_the_authorization() {
        let (orders, ledger) = (MemoryOrders::default(), MemoryLedger::default());
        let id = Barista::failing(&orders, &ledger, A, 1.0)
            .place("tok_visa")
            .await;
        let order = orders.order(&id);
        assert_eq!((order.order.state(), order.step), (S::Failed, Step::Done));
        assert!(order.order.failure_reason.starts_with("brewing failed"));
        assert_eq!(ledger.state(&id), PaymentState::Voided);
        let events = orders.events(&id);
        assert!(events.contains(&E::BrewingFailed));
        assert_eq!(events[events.len() - 2..], [E::PaymentVoided, E::Failed]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancel_while_brewing_voids_and_ends_cancelled() {
        let (orders, ledger) = (MemoryOrders::default(), MemoryLedger::default());
        let barista = Barista::new(&orders, &ledger, A);
        let cancel = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            // What CancelOrder writes, on any replica, and then tells the saga.
            let cancelled = orders
                .record(
                    "ord_1",
                    &[(E::CancelRequested, "")],
                    Change {
                        from: &[S::Accepted, S::Brewing],
                        from_step: Some(Step::Run),
                        state: Some(S::Cancelling),
                        step: Some(Step::Compensate),
                        failure_reason: Some("cancelled by the customer"),
                        ..Change::default()
                    },
                )
                .await
                .unwrap();
            assert!(cancelled.is_some(), "the order was brewing");
            barista.cancel.cancel();
        };
        let (id, ()) = tokio::join!(barista.place("tok_visa"), cancel);
        let order = orders.order(&id);
        assert_eq!(
            (order.order.state(), order.step),
            (S::Cancelled, Step::Done)
        );
        assert_eq!(ledger.state(&id), PaymentState::Voided);
        let events = orders.events(&id);
        assert!(!events.contains(&E::PaymentCaptured));
        assert_eq!(events[events.len() - 2..], [E::PaymentVoided, E::Cancelled]);
    }

    #[tokio::test(start_paused = true)]
    async fn resumed_at_run_it_brews_again_and_charges_once() {
        let (orders, ledger) = (MemoryOrders::default(), MemoryLedger::default());
        // Authorized before the crash; the answer was lost with the process.
        orders.put(latte("tok_visa", S::Brewing, Step::Run));
        ledger.authorized("ord_1");
        let barista = Barista::new(&orders, &ledger, A);
        barista.drive("ord_1", Begin::Resumed).await;
        let order = orders.order("ord_1");
        assert_eq!((order.order.state(), order.step), (S::Ready, Step::Done));
        assert_eq!(ledger.state("ord_1"), PaymentState::Captured);
        assert_eq!(ledger.payments.lock().unwrap().len(), 1);
        let events = orders.events("ord_1");
        assert_eq!(events.first(), Some(&E::Resumed));
        assert_eq!(
            events.iter().filter(|e| **e == E::PaymentCaptured).count(),
            1
        );
    }

    /// At step Complete, whether READY was written (this version) or not
    /// yet (an order the earlier version stored, still BREWING): the drink
    /// is handed over once and the payment captured, nothing brewed again.
    #[tokio::test(start_paused = true)]
    async fn resumed_at_complete_it_captures_without_brewing_again() {
        for (state, events) in [
            (S::Brewing, &[E::Ready, E::PaymentCaptured][..]),
            (S::Ready, &[E::PaymentCaptured][..]),
        ] {
            let (orders, ledger) = (MemoryOrders::default(), MemoryLedger::default());
            let mut record = latte("tok_visa", state, Step::Complete);
            record.order.payment_id = payment_id("ord_1");
            orders.put(record);
            ledger.authorized("ord_1");
            Barista::new(&orders, &ledger, A)
                .drive("ord_1", Begin::Resumed)
                .await;
            let order = orders.order("ord_1");
            assert_eq!((order.order.state(), order.step), (S::Ready, Step::Done));
            assert_eq!(ledger.state("ord_1"), PaymentState::Captured);
            assert_eq!(orders.events("ord_1"), events, "from {state:?}");
        }
    }

    /// A ledger whose captures take 2 s, as long as the stations' steps.
    fn capturing_in_2s() -> MemoryLedger {
        MemoryLedger {
            capture_delay: Duration::from_secs(2),
            ..MemoryLedger::default()
        }
    }

    /// The seed's timing: the customer waits for the longer of payment and
    /// brewing, and the capture settles after the drink is handed over.
    #[tokio::test(start_paused = true)]
    async fn the_drink_is_handed_over_before_its_capture_settles() {
        let (orders, ledger) = (MemoryOrders::default(), capturing_in_2s());
        let barista = Barista::new(&orders, &ledger, A);
        let look = async {
            // The stations take 2 s; the capture 2 s more.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let order = orders.order("ord_1");
            assert_eq!(
                (order.order.state(), order.step),
                (S::Ready, Step::Complete)
            );
            assert_eq!(ledger.state("ord_1"), PaymentState::Authorized);
        };
        let (id, ()) = tokio::join!(barista.place("tok_visa"), look);
        assert_eq!(orders.order(&id).step, Step::Done);
        assert_eq!(ledger.state(&id), PaymentState::Captured);
        let events = orders.events(&id);
        assert_eq!(events[events.len() - 2..], [E::Ready, E::PaymentCaptured]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_capture_refused_after_the_hand_over_is_recorded_and_the_drink_stays_ready() {
        let (orders, ledger) = (MemoryOrders::default(), capturing_in_2s());
        let barista = Barista::new(&orders, &ledger, A);
        let void_by_hand = async {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let id = payment_id("ord_1");
            ledger
                .settle(&id, PaymentState::Authorized, PaymentState::Voided)
                .unwrap();
        };
        let (id, ()) = tokio::join!(barista.place("tok_visa"), void_by_hand);
        let order = orders.order(&id);
        assert_eq!((order.order.state(), order.step), (S::Ready, Step::Done));
        let events = orders.events(&id);
        assert_eq!(events.last(), Some(&E::PaymentCaptureRefused));
        assert!(!events.contains(&E::PaymentCaptured));
    }

    #[tokio::test(start_paused = true)]
    async fn resumed_at_compensate_it_voids_and_ends_as_the_order_says() {
        for (state, last) in [(S::Brewing, E::Failed), (S::Cancelling, E::Cancelled)] {
            let (orders, ledger) = (MemoryOrders::default(), MemoryLedger::default());
            let mut record = latte("tok_visa", state, Step::Compensate);
            record.order.failure_reason = "brewing failed: the milk station failed".into();
            orders.put(record);
            ledger.authorized("ord_1");
            Barista::new(&orders, &ledger, A)
                .drive("ord_1", Begin::Resumed)
                .await;
            let order = orders.order("ord_1");
            assert_eq!(order.step, Step::Done);
            assert_eq!(ledger.state("ord_1"), PaymentState::Voided);
            assert_eq!(orders.events("ord_1"), [E::PaymentVoided, last]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn resumed_at_compensate_with_no_authorization_it_releases_the_one_it_makes() {
        let (orders, ledger) = (MemoryOrders::default(), MemoryLedger::default());
        orders.put(latte("tok_visa", S::Cancelling, Step::Compensate));
        Barista::new(&orders, &ledger, A)
            .drive("ord_1", Begin::Resumed)
            .await;
        assert_eq!(orders.order("ord_1").order.state(), S::Cancelled);
        assert_eq!(ledger.state("ord_1"), PaymentState::Voided);
    }

    #[tokio::test(start_paused = true)]
    async fn resumed_at_done_it_does_nothing() {
        let (orders, ledger) = (MemoryOrders::default(), MemoryLedger::default());
        orders.put(latte("tok_visa", S::Ready, Step::Done));
        Barista::new(&orders, &ledger, A)
            .drive("ord_1", Begin::Resumed)
            .await;
        assert!(orders.events("ord_1").is_empty());
        assert!(ledger.payments.lock().unwrap().is_empty());
    }

    /// The failure issue's first finding: barista A stalls with its
    /// authorization's answer in flight; its lease runs out and B takes the
    /// order over, makes the drink and is capturing when A wakes. A's
    /// guarded write is refused; A must not take that for a cancel and void
    /// the payment (which left B's capture refused and a made drink FAILED).
    #[tokio::test(start_paused = true)]
    async fn a_saga_that_lost_its_order_releases_nothing_and_writes_nothing() {
        let orders = MemoryOrders::default();
        let ledger = MemoryLedger {
            // A's answer comes 10 s late; B's at once.
            authorize_delays: Mutex::new([Duration::from_secs(10)].into()),
            capture_delay: Duration::from_secs(10),
            ..MemoryLedger::default()
        };
        let a = Barista::new(&orders, &ledger, A);
        let b = Barista::new(&orders, &ledger, B);
        let taken_over = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            orders.take_over("ord_1", B);
            b.drive("ord_1", Begin::Resumed).await;
        };
        let (id, ()) = tokio::join!(a.place("tok_visa"), taken_over);
        let order = orders.order(&id);
        assert_eq!((order.order.state(), order.step), (S::Ready, Step::Done));
        assert_eq!(order.owner, B);
        assert_eq!(ledger.state(&id), PaymentState::Captured);
        assert_eq!(ledger.voids(), 0);
        let events = orders.events(&id);
        assert!(!events.contains(&E::PaymentVoided), "{events:?}");
        // A wrote its start; everything after the take-over is B's saga.
        let resumed = events.iter().position(|e| *e == E::Resumed).unwrap();
        assert_eq!(
            events[resumed..]
                .iter()
                .filter(|e| **e == E::PaymentAuthorized)
                .count(),
            1,
            "{events:?}"
        );
    }
}
