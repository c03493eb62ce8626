//! The ServerPool status controller: servers (Server objects, or for an autoscaled pool the
//! nodes matching its selector), total session capacity and active sessions.
//!
//! Node changes are not a trigger (Nodes are cached without a change stream); a sweep at least
//! every [`super::NODE_REFRESH`] picks up an autoscaled pool's growth and shrinkage.

use std::sync::Arc;

use futures::future::BoxFuture;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::Context;
use super::status::{self, Cond, StatusView, Triggers, conditions, owned_conditions};
use super::stores::{Reflectors, Stores};
use crate::crd::v1alpha1::{Server, ServerPool, ServerPoolStatus, Session, Workspace};
use crate::resolve::{self, Directory};

/// The condition types this controller owns.
pub const CONDITIONS: &[&str] = &["Ready"];

/// The status the controller wants for `pool` (pure). `matching_nodes` counts the nodes
/// matching an autoscaled pool's selector; `sessions` are the namespace's sessions.
pub fn desired_status(
    dir: &Directory,
    pool: &ServerPool,
    matching_nodes: u32,
    sessions: &[Arc<Session>],
    current: Option<&ServerPoolStatus>,
    now: &Time,
) -> ServerPoolStatus {
    let v = resolve::pool_view(dir, pool, matching_nodes, sessions);
    let capacity = match v.capacity {
        Some(c) => format!("{} of {c} sessions", v.sessions),
        None => format!("{} sessions (some server has no session limit)", v.sessions),
    };
    let full = v.capacity.is_some_and(|c| v.sessions >= c);
    let ready = match (&pool.spec.autoscale, v.servers) {
        (None, 0) => Cond::new(
            "Ready",
            false,
            "NoServers",
            "no Server names this pool in spec.pool: its workspaces' sessions cannot be placed",
        ),
        (Some(_), n) => Cond::new(
            "Ready",
            true,
            if n == 0 {
                "ScaledToZero"
            } else if full {
                "Full"
            } else {
                "Available"
            },
            format!("autoscaled: {n} matching nodes; {capacity}"),
        ),
        (None, n) => Cond::new(
            "Ready",
            true,
            if full { "Full" } else { "Available" },
            format!(
                "{n} servers; {capacity}; assignment {}",
                if resolve::views::assignment_enabled(pool) {
                    "enabled"
                } else {
                    "disabled"
                }
            ),
        ),
    };
    let generation = pool.metadata.generation;
    ServerPoolStatus {
        servers: Some(v.servers),
        capacity: v.capacity,
        sessions: Some(v.sessions),
        conditions: conditions(
            vec![ready],
            current.map(|c| c.conditions.as_slice()).unwrap_or(&[]),
            generation,
            now,
        ),
        observed_generation: generation,
    }
}

impl StatusView for ServerPool {
    const KIND: &'static str = "ServerPool";
    const MANAGER: &'static str = "cubicle/serverpool-status";

    fn desired(ctx: &Context, dir: &Directory, pool: &ServerPool, now: &Time) -> ServerPoolStatus {
        let matching = match &pool.spec.autoscale {
            Some(a) => ctx
                .stores
                .nodes
                .state_filter(|n| {
                    resolve::views::selector_matches(
                        &a.node_selector,
                        n.metadata.labels.as_ref().unwrap_or(&Default::default()),
                    )
                })
                .len() as u32,
            None => 0,
        };
        let sessions = pool_candidates(ctx, dir, pool);
        desired_status(dir, pool, matching, &sessions, pool.status.as_ref(), now)
    }

    fn owned(c: &ServerPoolStatus) -> ServerPoolStatus {
        ServerPoolStatus {
            conditions: owned_conditions(&c.conditions, CONDITIONS),
            ..c.clone()
        }
    }
}

/// The sessions that may count in `pool`: those on its servers and those of the workspaces
/// that name it ([`resolve::pool_view`] decides which do).
fn pool_candidates(ctx: &Context, dir: &Directory, pool: &ServerPool) -> Vec<Arc<Session>> {
    let ns = dir.namespace.as_str();
    let name = pool.name_any();
    let mut out: Vec<Arc<Session>> = dir
        .servers_of_pool(&name)
        .iter()
        .flat_map(|s| ctx.stores.sessions_on_server(ns, &s.name_any()))
        .collect();
    out.extend(
        dir.workspaces
            .iter()
            .filter(|w| w.spec.server_pool.as_deref() == Some(name.as_str()))
            .flat_map(|w| ctx.stores.sessions_of_workspace(ns, &w.name_any())),
    );
    out.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    out.dedup_by(|a, b| a.metadata.name == b.metadata.name);
    out
}

fn pools_in(stores: &Stores, ns: Option<String>) -> Vec<ObjectRef<ServerPool>> {
    status::refs(stores.pools.state_filter(|p| p.metadata.namespace == ns))
}

fn pool_ref(ns: &Option<String>, name: &str) -> Option<ObjectRef<ServerPool>> {
    ns.as_ref().map(|ns| ObjectRef::new(name).within(ns))
}

/// The pools a session counts in: its server's, and its workspace's.
fn pools_of_session(stores: &Stores, s: &Session) -> Vec<ObjectRef<ServerPool>> {
    let Some(ns) = s.namespace() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Some(server) = s.status.as_ref().and_then(|st| st.server.as_ref())
        && let Some(srv) = stores.servers.get(&ObjectRef::new(server).within(&ns))
    {
        out.push(ObjectRef::new(&srv.spec.pool).within(&ns));
    }
    if let Some(w) = stores
        .workspaces
        .get(&ObjectRef::new(&s.spec.workspace).within(&ns))
        && let Some(p) = &w.spec.server_pool
    {
        out.push(ObjectRef::new(p).within(&ns));
    }
    out
}

/// Builds the ServerPool status controller over the shared caches.
pub fn controller(r: &mut Reflectors, ctx: Arc<Context>) -> BoxFuture<'static, ()> {
    Triggers::<ServerPool>::new(&r.pools, ctx)
        .refresh_within(super::NODE_REFRESH)
        .on(&mut r.servers, |s, x: &Server| pools_in(s, x.namespace()))
        .on(&mut r.sessions, pools_of_session)
        .on_changes(&r.workspaces, |_, w: &Workspace| {
            w.spec
                .server_pool
                .as_deref()
                .and_then(|p| pool_ref(&w.namespace(), p))
        })
        .run()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures;

    fn pool(spec: serde_json::Value) -> ServerPool {
        fixtures::object("ServerPool", "p", "ns", spec)
    }

    #[test]
    fn pools_without_servers_are_not_ready_unless_autoscaled() {
        let d = Directory {
            namespace: "ns".into(),
            ..Directory::default()
        };
        let now = Time("2026-01-01T00:00:00Z".parse().unwrap());
        let s = desired_status(&d, &pool(serde_json::json!({})), 0, &[], None, &now);
        assert_eq!(s.servers, Some(0));
        assert_eq!(s.capacity, Some(0));
        assert_eq!(s.conditions[0].reason, "NoServers");
        let auto = pool(serde_json::json!({
            "autoscale": {"nodeSelector": {"a": "b"}, "maxSessionsPerServer": 2}
        }));
        let s = desired_status(&d, &auto, 3, &[], None, &now);
        assert_eq!(s.servers, Some(3));
        assert_eq!(s.capacity, Some(6));
        assert_eq!(s.conditions[0].status, "True");
        // Written and read back, then recomputed later: nothing to write.
        let again = desired_status(&d, &auto, 3, &[], None, &fixtures::later());
        assert!(!ServerPool::changed(
            Some(&fixtures::round_trip(&s)),
            &again
        ));
    }
}
