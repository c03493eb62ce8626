//! The User status controller: user id, effective groups, every effective setting with its
//! provenance, assigned servers (in effect or not), active sessions and last session time.
//!
//! Triggers are precise: a Group change reconciles the Users that are or were its members, a
//! ServerAssignment change the users it names or named, a Session change its user. Statuses are
//! written only when they differ (ignoring timestamps), so a steady state makes no writes.
//! `status.usage` belongs to the usage ledger and is never written here.

use std::sync::Arc;

use futures::future::BoxFuture;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use super::Context;
use super::status::{self, Cond, StatusView, Triggers, comparable, conditions, owned_conditions};
use super::stores::{Reflectors, Stores, digest};
use crate::crd::v1alpha1::{
    Group, Server, ServerAssignment, ServerPool, Session, User, UserStatus, Workspace,
};
use crate::resolve::findings::duplicate_username_finding;
use crate::resolve::{self, Code, Directory, Finding, Severity};

/// The condition types this controller owns.
pub const CONDITIONS: &[&str] = &["Ready", "SettingsConflict", "SettingsInconsistent"];

/// The username of `u` (`spec.username`, else its name).
pub fn uname(u: &User) -> &str {
    u.spec
        .username
        .as_deref()
        .or(u.metadata.name.as_deref())
        .unwrap_or("")
}

/// Whether `u`'s status reports its username as shared with another User.
pub fn reported_duplicate(u: &User) -> bool {
    u.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.reason == Code::DuplicateUsername.as_str())
    })
}

fn joined(fs: &[&Finding]) -> String {
    fs.iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The status the controller wants for `user` (pure). `sessions` are the user's sessions,
/// `same_username` the other Users with the same username, `current` the status now (for
/// `lastSessionTime`, which never goes back, and condition transition times).
pub fn desired_status(
    dir: &Directory,
    user: &User,
    sessions: &[Arc<Session>],
    same_username: &[String],
    current: Option<&UserStatus>,
    now: &Time,
) -> UserStatus {
    let name = user.name_any();
    let r = resolve::resolve_user(dir, user);
    let (active, newest) = resolve::user_sessions(&name, sessions);
    let previous = current.and_then(|c| c.last_session_time.clone());
    let last_session_time = match (previous, newest) {
        (Some(a), Some(b)) => Some(if b.0 > a.0 { b } else { a }),
        (a, b) => a.or(b),
    };
    let mut findings = r.findings.clone();
    if !same_username.is_empty() {
        let mut all: Vec<String> = same_username.to_vec();
        all.push(name.clone());
        findings.push(duplicate_username_finding(
            &dir.namespace,
            &name,
            uname(user),
            user.spec.username.is_some(),
            &all,
        ));
    }
    let errors: Vec<&Finding> = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .collect();
    let from_groups = r
        .provenance
        .iter()
        .filter(|p| p.source.group.is_some() || !p.source.merged.is_empty())
        .count();
    let ready = match errors.first() {
        None => Cond::new(
            "Ready",
            true,
            "Resolved",
            format!(
                "member of {} groups; {} of {} settings set by groups or the user, the rest \
                 Kasm defaults",
                r.groups.len(),
                from_groups,
                r.provenance.len()
            ),
        ),
        Some(first) => Cond::new("Ready", false, first.code.as_str(), joined(&errors)),
    };
    let conflicts: Vec<&Finding> = findings
        .iter()
        .filter(|f| matches!(f.code, Code::PriorityTie | Code::MappingCollision))
        .collect();
    let conflict = match conflicts.first() {
        None => Cond::new("SettingsConflict", false, "NoConflict", "no conflict"),
        Some(first) => Cond::new(
            "SettingsConflict",
            true,
            first.code.as_str(),
            joined(&conflicts),
        ),
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
            "keepaliveExpiration, keepaliveInterval and idleDisconnect are consistent",
        ),
        Some(first) => Cond::new(
            "SettingsInconsistent",
            true,
            first.code.as_str(),
            joined(&inconsistent),
        ),
    };
    let generation = user.metadata.generation;
    let current_conditions = current.map(|c| c.conditions.as_slice()).unwrap_or(&[]);
    UserStatus {
        user_id: Some(resolve::user_id(&dir.namespace, user)),
        effective_groups: r.groups,
        effective_settings: r.provenance,
        assigned_servers: resolve::user_assigned_servers(dir, &name),
        active_sessions: Some(active),
        last_session_time,
        usage: Vec::new(),
        conditions: conditions(
            vec![ready, conflict, consistency],
            current_conditions,
            generation,
            now,
        ),
        observed_generation: generation,
        cached: Default::default(),
    }
}

/// The fields of `status` this controller owns, as it compares them (no usage, no other
/// writer's conditions, no timestamps).
fn owned_comparable(status: Option<&UserStatus>) -> serde_json::Value {
    comparable(&status.map(User::owned).unwrap_or_default())
}

/// A digest of the fields of `status` this controller owns, as [`User::changed`] compares
/// them: two statuses it finds equal have the same digest. The cache keeps it in each cached
/// User's status (`status.cached`, never serialized) instead of `status.effectiveSettings`.
pub fn status_digest(status: Option<&UserStatus>) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    status::hash_value(&owned_comparable(status), &mut h);
    h.finish()
}

impl StatusView for User {
    const KIND: &'static str = "User";
    const MANAGER: &'static str = "cubicle/user-status";

    fn desired(ctx: &Context, dir: &Directory, user: &User, now: &Time) -> UserStatus {
        let ns = dir.namespace.as_str();
        let sessions = ctx.stores.sessions_of_user(ns, &user.name_any());
        let same: Vec<String> = ctx
            .stores
            .users_named(ns, uname(user))
            .iter()
            .filter(|u| u.metadata.name != user.metadata.name)
            .map(|u| u.name_any())
            .collect();
        desired_status(dir, user, &sessions, &same, user.status.as_ref(), now)
    }

    fn owned(c: &UserStatus) -> UserStatus {
        UserStatus {
            usage: Vec::new(),
            conditions: owned_conditions(&c.conditions, CONDITIONS),
            ..c.clone()
        }
    }

    /// By the digest the cache keeps, or, for a User that was not trimmed by the cache (or has
    /// no status), by comparing the statuses.
    fn needs_write(&self, desired: &UserStatus) -> bool {
        match self.status.as_ref().and_then(|s| s.cached.0) {
            Some(digest) => digest != status_digest(Some(desired)),
            None => Self::changed(self.status.as_ref(), desired),
        }
    }
}

fn users_where(
    stores: &Stores,
    ns: Option<String>,
    pred: impl Fn(&User) -> bool,
) -> Vec<ObjectRef<User>> {
    let Some(ns) = ns else { return Vec::new() };
    status::refs(
        stores
            .users
            .state_filter(|u| u.metadata.namespace.as_deref() == Some(ns.as_str()) && pred(u)),
    )
}

/// Users that are, or according to their status were, members of `g`.
pub fn users_of_group(stores: &Stores, g: &Group) -> Vec<ObjectRef<User>> {
    let name = g.name_any();
    let auto = g.spec.settings.auto_add_local_users == Some(true);
    users_where(stores, g.namespace(), |u| {
        u.spec.groups.contains(&name)
            || (auto && resolve::is_local(u))
            || u.status
                .as_ref()
                .is_some_and(|s| s.effective_groups.iter().any(|e| e.name == name))
    })
}

/// Users whose assigned servers include `server` now or in their status.
fn users_of_servers(
    stores: &Stores,
    ns: Option<String>,
    servers: &[String],
) -> Vec<ObjectRef<User>> {
    let Some(ns_name) = ns.clone() else {
        return Vec::new();
    };
    let assigned: Vec<String> = stores
        .assignments
        .state_filter(|a| {
            a.metadata.namespace.as_deref() == Some(ns_name.as_str())
                && a.spec.servers.iter().any(|s| servers.contains(s))
        })
        .iter()
        .flat_map(|a| a.spec.users.clone())
        .collect();
    users_where(stores, ns, |u| {
        u.metadata
            .name
            .as_ref()
            .is_some_and(|n| assigned.contains(n))
            || u.status.as_ref().is_some_and(|s| {
                s.assigned_servers
                    .iter()
                    .any(|a| servers.contains(&a.server))
            })
    })
}

fn users_of_assignment(stores: &Stores, a: &ServerAssignment) -> Vec<ObjectRef<User>> {
    let listed = a.spec.users.clone();
    let servers = a.spec.servers.clone();
    users_where(stores, a.namespace(), |u| {
        u.metadata.name.as_ref().is_some_and(|n| listed.contains(n))
            || u.status.as_ref().is_some_and(|s| {
                s.assigned_servers
                    .iter()
                    .any(|x| servers.contains(&x.server))
            })
    })
}

fn users_of_pool(stores: &Stores, p: &ServerPool) -> Vec<ObjectRef<User>> {
    let pool = p.name_any();
    let ns = p.namespace();
    let servers: Vec<String> = stores
        .servers
        .state_filter(|s| s.spec.pool == pool && s.metadata.namespace == ns)
        .iter()
        .map(|s| s.name_any())
        .collect();
    let mut out = users_of_servers(stores, ns.clone(), &servers);
    out.extend(users_where(stores, ns, |u| {
        u.status.as_ref().is_some_and(|s| {
            s.assigned_servers
                .iter()
                .any(|x| x.pool.as_deref() == Some(pool.as_str()))
        })
    }));
    out
}

fn users_with_default_workspace(stores: &Stores, w: &Workspace) -> Vec<ObjectRef<User>> {
    let name = w.name_any();
    users_where(stores, w.namespace(), |u| {
        u.spec
            .settings
            .as_ref()
            .and_then(|s| s.default_workspace.as_deref())
            == Some(name.as_str())
    })
}

fn user_of_session(s: &Session) -> Vec<ObjectRef<User>> {
    match s.namespace() {
        Some(ns) => vec![ObjectRef::new(&s.spec.user).within(&ns)],
        None => Vec::new(),
    }
}

/// Other users sharing `u`'s username, and users reported as duplicates (which may no longer
/// be).
fn users_sharing_username(stores: &Stores, u: &User) -> Vec<ObjectRef<User>> {
    let Some(ns) = u.namespace() else {
        return Vec::new();
    };
    let mut others = stores.users_named(&ns, uname(u));
    others.extend(stores.users_reported_duplicate(&ns));
    others.retain(|o| o.metadata.name != u.metadata.name);
    status::refs(others)
}

/// Builds the User status controller over the shared caches.
pub fn controller(r: &mut Reflectors, ctx: Arc<Context>) -> BoxFuture<'static, ()> {
    Triggers::<User>::new(&r.users, ctx)
        .on(&mut r.groups, users_of_group)
        .on(&mut r.servers, |s, x: &Server| {
            users_of_servers(s, x.namespace(), &[x.name_any()])
        })
        .on(&mut r.pools, users_of_pool)
        .on(&mut r.assignments, users_of_assignment)
        .on_changes(&r.workspaces, users_with_default_workspace)
        .on(&mut r.sessions, |_, x: &Session| user_of_session(x))
        .on_digest(
            &mut r.users,
            |u| digest(&(&u.metadata.generation, reported_duplicate(u))),
            users_sharing_username,
        )
        .run()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::{self, group};
    use crate::crd::Duration;
    use crate::crd::v1alpha1::{GroupSettings, SessionPhase};

    fn user(name: &str, groups: &[&str]) -> User {
        let mut u = fixtures::user(name, groups, serde_json::json!({}));
        u.metadata.generation = Some(3);
        u
    }

    fn t(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    fn session(name: &str, user: &str, started: &str, phase: SessionPhase) -> Arc<Session> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "cubicle.dev/v1alpha1", "kind": "Session",
                "metadata": {"name": name, "namespace": "ns"},
                "spec": {"user": user, "workspace": "w"},
                "status": {"phase": phase, "startedAt": started}
            }))
            .unwrap(),
        )
    }

    fn dir(groups: Vec<Arc<Group>>) -> Directory {
        Directory {
            namespace: "ns".into(),
            groups,
            ..Directory::default()
        }
    }

    #[test]
    fn status_shows_groups_settings_sessions_and_conditions() {
        let d = dir(vec![group(
            "eng",
            10,
            GroupSettings {
                keepalive_interval: Some(Duration::new("1m")),
                ..Default::default()
            },
        )]);
        let u = user("alice", &["eng"]);
        let sessions = vec![
            session("a", "alice", "2026-01-01T10:00:00Z", SessionPhase::Running),
            session("b", "alice", "2026-01-02T10:00:00Z", SessionPhase::Expired),
        ];
        let now = t("2026-02-01T00:00:00Z");
        let s = desired_status(&d, &u, &sessions, &[], None, &now);
        assert_eq!(s.user_id, Some(resolve::derived_user_id("ns", "alice")));
        assert_eq!(s.effective_groups.len(), 1);
        assert_eq!(s.active_sessions, Some(1));
        assert_eq!(s.last_session_time, Some(t("2026-01-02T10:00:00Z")));
        assert_eq!(s.observed_generation, Some(3));
        let row = s
            .effective_settings
            .iter()
            .find(|r| r.name == "keepaliveInterval")
            .unwrap();
        assert_eq!(row.source.group.as_deref(), Some("eng"));
        let types: Vec<_> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, CONDITIONS);
        assert_eq!(s.conditions[0].status, "True");
        assert_eq!(s.conditions[1].status, "False");
        // Steady: written, read back and recomputed an hour later, nothing to write.
        let again = desired_status(&d, &u, &sessions, &[], None, &t("2026-02-01T01:00:00Z"));
        assert!(!User::changed(Some(&fixtures::round_trip(&s)), &again));
        let later = desired_status(&d, &u, &sessions, &[], Some(&s), &t("2026-03-01T00:00:00Z"));
        assert!(!User::changed(Some(&s), &later));
        assert_eq!(later.conditions[0].last_transition_time, now);
        // lastSessionTime never goes back when sessions are deleted.
        let gone = desired_status(&d, &u, &[], &[], Some(&s), &now);
        assert_eq!(gone.last_session_time, Some(t("2026-01-02T10:00:00Z")));
        assert_eq!(gone.active_sessions, Some(0));
        assert!(User::changed(Some(&s), &gone));
    }

    #[test]
    fn a_launch_changes_the_status_once() {
        let d = dir(vec![]);
        let u = user("alice", &[]);
        let now = t("2026-02-01T00:00:00Z");
        let before = desired_status(&d, &u, &[], &[], None, &now);
        // Created, then reported pending: not started, so nothing to write.
        let mut pending =
            (*session("a", "alice", "2026-02-01T00:00:01Z", SessionPhase::Pending)).clone();
        pending.status.as_mut().unwrap().started_at = None;
        let created = desired_status(&d, &u, &[Arc::new(pending)], &[], Some(&before), &now);
        assert_eq!(created.active_sessions, Some(0));
        assert!(!User::changed(Some(&before), &created));
        // Started: activeSessions and lastSessionTime move together, in one write.
        let running = session("a", "alice", "2026-02-01T00:00:05Z", SessionPhase::Running);
        let started = desired_status(&d, &u, &[running], &[], Some(&created), &now);
        assert_eq!(started.active_sessions, Some(1));
        assert_eq!(started.last_session_time, Some(t("2026-02-01T00:00:05Z")));
        assert!(User::changed(Some(&created), &started));
    }

    #[test]
    fn the_cache_keeps_a_digest_instead_of_the_effective_settings() {
        let d = dir(vec![group(
            "eng",
            10,
            GroupSettings {
                keepalive_interval: Some(Duration::new("1m")),
                ..Default::default()
            },
        )]);
        let mut u = user("alice", &["eng"]);
        let now = t("2026-02-01T00:00:00Z");
        let s = desired_status(&d, &u, &[], &[], None, &now);
        assert!(!s.effective_settings.is_empty());
        // As read from the API server: the status, another writer's usage, kubectl's copy.
        let mut full = s.clone();
        full.usage = vec![crate::crd::v1alpha1::UsageEntry {
            scope: crate::crd::v1alpha1::UsageLimitType::PerUser,
            group: None,
            interval: crate::crd::v1alpha1::UsageLimitInterval::Daily,
            window_start: None,
            window_end: None,
            used_seconds: 5,
            limit_seconds: 10,
            timezone: None,
            closed_ms: None,
            closed_sessions: Vec::new(),
        }];
        u.status = Some(full);
        u.metadata.annotations = Some(
            [(
                "kubectl.kubernetes.io/last-applied-configuration".to_string(),
                "{}".to_string(),
            )]
            .into(),
        );
        assert!(!u.needs_write(&s), "untrimmed: compared in full");
        let mut cached = u.clone();
        crate::controller::stores::trim_user(&mut cached);
        let st = cached.status.as_ref().unwrap();
        assert!(st.effective_settings.is_empty(), "dropped from the cache");
        assert_eq!(
            st.usage.len(),
            1,
            "the ledger is kept for the Session controller"
        );
        assert_eq!(st.cached.0, Some(status_digest(u.status.as_ref())));
        assert!(
            !cached
                .annotations()
                .contains_key("kubectl.kubernetes.io/last-applied-configuration")
        );
        assert_eq!(
            serde_json::to_value(st).unwrap(),
            serde_json::to_value(UserStatus {
                effective_settings: Vec::new(),
                ..u.status.clone().unwrap()
            })
            .unwrap(),
            "the digest is never serialized"
        );
        // The same status (even computed later) needs no write; a changed setting does.
        let later = desired_status(&d, &cached, &[], &[], st.into(), &t("2026-03-01T00:00:00Z"));
        assert!(!cached.needs_write(&later));
        let d2 = dir(vec![group(
            "eng",
            10,
            GroupSettings {
                keepalive_interval: Some(Duration::new("2m")),
                ..Default::default()
            },
        )]);
        let edited = desired_status(&d2, &cached, &[], &[], st.into(), &now);
        assert!(cached.needs_write(&edited));
        assert!(User::changed(u.status.as_ref(), &edited));
        // A User never written has no status to keep a digest of, and any status is news for it.
        let mut fresh = user("bob", &[]);
        crate::controller::stores::trim_user(&mut fresh);
        assert!(fresh.needs_write(&desired_status(&d, &fresh, &[], &[], None, &now)));
    }

    #[test]
    fn problems_show_in_conditions() {
        let d = dir(vec![
            group(
                "a",
                10,
                GroupSettings {
                    max_kasms_per_user: Some(1),
                    ..Default::default()
                },
            ),
            group(
                "b",
                10,
                GroupSettings {
                    max_kasms_per_user: Some(2),
                    idle_disconnect: Some(Duration::new("1m")),
                    ..Default::default()
                },
            ),
        ]);
        let u = user("alice", &["a", "b", "missing"]);
        let s = desired_status(
            &d,
            &u,
            &[],
            &["alice2".to_string()],
            None,
            &t("2026-01-01T00:00:00Z"),
        );
        let c = |t: &str| s.conditions.iter().find(|c| c.type_ == t).unwrap();
        assert_eq!(c("Ready").status, "False");
        assert_eq!(c("Ready").reason, "UnknownGroup");
        assert!(
            c("Ready").message.contains("Group/missing"),
            "{}",
            c("Ready").message
        );
        assert!(
            c("Ready").message.contains("User/alice2"),
            "{}",
            c("Ready").message
        );
        assert_eq!(c("SettingsConflict").status, "True");
        assert_eq!(c("SettingsConflict").reason, "PriorityTie");
        assert_eq!(c("SettingsInconsistent").status, "True");
        assert_eq!(c("SettingsInconsistent").reason, "IdleDisconnectTooShort");
    }

    #[test]
    fn foreign_fields_and_conditions_are_not_compared() {
        let d = dir(vec![]);
        let u = user("alice", &[]);
        let now = t("2026-01-01T00:00:00Z");
        let s = desired_status(&d, &u, &[], &[], None, &now);
        let mut current = s.clone();
        current.usage = vec![crate::crd::v1alpha1::UsageEntry {
            scope: crate::crd::v1alpha1::UsageLimitType::PerUser,
            group: Some("g".into()),
            interval: crate::crd::v1alpha1::UsageLimitInterval::Daily,
            window_start: None,
            window_end: None,
            used_seconds: 5,
            limit_seconds: 10,
            timezone: None,
            closed_ms: Some(5000),
            closed_sessions: vec!["u1".into()],
        }];
        let mut other = current.conditions[0].clone();
        other.type_ = "UsageExhausted".into();
        current.conditions.push(other);
        assert!(!User::changed(Some(&current), &s));
        // The body applied never carries usage.
        let body = serde_json::to_value(&s).unwrap();
        assert!(body.get("usage").is_none());
    }
}
