//! The `brewmesh.barista.v1.Barista` gRPC service: validation, then the
//! [`Shop`] places orders and the sagas make them; WatchOrder follows an
//! order's [`Journal`](crate::journal::Journal).

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use brewmesh::pb::barista::v1::barista_server::Barista;
use brewmesh::pb::barista::v1::{
    BatchPlaceOrdersRequest, BatchPlaceOrdersResponse, CancelOrderRequest, GetMenuRequest,
    GetOrderRequest, ListOrdersRequest, ListOrdersResponse, Menu, MenuItem, Order, OrderEvent,
    OrderEventType as E, OrderState as S, PlaceOrderRequest, WatchOrderRequest, WatchOrdersRequest,
};
use brewmesh_runtime::caller::Caller;
use brewmesh_runtime::idempotency::fingerprint;
use brewmesh_runtime::validate::{Validate as _, Violations, next_page_token, page_size};

use crate::error::BaristaError;
use crate::journal::{OrderWatch, Written};
use crate::menu;
use crate::saga::Orders as _;
use crate::shop::Shop;
use crate::store::{Change, NewOrder, OrderRecord, Step};

/// The gRPC face of the [`Shop`].
#[derive(Debug, Clone)]
pub struct BaristaService {
    shop: Arc<Shop>,
    shutdown: CancellationToken,
}

impl BaristaService {
    /// Serves `shop`. Watch streams end when `shutdown` is cancelled; they
    /// learn of other processes' writes through the journal's poll.
    pub(crate) fn new(shop: Arc<Shop>, shutdown: CancellationToken) -> Self {
        Self { shop, shutdown }
    }

    /// The order as stored, with its saga's step; NOT_FOUND if there is
    /// none, or if it is another customer's than `caller` (whose orders
    /// are not theirs to know of).
    async fn record(&self, order_id: &str, caller: &Caller) -> Result<OrderRecord, BaristaError> {
        self.shop
            .store()
            .get(order_id)
            .await?
            .filter(|record| caller.confined_to().is_none_or(|c| c == record.customer))
            .ok_or_else(|| BaristaError::NotFound(order_id.to_owned()))
    }
}

/// The events of one order, as WatchOrder streams them.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<OrderEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Barista for BaristaService {
    async fn get_menu(&self, _request: Request<GetMenuRequest>) -> Result<Response<Menu>, Status> {
        Ok(Response::new(menu::menu()))
    }

    async fn place_order(
        &self,
        request: Request<PlaceOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let customer = customer_of(&request);
        let request = request.into_inner();
        request.validate()?;
        let Some(item) = menu::find(&request.item_id) else {
            return Err(BaristaError::NotOnTheMenu(request.item_id).into());
        };
        let new = new_order(request, &item, customer);
        Ok(Response::new(self.shop.place(new, &item).await?))
    }

    async fn batch_place_orders(
        &self,
        request: Request<BatchPlaceOrdersRequest>,
    ) -> Result<Response<BatchPlaceOrdersResponse>, Status> {
        let customer = customer_of(&request);
        let request = request.into_inner();
        // A bad entry is a bad batch, refused before anything is stored:
        // malformed (INVALID_ARGUMENT), or naming a drink not on the menu
        // (NOT_FOUND, as for PlaceOrder, with the entries named). Two
        // entries with one key are one order, as two PlaceOrders would be
        // (or, for different requests, a reused key).
        request.validate()?;
        let items: Vec<_> = request
            .requests
            .iter()
            .map(|e| menu::find(&e.item_id))
            .collect();
        let missing: Vec<usize> = (0..items.len()).filter(|i| items[*i].is_none()).collect();
        if let Some(&first) = missing.first() {
            return Err(BaristaError::NotOnTheMenuIn {
                item_id: request.requests[first].item_id.clone(),
                entries: missing,
            }
            .into());
        }
        let items: Vec<_> = items.into_iter().flatten().collect();
        let batch = request
            .requests
            .into_iter()
            .zip(&items)
            .map(|(entry, item)| (new_order(entry, item, customer.clone()), item))
            .collect();
        let orders = self.shop.place_all(batch).await?;
        Ok(Response::new(BatchPlaceOrdersResponse { orders }))
    }

    async fn get_order(
        &self,
        request: Request<GetOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        request.validate()?;
        Ok(Response::new(
            self.record(&request.order_id, &caller).await?.order,
        ))
    }

    async fn list_orders(
        &self,
        request: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        let mut violations = Violations::new();
        request.validate_at("", &mut violations);
        let state = S::try_from(request.state).unwrap_or_else(|_| {
            violations.add("state", "is not an OrderState");
            S::Unspecified
        });
        violations.check()?;
        let limit = page_size(request.page_size, 50, 1000);
        // The page token is the id of the last order of the previous page.
        let before = Some(request.page_token.as_str()).filter(|t| !t.is_empty());
        let (orders, last) = self
            .shop
            .store()
            .list(state, caller.confined_to(), before, limit)
            .await
            .map_err(BaristaError::from)?;
        let next_page_token = next_page_token(last.is_some(), last.as_deref());
        Ok(Response::new(ListOrdersResponse {
            orders,
            next_page_token,
        }))
    }

    async fn cancel_order(
        &self,
        request: Request<CancelOrderRequest>,
    ) -> Result<Response<Order>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        request.validate()?;
        let order_id = request.order_id.as_str();
        if caller.confined_to().is_some() {
            // Another customer's order is not found, and not cancelled.
            self.record(order_id, &caller).await?;
        }
        let reason = if request.reason.is_empty() {
            "cancelled by the customer".to_owned()
        } else {
            format!("cancelled: {}", request.reason)
        };
        let cancelled = self
            .shop
            .journal()
            .record(
                order_id,
                &[(E::CancelRequested, &request.reason)],
                Change {
                    from: &[S::Accepted, S::Brewing],
                    from_step: Some(Step::Run),
                    state: Some(S::Cancelling),
                    step: Some(Step::Compensate),
                    failure_reason: Some(&reason),
                    ..Change::default()
                },
            )
            .await
            .map_err(BaristaError::from)?;
        let record = self
            .shop
            .store()
            .get(order_id)
            .await
            .map_err(BaristaError::from)?
            .ok_or_else(|| BaristaError::NotFound(order_id.to_owned()))?;
        if cancelled.is_some() {
            tracing::info!(order_id, "order cancelled");
            self.shop.cancel(order_id);
            return Ok(Response::new(record.order));
        }
        let why = match (record.order.state(), record.step) {
            (S::Cancelling | S::Cancelled, _) => return Ok(Response::new(record.order)),
            (S::Ready, _) => "the drink is ready".to_owned(),
            (S::Failed, _) => format!("the order failed ({})", record.order.failure_reason),
            (_, Step::Complete) => "the drink is made and being paid for".to_owned(),
            (_, _) => format!("the order is failing ({})", record.order.failure_reason),
        };
        Err(BaristaError::NotCancellable {
            order_id: order_id.to_owned(),
            why,
        }
        .into())
    }

    type WatchOrderStream = EventStream;
    type WatchOrdersStream = EventStream;

    async fn watch_orders(
        &self,
        request: Request<WatchOrdersRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        request.validate()?;
        let mut order_ids = request.order_ids;
        order_ids.sort_unstable();
        order_ids.dedup();
        // Every order found (and the caller's) before the first event: as
        // for one order, subscribed before it is read.
        let mut starts = Vec::with_capacity(order_ids.len());
        for order_id in order_ids {
            let changes = self.shop.journal().watch(&order_id);
            let record = self.record(&order_id, &caller).await?;
            starts.push((start(order_id, 0, &record), changes));
        }
        // One follower per order, all into one stream: it ends when the
        // last of them has sent its order's last event.
        let (tx, rx) = mpsc::channel(64);
        for (start, changes) in starts {
            tokio::spawn(follow(
                Arc::clone(&self.shop),
                start,
                changes,
                tx.clone(),
                self.shutdown.clone(),
            ));
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn watch_order(
        &self,
        request: Request<WatchOrderRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let caller = Caller::of(&request);
        let request = request.into_inner();
        request.validate()?;
        // Subscribe before the first read, so no event falls between the two.
        let changes = self.shop.journal().watch(&request.order_id);
        let record = self.record(&request.order_id, &caller).await?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(follow(
            Arc::clone(&self.shop),
            start(request.order_id, request.after_sequence, &record),
            changes,
            tx,
            self.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Whose order `request` places: the subject the gateway authenticated,
/// or '' for a service calling for itself.
fn customer_of<T>(request: &Request<T>) -> String {
    Caller::of(request).subject().unwrap_or_default().to_owned()
}

/// The order `request` asks for, a drink of `item`, for `customer` (the
/// caller's subject, or '').
fn new_order(request: PlaceOrderRequest, item: &MenuItem, customer: String) -> NewOrder {
    // Whose it is belongs to the request: another customer's key, the
    // same body, is a reused key, not their order to be handed. A batch's
    // entry has the fingerprint of the same PlaceOrder: either replays
    // the other.
    let mut fingerprint = fingerprint("PlaceOrder", &request);
    if !customer.is_empty() {
        fingerprint.push_str(" by ");
        fingerprint.push_str(&customer);
    }
    NewOrder {
        idempotency_key: request.idempotency_key,
        fingerprint,
        item_id: item.item_id.clone(),
        customer_name: request.customer_name,
        card_token: request.card_token,
        price: item.price.clone().unwrap_or_default(),
        customer,
    }
}

/// Where a watch starts: the order as read once its writes were followed.
struct Start {
    order_id: String,
    /// The last sequence the client has.
    after: i64,
    /// The saga was over: the events stored are all there will be.
    done: bool,
    /// What the order had come to (READY, its settlement perhaps to come).
    ending: Ending,
}

/// Where a watch of `order_id` after sequence `after` starts, `record` read
/// once its writes were followed.
fn start(order_id: String, after: i64, record: &OrderRecord) -> Start {
    Start {
        order_id,
        after,
        done: record.step == Step::Done,
        ending: Ending {
            ready: record.order.state() == S::Ready,
            settled: false,
        },
    }
}

/// Where a watch stands: whether the order's last event has been sent.
///
/// A READY order's last event is its settlement (PAYMENT_CAPTURED or
/// PAYMENT_CAPTURE_REFUSED), which follows READY; orders settled before
/// READY was handed over first (an earlier version) have the capture just
/// before READY, in the same write. Either order of the two ends the
/// stream once both have been seen — or once the one not yet seen cannot
/// come: a watch that began at or after READY.
struct Ending {
    ready: bool,
    settled: bool,
}

impl Ending {
    /// Whether `event` is the order's last.
    fn last(&mut self, event: &OrderEvent) -> bool {
        match event.r#type() {
            E::Failed | E::Cancelled => true,
            E::Ready => {
                self.ready = true;
                self.settled
            }
            E::PaymentCaptured | E::PaymentCaptureRefused => {
                self.settled = true;
                self.ready
            }
            _ => false,
        }
    }
}

/// Sends the order's events after `start.after` into `tx` until its last.
async fn follow(
    shop: Arc<Shop>,
    start: Start,
    mut changes: OrderWatch,
    tx: mpsc::Sender<Result<OrderEvent, Status>>,
    shutdown: CancellationToken,
) {
    let Start {
        order_id,
        mut after,
        done,
        mut ending,
    } = start;
    // What the last wake-up told; `None` at first: read.
    let mut written: Option<Written> = None;
    loop {
        let events = match written.take() {
            // Handed over by this process's write, following on from `after`.
            Some(w) if w.events.first().is_some_and(|e| e.sequence == after + 1) => {
                w.events.to_vec()
            }
            // Nothing past `after` (a write already read, or polled).
            Some(w) if w.latest <= after => Vec::new(),
            // Events written elsewhere, or a write missed: read them.
            _ => match shop.store().events_after(&order_id, after).await {
                Ok(events) => events,
                Err(error) => {
                    let _ = tx.send(Err(BaristaError::from(error).into())).await;
                    return;
                }
            },
        };
        for event in events {
            after = event.sequence;
            let last = ending.last(&event);
            if tx.send(Ok(event)).await.is_err() || last {
                return; // the client left, or the order ended
            }
        }
        if done {
            // Subscribed before the order was read: the first read had all.
            return;
        }
        // Woken by this process's own writes, and by the shop's poll for
        // other processes' writes (replicas sharing the database).
        tokio::select! {
            news = changes.changed() => written = Some(news),
            () = tx.closed() => return,
            () = shutdown.cancelled() => {
                let status = Status::unavailable(format!("the server is shutting down; watch again with after_sequence={after}"));
                let _ = tx.send(Err(status)).await;
                return;
            }
        }
    }
}
