//! The admin API, metrics and access logs, through real sockets.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;

use common::*;

const TOKEN: &str = "a-test-token-of-some-length";

/// An HTTP request to the admin API; `body` for PUT.
async fn admin(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Reply {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    admin_with(addr, method, path, &auth, body).await
}

/// An HTTP request to the admin API with `headers` (each ended by CRLF) of the caller's own.
async fn admin_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> Reply {
    let mut client = HttpClient::connect(addr).await;
    client
        .send(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: admin\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await;
    let mut rest = Vec::new();
    tokio::time::timeout(ANSWER_PATIENCE, read_reply(&mut client.stream, &mut rest))
        .await
        .expect("an answer in time")
        .expect("an answer")
}

/// How long a test waits for the admin API's answer: the API's own deadline for a request,
/// after which it answers 504 itself (30 s, as the README says), and some. Its heavy requests
/// (a maglev table of millions of slots rebuilt, the metrics of thousands of backends) take
/// seconds on a loaded machine, which [`PATIENCE`] is too short for.
const ANSWER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(40);

fn json(reply: &Reply) -> serde_json::Value {
    serde_json::from_slice(&reply.body).unwrap_or_else(|e| panic!("{e}: {}", reply.text()))
}

/// Backends `a` and `b` and the proxy of [`config`] over them, with its admin API's address: the
/// start of most tests here.
async fn proxy_and_api() -> (Backend, Backend, Proxy, SocketAddr) {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    let proxy = Proxy::start(&config(a.addr, b.addr, ""));
    let api = proxy.handle.admin_addr().expect("admin configured");
    (a, b, proxy, api)
}

fn config(a: SocketAddr, b: SocketAddr, extra: &str) -> String {
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n{extra}\n  [[listeners.routes]]\n  match = {{ path_prefix = \"/api/\" }}\n  pool = \"p\"\n\n[pools.p]\nbackends = [\"{a}\", \"{b}\"]\n"
    )
}

async fn served_by(addr: SocketAddr) -> String {
    let mut client = HttpClient::connect(addr).await;
    client
        .get("/", "")
        .await
        .header("x-backend")
        .unwrap_or("none")
        .to_owned()
}

#[tokio::test]
async fn the_token_is_required_when_set() {
    let (_a, _b, _proxy, api) = proxy_and_api().await;
    let denied = admin(api, "GET", "/api/state", None, "").await;
    assert_eq!(denied.status, 401);
    assert!(json(&denied)["error"].as_str().is_some());
    assert_eq!(
        admin(
            api,
            "GET",
            "/api/state",
            Some("wrong-token-of-some-length"),
            ""
        )
        .await
        .status,
        401
    );
    assert_eq!(admin(api, "GET", "/metrics", None, "").await.status, 401);
    assert_eq!(
        admin(api, "GET", "/api/state", Some(TOKEN), "")
            .await
            .status,
        200
    );
    // The page itself holds no data.
    let page = admin(api, "GET", "/", None, "").await;
    assert_eq!(page.status, 200);
    assert!(
        page.header("content-type")
            .is_some_and(|t| t.starts_with("text/html"))
    );
}

#[tokio::test]
async fn api_calls_change_the_state_and_the_traffic() {
    let (a, b, proxy, api) = proxy_and_api().await;
    let web = proxy.addr("web");
    let t = Some(TOKEN);

    let state = json(&admin(api, "GET", "/api/state", t, "").await);
    assert_eq!(state["generation"], 1);
    assert_eq!(state["listeners"][0]["name"], "web");
    assert_eq!(
        state["listeners"][0]["routes"][0]["match"],
        "path_prefix /api/"
    );
    let backends = &state["pools"][0]["backends"];
    assert_eq!(backends.as_array().map(Vec::len), Some(2));
    assert_eq!(backends[0]["usable"], true);

    // Drain a: everything goes to b, and the state says so.
    let path = format!("/api/pools/p/backends/{}/drain", a.addr);
    let reply = admin(api, "POST", &path, t, "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(json(&reply)["draining"], true);
    for _ in 0..4 {
        assert_eq!(served_by(web).await, "b");
    }
    let state = json(&admin(api, "GET", "/api/state", t, "").await);
    let drained = &state["pools"][0]["backends"][0];
    assert_eq!(drained["draining"], true);
    assert_eq!(drained["overrides"][0], "drain");
    let path = format!("/api/pools/p/backends/{}/undrain", a.addr);
    assert_eq!(admin(api, "POST", &path, t, "").await.status, 200);

    // Disable b: everything goes to a; enable it again.
    let path = format!("/api/pools/p/backends/{}/disable", b.addr);
    assert_eq!(admin(api, "POST", &path, t, "").await.status, 200);
    for _ in 0..4 {
        assert_eq!(served_by(web).await, "a");
    }
    let path = format!("/api/pools/p/backends/{}/enable", b.addr);
    assert_eq!(admin(api, "POST", &path, t, "").await.status, 200);

    // Weight 3 to 1: round robin gives a three turns in four.
    let path = format!("/api/pools/p/backends/{}/weight", a.addr);
    let reply = admin(api, "PUT", &path, t, "{\"weight\": 3}").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(json(&reply)["weight"], 3);
    let mut to_a = 0;
    for _ in 0..8 {
        if served_by(web).await == "a" {
            to_a += 1;
        }
    }
    assert_eq!(to_a, 6);

    // Errors are JSON with a reason.
    for (method, path, body, status) in [
        (
            "POST",
            "/api/pools/nope/backends/1.2.3.4:5/drain".to_owned(),
            "",
            404,
        ),
        (
            "POST",
            "/api/pools/p/backends/1.2.3.4:5/drain".to_owned(),
            "",
            404,
        ),
        (
            "POST",
            format!("/api/pools/p/backends/{}/explode", a.addr),
            "",
            404,
        ),
        (
            "PUT",
            format!("/api/pools/p/backends/{}/weight", a.addr),
            "{\"weight\": 0}",
            400,
        ),
        (
            "PUT",
            format!("/api/pools/p/backends/{}/weight", a.addr),
            "garbage",
            400,
        ),
        (
            "GET",
            format!("/api/pools/p/backends/{}/drain", a.addr),
            "",
            405,
        ),
        ("DELETE", "/api/state".to_owned(), "", 405),
        ("GET", "/api/nothing".to_owned(), "", 404),
    ] {
        let reply = admin(api, method, &path, t, body).await;
        assert_eq!(reply.status, status, "{method} {path}: {}", reply.text());
        assert!(json(&reply)["error"].as_str().is_some());
    }

    // A reload puts the file back in charge.
    let summary = proxy
        .reload(&config(a.addr, b.addr, ""))
        .await
        .expect("reloads");
    assert_eq!(summary.generation, 2);
    let state = json(&admin(api, "GET", "/api/state", t, "").await);
    assert_eq!(state["pools"][0]["backends"][0]["weight"], 1);
    assert_eq!(
        state["pools"][0]["backends"][0]["overrides"]
            .as_array()
            .map(Vec::len),
        Some(0)
    );
}

#[tokio::test]
async fn a_wrong_method_on_a_backend_path_is_refused_as_such() {
    let (a, _b, proxy, api) = proxy_and_api().await;
    let t = Some(TOKEN);
    // `weight` is a path that takes PUT, not an unknown action.
    let path = format!("/api/pools/p/backends/{}/weight", a.addr);
    let reply = admin(api, "POST", &path, t, "{\"weight\": 2}").await;
    assert_eq!(reply.status, 405, "{}", reply.text());
    assert_eq!(reply.header("allow"), Some("PUT"));
    let path = format!("/api/pools/p/backends/{}/drain", a.addr);
    let reply = admin(api, "PUT", &path, t, "").await;
    assert_eq!(reply.status, 405, "{}", reply.text());
    assert_eq!(reply.header("allow"), Some("POST"));
    let reply = admin(api, "GET", "/api/reload", t, "").await;
    assert_eq!(reply.status, 405, "{}", reply.text());
    assert_eq!(reply.header("allow"), Some("POST"));
    // Nothing changed.
    let state = proxy.registry.get("p", a.addr).expect("known");
    assert!(state.is_usable());
}

#[tokio::test]
async fn metrics_parse_and_count_what_was_sent() {
    let (a, b, proxy, api) = proxy_and_api().await;
    let web = proxy.addr("web");
    let mut client = HttpClient::connect(web).await;
    for _ in 0..7 {
        assert_eq!(client.get("/", "").await.status, 200);
    }
    for _ in 0..3 {
        assert_eq!(client.get("/api/x", "").await.status, 200);
    }
    let reply = admin(api, "GET", "/metrics", Some(TOKEN), "").await;
    assert_eq!(reply.status, 200);
    let text = reply.text();
    // Every line is a comment, `# EOF`, or `name{labels} value`.
    let mut samples = std::collections::HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line}"));
        samples.insert(series.to_owned(), value);
    }
    assert!(text.trim_end().ends_with("# EOF"));
    let get = |series: &str| {
        samples
            .get(series)
            .copied()
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    };
    assert_eq!(
        get("switchyard_http_requests_total{listener=\"web\",route=\"default\",class=\"2xx\"}"),
        7.0
    );
    assert_eq!(
        get("switchyard_http_requests_total{listener=\"web\",route=\"0\",class=\"2xx\"}"),
        3.0
    );
    assert_eq!(
        get("switchyard_http_request_duration_seconds_count{listener=\"web\",route=\"default\"}"),
        7.0
    );
    let responses: f64 = [a.addr, b.addr]
        .iter()
        .map(|addr| {
            get(&format!(
                "switchyard_backend_responses_total{{pool=\"p\",backend=\"{addr}\",class=\"2xx\"}}"
            ))
        })
        .sum();
    assert_eq!(responses, 10.0);
    assert_eq!(get("switchyard_connections_total{listener=\"web\"}"), 1.0);
    assert_eq!(get("switchyard_config_generation"), 1.0);
    assert_eq!(
        get(&format!(
            "switchyard_backend_up{{pool=\"p\",backend=\"{}\"}}",
            a.addr
        )),
        1.0
    );
}

#[tokio::test]
async fn access_log_lines_are_json_and_match_the_requests() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    let dir = temp_dir_for("log");
    let log = dir.join("access.log");
    let proxy = Proxy::start(&config(a.addr, b.addr, &json_access_log(&log)));
    let web = proxy.addr("web");
    let mut client = HttpClient::connect(web).await;
    let reply = client
        .get(
            "/api/items?x=1",
            "X-Request-ID: trace-me\r\nUser-Agent: tester\r\n",
        )
        .await;
    assert_eq!(reply.status, 200);
    let line = &json_lines(&log, 1).await[0];
    assert_eq!(line["request_id"], "trace-me");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/api/items?x=1");
    assert_eq!(line["route"], "0");
    assert_eq!(line["pool"], "p");
    assert_eq!(line["status"], 200);
    assert_eq!(line["listener"], "web");
    assert!(line["bytes"].as_u64().is_some_and(|n| n > 0));
    let backend = line["backend"].as_str().expect("backend");
    assert!(backend == a.addr.to_string() || backend == b.addr.to_string());
    assert!(
        line["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:"))
    );

    // logrotate: the file is moved, the proxy told; new lines go to a new file.
    let rotated = dir.join("access.log.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    proxy.handle.reopen_logs();
    assert_eq!(client.get("/", "").await.status, 200);
    eventually("a new file", || log_text(&log).lines().count() == 1).await;
    assert_eq!(
        std::fs::read_to_string(&rotated)
            .expect("old")
            .lines()
            .count(),
        1
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_full_log_queue_drops_lines_and_requests_go_on() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    let dir = temp_dir_for("fifo");
    let fifo = dir.join("stuck.log");
    let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: a valid C string and mode.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    // A reader that never reads: once the pipe's buffer is full, the writer is stuck.
    let reader_path = fifo.clone();
    let reader = std::thread::spawn(move || std::fs::File::open(reader_path));
    let extra = format!("access_log = {{ path = \"{}\" }}", fifo.display());
    let proxy = Proxy::start(&config(a.addr, b.addr, &extra));
    let _held = reader.join().expect("joins").expect("opens");
    let web = proxy.addr("web");
    let stats = proxy.handle.metrics().listener("web");
    let mut workers = Vec::new();
    for _ in 0..4 {
        workers.push(tokio::spawn(async move {
            let mut client = HttpClient::connect(web).await;
            for _ in 0..2_500 {
                assert_eq!(client.get("/", "").await.status, 200);
            }
        }));
    }
    for worker in workers {
        worker.await.expect("every request answered");
    }
    assert!(stats.log_dropped.load(SeqCst) > 0, "lines were dropped");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn reload_through_the_api() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    // A free port for the admin listener of the binary.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let text = |pool: &str| {
        config(a.addr, b.addr, "")
            .replace(
                "127.0.0.1:0\"\ntoken",
                &format!("127.0.0.1:{port}\"\ntoken"),
            )
            .replace(
                "default_pool = \"p\"",
                &format!("default_pool = \"{pool}\""),
            )
            + &format!("[pools.q]\nbackends = [\"{}\"]\n", b.addr)
    };
    let running = spawn_binary("admin-reload", &text("p")).await;
    let api: SocketAddr = ([127, 0, 0, 1], port).into();
    let web = running.addr;
    std::fs::write(&running.config, text("q")).expect("write");
    let reply = admin(api, "POST", "/api/reload", Some(TOKEN), "").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(json(&reply)["generation"], 2);
    for _ in 0..3 {
        assert_eq!(served_by(web).await, "b");
    }
    // A broken file: refused with its reason, and nothing changes.
    std::fs::write(&running.config, "[[listeners]]\nname = 3\n").expect("write");
    let reply = admin(api, "POST", "/api/reload", Some(TOKEN), "").await;
    assert_eq!(reply.status, 422, "{}", reply.text());
    assert!(
        json(&reply)["error"]
            .as_str()
            .is_some_and(|e| e.contains("name"))
    );
    assert_eq!(served_by(web).await, "b");
    let state = json(&admin(api, "GET", "/api/state", Some(TOKEN), "").await);
    assert_eq!(state["generation"], 2);
    assert_eq!(state["reloads"]["failed"], 1);
}

#[tokio::test]
async fn a_flood_of_admin_connections_does_not_touch_the_data_path() {
    let (_a, _b, proxy, api) = proxy_and_api().await;
    let web = proxy.addr("web");
    // Twice the admin connection cap, held open without a request.
    let mut held = Vec::new();
    for _ in 0..64 {
        held.push(tokio::net::TcpStream::connect(api).await.expect("connect"));
    }
    let mut client = HttpClient::connect(web).await;
    for _ in 0..20 {
        assert_eq!(client.get("/", "").await.status, 200);
    }
    // Once they go, the API answers again.
    drop(held);
    let reply = admin(api, "GET", "/api/state", Some(TOKEN), "").await;
    assert_eq!(reply.status, 200);
}

/// One tcp connection through `addr` to an echo backend: five bytes each way, then closed from
/// the client's side and seen closed from the other.
async fn hello_through_echo(addr: SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(b"hello").await.expect("write");
    let mut back = [0u8; 5];
    stream.read_exact(&mut back).await.expect("echo");
    stream.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.expect("eof");
}

#[tokio::test]
async fn a_tcp_listener_logs_one_line_per_connection() {
    let echo = Backend::echo().await;
    let dir = temp_dir_for("tcplog");
    let log = dir.join("tcp.log");
    let proxy = Proxy::start(&format!(
        "[[listeners]]\nname = \"l4\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"e\"\naccess_log = {{ path = \"{}\" }}\n[pools.e]\nbackends = [\"{}\"]\n",
        log.display(),
        echo.addr
    ));
    hello_through_echo(proxy.addr("l4")).await;
    let line = &json_lines(&log, 1).await[0];
    assert_eq!(line["protocol"], "tcp");
    assert_eq!(line["listener"], "l4");
    assert_eq!(line["backend"], echo.addr.to_string());
    assert_eq!(line["bytes_sent"], 5);
    assert_eq!(line["bytes_received"], 5);
    assert_eq!(line["outcome"], "closed");
    assert_eq!(
        keys_in_order(log_text(&log).trim()),
        [
            "time",
            "listener",
            "protocol",
            "client",
            "backend",
            "bytes_sent",
            "bytes_received",
            "duration_ms",
            "outcome"
        ]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_dashboard_is_one_page_with_no_external_assets() {
    let (_a, _b, _proxy, api) = proxy_and_api().await;
    let page = admin(api, "GET", "/", None, "").await;
    assert_eq!(page.status, 200);
    let csp = page.header("content-security-policy").expect("a CSP");
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    let html = page.text();
    assert!(html.contains("/api/state"), "the page reads the state");
    let lower = html.to_ascii_lowercase();
    // Nothing loaded from elsewhere, nor from this listener: the page is all there is.
    for banned in [
        "http://", "https://", "//cdn", "src=", "href=", "url(", "@import", "<link", "<iframe",
    ] {
        assert!(!lower.contains(banned), "the page contains `{banned}`");
    }
    // Data reaches the DOM as text only.
    for banned in [
        "innerhtml",
        "outerhtml",
        "insertadjacenthtml",
        "document.write",
    ] {
        assert!(!lower.contains(banned), "the page uses `{banned}`");
    }
}

#[tokio::test]
async fn changes_from_a_page_of_another_origin_are_refused() {
    let (a, _b, _proxy, api) = proxy_and_api().await;
    let path = format!("/api/pools/p/backends/{}/drain", a.addr);
    let mut client = HttpClient::connect(api).await;
    client
        .send(
            format!(
                "POST {path} HTTP/1.1\r\nHost: {api}\r\nOrigin: http://attacker.example\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
    let refused = client.reply().await.expect("an answer");
    assert_eq!(refused.status, 403, "{}", refused.text());
    let state = json(&admin(api, "GET", "/api/state", Some(TOKEN), "").await);
    assert_eq!(state["pools"][0]["backends"][0]["draining"], false);
    // The dashboard's own origin is fine.
    let mut client = HttpClient::connect(api).await;
    client
        .send(
            format!(
                "POST {path} HTTP/1.1\r\nHost: {api}\r\nOrigin: http://{api}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
    assert_eq!(client.reply().await.expect("an answer").status, 200);
}

/// Parses an OpenMetrics text exposition strictly and returns its samples by series, with label
/// values unescaped (`name{a="v",b="w"}`). Panics on anything a strict parser would refuse.
fn parse_openmetrics(text: &str) -> std::collections::HashMap<String, f64> {
    let mut samples = std::collections::HashMap::new();
    let mut families = std::collections::HashSet::new();
    let mut family: Option<(String, String)> = None;
    let mut buckets: Vec<(String, f64)> = Vec::new();
    assert!(text.ends_with("# EOF\n"), "ends with # EOF:\n{text}");
    let lines: Vec<&str> = text.lines().collect();
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    for (i, line) in lines.iter().enumerate() {
        if *line == "# EOF" {
            assert_eq!(i, lines.len() - 1, "# EOF is last");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(valid_name(name), "bad family name {name}");
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "kind {kind}"
            );
            assert!(families.insert(name.to_owned()), "family {name} twice");
            family = Some((name.to_owned(), kind.to_owned()));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').expect("HELP name text");
            assert!(valid_name(name), "bad family name {name}");
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment {line}");
        // A sample: name, optional labels, one space, a value.
        let name_end = line.find(['{', ' ']).expect("a sample");
        let name = &line[..name_end];
        assert!(valid_name(name), "bad sample name in {line:?}");
        let (fam, kind) = family.clone().expect("a sample after its TYPE");
        let suffix = name
            .strip_prefix(fam.as_str())
            .unwrap_or_else(|| panic!("sample {name} outside its family {fam}"));
        let allowed: &[&str] = match kind.as_str() {
            "counter" => &["_total"],
            "gauge" => &[""],
            _ => &["_bucket", "_sum", "_count"],
        };
        assert!(allowed.contains(&suffix), "{name} in {kind} {fam}");
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            let end = loop {
                let Some(&(start, c)) = chars.peek() else {
                    panic!("unterminated labels in {line:?}")
                };
                if c == '}' {
                    break start;
                }
                let eq = inner[start..].find('=').expect("label =") + start;
                let label = &inner[start..eq];
                assert!(valid_name(label), "bad label name {label:?} in {line:?}");
                while chars.peek().is_some_and(|&(i, _)| i <= eq) {
                    chars.next();
                }
                assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line:?}");
                let mut value = String::new();
                loop {
                    match chars.next().map(|(_, c)| c) {
                        Some('"') => break,
                        Some('\\') => match chars.next().map(|(_, c)| c) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            other => panic!("bad escape {other:?} in {line:?}"),
                        },
                        Some(c) => value.push(c),
                        None => panic!("unterminated value in {line:?}"),
                    }
                }
                labels.push(format!("{label}=\"{value}\""));
                match chars.peek().map(|&(_, c)| c) {
                    Some(',') => {
                        chars.next();
                    }
                    Some('}') => {}
                    other => panic!("expected , or }} not {other:?} in {line:?}"),
                }
            };
            rest = &inner[end + 1..];
        }
        let value = rest.strip_prefix(' ').expect("one space before the value");
        assert!(
            !value.contains(' '),
            "timestamps or exemplars unexpected: {line:?}"
        );
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        if kind == "counter" {
            assert!(value >= 0.0, "negative counter {line:?}");
        }
        let series = if labels.is_empty() {
            name.to_owned()
        } else {
            format!("{name}{{{}}}", labels.join(","))
        };
        if suffix == "_bucket" {
            let key: Vec<&String> = labels.iter().filter(|l| !l.starts_with("le=")).collect();
            let key = format!("{fam}{key:?}");
            if let Some((last_key, last)) = buckets.last()
                && *last_key == key
            {
                assert!(value >= *last, "buckets cumulative: {line:?}");
            } else {
                buckets.clear();
            }
            buckets.push((key, value));
        }
        assert!(
            samples.insert(series.clone(), value).is_none(),
            "{series} twice"
        );
    }
    samples
}

/// Names that need escaping everywhere they are shown: quotes, backslashes, a newline, markup.
const ODD_LISTENER: &str = "we\"b\\1\n</script><img src=x onerror=alert(1)>";
const ODD_POOL: &str = "p\"q\\r\n<b>&amp;";

fn odd_config(a: SocketAddr, extra: &str) -> String {
    let toml = |s: &str| serde_json::to_string(s).expect("a JSON string is a TOML basic string");
    format!(
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n[[listeners]]\nname = {}\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = {}\n{extra}\n\n[pools.{}]\nbackends = [\"{a}\"]\n",
        toml(ODD_LISTENER),
        toml(ODD_POOL),
        toml(ODD_POOL)
    )
}

#[tokio::test]
async fn odd_names_are_escaped_in_metrics_and_state() {
    let a = http_backend("a").await;
    let proxy = Proxy::start(&odd_config(a.addr, ""));
    let api = proxy.handle.admin_addr().expect("admin configured");
    let mut client = HttpClient::connect(proxy.addr(ODD_LISTENER)).await;
    for _ in 0..3 {
        assert_eq!(client.get("/", "").await.status, 200);
    }
    let reply = admin(api, "GET", "/metrics", Some(TOKEN), "").await;
    assert_eq!(reply.status, 200);
    let samples = parse_openmetrics(&reply.text());
    let series = format!(
        "switchyard_http_requests_total{{listener=\"{ODD_LISTENER}\",route=\"default\",class=\"2xx\"}}"
    );
    assert_eq!(samples.get(&series), Some(&3.0), "{}", reply.text());
    let series = format!(
        "switchyard_backend_responses_total{{pool=\"{ODD_POOL}\",backend=\"{}\",class=\"2xx\"}}",
        a.addr
    );
    assert_eq!(samples.get(&series), Some(&3.0), "{}", reply.text());
    let state = json(&admin(api, "GET", "/api/state", Some(TOKEN), "").await);
    assert_eq!(state["listeners"][0]["name"], ODD_LISTENER);
    assert_eq!(state["listeners"][0]["default_pool"], ODD_POOL);
    assert_eq!(state["pools"][0]["name"], ODD_POOL);
    assert_eq!(state["pools"][0]["backends"][0]["responses"]["2xx"], 3);
}

/// The keys of a flat JSON object, in the order the line has them.
fn keys_in_order(line: &str) -> Vec<String> {
    let value: serde_json::Value = serde_json::from_str(line).expect("json");
    let object = value.as_object().expect("an object");
    let mut keys: Vec<(usize, String)> = object
        .keys()
        .map(|k| {
            let at = line
                .find(&format!("\"{k}\":"))
                .unwrap_or_else(|| panic!("{k} in {line}"));
            (at, k.clone())
        })
        .collect();
    keys.sort();
    keys.into_iter().map(|(_, k)| k).collect()
}

#[tokio::test]
async fn hostile_request_values_keep_one_line_per_request_in_the_order_documented() {
    let a = http_backend("a").await;
    let dir = temp_dir_for("hostile");
    let json_log = dir.join("json.log");
    let combined_log = dir.join("combined.log");
    let extra = |path: &std::path::Path, format: &str| {
        format!(
            "access_log = {{ path = \"{}\", format = \"{format}\" }}",
            path.display()
        )
    };
    let json_proxy = Proxy::start(&odd_config(a.addr, &extra(&json_log, "json")));
    let combined_proxy = Proxy::start(&odd_config(a.addr, &extra(&combined_log, "combined")));
    let mut request = b"GET /a'b?d=(e) HTTP/1.1\r\nHost: test\r\nUser-Agent: ua\"\\\t\xff\xfe end\r\nReferer: r\"\\\r\nX-Request-ID: id\"1\r\n\r\n".to_vec();
    request.extend_from_slice(b"GET /plain HTTP/1.1\r\nHost: test\r\n\r\n");
    for proxy in [&json_proxy, &combined_proxy] {
        let mut client = HttpClient::connect(proxy.addr(ODD_LISTENER)).await;
        client.send(&request).await;
        assert_eq!(client.reply().await.expect("first").status, 200);
        assert_eq!(client.reply().await.expect("second").status, 200);
    }
    let read = |path: &std::path::Path| std::fs::read(path).unwrap_or_default();
    eventually("two json lines", || {
        read(&json_log).iter().filter(|&&b| b == b'\n').count() == 2
    })
    .await;
    eventually("two combined lines", || {
        read(&combined_log).iter().filter(|&&b| b == b'\n').count() == 2
    })
    .await;
    let text = String::from_utf8(read(&json_log)).expect("json lines are UTF-8");
    let lines: Vec<&str> = text.lines().collect();
    let first: serde_json::Value = serde_json::from_str(lines[0]).expect("valid json");
    assert_eq!(first["listener"], ODD_LISTENER);
    assert_eq!(first["pool"], ODD_POOL);
    assert_eq!(first["path"], "/a'b?d=(e)");
    assert_eq!(first["user_agent"], serde_json::Value::Null);
    assert_eq!(first["request_id"], "id\"1");
    assert_eq!(
        keys_in_order(lines[0]),
        [
            "time",
            "listener",
            "request_id",
            "client",
            "method",
            "host",
            "path",
            "protocol",
            "route",
            "pool",
            "backend",
            "status",
            "bytes",
            "duration_ms",
            "upstream_ms"
        ]
    );
    let combined = read(&combined_log);
    assert!(
        combined
            .iter()
            .all(|&b| b == b'\n' || (b' '..=b'~').contains(&b)),
        "printable ASCII only: {}",
        String::from_utf8_lossy(&combined)
    );
    let combined = String::from_utf8(combined).expect("ascii");
    let first = combined.lines().next().expect("a line");
    // Quoted fields: request line, referer, user agent; none ends early.
    let quoted: Vec<&str> = first.split('"').collect();
    assert_eq!(quoted.len(), 7, "{first}");
    assert_eq!(quoted[1], "GET /a'b?d=(e) HTTP/1.1");
    assert_eq!(quoted[3], "r\\x22\\x5C");
    assert_eq!(quoted[5], "ua\\x22\\x5C\\x09\\xFF\\xFE end");
    assert!(quoted[6].starts_with(" id\\x221 "), "{first}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn counters_survive_a_reload_and_leave_with_their_listener() {
    let a = http_backend("a").await;
    // Listener `stays` has a route while `goes` is there too.
    let two = |names: &[&str]| {
        let mut toml = String::new();
        for name in names {
            toml += &format!(
                "[[listeners]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n\n"
            );
            if names.len() == 2 && *name == "stays" {
                toml += "  [[listeners.routes]]\n  match = { path_prefix = \"/r\" }\n  pool = \"p\"\n\n";
            }
        }
        toml + &format!("[pools.p]\nbackends = [\"{}\"]\n", a.addr)
    };
    let proxy = Proxy::start(&two(&["stays", "goes"]));
    for name in ["stays", "goes"] {
        let mut client = HttpClient::connect(proxy.addr(name)).await;
        assert_eq!(client.get("/", "Connection: close\r\n").await.status, 200);
    }
    let mut client = HttpClient::connect(proxy.addr("stays")).await;
    assert_eq!(client.get("/r", "Connection: close\r\n").await.status, 200);
    let stays =
        "switchyard_http_requests_total{listener=\"stays\",route=\"default\",class=\"2xx\"}";
    let route = "switchyard_http_requests_total{listener=\"stays\",route=\"0\",class=\"2xx\"}";
    let before = parse_openmetrics(&switchyard::metrics::render(&proxy.handle));
    assert_eq!(before.get(stays), Some(&1.0));
    assert_eq!(before.get(route), Some(&1.0));
    proxy.reload(&two(&["stays"])).await.expect("reloads");
    let text = switchyard::metrics::render(&proxy.handle);
    let after = parse_openmetrics(&text);
    assert_eq!(after.get(stays), Some(&1.0), "{text}");
    assert_eq!(
        after.get("switchyard_connections_total{listener=\"stays\"}"),
        Some(&2.0)
    );
    assert_eq!(
        after.get(route),
        None,
        "the removed route's series are gone:\n{text}"
    );
    assert!(
        !after
            .keys()
            .any(|series| series.contains("listener=\"goes\"")),
        "a removed listener's series are gone:\n{text}"
    );
}

#[tokio::test]
async fn access_log_lines_name_the_route_by_its_name_when_it_has_one() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    let dir = temp_dir_for("log-named");
    let log = dir.join("access.log");
    let named = config(a.addr, b.addr, &json_access_log(&log)).replace(
        "  [[listeners.routes]]\n",
        "  [[listeners.routes]]\n  name = \"api\"\n",
    );
    let proxy = Proxy::start(&named);
    let mut client = HttpClient::connect(proxy.addr("web")).await;
    assert_eq!(client.get("/api/items", "").await.status, 200);
    assert_eq!(client.get("/other", "").await.status, 200);
    let lines = json_lines(&log, 2).await;
    assert_eq!(lines[0]["route"], "api");
    assert_eq!(lines[1]["route"], "default");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A head the proxy cannot read is answered, counted and logged with what of its request line
/// could be read, as NGINX and HAProxy log them: probes and smuggling attempts leave a trace.
#[tokio::test]
async fn refused_heads_are_counted_and_logged() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    let dir = temp_dir_for("log-refused");
    let log = dir.join("access.log");
    let proxy = Proxy::start(&config(
        a.addr,
        b.addr,
        &format!(
            "{}\nclient_header_timeout = \"300ms\"",
            json_access_log(&log)
        ),
    ));
    let web = proxy.addr("web");
    let exchange = |bytes: &'static [u8]| async move {
        let mut stream = tokio::net::TcpStream::connect(web).await.expect("connect");
        stream.write_all(bytes).await.expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
            .await
            .expect("answered in time")
            .expect("read");
        String::from_utf8_lossy(&answer).into_owned()
    };
    // Whitespace before a colon: 400.
    let refused = exchange(b"GET /probe?x=1 HTTP/1.1\r\nHost: a\r\nBad : x\r\n\r\n").await;
    assert!(refused.starts_with("HTTP/1.1 400 "), "{refused}");
    let id = refused
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .expect("the answer carries a request id")
        .to_owned();
    // A head that never ends: 408 once its time is up.
    let slow = exchange(b"POST /upload HTTP/1.1\r\nHost: a\r\n").await;
    assert!(slow.starts_with("HTTP/1.1 408 "), "{slow}");

    let lines = json_lines(&log, 2).await;
    let bad = &lines[0];
    assert_eq!(bad["status"], 400);
    assert_eq!(bad["method"], "GET");
    assert_eq!(bad["path"], "/probe?x=1");
    assert_eq!(bad["protocol"], "HTTP/1.1");
    assert_eq!(bad["route"], "unrouted");
    assert_eq!(bad["request_id"], id.as_str());
    let timed_out = &lines[1];
    assert_eq!(timed_out["status"], 408);
    assert_eq!(timed_out["method"], "POST");
    assert!(
        timed_out["duration_ms"]
            .as_f64()
            .is_some_and(|ms| ms >= 250.0),
        "the wait for the head is its duration: {timed_out}"
    );
    let metrics = parse_openmetrics(&switchyard::metrics::render(&proxy.handle));
    assert_eq!(
        metrics.get(
            "switchyard_http_requests_total{listener=\"web\",route=\"unrouted\",class=\"4xx\"}"
        ),
        Some(&2.0)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A named route's series carry its name, and keep counting when a reload puts another route
/// in front of it; an unnamed route is known by its position.
#[tokio::test]
async fn a_named_route_keeps_its_counters_wherever_a_reload_moves_it() {
    let a = http_backend("a").await;
    let file = |routes: &str| {
        format!(
            "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n\n{routes}\n[pools.p]\nbackends = [\"{}\"]\n",
            a.addr
        )
    };
    let shop = "  [[listeners.routes]]\n  name = \"shop\"\n  match = { path_prefix = \"/shop\" }\n  pool = \"p\"\n\n";
    let new = "  [[listeners.routes]]\n  match = { path_prefix = \"/new\" }\n  pool = \"p\"\n\n";
    let series = |route: &str| {
        format!(
            "switchyard_http_requests_total{{listener=\"web\",route=\"{route}\",class=\"2xx\"}}"
        )
    };
    let proxy = Proxy::start(&file(shop));
    let mut client = HttpClient::connect(proxy.addr("web")).await;
    assert_eq!(client.get("/shop/a", "").await.status, 200);
    let before = parse_openmetrics(&switchyard::metrics::render(&proxy.handle));
    assert_eq!(before.get(&series("shop")), Some(&1.0));
    assert_eq!(before.get(&series("0")), None);

    // A route inserted in front: `shop` is now second, and keeps its count.
    proxy
        .reload(&file(&format!("{new}{shop}")))
        .await
        .expect("reloads");
    assert_eq!(client.get("/shop/b", "").await.status, 200);
    assert_eq!(client.get("/new", "").await.status, 200);
    let text = switchyard::metrics::render(&proxy.handle);
    let after = parse_openmetrics(&text);
    assert_eq!(after.get(&series("shop")), Some(&2.0), "{text}");
    assert_eq!(after.get(&series("0")), Some(&1.0), "{text}");

    // Renamed away, its series leave with it.
    proxy
        .reload(&file(&format!(
            "{new}{}",
            shop.replace("\"shop\"", "\"store\"")
        )))
        .await
        .expect("reloads");
    let text = switchyard::metrics::render(&proxy.handle);
    let last = parse_openmetrics(&text);
    assert_eq!(last.get(&series("shop")), None, "{text}");
    assert_eq!(last.get(&series("0")), Some(&1.0), "{text}");
}

#[tokio::test]
async fn lines_a_full_disk_refuses_are_counted_as_dropped() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    // Every write to /dev/full fails with ENOSPC, as on a full disk.
    let proxy = Proxy::start(&config(
        a.addr,
        b.addr,
        "access_log = { path = \"/dev/full\" }",
    ));
    let mut client = HttpClient::connect(proxy.addr("web")).await;
    for _ in 0..5 {
        assert_eq!(client.get("/", "").await.status, 200);
    }
    let stats = proxy.handle.metrics().listener("web");
    eventually("the five lost lines are counted", || {
        stats.log_dropped.load(SeqCst) == 5
    })
    .await;
}

#[tokio::test]
async fn tcp_counters_in_metrics_and_state_agree_with_what_was_sent() {
    use tokio::io::AsyncReadExt;
    let echo = Backend::echo().await;
    let dead = dead_addr().await;
    let proxy = Proxy::start(&format!(
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n[[listeners]]\nname = \"up\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"e\"\n\n[[listeners]]\nname = \"down\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"d\"\n\n[pools.e]\nbackends = [\"{}\"]\n\n[pools.d]\nbackends = [\"{dead}\"]\n",
        echo.addr
    ));
    let api = proxy.handle.admin_addr().expect("admin configured");
    hello_through_echo(proxy.addr("up")).await;
    {
        let mut stream = tokio::net::TcpStream::connect(proxy.addr("down"))
            .await
            .expect("connect");
        let mut rest = Vec::new();
        // The proxy closes a connection no backend took.
        let _ = stream.read_to_end(&mut rest).await;
    }
    let e = format!("{{pool=\"e\",backend=\"{}\"}}", echo.addr);
    let d = format!("{{pool=\"d\",backend=\"{dead}\"}}");
    // Polled until the echo connection has ended on the proxy's side too.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let samples = loop {
        let reply = admin(api, "GET", "/metrics", Some(TOKEN), "").await;
        let parsed = parse_openmetrics(&reply.text());
        if parsed.get(&format!("switchyard_backend_active{e}")) == Some(&0.0) {
            break parsed;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection ends"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    let get = |series: String| {
        *samples
            .get(&series)
            .unwrap_or_else(|| panic!("no {series}"))
    };
    assert_eq!(get(format!("switchyard_backend_sent_bytes_total{e}")), 5.0);
    assert_eq!(
        get(format!("switchyard_backend_received_bytes_total{e}")),
        5.0
    );
    assert_eq!(get(format!("switchyard_backend_connections_total{e}")), 1.0);
    assert_eq!(
        get(format!("switchyard_backend_connect_failures_total{e}")),
        0.0
    );
    assert_eq!(
        get(format!("switchyard_backend_connect_failures_total{d}")),
        1.0
    );
    assert_eq!(get(format!("switchyard_backend_connections_total{d}")), 0.0);
    assert_eq!(
        get("switchyard_connections_total{listener=\"up\"}".into()),
        1.0
    );
    assert_eq!(
        get("switchyard_connections_total{listener=\"down\"}".into()),
        1.0
    );
    let state = json(&admin(api, "GET", "/api/state", Some(TOKEN), "").await);
    let backend = |pool: &str| {
        state["pools"]
            .as_array()
            .and_then(|pools| pools.iter().find(|p| p["name"] == pool))
            .map(|p| p["backends"][0].clone())
            .expect("the pool")
    };
    assert_eq!(backend("e")["bytes_sent"], 5);
    assert_eq!(backend("e")["bytes_received"], 5);
    assert_eq!(backend("e")["total"], 1);
    assert_eq!(backend("d")["connect_failures"], 1);
    assert_eq!(state["listeners"][0]["connections"], 1);
    assert_eq!(state["listeners"][1]["connections"], 1);
}

#[tokio::test]
async fn failed_exchanges_are_logged_with_their_status() {
    let dir = temp_dir_for("fail");
    let log = dir.join("fail.log");
    let dead = dead_addr().await;
    // Reads requests and never answers.
    let silent = Backend::start(|mut stream| async move {
        let mut sink = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut sink).await;
    })
    .await;
    let proxy = Proxy::start(&format!(
        "[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"dead\"\naccess_log = {{ path = \"{}\" }}\n  [[listeners.routes]]\n  match = {{ path_prefix = \"/slow\" }}\n  pool = \"silent\"\n\n[pools.dead]\nbackends = [\"{dead}\"]\n\n[pools.silent]\nbackends = [\"{}\"]\nresponse_timeout = \"200ms\"\n",
        log.display(),
        silent.addr
    ));
    let web = proxy.addr("web");
    let mut client = HttpClient::connect(web).await;
    assert_eq!(client.get("/", "").await.status, 502);
    let mut client = HttpClient::connect(web).await;
    assert_eq!(client.get("/slow", "").await.status, 504);
    // A client that leaves in the middle of its request body.
    let mut client = HttpClient::connect(web).await;
    client
        .send(b"POST /slow HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n0123456789")
        .await;
    eventually("the silent backend got the request", || {
        silent.accepted() >= 2
    })
    .await;
    drop(client);
    let parsed = json_lines(&log, 3).await;
    assert_eq!(parsed[0]["status"], 502);
    assert_eq!(parsed[0]["pool"], "dead");
    assert_eq!(parsed[1]["status"], 504);
    assert_eq!(parsed[1]["backend"], silent.addr.to_string());
    assert_eq!(parsed[2]["status"], 499, "{}", log_text(&log));
    assert_eq!(parsed[2]["method"], "POST");
    assert_eq!(parsed[2]["backend"], silent.addr.to_string());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether this process holds `path` open.
fn holds_open(path: &std::path::Path) -> bool {
    std::fs::read_dir("/proc/self/fd")
        .map(|fds| {
            fds.flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == path))
        })
        .unwrap_or(false)
}

#[tokio::test]
async fn a_log_file_no_listener_uses_after_a_reload_is_closed() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    let dir = temp_dir_for("logswap");
    let (old, new) = (dir.join("old.log"), dir.join("new.log"));
    let with = |log: &std::path::Path| {
        config(
            a.addr,
            b.addr,
            &format!("access_log = {{ path = \"{}\" }}", log.display()),
        )
    };
    let proxy = Proxy::start(&with(&old));
    assert!(holds_open(&old));
    proxy.reload(&with(&new)).await.expect("reloads");
    let mut client = HttpClient::connect(proxy.addr("web")).await;
    assert_eq!(client.get("/", "").await.status, 200);
    eventually("the line goes to the new file", || {
        log_text(&new).lines().count() == 1
    })
    .await;
    // Else it stays open (and a SIGUSR1 creates it again) until the process ends.
    eventually("the old file is closed", || !holds_open(&old)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_udp_listener_moved_to_another_address_keeps_counting_its_drops() {
    let (a, _backend) = udp_named("a").await;
    let udp = |bind: &str| {
        format!(
            "[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n[[listeners]]\nname = \"dns\"\nbind = \"{bind}\"\nprotocol = \"udp\"\npool = \"p\"\nmax_sessions = 1\nidle_timeout = \"1m\"\n\n[pools.p]\nbackends = [\"{a}\"]\n"
        )
    };
    let proxy = Proxy::start(&udp("127.0.0.1:0"));
    // One session fills the listener; the next client's datagrams are dropped.
    let first = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let second = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let dropped = "switchyard_udp_datagrams_dropped_total{listener=\"dns\"}";
    let count = |proxy: &Proxy| {
        parse_openmetrics(&switchyard::metrics::render(&proxy.handle))
            .get(dropped)
            .copied()
    };
    first
        .send_to(b"one", proxy.addr("dns"))
        .await
        .expect("send");
    let mut buf = [0u8; 64];
    tokio::time::timeout(PATIENCE, first.recv_from(&mut buf))
        .await
        .expect("an answer")
        .expect("recv");
    for _ in 0..3 {
        second
            .send_to(b"two", proxy.addr("dns"))
            .await
            .expect("send");
    }
    eventually("three drops", || count(&proxy) == Some(3.0)).await;

    // The same listener on another address: a new socket, and the counter goes on.
    let summary = proxy.reload(&udp("127.0.0.2:0")).await.expect("reloads");
    assert_eq!(summary.started, ["dns"], "{summary:?}");
    assert_eq!(count(&proxy), Some(3.0), "a counter never goes back");
    let api = proxy.handle.admin_addr().expect("admin configured");
    let state = json(&admin(api, "GET", "/api/state", Some(TOKEN), "").await);
    assert_eq!(state["listeners"][0]["datagrams_dropped"], 3, "{state}");
}

/// The metric names the README's table under "### Metrics" lists, as they appear in samples
/// (`_total` on counters).
fn documented_metrics() -> std::collections::BTreeSet<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let section = readme
        .split("\n### Metrics\n")
        .nth(1)
        .expect("a Metrics section")
        .split("\n#")
        .next()
        .expect("its text");
    section
        .lines()
        .filter_map(|line| line.strip_prefix("| "))
        .filter_map(|row| row.split(" | ").next())
        .flat_map(|cell| cell.split(", "))
        .filter_map(|name| name.strip_prefix('`')?.strip_suffix('`'))
        .filter(|name| name.starts_with("switchyard_"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn every_metric_exported_is_documented_and_every_documented_one_exported() {
    let a = http_backend("a").await;
    let (u, _udp_backend) = udp_named("u").await;
    // One listener of each protocol and health checks, so that every family has a series.
    let toml = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n\
         [[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n\n\
         [[listeners]]\nname = \"db\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"p\"\n\n\
         [[listeners]]\nname = \"dns\"\nbind = \"127.0.0.1:0\"\nprotocol = \"udp\"\npool = \"u\"\n\n\
         [pools.p]\nbackends = [\"{}\"]\nhealth = {{ kind = \"tcp\", interval = \"1s\" }}\n\n\
         [pools.u]\nbackends = [\"{u}\"]\n",
        a.addr
    );
    let proxy = Proxy::start(&toml);
    let api = proxy.handle.admin_addr().expect("admin configured");
    let mut client = HttpClient::connect(proxy.addr("web")).await;
    assert_eq!(client.get("/", "").await.status, 200);
    let reply = admin(api, "GET", "/metrics", Some(TOKEN), "").await;
    assert_eq!(reply.status, 200);
    let text = reply.text();
    let _ = parse_openmetrics(&text);
    let exported: std::collections::BTreeSet<String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .map(|rest| match rest.split_once(' ') {
            Some((name, "counter")) => format!("{name}_total"),
            Some((name, _)) => name.to_owned(),
            None => panic!("bad TYPE line {rest}"),
        })
        .collect();
    let documented = documented_metrics();
    let undocumented: Vec<_> = exported.difference(&documented).collect();
    let missing: Vec<_> = documented.difference(&exported).collect();
    assert!(
        undocumented.is_empty() && missing.is_empty(),
        "exported but not in the README: {undocumented:?}\nin the README but not exported: {missing:?}\n{text}"
    );
}

#[tokio::test]
async fn a_weight_set_through_the_api_shows_in_state_and_metrics_alike() {
    let (a, b, proxy, api) = proxy_and_api().await;
    let t = Some(TOKEN);
    let series = format!(
        "switchyard_backend_weight{{pool=\"p\",backend=\"{}\"}}",
        a.addr
    );
    let weights = || async {
        let state = json(&admin(api, "GET", "/api/state", t, "").await);
        let reply = admin(api, "GET", "/metrics", t, "").await;
        let metrics = parse_openmetrics(&reply.text());
        (
            state["pools"][0]["backends"][0]["weight"].clone(),
            metrics.get(&series).copied(),
        )
    };
    assert_eq!(weights().await, (serde_json::json!(1), Some(1.0)));
    let path = format!("/api/pools/p/backends/{}/weight", a.addr);
    let reply = admin(api, "PUT", &path, t, "{\"weight\": 5}").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(weights().await, (serde_json::json!(5), Some(5.0)));
    // A reload puts the file's weight back, in both.
    proxy
        .reload(&config(a.addr, b.addr, ""))
        .await
        .expect("reloads");
    assert_eq!(weights().await, (serde_json::json!(1), Some(1.0)));
}

#[tokio::test]
async fn a_weight_change_rebuilds_only_its_pool_and_off_the_data_path() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    // A pool whose balancer takes long to build (long beside the scheduling noise of a busy
    // machine): a maglev table of four million slots.
    let toml = config(a.addr, b.addr, "")
        + &format!(
            "\n[pools.big]\nbalance = \"maglev\"\nmaglev_table_size = 4000037\nbackends = [\"{}\"]\n",
            a.addr
        );
    let proxy = Proxy::start(&toml);
    let api = proxy.handle.admin_addr().expect("admin configured");
    let t = Some(TOKEN);

    // A weight in pool p leaves pool big as it was.
    let before = proxy.handle.snapshot();
    let path = format!("/api/pools/p/backends/{}/weight", a.addr);
    assert_eq!(
        admin(api, "PUT", &path, t, "{\"weight\": 2}").await.status,
        200
    );
    let after = proxy.handle.snapshot();
    assert!(
        Arc::ptr_eq(&before.pools["big"], &after.pools["big"]),
        "pool big was built again for a weight in pool p"
    );
    assert!(!Arc::ptr_eq(&before.pools["p"], &after.pools["p"]));

    // A weight in pool big: its table is built again, but not on the thread that serves
    // traffic (this test's runtime has one thread). A ticker measures the longest stall.
    let ticker = StallTicker::start();
    let started = std::time::Instant::now();
    let path = format!("/api/pools/big/backends/{}/weight", a.addr);
    let reply = admin(api, "PUT", &path, t, "{\"weight\": 3}").await;
    let took = started.elapsed();
    let stalled = ticker.stop().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(json(&reply)["weight"], 3);
    assert!(
        stalled < took / 2,
        "traffic stalled {stalled:?} during a weight change that took {took:?}"
    );
}

#[tokio::test]
async fn the_token_is_taken_under_any_case_of_bearer_and_a_refusal_says_why() {
    let (_a, _b, _proxy, api) = proxy_and_api().await;
    // The scheme's name is case-insensitive (RFC 9110, section 11.1).
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let reply = admin_with(
            api,
            "GET",
            "/api/state",
            &format!("Authorization: {scheme} {TOKEN}\r\n"),
            "",
        )
        .await;
        assert_eq!(reply.status, 200, "{scheme}: {}", reply.text());
    }
    // No token, or another scheme: a challenge naming the scheme (RFC 6750, section 3).
    for headers in ["", "Authorization: Basic dXNlcjpwYXNz\r\n"] {
        let reply = admin_with(api, "GET", "/metrics", headers, "").await;
        assert_eq!(reply.status, 401, "{headers:?}");
        assert_eq!(
            reply.header("www-authenticate"),
            Some("Bearer realm=\"switchyard\""),
            "{headers:?}"
        );
    }
    // A wrong token (of the right length too): the challenge says it is invalid.
    let wrong = "x".repeat(TOKEN.len());
    for token in [wrong.as_str(), "short"] {
        let reply = admin(api, "GET", "/api/state", Some(token), "").await;
        assert_eq!(reply.status, 401, "{token:?}");
        assert_eq!(
            reply.header("www-authenticate"),
            Some("Bearer realm=\"switchyard\", error=\"invalid_token\""),
            "{token:?}"
        );
        assert!(json(&reply)["error"].as_str().is_some());
    }
}

#[tokio::test]
async fn a_weight_that_is_not_one_is_refused_with_its_reason_and_changes_nothing() {
    let (a, _b, proxy, api) = proxy_and_api().await;
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let path = format!("/api/pools/p/backends/{}/weight", a.addr);
    let json_type = "Content-Type: application/json\r\n";
    for (content_type, body, status, reason) in [
        (
            "Content-Type: text/plain\r\n",
            "{\"weight\": 5}",
            415,
            "application/json",
        ),
        (
            "Content-Type: multipart/form-data; boundary=x\r\n",
            "{\"weight\": 5}",
            415,
            "application/json",
        ),
        // What curl sends by default is taken, but the body must be JSON all the same.
        (
            "Content-Type: application/x-www-form-urlencoded\r\n",
            "weight=5",
            400,
            "not JSON",
        ),
        (
            json_type,
            "{\"weight\": 5, \"drain\": true}",
            400,
            "`drain`",
        ),
        (json_type, "{\"wieght\": 5}", 400, "`wieght`"),
        (json_type, "{\"weight\": 2.5}", 400, "whole number"),
        (json_type, "{\"weight\": \"3\"}", 400, "whole number"),
        (json_type, "{\"weight\": -1}", 400, "1 to 256"),
        (json_type, "{\"weight\": 0}", 400, "1 to 256"),
        (json_type, "{\"weight\": 257}", 400, "1 to 256"),
        (json_type, "{\"weight\": 1e400}", 400, "not JSON"),
        (
            json_type,
            "{\"weight\": 99999999999999999999999}",
            400,
            "1 to 256",
        ),
        (json_type, "{\"weight\": 5", 400, "not JSON"),
        (json_type, "", 400, "not JSON"),
        (json_type, "[5]", 400, "{\"weight\": N}"),
    ] {
        let reply = admin_with(api, "PUT", &path, &format!("{auth}{content_type}"), body).await;
        assert_eq!(
            reply.status,
            status,
            "{content_type:?} {body:?}: {}",
            reply.text()
        );
        let error = json(&reply)["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(error.contains(reason), "{body:?}: {error}");
    }
    let big = format!("{{\"weight\": 5, \"pad\": \"{}\"}}", "x".repeat(5000));
    let reply = admin_with(api, "PUT", &path, &format!("{auth}{json_type}"), &big).await;
    assert_eq!(reply.status, 413, "{}", reply.text());
    let state = proxy.registry.get("p", a.addr).expect("known");
    assert_eq!(state.weight_override(), None, "nothing changed");
    // What works: JSON with a charset, curl's default type, no type at all, a bare number.
    for (content_type, body) in [
        (
            "Content-Type: application/json; charset=utf-8\r\n",
            "{\"weight\": 4}",
        ),
        (
            "Content-Type: application/x-www-form-urlencoded\r\n",
            "{\"weight\": 5}",
        ),
        ("", "{\"weight\": 3}"),
        (json_type, "2"),
    ] {
        let reply = admin_with(api, "PUT", &path, &format!("{auth}{content_type}"), body).await;
        assert_eq!(
            reply.status,
            200,
            "{content_type:?} {body:?}: {}",
            reply.text()
        );
    }
    assert_eq!(state.weight_override(), Some(2));
}

#[tokio::test]
async fn a_client_that_stops_sending_its_body_is_answered_408_and_lets_go() {
    let (a, _b, _proxy, api) = proxy_and_api().await;
    let mut client = HttpClient::connect(api).await;
    client
        .send(
            format!(
                "PUT /api/pools/p/backends/{}/weight HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 20\r\n\r\n{{\"wei",
                a.addr
            )
            .as_bytes(),
        )
        .await;
    let started = std::time::Instant::now();
    let reply = client.reply().await.expect("an answer");
    assert_eq!(reply.status, 408, "{}", reply.text());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "answered after {:?}",
        started.elapsed()
    );
    assert!(client.closed().await);
}

#[tokio::test]
async fn a_reload_rotates_the_token_but_a_moved_admin_listener_keeps_its_own() {
    let (a, b, proxy, api) = proxy_and_api().await;
    let status = |token: &'static str| async move {
        admin(api, "GET", "/api/state", Some(token), "")
            .await
            .status
    };
    assert_eq!(status(TOKEN).await, 200);

    // A new token in the file: the old one stops working at the reload.
    const ROTATED: &str = "a-rotated-token-of-some-length";
    let rotated = config(a.addr, b.addr, "").replace(TOKEN, ROTATED);
    proxy.reload(&rotated).await.expect("reloads");
    assert_eq!(status(TOKEN).await, 401);
    assert_eq!(status(ROTATED).await, 200);

    // Another address and token: the listener stays where it is, and so does its token (a
    // token meant for a loopback address must not guard one that is not).
    const MOVED: &str = "a-token-for-an-address-not-bound";
    let moved = rotated
        .replacen("bind = \"127.0.0.1:0\"", "bind = \"127.0.0.2:0\"", 1)
        .replace(ROTATED, MOVED);
    proxy.reload(&moved).await.expect("reloads");
    assert_eq!(status(MOVED).await, 401);
    assert_eq!(status(ROTATED).await, 200);
}

#[tokio::test]
async fn a_weight_change_whose_client_leaves_is_applied_whole() {
    let a = http_backend("a").await;
    let b = http_backend("b").await;
    // A pool that takes a while to build (a maglev table of a million slots).
    let toml = config(a.addr, b.addr, "")
        + &format!(
            "\n[pools.big]\nbalance = \"maglev\"\nmaglev_table_size = 1000003\nbackends = [\"{}\", \"{}\"]\n",
            a.addr, b.addr
        );
    let proxy = Proxy::start(&toml);
    let api = proxy.handle.admin_addr().expect("admin configured");
    let mut client = HttpClient::connect(api).await;
    let body = "{\"weight\": 9}";
    client
        .send(
            format!(
                "PUT /api/pools/big/backends/{}/weight HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n{body}",
                a.addr,
                body.len()
            )
            .as_bytes(),
        )
        .await;
    let state = proxy.registry.get("big", a.addr).expect("known");
    eventually("the override is set", || state.weight_override() == Some(9)).await;
    drop(client);
    // The pool in force has the weight the override says, in /api/state and /metrics alike.
    let weight = || {
        proxy.handle.snapshot().pools["big"]
            .candidates
            .iter()
            .find(|c| c.state.addr == a.addr)
            .map(|c| c.weight)
    };
    eventually("the pool built with the new weight", || weight() == Some(9)).await;
}

#[tokio::test]
async fn head_is_answered_wherever_get_is() {
    let (_a, _b, _proxy, api) = proxy_and_api().await;
    for path in ["/metrics", "/api/state", "/"] {
        let mut client = HttpClient::connect(api).await;
        client
            .send(
                format!(
                    "HEAD {path} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await;
        let mut all = Vec::new();
        tokio::time::timeout(
            PATIENCE,
            tokio::io::AsyncReadExt::read_to_end(&mut client.stream, &mut all),
        )
        .await
        .expect("an answer in time")
        .expect("read");
        let head = String::from_utf8_lossy(&all).into_owned();
        assert!(head.starts_with("HTTP/1.1 200 "), "HEAD {path}: {head}");
        assert!(
            head.ends_with("\r\n\r\n"),
            "HEAD {path} has no body: {head}"
        );
    }
    let reply = admin(api, "DELETE", "/metrics", Some(TOKEN), "").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("GET, HEAD"));
}

#[tokio::test]
async fn udp_sessions_count_as_the_listeners_connections_in_metrics_and_state() {
    let (a, _backend) = udp_named("a").await;
    let toml = format!(
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n[[listeners]]\nname = \"dns\"\nbind = \"127.0.0.1:0\"\nprotocol = \"udp\"\npool = \"p\"\n\n[pools.p]\nbackends = [\"{a}\"]\n"
    );
    let proxy = Proxy::start(&toml);
    let api = proxy.handle.admin_addr().expect("admin configured");
    // Three clients, one session each (the second datagram of a client is no new session).
    for _ in 0..3 {
        let client = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        for _ in 0..2 {
            client.send_to(b"q", proxy.addr("dns")).await.expect("send");
            let mut buf = [0u8; 64];
            tokio::time::timeout(PATIENCE, client.recv_from(&mut buf))
                .await
                .expect("an answer")
                .expect("recv");
        }
    }
    let metrics = parse_openmetrics(&admin(api, "GET", "/metrics", Some(TOKEN), "").await.text());
    assert_eq!(
        metrics.get("switchyard_connections_total{listener=\"dns\"}"),
        Some(&3.0)
    );
    assert_eq!(
        metrics.get("switchyard_connections_active{listener=\"dns\"}"),
        Some(&3.0)
    );
    let state = json(&admin(api, "GET", "/api/state", Some(TOKEN), "").await);
    assert_eq!(state["listeners"][0]["connections"], 3, "{state}");
    assert_eq!(state["listeners"][0]["active"], 3, "{state}");
}

#[tokio::test]
async fn an_unknown_pool_or_backend_is_answered_with_the_names_there_are() {
    let (a, b, _proxy, api) = proxy_and_api().await;
    let t = Some(TOKEN);
    let reply = admin(api, "POST", "/api/pools/q/backends/1.2.3.4:5/drain", t, "").await;
    assert_eq!(reply.status, 404);
    let error = json(&reply)["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.contains("no pool `q`") && error.contains("pools: p"),
        "{error}"
    );
    // A backend the pool does not have, as an address or as a host name.
    for address in ["1.2.3.4:5", "localhost:80", "%3Cscript%3E"] {
        let path = format!("/api/pools/p/backends/{address}/weight");
        let reply = admin(api, "PUT", &path, t, "{\"weight\": 2}").await;
        assert_eq!(reply.status, 404, "{address}");
        let error = json(&reply)["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            error.contains(&a.addr.to_string()) && error.contains(&b.addr.to_string()),
            "{error}"
        );
    }
}

/// usable, draining, disabled, as /api/state says them.
type Flags = (Option<bool>, Option<bool>, Option<bool>);
/// switchyard_backend_up and the draining and disabled states, as /metrics says them.
type Gauges = (Option<f64>, Option<f64>, Option<f64>);

#[tokio::test]
async fn drains_and_disables_through_the_api_show_in_state_and_metrics_alike() {
    let (a, _b, _proxy, api) = proxy_and_api().await;
    let t = Some(TOKEN);
    // What /api/state and /metrics say of backend a: usable, draining, disabled.
    let both = || async {
        let state = json(&admin(api, "GET", "/api/state", t, "").await);
        let backend = &state["pools"][0]["backends"][0];
        let metrics = parse_openmetrics(&admin(api, "GET", "/metrics", t, "").await.text());
        let gauge = |name: &str, state: Option<&str>| {
            let extra = state.map_or(String::new(), |s| format!(",state=\"{s}\""));
            metrics
                .get(&format!(
                    "{name}{{pool=\"p\",backend=\"{}\"{extra}}}",
                    a.addr
                ))
                .copied()
        };
        (
            (
                backend["usable"].as_bool(),
                backend["draining"].as_bool(),
                backend["disabled"].as_bool(),
            ),
            (
                gauge("switchyard_backend_up", None),
                gauge("switchyard_backend_state", Some("draining")),
                gauge("switchyard_backend_state", Some("disabled")),
            ),
        )
    };
    let agree = |(state, metrics): (Flags, Gauges)| {
        let as_f = |b: Option<bool>| b.map(|b| if b { 1.0 } else { 0.0 });
        assert_eq!(
            (as_f(state.0), as_f(state.1), as_f(state.2)),
            metrics,
            "/api/state and /metrics disagree"
        );
        state
    };
    assert_eq!(agree(both().await), (Some(true), Some(false), Some(false)));
    for (action, want) in [
        ("drain", (Some(false), Some(true), Some(false))),
        ("disable", (Some(false), Some(true), Some(true))),
        ("undrain", (Some(false), Some(false), Some(true))),
        ("enable", (Some(true), Some(false), Some(false))),
    ] {
        let path = format!("/api/pools/p/backends/{}/{action}", a.addr);
        assert_eq!(
            admin(api, "POST", &path, t, "").await.status,
            200,
            "{action}"
        );
        assert_eq!(agree(both().await), want, "after {action}");
    }
}

/// [`config`] with 3000 backends (none listening) in pool `p`: its metrics and state run to
/// megabytes, more than socket buffers hold.
fn thousands_of_backends(a: SocketAddr) -> String {
    let backends: Vec<String> = (0..3000)
        .map(|i| format!("\"127.1.{}.{}:80\"", i / 250, i % 250 + 1))
        .collect();
    config(a, a, "").replace(
        &format!("backends = [\"{a}\", \"{a}\"]"),
        &format!("backends = [{}]", backends.join(", ")),
    )
}

/// The state the kernel lists for the TCP connection from `local` to `remote` (both on
/// 127.0.0.1): 1 established, 3 its handshake not yet acknowledged, others closing; `None`
/// when it lists none.
fn tcp_state(local: SocketAddr, remote: SocketAddr) -> Option<u8> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("the kernel's TCP table");
    let (local, remote) = (
        format!("0100007F:{:04X}", local.port()),
        format!("0100007F:{:04X}", remote.port()),
    );
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&local.as_str()) && fields.get(2) == Some(&remote.as_str()))
            .then(|| u8::from_str_radix(fields.get(3)?, 16).ok())
            .flatten()
    })
}

#[tokio::test]
async fn a_client_that_never_reads_a_large_answer_is_let_go() {
    let a = http_backend("a").await;
    // Metrics of thousands of backends: megabytes, more than socket buffers hold.
    let proxy = Proxy::start(&thousands_of_backends(a.addr));
    let api = proxy.handle.admin_addr().expect("admin configured");
    let full = admin(api, "GET", "/metrics", Some(TOKEN), "")
        .await
        .body
        .len();
    assert!(full > 8 << 20, "only {full} bytes of metrics");

    // A client that asks for them with a tiny receive window and reads nothing.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stuck = socket.connect(api).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(
        &mut stuck,
        format!("GET /metrics HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("send");
    // Past the time a write may stall, the connection is given up. Reading before would be
    // progress, which keeps the connection: its end is watched on the proxy's side of the
    // socket, which leaves the established state once closed, with bytes still unsent. The
    // wait is the stall's ten seconds after however long the answer takes to fill the buffers.
    let (local, peer) = (stuck.local_addr().expect("address"), api);
    let deadline = tokio::time::Instant::now() + PATIENCE * 6;
    let mut seen = false;
    loop {
        match tcp_state(peer, local) {
            Some(1 | 3) => seen = true,
            None if !seen => {}
            // Closing, or gone.
            _ => break,
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled connection is still open"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // What was queued for it arrives, then its end, well short of the whole answer.
    let mut got = Vec::new();
    tokio::time::timeout(
        PATIENCE,
        tokio::io::AsyncReadExt::read_to_end(&mut stuck, &mut got),
    )
    .await
    .expect("the end of the connection in time")
    .ok();
    assert!(
        got.len() < full,
        "the whole answer ({full} bytes) was still sent"
    );
}

#[tokio::test]
async fn large_metrics_and_state_are_rendered_off_the_data_path() {
    let a = http_backend("a").await;
    // Thousands of backends: /metrics is megabytes, /api/state about as large.
    let proxy = Proxy::start(&thousands_of_backends(a.addr));
    let api = proxy.handle.admin_addr().expect("admin configured");
    for path in ["/metrics", "/api/state"] {
        // A ticker on this test's one runtime thread measures the longest stall.
        let ticker = StallTicker::start();
        // The answer read raw, so that the client's own work stays small.
        let started = std::time::Instant::now();
        let mut client = HttpClient::connect(api).await;
        client
            .send(
                format!("GET {path} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await;
        let mut answer = Vec::with_capacity(16 << 20);
        tokio::time::timeout(
            PATIENCE,
            tokio::io::AsyncReadExt::read_to_end(&mut client.stream, &mut answer),
        )
        .await
        .expect("an answer in time")
        .expect("read");
        let took = started.elapsed();
        let stalled = ticker.stop().await;
        assert!(answer.starts_with(b"HTTP/1.1 200 "), "{path}");
        assert!(answer.len() > 1 << 20, "{path}: {} bytes", answer.len());
        assert!(
            stalled < took / 2,
            "{path}: traffic stalled {stalled:?} during an answer that took {took:?}"
        );
    }
}

/// A current-thread runtime with one blocking thread, which [`HeldReload`] holds busy.
fn one_blocking_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .build()
        .expect("runtime")
}

/// Lets the runtime's other tasks run as far as they can before they wait.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

/// A reload under way and held where it builds its pools: on a runtime of
/// [`one_blocking_thread`], that thread is kept busy until [`HeldReload::finish`].
struct HeldReload {
    release: std::sync::mpsc::Sender<()>,
    holder: tokio::task::JoinHandle<()>,
    reload:
        tokio::task::JoinHandle<Result<switchyard::server::ReloadSummary, switchyard::ServerError>>,
}

impl HeldReload {
    /// Holds the blocking thread, then starts reloading `proxy` with `text` and lets it run
    /// up to its pools' build.
    async fn start(proxy: &Proxy, text: &str) -> HeldReload {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (busy, started) = tokio::sync::oneshot::channel();
        let holder = tokio::task::spawn_blocking(move || {
            let _ = busy.send(());
            let _ = held.recv();
        });
        started.await.expect("the blocking thread is held");
        let handle = proxy.handle.clone();
        let next =
            switchyard::Config::from_toml(text, std::path::Path::new("test.toml")).expect("valid");
        let reload = tokio::spawn(async move { handle.reload(next).await });
        settle().await;
        HeldReload {
            release,
            holder,
            reload,
        }
    }

    fn is_finished(&self) -> bool {
        self.reload.is_finished()
    }

    /// Frees the blocking thread and waits for the reload, which must succeed.
    async fn finish(self) {
        self.release.send(()).expect("release");
        self.holder.await.expect("holder");
        self.reload.await.expect("reload task").expect("reloads");
    }
}

/// A reload that has passed its checks is not in force until its pools are built; until then
/// the API's changes hold (the old pools are still the ones picking). The test's runtime has one
/// blocking thread, held busy, so the reload waits where it builds its pools.
#[test]
fn api_changes_hold_until_a_reload_is_in_force() {
    one_blocking_thread().block_on(async {
        let a = http_backend("a").await;
        let b = http_backend("b").await;
        let text = config(a.addr, b.addr, "");
        let proxy = Proxy::start(&text);
        let api = proxy.handle.admin_addr().expect("admin configured");
        let web = proxy.addr("web");
        let path = format!("/api/pools/p/backends/{}/disable", a.addr);
        assert_eq!(admin(api, "POST", &path, Some(TOKEN), "").await.status, 200);
        let path = format!("/api/pools/p/backends/{}/weight", b.addr);
        let reply = admin(api, "PUT", &path, Some(TOKEN), "{\"weight\": 3}").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let state_a = proxy.registry.get("p", a.addr).expect("state");
        let state_b = proxy.registry.get("p", b.addr).expect("state");

        // A reload refused (its new listener's address is taken) changes nothing.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let refused = format!(
            "{text}\n[[listeners]]\nname = \"more\"\nbind = \"{}\"\nprotocol = \"tcp\"\npool = \"p\"\n",
            taken.local_addr().expect("addr")
        );
        assert!(proxy.reload(&refused).await.is_err());
        assert!(!state_a.is_usable(), "still disabled");
        assert_eq!(state_b.weight_override(), Some(3));

        // The reload runs up to its pools' build, which waits for the blocking thread.
        let reload = HeldReload::start(&proxy, &text).await;
        assert!(!reload.is_finished());
        assert_eq!(proxy.handle.generation(), 1);
        assert!(!state_a.is_usable(), "still disabled");
        assert_ne!(state_a.overrides(), 0);
        assert_eq!(state_b.weight_override(), Some(3));
        for _ in 0..4 {
            assert_eq!(served_by(web).await, "b");
        }

        reload.finish().await;
        // In force now: the file is in charge again.
        assert_eq!(proxy.handle.generation(), 2);
        assert!(state_a.is_usable());
        assert_eq!(state_a.overrides(), 0);
        assert_eq!(state_b.weight_override(), None);
        let snapshot = proxy.handle.snapshot();
        let pool = snapshot.pool("p").expect("pool");
        assert!(pool.candidates.iter().all(|c| c.weight == 1));
    });
}

/// A client whose request to set `backend`'s weight is in service: its head sent with
/// `Expect: 100-continue` and answered 100, its 13-byte body (`{"weight": 2}`, say) not yet.
async fn weight_awaiting_its_body(api: SocketAddr, backend: SocketAddr) -> HttpClient {
    let mut client = HttpClient::connect(api).await;
    let head = client
        .head_of(
            format!(
                "PUT /api/pools/p/backends/{backend}/weight HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: 13\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
    assert!(head.starts_with("http/1.1 100"), "{head}");
    client
}

#[tokio::test]
async fn clients_that_send_nothing_do_not_keep_a_request_waiting() {
    let (a, _b, _proxy, api) = proxy_and_api().await;
    // One silent client, then as many as the admin listener serves at once, and more.
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(tokio::net::TcpStream::connect(api).await.expect("connect"));
        let reply = tokio::time::timeout(
            std::time::Duration::from_secs(2),
            admin(api, "GET", "/api/state", Some(TOKEN), ""),
        )
        .await
        .expect("answered at once, whoever else is connected and silent");
        assert_eq!(reply.status, 200);
    }
    // A keep-alive client between its requests is idle too, and may be let go for a newcomer;
    // one whose request is in service is not.
    // Its head read, the API asks for its body: the request is in service.
    let mut slow = weight_awaiting_its_body(api, a.addr).await;
    for _ in 0..40 {
        held.push(tokio::net::TcpStream::connect(api).await.expect("connect"));
    }
    let reply = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        admin(api, "GET", "/api/state", Some(TOKEN), ""),
    )
    .await
    .expect("answered at once");
    assert_eq!(reply.status, 200);
    slow.send(b"{\"weight\": 2}").await;
    let reply = slow
        .reply()
        .await
        .expect("the request in service is answered");
    assert_eq!(reply.status, 200, "{}", reply.text());
}

#[tokio::test]
async fn a_request_in_service_when_the_drain_starts_is_answered() {
    let (a, _b, mut proxy, api) = proxy_and_api().await;
    // A weight change whose body is still to come: the request is in service.
    let mut client = weight_awaiting_its_body(api, a.addr).await;
    // A keep-alive client between two requests.
    let mut idle = HttpClient::connect(api).await;
    idle.send(
        format!("GET /api/state HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_eq!(idle.reply().await.expect("an answer").status, 200);
    proxy.shutdown.cancel();
    client.send(b"{\"weight\": 2}").await;
    // Answered, and at once: no configuration is applied any more.
    let reply = client
        .reply()
        .await
        .expect("an answer, not a cut connection");
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.header("connection"), Some("close"));
    let state = proxy.registry.get("p", a.addr).expect("state");
    assert_eq!(state.weight_override(), None);
    // A connection in no request is closed, and the drain is over with the answer.
    assert!(idle.closed().await);
    assert_eq!(proxy.drained().await, 0);
}

/// A weight set while a reload is being applied waits for it, and holds after it: it came
/// after the file.
#[test]
fn a_weight_set_during_a_reload_holds_after_it() {
    one_blocking_thread().block_on(async {
        let a = http_backend("a").await;
        let b = http_backend("b").await;
        let text = config(a.addr, b.addr, "");
        let proxy = Proxy::start(&text);
        let state_b = proxy.registry.get("p", b.addr).expect("state");
        let reload = HeldReload::start(&proxy, &text).await;
        let (handle, state) = (proxy.handle.clone(), Arc::clone(&state_b));
        let weight = tokio::spawn(async move { handle.set_weight("p", &state, 3).await });
        settle().await;
        assert!(!reload.is_finished() && !weight.is_finished());
        reload.finish().await;
        weight.await.expect("weight task").expect("set");
        assert_eq!(state_b.weight_override(), Some(3));
        let snapshot = proxy.handle.snapshot();
        let pool = snapshot.pool("p").expect("pool");
        let weight = pool
            .candidates
            .iter()
            .find(|c| c.state.addr == b.addr)
            .map(|c| c.weight);
        assert_eq!(weight, Some(3));
    });
}

/// A backend disabled through the API while a reload is being applied stays disabled after it.
#[test]
fn a_backend_disabled_during_a_reload_stays_disabled_after_it() {
    one_blocking_thread().block_on(async {
        let a = http_backend("a").await;
        let b = http_backend("b").await;
        let text = config(a.addr, b.addr, "");
        let proxy = Proxy::start(&text);
        let api = proxy.handle.admin_addr().expect("admin configured");
        let web = proxy.addr("web");
        let reload = HeldReload::start(&proxy, &text).await;
        let path = format!("/api/pools/p/backends/{}/disable", a.addr);
        let disable = tokio::spawn(async move { admin(api, "POST", &path, Some(TOKEN), "").await });
        settle().await;
        reload.finish().await;
        assert_eq!(disable.await.expect("disable task").status, 200);
        let state = proxy.registry.get("p", a.addr).expect("state");
        assert!(!state.is_usable(), "disabled after the reload");
        for _ in 0..4 {
            assert_eq!(served_by(web).await, "b");
        }
    });
}

/// A tcp connection still open when a shutdown's drain deadline passes is closed as a backend's
/// drain deadline closes one, and logged so, as a udp session cut there is: the log has a line
/// for every connection, not only those that ended before the deadline.
#[tokio::test]
async fn a_tcp_connection_the_shutdown_deadline_cuts_has_its_line() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = Backend::echo().await;
    let dir = temp_dir_for("tcplog-deadline");
    let log = dir.join("tcp.log");
    let mut proxy = Proxy::start(&format!(
        "[global]\ndrain_timeout = \"200ms\"\n[[listeners]]\nname = \"l4\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"e\"\naccess_log = {{ path = \"{}\" }}\n[pools.e]\nbackends = [\"{}\"]\n",
        log.display(),
        echo.addr
    ));
    let mut stream = tokio::net::TcpStream::connect(proxy.addr("l4"))
        .await
        .expect("connect");
    stream.write_all(b"hello").await.expect("write");
    let mut back = [0u8; 5];
    stream.read_exact(&mut back).await.expect("echo");
    proxy.shutdown.cancel();
    assert_eq!(proxy.drained().await, 1, "the deadline cut the connection");
    let line = &json_lines(&log, 1).await[0];
    assert_eq!(line["protocol"], "tcp");
    assert_eq!(line["bytes_sent"], 5);
    assert_eq!(line["bytes_received"], 5);
    assert_eq!(line["outcome"], "drained");
    // The client is told: its connection ends rather than hanging open.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the connection was closed");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A request still waiting for its answer when a shutdown's drain deadline passes is answered
/// 504, as at a backend's drain deadline, and logged, rather than dropped without a word.
#[tokio::test]
async fn a_request_the_shutdown_deadline_cuts_is_answered_and_logged() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let backend = silent.local_addr().expect("addr");
    let dir = temp_dir_for("httplog-deadline");
    let log = dir.join("http.log");
    let mut proxy = Proxy::start(&format!(
        "[global]\ndrain_timeout = \"200ms\"\n[[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"s\"\naccess_log = {{ path = \"{}\" }}\n[pools.s]\nbackends = [\"{backend}\"]\n",
        log.display()
    ));
    let mut client = HttpClient::connect(proxy.addr("web")).await;
    client.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    // The backend takes the request and never answers.
    let (_held, _) = tokio::time::timeout(PATIENCE, silent.accept())
        .await
        .expect("the request reached the backend")
        .expect("accept");
    proxy.shutdown.cancel();
    let reply = client.reply().await.expect("an answer");
    assert_eq!(reply.status, 504);
    proxy.drained().await;
    let line = &json_lines(&log, 1).await[0];
    assert_eq!(line["status"], 504);
    let _ = std::fs::remove_dir_all(&dir);
}
