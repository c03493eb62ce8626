//! What the status controllers (User, Group, Server, ServerPool, ServerAssignment) share:
//! building a namespace's [`Directory`] from the caches, computing conditions that keep their
//! transition times, comparing statuses without timestamps, and the server-side apply of a
//! status that writes only when something changed.
//!
//! Each status controller applies with its own field manager (`cubicle/<kind>-status`), so the
//! fields it omits are never the ones another writer owns (e.g. `User.status.usage`, kept by the
//! usage ledger): server-side apply removes only fields previously applied by the same manager.

use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::Error;
use super::stores::{Stores, in_namespace};
use crate::resolve::Directory;

/// The namespace's small kinds, from the caches.
pub fn directory(stores: &Stores, ns: &str) -> Directory {
    Directory {
        namespace: ns.to_string(),
        groups: in_namespace(&stores.groups, ns),
        workspaces: in_namespace(&stores.workspaces, ns),
        pools: in_namespace(&stores.pools, ns),
        servers: in_namespace(&stores.servers, ns),
        assignments: in_namespace(&stores.assignments, ns),
    }
}

/// Longest condition message written (the rest is cut with an ellipsis).
pub const MAX_MESSAGE: usize = 2048;

/// A condition as computed, before its transition time is decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    /// Condition type.
    pub type_: &'static str,
    /// True or False.
    pub status: bool,
    /// CamelCase reason.
    pub reason: String,
    /// Message for people.
    pub message: String,
}

impl Cond {
    /// A condition.
    pub fn new(
        type_: &'static str,
        status: bool,
        reason: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.into(),
            message: message.into(),
        }
    }
}

fn cut(s: &str) -> String {
    if s.chars().count() <= MAX_MESSAGE {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(MAX_MESSAGE - 1).collect();
        out.push('…');
        out
    }
}

/// Turns computed conditions into status conditions: a condition whose status did not change
/// keeps its `lastTransitionTime` from `current`; a new or flipped one gets `now`.
pub fn conditions(
    desired: Vec<Cond>,
    current: &[Condition],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    desired
        .into_iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let since = current
                .iter()
                .find(|o| o.type_ == c.type_ && o.status == status)
                .map(|o| o.last_transition_time.clone())
                .unwrap_or_else(|| now.clone());
            Condition {
                type_: c.type_.to_string(),
                status: status.to_string(),
                reason: c.reason,
                message: cut(&c.message),
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// The conditions of `types`, in that order (the ones a controller owns).
pub fn owned_conditions(current: &[Condition], types: &[&str]) -> Vec<Condition> {
    types
        .iter()
        .filter_map(|t| current.iter().find(|c| c.type_ == *t).cloned())
        .collect()
}

/// Integral floating-point numbers as integers, recursively. The API server keeps numbers of
/// free-form JSON as integers when they are integral, so a status is compared (and written) in
/// that form; otherwise `40.0` written would read back as `40` and look like a change forever.
pub fn normalize_numbers(v: &mut Value) {
    match v {
        Value::Number(n) => {
            if let Some(f) = n.as_f64()
                && !n.is_i64()
                && !n.is_u64()
                && f.fract() == 0.0
                && f.abs() < 9.0e15
            {
                *v = Value::from(f as i64);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(normalize_numbers),
        Value::Object(m) => m.values_mut().for_each(normalize_numbers),
        _ => {}
    }
}

/// A status as JSON with integral numbers normalized and condition transition times removed:
/// two statuses that differ only in timestamps compare equal.
pub fn comparable<S: Serialize>(status: &S) -> Value {
    let mut v = serde_json::to_value(status).unwrap_or(Value::Null);
    normalize_numbers(&mut v);
    if let Some(Value::Array(conds)) = v.get_mut("conditions") {
        for c in conds {
            if let Value::Object(m) = c {
                m.remove("lastTransitionTime");
            }
        }
    }
    v
}

/// Feeds `v` to `h` canonically: object keys in sorted order whatever the map's own order, so
/// equal values hash equally.
pub fn hash_value(v: &Value, h: &mut impl std::hash::Hasher) {
    use std::hash::Hash;
    match v {
        Value::Null => 0u8.hash(h),
        Value::Bool(b) => (1u8, b).hash(h),
        Value::Number(n) => (2u8, n.to_string()).hash(h),
        Value::String(s) => (3u8, s).hash(h),
        Value::Array(a) => {
            (4u8, a.len()).hash(h);
            a.iter().for_each(|x| hash_value(x, h));
        }
        Value::Object(m) => {
            (5u8, m.len()).hash(h);
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            for k in keys {
                k.hash(h);
                hash_value(&m[k], h);
            }
        }
    }
}

/// Applies `status` (with server-side apply, as `manager`, forced) to the status subresource of
/// `name`. The body carries only the fields the caller owns.
pub async fn apply<K>(
    client: &Client,
    ns: &str,
    name: &str,
    manager: &str,
    status: &impl Serialize,
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let mut status = serde_json::to_value(status).unwrap_or(Value::Null);
    normalize_numbers(&mut status);
    let body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(body),
    )
    .await
    .map_err(|source| Error::Status {
        kind: kind_name::<K>(),
        name: name.to_string(),
        source,
    })?;
    Ok(())
}

fn kind_name<K: Resource<DynamicType = ()>>() -> &'static str {
    match K::kind(&()).as_ref() {
        "User" => "User",
        "Group" => "Group",
        "Server" => "Server",
        "ServerPool" => "ServerPool",
        "ServerAssignment" => "ServerAssignment",
        "Workspace" => "Workspace",
        "Session" => "Session",
        _ => "object",
    }
}

/// What each status controller last wrote, so that a reconcile that runs again before the
/// cache has seen its own write (a second trigger arriving in between) does not write the same
/// status again. Keyed by object; remembers the uid and the resourceVersion the object had when
/// the status was written, and a hash of that status.
#[derive(Default)]
pub struct Written {
    last: std::sync::Mutex<std::collections::HashMap<String, (String, String, u64)>>,
}

impl Written {
    /// Whether `status` was already written for this version of the object (the cache still
    /// shows the object as it was before that write).
    pub fn already<K: Resource>(&self, obj: &K, status: &impl Serialize) -> bool {
        let (key, uid, rv) = identity(obj);
        let h = hash_of(status);
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.get(&key) == Some(&(uid, rv, h))
    }

    /// Records that `status` was written for this version of the object.
    pub fn record<K: Resource>(&self, obj: &K, status: &impl Serialize) {
        let (key, uid, rv) = identity(obj);
        let h = hash_of(status);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.insert(key, (uid, rv, h));
    }
}

fn identity<K: Resource>(obj: &K) -> (String, String, String) {
    let m = obj.meta();
    (
        format!(
            "{}/{}",
            m.namespace.as_deref().unwrap_or(""),
            m.name.as_deref().unwrap_or("")
        ),
        m.uid.clone().unwrap_or_default(),
        m.resource_version.clone().unwrap_or_default(),
    )
}

fn hash_of(status: &impl Serialize) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    comparable(status).to_string().hash(&mut h);
    h.finish()
}

/// `ObjectRef`s of `objects` (for mappers).
pub fn refs<K>(
    objects: impl IntoIterator<Item = Arc<K>>,
) -> Vec<kube::runtime::reflector::ObjectRef<K>>
where
    K: Resource<DynamicType = ()>,
{
    objects
        .into_iter()
        .map(|o| kube::runtime::reflector::ObjectRef::from_obj(o.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    #[test]
    fn transition_times_are_kept_while_the_status_holds() {
        let before = t("2026-01-01T00:00:00Z");
        let now = t("2026-01-02T00:00:00Z");
        let first = conditions(
            vec![
                Cond::new("Ready", true, "Resolved", "ok"),
                Cond::new("SettingsConflict", false, "NoConflict", ""),
            ],
            &[],
            Some(1),
            &before,
        );
        assert!(first.iter().all(|c| c.last_transition_time == before));
        // Same statuses, new message and generation: the times stay.
        let again = conditions(
            vec![
                Cond::new("Ready", true, "Resolved", "still ok"),
                Cond::new("SettingsConflict", true, "PriorityTie", "tie"),
            ],
            &first,
            Some(2),
            &now,
        );
        assert_eq!(again[0].last_transition_time, before);
        assert_eq!(again[0].observed_generation, Some(2));
        assert_eq!(again[1].last_transition_time, now, "flipped");
        assert_eq!(again[1].status, "True");
    }

    #[test]
    fn comparison_ignores_times_and_float_forms() {
        #[derive(Serialize)]
        struct S {
            conditions: Vec<Condition>,
            value: Value,
        }
        let a = S {
            conditions: conditions(
                vec![Cond::new("Ready", true, "R", "m")],
                &[],
                None,
                &t("2026-01-01T00:00:00Z"),
            ),
            value: json!({"hours": 40.0, "x": [1.5]}),
        };
        let b = S {
            conditions: conditions(
                vec![Cond::new("Ready", true, "R", "m")],
                &[],
                None,
                &t("2027-01-01T00:00:00Z"),
            ),
            value: json!({"hours": 40, "x": [1.5]}),
        };
        assert_eq!(comparable(&a), comparable(&b));
        let c = S {
            conditions: vec![],
            value: json!(1),
        };
        assert_ne!(comparable(&a), comparable(&c));
    }

    #[test]
    fn a_status_written_for_a_version_is_not_written_again_for_it() {
        let mut obj = k8s_openapi::api::core::v1::ConfigMap::default();
        obj.metadata.name = Some("x".into());
        obj.metadata.uid = Some("u1".into());
        obj.metadata.resource_version = Some("5".into());
        let w = Written::default();
        let status = json!({"a": 1});
        assert!(!w.already(&obj, &status));
        w.record(&obj, &status);
        assert!(w.already(&obj, &status));
        assert!(
            !w.already(&obj, &json!({"a": 2})),
            "a different status is written"
        );
        obj.metadata.resource_version = Some("6".into());
        assert!(
            !w.already(&obj, &status),
            "a newer object is compared afresh"
        );
        obj.metadata.resource_version = Some("5".into());
        obj.metadata.uid = Some("u2".into());
        assert!(
            !w.already(&obj, &status),
            "a re-created object is another object"
        );
    }

    #[test]
    fn long_messages_are_cut() {
        let long = "x".repeat(MAX_MESSAGE * 2);
        let c = conditions(
            vec![Cond::new("Ready", false, "R", long)],
            &[],
            None,
            &t("2026-01-01T00:00:00Z"),
        );
        assert_eq!(c[0].message.chars().count(), MAX_MESSAGE);
    }
}
