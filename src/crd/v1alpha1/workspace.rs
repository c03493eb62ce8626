//! `Workspace`: what a session runs (Kasm: Workspace, formerly Image), and where user profiles
//! live (seed 003).

use k8s_openapi::api::core::v1::EnvVar;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::{FileMapping, RunConfig, VolumeMapping};

/// An image people can launch sessions of.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cubicle.dev",
    version = "v1alpha1",
    kind = "Workspace",
    namespaced,
    status = "WorkspaceStatus",
    derive = "PartialEq",
    shortname = "cws",
    shortname = "ws",
    category = "cubicle",
    doc = "A Cubicle Workspace (Kasm: Workspace): the image a session runs, its resources, who may launch it, its server pool, persistent profile storage, mappings, environment and run config.",
    printcolumn(name = "Image", type_ = "string", json_path = ".spec.image"),
    printcolumn(
        name = "Pool",
        type_ = "string",
        json_path = ".spec.serverPool",
        description = "Server pool sessions are placed in"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "The Ready condition's status"
    ),
    printcolumn(
        name = "Display Name",
        type_ = "string",
        json_path = ".spec.displayName",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new(
    "!(has(self.webFilterPolicy) && has(self.webFilterForceDisabled) && self.webFilterForceDisabled)"
).message("webFilterPolicy cannot be set together with webFilterForceDisabled: true").field_path(".webFilterPolicy"))]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceSpec {
    /// Name shown to users. Kasm: `friendly_name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub display_name: Option<String>,
    /// What the workspace offers. Kasm: `description`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub description: Option<String>,
    /// Container image of the session. Kasm: `image_src` / Docker Image.
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,
    /// When the node pulls the image: `Always`, `IfNotPresent` or `Never` (Kubernetes' default
    /// rules when unset).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// Names of Secrets used to pull the image. Kasm: Docker Registry credentials.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 253)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub image_pull_secrets: Vec<String>,
    /// CPU, memory and GPUs of a session. Kasm: `cores`, `memory`, `gpu_count`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resources: Option<WorkspaceResources>,
    /// Names of the Groups whose members may launch this workspace. Kasm: the workspace's
    /// groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 253)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub groups: Vec<String>,
    /// Name of the ServerPool whose Servers run the sessions. When the pool has assignment
    /// enabled, a user needs an assigned server in it to start a session. Unset: any node.
    /// Kasm: Server Pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub server_pool: Option<String>,
    /// Where users' persistent profiles (home directories) live. Kasm: Persistent Profile Path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent_profile: Option<PersistentProfile>,
    /// Volumes mapped into sessions of this workspace, combined with the Groups'.
    /// Kasm: Volume Mappings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub volume_mappings: Vec<VolumeMapping>,
    /// Files placed inside sessions of this workspace; a Group's or User's mapping of the same
    /// destination wins. Kasm: File Mappings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["destination".into()]))]
    pub file_mappings: Vec<FileMapping>,
    /// Environment variables of the session container. Kasm: `environment` in the run config.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub env: Vec<EnvVar>,
    /// Overrides of the session pod; a Group's `runConfig` wins over this one.
    /// Kasm: Docker Run Config Override.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_config: Option<RunConfig>,
    /// Name of the web filter policy for sessions of this workspace; wins over the Groups'
    /// `webFilterPolicy`. Kasm: Web Filter Policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub web_filter_policy: Option<String>,
    /// Turn web filtering off for this workspace, whatever the Groups set.
    /// Kasm: Web Filter Policy "Force Disabled".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub web_filter_force_disabled: Option<bool>,
    /// How the gateway reaches the session's desktop: port, scheme and path. Unset: Kasm's
    /// (KasmVNC on 6901 over https with the image's self-signed certificate, path `/`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection: Option<WorkspaceConnection>,
}

impl WorkspaceSpec {
    /// Kasm's desktop: port 6901, https, path `/`.
    pub fn default_desktop() -> (u16, bool, String) {
        (6901, true, "/".into())
    }

    /// Port, scheme (`true`: https) and path of the desktop, defaults filled in.
    pub fn desktop(&self) -> (u16, bool, String) {
        let (port, tls, path) = Self::default_desktop();
        let c = self.connection.as_ref();
        (
            c.and_then(|c| c.port).unwrap_or(port),
            c.and_then(|c| c.scheme)
                .map_or(tls, |s| s == WorkspaceScheme::Https),
            c.and_then(|c| c.path.clone()).unwrap_or(path),
        )
    }
}

/// How the gateway reaches a session's desktop inside the cluster.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceConnection {
    /// The desktop's port in the session container (default 6901, KasmVNC's).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// `https` (default: KasmVNC with the image's self-signed certificate, not verified; the
    /// chart's NetworkPolicy lets only the gateway reach the port) or `http`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<WorkspaceScheme>,
    /// Path prefix of the desktop (default `/`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = "^/"))]
    pub path: Option<String>,
}

/// Scheme of a session's desktop.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(transform = crate::crd::drop_description)]
pub enum WorkspaceScheme {
    /// TLS (the certificate is not verified).
    Https,
    /// Plain HTTP.
    Http,
}

/// When the node pulls the image.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[schemars(transform = crate::crd::drop_description)]
pub enum ImagePullPolicy {
    /// Pull on every session start.
    Always,
    /// Pull only if the node lacks the image.
    IfNotPresent,
    /// Never pull.
    Never,
}

/// Resources of one session.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceResources {
    /// CPU cores (a quantity: `2`, `1.5`, `500m`); requested and used as the limit.
    /// Kasm: `cores`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cores: Option<Quantity>,
    /// Memory (a quantity: `4Gi`, `2768Mi`); requested and used as the limit. Kasm: `memory`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// GPUs (`nvidia.com/gpu`). Kasm: `gpu_count`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 64))]
    pub gpus: Option<u32>,
}

/// Where persistent profiles live: exactly one of `claimTemplate` and `sharedVolume`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "has(self.claimTemplate) != has(self.sharedVolume)"
).message("persistentProfile must set exactly one of claimTemplate and sharedVolume"))]
pub struct PersistentProfile {
    /// Where the profile is mounted in the session container (the user's home directory).
    /// Kasm: the home directory, `/home/kasm-user`.
    #[schemars(length(min = 2, max = 4096), regex(pattern = r"^/"))]
    pub mount_path: String,
    /// One PersistentVolumeClaim per user, created from this template when missing (and never
    /// deleted by the operator).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim_template: Option<ProfileClaimTemplate>,
    /// One directory per user on a shared volume (NFS and the like, for multi-node clusters),
    /// created when missing. Kasm: the persistent profile path on shared storage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_volume: Option<ProfileSharedVolume>,
}

/// A per-user PersistentVolumeClaim.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProfileClaimTemplate {
    /// Name of the user's claim, with `{username}` and/or `{user_id}` replaced (e.g.
    /// `profile-{user_id}-desktop`). Kasm: Persistent Profile Path, which must contain
    /// `{username}` or `{user_id}`.
    #[schemars(length(min = 1, max = 200))]
    #[x_kube(validation = Rule::new(
        "self.contains('{username}') || self.contains('{user_id}')"
    ).message("persistentProfile.claimTemplate.name must contain {username} or {user_id}, otherwise every user would share one profile"))]
    pub name: String,
    /// StorageClass of the claims (the cluster default when unset).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub storage_class_name: Option<String>,
    /// Requested size of each claim.
    pub size: Quantity,
    /// Access modes of each claim (`ReadWriteOnce` when unset).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub access_modes: Vec<AccessMode>,
}

/// A PersistentVolumeClaim access mode.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[schemars(transform = crate::crd::drop_description)]
pub enum AccessMode {
    /// Read-write by one node.
    ReadWriteOnce,
    /// Read-only by many nodes.
    ReadOnlyMany,
    /// Read-write by many nodes.
    ReadWriteMany,
    /// Read-write by one pod.
    ReadWriteOncePod,
}

/// A per-user directory on one shared claim.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProfileSharedVolume {
    /// The shared PersistentVolumeClaim (usually ReadWriteMany, e.g. NFS).
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
    /// The user's directory on it, relative, with `{username}` and/or `{user_id}` replaced (e.g.
    /// `profiles/{username}`). Kasm: Persistent Profile Path, which must contain `{username}` or
    /// `{user_id}`.
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new(
        "self.contains('{username}') || self.contains('{user_id}')"
    ).message("persistentProfile.sharedVolume.subPath must contain {username} or {user_id}, otherwise every user would share one profile"))]
    #[x_kube(validation = Rule::new(
        "!self.startsWith('/') && !self.split('/').exists(p, p == '..')"
    ).message("persistentProfile.sharedVolume.subPath must be a relative path without '..'"))]
    pub sub_path: String,
}

/// Observed state of a Workspace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkspaceStatus {
    /// Sessions of this workspace that have not ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sessions: Option<u32>,
    /// Conditions: `Ready` when the Groups and the ServerPool the workspace names exist (its
    /// reason names the first problem otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::crd::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `.metadata.generation` this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
