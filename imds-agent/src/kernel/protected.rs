//! What the filter protects, as its maps hold it: the `PROTECTED` table (endpoints by
//! address) and the `NAT64` prefixes.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4},
};

use imds_common::{capacity, Nat64Prefix, ProtectedAddr};

use super::{FilterError, IMDS_ENDPOINT};

/// Groups endpoints by address, as the `PROTECTED` map stores them; `whole` addresses are
/// protected on every port and protocol besides.
pub fn group_endpoints(
    endpoints: &[SocketAddrV4],
    whole: &[Ipv4Addr],
) -> Result<BTreeMap<u32, ProtectedAddr>, FilterError> {
    if endpoints.is_empty() && whole.is_empty() {
        return Err(FilterError::NoProtectedEndpoints);
    }
    let mut grouped: BTreeMap<u32, ProtectedAddr> = BTreeMap::new();
    for addr in whole {
        grouped.entry(u32::from(*addr).to_be()).or_default().whole_address = 1;
    }
    for ep in endpoints {
        let entry = grouped.entry(u32::from(*ep.ip()).to_be()).or_default();
        let port_be = ep.port().to_be();
        if entry.has_port(port_be) {
            continue;
        }
        let slot = entry.ports_be.iter_mut().find(|p| **p == 0).ok_or(FilterError::TooManyPorts { addr: *ep.ip() })?;
        *slot = port_be;
    }
    Ok(grouped)
}

/// What an operator may not have meant by these endpoints and whole addresses: the metadata
/// address protected by port only (its other ports and UDP then reach pods' way), or an
/// address protected whole with no port to redirect (only exception pods reach it at all).
#[must_use]
pub fn protection_warnings(endpoints: &[SocketAddrV4], whole: &[Ipv4Addr]) -> Vec<String> {
    let imds = *IMDS_ENDPOINT.ip();
    let mut warnings = Vec::new();
    if endpoints.iter().any(|e| *e.ip() == imds) && !whole.contains(&imds) {
        warnings.push(format!(
            "{imds} is protected on its --protect ports only: other ports and UDP to it are open to pods \
             (naming --protect-address replaced the default; add --protect-address {imds} unless that is meant)"
        ));
    }
    for addr in whole.iter().filter(|a| !endpoints.iter().any(|e| e.ip() == *a)) {
        warnings.push(format!(
            "{addr} is protected whole with no --protect port: only exception pods reach it, nothing is \
             redirected to the agent (naming --protect replaced the default; add --protect {addr}:80 if that is meant)"
        ));
    }
    warnings
}

/// A `--nat64-prefix`: an IPv6 /96 prefix (`ADDR/96`, or `ADDR` with its last 32 bits zero).
pub fn parse_nat64_prefix(text: &str) -> Result<Ipv6Addr, String> {
    let (addr, len) = text.split_once('/').unwrap_or((text, "96"));
    if len != "96" {
        return Err(format!("{text}: only /96 NAT64 prefixes are supported (RFC 6052's common form)"));
    }
    let addr: Ipv6Addr = addr.parse().map_err(|e| format!("{text}: {e}"))?;
    if addr.segments()[6..] != [0, 0] {
        return Err(format!("{text}: a /96 prefix has its last 32 bits zero"));
    }
    Ok(addr)
}

/// The `NAT64` map's slots: the well-known prefix, then the operator's (duplicates dropped).
pub fn nat64_table(extra: &[Ipv6Addr]) -> Result<Vec<Nat64Prefix>, FilterError> {
    let mut table = vec![Nat64Prefix::WELL_KNOWN];
    for prefix in extra.iter().map(|p| Nat64Prefix::from_bytes(p.octets())) {
        if !table.contains(&prefix) {
            table.push(prefix);
        }
    }
    if table.len() > capacity::NAT64 as usize {
        return Err(FilterError::TooManyNat64Prefixes);
    }
    table.resize(capacity::NAT64 as usize, Nat64Prefix::default());
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_group_by_address_and_dedupe_ports() {
        let eps: Vec<SocketAddrV4> =
            ["169.254.169.254:80", "168.63.129.16:80", "168.63.129.16:32526", "169.254.169.254:80"]
                .iter()
                .map(|s| s.parse().unwrap())
                .collect();
        let g = group_endpoints(&eps, &["169.254.169.254".parse().unwrap()]).unwrap();
        assert_eq!(g.len(), 2);
        let wire = g[&u32::from(Ipv4Addr::new(168, 63, 129, 16)).to_be()];
        assert_eq!((wire.ports_be, wire.whole_address), ([80u16.to_be(), 32526u16.to_be(), 0, 0], 0));
        let imds = g[&u32::from(Ipv4Addr::new(169, 254, 169, 254)).to_be()];
        assert_eq!((imds.ports_be, imds.whole_address), ([80u16.to_be(), 0, 0, 0], 1));
        let only_whole = group_endpoints(&[], &["10.0.0.1".parse().unwrap()]).unwrap();
        assert_eq!(only_whole.values().next().map(|p| (p.ports_be, p.whole_address)), Some(([0; 4], 1)));
    }

    #[test]
    fn surprising_protection_is_warned_about() {
        let ep = |s: &str| s.parse::<SocketAddrV4>().unwrap();
        let imds = *IMDS_ENDPOINT.ip();
        assert!(protection_warnings(&[IMDS_ENDPOINT], &[imds]).is_empty(), "the defaults");
        let wire = [IMDS_ENDPOINT, ep("168.63.129.16:80")];
        assert!(protection_warnings(&wire, &[imds]).is_empty(), "the wire server by port");
        let port_only = protection_warnings(&[IMDS_ENDPOINT], &["10.0.0.1".parse().unwrap()]);
        assert_eq!(port_only.len(), 2, "{port_only:?}");
        assert!(port_only[0].starts_with("169.254.169.254 is protected on its --protect ports only"));
        assert!(port_only[1].starts_with("10.0.0.1 is protected whole with no --protect port"));
        let no_port = protection_warnings(&[ep("168.63.129.16:80")], &[imds]);
        assert_eq!(no_port.len(), 1, "{no_port:?}");
        assert!(no_port[0].starts_with("169.254.169.254 is protected whole with no --protect port"));
    }

    #[test]
    fn too_many_ports_on_one_address_is_an_error() {
        let eps: Vec<SocketAddrV4> = (1..=5).map(|p| SocketAddrV4::new([10, 0, 0, 1].into(), p)).collect();
        assert!(matches!(group_endpoints(&eps, &[]), Err(FilterError::TooManyPorts { .. })));
        assert!(matches!(group_endpoints(&[], &[]), Err(FilterError::NoProtectedEndpoints)));
    }

    #[test]
    fn nat64_prefixes_are_96_bits_and_at_most_three_more() {
        assert_eq!(parse_nat64_prefix("2001:db8:64::/96"), Ok("2001:db8:64::".parse().unwrap()));
        assert_eq!(parse_nat64_prefix("2001:db8:64::"), Ok("2001:db8:64::".parse().unwrap()));
        assert!(parse_nat64_prefix("2001:db8:64::/64").is_err());
        assert!(parse_nat64_prefix("2001:db8:64::1/96").is_err());
        assert!(parse_nat64_prefix("nope/96").is_err());
        let p = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        let table = nat64_table(&[p("64:ff9b::"), p("2001:db8:64::")]).unwrap();
        assert_eq!(table[..2], [Nat64Prefix::WELL_KNOWN, Nat64Prefix::from_bytes(p("2001:db8:64::").octets())]);
        assert_eq!(table[2..], [Nat64Prefix::default(); 2]);
        let four = [p("2001:db8:1::"), p("2001:db8:2::"), p("2001:db8:3::"), p("2001:db8:4::")];
        assert!(matches!(nat64_table(&four), Err(FilterError::TooManyNat64Prefixes)));
    }
}
