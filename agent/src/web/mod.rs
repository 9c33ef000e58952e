//! `--web.config.file`: TLS, client certificates, basic authentication and response headers
//! in the Prometheus exporter-toolkit format.
//!
//! [`config::parse`] turns the text into a checked [`config::WebConfig`] without touching
//! the filesystem; [`state::WebState`] reads the files it names, builds the TLS acceptor and
//! reloads everything when one of the files changes; [`auth::BasicAuth`] checks bcrypt
//! hashes and caches the outcome.

pub mod auth;
pub mod config;
pub mod hash_password;
pub mod state;

pub use config::{ConfigError, WebConfig, parse};
pub use state::{Active, WebState};
