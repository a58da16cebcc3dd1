//! Every mapping rule, every error mapping and every bad input, through a
//! running gateway to a real gRPC backend (the echo service) that the
//! gateway knows only through its reflection service or a descriptor file.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::json;
use tonic::Code;

use brewmesh_testing::Running;
use support::{GatewayRun, Http, echo_backend, gateway};

/// The echo backend and a gateway that learnt it by reflection alone.
async fn reflected() -> (Running<()>, Running<GatewayRun>, Http) {
    let echo = echo_backend().await;
    let config = brewmesh_gateway::Config {
        reflect: vec![echo.addr.to_string()],
        no_builtin: true,
        timeout: Duration::from_secs(2),
        max_body_bytes: 4096,
        // 201 is per method: Archive answers it here.
        created: vec!["echo.v1.Echo.Archive".into()],
        ..Default::default()
    };
    let (gw, http) = gateway(config).await;
    (echo, gw, http)
}

#[tokio::test]
async fn a_service_known_only_through_reflection_is_served_from_its_http_rules() {
    let (_echo, _gw, http) = reflected().await;
    let answer = http
        .post("/v1/echo/abc", r#"{"note": {"text": "hi"}}"#)
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["id"], "abc");
    assert_eq!(body["note"]["text"], "hi");
    // The builtin brewmesh routes are left out.
    http.get("/v1/menu")
        .await
        .assert_status(404, Code::NotFound);
}

#[tokio::test]
async fn a_descriptor_set_file_fronts_a_backend_too() {
    let echo = echo_backend().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("echo.pb");
    std::fs::write(&file, support::echo_descriptors()).unwrap();
    let config = brewmesh_gateway::Config {
        descriptor_sets: vec![file],
        backends: vec![("echo.v1.Echo".into(), vec![echo.addr.to_string()])],
        no_builtin: true,
        ..Default::default()
    };
    let (_gw, http) = gateway(config).await;
    let answer = http.get("/v1/echo/x?tags=a&tags=b").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["tags"], json!(["a", "b"]));
}

#[tokio::test]
async fn json_follows_the_proto3_mapping_both_ways() {
    let (_echo, _gw, http) = reflected().await;
    // Proto names and lowerCamelCase names are both accepted in; numbers as
    // strings or numbers; enums by name or number.
    let sent = json!({
        "shelf": {"id": "s1", "floor": 3},
        "tags": ["a", "b"],
        "big": "9007199254740993",
        "ubig": 18446744073709551615u64,
        "flag": true,
        "ratio": 0.5,
        "color": "COLOR_RED",
        "colors": ["COLOR_BLUE", 1],
        "when": "2026-11-30T10:00:00Z",
        "maybe": 7,
        "labels": {"k": "v"},
        "blob": "aGVsbG8=",
        "fail_code": 0,
        "delayMs": 0,
    });
    let answer = http.post("/v1/echo/id1", &sent.to_string()).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    // lowerCamelCase out, 64-bit integers as strings, enums by name,
    // well-known types in their JSON forms, unpopulated fields present.
    assert_eq!(body["big"], "9007199254740993");
    assert_eq!(body["ubig"], "18446744073709551615");
    assert_eq!(body["color"], "COLOR_RED");
    assert_eq!(body["colors"], json!(["COLOR_BLUE", "COLOR_RED"]));
    assert_eq!(body["when"], "2026-11-30T10:00:00Z");
    assert_eq!(body["maybe"], 7);
    assert_eq!(body["labels"], json!({"k": "v"}));
    assert_eq!(body["blob"], "aGVsbG8=");
    assert_eq!(body["shelf"], json!({"id": "s1", "name": "", "floor": 3}));
    assert_eq!(body["failCode"], 0);
    assert_eq!(body["path"], "");
    assert!(body.get("fail_code").is_none(), "{body}");
}

#[tokio::test]
async fn a_get_binding_fills_the_rest_from_the_query_nested_and_repeated() {
    let (_echo, _gw, http) = reflected().await;
    let answer = http
        .get("/v1/echo/q1?shelf.floor=2&shelf.name=a%20b&tags=x&tags=y&flag=true&color=COLOR_BLUE&colors=1&colors=COLOR_BLUE&big=-5&when=2026-01-02T03:04:05Z&maybe=4&noteText=ignored")
        .await;
    // noteText is no field: everything else would have been fine.
    let error = answer.assert_status(400, Code::InvalidArgument);
    assert_eq!(
        error["details"][0]["fieldViolations"][0]["field"],
        "noteText"
    );

    let answer = http
        .get("/v1/echo/q1?shelf.floor=2&shelf.name=a%20b&tags=x&tags=y&flag=true&color=COLOR_BLUE&colors=1&colors=COLOR_BLUE&big=-5&when=2026-01-02T03:04:05Z&maybe=4&note.text=n")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    assert_eq!(body["id"], "q1");
    assert_eq!(body["shelf"]["floor"], 2);
    assert_eq!(body["shelf"]["name"], "a b");
    assert_eq!(body["tags"], json!(["x", "y"]));
    assert_eq!(body["flag"], true);
    assert_eq!(body["color"], "COLOR_BLUE");
    assert_eq!(body["colors"], json!(["COLOR_RED", "COLOR_BLUE"]));
    assert_eq!(body["big"], "-5");
    assert_eq!(body["when"], "2026-01-02T03:04:05Z");
    assert_eq!(body["maybe"], 4);
    assert_eq!(body["note"]["text"], "n");
}

#[tokio::test]
async fn additional_bindings_nested_variables_and_field_bodies_map() {
    let (_echo, _gw, http) = reflected().await;
    // PUT /v1/shelves/{shelf.id}/echo/{id} with body: "note".
    let answer = http
        .send(
            Method::PUT,
            "/v1/shelves/s9/echo/e9?tags=t",
            &[("content-type", "application/json")],
            r#"{"text": "put", "stars": "5"}"#,
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    assert_eq!(
        (
            &body["id"],
            &body["shelf"]["id"],
            &body["note"]["text"],
            &body["note"]["stars"],
            &body["tags"]
        ),
        (
            &json!("e9"),
            &json!("s9"),
            &json!("put"),
            &json!("5"),
            &json!(["t"])
        )
    );

    // PATCH /v1/{shelf.name=shelves/*}/books/{id} with body: "shelf": the
    // path wins over the body for the field both set.
    let answer = http
        .send(
            Method::PATCH,
            "/v1/shelves/s1/books/b1",
            &[],
            r#"{"name": "from-body", "floor": 4}"#,
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let body = answer.json();
    assert_eq!(
        body["shelf"],
        json!({"id": "", "name": "shelves/s1", "floor": 4})
    );
    assert_eq!(body["id"], "b1");
    // A segment the pattern does not allow: no route.
    let answer = http
        .send(Method::PATCH, "/v1/racks/s1/books/b1", &[], "{}")
        .await;
    answer.assert_status(404, Code::NotFound);
}

#[tokio::test]
async fn star_and_double_star_segments_and_custom_verbs_map() {
    let (_echo, _gw, http) = reflected().await;
    let files = http.get("/v1/files/a/b%20c/d.txt").await;
    assert_eq!(files.status, 200, "{}", files.text());
    assert_eq!(files.json()["path"], "a/b c/d.txt");

    let wild = http.get("/v1/wild/anything/x/w1").await;
    assert_eq!(wild.status, 200, "{}", wild.text());
    assert_eq!(wild.json()["id"], "w1");

    let archived = http.post("/v1/echo/a1:archive", r#"{"tags": ["z"]}"#).await;
    assert_eq!(archived.status, 201, "{}", archived.text());
    assert_eq!(archived.json()["id"], "a1");
    assert_eq!(archived.json()["tags"], json!(["z"]));
    // The same path without the verb is the plain Echo binding.
    let plain = http.get("/v1/echo/a1").await;
    assert_eq!(plain.json()["id"], "a1");
    // A verb no rule has is part of the last segment: ids may hold colons.
    let colon = http.post("/v1/echo/a1:explode", "{}").await;
    assert_eq!(colon.json()["id"], "a1:explode");
}

#[tokio::test]
async fn response_body_and_unbound_methods_map() {
    let (_echo, _gw, http) = reflected().await;
    let note = http.post("/v1/notes", r#"{"text": "only me"}"#).await;
    assert_eq!(note.status, 200, "{}", note.text());
    assert_eq!(note.json(), json!({"text": "only me", "stars": "0"}));

    let unbound = http.post("/echo.v1.Echo/Unbound", r#"{"id": "u1"}"#).await;
    assert_eq!(unbound.status, 200, "{}", unbound.text());
    assert_eq!(unbound.json()["id"], "u1");
}

#[tokio::test]
async fn headers_go_upstream_as_metadata_and_metadata_comes_back_as_headers() {
    let (_echo, _gw, http) = reflected().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let answer = http
        .send(
            Method::GET,
            "/v1/echo/h1",
            &[
                ("authorization", "Bearer t0ken"),
                ("grpc-metadata-tenant", "acme"),
                ("traceparent", traceparent),
                ("tracestate", "vendor=1"),
                ("baggage", "user=ada"),
                ("x-not-forwarded", "1"),
                ("grpc-timeout", "1500m"),
                // Binary metadata in base64, padded or not, as grpc-gateway.
                ("grpc-metadata-trace-bin", "3q2+7wD/"),
                ("grpc-metadata-short-bin", "AQI"),
            ],
            Bytes::new(),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let seen = |key: &str| answer.header(&format!("grpc-metadata-seen-{key}"));
    assert_eq!(seen("authorization"), Some("Bearer t0ken"));
    assert_eq!(seen("tenant"), Some("acme"));
    assert_eq!(seen("traceparent"), Some(traceparent));
    assert_eq!(seen("tracestate"), Some("vendor=1"));
    assert_eq!(seen("baggage"), Some("user=ada"));
    assert_eq!(seen("x-not-forwarded"), None);
    let binary = |key: &str| {
        use base64::Engine as _;
        let config = base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent);
        base64::engine::GeneralPurpose::new(&base64::alphabet::STANDARD, config)
            .decode(seen(key).expect("binary metadata back"))
            .unwrap()
    };
    assert_eq!(binary("trace-bin"), [0xde, 0xad, 0xbe, 0xef, 0x00, 0xff]);
    assert_eq!(binary("short-bin"), [1, 2]);
    // The client's deadline went upstream (tonic may round it).
    let timeout = seen("grpc-timeout").expect("a deadline upstream");
    assert!(
        timeout.ends_with('m') || timeout.ends_with('u'),
        "{timeout}"
    );

    // With no Grpc-Timeout, the gateway's default deadline bounds the call.
    let answer = http.get("/v1/echo/h2").await;
    assert!(answer.header("grpc-metadata-seen-grpc-timeout").is_some());

    // Binary metadata that is not base64 is the client's error.
    let answer = http
        .send(
            Method::GET,
            "/v1/echo/h3",
            &[("grpc-metadata-trace-bin", "not base64!")],
            Bytes::new(),
        )
        .await;
    assert_eq!(answer.status, 400, "{}", answer.text());
    assert_eq!(answer.json()["code"], 3);
    let message = answer.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("grpc-metadata-trace-bin"), "{message}");
}

#[tokio::test]
async fn each_grpc_code_maps_to_its_http_status_with_a_status_body() {
    let (_echo, _gw, http) = reflected().await;
    let table = [
        (Code::Cancelled, 499),
        (Code::Unknown, 500),
        (Code::InvalidArgument, 400),
        (Code::DeadlineExceeded, 504),
        (Code::NotFound, 404),
        (Code::AlreadyExists, 409),
        (Code::PermissionDenied, 403),
        (Code::ResourceExhausted, 429),
        (Code::FailedPrecondition, 400),
        (Code::Aborted, 409),
        (Code::OutOfRange, 400),
        (Code::Unimplemented, 501),
        (Code::Internal, 500),
        (Code::Unavailable, 503),
        (Code::DataLoss, 500),
        (Code::Unauthenticated, 401),
    ];
    for (code, status) in table {
        let answer = http
            .get(&format!("/v1/echo/e?failCode={}", code as i32))
            .await;
        let body = answer.assert_status(status, code);
        assert_eq!(
            body["message"],
            format!("asked to fail with {}", code as i32)
        );
        // The status's metadata comes back too.
        assert_eq!(
            answer.header("grpc-metadata-failed-with"),
            Some((code as i32).to_string().as_str())
        );
        if code == Code::Unauthenticated {
            assert!(answer.header("www-authenticate").is_some());
        }
    }
}

#[tokio::test]
async fn a_deadline_that_passes_is_504() {
    let (_echo, _gw, http) = reflected().await;
    // The client's own deadline.
    let answer = http
        .send(
            Method::GET,
            "/v1/echo/slow?delayMs=3000",
            &[("grpc-timeout", "100m")],
            Bytes::new(),
        )
        .await;
    answer.assert_status(504, Code::DeadlineExceeded);
    // The gateway's default (2 s in this suite).
    let answer = http.get("/v1/echo/slow?delayMs=5000").await;
    answer.assert_status(504, Code::DeadlineExceeded);
    // A malformed deadline is the client's mistake.
    let answer = http
        .send(
            Method::GET,
            "/v1/echo/x",
            &[("grpc-timeout", "soon")],
            Bytes::new(),
        )
        .await;
    answer.assert_status(400, Code::InvalidArgument);
}

#[tokio::test]
async fn server_streams_are_ndjson_or_server_sent_events() {
    let (_echo, _gw, http) = reflected().await;
    let answer = http.get("/v1/echo/s1:repeat?count=3").await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<serde_json::Value> = answer
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["result"]["id"] == "s1"), "{lines:?}");

    // A stream that fails after two messages ends with an error line.
    let answer = http.get("/v1/echo/s2:repeat?count=2&failCode=14").await;
    let lines: Vec<serde_json::Value> = answer
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[2]["error"]["code"], Code::Unavailable as i32);

    // A stream that fails before any message is a plain error answer.
    http.get("/v1/echo/s3:repeat?failCode=5")
        .await
        .assert_status(404, Code::NotFound);

    // Server-Sent Events when the client asks for them.
    let answer = http
        .send(
            Method::GET,
            "/v1/echo/s4:repeat?count=2&failCode=10",
            &[("accept", "text/event-stream")],
            Bytes::new(),
        )
        .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("content-type"), Some("text/event-stream"));
    let text = answer.text();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3, "{text}");
    for event in &events[..2] {
        let data = event.strip_prefix("data: ").unwrap();
        let message: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(message["id"], "s4");
    }
    let error = events[2].strip_prefix("event: error\ndata: ").unwrap();
    let status: serde_json::Value = serde_json::from_str(error).unwrap();
    assert_eq!(status["code"], Code::Aborted as i32);
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_never_a_500() {
    let (_echo, _gw, http) = reflected().await;
    let json = [("content-type", "application/json")];
    // (method, path, headers, body, HTTP status, gRPC code)
    type Case<'a> = (Method, &'a str, Vec<(&'a str, &'a str)>, String, u16, Code);
    let cases: Vec<Case> = vec![
        // Malformed JSON, unknown fields, wrong types.
        (
            Method::POST,
            "/v1/echo/b",
            json.to_vec(),
            "{\"id\": ".into(),
            400,
            Code::InvalidArgument,
        ),
        (
            Method::POST,
            "/v1/echo/b",
            json.to_vec(),
            "[1, 2]".into(),
            400,
            Code::InvalidArgument,
        ),
        (
            Method::POST,
            "/v1/echo/b",
            json.to_vec(),
            r#"{"nope": 1}"#.into(),
            400,
            Code::InvalidArgument,
        ),
        (
            Method::POST,
            "/v1/echo/b",
            json.to_vec(),
            r#"{"flag": "yes"}"#.into(),
            400,
            Code::InvalidArgument,
        ),
        (
            Method::POST,
            "/v1/echo/b",
            json.to_vec(),
            r#"{"big": "1.5"}"#.into(),
            400,
            Code::InvalidArgument,
        ),
        (
            Method::POST,
            "/v1/echo/b",
            json.to_vec(),
            r#"{"color": "PURPLE"}"#.into(),
            400,
            Code::InvalidArgument,
        ),
        (
            Method::POST,
            "/v1/echo/b",
            json.to_vec(),
            r#"{"id": "a"} trailing"#.into(),
            400,
            Code::InvalidArgument,
        ),
        // Bad query values.
        (
            Method::GET,
            "/v1/echo/b?flag=yes",
            vec![],
            String::new(),
            400,
            Code::InvalidArgument,
        ),
        (
            Method::GET,
            "/v1/echo/b?big=x",
            vec![],
            String::new(),
            400,
            Code::InvalidArgument,
        ),
        (
            Method::GET,
            "/v1/echo/b?color=PURPLE",
            vec![],
            String::new(),
            400,
            Code::InvalidArgument,
        ),
        (
            Method::GET,
            "/v1/echo/b?labels=x",
            vec![],
            String::new(),
            400,
            Code::InvalidArgument,
        ),
        (
            Method::GET,
            "/v1/echo/b?id=twice",
            vec![],
            String::new(),
            400,
            Code::InvalidArgument,
        ),
        (
            Method::GET,
            "/v1/echo/b?shelf.floor=1&shelf.floor=2",
            vec![],
            String::new(),
            400,
            Code::InvalidArgument,
        ),
        // Unknown paths and wrong methods.
        (
            Method::GET,
            "/v2/nothing",
            vec![],
            String::new(),
            404,
            Code::NotFound,
        ),
        (
            Method::DELETE,
            "/v1/echo/b",
            vec![],
            String::new(),
            405,
            Code::Unimplemented,
        ),
        // A body that is not JSON.
        (
            Method::POST,
            "/v1/echo/b",
            vec![("content-type", "application/xml")],
            "<a/>".into(),
            415,
            Code::InvalidArgument,
        ),
        // JSON sent as the types a page on another origin may send without
        // a CORS preflight is not read.
        (
            Method::POST,
            "/v1/echo/b",
            vec![("content-type", "text/plain;charset=UTF-8")],
            r#"{"text": "x"}"#.into(),
            415,
            Code::InvalidArgument,
        ),
        (
            Method::POST,
            "/v1/echo/b",
            vec![("content-type", "application/x-www-form-urlencoded")],
            r#"{"text": "x"}"#.into(),
            415,
            Code::InvalidArgument,
        ),
        // A body over the limit (4 KiB in this suite).
        (
            Method::POST,
            "/v1/echo/b",
            json.to_vec(),
            format!(r#"{{"id": "{}"}}"#, "x".repeat(5000)),
            413,
            Code::InvalidArgument,
        ),
    ];
    for (method, path, headers, body, status, code) in cases {
        let answer = http
            .send(method.clone(), path, &headers, body.clone())
            .await;
        assert_eq!(
            answer.status.as_u16(),
            status,
            "{method} {path} {body:.40}: {}",
            answer.text()
        );
        answer.assert_status(status, code);
    }
    // 405 says what is allowed.
    let answer = http
        .send(Method::DELETE, "/v1/echo/b", &[], Bytes::new())
        .await;
    let allow = answer.header("allow").unwrap();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    // Field violations name the field.
    let answer = http.get("/v1/echo/b?flag=yes").await;
    let body = answer.json();
    assert_eq!(
        body["details"][0]["@type"],
        "type.googleapis.com/google.rpc.BadRequest"
    );
    assert_eq!(body["details"][0]["fieldViolations"][0]["field"], "flag");
}

#[tokio::test]
async fn a_backend_that_is_down_is_503() {
    let echo = echo_backend().await;
    let config = brewmesh_gateway::Config {
        reflect: vec![echo.addr.to_string()],
        no_builtin: true,
        ..Default::default()
    };
    let (_gw, http) = gateway(config).await;
    assert_eq!(http.get("/v1/echo/up").await.status, 200);
    assert_eq!(http.get("/healthz").await.status, 200);
    echo.stop().await;
    http.get("/v1/echo/down")
        .await
        .assert_status(503, Code::Unavailable);
    let health = http.get("/healthz").await;
    assert_eq!(health.status, 503, "{}", health.text());
    assert_eq!(health.json()["status"], "NOT_SERVING");
    assert_eq!(health.json()["services"]["echo.v1.Echo"], "UNAVAILABLE");
}
