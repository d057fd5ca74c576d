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
use std::path::PathBuf;

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
    // The kubelet's pod hierarchy, made now if the kubelet has not made it yet: systemd's
    // driver names it kubepods.slice (the kubelet's default), the cgroupfs driver kubepods.
    let attach = match &filter.attach_cgroup {
        Some(path) => path.clone(),
        None => cgroup::default_attach_cgroup(&root).unwrap_or_else(|_| root.join(cgroup::KUBEPODS[0])),
    };
    let created = !attach.exists();
    if created {
        if !attach.starts_with(&root) || attach == root {
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
Documentation=man:imds-agent-guard(1)
Before=kubelet.service
After=local-fs.target

[Service]
Type=oneshot
RemainAfterExit=yes
# HOST_IP (the node's address, where the agent will listen) and GUARD_ARGS (the agent's
# filter settings: --protect, --node-backstop, ...).
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
}

/// Installs the guard on a node: this binary, the unit (enabled: wanted by the kubelet's
/// unit), and its settings. Each file is written whole and renamed into place, so a node
/// that boots mid-install runs the old guard or the new one. Returns the files written.
///
/// # Errors
/// A file cannot be written.
pub fn install(
    paths: &InstallPaths,
    host_ip: std::net::Ipv4Addr,
    guard_args: &[String],
) -> anyhow::Result<Vec<PathBuf>> {
    let this = std::env::current_exe().context("finding this binary")?;
    let binary = std::fs::read(&this).with_context(|| format!("reading {}", this.display()))?;
    let env = format!("HOST_IP={host_ip}\nGUARD_ARGS={}\n", guard_args.join(" "));
    let mut written = Vec::new();
    for (path, contents, mode) in [
        (paths.binary(), binary.as_slice(), 0o755),
        (paths.unit(), SYSTEMD_UNIT.as_bytes(), 0o644),
        (paths.env(), env.as_bytes(), 0o644),
    ] {
        write_atomically(&path, contents, mode)?;
        written.push(path);
    }
    let wants = paths.wants();
    if std::fs::symlink_metadata(&wants).is_err() {
        let dir = paths.root.join("etc/systemd/system/kubelet.service.wants");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::os::unix::fs::symlink("/etc/systemd/system/imds-filter-guard.service", &wants)
            .with_context(|| format!("enabling the unit at {}", wants.display()))?;
    }
    written.push(wants);
    Ok(written)
}

fn write_atomically(path: &std::path::Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = path.parent().context("a file below a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let staged = path.with_extension("imds-filter-new");
    std::fs::write(&staged, contents).with_context(|| format!("writing {}", staged.display()))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", staged.display()))?;
    std::fs::rename(&staged, path).with_context(|| format!("renaming into {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_unit_is_the_one_the_installer_writes() {
        let shipped =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/imds-filter-guard.service");
        assert_eq!(std::fs::read_to_string(shipped).expect("the shipped unit"), SYSTEMD_UNIT);
    }

    #[test]
    fn install_writes_the_binary_the_unit_its_settings_and_enables_it() {
        let root = tempfile::tempdir().expect("a temporary root");
        let paths = InstallPaths { root: root.path().to_owned() };
        let args = ["--node-backstop=auto".to_owned()];
        let written = install(&paths, "10.0.0.4".parse().expect("an address"), &args).expect("installed");
        assert_eq!(written.len(), 4);
        assert_eq!(std::fs::read_to_string(paths.unit()).expect("the unit"), SYSTEMD_UNIT);
        let env = std::fs::read_to_string(paths.env()).expect("the settings");
        assert_eq!(env, "HOST_IP=10.0.0.4\nGUARD_ARGS=--node-backstop=auto\n");
        assert_eq!(
            std::fs::read_link(paths.wants()).expect("enabled"),
            PathBuf::from("/etc/systemd/system/imds-filter-guard.service")
        );
        let binary = std::fs::metadata(paths.binary()).expect("the binary");
        assert!(binary.len() > 0 && std::os::unix::fs::PermissionsExt::mode(&binary.permissions()) & 0o111 != 0);
        // Again (an upgrade): the same files, replaced whole.
        install(&paths, "10.0.0.4".parse().expect("an address"), &args).expect("installed again");
    }
}
