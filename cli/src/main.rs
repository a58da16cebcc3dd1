//! The `brewmesh` binary: one subcommand per role, and `up` for the whole
//! mesh on a laptop. Only wiring lives here: flags into typed config, a
//! listener, a shutdown signal, and the role's `run`.

#![forbid(unsafe_code)]

mod audit;
mod certs;
mod load;
mod token;
mod up;

use std::future::Future;
use std::io::IsTerminal as _;
use std::net::SocketAddr;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use brewmesh_runtime::defaults::{
    BARISTA_ADDR, ESPRESSO_ADDR, GATEWAY_ADDR, MILK_ADDR, PAYMENT_ADDR, REGISTRY_ADDR,
};
use brewmesh_runtime::mtls::{MeshTls, TlsArgs, role};
use brewmesh_runtime::server::Drained;
use brewmesh_runtime::telemetry::LogFormat;

/// A gRPC coffee shop, scaled out.
#[derive(Debug, Parser)]
#[command(name = "brewmesh", version)]
struct Cli {
    /// Log lines as JSON objects or as text [default: json; for `up` on a
    /// terminal, text].
    #[arg(long, global = true, env = "BREWMESH_LOG_FORMAT")]
    log_format: Option<LogFormat>,

    /// Once serving, write this file: a JSON object with `addr` and `pid`
    /// (for `up`: the gateway's `addr` and every instance's), written
    /// whole. Scripts wait for it instead of reading logs.
    #[arg(long, global = true, env = "BREWMESH_READY_FILE")]
    ready_file: Option<std::path::PathBuf>,

    /// Whether the per-request metrics are recorded and served at
    /// `/metrics` (`off`: /metrics answers 404).
    #[arg(long, global = true, env = "BREWMESH_METRICS", default_value = "on")]
    metrics: brewmesh_runtime::metrics::Switch,

    #[command(flatten)]
    tls: TlsArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service registry (default 127.0.0.1:50051).
    Registry(brewmesh_registry::Config),
    /// Run the payment service (default 127.0.0.1:50052).
    Payment(brewmesh_payment::Config),
    /// Run the barista service (default 127.0.0.1:50053).
    Barista(brewmesh_barista::Config),
    /// Run a brewing station of its own, espresso (default 127.0.0.1:50054)
    /// or milk (127.0.0.1:50055), for baristas started with `--stations
    /// remote`.
    Station(brewmesh_station::Config),
    /// Run the REST/JSON gateway (default 127.0.0.1:8080).
    Gateway(brewmesh_gateway::Config),
    /// Serve N customers against a running mesh and report how it went.
    Load(load::Args),
    /// Run the whole mesh on 127.0.0.1 as child processes, with one log.
    Up(up::Args),
    /// Check every order against the payment ledger: exit 1 on any
    /// mismatch.
    Audit(audit::Args),
    /// Make a CA and a certificate per role (for `--tls-dir`).
    Certs(certs::Args),
    /// Print a bearer token signed by `up`'s local issuer.
    Token(token::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(path) = &cli.ready_file {
        brewmesh_runtime::ready::set_file(path.clone());
    }
    if cli.metrics == brewmesh_runtime::metrics::Switch::Off {
        brewmesh_runtime::metrics::switch_off();
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the Tokio runtime")?;
    let tls = cli.tls;
    runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => {
                anyhow::ensure!(
                    tls.tls_dir.is_none(),
                    "`up` makes its own CA and certificates (under --data-dir, in tls/); \
                     --tls-dir is for running one role"
                );
                let readable = std::io::stdout().is_terminal();
                let format = cli.log_format.unwrap_or(if readable {
                    LogFormat::Text
                } else {
                    LogFormat::Json
                });
                up::run(args, format, tls.insecure).await
            }
            Command::Certs(args) => certs::run(args),
            Command::Token(args) => token::run(args),
            Command::Load(args) => {
                client_identity(&tls)?;
                load::run(args).await
            }
            Command::Audit(args) => {
                client_identity(&tls)?;
                if !audit::run(args).await? {
                    std::process::exit(1);
                }
                Ok(())
            }
            Command::Registry(config) => {
                let addr = config.serve.listen.unwrap_or(default_addr(REGISTRY_ADDR));
                serve(
                    role::REGISTRY,
                    &tls,
                    cli.log_format,
                    addr,
                    |listener, shutdown| brewmesh_registry::run(listener, config, shutdown),
                )
                .await
            }
            Command::Payment(config) => {
                let addr = config.serve.listen.unwrap_or(default_addr(PAYMENT_ADDR));
                serve(
                    role::PAYMENT,
                    &tls,
                    cli.log_format,
                    addr,
                    |listener, shutdown| brewmesh_payment::run(listener, config, shutdown),
                )
                .await
            }
            Command::Gateway(config) => {
                anyhow::ensure!(
                    config.jwks.is_some() || config.no_auth,
                    "brewmesh gateway checks its clients' bearer tokens: pass --jwks FILE \
                     (the JSON Web Key Set of the tokens' issuer; `brewmesh up` makes one \
                     under its data directory), or --no-auth to let every client call \
                     everything"
                );
                let addr = config.listen.unwrap_or(default_addr(GATEWAY_ADDR));
                serve(
                    role::GATEWAY,
                    &tls,
                    cli.log_format,
                    addr,
                    |listener, shutdown| brewmesh_gateway::run(listener, config, shutdown),
                )
                .await
            }
            Command::Station(config) => {
                let default = match config.kind {
                    brewmesh_station::Kind::Espresso => ESPRESSO_ADDR,
                    brewmesh_station::Kind::Milk => MILK_ADDR,
                };
                let addr = config.serve.listen.unwrap_or(default_addr(default));
                serve(
                    role::STATION,
                    &tls,
                    cli.log_format,
                    addr,
                    |listener, shutdown| brewmesh_station::run(listener, config, shutdown),
                )
                .await
            }
            Command::Barista(config) => {
                let addr = config.serve.listen.unwrap_or(default_addr(BARISTA_ADDR));
                serve(
                    role::BARISTA,
                    &tls,
                    cli.log_format,
                    addr,
                    |listener, shutdown| brewmesh_barista::run(listener, config, shutdown),
                )
                .await
            }
        }
    })
}

/// Installs the identity in `--tls-dir`, which must be `role`'s; without
/// one, only `--insecure` lets a server start (plaintext, and said so).
fn server_identity(role: &str, tls: &TlsArgs) -> anyhow::Result<()> {
    let Some(dir) = &tls.tls_dir else {
        anyhow::ensure!(
            tls.insecure,
            "brewmesh {role} talks mutual TLS with its peers: pass --tls-dir DIR \
             (tls.crt, tls.key and ca.crt, as `brewmesh up` writes one per instance \
             under its data directory and cert-manager writes a Secret), or --insecure \
             for plaintext"
        );
        tracing::warn!(
            "--insecure: plaintext gRPC with no peer identities; anyone who reaches \
             this port may call every RPC"
        );
        return Ok(());
    };
    let mesh = MeshTls::load(dir).with_context(|| format!("reading {}", dir.display()))?;
    let identity = mesh.identity();
    anyhow::ensure!(
        identity.role() == role,
        "{} holds the identity {identity}, not {role}'s",
        dir.display()
    );
    tracing::info!(%identity, dir = %dir.display(), "mutual TLS");
    brewmesh_runtime::mtls::install(mesh);
    Ok(())
}

/// A client (`load`, `audit`) presents the identity in `--tls-dir` if it
/// is given one, and speaks plaintext if not.
fn client_identity(tls: &TlsArgs) -> anyhow::Result<()> {
    if let Some(dir) = &tls.tls_dir {
        let mesh = MeshTls::load(dir).with_context(|| format!("reading {}", dir.display()))?;
        brewmesh_runtime::mtls::install(mesh);
    }
    Ok(())
}

fn default_addr(addr: &str) -> SocketAddr {
    addr.parse().expect("the default addresses are valid")
}

/// Sets up logs and traces for `role`, binds `addr` and runs the role until
/// SIGTERM/SIGINT and its drain; then flushes the traces.
async fn serve<F, Fut, E>(
    role: &str,
    tls: &TlsArgs,
    log_format: Option<LogFormat>,
    addr: SocketAddr,
    run: F,
) -> anyhow::Result<()>
where
    F: FnOnce(TcpListener, CancellationToken) -> Fut,
    Fut: Future<Output = Result<Drained, E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let telemetry = brewmesh_runtime::telemetry::init(
        log_format.unwrap_or(LogFormat::Json),
        brewmesh_runtime::telemetry::Identity::of(role),
    )?;
    if let Err(error) = server_identity(role, tls) {
        tracing::error!(error = format!("{error:#}"), "no identity");
        return Err(error);
    }
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let shutdown = brewmesh_runtime::shutdown::on_signal();
    brewmesh_runtime::shutdown::exit_with_parent(&shutdown);
    match run(listener, shutdown).await {
        Ok(drained) => {
            tracing::info!(?drained, "stopped");
            // The batch exporter blocks while it flushes.
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            Ok(())
        }
        Err(error) => {
            tracing::error!(
                error = format!("{:#}", anyhow::Error::from(error)),
                "stopped on an error"
            );
            std::process::exit(1);
        }
    }
}
