//! `UserPreferences`: the person's own settings of seed 001 (Kasm: User Settings, set on the
//! user's profile), one per User and named like it.
//!
//! They live apart from the User on purpose: a User belongs to the configuration repository (a
//! GitOps tool applies it and reverts any other change to what it owns), while these belong to
//! the person, who edits them on the dashboard. The dashboard writes them as the person
//! (impersonation), and the identity controller's per-User Role lets only the User's identity
//! read and write the one object of that name. A GitOps tool never sees them, so it never
//! reverts them, and they are never written into the User.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::user::Theme;

/// The person's own preferences for one User.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "cubicle.dev",
    version = "v1alpha1",
    kind = "UserPreferences",
    plural = "userpreferences",
    singular = "userpreferences",
    namespaced,
    derive = "PartialEq",
    shortname = "cpref",
    category = "cubicle",
    doc = "The person's own settings for the User of the same name (Kasm: User Settings, set on the user's profile): auto launch, default workspace, theme, tips, control panel toggle and chat sounds. Written by the person (on the dashboard, which acts as them); kept apart from the User, which the configuration repository owns, so a GitOps tool never reverts them. Each field, when set, overrides the same field of the User's spec.settings.",
    printcolumn(name = "Theme", type_ = "string", json_path = ".spec.theme"),
    printcolumn(
        name = "Auto Launch",
        type_ = "boolean",
        json_path = ".spec.autoLaunchSession"
    ),
    printcolumn(
        name = "Default Workspace",
        type_ = "string",
        json_path = ".spec.defaultWorkspace"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct UserPreferencesSpec {
    /// Launch a session of the default workspace when the person signs in on the dashboard (or
    /// go to the one already running). Kasm: Auto Launch Session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_launch_session: Option<bool>,
    /// Sound effects for chat in shared sessions. Stored and shown only: Cubicle has no shared
    /// sessions. Kasm: Chat Sound Effects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_sound_effects: Option<bool>,
    /// Name of the Workspace that auto launch starts; overrides the User's
    /// `spec.settings.defaultWorkspace` and the groups' `defaultImage`. Kasm: Default Workspace
    /// Image.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub default_workspace: Option<String>,
    /// Show the tip about the control panel when a session starts. Stored and shown only (for a
    /// desktop image that reads it). Kasm: Show Tips During Session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_tips_during_session: Option<bool>,
    /// Open and close the control panel by pressing Ctrl twice. Stored and shown only (for a
    /// desktop image that reads it). Kasm: Toggle Control Panel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub toggle_control_panel: Option<bool>,
    /// The dashboard's theme: `light`, `dark`, or `auto` (follow the browser's
    /// `prefers-color-scheme`). Kasm: Theme.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub theme: Option<Theme>,
}
