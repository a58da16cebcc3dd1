//! Real `brewmesh` processes for tests: started on port 0, found by their
//! "serving" log line, killed when dropped.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a process may take to start serving or to exit.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A running `brewmesh` process.
pub struct Process {
    child: Child,
    /// The address of its first "serving" line.
    pub addr: SocketAddr,
    /// Every line it wrote to stdout so far.
    pub lines: Arc<Mutex<Vec<String>>>,
    /// Addresses of every "serving" line, by instance label (for `up`).
    pub serving: Arc<Mutex<Vec<(String, SocketAddr)>>>,
}

impl Process {
    /// Runs `brewmesh --log-format json <args>` and waits until it serves
    /// `expected_servers` times (2 for `up`).
    pub fn start(args: &[&str], expected_servers: usize) -> Process {
        Process::start_with_env(args, expected_servers, &[])
    }

    /// [`Process::start`] with extra environment variables.
    pub fn start_with_env(args: &[&str], expected_servers: usize, env: &[(&str, &str)]) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_brewmesh"))
            .args(["--log-format", "json"])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting brewmesh");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let serving = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let (lines, serving) = (Arc::clone(&lines), Arc::clone(&serving));
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line)
                        && value["message"] == "serving"
                    {
                        let addr: SocketAddr = value["addr"]
                            .as_str()
                            .and_then(|a| a.parse().ok())
                            .expect("serving line has addr");
                        let instance = value["instance"].as_str().unwrap_or("").to_owned();
                        serving.lock().unwrap().push((instance, addr));
                        let _ = tx.send(addr);
                    }
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let mut first = None;
        for _ in 0..expected_servers {
            let addr = rx
                .recv_timeout(PATIENCE)
                .expect("brewmesh starts serving in time");
            first.get_or_insert(addr);
        }
        Process {
            child,
            addr: first.expect("at least one server"),
            lines,
            serving,
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
        Process::start(&all, 1)
    }

    /// The arguments of `brewmesh up` with every role on a free port of
    /// 127.0.0.1 and its data in `dir`, then `extra`.
    pub fn up_args(dir: &std::path::Path, extra: &[&str]) -> Vec<String> {
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

    /// The address an instance of `up` serves on.
    pub fn instance(&self, label: &str) -> SocketAddr {
        self.serving
            .lock()
            .unwrap()
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, a)| *a)
            .expect("instance is serving")
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
