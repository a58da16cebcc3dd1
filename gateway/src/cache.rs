//! The in-process cache of GET answers that are safe to cache (the menu):
//! by path and query, for a per-method TTL, with strong ETags so clients
//! can revalidate with `If-None-Match`.

use std::collections::HashMap;
use std::hash::{Hash as _, Hasher as _};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

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
