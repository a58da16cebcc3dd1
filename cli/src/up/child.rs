//! One child of `up`: a role started as `brewmesh <role>` with its ready
//! file, its output labelled and relayed into the one log, and stopped
//! with SIGTERM, then SIGKILL if it outlives its drain.

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

/// One child process running a role.
pub(super) struct Instance {
    /// `barista-1`.
    pub(super) label: String,
    /// Its arguments, from the role's name on.
    pub(super) role: Vec<String>,
    pub(super) pid: u32,
    /// Where it serves, from its ready file.
    pub(super) addr: SocketAddr,
    /// How the process exited, once it has.
    exited: watch::Receiver<Option<String>>,
}

/// How a child ended: its label, its pid, its exit status.
pub(super) type Exit = (String, u32, String);

/// What every child is started with.
pub(super) struct Launch<'a> {
    pub(super) exe: PathBuf,
    pub(super) env: [(&'a str, &'a str); 2],
    pub(super) format: LogFormat,
    /// Where their lines go.
    pub(super) lines: mpsc::Sender<String>,
    /// Where their exits are told.
    pub(super) exits: mpsc::Sender<Exit>,
    /// Where their ready files are written.
    pub(super) ready_dir: PathBuf,
}

/// Starts `brewmesh <args>` and waits for its ready file.
pub(super) async fn start(
    launch: &Launch<'_>,
    label: &str,
    args: &[String],
) -> anyhow::Result<Instance> {
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
        let _ = watcher_exits.send((watcher_label, pid, status)).await;
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
        role: args.to_vec(),
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

pub(super) async fn print_lines(mut lines: mpsc::Receiver<String>) {
    use std::io::Write as _;
    let stdout = std::io::stdout();
    while let Some(line) = lines.recv().await {
        let mut out = stdout.lock();
        // A closed stdout (`| head`) must not stop the mesh.
        let _ = writeln!(out, "{line}");
    }
}

/// SIGTERM, then SIGKILL if the role is still running after `grace`.
pub(super) async fn stop(instance: &mut Instance, grace: Duration) {
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
