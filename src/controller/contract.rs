//! The operator's contract with the objects it manages: every label, annotation, finalizer,
//! field manager and child name it writes or reads, in one place.
//!
//! The builders (`session::build`), the caches (`stores`, `cached`) and the controllers all
//! name these here, so none of them imports another for a string (this ended the import circle
//! `session/build.rs` -> `stores.rs` -> `session/build.rs`, and `cached.rs` -> `session/build.rs`).

use kube::ResourceExt;

use crate::crd::v1alpha1::Session;

// Labels on every object the operator creates (the watches select children by them).

/// Label on every object the operator creates.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Its value.
pub const MANAGED_BY: &str = "cubicle";

// Labels on session pods and profile claims.

/// Label: the Session a pod belongs to.
pub const SESSION_LABEL: &str = "cubicle.dev/session";

/// Label: the User (object name) of a pod or profile claim.
pub const USER_LABEL: &str = "cubicle.dev/user";

/// Label: the Workspace of a pod or profile claim.
pub const WORKSPACE_LABEL: &str = "cubicle.dev/workspace";

/// Label: the Server a pod was placed on.
pub const SERVER_LABEL: &str = "cubicle.dev/server";

/// Label: marks a profile claim and carries a hash of its template-derived base name.
pub const PROFILE_LABEL: &str = "cubicle.dev/profile";

/// Label: set on an archived (reset) profile claim, value = archive time (unix seconds).
pub const ARCHIVED_LABEL: &str = "cubicle.dev/archived";

/// Label on a paused session's pod: `paused` (the shipped NetworkPolicy denies it ingress).
pub const ACCESS_LABEL: &str = "cubicle.dev/access";
/// The value of [`ACCESS_LABEL`] on a paused session's pod.
pub const ACCESS_PAUSED: &str = "paused";

// Annotations.

/// Annotation on a profile claim: the uid of the session whose Reset created it.
pub const RESET_BY_ANNOTATION: &str = "cubicle.dev/reset-by-session";

/// Annotation on a session pod holding the effective settings JSON (mounted as a file).
pub const SETTINGS_ANNOTATION: &str = "cubicle.dev/settings";

/// Annotation on a session pod recording what its launch decided (server, profile outcome), so
/// the status can be written once, when the pod runs, and still tell it after a restart.
pub const LAUNCH_ANNOTATION: &str = "cubicle.dev/launch";

/// Annotation the expiry sets with `spec.state` when it stops or pauses a session, so the
/// permission check (allowKasmStop/allowKasmPause) applies to users, not to the expiry.
pub const STATE_SET_BY_ANNOTATION: &str = "cubicle.dev/state-set-by";
/// Prefix of the annotations on a session pod that carry a file mapping's content (`<prefix>N`,
/// projected into the container as a file).
pub const FILE_ANNOTATION_PREFIX: &str = "cubicle.dev/file-";

/// Annotation on a session pod: the version of the set of children (objects besides the pod) the
/// operator had brought into being for its session when it last checked them. A pod of an older
/// build carries an older value (or none), so a newer build sees which running sessions lack a
/// child it adds and creates it, without touching the pod's spec.
pub const CHILDREN_ANNOTATION: &str = "cubicle.dev/children";

/// This build's children version: `1` = the pod, its profile claim and the credentials Secret.
/// Raise it when a new child kind is added, so sessions already running receive it.
pub const CHILDREN_VERSION: &str = "1";

/// The `app.kubernetes.io/name` label.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// Its value on session pods and profile claims.
pub const SESSION_APP: &str = "cubicle-session";

/// The labels the operator owns on a session pod: each is brought back to its desired value (or
/// removed, when it has none) whenever it differs.
pub const OWNED_POD_LABELS: [&str; 7] = [
    MANAGED_BY_LABEL,
    NAME_LABEL,
    SESSION_LABEL,
    USER_LABEL,
    WORKSPACE_LABEL,
    SERVER_LABEL,
    ACCESS_LABEL,
];

/// The annotations the operator owns on a session pod and keeps at their desired value. (The
/// settings, launch record and file annotations are inputs of the pod's spec, set when it is
/// created, like the spec itself.)
pub const OWNED_POD_ANNOTATIONS: [&str; 1] = [CHILDREN_ANNOTATION];

/// A digest of a pod's owned labels and annotations ([`OWNED_POD_LABELS`],
/// [`OWNED_POD_ANNOTATIONS`]): equal digests mean nothing owned differs. Stable across processes.
pub fn owned_digest(
    labels: Option<&std::collections::BTreeMap<String, String>>,
    annotations: Option<&std::collections::BTreeMap<String, String>>,
) -> u64 {
    let mut text = String::new();
    let keys = OWNED_POD_LABELS
        .iter()
        .map(|k| (k, labels))
        .chain(OWNED_POD_ANNOTATIONS.iter().map(|k| (k, annotations)));
    for (k, map) in keys {
        text.push_str(k);
        match map.and_then(|m| m.get(*k)) {
            Some(v) => {
                text.push('=');
                text.push_str(v);
            }
            None => text.push('!'),
        }
        text.push('\n');
    }
    stable_hash(&text)
}

/// The value of [`STATE_SET_BY_ANNOTATION`] when the expiry set `spec.state`.
pub const SET_BY_EXPIRY: &str = "expiry";

// Well-known node labels read.

/// The zone label.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The hostname label (used to pin a pod to a Server's node).
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

// Finalizers.

/// The finalizer that guarantees a usage-limited session is accounted before it disappears.
pub const USAGE_FINALIZER: &str = "cubicle.dev/usage-accounting";

// Field managers.

/// Field manager of the Session controller's writes.
pub const FIELD_MANAGER: &str = "cubicle";

/// Field manager of the usage ledger (distinct from the status controllers' manager, so that
/// server-side apply never lets one remove the other's fields).
pub const USAGE_MANAGER: &str = "cubicle-usage";

// Label values and child names.

/// A valid label value for an arbitrary string (≤ 63 chars, alphanumeric ends); long or odd
/// values are shortened with a stable hash suffix.
pub fn label_value(s: &str) -> String {
    let clean: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = clean
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    if clean.len() <= 63 && clean == s {
        return clean;
    }
    let h = format!("{:08x}", stable_hash(s) as u32);
    let keep: String = clean.chars().take(54).collect();
    let keep = keep.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if keep.is_empty() {
        h
    } else {
        format!("{keep}-{h}")
    }
}

/// FNV-1a 64: stable across processes and versions (std's hasher is randomly seeded).
pub fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// The name of a session's pod: the session's own name (one pod per session, in its namespace).
pub fn pod_name(session: &Session) -> String {
    session.name_any()
}
