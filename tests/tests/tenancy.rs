//! Multi-tenant clusters, end to end (issue #17): what cluster admins allow each namespace on
//! its `Namespace` object — identity scopes and audit — enforced by the real agent for pods in
//! kubelet-style cgroups and their own network namespaces, from both policy sources: a
//! manifests directory with `Namespace` manifests, and the fake API server (a real one cannot
//! run here; see `fake_kube`). Needs root; run with `cargo xtask test`.
use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use imds_tests::{
    fake_imds::{token_for, FakeIdentity},
    fake_kube::FakeKube,
    fixtures::{self, Manifest},
    node::{curl, pod_uid, Fetched, Node, TestPod, KUBE_NODE},
    Server, IMDS_IP,
};
use serde_json::{json, Value};

const RESOURCE: &str = "https://vault.azure.net";
const TOKEN: &str = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";
const SCOPE: &str = "imds-filter.io/identity-scope";
const METRICS: ([u8; 4], u16) = ([10, 233, 0, 1], 9402);
const MODE: &str = "imds-filter.io/mode";
const PATHS: &str = "imds-filter.io/metadata-paths";
const EVENTS: &str = "/metadata/scheduledevents?api-version=2020-07-01";

fn get(node: &Node, pod: &TestPod, path_and_query: &str) -> Fetched {
    curl(node, pod, SocketAddr::from((IMDS_IP, 80)), path_and_query, &["Metadata: true"])
}

fn token(node: &Node, pod: &TestPod) -> Fetched {
    curl(node, pod, SocketAddr::from((IMDS_IP, 80)), TOKEN, &["Metadata: true"])
}

fn is_token_of(fetched: &Fetched, id: &FakeIdentity) -> bool {
    fetched.status == 200 && fetched.json()["access_token"] == token_for(&id.client_id, RESOURCE)
}

/// The agent's last decision about the pod `uid`.
fn last_decision(node: &Node, uid: &str) -> Value {
    let decisions = node.agent().decisions();
    decisions.into_iter().rev().find(|d| d["pod_uid"] == uid).unwrap_or_else(|| panic!("no decision for {uid}"))
}

fn readyz(node: &Node) -> (u16, String) {
    node.ns.enter(|| imds_tests::fake_imds::http_get(SocketAddr::from(METRICS), "/readyz", &[]).unwrap_or_default())
}

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < Duration::from_secs(15), "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Identities `blob`, `table` and `kv` in namespace `app` (`blob` bound to selector `blob`,
/// `table` and `kv` to `multi`, an exception for `role: helper`); `blob` again in `team-b`;
/// nothing in `staging`.
fn policy(ids: &[FakeIdentity; 3]) -> Manifest {
    let [blob, table, kv] = ids;
    Manifest::new()
        .with(&fixtures::identity("app", "blob", blob))
        .with(&fixtures::identity("app", "table", table))
        .with(&fixtures::identity("app", "kv", kv))
        .with(&fixtures::binding("app", "blob-binding", "blob", "blob"))
        .with(&fixtures::binding("app", "table-binding", "table", "multi"))
        .with(&fixtures::binding("app", "kv-binding", "kv", "multi"))
        .with(&fixtures::exception("app", "helpers", &[("role", "helper")]))
        .with(&fixtures::identity("team-b", "blob", blob))
        .with(&fixtures::binding("team-b", "blob-binding", "blob", "blob"))
}

// Identity scopes and per-namespace audit from a manifests directory, with the cluster
// default closed: a namespace's pods get only what its scope allows, refusals say which scope
// refused, an exception is not honoured under a narrower scope, an unscoped namespace gets
// nothing, an audited one is forwarded; a changed scope takes effect.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn namespace_scopes_and_audit_from_manifests() {
    let ids = [FakeIdentity::named("blob"), FakeIdentity::named("table"), FakeIdentity::named("kv")];
    let [blob, table, _kv] = ids.clone();
    let mut node = Node::new("tenancy-m", ids.to_vec());
    let uids: Vec<String> = (0..5).map(|_| pod_uid()).collect();
    let [web, multi, helper, other, staged] = [0, 1, 2, 3, 4].map(|i| node.pod(&uids[i]));
    let pods = |app_scope: &str| {
        policy(&ids)
            .with(&fixtures::namespace("app", &[(SCOPE, app_scope)]))
            .with(&fixtures::namespace("staging", &[(MODE, "audit")]))
            .with(&fixtures::pod("app", "web", &uids[0]).bound_to("blob").ip(web.ip))
            .with(&fixtures::pod("app", "multi", &uids[1]).bound_to("multi").ip(multi.ip))
            .with(&fixtures::pod("app", "helper", &uids[2]).bound_to("blob").label("role", "helper").ip(helper.ip))
            .with(&fixtures::pod("team-b", "other", &uids[3]).bound_to("blob").ip(other.ip))
            .with(&fixtures::pod("staging", "staged", &uids[4]).ip(staged.ip))
    };
    node.write_manifest("policy.yaml", pods(&blob.client_id).as_str());
    node.start_agent(&["--identity-scope-default", "closed", "--deny-unbound"]);

    // In scope: served.
    assert!(is_token_of(&token(&node, &web), &blob));
    // Bound, but to identities outside the scope: refused, and the refusal names the scope.
    assert_eq!(token(&node, &multi).status, 400);
    let refused = last_decision(&node, &uids[1]);
    assert_eq!(refused["verdict"], "deny");
    let reason = refused["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("outside the namespace's identity scope")
            && reason.contains(&format!("namespace app's {SCOPE} allows {}", blob.client_id)),
        "{refused}"
    );
    // The exception is not honoured under a narrower scope: its requests come to the agent,
    // which serves it what its binding and scope allow.
    assert!(is_token_of(&token(&node, &helper), &blob));
    assert_eq!(last_decision(&node, &uids[2])["verdict"], "allow", "decided by the agent, not passed");
    // A namespace without a scope, the default closed: nothing.
    assert_eq!(token(&node, &other).status, 400);
    let closed = last_decision(&node, &uids[3]);
    assert!(closed["reason"].as_str().unwrap_or_default().contains("the cluster default is closed"), "{closed}");
    // An audited namespace: what would be refused (no binding at all) is forwarded as asked,
    // and --deny-unbound does not refuse its unbound pod in the kernel.
    let fetched = token(&node, &staged);
    assert_eq!(fetched.status, 200, "{fetched:?}");
    assert_eq!(last_decision(&node, &uids[4])["verdict"], "audit-allow");

    // The admin widens app's scope to `table`: the multi pod gets it (the first bound
    // identity the scope allows), the blob pod loses blob.
    node.write_manifest("policy.yaml", pods(&table.client_id).as_str());
    eventually("the wider scope is in force", || is_token_of(&token(&node, &multi), &table));
    assert_eq!(token(&node, &web).status, 400);
    drop((web, multi, helper, other, staged));
}

// Path grants from a manifests directory: a namespace granted scheduled events reads them
// (even its unbound pod under --deny-unbound), nothing more, and never an identity; other
// namespaces get a 403 naming what they lack, audited ones too; and the
// forwarded paths are paced by a budget of their own (IMDS allows 5 a second), apart from
// the identity budget.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn path_grants_from_manifests() {
    let blob = FakeIdentity::named("blob");
    let mut node = Node::new("grants-m", vec![blob.clone()]);
    let uids: Vec<String> = (0..3).map(|_| pod_uid()).collect();
    let [handler, web, staged] = [0, 1, 2].map(|i| node.pod(&uids[i]));
    let policy = Manifest::new()
        .with(&fixtures::identity("app", "blob", &blob))
        .with(&fixtures::binding("app", "blob-binding", "blob", "blob"))
        .with(&fixtures::namespace("ops", &[(PATHS, "/metadata/scheduledevents")]))
        .with(&fixtures::namespace("staging", &[(MODE, "audit")]))
        .with(&fixtures::pod("ops", "handler", &uids[0]).ip(handler.ip))
        .with(&fixtures::pod("app", "web", &uids[1]).bound_to("blob").ip(web.ip))
        .with(&fixtures::pod("staging", "staged", &uids[2]).ip(staged.ip));
    node.write_manifest("policy.yaml", policy.as_str());
    node.start_agent(&["--deny-unbound"]);

    let read = get(&node, &handler, EVENTS);
    assert_eq!((read.status, read.json()["DocumentIncarnation"].as_i64()), (200, Some(1)), "{read:?}");
    let granted = last_decision(&node, &uids[0]);
    assert_eq!(granted["verdict"], "forward", "{granted}");
    assert!(granted["reason"].as_str().unwrap_or_default().contains("granted to namespace ops"), "{granted}");
    // Nothing beyond the grant, and no identity: the grant does not reach the token endpoint.
    assert_eq!(get(&node, &handler, "/metadata/instance?api-version=2021-02-01").status, 403);
    assert_eq!(token(&node, &handler).status, 400);
    assert_eq!(get(&node, &handler, "/metadata/scheduledevents/../identity/oauth2/token").status, 400);
    // A namespace without a grant: 403, saying what it lacks.
    assert_eq!(get(&node, &web, EVENTS).status, 403);
    let refused = last_decision(&node, &uids[1]);
    assert_eq!(refused["verdict"], "deny");
    assert!(refused["reason"].as_str().unwrap_or_default().contains(&format!("namespace app has no {PATHS}")));
    // An audited namespace: audit is for identity policy; paths are still refused.
    assert_eq!(get(&node, &staged, EVENTS).status, 403);
    assert_eq!(last_decision(&node, &uids[2])["verdict"], "deny");
    // Spellings a lenient server would read as `..` never ride on a grant.
    for climbing in ["/metadata/scheduledevents/..;/identity/oauth2/token", "/metadata/scheduledevents/..;/instance"] {
        assert_eq!(get(&node, &handler, climbing).status, 400, "{climbing}");
    }

    // The handler floods its path while the web pod asks for tokens.
    let before = node.fake.seen().len();
    let (reads, tokens) = std::thread::scope(|scope| {
        let flood: Vec<_> = (0..12).map(|_| scope.spawn(|| get(&node, &handler, EVENTS).status)).collect();
        std::thread::sleep(Duration::from_millis(200));
        let tokens: Vec<u16> = (0..8)
            .map(|i| {
                let query =
                    format!("/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fr{i}");
                get(&node, &web, &query).status
            })
            .collect();
        (flood.into_iter().map(|t| t.join().expect("a flood request")).collect::<Vec<u16>>(), tokens)
    });
    assert!(reads.iter().all(|s| *s == 200), "every read is served, in time: {reads:?}");
    assert!(tokens.iter().all(|s| *s == 200), "{tokens:?}");
    let seen = node.fake.seen().split_off(before);
    let arrivals = |path: &str| seen.iter().filter(|s| s.path == path).map(|s| s.at).collect::<Vec<Instant>>();
    // The budget paces starts at the agent 1.25 s apart; arrivals here jitter by a few ms.
    let busiest = |at: &[Instant]| {
        at.iter()
            .map(|start| at.iter().filter(|t| **t >= *start && **t - *start < Duration::from_millis(1150)).count())
            .max()
    };
    let (paths, identity) = (arrivals("/metadata/scheduledevents"), arrivals("/metadata/identity/oauth2/token"));
    assert_eq!((paths.len(), identity.len()), (12, 8));
    // Paths: 5 in any 1.15 s at most. Tokens: not held to the path budget's pace.
    assert!(busiest(&paths) <= Some(5), "paths paced at 5 a second: {paths:?}");
    assert!(busiest(&identity) > Some(5), "tokens on their own budget: {identity:?}");
    drop((handler, web, staged));
}

fn api_object(object: &impl serde::Serialize) -> Value {
    serde_json::to_value(object).expect("an object as JSON")
}

/// A pod in `namespace` on this node, bound to `selector`.
fn api_pod(namespace: &str, name: &str, pod: &TestPod, selector: &str) -> Value {
    let mut object = api_object(&fixtures::pod(namespace, name, &pod.uid).bound_to(selector).ip(pod.ip));
    object["spec"]["nodeName"] = json!(KUBE_NODE);
    object
}

// The same through the API: the agent watches Namespaces (metadata only), a scope set, changed
// or removed there takes effect, the refusal reaches the pod's Event, and an annotation the
// agent cannot read gives the namespace nothing (never the open default).
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn namespace_scopes_through_the_api() {
    let (blob, other) = (FakeIdentity::named("blob"), FakeIdentity::named("other"));
    let mut node = Node::new("tenancy-k", vec![blob.clone(), other.clone()]);
    let api = FakeKube::serve(Server::bind(&node.ns, std::net::SocketAddrV4::new([10, 233, 0, 1].into(), 6443)));
    api.apply(api_object(&fixtures::identity("app", "blob", &blob)));
    api.apply(api_object(&fixtures::binding("app", "blob-binding", "blob", "blob")));
    api.apply(api_object(&fixtures::namespace("app", &[(SCOPE, "someone-else-*")])));
    let uid = pod_uid();
    let web = node.pod(&uid);
    api.apply(api_pod("app", "web", &web, "blob"));
    let dir = tempfile::tempdir().unwrap();
    // An agent whose RBAC lacks Namespaces (upgraded without the chart's new rule) never
    // decides with half a policy: it is not ready, and says why.
    api.forbid("v1", "Namespace", true);
    let metrics = SocketAddr::from(METRICS).to_string();
    node.launch_agent_kube(&api.kubeconfig(dir.path()), &["--metrics", &metrics]);
    eventually("not ready, naming the forbidden list", || {
        let (status, body) = readyz(&node);
        status == 503 && body.contains("namespaces is forbidden")
    });
    api.forbid("v1", "Namespace", false);
    eventually("ready once it may list Namespaces", || readyz(&node) == (200, "ready\n".to_owned()));
    let namespace_watches = api.requests().into_iter().filter(|r| r.starts_with("GET /api/v1/namespaces?")).count();
    assert!(namespace_watches > 0, "the agent lists and watches Namespaces");

    // Scoped to someone else's identities: refused, with an Event naming the scope.
    eventually("refused by the scope", || token(&node, &web).status == 400);
    eventually("an Event that names the scope", || {
        api.events().iter().any(|e| {
            e["regarding"]["name"] == "web" && e["note"].as_str().is_some_and(|n| n.contains("identity scope"))
        })
    });
    // The admin scopes it to blob (by its resource id's resource group, a glob): served.
    let group = blob.resource_id.rsplit_once("/providers/").expect("an ARM id").0.to_owned();
    api.apply(api_object(&fixtures::namespace("app", &[(SCOPE, &format!("{group}/**"))])));
    eventually("served under the new scope", || is_token_of(&token(&node, &web), &blob));
    // An AzureIdentity pairing the in-scope resource id with another identity's client id:
    // scoped by resource id, the token is asked for by that resource id, so the pod gets the
    // in-scope identity's token, never the other's.
    let mut sneaky = api_object(&fixtures::identity("app", "sneaky", &blob));
    sneaky["spec"]["clientID"] = json!(other.client_id);
    api.apply(sneaky);
    api.apply(api_object(&fixtures::binding("app", "sneaky-binding", "sneaky", "sneaky")));
    api.apply(api_object(&fixtures::namespace("app", &[(SCOPE, &blob.resource_id)])));
    let sneak_uid = pod_uid();
    let sneak = node.pod(&sneak_uid);
    api.apply(api_pod("app", "sneak", &sneak, "sneaky"));
    eventually("the sneaky pod is answered", || token(&node, &sneak).status == 200);
    assert!(is_token_of(&token(&node, &sneak), &blob), "the in-scope identity's token, not the other's");
    let asked = node.fake.token_requests().last().and_then(|r| r.query.clone()).unwrap_or_default();
    assert!(asked.contains("msi_res_id="), "fetched by resource id: {asked}");
    drop(sneak);
    // An annotation the agent cannot read: nothing, not the cluster's open default.
    api.apply(api_object(&fixtures::namespace("app", &[(SCOPE, "[unclosed")])));
    eventually("an unreadable scope allows nothing", || token(&node, &web).status == 400);
    // No annotation at all: the cluster default (open here) applies again.
    api.apply(api_object(&fixtures::namespace("app", &[])));
    eventually("the open default", || is_token_of(&token(&node, &web), &blob));
    // A path grant set there takes effect, and is gone when the annotation is.
    assert_eq!(get(&node, &web, EVENTS).status, 403);
    api.apply(api_object(&fixtures::namespace("app", &[(PATHS, "/metadata/scheduledevents")])));
    eventually("the granted path is read", || get(&node, &web, EVENTS).status == 200);
    api.apply(api_object(&fixtures::namespace("app", &[(PATHS, "/metadata/identity")])));
    eventually("a grant naming the identity endpoint is unreadable", || get(&node, &web, EVENTS).status == 403);
    assert_eq!(token(&node, &web).status, 400, "an unreadable annotation allows nothing");
    let unreadable = last_decision(&node, &uid);
    assert!(unreadable["reason"].as_str().unwrap_or_default().contains("never granted"), "{unreadable}");
    drop(web);
}
