//! `cubicle validate` and `cubicle plan`: the resolution library run offline over a
//! configuration repository ([`crate::repo`]), with every finding located at a file and line.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use kube::ResourceExt;
use serde::Serialize;

use crate::crd::v1alpha1::{AssignedServer, EffectiveGroup, EffectiveSetting, MembershipVia, User};
use crate::repo::{Namespace, Repo};
use crate::resolve::settings::describe_source;
use crate::resolve::{self, Finding, Severity};

/// Version of the JSON document `cubicle plan --output json` prints. Fields are only added
/// within a version.
pub const PLAN_SCHEMA: &str = "cubicle.dev/plan/v1";

/// A finding or load problem, located in the repository.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Diagnostic {
    /// The file (relative to the current directory when under it).
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// `error`, `warning` or `info`.
    pub severity: Severity,
    /// A CamelCase code (`UnknownGroup`, `PriorityTie`, `InvalidYaml`, `UnknownField`...).
    pub code: String,
    /// `Kind/name`, or `document` when the object could not be read.
    pub object: String,
    /// The field at fault.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}: {}: {}",
            self.file, self.line, self.object, self.field, self.severity, self.message
        )
    }
}

/// Every diagnostic of a loaded repository: load problems (errors) and the findings of each
/// namespace, sorted by file and line.
pub fn diagnostics(repo: &Repo) -> Vec<Diagnostic> {
    let mut out: Vec<Diagnostic> = repo
        .problems
        .iter()
        .map(|p| Diagnostic {
            file: Repo::display_path(&p.file),
            line: p.line,
            severity: Severity::Error,
            code: match p.field.as_str() {
                "yaml" => "InvalidYaml".into(),
                _ if p.message.starts_with("unknown field") => "UnknownField".into(),
                _ if p.message.contains("is also defined at") => "DuplicateObject".into(),
                _ => "InvalidObject".into(),
            },
            object: p.object.clone().unwrap_or_else(|| "document".into()),
            field: p.field.clone(),
            message: p.message.clone(),
        })
        .collect();
    for ns in repo.namespaces.values() {
        for f in resolve::findings(&ns.directory, &ns.users, &ns.sessions) {
            out.push(locate(repo, &f));
        }
    }
    out.sort_by(|a, b| {
        (&a.file, a.line, &a.object, &a.field, &a.message)
            .cmp(&(&b.file, b.line, &b.object, &b.field, &b.message))
    });
    out
}

fn locate(repo: &Repo, f: &Finding) -> Diagnostic {
    let (file, line) = match repo.source(&f.kind, &f.namespace, &f.name) {
        Some(s) => (Repo::display_path(&s.file), s.line_of(&f.field)),
        None => (Repo::display_path(&repo.root), 0),
    };
    Diagnostic {
        file,
        line,
        severity: f.severity,
        code: f.code.as_str().into(),
        object: format!("{}/{}", f.kind, f.name),
        field: f.field.clone(),
        message: f.message.clone(),
    }
}

/// Counts by severity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Errors.
    pub errors: usize,
    /// Warnings.
    pub warnings: usize,
    /// Infos.
    pub infos: usize,
}

impl Counts {
    /// Counts the diagnostics.
    pub fn of(ds: &[Diagnostic]) -> Self {
        let mut c = Counts::default();
        for d in ds {
            match d.severity {
                Severity::Error => c.errors += 1,
                Severity::Warning => c.warnings += 1,
                Severity::Info => c.infos += 1,
            }
        }
        c
    }
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// `cubicle validate PATH`: prints every diagnostic (`file:line: Kind/name: field: severity:
/// message`) and a summary. Returns the exit code: 1 with errors (or warnings with `strict`),
/// 2 when the path cannot be read, 0 otherwise.
pub fn validate(path: &Path, strict: bool, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let repo = match Repo::load(path) {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(err, "cubicle validate: cannot read {}: {e}", path.display());
            return 2;
        }
    };
    let ds = diagnostics(&repo);
    for d in &ds {
        let _ = writeln!(out, "{d}");
    }
    // Documents of other kinds: one line per file; other notes one by one.
    let mut ignored: std::collections::BTreeMap<String, (usize, Vec<String>)> =
        std::collections::BTreeMap::new();
    for n in &repo.notes {
        let file = Repo::display_path(&n.file);
        if n.message.starts_with(crate::repo::IGNORED) {
            let e = ignored.entry(file).or_insert((n.line, Vec::new()));
            e.1.push(n.object.clone().unwrap_or_else(|| "document".into()));
        } else {
            let object = n.object.as_deref().unwrap_or("document");
            let _ = writeln!(err, "{file}:{}: {object}: note: {}", n.line, n.message);
        }
    }
    for (file, (line, objects)) in ignored {
        let _ = writeln!(
            err,
            "{file}:{line}: note: ignored {} of other API groups ({})",
            plural(objects.len(), "document"),
            objects.join(", ")
        );
    }
    let c = Counts::of(&ds);
    let _ = writeln!(
        err,
        "{}: {}, {}, {} in {} ({}, {}, {})",
        Repo::display_path(path),
        plural(c.errors, "error"),
        plural(c.warnings, "warning"),
        plural(c.infos, "info"),
        plural(repo.objects(), "object"),
        plural(repo.namespaces.len(), "namespace"),
        plural(repo.files, "file"),
        plural(repo.notes.len(), "note"),
    );
    if c.errors > 0 || (strict && c.warnings > 0) {
        1
    } else {
        0
    }
}

/// Output format of `plan`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Readable, table-like text.
    Text,
    /// One JSON document ([`PLAN_SCHEMA`]).
    Json,
}

/// One workspace as a user would get it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkspacePlan {
    /// Workspace name.
    pub workspace: String,
    /// Whether the user may launch it.
    pub allowed: bool,
    /// Why not (a CamelCase reason).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Why not, for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The workspace's pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Whether the pool is autoscaled (placement on its nodes by the scheduler).
    pub autoscaled: bool,
    /// Servers the session may be placed on (least loaded first at launch).
    pub servers: Vec<ServerPlan>,
}

/// A candidate server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerPlan {
    /// Server name.
    pub server: String,
    /// Its node.
    pub node: String,
    /// The user is assigned to it.
    pub assigned: bool,
    /// The assignment is in effect.
    pub in_effect: bool,
}

/// Everything `plan` shows about one user.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UserPlan {
    /// Namespace.
    pub namespace: String,
    /// Object name.
    pub name: String,
    /// Username.
    pub username: String,
    /// User id in effect.
    pub user_id: String,
    /// Realm (`local` when unset).
    pub realm: String,
    /// Disabled (locked).
    pub disabled: bool,
    /// The identity that may act for the user (`spec.identity`); none: only the admin groups.
    pub identity: Option<crate::crd::v1alpha1::UserIdentity>,
    /// Effective groups.
    pub groups: Vec<EffectiveGroup>,
    /// Every setting with its value and source.
    pub settings: Vec<EffectiveSetting>,
    /// Assigned servers, in effect or not.
    pub assigned_servers: Vec<AssignedServer>,
    /// Every workspace of the namespace, launchable or not.
    pub workspaces: Vec<WorkspacePlan>,
    /// Problems of this user's configuration.
    pub findings: Vec<Finding>,
}

/// The servers assigned to each user of a namespace (one pass over the assignments).
pub fn assigned_index(ns: &Namespace) -> HashMap<String, Vec<AssignedServer>> {
    let dir = &ns.directory;
    let mut servers: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    for a in &dir.assignments {
        for u in &a.spec.users {
            servers
                .entry(u.as_str())
                .or_default()
                .extend(a.spec.servers.iter().map(String::as_str));
        }
    }
    servers
        .into_iter()
        .map(|(u, ss)| {
            let rows = ss
                .into_iter()
                .map(|s| {
                    let server = dir.server(s);
                    AssignedServer {
                        server: s.to_string(),
                        pool: server.map(|x| x.spec.pool.clone()),
                        in_effect: server
                            .is_some_and(|x| resolve::views::assignment_state(dir, x).is_ok()),
                    }
                })
                .collect();
            (u.to_string(), rows)
        })
        .collect()
}

/// Builds the plan of one user.
pub fn user_plan(ns: &Namespace, user: &User) -> UserPlan {
    let assigned = resolve::user_assigned_servers(&ns.directory, &user.name_any());
    user_plan_with(ns, user, assigned)
}

fn user_plan_with(ns: &Namespace, user: &User, assigned_servers: Vec<AssignedServer>) -> UserPlan {
    let dir = &ns.directory;
    let r = resolve::resolve_user(dir, user);
    let assigned: Vec<String> = assigned_servers.iter().map(|s| s.server.clone()).collect();
    let workspaces = dir
        .workspaces
        .iter()
        .map(|w| {
            let a = resolve::access_assigned(dir, user, &r, w, &assigned);
            WorkspacePlan {
                workspace: w.name_any(),
                allowed: a.allowed.is_ok(),
                reason: a.allowed.as_ref().err().map(|d| d.reason().to_string()),
                message: a.allowed.as_ref().err().map(|d| d.to_string()),
                pool: w.spec.server_pool.clone(),
                autoscaled: a.pool.as_ref().is_some_and(|p| p.spec.autoscale.is_some()),
                servers: a
                    .servers
                    .iter()
                    .map(|c| ServerPlan {
                        server: c.server.name_any(),
                        node: c.server.spec.node_name.clone(),
                        assigned: c.assigned,
                        in_effect: c.in_effect,
                    })
                    .collect(),
            }
        })
        .collect();
    UserPlan {
        namespace: dir.namespace.clone(),
        name: user.name_any(),
        username: resolve::username(user),
        user_id: resolve::user_id(&dir.namespace, user),
        realm: user
            .spec
            .realm
            .map(|r| {
                serde_json::to_value(r)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            })
            .unwrap_or_else(|| "local".into()),
        disabled: user.spec.disabled == Some(true),
        identity: user.spec.identity.clone(),
        groups: r.groups,
        settings: r.provenance,
        assigned_servers,
        workspaces,
        findings: r.findings,
    }
}

fn selected<'a>(ns: &'a Namespace, only: Option<&str>) -> impl Iterator<Item = &'a Arc<User>> {
    ns.users.iter().filter(move |u| match only {
        None => true,
        Some(n) => u.name_any() == n || resolve::username(u) == n,
    })
}

/// `cubicle plan PATH`: per user, the groups, effective settings with provenance, assigned
/// servers, and which workspaces they may launch and where; then the diagnostics. Streams user
/// by user, so memory stays flat with the number of users. Returns the exit code: 1 when the
/// repository has load problems (bad YAML, unknown fields), 2 when the path cannot be read or
/// `user` matches no one, 0 otherwise (findings are shown, not fatal: use `validate` to gate).
pub fn plan(
    path: &Path,
    format: Format,
    user: Option<&str>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let repo = match Repo::load(path) {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(err, "cubicle plan: cannot read {}: {e}", path.display());
            return 2;
        }
    };
    if let Some(u) = user
        && !repo
            .namespaces
            .values()
            .any(|ns| selected(ns, Some(u)).next().is_some())
    {
        let _ = writeln!(err, "cubicle plan: no User named {u} (by name or username)");
        return 2;
    }
    let ds = diagnostics(&repo);
    let counts = Counts::of(&ds);
    let result = match format {
        Format::Json => write_json(&repo, &ds, counts, user, out),
        Format::Text => write_text(&repo, &ds, counts, user, out),
    };
    if let Err(e) = result {
        let _ = writeln!(err, "cubicle plan: writing the plan: {e}");
        return 2;
    }
    if repo.problems.is_empty() { 0 } else { 1 }
}

fn write_json(
    repo: &Repo,
    ds: &[Diagnostic],
    counts: Counts,
    user: Option<&str>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    write!(
        out,
        "{{\"schema\":{},\"root\":{},\"users\":[",
        serde_json::to_string(PLAN_SCHEMA)?,
        serde_json::to_string(&Repo::display_path(&repo.root))?
    )?;
    let mut first = true;
    let mut n = 0;
    for ns in repo.namespaces.values() {
        let index = assigned_index(ns);
        for u in selected(ns, user) {
            if !first {
                out.write_all(b",")?;
            }
            first = false;
            let assigned = index.get(&u.name_any()).cloned().unwrap_or_default();
            serde_json::to_writer(&mut *out, &user_plan_with(ns, u, assigned))?;
            n += 1;
        }
    }
    let notes: Vec<serde_json::Value> = repo
        .notes
        .iter()
        .map(|n| {
            serde_json::json!({
                "file": Repo::display_path(&n.file),
                "line": n.line,
                "object": n.object.as_deref().unwrap_or("document"),
                "message": n.message,
            })
        })
        .collect();
    write!(
        out,
        "],\"diagnostics\":{},\"notes\":{},\"summary\":{}}}",
        serde_json::to_string(ds)?,
        serde_json::to_string(&notes)?,
        serde_json::to_string(&serde_json::json!({
            "namespaces": repo.namespaces.len(),
            "objects": repo.objects(),
            "users": n,
            "errors": counts.errors,
            "warnings": counts.warnings,
            "infos": counts.infos,
        }))?
    )?;
    writeln!(out)
}

/// A setting value on one line: compact JSON, strings unquoted, long values cut.
fn show_value(v: &Option<serde_json::Value>) -> String {
    const MAX: usize = 48;
    let s = match v {
        None => "-".to_string(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Array(a)) if a.is_empty() => "[]".into(),
        Some(serde_json::Value::Array(a)) => {
            // Mapping lists: their keys.
            let keys: Vec<String> = a
                .iter()
                .map(|m| {
                    m.get("destination")
                        .or_else(|| m.get("mountPath"))
                        .and_then(|x| x.as_str())
                        .map(str::to_string)
                        .unwrap_or_else(|| m.to_string())
                })
                .collect();
            format!("[{}]", keys.join(", "))
        }
        Some(other) => other.to_string(),
    };
    if s.chars().count() > MAX {
        let cut: String = s.chars().take(MAX - 1).collect();
        format!("{cut}…")
    } else {
        s
    }
}

fn write_user_text(p: &UserPlan, out: &mut dyn Write) -> std::io::Result<()> {
    let flags = if p.disabled { ", disabled" } else { "" };
    writeln!(
        out,
        "User {}/{} (username {}, realm {}, userId {}{flags})",
        p.namespace, p.name, p.username, p.realm, p.user_id
    )?;
    match &p.identity {
        Some(id) => match &id.uid {
            Some(uid) => writeln!(out, "  acted for by: {} (uid {uid})", id.username)?,
            None => writeln!(out, "  acted for by: {}", id.username)?,
        },
        None => writeln!(
            out,
            "  acted for by: (no spec.identity: only the admin groups)"
        )?,
    }
    writeln!(out, "  groups:")?;
    if p.groups.is_empty() {
        writeln!(out, "    (none)")?;
    }
    for g in &p.groups {
        let via = match g.via {
            MembershipVia::Spec => "listed in spec.groups",
            MembershipVia::AutoAddLocalUsers => "autoAddLocalUsers (local user)",
        };
        writeln!(out, "    {:>7}  {:<24} {via}", g.priority, g.name)?;
    }
    writeln!(out, "  settings:")?;
    let width = p.settings.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for s in &p.settings {
        writeln!(
            out,
            "    {:<width$}  {:<48}  {}",
            s.name,
            show_value(&s.value),
            describe_source(&s.source)
        )?;
    }
    writeln!(out, "  assigned servers:")?;
    if p.assigned_servers.is_empty() {
        writeln!(out, "    (none)")?;
    }
    for a in &p.assigned_servers {
        writeln!(
            out,
            "    {:<24} pool {:<16} {}",
            a.server,
            a.pool.as_deref().unwrap_or("?"),
            if a.in_effect {
                "in effect"
            } else {
                "not in effect"
            }
        )?;
    }
    writeln!(out, "  workspaces:")?;
    for w in &p.workspaces {
        let place = match (&w.pool, w.autoscaled) {
            (None, _) => "any node".to_string(),
            (Some(pool), true) => format!("pool {pool} (autoscaled nodes)"),
            (Some(pool), false) => {
                let servers: Vec<String> = w
                    .servers
                    .iter()
                    .map(|s| {
                        if s.in_effect {
                            format!("{} (assigned)", s.server)
                        } else {
                            s.server.clone()
                        }
                    })
                    .collect();
                if servers.is_empty() {
                    format!("pool {pool}")
                } else {
                    format!("pool {pool}: {}", servers.join(", "))
                }
            }
        };
        if w.allowed {
            writeln!(out, "    {:<24} may launch, on {place}", w.workspace)?;
        } else {
            writeln!(
                out,
                "    {:<24} refused ({}): {}",
                w.workspace,
                w.reason.as_deref().unwrap_or("?"),
                w.message.as_deref().unwrap_or("")
            )?;
        }
    }
    if !p.findings.is_empty() {
        writeln!(out, "  findings:")?;
        for f in &p.findings {
            writeln!(out, "    {}: {}: {}", f.severity, f.field, f.message)?;
        }
    }
    writeln!(out)
}

fn write_text(
    repo: &Repo,
    ds: &[Diagnostic],
    counts: Counts,
    user: Option<&str>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let mut n = 0;
    for ns in repo.namespaces.values() {
        let index = assigned_index(ns);
        for u in selected(ns, user) {
            let assigned = index.get(&u.name_any()).cloned().unwrap_or_default();
            write_user_text(&user_plan_with(ns, u, assigned), out)?;
            n += 1;
        }
    }
    writeln!(out, "Diagnostics:")?;
    if ds.is_empty() {
        writeln!(out, "  (none)")?;
    }
    for d in ds {
        writeln!(out, "  {d}")?;
    }
    writeln!(
        out,
        "\n{} planned; {}, {}, {}",
        plural(n, "user"),
        plural(counts.errors, "error"),
        plural(counts.warnings, "warning"),
        plural(counts.infos, "info")
    )
}
