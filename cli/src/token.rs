//! `brewmesh token`: a bearer JWT from the issuer `up` keeps under its
//! data directory (`<data-dir>/auth/`), for curl, grpcurl through the
//! gateway, or the web page. `up` writes two at every start: a
//! customer's (`auth/customer.jwt`) and the staff's (`auth/staff.jwt`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;

use brewmesh_gateway::issuer::Issuer;
use brewmesh_runtime::caller::scope;

/// The demo customer's subject and scopes.
pub const CUSTOMER: (&str, &str) = ("ada", scope::ORDERS);

/// The staff's: every order, payments and the registry.
pub const STAFF: (&str, &str) = ("staff", "orders orders:all payments registry");

/// How long `up`'s tokens last.
pub const UP_TTL: Duration = Duration::from_secs(24 * 3600);

/// `brewmesh token` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// `up`'s data directory: the key is in `<data-dir>/auth/`.
    #[arg(long, env = "BREWMESH_DATA_DIR", default_value = ".brewmesh")]
    data_dir: PathBuf,

    /// The token's `sub`: whose orders they are.
    #[arg(long, default_value = CUSTOMER.0)]
    subject: String,

    /// A scope to grant (repeat the flag): orders, orders:all, payments,
    /// registry [default: orders].
    #[arg(long = "scope")]
    scopes: Vec<String>,

    /// How long it is valid.
    #[arg(long, default_value = "24h", value_parser = brewmesh_runtime::server::parse_duration)]
    ttl: Duration,
}

/// The issuer under `data_dir`, made on first use.
pub fn issuer(data_dir: &Path) -> anyhow::Result<Issuer> {
    let dir = data_dir.join("auth");
    Issuer::load_or_create(&dir).with_context(|| format!("the token issuer in {}", dir.display()))
}

/// Prints a token.
pub fn run(args: Args) -> anyhow::Result<()> {
    let scopes = match args.scopes.is_empty() {
        true => CUSTOMER.1.to_owned(),
        false => args.scopes.join(" "),
    };
    let token = issuer(&args.data_dir)?.mint(&args.subject, &scopes, args.ttl)?;
    println!("{token}");
    Ok(())
}

/// What `up` wrote: each token's file, and the customer's token (the
/// page's link carries it).
pub struct UpTokens {
    pub customer: PathBuf,
    pub staff: PathBuf,
    pub customer_token: String,
}

/// `up`'s tokens, written to `<data-dir>/auth/{customer,staff}.jwt` (0600).
pub fn write_up_tokens(issuer: &Issuer, data_dir: &Path) -> anyhow::Result<UpTokens> {
    let dir = data_dir.join("auth");
    let write =
        |file: &str, (subject, scopes): (&str, &str)| -> anyhow::Result<(PathBuf, String)> {
            let token = issuer.mint(subject, scopes, UP_TTL)?;
            let path = dir.join(file);
            brewmesh_runtime::files::write_whole(&path, token.as_bytes(), 0o600)
                .with_context(|| format!("writing {}", path.display()))?;
            Ok((path, token))
        };
    let (customer, customer_token) = write("customer.jwt", CUSTOMER)?;
    let (staff, _) = write("staff.jwt", STAFF)?;
    Ok(UpTokens {
        customer,
        staff,
        customer_token,
    })
}
