//! `brewmesh up`: the mesh on 127.0.0.1 as child processes of this one.
//!
//! Each role runs as `brewmesh <role>` (the same binary), logging JSON lines
//! that this process reads, labels with the instance and writes to one
//! stream: the centralized log, on a laptop. Each role is started with
//! `--ready-file` (see `brewmesh_runtime::ready`), which tells its real
//! address, so a role started on port 0 is still found; `up`'s own ready
//! file lists them all. Ctrl-C (or
//! SIGTERM) stops the roles callers first — the barista drains its sagas
//! while payment still answers — each with SIGTERM, then SIGKILL if it
//! outlives its drain.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};

use brewmesh_runtime::telemetry::LogFormat;

/// How long a role may take to start serving.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// `brewmesh up` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory under which each role keeps its data.
    #[arg(long, env = "BREWMESH_DATA_DIR", default_value = ".brewmesh")]
    data_dir: PathBuf,

    /// Where the first registry replica listens (others take free ports).
    #[arg(long, default_value = brewmesh_runtime::defaults::REGISTRY_ADDR)]
    registry_listen: SocketAddr,

    /// Where the first payment replica listens (others take free ports).
    #[arg(long, default_value = brewmesh_runtime::defaults::PAYMENT_ADDR)]
    payment_listen: SocketAddr,

    /// Where the first barista replica listens (others take free ports).
    #[arg(long, default_value = brewmesh_runtime::defaults::BARISTA_ADDR)]
    barista_listen: SocketAddr,

    /// Where the gateway listens.
    #[arg(long, default_value = brewmesh_runtime::defaults::GATEWAY_ADDR)]
    gateway_listen: SocketAddr,

    /// Registry replicas to run.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=16))]
    registry_replicas: u8,

    /// Payment replicas to run (they share one database).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=16))]
    payment_replicas: u8,

    /// Barista replicas to run (they share one database).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=16))]
    barista_replicas: u8,

    /// An extra flag for every registry replica, e.g. `--registry-arg=--default-ttl=5s`.
    #[arg(long, allow_hyphen_values = true)]
    registry_arg: Vec<String>,

    /// An extra flag for the payment service, e.g. `--payment-arg=--processing-delay=1s`.
    #[arg(long, allow_hyphen_values = true)]
    payment_arg: Vec<String>,

    /// An extra flag for the barista service, e.g. `--barista-arg=--espresso-machines=4`.
    #[arg(long, allow_hyphen_values = true)]
    barista_arg: Vec<String>,

    /// An extra flag for the gateway, e.g. `--gateway-arg=--timeout=5s`.
    #[arg(long, allow_hyphen_values = true)]
    gateway_arg: Vec<String>,

    /// How long each role may drain before it is killed.
    #[arg(long, default_value = "15s", value_parser = brewmesh_runtime::server::parse_duration)]
    drain_timeout: Duration,
}

/// One child process running a role.
struct Instance {
    label: String,
    pid: u32,
    addr: SocketAddr,
    /// How the process exited, once it has.
    exited: watch::Receiver<Option<String>>,
}

/// Runs the mesh until Ctrl-C/SIGTERM or until a role dies.
pub async fn run(args: Args, format: LogFormat) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the brewmesh executable")?;
    let (lines_tx, lines_rx) = mpsc::channel::<String>(1024);
    let (exits_tx, mut exits) = mpsc::channel(4);
    let printer = tokio::spawn(print_lines(lines_rx));
    let drain = format!("{}ms", args.drain_timeout.as_millis());
    let signal = tokio::spawn(brewmesh_runtime::shutdown::wait_for_signal());

    // A fresh token per run, handed to the children through the
    // environment (never on a command line, where `ps` would show it).
    let token = random_token().context("making the registry token")?;
    let ready_dir = args.data_dir.join("ready");
    std::fs::create_dir_all(&ready_dir)
        .with_context(|| format!("creating {}", ready_dir.display()))?;
    let launch = Launch {
        exe,
        env: [("BREWMESH_REGISTRY_TOKEN", token.as_str())],
        format,
        lines: lines_tx.clone(),
        exits: exits_tx,
        ready_dir,
    };
    let mut instances = Vec::new();
    let started = async {
        // The registry first: the others register with every replica.
        let mut registries = Vec::new();
        for n in 1..=args.registry_replicas {
            let listen = if n == 1 {
                args.registry_listen
            } else {
                any_port()
            };
            let mut role = vec!["registry".to_owned()];
            role.extend(flag("--listen", listen));
            role.extend(flag("--drain-timeout", &drain));
            role.extend(args.registry_arg.iter().cloned());
            let instance = start(&launch, &format!("registry-{n}"), &role).await?;
            registries.push(instance.addr.to_string());
            instances.push(instance);
        }
        let registry = registries.join(",");

        // Then payment, then the barista that calls it; replicas of a role
        // share its database.
        let roles = [
            (
                "payment",
                args.payment_replicas,
                args.payment_listen,
                &args.payment_arg,
            ),
            (
                "barista",
                args.barista_replicas,
                args.barista_listen,
                &args.barista_arg,
            ),
        ];
        for (name, replicas, first, extra) in roles {
            for n in 1..=replicas {
                let listen = if n == 1 { first } else { any_port() };
                let mut role = vec![name.to_owned()];
                role.extend(flag("--listen", listen));
                role.extend(flag("--data-dir", args.data_dir.join(name).display()));
                role.extend(flag("--drain-timeout", &drain));
                role.extend(flag("--registry", &registry));
                role.extend(extra.iter().cloned());
                let label = format!("{name}-{n}");
                instances.push(start(&launch, &label, &role).await?);
            }
        }

        // The gateway last: it finds the services through the registry.
        let mut role = vec!["gateway".to_owned()];
        role.extend(flag("--listen", args.gateway_listen));
        role.extend(flag("--drain-timeout", &drain));
        role.extend(flag("--registry", &registry));
        role.extend(args.gateway_arg.iter().cloned());
        instances.push(start(&launch, "gateway", &role).await?);
        anyhow::Ok(())
    };
    let outcome = match started.await {
        Ok(()) => {
            print_banner(&instances);
            ready(&instances)?;
            wait_for_stop(&mut exits, signal).await
        }
        Err(error) => Err(error),
    };

    // Callers first: the barista's sagas still need payment while draining,
    // and everyone deregisters before the registry goes.
    for instance in instances.iter_mut().rev() {
        stop(instance, args.drain_timeout + Duration::from_secs(5)).await;
    }
    drop(launch);
    drop(lines_tx);
    let _ = printer.await;
    outcome
}

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// 128 random bits, in hex.
fn random_token() -> std::io::Result<String> {
    use std::io::Read as _;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(brewmesh_runtime::idempotency::to_hex(&bytes))
}

fn flag(name: &str, value: impl std::fmt::Display) -> [String; 2] {
    [name.to_owned(), value.to_string()]
}

/// What every child is started with.
struct Launch<'a> {
    exe: PathBuf,
    env: [(&'a str, &'a str); 1],
    format: LogFormat,
    /// Where their lines go.
    lines: mpsc::Sender<String>,
    /// Where their exits are told.
    exits: mpsc::Sender<(String, String)>,
    /// Where their ready files are written.
    ready_dir: PathBuf,
}

/// Starts `brewmesh <args>` and waits for its ready file.
async fn start(launch: &Launch<'_>, label: &str, args: &[String]) -> anyhow::Result<Instance> {
    let Launch {
        exe,
        env,
        format,
        lines,
        exits,
        ready_dir,
    } = launch;
    let format = *format;
    let ready = ready_dir.join(format!("{label}.json"));
    match std::fs::remove_file(&ready) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            return Err(error).with_context(|| format!("removing {}", ready.display()));
        }
        _ => {}
    }
    let mut child = Command::new(exe)
        .args(["--log-format", "json"])
        .arg("--ready-file")
        .arg(&ready)
        .args(args)
        .envs(env.iter().copied())
        // Each child its own name in traces and logs, whatever `up` got.
        .env(
            "OTEL_SERVICE_NAME",
            args.first().map_or("brewmesh", String::as_str),
        )
        .env("BREWMESH_INSTANCE", label)
        // The child drains and exits when this pipe closes, which happens
        // however `up` ends, even by SIGKILL: no orphans.
        .env(brewmesh_runtime::shutdown::EXIT_WITH_PARENT, "1")
        .env_remove("BREWMESH_READY_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {label}"))?;
    // Held open (and never written) for the child's lifetime.
    let stdin = child.stdin.take().context("child stdin")?;
    let stdout = child.stdout.take().context("child stdout")?;
    let stderr = child.stderr.take().context("child stderr")?;
    tokio::spawn(relay(stdout, label.to_owned(), format, lines.clone()));
    tokio::spawn(relay(stderr, label.to_owned(), format, lines.clone()));

    let pid = child.id().context("a just-started child has a pid")?;
    // The watcher owns the child: it reaps it, says how it exited, and kills
    // it (kill_on_drop) if `up` itself goes away.
    let (exited_tx, mut exited) = watch::channel(None);
    let (watcher_label, watcher_exits) = (label.to_owned(), exits.clone());
    tokio::spawn(async move {
        let _stdin = stdin;
        let status = match child.wait().await {
            Ok(status) => status.to_string(),
            Err(error) => error.to_string(),
        };
        let _ = exited_tx.send(Some(status.clone()));
        let _ = watcher_exits.send((watcher_label, status)).await;
    });

    let addr = tokio::select! {
        addr = ready_addr(&ready) => Some(addr),
        status = exited.wait_for(Option::is_some) => {
            let status = status.map(|s| s.clone().unwrap_or_default()).unwrap_or_default();
            bail!("{label} exited before serving ({status})")
        }
        () = tokio::time::sleep(START_TIMEOUT) => None,
    };
    let Some(addr) = addr else {
        stop_process(label, pid, &mut exited, Duration::ZERO).await;
        bail!("{label} did not start serving within {START_TIMEOUT:?}")
    };
    Ok(Instance {
        label: label.to_owned(),
        pid,
        addr,
        exited,
    })
}

/// The address in the ready file at `path`, once it is written.
async fn ready_addr(path: &std::path::Path) -> SocketAddr {
    loop {
        let addr = brewmesh_runtime::ready::read(path)
            .and_then(|ready| ready["addr"].as_str().and_then(|a| a.parse().ok()));
        if let Some(addr) = addr {
            return addr;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads a child's output, labels each line and sends it on.
async fn relay(
    output: impl AsyncRead + Unpin,
    label: String,
    format: LogFormat,
    lines: mpsc::Sender<String>,
) {
    let mut reader = BufReader::new(output).lines();
    while let Ok(Some(line)) = reader.next_line().await {
        let parsed = serde_json::from_str::<Value>(&line).ok();
        let mut object = match parsed {
            Some(Value::Object(object)) => object,
            _ => Map::from_iter([("message".to_owned(), Value::String(line))]),
        };
        object.insert("instance".to_owned(), Value::String(label.clone()));
        let out = match format {
            LogFormat::Json => Value::Object(object).to_string(),
            LogFormat::Text => text_line(&object),
        };
        if lines.send(out).await.is_err() {
            return;
        }
    }
}

/// `12:00:01.234 payment-1  INFO payment authorize payment_id=…`
fn text_line(object: &Map<String, Value>) -> String {
    let field = |name: &str| object.get(name).and_then(Value::as_str).unwrap_or("");
    let time = field("timestamp").get(11..23).unwrap_or("");
    let mut line = format!(
        "{time} {:<10} {:>5} {}",
        field("instance"),
        field("level"),
        field("message")
    );
    for (key, value) in object {
        if matches!(
            key.as_str(),
            "timestamp" | "level" | "target" | "message" | "instance" | "service" | "span_id"
        ) {
            continue;
        }
        match value {
            Value::String(text) => line.push_str(&format!(" {key}={text}")),
            other => line.push_str(&format!(" {key}={other}")),
        }
    }
    line
}

async fn print_lines(mut lines: mpsc::Receiver<String>) {
    use std::io::Write as _;
    let stdout = std::io::stdout();
    while let Some(line) = lines.recv().await {
        let mut out = stdout.lock();
        // A closed stdout (`| head`) must not stop the mesh.
        let _ = writeln!(out, "{line}");
    }
}

/// `up`'s own ready file, when asked for: the gateway's address, and every
/// instance's by label.
fn ready(instances: &[Instance]) -> anyhow::Result<()> {
    let gateway = instances
        .iter()
        .find(|i| i.label == "gateway")
        .context("the gateway is started last")?;
    let listing: Map<String, Value> = instances
        .iter()
        .map(|i| (i.label.clone(), Value::String(i.addr.to_string())))
        .collect();
    brewmesh_runtime::ready::announce(gateway.addr, serde_json::json!({ "instances": listing }))
        .context("writing the ready file")
}

fn print_banner(instances: &[Instance]) {
    let first = |prefix: &str| {
        instances
            .iter()
            .find(|i| i.label.starts_with(prefix))
            .map(|i| i.addr.to_string())
            .unwrap_or_default()
    };
    let (payment, barista, registry, gateway) = (
        first("payment"),
        first("barista"),
        first("registry"),
        first("gateway"),
    );
    let mut listing = String::new();
    for instance in instances {
        listing.push_str(&format!("  {:<11} {}\n", instance.label, instance.addr));
    }
    eprintln!(
        "\nbrewmesh is up (Ctrl-C stops it):\n{listing}\n\
         Try:\n  \
           curl -s {gateway}/v1/menu\n  \
           curl -s -XPOST {gateway}/v1/orders -d '{{\"idempotencyKey\":\"order-1\",\"itemId\":\"latte\",\"customerName\":\"Ada\",\"cardToken\":\"tok_visa\"}}'\n  \
           curl -sN {gateway}/v1/orders/ORDER_ID:watch\n  \
           grpcurl -plaintext {barista} list\n  \
           grpcurl -plaintext -d '{{\"idempotency_key\":\"order-1\",\"item_id\":\"latte\",\"customer_name\":\"Ada\",\"card_token\":\"tok_visa\"}}' {barista} brewmesh.barista.v1.Barista/PlaceOrder\n  \
           grpcurl -plaintext -d '{{\"order_id\":\"ORDER_ID\"}}' {barista} brewmesh.barista.v1.Barista/WatchOrder\n  \
           grpcurl -plaintext -d '{{\"payment_id\":\"PAYMENT_ID\"}}' {payment} brewmesh.payment.v1.Payments/GetPayment\n  \
           grpcurl -plaintext {registry} brewmesh.registry.v1.Registry/ListServices\n"
    );
}

/// Waits for a signal (a clean stop) or for a role to die (an error).
async fn wait_for_stop(
    exits: &mut mpsc::Receiver<(String, String)>,
    signal: tokio::task::JoinHandle<&'static str>,
) -> anyhow::Result<()> {
    tokio::select! {
        name = signal => {
            eprintln!("\n{} received: stopping the mesh", name.unwrap_or("signal"));
            Ok(())
        }
        Some((label, status)) = exits.recv() => bail!("{label} exited unexpectedly ({status}); stopping the mesh"),
    }
}

/// SIGTERM, then SIGKILL if the role is still running after `grace`.
async fn stop(instance: &mut Instance, grace: Duration) {
    stop_process(&instance.label, instance.pid, &mut instance.exited, grace).await;
}

async fn stop_process(
    label: &str,
    pid: u32,
    exited: &mut watch::Receiver<Option<String>>,
    grace: Duration,
) {
    if exited.borrow().is_some() {
        return;
    }
    let signal = |signal| {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    };
    signal(Signal::SIGTERM);
    let stopped = tokio::time::timeout(grace, exited.wait_for(Option::is_some))
        .await
        .is_ok();
    if !stopped {
        eprintln!("{label} did not stop within {grace:?}: killing it");
        signal(Signal::SIGKILL);
        let _ = exited.wait_for(Option::is_some).await;
    }
}
