//! The bpf filesystem that holds our pins (links and maps), so the filter outlives the agent.
use std::{
    fs,
    os::{
        fd::{AsFd, AsRawFd as _, BorrowedFd, OwnedFd},
        unix::fs::{DirBuilderExt as _, MetadataExt as _},
    },
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
/// owns the filter of a node. A `flock(2)` lock belongs to the open directory, not the
/// process: an agent taking over hands it on with the listener ([`crate::handover`]), and it
/// is released when the last process holding the directory open closes it, however it ends.
/// Dropping a [`PinDirLock`] closes this process's hold without unlocking another's.
#[derive(Debug)]
pub struct PinDirLock(OwnedFd);

impl PinDirLock {
    /// A hold on the same lock (the same open directory), to hand to the next agent.
    pub fn share(&self) -> std::io::Result<OwnedFd> {
        self.0.try_clone()
    }

    /// The lock an earlier agent handed over, once checked to be the lock of `dir`.
    pub fn handed_over(fd: OwnedFd, dir: &Path) -> Result<PinDirLock, BpffsError> {
        let io = |source| BpffsError::Io { path: dir.to_owned(), source };
        let ours = fs::metadata(dir).map_err(io)?;
        let given = fs::File::from(fd);
        let theirs = given.metadata().map_err(io)?;
        if (ours.dev(), ours.ino()) != (theirs.dev(), theirs.ino()) {
            return Err(io(std::io::Error::other("the lock handed over is not on this pin directory")));
        }
        // Held already by this open directory, so this succeeds at once; it fails if the
        // descriptor was opened anew rather than shared.
        if flock(&given).map_err(io)? {
            Ok(PinDirLock(given.into()))
        } else {
            Err(io(std::io::Error::other("the lock handed over is not held")))
        }
    }
}

impl AsFd for PinDirLock {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Takes the lock on `dir` (creating the directory on bpffs first), or `Ok(None)` while
/// another process holds it.
pub fn try_lock_pin_dir(dir: &Path) -> Result<Option<PinDirLock>, BpffsError> {
    ensure_pin_dir(dir)?;
    let file = fs::File::open(dir).map_err(|source| BpffsError::Io { path: dir.to_owned(), source })?;
    let held = flock(&file).map_err(|source| BpffsError::Io { path: dir.to_owned(), source })?;
    Ok(held.then(|| PinDirLock(file.into())))
}

/// `flock(LOCK_EX | LOCK_NB)`: whether the lock is now held through `file`.
fn flock(file: &fs::File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor `file` owns for the duration of the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    match rc {
        0 => Ok(true),
        _ => match std::io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
            e => Err(e),
        },
    }
}
