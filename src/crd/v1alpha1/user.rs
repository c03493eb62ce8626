//! `User`: a person, their Kasm user properties, group membership and user settings (seed 001).

use k8s_openapi::api::core::v1::SecretKeySelector;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::group::{UsageLimitInterval, UsageLimitType};
use crate::crd::FileMapping;

/// A person who may launch sessions.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "cubicle.dev",
    version = "v1alpha1",
    kind = "User",
    namespaced,
    status = "UserStatus",
    derive = "PartialEq",
    shortname = "cusr",
    category = "cubicle",
    doc = "A Cubicle User (Kasm: User): identity properties, group membership, user settings and file mappings. Status shows the effective groups and every effective setting with its provenance.",
    printcolumn(
        name = "Username",
        type_ = "string",
        json_path = ".spec.username",
        description = "Login name (metadata.name when unset)"
    ),
    printcolumn(
        name = "Identity",
        type_ = "string",
        json_path = ".spec.identity.username",
        description = "Who may act for the user (besides the admin groups)",
        priority = 1
    ),
    printcolumn(
        name = "Realm",
        type_ = "string",
        json_path = ".spec.realm",
        priority = 1
    ),
    printcolumn(
        name = "Groups",
        type_ = "string",
        json_path = ".spec.groups",
        description = "Groups listed on the user"
    ),
    printcolumn(
        name = "Sessions",
        type_ = "integer",
        json_path = ".status.activeSessions",
        description = "Sessions started and not yet ended"
    ),
    printcolumn(name = "Disabled", type_ = "boolean", json_path = ".spec.disabled"),
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
#[x_kube(validation = Rule::new(
    "!has(oldSelf.userId) || (has(self.userId) && self.userId == oldSelf.userId)"
).message("userId is immutable once set: it names the user's persistent profiles").field_path(".userId"))]
#[serde(rename_all = "camelCase")]
pub struct UserSpec {
    /// Login name, unique in the namespace. Defaults to `metadata.name` when unset.
    /// Kasm: `username` (User Name).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub username: Option<String>,
    /// Stable id of the person, used for `{user_id}` in profile paths. When unset the operator
    /// derives one deterministically (a UUIDv5 of the namespace and username, reported in
    /// `status.userId`), so deleting and re-creating the User keeps the same profile. Once set it
    /// cannot be changed or removed. Lowercase letters, digits and `-` (it becomes part of object
    /// names). Kasm: `user_id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub user_id: Option<String>,
    /// Who the person is to the Kubernetes API server: the username (and optionally the uid) it
    /// produces for them after its own authentication and claim mapping, e.g.
    /// `oidc:alice@example.com`. The operator binds that identity to the right to act for this
    /// User (a Role granting the verb `use` on `users/<name>`), and the admission policy lets a
    /// Session for this User be created, changed or deleted only by whoever holds it. Unset:
    /// nobody but the admin groups may act for the User. Prefer a stable claim (`sub`) over an
    /// e-mail address that can be reassigned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<UserIdentity>,
    /// Where the identity comes from: `local`, `ldap`, `saml` or `oidc`. Unset means `local`.
    /// Groups with `autoAddLocalUsers` contain every `local` user. Kasm: `realm`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub realm: Option<Realm>,
    /// First name. Kasm: `first_name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub first_name: Option<String>,
    /// Last name. Kasm: `last_name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub last_name: Option<String>,
    /// Email address. Kasm: `email`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 320))]
    pub email: Option<String>,
    /// Phone number. Kasm: `phone`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub phone: Option<String>,
    /// Organization name. Kasm: `organization`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 255))]
    pub organization: Option<String>,
    /// Notes about the user. Kasm: `notes`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub notes: Option<String>,
    /// The account is locked: no new session starts until it is re-enabled (running sessions
    /// are left alone). Kasm: `locked` (Lock account).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<bool>,
    /// Ask the user to change their password at next login (local accounts only). Carried for a
    /// portal or identity system to act on; the operator does not authenticate anyone.
    /// Kasm: Force Password Reset on Login.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force_password_reset: Option<bool>,
    /// Reset the user's two-factor secret; they set it up again at next login. Carried for a
    /// portal or identity system to act on; the operator only carries it.
    /// Kasm: Reset Two Factor Authentication Secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reset_two_factor: Option<bool>,
    /// Where a portal finds the initial password of a local account (a Secret key). The operator
    /// never reads it. Kasm: `password`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeySelector>,
    /// Three free-form attributes for custom purposes. Kasm: Custom Attribute 1-3.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom_attributes: Option<CustomAttributes>,
    /// Names of the Groups the user belongs to (Groups with `autoAddLocalUsers` need not be
    /// listed). Kasm: Users in Group.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 253)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub groups: Vec<String>,
    /// The user's own settings (Kasm: User Settings, set on the user's profile).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settings: Option<UserSettings>,
    /// Files placed inside the user's sessions; for one destination they win over the Group's
    /// and the Workspace's. Kasm: User File Mappings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["destination".into()]))]
    pub file_mappings: Vec<FileMapping>,
    /// The user's SSH key pair, injected into sessions when a group sets `injectSshKeys`.
    /// Kasm: the user's SSH keys (profile).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_keys: Option<SshKeys>,
}

/// Where an identity comes from. Kasm: `realm`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(transform = crate::crd::drop_description)]
pub enum Realm {
    /// A local account.
    Local,
    /// An LDAP directory.
    Ldap,
    /// A SAML identity provider.
    Saml,
    /// An OpenID Connect provider.
    Oidc,
}

/// Three free-form attributes. Kasm: Custom Attribute 1, 2, 3.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CustomAttributes {
    /// Custom attribute 1. Kasm: `custom_attribute_1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub attribute1: Option<String>,
    /// Custom attribute 2. Kasm: `custom_attribute_2`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub attribute2: Option<String>,
    /// Custom attribute 3. Kasm: `custom_attribute_3`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub attribute3: Option<String>,
}

/// The user's own settings. Kasm: User Settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct UserSettings {
    /// Launch a session of the default workspace when the user logs in.
    /// Kasm: Auto Launch Session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auto_launch_session: Option<bool>,
    /// Sound effects for chat in shared sessions. Kasm: Chat Sound Effects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_sound_effects: Option<bool>,
    /// Name of the Workspace used for `/go`, Launch Now and auto launch; overrides the groups'
    /// `defaultImage`. Kasm: Default Workspace Image.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub default_workspace: Option<String>,
    /// Show the tip about the control panel when a session starts.
    /// Kasm: Show Tips During Session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_tips_during_session: Option<bool>,
    /// Open and close the control panel by pressing Ctrl twice. Kasm: Toggle Control Panel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub toggle_control_panel: Option<bool>,
    /// App theme: `light`, `dark`, or `auto` (follow the OS). Kasm: Theme.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub theme: Option<Theme>,
}

/// App theme. Kasm: Theme.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(transform = crate::crd::drop_description)]
pub enum Theme {
    /// Light theme.
    Light,
    /// Dark theme.
    Dark,
    /// Follow the operating system of the user's computer.
    Auto,
}

/// The identity the Kubernetes API server knows a person by.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct UserIdentity {
    /// The username exactly as the API server reports it (`kubectl auth whoami`), prefix
    /// included: `oidc:alice@example.com`, `system:serviceaccount:team:alice`, `alice`.
    #[schemars(length(min = 1, max = 512))]
    pub username: String,
    /// The uid the API server reports for the person, when it sets one. RBAC binds usernames
    /// only, so the uid is not part of the grant; the CLI requires it to match when it is set,
    /// so a reassigned username does not find the old person's User.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub uid: Option<String>,
}

/// The user's SSH key pair.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SshKeys {
    /// A Secret in the same namespace with keys `id_rsa` (private key) and `id_rsa.pub` (public
    /// key); they are mounted as `~/.ssh/id_rsa` and `~/.ssh/id_rsa.pub`.
    pub secret_ref: LocalSecretReference,
}

/// A reference to a Secret in the same namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalSecretReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Observed state of a User: resolved membership and settings, with provenance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct UserStatus {
    /// The user id in effect: `spec.userId`, or the one derived from namespace and username.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// The groups the user is a member of, by ascending priority then name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub effective_groups: Vec<EffectiveGroup>,
    /// Every group setting as it applies to this user, with where its value comes from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub effective_settings: Vec<EffectiveSetting>,
    /// The servers assigned to this user by ServerAssignments (Kasm: Assigned Servers tab).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub assigned_servers: Vec<AssignedServer>,
    /// Sessions of this user that have started (`status.startedAt` is set) and not ended
    /// (running, paused or stopped). A session counts from the moment it starts, the moment it
    /// can also move `lastSessionTime`, so a launch changes this status once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_sessions: Option<u32>,
    /// When the user's most recent session started. Kasm: Last Session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_session_time: Option<Time>,
    /// The usage-limit ledger: one entry per budget that applies to the user.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage: Vec<UsageEntry>,
    /// Conditions: `Ready`; `SettingsConflict` (a priority tie between groups); `InvalidSpec`
    /// (an unknown group, duplicate username).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "crate::crd::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `.metadata.generation` this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Not part of the API (never serialized, never read from it): what the operator's cache
    /// keeps of this status once it has dropped `effectiveSettings`.
    // (Skipped by a predicate rather than `skip`: the schema derive copies this struct, and a
    // field that copy never reads would warn.)
    #[serde(skip_deserializing, skip_serializing_if = "CacheNote::never_sent")]
    #[schemars(skip)]
    pub cached: CacheNote,
}

/// A digest the operator's cache keeps beside a status it trimmed, so that the status can still
/// be compared with a computed one. Bookkeeping, not a value: any two are equal, so a status's
/// equality is its API fields'.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CacheNote(pub Option<u64>);

impl CacheNote {
    /// Always: it is never serialized.
    fn never_sent(&self) -> bool {
        true
    }
}

impl PartialEq for CacheNote {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// A group the user is a member of.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveGroup {
    /// Group name.
    pub name: String,
    /// The group's priority (lower wins).
    pub priority: u32,
    /// How the user came to be a member.
    pub via: MembershipVia,
}

/// How a user is a member of a group.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = crate::crd::drop_description)]
pub enum MembershipVia {
    /// The group is listed in the user's `spec.groups`.
    Spec,
    /// The group has `autoAddLocalUsers` and the user's realm is `local`.
    AutoAddLocalUsers,
}

/// One setting as it applies to the user.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveSetting {
    /// The setting's field name under `Group.spec.settings` (or `User.spec.settings`).
    pub name: String,
    /// The effective value; absent when nothing sets it and it has no default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::crd::any_value_schema")]
    pub value: Option<serde_json::Value>,
    /// Where the value comes from.
    pub source: SettingSource,
}

/// Where an effective setting's value comes from; exactly one way is set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SettingSource {
    /// The group whose value won.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// That group's priority.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// The value comes from the user's own settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<bool>,
    /// No group sets it: Kasm's default applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default: Option<bool>,
    /// The value is merged from these groups (volume and file mappings), by ascending priority.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged: Vec<String>,
}

/// A server assigned to the user.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AssignedServer {
    /// Server name.
    pub server: String,
    /// The Server's pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Whether the assignment applies now: the server's pool exists and has assignment enabled.
    pub in_effect: bool,
}

/// One usage-limit budget and how much of it is spent.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UsageEntry {
    /// `perUser` (the user's own budget) or `perGroup` (shared with the group's members).
    pub scope: UsageLimitType,
    /// The group whose usage limit this is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// The budget's window kind.
    pub interval: UsageLimitInterval,
    /// Start of the current window (absent for `total`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_start: Option<Time>,
    /// End of the current window (absent for `total`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_end: Option<Time>,
    /// Seconds of session time used in the window.
    pub used_seconds: u64,
    /// Seconds allowed in the window.
    pub limit_seconds: u64,
    /// Time zone the windows are computed in (IANA name, e.g. `UTC`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Milliseconds of sessions that have ended in the window (the durable part of the ledger;
    /// running sessions are counted from their start on top of it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closed_ms: Option<u64>,
    /// Uids of the sessions already closed into this window, so that a retry after a crash
    /// never counts a session twice.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10000))]
    pub closed_sessions: Vec<String>,
}
