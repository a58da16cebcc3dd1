//! The contracts in `proto/`, as the descriptor set built by `build.rs`
//! carries them: http options kept, everything documented.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use prost::Message;
use prost_reflect::{DescriptorPool, Value};
use prost_types::FileDescriptorSet;

fn pool() -> DescriptorPool {
    DescriptorPool::decode(brewmesh::FILE_DESCRIPTOR_SET).unwrap()
}

#[test]
fn every_rpc_a_rest_client_calls_has_an_http_rule_in_the_descriptor_set() {
    let pool = pool();
    let http = pool
        .get_extension_by_name("google.api.http")
        .expect("google.api.http is in the set");
    let mut checked = 0;
    for service in pool
        .services()
        .filter(|s| s.full_name().starts_with("brewmesh."))
    {
        // The stations are the barista's, not a REST client's: they have no
        // routes, and the gateway does not front them.
        if service.full_name().starts_with("brewmesh.station.") {
            for method in service.methods() {
                assert!(
                    !method.options().has_extension(&http),
                    "{}",
                    method.full_name()
                );
            }
            continue;
        }
        for method in service.methods() {
            let options = method.options();
            let has_rule = options.has_extension(&http);
            // Bidirectional streams are not REST calls.
            let bidi = method.is_client_streaming() && method.is_server_streaming();
            assert_eq!(has_rule, !bidi, "{}", method.full_name());
            if has_rule {
                let Value::Message(rule) = options.get_extension(&http).into_owned() else {
                    panic!("HttpRule")
                };
                let pattern = ["get", "put", "post", "delete", "patch"]
                    .iter()
                    .filter_map(|verb| {
                        rule.get_field_by_name(verb)
                            .and_then(|v| v.as_str().map(str::to_owned))
                    })
                    .find(|p| !p.is_empty());
                assert!(
                    pattern.is_some_and(|p| p.starts_with("/v1/")),
                    "{}",
                    method.full_name()
                );
                checked += 1;
            }
        }
    }
    // payment 9, barista 8, registry 6 (KeepAlive is a bidi stream).
    assert_eq!(checked, 23);
}

#[test]
fn every_message_field_enum_service_and_rpc_is_documented() {
    let set = FileDescriptorSet::decode(brewmesh::FILE_DESCRIPTOR_SET).unwrap();
    let mut undocumented = Vec::new();
    let mut seen = 0;
    for file in set
        .file
        .iter()
        .filter(|f| f.name().starts_with("brewmesh/"))
    {
        let info = file.source_code_info.as_ref().expect("source info is kept");
        let documented = |path: &[i32]| {
            info.location.iter().any(|l| {
                l.path == path
                    && l.leading_comments
                        .as_deref()
                        .is_some_and(|c| !c.trim().is_empty())
            })
        };
        let mut check = |path: Vec<i32>, name: String| {
            seen += 1;
            if !documented(&path) {
                undocumented.push(format!("{}: {name}", file.name()));
            }
        };
        // Field numbers of FileDescriptorProto / DescriptorProto / … in descriptor.proto.
        for (i, message) in file.message_type.iter().enumerate() {
            check(vec![4, i as i32], message.name().to_owned());
            for (j, field) in message.field.iter().enumerate() {
                check(
                    vec![4, i as i32, 2, j as i32],
                    format!("{}.{}", message.name(), field.name()),
                );
            }
            // Only the entries protoc makes for map fields nest, and they
            // cannot carry comments.
            let map_entries = message
                .nested_type
                .iter()
                .all(|n| n.options.as_ref().is_some_and(|o| o.map_entry()));
            assert!(
                map_entries && message.enum_type.is_empty(),
                "extend this test for nesting"
            );
        }
        for (i, enumeration) in file.enum_type.iter().enumerate() {
            check(vec![5, i as i32], enumeration.name().to_owned());
            for (j, value) in enumeration.value.iter().enumerate() {
                check(vec![5, i as i32, 2, j as i32], value.name().to_owned());
            }
        }
        for (i, service) in file.service.iter().enumerate() {
            check(vec![6, i as i32], service.name().to_owned());
            for (j, method) in service.method.iter().enumerate() {
                check(
                    vec![6, i as i32, 2, j as i32],
                    format!("{}.{}", service.name(), method.name()),
                );
            }
        }
    }
    assert!(seen > 100, "only {seen} elements found");
    assert!(undocumented.is_empty(), "undocumented: {undocumented:#?}");
}
