//! The person's own settings on the dashboard (seed 001, Kasm: User Settings): auto launch,
//! default workspace, theme, tips, control panel toggle and chat sounds.
//!
//! They are stored in a `UserPreferences` object per User (same name), never in the User: the
//! configuration repository owns the User, and a GitOps tool would revert a change the person
//! made there. The dashboard writes them as the person (server-side apply under the field
//! manager [`MANAGER`], impersonating them), so RBAC decides: the per-User Role of the identity
//! controller grants the User's identity that one object by name.
//!
//! The pure part: [`effective`] (the values in force), [`parse`] (a posted form into a spec),
//! [`render_panel`] (the form) and [`auto_launch`] (what a sign-in leads to).

use std::fmt::Write as _;

use crate::crd::v1alpha1::{Theme, User, UserPreferencesSpec};

use super::dashboard::{Model, UserPanel, escape};

/// The field manager of the dashboard's writes.
pub const MANAGER: &str = "cubicle-dashboard";

/// The settings in force for one User.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefs {
    /// Auto launch the default workspace after sign-in.
    pub auto_launch: bool,
    /// The default workspace (the person's, else the User's, else the groups' `defaultImage`).
    pub default_workspace: Option<String>,
    /// Whether the person chose the default workspace themselves.
    pub own_default_workspace: bool,
    /// `light`, `dark` or `auto`.
    pub theme: &'static str,
    /// Show tips during a session (stored only).
    pub show_tips: bool,
    /// The control panel opens with Ctrl twice (stored only).
    pub toggle_control_panel: bool,
    /// Chat sound effects (stored only).
    pub chat_sounds: bool,
}

impl Default for Prefs {
    fn default() -> Self {
        Self {
            auto_launch: false,
            default_workspace: None,
            own_default_workspace: false,
            theme: "auto",
            show_tips: true,
            toggle_control_panel: true,
            chat_sounds: true,
        }
    }
}

fn theme_str(t: Theme) -> &'static str {
    match t {
        Theme::Light => "light",
        Theme::Dark => "dark",
        Theme::Auto => "auto",
    }
}

/// The settings in force (pure): per field, the person's own (`own`), else the User's
/// `spec.settings` (set by the configuration repository), else Kasm's default; the default
/// workspace falls back to `resolved_default` (the User's, else the groups' `defaultImage`).
pub fn effective(
    user: &User,
    own: Option<&UserPreferencesSpec>,
    resolved_default: Option<&str>,
) -> Prefs {
    let admin = user.spec.settings.as_ref();
    let d = Prefs::default();
    let pick = |o: Option<bool>, a: Option<bool>, def: bool| o.or(a).unwrap_or(def);
    let own_ws = own.and_then(|o| o.default_workspace.clone());
    Prefs {
        auto_launch: pick(
            own.and_then(|o| o.auto_launch_session),
            admin.and_then(|a| a.auto_launch_session),
            d.auto_launch,
        ),
        own_default_workspace: own_ws.is_some(),
        default_workspace: own_ws.or_else(|| resolved_default.map(String::from)),
        theme: own
            .and_then(|o| o.theme)
            .or(admin.and_then(|a| a.theme))
            .map(theme_str)
            .unwrap_or(d.theme),
        show_tips: pick(
            own.and_then(|o| o.show_tips_during_session),
            admin.and_then(|a| a.show_tips_during_session),
            d.show_tips,
        ),
        toggle_control_panel: pick(
            own.and_then(|o| o.toggle_control_panel),
            admin.and_then(|a| a.toggle_control_panel),
            d.toggle_control_panel,
        ),
        chat_sounds: pick(
            own.and_then(|o| o.chat_sound_effects),
            admin.and_then(|a| a.chat_sound_effects),
            d.chat_sounds,
        ),
    }
}

/// A posted settings form into the spec to store (pure). Checkboxes send `on` when ticked and
/// nothing otherwise; an empty default workspace means "the default".
pub fn parse(f: &[(String, String)]) -> Result<UserPreferencesSpec, String> {
    let get = |k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let flag = |k: &str| -> Result<bool, String> {
        match get(k) {
            None | Some("") => Ok(false),
            Some("on" | "true") => Ok(true),
            Some(other) => Err(format!("The setting {k} cannot be {other:?}.")),
        }
    };
    let theme = match get("theme") {
        None | Some("" | "auto") => Theme::Auto,
        Some("light") => Theme::Light,
        Some("dark") => Theme::Dark,
        Some(other) => {
            return Err(format!(
                "The setting theme cannot be {other:?}: choose light, dark or auto."
            ));
        }
    };
    Ok(UserPreferencesSpec {
        auto_launch_session: Some(flag("autoLaunchSession")?),
        chat_sound_effects: Some(flag("chatSoundEffects")?),
        default_workspace: get("defaultWorkspace")
            .filter(|w| !w.is_empty())
            .map(String::from),
        show_tips_during_session: Some(flag("showTipsDuringSession")?),
        toggle_control_panel: Some(flag("toggleControlPanel")?),
        theme: Some(theme),
    })
}

/// What the first dashboard of a sign-in leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoLaunch {
    /// Go to this session of the default workspace (running or starting): its uid.
    Open {
        /// The session's uid (its origin's label).
        uid: String,
    },
    /// Launch the default workspace for this User (the default profile mode) and go to it.
    Launch {
        /// Namespace.
        ns: String,
        /// User name.
        user: String,
        /// Workspace name.
        workspace: String,
    },
}

/// Decides auto launch (pure): the first User (in the dashboard's order) with auto launch on and
/// a default workspace it may launch; its newest running or starting session of that workspace
/// if any, else a new one.
pub fn auto_launch(m: &Model) -> Option<AutoLaunch> {
    for p in &m.panels {
        let Some(ws) = p.prefs.default_workspace.as_deref() else {
            continue;
        };
        if !p.prefs.auto_launch || p.disabled {
            continue;
        }
        if !p
            .workspaces
            .iter()
            .any(|w| w.name == ws && w.warning.is_none())
        {
            continue;
        }
        // Sessions are newest first.
        if let Some(s) = p
            .sessions
            .iter()
            .find(|s| s.workspace == ws && matches!(s.phase.as_str(), "Running" | "Pending"))
        {
            return Some(AutoLaunch::Open { uid: s.uid.clone() });
        }
        return Some(AutoLaunch::Launch {
            ns: p.namespace.clone(),
            user: p.user.clone(),
            workspace: ws.to_string(),
        });
    }
    None
}

fn checkbox(o: &mut String, id: &str, name: &str, on: bool, label: &str, help: &str) {
    let _ = write!(
        o,
        "<p><input type=\"checkbox\" id=\"{name}-{id}\" name=\"{name}\" value=\"on\"{} \
         aria-describedby=\"{name}-{id}-help\"> <label for=\"{name}-{id}\">{label}</label><br>\
         <span class=\"muted\" id=\"{name}-{id}-help\">{help}</span></p>",
        if on { " checked" } else { "" },
    );
}

/// The settings form of one User (pure).
pub fn render_panel(o: &mut String, p: &UserPanel, token: &str) {
    let id = escape(&format!("{}-{}", p.namespace, p.user));
    let s = &p.prefs;
    let _ = write!(
        o,
        "<section aria-labelledby=\"set-{id}\"><h2 id=\"set-{id}\">Settings of {} \
         <span class=\"muted\">in {}</span></h2>\
         <form method=\"post\" action=\"/.cubicle/settings\" class=\"settings\" id=\"f-{id}\">",
        escape(&p.user),
        escape(&p.namespace)
    );
    super::dashboard::hidden(o, "token", token);
    super::dashboard::hidden(o, "ns", &p.namespace);
    super::dashboard::hidden(o, "user", &p.user);
    o.push_str("<fieldset><legend>Sessions</legend>");
    checkbox(
        o,
        &id,
        "autoLaunchSession",
        s.auto_launch,
        "Auto launch session",
        "When you sign in, open your running session of the default workspace, or launch one.",
    );
    let inherited = if s.own_default_workspace {
        None
    } else {
        s.default_workspace.as_deref()
    };
    let _ = write!(
        o,
        "<p><label for=\"defaultWorkspace-{id}\">Default workspace</label> \
         <select id=\"defaultWorkspace-{id}\" name=\"defaultWorkspace\"><option value=\"\">{}</option>",
        match inherited {
            Some(w) => format!("Your administrator's default ({})", escape(w)),
            None => "Your administrator's default (none)".into(),
        }
    );
    for w in &p.workspaces {
        let selected = s.own_default_workspace && s.default_workspace.as_deref() == Some(&w.name);
        let _ = write!(
            o,
            "<option value=\"{}\"{}>{}</option>",
            escape(&w.name),
            if selected { " selected" } else { "" },
            escape(&w.title)
        );
    }
    o.push_str("</select></p>");
    checkbox(
        o,
        &id,
        "showTipsDuringSession",
        s.show_tips,
        "Show tips during session",
        "Stored for the desktop image (the tip about the control panel); Cubicle's own pages show no tips.",
    );
    checkbox(
        o,
        &id,
        "toggleControlPanel",
        s.toggle_control_panel,
        "Toggle control panel",
        "Open and close the control panel by pressing Ctrl twice: stored for the desktop image.",
    );
    checkbox(
        o,
        &id,
        "chatSoundEffects",
        s.chat_sounds,
        "Chat sound effects",
        "Sound effects for chat in shared sessions: stored only (Cubicle has no shared sessions).",
    );
    o.push_str("</fieldset><fieldset><legend>Theme</legend>");
    for (v, label) in [
        ("auto", "Auto (follow your computer's setting)"),
        ("light", "Light"),
        ("dark", "Dark"),
    ] {
        let _ = write!(
            o,
            "<p><input type=\"radio\" id=\"theme-{v}-{id}\" name=\"theme\" value=\"{v}\"{}> \
             <label for=\"theme-{v}-{id}\">{label}</label></p>",
            if s.theme == v { " checked" } else { "" }
        );
    }
    o.push_str(
        "</fieldset><p><button type=\"submit\" class=\"save\">Save settings</button></p></form></section>",
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::v1alpha1::UserSettings;

    fn user(settings: Option<UserSettings>) -> User {
        let mut u: User = serde_json::from_value(serde_json::json!({
            "apiVersion": "cubicle.dev/v1alpha1", "kind": "User",
            "metadata": {"name": "ann", "namespace": "ns"},
            "spec": {"identity": {"username": "oidc:ann"}}}))
        .unwrap();
        u.spec.settings = settings;
        u
    }

    #[test]
    fn the_persons_own_settings_win_over_the_users_which_win_over_the_defaults() {
        let p = effective(&user(None), None, None);
        assert_eq!(p, Prefs::default());
        let admin = UserSettings {
            theme: Some(Theme::Dark),
            auto_launch_session: Some(true),
            show_tips_during_session: Some(false),
            default_workspace: Some("cad".into()),
            ..Default::default()
        };
        let p = effective(&user(Some(admin.clone())), None, Some("cad"));
        assert_eq!((p.theme, p.auto_launch, p.show_tips), ("dark", true, false));
        assert_eq!(p.default_workspace.as_deref(), Some("cad"));
        assert!(!p.own_default_workspace);
        let own = UserPreferencesSpec {
            theme: Some(Theme::Light),
            auto_launch_session: Some(false),
            default_workspace: Some("desk".into()),
            chat_sound_effects: Some(false),
            ..Default::default()
        };
        let p = effective(&user(Some(admin)), Some(&own), Some("cad"));
        assert_eq!(
            (p.theme, p.auto_launch, p.show_tips, p.chat_sounds),
            ("light", false, false, false)
        );
        assert_eq!(p.default_workspace.as_deref(), Some("desk"));
        assert!(p.own_default_workspace);
    }

    #[test]
    fn a_posted_form_becomes_the_spec_and_bad_values_are_named() {
        let f = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let spec = parse(&f(&[
            ("token", "t"),
            ("autoLaunchSession", "on"),
            ("defaultWorkspace", "desk"),
            ("theme", "dark"),
            ("chatSoundEffects", "on"),
        ]))
        .unwrap();
        assert_eq!(
            spec,
            UserPreferencesSpec {
                auto_launch_session: Some(true),
                chat_sound_effects: Some(true),
                default_workspace: Some("desk".into()),
                show_tips_during_session: Some(false),
                toggle_control_panel: Some(false),
                theme: Some(Theme::Dark),
            }
        );
        let spec = parse(&f(&[("defaultWorkspace", "")])).unwrap();
        assert_eq!(spec.default_workspace, None);
        assert_eq!(spec.theme, Some(Theme::Auto));
        let e = parse(&f(&[("theme", "sepia")])).unwrap_err();
        assert!(e.contains("theme") && e.contains("sepia"), "{e}");
        let e = parse(&f(&[("showTipsDuringSession", "maybe")])).unwrap_err();
        assert!(e.contains("showTipsDuringSession"), "{e}");
    }
}
