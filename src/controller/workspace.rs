//! The Workspace status controller: `Ready` when the Groups and the ServerPool a workspace names
//! exist, with the first problem as the reason otherwise (the same findings `cubicle check`
//! reports).

use std::sync::Arc;

use futures::future::BoxFuture;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::Context;
use super::status::{self, Cond, StatusView, Triggers, conditions, owned_conditions};
use super::stores::{Reflectors, Stores};
use crate::crd::v1alpha1::{Group, Server, ServerPool, Workspace, WorkspaceStatus};
use crate::resolve::findings::workspace_findings;
use crate::resolve::{Directory, Finding, Severity};

/// The condition types this controller owns.
pub const CONDITIONS: &[&str] = &["Ready"];

/// The status the controller wants for `ws` (pure).
pub fn desired_status(
    dir: &Directory,
    ws: &Workspace,
    current: Option<&WorkspaceStatus>,
    now: &Time,
) -> WorkspaceStatus {
    let findings = workspace_findings(dir, ws);
    let errors: Vec<&Finding> = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .collect();
    let ready = match errors.first() {
        None => {
            let mut msg = format!("image {}; {} groups", ws.spec.image, ws.spec.groups.len());
            for w in findings.iter().filter(|f| f.severity != Severity::Error) {
                msg.push_str(&format!("; warning: {}: {}", w.field, w.message));
            }
            Cond::new("Ready", true, "Resolved", msg)
        }
        Some(first) => Cond::new(
            "Ready",
            false,
            first.code.as_str(),
            errors
                .iter()
                .map(|f| format!("{}: {}", f.field, f.message))
                .collect::<Vec<_>>()
                .join("; "),
        ),
    };
    let generation = ws.metadata.generation;
    WorkspaceStatus {
        conditions: conditions(
            vec![ready],
            current.map(|c| c.conditions.as_slice()).unwrap_or(&[]),
            generation,
            now,
        ),
        observed_generation: generation,
        // Not this controller's field.
        sessions: None,
    }
}

impl StatusView for Workspace {
    const KIND: &'static str = "Workspace";
    const MANAGER: &'static str = "cubicle/workspace-status";

    fn desired(_ctx: &Context, dir: &Directory, ws: &Workspace, now: &Time) -> WorkspaceStatus {
        desired_status(dir, ws, ws.status.as_ref(), now)
    }

    fn owned(c: &WorkspaceStatus) -> WorkspaceStatus {
        WorkspaceStatus {
            sessions: None,
            conditions: owned_conditions(&c.conditions, CONDITIONS),
            ..c.clone()
        }
    }
}

fn workspaces_naming_group(stores: &Stores, g: &Group) -> Vec<ObjectRef<Workspace>> {
    let name = g.name_any();
    let ns = g.namespace();
    status::refs(
        stores
            .workspaces
            .state_filter(|w| w.metadata.namespace == ns && w.spec.groups.contains(&name)),
    )
}

fn workspaces_of_pool_named(
    stores: &Stores,
    ns: Option<String>,
    pool: &str,
) -> Vec<ObjectRef<Workspace>> {
    status::refs(stores.workspaces.state_filter(|w| {
        w.metadata.namespace == ns && w.spec.server_pool.as_deref() == Some(pool)
    }))
}

fn workspaces_of_pool(stores: &Stores, p: &ServerPool) -> Vec<ObjectRef<Workspace>> {
    workspaces_of_pool_named(stores, p.namespace(), &p.name_any())
}

fn workspaces_of_server(stores: &Stores, s: &Server) -> Vec<ObjectRef<Workspace>> {
    workspaces_of_pool_named(stores, s.namespace(), &s.spec.pool)
}

/// Builds the Workspace status controller over the shared caches.
pub fn controller(r: &mut Reflectors, ctx: Arc<Context>) -> BoxFuture<'static, ()> {
    Triggers::<Workspace>::new(&r.workspaces, ctx)
        .on(&mut r.groups, workspaces_naming_group)
        .on(&mut r.pools, workspaces_of_pool)
        .on(&mut r.servers, workspaces_of_server)
        .run()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures;

    fn ws(groups: &[&str], pool: Option<&str>) -> Workspace {
        let spec = serde_json::json!(
            {"image": "example.invalid/desktop:1", "groups": groups, "serverPool": pool});
        let mut w: Workspace = fixtures::object("Workspace", "desk", "ns", spec);
        w.metadata.generation = Some(3);
        w
    }

    fn group(name: &str) -> Arc<Group> {
        fixtures::group(name, 10, Default::default())
    }

    #[test]
    fn ready_when_its_groups_and_pool_exist_with_the_first_problem_otherwise() {
        let now = Time("2026-01-01T00:00:00Z".parse().unwrap());
        let mut d = Directory {
            namespace: "ns".into(),
            ..Directory::default()
        };
        let w = ws(&["everyone", "staff"], None);
        let s = desired_status(&d, &w, None, &now);
        assert_eq!(s.conditions.len(), 1);
        assert_eq!(s.conditions[0].type_, "Ready");
        assert_eq!(s.conditions[0].status, "False");
        assert_eq!(s.conditions[0].reason, "UnknownGroup");
        assert!(
            s.conditions[0]
                .message
                .contains("spec.groups[0]: Group/everyone does not exist")
                && s.conditions[0].message.contains("Group/staff"),
            "{}",
            s.conditions[0].message
        );
        assert_eq!(s.observed_generation, Some(3));

        d.groups = vec![group("everyone"), group("staff")];
        let ok = desired_status(&d, &w, Some(&s), &now);
        assert_eq!(ok.conditions[0].status, "True");
        assert_eq!(ok.conditions[0].reason, "Resolved");
        assert!(Workspace::changed(Some(&s), &ok));
        assert!(!Workspace::changed(Some(&ok), &ok));

        let pooled = ws(&["everyone"], Some("gpu"));
        let s = desired_status(&d, &pooled, None, &now);
        assert_eq!(s.conditions[0].status, "False");
        assert_eq!(s.conditions[0].reason, "UnknownPool");
        assert!(s.conditions[0].message.contains("spec.serverPool"));
    }
}
