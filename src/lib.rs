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
pub use server::{Server, ServerError};
