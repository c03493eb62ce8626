//! The Server status controller: zone (spec or the Node's `topology.kubernetes.io/zone`), active
//! sessions placed on it against its capacity, and assigned users with whether each assignment
//! is in effect (the seed's "Assigned Users" tab).
//!
//! Node label changes are not a trigger (Nodes are cached without a change stream); a sweep at
//! least every [`super::NODE_REFRESH`] picks them up.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::Context;
use super::status::{self, Cond, StatusView, Triggers, conditions, owned_conditions};
use super::stores::{Reflectors, Stores, digest};
use crate::crd::v1alpha1::{Server, ServerAssignment, ServerPool, ServerStatus, Session, User};
use crate::resolve::{self, Directory};

/// The condition types this controller owns.
pub const CONDITIONS: &[&str] = &["Ready"];

/// What the controller knows of the server's Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// The Node exists.
    pub exists: bool,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// The status the controller wants for `server` (pure). `sessions` are the namespace's sessions
/// (or at least those placed on this server).
pub fn desired_status(
    dir: &Directory,
    server: &Server,
    node: &NodeInfo,
    user_exists: impl Fn(&str) -> bool,
    sessions: &[Arc<Session>],
    current: Option<&ServerStatus>,
    now: &Time,
) -> ServerStatus {
    let name = server.name_any();
    let in_use = resolve::server_sessions(&name, sessions);
    let capacity = match server.spec.max_sessions {
        Some(max) => format!("{in_use} of at most {max} sessions"),
        None => format!("{in_use} sessions (no session limit)"),
    };
    let pool = &server.spec.pool;
    let ready = match dir.pool(pool) {
        None => Cond::new(
            "Ready",
            false,
            "UnknownPool",
            format!("spec.pool: ServerPool/{pool} does not exist; {capacity}"),
        ),
        Some(_) if !node.exists => Cond::new(
            "Ready",
            false,
            "NodeNotFound",
            format!(
                "spec.nodeName: Node/{} does not exist; {capacity}",
                server.spec.node_name
            ),
        ),
        Some(p) => Cond::new(
            "Ready",
            true,
            if server.spec.max_sessions.is_some_and(|m| in_use >= m) {
                "Full"
            } else {
                "Available"
            },
            format!(
                "{capacity}; ServerPool/{pool} has assignment {}",
                if resolve::views::assignment_enabled(p) {
                    "enabled"
                } else {
                    "disabled (assignments kept, not in effect)"
                }
            ),
        ),
    };
    let generation = server.metadata.generation;
    ServerStatus {
        zone: resolve::views::server_zone(server, Some(&node.labels)),
        sessions: Some(in_use),
        assigned_users: resolve::server_assigned_users(dir, &name, user_exists),
        conditions: conditions(
            vec![ready],
            current.map(|c| c.conditions.as_slice()).unwrap_or(&[]),
            generation,
            now,
        ),
        observed_generation: generation,
    }
}

impl StatusView for Server {
    const KIND: &'static str = "Server";
    const MANAGER: &'static str = "cubicle/server-status";

    fn desired(ctx: &Context, dir: &Directory, server: &Server, now: &Time) -> ServerStatus {
        let ns = dir.namespace.as_str();
        let name = server.name_any();
        let node = match ctx
            .stores
            .nodes
            .get(&ObjectRef::new(&server.spec.node_name))
        {
            Some(n) => NodeInfo {
                exists: true,
                labels: n.metadata.labels.clone().unwrap_or_default(),
            },
            None => NodeInfo::default(),
        };
        let sessions = ctx.stores.sessions_on_server(ns, &name);
        let users = &ctx.stores.users;
        let user_exists = |u: &str| users.get(&ObjectRef::new(u).within(ns)).is_some();
        desired_status(
            dir,
            server,
            &node,
            user_exists,
            &sessions,
            server.status.as_ref(),
            now,
        )
    }

    fn owned(c: &ServerStatus) -> ServerStatus {
        ServerStatus {
            conditions: owned_conditions(&c.conditions, CONDITIONS),
            ..c.clone()
        }
    }
}

fn servers_where(
    stores: &Stores,
    ns: Option<String>,
    pred: impl Fn(&Server) -> bool,
) -> Vec<ObjectRef<Server>> {
    let Some(ns) = ns else { return Vec::new() };
    status::refs(
        stores
            .servers
            .state_filter(|s| s.metadata.namespace.as_deref() == Some(ns.as_str()) && pred(s)),
    )
}

fn lists_any_user(s: &Server, users: &[String]) -> bool {
    s.status
        .as_ref()
        .is_some_and(|st| st.assigned_users.iter().any(|a| users.contains(&a.user)))
}

fn servers_of_assignment(stores: &Stores, a: &ServerAssignment) -> Vec<ObjectRef<Server>> {
    let servers = a.spec.servers.clone();
    let users = a.spec.users.clone();
    servers_where(stores, a.namespace(), |s| {
        s.metadata
            .name
            .as_ref()
            .is_some_and(|n| servers.contains(n))
            || lists_any_user(s, &users)
    })
}

fn servers_of_user(stores: &Stores, u: &User) -> Vec<ObjectRef<Server>> {
    let name = u.name_any();
    let ns = u.namespace();
    let assigned: Vec<String> = stores
        .assignments
        .state_filter(|a| a.metadata.namespace == ns && a.spec.users.contains(&name))
        .iter()
        .flat_map(|a| a.spec.servers.clone())
        .collect();
    let me = vec![name];
    servers_where(stores, ns, |s| {
        s.metadata
            .name
            .as_ref()
            .is_some_and(|n| assigned.contains(n))
            || lists_any_user(s, &me)
    })
}

fn servers_of_pool(stores: &Stores, p: &ServerPool) -> Vec<ObjectRef<Server>> {
    let pool = p.name_any();
    servers_where(stores, p.namespace(), |s| s.spec.pool == pool)
}

fn server_of_session(s: &Session) -> Vec<ObjectRef<Server>> {
    match (
        s.namespace(),
        s.status.as_ref().and_then(|st| st.server.as_ref()),
    ) {
        (Some(ns), Some(server)) => vec![ObjectRef::new(server).within(&ns)],
        _ => Vec::new(),
    }
}

/// Builds the Server status controller over the shared caches.
pub fn controller(r: &mut Reflectors, ctx: Arc<Context>) -> BoxFuture<'static, ()> {
    Triggers::<Server>::new(&r.servers, ctx)
        .refresh_within(super::NODE_REFRESH)
        .on(&mut r.assignments, servers_of_assignment)
        // A server's assigned users are read by name (existence) and from assignments: a User's
        // status writes are no trigger.
        .on_digest(
            &mut r.users,
            |u| digest(&u.metadata.generation),
            servers_of_user,
        )
        .on(&mut r.pools, servers_of_pool)
        .on(&mut r.sessions, |_, x: &Session| server_of_session(x))
        .run()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures;
    use crate::crd::v1alpha1::SessionPhase;

    fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    #[test]
    fn zone_sessions_capacity_and_assigned_users() {
        let d = Directory {
            namespace: "ns".into(),
            pools: vec![obj(serde_json::json!({
                "apiVersion": "cubicle.dev/v1alpha1", "kind": "ServerPool",
                "metadata": {"name": "dedicated", "namespace": "ns"},
                "spec": {"assignmentEnabled": true}
            }))],
            assignments: vec![obj(serde_json::json!({
                "apiVersion": "cubicle.dev/v1alpha1", "kind": "ServerAssignment",
                "metadata": {"name": "a", "namespace": "ns"},
                "spec": {"users": ["alice", "ghost"], "servers": ["ws-01"]}
            }))],
            ..Directory::default()
        };
        let server: Server = serde_json::from_value(serde_json::json!({
            "apiVersion": "cubicle.dev/v1alpha1", "kind": "Server",
            "metadata": {"name": "ws-01", "namespace": "ns", "generation": 1},
            "spec": {"pool": "dedicated", "nodeName": "n1", "maxSessions": 1}
        }))
        .unwrap();
        let mut d = d;
        d.servers.push(Arc::new(server.clone()));
        let sessions: Vec<Arc<Session>> = vec![obj(serde_json::json!({
            "apiVersion": "cubicle.dev/v1alpha1", "kind": "Session",
            "metadata": {"name": "s", "namespace": "ns"},
            "spec": {"user": "alice", "workspace": "w"},
            "status": {"phase": SessionPhase::Running, "server": "ws-01"}
        }))];
        let node = NodeInfo {
            exists: true,
            labels: [(
                "topology.kubernetes.io/zone".to_string(),
                "zone-a".to_string(),
            )]
            .into(),
        };
        let now = Time("2026-01-01T00:00:00Z".parse().unwrap());
        let s = desired_status(&d, &server, &node, |u| u == "alice", &sessions, None, &now);
        assert_eq!(s.zone.as_deref(), Some("zone-a"));
        assert_eq!(s.sessions, Some(1));
        let users: Vec<_> = s
            .assigned_users
            .iter()
            .map(|a| (a.user.as_str(), a.in_effect))
            .collect();
        assert_eq!(users, vec![("alice", true), ("ghost", false)]);
        assert_eq!(s.conditions[0].reason, "Full");
        assert!(s.conditions[0].message.contains("1 of at most 1"));
        // Written and read back, then recomputed later: nothing to write.
        let again = desired_status(
            &d,
            &server,
            &node,
            |u| u == "alice",
            &sessions,
            None,
            &fixtures::later(),
        );
        assert!(!Server::changed(Some(&fixtures::round_trip(&s)), &again));
        let missing = desired_status(
            &d,
            &server,
            &NodeInfo::default(),
            |_| true,
            &[],
            Some(&s),
            &now,
        );
        assert_eq!(missing.conditions[0].status, "False");
        assert_eq!(missing.conditions[0].reason, "NodeNotFound");
        assert_eq!(missing.zone, None);
    }
}
