//! The Cubicle API (`cubicle.dev`): Rust types of every custom resource, and the generated
//! CustomResourceDefinitions.
//!
//! The types are the source of truth: `crds/` is rendered from them by `cubicle crds --dir crds`
//! and a test fails when it is stale. Field doc comments become the CRD descriptions that
//! `kubectl explain` prints; each names the Kasm setting or property it re-creates.

pub mod duration;
pub mod mappings;
pub mod run_config;
pub mod v1alpha1;

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use schemars::{Schema, SchemaGenerator, json_schema};

pub use duration::{Duration, DurationError};
pub use mappings::{FileMapping, FileMappingContent, VolumeMapping, VolumeMappingSource};
pub use run_config::{ContainerOverrides, PodOverrides, ResourceOverrides, RunConfig};

/// The API group of every Cubicle kind.
pub const GROUP: &str = "cubicle.dev";

/// The only API version so far.
pub const VERSION: &str = "v1alpha1";

/// The `kubectl get <category>` name shared by every Cubicle kind.
pub const CATEGORY: &str = "cubicle";

/// Every CustomResourceDefinition of the API, sorted by name (`<plural>.cubicle.dev`).
pub fn all() -> Vec<CustomResourceDefinition> {
    use v1alpha1::*;
    let mut crds = vec![
        User::crd(),
        Group::crd(),
        Workspace::crd(),
        ServerPool::crd(),
        Server::crd(),
        ServerAssignment::crd(),
        Session::crd(),
        UserPreferences::crd(),
    ];
    crds.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    crds.into_iter().map(unwrap_descriptions).collect()
}

/// Joins the lines of each paragraph of every description (doc comments are wrapped at 100
/// columns; `kubectl explain` wraps text itself). Paragraph breaks and lines that start a list
/// item or are indented (as in the Kubernetes types' "Possible enum values" lists) are kept.
fn unwrap_descriptions(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn join_lines(text: &str) -> String {
        let chars: Vec<char> = text.chars().collect();
        let mut out = String::with_capacity(text.len());
        for (i, &c) in chars.iter().enumerate() {
            let prev = i.checked_sub(1).map(|j| chars[j]);
            let next = chars.get(i + 1).copied();
            let soft_break = c == '\n'
                && prev.is_some_and(|p| p != '\n')
                && next.is_some_and(|n| !matches!(n, '\n' | ' ' | '\t' | '-' | '*'));
            out.push(if soft_break { ' ' } else { c });
        }
        out
    }
    fn walk(v: &mut serde_json::Value, in_properties: bool) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    if k == "description" && !in_properties {
                        if let serde_json::Value::String(s) = v {
                            *s = join_lines(s);
                        }
                    } else {
                        walk(v, k == "properties");
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| walk(v, false)),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(&crd).expect("a CRD serializes");
    walk(&mut value, false);
    serde_json::from_value(value).expect("a CRD deserializes")
}

/// A schemars transform that removes a type's own description, so that the description of the
/// field using it is kept (kube's `Option<enum>` rewrite would otherwise replace the field's
/// description with the enum's).
pub fn drop_description(schema: &mut Schema) {
    schema.remove("description");
}

/// The file name of a CRD in `crds/`: `<plural>.<group>.yaml`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!(
        "{}.yaml",
        crd.metadata
            .name
            .as_deref()
            .expect("a generated CRD has a name")
    )
}

const HEADER: &str = "# Generated from the Rust types in src/crd by `cubicle crds`; do not edit.\n";

/// One CRD as a YAML document, with a header comment. Deterministic: the same types always give
/// the same bytes (the schema's maps are ordered).
pub fn render_yaml(crd: &CustomResourceDefinition) -> String {
    let body = serde_yaml::to_string(crd).expect("a CRD serializes to YAML");
    format!("{HEADER}{body}")
}

/// Every CRD as one multi-document YAML stream (what `cubicle crds` prints).
pub fn render_all_yaml() -> String {
    all()
        .iter()
        .map(|crd| format!("---\n{}", render_yaml(crd)))
        .collect()
}

/// Writes one file per CRD into `dir` (created if missing) and removes files of Cubicle CRDs that
/// no longer exist. Returns the paths written.
pub fn write_dir(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let crds = all();
    let wanted: Vec<String> = crds.iter().map(file_name).collect();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(&format!(".{GROUP}.yaml")) && !wanted.contains(&name) {
            std::fs::remove_file(entry.path())?;
        }
    }
    let mut written = Vec::new();
    for crd in &crds {
        let path = dir.join(file_name(crd));
        let text = render_yaml(crd);
        // Leave an identical file untouched (keeps timestamps stable for build tools).
        if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            std::fs::write(&path, text)?;
        }
        written.push(path);
    }
    Ok(written)
}

/// Schema of a `conditions` list: standard `metav1.Condition`s, a list-map keyed by `type` so that
/// server-side apply merges conditions by type.
pub fn conditions_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "Standard conditions (Ready and kind-specific ones), one per type, merged by type.",
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "properties": {
                "lastTransitionTime": {
                    "description": "When the condition last changed status.",
                    "format": "date-time",
                    "type": "string"
                },
                "message": {
                    "description": "A human-readable explanation.",
                    "type": "string"
                },
                "observedGeneration": {
                    "description": "The .metadata.generation the condition was computed from.",
                    "type": "integer",
                    "format": "int64"
                },
                "reason": {
                    "description": "A CamelCase machine-readable reason.",
                    "type": "string"
                },
                "status": {
                    "description": "True, False or Unknown.",
                    "type": "string",
                    "enum": ["True", "False", "Unknown"]
                },
                "type": {
                    "description": "The condition type (CamelCase).",
                    "type": "string"
                }
            },
            "required": ["lastTransitionTime", "message", "reason", "status", "type"]
        }
    })
}

/// Schema of a value of any JSON type, kept as-is by the API server (used for the values in
/// `User.status.effectiveSettings`, which are as varied as the settings).
pub fn any_value_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "The effective value (any JSON type; absent when no one sets it and there is no default).",
        "x-kubernetes-preserve-unknown-fields": true,
        "nullable": true
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;

    #[test]
    fn every_kind_is_in_the_group_and_category() {
        let crds = all();
        assert_eq!(crds.len(), 8);
        let mut names: Vec<_> = crds.iter().map(|c| c.metadata.name.clone()).collect();
        names.sort();
        assert_eq!(
            names,
            crds.iter()
                .map(|c| c.metadata.name.clone())
                .collect::<Vec<_>>()
        );
        for crd in &crds {
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(crd.spec.scope, "Namespaced");
            assert_eq!(
                crd.spec.names.categories.as_deref(),
                Some(&[CATEGORY.to_string()][..])
            );
            assert!(
                crd.spec
                    .names
                    .short_names
                    .as_ref()
                    .is_some_and(|s| !s.is_empty())
            );
            let version = &crd.spec.versions[0];
            assert_eq!(version.name, VERSION);
            // The person's preferences have no status: nothing observes them.
            assert!(
                crd.spec.names.kind == "UserPreferences"
                    || version
                        .subresources
                        .as_ref()
                        .and_then(|s| s.status.as_ref())
                        .is_some(),
                "{:?} has a status subresource",
                crd.metadata.name
            );
        }
        assert_eq!(v1alpha1::Session::group(&()), GROUP);
        assert_eq!(v1alpha1::Session::version(&()), VERSION);
    }

    #[test]
    fn short_names_do_not_clash_with_each_other_or_built_ins() {
        // Short names and plurals of the core and common built-in APIs.
        const BUILT_IN: &[&str] = &[
            "cm", "cs", "csr", "cj", "crd", "crds", "deploy", "ds", "ep", "eps", "ev", "hpa",
            "ing", "limits", "netpol", "no", "ns", "pc", "pdb", "po", "psp", "pv", "pvc", "quota",
            "rc", "rs", "sa", "sc", "sts", "svc", "vac", "pods", "nodes", "secrets",
        ];
        let mut seen = std::collections::BTreeSet::new();
        for crd in all() {
            for s in crd.spec.names.short_names.unwrap_or_default() {
                assert!(
                    !BUILT_IN.contains(&s.as_str()),
                    "{s} clashes with a built-in"
                );
                assert!(seen.insert(s.clone()), "{s} used twice");
            }
        }
    }

    #[test]
    fn rendering_is_deterministic_and_has_no_schema_defaults() {
        let a = render_all_yaml();
        let b = render_all_yaml();
        assert_eq!(a, b);
        // Defaults would make objects read back differ from what was applied.
        for crd in all() {
            let json = serde_json::to_value(&crd).unwrap();
            assert_no_key(&json, "default", crd.metadata.name.as_deref().unwrap_or(""));
        }
    }

    /// Every Kasm group setting of seed 002 is findable by its Kasm name in the descriptions
    /// (`kubectl explain`), so people migrating can map them 1:1.
    #[test]
    fn every_kasm_group_setting_is_named_in_a_description() {
        const KASM: &[&str] = &[
            "allow_2fa_self_enrollment",
            "allow_kasm_audio",
            "allow_kasm_clipboard_down",
            "allow_kasm_clipboard_seamless",
            "allow_kasm_clipboard_up",
            "allow_kasm_delete",
            "allow_kasm_downloads",
            "allow_kasm_gamepad",
            "allow_kasm_microphone",
            "allow_kasm_webcam",
            "allow_kasm_printing",
            "allow_kasm_pause",
            "allow_kasm_sharing",
            "allow_kasm_stop",
            "allow_kasm_uploads",
            "allow_persistent_profile",
            "allow_point_of_presence",
            "allow_totp_two_factor",
            "allow_user_storage_mapping",
            "allow_webauthn_two_factor",
            "allow_zone_selection",
            "auto_add_local_users",
            "auto_login_to_kasm",
            "chat_history_messages",
            "control_panel.advanced_settings.show_game_mode",
            "control_panel.advanced_settings.show_ime_input_mode",
            "control_panel.advanced_settings.show_keyboard_controls",
            "control_panel.advanced_settings.show_pointer_lock",
            "control_panel.advanced_settings.show_prefer_local_cursor",
            "control_panel.show_fullscreen",
            "control_panel.show_delete_session",
            "control_panel.show_display_manager",
            "control_panel.show_logout",
            "control_panel.show_return_to_workspaces",
            "control_panel.show_streaming_quality",
            "dashboard_redirect",
            "default_image",
            "display_ui_errors",
            "enable_ui_server_logging",
            "idle_disconnect",
            "inject_ssh_keys",
            "kasm_audio_default_on",
            "kasm_ime_default_on",
            "keepalive_expiration",
            "keepalive_expiration_action",
            "keepalive_interval",
            "lock_sharing_video_mode",
            "max_kasms_per_user",
            "max_user_storage_mappings",
            "require_2fa",
            "run_config",
            "session_time_limit",
            "staged_session_language_and_timezone_preference_override",
            "usage_limit",
            "volume_mapping",
            "web_filter_policy",
        ];
        let text = serde_json::to_string(&v1alpha1::Group::crd()).unwrap();
        for name in KASM {
            assert!(
                text.contains(&format!("Kasm: `{name}`")),
                "no description names Kasm's `{name}`"
            );
        }
    }

    fn assert_no_key(v: &serde_json::Value, key: &str, ctx: &str) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    // `properties` maps field names to schemas: a field may be called `default`.
                    if k == key && !ctx.ends_with(".properties") {
                        panic!("schema default at {ctx}");
                    }
                    assert_no_key(v, key, &format!("{ctx}.{k}"));
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| assert_no_key(v, key, ctx)),
            _ => {}
        }
    }
}
