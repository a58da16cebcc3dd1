//! gRPC-Web and Connect on the gateway's port, through a running gateway to
//! a real gRPC backend (the echo service): every bad input of those
//! protocols is a clear error in the protocol's own form, compression both
//! ways (its floor, its inflate limit), and CORS. Clients nobody here wrote
//! (connect-web, connect-node, buf curl, grpcurl) are run against a real
//! mesh by tests/browser/rpc.test.mjs.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod support;

use std::io::Read as _;

use base64::Engine as _;
use bytes::Bytes;
use http::Method;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::{Value, json};

use brewmesh_gateway::compression::Encoding;
use brewmesh_testing::Running;
use support::{Answer, GatewayRun, Http, echo_backend, echo_descriptors, gateway};

/// The gateway's body limit here.
const LIMIT: usize = 4096;
/// The one origin allowed.
const ALLOWED: &str = "http://allowed.example";
const WEB: (&str, &str) = ("content-type", "application/grpc-web+proto");
const ECHO: &str = "/echo.v1.Echo/Echo";

struct Mesh {
    http: Http,
    pool: DescriptorPool,
    _servers: (Running<()>, Running<GatewayRun>),
}

async fn mesh() -> Mesh {
    let echo = echo_backend().await;
    let config = brewmesh_gateway::Config {
        reflect: vec![echo.addr.to_string()],
        no_builtin: true,
        timeout: std::time::Duration::from_secs(5),
        max_body_bytes: LIMIT,
        cors_origins: vec![ALLOWED.into()],
        ..Default::default()
    };
    let (gw, http) = gateway(config).await;
    let pool = DescriptorPool::decode(&echo_descriptors()[..]).unwrap();
    Mesh {
        http,
        pool,
        _servers: (echo, gw),
    }
}

impl Mesh {
    /// An echo.v1.Message from its JSON, encoded.
    fn message(&self, value: Value) -> Vec<u8> {
        let descriptor = self.pool.get_message_by_name("echo.v1.Message").unwrap();
        let message = DynamicMessage::deserialize(descriptor, value).unwrap();
        message.encode_to_vec()
    }

    /// An echo.v1.Message decoded, as JSON.
    fn decoded(&self, bytes: &[u8]) -> Value {
        let descriptor = self.pool.get_message_by_name("echo.v1.Message").unwrap();
        let message = DynamicMessage::decode(descriptor, bytes).unwrap();
        serde_json::to_value(&message).unwrap()
    }

    async fn post(&self, path: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Answer {
        self.http.send(Method::POST, path, headers, body).await
    }
}

/// One envelope.
fn frame(flags: u8, data: &[u8]) -> Vec<u8> {
    let mut out = vec![flags];
    out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The envelopes of a body.
fn frames(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !body.is_empty() {
        assert!(body.len() >= 5, "a cut envelope: {body:?}");
        let length = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        out.push((body[0], body[5..5 + length].to_vec()));
        body = &body[5 + length..];
    }
    out
}

/// A gRPC-Web answer: its messages (flags, bytes) and its status, from the
/// trailers frame or, for a trailers-only answer, the headers.
fn grpc_web(answer: &Answer) -> (Vec<(u8, Vec<u8>)>, i32, String) {
    assert_eq!(answer.status, 200, "{}", answer.text());
    if let Some(status) = answer.header("grpc-status") {
        let message = answer.header("grpc-message").unwrap_or_default();
        return (Vec::new(), status.parse().unwrap(), message.to_owned());
    }
    let mut all = frames(&answer.body);
    let (flags, trailers) = all.pop().expect("a trailers frame");
    assert_eq!(flags & 0x80, 0x80, "the last frame is the trailers");
    let text = String::from_utf8(trailers).unwrap();
    let field = |name: &str| {
        text.split("\r\n")
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .map(str::to_owned)
    };
    let status = field("grpc-status").expect("grpc-status").parse().unwrap();
    (all, status, field("grpc-message").unwrap_or_default())
}

/// A Connect stream's messages and its end-of-stream JSON.
fn connect_stream(answer: &Answer) -> (Vec<(u8, Vec<u8>)>, Value) {
    assert_eq!(answer.status, 200, "{}", answer.text());
    let mut all = frames(&answer.body);
    let (flags, end) = all.pop().expect("an end-of-stream message");
    assert_eq!(flags & 0x02, 0x02, "the last message ends the stream");
    (all, serde_json::from_slice(&end).unwrap())
}

/// Asserts a Connect unary error: `http`, `code`, a message.
fn connect_error(answer: &Answer, http: u16, code: &str) -> Value {
    assert_eq!(answer.status.as_u16(), http, "{}", answer.text());
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let body = answer.json();
    assert_eq!(body["code"], code, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

/// gRPC-Web-text's answer: base64 pieces, each padded.
fn unbase64(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, quad) in text.chunks(4).enumerate() {
        let end = (i * 4 + 4).min(text.len());
        if quad.contains(&b'=') || end == text.len() {
            let piece = base64::engine::general_purpose::STANDARD
                .decode(&text[start..end])
                .unwrap();
            out.extend(piece);
            start = end;
        }
    }
    out
}

/// `data` compressed as small as the encoding goes.
fn squeeze(encoding: Encoding, data: &[u8]) -> Vec<u8> {
    match encoding {
        Encoding::Gzip => {
            let mut out = Vec::new();
            flate2::read::GzEncoder::new(data, flate2::Compression::best())
                .read_to_end(&mut out)
                .unwrap();
            out
        }
        Encoding::Zstd => zstd::bulk::compress(data, 19).unwrap(),
    }
}

fn inflate(encoding: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => {
            flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => out = zstd::stream::decode_all(data).unwrap(),
        other => panic!("{other}"),
    }
    out
}

#[tokio::test]
async fn grpc_web_and_connect_call_the_backend_unary_and_streaming() {
    let mesh = mesh().await;
    let sent = mesh.message(json!({"id": "w1", "note": {"text": "hi"}}));

    // gRPC-Web: the message back, the status in the trailers frame.
    let answer = mesh.post(ECHO, &[WEB], frame(0, &sent)).await;
    assert_eq!(
        answer.header("content-type"),
        Some("application/grpc-web+proto")
    );
    let (messages, status, _) = grpc_web(&answer);
    assert_eq!(status, 0);
    assert_eq!(mesh.decoded(&messages[0].1)["note"]["text"], "hi");

    // gRPC-Web-text: the same, base64 both ways.
    let text = base64::engine::general_purpose::STANDARD.encode(frame(0, &sent));
    let answer = mesh
        .post(ECHO, &[("content-type", "application/grpc-web-text")], text)
        .await;
    let raw = unbase64(&answer.body);
    let decoded = Answer {
        status: answer.status,
        headers: answer.headers.clone(),
        body: Bytes::from(raw),
    };
    let (messages, status, _) = grpc_web(&decoded);
    assert_eq!((messages.len(), status), (1, 0));

    // A gRPC-Web server stream: three messages, then OK.
    let repeat = mesh.message(json!({"id": "r", "count": 3}));
    let answer = mesh
        .post("/echo.v1.Echo/Repeat", &[WEB], frame(0, &repeat))
        .await;
    let (messages, status, _) = grpc_web(&answer);
    assert_eq!((messages.len(), status), (3, 0));

    // Connect unary, JSON and protobuf; a GET of a method without side
    // effects.
    let answer = mesh
        .post(
            ECHO,
            &[("content-type", "application/json")],
            r#"{"id": "c1", "big": "7"}"#,
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["big"], "7");
    let answer = mesh
        .post(ECHO, &[("content-type", "application/proto")], sent.clone())
        .await;
    assert_eq!(answer.header("content-type"), Some("application/proto"));
    assert_eq!(mesh.decoded(&answer.body)["id"], "w1");
    let answer = mesh
        .http
        .get("/echo.v1.Echo/Wild?encoding=json&message=%7B%22id%22%3A%22g%22%7D")
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.json()["id"], "g");

    // A Connect stream: JSON envelopes, then an end-of-stream without an
    // error; a failing one ends with the backend's code.
    let answer = mesh
        .post(
            "/echo.v1.Echo/Repeat",
            &[("content-type", "application/connect+json")],
            frame(0, br#"{"id": "s", "count": 2}"#),
        )
        .await;
    let (messages, end) = connect_stream(&answer);
    assert_eq!(messages.len(), 2);
    let first: Value = serde_json::from_slice(&messages[0].1).unwrap();
    assert_eq!(first["id"], "s");
    assert!(end.get("error").is_none(), "{end}");
    let answer = mesh
        .post(
            "/echo.v1.Echo/Repeat",
            &[("content-type", "application/connect+json")],
            frame(0, br#"{"count": 1, "failCode": 9}"#),
        )
        .await;
    let (messages, end) = connect_stream(&answer);
    assert_eq!(messages.len(), 1);
    assert_eq!(end["error"]["code"], "failed_precondition", "{end}");
}

#[tokio::test]
async fn malformed_envelopes_are_invalid_argument_in_each_protocols_form() {
    let mesh = mesh().await;
    let sent = mesh.message(json!({"id": "m"}));
    let mut cut = frame(0, &sent);
    cut.truncate(cut.len() - 1);
    let mut two = frame(0, &sent);
    two.extend(frame(0, &sent));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a cut envelope", cut.clone()),
        ("a cut envelope header", vec![0, 0, 0]),
        ("unknown flags", frame(0x40, &sent)),
        ("two messages for a unary method", two),
        (
            "bytes that are not the input message",
            frame(0, &[0xff, 0xff, 0xff]),
        ),
        ("no message at all", Vec::new()),
    ];
    for (what, body) in cases {
        let answer = mesh.post(ECHO, &[WEB], body).await;
        let (messages, status, message) = grpc_web(&answer);
        assert_eq!((messages.len(), status), (0, 3), "{what}: {message}");
        assert!(!message.is_empty(), "{what}");
    }
    // gRPC-Web-text that is not base64.
    let answer = mesh
        .post(
            ECHO,
            &[("content-type", "application/grpc-web-text")],
            "ab$",
        )
        .await;
    assert_eq!(grpc_web(&answer).1, 3);

    // A Connect stream: the same, in its end-of-stream message.
    let answer = mesh
        .post(
            "/echo.v1.Echo/Repeat",
            &[("content-type", "application/connect+json")],
            cut,
        )
        .await;
    let (_, end) = connect_stream(&answer);
    assert_eq!(end["error"]["code"], "invalid_argument", "{end}");

    // Connect unary: JSON that does not fit, with the field it names.
    let answer = mesh
        .post(
            ECHO,
            &[("content-type", "application/json")],
            r#"{"big": "many"}"#,
        )
        .await;
    let body = connect_error(&answer, 400, "invalid_argument");
    assert_eq!(
        body["details"][0]["type"], "google.rpc.BadRequest",
        "{body}"
    );
    let violation = &body["details"][0]["debug"]["fieldViolations"][0];
    assert!(
        violation["description"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    let answer = mesh
        .post(ECHO, &[("content-type", "application/json")], "{")
        .await;
    connect_error(&answer, 400, "invalid_argument");
}

#[tokio::test]
async fn a_wrong_content_type_or_method_is_refused_naming_what_is_taken() {
    let mesh = mesh().await;
    let answer = mesh
        .post(ECHO, &[("content-type", "text/xml")], "<echo/>")
        .await;
    assert_eq!(answer.status, 415, "{}", answer.text());
    assert!(
        answer
            .header("accept-post")
            .unwrap()
            .contains("application/grpc-web")
    );
    assert_eq!(answer.json()["code"], 3);
    // A GET without ?encoding=.
    let answer = mesh.http.get("/echo.v1.Echo/Wild?message=%7B%7D").await;
    assert_eq!(answer.status, 415, "{}", answer.text());
    // A GET of a method with side effects: POST only.
    let answer = mesh
        .http
        .get("/echo.v1.Echo/Echo?encoding=json&message=%7B%7D")
        .await;
    assert_eq!(answer.status, 405, "{}", answer.text());
    assert_eq!(answer.header("allow"), Some("POST"));
    let answer = mesh
        .http
        .send(Method::PUT, ECHO, &[WEB], frame(0, &[]))
        .await;
    assert_eq!(answer.status, 405, "{}", answer.text());
    // A method the service does not have.
    let answer = mesh.post("/echo.v1.Echo/Nope", &[WEB], frame(0, &[])).await;
    assert_eq!(grpc_web(&answer).1, 12);
    let answer = mesh
        .post(
            "/echo.v1.Echo/Nope",
            &[("content-type", "application/json")],
            "{}",
        )
        .await;
    connect_error(&answer, 501, "unimplemented");
}

#[tokio::test]
async fn bad_deadlines_and_oversized_metadata_are_refused_and_deadlines_hold() {
    let mesh = mesh().await;
    let json = ("content-type", "application/json");
    let answer = mesh
        .post(ECHO, &[json, ("connect-timeout-ms", "soon")], "{}")
        .await;
    connect_error(&answer, 400, "invalid_argument");
    let answer = mesh
        .post(ECHO, &[WEB, ("grpc-timeout", "12x")], frame(0, &[]))
        .await;
    assert_eq!(grpc_web(&answer).1, 3);
    let big = "x".repeat(9 * 1024);
    let answer = mesh
        .post(ECHO, &[WEB, ("x-big", &big)], frame(0, &[]))
        .await;
    let (_, status, message) = grpc_web(&answer);
    assert_eq!(status, 8, "RESOURCE_EXHAUSTED: {message}");
    // A deadline shorter than the backend's wait.
    let answer = mesh
        .post(
            ECHO,
            &[json, ("connect-timeout-ms", "100")],
            r#"{"delayMs": 3000}"#,
        )
        .await;
    connect_error(&answer, 504, "deadline_exceeded");
    let slow = mesh.message(json!({"delayMs": 3000}));
    let answer = mesh
        .post(ECHO, &[WEB, ("grpc-timeout", "100m")], frame(0, &slow))
        .await;
    assert_eq!(grpc_web(&answer).1, 4);
}

#[tokio::test]
async fn oversized_and_over_inflating_bodies_are_resource_exhausted() {
    let mesh = mesh().await;
    let json = ("content-type", "application/json");
    let big = "a".repeat(LIMIT + 1);

    // Over the limit as sent.
    let large = mesh.message(json!({"id": big}));
    let answer = mesh.post(ECHO, &[WEB], frame(0, &large)).await;
    assert_eq!(grpc_web(&answer).1, 8);
    let answer = mesh
        .post(ECHO, &[json], format!(r#"{{"id": "{big}"}}"#))
        .await;
    connect_error(&answer, 429, "resource_exhausted");

    // Small compressed, over the limit inflated: a megabyte of one letter.
    let bomb_json = format!(r#"{{"id": "{}"}}"#, "a".repeat(1 << 20));
    let bomb_proto = mesh.message(json!({"id": "a".repeat(1 << 20)}));
    for encoding in [Encoding::Gzip, Encoding::Zstd] {
        let name = encoding.name();
        let body = squeeze(encoding, bomb_json.as_bytes());
        assert!(body.len() < LIMIT, "{name}: {}", body.len());
        let answer = mesh
            .post(ECHO, &[json, ("content-encoding", name)], body.clone())
            .await;
        connect_error(&answer, 429, "resource_exhausted");
        // REST too.
        let answer = mesh
            .post("/v1/echo/abc", &[json, ("content-encoding", name)], body)
            .await;
        answer.assert_status(413, tonic::Code::InvalidArgument);

        let message = squeeze(encoding, &bomb_proto);
        let answer = mesh
            .post(ECHO, &[WEB, ("grpc-encoding", name)], frame(1, &message))
            .await;
        let (_, status, text) = grpc_web(&answer);
        assert_eq!(status, 8, "{name}: {text}");
        let message = squeeze(encoding, bomb_json.as_bytes());
        let answer = mesh
            .post(
                "/echo.v1.Echo/Repeat",
                &[
                    ("content-type", "application/connect+json"),
                    ("connect-content-encoding", name),
                ],
                frame(1, &message),
            )
            .await;
        let (_, end) = connect_stream(&answer);
        assert_eq!(end["error"]["code"], "resource_exhausted", "{name}: {end}");
    }
    // Compressed bytes that are not gzip.
    let answer = mesh
        .post(
            ECHO,
            &[json, ("content-encoding", "gzip")],
            "not gzip at all",
        )
        .await;
    connect_error(&answer, 400, "invalid_argument");
    let answer = mesh
        .post(
            ECHO,
            &[WEB, ("grpc-encoding", "gzip")],
            frame(1, b"not gzip"),
        )
        .await;
    assert_eq!(grpc_web(&answer).1, 3);
}

#[tokio::test]
async fn an_encoding_not_known_here_is_refused_in_each_protocols_form() {
    let mesh = mesh().await;
    let json = ("content-type", "application/json");
    let answer = mesh
        .post(ECHO, &[json, ("content-encoding", "br")], "{}")
        .await;
    connect_error(&answer, 501, "unimplemented");
    let answer = mesh
        .post("/v1/echo/abc", &[json, ("content-encoding", "br")], "{}")
        .await;
    answer.assert_status(415, tonic::Code::Unimplemented);
    assert_eq!(answer.header("accept-encoding"), Some("gzip, zstd"));
    let answer = mesh
        .post(ECHO, &[WEB, ("grpc-encoding", "snappy")], frame(1, b"x"))
        .await;
    assert_eq!(grpc_web(&answer).1, 12);
    let answer = mesh
        .post(
            "/echo.v1.Echo/Repeat",
            &[
                ("content-type", "application/connect+json"),
                ("connect-content-encoding", "snappy"),
            ],
            frame(1, b"x"),
        )
        .await;
    let (_, end) = connect_stream(&answer);
    assert_eq!(end["error"]["code"], "unimplemented", "{end}");
    // The compressed flag with no encoding named.
    let answer = mesh.post(ECHO, &[WEB], frame(1, b"x")).await;
    assert_eq!(grpc_web(&answer).1, 3);
}

#[tokio::test]
async fn compressed_requests_are_inflated_and_answers_compressed_above_the_floor() {
    let mesh = mesh().await;
    let json = ("content-type", "application/json");
    let long = "crema ".repeat(300);

    // Connect unary: a gzip body in; zstd out when the answer is large,
    // plain when it is below the floor.
    let body = Encoding::Gzip.compress(format!(r#"{{"note": {{"text": "{long}"}}}}"#).as_bytes());
    let answer = mesh
        .post(
            ECHO,
            &[
                json,
                ("content-encoding", "gzip"),
                ("accept-encoding", "zstd"),
            ],
            body,
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.header("content-encoding"), Some("zstd"));
    let plain: Value = serde_json::from_slice(&inflate("zstd", &answer.body)).unwrap();
    assert_eq!(plain["note"]["text"], long.as_str());
    let answer = mesh
        .post(ECHO, &[json, ("accept-encoding", "gzip")], r#"{"id": "s"}"#)
        .await;
    assert_eq!(answer.header("content-encoding"), None);
    assert_eq!(answer.json()["id"], "s");

    // REST: the same floor.
    let answer = mesh
        .post(
            "/v1/echo/r",
            &[json, ("accept-encoding", "gzip")],
            format!(r#"{{"note": {{"text": "{long}"}}}}"#),
        )
        .await;
    assert_eq!(answer.header("content-encoding"), Some("gzip"));
    assert_eq!(answer.header("vary"), Some("accept-encoding"));
    let plain: Value = serde_json::from_slice(&inflate("gzip", &answer.body)).unwrap();
    assert_eq!(plain["id"], "r");

    // gRPC-Web: a zstd message in, gzip messages out, each flagged; a small
    // one stays plain in the same stream's encoding.
    let message = mesh.message(json!({"note": {"text": long}, "count": 2}));
    let headers = [
        WEB,
        ("grpc-encoding", "zstd"),
        ("grpc-accept-encoding", "gzip"),
    ];
    let compressed = Encoding::Zstd.compress(&message);
    let answer = mesh
        .post("/echo.v1.Echo/Repeat", &headers, frame(1, &compressed))
        .await;
    assert_eq!(answer.header("grpc-encoding"), Some("gzip"));
    let (messages, status, _) = grpc_web(&answer);
    assert_eq!((messages.len(), status), (2, 0));
    for (flags, data) in &messages {
        assert_eq!(*flags, 1);
        assert_eq!(
            mesh.decoded(&inflate("gzip", data))["note"]["text"],
            long.as_str()
        );
    }
    let small = mesh.message(json!({"id": "s"}));
    let answer = mesh.post(ECHO, &headers[..1], frame(0, &small)).await;
    let (messages, _, _) = grpc_web(&answer);
    assert_eq!(messages[0].0, 0);
    let answer = mesh
        .post(
            ECHO,
            &[WEB, ("grpc-accept-encoding", "gzip")],
            frame(0, &small),
        )
        .await;
    let (messages, _, _) = grpc_web(&answer);
    assert_eq!(messages[0].0, 0, "below the floor");

    // A Connect stream: per message too.
    let answer = mesh
        .post(
            "/echo.v1.Echo/Repeat",
            &[
                ("content-type", "application/connect+json"),
                ("connect-accept-encoding", "zstd"),
            ],
            frame(
                0,
                format!(r#"{{"note": {{"text": "{long}"}}, "count": 1}}"#).as_bytes(),
            ),
        )
        .await;
    assert_eq!(answer.header("connect-content-encoding"), Some("zstd"));
    let (messages, end) = connect_stream(&answer);
    assert!(end.get("error").is_none(), "{end}");
    let first: Value = serde_json::from_slice(&inflate("zstd", &messages[0].1)).unwrap();
    assert_eq!(first["note"]["text"], long.as_str());
}

#[tokio::test]
async fn origins_not_allowed_are_refused_and_allowed_ones_get_cors_headers() {
    let mesh = mesh().await;
    let preflight = |origin: &'static str, headers: &'static str| {
        let http = mesh.http.clone();
        async move {
            http.send(
                Method::OPTIONS,
                ECHO,
                &[
                    ("origin", origin),
                    ("access-control-request-method", "POST"),
                    ("access-control-request-headers", headers),
                ],
                Bytes::new(),
            )
            .await
        }
    };
    let answer = preflight(ALLOWED, "content-type,x-grpc-web,grpc-timeout").await;
    assert_eq!(answer.status, 204, "{}", answer.text());
    assert_eq!(answer.header("access-control-allow-origin"), Some(ALLOWED));
    let allowed = answer.header("access-control-allow-headers").unwrap();
    assert!(allowed.contains("x-grpc-web"), "{allowed}");
    assert_eq!(answer.header("access-control-allow-credentials"), None);
    // Headers not allowed, an origin not allowed.
    let answer = preflight(ALLOWED, "content-type,x-evil").await;
    assert_eq!(answer.status, 403, "{}", answer.text());
    assert_eq!(answer.json()["code"], 7);
    let answer = preflight("http://evil.example", "content-type").await;
    assert_eq!(answer.status, 403, "{}", answer.text());
    assert_eq!(answer.header("access-control-allow-origin"), None);

    // The calls themselves: allowed with the protocol's headers exposed,
    // refused in each protocol's form.
    let sent = mesh.message(json!({"id": "o"}));
    let answer = mesh
        .post(ECHO, &[WEB, ("origin", ALLOWED)], frame(0, &sent))
        .await;
    assert_eq!(grpc_web(&answer).1, 0);
    assert_eq!(answer.header("access-control-allow-origin"), Some(ALLOWED));
    let exposed = answer.header("access-control-expose-headers").unwrap();
    assert!(exposed.contains("grpc-status") && exposed.contains("grpc-message"));
    let evil = ("origin", "http://evil.example");
    let answer = mesh.post(ECHO, &[WEB, evil], frame(0, &sent)).await;
    assert_eq!(grpc_web(&answer).1, 7);
    let answer = mesh
        .post(ECHO, &[("content-type", "application/json"), evil], "{}")
        .await;
    connect_error(&answer, 403, "permission_denied");
    let answer = mesh
        .post(
            "/v1/echo/abc",
            &[("content-type", "application/json"), evil],
            "{}",
        )
        .await;
    answer.assert_status(403, tonic::Code::PermissionDenied);
}
