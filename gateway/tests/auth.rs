//! Bearer tokens at the gateway: real payment and barista services on port
//! 0 with real SQLite, a gateway checking JWTs against a JWKS file, and
//! tokens from the local issuer `brewmesh up` runs.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod support;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Method;
use serde_json::json;

use brewmesh_gateway::issuer::{AUDIENCE, ISSUER, Issuer};
use brewmesh_testing::Running;
use support::{Answer, Backends, GatewayRun, Http, gateway};

const DAY: Duration = Duration::from_secs(24 * 3600);
const STAFF: &str = "orders orders:all payments registry";

struct Shop {
    http: Http,
    issuer: Issuer,
    dir: tempfile::TempDir,
    _servers: (Backends, Running<GatewayRun>),
}

async fn shop() -> Shop {
    let dir = tempfile::tempdir().unwrap();
    let issuer = Issuer::load_or_create(&dir.path().join("auth")).unwrap();
    let backends = Backends::start(dir.path(), |barista| {
        barista.espresso_time = Duration::from_millis(20);
        barista.milk_time = Duration::from_millis(20);
    })
    .await;
    let config = brewmesh_gateway::Config {
        backends: backends.routes(),
        jwks: Some(issuer.jwks()),
        jwt_issuer: Some(ISSUER.into()),
        jwt_audience: Some(AUDIENCE.into()),
        jwt_leeway: Duration::from_secs(5),
        ..Default::default()
    };
    let (gw, http) = gateway(config).await;
    Shop {
        http,
        issuer,
        dir,
        _servers: (backends, gw),
    }
}

impl Shop {
    fn token(&self, subject: &str, scopes: &str) -> String {
        self.issuer.mint(subject, scopes, DAY).unwrap()
    }

    async fn call(&self, method: Method, path: &str, token: Option<&str>, body: &str) -> Answer {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(bearer) = &bearer {
            headers.push(("authorization", bearer.as_str()));
        }
        let body = Bytes::from(body.to_owned());
        self.http.send(method, path, &headers, body).await
    }

    async fn order(&self, token: &str, key: &str) -> String {
        let body = json!({"idempotencyKey": key, "itemId": "latte", "customerName": "Ada", "cardToken": "tok_visa"});
        let placed = self
            .call(Method::POST, "/v1/orders", Some(token), &body.to_string())
            .await;
        assert_eq!(placed.status, 201, "{}", placed.text());
        placed.json()["orderId"].as_str().unwrap().to_owned()
    }
}

/// A 401 with an RFC 6750 challenge, whose error is `error` (none for a
/// missing token).
fn unauthorized(answer: &Answer, error: Option<&str>) {
    assert_eq!(answer.status, 401, "{}", answer.text());
    let challenge = answer.headers["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.starts_with("Bearer realm=\"brewmesh\""),
        "{challenge}"
    );
    match error {
        Some(error) => assert!(
            challenge.contains(&format!("error=\"{error}\"")),
            "{challenge}"
        ),
        None => assert!(!challenge.contains("error="), "{challenge}"),
    }
    assert_eq!(answer.json()["code"], 16, "UNAUTHENTICATED");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_expired_wrong_audience_or_badly_signed_token_gets_401() {
    let shop = shop().await;
    let order =
        r#"{"idempotencyKey":"k","itemId":"latte","customerName":"Ada","cardToken":"tok_visa"}"#;

    // The menu is anyone's, and the same for all: cached with a token too.
    assert_eq!(
        shop.call(Method::GET, "/v1/menu", None, "").await.status,
        200
    );
    let ada = shop.token("ada", "orders");
    let menu = shop.call(Method::GET, "/v1/menu", Some(&ada), "").await;
    assert_eq!(menu.headers["x-cache"], "HIT", "{:?}", menu.headers);

    unauthorized(
        &shop.call(Method::POST, "/v1/orders", None, order).await,
        None,
    );

    let long_ago = SystemTime::now() - 2 * DAY;
    let expired = shop
        .issuer
        .mint_with(
            "ada",
            "orders",
            long_ago,
            Duration::from_secs(3600),
            AUDIENCE,
        )
        .unwrap();
    let answer = shop
        .call(Method::POST, "/v1/orders", Some(&expired), order)
        .await;
    unauthorized(&answer, Some("invalid_token"));
    assert!(answer.text().contains("expired"), "{}", answer.text());

    let later = SystemTime::now() + DAY;
    let early = shop
        .issuer
        .mint_with("ada", "orders", later, DAY, AUDIENCE)
        .unwrap();
    let answer = shop
        .call(Method::POST, "/v1/orders", Some(&early), order)
        .await;
    unauthorized(&answer, Some("invalid_token"));

    let elsewhere = shop
        .issuer
        .mint_with("ada", "orders", SystemTime::now(), DAY, "another-api")
        .unwrap();
    let answer = shop
        .call(Method::POST, "/v1/orders", Some(&elsewhere), order)
        .await;
    unauthorized(&answer, Some("invalid_token"));
    assert!(answer.text().contains("aud"), "{}", answer.text());

    // Signed by a key the JWKS does not hold.
    let stranger = Issuer::load_or_create(&shop.dir.path().join("stranger")).unwrap();
    let forged = stranger.mint("ada", "orders", DAY).unwrap();
    let answer = shop
        .call(Method::POST, "/v1/orders", Some(&forged), order)
        .await;
    unauthorized(&answer, Some("invalid_token"));

    // A good token with its claims changed: the signature no longer holds.
    let good = shop.token("ada", "orders");
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims = String::from_utf8(b64.decode(&parts[1]).unwrap()).unwrap();
        parts[1] = b64.encode(claims.replace("\"orders\"", "\"orders payments\""));
    }
    let tampered = parts.join(".");
    let answer = shop
        .call(Method::POST, "/v1/orders", Some(&tampered), order)
        .await;
    unauthorized(&answer, Some("invalid_token"));
    assert!(answer.text().contains("signature"), "{}", answer.text());

    let answer = shop
        .call(Method::POST, "/v1/orders", Some("not-a-jwt"), order)
        .await;
    unauthorized(&answer, Some("invalid_token"));

    // And nothing of that placed an order.
    let staff = shop.token("staff", STAFF);
    let listed = shop.call(Method::GET, "/v1/orders", Some(&staff), "").await;
    assert_eq!(listed.status, 200, "{}", listed.text());
    assert!(
        listed.json()["orders"].as_array().is_none_or(Vec::is_empty),
        "{}",
        listed.text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_customer_sees_only_their_orders_and_cannot_touch_payments() {
    let shop = shop().await;
    let ada = shop.token("ada", "orders");
    let bob = shop.token("bob", "orders");
    let staff = shop.token("staff", STAFF);
    let adas = shop.order(&ada, "ada-1").await;
    let bobs = shop.order(&bob, "bob-1").await;

    // Her own, yes; Bob's is not there for her, by any route.
    let own = shop
        .call(Method::GET, &format!("/v1/orders/{adas}"), Some(&ada), "")
        .await;
    assert_eq!(own.status, 200, "{}", own.text());
    for (method, path) in [
        (Method::GET, format!("/v1/orders/{bobs}")),
        (Method::GET, format!("/v1/orders/{bobs}:watch")),
        (Method::POST, format!("/v1/orders/{bobs}:cancel")),
    ] {
        let answer = shop.call(method.clone(), &path, Some(&ada), "{}").await;
        assert_eq!(answer.status, 404, "{method} {path}: {}", answer.text());
    }
    let listed = shop.call(Method::GET, "/v1/orders", Some(&ada), "").await;
    let ids: Vec<String> = listed.json()["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["orderId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, std::slice::from_ref(&adas));

    // Her key again, from Bob: a reused key, not her order.
    let body = json!({"idempotencyKey": "ada-1", "itemId": "latte", "customerName": "Ada", "cardToken": "tok_visa"});
    let reused = shop
        .call(Method::POST, "/v1/orders", Some(&bob), &body.to_string())
        .await;
    assert_eq!(reused.status, 409, "{}", reused.text());

    // Saying who she is in a header does not make her Bob.
    let forged = shop
        .http
        .send(
            Method::GET,
            &format!("/v1/orders/{bobs}"),
            &[
                ("authorization", &format!("Bearer {ada}")),
                ("grpc-metadata-x-brewmesh-subject", "bob"),
                ("grpc-metadata-x-brewmesh-scopes", "orders orders:all"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(forged.status, 404, "{}", forged.text());

    // Staff see everyone's.
    let seen = shop
        .call(Method::GET, &format!("/v1/orders/{bobs}"), Some(&staff), "")
        .await;
    assert_eq!(seen.status, 200, "{}", seen.text());
    let all = shop.call(Method::GET, "/v1/orders", Some(&staff), "").await;
    assert_eq!(
        all.json()["orders"].as_array().unwrap().len(),
        2,
        "{}",
        all.text()
    );

    // Payments are staff's: a customer may neither read nor move money.
    let payment = loop {
        let order = shop
            .call(Method::GET, &format!("/v1/orders/{adas}"), Some(&ada), "")
            .await;
        if let Some(id) = order.json()["paymentId"]
            .as_str()
            .filter(|id| !id.is_empty())
        {
            break id.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    for (method, path) in [
        (Method::GET, "/v1/payments".to_owned()),
        (Method::GET, format!("/v1/payments/{payment}")),
        (Method::POST, format!("/v1/payments/{payment}:capture")),
        (Method::POST, format!("/v1/payments/{payment}:refund")),
        (Method::POST, format!("/v1/payments/{payment}:void")),
        (Method::POST, "/v1/payments:authorize".to_owned()),
        (Method::GET, "/v1/registry/services".to_owned()),
    ] {
        let answer = shop.call(method.clone(), &path, Some(&ada), "{}").await;
        assert_eq!(answer.status, 403, "{method} {path}: {}", answer.text());
        let challenge = answer.headers["www-authenticate"].to_str().unwrap();
        assert!(
            challenge.contains("error=\"insufficient_scope\""),
            "{challenge}"
        );
        assert_eq!(answer.json()["code"], 7, "PERMISSION_DENIED");
    }
    // So is the mesh's topology.
    let mesh = shop.call(Method::GET, "/mesh", Some(&ada), "").await;
    assert_eq!(mesh.status, 403, "{}", mesh.text());
    let mesh = shop.call(Method::GET, "/mesh", Some(&staff), "").await;
    assert_eq!(mesh.status, 200, "{}", mesh.text());
    let read = shop
        .call(
            Method::GET,
            &format!("/v1/payments/{payment}"),
            Some(&staff),
            "",
        )
        .await;
    assert_eq!(read.status, 200, "{}", read.text());

    // The RPC protocols ask the same: Connect without a token is refused.
    let connect = shop
        .http
        .send(
            Method::POST,
            "/brewmesh.payment.v1.Payments/ListPayments",
            &[("content-type", "application/json")],
            Bytes::from_static(b"{}"),
        )
        .await;
    assert_eq!(connect.status, 401, "{}", connect.text());
    assert!(connect.headers.contains_key("www-authenticate"));
    assert_eq!(connect.json()["code"], "unauthenticated");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_signing_key_is_taken_without_a_restart() {
    let shop = shop().await;
    let next = Issuer::load_or_create(&shop.dir.path().join("next")).unwrap();
    let token = next.mint("ada", "orders", DAY).unwrap();
    let refused = shop.call(Method::GET, "/v1/orders", Some(&token), "").await;
    unauthorized(&refused, Some("invalid_token"));

    // The provider rotates: its JWKS now holds the new key.
    std::fs::copy(next.jwks(), shop.issuer.jwks()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = shop.call(Method::GET, "/v1/orders", Some(&token), "").await;
        if answer.status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", answer.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the old key's tokens are gone with it.
    let old = shop.token("ada", "orders");
    unauthorized(
        &shop.call(Method::GET, "/v1/orders", Some(&old), "").await,
        Some("invalid_token"),
    );
}
