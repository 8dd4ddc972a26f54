//! The operator's calls into the data plane, behind traits so reconcile tests can feed
//! observations and record what was sent. The real implementation is the data plane's
//! own `AdminClient`, the same one the playground uses.

use dataplane::client::{AdminClient, ClientError};
use dataplane::topology::Topology;
use dataplane::wire::{NodeStatus, RoleRequest};
use futures::future::BoxFuture;

/// Why a call to a node or router failed.
pub type NodeError = ClientError;

/// Reads a replica's own report (`GET /internal/status`).
pub trait ReplicaObserver: Send + Sync {
    /// The status of the replica listening at `address` (`host:port`).
    fn status<'a>(&'a self, address: &'a str) -> BoxFuture<'a, Result<NodeStatus, NodeError>>;
}

/// Tells nodes their role and routers the topology.
pub trait NodeControl: Send + Sync {
    /// `POST /internal/role` on the node at `address`.
    fn set_role<'a>(
        &'a self,
        address: &'a str,
        request: &'a RoleRequest,
    ) -> BoxFuture<'a, Result<(), NodeError>>;
    /// `PUT /internal/topology` on the router admin listener at `admin_address`.
    fn push_topology<'a>(
        &'a self,
        admin_address: &'a str,
        topology: &'a Topology,
    ) -> BoxFuture<'a, Result<(), NodeError>>;
}

impl ReplicaObserver for AdminClient {
    fn status<'a>(&'a self, address: &'a str) -> BoxFuture<'a, Result<NodeStatus, NodeError>> {
        Box::pin(AdminClient::status(self, address))
    }
}

impl NodeControl for AdminClient {
    fn set_role<'a>(
        &'a self,
        address: &'a str,
        request: &'a RoleRequest,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(async move {
            AdminClient::set_role(self, address, request)
                .await
                .map(drop)
        })
    }

    fn push_topology<'a>(
        &'a self,
        admin_address: &'a str,
        topology: &'a Topology,
    ) -> BoxFuture<'a, Result<(), NodeError>> {
        Box::pin(AdminClient::push_topology(self, admin_address, topology))
    }
}
