//! The README's promises, checked: its configuration reference names exactly the keys the parser
//! accepts, table by table.
//!
//! The parser refuses unknown keys, and its error lists every key the table takes ("unknown
//! field `x`, expected one of `a`, `b`"). Each test case provokes that error in one table and
//! compares the list with the keys the README documents for that table, so a key added without
//! its documentation, or documented but refused, fails here by name.

use std::collections::BTreeSet;
use std::path::Path;

use switchyard::Config;

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
    for key in ["sticky", "outlier", "queue", "tls"] {
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
