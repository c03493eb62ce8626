//! `Server`: a dedicated machine (a cluster Node) in a pool (seed 000).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A dedicated machine for one or more users.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cubicle.dev",
    version = "v1alpha1",
    kind = "Server",
    namespaced,
    status = "ServerStatus",
    derive = "PartialEq",
    shortname = "csrv",
    category = "cubicle",
    doc = "A Cubicle Server (Kasm: Server): a cluster Node dedicated to sessions, in a ServerPool, with an optional session capacity. Users are assigned to it by ServerAssignments.",
    printcolumn(name = "Pool", type_ = "string", json_path = ".spec.pool"),
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(name = "Zone", type_ = "string", json_path = ".status.zone"),
    printcolumn(
        name = "Sessions",
        type_ = "integer",
        json_path = ".status.sessions",
        description = "Sessions placed on the server"
    ),
    printcolumn(name = "Max", type_ = "integer", json_path = ".spec.maxSessions"),
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
pub struct ServerSpec {
    /// Name of the ServerPool the server belongs to. Kasm: Server Pool.
    #[schemars(length(min = 1, max = 253))]
    pub pool: String,
    /// Name of the cluster Node this server is. Kasm: Hostname / Address.
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
    /// Most sessions at once on this server; unset means limited by resources only.
    /// Kasm: Max Simultaneous Sessions.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 10000))]
    pub max_sessions: Option<u32>,
    /// Zone of the server, overriding the Node's `topology.kubernetes.io/zone` label (normally
    /// left unset). Kasm: Zone.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub zone: Option<String>,
    /// What the server is for. Kasm: Friendly Name / description.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
}

/// Observed state of a Server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServerStatus {
    /// The server's zone: `spec.zone`, or the Node's zone label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Sessions placed on the server that have not ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sessions: Option<u32>,
    /// Users assigned to the server by ServerAssignments (Kasm: Assigned Users tab).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub assigned_users: Vec<AssignedUser>,
    /// Conditions: `Ready` (the Node exists and is ready); `InvalidSpec` (unknown pool).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::crd::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `.metadata.generation` this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A user assigned to a server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AssignedUser {
    /// User name.
    pub user: String,
    /// Whether the assignment applies now (the server's pool has assignment enabled).
    pub in_effect: bool,
}
