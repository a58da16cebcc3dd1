//! The cache of GET answers that are safe to cache (the menu): by path and
//! query, for a per-method TTL, with strong ETags so clients can revalidate
//! with `If-None-Match`. In process by default; in Redis, shared by every
//! gateway replica, when `--redis-url` is set — an in-process cache per
//! replica would answer differently replica to replica once scaled out.

use std::collections::HashMap;
use std::hash::{Hash as _, Hasher as _};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::ConnectionManager;

/// How long a request waits for Redis before going to the backend instead.
const REDIS_TIMEOUT: Duration = Duration::from_millis(250);

/// Where answers are kept.
pub enum Store {
    /// In this process.
    Local(Cache),
    /// In Redis, shared.
    Shared(Shared),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Local(_) => f.write_str("Store::Local"),
            Store::Shared(_) => f.write_str("Store::Shared"),
        }
    }
}

impl Store {
    /// The fresh answer under `key`, if any.
    pub async fn get(&self, key: &str) -> Option<Entry> {
        match self {
            Store::Local(cache) => cache.get(key, Instant::now()),
            Store::Shared(shared) => shared.get(key).await,
        }
    }

    /// Keeps `body` under `key` for `ttl`; the entry to answer with.
    pub async fn put(&self, key: String, body: Bytes, ttl: Duration) -> Entry {
        match self {
            Store::Local(cache) => cache.put(key, body, ttl, Instant::now()),
            Store::Shared(shared) => shared.put(&key, body, ttl).await,
        }
    }
}

/// Why the shared cache could not be reached at start.
#[derive(Debug, thiserror::Error)]
#[error("the shared cache at {url}: {reason}")]
pub struct SharedError {
    url: String,
    reason: String,
}

/// Answers in Redis: `<prefix><key>` holds the ETag, a newline and the
/// body, and expires with the TTL (`SET … PX`). A Redis that fails or is
/// slow is a miss, never an error: the backend answers instead.
pub struct Shared {
    connection: ConnectionManager,
    failing: AtomicBool,
}

const PREFIX: &str = "brewmesh:gateway:";

impl Shared {
    /// Connects to `url` (`redis://host:port/db`, `redis+unix:///path`,
    /// or over TLS `rediss://host:port/db`, the server checked against the
    /// system's roots or, if given, the PEM CA certificates in `ca`).
    pub async fn connect(url: &str, ca: Option<&std::path::Path>) -> Result<Self, SharedError> {
        let fail = |reason: String| SharedError {
            url: url.to_owned(),
            reason,
        };
        let client = match ca {
            Some(ca) => {
                let root = std::fs::read(ca)
                    .map_err(|e| fail(format!("reading the CA {}: {e}", ca.display())))?;
                let certificates = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root),
                };
                redis::Client::build_with_tls(url, certificates)
            }
            None => redis::Client::open(url),
        }
        .map_err(|e| fail(e.to_string()))?;
        let connection =
            tokio::time::timeout(Duration::from_secs(5), ConnectionManager::new(client))
                .await
                .map_err(|_| fail("no answer within 5 s".to_owned()))?
                .map_err(|e| fail(e.to_string()))?;
        Ok(Self {
            connection,
            failing: AtomicBool::new(false),
        })
    }

    /// Logs a change between working and failing, once per change.
    fn outcome<T>(
        &self,
        result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Option<T> {
        let value = match result {
            Ok(Ok(value)) => Some(value),
            Ok(Err(error)) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "the shared cache fails; calling backends instead");
                }
                return None;
            }
            Err(_) => {
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(timeout = ?REDIS_TIMEOUT, "the shared cache is slow; calling backends instead");
                }
                return None;
            }
        };
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("the shared cache answers again");
        }
        value
    }

    async fn get(&self, key: &str) -> Option<Entry> {
        let mut connection = self.connection.clone();
        let full = format!("{PREFIX}{key}");
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(&full).cmd("PTTL").arg(&full);
        let query = pipe.query_async::<(Option<Vec<u8>>, i64)>(&mut connection);
        let (value, ttl_ms) = self.outcome(tokio::time::timeout(REDIS_TIMEOUT, query).await)?;
        let value = value?;
        let split = value.iter().position(|b| *b == b'\n')?;
        let etag = std::str::from_utf8(&value[..split]).ok()?.to_owned();
        let ttl = Duration::from_millis(u64::try_from(ttl_ms).ok()?);
        Some(Entry {
            body: Bytes::copy_from_slice(&value[split + 1..]),
            etag,
            expires: Instant::now() + ttl,
        })
    }

    async fn put(&self, key: &str, body: Bytes, ttl: Duration) -> Entry {
        let entry = Entry {
            etag: etag(&body),
            body,
            expires: Instant::now() + ttl,
        };
        let mut value = Vec::with_capacity(entry.etag.len() + 1 + entry.body.len());
        value.extend_from_slice(entry.etag.as_bytes());
        value.push(b'\n');
        value.extend_from_slice(&entry.body);
        let mut connection = self.connection.clone();
        let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut set = redis::cmd("SET");
        set.arg(format!("{PREFIX}{key}"))
            .arg(value)
            .arg("PX")
            .arg(millis);
        let query = set.query_async::<()>(&mut connection);
        let _ = self.outcome(tokio::time::timeout(REDIS_TIMEOUT, query).await);
        entry
    }
}

/// One cached answer.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The JSON body.
    pub body: Bytes,
    /// Its ETag, quoted.
    pub etag: String,
    /// When it stops being fresh.
    pub expires: Instant,
}

impl Entry {
    /// Seconds of freshness left, for `Cache-Control: max-age`.
    pub fn max_age(&self, now: Instant) -> u64 {
        self.expires.saturating_duration_since(now).as_secs()
    }
}

/// The strong ETag of a body.
pub fn etag(body: &[u8]) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut hasher);
    format!("\"{:016x}{:08x}\"", hasher.finish(), body.len())
}

/// Whether an `If-None-Match` header value names `etag` (or is `*`).
pub fn none_match(header: &str, etag: &str) -> bool {
    header.split(',').map(str::trim).any(|candidate| {
        candidate == "*" || candidate.strip_prefix("W/").unwrap_or(candidate) == etag
    })
}

/// Answers by key, each until it expires; bounded in entries.
#[derive(Debug)]
pub struct Cache {
    entries: Mutex<HashMap<String, Entry>>,
    capacity: usize,
}

impl Cache {
    /// A cache of at most `capacity` answers.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    /// The fresh answer under `key`.
    pub fn get(&self, key: &str, now: Instant) -> Option<Entry> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.get(key).filter(|e| e.expires > now).cloned()
    }

    /// Stores `body` under `key` for `ttl`; returns the entry.
    pub fn put(&self, key: String, body: Bytes, ttl: Duration, now: Instant) -> Entry {
        let entry = Entry {
            etag: etag(&body),
            body,
            expires: now + ttl,
        };
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.capacity {
            entries.retain(|_, e| e.expires > now);
            if entries.len() >= self.capacity {
                // Still full of fresh answers: start over rather than grow.
                entries.clear();
            }
        }
        entries.insert(key, entry.clone());
        entry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_served_until_it_expires() {
        let cache = Cache::new(4);
        let now = Instant::now();
        cache.put(
            "k".into(),
            Bytes::from_static(b"{}"),
            Duration::from_secs(5),
            now,
        );
        assert!(cache.get("k", now + Duration::from_secs(4)).is_some());
        assert!(cache.get("k", now + Duration::from_secs(5)).is_none());
        assert!(cache.get("other", now).is_none());
    }

    #[test]
    fn a_full_cache_drops_expired_entries_first() {
        let cache = Cache::new(2);
        let now = Instant::now();
        cache.put("old".into(), Bytes::new(), Duration::from_secs(1), now);
        cache.put("fresh".into(), Bytes::new(), Duration::from_secs(60), now);
        let later = now + Duration::from_secs(2);
        cache.put("new".into(), Bytes::new(), Duration::from_secs(60), later);
        assert!(cache.get("fresh", later).is_some());
        assert!(cache.get("new", later).is_some());
    }

    #[test]
    fn if_none_match_accepts_lists_weak_tags_and_star() {
        let tag = etag(b"menu");
        assert!(none_match(&tag, &tag));
        assert!(none_match(&format!("\"x\", W/{tag}"), &tag));
        assert!(none_match("*", &tag));
        assert!(!none_match("\"x\"", &tag));
        assert_ne!(etag(b"menu"), etag(b"menu2"));
    }
}
