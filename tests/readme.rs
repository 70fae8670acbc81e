//! The README's promises, checked: its configuration reference names exactly the keys the parser
//! accepts, table by table, with the code's defaults and the protocols that take them; the
//! quick start's demo routes as its table says and does what every command it prints says; and
//! the examples it lists, its sample of `check` output and its table of metrics are what the
//! code has.
//!
//! The parser refuses unknown keys, and its error lists every key the table takes ("unknown
//! field `x`, expected one of `a`, `b`"). Each test case provokes that error in one table and
//! compares the list with the keys the README documents for that table, so a key added without
//! its documentation, or documented but refused, fails here by name.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use common::*;
use switchyard::Config;
use tokio::io::{AsyncBufReadExt, BufReader};

const README: &str = include_str!("../README.md");

/// A key no table takes, to provoke the parser's list of the keys it does take.
const UNKNOWN: &str = "zz_not_a_key";

/// The keys the parser accepts at the `zz_not_a_key` that `text` holds, with the path at which
/// it reported it.
fn accepted_keys(text: &str) -> (String, BTreeSet<String>) {
    let error = match Config::from_toml(text, Path::new("probe.toml")) {
        Ok(_) => panic!("`{UNKNOWN}` was accepted in:\n{text}"),
        Err(error) => error,
    };
    let problems = error.problems();
    let [problem] = problems.as_slice() else {
        panic!("expected one problem for:\n{text}\ngot {problems:#?}");
    };
    let Some((_, expected)) = problem.reason.split_once("expected") else {
        panic!("not an unknown-key error: {problem:?}");
    };
    (
        problem.path.clone(),
        backticked(expected).into_iter().collect(),
    )
}

/// The spans between backticks in `text`.
fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The lines of the README section under the heading line `heading`, up to the next heading.
fn section(heading: &str) -> Vec<&'static str> {
    let mut lines = README.lines();
    assert!(
        lines.any(|line| line == heading),
        "README has no heading `{heading}`"
    );
    let mut in_code = false;
    lines
        .take_while(|line| {
            if line.starts_with("```") {
                in_code = !in_code;
            }
            in_code || !line.starts_with('#')
        })
        .collect()
}

/// The cells of every body row of the tables in `lines` (header and rule rows left out).
fn rows(lines: &[&str]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in lines {
        let Some(inner) = line.trim().strip_prefix('|') else {
            in_table = false;
            continue;
        };
        let cells: Vec<String> = inner
            .trim_end_matches('|')
            .split('|')
            .map(|cell| cell.trim().to_owned())
            .collect();
        // The first row of a table is its header; the second is the `---` rule.
        if !in_table {
            in_table = true;
            continue;
        }
        if cells
            .iter()
            .all(|c| c.chars().all(|ch| ch == '-' || ch == ':'))
        {
            continue;
        }
        rows.push(cells);
    }
    rows
}

/// The keys in the first column of the tables under `heading` that start with `prefix` and name
/// no deeper table (`match.path` under the prefix `match.`; `pool` under the prefix ``).
fn documented_keys(heading: &str, prefix: &str) -> BTreeSet<String> {
    let keys: BTreeSet<String> = rows(&section(heading))
        .iter()
        .flat_map(|row| backticked(&row[0]))
        .filter_map(|key| key.strip_prefix(prefix).map(str::to_owned))
        .filter(|key| !key.contains('.'))
        .collect();
    assert!(
        !keys.is_empty(),
        "no keys `{prefix}…` documented under `{heading}`"
    );
    keys
}

/// The keys of the inline tables (`{ a = 1, b }`) written in the second column (type or form)
/// of the row for `key` under `heading`: every key any of its forms names.
fn documented_form(heading: &str, key: &str) -> BTreeSet<String> {
    let rows = rows(&section(heading));
    let Some(row) = rows.iter().find(|row| backticked(&row[0]) == [key]) else {
        panic!("no row for `{key}` under `{heading}`");
    };
    let keys: BTreeSet<String> = backticked(&row[1])
        .iter()
        .flat_map(|form| inline_table_keys(form))
        .collect();
    assert!(
        !keys.is_empty(),
        "the row for `{key}` under `{heading}` shows no `{{ … }}` form"
    );
    keys
}

/// The keys of the inline tables in `form`, at any depth of arrays but not inside another
/// table's values: `add` and `set` in `{ add = { NAME = "v" }, set = { ... } }`, `pool` and
/// `weight` in `[{ pool, weight }]`. A key is a word right after the `{` or a `,` of a table.
fn inline_table_keys(form: &str) -> Vec<String> {
    /// Whether the innermost open bracket is a table that sits in no other table.
    fn in_outer_table(open: &[char]) -> bool {
        open.last() == Some(&'{') && open.iter().filter(|&&c| c == '{').count() == 1
    }
    let mut keys = Vec::new();
    let mut open: Vec<char> = Vec::new();
    let mut key_next = false;
    let mut word = String::new();
    let mut chars = form.chars();
    while let Some(c) = chars.next() {
        if key_next && (c.is_ascii_alphanumeric() || c == '_') {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            keys.push(std::mem::take(&mut word));
            key_next = false;
        }
        match c {
            // A string: nothing in it is a key, whatever braces it holds.
            '"' => {
                for c in chars.by_ref() {
                    if c == '"' {
                        break;
                    }
                }
            }
            '{' | '[' => {
                open.push(c);
                key_next = in_outer_table(&open);
            }
            '}' | ']' => {
                open.pop();
                key_next = false;
            }
            ',' => key_next = in_outer_table(&open),
            // Spaces before a key keep it expected.
            c if c.is_whitespace() => {}
            _ => key_next = false,
        }
    }
    keys
}

/// One table of the file: a configuration that puts [`UNKNOWN`] in it, the path at which the
/// parser must report it, and the keys the README documents for it.
struct Case {
    table: &'static str,
    text: String,
    path: String,
    documented: BTreeSet<String>,
}

/// The top-level keys: the `### `[…]`` headings of the Configuration section.
fn documented_top_level() -> BTreeSet<String> {
    let mut in_configuration = false;
    let mut keys = BTreeSet::new();
    for line in README.lines() {
        if line.starts_with("## ") {
            in_configuration = line == "## Configuration";
        }
        if let Some(heading) = line.strip_prefix("### ")
            && in_configuration
        {
            for table in backticked(heading) {
                let name = table.trim_matches(|c| c == '[' || c == ']');
                let name = name.split('.').next().unwrap_or(name);
                keys.insert(name.to_owned());
            }
        }
    }
    keys
}

fn cases() -> Vec<Case> {
    let listeners = "### `[[listeners]]`";
    let routes = "#### Routes";
    let rules = "#### Modification rules";
    let tls = "#### TLS";
    let pools = "### `[pools.NAME]`";
    let in_listener = |table: &str| format!("[[listeners]]\n{table}\n");
    let in_route = |line: &str| format!("[[listeners]]\n[[listeners.routes]]\n{line}\n");
    let in_pool = |line: &str| format!("[pools.p]\n{line}\n");
    let z = UNKNOWN;
    let mut cases = vec![
        Case {
            table: "the top level",
            text: format!("{z} = 1\n"),
            path: "".to_owned(),
            documented: documented_top_level(),
        },
        Case {
            table: "[global]",
            text: format!("[global]\n{z} = 1\n"),
            path: "global.".to_owned(),
            documented: documented_keys("### `[global]`", ""),
        },
        Case {
            table: "[admin]",
            text: format!("[admin]\n{z} = 1\n"),
            path: "admin.".to_owned(),
            documented: documented_keys("### `[admin]`", ""),
        },
        Case {
            table: "[[listeners]]",
            text: in_listener(&format!("{z} = 1")),
            path: "listeners[0].".to_owned(),
            documented: documented_keys(listeners, ""),
        },
        Case {
            table: "a listener's access_log",
            text: in_listener(&format!("access_log = {{ {z} = 1 }}")),
            path: "listeners[0].access_log.".to_owned(),
            documented: documented_form(listeners, "access_log"),
        },
        Case {
            table: "a listener's sni_routes",
            text: in_listener(&format!("sni_routes = [{{ {z} = 1 }}]")),
            path: "listeners[0].sni_routes[0].".to_owned(),
            documented: documented_form(listeners, "sni_routes"),
        },
        Case {
            table: "a listener's tls",
            text: in_listener(&format!("tls = {{ {z} = 1 }}")),
            path: "listeners[0].tls.".to_owned(),
            documented: documented_keys(tls, "tls."),
        },
        Case {
            table: "a listener's tls.certificates",
            text: in_listener(&format!("tls = {{ certificates = [{{ {z} = 1 }}] }}")),
            path: "listeners[0].tls.certificates[0].".to_owned(),
            documented: documented_form(tls, "tls.certificates"),
        },
        Case {
            table: "[[listeners.routes]]",
            text: in_route(&format!("{z} = 1")),
            path: "listeners[0].routes[0].".to_owned(),
            documented: documented_keys(routes, ""),
        },
        Case {
            table: "a route's match",
            text: in_route(&format!("match = {{ {z} = 1 }}")),
            path: "listeners[0].routes[0].match.".to_owned(),
            documented: documented_keys(routes, "match."),
        },
        Case {
            table: "a route's match.header",
            text: in_route(&format!("match = {{ header = {{ {z} = 1 }} }}")),
            path: "listeners[0].routes[0].match.header.".to_owned(),
            documented: documented_form(routes, "match.header"),
        },
        Case {
            table: "a route's match.query",
            text: in_route(&format!("match = {{ query = {{ {z} = 1 }} }}")),
            path: "listeners[0].routes[0].match.query.".to_owned(),
            documented: documented_form(routes, "match.query"),
        },
        Case {
            table: "a route's match.cookie",
            text: in_route(&format!("match = {{ cookie = {{ {z} = 1 }} }}")),
            path: "listeners[0].routes[0].match.cookie.".to_owned(),
            documented: documented_form(routes, "match.cookie"),
        },
        Case {
            table: "a route's pools",
            text: in_route(&format!("pools = [{{ {z} = 1 }}]")),
            path: "listeners[0].routes[0].pools[0].".to_owned(),
            documented: documented_form(routes, "pools"),
        },
        Case {
            table: "[pools.NAME]",
            text: in_pool(&format!("{z} = 1")),
            path: "pools.p.".to_owned(),
            documented: documented_keys(pools, ""),
        },
        Case {
            table: "a pool's backends",
            text: in_pool(&format!("backends = [{{ {z} = 1 }}]")),
            path: "pools.p.backends[0].".to_owned(),
            documented: documented_keys("#### Backend keys", ""),
        },
        Case {
            table: "a pool's health",
            text: in_pool(&format!("health = {{ {z} = 1 }}")),
            path: "pools.p.health.".to_owned(),
            documented: documented_keys("#### Health checks", ""),
        },
    ];
    // A rate limit takes the same keys on a listener and on a route, and its form is in both
    // tables as well as in its own section.
    let limits = "#### Rate limits";
    for (text, path, heading) in [
        (
            in_listener(&format!("rate_limit = {{ {z} = 1 }}")),
            "listeners[0].rate_limit.",
            listeners,
        ),
        (
            in_route(&format!("rate_limit = {{ {z} = 1 }}")),
            "listeners[0].routes[0].rate_limit.",
            routes,
        ),
    ] {
        cases.push(Case {
            table: "rate_limit",
            text: text.clone(),
            path: path.to_owned(),
            documented: documented_keys(limits, ""),
        });
        cases.push(Case {
            table: "rate_limit, as its row writes it",
            text,
            path: path.to_owned(),
            documented: documented_form(heading, "rate_limit"),
        });
    }
    cases.push(Case {
        table: "a rate limit's key",
        text: in_listener(&format!("rate_limit = {{ key = {{ {z} = 1 }} }}")),
        path: "listeners[0].rate_limit.key.".to_owned(),
        documented: documented_form(limits, "key"),
    });
    for key in ["sticky", "outlier", "queue", "retry", "tls"] {
        cases.push(Case {
            table: key,
            text: in_pool(&format!("{key} = {{ {z} = 1 }}")),
            path: format!("pools.p.{key}."),
            documented: documented_form(pools, key),
        });
    }
    // The modification rules take the same keys on a listener and on a route.
    for key in [
        "request_headers",
        "response_headers",
        "rewrite",
        "redirect",
        "compression",
    ] {
        let line = format!("{key} = {{ {z} = 1 }}");
        // `response_headers` is written "same form" as `request_headers`.
        let form = match key {
            "response_headers" => "request_headers",
            key => key,
        };
        cases.push(Case {
            table: key,
            text: in_listener(&line),
            path: format!("listeners[0].{key}."),
            documented: documented_form(rules, form),
        });
        cases.push(Case {
            table: key,
            text: in_route(&line),
            path: format!("listeners[0].routes[0].{key}."),
            documented: documented_form(rules, form),
        });
    }
    cases
}

#[test]
fn the_configuration_reference_names_every_key_the_parser_takes_and_no_other() {
    let mut wrong = Vec::new();
    for case in cases() {
        let (path, accepted) = accepted_keys(&case.text);
        assert_eq!(
            path,
            format!("{}{UNKNOWN}", case.path),
            "{}: the probe landed elsewhere",
            case.table
        );
        let undocumented: Vec<_> = accepted.difference(&case.documented).collect();
        let refused: Vec<_> = case.documented.difference(&accepted).collect();
        if !undocumented.is_empty() {
            wrong.push(format!(
                "{} ({}): accepted but not in the README: {undocumented:?}",
                case.table, case.path
            ));
        }
        if !refused.is_empty() {
            wrong.push(format!(
                "{} ({}): in the README but refused: {refused:?}",
                case.table, case.path
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Every modification rule the listener and route tables point to is described under
/// "Modification rules", and that section describes no other.
#[test]
fn the_modification_rules_section_covers_the_rule_keys_of_listeners_and_routes() {
    let described = documented_keys("#### Modification rules", "");
    for heading in ["### `[[listeners]]`", "#### Routes"] {
        let pointed: BTreeSet<String> = rows(&section(heading))
            .into_iter()
            .filter(|row| row.iter().any(|c| c.contains("(#modification-rules)")))
            .flat_map(|row| backticked(&row[0]))
            .collect();
        assert_eq!(pointed, described, "{heading}");
    }
}

/// A `switchyard demo` on free ports and the help it printed; killed when dropped.
struct Demo {
    _child: tokio::process::Child,
    help: Vec<String>,
}

async fn start_demo() -> Demo {
    let mut child = tokio::process::Command::new(BIN)
        .args(["demo", "--any-port", "--log-level", "warn"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut help = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.expect("read") {
            let done = line.starts_with("Press Ctrl-C");
            help.push(line);
            if done {
                return;
            }
        }
        panic!("the demo ended its help early: {help:#?}");
    })
    .await
    .expect("help printed");
    Demo {
        _child: child,
        help,
    }
}

/// `line` split into words as a shell would, for the simple quoting the demo prints.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                word.get_or_insert_with(String::new);
            }
            c if c.is_whitespace() && !quoted => words.extend(word.take()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

/// What a request sent as `curl` would send it gets back: its status and body.
async fn http_request(addr: SocketAddr, path: &str, headers: &[String]) -> (u16, String) {
    let mut head = format!("GET {path} HTTP/1.1\r\n");
    if !headers
        .iter()
        .any(|h| h.to_ascii_lowercase().starts_with("host:"))
    {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for header in headers {
        head.push_str(&format!("{header}\r\n"));
    }
    head.push_str("\r\n");
    let mut client = HttpClient::connect(addr).await;
    client.send(head.as_bytes()).await;
    let reply = client.reply().await.expect("a reply");
    (reply.status, reply.text())
}

/// The names in a hint such as `web-1, web-2` or `tcp-backend-1..3`.
fn backend_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for word in text.split(|c: char| c.is_whitespace() || "(),:".contains(c)) {
        if let Some((stem, last)) = word.split_once("..") {
            let (prefix, first) = stem.rsplit_once('-').expect("a range like name-1..3");
            let first: u32 = first.parse().expect("a number");
            let last: u32 = last.parse().expect("a number");
            names.extend((first..=last).map(|i| format!("{prefix}-{i}")));
        } else if word
            .rsplit_once('-')
            .is_some_and(|(_, n)| n.parse::<u32>().is_ok())
        {
            names.insert(word.to_owned());
        }
    }
    names
}

/// Sends requests until every backend of `expected` answered, with at most three rounds of
/// them; every answer must come from one of them.
async fn answered_by<F, Fut>(what: &str, expected: &BTreeSet<String>, mut ask: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let mut seen = BTreeSet::new();
    for _ in 0..3 * expected.len() {
        let name = ask().await;
        assert!(
            expected.contains(&name),
            "{what}: answered by {name}, not one of {expected:?}"
        );
        seen.insert(name);
        if &seen == expected {
            return;
        }
    }
    panic!("{what}: only {seen:?} of {expected:?} answered");
}

/// Every command the demo prints works and shows what its comment says: the pool (and its
/// backends) answering, or the status.
#[tokio::test]
async fn every_command_the_demo_prints_does_what_its_comment_says() {
    let demo = start_demo().await;
    let mut tried = 0;
    for (i, line) in demo.help.iter().enumerate() {
        let line = line.trim();
        if !line.starts_with("curl ") && !line.starts_with("echo ") {
            continue;
        }
        // The comment is on the line, or alone on the next one.
        let (command, comment) = match line.split_once(" # ") {
            Some((command, comment)) => (command.trim(), comment.trim()),
            None => (
                line,
                demo.help
                    .get(i + 1)
                    .and_then(|next| next.trim().strip_prefix("# "))
                    .unwrap_or_else(|| panic!("no comment says what `{line}` shows")),
            ),
        };
        let words = shell_words(command);
        let target = words.iter().find(|w| w.contains("://")).map(String::as_str);
        let expected = backend_names(comment);
        match target {
            Some(url) if url.starts_with("http://") => {
                let rest = &url["http://".len()..];
                let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
                let addr: SocketAddr = authority.parse().expect("an address");
                let path = if path.is_empty() { "/" } else { path };
                let headers: Vec<String> = words
                    .windows(2)
                    .filter(|w| w[0] == "-H")
                    .map(|w| w[1].clone())
                    .collect();
                if let Some(status) = comment.strip_prefix("ambiguous framing: ") {
                    let (got, _) = http_request(addr, path, &headers).await;
                    assert_eq!(got.to_string(), status, "`{command}`");
                } else {
                    // "web pool (web-1, web-2)"; a pool of one backend lists none: NAME-1.
                    let pool = comment.split(' ').next().expect("a pool");
                    let expected = if expected.is_empty() {
                        BTreeSet::from([format!("{pool}-1")])
                    } else {
                        expected
                    };
                    answered_by(command, &expected, || async {
                        let (status, body) = http_request(addr, path, &headers).await;
                        assert_eq!(status, 200, "`{command}`: {body}");
                        let name = body.trim().strip_prefix("hello from ");
                        name.unwrap_or_else(|| panic!("`{command}`: {body}"))
                            .to_owned()
                    })
                    .await;
                }
            }
            Some(url) if url.starts_with("telnet://") => {
                let addr: SocketAddr = url["telnet://".len()..].parse().expect("an address");
                answered_by(command, &expected, || async move {
                    let line = first_line(addr).await;
                    line.strip_prefix("hello from ")
                        .unwrap_or_else(|| panic!("`{command}`: {line}"))
                        .to_owned()
                })
                .await;
            }
            _ => {
                // `echo hello | nc -u -w1 IP PORT`
                let at = words.iter().position(|w| w == "-u").expect("nc -u");
                let ip = words.iter().skip(at + 1).find(|w| !w.starts_with('-'));
                let addr: SocketAddr =
                    format!("{}:{}", ip.expect("an ip"), words.last().expect("a port"))
                        .parse()
                        .expect("an address");
                answered_by(command, &expected, || async move {
                    // nc uses a new port each time: a new session.
                    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
                        .await
                        .expect("bind");
                    socket.send_to(b"hello\n", addr).await.expect("send");
                    let mut buf = [0u8; 256];
                    let n = tokio::time::timeout(PATIENCE, socket.recv(&mut buf))
                        .await
                        .expect("an answer in time")
                        .expect("recv");
                    let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let (name, echoed) = answer.split_once(": ").expect("NAME: datagram");
                    assert_eq!(echoed, "hello\n");
                    name.to_owned()
                })
                .await;
            }
        }
        tried += 1;
    }
    assert!(
        tried >= 8,
        "only {tried} commands found in {:#?}",
        demo.help
    );
}

/// The demo routes as the README's quick-start table says, to the backends it names.
#[tokio::test]
async fn the_demo_routes_as_the_quick_start_table_says() {
    let demo = start_demo().await;
    let http: SocketAddr = demo
        .help
        .iter()
        .find_map(|line| line.strip_prefix("Layer 7, http-demo on "))
        .and_then(|rest| {
            rest.split(':')
                .take(2)
                .collect::<Vec<_>>()
                .join(":")
                .parse()
                .ok()
        })
        .expect("the http address printed");
    let table = rows(&section("## Quick start"));
    assert!(table.len() >= 5, "{table:#?}");
    for row in table {
        let (request, pool) = (&row[0], &row[1]);
        let code = backticked(request);
        let (path, headers) = if let Some(prefix) = request.strip_prefix("path starts with ") {
            (format!("{}x", backticked(prefix)[0]), vec![])
        } else if request == "anything else" {
            ("/".to_owned(), vec![])
        } else if let [field] = code.as_slice() {
            // `Host: admin.*`, or header `X-API-Version: v2`
            let field = field.replace(".*", ".example.com");
            ("/".to_owned(), vec![field])
        } else {
            panic!("a request the test cannot make: {request}")
        };
        let name = &backticked(pool)[0];
        let mut expected = backend_names(pool);
        if expected.is_empty() {
            expected.insert(format!("{name}-1"));
        }
        answered_by(request, &expected, || async {
            let (status, body) = http_request(http, &path, &headers).await;
            assert_eq!(status, 200, "{request}: {body}");
            body.trim()
                .strip_prefix("hello from ")
                .unwrap_or_else(|| panic!("{request}: {body}"))
                .to_owned()
        })
        .await;
    }
}

/// The README's list of examples is the `examples/` directory: no file missing from the list,
/// none listed that is not there. (`tests/cli.rs` runs `check` on each.)
#[test]
fn the_examples_section_lists_every_example_and_no_other() {
    let listed: BTreeSet<String> = section("## Examples")
        .iter()
        .filter_map(|line| line.strip_prefix("- [`"))
        .filter_map(|rest| rest.split_once('`').map(|(name, _)| name.to_owned()))
        .collect();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let present: BTreeSet<String> = std::fs::read_dir(&dir)
        .expect("examples/")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".toml"))
        .collect();
    assert_eq!(listed, present);
}

/// A value of `key` that a listener of a protocol that takes it accepts, with the keys it needs
/// beside it unless `alone`.
fn listener_key_probe(key: &str, alone: bool) -> String {
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/certs");
    let value = match key {
        "name" => "\"n\"",
        "bind" => "\"127.0.0.1:0\"",
        "protocol" => "\"tcp\"",
        "pool" | "default_pool" => "\"p\"",
        "routes" => "[{ match = { path = \"/\" }, pool = \"p\" }]",
        "max_connections" | "max_sessions" | "max_body_size" => "10",
        "idle_timeout" | "client_header_timeout" | "keepalive_timeout" | "park_idle_after" => {
            "\"1s\""
        }
        "splice" | "forwarded_header" | "abort_on_close" => "true",
        "trusted_proxies" if alone => "[\"10.0.0.0/8\"]",
        "proxy_protocol_timeout" | "client_hello_timeout" if alone => "\"1s\"",
        "proxy_protocol" | "trusted_proxies" | "proxy_protocol_timeout" => {
            return format!(
                "proxy_protocol = \"v1\"\ntrusted_proxies = [\"10.0.0.0/8\"]\n{}",
                if key == "proxy_protocol_timeout" {
                    "proxy_protocol_timeout = \"1s\"\n"
                } else {
                    ""
                }
            );
        }
        "request_headers" | "response_headers" => "{ add = { X-A = \"b\" } }",
        "rewrite" => "{ add_prefix = \"/v\" }",
        "host_rewrite" => "\"a.example\"",
        "redirect" => "{ to = \"https://a.example{path}\" }",
        "cookie_flags" => "[\"Secure\"]",
        "allow" | "deny" => "[\"10.0.0.0/8\"]",
        "compression" => "{}",
        "access_log" => "{ path = \"stderr\" }",
        "rate_limit" => "{ rate = 1 }",
        "tls" => {
            return format!(
                "tls = {{ certificates = [{{ cert = {:?}, key = {:?} }}] }}\n",
                certs.join("example.com.pem"),
                certs.join("example.com.key")
            );
        }
        "sni_routes" | "client_hello_timeout" => {
            return format!(
                "sni_routes = [{{ sni = \"a.example\", pool = \"p\" }}]\n{}",
                if key == "client_hello_timeout" {
                    "client_hello_timeout = \"1s\"\n"
                } else {
                    ""
                }
            );
        }
        other => panic!("the test has no value for the listener key `{other}`: add one"),
    };
    format!("{key} = {value}\n")
}

/// Whether a listener of `protocol` that also holds `probe` is refused at `key` (at the key or
/// inside it), with every problem found.
fn refused_at(protocol: &str, key: &str, probe: &str) -> (bool, Vec<String>) {
    let base = match protocol {
        "http" => {
            "name = \"l\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n"
                .to_owned()
        }
        _ => format!(
            "name = \"l\"\nbind = \"127.0.0.1:0\"\nprotocol = \"{protocol}\"\npool = \"p\"\n"
        ),
    };
    // A key the listener already has is not written twice.
    let probe = if base
        .lines()
        .any(|line| line.starts_with(&format!("{key} = ")))
    {
        ""
    } else {
        probe
    };
    let text = format!("[[listeners]]\n{base}{probe}\n[pools.p]\nbackends = [\"127.0.0.1:1\"]\n");
    let problems: Vec<String> = match Config::from_toml(&text, Path::new("probe.toml")) {
        Ok(_) => Vec::new(),
        Err(error) => error
            .problems()
            .into_iter()
            .map(|p| format!("{}: {}", p.path, p.reason))
            .collect(),
    };
    let at = format!("listeners[0].{key}");
    let refused = problems.iter().any(|p| {
        p.strip_prefix(&at).is_some_and(|rest| {
            rest.starts_with(':') || rest.starts_with('.') || rest.starts_with('[')
        })
    });
    (refused, problems)
}

/// The ✓ and ✗ of the listener table hold: a key marked ✗ for a protocol is refused on a
/// listener of that protocol, at that key; one marked ✓ is taken there; one marked "with
/// `other`" is taken with the other key and refused without it.
#[test]
fn the_listener_table_says_which_protocols_take_each_key() {
    let table = rows(&section("### `[[listeners]]`"));
    assert!(table.len() > 20, "{table:#?}");
    let mut wrong = Vec::new();
    for row in &table {
        for (column, protocol) in [(3, "tcp"), (4, "udp"), (5, "http")] {
            let mark = row[column].as_str();
            for key in backticked(&row[0]) {
                let with = listener_key_probe(&key, false);
                let alone = listener_key_probe(&key, true);
                let (taken, refused) = match mark {
                    // `protocol` itself: no mark.
                    "" => continue,
                    "✓" => (Some(&with), None),
                    "✗" => (None, Some(&alone)),
                    m if m.starts_with("with ") => (Some(&with), Some(&alone)),
                    m => {
                        wrong.push(format!("`{key}`: the test cannot read the mark `{m}`"));
                        continue;
                    }
                };
                if let Some(probe) = taken
                    && let (true, problems) = refused_at(protocol, &key, probe)
                {
                    wrong.push(format!(
                        "`{key}` is marked {mark} for {protocol} but refused: {problems:?}"
                    ));
                }
                if let Some(probe) = refused
                    && let (false, problems) = refused_at(protocol, &key, probe)
                {
                    wrong.push(format!(
                        "`{key}` is marked {mark} for {protocol} but taken alone: {problems:?}"
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The pool table's "http." and "tcp and http." hold: such a key is refused on a pool that only
/// listeners of the other protocols use, and taken on one a listener of those protocols uses.
#[test]
fn the_pool_table_says_which_listeners_a_key_is_for() {
    let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/certs/ca.pem");
    let table = rows(&section("### `[pools.NAME]`"));
    let mut wrong = Vec::new();
    let mut checked = 0;
    for row in &table {
        let meaning = row.last().expect("a meaning");
        let for_protocols: &[&str] = if meaning.starts_with("http.") {
            &["http"]
        } else if meaning.starts_with("tcp and http.") {
            &["tcp", "http"]
        } else {
            continue;
        };
        let [key] = backticked(&row[0]).try_into().expect("one key a row");
        let value = match key.as_str() {
            "sticky" => "{ cookie = \"S\" }".to_owned(),
            "queue" => "{ size = 1 }".to_owned(),
            "retry" => "{ on = [\"503\"] }".to_owned(),
            "connect_timeout" | "response_timeout" | "keepalive_timeout" => "\"1s\"".to_owned(),
            "connect_attempts" | "keepalive_connections" => "1".to_owned(),
            "upstream_protocol" => "\"h2\"".to_owned(),
            "tls" => format!("{{ ca = {ca:?} }}"),
            "send_proxy_protocol" => "\"v1\"".to_owned(),
            other => panic!("the test has no value for the pool key `{other}`: add one"),
        };
        for protocol in ["tcp", "udp", "http"] {
            let pool = match protocol {
                "http" => "default_pool = \"p\"",
                _ => "pool = \"p\"",
            };
            let text = format!(
                "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nprotocol = \"{protocol}\"\n\
                 {pool}\n\n[pools.p]\nbackends = [{{ address = \"127.0.0.1:1\", \
                 max_connections = 1 }}]\n{key} = {value}\n"
            );
            let problems: Vec<String> = match Config::from_toml(&text, Path::new("probe.toml")) {
                Ok(_) => Vec::new(),
                Err(error) => error
                    .problems()
                    .into_iter()
                    .map(|p| format!("{}: {}", p.path, p.reason))
                    .collect(),
            };
            let meant = for_protocols.contains(&protocol);
            if meant && !problems.is_empty() {
                wrong.push(format!(
                    "`{key}` is for {protocol} but refused: {problems:?}"
                ));
            } else if !meant && problems.is_empty() {
                wrong.push(format!("`{key}` is not for {protocol} but taken"));
            }
            checked += 1;
        }
    }
    assert!(checked >= 24, "only {checked} probes");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// A default as the code holds it.
enum DefaultValue {
    Duration(std::time::Duration),
    Number(u64),
    Bool(bool),
}

/// The defaults the README's tables give are the code's `DEFAULT_*` values.
#[test]
fn every_default_the_reference_gives_is_the_code_s() {
    use DefaultValue::*;
    use switchyard::config::*;
    let n = |v: usize| Number(v as u64);
    let listeners = "### `[[listeners]]`";
    let pools = "### `[pools.NAME]`";
    let health = "#### Health checks";
    let cases = [
        (
            "### `[global]`",
            "drain_timeout",
            Duration(DEFAULT_DRAIN_TIMEOUT),
        ),
        (listeners, "max_connections", n(DEFAULT_MAX_CONNECTIONS)),
        (listeners, "max_sessions", n(DEFAULT_MAX_SESSIONS)),
        (listeners, "splice", Bool(DEFAULT_SPLICE)),
        (
            listeners,
            "proxy_protocol_timeout",
            Duration(DEFAULT_PROXY_PROTOCOL_TIMEOUT),
        ),
        (
            listeners,
            "client_header_timeout",
            Duration(DEFAULT_CLIENT_HEADER_TIMEOUT),
        ),
        (
            listeners,
            "keepalive_timeout",
            Duration(DEFAULT_KEEPALIVE_TIMEOUT),
        ),
        (
            listeners,
            "park_idle_after",
            Duration(DEFAULT_PARK_IDLE_AFTER),
        ),
        (
            listeners,
            "client_hello_timeout",
            Duration(DEFAULT_CLIENT_HELLO_TIMEOUT),
        ),
        (
            "#### TLS",
            "tls.handshake_timeout",
            Duration(DEFAULT_TLS_HANDSHAKE_TIMEOUT),
        ),
        (pools, "maglev_table_size", n(DEFAULT_MAGLEV_TABLE_SIZE)),
        (pools, "ring_vnodes", Number(DEFAULT_RING_VNODES.into())),
        (
            pools,
            "drain_timeout",
            Duration(DEFAULT_BACKEND_DRAIN_TIMEOUT),
        ),
        (pools, "connect_timeout", Duration(DEFAULT_CONNECT_TIMEOUT)),
        (pools, "connect_attempts", n(DEFAULT_CONNECT_ATTEMPTS)),
        (
            pools,
            "response_timeout",
            Duration(DEFAULT_RESPONSE_TIMEOUT),
        ),
        (
            pools,
            "keepalive_connections",
            n(DEFAULT_KEEPALIVE_CONNECTIONS),
        ),
        (
            pools,
            "keepalive_timeout",
            Duration(DEFAULT_UPSTREAM_KEEPALIVE_TIMEOUT),
        ),
        (health, "interval", Duration(DEFAULT_HEALTH_INTERVAL)),
        (health, "timeout", Duration(DEFAULT_HEALTH_TIMEOUT)),
        (health, "rise", Number(DEFAULT_HEALTH_RISE.into())),
        (health, "fall", Number(DEFAULT_HEALTH_FALL.into())),
        ("#### Rate limits", "per", Duration(DEFAULT_RATE_LIMIT_PER)),
    ];
    let mut wrong = Vec::new();
    for (heading, key, expected) in cases {
        let rows = rows(&section(heading));
        let header = README
            .lines()
            .skip_while(|line| *line != heading)
            .find(|line| line.starts_with("| key"))
            .expect("a table");
        let column = header
            .trim_matches('|')
            .split('|')
            .position(|cell| cell.trim() == "default")
            .expect("a default column");
        let Some(row) = rows.iter().find(|row| backticked(&row[0]) == [key]) else {
            panic!("no row for `{key}` under `{heading}`");
        };
        // The first value written: `"30s"`, `10000`, `true` (a note may follow it).
        let cell = &row[column];
        let written = backticked(cell).into_iter().next().unwrap_or_default();
        let written = written.trim_matches('"');
        let holds = match &expected {
            Duration(d) => parse_duration(written).is_ok_and(|w| w == *d),
            Number(v) => written.parse::<u64>().is_ok_and(|w| w == *v),
            Bool(b) => written.parse::<bool>().is_ok_and(|w| w == *b),
        };
        if !holds {
            wrong.push(format!("{heading} `{key}`: the README says {cell}"));
        }
    }
    // The forms that show their defaults.
    for (key, expected) in [
        (
            "consecutive_failures",
            Number(DEFAULT_CONSECUTIVE_FAILURES.into()),
        ),
        ("base_ejection_time", Duration(DEFAULT_BASE_EJECTION_TIME)),
        ("max_ejection_time", Duration(DEFAULT_MAX_EJECTION_TIME)),
        (
            "max_ejected_percent",
            Number(DEFAULT_MAX_EJECTED_PERCENT.into()),
        ),
    ] {
        let rows = rows(&section(pools));
        let row = rows
            .iter()
            .find(|row| backticked(&row[0]) == ["outlier"])
            .expect("outlier");
        let form = backticked(&row[1]).join(" ");
        let written = form
            .split(&format!("{key} = "))
            .nth(1)
            .and_then(|rest| rest.split([',', ' ', '}']).next())
            .unwrap_or_default()
            .trim_matches('"');
        let holds = match &expected {
            Duration(d) => parse_duration(written).is_ok_and(|w| w == *d),
            Number(v) => written.parse::<u64>().is_ok_and(|w| w == *v),
            Bool(_) => false,
        };
        if !holds {
            wrong.push(format!("outlier `{key}`: the README shows `{written}`"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The README's sample of `check` output is what `check` prints for such a file, line for line.
#[test]
fn the_sample_check_output_is_what_check_prints() {
    let sample: Vec<&str> = README
        .lines()
        .skip_while(|line| !line.starts_with("app.toml: "))
        .take_while(|line| !line.starts_with("```"))
        .collect();
    assert!(sample.len() >= 2, "no sample of check's output");
    let dir = std::env::temp_dir().join(format!("switchyard-readme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // The mistakes the sample shows: a misspelt pool, a weight out of range.
    std::fs::write(
        dir.join("app.toml"),
        r#"
[[listeners]]
name = "web"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "web"

[[listeners]]
name = "db"
bind = "127.0.0.1:0"
protocol = "tcp"
pool = "mysq"

[pools.web]
backends = ["127.0.0.1:1", "127.0.0.1:2", { address = "127.0.0.1:3", weight = 300 }]

[pools.mysql]
backends = ["127.0.0.1:4"]
"#,
    )
    .expect("write");
    let out = std::process::Command::new(BIN)
        .args(["check", "--config", "app.toml"])
        .current_dir(&dir)
        .output()
        .expect("runs");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status.code(), Some(1));
    let printed = String::from_utf8_lossy(&out.stderr);
    assert_eq!(printed.lines().collect::<Vec<_>>(), sample);
}

/// The README's table of metrics is what `/metrics` serves: every family, its type and its
/// labels, and no family the table leaves out.
#[tokio::test]
async fn the_metrics_table_is_what_metrics_serves() {
    let backend = http_backend("a").await;
    let (udp_backend, _udp) = udp_named("u").await;
    let proxy = Proxy::start(&format!(
        "[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listeners]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\ndefault_pool = \"p\"\n\n\
         [[listeners]]\nname = \"dns\"\nbind = \"127.0.0.1:0\"\nprotocol = \"udp\"\npool = \"u\"\n\n\
         [pools.p]\nbackends = [\"{}\"]\n\n[pools.u]\nbackends = [\"{udp_backend}\"]\n",
        backend.addr
    ));
    // A response, so that the families of responses have a series.
    let mut client = HttpClient::connect(proxy.addr("web")).await;
    assert_eq!(client.get("/", "").await.status, 200);
    let admin = proxy.handle.admin_addr().expect("admin configured");
    let mut client = HttpClient::connect(admin).await;
    client
        .send(format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\n\r\n").as_bytes())
        .await;
    let reply = client.reply().await.expect("metrics");
    assert_eq!(reply.status, 200, "{}", reply.text());
    let metrics = reply.text();

    // name → (type, label names), from what is served.
    let mut served = std::collections::BTreeMap::<String, (String, BTreeSet<String>)>::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (family, kind) = rest.split_once(' ').expect("# TYPE name type");
            // OpenMetrics names a counter's family without the `_total` of its samples.
            let name = match kind {
                "counter" => format!("{family}_total"),
                _ => family.to_owned(),
            };
            served.insert(name, (kind.to_owned(), BTreeSet::new()));
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let (series, _) = line.rsplit_once(' ').expect("name value");
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let family = ["_bucket", "_sum", "_count", "_created"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|f| served.contains_key(*f))
                .unwrap_or(name);
            let entry = served
                .get_mut(family)
                .unwrap_or_else(|| panic!("no TYPE for {name}"));
            for pair in labels
                .trim_end_matches('}')
                .split(',')
                .filter(|p| !p.is_empty())
            {
                let (label, _) = pair.split_once('=').expect("label=value");
                if label != "le" {
                    entry.1.insert(label.to_owned());
                }
            }
        }
    }

    let mut documented = std::collections::BTreeMap::<String, (String, BTreeSet<String>)>::new();
    for row in rows(&section("### Metrics")) {
        // Labels: names before any parenthesis; `none` or nothing for none.
        let mut labels = String::new();
        let mut depth = 0;
        for c in row[2].chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                c if depth == 0 => labels.push(c),
                _ => {}
            }
        }
        let labels: BTreeSet<String> = labels
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty() && *l != "none")
            .map(str::to_owned)
            .collect();
        for name in backticked(&row[0]) {
            documented.insert(name, (row[1].clone(), labels.clone()));
        }
    }
    let mut wrong = Vec::new();
    for (name, (kind, labels)) in &documented {
        match served.get(name) {
            None => wrong.push(format!("`{name}` is in the README but not served")),
            Some((k, l)) if k != kind || l != labels => wrong.push(format!(
                "`{name}`: the README says {kind} with {labels:?}, served as {k} with {l:?}"
            )),
            Some(_) => {}
        }
    }
    for name in served.keys().filter(|n| !documented.contains_key(*n)) {
        wrong.push(format!("`{name}` is served but not in the README"));
    }
    assert!(documented.len() > 20, "{documented:#?}");
    assert!(wrong.is_empty(), "{}\n{metrics}", wrong.join("\n"));
}
