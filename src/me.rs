//! The CLI for people, on their own kubeconfig: `cubicle launch|sessions|stop|pause|resume|
//! delete` (and `keepalive`), also installed as the kubectl plugin `kubectl cubicle ...` (the
//! same binary named `kubectl-cubicle`).
//!
//! It finds "me" as the API server knows the requester (a SelfSubjectReview) and the User whose
//! `spec.identity` carries that identity. It checks a launch before creating anything with what
//! a person may read (their User, the Groups, the Workspace): a bad request or a refusal is one
//! line naming the requester, the User and the rule, and nothing is created. What only the
//! operator can judge (servers, usage, capacity) it reports from the Session's `Admitted`
//! condition with `--wait`, and then removes the refused Session. The API server's own
//! refusals (the Session admission policy) are passed on as one line too.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};

use crate::crd::v1alpha1::{
    DesiredState, Group, ProfileMode, Session, SessionPhase, UsageEntry, User, Workspace,
};
use crate::resolve::{self, Directory};

/// The requester, as the API server reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Me {
    /// Username.
    pub username: String,
    /// Uid, when the authenticator sets one.
    pub uid: Option<String>,
}

/// The User that carries `me` (pure): exactly one User whose `spec.identity.username` is
/// `me.username` and whose `spec.identity.uid`, when set, is `me.uid`.
pub fn find_user<'a>(me: &Me, ns: &str, users: &'a [User]) -> Result<&'a User, String> {
    let mine: Vec<&User> = users
        .iter()
        .filter(|u| {
            u.spec.identity.as_ref().is_some_and(|id| {
                id.username == me.username
                    && id
                        .uid
                        .as_ref()
                        .is_none_or(|uid| Some(uid) == me.uid.as_ref())
            })
        })
        .collect();
    match mine.as_slice() {
        [u] => Ok(u),
        [] => {
            let uid_mismatch = users.iter().any(|u| {
                u.spec
                    .identity
                    .as_ref()
                    .is_some_and(|id| id.username == me.username)
            });
            Err(if uid_mismatch {
                format!(
                    "{}: the User with spec.identity.username {} in namespace {ns} pins another \
                     uid (spec.identity.uid), so it is not yours",
                    me.username, me.username
                )
            } else {
                format!(
                    "{}: no User in namespace {ns} carries this identity (spec.identity.username); \
                     ask an administrator to set it on your User",
                    me.username
                )
            })
        }
        many => Err(format!(
            "{}: {} Users in namespace {ns} carry this identity ({}); each identity must \
             belong to one User (DuplicateIdentity)",
            me.username,
            many.len(),
            many.iter()
                .map(|u| format!("User/{}", u.name_any()))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// What `launch` asks for.
#[derive(Debug, Clone, Default)]
pub struct LaunchRequest {
    /// The Workspace.
    pub workspace: String,
    /// `--profile`.
    pub profile: Option<ProfileMode>,
    /// `--zone`.
    pub zone: Option<String>,
}

/// The checks a person's launch must pass that the CLI can judge from what a person may read
/// (pure): the User enabled, the Workspace there and open to one of the User's groups, the
/// session count under maxKasmsPerUser, zone and profile choices allowed. Returns the Session
/// to create, or the refusal line (requester, User, rule).
pub fn plan_launch(
    me: &Me,
    user: &User,
    dir: &Directory,
    active: u32,
    req: &LaunchRequest,
) -> Result<Session, String> {
    let uname = user.name_any();
    let refuse = |rule: &str, msg: String| {
        Err(format!(
            "{} as User {uname}: refused ({rule}): {msg}",
            me.username
        ))
    };
    let Some(ws) = dir.workspace(&req.workspace) else {
        return refuse(
            "WorkspaceNotFound",
            format!(
                "Workspace {:?} does not exist in namespace {}",
                req.workspace, dir.namespace
            ),
        );
    };
    if user.spec.disabled == Some(true) {
        return refuse(
            "UserDisabled",
            format!("User {uname} is disabled (spec.disabled: true)"),
        );
    }
    let r = resolve::resolve_user(dir, user);
    let groups: Vec<String> = r.groups.iter().map(|g| g.name.clone()).collect();
    if !ws.spec.groups.iter().any(|g| groups.contains(g)) {
        let d = resolve::access::Denial::NotInAllowedGroup {
            user: uname.clone(),
            workspace: req.workspace.clone(),
            allowed: ws.spec.groups.clone(),
            groups,
        };
        return refuse(d.reason(), d.to_string());
    }
    let s = &r.settings;
    if let Some(max) = s.max_kasms_per_user
        && active >= max
    {
        return refuse(
            "MaxSessionsReached",
            format!(
                "User {uname} already has {active} active session(s); maxKasmsPerUser is {max}"
            ),
        );
    }
    if let Some(z) = &req.zone
        && !s.allow_zone_selection
    {
        return refuse(
            "ZoneSelectionNotAllowed",
            format!("--zone {z}: none of the user's groups sets allowZoneSelection: true"),
        );
    }
    if matches!(req.profile, Some(ProfileMode::Enabled | ProfileMode::Reset)) {
        if ws.spec.persistent_profile.is_none() {
            return refuse(
                "ConfigurationError",
                format!(
                    "--profile: Workspace {} has no persistentProfile",
                    req.workspace
                ),
            );
        }
        if !s.allow_persistent_profile {
            return refuse(
                "PersistentProfileNotAllowed",
                "--profile: none of the user's groups sets allowPersistentProfile: true".into(),
            );
        }
    }
    let mut spec = serde_json::json!({"user": uname, "workspace": req.workspace});
    if let Some(p) = req.profile {
        spec["persistentProfile"] = serde_json::to_value(p).expect("a profile mode is JSON");
    }
    if let Some(z) = &req.zone {
        spec["zone"] = serde_json::Value::from(z.as_str());
    }
    let prefix = format!("{uname}-{}-", req.workspace);
    let prefix: String = prefix.chars().take(50).collect();
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "cubicle.dev/v1alpha1", "kind": "Session",
        "metadata": {"generateName": prefix, "namespace": dir.namespace},
        "spec": spec,
    }))
    .expect("a well-formed Session"))
}

fn fmt_secs(s: u64) -> String {
    let (h, m) = (s / 3600, (s % 3600) / 60);
    if h > 0 {
        format!("{h}h{m:02}m")
    } else {
        format!("{m}m{:02}s", s % 60)
    }
}

/// The usage line of a User (pure): used and remaining per budget.
pub fn usage_line(usage: &[UsageEntry]) -> String {
    if usage.is_empty() {
        return "usage: no limit".into();
    }
    let parts: Vec<String> = usage
        .iter()
        .map(|u| {
            let who = match &u.group {
                Some(g) => format!("group {g}"),
                None => "own".into(),
            };
            let interval = serde_json::to_value(u.interval)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            format!(
                "{interval} ({who}): used {}, remaining {}",
                fmt_secs(u.used_seconds),
                fmt_secs(u.limit_seconds.saturating_sub(u.used_seconds))
            )
        })
        .collect();
    format!("usage: {}", parts.join("; "))
}

fn enum_str<T: serde::Serialize>(v: &Option<T>) -> String {
    v.as_ref()
        .and_then(|v| serde_json::to_value(v).ok())
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "-".into())
}

/// The `sessions` table of one User's Sessions (pure).
pub fn sessions_table(user: &User, sessions: &[Session]) -> String {
    let mut rows = vec![[
        "NAME".to_string(),
        "WORKSPACE".into(),
        "PHASE".into(),
        "NODE".into(),
        "EXPIRES-AT".into(),
        "RULE".into(),
        "USAGE-LEFT".into(),
    ]];
    let mut mine: Vec<&Session> = sessions
        .iter()
        .filter(|s| s.spec.user == user.name_any())
        .collect();
    mine.sort_by_key(|s| s.name_any());
    for s in mine {
        let st = s.status.clone().unwrap_or_default();
        rows.push([
            s.name_any(),
            s.spec.workspace.clone(),
            enum_str(&st.phase),
            st.node.unwrap_or_else(|| "-".into()),
            st.expires_at
                .map(|t| t.0.to_string())
                .unwrap_or_else(|| "-".into()),
            enum_str(&st.expiry_rule),
            st.usage_remaining_seconds
                .map(fmt_secs)
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let usage = user
        .status
        .as_ref()
        .map(|s| usage_line(&s.usage))
        .unwrap_or_else(|| usage_line(&[]));
    out.push_str(&usage);
    out.push('\n');
    out
}

/// A refusal by the API server, as one line: the admission policy's own message (requester,
/// User, rule) without the API server's preamble.
pub fn api_refusal(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => {
            let m = s.message.as_str();
            match m.split_once("denied request: ") {
                Some((_, rest)) => rest.to_string(),
                None => format!("{m} ({})", s.reason),
            }
        }
        other => other.to_string(),
    }
}

/// What a person asks the CLI.
#[derive(Debug, Clone)]
pub enum Action {
    /// Launch a Workspace.
    Launch {
        /// The request.
        req: LaunchRequest,
        /// Wait until it runs or is refused.
        wait: Option<Duration>,
    },
    /// List my sessions.
    Sessions,
    /// Set a Session's desired state.
    SetState {
        /// Session name.
        session: String,
        /// The state.
        state: DesiredState,
    },
    /// Delete a Session.
    Delete {
        /// Session name.
        session: String,
    },
}

/// A failure of the CLI: one line for the person.
pub type Line = String;

/// The requester's identity (SelfSubjectReview).
pub async fn whoami(client: &Client) -> Result<Me, Line> {
    let review: SelfSubjectReview = serde_json::from_value(serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"
    }))
    .expect("a well-formed review");
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let r = api
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| format!("cannot learn who you are (SelfSubjectReview): {e}"))?;
    let info = r.status.and_then(|s| s.user_info).unwrap_or_default();
    Ok(Me {
        username: info.username.unwrap_or_default(),
        uid: info.uid.filter(|u| !u.is_empty()),
    })
}

/// Runs `action` in namespace `ns` as the requester of `client`; prints results on stdout.
pub async fn run(client: Client, ns: &str, action: Action) -> Result<(), Line> {
    let me = whoami(&client).await?;
    let users: Api<User> = Api::namespaced(client.clone(), ns);
    let all = users.list(&ListParams::default()).await.map_err(|e| {
        format!(
            "{}: cannot read the Users of namespace {ns}: {}",
            me.username,
            api_refusal(&e)
        )
    })?;
    let user = find_user(&me, ns, &all.items)?.clone();
    let uname = user.name_any();
    let sessions: Api<Session> = Api::namespaced(client.clone(), ns);
    match action {
        Action::Launch { req, wait } => {
            let groups: Api<Group> = Api::namespaced(client.clone(), ns);
            let workspaces: Api<Workspace> = Api::namespaced(client.clone(), ns);
            let lp = ListParams::default();
            let read = |what: &str, e: kube::Error| {
                format!(
                    "{}: cannot read the {what} of namespace {ns}: {}",
                    me.username,
                    api_refusal(&e)
                )
            };
            let dir = Directory {
                namespace: ns.to_string(),
                groups: groups
                    .list(&lp)
                    .await
                    .map_err(|e| read("Groups", e))?
                    .items
                    .into_iter()
                    .map(Arc::new)
                    .collect(),
                workspaces: workspaces
                    .list(&lp)
                    .await
                    .map_err(|e| read("Workspaces", e))?
                    .items
                    .into_iter()
                    .map(Arc::new)
                    .collect(),
                ..Directory::default()
            };
            let mine = sessions.list(&lp).await.map_err(|e| read("Sessions", e))?;
            let active = mine
                .items
                .iter()
                .filter(|s| s.spec.user == uname && resolve::session_is_active(s))
                .count() as u32;
            let s = plan_launch(&me, &user, &dir, active, &req)?;
            let created = sessions
                .create(&PostParams::default(), &s)
                .await
                .map_err(|e| api_refusal(&e))?;
            let name = created.name_any();
            println!("{ns}/{name}: launched {} as User {uname}", req.workspace);
            if let Some(limit) = wait {
                wait_running(&sessions, &me, &uname, &name, limit).await?;
            }
            Ok(())
        }
        Action::Sessions => {
            let l = sessions
                .list(&ListParams::default())
                .await
                .map_err(|e| api_refusal(&e))?;
            print!("{}", sessions_table(&user, &l.items));
            Ok(())
        }
        Action::SetState { session, state } => {
            mine_or_refuse(&sessions, &me, &uname, &session).await?;
            let patch = serde_json::json!({"spec": {"state": state}});
            sessions
                .patch(&session, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .map_err(|e| api_refusal(&e))?;
            println!("{ns}/{session}: {}", enum_str(&Some(state)));
            Ok(())
        }
        Action::Delete { session } => {
            mine_or_refuse(&sessions, &me, &uname, &session).await?;
            sessions
                .delete(&session, &DeleteParams::default())
                .await
                .map_err(|e| api_refusal(&e))?;
            println!("{ns}/{session}: deleted");
            Ok(())
        }
    }
}

/// A Session of another User is refused before any write (the API server would refuse it too,
/// unless the requester may act for that User: then it is theirs to change).
async fn mine_or_refuse(api: &Api<Session>, me: &Me, uname: &str, name: &str) -> Result<(), Line> {
    match api.get_opt(name).await {
        Ok(Some(s)) if s.spec.user == uname => Ok(()),
        Ok(Some(s)) => Err(format!(
            "{} as User {uname}: refused: Session {name} belongs to User {} (a Session is \
             changed only by someone who may use its User)",
            me.username, s.spec.user
        )),
        Ok(None) => Err(format!(
            "{} as User {uname}: Session {name} does not exist",
            me.username
        )),
        Err(e) => Err(api_refusal(&e)),
    }
}

async fn wait_running(
    api: &Api<Session>,
    me: &Me,
    uname: &str,
    name: &str,
    limit: Duration,
) -> Result<(), Line> {
    let start = std::time::Instant::now();
    let mut unreachable = 0;
    loop {
        let got = api.get(name).await;
        match &got {
            Err(kube::Error::Api(_)) | Ok(_) => unreachable = 0,
            Err(e) => {
                unreachable += 1;
                if unreachable >= 5 {
                    return Err(format!("{name}: lost the API server while waiting: {e}"));
                }
            }
        }
        if let Ok(s) = got {
            let st = s.status.clone().unwrap_or_default();
            match st.phase {
                Some(SessionPhase::Running) => {
                    println!("{name}: Running on {}", st.node.as_deref().unwrap_or("-"));
                    return Ok(());
                }
                Some(SessionPhase::Refused | SessionPhase::Failed) => {
                    let c = st.conditions.iter().find(|c| {
                        c.status == "False" && matches!(c.type_.as_str(), "Admitted" | "Ready")
                    });
                    let (reason, msg) = c
                        .map(|c| (c.reason.clone(), c.message.clone()))
                        .unwrap_or_default();
                    // The refused Session is only a record of the refusal: nothing is left.
                    let _ = api.delete(name, &DeleteParams::default()).await;
                    return Err(format!(
                        "{} as User {uname}: refused ({reason}): {msg}",
                        me.username
                    ));
                }
                _ => {}
            }
        }
        if start.elapsed() > limit {
            return Err(format!(
                "{name}: not running after {}s (see kubectl get session {name} -o yaml)",
                limit.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, identity: Option<(&str, Option<&str>)>, extra: serde_json::Value) -> User {
        let mut spec = extra;
        if let Some((u, uid)) = identity {
            spec["identity"] = serde_json::json!({"username": u, "uid": uid});
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cubicle.dev/v1alpha1", "kind": "User",
            "metadata": {"name": name, "namespace": "team"}, "spec": spec
        }))
        .unwrap()
    }

    fn me(u: &str, uid: Option<&str>) -> Me {
        Me {
            username: u.into(),
            uid: uid.map(str::to_string),
        }
    }

    #[test]
    fn me_is_the_one_user_with_my_identity_and_uid() {
        let users = vec![
            user("alice", Some(("oidc:alice", None)), serde_json::json!({})),
            user(
                "bob",
                Some(("oidc:bob", Some("b-1"))),
                serde_json::json!({}),
            ),
            user("carol", None, serde_json::json!({})),
        ];
        assert_eq!(
            find_user(&me("oidc:alice", Some("x")), "team", &users)
                .unwrap()
                .name_any(),
            "alice"
        );
        assert_eq!(
            find_user(&me("oidc:bob", Some("b-1")), "team", &users)
                .unwrap()
                .name_any(),
            "bob"
        );
        let e = find_user(&me("oidc:bob", Some("b-2")), "team", &users).unwrap_err();
        assert!(e.contains("pins another uid"), "{e}");
        let e = find_user(&me("oidc:mallory", None), "team", &users).unwrap_err();
        assert!(
            e.starts_with("oidc:mallory: no User in namespace team"),
            "{e}"
        );
        let twice = vec![
            user("a", Some(("x", None)), serde_json::json!({})),
            user("b", Some(("x", None)), serde_json::json!({})),
        ];
        let e = find_user(&me("x", None), "team", &twice).unwrap_err();
        assert!(
            e.contains("User/a, User/b") && e.contains("DuplicateIdentity"),
            "{e}"
        );
    }

    fn dir() -> Directory {
        let g: Group = serde_json::from_value(serde_json::json!({
            "apiVersion": "cubicle.dev/v1alpha1", "kind": "Group",
            "metadata": {"name": "eng", "namespace": "team"},
            "spec": {"priority": 10, "settings": {"maxKasmsPerUser": 1, "allowPersistentProfile": true}}
        }))
        .unwrap();
        let w: Workspace = serde_json::from_value(serde_json::json!({
            "apiVersion": "cubicle.dev/v1alpha1", "kind": "Workspace",
            "metadata": {"name": "desktop", "namespace": "team"},
            "spec": {"image": "x:1", "groups": ["eng"]}
        }))
        .unwrap();
        Directory {
            namespace: "team".into(),
            groups: vec![Arc::new(g)],
            workspaces: vec![Arc::new(w)],
            ..Directory::default()
        }
    }

    fn req(ws: &str) -> LaunchRequest {
        LaunchRequest {
            workspace: ws.into(),
            ..LaunchRequest::default()
        }
    }

    #[test]
    fn a_launch_names_me_my_user_and_the_rule_when_refused() {
        let m = me("oidc:alice", None);
        let alice = user(
            "alice",
            Some(("oidc:alice", None)),
            serde_json::json!({"groups": ["eng"]}),
        );
        let s = plan_launch(&m, &alice, &dir(), 0, &req("desktop")).unwrap();
        assert_eq!(s.spec.user, "alice");
        assert_eq!(s.metadata.generate_name.as_deref(), Some("alice-desktop-"));

        let e = plan_launch(&m, &alice, &dir(), 0, &req("cad")).unwrap_err();
        assert!(
            e.starts_with("oidc:alice as User alice: refused (WorkspaceNotFound)"),
            "{e}"
        );
        let e = plan_launch(&m, &alice, &dir(), 1, &req("desktop")).unwrap_err();
        assert!(e.contains("(MaxSessionsReached)"), "{e}");
        let zone = LaunchRequest {
            zone: Some("zone-a".into()),
            ..req("desktop")
        };
        let e = plan_launch(&m, &alice, &dir(), 0, &zone).unwrap_err();
        assert!(e.contains("(ZoneSelectionNotAllowed)"), "{e}");
        let profile = LaunchRequest {
            profile: Some(ProfileMode::Enabled),
            ..req("desktop")
        };
        let e = plan_launch(&m, &alice, &dir(), 0, &profile).unwrap_err();
        assert!(
            e.contains("(ConfigurationError)") && e.contains("no persistentProfile"),
            "{e}"
        );

        let outsider = user(
            "olga",
            Some(("oidc:olga", None)),
            serde_json::json!({"realm": "ldap"}),
        );
        let e = plan_launch(
            &me("oidc:olga", None),
            &outsider,
            &dir(),
            0,
            &req("desktop"),
        )
        .unwrap_err();
        assert!(
            e.starts_with("oidc:olga as User olga: refused (NotInAllowedGroup)"),
            "{e}"
        );
        let locked = user(
            "lee",
            None,
            serde_json::json!({"groups": ["eng"], "disabled": true}),
        );
        let e = plan_launch(&me("lee", None), &locked, &dir(), 0, &req("desktop")).unwrap_err();
        assert!(e.contains("(UserDisabled)"), "{e}");
    }

    #[test]
    fn the_table_shows_only_my_sessions_and_my_usage() {
        let alice = user("alice", None, serde_json::json!({}));
        let s = |name: &str, u: &str| -> Session {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "cubicle.dev/v1alpha1", "kind": "Session",
                "metadata": {"name": name, "namespace": "team"},
                "spec": {"user": u, "workspace": "desktop"},
                "status": {"phase": "Running", "node": "n1", "expiryRule": "sessionTimeLimit",
                           "expiresAt": "2026-12-04T20:00:00.000000Z", "usageRemainingSeconds": 3600}
            }))
            .unwrap()
        };
        let t = sessions_table(&alice, &[s("a1", "alice"), s("b1", "bob")]);
        assert!(t.contains("a1") && !t.contains("b1"), "{t}");
        assert!(
            t.contains("Running") && t.contains("n1") && t.contains("sessionTimeLimit"),
            "{t}"
        );
        assert!(t.contains("1h00m"), "{t}");
        assert!(t.ends_with("usage: no limit\n"), "{t}");
    }
}
