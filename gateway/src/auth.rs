//! Who the client is: an OAuth2/OIDC bearer JWT, checked against a JWKS
//! file, and what its scopes let it call.
//!
//! Each route's method asks for a scope ([`need`]): GetMenu nothing,
//! orders [`scope::ORDERS`], payments [`scope::PAYMENTS`], the registry
//! [`scope::REGISTRY`], any other service a valid token. Which of the
//! orders a customer may see is the barista's to decide: the subject and
//! scopes go upstream as [`caller`](brewmesh_runtime::caller) metadata,
//! which the barista believes only from the gateway's certificate.
//!
//! A token is RS256/384/512, PS256/384/512, ES256/384 or EdDSA, signed by
//! a key of the set (`kid`, or the only key of its algorithm), with `sub`
//! and `exp`; `nbf`, `iss` and `aud` are checked when given or asked for,
//! with `--jwt-leeway` of clock skew. The set is read again when its file
//! changes (checked at most once a second, and at once for an unknown
//! `kid`, so a key rotation needs no restart); a set that does not parse
//! leaves the last good one in place. Verified tokens are kept until they
//! expire (at most [`CACHED_TOKENS`]), so a client that reuses its token
//! pays for one signature check.
//!
//! Refusals are RFC 6750's: 401 with `WWW-Authenticate: Bearer` for no
//! token, and `error="invalid_token"` with why for a bad one; 403 with
//! `error="insufficient_scope"` naming the scope.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, header};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::Jwk};
use tonic::metadata::{MetadataMap, MetadataValue};

use brewmesh_runtime::caller::{SCOPES, SUBJECT, scope};

/// Most verified tokens kept; when full, the cache starts over.
pub const CACHED_TOKENS: usize = 10_000;

/// Longest token read: longer ones are refused unread.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// What a method asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: anyone may call it.
    Nothing,
    /// A valid token.
    Token,
    /// A valid token with this scope.
    Scope(&'static str),
}

/// What the method `service/method` asks for.
pub fn need(service: &str, method: &str) -> Need {
    match service {
        "brewmesh.barista.v1.Barista" if method == "GetMenu" => Need::Nothing,
        "brewmesh.barista.v1.Barista" => Need::Scope(scope::ORDERS),
        "brewmesh.payment.v1.Payments" => Need::Scope(scope::PAYMENTS),
        "brewmesh.registry.v1.Registry" => Need::Scope(scope::REGISTRY),
        // The gateway's own health and reflection.
        "grpc.health.v1.Health"
        | "grpc.reflection.v1.ServerReflection"
        | "grpc.reflection.v1alpha.ServerReflection" => Need::Nothing,
        _ => Need::Token,
    }
}

/// The client a token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Its `sub`.
    pub subject: String,
    /// Its scopes, space-separated.
    pub scopes: String,
}

impl Principal {
    /// Whether it holds `scope`.
    pub fn has(&self, wanted: &str) -> bool {
        self.scopes.split_ascii_whitespace().any(|s| s == wanted)
    }

    /// Passes it upstream, as [`brewmesh_runtime::caller`] reads it.
    pub fn pass_on(&self, metadata: &mut MetadataMap) {
        if let (Ok(subject), Ok(scopes)) = (
            MetadataValue::try_from(self.subject.as_str()),
            MetadataValue::try_from(self.scopes.as_str()),
        ) {
            metadata.insert(SUBJECT, subject);
            metadata.insert(SCOPES, scopes);
        }
    }

    /// Passes it upstream in a request's own headers (the RPC protocols).
    pub fn pass_on_headers(&self, headers: &mut HeaderMap) {
        if let (Ok(subject), Ok(scopes)) = (
            HeaderValue::from_str(&self.subject),
            HeaderValue::from_str(&self.scopes),
        ) {
            headers.insert(SUBJECT, subject);
            headers.insert(SCOPES, scopes);
        }
    }
}

/// Why a client is not let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No bearer token, where one is needed: 401.
    NoToken,
    /// A token that does not check out, and why: 401.
    Invalid(String),
    /// A valid token without the scope the method needs: 403.
    Scope(&'static str),
}

impl Denied {
    /// The gRPC status: UNAUTHENTICATED or PERMISSION_DENIED, with an
    /// ErrorInfo naming the reason.
    pub fn status(&self) -> tonic::Status {
        use tonic_types::{ErrorDetails, StatusExt as _};
        let (code, reason, message, metadata) = self.parts();
        let metadata: HashMap<String, String> = metadata.into_iter().collect();
        let details = ErrorDetails::with_error_info(reason, "brewmesh", metadata);
        tonic::Status::with_error_details(code, message, details)
    }

    /// [`Denied::status`] as a JSON `google.rpc.Status`.
    pub fn json(&self) -> serde_json::Value {
        let (code, reason, message, metadata) = self.parts();
        let metadata: serde_json::Map<String, serde_json::Value> = metadata
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        serde_json::json!({
            "code": code as i32,
            "message": message,
            "details": [{
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": reason,
                "domain": "brewmesh",
                "metadata": metadata,
            }],
        })
    }

    fn parts(&self) -> (tonic::Code, &'static str, String, Vec<(String, String)>) {
        match self {
            Denied::NoToken => (
                tonic::Code::Unauthenticated,
                "TOKEN_MISSING",
                "this call needs a bearer token (Authorization: Bearer <JWT>)".to_owned(),
                vec![],
            ),
            Denied::Invalid(why) => (
                tonic::Code::Unauthenticated,
                "TOKEN_INVALID",
                format!("the bearer token is not valid: {why}"),
                vec![],
            ),
            Denied::Scope(scope) => (
                tonic::Code::PermissionDenied,
                "SCOPE_MISSING",
                format!("this call needs the {scope:?} scope, which the token does not grant"),
                vec![("scope".to_owned(), (*scope).to_owned())],
            ),
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750 §3).
    pub fn challenge(&self) -> HeaderValue {
        let text = match self {
            Denied::NoToken => "Bearer realm=\"brewmesh\"".to_owned(),
            Denied::Invalid(why) => format!(
                "Bearer realm=\"brewmesh\", error=\"invalid_token\", error_description=\"{}\"",
                why.replace(['"', '\\'], "'")
            ),
            Denied::Scope(scope) => format!(
                "Bearer realm=\"brewmesh\", error=\"insufficient_scope\", scope=\"{scope}\""
            ),
        };
        HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("Bearer"))
    }
}

/// How tokens are checked.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// The JWKS file.
    pub jwks: PathBuf,
    /// The `iss` a token must carry, if any.
    pub issuer: Option<String>,
    /// An `aud` a token must carry, if any.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
}

/// Why the key set cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The file could not be read.
    #[error("reading the JWKS {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a JWKS.
    #[error("the JWKS {path} is not a JSON Web Key Set: {why}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// One verification key.
struct Key {
    id: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// The set as last read.
struct Keys {
    /// The file's modification time and length when read.
    stamp: Option<(SystemTime, u64)>,
    keys: Vec<Key>,
}

/// A verified token, until it expires.
struct Cached {
    principal: Arc<Principal>,
    /// `exp`, in seconds since the epoch.
    expires: u64,
}

/// The gateway's token checks; `None` in [`Auth::off`], where every
/// client is anonymous and every method open.
pub struct Auth(Option<Verifier>);

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("on", &self.0.is_some())
            .finish()
    }
}

struct Verifier {
    config: AuthConfig,
    keys: RwLock<Keys>,
    /// When the file was last looked at, in ms since `epoch`.
    checked: AtomicU64,
    epoch: Instant,
    cache: Mutex<HashMap<Box<str>, Cached>>,
}

impl Auth {
    /// No checks.
    pub fn off() -> Auth {
        Auth(None)
    }

    /// Checks tokens as `config` says; the set must read now.
    pub fn new(config: AuthConfig) -> Result<Auth, KeysError> {
        let keys = read_keys(&config.jwks)?;
        if keys.keys.is_empty() {
            tracing::warn!(jwks = %config.jwks.display(), "the JWKS has no usable key: every token is refused");
        }
        Ok(Auth(Some(Verifier {
            config,
            keys: RwLock::new(keys),
            checked: AtomicU64::new(0),
            epoch: Instant::now(),
            cache: Mutex::new(HashMap::new()),
        })))
    }

    /// Whether tokens are checked.
    pub fn on(&self) -> bool {
        self.0.is_some()
    }

    /// Whether the client of `headers` may call `service/method`, and who
    /// it is when the method needs to know.
    pub fn check(
        &self,
        headers: &HeaderMap,
        service: &str,
        method: &str,
    ) -> Result<Option<Arc<Principal>>, Denied> {
        let Some(verifier) = &self.0 else {
            return Ok(None);
        };
        let need = need(service, method);
        if need == Need::Nothing {
            return Ok(None);
        }
        let token = bearer(headers)?;
        let principal = verifier.verify(token)?;
        match need {
            Need::Scope(scope) if !principal.has(scope) => Err(Denied::Scope(scope)),
            _ => Ok(Some(principal)),
        }
    }
}

/// The bearer token of `headers`.
fn bearer(headers: &HeaderMap) -> Result<&str, Denied> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(Denied::NoToken);
    };
    let text = value
        .to_str()
        .map_err(|_| Denied::Invalid("the Authorization header is not text".to_owned()))?;
    let (scheme, token) = text.split_once(' ').unwrap_or((text, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Denied::Invalid(
            "the Authorization header's scheme is not Bearer".to_owned(),
        ));
    }
    let token = token.trim();
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return Err(Denied::Invalid(format!(
            "a token has 1 to {MAX_TOKEN_BYTES} bytes"
        )));
    }
    Ok(token)
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    scope: Option<String>,
    /// Scopes as a list, as some providers (Okta, Azure AD) send them.
    #[serde(default)]
    scp: Option<Vec<String>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Verifier {
    fn verify(&self, token: &str) -> Result<Arc<Principal>, Denied> {
        self.refresh(false);
        let leeway = self.config.leeway.as_secs();
        if let Some(hit) = self.cache_lock().get(token)
            && hit.expires + leeway > now()
        {
            return Ok(Arc::clone(&hit.principal));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Denied::Invalid(format!("its header does not parse ({e})")))?;
        let claims = match self.decode(token, &header) {
            Err(Denied::Invalid(why)) if why == UNKNOWN_KEY && self.refresh(true) => {
                self.decode(token, &header)?
            }
            other => other?,
        };
        if claims.sub.is_empty() {
            return Err(Denied::Invalid("its sub is empty".to_owned()));
        }
        let scopes = match (claims.scope, claims.scp) {
            (Some(scope), _) => scope,
            (None, Some(list)) => list.join(" "),
            (None, None) => String::new(),
        };
        let principal = Arc::new(Principal {
            subject: claims.sub,
            scopes,
        });
        let mut cache = self.cache_lock();
        if cache.len() >= CACHED_TOKENS {
            cache.clear();
        }
        cache.insert(
            token.into(),
            Cached {
                principal: Arc::clone(&principal),
                expires: claims.exp,
            },
        );
        Ok(principal)
    }

    fn cache_lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Cached>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The token's claims, checked with the key its header names.
    fn decode(&self, token: &str, header: &jsonwebtoken::Header) -> Result<Claims, Denied> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let mut candidates = keys.keys.iter().filter(|k| k.algorithm == header.alg);
        let key = match &header.kid {
            Some(kid) => candidates.find(|k| k.id.as_deref() == Some(kid)),
            None => {
                let first = candidates.next();
                // Without a kid, only an unambiguous key will do.
                first.filter(|_| candidates.next().is_none())
            }
        };
        let Some(key) = key else {
            return Err(Denied::Invalid(UNKNOWN_KEY.to_owned()));
        };
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = self.config.leeway.as_secs();
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        match &self.config.issuer {
            Some(issuer) => {
                validation.set_issuer(&[issuer]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.config.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        jsonwebtoken::decode::<Claims>(token, &key.key, &validation)
            .map(|data| data.claims)
            .map_err(|error| Denied::Invalid(why(error.kind())))
    }

    /// Reads the set again if its file changed: when `now` (an unknown
    /// key), or at most once a second. Whether it was read.
    fn refresh(&self, now: bool) -> bool {
        let elapsed = self.epoch.elapsed().as_millis() as u64;
        let last = self.checked.load(Ordering::Relaxed);
        let wait = if now { 200 } else { 1000 };
        if last != 0 && elapsed.saturating_sub(last) < wait {
            return false;
        }
        if self
            .checked
            .compare_exchange(last, elapsed.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        let path = &self.config.jwks;
        let current = self.keys.read().unwrap_or_else(|p| p.into_inner()).stamp;
        let seen = stamp(path);
        if seen.is_some() && seen == current {
            return false;
        }
        match read_keys(path) {
            Ok(keys) => {
                tracing::info!(jwks = %path.display(), keys = keys.keys.len(), "JWKS read again");
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
                // A key taken out takes its tokens with it.
                self.cache_lock().clear();
                true
            }
            Err(error) => {
                tracing::warn!(%error, "the JWKS changed but does not read: the last good one stays");
                false
            }
        }
    }
}

const UNKNOWN_KEY: &str = "no key of the JWKS matches its kid and alg";

fn why(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "it has expired".to_owned(),
        ErrorKind::ImmatureSignature => "it is not valid yet (nbf)".to_owned(),
        ErrorKind::InvalidAudience => "its aud is not this gateway's audience".to_owned(),
        ErrorKind::InvalidIssuer => "its iss is not the issuer trusted here".to_owned(),
        ErrorKind::InvalidSignature => "its signature does not verify".to_owned(),
        ErrorKind::InvalidAlgorithm => "its alg does not match the key's".to_owned(),
        ErrorKind::MissingRequiredClaim(claim) => format!("it has no {claim} claim"),
        ErrorKind::Json(_) | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
            "its claims do not parse".to_owned()
        }
        other => format!("{other:?}"),
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reads the JWKS at `path`: its signing keys of a supported algorithm;
/// others (encryption keys, HMAC secrets, unknown types) are skipped.
fn read_keys(path: &Path) -> Result<Keys, KeysError> {
    let stamp = stamp(path);
    let text = std::fs::read(path).map_err(|source| KeysError::Read {
        path: path.to_owned(),
        source,
    })?;
    let parse = |why: String| KeysError::Parse {
        path: path.to_owned(),
        why,
    };
    let set: serde_json::Value = serde_json::from_slice(&text).map_err(|e| parse(e.to_string()))?;
    let Some(listed) = set.get("keys").and_then(|k| k.as_array()) else {
        return Err(parse("no \"keys\" array".to_owned()));
    };
    let mut keys = Vec::new();
    for value in listed {
        match key_of(value) {
            Ok(key) => keys.push(key),
            Err(why) => {
                tracing::warn!(jwks = %path.display(), kid = ?value.get("kid"), why, "a key of the JWKS is skipped")
            }
        }
    }
    Ok(Keys { stamp, keys })
}

fn key_of(value: &serde_json::Value) -> Result<Key, String> {
    if value.get("use").and_then(|u| u.as_str()) == Some("enc") {
        return Err("an encryption key".to_owned());
    }
    let jwk: Jwk = serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
    let text = |name: &str| value.get(name).and_then(|v| v.as_str());
    let algorithm = match (text("alg"), text("kty"), text("crv")) {
        (Some(alg), _, _) => Algorithm::from_str(alg).map_err(|_| format!("alg {alg:?}"))?,
        (None, Some("RSA"), _) => Algorithm::RS256,
        (None, Some("EC"), Some("P-256")) => Algorithm::ES256,
        (None, Some("EC"), Some("P-384")) => Algorithm::ES384,
        (None, Some("OKP"), Some("Ed25519")) => Algorithm::EdDSA,
        (None, kty, crv) => return Err(format!("no alg for kty {kty:?} crv {crv:?}")),
    };
    if matches!(
        algorithm,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    ) {
        return Err("a shared secret (HS*): only public keys are taken".to_owned());
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
    Ok(Key {
        id: jwk.common.key_id,
        algorithm,
        key,
    })
}
