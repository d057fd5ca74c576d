use std::collections::BTreeMap;

use super::*;

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn pod(uid: &str, ns: &str, l: &[(&str, &str)]) -> Pod {
    Pod {
        uid: uid.into(),
        namespace: ns.into(),
        name: format!("pod-{uid}"),
        labels: labels(l),
        service_account: "default".into(),
        ..Pod::default()
    }
}

#[test]
fn pods_the_filter_cannot_contain_say_why() {
    let powers = |containers: &[(bool, &[&str], &[&str])]| {
        let mut p = Powers::default();
        for (privileged, add, drop) in containers {
            let owned = |l: &[&str]| l.iter().map(|c| (*c).to_owned()).collect::<Vec<_>>();
            p.add_container(*privileged, &owned(add), &owned(drop));
        }
        p
    };
    let with = |host_network: bool, powers: Powers| Pod { host_network, powers, ..pod("u", "ns", &[]) };
    // An ordinary pod keeps NET_RAW, and the node backstop contains it.
    assert!(with(false, powers(&[(false, &[], &[])])).uncontained().is_empty());
    // In the node's namespace, keeping NET_RAW is enough: it sees the node's traffic.
    assert_eq!(with(true, powers(&[(false, &[], &[])])).uncontained(), ["hostNetwork with CAP_NET_RAW"]);
    assert!(with(true, powers(&[(false, &[], &["ALL"])])).uncontained().is_empty());
    assert!(with(true, powers(&[(false, &[], &["cap_net_raw"])])).uncontained().is_empty());
    // One container that keeps it is enough.
    let mixed = powers(&[(false, &[], &["NET_RAW"]), (false, &[], &[])]);
    assert_eq!(with(true, mixed).uncontained(), ["hostNetwork with CAP_NET_RAW"]);
    assert_eq!(
        with(true, powers(&[(false, &["NET_ADMIN"], &["ALL"])])).uncontained(),
        ["hostNetwork with CAP_NET_ADMIN"]
    );
    assert_eq!(with(false, powers(&[(true, &[], &["ALL"])])).uncontained(), ["privileged"]);
    assert_eq!(
        with(false, powers(&[(false, &["CAP_SYS_ADMIN", "bpf"], &[])])).uncontained(),
        ["CAP_SYS_ADMIN", "CAP_BPF"]
    );
    assert_eq!(with(false, powers(&[(false, &["ALL"], &[])])).uncontained(), ["CAP_SYS_ADMIN", "CAP_BPF"]);
}

fn identity(ns: &str, name: &str, client: &str) -> Identity {
    Identity {
        namespace: ns.into(),
        name: name.into(),
        kind: IdentityType::UserAssignedMsi,
        client_id: client.into(),
        resource_id: format!(
            "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}"
        ),
        object_id: Some(format!("obj-{client}")),
        service_principal: None,
    }
}

fn binding(ns: &str, name: &str, identity: &str, selector: &str) -> Binding {
    Binding { namespace: ns.into(), name: name.into(), identity: identity.into(), selector: selector.into() }
}

/// app/web is bound to "blob" (client c-blob); app/multi to "table" and "kv" through one
/// selector; app/plain has no label; app/exc and app/exc2 are exceptions; other/web
/// carries app's selector in another namespace.
fn world() -> Snapshot {
    Snapshot::new(
        [
            pod("web", "app", &[("aadpodidbinding", "blob-sel")]),
            pod("multi", "app", &[("aadpodidbinding", "multi-sel")]),
            pod("plain", "app", &[]),
            pod("exc", "app", &[("role", "Kubelet-Helper"), ("aadpodidbinding", "blob-sel")]),
            pod("exc2", "other", &[("role", "kubelet-helper")]),
            pod("foreign", "other", &[("aadpodidbinding", "blob-sel")]),
            pod("dangling", "app", &[("aadpodidbinding", "ghost-sel")]),
        ],
        [
            identity("app", "blob", "c-blob"),
            identity("app", "table", "c-table"),
            identity("app", "kv", "c-kv"),
            identity("other", "elsewhere", "c-else"),
        ],
        [
            binding("app", "blob-binding", "blob", "blob-sel"),
            binding("app", "table-binding", "table", "multi-sel"),
            binding("app", "kv-binding", "kv", "multi-sel"),
            binding("app", "ghost-binding", "no-such-identity", "ghost-sel"),
        ],
        [Exception {
            namespace: "app".into(),
            name: "helpers".into(),
            pod_labels: labels(&[("role", "kubelet-helper")]),
        }],
    )
}

fn allowed<'a>(d: &Decision<'a>) -> Option<(&'a str, Choice)> {
    match d {
        Decision::Allow { identity, choice, .. } => Some((identity.name.as_str(), *choice)),
        _ => None,
    }
}

#[test]
fn decisions_table() {
    let w = world();
    let client = |c: &str| Some(Selector::ClientId(c.into()));
    let cases: Vec<(&str, Option<Selector>, Decision<'_>)> = vec![
        // bound pod, no selector: its only identity
        (
            "web",
            None,
            Decision::Allow {
                identity: &w.identities[&("app".into(), "blob".into())],
                binding: "blob-binding",
                choice: Choice::FirstByName,
                fetch: FetchBy::ClientId("c-blob".into()),
            },
        ),
        // bound pod naming its own identity, any case
        (
            "web",
            client("C-BLOB"),
            Decision::Allow {
                identity: &w.identities[&("app".into(), "blob".into())],
                binding: "blob-binding",
                choice: Choice::Requested,
                fetch: FetchBy::ClientId("c-blob".into()),
            },
        ),
        // another identity's client id
        (
            "web",
            client("c-table"),
            Decision::Deny(DenyReason::SelectorNotBound { selector: Selector::ClientId("c-table".into()) }),
        ),
        // no label
        ("plain", None, Decision::Deny(DenyReason::NoBindingLabel)),
        // label whose binding names a missing identity
        ("dangling", None, Decision::Deny(DenyReason::NoBinding { label: "ghost-sel".into() })),
        // same selector in another namespace binds nothing there
        ("foreign", None, Decision::Deny(DenyReason::NoBinding { label: "blob-sel".into() })),
        // exception (value case-insensitive), even with a binding label
        ("exc", None, Decision::Exception { exception: "helpers" }),
        // an exception only covers its own namespace
        ("exc2", None, Decision::Deny(DenyReason::NoBindingLabel)),
        ("nobody", None, Decision::UnknownPod),
    ];
    for (uid, sel, want) in cases {
        assert_eq!(w.decide(uid, sel.as_ref()), want, "pod {uid} selector {sel:?}");
    }
}

#[test]
fn two_identities_on_one_selector() {
    let w = world();
    // No selector: the name that sorts first ("kv" < "table"), whatever the binding order.
    assert_eq!(allowed(&w.decide("multi", None)), Some(("kv", Choice::FirstByName)));
    let by = |s: Selector| allowed(&w.decide("multi", Some(&s)));
    assert_eq!(by(Selector::ClientId("c-table".into())), Some(("table", Choice::Requested)));
    assert_eq!(by(Selector::ObjectId("OBJ-c-table".into())), Some(("table", Choice::Requested)));
    let table_rid = w.identities[&("app".into(), "table".into())].resource_id.to_uppercase();
    assert_eq!(by(Selector::ResourceId(table_rid)), Some(("table", Choice::Requested)));
    assert_eq!(by(Selector::ClientId("c-blob".into())), None);
    assert_eq!(by(Selector::ObjectId("obj-c-blob".into())), None);
    assert_eq!(by(Selector::ResourceId(String::new())), None);
}

#[test]
fn object_id_needs_the_annotation() {
    let mut i = identity("app", "blob", "c-blob");
    i.object_id = None;
    assert!(!Selector::ObjectId("obj-c-blob".into()).matches(&i));
    assert!(Selector::ClientId("c-blob".into()).matches(&i));
}

#[test]
fn kernel_verdicts_table() {
    let w = world();
    let cases = [
        ("web", false, PodVerdict::Redirect),
        ("web", true, PodVerdict::Redirect),
        ("plain", false, PodVerdict::Redirect),
        ("plain", true, PodVerdict::Deny),
        ("dangling", true, PodVerdict::Deny),
        ("exc", false, PodVerdict::Pass),
        ("exc", true, PodVerdict::Pass),
    ];
    for (uid, deny_unbound, want) in cases {
        assert_eq!(w.pod_verdict(w.pod(uid).unwrap(), deny_unbound), want, "{uid} deny_unbound={deny_unbound}");
    }
}

#[test]
fn duplicate_bindings_to_one_identity_count_once() {
    let w = Snapshot::new(
        [pod("p", "ns", &[("aadpodidbinding", "s")])],
        [identity("ns", "i", "c")],
        [binding("ns", "b1", "i", "s"), binding("ns", "b2", "i", "s")],
        [],
    );
    assert_eq!(w.bound_identities(w.pod("p").unwrap()).len(), 1);
}

/// (mode, default tenant, pod, selector, decision)
type Case = (WorkloadMode, Option<&'static str>, &'static str, Option<Selector>, &'static str);

/// Workload identity: who opts in, which ServiceAccount's identity they get, and what
/// they may name.
#[test]
fn workload_identity_table() {
    let sa = |name: &str, client: Option<&str>, tenant: Option<&str>| ServiceAccount {
        namespace: "app".into(),
        name: name.into(),
        client_id: client.map(Into::into),
        tenant_id: tenant.map(Into::into),
    };
    let with_sa = |mut p: Pod, account: &str| {
        p.service_account = account.into();
        p
    };
    let wi = [(WORKLOAD_LABEL, "true")];
    let world = |mode, default_tenant: Option<&str>| {
        Snapshot::new(
            [
                with_sa(pod("wi", "app", &wi), "fed"),
                with_sa(pod("wi-untenanted", "app", &wi), "fed-no-tenant"),
                with_sa(pod("wi-plain-sa", "app", &wi), "plain"),
                with_sa(pod("wi-bound", "app", &[(WORKLOAD_LABEL, "true"), ("aadpodidbinding", "blob-sel")]), "fed"),
                with_sa(pod("unlabelled", "app", &[]), "fed"),
                with_sa(pod("wi-exc", "app", &[(WORKLOAD_LABEL, "true"), ("role", "helper")]), "fed"),
            ],
            [identity("app", "blob", "c-blob")],
            [binding("app", "blob-binding", "blob", "blob-sel")],
            [Exception { namespace: "app".into(), name: "helpers".into(), pod_labels: labels(&[("role", "helper")]) }],
        )
        .with_service_accounts([
            sa("fed", Some("c-fed"), Some("t-1")),
            sa("fed-no-tenant", Some("c-fed2"), None),
            sa("plain", None, None),
        ])
        .with_settings(PolicySettings {
            workload: mode,
            default_tenant: default_tenant.map(Into::into),
            ..PolicySettings::default()
        })
    };
    let workload = |d: Decision<'_>| match d {
        Decision::Workload { client_id, tenant_id, service_account, choice } => {
            format!("wi {service_account} {client_id}@{tenant_id} {choice:?}")
        }
        Decision::Allow { identity, .. } => format!("allow {}", identity.name),
        Decision::Deny(r) => format!("deny {r:?}"),
        Decision::Exception { .. } => "exception".into(),
        Decision::UnknownPod => "unknown".into(),
    };
    let cid = |c: &str| Some(Selector::ClientId(c.into()));
    let cases: [Case; 12] = [
        (WorkloadMode::Label, None, "wi", None, "wi fed c-fed@t-1 FirstByName"),
        (WorkloadMode::Label, None, "wi", cid("C-FED"), "wi fed c-fed@t-1 Requested"),
        (WorkloadMode::Label, None, "wi", cid("c-blob"), "deny SelectorNotBound { selector: ClientId(\"c-blob\") }"),
        (
            WorkloadMode::Label,
            None,
            "wi",
            Some(Selector::ObjectId("o".into())),
            "deny SelectorNotBound { selector: ObjectId(\"o\") }",
        ),
        (
            WorkloadMode::Label,
            None,
            "wi-untenanted",
            None,
            "deny WorkloadNoTenant { service_account: \"fed-no-tenant\" }",
        ),
        (
            WorkloadMode::Label,
            Some("t-default"),
            "wi-untenanted",
            None,
            "wi fed-no-tenant c-fed2@t-default FirstByName",
        ),
        (WorkloadMode::Label, None, "wi-plain-sa", None, "deny WorkloadNoClientId { service_account: \"plain\" }"),
        // Opted in: its bindings do not apply; its ServiceAccount's identity does.
        (
            WorkloadMode::Label,
            None,
            "wi-bound",
            cid("c-blob"),
            "deny SelectorNotBound { selector: ClientId(\"c-blob\") }",
        ),
        (WorkloadMode::Label, None, "unlabelled", None, "deny NoBindingLabel"),
        (WorkloadMode::Annotated, None, "unlabelled", None, "wi fed c-fed@t-1 FirstByName"),
        (WorkloadMode::Off, None, "wi-bound", None, "allow blob"),
        // Exceptions still come first.
        (WorkloadMode::Label, None, "wi-exc", None, "exception"),
    ];
    for (mode, tenant, uid, selector, want) in cases {
        let w = world(mode, tenant);
        assert_eq!(workload(w.decide(uid, selector.as_ref())), want, "{mode:?} {uid} {selector:?}");
    }
    // A workload-identity pod has no binding, and is still not denied in the kernel.
    let w = world(WorkloadMode::Label, None);
    assert_eq!(w.pod_verdict(w.pod("wi").unwrap(), true), PodVerdict::Redirect);
}

fn scoped(default_scope: DefaultScope, namespaces: &[(&str, Option<&str>, bool)]) -> Snapshot {
    let rules = namespaces.iter().map(|(name, scope, audit)| NamespaceRules {
        name: (*name).into(),
        scope: scope.map(|s| Scope::parse(s).unwrap()),
        audit: *audit,
        ..NamespaceRules::default()
    });
    world().with_settings(PolicySettings { default_scope, ..PolicySettings::default() }).with_namespaces(rules)
}

fn out_of_scope(d: &Decision<'_>) -> Option<String> {
    match d {
        // The identity as named (its ids follow in brackets), and the scope.
        Decision::Deny(DenyReason::OutOfScope { identity, scope }) => {
            Some(format!("{} | {scope}", identity.split(" (").next().unwrap_or_default()))
        }
        _ => None,
    }
}

/// (default, app's scope, pod, selector, the identity served or the refusal's words)
type ScopeCase<'a> = (DefaultScope, Option<&'a str>, &'a str, Option<Selector>, &'a str);

#[test]
fn identity_scopes_table() {
    let client = |c: &str| Some(Selector::ClientId(c.into()));
    let cases: Vec<ScopeCase<'_>> = vec![
        // Open by default: as before scopes.
        (DefaultScope::Open, None, "web", None, "blob"),
        (DefaultScope::Open, None, "multi", None, "kv"),
        // Closed by default: nothing until an admin scopes the namespace, and the refusal says so.
        (
            DefaultScope::Closed,
            None,
            "web",
            None,
            "app/blob | namespace app has no imds-filter.io/identity-scope; the cluster default is closed",
        ),
        // The namespace's own scope, whatever the default.
        (DefaultScope::Closed, Some("c-blob"), "web", None, "blob"),
        (
            DefaultScope::Open,
            Some("c-table"),
            "web",
            None,
            "app/blob | namespace app's imds-filter.io/identity-scope allows c-table",
        ),
        // Resource ids, by glob (the token is then asked for by resource id: see below).
        (
            DefaultScope::Closed,
            Some("/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/*"),
            "web",
            None,
            "blob",
        ),
        // Without a selector: the first bound identity the scope allows.
        (DefaultScope::Open, Some("c-table"), "multi", None, "table"),
        // Naming one outside the scope is refused, naming one inside is served.
        (
            DefaultScope::Open,
            Some("c-table"),
            "multi",
            client("c-kv"),
            "app/kv | namespace app's imds-filter.io/identity-scope allows c-table",
        ),
        (DefaultScope::Open, Some("c-table"), "multi", client("C-TABLE"), "table"),
        // An identity the pod is not bound to is still "not bound", whatever the scope.
        (DefaultScope::Open, Some("**"), "web", client("c-table"), "not bound"),
        // An exception is honoured only where the scope allows every identity.
        (DefaultScope::Open, None, "exc", None, "exception"),
        (DefaultScope::Open, Some("**"), "exc", None, "exception"),
        (DefaultScope::Open, Some("c-*"), "exc", None, "blob"),
        (
            DefaultScope::Closed,
            None,
            "exc",
            None,
            "app/blob | namespace app has no imds-filter.io/identity-scope; the cluster default is closed",
        ),
    ];
    for (default_scope, app_scope, uid, selector, expected) in cases {
        let w = scoped(default_scope, &[("app", app_scope, false)]);
        let decision = w.decide(uid, selector.as_ref());
        let got = match &decision {
            Decision::Allow { identity, .. } => identity.name.clone(),
            Decision::Exception { .. } => "exception".into(),
            Decision::Deny(DenyReason::SelectorNotBound { .. }) => "not bound".into(),
            other => out_of_scope(other).unwrap_or_else(|| format!("{other:?}")),
        };
        assert_eq!(got, expected, "{default_scope:?} {app_scope:?} {uid} {selector:?}");
    }
    // The words reach the decision log.
    let w = scoped(DefaultScope::Closed, &[]);
    assert!(w.decide("web", None).reason().contains("is outside the namespace's identity scope"));
    // Allowed by its resource id only: the token is asked for by that resource id, not by the
    // client id the AzureIdentity claims.
    let w = scoped(DefaultScope::Closed, &[("app", Some("/subscriptions/s/resourcegroups/rg/**"), false)]);
    let blob = &w.identities[&("app".into(), "blob".into())];
    assert!(
        matches!(w.decide("web", None), Decision::Allow { fetch: FetchBy::ResourceId(r), .. } if r == blob.resource_id)
    );
    let w = scoped(DefaultScope::Closed, &[("app", Some("c-blob"), false)]);
    assert!(matches!(w.decide("web", None), Decision::Allow { fetch: FetchBy::ClientId(c), .. } if c == "c-blob"));
}

#[test]
fn scopes_and_audit_in_the_kernel_verdicts() {
    // An exception the scope does not honour is not PASS: its connections come to the agent.
    let w = scoped(DefaultScope::Open, &[("app", Some("c-*"), false)]);
    assert_eq!(w.pod_verdict(w.pod("exc").unwrap(), false), PodVerdict::Redirect);
    let w = scoped(DefaultScope::Open, &[("app", Some("**"), false)]);
    assert_eq!(w.pod_verdict(w.pod("exc").unwrap(), false), PodVerdict::Pass);
    // In an audited namespace, --deny-unbound does not refuse in the kernel: audit forwards.
    let w = scoped(DefaultScope::Open, &[("app", None, true)]);
    assert_eq!(w.pod_verdict(w.pod("plain").unwrap(), true), PodVerdict::Redirect);
    assert!(w.audited("app") && !w.audited("other"));
    assert_eq!(w.pod_verdict(w.pod("foreign").unwrap(), true), PodVerdict::Deny, "other namespaces keep it");
}

#[test]
fn a_pod_of_a_namespace_not_yet_known_is_not_decided_for() {
    let w = world().with_known_namespaces(["other".to_owned()]);
    assert_eq!(w.decide("web", None), Decision::UnknownPod, "app is not known yet");
    assert!(!w.knows("web") && w.knows("exc2"));
    // Nor is its exception honoured in the kernel: the namespace may turn out to be scoped.
    assert_eq!(w.pod_verdict(w.pod("exc").unwrap(), false), PodVerdict::Redirect);
    assert_eq!(world().pod_verdict(world().pod("exc").unwrap(), false), PodVerdict::Pass);
    let w = w.with_known_namespaces(["app".to_owned(), "other".to_owned()]);
    assert!(matches!(w.decide("web", None), Decision::Allow { .. }));
    // Unreadable annotations: nothing, and the refusal says why.
    let unreadable =
        NamespaceRules::unreadable("app", "imds-filter.io/mode: \"x\" is neither enforce nor audit".into());
    let w = world().with_namespaces([unreadable]);
    let refused = out_of_scope(&w.decide("web", None)).unwrap_or_default();
    assert!(refused.contains("annotations cannot be read (imds-filter.io/mode"), "{refused}");
    assert_eq!(w.exception_for(w.pod("exc").unwrap()), None);
}

#[test]
fn workload_identity_is_scoped_too() {
    let accounts = [ServiceAccount {
        namespace: "app".into(),
        name: "fed".into(),
        client_id: Some("c-fed".into()),
        tenant_id: Some("t".into()),
    }];
    let mut fed = pod("fed", "app", &[("azure.workload.identity/use", "true")]);
    fed.service_account = "fed".into();
    let snapshot = |scope: Option<&str>| {
        let rules = NamespaceRules {
            name: "app".into(),
            scope: scope.map(|s| Scope::parse(s).unwrap()),
            ..NamespaceRules::default()
        };
        Snapshot::new([fed.clone()], [], [], [])
            .with_service_accounts(accounts.clone())
            .with_settings(PolicySettings { workload: WorkloadMode::Label, ..PolicySettings::default() })
            .with_namespaces([rules])
    };
    assert!(matches!(snapshot(Some("c-fed")).decide("fed", None), Decision::Workload { .. }));
    let refusing = snapshot(Some("c-other"));
    let refused = refusing.decide("fed", None);
    assert_eq!(
        out_of_scope(&refused).as_deref(),
        Some("workload identity c-fed | namespace app's imds-filter.io/identity-scope allows c-other")
    );
}
