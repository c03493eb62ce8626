//! `ServerAssignment`: which users may use which servers (seed 000, User-Server Assignment).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Assigns every listed user to every listed server.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cubicle.dev",
    version = "v1alpha1",
    kind = "ServerAssignment",
    namespaced,
    status = "ServerAssignmentStatus",
    derive = "PartialEq",
    shortname = "sassign",
    category = "cubicle",
    doc = "A Cubicle ServerAssignment (Kasm: User-Server Assignment): every listed user is assigned to every listed server. Only servers in pools with assignment enabled are in effect; the others are kept and marked not in effect.",
    printcolumn(name = "Users", type_ = "string", json_path = ".spec.users"),
    printcolumn(name = "Servers", type_ = "string", json_path = ".spec.servers"),
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
pub struct ServerAssignmentSpec {
    /// Names of the Users assigned. Kasm: Assigned Users.
    #[schemars(length(min = 1, max = 1024), inner(length(min = 1, max = 253)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub users: Vec<String>,
    /// Names of the Servers they are assigned to. Kasm: Assigned Servers.
    #[schemars(length(min = 1, max = 1024), inner(length(min = 1, max = 253)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub servers: Vec<String>,
    /// Why these users have these servers.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
}

/// Observed state of an assignment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServerAssignmentStatus {
    /// Every (user, server) pair and whether it applies now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pairs: Vec<AssignmentPair>,
    /// Conditions: `Ready`; `InvalidSpec` (unknown users or servers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::crd::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `.metadata.generation` this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One (user, server) pair of an assignment.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AssignmentPair {
    /// User name.
    pub user: String,
    /// Server name.
    pub server: String,
    /// Whether the pair applies now.
    pub in_effect: bool,
    /// Why not, when it does not (e.g. `AssignmentDisabled`, `UnknownServer`, `UnknownUser`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
