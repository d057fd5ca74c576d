//! `imds-agent doctor`: can this node run the filter, and is anything in its way?
//!
//! Each check looks at one thing and, when it fails, says how to fix it. The parsing is pure
//! and tested below; the probing (files, syscalls, `iptables-save`, one TCP connect) happens in
//! the `check_*` functions, each on its own. Nothing here changes the node, and the upstream
//! check opens a connection and closes it without sending a byte: no token is ever asked for.
use std::{
    fs,
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;

use aya::util::KernelVersion;

use crate::kernel::{self, bpffs, cgroup, Hook};

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    /// Works, but something deserves a look.
    Warn,
    /// The filter cannot work (or cannot be trusted) until this is fixed.
    Fail,
    /// Could not be checked here (a tool is missing, say).
    Skip,
}

/// One check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
    pub detail: String,
    /// What to do about a warning or failure.
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Check {
        Check { name, outcome: Outcome::Pass, detail: detail.into(), fix: None }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name, outcome: Outcome::Fail, detail: detail.into(), fix: Some(fix.into()) }
    }

    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { name, outcome: Outcome::Warn, detail: detail.into(), fix: Some(fix.into()) }
    }

    fn skip(name: &'static str, detail: impl Into<String>) -> Check {
        Check { name, outcome: Outcome::Skip, detail: detail.into(), fix: None }
    }
}

/// Every check, in order.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    /// 0 when nothing failed, 1 otherwise.
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        i32::from(self.checks.iter().any(|c| c.outcome == Outcome::Fail))
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in &self.checks {
            let mark = match c.outcome {
                Outcome::Pass => "ok  ",
                Outcome::Warn => "warn",
                Outcome::Fail => "FAIL",
                Outcome::Skip => "skip",
            };
            writeln!(f, "{mark} {:<13} {}", c.name, c.detail)?;
            if let Some(fix) = &c.fix {
                writeln!(f, "     {:<13} fix: {fix}", "")?;
            }
        }
        let failed = self.checks.iter().filter(|c| c.outcome == Outcome::Fail).count();
        match failed {
            0 => writeln!(f, "\nthe filter can run on this node"),
            n => writeln!(f, "\n{n} check(s) failed"),
        }
    }
}

/// What to check against (the `run` flags that matter).
#[derive(Clone, Debug)]
pub struct Setup {
    pub pin_dir: PathBuf,
    pub attach_cgroup: Option<PathBuf>,
    pub listen: Option<SocketAddrV4>,
    pub upstream: SocketAddrV4,
}

/// Runs every check.
#[must_use]
pub fn run(setup: &Setup) -> Report {
    let root = cgroup::cgroup2_root();
    let attach = match &root {
        Ok(root) => Some(match &setup.attach_cgroup {
            Some(given) => cgroup::validate_attach_cgroup(root, given).map_err(|e| e.to_string()),
            None => cgroup::default_attach_cgroup(root).map_err(|e| e.to_string()),
        }),
        Err(_) => None,
    };
    let kernel = KernelVersion::current().map_err(|e| e.to_string());
    let mut checks = vec![check_kernel(&release(), &kernel), check_btf()];
    checks.push(match &root {
        Ok(root) => Check::pass("cgroup v2", format!("mounted at {}", root.display())),
        Err(e) => Check::fail(
            "cgroup v2",
            e.to_string(),
            "boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1), or mount cgroup2",
        ),
    });
    checks.push(match &attach {
        Some(Ok(path)) => Check::pass("pod cgroups", describe_hierarchy(path)),
        Some(Err(e)) => Check::fail(
            "pod cgroups",
            e.clone(),
            "pass --attach-cgroup with the kubelet's pod cgroup (kubepods.slice or kubepods)",
        ),
        None => Check::skip("pod cgroups", "no cgroup v2 mount"),
    });
    checks.push(check_bpffs(&setup.pin_dir));
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    checks.push(check_capabilities(&status, kernel.unwrap_or(MIN_KERNEL)));
    checks.push(match (&root, &attach) {
        (Ok(root), Some(Ok(path))) => check_conflicts(root, path, &setup.pin_dir),
        _ => Check::skip("conflicts", "no attach cgroup to look at"),
    });
    checks.push(check_node_backstop());
    checks.push(check_iptables());
    checks.push(check_listen(setup.listen));
    checks.push(check_upstream(setup.upstream));
    Report { checks }
}

/// The oldest kernel with every hook the filter uses (`cgroup/getpeername*` came in 5.8).
const MIN_KERNEL: KernelVersion = KernelVersion::new(5, 8, 0);

/// The kernel's release as `uname -r` prints it.
fn release() -> String {
    nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default()
}

/// `release` as `uname -r` says it; `version` as aya reads it (on Ubuntu, the upstream
/// version behind the distribution's release).
fn check_kernel(release: &str, version: &Result<KernelVersion, String>) -> Check {
    match version {
        Ok(v) if *v >= MIN_KERNEL => Check::pass("kernel", format!("Linux {release} ({v})")),
        Ok(v) => Check::fail(
            "kernel",
            format!("Linux {release} ({v}) is older than {MIN_KERNEL}"),
            "run a node image with Linux 5.8 or later",
        ),
        Err(e) => Check::warn("kernel", format!("cannot read the kernel's version: {e}"), "check `uname -r`"),
    }
}

fn check_node_backstop() -> Check {
    match kernel::backstop::probe() {
        (mechanism, Ok(found)) => Check::pass("node backstop", format!("{}: {found}", mechanism.name())),
        (mechanism, Err(why)) => Check::warn(
            "node backstop",
            format!("{} instead of netfilter: {why}", mechanism.name()),
            "tc covers every interface, but one created while no agent runs only once the agent is back; a kernel ≥ 6.4 with CONFIG_NETFILTER_BPF_LINK closes that window",
        ),
    }
}

fn check_btf() -> Check {
    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        Check::pass("btf", "/sys/kernel/btf/vmlinux present")
    } else {
        Check::fail("btf", "/sys/kernel/btf/vmlinux is missing", "run a kernel built with CONFIG_DEBUG_INFO_BTF=y")
    }
}

fn describe_hierarchy(path: &Path) -> String {
    let driver = match path.file_name().and_then(|n| n.to_str()) {
        Some("kubepods.slice") => " (kubelet with the systemd cgroup driver)",
        Some("kubepods") => " (kubelet with the cgroupfs driver)",
        _ => "",
    };
    format!("{}{driver}", path.display())
}

fn check_bpffs(pin_dir: &Path) -> Check {
    let on = if pin_dir.exists() { pin_dir } else { pin_dir.parent().unwrap_or(pin_dir) };
    if bpffs::is_bpffs(on) {
        Check::pass("bpffs", format!("{} is on bpffs", on.display()))
    } else if on == Path::new("/sys/fs/bpf") {
        Check::warn(
            "bpffs",
            "/sys/fs/bpf is not mounted; the agent will mount it",
            "mount it on the host so pins outlive the agent's pod: mount -t bpf bpf /sys/fs/bpf",
        )
    } else {
        Check::fail(
            "bpffs",
            format!("{} is not on a bpf filesystem: nothing can be pinned there", on.display()),
            "mount -t bpf bpf /sys/fs/bpf and use --bpffs /sys/fs/bpf/imds-filter (the default)",
        )
    }
}

/// Capabilities the agent needs, by bit, with what each is for.
const NEEDED: [(u32, &str, &str); 6] = [
    (39, "CAP_BPF", "load programs"),
    (38, "CAP_PERFMON", "use program maps"),
    (12, "CAP_NET_ADMIN", "attach cgroup programs"),
    (21, "CAP_SYS_ADMIN", "pin, detach and query"),
    (2, "CAP_DAC_READ_SEARCH", "open cgroups by id"),
    (24, "CAP_SYS_RESOURCE", "lift RLIMIT_MEMLOCK"),
];

/// From 5.11 the kernel charges BPF maps to the memory cgroup, not `RLIMIT_MEMLOCK`.
const MEMCG_ACCOUNTING: KernelVersion = KernelVersion::new(5, 11, 0);

/// Effective capabilities from `/proc/self/status`.
#[must_use]
pub fn effective_caps(status: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The capabilities the agent needs on `kernel`, from `/proc/self/status`.
#[must_use]
pub fn check_capabilities(status: &str, kernel: KernelVersion) -> Check {
    let Some(caps) = effective_caps(status) else {
        return Check::skip("capabilities", "cannot read CapEff");
    };
    let has = |bit: u32| caps & (1 << bit) != 0;
    let sys_admin = has(21);
    // Before CAP_BPF and CAP_PERFMON (5.8), CAP_SYS_ADMIN covered both.
    let missing: Vec<String> = NEEDED
        .iter()
        .filter(|(bit, ..)| !(has(*bit) || sys_admin && matches!(bit, 38 | 39)))
        .filter(|(bit, ..)| !(*bit == 24 && kernel >= MEMCG_ACCOUNTING))
        .map(|(_, name, why)| format!("{name} ({why})"))
        .collect();
    if missing.is_empty() {
        Check::pass("capabilities", "all the agent needs")
    } else {
        Check::fail(
            "capabilities",
            format!("missing {}", missing.join(", ")),
            "run as the DaemonSet does (docs/deploy.md lists each capability and why)",
        )
    }
}

/// Programs of others on our hooks of the attach cgroup and its ancestors: known-compatible
/// ones ([`known_compatible`]) pass, any other connect program fails (it may rewrite a
/// destination to or from the metadata address after ours), the rest warn.
fn check_conflicts(root: &Path, attach: &Path, pin_dir: &Path) -> Check {
    let ours: Vec<u32> =
        kernel::inspect::inspect(pin_dir).map(|s| s.links.iter().map(|l| l.prog_id).collect()).unwrap_or_default();
    let (mut compatible, mut foreign) = (Vec::new(), Vec::new());
    let mut rewriting = false;
    for dir in attach.ancestors().take_while(|d| d.starts_with(root)) {
        let Ok(attached) = kernel::attached_programs(dir) else { continue };
        for (hook, programs) in attached {
            for p in programs.iter().filter(|p| !ours.contains(&p.id)) {
                let name = if p.name.is_empty() { "unnamed" } else { p.name.as_str() };
                let found = format!("{hook:?} program {} ({name}) on {}", p.id, dir.display());
                if let Some(owner) = known_compatible(&p.name) {
                    compatible.push(format!("{found}: {owner}"));
                } else {
                    rewriting |= matches!(hook, Hook::Connect4 | Hook::Connect6);
                    foreign.push(found);
                }
            }
        }
    }
    if foreign.is_empty() {
        let detail = if compatible.is_empty() {
            format!("no other programs on our hooks of {} or above", attach.display())
        } else {
            format!("only programs known to work with the filter share our hooks: {}", compatible.join("; "))
        };
        return Check::pass("conflicts", detail);
    }
    let detail = format!("other programs share our hooks: {}", foreign.join("; "));
    let fix = "find their owner (bpftool cgroup tree); a connect program above ours runs after it and may send a \
               connection to 169.254.169.254 that ours never saw (the packet backstop then drops it), one below \
               runs before it; docs/networking.md";
    if rewriting {
        Check::fail("conflicts", detail, fix)
    } else {
        Check::warn("conflicts", detail, fix)
    }
}

/// Whose program this is, if it is one the filter is known to work with, by the name the
/// kernel keeps (15 bytes). Cilium's socket load balancer (`cil_sock4_connect`,
/// `cil_sock6_getpeername`, `cil_sock_release`…, on the cgroup root) runs after ours: it
/// sees the agent's address, which is no Service, and a Service it would translate to the
/// metadata address is dropped by the packet backstop (docs/networking.md).
#[must_use]
pub fn known_compatible(name: &str) -> Option<&'static str> {
    let cilium = ["cil_sock4_", "cil_sock6_", "cil_sock_relea"];
    cilium.iter().any(|p| name.starts_with(p)).then_some("Cilium's socket load balancer, compatible")
}

/// Lines of `iptables-save` that send metadata traffic elsewhere: NMI's `aad-metadata`
/// chain, kube2iam's and kiam's DNATs of 169.254.169.254.
#[must_use]
pub fn metadata_rules(iptables_save: &str) -> Vec<&str> {
    iptables_save
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.contains("aad-metadata")
                || (l.contains("169.254.169.254") && (l.contains("DNAT") || l.contains("REDIRECT")))
        })
        .collect()
}

fn check_iptables() -> Check {
    let out = match std::process::Command::new("iptables-save").arg("-t").arg("nat").output() {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            return Check::skip(
                "iptables",
                format!("iptables-save failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
            )
        }
        Err(e) => return Check::skip("iptables", format!("iptables-save not available: {e}")),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let found = metadata_rules(&text);
    if found.is_empty() {
        Check::pass("iptables", "no NMI, kube2iam or kiam rules for the metadata address")
    } else {
        Check::fail(
            "iptables",
            format!("leftover metadata rules: {}", found.join(" | ")),
            "remove them (uninstall NMI/kube2iam first; NMI's chain: iptables -t nat -F aad-metadata; iptables -t nat -X aad-metadata after removing its jump): exception pods' connections would be sent to a daemon that is gone",
        )
    }
}

fn check_listen(listen: Option<SocketAddrV4>) -> Check {
    let Some(listen) = listen else {
        return Check::skip("listen", "no --listen and no HOST_IP");
    };
    match UdpSocket::bind(SocketAddrV4::new(*listen.ip(), 0)) {
        Ok(_) if crate::server::listener::ephemeral(listen.port()) == Some(true) => Check::warn(
            "listen",
            format!("port {} is in net.ipv4.ip_local_port_range", listen.port()),
            "pick a port outside the range, or add it to net.ipv4.ip_local_reserved_ports: while no agent runs, \
             the kernel could hand it to any unbound socket, past the bind guard",
        ),
        Ok(_) => Check::pass("listen", format!("{} is an address of this node", listen.ip())),
        Err(e) => Check::fail(
            "listen",
            format!("{listen}: {e}"),
            "--listen must be an address of this node that pods can reach (the node's, from HOST_IP)",
        ),
    }
}

fn check_upstream(upstream: SocketAddrV4) -> Check {
    // A connection opened and closed: nothing is sent, so nothing is asked of IMDS.
    match TcpStream::connect_timeout(&SocketAddr::V4(upstream), Duration::from_secs(2)) {
        Ok(_) => Check::pass("upstream", format!("{upstream} accepts connections")),
        Err(e) => Check::fail(
            "upstream",
            format!("{upstream}: {e}"),
            "the agent must reach the metadata service from the node's network (hostNetwork)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_older_than_5_8_fail() {
        assert_eq!(check_kernel("x", &Ok(KernelVersion::new(5, 4, 0))).outcome, Outcome::Fail);
        assert_eq!(check_kernel("x", &Ok(KernelVersion::new(5, 8, 0))).outcome, Outcome::Pass);
        assert_eq!(check_kernel("x", &Ok(KernelVersion::new(6, 18, 44))).outcome, Outcome::Pass);
        assert_eq!(check_kernel("x", &Err("unreadable".into())).outcome, Outcome::Warn);
    }

    #[test]
    fn capabilities() {
        let caps = |bits: &[u32]| format!("CapEff:\t{:016x}\n", bits.iter().fold(0u64, |a, b| a | (1 << b)));
        let all = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert_eq!(check_capabilities(all, KernelVersion::new(6, 1, 0)).outcome, Outcome::Pass);
        // CAP_SYS_ADMIN stands in for CAP_BPF and CAP_PERFMON on older kernels.
        assert_eq!(check_capabilities(&caps(&[21, 12, 2, 24]), KernelVersion::new(5, 10, 0)).outcome, Outcome::Pass);
        let c = check_capabilities(&caps(&[21, 2, 24]), KernelVersion::new(6, 1, 0));
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.detail.contains("CAP_NET_ADMIN"), "{c:?}");
        // CAP_SYS_RESOURCE only matters where maps count against RLIMIT_MEMLOCK.
        assert_eq!(check_capabilities(&caps(&[39, 38, 21, 12, 2]), KernelVersion::new(6, 1, 0)).outcome, Outcome::Pass);
        let c = check_capabilities(&caps(&[39, 38, 21, 12, 2]), KernelVersion::new(5, 10, 0));
        assert!(c.outcome == Outcome::Fail && c.detail.contains("CAP_SYS_RESOURCE"), "{c:?}");
        assert_eq!(check_capabilities("nothing", KernelVersion::new(6, 1, 0)).outcome, Outcome::Skip);
    }

    #[test]
    fn leftover_metadata_rules_are_found() {
        // NMI's rules (aad-pod-identity v1.8) and a kube2iam DNAT, as iptables-save prints them.
        let save = "\
# Generated by iptables-save
*nat
:PREROUTING ACCEPT [0:0]
:aad-metadata - [0:0]
-A PREROUTING -j aad-metadata
-A aad-metadata ! -s 10.240.0.4/32 -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.240.0.4:2579
-A PREROUTING -d 169.254.169.254/32 -i cali+ -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.5:8181
-A POSTROUTING -s 10.244.0.0/16 -j MASQUERADE
COMMIT
";
        assert_eq!(metadata_rules(save).len(), 4);
        assert!(metadata_rules("*nat\n-A POSTROUTING -j MASQUERADE\nCOMMIT\n").is_empty());
    }

    #[test]
    fn cilium_socket_lb_is_told_from_other_programs() {
        // As the kernel keeps them: 15 bytes of the name.
        for name in ["cil_sock4_conne", "cil_sock6_conne", "cil_sock4_getpe", "cil_sock6_post_", "cil_sock_releas"] {
            assert!(known_compatible(name).is_some_and(|o| o.contains("Cilium")), "{name}");
        }
        for name in ["", "cil_from_contai", "cil_sock", "lb_connect4", "imds_connect4"] {
            assert_eq!(known_compatible(name), None, "{name}");
        }
    }

    #[test]
    fn any_failure_fails_the_report() {
        let ok = Report { checks: vec![Check::pass("a", "x"), Check::warn("b", "y", "z"), Check::skip("c", "w")] };
        assert_eq!(ok.exit_code(), 0);
        let bad = Report { checks: vec![Check::pass("a", "x"), Check::fail("b", "y", "z")] };
        assert_eq!(bad.exit_code(), 1);
        assert!(bad.to_string().contains("FAIL b"), "{bad}");
    }
}
