//! Run config: Kasm's "docker run params" (`run_config`), expressed as typed overrides of the
//! session pod and of its session container.
//!
//! A Workspace and each Group may carry one. The controller merges them field by field onto the
//! session pod, the Group's value winning over the Workspace's (Kasm: "the settings for
//! run_config on a group will override the run_config settings on an image"). Maps (labels,
//! node selector, resources) merge by key; lists (env, tolerations, host aliases) merge by their
//! name or key; everything else is replaced.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    EnvVar, HostAlias, PodDNSConfig, PodSecurityContext, SecurityContext, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Overrides applied to the session pod (Kasm: `run_config`, Docker's run parameters). Relaxing
/// the security contexts makes the session fail the Pod Security Standard "restricted" that
/// Cubicle otherwise meets; that is a deliberate choice of whoever writes it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RunConfig {
    /// Pod-level overrides (scheduling, host names, DNS, pod security context, /dev/shm).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodOverrides>,
    /// Overrides of the session container (env, security context, command, resources).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerOverrides>,
}

/// Pod-level run config.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Extra node labels the session pod requires (merged with the Server's or pool's placement).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations added to the session pod, for example to run on tainted GPU nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,
    /// PriorityClass of the session pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub priority_class_name: Option<String>,
    /// RuntimeClass of the session pod (for example a sandboxed runtime such as gVisor or Kata).
    /// Docker: `runtime`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub runtime_class_name: Option<String>,
    /// Host name seen inside the session; `{username}` is replaced with the user's name.
    /// Docker: `hostname`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub hostname: Option<String>,
    /// Extra `/etc/hosts` entries. Docker: `extra_hosts`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub host_aliases: Vec<HostAlias>,
    /// DNS servers, search domains and options. Docker: `dns`, `dns_search`, `dns_opt`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_config: Option<PodDNSConfig>,
    /// Pod security context (user and group ids, fsGroup, seccomp). Docker: `user`, `group_add`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
    /// Size of a memory-backed `/dev/shm` (browsers need more than the default 64Mi).
    /// Docker: `shm_size`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shm_size: Option<Quantity>,
    /// Labels added to the session pod. Docker: `labels`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to the session pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Overrides of the session container.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ContainerOverrides {
    /// Environment variables added to (or replacing, by name) the container's. Docker:
    /// `environment`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub env: Vec<EnvVar>,
    /// Container security context (capabilities, privilege, read-only root, user).
    /// Docker: `cap_add`, `cap_drop`, `privileged`, `security_opt`, `user`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub security_context: Option<SecurityContext>,
    /// Working directory. Docker: `working_dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub working_dir: Option<String>,
    /// Entrypoint replacing the image's. Docker: `entrypoint`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Arguments replacing the image's. Docker: `command`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Resource requests and limits overriding those derived from the Workspace's `resources`.
    /// Docker: `cpu_quota`, `cpu_shares`, `mem_limit`, `mem_reservation`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceOverrides>,
}

/// Resource requests and limits by resource name (`cpu`, `memory`, `nvidia.com/gpu`, ...).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ResourceOverrides {
    /// Requests by resource name; each replaces the computed request of that resource.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requests: BTreeMap<String, Quantity>,
    /// Limits by resource name; each replaces the computed limit of that resource.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub limits: BTreeMap<String, Quantity>,
}
