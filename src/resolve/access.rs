//! Whether a user may launch a workspace, and where (seed 000 and the launch checks that depend
//! only on configuration). Checks that depend on the running state (max sessions, usage budget,
//! capacity, zone, persistent profile permission of a request) belong to the Session
//! controller, which uses the effective settings for them.

use std::sync::Arc;

use kube::ResourceExt;
use serde::Serialize;

use super::Directory;
use super::settings::{Origin, Resolved, ResolvedFileMapping};
use super::views::{assignment_enabled, user_assigned_servers};
use crate::crd::VolumeMapping;
use crate::crd::v1alpha1::{Server, ServerPool, User, Workspace};

/// A server a session of the workspace could be placed on for this user.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The server.
    pub server: Arc<Server>,
    /// The user is assigned to it by a ServerAssignment.
    pub assigned: bool,
    /// The assignment is in effect (the pool has assignment enabled); with assignment enabled,
    /// only such servers are candidates.
    pub in_effect: bool,
}

/// Why a user may not launch a workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "reason")]
pub enum Denial {
    /// The User is disabled (`spec.disabled`, Kasm: locked).
    UserDisabled {
        /// User name.
        user: String,
    },
    /// None of the user's groups is in the Workspace's `spec.groups`.
    NotInAllowedGroup {
        /// User name.
        user: String,
        /// Workspace name.
        workspace: String,
        /// The workspace's groups.
        allowed: Vec<String>,
        /// The user's effective groups.
        groups: Vec<String>,
    },
    /// The Workspace's `spec.serverPool` names a pool that does not exist.
    UnknownPool {
        /// Workspace name.
        workspace: String,
        /// The missing pool.
        pool: String,
    },
    /// The pool has assignment enabled and the user has no assigned server in it.
    NoAssignedServer {
        /// User name.
        user: String,
        /// Workspace name.
        workspace: String,
        /// The pool.
        pool: String,
    },
    /// The pool has neither Servers nor an autoscale configuration.
    NoServers {
        /// Workspace name.
        workspace: String,
        /// The pool.
        pool: String,
    },
}

impl Denial {
    /// A CamelCase reason for conditions and events.
    pub fn reason(&self) -> &'static str {
        match self {
            Denial::UserDisabled { .. } => "UserDisabled",
            Denial::NotInAllowedGroup { .. } => "NotInAllowedGroup",
            Denial::UnknownPool { .. } => "UnknownPool",
            Denial::NoAssignedServer { .. } => "NoAssignedServer",
            Denial::NoServers { .. } => "NoServers",
        }
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denial::UserDisabled { user } => write!(
                f,
                "User/{user} is disabled (spec.disabled: true); it cannot start sessions until \
                 re-enabled"
            ),
            Denial::NotInAllowedGroup {
                user,
                workspace,
                allowed,
                groups,
            } => {
                let groups = if groups.is_empty() {
                    "no groups".to_string()
                } else {
                    format!("groups {}", groups.join(", "))
                };
                if allowed.is_empty() {
                    write!(
                        f,
                        "Workspace/{workspace} lists no groups (spec.groups), so no one may \
                         launch it; User/{user} is in {groups}"
                    )
                } else {
                    write!(
                        f,
                        "User/{user} is in {groups}, none of which is in Workspace/{workspace} \
                         spec.groups ({})",
                        allowed.join(", ")
                    )
                }
            }
            Denial::UnknownPool { workspace, pool } => write!(
                f,
                "Workspace/{workspace} spec.serverPool names ServerPool/{pool}, which does not \
                 exist"
            ),
            Denial::NoAssignedServer {
                user,
                workspace,
                pool,
            } => write!(
                f,
                "Workspace/{workspace} uses ServerPool/{pool}, which has assignmentEnabled, and \
                 User/{user} has no assigned Server in it (add a ServerAssignment)"
            ),
            Denial::NoServers { workspace, pool } => write!(
                f,
                "Workspace/{workspace} uses ServerPool/{pool}, which has no Servers and no \
                 autoscale configuration"
            ),
        }
    }
}

/// Whether and where a user may launch a workspace.
#[derive(Debug, Clone, PartialEq)]
pub struct Access {
    /// `Ok` when the user may launch it, else the first reason not to (in the order: disabled,
    /// group, pool, assignment).
    pub allowed: Result<(), Denial>,
    /// The workspace's pool, when it names one that exists.
    pub pool: Option<Arc<ServerPool>>,
    /// Servers of the pool the user may use, sorted by name: only assigned ones when the pool
    /// has assignment enabled, every server otherwise. Empty without a pool, and for an
    /// autoscaled pool (its servers are nodes chosen by the scheduler).
    pub servers: Vec<Candidate>,
}

/// Decides whether `user` (resolved as `resolved`) may launch `workspace`, and where.
pub fn access(dir: &Directory, user: &User, resolved: &Resolved, workspace: &Workspace) -> Access {
    let assigned: Vec<String> = user_assigned_servers(dir, &user.name_any())
        .into_iter()
        .map(|s| s.server)
        .collect();
    access_assigned(dir, user, resolved, workspace, &assigned)
}

/// [`access`] with the names of the servers assigned to the user already known (e.g. from
/// [`super::user_assigned_servers`], computed once for all of a user's workspaces).
pub fn access_assigned(
    dir: &Directory,
    user: &User,
    resolved: &Resolved,
    workspace: &Workspace,
    assigned: &[String],
) -> Access {
    let user_name = user.name_any();
    let ws_name = workspace.name_any();
    let mut denial = None;
    if user.spec.disabled == Some(true) {
        denial = Some(Denial::UserDisabled {
            user: user_name.clone(),
        });
    }
    let in_group = resolved
        .groups
        .iter()
        .any(|g| workspace.spec.groups.contains(&g.name));
    if denial.is_none() && !in_group {
        denial = Some(Denial::NotInAllowedGroup {
            user: user_name.clone(),
            workspace: ws_name.clone(),
            allowed: workspace.spec.groups.clone(),
            groups: resolved.groups.iter().map(|g| g.name.clone()).collect(),
        });
    }
    let mut pool = None;
    let mut servers = Vec::new();
    if let Some(pool_name) = &workspace.spec.server_pool {
        match dir.pool(pool_name) {
            None => {
                denial.get_or_insert(Denial::UnknownPool {
                    workspace: ws_name.clone(),
                    pool: pool_name.clone(),
                });
            }
            Some(p) => {
                pool = Some(p.clone());
                if p.spec.autoscale.is_none() {
                    let enabled = assignment_enabled(p);
                    servers = dir
                        .servers_of_pool(pool_name)
                        .into_iter()
                        .map(|s| {
                            let is_assigned = s
                                .metadata
                                .name
                                .as_ref()
                                .is_some_and(|n| assigned.contains(n));
                            Candidate {
                                server: s,
                                assigned: is_assigned,
                                in_effect: enabled && is_assigned,
                            }
                        })
                        .filter(|c| !enabled || c.assigned)
                        .collect();
                    if servers.is_empty() {
                        denial.get_or_insert(if enabled {
                            Denial::NoAssignedServer {
                                user: user_name.clone(),
                                workspace: ws_name.clone(),
                                pool: pool_name.clone(),
                            }
                        } else {
                            Denial::NoServers {
                                workspace: ws_name.clone(),
                                pool: pool_name.clone(),
                            }
                        });
                    }
                }
            }
        }
    }
    Access {
        allowed: match denial {
            None => Ok(()),
            Some(d) => Err(d),
        },
        pool,
        servers,
    }
}

/// The file mappings of a session of `workspace`: the user's and groups' (already merged) plus
/// the workspace's for destinations they do not map. For one destination the most specific
/// wins: User over Group over Workspace.
pub fn file_mappings_for(resolved: &Resolved, workspace: &Workspace) -> Vec<ResolvedFileMapping> {
    let mut out = resolved.settings.file_mappings.clone();
    for f in &workspace.spec.file_mappings {
        if !out.iter().any(|o| o.mapping.destination == f.destination) {
            out.push(ResolvedFileMapping {
                mapping: f.clone(),
                origin: Origin::Workspace {
                    name: workspace.name_any(),
                },
            });
        }
    }
    out
}

/// The volume mappings of a session of `workspace`: the groups' (already merged) plus the
/// workspace's whose name and mount path the groups do not use (a Group wins over the
/// Workspace, as for file mappings and run config).
pub fn volume_mappings_for(resolved: &Resolved, workspace: &Workspace) -> Vec<VolumeMapping> {
    let mut out = resolved.settings.volume_mappings.clone();
    for v in &workspace.spec.volume_mappings {
        if !out
            .iter()
            .any(|o| o.name == v.name || o.mount_path == v.mount_path)
        {
            out.push(v.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::{assignment, group, pool, server};
    use crate::crd::v1alpha1::GroupSettings;
    use crate::resolve::resolve_user;
    use crate::resolve::settings::tests::user;

    fn workspace(name: &str, groups: &[&str], pool: Option<&str>) -> Workspace {
        let mut w = Workspace::new(
            name,
            serde_json::from_value(serde_json::json!({
                "image": "x",
                "groups": groups,
                "serverPool": pool,
                "fileMappings": [
                    {"destination": "/etc/motd", "content": {"inline": "ws"}},
                    {"destination": "/etc/ws", "content": {"inline": "ws"}}
                ],
                "volumeMappings": [
                    {"name": "a", "mountPath": "/a", "source": {"emptyDir": {}}},
                    {"name": "ws", "mountPath": "/ws", "source": {"emptyDir": {}}}
                ]
            }))
            .unwrap(),
        );
        w.metadata.namespace = Some("ns".into());
        w
    }

    fn directory() -> Directory {
        Directory {
            namespace: "ns".into(),
            groups: vec![
                group("eng", 10, serde_json::from_value(serde_json::json!({
                    "fileMappings": [{"destination": "/etc/motd", "content": {"inline": "eng"}}],
                    "volumeMappings": [{"name": "a", "mountPath": "/a", "source": {"emptyDir": {}}}]
                })).unwrap()),
                group("ops", 20, GroupSettings::default()),
            ],
            pools: vec![
                pool("dedicated", Some(true), false),
                pool("shared", None, false),
                pool("burst", None, true),
                pool("empty", None, false),
            ],
            servers: vec![
                server("ws-01", "dedicated", Some(1)),
                server("ws-02", "dedicated", Some(1)),
                server("ws-03", "shared", None),
                server("ws-04", "shared", None),
            ],
            assignments: vec![assignment("a", &["alice"], &["ws-02", "ws-03"])],
            ..Directory::default()
        }
    }

    fn check(u: &User, ws: &Workspace) -> Access {
        let d = directory();
        let r = resolve_user(&d, u);
        access(&d, u, &r, ws)
    }

    fn names(a: &Access) -> Vec<(String, bool, bool)> {
        a.servers
            .iter()
            .map(|c| (c.server.name_any(), c.assigned, c.in_effect))
            .collect()
    }

    #[test]
    fn assignment_enabled_pools_offer_only_assigned_servers() {
        let alice = user("alice", &["eng"]);
        let a = check(&alice, &workspace("cad", &["eng"], Some("dedicated")));
        assert_eq!(a.allowed, Ok(()));
        assert_eq!(names(&a), vec![("ws-02".into(), true, true)]);
        let bob = user("bob", &["eng"]);
        let a = check(&bob, &workspace("cad", &["eng"], Some("dedicated")));
        let err = a.allowed.unwrap_err();
        assert_eq!(err.reason(), "NoAssignedServer");
        assert!(err.to_string().contains("User/bob"), "{err}");
        assert!(err.to_string().contains("ServerPool/dedicated"), "{err}");
    }

    #[test]
    fn without_assignment_every_server_is_available_and_assignments_are_kept() {
        let alice = user("alice", &["eng"]);
        let a = check(&alice, &workspace("t", &["eng"], Some("shared")));
        assert_eq!(a.allowed, Ok(()));
        assert_eq!(
            names(&a),
            vec![
                ("ws-03".into(), true, false),
                ("ws-04".into(), false, false)
            ]
        );
        let a = check(&alice, &workspace("b", &["eng"], Some("burst")));
        assert_eq!(a.allowed, Ok(()));
        assert!(a.servers.is_empty() && a.pool.is_some());
        let a = check(&alice, &workspace("e", &["eng"], Some("empty")));
        assert_eq!(a.allowed.unwrap_err().reason(), "NoServers");
        let a = check(&alice, &workspace("x", &["eng"], Some("nope")));
        assert_eq!(a.allowed.unwrap_err().reason(), "UnknownPool");
        let a = check(&alice, &workspace("any", &["eng"], None));
        assert_eq!(a.allowed, Ok(()));
        assert!(a.pool.is_none() && a.servers.is_empty());
    }

    #[test]
    fn disabled_users_and_other_groups_are_refused_first() {
        let mut alice = user("alice", &["eng"]);
        let a = check(&alice, &workspace("cad", &["ops"], Some("dedicated")));
        let err = a.allowed.unwrap_err();
        assert_eq!(err.reason(), "NotInAllowedGroup");
        assert!(err.to_string().contains("groups eng"), "{err}");
        alice.spec.disabled = Some(true);
        let a = check(&alice, &workspace("cad", &["eng"], Some("dedicated")));
        assert_eq!(a.allowed.unwrap_err().reason(), "UserDisabled");
        // The placement is still computed, for `plan`.
        assert_eq!(a.servers.len(), 1);
        let a = check(&user("u", &["eng"]), &workspace("w", &[], None));
        assert!(
            a.allowed
                .unwrap_err()
                .to_string()
                .contains("lists no groups")
        );
    }

    #[test]
    fn workspace_mappings_are_least_specific() {
        let d = directory();
        let mut u = user("alice", &["eng"]);
        u.spec.file_mappings = serde_json::from_value(serde_json::json!([
            {"destination": "/etc/ws", "content": {"inline": "user"}}
        ]))
        .unwrap();
        let r = resolve_user(&d, &u);
        let ws = workspace("w", &["eng"], None);
        let files: Vec<_> = file_mappings_for(&r, &ws)
            .into_iter()
            .map(|f| (f.mapping.destination, f.origin.to_string()))
            .collect();
        assert_eq!(
            files,
            vec![
                ("/etc/ws".to_string(), "user".to_string()),
                (
                    "/etc/motd".to_string(),
                    "Group/eng (priority 10)".to_string()
                ),
            ]
        );
        let vols: Vec<_> = volume_mappings_for(&r, &ws)
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(vols, vec!["a", "ws"]);
    }
}
