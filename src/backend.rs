//! Live backend state: counters and flags that outlive any one configuration.
//!
//! A [`BackendState`] is keyed by (pool name, address) in the [`Registry`], so a reload that keeps
//! a backend keeps its counters and, later, its health and drain flags. The hot path touches only
//! relaxed atomics here; the registry's lock is taken when a snapshot is built, never per connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Counters and flags of one backend of one pool.
#[derive(Debug)]
pub struct BackendState {
    /// The backend's address, repeated here so state can be reported on its own.
    pub addr: SocketAddr,
    /// Connections (L4) or requests in flight to it; balancers read this.
    pub active: AtomicU64,
    /// Connections (or sessions, or requests) established with it since start; failed connects
    /// are in `connect_failures` instead.
    pub total: AtomicU64,
    /// Bytes forwarded from clients to it.
    pub bytes_sent: AtomicU64,
    /// Bytes forwarded from it to clients.
    pub bytes_received: AtomicU64,
    /// Connect attempts that failed (refused, unreachable, timed out).
    pub connect_failures: AtomicU64,
    /// False takes the backend out of every balancer's choice (health checks and draining set it).
    usable: AtomicBool,
}

impl BackendState {
    /// A fresh state with zeroed counters, usable.
    pub fn new(addr: SocketAddr) -> Self {
        BackendState {
            addr,
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            usable: AtomicBool::new(true),
        }
    }

    /// Whether balancers may choose this backend.
    #[inline]
    pub fn is_usable(&self) -> bool {
        self.usable.load(Relaxed)
    }

    /// Takes the backend in or out of rotation.
    pub fn set_usable(&self, usable: bool) {
        self.usable.store(usable, Relaxed);
    }

    /// Counts a connection attempt as active (balancers see it at once, even while it is still
    /// connecting); the guard ends it when dropped. `total` counts it once it is
    /// [established](ActiveGuard::established).
    pub fn start(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Relaxed);
        ActiveGuard(Arc::clone(self))
    }
}

/// Holds one unit of a backend's `active` count for as long as it lives.
#[derive(Debug)]
pub struct ActiveGuard(Arc<BackendState>);

impl ActiveGuard {
    /// The backend this guard counts against.
    pub fn state(&self) -> &BackendState {
        &self.0
    }

    /// Records that the connection was established, counting it in `total`.
    pub fn established(&self) {
        self.0.total.fetch_add(1, Relaxed);
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// Every backend state the process knows, keyed by pool name and address.
#[derive(Debug, Default)]
pub struct Registry {
    states: Mutex<HashMap<(String, SocketAddr), Arc<BackendState>>>,
}

impl Registry {
    /// The state for `addr` in `pool`, created on first use and shared afterwards.
    pub fn state(&self, pool: &str, addr: SocketAddr) -> Arc<BackendState> {
        let mut states = self
            .states
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        Arc::clone(
            states
                .entry((pool.to_owned(), addr))
                .or_insert_with(|| Arc::new(BackendState::new(addr))),
        )
    }

    /// The state for `addr` in `pool`, if that backend was ever configured.
    pub fn get(&self, pool: &str, addr: SocketAddr) -> Option<Arc<BackendState>> {
        let states = self
            .states
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        states.get(&(pool.to_owned(), addr)).cloned()
    }
}
