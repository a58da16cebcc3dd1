//! `brewmesh certs`: a CA and one certificate per role, for running the
//! roles yourself (compose, a process manager) the way `up` runs them. The
//! CA is kept in `<dir>/ca/` and used again; each role's directory
//! (`<dir>/<role>/`: `tls.crt`, `tls.key`, `ca.crt`) is what that role's
//! `--tls-dir` takes. On Kubernetes, cert-manager issues them instead
//! (deploy/k8s/base/identity.yaml).

use std::path::PathBuf;

use anyhow::Context as _;

use brewmesh_runtime::mtls::{Authority, role};

/// `brewmesh certs` flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where the CA and the roles' directories go.
    #[arg(long, default_value = ".brewmesh/tls")]
    dir: PathBuf,

    /// Where the CA is kept [default: <dir>/ca]; elsewhere when the roles'
    /// directories are shared with them (the CA's key signs identities).
    #[arg(long)]
    ca_dir: Option<PathBuf>,

    /// The roles to issue for (repeat the flag) [default: registry,
    /// payment, barista, gateway, operator].
    #[arg(long = "role")]
    roles: Vec<String>,
}

/// Issues the certificates; prints each directory.
pub fn run(args: Args) -> anyhow::Result<()> {
    let ca = args.ca_dir.unwrap_or_else(|| args.dir.join("ca"));
    let authority =
        Authority::load_or_create(&ca).with_context(|| format!("the CA in {}", ca.display()))?;
    let roles = match args.roles.is_empty() {
        true => [
            role::REGISTRY,
            role::PAYMENT,
            role::BARISTA,
            role::GATEWAY,
            role::OPERATOR,
        ]
        .map(str::to_owned)
        .to_vec(),
        false => args.roles,
    };
    for role in &roles {
        let dir = args.dir.join(role);
        authority
            .issue(role, &dir)
            .with_context(|| format!("issuing {role}'s certificate in {}", dir.display()))?;
        println!(
            "spiffe://{}/{role}\t{}",
            brewmesh_runtime::mtls::TRUST_DOMAIN,
            dir.display()
        );
    }
    Ok(())
}
