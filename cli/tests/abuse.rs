//! What a client can make brewmesh's processes hold, bounded: a client
//! that asks the gateway and never reads (a real `brewmesh up`), and one
//! that watches made-up service names on a registry.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};

use support::{PATIENCE, Process};

const CONNECTIONS: usize = 8;
const STREAMS: usize = 200;
/// The answers the gateway may hold for clients that do not read them.
const HELD: u64 = 16 << 20;
/// What the abuse may add to the gateway's resident memory, at most: the
/// held answers, the piece of each stream handed to HTTP/2, the
/// allocator's slack.
const BOUND: u64 = 64 << 20;
/// What may remain of it once the client is gone.
const LEFT: u64 = 8 << 20;

/// The resident set of process `pid`, in bytes.
fn rss(pid: u64) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib << 10
}

#[tokio::test(flavor = "multi_thread")]
async fn unread_answers_leave_the_gateways_memory_bounded_and_given_back() {
    let dir = tempfile::tempdir().unwrap();
    let args = Process::up_args(
        dir.path(),
        &[
            "--barista-arg=--espresso-time=1ms",
            "--barista-arg=--milk-time=1ms",
            "--barista-arg=--espresso-machines=16",
            "--barista-arg=--steam-wands=16",
            "--payment-arg=--processing-delay=0s",
            &format!("--gateway-arg=--max-held-bytes={HELD}"),
        ],
    );
    let up = Process::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let gateway = up.instance("gateway");
    // A thousand orders, so that a page of them is a large answer.
    let loaded = std::process::Command::new(env!("CARGO_BIN_EXE_brewmesh"))
        .args([
            "load",
            "--gateway",
            &gateway.to_string(),
            "--customers",
            "1000",
        ])
        .args([
            "--concurrency",
            "32",
            "--until",
            "accepted",
            "--no-progress",
        ])
        .output()
        .unwrap();
    assert!(loaded.status.success(), "{loaded:?}");
    let ready: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("ready").join("gateway.json")).unwrap(),
    )
    .unwrap();
    let pid = ready["pid"].as_u64().unwrap();
    let before = rss(pid);

    // Connections whose windows stay at HTTP/2's 64 KiB and whose answers
    // are never read: what the gateway has made for them stays with it.
    let mut held = Vec::new();
    let mut senders = Vec::new();
    for _ in 0..CONNECTIONS {
        let tcp = tokio::net::TcpStream::connect(gateway).await.unwrap();
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
            .await
            .unwrap();
        held.push(tokio::spawn(connection));
        senders.push(sender);
    }
    let mut answers = Vec::new();
    let mut refused = 0;
    for sender in &mut senders {
        for _ in 0..STREAMS {
            let request = http::Request::get(format!("http://{gateway}/v1/orders?pageSize=1000"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            sender.ready().await.unwrap();
            let answer = tokio::time::timeout(PATIENCE, sender.send_request(request))
                .await
                .expect("an answer's head")
                .unwrap();
            match answer.status().as_u16() {
                200 => answers.push(answer),
                503 => refused += 1,
                other => panic!("{other}"),
            }
        }
    }
    let during = rss(pid);
    assert!(refused > 0, "past the budget, new requests are shed");
    eprintln!(
        "{} unread answers held, {refused} refused: {} → {} MiB",
        answers.len(),
        before >> 20,
        during >> 20
    );
    assert!(
        during.saturating_sub(before) < BOUND,
        "{} unread answers ({refused} refused) took the gateway from {} to {} MiB",
        answers.len(),
        before >> 20,
        during >> 20
    );

    // The client goes: the memory comes back.
    drop(answers);
    drop(senders);
    for connection in held {
        connection.abort();
    }
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = rss(pid);
        if now.saturating_sub(before) < LEFT {
            eprintln!("once the client went: {} MiB", now >> 20);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway still holds {} MiB more than before",
            (now - before) >> 20
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Watches `names` made-up service names on the registry at `url`, each
/// for its first answer, a hundred at a time, and lets them all go.
async fn watch_made_up(url: &str, round: usize, names: usize) {
    use brewmesh::pb::registry::v1::WatchRequest;
    use brewmesh::pb::registry::v1::registry_client::RegistryClient;
    let channel = brewmesh_runtime::client::channel(url).unwrap();
    let mut batch = tokio::task::JoinSet::new();
    for n in 0..names {
        let mut client = RegistryClient::new(channel.clone());
        batch.spawn(async move {
            let request = WatchRequest {
                service: format!("made.up.v{round}.Service{n}"),
            };
            let mut stream = client.watch(request).await.unwrap().into_inner();
            stream.message().await.unwrap().expect("the current set");
        });
        if batch.len() >= 100 {
            batch.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(done) = batch.join_next().await {
        done.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn watching_made_up_names_leaves_the_registrys_memory_bounded() {
    let registry = Process::start(&["registry", "--registry-token", "abuse-test-token"]);
    let pid = u64::from(registry.pid());
    let url = registry.url();
    let before = rss(pid);
    watch_made_up(&url, 1, 20_000).await;
    // The sweeper (4 times a second) forgets names nobody watches.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = rss(pid);
    watch_made_up(&url, 2, 20_000).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = rss(pid);
    eprintln!(
        "registry: {} MiB, after 20,000 names {} MiB, after 40,000 {} MiB",
        before >> 20,
        first >> 20,
        second >> 20
    );
    // Another 20,000 names reuse what the first left, rather than add to it.
    assert!(
        second.saturating_sub(first) < 4 << 20,
        "{} → {} MiB for the second 20,000 names",
        first >> 20,
        second >> 20
    );
    assert!(
        second.saturating_sub(before) < 24 << 20,
        "{} → {} MiB for 40,000 names",
        before >> 20,
        second >> 20
    );
}
