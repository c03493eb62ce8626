//! The dashboard on the portal: what a person sees and does in the browser (Kasm's user
//! dashboard). Rendered on the server from the gateway's caches only (no API request to show
//! it); its actions (launch, stop, pause, resume, delete) are sent to the API server as the
//! person (impersonation), so the Session admission policy and RBAC hold for them exactly as
//! for `kubectl`. Forms carry a token bound to the person and their sign-in cookie.
//!
//! The pure part ([`model`], [`render`]) takes the cached objects and `now`; the I/O part
//! ([`serve`]) reads the request, asks the API server and answers.

use std::fmt::Write as _;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::core::Identity;
use super::proxy::{Body, full};
use super::{AuthMode, State};
use crate::crd::v1alpha1::{
    DesiredState, ExpiryRule, ProfileMode, Session, SessionPhase, UsageEntry, User,
    UserPreferences, UserPreferencesSpec, Workspace,
};
use crate::resolve::{self, Directory};

/// How long a form token is valid.
const TOKEN_TTL_SECS: i64 = 12 * 3600;
/// The page polls `/.cubicle/state` this often (milliseconds).
pub const POLL_MS: u64 = 5000;

/// What a form may do to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `spec.state: Stopped`.
    Stop,
    /// `spec.state: Paused`.
    Pause,
    /// `spec.state: Running`.
    Resume,
    /// Delete the Session.
    Delete,
}

impl Action {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "stop" => Self::Stop,
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            "delete" => Self::Delete,
            _ => return None,
        })
    }
    fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Delete => "delete",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Self::Stop => "Stop",
            Self::Pause => "Pause",
            Self::Resume => "Resume",
            Self::Delete => "Delete",
        }
    }
}

/// A workspace the person may launch.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkspaceItem {
    /// Object name.
    pub name: String,
    /// Display name.
    pub title: String,
    /// Description.
    pub description: String,
    /// "2 cores · 4Gi · 1 GPU".
    pub resources: String,
    /// It has a persistent profile.
    pub has_profile: bool,
    /// Why a launch would be refused, known ahead (the operator decides all the same).
    pub warning: Option<String>,
}

/// One session, as shown.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionItem {
    /// Object name.
    pub name: String,
    /// Uid (the host label).
    pub uid: String,
    /// Workspace name.
    pub workspace: String,
    /// Phase (`Pending` when the operator has not looked yet).
    pub phase: String,
    /// Zone asked for.
    pub zone: Option<String>,
    /// Where to connect, while it runs.
    pub url: Option<String>,
    /// Deadline and the rule that sets it.
    pub expires: Option<(Timestamp, String)>,
    /// Why it was refused or failed, in words.
    pub reason: Option<String>,
    /// Profile mode and outcome, in words.
    pub profile: Option<String>,
    /// Actions offered.
    pub actions: Vec<Action>,
}

/// One usage budget.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageItem {
    /// "daily (group team)".
    pub label: String,
    /// Seconds used.
    pub used: u64,
    /// Seconds allowed.
    pub limit: u64,
}

/// One User the person acts for, with everything the dashboard shows about it.
#[derive(Debug, Clone, PartialEq)]
pub struct UserPanel {
    /// Namespace.
    pub namespace: String,
    /// User name.
    pub user: String,
    /// The account is locked.
    pub disabled: bool,
    /// Offer the persistent-profile choice.
    pub profiles: bool,
    /// Offer the zone list.
    pub zones: bool,
    /// Launchable workspaces.
    pub workspaces: Vec<WorkspaceItem>,
    /// Sessions, newest first.
    pub sessions: Vec<SessionItem>,
    /// Usage budgets.
    pub usage: Vec<UsageItem>,
    /// `maxKasmsPerUser`, when set.
    pub max_sessions: Option<u32>,
    /// The person's settings in force (seed 001).
    pub prefs: super::settings::Prefs,
}

/// Everything one dashboard shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// The person.
    pub who: String,
    /// The Users the person acts for.
    pub panels: Vec<UserPanel>,
    /// Zones known from the nodes.
    pub zones: Vec<String>,
    /// `light`, `dark` or `auto`.
    pub theme: String,
}

fn quantity(q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity) -> String {
    q.0.clone()
}

fn workspace_item(w: &Workspace) -> WorkspaceItem {
    let mut res = Vec::new();
    if let Some(r) = &w.spec.resources {
        if let Some(c) = &r.cores {
            res.push(format!("{} cores", quantity(c)));
        }
        if let Some(m) = &r.memory {
            res.push(format!("{} memory", quantity(m)));
        }
        if let Some(g) = r.gpus.filter(|g| *g > 0) {
            res.push(format!("{g} GPU"));
        }
    }
    WorkspaceItem {
        name: w.name_any(),
        title: w.spec.display_name.clone().unwrap_or_else(|| w.name_any()),
        description: w.spec.description.clone().unwrap_or_default(),
        resources: if res.is_empty() {
            "default resources".into()
        } else {
            res.join(" · ")
        },
        has_profile: w.spec.persistent_profile.is_some(),
        warning: None,
    }
}

fn condition<'a>(s: &'a Session, t: &str) -> Option<&'a Condition> {
    s.status.as_ref()?.conditions.iter().find(|c| c.type_ == t)
}

/// The reason a session was refused or failed, in words: the operator's own message.
pub fn refusal(s: &Session) -> Option<String> {
    let phase = s.status.as_ref().and_then(|st| st.phase)?;
    if !matches!(phase, SessionPhase::Refused | SessionPhase::Failed) {
        return None;
    }
    let c = condition(s, "Admitted")
        .filter(|c| c.status == "False")
        .or_else(|| condition(s, "Ready").filter(|c| c.status == "False"));
    Some(match c {
        Some(c) if !c.message.is_empty() => format!("{} ({})", c.message, c.reason),
        Some(c) => c.reason.clone(),
        None => format!("{phase:?}"),
    })
}

fn rule_words(r: ExpiryRule) -> &'static str {
    match r {
        ExpiryRule::Keepalive => "keepalive expiration",
        ExpiryRule::SessionTimeLimit => "session time limit",
        ExpiryRule::UsageLimit => "usage limit",
    }
}

fn session_item(s: &Session, settings: &resolve::EffectiveSettings) -> SessionItem {
    // Borrowed: a status carries conditions and profile details the page mostly ignores.
    let empty = crate::crd::v1alpha1::SessionStatus::default();
    let st = s.status.as_ref().unwrap_or(&empty);
    let phase = st.phase.unwrap_or(SessionPhase::Pending);
    let live = matches!(
        phase,
        SessionPhase::Pending
            | SessionPhase::Running
            | SessionPhase::Paused
            | SessionPhase::Stopped
    );
    let desired = s.spec.state.unwrap_or(DesiredState::Running);
    let mut actions = Vec::new();
    if live {
        if settings.allow_kasm_stop && desired != DesiredState::Stopped {
            actions.push(Action::Stop);
        }
        if settings.allow_kasm_pause && desired == DesiredState::Running {
            actions.push(Action::Pause);
        }
        if desired != DesiredState::Running
            && match desired {
                DesiredState::Stopped => settings.allow_kasm_stop,
                DesiredState::Paused => settings.allow_kasm_pause,
                DesiredState::Running => false,
            }
        {
            actions.push(Action::Resume);
        }
    }
    if settings.allow_kasm_delete || !live {
        actions.push(Action::Delete);
    }
    let profile = st.profile.as_ref().and_then(|p| {
        let out = p.outcome.map(|o| format!("{o:?}"))?;
        Some(match &p.archived_as {
            Some(a) => format!("{out}; the old profile is kept as {a}"),
            None => out,
        })
    });
    SessionItem {
        name: s.name_any(),
        uid: s.metadata.uid.clone().unwrap_or_default(),
        workspace: s.spec.workspace.clone(),
        phase: format!("{phase:?}"),
        zone: s.spec.zone.clone(),
        url: st.url.clone().filter(|_| phase == SessionPhase::Running),
        expires: st.expires_at.as_ref().filter(|_| live).map(|t| {
            (
                t.0,
                st.expiry_rule.map(rule_words).unwrap_or("").to_string(),
            )
        }),
        reason: refusal(s),
        profile,
        actions,
    }
}

fn usage_item(u: &UsageEntry) -> UsageItem {
    let scope = match &u.group {
        Some(g) => format!("group {g}"),
        None => "you".into(),
    };
    UsageItem {
        label: format!(
            "{} ({scope})",
            serde_json::to_value(u.interval)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        ),
        used: u.used_seconds,
        limit: u.limit_seconds,
    }
}

/// The panel of one User (pure: the cached objects in, the view out); `own`: the person's
/// UserPreferences of this User.
pub fn panel(
    dir: &Directory,
    user: &User,
    sessions: &[Arc<Session>],
    own: Option<&UserPreferencesSpec>,
) -> UserPanel {
    let r = resolve::resolve_user(dir, user);
    // Every workspace of the user's groups; one the operator would refuse for another reason
    // (a locked account, a missing server) is shown with that reason, and a launch shows the
    // operator's own words.
    let mut workspaces: Vec<WorkspaceItem> = dir
        .workspaces
        .iter()
        .filter_map(|w| match resolve::access(dir, user, &r, w).allowed {
            Ok(()) => Some(workspace_item(w)),
            Err(resolve::Denial::NotInAllowedGroup { .. }) => None,
            Err(d) => Some(WorkspaceItem {
                warning: Some(d.to_string()),
                ..workspace_item(w)
            }),
        })
        .collect();
    workspaces.sort_by(|a, b| a.title.cmp(&b.title).then(a.name.cmp(&b.name)));
    let name = user.name_any();
    let mut mine: Vec<&Arc<Session>> = sessions.iter().filter(|s| s.spec.user == name).collect();
    mine.sort_by(|a, b| {
        b.metadata
            .creation_timestamp
            .cmp(&a.metadata.creation_timestamp)
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
    UserPanel {
        namespace: dir.namespace.clone(),
        user: name,
        disabled: user.spec.disabled == Some(true),
        profiles: r.settings.allow_persistent_profile,
        zones: r.settings.allow_zone_selection,
        workspaces,
        sessions: mine.iter().map(|s| session_item(s, &r.settings)).collect(),
        usage: user
            .status
            .as_ref()
            .map(|st| st.usage.iter().map(usage_item).collect())
            .unwrap_or_default(),
        max_sessions: r.settings.max_kasms_per_user,
        prefs: super::settings::effective(user, own, r.settings.default_workspace.as_deref()),
    }
}

/// Whether `user` is the person's: its `spec.identity.username` is theirs.
pub fn acts_for(who: &Identity, user: &User) -> bool {
    user.spec
        .identity
        .as_ref()
        .is_some_and(|i| i.username == who.username)
}

/// HTML-escapes `s` (text and attribute values).
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    escape_into(&mut o, s);
    o
}

/// Appends `s` HTML-escaped to `o`: the runs without a special character are copied whole (a
/// page is mostly such runs, and the form token is repeated on every form).
pub fn escape_into(o: &mut String, s: &str) {
    let mut from = 0;
    for (i, b) in s.bytes().enumerate() {
        let rep = match b {
            b'&' => "&amp;",
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'"' => "&quot;",
            b'\'' => "&#39;",
            _ => continue,
        };
        o.push_str(&s[from..i]);
        o.push_str(rep);
        from = i + 1;
    }
    o.push_str(&s[from..]);
}

/// `1h 02m 03s`.
pub fn hms(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h {m:02}m {s:02}s")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

const STYLE: &str = "\
:root{color-scheme:light dark;--bg:#fff;--fg:#1b1b1b;--muted:#555;--card:#f3f4f6;--line:#c8ccd2;--accent:#0b57d0;--bad:#b3261e;--btnfg:#fff}\
@media (prefers-color-scheme:dark){:root:not([data-theme=light]){--bg:#121417;--fg:#e8e8e8;--muted:#b0b4ba;--card:#1e2227;--line:#3a4048;--accent:#8ab4f8;--bad:#f2b8b5;--btnfg:#0b0d10}}\
:root[data-theme=light]{color-scheme:light}:root[data-theme=dark]{color-scheme:dark;--bg:#121417;--fg:#e8e8e8;--muted:#b0b4ba;--card:#1e2227;--line:#3a4048;--accent:#8ab4f8;--bad:#f2b8b5;--btnfg:#0b0d10}\
body{background:var(--bg);color:var(--fg);font:16px/1.45 system-ui,sans-serif;max-width:62em;margin:0 auto;padding:1em}\
section,article{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:.8em 1em;margin:.8em 0}\
h1{font-size:1.5em}h2{font-size:1.2em;margin:.2em 0}h3{font-size:1.05em;margin:.2em 0}\
.muted{color:var(--muted)}.bad{color:var(--bad);font-weight:600}\
a{color:var(--accent)}button,.btn{background:var(--accent);color:var(--btnfg);border:0;border-radius:6px;padding:.35em .9em;font:inherit;cursor:pointer;text-decoration:none;display:inline-block}\
button.danger{background:var(--bad)}:focus-visible{outline:3px solid var(--accent);outline-offset:2px}\
select,input{font:inherit;background:var(--bg);color:var(--fg);border:1px solid var(--line);border-radius:4px;padding:.2em}\
dl{display:grid;grid-template-columns:max-content 1fr;gap:.1em 1em;margin:.4em 0}dt{color:var(--muted)}dd{margin:0}\
form.inline{display:inline}fieldset{border:1px solid var(--line);border-radius:6px}";

const SCRIPT: &str = "\
(function(){var skew=Date.now()-Number(document.body.dataset.now);window.cubicleSkew=skew;\
function fmt(s){var h=Math.floor(s/3600),m=Math.floor(s/60)%60,x=s%60;\
return h>0?h+'h '+String(m).padStart(2,'0')+'m '+String(x).padStart(2,'0')+'s':m>0?m+'m '+String(x).padStart(2,'0')+'s':x+'s'}\
function tick(){document.querySelectorAll('[data-expires]').forEach(function(e){\
var left=Math.max(0,Math.floor((Number(e.dataset.expires)-(Date.now()-skew))/1000));\
e.textContent=fmt(left);e.dataset.left=left})}\
window.cubicleTick=tick;tick();setInterval(tick,1000);\
var fp=document.body.dataset.fp;\
setInterval(function(){if(document.hidden||window.cubiclePaused)return;fetch('/.cubicle/state',{credentials:'same-origin'})\
.then(function(r){return r.ok?r.text():null}).then(function(t){if(t&&t.trim()!==fp&&!document.querySelector('form :focus')){location.reload()}})\
.catch(function(){})},";

const SCRIPT_END: &str = ");\
document.querySelectorAll('form[data-confirm]').forEach(function(f){f.addEventListener('submit',function(ev){\
var p=f.querySelector('[name=profile]');if((!p||p.value==='Reset')&&!confirm(f.dataset.confirm)){ev.preventDefault()}})});\
})();";

/// A short fingerprint of what the page shows that changes on its own (phases, deadlines,
/// usage): the script reloads the page when it differs.
pub fn fingerprint(m: &Model) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in &m.panels {
        p.user.hash(&mut h);
        p.disabled.hash(&mut h);
        for s in &p.sessions {
            (&s.name, &s.phase, &s.url, &s.reason, &s.profile).hash(&mut h);
            s.expires
                .as_ref()
                .map(|(t, r)| (t.as_millisecond(), r))
                .hash(&mut h);
            s.actions.len().hash(&mut h);
        }
        for u in &p.usage {
            (u.used / 60, u.limit).hash(&mut h);
        }
        p.workspaces.len().hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

/// ` data-theme="dark"` for a theme that overrides the browser's, nothing for `auto`.
fn theme_attr(theme: &str) -> &'static str {
    match theme {
        "light" => " data-theme=\"light\"",
        "dark" => " data-theme=\"dark\"",
        _ => "",
    }
}

/// The start of a portal page, up to `<main>`: the theme, the title, who is signed in, the
/// navigation (`current`: `dashboard` or `settings`) and the notice.
fn page_start(
    o: &mut String,
    m: &Model,
    title: &str,
    body_attrs: &str,
    current: &str,
    notice: Option<&str>,
) {
    let nav = |page: &str, href: &str, label: &str| {
        format!(
            "<a href=\"{href}\" id=\"nav-{page}\"{}>{label}</a>",
            if page == current {
                " aria-current=\"page\""
            } else {
                ""
            }
        )
    };
    let _ = write!(
        o,
        "<!doctype html><html lang=\"en\"{}><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{title} · Cubicle</title><style>{STYLE}</style></head>\
         <body{body_attrs}><header><h1>Cubicle</h1>\
         <nav aria-label=\"Pages\">{} · {}</nav>\
         <p>Signed in as <b id=\"who\">{}</b>.</p></header><main>",
        theme_attr(&m.theme),
        nav("dashboard", "/", "Dashboard"),
        nav("settings", "/.cubicle/settings", "Settings"),
        escape(&m.who)
    );
    if let Some(n) = notice {
        let _ = write!(o, "<p role=\"status\" id=\"notice\">{}</p>", escape(n));
    }
}

/// Renders the settings page (pure): one form per User the person acts for.
pub fn render_settings(m: &Model, token: &str, notice: Option<&str>) -> String {
    let mut o = String::with_capacity(4096);
    page_start(&mut o, m, "Settings", "", "settings", notice);
    if m.panels.is_empty() {
        o.push_str(
            "<section><h2>No user for you</h2><p>No Cubicle User names you as its identity \
             (<code>spec.identity.username</code>). Ask an administrator to add you.</p></section>",
        );
    }
    for p in &m.panels {
        super::settings::render_panel(&mut o, p, token);
    }
    o.push_str("</main></body></html>");
    o
}

/// Renders the dashboard (pure). `token`: the form token; `notice`: a line shown on top.
pub fn render(m: &Model, now: Timestamp, token: &str, notice: Option<&str>) -> String {
    let mut o = String::with_capacity(8192);
    let attrs = format!(
        " data-now=\"{}\" data-fp=\"{}\"",
        now.as_millisecond(),
        fingerprint(m)
    );
    page_start(&mut o, m, "Dashboard", &attrs, "dashboard", notice);
    if m.panels.is_empty() {
        o.push_str(
            "<section><h2>No user for you</h2><p>No Cubicle User names you as its identity \
             (<code>spec.identity.username</code>). Ask an administrator to add you.</p></section>",
        );
    }
    for p in &m.panels {
        render_panel(&mut o, p, m, token);
    }
    let _ = write!(
        o,
        "</main><script>{SCRIPT}{POLL_MS}{SCRIPT_END}</script></body></html>"
    );
    o
}

pub(super) fn hidden(o: &mut String, name: &str, value: &str) {
    o.push_str("<input type=\"hidden\" name=\"");
    o.push_str(name);
    o.push_str("\" value=\"");
    escape_into(o, value);
    o.push_str("\">");
}

fn render_panel(o: &mut String, p: &UserPanel, m: &Model, token: &str) {
    let id = escape(&format!("{}-{}", p.namespace, p.user));
    let _ = write!(
        o,
        "<section aria-labelledby=\"u-{id}\"><h2 id=\"u-{id}\">{} <span class=\"muted\">in {}</span></h2>",
        escape(&p.user),
        escape(&p.namespace)
    );
    if p.disabled {
        o.push_str("<p class=\"bad\">This account is locked: no new session can start.</p>");
    }
    // Usage.
    if !p.usage.is_empty() {
        o.push_str("<h3>Session time usage</h3><dl class=\"usage\">");
        for u in &p.usage {
            let _ = write!(
                o,
                "<dt>{}</dt><dd data-used=\"{}\" data-limit=\"{}\">{} used, {} remaining of {}</dd>",
                escape(&u.label),
                u.used,
                u.limit,
                hms(u.used),
                hms(u.limit.saturating_sub(u.used)),
                hms(u.limit)
            );
        }
        o.push_str("</dl>");
    }
    // Sessions.
    let _ = write!(o, "<h3>Sessions</h3>");
    if let Some(max) = p.max_sessions {
        let _ = write!(o, "<p class=\"muted\">At most {max} at a time.</p>");
    }
    if p.sessions.is_empty() {
        o.push_str("<p class=\"muted\">No sessions.</p>");
    }
    for s in &p.sessions {
        let _ = write!(
            o,
            "<article class=\"session\" id=\"s-{n}\" data-phase=\"{ph}\" aria-label=\"Session {n}\">\
             <h3>{ws} <span class=\"muted\">{n}</span></h3><dl><dt>State</dt><dd class=\"phase\">{ph}</dd>",
            n = escape(&s.name),
            ws = escape(&s.workspace),
            ph = escape(&s.phase)
        );
        if let Some(z) = &s.zone {
            let _ = write!(o, "<dt>Zone</dt><dd class=\"zone\">{}</dd>", escape(z));
        }
        if let Some(pr) = &s.profile {
            let _ = write!(
                o,
                "<dt>Profile</dt><dd class=\"profile\">{}</dd>",
                escape(pr)
            );
        }
        if let Some((at, rule)) = &s.expires {
            let _ = write!(
                o,
                "<dt>Ends in</dt><dd><span class=\"countdown\" role=\"timer\" data-expires=\"{}\">…</span> \
                 <span class=\"muted\">at <time datetime=\"{at}\">{at}</time>, by the <span class=\"rule\">{}</span></span></dd>",
                at.as_millisecond(),
                escape(rule),
                at = at.to_string()
            );
        }
        if let Some(r) = &s.reason {
            let _ = write!(
                o,
                "<dt>Why</dt><dd class=\"bad reason\" role=\"alert\">{}</dd>",
                escape(r)
            );
        }
        o.push_str("</dl>");
        if let Some(u) = &s.url {
            let _ = write!(
                o,
                "<a class=\"btn connect\" href=\"{}\">Connect</a> ",
                escape(u)
            );
        }
        for a in &s.actions {
            let _ = write!(
                o,
                "<form class=\"inline\" method=\"post\" action=\"/.cubicle/act\">"
            );
            hidden(o, "token", token);
            hidden(o, "ns", &p.namespace);
            hidden(o, "name", &s.name);
            hidden(o, "action", a.as_str());
            let _ = write!(
                o,
                "<button type=\"submit\" class=\"act-{}{}\">{} <span class=\"muted\" hidden>{}</span></button></form> ",
                a.as_str(),
                if *a == Action::Delete { " danger" } else { "" },
                a.label(),
                escape(&s.name)
            );
        }
        o.push_str("</article>");
    }
    // Launch.
    o.push_str("<h3>Workspaces</h3>");
    if p.workspaces.is_empty() {
        o.push_str("<p class=\"muted\">No workspace is available to you.</p>");
    }
    for w in &p.workspaces {
        let fid = escape(&format!("{}-{}-{}", p.namespace, p.user, w.name));
        let _ = write!(
            o,
            "<article class=\"workspace\" id=\"w-{fid}\" aria-labelledby=\"wt-{fid}\"><h3 id=\"wt-{fid}\">{}</h3>\
             <p>{}</p><p class=\"muted\">{}</p>\
             <form method=\"post\" action=\"/.cubicle/launch\" data-confirm=\"Reset the persistent profile? \
             The old profile is archived, not deleted.\">",
            escape(&w.title),
            escape(&w.description),
            escape(&w.resources)
        );
        hidden(o, "token", token);
        hidden(o, "ns", &p.namespace);
        hidden(o, "user", &p.user);
        hidden(o, "workspace", &w.name);
        if let Some(warn) = &w.warning {
            let _ = write!(o, "<p class=\"bad\">{}</p>", escape(warn));
        }
        if p.profiles && w.has_profile {
            let _ = write!(
                o,
                "<label for=\"p-{fid}\">Persistent profile</label> <select id=\"p-{fid}\" name=\"profile\">\
                 <option value=\"Enabled\">Enabled</option><option value=\"Disabled\">Disabled</option>\
                 <option value=\"Reset\">Reset (the old profile is archived, not deleted)</option></select> "
            );
        }
        if p.zones {
            let _ = write!(
                o,
                "<label for=\"z-{fid}\">Zone</label> <select id=\"z-{fid}\" name=\"zone\"><option value=\"\">Any</option>"
            );
            for z in &m.zones {
                let _ = write!(o, "<option>{}</option>", escape(z));
            }
            o.push_str("</select> ");
        }
        let _ = write!(
            o,
            "<button type=\"submit\" class=\"launch\">Launch {}</button></form></article>",
            escape(&w.title)
        );
    }
    o.push_str("</section>");
}

// ---------------------------------------------------------------------------------------------
// Form tokens.

#[derive(Serialize, Deserialize)]
struct FormToken {
    /// Username.
    u: String,
    /// Digest of the sign-in cookie (empty behind a trusted proxy).
    c: String,
    /// Expiry, Unix seconds.
    e: i64,
    /// Kind marker: never a ticket or cookie.
    k: char,
}

fn cookie_digest(cookie: Option<&str>) -> String {
    match cookie {
        Some(c) => {
            let d = ring::digest::digest(&ring::digest::SHA256, c.as_bytes());
            d.as_ref()[..12]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        }
        None => String::new(),
    }
}

/// A form token for `who` holding the sign-in cookie `cookie`.
pub fn form_token(
    key: &crate::credentials::SigningKey,
    who: &Identity,
    cookie: Option<&str>,
    now: Timestamp,
) -> String {
    let t = FormToken {
        u: who.username.clone(),
        c: cookie_digest(cookie),
        e: now.as_second() + TOKEN_TTL_SECS,
        k: 'f',
    };
    key.seal(&serde_json::to_vec(&t).expect("serializable"))
}

/// Whether `token` was made for `who` with `cookie` and has not expired.
pub fn check_form_token(
    key: &crate::credentials::SigningKey,
    token: &str,
    who: &Identity,
    cookie: Option<&str>,
    now: Timestamp,
) -> bool {
    let Some(raw) = key.open(token) else {
        return false;
    };
    let Ok(t) = serde_json::from_slice::<FormToken>(&raw) else {
        return false;
    };
    t.k == 'f' && t.u == who.username && t.c == cookie_digest(cookie) && t.e > now.as_second()
}

// ---------------------------------------------------------------------------------------------
// The I/O shell.

fn html(status: StatusCode, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .header("x-frame-options", "DENY")
        .header(
            "content-security-policy",
            "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'; form-action 'self'",
        )
        .body(full(body))
        .expect("a static response")
}

/// A failure page: what happened, what to do next, and (`retry`) the form to send again.
pub fn failure(
    status: StatusCode,
    what: &str,
    next: &str,
    retry: Option<String>,
) -> Response<Body> {
    failure_themed("auto", status, what, next, retry)
}

/// [`failure`] in the person's theme.
pub fn failure_themed(
    theme: &str,
    status: StatusCode,
    what: &str,
    next: &str,
    retry: Option<String>,
) -> Response<Body> {
    let mut o = format!(
        "<!doctype html><html lang=\"en\"{}><head><meta charset=\"utf-8\"><title>{t} · Cubicle</title>\
         <style>{STYLE}</style></head><body><main><h1>{t}</h1><p role=\"alert\" id=\"what\">{}</p><p id=\"next\">{}</p>",
        theme_attr(theme),
        escape(what),
        escape(next),
        t = if status.is_client_error() && status != StatusCode::CONFLICT {
            "Not done"
        } else {
            "Something went wrong"
        },
    );
    if let Some(r) = retry {
        o.push_str(&r);
    }
    o.push_str("<p><a href=\"/\">Back to the dashboard</a></p></main></body></html>");
    html(status, o)
}

fn sign_in_cookie<'a>(state: &State, req: &'a Request<Incoming>) -> Option<&'a str> {
    match &state.config.auth {
        AuthMode::Oidc(_) => super::oidc::cookie(
            req,
            &super::oidc::cookie_name(&state.config.public, "signin"),
        ),
        AuthMode::TrustedHeader { .. } => None,
    }
}

/// The theme of the person's pages: that of their first User (their own setting, else the
/// User's `spec.settings.theme`), `auto` when unset or when they have no User: `light` and
/// `dark` override the browser's `prefers-color-scheme`.
pub fn theme_of(panels: &[UserPanel]) -> &'static str {
    panels.first().map_or("auto", |p| p.prefs.theme)
}

/// The Users `who` acts for, from the caches, by namespace and name.
fn users_of(cache: &super::cache::Cache, who: &Identity) -> Vec<Arc<User>> {
    let mut users: Vec<Arc<User>> = cache
        .users
        .all()
        .into_iter()
        .filter(|u| acts_for(who, u))
        .collect();
    users.sort_by_key(|u| (u.namespace(), u.name_any()));
    users
}

/// The person's theme, from the caches (for pages without a model).
pub fn theme_for(state: &State, who: &Identity) -> &'static str {
    let users = users_of(&state.cache, who);
    let Some(u) = users.first() else {
        return "auto";
    };
    let ns = u.namespace().unwrap_or_default();
    let own = state.cache.preferences.get(&ns, &u.name_any());
    super::settings::effective(u, own.as_ref().map(|p| &p.spec), None).theme
}

/// The model of `who`'s dashboard, from the caches.
pub fn model_for(state: &State, who: &Identity) -> Model {
    let cache = &state.cache;
    let users = users_of(cache, who);
    let mut panels = Vec::new();
    for u in &users {
        let ns = u.namespace().unwrap_or_default();
        let dir = cache.directory(&ns);
        let sessions = cache.sessions.in_namespace(&ns);
        let own = cache.preferences.get(&ns, &u.name_any());
        panels.push(panel(&dir, u, &sessions, own.as_ref().map(|p| &p.spec)));
    }
    Model {
        who: who.username.clone(),
        theme: theme_of(&panels).to_string(),
        panels,
        zones: cache.zones(),
    }
}

async fn form(req: Request<Incoming>) -> Result<Vec<(String, String)>, String> {
    let body = http_body_util::Limited::new(req.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|e| format!("the form could not be read: {e}"))?
        .to_bytes();
    Ok(form_urlencoded::parse(&body).into_owned().collect())
}

fn field<'a>(f: &'a [(String, String)], k: &str) -> Option<&'a str> {
    f.iter()
        .find(|(n, _)| n == k)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

fn retry_form(action: &str, fields: &[(String, String)], token: &str) -> String {
    let mut o = format!("<form method=\"post\" action=\"{action}\">");
    hidden(&mut o, "token", token);
    for (k, v) in fields.iter().filter(|(k, _)| k != "token") {
        hidden(&mut o, k, v);
    }
    o.push_str("<button type=\"submit\" id=\"retry\">Send it again</button></form>");
    o
}

/// Answers a request on the portal for signed-in person `who` (the OIDC routes are answered
/// before this).
pub async fn serve(state: &State, req: Request<Incoming>, who: Identity) -> Response<Body> {
    if !state.cache.synced() {
        return super::pages::not_ready();
    }
    let now = Timestamp::now();
    let cookie = sign_in_cookie(state, &req).map(String::from);
    let token = form_token(&state.signing, &who, cookie.as_deref(), now);
    let notice = req
        .uri()
        .query()
        .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "done"))
        .map(|(_, v)| v.into_owned());
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/") => {
            let m = model_for(state, &who);
            // The first dashboard of a sign-in: auto launch (once per sign-in, marked by a
            // cookie holding the sign-in cookie's digest, so any replica knows).
            let mark = cookie_digest(cookie.as_deref());
            let seen = super::oidc::cookie(&req, &autolaunch_cookie_name(state)) == Some(&mark);
            if !seen {
                let mut r = match super::settings::auto_launch(&m) {
                    Some(step) => auto_launch(state, &who, step, m.theme.as_str()).await,
                    None => html(StatusCode::OK, render(&m, now, &token, notice.as_deref())),
                };
                r.headers_mut().append(
                    header::SET_COOKIE,
                    autolaunch_cookie(state, &mark)
                        .parse()
                        .expect("a valid cookie"),
                );
                return r;
            }
            html(StatusCode::OK, render(&m, now, &token, notice.as_deref()))
        }
        (Method::GET, "/.cubicle/settings") => {
            let m = model_for(state, &who);
            html(
                StatusCode::OK,
                render_settings(&m, &token, notice.as_deref()),
            )
        }
        (Method::GET, "/.cubicle/state") => {
            let m = model_for(state, &who);
            Response::builder()
                .header(header::CONTENT_TYPE, "text/plain")
                .header(header::CACHE_CONTROL, "no-store")
                .body(full(fingerprint(&m)))
                .expect("a static response")
        }
        (Method::POST, path @ ("/.cubicle/launch" | "/.cubicle/act" | "/.cubicle/settings")) => {
            let path = path.to_string();
            let theme = theme_for(state, &who);
            let f = match form(req).await {
                Ok(f) => f,
                Err(e) => {
                    return failure_themed(
                        theme,
                        StatusCode::BAD_REQUEST,
                        &e,
                        "Go back and send it again.",
                        None,
                    );
                }
            };
            let ok = field(&f, "token")
                .is_some_and(|t| check_form_token(&state.signing, t, &who, cookie.as_deref(), now));
            if !ok {
                warn!(user = %who.username, path, "form without a valid token refused");
                return failure_themed(
                    theme,
                    StatusCode::FORBIDDEN,
                    "The form did not carry a valid token for you (it is old, from another \
                     sign-in, or not from this dashboard). Nothing was done.",
                    "Open the dashboard again and repeat what you did from there.",
                    None,
                );
            }
            let retry = retry_form(&path, &f, &token);
            let (r, back) = match path.as_str() {
                "/.cubicle/launch" => (launch(state, &who, &f).await, "/"),
                "/.cubicle/settings" => {
                    (save_settings(state, &who, &f).await, "/.cubicle/settings")
                }
                _ => (act(state, &who, &f).await, "/"),
            };
            match r {
                Ok(done) => super::pages::redirect(&format!(
                    "{back}?done={}",
                    form_urlencoded::byte_serialize(done.as_bytes()).collect::<String>()
                )),
                Err((status, what, next)) => {
                    failure_themed(theme, status, &what, &next, Some(retry))
                }
            }
        }
        _ => failure(
            StatusCode::NOT_FOUND,
            "There is no such page.",
            "Go to the dashboard.",
            None,
        ),
    }
}

fn autolaunch_cookie_name(state: &State) -> String {
    super::oidc::cookie_name(&state.config.public, "autolaunch")
}

/// The mark of a sign-in whose first dashboard has been shown (lives as long as a sign-in).
fn autolaunch_cookie(state: &State, mark: &str) -> String {
    format!(
        "{}={mark}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{}",
        autolaunch_cookie_name(state),
        TOKEN_TTL_SECS,
        if state.config.public.secure() {
            "; Secure"
        } else {
            ""
        }
    )
}

/// Auto launch after sign-in: to the running session of the default workspace, or a new one.
async fn auto_launch(
    state: &State,
    who: &Identity,
    step: super::settings::AutoLaunch,
    theme: &str,
) -> Response<Body> {
    use super::settings::AutoLaunch;
    let uid = match step {
        AutoLaunch::Open { uid } => uid,
        AutoLaunch::Launch {
            ns,
            user,
            workspace,
        } => match create_session(state, who, &ns, &user, &workspace, None, None).await {
            Ok(s) => {
                info!(user = %who.username, session = %format!("{ns}/{}", s.name_any()), "auto launch");
                s.metadata.uid.unwrap_or_default()
            }
            Err((status, what, next)) => {
                return failure_themed(
                    theme,
                    status,
                    &format!("Auto launch of {workspace} did not start a session. {what}"),
                    &next,
                    None,
                );
            }
        },
    };
    super::pages::redirect(&state.config.public.session(&uid))
}

/// Stores the person's settings for one User: a server-side apply of its UserPreferences as the
/// person (RBAC lets them write only their own), then waits (briefly) until the cache shows it,
/// so the page that follows shows what was saved.
async fn save_settings(
    state: &State,
    who: &Identity,
    f: &[(String, String)],
) -> Result<String, Failure> {
    let (Some(ns), Some(user)) = (field(f, "ns"), field(f, "user")) else {
        return Err(bad("The settings form lacks the namespace or user."));
    };
    let spec = super::settings::parse(f).map_err(|e| bad(&e))?;
    let obj = serde_json::json!({
        "apiVersion": "cubicle.dev/v1alpha1",
        "kind": "UserPreferences",
        "metadata": {"name": user, "namespace": ns},
        "spec": spec,
    });
    let doing = format!("save the settings of {user}");
    let req = kube::core::Request::new(UserPreferences::url_path(&(), Some(ns)))
        .patch(
            user,
            &PatchParams::apply(super::settings::MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .map_err(|e| bad(&e.to_string()))?;
    let saved: UserPreferences = as_person(state, who, req)
        .await
        .map_err(|e| api_failure(e, &doing))?;
    info!(user = %who.username, preferences = %format!("{ns}/{user}"), "settings saved");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while state
        .cache
        .preferences
        .get(ns, user)
        .is_none_or(|p| p.spec != saved.spec)
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    Ok(format!("Saved the settings of {user}."))
}

type Failure = (StatusCode, String, String);

fn api_failure(e: kube::Error, doing: &str) -> Failure {
    match e {
        kube::Error::Api(s) if s.code == 403 || s.code == 422 || s.code == 400 => (
            StatusCode::FORBIDDEN,
            format!("The cluster refused to {doing}: {}", s.message),
            "If you think you should be allowed, ask your administrator; the message above says \
             which rule refused it."
                .into(),
        ),
        kube::Error::Api(s) if s.code == 404 => (
            StatusCode::NOT_FOUND,
            format!("Could not {doing}: it no longer exists."),
            "Go back to the dashboard, which shows what exists now.".into(),
        ),
        kube::Error::Api(s) if s.code == 409 => (
            StatusCode::CONFLICT,
            format!("Could not {doing}: {}", s.message),
            "Send it again.".into(),
        ),
        e => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Could not reach the cluster to {doing} ({e})."),
            "Wait a moment and send it again: nothing was lost.".into(),
        ),
    }
}

/// The client calls of the dashboard, made as the person.
async fn as_person<K: serde::de::DeserializeOwned>(
    state: &State,
    who: &Identity,
    mut req: http::Request<Vec<u8>>,
) -> Result<K, kube::Error> {
    let h = req.headers_mut();
    h.insert(
        "impersonate-user",
        http::HeaderValue::from_str(&who.username)
            .map_err(|e| kube::Error::Service(Box::new(e)))?,
    );
    for g in &who.groups {
        h.append(
            "impersonate-group",
            http::HeaderValue::from_str(g).map_err(|e| kube::Error::Service(Box::new(e)))?,
        );
    }
    state.client.request::<K>(req).await
}

fn bad(what: &str) -> Failure {
    (
        StatusCode::BAD_REQUEST,
        what.to_string(),
        "Go back to the dashboard and use its forms.".into(),
    )
}

fn request_for(ns: &str) -> kube::core::Request {
    kube::core::Request::new(Session::url_path(&(), Some(ns)))
}

async fn launch(state: &State, who: &Identity, f: &[(String, String)]) -> Result<String, Failure> {
    let (Some(ns), Some(user), Some(ws)) =
        (field(f, "ns"), field(f, "user"), field(f, "workspace"))
    else {
        return Err(bad(
            "The launch form lacks the namespace, user or workspace.",
        ));
    };
    let profile = match field(f, "profile") {
        None => None,
        Some("Enabled") => Some(ProfileMode::Enabled),
        Some("Disabled") => Some(ProfileMode::Disabled),
        Some("Reset") => Some(ProfileMode::Reset),
        Some(other) => return Err(bad(&format!("Unknown profile choice {other:?}."))),
    };
    let created = create_session(state, who, ns, user, ws, profile, field(f, "zone")).await?;
    info!(user = %who.username, session = %format!("{ns}/{}", created.name_any()), "dashboard launch");
    Ok(format!("Launched {ws} as {}.", created.name_any()))
}

/// Creates a Session of `ws` for `user`, as the person.
async fn create_session(
    state: &State,
    who: &Identity,
    ns: &str,
    user: &str,
    ws: &str,
    profile: Option<ProfileMode>,
    zone: Option<&str>,
) -> Result<Session, Failure> {
    let mut s = Session::new(
        "",
        crate::crd::v1alpha1::SessionSpec {
            user: user.into(),
            workspace: ws.into(),
            persistent_profile: profile,
            zone: zone.map(String::from),
            state: None,
        },
    );
    s.metadata.name = None;
    s.metadata.generate_name = Some(format!("{}-", ws.chars().take(40).collect::<String>()));
    let body = serde_json::to_vec(&s).map_err(|e| bad(&e.to_string()))?;
    let req = request_for(ns)
        .create(&PostParams::default(), body)
        .map_err(|e| bad(&e.to_string()))?;
    as_person(state, who, req)
        .await
        .map_err(|e| api_failure(e, &format!("launch {ws}")))
}

async fn act(state: &State, who: &Identity, f: &[(String, String)]) -> Result<String, Failure> {
    let (Some(ns), Some(name), Some(a)) = (
        field(f, "ns"),
        field(f, "name"),
        field(f, "action").and_then(Action::parse),
    ) else {
        return Err(bad("The form lacks the session or the action."));
    };
    let doing = format!("{} session {name}", a.as_str());
    let r = request_for(ns);
    let req = match a {
        Action::Delete => r.delete(name, &DeleteParams::default()),
        _ => {
            let state = match a {
                Action::Stop => "Stopped",
                Action::Pause => "Paused",
                _ => "Running",
            };
            let patch: Patch<serde_json::Value> =
                Patch::Merge(serde_json::json!({"spec": {"state": state}}));
            r.patch(name, &PatchParams::default(), &patch)
        }
    }
    .map_err(|e| bad(&e.to_string()))?;
    if a == Action::Delete {
        // The answer is the deleted object or a Status; either is fine.
        as_person::<serde_json::Value>(state, who, req)
            .await
            .map_err(|e| api_failure(e, &doing))?;
    } else {
        as_person::<Session>(state, who, req)
            .await
            .map_err(|e| api_failure(e, &doing))?;
    }
    info!(user = %who.username, session = %format!("{ns}/{name}"), action = a.as_str(), "dashboard action");
    Ok(format!("Done: {doing}."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::v1alpha1::{Group, SessionStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use serde_json::json;

    fn obj<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    fn dir(allow: bool) -> Directory {
        let g: Group = obj(
            json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Group",
            "metadata": {"name": "team", "namespace": "ns"},
            "spec": {"priority": 10, "settings": {"allowKasmStop": allow, "allowKasmPause": allow,
                "allowKasmDelete": allow, "allowPersistentProfile": allow, "allowZoneSelection": allow}}}),
        );
        let w: Workspace = obj(
            json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Workspace",
            "metadata": {"name": "desk", "namespace": "ns"},
            "spec": {"image": "x/y:1", "displayName": "Desk <top>", "description": "A desktop",
                     "groups": ["team"], "resources": {"cores": "2", "memory": "4Gi"},
                     "persistentProfile": {"mountPath": "/home/kasm-user",
                         "claimTemplate": {"name": "p-{username}", "size": "1Gi"}}}}),
        );
        let other: Workspace = obj(
            json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Workspace",
            "metadata": {"name": "secret", "namespace": "ns"},
            "spec": {"image": "x/y:1", "groups": ["others"]}}),
        );
        Directory {
            namespace: "ns".into(),
            groups: vec![Arc::new(g)],
            workspaces: vec![Arc::new(w), Arc::new(other)],
            pools: vec![],
            servers: vec![],
            assignments: vec![],
        }
    }

    fn user() -> User {
        obj(json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "User",
            "metadata": {"name": "ann", "namespace": "ns"},
            "spec": {"groups": ["team"], "identity": {"username": "oidc:ann"}},
            "status": {"usage": [{"scope": "perUser", "interval": "daily", "usedSeconds": 3725, "limitSeconds": 7200}]}}))
    }

    fn session(name: &str, phase: SessionPhase, expires: Option<Timestamp>) -> Arc<Session> {
        let mut s: Session = obj(
            json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Session",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")},
            "spec": {"user": "ann", "workspace": "desk"}}),
        );
        s.status = Some(SessionStatus {
            phase: Some(phase),
            expires_at: expires.map(MicroTime),
            expiry_rule: Some(ExpiryRule::SessionTimeLimit),
            url: Some(format!("http://uid-{name}.example")),
            ..Default::default()
        });
        Arc::new(s)
    }

    #[test]
    fn a_panel_shows_launchable_workspaces_sessions_usage_and_allowed_buttons_only() {
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let exp = now + jiff::SignedDuration::from_secs(90);
        let sessions = vec![session("one", SessionPhase::Running, Some(exp))];
        let p = panel(&dir(true), &user(), &sessions, None);
        assert_eq!(
            p.workspaces.len(),
            1,
            "only the workspace of the user's group"
        );
        assert_eq!(p.workspaces[0].resources, "2 cores · 4Gi memory");
        assert!(p.profiles && p.zones);
        assert_eq!(
            p.sessions[0].actions,
            vec![Action::Stop, Action::Pause, Action::Delete]
        );
        assert_eq!(p.sessions[0].expires.as_ref().unwrap().0, exp);
        let m = Model {
            who: "oidc:ann".into(),
            panels: vec![p],
            zones: vec!["z1".into()],
            theme: "dark".into(),
        };
        let html = render(&m, now, "tok", None);
        assert!(html.contains("Desk &lt;top&gt;"), "escaped title");
        assert!(html.contains(&format!("data-expires=\"{}\"", exp.as_millisecond())));
        assert!(html.contains("1h 02m 05s used, 57m 55s remaining of 2h 00m 00s"));
        assert!(
            html.contains("name=\"profile\"") && html.contains("<option>z1</option>"),
            "{html}"
        );
        assert!(html.contains("act-stop") && html.contains("act-pause"));
        assert!(html.contains("data-theme=\"dark\""));

        let p = panel(&dir(false), &user(), &sessions, None);
        assert_eq!(p.sessions[0].actions, Vec::<Action>::new());
        assert!(!p.profiles && !p.zones);
        let html = render(
            &Model {
                who: "oidc:ann".into(),
                panels: vec![p],
                zones: vec!["z1".into()],
                theme: "auto".into(),
            },
            now,
            "tok",
            None,
        );
        for absent in [
            "act-stop",
            "act-pause",
            "act-delete",
            "name=\"profile\"",
            "name=\"zone\"",
        ] {
            assert!(!html.contains(absent), "{absent} shown though not allowed");
        }
    }

    #[test]
    fn the_persons_theme_overrides_the_users_which_overrides_the_browsers() {
        use crate::crd::v1alpha1::{Theme, UserSettings};
        let d = dir(true);
        let mut u = user();
        assert_eq!(theme_of(&[panel(&d, &u, &[], None)]), "auto");
        assert_eq!(theme_of(&[]), "auto");
        u.spec.settings = Some(UserSettings {
            theme: Some(Theme::Dark),
            ..Default::default()
        });
        assert_eq!(theme_of(&[panel(&d, &u, &[], None)]), "dark");
        let own = UserPreferencesSpec {
            theme: Some(Theme::Light),
            ..Default::default()
        };
        let p = panel(&d, &u, &[], Some(&own));
        assert_eq!(theme_of(std::slice::from_ref(&p)), "light");
        let m = Model {
            who: "oidc:ann".into(),
            panels: vec![p],
            zones: vec![],
            theme: "light".into(),
        };
        for html in [
            render(&m, Timestamp::UNIX_EPOCH, "tok", None),
            render_settings(&m, "tok", None),
        ] {
            assert!(
                html.contains("<html lang=\"en\" data-theme=\"light\">"),
                "{html}"
            );
            assert!(
                html.contains("href=\"/.cubicle/settings\""),
                "a way to the settings"
            );
        }
    }

    #[test]
    fn the_settings_page_is_a_labelled_form_of_the_settings_in_force() {
        use crate::crd::v1alpha1::Theme;
        let own = UserPreferencesSpec {
            theme: Some(Theme::Dark),
            auto_launch_session: Some(true),
            default_workspace: Some("desk".into()),
            show_tips_during_session: Some(false),
            ..Default::default()
        };
        let m = Model {
            who: "oidc:ann".into(),
            panels: vec![panel(&dir(true), &user(), &[], Some(&own))],
            zones: vec![],
            theme: "dark".into(),
        };
        let html = render_settings(&m, "tok", Some("Saved."));
        assert!(html.contains("id=\"notice\">Saved.</p>"));
        // Every control has a label for it.
        for id in [
            "autoLaunchSession-ns-ann",
            "defaultWorkspace-ns-ann",
            "showTipsDuringSession-ns-ann",
            "toggleControlPanel-ns-ann",
            "chatSoundEffects-ns-ann",
            "theme-auto-ns-ann",
            "theme-light-ns-ann",
            "theme-dark-ns-ann",
        ] {
            assert!(
                html.contains(&format!("<label for=\"{id}\">")),
                "{id}: {html}"
            );
            assert!(html.contains(&format!("id=\"{id}\"")), "{id}");
        }
        assert!(html.contains(
            "id=\"autoLaunchSession-ns-ann\" name=\"autoLaunchSession\" value=\"on\" checked"
        ));
        assert!(html.contains(
            "id=\"showTipsDuringSession-ns-ann\" name=\"showTipsDuringSession\" value=\"on\" aria"
        ));
        assert!(html.contains("<option value=\"desk\" selected>Desk &lt;top&gt;</option>"));
        assert!(html.contains("value=\"dark\" checked"));
        assert!(
            !html.contains("secret"),
            "a workspace of another group offered"
        );
    }

    #[test]
    fn auto_launch_opens_the_running_session_of_the_default_workspace_or_launches_one() {
        use super::super::settings::{AutoLaunch, auto_launch};
        let own = UserPreferencesSpec {
            auto_launch_session: Some(true),
            default_workspace: Some("desk".into()),
            ..Default::default()
        };
        let model = |sessions: &[Arc<Session>], own: Option<&UserPreferencesSpec>| Model {
            who: "oidc:ann".into(),
            panels: vec![panel(&dir(true), &user(), sessions, own)],
            zones: vec![],
            theme: "auto".into(),
        };
        assert_eq!(auto_launch(&model(&[], None)), None, "off by default");
        assert_eq!(
            auto_launch(&model(&[], Some(&own))),
            Some(AutoLaunch::Launch {
                ns: "ns".into(),
                user: "ann".into(),
                workspace: "desk".into()
            })
        );
        let running = session("one", SessionPhase::Running, None);
        assert_eq!(
            auto_launch(&model(&[running], Some(&own))),
            Some(AutoLaunch::Open {
                uid: "uid-one".into()
            })
        );
        // An ended session is not gone to: a new one is launched.
        let ended = session("two", SessionPhase::Refused, None);
        assert!(matches!(
            auto_launch(&model(&[ended], Some(&own))),
            Some(AutoLaunch::Launch { .. })
        ));
        // A default workspace the person may not launch: nothing.
        let other = UserPreferencesSpec {
            default_workspace: Some("secret".into()),
            ..own.clone()
        };
        assert_eq!(auto_launch(&model(&[], Some(&other))), None);
        // Without a default workspace: nothing.
        let none = UserPreferencesSpec {
            default_workspace: None,
            ..own
        };
        assert_eq!(auto_launch(&model(&[], Some(&none))), None);
    }

    #[test]
    fn a_refused_session_says_the_operators_reason() {
        let mut s = (*session("r", SessionPhase::Refused, None)).clone();
        s.status.as_mut().unwrap().conditions = vec![Condition {
            type_: "Admitted".into(),
            status: "False".into(),
            reason: "MaxSessions".into(),
            message: "ann already has 1 session (maxKasmsPerUser 1)".into(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Timestamp::UNIX_EPOCH,
            ),
            observed_generation: None,
        }];
        assert_eq!(
            refusal(&s).unwrap(),
            "ann already has 1 session (maxKasmsPerUser 1) (MaxSessions)"
        );
        let p = panel(&dir(false), &user(), &[Arc::new(s)], None);
        assert_eq!(
            p.sessions[0].actions,
            vec![Action::Delete],
            "an ended session may be removed"
        );
        assert!(p.sessions[0].expires.is_none() && p.sessions[0].url.is_none());
    }

    #[test]
    fn form_tokens_are_bound_to_the_person_and_their_cookie() {
        let key = crate::credentials::MasterKey::random().signing_key();
        let now = Timestamp::now();
        let ann = Identity {
            username: "oidc:ann".into(),
            groups: vec![],
        };
        let bob = Identity {
            username: "oidc:bob".into(),
            groups: vec![],
        };
        let t = form_token(&key, &ann, Some("c1"), now);
        assert!(check_form_token(&key, &t, &ann, Some("c1"), now));
        assert!(!check_form_token(&key, &t, &bob, Some("c1"), now));
        assert!(!check_form_token(&key, &t, &ann, Some("c2"), now));
        assert!(!check_form_token(&key, &t, &ann, None, now));
        let later = now + jiff::SignedDuration::from_secs(TOKEN_TTL_SECS + 1);
        assert!(!check_form_token(&key, &t, &ann, Some("c1"), later));
        let other = crate::credentials::MasterKey::random().signing_key();
        assert!(!check_form_token(&other, &t, &ann, Some("c1"), now));
    }

    /// Figures, not an assertion on time: `cargo test --lib dashboard_figures -- --nocapture`.
    #[test]
    fn dashboard_figures() {
        let now = Timestamp::now();
        let sessions: Vec<Arc<Session>> = (0..20)
            .map(|i| {
                session(
                    &format!("desk-{i:02}"),
                    SessionPhase::Running,
                    Some(now + jiff::SignedDuration::from_secs(3600 + i)),
                )
            })
            .collect();
        let d = dir(true);
        let u = user();
        let runs = 200;
        let start = std::time::Instant::now();
        let mut bytes = 0;
        for _ in 0..runs {
            let m = Model {
                who: "oidc:ann".into(),
                panels: vec![panel(&d, &u, &sessions, None)],
                zones: vec!["z1".into(), "z2".into()],
                theme: "auto".into(),
            };
            bytes = render(&m, now, "token-token-token-token-token", None).len();
        }
        let per = start.elapsed() / runs;
        println!(
            "dashboard of a person with 20 sessions: {:.3} ms server time (model + render, mean of {runs}), {bytes} bytes (targets: <= 20 ms, <= 100 KB)",
            per.as_secs_f64() * 1000.0
        );
        assert!(bytes > 0);
    }
}
