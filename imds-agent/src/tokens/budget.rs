//! The upstream budget: at most `per_second` calls started in any window of a little over a
//! second, at most `in_flight` at once, and a bounded queue in front, served fairly — round
//! robin over requesters (pods), so one pod asking for many things cannot starve the others.
//!
//! IMDS allows the managed-identity category 20 requests per second and 5 concurrent per VM
//! and answers 429 beyond that; these are the defaults.
use parking_lot::Mutex;
use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use tokio::{
    sync::{oneshot, Notify},
    time::Instant,
};

/// The window `per_second` applies to. A quarter second over a second, so that calls that
/// reach IMDS later than they started (a busy node can delay a connection by a tenth of a
/// second or more) are still never more than `per_second` in IMDS's own one-second window.
const WINDOW: Duration = Duration::from_millis(1250);

/// The longest a call waits in the queue. Past it, the caller is told to retry (a 429 with
/// `Retry-After`) rather than kept waiting beyond its client's patience, with its connection
/// and its pod's share held all the while.
pub const MAX_WAIT: Duration = Duration::from_secs(8);

#[derive(Clone, Copy, Debug)]
pub struct BudgetConfig {
    pub per_second: usize,
    pub in_flight: usize,
    /// Calls waiting for a slot, all requesters together; beyond this, refused.
    pub queue: usize,
    /// Calls one requester may have waiting.
    pub queue_per_requester: usize,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig { per_second: 20, in_flight: 5, queue: 512, queue_per_requester: 64 }
    }
}

/// The queue is full: try again after `retry_after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the upstream budget's queue is full; retry after {retry_after:?}")]
pub struct Overloaded {
    pub retry_after: Duration,
}

#[derive(Default)]
struct State {
    /// Waiting calls per requester, and the order requesters are served in.
    waiting: HashMap<String, VecDeque<oneshot::Sender<Permit>>>,
    turn: VecDeque<String>,
    queued: usize,
    in_flight: usize,
    /// Of those, calls made with idle capacity ([`Budget::try_acquire_idle`]).
    idle_in_flight: usize,
    /// When the calls of the current window started.
    starts: VecDeque<Instant>,
}

/// The budget; clone the `Arc` to share it.
pub struct Budget {
    config: BudgetConfig,
    state: Mutex<State>,
    /// Wakes the dispatcher: a call queued, a slot freed, the budget gone.
    wake: Arc<Notify>,
}

impl Drop for Budget {
    fn drop(&mut self) {
        self.wake.notify_one(); // the dispatcher finds the budget gone and ends
    }
}

/// A slot for one upstream call; the slot frees when it is dropped.
pub struct Permit {
    budget: Arc<Budget>,
    /// Taken with idle capacity.
    idle: bool,
}

impl Drop for Permit {
    fn drop(&mut self) {
        {
            let mut s = self.budget.lock();
            s.in_flight -= 1;
            if self.idle {
                s.idle_in_flight -= 1;
            }
        }
        self.budget.wake.notify_one();
    }
}

impl Budget {
    /// A budget, and the task that hands out its slots for as long as the budget lives.
    ///
    /// # Panics
    /// If `per_second` or `in_flight` is zero: nothing would ever be called (the CLI
    /// refuses zero).
    pub fn start(config: BudgetConfig) -> Arc<Budget> {
        assert!(config.per_second > 0 && config.in_flight > 0, "an upstream budget of zero would never call");
        let wake = Arc::new(Notify::new());
        let budget = Arc::new(Budget { config, state: Mutex::default(), wake: Arc::clone(&wake) });
        tokio::spawn(dispatch(Arc::downgrade(&budget), wake));
        budget
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, State> {
        self.state.lock()
    }

    /// Waits for a slot for `requester`'s call, at most [`MAX_WAIT`]. Refused at once when
    /// the queue is full.
    pub async fn acquire(self: &Arc<Self>, requester: &str) -> Result<Permit, Overloaded> {
        let rx = {
            let mut s = self.lock();
            let full = |s: &State| {
                s.queued >= self.config.queue
                    || s.waiting.get(requester).map_or(0, VecDeque::len) >= self.config.queue_per_requester
            };
            if full(&s) {
                forget_gone(&mut s); // calls whose callers gave up hold no place
            }
            if full(&s) {
                return Err(Overloaded { retry_after: self.drain_time(s.queued) });
            }
            let (tx, rx) = oneshot::channel();
            let queue = s.waiting.entry(requester.to_owned()).or_default();
            queue.push_back(tx);
            if queue.len() == 1 {
                s.turn.push_back(requester.to_owned());
            }
            s.queued += 1;
            rx
        };
        self.wake.notify_one();
        match tokio::time::timeout(MAX_WAIT, rx).await {
            Ok(Ok(permit)) => Ok(permit),
            // The dispatcher never drops a sender without sending, while the budget lives.
            Ok(Err(_)) => Err(Overloaded { retry_after: Duration::from_secs(1) }),
            // Dropping the receiver gives the place up: the dispatcher skips it.
            Err(_) => Err(Overloaded { retry_after: self.drain_time(self.lock().queued) }),
        }
    }

    /// A slot at once if the budget is idle, else `None` (never waits): nothing queued, no
    /// other idle call in flight, a slot in flight still free for the pods once this one is
    /// taken, and under a quarter of the rate used in the current window. For work no pod is waiting for (warming the cache):
    /// it takes one slot at most, and leaves three quarters of the rate to the pods.
    pub fn try_acquire_idle(self: &Arc<Self>) -> Option<Permit> {
        let mut s = self.lock();
        let now = Instant::now();
        while s.starts.front().is_some_and(|t| now.duration_since(*t) >= WINDOW) {
            s.starts.pop_front();
        }
        let idle = s.queued == 0
            && s.idle_in_flight == 0
            && s.in_flight + 1 < self.config.in_flight
            && s.starts.len() < self.config.per_second / 4;
        if !idle {
            return None;
        }
        s.in_flight += 1;
        s.idle_in_flight += 1;
        s.starts.push_back(now);
        Some(Permit { budget: Arc::clone(self), idle: true })
    }

    /// Roughly how long a queue of `queued` takes to drain: what `Retry-After` says.
    fn drain_time(&self, queued: usize) -> Duration {
        Duration::from_secs((queued / self.config.per_second) as u64 + 1)
    }

    /// Calls waiting and calls in flight, for metrics.
    pub fn load(&self) -> (usize, usize) {
        let s = self.lock();
        (s.queued, s.in_flight)
    }

    /// Hands out as many slots as the limits allow; returns when the next one could go out
    /// (`None`: wait to be woken).
    fn grant(self: &Arc<Self>) -> Option<Instant> {
        let mut s = self.lock();
        loop {
            let now = Instant::now();
            while s.starts.front().is_some_and(|t| now.duration_since(*t) >= WINDOW) {
                s.starts.pop_front();
            }
            if s.queued == 0 || s.in_flight >= self.config.in_flight {
                return None;
            }
            if s.starts.len() >= self.config.per_second {
                return s.starts.front().map(|t| *t + WINDOW);
            }
            let requester = s.turn.pop_front().expect("queued calls have a requester in turn");
            let queue = s.waiting.get_mut(&requester).expect("a requester in turn has a queue");
            let tx = queue.pop_front().expect("a requester in turn has a waiting call");
            if queue.is_empty() {
                s.waiting.remove(&requester);
            } else {
                s.turn.push_back(requester);
            }
            s.queued -= 1;
            if tx.is_closed() {
                continue; // its caller gave up: no slot used
            }
            s.in_flight += 1;
            s.starts.push_back(now);
            if let Err(permit) = tx.send(Permit { budget: Arc::clone(self), idle: false }) {
                // Gave up just now. Dropping the permit takes the lock: do it outside.
                drop(s);
                drop(permit);
                s = self.lock();
            }
        }
    }
}

/// Drops the waiting calls whose callers gave up (timed out, or their connection went).
fn forget_gone(s: &mut State) {
    let mut queued = 0;
    s.waiting.retain(|_, calls| {
        calls.retain(|tx| !tx.is_closed());
        queued += calls.len();
        !calls.is_empty()
    });
    let waiting = &s.waiting;
    s.turn.retain(|requester| waiting.contains_key(requester));
    s.queued = queued;
}

/// Hands out slots whenever something changes or the rate window moves on. Holds the budget
/// only while granting, so that dropping the budget ends it. (A wake-up sent while it grants
/// is not lost: `Notify` keeps it for the next wait.)
async fn dispatch(budget: std::sync::Weak<Budget>, wake: Arc<Notify>) {
    loop {
        let Some(next) = budget.upgrade().map(|b| b.grant()) else { return };
        let woken = wake.notified();
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = woken => {}
                }
            }
            None => woken.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Runs `calls` (requester, hold time) through a budget; returns start times (relative)
    /// per requester and the largest concurrency seen.
    async fn run(config: BudgetConfig, calls: Vec<(&'static str, Duration)>) -> (Vec<(&'static str, Duration)>, usize) {
        let budget = Budget::start(config);
        let t0 = Instant::now();
        let (current, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks: Vec<_> = calls
            .into_iter()
            .map(|(who, hold)| {
                let (budget, current, peak) = (Arc::clone(&budget), Arc::clone(&current), Arc::clone(&peak));
                tokio::spawn(async move {
                    let _permit = budget.acquire(who).await.expect("queued");
                    let started = t0.elapsed();
                    let now = current.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(hold).await;
                    current.fetch_sub(1, Ordering::SeqCst);
                    (who, started)
                })
            })
            .collect();
        let mut starts = Vec::new();
        for t in tasks {
            starts.push(t.await.unwrap());
        }
        starts.sort_by_key(|(_, at)| *at);
        (starts, peak.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_rate_in_any_window_nor_the_concurrency() {
        let calls = vec![("pod", Duration::from_millis(10)); 100];
        let (starts, peak) = run(BudgetConfig { queue_per_requester: 100, ..BudgetConfig::default() }, calls).await;
        assert!(peak <= 5, "peak {peak}");
        for (i, (_, at)) in starts.iter().enumerate() {
            let in_window =
                starts[i..].iter().take_while(|(_, t)| t.saturating_sub(*at) < Duration::from_secs(1)).count();
            assert!(in_window <= 20, "{in_window} calls within a second of {at:?}");
        }
        // 100 calls at 20 per 1.25 s: about 5 s, not much more.
        let last = starts.last().unwrap().1;
        assert!(last >= Duration::from_secs(5) && last < Duration::from_millis(6500), "{last:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_waits_at_most_max_wait_then_is_told_to_retry() {
        let budget = Budget::start(BudgetConfig { per_second: 1, in_flight: 1, queue: 2, queue_per_requester: 2 });
        let held = budget.acquire("a").await.expect("a free slot");
        let t0 = Instant::now();
        let refused = budget.acquire("b").await.err().expect("no slot within MAX_WAIT");
        assert!(t0.elapsed() >= MAX_WAIT && t0.elapsed() < MAX_WAIT + Duration::from_secs(1), "{:?}", t0.elapsed());
        assert!(refused.retry_after >= Duration::from_secs(1));
        // Callers that gave up hold no place: the queue of 2 takes two more.
        let b = Arc::clone(&budget);
        let waiting = tokio::spawn(async move { b.acquire("b").await.is_ok() });
        tokio::task::yield_now().await;
        let c = Arc::clone(&budget);
        let also = tokio::spawn(async move { c.acquire("c").await.is_ok() });
        tokio::task::yield_now().await;
        assert_eq!(budget.load().0, 2, "the one that gave up was forgotten, not counted");
        drop(held);
        assert!(waiting.await.unwrap() || also.await.unwrap(), "a freed slot goes to a live waiter");
    }

    #[tokio::test(start_paused = true)]
    async fn slow_calls_are_bounded_by_concurrency() {
        let calls = vec![("pod", Duration::from_secs(2)); 10];
        let (starts, peak) = run(BudgetConfig::default(), calls).await;
        assert_eq!(peak, 5);
        assert!(starts[5].1 >= Duration::from_secs(2), "the sixth waits for a slot: {starts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_noisy_requester_does_not_starve_a_quiet_one() {
        // 30 calls at 5 a second all start within MAX_WAIT (the last after 7.5 s).
        let mut calls = vec![("noisy", Duration::from_millis(10)); 30];
        calls.push(("quiet", Duration::from_millis(10)));
        let config = BudgetConfig { per_second: 5, ..BudgetConfig::default() };
        let (starts, _) = run(config, calls).await;
        let quiet = starts.iter().position(|(who, _)| *who == "quiet").unwrap();
        // The first few noisy calls may be granted before the quiet one is even queued;
        // after that it is the next turn.
        assert!(quiet <= 6, "the quiet pod's one call goes within the first turns, not after 30: {quiet}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_capacity_only_is_handed_out_without_waiting() {
        let budget = Budget::start(BudgetConfig { per_second: 8, in_flight: 3, ..BudgetConfig::default() });
        // Idle: one slot, never a second idle call at once.
        let first = budget.try_acquire_idle().expect("an idle budget");
        assert!(budget.try_acquire_idle().is_none(), "one idle call at a time");
        drop(first);
        // A quarter of the rate used in the window: no more.
        let second = budget.try_acquire_idle().expect("a slot is free again");
        drop(second);
        assert!(budget.try_acquire_idle().is_none(), "two of eight calls this window");
        tokio::time::sleep(WINDOW).await;
        // The last slot in flight is the pods'.
        let pods = (budget.acquire("pod").await.expect("a slot"), budget.acquire("pod").await.expect("a slot"));
        assert!(budget.try_acquire_idle().is_none(), "one slot left: the pods'");
        // A pod's call waiting: none.
        let third = budget.acquire("pod").await.expect("a slot");
        let waiting = tokio::spawn({
            let budget = Arc::clone(&budget);
            async move { budget.acquire("pod").await.map(drop) }
        });
        tokio::task::yield_now().await;
        assert_eq!(budget.load().0, 1, "a pod's call is queued");
        drop(pods);
        assert!(budget.try_acquire_idle().is_none(), "a pod's call is waiting");
        drop(third);
        waiting.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_refuses_with_a_retry_after() {
        let config = BudgetConfig { per_second: 1, in_flight: 1, queue: 3, queue_per_requester: 2 };
        let budget = Budget::start(config);
        let held = budget.acquire("a").await.unwrap();
        let waiting: Vec<_> = ["a", "a", "b"]
            .into_iter()
            .map(|who| {
                let budget = Arc::clone(&budget);
                tokio::spawn(async move { budget.acquire(who).await.map(drop) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(budget.load(), (3, 1));
        assert!(budget.acquire("c").await.is_err(), "the queue is full");
        drop(held);
        for w in waiting {
            assert!(w.await.unwrap().is_ok());
        }
        // A requester's own cap: two waiting are all one pod gets.
        let held = budget.acquire("a").await.unwrap();
        let _w: Vec<_> = (0..2)
            .map(|_| {
                let budget = Arc::clone(&budget);
                tokio::spawn(async move { budget.acquire("a").await.map(drop) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let refused = budget.acquire("a").await.err().expect("over its own cap");
        assert!(refused.retry_after >= Duration::from_secs(1));
        drop(held);
        let other = tokio::time::timeout(Duration::from_secs(10), budget.acquire("b")).await;
        assert!(other.is_ok_and(|p| p.is_ok()), "others still get in");
    }
}
