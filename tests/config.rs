//! Configuration loading: good files load, every class of mistake is reported with its key path.

use std::path::Path;

use switchyard::Config;
use switchyard::config::{BalanceKind, ConfigError, ListenerKind, ProxyProtocolVersion};

fn problems(text: &str) -> Vec<(String, String)> {
    match Config::from_toml(text, Path::new("bad.toml")) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(error) => error
            .problems()
            .into_iter()
            .map(|p| (p.path, p.reason))
            .collect(),
    }
}

/// Asserts that some problem is reported at `path` with a reason containing `reason`.
fn assert_problem(text: &str, path: &str, reason: &str) {
    let found = problems(text);
    assert!(
        found.iter().any(|(p, r)| p == path && r.contains(reason)),
        "no problem at `{path}` containing `{reason}`; got {found:#?}"
    );
}

const GOOD: &str = r#"
[global]
drain_timeout = "10s"

[[listeners]]
name = "public"
bind = "127.0.0.1:8080"
protocol = "http"
default_pool = "web"

  [[listeners.routes]]
  match = { path_prefix = "/api/" }
  pool = "api"

  [[listeners.routes]]
  match = { host = "admin.*", header = { name = "X-API-Version", value = "v2" } }
  pool = "api"

[[listeners]]
name = "mysql"
bind = "127.0.0.1:3306"
protocol = "tcp"
pool = "mysql"
idle_timeout = "2m"
max_connections = 500
splice = false
proxy_protocol = "v2"
trusted_proxies = ["10.0.0.0/8", "192.0.2.1"]

[[listeners]]
name = "dns"
bind = "127.0.0.1:3306"
protocol = "udp"
pool = "web"
max_sessions = 100

[pools.web]
backends = ["127.0.0.1:8084", { address = "127.0.0.1:8085", weight = 3 }]

[pools.api]
balance = "least_conn"
backends = ["localhost:8081"]

[pools.mysql]
balance = "p2c"
connect_timeout = "250ms"
connect_attempts = 5
send_proxy_protocol = "v1"
backends = ["127.0.0.1:3307", "127.0.0.1:3308"]
"#;

#[test]
fn a_good_file_loads_into_typed_values() {
    let config = Config::from_toml(GOOD, Path::new("good.toml")).expect("loads");
    assert_eq!(config.global.drain_timeout.as_secs(), 10);
    assert_eq!(config.listeners.len(), 3);
    let ListenerKind::Tcp(tcp) = &config.listeners[1].kind else {
        panic!("tcp")
    };
    assert_eq!(tcp.idle_timeout.as_secs(), 120);
    assert!(!tcp.splice);
    assert_eq!(config.listeners[1].max_connections, 500);
    assert_eq!(
        config.listeners[1]
            .proxy_protocol
            .as_ref()
            .map(|p| p.trusted.len()),
        Some(2)
    );
    let ListenerKind::Http(http) = &config.listeners[0].kind else {
        panic!("http")
    };
    assert_eq!(http.routes.len(), 2);
    assert!(http.splice, "http listeners splice long bodies by default");
    assert_eq!(http.default_pool.as_deref(), Some("web"));
    let web = &config.pools["web"];
    assert_eq!(web.backends[1].weight, 3);
    assert_eq!(web.balance, BalanceKind::RoundRobin);
    let mysql = &config.pools["mysql"];
    assert_eq!(mysql.connect_timeout.as_millis(), 250);
    // Never more attempts than backends.
    assert_eq!(mysql.connect_attempts, 2);
    assert_eq!(mysql.send_proxy_protocol, Some(ProxyProtocolVersion::V1));
}

const MINIMAL_POOL: &str = "\n[pools.p]\nbackends = [\"127.0.0.1:1\"]\n";

fn tcp_listener(extra: &str) -> String {
    format!(
        "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:1000\"\nprotocol = \"tcp\"\npool = \"p\"\n{extra}\n{MINIMAL_POOL}"
    )
}

#[test]
fn unknown_pool() {
    let text = tcp_listener("").replace("pool = \"p\"\n", "pool = \"nope\"\n");
    assert_problem(&text, "listeners[0].pool", "unknown pool `nope`");
}

#[test]
fn duplicate_listener_name_and_bind_address() {
    let text = format!(
        "{}\n[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:1000\"\nprotocol = \"tcp\"\npool = \"p\"\n",
        tcp_listener("")
    );
    assert_problem(&text, "listeners[1].name", "duplicate listener name `a`");
    assert_problem(
        &text,
        "listeners[1].bind",
        "duplicate bind address 127.0.0.1:1000",
    );
}

#[test]
fn the_same_port_for_tcp_and_udp_is_fine() {
    let text = format!(
        "{}\n[[listeners]]\nname = \"b\"\nbind = \"127.0.0.1:1000\"\nprotocol = \"udp\"\npool = \"p\"\n",
        tcp_listener("")
    );
    Config::from_toml(&text, Path::new("ok.toml")).expect("tcp and udp may share a port");
}

#[test]
fn empty_pool_bad_address_zero_weight() {
    let text = tcp_listener("").replace(
        MINIMAL_POOL,
        "\n[pools.p]\nbackends = []\n[pools.q]\nbackends = [\"nowhere\", { address = \"127.0.0.1:2\", weight = 0 }, \"127.0.0.1:70000\"]\n",
    );
    assert_problem(&text, "pools.p.backends", "empty");
    assert_problem(&text, "pools.q.backends[0]", "not host:port");
    assert_problem(&text, "pools.q.backends[1].weight", "out of range");
    assert_problem(&text, "pools.q.backends[2]", "not host:port");
}

#[test]
fn unknown_key_names_its_path_and_line() {
    let text = tcp_listener("idle_timeot = \"5s\"");
    let error = Config::from_toml(&text, Path::new("typo.toml")).expect_err("unknown key");
    let message = error.to_string();
    assert!(message.starts_with("typo.toml:6:"), "{message}");
    assert!(message.contains("listeners[0]"), "{message}");
    assert!(message.contains("idle_timeot"), "{message}");

    let text = format!("{MINIMAL_POOL}\n[pools.z]\nbackends = [{{ adress = \"127.0.0.1:1\" }}]\n");
    let message = Config::from_toml(&text, Path::new("t.toml"))
        .expect_err("typo")
        .to_string();
    assert!(
        message.contains("pools.z.backends[0]") && message.contains("adress"),
        "{message}"
    );
}

#[test]
fn protocol_specific_keys_are_rejected_elsewhere() {
    let text = tcp_listener("routes = [{ match = { path_prefix = \"/\" }, pool = \"p\" }]");
    assert_problem(&text, "listeners[0].routes", "applies only to http");
    let text = tcp_listener("max_sessions = 5");
    assert_problem(&text, "listeners[0].max_sessions", "applies only to udp");
}

#[test]
fn http_listener_without_routes_or_default_pool() {
    let text = format!(
        "[[listeners]]\nname = \"h\"\nbind = \"127.0.0.1:80\"\nprotocol = \"http\"\n{MINIMAL_POOL}"
    );
    assert_problem(
        &text,
        "listeners[0].routes",
        "needs routes, a default_pool, or both",
    );
}

#[test]
fn routes_are_checked() {
    let text = format!(
        r#"[[listeners]]
name = "h"
bind = "127.0.0.1:80"
protocol = "http"
routes = [
  {{ match = {{ path_prefix = "api" }}, pool = "p" }},
  {{ match = {{ host = "a*b" }}, pool = "p" }},
  {{ match = {{ header = {{ name = "bad name", value = "x" }} }}, pool = "p" }},
  {{ match = {{}}, pool = "p" }},
  {{ match = {{ path_prefix = "/" }}, pool = "missing" }},
]
{MINIMAL_POOL}"#
    );
    let found = problems(&text);
    let at = |path: &str| found.iter().any(|(p, _)| p == path);
    assert!(at("listeners[0].routes[0].match.path_prefix"), "{found:#?}");
    assert!(at("listeners[0].routes[1].match.host"), "{found:#?}");
    assert!(at("listeners[0].routes[2].match.header.name"), "{found:#?}");
    assert!(at("listeners[0].routes[3].match"), "{found:#?}");
    assert!(at("listeners[0].routes[4].pool"), "{found:#?}");
}

#[test]
fn proxy_protocol_needs_trusted_proxies_and_valid_values() {
    assert_problem(
        &tcp_listener("proxy_protocol = \"v2\""),
        "listeners[0].trusted_proxies",
        "needs trusted_proxies",
    );
    assert_problem(
        &tcp_listener("proxy_protocol = \"v3\"\ntrusted_proxies = [\"10.0.0.0/8\"]"),
        "listeners[0].proxy_protocol",
        "unknown value `v3`",
    );
    assert_problem(
        &tcp_listener("proxy_protocol = \"any\"\ntrusted_proxies = [\"10.0.0.0/99\"]"),
        "listeners[0].trusted_proxies[0]",
        "not an address or CIDR",
    );
}

#[test]
fn every_problem_is_reported_not_only_the_first() {
    let text = r#"
[global]
drain_timeout = "soon"

[[listeners]]
name = "a"
bind = "not an address"
protocol = "tcp"
pool = "ghost"
idle_timeout = "5 parsecs"

[[listeners]]
name = "a"
bind = "127.0.0.1:1"
protocol = "sctp"

[pools.p]
backends = []
balance = "fastest"
"#;
    let found = problems(text);
    let paths: Vec<&str> = found.iter().map(|(p, _)| p.as_str()).collect();
    for expected in [
        "global.drain_timeout",
        "listeners[0].bind",
        "listeners[0].pool",
        "listeners[0].idle_timeout",
        "listeners[1].name",
        "listeners[1].protocol",
        "pools.p.backends",
        "pools.p.balance",
    ] {
        assert!(
            paths.contains(&expected),
            "missing {expected} in {found:#?}"
        );
    }
    let message = Config::from_toml(text, Path::new("many.toml"))
        .expect_err("bad")
        .to_string();
    assert_eq!(message.lines().count(), found.len());
    assert!(
        message.lines().all(|l| l.starts_with("many.toml: ")),
        "{message}"
    );
}

#[test]
fn syntax_errors_name_line_and_column() {
    let error =
        Config::from_toml("[[listeners]\nname = 1", Path::new("s.toml")).expect_err("syntax");
    assert!(
        matches!(error, ConfigError::Syntax { line: 1, .. }),
        "{error}"
    );
    let error =
        Config::from_toml("[[listeners]]\nname = 1\n", Path::new("s.toml")).expect_err("type");
    let message = error.to_string();
    assert!(
        message.starts_with("s.toml:2:") && message.contains("listeners[0].name"),
        "{message}"
    );
}

#[test]
fn environment_variables_expand() {
    // A variable that the test process is sure to have.
    let home = std::env::var("PATH").is_ok();
    assert!(home);
    let text = tcp_listener("").replace(
        "bind = \"127.0.0.1:1000\"",
        "bind = \"${SWITCHYARD_SURELY_UNSET_VAR:-127.0.0.1:4321}\"",
    );
    let config = Config::from_toml(&text, Path::new("env.toml")).expect("loads");
    assert_eq!(config.listeners[0].bind.port(), 4321);
    let text = tcp_listener("").replace("127.0.0.1:1000", "${SWITCHYARD_SURELY_UNSET_VAR}");
    let message = Config::from_toml(&text, Path::new("env.toml"))
        .expect_err("unset")
        .to_string();
    assert!(message.contains("SWITCHYARD_SURELY_UNSET_VAR"), "{message}");
}

#[test]
fn settings_that_would_be_silently_ignored_are_errors() {
    assert_problem(
        &tcp_listener("trusted_proxies = [\"10.0.0.0/8\"]"),
        "listeners[0].trusted_proxies",
        "without proxy_protocol",
    );
    let udp = |extra: &str| tcp_listener(extra).replace("protocol = \"tcp\"", "protocol = \"udp\"");
    assert_problem(
        &udp("max_connections = 5"),
        "listeners[0].max_connections",
        "max_sessions",
    );
    assert_problem(
        &udp("").replace("backends = [", "send_proxy_protocol = \"v2\"\nbackends = ["),
        "listeners[0].pool",
        "udp listeners do not send",
    );
    assert_problem(
        &tcp_listener("").replace("backends = [", "connect_attempts = 17\nbackends = ["),
        "pools.p.connect_attempts",
        "out of range",
    );
}

#[test]
fn route_targets_and_match_conditions_are_checked() {
    let listener = |routes: &str| {
        format!(
            "[[listeners]]\nname = \"h\"\nbind = \"127.0.0.1:80\"\nprotocol = \"http\"\nroutes = [{routes}]\n{MINIMAL_POOL}"
        )
    };
    assert_problem(
        &listener(r#"{ match = { path = "/" }, pool = "p", pools = [{ pool = "p" }] }"#),
        "listeners[0].routes[0].pools",
        "not both",
    );
    assert_problem(
        &listener(r#"{ match = { path = "/" }, pools = [{ pool = "p", weight = 0 }] }"#),
        "listeners[0].routes[0].pools",
        "every weight is 0",
    );
    assert_problem(
        &listener(r#"{ match = { path = "/" }, pools = [{ pool = "nope" }] }"#),
        "listeners[0].routes[0].pools[0].pool",
        "unknown pool",
    );
    assert_problem(
        &listener(r#"{ match = { path_regex = "(" }, pool = "p" }"#),
        "listeners[0].routes[0].match.path_regex",
        "invalid regular expression",
    );
    assert_problem(
        &listener(
            r#"{ match = { header = { name = "X", value = "a", present = true } }, pool = "p" }"#,
        ),
        "listeners[0].routes[0].match.header",
        "exactly one of",
    );
    assert_problem(
        &listener(r#"{ match = { method = "GE T" }, pool = "p" }"#),
        "listeners[0].routes[0].match.method[0]",
        "not a valid method",
    );
    assert_problem(
        &listener(r#"{ match = { query = { name = "a" } }, pool = "p" }"#),
        "listeners[0].routes[0].match.query.value",
        "missing",
    );
}

#[test]
fn modification_rules_are_checked() {
    let http = |extra: &str| {
        format!(
            "[[listeners]]\nname = \"h\"\nbind = \"127.0.0.1:80\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n{extra}\n{MINIMAL_POOL}"
        )
    };
    assert_problem(
        &http("request_headers = { set = { Content-Length = \"1\" } }"),
        "listeners[0].request_headers.set.Content-Length",
        "managed by the proxy",
    );
    // Names are case-insensitive: two keys for one field would send it twice.
    assert_problem(
        &http(
            "response_headers = { set = { X-Frame-Options = \"DENY\", x-frame-options = \"SAMEORIGIN\" } }",
        ),
        "listeners[0].response_headers.set.x-frame-options",
        "also set as `X-Frame-Options`",
    );
    assert_problem(
        &http("response_headers = { remove = [\"bad name\"] }"),
        "listeners[0].response_headers.remove[0]",
        "not a valid header name",
    );
    assert_problem(
        &http("rewrite = { strip_prefix = \"/a\", regex = \"x\" }"),
        "listeners[0].rewrite",
        "needs",
    );
    assert_problem(
        &http("redirect = { to = \"https://{host}{nope}\" }"),
        "listeners[0].redirect.to",
        "placeholders",
    );
    assert_problem(
        &http("redirect = { to = \"/x\", status = 303 }"),
        "listeners[0].redirect.status",
        "not a redirect status",
    );
    assert_problem(
        &http("cookie_flags = [\"Secure\", \"Sticky\"]"),
        "listeners[0].cookie_flags[1]",
        "Sticky",
    );
    assert_problem(
        &tcp_listener("cookie_flags = [\"Secure\"]"),
        "listeners[0].cookie_flags",
        "applies only to http",
    );
}

#[test]
fn a_host_rewrite_must_be_a_host_and_port() {
    let http = |value: &str| {
        format!(
            "[[listeners]]\nname = \"h\"\nbind = \"127.0.0.1:80\"\nprotocol = \"http\"\ndefault_pool = \"p\"\nhost_rewrite = \"{value}\"\n{MINIMAL_POOL}"
        )
    };
    // What the proxy itself refuses from clients as a Host: sent on, a backend could read a
    // path or a second host out of it (and an HTTP/2 request's authority would swallow the
    // path after a `/`).
    for bad in [
        "internal/admin",
        "a,b",
        "user@internal",
        "internal:80x",
        "a;b",
    ] {
        assert_problem(
            &http(bad),
            "listeners[0].host_rewrite",
            "host name, with an optional port",
        );
    }
    for good in [
        "internal.local",
        "internal.local:8080",
        "10.0.0.1",
        "[::1]:80",
    ] {
        Config::from_toml(&http(good), Path::new("good.toml"))
            .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
}

#[test]
fn a_rewrite_replacement_names_only_groups_its_regex_has() {
    let http = |replace: &str| {
        format!(
            "[[listeners]]\nname = \"h\"\nbind = \"127.0.0.1:80\"\nprotocol = \"http\"\ndefault_pool = \"p\"\nrewrite = {{ regex = '^/old/(?P<id>[0-9]+)/(.*)$', replace = '{replace}' }}\n{MINIMAL_POOL}"
        )
    };
    // `$2_x` reads as the group named `2_x`, which does not exist: it would silently become
    // empty on every request. (`${` starts an environment variable in any string of the file,
    // so a braced group is written `$${2}`.)
    assert_problem(
        &http("/new/$2_x"),
        "listeners[0].rewrite.replace",
        "$${2}_x",
    );
    assert_problem(&http("/new/$3"), "listeners[0].rewrite.replace", "`3`");
    assert_problem(
        &http("/new/$${name}"),
        "listeners[0].rewrite.replace",
        "`name`",
    );
    assert_problem(
        &http("/new/${id}"),
        "listeners[0].rewrite.replace",
        "$${id}",
    );
    for good in [
        "/new/$${2}_x/$id",
        "/new/$1/$$",
        "/new/$${id}.html",
        "/new/$0",
    ] {
        Config::from_toml(&http(good), Path::new("good.toml"))
            .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
}

/// A tcp listener on pool `p` with the given pool keys.
fn l4_pool(keys: &str) -> String {
    format!(
        "[[listeners]]\nname = \"l4\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"p\"\n[pools.p]\nbackends = [\"127.0.0.1:9000\", \"127.0.0.1:9001\"]\n{keys}\n"
    )
}

#[test]
fn balancing_settings_load() {
    let config = Config::from_toml(
        &l4_pool(
            "balance = \"maglev\"\nhealth = { kind = \"tcp\", interval = \"1s\", timeout = \"500ms\" }\noutlier = { consecutive_failures = 2 }\npanic_mode = true\nslow_start = \"30s\"\ndrain_timeout = \"5s\"",
        ),
        Path::new("good.toml"),
    )
    .expect("valid");
    let pool = &config.pools["p"];
    assert_eq!(pool.balance, BalanceKind::Maglev);
    assert_eq!(pool.maglev_table_size, 65_537);
    assert!(pool.panic_mode && pool.health.is_some() && pool.outlier.is_some());
    let config = Config::from_toml(
        &l4_pool("").replace(
            "backends = [\"127.0.0.1:9000\", \"127.0.0.1:9001\"]",
            "backends = [{ address = \"127.0.0.1:9000\", max_connections = 10 }, { address = \"127.0.0.1:9001\", backup = true, drain = true }]\nqueue = { size = 100, timeout = \"2s\" }",
        ),
        Path::new("good.toml"),
    )
    .expect("valid");
    let backends = &config.pools["p"].backends;
    assert_eq!(backends[0].max_connections, Some(10));
    assert!(backends[1].backup && backends[1].drain);
}

#[test]
fn balancing_mistakes_are_reported() {
    assert_problem(
        &l4_pool("balance = \"fastest\""),
        "pools.p.balance",
        "unknown algorithm",
    );
    assert_problem(
        &l4_pool("balance = \"ring_hash\"\nhash_key = \"header:x-user\""),
        "listeners[0].pool",
        "can hash only on source_ip",
    );
    assert_problem(
        &l4_pool("hash_key = \"source_ip\""),
        "pools.p.hash_key",
        "applies only to balance",
    );
    assert_problem(
        &l4_pool("balance = \"maglev\"\nhash_key = \"body\""),
        "pools.p.hash_key",
        "unknown hash key",
    );
    assert_problem(
        &l4_pool("balance = \"maglev\"\nmaglev_table_size = 1000"),
        "pools.p.maglev_table_size",
        "must be a prime",
    );
    assert_problem(
        &l4_pool("sticky = { cookie = \"SWY\" }"),
        "listeners[0].pool",
        "only http listeners",
    );
    assert_problem(
        &l4_pool("health = { kind = \"http\", interval = \"1s\", timeout = \"2s\" }"),
        "pools.p.health.timeout",
        "longer than the interval",
    );
    assert_problem(
        &l4_pool("health = { kind = \"tcp\", path = \"/\" }"),
        "pools.p.health.path",
        "kind = \"http\"",
    );
    assert_problem(
        &l4_pool("health = { kind = \"http\", expect_status = \"300-200\" }"),
        "pools.p.health.expect_status",
        "empty range",
    );
    assert_problem(
        &l4_pool("health = { kind = \"grpc\" }"),
        "pools.p.health.kind",
        "upstream_protocol = \"h2\"",
    );
    assert_problem(
        &l4_pool("health = { kind = \"grpc\", path = \"/\" }"),
        "pools.p.health.path",
        "kind = \"http\"",
    );
    assert_problem(
        &l4_pool("health = { kind = \"http\", service = \"svc\" }"),
        "pools.p.health.service",
        "kind = \"grpc\"",
    );
    assert_problem(
        &l4_pool("outlier = { max_ejected_percent = 150 }"),
        "pools.p.outlier.max_ejected_percent",
        "out of range",
    );
    assert_problem(
        &l4_pool("queue = { size = 10 }"),
        "pools.p.queue",
        "no backend sets max_connections",
    );
    assert_problem(
        &l4_pool("").replace(
            "backends = [\"127.0.0.1:9000\", \"127.0.0.1:9001\"]",
            "backends = [{ address = \"127.0.0.1:9000\", backup = true }]",
        ),
        "pools.p.backends",
        "every backend is a backup",
    );
    assert_problem(
        &l4_pool("sticky = { cookie = \"bad name\", secret = \"short\" }")
            .replace("tcp", "http")
            .replace("pool = \"p\"\n[", "default_pool = \"p\"\n["),
        "pools.p.sticky.cookie",
        "not a valid cookie name",
    );
}

#[test]
fn tls_settings_are_checked() {
    let udp = |extra: &str| tcp_listener(extra).replace("protocol = \"tcp\"", "protocol = \"udp\"");
    assert_problem(
        &udp("splice = true"),
        "listeners[0].splice",
        "applies only to tcp and http",
    );
    assert_problem(
        &udp("tls = { certificates = [{ cert = \"a.pem\", key = \"a.key\" }] }"),
        "listeners[0].tls",
        "applies only to tcp and http",
    );
    assert_problem(
        &tcp_listener("tls = { certificates = [] }"),
        "listeners[0].tls.certificates",
        "at least one certificate",
    );
    assert_problem(
        &tcp_listener("tls = { certificates = [{ cert = \"a.pem\" }] }"),
        "listeners[0].tls.certificates[0].key",
        "missing",
    );
    assert_problem(
        &tcp_listener(
            "tls = { certificates = [{ cert = \"a.pem\", key = \"a.key\" }], client_auth = \"optional\" }",
        ),
        "listeners[0].tls.client_auth",
        "without client_ca",
    );
    assert_problem(
        &tcp_listener(
            "tls = { certificates = [{ cert = \"a.pem\", key = \"a.key\" }], client_ca = \"ca.pem\", client_auth = \"sometimes\" }",
        ),
        "listeners[0].tls.client_auth",
        "unknown value",
    );
    assert_problem(
        &tcp_listener("client_hello_timeout = \"1s\""),
        "listeners[0].client_hello_timeout",
        "without sni_routes",
    );
    assert_problem(
        &tcp_listener("sni_routes = [{ sni = \"a.*\", pool = \"p\" }]"),
        "listeners[0].sni_routes[0].sni",
        "exactly or as `*.suffix`",
    );
    assert_problem(
        &tcp_listener("sni_routes = [{ sni = \"a.example.com\", pool = \"nope\" }]"),
        "listeners[0].sni_routes[0].pool",
        "unknown pool",
    );
    assert_problem(
        &tcp_listener(
            "sni_routes = [{ sni = \"a.example.com\", pool = \"p\" }]\ntls = { certificates = [{ cert = \"a.pem\", key = \"a.key\" }] }",
        ),
        "listeners[0].sni_routes",
        "cannot go with `tls`",
    );
    assert_problem(
        &tcp_listener("sni_routes = [{ sni = \"a.example.com\", pool = \"p\" }]")
            .replace("backends = [", "tls = { verify = false }\nbackends = ["),
        "listeners[0].sni_routes[0].pool",
        "passed-through TLS",
    );
    // Pools: verification needs a CA unless turned off; a tcp listener cannot use a TLS pool.
    assert_problem(
        &tcp_listener("").replace(
            "backends = [",
            "tls = { sni = \"a.internal\" }\nbackends = [",
        ),
        "pools.p.tls.ca",
        "verify = false",
    );
    assert_problem(
        &tcp_listener("").replace("backends = [", "tls = { verify = false }\nbackends = ["),
        "listeners[0].pool",
        "sets tls",
    );
    assert_problem(
        &tcp_listener("").replace(
            "backends = [",
            "tls = { verify = false, sni = \"not a name\" }\nbackends = [",
        ),
        "pools.p.tls.sni",
        "not a DNS name",
    );
}

#[test]
fn tls_files_are_relative_to_the_configuration() {
    let config = Config::from_toml(
        "[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n\
         tls = { certificates = [{ cert = \"certs/a.pem\", key = \"/abs/a.key\" }] }\n\
         [pools.p]\nbackends = [\"127.0.0.1:1\"]\n",
        Path::new("/etc/switchyard/main.toml"),
    )
    .expect("valid");
    let tls = config.listeners[0].tls.as_ref().expect("tls");
    assert_eq!(
        tls.certificates[0].cert,
        Path::new("/etc/switchyard/certs/a.pem")
    );
    assert_eq!(tls.certificates[0].key, Path::new("/abs/a.key"));
}

#[test]
fn park_idle_after_is_a_duration_or_off_on_tcp_and_http_listeners() {
    let http = |extra: &str| {
        format!(
            "[[listeners]]\nname = \"h\"\nbind = \"127.0.0.1:80\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n{extra}\n{MINIMAL_POOL}"
        )
    };
    let settings = |text: &str| {
        let config = Config::from_toml(text, Path::new("t.toml")).expect("loads");
        let ListenerKind::Http(http) = &config.listeners[0].kind else {
            panic!("http")
        };
        http.park_idle_after
    };
    assert_eq!(
        settings(&http("")),
        Some(switchyard::config::DEFAULT_PARK_IDLE_AFTER)
    );
    assert_eq!(
        settings(&http("park_idle_after = \"2s\"")),
        Some(std::time::Duration::from_secs(2))
    );
    assert_eq!(settings(&http("park_idle_after = \"off\"")), None);
    assert_problem(
        &http("park_idle_after = \"soon\""),
        "listeners[0].park_idle_after",
        "",
    );
    let tcp = Config::from_toml(
        &tcp_listener("park_idle_after = \"off\""),
        Path::new("t.toml"),
    )
    .expect("loads");
    let ListenerKind::Tcp(tcp) = &tcp.listeners[0].kind else {
        panic!("tcp")
    };
    assert_eq!(tcp.park_idle_after, None);
    let udp = tcp_listener("park_idle_after = \"1s\"").replace("\"tcp\"", "\"udp\"");
    assert_problem(
        &udp,
        "listeners[0].park_idle_after",
        "applies only to tcp and http",
    );
}

#[test]
fn pool_keepalive_settings_load_and_are_checked() {
    let http = |pool: &str| {
        format!(
            "[[listeners]]\nname = \"h\"\nbind = \"127.0.0.1:80\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n\n[pools.p]\nbackends = [\"127.0.0.1:1\"]\n{pool}\n"
        )
    };
    let config = Config::from_toml(
        &http("keepalive_connections = 0\nkeepalive_timeout = \"5s\""),
        Path::new("t.toml"),
    )
    .expect("loads");
    let pool = &config.pools["p"];
    assert_eq!(pool.keepalive_connections, 0);
    assert_eq!(pool.keepalive_timeout, std::time::Duration::from_secs(5));
    let defaults = Config::from_toml(&http(""), Path::new("t.toml")).expect("loads");
    assert_eq!(
        defaults.pools["p"].keepalive_connections,
        switchyard::config::DEFAULT_KEEPALIVE_CONNECTIONS
    );
    assert_problem(
        &http("keepalive_connections = -1"),
        "pools.p.keepalive_connections",
        "out of range",
    );
    assert_problem(
        &http("keepalive_timeout = \"0s\""),
        "pools.p.keepalive_timeout",
        "greater than zero",
    );
}

/// An http listener, bound to `127.0.0.1:80`, with `extra` keys and the minimal pool `p`.
fn http_listener(extra: &str) -> String {
    format!(
        "[[listeners]]\nname = \"h\"\nbind = \"127.0.0.1:80\"\nprotocol = \"http\"\n{extra}\n{MINIMAL_POOL}"
    )
}

#[test]
fn a_bad_trusted_proxy_on_an_http_listener_is_reported_once() {
    let found = problems(&http_listener(
        "default_pool = \"p\"\ntrusted_proxies = [\"10.0.0.0/33\"]",
    ));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].0, "listeners[0].trusted_proxies[0]");
}

#[test]
fn a_split_whose_entries_are_wrong_reports_only_what_is_wrong() {
    // The only entry names an unknown pool: that is the problem, not a sum of weights of 0.
    let found = problems(&http_listener(
        r#"routes = [{ match = { path = "/" }, pools = [{ pool = "nope", weight = 5 }] }]"#,
    ));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].0, "listeners[0].routes[0].pools[0].pool");
    let found = problems(&http_listener(
        r#"routes = [{ match = { path = "/" }, pools = [{ pool = "p", weight = -1 }] }]"#,
    ));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert_eq!(found[0].0, "listeners[0].routes[0].pools[0].weight");
}

#[test]
fn a_route_that_redirects_cannot_also_name_a_pool() {
    assert_problem(
        &http_listener(
            r#"routes = [{ match = { path = "/" }, pool = "p", redirect = { to = "https://{host}{path}" } }]"#,
        ),
        "listeners[0].routes[0].pool",
        "redirect",
    );
    assert_problem(
        &http_listener(
            r#"routes = [{ match = { path = "/" }, pools = [{ pool = "p" }], redirect = { to = "https://{host}{path}" } }]"#,
        ),
        "listeners[0].routes[0].pools",
        "redirect",
    );
}

#[test]
fn a_backend_on_port_0_is_refused() {
    let text = tcp_listener("").replace("127.0.0.1:1\"", "127.0.0.1:0\"");
    assert_problem(&text, "pools.p.backends[0]", "port 0");
}

#[test]
fn binds_that_would_collide_at_bind_time_are_reported() {
    let second = |bind: &str, protocol: &str| {
        format!(
            "{}\n[[listeners]]\nname = \"b\"\nbind = \"{bind}\"\nprotocol = \"{protocol}\"\npool = \"p\"\n",
            tcp_listener("").replace("127.0.0.1:1000", "0.0.0.0:1000")
        )
    };
    // A wildcard address takes the port on every address of its family.
    assert_problem(
        &second("127.0.0.1:1000", "tcp"),
        "listeners[1].bind",
        "0.0.0.0:1000",
    );
    // An IPv6 wildcard takes the IPv4 addresses too (a dual-stack socket).
    assert_problem(
        &second("[::]:1000", "tcp"),
        "listeners[1].bind",
        "0.0.0.0:1000",
    );
    // udp and tcp do not share ports, even under a wildcard.
    Config::from_toml(&second("127.0.0.1:1000", "udp"), Path::new("ok.toml"))
        .expect("tcp and udp may share a port");
    // Nor do two IPv4 addresses of the same port.
    Config::from_toml(
        &format!(
            "{}\n[[listeners]]\nname = \"b\"\nbind = \"127.0.0.2:1000\"\nprotocol = \"tcp\"\npool = \"p\"\n",
            tcp_listener("")
        ),
        Path::new("ok.toml"),
    )
    .expect("two addresses, one port");
    // The admin API listens on TCP too.
    let admin = |bind: &str| format!("[admin]\nbind = \"{bind}\"\n\n{}", tcp_listener(""));
    assert_problem(&admin("127.0.0.1:1000"), "admin.bind", "listeners[0].bind");
    assert_problem(&admin("0.0.0.0:1000"), "admin.bind", "listeners[0].bind");
    Config::from_toml(&admin("127.0.0.1:1001"), Path::new("ok.toml")).expect("another port");
}

#[test]
fn an_empty_redirect_target_is_called_empty() {
    assert_problem(
        &http_listener("default_pool = \"p\"\nredirect = { to = \"\" }"),
        "listeners[0].redirect.to",
        "empty",
    );
}

#[test]
fn pool_keys_that_no_listener_of_the_pool_reads_are_errors() {
    let with = |protocol: &str, pool_keys: &str| {
        tcp_listener("")
            .replace("protocol = \"tcp\"", &format!("protocol = \"{protocol}\""))
            .replace("backends = [", &format!("{pool_keys}\nbackends = ["))
    };
    // Keys only http listeners read, on a pool only tcp or udp listeners use.
    for protocol in ["tcp", "udp"] {
        for key in [
            "response_timeout = \"3s\"",
            "keepalive_connections = 4",
            "keepalive_timeout = \"5s\"",
        ] {
            let name = key.split(' ').next().expect("key");
            assert_problem(
                &with(protocol, key),
                &format!("pools.p.{name}"),
                &format!(
                    "only http listeners read it, and pool `p` is used only by {protocol} listeners (listeners[0])"
                ),
            );
        }
    }
    // Keys about connecting, on a pool only udp listeners use: UDP does not connect, and a
    // session never waits in a queue.
    let queued = with("udp", "queue = { size = 10 }").replace(
        "backends = [\"127.0.0.1:1\"]",
        "backends = [{ address = \"127.0.0.1:1\", max_connections = 5 }]",
    );
    for (name, text) in [
        ("connect_timeout", with("udp", "connect_timeout = \"1s\"")),
        ("connect_attempts", with("udp", "connect_attempts = 2")),
        ("queue", queued),
    ] {
        assert_problem(
            &text,
            &format!("pools.p.{name}"),
            "only tcp and http listeners read it, and pool `p` is used only by udp listeners (listeners[0])",
        );
    }
    // Read by one of the pool's users: fine.
    let both = format!(
        "{}\n[[listeners]]\nname = \"h\"\nbind = \"127.0.0.1:1001\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n",
        with("tcp", "response_timeout = \"3s\"\nconnect_timeout = \"1s\"")
    );
    Config::from_toml(&both, Path::new("ok.toml")).expect("a pool shared with an http listener");
    let tcp = with("tcp", "connect_timeout = \"1s\"\nconnect_attempts = 2");
    Config::from_toml(&tcp, Path::new("ok.toml")).expect("tcp listeners connect");
    // A pool no listener uses is left alone (the admin API shows it, a reload may use it).
    let unused = format!(
        "{}\n[pools.spare]\nbackends = [\"127.0.0.1:2\"]\nresponse_timeout = \"3s\"\n",
        tcp_listener("")
    );
    Config::from_toml(&unused, Path::new("ok.toml")).expect("an unused pool");
    // Several users of different kinds are named.
    let text = format!(
        "{}\n[[listeners]]\nname = \"u\"\nbind = \"127.0.0.1:1001\"\nprotocol = \"udp\"\npool = \"p\"\n",
        with("tcp", "keepalive_timeout = \"5s\"")
    );
    assert_problem(
        &text,
        "pools.p.keepalive_timeout",
        "used only by tcp and udp listeners (listeners[0], listeners[1])",
    );
}

#[test]
fn secrets_never_show_in_a_debug_print_of_the_configuration() {
    let token = "a-secret-token-nobody-may-log";
    let secret = "a-sticky-secret-nobody-may-log";
    let config = Config::from_toml(
        &format!(
            "[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"{token}\"\n\n[[listeners]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n[pools.p]\nbackends = [\"127.0.0.1:1\"]\nsticky = {{ cookie = \"SRV\", secret = \"{secret}\" }}\n"
        ),
        Path::new("t.toml"),
    )
    .expect("valid");
    let admin = config.admin.as_ref().expect("admin");
    assert_eq!(admin.token.as_deref(), Some(token));
    let printed = format!("{config:?}");
    assert!(!printed.contains(token), "{printed}");
    assert!(printed.contains("token: Some(\"<redacted>\")"), "{printed}");
    assert!(!printed.contains(secret), "{printed}");
    assert!(
        printed.contains("secret: Some(\"<redacted>\")"),
        "{printed}"
    );
}

/// An http listener with `listener` added to its table and one route with `route` added to its.
fn limited_http(listener: &str, route: &str) -> String {
    format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n{listener}\n[[listeners.routes]]\nmatch = {{ path_prefix = \"/api\" }}\npool = \"p\"\n{route}\n[pools.p]\nbackends = [\"127.0.0.1:1\"]\n"
    )
}

#[test]
fn rate_limits_load_with_their_defaults() {
    use std::time::Duration;
    use switchyard::config::{RateKey, RateLimit};
    let text = limited_http(
        "rate_limit = { rate = 100 }",
        "rate_limit = { rate = 5, per = \"1m\", burst = 2, key = { header = \"X-API-Key\" } }",
    );
    let config = Config::from_toml(&text, Path::new("ok.toml")).expect("valid");
    let ListenerKind::Http(http) = &config.listeners[0].kind else {
        panic!("an http listener");
    };
    assert_eq!(
        http.rate_limit,
        Some(RateLimit {
            rate: 100,
            per: Duration::from_secs(1),
            burst: 0,
            key: RateKey::ClientIp,
        })
    );
    assert_eq!(
        http.routes[0].rate_limit,
        Some(RateLimit {
            rate: 5,
            per: Duration::from_secs(60),
            burst: 2,
            key: RateKey::Header("x-api-key".into()),
        })
    );
    let tcp = "[[listeners]]\nname = \"t\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"p\"\nrate_limit = { rate = 10, key = \"client_ip\" }\n[pools.p]\nbackends = [\"127.0.0.1:1\"]\n";
    assert_problem(tcp, "listeners[0].rate_limit.key", "by client address only");
    let tcp = tcp.replace(", key = \"client_ip\"", ", burst = 5");
    let config = Config::from_toml(&tcp, Path::new("ok.toml")).expect("valid");
    let ListenerKind::Tcp(settings) = &config.listeners[0].kind else {
        panic!("a tcp listener");
    };
    assert_eq!(settings.rate_limit.as_ref().map(|l| l.burst), Some(5));
}

#[test]
fn rate_limit_mistakes_are_reported_at_their_key() {
    let at = "listeners[0].rate_limit";
    for (limit, key, reason) in [
        ("{ per = \"1s\" }", "rate", "missing"),
        ("{ rate = 0 }", "rate", "out of range"),
        ("{ rate = -3 }", "rate", "out of range"),
        ("{ rate = 2000000 }", "rate", "out of range"),
        ("{ rate = 1, per = \"0s\" }", "per", "out of range"),
        ("{ rate = 1, per = \"2d\" }", "per", ""),
        ("{ rate = 1, per = \"soon\" }", "per", ""),
        ("{ rate = 1, burst = -1 }", "burst", "out of range"),
        ("{ rate = 1, burst = 100001 }", "burst", "out of range"),
        (
            "{ rate = 1, key = \"cookie\" }",
            "key",
            "unknown key `cookie`",
        ),
        (
            "{ rate = 1, key = { header = \"a b\" } }",
            "key.header",
            "not a valid",
        ),
        ("{ rate = 1, key = {} }", "key.header", "missing"),
    ] {
        let text = limited_http(&format!("rate_limit = {limit}"), "");
        assert_problem(&text, &format!("{at}.{key}"), reason);
        // The same on a route, at the route's path.
        let text = limited_http("", &format!("rate_limit = {limit}"));
        assert_problem(
            &text,
            &format!("listeners[0].routes[0].rate_limit.{key}"),
            reason,
        );
    }
    // A mistyped key inside the table is named as the unknown key it is.
    let text = limited_http("rate_limit = { rate = 1, brust = 2 }", "");
    assert_problem(&text, &format!("{at}.brust"), "unknown field");
    let text = limited_http("rate_limit = { rate = 1, key = { headr = \"x\" } }", "");
    assert_problem(&text, &format!("{at}.key.headr"), "unknown field");
    // Every mistake is reported, not only the first.
    let text = limited_http("rate_limit = { rate = 0, burst = -1 }", "");
    let found = problems(&text);
    assert!(found.iter().any(|(p, _)| p == &format!("{at}.rate")));
    assert!(found.iter().any(|(p, _)| p == &format!("{at}.burst")));
    // udp listeners see no connections to limit.
    let udp = "[[listeners]]\nname = \"u\"\nbind = \"127.0.0.1:0\"\nprotocol = \"udp\"\npool = \"p\"\nrate_limit = { rate = 1 }\n[pools.p]\nbackends = [\"127.0.0.1:1\"]\n";
    assert_problem(udp, at, "applies only to tcp and http listeners");
}

#[test]
fn route_names_are_unique_words_of_a_few_safe_characters() {
    let file = |names: [&str; 2]| {
        format!(
            "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\n\n\
             [[listeners.routes]]\nname = \"{}\"\nmatch = {{ path_prefix = \"/a\" }}\npool = \"p\"\n\n\
             [[listeners.routes]]\nname = \"{}\"\nmatch = {{ path_prefix = \"/b\" }}\npool = \"p\"\n\n\
             [pools.p]\nbackends = [\"127.0.0.1:1\"]\n",
            names[0], names[1]
        )
    };
    let config = Config::from_toml(&file(["shop", "shop-v2.beta_1"]), Path::new("ok.toml"))
        .expect("valid names");
    let ListenerKind::Http(settings) = &config.listeners[0].kind else {
        panic!("http");
    };
    assert_eq!(settings.routes[0].label(0), "shop");
    assert_eq!(settings.routes[1].label(1), "shop-v2.beta_1");

    let at = "listeners[0].routes[1].name";
    assert_problem(
        &file(["shop", "shop"]),
        at,
        "also the name of listeners[0].routes[0]",
    );
    assert_problem(
        &file(["shop", "7"]),
        at,
        "a number names the route at that position",
    );
    assert_problem(&file(["shop", "default"]), at, "requests no route took");
    assert_problem(&file(["shop", "unrouted"]), at, "requests no route took");
    assert_problem(&file(["shop", "a b"]), at, "letters, digits");
    assert_problem(&file(["shop", ""]), at, "letters, digits");
    assert_problem(&file(["shop", &"x".repeat(65)]), at, "letters, digits");
}

#[test]
fn a_bad_regular_expression_is_one_line_that_says_what_and_where() {
    let text = format!(
        "{}\n[[listeners.routes]]\nmatch = {{ path_regex = \"^/a(b\" }}\npool = \"p\"\n",
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n[pools.p]\nbackends = [\"127.0.0.1:1\"]\n"
    );
    let found = problems(&text);
    let (path, reason) = &found[0];
    assert_eq!(
        path, "listeners[0].routes[0].match.path_regex",
        "{found:#?}"
    );
    // One line, as `check` prints one problem per line.
    assert!(!reason.contains('\n'), "{reason}");
    assert!(reason.contains("unclosed group"), "{reason}");
    assert!(reason.contains("^/a(b"), "{reason}");
    assert!(reason.contains("character 4"), "{reason}");
}

#[test]
fn a_duplicate_key_names_the_key_and_where_it_is() {
    let pool = "[pools.p]\nbackends = [\"127.0.0.1:1\"]\n";
    let listener = |n: usize| {
        format!(
            "[[listeners]]\nname = \"l{n}\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"p\"\n"
        )
    };
    // A key given twice in an array of tables: the element it is in.
    let text = format!(
        "{}{}max_connections = 5\nmax_connections = 6\n{pool}",
        listener(0),
        listener(1)
    );
    let message = Config::from_toml(&text, Path::new("d.toml"))
        .expect_err("duplicate")
        .to_string();
    assert!(
        message.starts_with("d.toml:12:1: listeners[1].max_connections: duplicate key"),
        "{message}"
    );
    // A table given twice.
    let text = format!("{}{pool}{pool}", listener(0));
    let message = Config::from_toml(&text, Path::new("d.toml"))
        .expect_err("duplicate")
        .to_string();
    assert!(
        message.starts_with("d.toml:8:8: pools.p: duplicate") && message.contains("[pools.p]"),
        "{message}"
    );
    // Inside an inline table the key is still named, if not its whole path.
    let text = format!(
        "{}{pool}health = {{ kind = \"tcp\", kind = \"http\" }}\n",
        listener(0)
    );
    let message = Config::from_toml(&text, Path::new("d.toml"))
        .expect_err("duplicate")
        .to_string();
    assert!(
        message.starts_with("d.toml:8:") && message.contains("`kind`"),
        "{message}"
    );
}

#[test]
fn connect_attempts_beside_retry_attempts_on_a_pool_of_http_listeners_only_is_an_error() {
    let http = |pool_keys: &str, tcp: bool| {
        let mut text = format!(
            "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n\
             [pools.p]\nbackends = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n{pool_keys}\n"
        );
        if tcp {
            text.push_str(
                "[[listeners]]\nname = \"l4\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"p\"\n",
            );
        }
        text
    };
    // `retry.attempts` replaces `connect_attempts` for http requests: with no tcp listener on
    // the pool, the latter would have no effect.
    assert_problem(
        &http("connect_attempts = 2\nretry = { attempts = 2 }", false),
        "pools.p.connect_attempts",
        "retry.attempts",
    );
    // Either alone is read, and so is the pair when a tcp listener uses the pool.
    for (keys, tcp) in [
        ("connect_attempts = 2\nretry = { on = [\"503\"] }", false),
        ("retry = { attempts = 2 }", false),
        ("connect_attempts = 2\nretry = { attempts = 2 }", true),
    ] {
        let text = http(keys, tcp);
        if let Err(error) = Config::from_toml(&text, Path::new("t.toml")) {
            panic!("{keys}: {error}");
        }
    }
}

#[test]
fn a_duration_written_wrong_is_told_how_to_write_it() {
    let at = "listeners[0].idle_timeout";
    let with = |value: &str| tcp_listener(&format!("idle_timeout = \"{value}\""));
    // A fraction: the whole number of a smaller unit it stands for.
    assert_problem(&with("1.5s"), at, "write \"1500ms\"");
    assert_problem(&with("0.5m"), at, "write \"30s\"");
    assert_problem(&with("-5s"), at, "cannot be negative");
    assert_problem(&with("10 s"), at, "no space");
    // A number too large for any unit is too large, not "not a whole number".
    assert_problem(&with("99999999999999999999h"), at, "too large");
    assert_problem(&with("5124095576031h"), at, "too large");
}

#[test]
fn a_size_written_wrong_is_told_how_to_write_it() {
    let at = "listeners[0].max_body_size";
    let with = |value: &str| {
        format!(
            "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\nmax_body_size = {value}\n{MINIMAL_POOL}"
        )
    };
    assert_problem(&with("\"10MB\""), at, "write \"10m\"");
    assert_problem(&with("\"512kb\""), at, "write \"512k\"");
    assert_problem(&with("0"), at, "at least 1 byte");
    assert_problem(&with("\"0k\""), at, "at least 1 byte");
    assert_problem(&with("-1"), at, "at least 1 byte");
    assert_problem(&with("\"99999999999g\""), at, "too large");
    assert_problem(&with("\"1.5m\""), at, "whole number");
}
