//! P6: how long a policy change takes to be enforced, from the manifest edit, with the real
//! agent binary watching a manifests directory. Two halves:
//!
//! - kernel verdict: an unbound pod, the agent with `--deny-unbound`; the change flips the
//!   pod's verdict between PASS (it matches an exception) and DENY (it no longer does), read
//!   from the pinned map, polled every 200 µs;
//! - agent decision: a bound pod relabelled from one identity's selector to the other's; a
//!   client in the pod asks for a token on a new connection in a loop and says when it first
//!   got the new identity's token.
use std::{
    net::SocketAddrV4,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::{HashMap, Map, MapData};
use imds_common::{maps, VERDICT_DENY, VERDICT_PASS};

use super::{Effort, Figure, Measured};
use crate::{
    fake_imds::{token_for, FakeIdentity},
    fixtures::{self, Manifest},
    node::{bound_pods_manifest, pod_uid, Node},
    Probe, IMDS_IP,
};

const NS: &str = "bench";
const RESOURCE: &str = "https://vault.azure.net";

/// The policy: identities `id0` and `id1`, the web pod bound to `web_to`'s, and the helper
/// pod matching the exception or not.
fn manifest(ids: &[FakeIdentity], web: &str, web_to: usize, helper: &str, exception: bool) -> String {
    let label = if exception { "node-helper" } else { "other" };
    let helpers = Manifest::new()
        .with(&fixtures::exception(NS, "helpers", &[("role", "node-helper")]))
        .with(&fixtures::pod(NS, "helper", helper).label("role", label));
    bound_pods_manifest(NS, ids, &[(web.to_owned(), web_to)]) + helpers.as_str()
}

fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_micros() as u64
}

/// P6.
///
/// # Panics
/// When the agent cannot start or a change is never enforced.
pub fn run(effort: Effort) -> Figure {
    let (kernel_changes, decision_changes) = if effort.connects < 1000 { (6, 4) } else { (200, 100) };
    let ids = [FakeIdentity::named("id0"), FakeIdentity::named("id1")];
    let mut node = Node::new("bench-p6", ids.to_vec());
    let (web_uid, helper_uid) = (pod_uid(), pod_uid());
    let policy = |web_to, exception| manifest(&ids, &web_uid, web_to, &helper_uid, exception);
    node.write_manifest("policy.yaml", &policy(0, false));
    let (web, helper) = (node.pod(&web_uid), node.pod(&helper_uid));
    node.start_agent(&["--deny-unbound"]);

    // The kernel half.
    let map = MapData::from_pin(node.pins.path.join(maps::VERDICTS)).expect("the pinned verdict map");
    let verdicts: HashMap<MapData, u64, u32> = HashMap::try_from(Map::HashMap(map)).expect("a hash map");
    let id = helper.cgroup.id();
    let wait_for = |want: u32| {
        let started = Instant::now();
        while verdicts.get(&id, 0).ok() != Some(want) {
            assert!(started.elapsed() < Duration::from_secs(10), "verdict {want} never arrived");
            std::thread::sleep(Duration::from_micros(200));
        }
    };
    wait_for(VERDICT_DENY);
    let mut kernel = Vec::with_capacity(kernel_changes);
    for i in 0..kernel_changes {
        let exception = i % 2 == 0;
        let started = Instant::now();
        node.write_manifest("policy.yaml", &policy(0, exception));
        wait_for(if exception { VERDICT_PASS } else { VERDICT_DENY });
        kernel.push(started.elapsed().as_secs_f64() * 1000.0);
        // Changes a person makes are not back to back: let the watcher settle.
        std::thread::sleep(Duration::from_millis(30));
    }

    // The decision half.
    let query = format!(
        "api-version=2018-02-01&resource={}",
        form_urlencoded::byte_serialize(RESOURCE.as_bytes()).collect::<String>()
    );
    let metadata = SocketAddrV4::new(IMDS_IP, 80);
    let mut decision = Vec::with_capacity(decision_changes);
    for i in 0..decision_changes {
        let to = (i + 1) % 2;
        let want = token_for(&ids[to].client_id, RESOURCE);
        let probe = Probe::new(web.ns(&node), &web.ctr).await_answer(metadata, &query, &want);
        // Let the client start asking (it gets the old identity's token meanwhile).
        std::thread::sleep(Duration::from_millis(100));
        let written = unix_us();
        node.write_manifest("policy.yaml", &policy(to, false));
        let report = probe.wait();
        let seen = report.seen_at_us.unwrap_or_else(|| panic!("the new identity never served: {report:?}"));
        decision.push(Duration::from_micros(seen.saturating_sub(written)).as_secs_f64() * 1000.0);
    }

    let p99 = |v: &[f64]| super::percentile(v, 99);
    let (kernel_p99, decision_p99) = (p99(&kernel), p99(&decision));
    let summary = format!(
        "kernel verdict p50 {:.1} ms, p99 {kernel_p99:.1} ms over {kernel_changes} changes; agent decision p50 {:.1} ms, p99 {decision_p99:.1} ms over {decision_changes} changes",
        super::percentile(&kernel, 50),
        super::percentile(&decision, 50),
    );
    drop((web, helper));
    Figure::new(
        "P6",
        "policy change → enforced (manifest edit to kernel verdict and agent decision)",
        "ms",
        "p99 ≤ 100 ms",
    )
    .measured(Measured::of([kernel, decision].concat()), None)
    .judged(kernel_p99.max(decision_p99) <= 100.0)
    .noted(summary)
}
