//! Backends discovered through the DNS: the host names of entries with `resolve = true` are
//! looked up again every `global.resolve_interval`, or sooner when their records' TTL is
//! shorter, and a pool whose names now resolve to other addresses is rebuilt with them
//! (`ServerHandle::replace_pool`).
//!
//! One task does it for the whole process, from `Server::run` to the shutdown. The lookups
//! block (`dns::lookup_all`), so each round runs on a blocking thread, its names looked up
//! together (each once) so that a resolver that does not answer costs a round one timeout, not
//! one a name. A name that cannot be resolved keeps the addresses it had: a resolver that is
//! down must not empty a pool. That is logged once when it starts and once when it ends, not
//! every interval. A name the resolvers answer for with no address keeps them only for
//! `global.resolve_hold`: the addresses of a service that is gone may soon be another's. A
//! reload looks every name up itself, so it starts the interval over.
//!
//! A short name is completed with the search list (`dns::resolve`) each time, in the same
//! order, so the name that answers stays the one that answered while it has addresses; when
//! another answers instead, that is logged at `info`.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::config::{MIN_RESOLVE_INTERVAL, PoolConfig};
use crate::dns::{self, DnsError, Resolved};
use crate::server::ServerHandle;

/// The answer for each name of a round.
type Answers = HashMap<String, Result<Resolved, DnsError>>;

/// Index of each result in `ServerHandle::resolutions`.
const SAME: usize = 0;
const CHANGED: usize = 1;
const FAILED: usize = 2;

/// Looks the names up every interval until the shutdown.
pub async fn run(handle: ServerHandle) {
    let shutdown = handle.shutdown_token();
    // The names whose last lookup failed, (pool, host, port), and the pools whose last
    // answers did not fit them, (pool, "", 0).
    let mut failing: HashSet<(String, String, u16)> = HashSet::new();
    // The addresses each name's last answer held that no backend can have.
    let mut skipped: HashMap<String, Vec<IpAddr>> = HashMap::new();
    // The TTL of each name's last answer: those the load found, after a start or a reload
    // (which looks every name up itself), then those of the rounds.
    let mut ttls: HashMap<String, Duration> = HashMap::new();
    // Since when the resolvers have said that each name has no address, for `resolve_hold`.
    let mut absent: HashMap<String, Instant> = HashMap::new();
    // The name of the search list that last answered for each name written.
    let mut answered: HashMap<String, String> = HashMap::new();
    let mut reloaded = true;
    loop {
        let config = handle.config();
        if std::mem::take(&mut reloaded) {
            // The reload found an address for every name.
            absent.clear();
            ttls.clear();
            answered.clear();
            for name in config
                .pools
                .values()
                .flat_map(|pool| pool.discovery.iter().flat_map(|d| &d.names))
            {
                let ttl = ttls.entry(name.host.clone()).or_insert(name.ttl);
                *ttl = name.ttl.min(*ttl);
                answered.insert(name.host.clone(), name.answered.clone());
            }
        }
        let hold = config.global.resolve_hold;
        let now = Instant::now();
        // The round after a hold ends comes when it ends, so that the addresses leave then.
        let holds = absent
            .values()
            .map(|&since| (since + hold).saturating_duration_since(now));
        let wait = next_round(
            config.global.resolve_interval,
            ttls.values().copied().chain(holds),
        );
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = handle.reloaded() => {
                reloaded = true;
                continue;
            }
            () = tokio::time::sleep(wait) => {}
        }
        let pools: Vec<PoolConfig> = config
            .pools
            .values()
            .filter(|p| p.discovery.is_some())
            .cloned()
            .collect();
        if pools.is_empty() {
            continue;
        }
        let resolvers = config.global.resolvers.clone();
        let search = config.global.search.clone();
        // Every name of every pool at once, and each once however many entries name it: a
        // resolver that times out on one name must not hold the others' answers back by as
        // long again.
        let mut hosts: Vec<String> = pools
            .iter()
            .flat_map(|pool| pool.discovery.iter().flat_map(|d| &d.names))
            .map(|name| name.host.clone())
            .collect();
        hosts.sort_unstable();
        hosts.dedup();
        let looked_up = tokio::task::spawn_blocking(move || {
            let names: Vec<&str> = hosts.iter().map(String::as_str).collect();
            let results = dns::lookup_all(&names, &search, &resolvers, dns::QUERY_TIMEOUT);
            hosts.into_iter().zip(results).collect::<Answers>()
        })
        .await;
        let Ok(answers) = looked_up else {
            continue;
        };
        // A name found, or not answered for (nothing is known of it then), starts over.
        let now = Instant::now();
        absent.retain(|host, _| matches!(answers.get(host), Some(Err(e)) if e.is_answer()));
        for (host, answer) in &answers {
            if matches!(answer, Err(e) if e.is_answer()) {
                absent.entry(host.clone()).or_insert(now);
            }
        }
        warn_of_skipped(&mut skipped, &answers);
        note_answering_names(&mut answered, &answers);
        // A name that failed keeps the TTL it had, as it keeps its addresses.
        ttls.retain(|host, _| answers.contains_key(host));
        for (host, answer) in &answers {
            if let Ok(resolved) = answer {
                ttls.insert(host.clone(), resolved.ttl);
            }
        }
        let looked_up = pools.into_iter().map(|pool| {
            let answers = pool
                .discovery
                .iter()
                .flat_map(|d| &d.names)
                .map(|name| match answers.get(&name.host) {
                    Some(Ok(resolved)) => Outcome::Found(
                        resolved
                            .addrs
                            .iter()
                            .map(|&ip| SocketAddr::new(ip, name.port))
                            .collect(),
                    ),
                    Some(Err(error))
                        if absent
                            .get(&name.host)
                            .is_some_and(|&since| now.duration_since(since) >= hold) =>
                    {
                        Outcome::Gone(error.clone())
                    }
                    Some(Err(error)) => Outcome::Failed(error.clone()),
                    None => Outcome::Failed(DnsError::Unfinished(name.host.clone())),
                })
                .collect::<Vec<_>>();
            (pool, answers)
        });
        let mut current = config;
        for (pool, answers) in looked_up {
            let Some(next) = follow(&handle, &mut failing, &pool, answers) else {
                continue;
            };
            match handle.replace_pool(&current, next).await {
                Some(config) => current = config,
                // A reload came first and looked the names up itself, or the process is
                // ending: this round's answers are stale.
                None => break,
            }
        }
    }
}

/// How long to wait for the next round: `interval`, or the shortest of `ttls` if that is
/// shorter (as NGINX follows it), but never less than [`MIN_RESOLVE_INTERVAL`],
/// so that records with a TTL of 0 (as some service registries give) do not have the
/// resolvers asked without pause.
fn next_round(interval: Duration, ttls: impl Iterator<Item = Duration>) -> Duration {
    ttls.fold(interval, Duration::min).max(MIN_RESOLVE_INTERVAL)
}

/// What a round makes of one name.
enum Outcome {
    /// The addresses it resolves to now.
    Found(Vec<SocketAddr>),
    /// No address this time: the name keeps the ones it had.
    Failed(DnsError),
    /// The resolvers have said for `resolve_hold` that it has no address: its addresses leave.
    Gone(DnsError),
}

/// Counts and logs the answers for `pool`'s names; returns the pool with them when its
/// addresses changed.
fn follow(
    handle: &ServerHandle,
    failing: &mut HashSet<(String, String, u16)>,
    pool: &PoolConfig,
    answers: Vec<Outcome>,
) -> Option<PoolConfig> {
    let discovery = pool.discovery.as_ref()?;
    let mut kept = Vec::with_capacity(answers.len());
    for (name, answer) in discovery.names.iter().zip(answers) {
        let key = (pool.name.clone(), name.host.clone(), name.port);
        match answer {
            Outcome::Failed(error) => {
                handle.count_resolution(FAILED);
                if failing.insert(key) {
                    warn!(pool = %pool.name, name = %name.host, %error, kept = ?name.addrs, "cannot resolve a backend name; keeping its last addresses");
                }
                kept.push(None);
            }
            Outcome::Gone(error) => {
                handle.count_resolution(FAILED);
                failing.insert(key);
                if !name.addrs.is_empty() {
                    warn!(pool = %pool.name, name = %name.host, %error, removed = ?name.addrs, "a backend name has had no address for resolve_hold; its addresses leave the pool");
                }
                kept.push(Some(Vec::new()));
            }
            Outcome::Found(mut addrs) => {
                if failing.remove(&key) {
                    info!(pool = %pool.name, name = %name.host, "a backend name resolves again");
                }
                addrs.sort();
                addrs.dedup();
                handle.count_resolution(if addrs == name.addrs { SAME } else { CHANGED });
                kept.push(Some(addrs));
            }
        }
    }
    let next = pool.with_answers(&kept);
    if next.backends == pool.backends {
        return None;
    }
    let key = (pool.name.clone(), String::new(), 0);
    if let Some(reason) = next.too_large() {
        if failing.insert(key) {
            warn!(pool = %pool.name, %reason, "the addresses the names resolve to do not fit the pool; keeping the last ones");
        }
        return None;
    }
    failing.remove(&key);
    let before: HashSet<SocketAddr> = pool.backends.iter().map(|b| b.addr).collect();
    let after: HashSet<SocketAddr> = next.backends.iter().map(|b| b.addr).collect();
    info!(
        pool = %pool.name,
        added = ?after.difference(&before).collect::<Vec<_>>(),
        removed = ?before.difference(&after).collect::<Vec<_>>(),
        "backends follow the DNS"
    );
    Some(next)
}

/// Logs the name of the search list that answered for each name, at `info` when it is
/// another than the one that answered last; `answered` holds those.
fn note_answering_names(answered: &mut HashMap<String, String>, answers: &Answers) {
    for (host, answer) in answers {
        let Ok(resolved) = answer else {
            continue;
        };
        match answered.insert(host.clone(), resolved.name.clone()) {
            Some(before) if before != resolved.name => {
                info!(name = %host, answered = %resolved.name, before = %before, "a backend name now resolves as another name of the search list");
            }
            Some(_) => {}
            None => debug!(name = %host, answered = %resolved.name, "a backend name resolves"),
        }
    }
}

/// Warns of the addresses no backend can have in `answers`, once for each name while they stay
/// the same; `skipped` holds those of the last answers.
fn warn_of_skipped(skipped: &mut HashMap<String, Vec<IpAddr>>, answers: &Answers) {
    for (host, answer) in answers {
        let now: &[IpAddr] = match answer {
            Ok(resolved) => &resolved.skipped,
            Err(DnsError::Unusable { skipped, .. }) => skipped,
            // Nothing is known of a name that was not answered.
            Err(_) => continue,
        };
        if now.is_empty() {
            skipped.remove(host);
        } else if skipped
            .get(host)
            .is_none_or(|before| before.as_slice() != now)
        {
            warn!(name = %host, skipped = ?now, "a backend name resolves to addresses no backend can have; passing over them");
            skipped.insert(host.clone(), now.to_vec());
        }
    }
    skipped.retain(|host, _| answers.contains_key(host));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_round_follows_a_shorter_ttl_down_to_a_floor() {
        let secs = Duration::from_secs;
        let interval = secs(30);
        assert_eq!(next_round(interval, std::iter::empty()), interval);
        assert_eq!(
            next_round(interval, [secs(300), secs(60)].into_iter()),
            interval
        );
        assert_eq!(
            next_round(interval, [secs(300), secs(5)].into_iter()),
            secs(5)
        );
        assert_eq!(
            next_round(interval, [secs(0), secs(5)].into_iter()),
            MIN_RESOLVE_INTERVAL
        );
    }
}
