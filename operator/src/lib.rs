//! distkv-operator: the Kubernetes adapter of distkv's control core.
//!
//! `crd` defines the `KvCluster` resource, `builders` turn it into Kubernetes objects,
//! `render` prints them, and `reconcile` applies them and drives failover.

pub mod builders;
pub mod crd;
pub mod leader;
pub mod metrics;
pub mod nodes;
pub mod observe;
pub mod reconcile;
pub mod render;
pub mod scale;
pub mod status;
pub mod validate;

#[cfg(test)]
mod reconcile_tests;
#[cfg(test)]
mod testing;
