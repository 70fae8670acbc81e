//! From the raw file to a [`Config`]: environment expansion, parsing and validation.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::raw::{RawBackend, RawConfig, RawListener, RawPool, RawRoute, StringOrList};
use super::*;
use crate::access::AccessList;

/// Replaces `${NAME}` and `${NAME:-default}` in one string value with environment values, so
/// one file can serve several deployments (the shared benchmark passes its ports this way).
/// `$${` writes a literal `${`. Only string values are expanded, never comments or keys, and a
/// value can never turn into TOML syntax. Every mistake in the value is reported, not only the
/// first: an operator fixing a deployment learns of all its unset variables at once.
fn expand_env(value: &str) -> Result<String, Vec<String>> {
    let mut out = String::with_capacity(value.len());
    let mut problems = Vec::new();
    let mut rest = value;
    while let Some(start) = rest.find('$') {
        out.push_str(&rest[..start]);
        let after = &rest[start..];
        if let Some(escaped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = escaped;
            continue;
        }
        let Some(inner) = after.strip_prefix("${") else {
            out.push('$');
            rest = &after[1..];
            continue;
        };
        let Some(end) = inner.find('}') else {
            problems.push("`${` without a closing `}`".to_owned());
            break;
        };
        rest = &inner[end + 1..];
        match lookup(&inner[..end]) {
            Ok(value) => out.push_str(&value),
            Err(problem) => problems.push(problem),
        }
    }
    out.push_str(rest);
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// The value of one `${...}`, given what stands between the braces.
fn lookup(inner: &str) -> Result<String, String> {
    let (name, default) = match inner.split_once(":-") {
        Some((name, default)) => (name, Some(default)),
        None => (inner, None),
    };
    if name.is_empty() {
        return Err(format!("`${{{inner}}}` names no variable"));
    }
    if !is_variable_name(name) {
        let mut reason = format!(
            "`{name}` is not a variable name (letters, digits and `_`, not starting with a digit)"
        );
        // The shell's `${NAME-default}` is the likeliest meaning.
        if default.is_none()
            && let Some((name, default)) = name.split_once('-')
            && is_variable_name(name)
        {
            reason.push_str(&format!("; for a default, write `${{{name}:-{default}}}`"));
        }
        return Err(reason);
    }
    if let Some(default) = default
        && default.contains("${")
    {
        return Err(format!(
            "`${{{inner}}}`: a default cannot hold `${{` (defaults do not nest)"
        ));
    }
    // Like the shell's `${NAME:-default}`: an empty value takes the default too.
    match (
        std::env::var_os(name).map(std::ffi::OsString::into_string),
        default,
    ) {
        (Some(Ok(value)), Some(default)) if value.is_empty() => Ok(default.to_owned()),
        (Some(Ok(value)), _) => Ok(value),
        (Some(Err(_)), _) => Err(format!(
            "environment variable `{name}` is set, but its value is not UTF-8"
        )),
        (None, Some(default)) => Ok(default.to_owned()),
        (None, None) => Err(format!(
            "environment variable `{name}` is not set (write `${{{name}:-default}}` to give a default, or `$${{{name}}}` for a literal `${{{name}}}`, such as a rewrite's group)"
        )),
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`, the names a shell can export.
fn is_variable_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Expands every string value under `value`, naming the key path of a failure.
fn expand_strings(value: &mut toml::Value, path: &str, problems: &mut Problems) {
    match value {
        toml::Value::String(text) if text.contains("${") => match expand_env(text) {
            Ok(expanded) => *text = expanded,
            Err(reasons) => {
                for reason in reasons {
                    problems.push(path, reason);
                }
            }
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                expand_strings(item, &format!("{path}[{i}]"), problems);
            }
        }
        toml::Value::Table(table) => {
            for (key, item) in table.iter_mut() {
                let path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                expand_strings(item, &path, problems);
            }
        }
        _ => {}
    }
}

/// Parses TOML into the raw structs, naming the key path of a shape error, then expands
/// environment variables in string values.
pub(super) fn parse(text: &str, file: &Path) -> Result<RawConfig, ConfigError> {
    // The shape is checked on the text as written, so errors point at its lines.
    let raw = parse_shape(text, file)?;
    if !text.contains("${") {
        return Ok(raw);
    }
    let whole_file = |error: toml::de::Error| ConfigError::Syntax {
        file: file.to_path_buf(),
        path: String::new(),
        line: 1,
        column: 1,
        reason: error.message().trim().to_owned(),
    };
    let mut value: toml::Value = toml::from_str(text).map_err(whole_file)?;
    let mut problems = Problems(Vec::new());
    expand_strings(&mut value, "", &mut problems);
    if !problems.0.is_empty() {
        return Err(ConfigError::Invalid {
            file: file.to_path_buf(),
            problems: problems.0,
        });
    }
    // Expansion only changed the contents of strings, so the shape still holds.
    value.try_into().map_err(whole_file)
}

fn parse_shape(text: &str, file: &Path) -> Result<RawConfig, ConfigError> {
    let syntax = |error: toml::de::Error, path: String| {
        let (line, column) = error
            .span()
            .map(|span| line_column(text, span.start))
            .unwrap_or((1, 1));
        ConfigError::Syntax {
            file: file.to_path_buf(),
            path,
            line,
            column,
            reason: error.message().trim().to_owned(),
        }
    };
    let deserializer = toml::Deserializer::parse(text).map_err(|error| {
        // The parser says "duplicate key", and neither which nor where: both are worked out
        // from the text.
        match error.span() {
            Some(span) if error.message().trim() == "duplicate key" => {
                let (line, column) = line_column(text, span.start);
                let (path, reason) = duplicate_key(text, span);
                ConfigError::Syntax {
                    file: file.to_path_buf(),
                    path,
                    line,
                    column,
                    reason,
                }
            }
            _ => syntax(error, String::new()),
        }
    })?;
    let mut track = serde_path_to_error::Track::new();
    let tracked = serde_path_to_error::Deserializer::new(deserializer, &mut track);
    RawConfig::deserialize(tracked).map_err(|error| {
        let path = track.path().to_string();
        syntax(error, if path == "?" { String::new() } else { path })
    })
}

/// The key path and the reason for a key the parser found given twice at `span`: the path of a
/// table header given twice, or of a key at the start of its line in a table; for a key
/// elsewhere (inside an inline table, after a dot) the key alone.
fn duplicate_key(text: &str, span: std::ops::Range<usize>) -> (String, String) {
    let written = text.get(span.clone()).unwrap_or("").trim();
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim_start();
    let before = text[line_start..start].trim();
    if line.starts_with('[') {
        let header = line
            .split(']')
            .next()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim();
        let path = table_path(&text[..line_start], header).unwrap_or_default();
        return (
            path,
            format!("duplicate table [{header}]: a table is written once, with all its keys"),
        );
    }
    let reason = format!("duplicate key `{written}`: a key is given once in its table");
    if !before.is_empty() {
        return (String::new(), reason);
    }
    // The table the key is in is the last header above it (none: the top level).
    let header = text[..line_start]
        .lines()
        .rev()
        .map(str::trim_start)
        .find(|l| l.starts_with('['));
    let key = written.trim_matches(|c| c == '"' || c == '\'');
    let path = match header {
        None => Some(key.to_owned()),
        Some(header) => {
            let inner = header
                .split(']')
                .next()
                .unwrap_or("")
                .trim_start_matches('[')
                .trim();
            table_path(&text[..line_start], inner).map(|table| format!("{table}.{key}"))
        }
    };
    (path.unwrap_or_default(), reason)
}

/// The key path of the table that header `[inner]` (or `[[inner]]`) opens, given the text
/// before the key in question: an array of tables is at its last element so far. `None` when
/// that cannot be told (the line is not a header after all, the text before does not parse).
fn table_path(before: &str, inner: &str) -> Option<String> {
    let mut keys = Vec::new();
    let mut header: toml::Table = toml::from_str(&format!("{inner} = 0")).ok()?;
    loop {
        let (key, value) = header.into_iter().next()?;
        keys.push(key);
        match value {
            toml::Value::Table(table) => header = table,
            _ => break,
        }
    }
    let parsed: toml::Table = toml::from_str(before).ok()?;
    let mut path = String::new();
    let mut at = Some(toml::Value::Table(parsed));
    for key in keys {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(&key);
        at = match at {
            Some(toml::Value::Table(mut table)) => table.remove(&key),
            _ => None,
        };
        if let Some(toml::Value::Array(mut items)) = at {
            let last = items.len().checked_sub(1)?;
            path.push_str(&format!("[{last}]"));
            at = items.pop();
        }
    }
    Some(path)
}

/// 1-based line and column of a byte offset.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// Collects problems so validation can go on after the first one.
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, path: impl Into<String>, reason: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            reason: reason.into(),
        });
    }

    /// Records the error of `result`, if any, and passes its value on.
    fn check<T>(&mut self, path: impl Into<String>, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(reason) => {
                self.push(path, reason);
                None
            }
        }
    }
}

/// Turns the raw file into a [`Config`], or lists everything that is wrong with it.
pub(super) fn validate(raw: RawConfig, file: &Path) -> Result<Config, ConfigError> {
    let mut problems = Problems(Vec::new());
    // Files the configuration names (certificates, keys) are relative to its own directory.
    let base = file.parent().unwrap_or(Path::new(""));

    let drain_timeout = optional_duration(
        &mut problems,
        "global.drain_timeout",
        raw.global.drain_timeout.as_deref(),
        DEFAULT_DRAIN_TIMEOUT,
    );

    let resolve_interval = optional_duration(
        &mut problems,
        "global.resolve_interval",
        raw.global.resolve_interval.as_deref(),
        DEFAULT_RESOLVE_INTERVAL,
    );
    if resolve_interval < MIN_RESOLVE_INTERVAL {
        problems.push(
            "global.resolve_interval",
            format!("must be at least {MIN_RESOLVE_INTERVAL:?}"),
        );
    }
    // Zero is allowed: the addresses leave at the first answer without any, as Envoy does.
    let resolve_hold = match raw.global.resolve_hold.as_deref() {
        None => DEFAULT_RESOLVE_HOLD,
        Some(text) => problems
            .check("global.resolve_hold", parse_duration(text))
            .unwrap_or(DEFAULT_RESOLVE_HOLD),
    };
    let needs_dns = raw.pools.values().any(|pool| {
        pool.backends
            .iter()
            .flatten()
            .any(|b| matches!(b, RawBackend::Table(table) if table.resolve == Some(true)))
    });
    // resolv.conf is read once, and only when something the file leaves out is needed.
    let system = (needs_dns
        && (raw.global.resolvers.is_none()
            || raw.global.search.is_none()
            || raw.global.ndots.is_none()))
    .then(crate::dns::system_conf);
    let resolvers = validate_resolvers(
        &mut problems,
        raw.global.resolvers.as_deref(),
        system.as_ref(),
    );
    let search = validate_search(
        &mut problems,
        raw.global.search.as_deref(),
        raw.global.ndots,
        system.as_ref(),
    );
    let answers = look_up_names(&raw.pools, &search, &resolvers);

    let declared = raw.pools.keys().cloned().collect();
    // Taken before the raw values are consumed: checked against the pools' users below.
    let readers = pool_keys_by_reader(&raw.pools);
    let users = pool_users(&raw.listeners);
    let mut pools = BTreeMap::new();
    for (name, pool) in raw.pools {
        if let Some(pool) = validate_pool(&mut problems, &name, pool, base, &answers, &search) {
            pools.insert(name, pool);
        }
    }
    let pool_names = PoolNames {
        valid: &pools,
        declared,
    };

    if raw.listeners.is_empty() {
        problems.push(
            "listeners",
            "no listeners: add at least one [[listeners]] table",
        );
    }
    let mut listeners = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    // (address, udp, index) of each valid listener so far.
    let mut binds: Vec<(SocketAddr, bool, usize)> = Vec::new();
    for (index, listener) in raw.listeners.into_iter().enumerate() {
        let at = format!("listeners[{index}]");
        if let Some(name) = &listener.name
            && let Some(first) = names.insert(name.clone(), index)
        {
            problems.push(
                format!("{at}.name"),
                format!("duplicate listener name `{name}` (also listeners[{first}].name)"),
            );
        }
        if let Some(listener) = validate_listener(&mut problems, &at, listener, &pool_names, base) {
            let udp = matches!(listener.kind, ListenerKind::Udp(_));
            if let Some(&(other, _, first)) = binds.iter().find(|&&(other, other_udp, _)| {
                other_udp == udp && binds_collide(listener.bind, other)
            }) {
                problems.push(format!("{at}.bind"), collision(listener.bind, other, first));
            }
            binds.push((listener.bind, udp, index));
            listeners.push(listener);
        }
    }

    check_pool_keys_are_read(&mut problems, &readers, &users);

    let admin = raw
        .admin
        .and_then(|admin| validate_admin(&mut problems, admin));
    // The admin API is a TCP listener too: sharing a port with a tcp or http listener would
    // pass `check` and fail at start.
    if let Some(admin) = &admin
        && let Some(&(other, _, first)) = binds
            .iter()
            .find(|&&(other, udp, _)| !udp && binds_collide(admin.bind, other))
    {
        problems.push("admin.bind", collision(admin.bind, other, first));
    }

    if problems.0.is_empty() {
        Ok(Config {
            global: GlobalConfig {
                drain_timeout,
                resolvers,
                resolve_interval,
                resolve_hold,
                search,
            },
            listeners,
            pools,
            admin,
        })
    } else {
        Err(ConfigError::Invalid {
            file: file.to_path_buf(),
            problems: problems.0,
        })
    }
}

/// Pool keys that only some kinds of listener read, as `(key, the protocols that read it)`.
/// The rest (backends, balance, health, outlier detection, slow start, drains) apply to every
/// listener of the pool, and keys that a listener's kind cannot use at all (tls, sticky, a
/// request hash, send_proxy_protocol on udp) are reported at the listener's `pool`.
const POOL_KEY_READERS: [(&str, &[&str]); 7] = [
    ("response_timeout", &["http"]),
    ("retry", &["http"]),
    ("keepalive_connections", &["http"]),
    ("keepalive_timeout", &["http"]),
    // UDP has no connect, and a session never waits in the queue.
    ("connect_timeout", &["tcp", "http"]),
    ("connect_attempts", &["tcp", "http"]),
    ("queue", &["tcp", "http"]),
];

/// A pool key the file sets that only some kinds of listener read.
struct ReadBySome {
    /// The pool.
    pool: String,
    /// The key.
    key: &'static str,
    /// The kinds of listener that read it.
    readers: &'static [&'static str],
    /// Why it is not read by the others, when the key's own meaning does not say it.
    because: Option<&'static str>,
}

/// For each pool, the keys of [`POOL_KEY_READERS`] the file sets; `connect_attempts` beside
/// `retry.attempts`, which replaces it for http requests, is read by tcp listeners only.
fn pool_keys_by_reader(pools: &BTreeMap<String, RawPool>) -> Vec<ReadBySome> {
    let mut set = Vec::new();
    for (name, pool) in pools {
        let present = [
            pool.response_timeout.is_some(),
            pool.retry.is_some(),
            pool.keepalive_connections.is_some(),
            pool.keepalive_timeout.is_some(),
            pool.connect_timeout.is_some(),
            pool.connect_attempts.is_some(),
            pool.queue.is_some(),
        ];
        let replaced = pool.retry.as_ref().is_some_and(|r| r.attempts.is_some());
        for ((key, readers), present) in POOL_KEY_READERS.iter().zip(present) {
            if !present {
                continue;
            }
            let (readers, because) = if *key == "connect_attempts" && replaced {
                (
                    &["tcp"][..],
                    Some("`retry.attempts` replaces it for http requests"),
                )
            } else {
                (*readers, None)
            };
            set.push(ReadBySome {
                pool: name.clone(),
                key,
                readers,
                because,
            });
        }
    }
    set
}

/// For each pool name, the listeners that name it (anywhere: `pool`, `default_pool`, routes,
/// splits, SNI routes) as `(index, protocol)`. Read from the raw listeners, so that one with
/// mistakes of its own still counts as a user; `None` for a protocol that is missing or
/// unknown (reported at the listener).
fn pool_users(listeners: &[RawListener]) -> HashMap<String, Vec<(usize, Option<&'static str>)>> {
    let mut users: HashMap<String, Vec<(usize, Option<&'static str>)>> = HashMap::new();
    for (index, l) in listeners.iter().enumerate() {
        let protocol = ["tcp", "udp", "http"]
            .into_iter()
            .find(|p| l.protocol.as_deref() == Some(*p));
        let routes = l.routes.iter().flatten();
        let named = l
            .pool
            .iter()
            .chain(&l.default_pool)
            .chain(routes.clone().filter_map(|r| r.pool.as_ref()))
            .chain(
                routes
                    .flat_map(|r| r.pools.iter().flatten())
                    .filter_map(|w| w.pool.as_ref()),
            )
            .chain(
                l.sni_routes
                    .iter()
                    .flatten()
                    .filter_map(|r| r.pool.as_ref()),
            );
        for pool in named {
            let entry = users.entry(pool.clone()).or_default();
            if !entry.iter().any(|&(i, _)| i == index) {
                entry.push((index, protocol));
            }
        }
    }
    users
}

/// A pool key that none of the pool's listeners reads would have no effect: an error at the
/// key, naming the listeners. A pool no listener uses is left alone.
fn check_pool_keys_are_read(
    problems: &mut Problems,
    set: &[ReadBySome],
    users: &HashMap<String, Vec<(usize, Option<&'static str>)>>,
) {
    for ReadBySome {
        pool,
        key,
        readers,
        because,
    } in set
    {
        let Some(users) = users.get(pool) else {
            continue;
        };
        let Some(protocols) = users.iter().map(|&(_, p)| p).collect::<Option<Vec<_>>>() else {
            continue;
        };
        if protocols.iter().any(|p| readers.contains(p)) {
            continue;
        }
        let mut kinds: Vec<&str> = Vec::new();
        for p in &protocols {
            if !kinds.contains(p) {
                kinds.push(p);
            }
        }
        let listeners: Vec<String> = users
            .iter()
            .map(|(i, _)| format!("listeners[{i}]"))
            .collect();
        problems.push(
            format!("pools.{pool}.{key}"),
            format!(
                "only {} listeners read it{}, and pool `{pool}` is used only by {} listeners \
                 ({}), so it would have no effect",
                readers.join(" and "),
                because.map(|why| format!(" ({why})")).unwrap_or_default(),
                kinds.join(" and "),
                listeners.join(", ")
            ),
        );
    }
}

/// Whether two sockets of the same kind (both TCP or both UDP) bound to `a` and `b` could not
/// both be bound. Port 0 asks the kernel for a fresh port each time, so it never collides. A
/// wildcard address takes its port on every address of its family, and an IPv6 wildcard also
/// on IPv4 ones: listening sockets are dual-stack (Linux's default `bindv6only = 0`).
fn binds_collide(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    let (a, b) = (a.ip().to_canonical(), b.ip().to_canonical());
    let covers = |wide: std::net::IpAddr, other: std::net::IpAddr| {
        wide.is_unspecified() && (wide.is_ipv6() || other.is_ipv4())
    };
    a == b || covers(a, b) || covers(b, a)
}

/// The reason given when a bind collides with listener `first`'s, bound to `other`.
fn collision(bind: SocketAddr, other: SocketAddr, first: usize) -> String {
    if bind == other {
        format!("duplicate bind address {bind} (also listeners[{first}].bind)")
    } else {
        format!(
            "{bind} and {other} (listeners[{first}].bind) take the same port: a wildcard \
             address holds it on every address (an IPv6 one on IPv4 addresses too)"
        )
    }
}

fn validate_listener(
    problems: &mut Problems,
    at: &str,
    mut raw: RawListener,
    pools: &PoolNames,
    base: &Path,
) -> Option<ListenerConfig> {
    let before = problems.0.len();
    let name = raw.name.clone().unwrap_or_default();
    if raw.name.is_none() {
        problems.push(format!("{at}.name"), "missing: every listener needs a name");
    } else if name.is_empty() {
        problems.push(format!("{at}.name"), "must not be empty");
    }
    let bind = match &raw.bind {
        None => {
            problems.push(
                format!("{at}.bind"),
                "missing: e.g. bind = \"127.0.0.1:8080\"",
            );
            None
        }
        Some(bind) => problems.check(format!("{at}.bind"), parse_address(bind)),
    };
    let protocol = raw.protocol.as_deref().unwrap_or("");
    // Parsed once: http listeners use the list for X-Forwarded-For and the PROXY protocol
    // alike, and a bad entry is one problem, not one per use.
    let trusted_proxies: Vec<IpNet> = raw
        .trusted_proxies
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, cidr)| {
            problems.check(format!("{at}.trusted_proxies[{i}]"), parse_cidr(cidr))
        })
        .collect();
    let max_connections = positive(
        problems,
        &format!("{at}.max_connections"),
        raw.max_connections,
        DEFAULT_MAX_CONNECTIONS,
    );

    // Keys that belong to one protocol only are rejected on the others, so a misplaced key is
    // never silently ignored.
    let only = |problems: &mut Problems, present: bool, key: &str, allowed: &str| {
        if present {
            problems.push(
                format!("{at}.{key}"),
                format!(
                    "`{key}` applies only to {allowed} listeners, not to protocol \"{protocol}\""
                ),
            );
        }
    };

    let kind = match protocol {
        "tcp" | "udp" => {
            for (present, key) in [
                (raw.routes.is_some(), "routes"),
                (raw.default_pool.is_some(), "default_pool"),
                (raw.client_header_timeout.is_some(), "client_header_timeout"),
                (raw.keepalive_timeout.is_some(), "keepalive_timeout"),
                (raw.max_body_size.is_some(), "max_body_size"),
                (raw.request_headers.is_some(), "request_headers"),
                (raw.response_headers.is_some(), "response_headers"),
                (raw.rewrite.is_some(), "rewrite"),
                (raw.host_rewrite.is_some(), "host_rewrite"),
                (raw.redirect.is_some(), "redirect"),
                (raw.cookie_flags.is_some(), "cookie_flags"),
                (raw.compression.is_some(), "compression"),
                (raw.forwarded_header.is_some(), "forwarded_header"),
                (raw.abort_on_close.is_some(), "abort_on_close"),
            ] {
                only(problems, present, key, "http");
            }
            let pool = match &raw.pool {
                None => {
                    problems.push(
                        format!("{at}.pool"),
                        format!("missing: a {protocol} listener names the pool it forwards to"),
                    );
                    None
                }
                Some(pool) => known_pool(problems, &format!("{at}.pool"), pool, pools),
            };
            if let Some(name) = &pool
                && pools
                    .valid
                    .get(name)
                    .is_some_and(|p| p.upstream_protocol == UpstreamProtocol::H2)
            {
                problems.push(
                    format!("{at}.pool"),
                    format!("pool `{name}` sets upstream_protocol = \"h2\", which only http listeners speak"),
                );
            }
            if let Some(name) = &pool
                && let Some(p) = pools.valid.get(name)
            {
                if p.hash_key != HashKey::SourceIp {
                    problems.push(
                        format!("{at}.pool"),
                        format!(
                            "pool `{name}` hashes on a request attribute; a {protocol} listener \
                             can hash only on source_ip"
                        ),
                    );
                }
                if p.sticky.is_some() {
                    problems.push(
                        format!("{at}.pool"),
                        format!("pool `{name}` sets sticky, a cookie only http listeners can set"),
                    );
                }
                if protocol == "udp" && p.health.is_some() {
                    problems.push(
                        format!("{at}.pool"),
                        format!(
                            "pool `{name}` sets health, but UDP backends cannot be probed; \
                             use outlier detection"
                        ),
                    );
                }
                if p.tls.is_some() {
                    problems.push(
                        format!("{at}.pool"),
                        format!(
                            "pool `{name}` sets tls, which only http listeners speak to backends \
                             ({protocol} listeners pass bytes through as they are)"
                        ),
                    );
                }
            }
            if protocol == "udp" {
                only(
                    problems,
                    raw.park_idle_after.is_some(),
                    "park_idle_after",
                    "tcp and http",
                );
            }
            if protocol == "tcp" {
                only(problems, raw.max_sessions.is_some(), "max_sessions", "udp");
                let idle_timeout = optional_duration(
                    problems,
                    &format!("{at}.idle_timeout"),
                    raw.idle_timeout.as_deref(),
                    DEFAULT_TCP_IDLE_TIMEOUT,
                );
                let sni_routes = validate_sni_routes(problems, at, &raw, pools);
                if raw.client_hello_timeout.is_some() && raw.sni_routes.is_none() {
                    problems.push(
                        format!("{at}.client_hello_timeout"),
                        "set without sni_routes, so it would have no effect",
                    );
                }
                if raw.sni_routes.is_some() && raw.tls.is_some() {
                    problems.push(
                        format!("{at}.sni_routes"),
                        "sni_routes pass TLS through untouched, so they cannot go with `tls`, \
                         which terminates it",
                    );
                }
                let client_hello_timeout = optional_duration(
                    problems,
                    &format!("{at}.client_hello_timeout"),
                    raw.client_hello_timeout.as_deref(),
                    DEFAULT_CLIENT_HELLO_TIMEOUT,
                );
                pool.map(|pool| {
                    ListenerKind::Tcp(TcpSettings {
                        pool,
                        idle_timeout,
                        splice: raw.splice.unwrap_or(DEFAULT_SPLICE),
                        sni_routes,
                        client_hello_timeout,
                        park_idle_after: park_idle_after(problems, at, &raw),
                        access_log: raw.access_log.as_ref().and_then(|log| {
                            validate_access_log(problems, &format!("{at}.access_log"), log, base)
                        }),
                        rate_limit: raw.rate_limit.as_ref().and_then(|limit| {
                            validate_rate_limit(problems, &format!("{at}.rate_limit"), limit, false)
                        }),
                    })
                })
            } else {
                if let Some(name) = &pool
                    && pools
                        .valid
                        .get(name)
                        .is_some_and(|p| p.send_proxy_protocol.is_some())
                {
                    problems.push(
                        format!("{at}.pool"),
                        format!(
                            "pool `{name}` sets send_proxy_protocol, which udp listeners do not send"
                        ),
                    );
                }
                only(problems, raw.splice.is_some(), "splice", "tcp and http");
                only(problems, raw.tls.is_some(), "tls", "tcp and http");
                only(
                    problems,
                    raw.rate_limit.is_some(),
                    "rate_limit",
                    "tcp and http",
                );
                only(problems, raw.sni_routes.is_some(), "sni_routes", "tcp");
                only(
                    problems,
                    raw.client_hello_timeout.is_some(),
                    "client_hello_timeout",
                    "tcp",
                );
                only(
                    problems,
                    raw.proxy_protocol.is_some(),
                    "proxy_protocol",
                    "tcp and http",
                );
                if raw.max_connections.is_some() {
                    problems.push(
                        format!("{at}.max_connections"),
                        "applies to tcp and http listeners; udp listeners cap sessions with max_sessions",
                    );
                }
                let idle_timeout = optional_duration(
                    problems,
                    &format!("{at}.idle_timeout"),
                    raw.idle_timeout.as_deref(),
                    DEFAULT_UDP_IDLE_TIMEOUT,
                );
                let max_sessions = positive(
                    problems,
                    &format!("{at}.max_sessions"),
                    raw.max_sessions,
                    DEFAULT_MAX_SESSIONS,
                );
                pool.map(|pool| {
                    ListenerKind::Udp(UdpSettings {
                        pool,
                        idle_timeout,
                        max_sessions,
                        access_log: raw.access_log.as_ref().and_then(|log| {
                            validate_access_log(problems, &format!("{at}.access_log"), log, base)
                        }),
                    })
                })
            }
        }
        "http" => {
            for (present, key, allowed) in [
                (raw.pool.is_some(), "pool", "tcp and udp"),
                (raw.max_sessions.is_some(), "max_sessions", "udp"),
                (raw.sni_routes.is_some(), "sni_routes", "tcp"),
                (
                    raw.client_hello_timeout.is_some(),
                    "client_hello_timeout",
                    "tcp",
                ),
                (raw.idle_timeout.is_some(), "idle_timeout", "tcp and udp"),
            ] {
                only(problems, present, key, allowed);
            }
            let routes = raw.routes.take().unwrap_or_default();
            if routes.is_empty() && raw.default_pool.is_none() {
                problems.push(
                    format!("{at}.routes"),
                    "an http listener needs routes, a default_pool, or both",
                );
            }
            let default_pool = raw
                .default_pool
                .as_ref()
                .and_then(|pool| known_pool(problems, &format!("{at}.default_pool"), pool, pools));
            check_route_names(problems, at, &routes);
            let routes: Vec<_> = routes
                .into_iter()
                .enumerate()
                .filter_map(|(i, route)| {
                    validate_route(problems, &format!("{at}.routes[{i}]"), route, pools)
                })
                .collect();
            Some(ListenerKind::Http(Box::new(HttpSettings {
                routes,
                default_pool,
                trusted_proxies: trusted_proxies.clone(),
                client_header_timeout: optional_duration(
                    problems,
                    &format!("{at}.client_header_timeout"),
                    raw.client_header_timeout.as_deref(),
                    DEFAULT_CLIENT_HEADER_TIMEOUT,
                ),
                keepalive_timeout: optional_duration(
                    problems,
                    &format!("{at}.keepalive_timeout"),
                    raw.keepalive_timeout.as_deref(),
                    DEFAULT_KEEPALIVE_TIMEOUT,
                ),
                park_idle_after: park_idle_after(problems, at, &raw),
                splice: raw.splice.unwrap_or(DEFAULT_SPLICE),
                forwarded_header: raw.forwarded_header.unwrap_or(false),
                abort_on_close: raw.abort_on_close.unwrap_or(true),
                max_body_size: raw.max_body_size.as_ref().and_then(|value| {
                    problems.check(format!("{at}.max_body_size"), parse_size(value))
                }),
                rules: validate_rules(
                    problems,
                    at,
                    RawRules {
                        request_headers: raw.request_headers.as_ref(),
                        response_headers: raw.response_headers.as_ref(),
                        rewrite: raw.rewrite.as_ref(),
                        host_rewrite: raw.host_rewrite.as_ref(),
                        redirect: raw.redirect.as_ref(),
                        cookie_flags: raw.cookie_flags.as_ref(),
                        compression: raw.compression.as_ref(),
                    },
                ),
                access_log: raw.access_log.as_ref().and_then(|log| {
                    validate_access_log(problems, &format!("{at}.access_log"), log, base)
                }),
                rate_limit: raw.rate_limit.as_ref().and_then(|limit| {
                    validate_rate_limit(problems, &format!("{at}.rate_limit"), limit, true)
                }),
            })))
        }
        "" => {
            problems.push(
                format!("{at}.protocol"),
                "missing: protocol = \"tcp\", \"udp\" or \"http\"",
            );
            None
        }
        other => {
            problems.push(
                format!("{at}.protocol"),
                format!("unknown protocol `{other}` (expected \"tcp\", \"udp\" or \"http\")"),
            );
            None
        }
    };

    let proxy_protocol = validate_proxy_accept(problems, at, &raw, trusted_proxies);
    let access = validate_access(problems, at, raw.allow.as_deref(), raw.deny.as_deref());
    let tls = match (&raw.tls, protocol) {
        (Some(tls), "tcp" | "http") => validate_listener_tls(problems, at, tls, base),
        _ => None,
    };

    if problems.0.len() > before {
        return None;
    }
    Some(ListenerConfig {
        name,
        bind: bind?,
        max_connections,
        proxy_protocol,
        tls,
        access,
        kind: kind?,
    })
}

fn validate_proxy_accept(
    problems: &mut Problems,
    at: &str,
    raw: &RawListener,
    trusted: Vec<IpNet>,
) -> Option<ProxyProtocolAccept> {
    let timeout = optional_duration(
        problems,
        &format!("{at}.proxy_protocol_timeout"),
        raw.proxy_protocol_timeout.as_deref(),
        DEFAULT_PROXY_PROTOCOL_TIMEOUT,
    );
    let Some(mode) = &raw.proxy_protocol else {
        if raw.proxy_protocol_timeout.is_some() {
            problems.push(
                format!("{at}.proxy_protocol_timeout"),
                "set without proxy_protocol, so it would have no effect",
            );
        }
        // On http listeners trusted_proxies also decides whose X-Forwarded-For is believed; on
        // tcp and udp it means nothing without proxy_protocol.
        let layer4 = matches!(raw.protocol.as_deref(), Some("tcp" | "udp"));
        if layer4 && raw.trusted_proxies.is_some() {
            problems.push(
                format!("{at}.trusted_proxies"),
                "set without proxy_protocol, so it would have no effect",
            );
        }
        return None;
    };
    let version = match mode.as_str() {
        "v1" => ProxyProtocolVersions::V1,
        "v2" => ProxyProtocolVersions::V2,
        "any" => ProxyProtocolVersions::Any,
        other => {
            problems.push(
                format!("{at}.proxy_protocol"),
                format!("unknown value `{other}` (expected \"v1\", \"v2\" or \"any\")"),
            );
            return None;
        }
    };
    if raw.trusted_proxies.as_ref().is_none_or(Vec::is_empty) {
        problems.push(
            format!("{at}.trusted_proxies"),
            "proxy_protocol needs trusted_proxies: the CIDRs allowed to state a client address \
             (anyone else could forge it)",
        );
    }
    Some(ProxyProtocolAccept {
        version,
        trusted,
        timeout,
    })
}

/// The longest route name: a label of every series of the route, and a field of each of its
/// access log lines.
const MAX_ROUTE_NAME: usize = 64;

/// Route names label metrics and access log lines next to the positions of unnamed routes and
/// the `default` and `unrouted` labels, so each must be one of a kind among them: unique in its
/// listener, not a number, not one of those two words, and made of characters that need no
/// quoting anywhere they appear.
fn check_route_names(problems: &mut Problems, at: &str, routes: &[RawRoute]) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, route) in routes.iter().enumerate() {
        let Some(name) = route.name.as_deref() else {
            continue;
        };
        let key = format!("{at}.routes[{i}].name");
        if name.is_empty()
            || name.len() > MAX_ROUTE_NAME
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            problems.push(
                key,
                format!(
                    "`{name}`: a route name is 1 to {MAX_ROUTE_NAME} letters, digits, `-`, `_` \
                     or `.`"
                ),
            );
        } else if name.bytes().all(|b| b.is_ascii_digit()) {
            problems.push(
                key,
                format!("`{name}`: a number names the route at that position; use a word"),
            );
        } else if name == "default" || name == "unrouted" {
            problems.push(
                key,
                format!("`{name}` is the label of requests no route took; choose another name"),
            );
        } else if let Some(first) = seen.get(name) {
            problems.push(
                key,
                format!("`{name}` is also the name of {at}.routes[{first}]"),
            );
        } else {
            seen.insert(name, i);
        }
    }
}

fn validate_route(
    problems: &mut Problems,
    at: &str,
    raw: RawRoute,
    pools: &PoolNames,
) -> Option<RouteConfig> {
    let before = problems.0.len();
    let rules = validate_rules(
        problems,
        at,
        RawRules {
            request_headers: raw.request_headers.as_ref(),
            response_headers: raw.response_headers.as_ref(),
            rewrite: raw.rewrite.as_ref(),
            host_rewrite: raw.host_rewrite.as_ref(),
            redirect: raw.redirect.as_ref(),
            cookie_flags: raw.cookie_flags.as_ref(),
            compression: raw.compression.as_ref(),
        },
    );
    let access = validate_access(problems, at, raw.allow.as_deref(), raw.deny.as_deref());
    let rate_limit = raw
        .rate_limit
        .as_ref()
        .and_then(|limit| validate_rate_limit(problems, &format!("{at}.rate_limit"), limit, true));
    let redirects = raw.redirect.is_some();
    // A route that redirects answers every request it matches itself: a pool beside it would
    // never be used, so it is a mistake to report rather than a key to ignore.
    if redirects {
        for (present, key) in [(raw.pool.is_some(), "pool"), (raw.pools.is_some(), "pools")] {
            if present {
                problems.push(
                    format!("{at}.{key}"),
                    format!(
                        "a route with `redirect` answers its requests itself, so `{key}` would \
                         never be used: remove one of them"
                    ),
                );
            }
        }
    }
    let target = match (&raw.pool, raw.pools) {
        (Some(pool), None) => {
            known_pool(problems, &format!("{at}.pool"), pool, pools).map(RouteTarget::Pool)
        }
        (None, Some(split)) => validate_split(problems, at, split, pools),
        (Some(_), Some(_)) => {
            problems.push(
                format!("{at}.pools"),
                "a route has `pool` or `pools`, not both",
            );
            None
        }
        (None, None) if redirects => None,
        (None, None) => {
            problems.push(
                format!("{at}.pool"),
                "missing: a route names its `pool` (or a weighted `pools` split, or a `redirect`)",
            );
            None
        }
    };
    let Some(raw_match) = raw.match_ else {
        problems.push(
            format!("{at}.match"),
            "missing: e.g. match = { path_prefix = \"/api/\" }",
        );
        return None;
    };
    let m = format!("{at}.match");
    let mut matcher = RouteMatch::default();
    let mut conditions = 0;
    if let Some(prefix) = raw_match.path_prefix {
        conditions += 1;
        if !prefix.starts_with('/') {
            problems.push(format!("{m}.path_prefix"), "must start with `/`");
        }
        matcher.path_prefix = Some(prefix);
    }
    if let Some(path) = raw_match.path {
        conditions += 1;
        if !path.starts_with('/') {
            problems.push(format!("{m}.path"), "must start with `/`");
        }
        matcher.path = Some(path);
    }
    if let Some(pattern) = raw_match.path_regex {
        conditions += 1;
        matcher.path_regex = problems.check(format!("{m}.path_regex"), compile_regex(&pattern));
    }
    if let Some(host) = raw_match.host {
        conditions += 1;
        matcher.host = problems.check(format!("{m}.host"), parse_host_pattern(&host));
    }
    if let Some(header) = raw_match.header {
        conditions += 1;
        matcher.header = validate_header_match(problems, &format!("{m}.header"), header);
    }
    if let Some(methods) = raw_match.method {
        conditions += 1;
        let methods = match methods {
            StringOrList::One(method) => vec![method],
            StringOrList::Many(methods) => methods,
        };
        if methods.is_empty() {
            problems.push(format!("{m}.method"), "an empty list matches nothing");
        }
        for (i, method) in methods.iter().enumerate() {
            if !valid_header_name(method) {
                problems.push(
                    format!("{m}.method[{i}]"),
                    format!("`{method}` is not a valid method"),
                );
            }
        }
        matcher.methods = methods;
    }
    if let Some(query) = raw_match.query {
        conditions += 1;
        matcher.query = name_value(problems, &format!("{m}.query"), query);
    }
    if let Some(cookie) = raw_match.cookie {
        conditions += 1;
        matcher.cookie = name_value(problems, &format!("{m}.cookie"), cookie);
    }
    if conditions == 0 {
        problems.push(m, "has no conditions; use default_pool for a catch-all");
    }
    if problems.0.len() > before {
        return None;
    }
    if target.is_none() && !redirects {
        return None;
    }
    Some(RouteConfig {
        name: raw.name,
        matcher,
        target,
        rules,
        access,
        rate_limit,
    })
}

/// The `allow` and `deny` lists of a listener or route at `at`.
fn validate_access(
    problems: &mut Problems,
    at: &str,
    allow: Option<&[String]>,
    deny: Option<&[String]>,
) -> AccessList {
    let mut lists: [Vec<IpNet>; 2] = Default::default();
    for ((key, raw), list) in [("allow", allow), ("deny", deny)]
        .into_iter()
        .zip(&mut lists)
    {
        let Some(raw) = raw else { continue };
        if raw.is_empty() {
            // `allow = []` reads as "nobody" but would mean "everyone": refused rather than
            // guessed.
            problems.push(
                format!("{at}.{key}"),
                "an empty list changes nothing; remove the key (to refuse every client, \
                 write deny = [\"0.0.0.0/0\", \"::/0\"])",
            );
        }
        list.extend(
            raw.iter().enumerate().filter_map(|(i, cidr)| {
                problems.check(format!("{at}.{key}[{i}]"), parse_cidr(cidr))
            }),
        );
    }
    AccessList::new(&lists[0], &lists[1])
}

/// The raw rule keys of a listener or route, borrowed for validation.
struct RawRules<'a> {
    request_headers: Option<&'a super::raw::RawHeaderRules>,
    response_headers: Option<&'a super::raw::RawHeaderRules>,
    rewrite: Option<&'a super::raw::RawRewrite>,
    host_rewrite: Option<&'a String>,
    redirect: Option<&'a super::raw::RawRedirect>,
    cookie_flags: Option<&'a Vec<String>>,
    compression: Option<&'a super::raw::RawCompression>,
}

/// Fields the proxy writes itself; rules may not touch them.
const MANAGED_FIELDS: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
];

fn validate_rules(problems: &mut Problems, at: &str, raw: RawRules<'_>) -> Rules {
    let mut rules = Rules::default();
    if let Some(headers) = raw.request_headers {
        rules.request_headers =
            validate_header_rules(problems, &format!("{at}.request_headers"), headers);
    }
    if let Some(headers) = raw.response_headers {
        rules.response_headers =
            validate_header_rules(problems, &format!("{at}.response_headers"), headers);
    }
    if let Some(rewrite) = raw.rewrite {
        let path = format!("{at}.rewrite");
        rules.rewrite = match (
            &rewrite.strip_prefix,
            &rewrite.add_prefix,
            &rewrite.regex,
            &rewrite.replace,
        ) {
            (None, None, Some(pattern), Some(replace)) => compile_regex(pattern)
                .map_err(|reason| problems.push(format!("{path}.regex"), reason))
                .ok()
                .and_then(|regex| {
                    problems.check(
                        format!("{path}.replace"),
                        check_replacement(&regex, replace),
                    )?;
                    Some(Rewrite::Regex {
                        regex,
                        replace: replace.clone(),
                    })
                }),
            (strip, add, None, None) if strip.is_some() || add.is_some() => {
                for (key, value) in [("strip_prefix", strip), ("add_prefix", add)] {
                    if let Some(value) = value
                        && !value.starts_with('/')
                    {
                        problems.push(format!("{path}.{key}"), "must start with `/`");
                    }
                }
                Some(Rewrite::Prefix {
                    strip: strip.clone(),
                    add: add.clone(),
                })
            }
            _ => {
                problems.push(
                    path,
                    "needs `strip_prefix` and/or `add_prefix`, or `regex` with `replace`",
                );
                None
            }
        };
    }
    if let Some(host) = raw.host_rewrite {
        if !valid_authority(host) {
            problems.push(
                format!("{at}.host_rewrite"),
                format!(
                    "`{host}` is not a host name, with an optional port, e.g. \"internal.local\" \
                     or \"10.0.0.1:8080\""
                ),
            );
        } else {
            rules.host_rewrite = Some(host.clone());
        }
    }
    if let Some(redirect) = raw.redirect {
        let path = format!("{at}.redirect");
        let status = match redirect.status {
            None => Some(301),
            Some(s @ (301 | 302 | 307 | 308)) => Some(s as u16),
            Some(other) => {
                problems.push(
                    format!("{path}.status"),
                    format!("{other} is not a redirect status (301, 302, 307 or 308)"),
                );
                None
            }
        };
        let to = match &redirect.to {
            None => {
                problems.push(
                    format!("{path}.to"),
                    "missing, e.g. \"https://{host}{path}\"",
                );
                None
            }
            Some(to) => {
                let without = to.replace("{host}", "").replace("{path}", "");
                if to.is_empty() {
                    problems.push(
                        format!("{path}.to"),
                        "empty: where to send the client, e.g. \"https://{host}{path}\"",
                    );
                    None
                } else if without.contains(['{', '}']) {
                    problems.push(
                        format!("{path}.to"),
                        "only {host} and {path} may be used as placeholders",
                    );
                    None
                } else if !to.bytes().all(|b| b.is_ascii_graphic()) {
                    problems.push(
                        format!("{path}.to"),
                        "must not contain spaces or control characters",
                    );
                    None
                } else {
                    Some(to.clone())
                }
            }
        };
        if let (Some(to), Some(status)) = (to, status) {
            rules.redirect = Some(Redirect { to, status });
        }
    }
    if let Some(compression) = raw.compression {
        rules.compression =
            validate_compression(problems, &format!("{at}.compression"), compression);
    }
    if let Some(flags) = raw.cookie_flags {
        for (i, flag) in flags.iter().enumerate() {
            let lower = flag.to_ascii_lowercase();
            let known = matches!(lower.as_str(), "secure" | "httponly" | "partitioned")
                || matches!(
                    lower.as_str(),
                    "samesite=strict" | "samesite=lax" | "samesite=none"
                );
            if known {
                rules.cookie_flags.push(flag.clone());
            } else {
                problems.push(
                    format!("{at}.cookie_flags[{i}]"),
                    format!("`{flag}` is not one of Secure, HttpOnly, Partitioned, SameSite=Strict|Lax|None"),
                );
            }
        }
    }
    rules
}

fn validate_compression(
    problems: &mut Problems,
    at: &str,
    raw: &super::raw::RawCompression,
) -> Option<Compression> {
    let before = problems.0.len();
    let algorithms = match &raw.algorithms {
        None => vec![Encoding::Zstd, Encoding::Brotli, Encoding::Gzip],
        Some(list) if list.is_empty() => {
            problems.push(
                format!("{at}.algorithms"),
                "empty: name at least one of zstd, br, gzip",
            );
            Vec::new()
        }
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, name)| match name.as_str() {
                "gzip" => Some(Encoding::Gzip),
                "br" => Some(Encoding::Brotli),
                "zstd" => Some(Encoding::Zstd),
                other => {
                    problems.push(
                        format!("{at}.algorithms[{i}]"),
                        format!("unknown algorithm `{other}` (expected zstd, br or gzip)"),
                    );
                    None
                }
            })
            .collect(),
    };
    let min_size = match raw.min_size {
        None => DEFAULT_COMPRESSION_MIN_SIZE,
        Some(n) if n >= 0 => n as u64,
        Some(n) => {
            problems.push(format!("{at}.min_size"), format!("{n} is negative"));
            0
        }
    };
    let types = match &raw.types {
        None => DEFAULT_COMPRESSION_TYPES
            .iter()
            .map(|t| (*t).to_owned())
            .collect(),
        Some(types) => {
            for (i, t) in types.iter().enumerate() {
                let valid = t.split_once('/').is_some_and(|(a, b)| {
                    valid_header_name(a) && (b == "*" || valid_header_name(b))
                });
                if !valid {
                    problems.push(
                        format!("{at}.types[{i}]"),
                        format!("`{t}` is not a media type like \"text/html\" or \"text/*\""),
                    );
                }
            }
            types.clone()
        }
    };
    (problems.0.len() == before).then_some(Compression {
        algorithms,
        min_size,
        types,
    })
}

fn validate_header_rules(
    problems: &mut Problems,
    at: &str,
    raw: &super::raw::RawHeaderRules,
) -> HeaderRules {
    let mut rules = HeaderRules::default();
    let check_name = |problems: &mut Problems, path: String, name: &str| -> bool {
        if !valid_header_name(name) {
            problems.push(path, format!("`{name}` is not a valid header name"));
            false
        } else if MANAGED_FIELDS.iter().any(|m| m.eq_ignore_ascii_case(name)) {
            problems.push(
                path,
                format!("`{name}` is managed by the proxy (use host_rewrite for Host)"),
            );
            false
        } else {
            true
        }
    };
    for (kind, map) in [("add", &raw.add), ("set", &raw.set)] {
        let mut seen: Vec<&str> = Vec::new();
        for (name, value) in map.iter().flatten() {
            let path = format!("{at}.{kind}.{name}");
            if !check_name(problems, path.clone(), name) {
                continue;
            }
            // Names are case-insensitive, TOML keys are not: two keys would send two fields.
            if let Some(first) = seen.iter().find(|s| s.eq_ignore_ascii_case(name)) {
                problems.push(
                    path,
                    format!(
                        "also {} as `{first}`, and names are case-insensitive: keep one",
                        if kind == "set" { "set" } else { "added" }
                    ),
                );
                continue;
            }
            seen.push(name);
            if !value
                .bytes()
                .all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
            {
                problems.push(path, "the value must not contain control characters");
                continue;
            }
            let entry = (name.clone(), value.clone());
            if kind == "add" {
                rules.add.push(entry);
            } else {
                rules.set.push(entry);
            }
        }
    }
    for (i, name) in raw.remove.iter().flatten().enumerate() {
        if check_name(problems, format!("{at}.remove[{i}]"), name) {
            rules.remove.push(name.to_ascii_lowercase());
        }
    }
    rules
}

fn validate_split(
    problems: &mut Problems,
    at: &str,
    split: Vec<super::raw::RawWeightedPool>,
    pools: &PoolNames,
) -> Option<RouteTarget> {
    if split.is_empty() {
        problems.push(format!("{at}.pools"), "empty: name at least one pool");
        return None;
    }
    let mut targets = Vec::new();
    let mut valid = true;
    for (i, entry) in split.into_iter().enumerate() {
        let path = format!("{at}.pools[{i}]");
        let pool = match &entry.pool {
            Some(pool) => known_pool(problems, &format!("{path}.pool"), pool, pools),
            None => {
                problems.push(format!("{path}.pool"), "missing");
                None
            }
        };
        let weight = match entry.weight {
            None => Some(1),
            Some(w) if (0..=i64::from(MAX_SPLIT_WEIGHT)).contains(&w) => Some(w as u32),
            Some(w) => {
                problems.push(
                    format!("{path}.weight"),
                    format!("{w} is out of range: 0 to {MAX_SPLIT_WEIGHT}"),
                );
                None
            }
        };
        match (pool, weight) {
            (Some(pool), Some(weight)) => targets.push((pool, weight)),
            // The entry's own problem is reported (or its pool's, for a pool that failed
            // validation); the sum of weights below would only add a misleading one.
            _ => valid = false,
        }
    }
    if !valid {
        return None;
    }
    if targets.iter().all(|(_, w)| *w == 0) {
        problems.push(
            format!("{at}.pools"),
            "every weight is 0: no request could be sent",
        );
        return None;
    }
    Some(RouteTarget::Split(targets))
}

fn validate_header_match(
    problems: &mut Problems,
    at: &str,
    raw: super::raw::RawHeaderMatch,
) -> Option<HeaderMatch> {
    let name = match raw.name {
        Some(name) if valid_header_name(&name) => name.to_ascii_lowercase(),
        Some(name) => {
            problems.push(
                format!("{at}.name"),
                format!("`{name}` is not a valid header name"),
            );
            return None;
        }
        None => {
            problems.push(format!("{at}.name"), "missing");
            return None;
        }
    };
    let condition = match (raw.value, raw.regex, raw.present) {
        (Some(value), None, None) => ValueMatch::Exact(value),
        (None, Some(pattern), None) => {
            ValueMatch::Regex(problems.check(format!("{at}.regex"), compile_regex(&pattern))?)
        }
        (None, None, Some(true)) => ValueMatch::Present,
        (None, None, Some(false)) => {
            problems.push(
                format!("{at}.present"),
                "only `present = true` is supported",
            );
            return None;
        }
        _ => {
            problems.push(
                at,
                "needs exactly one of `value`, `regex` or `present = true`",
            );
            return None;
        }
    };
    Some(HeaderMatch { name, condition })
}

fn name_value(
    problems: &mut Problems,
    at: &str,
    raw: super::raw::RawNameValue,
) -> Option<(String, String)> {
    match (raw.name, raw.value) {
        (Some(name), Some(value)) if !name.is_empty() => Some((name, value)),
        (Some(_), Some(_)) => {
            problems.push(format!("{at}.name"), "must not be empty");
            None
        }
        (None, _) => {
            problems.push(format!("{at}.name"), "missing");
            None
        }
        (_, None) => {
            problems.push(format!("{at}.value"), "missing");
            None
        }
    }
}

/// Compiles a regular expression, bounding its compiled size so a pathological pattern is a
/// config error rather than a memory problem.
fn compile_regex(pattern: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|error| regex_failure(pattern, &error))
}

/// Why `pattern` is not a regular expression, in one line (`check` prints a problem a line):
/// the regex crate draws the pattern and a caret under the mistake over several lines.
fn regex_failure(pattern: &str, error: &regex::Error) -> String {
    let regex::Error::Syntax(text) = error else {
        return format!("invalid regular expression `{pattern}`: {error}");
    };
    let Some(what) = text.lines().rev().find_map(|l| l.strip_prefix("error: ")) else {
        return format!(
            "invalid regular expression `{pattern}`: {}",
            text.lines().collect::<Vec<_>>().join(" ")
        );
    };
    // The pattern is drawn indented by four spaces, and the caret under it; a pattern of
    // several lines is drawn with line numbers, and then the caret is not counted here.
    let caret = text
        .lines()
        // The heading and the pattern, which may itself be all carets.
        .skip(2)
        .find(|l| l.contains('^') && l.trim().chars().all(|c| c == '^'))
        .and_then(|l| l.find('^'))
        .filter(|_| !pattern.contains('\n'))
        .and_then(|column| column.checked_sub(3));
    match caret {
        Some(at) => format!("invalid regular expression `{pattern}`: {what} (at character {at})"),
        None => format!("invalid regular expression `{pattern}`: {what}"),
    }
}

/// `global.resolvers`, or when the file has none and a backend needs them (`system` is read
/// then), the system's.
fn validate_resolvers(
    problems: &mut Problems,
    raw: Option<&[String]>,
    system: Option<&crate::dns::ResolvConf>,
) -> Vec<SocketAddr> {
    match raw {
        Some([]) => {
            problems.push(
                "global.resolvers",
                "empty: name at least one resolver, or leave the key out to use /etc/resolv.conf",
            );
            Vec::new()
        }
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(i, text)| {
                let parsed = text
                    .parse::<SocketAddr>()
                    .or_else(|_| {
                        text.parse::<std::net::IpAddr>()
                            .map(|ip| SocketAddr::new(ip, crate::dns::DNS_PORT))
                    })
                    .map_err(|_| format!("`{text}` is not an IP address or IP:PORT"));
                problems.check(format!("global.resolvers[{i}]"), parsed)
            })
            .collect(),
        None => {
            // No backend needs them.
            let Some(system) = system else {
                return Vec::new();
            };
            if system.nameservers.is_empty() {
                problems.push(
                    "global.resolvers",
                    "not set, and /etc/resolv.conf names no nameserver: a backend with \
                     `resolve = true` needs one",
                );
            }
            system.nameservers.clone()
        }
    }
}

/// `global.search` and `global.ndots`, each in place of the system's when the file sets it.
fn validate_search(
    problems: &mut Problems,
    domains: Option<&[String]>,
    ndots: Option<i64>,
    system: Option<&crate::dns::ResolvConf>,
) -> crate::dns::Search {
    let from_system = system.map(|conf| conf.search.clone()).unwrap_or_default();
    let domains = match domains {
        None => from_system.domains,
        Some(list) => {
            // Each valid domain, and where it is in the list.
            let mut domains: Vec<(usize, String)> = Vec::new();
            for (i, text) in list.iter().enumerate() {
                let Some(domain) = crate::dns::search_domain(text) else {
                    problems.push(
                        format!("global.search[{i}]"),
                        format!(
                            "`{text}` is not a domain name (labels of letters, digits, `-` \
                             and `_`, 1 to 63 bytes each, separated by dots)"
                        ),
                    );
                    continue;
                };
                if let Some((first, _)) = domains
                    .iter()
                    .find(|(_, other)| other.eq_ignore_ascii_case(&domain))
                {
                    problems.push(
                        format!("global.search[{i}]"),
                        format!("`{text}` is also global.search[{first}]"),
                    );
                    continue;
                }
                domains.push((i, domain));
            }
            domains.into_iter().map(|(_, domain)| domain).collect()
        }
    };
    let ndots = match ndots {
        None => from_system.ndots,
        Some(n) => match u8::try_from(n) {
            Ok(n) if n <= crate::dns::MAX_NDOTS => n,
            _ => {
                problems.push(
                    "global.ndots",
                    format!(
                        "{n} is out of range: ndots is 0 to {}",
                        crate::dns::MAX_NDOTS
                    ),
                );
                crate::dns::DEFAULT_NDOTS
            }
        },
    };
    crate::dns::Search { domains, ndots }
}

/// The answers for the host names of `resolve = true` entries, looked up together: a
/// resolver that does not answer costs a load one timeout, not one for each name.
type Answers = HashMap<String, Result<crate::dns::Resolved, crate::dns::DnsError>>;

/// Looks up, all at once, every host name that [`resolve_name`] will ask about.
fn look_up_names(
    pools: &BTreeMap<String, RawPool>,
    search: &crate::dns::Search,
    resolvers: &[SocketAddr],
) -> Answers {
    if resolvers.is_empty() {
        return Answers::new();
    }
    let mut hosts: Vec<&str> = pools
        .values()
        .flat_map(|pool| pool.backends.iter().flatten())
        .filter_map(|backend| match backend {
            RawBackend::Table(table) if table.resolve == Some(true) => table
                .address
                .as_deref()
                .and_then(host_and_port)
                .map(|(host, _)| host),
            _ => None,
        })
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    let results = crate::dns::lookup_all(&hosts, search, resolvers, crate::dns::QUERY_TIMEOUT);
    hosts.into_iter().map(str::to_owned).zip(results).collect()
}

/// The host name and port of a `resolve = true` entry's address, unless it is an IP address
/// or not `host:port`.
fn host_and_port(address: &str) -> Option<(&str, u16)> {
    if address.parse::<SocketAddr>().is_ok() {
        return None;
    }
    address
        .rsplit_once(':')
        .filter(|(host, _)| !host.is_empty())
        .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)))
}

/// A backend entry with `resolve = true`: its host name, looked up with our own client.
fn resolve_name(
    problems: &mut Problems,
    path: &str,
    address: &str,
    answers: &Answers,
    search: &crate::dns::Search,
) -> Option<(String, u16, Vec<SocketAddr>, Duration, String)> {
    if address.parse::<SocketAddr>().is_ok() {
        problems.push(
            format!("{path}.resolve"),
            format!("applies only to a host name, and `{address}` is an IP address"),
        );
        return None;
    }
    let Some((host, port)) = host_and_port(address) else {
        problems.push(path, format!("`{address}` is not host:port"));
        return None;
    };
    if port == 0 {
        problems.push(
            path,
            format!("{address} has port 0, which no backend listens on"),
        );
        return None;
    }
    // No answer: there was no resolver to ask, which is said at global.resolvers already.
    match answers.get(host)? {
        Ok(resolved) => Some((
            host.to_owned(),
            port,
            resolved
                .addrs
                .iter()
                .map(|&ip| SocketAddr::new(ip, port))
                .collect(),
            resolved.ttl,
            resolved.name.clone(),
        )),
        Err(error) => {
            // A short name asked only as written: say that there was no search list to
            // complete it with, rather than leave the user to wonder why.
            let hint = if error.is_answer()
                && !host.contains('.')
                && crate::dns::candidates(host, search).len() == 1
            {
                " (there are no search domains to complete it with: write the name in full, \
                 or set global.search)"
            } else {
                ""
            };
            problems.push(path, format!("cannot resolve `{host}`: {error}{hint}"));
            None
        }
    }
}

fn validate_pool(
    problems: &mut Problems,
    name: &str,
    raw: RawPool,
    base: &Path,
    answers: &Answers,
    search: &crate::dns::Search,
) -> Option<PoolConfig> {
    let at = format!("pools.{name}");
    let before = problems.0.len();
    let mut backends = Vec::new();
    let mut names = Vec::new();
    match raw.backends {
        None => problems.push(format!("{at}.backends"), "missing: a pool needs backends"),
        Some(list) if list.is_empty() => problems.push(
            format!("{at}.backends"),
            "empty: a pool needs at least one backend",
        ),
        Some(list) => {
            let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
            for (i, backend) in list.into_iter().enumerate() {
                let path = format!("{at}.backends[{i}]");
                let (address, weight, backup, drain, max_connections, resolve) = match backend {
                    RawBackend::Address(address) => {
                        (Some(address), None, false, false, None, false)
                    }
                    RawBackend::Table(table) => (
                        table.address,
                        table.weight,
                        table.backup.unwrap_or(false),
                        table.drain.unwrap_or(false),
                        table.max_connections,
                        table.resolve.unwrap_or(false),
                    ),
                };
                let max_connections = max_connections.map(|n| {
                    positive(problems, &format!("{path}.max_connections"), Some(n), 1) as u64
                });
                let mut resolved = None;
                let addr = match address {
                    None => {
                        problems.push(format!("{path}.address"), "missing");
                        None
                    }
                    Some(address) if resolve => {
                        resolved = resolve_name(problems, &path, &address, answers, search);
                        None
                    }
                    Some(address) => {
                        problems
                            .check(&path, parse_address(&address))
                            .filter(|addr| {
                                // Port 0 is "any port" only to bind(); a connect to it is refused.
                                let usable = addr.port() != 0;
                                if !usable {
                                    problems.push(
                                        &path,
                                        format!("{addr} has port 0, which no backend listens on"),
                                    );
                                }
                                usable
                            })
                    }
                };
                let weight = match weight {
                    None => Some(1),
                    Some(w) if (1..=i64::from(MAX_WEIGHT)).contains(&w) => Some(w as u32),
                    Some(w) => {
                        problems.push(
                            format!("{path}.weight"),
                            format!("{w} is out of range: a weight is 1 to {MAX_WEIGHT}"),
                        );
                        None
                    }
                };
                if let (Some((host, port, addrs, ttl, answered)), Some(weight)) = (resolved, weight)
                {
                    names.push(ResolvedName {
                        host,
                        answered,
                        port,
                        ttl,
                        template: BackendConfig {
                            addr: addrs[0],
                            weight,
                            backup,
                            drain,
                            max_connections,
                        },
                        addrs,
                    });
                } else if let (Some(addr), Some(weight)) = (addr, weight) {
                    if let Some(first) = seen.insert(addr, i) {
                        problems.push(
                            &path,
                            format!("duplicate backend {addr} (also {at}.backends[{first}])"),
                        );
                    }
                    backends.push(BackendConfig {
                        addr,
                        weight,
                        backup,
                        drain,
                        max_connections,
                    });
                }
            }
        }
    }
    // The file's own addresses first, then those the names resolved to.
    let fixed = backends.len();
    expand_names(&mut backends, &names);
    let balance = match raw.balance.as_deref() {
        None | Some("round_robin") => BalanceKind::RoundRobin,
        Some("least_conn") => BalanceKind::LeastConn,
        Some("random") => BalanceKind::Random,
        Some("p2c") => BalanceKind::P2c,
        Some("p2c_ewma") => BalanceKind::P2cEwma,
        Some("maglev") => BalanceKind::Maglev,
        Some("ring_hash") => BalanceKind::RingHash,
        Some(other) => {
            problems.push(
                format!("{at}.balance"),
                format!(
                    "unknown algorithm `{other}` (expected round_robin, least_conn, random, p2c, \
                     p2c_ewma, maglev or ring_hash)"
                ),
            );
            BalanceKind::RoundRobin
        }
    };
    let connect_timeout = optional_duration(
        problems,
        &format!("{at}.connect_timeout"),
        raw.connect_timeout.as_deref(),
        DEFAULT_CONNECT_TIMEOUT,
    );
    let connect_attempts = match raw.connect_attempts {
        None => DEFAULT_CONNECT_ATTEMPTS,
        Some(n) if (1..=MAX_CONNECT_ATTEMPTS as i64).contains(&n) => n as usize,
        Some(n) => {
            problems.push(
                format!("{at}.connect_attempts"),
                format!("{n} is out of range: 1 to {MAX_CONNECT_ATTEMPTS}"),
            );
            DEFAULT_CONNECT_ATTEMPTS
        }
    };
    let send_proxy_protocol = match raw.send_proxy_protocol.as_deref() {
        None => None,
        Some("v1") => Some(ProxyProtocolVersion::V1),
        Some("v2") => Some(ProxyProtocolVersion::V2),
        Some(other) => {
            problems.push(
                format!("{at}.send_proxy_protocol"),
                format!("unknown value `{other}` (expected \"v1\" or \"v2\")"),
            );
            None
        }
    };
    let response_timeout = optional_duration(
        problems,
        &format!("{at}.response_timeout"),
        raw.response_timeout.as_deref(),
        DEFAULT_RESPONSE_TIMEOUT,
    );
    let keepalive_connections = match raw.keepalive_connections {
        None => DEFAULT_KEEPALIVE_CONNECTIONS,
        Some(n) if (0..=MAX_KEEPALIVE_CONNECTIONS).contains(&n) => n as usize,
        Some(n) => {
            problems.push(
                format!("{at}.keepalive_connections"),
                format!("{n} is out of range: 0 to {MAX_KEEPALIVE_CONNECTIONS}"),
            );
            DEFAULT_KEEPALIVE_CONNECTIONS
        }
    };
    let keepalive_timeout = optional_duration(
        problems,
        &format!("{at}.keepalive_timeout"),
        raw.keepalive_timeout.as_deref(),
        DEFAULT_UPSTREAM_KEEPALIVE_TIMEOUT,
    );
    let upstream_protocol = match raw.upstream_protocol.as_deref() {
        None | Some("http1") => UpstreamProtocol::Http1,
        Some("h2") => UpstreamProtocol::H2,
        Some(other) => {
            problems.push(
                format!("{at}.upstream_protocol"),
                format!("unknown protocol `{other}` (expected \"http1\" or \"h2\")"),
            );
            UpstreamProtocol::Http1
        }
    };
    if upstream_protocol == UpstreamProtocol::H2 && send_proxy_protocol.is_some() {
        problems.push(
            format!("{at}.send_proxy_protocol"),
            "an h2 backend connection is shared by many clients, so it cannot carry one client's \
             PROXY header",
        );
    }
    let tls = raw
        .tls
        .as_ref()
        .and_then(|tls| validate_upstream_tls(problems, &format!("{at}.tls"), tls, base));
    if !backends.is_empty() && backends.iter().all(|b| b.backup) {
        problems.push(
            format!("{at}.backends"),
            "every backend is a backup: at least one must be a primary",
        );
    }
    let hash_key = match raw.hash_key.as_deref() {
        None => HashKey::SourceIp,
        Some(text) => {
            if !balance.is_hashing() {
                problems.push(
                    format!("{at}.hash_key"),
                    "applies only to balance = \"maglev\" or \"ring_hash\"",
                );
            }
            problems
                .check(format!("{at}.hash_key"), parse_hash_key(text))
                .unwrap_or_default()
        }
    };
    let maglev_table_size = match raw.maglev_table_size {
        None => default_maglev_size(backends.len()),
        Some(n) => {
            let path = format!("{at}.maglev_table_size");
            if balance != BalanceKind::Maglev {
                problems.push(&path, "applies only to balance = \"maglev\"");
            }
            let minimum = 100 * backends.len().max(1);
            match usize::try_from(n) {
                Ok(n) if n > MAX_MAGLEV_TABLE_SIZE => problems.push(
                    &path,
                    format!("{n} is too large: at most {MAX_MAGLEV_TABLE_SIZE}"),
                ),
                Ok(n) if n >= minimum && is_prime(n) => {}
                _ => problems.push(
                    &path,
                    format!(
                        "{n} must be a prime of at least 100 x backends ({minimum}); \
                         {} would do",
                        default_maglev_size(backends.len())
                    ),
                ),
            }
            usize::try_from(n).unwrap_or(DEFAULT_MAGLEV_TABLE_SIZE)
        }
    };
    let ring_vnodes = match raw.ring_vnodes {
        None => DEFAULT_RING_VNODES,
        Some(n) => {
            let path = format!("{at}.ring_vnodes");
            if balance != BalanceKind::RingHash {
                problems.push(&path, "applies only to balance = \"ring_hash\"");
            }
            if (1..=10_000).contains(&n) {
                n as u32
            } else {
                problems.push(&path, format!("{n} is out of range: 1 to 10000"));
                DEFAULT_RING_VNODES
            }
        }
    };
    if balance == BalanceKind::RingHash {
        let points: u64 = backends
            .iter()
            .map(|b| u64::from(b.weight) * u64::from(ring_vnodes))
            .sum();
        if points > MAX_RING_POINTS {
            problems.push(
                format!("{at}.ring_vnodes"),
                format!(
                    "the ring would hold {points} points (ring_vnodes x the sum of weights), \
                     more than {MAX_RING_POINTS}: lower ring_vnodes or the weights"
                ),
            );
        }
    }
    let sticky = raw.sticky.map(|raw| {
        let path = format!("{at}.sticky");
        let cookie = match raw.cookie {
            None => {
                problems.push(format!("{path}.cookie"), "missing: the cookie's name");
                String::new()
            }
            Some(name) if !is_cookie_name(&name) => {
                problems.push(
                    format!("{path}.cookie"),
                    format!("`{name}` is not a valid cookie name"),
                );
                name
            }
            Some(name) => name,
        };
        let ttl = optional_duration(
            problems,
            &format!("{path}.ttl"),
            raw.ttl.as_deref(),
            DEFAULT_STICKY_TTL,
        );
        if raw.secret.as_deref().is_some_and(|s| s.len() < 16) {
            problems.push(
                format!("{path}.secret"),
                "too short: use at least 16 characters",
            );
        }
        StickyConfig {
            cookie,
            ttl,
            secret: raw.secret,
        }
    });
    let health = raw
        .health
        .and_then(|raw| validate_health(problems, &format!("{at}.health"), raw, upstream_protocol));
    let outlier = raw.outlier.map(|raw| {
        let path = format!("{at}.outlier");
        let consecutive_failures = positive(
            problems,
            &format!("{path}.consecutive_failures"),
            raw.consecutive_failures,
            DEFAULT_CONSECUTIVE_FAILURES as usize,
        )
        .min(u32::MAX as usize) as u32;
        let base_ejection_time = optional_duration(
            problems,
            &format!("{path}.base_ejection_time"),
            raw.base_ejection_time.as_deref(),
            DEFAULT_BASE_EJECTION_TIME,
        );
        let max_ejection_time = optional_duration(
            problems,
            &format!("{path}.max_ejection_time"),
            raw.max_ejection_time.as_deref(),
            DEFAULT_MAX_EJECTION_TIME.max(base_ejection_time),
        );
        if max_ejection_time < base_ejection_time {
            problems.push(
                format!("{path}.max_ejection_time"),
                "is shorter than base_ejection_time",
            );
        }
        let max_ejected_percent = match raw.max_ejected_percent {
            None => DEFAULT_MAX_EJECTED_PERCENT,
            Some(n) if (0..=100).contains(&n) => n as u32,
            Some(n) => {
                problems.push(
                    format!("{path}.max_ejected_percent"),
                    format!("{n} is out of range: 0 to 100"),
                );
                DEFAULT_MAX_EJECTED_PERCENT
            }
        };
        OutlierConfig {
            consecutive_failures,
            base_ejection_time,
            max_ejection_time,
            max_ejected_percent,
        }
    });
    let slow_start = raw.slow_start.as_deref().map(|text| {
        optional_duration(
            problems,
            &format!("{at}.slow_start"),
            Some(text),
            Duration::ZERO,
        )
    });
    let queue = raw.queue.map(|raw| {
        let path = format!("{at}.queue");
        if !backends.iter().any(|b| b.max_connections.is_some()) {
            problems.push(
                &path,
                "a queue holds requests while every backend is at its max_connections, \
                 but no backend sets max_connections",
            );
        }
        QueueConfig {
            size: match raw.size {
                None => {
                    problems.push(format!("{path}.size"), "missing");
                    0
                }
                Some(n) => positive(problems, &format!("{path}.size"), Some(n), 1),
            },
            timeout: optional_duration(
                problems,
                &format!("{path}.timeout"),
                raw.timeout.as_deref(),
                DEFAULT_QUEUE_TIMEOUT,
            ),
        }
    });
    let retry = raw
        .retry
        .map(|raw| validate_retry(problems, &format!("{at}.retry"), raw, connect_attempts));
    let drain_timeout = optional_duration(
        problems,
        &format!("{at}.drain_timeout"),
        raw.drain_timeout.as_deref(),
        DEFAULT_BACKEND_DRAIN_TIMEOUT,
    );
    if problems.0.len() > before {
        return None;
    }
    let discovery = (!names.is_empty()).then(|| Discovery {
        names,
        fixed,
        connect_attempts,
        default_table: raw.maglev_table_size.is_none(),
    });
    Some(PoolConfig {
        discovery,
        tls,
        hash_key,
        maglev_table_size,
        ring_vnodes,
        sticky,
        health,
        outlier,
        panic_mode: raw.panic_mode.unwrap_or(false),
        slow_start,
        queue,
        retry,
        drain_timeout,
        response_timeout,
        keepalive_connections,
        keepalive_timeout,
        upstream_protocol,
        name: name.to_owned(),
        connect_attempts: connect_attempts.min(backends.len()),
        backends,
        balance,
        connect_timeout,
        send_proxy_protocol,
    })
}

/// `retry = { on, attempts }`: each condition a status from 400 to 599, `"5xx"` or `"timeout"`;
/// `attempts` as `connect_attempts` (which it defaults to) allows.
fn validate_retry(
    problems: &mut Problems,
    at: &str,
    raw: super::raw::RawRetry,
    connect_attempts: usize,
) -> RetryConfig {
    let attempts = match raw.attempts {
        None => connect_attempts,
        Some(n) if (1..=MAX_CONNECT_ATTEMPTS as i64).contains(&n) => n as usize,
        Some(n) => {
            problems.push(
                format!("{at}.attempts"),
                format!("{n} is out of range: 1 to {MAX_CONNECT_ATTEMPTS}"),
            );
            connect_attempts
        }
    };
    let mut retry = RetryConfig::new(attempts);
    for (i, condition) in raw.on.iter().flatten().enumerate() {
        match condition.as_str() {
            "timeout" => retry.timeout = true,
            "5xx" => (500..600).for_each(|status| retry.add_status(status)),
            text => match text.parse::<u16>() {
                Ok(status) if text.len() == 3 && (400..600).contains(&status) => {
                    retry.add_status(status);
                }
                _ => problems.push(
                    format!("{at}.on[{i}]"),
                    format!(
                        "unknown condition `{text}` (expected a status from \"400\" to \"599\", \
                         \"5xx\" or \"timeout\")"
                    ),
                ),
            },
        }
    }
    retry
}

fn validate_access_log(
    problems: &mut Problems,
    at: &str,
    raw: &super::raw::RawAccessLog,
    base: &Path,
) -> Option<AccessLogConfig> {
    let target = match raw.path.as_deref() {
        None | Some("stdout") => AccessLogTarget::Stdout,
        Some("stderr") => AccessLogTarget::Stderr,
        Some("") => {
            problems.push(format!("{at}.path"), "must not be empty");
            return None;
        }
        Some(path) => AccessLogTarget::File(base.join(path)),
    };
    let format = match raw.format.as_deref() {
        None | Some("json") => AccessLogFormat::Json,
        Some("combined") => AccessLogFormat::Combined,
        Some(other) => {
            problems.push(
                format!("{at}.format"),
                format!("unknown format `{other}` (expected \"json\" or \"combined\")"),
            );
            return None;
        }
    };
    Some(AccessLogConfig { target, format })
}

/// `rate_limit` at `at`; `keyed`: whether `key` may be set (http), or only the client address
/// counts (tcp, which sees no request).
fn validate_rate_limit(
    problems: &mut Problems,
    at: &str,
    raw: &super::raw::RawRateLimit,
    keyed: bool,
) -> Option<RateLimit> {
    use super::raw::RawRateKey;
    let before = problems.0.len();
    let rate = match raw.rate {
        None => {
            problems.push(format!("{at}.rate"), "missing: e.g. rate = 100");
            0
        }
        Some(rate) => match u32::try_from(rate) {
            Ok(rate @ 1..=MAX_RATE_LIMIT_RATE) => rate,
            _ => {
                problems.push(
                    format!("{at}.rate"),
                    format!("{rate} is out of range: 1 to {MAX_RATE_LIMIT_RATE}"),
                );
                0
            }
        },
    };
    let per = match raw.per.as_deref().map(parse_duration) {
        None => DEFAULT_RATE_LIMIT_PER,
        Some(Ok(per)) if (MIN_RATE_LIMIT_PER..=MAX_RATE_LIMIT_PER).contains(&per) => per,
        Some(Ok(_)) => {
            problems.push(format!("{at}.per"), "out of range: \"1ms\" to \"24h\"");
            DEFAULT_RATE_LIMIT_PER
        }
        Some(Err(reason)) => {
            problems.push(format!("{at}.per"), reason);
            DEFAULT_RATE_LIMIT_PER
        }
    };
    let burst = match raw.burst {
        None => 0,
        Some(burst) => match u32::try_from(burst) {
            Ok(burst @ 0..=MAX_RATE_LIMIT_BURST) => burst,
            _ => {
                problems.push(
                    format!("{at}.burst"),
                    format!("{burst} is out of range: 0 to {MAX_RATE_LIMIT_BURST}"),
                );
                0
            }
        },
    };
    let key = match &raw.key {
        None => RateKey::ClientIp,
        Some(_) if !keyed => {
            problems.push(
                format!("{at}.key"),
                "a tcp listener limits new connections by client address only; `key` is for \
                 http listeners and routes",
            );
            RateKey::ClientIp
        }
        Some(RawRateKey::Name(name)) if name == "client_ip" => RateKey::ClientIp,
        Some(RawRateKey::Name(other)) => {
            problems.push(
                format!("{at}.key"),
                format!(
                    "unknown key `{other}` (expected \"client_ip\" or {{ header = \"NAME\" }})"
                ),
            );
            RateKey::ClientIp
        }
        Some(RawRateKey::Table(table)) => match table.header.as_deref() {
            None => {
                problems.push(
                    format!("{at}.key.header"),
                    "missing: e.g. key = { header = \"X-API-Key\" }",
                );
                RateKey::ClientIp
            }
            Some(name) if valid_header_name(name) => RateKey::Header(name.to_ascii_lowercase()),
            Some(name) => {
                problems.push(
                    format!("{at}.key.header"),
                    format!("`{name}` is not a valid header name"),
                );
                RateKey::ClientIp
            }
        },
    };
    (problems.0.len() == before).then_some(RateLimit {
        rate,
        per,
        burst,
        key,
    })
}

fn validate_admin(problems: &mut Problems, raw: super::raw::RawAdmin) -> Option<AdminConfig> {
    let bind = match raw.bind {
        None => {
            problems.push("admin.bind", "missing: where the admin API listens");
            return None;
        }
        Some(text) => problems.check("admin.bind", parse_address(&text))?,
    };
    let token = raw.token.filter(|t| !t.is_empty());
    if let Some(token) = &token
        && (token.len() < 16 || token.bytes().any(|b| !b.is_ascii_graphic()))
    {
        problems.push(
            "admin.token",
            "use at least 16 visible ASCII characters (it is sent as a bearer token)",
        );
    }
    if token.is_none() && !bind.ip().is_loopback() {
        problems.push(
            "admin.token",
            format!(
                "missing: the admin API binds {bind}, which is not a loopback address, so it \
                 needs a token"
            ),
        );
    }
    Some(AdminConfig { bind, token })
}

/// A file named in the configuration, relative to the configuration's directory.
fn file_path(
    problems: &mut Problems,
    path: &str,
    text: Option<&String>,
    base: &Path,
) -> Option<PathBuf> {
    match text {
        None => {
            problems.push(path, "missing: the path of a PEM file");
            None
        }
        Some(text) if text.is_empty() => {
            problems.push(path, "must not be empty");
            None
        }
        Some(text) => Some(base.join(text)),
    }
}

fn validate_listener_tls(
    problems: &mut Problems,
    at: &str,
    raw: &super::raw::RawListenerTls,
    base: &Path,
) -> Option<ListenerTls> {
    let at = format!("{at}.tls");
    let before = problems.0.len();
    let mut certificates = Vec::new();
    match &raw.certificates {
        None => problems.push(
            format!("{at}.certificates"),
            "missing: e.g. certificates = [{ cert = \"site.pem\", key = \"site.key\" }]",
        ),
        Some(list) if list.is_empty() => problems.push(
            format!("{at}.certificates"),
            "empty: TLS needs at least one certificate",
        ),
        Some(list) => {
            for (i, c) in list.iter().enumerate() {
                let path = format!("{at}.certificates[{i}]");
                let cert = file_path(problems, &format!("{path}.cert"), c.cert.as_ref(), base);
                let key = file_path(problems, &format!("{path}.key"), c.key.as_ref(), base);
                if let (Some(cert), Some(key)) = (cert, key) {
                    certificates.push(CertificateFiles { cert, key });
                }
            }
        }
    }
    let client_ca = raw
        .client_ca
        .as_ref()
        .and_then(|ca| file_path(problems, &format!("{at}.client_ca"), Some(ca), base));
    let client_auth = match raw.client_auth.as_deref() {
        None | Some("required") => ClientAuth::Required,
        Some("optional") => ClientAuth::Optional,
        Some(other) => {
            problems.push(
                format!("{at}.client_auth"),
                format!("unknown value `{other}` (expected \"required\" or \"optional\")"),
            );
            ClientAuth::Required
        }
    };
    if raw.client_auth.is_some() && raw.client_ca.is_none() {
        problems.push(
            format!("{at}.client_auth"),
            "set without client_ca, the CAs client certificates are checked against",
        );
    }
    let handshake_timeout = optional_duration(
        problems,
        &format!("{at}.handshake_timeout"),
        raw.handshake_timeout.as_deref(),
        DEFAULT_TLS_HANDSHAKE_TIMEOUT,
    );
    if problems.0.len() > before {
        return None;
    }
    Some(ListenerTls {
        at,
        certificates,
        client_ca,
        client_auth,
        handshake_timeout,
    })
}

fn validate_upstream_tls(
    problems: &mut Problems,
    at: &str,
    raw: &super::raw::RawUpstreamTls,
    base: &Path,
) -> Option<UpstreamTls> {
    let before = problems.0.len();
    let verify = raw.verify.unwrap_or(true);
    let ca = raw
        .ca
        .as_ref()
        .and_then(|ca| file_path(problems, &format!("{at}.ca"), Some(ca), base));
    if verify && raw.ca.is_none() {
        problems.push(
            format!("{at}.ca"),
            "missing: the CAs backend certificates are verified against (or write verify = false \
             to skip verification)",
        );
    }
    if let Some(sni) = &raw.sni
        && rustls_pki_types::ServerName::try_from(sni.as_str()).is_err()
    {
        problems.push(
            format!("{at}.sni"),
            format!("`{sni}` is not a DNS name or IP address"),
        );
    }
    let client_certificate = match (&raw.cert, &raw.key) {
        (None, None) => None,
        (cert, key) => {
            let cert = file_path(problems, &format!("{at}.cert"), cert.as_ref(), base);
            let key = file_path(problems, &format!("{at}.key"), key.as_ref(), base);
            cert.zip(key)
                .map(|(cert, key)| CertificateFiles { cert, key })
        }
    };
    if problems.0.len() > before {
        return None;
    }
    Some(UpstreamTls {
        at: at.to_owned(),
        sni: raw.sni.clone(),
        ca,
        verify,
        client_certificate,
    })
}

fn validate_sni_routes(
    problems: &mut Problems,
    at: &str,
    raw: &RawListener,
    pools: &PoolNames,
) -> Vec<SniRoute> {
    let mut routes = Vec::new();
    for (i, route) in raw.sni_routes.iter().flatten().enumerate() {
        let path = format!("{at}.sni_routes[{i}]");
        let sni = match &route.sni {
            None => {
                problems.push(
                    format!("{path}.sni"),
                    "missing: e.g. sni = \"a.example.com\"",
                );
                None
            }
            Some(text) => match parse_host_pattern(text) {
                Ok(HostPattern::Prefix(_)) => {
                    problems.push(
                        format!("{path}.sni"),
                        format!("`{text}`: a server name is matched exactly or as `*.suffix`"),
                    );
                    None
                }
                result => problems.check(format!("{path}.sni"), result),
            },
        };
        let pool = match &route.pool {
            None => {
                problems.push(
                    format!("{path}.pool"),
                    "missing: the pool this name goes to",
                );
                None
            }
            Some(pool) => known_pool(problems, &format!("{path}.pool"), pool, pools),
        };
        // Passed-through bytes are never parsed or re-encrypted: keys that would do either
        // mean nothing on these pools.
        if let Some(name) = &pool
            && let Some(p) = pools.valid.get(name)
            && (p.tls.is_some() || p.upstream_protocol == UpstreamProtocol::H2)
        {
            problems.push(
                format!("{path}.pool"),
                format!(
                    "pool `{name}` sets tls or upstream_protocol = \"h2\", which only http \
                     listeners speak; passed-through TLS reaches the backends as it is"
                ),
            );
        }
        if let (Some(sni), Some(pool)) = (sni, pool) {
            routes.push(SniRoute { sni, pool });
        }
    }
    routes
}

/// `"source_ip"`, `"header:NAME"`, `"cookie:NAME"`, `"path"` or `"query:NAME"`.
fn parse_hash_key(text: &str) -> Result<HashKey, String> {
    let expected =
        "expected \"source_ip\", \"header:NAME\", \"cookie:NAME\", \"path\" or \"query:NAME\"";
    match text.split_once(':') {
        None if text == "source_ip" => Ok(HashKey::SourceIp),
        None if text == "path" => Ok(HashKey::Path),
        Some(("header", name)) => http::HeaderName::from_bytes(name.as_bytes())
            .map(HashKey::Header)
            .map_err(|_| format!("`{name}` is not a valid header name")),
        Some(("cookie", name)) if is_cookie_name(name) => Ok(HashKey::Cookie(name.to_owned())),
        Some(("query", name)) if !name.is_empty() => Ok(HashKey::Query(name.to_owned())),
        _ => Err(format!("unknown hash key `{text}` ({expected})")),
    }
}

/// A cookie name is an RFC 6265 token.
fn is_cookie_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
}

fn validate_health(
    problems: &mut Problems,
    path: &str,
    raw: super::raw::RawHealth,
    upstream_protocol: UpstreamProtocol,
) -> Option<HealthConfig> {
    let before = problems.0.len();
    let http_only = |problems: &mut Problems, present: bool, key: &str| {
        if present {
            problems.push(format!("{path}.{key}"), "applies only to kind = \"http\"");
        }
    };
    let grpc_only = |problems: &mut Problems, present: bool, key: &str| {
        if present {
            problems.push(format!("{path}.{key}"), "applies only to kind = \"grpc\"");
        }
    };
    let bad_host = |host: Option<&str>| {
        host.is_some_and(|h| h.is_empty() || h.bytes().any(|b| b <= b' ' || b == 0x7f))
    };
    let kind = match raw.kind.as_deref() {
        Some("tcp") => {
            http_only(problems, raw.path.is_some(), "path");
            http_only(problems, raw.host.is_some(), "host");
            http_only(problems, raw.expect_status.is_some(), "expect_status");
            grpc_only(problems, raw.service.is_some(), "service");
            HealthKind::Tcp
        }
        Some("grpc") => {
            http_only(problems, raw.path.is_some(), "path");
            http_only(problems, raw.expect_status.is_some(), "expect_status");
            if upstream_protocol != UpstreamProtocol::H2 {
                problems.push(
                    format!("{path}.kind"),
                    "gRPC checks need a pool that speaks HTTP/2: upstream_protocol = \"h2\"",
                );
            }
            if bad_host(raw.host.as_deref()) {
                problems.push(format!("{path}.host"), "not a valid authority");
            }
            HealthKind::Grpc {
                service: raw.service.unwrap_or_default(),
                host: raw.host,
            }
        }
        Some("http") => {
            grpc_only(problems, raw.service.is_some(), "service");
            let probe_path = raw.path.unwrap_or_else(|| "/".to_owned());
            if !probe_path.starts_with('/') || probe_path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                problems.push(
                    format!("{path}.path"),
                    "must start with `/` and contain no spaces or control characters",
                );
            }
            if bad_host(raw.host.as_deref()) {
                problems.push(format!("{path}.host"), "not a valid Host value");
            }
            let expect = match raw.expect_status.as_deref() {
                None => vec![(200, 399)],
                Some(text) => problems
                    .check(format!("{path}.expect_status"), parse_status_ranges(text))
                    .unwrap_or_default(),
            };
            HealthKind::Http {
                path: probe_path,
                host: raw.host,
                expect,
            }
        }
        None => {
            problems.push(
                format!("{path}.kind"),
                "missing: \"tcp\", \"http\" or \"grpc\"",
            );
            return None;
        }
        Some(other) => {
            problems.push(
                format!("{path}.kind"),
                format!("unknown kind `{other}` (expected \"tcp\", \"http\" or \"grpc\")"),
            );
            return None;
        }
    };
    let interval = optional_duration(
        problems,
        &format!("{path}.interval"),
        raw.interval.as_deref(),
        DEFAULT_HEALTH_INTERVAL,
    );
    let timeout = optional_duration(
        problems,
        &format!("{path}.timeout"),
        raw.timeout.as_deref(),
        DEFAULT_HEALTH_TIMEOUT.min(interval),
    );
    if timeout > interval {
        problems.push(
            format!("{path}.timeout"),
            "is longer than the interval: probes would overlap",
        );
    }
    let count = |problems: &mut Problems, key: &str, value: Option<i64>, default: u32| match value {
        None => default,
        Some(n) if (1..=100).contains(&n) => n as u32,
        Some(n) => {
            problems.push(
                format!("{path}.{key}"),
                format!("{n} is out of range: 1 to 100"),
            );
            default
        }
    };
    let rise = count(problems, "rise", raw.rise, DEFAULT_HEALTH_RISE);
    let fall = count(problems, "fall", raw.fall, DEFAULT_HEALTH_FALL);
    (problems.0.len() == before).then_some(HealthConfig {
        kind,
        interval,
        timeout,
        rise,
        fall,
    })
}

/// `"200-399"`, `"200"`, `"200,204,300-302"`.
fn parse_status_ranges(text: &str) -> Result<Vec<(u16, u16)>, String> {
    let status = |s: &str| {
        s.trim()
            .parse::<u16>()
            .ok()
            .filter(|n| (100..=599).contains(n))
            .ok_or_else(|| format!("`{}` is not a status code (100 to 599)", s.trim()))
    };
    text.split(',')
        .map(|part| match part.split_once('-') {
            Some((low, high)) => {
                let (low, high) = (status(low)?, status(high)?);
                if low > high {
                    return Err(format!("`{}` is an empty range", part.trim()));
                }
                Ok((low, high))
            }
            None => status(part).map(|s| (s, s)),
        })
        .collect()
}

pub(super) fn is_prime(n: usize) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// The pools a listener or route may name.
struct PoolNames<'a> {
    /// Pools that passed validation.
    valid: &'a BTreeMap<String, PoolConfig>,
    /// Every pool the file declares, valid or not.
    declared: std::collections::BTreeSet<String>,
}

/// Names a pool, or records that the name is unknown. A pool that the file declares but that
/// failed validation has its own problems reported already; naming it is not one more.
fn known_pool(
    problems: &mut Problems,
    path: &str,
    name: &str,
    pools: &PoolNames,
) -> Option<String> {
    if pools.valid.contains_key(name) {
        return Some(name.to_owned());
    }
    if pools.declared.contains(name) {
        return None;
    }
    let known: Vec<&str> = pools.declared.iter().map(String::as_str).collect();
    problems.push(
        path,
        if known.is_empty() {
            format!("unknown pool `{name}` (no pools are defined)")
        } else {
            format!("unknown pool `{name}` (defined: {})", known.join(", "))
        },
    );
    None
}

/// A listener's `park_idle_after`: a duration, or `"off"` (`None`).
fn park_idle_after(problems: &mut Problems, at: &str, raw: &RawListener) -> Option<Duration> {
    match raw.park_idle_after.as_deref() {
        Some("off") => None,
        text => Some(optional_duration(
            problems,
            &format!("{at}.park_idle_after"),
            text,
            DEFAULT_PARK_IDLE_AFTER,
        )),
    }
}

/// The most idle keep-alive connections a pool may keep per backend: a bound against a typo
/// that would let idle connections exhaust descriptors.
const MAX_KEEPALIVE_CONNECTIONS: i64 = 100_000;

fn optional_duration(
    problems: &mut Problems,
    path: &str,
    text: Option<&str>,
    default: Duration,
) -> Duration {
    match text {
        None => default,
        Some(text) => match parse_duration(text) {
            Ok(d) if d.is_zero() => {
                problems.push(path, "must be greater than zero");
                default
            }
            Ok(d) => d,
            Err(reason) => {
                problems.push(path, reason);
                default
            }
        },
    }
}

fn positive(problems: &mut Problems, path: &str, value: Option<i64>, default: usize) -> usize {
    match value {
        None => default,
        Some(v) if v >= 1 => usize::try_from(v).unwrap_or(usize::MAX),
        Some(v) => {
            problems.push(path, format!("{v} is out of range: must be at least 1"));
            default
        }
    }
}

/// A size in bytes: an integer, or a string with a binary suffix (`"512k"`, `"10m"`, `"1g"`).
/// A mistake is said with the way to write what was likely meant.
fn parse_size(value: &toml::Value) -> Result<u64, String> {
    const EXAMPLES: &str = "(e.g. 1048576, \"512k\", \"10m\")";
    let at_least_one = |written: &dyn std::fmt::Display| {
        format!("{written} is not a size: a size is at least 1 byte {EXAMPLES}")
    };
    let text = match value {
        toml::Value::Integer(n) if *n >= 1 => return Ok(*n as u64),
        toml::Value::Integer(n) => return Err(at_least_one(n)),
        toml::Value::String(text) => text.trim(),
        other => return Err(format!("{other} is not a size {EXAMPLES}")),
    };
    // `10MB`, `512kb`: the suffix is the letter alone.
    let unsuffixed = text
        .strip_suffix(['b', 'B'])
        .filter(|t| t.ends_with(['k', 'K', 'm', 'M', 'g', 'G']));
    let (digits, multiplier) = match unsuffixed.unwrap_or(text).char_indices().last() {
        Some((i, 'k' | 'K')) => (&text[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&text[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    let written = format!("`{text}`");
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return match digits
            .parse::<u64>()
            .ok()
            .map(|n| n.checked_mul(multiplier))
        {
            Some(Some(0)) => Err(at_least_one(&written)),
            Some(Some(bytes)) => match unsuffixed {
                None => Ok(bytes),
                Some(letter) => Err(format!(
                    "{written} is not a size: the suffix is the letter alone; write \"{}\"",
                    letter.to_ascii_lowercase()
                )),
            },
            _ => Err(format!("{written} is too large: at most 2^64 - 1 bytes")),
        };
    }
    if digits.starts_with('-') {
        return Err(at_least_one(&written));
    }
    if digits.contains('.') {
        return Err(format!(
            "{written} is not a size: a size is a whole number, of bytes or of k, m or g {EXAMPLES}"
        ));
    }
    Err(format!("{written} is not a size {EXAMPLES}"))
}

/// `ip:port`, `[v6]:port` or `host:port`; a host name is resolved now, once.
fn parse_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(format!("`{text}` is not host:port"));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("`{text}` is not host:port"));
    }
    match text.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("`{host}` resolves to no address")),
        Err(error) => Err(format!("cannot resolve `{host}`: {error}")),
    }
}

/// An address or CIDR. IPv4-mapped IPv6 networks (`::ffff:10.0.0.0/104`) become the IPv4
/// networks they mean, because peers are compared in their canonical form.
fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let net = match text.parse::<IpNet>() {
        Ok(net) => net.trunc(),
        Err(_) => text
            .parse::<std::net::IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("`{text}` is not an address or CIDR (e.g. \"10.0.0.0/8\")"))?,
    };
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
    {
        if v6.prefix_len() < 96 {
            return Err(format!(
                "`{text}` mixes IPv4-mapped and other IPv6 addresses; write the IPv4 part as its own CIDR"
            ));
        }
        return ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96)
            .map(IpNet::V4)
            .map_err(|e| format!("`{text}`: {e}"));
    }
    Ok(net)
}

fn parse_host_pattern(text: &str) -> Result<HostPattern, String> {
    let host = text.to_ascii_lowercase();
    // A trailing dot names the same host, and names compared with patterns (Host fields, SNI)
    // lose theirs: kept here, the pattern could never match.
    let host = match host.strip_suffix('.') {
        Some(stripped) if !stripped.is_empty() => stripped.to_owned(),
        _ => host,
    };
    let valid = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    };
    if let Some(suffix) = host.strip_prefix("*.") {
        if valid(suffix) && !suffix.contains('*') {
            return Ok(HostPattern::Suffix(format!(".{suffix}")));
        }
    } else if let Some(prefix) = host.strip_suffix(".*") {
        if valid(prefix) {
            return Ok(HostPattern::Prefix(format!("{prefix}.")));
        }
    } else if valid(&host) {
        return Ok(HostPattern::Exact(host));
    }
    Err(format!(
        "`{text}` is not a host name, `*.suffix` or `prefix.*` pattern"
    ))
}

/// Whether `text` is a Host value as the proxy accepts one from clients: a host name or IPv4
/// address (letters, digits, `-`, `.`, `_`, `~`) or a bracketed IPv6 address, then optionally
/// `:` and a port. Nothing a backend could read a path, a user or a second host out of.
fn valid_authority(text: &str) -> bool {
    let (host, port) = match text.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((inside, port)) => {
                if inside.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                (None, port)
            }
            None => return false,
        },
        None => match text.split_once(':') {
            Some((host, _)) => (Some(host), &text[host.len()..]),
            None => (Some(text), ""),
        },
    };
    let host_ok = host.is_none_or(|h| {
        !h.is_empty()
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
    });
    let port_ok = port.is_empty()
        || port.strip_prefix(':').is_some_and(|p| {
            !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
        });
    host_ok && port_ok
}

/// Checks that every group a rewrite's `replace` names (`$1`, `$name`, `${name}`) exists in its
/// regex. The regex crate reads `$1_x` as the group `1_x` and puts nothing where a group is
/// missing, so a typo would silently drop part of every path.
fn check_replacement(regex: &regex::Regex, replace: &str) -> Result<(), String> {
    let mut rest = replace;
    while let Some(dollar) = rest.find('$') {
        rest = &rest[dollar + 1..];
        if let Some(after) = rest.strip_prefix('$') {
            rest = after;
            continue;
        }
        let (name, braced) = match rest.strip_prefix('{') {
            Some(inner) => match inner.find('}') {
                Some(end) => {
                    rest = &inner[end + 1..];
                    (&inner[..end], true)
                }
                // No closing brace: the regex crate writes a literal `$`.
                None => continue,
            },
            None => {
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                let name = &rest[..end];
                rest = &rest[end..];
                (name, false)
            }
        };
        if name.is_empty() {
            continue;
        }
        let exists = match name.parse::<usize>() {
            Ok(index) => index < regex.captures_len(),
            Err(_) => regex.capture_names().flatten().any(|n| n == name),
        };
        if exists {
            continue;
        }
        let digits = name.bytes().take_while(u8::is_ascii_digit).count();
        return Err(if !braced && digits > 0 && digits < name.len() {
            format!(
                "`${name}` names the group `{name}`, which the regex does not have: write \
                 `$${{{}}}{}` for group {} followed by `{}`",
                &name[..digits],
                &name[digits..],
                &name[..digits],
                &name[digits..]
            )
        } else {
            format!("the regex has no group `{name}`")
        });
    }
    Ok(())
}

/// RFC 9110 token characters.
fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_expansion() {
        assert_eq!(
            expand_env("${SWITCHYARD_TEST_UNSET_VAR:-1.2.3.4:5}").unwrap(),
            "1.2.3.4:5"
        );
        assert_eq!(expand_env("$${X} $x").unwrap(), "${X} $x");
        assert!(expand_env("${SWITCHYARD_TEST_UNSET_VAR}").is_err());
        assert!(expand_env("${OPEN").is_err());
    }

    #[test]
    fn env_expansion_touches_only_string_values() {
        let file = Path::new("t.toml");
        // A comment may mention a variable that is not set.
        let text = "# bind = \"${SWITCHYARD_TEST_UNSET_VAR}\"\n[global]\ndrain_timeout = \"${SWITCHYARD_TEST_UNSET_VAR:-7s}\"\n";
        let raw = parse(text, file).unwrap();
        assert_eq!(raw.global.drain_timeout.as_deref(), Some("7s"));
        // An unset variable is reported at its key path.
        let error = parse(
            "[global]\ndrain_timeout = \"${SWITCHYARD_TEST_UNSET_VAR}\"\n",
            file,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("global.drain_timeout"), "{error}");
    }

    #[test]
    fn host_patterns() {
        assert_eq!(
            parse_host_pattern("Admin.Example.com"),
            Ok(HostPattern::Exact("admin.example.com".into()))
        );
        assert_eq!(
            parse_host_pattern("*.example.com"),
            Ok(HostPattern::Suffix(".example.com".into()))
        );
        assert_eq!(
            parse_host_pattern("admin.*"),
            Ok(HostPattern::Prefix("admin.".into()))
        );
        assert_eq!(
            parse_host_pattern("Admin.Example.com."),
            Ok(HostPattern::Exact("admin.example.com".into()))
        );
        assert_eq!(
            parse_host_pattern("*.example.com."),
            Ok(HostPattern::Suffix(".example.com".into()))
        );
        assert!(parse_host_pattern("a*b").is_err());
        assert!(parse_host_pattern("*.*").is_err());
    }

    #[test]
    fn addresses_and_cidrs() {
        assert_eq!(
            parse_address("127.0.0.1:80"),
            Ok("127.0.0.1:80".parse().unwrap())
        );
        assert!(parse_address("[::1]:80").is_ok());
        assert!(parse_address("localhost:80").is_ok());
        assert!(parse_address("127.0.0.1").is_err());
        assert!(parse_address("127.0.0.1:99999").is_err());
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert_eq!(
            parse_cidr("::ffff:10.0.0.0/104").unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_cidr("::ffff:10.1.2.3").unwrap().to_string(),
            "10.1.2.3/32"
        );
    }
}
