//! What `imds-probe` prints: one JSON line, a [`ProbeReport`], with the details of the larger
//! operations in their own report types.
use std::collections::BTreeMap;

/// What `imds-probe` prints.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ProbeReport {
    pub pid: u32,
    /// `connected`, `sent`, `error` or `setup-failed`.
    pub outcome: String,
    pub errno: Option<i32>,
    pub error: Option<String>,
    /// Local address of a connected TCP socket.
    pub local: Option<String>,
    /// Its peer, as `getpeername()` reports it.
    pub peer: Option<String>,
    /// First line the listener sent.
    pub reply: Option<String>,
    /// What a `burst` saw.
    pub burst: Option<BurstReport>,
    /// Mean ns per connect+close of a `connect-loop`.
    pub loop_ns: Option<f64>,
    /// When an `await-answer` first saw the answer it waited for (Unix time, µs).
    pub seen_at_us: Option<u64>,
    /// What a `hold` saw.
    pub hold: Option<HoldReport>,
    /// What a `churn` did and saw.
    pub churn: Option<ChurnReport>,
    /// Whether a hand-made SYN (`frame`) was answered with a SYN-ACK.
    pub answered: Option<bool>,
    /// Bytes a second a `stream` wrote.
    pub rate: Option<f64>,
    /// Datagrams a `udp-flood` sent.
    pub sent: Option<u64>,
}

/// What `imds-probe churn` did and saw.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ChurnReport {
    /// Pod cgroups created, and removed again.
    pub created: usize,
    pub removed: usize,
    pub mkdir_errors: usize,
    /// Token requests made, and how many got another answer than planned.
    pub asked: usize,
    pub mismatches: usize,
    /// `EXPECT -> STATUS`, counted.
    pub answers: BTreeMap<String, usize>,
    /// The first few errors and mismatches.
    pub errors: Vec<String>,
    pub seconds: f64,
}

/// What `imds-probe hold` saw of the connections it held.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct HoldReport {
    pub opened: usize,
    pub connect_errors: usize,
    /// Closed (or reset) by the peer while held.
    pub closed_by_peer: usize,
    /// Seconds from the start until the last of those was seen closed.
    pub last_closed_s: f64,
    /// Of those, how many were closed within 4 s of the start: turned away at once, not
    /// timed out (a 5 s header timeout).
    pub closed_at_once: usize,
}

/// What `imds-probe burst` saw: many token requests, retried the way the Azure SDKs retry.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct BurstReport {
    pub requests: usize,
    /// Final status of each request (after retries), by status code.
    pub statuses: BTreeMap<u16, usize>,
    /// Answers that were retried (429, 404, 410, 5xx), by status code; each carried a
    /// `Retry-After` unless listed in `retried_without_retry_after`.
    pub retried: BTreeMap<u16, usize>,
    pub retried_without_retry_after: usize,
    /// 200s whose token was not for the identity and resource asked for.
    pub wrong_tokens: usize,
    /// Transport failures and the like, a few of them.
    pub failures: Vec<String>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// From the first request started to the last answered.
    pub seconds: f64,
}
