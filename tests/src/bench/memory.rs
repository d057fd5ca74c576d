//! P7: the agent's resident memory on a big node — 10,000 pod cgroups in the kubelet's
//! layout and 1,000 bindings — measured on the real binary once it has synced its kernel
//! verdicts for all of them. The full run also measures the node of `docs/scale.md`'s
//! cluster: 110 pods, with the whole cluster's 2,000 identities and 10,000 bindings.
use std::{fmt::Write as _, time::Duration};

use super::{Effort, Figure, Measured};
use crate::node::Node;

/// What the agent holds.
#[derive(Clone, Copy, Debug)]
struct Load {
    pods: usize,
    identities: usize,
    bindings: usize,
}

/// Resident and peak memory, MiB, and what the verdict sync reported.
fn measure(load: Load) -> (f64, f64, serde_json::Value) {
    let Load { pods, identities, bindings } = load;
    let mut node = Node::new("bench-p7", vec![]);
    let uid = |i: usize| format!("{:08x}-0000-4000-8000-{i:012x}", std::process::id());
    let ns = |i: usize| i % 50;
    // Bindings spread over the identities (and namespaces); every tenth pod unbound, the
    // others spread over the bindings. --deny-unbound makes the unbound ones kernel entries.
    let mut yaml = String::with_capacity(pods * 200 + identities * 400 + bindings * 250);
    for i in 0..identities {
        let _ = write!(
            yaml,
            "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentity\nmetadata:\n  name: id{i}\n  namespace: ns{}\nspec:\n  type: 0\n  clientID: client-{i}\n  resourceID: /subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id{i}\n---\n",
            ns(i)
        );
    }
    for b in 0..bindings {
        // Same namespace as its identity.
        let i = b % identities;
        let _ = write!(
            yaml,
            "apiVersion: aadpodidentity.k8s.io/v1\nkind: AzureIdentityBinding\nmetadata:\n  name: b{b}\n  namespace: ns{}\nspec:\n  azureIdentity: id{i}\n  selector: sel{b}\n---\n",
            ns(i)
        );
    }
    for p in 0..pods {
        let b = p % bindings;
        let label = if p % 10 == 0 { String::from("{}") } else { format!("{{aadpodidbinding: sel{b}}}") };
        let _ = write!(
            yaml,
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: pod{p}\n  namespace: ns{}\n  uid: {}\n  labels: {label}\n---\n",
            ns(b % identities),
            uid(p)
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
    node.agent = None; // stop it before its cgroups go
    drop(cgroups);
    (mib(rss), mib(peak), synced)
}

fn mib(bytes: u64) -> f64 {
    f64::from(u32::try_from(bytes >> 10).unwrap_or(u32::MAX)) / 1024.0
}

/// P7.
///
/// # Panics
/// When the agent cannot start.
pub fn run(effort: Effort) -> Figure {
    let quick = effort.connects < 1000;
    let big = if quick {
        Load { pods: 200, identities: 20, bindings: 20 }
    } else {
        Load { pods: 10_000, identities: 1_000, bindings: 1_000 }
    };
    let (rss, peak, synced) = measure(big);
    let figure = Figure::new(
        "P7",
        format!("agent RSS, {} pod cgroups and {} bindings", big.pods, big.bindings),
        "MiB",
        "≤ 64 MiB",
    );
    let mut summary = format!(
        "peak {peak:.1} MiB; the verdict sync saw {} pod cgroups and set {} entries",
        synced["pod_cgroups"], synced["set"]
    );
    if !quick {
        // The per-object costs docs/scale.md builds on.
        for load in
            [Load { pods: 0, identities: 1, bindings: 1 }, Load { pods: 110, identities: 2_000, bindings: 10_000 }]
        {
            let (rss, peak, _) = measure(load);
            let _ = write!(
                summary,
                "; with {} pods, {} identities and {} bindings: {rss:.1} MiB (peak {peak:.1})",
                load.pods, load.identities, load.bindings
            );
        }
    }
    figure.measured(Measured::of(vec![rss]), None).judged(peak <= 64.0).noted(summary)
}
