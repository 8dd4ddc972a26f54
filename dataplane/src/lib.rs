//! distkv's data plane: replica nodes, the router, the playground and the control core.
//! Nothing here knows about Kubernetes.

pub mod control;
pub mod slots;
pub mod topology;
pub mod wire;
