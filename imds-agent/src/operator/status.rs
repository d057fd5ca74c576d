//! `imds-agent status`: is this node protected right now?
//!
//! Two sources, either of which may be missing: the pinned kernel state (read with
//! [`crate::kernel::inspect`], whether or not an agent runs) and the running agent's own
//! account of itself (`/status` on its [`crate::operator::control`] socket). [`assess`] turns them into one
//! answer; it is pure, so every combination is table-tested below.
use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};

use anyhow::Context as _;

use crate::{
    caller::CgroupResolver,
    kernel::{self, backstop::BackstopState, cgroup, inspect::PinnedState, AttachedProgram, Hook},
    operator::control::client::Client,
};

/// What the running agent says about itself (`GET /status` on the control socket).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub version: String,
    /// `enforce` or `audit`.
    pub mode: String,
    /// `manifests DIR` or `kube`.
    pub source: String,
    /// Where it serves redirected connections.
    pub listen: String,
    /// `None` when healthy, else why not (a hook without our program, say).
    pub unhealthy: Option<String>,
    pub ready: bool,
    /// `/readyz`'s sentence.
    pub readiness: String,
    pub source_synced: bool,
    /// The latest reload's error while the previous policy stays in force (fail-static).
    pub source_failing: Option<String>,
    pub last_sync_unix: u64,
    /// Objects in the policy in force, by kind (`pods`, `identities`, `bindings`, `exceptions`).
    pub policy: BTreeMap<String, usize>,
    pub connections_open: i64,
    /// Pods on this node that neither layer of the filter contains, with why (SECURITY.md).
    #[serde(default)]
    pub uncontained_pods: Vec<UncontainedPod>,
}

/// A pod whose powers reach past the filter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UncontainedPod {
    /// `namespace/name`.
    pub pod: String,
    pub why: Vec<String>,
}

/// The one-word answer, and the exit code that goes with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protection {
    /// Filter attached and the agent serving: exit 0.
    Protected,
    /// Filter attached, no agent serving: pods' metadata connections are refused. Exit 1.
    FailClosed,
    /// Nothing (or not enough) attached: pods reach the metadata service unfiltered. Exit 2.
    Unprotected,
}

impl Protection {
    #[must_use]
    pub const fn exit_code(self) -> i32 {
        match self {
            Protection::Protected => 0,
            Protection::FailClosed => 1,
            Protection::Unprotected => 2,
        }
    }
}

/// One hook as pinned and as the kernel lists the attach cgroup's programs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HookStatus {
    pub hook: String,
    pub program: &'static str,
    /// Ids from the pinned link (absent: no pin).
    pub link_id: Option<u32>,
    pub prog_id: Option<u32>,
    /// Programs the kernel lists on the attach cgroup for this hook.
    pub attached: Vec<u32>,
    /// Exactly one program there, and it is the pinned link's.
    pub ok: bool,
}

/// What `imds-agent status` reports (`--output json` prints exactly this).
#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    pub protection: Protection,
    pub summary: String,
    /// Everything found wrong, each with what to do.
    pub problems: Vec<String>,
    pub pin_dir: String,
    pub attach_cgroup_id: Option<u64>,
    pub attach_cgroup: Option<String>,
    pub hooks: Vec<HookStatus>,
    pub protected_endpoints: Vec<String>,
    /// Addresses protected on every port and protocol besides.
    pub protected_addresses: Vec<String>,
    pub default_verdict: Option<String>,
    /// Where the kernel sends redirected connections.
    pub redirect_to: Option<String>,
    /// Verdict entries by verdict (`pass`, `deny`, `redirect`, `unknown`).
    pub verdict_entries: BTreeMap<String, usize>,
    pub counters: BTreeMap<String, u64>,
    /// Map name → (entries, capacity).
    pub maps: BTreeMap<String, (usize, u32)>,
    /// The node backstop in the node's network namespace (`None`: it could not be read).
    pub node_backstop: Option<BackstopState>,
    /// The control socket asked for the agent's status.
    pub agent_asked: Option<String>,
    pub agent: Option<AgentStatus>,
    /// Why the agent gave no status.
    pub agent_error: Option<String>,
}

/// The hooks without which a pod could reach the metadata service unfiltered or unattributed,
/// or take the agent's port.
const REQUIRED: [Hook; 6] = [Hook::SockOps, Hook::Connect4, Hook::Connect6, Hook::Egress, Hook::Bind4, Hook::Bind6];

/// Everything the status is made from.
pub struct Inputs<'a> {
    pub pin_dir: &'a str,
    pub state: &'a PinnedState,
    /// The attach cgroup's path, if it could be found from its id.
    pub attach_cgroup: Option<String>,
    /// The kernel's list of programs on the attach cgroup (or why it could not be read).
    pub attached: Result<Vec<(Hook, Vec<AttachedProgram>)>, String>,
    /// The node backstop as the kernel holds it (or why it could not be read).
    pub backstop: Result<BackstopState, String>,
    pub agent_asked: Option<String>,
    pub agent: Result<AgentStatus, String>,
}

/// Each hook as pinned and as the kernel lists the attach cgroup's programs.
fn hook_statuses(state: &PinnedState, attached: &[(Hook, Vec<AttachedProgram>)]) -> Vec<HookStatus> {
    Hook::ALL
        .iter()
        .map(|hook| {
            let link = state.links.iter().find(|l| l.hook == *hook);
            let on_cgroup: Vec<u32> = attached
                .iter()
                .find(|(h, _)| h == hook)
                .map(|(_, p)| p.iter().map(|p| p.id).collect())
                .unwrap_or_default();
            let ok = link.is_some_and(|l| l.cgroup_id != 0 && on_cgroup == [l.prog_id]);
            HookStatus {
                hook: format!("{hook:?}"),
                program: hook.program(),
                link_id: link.map(|l| l.link_id),
                prog_id: link.map(|l| l.prog_id),
                attached: on_cgroup,
                ok,
            }
        })
        .collect()
}

/// Judges the node.
#[must_use]
pub fn assess(inputs: Inputs<'_>) -> NodeStatus {
    let Inputs { pin_dir, state, attach_cgroup, attached, backstop, agent_asked, agent } = inputs;
    let mut problems = Vec::new();
    let attached = attached.unwrap_or_else(|e| {
        if !state.links.is_empty() {
            problems.push(format!("cannot list the programs on the attach cgroup: {e}"));
        }
        Vec::new()
    });
    let hooks = hook_statuses(state, &attached);
    let mut required_missing = false;
    if !state.links.is_empty() {
        for (hook, status) in Hook::ALL.iter().zip(&hooks) {
            if status.ok {
                continue;
            }
            let link = state.links.iter().find(|l| l.hook == *hook);
            let what = match link {
                None => format!("{hook:?}: no pinned link"),
                Some(l) if l.cgroup_id == 0 => format!("{hook:?}: the pinned link was detached"),
                Some(_) if status.attached.is_empty() => format!("{hook:?}: our program is not on the cgroup"),
                Some(_) => format!("{hook:?}: programs {:?} on the cgroup, expected only ours", status.attached),
            };
            problems.push(format!("{what}; restart the agent to put it back"));
            required_missing |= REQUIRED.contains(hook);
        }
    }
    if state.config.is_some() && state.protected.is_empty() && state.protected_addresses.is_empty() {
        problems.push("no protected endpoints are configured; restart the agent".into());
    }
    if let (Some(config), Some(agent)) = (state.config, state.agent()) {
        if config.refuse_redirects != 0 {
            problems.push(format!(
                "another process held {agent} when the agent started: connections that would be redirected \
                 are refused until the agent can listen there (its log names the holder)"
            ));
        }
    }
    let backstop_missing =
        !state.links.is_empty() && backstop_problem(&backstop).inspect(|p| problems.push(p.clone())).is_some();
    let agent_error = match &agent {
        Ok(a) if !a.ready => Some(format!("the agent is not ready: {}", a.readiness)),
        Ok(a) => a.unhealthy.clone().map(|why| format!("the agent is unhealthy: {why}")),
        Err(e) => Some(e.clone()),
    };
    let (protection, summary) = if state.links.is_empty() {
        (Protection::Unprotected, format!("not protected: nothing is installed under {pin_dir}"))
    } else if required_missing || (state.protected.is_empty() && state.protected_addresses.is_empty()) {
        (Protection::Unprotected, "not protected: the filter is only partly in place".to_owned())
    } else if backstop_missing {
        let summary = "not protected below the socket layer: the node backstop is missing or incomplete, so pods holding NET_RAW or NET_ADMIN can reach protected addresses";
        (Protection::Unprotected, summary.to_owned())
    } else if let Some(why) = &agent_error {
        let summary = format!(
            "fail-closed: the filter is attached, but no agent is serving ({why}); pods' metadata connections are refused"
        );
        (Protection::FailClosed, summary)
    } else {
        let mode = agent.as_ref().map_or("enforce", |a| a.mode.as_str());
        let note = if mode == "audit" { " in audit mode: denials are logged, not enforced" } else { "" };
        (Protection::Protected, format!("protected: the filter is attached and the agent is serving{note}"))
    };
    if let Some(why) = &agent_error {
        if !state.links.is_empty() {
            problems.push(format!("{why}; check the agent pod (kubectl -n imds-filter get pods -o wide) and its logs"));
        }
    }
    let mut verdict_entries = BTreeMap::new();
    for (_, v) in &state.verdicts {
        let name = v.map_or("unknown", |v| v.name());
        *verdict_entries.entry(name.to_owned()).or_insert(0) += 1;
    }
    NodeStatus {
        protection,
        summary,
        problems,
        pin_dir: pin_dir.to_owned(),
        attach_cgroup_id: state.attach_cgroup_id(),
        attach_cgroup,
        hooks,
        protected_endpoints: state.protected.iter().map(ToString::to_string).collect(),
        protected_addresses: state.protected_addresses.iter().map(ToString::to_string).collect(),
        default_verdict: state.default_verdict().map(|v| v.name().to_owned()),
        redirect_to: state.agent().map(|a| a.to_string()),
        verdict_entries,
        counters: state.counters.iter().map(|(c, n)| (c.name().to_owned(), *n)).collect(),
        maps: state.maps.iter().map(|m| (m.name.to_owned(), (m.entries, m.capacity))).collect(),
        node_backstop: backstop.ok(),
        agent_asked,
        agent: agent.ok(),
        agent_error,
    }
}

fn interfaces(n: usize) -> String {
    format!("{n} interface{}", if n == 1 { "" } else { "s" })
}

/// What is wrong with the node backstop, with what to do; `None` when it is complete.
fn backstop_problem(backstop: &Result<BackstopState, String>) -> Option<String> {
    match backstop {
        Err(e) => Some(format!("cannot read the node backstop: {e}")),
        Ok(b) if b.complete() => None,
        Ok(b) if b.mechanism.is_none() => Some(
            "no node backstop in this network namespace: packets a pod makes below the socket layer (AF_PACKET, its own nftables) reach protected addresses; restart the agent (without --node-backstop off)".to_owned(),
        ),
        Ok(b) if b.mechanism == Some("netfilter") => {
            Some(format!("the node backstop has only {}; restart the agent", b.links.join(", ")))
        }
        Ok(b) => Some(format!(
            "interfaces without the node backstop (created while no agent ran?): {}; restart the agent",
            b.uncovered.join(", ")
        )),
    }
}

impl std::fmt::Display for NodeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.summary)?;
        for p in &self.problems {
            writeln!(f, "  ! {p}")?;
        }
        writeln!(f)?;
        writeln!(f, "kernel ({})", self.pin_dir)?;
        if let Some(id) = self.attach_cgroup_id {
            let path = self.attach_cgroup.as_deref().unwrap_or("(path not found)");
            writeln!(f, "  attached to     {path} (cgroup id {id})")?;
        }
        for h in &self.hooks {
            let state = match (h.ok, h.prog_id) {
                (true, Some(id)) => format!("ok, program {id}"),
                (false, None) => "MISSING".to_owned(),
                (false, Some(id)) => format!("WRONG: pinned program {id}, attached {:?}", h.attached),
                (true, None) => "ok".to_owned(),
            };
            writeln!(f, "  {:<15} {} {state}", h.hook, h.program)?;
        }
        if !self.protected_endpoints.is_empty() {
            writeln!(f, "  protected       {}", self.protected_endpoints.join(", "))?;
        }
        if !self.protected_addresses.is_empty() {
            writeln!(f, "  every port of   {}", self.protected_addresses.join(", "))?;
        }
        if let (Some(v), Some(to)) = (&self.default_verdict, &self.redirect_to) {
            writeln!(f, "  default         {v} (to {to})")?;
        }
        let entries: Vec<String> = self.verdict_entries.iter().map(|(v, n)| format!("{n} {v}")).collect();
        if !self.maps.is_empty() {
            writeln!(
                f,
                "  verdict entries {}",
                if entries.is_empty() { "none".to_owned() } else { entries.join(", ") }
            )?;
            let fill: Vec<String> = self.maps.iter().map(|(m, (n, cap))| format!("{m} {n}/{cap}")).collect();
            writeln!(f, "  maps            {}", fill.join(", "))?;
        }
        if let Some(b) = &self.node_backstop {
            let state = match (b.mechanism, b.complete()) {
                (None, _) => "MISSING".to_owned(),
                (Some("netfilter"), true) => "netfilter (ipv4 and ipv6 at prerouting, input, forward)".to_owned(),
                (Some("netfilter"), false) => format!("netfilter, only {}", b.links.join(", ")),
                (Some(m), true) => format!("{m} ingress on {}", interfaces(b.covered.len())),
                (Some(m), false) => {
                    format!("{m} ingress on {}, NOT on {}", interfaces(b.covered.len()), b.uncovered.join(", "))
                }
            };
            writeln!(f, "  node backstop   {state}")?;
        }
        if !self.counters.is_empty() {
            let counters: Vec<String> = self.counters.iter().map(|(c, n)| format!("{c} {n}")).collect();
            writeln!(f, "  counters        {}", counters.join(", "))?;
        }
        writeln!(f)?;
        match (&self.agent, &self.agent_asked) {
            (Some(a), Some(at)) => {
                writeln!(f, "agent ({at})")?;
                writeln!(f, "  version         {}", a.version)?;
                writeln!(f, "  mode            {}", a.mode)?;
                writeln!(f, "  listening on    {}", a.listen)?;
                writeln!(f, "  policy source   {}", a.source)?;
                writeln!(f, "  readiness       {}", a.readiness)?;
                let sizes: Vec<String> = a.policy.iter().map(|(k, n)| format!("{n} {k}")).collect();
                writeln!(f, "  policy          {}", sizes.join(", "))?;
                writeln!(f, "  connections     {} open", a.connections_open)?;
                if !a.uncontained_pods.is_empty() {
                    writeln!(f, "\npods the filter cannot contain (see SECURITY.md)")?;
                    for p in &a.uncontained_pods {
                        writeln!(f, "  {:<40} {}", p.pod, p.why.join(", "))?;
                    }
                }
            }
            (_, Some(at)) => {
                writeln!(f, "agent ({at})")?;
                writeln!(f, "  {}", self.agent_error.as_deref().unwrap_or("no answer"))?;
            }
            (_, None) => writeln!(f, "agent: not asked")?,
        }
        Ok(())
    }
}

/// Everything `imds-agent status` reports.
pub async fn gather(pin_dir: &Path, agent_socket: &Path) -> anyhow::Result<NodeStatus> {
    let state = kernel::inspect::inspect(pin_dir).with_context(|| format!("reading {}", pin_dir.display()))?;
    let root = cgroup::cgroup2_root().ok();
    let attach_cgroup = match (state.attach_cgroup_id(), &root) {
        (Some(id), Some(root)) => CgroupResolver::new(root).ok().and_then(|r| r.resolve(id).ok().flatten()),
        _ => None,
    };
    let attached = match (&attach_cgroup, &root) {
        (Some(cg), Some(root)) => kernel::attached_programs(&root.join(cg.path.trim_start_matches('/')))
            .map_err(|e| format!("{:#}", anyhow::Error::from(e))),
        _ => Err("the attach cgroup was not found".to_owned()),
    };
    let agent = Client::new(agent_socket).status().await;
    let backstop = kernel::backstop::inspect(pin_dir).map_err(|e| format!("{:#}", anyhow::Error::from(e)));
    Ok(assess(Inputs {
        pin_dir: &pin_dir.display().to_string(),
        state: &state,
        attach_cgroup: attach_cgroup.map(|c| c.path),
        attached,
        backstop,
        agent_asked: Some(agent_socket.display().to_string()),
        agent,
    }))
}

#[cfg(test)]
mod tests {
    use imds_common::{Config, Verdict};

    use super::*;
    use crate::kernel::inspect::PinnedLink;

    fn installed() -> PinnedState {
        let links = Hook::ALL
            .iter()
            .zip(1..)
            .map(|(hook, n)| PinnedLink { hook: *hook, link_id: n, prog_id: 100 + n, cgroup_id: 7 })
            .collect();
        PinnedState {
            links,
            config: Some(Config { default_verdict: Verdict::Redirect as u32, ..Config::default() }),
            protected: vec!["169.254.169.254:80".parse().unwrap()],
            protected_addresses: vec!["169.254.169.254".parse().unwrap()],
            verdicts: vec![(8, Some(Verdict::Pass)), (9, Some(Verdict::Deny))],
            counters: vec![],
            maps: vec![],
        }
    }

    fn listed(state: &PinnedState) -> Vec<(Hook, Vec<AttachedProgram>)> {
        state.links.iter().map(|l| (l.hook, vec![AttachedProgram { id: l.prog_id, name: String::new() }])).collect()
    }

    fn serving() -> AgentStatus {
        AgentStatus { mode: "enforce".into(), ready: true, readiness: "ready".into(), ..AgentStatus::default() }
    }

    fn judge(
        state: &PinnedState,
        attached: Vec<(Hook, Vec<AttachedProgram>)>,
        agent: Result<AgentStatus, String>,
    ) -> NodeStatus {
        assess(Inputs {
            pin_dir: "/sys/fs/bpf/imds-filter",
            state,
            attach_cgroup: Some("/kubepods".into()),
            attached: Ok(attached),
            backstop: Ok(netfilter_backstop()),
            agent_asked: Some("/run/imds-filter/agent.sock".into()),
            agent,
        })
    }

    fn netfilter_backstop() -> BackstopState {
        let links = kernel::netfilter::Place::ALL.iter().map(|p| p.name()).collect();
        BackstopState { mechanism: Some("netfilter"), links, ..BackstopState::default() }
    }

    /// What, the pinned state, the agent's answer, the protection, how many problems.
    type Case<'a> = (&'a str, &'a PinnedState, Result<AgentStatus, String>, Protection, usize);

    #[test]
    fn each_situation_gets_its_answer() {
        let full = installed();
        let nothing = PinnedState {
            links: vec![],
            config: None,
            protected: vec![],
            protected_addresses: vec![],
            verdicts: vec![],
            counters: vec![],
            maps: vec![],
        };
        let mut no_connect4 = installed();
        no_connect4.links.retain(|l| l.hook != Hook::Connect4);
        let mut no_peer6 = installed();
        no_peer6.links.retain(|l| l.hook != Hook::GetPeerName6);
        let mut detached = installed();
        detached.links[2].cgroup_id = 0;
        let unready = AgentStatus { ready: false, readiness: "not ready: policy not loaded yet".into(), ..serving() };
        let audit = AgentStatus { mode: "audit".into(), ..serving() };
        let down: Result<AgentStatus, String> = Err("no agent is running".into());
        let cases: Vec<Case<'_>> = vec![
            ("all in place, agent serving", &full, Ok(serving()), Protection::Protected, 0),
            ("audit mode still counts", &full, Ok(audit), Protection::Protected, 0),
            ("agent killed: pinned programs stay", &full, down.clone(), Protection::FailClosed, 1),
            ("agent not ready", &full, Ok(unready), Protection::FailClosed, 1),
            ("nothing pinned", &nothing, down.clone(), Protection::Unprotected, 0),
            ("connect4 missing", &no_connect4, Ok(serving()), Protection::Unprotected, 1),
            ("a link detached underneath", &detached, Ok(serving()), Protection::Unprotected, 1),
            ("only getpeername6 missing", &no_peer6, Ok(serving()), Protection::Protected, 1),
        ];
        for (what, state, agent, want, problems) in cases {
            let got = judge(state, listed(state), agent);
            assert_eq!(got.protection, want, "{what}: {}", got.summary);
            assert_eq!(got.problems.len(), problems, "{what}: {:?}", got.problems);
        }
    }

    #[test]
    fn a_missing_or_partial_node_backstop_is_not_protected() {
        let state = installed();
        let with = |backstop: Result<BackstopState, String>| {
            assess(Inputs {
                pin_dir: "/sys/fs/bpf/imds-filter",
                state: &state,
                attach_cgroup: Some("/kubepods".into()),
                attached: Ok(listed(&state)),
                backstop,
                agent_asked: None,
                agent: Ok(serving()),
            })
        };
        let tc = |uncovered: Vec<String>| BackstopState {
            mechanism: Some("tc"),
            covered: vec!["eth0".into()],
            uncovered,
            ..BackstopState::default()
        };
        let cases = [
            ("netfilter, every link", Ok(netfilter_backstop()), Protection::Protected, "netfilter (ipv4 and ipv6 at"),
            ("tc everywhere", Ok(tc(vec![])), Protection::Protected, "tc ingress on 1 interface"),
            ("tc with a gap", Ok(tc(vec!["veth9".into()])), Protection::Unprotected, "NOT on veth9"),
            ("none", Ok(BackstopState::default()), Protection::Unprotected, "MISSING"),
            (
                "only ipv4 before NAT",
                Ok(BackstopState { links: vec!["ipv4/prerouting".into()], ..netfilter_backstop() }),
                Protection::Unprotected,
                "only ipv4/prerouting",
            ),
            ("unreadable", Err("EPERM".to_owned()), Protection::Unprotected, "not protected below the socket layer"),
        ];
        for (what, backstop, want, text) in cases {
            let got = with(backstop);
            assert_eq!(got.protection, want, "{what}: {}", got.summary);
            assert!(got.to_string().contains(text), "{what}: {got}");
        }
    }

    #[test]
    fn a_second_program_on_a_hook_is_a_problem() {
        let state = installed();
        let mut attached = listed(&state);
        attached[1].1.push(AttachedProgram { id: 999, name: "intruder".into() });
        let got = judge(&state, attached, Ok(serving()));
        assert_eq!(got.protection, Protection::Unprotected);
        assert!(got.problems[0].contains("999"), "{:?}", got.problems);
    }

    #[test]
    fn counts_and_text() {
        let state = installed();
        let got = judge(&state, listed(&state), Ok(serving()));
        assert_eq!(got.verdict_entries, BTreeMap::from([("deny".into(), 1), ("pass".into(), 1)]));
        assert_eq!(got.default_verdict.as_deref(), Some("redirect"));
        let text = got.to_string();
        assert!(text.starts_with("protected: the filter is attached and the agent is serving\n"), "{text}");
        assert!(text.contains("attached to     /kubepods (cgroup id 7)"), "{text}");
    }
}
