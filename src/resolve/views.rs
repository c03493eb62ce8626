//! The views of the directory that the status of each kind shows: a user's assigned servers, a
//! server's assigned users and sessions, a pool's servers and use, an assignment's pairs, a
//! group's members. `ServerAssignment` objects are the source of truth; these are projections.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use serde::Serialize;

use super::{Directory, is_local, session_is_active};
use crate::crd::v1alpha1::{
    AssignedServer, AssignedUser, Group, Server, ServerAssignment, ServerPool, Session, User,
};

/// Reason of a pair whose user does not exist.
pub const REASON_UNKNOWN_USER: &str = "UnknownUser";
/// Reason of a pair whose server does not exist.
pub const REASON_UNKNOWN_SERVER: &str = "UnknownServer";
/// Reason of a pair whose server's pool does not exist.
pub const REASON_UNKNOWN_POOL: &str = "UnknownPool";
/// Reason of a pair whose server's pool does not have assignment enabled.
pub const REASON_ASSIGNMENT_DISABLED: &str = "AssignmentDisabled";

/// One (user, server) pair of a ServerAssignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AssignmentPairView {
    /// The ServerAssignment.
    pub assignment: String,
    /// User name.
    pub user: String,
    /// Server name.
    pub server: String,
    /// The server's pool (when the server exists).
    pub pool: Option<String>,
    /// Whether the pair applies now.
    pub in_effect: bool,
    /// Why not: `UnknownUser`, `UnknownServer`, `UnknownPool` or `AssignmentDisabled`.
    pub reason: Option<&'static str>,
}

/// Whether assignments to `server` apply now: its pool exists and has `assignmentEnabled`.
/// The error is the reason (`UnknownPool`, `AssignmentDisabled`).
pub fn assignment_state(dir: &Directory, server: &Server) -> Result<(), &'static str> {
    match dir.pool(&server.spec.pool) {
        None => Err(REASON_UNKNOWN_POOL),
        Some(p) if assignment_enabled(p) => Ok(()),
        Some(_) => Err(REASON_ASSIGNMENT_DISABLED),
    }
}

/// Whether a pool has user-server assignment enabled (default false).
pub fn assignment_enabled(pool: &ServerPool) -> bool {
    pool.spec.assignment_enabled == Some(true)
}

/// The pairs of one assignment, in spec order (users outer, servers inner), without duplicates.
pub fn assignment_pairs_of(
    dir: &Directory,
    a: &ServerAssignment,
    user_exists: impl Fn(&str) -> bool,
) -> Vec<AssignmentPairView> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for u in &a.spec.users {
        for s in &a.spec.servers {
            if !seen.insert((u.as_str(), s.as_str())) {
                continue;
            }
            let server = dir.server(s);
            let state = match server {
                None => Err(REASON_UNKNOWN_SERVER),
                Some(server) => assignment_state(dir, server),
            };
            let reason = if !user_exists(u) {
                Some(REASON_UNKNOWN_USER)
            } else {
                state.err()
            };
            out.push(AssignmentPairView {
                assignment: a.name_any(),
                user: u.clone(),
                server: s.clone(),
                pool: server.map(|s| s.spec.pool.clone()),
                in_effect: reason.is_none(),
                reason,
            });
        }
    }
    out
}

/// Every pair of every assignment of the namespace, sorted by (user, server, assignment).
pub fn assignment_pairs(dir: &Directory, users: &[Arc<User>]) -> Vec<AssignmentPairView> {
    let names: BTreeSet<String> = users.iter().map(|u| u.name_any()).collect();
    let mut out: Vec<AssignmentPairView> = dir
        .assignments
        .iter()
        .flat_map(|a| assignment_pairs_of(dir, a, |u| names.contains(u)))
        .collect();
    out.sort_by(|a, b| {
        (&a.user, &a.server, &a.assignment).cmp(&(&b.user, &b.server, &b.assignment))
    });
    out
}

/// The servers assigned to user `user` (by name) by any assignment, one row per server, sorted;
/// in effect when the server exists and its pool has assignment enabled (the seed's "Assigned
/// Servers" tab).
pub fn user_assigned_servers(dir: &Directory, user: &str) -> Vec<AssignedServer> {
    let mut servers = BTreeSet::new();
    for a in &dir.assignments {
        if a.spec.users.iter().any(|u| u == user) {
            servers.extend(a.spec.servers.iter().cloned());
        }
    }
    servers
        .into_iter()
        .map(|s| {
            let server = dir.server(&s);
            AssignedServer {
                pool: server.map(|x| x.spec.pool.clone()),
                in_effect: server.is_some_and(|x| assignment_state(dir, x).is_ok()),
                server: s,
            }
        })
        .collect()
}

/// The users assigned to server `server` (by name), one row per user, sorted; in effect when the
/// user exists and the server's pool has assignment enabled (the seed's "Assigned Users" tab).
pub fn server_assigned_users(
    dir: &Directory,
    server: &str,
    user_exists: impl Fn(&str) -> bool,
) -> Vec<AssignedUser> {
    let pool_ok = dir
        .server(server)
        .is_some_and(|s| assignment_state(dir, s).is_ok());
    let mut users = BTreeSet::new();
    for a in &dir.assignments {
        if a.spec.servers.iter().any(|s| s == server) {
            users.extend(a.spec.users.iter().cloned());
        }
    }
    users
        .into_iter()
        .map(|u| AssignedUser {
            in_effect: pool_ok && user_exists(&u),
            user: u,
        })
        .collect()
}

/// Members of a group: users listing it, and every local user when it has `autoAddLocalUsers`;
/// sorted by name.
pub fn group_members(group: &Group, users: &[Arc<User>]) -> Vec<String> {
    let name = group.name_any();
    let auto = group.spec.settings.auto_add_local_users == Some(true);
    let mut out: Vec<String> = users
        .iter()
        .filter(|u| u.spec.groups.contains(&name) || (auto && is_local(u)))
        .map(|u| u.name_any())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Active sessions placed on `server` (their `status.server`).
pub fn server_sessions(server: &str, sessions: &[Arc<Session>]) -> u32 {
    sessions
        .iter()
        .filter(|s| session_is_active(s) && session_server(s) == Some(server))
        .count() as u32
}

fn session_server(s: &Session) -> Option<&str> {
    s.status.as_ref().and_then(|st| st.server.as_deref())
}

/// A user's active sessions and the start of their newest session. A session counts as active
/// from its start (`status.startedAt`) until it ends: the moment it starts is also the moment
/// it can become the newest, so a launch changes both at once (one User status write).
pub fn user_sessions(user: &str, sessions: &[Arc<Session>]) -> (u32, Option<Time>) {
    let mut active = 0;
    let mut newest: Option<Time> = None;
    for s in sessions.iter().filter(|s| s.spec.user == user) {
        let started = s
            .status
            .as_ref()
            .and_then(|st| st.started_at.as_ref().map(|m| Time(m.0)));
        if started.is_some() && session_is_active(s) {
            active += 1;
        }
        if let Some(t) = started
            && newest.as_ref().is_none_or(|n| n.0 < t.0)
        {
            newest = Some(t);
        }
    }
    (active, newest)
}

/// A server's zone: `spec.zone`, else its Node's `topology.kubernetes.io/zone` label.
pub fn server_zone(
    server: &Server,
    node_labels: Option<&BTreeMap<String, String>>,
) -> Option<String> {
    server
        .spec
        .zone
        .clone()
        .or_else(|| node_labels.and_then(|l| l.get("topology.kubernetes.io/zone").cloned()))
}

/// What a pool's status shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolView {
    /// Servers in the pool: Server objects, or for an autoscaled pool the matching nodes.
    pub servers: u32,
    /// Total session capacity: the sum of the servers' `maxSessions` (for an autoscaled pool,
    /// matching nodes × `maxSessionsPerServer`); `None` when some server is unbounded.
    pub capacity: Option<u32>,
    /// Active sessions placed in the pool.
    pub sessions: u32,
}

/// Whether node labels match a selector (every key equal).
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The view of `pool`. `matching_nodes` is the number of nodes matching an autoscaled pool's
/// selector (ignored for other pools); `sessions` are the namespace's sessions. Sessions count
/// when placed on one of the pool's Servers, or, for an autoscaled pool, when their Workspace
/// uses the pool.
pub fn pool_view(
    dir: &Directory,
    pool: &ServerPool,
    matching_nodes: u32,
    sessions: &[Arc<Session>],
) -> PoolView {
    let name = pool.name_any();
    let servers = dir.servers_of_pool(&name);
    let server_names: BTreeSet<String> = servers.iter().map(|s| s.name_any()).collect();
    let uses_pool: BTreeSet<String> = dir
        .workspaces
        .iter()
        .filter(|w| w.spec.server_pool.as_deref() == Some(name.as_str()))
        .map(|w| w.name_any())
        .collect();
    let in_use = sessions
        .iter()
        .filter(|s| session_is_active(s))
        .filter(|s| match session_server(s) {
            Some(srv) if server_names.contains(srv) => true,
            _ => pool.spec.autoscale.is_some() && uses_pool.contains(&s.spec.workspace),
        })
        .count() as u32;
    match &pool.spec.autoscale {
        Some(a) => PoolView {
            servers: matching_nodes,
            capacity: a
                .max_sessions_per_server
                .map(|m| m.saturating_mul(matching_nodes)),
            sessions: in_use,
        },
        None => PoolView {
            servers: servers.len() as u32,
            capacity: servers
                .iter()
                .map(|s| s.spec.max_sessions)
                .try_fold(0u32, |acc, m| m.map(|m| acc.saturating_add(m))),
            sessions: in_use,
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::controller::fixtures::{assignment, placed_session as session, pool, server};
    use crate::crd::v1alpha1::SessionPhase;

    fn directory() -> Directory {
        Directory {
            namespace: "ns".into(),
            pools: vec![
                pool("dedicated", Some(true), false),
                pool("shared", Some(false), false),
            ],
            servers: vec![
                server("ws-01", "dedicated", Some(4)),
                server("ws-02", "dedicated", Some(2)),
                server("ws-03", "shared", None),
                server("ws-04", "gone", Some(1)),
            ],
            assignments: vec![
                assignment("a", &["alice"], &["ws-01", "ws-03"]),
                assignment("b", &["alice", "bob", "ghost"], &["ws-02", "nope", "ws-04"]),
            ],
            ..Directory::default()
        }
    }

    #[test]
    fn pairs_are_in_effect_only_in_assignment_enabled_pools() {
        let d = directory();
        let exists = |u: &str| u != "ghost";
        let pairs = assignment_pairs_of(&d, &d.assignments[1], exists);
        let got: Vec<_> = pairs
            .iter()
            .map(|p| (p.user.as_str(), p.server.as_str(), p.in_effect, p.reason))
            .collect();
        assert_eq!(
            got,
            vec![
                ("alice", "ws-02", true, None),
                ("alice", "nope", false, Some(REASON_UNKNOWN_SERVER)),
                ("alice", "ws-04", false, Some(REASON_UNKNOWN_POOL)),
                ("bob", "ws-02", true, None),
                ("bob", "nope", false, Some(REASON_UNKNOWN_SERVER)),
                ("bob", "ws-04", false, Some(REASON_UNKNOWN_POOL)),
                ("ghost", "ws-02", false, Some(REASON_UNKNOWN_USER)),
                ("ghost", "nope", false, Some(REASON_UNKNOWN_USER)),
                ("ghost", "ws-04", false, Some(REASON_UNKNOWN_USER)),
            ]
        );
        let a = assignment_pairs_of(&d, &d.assignments[0], exists);
        assert_eq!(a[1].reason, Some(REASON_ASSIGNMENT_DISABLED));
        assert_eq!(a[1].pool.as_deref(), Some("shared"));
    }

    #[test]
    fn user_and_server_views_agree_with_the_pairs() {
        let d = directory();
        let alice = user_assigned_servers(&d, "alice");
        let got: Vec<_> = alice
            .iter()
            .map(|s| (s.server.as_str(), s.pool.as_deref(), s.in_effect))
            .collect();
        assert_eq!(
            got,
            vec![
                ("nope", None, false),
                ("ws-01", Some("dedicated"), true),
                ("ws-02", Some("dedicated"), true),
                ("ws-03", Some("shared"), false),
                ("ws-04", Some("gone"), false),
            ]
        );
        let users = server_assigned_users(&d, "ws-02", |u| u != "ghost");
        let got: Vec<_> = users
            .iter()
            .map(|u| (u.user.as_str(), u.in_effect))
            .collect();
        assert_eq!(got, vec![("alice", true), ("bob", true), ("ghost", false)]);
        let users = server_assigned_users(&d, "ws-03", |_| true);
        assert_eq!(
            users,
            vec![AssignedUser {
                user: "alice".into(),
                in_effect: false
            }]
        );
    }

    #[test]
    fn pool_views_count_servers_capacity_and_active_sessions() {
        let mut d = directory();
        let sessions = vec![
            session(
                "s1",
                "alice",
                "cad",
                Some("ws-01"),
                Some(SessionPhase::Running),
            ),
            session(
                "s2",
                "bob",
                "cad",
                Some("ws-02"),
                Some(SessionPhase::Paused),
            ),
            session(
                "s3",
                "bob",
                "cad",
                Some("ws-02"),
                Some(SessionPhase::Expired),
            ),
            session("s4", "bob", "cad", Some("ws-03"), None),
        ];
        let dedicated = d.pools[0].clone();
        assert_eq!(
            pool_view(&d, &dedicated, 0, &sessions),
            PoolView {
                servers: 2,
                capacity: Some(6),
                sessions: 2
            }
        );
        let shared = d.pools[1].clone();
        assert_eq!(
            pool_view(&d, &shared, 0, &sessions),
            PoolView {
                servers: 1,
                capacity: None,
                sessions: 1
            }
        );
        let burst = pool("burst", None, true);
        d.pools.push(burst.clone());
        let mut ws = crate::crd::v1alpha1::Workspace::new(
            "browser",
            serde_json::from_value(serde_json::json!({"image": "x", "serverPool": "burst"}))
                .unwrap(),
        );
        ws.metadata.namespace = Some("ns".into());
        d.workspaces.push(Arc::new(ws));
        let sessions = vec![session(
            "b1",
            "bob",
            "browser",
            None,
            Some(SessionPhase::Running),
        )];
        assert_eq!(
            pool_view(&d, &burst, 3, &sessions),
            PoolView {
                servers: 3,
                capacity: Some(12),
                sessions: 1
            }
        );
        assert_eq!(server_sessions("ws-02", &sessions), 0);
    }

    #[test]
    fn user_sessions_count_active_and_find_the_newest_start() {
        let mut a = (*session("a", "alice", "cad", None, Some(SessionPhase::Running))).clone();
        a.status.as_mut().unwrap().started_at =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                "2026-01-02T00:00:00Z".parse().unwrap(),
            ));
        let mut b = (*session("b", "alice", "cad", None, Some(SessionPhase::Expired))).clone();
        b.status.as_mut().unwrap().started_at =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                "2026-01-03T00:00:00Z".parse().unwrap(),
            ));
        let c = session("c", "bob", "cad", None, Some(SessionPhase::Running));
        // Not started yet (created, or its pod pending): not counted until it starts.
        let d = session("d", "alice", "cad", None, Some(SessionPhase::Pending));
        let e = session("e", "alice", "cad", None, None);
        let (n, t) = user_sessions("alice", &[Arc::new(a), Arc::new(b), c, d, e]);
        assert_eq!(n, 1);
        assert_eq!(t.unwrap().0.to_string(), "2026-01-03T00:00:00Z");
    }
}
