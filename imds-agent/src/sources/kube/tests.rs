//! kube-rs against a mocked API server (`tower-test`): realistic list and watch JSON,
//! driven step by step.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock::{Handle, SendResponse};

use super::*;
use crate::policy::{Decision, DenyReason};

const PODS: &str = "/api/v1/pods";
const IDENTITIES: &str = "/apis/aadpodidentity.k8s.io/v1/azureidentities";
const BINDINGS: &str = "/apis/aadpodidentity.k8s.io/v1/azureidentitybindings";
const EXCEPTIONS: &str = "/apis/aadpodidentity.k8s.io/v1/azurepodidentityexceptions";
const SERVICE_ACCOUNTS: &str = "/api/v1/serviceaccounts";
const NAMESPACES: &str = "/api/v1/namespaces";
const WEB: &str = "8d3b1f8e-7c1a-4b5e-9f2d-0a1b2c3d4e5f";

#[derive(Default)]
struct ApiState {
    lists: HashMap<&'static str, Value>,
    seen: Vec<String>,
    parked: HashMap<String, SendResponse<Response<Body>>>,
    down: bool,
}

/// The fake API server: answers lists from `lists`, parks watches until the test answers.
#[derive(Clone, Default)]
struct FakeApi(Arc<Mutex<ApiState>>);

impl FakeApi {
    fn start(&self, mut handle: Handle<Request<Body>, Response<Body>>) {
        let state = Arc::clone(&self.0);
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let path = request.uri().path().to_owned();
                let query = request.uri().query().unwrap_or("").to_owned();
                let mut s = state.lock().unwrap();
                s.seen.push(format!("{path}?{query}"));
                if s.down {
                    send.send_response(status_response(500, "InternalError"));
                } else if path == "/version" {
                    let version = json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0", "gitCommit": "0",
                        "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.25",
                        "compiler": "gc", "platform": "linux/amd64"});
                    send.send_response(Response::new(Body::from(serde_json::to_vec(&version).unwrap())));
                } else if query.contains("watch=true") {
                    s.parked.insert(path, send);
                } else {
                    let list = s.lists.get(path.as_str()).cloned().unwrap_or_else(|| panic!("unexpected {path}"));
                    send.send_response(Response::new(Body::from(serde_json::to_vec(&list).unwrap())));
                }
            }
        });
    }

    /// Answers the parked watch on `path` with these events (the stream then ends and
    /// the watcher watches again).
    async fn push(&self, path: &str, events: &[Value]) {
        let send = loop {
            if let Some(send) = self.0.lock().unwrap().parked.remove(path) {
                break send;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let body: Vec<u8> =
            events.iter().flat_map(|e| serde_json::to_vec(e).unwrap().into_iter().chain([b'\n'])).collect();
        send.send_response(Response::new(Body::from(body)));
    }

    fn lists_of(&self, path: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|s| s.starts_with(&format!("{path}?")) && !s.contains("watch=true"))
            .count()
    }
}

fn status_response(code: u16, reason: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason});
    let mut r = Response::new(Body::from(serde_json::to_vec(&body).unwrap()));
    *r.status_mut() = http::StatusCode::from_u16(code).unwrap();
    r
}

fn list(api_version: &str, kind: &str, rv: &str, items: &[Value]) -> Value {
    json!({"apiVersion": api_version, "kind": format!("{kind}List"), "metadata": {"resourceVersion": rv}, "items": items})
}

fn pod(rv: &str, binding: Option<&str>) -> Value {
    let labels = binding.map_or_else(|| json!({"app": "web"}), |b| json!({"app": "web", "aadpodidbinding": b}));
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "web", "namespace": "shop", "uid": WEB, "resourceVersion": rv, "labels": labels,
                        "managedFields": [{"manager": "kubectl"}]},
           "spec": {"nodeName": "node-1", "containers": [{"name": "web", "image": "web:1"}]}})
}

fn identity(rv: &str, client_id: &str) -> Value {
    json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentity",
           "metadata": {"name": "blob", "namespace": "shop", "uid": "i1", "resourceVersion": rv},
           "spec": {"type": 0, "clientID": client_id, "resourceID": "/subscriptions/s/x/blob"}})
}

fn binding() -> Value {
    json!({"apiVersion": "aadpodidentity.k8s.io/v1", "kind": "AzureIdentityBinding",
           "metadata": {"name": "blob-binding", "namespace": "shop", "uid": "b1", "resourceVersion": "1"},
           "spec": {"azureIdentity": "blob", "selector": "blob"}})
}

async fn next_snapshot(rx: &mut watch::Receiver<Arc<Snapshot>>, what: &str, ok: impl Fn(&Snapshot) -> bool) {
    let wait = async {
        loop {
            if ok(&rx.borrow_and_update()) {
                return;
            }
            rx.changed().await.expect("source ended");
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await.unwrap_or_else(|_| panic!("no snapshot with {what}"));
}

fn client_of(s: &Snapshot) -> Option<String> {
    match s.decide(WEB, None) {
        Decision::Allow { identity, .. } => Some(identity.client_id.clone()),
        _ => None,
    }
}

#[tokio::test]
async fn sync_updates_relist_and_fail_static() {
    let api = FakeApi::default();
    {
        let mut s = api.0.lock().unwrap();
        s.lists.insert(PODS, list("v1", "Pod", "10", &[pod("10", Some("blob"))]));
        s.lists.insert(IDENTITIES, list("aadpodidentity.k8s.io/v1", "AzureIdentity", "20", &[identity("20", "c-1")]));
        s.lists.insert(BINDINGS, list("aadpodidentity.k8s.io/v1", "AzureIdentityBinding", "30", &[binding()]));
        s.lists.insert(EXCEPTIONS, list("aadpodidentity.k8s.io/v1", "AzurePodIdentityException", "40", &[]));
        // Namespaces, metadata only; `shop` is scoped to the identity the pod uses.
        let scoped = json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                            "metadata": {"name": "shop", "uid": "ns-shop", "resourceVersion": "60",
                                         "annotations": {"imds-filter.io/identity-scope": "c-*", "owner": "team-a"}}});
        s.lists.insert(NAMESPACES, list("meta.k8s.io/v1", "PartialObjectMetadata", "60", &[scoped]));
        // Metadata only, as the agent asks (PartialObjectMetadataList).
        let account = |name: &str, annotations: Value| {
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                   "metadata": {"name": name, "namespace": "shop", "uid": format!("sa-{name}"), "resourceVersion": "50",
                                "annotations": annotations}})
        };
        s.lists.insert(
            SERVICE_ACCOUNTS,
            list(
                "meta.k8s.io/v1",
                "PartialObjectMetadata",
                "50",
                &[
                    account("fed", json!({"azure.workload.identity/client-id": "c-fed", "kubectl.kubernetes.io/last-applied-configuration": "{}"})),
                    account("default", json!({})),
                ],
            ),
        );
    }
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    api.start(handle);
    let (tx, mut rx) = watch::channel(Arc::new(Snapshot::default()));
    let status = Arc::new(SourceStatus::default());
    tokio::spawn({
        let status = Arc::clone(&status);
        async move {
            let client = Client::new(service, "default");
            run(client, "node-1", PolicySettings::default(), tx, status, None, None).await;
        }
    });

    // Initial sync: the pod is bound; only this node's pods were asked for.
    next_snapshot(&mut rx, "the bound pod", |s| client_of(s).as_deref() == Some("c-1")).await;
    // Only ServiceAccounts naming a client id are kept.
    let fed = rx.borrow().service_account("shop", "fed").cloned();
    assert_eq!(fed.and_then(|a| a.client_id).as_deref(), Some("c-fed"));
    assert!(rx.borrow().service_account("shop", "default").is_none());
    // The namespace's rules, from its annotations only.
    assert_eq!(
        rx.borrow().scope_rule("shop").describe("shop"),
        "namespace shop's imds-filter.io/identity-scope allows c-*"
    );
    assert!(status.is_synced() && status.failing().is_none());
    assert!(api
        .0
        .lock()
        .unwrap()
        .seen
        .iter()
        .any(|s| s.starts_with(PODS) && s.contains("fieldSelector=spec.nodeName%3Dnode-1")));

    // The pod is relabelled: access goes.
    api.push(PODS, &[json!({"type": "MODIFIED", "object": pod("11", None)})]).await;
    next_snapshot(&mut rx, "the unlabelled pod", |s| s.decide(WEB, None) == Decision::Deny(DenyReason::NoBindingLabel))
        .await;
    api.push(PODS, &[json!({"type": "MODIFIED", "object": pod("12", Some("blob"))})]).await;
    next_snapshot(&mut rx, "the relabelled pod", |s| client_of(s).is_some()).await;

    // 410 Gone on the identities watch: the watcher lists again and sees the new state.
    api.0
        .lock()
        .unwrap()
        .lists
        .insert(IDENTITIES, list("aadpodidentity.k8s.io/v1", "AzureIdentity", "25", &[identity("25", "c-2")]));
    let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "code": 410, "message": "too old resource version"}});
    api.push(IDENTITIES, &[gone]).await;
    next_snapshot(&mut rx, "the relisted identity", |s| client_of(s).as_deref() == Some("c-2")).await;
    assert_eq!(api.lists_of(IDENTITIES), 2);

    // The API server goes away: the last policy stays in force, and the source says so.
    api.0.lock().unwrap().down = true;
    api.push(BINDINGS, &[gone_with(500)]).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while status.failing().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the source never reported the failure");
    assert_eq!(client_of(&rx.borrow()).as_deref(), Some("c-2"), "fail-static: the last policy stays");

    // It comes back: the watchers recover and the failure clears.
    api.0.lock().unwrap().down = false;
    tokio::time::timeout(Duration::from_secs(15), async {
        while status.failing().is_some() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the source never recovered");
    assert_eq!(client_of(&rx.borrow()).as_deref(), Some("c-2"));
}

fn lean_pod(uid: &str, binding: &str) -> LeanPod {
    serde_json::from_value(json!({"metadata": {"name": format!("pod-{uid}"), "namespace": "shop", "uid": uid,
                                               "labels": {"aadpodidbinding": binding}}}))
    .unwrap()
}

fn pods_in(mirrors: &mut Mirrors) -> Vec<(String, String)> {
    let snapshot = mirrors.snapshot(&PolicySettings::default());
    let mut pods: Vec<(String, String)> = ["a", "b", "c"]
        .iter()
        .filter_map(|uid| snapshot.pod(uid))
        .map(|p| (p.uid.clone(), p.labels["aadpodidbinding"].clone()))
        .collect();
    pods.sort();
    pods
}

#[test]
fn lookups_stand_in_for_the_watch_and_never_override_it() {
    let mut mirrors = Mirrors::default();
    let pair = |uid: &str, binding: &str| (uid.to_owned(), binding.to_owned());
    for event in [Event::Init, Event::InitApply(lean_pod("a", "blob")), Event::InitDone] {
        assert!(mirrors.apply(Change::Pod(event)), "watch events count as the watch's word");
    }
    // Found before the watch brought it: it stands in; a lookup is not the watch's word.
    assert!(!mirrors.apply(Change::Found(vec![lean_pod("b", "blob")])));
    assert_eq!(pods_in(&mut mirrors), [pair("a", "blob"), pair("b", "blob")]);
    // A stale list never overrides what the watch has (a relabelled pod).
    mirrors.apply(Change::Pod(Event::Apply(lean_pod("a", "other"))));
    mirrors.apply(Change::Found(vec![lean_pod("a", "blob")]));
    assert_eq!(pods_in(&mut mirrors), [pair("a", "other"), pair("b", "blob")]);
    // A relist that no longer has `a` (deleted while the watch was away): a stale list
    // cannot bring it back. The relist also ends `b`'s stand-in.
    for event in [Event::Init, Event::InitApply(lean_pod("c", "blob")), Event::InitDone] {
        mirrors.apply(Change::Pod(event));
    }
    mirrors.apply(Change::Found(vec![lean_pod("a", "blob")]));
    assert_eq!(pods_in(&mut mirrors), [pair("c", "blob")]);
}

fn gone_with(code: u16) -> Value {
    json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "InternalError", "code": code, "message": "the server is going away"}})
}
