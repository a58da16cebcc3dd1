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
