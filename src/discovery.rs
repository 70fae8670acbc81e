//! Backends discovered through the DNS: the host names of entries with `resolve = true` are
//! looked up again every `global.resolve_interval`, and a pool whose names now resolve to
//! other addresses is rebuilt with them (`ServerHandle::replace_pool`).
//!
//! One task does it for the whole process, from `Server::run` to the shutdown. The lookups
//! block (`dns::lookup_all`), so each round runs on a blocking thread, its names looked up
//! together (each once) so that a resolver that does not answer costs a round one timeout, not
//! one a name. A name that cannot be resolved, or resolves to nothing, keeps the addresses it
//! had: a resolver that is down must not empty a pool. That is logged once when it starts and
//! once when it ends, not every interval. A reload looks every name up itself, so it starts
//! the interval over.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use tracing::{info, warn};

use crate::config::PoolConfig;
use crate::dns::{self, DnsError};
use crate::server::ServerHandle;

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
    loop {
        let config = handle.config();
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = handle.reloaded() => continue,
            () = tokio::time::sleep(config.global.resolve_interval) => {}
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
        let looked_up = tokio::task::spawn_blocking(move || {
            // Every name of every pool at once, and each once however many entries name it:
            // a resolver that times out on one name must not hold the others' answers back by
            // as long again.
            let mut hosts: Vec<&str> = pools
                .iter()
                .flat_map(|pool| pool.discovery.iter().flat_map(|d| &d.names))
                .map(|name| name.host.as_str())
                .collect();
            hosts.sort_unstable();
            hosts.dedup();
            let answers: HashMap<&str, Result<Vec<IpAddr>, DnsError>> = hosts
                .iter()
                .copied()
                .zip(dns::lookup_all(&hosts, &resolvers, dns::QUERY_TIMEOUT))
                .collect();
            pools
                .iter()
                .map(|pool| {
                    let answers = pool
                        .discovery
                        .iter()
                        .flat_map(|d| &d.names)
                        .map(|name| match answers.get(name.host.as_str()) {
                            Some(Ok(ips)) => Ok(ips
                                .iter()
                                .map(|&ip| SocketAddr::new(ip, name.port))
                                .collect::<Vec<_>>()),
                            Some(Err(error)) => Err(error.clone()),
                            None => Err(DnsError::NoAddress(name.host.clone())),
                        })
                        .collect::<Vec<_>>();
                    (pool.clone(), answers)
                })
                .collect::<Vec<_>>()
        })
        .await;
        let Ok(looked_up) = looked_up else {
            continue;
        };
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

/// Counts and logs the answers for `pool`'s names; returns the pool with them when its
/// addresses changed.
fn follow(
    handle: &ServerHandle,
    failing: &mut HashSet<(String, String, u16)>,
    pool: &PoolConfig,
    answers: Vec<Result<Vec<SocketAddr>, DnsError>>,
) -> Option<PoolConfig> {
    let discovery = pool.discovery.as_ref()?;
    let mut kept = Vec::with_capacity(answers.len());
    for (name, answer) in discovery.names.iter().zip(answers) {
        let key = (pool.name.clone(), name.host.clone(), name.port);
        match answer {
            Err(error) => {
                handle.count_resolution(FAILED);
                if failing.insert(key) {
                    warn!(pool = %pool.name, name = %name.host, %error, kept = ?name.addrs, "cannot resolve a backend name; keeping its last addresses");
                }
                kept.push(Vec::new());
            }
            Ok(mut addrs) => {
                if failing.remove(&key) {
                    info!(pool = %pool.name, name = %name.host, "a backend name resolves again");
                }
                addrs.sort();
                addrs.dedup();
                handle.count_resolution(if addrs == name.addrs { SAME } else { CHANGED });
                kept.push(addrs);
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
