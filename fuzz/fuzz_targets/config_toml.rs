//! The configuration file is the operator's, but it is still text from outside the program: a
//! typo, a truncated file or a value out of range must come back as an error that names the
//! key, never as a panic. The routes of a file that loads compile into a router.
//!
//! Files that ask for DNS lookups (`resolve = true`) are left out: they would wait on the
//! network.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::Config;
use switchyard::config::ListenerKind;
use switchyard::http::router::Router;

/// Whether any table of `value` has a `resolve` key.
fn resolves(value: &toml::Value) -> bool {
    match value {
        toml::Value::Table(table) => table
            .iter()
            .any(|(key, value)| key == "resolve" || resolves(value)),
        toml::Value::Array(items) => items.iter().any(resolves),
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The loader reads the text with the same TOML parser (`${VAR}` is expanded inside
    // values, never keys): text this parser refuses, the loader refuses before any lookup.
    if text
        .parse::<toml::Table>()
        .is_ok_and(|table| resolves(&toml::Value::Table(table)))
    {
        return;
    }
    match Config::from_toml(text, "fuzz.toml".as_ref()) {
        Ok(config) => {
            for listener in &config.listeners {
                if let ListenerKind::Http(http) = &listener.kind {
                    let _ = Router::new(&http.routes, http.default_pool.as_deref());
                }
            }
        }
        Err(error) => {
            let _ = error.to_string();
        }
    }
});
