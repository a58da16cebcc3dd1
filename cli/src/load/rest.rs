//! The gateway's entrance: `POST /v1/orders`, then the order's NDJSON
//! `:watch` stream, with errors as google.rpc.Status JSON; for a group,
//! `POST /v1/orders:batchCreate` and `POST /v1/orders:watch`.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};
use tonic::Code;

use brewmesh::pb::barista::v1::{OrderEventType, PlaceOrderRequest};

use super::follow::{Ending, Entrance, Event, Events};

/// An HTTP/2 client of the gateway, over one connection.
pub(super) type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// The gateway at `base`, through `client`.
pub(super) struct Rest<'a> {
    pub(super) client: &'a HttpClient,
    pub(super) base: &'a str,
    /// The bearer token, if the gateway wants one.
    pub(super) authorization: Option<&'a http::HeaderValue>,
}

/// The code and message of a google.rpc.Status in JSON.
fn status_of(status: &Value) -> Ending {
    let code = status["code"]
        .as_i64()
        .map_or(Code::Unknown, |c| Code::from_i32(c as i32));
    let message = status["message"].as_str().unwrap_or_default().to_owned();
    // A full shop says when to come back, in a RetryInfo ("2s", "0.250s").
    let retry_delay = status["details"].as_array().and_then(|details| {
        details.iter().find_map(|detail| {
            let delay = detail["retryDelay"].as_str()?.strip_suffix('s')?;
            std::time::Duration::try_from_secs_f64(delay.parse().ok()?).ok()
        })
    });
    match retry_delay {
        Some(after) if code == Code::ResourceExhausted => Ending::Full(after, message),
        _ => Ending::Error(code, message),
    }
}

fn unavailable(error: impl ToString) -> Ending {
    Ending::Error(Code::Unavailable, error.to_string())
}

impl Rest<'_> {
    /// Sends `request`, with the token; a non-2xx answer becomes its
    /// Status's ending.
    async fn send(&self, mut request: http::Request<Full<Bytes>>) -> Result<Incoming, Ending> {
        if let Some(authorization) = self.authorization {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, authorization.clone());
        }
        let response = self.client.request(request).await.map_err(unavailable)?;
        if response.status().is_success() {
            return Ok(response.into_body());
        }
        let body = response.into_body().collect().await.map_err(unavailable)?;
        let status = serde_json::from_slice::<Value>(&body.to_bytes()).unwrap_or_default();
        Err(status_of(&status))
    }
}

impl Rest<'_> {
    /// POSTs `body` as JSON to `path`; the answer's JSON.
    async fn post(&self, path: &str, body: Value) -> Result<Value, Ending> {
        let request = built(
            http::Request::post(format!("{}{path}", self.base))
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body.to_string()))),
        )?;
        let body = self.send(request).await?;
        let body = body.collect().await.map_err(unavailable)?.to_bytes();
        serde_json::from_slice(&body).map_err(|e| Ending::Error(Code::Internal, e.to_string()))
    }
}

/// `order` as PlaceOrder's JSON body.
fn entry(order: &PlaceOrderRequest) -> Value {
    json!({
        "idempotencyKey": order.idempotency_key,
        "itemId": order.item_id,
        "customerName": order.customer_name,
        "cardToken": order.card_token,
    })
}

fn built<T>(request: http::Result<T>) -> Result<T, Ending> {
    request.map_err(|e| Ending::Error(Code::InvalidArgument, e.to_string()))
}

impl Entrance for Rest<'_> {
    type Events = Lines;

    async fn place(&self, order: &PlaceOrderRequest) -> Result<String, Ending> {
        let placed = self.post("/v1/orders", entry(order)).await?;
        Ok(placed["orderId"].as_str().unwrap_or_default().to_owned())
    }

    async fn place_all(&self, orders: &[PlaceOrderRequest]) -> Result<Vec<String>, Ending> {
        let requests: Vec<Value> = orders.iter().map(entry).collect();
        let placed = self
            .post("/v1/orders:batchCreate", json!({ "requests": requests }))
            .await?;
        let orders = placed["orders"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        Ok(orders
            .iter()
            .map(|o| o["orderId"].as_str().unwrap_or_default().to_owned())
            .collect())
    }

    async fn watch_all(&self, order_ids: &[String]) -> Result<Lines, Ending> {
        let request = built(
            http::Request::post(format!("{}/v1/orders:watch", self.base))
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(
                    json!({ "orderIds": order_ids }).to_string(),
                ))),
        )?;
        Ok(Lines {
            body: self.send(request).await?,
            pending: Vec::new(),
        })
    }

    async fn watch(&self, order_id: &str, after: i64) -> Result<Lines, Ending> {
        let request = built(
            http::Request::get(format!(
                "{}/v1/orders/{order_id}:watch?afterSequence={after}",
                self.base
            ))
            .body(Full::new(Bytes::new())),
        )?;
        Ok(Lines {
            body: self.send(request).await?,
            pending: Vec::new(),
        })
    }
}

/// A watch's NDJSON body: one `{"result": event}` or `{"error": status}`
/// a line.
pub(super) struct Lines {
    body: Incoming,
    pending: Vec<u8>,
}

impl Events for Lines {
    async fn next(&mut self) -> Option<Result<Event, Ending>> {
        loop {
            while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let Ok(value) = serde_json::from_slice::<Value>(&line) else {
                    continue;
                };
                if let Some(error) = value.get("error") {
                    return Some(Err(status_of(error)));
                }
                let event = &value["result"];
                let sequence = match &event["sequence"] {
                    // int64 is a string in proto3 JSON.
                    Value::String(s) => s.parse().unwrap_or_default(),
                    other => other.as_i64().unwrap_or_default(),
                };
                let kind = event["type"]
                    .as_str()
                    .and_then(OrderEventType::from_str_name)
                    .unwrap_or_default();
                let detail = event["detail"].as_str().unwrap_or_default().to_owned();
                let order_id = event["orderId"].as_str().unwrap_or_default().to_owned();
                return Some(Ok(Event {
                    order_id,
                    sequence,
                    kind,
                    detail,
                }));
            }
            // A body that breaks off ends the watch like one that ends.
            let frame = self.body.frame().await?.ok()?;
            if let Ok(data) = frame.into_data() {
                self.pending.extend_from_slice(&data);
            }
        }
    }
}
