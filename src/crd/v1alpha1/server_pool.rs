//! `ServerPool`: a set of Servers, with user-server assignment or autoscaling (seed 000).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::crd::Duration;

/// A pool of servers that Workspaces place sessions in.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cubicle.dev",
    version = "v1alpha1",
    kind = "ServerPool",
    namespaced,
    status = "ServerPoolStatus",
    derive = "PartialEq",
    shortname = "spool",
    category = "cubicle",
    doc = "A Cubicle ServerPool (Kasm: Server Pool): either a set of dedicated Servers, optionally with user-server assignment, or an autoscaled set of nodes chosen by a selector.",
    printcolumn(
        name = "Assignment",
        type_ = "boolean",
        json_path = ".spec.assignmentEnabled",
        description = "Whether users need an assigned server in this pool"
    ),
    printcolumn(
        name = "Autoscale",
        type_ = "string",
        json_path = ".spec.autoscale.nodeSelector",
        description = "Node selector of an autoscaled pool"
    ),
    printcolumn(name = "Servers", type_ = "integer", json_path = ".status.servers"),
    printcolumn(name = "Sessions", type_ = "integer", json_path = ".status.sessions"),
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
#[x_kube(validation = Rule::new(
    "!(has(self.autoscale) && has(self.assignmentEnabled) && self.assignmentEnabled)"
).message("assignmentEnabled cannot be true on a pool with an autoscale configuration (Kasm: user-server assignment cannot be enabled for pools that have attached autoscale configurations)").field_path(".assignmentEnabled"))]
#[serde(rename_all = "camelCase")]
pub struct ServerPoolSpec {
    /// What the pool is for. Kasm: `server_pool_name` / description.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// User-server assignment: a user may start a session of a Workspace using this pool only on
    /// servers assigned to them (ServerAssignments). Turning it off keeps the assignments; every
    /// server is then available to every user with access. Not allowed with `autoscale`.
    /// Default false. Kasm: Enable User Assignment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assignment_enabled: Option<bool>,
    /// Makes this a dynamic pool: its servers are the nodes matching a selector, which the
    /// cluster autoscaler grows and shrinks, rather than Server objects. Kasm: autoscale
    /// configuration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<Autoscale>,
}

/// The autoscale configuration of a dynamic pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct Autoscale {
    /// Labels of the nodes that make up the pool (e.g. a cluster-autoscaler node group).
    #[schemars(extend("minProperties" = 1))]
    pub node_selector: BTreeMap<String, String>,
    /// Sessions' worth of capacity to keep free, so that the autoscaler adds nodes before they
    /// are needed (placeholder pods). Kasm: Standby Cores/Memory, expressed in sessions.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 10000))]
    pub min_standby_sessions: Option<u32>,
    /// Most nodes the pool may use; sessions beyond are refused. Kasm: Maximum Agents.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 10000))]
    pub max_servers: Option<u32>,
    /// Most sessions on one node of the pool (unset: limited by resources only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 10000))]
    pub max_sessions_per_server: Option<u32>,
    /// How long standby capacity stays unused before it is released. Kasm: Downscale Backoff.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downscale_backoff: Option<Duration>,
}

/// Observed state of a pool.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServerPoolStatus {
    /// Servers in the pool (Server objects, or matching nodes when autoscaled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub servers: Option<u32>,
    /// Total session capacity of the pool (sum of the servers' `maxSessions`; absent when some
    /// server is unbounded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
    /// Sessions placed in the pool that have not ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sessions: Option<u32>,
    /// Conditions: `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::crd::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `.metadata.generation` this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
