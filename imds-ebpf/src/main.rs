//! Kernel programs of the IMDS filter.
//!
//! Attached to one cgroup (the kubelet pod hierarchy on a node), they see every socket of
//! every process below it:
//!
//! - `imds_connect4` / `imds_connect6`: a `connect()` to a protected address is let through,
//!   refused (`EPERM`) or rewritten to the agent, by the caller's cgroup verdict. The v6 hook
//!   catches the v4-mapped spelling `::ffff:169.254.169.254`, which never reaches connect4.
//! - `imds_sock_ops`: when a redirected TCP connection has its local port (just before the
//!   SYN), the caller's identity moves from a socket-cookie key to the connection's address
//!   tuple, which the agent can compute from its accepted socket.
//! - `imds_peer4` / `imds_peer6`: `getpeername()` on a redirected socket reports the address
//!   the caller asked for, not the agent's: what the application connected to is what it sees.
//! - `imds_bind4` / `imds_bind6`: the agent's TCP port (on its address or the wildcard, in
//!   its network namespace) can be bound by the agent alone, so no other process can receive
//!   redirected connections, even while the agent restarts.
//! - `imds_egress`: a backstop that drops any packet to a protected address from a cgroup
//!   that is not PASS (raw sockets, unconnected UDP, anything that skips `connect()`).
//! - `imds_node_nf` / `imds_node_tc` (in `node.rs`): the node backstop, in the node's network
//!   namespace rather than on a cgroup. It drops packets to a protected address that enter the
//!   node from another namespace, whatever made them (`AF_PACKET`, a pod's own nftables).
//!
//! IPv6 destinations that reach an IPv4 address — `::ffff:a.b.c.d` and the NAT64 forms of the
//! `NAT64` prefixes, such as `64:ff9b::a9fe:a9fe` — are judged as that IPv4 address everywhere.
//!
//! All policy lives in one place per hook: a `try_` function decides, the entry point maps
//! the decision to the kernel's return code.
// Built for bpfel-unknown-none by imds-agent's build script. On the host (e.g. `cargo build
// --workspace`) it is an ordinary program that says so, so workspace-wide commands work.
#![expect(
    unreachable_pub,
    reason = "the entry points are exported by their sections for the loader, not as Rust items"
)]
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
#![expect(
    clippy::inline_always,
    reason = "BPF-to-BPF calls cost verifier complexity and stack; every helper here is inlined on purpose"
)]
#![expect(clippy::needless_pass_by_value, reason = "aya's program macros fix the entry points' signatures")]

mod node;

use aya_ebpf::{
    bindings::{BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SkBuffContext, SockAddrContext, SockOpsContext},
    EbpfContext as _,
};
use aya_log_ebpf::{debug, warn};
use imds_common::{
    bind_target_v4, capacity,
    decide::{self, ConnectVerdict},
    embedded_v4, has_ports, ipproto, ipv4_transport, Config, Counter, Embedded, Nat64Prefix, Origin, OriginKey, Peer,
    PodAddr, ProtectedAddr, ProtectedSummary, IPV6_HEADER_LEN, V4_MAPPED_WORD2, VERDICT_PASS,
};

// ---- maps (pinned by name, so they outlive the agent process) ------------------------------

#[map]
static VERDICTS: HashMap<u64, u32> = HashMap::pinned(capacity::VERDICTS, 0);
#[map]
static PROTECTED: HashMap<u32, ProtectedAddr> = HashMap::pinned(capacity::PROTECTED, 0);
#[map]
static CONFIG: Array<Config> = Array::pinned(1, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::LEN, 0);
#[map]
static PENDING: LruHashMap<u64, Origin> = LruHashMap::pinned(capacity::PENDING, 0);
#[map]
static ORIGINS: LruHashMap<OriginKey, Origin> = LruHashMap::pinned(capacity::ORIGINS, 0);
#[map]
static PEERS: LruHashMap<u64, Peer> = LruHashMap::pinned(capacity::PEERS, 0);
#[map]
static PASS_SOURCES: HashMap<PodAddr, u32> = HashMap::pinned(capacity::PASS_SOURCES, 0);
#[map]
static NAT64: Array<Nat64Prefix> = Array::pinned(capacity::NAT64, 0);
#[map]
static SUMMARY: Array<ProtectedSummary> = Array::pinned(1, 0);

// ---- kernel return codes ---------------------------------------------------------------------

/// `cgroup/sock_addr` and `cgroup_skb` programs: let the operation proceed.
const ALLOW: i32 = 1;
/// `cgroup/sock_addr`: fail `connect()` with `EPERM`; `cgroup_skb`: drop the packet.
const REFUSE: i32 = 0;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u32 = 1;
/// `ETH_P_IP` and `ETH_P_IPV6` as `skb->protocol` holds them (network order, low 16 bits).
const ETH_P_IP_BE: u32 = 0x0800u16.to_be() as u32;
const ETH_P_IPV6_BE: u32 = 0x86ddu16.to_be() as u32;
/// Offsets of the addresses in an IPv4 and an IPv6 header; `cgroup_skb` data starts at L3.
const IPV4_SADDR_OFFSET: usize = 12;
const IPV4_DADDR_OFFSET: usize = 16;
const IPV6_SADDR_OFFSET: usize = 8;
const IPV6_DADDR_OFFSET: usize = 24;
/// Offset of the next-header field in an IPv6 header.
const IPV6_NEXT_HEADER_OFFSET: usize = 6;
/// Offset of the destination port in a TCP, UDP or UDP-Lite header.
const DPORT_OFFSET: usize = 2;

// ---- connect4 / connect6 ---------------------------------------------------------------------

/// What a `connect()` to some destination gets.
enum Connect {
    /// Not a protected address: not ours to judge.
    Untouched,
    Pass,
    Deny,
    Redirect(Config),
}

#[cgroup_sock_addr(connect4)]
pub fn imds_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid `bpf_sock_addr` that lives for the whole program run.
    let sa = unsafe { &mut *ctx.sock_addr };
    // `user_port` is a 32-bit field holding the port in network order in its low 16 bits.
    let (ip4_be, port_be) = (sa.user_ip4, sa.user_port as u16);
    apply(&ctx, try_connect(ip4_be, port_be, sa.protocol), ip4_be, port_be, AF_INET, |cfg| {
        sa.user_ip4 = cfg.agent_ip4_be;
        sa.user_port = u32::from(cfg.agent_port_be);
    })
}

#[cgroup_sock_addr(connect6)]
pub fn imds_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    // The verifier only allows 4-byte accesses to `user_ip6`: read it word by word. Only the
    // v4-mapped form and NAT64 forms can reach an IPv4 endpoint from an AF_INET6 socket.
    let words = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
    let Some(embedded) = embedded_v4(words, nat64_prefix) else {
        return ALLOW;
    };
    let family = match embedded {
        Embedded::V4Mapped(_) => AF_INET6,
        Embedded::Nat64 { slot, .. } => Origin::nat64_family(slot),
    };
    let (ip4_be, port_be) = (embedded.ip4_be(), sa.user_port as u16);
    apply(&ctx, try_connect(ip4_be, port_be, sa.protocol), ip4_be, port_be, family, |cfg| {
        // The agent listens on IPv4: reach it through the v4-mapped form of its address,
        // whichever spelling the caller used.
        sa.user_ip6[0] = 0;
        sa.user_ip6[1] = 0;
        sa.user_ip6[2] = V4_MAPPED_WORD2;
        sa.user_ip6[3] = cfg.agent_ip4_be;
        sa.user_port = u32::from(cfg.agent_port_be);
    })
}

/// The one mapping from a decision to what the kernel does; `redirect` rewrites the
/// destination in the family's own fields.
#[inline(always)]
fn apply(
    ctx: &SockAddrContext,
    decision: Connect,
    ip4_be: u32,
    port_be: u16,
    family: u16,
    redirect: impl FnOnce(&Config),
) -> i32 {
    match decision {
        Connect::Untouched => ALLOW,
        Connect::Pass => count(Counter::ConnectPass, ALLOW),
        Connect::Deny => {
            let hook = if family == AF_INET { "connect4" } else { "connect6" };
            debug!(ctx, "{} to protected {:i} refused", hook, u32::from_be(ip4_be));
            count(Counter::ConnectDeny, REFUSE)
        }
        Connect::Redirect(cfg) => {
            record_pending(ctx, ip4_be, port_be, family);
            redirect(&cfg);
            count(Counter::ConnectRedirect, ALLOW)
        }
    }
}

/// The one place a `connect()` is judged.
#[inline(always)]
fn try_connect(ip4_be: u32, port_be: u16, protocol: u32) -> Connect {
    let Some(protected) = protected_entry(ip4_be) else {
        return Connect::Untouched;
    };
    if !protected.judges(protocol, Some(port_be)) {
        return Connect::Untouched; // UDP, or TCP to a port nobody protects
    }
    let cfg = config();
    // SAFETY: helper without preconditions.
    let leaf = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: helper without preconditions; returns 0 past the caller's own level.
    let verdict = cgroup_verdict(&cfg, leaf, |level| unsafe { bpf_get_current_ancestor_cgroup_id(level) });
    let redirectable = protocol == ipproto::TCP && protected.has_port(port_be);
    match decide::connect_verdict(verdict, redirectable, cfg.refuse_redirects) {
        ConnectVerdict::Pass => Connect::Pass,
        ConnectVerdict::Redirect => Connect::Redirect(cfg),
        ConnectVerdict::Deny => Connect::Deny,
    }
}

/// Remembers who is connecting, under the socket cookie, until `sock_ops` sees the local port.
#[inline(always)]
fn record_pending(ctx: &SockAddrContext, ip4_be: u32, port_be: u16, family: u16) {
    // SAFETY: helpers without preconditions; the cookie helper accepts this context type.
    let origin = unsafe {
        Origin {
            cgroup_id: bpf_get_current_cgroup_id(),
            pid_tgid: bpf_get_current_pid_tgid(),
            uid_gid: bpf_get_current_uid_gid(),
            recorded_ns: bpf_ktime_get_ns(),
            orig_ip4_be: ip4_be,
            orig_port_be: port_be,
            family,
        }
    };
    // SAFETY: see above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if PENDING.insert(cookie, origin, 0).is_err() {
        warn!(ctx, "origin of a redirected connection could not be recorded");
        bump(Counter::OriginLost);
    }
}

// ---- sock_ops --------------------------------------------------------------------------------

#[sock_ops]
pub fn imds_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_tcp_connect(&ctx),
        // args[1] is the new state. Only sockets we recorded have this callback enabled.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let _gone = ORIGINS.remove(connection_key(&ctx));
            // SAFETY: the cookie helper accepts a sock_ops context.
            let _gone = PEERS.remove(unsafe { bpf_get_socket_cookie(ctx.as_ptr()) });
        }
        _ => {}
    }
    1
}

/// The client side of a connection, in the byte order `OriginKey` wants.
#[inline(always)]
fn connection_key(ctx: &SockOpsContext) -> OriginKey {
    OriginKey {
        // The v4 fields are right for AF_INET sockets and for v4-mapped AF_INET6 ones: the
        // kernel runs those through tcp_v4_connect, which fills them before this callback.
        client_ip4_be: ctx.local_ip4(),
        agent_ip4_be: ctx.remote_ip4(),
        // sock_ops quirks: `local_port` is in host order; `remote_port` is in network order
        // in the *upper* 16 bits on little-endian, i.e. `ntohl()` of it is the host port.
        client_port_be: (ctx.local_port() as u16).to_be(),
        agent_port_be: (u32::from_be(ctx.remote_port()) as u16).to_be(),
    }
}

/// Runs before the SYN of every TCP connection in the hierarchy, after the local port is set.
#[inline(always)]
fn on_tcp_connect(ctx: &SockOpsContext) {
    let cfg = config();
    let key = connection_key(ctx);
    if key.agent_ip4_be != cfg.agent_ip4_be || key.agent_port_be != cfg.agent_port_be {
        return; // not headed for the agent: nothing to record or clean
    }
    // SAFETY: the cookie helper accepts a sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain data copied out right away.
    match unsafe { PENDING.get(cookie) }.copied() {
        Some(origin) => {
            let _taken = PENDING.remove(cookie);
            if ORIGINS.insert(key, origin, 0).is_ok() {
                // Best effort: without it, getpeername() shows the agent's address.
                let peer = Peer {
                    ip4_be: origin.orig_ip4_be,
                    port_be: origin.orig_port_be,
                    nat64_slot_plus_one: origin.nat64_slot().map_or(0, |slot| slot as u16 + 1),
                };
                let _ = PEERS.insert(cookie, peer, 0);
                // Drop the records when this socket closes, whether or not the agent took it.
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
                bump(Counter::OriginRecorded);
            } else {
                warn!(ctx, "origin could not be stored: the agent will refuse this connection");
                bump(Counter::OriginLost);
            }
        }
        // A direct connection to the agent (not redirected): it must not inherit a record an
        // earlier connection with the same tuple left behind.
        None => {
            let _stale = ORIGINS.remove(key);
        }
    }
}

// ---- getpeername4 / getpeername6 -------------------------------------------------------------

#[cgroup_sock_addr(getpeername4)]
pub fn imds_peer4(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(peer) = asked_for(&ctx, sa.user_ip4, sa.user_port as u16) {
        sa.user_ip4 = peer.ip4_be;
        sa.user_port = u32::from(peer.port_be);
    }
    ALLOW // the only value these hooks accept
}

#[cgroup_sock_addr(getpeername6)]
pub fn imds_peer6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (w0, w1, w2, ip4_be) = (sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]);
    if w0 != 0 || w1 != 0 || w2 != V4_MAPPED_WORD2 {
        return ALLOW;
    }
    if let Some(peer) = asked_for(&ctx, ip4_be, sa.user_port as u16) {
        // A NAT64 spelling gets its prefix back; the v4-mapped one already has it.
        if let Some(prefix) = peer.nat64_slot_plus_one.checked_sub(1).and_then(|slot| nat64_prefix(u32::from(slot))) {
            sa.user_ip6[0] = prefix.words[0];
            sa.user_ip6[1] = prefix.words[1];
            sa.user_ip6[2] = prefix.words[2];
        }
        sa.user_ip6[3] = peer.ip4_be;
        sa.user_port = u32::from(peer.port_be);
    }
    ALLOW
}

/// What a socket whose peer is `ip4_be:port_be` asked for, if it is a redirected one.
#[inline(always)]
fn asked_for(ctx: &SockAddrContext, ip4_be: u32, port_be: u16) -> Option<Peer> {
    let cfg = config();
    if ip4_be != cfg.agent_ip4_be || port_be != cfg.agent_port_be {
        return None; // not connected to the agent: nothing to say
    }
    // SAFETY: the cookie helper accepts this context type; plain data copied out right away.
    unsafe { PEERS.get(bpf_get_socket_cookie(ctx.as_ptr())) }.copied()
}

// ---- bind4 / bind6 ---------------------------------------------------------------------------

#[cgroup_sock_addr(bind4)]
pub fn imds_bind4(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4.
    let sa = unsafe { &*ctx.sock_addr };
    bind_verdict(try_bind(&ctx, Some(sa.user_ip4), sa.user_port as u16, sa.type_))
}

#[cgroup_sock_addr(bind6)]
pub fn imds_bind6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as in connect4.
    let sa = unsafe { &*ctx.sock_addr };
    let words = [sa.user_ip6[0], sa.user_ip6[1], sa.user_ip6[2], sa.user_ip6[3]];
    bind_verdict(try_bind(&ctx, bind_target_v4(words), sa.user_port as u16, sa.type_))
}

/// What a `bind()` gets.
enum Bind {
    Allow,
    /// Someone other than the agent asked for the agent's port: a squatter would receive the
    /// connections the kernel redirects.
    Refuse,
}

#[inline(always)]
fn bind_verdict(decision: Bind) -> i32 {
    match decision {
        Bind::Allow => ALLOW,
        Bind::Refuse => count(Counter::BindRefused, REFUSE),
    }
}

/// The one place a `bind()` is judged: a stream socket (TCP, MPTCP) asking for the agent's
/// port on its address or the wildcard (`ip4_be` 0; `None`: an IPv6 address that takes no
/// IPv4 connection), in the agent's network namespace, is the agent's alone.
#[inline(always)]
fn try_bind(ctx: &SockAddrContext, ip4_be: Option<u32>, port_be: u16, sock_type: u32) -> Bind {
    let cfg = config();
    let Some(ip4_be) = ip4_be else { return Bind::Allow };
    if sock_type != SOCK_STREAM
        || cfg.agent_port_be == 0
        || port_be != cfg.agent_port_be
        || (ip4_be != 0 && ip4_be != cfg.agent_ip4_be)
    {
        return Bind::Allow;
    }
    // SAFETY: the helper accepts this context type.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if cfg.agent_netns_cookie != 0 && netns != cfg.agent_netns_cookie {
        return Bind::Allow; // another namespace: redirected connections never arrive there
    }
    // SAFETY: helper without preconditions.
    if cfg.is_agent(unsafe { bpf_get_current_cgroup_id() }) {
        Bind::Allow
    } else {
        Bind::Refuse
    }
}

// ---- egress backstop -------------------------------------------------------------------------

#[cgroup_skb(egress)]
pub fn imds_egress(ctx: SkBuffContext) -> i32 {
    if try_egress_allowed(&ctx) {
        ALLOW
    } else {
        count(Counter::EgressDrop, REFUSE)
    }
}

/// Whether a packet leaving a socket in the hierarchy may go. Redirected connections never
/// carry a protected destination, so only traffic that skipped `connect()` lands here.
#[inline(always)]
fn try_egress_allowed(ctx: &SkBuffContext) -> bool {
    let Some((dst_be, v6)) = egress_destination(ctx) else {
        return true; // not a packet that can reach an IPv4 endpoint
    };
    let Some(protected) = protected_entry(dst_be) else {
        return true;
    };
    let (protocol, port_be) = egress_transport(ctx, v6);
    if !protected.judges(protocol, port_be) {
        return true;
    }
    let cfg = config();
    let skb = ctx.skb.skb;
    // SAFETY: `skb` is the program's own context pointer; these helpers accept it in
    // cgroup_skb programs and return the cgroup of the socket that sent the packet.
    let leaf = unsafe { bpf_skb_cgroup_id(skb) };
    // SAFETY: as above.
    let verdict = cgroup_verdict(&cfg, leaf, |level| unsafe { bpf_skb_ancestor_cgroup_id(skb, level) });
    verdict == VERDICT_PASS
}

/// The IPv4 address a packet is headed for, and whether it is an IPv6 packet: an IPv4
/// destination, or the one a NAT64 IPv6 destination embeds (v4-mapped destinations are never
/// sent as IPv6). `None` for other packets, and for ones too short to carry an address (the
/// stack sends those nowhere).
#[inline(always)]
fn egress_destination(ctx: &SkBuffContext) -> Option<(u32, bool)> {
    match ctx.skb.protocol() {
        ETH_P_IP_BE => packet_read::<u32>(ctx, IPV4_DADDR_OFFSET).map(|dst| (dst, false)),
        ETH_P_IPV6_BE => {
            let dst = packet_read::<[u32; 4]>(ctx, IPV6_DADDR_OFFSET)?;
            embedded_v4(dst, nat64_prefix).map(|e| (e.ip4_be(), true))
        }
        _ => None,
    }
}

/// The `T` at byte `offset` of a packet: read straight from its linear data when it is all
/// there (no helper call), through `bpf_skb_load_bytes` otherwise.
#[inline(always)]
fn packet_read<T: Copy>(ctx: &SkBuffContext, offset: usize) -> Option<T> {
    // SAFETY: the kernel's context for this run; `data` and `data_end` bound the linear data.
    let (data, end) = unsafe { ((*ctx.skb.skb).data as usize, (*ctx.skb.skb).data_end as usize) };
    let at = data + offset;
    if at + size_of::<T>() <= end {
        // SAFETY: within the linear data, as just checked (the verifier checks it again).
        Some(unsafe { core::ptr::read_unaligned(at as *const T) })
    } else {
        ctx.load::<T>(offset).ok()
    }
}

/// A packet's transport protocol and destination port (network order; `None` when it has
/// none that can be read). Read only for packets to a protected address.
#[inline(always)]
fn egress_transport(ctx: &SkBuffContext, v6: bool) -> (u32, Option<u16>) {
    let (protocol, transport) = if v6 {
        let next = ctx.load::<u8>(IPV6_NEXT_HEADER_OFFSET).map_or(0, u32::from);
        (next, has_ports(next).then_some(IPV6_HEADER_LEN))
    } else {
        match ctx.load::<[u8; 20]>(0) {
            Ok(header) => ipv4_transport(&header),
            Err(_) => (0, None),
        }
    };
    (protocol, transport.and_then(|at| ctx.load::<u16>(at as usize + DPORT_OFFSET).ok()))
}

// ---- shared helpers --------------------------------------------------------------------------

/// The `PROTECTED` entry of `ip4_be`, if it is a protected address. The summary (an array
/// lookup the verifier inlines) rules out nearly every other address before the map is asked.
#[inline(always)]
fn protected_entry(ip4_be: u32) -> Option<ProtectedAddr> {
    let summary = SUMMARY.get(0).copied().unwrap_or_default();
    if !summary.may_protect(ip4_be) {
        return None;
    }
    // SAFETY: plain data copied out right away; a concurrent update can at worst give us the
    // old or the new entry.
    unsafe { PROTECTED.get(ip4_be) }.copied()
}

#[inline(always)]
fn config() -> Config {
    CONFIG.get(0).copied().unwrap_or_default()
}

/// NAT64 prefix slot `slot` (empty slots have `in_use == 0`).
#[inline(always)]
fn nat64_prefix(slot: u32) -> Option<Nat64Prefix> {
    NAT64.get(slot).copied()
}

/// Verdict of the cgroup `leaf` ([`decide::cgroup_verdict`]), from the `VERDICTS` map.
#[inline(always)]
fn cgroup_verdict(cfg: &Config, leaf: u64, ancestor: impl Fn(i32) -> u64) -> u32 {
    // SAFETY: plain data copied out right away.
    decide::cgroup_verdict(cfg, leaf, ancestor, |id| unsafe { VERDICTS.get(id) }.copied())
}

#[inline(always)]
fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and programs do not migrate CPUs mid-run: no data race.
        unsafe { *slot += 1 };
    }
}

/// Bumps `counter` and passes `ret` through, so entry points stay one expression per arm.
#[inline(always)]
fn count(counter: Counter, ret: i32) -> i32 {
    bump(counter);
    ret
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("imds-ebpf holds eBPF programs for the kernel; the agent loads them. Nothing to run here.");
    std::process::exit(2);
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
