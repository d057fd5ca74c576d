//! Where policy comes from: a directory of manifests, or the Kubernetes API. Each source
//! produces a whole [`crate::policy::Snapshot`]; the rest of the agent never knows which
//! source it was.
pub mod kube;
pub mod manifests;
