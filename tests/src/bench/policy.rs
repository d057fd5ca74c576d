//! P6: how long a policy change takes to be enforced — from the manifest edit to the kernel
//! verdict for the pod's cgroup, with the real agent binary watching a manifests directory.
//!
//! The pod is unbound and the agent runs with `--deny-unbound`, so the change flips the
//! pod's kernel verdict between PASS (it matches an exception) and DENY (it no longer does);
//! the verdict is read from the pinned map, polled every 200 µs.
use std::time::{Duration, Instant};

use aya::maps::{HashMap, Map, MapData};
use imds_common::{maps, VERDICT_DENY, VERDICT_PASS};

use super::{Effort, Figure, Measured};
use crate::node::Node;

const NS: &str = "bench";

fn manifest(uid: &str, exception: bool) -> String {
    let label = if exception { "node-helper" } else { "other" };
    format!(
        "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzurePodIdentityException\nmetadata:\n  name: helpers\n  namespace: {NS}\nspec:\n  podLabels:\n    role: node-helper\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata:\n  name: helper\n  namespace: {NS}\n  uid: {uid}\n  labels:\n    role: {label}\n"
    )
}

/// P6.
///
/// # Panics
/// When the agent cannot start or a change is never enforced.
pub fn run(effort: Effort) -> Figure {
    let changes = if effort.connects < 1000 { 6 } else { 200 };
    let mut node = Node::new("bench-p6", vec![]);
    let uid = format!("{:08x}-0000-4000-8000-0000000000b6", std::process::id());
    node.write_manifest("policy.yaml", &manifest(&uid, false));
    let pod = node.pod(&uid);
    node.start_agent(&["--deny-unbound"]);
    let map = MapData::from_pin(node.pins.path.join(maps::VERDICTS)).expect("the pinned verdict map");
    let verdicts: HashMap<MapData, u64, u32> = HashMap::try_from(Map::HashMap(map)).expect("a hash map");
    let id = pod.cgroup.id();
    let wait_for = |want: u32| {
        let started = Instant::now();
        while verdicts.get(&id, 0).ok() != Some(want) {
            assert!(started.elapsed() < Duration::from_secs(10), "verdict {want} never arrived");
            std::thread::sleep(Duration::from_micros(200));
        }
    };
    wait_for(VERDICT_DENY);
    let mut took = Vec::with_capacity(changes);
    for i in 0..changes {
        let exception = i % 2 == 0;
        let started = Instant::now();
        node.write_manifest("policy.yaml", &manifest(&uid, exception));
        wait_for(if exception { VERDICT_PASS } else { VERDICT_DENY });
        took.push(started.elapsed().as_secs_f64() * 1000.0);
        // Changes a person makes are not back to back: let the watcher settle.
        std::thread::sleep(Duration::from_millis(30));
    }
    let p99 = super::percentile(&took, 99);
    let figure = Figure::new("P6", "policy change → kernel verdict (manifest edit, real agent)", "ms", "p99 ≤ 100 ms");
    let summary = format!("p99 {p99:.1} ms over {changes} changes; the agent-decision half is not measured yet");
    drop(pod);
    figure.measured(Measured::of(took), None).judged(p99 <= 100.0).noted(summary)
}
