//! The node-wide token cache: a plain data structure, told the time by its caller.
//!
//! - An entry is served while it has more than `min_remaining` of its life left; from its
//!   refresh point on (half its life, jittered) it is still served but the caller should
//!   refresh it in the background — so tokens in use are renewed before they expire, and
//!   tokens that were all fetched together are not all renewed together.
//! - Past `min_remaining` the caller must fetch; if that fails, the old token is still
//!   good until it expires ([`Lookup::Expiring`]).
//! - Entries unused for `idle` are swept; an entry a scheduled workload uses can be kept
//!   longer ([`Cache::keep_idle`]), so that it is still there at the workload's next run. At `max_entries`, room is made fairly: each entry
//!   is charged to the pod whose request fetched it, and the pod charged with the most (the
//!   pod inserting, if it is one of those) gives up its least recently used one. A pod asking for thousands of resources evicts its own
//!   tokens, not everyone else's (using others' tokens, or sharing its own, changes nothing).
use std::{collections::HashMap, hash::Hash, sync::Arc, time::Duration};

use super::token::Token;

#[derive(Clone, Copy, Debug)]
pub struct CacheConfig {
    pub max_entries: usize,
    /// Never hand out a token with less life than this (capped at a tenth of its lifetime):
    /// SDKs refresh tokens that close to expiry and would ask again at once.
    pub min_remaining: Duration,
    /// Fraction of the lifetime after which an entry in use is refreshed.
    pub refresh_at: f64,
    /// ± this fraction of the lifetime, at random, on the refresh point.
    pub jitter: f64,
    /// Entries unused this long are dropped.
    pub idle: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_entries: 4096,
            min_remaining: Duration::from_mins(5),
            refresh_at: 0.5,
            jitter: 0.1,
            idle: Duration::from_hours(1),
        }
    }
}

/// What the cache has for a key.
#[derive(Clone, Debug, PartialEq)]
pub enum Lookup {
    /// Serve it.
    Fresh(Arc<Token>),
    /// Serve it, and refresh it in the background.
    RefreshAhead(Arc<Token>),
    /// Fetch a new one; serve this one only if the fetch fails (it has not expired yet).
    Expiring(Arc<Token>),
    Miss,
}

#[derive(Debug)]
struct Entry {
    token: Arc<Token>,
    refresh_at: u64,
    last_used: u64,
    /// Kept this long unused (seconds), when longer than the cache's `idle`.
    idle: Option<u64>,
    /// The pod whose request fetched it first.
    owner: Arc<str>,
}

#[derive(Debug)]
pub struct Cache<K> {
    entries: HashMap<K, Entry>,
    /// Entries charged to each pod.
    own: HashMap<Arc<str>, usize>,
    config: CacheConfig,
}

/// Counts `entry` out of its owner's entries.
fn disown(own: &mut HashMap<Arc<str>, usize>, entry: &Entry) {
    if let Some(n) = own.get_mut(&entry.owner) {
        *n -= 1;
        if *n == 0 {
            own.remove(&entry.owner);
        }
    }
}

impl<K: Hash + Eq + Clone> Cache<K> {
    pub fn new(config: CacheConfig) -> Cache<K> {
        Cache { entries: HashMap::new(), own: HashMap::new(), config }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Looks `key` up at `now` (Unix seconds), marking it used.
    pub fn lookup(&mut self, key: &K, now: u64) -> Lookup {
        self.look(key, now, true)
    }

    /// What [`Cache::lookup`] would say, without marking the entry used.
    pub fn peek(&mut self, key: &K, now: u64) -> Lookup {
        self.look(key, now, false)
    }

    fn look(&mut self, key: &K, now: u64, using: bool) -> Lookup {
        let floor = self.min_remaining_for(key);
        let Some(entry) = self.entries.get_mut(key) else { return Lookup::Miss };
        let token = Arc::clone(&entry.token);
        let remaining = token.remaining(now);
        if remaining.is_zero() {
            self.remove(key);
            return Lookup::Miss;
        }
        if using {
            entry.last_used = now;
        }
        if remaining <= floor.unwrap_or_default() {
            Lookup::Expiring(token)
        } else if now >= entry.refresh_at {
            Lookup::RefreshAhead(token)
        } else {
            Lookup::Fresh(token)
        }
    }

    fn min_remaining_for(&self, key: &K) -> Option<Duration> {
        let lifetime = self.entries.get(key)?.token.lifetime();
        Some(self.config.min_remaining.min(lifetime / 10))
    }

    /// Stores a token fetched for `key` on behalf of pod `owner`. `jitter` is a random
    /// sample in [-1, 1].
    pub fn insert(&mut self, key: K, token: Token, now: u64, jitter: f64, owner: &str) {
        // A renewal stays charged to whoever fetched the token first, and kept as long.
        let old = self.entries.get(&key);
        let idle = old.and_then(|old| old.idle);
        let owner = old.map_or_else(|| Arc::from(owner), |old| Arc::clone(&old.owner));
        self.remove(&key);
        if self.entries.len() >= self.config.max_entries {
            self.make_room(&owner);
        }
        let lifetime = token.lifetime().as_secs_f64();
        let fraction = (self.config.refresh_at + self.config.jitter * jitter.clamp(-1.0, 1.0)).clamp(0.05, 0.95);
        let refresh_at = token.obtained_at + (lifetime * fraction) as u64;
        *self.own.entry(Arc::clone(&owner)).or_default() += 1;
        self.entries.insert(key, Entry { token: Arc::new(token), refresh_at, last_used: now, idle, owner });
    }

    /// Keeps `key`'s entry `idle` unused before it is swept, from now on (never less than
    /// the cache's own `idle`).
    pub fn keep_idle(&mut self, key: &K, idle: Duration) {
        let idle = idle.as_secs();
        if let Some(entry) = self.entries.get_mut(key) {
            entry.idle = Some(idle).filter(|idle| *idle > self.config.idle.as_secs());
        }
    }

    /// Drops a key's entry (a fetch found the identity gone, say).
    pub fn remove(&mut self, key: &K) {
        if let Some(entry) = self.entries.remove(key) {
            disown(&mut self.own, &entry);
        }
    }

    /// Drops expired entries and those unused for `idle`. Returns how many went.
    pub fn sweep(&mut self, now: u64) -> usize {
        let before = self.entries.len();
        let idle = self.config.idle.as_secs();
        let own = &mut self.own;
        self.entries.retain(|_, e| {
            let keep = !e.token.remaining(now).is_zero() && now.saturating_sub(e.last_used) < e.idle.unwrap_or(idle);
            if !keep {
                disown(own, e);
            }
            keep
        });
        before - self.entries.len()
    }

    /// Evicts one entry for pod `inserting`: the least recently used of those charged to the
    /// pod charged with the most, `inserting` itself when it is one of those.
    fn make_room(&mut self, inserting: &Arc<str>) {
        let most = self.own.values().copied().max().unwrap_or(0);
        let greediest = if self.own.get(inserting).is_some_and(|n| *n >= most) {
            Arc::clone(inserting)
        } else {
            match self.own.iter().find(|(_, n)| **n == most) {
                Some((owner, _)) => Arc::clone(owner),
                None => return,
            }
        };
        let victim = self
            .entries
            .iter()
            .filter(|(_, e)| e.owner == greediest)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(k, _)| k.clone());
        if let Some(key) = victim {
            self.remove(&key);
        }
    }

    /// Bytes held by tokens, roughly.
    pub fn bytes(&self) -> usize {
        self.entries.values().map(|e| e.token.size()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_000_000;

    fn token(lifetime: u64) -> Token {
        Token::from_parts("at", "Bearer", lifetime, "c", "r", T0)
    }

    fn kind(l: &Lookup) -> &'static str {
        match l {
            Lookup::Fresh(_) => "fresh",
            Lookup::RefreshAhead(_) => "refresh-ahead",
            Lookup::Expiring(_) => "expiring",
            Lookup::Miss => "miss",
        }
    }

    #[test]
    fn an_entry_lives_fresh_then_refresh_ahead_then_expiring_then_gone() {
        let mut c = Cache::new(CacheConfig::default());
        c.insert("k", token(86_400), T0, 0.0, "pod");
        // (seconds after T0, expected)
        let table = [
            (0, "fresh"),
            (43_199, "fresh"),
            (43_200, "refresh-ahead"), // half its life
            (86_400 - 301, "refresh-ahead"),
            (86_400 - 300, "expiring"), // 5 min left
            (86_399, "expiring"),
            (86_400, "miss"),
        ];
        for (at, want) in table {
            assert_eq!(kind(&c.lookup(&"k", T0 + at)), want, "at +{at}s");
        }
        assert!(c.is_empty(), "an expired entry is dropped");
    }

    #[test]
    fn short_lived_tokens_keep_a_tenth_of_their_life_in_reserve() {
        let mut c = Cache::new(CacheConfig::default());
        c.insert("k", token(600), T0, 0.0, "pod");
        assert_eq!(kind(&c.lookup(&"k", T0 + 539)), "refresh-ahead");
        assert_eq!(kind(&c.lookup(&"k", T0 + 540)), "expiring");
    }

    #[test]
    fn jitter_moves_the_refresh_point_within_bounds() {
        let mut c = Cache::new(CacheConfig::default());
        c.insert("early", token(1000), T0, -1.0, "pod");
        c.insert("late", token(1000), T0, 1.0, "pod");
        assert_eq!(kind(&c.lookup(&"early", T0 + 400)), "refresh-ahead");
        assert_eq!(kind(&c.lookup(&"late", T0 + 599)), "fresh");
        assert_eq!(kind(&c.lookup(&"late", T0 + 600)), "refresh-ahead");
    }

    #[test]
    fn idle_entries_are_swept_and_the_least_recently_used_makes_room() {
        let mut c = Cache::new(CacheConfig { max_entries: 2, ..CacheConfig::default() });
        c.insert("a", token(86_400), T0, 0.0, "pod");
        c.insert("b", token(86_400), T0 + 1, 0.0, "pod");
        let _ = c.lookup(&"a", T0 + 2); // b is now the least recently used
        c.insert("c", token(86_400), T0 + 3, 0.0, "pod");
        assert_eq!((kind(&c.lookup(&"a", T0 + 4)), kind(&c.lookup(&"b", T0 + 4))), ("fresh", "miss"));
        assert_eq!(c.len(), 2);
        let _ = c.lookup(&"c", T0 + 3_000);
        assert_eq!(c.sweep(T0 + 4 + 3_599), 0);
        assert_eq!(c.sweep(T0 + 4 + 3_600), 1, "a was idle for an hour");
        assert_eq!(kind(&c.lookup(&"c", T0 + 4 + 3_600)), "fresh");
    }

    #[test]
    fn an_entry_a_scheduled_workload_uses_is_kept_until_its_next_run() {
        let mut c = Cache::new(CacheConfig::default());
        c.insert("cron", token(86_400), T0, 0.0, "pod");
        c.insert("other", token(86_400), T0, 0.0, "pod");
        c.keep_idle(&"cron", Duration::from_hours(3));
        c.keep_idle(&"other", Duration::from_mins(10)); // never less than the cache's hour
                                                        // A peek (a prefetch deciding) does not count as use.
        assert_eq!(kind(&c.peek(&"cron", T0 + 3_000)), "fresh");
        assert_eq!(c.sweep(T0 + 3_600), 1, "the other entry went after an hour");
        assert_eq!(c.sweep(T0 + 3 * 3_600 - 1), 0);
        // A renewal keeps it as long.
        c.insert("cron", token(86_400), T0 + 2 * 3_600, 0.0, "pod");
        assert_eq!(c.sweep(T0 + 5 * 3_600 - 1), 0);
        assert_eq!(c.sweep(T0 + 5 * 3_600), 1, "three hours unused");
    }

    #[test]
    fn a_pod_asking_for_many_resources_evicts_its_own_tokens_not_others() {
        let mut c = Cache::new(CacheConfig { max_entries: 4, ..CacheConfig::default() });
        c.insert("web", token(86_400), T0, 0.0, "web");
        c.insert("api", token(86_400), T0, 0.0, "api");
        for (i, key) in ["f1", "f2", "f3", "f4", "f5", "f6"].into_iter().enumerate() {
            let now = T0 + 2 + i as u64;
            c.insert(key, token(86_400), now, 0.0, if i % 2 == 0 { "flood-a" } else { "flood-b" });
            // Flooding pods using each other's tokens, and the others': no matter.
            let _ = (c.lookup(&key, now), c.lookup(&"web", now));
        }
        // The flooding pods' oldest went each time; web's and api's, older than all, stayed.
        for (key, want) in [("web", "fresh"), ("api", "fresh"), ("f6", "fresh"), ("f5", "fresh"), ("f4", "miss")] {
            assert_eq!(kind(&c.lookup(&key, T0 + 10)), want, "{key}");
        }
        assert_eq!(c.len(), 4);
        assert_eq!(c.own.values().sum::<usize>(), 4, "counts follow the entries: {:?}", c.own);
        // A renewal stays charged to the first fetcher.
        c.insert("web", token(86_400), T0 + 11, 0.0, "flood-a");
        assert_eq!(c.own.get("web"), Some(&1));
    }

    #[test]
    fn ownership_is_forgotten_with_the_entry() {
        let mut c = Cache::new(CacheConfig { max_entries: 8, ..CacheConfig::default() });
        c.insert("a", token(100), T0, 0.0, "p");
        c.insert("b", token(86_400), T0, 0.0, "p");
        c.insert("b", token(86_400), T0 + 1, 0.0, "q"); // a renewal, asked by another pod
        assert_eq!(c.own.get("p"), Some(&2));
        c.remove(&"b");
        assert_eq!(c.own.get("p"), Some(&1));
        assert_eq!(c.sweep(T0 + 100), 1);
        assert!(c.own.is_empty() && c.is_empty());
    }
}
