//! Files written whole: to a temporary file beside them, then renamed over
//! them, so a reader (a process waiting for a ready file, a server reading
//! its certificates again) sees the old contents or all of the new, never
//! part.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Writes `contents` to `path` whole, created with `mode` (less the
/// umask, as any file).
pub fn write_whole(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&partial)?
        .write_all(contents)?;
    std::fs::rename(&partial, path)
}
