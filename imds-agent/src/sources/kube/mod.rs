//! Policy from the Kubernetes API (`--kube`): the pods on this node and aad-pod-identity's
//! objects in every namespace, through kube-rs watchers, into the same [`Snapshot`] the
//! manifests source makes.
//!
//! - Objects are deserialized lean ([`lean`]): what the policy does not read (managed fields,
//!   kubectl's last-applied copy, a pod's containers and status) is skipped by the parser,
//!   never allocated.
//! - Pods are watched with a `spec.nodeName=<this node>` field selector, so the agent holds its
//!   own node's pods only: uid, name, namespace, labels and ServiceAccount.
//! - ServiceAccounts (all namespaces, metadata only) for workload identity: only their
//!   `azure.workload.identity/*` annotations are kept, and only those naming a client id
//!   reach the snapshot.
//! - Each kind is mirrored as the policy's own objects ([`mirror`]): once converted, nothing
//!   of the API's object is kept.
//! - No snapshot is published until every kind has its initial list.
//! - A request from a pod the watch has not brought yet makes the agent look the node's
//!   pods up once ([`lookup`]); what that finds stands in until the watch brings the pod
//!   ([`FoundPods`]).
//! - Watch errors are retried with backoff; the mirrors keep what they had, so the policy in
//!   force is the last one seen (fail-static) and the source reports `failing`. A `410 Gone`
//!   makes the watcher list again.
mod found;
mod ignored;
mod lean;
mod lookup;
mod mirror;

use std::{sync::Arc, time::Duration};

use futures::{stream::BoxStream, FutureExt as _, StreamExt as _};
use kube::{
    api::ListParams,
    runtime::{
        watcher::{self, Event},
        WatchStreamExt as _,
    },
    Api, Client, ResourceExt as _,
};
use lean::{Lean, LeanAccount, LeanBinding, LeanException, LeanIdentity, LeanNamespace, LeanPod};
use mirror::Mirror;
use tokio::sync::{mpsc, watch};

use found::FoundPods;
pub use lookup::{LookupResult, PodLookup};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use ignored::{IgnoredObjects, Reach};

use crate::{
    events::DenialEvents,
    policy::{self, PolicySettings, Snapshot},
    sources::convert::{self, Place, OBJECT_ID_ANNOTATION},
    telemetry::SourceStatus,
};

/// Changes arriving this close together make one snapshot.
const SETTLE: Duration = Duration::from_millis(10);
/// While failing, how often to ask whether the API server answers again. A re-opened watch
/// that has nothing to say yields no event, so recovery cannot be read off the streams.
const RECOVERY_PROBE: Duration = Duration::from_secs(2);

/// One watch event, of whichever kind.
enum Change {
    Pod(Event<LeanPod>),
    Identity(Event<LeanIdentity>),
    Binding(Event<LeanBinding>),
    Exception(Event<LeanException>),
    Account(Event<LeanAccount>),
    Namespace(Event<LeanNamespace>),
    /// Pods a lookup found.
    Found(lookup::Found),
}

/// The mirrors a snapshot is built from.
#[derive(Default)]
struct Mirrors {
    pods: Mirror<policy::Pod>,
    identities: Mirror<policy::Identity>,
    bindings: Mirror<policy::Binding>,
    exceptions: Mirror<policy::Exception>,
    /// Only ServiceAccounts naming a client id.
    service_accounts: Mirror<policy::ServiceAccount>,
    /// Only namespaces with rules of ours.
    namespaces: Mirror<policy::NamespaceRules>,
    /// Pods a lookup found that the watch has not brought yet.
    found: FoundPods,
    /// Objects the conversion left out.
    ignored: IgnoredObjects,
    /// Where Events on ignored objects go.
    events: Option<DenialEvents>,
}

impl Mirrors {
    /// Applies one change; returns whether it came from a watch (not a lookup).
    fn apply(&mut self, change: Change) -> bool {
        let ignored = &mut self.ignored;
        match change {
            Change::Pod(event) => {
                track(ignored, &event);
                // A relist's end drops, without a Delete, the pods deleted while the watch
                // was away; an update the policy cannot use drops its pod: none may come
                // back through a lookup.
                let updated = match &event {
                    Event::Apply(p) => p.metadata.uid.clone(),
                    _ => None,
                };
                let before = matches!(event, Event::InitDone).then(|| uids(&self.pods));
                self.found.watched(&event);
                self.pods.apply(event, |p| ignored.note(p, || Reach::Pod, pod(p)));
                if let Some(before) = before {
                    let kept = uids(&self.pods);
                    self.found.departed(before.into_iter().filter(|uid| !kept.contains(uid)));
                }
                if let Some(uid) = updated.filter(|uid| !self.pods.values().any(|p| &p.uid == uid)) {
                    self.found.departed([uid]);
                }
            }
            Change::Found(pods) => {
                let watched = |uid: &str| self.pods.values().any(|p| p.uid == uid);
                self.found.adopt(pods.iter().filter_map(|p| converted(pod(p))), watched);
                return false;
            }
            Change::Identity(event) => {
                track(ignored, &event);
                self.identities.apply(event, |i| ignored.note(i, || Reach::Identity, identity(i)));
            }
            Change::Binding(event) => {
                track(ignored, &event);
                let reach = |b: &LeanBinding| Reach::Binding { selector: b.spec.selector.clone() };
                self.bindings.apply(event, |b| ignored.note(b, || reach(b), binding(b)));
            }
            Change::Exception(event) => {
                track(ignored, &event);
                self.exceptions.apply(event, |e| ignored.note(e, || Reach::Exception, exception(e)));
            }
            Change::Account(event) => self.service_accounts.apply(event, service_account),
            Change::Namespace(event) => self.namespaces.apply(event, namespace_rules),
        }
        true
    }

    /// Records Events on the ignored objects that concern this node's pods, when due.
    fn tell_ignored(&mut self) {
        let Some(events) = &self.events else { return };
        let pods: Vec<&policy::Pod> = self.pods.values().collect();
        let bindings: Vec<&policy::Binding> = self.bindings.values().collect();
        for object in self.ignored.due(&pods, &bindings, std::time::Instant::now()) {
            events.ignored(object);
        }
    }

    /// Whether every kind has its initial list.
    fn all_listed(&self) -> bool {
        self.pods.listed()
            && self.identities.listed()
            && self.bindings.listed()
            && self.exceptions.listed()
            && self.service_accounts.listed()
            && self.namespaces.listed()
    }

    fn snapshot(&mut self, settings: &PolicySettings) -> Snapshot {
        Snapshot::new(
            self.pods.values().chain(self.found.current()).cloned(),
            self.identities.values().cloned(),
            self.bindings.values().cloned(),
            self.exceptions.values().cloned(),
        )
        .with_service_accounts(self.service_accounts.values().cloned())
        .with_namespaces(self.namespaces.values().cloned())
        .with_settings(settings.clone())
    }
}

fn uids(pods: &Mirror<policy::Pod>) -> std::collections::HashSet<String> {
    pods.values().map(|p| p.uid.clone()).collect()
}

/// The lookup task's end of a [`PodLookup`].
pub struct Asks {
    asks: PodLookup,
    interval: Duration,
}

/// A handle for the request handlers, and the asks to give [`run`]: one list at most every
/// `interval`.
pub fn lookups(interval: Duration) -> (PodLookup, Asks) {
    let lookup = PodLookup::default();
    (lookup.clone(), Asks { asks: lookup, interval })
}

/// Runs the watches for `node`, publishing a snapshot on `tx` after the initial sync and
/// after every change, and answers `lookups` (if any). Returns only when every watch stream
/// has ended (never, in practice).
pub async fn run(
    client: Client,
    node: &str,
    settings: PolicySettings,
    tx: watch::Sender<Arc<Snapshot>>,
    status: Arc<SourceStatus>,
    events: Option<DenialEvents>,
    lookups: Option<Asks>,
) {
    let node_pods = all().fields(&format!("spec.nodeName={node}"));
    let probe = client.clone();
    let mut streams: Vec<BoxStream<'static, Result<Change, watcher::Error>>> = vec![
        watch_kind(Api::all(client.clone()), node_pods, Change::Pod),
        watch_kind(Api::all(client.clone()), all(), Change::Identity),
        watch_kind(Api::all(client.clone()), all(), Change::Binding),
        watch_kind(Api::all(client.clone()), all(), Change::Exception),
        watch_kind(Api::all(client.clone()), all(), Change::Account),
        watch_kind(Api::all(client.clone()), all(), Change::Namespace),
    ];
    if let Some(Asks { asks, interval }) = lookups {
        let (found, arrivals) = mpsc::channel(1);
        let pacing = lookup::Pacing::every(interval);
        let ends = lookup::Ends { asks, pacing, snapshots: tx.subscribe(), found, status: Arc::clone(&status) };
        tokio::spawn(lookup::run(client, node.to_owned(), ends));
        let arrivals = futures::stream::unfold(arrivals, |mut arrivals| async move {
            arrivals.recv().await.map(|pods| (Ok(Change::Found(pods)), arrivals))
        });
        streams.push(arrivals.boxed());
    }
    let mut merged = futures::stream::select_all(streams);
    let mut mirrors = Mirrors { events, ..Mirrors::default() };

    let mut synced = false;
    let mut probes = tokio::time::interval(RECOVERY_PROBE);
    loop {
        let expiry = mirrors.found.next_expiry().map(tokio::time::Instant::from_std);
        let event = tokio::select! {
            event = merged.next() => match event {
                Some(event) => Some(event),
                None => return,
            },
            () = tokio::time::sleep_until(expiry.unwrap_or_else(tokio::time::Instant::now)), if expiry.is_some() => None,
            _ = probes.tick(), if status.failing().is_some() => {
                if probe.apiserver_version().await.is_ok() {
                    tracing::info!("Kubernetes API reachable again");
                    status.recovered();
                }
                continue;
            }
        };
        // Whether the watches said something: only then has the source loaded (a lookup's
        // find, or a stand-in's expiry, says nothing of the watches' health).
        let mut watched = match event {
            Some(Ok(change)) => mirrors.apply(change),
            Some(Err(e)) => {
                watch_failed(&status, e);
                continue;
            }
            None => false, // a stand-in expired: publish without it
        };
        // Let a burst of events (an initial list) arrive before rebuilding. A failure in the
        // burst is reported after the rebuild, so that the rebuild does not clear it.
        tokio::time::sleep(SETTLE).await;
        let mut failure = None;
        while let Some(Some(more)) = merged.next().now_or_never() {
            match more {
                Ok(change) => watched |= mirrors.apply(change),
                Err(e) => failure = Some(e),
            }
        }
        if !synced {
            synced = mirrors.all_listed();
            if synced {
                tracing::info!("Kubernetes API: initial sync done");
            }
        }
        if synced {
            let snapshot = mirrors.snapshot(&settings);
            let (p, i, b, e) = snapshot.sizes();
            tracing::debug!(pods = p, identities = i, bindings = b, exceptions = e, "policy updated from the API");
            tx.send_replace(Arc::new(snapshot));
            if watched {
                status.loaded();
            }
            mirrors.tell_ignored();
        } // else never publish a half-listed policy
        if let Some(e) = failure {
            watch_failed(&status, e);
        }
    }
}

fn watch_failed(status: &SourceStatus, error: watcher::Error) {
    let message = format!("{:#}", anyhow::Error::from(error));
    tracing::warn!(error = %message, "Kubernetes API watch failed; enforcing the last known policy and retrying");
    status.failed(message);
}

/// Lists (at start and on every relist) are served from the API server's watch cache, as
/// the kubelet's are, not as quorum reads from etcd: with one agent per node, a rollout or an
/// API server restart would otherwise send thousands of cluster-wide quorum lists at once.
/// What a cached list may lack, the watch that follows it brings.
fn all() -> watcher::Config {
    watcher::Config::default().any_semantic()
}

/// Watches one kind, its events wrapped by `change` so that all kinds merge into one stream.
fn watch_kind<S: lean::Shape>(
    api: Api<Lean<S>>,
    config: watcher::Config,
    change: fn(Event<Lean<S>>) -> Change,
) -> BoxStream<'static, Result<Change, watcher::Error>> {
    watcher::watcher(api, config).default_backoff().map(move |e| e.map(change)).boxed()
}

/// One snapshot for `imds-agent explain --kubeconfig`: the pod `namespace/name` (wherever it
/// runs), every aad-pod-identity object, and the pod namespace's ServiceAccounts and rules,
/// each listed once. No watch, nothing kept.
pub async fn snapshot_for_pod(
    client: Client,
    namespace: &str,
    name: &str,
    settings: PolicySettings,
) -> Result<Snapshot, kube::Error> {
    let by_name = ListParams::default().fields(&format!("metadata.name={name}"));
    let every = ListParams::default();
    let pods = Api::<LeanPod>::namespaced(client.clone(), namespace).list(&by_name).await?;
    let identities = Api::<LeanIdentity>::all(client.clone()).list(&every).await?;
    let bindings = Api::<LeanBinding>::all(client.clone()).list(&every).await?;
    let exceptions = Api::<LeanException>::all(client.clone()).list(&every).await?;
    let accounts = Api::<LeanAccount>::namespaced(client.clone(), namespace).list(&every).await?;
    let own_namespace = ListParams::default().fields(&format!("metadata.name={namespace}"));
    let namespaces = Api::<LeanNamespace>::all(client).list(&own_namespace).await?;
    // The agent's own rules: what it would leave out is left out here too.
    Ok(Snapshot::new(
        pods.items.iter().filter_map(|p| converted(pod(p))),
        identities.items.iter().filter_map(|i| converted(identity(i))),
        bindings.items.iter().filter_map(|b| converted(binding(b))),
        exceptions.items.iter().filter_map(|e| converted(exception(e))),
    )
    .with_service_accounts(accounts.items.iter().filter_map(service_account))
    .with_namespaces(namespaces.items.iter().filter_map(namespace_rules))
    .with_settings(settings))
}

/// Where an object lives, as the conversion reads it.
fn place(meta: &ObjectMeta) -> Place<'_> {
    Place { namespace: meta.namespace.as_deref().unwrap_or_default(), name: meta.name.as_deref().unwrap_or_default() }
}

/// A namespace's rules, if its annotations set any. Annotations that cannot be read give the
/// narrowest rules (no identity, no extra path, enforced), never the cluster default.
fn namespace_rules(n: &LeanNamespace) -> Option<policy::NamespaceRules> {
    let name = n.metadata.name.as_deref().unwrap_or_default();
    convert::namespace(name, n.metadata.annotations.as_ref()).unwrap_or_else(|problem| {
        tracing::warn!(%problem, "a namespace's imds-filter annotations cannot be read: its pods get no identity and no extra path until they are fixed");
        Some(policy::NamespaceRules::unreadable(name))
    })
}

fn service_account(a: &LeanAccount) -> Option<policy::ServiceAccount> {
    convert::service_account(place(&a.metadata), a.metadata.annotations.as_ref())
}

fn pod(p: &LeanPod) -> Result<policy::Pod, String> {
    let status = &p.status;
    let ips = status.ips();
    let fields = convert::PodFields {
        uid: p.metadata.uid.as_deref().unwrap_or_default(),
        labels: p.metadata.labels.as_ref(),
        service_account_name: p.spec.service_account_name.as_deref(),
        ips,
        host_network: p.spec.host_network.unwrap_or(false),
        phase: status.phase.as_deref(),
        powers: p.spec.powers(),
        controller: p
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find_map(|r| (r.controller == Some(true)).then_some((r.kind.as_str(), r.name.as_str()))),
    };
    convert::pod(place(&p.metadata), fields)
}

fn identity(i: &LeanIdentity) -> Result<policy::Identity, String> {
    let password = i.spec.client_password.as_ref();
    let spec = convert::IdentitySpec {
        identity_type: i.spec.identity_type,
        client_id: &i.spec.client_id,
        resource_id: &i.spec.resource_id,
        tenant_id: &i.spec.tenant_id,
        secret_name: password.and_then(|p| p.name.as_deref()),
        secret_namespace: password.and_then(|p| p.namespace.as_deref()),
        auxiliary_tenant_ids: &i.spec.auxiliary_tenant_ids,
        ad_endpoint: &i.spec.ad_endpoint,
        object_id: i.annotations().get(OBJECT_ID_ANNOTATION).map(String::as_str),
    };
    convert::identity(place(&i.metadata), &spec)
}

fn binding(b: &LeanBinding) -> Result<policy::Binding, String> {
    convert::binding(place(&b.metadata), &b.spec.azure_identity, &b.spec.selector)
}

fn exception(e: &LeanException) -> Result<policy::Exception, String> {
    convert::exception(place(&e.metadata), &e.spec.pod_labels)
}

/// Before an event reaches a mirror: a deleted object, or a kind listed afresh, is no longer
/// ignored (what the list brings is noted again).
fn track<K: kube::Resource<DynamicType = ()>>(ignored: &mut IgnoredObjects, event: &Event<K>) {
    match event {
        Event::Delete(object) => ignored.forget(object),
        Event::Init => ignored.forget_kind::<K>(),
        Event::InitApply(_) | Event::InitDone | Event::Apply(_) => {}
    }
}

/// What the conversion made of an object read outside the watches (`explain`, a lookup):
/// ignored objects are left out quietly (the watch logs them).
fn converted<T>(result: Result<T, String>) -> Option<T> {
    result.inspect_err(|problem| tracing::debug!(%problem, "policy object ignored")).ok()
}

#[cfg(test)]
mod tests {
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
            s.lists
                .insert(IDENTITIES, list("aadpodidentity.k8s.io/v1", "AzureIdentity", "20", &[identity("20", "c-1")]));
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
        next_snapshot(&mut rx, "the unlabelled pod", |s| {
            s.decide(WEB, None) == Decision::Deny(DenyReason::NoBindingLabel)
        })
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
}
