//! An identity directory (`tls.crt`, `tls.key`, `ca.crt`) read into
//! rustls configurations, again when its files change; and the process's
//! identity, installed once.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, ServerConfig, SignatureScheme};

use super::identity::{Identity, TRUST_DOMAIN};

/// Why an identity directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing or unreadable.
    #[error("reading {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no PEM item of the kind it should.
    #[error("{path} holds no {what}")]
    Missing {
        /// The file.
        path: PathBuf,
        /// A certificate, a private key.
        what: &'static str,
    },
    /// The certificate names no `spiffe://brewmesh.local/<role>`.
    #[error("{path} carries no spiffe://{TRUST_DOMAIN}/<role> URI SAN")]
    NoIdentity {
        /// The certificate.
        path: PathBuf,
    },
    /// rustls refused the material (a key that does not match, ...).
    #[error("building the TLS configuration")]
    Rustls(#[from] rustls::Error),
    /// The CA bundle could not make a client verifier.
    #[error("building the peer verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The three files' change stamps.
type Stamp = [Option<(SystemTime, u64)>; 3];

/// One loaded identity directory.
struct Material {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    identity: Identity,
    stamp: Stamp,
}

/// This process's identity and the mesh's CA, from a directory, reloaded
/// when its files change.
pub struct MeshTls {
    dir: PathBuf,
    current: RwLock<Arc<Material>>,
    /// The stamp of a set that did not load: not read (or warned of) again
    /// at every connection until the files change once more.
    refused: std::sync::Mutex<Option<Stamp>>,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls")
            .field("dir", &self.dir)
            .field("identity", &self.identity())
            .finish()
    }
}

const FILES: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];

impl MeshTls {
    /// Reads `dir` (`tls.crt`, `tls.key`, `ca.crt`).
    pub fn load(dir: &Path) -> Result<Arc<MeshTls>, TlsError> {
        let material = Material::read(dir, stamp(dir))?;
        Ok(Arc::new(MeshTls {
            dir: dir.to_owned(),
            current: RwLock::new(Arc::new(material)),
            refused: std::sync::Mutex::new(None),
        }))
    }

    /// This process's identity (as of the last good read).
    pub fn identity(&self) -> Identity {
        self.material().identity.clone()
    }

    /// The material for a new connection: read again first if the files
    /// changed since; a set that does not load keeps the last good one.
    fn fresh(&self) -> Arc<Material> {
        let current = self.material();
        let stamp = stamp(&self.dir);
        if stamp == current.stamp {
            return current;
        }
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        if *refused == Some(stamp) {
            return current;
        }
        match Material::read(&self.dir, stamp) {
            Ok(material) => {
                *refused = None;
                tracing::info!(dir = %self.dir.display(), identity = %material.identity, "certificates reloaded");
                let material = Arc::new(material);
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::clone(&material);
                material
            }
            Err(error) => {
                tracing::warn!(
                    dir = %self.dir.display(),
                    error = anyhow_like(&error),
                    "the certificates changed but do not load; keeping the last good ones"
                );
                *refused = Some(stamp);
                current
            }
        }
    }

    /// The server side's configuration, for a new connection.
    pub(super) fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.fresh().server)
    }

    /// The client side's configuration, for a new connection.
    pub(super) fn client_config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.fresh().client)
    }

    fn material(&self) -> Arc<Material> {
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// An error and its causes, `: `-separated.
fn anyhow_like(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn stamp(dir: &Path) -> Stamp {
    FILES.map(|name| {
        let meta = std::fs::metadata(dir.join(name)).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    })
}

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read(path)?;
    let found: Vec<_> = CertificateDer::pem_slice_iter(&text)
        .filter_map(Result::ok)
        .collect();
    if found.is_empty() {
        return Err(TlsError::Missing {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(found)
}

impl Material {
    /// Reads `dir`, whose files had `stamp` just before (taken first: files
    /// changed while being read are read again at the next connection).
    fn read(dir: &Path, stamp: Stamp) -> Result<Material, TlsError> {
        let chain = certificates(&dir.join("tls.crt"))?;
        let key_path = dir.join("tls.key");
        let key =
            PrivateKeyDer::from_pem_slice(&read(&key_path)?).map_err(|_| TlsError::Missing {
                path: key_path.clone(),
                what: "private key",
            })?;
        let mut roots = RootCertStore::empty();
        // A bundle: during a CA rotation it holds the old CA and the new.
        for ca in certificates(&dir.join("ca.crt"))? {
            roots.add(ca)?;
        }
        let roots = Arc::new(roots);
        let identity = Identity::of_certificate(&chain[0]).ok_or_else(|| TlsError::NoIdentity {
            path: dir.join("tls.crt"),
        })?;

        let versions = [&rustls::version::TLS13];
        let clients = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider())
            // Checked per call instead (Access): UNAUTHENTICATED says more
            // than a failed handshake, and health stays answerable.
            .allow_unauthenticated()
            .build()?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&versions)?
            .with_client_cert_verifier(clients)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(MeshServers { roots }))
            .with_client_auth_cert(chain, key)?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Material {
            server: Arc::new(server),
            client: Arc::new(client),
            identity,
            stamp,
        })
    }
}

/// A server is one of the mesh's when its chain leads to the mesh's CA
/// and its certificate carries a brewmesh identity; the address it was
/// dialled by is not a name it could be checked against.
#[derive(Debug)]
struct MeshServers {
    roots: Arc<RootCertStore>,
}

impl ServerCertVerifier for MeshServers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            provider().signature_verification_algorithms.all,
        )?;
        match Identity::of_certificate(end_entity) {
            Some(_) => Ok(ServerCertVerified::assertion()),
            None => Err(rustls::Error::General(format!(
                "the server's certificate carries no spiffe://{TRUST_DOMAIN}/ identity"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

static INSTALLED: OnceLock<Arc<MeshTls>> = OnceLock::new();

/// Makes `tls` this process's identity, for every server it runs and
/// every channel it opens from now on. Once per process; a second call is
/// ignored.
pub fn install(tls: Arc<MeshTls>) {
    let _ = INSTALLED.set(tls);
}

/// This process's identity, if it has one ([`install`]).
pub fn installed() -> Option<&'static Arc<MeshTls>> {
    INSTALLED.get()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mtls::issue::Authority;

    #[test]
    fn an_issued_certificate_carries_its_role_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::create().unwrap();
        authority.issue("barista", dir.path()).unwrap();
        let tls = MeshTls::load(dir.path()).unwrap();
        assert_eq!(tls.identity().role(), "barista");
        assert_eq!(tls.identity().uri(), "spiffe://brewmesh.local/barista");
    }

    #[test]
    fn a_changed_directory_is_read_again_and_a_broken_one_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let authority = Authority::create().unwrap();
        authority.issue("barista", dir.path()).unwrap();
        let tls = MeshTls::load(dir.path()).unwrap();
        authority.issue("payment", dir.path()).unwrap();
        assert_eq!(tls.fresh().identity.role(), "payment");
        std::fs::write(dir.path().join("tls.key"), "not a key").unwrap();
        assert_eq!(tls.fresh().identity.role(), "payment");
    }
}
