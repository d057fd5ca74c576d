//! How many connections the agent holds at once: in all, and per caller cgroup. A pod that
//! opens thousands of connections (idle, or sending its headers a byte at a time) gets its
//! share and no more; the rest are told to retry (a 429, as IMDS throttles) and closed at
//! once, so it cannot take the agent's memory, file descriptors or attention from other pods.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use prometheus_client::metrics::gauge::Gauge;

/// The limits, and the connections held now.
#[derive(Debug)]
pub struct ConnectionLimits {
    total: usize,
    per_cgroup: usize,
    held: Mutex<Held>,
    /// `imds_filter_connections_open`: the held total, as a metric.
    open: Gauge,
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    by_cgroup: HashMap<u64, usize>,
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shed {
    /// The agent holds its maximum of connections.
    Total,
    /// The caller's cgroup holds its maximum.
    PerCgroup,
}

impl Shed {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Shed::Total => "total",
            Shed::PerCgroup => "per_cgroup",
        }
    }
}

/// A held connection; released when dropped.
#[derive(Debug)]
pub struct Admitted {
    limits: Arc<ConnectionLimits>,
    cgroup: u64,
}

impl ConnectionLimits {
    /// At most `total` connections, and `per_cgroup` from any one cgroup (both at least 1);
    /// the number held is reported in `open`.
    pub fn new(total: usize, per_cgroup: usize, open: Gauge) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            total: total.max(1),
            per_cgroup: per_cgroup.max(1),
            held: Mutex::new(Held::default()),
            open,
        })
    }

    /// Admits a connection from `cgroup`, or says why not.
    pub fn admit(self: &Arc<Self>, cgroup: u64) -> Result<Admitted, Shed> {
        let mut held = self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if held.total >= self.total {
            return Err(Shed::Total);
        }
        let mine = held.by_cgroup.entry(cgroup).or_default();
        if *mine >= self.per_cgroup {
            return Err(Shed::PerCgroup);
        }
        *mine += 1;
        held.total += 1;
        self.open.set(held.total as i64);
        Ok(Admitted { limits: Arc::clone(self), cgroup })
    }

    /// Connections held now.
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner).total
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut held = self.limits.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        held.total -= 1;
        self.limits.open.set(held.total as i64);
        if let Some(mine) = held.by_cgroup.get_mut(&self.cgroup) {
            *mine -= 1;
            if *mine == 0 {
                held.by_cgroup.remove(&self.cgroup); // no entry per cgroup ever seen
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cgroup_gets_its_share_and_the_total_caps_all() {
        let limits = ConnectionLimits::new(5, 2, Gauge::default());
        let a1 = limits.admit(1).expect("first of cgroup 1");
        let _a2 = limits.admit(1).expect("second of cgroup 1");
        assert_eq!(limits.admit(1).unwrap_err(), Shed::PerCgroup);
        let _b = [limits.admit(2).unwrap(), limits.admit(2).unwrap(), limits.admit(3).unwrap()];
        assert_eq!((limits.held(), limits.open.get()), (5, 5));
        assert_eq!(limits.admit(4).unwrap_err(), Shed::Total);
        drop(a1);
        assert_eq!(limits.held(), 4);
        assert!(limits.admit(1).is_ok(), "a released slot is the cgroup's again");
    }

    #[test]
    fn released_cgroups_leave_no_entry() {
        let limits = ConnectionLimits::new(10, 10, Gauge::default());
        for cgroup in 0..100 {
            drop(limits.admit(cgroup).unwrap());
        }
        assert!(limits.held.lock().unwrap().by_cgroup.is_empty());
        assert_eq!(limits.held(), 0);
    }
}
