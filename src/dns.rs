//! A small DNS client: A and AAAA lookups over UDP, for backends written `resolve = true`.
//!
//! A lookup asks each resolver in turn, with a timeout, and takes only a reply that comes from
//! that resolver and carries the query's random id and its question (a failure without the
//! question, as some servers send, passes the name on to the next resolver). Replies are parsed here,
//! by hand and bounded: name compression (a limited number of jumps), and CNAME chains inside
//! the answer section (a limited number of links). A truncated reply (TC) is used as it is:
//! the addresses it holds are enough to balance over, and there is no fallback to TCP. One
//! family answered is enough when the other's reply never comes or is a failure. A lookup
//! also gives the shortest TTL of the records it used, and sets apart addresses that no
//! backend can have. The calls block, so callers run them off the runtime's threads.
//!
//! A name is completed as stub resolvers complete it (resolv.conf(5)): [`resolve`] asks the
//! candidates [`candidates`] gives, in turn, and the first with addresses answers. One that
//! has no address passes the name to the next; one whose lookup fails ends the search there,
//! as musl's does, so that a resolver's hiccup never moves a backend to another domain's
//! addresses.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long one resolver has to answer both queries of a lookup before the next is asked;
/// halfway, the queries it has not answered yet are sent again.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// The port resolvers listen on when a nameserver line names none.
pub const DNS_PORT: u16 = 53;
/// The longest reply read; without EDNS a server sends at most 512 bytes over UDP.
const MAX_REPLY: usize = 4096;
/// Datagrams read from one resolver per lookup before it is given up: stray or forged
/// replies cannot keep a lookup reading for ever.
const MAX_DATAGRAMS: usize = 64;
/// Compression pointers followed while reading one name.
const MAX_JUMPS: usize = 32;
/// CNAME links followed from the name asked for.
const MAX_CNAMES: usize = 16;
/// The longest name on the wire (RFC 1035 §2.3.4).
const MAX_NAME: usize = 255;
/// The share of the timeout that the second family (A or AAAA) has left once the first is
/// answered: a resolver that answered one query has the name at hand, so the other is late only
/// when it was lost or dropped, and waiting for it must not cost the whole timeout.
const SECOND_FAMILY_SHARE: f64 = 0.25;
/// Names [`lookup_all`] looks up at once: a resolver that does not answer costs each name its
/// timeout, and names waiting on one another would add those timeouts up.
pub const MAX_PARALLEL_LOOKUPS: usize = 16;

const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;
const RCODE_NXDOMAIN: u8 = 3;

/// The `ndots` resolv.conf(5) gives when it sets none.
pub const DEFAULT_NDOTS: u8 = 1;
/// The largest `ndots`: glibc and musl lower a larger one to it.
pub const MAX_NDOTS: u8 = 15;

/// Why a lookup found no address.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DnsError {
    /// The name cannot be sent in a query.
    #[error("`{0}` is not a valid host name")]
    BadName(String),
    /// There is nobody to ask.
    #[error("no resolver to ask")]
    NoResolvers,
    /// Every resolver failed; the last one's reason.
    #[error("no resolver answered (last, {resolver}: {reason})")]
    Unanswered {
        /// The last resolver asked.
        resolver: SocketAddr,
        /// What went wrong with it.
        reason: String,
    },
    /// The resolvers answered, with no address for the name.
    #[error("`{0}` resolves to no address")]
    NoAddress(String),
    /// The lookup of the name did not run to its end.
    #[error("the lookup of `{0}` did not finish")]
    Unfinished(String),
    /// The resolvers answered with addresses that no backend can have, and no other.
    #[error("`{host}` resolves only to addresses no backend can have ({})", list(.skipped))]
    Unusable {
        /// The name looked up.
        host: String,
        /// What it resolved to.
        skipped: Vec<IpAddr>,
    },
    /// The resolvers answered for every name of the search list, with no address.
    #[error("no name of the search list has an address (asked {})", quoted(.tried))]
    NoAddressSearched {
        /// The name as written.
        host: String,
        /// The names asked, in order.
        tried: Vec<String>,
    },
    /// The lookup of one name of the search list failed, which ends the search: the names
    /// after it might be another service's.
    #[error("asking for `{name}` failed, which ends the search ({})", .source)]
    SearchFailed {
        /// The name asked when it failed.
        name: String,
        /// Why it failed.
        source: Box<DnsError>,
    },
}

impl DnsError {
    /// Whether the resolvers answered that the name has no address a backend can have (no
    /// such name, no record, or only unusable addresses), rather than failed to answer.
    pub fn is_answer(&self) -> bool {
        matches!(
            self,
            DnsError::NoAddress(_) | DnsError::Unusable { .. } | DnsError::NoAddressSearched { .. }
        )
    }
}

/// `names` written out for a message, each in backquotes.
fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|name| format!("`{name}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `addrs` written out for a message.
fn list(addrs: &[IpAddr]) -> String {
    addrs
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The addresses a backend can have, sorted, without duplicates; never empty.
    pub addrs: Vec<IpAddr>,
    /// The addresses of the answer that no backend can have (see [`usable`]), sorted, without
    /// duplicates: left out, for the caller to warn about.
    pub skipped: Vec<IpAddr>,
    /// How long the answer may be kept: the shortest TTL of the records it came from.
    pub ttl: Duration,
    /// The name that answered: the one looked up, completed by a search domain when it was.
    pub name: String,
}

/// Whether a backend can have `ip`: not the unspecified address (`0.0.0.0`, `::`, which some
/// resolvers give for names they block, and a connect to which reaches this host), a multicast
/// address, or the IPv4 broadcast address, none of which a TCP connection can go to.
pub fn usable(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    !ip.is_unspecified() && !ip.is_multicast() && ip != IpAddr::V4(Ipv4Addr::BROADCAST)
}

/// Why a reply was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// It ends before a field it announces.
    #[error("cut short")]
    Short,
    /// Its id or question are not those of the query: a stray or forged datagram.
    #[error("not the reply to this query")]
    Mismatch,
    /// A name in it is not well formed (bad label, pointer loop, too long).
    #[error("bad name")]
    BadName,
    /// It is not a reply, or not to a standard query.
    #[error("not a standard reply")]
    NotReply,
}

/// What a reply says about the name asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The response code: 0 is no error, 3 is no such name.
    pub rcode: u8,
    /// The server cut the reply short (TC); what it holds is used anyway.
    pub truncated: bool,
    /// The addresses of the name, through CNAMEs in the answer section.
    pub addrs: Vec<IpAddr>,
    /// How long the addresses may be kept, in seconds: the shortest TTL of the records that
    /// led to them (their own and the CNAMEs'); `None` without addresses.
    pub ttl: Option<u32>,
}

/// The record types a lookup asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryType {
    /// IPv4 addresses.
    A,
    /// IPv6 addresses.
    Aaaa,
}

impl QueryType {
    fn code(self) -> u16 {
        match self {
            QueryType::A => TYPE_A,
            QueryType::Aaaa => TYPE_AAAA,
        }
    }
}

/// How a name is completed before it is asked: resolv.conf's `search` and `ndots`, or the
/// file's `global.search` and `global.ndots`, so that short names (`api`, `api.prod`) resolve
/// as they do for every other program on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Search {
    /// The domains a name is completed with, in the order they are tried; none turns the
    /// search off. Each is a valid name without its trailing dot.
    pub domains: Vec<String>,
    /// A name with at least this many dots is asked as written before it is completed; one
    /// with fewer, after.
    pub ndots: u8,
}

impl Default for Search {
    fn default() -> Search {
        Search {
            domains: Vec::new(),
            ndots: DEFAULT_NDOTS,
        }
    }
}

/// What `/etc/resolv.conf` says that lookups use: whom to ask, and how to complete names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// The `nameserver` lines, at the DNS port.
    pub nameservers: Vec<SocketAddr>,
    /// The `search` or `domain` line and `options ndots:`.
    pub search: Search,
}

/// `/etc/resolv.conf`, with the `LOCALDOMAIN` and `RES_OPTIONS` environment variables applied
/// as the C library applies them: what lookups use when the file names no `global.resolvers`,
/// `global.search` or `global.ndots`. A missing file gives no nameserver and no search.
pub fn system_conf() -> ResolvConf {
    let mut conf = parse_resolv_conf(
        &std::fs::read_to_string(Path::new("/etc/resolv.conf")).unwrap_or_default(),
    );
    apply_env(
        &mut conf.search,
        std::env::var("LOCALDOMAIN").ok().as_deref(),
        std::env::var("RES_OPTIONS").ok().as_deref(),
    );
    conf
}

/// A resolv.conf text, as resolv.conf(5) reads it: the `nameserver` lines; the last `search`
/// or `domain` line (`domain` is a search list of one); and `ndots:N` of the `options` lines,
/// lowered to [`MAX_NDOTS`]. An IPv6 link-local nameserver keeps the interface its zone names
/// (`fe80::1%eth0`, or by index, `%2`), without which it could not be reached, as on networks
/// whose routers announce their own address as the resolver. Values that are not an IP address,
/// an interface that does not exist, a domain that is not a valid name, or an `ndots` that is
/// not a number are passed over. Unlike glibc, the host's own domain is not taken as a search
/// list when the text has none (musl does not either).
pub fn parse_resolv_conf(text: &str) -> ResolvConf {
    let mut conf = ResolvConf::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => conf.nameservers.extend(words.next().and_then(nameserver)),
            Some("search") => conf.search.domains = search_list(words),
            Some("domain") => conf.search.domains = search_list(words.take(1)),
            Some("options") => apply_options(&mut conf.search, words),
            _ => {}
        }
    }
    conf
}

/// The environment variables that override resolv.conf: `LOCALDOMAIN` is a search list that
/// replaces the file's (empty, it turns the search off), and `RES_OPTIONS` holds options read
/// after the file's.
pub fn apply_env(search: &mut Search, localdomain: Option<&str>, res_options: Option<&str>) {
    if let Some(domains) = localdomain {
        search.domains = search_list(domains.split_whitespace());
    }
    if let Some(options) = res_options {
        apply_options(search, options.split_whitespace());
    }
}

/// The domains of a `search` line, up to a comment, without the invalid ones and repeats.
fn search_list<'a>(words: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut domains: Vec<String> = Vec::new();
    for word in words.take_while(|w| !w.starts_with(['#', ';'])) {
        if let Some(domain) = search_domain(word)
            && !domains.iter().any(|d| d.eq_ignore_ascii_case(&domain))
        {
            domains.push(domain);
        }
    }
    domains
}

/// `word` as a search domain: a valid name, without its trailing dot, else `None`.
pub fn search_domain(word: &str) -> Option<String> {
    encode_name(word)?;
    Some(word.strip_suffix('.').unwrap_or(word).to_owned())
}

/// The `ndots:N` among `options`; the other options do not concern these lookups.
fn apply_options<'a>(search: &mut Search, options: impl Iterator<Item = &'a str>) {
    for option in options {
        if let Some(n) = option.strip_prefix("ndots:")
            && let Ok(n) = n.parse::<u32>()
        {
            search.ndots = n.min(u32::from(MAX_NDOTS)) as u8;
        }
    }
}

/// The names asked for `host`, in order, as stub resolvers ask them: a name ending in a dot
/// only as written; one with at least `ndots` dots as written, then completed by each search
/// domain; one with fewer completed first, then as written. Completions that would be too
/// long for a name are left out.
pub fn candidates(host: &str, search: &Search) -> Vec<String> {
    if host.ends_with('.') || search.domains.is_empty() {
        return vec![host.to_owned()];
    }
    let completed = search
        .domains
        .iter()
        .map(|domain| format!("{host}.{domain}"))
        .filter(|name| encode_name(name).is_some());
    let as_written = std::iter::once(host.to_owned());
    if host.matches('.').count() >= usize::from(search.ndots) {
        as_written.chain(completed).collect()
    } else {
        completed.chain(as_written).collect()
    }
}

/// The address of one `nameserver` value, at the DNS port.
fn nameserver(value: &str) -> Option<SocketAddr> {
    let Some((ip, zone)) = value.split_once('%') else {
        return Some(SocketAddr::new(value.parse().ok()?, DNS_PORT));
    };
    let ip: Ipv6Addr = ip.parse().ok()?;
    let scope = match zone.parse::<u32>() {
        Ok(index) => index,
        Err(_) => crate::sys::interface_index(zone)?,
    };
    Some(SocketAddrV6::new(ip, DNS_PORT, 0, scope).into())
}

/// The IPv4 and IPv6 addresses of `host`, asking `resolvers` in turn, each within
/// `timeout`. A resolver that does not answer, or answers with a failure other than "no such
/// name", passes the question to the next. Addresses no backend can have are set apart.
pub fn lookup(
    host: &str,
    resolvers: &[SocketAddr],
    timeout: Duration,
) -> Result<Resolved, DnsError> {
    let name = encode_name(host).ok_or_else(|| DnsError::BadName(host.to_owned()))?;
    let mut last = None;
    for &resolver in resolvers {
        match ask(resolver, &name, timeout) {
            Ok(Answer { mut addrs, ttl }) => {
                addrs.sort();
                addrs.dedup();
                let (addrs, skipped): (Vec<IpAddr>, Vec<IpAddr>) =
                    addrs.into_iter().partition(|&ip| usable(ip));
                return match (addrs.is_empty(), skipped.is_empty()) {
                    (false, _) => Ok(Resolved {
                        addrs,
                        skipped,
                        ttl: Duration::from_secs(u64::from(ttl.unwrap_or(u32::MAX))),
                        name: host.to_owned(),
                    }),
                    (true, true) => Err(DnsError::NoAddress(host.to_owned())),
                    (true, false) => Err(DnsError::Unusable {
                        host: host.to_owned(),
                        skipped,
                    }),
                };
            }
            Err(reason) => last = Some((resolver, reason)),
        }
    }
    match last {
        None => Err(DnsError::NoResolvers),
        Some((resolver, reason)) => Err(DnsError::Unanswered { resolver, reason }),
    }
}

/// [`lookup`] of the names [`candidates`] gives for `host`, in turn, until one has
/// addresses. A name the resolvers say has none (no such name, no record) passes `host` to the
/// next; one that resolves only to addresses no backend can have ends the search, as it would
/// for a stub resolver, which would take those; one whose lookup fails (no resolver answered,
/// each failed) ends it too, as musl's resolver does, where glibc's would go on after a
/// `SERVFAIL`: the next name may be another domain's service, which a resolver's hiccup must
/// never put in its place.
pub fn resolve(
    host: &str,
    search: &Search,
    resolvers: &[SocketAddr],
    timeout: Duration,
) -> Result<Resolved, DnsError> {
    if encode_name(host).is_none() {
        return Err(DnsError::BadName(host.to_owned()));
    }
    let names = candidates(host, search);
    if let [only] = names.as_slice() {
        return lookup(only, resolvers, timeout);
    }
    for name in &names {
        match lookup(name, resolvers, timeout) {
            Err(DnsError::NoAddress(_)) => {
                tracing::debug!(%name, "no address; trying the next name of the search list");
            }
            Err(error @ DnsError::Unusable { .. }) => return Err(error),
            Err(error) => {
                return Err(DnsError::SearchFailed {
                    name: name.clone(),
                    source: Box::new(error),
                });
            }
            found => return found,
        }
    }
    Err(DnsError::NoAddressSearched {
        host: host.to_owned(),
        tried: names,
    })
}

/// [`resolve`] of every one of `hosts`, up to [`MAX_PARALLEL_LOOKUPS`] at a time, each on a
/// thread of its own: the whole takes about as long as the slowest name, not as long as all
/// of them together. The results are in the order of `hosts`.
pub fn lookup_all(
    hosts: &[&str],
    search: &Search,
    resolvers: &[SocketAddr],
    timeout: Duration,
) -> Vec<Result<Resolved, DnsError>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    // Each worker takes the next name not taken yet, until there is none.
    let work = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(host) = hosts.get(i) else {
                return done;
            };
            done.push((i, resolve(host, search, resolvers, timeout)));
        }
    };
    let mut results: Vec<Option<Result<Resolved, DnsError>>> =
        std::iter::repeat_with(|| None).take(hosts.len()).collect();
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..hosts.len().min(MAX_PARALLEL_LOOKUPS))
            // A thread that cannot be started leaves its share to the others.
            .filter_map(|_| {
                std::thread::Builder::new()
                    .name("dns-lookup".into())
                    .spawn_scoped(scope, work)
                    .ok()
            })
            .collect();
        let mut done = work();
        for helper in helpers {
            // A helper that panicked leaves its names unanswered, which is said below.
            done.extend(helper.join().unwrap_or_default());
        }
        for (i, result) in done {
            results[i] = Some(result);
        }
    });
    results
        .into_iter()
        .zip(hosts)
        .map(|(result, host)| {
            result.unwrap_or_else(|| Err(DnsError::Unfinished((*host).to_owned())))
        })
        .collect()
}

/// Sends the A and AAAA queries to one resolver and waits for both replies. Once one reply has
/// come, the other has [`SECOND_FAMILY_SHARE`] of the timeout left: a resolver (or a middlebox
/// before it) that never answers AAAA queries, or refuses them, must not fail a name it gave
/// IPv4 addresses for. What came back is used. The resolver counts as failed, and the next is
/// asked, only when it gave no address and did not say so for both families.
fn ask(resolver: SocketAddr, name: &[u8], timeout: Duration) -> Result<Answer, String> {
    let local: SocketAddr = match resolver {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).map_err(|e| e.to_string())?;
    // Connected: the kernel drops datagrams from anyone else, and a closed port is reported.
    socket.connect(resolver).map_err(|e| e.to_string())?;
    let mut pending = Vec::with_capacity(2);
    for qtype in [QueryType::A, QueryType::Aaaa] {
        let id = fastrand::u16(..);
        socket
            .send(&build_query(id, name, qtype))
            .map_err(|e| e.to_string())?;
        pending.push((id, qtype));
    }
    let mut deadline = Instant::now() + timeout;
    // Halfway, the queries still unanswered are sent once more (with their ids): a datagram
    // lost on the way must not fail the name, nor, with one resolver, a reload.
    let mut resend_at = Some(Instant::now() + timeout / 2);
    let mut answer = Answer::default();
    // Whether a reply came, and the failure one of them reported.
    let mut replied = false;
    let mut failed = None;
    let mut buf = vec![0; MAX_REPLY];
    for _ in 0..MAX_DATAGRAMS {
        if pending.is_empty() {
            return settle(answer, true, failed);
        }
        let now = Instant::now();
        if resend_at.is_some_and(|at| at <= now) {
            resend_at = None;
            for &(id, qtype) in &pending {
                socket
                    .send(&build_query(id, name, qtype))
                    .map_err(|e| e.to_string())?;
            }
        }
        let left = resend_at.unwrap_or(deadline).saturating_duration_since(now);
        if left.is_zero() {
            return settle(answer, false, failed);
        }
        socket
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if resend_at.is_some() {
                    // Time to send again.
                    continue;
                }
                return settle(answer, false, failed);
            }
            Err(e) => return Err(e.to_string()),
        };
        if from != resolver {
            continue;
        }
        let Some((at, reply)) = pending.iter().enumerate().find_map(|(at, &(id, qtype))| {
            parse_reply(&buf[..len], id, name, qtype)
                .ok()
                .map(|reply| (at, reply))
        }) else {
            continue;
        };
        pending.swap_remove(at);
        match reply.rcode {
            0 | RCODE_NXDOMAIN => {
                answer.addrs.extend(reply.addrs);
                answer.ttl = match (answer.ttl, reply.ttl) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            rcode => failed = Some(format!("answered with response code {rcode}")),
        }
        if !replied && !pending.is_empty() {
            replied = true;
            let now = Instant::now();
            let rest = timeout.mul_f64(SECOND_FAMILY_SHARE);
            deadline = deadline.min(now + rest);
            resend_at = resend_at.map(|at| at.min(now + rest / 2));
        }
    }
    if pending.is_empty() {
        return settle(answer, true, failed);
    }
    settle(
        answer,
        false,
        failed.or(Some("too many datagrams that are not replies".to_owned())),
    )
}

/// The addresses one resolver gave for both families, and their shortest TTL.
#[derive(Debug, Default)]
struct Answer {
    addrs: Vec<IpAddr>,
    ttl: Option<u32>,
}

/// What one resolver's replies come to: the addresses, if any family gave some; no address
/// when both families were answered without a failure; otherwise a failure of the resolver
/// (`failed`, or a timeout), so that the next is asked.
fn settle(answer: Answer, all_replied: bool, failed: Option<String>) -> Result<Answer, String> {
    if !answer.addrs.is_empty() {
        if let Some(reason) = failed {
            tracing::debug!(%reason, "one family of a lookup failed; using the other's");
        }
        return Ok(answer);
    }
    match failed {
        Some(reason) => Err(reason),
        None if all_replied => Ok(answer),
        None => Err("timed out".to_owned()),
    }
}

/// `host` in wire form (length-prefixed labels, lower case, ending with the root), or `None`
/// if it is not a host name: empty labels, labels over 63 bytes, a name over 255, or bytes
/// other than letters, digits, `-` and `_`. One trailing dot is allowed.
pub fn encode_name(host: &str) -> Option<Vec<u8>> {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    let mut wire = Vec::with_capacity(host.len() + 2);
    for label in host.split('.') {
        let ok = (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return None;
        }
        wire.push(label.len() as u8);
        wire.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
    }
    wire.push(0);
    (wire.len() <= MAX_NAME).then_some(wire)
}

/// A standard query with recursion desired for `name` (in wire form).
pub fn build_query(id: u16, name: &[u8], qtype: QueryType) -> Vec<u8> {
    let mut query = Vec::with_capacity(12 + name.len() + 4);
    query.extend_from_slice(&id.to_be_bytes());
    query.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    query.extend_from_slice(&1u16.to_be_bytes()); // one question
    query.extend_from_slice(&[0; 6]); // no answers, authorities or additionals
    query.extend_from_slice(name);
    query.extend_from_slice(&qtype.code().to_be_bytes());
    query.extend_from_slice(&CLASS_IN.to_be_bytes());
    query
}

/// Reads `packet` as the reply to the query `id` for `name` (wire form, lower case) and
/// `qtype`. Never panics and never loops unbounded, whatever the bytes.
pub fn parse_reply(
    packet: &[u8],
    id: u16,
    name: &[u8],
    qtype: QueryType,
) -> Result<Reply, ParseError> {
    let header = packet.get(..12).ok_or(ParseError::Short)?;
    let field = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    if field(0) != id {
        return Err(ParseError::Mismatch);
    }
    let flags = field(2);
    // QR set, opcode 0 (a standard query).
    if flags & 0x8000 == 0 || (flags >> 11) & 0xf != 0 {
        return Err(ParseError::NotReply);
    }
    let rcode = (flags & 0xf) as u8;
    if field(4) == 0 && rcode != 0 && rcode != RCODE_NXDOMAIN {
        // A failure (a refusal, a query the server cannot parse) may come without the
        // question. Its id is all that ties it to the query, which is enough to ask the next
        // resolver rather than wait out the timeout, and never enough to take an answer.
        return Ok(Reply {
            rcode,
            truncated: false,
            addrs: Vec::new(),
            ttl: None,
        });
    }
    if field(4) != 1 {
        return Err(ParseError::Mismatch);
    }
    let answers = field(6);
    let (question, mut pos) = read_name(packet, 12)?;
    let qfields = packet.get(pos..pos + 4).ok_or(ParseError::Short)?;
    if question != name
        || u16::from_be_bytes([qfields[0], qfields[1]]) != qtype.code()
        || u16::from_be_bytes([qfields[2], qfields[3]]) != CLASS_IN
    {
        return Err(ParseError::Mismatch);
    }
    pos += 4;
    let truncated = flags & 0x0200 != 0;

    // The answer section; a truncated reply may hold fewer records than it announces.
    // Owner, type, TTL and where the data is, of each record of class IN.
    let mut records: Vec<(Vec<u8>, u16, u32, std::ops::Range<usize>)> = Vec::new();
    for _ in 0..answers {
        let (owner, next) = match read_name(packet, pos) {
            Ok(read) => read,
            Err(ParseError::Short) if truncated => break,
            Err(e) => return Err(e),
        };
        let Some(fixed) = packet.get(next..next + 10) else {
            if truncated {
                break;
            }
            return Err(ParseError::Short);
        };
        let rtype = u16::from_be_bytes([fixed[0], fixed[1]]);
        let class = u16::from_be_bytes([fixed[2], fixed[3]]);
        // A TTL with the top bit set is read as 0 (RFC 2181 §8).
        let ttl = u32::from_be_bytes([fixed[4], fixed[5], fixed[6], fixed[7]]);
        let ttl = if ttl > i32::MAX as u32 { 0 } else { ttl };
        let rdlength = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let start = next + 10;
        if packet.len() < start + rdlength {
            if truncated {
                break;
            }
            return Err(ParseError::Short);
        }
        if class == CLASS_IN {
            records.push((owner, rtype, ttl, start..start + rdlength));
        }
        pos = start + rdlength;
    }

    // The names that lead to the addresses: the one asked for, then each CNAME target.
    let mut names = vec![name.to_vec()];
    let mut chain_ttl = None::<u32>;
    for _ in 0..MAX_CNAMES {
        let current = &names[names.len() - 1];
        let Some((_, _, ttl, rdata)) = records
            .iter()
            .find(|(owner, rtype, _, _)| *rtype == TYPE_CNAME && owner == current)
        else {
            break;
        };
        let (target, _) = read_name(packet, rdata.start)?;
        if names.contains(&target) {
            break;
        }
        chain_ttl = Some(chain_ttl.map_or(*ttl, |t| t.min(*ttl)));
        names.push(target);
    }
    let mut addrs = Vec::new();
    let mut ttl = None::<u32>;
    for (_, _, record_ttl, rdata) in records
        .iter()
        .filter(|(owner, rtype, _, _)| *rtype == qtype.code() && names.contains(owner))
    {
        let data = &packet[rdata.clone()];
        let addr = match qtype {
            QueryType::A => <[u8; 4]>::try_from(data).ok().map(IpAddr::from),
            QueryType::Aaaa => <[u8; 16]>::try_from(data).ok().map(IpAddr::from),
        };
        if let Some(addr) = addr {
            addrs.push(addr);
            ttl = Some(ttl.map_or(*record_ttl, |t| t.min(*record_ttl)));
        }
    }
    Ok(Reply {
        rcode,
        truncated,
        addrs,
        ttl: ttl.map(|t| chain_ttl.map_or(t, |c| c.min(t))),
    })
}

/// The name at `pos`, in wire form with ASCII letters in lower case, and the position after
/// it (after the first pointer, if it jumps).
fn read_name(packet: &[u8], mut pos: usize) -> Result<(Vec<u8>, usize), ParseError> {
    let mut name = Vec::new();
    let mut after = None;
    let mut jumps = 0;
    loop {
        let len = *packet.get(pos).ok_or(ParseError::Short)?;
        match len & 0xc0 {
            0x00 => {
                let len = usize::from(len);
                if len == 0 {
                    name.push(0);
                    if name.len() > MAX_NAME {
                        return Err(ParseError::BadName);
                    }
                    return Ok((name, after.unwrap_or(pos + 1)));
                }
                let label = packet
                    .get(pos + 1..pos + 1 + len)
                    .ok_or(ParseError::Short)?;
                name.push(len as u8);
                name.extend(label.iter().map(u8::to_ascii_lowercase));
                if name.len() >= MAX_NAME {
                    return Err(ParseError::BadName);
                }
                pos += 1 + len;
            }
            0xc0 => {
                let low = *packet.get(pos + 1).ok_or(ParseError::Short)?;
                jumps += 1;
                if jumps > MAX_JUMPS {
                    return Err(ParseError::BadName);
                }
                after.get_or_insert(pos + 2);
                pos = usize::from(u16::from_be_bytes([len & 0x3f, low]));
            }
            // 0x40 and 0x80: extended label types, not used in replies to these queries.
            _ => return Err(ParseError::BadName),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reply to `query` with `answers` (already encoded records) and `flags` ORed in.
    fn reply(query: &[u8], flags: u16, answers: &[Vec<u8>]) -> Vec<u8> {
        let mut packet = query.to_vec();
        let f = u16::from_be_bytes([packet[2], packet[3]]) | 0x8000 | flags;
        packet[2..4].copy_from_slice(&f.to_be_bytes());
        packet[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
        for answer in answers {
            packet.extend_from_slice(answer);
        }
        packet
    }

    /// A record: owner (wire bytes, perhaps a pointer), type, rdata; a TTL of 300 seconds.
    fn record(owner: &[u8], rtype: u16, rdata: &[u8]) -> Vec<u8> {
        record_ttl(owner, rtype, 300, rdata)
    }

    /// A record with the TTL `ttl`.
    fn record_ttl(owner: &[u8], rtype: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
        let mut r = owner.to_vec();
        r.extend_from_slice(&rtype.to_be_bytes());
        r.extend_from_slice(&CLASS_IN.to_be_bytes());
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        r.extend_from_slice(rdata);
        r
    }

    /// A pointer to the question's name, which starts at offset 12.
    const TO_QUESTION: [u8; 2] = [0xc0, 12];

    fn name(host: &str) -> Vec<u8> {
        encode_name(host).unwrap()
    }

    #[test]
    fn names_are_checked_and_lowered() {
        assert_eq!(name("Ab.c."), b"\x02ab\x01c\x00");
        assert!(encode_name("").is_none());
        assert!(encode_name("a..b").is_none());
        assert!(encode_name("a b").is_none());
        assert!(encode_name(&"x".repeat(64)).is_none());
        assert!(encode_name(&["abcdefghi"; 30].join(".")).is_none());
        assert!(encode_name("_srv.my-host.example").is_some());
    }

    #[test]
    fn an_answer_through_a_pointer_is_read() {
        let q = name("app.example");
        let query = build_query(7, &q, QueryType::A);
        let packet = reply(
            &query,
            0,
            &[
                record(&TO_QUESTION, TYPE_A, &[10, 0, 0, 1]),
                record(&TO_QUESTION, TYPE_A, &[10, 0, 0, 2]),
            ],
        );
        let got = parse_reply(&packet, 7, &q, QueryType::A).unwrap();
        assert_eq!(
            got.addrs,
            [IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2])]
        );
        assert_eq!(got.rcode, 0);
        assert!(!got.truncated);
    }

    #[test]
    fn a_cname_chain_in_the_answers_is_followed() {
        let q = name("www.example");
        let query = build_query(9, &q, QueryType::Aaaa);
        // www.example CNAME a.cdn (written out, at offset 12 + len(q) + 4 + 12)
        let first_owner_at = 12 + q.len() + 4;
        let cname_rdata_at = first_owner_at + 2 + 10;
        let mut target = b"\x01a\x03cdn".to_vec();
        target.push(0);
        // a.cdn CNAME b.cdn, where "cdn" is a pointer into the first target.
        let cdn_at = (cname_rdata_at + 2) as u16;
        let b_cdn = [&b"\x01b"[..], &(0xc000 | cdn_at).to_be_bytes()].concat();
        let a_owner = (0xc000 | cname_rdata_at as u16).to_be_bytes();
        let second_rdata_at = cname_rdata_at + target.len() + 2 + 10;
        let b_owner = (0xc000 | second_rdata_at as u16).to_be_bytes();
        let packet = reply(
            &query,
            0,
            &[
                record(&TO_QUESTION, TYPE_CNAME, &target),
                record(&a_owner, TYPE_CNAME, &b_cdn),
                record(&b_owner, TYPE_AAAA, &[0xfd; 16]),
                // An address of another name is not taken.
                record(b"\x05other\x00", TYPE_AAAA, &[0xfe; 16]),
            ],
        );
        let got = parse_reply(&packet, 9, &q, QueryType::Aaaa).unwrap();
        assert_eq!(got.addrs, [IpAddr::from([0xfd; 16])]);
    }

    #[test]
    fn the_ttl_is_the_shortest_of_the_records_that_led_to_the_addresses() {
        let q = name("www.example");
        let query = build_query(5, &q, QueryType::A);
        let cdn = b"\x01a\x03cdn\x00";
        let packet = |cname_ttl: u32, a_ttls: [u32; 2]| {
            reply(
                &query,
                0,
                &[
                    record_ttl(&TO_QUESTION, TYPE_CNAME, cname_ttl, cdn),
                    record_ttl(cdn, TYPE_A, a_ttls[0], &[10, 0, 0, 1]),
                    record_ttl(cdn, TYPE_A, a_ttls[1], &[10, 0, 0, 2]),
                    // Not on the way to the addresses: its TTL does not count.
                    record_ttl(b"\x05other\x00", TYPE_A, 1, &[10, 0, 0, 3]),
                ],
            )
        };
        let ttl = |bytes: Vec<u8>| parse_reply(&bytes, 5, &q, QueryType::A).unwrap().ttl;
        assert_eq!(ttl(packet(600, [60, 30])), Some(30));
        assert_eq!(ttl(packet(20, [60, 30])), Some(20));
        // A TTL with its top bit set counts as 0.
        assert_eq!(ttl(packet(600, [0x8000_0000, 30])), Some(0));
        // No address, no TTL.
        assert_eq!(ttl(reply(&query, 0, &[])), None);
    }

    #[test]
    fn replies_to_something_else_are_refused() {
        let q = name("app.example");
        let query = build_query(7, &q, QueryType::A);
        let packet = reply(&query, 0, &[record(&TO_QUESTION, TYPE_A, &[10, 0, 0, 1])]);
        assert_eq!(
            parse_reply(&packet, 8, &q, QueryType::A),
            Err(ParseError::Mismatch)
        );
        assert_eq!(
            parse_reply(&packet, 7, &name("other.example"), QueryType::A),
            Err(ParseError::Mismatch)
        );
        assert_eq!(
            parse_reply(&packet, 7, &q, QueryType::Aaaa),
            Err(ParseError::Mismatch)
        );
        // The query itself, echoed back, is no reply.
        assert_eq!(
            parse_reply(&query, 7, &q, QueryType::A),
            Err(ParseError::NotReply)
        );
    }

    #[test]
    fn the_question_may_differ_in_case() {
        let q = name("app.example");
        let query = build_query(7, &name("APP.Example"), QueryType::A);
        let mut shouty = query.clone();
        shouty[13..16].copy_from_slice(b"APP");
        let packet = reply(&shouty, 0, &[record(&TO_QUESTION, TYPE_A, &[10, 0, 0, 1])]);
        assert_eq!(
            parse_reply(&packet, 7, &q, QueryType::A)
                .unwrap()
                .addrs
                .len(),
            1
        );
    }

    #[test]
    fn a_truncated_reply_is_used_as_it_is() {
        let q = name("app.example");
        let query = build_query(7, &q, QueryType::A);
        let mut packet = reply(
            &query,
            0x0200,
            &[
                record(&TO_QUESTION, TYPE_A, &[10, 0, 0, 1]),
                record(&TO_QUESTION, TYPE_A, &[10, 0, 0, 2]),
            ],
        );
        packet.truncate(packet.len() - 3);
        let got = parse_reply(&packet, 7, &q, QueryType::A).unwrap();
        assert!(got.truncated);
        assert_eq!(got.addrs, [IpAddr::from([10, 0, 0, 1])]);
    }

    #[test]
    fn pointer_loops_and_bad_labels_are_errors() {
        let q = name("a");
        let query = build_query(1, &q, QueryType::A);
        // An owner that points at itself.
        let at = (12 + q.len() + 4) as u16;
        let looped = reply(
            &query,
            0,
            &[record(&(0xc000 | at).to_be_bytes(), TYPE_A, &[1, 2, 3, 4])],
        );
        assert_eq!(
            parse_reply(&looped, 1, &q, QueryType::A),
            Err(ParseError::BadName)
        );
        let extended = reply(&query, 0, &[record(&[0x41, 0], TYPE_A, &[1, 2, 3, 4])]);
        assert_eq!(
            parse_reply(&extended, 1, &q, QueryType::A),
            Err(ParseError::BadName)
        );
        // A name longer than 255 bytes, built of pointers to labels of 63.
        let mut long = reply(&query, 0, &[]);
        let labels_at = long.len();
        for _ in 0..5 {
            long.push(63);
            long.extend_from_slice(&[b'x'; 63]);
        }
        long.push(0);
        long[6..8].copy_from_slice(&1u16.to_be_bytes());
        long.extend_from_slice(&record(
            &(0xc000 | labels_at as u16).to_be_bytes(),
            TYPE_A,
            &[1, 2, 3, 4],
        ));
        assert_eq!(
            parse_reply(&long, 1, &q, QueryType::A),
            Err(ParseError::BadName)
        );
    }

    #[test]
    fn every_prefix_and_every_byte_flip_is_survived() {
        let q = name("www.example");
        let query = build_query(3, &q, QueryType::A);
        let packet = reply(
            &query,
            0,
            &[
                record(&TO_QUESTION, TYPE_CNAME, b"\x01a\x03cdn\x00"),
                record(b"\x01a\x03cdn\x00", TYPE_A, &[10, 0, 0, 1]),
            ],
        );
        assert_eq!(
            parse_reply(&packet, 3, &q, QueryType::A).unwrap().addrs,
            [IpAddr::from([10, 0, 0, 1])]
        );
        for len in 0..packet.len() {
            let _ = parse_reply(&packet[..len], 3, &q, QueryType::A);
        }
        for i in 0..packet.len() {
            for byte in [0x00, 0x01, 0x3f, 0x40, 0x80, 0xc0, 0xc1, 0xff] {
                let mut bent = packet.clone();
                bent[i] = byte;
                let _ = parse_reply(&bent, 3, &q, QueryType::A);
            }
        }
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..80);
            let mut noise: Vec<u8> = std::iter::repeat_with(|| rng.u8(..)).take(len).collect();
            if noise.len() >= 4 {
                // Often a plausible header, so the parser gets past the first checks.
                noise[0..2].copy_from_slice(&3u16.to_be_bytes());
                noise[2] |= 0x80;
                noise[2] &= 0x87;
            }
            let _ = parse_reply(&noise, 3, &q, QueryType::A);
        }
    }

    /// A resolver on 127.0.0.1:0 that answers each of the first `n` queries it gets with
    /// `answer(query)`.
    fn resolver(n: usize, answer: impl Fn(&[u8]) -> Vec<u8> + Send + 'static) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0; 512];
            for _ in 0..n {
                let Ok((len, from)) = socket.recv_from(&mut buf) else {
                    return;
                };
                let _ = socket.send_to(&answer(&buf[..len]), from);
            }
        });
        addr
    }

    /// The answer of a resolver that knows 10.0.0.1 as every name's only address.
    fn knows(query: &[u8]) -> Vec<u8> {
        let a = query[query.len() - 4..query.len() - 2] == TYPE_A.to_be_bytes();
        let answers = if a {
            vec![record(&TO_QUESTION, TYPE_A, &[10, 0, 0, 1])]
        } else {
            vec![]
        };
        reply(query, 0, &answers)
    }

    /// The header alone, with `rcode`: what some servers send when they refuse a query.
    fn header_only(query: &[u8], rcode: u16) -> Vec<u8> {
        let mut packet = query[..12].to_vec();
        packet[2..4].copy_from_slice(&(0x8180 | rcode).to_be_bytes());
        packet[4..12].fill(0);
        packet
    }

    #[test]
    fn a_refusal_without_the_question_passes_the_name_on_at_once() {
        let refuses = resolver(2, |query| header_only(query, 5));
        let answers = resolver(2, knows);
        let started = Instant::now();
        let got = lookup("app.example", &[refuses, answers], Duration::from_secs(5));
        assert_eq!(got.unwrap().addrs, [IpAddr::from([10, 0, 0, 1])]);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "took {took:?}");
        // Only as a failure: a header alone cannot say the name has no address.
        let q = name("app.example");
        let query = build_query(4, &q, QueryType::A);
        assert_eq!(
            parse_reply(&header_only(&query, 0), 4, &q, QueryType::A),
            Err(ParseError::Mismatch)
        );
        assert_eq!(
            parse_reply(&header_only(&query, 3), 4, &q, QueryType::A),
            Err(ParseError::Mismatch)
        );
    }

    #[test]
    fn a_lost_query_is_sent_again_within_the_timeout() {
        // The first query is lost on the way; the resolver answers what comes after.
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let lossy = socket.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0; 512];
            for i in 0..4 {
                let Ok((len, from)) = socket.recv_from(&mut buf) else {
                    return;
                };
                if i > 0 {
                    let _ = socket.send_to(&knows(&buf[..len]), from);
                }
            }
        });
        let got = lookup("app.example", &[lossy], Duration::from_secs(2));
        assert_eq!(got.unwrap().addrs, [IpAddr::from([10, 0, 0, 1])]);
    }

    #[test]
    fn a_name_with_only_ipv6_addresses_or_written_unusually_resolves() {
        let v6 = resolver(2, |query| {
            let aaaa = query[query.len() - 4..query.len() - 2] == TYPE_AAAA.to_be_bytes();
            let answers = if aaaa {
                vec![record(&TO_QUESTION, TYPE_AAAA, &[0xfd; 16])]
            } else {
                vec![]
            };
            reply(query, 0, &answers)
        });
        let got = lookup("app.example", &[v6], Duration::from_secs(5));
        assert_eq!(got.unwrap().addrs, [IpAddr::from([0xfd; 16])]);
        let answers = resolver(2, knows);
        let got = lookup("App.EXAMPLE.", &[answers], Duration::from_secs(5));
        assert_eq!(got.unwrap().addrs, [IpAddr::from([10, 0, 0, 1])]);
    }

    /// Whether `query` asks for AAAA records.
    fn asks_aaaa(query: &[u8]) -> bool {
        query[query.len() - 4..query.len() - 2] == TYPE_AAAA.to_be_bytes()
    }

    /// A resolver on 127.0.0.1:0 that answers A queries as [`knows`] does and never AAAA
    /// ones, as behind some middleboxes.
    fn drops_aaaa() -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0; 512];
            for _ in 0..8 {
                let Ok((len, from)) = socket.recv_from(&mut buf) else {
                    return;
                };
                if !asks_aaaa(&buf[..len]) {
                    let _ = socket.send_to(&knows(&buf[..len]), from);
                }
            }
        });
        addr
    }

    #[test]
    fn an_answered_family_is_enough_when_the_other_is_never_answered() {
        let started = Instant::now();
        let got = lookup("app.example", &[drops_aaaa()], Duration::from_secs(4));
        assert_eq!(got.unwrap().addrs, [IpAddr::from([10, 0, 0, 1])]);
        // The other family gets a short wait once the first answered, not the whole timeout.
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "took {took:?}");

        // A family refused, rather than dropped, does not fail the other either.
        let refuses_aaaa = resolver(2, |query| {
            if asks_aaaa(query) {
                reply(query, 5, &[])
            } else {
                knows(query)
            }
        });
        let got = lookup("app.example", &[refuses_aaaa], Duration::from_secs(4));
        assert_eq!(got.unwrap().addrs, [IpAddr::from([10, 0, 0, 1])]);

        // One family with no address and the other unanswered says nothing of the name: the
        // next resolver is asked.
        let v6_dropped = resolver(2, |query| {
            // An empty datagram, which is no reply: the AAAA query goes unanswered.
            if asks_aaaa(query) {
                Vec::new()
            } else {
                reply(query, 0, &[])
            }
        });
        let answers = resolver(2, knows);
        let got = lookup(
            "app.example",
            &[v6_dropped, answers],
            Duration::from_secs(4),
        );
        assert_eq!(got.unwrap().addrs, [IpAddr::from([10, 0, 0, 1])]);
    }

    #[test]
    fn addresses_no_backend_can_have_are_set_apart() {
        for ip in [
            "0.0.0.0",
            "::",
            "::ffff:0.0.0.0",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
        ] {
            assert!(!usable(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["127.0.0.1", "10.0.0.1", "::1", "fd00::1", "192.168.1.255"] {
            assert!(usable(ip.parse().unwrap()), "{ip}");
        }
        let mixed = resolver(2, |query| {
            let answers = if asks_aaaa(query) {
                vec![record(&TO_QUESTION, TYPE_AAAA, &[0; 16])]
            } else {
                [[0, 0, 0, 0], [10, 0, 0, 1], [239, 1, 1, 1]]
                    .iter()
                    .map(|ip| record(&TO_QUESTION, TYPE_A, ip))
                    .collect()
            };
            reply(query, 0, &answers)
        });
        let got = lookup("app.example", &[mixed], Duration::from_secs(4)).unwrap();
        assert_eq!(got.addrs, [IpAddr::from([10, 0, 0, 1])]);
        let skipped: Vec<IpAddr> = ["0.0.0.0", "239.1.1.1", "::"]
            .iter()
            .map(|ip| ip.parse().unwrap())
            .collect();
        assert_eq!(got.skipped, skipped);

        let blocked = resolver(2, |query| {
            let answers = if asks_aaaa(query) {
                vec![]
            } else {
                vec![record(&TO_QUESTION, TYPE_A, &[0, 0, 0, 0])]
            };
            reply(query, 0, &answers)
        });
        let got = lookup("app.example", &[blocked], Duration::from_secs(4));
        assert!(
            matches!(&got, Err(DnsError::Unusable { skipped, .. }) if skipped == &[IpAddr::from([0, 0, 0, 0])]),
            "{got:?}"
        );
    }

    #[test]
    fn a_failure_asks_the_next_resolver_and_no_such_name_does_not() {
        let fails = resolver(2, |query| reply(query, 2, &[]));
        let answers = resolver(2, knows);
        let got = lookup("app.example", &[fails, answers], Duration::from_secs(5));
        assert_eq!(got.unwrap().addrs, [IpAddr::from([10, 0, 0, 1])]);

        let unknown = resolver(2, |query| reply(query, 3, &[]));
        let answers = resolver(2, knows);
        let got = lookup("app.example", &[unknown, answers], Duration::from_secs(5));
        assert!(matches!(got, Err(DnsError::NoAddress(_))), "{got:?}");
    }

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# comment\nnameserver 10.0.0.53\nsearch example\n; another\noptions timeout:1 rotate\n\
                    nameserver ::1 # trailing\n  nameserver\t10.0.0.54\nnameserver\nnameserver not-an-ip\n";
        assert_eq!(
            parse_resolv_conf(text).nameservers,
            [
                SocketAddr::from(([10, 0, 0, 53], 53)),
                SocketAddr::from((Ipv6Addr::LOCALHOST, 53)),
                SocketAddr::from(([10, 0, 0, 54], 53)),
            ]
        );
    }

    fn domains(list: &[&str]) -> Vec<String> {
        list.iter().map(|d| (*d).to_owned()).collect()
    }

    #[test]
    fn resolv_conf_search_domain_and_ndots() {
        // Kubernetes' file for a pod.
        let pod = "nameserver 10.96.0.10\nsearch prod.svc.cluster.local svc.cluster.local cluster.local\n\
                   options ndots:5\n";
        assert_eq!(
            parse_resolv_conf(pod).search,
            Search {
                domains: domains(&[
                    "prod.svc.cluster.local",
                    "svc.cluster.local",
                    "cluster.local"
                ]),
                ndots: 5,
            }
        );
        // None of them: no search, ndots 1.
        assert_eq!(
            parse_resolv_conf("nameserver 10.0.0.1\n").search,
            Search::default()
        );
        assert_eq!(Search::default().ndots, 1);
        // The last search or domain line wins; domain is a list of one.
        let text = "search a.example b.example\ndomain c.example d.example\n";
        assert_eq!(
            parse_resolv_conf(text).search.domains,
            domains(&["c.example"])
        );
        let text = "domain c.example\nsearch a.example b.example\n";
        assert_eq!(
            parse_resolv_conf(text).search.domains,
            domains(&["a.example", "b.example"])
        );
        // Trailing dots go, invalid names, repeats (in any case) and what follows a comment are
        // passed over, and a search line without domains turns the search off.
        let text = "search A.example. bad..name a.example . b.example # c.example\n";
        assert_eq!(
            parse_resolv_conf(text).search.domains,
            domains(&["A.example", "b.example"])
        );
        assert_eq!(
            parse_resolv_conf("domain a.example\nsearch\n")
                .search
                .domains,
            Vec::<String>::new()
        );
        // ndots: the last one, at most 15, one that is not a number passed over.
        for (options, ndots) in [
            ("options ndots:2 timeout:1\noptions rotate ndots:3", 3),
            ("options ndots:0", 0),
            ("options ndots:40", 15),
            ("options ndots:2\noptions ndots:x ndots:-1 ndots:", 2),
            ("options ndots 4", 1),
        ] {
            assert_eq!(parse_resolv_conf(options).search.ndots, ndots, "{options}");
        }
    }

    #[test]
    fn localdomain_and_res_options_override_the_file() {
        let file = parse_resolv_conf("search a.example\noptions ndots:2\n").search;
        let mut search = file.clone();
        apply_env(&mut search, None, None);
        assert_eq!(search, file);
        apply_env(
            &mut search,
            Some(" b.example  c.example "),
            Some("rotate ndots:4"),
        );
        assert_eq!(
            search,
            Search {
                domains: domains(&["b.example", "c.example"]),
                ndots: 4,
            }
        );
        apply_env(&mut search, Some(""), Some(""));
        assert_eq!(
            search,
            Search {
                domains: Vec::new(),
                ndots: 4,
            }
        );
    }

    #[test]
    fn the_names_asked_follow_ndots_and_a_trailing_dot() {
        let search = Search {
            domains: domains(&["prod.svc", "svc"]),
            ndots: 1,
        };
        // Fewer dots than ndots: completed first.
        assert_eq!(
            candidates("api", &search),
            ["api.prod.svc", "api.svc", "api"]
        );
        // As many or more: as written first.
        assert_eq!(
            candidates("api.prod", &search),
            ["api.prod", "api.prod.prod.svc", "api.prod.svc"]
        );
        let five = Search {
            ndots: 5,
            ..search.clone()
        };
        assert_eq!(
            candidates("api.prod", &five),
            ["api.prod.prod.svc", "api.prod.svc", "api.prod"]
        );
        let zero = Search {
            ndots: 0,
            ..search.clone()
        };
        assert_eq!(candidates("api", &zero), ["api", "api.prod.svc", "api.svc"]);
        // A name ending in a dot is only asked as written; so is any without a search list.
        assert_eq!(candidates("api.", &search), ["api."]);
        assert_eq!(candidates("api", &Search::default()), ["api"]);
        // A completion too long for a name is left out: this one is 250 bytes, 3 short.
        let long = "x".repeat(63);
        let host = format!("{long}.{long}.{long}.{}", "y".repeat(58));
        assert!(encode_name(&host).is_some());
        assert_eq!(candidates(&host, &search), [host]);
    }

    /// A resolver on 127.0.0.1:0 that answers the first `n` queries: a name of `known` with
    /// 10.0.0.1 as its only address, a name of `failing` with SERVFAIL, any other with NXDOMAIN.
    fn zone(
        n: usize,
        known: &'static [&'static str],
        failing: &'static [&'static str],
    ) -> SocketAddr {
        resolver(n, move |query| {
            let is = |names: &[&str]| names.iter().any(|n| query[12..].starts_with(&name(n)));
            if is(known) {
                knows(query)
            } else if is(failing) {
                reply(query, 2, &[])
            } else {
                reply(query, 3, &[])
            }
        })
    }

    #[test]
    fn the_first_name_of_the_search_list_with_addresses_answers() {
        let search = Search {
            domains: domains(&["a.test", "b.test", "c.test"]),
            ndots: 1,
        };
        let timeout = Duration::from_secs(4);
        let dns = zone(8, &["app.b.test", "app.c.test"], &[]);
        let got = resolve("app", &search, &[dns], timeout).unwrap();
        assert_eq!(got.name, "app.b.test");
        assert_eq!(got.addrs, [IpAddr::from([10, 0, 0, 1])]);

        // None has an address: an answer, naming every name asked.
        let dns = zone(8, &[], &[]);
        let got = resolve("app", &search, &[dns], timeout).unwrap_err();
        assert!(got.is_answer(), "{got:?}");
        assert_eq!(
            got.to_string(),
            "no name of the search list has an address (asked `app.a.test`, `app.b.test`, \
             `app.c.test`, `app`)"
        );

        // A failure ends the search: the next name, which has addresses, is not asked.
        let dns = zone(8, &["app.b.test"], &["app.a.test"]);
        let got = resolve("app", &search, &[dns], timeout).unwrap_err();
        assert!(!got.is_answer(), "{got:?}");
        assert!(
            matches!(&got, DnsError::SearchFailed { name, .. } if name == "app.a.test"),
            "{got:?}"
        );
        assert!(
            got.to_string()
                .starts_with("asking for `app.a.test` failed"),
            "{got}"
        );

        // A name that is not one is said as written.
        let got = resolve("app..x", &search, &[dns], timeout).unwrap_err();
        assert!(matches!(got, DnsError::BadName(name) if name == "app..x"));
    }

    #[test]
    fn a_link_local_nameserver_keeps_its_interface() {
        let link_local: Ipv6Addr = "fe80::1".parse().unwrap();
        let lo = crate::sys::interface_index("lo").expect("a loopback interface");
        let text = "nameserver fe80::1%lo\nnameserver fe80::1%7\nnameserver fe80::1%no-such-if0\n\
                    nameserver fe80::1%\nnameserver 10.0.0.1%lo\n";
        assert_eq!(
            parse_resolv_conf(text).nameservers,
            [
                SocketAddr::from(SocketAddrV6::new(link_local, 53, 0, lo)),
                SocketAddr::from(SocketAddrV6::new(link_local, 53, 0, 7)),
            ]
        );
    }
}
