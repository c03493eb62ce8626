//! The ServerAssignment status controller: every (user, server) pair and whether it is in
//! effect (the server's pool has assignment enabled), with the reason when not.

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
use crate::crd::v1alpha1::{
    AssignmentPair, Server, ServerAssignment, ServerAssignmentStatus, ServerPool, User,
};
use crate::resolve::findings::assignment_findings;
use crate::resolve::{self, Directory, Severity};

/// Kind label for metrics and errors.
pub const KIND: &str = "ServerAssignment";
/// Field manager of the status this controller applies.
pub const MANAGER: &str = "cubicle/serverassignment-status";
/// The condition types this controller owns.
pub const CONDITIONS: &[&str] = &["Ready", "InEffect"];

/// The status the controller wants for `a` (pure).
pub fn desired_status(
    dir: &Directory,
    a: &ServerAssignment,
    user_exists: impl Fn(&str) -> bool + Copy,
    current: Option<&ServerAssignmentStatus>,
    now: &Time,
) -> ServerAssignmentStatus {
    let pairs = resolve::assignment_pairs_of(dir, a, user_exists);
    let errors: Vec<String> = assignment_findings(dir, a, user_exists)
        .into_iter()
        .filter(|f| f.severity == Severity::Error)
        .map(|f| format!("{}: {}", f.field, f.message))
        .collect();
    let ready = if errors.is_empty() {
        Cond::new("Ready", true, "Resolved", "every user and server exists")
    } else {
        Cond::new("Ready", false, "UnknownReference", errors.join("; "))
    };
    let off: Vec<&resolve::AssignmentPairView> = pairs.iter().filter(|p| !p.in_effect).collect();
    let in_effect = match off.first() {
        None => Cond::new(
            "InEffect",
            true,
            "AssignmentEnabled",
            format!("all {} pairs are in effect", pairs.len()),
        ),
        Some(first) => Cond::new(
            "InEffect",
            false,
            first.reason.unwrap_or("NotInEffect"),
            format!(
                "{} of {} pairs not in effect: {}",
                off.len(),
                pairs.len(),
                off.iter()
                    .map(|p| format!("{}/{} ({})", p.user, p.server, p.reason.unwrap_or("?")))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    };
    let generation = a.metadata.generation;
    ServerAssignmentStatus {
        pairs: pairs
            .into_iter()
            .map(|p| AssignmentPair {
                user: p.user,
                server: p.server,
                in_effect: p.in_effect,
                reason: p.reason.map(str::to_string),
            })
            .collect(),
        conditions: conditions(
            vec![ready, in_effect],
            current.map(|c| c.conditions.as_slice()).unwrap_or(&[]),
            generation,
            now,
        ),
        observed_generation: generation,
    }
}

/// Whether `desired` differs from the fields of `current` this controller owns.
pub fn changed(current: Option<&ServerAssignmentStatus>, desired: &ServerAssignmentStatus) -> bool {
    let owned = current.map(|c| ServerAssignmentStatus {
        conditions: owned_conditions(&c.conditions, CONDITIONS),
        ..c.clone()
    });
    comparable(&owned.unwrap_or_default()) != comparable(desired)
}

async fn reconcile(
    a: Arc<ServerAssignment>,
    ctx: Arc<Context>,
    written: Arc<Written>,
) -> Result<Action, Error> {
    ctx.wait_synced().await;
    let _timer = ctx.metrics.reconcile_timer(KIND);
    let name = a.name_any();
    let ns = a.namespace().ok_or_else(|| Error::NoNamespace {
        kind: KIND,
        name: name.clone(),
    })?;
    let dir = directory(&ctx.stores, &ns);
    let users = &ctx.stores.users;
    let user_exists = |u: &str| users.get(&ObjectRef::new(u).within(&ns)).is_some();
    let now = Time(jiff::Timestamp::now());
    let desired = desired_status(&dir, &a, &user_exists, a.status.as_ref(), &now);
    if changed(a.status.as_ref(), &desired) && !written.already(a.as_ref(), &desired) {
        status::apply::<ServerAssignment>(&ctx.client, &ns, &name, MANAGER, &desired).await?;
        written.record(a.as_ref(), &desired);
    }
    ctx.backoff
        .succeeded(&ObjectRef::from_obj(a.as_ref()).to_string());
    Ok(Action::requeue(ctx.config.resync))
}

fn assignments_where(
    stores: &Stores,
    ns: Option<String>,
    pred: impl Fn(&ServerAssignment) -> bool,
) -> Vec<ObjectRef<ServerAssignment>> {
    status::refs(
        stores
            .assignments
            .state_filter(|a| a.metadata.namespace == ns && pred(a)),
    )
}

fn servers_of_pool(stores: &Stores, p: &ServerPool) -> Vec<String> {
    let pool = p.name_any();
    stores
        .servers
        .state_filter(|s| s.metadata.namespace == p.metadata.namespace && s.spec.pool == pool)
        .iter()
        .map(|s| s.name_any())
        .collect()
}

/// Builds the ServerAssignment status controller over the shared caches.
pub fn controller(r: &mut Reflectors, ctx: Arc<Context>) -> BoxFuture<'static, ()> {
    let written = Arc::new(Written::default());
    let s = ctx.stores.clone();
    let on_user = {
        let s = s.clone();
        move |u: Arc<User>| {
            let name = u.name_any();
            assignments_where(&s, u.namespace(), |a| a.spec.users.contains(&name))
        }
    };
    let on_server = {
        let s = s.clone();
        move |x: Arc<Server>| {
            let name = x.name_any();
            assignments_where(&s, x.namespace(), |a| a.spec.servers.contains(&name))
        }
    };
    let on_pool = {
        let s = s.clone();
        move |p: Arc<ServerPool>| {
            let servers = servers_of_pool(&s, &p);
            assignments_where(&s, p.namespace(), |a| {
                a.spec.servers.iter().any(|x| servers.contains(x))
                    || a.status.as_ref().is_some_and(|st| {
                        st.pairs.iter().any(|pair| servers.contains(&pair.server))
                    })
            })
        }
    };
    let deleted_users = {
        let f = on_user.clone();
        r.users
            .subscribe_deletes()
            .flat_map(move |x| stream::iter(f(x)))
    };
    let deleted_servers = {
        let f = on_server.clone();
        r.servers
            .subscribe_deletes()
            .flat_map(move |x| stream::iter(f(x)))
    };
    let deleted_pools = {
        let s = s.clone();
        // A deleted pool's servers are still cached: their assignments lose effect.
        r.pools
            .subscribe_deletes()
            .flat_map(move |p: Arc<ServerPool>| {
                let servers = servers_of_pool(&s, &p);
                stream::iter(assignments_where(&s, p.namespace(), |a| {
                    a.spec.servers.iter().any(|x| servers.contains(x))
                }))
            })
    };
    Controller::for_shared_stream(r.assignments.subscribe(), r.assignments.reader.clone())
        .watches_shared_stream(r.users.subscribe(), on_user)
        .watches_shared_stream(r.servers.subscribe(), on_server)
        .watches_shared_stream(r.pools.subscribe(), on_pool)
        .reconcile_on(deleted_users)
        .reconcile_on(deleted_servers)
        .reconcile_on(deleted_pools)
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

    fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).unwrap())
    }

    #[test]
    fn pairs_and_conditions() {
        let d = Directory {
            namespace: "ns".into(),
            pools: vec![obj(serde_json::json!({
                "apiVersion": "cubicle.dev/v1alpha1", "kind": "ServerPool",
                "metadata": {"name": "shared", "namespace": "ns"},
                "spec": {}
            }))],
            servers: vec![obj(serde_json::json!({
                "apiVersion": "cubicle.dev/v1alpha1", "kind": "Server",
                "metadata": {"name": "ws-03", "namespace": "ns"},
                "spec": {"pool": "shared", "nodeName": "n"}
            }))],
            ..Directory::default()
        };
        let a: ServerAssignment = serde_json::from_value(serde_json::json!({
            "apiVersion": "cubicle.dev/v1alpha1", "kind": "ServerAssignment",
            "metadata": {"name": "erin-spare", "namespace": "ns", "generation": 4},
            "spec": {"users": ["erin", "nobody"], "servers": ["ws-03"]}
        }))
        .unwrap();
        let now = Time("2026-01-01T00:00:00Z".parse().unwrap());
        let s = desired_status(&d, &a, |u: &str| u == "erin", None, &now);
        assert_eq!(
            s.pairs,
            vec![
                AssignmentPair {
                    user: "erin".into(),
                    server: "ws-03".into(),
                    in_effect: false,
                    reason: Some("AssignmentDisabled".into())
                },
                AssignmentPair {
                    user: "nobody".into(),
                    server: "ws-03".into(),
                    in_effect: false,
                    reason: Some("UnknownUser".into())
                },
            ]
        );
        assert_eq!(s.conditions[0].status, "False");
        assert!(s.conditions[0].message.contains("User/nobody"));
        assert_eq!(s.conditions[1].reason, "AssignmentDisabled");
        assert_eq!(s.observed_generation, Some(4));
        assert!(!changed(Some(&s), &s));
    }
}
