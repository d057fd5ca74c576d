//! Someone else's `cgroup/connect4` program, as another node component would attach one
//! (Cilium's socket load balancer, say): a few hand-assembled instructions, loaded with a
//! name and attached (multi) to a cgroup the test made, detached when dropped. It can let
//! every `connect()` through untouched, or rewrite one address to another, as a socket-level
//! load balancer translates a Service address to a backend.
use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsFd as _, OwnedFd},
};

use crate::{
    bpf::{self, insn, load, returning, BPF_CGROUP_INET4_CONNECT, BPF_PROG_TYPE_CGROUP_SOCK_ADDR},
    sandbox::Cgroup,
};

/// Offset of `user_ip4` in `struct bpf_sock_addr`.
const USER_IP4: i16 = 4;

/// An address as `user_ip4` holds it (network order), read as the register sees it.
fn word(ip: Ipv4Addr) -> i32 {
    i32::from_ne_bytes(ip.octets())
}

/// A `cgroup/connect4` program attached to a cgroup; detached on drop.
pub struct ForeignConnect4 {
    prog: OwnedFd,
    cgroup: std::fs::File,
}

impl ForeignConnect4 {
    /// Loads a program named `name` (the kernel keeps 15 bytes) that rewrites connections to
    /// `from` into connections to `to` (same port), or lets everything through with `None`,
    /// and attaches it to `cgroup` alongside whatever is there.
    pub fn attach(cgroup: &Cgroup, name: &str, rewrite: Option<(Ipv4Addr, Ipv4Addr)>) -> io::Result<ForeignConnect4> {
        let allow = returning(1);
        let insns: Vec<u64> = match rewrite {
            None => allow.to_vec(),
            Some((from, to)) => [
                insn(0x61, 2, 1, USER_IP4, 0),   // r2 = *(u32 *)(r1 + user_ip4)
                insn(0x55, 2, 0, 2, word(from)), // if r2 != from goto allow
                insn(0xb7, 2, 0, 0, word(to)),   // r2 = to
                insn(0x63, 1, 2, USER_IP4, 0),   // *(u32 *)(r1 + user_ip4) = r2
            ]
            .into_iter()
            .chain(allow)
            .collect(),
        };
        let prog = load(BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_CONNECT, name, &insns)?;
        let cgroup = std::fs::File::open(&cgroup.path)?;
        bpf::attach(cgroup.as_fd(), prog.as_fd(), BPF_CGROUP_INET4_CONNECT)?;
        Ok(ForeignConnect4 { prog, cgroup })
    }
}

impl Drop for ForeignConnect4 {
    fn drop(&mut self) {
        // The cgroup goes with the test anyway.
        let _ = bpf::detach(self.cgroup.as_fd(), self.prog.as_fd(), BPF_CGROUP_INET4_CONNECT);
    }
}
