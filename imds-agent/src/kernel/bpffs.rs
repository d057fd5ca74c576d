//! The bpf filesystem that holds our pins (links and maps), so the filter outlives the agent.
use std::{
    fs,
    os::unix::fs::DirBuilderExt as _,
    path::{Path, PathBuf},
};

use nix::{mount::MsFlags, sys::statfs::statfs};

/// Where the pins live unless `--bpffs` says otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/imds-filter";
/// The conventional bpffs mount point; mounted by us when it is not.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("{path} is not on a bpf filesystem; mount one (`mount -t bpf bpf {path}`) or pick a --bpffs under {BPFFS_MOUNT}")]
    NotBpffs { path: PathBuf },
    #[error("mounting bpffs at {BPFFS_MOUNT}")]
    Mount(#[source] nix::Error),
    #[error("{path}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Whether `path` (which must exist) lives on bpffs.
#[must_use]
pub fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Makes sure `dir` exists on bpffs, mounting bpffs at `/sys/fs/bpf` first when `dir` is
/// below it and nothing is mounted there yet (as on a fresh node).
pub fn ensure_pin_dir(dir: &Path) -> Result<(), BpffsError> {
    let mount_point = Path::new(BPFFS_MOUNT);
    if dir.starts_with(mount_point) && mount_point.is_dir() && !is_bpffs(mount_point) {
        nix::mount::mount(Some("bpf"), mount_point, Some("bpf"), MsFlags::empty(), None::<&str>)
            .map_err(BpffsError::Mount)?;
        tracing::info!(path = BPFFS_MOUNT, "mounted bpffs");
    }
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if !is_bpffs(existing) {
        return Err(BpffsError::NotBpffs { path: dir.to_owned() });
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| BpffsError::Io { path: dir.to_owned(), source })
}

/// An exclusive lock on the pin directory, held for the agent's life: one agent at a time
/// owns the filter of a node. The kernel drops it when the process ends, however it ends.
#[derive(Debug)]
pub struct PinDirLock(
    #[expect(dead_code, reason = "held for its drop: closing the directory unlocks it")] nix::fcntl::Flock<fs::File>,
);

/// Takes the lock on `dir` (creating the directory on bpffs first), or `Ok(None)` while
/// another process holds it.
pub fn try_lock_pin_dir(dir: &Path) -> Result<Option<PinDirLock>, BpffsError> {
    ensure_pin_dir(dir)?;
    let file = fs::File::open(dir).map_err(|source| BpffsError::Io { path: dir.to_owned(), source })?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(PinDirLock(lock))),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(BpffsError::Io { path: dir.to_owned(), source: errno.into() }),
    }
}
