//! What the status controllers (User, Group, Server, ServerPool, ServerAssignment) share: the
//! reconcile shell and controller builder they run on ([`StatusView`], [`reconcile`],
//! [`Triggers`]), building a namespace's [`Directory`] from the caches, computing conditions
//! that keep their transition times, comparing statuses without timestamps, and the server-side
//! apply of a status that writes only when something changed.
//!
//! A kind brings only what is its own: its metrics label and field manager, its desired status,
//! the fields of its status it owns (the ones compared), and the trigger mappings from other
//! kinds to its objects. Every reconcile then waits for the caches, times itself under the
//! kind's label, computes the desired status, writes it only when it differs from the current
//! one (and was not already written for this version of the object, see [`Written`]); the
//! resync interval brings every object back through a sweep of the cache ([`super::stores::sweep`]).
//!
//! Each status controller applies with its own field manager (`cubicle/<kind>-status`), so the
//! fields it omits are never the ones another writer owns (e.g. `User.status.usage`, kept by the
//! usage ledger): server-side apply removes only fields previously applied by the same manager.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt, stream};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Patch, PatchParams};
use kube::core::object::HasStatus;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::gate::Inputs;
use super::stores::{Shared, Stores, digest, in_namespace, sweep, when_changed};
use super::{Context, Error, queue_gauge};

use crate::resolve::Directory;

/// A kind whose status a status controller keeps: what is the kind's own, around the shared
/// shell of [`reconcile`]. The status type is the kind's [`HasStatus::Status`].
pub trait StatusView:
    Resource<Scope = NamespaceResourceScope, DynamicType = ()>
    + HasStatus<Status: Serialize + Default + Clone + Send + Sync>
    + Clone
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    /// Kind label for metrics and errors.
    const KIND: &'static str;
    /// Field manager of the status the controller applies.
    const MANAGER: &'static str;

    /// The status the controller wants for `obj` now, from the caches; `dir` is the directory
    /// of `obj`'s namespace (`dir.namespace`).
    fn desired(ctx: &Context, dir: &Directory, obj: &Self, now: &Time) -> Self::Status;

    /// The fields of `status` the controller owns (what it writes: not another writer's
    /// fields or conditions), the others empty.
    fn owned(status: &Self::Status) -> Self::Status;

    /// Whether `desired` differs from the fields of `current` the controller owns, ignoring
    /// timestamps ([`comparable`]).
    fn changed(current: Option<&Self::Status>, desired: &Self::Status) -> bool {
        comparable(&current.map(Self::owned).unwrap_or_default()) != comparable(desired)
    }

    /// Whether `desired` must be written over the status of `self` as cached: by default,
    /// whether it [`changed`](StatusView::changed) from the cached status.
    fn needs_write(&self, desired: &Self::Status) -> bool {
        Self::changed(self.status(), desired)
    }
}

/// The reconcile of every status controller: computes `obj`'s desired status and applies it
/// (as [`StatusView::MANAGER`]) only when it must be written and was not already written for
/// this version of `obj`. It does not requeue: the controller's sweep is the resync.
pub async fn reconcile<K: StatusView>(
    obj: Arc<K>,
    ctx: Arc<Context>,
    written: Arc<Written>,
) -> Result<Action, Error> {
    ctx.wait_synced().await;
    let _timer = ctx.metrics.reconcile_timer(K::KIND);
    let name = obj.name_any();
    let ns = obj.namespace().ok_or_else(|| Error::NoNamespace {
        kind: K::KIND,
        name: name.clone(),
    })?;
    let dir = directory(&ctx.stores, &ns);
    let now = Time(jiff::Timestamp::now());
    let desired = K::desired(&ctx, &dir, &obj, &now);
    written.seen(obj.as_ref());
    if obj.needs_write(&desired) && !written.already(obj.as_ref(), &desired) {
        apply::<K>(&ctx.client, &ns, &name, K::MANAGER, &desired, None).await?;
        written.record(obj.as_ref(), &desired);
    }
    ctx.backoff.succeeded(&ObjectRef::from_obj(obj.as_ref()));
    // The resync comes from the controller's sweep ([`Triggers::run`]), not a requeue per object.
    Ok(Action::await_change())
}

/// A status controller being built: its own kind's changes, plus the kind's triggers, each a
/// mapping from another object (changed, deleted, or both) to the objects whose status it
/// affects. Mappings read the caches through the [`Stores`] they are given.
pub struct Triggers<K: StatusView> {
    inputs: Inputs<K>,
    own: kube::runtime::reflector::Store<K>,
    ctx: Arc<Context>,
    every: Duration,
}

impl<K: StatusView> Triggers<K> {
    /// A controller of `own`'s objects (their changes reconcile them), to run with `ctx`.
    pub fn new(own: &Shared<K>, ctx: Arc<Context>) -> Self {
        Self {
            inputs: Inputs::default().own(own.subscribe()),
            own: own.reader.clone(),
            every: ctx.config.resync,
            ctx,
        }
    }

    /// Sweeps every object at least once per `at_most` whatever the configured resync: for a
    /// status read from objects whose changes are no trigger (Nodes).
    pub fn refresh_within(mut self, at_most: Duration) -> Self {
        self.every = if self.every.is_zero() {
            at_most
        } else {
            self.every.min(at_most)
        };
        self
    }

    /// Reconciles what `map` names when an `O` changes or is deleted.
    pub fn on<O, I, F>(self, other: &mut Shared<O>, map: F) -> Self
    where
        O: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        I: IntoIterator<Item = ObjectRef<K>> + 'static,
        I::IntoIter: Send,
        F: Fn(&Stores, &O) -> I + Send + Sync + 'static,
    {
        self.on_filtered(other, None, map)
    }

    /// Reconciles what `map` names when `digest` of an `O` changes (its first sight included)
    /// or an `O` is deleted: for mappings that read only part of an `O` (its spec, say), so the
    /// other changes (a status write per launch) do not reconcile anything.
    pub fn on_digest<O, I, F>(self, other: &mut Shared<O>, digest: fn(&O) -> u64, map: F) -> Self
    where
        O: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        I: IntoIterator<Item = ObjectRef<K>> + 'static,
        I::IntoIter: Send,
        F: Fn(&Stores, &O) -> I + Send + Sync + 'static,
    {
        self.on_filtered(other, Some(digest), map)
    }

    fn on_filtered<O, I, F>(
        mut self,
        other: &mut Shared<O>,
        digest: Option<fn(&O) -> u64>,
        map: F,
    ) -> Self
    where
        O: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        I: IntoIterator<Item = ObjectRef<K>> + 'static,
        I::IntoIter: Send,
        F: Fn(&Stores, &O) -> I + Send + Sync + 'static,
    {
        let map = Arc::new(map);
        let on_delete = map.clone();
        let s = self.ctx.stores.clone();
        let mut changed = digest.map(when_changed);
        let changes = other.subscribe().filter(move |o| match changed.as_mut() {
            Some(f) => f(o),
            None => futures::future::ready(true),
        });
        self.inputs = self.inputs.map(changes, move |o: Arc<O>| map(&s, &o));
        self.on_deletes(other, move |s, o| on_delete(s, o))
    }

    /// Reconciles what `map` names when an `O` changes (deletions are not a trigger).
    pub fn on_changes<O, I, F>(mut self, other: &Shared<O>, map: F) -> Self
    where
        O: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        I: IntoIterator<Item = ObjectRef<K>> + 'static,
        I::IntoIter: Send,
        F: Fn(&Stores, &O) -> I + Send + Sync + 'static,
    {
        let s = self.ctx.stores.clone();
        self.inputs = self
            .inputs
            .map(other.subscribe(), move |o: Arc<O>| map(&s, &o));
        self
    }

    /// Reconciles what `map` names when an `O` is deleted (shared subscribers see only changes).
    pub fn on_deletes<O, I, F>(mut self, other: &mut Shared<O>, map: F) -> Self
    where
        O: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        I: IntoIterator<Item = ObjectRef<K>> + 'static,
        I::IntoIter: Send,
        F: Fn(&Stores, &O) -> I + Send + Sync + 'static,
    {
        let s = self.ctx.stores.clone();
        let deleted = other
            .subscribe_deletes()
            .flat_map(move |o: Arc<O>| stream::iter(map(&s, &o)));
        self.inputs = self.inputs.refs(deleted);
        self
    }

    /// Runs the controller: [`reconcile`] on every trigger, as many at a time as the configured
    /// concurrency, with the shared error policy ([`Context::on_error`]) under
    /// [`StatusView::KIND`].
    pub fn run(self) -> BoxFuture<'static, ()> {
        let written = Arc::new(Written::default());
        let ctx = self.ctx;
        let depth = queue_gauge(&ctx, K::KIND);
        self.inputs
            .refs(sweep(self.own.clone(), self.every))
            .run(
                self.own,
                ctx.config.concurrency,
                depth,
                move |obj, ctx| reconcile(obj, ctx, written.clone()),
                |obj, e, ctx: Arc<Context>| {
                    ctx.on_error(K::KIND, &ObjectRef::from_obj(obj.as_ref()), e)
                },
                ctx,
            )
            .for_each(|_| futures::future::ready(()))
            .boxed()
    }
}

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
/// `name`, and returns the object as written. The body carries only the fields the caller owns.
/// The one status path of every kind: the status controllers, the Session controller and the
/// usage ledger all write through it. With `resource_version`, the write is guarded: it fails
/// with a conflict (409) when the object has changed since that version.
pub async fn apply<K>(
    client: &Client,
    ns: &str,
    name: &str,
    manager: &str,
    status: &impl Serialize,
    resource_version: Option<&str>,
) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let mut status = serde_json::to_value(status).unwrap_or(Value::Null);
    normalize_numbers(&mut status);
    let mut body = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    if let Some(v) = resource_version {
        body["metadata"] = json!({"resourceVersion": v});
    }
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
    })
}

/// Whether `e` is a guarded write's conflict: the object changed since the version it carried.
pub fn is_conflict(e: &Error) -> bool {
    matches!(e, Error::Status { source: kube::Error::Api(s), .. } if s.code == 409)
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
/// the status was written, and a hash of that status (all as 64-bit hashes: 24 bytes an entry).
///
/// An entry is only needed until the cache shows the write: the first look at a later version
/// of the object drops it, so the map holds the writes still in flight, not one entry for every
/// object ever written (deleted ones included).
#[derive(Default)]
pub struct Written {
    last: std::sync::Mutex<std::collections::HashMap<u64, (u64, u64)>>,
}

impl Written {
    /// Whether `status` was already written for this version of the object (the cache still
    /// shows the object as it was before that write).
    pub fn already<K: Resource>(&self, obj: &K, status: &impl Serialize) -> bool {
        let (key, version) = identity(obj);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match last.get(&key) {
            Some((v, h)) if *v == version => *h == hash_of(status),
            Some(_) => {
                // The cache has moved past the recorded write.
                last.remove(&key);
                false
            }
            None => false,
        }
    }

    /// Notes the version of the object the cache shows: a write recorded for an earlier one has
    /// been seen and is forgotten. Cheap (two hashes); every reconcile calls it, so the map only
    /// holds writes still in flight.
    pub fn seen<K: Resource>(&self, obj: &K) {
        let (key, version) = identity(obj);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.get(&key).is_some_and(|(v, _)| *v != version) {
            last.remove(&key);
        }
    }

    /// Records that `status` was written for this version of the object.
    pub fn record<K: Resource>(&self, obj: &K, status: &impl Serialize) {
        let (key, version) = identity(obj);
        let h = hash_of(status);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        last.insert(key, (version, h));
    }

    /// How many writes are remembered.
    pub fn len(&self) -> usize {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no write is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Hashes of an object's namespace and name, and of its uid and resourceVersion.
fn identity<K: Resource>(obj: &K) -> (u64, u64) {
    let m = obj.meta();
    (
        digest(&(&m.namespace, &m.name)),
        digest(&(&m.uid, &m.resource_version)),
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
    fn a_write_is_remembered_until_the_cache_shows_a_later_version() {
        let w = Written::default();
        let mut g: crate::crd::v1alpha1::Group = serde_json::from_value(json!({
            "apiVersion": "cubicle.dev/v1alpha1", "kind": "Group",
            "metadata": {"name": "g"}, "spec": {"priority": 1}
        }))
        .unwrap();
        g.metadata.namespace = Some("ns".into());
        g.metadata.uid = Some("u1".into());
        g.metadata.resource_version = Some("10".into());
        let status = json!({"memberCount": 1});
        assert!(!w.already(&g, &status));
        w.record(&g, &status);
        // The cache still shows version 10: the same status is not written twice, another is.
        assert!(w.already(&g, &status));
        assert!(!w.already(&g, &json!({"memberCount": 2})));
        assert_eq!(w.len(), 1);
        // Version 11 (the write, seen): nothing is held back and the entry is gone.
        g.metadata.resource_version = Some("11".into());
        w.seen(&g);
        assert!(w.is_empty());
        assert!(!w.already(&g, &status));
        // A re-created object (new uid, same name and version) is another object.
        g.metadata.resource_version = Some("10".into());
        w.record(&g, &status);
        g.metadata.uid = Some("u2".into());
        assert!(!w.already(&g, &status));
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
    fn each_kind_keeps_its_label_and_field_manager() {
        use crate::crd::v1alpha1::{Group, Server, ServerAssignment, ServerPool, User};
        fn of<K: StatusView>() -> (&'static str, &'static str, String) {
            (K::KIND, K::MANAGER, K::kind(&()).into_owned())
        }
        let kinds = [
            of::<User>(),
            of::<Group>(),
            of::<Server>(),
            of::<ServerPool>(),
            of::<ServerAssignment>(),
        ];
        for (label, manager, kind) in &kinds {
            assert_eq!(label, kind, "the metrics label is the kind");
            assert_eq!(
                *manager,
                format!("cubicle/{}-status", kind.to_lowercase()),
                "each kind applies with its own field manager"
            );
        }
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
