//! Volume and file mappings: what Kasm calls `volume_mapping` (a directory mapped into the
//! session) and "File Mappings" (a single file placed inside the session container). Both are
//! defined on Users (file mappings only), Groups and Workspaces.

use k8s_openapi::api::core::v1::{
    ConfigMapKeySelector, ConfigMapVolumeSource, EmptyDirVolumeSource, HostPathVolumeSource,
    NFSVolumeSource, PersistentVolumeClaimVolumeSource, SecretKeySelector, SecretVolumeSource,
};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// Maximum number of volume or file mappings in one list (keeps the API server's CEL cost
/// estimate bounded; far more than any real configuration needs).
pub const MAX_MAPPINGS: u32 = 64;

/// A directory mapped into the session container (Kasm: `volume_mapping`, one entry of it).
///
/// Volume mappings combine: a session gets the Workspace's mappings and those of every Group of
/// its user, merged by `name`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMapping {
    /// Name of the mapping, unique within its list; it also names the volume in the session pod
    /// (a DNS label). Mappings from different Groups with the same name are reported as a
    /// conflict. Kasm: the key of a `volume_mapping` entry.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Absolute path inside the session container where the volume is mounted. Kasm: `bind`.
    #[schemars(length(min = 1, max = 4096), regex(pattern = r"^/"))]
    pub mount_path: String,
    /// Sub-path of the volume to mount instead of its root. May contain `{username}` or
    /// `{user_id}`, replaced with the session user's values.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub sub_path: Option<String>,
    /// Mount read-only (default false). Kasm: `mode: ro`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// Where the data lives: exactly one Kubernetes volume source. Kasm maps a host directory;
    /// here a host path is one option among network and claim-backed ones.
    pub source: VolumeMappingSource,
}

/// The volume behind a mapping: set exactly one field.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "(has(self.persistentVolumeClaim) ? 1 : 0) + (has(self.nfs) ? 1 : 0) + (has(self.configMap) ? 1 : 0) + (has(self.secret) ? 1 : 0) + (has(self.emptyDir) ? 1 : 0) + (has(self.hostPath) ? 1 : 0) == 1"
).message("a volume mapping source must set exactly one of persistentVolumeClaim, nfs, configMap, secret, emptyDir, hostPath"))]
pub struct VolumeMappingSource {
    /// An existing PersistentVolumeClaim in the same namespace (for example a shared
    /// ReadWriteMany data volume).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PersistentVolumeClaimVolumeSource>,
    /// An NFS export, mounted directly by the node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nfs: Option<NFSVolumeSource>,
    /// The keys of a ConfigMap, as files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapVolumeSource>,
    /// The keys of a Secret, as files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<SecretVolumeSource>,
    /// A scratch directory that lives as long as the session pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub empty_dir: Option<EmptyDirVolumeSource>,
    /// A directory of the node (Kasm's original meaning of a volume mapping). Fails the Pod
    /// Security Standard "restricted"; use only on dedicated Servers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathVolumeSource>,
}

/// A file placed inside the session container (Kasm: File Mapping). Where a User, a Group and a
/// Workspace map the same `destination`, the most specific wins (User over Group over
/// Workspace), and the User's status says which one.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FileMapping {
    /// Absolute path of the file inside the session container; unique within its list.
    /// Kasm: `destination`.
    #[schemars(length(min = 2, max = 4096), regex(pattern = r"^/.*[^/]$"))]
    pub destination: String,
    /// Where the file's content comes from: exactly one of `inline`, `configMapKeyRef`,
    /// `secretKeyRef`. Kasm: the uploaded file or its `content`.
    pub content: FileMappingContent,
    /// Whether the session user may modify the file (default false: mounted read-only).
    /// Kasm: `is_writable`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writable: Option<bool>,
    /// Whether the file is executable (mode 0755 instead of 0644; default false).
    /// Kasm: `is_executable`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub executable: Option<bool>,
    /// A short name for people reading the configuration. Kasm: `name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub name: Option<String>,
    /// What the file is for. Kasm: `description`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
}

/// The content of a file mapping: set exactly one field.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "(has(self.inline) ? 1 : 0) + (has(self.configMapKeyRef) ? 1 : 0) + (has(self.secretKeyRef) ? 1 : 0) == 1"
).message("a file mapping content must set exactly one of inline, configMapKeyRef, secretKeyRef"))]
pub struct FileMappingContent {
    /// The file's content, written here in full (text; at most 256 KiB). Kasm: `content`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262144))]
    pub inline: Option<String>,
    /// A key of a ConfigMap in the same namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<ConfigMapKeySelector>,
    /// A key of a Secret in the same namespace (for credentials and keys).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeySelector>,
}
