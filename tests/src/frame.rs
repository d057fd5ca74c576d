//! Hand-made link-layer frames sent through an `AF_PACKET` socket: what a pod holding
//! `NET_RAW` can put on its interface without any socket-layer hook (connect, the cgroup
//! egress backstop) seeing it. Only the node backstop stands in their way.
use std::{
    io,
    net::IpAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};

/// What the frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
pub enum Carrying {
    /// A TCP SYN: a listener at the destination answers with a SYN-ACK.
    TcpSyn,
    /// A UDP datagram (payload `probe\n`).
    Udp,
}

/// One frame from this namespace's interface `iface` to `dst`, through the gateway at MAC
/// `gateway_mac`, from `src` (the interface's own address).
#[derive(Clone, Debug)]
pub struct Frame {
    pub iface: String,
    pub gateway_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub carrying: Carrying,
    /// 802.1Q tags with VLAN 0 (priority tags) before the IP header; the kernel strips them.
    pub vlan_tags: u8,
}

impl Frame {
    /// Sends the frame, then waits up to `wait` for a SYN-ACK from `dst:dport` to `sport`
    /// (always `false` for UDP: nothing answers a datagram).
    pub fn send(&self, wait: Duration) -> io::Result<bool> {
        let ifindex = nix::net::if_::if_nametoindex(self.iface.as_str())?;
        let own_mac = mac_of(&self.iface)?;
        // SAFETY: plain socket(2); ownership taken right away.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from((libc::ETH_P_ALL as u16).to_be())) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        addr.sll_ifindex = i32::try_from(ifindex).map_err(io::Error::other)?;
        let len = u32::try_from(size_of::<libc::sockaddr_ll>()).map_err(io::Error::other)?;
        // SAFETY: `addr` is a valid sockaddr_ll of `len` bytes.
        if unsafe { libc::bind(sock.as_raw_fd(), std::ptr::from_ref(&addr).cast(), len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let bytes = self.bytes(own_mac)?;
        // SAFETY: sending our own buffer on a bound packet socket.
        if unsafe { libc::send(sock.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        if self.carrying == Carrying::Udp {
            return Ok(false);
        }
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 2048];
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: libc::suseconds_t::try_from(left.as_micros().clamp(1, 999_999)).unwrap_or(999_999),
            };
            // SAFETY: a timeval of the right size for SO_RCVTIMEO.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    std::ptr::from_ref(&timeout).cast(),
                    u32::try_from(size_of::<libc::timeval>()).unwrap_or(16),
                )
            };
            // SAFETY: reading into our own buffer.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if let Ok(n) = usize::try_from(n) {
                if self.is_syn_ack(&buf[..n]) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    fn bytes(&self, own_mac: [u8; 6]) -> io::Result<Vec<u8>> {
        let link = PacketBuilder::ethernet2(own_mac, self.gateway_mac);
        let mut out = Vec::new();
        let payload: &[u8] = if self.carrying == Carrying::Udp { b"probe\n" } else { b"" };
        let written = match (self.src, self.dst, self.carrying) {
            (IpAddr::V4(s), IpAddr::V4(d), Carrying::TcpSyn) => link
                .ipv4(s.octets(), d.octets(), 64)
                .tcp(self.sport, self.dport, 0x1d5e_ed00, 64240)
                .syn()
                .write(&mut out, payload),
            (IpAddr::V4(s), IpAddr::V4(d), Carrying::Udp) => {
                link.ipv4(s.octets(), d.octets(), 64).udp(self.sport, self.dport).write(&mut out, payload)
            }
            (IpAddr::V6(s), IpAddr::V6(d), Carrying::TcpSyn) => link
                .ipv6(s.octets(), d.octets(), 64)
                .tcp(self.sport, self.dport, 0x1d5e_ed00, 64240)
                .syn()
                .write(&mut out, payload),
            (IpAddr::V6(s), IpAddr::V6(d), Carrying::Udp) => {
                link.ipv6(s.octets(), d.octets(), 64).udp(self.sport, self.dport).write(&mut out, payload)
            }
            _ => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "source and destination of different families"))
            }
        };
        written.map_err(io::Error::other)?;
        // Each tag goes between the addresses and the ethertype: TPID 0x8100, TCI 0.
        for _ in 0..self.vlan_tags {
            out.splice(12..12, [0x81, 0x00, 0x00, 0x00]);
        }
        Ok(out)
    }

    /// Whether `frame` is the SYN-ACK answering ours.
    fn is_syn_ack(&self, frame: &[u8]) -> bool {
        let Ok(packet) = SlicedPacket::from_ethernet(frame) else {
            return false;
        };
        let from: Option<IpAddr> = match &packet.net {
            Some(NetSlice::Ipv4(ip)) => Some(IpAddr::from(ip.header().source())),
            Some(NetSlice::Ipv6(ip)) => Some(IpAddr::from(ip.header().source())),
            _ => None,
        };
        let syn_ack = match &packet.transport {
            Some(TransportSlice::Tcp(tcp)) => {
                tcp.syn() && tcp.ack() && tcp.source_port() == self.dport && tcp.destination_port() == self.sport
            }
            _ => false,
        };
        from == Some(self.dst) && syn_ack
    }
}

/// The hardware address of `iface` in this namespace.
fn mac_of(iface: &str) -> io::Result<[u8; 6]> {
    nix::ifaddrs::getifaddrs()?
        .filter(|a| a.interface_name == iface)
        .find_map(|a| a.address.and_then(|s| s.as_link_addr().and_then(nix::sys::socket::LinkAddr::addr)))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no hardware address for {iface}")))
}

/// `aa:bb:cc:dd:ee:ff` as bytes.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_built_with_their_addresses_and_read_back() {
        let frame = Frame {
            iface: "eth0".into(),
            gateway_mac: parse_mac("02:00:00:00:00:01").unwrap(),
            src: "10.0.0.2".parse().unwrap(),
            dst: "169.254.169.254".parse().unwrap(),
            sport: 40000,
            dport: 80,
            carrying: Carrying::TcpSyn,
            vlan_tags: 0,
        };
        let bytes = frame.bytes([2, 0, 0, 0, 0, 2]).unwrap();
        assert_eq!(&bytes[..6], &[2, 0, 0, 0, 0, 1]);
        // Our own frame is not an answer; the same frame from the other side with SYN+ACK is.
        assert!(!frame.is_syn_ack(&bytes));
        let reply = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([169, 254, 169, 254], [10, 0, 0, 2], 64)
            .tcp(80, 40000, 1, 64240)
            .syn()
            .ack(0x1d5e_ed01);
        let mut answer = Vec::new();
        reply.write(&mut answer, &[]).unwrap();
        assert!(frame.is_syn_ack(&answer));
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        let tagged = Frame { vlan_tags: 2, ..frame }.bytes([2, 0, 0, 0, 0, 2]).unwrap();
        assert_eq!(&tagged[12..22], &[0x81, 0, 0, 0, 0x81, 0, 0, 0, 0x08, 0x00]);
    }
}
