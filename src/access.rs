//! Access control by client address: the `allow` and `deny` lists of listeners and routes.
//!
//! The lists are compiled into sorted, disjoint address ranges, so a check is a binary search
//! whatever their length: a block list of ten thousand networks costs about as much per
//! connection as one of ten. The address checked is the client's as the proxy knows it, that is
//! after the PROXY protocol (never a header a client could write).

use std::net::IpAddr;

use ipnet::IpNet;

/// Which clients a listener or route serves.
///
/// `deny` is checked first: a client in it is refused even when `allow` names a wider network
/// around it (allow an office's network, deny one machine of it). A non-empty `allow` then
/// refuses everyone it does not name. Both empty: everyone is served, at the cost of one
/// branch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessList {
    allow: Ranges,
    deny: Ranges,
}

impl AccessList {
    /// Compiles the two lists. IPv4-mapped IPv6 networks were turned into IPv4 ones when the
    /// configuration was read, as client addresses are.
    pub fn new(allow: &[IpNet], deny: &[IpNet]) -> Self {
        AccessList {
            allow: Ranges::new(allow),
            deny: Ranges::new(deny),
        }
    }

    /// Whether both lists are empty, i.e. every client is served.
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Whether a client at `ip` is served.
    #[inline]
    pub fn permits(&self, ip: IpAddr) -> bool {
        if self.is_open() {
            return true;
        }
        let ip = ip.to_canonical();
        !self.deny.contains(ip) && (self.allow.is_empty() || self.allow.contains(ip))
    }
}

/// Sorted, disjoint, non-adjacent inclusive ranges, IPv4 and IPv6 apart (both held as `u128`,
/// so that one merge and one search serve both).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Ranges {
    v4: Vec<(u128, u128)>,
    v6: Vec<(u128, u128)>,
}

impl Ranges {
    fn new(nets: &[IpNet]) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for net in nets {
            match net {
                IpNet::V4(net) => {
                    let (first, last) = (u32::from(net.network()), u32::from(net.broadcast()));
                    v4.push((u128::from(first), u128::from(last)));
                }
                IpNet::V6(net) => {
                    v6.push((u128::from(net.network()), u128::from(net.broadcast())));
                }
            }
        }
        Ranges {
            v4: merge(v4),
            v6: merge(v6),
        }
    }

    fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => within(&self.v4, u128::from(u32::from(ip))),
            IpAddr::V6(ip) => within(&self.v6, u128::from(ip)),
        }
    }
}

/// Sorts ranges and joins those that overlap or touch.
fn merge(mut ranges: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged.shrink_to_fit();
    merged
}

/// Whether `x` falls in one of the sorted, disjoint `ranges`.
fn within(ranges: &[(u128, u128)], x: u128) -> bool {
    let after = ranges.partition_point(|&(start, _)| start <= x);
    after > 0 && ranges[after - 1].1 >= x
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter()
            .map(|s| s.parse().expect("test network"))
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn empty_lists_serve_everyone() {
        let list = AccessList::new(&[], &[]);
        assert!(list.is_open());
        assert!(list.permits(ip("203.0.113.9")));
        assert!(list.permits(ip("2001:db8::1")));
    }

    #[test]
    fn allow_names_the_only_clients_served() {
        let list = AccessList::new(&nets(&["10.0.0.0/8", "2001:db8::/32"]), &[]);
        assert!(list.permits(ip("10.1.2.3")));
        assert!(list.permits(ip("2001:db8:1::5")));
        assert!(!list.permits(ip("11.0.0.1")));
        assert!(!list.permits(ip("2001:db9::1")));
    }

    #[test]
    fn deny_wins_inside_allow() {
        let list = AccessList::new(&nets(&["10.0.0.0/8"]), &nets(&["10.0.0.7/32"]));
        assert!(list.permits(ip("10.0.0.6")));
        assert!(!list.permits(ip("10.0.0.7")));
        assert!(list.permits(ip("10.0.0.8")));
    }

    #[test]
    fn deny_alone_serves_the_rest() {
        let list = AccessList::new(&[], &nets(&["192.0.2.0/24"]));
        assert!(!list.permits(ip("192.0.2.200")));
        assert!(list.permits(ip("192.0.3.1")));
        assert!(list.permits(ip("::1")));
    }

    #[test]
    fn mapped_client_addresses_are_checked_as_ipv4() {
        let list = AccessList::new(&nets(&["127.0.0.0/8"]), &[]);
        assert!(list.permits(ip("::ffff:127.0.0.1")));
        assert!(!list.permits(ip("::ffff:128.0.0.1")));
    }

    #[test]
    fn overlapping_and_adjacent_ranges_merge() {
        let list = Ranges::new(&nets(&[
            "10.0.0.0/25",
            "10.0.0.128/25",
            "10.0.0.64/26",
            "10.0.2.0/24",
            "0.0.0.0/32",
            "255.255.255.255/32",
        ]));
        assert_eq!(
            list.v4,
            vec![
                (0, 0),
                (0x0a00_0000, 0x0a00_00ff),
                (0x0a00_0200, 0x0a00_02ff),
                (u128::from(u32::MAX), u128::from(u32::MAX))
            ]
        );
        assert!(list.contains(ip("10.0.0.255")));
        assert!(!list.contains(ip("10.0.1.0")));
        assert!(list.contains(ip("255.255.255.255")));
        assert!(list.contains(ip("0.0.0.0")));
    }

    #[test]
    fn a_long_list_is_searched_not_scanned() {
        // Every other /24 of 10.0.0.0/8 is denied: 32768 ranges that cannot merge.
        let denied: Vec<IpNet> = (0..32768u32)
            .map(|i| {
                let base = 0x0a00_0000 | (i * 2) << 8;
                IpNet::V4(ipnet::Ipv4Net::new(std::net::Ipv4Addr::from(base), 24).expect("prefix"))
            })
            .collect();
        let list = AccessList::new(&[], &denied);
        assert_eq!(list.deny.v4.len(), 32768);
        assert!(!list.permits(ip("10.0.0.1")));
        assert!(list.permits(ip("10.0.1.1")));
        assert!(!list.permits(ip("10.255.254.9")));
        assert!(list.permits(ip("10.255.255.9")));
    }
}
