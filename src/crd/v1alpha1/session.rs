//! `Session`: one user's running instance of one Workspace (Kasm: a Kasm / session).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::group::KeepaliveExpirationAction;

/// The annotation a client sets on a Session to send a keepalive: an RFC 3339 timestamp, one
/// small PATCH per `keepaliveInterval`. The operator persists it into `status.lastKeepalive`.
pub const KEEPALIVE_ANNOTATION: &str = "cubicle.dev/keepalive";

/// A request for a session, and its state.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cubicle.dev",
    version = "v1alpha1",
    kind = "Session",
    namespaced,
    status = "SessionStatus",
    derive = "PartialEq",
    shortname = "csess",
    category = "cubicle",
    doc = "A Cubicle Session (Kasm: a session, \"a Kasm\"): one user's instance of one Workspace. Created on demand by a portal, CLI or kubectl; the operator admits it, places it and expires it. Keepalives are sent by setting the cubicle.dev/keepalive annotation.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "User", type_ = "string", json_path = ".spec.user"),
    printcolumn(name = "Workspace", type_ = "string", json_path = ".spec.workspace"),
    printcolumn(
        name = "Expires",
        type_ = "string",
        json_path = ".status.expiresAt",
        description = "When the session expires unless a keepalive arrives"
    ),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.node"),
    printcolumn(
        name = "URL",
        type_ = "string",
        json_path = ".status.url",
        description = "Where a browser opens the session, while it runs"
    ),
    printcolumn(
        name = "Rule",
        type_ = "string",
        json_path = ".status.expiryRule",
        priority = 1
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "The Ready condition's status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SessionSpec {
    /// Name of the User the session is for. Immutable.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("user is immutable: create a new Session for another user"))]
    pub user: String,
    /// Name of the Workspace to run. Immutable. Kasm: the launched image.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("workspace is immutable: create a new Session for another workspace"))]
    pub workspace: String,
    /// Persistent profile mode: `Enabled` (mount it), `Disabled` (do not), `Reset` (archive the
    /// old profile and start from an empty one). Unset means `Enabled` when the Workspace has a
    /// persistent profile and the user's groups allow it, `Disabled` otherwise.
    /// Kasm: Persistent Profile option at launch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub persistent_profile: Option<ProfileMode>,
    /// Deployment zone (`topology.kubernetes.io/zone`). Needs `allowZoneSelection`; a named zone
    /// is never substituted by another. Unset: default placement. Kasm: Zone selection.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub zone: Option<String>,
    /// Desired state: `Running`, `Stopped` (pod removed, volumes kept; needs `allowKasmStop`) or
    /// `Paused` (pod kept, access cut; needs `allowKasmPause`). Unset means `Running`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<DesiredState>,
}

/// Persistent profile mode of a session.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[schemars(transform = crate::crd::drop_description)]
pub enum ProfileMode {
    /// Mount the user's profile.
    Enabled,
    /// Do not mount it.
    Disabled,
    /// Archive the existing profile and start with a fresh one.
    Reset,
}

/// Desired state of a session.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[schemars(transform = crate::crd::drop_description)]
pub enum DesiredState {
    /// The session runs.
    Running,
    /// The pod is removed and volumes kept.
    Stopped,
    /// The pod is kept and access cut.
    Paused,
}

/// Observed state of a session.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SessionStatus {
    /// Where the session is in its life.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<SessionPhase>,
    /// The Server the session is placed on (absent outside server pools).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// The Node the session runs on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The session pod's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Where a browser opens the session (through the gateway), while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// When the session was admitted and started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<MicroTime>,
    /// The last keepalive the operator has recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_keepalive: Option<Keepalive>,
    /// The exact time the session expires under `expiryRule`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<MicroTime>,
    /// Which rule sets `expiresAt`: `keepalive`, `sessionTimeLimit` or `usageLimit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiry_rule: Option<ExpiryRule>,
    /// What happens at `expiresAt`: `delete`, `stop` or `pause`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiry_action: Option<KeepaliveExpirationAction>,
    /// Seconds of usage budget the user has left (absent without a usage limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_remaining_seconds: Option<u64>,
    /// The persistent profile of this session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profile: Option<ProfileStatus>,
    /// Conditions: `Admitted` (launch checks passed, or why not), `Ready` (the pod runs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::crd::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `.metadata.generation` this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Phase of a session.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[schemars(transform = crate::crd::drop_description)]
pub enum SessionPhase {
    /// Admitted, pod not running yet.
    Pending,
    /// The pod runs.
    Running,
    /// Stopped: no pod, volumes kept.
    Stopped,
    /// Paused: pod kept, access cut.
    Paused,
    /// Expired and deleted or about to be (the `delete` action).
    Expired,
    /// A launch check failed; the `Admitted` condition says which.
    Refused,
    /// The session could not run (e.g. capacity gone when resuming).
    Failed,
}

/// A recorded keepalive.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Keepalive {
    /// When it was sent.
    pub time: MicroTime,
    /// Where it came from: `annotation` (the `cubicle.dev/keepalive` annotation) or `start`
    /// (the session's start counts as the first keepalive).
    pub source: KeepaliveSource,
}

/// Where a keepalive came from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::crd::drop_description)]
pub enum KeepaliveSource {
    /// The `cubicle.dev/keepalive` annotation.
    Annotation,
    /// The session's start.
    Start,
}

/// Which rule sets a session's expiry.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::crd::drop_description)]
pub enum ExpiryRule {
    /// `keepaliveExpiration` after the last keepalive.
    Keepalive,
    /// `sessionTimeLimit` after the start.
    SessionTimeLimit,
    /// The usage budget runs out.
    UsageLimit,
}

/// The persistent profile of a session.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ProfileStatus {
    /// The PersistentVolumeClaim holding the profile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claim: Option<String>,
    /// The profile's directory on a shared volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
    /// What was done with the profile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<ProfileOutcome>,
    /// After a reset: the name the old profile was archived as (a claim name or directory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archived_as: Option<String>,
    /// Details, e.g. why the profile could not be mounted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What was done with a session's profile.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[schemars(transform = crate::crd::drop_description)]
pub enum ProfileOutcome {
    /// The profile is mounted.
    Mounted,
    /// No profile: the session asked for none, or the workspace has none.
    Disabled,
    /// The old profile was archived (`archivedAs`) and a fresh one mounted.
    ResetArchived,
    /// A reset was asked for but there was no old profile; a fresh one is mounted.
    ResetFresh,
    /// The profile could not be prepared (`message` says why).
    Failed,
}
