//! `brewmesh up`: the mesh on 127.0.0.1 as child processes of this one —
//! registry, payment, barista and gateway, and with `--split` (or
//! `--espresso-replicas`, `--milk-replicas`) the stations as processes of
//! their own, the baristas sending every part of a drink to them.
//!
//! Each role runs as `brewmesh <role>` (the same binary), logging JSON lines
//! that this process reads, labels with the instance and writes to one
//! stream: the centralized log, on a laptop. Each role is started with
//! `--ready-file` (see `brewmesh_runtime::ready`), which tells its real
//! address, so a role started on port 0 is still found; `up`'s own ready
//! file lists them all ([`child`]). A child that dies is started again on
//! its address, with backoff, and a restart storm stops the mesh
//! ([`supervise`]). Ctrl-C (or SIGTERM) stops the roles callers first —
//! the barista drains its sagas while payment still answers — each with
//! SIGTERM, then SIGKILL if it outlives its drain.
//!
//! The roles talk mutual TLS: on first start `up` makes a CA in
//! `<data-dir>/tls/ca/` (kept), and at every start a certificate per
//! instance (`<data-dir>/tls/<label>/`, SPIFFE identity of its role) and one
//! for you (`tls/operator/`, for grpcurl and `brewmesh load --grpc`).
//! `--insecure` runs them all plaintext instead.
//!
//! The gateway checks clients' bearer tokens against a local issuer's key
//! set (`<data-dir>/auth/`, made on first start and kept; `crate::token`),
//! and `up` writes a customer's and the staff's token there at every start
//! and prints them; `--no-auth` lets every client in instead.

mod child;
mod supervise;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use brewmesh_runtime::telemetry::LogFormat;

use child::{Instance, Launch, print_lines, start, stop};

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

    /// Espresso station replicas to run as processes of their own (0: the
    /// baristas brew in their own process). With any, the baristas run
    /// `--stations remote`.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=16))]
    espresso_replicas: u8,

    /// Milk station replicas to run as processes of their own (0: in the
    /// baristas' processes, or one if there are espresso replicas).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=16))]
    milk_replicas: u8,

    /// The seed talk's last slide: payment ×2, milk ×2, espresso ×4, each a
    /// role of its own (overrides the three replica counts).
    #[arg(long)]
    split: bool,

    /// An extra flag for every station replica, e.g. `--station-arg=--machines=4`.
    #[arg(long, allow_hyphen_values = true)]
    station_arg: Vec<String>,

    /// An extra flag for every espresso station only (not also in --station-arg).
    #[arg(long, allow_hyphen_values = true)]
    espresso_arg: Vec<String>,

    /// An extra flag for every milk station only (not also in --station-arg).
    #[arg(long, allow_hyphen_values = true)]
    milk_arg: Vec<String>,

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

    /// Let every client of the gateway call everything, with no token
    /// (by default the gateway checks tokens from a local issuer kept in
    /// `<data-dir>/auth/`, and `up` prints a customer's and the staff's).
    #[arg(long)]
    no_auth: bool,

    /// How long each role may drain before it is killed.
    #[arg(long, default_value = "15s", value_parser = brewmesh_runtime::server::parse_duration)]
    drain_timeout: Duration,
}

/// Runs the mesh until Ctrl-C/SIGTERM, restarting a child that dies, or
/// until a role keeps dying.
pub async fn run(mut args: Args, format: LogFormat, insecure: bool) -> anyhow::Result<()> {
    if args.split {
        (
            args.payment_replicas,
            args.milk_replicas,
            args.espresso_replicas,
        ) = (2, 2, 4);
    }
    // Stations of their own are both kinds or neither.
    match (args.espresso_replicas, args.milk_replicas) {
        (0, 0) => {}
        (0, _) => args.espresso_replicas = 1,
        (_, 0) => args.milk_replicas = 1,
        _ => {}
    }
    let split = args.espresso_replicas > 0;
    let exe = std::env::current_exe().context("finding the brewmesh executable")?;
    let (lines_tx, lines_rx) = mpsc::channel::<String>(1024);
    let (exits_tx, mut exits) = mpsc::channel(4);
    let printer = tokio::spawn(print_lines(lines_rx));
    let drain = format!("{}ms", args.drain_timeout.as_millis());
    let mut signal = tokio::spawn(brewmesh_runtime::shutdown::wait_for_signal());

    // A fresh token per run, handed to the children through the
    // environment (never on a command line, where `ps` would show it).
    // Yours if the environment has one (to reach `/admin/faults`).
    let token = match std::env::var("BREWMESH_REGISTRY_TOKEN") {
        Ok(token) if !token.is_empty() => token,
        _ => random_token().context("making the registry token")?,
    };
    let ready_dir = args.data_dir.join("ready");
    std::fs::create_dir_all(&ready_dir)
        .with_context(|| format!("creating {}", ready_dir.display()))?;
    let identities = Identities::new(&args.data_dir, insecure)?;
    let auth = match args.no_auth {
        true => None,
        false => {
            let issuer = crate::token::issuer(&args.data_dir)?;
            let tokens = crate::token::write_up_tokens(&issuer, &args.data_dir)?;
            Some((issuer.jwks(), tokens))
        }
    };
    let launch = Launch {
        exe,
        env: [
            ("BREWMESH_REGISTRY_TOKEN", token.as_str()),
            // `up --metrics off` switches every role's off.
            (
                "BREWMESH_METRICS",
                if brewmesh_runtime::metrics::enabled() {
                    "on"
                } else {
                    "off"
                },
            ),
        ],
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
            let label = format!("registry-{n}");
            let mut role = vec!["registry".to_owned()];
            role.extend(identities.flags(&label, "registry")?);
            role.extend(flag("--listen", listen));
            role.extend(flag("--drain-timeout", &drain));
            role.extend(args.registry_arg.iter().cloned());
            let instance = start(&launch, &label, &role).await?;
            registries.push(instance.addr.to_string());
            instances.push(instance);
        }
        let registry = registries.join(",");

        // The stations, if they are processes of their own.
        let kinds = [
            ("espresso", args.espresso_replicas, &args.espresso_arg),
            ("milk", args.milk_replicas, &args.milk_arg),
        ];
        for (kind, replicas, own) in kinds {
            for n in 1..=replicas {
                let label = format!("{kind}-{n}");
                let mut role = vec!["station".to_owned()];
                role.extend(identities.flags(&label, brewmesh_runtime::mtls::role::STATION)?);
                role.extend(flag("--kind", kind));
                role.extend(flag("--listen", any_port()));
                role.extend(flag("--drain-timeout", &drain));
                role.extend(flag("--registry", &registry));
                role.extend(args.station_arg.iter().cloned());
                role.extend(own.iter().cloned());
                instances.push(start(&launch, &label, &role).await?);
            }
        }
        let mut barista_arg = args.barista_arg.clone();
        if split {
            barista_arg.extend(flag("--stations", "remote"));
        }

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
                &barista_arg,
            ),
        ];
        for (name, replicas, first, extra) in roles {
            for n in 1..=replicas {
                let listen = if n == 1 { first } else { any_port() };
                let label = format!("{name}-{n}");
                let mut role = vec![name.to_owned()];
                role.extend(identities.flags(&label, name)?);
                role.extend(flag("--listen", listen));
                role.extend(flag("--data-dir", args.data_dir.join(name).display()));
                role.extend(flag("--drain-timeout", &drain));
                role.extend(flag("--registry", &registry));
                role.extend(extra.iter().cloned());
                instances.push(start(&launch, &label, &role).await?);
            }
        }

        // The gateway last: it finds the services through the registry.
        let mut role = vec!["gateway".to_owned()];
        role.extend(identities.flags("gateway", "gateway")?);
        role.extend(flag("--listen", args.gateway_listen));
        role.extend(flag("--drain-timeout", &drain));
        role.extend(flag("--registry", &registry));
        match &auth {
            Some((jwks, _)) => {
                role.extend(flag("--jwks", jwks.display()));
                role.extend(flag("--jwt-issuer", brewmesh_gateway::issuer::ISSUER));
                role.extend(flag("--jwt-audience", brewmesh_gateway::issuer::AUDIENCE));
            }
            None => role.push("--no-auth".to_owned()),
        }
        role.extend(args.gateway_arg.iter().cloned());
        instances.push(start(&launch, "gateway", &role).await?);
        anyhow::Ok(())
    };
    let outcome = match started.await {
        Ok(()) => {
            let tokens = auth.as_ref().map(|(_, tokens)| tokens);
            print_banner(&instances, identities.operator().as_deref(), tokens);
            ready(&instances)?;
            supervise::supervise(&launch, &mut instances, &mut exits, &mut signal).await
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

/// Where each instance's certificate goes, or `--insecure`.
struct Identities {
    authority: Option<brewmesh_runtime::mtls::Authority>,
    dir: PathBuf,
}

impl Identities {
    /// The CA kept under `<data_dir>/tls/ca/` (made on first start), and
    /// the operator's certificate; none with `--insecure`.
    fn new(data_dir: &std::path::Path, insecure: bool) -> anyhow::Result<Identities> {
        let dir = data_dir.join("tls");
        if insecure {
            return Ok(Identities {
                authority: None,
                dir,
            });
        }
        let authority = brewmesh_runtime::mtls::Authority::load_or_create(&dir.join("ca"))
            .with_context(|| format!("the mesh's CA in {}", dir.join("ca").display()))?;
        let identities = Identities {
            authority: Some(authority),
            dir,
        };
        identities.flags("operator", brewmesh_runtime::mtls::role::OPERATOR)?;
        Ok(identities)
    }

    /// The flags that give instance `label` the identity of `role`: a
    /// fresh certificate in `tls/<label>/`, or `--insecure`.
    fn flags(&self, label: &str, role: &str) -> anyhow::Result<Vec<String>> {
        let Some(authority) = &self.authority else {
            return Ok(vec!["--insecure".to_owned()]);
        };
        let dir = self.dir.join(label);
        authority
            .issue(role, &dir)
            .with_context(|| format!("issuing {label}'s certificate in {}", dir.display()))?;
        Ok(flag("--tls-dir", dir.display()).to_vec())
    }

    /// The operator's certificate directory, when there is one.
    fn operator(&self) -> Option<PathBuf> {
        self.authority.as_ref().map(|_| self.dir.join("operator"))
    }
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

fn print_banner(
    instances: &[Instance],
    operator: Option<&std::path::Path>,
    tokens: Option<&crate::token::UpTokens>,
) {
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
    // grpcurl with the operator's certificate (mutual TLS), or plaintext.
    let grpcurl = match operator {
        Some(dir) => format!(
            "grpcurl -cacert {0}/ca.crt -cert {0}/tls.crt -key {0}/tls.key",
            dir.display()
        ),
        None => "grpcurl -plaintext".to_owned(),
    };
    let mut listing = String::new();
    for instance in instances {
        listing.push_str(&format!("  {:<11} {}\n", instance.label, instance.addr));
    }
    // The customer's token on every order call, the staff's on payments.
    let (page, tokens, bearer, staff) = match tokens {
        Some(written) => (
            format!("http://{gateway}/#token={}", written.customer_token),
            format!(
                "Tokens (valid 24 h; `brewmesh token` mints others):\n  \
                   TOKEN=$(cat {})   # ada, a customer: her own orders\n  \
                   STAFF=$(cat {})   # staff: every order, payments, the registry\n\n",
                written.customer.display(),
                written.staff.display()
            ),
            " -H \"Authorization: Bearer $TOKEN\"",
            " -H \"Authorization: Bearer $STAFF\"",
        ),
        None => (format!("http://{gateway}/"), String::new(), "", ""),
    };
    eprintln!(
        "\nbrewmesh is up (Ctrl-C stops it):\n{listing}\n\
         The shop's web page: {page}\n\n\
         {tokens}\
         Try:\n  \
           curl -s {gateway}/v1/menu\n  \
           curl -s{bearer} --json '{{\"idempotencyKey\":\"order-1\",\"itemId\":\"latte\",\"customerName\":\"Ada\",\"cardToken\":\"tok_visa\"}}' {gateway}/v1/orders\n  \
           curl -sN{bearer} {gateway}/v1/orders/ORDER_ID:watch\n  \
           curl -s{staff} {gateway}/v1/payments\n  \
           {grpcurl} {barista} list\n  \
           {grpcurl} -d '{{\"idempotency_key\":\"order-1\",\"item_id\":\"latte\",\"customer_name\":\"Ada\",\"card_token\":\"tok_visa\"}}' {barista} brewmesh.barista.v1.Barista/PlaceOrder\n  \
           {grpcurl} -d '{{\"order_id\":\"ORDER_ID\"}}' {barista} brewmesh.barista.v1.Barista/WatchOrder\n  \
           {grpcurl} -d '{{\"payment_id\":\"PAYMENT_ID\"}}' {payment} brewmesh.payment.v1.Payments/GetPayment\n  \
           {grpcurl} {registry} brewmesh.registry.v1.Registry/ListServices\n"
    );
}
