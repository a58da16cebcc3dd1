//! Readiness, the contract between a role and whoever started it (`up`,
//! the tests, a script): once the listener is bound and the server runs,
//! [`serving`] logs the `serving` line (`addr`, `services`) and, when the
//! process was given `--ready-file PATH`, writes PATH — a JSON object with
//! `addr` and `pid`, written whole (to a temporary file, then renamed), so
//! a reader that sees the file sees all of it. Nobody needs to parse logs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

static READY_FILE: OnceLock<PathBuf> = OnceLock::new();

/// Where this process says it is ready; set once, at start.
pub fn set_file(path: PathBuf) {
    let _ = READY_FILE.set(path);
}

/// The role serves `services` on `addr`: the `serving` line, and the ready
/// file if one was asked for.
pub fn serving(addr: SocketAddr, services: &[&str]) {
    tracing::info!(%addr, ?services, "serving");
    if let Err(error) = announce(addr, serde_json::json!({ "services": services })) {
        tracing::error!(%error, "writing the ready file");
    }
}

/// Writes the ready file, if one was asked for: `addr`, the pid, and the
/// fields of `more` (an object).
pub fn announce(addr: SocketAddr, more: serde_json::Value) -> std::io::Result<()> {
    let Some(path) = READY_FILE.get() else {
        return Ok(());
    };
    let mut document = serde_json::json!({
        "addr": addr.to_string(),
        "pid": std::process::id(),
    });
    if let (Some(document), serde_json::Value::Object(more)) = (document.as_object_mut(), more) {
        document.extend(more);
    }
    write(path, &document)
}

/// Writes `document` to `path` whole: a reader sees all of it or nothing.
pub fn write(path: &Path, document: &serde_json::Value) -> std::io::Result<()> {
    crate::files::write_whole(path, document.to_string().as_bytes(), 0o666)
}

/// The ready file at `path`, once it is there.
pub fn read(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read(path).ok()?;
    serde_json::from_slice(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ready_file_is_read_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("barista.json");
        assert_eq!(read(&path), None);
        let document = serde_json::json!({"addr": "127.0.0.1:1", "pid": 7});
        write(&path, &document).unwrap();
        assert_eq!(read(&path), Some(document));
        assert!(!dir.path().join("barista.json.partial").exists());
    }
}
