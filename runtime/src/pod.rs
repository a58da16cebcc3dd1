//! What the pod this process runs in allows it: the memory limit of its
//! cgroup (a Kubernetes container's `resources.limits.memory`, a systemd
//! unit's `MemoryMax`, a benchmark's cgroup), so a service can size what it
//! takes on to the memory it has instead of being OOM-killed past it.
//!
//! Both cgroup versions: v2's `memory.max`, v1's `memory.limit_in_bytes`
//! (swap is not counted). A limit set on a parent cgroup binds its children
//! too, so the lowest on the way up to the root is the one that counts.

use std::path::{Path, PathBuf};

/// The memory limit of this process's cgroup, in bytes; `None` without one.
pub fn memory_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    memory_limit_under(&cgroups, Path::new("/sys/fs/cgroup"))
}

/// [`memory_limit`] for the cgroups `proc_cgroup` lists (the text of
/// `/proc/<pid>/cgroup`), with the cgroup filesystems mounted at `root`.
pub fn memory_limit_under(proc_cgroup: &str, root: &Path) -> Option<u64> {
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (mount, file) = if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes")
        } else if controllers.is_empty() && root.join("cgroup.controllers").exists() {
            (root.to_path_buf(), "memory.max")
        } else {
            continue;
        };
        return lowest_up_from(&mount, path, file);
    }
    None
}

/// The lowest limit in `file` from the cgroup at `path` up to the root of
/// `mount`. Inside a container the mount's root is the container's own
/// cgroup and the host's path is not there: the root's file still is.
fn lowest_up_from(mount: &Path, path: &str, file: &str) -> Option<u64> {
    let mut dir: PathBuf = mount.join(path.trim_start_matches('/'));
    let mut lowest: Option<u64> = None;
    loop {
        if let Some(limit) = std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|text| limit_of(&text))
        {
            lowest = Some(lowest.map_or(limit, |l| l.min(limit)));
        }
        if dir == mount || !dir.pop() || !dir.starts_with(mount) {
            return lowest;
        }
    }
}

/// A limit as the file says it: `max` (v2) or a number near `i64::MAX`
/// (v1's page-rounded "unlimited") mean none.
fn limit_of(text: &str) -> Option<u64> {
    let limit: u64 = text.trim().parse().ok()?;
    (limit < 1 << 60).then_some(limit)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

    use super::*;

    fn write(root: &Path, path: &str, text: &str) {
        let file = root.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, text).unwrap();
    }

    #[test]
    fn v1_takes_the_lowest_limit_up_to_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(
            root,
            "memory/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        write(root, "memory/pod/memory.limit_in_bytes", "3221225472\n");
        write(
            root,
            "memory/pod/shop/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        let cgroups = "12:cpu,cpuacct:/pod/shop\n4:memory:/pod/shop\n1:name=systemd:/\n";
        assert_eq!(memory_limit_under(cgroups, root), Some(3 << 30));
    }

    #[test]
    fn v1_unlimited_is_none() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "memory/memory.limit_in_bytes",
            "9223372036854771712\n",
        );
        assert_eq!(memory_limit_under("4:memory:/\n", dir.path()), None);
    }

    #[test]
    fn in_a_container_the_host_path_is_absent_and_the_root_counts() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "memory/memory.limit_in_bytes", "10485760\n");
        let cgroups = "4:memory:/kubepods/burstable/pod1234/abcd\n";
        assert_eq!(memory_limit_under(cgroups, dir.path()), Some(10 << 20));
    }

    #[test]
    fn v2_reads_memory_max_and_max_means_none() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "cgroup.controllers", "cpu memory\n");
        write(root, "shop/memory.max", "max\n");
        assert_eq!(memory_limit_under("0::/shop\n", root), None);
        write(root, "shop/memory.max", "268435456\n");
        assert_eq!(memory_limit_under("0::/shop\n", root), Some(256 << 20));
    }

    #[test]
    fn no_memory_controller_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            memory_limit_under("12:cpu,cpuacct:/pod\n", dir.path()),
            None
        );
        assert_eq!(memory_limit_under("", dir.path()), None);
    }
}
