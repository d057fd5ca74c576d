//! The decision log: one JSON object per line on stdout for every request the agent answers
//! (the agent's own diagnostics go to stderr). Never tokens or secrets: only who asked, for
//! what, what was decided and why.
use std::{io::Write as _, time::SystemTime};

use serde::Serialize;

/// One decision. Fields that do not apply are left out.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct DecisionRecord {
    /// RFC 3339, UTC.
    pub time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    pub cgroup_id: u64,
    pub pid: u32,
    pub method: String,
    pub path: String,
    /// The selector the request named, as `client_id=…`, `object_id=…` or `msi_res_id=…`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// `namespace/name` of the AzureIdentity used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// `allow`, `deny`, `audit-allow`, `exception`, `forward`, `invalid`, `unknown-pod`, `error`.
    pub verdict: &'static str,
    pub reason: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    /// Where a served token came from: `cache`, `upstream` or `cache-after-failure`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_from: Option<&'static str>,
    pub latency_ms: f64,
}

impl DecisionRecord {
    /// A record stamped now.
    #[must_use]
    pub(crate) fn now() -> DecisionRecord {
        DecisionRecord { time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(), ..Default::default() }
    }

    /// Writes the record as one line on stdout.
    pub(crate) fn emit(&self) {
        let Ok(line) = serde_json::to_string(self) else { return };
        let mut out = std::io::stdout().lock();
        // A closed stdout must not take the agent down; the line is lost, nothing else.
        let _ = writeln!(out, "{line}");
    }
}
