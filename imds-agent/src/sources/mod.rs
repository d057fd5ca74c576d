//! Where policy comes from: a directory of manifests, or the Kubernetes API. Each source
//! produces a whole [`crate::policy::Snapshot`]; the rest of the agent never knows which
//! source it was.
pub mod convert;
pub mod kube;
pub mod manifests;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::Context as _;
use serde::Deserialize;
use tokio::sync::watch;

use crate::{
    events,
    policy::{PolicySettings, Powers, Snapshot},
    telemetry::SourceStatus,
};

/// Of a pod's container (init and ephemeral ones too), only its security context: what it is
/// granted. Both sources read containers through this.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub security_context: Option<SecurityContext>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct SecurityContext {
    pub privileged: Option<bool>,
    pub capabilities: Option<Capabilities>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Capabilities {
    #[serde(default)]
    pub add: Vec<String>,
    #[serde(default)]
    pub drop: Vec<String>,
}

/// One of an object's `metadata.ownerReferences`: both sources read a pod's controller
/// through this.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct OwnerReference {
    pub kind: String,
    pub name: String,
    pub controller: Option<bool>,
}

/// `metadata.ownerReferences`, read leniently: the policy does not depend on it, so a value
/// of another shape means no controller, never a refused object.
///
/// # Errors
/// Only what the format itself fails on (malformed YAML or JSON).
pub fn lenient_references<'de, D: serde::Deserializer<'de>>(value: D) -> Result<Vec<OwnerReference>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum References {
        Read(Vec<OwnerReference>),
        Unread(serde::de::IgnoredAny),
    }
    Ok(match Option::<References>::deserialize(value)? {
        Some(References::Read(references)) => references,
        Some(References::Unread(_)) | None => Vec::new(),
    })
}

/// The `kind` and `name` of the controller among `references` (the one with
/// `controller: true`; Kubernetes allows one at most).
pub fn controller(references: &[OwnerReference]) -> Option<(&str, &str)> {
    references.iter().find(|r| r.controller == Some(true)).map(|r| (r.kind.as_str(), r.name.as_str()))
}

/// What a pod's containers are granted, all of them together.
pub fn powers<'a>(containers: impl IntoIterator<Item = &'a Container>) -> Powers {
    let mut powers = Powers::default();
    for sc in containers.into_iter().map(|c| c.security_context.as_ref()) {
        let caps = sc.and_then(|s| s.capabilities.as_ref());
        let privileged = sc.and_then(|s| s.privileged).unwrap_or(false);
        powers.add_container(privileged, caps.map_or(&[], |c| &c.add), caps.map_or(&[], |c| &c.drop));
    }
    powers
}

/// Where the policy comes from, checked before anything changes.
pub enum PolicySource {
    /// Loaded already: a broken file is an error now, and later only keeps the previous policy.
    Manifests {
        dir: PathBuf,
        initial: Box<Snapshot>,
    },
    Kube {
        client: ::kube::Client,
        node: String,
    },
}

impl PolicySource {
    /// `manifests` (a directory), else the Kubernetes API for node `node` (through
    /// `kubeconfig`, or kube's defaults).
    pub async fn check(
        manifests: Option<&Path>,
        node: Option<String>,
        kubeconfig: Option<&Path>,
    ) -> anyhow::Result<PolicySource> {
        if let Some(dir) = manifests {
            return Ok(PolicySource::Manifests { dir: dir.to_owned(), initial: Box::new(manifests::load_dir(dir)?) });
        }
        let node = node.context("--kube needs this node's name: set NODE_NAME or pass --node-name")?;
        let client = kube_client(kubeconfig).await?;
        Ok(PolicySource::Kube { client, node })
    }

    /// Starts watching. With `pod_lookups` (the least time between two), the API source
    /// looks a pod up when a request comes before the watch brought it ([`kube::PodLookup`]).
    pub fn start(
        self,
        settings: PolicySettings,
        status: &Arc<SourceStatus>,
        events: Option<events::DenialEvents>,
        pod_lookups: Option<std::time::Duration>,
    ) -> anyhow::Result<Started> {
        match self {
            PolicySource::Manifests { dir, initial } => {
                let (snapshots, updates) = watch::channel(Arc::new(initial.with_settings(settings.clone())));
                status.loaded();
                let watcher = manifests::watch(&dir, settings, snapshots, Arc::clone(status))
                    .context("watching the manifests directory")?;
                Ok(Started { updates, synced: true, watcher: Some(watcher), lookup: None })
            }
            PolicySource::Kube { client, node } => {
                let (snapshots, updates) =
                    watch::channel(Arc::new(Snapshot::default().with_settings(settings.clone())));
                let status = Arc::clone(status);
                let (lookup, asks) = match pod_lookups {
                    Some(interval) => {
                        let (lookup, asks) = kube::lookups(interval);
                        (Some(lookup), Some(asks))
                    }
                    None => (None, None),
                };
                tokio::spawn(async move {
                    kube::run(client, &node, settings, snapshots, status, events, asks).await;
                });
                Ok(Started { updates, synced: false, watcher: None, lookup })
            }
        }
    }
}

/// A source, started.
pub struct Started {
    pub updates: watch::Receiver<Arc<Snapshot>>,
    /// Whether the first snapshot is synced already.
    pub synced: bool,
    /// The file watcher to keep alive (manifests only).
    pub watcher: Option<notify::RecommendedWatcher>,
    /// Where to ask for a pod the snapshot does not know (the API source only).
    pub lookup: Option<kube::PodLookup>,
}

/// A client from `--kubeconfig`, else kube's defaults (in-cluster, then KUBECONFIG).
pub async fn kube_client(kubeconfig: Option<&Path>) -> anyhow::Result<::kube::Client> {
    let mut config = match kubeconfig {
        None => ::kube::Config::infer()
            .await
            .context("finding the Kubernetes API (in-cluster service account, or KUBECONFIG)")?,
        Some(path) => {
            let file =
                ::kube::config::Kubeconfig::read_from(path).with_context(|| format!("reading {}", path.display()))?;
            ::kube::Config::from_custom_kubeconfig(file, &::kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using {}", path.display()))?
        }
    };
    // kube retries 429/503 inside a request for minutes; the watchers back off on their own,
    // and an API server in trouble must show in readiness (fail-static) at once.
    config.default_retry = false;
    ::kube::Client::try_from(config).context("creating the Kubernetes client")
}
