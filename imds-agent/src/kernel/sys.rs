//! The few `bpf()` commands aya 0.14 does not expose: replacing the program behind a link
//! atomically, force-detaching a link, reading a link's target, listing the programs attached
//! to a cgroup, loading and linking a netfilter program (a type aya cannot load), and taking
//! an element out of a hash map in one step.
//!
//! Each attr struct below is the prefix of the matching anonymous struct in
//! `union bpf_attr` (include/uapi/linux/bpf.h); the kernel zero-extends a shorter attr.
use std::{
    ffi::{CStr, CString},
    io,
    mem::size_of,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya::Pod;
use aya_obj::generated::{bpf_attach_type, bpf_cmd, bpf_insn};

/// `attr.obj_get` (`BPF_OBJ_GET`).
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `attr.obj_pin` (`BPF_OBJ_PIN`): the same layout as `obj_get`.
type ObjPinAttr = ObjGetAttr;

/// `attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`.
#[repr(C)]
struct ProgLoadAttr {
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

/// `attr.link_create` (`BPF_LINK_CREATE`) with its `netfilter` member.
#[repr(C)]
struct NetfilterLinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    pf: u32,
    hooknum: u32,
    priority: i32,
    netfilter_flags: u32,
}

/// `attr.link_update` (`BPF_LINK_UPDATE`).
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// `attr.link_detach` (`BPF_LINK_DETACH`).
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// `attr.info` (`BPF_OBJ_GET_INFO_BY_FD`).
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Prefix of `struct bpf_link_info` up to the cgroup member of its union.
#[repr(C)]
#[derive(Default)]
struct CgroupLinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _pad2: u32,
}

/// Prefix of `struct bpf_link_info` up to the netfilter member of its union.
#[repr(C)]
#[derive(Default)]
struct NetfilterLinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    pf: u32,
    hooknum: u32,
    priority: i32,
    flags: u32,
}

/// `attr.query` (`BPF_PROG_QUERY`), up to `prog_cnt`.
#[repr(C)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// `attr` for the map element commands (here `BPF_MAP_LOOKUP_AND_DELETE_ELEM`).
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    /// The kernel aligns `key` to 8 bytes; spelt out so that the gap is zero.
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `BPF_LINK_TYPE_CGROUP`.
const LINK_TYPE_CGROUP: u32 = 3;
/// `BPF_LINK_TYPE_NETFILTER`.
const LINK_TYPE_NETFILTER: u32 = 10;
/// `BPF_PROG_TYPE_NETFILTER` and its one attach type, `BPF_NETFILTER` (Linux ≥ 6.4).
pub(super) const PROG_TYPE_NETFILTER: u32 = 32;
const ATTACH_NETFILTER: u32 = 45;

/// Issues one `bpf()` command; returns the kernel's non-negative result.
fn bpf<T>(cmd: bpf_cmd, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, properly sized `#[repr(C)]` prefix of `union bpf_attr` for
    // `cmd`; any pointers inside it point at buffers that outlive the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_long, std::ptr::from_mut(attr), size_of::<T>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens a pinned bpf object (here: a link).
pub(super) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = c_path(path)?;
    let mut attr = ObjGetAttr { pathname: c_path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    let fd = bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?;
    new_fd(fd)
}

/// Pins a bpf object (here: a link) at `path`, which must not exist yet.
pub(super) fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c_path = c_path(path)?;
    let mut attr = ObjPinAttr { pathname: c_path.as_ptr() as u64, bpf_fd: raw(fd), file_flags: 0 };
    bpf(bpf_cmd::BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Looks `key` up in the map `map` and deletes it in the same step, so that no one else can
/// also find it: `Ok(None)` when it is not there. Hash maps take the command on Linux ≥ 5.14;
/// earlier kernels answer `EINVAL` (or `ENOTSUPP`).
pub(super) fn map_lookup_and_delete<K: Pod, V: Pod + Default>(map: BorrowedFd<'_>, key: &K) -> io::Result<Option<V>> {
    let mut value = V::default();
    let mut attr = MapElemAttr {
        map_fd: raw(map),
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_mut(&mut value) as u64,
        flags: 0,
    };
    match bpf(bpf_cmd::BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) {
        Ok(_) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Takes ownership of a file descriptor a `bpf()` command just returned.
fn new_fd(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: on success these commands return a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Loads a program of a type aya cannot load. `log`, when given, receives the verifier's
/// log (level 1) if the load fails.
pub(super) fn prog_load(
    prog_type: u32,
    name: &str,
    insns: &[bpf_insn],
    license: &CStr,
    log: Option<&mut [u8]>,
) -> io::Result<OwnedFd> {
    let mut prog_name = [0u8; 16];
    for (slot, byte) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *slot = byte;
    }
    let (log_level, log_size, log_buf) = match log {
        Some(buf) => (1, u32::try_from(buf.len()).unwrap_or(u32::MAX), buf.as_mut_ptr() as u64),
        None => (0, 0, 0),
    };
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: u32::try_from(insns.len()).map_err(io::Error::other)?,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level,
        log_size,
        log_buf,
        kern_version: 0,
        prog_flags: 0,
        prog_name,
        prog_ifindex: 0,
        expected_attach_type: if prog_type == PROG_TYPE_NETFILTER { ATTACH_NETFILTER } else { 0 },
    };
    let fd = bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)?;
    new_fd(fd)
}

/// Attaches a netfilter program to hook `hooknum` of protocol family `pf` in the caller's
/// network namespace, at `priority`.
pub(super) fn netfilter_link_create(prog: BorrowedFd<'_>, pf: u32, hooknum: u32, priority: i32) -> io::Result<OwnedFd> {
    let mut attr = NetfilterLinkCreateAttr {
        prog_fd: raw(prog),
        target_fd: 0,
        attach_type: ATTACH_NETFILTER,
        flags: 0,
        pf,
        hooknum,
        priority,
        netfilter_flags: 0,
    };
    let fd = bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)?;
    new_fd(fd)
}

fn raw(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).expect("file descriptors are never negative")
}

/// Atomically makes `link` run `new_prog` instead of its current program: no moment with
/// neither, never both.
pub(super) fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr { link_fd: raw(link), new_prog_fd: raw(new_prog), flags: 0, old_prog_fd: 0 };
    bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Detaches `link` from its target now, even if other processes hold it open.
pub(super) fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr { link_fd: raw(link) };
    bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr).map(drop)
}

/// Where a cgroup link is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct CgroupLinkTarget {
    pub link_id: u32,
    pub prog_id: u32,
    /// 0 once the link has been detached.
    pub cgroup_id: u64,
    pub attach_type: bpf_attach_type,
}

/// `BPF_OBJ_GET_INFO_BY_FD` of a link, into a prefix `T` of `struct bpf_link_info`.
fn link_info<T: Default>(link: BorrowedFd<'_>) -> io::Result<T> {
    let mut info = T::default();
    let mut attr = InfoAttr {
        bpf_fd: raw(link),
        info_len: u32::try_from(size_of::<T>()).map_err(io::Error::other)?,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// Where a netfilter link is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct NetfilterLinkTarget {
    pub link_id: u32,
    pub prog_id: u32,
    pub pf: u32,
    pub hooknum: u32,
    pub priority: i32,
}

/// The hook a netfilter link is attached to; `None` if it is not a netfilter link. A link
/// detached underneath its pin still reports its hook.
pub(super) fn netfilter_link_target(link: BorrowedFd<'_>) -> io::Result<Option<NetfilterLinkTarget>> {
    let info: NetfilterLinkInfo = link_info(link)?;
    Ok((info.type_ == LINK_TYPE_NETFILTER).then_some(NetfilterLinkTarget {
        link_id: info.id,
        prog_id: info.prog_id,
        pf: info.pf,
        hooknum: info.hooknum,
        priority: info.priority,
    }))
}

/// The cgroup and hook a link is attached to; `None` if it is not a cgroup link.
pub(super) fn cgroup_link_target(link: BorrowedFd<'_>) -> io::Result<Option<CgroupLinkTarget>> {
    let info: CgroupLinkInfo = link_info(link)?;
    if info.type_ != LINK_TYPE_CGROUP {
        return Ok(None);
    }
    let attach_type = attach_type_from_raw(info.attach_type)
        .ok_or_else(|| io::Error::other(format!("unknown attach type {}", info.attach_type)))?;
    Ok(Some(CgroupLinkTarget { link_id: info.id, prog_id: info.prog_id, cgroup_id: info.cgroup_id, attach_type }))
}

/// Ids of the programs attached directly to `cgroup` at `attach_type` (not inherited ones).
pub(super) fn attached_prog_ids(cgroup: BorrowedFd<'_>, attach_type: bpf_attach_type) -> io::Result<Vec<u32>> {
    let mut ids = vec![0u32; 16];
    loop {
        let mut attr = QueryAttr {
            target_fd: raw(cgroup),
            attach_type: attach_type as u32,
            query_flags: 0,
            attach_flags: 0,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: u32::try_from(ids.len()).unwrap_or(u32::MAX),
            _pad: 0,
        };
        match bpf(bpf_cmd::BPF_PROG_QUERY, &mut attr) {
            Ok(_) => {
                ids.truncate(attr.prog_cnt as usize);
                return Ok(ids);
            }
            // The buffer was too small; the kernel wrote the real count.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => ids.resize(attr.prog_cnt as usize, 0),
            Err(e) => return Err(e),
        }
    }
}

fn attach_type_from_raw(raw: u32) -> Option<bpf_attach_type> {
    super::Hook::ALL.into_iter().map(super::Hook::attach_type).find(|t| *t as u32 == raw)
}
