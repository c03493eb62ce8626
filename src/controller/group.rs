//! The Group status controller: members (listed and auto-added local users), member count, and
//! whether the group's own settings are valid and consistent.

use std::sync::Arc;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, stream};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::controller::{Action, Config, Controller};
use kube::runtime::reflector::ObjectRef;

use super::status::{self, Cond, Written, comparable, conditions, directory, owned_conditions};
use super::stores::{Reflectors, Stores, in_namespace};
use super::{Context, Error};
use crate::crd::v1alpha1::{Group, GroupStatus, User, Workspace};
use crate::resolve::findings::group_findings;
use crate::resolve::{self, Code, Directory, Finding, Severity};

/// Kind label for metrics and errors.
pub const KIND: &str = "Group";
/// Field manager of the status this controller applies.
pub const MANAGER: &str = "cubicle/group-status";
/// The condition types this controller owns.
pub const CONDITIONS: &[&str] = &["Ready", "SettingsInconsistent"];

fn joined(fs: &[&Finding]) -> String {
    fs.iter()
        .map(|f| format!("{}: {}", f.field, f.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The status the controller wants for `group` (pure); `users` are the namespace's users.
pub fn desired_status(
    dir: &Directory,
    group: &Group,
    users: &[Arc<User>],
    current: Option<&GroupStatus>,
    now: &Time,
) -> GroupStatus {
    let members = resolve::group_members(group, users);
    let findings = group_findings(dir, &group.name_any(), &group.spec.settings);
    let errors: Vec<&Finding> = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .collect();
    let ready = match errors.first() {
        None => Cond::new(
            "Ready",
            true,
            "Resolved",
            format!(
                "{} members; priority {}",
                members.len(),
                group.spec.priority
            ),
        ),
        Some(first) => Cond::new("Ready", false, first.code.as_str(), joined(&errors)),
    };
    let inconsistent: Vec<&Finding> = findings
        .iter()
        .filter(|f| {
            matches!(
                f.code,
                Code::KeepaliveExpirationTooShort | Code::IdleDisconnectTooShort
            )
        })
        .collect();
    let consistency = match inconsistent.first() {
        None => Cond::new(
            "SettingsInconsistent",
            false,
            "Consistent",
            "the group's lifetime settings are consistent",
        ),
        Some(first) => Cond::new(
            "SettingsInconsistent",
            true,
            first.code.as_str(),
            joined(&inconsistent),
        ),
    };
    let generation = group.metadata.generation;
    GroupStatus {
        member_count: Some(members.len() as u32),
        members,
        conditions: conditions(
            vec![ready, consistency],
            current.map(|c| c.conditions.as_slice()).unwrap_or(&[]),
            generation,
            now,
        ),
        observed_generation: generation,
        usage: Vec::new(),
    }
}

/// Whether `desired` differs from the fields of `current` this controller owns.
pub fn changed(current: Option<&GroupStatus>, desired: &GroupStatus) -> bool {
    let owned = current.map(|c| GroupStatus {
        // The shared usage budget belongs to the usage ledger (another field manager).
        usage: Vec::new(),
        conditions: owned_conditions(&c.conditions, CONDITIONS),
        ..c.clone()
    });
    comparable(&owned.unwrap_or_default()) != comparable(desired)
}

async fn reconcile(
    group: Arc<Group>,
    ctx: Arc<Context>,
    written: Arc<Written>,
) -> Result<Action, Error> {
    ctx.wait_synced().await;
    let _timer = ctx.metrics.reconcile_timer(KIND);
    let name = group.name_any();
    let ns = group.namespace().ok_or_else(|| Error::NoNamespace {
        kind: KIND,
        name: name.clone(),
    })?;
    let dir = directory(&ctx.stores, &ns);
    let users = in_namespace(&ctx.stores.users, &ns);
    let now = Time(jiff::Timestamp::now());
    let desired = desired_status(&dir, &group, &users, group.status.as_ref(), &now);
    if changed(group.status.as_ref(), &desired) && !written.already(group.as_ref(), &desired) {
        status::apply::<Group>(&ctx.client, &ns, &name, MANAGER, &desired).await?;
        written.record(group.as_ref(), &desired);
    }
    ctx.backoff
        .succeeded(&ObjectRef::from_obj(group.as_ref()).to_string());
    Ok(Action::requeue(ctx.config.resync))
}

/// The groups `u` is in, by its spec now or by their status before (a user leaving a group).
pub fn groups_of_user(stores: &Stores, u: &User) -> Vec<ObjectRef<Group>> {
    let Some(ns) = u.namespace() else {
        return Vec::new();
    };
    let name = u.name_any();
    let local = resolve::is_local(u);
    status::refs(stores.groups.state_filter(|g| {
        g.metadata.namespace.as_deref() == Some(ns.as_str())
            && (g
                .metadata
                .name
                .as_ref()
                .is_some_and(|n| u.spec.groups.contains(n))
                || (local && g.spec.settings.auto_add_local_users == Some(true))
                || g.status.as_ref().is_some_and(|s| s.members.contains(&name)))
    }))
}

fn groups_with_default_image(stores: &Stores, w: &Workspace) -> Vec<ObjectRef<Group>> {
    let name = w.name_any();
    let ns = w.namespace();
    status::refs(stores.groups.state_filter(|g| {
        g.metadata.namespace == ns && g.spec.settings.default_image.as_deref() == Some(&name)
    }))
}

/// Builds the Group status controller over the shared caches.
pub fn controller(r: &mut Reflectors, ctx: Arc<Context>) -> BoxFuture<'static, ()> {
    let written = Arc::new(Written::default());
    let s = ctx.stores.clone();
    let on_user = {
        let s = s.clone();
        move |u: Arc<User>| groups_of_user(&s, &u)
    };
    let on_workspace = {
        let s = s.clone();
        move |w: Arc<Workspace>| groups_with_default_image(&s, &w)
    };
    let deleted_users = {
        let f = on_user.clone();
        r.users
            .subscribe_deletes()
            .flat_map(move |u| stream::iter(f(u)))
    };
    let deleted_workspaces = {
        let f = on_workspace.clone();
        r.workspaces
            .subscribe_deletes()
            .flat_map(move |w| stream::iter(f(w)))
    };
    Controller::for_shared_stream(r.groups.subscribe(), r.groups.reader.clone())
        .watches_shared_stream(r.users.subscribe(), on_user)
        .watches_shared_stream(r.workspaces.subscribe(), on_workspace)
        .reconcile_on(deleted_users)
        .reconcile_on(deleted_workspaces)
        .with_config(Config::default().concurrency(ctx.config.concurrency))
        .run(
            move |obj, ctx| reconcile(obj, ctx, written.clone()),
            |g, e, ctx: Arc<Context>| ctx.on_error(KIND, &ObjectRef::from_obj(g.as_ref()), e),
            ctx,
        )
        .for_each(|_| futures::future::ready(()))
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Duration;
    use crate::crd::v1alpha1::{GroupSettings, GroupSpec};

    fn user(name: &str, groups: &[&str], realm: Option<&str>) -> Arc<User> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "cubicle.dev/v1alpha1", "kind": "User",
                "metadata": {"name": name, "namespace": "ns"},
                "spec": {"groups": groups, "realm": realm}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn members_and_consistency() {
        let mut g = Group::new(
            "all",
            GroupSpec {
                priority: 100,
                description: None,
                settings: GroupSettings {
                    auto_add_local_users: Some(true),
                    keepalive_interval: Some(Duration::new("40m")),
                    ..Default::default()
                },
            },
        );
        g.metadata.namespace = Some("ns".into());
        g.metadata.generation = Some(2);
        let users = vec![
            user("carol", &[], Some("saml")),
            user("bob", &["all"], Some("ldap")),
            user("alice", &[], None),
        ];
        let d = Directory {
            namespace: "ns".into(),
            ..Directory::default()
        };
        let now = Time("2026-01-01T00:00:00Z".parse().unwrap());
        let s = desired_status(&d, &g, &users, None, &now);
        assert_eq!(s.members, vec!["alice", "bob"]);
        assert_eq!(s.member_count, Some(2));
        assert_eq!(s.conditions[0].status, "True");
        assert_eq!(s.conditions[1].status, "True");
        assert_eq!(s.conditions[1].reason, "KeepaliveExpirationTooShort");
        assert!(
            s.conditions[1].message.contains("40m"),
            "{}",
            s.conditions[1].message
        );
        assert!(!changed(Some(&s), &s));
        let fewer = desired_status(&d, &g, &users[..1], Some(&s), &now);
        assert!(changed(Some(&s), &fewer));
    }
}
