//! distkv's data plane: replica nodes, the router, the playground and the control core.
//! Nothing here knows about Kubernetes.

pub mod api;
pub mod budget;
pub mod client;
pub mod control;
pub mod idle;
pub mod link;
pub mod metrics;
pub mod node;
pub mod openapi;
pub mod playground;
pub mod replication;
pub mod router;
pub mod slots;
pub mod storage;
pub mod topology;
pub mod wal;
pub mod wire;
