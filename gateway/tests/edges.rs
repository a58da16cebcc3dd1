//! The gateway's connections against clients that stall: slow headers, an
//! idle connection, a slow body. Each is closed by the gateway once its
//! configured time is up, well before the defaults would have.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod support;

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use support::gateway;

const LIMIT: Duration = Duration::from_millis(300);

async fn edge() -> (
    brewmesh_testing::Running<support::GatewayRun>,
    std::net::SocketAddr,
) {
    let config = brewmesh_gateway::Config {
        // Nothing listens there: no request here gets that far.
        backends: vec![(
            "brewmesh.barista.v1.Barista".into(),
            vec!["127.0.0.1:1".into()],
        )],
        header_timeout: LIMIT,
        idle_timeout: LIMIT,
        body_timeout: LIMIT,
        ..Default::default()
    };
    let (running, _) = gateway(config).await;
    let addr = running.addr;
    (running, addr)
}

/// Reads until the gateway closes the connection: what it sent, and when
/// it closed, counted from `since`. Fails after 10 s, the default header
/// timeout.
async fn until_closed(tcp: &mut TcpStream, since: Instant) -> (String, Duration) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("the gateway closed the connection before the default timeout");
        match read {
            Ok(0) | Err(_) => return (String::from_utf8_lossy(&seen).into(), since.elapsed()),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_headers_are_cut_off() {
    let (_gateway, addr) = edge().await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    // Half a request line, and then nothing.
    tcp.write_all(b"GET /v1/menu HTTP/1.1\r\nHost: shop\r\n")
        .await
        .unwrap();
    let (_, after) = until_closed(&mut tcp, started).await;
    assert!(after >= LIMIT, "closed after {after:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_connection_is_closed() {
    let (_gateway, addr) = edge().await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: shop\r\n\r\n")
        .await
        .unwrap();
    // The answer, then the connection is kept alive, idle, until closed.
    let (seen, _) = until_closed(&mut tcp, Instant::now()).await;
    assert!(seen.starts_with("HTTP/1.1 "), "{seen}");
    // A connection that never sends a byte is closed too.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let (seen, _) = until_closed(&mut silent, Instant::now()).await;
    assert_eq!(seen, "");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_body_gets_408_and_the_connection_ends() {
    let (_gateway, addr) = edge().await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    // 100 bytes announced, 10 sent.
    tcp.write_all(
        b"POST /v1/orders HTTP/1.1\r\nHost: shop\r\ncontent-type: application/json\r\n\
          content-length: 100\r\n\r\n{\"itemId\":",
    )
    .await
    .unwrap();
    let (seen, after) = until_closed(&mut tcp, started).await;
    assert!(seen.starts_with("HTTP/1.1 408"), "{seen}");
    assert!(seen.contains(r#""code":4"#), "DEADLINE_EXCEEDED: {seen}");
    assert!(after >= LIMIT, "answered after {after:?}");
}

/// One HTTP/1.1 GET of `path` from the local address `from`: the answer's
/// head and body as text.
async fn get_from(addr: std::net::SocketAddr, from: [u8; 4], path: &str) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((from, 0).into()).unwrap();
    let mut tcp = socket.connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&answer).into()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_over_its_rate_gets_429_while_others_are_served() {
    let config = brewmesh_gateway::Config {
        backends: vec![(
            "brewmesh.barista.v1.Barista".into(),
            vec!["127.0.0.1:1".into()],
        )],
        rate_limit: std::num::NonZeroU32::new(1),
        rate_burst: std::num::NonZeroU32::new(3),
        ..Default::default()
    };
    let (gateway, _) = gateway(config).await;
    let mut statuses = Vec::new();
    // A burst of 3, then 1 a second: of 10 at once, some are over.
    for _ in 0..10 {
        let answer = get_from(gateway.addr, [127, 0, 0, 1], "/openapi.json").await;
        statuses.push(answer[9..12].to_owned());
        if answer.starts_with("HTTP/1.1 429") {
            assert!(
                answer.to_ascii_lowercase().contains("retry-after: 1"),
                "{answer}"
            );
            assert!(
                answer.contains(r#""code":8"#),
                "RESOURCE_EXHAUSTED: {answer}"
            );
        }
    }
    assert_eq!(statuses[..3], ["200", "200", "200"], "{statuses:?}");
    assert!(statuses[3..].iter().any(|s| s == "429"), "{statuses:?}");
    // Another client, and the probes, are served meanwhile.
    let other = get_from(gateway.addr, [127, 0, 0, 2], "/openapi.json").await;
    assert!(other.starts_with("HTTP/1.1 200"), "{other:.200}");
    let probe = get_from(gateway.addr, [127, 0, 0, 1], "/metrics").await;
    assert!(probe.starts_with("HTTP/1.1 200"), "{probe:.200}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_gateway_sheds_at_once_with_503() {
    let config = brewmesh_gateway::Config {
        backends: vec![(
            "brewmesh.barista.v1.Barista".into(),
            vec!["127.0.0.1:1".into()],
        )],
        max_in_flight: 1,
        body_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let (gateway, _) = gateway(config).await;
    // The one place taken by a body that is slow to come.
    let mut slow = TcpStream::connect(gateway.addr).await.unwrap();
    slow.write_all(
        b"POST /v1/orders HTTP/1.1\r\nHost: shop\r\ncontent-type: application/json\r\n\
          content-length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let shed = get_from(gateway.addr, [127, 0, 0, 2], "/openapi.json").await;
    assert!(shed.starts_with("HTTP/1.1 503"), "{shed:.300}");
    assert!(
        shed.to_ascii_lowercase().contains("retry-after: 1"),
        "{shed}"
    );
    assert!(shed.contains(r#""code":14"#), "UNAVAILABLE: {shed}");
    // Once it has its 408, the place is free again.
    let (answer, _) = until_closed(&mut slow, Instant::now()).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let served = get_from(gateway.addr, [127, 0, 0, 2], "/openapi.json").await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served:.200}");
}
