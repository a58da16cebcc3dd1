//! A throwaway certificate authority for one machine's mesh (`brewmesh
//! up`): a CA kept in the data directory, and a certificate per instance
//! written as cert-manager writes a Secret (`tls.crt`, `tls.key`,
//! `ca.crt`). On Kubernetes the Secrets come from cert-manager instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::identity::{Identity, TRUST_DOMAIN};

/// Why a certificate could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// rcgen refused (a name it cannot encode, ...).
    #[error("making the certificate")]
    Rcgen(#[from] rcgen::Error),
    /// Reading or writing the files.
    #[error("writing the certificate files")]
    Io(#[from] std::io::Error),
    /// The role is not a valid SPIFFE path segment.
    #[error("{0:?} is not a role (lowercase letters, digits and `-`)")]
    Role(String),
}

/// The mesh's CA: its key signs every instance's certificate.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority").finish_non_exhaustive()
    }
}

/// How long an issued certificate lasts; `up` issues new ones at every
/// start.
const LEAF_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long the CA lasts.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Clocks of one machine's processes agree; a little slack for others.
const BACKDATE: Duration = Duration::from_secs(3600);

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "brewmesh");
    name.push(DnType::CommonName, format!("{TRUST_DOMAIN} CA"));
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + CA_LIFETIME).into();
    params
}

impl Authority {
    /// A new CA, in memory.
    pub fn create() -> Result<Authority, IssueError> {
        let key = KeyPair::generate()?;
        let params = ca_params();
        let pem = params.self_signed(&key)?.pem();
        Ok(Authority {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// The CA kept in `dir` (`ca.crt`, `ca.key`), made there first if it
    /// is not.
    pub fn load_or_create(dir: &Path) -> Result<Authority, IssueError> {
        let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
        if crt.exists() && key.exists() {
            let pem = std::fs::read_to_string(&crt)?;
            let key = KeyPair::from_pem(&std::fs::read_to_string(&key)?)?;
            // The subject is always the same, so a certificate issued now
            // names the CA in that file as its issuer.
            return Ok(Authority {
                issuer: Issuer::new(ca_params(), key),
                pem,
            });
        }
        let authority = Authority::create()?;
        private_dir(dir)?;
        write_private(&key, &authority.issuer.key().serialize_pem())?;
        write_private(&crt, &authority.pem)?;
        Ok(authority)
    }

    /// The CA's certificate, PEM.
    pub fn certificate_pem(&self) -> &str {
        &self.pem
    }

    /// Writes a certificate for `role` into `dir` (`tls.crt`, `tls.key`,
    /// `ca.crt`; the directory 0700, the files 0600), each file replaced
    /// whole. Valid for 127.0.0.1, ::1 and localhost too, so grpcurl and
    /// curl can check it by name.
    pub fn issue(&self, role: &str, dir: &Path) -> Result<(), IssueError> {
        self.issue_with_ca(role, dir, &self.pem)
    }

    /// [`Authority::issue`] with `ca_bundle` as the `ca.crt` written (the
    /// old CA and this one, during a rotation).
    pub fn issue_with_ca(&self, role: &str, dir: &Path, ca_bundle: &str) -> Result<(), IssueError> {
        let identity = Identity::of_role(role).ok_or_else(|| IssueError::Role(role.to_owned()))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, "brewmesh");
        name.push(DnType::CommonName, role);
        params.distinguished_name = name;
        params.subject_alt_names = vec![
            SanType::URI(identity.uri().try_into()?),
            SanType::DnsName("localhost".try_into()?),
            SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + LEAF_LIFETIME).into();
        let key = KeyPair::generate()?;
        let certificate = params.signed_by(&key, &self.issuer)?;
        private_dir(dir)?;
        // The key first: a reader that sees the new certificate with the
        // old key refuses the pair and keeps what it had until both match.
        write_private(&dir.join("tls.key"), &key.serialize_pem())?;
        write_private(&dir.join("tls.crt"), &certificate.pem())?;
        write_private(&dir.join("ca.crt"), ca_bundle)?;
        Ok(())
    }
}

/// `dir`, made if missing, readable by its owner only.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Writes `path` whole, mode 0600.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    crate::files::write_whole(path, text.as_bytes(), 0o600)
}
