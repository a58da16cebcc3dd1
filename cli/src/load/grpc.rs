//! The barista's own entrance: PlaceOrder and WatchOrder over gRPC, or for
//! a group BatchPlaceOrders and WatchOrders.

use tonic::Streaming;
use tonic::transport::Channel;

use brewmesh::pb::barista::v1::barista_client::BaristaClient;
use brewmesh::pb::barista::v1::{
    BatchPlaceOrdersRequest, OrderEvent, PlaceOrderRequest, WatchOrderRequest, WatchOrdersRequest,
};

use super::follow::{Ending, Entrance, Event, Events};

/// The barista at one channel (one connection).
pub(super) struct Grpc(pub(super) BaristaClient<Channel>);

fn ending(status: tonic::Status) -> Ending {
    use std::error::Error as _;
    // Broken below gRPC (the barista died: a reset, an h2 error): the
    // watch is resumed like one a draining barista ended.
    if status.source().is_some() {
        return Ending::Error(tonic::Code::Unavailable, status.message().to_owned());
    }
    // A full shop says when to come back (gRFC A6); a negative pushback
    // says never (a batch too large), and that is an error like others.
    if status.code() == tonic::Code::ResourceExhausted
        && let Some(after) =
            brewmesh_runtime::ejection::pushback(&status.metadata().clone().into_headers())
    {
        return Ending::Full(after, status.message().to_owned());
    }
    Ending::Error(status.code(), status.message().to_owned())
}

impl Entrance for Grpc {
    type Events = Streaming<OrderEvent>;

    async fn place(&self, order: &PlaceOrderRequest) -> Result<String, Ending> {
        let placed = self.0.clone().place_order(order.clone()).await;
        Ok(placed.map_err(ending)?.into_inner().order_id)
    }

    async fn watch(&self, order_id: &str, after: i64) -> Result<Self::Events, Ending> {
        let watch = WatchOrderRequest {
            order_id: order_id.to_owned(),
            after_sequence: after,
        };
        let events = self.0.clone().watch_order(watch).await;
        Ok(events.map_err(ending)?.into_inner())
    }

    async fn place_all(&self, orders: &[PlaceOrderRequest]) -> Result<Vec<String>, Ending> {
        let batch = BatchPlaceOrdersRequest {
            requests: orders.to_vec(),
        };
        let placed = self.0.clone().batch_place_orders(batch).await;
        let orders = placed.map_err(ending)?.into_inner().orders;
        Ok(orders.into_iter().map(|o| o.order_id).collect())
    }

    async fn watch_all(&self, order_ids: &[String]) -> Result<Self::Events, Ending> {
        let watch = WatchOrdersRequest {
            order_ids: order_ids.to_vec(),
        };
        let events = self.0.clone().watch_orders(watch).await;
        Ok(events.map_err(ending)?.into_inner())
    }
}

impl Events for Streaming<OrderEvent> {
    async fn next(&mut self) -> Option<Result<Event, Ending>> {
        let event = tokio_stream::StreamExt::next(self).await?;
        Some(event.map_err(ending).map(|event| Event {
            kind: event.r#type(),
            order_id: event.order_id,
            sequence: event.sequence,
            detail: event.detail,
        }))
    }
}
