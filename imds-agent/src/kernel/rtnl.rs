//! The little of rtnetlink the tc backstop needs: the interfaces of this network namespace,
//! notice when one appears, and whether one runs a tc filter of a given name at ingress.
//!
//! Messages are `struct nlmsghdr` followed by a family header (`ifinfomsg`, `tcmsg`) and
//! `rtattr`s (include/uapi/linux/{netlink,rtnetlink}.h); only the fields read are decoded.
use std::{io, os::fd::AsRawFd as _, os::fd::OwnedFd};

use nix::sys::socket::{
    bind, recv, send, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

const NLMSG_HDR_LEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
/// `RTMGRP_LINK`: the multicast group of link changes.
const RTMGRP_LINK: u32 = 1;
/// Offset of `ifi_index` in `struct ifinfomsg`.
const IFI_INDEX_OFFSET: usize = 4;
const TCMSG_LEN: usize = 20;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_NAME: u16 = 7;
/// `TC_H_CLSACT` parent with `TC_H_MIN_INGRESS`: the clsact qdisc's ingress hook.
const PARENT_INGRESS: u32 = 0xffff_fff2;
/// Strips `NLA_F_NESTED` / `NLA_F_NET_BYTEORDER` from an attribute type.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// What a link notification says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LinkEvent {
    /// An interface appeared or changed (renamed, brought up): its index.
    New(u32),
    /// An interface went away.
    Gone(u32),
}

/// A socket subscribed to this namespace's link changes.
pub(super) struct LinkEvents {
    fd: OwnedFd,
    buf: Vec<u8>,
}

impl LinkEvents {
    pub(super) fn subscribe() -> io::Result<LinkEvents> {
        let fd = route_socket()?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, RTMGRP_LINK))?;
        // Bursts of veth pairs (a node starting its pods) must not overflow it silently;
        // an overflow still shows as ENOBUFS, which the caller answers with a full rescan.
        setsockopt(&fd, sockopt::RcvBuf, &(1 << 20))?;
        Ok(LinkEvents { fd, buf: vec![0; 64 * 1024] })
    }

    /// Waits up to `wait` for the next batch of notifications (empty when none came). `Err`
    /// with `ENOBUFS` means some were lost.
    pub(super) fn next(&mut self, wait: std::time::Duration) -> io::Result<Vec<LinkEvent>> {
        setsockopt(
            &self.fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::from(libc::timeval {
                tv_sec: libc::time_t::try_from(wait.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_usec: libc::suseconds_t::from(wait.subsec_micros().min(999_999) as i32),
            }),
        )?;
        let n = match recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        Ok(messages(&self.buf[..n])
            .filter_map(|(kind, body)| {
                let index = u32::try_from(read_i32(body, IFI_INDEX_OFFSET)?).ok()?;
                match kind {
                    RTM_NEWLINK => Some(LinkEvent::New(index)),
                    RTM_DELLINK => Some(LinkEvent::Gone(index)),
                    _ => None,
                }
            })
            .collect())
    }
}

/// The interfaces of this network namespace: (index, name).
pub(super) fn interfaces() -> io::Result<Vec<(u32, String)>> {
    let list = nix::net::if_::if_nameindex()?;
    Ok(list.iter().map(|i| (i.index(), i.name().to_string_lossy().into_owned())).collect())
}

/// Whether interface `ifindex` runs a tc filter whose BPF program is called `name` at its
/// clsact ingress hook.
pub(super) fn has_ingress_filter(ifindex: u32, name: &str) -> io::Result<bool> {
    let fd = route_socket()?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    let mut request = Vec::with_capacity(NLMSG_HDR_LEN + TCMSG_LEN);
    let len = u32::try_from(NLMSG_HDR_LEN + TCMSG_LEN).unwrap_or(u32::MAX);
    request.extend_from_slice(&len.to_ne_bytes());
    request.extend_from_slice(&RTM_GETTFILTER.to_ne_bytes());
    request.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
    request.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    request.extend_from_slice(&[0u8; 4]); // tcm_family, padding
    request.extend_from_slice(&i32::try_from(ifindex).map_err(io::Error::other)?.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes()); // tcm_handle
    request.extend_from_slice(&PARENT_INGRESS.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes()); // tcm_info
    send(fd.as_raw_fd(), &request, MsgFlags::empty())?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut found = false;
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        for (kind, body) in messages(&buf[..n]) {
            match kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => match read_i32(body, 0) {
                    Some(0) => {}
                    // No clsact qdisc on the interface, or a kind of interface without
                    // qdiscs: no filter at all.
                    Some(e) if [libc::EINVAL, libc::ENOENT, libc::EOPNOTSUPP].contains(&-e) => return Ok(false),
                    Some(e) => return Err(io::Error::from_raw_os_error(-e)),
                    None => return Err(io::Error::other("truncated netlink error")),
                },
                RTM_NEWTFILTER => found |= filter_is_bpf_named(body, name),
                _ => {}
            }
        }
    }
}

fn route_socket() -> io::Result<OwnedFd> {
    Ok(socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)?)
}

/// The (type, body) of each netlink message in `buf`; stops at the first malformed one.
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = read_u32(buf, at)? as usize;
        if len < NLMSG_HDR_LEN {
            return None;
        }
        let kind = read_u16(buf, at + 4)?;
        let body = buf.get(at + NLMSG_HDR_LEN..at.checked_add(len)?)?;
        at += align4(len);
        Some((kind, body))
    })
}

/// Whether a `tcmsg` body describes a `bpf` filter running a program called `name`.
fn filter_is_bpf_named(body: &[u8], name: &str) -> bool {
    let attrs = body.get(TCMSG_LEN..).unwrap_or_default();
    let kind_is_bpf = attributes(attrs).any(|(t, v)| t == TCA_KIND && c_str(v) == Some("bpf"));
    kind_is_bpf
        && attributes(attrs)
            .filter(|(t, _)| *t == TCA_OPTIONS)
            .any(|(_, nested)| attributes(nested).any(|(t, v)| t == TCA_BPF_NAME && c_str(v) == Some(name)))
}

/// The (type, payload) of each `rtattr` in `buf`.
fn attributes(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = usize::from(read_u16(buf, at)?);
        let kind = read_u16(buf, at + 2)? & NLA_TYPE_MASK;
        if len < 4 {
            return None;
        }
        let payload = buf.get(at + 4..at + len)?;
        at += align4(len);
        Some((kind, payload))
    })
}

fn c_str(bytes: &[u8]) -> Option<&str> {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    std::str::from_utf8(&bytes[..end]).ok()
}

const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    let b = buf.get(at..at + 2)?;
    Some(u16::from_ne_bytes([b[0], b[1]]))
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at + 4)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

fn read_i32(buf: &[u8], at: usize) -> Option<i32> {
    read_u32(buf, at).map(|v| v as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&u16::try_from(4 + payload.len()).unwrap().to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(align4(out.len()), 0);
        out
    }

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&u32::try_from(NLMSG_HDR_LEN + body.len()).unwrap().to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(body);
        out.resize(align4(out.len()), 0);
        out
    }

    #[test]
    fn finds_a_bpf_filter_by_program_name() {
        let options = attr(TCA_OPTIONS | 0x8000, &attr(TCA_BPF_NAME, b"imds_node_tc\0"));
        let body = [vec![0u8; TCMSG_LEN], attr(TCA_KIND, b"bpf\0"), options.clone()].concat();
        assert!(filter_is_bpf_named(&body, "imds_node_tc"));
        assert!(!filter_is_bpf_named(&body, "imds_node"));
        let u32_filter = [vec![0u8; TCMSG_LEN], attr(TCA_KIND, b"u32\0"), options].concat();
        assert!(!filter_is_bpf_named(&u32_filter, "imds_node_tc"));
        assert!(!filter_is_bpf_named(&[0u8; 3], "imds_node_tc"));
    }

    #[test]
    fn splits_messages_and_reads_link_indexes() {
        let mut link = vec![0u8; 16]; // struct ifinfomsg
        link[IFI_INDEX_OFFSET..IFI_INDEX_OFFSET + 4].copy_from_slice(&7i32.to_ne_bytes());
        let buf = [message(RTM_NEWLINK, &link), message(RTM_DELLINK, &link), message(NLMSG_DONE, &[0; 4])].concat();
        let kinds: Vec<(u16, Option<i32>)> = messages(&buf).map(|(k, b)| (k, read_i32(b, 4))).collect();
        assert_eq!(kinds, [(RTM_NEWLINK, Some(7)), (RTM_DELLINK, Some(7)), (NLMSG_DONE, None)]);
        // A length running past the buffer ends the walk instead of panicking.
        let mut broken = message(RTM_NEWLINK, &link);
        broken[0] = 200;
        assert_eq!(messages(&broken).count(), 0);
    }
}
