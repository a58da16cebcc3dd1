//! A token issuer for a laptop: an Ed25519 key kept in a directory, its
//! JSON Web Key Set beside it (what `--jwks` reads), and bearer JWTs
//! signed with it. `brewmesh up` runs one under its data directory so the
//! demo has working tokens; `brewmesh token` mints more. In production an
//! OIDC provider issues the tokens and the gateway reads its JWKS.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use brewmesh_runtime::files::write_whole;

/// The `iss` of its tokens.
pub const ISSUER: &str = "brewmesh-up";

/// The `aud` of its tokens.
pub const AUDIENCE: &str = "brewmesh";

/// Why the issuer cannot work.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The key could not be made, read or used.
    #[error("the signing key: {0}")]
    Key(String),
}

/// The key in a directory: `signing.key` (PKCS#8 PEM, 0600) and
/// `jwks.json`.
pub struct Issuer {
    dir: PathBuf,
    kid: String,
    key: EncodingKey,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("dir", &self.dir)
            .field("kid", &self.kid)
            .finish()
    }
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    scope: &'a str,
    iat: u64,
    nbf: u64,
    exp: u64,
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Issuer {
    /// The key kept in `dir`, made there (the directory 0700) if there is
    /// none; the JWKS is written again either way.
    pub fn load_or_create(dir: &Path) -> Result<Issuer, IssuerError> {
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| IssuerError::Io { what, path, source }
        };
        let key_file = dir.join("signing.key");
        let pair = if key_file.exists() {
            let pem = std::fs::read_to_string(&key_file).map_err(io("reading", &key_file))?;
            rcgen::KeyPair::from_pem(&pem).map_err(|e| IssuerError::Key(e.to_string()))?
        } else {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)
                .map_err(|e| IssuerError::Key(e.to_string()))?;
            std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
            {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io("restricting", dir))?;
            }
            write_whole(&key_file, pair.serialize_pem().as_bytes(), 0o600)
                .map_err(io("writing", &key_file))?;
            pair
        };
        let public = pair.public_key_raw();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(public);
        // Named by its key: a new key is a new kid.
        let kid = format!("up-{}", &x[..12]);
        let jwks = serde_json::json!({"keys": [{
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": kid, "x": x,
        }]});
        let jwks_file = dir.join("jwks.json");
        write_whole(&jwks_file, jwks.to_string().as_bytes(), 0o644)
            .map_err(io("writing", &jwks_file))?;
        Ok(Issuer {
            dir: dir.to_owned(),
            kid,
            key: EncodingKey::from_ed_der(&pair.serialize_der()),
        })
    }

    /// The JWKS file, for the gateway's `--jwks`.
    pub fn jwks(&self) -> PathBuf {
        self.dir.join("jwks.json")
    }

    /// A token for `subject` with `scopes` (space-separated), valid from
    /// now for `ttl`.
    pub fn mint(&self, subject: &str, scopes: &str, ttl: Duration) -> Result<String, IssuerError> {
        self.mint_with(subject, scopes, SystemTime::now(), ttl, AUDIENCE)
    }

    /// [`Issuer::mint`] with its start and audience given: for tests of
    /// what the gateway refuses.
    pub fn mint_with(
        &self,
        subject: &str,
        scopes: &str,
        from: SystemTime,
        ttl: Duration,
        audience: &str,
    ) -> Result<String, IssuerError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let claims = Claims {
            iss: ISSUER,
            aud: audience,
            sub: subject,
            scope: scopes,
            iat: unix(from),
            nbf: unix(from),
            exp: unix(from + ttl),
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| IssuerError::Key(e.to_string()))
    }
}
