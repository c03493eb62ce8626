//! The ServerAssignment status controller: every (user, server) pair and whether it is in
//! effect (the server's pool has assignment enabled), with the reason when not.

use std::sync::Arc;

use futures::future::BoxFuture;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::Context;
use super::status::{self, Cond, StatusView, Triggers, conditions, owned_conditions};
use super::stores::{Reflectors, Stores};
use crate::crd::v1alpha1::{
    AssignmentPair, Server, ServerAssignment, ServerAssignmentStatus, ServerPool, User,
};
use crate::resolve::findings::assignment_findings;
use crate::resolve::{self, Directory, Severity};

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

impl StatusView for ServerAssignment {
    const KIND: &'static str = "ServerAssignment";
    const MANAGER: &'static str = "cubicle/serverassignment-status";

    fn desired(
        ctx: &Context,
        dir: &Directory,
        a: &ServerAssignment,
        now: &Time,
    ) -> ServerAssignmentStatus {
        let users = &ctx.stores.users;
        let user_exists = |u: &str| {
            users
                .get(&ObjectRef::new(u).within(&dir.namespace))
                .is_some()
        };
        desired_status(dir, a, user_exists, a.status.as_ref(), now)
    }

    fn owned(c: &ServerAssignmentStatus) -> ServerAssignmentStatus {
        ServerAssignmentStatus {
            conditions: owned_conditions(&c.conditions, CONDITIONS),
            ..c.clone()
        }
    }
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
    Triggers::<ServerAssignment>::new(&r.assignments, ctx)
        .on(&mut r.users, |s, u: &User| {
            let name = u.name_any();
            assignments_where(s, u.namespace(), |a| a.spec.users.contains(&name))
        })
        .on(&mut r.servers, |s, x: &Server| {
            let name = x.name_any();
            assignments_where(s, x.namespace(), |a| a.spec.servers.contains(&name))
        })
        .on_changes(&r.pools, |s, p: &ServerPool| {
            let servers = servers_of_pool(s, p);
            assignments_where(s, p.namespace(), |a| {
                a.spec.servers.iter().any(|x| servers.contains(x))
                    || a.status.as_ref().is_some_and(|st| {
                        st.pairs.iter().any(|pair| servers.contains(&pair.server))
                    })
            })
        })
        // A deleted pool's servers are still cached: their assignments lose effect.
        .on_deletes(&mut r.pools, |s, p: &ServerPool| {
            let servers = servers_of_pool(s, p);
            assignments_where(s, p.namespace(), |a| {
                a.spec.servers.iter().any(|x| servers.contains(x))
            })
        })
        .run()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures;

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
        // Written and read back, then recomputed later: nothing to write.
        let again = desired_status(&d, &a, |u: &str| u == "erin", None, &fixtures::later());
        assert!(!ServerAssignment::changed(
            Some(&fixtures::round_trip(&s)),
            &again
        ));
    }
}
