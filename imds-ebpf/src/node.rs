//! The node backstop: the second enforcement point, in the node's network namespace.
//!
//! The cgroup programs judge sockets, so they cannot see a packet a pod makes below the
//! socket layer: frames written to an `AF_PACKET` socket, or packets its own nftables rewrite
//! on their way out of its namespace. Every such packet still has to enter the node's
//! namespace to go anywhere. Here, a packet to a protected address that enters from another
//! namespace is dropped unless its source is a PASS pod's address (`PASS_SOURCES`), or the
//! address's protection leaves it alone (UDP, and TCP to other ports, of a port-only one).
//!
//! Two attach points run the same rule ([`node_allows`]):
//! - `imds_node_nf` at netfilter `PRE_ROUTING` (Linux ≥ 6.4): one hook for the whole
//!   namespace, whatever the interface. Packets the node sends itself never pass there,
//!   except over loopback, which the program lets through.
//! - `imds_node_tc` at tc ingress of every interface but loopback, for older kernels.
use aya_ebpf::{
    bindings::{bpf_hdr_start_off::BPF_HDR_START_NET, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::{bpf_probe_read_kernel, bpf_skb_load_bytes_relative},
    macros::classifier,
    programs::TcContext,
    Global,
};
use imds_common::{
    embedded_v4, has_ports, ipv4_transport, Counter, PodAddr, ProtectedAddr, IPV6_HEADER_LEN, V4_MAPPED_WORD2,
};

use crate::{
    count, nat64_prefix, protected_entry, DPORT_OFFSET, ETH_P_IPV6_BE, ETH_P_IP_BE, IPV4_DADDR_OFFSET,
    IPV4_SADDR_OFFSET, IPV6_NEXT_HEADER_OFFSET, IPV6_SADDR_OFFSET, PASS_SOURCES,
};

/// The one rule: a packet from `src` to a protected address (`protected`, its entry) may
/// enter the node only if `src` is a PASS pod, unless the address's protection leaves this
/// packet's transport alone (`transport`: its protocol and destination port, read only when
/// it matters). The netfilter program applies it in steps, to skip what the common case does
/// not need.
#[inline(always)]
fn node_allows(
    src: &PodAddr,
    protected: Option<ProtectedAddr>,
    transport: impl FnOnce() -> (u32, Option<u16>),
) -> bool {
    let Some(protected) = protected else {
        return true;
    };
    let (protocol, port_be) = transport();
    if !protected.judges(protocol, port_be) {
        return true;
    }
    // SAFETY: plain lookup; presence is all we need.
    unsafe { PASS_SOURCES.get(src) }.is_some()
}

/// The entry of the protected address an IPv6 destination reaches, if any.
#[inline(always)]
fn protected_v6(dst: [u32; 4]) -> Option<ProtectedAddr> {
    embedded_v4(dst, nat64_prefix).and_then(|e| protected_entry(e.ip4_be()))
}

// ---- netfilter PRE_ROUTING -------------------------------------------------------------------

/// `NF_DROP` and `NF_ACCEPT`, the only values a netfilter program may return.
const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: i32 = 1;

// Where the fields this program reads sit in the running kernel's `struct sk_buff` and
// `struct net_device`. They vary between kernel builds, so the agent reads them from the
// kernel's BTF and sets them at load time; `u32::MAX` means "not set" (the agent never
// attaches the program then).
#[unsafe(no_mangle)]
static SKB_HEAD_OFFSET: Global<u32> = Global::new(u32::MAX);
#[unsafe(no_mangle)]
static SKB_NETWORK_HEADER_OFFSET: Global<u32> = Global::new(u32::MAX);
#[unsafe(no_mangle)]
static SKB_TAIL_OFFSET: Global<u32> = Global::new(u32::MAX);
#[unsafe(no_mangle)]
static SKB_DEV_OFFSET: Global<u32> = Global::new(u32::MAX);
#[unsafe(no_mangle)]
static NET_DEVICE_IFINDEX_OFFSET: Global<u32> = Global::new(u32::MAX);

/// A `BPF_PROG_TYPE_NETFILTER` program. aya 0.14 cannot load that type, and its object parser
/// refuses a `netfilter` section, so the program sits in the `classifier` section (aya parses
/// it and never loads it) and the agent loads it itself (`imds-agent/src/kernel/netfilter.rs`).
/// Its context is `struct bpf_nf_ctx { const struct nf_hook_state *state; struct sk_buff *skb; }`.
#[unsafe(no_mangle)]
#[unsafe(link_section = "classifier")]
pub extern "C" fn imds_node_nf(ctx: *const u64) -> i32 {
    if nf_packet_allowed(ctx) {
        NF_ACCEPT
    } else {
        count(Counter::NodeDrop, NF_DROP)
    }
}

#[inline(always)]
fn nf_packet_allowed(ctx: *const u64) -> bool {
    // SAFETY: the verifier allows exactly this: an 8-byte load of `ctx->skb` at offset 8. It
    // types the result as a pointer to the kernel's `struct sk_buff`.
    let skb = unsafe { *ctx.add(1) } as *const u8;
    // A header that cannot be read lets the packet through: that only happens if the skb is
    // not an skb, and dropping every packet of the node would be no answer to it.
    nf_judge(skb).unwrap_or(true)
}

/// The rule applied to the packet in `skb`, or `None` if its header cannot be read. The
/// common case (not a protected destination) costs two field loads, one header read and one
/// map lookup; the rest is read only for packets to a protected address.
#[inline(always)]
fn nf_judge(skb: *const u8) -> Option<bool> {
    // SAFETY: fields of the `sk_buff` at the offsets its BTF gives. The offsets are read-only
    // globals, which the verifier knows as constants, so it checks each load against the
    // kernel's own type information.
    let head = unsafe { field::<usize>(skb, SKB_HEAD_OFFSET.load()) };
    // SAFETY: as above.
    let network = unsafe { field::<u16>(skb, SKB_NETWORK_HEADER_OFFSET.load()) };
    let ip = head + network as usize;
    // The packet's bytes are not typed memory: read them with bpf_probe_read_kernel.
    let first = read::<[u8; 20]>(ip)?;
    let (src, protected, transport) = match first[0] >> 4 {
        4 => {
            let (src, dst) = (word(&first, IPV4_SADDR_OFFSET), word(&first, IPV4_DADDR_OFFSET));
            (PodAddr::v4(src), protected_entry(dst), ipv4_transport(&first))
        }
        6 => {
            let a = read::<[u32; 8]>(ip + IPV6_SADDR_OFFSET)?;
            let next = u32::from(first[IPV6_NEXT_HEADER_OFFSET]);
            let transport = (next, has_ports(next).then_some(IPV6_HEADER_LEN));
            (ipv6_source([a[0], a[1], a[2], a[3]]), protected_v6([a[4], a[5], a[6], a[7]]), transport)
        }
        // PRE_ROUTING of IPv4 and IPv6 only ever carries those.
        _ => return Some(true),
    };
    if protected.is_none() {
        return Some(true);
    }
    // SAFETY: as above; `dev` is typed as the kernel's `struct net_device`.
    let dev = unsafe { field::<*const u8>(skb, SKB_DEV_OFFSET.load()) };
    // SAFETY: as above.
    if unsafe { field::<i32>(dev, NET_DEVICE_IFINDEX_OFFSET.load()) } == LOOPBACK_IFINDEX {
        return Some(true); // the node's own packets to a local address: the cgroup programs judged them
    }
    // The port only where the linear data holds it: past `tail` the transport header is in
    // page fragments (an AF_PACKET frame with a GSO header can put it there), and the bytes
    // there are not the packet's. An unreadable port is judged.
    // SAFETY: as above.
    let linear_end = unsafe { field::<u32>(skb, SKB_TAIL_OFFSET.load()) } as usize;
    let (protocol, at) = transport;
    let port = at.and_then(|at| {
        let from_head = network as usize + at as usize + DPORT_OFFSET;
        if from_head + size_of::<u16>() <= linear_end {
            read::<u16>(head + from_head)
        } else {
            None
        }
    });
    Some(node_allows(&src, protected, || (protocol, port)))
}

/// Bytes `at..at + 4` of a header, as they lie in the packet (a native-endian load of them).
#[inline(always)]
fn word(header: &[u8; 20], at: usize) -> u32 {
    u32::from_ne_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
}

/// The `T` at byte `offset` of the kernel object at `base`.
///
/// # Safety
/// `base` must be a pointer the verifier types as a kernel struct with a `T`-sized field at
/// `offset` (it refuses the program otherwise).
#[inline(always)]
unsafe fn field<T>(base: *const u8, offset: u32) -> T {
    // SAFETY: the caller's promise; the verifier checks it against BTF at load time.
    unsafe { core::ptr::read_volatile(base.add(offset as usize).cast::<T>()) }
}

/// A `T` read from kernel address `addr` (packet bytes, which the verifier cannot type);
/// `bpf_probe_read_kernel` fails cleanly on a bad address.
#[inline(always)]
fn read<T>(addr: usize) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel accepts any address: a bad one is an error, not a fault.
    unsafe { bpf_probe_read_kernel(addr as *const T) }.ok()
}

// ---- tc ingress ------------------------------------------------------------------------------

#[classifier]
#[allow(clippy::unnecessary_cast, reason = "TC_ACT_SHOT is an i32 in the BPF target's bindings, a u32 in the host's")]
pub fn imds_node_tc(ctx: TcContext) -> i32 {
    if tc_packet_allowed(&ctx) {
        // Not OK: that would end the interface's filter chain and skip whatever the CNI has
        // attached after us. UNSPEC hands the packet on.
        TC_ACT_UNSPEC
    } else {
        count(Counter::NodeDrop, TC_ACT_SHOT as i32)
    }
}

/// `skb->protocol` of a VLAN tag (802.1Q and 802.1ad), network order in the low 16 bits.
const ETH_P_8021Q_BE: u32 = 0x8100u16.to_be() as u32;
const ETH_P_8021AD_BE: u32 = 0x88a8u16.to_be() as u32;

#[inline(always)]
fn tc_packet_allowed(ctx: &TcContext) -> bool {
    // The kernel takes one VLAN tag off before tc runs. A priority tag (VLAN 0) under it is
    // taken off after tc, and the packet then reaches IP as if it had none: look through up
    // to two more tags. Deeper nesting has no use on these interfaces and is dropped.
    let (mut proto, mut offset) = (ctx.skb.protocol(), 0u32);
    let mut tags = 0;
    while tags < 2 && (proto == ETH_P_8021Q_BE || proto == ETH_P_8021AD_BE) {
        // A tag: the TCI, then the ethertype of what it carries.
        let Some([_tci, inner]) = load_net::<[u16; 2]>(ctx, offset) else {
            return true; // too short to carry anything the stack would deliver
        };
        (proto, offset, tags) = (u32::from(inner), offset + 4, tags + 1);
    }
    let port = |at: Option<u32>| at.and_then(|at| load_net::<u16>(ctx, offset + at + DPORT_OFFSET as u32));
    match proto {
        ETH_P_IP_BE => match load_net::<[u8; 20]>(ctx, offset) {
            Some(header) => {
                let (src, dst) = (word(&header, IPV4_SADDR_OFFSET), word(&header, IPV4_DADDR_OFFSET));
                node_allows(&PodAddr::v4(src), protected_entry(dst), || {
                    let (protocol, at) = ipv4_transport(&header);
                    (protocol, port(at))
                })
            }
            // Too short to hold a header: the stack drops it as a bad one.
            None => true,
        },
        ETH_P_IPV6_BE => match load_net::<[u32; 8]>(ctx, offset + IPV6_SADDR_OFFSET as u32) {
            Some(a) => {
                node_allows(&ipv6_source([a[0], a[1], a[2], a[3]]), protected_v6([a[4], a[5], a[6], a[7]]), || {
                    let next = load_net::<u8>(ctx, offset + IPV6_NEXT_HEADER_OFFSET as u32).map_or(0, u32::from);
                    (next, port(has_ports(next).then_some(IPV6_HEADER_LEN)))
                })
            }
            None => true,
        },
        ETH_P_8021Q_BE | ETH_P_8021AD_BE => false,
        _ => true,
    }
}

/// A `T` at `offset` from the packet's network header (past the link layer, whatever it is).
#[inline(always)]
fn load_net<T>(ctx: &TcContext, offset: u32) -> Option<T> {
    let mut value = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: writes at most `size_of::<T>()` bytes into `value`; it is read only on success.
    let ret = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.skb.skb.cast(),
            offset,
            value.as_mut_ptr().cast(),
            size_of::<T>() as u32,
            BPF_HDR_START_NET,
        )
    };
    // SAFETY: the helper filled all of it.
    (ret == 0).then(|| unsafe { value.assume_init() })
}

/// The source of an IPv6 packet as `PASS_SOURCES` may know it. A v4-mapped source on the
/// wire is nobody's: it must not pass for the IPv4 pod whose entry has the same bytes.
#[inline(always)]
fn ipv6_source(words: [u32; 4]) -> PodAddr {
    if words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD2 {
        PodAddr { words: [u32::MAX; 4] } // ff…ff is multicast: never a pod's
    } else {
        PodAddr { words }
    }
}
