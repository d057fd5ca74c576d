//! Which pod a cgroup belongs to, read from the kubelet's cgroup naming.
//!
//! - cgroupfs driver: `/kubepods/<qos>/pod<UID>/<container id>`, Guaranteed pods
//!   `/kubepods/pod<UID>/…`;
//! - systemd driver: `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<UID with _>.slice/
//!   <runtime>-<id>.scope` (Guaranteed: `/kubepods.slice/kubepods-pod<UID_>.slice/…`), with
//!   runtime prefixes `cri-containerd-`, `crio-`, `docker-`.
//!
//! The hierarchy may sit below other cgroups (kind, nested runtimes), so the path is searched
//! for the pod component rather than matched from the root. Static pods have 32-hex-digit
//! UIDs (a hash) instead of dashed UUIDs; both are accepted.

/// The pod UID in a cgroup path (relative to the cgroup2 root), dashed as the API shows it.
#[must_use]
pub fn pod_uid(cgroup_path: &str) -> Option<String> {
    cgroup_path.split('/').find_map(pod_component)
}

fn pod_component(component: &str) -> Option<String> {
    // systemd: "kubepods-burstable-pod1234_5678….slice" / "kubepods-pod….slice"
    if let Some(stem) = component.strip_suffix(".slice") {
        let (prefix, uid) = stem.rsplit_once("-pod")?;
        if !(prefix == "kubepods" || prefix.starts_with("kubepods-")) {
            return None;
        }
        let uid = uid.replace('_', "-");
        return is_uid(&uid).then_some(uid);
    }
    // cgroupfs: "pod1234-5678-…"
    let uid = component.strip_prefix("pod")?;
    is_uid(uid).then(|| uid.to_owned())
}

/// A dashed UUID (8-4-4-4-12) or a 32-hex-digit static-pod hash.
fn is_uid(s: &str) -> bool {
    let hex = |p: &str| p.bytes().all(|b| b.is_ascii_hexdigit());
    match s.len() {
        32 => hex(s),
        36 => {
            let groups: Vec<&str> = s.split('-').collect();
            groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12]) && groups.iter().all(|g| hex(g))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "8d3b1f8e-7c1a-4b5e-9f2d-0a1b2c3d4e5f";
    const UID_: &str = "8d3b1f8e_7c1a_4b5e_9f2d_0a1b2c3d4e5f";
    const STATIC: &str = "6b1e2f3a4c5d6e7f8091a2b3c4d5e6f7";

    #[test]
    fn kubelet_layouts() {
        let cases = [
            // cgroupfs driver, each QoS class; container directories below
            (format!("/kubepods/burstable/pod{UID}/0123abcd"), Some(UID)),
            (format!("/kubepods/besteffort/pod{UID}/0123abcd"), Some(UID)),
            (format!("/kubepods/pod{UID}/0123abcd"), Some(UID)),
            (format!("/kubepods/pod{UID}"), Some(UID)),
            // systemd driver with containerd, CRI-O and Docker scopes
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-0123.scope"), Some(UID)),
            (format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-0123.scope"), Some(UID)),
            (format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-0123.scope"), Some(UID)),
            (format!("/kubepods.slice/kubepods-pod{UID_}.slice"), Some(UID)),
            // nested below other cgroups (kind, docker-in-docker)
            (format!("/system.slice/docker-abc.scope/kubelet.slice/kubepods.slice/kubepods-pod{UID_}.slice/x.scope"), Some(UID)),
            (format!("/docker/abc/kubepods/burstable/pod{UID}/ctr"), Some(UID)),
            // static pods
            (format!("/kubepods/burstable/pod{STATIC}/ctr"), Some(STATIC)),
            (format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC}.slice/crio-1.scope"), Some(STATIC)),
        ];
        for (path, want) in cases {
            assert_eq!(pod_uid(&path).as_deref(), want, "{path}");
        }
    }

    #[test]
    fn node_processes_and_lookalikes_are_not_pods() {
        let cases = [
            "/".to_owned(),
            "/system.slice/kubelet.service".to_owned(),
            "/system.slice/containerd.service".to_owned(),
            "/kubepods.slice/kubepods-burstable.slice".to_owned(),
            "/kubepods/burstable".to_owned(),
            "/user.slice/user-0.slice/session-1.scope".to_owned(),
            "/kubepods/burstable/podnot-a-uid/ctr".to_owned(),
            format!("/kubepods/burstable/pod{UID}x/ctr"),
            format!("/evil.slice/evil-pod{UID_}.slice"),
            format!("/kubepods/burstable/pod{}", &UID[..35]),
        ];
        for path in cases {
            assert_eq!(pod_uid(&path), None, "{path}");
        }
    }
}
