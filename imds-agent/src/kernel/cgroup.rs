//! Finding cgroup v2 and choosing where the programs attach.
//!
//! Nodes mount cgroup2 at `/sys/fs/cgroup` (unified) or `/sys/fs/cgroup/unified` (hybrid);
//! we read the mount table rather than guess. The programs attach to the kubelet's pod
//! hierarchy by default and never to the root cgroup: node daemons (the kubelet itself
//! needs IMDS) live outside it and must keep their access.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// Names the kubelet gives its pod hierarchy: systemd driver, then cgroupfs driver.
pub const KUBEPODS: [&str; 2] = ["kubepods.slice", "kubepods"];

/// `CGROUP2_SUPER_MAGIC` from linux/magic.h.
const CGROUP2_MAGIC: i64 = 0x6367_7270;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 filesystem is mounted (checked /proc/self/mountinfo); the filter needs cgroup v2")]
    NoCgroup2,
    #[error("no kubelet pod hierarchy ({}) under {root}; pass --attach-cgroup PATH to choose the cgroup to filter", KUBEPODS.join(" or "))]
    NoKubepods { root: PathBuf },
    #[error(
        "{path} is the root cgroup: attaching there would filter every process on the machine; choose a child cgroup"
    )]
    RootCgroup { path: PathBuf },
    #[error("{path} is not a directory on the cgroup v2 filesystem mounted at {root}")]
    NotCgroup2 { path: PathBuf, root: PathBuf },
    #[error("cannot read {path}")]
    Io { path: PathBuf, source: std::io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io { path: path.to_owned(), source }
}

/// A cgroup2 mount: where it is, and which part of the hierarchy it shows (as mountinfo
/// says it, relative to our cgroup namespace: `/` for a namespace-rooted view, `/..…` for a
/// view reaching above our namespace's root).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup2Mount {
    pub mount_point: PathBuf,
    pub root: String,
}

impl Cgroup2Mount {
    /// How far above our cgroup namespace's root this view starts.
    fn height(&self) -> usize {
        self.root.split('/').filter(|s| *s == "..").count()
    }
}

fn mounts() -> Result<Vec<Cgroup2Mount>, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    Ok(parse_cgroup2_mounts(&text))
}

/// The cgroup v2 hierarchy as the node sees it: the mount reaching highest. On a node that
/// is the only one; in a container with a private cgroup namespace it is the host's
/// cgroupfs mounted in (its mountinfo root is `/..…`), not the container's own view.
pub fn cgroup2_root() -> Result<PathBuf, CgroupError> {
    mounts()?.into_iter().max_by_key(Cgroup2Mount::height).map(|m| m.mount_point).ok_or(CgroupError::NoCgroup2)
}

/// Every cgroup2 mount in a `/proc/*/mountinfo` text, in order. procfs splits the fields;
/// it keeps mountinfo's `\ooo` escapes as they are, which [`unescape_octal`] undoes.
pub fn parse_cgroup2_mounts(mountinfo: &str) -> Vec<Cgroup2Mount> {
    mountinfo
        .lines()
        .filter_map(|line| procfs::process::MountInfo::from_line(line).ok())
        .filter(|m| m.fs_type == "cgroup2")
        .map(|m| Cgroup2Mount {
            root: unescape_octal(&m.root),
            mount_point: PathBuf::from(unescape_octal(&m.mount_point.to_string_lossy())),
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal =
            bytes.get(i + 1..i + 4).filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        if let Some(d) = octal {
            out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The kubelet pod hierarchy under `root`, if the node has one.
pub fn default_attach_cgroup(root: &Path) -> Result<PathBuf, CgroupError> {
    KUBEPODS
        .iter()
        .map(|name| root.join(name))
        .find(|p| p.is_dir())
        .ok_or_else(|| CgroupError::NoKubepods { root: root.to_owned() })
}

/// Checks that `path` is a cgroup below (not at) the cgroup2 root; returns it canonicalised.
pub fn validate_attach_cgroup(root: &Path, path: &Path) -> Result<PathBuf, CgroupError> {
    let canonical = path.canonicalize().map_err(io_err(path))?;
    let root = root.canonicalize().map_err(io_err(root))?;
    if canonical == root {
        return Err(CgroupError::RootCgroup { path: canonical });
    }
    let fs = nix::sys::statfs::statfs(&canonical)
        .map_err(|e| CgroupError::Io { path: canonical.clone(), source: e.into() })?;
    if !canonical.starts_with(&root) || fs.filesystem_type().0 != CGROUP2_MAGIC || !canonical.is_dir() {
        return Err(CgroupError::NotCgroup2 { path: canonical, root });
    }
    Ok(canonical)
}

/// The id `bpf_get_current_cgroup_id()` reports for processes in `path`: its inode number.
pub fn cgroup_id(path: &Path) -> Result<u64, CgroupError> {
    fs::metadata(path).map(|m| m.ino()).map_err(io_err(path))
}

/// The cgroup id of the calling process, right in any cgroup namespace.
///
/// `/proc/self/cgroup` gives our path relative to our cgroup namespace's root (`/` in a
/// container with a private namespace), so it is resolved through a view rooted there: a
/// cgroup2 mount whose mountinfo root is `/`, or, if there is none, a cgroup2 filesystem
/// mounted just for this (a fresh mount is rooted at the mounter's namespace).
pub fn own_cgroup_id() -> Result<(u64, String), CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let rel = parse_proc_cgroup(&text).ok_or(CgroupError::NoCgroup2)?.trim_start_matches('/').to_owned();
    if let Some(view) = mounts()?.into_iter().find(|m| m.root == "/") {
        return Ok((cgroup_id(&view.mount_point.join(&rel))?, format!("/{rel}")));
    }
    let dir = std::env::temp_dir().join(format!("imds-agent-cgroupns-{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let mounted = nix::mount::mount(Some("cgroup2"), &dir, Some("cgroup2"), nix::mount::MsFlags::empty(), None::<&str>);
    let id = mounted
        .map_err(|e| CgroupError::Io { path: dir.clone(), source: e.into() })
        .and_then(|()| cgroup_id(&dir.join(&rel)));
    let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(&dir);
    Ok((id?, format!("/{rel} (in a private cgroup namespace)")))
}

/// The v2 entry (`0::/path`) of a `/proc/*/cgroup` text.
#[must_use]
pub fn parse_proc_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first cgroup2 mount point in a mountinfo text.
    fn first(mountinfo: &str) -> Option<PathBuf> {
        parse_cgroup2_mounts(mountinfo).into_iter().next().map(|m| m.mount_point)
    }

    const HYBRID: &str = "\
25 1 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup ro shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/systemd rw shared:11 - cgroup cgroup rw,xattr,name=systemd
";

    #[test]
    fn finds_cgroup2_in_hybrid_and_unified_layouts() {
        assert_eq!(first(HYBRID), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        let unified = "30 24 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(first(unified), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn optional_fields_and_escapes_do_not_confuse_the_parser() {
        let line = "40 24 0:26 / /mnt/my\\040cg rw master:1 shared:4 - cgroup2 none rw\n";
        assert_eq!(first(line), Some(PathBuf::from("/mnt/my cg")));
    }

    #[test]
    fn v1_only_machine_has_no_cgroup2() {
        let v1 = "35 33 0:30 / /sys/fs/cgroup/memory rw shared:11 - cgroup cgroup rw,memory\n";
        assert_eq!(first(v1), None);
    }

    #[test]
    fn the_widest_cgroup2_view_is_the_nodes() {
        // A container with a private cgroup namespace: its own view (root "/") and the
        // host's cgroupfs mounted in (root reaching above the namespace).
        let text = "\
40 30 0:26 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw
41 30 0:26 /../../.. /host/sys/fs/cgroup rw - cgroup2 cgroup2 rw
";
        let mounts = parse_cgroup2_mounts(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts.iter().max_by_key(|m| m.height()).unwrap().mount_point, PathBuf::from("/host/sys/fs/cgroup"));
        assert_eq!(mounts.iter().find(|m| m.root == "/").unwrap().mount_point, PathBuf::from("/sys/fs/cgroup"));
    }

    #[test]
    fn proc_cgroup_picks_the_v2_line() {
        let text = "12:memory:/user.slice\n1:name=systemd:/user.slice/x\n0::/kubepods.slice/pod.slice\n";
        assert_eq!(parse_proc_cgroup(text), Some("/kubepods.slice/pod.slice"));
        assert_eq!(parse_proc_cgroup("12:memory:/\n"), None);
    }

    #[test]
    fn unescape_leaves_plain_backslashes() {
        assert_eq!(unescape_octal(r"a\134b"), r"a\b");
        assert_eq!(unescape_octal(r"a\9b"), r"a\9b");
        assert_eq!(unescape_octal(r"end\04"), r"end\04");
    }
}
