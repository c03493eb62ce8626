//! Findings: what a platform team should fix or know about a namespace's configuration.
//!
//! The same list backs the status conditions (per object) and `cubicle validate` (per
//! repository). Findings that arise for many users from one cause (two groups tied, two groups
//! mapping the same path) are reported once, on the Group to change, with the users affected.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use kube::ResourceExt;
use serde::Serialize;

use super::settings::{Conflict, describe_source, resolve_user};
use super::{Directory, username, views};
use crate::crd::Duration;
use crate::crd::v1alpha1::{GroupSettings, Session, User, Workspace};

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The configuration is broken: something will not work as written (`validate` fails).
    Error,
    /// Probably a mistake, but resolution settled it deterministically (`validate --strict`
    /// fails).
    Warning,
    /// Worth knowing; nothing to fix (e.g. an assignment kept while assignment is disabled).
    Info,
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        })
    }
}

/// What a finding is about. The CamelCase name is also the reason of status conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Code {
    /// A User or Workspace names a Group that does not exist.
    UnknownGroup,
    /// A default workspace, default image or Session names a Workspace that does not exist.
    UnknownWorkspace,
    /// A Workspace or Server names a ServerPool that does not exist.
    UnknownPool,
    /// A ServerAssignment names a Server that does not exist.
    UnknownServer,
    /// A ServerAssignment or Session names a User that does not exist.
    UnknownUser,
    /// Two Users have the same username (`spec.username`, defaulting to `metadata.name`).
    DuplicateUsername,
    /// A value cannot be used (e.g. an unparsable duration).
    InvalidValue,
    /// `keepaliveExpiration` is shorter than twice `keepaliveInterval`.
    KeepaliveExpirationTooShort,
    /// `idleDisconnect` is not longer than `keepaliveInterval`.
    IdleDisconnectTooShort,
    /// Groups with the same priority set a setting differently.
    PriorityTie,
    /// Two volume or file mappings of a user's groups collide.
    MappingCollision,
    /// An assignment names a server whose pool does not have assignment enabled: it is kept and
    /// applies again when assignment is enabled.
    AssignmentNotInEffect,
    /// A Workspace uses a pool (not autoscaled) that has no Servers: its sessions cannot be
    /// placed.
    PoolWithoutServers,
    /// Two Users carry the same `spec.identity.username`: that person may act for both, and
    /// the CLI cannot tell which User is theirs.
    DuplicateIdentity,
    /// A User that people must act for has no `spec.identity` (other Users of its namespace
    /// have one): only the admin groups may create its Sessions.
    NoIdentity,
}

impl Code {
    /// The CamelCase name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Code::UnknownGroup => "UnknownGroup",
            Code::UnknownWorkspace => "UnknownWorkspace",
            Code::UnknownPool => "UnknownPool",
            Code::UnknownServer => "UnknownServer",
            Code::UnknownUser => "UnknownUser",
            Code::DuplicateUsername => "DuplicateUsername",
            Code::InvalidValue => "InvalidValue",
            Code::KeepaliveExpirationTooShort => "KeepaliveExpirationTooShort",
            Code::IdleDisconnectTooShort => "IdleDisconnectTooShort",
            Code::PriorityTie => "PriorityTie",
            Code::MappingCollision => "MappingCollision",
            Code::AssignmentNotInEffect => "AssignmentNotInEffect",
            Code::PoolWithoutServers => "PoolWithoutServers",
            Code::DuplicateIdentity => "DuplicateIdentity",
            Code::NoIdentity => "NoIdentity",
        }
    }

    /// Whether the code is about a reference to an object that does not exist.
    pub fn is_unknown_reference(&self) -> bool {
        matches!(
            self,
            Code::UnknownGroup
                | Code::UnknownWorkspace
                | Code::UnknownPool
                | Code::UnknownServer
                | Code::UnknownUser
        )
    }
}

/// One problem, on one object and field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    /// How serious it is.
    pub severity: Severity,
    /// What it is.
    pub code: Code,
    /// The kind of the object at fault (`User`, `Group`, ...).
    pub kind: String,
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The field at fault, as a path (`spec.groups[1]`, `spec.settings.keepaliveInterval`);
    /// `status.effectiveSettings.<setting>` for a problem of the resolved value.
    pub field: String,
    /// What is wrong, naming the objects and values involved.
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}: {}: {}",
            self.kind, self.name, self.field, self.message
        )
    }
}

fn finding(
    severity: Severity,
    code: Code,
    kind: &str,
    ns: &str,
    name: &str,
    field: impl Into<String>,
    message: impl Into<String>,
) -> Finding {
    Finding {
        severity,
        code,
        kind: kind.into(),
        namespace: ns.into(),
        name: name.into(),
        field: field.into(),
        message: message.into(),
    }
}

/// Problems of one Group's own settings: invalid durations, inconsistent lifetime settings
/// (judged with Kasm's defaults for what the group leaves unset, when it sets one of the pair),
/// and an unknown `defaultImage`.
pub fn group_findings(dir: &Directory, group_name: &str, s: &GroupSettings) -> Vec<Finding> {
    let ns = dir.namespace.as_str();
    let mut out = Vec::new();
    let mut parse = |field: &str, d: &Option<Duration>| -> Option<std::time::Duration> {
        let d = d.as_ref()?;
        match d.to_std() {
            Ok(v) => Some(v),
            Err(e) => {
                out.push(finding(
                    Severity::Error,
                    Code::InvalidValue,
                    "Group",
                    ns,
                    group_name,
                    format!("spec.settings.{field}"),
                    e.to_string(),
                ));
                None
            }
        }
    };
    let exp = parse("keepaliveExpiration", &s.keepalive_expiration);
    let int = parse("keepaliveInterval", &s.keepalive_interval);
    let idle = parse("idleDisconnect", &s.idle_disconnect);
    let limit = parse("sessionTimeLimit", &s.session_time_limit);
    let default = |v: &str| Duration::new(v).to_std().unwrap_or_default();
    let show = |set: Option<std::time::Duration>, d: &str| match set {
        Some(v) => Duration::from(v).to_string(),
        None => format!("{d} (Kasm's default)"),
    };
    let d_exp = super::settings::DEFAULT_KEEPALIVE_EXPIRATION;
    let d_int = super::settings::DEFAULT_KEEPALIVE_INTERVAL;
    let d_idle = super::settings::DEFAULT_IDLE_DISCONNECT;
    let (e, i, l) = (
        exp.unwrap_or_else(|| default(d_exp)),
        int.unwrap_or_else(|| default(d_int)),
        idle.unwrap_or_else(|| default(d_idle)),
    );
    if (exp.is_some() || int.is_some()) && limit.is_none() && e < i * 2 {
        let field = if exp.is_some() {
            "spec.settings.keepaliveExpiration"
        } else {
            "spec.settings.keepaliveInterval"
        };
        out.push(finding(
            Severity::Warning,
            Code::KeepaliveExpirationTooShort,
            "Group",
            ns,
            group_name,
            field,
            format!(
                "keepaliveExpiration {} is shorter than twice keepaliveInterval {}: a connected \
                 session may expire between two keepalives (seed 002: at least twice)",
                show(exp, d_exp),
                show(int, d_int)
            ),
        ));
    }
    if (idle.is_some() || int.is_some()) && l <= i {
        let field = if idle.is_some() {
            "spec.settings.idleDisconnect"
        } else {
            "spec.settings.keepaliveInterval"
        };
        out.push(finding(
            Severity::Warning,
            Code::IdleDisconnectTooShort,
            "Group",
            ns,
            group_name,
            field,
            format!(
                "idleDisconnect {} is not longer than keepaliveInterval {} (seed 002: it must be \
                 higher to function properly)",
                show(idle, d_idle),
                show(int, d_int)
            ),
        ));
    }
    if let Some(img) = &s.default_image
        && dir.workspace(img).is_none()
    {
        out.push(finding(
            Severity::Error,
            Code::UnknownWorkspace,
            "Group",
            ns,
            group_name,
            "spec.settings.defaultImage",
            format!("Workspace/{img} does not exist in namespace {ns}"),
        ));
    }
    out
}

/// Users sharing a username: username → object names (only usernames used more than once).
pub fn duplicate_usernames(users: &[Arc<User>]) -> BTreeMap<String, Vec<String>> {
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for u in users {
        by.entry(username(u)).or_default().push(u.name_any());
    }
    by.retain(|_, v| {
        v.sort();
        v.len() > 1
    });
    by
}

/// The finding of User `user` whose username `name` is also used by `others` (object names;
/// `user` itself is skipped). `explicit`: the username is set in `spec.username` rather than
/// defaulted from `metadata.name`.
pub fn duplicate_username_finding(
    ns: &str,
    user: &str,
    name: &str,
    explicit: bool,
    others: &[String],
) -> Finding {
    let others: Vec<String> = others
        .iter()
        .filter(|o| *o != user)
        .map(|o| format!("User/{o}"))
        .collect();
    let (field, from) = if explicit {
        ("spec.username", "")
    } else {
        (
            "metadata.name",
            " (spec.username is unset, so it defaults to metadata.name)",
        )
    };
    finding(
        Severity::Error,
        Code::DuplicateUsername,
        "User",
        ns,
        user,
        field,
        format!(
            "username {name}{from} is also used by {}; usernames must be unique in the namespace",
            others.join(", ")
        ),
    )
}

/// The identity findings of one namespace's Users: two Users with one identity (an error on
/// each), and, where the namespace uses identities at all, an enabled User without one (a
/// warning: only the admin groups may act for it). A namespace whose Users carry no identity
/// is left alone: it has not adopted per-person access yet, and `plan` shows each User's
/// identity, none included.
pub fn identity_findings(ns: &str, users: &[Arc<User>]) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut by: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for u in users {
        if let Some(id) = &u.spec.identity {
            by.entry(id.username.as_str())
                .or_default()
                .push(u.name_any());
        }
    }
    for (identity, mut names) in by.iter().map(|(k, v)| (*k, v.clone())) {
        if names.len() < 2 {
            continue;
        }
        names.sort();
        for n in &names {
            let others: Vec<String> = names
                .iter()
                .filter(|o| *o != n)
                .map(|o| format!("User/{o}"))
                .collect();
            out.push(finding(
                Severity::Error,
                Code::DuplicateIdentity,
                "User",
                ns,
                n,
                "spec.identity.username",
                format!(
                    "identity {identity} is also carried by {}; one person would act for \
                     several Users (each identity must belong to one User)",
                    others.join(", ")
                ),
            ));
        }
    }
    if !by.is_empty() {
        for u in users {
            if u.spec.identity.is_none() && u.spec.disabled != Some(true) {
                out.push(finding(
                    Severity::Warning,
                    Code::NoIdentity,
                    "User",
                    ns,
                    &u.name_any(),
                    "spec.identity",
                    "has no identity while other Users of the namespace have one: only the \
                     admin groups may act for it (set spec.identity.username to the name the \
                     API server knows the person by, or disable the User)"
                        .to_string(),
                ));
            }
        }
    }
    out
}

fn list_users(users: &BTreeSet<String>) -> String {
    const SHOWN: usize = 5;
    let v: Vec<&str> = users.iter().take(SHOWN).map(String::as_str).collect();
    let more = users.len().saturating_sub(SHOWN);
    let n = users.len();
    let plural = if n == 1 { "user" } else { "users" };
    if more > 0 {
        format!("{n} {plural}: {}, and {more} more", v.join(", "))
    } else {
        format!("{n} {plural}: {}", v.join(", "))
    }
}

/// The findings of one Workspace: the Groups and the ServerPool it names.
pub fn workspace_findings(dir: &Directory, w: &Workspace) -> Vec<Finding> {
    let ns = dir.namespace.as_str();
    let mut out = Vec::new();
    let wname = w.name_any();
    for (i, g) in w.spec.groups.iter().enumerate() {
        if dir.group(g).is_none() {
            out.push(finding(
                Severity::Error,
                Code::UnknownGroup,
                "Workspace",
                ns,
                &wname,
                format!("spec.groups[{i}]"),
                format!("Group/{g} does not exist in namespace {ns}"),
            ));
        }
    }
    if let Some(p) = &w.spec.server_pool {
        match dir.pool(p) {
            None => out.push(finding(
                Severity::Error,
                Code::UnknownPool,
                "Workspace",
                ns,
                &wname,
                "spec.serverPool",
                format!("ServerPool/{p} does not exist in namespace {ns}"),
            )),
            Some(pool) => {
                if pool.spec.autoscale.is_none() && dir.servers_of_pool(p).is_empty() {
                    out.push(finding(
                        Severity::Warning,
                        Code::PoolWithoutServers,
                        "Workspace",
                        ns,
                        &wname,
                        "spec.serverPool",
                        format!(
                            "ServerPool/{p} has no Servers and no autoscale configuration: \
                             sessions of this workspace cannot be placed"
                        ),
                    ))
                }
            }
        }
    }
    out
}

/// Every finding of one namespace: its directory, its users and its sessions. Sorted by kind,
/// name, field and code.
pub fn findings(dir: &Directory, users: &[Arc<User>], sessions: &[Arc<Session>]) -> Vec<Finding> {
    let ns = dir.namespace.as_str();
    let mut out = Vec::new();

    // Groups' own settings.
    for g in &dir.groups {
        out.extend(group_findings(dir, &g.name_any(), &g.spec.settings));
    }

    // Users: duplicates, then each user's resolution.
    for (name, objects) in duplicate_usernames(users) {
        for o in &objects {
            let explicit = users
                .iter()
                .any(|u| u.metadata.name.as_ref() == Some(o) && u.spec.username.is_some());
            out.push(duplicate_username_finding(ns, o, &name, explicit, &objects));
        }
    }
    out.extend(identity_findings(ns, users));
    // Aggregated: (winner, loser) → (settings, users, priority).
    let mut ties: BTreeMap<(String, String), (BTreeSet<String>, BTreeSet<String>, u32)> =
        BTreeMap::new();
    // (loser, field) → (message, users).
    let mut collisions: BTreeMap<(String, String), (String, BTreeSet<String>)> = BTreeMap::new();
    // (code, source a, source b) → (first finding, users).
    let mut mixed: BTreeMap<(Code, String, String), (Finding, BTreeSet<String>)> = BTreeMap::new();
    for u in users {
        let r = resolve_user(dir, u);
        let uname = u.name_any();
        for f in r.findings {
            match f.code {
                Code::UnknownGroup | Code::UnknownWorkspace => out.push(f),
                Code::KeepaliveExpirationTooShort | Code::IdleDisconnectTooShort => {
                    let (a, b) = match f.code {
                        Code::KeepaliveExpirationTooShort => {
                            ("keepaliveExpiration", "keepaliveInterval")
                        }
                        _ => ("idleDisconnect", "keepaliveInterval"),
                    };
                    let src = |n: &str| {
                        r.provenance
                            .iter()
                            .find(|p| p.name == n)
                            .and_then(|p| p.source.group.clone())
                    };
                    // A single group (with or without defaults) is reported on the Group.
                    if let (Some(ga), Some(gb)) = (src(a), src(b))
                        && ga != gb
                    {
                        mixed
                            .entry((f.code, ga, gb))
                            .or_insert_with(|| (f.clone(), BTreeSet::new()))
                            .1
                            .insert(uname.clone());
                    }
                }
                // Group-level values are reported by group_findings; conflicts below.
                _ => {}
            }
        }
        for c in &r.conflicts {
            match c {
                Conflict::PriorityTie {
                    setting,
                    priority,
                    winner,
                    others,
                } => {
                    for o in others {
                        let e = ties
                            .entry((winner.clone(), o.clone()))
                            .or_insert_with(|| (BTreeSet::new(), BTreeSet::new(), *priority));
                        e.0.insert(setting.clone());
                        e.1.insert(uname.clone());
                    }
                }
                Conflict::VolumeMapping {
                    loser, loser_index, ..
                } => {
                    collisions
                        .entry((
                            loser.clone(),
                            format!("spec.settings.volumeMappings[{loser_index}]"),
                        ))
                        .or_insert_with(|| (c.message(), BTreeSet::new()))
                        .1
                        .insert(uname.clone());
                }
                Conflict::FileMapping {
                    loser, loser_index, ..
                } => {
                    collisions
                        .entry((
                            loser.clone(),
                            format!("spec.settings.fileMappings[{loser_index}]"),
                        ))
                        .or_insert_with(|| (c.message(), BTreeSet::new()))
                        .1
                        .insert(uname.clone());
                }
            }
        }
    }
    for ((winner, loser), (settings, affected, priority)) in ties {
        let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        out.push(finding(
            Severity::Warning,
            Code::PriorityTie,
            "Group",
            ns,
            &loser,
            "spec.priority",
            format!(
                "priority {priority} ties with Group/{winner}, and the two set {} differently; \
                 for users in both ({}) the values of {winner} are used (name order); give the \
                 groups different priorities to make the precedence explicit",
                settings.join(", "),
                list_users(&affected),
            ),
        ));
    }
    for ((loser, field), (message, affected)) in collisions {
        out.push(finding(
            Severity::Warning,
            Code::MappingCollision,
            "Group",
            ns,
            &loser,
            field,
            format!("{message}; affects {}", list_users(&affected)),
        ));
    }
    for ((_, _, _), (mut f, affected)) in mixed {
        if affected.len() > 1 {
            f.message = format!(
                "{} (the same groups give this to {})",
                f.message,
                list_users(&affected)
            );
        }
        out.push(f);
    }

    // Workspaces.
    for w in &dir.workspaces {
        out.extend(workspace_findings(dir, w));
    }

    // Servers.
    for s in &dir.servers {
        if dir.pool(&s.spec.pool).is_none() {
            out.push(finding(
                Severity::Error,
                Code::UnknownPool,
                "Server",
                ns,
                &s.name_any(),
                "spec.pool",
                format!(
                    "ServerPool/{} does not exist in namespace {ns}",
                    s.spec.pool
                ),
            ));
        }
    }

    // Assignments.
    let user_names: HashSet<String> = users.iter().map(|u| u.name_any()).collect();
    for a in &dir.assignments {
        out.extend(assignment_findings(dir, a, |u| user_names.contains(u)));
    }

    // Sessions.
    for s in sessions {
        let sname = s.name_any();
        if !user_names.contains(&s.spec.user) {
            out.push(finding(
                Severity::Error,
                Code::UnknownUser,
                "Session",
                ns,
                &sname,
                "spec.user",
                format!("User/{} does not exist in namespace {ns}", s.spec.user),
            ));
        }
        if dir.workspace(&s.spec.workspace).is_none() {
            out.push(finding(
                Severity::Error,
                Code::UnknownWorkspace,
                "Session",
                ns,
                &sname,
                "spec.workspace",
                format!(
                    "Workspace/{} does not exist in namespace {ns}",
                    s.spec.workspace
                ),
            ));
        }
    }

    out.sort_by(|a, b| {
        (&a.kind, &a.name, &a.field, a.code, &a.message)
            .cmp(&(&b.kind, &b.name, &b.field, b.code, &b.message))
    });
    out.dedup();
    out
}

/// Problems of one ServerAssignment: unknown users and servers (errors), and servers whose pool
/// does not have assignment enabled (kept, not in effect: info).
pub fn assignment_findings(
    dir: &Directory,
    a: &crate::crd::v1alpha1::ServerAssignment,
    user_exists: impl Fn(&str) -> bool,
) -> Vec<Finding> {
    let ns = dir.namespace.as_str();
    let aname = a.name_any();
    let mut out = Vec::new();
    let mut seen_users = HashMap::new();
    for (i, u) in a.spec.users.iter().enumerate() {
        if seen_users.insert(u.clone(), i).is_none() && !user_exists(u) {
            out.push(finding(
                Severity::Error,
                Code::UnknownUser,
                "ServerAssignment",
                ns,
                &aname,
                format!("spec.users[{i}]"),
                format!("User/{u} does not exist in namespace {ns}"),
            ));
        }
    }
    for (i, s) in a.spec.servers.iter().enumerate() {
        match dir.server(s) {
            None => out.push(finding(
                Severity::Error,
                Code::UnknownServer,
                "ServerAssignment",
                ns,
                &aname,
                format!("spec.servers[{i}]"),
                format!("Server/{s} does not exist in namespace {ns}"),
            )),
            Some(server) => {
                let pool = &server.spec.pool;
                match views::assignment_state(dir, server) {
                    Ok(()) => {}
                    Err(reason) if reason == views::REASON_UNKNOWN_POOL => {}
                    Err(_) => out.push(finding(
                        Severity::Info,
                        Code::AssignmentNotInEffect,
                        "ServerAssignment",
                        ns,
                        &aname,
                        format!("spec.servers[{i}]"),
                        format!(
                            "Server/{s} is in ServerPool/{pool}, which does not have \
                             assignmentEnabled: the assignment is kept and applies when \
                             assignment is enabled; meanwhile every server of the pool is \
                             available to every user with access"
                        ),
                    )),
                }
            }
        }
    }
    out
}

/// A one-line summary of where a resolved setting comes from (for messages).
pub fn source_text(s: &crate::crd::v1alpha1::SettingSource) -> String {
    describe_source(s)
}
