//! The kernel's decision rules as pure functions. The programs call them with their map
//! lookups and helpers passed in; the host tests them here, table by table.
use crate::{Config, MAX_CGROUP_DEPTH, VERDICT_PASS, VERDICT_REDIRECT};

/// What a connect to a judged destination gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectVerdict {
    /// Let through untouched (an exception, or the agent).
    Pass,
    /// Rewritten to the agent.
    Redirect,
    /// Refused with `EPERM`.
    Deny,
}

/// Verdict of the cgroup `leaf`: the entry of the deepest cgroup on its path from the root
/// that has one (so a pod's entry covers all its containers), else the configured default
/// (none configured yet: REDIRECT, which fails closed). The agent's own cgroups always pass.
/// `ancestor(level)` is the id of `leaf`'s ancestor at `level` (0 past the leaf's own level),
/// `entry(id)` a cgroup's verdict entry.
#[inline(always)]
#[expect(clippy::inline_always, reason = "called from BPF programs, where calls cost verifier complexity")]
pub fn cgroup_verdict(
    cfg: &Config,
    leaf: u64,
    ancestor: impl Fn(i32) -> u64,
    entry: impl Fn(u64) -> Option<u32>,
) -> u32 {
    if cfg.is_agent(leaf) {
        return VERDICT_PASS;
    }
    let mut verdict = match cfg.default_verdict {
        0 => VERDICT_REDIRECT, // not configured yet: fail closed
        v => v,
    };
    let mut level = 0;
    while level < MAX_CGROUP_DEPTH {
        let id = ancestor(level);
        if id == 0 {
            break;
        }
        if let Some(v) = entry(id) {
            verdict = v;
        }
        if id == leaf {
            break;
        }
        level += 1;
    }
    verdict
}

/// What a connect gets from a cgroup with `verdict`: `redirectable` when it is TCP to a
/// protected port (UDP, or another port of a protected address, cannot be served by the
/// agent), `refuse_redirects` while something else holds the agent's port. A value no
/// version writes is refused.
#[inline(always)]
#[expect(clippy::inline_always, reason = "called from BPF programs, where calls cost verifier complexity")]
#[must_use]
pub fn connect_verdict(verdict: u32, redirectable: bool, refuse_redirects: u16) -> ConnectVerdict {
    match verdict {
        VERDICT_PASS => ConnectVerdict::Pass,
        VERDICT_REDIRECT if redirectable && refuse_redirects == 0 => ConnectVerdict::Redirect,
        _ => ConnectVerdict::Deny,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Verdict, VERDICT_DENY};

    const ROOT: u64 = 1;
    const POD: u64 = 10;
    const CONTAINER: u64 = 11;
    const AGENT: u64 = 20;

    /// A container at level 2 (root, pod, container), the agent beside it.
    fn ancestor(leaf: u64) -> impl Fn(i32) -> u64 {
        move |level| match (leaf, level) {
            (_, 0) => ROOT,
            (CONTAINER, 1) => POD,
            (CONTAINER, 2) => CONTAINER,
            (AGENT, 1) => AGENT,
            _ => 0,
        }
    }

    fn config(default: u32) -> Config {
        Config { default_verdict: default, ..Config::default() }.with_agent(AGENT)
    }

    #[test]
    fn the_deepest_entry_wins_else_the_default_and_unconfigured_fails_closed() {
        let none = |_: u64| None;
        let pod_pass = |id: u64| (id == POD).then_some(VERDICT_PASS);
        let root_deny_pod_pass = |id: u64| match id {
            ROOT => Some(VERDICT_DENY),
            POD => Some(VERDICT_PASS),
            _ => None,
        };
        let container_deny_pod_pass = |id: u64| match id {
            POD => Some(VERDICT_PASS),
            CONTAINER => Some(VERDICT_DENY),
            _ => None,
        };
        let cfg = config(VERDICT_DENY);
        assert_eq!(cgroup_verdict(&config(0), CONTAINER, ancestor(CONTAINER), none), VERDICT_REDIRECT);
        assert_eq!(cgroup_verdict(&cfg, CONTAINER, ancestor(CONTAINER), none), VERDICT_DENY);
        assert_eq!(cgroup_verdict(&cfg, CONTAINER, ancestor(CONTAINER), pod_pass), VERDICT_PASS);
        assert_eq!(cgroup_verdict(&cfg, CONTAINER, ancestor(CONTAINER), root_deny_pod_pass), VERDICT_PASS);
        assert_eq!(cgroup_verdict(&cfg, CONTAINER, ancestor(CONTAINER), container_deny_pod_pass), VERDICT_DENY);
    }

    #[test]
    fn the_agents_cgroups_pass_whatever_the_map_says() {
        let all_deny = |_: u64| Some(VERDICT_DENY);
        assert_eq!(cgroup_verdict(&config(VERDICT_DENY), AGENT, ancestor(AGENT), all_deny), VERDICT_PASS);
        // Cgroup 0 (no cgroup) is never the agent, even with no agent configured.
        assert_eq!(cgroup_verdict(&Config::default(), 0, |_| 0, |_| None), VERDICT_REDIRECT);
    }

    #[test]
    fn a_walk_deeper_than_the_limit_stops_at_it() {
        let deep = |level: i32| 100 + u64::try_from(level).unwrap_or(0); // never reaches the leaf
        let deepest_pass = |id: u64| (id == 100 + u64::try_from(MAX_CGROUP_DEPTH).unwrap_or(0)).then_some(VERDICT_PASS);
        assert_eq!(cgroup_verdict(&config(VERDICT_DENY), 999, deep, deepest_pass), VERDICT_DENY);
    }

    #[test]
    fn connects_are_redirected_only_when_they_can_be_and_unknown_values_deny() {
        use ConnectVerdict::{Deny, Pass, Redirect};
        let redirect = Verdict::Redirect as u32;
        // (verdict, redirectable, refuse_redirects, expected)
        let table = [
            (VERDICT_PASS, false, 1, Pass),
            (redirect, true, 0, Redirect),
            (redirect, false, 0, Deny), // UDP, or another port of a whole protected address
            (redirect, true, 1, Deny),  // something else holds the agent's port
            (VERDICT_DENY, true, 0, Deny),
            (0, true, 0, Deny),
            (7, true, 0, Deny),
        ];
        for (verdict, redirectable, refuse, want) in table {
            assert_eq!(connect_verdict(verdict, redirectable, refuse), want, "{verdict} {redirectable} {refuse}");
        }
    }
}
