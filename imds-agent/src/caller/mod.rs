//! From a connection's kernel origin to the pod that made it.
//!
//! The kernel records a cgroup id (the inode number of the cgroup's directory). The cgroup's
//! path comes from the id directly — cgroup2 accepts the id as a file handle
//! (`open_by_handle_at` with a kernfs handle) — and the pod UID from the kubelet's naming of
//! that path ([`podpath`]). Ids are never reused while the machine runs, so a cached answer
//! never goes wrong; entries for cgroups that have gone away are dropped by [`CgroupResolver::prune`].
pub mod podpath;

use parking_lot::Mutex;
use std::{
    collections::HashMap,
    fs, io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

/// A cgroup, as the agent needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupInfo {
    /// Path below the cgroup2 root, starting with `/`.
    pub path: String,
    /// The pod it belongs to, if it is in a pod's cgroup.
    pub pod_uid: Option<String>,
}

/// Resolves cgroup ids to paths and pods, with a cache.
pub struct CgroupResolver {
    root: PathBuf,
    mount: fs::File,
    cache: Mutex<HashMap<u64, CgroupInfo>>,
}

/// `FILEID_KERNFS`: the handle type of cgroup2 (kernfs) file handles; the handle is the id.
const FILEID_KERNFS: i32 = 0xfe;

/// `struct file_handle` with the 8-byte kernfs payload.
#[repr(C)]
struct KernfsHandle {
    handle_bytes: u32,
    handle_type: i32,
    id: u64,
}

impl CgroupResolver {
    /// A resolver for the cgroup2 filesystem mounted at `root`.
    pub fn new(root: &Path) -> io::Result<CgroupResolver> {
        Ok(CgroupResolver { root: root.to_owned(), mount: fs::File::open(root)?, cache: Mutex::default() })
    }

    /// The cgroup with this id if it is cached: no system call, so an async task may ask.
    pub fn cached_info(&self, cgroup_id: u64) -> Option<CgroupInfo> {
        self.lock().get(&cgroup_id).cloned()
    }

    /// The cgroup with this id, or `None` if it no longer exists. May read the filesystem.
    pub fn resolve(&self, cgroup_id: u64) -> io::Result<Option<CgroupInfo>> {
        if let Some(hit) = self.cached_info(cgroup_id) {
            return Ok(Some(hit));
        }
        let Some(full) = self.path_of(cgroup_id)? else {
            return Ok(None);
        };
        let rel = full.strip_prefix(&self.root).unwrap_or(&full);
        let path = format!("/{}", rel.display()).replace("//", "/");
        let info = CgroupInfo { pod_uid: podpath::pod_uid(&path), path };
        self.lock().insert(cgroup_id, info.clone());
        Ok(Some(info))
    }

    /// Drops cached cgroups that no longer exist; returns how many were dropped. The cache is
    /// locked only to copy what it holds and to drop what went away, not while each cgroup
    /// is looked at: connections look the cache up on the async workers.
    pub fn prune(&self) -> usize {
        let held: Vec<(u64, String)> = self.lock().iter().map(|(id, info)| (*id, info.path.clone())).collect();
        let gone: Vec<u64> = held
            .into_iter()
            .filter(|(id, path)| {
                let dir = self.root.join(path.trim_start_matches('/'));
                !fs::metadata(dir).is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == *id)
            })
            .map(|(id, _)| id)
            .collect();
        let mut cache = self.lock();
        gone.iter().filter(|id| cache.remove(id).is_some()).count()
    }

    /// Number of cached cgroups.
    pub fn cached(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<u64, CgroupInfo>> {
        self.cache.lock()
    }

    /// Opens the cgroup directory by id and reads back its path.
    fn path_of(&self, cgroup_id: u64) -> io::Result<Option<PathBuf>> {
        let mut handle = KernfsHandle { handle_bytes: 8, handle_type: FILEID_KERNFS, id: cgroup_id };
        // SAFETY: `handle` is a valid `struct file_handle` with an 8-byte payload, and the
        // mount fd stays open for the call. Needs CAP_DAC_READ_SEARCH (the agent runs as root).
        let fd = unsafe {
            libc::open_by_handle_at(
                self.mount.as_raw_fd(),
                std::ptr::from_mut(&mut handle).cast(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // The cgroup is gone (or the id never existed).
                Some(libc::ESTALE | libc::ENOENT) => Ok(None),
                _ => Err(e),
            };
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let dir = unsafe { OwnedFd::from_raw_fd(fd) };
        fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd())).map(Some)
    }
}

/// Forgets cgroups that went away, so the cache stays the size of the node's pods (a stat
/// per cached cgroup every 10 s), and reports what it holds.
pub async fn prune_every_10s(
    resolver: std::sync::Arc<CgroupResolver>,
    cached: prometheus_client::metrics::gauge::Gauge,
) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(10));
    loop {
        every.tick().await;
        let resolver = std::sync::Arc::clone(&resolver);
        if let Ok(held) = tokio::task::spawn_blocking(move || {
            resolver.prune();
            resolver.cached()
        })
        .await
        {
            cached.set(i64::try_from(held).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn pruning_forgets_exactly_the_cgroups_that_went_away() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("kubepods/pod1")).unwrap();
        let live = fs::metadata(root.path().join("kubepods/pod1")).unwrap().ino();
        let resolver = CgroupResolver::new(root.path()).unwrap();
        let info = |path: &str| CgroupInfo { path: path.to_owned(), pod_uid: None };
        resolver.lock().insert(live, info("/kubepods/pod1"));
        resolver.lock().insert(live + 1_000_000, info("/kubepods/pod2")); // never existed
        resolver.lock().insert(live + 2_000_000, info("/kubepods/pod1")); // reused name, another id
        assert_eq!(resolver.prune(), 2);
        assert_eq!(resolver.cached_info(live), Some(info("/kubepods/pod1")));
        assert_eq!(resolver.cached(), 1);
        assert_eq!(resolver.prune(), 0);
    }
}
