//! Who the client is: the connection's peer, or — when the peer is one of the trusted proxies
//! in front of keygate — the rightmost `X-Forwarded-For` entry that is not a trusted proxy.
//! That one address is what `allowed_ips` judges, what `x-real-ip` carries and what is logged.

use std::net::{IpAddr, Ipv6Addr};

use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;

use crate::proxy::forward::ClientInfo;

const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");

/// The client address of one request.
#[derive(Debug, Clone)]
pub struct ClientAddress {
    pub ip: IpAddr,
    /// `ip` as a header value, for `x-real-ip` and `x-forwarded-for`.
    pub header: HeaderValue,
    /// Behind a trusted proxy: the `X-Forwarded-For` to send on, the received chain cut after
    /// the client's entry. `None`: the client's own chain with `ip` appended.
    pub chain: Option<HeaderValue>,
}

/// An IPv4 client on a dual-stack listener arrives as `::ffff:a.b.c.d`; it is the IPv4
/// address it is, so `203.0.113.0/24` in a config covers it.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn trusted_by(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`1.2.3.4:80`,
/// `[2001:db8::1]:443`). Obfuscated names (`unknown`, `_hidden`) are not addresses.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = entry.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        let port_ok = after.is_empty() || after.strip_prefix(':').is_some_and(|p| p.parse::<u16>().is_ok());
        return port_ok
            .then(|| inside.parse::<Ipv6Addr>().ok().map(|ip| canonical(IpAddr::V6(ip))))
            .flatten();
    }
    let (host, port) = entry.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// Works out the client address of a request that came over `connection`.
///
/// The chain is believed only from a trusted peer, and walked from the right — the end the
/// trusted proxies wrote — as nginx's `real_ip_recursive` does: everything left of the first
/// untrusted entry was written by the client and proves nothing. An entry that is not an
/// address ends the walk at the last trusted hop, which is then the client as far as anyone
/// can tell.
pub fn resolve(connection: &ClientInfo, headers: &HeaderMap, trusted: &[IpNet]) -> ClientAddress {
    let peer = canonical(connection.peer.ip());
    let direct = || ClientAddress { ip: peer, header: connection.ip_header().clone(), chain: None };
    if trusted.is_empty() || !trusted_by(peer, trusted) || !headers.contains_key(X_FORWARDED_FOR) {
        return direct();
    }
    let mut entries: Vec<&str> = Vec::new();
    for value in headers.get_all(X_FORWARDED_FOR) {
        let Ok(text) = value.to_str() else { return direct() };
        entries.extend(text.split(',').map(str::trim).filter(|e| !e.is_empty()));
    }
    // (index of the entry, its address) of the client found so far; `None` is the peer.
    let mut client: Option<(usize, IpAddr)> = None;
    for (i, entry) in entries.iter().enumerate().rev() {
        let Some(ip) = parse_entry(entry) else { break };
        client = Some((i, ip));
        if !trusted_by(ip, trusted) {
            break;
        }
    }
    let Some((index, ip)) = client else { return direct() };
    let header = address_header(ip);
    // The rightmost entry sent on is always the client address keygate judged by.
    let mut chain = entries[..index].join(", ");
    if !chain.is_empty() {
        chain.push_str(", ");
    }
    chain.push_str(header.to_str().unwrap_or(""));
    // The entries were header text already, and an address is too.
    let chain = HeaderValue::from_str(&chain).unwrap_or_else(|_| header.clone());
    ClientAddress { ip, header, chain: Some(chain) }
}

/// An address as a header value; printing an address always gives valid header text.
pub fn address_header(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"))
}

/// Parses a network as `allowed_ips` and `trusted_proxies` write it: a CIDR (`10.0.0.0/8`,
/// `2001:db8::/32`) or a single address. Host bits are dropped (`10.1.2.3/8` is `10.0.0.0/8`).
pub fn parse_network(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    text.parse::<IpNet>()
        .map(|net| net.trunc())
        .or_else(|_| text.parse::<IpAddr>().map(|ip| IpNet::from(canonical(ip))))
        .map_err(|_| {
            format!("{text:?} is not an IP network like 203.0.113.0/24 or 2001:db8::/32, nor an address")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| parse_network(n).unwrap()).collect()
    }

    fn resolved(peer: &str, xff: &[&str], trusted: &[&str]) -> (String, Option<String>) {
        let info = ClientInfo::new(std::net::SocketAddr::new(peer.parse().unwrap(), 4000), false);
        let mut headers = HeaderMap::new();
        for value in xff {
            headers.append(X_FORWARDED_FOR, HeaderValue::from_str(value).unwrap());
        }
        let address = resolve(&info, &headers, &nets(trusted));
        (address.ip.to_string(), address.chain.map(|c| c.to_str().unwrap().to_string()))
    }

    #[test]
    fn the_chain_is_believed_only_from_a_trusted_peer() {
        assert_eq!(resolved("198.51.100.7", &["1.1.1.1"], &[]), ("198.51.100.7".into(), None));
        assert_eq!(resolved("198.51.100.7", &["1.1.1.1"], &["10.0.0.0/8"]), ("198.51.100.7".into(), None));
        assert_eq!(resolved("10.0.0.1", &[], &["10.0.0.0/8"]), ("10.0.0.1".into(), None));
    }

    #[test]
    fn the_rightmost_untrusted_entry_is_the_client() {
        let trusted = ["10.0.0.0/8", "192.0.2.9"];
        assert_eq!(
            resolved("10.0.0.1", &["6.6.6.6, 203.0.113.5", "10.2.3.4, 192.0.2.9"], &trusted),
            ("203.0.113.5".into(), Some("6.6.6.6, 203.0.113.5".into()))
        );
        // Every hop trusted: the leftmost is as far back as anyone can see.
        assert_eq!(
            resolved("10.0.0.1", &["10.9.9.9, 10.2.3.4"], &trusted),
            ("10.9.9.9".into(), Some("10.9.9.9".into()))
        );
        // Garbage ends the walk at the last trusted hop.
        assert_eq!(
            resolved("10.0.0.1", &["203.0.113.5, unknown, 10.2.3.4"], &trusted),
            ("10.2.3.4".into(), Some("203.0.113.5, unknown, 10.2.3.4".into()))
        );
        assert_eq!(resolved("10.0.0.1", &["203.0.113.5, unknown"], &trusted), ("10.0.0.1".into(), None));
    }

    #[test]
    fn entries_with_ports_and_mapped_addresses() {
        assert_eq!(parse_entry("1.2.3.4:80"), Some("1.2.3.4".parse().unwrap()));
        assert_eq!(parse_entry("[2001:db8::1]:443"), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(parse_entry("[2001:db8::1]"), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(parse_entry("::ffff:1.2.3.4"), Some("1.2.3.4".parse().unwrap()));
        for bad in ["unknown", "1.2.3.4:x", "[::1]x", "_hidden", "1.2.3"] {
            assert_eq!(parse_entry(bad), None, "{bad}");
        }
        assert_eq!(resolved("::ffff:10.0.0.1", &["203.0.113.5"], &["10.0.0.0/8"]).0, "203.0.113.5");
    }

    #[test]
    fn networks_parse() {
        assert_eq!(parse_network("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_network("2001:db8::1").unwrap().to_string(), "2001:db8::1/128");
        assert_eq!(parse_network("127.0.0.2").unwrap().to_string(), "127.0.0.2/32");
        for bad in ["10.0.0.0/33", "example.com", "", "10.0.0.0/"] {
            assert!(parse_network(bad).is_err(), "{bad}");
        }
    }
}
