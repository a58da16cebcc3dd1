//! Mutual TLS between real processes: who gets in on each gRPC port, who
//! does not, and certificates rotated under a running server.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use brewmesh::pb::barista::v1::barista_client::BaristaClient;
use brewmesh::pb::barista::v1::{GetMenuRequest, OrderState, PlaceOrderRequest};
use brewmesh::pb::payment::v1::GetPaymentRequest;
use brewmesh::pb::payment::v1::payments_client::PaymentsClient;
use brewmesh::pb::registry::v1::registry_client::RegistryClient;
use brewmesh::pb::registry::v1::{Instance, ListServicesRequest, RegisterRequest};
use brewmesh_runtime::mtls::{Authority, Connector, MeshTls};
use support::{PATIENCE, Process, wait_for_state};
use tonic::Code;
use tonic::transport::Channel;

const TOKEN: &str = "mtls-test-token";

/// Issues `role`'s certificate from `authority` into `dir/name`.
fn identity(authority: &Authority, dir: &Path, name: &str, role: &str) -> PathBuf {
    let at = dir.join(name);
    authority.issue(role, &at).unwrap();
    at
}

/// A channel to `process` presenting the identity in `tls`.
fn as_identity(tls: &Path, process: &Process) -> Channel {
    let tls = MeshTls::load(tls).unwrap();
    brewmesh_runtime::client::endpoint(&process.addr.to_string())
        .unwrap()
        .connect_with_connector_lazy(Connector::new(Arc::clone(&tls)))
}

/// `brewmesh <role> --tls-dir <tls>` with the registry token.
fn start(role: &str, tls: &Path, args: &[&str]) -> Process {
    let tls = tls.display().to_string();
    let mut all = vec![role, "--tls-dir", &tls, "--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    Process::start_with_env(&all, &[("BREWMESH_REGISTRY_TOKEN", TOKEN)])
}

/// A gRPC call by curl, bodiless (a refusal is answered before any body):
/// its `grpc-status`, or `None` when curl got no answer (a refused
/// handshake).
fn curl_status(url: &str, tls: &[&str]) -> Option<String> {
    let output = std::process::Command::new("curl")
        .args(["--max-time", "10", "-s", "-i", "-X", "POST"])
        .args(if url.starts_with("https") {
            &["--http2"][..]
        } else {
            &["--http2-prior-knowledge"][..]
        })
        .args(tls)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix("grpc-status: "))
        .map(|s| s.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_grpc_port_lets_in_only_the_roles_its_contract_names() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = Authority::create().unwrap();
    let other = Authority::create().unwrap();
    let at = dir.path();
    let registry = start(
        "registry",
        &identity(&mesh, at, "registry", "registry"),
        &[],
    );
    let registry_addr = registry.addr.to_string();
    let data = |name: &str| at.join(name).display().to_string();
    let (payment_data, barista_data) = (data("payment-data"), data("barista-data"));
    let payment = start(
        "payment",
        &identity(&mesh, at, "payment", "payment"),
        &[
            "--registry",
            &registry_addr,
            "--data-dir",
            &payment_data,
            "--processing-delay",
            "0s",
        ],
    );
    // The barista finds payment through the registry, over mutual TLS.
    let barista = start(
        "barista",
        &identity(&mesh, at, "barista", "barista"),
        &[
            "--registry",
            &registry_addr,
            "--data-dir",
            &barista_data,
            "--espresso-time",
            "1ms",
            "--milk-time",
            "1ms",
        ],
    );
    let operator = identity(&mesh, at, "operator", "operator");
    let stranger = identity(&other, at, "stranger", "operator");

    // The operator's order goes through: barista → registry → payment, each
    // hop mutual TLS.
    let mut shop = BaristaClient::new(as_identity(&operator, &barista));
    let order = shop
        .place_order(PlaceOrderRequest {
            idempotency_key: "mtls-1".into(),
            item_id: "espresso".into(),
            customer_name: "Ada".into(),
            card_token: "tok_visa".into(),
        })
        .await
        .unwrap()
        .into_inner();
    wait_for_state(&mut shop, &order.order_id, OrderState::Ready).await;

    let ca = operator.join("ca.crt").display().to_string();
    let (crt, key) = (
        stranger.join("tls.crt").display().to_string(),
        stranger.join("tls.key").display().to_string(),
    );
    let ports = [
        (&registry, "brewmesh.registry.v1.Registry/ListServices"),
        (&payment, "brewmesh.payment.v1.Payments/GetPayment"),
        (&barista, "brewmesh.barista.v1.Barista/GetMenu"),
    ];
    for (process, rpc) in ports {
        let (plain, tls) = (
            format!("http://{}/{rpc}", process.addr),
            format!("https://{}/{rpc}", process.addr),
        );
        // Plaintext, and TLS with no certificate: UNAUTHENTICATED (16).
        assert_eq!(curl_status(&plain, &[]).as_deref(), Some("16"), "{plain}");
        let no_certificate = curl_status(&tls, &["--cacert", &ca]);
        assert_eq!(no_certificate.as_deref(), Some("16"), "{tls}");
        // A certificate from another CA: no handshake, no answer.
        let foreign = curl_status(&tls, &["--cacert", &ca, "--cert", &crt, "--key", &key]);
        assert_eq!(foreign, None, "{tls}");
        let mut health =
            tonic_health::pb::health_client::HealthClient::new(as_identity(&stranger, process));
        let refused = health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        // Health stays open on plaintext, for probes.
        let probe = format!("http://{}/grpc.health.v1.Health/Check", process.addr);
        let empty = at.join("empty-message");
        std::fs::write(&empty, [0u8; 5]).unwrap();
        let answer = support::curl(&[
            "-i",
            "--http2-prior-knowledge",
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "--data-binary",
            &format!("@{}", empty.display()),
            &probe,
        ]);
        assert!(answer.contains("grpc-status: 0"), "{answer}");
    }

    // The wrong role: the ledger's identity cannot order a drink...
    let mut as_payment = BaristaClient::new(as_identity(&at.join("payment"), &barista));
    let denied = as_payment.get_menu(GetMenuRequest {}).await.unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(
        denied.message().contains("spiffe://brewmesh.local/payment"),
        "{denied:?}"
    );
    // ...the barista's cannot register as the ledger, and an operator
    // cannot register at all...
    let impostor = RegisterRequest {
        instance: Some(Instance {
            instance_id: "payment-impostor".into(),
            service: "brewmesh.payment.v1.Payments".into(),
            address: "127.0.0.1:1".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    for (who, code) in [
        ("barista", Code::PermissionDenied),
        ("operator", Code::PermissionDenied),
    ] {
        let mut client = RegistryClient::new(as_identity(&at.join(who), &registry));
        let mut request = tonic::Request::new(impostor.clone());
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        let refused = client.register(request).await.unwrap_err();
        assert_eq!(refused.code(), code, "{who}: {refused:?}");
    }
    // ...while the barista's identity may call the ledger, and anyone in
    // the mesh may read the registry.
    let mut ledger = PaymentsClient::new(as_identity(&at.join("barista"), &payment));
    let missing = ledger
        .get_payment(GetPaymentRequest {
            payment_id: "pay_00000000000000000000000000000000".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let mut reader = RegistryClient::new(as_identity(&operator, &registry));
    let services = reader
        .list_services(ListServicesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!services.services.is_empty(), "{services:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_rotate_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let at = dir.path();
    let old = Authority::create().unwrap();
    let new = Authority::create().unwrap();
    let served = identity(&old, at, "payment", "payment");
    let data = at.join("payment-data").display().to_string();
    let payment = start("payment", &served, &["--data-dir", &data]);
    let pid = payment.pid();
    let get = |tls: PathBuf| {
        let channel = as_identity(&tls, &payment);
        async move {
            PaymentsClient::new(channel)
                .get_payment(GetPaymentRequest {
                    payment_id: "pay_00000000000000000000000000000000".into(),
                })
                .await
                .unwrap_err()
                .code()
        }
    };
    let before = identity(&old, at, "operator-old", "operator");
    let after = identity(&new, at, "operator-new", "operator");
    // NOT_FOUND: let in, and answered.
    assert_eq!(get(before.clone()).await, Code::NotFound);
    assert_eq!(get(after.clone()).await, Code::Unavailable);

    // The new CA's certificate, trusting both CAs while clients move over.
    let bundle = format!("{}{}", old.certificate_pem(), new.certificate_pem());
    new.issue_with_ca("payment", &served, &bundle).unwrap();
    let deadline = Instant::now() + PATIENCE;
    while get(after.clone()).await != Code::NotFound {
        assert!(
            Instant::now() < deadline,
            "the new certificate was not taken"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A client with the old CA's certificate that trusts both still gets
    // in (the server's ca.crt is the bundle); one that trusts only the old
    // CA no longer takes the server, which presents the new CA's now.
    let moving = at.join("operator-moving");
    old.issue_with_ca("operator", &moving, &bundle).unwrap();
    assert_eq!(get(moving).await, Code::NotFound);
    assert_eq!(get(before).await, Code::Unavailable);
    assert_eq!(payment.pid(), pid);
    assert!(!payment.lines_with("certificates reloaded").is_empty());
}
