//! Effective groups and settings of one user, with provenance.
//!
//! Resolution is generic over the settings catalogue: each group's `GroupSettings` is serialized
//! to JSON and flattened (the `controlPanel` tree into dotted leaves such as
//! `controlPanel.advancedSettings.showGameMode`), each leaf is picked from the group with the
//! lowest priority number that sets it, and the winners are deserialized back. The list of
//! settings comes from the Group CRD's schema, so a new field of `GroupSettings` is resolved,
//! reported and delivered without a change here; only its default must be declared in
//! [`DEFAULTS`] (a test fails until it is).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration as StdDuration;

use kube::{CustomResourceExt, ResourceExt};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::findings::{Code, Finding, Severity};
use super::{Directory, is_local};
use crate::crd::v1alpha1::{
    EffectiveGroup, EffectiveSetting, Group, GroupSettings, KeepaliveExpirationAction,
    MembershipVia, SettingSource, UsageLimit, User,
};
use crate::crd::{Duration, FileMapping, RunConfig, VolumeMapping};

/// Settings that combine across groups instead of being picked by priority.
pub const MERGED: &[&str] = &["fileMappings", "volumeMappings"];

/// Settings whose object value is a tree of individual settings, flattened into dotted names.
const NESTED: &[&str] = &["controlPanel"];

/// The default of a setting that no group sets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DefaultValue {
    /// A boolean.
    Bool(bool),
    /// A number.
    U32(u32),
    /// A string (durations are Go duration strings, as written in a Group).
    Str(&'static str),
    /// No value: the setting is off or unlimited (e.g. no session time limit).
    Unset,
    /// An empty list (merged settings).
    Empty,
}

impl DefaultValue {
    fn to_json(self) -> Option<Value> {
        match self {
            DefaultValue::Bool(b) => Some(Value::Bool(b)),
            DefaultValue::U32(n) => Some(Value::from(n)),
            DefaultValue::Str(s) => Some(Value::String(s.into())),
            DefaultValue::Unset => None,
            DefaultValue::Empty => Some(Value::Array(vec![])),
        }
    }
}

/// Kasm's defaults where the seeds give one (keepalive expiration 1 h, keepalive interval 5 min,
/// idle disconnect 20 min, no session time limit, no usage limit; Kasm's documented expiry action
/// `delete`); elsewhere Cubicle's documented choice: what a plain Kasm session offers (audio,
/// clipboard, downloads and uploads, deleting one's own session, every control panel option,
/// persistent profiles where the Workspace configures them) is on; what exposes local devices,
/// shares sessions, changes a session's lifecycle or placement, or relaxes security (stop, pause,
/// sharing, microphone, webcam, gamepad, printing, zone selection, SSH keys, user env) is off;
/// counts without a documented default are unlimited (`maxKasmsPerUser`,
/// `maxUserStorageMappings`).
pub const DEFAULTS: &[(&str, DefaultValue)] = &[
    ("allow2faSelfEnrollment", DefaultValue::Bool(true)),
    ("allowKasmAudio", DefaultValue::Bool(true)),
    ("allowKasmClipboardDown", DefaultValue::Bool(true)),
    ("allowKasmClipboardSeamless", DefaultValue::Bool(true)),
    ("allowKasmClipboardUp", DefaultValue::Bool(true)),
    ("allowKasmDelete", DefaultValue::Bool(true)),
    ("allowKasmDownloads", DefaultValue::Bool(true)),
    ("allowKasmGamepad", DefaultValue::Bool(false)),
    ("allowKasmMicrophone", DefaultValue::Bool(false)),
    ("allowKasmPause", DefaultValue::Bool(false)),
    ("allowKasmPrinting", DefaultValue::Bool(false)),
    ("allowKasmSharing", DefaultValue::Bool(false)),
    ("allowKasmStop", DefaultValue::Bool(false)),
    ("allowKasmUploads", DefaultValue::Bool(true)),
    ("allowKasmWebcam", DefaultValue::Bool(false)),
    ("allowPersistentProfile", DefaultValue::Bool(true)),
    ("allowPointOfPresence", DefaultValue::Bool(false)),
    ("allowTotpTwoFactor", DefaultValue::Bool(true)),
    ("allowUserStorageMapping", DefaultValue::Bool(false)),
    ("allowWebauthnTwoFactor", DefaultValue::Bool(true)),
    ("allowZoneSelection", DefaultValue::Bool(false)),
    ("autoAddLocalUsers", DefaultValue::Bool(false)),
    ("autoLoginToKasm", DefaultValue::Bool(false)),
    ("chatHistoryMessages", DefaultValue::U32(0)),
    (
        "controlPanel.advancedSettings.showGameMode",
        DefaultValue::Bool(true),
    ),
    (
        "controlPanel.advancedSettings.showImeInputMode",
        DefaultValue::Bool(true),
    ),
    (
        "controlPanel.advancedSettings.showKeyboardControls",
        DefaultValue::Bool(true),
    ),
    (
        "controlPanel.advancedSettings.showPointerLock",
        DefaultValue::Bool(true),
    ),
    (
        "controlPanel.advancedSettings.showPreferLocalCursor",
        DefaultValue::Bool(true),
    ),
    ("controlPanel.showDeleteSession", DefaultValue::Bool(true)),
    ("controlPanel.showDisplayManager", DefaultValue::Bool(true)),
    ("controlPanel.showFullscreen", DefaultValue::Bool(true)),
    ("controlPanel.showLogout", DefaultValue::Bool(true)),
    (
        "controlPanel.showReturnToWorkspaces",
        DefaultValue::Bool(true),
    ),
    (
        "controlPanel.showStreamingQuality",
        DefaultValue::Bool(true),
    ),
    ("dashboardRedirect", DefaultValue::Unset),
    ("defaultImage", DefaultValue::Unset),
    ("displayUiErrors", DefaultValue::Bool(false)),
    ("enableUiServerLogging", DefaultValue::Bool(false)),
    ("exposeUserEnv", DefaultValue::Bool(false)),
    ("fileMappings", DefaultValue::Empty),
    ("idleDisconnect", DefaultValue::Str(DEFAULT_IDLE_DISCONNECT)),
    ("injectSshKeys", DefaultValue::Bool(false)),
    ("kasmAudioDefaultOn", DefaultValue::Bool(false)),
    ("kasmImeDefaultOn", DefaultValue::Bool(false)),
    (
        "keepaliveExpiration",
        DefaultValue::Str(DEFAULT_KEEPALIVE_EXPIRATION),
    ),
    ("keepaliveExpirationAction", DefaultValue::Str("delete")),
    (
        "keepaliveInterval",
        DefaultValue::Str(DEFAULT_KEEPALIVE_INTERVAL),
    ),
    ("lockSharingVideoMode", DefaultValue::Bool(false)),
    ("maxKasmsPerUser", DefaultValue::Unset),
    ("maxUserStorageMappings", DefaultValue::Unset),
    ("require2fa", DefaultValue::Bool(false)),
    ("runConfig", DefaultValue::Unset),
    ("sessionTimeLimit", DefaultValue::Unset),
    (
        "stagedSessionLanguageAndTimezonePreferenceOverride",
        DefaultValue::Bool(false),
    ),
    ("usageLimit", DefaultValue::Unset),
    ("userStorageMappingReadOnly", DefaultValue::Bool(false)),
    ("volumeMappings", DefaultValue::Empty),
    ("webFilterPolicy", DefaultValue::Unset),
];

/// Kasm's default keepalive expiration (seed 002: 1 hour in the "All Users" group).
pub const DEFAULT_KEEPALIVE_EXPIRATION: &str = "1h";
/// Kasm's default keepalive interval (seed 002: 300 seconds).
pub const DEFAULT_KEEPALIVE_INTERVAL: &str = "5m";
/// Kasm's default idle disconnect (seed 002: 20 minutes).
pub const DEFAULT_IDLE_DISCONNECT: &str = "20m";

/// The default of `setting` (dotted name); `None` for a name that is not a setting.
pub fn default_of(setting: &str) -> Option<DefaultValue> {
    DEFAULTS
        .iter()
        .find(|(n, _)| *n == setting)
        .map(|(_, d)| *d)
}

/// Every setting's dotted name, sorted, read from the Group CRD's schema (`spec.settings`), so
/// the catalogue cannot drift from the types.
pub fn setting_names() -> &'static [String] {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let crd = serde_json::to_value(Group::crd()).unwrap_or(Value::Null);
        let settings = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
            ["spec"]["properties"]["settings"];
        let mut out = Vec::new();
        collect_names("", settings, &mut out);
        out.sort();
        out
    })
}

fn collect_names(prefix: &str, schema: &Value, out: &mut Vec<String>) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    for (k, v) in props {
        let name = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let nested = NESTED
            .iter()
            .any(|n| name == *n || name.starts_with(&format!("{n}.")));
        if nested && v.get("properties").is_some() {
            collect_names(&name, v, out);
        } else {
            out.push(name);
        }
    }
}

/// A group's settings as dotted leaves (`controlPanel` flattened; other values whole).
pub fn flatten(settings: &GroupSettings) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    if let Ok(Value::Object(map)) = serde_json::to_value(settings) {
        for (k, v) in map {
            if NESTED.contains(&k.as_str()) {
                flatten_into(&k, v, &mut out);
            } else {
                out.insert(k, v);
            }
        }
    }
    out
}

fn flatten_into(prefix: &str, v: Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten_into(&format!("{prefix}.{k}"), v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other);
        }
    }
}

/// The inverse of [`flatten`]: dotted leaves back into a JSON object of `GroupSettings`.
pub fn unflatten(leaves: &BTreeMap<String, Value>) -> Value {
    let mut root = Map::new();
    for (k, v) in leaves {
        let parts: Vec<&str> = k.split('.').collect();
        let mut cur = &mut root;
        for p in &parts[..parts.len() - 1] {
            let entry = cur
                .entry(p.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(Map::new());
            }
            cur = match entry {
                Value::Object(m) => m,
                _ => unreachable!("just made an object"),
            };
        }
        cur.insert(parts[parts.len() - 1].to_string(), v.clone());
    }
    Value::Object(root)
}

/// Where a file mapping (or another merged value) comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Origin {
    /// The User's own `spec.fileMappings`.
    User,
    /// A Group's `spec.settings`.
    Group {
        /// Group name.
        name: String,
        /// Its priority.
        priority: u32,
    },
    /// The Workspace of the session.
    Workspace {
        /// Workspace name.
        name: String,
    },
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::User => f.write_str("user"),
            Origin::Group { name, priority } => write!(f, "Group/{name} (priority {priority})"),
            Origin::Workspace { name } => write!(f, "Workspace/{name}"),
        }
    }
}

impl Origin {
    /// The provenance of a value from this origin, in the status shape.
    pub fn source(&self) -> SettingSource {
        match self {
            Origin::User => SettingSource {
                user: Some(true),
                ..SettingSource::default()
            },
            Origin::Group { name, priority } => SettingSource {
                group: Some(name.clone()),
                priority: Some(*priority),
                ..SettingSource::default()
            },
            Origin::Workspace { name } => SettingSource {
                merged: vec![format!("Workspace/{name}")],
                ..SettingSource::default()
            },
        }
    }
}

/// A file mapping and where it comes from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedFileMapping {
    /// The mapping.
    pub mapping: FileMapping,
    /// Who defined it (User over Group over Workspace for one destination).
    pub origin: Origin,
}

/// A usage limit and the group it comes from (needed for `perGroup` budgets, which all the
/// group's members share).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedUsageLimit {
    /// The limit.
    pub limit: UsageLimit,
    /// The group that supplied it.
    pub group: String,
    /// That group's priority.
    pub priority: u32,
}

impl ResolvedUsageLimit {
    /// The budget in seconds per interval.
    pub fn seconds(&self) -> u64 {
        (self.limit.hours.max(0.0) * 3600.0).round() as u64
    }
}

/// The control panel options, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveControlPanel {
    /// `controlPanel.showFullscreen`.
    pub show_fullscreen: bool,
    /// `controlPanel.showDeleteSession`.
    pub show_delete_session: bool,
    /// `controlPanel.showDisplayManager`.
    pub show_display_manager: bool,
    /// `controlPanel.showLogout`.
    pub show_logout: bool,
    /// `controlPanel.showReturnToWorkspaces`.
    pub show_return_to_workspaces: bool,
    /// `controlPanel.showStreamingQuality`.
    pub show_streaming_quality: bool,
    /// `controlPanel.advancedSettings.showGameMode`.
    pub show_game_mode: bool,
    /// `controlPanel.advancedSettings.showImeInputMode`.
    pub show_ime_input_mode: bool,
    /// `controlPanel.advancedSettings.showKeyboardControls`.
    pub show_keyboard_controls: bool,
    /// `controlPanel.advancedSettings.showPointerLock`.
    pub show_pointer_lock: bool,
    /// `controlPanel.advancedSettings.showPreferLocalCursor`.
    pub show_prefer_local_cursor: bool,
}

/// Every group setting as it applies to one user, typed, with defaults applied. Field names
/// follow `GroupSettings`; see [`DEFAULTS`] for the value when no group sets one.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveSettings {
    /// `allow2faSelfEnrollment` (default true).
    pub allow_2fa_self_enrollment: bool,
    /// `allowKasmAudio` (default true).
    pub allow_kasm_audio: bool,
    /// `allowKasmClipboardDown` (default true).
    pub allow_kasm_clipboard_down: bool,
    /// `allowKasmClipboardSeamless` (default true).
    pub allow_kasm_clipboard_seamless: bool,
    /// `allowKasmClipboardUp` (default true).
    pub allow_kasm_clipboard_up: bool,
    /// `allowKasmDelete` (default true): users may delete their sessions.
    pub allow_kasm_delete: bool,
    /// `allowKasmDownloads` (default true).
    pub allow_kasm_downloads: bool,
    /// `allowKasmGamepad` (default false).
    pub allow_kasm_gamepad: bool,
    /// `allowKasmMicrophone` (default false).
    pub allow_kasm_microphone: bool,
    /// `allowKasmWebcam` (default false).
    pub allow_kasm_webcam: bool,
    /// `allowKasmPrinting` (default false).
    pub allow_kasm_printing: bool,
    /// `allowKasmPause` (default false): users may pause sessions.
    pub allow_kasm_pause: bool,
    /// `allowKasmSharing` (default false).
    pub allow_kasm_sharing: bool,
    /// `allowKasmStop` (default false): users may stop sessions.
    pub allow_kasm_stop: bool,
    /// `allowKasmUploads` (default true).
    pub allow_kasm_uploads: bool,
    /// `allowPersistentProfile` (default true: the Workspace's `persistentProfile` is the
    /// opt-in).
    pub allow_persistent_profile: bool,
    /// `allowPointOfPresence` (default false).
    pub allow_point_of_presence: bool,
    /// `allowTotpTwoFactor` (default true).
    pub allow_totp_two_factor: bool,
    /// `allowUserStorageMapping` (default false).
    pub allow_user_storage_mapping: bool,
    /// `allowWebauthnTwoFactor` (default true).
    pub allow_webauthn_two_factor: bool,
    /// `allowZoneSelection` (default false): sessions may name a zone.
    pub allow_zone_selection: bool,
    /// `autoAddLocalUsers` as resolved for the user (default false; it matters on the Group).
    pub auto_add_local_users: bool,
    /// `autoLoginToKasm` (default false).
    pub auto_login_to_kasm: bool,
    /// `chatHistoryMessages` (default 0: off).
    pub chat_history_messages: u32,
    /// `controlPanel.*` (every option shown by default).
    pub control_panel: EffectiveControlPanel,
    /// `dashboardRedirect` (default none).
    pub dashboard_redirect: Option<String>,
    /// The default workspace: the user's `settings.defaultWorkspace`, else the groups'
    /// `defaultImage` (default none).
    pub default_workspace: Option<String>,
    /// `displayUiErrors` (default false).
    pub display_ui_errors: bool,
    /// `enableUiServerLogging` (default false).
    pub enable_ui_server_logging: bool,
    /// `exposeUserEnv` (default false): set `KASM_USER`/`KASM_USER_ID`.
    pub expose_user_env: bool,
    /// `idleDisconnect` (Kasm default 20 min).
    #[serde(with = "secs")]
    pub idle_disconnect: StdDuration,
    /// `injectSshKeys` (default false).
    pub inject_ssh_keys: bool,
    /// `kasmAudioDefaultOn` (default false).
    pub kasm_audio_default_on: bool,
    /// `kasmImeDefaultOn` (default false).
    pub kasm_ime_default_on: bool,
    /// `keepaliveExpiration` (Kasm default 3600 s).
    #[serde(with = "secs")]
    pub keepalive_expiration: StdDuration,
    /// `keepaliveExpirationAction` (Kasm default `delete`).
    pub keepalive_expiration_action: KeepaliveExpirationAction,
    /// `keepaliveInterval` (Kasm default 300 s).
    #[serde(with = "secs")]
    pub keepalive_interval: StdDuration,
    /// `lockSharingVideoMode` (default false).
    pub lock_sharing_video_mode: bool,
    /// `maxKasmsPerUser`; `None` = unlimited (Kasm documents no default).
    pub max_kasms_per_user: Option<u32>,
    /// `maxUserStorageMappings`; `None` = unlimited.
    pub max_user_storage_mappings: Option<u32>,
    /// `userStorageMappingReadOnly` (default false).
    pub user_storage_mapping_read_only: bool,
    /// `require2fa` (default false).
    pub require_2fa: bool,
    /// `runConfig` of the group with the lowest priority number that sets one (default none).
    pub run_config: Option<RunConfig>,
    /// `sessionTimeLimit`; `None` = no limit (Kasm default).
    #[serde(with = "opt_secs")]
    pub session_time_limit: Option<StdDuration>,
    /// `stagedSessionLanguageAndTimezonePreferenceOverride` (default false).
    pub staged_session_language_and_timezone_preference_override: bool,
    /// `usageLimit` and the group it comes from; `None` = no limit (Kasm default).
    pub usage_limit: Option<ResolvedUsageLimit>,
    /// `volumeMappings` merged across the user's groups (the Workspace's are added per session
    /// by [`super::volume_mappings_for`]).
    pub volume_mappings: Vec<VolumeMapping>,
    /// File mappings merged from the user and the groups (the Workspace's are added per session
    /// by [`super::file_mappings_for`]).
    pub file_mappings: Vec<ResolvedFileMapping>,
    /// `webFilterPolicy` (default none; a Workspace's policy wins).
    pub web_filter_policy: Option<String>,
    /// Every setting's effective value as a `GroupSettings` (winning group values, the user's
    /// override, the merged mappings and the defaults): the JSON delivered to the streaming
    /// software in the session.
    pub raw: GroupSettings,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}

mod opt_secs {
    pub fn serialize<S: serde::Serializer>(
        d: &Option<std::time::Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs()),
            None => s.serialize_none(),
        }
    }
}

/// A disagreement between a user's groups that resolution settled by its rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum Conflict {
    /// Groups with the same priority set a setting to different values; the first by name won.
    PriorityTie {
        /// The setting (dotted name).
        setting: String,
        /// The tied priority.
        priority: u32,
        /// The group whose value is used.
        winner: String,
        /// The other tied groups that set a different value.
        others: Vec<String>,
    },
    /// Two volume mappings of the user's groups use the same volume name or mount path; the
    /// one of the group with the lower priority number (then name) is used.
    VolumeMapping {
        /// `name` or `mountPath`.
        key: &'static str,
        /// The shared name or mount path.
        value: String,
        /// The group whose mapping is used.
        winner: String,
        /// The group whose mapping is dropped.
        loser: String,
        /// Index of the dropped mapping in the loser's `spec.settings.volumeMappings`.
        loser_index: usize,
    },
    /// Two file mappings of the user's groups target the same destination; the one of the group
    /// with the lower priority number (then name) is used.
    FileMapping {
        /// The destination path.
        destination: String,
        /// The group whose mapping is used.
        winner: String,
        /// The group whose mapping is dropped.
        loser: String,
        /// Index of the dropped mapping in the loser's `spec.settings.fileMappings`.
        loser_index: usize,
    },
}

impl Conflict {
    /// The groups involved, winner first.
    pub fn groups(&self) -> Vec<&str> {
        match self {
            Conflict::PriorityTie { winner, others, .. } => std::iter::once(winner.as_str())
                .chain(others.iter().map(String::as_str))
                .collect(),
            Conflict::VolumeMapping { winner, loser, .. }
            | Conflict::FileMapping { winner, loser, .. } => vec![winner, loser],
        }
    }

    /// A sentence for people, without the user's name.
    pub fn message(&self) -> String {
        match self {
            Conflict::PriorityTie {
                setting,
                priority,
                winner,
                others,
            } => format!(
                "groups {} have the same priority {priority} and set {setting} differently; \
                 the value of {winner} is used (name order)",
                join_names(std::iter::once(winner).chain(others.iter())),
            ),
            Conflict::VolumeMapping {
                key,
                value,
                winner,
                loser,
                loser_index,
            } => format!(
                "volume mapping {key} {value} of Group/{loser} \
                 (spec.settings.volumeMappings[{loser_index}]) collides with one of \
                 Group/{winner}, which wins (lower priority number, then name)"
            ),
            Conflict::FileMapping {
                destination,
                winner,
                loser,
                loser_index,
            } => format!(
                "file mapping {destination} of Group/{loser} \
                 (spec.settings.fileMappings[{loser_index}]) collides with one of \
                 Group/{winner}, which wins (lower priority number, then name)"
            ),
        }
    }
}

fn join_names<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = names.map(String::as_str).collect();
    match v.len() {
        0 => String::new(),
        1 => v[0].to_string(),
        n => format!("{} and {}", v[..n - 1].join(", "), v[n - 1]),
    }
}

/// Everything resolution says about one user.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resolved {
    /// Effective groups: those listed in `spec.groups` that exist, plus every group with
    /// `autoAddLocalUsers` when the user's realm is local (or unset); sorted by priority, then
    /// name.
    pub groups: Vec<EffectiveGroup>,
    /// The typed effective settings.
    pub settings: EffectiveSettings,
    /// One row per setting (dotted names for `controlPanel` leaves), sorted by name, with its
    /// value and source: a group and its priority, the user, the default, or the groups (and
    /// user) it is merged from.
    pub provenance: Vec<EffectiveSetting>,
    /// Problems of this user's configuration (unknown groups, ties, collisions, inconsistent
    /// keepalive settings, invalid durations), on this User or on the Group at fault.
    pub findings: Vec<Finding>,
    /// The disagreements between groups that the rules settled.
    pub conflicts: Vec<Conflict>,
}

struct Member<'a> {
    group: &'a Arc<Group>,
    name: String,
    priority: u32,
    leaves: BTreeMap<String, Value>,
}

/// Resolves one user's groups and settings against the namespace's directory.
pub fn resolve_user(dir: &Directory, user: &User) -> Resolved {
    let user_name = user.name_any();
    let ns = dir.namespace.clone();
    let mut findings = Vec::new();
    let mut conflicts = Vec::new();

    // Effective groups.
    let mut members: Vec<Member<'_>> = Vec::new();
    let mut seen = BTreeSet::new();
    let mut vias: BTreeMap<String, MembershipVia> = BTreeMap::new();
    for (i, g) in user.spec.groups.iter().enumerate() {
        match dir.group(g) {
            Some(group) => {
                if seen.insert(g.clone()) {
                    vias.insert(g.clone(), MembershipVia::Spec);
                    members.push(member(group));
                }
            }
            None => findings.push(Finding {
                severity: Severity::Error,
                code: Code::UnknownGroup,
                kind: "User".into(),
                namespace: ns.clone(),
                name: user_name.clone(),
                field: format!("spec.groups[{i}]"),
                message: format!("Group/{g} does not exist in namespace {ns}"),
            }),
        }
    }
    if is_local(user) {
        for group in &dir.groups {
            if group.spec.settings.auto_add_local_users == Some(true)
                && seen.insert(group.name_any())
            {
                vias.insert(group.name_any(), MembershipVia::AutoAddLocalUsers);
                members.push(member(group));
            }
        }
    }
    members.sort_by(|a, b| (a.priority, &a.name).cmp(&(b.priority, &b.name)));
    let groups: Vec<EffectiveGroup> = members
        .iter()
        .map(|m| EffectiveGroup {
            name: m.name.clone(),
            priority: m.priority,
            via: vias[&m.name],
        })
        .collect();

    // Priority picks.
    let user_default_ws = user
        .spec
        .settings
        .as_ref()
        .and_then(|s| s.default_workspace.clone());
    let mut winners: BTreeMap<String, (Value, SettingSource)> = BTreeMap::new();
    for name in setting_names() {
        if MERGED.contains(&name.as_str()) {
            continue;
        }
        if name == "defaultImage"
            && let Some(ws) = &user_default_ws
        {
            winners.insert(
                name.clone(),
                (Value::String(ws.clone()), Origin::User.source()),
            );
            continue;
        }
        let mut setters = members
            .iter()
            .filter_map(|m| m.leaves.get(name).map(|v| (m, v)));
        let Some((first, value)) = setters.next() else {
            continue;
        };
        let others: Vec<String> = setters
            .take_while(|(m, _)| m.priority == first.priority)
            .filter(|(_, v)| *v != value)
            .map(|(m, _)| m.name.clone())
            .collect();
        if !others.is_empty() {
            conflicts.push(Conflict::PriorityTie {
                setting: name.clone(),
                priority: first.priority,
                winner: first.name.clone(),
                others,
            });
        }
        winners.insert(
            name.clone(),
            (
                value.clone(),
                Origin::Group {
                    name: first.name.clone(),
                    priority: first.priority,
                }
                .source(),
            ),
        );
    }

    // Merged mappings.
    let (volume_mappings, volume_rows) = merge_volumes(&members, &mut conflicts);
    let (file_mappings, file_rows) = merge_files(user, &members, &mut conflicts);

    // Effective values: winners, then defaults; merged lists.
    let mut leaves: BTreeMap<String, Value> = BTreeMap::new();
    let mut provenance = Vec::new();
    for name in setting_names() {
        let (value, source) = match name.as_str() {
            "volumeMappings" => (
                Some(Value::Array(
                    volume_mappings
                        .iter()
                        .map(|m| serde_json::to_value(m).unwrap_or(Value::Null))
                        .collect(),
                )),
                merged_source(&volume_rows, false),
            ),
            "fileMappings" => (
                Some(Value::Array(
                    file_mappings
                        .iter()
                        .map(|m| serde_json::to_value(&m.mapping).unwrap_or(Value::Null))
                        .collect(),
                )),
                merged_source(
                    &file_rows,
                    file_mappings.iter().any(|m| m.origin == Origin::User),
                ),
            ),
            _ => match winners.remove(name) {
                Some((v, s)) => (Some(v), s),
                None => (
                    default_of(name).and_then(DefaultValue::to_json),
                    SettingSource {
                        default: Some(true),
                        ..SettingSource::default()
                    },
                ),
            },
        };
        if let Some(v) = &value {
            leaves.insert(name.clone(), v.clone());
        }
        let shown = match name.as_str() {
            "volumeMappings" => Some(annotate(&volume_mappings, |i| volume_rows[i].source())),
            "fileMappings" => Some(annotate(
                &file_mappings
                    .iter()
                    .map(|m| m.mapping.clone())
                    .collect::<Vec<_>>(),
                |i| file_mappings[i].origin.source(),
            )),
            _ => value,
        };
        provenance.push(EffectiveSetting {
            name: name.clone(),
            value: shown,
            source,
        });
    }
    let raw: GroupSettings = match serde_json::from_value(unflatten(&leaves)) {
        Ok(raw) => raw,
        Err(e) => {
            findings.push(Finding {
                severity: Severity::Error,
                code: Code::InvalidValue,
                kind: "User".into(),
                namespace: ns.clone(),
                name: user_name.clone(),
                field: "status.effectiveSettings".into(),
                message: format!("the effective settings do not form valid group settings: {e}"),
            });
            GroupSettings::default()
        }
    };

    let source_of = |name: &str| -> Option<String> {
        provenance
            .iter()
            .find(|r| r.name == name)
            .and_then(|r| r.source.group.clone())
    };
    let mut duration = |name: &str, value: &Option<Duration>, fallback: &str| -> StdDuration {
        let fallback = Duration::new(fallback).to_std().unwrap_or_default();
        match value {
            None => fallback,
            Some(d) => match d.to_std() {
                Ok(d) => d,
                Err(e) => {
                    let group = source_of(name).unwrap_or_default();
                    findings.push(invalid_duration(&ns, &group, name, &e.to_string()));
                    fallback
                }
            },
        }
    };
    let keepalive_expiration = duration(
        "keepaliveExpiration",
        &raw.keepalive_expiration,
        DEFAULT_KEEPALIVE_EXPIRATION,
    );
    let keepalive_interval = duration(
        "keepaliveInterval",
        &raw.keepalive_interval,
        DEFAULT_KEEPALIVE_INTERVAL,
    );
    let idle_disconnect = duration(
        "idleDisconnect",
        &raw.idle_disconnect,
        DEFAULT_IDLE_DISCONNECT,
    );
    let session_time_limit = match &raw.session_time_limit {
        None => None,
        Some(d) => match d.to_std() {
            Ok(d) => Some(d),
            Err(e) => {
                let group = source_of("sessionTimeLimit").unwrap_or_default();
                findings.push(invalid_duration(
                    &ns,
                    &group,
                    "sessionTimeLimit",
                    &e.to_string(),
                ));
                None
            }
        },
    };
    let usage_limit = raw.usage_limit.clone().and_then(|limit| {
        let row = provenance.iter().find(|r| r.name == "usageLimit")?;
        Some(ResolvedUsageLimit {
            limit,
            group: row.source.group.clone()?,
            priority: row.source.priority?,
        })
    });
    let cp = raw.control_panel.clone().unwrap_or_default();
    let adv = cp.advanced_settings.clone().unwrap_or_default();
    let b = |v: Option<bool>| v.unwrap_or(false);
    let settings = EffectiveSettings {
        allow_2fa_self_enrollment: b(raw.allow_2fa_self_enrollment),
        allow_kasm_audio: b(raw.allow_kasm_audio),
        allow_kasm_clipboard_down: b(raw.allow_kasm_clipboard_down),
        allow_kasm_clipboard_seamless: b(raw.allow_kasm_clipboard_seamless),
        allow_kasm_clipboard_up: b(raw.allow_kasm_clipboard_up),
        allow_kasm_delete: b(raw.allow_kasm_delete),
        allow_kasm_downloads: b(raw.allow_kasm_downloads),
        allow_kasm_gamepad: b(raw.allow_kasm_gamepad),
        allow_kasm_microphone: b(raw.allow_kasm_microphone),
        allow_kasm_webcam: b(raw.allow_kasm_webcam),
        allow_kasm_printing: b(raw.allow_kasm_printing),
        allow_kasm_pause: b(raw.allow_kasm_pause),
        allow_kasm_sharing: b(raw.allow_kasm_sharing),
        allow_kasm_stop: b(raw.allow_kasm_stop),
        allow_kasm_uploads: b(raw.allow_kasm_uploads),
        allow_persistent_profile: b(raw.allow_persistent_profile),
        allow_point_of_presence: b(raw.allow_point_of_presence),
        allow_totp_two_factor: b(raw.allow_totp_two_factor),
        allow_user_storage_mapping: b(raw.allow_user_storage_mapping),
        allow_webauthn_two_factor: b(raw.allow_webauthn_two_factor),
        allow_zone_selection: b(raw.allow_zone_selection),
        auto_add_local_users: b(raw.auto_add_local_users),
        auto_login_to_kasm: b(raw.auto_login_to_kasm),
        chat_history_messages: raw.chat_history_messages.unwrap_or(0),
        control_panel: EffectiveControlPanel {
            show_fullscreen: b(cp.show_fullscreen),
            show_delete_session: b(cp.show_delete_session),
            show_display_manager: b(cp.show_display_manager),
            show_logout: b(cp.show_logout),
            show_return_to_workspaces: b(cp.show_return_to_workspaces),
            show_streaming_quality: b(cp.show_streaming_quality),
            show_game_mode: b(adv.show_game_mode),
            show_ime_input_mode: b(adv.show_ime_input_mode),
            show_keyboard_controls: b(adv.show_keyboard_controls),
            show_pointer_lock: b(adv.show_pointer_lock),
            show_prefer_local_cursor: b(adv.show_prefer_local_cursor),
        },
        dashboard_redirect: raw.dashboard_redirect.clone(),
        default_workspace: raw.default_image.clone(),
        display_ui_errors: b(raw.display_ui_errors),
        enable_ui_server_logging: b(raw.enable_ui_server_logging),
        expose_user_env: b(raw.expose_user_env),
        idle_disconnect,
        inject_ssh_keys: b(raw.inject_ssh_keys),
        kasm_audio_default_on: b(raw.kasm_audio_default_on),
        kasm_ime_default_on: b(raw.kasm_ime_default_on),
        keepalive_expiration,
        keepalive_expiration_action: raw
            .keepalive_expiration_action
            .unwrap_or(KeepaliveExpirationAction::Delete),
        keepalive_interval,
        lock_sharing_video_mode: b(raw.lock_sharing_video_mode),
        max_kasms_per_user: raw.max_kasms_per_user,
        max_user_storage_mappings: raw.max_user_storage_mappings,
        user_storage_mapping_read_only: b(raw.user_storage_mapping_read_only),
        require_2fa: b(raw.require_2fa),
        run_config: raw.run_config.clone(),
        session_time_limit,
        staged_session_language_and_timezone_preference_override: b(
            raw.staged_session_language_and_timezone_preference_override
        ),
        usage_limit,
        volume_mappings,
        file_mappings,
        web_filter_policy: raw.web_filter_policy.clone(),
        raw,
    };

    // Consistency of the effective lifetime settings (seed 002).
    let src = |name: &str| -> String {
        provenance
            .iter()
            .find(|r| r.name == name)
            .map(|r| describe_source(&r.source))
            .unwrap_or_default()
    };
    if settings.session_time_limit.is_none()
        && settings.keepalive_expiration < settings.keepalive_interval * 2
    {
        findings.push(Finding {
            severity: Severity::Warning,
            code: Code::KeepaliveExpirationTooShort,
            kind: "User".into(),
            namespace: ns.clone(),
            name: user_name.clone(),
            field: "status.effectiveSettings.keepaliveExpiration".into(),
            message: format!(
                "keepaliveExpiration {} ({}) is shorter than twice keepaliveInterval {} ({}): \
                 a connected session may expire between two keepalives",
                Duration::from(settings.keepalive_expiration),
                src("keepaliveExpiration"),
                Duration::from(settings.keepalive_interval),
                src("keepaliveInterval"),
            ),
        });
    }
    if settings.idle_disconnect <= settings.keepalive_interval {
        findings.push(Finding {
            severity: Severity::Warning,
            code: Code::IdleDisconnectTooShort,
            kind: "User".into(),
            namespace: ns.clone(),
            name: user_name.clone(),
            field: "status.effectiveSettings.idleDisconnect".into(),
            message: format!(
                "idleDisconnect {} ({}) is not longer than keepaliveInterval {} ({}): \
                 Kasm requires it to be longer to work properly",
                Duration::from(settings.idle_disconnect),
                src("idleDisconnect"),
                Duration::from(settings.keepalive_interval),
                src("keepaliveInterval"),
            ),
        });
    }
    if let Some(ws) = &user_default_ws
        && dir.workspace(ws).is_none()
    {
        findings.push(Finding {
            severity: Severity::Error,
            code: Code::UnknownWorkspace,
            kind: "User".into(),
            namespace: ns.clone(),
            name: user_name.clone(),
            field: "spec.settings.defaultWorkspace".into(),
            message: format!("Workspace/{ws} does not exist in namespace {ns}"),
        });
    }
    for c in &conflicts {
        let field = match c {
            Conflict::PriorityTie { setting, .. } => {
                format!("status.effectiveSettings.{setting}")
            }
            Conflict::VolumeMapping { .. } => "status.effectiveSettings.volumeMappings".into(),
            Conflict::FileMapping { .. } => "status.effectiveSettings.fileMappings".into(),
        };
        findings.push(Finding {
            severity: Severity::Warning,
            code: match c {
                Conflict::PriorityTie { .. } => Code::PriorityTie,
                _ => Code::MappingCollision,
            },
            kind: "User".into(),
            namespace: ns.clone(),
            name: user_name.clone(),
            field,
            message: c.message(),
        });
    }

    Resolved {
        groups,
        settings,
        provenance,
        findings,
        conflicts,
    }
}

fn member(group: &Arc<Group>) -> Member<'_> {
    Member {
        group,
        name: group.name_any(),
        priority: group.spec.priority,
        leaves: flatten(&group.spec.settings),
    }
}

fn invalid_duration(ns: &str, group: &str, setting: &str, error: &str) -> Finding {
    Finding {
        severity: Severity::Error,
        code: Code::InvalidValue,
        kind: "Group".into(),
        namespace: ns.into(),
        name: group.into(),
        field: format!("spec.settings.{setting}"),
        message: format!("{error}; Kasm's default is used instead"),
    }
}

/// "Group/x (priority n)", "user", or "default".
pub fn describe_source(s: &SettingSource) -> String {
    if let (Some(g), Some(p)) = (&s.group, s.priority) {
        format!("Group/{g}, priority {p}")
    } else if s.user == Some(true) && s.merged.is_empty() {
        "user".into()
    } else if !s.merged.is_empty() {
        let mut from = s.merged.join(", ");
        if s.user == Some(true) {
            from = format!("user, {from}");
        }
        format!("merged from {from}")
    } else if s.user == Some(true) {
        "user".into()
    } else {
        "default".into()
    }
}

fn merged_source(rows: &[Origin], user: bool) -> SettingSource {
    let mut groups: Vec<String> = Vec::new();
    for r in rows {
        if let Origin::Group { name, .. } = r
            && !groups.contains(name)
        {
            groups.push(name.clone());
        }
    }
    if groups.is_empty() && !user {
        return SettingSource {
            default: Some(true),
            ..SettingSource::default()
        };
    }
    SettingSource {
        user: user.then_some(true),
        merged: groups,
        ..SettingSource::default()
    }
}

fn annotate<T: Serialize>(items: &[T], source: impl Fn(usize) -> SettingSource) -> Value {
    Value::Array(
        items
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut v = serde_json::to_value(m).unwrap_or(Value::Null);
                if let Value::Object(o) = &mut v {
                    o.insert(
                        "source".into(),
                        serde_json::to_value(source(i)).unwrap_or(json!({})),
                    );
                }
                v
            })
            .collect(),
    )
}

fn merge_volumes(
    members: &[Member<'_>],
    conflicts: &mut Vec<Conflict>,
) -> (Vec<VolumeMapping>, Vec<Origin>) {
    let mut out: Vec<VolumeMapping> = Vec::new();
    let mut origins: Vec<Origin> = Vec::new();
    for m in members {
        for (i, v) in m.group.spec.settings.volume_mappings.iter().enumerate() {
            let clash = out.iter().enumerate().find_map(|(j, w)| {
                if w.name == v.name {
                    Some((j, "name", v.name.clone()))
                } else if w.mount_path == v.mount_path {
                    Some((j, "mountPath", v.mount_path.clone()))
                } else {
                    None
                }
            });
            match clash {
                None => {
                    out.push(v.clone());
                    origins.push(Origin::Group {
                        name: m.name.clone(),
                        priority: m.priority,
                    });
                }
                Some((j, key, value)) => {
                    if out[j] != *v {
                        let winner = match &origins[j] {
                            Origin::Group { name, .. } => name.clone(),
                            other => other.to_string(),
                        };
                        conflicts.push(Conflict::VolumeMapping {
                            key,
                            value,
                            winner,
                            loser: m.name.clone(),
                            loser_index: i,
                        });
                    }
                }
            }
        }
    }
    (out, origins)
}

fn merge_files(
    user: &User,
    members: &[Member<'_>],
    conflicts: &mut Vec<Conflict>,
) -> (Vec<ResolvedFileMapping>, Vec<Origin>) {
    let mut out: Vec<ResolvedFileMapping> = Vec::new();
    for f in &user.spec.file_mappings {
        if !out.iter().any(|o| o.mapping.destination == f.destination) {
            out.push(ResolvedFileMapping {
                mapping: f.clone(),
                origin: Origin::User,
            });
        }
    }
    for m in members {
        for (i, f) in m.group.spec.settings.file_mappings.iter().enumerate() {
            match out.iter().find(|o| o.mapping.destination == f.destination) {
                None => out.push(ResolvedFileMapping {
                    mapping: f.clone(),
                    origin: Origin::Group {
                        name: m.name.clone(),
                        priority: m.priority,
                    },
                }),
                // The user's own mapping wins by design: not a conflict.
                Some(ResolvedFileMapping {
                    origin: Origin::User,
                    ..
                }) => {}
                Some(existing) => {
                    if existing.mapping != *f
                        && let Origin::Group { name, .. } = &existing.origin
                    {
                        conflicts.push(Conflict::FileMapping {
                            destination: f.destination.clone(),
                            winner: name.clone(),
                            loser: m.name.clone(),
                            loser_index: i,
                        });
                    }
                }
            }
        }
    }
    let origins = out.iter().map(|o| o.origin.clone()).collect();
    (out, origins)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::v1alpha1::{
        ControlPanel, ControlPanelAdvancedSettings, UsageLimitInterval, UsageLimitType,
        UserSettings,
    };
    use crate::crd::{FileMappingContent, VolumeMappingSource};
    use proptest::prelude::*;

    pub(crate) use crate::controller::fixtures::group;

    /// A User in the groups named (nothing else in its spec).
    pub(crate) fn user(name: &str, groups: &[&str]) -> User {
        crate::controller::fixtures::user(name, groups, serde_json::json!({}))
    }

    fn dir(groups: Vec<Arc<Group>>) -> Directory {
        Directory {
            namespace: "ns".into(),
            groups,
            ..Directory::default()
        }
    }

    fn row<'a>(r: &'a Resolved, name: &str) -> &'a EffectiveSetting {
        r.provenance
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no row {name}"))
    }

    fn volume(name: &str, path: &str) -> VolumeMapping {
        VolumeMapping {
            name: name.into(),
            mount_path: path.into(),
            sub_path: None,
            read_only: None,
            source: VolumeMappingSource {
                empty_dir: Some(Default::default()),
                ..Default::default()
            },
        }
    }

    fn file(dest: &str, content: &str) -> FileMapping {
        FileMapping {
            destination: dest.into(),
            content: FileMappingContent {
                inline: Some(content.into()),
                ..Default::default()
            },
            writable: None,
            executable: None,
            name: None,
            description: None,
        }
    }

    #[test]
    fn every_setting_has_a_declared_default_and_defaults_are_settings() {
        let names = setting_names();
        assert!(names.len() > 50, "catalogue read from the CRD: {names:?}");
        for n in names {
            assert!(
                default_of(n).is_some(),
                "setting {n} has no entry in DEFAULTS: declare its default"
            );
        }
        for (n, _) in DEFAULTS {
            assert!(
                names.iter().any(|x| x == n),
                "{n} in DEFAULTS is not a setting"
            );
        }
        assert!(names.contains(&"controlPanel.advancedSettings.showGameMode".to_string()));
        assert!(names.contains(&"runConfig".to_string()));
        assert!(!names.contains(&"controlPanel".to_string()));
    }

    #[test]
    fn no_groups_gives_kasm_defaults() {
        let r = resolve_user(&dir(vec![]), &user("u", &[]));
        let s = &r.settings;
        assert_eq!(s.keepalive_expiration, StdDuration::from_secs(3600));
        assert_eq!(s.keepalive_interval, StdDuration::from_secs(300));
        assert_eq!(s.idle_disconnect, StdDuration::from_secs(20 * 60));
        assert_eq!(
            s.keepalive_expiration_action,
            KeepaliveExpirationAction::Delete
        );
        assert_eq!(s.session_time_limit, None);
        assert_eq!(s.usage_limit, None);
        assert_eq!(s.max_kasms_per_user, None);
        assert!(s.allow_kasm_delete && !s.allow_kasm_stop && !s.allow_kasm_pause);
        assert!(s.allow_persistent_profile && !s.allow_zone_selection);
        assert!(!s.expose_user_env && !s.inject_ssh_keys);
        assert!(s.control_panel.show_game_mode && s.control_panel.show_logout);
        assert!(s.volume_mappings.is_empty() && s.file_mappings.is_empty());
        assert_eq!(s.default_workspace, None);
        assert!(r.findings.is_empty(), "{:?}", r.findings);
        // One row per setting, all from the default.
        assert_eq!(r.provenance.len(), setting_names().len());
        assert!(r.provenance.iter().all(|p| p.source.default == Some(true)));
        assert_eq!(row(&r, "keepaliveExpiration").value, Some(json!("1h")));
        assert_eq!(row(&r, "sessionTimeLimit").value, None);
        // Every bool default reaches the typed struct the same way it is declared.
        let typed = serde_json::to_value(s).unwrap();
        for (name, d) in DEFAULTS {
            if let DefaultValue::Bool(b) = d {
                let key = name.rsplit('.').next().unwrap();
                let v = if name.starts_with("controlPanel") {
                    &typed["controlPanel"][key]
                } else {
                    &typed[key]
                };
                assert_eq!(v, &json!(b), "default of {name}");
            }
        }
    }

    #[test]
    fn lowest_priority_number_wins_per_setting() {
        let eng = group(
            "engineering",
            10,
            GroupSettings {
                max_kasms_per_user: Some(5),
                keepalive_expiration: Some(Duration::new("2h")),
                ..Default::default()
            },
        );
        let all = group(
            "all-users",
            100,
            GroupSettings {
                max_kasms_per_user: Some(2),
                keepalive_interval: Some(Duration::new("1m")),
                auto_add_local_users: Some(true),
                ..Default::default()
            },
        );
        let r = resolve_user(&dir(vec![all, eng]), &user("alice", &["engineering"]));
        assert_eq!(
            r.groups,
            vec![
                EffectiveGroup {
                    name: "engineering".into(),
                    priority: 10,
                    via: MembershipVia::Spec
                },
                EffectiveGroup {
                    name: "all-users".into(),
                    priority: 100,
                    via: MembershipVia::AutoAddLocalUsers
                },
            ]
        );
        assert_eq!(r.settings.max_kasms_per_user, Some(5));
        assert_eq!(
            r.settings.keepalive_expiration,
            StdDuration::from_secs(7200)
        );
        assert_eq!(r.settings.keepalive_interval, StdDuration::from_secs(60));
        let m = row(&r, "maxKasmsPerUser");
        assert_eq!(m.value, Some(json!(5)));
        assert_eq!(m.source.group.as_deref(), Some("engineering"));
        assert_eq!(m.source.priority, Some(10));
        let k = row(&r, "keepaliveInterval");
        assert_eq!(k.source.group.as_deref(), Some("all-users"));
        assert_eq!(k.source.priority, Some(100));
        assert!(r.conflicts.is_empty());
        assert_eq!(r.settings.raw.max_kasms_per_user, Some(5));
        assert_eq!(r.settings.raw.idle_disconnect, Some(Duration::new("20m")));
    }

    #[test]
    fn non_local_users_are_not_auto_added() {
        let all = group(
            "all-users",
            100,
            GroupSettings {
                auto_add_local_users: Some(true),
                ..Default::default()
            },
        );
        let mut u = user("bob", &[]);
        u.spec.realm = Some(crate::crd::v1alpha1::Realm::Ldap);
        assert!(resolve_user(&dir(vec![all.clone()]), &u).groups.is_empty());
        // Listed explicitly, an LDAP user is a member (via spec).
        let u = user("bob", &["all-users"]);
        let r = resolve_user(&dir(vec![all]), &u);
        assert_eq!(r.groups[0].via, MembershipVia::Spec);
    }

    #[test]
    fn control_panel_leaves_resolve_independently() {
        let a = group(
            "a",
            1,
            GroupSettings {
                control_panel: Some(ControlPanel {
                    show_logout: Some(false),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        let b = group(
            "b",
            2,
            GroupSettings {
                control_panel: Some(ControlPanel {
                    show_logout: Some(true),
                    advanced_settings: Some(ControlPanelAdvancedSettings {
                        show_game_mode: Some(false),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        let r = resolve_user(&dir(vec![a, b]), &user("u", &["a", "b"]));
        assert!(!r.settings.control_panel.show_logout);
        assert!(!r.settings.control_panel.show_game_mode);
        assert!(r.settings.control_panel.show_fullscreen, "default");
        assert_eq!(
            row(&r, "controlPanel.advancedSettings.showGameMode")
                .source
                .group
                .as_deref(),
            Some("b")
        );
        assert_eq!(
            row(&r, "controlPanel.showLogout").source.group.as_deref(),
            Some("a")
        );
        let cp = r.settings.raw.control_panel.unwrap();
        assert_eq!(cp.show_logout, Some(false));
        assert_eq!(cp.advanced_settings.unwrap().show_game_mode, Some(false));
    }

    #[test]
    fn ties_break_by_name_and_are_reported_only_when_values_differ() {
        let eng = group(
            "engineering",
            10,
            GroupSettings {
                max_kasms_per_user: Some(5),
                allow_kasm_sharing: Some(true),
                ..Default::default()
            },
        );
        let trading = group(
            "trading",
            10,
            GroupSettings {
                max_kasms_per_user: Some(3),
                allow_kasm_sharing: Some(true),
                ..Default::default()
            },
        );
        let r = resolve_user(
            &dir(vec![trading, eng]),
            &user("bob", &["trading", "engineering"]),
        );
        assert_eq!(r.settings.max_kasms_per_user, Some(5));
        assert_eq!(
            r.conflicts,
            vec![Conflict::PriorityTie {
                setting: "maxKasmsPerUser".into(),
                priority: 10,
                winner: "engineering".into(),
                others: vec!["trading".into()],
            }]
        );
        let f: Vec<_> = r
            .findings
            .iter()
            .filter(|f| f.code == Code::PriorityTie)
            .collect();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].severity, Severity::Warning);
        assert!(
            f[0].message.contains("engineering and trading"),
            "{}",
            f[0].message
        );
        assert!(f[0].field.ends_with("maxKasmsPerUser"));
    }

    #[test]
    fn user_default_workspace_overrides_default_image() {
        let g = group(
            "g",
            1,
            GroupSettings {
                default_image: Some("browser".into()),
                ..Default::default()
            },
        );
        let mut u = user("u", &["g"]);
        let d = dir(vec![g]);
        let r = resolve_user(&d, &u);
        assert_eq!(r.settings.default_workspace.as_deref(), Some("browser"));
        u.spec.settings = Some(UserSettings {
            default_workspace: Some("cad".into()),
            ..Default::default()
        });
        let r = resolve_user(&d, &u);
        assert_eq!(r.settings.default_workspace.as_deref(), Some("cad"));
        let row = row(&r, "defaultImage");
        assert_eq!(row.source.user, Some(true));
        assert_eq!(row.value, Some(json!("cad")));
        // cad is not a workspace of the directory.
        assert!(r.findings.iter().any(
            |f| f.code == Code::UnknownWorkspace && f.field == "spec.settings.defaultWorkspace"
        ));
    }

    #[test]
    fn volume_mappings_merge_and_collisions_go_to_the_lower_number() {
        let a = group(
            "a",
            1,
            GroupSettings {
                volume_mappings: vec![volume("data", "/data"), volume("tools", "/opt/tools")],
                ..Default::default()
            },
        );
        let b = group(
            "b",
            2,
            GroupSettings {
                volume_mappings: vec![
                    volume("other-data", "/data"),
                    volume("scratch", "/scratch"),
                    // Identical to a's: merged silently.
                    volume("tools", "/opt/tools"),
                ],
                ..Default::default()
            },
        );
        let r = resolve_user(&dir(vec![b, a]), &user("u", &["b", "a"]));
        let names: Vec<_> = r
            .settings
            .volume_mappings
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(names, ["data", "tools", "scratch"]);
        assert_eq!(
            r.conflicts,
            vec![Conflict::VolumeMapping {
                key: "mountPath",
                value: "/data".into(),
                winner: "a".into(),
                loser: "b".into(),
                loser_index: 0,
            }]
        );
        let row = row(&r, "volumeMappings");
        assert_eq!(row.source.merged, vec!["a".to_string(), "b".to_string()]);
        let value = row.value.as_ref().unwrap();
        assert_eq!(value[2]["source"]["group"], json!("b"));
        assert!(r.findings.iter().any(|f| f.code == Code::MappingCollision));
    }

    #[test]
    fn file_mappings_user_over_group_and_lower_group_number_wins() {
        let a = group(
            "a",
            1,
            GroupSettings {
                file_mappings: vec![file("/etc/motd", "a"), file("/etc/a", "a")],
                ..Default::default()
            },
        );
        let b = group(
            "b",
            2,
            GroupSettings {
                file_mappings: vec![file("/etc/motd", "b"), file("/etc/b", "b")],
                ..Default::default()
            },
        );
        let mut u = user("u", &["a", "b"]);
        u.spec.file_mappings = vec![file("/etc/a", "user")];
        let r = resolve_user(&dir(vec![a, b]), &u);
        let got: Vec<(&str, String)> = r
            .settings
            .file_mappings
            .iter()
            .map(|f| (f.mapping.destination.as_str(), f.origin.to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/etc/a", "user".to_string()),
                ("/etc/motd", "Group/a (priority 1)".to_string()),
                ("/etc/b", "Group/b (priority 2)".to_string()),
            ]
        );
        // The user's override is by design; b's /etc/motd losing to a's is a collision.
        assert_eq!(
            r.conflicts,
            vec![Conflict::FileMapping {
                destination: "/etc/motd".into(),
                winner: "a".into(),
                loser: "b".into(),
                loser_index: 0,
            }]
        );
        let row = row(&r, "fileMappings");
        assert_eq!(row.source.user, Some(true));
        assert_eq!(row.source.merged, vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn unknown_groups_are_reported_and_skipped() {
        let r = resolve_user(&dir(vec![]), &user("u", &["nope"]));
        assert!(r.groups.is_empty());
        assert_eq!(r.findings.len(), 1);
        assert_eq!(r.findings[0].code, Code::UnknownGroup);
        assert_eq!(r.findings[0].field, "spec.groups[0]");
        assert_eq!(r.findings[0].severity, Severity::Error);
    }

    #[test]
    fn inconsistent_keepalive_settings_are_reported() {
        let g = group(
            "g",
            1,
            GroupSettings {
                keepalive_expiration: Some(Duration::new("5m")),
                keepalive_interval: Some(Duration::new("4m")),
                idle_disconnect: Some(Duration::new("4m")),
                ..Default::default()
            },
        );
        let r = resolve_user(&dir(vec![g.clone()]), &user("u", &["g"]));
        let codes: Vec<_> = r.findings.iter().map(|f| f.code).collect();
        assert_eq!(
            codes,
            vec![
                Code::KeepaliveExpirationTooShort,
                Code::IdleDisconnectTooShort
            ]
        );
        assert!(
            r.findings[0].message.contains("Group/g"),
            "{}",
            r.findings[0].message
        );
        // With a session time limit the keepalive expiration is not used.
        let mut s = g.spec.settings.clone();
        s.session_time_limit = Some(Duration::new("8h"));
        let r = resolve_user(&dir(vec![group("g", 1, s)]), &user("u", &["g"]));
        let codes: Vec<_> = r.findings.iter().map(|f| f.code).collect();
        assert_eq!(codes, vec![Code::IdleDisconnectTooShort]);
        assert_eq!(
            r.settings.session_time_limit,
            Some(StdDuration::from_secs(8 * 3600))
        );
    }

    #[test]
    fn invalid_durations_fall_back_to_the_default_and_name_the_group() {
        let g = group(
            "g",
            1,
            GroupSettings {
                keepalive_interval: Some(Duration::new("5 minutes")),
                ..Default::default()
            },
        );
        let r = resolve_user(&dir(vec![g]), &user("u", &["g"]));
        assert_eq!(r.settings.keepalive_interval, StdDuration::from_secs(300));
        let f = r
            .findings
            .iter()
            .find(|f| f.code == Code::InvalidValue)
            .unwrap();
        assert_eq!((f.kind.as_str(), f.name.as_str()), ("Group", "g"));
        assert_eq!(f.field, "spec.settings.keepaliveInterval");
    }

    #[test]
    fn usage_limit_carries_its_group() {
        let g = group(
            "trading",
            10,
            GroupSettings {
                usage_limit: Some(UsageLimit {
                    type_: UsageLimitType::PerGroup,
                    interval: UsageLimitInterval::Monthly,
                    hours: 1.5,
                    timezone: None,
                }),
                ..Default::default()
            },
        );
        let r = resolve_user(&dir(vec![g]), &user("u", &["trading"]));
        let u = r.settings.usage_limit.unwrap();
        assert_eq!(u.group, "trading");
        assert_eq!(u.priority, 10);
        assert_eq!(u.seconds(), 5400);
    }

    #[test]
    fn flatten_round_trips() {
        let s = GroupSettings {
            max_kasms_per_user: Some(3),
            control_panel: Some(ControlPanel {
                show_logout: Some(true),
                advanced_settings: Some(ControlPanelAdvancedSettings {
                    show_pointer_lock: Some(false),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let flat = flatten(&s);
        assert_eq!(
            flat.keys().collect::<Vec<_>>(),
            [
                "controlPanel.advancedSettings.showPointerLock",
                "controlPanel.showLogout",
                "maxKasmsPerUser"
            ]
        );
        let back: GroupSettings = serde_json::from_value(unflatten(&flat)).unwrap();
        assert_eq!(back, s);
    }

    // ---- properties ----

    /// A few settings of each shape, so that generated groups collide often.
    fn arb_settings() -> impl Strategy<Value = GroupSettings> {
        (
            proptest::option::of(0u32..4),
            proptest::option::of(any::<bool>()),
            proptest::option::of(prop_oneof![Just("1h"), Just("2h"), Just("30m")]),
            proptest::option::of(any::<bool>()),
            proptest::collection::vec((0usize..3, 0usize..3), 0..3),
            proptest::collection::vec((0usize..3, 0usize..2), 0..3),
        )
            .prop_map(|(max, stop, exp, logout, vols, files)| GroupSettings {
                max_kasms_per_user: max,
                allow_kasm_stop: stop,
                keepalive_expiration: exp.map(Duration::new),
                control_panel: logout.map(|l| ControlPanel {
                    show_logout: Some(l),
                    ..Default::default()
                }),
                volume_mappings: vols
                    .into_iter()
                    .map(|(n, p)| volume(&format!("v{n}"), &format!("/m{p}")))
                    .collect(),
                file_mappings: files
                    .into_iter()
                    .map(|(d, c)| file(&format!("/f{d}"), &format!("c{c}")))
                    .collect(),
                ..Default::default()
            })
    }

    fn arb_groups() -> impl Strategy<Value = Vec<Arc<Group>>> {
        proptest::collection::vec((0u32..3, arb_settings()), 1..6).prop_map(|gs| {
            gs.into_iter()
                .enumerate()
                .map(|(i, (p, s))| group(&format!("g{i}"), p, s))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn group_order_never_changes_the_result(
            groups in arb_groups(),
            seed in any::<u64>(),
        ) {
            let names: Vec<String> = groups.iter().map(|g| g.name_any()).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let base = resolve_user(&dir(groups.clone()), &user("u", &refs));
            // A deterministic shuffle of both the directory and the user's list.
            let mut shuffled = groups.clone();
            let mut listed = refs.clone();
            let mut x = seed;
            for i in (1..shuffled.len()).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let j = (x >> 33) as usize % (i + 1);
                shuffled.swap(i, j);
                listed.swap(i, (j + 1) % (i + 1));
            }
            let other = resolve_user(&dir(shuffled), &user("u", &listed));
            prop_assert_eq!(base, other);
        }

        #[test]
        fn a_higher_number_never_overrides_a_lower_one(groups in arb_groups()) {
            let names: Vec<String> = groups.iter().map(|g| g.name_any()).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let r = resolve_user(&dir(groups.clone()), &user("u", &refs));
            for row in &r.provenance {
                if MERGED.contains(&row.name.as_str()) { continue; }
                let setters: Vec<&Arc<Group>> = groups
                    .iter()
                    .filter(|g| flatten(&g.spec.settings).contains_key(&row.name))
                    .collect();
                match setters.iter().map(|g| g.spec.priority).min() {
                    None => prop_assert_eq!(row.source.default, Some(true)),
                    Some(min) => {
                        prop_assert_eq!(row.source.priority, Some(min), "{}", row.name);
                        let winner = row.source.group.clone().unwrap();
                        let first_by_name = setters
                            .iter()
                            .filter(|g| g.spec.priority == min)
                            .map(|g| g.name_any())
                            .min()
                            .unwrap();
                        prop_assert_eq!(&winner, &first_by_name);
                        let g = groups.iter().find(|g| g.name_any() == winner).unwrap();
                        let leaves = flatten(&g.spec.settings);
                        prop_assert_eq!(row.value.as_ref(), leaves.get(&row.name));
                    }
                }
            }
        }

        #[test]
        fn merged_mappings_keep_one_entry_per_key_from_the_best_group(groups in arb_groups()) {
            let names: Vec<String> = groups.iter().map(|g| g.name_any()).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let r = resolve_user(&dir(groups.clone()), &user("u", &refs));
            let vols = &r.settings.volume_mappings;
            let mut seen_names = BTreeSet::new();
            let mut seen_paths = BTreeSet::new();
            for v in vols {
                prop_assert!(seen_names.insert(v.name.clone()));
                prop_assert!(seen_paths.insert(v.mount_path.clone()));
            }
            // Every destination any group maps is present exactly once, from the best group
            // that maps it.
            let mut sorted = groups.clone();
            sorted.sort_by_key(|g| (g.spec.priority, g.name_any()));
            for f in &r.settings.file_mappings {
                let best = sorted
                    .iter()
                    .find(|g| g.spec.settings.file_mappings.iter()
                        .any(|m| m.destination == f.mapping.destination))
                    .unwrap();
                prop_assert_eq!(
                    &f.origin,
                    &Origin::Group { name: best.name_any(), priority: best.spec.priority }
                );
            }
            let all: BTreeSet<_> = groups.iter()
                .flat_map(|g| g.spec.settings.file_mappings.iter().map(|m| m.destination.clone()))
                .collect();
            prop_assert_eq!(r.settings.file_mappings.len(), all.len());
            // A tie is reported exactly when tied setters disagree.
            for c in &r.conflicts {
                if let Conflict::PriorityTie { setting, priority, others, .. } = c {
                    for o in others {
                        let g = groups.iter().find(|g| &g.name_any() == o).unwrap();
                        prop_assert_eq!(g.spec.priority, *priority);
                        prop_assert!(flatten(&g.spec.settings).contains_key(setting));
                    }
                }
            }
        }
    }
}
