pub mod cluster;
pub mod proxy;
pub mod replicas;
pub mod up;
pub mod wire;
pub mod workload;
