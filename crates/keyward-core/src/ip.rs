//! IP allow/block rules for keys: single addresses or CIDR networks, v4 and v6.

use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;

/// Parses `"203.0.113.7"`, `"2001:db8::1"`, `"10.0.0.0/8"` or `"2001:db8::/32"`.
/// A network with host bits set (`10.0.0.1/8`) is refused: it is almost always a typo.
pub fn parse_rule(input: &str) -> Result<IpNet, String> {
    if input.contains('/') {
        let net: IpNet = input
            .parse()
            .map_err(|_| format!("`{input}` is not an IP address or CIDR network"))?;
        if net.trunc() != net {
            return Err(format!(
                "`{input}` has host bits set; did you mean `{}`?",
                net.trunc()
            ));
        }
        Ok(net)
    } else {
        let addr: IpAddr = input
            .parse()
            .map_err(|_| format!("`{input}` is not an IP address or CIDR network"))?;
        Ok(IpNet::from(addr))
    }
}

/// Renders a rule the way a user wrote it: plain address for a host rule, CIDR otherwise.
pub fn render_rule(net: &IpNet) -> String {
    if net.prefix_len() == net.max_prefix_len() {
        net.addr().to_string()
    } else {
        net.to_string()
    }
}

/// An IPv4-mapped IPv6 peer (`::ffff:1.2.3.4`) is matched as the IPv4 address it carries.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// What one client controls of its address, for per-client bounds: an IPv6 host may use any
/// address of its /64 (the interface id is its own to pick, and providers hand each
/// subscriber a /64 or more), so it is counted by the /64; an IPv4 address by itself.
pub fn client_network(addr: IpAddr) -> IpAddr {
    match canonical(addr) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::from(u64::MAX)))),
        v4 => v4,
    }
}

/// Blocklist wins; a non-empty allowlist admits only its members.
pub fn is_allowed(addr: IpAddr, allowed: &[IpNet], blocked: &[IpNet]) -> bool {
    let addr = canonical(addr);
    if blocked.iter().any(|net| net.contains(&addr)) {
        return false;
    }
    allowed.is_empty() || allowed.iter().any(|net| net.contains(&addr))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_client_is_its_ipv4_address_or_its_ipv6_slash_64() {
        let net = |a: &str| client_network(a.parse().unwrap()).to_string();
        assert_eq!(net("203.0.113.7"), "203.0.113.7");
        assert_eq!(net("::ffff:203.0.113.7"), "203.0.113.7");
        assert_eq!(net("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), "2001:db8:1:2::");
        assert_eq!(net("2001:db8:1:2::1"), net("2001:db8:1:2:ffff::9"));
        assert_ne!(net("2001:db8:1:2::1"), net("2001:db8:1:3::1"));
    }

    use super::*;

    fn rules(list: &[&str]) -> Vec<IpNet> {
        list.iter().filter_map(|r| parse_rule(r).ok()).collect()
    }

    #[test]
    fn parses_addresses_and_networks() {
        assert!(parse_rule("203.0.113.7").is_ok());
        assert!(parse_rule("2001:db8::1").is_ok());
        assert!(parse_rule("10.0.0.0/8").is_ok());
        assert!(parse_rule("2001:db8::/32").is_ok());
        assert!(parse_rule("10.0.0.1/8").is_err());
        assert!(parse_rule("300.1.1.1").is_err());
        assert!(parse_rule("10.0.0.0/33").is_err());
        assert!(parse_rule("").is_err());
        assert!(parse_rule("localhost").is_err());
        assert_eq!(render_rule(&rules(&["203.0.113.7"])[0]), "203.0.113.7");
        assert_eq!(render_rule(&rules(&["10.0.0.0/8"])[0]), "10.0.0.0/8");
    }

    #[test]
    fn blocklist_wins_and_allowlist_restricts() {
        let ip = |s: &str| {
            s.parse::<IpAddr>()
                .ok()
                .unwrap_or(IpAddr::from([0, 0, 0, 0]))
        };
        let allow = rules(&["10.0.0.0/8", "2001:db8::/32"]);
        let block = rules(&["10.1.2.3"]);
        assert!(is_allowed(ip("10.9.9.9"), &allow, &block));
        assert!(!is_allowed(ip("10.1.2.3"), &allow, &block));
        assert!(!is_allowed(ip("192.0.2.1"), &allow, &block));
        assert!(is_allowed(ip("2001:db8::5"), &allow, &block));
        assert!(is_allowed(ip("::ffff:10.9.9.9"), &allow, &block));
        assert!(!is_allowed(ip("::ffff:10.1.2.3"), &[], &block));
        assert!(is_allowed(ip("192.0.2.1"), &[], &[]));
    }
}
