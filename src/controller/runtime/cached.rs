//! Lean shapes of the built-in kinds the operator caches in bulk: session pods, profile claims
//! and their PersistentVolumes.
//!
//! The watches deserialize straight into these types, so the fields the operator never reads
//! (a pod's containers, volumes and most of its status; a volume's source and capacity) are
//! skipped while parsing instead of being built and then dropped. The k8s-openapi structs are
//! sized for every field they could hold: a `Pod` is 2,176 bytes and a `PersistentVolume`
//! 3,472 before any string, where a cached pod here is its metadata and a few optional fields.
//!
//! Each type keeps the k8s-openapi field names and nesting for what it keeps (so reads look the
//! same) and is the same resource to the API server: group, version, kind and path. Only the
//! caches use them; every write builds the full k8s-openapi object.

use k8s_openapi::api::core::v1::{ContainerStateWaiting, ObjectReference, PodCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// Makes a lean type the same API resource as its k8s-openapi counterpart.
macro_rules! same_resource_as {
    ($lean:ty, $full:ty) => {
        impl k8s_openapi::Resource for $lean {
            const API_VERSION: &'static str = <$full as k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str = <$full as k8s_openapi::Resource>::GROUP;
            const KIND: &'static str = <$full as k8s_openapi::Resource>::KIND;
            const VERSION: &'static str = <$full as k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str =
                <$full as k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = <$full as k8s_openapi::Resource>::Scope;
        }

        impl k8s_openapi::ListableResource for $lean {
            const LIST_KIND: &'static str = <$full as k8s_openapi::ListableResource>::LIST_KIND;
        }

        impl k8s_openapi::Metadata for $lean {
            type Ty = ObjectMeta;

            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// A session pod as the operator reads it: metadata, the node, and the status that tells its
/// phase, readiness and what holds it up.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct CachedPod {
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `spec`: the node only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<CachedPodSpec>,
    /// `status`, in part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<CachedPodStatus>,
    /// Cache-only: the launch record annotation's value, moved here when the pod is trimmed for
    /// the cache (an annotation map for one entry is a ~540-byte node). Never sent by the API
    /// server; read it through [`CachedPod::launch_annotation`].
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub launch: Option<String>,
    /// Cache-only: the digest of the labels and annotations the operator owns
    /// ([`crate::controller::contract::owned_digest`]), taken before the pod is trimmed for the
    /// cache. Read it through [`CachedPod::owned_digest`].
    #[serde(skip)]
    pub owned: Option<u64>,
}
same_resource_as!(CachedPod, k8s_openapi::api::core::v1::Pod);

impl CachedPod {
    /// The launch record annotation's value: as trimmed for the cache, or on the pod as sent.
    pub fn launch_annotation(&self) -> Option<&str> {
        use crate::controller::contract::LAUNCH_ANNOTATION;
        self.launch.as_deref().or_else(|| {
            self.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LAUNCH_ANNOTATION))
                .map(String::as_str)
        })
    }

    /// The digest of the labels and annotations the operator owns: as taken for the cache, or
    /// of the pod as sent.
    pub fn owned_digest(&self) -> u64 {
        self.owned.unwrap_or_else(|| {
            crate::controller::contract::owned_digest(
                self.metadata.labels.as_ref(),
                self.metadata.annotations.as_ref(),
            )
        })
    }
}

/// A pod's `spec`, as read.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedPodSpec {
    /// `spec.nodeName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// A pod's `status`, as read.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedPodStatus {
    /// `status.phase`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// `status.message`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `status.conditions`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<PodCondition>>,
    /// `status.initContainerStatuses`: name and state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_container_statuses: Option<Vec<CachedContainerStatus>>,
    /// `status.containerStatuses`: name and state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_statuses: Option<Vec<CachedContainerStatus>>,
}

/// A container's status, as read: its name and whether (and why) it waits.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct CachedContainerStatus {
    /// Container name.
    #[serde(default)]
    pub name: String,
    /// `state`: the waiting state only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<CachedContainerState>,
}

/// A container's state, as read.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct CachedContainerState {
    /// `state.waiting`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<ContainerStateWaiting>,
}

/// A profile claim as the operator reads it: metadata and the volume it is bound to.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct CachedClaim {
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `spec`: the volume name only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<CachedClaimSpec>,
    /// Cache-only: the labels and the annotation the operator reads, moved here when the claim
    /// is trimmed for the cache, which then drops both maps (a label map is a ~540-byte node
    /// plus two strings per label; a claim carries five). Never sent by the API server; read
    /// them through the accessors below.
    #[serde(skip)]
    pub marks: Option<ClaimMarks>,
}
same_resource_as!(
    CachedClaim,
    k8s_openapi::api::core::v1::PersistentVolumeClaim
);

/// What the operator reads of a profile claim's labels and annotations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClaimMarks {
    /// The user label.
    pub user: Option<String>,
    /// The profile label.
    pub profile: Option<String>,
    /// Whether it carries the archived label.
    pub archived: bool,
    /// The reset-by annotation.
    pub reset_by: Option<String>,
}

impl ClaimMarks {
    /// Read from a claim's maps.
    pub fn of(meta: &ObjectMeta) -> Self {
        use crate::controller::contract::{
            ARCHIVED_LABEL, PROFILE_LABEL, RESET_BY_ANNOTATION, USER_LABEL,
        };
        let label = |k: &str| meta.labels.as_ref().and_then(|l| l.get(k));
        Self {
            user: label(USER_LABEL).cloned(),
            profile: label(PROFILE_LABEL).cloned(),
            archived: label(ARCHIVED_LABEL).is_some(),
            reset_by: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(RESET_BY_ANNOTATION))
                .cloned(),
        }
    }
}

impl CachedClaim {
    /// What the operator reads of its labels and annotations: as trimmed for the cache, or
    /// from its maps.
    pub fn marks(&self) -> std::borrow::Cow<'_, ClaimMarks> {
        match &self.marks {
            Some(m) => std::borrow::Cow::Borrowed(m),
            None => std::borrow::Cow::Owned(ClaimMarks::of(&self.metadata)),
        }
    }
}

/// A claim's `spec`, as read.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedClaimSpec {
    /// `spec.volumeName`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_name: Option<String>,
}

/// A PersistentVolume as the operator reads it: metadata, the claim it is bound to and the node
/// affinity that tells its zone.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
pub struct CachedVolume {
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// `spec`, in part.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<CachedVolumeSpec>,
    /// Cache-only: the volume's zone as its node affinity or zone label tells it, taken when it
    /// is trimmed for the cache (which then drops both: a label map alone is a ~540-byte node).
    /// Never sent by the API server.
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}
same_resource_as!(CachedVolume, k8s_openapi::api::core::v1::PersistentVolume);

/// A volume's `spec`, as read.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedVolumeSpec {
    /// `spec.claimRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_ref: Option<ObjectReference>,
    /// `spec.nodeAffinity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_affinity: Option<k8s_openapi::api::core::v1::VolumeNodeAffinity>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
    use kube::Resource;

    #[test]
    fn lean_kinds_are_the_same_api_resources() {
        fn same<A: Resource<DynamicType = ()>, B: Resource<DynamicType = ()>>() {
            assert_eq!(A::api_version(&()), B::api_version(&()));
            assert_eq!(A::kind(&()), B::kind(&()));
            assert_eq!(A::plural(&()), B::plural(&()));
            assert_eq!(A::url_path(&(), Some("ns")), B::url_path(&(), Some("ns")));
        }
        same::<CachedPod, Pod>();
        same::<CachedClaim, PersistentVolumeClaim>();
        same::<CachedVolume, PersistentVolume>();
        assert_eq!(
            CachedPod::url_path(&(), Some("ns")),
            "/api/v1/namespaces/ns/pods"
        );
        assert_eq!(
            CachedVolume::url_path(&(), None),
            "/api/v1/persistentvolumes"
        );
    }

    #[test]
    fn lean_kinds_are_a_fraction_of_the_full_structs() {
        use std::mem::size_of;
        assert!(size_of::<CachedPod>() * 3 < size_of::<Pod>());
        assert!(size_of::<CachedVolume>() * 4 < size_of::<PersistentVolume>());
        assert!(size_of::<CachedClaim>() < size_of::<PersistentVolumeClaim>());
    }
}

/// The zone a bound claim's volume is pinned to (node affinity or the zone label).
pub fn volume_zone(pv: &CachedVolume) -> Option<String> {
    use crate::controller::contract::ZONE_LABEL;
    use kube::ResourceExt;
    use std::collections::HashSet;
    if pv.zone.is_some() {
        return pv.zone.clone(); // as trimmed for the cache
    }
    let from_affinity = pv
        .spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
        .and_then(|r| {
            let zones: HashSet<&String> = r
                .node_selector_terms
                .iter()
                .flat_map(|t| t.match_expressions.iter().flatten())
                .filter(|e| e.key == ZONE_LABEL && e.operator == "In")
                .flat_map(|e| e.values.iter().flatten())
                .collect();
            (zones.len() == 1)
                .then(|| zones.into_iter().next().cloned())
                .flatten()
        });
    from_affinity.or_else(|| pv.labels().get(ZONE_LABEL).cloned())
}
