//! Counters and histograms the data path updates, and their Prometheus rendering.
//!
//! The data path touches only relaxed atomics: per-backend counters live in
//! [`BackendState`](crate::backend::BackendState), per-listener and per-route ones in
//! [`ListenerStats`] and [`RouteStats`], resolved once per listener build so a request never
//! looks a metric up by name. Everything is read at scrape time by a `prometheus-client`
//! collector. Labels are names from the configuration (listeners, routes by position, pools,
//! backend addresses) and status classes, never a value a client chose, so cardinality is
//! bounded by the file.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::backend::{DISABLED, DOWN, DRAINING, EJECTED};
use crate::config::{ListenerConfig, ListenerKind};
use crate::server::ServerHandle;

/// Upper bounds of the latency buckets, in seconds (the last one is +Inf).
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram of fixed buckets, updated with relaxed atomics.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket; the last counts those above every bound.
    counts: [AtomicU64; BUCKETS.len() + 1],
    /// Sum of observations in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    #[inline]
    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(BUCKETS.len());
        self.counts[bucket].fetch_add(1, Relaxed);
        self.sum_us
            .fetch_add(value.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
    }

    /// Counts per bucket (not cumulative), the last for +Inf.
    pub fn counts(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Relaxed)).collect()
    }

    /// Sum of observations in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_us.load(Relaxed) as f64 / 1e6
    }

    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder<'_>,
    ) -> std::fmt::Result {
        let counts = self.counts();
        let count = counts.iter().sum();
        let buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(counts)
            .collect();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum_seconds(),
            count,
            &buckets,
            None,
        )
    }
}

/// Counters of one route of one listener (or of its default pool, or of requests no route
/// took).
#[derive(Debug, Default)]
pub struct RouteStats {
    /// Responses by status class (index 0 for 1xx ... 4 for 5xx).
    pub responses: [AtomicU64; 5],
    /// Time from the request head to the end of the response.
    pub duration: Histogram,
}

impl RouteStats {
    /// Counts one request answered with `status` after `elapsed`.
    #[inline]
    pub fn observe(&self, status: u16, elapsed: Duration) {
        self.count(status);
        self.duration.observe(elapsed);
    }

    /// Counts one request answered with `status`, without timing it.
    #[inline]
    pub fn count(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses[class].fetch_add(1, Relaxed);
    }
}

/// Counters of one listener, kept across reloads by its name.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Connections accepted (tcp and http), or sessions opened (udp: a datagram from a new
    /// client address that a backend was picked for).
    pub connections: AtomicU64,
    /// Connections open now (tcp and http, parked ones included), or sessions (udp).
    pub open: AtomicU64,
    /// Datagrams a udp listener dropped, either way (see `switchyard_udp_datagrams_dropped`).
    pub datagrams_dropped: AtomicU64,
    /// HTTP requests that tried more than one backend.
    pub retries: AtomicU64,
    /// HTTP body bytes moved with splice(2), never entering user space: shows whether the
    /// kernel path is taken (it is not through TLS, compression or chunked bodies).
    pub spliced: AtomicU64,
    /// Access log lines dropped because the writer fell behind.
    pub log_dropped: AtomicU64,
    /// Connections, udp datagrams and http requests refused by the `allow` and `deny` lists of
    /// the listener or of a route.
    pub denied: AtomicU64,
    /// TLS handshakes of clients that failed (a bad or unsupported hello, a handshake that
    /// timed out, a client that left): the only trace they leave besides a debug log line.
    pub tls_failures: AtomicU64,
    /// Requests answered 429 (http) and connections closed at accept (tcp) by `rate_limit`.
    pub rate_limited: AtomicU64,
    /// HTTP exchanges that did not end with the whole response delivered, by how they ended
    /// (`End::INCOMPLETE`'s order): what the access log's `end` says, for those who log nothing.
    pub incomplete: [AtomicU64; crate::access_log::End::INCOMPLETE.len()],
    /// Per-route counters by label: a route's position, `default` or `unrouted`.
    routes: Mutex<HashMap<String, Arc<RouteStats>>>,
}

impl ListenerStats {
    /// The counters of route `label`, created on first use (when a listener is built, not per
    /// request).
    pub fn route(&self, label: &str) -> Arc<RouteStats> {
        let mut routes = self
            .routes
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        Arc::clone(routes.entry(label.to_owned()).or_default())
    }

    /// Forgets the counters of routes an http listener no longer has (of all routes when
    /// `routes` is `None`: the listener is no longer http), keeping `default` and `unrouted` of
    /// an http one.
    fn retain_routes(&self, routes: Option<&[crate::config::RouteConfig]>) {
        let mut all = self
            .routes
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        all.retain(|label, _| match routes {
            None => false,
            Some(routes) => {
                label == "default"
                    || label == "unrouted"
                    || routes.iter().enumerate().any(|(i, r)| match &r.name {
                        Some(name) => name == label,
                        None => label.parse::<usize>() == Ok(i),
                    })
            }
        });
    }

    fn routes(&self) -> Vec<(String, Arc<RouteStats>)> {
        let routes = self
            .routes
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut all: Vec<_> = routes
            .iter()
            .map(|(label, stats)| (label.clone(), Arc::clone(stats)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// Every listener's counters, by name; they outlive reloads that keep the listener.
#[derive(Debug, Default)]
pub struct Metrics {
    listeners: Mutex<HashMap<String, Arc<ListenerStats>>>,
}

impl Metrics {
    /// The counters of listener `name`, created on first use.
    pub fn listener(&self, name: &str) -> Arc<ListenerStats> {
        let mut listeners = self
            .listeners
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        Arc::clone(listeners.entry(name.to_owned()).or_default())
    }

    /// Forgets the counters of listeners and routes a new configuration no longer has, so
    /// their series leave `/metrics` with them: without this, every listener or route a reload
    /// ever removed would be exported until the process ends, and the series would no longer be
    /// bounded by the file in force. Connections of a removed listener that are still draining
    /// count on in the counters they hold, unseen.
    pub fn retain(&self, listeners: &[ListenerConfig]) {
        let mut all = self
            .listeners
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        all.retain(|name, stats| {
            let Some(listener) = listeners.iter().find(|l| &l.name == name) else {
                return false;
            };
            stats.retain_routes(match &listener.kind {
                ListenerKind::Http(settings) => Some(&settings.routes),
                ListenerKind::Tcp(_) | ListenerKind::Udp(_) => None,
            });
            true
        });
    }

    fn all(&self) -> Vec<(String, Arc<ListenerStats>)> {
        let listeners = self
            .listeners
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut all: Vec<_> = listeners
            .iter()
            .map(|(name, stats)| (name.clone(), Arc::clone(stats)))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

/// The status class labels, by index.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Renders every metric in the OpenMetrics text format (which Prometheus reads).
pub fn render(handle: &ServerHandle) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Scrape(handle.clone())));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

/// The collector: reads the running server at each scrape.
struct Scrape(ServerHandle);

impl std::fmt::Debug for Scrape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scrape")
    }
}

/// Encodes one metric family from `(labels, value)` rows.
fn family<V>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: Vec<(Vec<(&'static str, String)>, V)>,
    mut encode: impl FnMut(prometheus_client::encoding::MetricEncoder<'_>, &V) -> std::fmt::Result,
) -> std::fmt::Result {
    if rows.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in &rows {
        encode(metric.encode_family(labels)?, value)?;
    }
    Ok(())
}

fn counter(encoder: prometheus_client::encoding::MetricEncoder<'_>, v: &u64) -> std::fmt::Result {
    ConstCounter::new(*v).encode(encoder)
}

fn gauge(encoder: prometheus_client::encoding::MetricEncoder<'_>, v: &i64) -> std::fmt::Result {
    ConstGauge::new(*v).encode(encoder)
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let handle = &self.0;
        let (reloads, failures) = handle.reload_counts();
        family(
            &mut encoder,
            "switchyard_config_generation",
            "Configurations applied since start (1, plus one per successful reload).",
            MetricType::Gauge,
            vec![(vec![], handle.generation() as i64)],
            gauge,
        )?;
        let [same, changed, failed] = handle.resolutions();
        family(
            &mut encoder,
            "switchyard_dns_resolutions",
            "Lookups of backend names with resolve = true, by result: the same addresses, \
             other addresses, or failed (kept the last ones).",
            MetricType::Counter,
            vec![
                (vec![("result", "ok".to_owned())], same),
                (vec![("result", "changed".to_owned())], changed),
                (vec![("result", "failed".to_owned())], failed),
            ],
            counter,
        )?;
        family(
            &mut encoder,
            "switchyard_reloads",
            "Configuration reloads by result.",
            MetricType::Counter,
            vec![
                (vec![("result", "ok".to_owned())], reloads),
                (vec![("result", "failed".to_owned())], failures),
            ],
            counter,
        )?;

        // Listeners.
        let listeners = handle.listener_stats();
        let metrics = handle.metrics();
        let stats = metrics.all();
        let by_listener = |f: &dyn Fn(&ListenerStats) -> u64| {
            stats
                .iter()
                .map(|(name, s)| (vec![("listener", name.clone())], f(s)))
                .collect::<Vec<_>>()
        };
        family(
            &mut encoder,
            "switchyard_connections",
            "Client connections accepted (tcp and http listeners), or sessions opened (udp).",
            MetricType::Counter,
            by_listener(&|s| s.connections.load(Relaxed)),
            counter,
        )?;
        family(
            &mut encoder,
            "switchyard_connections_active",
            "Client connections open now (tcp and http), or UDP sessions.",
            MetricType::Gauge,
            listeners
                .iter()
                .map(|l| (vec![("listener", l.name.clone())], l.active as i64))
                .collect(),
            gauge,
        )?;
        family(
            &mut encoder,
            "switchyard_udp_datagrams_dropped",
            "Datagrams a udp listener dropped, either way: from a new client past max_sessions \
             or with no usable backend, to a backend that refused them or whose socket buffer \
             was full, or replies the listener's socket buffer would not take.",
            MetricType::Counter,
            listeners
                .iter()
                .filter(|l| l.protocol == "udp")
                .map(|l| (vec![("listener", l.name.clone())], l.dropped))
                .collect(),
            counter,
        )?;
        family(
            &mut encoder,
            "switchyard_connections_parked",
            "Idle connections parked, http and tcp (counted in switchyard_connections_active too).",
            MetricType::Gauge,
            vec![(vec![], handle.parked_connections() as i64)],
            gauge,
        )?;
        family(
            &mut encoder,
            "switchyard_retries",
            "HTTP requests that tried more than one backend.",
            MetricType::Counter,
            by_listener(&|s| s.retries.load(Relaxed)),
            counter,
        )?;
        family(
            &mut encoder,
            "switchyard_http_incomplete",
            "HTTP exchanges that did not end with the whole response delivered, by how they \
             ended (the access log's end): the backend cut or stalled its body, the client left \
             or stopped reading, a drain deadline cut it, or the proxy failed it.",
            MetricType::Counter,
            stats
                .iter()
                .filter(|(name, _)| {
                    listeners
                        .iter()
                        .any(|l| &l.name == name && l.protocol == "http")
                })
                .flat_map(|(name, s)| {
                    crate::access_log::End::INCOMPLETE
                        .iter()
                        .zip(&s.incomplete)
                        .map(|(end, count)| {
                            (
                                vec![
                                    ("listener", name.clone()),
                                    ("end", end.name().unwrap_or_default().to_owned()),
                                ],
                                count.load(Relaxed),
                            )
                        })
                })
                .collect(),
            counter,
        )?;
        family(
            &mut encoder,
            "switchyard_http_spliced_bytes",
            "HTTP body bytes moved between sockets with splice(2), without entering user space.",
            MetricType::Counter,
            by_listener(&|s| s.spliced.load(Relaxed)),
            counter,
        )?;
        family(
            &mut encoder,
            "switchyard_access_log_dropped",
            "Access log lines dropped because the writer fell behind.",
            MetricType::Counter,
            by_listener(&|s| s.log_dropped.load(Relaxed)),
            counter,
        )?;
        family(
            &mut encoder,
            "switchyard_tls_handshake_failures",
            "Client TLS handshakes that failed on a listener that terminates TLS.",
            MetricType::Counter,
            by_listener(&|s| s.tls_failures.load(Relaxed)),
            counter,
        )?;
        family(
            &mut encoder,
            "switchyard_denied",
            "Connections (tcp), datagrams (udp) and requests (http) refused by the allow and deny \
             lists of a listener or route.",
            MetricType::Counter,
            by_listener(&|s| s.denied.load(Relaxed)),
            counter,
        )?;
        family(
            &mut encoder,
            "switchyard_rate_limited",
            "Requests answered 429 (http) and connections closed as they were accepted (tcp) \
             because their client was over a rate_limit.",
            MetricType::Counter,
            by_listener(&|s| s.rate_limited.load(Relaxed)),
            counter,
        )?;
        let mut requests = Vec::new();
        let mut durations = Vec::new();
        for (name, s) in &stats {
            for (route, r) in s.routes() {
                for (class, count) in CLASSES.iter().zip(&r.responses) {
                    let count = count.load(Relaxed);
                    if count > 0 {
                        requests.push((
                            vec![
                                ("listener", name.clone()),
                                ("route", route.clone()),
                                ("class", (*class).to_owned()),
                            ],
                            count,
                        ));
                    }
                }
                durations.push((
                    vec![("listener", name.clone()), ("route", route.clone())],
                    r,
                ));
            }
        }
        family(
            &mut encoder,
            "switchyard_http_requests",
            "HTTP requests answered, by listener, route (its position in the file, `default` or `unrouted`) and status class.",
            MetricType::Counter,
            requests,
            counter,
        )?;
        family(
            &mut encoder,
            "switchyard_http_request_duration_seconds",
            "Time from a request's head to the end of its response.",
            MetricType::Histogram,
            durations,
            |e, r| r.duration.encode(e),
        )?;

        // Backends.
        let snapshot = handle.snapshot();
        let mut backends = Vec::new();
        let mut weights = Vec::new();
        let mut pools: Vec<_> = snapshot.pools.values().collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        for pool in pools {
            for c in &pool.candidates {
                backends.push((
                    pool.name.clone(),
                    c.state.addr.to_string(),
                    Arc::clone(&c.state),
                ));
                weights.push((
                    vec![
                        ("pool", pool.name.clone()),
                        ("backend", c.state.addr.to_string()),
                    ],
                    i64::from(c.weight),
                ));
            }
        }
        let labels =
            |pool: &str, addr: &str| vec![("pool", pool.to_owned()), ("backend", addr.to_owned())];
        let rows = |f: &dyn Fn(&crate::backend::BackendState) -> u64| {
            backends
                .iter()
                .map(|(p, a, s)| (labels(p, a), f(s)))
                .collect::<Vec<_>>()
        };
        family(
            &mut encoder,
            "switchyard_backend_up",
            "1 when the backend may be picked; 0 when down, ejected, draining or disabled.",
            MetricType::Gauge,
            backends
                .iter()
                .map(|(p, a, s)| (labels(p, a), i64::from(s.is_usable())))
                .collect(),
            gauge,
        )?;
        let mut states = Vec::new();
        for (p, a, s) in &backends {
            for (flag, name) in [
                (DOWN, "down"),
                (EJECTED, "ejected"),
                (DRAINING, "draining"),
                (DISABLED, "disabled"),
            ] {
                let mut l = labels(p, a);
                l.push(("state", name.to_owned()));
                states.push((l, i64::from(s.flags() & flag != 0)));
            }
        }
        family(
            &mut encoder,
            "switchyard_backend_state",
            "1 for each reason the backend is out: down (health checks), ejected (outlier detection), draining, disabled.",
            MetricType::Gauge,
            states,
            gauge,
        )?;
        family(
            &mut encoder,
            "switchyard_backend_weight",
            "The backend's weight in force: the file's, or one set through the admin API until the next reload.",
            MetricType::Gauge,
            weights,
            gauge,
        )?;
        family(
            &mut encoder,
            "switchyard_backend_active",
            "Connections (tcp), sessions (udp) or requests (http) in flight to the backend.",
            MetricType::Gauge,
            backends
                .iter()
                .map(|(p, a, s)| (labels(p, a), s.active.load(Relaxed) as i64))
                .collect(),
            gauge,
        )?;
        family(
            &mut encoder,
            "switchyard_backend_connections",
            "Connections, sessions or requests established with the backend.",
            MetricType::Counter,
            rows(&|s| s.total.load(Relaxed)),
            counter,
        )?;
        family(
            &mut encoder,
            "switchyard_backend_connect_failures",
            "Connects to the backend that failed.",
            MetricType::Counter,
            rows(&|s| s.connect_failures.load(Relaxed)),
            counter,
        )?;
        family(
            &mut encoder,
            "switchyard_backend_sent_bytes",
            "Bytes forwarded from clients to the backend (tcp and udp).",
            MetricType::Counter,
            rows(&|s| s.bytes_sent.load(Relaxed)),
            counter,
        )?;
        family(
            &mut encoder,
            "switchyard_backend_received_bytes",
            "Bytes forwarded from the backend to clients (tcp and udp).",
            MetricType::Counter,
            rows(&|s| s.bytes_received.load(Relaxed)),
            counter,
        )?;
        family(
            &mut encoder,
            "switchyard_backend_body_failures",
            "HTTP responses whose body the backend failed after their head (reset, stalled or cut short).",
            MetricType::Counter,
            rows(&|s| s.body_failures.load(Relaxed)),
            counter,
        )?;
        family(
            &mut encoder,
            "switchyard_backend_ejections",
            "Times outlier detection ejected the backend.",
            MetricType::Counter,
            rows(&|s| u64::from(s.ejections.load(Relaxed))),
            counter,
        )?;
        let mut probes = Vec::new();
        let mut responses = Vec::new();
        for (p, a, s) in &backends {
            for (result, n) in [("pass", &s.probes_passed), ("fail", &s.probes_failed)] {
                let mut l = labels(p, a);
                l.push(("result", result.to_owned()));
                probes.push((l, n.load(Relaxed)));
            }
            for (class, n) in CLASSES.iter().zip(&s.responses) {
                let n = n.load(Relaxed);
                if n > 0 {
                    let mut l = labels(p, a);
                    l.push(("class", (*class).to_owned()));
                    responses.push((l, n));
                }
            }
        }
        family(
            &mut encoder,
            "switchyard_backend_health_checks",
            "Active health probes by result.",
            MetricType::Counter,
            probes,
            counter,
        )?;
        family(
            &mut encoder,
            "switchyard_backend_responses",
            "HTTP responses from the backend by status class.",
            MetricType::Counter,
            responses,
            counter,
        )?;
        let histograms = |f: fn(&crate::backend::BackendState) -> &Histogram| {
            backends
                .iter()
                .map(|(p, a, s)| (labels(p, a), Arc::clone(s)))
                .map(move |(l, s)| (l, (s, f)))
                .collect::<Vec<_>>()
        };
        family(
            &mut encoder,
            "switchyard_backend_connect_seconds",
            "Time to connect to the backend.",
            MetricType::Histogram,
            histograms(|s| &s.connect_time),
            |e, (s, f)| f(s).encode(e),
        )?;
        family(
            &mut encoder,
            "switchyard_backend_response_seconds",
            "Time from sending a request to the backend to its response head (time to first byte).",
            MetricType::Histogram,
            histograms(|s| &s.response_time),
            |e, (s, f)| f(s).encode(e),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(60));
        let counts = h.counts();
        assert_eq!(counts[0], 1);
        assert_eq!(counts[6], 1);
        assert_eq!(counts[BUCKETS.len()], 1);
        assert!((h.sum_seconds() - 60.0303).abs() < 1e-6);
    }
}
