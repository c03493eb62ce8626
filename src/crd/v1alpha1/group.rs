//! `Group`: a Kasm group, its priority and its typed settings catalogue (seed 002).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::crd::{Duration, FileMapping, RunConfig, VolumeMapping};

/// A group of users and the settings its members get.
///
/// A user in several groups gets, for each setting, the value of the group with the lowest
/// `priority` number that sets it (ties broken by group name and reported as a warning).
/// `volumeMappings` and `fileMappings` combine across all the user's groups instead.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cubicle.dev",
    version = "v1alpha1",
    kind = "Group",
    namespaced,
    status = "GroupStatus",
    derive = "PartialEq",
    shortname = "cgrp",
    category = "cubicle",
    doc = "A Cubicle Group (Kasm: Group): a priority and typed group settings that its members get. For each setting, a user in several groups gets the value of the group with the lowest priority number that sets it; volume and file mappings combine across groups.",
    printcolumn(
        name = "Priority",
        type_ = "integer",
        json_path = ".spec.priority",
        description = "Lower wins when a user's groups disagree"
    ),
    printcolumn(
        name = "Members",
        type_ = "integer",
        json_path = ".status.memberCount",
        description = "Users in the group (listed and auto-added)"
    ),
    printcolumn(
        name = "Description",
        type_ = "string",
        json_path = ".spec.description",
        priority = 1
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "The Ready condition's status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct GroupSpec {
    /// Precedence of this group's settings: for each setting, the group with the lowest number
    /// that sets it wins. Ties are broken by group name and reported as a `SettingsConflict`
    /// warning condition on the User. Kasm: `priority`.
    #[schemars(range(max = 1000000))]
    pub priority: u32,
    /// What the group is for. Kasm: `description`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// The group settings (Kasm: Group Settings). Every setting is optional: unset means "not
    /// set by this group", so a lower-priority group or Kasm's default applies.
    #[serde(default, skip_serializing_if = "GroupSettings::is_empty")]
    pub settings: GroupSettings,
}

/// Every Kasm group setting, typed. Unset = inherit from the next group by priority, then Kasm's
/// default.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GroupSettings {
    /// Users may enroll their own two-factor devices on their profile page.
    /// Kasm: `allow_2fa_self_enrollment`.
    #[serde(
        rename = "allow2faSelfEnrollment",
        skip_serializing_if = "Option::is_none"
    )]
    pub allow_2fa_self_enrollment: Option<bool>,
    /// Audio streaming from the session. Kasm: `allow_kasm_audio`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_kasm_audio: Option<bool>,
    /// Users may paste text from the session to their local computer.
    /// Kasm: `allow_kasm_clipboard_down`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_kasm_clipboard_down: Option<bool>,
    /// Seamless clipboard: copy and paste without the control panel (Chrome and Chromium-based
    /// client browsers only). Kasm: `allow_kasm_clipboard_seamless`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_kasm_clipboard_seamless: Option<bool>,
    /// Users may paste from their local computer into the session.
    /// Kasm: `allow_kasm_clipboard_up`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_kasm_clipboard_up: Option<bool>,
    /// Users may delete their running sessions (enforced by the operator).
    /// Kasm: `allow_kasm_delete`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_kasm_delete: Option<bool>,
    /// Users may download files from the session. Kasm: `allow_kasm_downloads`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_kasm_downloads: Option<bool>,
    /// Gamepad passthrough into the session. Kasm: `allow_kasm_gamepad`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_kasm_gamepad: Option<bool>,
    /// Microphone passthrough into the session. Kasm: `allow_kasm_microphone`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_kasm_microphone: Option<bool>,
    /// Webcam passthrough into the session. Kasm: `allow_kasm_webcam`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_kasm_webcam: Option<bool>,
    /// Printing to local printers. Kasm: `allow_kasm_printing`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_kasm_printing: Option<bool>,
    /// Users may pause their running sessions (desired state `Paused`; enforced by the operator).
    /// Kasm: `allow_kasm_pause`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_kasm_pause: Option<bool>,
    /// Users may share their session with other users. Kasm: `allow_kasm_sharing`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_kasm_sharing: Option<bool>,
    /// Users may stop their running sessions (desired state `Stopped`; enforced by the operator).
    /// Kasm: `allow_kasm_stop`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_kasm_stop: Option<bool>,
    /// Users may upload files into the session. Kasm: `allow_kasm_uploads`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_kasm_uploads: Option<bool>,
    /// Sessions may mount the persistent profile configured on the Workspace (a Session asking
    /// for `Enabled` or `Reset` without it is refused). Kasm: `allow_persistent_profile`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_persistent_profile: Option<bool>,
    /// Users may use point-of-presence features of some Workspaces.
    /// Kasm: `allow_point_of_presence`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_point_of_presence: Option<bool>,
    /// TOTP tokens (e.g. Google Authenticator) are accepted as a second factor.
    /// Kasm: `allow_totp_two_factor`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_totp_two_factor: Option<bool>,
    /// Users may configure their own storage mappings on their profile; when false, existing
    /// user mappings are not used for new sessions either. Kasm: `allow_user_storage_mapping`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_user_storage_mapping: Option<bool>,
    /// WebAuthn devices (e.g. YubiKeys) are accepted as a second factor.
    /// Kasm: `allow_webauthn_two_factor`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_webauthn_two_factor: Option<bool>,
    /// Sessions may name a deployment zone (`Session.spec.zone`); a named zone is never
    /// substituted by another. Kasm: `allow_zone_selection`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_zone_selection: Option<bool>,
    /// Every User of realm `local` is a member of this group, without listing it.
    /// Kasm: `auto_add_local_users`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_add_local_users: Option<bool>,
    /// After login, send users straight into their default workspace.
    /// Kasm: `auto_login_to_kasm`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_login_to_kasm: Option<bool>,
    /// Chat history messages shown to a user who joins a shared session; 0 disables it.
    /// Kasm: `chat_history_messages`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 10000))]
    pub chat_history_messages: Option<u32>,
    /// Which options the in-session control panel shows. Kasm: `control_panel.*`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_panel: Option<ControlPanel>,
    /// Redirect standard users to this external site instead of the dashboard.
    /// Kasm: `dashboard_redirect`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://"))]
    pub dashboard_redirect: Option<String>,
    /// Name of the Workspace used by the `/go` URL, "Launch Now" and auto launch (a user's
    /// `settings.defaultWorkspace` overrides it). Kasm: `default_image`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub default_image: Option<String>,
    /// Show detailed error information in the browser. Kasm: `display_ui_errors`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_ui_errors: Option<bool>,
    /// Send browser log messages to the server. Kasm: `enable_ui_server_logging`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_ui_server_logging: Option<bool>,
    /// Set `KASM_USER` and `KASM_USER_ID` in the session container. Kasm: user env setting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expose_user_env: Option<bool>,
    /// Disconnect an idle client after this long (enforced by the client; must be longer than
    /// `keepaliveInterval`). Default `20m`. Kasm: `idle_disconnect` (minutes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_disconnect: Option<Duration>,
    /// Mount the user's SSH keys (`User.spec.sshKeys`) into new sessions.
    /// Kasm: `inject_ssh_keys`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inject_ssh_keys: Option<bool>,
    /// Audio is on when a session starts. Kasm: `kasm_audio_default_on`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kasm_audio_default_on: Option<bool>,
    /// IME input is on when a session starts. Kasm: `kasm_ime_default_on`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kasm_ime_default_on: Option<bool>,
    /// A session with no keepalive for this long expires and `keepaliveExpirationAction` is
    /// applied; should be at least twice `keepaliveInterval`. Not used when `sessionTimeLimit`
    /// is set. Default `1h`. Kasm: `keepalive_expiration` (seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive_expiration: Option<Duration>,
    /// What happens to an expired session: `delete` (destroyed), `stop` (pod removed, volumes
    /// kept) or `pause` (pod kept, access cut; resources stay in use). Default `delete`.
    /// Kasm: `keepalive_expiration_action`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive_expiration_action: Option<KeepaliveExpirationAction>,
    /// How often a connected client sends a keepalive. Default `5m`.
    /// Kasm: `keepalive_interval` (seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keepalive_interval: Option<Duration>,
    /// Lock video to 720p while the session is shared. Kasm: `lock_sharing_video_mode`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock_sharing_video_mode: Option<bool>,
    /// Most sessions one user may have at once (enforced by the operator).
    /// Kasm: `max_kasms_per_user`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000))]
    pub max_kasms_per_user: Option<u32>,
    /// Most storage mappings a user may register on their account.
    /// Kasm: `max_user_storage_mappings`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000))]
    pub max_user_storage_mappings: Option<u32>,
    /// Force storage mappings configured on user accounts to read-only.
    /// Kasm: user storage mapping read-only setting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_storage_mapping_read_only: Option<bool>,
    /// Require two-factor authentication; users set it up at next login. Kasm: `require_2fa`.
    #[serde(rename = "require2fa", skip_serializing_if = "Option::is_none")]
    pub require_2fa: Option<bool>,
    /// Overrides of the session pod, winning over the Workspace's `runConfig`.
    /// Kasm: `run_config` (Docker run parameters).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_config: Option<RunConfig>,
    /// Hard lifetime of a session from its creation, connected or not; when set,
    /// `keepaliveExpiration` is not used. Default: none. Kasm: `session_time_limit` (seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session_time_limit: Option<Duration>,
    /// Use a staged session of the workspace even when its language and timezone differ from
    /// the user's preference (overrides the user setting).
    /// Kasm: `staged_session_language_and_timezone_preference_override`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staged_session_language_and_timezone_preference_override: Option<bool>,
    /// Hours of running sessions allowed per interval, per user or shared by the group. All
    /// running time counts, paused and stopped included. Default: none. Kasm: `usage_limit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_limit: Option<UsageLimit>,
    /// Volumes mapped into sessions. Combined across all the user's groups (and the
    /// Workspace's), by `name`. Kasm: `volume_mapping`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub volume_mappings: Vec<VolumeMapping>,
    /// Files placed inside sessions. Combined across groups; for one destination a User's
    /// mapping wins over a Group's, and a Group's over a Workspace's. Kasm: File Mappings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["destination".into()]))]
    pub file_mappings: Vec<FileMapping>,
    /// Name of the web filter policy applied to sessions; a Workspace's policy (or its forced
    /// disabling) wins over this. Kasm: `web_filter_policy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub web_filter_policy: Option<String>,
}

impl GroupSettings {
    /// True when no setting is set.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

/// What happens when a session's keepalive expires. Kasm: `keepalive_expiration_action`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(transform = crate::crd::drop_description)]
pub enum KeepaliveExpirationAction {
    /// The session and its pod are deleted (persistent profiles are kept).
    Delete,
    /// The pod is removed and its volumes kept; resuming recreates the pod with files intact
    /// and programs not running. Frees CPU and memory; resuming may fail if capacity is gone.
    Stop,
    /// The pod is kept but the user's access is cut; processes and memory stay, and so does their
    /// resource use (Kubernetes cannot freeze a pod).
    Pause,
}

/// Which options the in-session control panel shows. Kasm: `control_panel.*`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ControlPanel {
    /// The fullscreen option. Kasm: `control_panel.show_fullscreen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_fullscreen: Option<bool>,
    /// The delete session option. Kasm: `control_panel.show_delete_session`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_delete_session: Option<bool>,
    /// The display manager (add and remove displays).
    /// Kasm: `control_panel.show_display_manager`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_display_manager: Option<bool>,
    /// The logout option. Kasm: `control_panel.show_logout`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_logout: Option<bool>,
    /// The return to workspaces option. Kasm: `control_panel.show_return_to_workspaces`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_return_to_workspaces: Option<bool>,
    /// The streaming quality option. Kasm: `control_panel.show_streaming_quality`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_streaming_quality: Option<bool>,
    /// Options of the control panel's advanced menu.
    /// Kasm: `control_panel.advanced_settings.*`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advanced_settings: Option<ControlPanelAdvancedSettings>,
}

/// Options of the control panel's advanced menu. Kasm: `control_panel.advanced_settings.*`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ControlPanelAdvancedSettings {
    /// The game mode option. Kasm: `control_panel.advanced_settings.show_game_mode`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_game_mode: Option<bool>,
    /// The IME input mode option. Kasm: `control_panel.advanced_settings.show_ime_input_mode`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_ime_input_mode: Option<bool>,
    /// The keyboard controls option.
    /// Kasm: `control_panel.advanced_settings.show_keyboard_controls`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_keyboard_controls: Option<bool>,
    /// The pointer lock option. Kasm: `control_panel.advanced_settings.show_pointer_lock`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_pointer_lock: Option<bool>,
    /// The prefer local cursor option.
    /// Kasm: `control_panel.advanced_settings.show_prefer_local_cursor`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_prefer_local_cursor: Option<bool>,
}

/// A budget of session hours. Kasm: `usage_limit`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UsageLimit {
    /// `perUser`: each member has its own budget; `perGroup`: all members share one.
    /// Kasm: `usage_limit.type` (Per User, Per Group).
    #[serde(rename = "type")]
    pub type_: UsageLimitType,
    /// The budget's window: `daily`, `weekly`, `monthly`, or `total` (never resets).
    /// Kasm: `usage_limit.interval`.
    pub interval: UsageLimitInterval,
    /// Hours of running sessions allowed per interval (a non-negative decimal).
    /// Kasm: `usage_limit.hours`.
    #[schemars(range(min = 0.0, max = 100000.0))]
    pub hours: f64,
    /// Time zone of the interval boundaries (IANA name, e.g. Europe/Paris); default UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub timezone: Option<String>,
}

/// Whose budget a usage limit is. Kasm: `usage_limit.type`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::crd::drop_description)]
pub enum UsageLimitType {
    /// Each member of the group has their own budget.
    PerUser,
    /// All members of the group share one budget.
    PerGroup,
}

/// The window of a usage limit. Kasm: `usage_limit.interval`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(transform = crate::crd::drop_description)]
pub enum UsageLimitInterval {
    /// Resets every day.
    Daily,
    /// Resets every week.
    Weekly,
    /// Resets every month.
    Monthly,
    /// Never resets.
    Total,
}

/// Observed state of a Group.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GroupStatus {
    /// Users that are members, listed in their `spec.groups` or added by `autoAddLocalUsers`,
    /// sorted by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    /// Number of members (for `kubectl get`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member_count: Option<u32>,
    /// The shared (`perGroup`) usage budget of the group's usage limit and how much of it is
    /// spent; per-user budgets are on each User. Written by the operator's usage accounting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage: Vec<super::user::UsageEntry>,
    /// Conditions: `Ready`; `SettingsInconsistent` when, for example, `keepaliveExpiration` is
    /// less than twice `keepaliveInterval` or `idleDisconnect` is not longer than it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::crd::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `.metadata.generation` this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
