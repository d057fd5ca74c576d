//! Who may ask for another pod's token over NMI's `/host/token`: the Secrets Store CSI
//! driver's Azure provider mounts Key Vault objects into a pod with that pod's identity, and
//! names the pod in `podns`/`podname` headers. Anyone can send those headers, so the caller
//! itself must be trusted: a pod of a ServiceAccount the operator names
//! (`--host-token-caller NAMESPACE/SERVICEACCOUNT`), as the kernel attests the connection's
//! cgroup. The pod it names must be on this node; what it gets is what that pod's own request
//! would get from the policy.
use super::{Pod, Snapshot};

/// A ServiceAccount whose pods may call `/host/token`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedCaller {
    pub namespace: String,
    pub service_account: String,
}

impl std::str::FromStr for TrustedCaller {
    type Err = String;

    /// `NAMESPACE/SERVICEACCOUNT`: a DNS label (a namespace's name) and a DNS subdomain (a
    /// ServiceAccount's).
    fn from_str(text: &str) -> Result<Self, String> {
        let name = |s: &str, max: usize, dots: bool| {
            !s.is_empty()
                && s.len() <= max
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || (dots && b == b'.'))
        };
        match text.split_once('/') {
            Some((namespace, service_account)) if name(namespace, 63, false) && name(service_account, 253, true) => {
                Ok(TrustedCaller { namespace: namespace.to_owned(), service_account: service_account.to_owned() })
            }
            _ => Err(format!("{text:?} is not NAMESPACE/SERVICEACCOUNT")),
        }
    }
}

impl std::fmt::Display for TrustedCaller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

/// Why a `/host/token` request is not served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostTokenRefusal {
    /// The caller is not a pod the policy knows (a node process, or a pod not synced yet).
    UnknownCaller,
    /// The caller is a pod, but not of a trusted ServiceAccount.
    Untrusted { pod: String, service_account: String },
    /// The pod named is not on this node (or not known yet).
    UnknownPod { namespace: String, name: String },
}

impl HostTokenRefusal {
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            HostTokenRefusal::UnknownCaller => {
                "the caller is not a pod the agent knows, so not a trusted /host/token caller".into()
            }
            HostTokenRefusal::Untrusted { pod, service_account } => format!(
                "the caller {pod} (ServiceAccount {service_account}) is not a trusted /host/token caller (--host-token-caller)"
            ),
            HostTokenRefusal::UnknownPod { namespace, name } => {
                format!("no pod {namespace}/{name} on this node (or not known to the agent yet)")
            }
        }
    }
}

impl Snapshot {
    /// The pod a `/host/token` request from the pod `caller_uid` (`None`: not a pod) names,
    /// if the caller is trusted and the pod is on this node.
    ///
    /// # Errors
    /// Why not.
    pub fn host_token_target(
        &self,
        caller_uid: Option<&str>,
        trusted: &[TrustedCaller],
        namespace: &str,
        name: &str,
    ) -> Result<&Pod, HostTokenRefusal> {
        let caller = caller_uid.and_then(|uid| self.pods.get(uid)).ok_or(HostTokenRefusal::UnknownCaller)?;
        let is_trusted =
            trusted.iter().any(|t| t.namespace == caller.namespace && t.service_account == caller.service_account);
        if !is_trusted || caller.finished {
            return Err(HostTokenRefusal::Untrusted {
                pod: format!("{}/{}", caller.namespace, caller.name),
                service_account: caller.service_account.clone(),
            });
        }
        self.pods
            .values()
            .find(|p| p.namespace == namespace && p.name == name && !p.finished && self.knows_namespace(&p.namespace))
            .ok_or_else(|| HostTokenRefusal::UnknownPod { namespace: namespace.to_owned(), name: name.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, namespace: &str, service_account: &str) -> Pod {
        Pod {
            uid: uid.into(),
            namespace: namespace.into(),
            name: format!("{uid}-pod"),
            service_account: service_account.into(),
            ..Pod::default()
        }
    }

    #[test]
    fn only_a_trusted_callers_pods_may_name_a_pod_on_this_node() {
        let finished = Pod { finished: true, ..pod("done", "csi", "provider") };
        let snapshot = Snapshot::new(
            [
                pod("csi", "csi", "provider"),
                pod("imposter", "csi", "default"),
                pod("elsewhere", "tenant", "provider"),
                pod("web", "app", "default"),
                finished,
            ],
            [],
            [],
            [],
        );
        let trusted = ["csi/provider".parse::<TrustedCaller>().unwrap()];
        let ask = |caller: Option<&str>, namespace: &str, name: &str| {
            snapshot.host_token_target(caller, &trusted, namespace, name).map(|p| p.uid.clone())
        };
        assert_eq!(ask(Some("csi"), "app", "web-pod"), Ok("web".into()));
        assert_eq!(ask(None, "app", "web-pod"), Err(HostTokenRefusal::UnknownCaller));
        assert_eq!(ask(Some("ghost"), "app", "web-pod"), Err(HostTokenRefusal::UnknownCaller));
        // Same namespace, another ServiceAccount; same ServiceAccount name, another namespace.
        for caller in ["imposter", "elsewhere"] {
            assert!(matches!(ask(Some(caller), "app", "web-pod"), Err(HostTokenRefusal::Untrusted { .. })), "{caller}");
        }
        // A finished pod's cgroup is gone, and its name may be taken by another pod's.
        assert!(matches!(ask(Some("done"), "app", "web-pod"), Err(HostTokenRefusal::Untrusted { .. })));
        assert_eq!(
            ask(Some("csi"), "app", "nope"),
            Err(HostTokenRefusal::UnknownPod { namespace: "app".into(), name: "nope".into() })
        );
        assert!(ask(Some("csi"), "app", "nope").unwrap_err().describe().contains("no pod app/nope on this node"));
        for bad in ["csi", "csi/", "/provider", "CSI/provider", "csi/provider/x", "kube.system/provider"] {
            assert!(bad.parse::<TrustedCaller>().is_err(), "{bad}");
        }
    }
}
