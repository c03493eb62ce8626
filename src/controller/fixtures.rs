//! Shared test fixtures: the objects the controllers' unit tests build, in one place (namespace
//! `ns` unless given), instead of a builder rewritten in each module.

use serde_json::{Value, json};

use std::sync::Arc;

use crate::controller::runtime::cached::CachedPod;
use crate::crd::v1alpha1::{
    Group, GroupSettings, GroupSpec, ServerAssignment, ServerPool, Session, SessionPhase, User,
};

/// An object of `kind` named `name` in namespace `ns`, with `spec` (and nothing else).
pub fn object<K: serde::de::DeserializeOwned>(kind: &str, name: &str, ns: &str, spec: Value) -> K {
    serde_json::from_value(json!({
        "apiVersion": "cubicle.dev/v1alpha1", "kind": kind,
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
        "spec": spec
    }))
    .unwrap_or_else(|e| panic!("fixture {kind} {name}: {e}"))
}

/// A Session of `user` for `workspace` in `ns`, uid `uid-<name>`.
pub fn session(name: &str, user: &str, workspace: &str) -> Session {
    object(
        "Session",
        name,
        "ns",
        json!({"user": user, "workspace": workspace}),
    )
}

/// A User in the groups named, in `ns`, uid `uid-<name>`; `extra` merged into its spec.
pub fn user(name: &str, groups: &[&str], extra: Value) -> User {
    let mut spec = json!({"groups": groups});
    if let Value::Object(m) = extra {
        for (k, v) in m {
            spec[k] = v;
        }
    }
    object("User", name, "ns", spec)
}

/// A Group with `priority` and `settings`, in `ns` (shared, as the caches and the directory
/// hold it).
pub fn group(name: &str, priority: u32, settings: GroupSettings) -> Arc<Group> {
    let mut g = Group::new(
        name,
        GroupSpec {
            priority,
            description: None,
            settings,
        },
    );
    g.metadata.namespace = Some("ns".into());
    Arc::new(g)
}

/// A ServerPool in `ns`: `assignment` as `assignmentEnabled`; `autoscale`, onto nodes labelled
/// `group=burst`, 4 sessions a server.
pub fn pool(name: &str, assignment: Option<bool>, autoscale: bool) -> Arc<ServerPool> {
    let autoscale =
        autoscale.then(|| json!({"nodeSelector": {"group": "burst"}, "maxSessionsPerServer": 4}));
    Arc::new(object(
        "ServerPool",
        name,
        "ns",
        json!({"assignmentEnabled": assignment, "autoscale": autoscale}),
    ))
}

/// A Server of `pool` in `ns`, on node `node-<name>`, with at most `max` sessions.
pub fn server(name: &str, pool: &str, max: Option<u32>) -> Arc<crate::crd::v1alpha1::Server> {
    let spec = json!({"pool": pool, "nodeName": format!("node-{name}"), "maxSessions": max});
    Arc::new(object("Server", name, "ns", spec))
}

/// A ServerAssignment in `ns` of `users` to `servers`.
pub fn assignment(name: &str, users: &[&str], servers: &[&str]) -> Arc<ServerAssignment> {
    let spec = json!({"users": users, "servers": servers});
    Arc::new(object("ServerAssignment", name, "ns", spec))
}

/// A Session of `user` for `ws` in `ns`, with `phase` and `server` in its status.
pub fn placed_session(
    name: &str,
    user: &str,
    ws: &str,
    server: Option<&str>,
    phase: Option<SessionPhase>,
) -> Arc<Session> {
    let mut s = session(name, user, ws);
    s.status = Some(crate::crd::v1alpha1::SessionStatus {
        phase,
        server: server.map(str::to_string),
        ..Default::default()
    });
    Arc::new(s)
}

/// A session pod named `s` as the pod cache holds it: created at `created`, on `node`, with
/// `status` (phase, conditions, container statuses).
pub fn pod(created: Option<&str>, node: Option<&str>, status: Value) -> CachedPod {
    serde_json::from_value(json!({
        "metadata": {"name": "s", "creationTimestamp": created},
        "spec": {"nodeName": node},
        "status": status
    }))
    .unwrap_or_else(|e| panic!("fixture pod: {e}"))
}

/// `v` as the API server gives it back: serialized to JSON and read again.
pub fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
    serde_json::from_value(serde_json::to_value(v).expect("serializes")).expect("reads back")
}

/// A later instant than the tests' usual `now` (2026-01-01T00:00:00Z): a recomputation then
/// gives new transition times to conditions computed without a previous status.
pub fn later() -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2026-01-01T00:10:00Z".parse().expect("a timestamp"),
    )
}
