//! `meta.toml`: the control service's settings in a file. Command-line
//! flags override it; absent keys keep the defaults.
//!
//! ```toml
//! listen = "127.0.0.1:7700"
//! data = "/var/lib/celer/meta"
//! token_file = "/etc/celer/token"
//! heartbeat_ms = 200
//! lease_ms = 1000
//! partition_bits = 8
//! replicas = 3
//! max_moves = 64
//! down_grace_s = 300
//! # store = "etcd"
//! # etcd = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
//! # advertise = "http://10.0.0.1:7700"
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::server::MetaError;

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub data: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub heartbeat_ms: Option<u64>,
    pub lease_ms: Option<u64>,
    pub partition_bits: Option<u8>,
    pub replicas: Option<u8>,
    pub max_moves: Option<usize>,
    /// Seconds a down node keeps its places before its partitions move.
    pub down_grace_s: Option<u64>,
    /// `redb` (default) or `etcd`.
    pub store: Option<String>,
    /// etcd endpoints.
    pub etcd: Option<Vec<String>>,
    /// This process's URL as the others should name it (etcd store).
    pub advertise: Option<String>,
}

impl FileConfig {
    pub fn parse(text: &str) -> Result<FileConfig, MetaError> {
        toml::from_str(text).map_err(|e| MetaError::Config(format!("config file: {e}")))
    }

    pub fn load(path: &Path) -> Result<FileConfig, MetaError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            MetaError::Config(format!("cannot read config file {}: {e}", path.display()))
        })?;
        FileConfig::parse(&text).map_err(|e| MetaError::Config(format!("{}: {e}", path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_unknown_keys() {
        let c = FileConfig::parse("lease_ms = 500\nreplicas = 2\netcd = [\"http://a:1\"]\n")
            .expect("parse");
        assert_eq!(c.lease_ms, Some(500));
        assert_eq!(c.replicas, Some(2));
        assert_eq!(c.etcd.as_deref(), Some(&["http://a:1".to_string()][..]));
        let e = FileConfig::parse("leese_ms = 5").expect_err("typo");
        assert!(e.to_string().contains("leese_ms"), "{e}");
        assert!(FileConfig::parse("replicas = \"three\"").is_err());
    }
}
