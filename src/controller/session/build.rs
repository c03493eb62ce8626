//! Pure builders of a session's children: the session pod and the profile claim.
//!
//! Nothing here touches the network or the clock; the reconcile shell passes everything in.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapProjection, Container, DownwardAPIVolumeFile,
    DownwardAPIVolumeSource, EmptyDirVolumeSource, EnvVar, KeyToPath, NodeAffinity, NodeSelector,
    NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec,
    ProjectedVolumeSource, ResourceRequirements, SeccompProfile, SecretProjection, SecurityContext,
    Toleration, Volume, VolumeMount, VolumeProjection, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

// `pod_name` stays reachable here for the bench (src/bench), which names pods through it.
use super::children::pod_meta;
pub use crate::controller::contract::pod_name;
use crate::controller::contract::{
    FILE_ANNOTATION_PREFIX, HOSTNAME_LABEL, LAUNCH_ANNOTATION, OWNED_POD_LABELS, PROFILE_LABEL,
    RESET_BY_ANNOTATION, SETTINGS_ANNOTATION, ZONE_LABEL, stable_hash,
};
use crate::crd::v1alpha1::{ProfileClaimTemplate, Session, Workspace};
use crate::crd::{FileMapping, RunConfig, VolumeMapping};

/// Where the effective settings file is mounted in the session container.
pub const SETTINGS_DIR: &str = "/etc/cubicle";
/// The user id Kasm images run as.
pub const SESSION_UID: i64 = 1000;

/// What a launch decided, carried on the pod.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LaunchRecord {
    /// The Server chosen, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// The profile outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<crate::crd::v1alpha1::ProfileStatus>,
}

/// Reads a pod's launch record (empty when absent or unreadable).
pub fn launch_record(pod: &impl Resource) -> LaunchRecord {
    parse_launch_record(pod.annotations().get(LAUNCH_ANNOTATION).map(String::as_str))
}

/// Reads a launch record annotation's value (empty when absent or unreadable); a cached pod's
/// is [`super::super::cached::CachedPod::launch_annotation`].
pub fn parse_launch_record(value: Option<&str>) -> LaunchRecord {
    value
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

/// Where a session runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// No pool: the scheduler chooses, optionally within one zone.
    Scheduler {
        /// Required zone.
        zone: Option<String>,
    },
    /// A Server of a pool: pinned to its node.
    Server {
        /// Server name.
        server: String,
        /// Its node.
        node: String,
        /// Its zone, if known.
        zone: Option<String>,
    },
    /// An autoscaled pool: its node selector, optionally within one zone.
    Autoscale {
        /// The pool's node selector.
        node_selector: BTreeMap<String, String>,
        /// Required zone.
        zone: Option<String>,
    },
    /// Pinned to one node (where the user's single-node profile claim is mounted), with the
    /// pool's node selector if any.
    OnNode {
        /// The node.
        node: String,
        /// The pool's node selector (empty without an autoscaled pool).
        node_selector: BTreeMap<String, String>,
        /// Required zone.
        zone: Option<String>,
    },
}

/// How the profile is mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProfileMount {
    /// A per-user claim.
    Claim {
        /// Claim name.
        claim: String,
        /// Mount path in the container.
        mount_path: String,
    },
    /// A per-user sub-path of a shared claim.
    SubPath {
        /// The shared claim.
        claim: String,
        /// The user's sub-path.
        sub_path: String,
        /// Mount path in the container.
        mount_path: String,
        /// When set, an init container renames an existing sub-path to this name first (Reset).
        archive_to: Option<String>,
    },
}

/// Everything the pod needs, resolved by the reconcile shell.
#[derive(Debug, Clone)]
pub struct PodInputs<'a> {
    /// The session (owner).
    pub session: &'a Session,
    /// The User object's name.
    pub user: &'a str,
    /// The login name (`KASM_USER`).
    pub username: &'a str,
    /// The stable user id (`KASM_USER_ID`).
    pub user_id: &'a str,
    /// The workspace.
    pub workspace: &'a Workspace,
    /// Where it runs.
    pub placement: &'a Placement,
    /// The profile, if mounted.
    pub profile: Option<&'a ProfileMount>,
    /// Expose `KASM_USER`/`KASM_USER_ID`.
    pub expose_user_env: bool,
    /// The user's SSH key Secret, when the group injects SSH keys.
    pub ssh_keys_secret: Option<&'a str>,
    /// Volume mappings merged from the groups (the workspace's are added here).
    pub group_volume_mappings: &'a [VolumeMapping],
    /// File mappings after precedence (User > Group > Workspace), one per destination.
    pub file_mappings: &'a [FileMapping],
    /// The group's run config (wins over the workspace's).
    pub group_run_config: Option<&'a RunConfig>,
    /// Effective settings as JSON, delivered to the streaming software as a file.
    pub settings_json: &'a str,
    /// Paused: the pod carries the paused access label.
    pub paused: bool,
    /// What the launch decided.
    pub launch: &'a LaunchRecord,
}

fn owner_ref(session: &Session) -> OwnerReference {
    session
        .controller_owner_ref(&())
        .expect("a stored Session has a name and uid")
}

/// Replaces `{username}` and `{user_id}` in a template.
pub fn render_template(template: &str, username: &str, user_id: &str) -> String {
    template
        .replace("{username}", username)
        .replace("{user_id}", user_id)
}

/// A DNS-1123 subdomain name (≤ 253) for a rendered claim-name template: lowercased, invalid
/// characters replaced; shortened with a stable hash when too long.
pub fn dns_name(s: &str) -> String {
    let lower: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = lower
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string();
    if !trimmed.is_empty() && trimmed.len() <= 253 && trimmed == s {
        return trimmed;
    }
    let h = format!("{:08x}", stable_hash(s) as u32);
    let keep: String = trimmed.chars().take(240).collect();
    let keep = keep.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if keep.is_empty() {
        format!("profile-{h}")
    } else {
        format!("{keep}-{h}")
    }
}

/// A DNS-1123 label (≤ 63 characters) for a rendered hostname template.
pub fn dns_label(s: &str) -> String {
    let lower: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = lower.trim_matches('-').to_string();
    if !trimmed.is_empty() && trimmed.len() <= 63 {
        return trimmed;
    }
    let h = format!("{:08x}", stable_hash(s) as u32);
    let keep: String = trimmed.chars().take(54).collect();
    let keep = keep.trim_matches('-');
    if keep.is_empty() {
        format!("session-{h}")
    } else {
        format!("{keep}-{h}")
    }
}

/// The profile claim for a user, from the workspace's template. No owner reference: a profile
/// outlives every session, and nothing the operator owns can take it down with it.
pub fn profile_claim(
    name: &str,
    base: &str,
    template: &ProfileClaimTemplate,
    user: &str,
    workspace: &str,
    namespace: &str,
    reset_by: Option<&str>,
) -> PersistentVolumeClaim {
    let mut labels = super::children::base_labels(user, workspace);
    labels.insert(PROFILE_LABEL.into(), profile_key(base));
    let annotations =
        reset_by.map(|uid| BTreeMap::from([(RESET_BY_ANNOTATION.to_string(), uid.to_string())]));
    let access_modes = if template.access_modes.is_empty() {
        vec!["ReadWriteOnce".to_string()]
    } else {
        template
            .access_modes
            .iter()
            .map(|m| {
                serde_json::to_value(m)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            })
            .collect()
    };
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels),
            annotations,
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(access_modes),
            storage_class_name: template.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    template.size.clone(),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The label value identifying a profile (all generations of it) by its base name.
pub fn profile_key(base: &str) -> String {
    format!("p-{:016x}", stable_hash(base))
}

fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        run_as_non_root: Some(true),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

/// Appends `add` to `base`, replacing variables of the same name.
fn merge_env(base: &mut Vec<EnvVar>, add: &[EnvVar]) {
    for e in add {
        base.retain(|b| b.name != e.name);
        base.push(e.clone());
    }
}

fn file_mode(m: &FileMapping) -> i32 {
    if m.executable.unwrap_or(false) {
        0o555
    } else {
        0o444
    }
}

/// A pod's parts as they are put together.
#[derive(Default)]
struct Parts {
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    volumes: Vec<Volume>,
    mounts: Vec<VolumeMount>,
    init_containers: Vec<Container>,
    envs: Vec<EnvVar>,
    requests: BTreeMap<String, Quantity>,
    limits: BTreeMap<String, Quantity>,
    node_selector: BTreeMap<String, String>,
    tolerations: Vec<Toleration>,
    /// The projected files volume's sources.
    sources: Vec<VolumeProjection>,
    /// The writable files: (item, destination).
    writable: Vec<(String, String)>,
}

/// The session pod.
pub fn pod(i: &PodInputs<'_>) -> Pod {
    let s = i.session;
    let ws = &i.workspace.spec;
    let server = match i.placement {
        Placement::Server { server, .. } => Some(server.as_str()),
        _ => None,
    };
    // The labels and annotations the executor keeps in shape (children::pod_meta).
    let owned = pod_meta(s, server, i.paused);
    let mut p = Parts {
        labels: owned.labels.clone(),
        annotations: BTreeMap::from([
            (SETTINGS_ANNOTATION.to_string(), i.settings_json.to_string()),
            (
                LAUNCH_ANNOTATION.to_string(),
                serde_json::to_string(i.launch).unwrap_or_default(),
            ),
        ]),
        ..Parts::default()
    };
    settings_file(&mut p);
    profile_volume(&mut p, i);
    volume_mappings(&mut p, i);
    file_mappings(&mut p, i);
    ssh_keys(&mut p, i);
    files_volumes(&mut p, i);
    // Environment: workspace, then KASM_USER/KASM_USER_ID, then run configs (group last).
    p.envs = ws.env.clone();
    if i.expose_user_env {
        merge_env(
            &mut p.envs,
            &[env("KASM_USER", i.username), env("KASM_USER_ID", i.user_id)],
        );
    }
    workspace_resources(&mut p, i);
    let mut container = Container {
        name: "session".into(),
        image: Some(ws.image.clone()),
        image_pull_policy: ws
            .image_pull_policy
            .and_then(|p| serde_json::to_value(p).ok())
            .and_then(|v| v.as_str().map(String::from)),
        security_context: Some(restricted_container_security()),
        ..Default::default()
    };
    let mut pod_sc = PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(SESSION_UID),
        run_as_group: Some(SESSION_UID),
        fs_group: Some(SESSION_UID),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    };
    let mut spec = PodSpec::default();
    let shm = run_configs(&mut p, i, &mut container, &mut pod_sc, &mut spec);
    shm_volume(&mut p, shm);
    // The owned labels and annotations always win over run-config ones.
    p.labels
        .retain(|k, _| !OWNED_POD_LABELS.contains(&k.as_str()));
    p.labels.extend(owned.labels);
    p.annotations.extend(owned.annotations);
    let required = placement(&mut p, i);
    let Parts {
        labels,
        annotations,
        volumes,
        mounts,
        init_containers,
        envs,
        requests,
        limits,
        node_selector,
        tolerations,
        ..
    } = p;
    container.env = (!envs.is_empty()).then_some(envs);
    container.volume_mounts = Some(mounts);
    container.resources =
        (!requests.is_empty() || !limits.is_empty()).then(|| ResourceRequirements {
            requests: (!requests.is_empty()).then_some(requests),
            limits: (!limits.is_empty()).then_some(limits),
            ..Default::default()
        });
    spec.containers = vec![container];
    spec.init_containers = (!init_containers.is_empty()).then(|| {
        init_containers
            .into_iter()
            .map(|mut c| {
                c.resources = None;
                c
            })
            .collect()
    });
    spec.volumes = Some(volumes);
    spec.security_context = Some(pod_sc);
    spec.automount_service_account_token = Some(false);
    spec.enable_service_links = Some(false);
    spec.restart_policy = Some("Always".into());
    spec.node_selector = (!node_selector.is_empty()).then_some(node_selector);
    spec.tolerations = (!tolerations.is_empty()).then_some(tolerations);
    spec.image_pull_secrets = (!ws.image_pull_secrets.is_empty()).then(|| {
        ws.image_pull_secrets
            .iter()
            .map(|n| k8s_openapi::api::core::v1::LocalObjectReference { name: n.clone() })
            .collect()
    });
    spec.affinity = affinity(required);
    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(s)),
            namespace: s.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![owner_ref(s)]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// The effective settings, delivered as a file through the downward API (no extra object).
fn settings_file(p: &mut Parts) {
    p.volumes.push(Volume {
        name: "cubicle-settings".into(),
        downward_api: Some(DownwardAPIVolumeSource {
            items: Some(vec![DownwardAPIVolumeFile {
                path: "settings.json".into(),
                field_ref: Some(ObjectFieldSelector {
                    field_path: format!("metadata.annotations['{SETTINGS_ANNOTATION}']"),
                    api_version: None,
                }),
                mode: Some(0o444),
                resource_field_ref: None,
            }]),
            default_mode: None,
        }),
        ..Default::default()
    });
    p.mounts.push(VolumeMount {
        name: "cubicle-settings".into(),
        mount_path: SETTINGS_DIR.into(),
        read_only: Some(true),
        ..Default::default()
    });
}

/// The persistent profile's volume and mount (and the reset of a shared one).
fn profile_volume(p: &mut Parts, i: &PodInputs<'_>) {
    let ws = &i.workspace.spec;
    match i.profile {
        Some(ProfileMount::Claim { claim, mount_path }) => {
            p.volumes.push(claim_volume("profile", claim, false));
            p.mounts.push(VolumeMount {
                name: "profile".into(),
                mount_path: mount_path.clone(),
                ..Default::default()
            });
        }
        Some(ProfileMount::SubPath {
            claim,
            sub_path,
            mount_path,
            archive_to,
        }) => {
            p.volumes.push(claim_volume("profile", claim, false));
            p.mounts.push(VolumeMount {
                name: "profile".into(),
                mount_path: mount_path.clone(),
                sub_path: Some(sub_path.clone()),
                ..Default::default()
            });
            if let Some(archive) = archive_to {
                // Reset on a shared volume: rename the old directory (never delete it), then
                // start fresh. Runs with the workspace image, which has a shell.
                p.init_containers.push(Container {
                    name: "profile-reset".into(),
                    image: Some(ws.image.clone()),
                    command: Some(vec!["/bin/sh".into(), "-c".into(),
                        "set -eu; if [ -e \"/profiles/$OLD\" ]; then mv \"/profiles/$OLD\" \"/profiles/$NEW\"; fi; mkdir -p \"/profiles/$OLD\"".into()]),
                    env: Some(vec![env("OLD", sub_path), env("NEW", archive)]),
                    volume_mounts: Some(vec![VolumeMount {
                        name: "profile".into(),
                        mount_path: "/profiles".into(),
                        ..Default::default()
                    }]),
                    security_context: Some(restricted_container_security()),
                    ..Default::default()
                });
            }
        }
        None => {}
    }
}

/// Volume mappings: the groups' (merged), then the workspace's.
fn volume_mappings(p: &mut Parts, i: &PodInputs<'_>) {
    let ws = &i.workspace.spec;
    for (n, vm) in i
        .group_volume_mappings
        .iter()
        .chain(ws.volume_mappings.iter())
        .enumerate()
    {
        let vol_name = format!("vm-{n}");
        let src = &vm.source;
        p.volumes.push(Volume {
            name: vol_name.clone(),
            persistent_volume_claim: src.persistent_volume_claim.clone(),
            nfs: src.nfs.clone(),
            config_map: src.config_map.clone(),
            secret: src.secret.clone(),
            empty_dir: src.empty_dir.clone(),
            host_path: src.host_path.clone(),
            ..Default::default()
        });
        p.mounts.push(VolumeMount {
            name: vol_name,
            mount_path: vm.mount_path.clone(),
            sub_path: vm.sub_path.clone(),
            read_only: vm.read_only,
            ..Default::default()
        });
    }
}

/// File mappings: sources of one projected volume; each file mounted at its destination via
/// subPath. Writable files are copied into an emptyDir by an init container first.
fn file_mappings(p: &mut Parts, i: &PodInputs<'_>) {
    for (n, fm) in i.file_mappings.iter().enumerate() {
        let item = format!("f{n}");
        let mode = Some(file_mode(fm));
        if let Some(text) = &fm.content.inline {
            let key = format!("{FILE_ANNOTATION_PREFIX}{n}");
            p.annotations.insert(key.clone(), text.clone());
            p.sources.push(VolumeProjection {
                downward_api: Some(k8s_openapi::api::core::v1::DownwardAPIProjection {
                    items: Some(vec![DownwardAPIVolumeFile {
                        path: item.clone(),
                        field_ref: Some(ObjectFieldSelector {
                            field_path: format!("metadata.annotations['{key}']"),
                            api_version: None,
                        }),
                        mode,
                        resource_field_ref: None,
                    }]),
                }),
                ..Default::default()
            });
        } else if let Some(r) = &fm.content.config_map_key_ref {
            p.sources.push(VolumeProjection {
                config_map: Some(ConfigMapProjection {
                    name: r.name.clone(),
                    items: Some(vec![KeyToPath {
                        key: r.key.clone(),
                        path: item.clone(),
                        mode,
                    }]),
                    optional: r.optional,
                }),
                ..Default::default()
            });
        } else if let Some(r) = &fm.content.secret_key_ref {
            p.sources.push(VolumeProjection {
                secret: Some(SecretProjection {
                    name: r.name.clone(),
                    items: Some(vec![KeyToPath {
                        key: r.key.clone(),
                        path: item.clone(),
                        mode,
                    }]),
                    optional: r.optional,
                }),
                ..Default::default()
            });
        }
        if fm.writable.unwrap_or(false) {
            p.writable.push((item.clone(), fm.destination.clone()));
            p.mounts.push(VolumeMount {
                name: "cubicle-files-rw".into(),
                mount_path: fm.destination.clone(),
                sub_path: Some(item),
                ..Default::default()
            });
        } else {
            p.mounts.push(VolumeMount {
                name: "cubicle-files".into(),
                mount_path: fm.destination.clone(),
                sub_path: Some(item),
                read_only: Some(true),
                ..Default::default()
            });
        }
    }
}

/// SSH keys, when the group injects them: projected read-only into ~/.ssh.
fn ssh_keys(p: &mut Parts, i: &PodInputs<'_>) {
    if let Some(secret) = i.ssh_keys_secret {
        let home = i
            .profile
            .map(|p| match p {
                ProfileMount::Claim { mount_path, .. }
                | ProfileMount::SubPath { mount_path, .. } => mount_path.clone(),
            })
            .unwrap_or_else(|| "/home/kasm-user".into());
        for (key, mode) in [("id_rsa", 0o400), ("id_rsa.pub", 0o444)] {
            let item = format!("ssh-{key}");
            p.sources.push(VolumeProjection {
                secret: Some(SecretProjection {
                    name: secret.into(),
                    items: Some(vec![KeyToPath {
                        key: key.into(),
                        path: item.clone(),
                        mode: Some(mode),
                    }]),
                    optional: Some(key == "id_rsa.pub"),
                }),
                ..Default::default()
            });
            p.mounts.push(VolumeMount {
                name: "cubicle-files".into(),
                mount_path: format!("{}/.ssh/{key}", home.trim_end_matches('/')),
                sub_path: Some(item),
                read_only: Some(true),
                ..Default::default()
            });
        }
    }
}

/// The projected files volume, and the writable copies with the init container that makes them.
fn files_volumes(p: &mut Parts, i: &PodInputs<'_>) {
    let ws = &i.workspace.spec;
    if !p.sources.is_empty() {
        p.volumes.push(Volume {
            name: "cubicle-files".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(std::mem::take(&mut p.sources)),
                default_mode: Some(0o444),
            }),
            ..Default::default()
        });
    }
    if !p.writable.is_empty() {
        p.volumes.push(Volume {
            name: "cubicle-files-rw".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        });
        let script = p
            .writable
            .iter()
            .map(|(item, _)| format!("cp /src/{item} /rw/{item} && chmod u+w /rw/{item}"))
            .collect::<Vec<_>>()
            .join(" && ");
        p.init_containers.push(Container {
            name: "file-mappings".into(),
            image: Some(ws.image.clone()),
            command: Some(vec![
                "/bin/sh".into(),
                "-c".into(),
                format!("set -eu; {script}"),
            ]),
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "cubicle-files".into(),
                    mount_path: "/src".into(),
                    read_only: Some(true),
                    ..Default::default()
                },
                VolumeMount {
                    name: "cubicle-files-rw".into(),
                    mount_path: "/rw".into(),
                    ..Default::default()
                },
            ]),
            security_context: Some(restricted_container_security()),
            ..Default::default()
        });
    }
}

/// Resources from the workspace.
fn workspace_resources(p: &mut Parts, i: &PodInputs<'_>) {
    let ws = &i.workspace.spec;
    if let Some(r) = &ws.resources {
        if let Some(c) = &r.cores {
            p.requests.insert("cpu".to_string(), c.clone());
            p.limits.insert("cpu".to_string(), c.clone());
        }
        if let Some(m) = &r.memory {
            p.requests.insert("memory".to_string(), m.clone());
            p.limits.insert("memory".to_string(), m.clone());
        }
        if let Some(g) = r.gpus.filter(|g| *g > 0) {
            p.limits
                .insert("nvidia.com/gpu".to_string(), Quantity(g.to_string()));
        }
    }
}

/// The run configs applied to the pod and its container; returns the shared-memory size.
fn run_configs(
    p: &mut Parts,
    i: &PodInputs<'_>,
    container: &mut Container,
    pod_sc: &mut PodSecurityContext,
    spec: &mut PodSpec,
) -> Option<Quantity> {
    // Run config: the workspace's, then the group's on top (the group wins).
    let ws = &i.workspace.spec;
    let run_configs: Vec<&RunConfig> = ws.run_config.iter().chain(i.group_run_config).collect();
    let mut shm: Option<Quantity> = None;
    for rc in &run_configs {
        if let Some(rp) = &rc.pod {
            p.node_selector.extend(rp.node_selector.clone());
            p.tolerations.extend(rp.tolerations.iter().cloned());
            if rp.priority_class_name.is_some() {
                spec.priority_class_name = rp.priority_class_name.clone();
            }
            if rp.runtime_class_name.is_some() {
                spec.runtime_class_name = rp.runtime_class_name.clone();
            }
            if let Some(h) = &rp.hostname {
                // Templates work here as in profile paths; the result must be a DNS label.
                let h = render_template(h, i.username, i.user_id);
                spec.hostname = Some(dns_label(&h));
            }
            if !rp.host_aliases.is_empty() {
                spec.host_aliases = Some(rp.host_aliases.clone());
            }
            if rp.dns_config.is_some() {
                spec.dns_config = rp.dns_config.clone();
            }
            if let Some(sc) = &rp.security_context {
                *pod_sc = sc.clone();
            }
            if rp.shm_size.is_some() {
                shm = rp.shm_size.clone();
            }
            p.labels.extend(rp.labels.clone());
            p.annotations.extend(rp.annotations.clone());
        }
        if let Some(c) = &rc.container {
            merge_env(&mut p.envs, &c.env);
            if let Some(sc) = &c.security_context {
                container.security_context = Some(sc.clone());
            }
            if c.working_dir.is_some() {
                container.working_dir = c.working_dir.clone();
            }
            if c.command.is_some() {
                container.command = c.command.clone();
            }
            if c.args.is_some() {
                container.args = c.args.clone();
            }
            if let Some(r) = &c.resources {
                p.requests.extend(r.requests.clone());
                p.limits.extend(r.limits.clone());
            }
        }
    }
    shm
}

/// A memory-backed /dev/shm of the size a run config asks for.
fn shm_volume(p: &mut Parts, shm: Option<Quantity>) {
    if let Some(size) = shm {
        p.volumes.push(Volume {
            name: "dshm".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(size),
            }),
            ..Default::default()
        });
        p.mounts.push(VolumeMount {
            name: "dshm".into(),
            mount_path: "/dev/shm".into(),
            ..Default::default()
        });
    }
}

/// Placement: the node selector, and the required node terms it returns.
fn placement(p: &mut Parts, i: &PodInputs<'_>) -> Vec<NodeSelectorRequirement> {
    let mut required: Vec<NodeSelectorRequirement> = Vec::new();
    let zone = match i.placement {
        Placement::Scheduler { zone } => zone.clone(),
        Placement::Server { node, zone, .. } => {
            required.push(NodeSelectorRequirement {
                key: HOSTNAME_LABEL.into(),
                operator: "In".into(),
                values: Some(vec![node.clone()]),
            });
            zone.clone()
        }
        Placement::Autoscale {
            node_selector: sel,
            zone,
        } => {
            p.node_selector.extend(sel.clone());
            zone.clone()
        }
        Placement::OnNode {
            node,
            node_selector: sel,
            zone,
        } => {
            required.push(NodeSelectorRequirement {
                key: HOSTNAME_LABEL.into(),
                operator: "In".into(),
                values: Some(vec![node.clone()]),
            });
            p.node_selector.extend(sel.clone());
            zone.clone()
        }
    };
    if let Some(z) = zone {
        required.push(NodeSelectorRequirement {
            key: ZONE_LABEL.into(),
            operator: "In".into(),
            values: Some(vec![z]),
        });
    }

    required
}

/// The node affinity that requires `required`, if any.
fn affinity(required: Vec<NodeSelectorRequirement>) -> Option<Affinity> {
    (!required.is_empty()).then(|| Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(required),
                    match_fields: None,
                }],
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn claim_volume(name: &str, claim: &str, read_only: bool) -> Volume {
    Volume {
        name: name.into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.into(),
            read_only: read_only.then_some(true),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::contract::label_value;
    use crate::crd::FileMappingContent;

    fn session() -> Session {
        crate::controller::fixtures::session("s1", "alice", "desktop")
    }

    fn workspace(extra: serde_json::Value) -> Workspace {
        let mut spec = serde_json::json!({"image": "example.invalid/desktop:1",
            "resources": {"cores": "2", "memory": "4Gi", "gpus": 1}});
        if let serde_json::Value::Object(m) = extra {
            for (k, v) in m {
                spec[k] = v;
            }
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "cubicle.dev/v1alpha1", "kind": "Workspace",
            "metadata": {"name": "desktop", "namespace": "ns"}, "spec": spec
        }))
        .unwrap()
    }

    fn build(
        ws: &Workspace,
        profile: Option<&ProfileMount>,
        files: &[FileMapping],
        ssh: Option<&str>,
        group_rc: Option<&RunConfig>,
    ) -> Pod {
        let s = session();
        let placement = Placement::Server {
            server: "ws-a".into(),
            node: "node-a".into(),
            zone: Some("zone-a".into()),
        };
        let record = LaunchRecord {
            server: Some("ws-a".into()),
            profile: None,
        };
        pod(&PodInputs {
            session: &s,
            user: "alice",
            username: "alice",
            user_id: "id-1",
            workspace: ws,
            placement: &placement,
            profile,
            expose_user_env: true,
            ssh_keys_secret: ssh,
            group_volume_mappings: &[],
            file_mappings: files,
            group_run_config: group_rc,
            settings_json: "{\"allowKasmStop\":true}",
            paused: false,
            launch: &record,
        })
    }

    #[test]
    fn the_pod_is_restricted_owned_and_mounts_no_token() {
        let p = build(&workspace(serde_json::json!({})), None, &[], None, None);
        let spec = p.spec.as_ref().unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        let psc = spec.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let c = &spec.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        let owner = &p.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller),
            ("Session", Some(true))
        );
        // Pinned to the server's node and zone; resources from the workspace.
        let terms = &spec
            .affinity
            .as_ref()
            .unwrap()
            .node_affinity
            .as_ref()
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()
            .node_selector_terms[0];
        let keys: Vec<_> = terms
            .match_expressions
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.key.as_str())
            .collect();
        assert_eq!(keys, [HOSTNAME_LABEL, ZONE_LABEL]);
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits["nvidia.com/gpu"].0, "1");
        assert_eq!(limits["memory"].0, "4Gi");
        // KASM_USER/KASM_USER_ID and the settings file.
        let env: Vec<_> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_deref()))
            .collect();
        assert!(
            env.contains(&("KASM_USER", Some("alice")))
                && env.contains(&("KASM_USER_ID", Some("id-1")))
        );
        assert_eq!(
            p.annotations()[SETTINGS_ANNOTATION],
            "{\"allowKasmStop\":true}"
        );
        assert!(
            c.volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .any(|m| m.mount_path == SETTINGS_DIR)
        );
        assert_eq!(launch_record(&p).server.as_deref(), Some("ws-a"));
    }

    #[test]
    fn a_shared_volume_reset_renames_the_old_profile_in_an_init_container() {
        let mount = ProfileMount::SubPath {
            claim: "homes".into(),
            sub_path: "profiles/alice".into(),
            mount_path: "/home/kasm-user".into(),
            archive_to: Some("profiles/alice.archived-100".into()),
        };
        let p = build(
            &workspace(serde_json::json!({})),
            Some(&mount),
            &[],
            None,
            None,
        );
        let spec = p.spec.unwrap();
        let init = &spec.init_containers.as_ref().unwrap()[0];
        assert_eq!(init.name, "profile-reset");
        let script = &init.command.as_ref().unwrap()[2];
        assert!(
            script.contains("mv") && !script.contains("rm "),
            "archives, never deletes: {script}"
        );
        let env: Vec<_> = init
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.value.clone().unwrap())
            .collect();
        assert_eq!(env, ["profiles/alice", "profiles/alice.archived-100"]);
        let m = spec.containers[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "profile")
            .unwrap();
        assert_eq!(m.sub_path.as_deref(), Some("profiles/alice"));
        // Without a reset there is no init container.
        let plain = ProfileMount::SubPath {
            claim: "homes".into(),
            sub_path: "profiles/alice".into(),
            mount_path: "/home/kasm-user".into(),
            archive_to: None,
        };
        assert!(
            build(
                &workspace(serde_json::json!({})),
                Some(&plain),
                &[],
                None,
                None
            )
            .spec
            .unwrap()
            .init_containers
            .is_none()
        );
    }

    #[test]
    fn file_mappings_ssh_keys_and_run_config_land_in_the_pod() {
        let files = vec![
            FileMapping {
                destination: "/etc/motd".into(),
                content: FileMappingContent {
                    inline: Some("hi".into()),
                    ..Default::default()
                },
                writable: None,
                executable: Some(true),
                name: None,
                description: None,
            },
            FileMapping {
                destination: "/home/kasm-user/notes.txt".into(),
                content: FileMappingContent {
                    inline: Some("x".into()),
                    ..Default::default()
                },
                writable: Some(true),
                executable: None,
                name: None,
                description: None,
            },
        ];
        let group_rc: RunConfig = serde_json::from_value(serde_json::json!({
            "pod": {"nodeSelector": {"gpu": "yes"}, "shmSize": "1Gi", "hostname": "desk-{username}"},
            "container": {"env": [{"name": "TZ", "value": "UTC"}]}
        }))
        .unwrap();
        let ws = workspace(
            serde_json::json!({"env": [{"name": "TZ", "value": "Europe/Paris"}],
            "runConfig": {"pod": {"nodeSelector": {"gpu": "no", "disk": "ssd"}}}}),
        );
        let p = build(&ws, None, &files, Some("alice-ssh"), Some(&group_rc));
        let spec = p.spec.unwrap();
        let c = &spec.containers[0];
        let mounts = c.volume_mounts.as_ref().unwrap();
        let motd = mounts.iter().find(|m| m.mount_path == "/etc/motd").unwrap();
        assert_eq!(
            (motd.name.as_str(), motd.read_only),
            ("cubicle-files", Some(true))
        );
        let notes = mounts
            .iter()
            .find(|m| m.mount_path == "/home/kasm-user/notes.txt")
            .unwrap();
        assert_eq!(
            notes.name, "cubicle-files-rw",
            "writable files are copies in an emptyDir"
        );
        assert_eq!(
            spec.init_containers.as_ref().unwrap()[0].name,
            "file-mappings"
        );
        assert!(
            mounts
                .iter()
                .any(|m| m.mount_path == "/home/kasm-user/.ssh/id_rsa")
        );
        assert_eq!(
            p.metadata.annotations.as_ref().unwrap()["cubicle.dev/file-0"],
            "hi"
        );
        // Group run config wins over the workspace's; env merges by name with the group last.
        let sel = spec.node_selector.unwrap();
        assert_eq!((sel["gpu"].as_str(), sel["disk"].as_str()), ("yes", "ssd"));
        let tz: Vec<_> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .filter(|e| e.name == "TZ")
            .collect();
        assert_eq!(tz.len(), 1);
        assert_eq!(tz[0].value.as_deref(), Some("UTC"));
        assert!(mounts.iter().any(|m| m.mount_path == "/dev/shm"));
        assert_eq!(
            spec.hostname.as_deref(),
            Some("desk-alice"),
            "templates are rendered"
        );
    }

    #[test]
    fn names_and_labels_are_valid_and_stable() {
        assert_eq!(
            render_template("p-{username}-{user_id}", "bob", "42"),
            "p-bob-42"
        );
        assert_eq!(dns_name("profile-bob"), "profile-bob");
        let odd = dns_name("Profile_Bob@Example");
        assert!(
            odd.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.'),
            "{odd}"
        );
        assert_eq!(odd, dns_name("Profile_Bob@Example"), "stable");
        let long = "x".repeat(300);
        assert!(dns_name(&long).len() <= 253);
        assert!(label_value(&long).len() <= 63);
        assert_eq!(label_value("alice"), "alice");
        assert_ne!(profile_key("a"), profile_key("b"));
        assert_eq!(dns_label("desk-Alice_1"), "desk-alice-1");
        assert!(dns_label(&long).len() <= 63);
    }

    /// At most 63 of `[A-Za-z0-9-_.]`, alphanumeric at both ends (or empty).
    fn is_label_value(s: &str) -> bool {
        let alnum = |c: Option<char>| c.is_none_or(|c| c.is_ascii_alphanumeric());
        s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && alnum(s.chars().next())
            && alnum(s.chars().last())
    }

    proptest::proptest! {
        /// Any string gets a valid label value, itself when it already is one.
        #[test]
        fn label_values_are_valid_and_keep_valid_ones(s in "[a-zA-Z0-9._@ -]{0,70}") {
            let label = label_value(&s);
            proptest::prop_assert!(is_label_value(&label), "{label:?}");
            proptest::prop_assert_eq!(is_label_value(&s), label == s);
            proptest::prop_assert_eq!(label_value(&label), label.clone());
        }
    }
}
