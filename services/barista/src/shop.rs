//! The shop: the order store, the stations, the payment client, and the
//! sagas that turn accepted orders into drinks (or into nothing charged).
//!
//! # The saga
//!
//! `Run`: the order goes BREWING; the authorization and the brewing (espresso
//! and milk at the same time) run concurrently. A declined card ends the
//! order FAILED at once. A failed station or a cancel moves the order to
//! `Compensate`; a made drink with an authorized payment moves it to
//! `Complete`.
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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use brewmesh::discovery::Balanced;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Code, Request, Response, Status};
use tower::retry::budget::{Budget as _, TpsBudget};
use tracing::Instrument as _;

use brewmesh::pb::barista::v1::{MenuItem, OrderEvent, OrderEventType as E, OrderState as S};
use brewmesh::pb::payment::v1::payments_client::PaymentsClient;
use brewmesh::pb::payment::v1::{
    AuthorizeRequest, CaptureRequest, Payment, PaymentState, VoidRequest,
};

use crate::menu;
use crate::stations::{Admission, Station, Stations};
use crate::store::{Change, OrderRecord, OrderStore, Step};

const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How the concurrent part of step `Run` ended.
enum Outcome {
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
    #[error("payment refused: {0}")]
    PaymentRefused(Status),
    /// The store failed; the step is retried.
    #[error("order store: {0}")]
    Store(#[from] sqlx::Error),
}

/// Everything the handlers and the sagas share.
#[derive(Debug)]
pub struct Shop {
    pub(crate) store: OrderStore,
    pub(crate) stations: Stations,
    payments: PaymentsClient<Balanced>,
    payment_timeout: Duration,
    /// Bounds retries of payment calls across every saga.
    retries: TpsBudget,
    sagas: TaskTracker,
    /// Cancel tokens of the sagas running in this process, by order id. An
    /// entry is also the claim that this process drives the order.
    running: Mutex<HashMap<String, CancellationToken>>,
    /// Per order that someone in this process watches, what its watchers
    /// are told: a write here wakes that order's watchers only and hands
    /// them its events; one poll for all watched orders finds other
    /// processes' writes. (One broadcast of every order id to every watcher
    /// woke 30,000 watchers for each of thousands of events a second; a
    /// poll per watcher was most of the reads of a busy shop.)
    watched: Watched,
    /// This barista, as the `owner` of the orders it drives.
    owner: String,
    /// How long an order stays this barista's without a renewal.
    lease: Duration,
}

impl Shop {
    /// A shop over `store` and `stations`, paying through `payments`.
    pub fn new(
        store: OrderStore,
        stations: Stations,
        payments: PaymentsClient<Balanced>,
        payment_timeout: Duration,
        lease: Duration,
    ) -> Self {
        Self {
            store,
            stations,
            payments,
            payment_timeout,
            // As linkerd's default: retries may add 20% to the calls of the
            // last 10 s, plus 10 a second so a quiet shop can still retry.
            retries: TpsBudget::new(Duration::from_secs(10), 10, 0.2),
            sagas: TaskTracker::new(),
            running: Mutex::new(HashMap::new()),
            watched: Arc::default(),
            owner: brewmesh::ids::new("barista"),
            lease,
        }
    }

    /// This barista's owner id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// The end of a lease taken now, in micros.
    pub fn lease_until(&self) -> i64 {
        brewmesh::time::now_micros()
            .saturating_add(i64::try_from(self.lease.as_micros()).unwrap_or(i64::MAX))
    }

    /// The running sagas, to wait for while draining.
    pub fn sagas(&self) -> &TaskTracker {
        &self.sagas
    }

    /// Follows `order_id`'s writes in this process: [`OrderWatch::changed`]
    /// returns once there are new events since the last call (or since
    /// this one).
    pub fn watch(&self, order_id: &str) -> OrderWatch {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        let receiver = watched
            .entry(order_id.into())
            .or_insert_with(|| watch::channel(Written::default()).0)
            .subscribe();
        OrderWatch {
            order_id: order_id.into(),
            receiver,
            watched: Arc::clone(&self.watched),
        }
    }

    /// Applies `change` with `events`, and tells watchers.
    pub(crate) async fn record(
        &self,
        order_id: &str,
        events: &[(E, &str)],
        change: Change<'_>,
    ) -> Result<Option<Vec<OrderEvent>>, sqlx::Error> {
        let stored = self.store.record(order_id, events, change).await?;
        if let Some(stored) = &stored {
            for event in stored {
                tracing::info!(order_id, sequence = event.sequence, event = ?event.r#type(), state = ?event.state(), detail = %event.detail, "order event");
                let outcome = match event.r#type() {
                    E::Ready => Some("ready"),
                    E::Failed => Some("failed"),
                    E::Cancelled => Some("cancelled"),
                    _ => None,
                };
                if let Some(outcome) = outcome {
                    crate::observe::order_finished(outcome);
                }
            }
            let watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
            if let (Some(sender), Some(last)) = (watched.get(order_id), stored.last()) {
                sender.send_modify(|written| {
                    written.latest = written.latest.max(last.sequence);
                    written.events = Arc::from(stored.as_slice());
                });
            }
        }
        Ok(stored)
    }

    /// Starts driving `record`'s saga in the background, unless this process
    /// already does. `admission` is the stations' places taken when the order
    /// was placed; a resumed order waits for its places.
    pub fn start(
        self: &Arc<Self>,
        record: OrderRecord,
        admission: Option<Admission>,
        resumed: bool,
    ) {
        let cancel = CancellationToken::new();
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            if running.contains_key(&record.order.order_id) {
                return;
            }
            running.insert(record.order.order_id.clone(), cancel.clone());
        }
        let shop = Arc::clone(self);
        // A child of the PlaceOrder call (or of nothing, for an order taken
        // over): the saga outlives the call, as in a trace of HotROD.
        let span = tracing::info_span!("saga", otel.name = "order saga", order_id = %record.order.order_id, resumed);
        self.sagas.spawn(
            async move {
                let order_id = record.order.order_id.clone();
                shop.drive(record, admission, resumed, &cancel).await;
                shop.running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&order_id);
            }
            .instrument(span),
        );
    }

    /// Tells this process's saga of `order_id` that the order was cancelled.
    /// An order another barista drives is cancelled by that barista, which
    /// notices at its next lease renewal; an orphan, by whoever adopts it.
    pub fn cancel(&self, order_id: &str) {
        let token = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(order_id)
            .cloned();
        if let Some(token) = token {
            token.cancel();
        }
    }

    /// Takes over orders whose barista is gone (their lease ran out), starts
    /// every unfinished order this barista holds that is not running here,
    /// and passes on cancels that another replica recorded. Returns how many
    /// sagas it started.
    pub async fn adopt(self: &Arc<Self>) -> Result<usize, sqlx::Error> {
        let held = self
            .store
            .claim_orphans(
                &self.owner,
                brewmesh::time::now_micros(),
                self.lease_until(),
            )
            .await?;
        let mut started = 0;
        for record in held {
            let running = self
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&record.order.order_id)
                .cloned();
            match running {
                Some(token) if record.step == Step::Compensate => token.cancel(),
                Some(_) => {}
                None => {
                    tracing::info!(order_id = %record.order.order_id, step = ?record.step, "taking over an unfinished order");
                    self.start(record, None, true);
                    started += 1;
                }
            }
        }
        Ok(started)
    }

    /// Every third of the lease: renews this barista's leases until `stop`,
    /// and adopts orphans until `draining` (a draining barista takes on no
    /// new work).
    pub async fn keep_leases(
        self: Arc<Self>,
        draining: CancellationToken,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.lease / 3);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            if let Err(error) = self
                .store
                .renew_leases(&self.owner, self.lease_until())
                .await
            {
                tracing::warn!(%error, "renewing order leases failed");
            }
            if !draining.is_cancelled()
                && let Err(error) = self.adopt().await
            {
                tracing::warn!(%error, "adopting orphaned orders failed");
            }
        }
    }

    /// Every `poll` until `stop`: finds the watched orders that other
    /// processes (replicas on the same database) wrote to, with one query
    /// per 500 orders, and wakes their watchers to read.
    pub async fn follow_others(self: Arc<Self>, poll: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = stop.cancelled() => return,
            }
            let ids: Vec<Arc<str>> = self
                .watched
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned()
                .collect();
            for chunk in ids.chunks(500) {
                let latest = match self.store.latest_sequences(chunk).await {
                    Ok(latest) => latest,
                    Err(error) => {
                        tracing::warn!(%error, "polling watched orders failed");
                        break;
                    }
                };
                let watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
                for (order_id, sequence) in latest {
                    if let Some(sender) = watched.get(order_id.as_str()) {
                        sender.send_if_modified(|written| {
                            let newer = sequence > written.latest;
                            if newer {
                                written.latest = sequence;
                                written.events = Arc::from([]);
                            }
                            newer
                        });
                    }
                }
            }
        }
    }

    /// Gives up the leases of the orders still unfinished here, so another
    /// barista takes them over at once.
    pub async fn release(&self) {
        match self.store.release_leases(&self.owner).await {
            Ok(0) => {}
            Ok(count) => tracing::info!(
                orders = count,
                "released unfinished orders to other baristas"
            ),
            Err(error) => {
                tracing::warn!(%error, "releasing order leases failed; they run out on their own")
            }
        }
    }

    /// Runs the saga to its end, retrying steps that failed for a passing
    /// reason (the store) with backoff.
    async fn drive(
        &self,
        mut record: OrderRecord,
        mut admission: Option<Admission>,
        mut resumed: bool,
        cancel: &CancellationToken,
    ) {
        let order_id = record.order.order_id.clone();
        let mut backoff = Duration::from_millis(100);
        loop {
            let result = match record.step {
                Step::Run => self.run(&record, admission.take(), resumed, cancel).await,
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
            match self.store.get(&order_id).await {
                Ok(Some(fresh)) if fresh.owner != self.owner => {
                    // Our lease ran out (this process stalled) and another
                    // barista took the order over: it is theirs now.
                    tracing::warn!(%order_id, owner = %fresh.owner, "order taken over by another barista");
                    return;
                }
                Ok(Some(fresh)) => record = fresh,
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(%order_id, %error, "reloading order failed; retrying");
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }

    /// Step `Run`: authorize while brewing.
    async fn run(
        &self,
        record: &OrderRecord,
        admission: Option<Admission>,
        resumed: bool,
        cancel: &CancellationToken,
    ) -> Result<(), SagaError> {
        let order_id = record.order.order_id.as_str();
        let Some(item) = menu::find(&record.order.item_id) else {
            // Only a menu change under a stored order gets here.
            let reason = format!("{:?} is no longer on the menu", record.order.item_id);
            self.finish_failed(order_id, Step::Run, &reason).await?;
            return Ok(());
        };
        let event = if resumed {
            E::Resumed
        } else {
            E::BrewingStarted
        };
        let detail = if resumed {
            "picked up again after a restart"
        } else {
            ""
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
            return Ok(()); // cancelled meanwhile: the reloaded step says what is next
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
        let outcome = {
            let brew = self.brew(order_id, &item, admission);
            tokio::pin!(brew);
            let mut brewed = false;
            loop {
                if brewed && payment.is_some() {
                    break Outcome::Made;
                }
                tokio::select! {
                    result = &mut authorize, if payment.is_none() => match result {
                        Ok(p) if p.state() == PaymentState::Authorized => payment = Some(p),
                        Ok(declined) => break Outcome::Declined(declined),
                        Err(SagaError::PaymentRefused(status)) => break Outcome::Refused(status),
                        Err(other) => return Err(other),
                    },
                    result = &mut brew, if !brewed => match result {
                        Ok(()) => brewed = true,
                        Err(SagaError::BrewFailed(reason)) => break Outcome::BrewFailed(reason),
                        Err(other) => return Err(other),
                    },
                    () = cancel.cancelled() => break Outcome::Cancelled,
                }
            }
        }; // `brew` is dropped here, with any place or transaction it held.

        let mut failure = None;
        match outcome {
            Outcome::Made => {
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
                // Cancelled just now: the cancel wins, compensation follows.
            }
            Outcome::Declined(declined) => {
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
                    },
                )
                .await?;
                return Ok(());
            }
            Outcome::Refused(status) => {
                let reason = format!("payment refused: {}", status.message());
                self.finish_failed(order_id, Step::Run, &reason).await?;
                return Ok(());
            }
            Outcome::BrewFailed(reason) => failure = Some(format!("brewing failed: {reason}")),
            Outcome::Cancelled => {}
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
            // `None` means a cancel came first; compensating serves both.
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
        let fresh = self
            .store
            .get(order_id)
            .await?
            .ok_or(sqlx::Error::RowNotFound)?;
        self.compensate(&fresh, payment).await
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
            E::EspressoStarted,
            E::EspressoDone,
            &shots,
        );
        match admission.milk {
            Some(place) => {
                let milk = self.station_step(
                    order_id,
                    &self.stations.milk,
                    Some(place),
                    E::MilkStarted,
                    E::MilkDone,
                    "",
                );
                tokio::try_join!(espresso, milk).map(|_| ())
            }
            None => espresso.await,
        }
    }

    async fn station_step(
        &self,
        order_id: &str,
        station: &Station,
        place: Option<OwnedSemaphorePermit>,
        started: E,
        done: E,
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
        let captured = traced(
            span,
            self.pay(order_id, "capture", |mut client, timeout| {
                let request = CaptureRequest {
                    payment_id: record.order.payment_id.clone(),
                    idempotency_key: format!("{order_id}:capture"),
                };
                async move { client.capture(with_timeout(request, timeout)).await }
            }),
        )
        .await;
        match captured {
            Ok(payment) => {
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
            Err(SagaError::PaymentRefused(status)) => {
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
                Err(SagaError::PaymentRefused(status)) => {
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
            let voided = traced(
                span,
                self.pay(order_id, "void", |mut client, timeout| {
                    let request = VoidRequest {
                        payment_id: payment.payment_id.clone(),
                        idempotency_key: format!("{order_id}:void"),
                    };
                    async move { client.void(with_timeout(request, timeout)).await }
                }),
            )
            .await;
            match voided {
                Ok(_) => events.push((E::PaymentVoided, "")),
                Err(SagaError::PaymentRefused(status)) => {
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
        let authorized = traced(span.clone(), self.authorize_call(record)).await;
        if let Ok(payment) = &authorized
            && payment.state() == PaymentState::Declined
        {
            let reason = format!("card declined: {}", payment.decline_reason);
            brewmesh::telemetry::fail(&span, &reason);
        }
        authorized
    }

    async fn authorize_call(&self, record: &OrderRecord) -> Result<Payment, SagaError> {
        let order_id = record.order.order_id.as_str();
        self.pay(order_id, "authorize", |mut client, timeout| {
            let request = AuthorizeRequest {
                idempotency_key: format!("{order_id}:authorize"),
                order_id: order_id.to_owned(),
                amount: record.order.price.clone(),
                card_token: record.card_token.clone(),
            };
            async move { client.authorize(with_timeout(request, timeout)).await }
        })
        .await
    }

    /// Calls the payment service until it answers, backing off between
    /// attempts. Safe to repeat because every call carries an idempotency key.
    async fn pay<F, Fut>(
        &self,
        order_id: &str,
        what: &str,
        mut call: F,
    ) -> Result<Payment, SagaError>
    where
        F: FnMut(PaymentsClient<Balanced>, Duration) -> Fut,
        Fut: Future<Output = Result<Response<Payment>, Status>>,
    {
        self.retries.deposit();
        let mut backoff = Duration::from_millis(100);
        loop {
            let attempt = tokio::time::timeout(
                self.payment_timeout,
                call(self.payments.clone(), self.payment_timeout),
            )
            .await;
            let status = match attempt {
                Ok(Ok(response)) => return Ok(response.into_inner()),
                Ok(Err(status)) if !retryable(status.code()) => {
                    return Err(SagaError::PaymentRefused(status));
                }
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
            tracing::warn!(order_id, call = what, code = ?status.code(), message = status.message(), retry_in = ?wait, "payment call failed");
            tokio::time::sleep(
                wait + Duration::from_millis(fastrand::u64(0..=wait.as_millis() as u64 / 2)),
            )
            .await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
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

/// The request with a deadline the server sees (`grpc-timeout`).
fn with_timeout<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    request
}

/// What the watchers of an order are told; see [`Shop::watch`].
#[derive(Debug, Clone)]
pub struct Written {
    /// The events of this process's latest write of the order (empty after
    /// a poll found newer ones).
    pub events: Arc<[OrderEvent]>,
    /// The highest sequence known to be stored, by any process.
    pub latest: i64,
}

impl Default for Written {
    fn default() -> Self {
        Self {
            events: Arc::from([]),
            latest: 0,
        }
    }
}

/// Per watched order, what its watchers are told.
type Watched = Arc<Mutex<HashMap<Arc<str>, watch::Sender<Written>>>>;

/// One watcher's view of an order's writes in this process; see
/// [`Shop::watch`].
#[derive(Debug)]
pub struct OrderWatch {
    order_id: Arc<str>,
    receiver: watch::Receiver<Written>,
    watched: Watched,
}

impl OrderWatch {
    /// Returns when the order has news since the last call: the events of
    /// this process's latest write, and the highest sequence stored. Writes
    /// in between are not among the events: a watcher tells by their
    /// sequence numbers, and reads.
    pub async fn changed(&mut self) -> Written {
        // The sender lives in the map while this receiver does.
        if self.receiver.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.receiver.borrow_and_update().clone()
    }
}

impl Drop for OrderWatch {
    fn drop(&mut self) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        // The last watcher of the order takes its entry away.
        if watched
            .get(&self.order_id)
            .is_some_and(|sender| sender.receiver_count() <= 1)
        {
            watched.remove(&self.order_id);
        }
    }
}
