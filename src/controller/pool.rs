//! The ServerPool status controller: servers (Server objects, or for an autoscaled pool the
//! nodes matching its selector), total session capacity and active sessions.
//!
//! Node changes are not a trigger (Nodes are cached without a change stream); the periodic
//! resync picks up an autoscaled pool's growth and shrinkage.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, stream};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::controller::{Action, Config, Controller};
use kube::runtime::reflector::ObjectRef;

use super::status::{self, Cond, Written, comparable, conditions, directory, owned_conditions};
use super::stores::{Reflectors, Stores};
use super::{Context, Error};
use crate::crd::v1alpha1::{Server, ServerPool, ServerPoolStatus, Session, Workspace};
use crate::resolve::{self, Directory};

/// Kind label for metrics and errors.
pub const KIND: &str = "ServerPool";
/// Field manager of the status this controller applies.
pub const MANAGER: &str = "cubicle/serverpool-status";
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

/// Whether `desired` differs from the fields of `current` this controller owns.
pub fn changed(current: Option<&ServerPoolStatus>, desired: &ServerPoolStatus) -> bool {
    let owned = current.map(|c| ServerPoolStatus {
        conditions: owned_conditions(&c.conditions, CONDITIONS),
        ..c.clone()
    });
    comparable(&owned.unwrap_or_default()) != comparable(desired)
}

async fn reconcile(
    pool: Arc<ServerPool>,
    ctx: Arc<Context>,
    written: Arc<Written>,
) -> Result<Action, Error> {
    ctx.wait_synced().await;
    let _timer = ctx.metrics.reconcile_timer(KIND);
    let name = pool.name_any();
    let ns = pool.namespace().ok_or_else(|| Error::NoNamespace {
        kind: KIND,
        name: name.clone(),
    })?;
    let dir = directory(&ctx.stores, &ns);
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
    let sessions = ctx
        .stores
        .sessions
        .state_filter(|s| s.metadata.namespace.as_deref() == Some(ns.as_str()));
    let now = Time(jiff::Timestamp::now());
    let desired = desired_status(&dir, &pool, matching, &sessions, pool.status.as_ref(), &now);
    if changed(pool.status.as_ref(), &desired) && !written.already(pool.as_ref(), &desired) {
        status::apply::<ServerPool>(&ctx.client, &ns, &name, MANAGER, &desired).await?;
        written.record(pool.as_ref(), &desired);
    }
    ctx.backoff
        .succeeded(&ObjectRef::from_obj(pool.as_ref()).to_string());
    Ok(Action::requeue(ctx.config.resync))
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
    let written = Arc::new(Written::default());
    let s = ctx.stores.clone();
    let on_server = {
        let s = s.clone();
        move |x: Arc<Server>| pools_in(&s, x.namespace())
    };
    let on_session = {
        let s = s.clone();
        move |x: Arc<Session>| pools_of_session(&s, &x)
    };
    let on_workspace = |w: Arc<Workspace>| {
        w.spec
            .server_pool
            .as_deref()
            .and_then(|p| pool_ref(&w.namespace(), p))
    };
    let deleted_servers = {
        let f = on_server.clone();
        r.servers
            .subscribe_deletes()
            .flat_map(move |x| stream::iter(f(x)))
    };
    let deleted_sessions = {
        let f = on_session.clone();
        r.sessions
            .subscribe_deletes()
            .flat_map(move |x| stream::iter(f(x)))
    };
    Controller::for_shared_stream(r.pools.subscribe(), r.pools.reader.clone())
        .watches_shared_stream(r.servers.subscribe(), on_server)
        .watches_shared_stream(r.sessions.subscribe(), on_session)
        .watches_shared_stream(r.workspaces.subscribe(), on_workspace)
        .reconcile_on(deleted_servers)
        .reconcile_on(deleted_sessions)
        .with_config(Config::default().concurrency(ctx.config.concurrency))
        .run(
            move |obj, ctx| reconcile(obj, ctx, written.clone()),
            |x, e, ctx: Arc<Context>| ctx.on_error(KIND, &ObjectRef::from_obj(x.as_ref()), e),
            ctx,
        )
        .for_each(|_| futures::future::ready(()))
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(spec: serde_json::Value) -> ServerPool {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cubicle.dev/v1alpha1", "kind": "ServerPool",
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": spec
        }))
        .unwrap()
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
        assert!(!changed(Some(&s), &s));
    }
}
