//! Checks a `KvCluster` before anything is built or applied.
//!
//! The CRD schema already rejects most bad specs at the API server; this repeats those
//! checks so `render` and a cluster with an older CRD fail the same way, and adds the
//! checks that need what the operator recorded earlier (the shard count).

use crate::crd::{KvCluster, KvClusterSpec};

/// Longest `metadata.name` accepted: `{name}-s{shard}` names a StatefulSet whose pods carry
/// a `controller-revision-hash` label `{statefulset}-{10 chars}` that must fit in 63 bytes.
pub const MAX_NAME_LEN: usize = 42;

/// Why a spec cannot be acted on; `reason` becomes the `Degraded` condition's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct InvalidSpec {
    /// CamelCase reason for the condition.
    pub reason: &'static str,
    /// Human-readable explanation, shown by `kubectl describe`.
    pub message: String,
}

impl InvalidSpec {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        InvalidSpec {
            reason,
            message: message.into(),
        }
    }
}

/// Validates a whole resource: name, spec and the change against what is running.
pub fn validate(kvc: &KvCluster) -> Result<(), InvalidSpec> {
    let name = kvc.metadata.name.as_deref().unwrap_or_default();
    validate_name(name)?;
    let current_shards = kvc.status.as_ref().and_then(|s| s.current_shards);
    validate_spec(&kvc.spec, current_shards)?;
    let current_storage = kvc.status.as_ref().and_then(|s| s.current_storage.as_ref());
    validate_storage(&kvc.spec.storage, current_storage)
}

/// Refuses a storage change: volume claim templates are immutable in a StatefulSet, so
/// the API server would reject every apply of the shard StatefulSets (and the objects
/// after them) until the spec is set back.
fn validate_storage(
    spec: &crate::crd::StorageSpec,
    current: Option<&crate::crd::StorageSpec>,
) -> Result<(), InvalidSpec> {
    let Some(current) = current else {
        return Ok(());
    };
    if spec == current {
        return Ok(());
    }
    let show = |s: &crate::crd::StorageSpec| {
        format!(
            "size {} class {}",
            s.size.0,
            s.storage_class_name.as_deref().unwrap_or("<default>")
        )
    };
    Err(InvalidSpec::new(
        "StorageImmutable",
        format!(
            "spec.storage changed from {} to {}; existing volumes keep their size and \
             class, so the cluster keeps running with them (set spec.storage back)",
            show(current),
            show(spec)
        ),
    ))
}

fn validate_name(name: &str) -> Result<(), InvalidSpec> {
    let dns1035 = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-');
    if !dns1035 {
        return Err(InvalidSpec::new(
            "InvalidName",
            format!("name {name:?} must be a DNS-1035 label (lowercase letters, digits, '-')"),
        ));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(InvalidSpec::new(
            "InvalidName",
            format!("name {name:?} is longer than {MAX_NAME_LEN} characters"),
        ));
    }
    Ok(())
}

/// Validates the spec alone, and against the shard count the cluster already runs with.
pub fn validate_spec(spec: &KvClusterSpec, current_shards: Option<u32>) -> Result<(), InvalidSpec> {
    if !(1..=128).contains(&spec.shards) {
        return Err(InvalidSpec::new(
            "InvalidSpec",
            format!("shards must be between 1 and 128, not {}", spec.shards),
        ));
    }
    if !(1..=9).contains(&spec.replicas_per_shard) {
        return Err(InvalidSpec::new(
            "InvalidSpec",
            format!(
                "replicasPerShard must be between 1 and 9, not {}",
                spec.replicas_per_shard
            ),
        ));
    }
    let min_in_sync = spec.replication.min_in_sync;
    if min_in_sync < 1 || min_in_sync > spec.replicas_per_shard {
        return Err(InvalidSpec::new(
            "InvalidSpec",
            format!(
                "replication.minInSync ({min_in_sync}) must be between 1 and replicasPerShard ({})",
                spec.replicas_per_shard
            ),
        ));
    }
    if spec.image.trim().is_empty() {
        return Err(InvalidSpec::new("InvalidSpec", "image must not be empty"));
    }
    if !(1..=65535).contains(&spec.router.port) {
        return Err(InvalidSpec::new(
            "InvalidSpec",
            format!(
                "router.port must be between 1 and 65535, not {}",
                spec.router.port
            ),
        ));
    }
    if spec.router.replicas < 1 {
        return Err(InvalidSpec::new(
            "InvalidSpec",
            "router.replicas must be at least 1",
        ));
    }
    if spec.router.node_port.is_some()
        && spec.router.service_type == crate::crd::ServiceType::ClusterIP
    {
        return Err(InvalidSpec::new(
            "InvalidSpec",
            "router.nodePort needs serviceType NodePort or LoadBalancer",
        ));
    }
    let max_key = dataplane::api::MAX_KEY_LIMIT;
    if let Some(bytes) = spec.limits.as_ref().and_then(|l| l.max_key_bytes)
        && !(1..=max_key).contains(&(bytes as usize))
    {
        // The nodes and routers would refuse to start with it.
        return Err(InvalidSpec::new(
            "InvalidSpec",
            format!("limits.maxKeyBytes must be between 1 and {max_key}, not {bytes}"),
        ));
    }
    if let Some(current) = current_shards
        && current != spec.shards
    {
        return Err(InvalidSpec::new(
            "ReshardingUnsupported",
            format!(
                "spec.shards changed from {current} to {}; resharding is not supported yet, \
                     so the cluster keeps running with {current} shards (set shards back to {current})",
                spec.shards
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::KvClusterStatus;

    fn cluster(yaml: &str) -> KvCluster {
        serde_yaml::from_str(yaml).unwrap()
    }

    const OK: &str = "apiVersion: distkv.io/v1alpha1\nkind: KvCluster\nmetadata: {name: demo}\nspec: {shards: 3, replicasPerShard: 3, replication: {minInSync: 2}}\n";

    #[test]
    fn a_sound_spec_passes() {
        assert_eq!(validate(&cluster(OK)), Ok(()));
    }

    #[test]
    fn min_in_sync_above_replicas_is_refused() {
        let mut kvc = cluster(OK);
        kvc.spec.replication.min_in_sync = 4;
        let err = validate(&kvc).unwrap_err();
        assert_eq!(err.reason, "InvalidSpec");
        assert!(err.message.contains("minInSync"), "{err}");
    }

    #[test]
    fn a_key_limit_the_nodes_refuse_is_refused() {
        let mut kvc = cluster(OK);
        let max = dataplane::api::MAX_KEY_LIMIT as u32;
        kvc.spec.limits = Some(crate::crd::LimitsSpec {
            max_key_bytes: Some(max),
            max_value_bytes: None,
        });
        assert_eq!(validate(&kvc), Ok(()));
        kvc.spec.limits.as_mut().unwrap().max_key_bytes = Some(max + 1);
        let err = validate(&kvc).unwrap_err();
        assert!(err.message.contains("limits.maxKeyBytes"), "{err:?}");
    }

    #[test]
    fn zero_shards_or_replicas_are_refused() {
        let mut kvc = cluster(OK);
        kvc.spec.shards = 0;
        assert!(validate(&kvc).is_err());
        let mut kvc = cluster(OK);
        kvc.spec.replicas_per_shard = 0;
        assert!(validate(&kvc).is_err());
    }

    #[test]
    fn changing_shards_is_refused_with_its_own_reason() {
        let mut kvc = cluster(OK);
        kvc.status = Some(KvClusterStatus {
            current_shards: Some(2),
            ..Default::default()
        });
        let err = validate(&kvc).unwrap_err();
        assert_eq!(err.reason, "ReshardingUnsupported");
        assert!(err.message.contains("from 2 to 3"), "{err}");
    }

    #[test]
    fn bad_names_are_refused() {
        for name in ["Demo", "-x", "x-", "a_b", &"a".repeat(MAX_NAME_LEN + 1)] {
            let mut kvc = cluster(OK);
            kvc.metadata.name = Some(name.to_string());
            assert_eq!(validate(&kvc).unwrap_err().reason, "InvalidName", "{name}");
        }
    }
}
