//! Switchyard: a layer 4 and layer 7 load balancer.
//!
//! The binary (`main.rs`) only parses flags and calls into this library. See ARCHITECTURE.md for
//! the map of the modules and the life of a connection.

pub mod access;
pub mod access_log;
pub mod admin;
pub mod backend;
pub mod balance;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod dns;
pub mod health;
pub mod http;
pub mod l4;
pub mod listener;
pub mod metrics;
pub mod notify;
pub mod park;
pub mod pool;
pub mod proxy_protocol;
pub mod ratelimit;
pub mod server;
pub(crate) mod splice;
pub mod stream;
pub mod sys;
pub mod tls;
pub mod upgrade;
pub mod watch;

pub use config::Config;

/// Entry points for the fuzz targets in `fuzz/` (a crate of their own) to parsers of outside
/// input that are not otherwise part of the library's interface. Nothing else should use them:
/// they may change with the code they wrap.
#[doc(hidden)]
pub mod fuzzing {
    use std::net::IpAddr;

    /// The admin API's reading of a `PUT .../weight` body.
    pub fn admin_weight(body: &[u8]) -> Result<u32, String> {
        crate::admin::parse_weight(body)
    }

    /// The admin API's decoding of a backend address in a URL path segment.
    pub fn admin_path_segment(segment: &str) -> String {
        crate::admin::percent_decode(segment)
    }

    /// The Forwarded field sent to backends, extending a trusted peer's `existing` one.
    pub fn forwarded_field(existing: Option<&[u8]>, ip: IpAddr, tls: bool, host: &[u8]) -> Vec<u8> {
        crate::http::forwarded_field(existing, ip, tls, host)
    }
}
pub use server::{Server, ServerError};
