//! Where policy comes from. Each source produces a whole [`crate::policy::Snapshot`]; the
//! rest of the agent never knows which source it was.
pub mod manifests;
