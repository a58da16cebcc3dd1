//! The gateway's web page and `/mesh`, over real HTTP, in front of a real
//! registry and a real payment service registered in it. The page itself
//! is tested in a real browser by `scripts/browser.sh`.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::Value;
use tonic::Code;

use brewmesh::pb::registry::v1::registry_client::RegistryClient;
use brewmesh::pb::registry::v1::{Instance, RegisterRequest};
use brewmesh_runtime::discovery::RegistryArgs;
use brewmesh_testing::{Running, spawn};
use support::{GatewayRun, Http, PaymentRun, gateway, serve_args};

const TOKEN: &str = "web-test-token";

type RegistryRun = Result<brewmesh_runtime::server::Drained, brewmesh_runtime::server::ServeError>;

struct Mesh {
    http: Http,
    registry: Running<RegistryRun>,
    _servers: (Running<PaymentRun>, Running<GatewayRun>),
    _dir: tempfile::TempDir,
}

/// A registry, a payment service registered in it (zone `zone-a`), and a
/// gateway that finds both through it and knows where Jaeger is.
async fn mesh() -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let registry_config = brewmesh_registry::Config {
        serve: serve_args(),
        token: TOKEN.parse().unwrap(),
        default_ttl: Duration::from_secs(10),
        max_ttl: Duration::from_secs(60),
        health_retry: Duration::from_millis(100),
    };
    let registry = spawn(|l, s| brewmesh_registry::run(l, registry_config, s)).await;
    let registries = vec![registry.addr.to_string()];
    let payment_config = brewmesh_payment::Config {
        serve: serve_args(),
        database: brewmesh_testing::database(dir.path(), "payment").await,
        processing_delay: Duration::ZERO,
        registry: RegistryArgs {
            registries: registries.clone(),
            token: Some(TOKEN.parse().unwrap()),
            advertise_addr: None,
            zone: "zone-a".into(),
            lease_ttl: Duration::from_secs(10),
        },
    };
    let payment = spawn(|l, s| brewmesh_payment::run(l, payment_config, s)).await;
    let config = brewmesh_gateway::Config {
        registries,
        jaeger_ui: Some("http://127.0.0.1:16686".into()),
        ..Default::default()
    };
    let (gateway, http) = gateway(config).await;
    Mesh {
        http,
        registry,
        _servers: (payment, gateway),
        _dir: dir,
    }
}

/// Polls `/mesh` until `accept` holds (bounded), and returns that answer.
async fn mesh_until(http: &Http, accept: impl Fn(&Value) -> bool) -> Value {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let answer = http.get("/mesh").await;
            assert_eq!(answer.status, 200, "{}", answer.text());
            assert_eq!(answer.header("cache-control"), Some("no-store"));
            let mesh = answer.json();
            if accept(&mesh) {
                return mesh;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("/mesh shows what was awaited")
}

fn process<'a>(mesh: &'a Value, service: &str) -> Option<&'a Value> {
    mesh["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["service"] == service)
}

#[tokio::test]
async fn mesh_lists_every_process_with_its_health_and_counters() {
    let mesh = mesh().await;
    let payments = "brewmesh.payment.v1.Payments";
    let first = mesh_until(&mesh.http, |m| {
        process(m, payments).is_some_and(|p| p["health"] == "SERVING")
    })
    .await;
    let payment = process(&first, payments).unwrap();
    assert_eq!(payment["zone"], "zone-a");
    assert!(
        payment["instanceId"]
            .as_str()
            .unwrap()
            .starts_with("payment-")
    );
    let before = payment["metrics"]["requests"].as_u64().unwrap();

    let registry = process(&first, "brewmesh.registry.v1.Registry").unwrap();
    assert_eq!(
        registry["instanceId"],
        format!("registry@{}", mesh.registry.addr)
    );
    assert_eq!(registry["health"], "SERVING");
    assert!(
        registry["metrics"]["requests"].as_u64().unwrap() >= 1,
        "{registry}"
    );
    let me = process(&first, "gateway").unwrap();
    assert_eq!(me["health"], "SERVING");
    assert_eq!(me["address"], mesh._servers.1.addr.to_string());

    // Two calls through the gateway reach the payment service: both
    // processes count them, and the unary latency histogram grows.
    for _ in 0..2 {
        assert_eq!(mesh.http.get("/v1/payments").await.status, 200);
    }
    let after = mesh_until(&mesh.http, |m| {
        process(m, payments).is_some_and(|p| p["metrics"]["requests"].as_u64() >= Some(before + 2))
    })
    .await;
    let payment = process(&after, payments).unwrap();
    assert_eq!(payment["metrics"]["errors"], 0);
    let latency = payment["metrics"]["latency"].as_array().unwrap();
    assert!(
        latency.last().unwrap()[0].is_null(),
        "the last bound is +Inf"
    );
    let counts: Vec<u64> = latency.iter().map(|b| b[1].as_u64().unwrap()).collect();
    assert!(
        counts.windows(2).all(|w| w[0] <= w[1]),
        "cumulative: {counts:?}"
    );
    assert!(*counts.last().unwrap() >= 2);
    let me = process(&after, "gateway").unwrap();
    assert!(me["metrics"]["requests"].as_u64().unwrap() >= 2, "{me}");
}

#[tokio::test]
async fn an_instance_that_cannot_be_reached_shows_as_unreachable_with_the_reason() {
    let mesh = mesh().await;
    let mut client = RegistryClient::new(
        brewmesh_runtime::client::channel(&mesh.registry.addr.to_string()).unwrap(),
    );
    let nobody = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap(); // closed again
    let mut request = tonic::Request::new(RegisterRequest {
        instance: Some(Instance {
            instance_id: "ghost-1".into(),
            service: "test.v1.Ghost".into(),
            address: nobody.to_string(),
            ..Default::default()
        }),
        ttl: None,
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    client.register(request).await.unwrap();
    let answer = mesh_until(&mesh.http, |m| {
        process(m, "test.v1.Ghost").is_some_and(|p| p["health"] == "UNREACHABLE")
    })
    .await;
    let ghost = process(&answer, "test.v1.Ghost").unwrap();
    assert!(ghost["metrics"].is_null());
    assert!(
        !ghost["metricsError"].as_str().unwrap().is_empty(),
        "{ghost}"
    );
    assert!(answer.get("registryError").is_none());
}

#[tokio::test]
async fn the_page_is_served_with_a_validator_and_a_policy_that_keeps_it_on_this_origin() {
    let mesh = mesh().await;
    let page = mesh.http.get("/").await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(
        page.text()
            .contains("<script type=\"module\" src=\"/web/app.js\">")
    );
    let policy = page.header("content-security-policy").unwrap();
    for directive in [
        "default-src 'none'",
        "connect-src 'self'",
        "script-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(policy.contains(directive), "{policy}");
    }
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(page.header("cache-control"), Some("no-cache"));
    let etag = page.header("etag").unwrap().to_owned();

    // Revalidation: the same tag gets 304 without a body.
    let again = mesh
        .http
        .send(Method::GET, "/", &[("if-none-match", &etag)], Bytes::new())
        .await;
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());
    assert_eq!(again.header("etag"), Some(etag.as_str()));
    let stale = mesh
        .http
        .send(
            Method::GET,
            "/",
            &[("if-none-match", "\"other\"")],
            Bytes::new(),
        )
        .await;
    assert_eq!(stale.status, 200);

    let script = mesh.http.get("/web/app.js").await;
    assert_eq!(script.status, 200);
    assert_eq!(
        script.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert_ne!(script.header("etag"), Some(etag.as_str()));
    let head = mesh
        .http
        .send(Method::HEAD, "/web/style.css", &[], Bytes::new())
        .await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());

    mesh.http
        .get("/web/nothing.js")
        .await
        .assert_status(404, Code::NotFound);
    mesh.http
        .get("/web/../Cargo.toml")
        .await
        .assert_status(404, Code::NotFound);

    let config = mesh.http.get("/web/config.json").await;
    assert_eq!(config.status, 200);
    assert_eq!(config.json()["jaegerUrl"], "http://127.0.0.1:16686");
}
