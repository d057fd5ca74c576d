//! The startup taint: a node is registered with it (kubelet `--register-with-taints`, a
//! node pool's taints), so the scheduler keeps pods off the node until the agent protects
//! it; the agent removes it from its own node once it is ready (programs attached, policy
//! synced, serving), and `imds-agent uninstall` puts it back.
//!
//! Nodes are best registered with it as `NoExecute`: the kubelet itself refuses pods that
//! do not tolerate a `NoExecute` taint, even those that name the node and bypass the
//! scheduler, and on a node that is just registering there is nothing to evict. The agent
//! removes the key whatever its effect. `uninstall` puts it back as `NoSchedule`, which keeps
//! new pods from being scheduled without evicting the running ones. Pods that tolerate every
//! taint still start, unfiltered until the agent's first install.
//!
//! The changes are merge patches of `spec.taints` carrying the Node's `resourceVersion`, so
//! a taint another controller adds meanwhile is never lost: the API server refuses the patch
//! (409), and the agent reads the Node again.
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::{
    api::{Patch, PatchParams},
    Api, Client,
};

/// The taint the chart registers nodes with, and the agent removes.
pub(crate) const DEFAULT_KEY: &str = "imds-filter.io/agent-not-ready";

/// The effect the taint is put back with.
pub(crate) const EFFECT: &str = "NoSchedule";

/// How often a change that lost a race is tried again before giving up.
const ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub(crate) enum TaintError {
    #[error("node {node}: {source}")]
    Api { node: String, source: kube::Error },
    #[error("node {node} changed {ATTEMPTS} times while its taints were being changed")]
    Contended { node: String },
}

/// `taints` without any taint with `key`; `None` when there is none to remove.
#[must_use]
pub(crate) fn without(taints: &[Taint], key: &str) -> Option<Vec<Taint>> {
    taints.iter().any(|t| t.key == key).then(|| taints.iter().filter(|t| t.key != key).cloned().collect())
}

/// `taints` with `key:NoSchedule`; `None` when a taint with `key` is there already (whatever
/// its effect: the operator chose it).
#[must_use]
pub(crate) fn with(taints: &[Taint], key: &str) -> Option<Vec<Taint>> {
    if taints.iter().any(|t| t.key == key) {
        return None;
    }
    let mut changed = taints.to_vec();
    changed.push(Taint { key: key.to_owned(), effect: EFFECT.to_owned(), ..Taint::default() });
    Some(changed)
}

/// Removes `key` from node `node`'s taints. `Ok(false)`: it had none.
///
/// # Errors
/// The API server refuses (RBAC, the node is gone), or the node keeps changing.
pub(crate) async fn remove(client: Client, node: &str, key: &str) -> Result<bool, TaintError> {
    change(client, node, |taints| without(taints, key)).await
}

/// Adds `key:NoSchedule` to node `node`'s taints. `Ok(false)`: it had it already.
///
/// # Errors
/// The API server refuses (RBAC, the node is gone), or the node keeps changing.
pub(crate) async fn restore(client: Client, node: &str, key: &str) -> Result<bool, TaintError> {
    change(client, node, |taints| with(taints, key)).await
}

/// Reads the node, and writes `edit`'s taints (if any) conditionally on the version read.
async fn change(client: Client, node: &str, edit: impl Fn(&[Taint]) -> Option<Vec<Taint>>) -> Result<bool, TaintError> {
    let nodes: Api<Node> = Api::all(client);
    let api = |source| TaintError::Api { node: node.to_owned(), source };
    for _ in 0..ATTEMPTS {
        let current = nodes.get(node).await.map_err(api)?;
        let taints = current.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or_default();
        let Some(taints) = edit(taints) else { return Ok(false) };
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": current.metadata.resource_version},
            "spec": {"taints": taints},
        });
        match nodes.patch(node, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(true),
            // Changed since it was read: read it again.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(e) => return Err(api(e)),
        }
    }
    Err(TaintError::Contended { node: node.to_owned() })
}

/// Once `ready` says so, removes the startup taint `key` from node `node`, trying again
/// with a growing pause while the API server refuses. Runs for the agent's life at most.
pub(crate) async fn remove_when_ready(client: Client, node: String, key: String, ready: impl Fn() -> bool) {
    while !ready() {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut pause = Duration::from_secs(1);
    loop {
        match remove(client.clone(), &node, &key).await {
            // Not allowed (RBAC, or the node-restriction policy): asking again will not help.
            Err(TaintError::Api { source: kube::Error::Api(status), .. }) if status.code == 403 => {
                return tracing::error!(
                    %node, taint = %key, reason = %status.message,
                    "not allowed to remove the startup taint; pods that do not tolerate it stay off this node"
                );
            }
            Ok(true) => {
                return tracing::info!(%node, taint = %key, "ready: removed the startup taint; pods may be scheduled here")
            }
            Ok(false) => return tracing::debug!(%node, taint = %key, "ready; the node has no startup taint"),
            Err(e) => tracing::warn!(
                error = %format!("{:#}", anyhow::Error::from(e)),
                retry_in_s = pause.as_secs(),
                "could not remove the startup taint; pods that do not tolerate it stay off this node"
            ),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_mins(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, effect: &str) -> Taint {
        Taint { key: key.to_owned(), effect: effect.to_owned(), ..Taint::default() }
    }

    #[test]
    fn removing_keeps_every_other_taint_in_order() {
        let others = [taint("node.kubernetes.io/not-ready", "NoExecute"), taint("dedicated", "NoSchedule")];
        let all = [others[0].clone(), taint(DEFAULT_KEY, "NoSchedule"), others[1].clone()];
        assert_eq!(without(&all, DEFAULT_KEY), Some(others.to_vec()));
        // Every effect the operator gave it goes.
        let twice = [taint(DEFAULT_KEY, "NoSchedule"), taint(DEFAULT_KEY, "NoExecute")];
        assert_eq!(without(&twice, DEFAULT_KEY), Some(vec![]));
        assert_eq!(without(&others, DEFAULT_KEY), None, "nothing to remove: no write");
        assert_eq!(without(&[], DEFAULT_KEY), None);
    }

    #[test]
    fn restoring_adds_no_schedule_once() {
        let other = taint("dedicated", "NoSchedule");
        assert_eq!(
            with(std::slice::from_ref(&other), DEFAULT_KEY),
            Some(vec![other.clone(), taint(DEFAULT_KEY, "NoSchedule")])
        );
        assert_eq!(with(&[taint(DEFAULT_KEY, "NoExecute")], DEFAULT_KEY), None, "the operator's effect stays");
    }
}
