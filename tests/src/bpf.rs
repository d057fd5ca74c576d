//! The few `bpf(2)` commands test tooling issues itself, below what aya offers: loading a
//! hand-assembled program, and running a loaded program on a packet the caller gives
//! (`BPF_PROG_TEST_RUN`, which aya has no handle for on programs it did not load).
use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// `BPF_F_ALLOW_MULTI`: attach beside the programs already there.
const BPF_F_ALLOW_MULTI: u32 = 2;

pub const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
pub const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
pub const BPF_PROG_TYPE_NETFILTER: u32 = 32;
pub const BPF_CGROUP_INET_EGRESS: u32 = 1;
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_NETFILTER: u32 = 45;

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

/// `attr` for `BPF_PROG_TEST_RUN`, up to `ctx_out`.
#[repr(C)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
}

/// One instruction: opcode, registers (`dst` low nibble, `src` high), offset, immediate.
#[must_use]
pub fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | u64::from(dst | (src << 4)) << 8
        | u64::from(off.cast_unsigned()) << 16
        | u64::from(imm.cast_unsigned()) << 32
}

/// `r0 = value; exit`: a program that only returns.
#[must_use]
pub fn returning(value: i32) -> [u64; 2] {
    [insn(0xb7, 0, 0, 0, value), insn(0x95, 0, 0, 0, 0)]
}

/// Issues `cmd` with `attr`: private, because an `attr` names memory the kernel reads and
/// writes, which only the functions below build right.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i32> {
    // SAFETY: every caller passes a live `#[repr(C)]` prefix of `union bpf_attr` for `cmd`
    // whose pointers name memory that outlives the call; the kernel reads (and for some
    // commands writes) only that much.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    i32::try_from(ret).ok().filter(|r| *r >= 0).ok_or_else(io::Error::last_os_error)
}

/// Attaches `prog` to the cgroup `cgroup` at `attach_type`, beside what is there.
///
/// # Errors
/// What the kernel said.
pub fn attach(cgroup: BorrowedFd<'_>, prog: BorrowedFd<'_>, attach_type: u32) -> io::Result<()> {
    let mut attr = ProgAttach {
        target_fd: cgroup.as_raw_fd().cast_unsigned(),
        attach_bpf_fd: prog.as_raw_fd().cast_unsigned(),
        attach_type,
        attach_flags: BPF_F_ALLOW_MULTI,
    };
    bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
}

/// Detaches `prog` from the cgroup `cgroup` at `attach_type`.
///
/// # Errors
/// What the kernel said.
pub fn detach(cgroup: BorrowedFd<'_>, prog: BorrowedFd<'_>, attach_type: u32) -> io::Result<()> {
    // Detaching takes no flags.
    let mut attr = ProgAttach {
        target_fd: cgroup.as_raw_fd().cast_unsigned(),
        attach_bpf_fd: prog.as_raw_fd().cast_unsigned(),
        attach_type,
        attach_flags: 0,
    };
    bpf(BPF_PROG_DETACH, &mut attr).map(drop)
}

/// Loads `insns` as a program of `prog_type` for `attach_type`, named `name` (the kernel
/// keeps 15 bytes).
///
/// # Errors
/// The verifier's refusal, or a kernel without the program type.
pub fn load(prog_type: u32, attach_type: u32, name: &str, insns: &[u64]) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    for (slot, byte) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte;
    }
    let mut attr = ProgLoad {
        prog_type,
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
        expected_attach_type: attach_type,
    };
    let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
    // SAFETY: the kernel just returned this descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Runs `prog` on `packet` `repeat` times in a row: what it returned, and the mean time of a
/// run in nanoseconds as the kernel timed the loop.
///
/// # Errors
/// A program type the kernel cannot test-run, or a packet it refuses.
pub fn test_run(prog: BorrowedFd<'_>, packet: &[u8], repeat: u32) -> io::Result<(u32, u32)> {
    let mut attr = TestRun {
        prog_fd: prog.as_raw_fd().cast_unsigned(),
        retval: 0,
        data_size_in: u32::try_from(packet.len()).expect("a small packet"),
        data_size_out: 0,
        data_in: packet.as_ptr() as u64,
        data_out: 0,
        repeat,
        duration: 0,
        ctx_size_in: 0,
        ctx_size_out: 0,
        ctx_in: 0,
        ctx_out: 0,
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok((attr.retval, attr.duration))
}
