//! `GET /openapi.json`: the public API, generated from the handlers' annotations.

use axum::Json;
use utoipa::OpenApi;

use crate::{api, node, router};

/// The OpenAPI document of the public API (served by routers and nodes alike).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "distkv",
        description = "Sharded, replicated key-value store",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    paths(
        node::v1_get,
        node::v1_put,
        node::v1_delete,
        node::demo_put,
        node::demo_get,
        node::demo_delete,
        router::cluster,
        router::healthz,
        router::readyz,
        router::metrics_doc,
    ),
    components(schemas(
        api::ErrorBody,
        api::ErrorDetail,
        api::PutResult,
        api::DemoPut,
        router::ClusterView,
        router::ShardView,
        router::ReplicaView,
    ))
)]
pub struct ApiDoc;

/// Serves the document.
pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_routes_take_their_key_from_the_query() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        for (path, method) in [("/get", "get"), ("/delete", "get"), ("/delete", "delete")] {
            let params = &doc["paths"][path][method]["parameters"];
            assert_eq!(params[0]["name"], "key", "{method} {path}");
            assert_eq!(params[0]["in"], "query", "{method} {path}");
        }
        let summary = doc["paths"]["/metrics"]["get"]["summary"].as_str().unwrap();
        assert!(!summary.contains('['), "rustdoc link in {summary:?}");
    }
}
