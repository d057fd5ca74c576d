//! Where policy comes from: a directory of manifests, or the Kubernetes API. Each source
//! produces a whole [`crate::policy::Snapshot`]; the rest of the agent never knows which
//! source it was.
pub mod convert;
pub mod kube;
pub mod manifests;

use serde::Deserialize;

use crate::policy::Powers;

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
