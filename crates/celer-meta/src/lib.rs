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
//! tests and `celer meta serve` run it with [`MetaServer`].

pub mod api;
pub mod client;
pub mod config;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod http;
mod metrics;
pub mod server;
pub mod state;
pub mod store;

pub use celer_route;
pub use client::{MetaClient, MetaClientError};
pub use server::{MetaConfig, MetaError, MetaServer};
pub use state::ClusterConfig;
