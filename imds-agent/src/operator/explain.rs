//! `imds-agent explain`: the policy simulator.
//!
//! For a pod and a request, it runs the same steps the agent runs: the kernel verdict of the
//! pod's cgroup, the request's route, then the policy's decision. It says at each step what it
//! found, so a "no" comes with the rule that said it. The decision's verdict and reason are
//! the decision log's own ([`Decision::verdict`], [`Decision::reason`]), so `explain` and the
//! log never disagree in words. Pure: the snapshot comes from the caller (a manifests
//! directory, or the running agent, which answers `/explain` with this function); [`gather`]
//! finds it for `imds-agent explain`.
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde::{Deserialize, Serialize};

use std::path::Path;

use anyhow::{bail, Context as _};

use crate::{
    caller::CgroupResolver,
    cli::ExplainArgs,
    imds::{self, PathRules, Route, TokenRequest},
    kernel::cgroup,
    operator::control::client::Client,
    policy::{
        Decision, PathDecision, Pod, PodVerdict, PolicySettings, Selector, Snapshot, BINDING_LABEL, MODE_ANNOTATION,
    },
    sources::{kube as kube_source, manifests},
};

/// The request `explain` asks about when no `--path` is given.
pub const DEFAULT_REQUEST: &str =
    "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://management.azure.com/";

/// Which pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodRef {
    /// `namespace/name`.
    Named {
        namespace: String,
        name: String,
    },
    Uid(String),
}

impl PodRef {
    /// `NAMESPACE/NAME`.
    pub fn parse(text: &str) -> Result<PodRef, String> {
        match text.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(PodRef::Named { namespace: ns.to_owned(), name: name.to_owned() })
            }
            _ => Err(format!("{text:?}: expected NAMESPACE/NAME")),
        }
    }

    fn find<'a>(&self, snapshot: &'a Snapshot) -> Option<&'a Pod> {
        match self {
            PodRef::Uid(uid) => snapshot.pod(uid),
            PodRef::Named { namespace, name } => snapshot.pods().find(|p| &p.namespace == namespace && &p.name == name),
        }
    }
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PodRef::Named { namespace, name } => write!(f, "{namespace}/{name}"),
            PodRef::Uid(uid) => write!(f, "uid {uid}"),
        }
    }
}

/// One finding on the way to the decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub step: String,
    pub finding: String,
}

/// The decision and how it was reached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// `namespace/name` of the pod, when it is known.
    pub pod: Option<String>,
    pub pod_uid: Option<String>,
    /// The request, as asked (path and query).
    pub request: String,
    /// The kernel verdict of the pod's cgroup: `pass`, `deny` or `redirect`.
    pub kernel: Option<String>,
    pub steps: Vec<Step>,
    /// The decision log's verdict (`allow`, `deny`, `exception`, `unknown-pod`, `invalid`,
    /// `forward`), or `kernel-deny` / `kernel-pass` when the request never reaches the agent.
    pub verdict: String,
    /// The decision log's reason.
    pub reason: String,
    /// The identity served, as the decision log names it.
    pub identity: Option<String>,
    /// What the client gets: an HTTP status, or 0 when `connect()` itself fails.
    pub status: u16,
}

impl Explanation {
    /// Exit status: 0 when the request would be answered with a token or forwarded, 1 when
    /// it would be refused.
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        i32::from(!matches!(self.verdict.as_str(), "allow" | "exception" | "forward" | "kernel-pass"))
    }
}

/// How the agent is configured, as far as decisions go.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub rules: PathRules,
    pub deny_unbound: bool,
}

/// Explains what happens to `request` (path and query) from `pod`.
#[must_use]
pub fn explain(snapshot: &Snapshot, settings: &Settings, pod: &PodRef, request: &str) -> Explanation {
    let mut out = Explanation {
        pod: None,
        pod_uid: None,
        request: request.to_owned(),
        kernel: None,
        steps: Vec::new(),
        verdict: String::new(),
        reason: String::new(),
        identity: None,
        status: 0,
    };
    let Some(found) = pod.find(snapshot) else {
        out.step("pod", format!("{pod} is not in the policy (not on this node, or not synced yet)"));
        let decision = Decision::UnknownPod;
        out.conclude(decision.verdict(), decision.reason(), StatusCode::NOT_FOUND.as_u16());
        return out;
    };
    out.pod = Some(format!("{}/{}", found.namespace, found.name));
    out.pod_uid = Some(found.uid.clone());
    let labels: Vec<String> = found.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    out.step("pod", format!("{}/{} (uid {}), labels: {}", found.namespace, found.name, found.uid, or_none(&labels)));
    if !out.kernel_steps(snapshot, settings, found) {
        return out; // the request never reaches the agent
    }
    let Some(token) = out.route(snapshot, settings, found, request) else {
        return out;
    };
    out.policy_steps(snapshot, found, &token);
    out
}

impl Explanation {
    fn step(&mut self, step: &str, finding: String) {
        self.steps.push(Step { step: step.to_owned(), finding });
    }

    fn conclude(&mut self, verdict: &str, reason: String, status: u16) {
        verdict.clone_into(&mut self.verdict);
        (self.reason, self.status) = (reason, status);
    }

    /// What the kernel does with the pod's connections; `false` when they never reach the
    /// agent (the explanation is then complete).
    fn kernel_steps(&mut self, snapshot: &Snapshot, settings: &Settings, pod: &Pod) -> bool {
        match snapshot.exception_for(pod) {
            Some(e) => {
                self.step(
                    "exception",
                    format!("matches AzurePodIdentityException {} (podLabels {:?})", e.name, e.pod_labels),
                );
            }
            None => match snapshot.matching_exception(pod) {
                Some(e) => self.step(
                    "exception",
                    format!(
                        "matches AzurePodIdentityException {}, not honoured: {} (an exception reaches the metadata service with every identity of the node)",
                        e.name,
                        snapshot.scope_rule(&pod.namespace).describe(&pod.namespace)
                    ),
                ),
                None => {
                    self.step("exception", format!("no AzurePodIdentityException in {} matches its labels", pod.namespace));
                }
            },
        }
        let verdict = snapshot.pod_verdict(pod, settings.deny_unbound);
        let name = match verdict {
            PodVerdict::Pass => "pass",
            PodVerdict::Deny => "deny",
            PodVerdict::Redirect => "redirect",
        };
        self.kernel = Some(name.to_owned());
        match verdict {
            PodVerdict::Pass => {
                self.step(
                    "kernel",
                    "PASS: its connections go to the metadata service directly; the agent sees nothing".into(),
                );
                let reason = snapshot.decide(&pod.uid, None).reason();
                self.conclude("kernel-pass", reason, StatusCode::OK.as_u16());
                false
            }
            PodVerdict::Deny => {
                self.step(
                    "kernel",
                    "DENY (--deny-unbound, and it is bound to no identity): connect() fails with EPERM".into(),
                );
                self.conclude("kernel-deny", "the pod is bound to no identity (--deny-unbound)".into(), 0);
                false
            }
            PodVerdict::Redirect => {
                self.step("kernel", "REDIRECT: its connections go to the agent, which decides per request".into());
                true
            }
        }
    }

    /// The request, routed as the agent routes it; the token request, if it is one.
    fn route(&mut self, snapshot: &Snapshot, settings: &Settings, pod: &Pod, request: &str) -> Option<TokenRequest> {
        let (path, query) = request.split_once('?').map_or((request, None), |(p, q)| (p, Some(q)));
        let mut headers = HeaderMap::new();
        headers.insert("metadata", HeaderValue::from_static("true"));
        match imds::route(&Method::GET, path, query, &headers) {
            Err(e) => {
                self.step("path", format!("refused before the policy: {} ({})", e.description, e.status));
                self.conclude("invalid", e.description, e.status.as_u16());
                None
            }
            Ok(Route::Metadata { path, .. }) => {
                self.path_steps(snapshot, settings, pod, &path);
                None
            }
            Ok(Route::Token(token)) => {
                let selector = token.selector.as_ref().map_or_else(|| "none".to_owned(), Selector::describe);
                self.step("path", format!("the token endpoint; resource {}, selector {selector}", token.resource));
                Some(token)
            }
        }
    }

    /// A metadata path other than the token endpoint: the node's rules, then the namespace's
    /// grants, then its decision.
    fn path_steps(&mut self, snapshot: &Snapshot, settings: &Settings, pod: &Pod, path: &str) {
        let node = if settings.rules.allows(path) { "allow it" } else { "do not allow it" };
        self.step("path", format!("{path}: another metadata path; the node's path rules {node}"));
        self.step("path grants", snapshot.describe_grants(&pod.namespace));
        let decision = snapshot.decide_path(Some(&pod.uid), path, &settings.rules);
        let (verdict, reason, status) = match decision {
            PathDecision::Refused(_) => (decision.verdict(), decision.reason(), StatusCode::FORBIDDEN),
            PathDecision::UnknownPod => (decision.verdict(), decision.reason(), StatusCode::NOT_FOUND),
            _ => (
                decision.verdict(),
                format!("{}: forwarded to the metadata service", decision.reason()),
                StatusCode::OK,
            ),
        };
        self.conclude(verdict, reason, status.as_u16());
    }

    /// The policy, step by step, then its decision.
    fn policy_steps(&mut self, snapshot: &Snapshot, pod: &Pod, token: &TokenRequest) {
        if snapshot.uses_workload_identity(pod) {
            let sa = &pod.service_account;
            self.step("workload identity", format!("used: tokens of ServiceAccount {sa}'s federated identity"));
        } else {
            match pod.labels.get(BINDING_LABEL) {
                None => self.step("binding label", format!("the pod has no {BINDING_LABEL} label")),
                Some(label) => self.step("binding label", format!("{BINDING_LABEL}={label}")),
            }
            let bound: Vec<String> = snapshot
                .bound_identities(pod)
                .iter()
                .map(|(i, b)| format!("{b} → {}/{} (client id {})", i.namespace, i.name, i.client_id))
                .collect();
            self.step("bindings", or_none(&bound));
        }
        self.step("identity scope", snapshot.scope_rule(&pod.namespace).describe(&pod.namespace));
        let audited = snapshot.audited(&pod.namespace);
        if audited {
            let note = format!("namespace {} is audited ({MODE_ANNOTATION}: audit)", pod.namespace);
            self.step("mode", format!("{note}: what would be refused is logged and forwarded as asked"));
        }
        let decision = snapshot.decide(&pod.uid, token.selector.as_ref());
        self.identity = decision.identity(&pod.namespace);
        let (verdict, reason, status) = match decision {
            Decision::Deny(_) if audited => (
                "audit-allow",
                format!("{}; namespace {} is audited: forwarded as asked", decision.reason(), pod.namespace),
                StatusCode::OK,
            ),
            Decision::Deny(_) => (decision.verdict(), decision.reason(), StatusCode::BAD_REQUEST),
            Decision::UnknownPod => (decision.verdict(), decision.reason(), StatusCode::NOT_FOUND),
            _ => (decision.verdict(), decision.reason(), StatusCode::OK),
        };
        self.conclude(verdict, reason, status.as_u16());
    }
}

fn or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "request  GET {}", self.request)?;
        for s in &self.steps {
            writeln!(f, "  {:<17} {}", s.step, s.finding)?;
        }
        let status = match self.status {
            0 => "connect() fails".to_owned(),
            n => format!("HTTP {n}"),
        };
        writeln!(f, "decision {}: {} ({status})", self.verdict, self.reason)?;
        if let Some(identity) = &self.identity {
            writeln!(f, "identity {identity}")?;
        }
        Ok(())
    }
}

/// `imds-agent explain`.
pub async fn gather(args: &ExplainArgs) -> anyhow::Result<Explanation> {
    let mut request = args.path.clone().unwrap_or_else(|| DEFAULT_REQUEST.to_owned());
    for (name, value) in
        [("client_id", &args.client_id), ("object_id", &args.object_id), ("mi_res_id", &args.mi_res_id)]
    {
        if let Some(value) = value {
            let sep = if request.contains('?') { '&' } else { '?' };
            let value: String = form_urlencoded::byte_serialize(value.as_bytes()).collect();
            request = format!("{request}{sep}{name}={value}");
        }
    }
    let (pod, cgroup_step) = match (&args.pod, &args.cgroup) {
        (Some(pod), _) => (PodRef::parse(pod).map_err(anyhow::Error::msg)?, None),
        (None, Some(cgroup)) => {
            let (uid, step) = pod_of_cgroup(cgroup)?;
            (PodRef::Uid(uid), Some(step))
        }
        (None, None) => bail!("give --pod NAMESPACE/NAME or --cgroup PATH|ID"),
    };
    let settings = Settings { deny_unbound: args.deny_unbound, ..Settings::default() };
    let policy = PolicySettings { default_scope: args.identity_scope_default, ..PolicySettings::default() };
    let mut explanation = if let Some(dir) = &args.manifests {
        let snapshot = manifests::load_dir(dir).with_context(|| format!("loading {}", dir.display()))?;
        explain(&snapshot.with_settings(policy), &settings, &pod, &request)
    } else if let Some(kubeconfig) = &args.kubeconfig {
        let PodRef::Named { namespace, name } = &pod else {
            bail!("--kubeconfig needs --pod NAMESPACE/NAME");
        };
        let client = crate::sources::kube_client(Some(kubeconfig)).await?;
        let snapshot = kube_source::snapshot_for_pod(client, namespace, name, policy)
            .await
            .context("listing the pod and the aad-pod-identity objects")?;
        explain(&snapshot, &settings, &pod, &request)
    } else {
        Client::new(&args.agent_socket)
            .explain(pod, request)
            .await
            .map_err(|e| anyhow::anyhow!("{e} (or decide over a directory with --manifests DIR)"))?
    };
    if let Some(step) = cgroup_step {
        explanation.steps.insert(0, step);
    }
    Ok(explanation)
}

/// The pod UID a cgroup (path or id) belongs to, and the step that says so.
fn pod_of_cgroup(cgroup: &str) -> anyhow::Result<(String, Step)> {
    let root = cgroup::cgroup2_root()?;
    let resolver = CgroupResolver::new(&root).context("opening the cgroup2 filesystem")?;
    let id = if let Ok(id) = cgroup.parse::<u64>() {
        id
    } else {
        let path = Path::new(cgroup);
        let full = if path.starts_with(&root) { path.to_owned() } else { root.join(cgroup.trim_start_matches('/')) };
        cgroup::cgroup_id(&full)?
    };
    let info = resolver.resolve(id)?.ok_or_else(|| anyhow::anyhow!("no cgroup with id {id}"))?;
    let uid = info.pod_uid.clone().ok_or_else(|| {
        anyhow::anyhow!("cgroup {} (id {id}) is not a pod's: the kubelet names pod cgroups pod<UID>", info.path)
    })?;
    let finding = format!("{} (id {id}) belongs to pod {uid}", info.path);
    Ok((uid, Step { step: "cgroup".into(), finding }))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::sources::manifests;

    /// The example manifests shipped in `deploy/examples`.
    fn examples() -> Snapshot {
        manifests::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")).expect("examples load")
    }

    fn ask(snapshot: &Snapshot, settings: &Settings, pod: &str, request: &str) -> Explanation {
        explain(snapshot, settings, &PodRef::parse(pod).unwrap(), request)
    }

    const CLIENT: &str = "6a3f2c1d-8e7b-4a5c-9d0e-1f2a3b4c5d6e";
    const OBJECT: &str = "5f1c0b9e-3d2a-4c1e-9b7a-0e6d4c3b2a19";
    const RESOURCE: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/shop-rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/blob-reader";

    /// Pod, request, `--deny-unbound`, verdict, a part of the reason, identity, status.
    type Case<'a> = (&'a str, String, bool, &'a str, &'a str, Option<&'a str>, u16);

    #[test]
    fn every_rule_of_the_example_policy() {
        let snapshot = examples();
        let token = |extra: &str| format!("{DEFAULT_REQUEST}{extra}");
        let cases: Vec<Case<'_>> = vec![
            (
                "shop/web",
                token(""),
                false,
                "allow",
                "no selector, so the first bound identity",
                Some("shop/blob-reader"),
                200,
            ),
            (
                "shop/web",
                token(&format!("&client_id={CLIENT}")),
                false,
                "allow",
                "the identity the request named",
                Some("shop/blob-reader"),
                200,
            ),
            (
                "shop/web",
                token(&format!("&object_id={OBJECT}")),
                false,
                "allow",
                "the identity the request named",
                Some("shop/blob-reader"),
                200,
            ),
            (
                "shop/web",
                token(&format!("&mi_res_id={RESOURCE}")),
                false,
                "allow",
                "the identity the request named",
                Some("shop/blob-reader"),
                200,
            ),
            (
                "shop/web",
                token("&client_id=00000000-0000-0000-0000-000000000001"),
                false,
                "deny",
                "not bound to the identity it asked for (client_id=00000000-0000-0000-0000-000000000001)",
                None,
                400,
            ),
            ("shop/web", token(&format!("&client_id={CLIENT}&object_id={OBJECT}")), false, "invalid", "", None, 400),
            ("shop/batch", token(""), false, "deny", "the pod has no aadpodidbinding label", None, 400),
            ("shop/batch", token(""), true, "kernel-deny", "bound to no identity", None, 0),
            (
                "shop/metrics-agent",
                token(""),
                false,
                "kernel-pass",
                "AzurePodIdentityException node-helpers",
                None,
                200,
            ),
            ("shop/ghost", token(""), false, "unknown-pod", "not known", None, 404),
            (
                "shop/web",
                "/metadata/instance?api-version=2021-02-01".into(),
                false,
                "deny",
                "the path is not allowed on this node, and namespace shop has no imds-filter.io/metadata-paths",
                None,
                403,
            ),
            (
                "shop/web",
                "/metadata/identity/oauth2/token%2f?api-version=2018-02-01&resource=r".into(),
                false,
                "invalid",
                "Invalid request path",
                None,
                400,
            ),
        ];
        for (pod, request, deny_unbound, verdict, reason, identity, status) in cases {
            let settings = Settings { deny_unbound, ..Settings::default() };
            let got = ask(&snapshot, &settings, pod, &request);
            assert_eq!(got.verdict, verdict, "{pod} {request}: {got}");
            assert!(got.reason.contains(reason), "{pod} {request}: {got}");
            assert_eq!(got.identity.as_deref(), identity, "{pod} {request}: {got}");
            assert_eq!(got.status, status, "{pod} {request}: {got}");
        }
    }

    #[test]
    fn the_steps_say_why() {
        let snapshot = examples();
        let got = ask(&snapshot, &Settings::default(), "shop/batch", DEFAULT_REQUEST);
        let text = got.to_string();
        assert!(text.contains("binding label     the pod has no aadpodidbinding label"), "{text}");
        assert!(text.contains("bindings          none"), "{text}");
        assert!(text.ends_with("decision deny: the pod has no aadpodidbinding label (HTTP 400)\n"), "{text}");
        assert_eq!(got.exit_code(), 1);
        let got = ask(&snapshot, &Settings::default(), "shop/web", DEFAULT_REQUEST);
        assert!(
            got.to_string().contains(&format!("blob-reader-binding → shop/blob-reader (client id {CLIENT})")),
            "{got}"
        );
        assert_eq!(got.exit_code(), 0);
    }

    #[test]
    fn path_grants_are_a_step() {
        let paths = crate::policy::NamespaceAnnotations {
            paths: Some("/metadata/scheduledevents"),
            ..crate::policy::NamespaceAnnotations::default()
        };
        let snapshot = examples().with_namespaces([crate::policy::NamespaceRules::parse("shop", paths).unwrap()]);
        let events = "/metadata/scheduledevents?api-version=2020-07-01";
        // Granted, even to an unbound pod under --deny-unbound: its connections reach the agent.
        let settings = Settings { deny_unbound: true, ..Settings::default() };
        let got = ask(&snapshot, &settings, "shop/batch", events);
        let text = got.to_string();
        assert!(
            text.contains(
                "path grants       namespace shop's imds-filter.io/metadata-paths grants /metadata/scheduledevents"
            ),
            "{text}"
        );
        assert!(text.contains("the node's path rules do not allow it"), "{text}");
        assert_eq!((got.verdict.as_str(), got.status, got.exit_code()), ("forward", 200, 0), "{text}");
        // Not granted: refused, and the node's rules can still allow it.
        let attested = "/metadata/attested/document?api-version=2020-09-01";
        let got = ask(&snapshot, &Settings::default(), "shop/web", attested);
        assert_eq!((got.verdict.as_str(), got.status, got.exit_code()), ("deny", 403, 1), "{got}");
        let node = Settings { rules: PathRules::Allow(vec!["/metadata/attested".into()]), ..Settings::default() };
        let got = ask(&snapshot, &node, "shop/web", attested);
        assert_eq!((got.verdict.as_str(), got.status), ("forward", 200), "{got}");
        assert!(got.reason.contains("node's path rules"), "{got}");
    }

    #[test]
    fn pod_names_must_be_namespaced() {
        assert!(PodRef::parse("web").is_err());
        assert!(PodRef::parse("shop/").is_err());
        assert!(PodRef::parse("a/b/c").is_err());
        assert_eq!(PodRef::parse("shop/web").unwrap().to_string(), "shop/web");
    }
}
