//! `GET /api/state`: the running configuration and the live state of every backend, as JSON.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use serde_json::{Value, json};

use crate::backend::{
    BackendState, DISABLED, DOWN, DRAINING, EJECTED, OVERRIDE_DISABLE, OVERRIDE_DRAIN,
    OVERRIDE_UNDRAIN, OVERRIDE_WEIGHT,
};
use crate::config::{HostPattern, ListenerKind, RouteConfig, RouteTarget, ValueMatch};
use crate::pool::Pool;
use crate::server::ServerHandle;

/// The whole state.
pub fn state(handle: &ServerHandle) -> Value {
    let config = handle.config();
    let (reloads, failures) = handle.reload_counts();
    let stats = handle.listener_stats();
    let metrics = handle.metrics();
    let listeners: Vec<Value> = config
        .listeners
        .iter()
        .map(|l| {
            let live = stats.iter().find(|s| s.name == l.name);
            let counters = metrics.listener(&l.name);
            let mut value = json!({
                "name": l.name,
                "protocol": live.map_or("", |s| s.protocol),
                "bind": l.bind.to_string(),
                "address": live.map(|s| s.addr.to_string()),
                "active": live.map_or(0, |s| s.active),
                "connections": counters.connections.load(Relaxed),
                "max_connections": l.max_connections,
            });
            match &l.kind {
                ListenerKind::Tcp(settings) => {
                    value["pool"] = json!(settings.pool);
                }
                ListenerKind::Udp(settings) => {
                    value["pool"] = json!(settings.pool);
                    // A udp listener's cap is on sessions, the connections it counts.
                    value["max_connections"] = json!(null);
                    value["max_sessions"] = json!(settings.max_sessions);
                    value["datagrams_dropped"] = json!(live.map_or(0, |s| s.dropped));
                }
                ListenerKind::Http(settings) => {
                    value["default_pool"] = json!(settings.default_pool);
                    value["older_settings_in_use"] = json!(live.map_or(0, |s| s.older_settings));
                    value["routes"] = settings
                        .routes
                        .iter()
                        .enumerate()
                        .map(|(i, r)| route(i, r))
                        .collect();
                }
            }
            value
        })
        .collect();
    let snapshot = handle.snapshot();
    let mut pools: Vec<&Arc<Pool>> = snapshot.pools.values().collect();
    pools.sort_by(|a, b| a.name.cmp(&b.name));
    let pools: Vec<Value> = pools
        .into_iter()
        .map(|pool| {
            let config = pool.config();
            json!({
                "name": pool.name,
                "balance": format!("{:?}", config.balance),
                "health_checks": config.health.is_some(),
                "backends": pool
                    .candidates
                    .iter()
                    .map(|c| backend(pool, &c.state, c.weight))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "generation": handle.generation(),
        "reloads": { "ok": reloads, "failed": failures },
        "uptime_seconds": crate::backend::uptime().as_secs_f64(),
        "latency_buckets_seconds": crate::metrics::BUCKETS,
        "listeners": listeners,
        "pools": pools,
    })
}

/// One backend of `pool`.
pub fn backend(pool: &Pool, state: &BackendState, weight: u32) -> Value {
    let flags = state.flags();
    let configured = pool.config().backends.iter().find(|b| b.addr == state.addr);
    let health = if flags & DOWN != 0 {
        "down"
    } else if pool.config().health.is_some() {
        "up"
    } else {
        "unchecked"
    };
    let overrides = state.overrides();
    let overridden: Vec<&str> = [
        (OVERRIDE_DRAIN, "drain"),
        (OVERRIDE_UNDRAIN, "undrain"),
        (OVERRIDE_DISABLE, "disable"),
        (OVERRIDE_WEIGHT, "weight"),
    ]
    .into_iter()
    .filter(|(bit, _)| overrides & bit != 0)
    .map(|(_, name)| name)
    .collect();
    json!({
        "address": state.addr.to_string(),
        "weight": weight,
        "configured_weight": configured.map(|b| b.weight),
        "backup": configured.is_some_and(|b| b.backup),
        "max_connections": configured.and_then(|b| b.max_connections),
        "usable": state.is_usable(),
        "health": health,
        "ejected": flags & EJECTED != 0,
        "draining": flags & DRAINING != 0,
        "disabled": flags & DISABLED != 0,
        "overrides": overridden,
        "active": state.active.load(Relaxed),
        "total": state.total.load(Relaxed),
        "connect_failures": state.connect_failures.load(Relaxed),
        "bytes_sent": state.bytes_sent.load(Relaxed),
        "bytes_received": state.bytes_received.load(Relaxed),
        "ejections": state.ejections.load(Relaxed),
        "body_failures": state.body_failures.load(Relaxed),
        "probes": { "passed": state.probes_passed.load(Relaxed), "failed": state.probes_failed.load(Relaxed) },
        "responses": {
            "1xx": state.responses[0].load(Relaxed),
            "2xx": state.responses[1].load(Relaxed),
            "3xx": state.responses[2].load(Relaxed),
            "4xx": state.responses[3].load(Relaxed),
            "5xx": state.responses[4].load(Relaxed),
        },
        "response_time": {
            "counts": state.response_time.counts(),
            "sum_seconds": state.response_time.sum_seconds(),
        },
        "connect_time": {
            "counts": state.connect_time.counts(),
            "sum_seconds": state.connect_time.sum_seconds(),
        },
        "latency_ewma_ms": state.latency_ewma() / 1e6,
    })
}

/// A route: its position, what it matches (in the file's words) and where it sends.
fn route(index: usize, route: &RouteConfig) -> Value {
    let m = &route.matcher;
    let mut conditions = Vec::new();
    if let Some(p) = &m.path_prefix {
        conditions.push(format!("path_prefix {p}"));
    }
    if let Some(p) = &m.path {
        conditions.push(format!("path {p}"));
    }
    if let Some(r) = &m.path_regex {
        conditions.push(format!("path_regex {}", r.as_str()));
    }
    if let Some(h) = &m.host {
        conditions.push(match h {
            HostPattern::Exact(h) => format!("host {h}"),
            HostPattern::Suffix(s) => format!("host *{s}"),
            HostPattern::Prefix(p) => format!("host {p}*"),
        });
    }
    if let Some(h) = &m.header {
        conditions.push(match &h.condition {
            ValueMatch::Exact(v) => format!("header {}: {v}", h.name),
            ValueMatch::Regex(r) => format!("header {} ~ {}", h.name, r.as_str()),
            ValueMatch::Present => format!("header {} present", h.name),
        });
    }
    if !m.methods.is_empty() {
        conditions.push(format!("method {}", m.methods.join("|")));
    }
    if let Some((n, v)) = &m.query {
        conditions.push(format!("query {n}={v}"));
    }
    if let Some((n, v)) = &m.cookie {
        conditions.push(format!("cookie {n}={v}"));
    }
    let target = match &route.target {
        None => json!(null),
        Some(RouteTarget::Pool(p)) => json!(p),
        Some(RouteTarget::Split(split)) => split
            .iter()
            .map(|(p, w)| json!({ "pool": p, "weight": w }))
            .collect(),
    };
    json!({
        "index": index,
        "name": route.name,
        "match": conditions.join(", "),
        "pool": target,
        "redirect": route.rules.redirect.as_ref().map(|r| r.to.clone()),
    })
}
