//! celer-meta: the control service.
//!
//! It keeps the cluster's metadata — storage nodes (membership by lease),
//! volumes, the route table and a change log of every metadata change — in
//! a [`MetaStore`](store::MetaStore) (embedded redb by default, etcd for
//! several control processes with one leader), and serves it over
//! HTTP/JSON ([`api`]). Route tables are pushed to the storage nodes only;
//! clients learn them lazily from the nodes.
//!
//! Storage nodes and the CLI talk to it with the blocking [`MetaClient`];
//! tests and `celer meta serve` run it with [`MetaServer`]. The API types
//! and the client are the crate `celer-meta-api`, the HTTP server with its
//! limits `celer-http` (re-exported here as [`api`], [`client`], [`http`]),
//! so a storage node depends on those without the service's store.

pub mod config;
#[cfg(feature = "etcd")]
pub mod etcd;
mod metrics;
pub mod server;
pub mod state;
pub mod store;

// The API types, the client and the HTTP server live in crates of their
// own (a storage node needs them without the service); their old paths
// here keep working.
pub use celer_http as http;
pub use celer_meta_api::{api, client};
pub use celer_route;
pub use client::{MetaClient, MetaClientError};
pub use server::{MetaConfig, MetaError, MetaServer};
pub use state::ClusterConfig;
