//! Someone else's `cgroup/connect4` program, as another node component would attach one
//! (Cilium's socket load balancer, say): a few hand-assembled instructions, loaded with a
//! name and attached (multi) to a cgroup the test made, detached when dropped. It can let
//! every `connect()` through untouched, or rewrite one address to another, as a socket-level
//! load balancer translates a Service address to a backend.
use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use crate::sandbox::Cgroup;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_F_ALLOW_MULTI: u32 = 2;
/// Offset of `user_ip4` in `struct bpf_sock_addr`.
const USER_IP4: i16 = 4;

/// `attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `attr` for `BPF_PROG_ATTACH` and `BPF_PROG_DETACH`.
#[repr(C)]
struct ProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// One instruction: opcode, registers (`dst` low nibble, `src` high), offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | u64::from(dst | (src << 4)) << 8
        | u64::from(off.cast_unsigned()) << 16
        | u64::from(imm.cast_unsigned()) << 32
}

/// An address as `user_ip4` holds it (network order), read as the register sees it.
fn word(ip: Ipv4Addr) -> i32 {
    i32::from_ne_bytes(ip.octets())
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i32> {
    // SAFETY: `attr` is a live `#[repr(C)]` prefix of `union bpf_attr` for `cmd`, of the size
    // given; the kernel reads (and for some commands writes) only that much.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    i32::try_from(ret).ok().filter(|r| *r >= 0).ok_or_else(io::Error::last_os_error)
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
        let allow = [insn(0xb7, 0, 0, 0, 1), insn(0x95, 0, 0, 0, 0)]; // r0 = 1; exit
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
        let license = c"GPL";
        let mut prog_name = [0u8; 16];
        for (slot, byte) in prog_name.iter_mut().zip(name.bytes().take(15)) {
            *slot = byte;
        }
        let mut load = ProgLoad {
            prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            insn_cnt: u32::try_from(insns.len()).expect("a few instructions"),
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 0,
            log_size: 0,
            log_buf: 0,
            kern_version: 0,
            prog_flags: 0,
            prog_name,
            prog_ifindex: 0,
            expected_attach_type: BPF_CGROUP_INET4_CONNECT,
        };
        let fd = bpf(BPF_PROG_LOAD, &mut load)?;
        // SAFETY: the kernel just returned this descriptor, owned by nobody else.
        let prog = unsafe { OwnedFd::from_raw_fd(fd) };
        let cgroup = std::fs::File::open(&cgroup.path)?;
        bpf(BPF_PROG_ATTACH, &mut Self::attach_attr(&cgroup, &prog))?;
        Ok(ForeignConnect4 { prog, cgroup })
    }

    fn attach_attr(cgroup: &std::fs::File, prog: &OwnedFd) -> ProgAttach {
        ProgAttach {
            target_fd: cgroup.as_raw_fd().cast_unsigned(),
            attach_bpf_fd: prog.as_raw_fd().cast_unsigned(),
            attach_type: BPF_CGROUP_INET4_CONNECT,
            attach_flags: BPF_F_ALLOW_MULTI,
        }
    }
}

impl Drop for ForeignConnect4 {
    fn drop(&mut self) {
        // Detaching takes no flags; the cgroup goes with the test anyway.
        let attr = ProgAttach { attach_flags: 0, ..Self::attach_attr(&self.cgroup, &self.prog) };
        let _ = bpf(BPF_PROG_DETACH, &mut { attr });
    }
}
