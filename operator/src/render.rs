//! `distkv-operator render`: every object the operator would create for a KvCluster, as
//! YAML, without a cluster. Users diff it; CI validates it against the Kubernetes schemas.

use serde::Serialize;

use crate::builders::{BuildError, ClusterObjects, ClusterRef, PLACEHOLDER_UID, build_all};
use crate::crd::KvCluster;
use crate::validate::{InvalidSpec, validate};

/// Why a manifest could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The input is not YAML or not a KvCluster.
    #[error("document {index}: {source}")]
    Parse {
        /// 1-based position of the document in the file.
        index: usize,
        /// What serde said.
        source: serde_yaml::Error,
    },
    /// The input holds no KvCluster.
    #[error("no KvCluster found in the input")]
    Empty,
    /// The KvCluster would be refused by the operator.
    #[error("KvCluster {name}: {source}")]
    Invalid {
        /// Its name.
        name: String,
        /// Why.
        source: InvalidSpec,
    },
    /// Builders could not run.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// An object did not serialize.
    #[error("serializing {0}: {1}")]
    Serialize(String, serde_yaml::Error),
}

/// Reads every `KvCluster` document in `input` (other kinds are skipped).
pub fn parse_clusters(input: &str) -> Result<Vec<KvCluster>, RenderError> {
    let mut clusters = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let value =
            serde_yaml::Value::deserialize(document).map_err(|source| RenderError::Parse {
                index: index + 1,
                source,
            })?;
        if value.is_null() || value.get("kind").and_then(|k| k.as_str()) != Some("KvCluster") {
            continue;
        }
        let kvc = serde_yaml::from_value(value).map_err(|source| RenderError::Parse {
            index: index + 1,
            source,
        })?;
        clusters.push(kvc);
    }
    if clusters.is_empty() {
        return Err(RenderError::Empty);
    }
    Ok(clusters)
}

use serde::Deserialize;

/// Renders every object for every KvCluster in `input` as one multi-document YAML stream.
pub fn render(input: &str, default_namespace: &str) -> Result<String, RenderError> {
    let mut out = String::new();
    for kvc in parse_clusters(input)? {
        let name = kvc.metadata.name.clone().unwrap_or_default();
        validate(&kvc).map_err(|source| RenderError::Invalid {
            name: name.clone(),
            source,
        })?;
        let cluster = ClusterRef::new(&kvc, default_namespace)?;
        let replicas = kvc.spec.replicas_per_shard as i32;
        let objects = build_all(&cluster, |_| replicas);
        out.push_str(&format!(
            "# KvCluster {}/{name}: {} shard(s) x {} replica(s).\n",
            cluster.namespace, kvc.spec.shards, kvc.spec.replicas_per_shard
        ));
        if kvc.metadata.uid.is_none() {
            out.push_str(&format!(
                "# ownerReferences carry the placeholder uid {PLACEHOLDER_UID} until the KvCluster exists.\n"
            ));
        }
        push_objects(&mut out, &objects)?;
    }
    Ok(out)
}

fn push_objects(out: &mut String, objects: &ClusterObjects) -> Result<(), RenderError> {
    for shard in &objects.shards {
        push(out, &shard.service)?;
        push(out, &shard.statefulset)?;
        push(out, &shard.pdb)?;
    }
    push(out, &objects.router_deployment)?;
    push(out, &objects.router_service)?;
    push(out, &objects.router_pdb)
}

fn push<K: Serialize + kube::Resource<DynamicType = ()>>(
    out: &mut String,
    object: &K,
) -> Result<(), RenderError> {
    let yaml = serde_yaml::to_string(object).map_err(|e| {
        RenderError::Serialize(
            format!(
                "{} {}",
                K::kind(&()),
                object.meta().name.clone().unwrap_or_default()
            ),
            e,
        )
    })?;
    out.push_str("---\n");
    out.push_str(&yaml);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../examples/kvcluster.yaml");

    #[test]
    fn renders_the_example_with_every_kind() {
        let yaml = render(EXAMPLE, "default").unwrap();
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .collect();
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        let count = |k: &str| kinds.iter().filter(|&&x| x == k).count();
        let shards = parse_clusters(EXAMPLE).unwrap()[0].spec.shards as usize;
        assert_eq!(count("StatefulSet"), shards);
        assert_eq!(count("PodDisruptionBudget"), shards + 1);
        assert_eq!(count("Service"), shards + 1);
        assert_eq!(count("Deployment"), 1);
        for doc in &docs {
            assert!(doc["apiVersion"].is_string(), "{doc:?}");
            assert!(doc["metadata"]["ownerReferences"][0]["kind"] == "KvCluster");
        }
    }

    #[test]
    fn skips_other_kinds_and_refuses_invalid_clusters() {
        let input = "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\napiVersion: distkv.io/v1alpha1\nkind: KvCluster\nmetadata: {name: bad}\nspec: {shards: 1, replicasPerShard: 1, replication: {minInSync: 2}}\n";
        let err = render(input, "default").unwrap_err();
        assert!(matches!(err, RenderError::Invalid { .. }), "{err}");
        assert!(matches!(
            render("kind: Namespace\n", "default"),
            Err(RenderError::Empty)
        ));
    }
}
