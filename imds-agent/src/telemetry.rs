//! Health, readiness and Prometheus metrics (`--metrics ADDR:PORT`).
//!
//! - `/healthz`: 200 when the process runs **and** each of the eight hooks of the attach
//!   cgroup has our program — asked of the kernel on every probe, never assumed.
//! - `/readyz`: healthy, and the policy source has loaded at least once. When its latest
//!   reload failed, the agent is still ready and enforcing the last good policy
//!   (fail-static); the body says so.
//! - `/metrics`: Prometheus text format; names are listed in `docs/agent.md`.
use parking_lot::Mutex;
use std::{
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::{Map, MapData, PerCpuArray};
use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;
use imds_common::{maps, Counter as KernelCounter};
use prometheus_client::{
    collector::Collector,
    encoding::{text::encode, DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use tokio::sync::watch;

use crate::{kernel, policy::Snapshot, tokens::TokenService};

/// Labels of `imds_filter_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The decision log's verdict (`allow`, `deny`, `invalid`, …).
    pub verdict: String,
    /// `token`, `token_variant` or `other`.
    pub path_class: String,
    pub status: String,
}

/// Whether the policy source has loaded, and whether its latest reload failed.
#[derive(Debug, Default)]
pub struct SourceStatus {
    synced: AtomicBool,
    /// The kernel's verdicts have been made to match a loaded policy at least once.
    reconciled: AtomicBool,
    last_sync_unix: AtomicU64,
    failing: Mutex<Option<String>>,
    /// Pods looked up because a request came before the watch brought them.
    lookups: Family<ResultLabel, Counter>,
}

impl SourceStatus {
    /// A load succeeded.
    pub fn loaded(&self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.last_sync_unix.store(now, Ordering::Relaxed);
        self.synced.store(true, Ordering::Relaxed);
        *self.failing.lock() = None;
    }

    /// The source works again (the data it holds is current), without a new load.
    pub fn recovered(&self) {
        *self.failing.lock() = None;
    }

    /// A reload failed; the previous policy stays in force.
    pub fn failed(&self, error: String) {
        *self.failing.lock() = Some(error);
    }

    /// The kernel's verdicts match a loaded policy.
    pub fn reconciled(&self) {
        self.reconciled.store(true, Ordering::Relaxed);
    }

    /// Whether the source has loaded at least once.
    pub fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// When the source last loaded (Unix time; 0: never).
    pub fn last_sync_unix(&self) -> u64 {
        self.last_sync_unix.load(Ordering::Relaxed)
    }

    /// The latest reload's error, while it is failing.
    pub fn failing(&self) -> Option<String> {
        self.failing.lock().clone()
    }

    /// `pods` looked up with this result (`found`, `missing`, `failed`).
    pub fn count_lookups(&self, result: &'static str, pods: usize) {
        if pods > 0 {
            self.lookups.get_or_create(&ResultLabel { result }).inc_by(pods as u64);
        }
    }
}

/// Everything the agent measures.
pub struct Telemetry {
    pub requests: Family<RequestLabels, Counter>,
    /// Tokens answered, by where they came from (`cache`, `upstream`, `cache-after-failure`).
    pub tokens_served: Family<FromLabel, Counter>,
    /// Token fetches started to warm the cache for a workload's new pod.
    pub tokens_prefetched: Counter,
    pub upstream_seconds: Histogram,
    /// Connections closed without being served, by reason (`no_origin`, `total`,
    /// `per_pod`).
    pub connections_refused: Family<ReasonLabel, Counter>,
    /// Connections being served now.
    pub connections_open: Gauge,
    /// cgroups the caller resolver remembers (set when it forgets the gone ones).
    pub cgroups_cached: Gauge,
    tokens: Arc<OnceLock<Arc<TokenService>>>,
    pub source: Arc<SourceStatus>,
    /// Why the agent does not serve: another process holds its port, or it handed over.
    not_serving: Mutex<Option<String>>,
    registry: Registry,
    attach_cgroup: PathBuf,
}

impl Telemetry {
    /// Metrics for an agent attached to `attach_cgroup` with its pins in `pin_dir`.
    pub fn new(
        attach_cgroup: PathBuf,
        pin_dir: &Path,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        source: Arc<SourceStatus>,
    ) -> Result<Telemetry, aya::maps::MapError> {
        let mut registry = Registry::with_prefix("imds_filter");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Requests answered, by verdict, path class and HTTP status", requests.clone());
        let upstream_seconds = Histogram::new(exponential_buckets(0.000_5, 2.0, 16));
        registry.register(
            "upstream_request_duration_seconds",
            "Time the metadata service took to answer the agent",
            upstream_seconds.clone(),
        );
        let tokens_served = Family::<FromLabel, Counter>::default();
        registry.register(
            "tokens_served",
            "Tokens answered to pods, by where they came from (cache, upstream, cache-after-failure)",
            tokens_served.clone(),
        );
        let tokens_prefetched = Counter::default();
        registry.register(
            "tokens_prefetched",
            "Token fetches started, with the upstream budget idle, to warm the cache for a workload's new pod",
            tokens_prefetched.clone(),
        );
        let connections_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed unserved: no kernel origin record (not redirected), or over the total or per-pod connection limit (answered 429)",
            connections_refused.clone(),
        );
        registry.register(
            "pod_lookups",
            "Pods looked up in the API because a request came before the watch brought them, by result (found, missing, failed)",
            source.lookups.clone(),
        );
        let connections_open = Gauge::default();
        registry.register("connections_open", "Redirected connections being served now", connections_open.clone());
        let cgroups_cached = Gauge::default();
        registry.register(
            "cgroups_cached",
            "cgroups resolved to pods and still remembered (updated every 10 s, when the gone ones are forgotten)",
            cgroups_cached.clone(),
        );
        let tokens = Arc::new(OnceLock::new());
        let counters = MapData::from_pin(pin_dir.join(maps::COUNTERS))?;
        let counters: PerCpuArray<MapData, u64> = PerCpuArray::try_from(Map::PerCpuArray(counters))?;
        registry.register_collector(Box::new(StateCollector {
            kernel: Mutex::new(counters),
            snapshot,
            source: Arc::clone(&source),
            tokens: Arc::clone(&tokens),
        }));
        Ok(Telemetry {
            requests,
            tokens_served,
            tokens_prefetched,
            upstream_seconds,
            connections_refused,
            connections_open,
            cgroups_cached,
            tokens,
            source,
            not_serving: Mutex::new(None),
            registry,
            attach_cgroup,
        })
    }

    /// Another process holds the agent's port (`why` says which), or, with `None`, no longer.
    pub fn port_held(&self, why: Option<String>) {
        let why = why.map(|why| format!("{why}; redirected connections are refused until the agent can listen"));
        *self.not_serving.lock() = why;
    }

    /// The agent handed the node over to the next agent.
    pub fn handed_over(&self) {
        let why = "handed over to the next agent, which serves the node now";
        *self.not_serving.lock() = Some(why.into());
    }

    /// The agent takes the node over from the one serving it (`true`), or has (`false`):
    /// not ready until it accepts connections.
    pub fn taking_over(&self, taking: bool) {
        let why = taking.then(|| "taking the node over from the agent serving it".to_owned());
        *self.not_serving.lock() = why;
    }

    /// Whether the agent is ready, and `/readyz`'s sentence saying so.
    pub fn readiness(&self) -> (bool, String) {
        let reconciled = self.source.reconciled.load(Ordering::Relaxed);
        let not_serving = self.not_serving.lock().clone();
        match (self.unhealthy(), self.source.synced.load(Ordering::Relaxed)) {
            (Some(why), _) => (false, format!("not ready: {why}")),
            (None, _) if not_serving.is_some() => (false, format!("not ready: {}", not_serving.unwrap_or_default())),
            (None, false) => match self.source.failing() {
                None => (false, "not ready: policy not loaded yet".into()),
                Some(e) => (false, format!("not ready: policy not loaded yet; the latest attempt failed: {e}")),
            },
            // Entries an earlier agent wrote may not apply any more (a revoked exception).
            (None, true) if !reconciled => {
                (false, "not ready: kernel verdicts not reconciled with the policy yet".into())
            }
            (None, true) => match self.source.failing() {
                None => (true, "ready".into()),
                Some(e) => {
                    (true, format!("ready (fail-static: enforcing the last good policy; latest reload failed: {e})"))
                }
            },
        }
    }

    /// Reports the token service's cache and budget from now on.
    pub fn watch_tokens(&self, tokens: Arc<TokenService>) {
        let _ = self.tokens.set(tokens);
    }

    /// Counts one token answered.
    pub fn count_token(&self, from: &'static str) {
        self.tokens_served.get_or_create(&FromLabel { from }).inc();
    }

    /// Counts one prefetch started.
    pub fn count_prefetch(&self) {
        self.tokens_prefetched.inc();
    }

    /// Counts one connection closed unserved.
    pub fn count_refused(&self, reason: &'static str) {
        self.connections_refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Counts one answered request.
    pub fn count_request(&self, verdict: &str, path: &str, status: StatusCode) {
        let path_class = match crate::imds::path::classify(path) {
            crate::imds::path::PathClass::Token => "token",
            crate::imds::path::PathClass::TokenVariant => "token_variant",
            crate::imds::path::PathClass::Malformed => "malformed",
            crate::imds::path::PathClass::Other { .. } => "other",
        };
        let labels = RequestLabels {
            verdict: verdict.to_owned(),
            path_class: path_class.to_owned(),
            status: status.as_u16().to_string(),
        };
        self.requests.get_or_create(&labels).inc();
    }

    /// Counts one request on the `/host/token` listener.
    pub fn count_host_token(&self, verdict: &str, status: StatusCode) {
        let labels = RequestLabels {
            verdict: verdict.to_owned(),
            path_class: "host_token".to_owned(),
            status: status.as_u16().to_string(),
        };
        self.requests.get_or_create(&labels).inc();
    }

    /// `None` when healthy, else what is wrong.
    pub fn unhealthy(&self) -> Option<String> {
        match kernel::attached_programs(&self.attach_cgroup) {
            Err(e) => Some(format!("cannot ask the kernel: {:#}", anyhow::Error::from(e))),
            Ok(hooks) => hooks
                .into_iter()
                .find(|(hook, progs)| !progs.iter().any(|p| p.name == hook.program()))
                .map(|(hook, _)| format!("no {hook:?} program attached to {}", self.attach_cgroup.display())),
        }
    }
}

/// Kernel counters, policy sizes and source state, read at scrape time.
struct StateCollector {
    kernel: Mutex<PerCpuArray<MapData, u64>>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    source: Arc<SourceStatus>,
    tokens: Arc<OnceLock<Arc<TokenService>>>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCollector").finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabel {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FromLabel {
    from: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        {
            let kernel = self.kernel.lock();
            let mut family = encoder.encode_descriptor(
                "kernel_events",
                "Events counted by the kernel programs (summed over CPUs)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for c in KernelCounter::ALL {
                let total: u64 = kernel.get(&(c as u32), 0).map_or(0, |v| v.iter().sum());
                ConstCounter::new(total).encode(family.encode_family(&EventLabel { event: c.name() })?)?;
            }
        }
        let (pods, identities, bindings, exceptions) = self.snapshot.borrow().sizes();
        let mut family = encoder.encode_descriptor(
            "policy_objects",
            "Objects in the policy snapshot in force",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (kind, n) in
            [("pods", pods), ("identities", identities), ("bindings", bindings), ("exceptions", exceptions)]
        {
            ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX)).encode(family.encode_family(&KindLabel { kind })?)?;
        }
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, value: i64| {
            let metric = ConstGauge::new(value);
            metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
        };
        gauge(
            &mut encoder,
            "source_synced",
            "1 once the policy source has loaded",
            i64::from(self.source.synced.load(Ordering::Relaxed)),
        )?;
        gauge(
            &mut encoder,
            "source_failing",
            "1 while the latest policy reload failed (the previous policy stays in force)",
            i64::from(self.source.failing().is_some()),
        )?;
        let last = i64::try_from(self.source.last_sync_unix.load(Ordering::Relaxed)).unwrap_or(0);
        gauge(&mut encoder, "source_last_sync_timestamp_seconds", "When the policy last loaded (Unix time)", last)?;
        if let Some(tokens) = self.tokens.get() {
            let stats = tokens.stats();
            let n = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
            gauge(&mut encoder, "token_cache_entries", "Tokens held in the node-wide cache", n(stats.entries))?;
            gauge(
                &mut encoder,
                "token_cache_bytes",
                "Bytes of tokens held in the cache (approximate)",
                n(stats.bytes),
            )?;
            gauge(
                &mut encoder,
                "token_fetches_running",
                "Token fetches under way (each shared by its waiters)",
                n(stats.fetches_running),
            )?;
            gauge(&mut encoder, "upstream_queued", "Calls waiting for a slot in the upstream budget", n(stats.queued))?;
            gauge(&mut encoder, "upstream_in_flight", "Calls to the metadata service in flight", n(stats.in_flight))?;
        }
        Ok(())
    }
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until the agent exits, or
/// until `stop` is set. The listener is bounded like every other (`server::admin`).
pub(crate) fn serve(listener: tokio::net::TcpListener, telemetry: Arc<Telemetry>, stop: watch::Receiver<bool>) {
    crate::server::admin::serve_tcp(listener, Arc::new(move |req| answer(req.uri().path(), &telemetry)), stop);
}

/// The answer to `path` on the metrics port; the control socket answers `/healthz` and
/// `/readyz` the same way.
pub(crate) fn answer(path: &str, telemetry: &Telemetry) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    match path {
        "/healthz" => match telemetry.unhealthy() {
            None => text(StatusCode::OK, "ok\n".into()),
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {why}\n")),
        },
        "/readyz" => {
            let (ready, sentence) = telemetry.readiness();
            text(if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, sentence + "\n")
        }
        "/metrics" => {
            let mut body = String::new();
            match encode(&mut body, &telemetry.registry) {
                Ok(()) => {
                    let mut r = text(StatusCode::OK, body);
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                    );
                    r
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}\n")),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /healthz, /readyz or /metrics\n".into()),
    }
}

/// Lets one log line through per interval for a kind of event that callers can repeat at
/// will (a pod flooding the agent must not flood the node's logs too); counts the rest.
#[derive(Debug)]
pub(crate) struct Throttle {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    pub(crate) const fn new(every: Duration) -> Throttle {
        Throttle { every, state: Mutex::new((None, 0)) }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were held back since the
    /// last one; `None` (and counted) otherwise.
    pub(crate) fn allow(&self) -> Option<u64> {
        let mut state = self.state.lock();
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.every => {
                state.1 += 1;
                None
            }
            _ => {
                state.0 = Some(now);
                Some(std::mem::take(&mut state.1))
            }
        }
    }
}
