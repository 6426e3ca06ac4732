//! celer-meta-api: what a caller of the control service needs, without
//! the service itself (its store, redb or etcd, and its state machine).
//!
//! - [`api`]: the HTTP/JSON API's request and reply bodies, and its table
//!   of routes;
//! - [`client`]: [`MetaClient`], the blocking client storage nodes and the
//!   `celer` CLI use, and [`client::Backoff`] for retrying it.
//!
//! `celer-meta` (the service) re-exports both modules, so
//! `celer_meta::api` and `celer_meta::client` name the same items.

pub mod api;
pub mod client;

pub use client::{MetaClient, MetaClientError};
