//! `imds-agent guard`: the node protected from its first second.
//!
//! bpffs is memory-backed: after a reboot no program is attached until the agent runs, and
//! the kubelet starts pods before that. The guard runs first (a systemd unit ordered before
//! `kubelet.service`): it attaches the same programs to the kubelet's pod cgroup, creating
//! that cgroup if the kubelet has not yet, pins them, and exits. With no agent listening they
//! refuse every connection they would redirect (`EPERM`), so a pod started before the agent
//! reaches the metadata service with no identity at all. The bind guard keeps the agent's
//! port for the agent. When the agent starts, it swaps its programs into the same pinned
//! links, atomically, as on any restart: there is no moment without a filter.
//!
//! The guard never disturbs an agent: while one holds the node's pin directory, it does
//! nothing.
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::{
    cli::{listen_address, GuardArgs},
    kernel::{self, bpffs, cgroup, origin::DEFAULT_ORIGIN_TTL, Filter, FilterOptions},
    server::listener,
};

/// What the guard did.
#[derive(Debug, PartialEq, Eq)]
pub enum Guarded {
    /// The filter is in place on `cgroup`, refusing redirects; `created`: the guard made the
    /// cgroup.
    Installed { cgroup: PathBuf, created: bool },
    /// An agent holds the node: nothing was touched.
    AgentServing,
}

/// Installs the filter failing closed, as `args` say, and lets go of it (the pins hold it).
///
/// # Errors
/// The programs are not built in, the cgroup or bpffs cannot be used, or loading fails.
pub fn run(args: &GuardArgs) -> anyhow::Result<Guarded> {
    if !kernel::programs_built() {
        return Err(kernel::FilterError::NotBuilt.into());
    }
    let listen = listen_address(args.listen)?;
    let root = cgroup::cgroup2_root()?;
    let filter = &args.filter;
    // The kubelet's pod hierarchy, made now if the kubelet has not made it yet. Which one
    // (kubepods.slice with systemd's driver, kubepods with cgroupfs's) is not guessed: a
    // wrong guess would filter a cgroup the kubelet never uses. `install-guard` records the
    // one the node's kubelet made.
    let attach = match &filter.attach_cgroup {
        Some(path) => path.clone(),
        None => cgroup::default_attach_cgroup(&root).context(
            "no pod hierarchy yet: pass --attach-cgroup with the one the kubelet will make (install-guard records it)",
        )?,
    };
    let created = !attach.exists();
    if created {
        let plain =
            attach.components().all(|c| matches!(c, std::path::Component::RootDir | std::path::Component::Normal(_)));
        if !plain || !attach.starts_with(&root) || attach == root {
            anyhow::bail!("{} is not a cgroup below {}", attach.display(), root.display());
        }
        std::fs::create_dir_all(&attach).with_context(|| format!("creating the cgroup {}", attach.display()))?;
    }
    let attach = cgroup::validate_attach_cgroup(&root, &attach)?;
    let Some(lock) = bpffs::try_lock_pin_dir(&filter.bpffs)? else {
        return Ok(Guarded::AgentServing);
    };
    let options = FilterOptions {
        attach_cgroup: attach.clone(),
        pin_dir: filter.bpffs.clone(),
        agent: listen,
        protected: filter.protected.clone(),
        protected_addresses: filter.protected_addresses.clone(),
        default_verdict: imds_common::Verdict::Redirect,
        // No agent yet: it admits itself to the bind guard before it binds.
        agent_cgroup: 0,
        // Nothing listens: every redirect is refused until the agent does.
        listening: false,
        agent_netns_cookie: listener::netns_cookie().context("reading the network namespace's cookie")?,
        kernel_log_level: log::LevelFilter::Off,
        origin_ttl: DEFAULT_ORIGIN_TTL,
        node_backstop: filter.node_backstop,
        nat64_prefixes: filter.nat64_prefixes.clone(),
    };
    drop(Filter::install(&options)?);
    drop(lock);
    Ok(Guarded::Installed { cgroup: attach, created })
}

/// The systemd unit that runs the guard at boot, before the kubelet (also shipped as
/// `deploy/systemd/imds-filter-guard.service` for node images; a test keeps the two equal).
pub const SYSTEMD_UNIT: &str = "\
# imds-filter's early guard: the metadata filter in place, failing closed, before the kubelet
# starts pods on a booting node. The agent takes it over when it runs. See docs/deploy.md.
[Unit]
Description=imds-filter early guard (metadata filter before the kubelet)
Before=kubelet.service
After=local-fs.target

[Service]
Type=oneshot
RemainAfterExit=yes
# Loading takes a second or two; a guard that hangs must not hold the kubelet for ever.
TimeoutStartSec=60
# HOST_IP (the node's address, where the agent will listen) and GUARD_ARGS (--attach-cgroup
# and the agent's filter settings: --listen, --protect, --node-backstop, ...).
EnvironmentFile=-/etc/imds-filter/guard.env
ExecStart=/opt/imds-filter/bin/imds-agent guard $GUARD_ARGS

[Install]
WantedBy=kubelet.service
";

/// Where [`install`] puts things, each below the node's root as the installer sees it.
#[derive(Clone, Debug)]
pub struct InstallPaths {
    /// The node's `/` (`/host` in the installer's container).
    pub root: PathBuf,
}

impl InstallPaths {
    fn binary(&self) -> PathBuf {
        self.root.join("opt/imds-filter/bin/imds-agent")
    }
    fn unit(&self) -> PathBuf {
        self.root.join("etc/systemd/system/imds-filter-guard.service")
    }
    fn wants(&self) -> PathBuf {
        self.root.join("etc/systemd/system/kubelet.service.wants/imds-filter-guard.service")
    }
    fn env(&self) -> PathBuf {
        self.root.join("etc/imds-filter/guard.env")
    }

    /// The pod hierarchy the node's kubelet made, as a path on the node: the cgroup2 mount
    /// is at `sys/fs/cgroup` (unified) or `sys/fs/cgroup/unified` (hybrid) below the root.
    fn kubelet_hierarchy(&self) -> anyhow::Result<PathBuf> {
        let found: Vec<PathBuf> = ["sys/fs/cgroup", "sys/fs/cgroup/unified"]
            .iter()
            .flat_map(|mount| cgroup::KUBEPODS.iter().map(move |name| Path::new(mount).join(name)))
            .filter(|path| self.root.join(path).is_dir())
            .collect();
        match found.as_slice() {
            [one] => Ok(Path::new("/").join(one)),
            [] => anyhow::bail!(
                "no kubelet pod hierarchy under {}/sys/fs/cgroup: pass --attach-cgroup after `--`",
                self.root.display()
            ),
            _ => anyhow::bail!("several pod hierarchies ({found:?}): pass --attach-cgroup after `--`"),
        }
    }
}

/// Installs the guard on a node: this binary, the unit (enabled: wanted by the kubelet's
/// unit), and its settings, with `--attach-cgroup` the pod hierarchy the node's kubelet made
/// (unless `guard_args` name one). Each file is written whole, synced and renamed into
/// place, so a node that boots mid-install runs the old guard or the new one. A unit an
/// administrator masked stays masked. Returns the files written.
///
/// # Errors
/// `guard_args` would not parse at boot, the node has no pod hierarchy, or a file cannot be
/// written.
pub fn install(
    paths: &InstallPaths,
    host_ip: std::net::Ipv4Addr,
    guard_args: &[String],
) -> anyhow::Result<Vec<PathBuf>> {
    let mut args = guard_args.to_vec();
    if !args.iter().any(|a| a == "--attach-cgroup" || a.starts_with("--attach-cgroup=")) {
        args.push(format!("--attach-cgroup={}", paths.kubelet_hierarchy()?.display()));
    }
    check_args(&args)?;
    let env = format!("HOST_IP={host_ip}\nGUARD_ARGS={}\n", args.join(" "));
    let this = std::env::current_exe().context("finding this binary")?;
    let mut written = Vec::new();
    write_atomically(&paths.binary(), Contents::CopyOf(&this), 0o755)?;
    written.push(paths.binary());
    let unit = paths.unit();
    if std::fs::read_link(&unit).is_ok_and(|target| target == Path::new("/dev/null")) {
        tracing::warn!(unit = %unit.display(), "the guard's unit is masked on this node: left alone");
    } else {
        write_atomically(&unit, Contents::Bytes(SYSTEMD_UNIT.as_bytes()), 0o644)?;
        written.push(unit);
    }
    write_atomically(&paths.env(), Contents::Bytes(env.as_bytes()), 0o644)?;
    written.push(paths.env());
    let wants = paths.wants();
    match std::fs::read_link(&wants) {
        Ok(target) if target == Path::new(UNIT_PATH) => {}
        Ok(_) => anyhow::bail!("{} exists and is not imds-filter's: left alone", wants.display()),
        Err(_) if wants.symlink_metadata().is_ok() => {
            anyhow::bail!("{} exists and is not imds-filter's: left alone", wants.display())
        }
        Err(_) => {
            let dir = paths.root.join("etc/systemd/system/kubelet.service.wants");
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            std::os::unix::fs::symlink(UNIT_PATH, &wants)
                .with_context(|| format!("enabling the unit at {}", wants.display()))?;
        }
    }
    written.push(wants);
    Ok(written)
}

/// Removes what [`install`] wrote (for `imds-agent uninstall`): without it, the next boot
/// would attach a filter that no agent ever takes over. Returns what it removed.
///
/// # Errors
/// A file exists and cannot be removed.
pub fn remove(paths: &InstallPaths) -> anyhow::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let ours = |path: &Path| std::fs::read_link(path).is_ok_and(|t| t == Path::new(UNIT_PATH));
    for path in [paths.wants(), paths.unit(), paths.env(), paths.binary()] {
        let exists = path.symlink_metadata().is_ok();
        let is_link = path.symlink_metadata().is_ok_and(|m| m.file_type().is_symlink());
        // Links: only the enabling link that is ours (a masked unit stays masked).
        if !exists || (is_link && !ours(&path)) {
            continue;
        }
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Where the unit is on the node.
const UNIT_PATH: &str = "/etc/systemd/system/imds-filter-guard.service";

/// Refuses arguments the guard would refuse at boot, or that would not survive systemd's
/// splitting of `$GUARD_ARGS` on whitespace.
fn check_args(args: &[String]) -> anyhow::Result<()> {
    use clap::Parser as _;
    if let Some(bad) = args.iter().find(|a| a.is_empty() || a.chars().any(char::is_whitespace)) {
        anyhow::bail!("{bad:?}: the guard's arguments cannot be empty or hold whitespace");
    }
    let parsed = crate::cli::Cli::try_parse_from(
        ["imds-agent", "guard"].into_iter().map(str::to_owned).chain(args.iter().cloned()),
    );
    parsed.map(drop).map_err(|e| anyhow::anyhow!("the guard's arguments would not parse at boot: {e}"))
}

#[derive(Clone, Copy)]
enum Contents<'a> {
    Bytes(&'a [u8]),
    /// The file at this path, copied by the kernel (no copy in this process's memory).
    CopyOf(&'a Path),
}

/// Writes `contents` next to `path` under a fresh name, syncs it, renames it over `path` and
/// syncs the directory.
fn write_atomically(path: &Path, contents: Contents<'_>, mode: u32) -> anyhow::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let dir = path.parent().context("a file below a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().context("a file name")?.to_string_lossy();
    let staged = dir.join(format!(".{name}.imds-filter-new"));
    // A stale staging file (an interrupted install) goes; a link there is not followed.
    let _ = std::fs::remove_file(&staged);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&staged)
        .with_context(|| format!("creating {}", staged.display()))?;
    match contents {
        Contents::Bytes(bytes) => file.write_all(bytes),
        Contents::CopyOf(source) => {
            std::fs::File::open(source).and_then(|mut from| std::io::copy(&mut from, &mut file)).map(drop)
        }
    }
    .and_then(|()| file.sync_all())
    .with_context(|| format!("writing {}", staged.display()))?;
    std::fs::rename(&staged, path).with_context(|| format!("renaming into {}", path.display()))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_unit_is_the_one_the_installer_writes() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/imds-filter-guard.service");
        assert_eq!(std::fs::read_to_string(shipped).expect("the shipped unit"), SYSTEMD_UNIT);
    }

    #[test]
    fn install_records_the_kubelets_hierarchy_writes_everything_and_uninstall_removes_it() {
        let root = tempfile::tempdir().expect("a temporary root");
        let paths = InstallPaths { root: root.path().to_owned() };
        let ip = "10.0.0.4".parse().expect("an address");
        let args = ["--node-backstop=auto".to_owned()];
        assert!(install(&paths, ip, &args).is_err(), "no pod hierarchy on the node: nothing to record");
        std::fs::create_dir_all(root.path().join("sys/fs/cgroup/unified/kubepods")).expect("a hybrid node's");
        let written = install(&paths, ip, &args).expect("installed");
        assert_eq!(written.len(), 4);
        assert_eq!(std::fs::read_to_string(paths.unit()).expect("the unit"), SYSTEMD_UNIT);
        let env = std::fs::read_to_string(paths.env()).expect("the settings");
        assert_eq!(
            env,
            "HOST_IP=10.0.0.4\nGUARD_ARGS=--node-backstop=auto --attach-cgroup=/sys/fs/cgroup/unified/kubepods\n"
        );
        assert_eq!(std::fs::read_link(paths.wants()).expect("enabled"), PathBuf::from(UNIT_PATH));
        let binary = std::fs::metadata(paths.binary()).expect("the binary");
        assert!(binary.len() > 0 && std::os::unix::fs::PermissionsExt::mode(&binary.permissions()) & 0o111 != 0);
        // Again (an upgrade): the same files, replaced whole, nothing staged left over.
        install(&paths, ip, &args).expect("installed again");
        let staged = std::fs::read_dir(paths.unit().parent().expect("a directory"))
            .expect("the unit directory")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".imds-filter-new"))
            .count();
        assert_eq!(staged, 0);

        assert_eq!(remove(&paths).expect("removed").len(), 4);
        assert!([paths.wants(), paths.unit(), paths.env(), paths.binary()]
            .iter()
            .all(|p| p.symlink_metadata().is_err()));
        assert!(remove(&paths).expect("nothing to remove").is_empty());
    }

    #[test]
    fn install_refuses_what_would_fail_at_boot_and_leaves_a_masked_unit_and_foreign_links_alone() {
        let root = tempfile::tempdir().expect("a temporary root");
        let paths = InstallPaths { root: root.path().to_owned() };
        let ip = "10.0.0.4".parse().expect("an address");
        let explicit = "--attach-cgroup=/sys/fs/cgroup/kubepods.slice".to_owned();
        for bad in ["--no-such-flag", "--node-backstop=sideways", "--listen=10.0.0.4:8182\nLD_PRELOAD=/x"] {
            assert!(install(&paths, ip, &[explicit.clone(), bad.to_owned()]).is_err(), "{bad:?}");
        }
        std::fs::create_dir_all(paths.unit().parent().expect("a directory")).expect("the unit directory");
        std::os::unix::fs::symlink("/dev/null", paths.unit()).expect("masked");
        let written = install(&paths, ip, std::slice::from_ref(&explicit)).expect("installed");
        assert!(!written.contains(&paths.unit()), "a masked unit stays masked");
        assert_eq!(std::fs::read_link(paths.unit()).expect("still a link"), PathBuf::from("/dev/null"));
        remove(&paths).expect("removed");
        assert!(paths.unit().symlink_metadata().is_ok(), "the mask is the administrator's");

        std::os::unix::fs::symlink("/etc/systemd/system/something-else.service", paths.wants()).expect("a link");
        assert!(install(&paths, ip, &[explicit]).is_err(), "a foreign link at our name is not replaced");
    }
}
