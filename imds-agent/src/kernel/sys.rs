//! The few `bpf()` commands aya 0.14 does not expose for cgroup programs: replacing the
//! program behind a link atomically, force-detaching a link, reading a link's target, and
//! listing the programs attached to a cgroup.
//!
//! Each attr struct below is the prefix of the matching anonymous struct in
//! `union bpf_attr` (include/uapi/linux/bpf.h); the kernel zero-extends a shorter attr.
use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya_obj::generated::{bpf_attach_type, bpf_cmd};

/// `attr.obj_get` (`BPF_OBJ_GET`).
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
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

/// `BPF_LINK_TYPE_CGROUP`.
const LINK_TYPE_CGROUP: u32 = 3;

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
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut attr = ObjGetAttr { pathname: c_path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    let fd = bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: on success BPF_OBJ_GET returns a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn raw(fd: BorrowedFd<'_>) -> u32 {
    u32::try_from(fd.as_raw_fd()).expect("file descriptors are never negative")
}

/// Atomically makes `link` run `new_prog` instead of its current program: no moment with
/// neither, never both.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr { link_fd: raw(link), new_prog_fd: raw(new_prog), flags: 0, old_prog_fd: 0 };
    bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Detaches `link` from its target now, even if other processes hold it open.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr { link_fd: raw(link) };
    bpf(bpf_cmd::BPF_LINK_DETACH, &mut attr).map(drop)
}

/// Where a cgroup link is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLinkTarget {
    pub link_id: u32,
    pub prog_id: u32,
    /// 0 once the link has been detached.
    pub cgroup_id: u64,
    pub attach_type: bpf_attach_type,
}

/// The cgroup and hook a link is attached to; `None` if it is not a cgroup link.
pub fn cgroup_link_target(link: BorrowedFd<'_>) -> io::Result<Option<CgroupLinkTarget>> {
    let mut info = CgroupLinkInfo::default();
    let mut attr = InfoAttr {
        bpf_fd: raw(link),
        info_len: size_of::<CgroupLinkInfo>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    if info.type_ != LINK_TYPE_CGROUP {
        return Ok(None);
    }
    let attach_type = attach_type_from_raw(info.attach_type)
        .ok_or_else(|| io::Error::other(format!("unknown attach type {}", info.attach_type)))?;
    Ok(Some(CgroupLinkTarget { link_id: info.id, prog_id: info.prog_id, cgroup_id: info.cgroup_id, attach_type }))
}

/// Ids of the programs attached directly to `cgroup` at `attach_type` (not inherited ones).
pub fn attached_prog_ids(cgroup: BorrowedFd<'_>, attach_type: bpf_attach_type) -> io::Result<Vec<u32>> {
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
