//! P8e, P8f: what the per-packet programs cost a packet that has nothing to do with the
//! metadata service, by themselves.
//!
//! The kernel runs a loaded program on a packet the caller gives, as many times in a row as
//! asked, and times the loop (`BPF_PROG_TEST_RUN`): no scheduler, no other traffic, no
//! per-run statistics in the way. The baseline is a program of the same type that only
//! returns, run the same way: what running any program at that hook costs. The difference is
//! what our program's own instructions cost. The packet's destination is one the protected
//! set's summary rules out, as nearly every destination is; the few others (about one in 64)
//! go on to a map lookup, which this does not time.
use std::{fmt::Write as _, os::fd::AsFd as _};

use super::{interleaved, Effort, Figure, Measured};
use crate::bpf::{self, BPF_CGROUP_INET_EGRESS, BPF_NETFILTER, BPF_PROG_TYPE_CGROUP_SKB, BPF_PROG_TYPE_NETFILTER};

/// What a program may add to an unrelated packet over one that only returns.
const TARGET_NS: f64 = 30.0;

/// A per-packet program of the filter, by where it runs.
#[derive(Clone, Copy, Debug)]
pub enum PacketProgram {
    /// `imds_egress`, on every packet a socket in the hierarchy sends.
    Egress,
    /// `imds_node_nf`, on every packet entering the node's namespace (netfilter).
    NodeNetfilter,
}

impl PacketProgram {
    fn figure(self) -> Figure {
        let (id, what) = match self {
            PacketProgram::Egress => ("P8e", "cgroup_skb egress backstop, one unrelated packet, by itself"),
            PacketProgram::NodeNetfilter => ("P8f", "node backstop (netfilter), one unrelated packet, by itself"),
        };
        Figure::new(id, what, "ns", "≤ 30 ns over the baseline")
    }

    fn kind(self) -> (u32, u32, &'static str) {
        match self {
            PacketProgram::Egress => {
                (BPF_PROG_TYPE_CGROUP_SKB, BPF_CGROUP_INET_EGRESS, "a cgroup_skb program that only returns")
            }
            PacketProgram::NodeNetfilter => {
                (BPF_PROG_TYPE_NETFILTER, BPF_NETFILTER, "a netfilter program that only returns")
            }
        }
    }

    /// The packet as the test run wants it: a `cgroup_skb` run takes a link-layer frame (the
    /// kernel strips the header, as the stack has by then), a netfilter run at its default
    /// hook (`LOCAL_OUT`) the IP packet.
    fn packet(self) -> Vec<u8> {
        let ip = unrelated_tcp_syn();
        match self {
            PacketProgram::Egress => {
                let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
                frame.extend_from_slice(&ip);
                frame
            }
            PacketProgram::NodeNetfilter => ip.to_vec(),
        }
    }
}

/// A netfilter program that only makes one `bpf_probe_read_kernel` call (4 bytes of its own
/// stack) and returns: what the one call a netfilter program needs to read packet bytes costs,
/// against [`bpf::returning`]. Netfilter programs have no direct packet access.
fn one_probe_read() -> [u64; 8] {
    use bpf::insn;
    [
        insn(0xbf, 1, 10, 0, 0),  // r1 = r10
        insn(0x07, 1, 0, 0, -8),  // r1 += -8: where to
        insn(0xb7, 2, 0, 0, 4),   // r2 = 4: how much
        insn(0xbf, 3, 10, 0, 0),  // r3 = r10
        insn(0x07, 3, 0, 0, -16), // r3 += -16: from where
        insn(0x85, 0, 0, 0, 113), // call bpf_probe_read_kernel
        insn(0xb7, 0, 0, 0, 1),   // r0 = 1 (NF_ACCEPT)
        insn(0x95, 0, 0, 0, 0),   // exit
    ]
}

/// A TCP SYN from a pod (10.235.1.2) to a peer (10.236.1.2:5001): nothing protected.
fn unrelated_tcp_syn() -> [u8; 40] {
    let mut p = [0u8; 40];
    p[..20].copy_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 235, 1, 2, 10, 236, 1, 2]);
    p[20..24].copy_from_slice(&[0x9c, 0x40, 0x13, 0x89]); // ports 40000 → 5001
    p[32] = 5 << 4; // data offset: 5 words
    p[33] = 0x02; // SYN
    p
}

/// One figure per program (`id`: the loaded program's id; `None`: not in place here, which
/// the figure says), with the baseline beside it.
///
/// # Panics
/// When a program cannot be test-run: the harness must not report a figure it did not take.
pub fn costs(programs: &[(PacketProgram, Option<u32>)], effort: Effort) -> Vec<Figure> {
    let repeat = if effort.rounds > 2 { 2_000_000 } else { 100_000 };
    programs
        .iter()
        .map(|&(program, id)| {
            let Some(id) = id else {
                return program.figure().noted("the program is not in place on this machine");
            };
            let ours = aya::programs::loaded_programs()
                .filter_map(Result::ok)
                .find(|p| p.id() == id)
                .and_then(|p| p.fd().ok())
                .unwrap_or_else(|| panic!("program {id} ({program:?}) is loaded"));
            let (prog_type, attach_type, baseline_what) = program.kind();
            let empty = bpf::load(prog_type, attach_type, "bench_empty", &bpf::returning(1))
                .unwrap_or_else(|e| panic!("loading an empty {program:?} program: {e}"));
            let packet = program.packet();
            let [with, without] = interleaved::<2>(effort.rounds, |which| {
                let fd = if which == 0 { ours.as_fd() } else { empty.as_fd() };
                let (verdict, ns) = bpf::test_run(fd, &packet, repeat)
                    .unwrap_or_else(|e| panic!("test run of {program:?} (which {which}): {e}"));
                assert_eq!(verdict, 1, "{program:?} lets an unrelated packet through");
                f64::from(ns)
            });
            let figure =
                program.figure().measured(Measured::of(with), Some((baseline_what.to_owned(), Measured::of(without))));
            let added = figure.value.as_ref().zip(figure.baseline.as_ref()).map(|(v, b)| v.median - b.median);
            let figure = figure.judged(added.is_some_and(|a| a <= TARGET_NS));
            let mut note = format!(
                "{:.0} ns over the baseline, the mean of {repeat} runs in a row, median of the rounds",
                added.unwrap_or(f64::NAN)
            );
            if let PacketProgram::NodeNetfilter = program {
                let call = bpf::load(prog_type, attach_type, "bench_one_read", &one_probe_read())
                    .unwrap_or_else(|e| panic!("loading a netfilter program with one call: {e}"));
                let [call, empty] = interleaved::<2>(effort.rounds, |which| {
                    let fd = if which == 0 { call.as_fd() } else { empty.as_fd() };
                    f64::from(bpf::test_run(fd, &packet, repeat).expect("test run").1)
                });
                let call = Measured::of(call).median - Measured::of(empty).median;
                let _ = write!(
                    note,
                    "; one bpf_probe_read_kernel call by itself, in a netfilter program that does \
                     nothing else, costs {call:.0} ns over the empty one (netfilter programs have no \
                     direct packet access: reading the header takes such a call)"
                );
            }
            figure.noted(note)
        })
        .collect()
}
