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
    /// Every namespace, with its rules if it has any.
    namespaces: Mirror<KnownNamespace>,
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
            Change::Namespace(event) => self.namespaces.apply(event, |n| Some(known_namespace(n))),
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
        .with_namespaces(self.namespaces.values().filter_map(|n| n.rules.clone()))
        .with_known_namespaces(self.namespaces.values().map(|n| n.name.clone()))
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
            // Before the first sync a failure is a kind that cannot be listed (a missing RBAC
            // rule, say): the API server answering says nothing about that.
            _ = probes.tick(), if synced && status.failing().is_some() => {
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
    .with_namespaces(namespaces.items.iter().filter_map(|n| known_namespace(n).rules))
    .with_settings(settings))
}

/// Where an object lives, as the conversion reads it.
fn place(meta: &ObjectMeta) -> Place<'_> {
    Place { namespace: meta.namespace.as_deref().unwrap_or_default(), name: meta.name.as_deref().unwrap_or_default() }
}

/// A namespace as the API source keeps it: its name (a pod of a namespace the watch has not
/// brought is not decided for), and its rules if its annotations set any.
#[derive(Clone, Debug)]
struct KnownNamespace {
    name: String,
    rules: Option<policy::NamespaceRules>,
}

/// A namespace and its rules. Annotations that cannot be read give the narrowest rules (no
/// identity, enforced), never the cluster default.
fn known_namespace(n: &LeanNamespace) -> KnownNamespace {
    let name = n.metadata.name.clone().unwrap_or_default();
    let rules = convert::namespace(&name, n.metadata.annotations.as_ref()).unwrap_or_else(|problem| {
        tracing::warn!(%problem, "a namespace's imds-filter annotations cannot be read: its pods get no identity and no path grant until they are fixed");
        Some(policy::NamespaceRules::unreadable(&name, problem))
    });
    KnownNamespace { name, rules }
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
mod tests;
