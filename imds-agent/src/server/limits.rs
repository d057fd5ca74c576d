//! How many connections the agent holds at once: in all, and per caller (a pod on the agent
//! port, its containers together; a peer address on the metrics port). A pod that opens
//! thousands of connections (idle, or sending its headers a byte at a time), from one
//! container or many, gets its share and no more;
//! the rest are told to retry (a 429, as IMDS throttles) or closed at once, so it cannot take
//! the agent's memory, file descriptors or attention from other pods.
use parking_lot::Mutex;
use std::{collections::HashMap, hash::Hash, sync::Arc};

use prometheus_client::metrics::gauge::Gauge;

/// Who a connection on the agent port counts against: its pod, so that a pod's containers
/// share one limit; callers in no pod's cgroup (in the filtered hierarchy, but outside the
/// kubelet's pods) share one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Share {
    Pod(String),
    NoPod,
}

impl Share {
    #[must_use]
    pub fn of(pod_uid: Option<&str>) -> Share {
        pod_uid.map_or(Share::NoPod, |uid| Share::Pod(uid.to_owned()))
    }
}

/// The limits, and the connections held now, by caller `K` (a pod by default).
#[derive(Debug)]
pub struct ConnectionLimits<K = Share> {
    total: usize,
    per_caller: usize,
    held: Mutex<Held<K>>,
    /// `imds_filter_connections_open`: the held total, as a metric.
    open: Gauge,
}

#[derive(Debug)]
struct Held<K> {
    total: usize,
    by_caller: HashMap<K, usize>,
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shed {
    /// The agent holds its maximum of connections.
    Total,
    /// The caller (its pod, or its address) holds its maximum.
    PerCaller,
}

impl Shed {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::Total => "total",
            // The agent port's callers are pods (the metrics port does not count by label).
            Shed::PerCaller => "per_pod",
        }
    }
}

/// A held connection; released when dropped.
#[derive(Debug)]
pub struct Admitted<K: Hash + Eq + Clone = Share> {
    limits: Arc<ConnectionLimits<K>>,
    caller: K,
}

impl<K: Hash + Eq + Clone> ConnectionLimits<K> {
    /// At most `total` connections, and `per_caller` from any one caller (both at least 1);
    /// the number held is reported in `open`.
    pub fn new(total: usize, per_caller: usize, open: Gauge) -> Arc<ConnectionLimits<K>> {
        Arc::new(ConnectionLimits {
            total: total.max(1),
            per_caller: per_caller.max(1),
            held: Mutex::new(Held { total: 0, by_caller: HashMap::new() }),
            open,
        })
    }

    /// Admits a connection from `caller`, or says why not.
    pub fn admit(self: &Arc<Self>, caller: K) -> Result<Admitted<K>, Shed> {
        let mut held = self.held.lock();
        if held.total >= self.total {
            return Err(Shed::Total);
        }
        let mine = held.by_caller.entry(caller.clone()).or_default();
        if *mine >= self.per_caller {
            return Err(Shed::PerCaller);
        }
        *mine += 1;
        held.total += 1;
        self.open.set(held.total as i64);
        Ok(Admitted { limits: Arc::clone(self), caller })
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.held.lock().total
    }
}

impl<K: Hash + Eq + Clone> Drop for Admitted<K> {
    fn drop(&mut self) {
        let mut held = self.limits.held.lock();
        held.total -= 1;
        self.limits.open.set(held.total as i64);
        if let Some(mine) = held.by_caller.get_mut(&self.caller) {
            *mine -= 1;
            if *mine == 0 {
                held.by_caller.remove(&self.caller); // no entry per caller ever seen
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pods_containers_share_one_limit() {
        let limits: Arc<ConnectionLimits> = ConnectionLimits::new(10, 2, Gauge::default());
        let _a = [limits.admit(Share::of(Some("pod-a"))).unwrap(), limits.admit(Share::of(Some("pod-a"))).unwrap()];
        assert_eq!(limits.admit(Share::of(Some("pod-a"))).unwrap_err(), Shed::PerCaller);
        assert!(limits.admit(Share::of(Some("pod-b"))).is_ok(), "another pod has its own share");
        // Outside pods, all count together.
        let _c = [limits.admit(Share::of(None)).unwrap(), limits.admit(Share::of(None)).unwrap()];
        assert_eq!(limits.admit(Share::of(None)).unwrap_err(), Shed::PerCaller);
    }

    #[test]
    fn each_cgroup_gets_its_share_and_the_total_caps_all() {
        let limits: Arc<ConnectionLimits<u64>> = ConnectionLimits::new(5, 2, Gauge::default());
        let a1 = limits.admit(1).expect("first of cgroup 1");
        let _a2 = limits.admit(1).expect("second of cgroup 1");
        assert_eq!(limits.admit(1).unwrap_err(), Shed::PerCaller);
        let _b = [limits.admit(2).unwrap(), limits.admit(2).unwrap(), limits.admit(3).unwrap()];
        assert_eq!((limits.held(), limits.open.get()), (5, 5));
        assert_eq!(limits.admit(4).unwrap_err(), Shed::Total);
        drop(a1);
        assert_eq!(limits.held(), 4);
        assert!(limits.admit(1).is_ok(), "a released slot is the cgroup's again");
    }

    #[test]
    fn released_cgroups_leave_no_entry() {
        let limits: Arc<ConnectionLimits<u64>> = ConnectionLimits::new(10, 10, Gauge::default());
        for cgroup in 0..100 {
            drop(limits.admit(cgroup).unwrap());
        }
        assert!(limits.held.lock().by_caller.is_empty());
        assert_eq!(limits.held(), 0);
    }
}
