//! P7: the agent's resident memory on a big node — 10,000 pod cgroups in the kubelet's
//! layout and 1,000 bindings — measured on the real binary once it has synced its kernel
//! verdicts for all of them.
use std::{fmt::Write as _, time::Duration};

use super::{Effort, Figure, Measured};
use crate::node::Node;

/// P7.
///
/// # Panics
/// When the agent cannot start.
pub fn run(effort: Effort) -> Figure {
    let (pods, bindings) = if effort.connects < 1000 { (200, 20) } else { (10_000, 1_000) };
    let mut node = Node::new("bench-p7", vec![]);
    let uid = |i: usize| format!("{:08x}-0000-4000-8000-{i:012x}", std::process::id());
    // Every tenth pod unbound, the others spread over the bindings; --deny-unbound makes the
    // unbound ones kernel entries too.
    let mut yaml = String::with_capacity(pods * 200 + bindings * 600);
    for b in 0..bindings {
        let _ = write!(
            yaml,
            "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata:\n  name: id{b}\n  namespace: ns{}\nspec:\n  type: 0\n  clientID: client-{b}\n  resourceID: /subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id{b}\n---\n\
             apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentityBinding\nmetadata:\n  name: b{b}\n  namespace: ns{}\nspec:\n  azureIdentity: id{b}\n  selector: sel{b}\n---\n",
            b % 50,
            b % 50
        );
    }
    for i in 0..pods {
        let b = i % bindings;
        let label = if i % 10 == 0 { String::from("{}") } else { format!("{{aadpodidbinding: sel{b}}}") };
        let _ = write!(
            yaml,
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: pod{i}\n  namespace: ns{}\n  uid: {}\n  labels: {label}\n---\n",
            b % 50,
            uid(i)
        );
    }
    // A manifests file holds at most 1,024 documents (the YAML parser's budget): split.
    let documents: Vec<&str> = yaml.split("---\n").filter(|d| !d.trim().is_empty()).collect();
    for (i, chunk) in documents.chunks(1000).enumerate() {
        node.write_manifest(&format!("policy-{i:03}.yaml"), &chunk.join("---\n"));
    }
    let cgroups: Vec<_> = (0..pods).map(|i| node.kubepods.child(&format!("pod{}", uid(i)))).collect();
    let agent = node.start_agent(&["--deny-unbound"]);
    agent.wait_for_log("kernel verdicts in place", Duration::from_mins(1));
    let synced =
        agent.log_lines().iter().find(|l| l["message"] == "kernel verdicts in place").cloned().unwrap_or_default();
    // Let the verdict sync run a few more of its one-second passes.
    std::thread::sleep(Duration::from_secs(3));
    let (rss, peak) = (agent.rss(), agent.peak_rss());
    let mib = |b: u64| f64::from(u32::try_from(b >> 10).unwrap_or(u32::MAX)) / 1024.0;
    let figure = Figure::new("P7", format!("agent RSS, {pods} pod cgroups and {bindings} bindings"), "MiB", "≤ 64 MiB");
    let summary = format!(
        "peak {:.1} MiB; the verdict sync saw {} pod cgroups and set {} entries",
        mib(peak),
        synced["pod_cgroups"],
        synced["set"]
    );
    node.agent = None; // stop it before its cgroups go
    drop(cgroups);
    figure.measured(Measured::of(vec![mib(rss)]), None).judged(mib(peak) <= 64.0).noted(summary)
}
