//! The Group status controller: members (listed and auto-added local users), member count, and
//! whether the group's own settings are valid and consistent.

use std::sync::Arc;

use futures::future::BoxFuture;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::Context;
use super::status::{self, Cond, StatusView, Triggers, conditions, owned_conditions};
use super::stores::{Reflectors, Stores, digest, in_namespace};
use crate::crd::v1alpha1::{Group, GroupStatus, User, Workspace};
use crate::resolve::findings::group_findings;
use crate::resolve::{self, Code, Directory, Finding, Severity};

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

impl StatusView for Group {
    const KIND: &'static str = "Group";
    const MANAGER: &'static str = "cubicle/group-status";

    fn desired(ctx: &Context, dir: &Directory, group: &Group, now: &Time) -> GroupStatus {
        let users = in_namespace(&ctx.stores.users, &dir.namespace);
        desired_status(dir, group, &users, group.status.as_ref(), now)
    }

    fn owned(c: &GroupStatus) -> GroupStatus {
        GroupStatus {
            // The shared usage budget belongs to the usage ledger (another field manager).
            usage: Vec::new(),
            conditions: owned_conditions(&c.conditions, CONDITIONS),
            ..c.clone()
        }
    }
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
    Triggers::<Group>::new(&r.groups, ctx)
        // Membership reads Users' specs only: their status writes (one per launch) are no
        // trigger.
        .on_digest(
            &mut r.users,
            |u| digest(&u.metadata.generation),
            groups_of_user,
        )
        .on(&mut r.workspaces, groups_with_default_image)
        .run()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures;
    use crate::crd::Duration;
    use crate::crd::v1alpha1::{GroupSettings, GroupSpec};

    fn user(name: &str, groups: &[&str], realm: Option<&str>) -> Arc<User> {
        Arc::new(fixtures::user(
            name,
            groups,
            serde_json::json!({ "realm": realm }),
        ))
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
        // Written and read back, then recomputed later: nothing to write.
        let again = desired_status(&d, &g, &users, None, &fixtures::later());
        assert!(!Group::changed(Some(&fixtures::round_trip(&s)), &again));
        let fewer = desired_status(&d, &g, &users[..1], Some(&s), &now);
        assert!(Group::changed(Some(&s), &fewer));
    }
}
