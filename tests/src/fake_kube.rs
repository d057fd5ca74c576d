//! A fake Kubernetes API server for the `--kube` end-to-end tests: a real one cannot run
//! here. It speaks the part of the API the agent uses, as the API server does:
//!
//! - lists (`GET /api/v1/pods`, `/apis/<group>/<version>/<plural>`, optionally below
//!   `/namespaces/<ns>/`) answering `<Kind>List` with the collection's `resourceVersion`;
//!   `fieldSelector=<path>=<value>` filters (the agent asks for `spec.nodeName=<node>`);
//! - watches (`?watch=true&resourceVersion=N`) streaming one JSON `WatchEvent` per line —
//!   `ADDED`, `MODIFIED`, `DELETED` — for every change after `N`, held open until the server
//!   goes down; a `resourceVersion` older than the retained history gets the API server's
//!   `ERROR` event with a `410 Expired` Status, after which clients list again;
//! - metadata-only requests (`Accept: …;as=PartialObjectMetadataList…`) answered with
//!   `PartialObjectMetadata` objects, as kube's metadata watches ask;
//! - `PATCH` of one object with a JSON merge patch (`application/merge-patch+json`), which a
//!   `metadata.resourceVersion` in the patch makes conditional: another version gets the API
//!   server's `409 Conflict`;
//! - `GET /version`; `POST`/`PATCH` of `events.k8s.io/v1` Events, recorded for the test;
//! - while "down", every request gets a `503` Status and open watches end; a collection
//!   [`FakeKube::forbid`]den gets the `403 Forbidden` Status a missing RBAC rule gives;
//! - a watch delay ([`FakeKube::set_watch_delay`]): each change reaches watches that long
//!   after it was made, while lists answer at once, as when an API server's fan-out to its
//!   many watchers lags behind its cache.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{channel::Channel, combinators::BoxBody, BodyExt as _, Full};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::http_server::HttpServer;

/// The kinds the fake stores: (apiVersion, kind, collection path).
const KINDS: &[(&str, &str, &str)] = &[
    ("v1", "Node", "/api/v1/nodes"),
    ("v1", "Namespace", "/api/v1/namespaces"),
    ("v1", "Pod", "/api/v1/pods"),
    ("v1", "ServiceAccount", "/api/v1/serviceaccounts"),
    ("v1", "Secret", "/api/v1/secrets"),
    ("aadpodidentity.k8s.io/v1", "AzureIdentity", "/apis/aadpodidentity.k8s.io/v1/azureidentities"),
    ("aadpodidentity.k8s.io/v1", "AzureIdentityBinding", "/apis/aadpodidentity.k8s.io/v1/azureidentitybindings"),
    (
        "aadpodidentity.k8s.io/v1",
        "AzurePodIdentityException",
        "/apis/aadpodidentity.k8s.io/v1/azurepodidentityexceptions",
    ),
];

/// One change, as a watch reports it.
#[derive(Clone)]
struct Change {
    rv: u64,
    /// When it was made.
    at: tokio::time::Instant,
    collection: &'static str,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    /// The last resourceVersion handed out (one counter for everything, like etcd's).
    rv: u64,
    /// collection → (namespace, name) → object.
    objects: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
    /// Changes a watch can still resume from; older ones were compacted.
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410.
    compacted_to: u64,
    down: bool,
    /// How long after a change watches see it.
    watch_delay: Duration,
    /// Collections the agent's identity may not read (its RBAC lacks them): `403 Forbidden`.
    forbidden: Vec<&'static str>,
    /// A change another client makes to an object just before the next patch of it arrives.
    interposed: Option<Value>,
    /// The bodies of the patches received.
    patches: Vec<Value>,
    requests: Vec<String>,
    events: Vec<Value>,
}

impl State {
    /// Stores `object` (created or replaced) under a new resourceVersion, which it is stamped
    /// with, and records the change for watches (`ADDED` or `MODIFIED`). Returns that version.
    fn store(&mut self, collection: &'static str, key: (String, String), object: &mut Value) -> u64 {
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        let existed = self.objects.entry(collection).or_default().insert(key, object.clone()).is_some();
        let kind = if existed { "MODIFIED" } else { "ADDED" };
        let change = Change { rv: self.rv, at: tokio::time::Instant::now(), collection, kind, object: object.clone() };
        self.history.push(change);
        self.rv
    }
}

/// The fake API server, serving until dropped.
pub struct FakeKube {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    /// Bumped on every change (and when going down), waking the watches.
    changed: Arc<watch::Sender<u64>>,
    _server: HttpServer,
}

impl FakeKube {
    /// Serves on `listener` (bound where the agent can reach it, e.g. in the node namespace).
    pub fn serve(listener: TcpListener) -> FakeKube {
        let state = Arc::new(Mutex::new(State { rv: 100, ..State::default() }));
        let changed = Arc::new(watch::Sender::new(0));
        let (shared, notify) = (Arc::clone(&state), Arc::clone(&changed));
        let server = HttpServer::serve(listener, move |_, req| {
            let (state, notify) = (Arc::clone(&shared), Arc::clone(&notify));
            async move { answer(state, &notify, req).await }
        });
        FakeKube { addr: server.addr, state, changed, _server: server }
    }

    /// Creates or replaces an object (as `kubectl apply` would), giving it a new
    /// resourceVersion; watches see `ADDED` or `MODIFIED`. An object's namespace is created
    /// first if it does not exist yet: on a real cluster it must exist before anything can
    /// be created in it.
    pub fn apply(&self, object: Value) {
        if let Some(namespace) = object["metadata"]["namespace"].as_str().filter(|ns| !ns.is_empty()) {
            if self.get("v1", "Namespace", "", namespace).is_none() {
                self.put(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}));
            }
        }
        self.put(object);
    }

    fn put(&self, mut object: Value) {
        let collection = collection_of(&object);
        let key = key_of(&object);
        let mut s = self.state.lock().unwrap();
        let rv = s.store(collection, key, &mut object);
        drop(s);
        self.changed.send_replace(rv);
    }

    /// Deletes an object; watches see `DELETED`.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) {
        let probe =
            json!({"apiVersion": api_version, "kind": kind, "metadata": {"namespace": namespace, "name": name}});
        let collection = collection_of(&probe);
        let mut s = self.state.lock().unwrap();
        let mut object = s
            .objects
            .get_mut(collection)
            .and_then(|c| c.remove(&key_of(&probe)))
            .unwrap_or_else(|| panic!("no {kind} {namespace}/{name} to delete"));
        s.rv += 1;
        object["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        let rv = s.rv;
        s.history.push(Change { rv, at: tokio::time::Instant::now(), collection, kind: "DELETED", object });
        drop(s);
        self.changed.send_replace(rv);
    }

    /// Forgets the change history, as etcd compaction does: watches resuming from before
    /// now get `410 Gone` and must list again.
    pub fn compact(&self) {
        let mut s = self.state.lock().unwrap();
        s.history.clear();
        s.compacted_to = s.rv;
    }

    /// Takes the API server away (every request 503, open watches end) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
        self.changed.send_modify(|_| {});
    }

    /// Refuses (`403 Forbidden`, as the API server refuses a service account its RBAC does not
    /// allow) or allows again every request for the collection of `api_version` `kind`.
    pub fn forbid(&self, api_version: &str, kind: &str, forbidden: bool) {
        let probe = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": "-"}});
        let collection = collection_of(&probe);
        let mut s = self.state.lock().unwrap();
        s.forbidden.retain(|c| *c != collection);
        if forbidden {
            s.forbidden.push(collection);
        }
    }

    /// Delays every change's arrival at watches by `delay` (lists are not delayed).
    pub fn set_watch_delay(&self, delay: Duration) {
        self.state.lock().unwrap().watch_delay = delay;
    }

    /// Makes `change` (a merge patch) to the object the next patch is for, just before that
    /// patch is applied: another client writing between the patcher's read and its write.
    pub fn change_before_next_patch(&self, change: Value) {
        self.state.lock().unwrap().interposed = Some(change);
    }

    /// The bodies of the patches received so far.
    pub fn patches(&self) -> Vec<Value> {
        self.state.lock().unwrap().patches.clone()
    }

    /// The stored object `name` of `api_version` `kind` in `namespace` ("" for cluster-scoped
    /// kinds), if there is one.
    pub fn get(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let probe =
            json!({"apiVersion": api_version, "kind": kind, "metadata": {"namespace": namespace, "name": name}});
        let s = self.state.lock().unwrap();
        s.objects.get(collection_of(&probe)).and_then(|c| c.get(&key_of(&probe))).cloned()
    }

    /// Every request so far, as `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }

    /// The Events posted (or patched) so far.
    pub fn events(&self) -> Vec<Value> {
        self.state.lock().unwrap().events.clone()
    }

    /// A kubeconfig file in `dir` pointing at this server (plain HTTP, a bearer token).
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: agent\n  user:\n    token: fake-token\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\ncurrent-context: fake\n",
            self.addr
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }
}

fn collection_of(object: &Value) -> &'static str {
    let (api_version, kind) = (object["apiVersion"].as_str().unwrap_or(""), object["kind"].as_str().unwrap_or(""));
    KINDS
        .iter()
        .find_map(|(v, k, c)| (*v == api_version && *k == kind).then_some(*c))
        .unwrap_or_else(|| panic!("the fake API server does not store {api_version} {kind}"))
}

fn key_of(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (meta["namespace"].as_str().unwrap_or("").to_owned(), meta["name"].as_str().expect("metadata.name").to_owned())
}

type Body = BoxBody<Bytes, Infallible>;

/// What a request path names.
struct Target {
    collection: &'static str,
    kind: &'static str,
    namespace: Option<String>,
    name: Option<String>,
}

/// `/api/v1[/namespaces/NS]/pods[/NAME]` and the same under `/apis/<group>/<version>`.
fn target(path: &str) -> Option<Target> {
    let (prefix, rest) = if let Some(rest) = path.strip_prefix("/api/v1/") {
        ("/api/v1", rest)
    } else {
        let rest = path.strip_prefix("/apis/")?;
        let mut parts = rest.splitn(3, '/');
        let (group, version, rest) = (parts.next()?, parts.next()?, parts.next()?);
        let prefix_len = "/apis/".len() + group.len() + 1 + version.len();
        (&path[..prefix_len], rest)
    };
    let segments: Vec<&str> = rest.split('/').collect();
    let (namespace, segments) = match segments.as_slice() {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some((*ns).to_owned()), tail.to_vec()),
        _ => (None, segments),
    };
    let (plural, name) = match segments.as_slice() {
        [plural] => (*plural, None),
        [plural, name] => (*plural, Some((*name).to_owned())),
        _ => return None,
    };
    let collection = format!("{prefix}/{plural}");
    let (_, kind, collection) = KINDS.iter().find(|(_, _, c)| *c == collection)?;
    Some(Target { collection, kind, namespace, name })
}

fn query_param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// Whether `object` passes `fieldSelector=a.b=value[,…]` (equality terms only).
fn fields_match(object: &Value, selector: Option<&str>) -> bool {
    selector.is_none_or(|selector| {
        selector.split(',').filter(|t| !t.is_empty()).all(|term| {
            let Some((field, value)) = term.split_once('=') else { return false };
            let pointer = format!("/{}", field.replace('.', "/"));
            object.pointer(&pointer).and_then(Value::as_str).unwrap_or("") == value
        })
    })
}

fn in_scope(object: &Value, target: &Target, selector: Option<&str>) -> bool {
    let meta = &object["metadata"];
    target.namespace.as_deref().is_none_or(|ns| meta["namespace"] == ns) && fields_match(object, selector)
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

fn status(code: StatusCode, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code.as_u16()})
}

async fn answer(state: Arc<Mutex<State>>, changed: &watch::Sender<u64>, req: Request<Incoming>) -> Response<Body> {
    let (path, query) = (req.uri().path().to_owned(), req.uri().query().unwrap_or("").to_owned());
    let down = {
        let mut s = state.lock().unwrap();
        s.requests.push(format!("{} {path}?{query}", req.method()));
        s.down
    };
    if down {
        let unavailable = StatusCode::SERVICE_UNAVAILABLE;
        return json_response(unavailable, &status(unavailable, "ServiceUnavailable", "the server is shutting down"));
    }
    if path == "/version" {
        return json_response(
            StatusCode::OK,
            &json!({"major": "1", "minor": "34", "gitVersion": "v1.34.1", "gitCommit": "fake", "gitTreeState": "clean",
                    "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"}),
        );
    }
    let is_event = path.starts_with("/apis/events.k8s.io/v1/") && path.contains("/events");
    if is_event && matches!(*req.method(), Method::POST | Method::PATCH) {
        let body = req.into_body().collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
        let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        state.lock().unwrap().events.push(event.clone());
        return json_response(StatusCode::CREATED, &event);
    }
    if req.method() == Method::PATCH {
        if let Some(target) = target(&path).filter(|t| t.name.is_some()) {
            let merge = req
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/merge-patch+json"));
            let body = req.into_body().collect().await.map(http_body_util::Collected::to_bytes).unwrap_or_default();
            return patch(&state, changed, &target, merge, &body);
        }
    }
    let Some(target) = target(&path).filter(|_| req.method() == Method::GET) else {
        let code = StatusCode::NOT_FOUND;
        return json_response(code, &status(code, "NotFound", &format!("the server could not find {path}")));
    };
    if state.lock().unwrap().forbidden.contains(&target.collection) {
        let code = StatusCode::FORBIDDEN;
        let plural = target.collection.rsplit('/').next().unwrap_or_default();
        let message = format!(
            "{plural} is forbidden: User \"system:serviceaccount:kube-system:imds-filter\" cannot list resource \"{plural}\" at the cluster scope"
        );
        return json_response(code, &status(code, "Forbidden", &message));
    }
    let selector = query_param(&query, "fieldSelector");
    let metadata_only = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("as=PartialObjectMetadata"));
    if query_param(&query, "watch").is_some_and(|w| w == "true" || w == "1") {
        let from = query_param(&query, "resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        return watch_stream(state, changed.subscribe(), target, selector, from, metadata_only);
    }
    let s = state.lock().unwrap();
    let objects = s.objects.get(target.collection);
    if let Some(name) = &target.name {
        let key = (target.namespace.clone().unwrap_or_default(), name.clone());
        if let Some(object) = objects.and_then(|o| o.get(&key)) {
            return json_response(StatusCode::OK, object);
        }
        let code = StatusCode::NOT_FOUND;
        return json_response(code, &status(code, "NotFound", &format!("{} {name:?} not found", target.kind)));
    }
    let items: Vec<Value> = objects
        .into_iter()
        .flat_map(|o| o.values())
        .filter(|o| in_scope(o, &target, selector.as_deref()))
        .map(|o| if metadata_only { partial(o) } else { o.clone() })
        .collect();
    let (api_version, kind) = if metadata_only {
        ("meta.k8s.io/v1", "PartialObjectMetadata")
    } else {
        KINDS.iter().find(|(_, k, _)| *k == target.kind).map(|(v, k, _)| (*v, *k)).expect("known kind")
    };
    json_response(
        StatusCode::OK,
        &json!({"apiVersion": api_version, "kind": format!("{kind}List"),
                "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
    )
}

/// A merge patch of one stored object: conditional on a `metadata.resourceVersion` in it.
fn patch(
    state: &Mutex<State>,
    changed: &watch::Sender<u64>,
    target: &Target,
    merge: bool,
    body: &[u8],
) -> Response<Body> {
    let unsupported = StatusCode::UNSUPPORTED_MEDIA_TYPE;
    if !merge {
        return json_response(unsupported, &status(unsupported, "UnsupportedMediaType", "only merge patches here"));
    }
    let Ok(patch) = serde_json::from_slice::<Value>(body) else {
        let bad = StatusCode::BAD_REQUEST;
        return json_response(bad, &status(bad, "BadRequest", "the patch is not JSON"));
    };
    let key = (target.namespace.clone().unwrap_or_default(), target.name.clone().unwrap_or_default());
    let mut s = state.lock().unwrap();
    s.patches.push(patch.clone());
    let Some(mut object) = s.objects.get(target.collection).and_then(|c| c.get(&key)).cloned() else {
        let code = StatusCode::NOT_FOUND;
        return json_response(code, &status(code, "NotFound", &format!("{} {:?} not found", target.kind, key.1)));
    };
    if let Some(change) = s.interposed.take() {
        merge_patch(&mut object, &change);
        s.store(target.collection, key.clone(), &mut object);
    }
    let wanted = patch.pointer("/metadata/resourceVersion").and_then(Value::as_str);
    if wanted.is_some_and(|v| Some(v) != object["metadata"]["resourceVersion"].as_str()) {
        let code = StatusCode::CONFLICT;
        let message = "the object has been modified; please apply your changes to the latest version and try again";
        return json_response(code, &status(code, "Conflict", message));
    }
    merge_patch(&mut object, &patch);
    let rv = s.store(target.collection, key, &mut object);
    drop(s);
    changed.send_replace(rv);
    json_response(StatusCode::OK, &object)
}

/// RFC 7386: objects merge member by member, `null` removes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (name, value) in members {
        if value.is_null() {
            target.as_object_mut().map(|o| o.remove(name));
        } else {
            merge_patch(&mut target[name], value);
        }
    }
}

/// An object as a metadata-only request sees it.
fn partial(object: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": object["metadata"]})
}

/// A watch: every matching change after `from`, then new ones as they come, until the
/// server goes down or the client hangs up.
fn watch_stream(
    state: Arc<Mutex<State>>,
    mut changed: watch::Receiver<u64>,
    target: Target,
    selector: Option<String>,
    from: u64,
    metadata_only: bool,
) -> Response<Body> {
    let (mut tx, body) = Channel::<Bytes, Infallible>::new(16);
    let expired = from < state.lock().unwrap().compacted_to;
    tokio::spawn(async move {
        if expired {
            let gone = status(StatusCode::GONE, "Expired", &format!("too old resource version: {from}"));
            let line = json!({"type": "ERROR", "object": gone}).to_string() + "\n";
            let _ = tx.send_data(Bytes::from(line)).await;
            return;
        }
        let mut last = from;
        loop {
            let (lines, down) = {
                let s = state.lock().unwrap();
                let lines: Vec<(tokio::time::Instant, String)> = s
                    .history
                    .iter()
                    .filter(|c| c.rv > last && c.collection == target.collection)
                    .filter(|c| in_scope(&c.object, &target, selector.as_deref()))
                    .map(|c| {
                        let object = if metadata_only { partial(&c.object) } else { c.object.clone() };
                        (c.at + s.watch_delay, json!({"type": c.kind, "object": object}).to_string() + "\n")
                    })
                    .collect();
                last = s.rv;
                (lines, s.down)
            };
            if down {
                return;
            }
            for (due, line) in lines {
                tokio::time::sleep_until(due).await;
                if tx.send_data(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
            if changed.changed().await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(body.boxed());
    r.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}
