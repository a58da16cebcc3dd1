//! The coffee shop through the gateway: real payment and barista services
//! on port 0 with real SQLite, called over REST as the README shows.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::json;
use tonic::Code;

use brewmesh_testing::{Running, spawn};
use support::{Backends, GatewayRun, Http, gateway, serve_args};

struct Shop {
    http: Http,
    /// The gateway's settings, to start more gateways on the same backends.
    config: brewmesh_gateway::Config,
    _servers: (Backends, Running<GatewayRun>),
    _dir: tempfile::TempDir,
}

/// Payment, a barista with 100 ms steps (`tweak` changes it), and a gateway
/// with the menu cached for `menu_ttl`.
async fn shop(menu_ttl: Duration, tweak: impl FnOnce(&mut brewmesh_barista::Config)) -> Shop {
    let dir = tempfile::tempdir().unwrap();
    let backends = Backends::start(dir.path(), tweak).await;
    let config = brewmesh_gateway::Config {
        backends: backends.routes(),
        cached: vec![("brewmesh.barista.v1.Barista.GetMenu".into(), menu_ttl)],
        ..Default::default()
    };
    let (gw, http) = gateway(config.clone()).await;
    Shop {
        http,
        config,
        _servers: (backends, gw),
        _dir: dir,
    }
}

fn order_body(key: &str, item: &str, card: &str) -> String {
    json!({"idempotencyKey": key, "itemId": item, "customerName": "Ada", "cardToken": card})
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_flow_over_rest_places_watches_and_pays_for_an_order() {
    let shop = shop(Duration::from_secs(60), |_| {}).await;
    let http = &shop.http;

    let menu = http.get("/v1/menu").await;
    assert_eq!(menu.status, 200, "{}", menu.text());
    let items = menu.json()["items"].as_array().unwrap().clone();
    assert!(items.iter().any(|i| i["itemId"] == "latte"), "{items:?}");

    // PlaceOrder creates: 201.
    let placed = http
        .post("/v1/orders", &order_body("rest-1", "latte", "tok_visa"))
        .await;
    assert_eq!(placed.status, 201, "{}", placed.text());
    let order = placed.json();
    assert_eq!(order["state"], "ORDER_STATE_ACCEPTED");
    let order_id = order["orderId"].as_str().unwrap().to_owned();

    // WatchOrder as NDJSON, to the end of the order.
    let watched = http.get(&format!("/v1/orders/{order_id}:watch")).await;
    assert_eq!(watched.status, 200);
    assert_eq!(watched.header("content-type"), Some("application/x-ndjson"));
    let events: Vec<serde_json::Value> = watched
        .text()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["result"].clone())
        .collect();
    assert_eq!(events.first().unwrap()["type"], "ORDER_EVENT_TYPE_ACCEPTED");
    let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        types[types.len() - 2..],
        [
            "ORDER_EVENT_TYPE_READY",
            "ORDER_EVENT_TYPE_PAYMENT_CAPTURED"
        ]
    );
    // 64-bit sequence numbers are strings.
    assert!(
        events.iter().all(|e| e["sequence"].is_string()),
        "{events:?}"
    );

    // The same as Server-Sent Events.
    let sse = http
        .send(
            Method::GET,
            &format!("/v1/orders/{order_id}:watch"),
            &[("accept", "text/event-stream")],
            Bytes::new(),
        )
        .await;
    assert_eq!(sse.header("content-type"), Some("text/event-stream"));
    let data: Vec<serde_json::Value> = sse
        .text()
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(data.len(), events.len());

    let got = http.get(&format!("/v1/orders/{order_id}")).await.json();
    assert_eq!(got["state"], "ORDER_STATE_READY");
    let payment_id = got["paymentId"].as_str().unwrap();
    let payment = http.get(&format!("/v1/payments/{payment_id}")).await;
    assert_eq!(payment.status, 200, "{}", payment.text());
    assert_eq!(payment.json()["state"], "PAYMENT_STATE_CAPTURED");
    assert_eq!(payment.json()["amount"]["amountMinor"], "475");

    // FAILED_PRECONDITION is 400: a READY order cannot be cancelled.
    http.post(&format!("/v1/orders/{order_id}:cancel"), "{}")
        .await
        .assert_status(400, Code::FailedPrecondition);

    // The same key again: the same order, no second one.
    let again = http
        .post("/v1/orders", &order_body("rest-1", "latte", "tok_visa"))
        .await;
    assert_eq!(again.json()["orderId"], order_id.as_str());
    let listed = http.get("/v1/orders?pageSize=10").await.json();
    assert_eq!(listed["orders"].as_array().unwrap().len(), 1, "{listed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_orders_is_placed_whole_and_followed_on_one_stream() {
    let shop = shop(Duration::from_secs(60), |_| {}).await;
    let http = &shop.http;
    let entry = |key: &str, item: &str, card: &str| -> serde_json::Value {
        serde_json::from_str(&order_body(key, item, card)).unwrap()
    };

    // A drink not on the menu: 404 naming the entry, and nothing stored.
    let refused = http
        .post(
            "/v1/orders:batchCreate",
            &json!({"requests": [entry("b-1", "latte", "tok_visa"), entry("b-2", "tea", "tok_visa")]})
                .to_string(),
        )
        .await;
    let body = refused.assert_status(404, Code::NotFound);
    let bad_request = body["details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["@type"] == "type.googleapis.com/google.rpc.BadRequest")
        .unwrap_or_else(|| panic!("BadRequest in {body}"));
    assert_eq!(
        bad_request["fieldViolations"][0]["field"], "requests[1].item_id",
        "{body}"
    );
    let listed = http.get("/v1/orders").await.json();
    assert_eq!(
        listed["orders"].as_array().map_or(0, Vec::len),
        0,
        "{listed}"
    );

    let batch = json!({"requests": [
        entry("b-1", "latte", "tok_visa"),
        entry("b-2", "espresso", "tok_declined"),
    ]})
    .to_string();
    let placed = http.post("/v1/orders:batchCreate", &batch).await;
    assert_eq!(placed.status, 201, "{}", placed.text());
    let orders = placed.json()["orders"].as_array().unwrap().clone();
    let ids: Vec<&str> = orders
        .iter()
        .map(|o| o["orderId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    // Replayed: the same orders.
    let again = http.post("/v1/orders:batchCreate", &batch).await.json();
    let again: Vec<&str> = again["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["orderId"].as_str().unwrap())
        .collect();
    assert_eq!(again, ids);

    // Both orders on one NDJSON stream, to the end of each.
    let watched = http
        .post("/v1/orders:watch", &json!({"orderIds": ids}).to_string())
        .await;
    assert_eq!(watched.status, 200, "{}", watched.text());
    let events: Vec<serde_json::Value> = watched
        .text()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["result"].clone())
        .collect();
    let last = |order_id: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["orderId"] == order_id)
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        last(ids[0]).last().map(String::as_str),
        Some("ORDER_EVENT_TYPE_PAYMENT_CAPTURED"),
        "{events:?}"
    );
    assert_eq!(
        last(ids[1]).last().map(String::as_str),
        Some("ORDER_EVENT_TYPE_FAILED"),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_menu_is_cached_with_etags_and_expires() {
    let ttl = Duration::from_millis(400);
    let shop = shop(ttl, |_| {}).await;
    let http = &shop.http;

    let first = http.get("/v1/menu").await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    let etag = first.header("etag").unwrap().to_owned();
    assert!(
        first
            .header("cache-control")
            .unwrap()
            .starts_with("max-age=")
    );

    let second = http.get("/v1/menu").await;
    assert_eq!(second.header("x-cache"), Some("HIT"));
    assert_eq!(second.body, first.body);
    assert_eq!(second.header("etag"), Some(etag.as_str()));

    // Revalidation: 304 with no body when the client has it.
    let revalidated = http
        .send(
            Method::GET,
            "/v1/menu",
            &[("if-none-match", &etag)],
            Bytes::new(),
        )
        .await;
    assert_eq!(revalidated.status, 304);
    assert!(revalidated.body.is_empty());
    let changed = http
        .send(
            Method::GET,
            "/v1/menu",
            &[("if-none-match", "\"other\"")],
            Bytes::new(),
        )
        .await;
    assert_eq!(changed.status, 200);

    // A caller with credentials is not served from the shared cache.
    let personal = http
        .send(
            Method::GET,
            "/v1/menu",
            &[("authorization", "Bearer x")],
            Bytes::new(),
        )
        .await;
    assert_eq!(personal.status, 200);
    assert_eq!(personal.header("x-cache"), None);

    // Past the TTL, the backend is asked again.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    let expired = http.get("/v1/menu").await;
    assert_eq!(expired.header("x-cache"), Some("MISS"));
    assert_eq!(
        expired.header("etag"),
        Some(etag.as_str()),
        "same menu, same tag"
    );

    // Orders are never cached.
    let orders = http.get("/v1/orders").await;
    assert_eq!(orders.header("x-cache"), None);
    assert_eq!(orders.header("etag"), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_services_errors_come_back_as_http_statuses_with_their_details() {
    let shop = shop(Duration::from_secs(60), |c| {
        c.espresso_machines = 1;
        c.queue_depth = 1;
        c.espresso_time = Duration::from_secs(5);
    })
    .await;
    let http = &shop.http;

    // INVALID_ARGUMENT: the service's BadRequest, field by field.
    let invalid = http.post("/v1/orders", "{}").await;
    let body = invalid.assert_status(400, Code::InvalidArgument);
    let detail = &body["details"][0];
    assert_eq!(detail["@type"], "type.googleapis.com/google.rpc.BadRequest");
    let fields: Vec<&str> = detail["fieldViolations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["field"].as_str().unwrap())
        .collect();
    assert!(
        fields.contains(&"item_id") && fields.contains(&"card_token"),
        "{fields:?}"
    );

    // NOT_FOUND.
    http.get("/v1/orders/ord_00000000000000000000000000000000")
        .await
        .assert_status(404, Code::NotFound);

    // RESOURCE_EXHAUSTED: 429 with the service's RetryInfo.
    for key in ["busy-1", "busy-2"] {
        let placed = http
            .post("/v1/orders", &order_body(key, "espresso", "tok_visa"))
            .await;
        assert_eq!(placed.status, 201, "{}", placed.text());
    }
    let full = http
        .post("/v1/orders", &order_body("busy-3", "espresso", "tok_visa"))
        .await;
    let body = full.assert_status(429, Code::ResourceExhausted);
    let retry = body["details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["@type"] == "type.googleapis.com/google.rpc.RetryInfo")
        .unwrap_or_else(|| panic!("RetryInfo in {body}"));
    assert!(
        retry["retryDelay"].as_str().unwrap().ends_with('s'),
        "{retry}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn healthz_answers_from_the_backends_health() {
    let shop = shop(Duration::from_secs(60), |_| {}).await;
    // The registry backend points at a closed port: not serving.
    let health = shop.http.get("/healthz").await;
    assert_eq!(health.status, 503, "{}", health.text());
    let body = health.json();
    assert_eq!(body["services"]["brewmesh.barista.v1.Barista"], "SERVING");
    assert_eq!(body["services"]["brewmesh.payment.v1.Payments"], "SERVING");
    assert_ne!(body["services"]["brewmesh.registry.v1.Registry"], "SERVING");
}

#[tokio::test(flavor = "multi_thread")]
async fn gateway_replicas_share_the_cache_in_redis_and_survive_its_loss() {
    let ttl = Duration::from_millis(500);
    let shop = shop(ttl, |_| {}).await;
    let mut redis = support::Redis::start().await;
    let shared = brewmesh_gateway::Config {
        redis_url: Some(redis.url.clone()),
        ..shop.config.clone()
    };
    let (_a, a) = gateway(shared.clone()).await;
    let (_b, b) = gateway(shared).await;

    let first = a.get("/v1/menu").await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    let etag = first.header("etag").unwrap().to_owned();
    // The other replica answers from what the first one stored.
    let second = b.get("/v1/menu").await;
    assert_eq!(second.header("x-cache"), Some("HIT"));
    assert_eq!(second.header("etag"), Some(etag.as_str()));
    assert_eq!(second.body, first.body);
    let revalidated = b
        .send(
            Method::GET,
            "/v1/menu",
            &[("if-none-match", &etag)],
            Bytes::new(),
        )
        .await;
    assert_eq!(revalidated.status, 304);

    // Redis expires it.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    assert_eq!(b.get("/v1/menu").await.header("x-cache"), Some("MISS"));

    // Without Redis, the backends answer: a cache is never a point of failure.
    redis.kill();
    let without = a.get("/v1/menu").await;
    assert_eq!(without.status, 200, "{}", without.text());
    assert_eq!(without.body, first.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_shared_cache_takes_redis_over_tls_and_checks_its_certificate() {
    let shop = shop(Duration::from_secs(60), |_| {}).await;
    let redis = support::Redis::start_tls().await;
    let shared = brewmesh_gateway::Config {
        redis_url: Some(redis.url.clone()),
        redis_ca: redis.ca.clone(),
        ..shop.config.clone()
    };
    let (_a, a) = gateway(shared.clone()).await;
    let (_b, b) = gateway(shared).await;
    assert_eq!(a.get("/v1/menu").await.header("x-cache"), Some("MISS"));
    assert_eq!(b.get("/v1/menu").await.header("x-cache"), Some("HIT"));

    // Trusting another CA, the gateway does not start on it.
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("ca.crt");
    let authority = brewmesh_runtime::mtls::Authority::create().unwrap();
    std::fs::write(&other, authority.certificate_pem()).unwrap();
    let wrong = brewmesh_gateway::Config {
        redis_url: Some(redis.url.clone()),
        redis_ca: Some(other),
        ..shop.config.clone()
    };
    let refused = brewmesh_gateway::state::Gateway::build(&wrong).await;
    assert!(refused.is_err(), "a Redis another CA signed is refused");
}

/// A service with no instance known (a registry that knows no payment) is
/// answered 503 UNAVAILABLE at once, not 504 after the gateway's timeout.
#[tokio::test(flavor = "multi_thread")]
async fn a_service_with_no_instance_known_is_unavailable_at_once() {
    let registry_config = brewmesh_registry::Config {
        serve: serve_args(),
        token: "test-token".parse().unwrap(),
        default_ttl: Duration::from_secs(10),
        max_ttl: Duration::from_secs(60),
        health_retry: Duration::from_millis(100),
    };
    let registry = spawn(|l, s| brewmesh_registry::run(l, registry_config, s)).await;
    let (_gateway, http) = gateway(brewmesh_gateway::Config {
        registries: vec![registry.addr.to_string()],
        timeout: Duration::from_secs(60),
        ..Default::default()
    })
    .await;
    let answer = http.get("/v1/payments/pay_0123456789abcdef").await;
    let body = answer.assert_status(503, Code::Unavailable);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no instance of brewmesh.payment.v1.Payments"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_document_states_the_rules_the_services_enforce() {
    let shop = shop(Duration::from_secs(60), |c| {
        c.espresso_time = Duration::from_secs(30);
    })
    .await;
    let http = &shop.http;
    let document = http.get("/openapi.json").await.json();
    let schemas = &document["components"]["schemas"];
    assert_eq!(
        schemas["brewmesh.barista.v1.PlaceOrderRequest"]["required"],
        json!(["idempotencyKey", "itemId", "customerName", "cardToken"])
    );
    let key = &schemas["brewmesh.barista.v1.PlaceOrderRequest"]["properties"]["idempotencyKey"];
    assert_eq!(key["maxLength"], 128, "{key}");
    let get = &document["paths"]["/v1/orders/{order_id}"]["get"];
    assert_eq!(
        get["parameters"][0]["schema"]["pattern"],
        "^ord_[0-9a-f]{32}$"
    );
    let links = &document["paths"]["/v1/orders"]["post"]["responses"]["201"]["links"];
    assert_eq!(
        links["Barista_CancelOrder"]["parameters"]["order_id"],
        "$response.body#/orderId"
    );

    // A well-formed item that is not on the menu: 404; a key reused for
    // another drink: 409.
    http.post("/v1/orders", &order_body("k-tea", "tea", "tok_visa"))
        .await
        .assert_status(404, Code::NotFound);
    let placed = http
        .post("/v1/orders", &order_body("k-1", "latte", "tok_visa"))
        .await;
    assert_eq!(placed.status, 201, "{}", placed.text());
    http.post("/v1/orders", &order_body("k-1", "espresso", "tok_visa"))
        .await
        .assert_status(409, Code::AlreadyExists);

    // `:cancel` is CancelOrder's verb, not part of GetOrder's id.
    let order_id = placed.json()["orderId"].as_str().unwrap().to_owned();
    let wrong = http.get(&format!("/v1/orders/{order_id}:cancel")).await;
    wrong.assert_status(405, Code::Unimplemented);
    assert_eq!(wrong.header("allow"), Some("POST"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_ends_at_the_gateways_stream_deadline_or_at_the_clients() {
    let shop = shop(Duration::from_secs(60), |c| {
        // The drink takes far longer than the stream may last.
        c.espresso_time = Duration::from_secs(60);
    })
    .await;
    let config = brewmesh_gateway::Config {
        stream_timeout: Duration::from_millis(300),
        ..shop.config.clone()
    };
    let (_gw, http) = gateway(config).await;
    let placed = http
        .post("/v1/orders", &order_body("slow-1", "latte", "tok_visa"))
        .await;
    assert_eq!(placed.status, 201, "{}", placed.text());
    let order_id = placed.json()["orderId"].as_str().unwrap().to_owned();

    let watched = http.get(&format!("/v1/orders/{order_id}:watch")).await;
    assert_eq!(watched.status, 200);
    let lines: Vec<serde_json::Value> = watched
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 2, "{lines:?}");
    assert!(lines[0]["result"].is_object(), "{lines:?}");
    let last = lines.last().unwrap();
    assert_eq!(
        last["error"]["code"],
        Code::DeadlineExceeded as i32,
        "{last}"
    );

    // The client's Grpc-Timeout governs instead: the shop's own gateway
    // lets a stream last 5 minutes, this one asks for 300 ms.
    let watched = shop
        .http
        .send(
            Method::GET,
            &format!("/v1/orders/{order_id}:watch"),
            &[("grpc-timeout", "300m")],
            Bytes::new(),
        )
        .await;
    let text = watched.text();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(
        last["error"]["code"],
        Code::DeadlineExceeded as i32,
        "{text}"
    );

    // The document says so.
    let document = http.get("/openapi.json").await.json();
    let watch = &document["paths"]["/v1/orders/{order_id}:watch"]["get"];
    assert!(
        watch["description"].as_str().unwrap().contains("300ms"),
        "{watch}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_s_oversized_headers_are_refused_and_every_other_stream_lives_on() {
    // A second per step, so the watch is open while the abuse goes by.
    let shop = shop(Duration::from_secs(60), |c| {
        c.espresso_time = Duration::from_secs(1);
        c.milk_time = Duration::from_secs(1);
    })
    .await;
    let http = shop.http.clone();
    let placed = http
        .post(
            "/v1/orders",
            &order_body("big-headers-1", "latte", "tok_visa"),
        )
        .await;
    let order_id = placed.json()["orderId"].as_str().unwrap().to_owned();
    let watch = {
        let (http, path) = (http.clone(), format!("/v1/orders/{order_id}:watch"));
        tokio::spawn(async move { http.get(&path).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    // 100 KB of Authorization and 40 KB of Grpc-Metadata-*: 431 for this
    // request alone; nothing reaches the barista's shared connection.
    let token = format!("Bearer {}", "x".repeat(100 * 1024));
    let metadata = "y".repeat(40 * 1024);
    let get = format!("/v1/orders/{order_id}");
    for header in [
        ("authorization", token.as_str()),
        ("grpc-metadata-note", metadata.as_str()),
    ] {
        let answer = http.send(Method::GET, &get, &[header], Bytes::new()).await;
        let status = answer.assert_status(431, Code::ResourceExhausted);
        assert!(
            status["message"].as_str().unwrap().contains("at most 8192"),
            "{status}"
        );
    }

    // The watch that shared the gateway's connection to the barista ends
    // as an order does, with its capture.
    let watched = watch.await.unwrap();
    let last = watched.text().lines().last().map(str::to_owned).unwrap();
    assert!(
        last.contains("ORDER_EVENT_TYPE_PAYMENT_CAPTURED"),
        "{}",
        watched.text()
    );
    assert_eq!(http.get(&get).await.status, 200);
}
