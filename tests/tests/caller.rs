//! cgroup id → cgroup path → pod, against real cgroups laid out like the kubelet's.
//! Needs root; run with `cargo xtask test`.
use imds_agent::{caller::CgroupResolver, kernel::cgroup};
use imds_tests::Cgroup;

const UID: &str = "8d3b1f8e-7c1a-4b5e-9f2d-0a1b2c3d4e5f";

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn cgroup_ids_resolve_to_their_pod_and_vanish_with_their_cgroup() {
    let root = cgroup::cgroup2_root().unwrap();
    let resolver = CgroupResolver::new(&root).unwrap();

    // systemd driver, below a test root (as on a nested node)
    let top = Cgroup::new_top("caller");
    let kubepods = top.child("kubepods.slice");
    let qos = kubepods.child("kubepods-burstable.slice");
    let pod = qos.child(&format!("kubepods-burstable-pod{}.slice", UID.replace('-', "_")));
    let ctr = pod.child("cri-containerd-0123abcd.scope");
    // cgroupfs driver
    let fs_kubepods = top.child("kubepods");
    let fs_pod = fs_kubepods.child(&format!("pod{UID}"));
    let fs_ctr = fs_pod.child("0123abcd");

    for cg in [&ctr, &pod, &fs_ctr, &fs_pod] {
        let info = resolver.resolve(cg.id()).unwrap().expect("an existing cgroup resolves");
        assert_eq!(root.join(info.path.trim_start_matches('/')), cg.path, "path of {}", cg.path.display());
        assert_eq!(info.pod_uid.as_deref(), Some(UID), "pod of {}", cg.path.display());
    }
    // Not a pod: the QoS level, and the test root.
    assert_eq!(resolver.resolve(qos.id()).unwrap().unwrap().pod_uid, None);
    assert_eq!(resolver.resolve(top.id()).unwrap().unwrap().pod_uid, None);
    assert_eq!(resolver.cached(), 6);

    // A cgroup that went away: no longer resolvable, and pruned from the cache.
    let gone = ctr.id();
    drop(ctr);
    assert_eq!(resolver.prune(), 1);
    assert_eq!(resolver.resolve(gone).unwrap(), None);
    assert_eq!(resolver.cached(), 5);
    drop((fs_ctr, fs_pod, fs_kubepods, pod, qos, kubepods, top));
}
