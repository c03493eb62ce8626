//! Pure resolution of the declared objects of one namespace into what each person effectively
//! gets: groups, settings with provenance, file and volume mappings, assigned servers, which
//! workspaces they may launch and where, and the findings (conflicts, unknown references,
//! inconsistent settings) a platform team should see.
//!
//! No Kubernetes client, no async runtime, no clock: the controllers (from their caches) and the
//! offline `cubicle validate`/`cubicle plan` (from a config repository) call the same functions
//! with the same inputs, so the operator and the validator can never disagree.
//!
//! Rules (Kasm seeds 000 and 002):
//! - each setting comes from the user's group with the **lowest priority number** that sets it;
//!   equal priorities are broken by group name and reported ([`Conflict::PriorityTie`]) when the
//!   tied groups set different values;
//! - `volumeMappings` and `fileMappings` combine across all the user's groups; for one mount path,
//!   volume name or file destination the group with the lower priority number wins (reported);
//!   for file mappings the user's own win over the groups', and the groups' over the Workspace's;
//! - user settings override group settings where the seeds say so (`defaultWorkspace` over
//!   `defaultImage`);
//! - Kasm's defaults apply where nothing is set (see [`settings::DEFAULTS`]).

pub mod access;
pub mod findings;
pub mod settings;
pub mod views;

use std::sync::Arc;

use kube::ResourceExt;

use crate::crd::v1alpha1::{
    Group, Realm, Server, ServerAssignment, ServerPool, Session, SessionPhase, User, Workspace,
};

pub use access::{
    Access, Candidate, Denial, access, access_assigned, file_mappings_for, volume_mappings_for,
};
pub use findings::{Code, Finding, Severity, findings};
pub use settings::{
    Conflict, EffectiveControlPanel, EffectiveSettings, Origin, Resolved, ResolvedFileMapping,
    ResolvedUsageLimit, resolve_user,
};
pub use views::{
    AssignmentPairView, PoolView, assignment_pairs, assignment_pairs_of, group_members, pool_view,
    server_assigned_users, server_sessions, user_assigned_servers, user_sessions,
};

/// One namespace's small kinds: everything resolution needs except Users and Sessions, which
/// are passed separately because there can be tens of thousands of them.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    /// The namespace (a Cubicle tenant; references never cross namespaces).
    pub namespace: String,
    /// Groups.
    pub groups: Vec<Arc<Group>>,
    /// Workspaces.
    pub workspaces: Vec<Arc<Workspace>>,
    /// Server pools.
    pub pools: Vec<Arc<ServerPool>>,
    /// Servers.
    pub servers: Vec<Arc<Server>>,
    /// Server assignments.
    pub assignments: Vec<Arc<ServerAssignment>>,
}

impl Directory {
    /// The group named `name`.
    pub fn group(&self, name: &str) -> Option<&Arc<Group>> {
        self.groups
            .iter()
            .find(|g| g.metadata.name.as_deref() == Some(name))
    }

    /// The workspace named `name`.
    pub fn workspace(&self, name: &str) -> Option<&Arc<Workspace>> {
        self.workspaces
            .iter()
            .find(|w| w.metadata.name.as_deref() == Some(name))
    }

    /// The pool named `name`.
    pub fn pool(&self, name: &str) -> Option<&Arc<ServerPool>> {
        self.pools
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
    }

    /// The server named `name`.
    pub fn server(&self, name: &str) -> Option<&Arc<Server>> {
        self.servers
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
    }

    /// The servers of pool `pool`, sorted by name.
    pub fn servers_of_pool(&self, pool: &str) -> Vec<Arc<Server>> {
        let mut v: Vec<_> = self
            .servers
            .iter()
            .filter(|s| s.spec.pool == pool)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        v
    }
}

/// The user's login name: `spec.username`, defaulting to `metadata.name`.
pub fn username(user: &User) -> String {
    user.spec
        .username
        .clone()
        .unwrap_or_else(|| user.name_any())
}

/// Whether the user is of realm `local` (an unset realm counts as local), and so a member of
/// every group with `autoAddLocalUsers`.
pub fn is_local(user: &User) -> bool {
    matches!(user.spec.realm, None | Some(Realm::Local))
}

/// The UUID namespace of derived user ids: UUIDv5 of the DNS name `cubicle.dev`.
fn user_id_namespace() -> uuid::Uuid {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_DNS, b"cubicle.dev")
}

/// The user id in effect for `{user_id}`: `spec.userId`, or, when unset, the UUIDv5 (in the
/// `cubicle.dev` UUID namespace) of `"<namespace>/<username>"`. Deterministic, so deleting and
/// re-creating a User (a GitOps prune and re-sync) keeps the same id and the same profiles.
pub fn user_id(namespace: &str, user: &User) -> String {
    match &user.spec.user_id {
        Some(id) => id.clone(),
        None => derived_user_id(namespace, &username(user)),
    }
}

/// The derived user id of `username` in `namespace` (see [`user_id`]).
pub fn derived_user_id(namespace: &str, username: &str) -> String {
    uuid::Uuid::new_v5(
        &user_id_namespace(),
        format!("{namespace}/{username}").as_bytes(),
    )
    .hyphenated()
    .to_string()
}

/// Whether a session counts as active (not ended): phase `Pending`, `Running`, `Paused` or
/// `Stopped`, or no phase yet (just created, not yet seen by the operator).
pub fn session_is_active(session: &Session) -> bool {
    match session.status.as_ref().and_then(|s| s.phase) {
        None => true,
        Some(p) => matches!(
            p,
            SessionPhase::Pending
                | SessionPhase::Running
                | SessionPhase::Paused
                | SessionPhase::Stopped
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, username: Option<&str>) -> User {
        crate::controller::fixtures::user(name, &[], serde_json::json!({"username": username}))
    }

    #[test]
    fn user_id_is_stable_and_depends_on_namespace_and_username() {
        let a = user("alice", None);
        let id = user_id("northwind", &a);
        assert_eq!(id, user_id("northwind", &a), "deterministic");
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "5", "a version 5 UUID");
        // The object name only matters through the username default.
        assert_eq!(id, user_id("northwind", &user("other", Some("alice"))));
        assert_ne!(id, user_id("southwind", &a));
        assert_ne!(id, user_id("northwind", &user("bob", None)));
        // A fixed value, so that a change of derivation (which would orphan every profile)
        // cannot go unnoticed.
        assert_eq!(id, derived_user_id("northwind", "alice"));
        assert_eq!(
            derived_user_id("northwind", "alice"),
            uuid::Uuid::new_v5(
                &uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_DNS, b"cubicle.dev"),
                b"northwind/alice"
            )
            .to_string()
        );
        let mut set = a.clone();
        set.spec.user_id = Some("fixed-id".into());
        assert_eq!(user_id("northwind", &set), "fixed-id");
    }

    #[test]
    fn username_defaults_to_the_object_name_and_realm_to_local() {
        assert_eq!(username(&user("alice", None)), "alice");
        assert_eq!(username(&user("bob", Some("bob.martin"))), "bob.martin");
        let mut u = user("x", None);
        assert!(is_local(&u));
        u.spec.realm = Some(Realm::Ldap);
        assert!(!is_local(&u));
        u.spec.realm = Some(Realm::Local);
        assert!(is_local(&u));
    }
}
