//! The OpenAPI document: valid OpenAPI 3.1 (checked by PyPI's
//! openapi-spec-validator, which scripts/test.sh installs) and listing
//! every annotated RPC, from a running gateway.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod support;

use prost_reflect::DescriptorPool;

use support::{echo_backend, gateway};

/// The RPCs with a google.api.http rule in `set`, as `Service_Method`.
fn annotated(set: &[u8], package: &str) -> Vec<String> {
    let pool = DescriptorPool::decode(set).unwrap();
    let http = pool.get_extension_by_name("google.api.http").unwrap();
    pool.services()
        .filter(|s| s.package_name().starts_with(package))
        .flat_map(|s| s.methods().collect::<Vec<_>>())
        .filter(|m| m.options().has_extension(&http))
        .map(|m| format!("{}_{}", m.parent_service().name(), m.name()))
        .collect()
}

#[tokio::test]
async fn the_openapi_document_is_valid_3_1_and_lists_every_annotated_rpc() {
    let echo = echo_backend().await;
    let config = brewmesh_gateway::Config {
        reflect: vec![echo.addr.to_string()],
        ..Default::default()
    };
    let (_gw, http) = gateway(config).await;
    let answer = http.get("/openapi.json").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let document = answer.json();
    assert_eq!(document["openapi"], "3.1.0");

    let mut operations = Vec::new();
    for (_, item) in document["paths"].as_object().unwrap() {
        for (_, operation) in item.as_object().unwrap() {
            operations.push(operation["operationId"].as_str().unwrap().to_owned());
        }
    }
    let mut expected = annotated(brewmesh::FILE_DESCRIPTOR_SET, "brewmesh.");
    expected.extend(annotated(&support::echo_descriptors(), "echo."));
    assert!(expected.len() > 20, "{expected:?}");
    for rpc in &expected {
        assert!(
            operations.contains(rpc),
            "{rpc} missing from {operations:?}"
        );
    }
    // additional_bindings get operations of their own.
    assert!(
        operations.contains(&"Echo_Echo2".to_owned()),
        "{operations:?}"
    );

    // Proto comments are the descriptions.
    let place = &document["paths"]["/v1/orders"]["post"];
    assert!(
        place["description"]
            .as_str()
            .unwrap()
            .contains("Accepts an order"),
        "{place}"
    );
    assert!(place["responses"]["201"].is_object(), "{place}");
    let order = &document["components"]["schemas"]["brewmesh.barista.v1.Order"];
    assert!(order["properties"]["orderId"].is_object(), "{order}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, &answer.body).unwrap();
    let output = std::process::Command::new("openapi-spec-validator")
        .arg(&file)
        .output()
        .expect("openapi-spec-validator is installed (scripts/test.sh installs it from PyPI)");
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
