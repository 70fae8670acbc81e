//! Pools as the data path sees them: candidates, a balancer and connect settings.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::Registry;
use crate::balance::{self, Balancer, Candidate, PickContext};
use crate::config::{Config, PoolConfig, ProxyProtocolVersion};
use crate::tls::{TlsStore, UpstreamConnector};

/// A pool compiled for one configuration snapshot.
#[derive(Debug)]
pub struct Pool {
    /// Name from the file, for logs.
    pub name: String,
    /// Backends in file order.
    pub candidates: Vec<Candidate>,
    /// Chooses among `candidates`.
    balancer: Box<dyn Balancer>,
    /// Time allowed for one connect.
    pub connect_timeout: Duration,
    /// Distinct backends one connection may try.
    pub connect_attempts: usize,
    /// PROXY protocol header to prepend toward backends.
    pub send_proxy_protocol: Option<ProxyProtocolVersion>,
    /// http: time a backend has to start its response, and the longest pause within one.
    pub response_timeout: Duration,
    /// http: the protocol spoken to the backends.
    pub upstream_protocol: crate::config::UpstreamProtocol,
    /// http: TLS toward the backends, built from the files by `tls::TlsStore`.
    pub tls: Option<Arc<UpstreamConnector>>,
}

impl Pool {
    /// Compiles a pool, taking live backend state from `registry` and its TLS settings from
    /// `tls`.
    pub fn new(config: &PoolConfig, registry: &Registry, tls: &TlsStore) -> Pool {
        let candidates: Vec<Candidate> = config
            .backends
            .iter()
            .map(|b| Candidate {
                weight: b.weight,
                state: registry.state(&config.name, b.addr),
            })
            .collect();
        Pool {
            name: config.name.clone(),
            balancer: balance::build(config.balance, &candidates),
            candidates,
            connect_timeout: config.connect_timeout,
            connect_attempts: config.connect_attempts,
            send_proxy_protocol: config.send_proxy_protocol,
            response_timeout: config.response_timeout,
            upstream_protocol: config.upstream_protocol,
            tls: tls.pool(&config.name),
        }
    }

    /// The key pooled connections of this pool's backend `addr` are filed under: connections
    /// made with other TLS settings (or none) are never mixed with these.
    pub fn conn_key(&self, addr: std::net::SocketAddr) -> crate::http::upstream::ConnKey {
        (addr, self.tls.as_ref().map_or(0, UpstreamConnector::key))
    }

    /// Chooses a backend for one connection, skipping those in `ctx.tried`.
    #[inline]
    pub fn pick(&self, ctx: &PickContext<'_>) -> Option<(usize, &Candidate)> {
        let index = self.balancer.pick(&self.candidates, ctx)?;
        Some((index, &self.candidates[index]))
    }
}

/// Everything the data path reads from the configuration, compiled once and shared immutably.
/// A reload builds a new one; a connection keeps the snapshot it started with.
#[derive(Debug)]
pub struct Snapshot {
    /// Pools by name.
    pub pools: HashMap<String, Arc<Pool>>,
}

impl Snapshot {
    /// Compiles every pool of `config`, with the TLS settings `tls` built from it.
    pub fn new(config: &Config, registry: &Registry, tls: &TlsStore) -> Snapshot {
        let pools = config
            .pools
            .values()
            .map(|p| (p.name.clone(), Arc::new(Pool::new(p, registry, tls))))
            .collect();
        Snapshot { pools }
    }

    /// The pool called `name`; validation guarantees that names in the config exist.
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.get(name)
    }
}
