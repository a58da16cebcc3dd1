//! Real `brewmesh` processes for tests: started on port 0, found by their
//! `--ready-file`, killed when dropped.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use brewmesh::pb::barista::v1::{OrderEvent, OrderEventType as E};

/// How long a process may take to start serving or to exit.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A running `brewmesh` process.
pub struct Process {
    child: Child,
    /// The address in its ready file (for `up`, the gateway's).
    pub addr: SocketAddr,
    /// Every line it wrote to stdout so far.
    pub lines: Arc<Mutex<Vec<String>>>,
    /// Its ready file, whole.
    pub ready: serde_json::Value,
    /// Holds the ready file.
    _ready_dir: tempfile::TempDir,
}

impl Process {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `brewmesh --log-format json <args>` and waits for its ready
    /// file (for `up`: every instance serving).
    pub fn start(args: &[&str]) -> Process {
        Process::start_with_env(args, &[])
    }

    /// [`Process::start`] with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Process {
        Process::start_wrapped(&[], args, env)
    }

    /// [`Process::start_with_env`] under `wrapper` (`ip netns exec NAME`),
    /// which must exec the binary in its place.
    pub fn start_wrapped(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Process {
        let ready_dir = tempfile::tempdir().expect("a directory for the ready file");
        let ready_file = ready_dir.path().join("ready.json");
        let binary = env!("CARGO_BIN_EXE_brewmesh");
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        // A role started alone is plaintext unless the test gives it an
        // identity (`--tls-dir`): the tests call it straight.
        let role = matches!(
            args.first(),
            Some(&("registry" | "payment" | "barista" | "gateway"))
        );
        let insecure = role && !args.iter().any(|a| *a == "--tls-dir" || *a == "--insecure");
        // And a gateway started alone lets every client in unless the test
        // gives it a key set.
        let open = args.first() == Some(&"gateway")
            && !args.iter().any(|a| *a == "--jwks" || *a == "--no-auth");
        let mut child = command
            .args(["--log-format", "json"])
            .arg("--ready-file")
            .arg(&ready_file)
            .args(args)
            .args(insecure.then_some("--insecure"))
            .args(open.then_some("--no-auth"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting brewmesh");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        {
            let lines = Arc::clone(&lines);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let deadline = Instant::now() + PATIENCE;
        let ready = loop {
            if let Ok(text) = std::fs::read(&ready_file)
                && let Ok(ready) = serde_json::from_slice::<serde_json::Value>(&text)
            {
                break ready;
            }
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!("brewmesh {args:?} exited before it was ready: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "brewmesh {args:?} was not ready within {PATIENCE:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let addr = ready["addr"]
            .as_str()
            .and_then(|a| a.parse().ok())
            .expect("the ready file has an addr");
        Process {
            child,
            addr,
            lines,
            ready,
            _ready_dir: ready_dir,
        }
    }

    /// Runs `brewmesh <service> <database flags> <args>`: a SQLite file in
    /// `dir`, or the test's PostgreSQL database for `service` when
    /// `BREWMESH_TEST_POSTGRES_URL` is set (see `scripts/postgres.sh`).
    pub async fn start_role(service: &str, dir: &std::path::Path, args: &[&str]) -> Process {
        let database = brewmesh_testing::database(dir, service).await;
        let mut all = vec![service.to_owned()];
        match database.database_url {
            Some(url) => all.extend(["--database-url".to_owned(), url]),
            None => all.extend([
                "--data-dir".to_owned(),
                database.data_dir.display().to_string(),
            ]),
        }
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        Process::start(&all)
    }

    /// The arguments of `brewmesh up --insecure --no-auth` with every role
    /// on a free port of 127.0.0.1 and its data in `dir`, then `extra`:
    /// plaintext and no tokens, so the test can call any service straight.
    /// The README-flow test runs `up` as it is by default
    /// ([`Process::up_args_secure`]).
    pub fn up_args(dir: &std::path::Path, extra: &[&str]) -> Vec<String> {
        let mut args = Process::up_args_secure(dir, extra);
        args.push("--insecure".to_owned());
        args.push("--no-auth".to_owned());
        args
    }

    /// [`Process::up_args`] as `up` runs by default: mutual TLS between the
    /// roles (the operator's certificate in `dir/tls/operator`) and a
    /// gateway that checks tokens (`up`'s in `dir/auth/*.jwt`).
    pub fn up_args_secure(dir: &std::path::Path, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "up",
            "--registry-listen",
            "127.0.0.1:0",
            "--payment-listen",
            "127.0.0.1:0",
            "--barista-listen",
            "127.0.0.1:0",
            "--gateway-listen",
            "127.0.0.1:0",
            "--data-dir",
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
        args.push(dir.display().to_string());
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        args
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address an instance of `up` serves on, from `up`'s ready file.
    pub fn instance(&self, label: &str) -> SocketAddr {
        self.ready["instances"][label]
            .as_str()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("{label} is in the ready file: {}", self.ready))
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signalling brewmesh");
    }

    /// `kill -9`, and reap it.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaping");
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "brewmesh did not exit within {PATIENCE:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The lines written so far that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `curl --max-time 30 -s <args>`; its output (a failure fails the test).
pub fn curl(args: &[&str]) -> String {
    let output = Command::new("curl")
        .args(["--max-time", "30", "-s"])
        .args(args)
        .output()
        .expect("curl is installed");
    assert!(output.status.success(), "curl {args:?}: {output:?}");
    String::from_utf8(output.stdout).expect("utf-8")
}

/// In Prometheus text, the sum of the series `name` whose labels include
/// all of `labels` (0 when there is none).
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| series == &name || series.starts_with(&format!("{name}{{")))
        .filter(|(series, _)| {
            labels
                .iter()
                .all(|(k, v)| series.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, value)| value.parse::<f64>().unwrap())
        .sum()
}

/// Waits (bounded) until order `order_id` is in state `want`; an order that
/// ends in another final state fails the test.
pub async fn wait_for_state(
    client: &mut brewmesh::pb::barista::v1::barista_client::BaristaClient<
        tonic::transport::Channel,
    >,
    order_id: &str,
    want: brewmesh::pb::barista::v1::OrderState,
) {
    use brewmesh::pb::barista::v1::{GetOrderRequest, OrderState};
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = client
            .get_order(GetOrderRequest {
                order_id: order_id.to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        if got.state() == want {
            return;
        }
        let done = matches!(
            got.state(),
            OrderState::Ready | OrderState::Failed | OrderState::Cancelled
        );
        assert!(!done, "{order_id} ended {:?}, not {want:?}", got.state());
        assert!(
            Instant::now() < deadline,
            "{order_id} not {want:?} in time: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every order of `order_ids` was charged exactly once, by the ledger of
/// the payment service at `payment` (a URL): one payment, captured.
pub async fn charged_once(payment: &str, order_ids: &[String]) {
    use brewmesh::pb::payment::v1::payments_client::PaymentsClient;
    use brewmesh::pb::payment::v1::{ListPaymentsRequest, PaymentState};
    let channel = brewmesh_runtime::client::channel(payment).unwrap();
    let mut payments = PaymentsClient::new(channel);
    for order_id in order_ids {
        let found = payments
            .list_payments(ListPaymentsRequest {
                order_id: order_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .payments;
        assert_eq!(found.len(), 1, "{order_id}: {found:?}");
        assert_eq!(found[0].state(), PaymentState::Captured, "{order_id}");
    }
}

/// User + system CPU time of `pid` so far, from /proc.
pub fn cpu_of(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let hz = 100; // USER_HZ on Linux
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}

/// Runs grpcurl with `args`; its output (a failure fails the test).
pub fn grpcurl(args: &[&str]) -> String {
    let output = std::process::Command::new("grpcurl")
        .args(args)
        .output()
        .expect("grpcurl is installed (scripts/test.sh installs it from PyPI)");
    assert!(
        output.status.success(),
        "grpcurl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

/// grpcurl over mutual TLS with `up`'s operator certificate in `operator`.
pub fn grpcurl_tls(operator: &std::path::Path, args: &[&str]) -> String {
    let file = |name: &str| operator.join(name).display().to_string();
    let (ca, crt, key) = (file("ca.crt"), file("tls.crt"), file("tls.key"));
    let mut all = vec!["-cacert", &ca, "-cert", &crt, "-key", &key];
    all.extend_from_slice(args);
    grpcurl(&all)
}

/// `text` as JSON (anything else fails the test).
pub fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// A latte placed with `grpcurl` at the barista `addr` under `key`, and
/// watched to its end: its id, its events as JSON, and grpcurl's output.
pub fn latte_watched(
    grpcurl: &dyn Fn(&[&str]) -> String,
    addr: &str,
    key: &str,
) -> (String, Vec<serde_json::Value>, String) {
    let request = format!(
        r#"{{"idempotency_key":"{key}","item_id":"latte","customer_name":"Ada","card_token":"tok_visa"}}"#
    );
    let order = json(&grpcurl(&[
        "-d",
        &request,
        addr,
        "brewmesh.barista.v1.Barista/PlaceOrder",
    ]));
    let order_id = order["orderId"].as_str().expect("an order id").to_owned();
    let watched = grpcurl(&[
        "-d",
        &format!(r#"{{"order_id":"{order_id}"}}"#),
        addr,
        "brewmesh.barista.v1.Barista/WatchOrder",
    ]);
    let events = serde_json::Deserializer::from_str(&watched)
        .into_iter()
        .map(|v| v.unwrap())
        .collect();
    (order_id, events, watched)
}

/// Whether `event` is an order's last: FAILED, CANCELLED, or the
/// settlement that follows READY.
pub fn ends(event: E) -> bool {
    matches!(
        event,
        E::PaymentCaptured | E::PaymentCaptureRefused | E::Failed | E::Cancelled
    )
}

/// Whether the events are a made drink's: READY, then its capture.
pub fn made(kinds: &[E]) -> bool {
    kinds.ends_with(&[E::Ready, E::PaymentCaptured])
}

/// The events' types, in order.
pub fn kinds_of(events: &[OrderEvent]) -> Vec<E> {
    events.iter().map(|e| e.r#type()).collect()
}

/// The events of `order_id` from the first, as WatchOrder streams them,
/// up to and with the first for which `stop` holds (or to the stream's end).
pub async fn events_until(
    client: &mut brewmesh::pb::barista::v1::barista_client::BaristaClient<
        tonic::transport::Channel,
    >,
    order_id: &str,
    stop: impl Fn(E) -> bool,
) -> Vec<OrderEvent> {
    let mut stream = client
        .watch_order(brewmesh::pb::barista::v1::WatchOrderRequest {
            order_id: order_id.into(),
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(event) = tokio_stream::StreamExt::next(&mut stream).await {
            let event = event.expect("event");
            let done = stop(event.r#type());
            events.push(event);
            if done {
                break;
            }
        }
    })
    .await
    .expect("the awaited event comes in time");
    events
}
