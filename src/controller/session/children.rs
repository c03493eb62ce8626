//! The executor for a Session's children: the pod, the profile claim and the credentials Secret.
//!
//! Every pass brings every child the session owns to its desired form, idempotently, and writes
//! only what differs from what the caches show (a quiet resync writes nothing):
//!
//! - **Pod**: created if absent (a launch or a resume). Its *spec* (image, resources, volumes,
//!   placement, the settings and file annotations it projects) cannot change on a running pod:
//!   it is set only when the pod is created, and a changed spec reaches the session with its
//!   next pod (after a stop or an eviction). The operator never replaces a running pod on its
//!   own: that would restart the person's desktop. Its *owned metadata* (the labels
//!   [`OWNED_POD_LABELS`] and annotations [`OWNED_POD_ANNOTATIONS`], see [`pod_meta`]) is what a
//!   controller may change on a live pod: whenever it differs from the desired form (a pause or
//!   resume, a hand edit, a pod of an older build) it is restored in place, with one JSON merge
//!   patch of the owned keys (a merge patch, not a server-side apply: the pod was written by a
//!   create, so an apply could not remove an owned label it never applied, such as the access
//!   label on resume).
//! - **Profile claim**: created if absent; an archived one is labelled, never deleted. Not
//!   applied over: a claim's spec is immutable once bound, and its labels are read only here.
//! - **Credentials Secret** (immutable, and its value derived, so re-created the same): created
//!   if absent. The operator may create Secrets but not read them (least privilege), so its
//!   absence is learned from the pod: when the pod reports the Secret missing, or when the pod's
//!   owned metadata differs (a pod of an older build, whose [`CHILDREN_ANNOTATION`] is behind
//!   [`CHILDREN_VERSION`], or a hand edit). Every child is ensured *before* the pod's metadata
//!   is patched, so a crash in between repeats the ensure on the next pass.
//!
//! A child a newer version adds therefore reaches sessions already running: their pods carry an
//! older children version, the next pass creates the child and records the new version, and the
//! pod (its uid, its containers) is left as it is.

use crate::controller::error::Verb;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use super::credentials;
use super::plan::{Refusal, reasons};
use crate::controller::cached::CachedPod;
use crate::controller::contract::{
    ACCESS_LABEL, ACCESS_PAUSED, ARCHIVED_LABEL, CHILDREN_ANNOTATION, CHILDREN_VERSION, MANAGED_BY,
    MANAGED_BY_LABEL, NAME_LABEL, OWNED_POD_ANNOTATIONS, OWNED_POD_LABELS, SERVER_LABEL,
    SESSION_APP, SESSION_LABEL, USER_LABEL, WORKSPACE_LABEL, label_value, owned_digest,
};
use crate::controller::{Context, Error};
use crate::crd::v1alpha1::Session;

/// The labels and annotations the operator owns on a session pod, in their desired form.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodMeta {
    /// Owned labels (an owned key absent here is removed from the pod).
    pub labels: BTreeMap<String, String>,
    /// Owned annotations.
    pub annotations: BTreeMap<String, String>,
}

/// The labels shared by a session's pod and its profile claim.
pub fn base_labels(user: &str, workspace: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (NAME_LABEL.to_string(), SESSION_APP.to_string()),
        (USER_LABEL.to_string(), label_value(user)),
        (WORKSPACE_LABEL.to_string(), label_value(workspace)),
    ])
}

/// The owned metadata of the session's pod: placed on `server` (a pool's server, if any), and
/// with access cut when `paused`.
pub fn pod_meta(session: &Session, server: Option<&str>, paused: bool) -> PodMeta {
    let mut labels = base_labels(&session.spec.user, &session.spec.workspace);
    labels.insert(SESSION_LABEL.into(), label_value(&session.name_any()));
    if let Some(server) = server {
        labels.insert(SERVER_LABEL.into(), label_value(server));
    }
    if paused {
        labels.insert(ACCESS_LABEL.into(), ACCESS_PAUSED.into());
    }
    let annotations = BTreeMap::from([(
        CHILDREN_ANNOTATION.to_string(),
        CHILDREN_VERSION.to_string(),
    )]);
    PodMeta {
        labels,
        annotations,
    }
}

/// The merge patch that brings a pod's owned metadata to `desired`, or None when nothing owned
/// differs (compared by digest, so the cache need not hold the labels themselves).
pub fn pod_patch(observed: &CachedPod, desired: &PodMeta) -> Option<Value> {
    let want = owned_digest(Some(&desired.labels), Some(&desired.annotations));
    if observed.owned_digest() == want {
        return None;
    }
    let pick = |keys: &[&str], from: &BTreeMap<String, String>| -> serde_json::Map<String, Value> {
        keys.iter()
            .map(|k| {
                (
                    k.to_string(),
                    from.get(*k).map_or(Value::Null, |v| json!(v)),
                )
            })
            .collect()
    };
    Some(json!({"metadata": {
        "labels": pick(&OWNED_POD_LABELS, &desired.labels),
        "annotations": pick(&OWNED_POD_ANNOTATIONS, &desired.annotations),
    }}))
}

/// What [`ensure_running`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Repaired {
    /// The pod's owned metadata was patched.
    pub pod: bool,
    /// The credentials Secret was ensured (created if absent).
    pub secret: bool,
}

/// Brings the children of a session that has a pod to their desired form: the Secret ensured
/// when the pod reports it missing or its metadata differs, then the pod's owned metadata
/// patched if it differs. `problem` is what the pod reports holding it up.
pub async fn ensure_running(
    ctx: &Context,
    ns: &str,
    session: &Session,
    pod: &CachedPod,
    desired: &PodMeta,
    problem: Option<&str>,
) -> Result<Repaired, Error> {
    let patch = pod_patch(pod, desired);
    let mut done = Repaired::default();
    if let Some(key) = &ctx.config.credentials
        && (patch.is_some() || credentials::missing(problem, session))
    {
        ensure_secret(ctx, ns, &credentials::secret(session, key)).await?;
        done.secret = true;
    }
    if let Some(patch) = patch {
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
        api.patch(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await
        .map_err(|source| Error::Child {
            verb: Verb::Patch,
            kind: "Pod",
            name: pod.name_any(),
            source,
        })?;
        done.pod = true;
    }
    Ok(done)
}

/// Creates `obj` unless it exists (one request; an existing object is left as it is).
async fn create_if_absent<K>(
    ctx: &Context,
    ns: &str,
    kind: &'static str,
    obj: &K,
) -> Result<(), Error>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(source) => Err(Error::Child {
            verb: Verb::Create,
            kind,
            name: obj.name_any(),
            source,
        }),
    }
}

/// The credentials Secret, created if absent (immutable: never updated).
pub async fn ensure_secret(ctx: &Context, ns: &str, secret: &Secret) -> Result<(), Error> {
    create_if_absent(ctx, ns, "Secret", secret).await
}

/// The profile claim: `archive` labelled archived (never deleted), and `claim` created if
/// absent.
pub async fn ensure_claim(
    ctx: &Context,
    ns: &str,
    archive: Option<&str>,
    claim: &PersistentVolumeClaim,
    now_second: i64,
) -> Result<(), Error> {
    if let Some(old) = archive {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
        let patch = json!({"metadata": {"labels": {ARCHIVED_LABEL: now_second.to_string()}}});
        api.patch(old, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map_err(|source| Error::Child {
                verb: Verb::Patch,
                kind: "PersistentVolumeClaim",
                name: old.to_string(),
                source,
            })?;
    }
    create_if_absent(ctx, ns, "PersistentVolumeClaim", claim).await
}

/// The pod, created if absent. The API server's refusal of the pod itself (invalid, or refused
/// by admission such as Pod Security) is returned as the reason the session fails, instead of
/// retrying forever.
pub async fn create_pod(ctx: &Context, ns: &str, pod: &Pod) -> Result<Option<Refusal>, Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    match api.create(&PostParams::default(), pod).await {
        Ok(_) => Ok(None),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
        Err(kube::Error::Api(s)) if matches!(s.code, 400 | 403 | 422) => Ok(Some(Refusal::new(
            reasons::POD_REJECTED,
            format!("the API server rejected the session pod: {}", s.message),
        ))),
        Err(source) => Err(Error::Child {
            verb: Verb::Create,
            kind: "Pod",
            name: pod.name_any(),
            source,
        }),
    }
}

/// The pod removed (a stop), if it is still the one observed (its uid).
pub async fn delete_pod(ctx: &Context, ns: &str, p: &CachedPod) -> Result<(), Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            uid: p.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&p.name_any(), &dp).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(source) => Err(Error::Child {
            verb: Verb::Delete,
            kind: "Pod",
            name: p.name_any(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::runtime::stores::trim_pod;

    fn session() -> Session {
        crate::controller::fixtures::session("desk", "alice", "w")
    }

    /// A pod as the cache holds it, with these labels and annotations.
    fn cached(meta: &PodMeta, extra_label: Option<(&str, &str)>) -> CachedPod {
        let mut labels = meta.labels.clone();
        if let Some((k, v)) = extra_label {
            labels.insert(k.into(), v.into());
        }
        let mut annotations = meta.annotations.clone();
        annotations.insert("cubicle.dev/settings".into(), "{}".into());
        let mut p = CachedPod::default();
        p.metadata.name = Some("desk".into());
        p.metadata.labels = Some(labels);
        p.metadata.annotations = Some(annotations);
        trim_pod(&mut p);
        p
    }

    #[test]
    fn a_pod_in_its_desired_form_is_not_written() {
        let want = pod_meta(&session(), Some("ws-1"), false);
        // Labels the operator does not own (a person's, another tool's) are left alone.
        assert_eq!(pod_patch(&cached(&want, Some(("team", "a"))), &want), None);
        let paused = pod_meta(&session(), None, true);
        assert_eq!(pod_patch(&cached(&paused, None), &paused), None);
    }

    #[test]
    fn a_hand_edited_owned_label_is_restored_and_a_stray_one_removed() {
        let want = pod_meta(&session(), None, false);
        let mut edited = want.clone();
        edited.labels.insert(USER_LABEL.into(), "mallory".into());
        edited
            .labels
            .insert(ACCESS_LABEL.into(), ACCESS_PAUSED.into());
        let patch = pod_patch(&cached(&edited, None), &want).expect("drift is repaired");
        assert_eq!(patch["metadata"]["labels"][USER_LABEL], json!("alice"));
        assert_eq!(patch["metadata"]["labels"][ACCESS_LABEL], Value::Null);
        assert_eq!(patch["metadata"]["labels"][SERVER_LABEL], Value::Null);
        assert_eq!(
            patch["metadata"]["annotations"][CHILDREN_ANNOTATION],
            json!(CHILDREN_VERSION)
        );
        // Only owned keys are named.
        let named = patch["metadata"]["labels"].as_object().unwrap().len();
        assert_eq!(named, OWNED_POD_LABELS.len());
    }

    #[test]
    fn a_pod_of_an_older_build_gets_the_children_version() {
        let want = pod_meta(&session(), None, false);
        let mut older = want.clone();
        older.annotations.clear();
        let patch = pod_patch(&cached(&older, None), &want).expect("behind: patched");
        assert_eq!(
            patch["metadata"]["annotations"][CHILDREN_ANNOTATION],
            json!(CHILDREN_VERSION)
        );
        let mut older = want.clone();
        older
            .annotations
            .insert(CHILDREN_ANNOTATION.into(), "0".into());
        assert!(pod_patch(&cached(&older, None), &want).is_some());
    }

    #[test]
    fn pause_and_resume_move_the_access_label() {
        let running = pod_meta(&session(), None, false);
        let paused = pod_meta(&session(), None, true);
        let p = pod_patch(&cached(&running, None), &paused).unwrap();
        assert_eq!(p["metadata"]["labels"][ACCESS_LABEL], json!(ACCESS_PAUSED));
        let p = pod_patch(&cached(&paused, None), &running).unwrap();
        assert_eq!(p["metadata"]["labels"][ACCESS_LABEL], Value::Null);
    }

    #[test]
    fn the_digest_survives_the_cache_trim() {
        let want = pod_meta(&session(), Some("ws-1"), true);
        let mut full = CachedPod::default();
        full.metadata.labels = Some(want.labels.clone());
        full.metadata.annotations = Some(want.annotations.clone());
        let mut trimmed = full.clone();
        trim_pod(&mut trimmed);
        assert_eq!(full.owned_digest(), trimmed.owned_digest());
        assert!(trimmed.metadata.annotations.is_none(), "nothing extra kept");
    }
}
