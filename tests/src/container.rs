//! The shipped image, run by a real container runtime the way the DaemonSet runs it.
//!
//! [`DaemonSetRun`] reads the agent container of the rendered DaemonSet
//! (`deploy/kubernetes/imds-filter.yaml`): its capabilities, seccomp profile, root
//! filesystem, volumes and memory limit, and turns them into `podman run` flags, so the test
//! runs exactly what the manifest grants. Host paths that would be the machine's own node
//! state (the kubelet's pods, the handover directory) are mapped into the test's sandbox
//! node; every other host path must be one the sandbox may share (bpffs and cgroupfs, where
//! the test's pins and cgroups are its own), or the run refuses.
//!
//! podman runs rootful with runc (crun refuses hybrid cgroup layouts). [`Container`] removes
//! the container, and the cgroup directories runc leaves in cgroup v1 hierarchies, when
//! dropped.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Container as PodContainer, SecurityContext},
};

/// The image the tests run: `IMDS_TEST_IMAGE`, else what `cargo xtask test` builds.
#[must_use]
pub fn test_image() -> String {
    std::env::var("IMDS_TEST_IMAGE").unwrap_or_else(|_| "localhost/imds-agent:test".to_owned())
}

/// Whether podman holds `image`; the error says how to build it.
///
/// # Errors
/// podman is missing, or the image was not built.
pub fn check_image(image: &str) -> Result<(), String> {
    let exists = Command::new("podman").args(["image", "exists", image]).status();
    match exists {
        Ok(status) if status.success() => Ok(()),
        Ok(_) => Err(format!("no image {image}: build it with `cargo xtask image --tag {image}`")),
        Err(e) => Err(format!("podman: {e} (`cargo xtask setup` installs it)")),
    }
}

/// A volume the agent container mounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    pub volume: String,
    pub container_path: String,
    pub read_only: bool,
    /// `HostToContainer` becomes `rslave`.
    pub host_to_container: bool,
    pub source: Source,
}

/// Where a volume comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    HostPath(PathBuf),
    /// An `emptyDir` in memory, of this size (`1Mi`).
    Memory(String),
}

/// The agent container as the rendered DaemonSet runs it.
#[derive(Clone, Debug)]
pub struct DaemonSetRun {
    pub capabilities_add: Vec<String>,
    pub capabilities_drop: Vec<String>,
    /// `Unconfined`, `RuntimeDefault` or `Localhost`.
    pub seccomp: String,
    pub read_only_root: bool,
    pub allow_privilege_escalation: bool,
    pub host_network: bool,
    pub mounts: Vec<Mount>,
    /// `resources.limits.memory` (`128Mi`).
    pub memory_limit: String,
    /// The container's arguments, `$(VAR)` unexpanded.
    pub args: Vec<String>,
    /// The readiness probe's command.
    pub readiness: Vec<String>,
    pub grace_seconds: i64,
}

impl DaemonSetRun {
    /// The agent container of the rendered DaemonSet in `rendering` (YAML, several documents).
    ///
    /// # Panics
    /// The rendering has no DaemonSet, or one without what the agent container needs.
    #[must_use]
    pub fn from_rendering(rendering: &str) -> DaemonSetRun {
        let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(rendering).expect("YAML documents");
        let daemonset = documents.into_iter().find(|d| d["kind"] == "DaemonSet").expect("a DaemonSet");
        let daemonset: DaemonSet = serde_json::from_value(daemonset).expect("a DaemonSet Kubernetes accepts");
        let pod = daemonset.spec.template.spec.expect("a pod spec");
        let container: &PodContainer = &pod.containers[0];
        assert!(pod.security_context.is_none(), "a pod-level securityContext: express it here first");
        let security = container.security_context.clone().expect("a securityContext");
        // Every setting the run cannot express must be absent, so that "exactly" holds.
        let SecurityContext {
            allow_privilege_escalation,
            app_armor_profile,
            capabilities,
            privileged,
            proc_mount,
            read_only_root_filesystem,
            run_as_group,
            run_as_non_root,
            run_as_user,
            se_linux_options,
            seccomp_profile,
            windows_options,
        } = security;
        assert!(
            privileged != Some(true)
                && app_armor_profile.is_none()
                && proc_mount.is_none()
                && run_as_group.is_none()
                && run_as_non_root.is_none()
                && run_as_user.is_none()
                && se_linux_options.is_none()
                && windows_options.is_none(),
            "a securityContext setting the container run does not express"
        );
        let capabilities = capabilities.expect("capabilities");
        let seccomp = seccomp_profile.expect("the DaemonSet names its seccomp profile (the kubelet's default varies)");
        let volumes: BTreeMap<String, Source> = pod
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| {
                let source = match (v.host_path, v.empty_dir) {
                    (Some(host), _) => Source::HostPath(PathBuf::from(host.path)),
                    (None, Some(empty)) if empty.medium.as_deref() == Some("Memory") => {
                        Source::Memory(empty.size_limit.map_or_else(|| "1Mi".to_owned(), |q| q.0))
                    }
                    _ => panic!("volume {}: only hostPath and in-memory emptyDir are expected", v.name),
                };
                (v.name, source)
            })
            .collect();
        let mounts = container
            .volume_mounts
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|m| Mount {
                source: volumes.get(&m.name).unwrap_or_else(|| panic!("no volume {}", m.name)).clone(),
                host_to_container: match m.mount_propagation.as_deref() {
                    None | Some("None") => false,
                    Some("HostToContainer") => true,
                    Some(other) => panic!("mount {}: propagation {other} is not expressed here", m.name),
                },
                volume: m.name,
                container_path: m.mount_path,
                read_only: m.read_only.unwrap_or(false),
            })
            .collect();
        let exec = |probe: Option<&k8s_openapi::api::core::v1::Probe>| {
            probe.and_then(|p| p.exec.clone()).and_then(|e| e.command).unwrap_or_default()
        };
        DaemonSetRun {
            capabilities_add: capabilities.add.unwrap_or_default(),
            capabilities_drop: capabilities.drop.unwrap_or_default(),
            seccomp: seccomp.type_,
            read_only_root: read_only_root_filesystem.unwrap_or(false),
            allow_privilege_escalation: allow_privilege_escalation.unwrap_or(true),
            host_network: pod.host_network.unwrap_or(false),
            mounts,
            memory_limit: container
                .resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .and_then(|l| l.get("memory"))
                .map(|q| q.0.clone())
                .expect("a memory limit"),
            args: container.args.clone().unwrap_or_default(),
            readiness: exec(container.readiness_probe.as_ref()),
            grace_seconds: pod.termination_grace_period_seconds.unwrap_or(30),
        }
    }

    /// The `podman run` flags that grant what the DaemonSet grants: capabilities, seccomp,
    /// privilege escalation, root filesystem, mounts and memory limit. `host_path` says where
    /// each host path is in the sandbox (`None`: refuse to run).
    ///
    /// # Panics
    /// A host path `host_path` does not map, or a setting this function cannot express.
    #[must_use]
    pub fn podman_flags(&self, host_path: impl Fn(&Path) -> Option<PathBuf>) -> Vec<String> {
        let mut flags = Vec::new();
        for cap in &self.capabilities_drop {
            flags.extend(["--cap-drop".to_owned(), cap.clone()]);
        }
        for cap in &self.capabilities_add {
            flags.extend(["--cap-add".to_owned(), cap.clone()]);
        }
        match self.seccomp.as_str() {
            "Unconfined" => flags.extend(["--security-opt".to_owned(), "seccomp=unconfined".to_owned()]),
            // podman's own default profile stands for the runtime's.
            "RuntimeDefault" => {}
            other => panic!("seccomp profile {other}: not expressible here"),
        }
        if !self.allow_privilege_escalation {
            flags.extend(["--security-opt".to_owned(), "no-new-privileges".to_owned()]);
        }
        if self.read_only_root {
            flags.extend(["--read-only".to_owned(), "--read-only-tmpfs=false".to_owned()]);
        }
        for mount in &self.mounts {
            match &mount.source {
                Source::Memory(size) => {
                    let size = size.replace("Mi", "m").replace("Gi", "g");
                    flags.extend(["--tmpfs".to_owned(), format!("{}:rw,size={size}", mount.container_path)]);
                }
                Source::HostPath(path) => {
                    let on_host = host_path(path).unwrap_or_else(|| {
                        panic!("the DaemonSet mounts {} ({}): map it into the sandbox", path.display(), mount.volume)
                    });
                    let mut options = vec![if mount.read_only { "ro" } else { "rw" }];
                    if mount.host_to_container {
                        options.push("rslave");
                    }
                    flags.extend([
                        "--volume".to_owned(),
                        format!("{}:{}:{}", on_host.display(), mount.container_path, options.join(",")),
                    ]);
                }
            }
        }
        flags.extend(["--memory".to_owned(), self.memory_limit.replace("Mi", "m").replace("Gi", "g")]);
        flags
    }

    /// The capabilities the container's processes hold: those added, given that `ALL` are
    /// dropped (Linux's names, `CAP_…`).
    #[must_use]
    pub fn granted(&self) -> Vec<String> {
        assert!(self.capabilities_drop.iter().any(|c| c == "ALL"), "the DaemonSet drops every capability first");
        self.capabilities_add.iter().map(|c| format!("CAP_{c}")).collect()
    }
}

/// A container the test starts (by name), removed with its cgroup leftovers on drop.
pub struct Container {
    pub name: String,
    /// Directories runc will make in cgroup v1 hierarchies that did not exist before.
    leftovers: Vec<PathBuf>,
}

impl Container {
    /// A guard for the container `name`, to be made below `cgroup_parent` (a path from the
    /// hierarchy's root whose top directory the test made). Call it before `podman run`:
    /// only the v1 directories that do not exist yet are removed on drop.
    ///
    /// # Panics
    /// `cgroup_parent` is not a plain path below the root.
    #[must_use]
    pub fn new(name: &str, cgroup_parent: Option<&str>) -> Container {
        let leftovers = cgroup_parent.map_or_else(Vec::new, |parent| {
            let parent = Path::new(parent);
            assert!(
                parent.has_root()
                    && parent.components().skip(1).all(|c| matches!(c, std::path::Component::Normal(_)))
                    && parent.components().count() > 1,
                "{}: a cgroup below the root, made by the test",
                parent.display()
            );
            let top = parent.components().nth(1).expect("a top directory");
            v1_hierarchies().into_iter().map(|h| h.join(top)).filter(|dir| !dir.exists()).collect()
        });
        Container { name: name.to_owned(), leftovers }
    }

    /// The container's main process, as the host sees it.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        let out = Command::new("podman").args(["inspect", "--format", "{{.State.Pid}}", &self.name]).output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok().filter(|pid| *pid != 0)
    }

    /// Runs `command` in the container (`podman exec`): its exit code and output.
    #[must_use]
    pub fn exec(&self, command: &[String]) -> (Option<i32>, String) {
        let out = Command::new("podman").arg("exec").arg(&self.name).args(command).output().expect("podman exec");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rm", "--force", "--time", "0", &self.name]).output();
        // runc makes the parent in every cgroup v1 hierarchy of a hybrid layout and leaves it.
        for dir in &self.leftovers {
            remove_tree(dir);
        }
    }
}

/// The mount points of cgroup v1 hierarchies (none on a unified layout).
fn v1_hierarchies() -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|line| procfs::process::MountInfo::from_line(line).ok())
        .filter(|m| m.fs_type == "cgroup")
        .map(|m| m.mount_point)
        .collect()
}

/// Removes a cgroup directory tree, deepest first (cgroup directories hold only their
/// control files, which `rmdir` takes with them).
fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// `--ulimit` flags this machine's runtime accepts: the hard limits the test itself has
/// (podman's defaults can exceed what an unprivileged-in-practice root may set), with the
/// process count no higher than the kernel's pid limit.
#[must_use]
pub fn ulimit_flags() -> Vec<String> {
    use nix::sys::resource::{getrlimit, Resource};
    let (_, files) = getrlimit(Resource::RLIMIT_NOFILE).expect("RLIMIT_NOFILE");
    let (_, procs) = getrlimit(Resource::RLIMIT_NPROC).expect("RLIMIT_NPROC");
    let pid_max: u64 =
        std::fs::read_to_string("/proc/sys/kernel/pid_max").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(32_768);
    let procs = procs.min(pid_max);
    vec!["--ulimit".into(), format!("nofile={files}:{files}"), "--ulimit".into(), format!("nproc={procs}:{procs}")]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rendered_daemonset_reads_as_a_container_run() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/imds-filter.yaml");
        let run = DaemonSetRun::from_rendering(&std::fs::read_to_string(path).expect("the rendering"));
        assert!(run.host_network && run.read_only_root);
        assert!(run.granted().contains(&"CAP_BPF".to_owned()));
        let mapped = |p: &Path| Some(Path::new("/sandbox").join(p.strip_prefix("/").expect("absolute")));
        let flags = run.podman_flags(mapped).join(" ");
        assert!(flags.contains("--cap-drop ALL"), "{flags}");
        assert!(flags.contains("--volume /sandbox/sys/fs/bpf:/sys/fs/bpf:rw,rslave"), "{flags}");
        assert!(flags.contains("--tmpfs /tmp:rw,size=1m"), "{flags}");
        assert!(flags.contains("--memory 128m"), "{flags}");
        assert!(run.readiness.ends_with(&["health".to_owned(), "--ready".to_owned()]), "{:?}", run.readiness);
    }
}
