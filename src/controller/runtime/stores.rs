//! One watch per kind, shared by every controller: reflector stores for lookups (reconcile makes
//! no uncached reads) and subscriber streams for triggers.
//!
//! Children (pods, profile claims) are watched through a label selector, so the operator caches
//! only what it manages; Nodes are watched as metadata only (the zone label is all we read).
//!
//! Pods, profile claims and PersistentVolumes are parsed as lean types ([`super::cached`]), not
//! as the k8s-openapi structs, so what the operator never reads is skipped while parsing. Every
//! object is then trimmed before it is cached (the watch stream's `modify` step, ahead of the
//! reflector), so the caches hold what the operator reads and nothing else:
//!
//! - every kind loses `managedFields` and kubectl's `last-applied-configuration` annotation;
//! - Pods keep their identity, the labels read (access and server), owner references, deletion
//!   and creation times, the launch record annotation (kept apart, [`CachedPod::launch`]),
//!   `spec.nodeName`, and of their status the phase, the message, the conditions that tell
//!   readiness or why not, and the waiting containers' reasons ([`trim_pod`]);
//! - profile claims keep their identity, `spec.volumeName` and, apart from the maps, the labels
//!   and annotation read (user, profile, archived, reset by: [`trim_claim`]);
//! - PersistentVolumes are cached only while bound (`spec.claimRef`) to a claim in the
//!   operator's scope, as their claim reference and zone ([`trim_volume`]);
//! - Nodes keep their labels ([`trim_node`]);
//! - Users lose `status.effectiveSettings`, which only the User status controller reads, and
//!   only to compare it with the status it computes: a digest of the whole status (as that
//!   controller compares it) is kept instead, in the status's cache-only field `cached`, never
//!   serialized ([`trim_user`]). Cached objects are never written back to the API server:
//!   every write builds its own body.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::channel::mpsc;
use futures::{StreamExt, future};
use k8s_openapi::api::core::v1::{Node, ObjectReference, PodCondition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::PartialObjectMeta;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tracing::warn;

// Re-exported for the bench (src/bench), which selects the operator's children by them.
use super::cached::{CachedClaim, CachedPod, CachedVolume, CachedVolumeSpec, ClaimMarks};
use super::index::{Index, Keys};
pub use crate::controller::contract::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::crd::v1alpha1::{Group, Server, ServerAssignment, ServerPool, Session, User, Workspace};

/// kubectl's copy of the last applied object (as big as the object): never read.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Objects per page of an initial list or relist (kube's default is 500). Each page is
/// deserialized whole, as full objects, before any is trimmed for the cache; the allocator keeps
/// much of that peak afterwards, so smaller pages keep the heap close to what the caches hold.
const LIST_PAGE: u32 = 100;

/// Which namespaces a runtime covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace.
    All,
    /// One namespace.
    Namespace(String),
}

impl Scope {
    fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match self {
            Scope::All => Api::all(client.clone()),
            Scope::Namespace(ns) => Api::namespaced(client.clone(), ns),
        }
    }
}

/// Read handles on every cache.
#[derive(Clone)]
pub struct Stores {
    /// Users.
    pub users: Store<User>,
    /// Groups.
    pub groups: Store<Group>,
    /// Workspaces.
    pub workspaces: Store<Workspace>,
    /// Server pools.
    pub pools: Store<ServerPool>,
    /// Servers.
    pub servers: Store<Server>,
    /// Server assignments.
    pub assignments: Store<ServerAssignment>,
    /// Sessions.
    pub sessions: Store<Session>,
    /// Session pods (label-selected).
    pub pods: Store<CachedPod>,
    /// Profile claims (label-selected).
    pub claims: Store<CachedClaim>,
    /// Nodes, metadata only.
    pub nodes: Store<PartialObjectMeta<Node>>,
    /// PersistentVolumes (to learn the zone a profile claim is bound to).
    pub volumes: Store<CachedVolume>,
    /// Sessions by user, server and workspace ([`session_keys`]).
    session_index: Arc<Index<Session>>,
    /// Profile claims by profile ([`claim_keys`]).
    claim_index: Arc<Index<CachedClaim>>,
    /// Users by username, and those reported as duplicates ([`user_keys`]).
    user_index: Arc<Index<User>>,
}

/// A kind's writer before its watch starts; hands out subscriber streams.
pub struct Shared<K: Resource + Clone + 'static>
where
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    writer: Writer<K>,
    /// The store.
    pub reader: Store<K>,
    deletes: Vec<mpsc::UnboundedSender<Arc<K>>>,
    /// Subscribers to changes ([`Shared::subscribe`]).
    changes: std::sync::Mutex<Vec<mpsc::UnboundedSender<Arc<K>>>>,
    index: Option<Arc<Index<K>>>,
}

impl<K> Shared<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    fn new() -> Self {
        let (reader, writer) = reflector::store();
        Self {
            writer,
            reader,
            deletes: Vec::new(),
            changes: std::sync::Mutex::new(Vec::new()),
            index: None,
        }
    }

    /// With a secondary index, kept by the watch beside the store.
    fn indexed(keys: Keys<K>) -> Self
    where
        K: Resource<DynamicType = ()>,
    {
        Self {
            index: Some(Arc::new(Index::new(keys))),
            ..Self::new()
        }
    }

    fn index(&self) -> Arc<Index<K>> {
        self.index.clone().expect("an indexed kind")
    }

    /// A stream of deleted objects. Shared subscribers only see changes, and a controller must
    /// also react when, say, a session that held a user's last slot goes away.
    pub fn subscribe_deletes(&mut self) -> mpsc::UnboundedReceiver<Arc<K>> {
        let (tx, rx) = mpsc::unbounded();
        self.deletes.push(tx);
        rx
    }

    /// A stream of changed objects for one controller's triggers: every object the watch
    /// applies (added or modified, and each object of a finished list), as the store holds it.
    ///
    /// The watch task sends each change into an unbounded queue per subscriber right after the
    /// store has it ([`fan_out`]), so the caches never wait for a controller (whose reconcile
    /// slots may all be busy; its gate, [`super::gate`], deduplicates queued triggers per
    /// object), and no change is ever dropped.
    ///
    /// kube's shared-store subscriptions are not used: their handle broadcasts a reference and
    /// looks the object up in the store when the subscriber polls; an object deleted meanwhile
    /// (a pod or session being deleted: its last update, then its removal) makes that poll
    /// return `Pending` without registering a waker, and the subscriber never wakes again. The
    /// Session controller then lost every later pod event, and statuses came from timers.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Arc<K>> {
        let (tx, rx) = mpsc::unbounded();
        self.changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }
}

/// Every shared kind, not yet watching. Take subscribers, then [`Reflectors::start`].
pub struct Reflectors {
    client: Client,
    scope: Scope,
    /// Users.
    pub users: Shared<User>,
    /// Groups.
    pub groups: Shared<Group>,
    /// Workspaces.
    pub workspaces: Shared<Workspace>,
    /// Server pools.
    pub pools: Shared<ServerPool>,
    /// Servers.
    pub servers: Shared<Server>,
    /// Server assignments.
    pub assignments: Shared<ServerAssignment>,
    /// Sessions.
    pub sessions: Shared<Session>,
    /// Session pods.
    pub pods: Shared<CachedPod>,
    /// Profile claims.
    pub claims: Shared<CachedClaim>,
    nodes: (
        Store<PartialObjectMeta<Node>>,
        Writer<PartialObjectMeta<Node>>,
    ),
    volumes: (Store<CachedVolume>, Writer<CachedVolume>),
}

impl Reflectors {
    /// Prepares the caches of one scope.
    pub fn new(client: Client, scope: Scope) -> Self {
        let nodes = reflector::store();
        let volumes = reflector::store();
        Self {
            client,
            scope,
            users: Shared::indexed(user_keys),
            groups: Shared::new(),
            workspaces: Shared::new(),
            pools: Shared::new(),
            servers: Shared::new(),
            assignments: Shared::new(),
            sessions: Shared::indexed(session_keys),
            pods: Shared::new(),
            claims: Shared::indexed(claim_keys),
            nodes,
            volumes,
        }
    }

    /// The namespaces these caches cover.
    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// The read handles.
    pub fn stores(&self) -> Stores {
        Stores {
            users: self.users.reader.clone(),
            groups: self.groups.reader.clone(),
            workspaces: self.workspaces.reader.clone(),
            pools: self.pools.reader.clone(),
            servers: self.servers.reader.clone(),
            assignments: self.assignments.reader.clone(),
            sessions: self.sessions.reader.clone(),
            pods: self.pods.reader.clone(),
            claims: self.claims.reader.clone(),
            nodes: self.nodes.0.clone(),
            volumes: self.volumes.0.clone(),
            session_index: self.sessions.index(),
            claim_index: self.claims.index(),
            user_index: self.users.index(),
        }
    }

    /// Starts every watch. The returned tasks run until aborted.
    pub fn start(self) -> Vec<JoinHandle<()>> {
        let c = &self.client;
        let s = &self.scope;
        let all = watcher::Config::default().page_size(LIST_PAGE);
        let managed = all
            .clone()
            .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
        // An Api of PartialObjectMeta makes metadata-only requests.
        let nodes_api: Api<PartialObjectMeta<Node>> = Api::all(c.clone());
        let (_, node_writer) = self.nodes;
        let (_, volume_writer) = self.volumes;
        let volumes_api: Api<CachedVolume> = Api::all(c.clone());
        let scope = s.clone();
        // A volume not bound in scope is never cached: its listing is skipped, and a change
        // that unbinds it (or the first sight of it) removes it from the store. The store is
        // read by name only, so a removal of what it never held is harmless.
        let volume_task = tokio::spawn(
            watcher(volumes_api, all.clone())
                .default_backoff()
                .filter_map(move |ev| {
                    future::ready(match ev {
                        Ok(watcher::Event::InitApply(v)) if !bound_in(&scope, &v) => None,
                        Ok(watcher::Event::Apply(v)) if !bound_in(&scope, &v) => {
                            Some(Ok(watcher::Event::Delete(v)))
                        }
                        other => Some(other),
                    })
                })
                .modify(trim_volume)
                .reflect(volume_writer)
                .for_each(log_errors::<CachedVolume>("PersistentVolume")),
        );
        let node_task = tokio::spawn(
            watcher(nodes_api, all.clone())
                .default_backoff()
                .modify(trim_node)
                .reflect(node_writer)
                .for_each(log_errors::<PartialObjectMeta<Node>>("Node")),
        );
        vec![
            drive(s.api::<User>(c), all.clone(), self.users, "User", trim_user),
            drive(s.api::<Group>(c), all.clone(), self.groups, "Group", trim),
            drive(
                s.api::<Workspace>(c),
                all.clone(),
                self.workspaces,
                "Workspace",
                trim,
            ),
            drive(
                s.api::<ServerPool>(c),
                all.clone(),
                self.pools,
                "ServerPool",
                trim,
            ),
            drive(
                s.api::<Server>(c),
                all.clone(),
                self.servers,
                "Server",
                trim,
            ),
            drive(
                s.api::<ServerAssignment>(c),
                all.clone(),
                self.assignments,
                "ServerAssignment",
                trim,
            ),
            drive(s.api::<Session>(c), all, self.sessions, "Session", trim),
            drive(
                s.api::<CachedPod>(c),
                managed.clone(),
                self.pods,
                "Pod",
                trim_pod,
            ),
            drive(
                s.api::<CachedClaim>(c),
                managed,
                self.claims,
                "PersistentVolumeClaim",
                trim_claim,
            ),
            node_task,
            volume_task,
        ]
    }
}

/// How long the watches must be quiet (no event of any kind) before freed memory is released.
/// Short: a release costs a few milliseconds, and it runs once per quiet spell.
const QUIET: Duration = Duration::from_secs(1);

/// Gives the heap's freed memory back to the OS once the operator goes quiet.
///
/// The allocator keeps what it freed: glibc's keeps the pages of every list page deserialized
/// whole before trimming and of every burst's transient allocations, spread over its per-thread
/// arenas, so the resident size stays near the peak long after. The binary registers how to
/// release it ([`set_memory_release`]: glibc's `malloc_trim`); the library stays free of unsafe
/// code and does nothing when none is registered (tests, other allocators).
///
/// Every watch event counts as activity: the first one arms a one-shot timer, which fires
/// [`QUIET`] after the last event and releases once. An initial list, a relist and a burst all
/// end with a release; an idle operator, with no events, has no timer at all (no polling).
pub struct QuietRelease {
    release: OnceLock<fn()>,
    epoch: tokio::time::Instant,
    /// Milliseconds from `epoch` to the last event.
    last: AtomicU64,
    armed: AtomicBool,
}

static RELEASE: OnceLock<Arc<QuietRelease>> = OnceLock::new();

fn quiet_release() -> &'static Arc<QuietRelease> {
    RELEASE.get_or_init(|| Arc::new(QuietRelease::new()))
}

/// Registers how to give freed memory back to the OS (once; later calls are ignored).
pub fn set_memory_release(release: fn()) {
    let _ = quiet_release().release.set(release);
}

impl QuietRelease {
    fn new() -> Self {
        Self {
            release: OnceLock::new(),
            epoch: tokio::time::Instant::now(),
            last: AtomicU64::new(0),
            armed: AtomicBool::new(false),
        }
    }

    fn since_epoch(&self) -> Duration {
        // Tokio's clock, so that paused-clock tests see their own time.
        tokio::time::Instant::now().saturating_duration_since(self.epoch)
    }

    /// Notes a watch event; arms the timer if it is not armed. Needs a Tokio runtime.
    fn activity(self: &Arc<Self>) {
        if self.release.get().is_none() {
            return;
        }
        self.last
            .store(self.since_epoch().as_millis() as u64, Ordering::Relaxed);
        if self.armed.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let last = Duration::from_millis(me.last.load(Ordering::Relaxed));
                let idle = me.since_epoch().saturating_sub(last);
                if idle >= QUIET {
                    break;
                }
                tokio::time::sleep(QUIET - idle).await;
            }
            // Disarmed before the release: an event from now on arms a new timer.
            me.armed.store(false, Ordering::Release);
            if let Some(release) = me.release.get() {
                release();
            }
        });
    }
}

fn log_errors<K>(
    kind: &'static str,
) -> impl FnMut(Result<watcher::Event<K>, watcher::Error>) -> future::Ready<()> {
    let quiet = quiet_release().clone();
    move |ev| {
        quiet.activity();
        if let Err(e) = ev {
            warn!(kind, error = %e, "watch error; retrying with backoff");
        }
        future::ready(())
    }
}

fn drive<K>(
    api: Api<K>,
    cfg: watcher::Config,
    shared: Shared<K>,
    kind: &'static str,
    trim: fn(&mut K),
) -> JoinHandle<()>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let mut log = log_errors::<K>(kind);
    tokio::spawn(
        fan_out(watcher(api, cfg).default_backoff().modify(trim), shared)
            .for_each(move |ev| log(ev)),
    )
}

/// Applies a watch's events to a kind's store (and its index), then hands each change to the
/// kind's change subscribers and each deletion to its delete subscribers, in the order the
/// watch sent them. A subscriber always sees an object after the store has it.
fn fan_out<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    shared: Shared<K>,
) -> impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let Shared {
        writer,
        reader,
        deletes,
        changes,
        index,
    } = shared;
    let changes = changes.into_inner().unwrap_or_else(|p| p.into_inner());
    let (before, after) = (index.clone(), index);
    let send = move |obj: Arc<K>| {
        for tx in &changes {
            let _ = tx.unbounded_send(obj.clone());
        }
    };
    events
        // The index adds ahead of the store and removes behind it: never less than the store.
        .inspect(move |ev| {
            if let (Some(i), Ok(ev)) = (&before, ev) {
                i.before(ev);
            }
        })
        .reflect(writer)
        .inspect(move |ev| {
            if let (Some(i), Ok(ev)) = (&after, ev) {
                i.after(ev);
            }
            match ev {
                Ok(watcher::Event::Apply(obj)) => {
                    let r = reflector::ObjectRef::from_obj(obj);
                    send(reader.get(&r).unwrap_or_else(|| Arc::new(obj.clone())));
                }
                // A (re)list is complete: every object is a change (as kube's shared stores do).
                Ok(watcher::Event::InitDone) => {
                    for obj in reader.state() {
                        send(obj);
                    }
                }
                Ok(watcher::Event::Delete(obj)) => {
                    let obj = Arc::new(obj.clone());
                    for tx in &deletes {
                        let _ = tx.unbounded_send(obj.clone());
                    }
                }
                _ => {}
            }
        })
}

/// A stream filter that passes an object on only when `f` of it differs from the last value
/// seen for that object (by uid): its first sight, then each change of `f`.
///
/// What it remembers is two 64-bit hashes an object (the uid's and `f`'s); a deleted object's
/// entry stays (16 bytes), as deletions do not pass through a change stream.
pub fn when_changed<K: Resource>(
    f: impl Fn(&K) -> u64,
) -> impl FnMut(&Arc<K>) -> future::Ready<bool> {
    let mut seen: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    move |o: &Arc<K>| {
        let key = digest(&o.meta().uid);
        let d = f(o);
        future::ready(seen.insert(key, d) != Some(d))
    }
}

/// The resync as a stream: every object of `store` once per `every`, spread over it (one batch a
/// second, or one object per `every / n` when fewer), starting `every` after it is first polled.
/// A zero `every` is no resync: the stream never yields.
///
/// Controllers reconcile through it instead of requeueing each object at the resync interval:
/// kube's scheduler keeps an entry per requeued object for as long as it waits (about 800
/// bytes with its references and tables: 16 MB for 10,000 Sessions and their Users), where a
/// sweep holds a pointer per object of its round (an object deleted meanwhile lives on until
/// its batch, which the controller then skips). The work is the same, one reconcile per object
/// per interval.
pub fn sweep<K>(
    store: Store<K>,
    every: Duration,
) -> impl futures::Stream<Item = reflector::ObjectRef<K>> + Send
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    struct Round<K: Resource> {
        due: Vec<Arc<K>>,
        per_tick: usize,
        tick: Duration,
    }
    let first = Round {
        due: Vec::new(),
        per_tick: 0,
        tick: every,
    };
    futures::stream::unfold((store, first), move |(store, mut round)| async move {
        if every.is_zero() {
            return futures::future::pending().await;
        }
        loop {
            tokio::time::sleep(round.tick).await;
            if round.due.is_empty() {
                // A new round: what the cache holds now, spread over the interval.
                round.due = store.state();
                let n = round.due.len().max(1);
                round.tick = (every / u32::try_from(n).unwrap_or(u32::MAX)).max(SWEEP_TICK);
                round.per_tick = n.div_ceil(
                    usize::try_from(every.as_millis() / round.tick.as_millis().max(1))
                        .unwrap_or(usize::MAX)
                        .max(1),
                );
                if round.due.is_empty() {
                    round.tick = every;
                    continue;
                }
            }
            let at = round.due.len().saturating_sub(round.per_tick);
            let batch: Vec<_> = round
                .due
                .drain(at..)
                .map(|o| reflector::ObjectRef::from_obj(o.as_ref()))
                .collect();
            return Some((futures::stream::iter(batch), (store, round)));
        }
    })
    .flatten()
}

/// The shortest gap between two batches of a [`sweep`].
const SWEEP_TICK: Duration = Duration::from_secs(1);

/// A hash of `v`.
pub fn digest(v: &impl std::hash::Hash) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// What every cached object loses: `managedFields` and kubectl's last-applied copy.
pub fn trim_meta(m: &mut ObjectMeta) {
    m.managed_fields = None;
    if let Some(a) = m.annotations.as_mut() {
        a.remove(LAST_APPLIED);
        if a.is_empty() {
            m.annotations = None;
        }
    }
}

/// [`trim_meta`] for any kind.
pub fn trim<K: Resource>(o: &mut K) {
    trim_meta(o.meta_mut());
}

/// The metadata every cached child keeps: identity, times, labels, owners; `annotations` as
/// given. Not its resourceVersion: nothing reads a child's, and kube's store would keep it
/// twice (in the object and in its key), two strings per object.
fn child_meta(m: ObjectMeta, annotations: Option<BTreeMap<String, String>>) -> ObjectMeta {
    ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        creation_timestamp: m.creation_timestamp,
        deletion_timestamp: m.deletion_timestamp,
        labels: m.labels,
        owner_references: m.owner_references,
        annotations,
        ..ObjectMeta::default()
    }
}

/// A session pod as cached: what the Session controller reads (ownership, labels, the launch
/// record, node, phase, readiness and what holds a pending pod up), nothing else. The watch
/// already parses it as a [`CachedPod`] (node, phase, message, conditions and the containers'
/// states only); this keeps of those the conditions that tell readiness or why not and the
/// containers that wait.
pub fn trim_pod(p: &mut CachedPod) {
    use crate::controller::contract::{ACCESS_LABEL, LAUNCH_ANNOTATION, SERVER_LABEL};
    let mut m = std::mem::take(&mut p.metadata);
    p.owned = Some(crate::controller::contract::owned_digest(
        m.labels.as_ref(),
        m.annotations.as_ref(),
    ));
    p.launch = m
        .annotations
        .as_mut()
        .and_then(|a| a.remove(LAUNCH_ANNOTATION));
    // Of its labels, the two read (a paused pod, a pod's server): the others (the watch's own
    // selector, user, workspace, session) would cost a map node of about 540 bytes per pod,
    // plus their strings.
    m.labels = m
        .labels
        .map(|l| {
            l.into_iter()
                .filter(|(k, _)| k == ACCESS_LABEL || k == SERVER_LABEL)
                .collect::<BTreeMap<_, _>>()
        })
        .filter(|l| !l.is_empty());
    p.metadata = child_meta(m, None);
    // Read: the Ready condition, the False ones (the first with a message explains a pod that
    // is not ready; PodScheduled=False says why it is not placed), and the containers that
    // wait, with their reason. Kept in order, so every "first such" answer stays the same.
    if let Some(s) = p.status.as_mut() {
        s.conditions = s.conditions.take().map(|cs| {
            cs.into_iter()
                .filter(|c| c.type_ == "Ready" || c.status == "False")
                .map(|c| PodCondition {
                    // When the pod became ready: the session's real start.
                    last_transition_time: (c.type_ == "Ready")
                        .then_some(c.last_transition_time)
                        .flatten(),
                    type_: c.type_,
                    status: c.status,
                    reason: c.reason,
                    message: c.message,
                    ..PodCondition::default()
                })
                .collect()
        });
        for cs in [&mut s.init_container_statuses, &mut s.container_statuses] {
            if let Some(v) = cs.as_mut() {
                v.retain(|c| c.state.as_ref().is_some_and(|st| st.waiting.is_some()));
            }
            if cs.as_ref().is_some_and(Vec::is_empty) {
                *cs = None;
            }
        }
    }
}

/// A profile claim as cached: identity, the volume it is bound to (all the watch parses of its
/// spec, as a [`CachedClaim`]), and the labels and annotation read, kept apart
/// ([`CachedClaim::marks`]) without the maps.
pub fn trim_claim(c: &mut CachedClaim) {
    let mut m = std::mem::take(&mut c.metadata);
    c.marks = Some(ClaimMarks::of(&m));
    m.labels = None;
    // Nor its uid: a claim is looked up and referred to by name only.
    m.uid = None;
    c.metadata = child_meta(m, None);
}

/// Whether `v` is bound (or pre-bound) to a claim in `scope`: the only volumes the operator
/// looks up (by the name in a cached claim's `spec.volumeName`).
pub fn bound_in(scope: &Scope, v: &CachedVolume) -> bool {
    let claim_ns = v
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .and_then(|r| r.namespace.as_deref());
    match (scope, claim_ns) {
        (_, None) => false,
        (Scope::All, Some(_)) => true,
        (Scope::Namespace(ns), Some(c)) => ns == c,
    }
}

/// A PersistentVolume as cached: its name, its claim reference and its zone. The watch parses
/// only the parts of its spec that tell them (a [`CachedVolume`]); this takes the zone from the
/// node affinity or the zone label into [`CachedVolume::zone`] and drops the affinity, the
/// labels and the rest of the metadata (its uid and resourceVersion too: a volume is looked up
/// by name) and of the claim reference (the claim's namespace and name).
pub fn trim_volume(v: &mut CachedVolume) {
    v.zone = super::cached::volume_zone(v);
    let m = std::mem::take(&mut v.metadata);
    v.metadata = ObjectMeta {
        name: m.name,
        ..ObjectMeta::default()
    };
    v.spec = v.spec.take().map(|s| CachedVolumeSpec {
        claim_ref: s.claim_ref.map(|r| ObjectReference {
            namespace: r.namespace,
            name: r.name,
            ..ObjectReference::default()
        }),
        node_affinity: None,
    });
}

/// A Node as cached: name and labels.
pub fn trim_node(n: &mut PartialObjectMeta<Node>) {
    let m = std::mem::take(&mut n.metadata);
    n.metadata = ObjectMeta {
        name: m.name,
        uid: m.uid,
        resource_version: m.resource_version,
        labels: m.labels,
        ..ObjectMeta::default()
    };
}

/// A User as cached: without `status.effectiveSettings` (every setting with its provenance,
/// most of a User's size), which only the User status controller reads, to compare it with the
/// status it computes; it compares a digest instead, taken here from the full status and kept
/// in the status's cache-only field `cached` (eight bytes: an annotation cost a map node of
/// about 540 bytes and two strings per User).
pub fn trim_user(u: &mut User) {
    trim_meta(&mut u.metadata);
    let digest = crate::controller::user::status_digest(u.status.as_ref());
    if let Some(s) = u.status.as_mut() {
        s.cached = crate::crd::v1alpha1::CacheNote(Some(digest));
        s.effective_settings = Vec::new();
    }
}

/// Index key of a session's user: its label form, which a profile claim's user label also
/// carries (so a claim finds its user's sessions by it).
fn user_key(label: &str) -> String {
    format!("u/{label}")
}

/// A Session is found by its user, its server and its workspace.
pub fn session_keys(s: &Session) -> Vec<String> {
    let mut keys = vec![
        user_key(&crate::controller::contract::label_value(&s.spec.user)),
        format!("w/{}", s.spec.workspace),
    ];
    if let Some(server) = s.status.as_ref().and_then(|st| st.server.as_deref()) {
        keys.push(format!("s/{server}"));
    }
    keys
}

/// A profile claim is found by its profile label.
pub fn claim_keys(c: &CachedClaim) -> Vec<String> {
    c.marks()
        .profile
        .as_ref()
        .map(|p| vec![format!("p/{p}")])
        .unwrap_or_default()
}

/// Index key of the Users reported as duplicates.
const REPORTED_DUPLICATE: &str = "dup";

/// A User is found by its username, and among those reported as duplicates.
pub fn user_keys(u: &User) -> Vec<String> {
    let mut keys = vec![format!("n/{}", crate::controller::user::uname(u))];
    if crate::controller::user::reported_duplicate(u) {
        keys.push(REPORTED_DUPLICATE.to_string());
    }
    keys
}

impl Stores {
    /// The sessions of `user` in `ns`, by name.
    pub fn sessions_of_user(&self, ns: &str, user: &str) -> Vec<Arc<Session>> {
        let key = user_key(&crate::controller::contract::label_value(user));
        let mut v = self.session_index.find(&self.sessions, ns, &key);
        v.retain(|s| s.spec.user == user);
        v
    }

    /// The sessions in `ns` whose user has the label value `label` (a profile claim's user).
    pub fn sessions_of_user_label(&self, ns: &str, label: &str) -> Vec<Arc<Session>> {
        self.session_index
            .find(&self.sessions, ns, &user_key(label))
    }

    /// The sessions in `ns` placed on `server` (`status.server`).
    pub fn sessions_on_server(&self, ns: &str, server: &str) -> Vec<Arc<Session>> {
        self.session_index
            .find(&self.sessions, ns, &format!("s/{server}"))
    }

    /// The sessions in `ns` of `workspace`.
    pub fn sessions_of_workspace(&self, ns: &str, workspace: &str) -> Vec<Arc<Session>> {
        self.session_index
            .find(&self.sessions, ns, &format!("w/{workspace}"))
    }

    /// The profile claims in `ns` labelled with profile key `profile`.
    pub fn claims_of_profile(&self, ns: &str, profile: &str) -> Vec<Arc<CachedClaim>> {
        self.claim_index
            .find(&self.claims, ns, &format!("p/{profile}"))
    }

    /// The Users in `ns` whose username is `uname`.
    pub fn users_named(&self, ns: &str, uname: &str) -> Vec<Arc<User>> {
        self.user_index.find(&self.users, ns, &format!("n/{uname}"))
    }

    /// The Users in `ns` whose status reports a duplicate username.
    pub fn users_reported_duplicate(&self, ns: &str) -> Vec<Arc<User>> {
        self.user_index.find(&self.users, ns, REPORTED_DUPLICATE)
    }

    /// Waits until every cache has completed its first list. Controllers start only after this,
    /// so no decision is ever taken on a half-synced cache.
    pub async fn wait_until_ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.users.wait_until_ready().await?;
        self.groups.wait_until_ready().await?;
        self.workspaces.wait_until_ready().await?;
        self.pools.wait_until_ready().await?;
        self.servers.wait_until_ready().await?;
        self.assignments.wait_until_ready().await?;
        self.sessions.wait_until_ready().await?;
        self.pods.wait_until_ready().await?;
        self.claims.wait_until_ready().await?;
        self.nodes.wait_until_ready().await?;
        self.volumes.wait_until_ready().await?;
        Ok(())
    }
}

/// Objects of `store` in namespace `ns`.
pub fn in_namespace<K>(store: &Store<K>, ns: &str) -> Vec<Arc<K>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store
        .state()
        .into_iter()
        .filter(|o| o.meta().namespace.as_deref() == Some(ns))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_map(name: &str) -> k8s_openapi::api::core::v1::ConfigMap {
        k8s_openapi::api::core::v1::ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..ObjectMeta::default()
            },
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn every_change_reaches_every_subscriber_even_of_an_object_deleted_at_once() {
        use k8s_openapi::api::core::v1::ConfigMap;
        let mut shared = Shared::<ConfigMap>::new();
        let reader = shared.reader.clone();
        let mut a = shared.subscribe();
        let mut b = shared.subscribe();
        let mut deleted = shared.subscribe_deletes();
        // A pod's last update (being deleted), its removal, then another object's change: the
        // sequence after which kube's shared-store subscribers never woke again.
        let mut gone = config_map("gone");
        gone.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
        );
        let events = vec![
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(config_map("listed"))),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(gone.clone())),
            Ok(watcher::Event::Delete(gone)),
            Ok(watcher::Event::Apply(config_map("next"))),
        ];
        let n = fan_out(futures::stream::iter(events), shared).count().await;
        assert_eq!(n, 6, "every event passes on");
        for rx in [&mut a, &mut b] {
            let mut names = Vec::new();
            while let Ok(o) = rx.try_recv() {
                names.push(o.metadata.name.clone().unwrap_or_default());
            }
            assert_eq!(names, ["listed", "gone", "next"]);
        }
        let d = deleted.try_recv().unwrap();
        assert_eq!(d.metadata.name.as_deref(), Some("gone"));
        // The store holds what the watch says is there.
        assert!(
            reader
                .get(&reflector::ObjectRef::new("next").within("ns"))
                .is_some()
        );
        assert!(
            reader
                .get(&reflector::ObjectRef::new("gone").within("ns"))
                .is_none()
        );
        // What a subscriber receives is the store's own object, not a copy.
        let listed = reader.get(&reflector::ObjectRef::new("listed").within("ns"));
        assert!(listed.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_sweep_brings_every_object_back_once_per_interval_and_spreads_them() {
        use k8s_openapi::api::core::v1::ConfigMap;
        use std::collections::BTreeMap;
        let mut writer: Writer<ConfigMap> = Writer::default();
        let cm = |name: &str| ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        };
        for i in 0..1000 {
            writer.apply_watcher_event(&watcher::Event::Apply(cm(&format!("c{i}"))));
        }
        let every = Duration::from_secs(100);
        let start = tokio::time::Instant::now();
        let s = sweep(writer.as_reader(), every);
        futures::pin_mut!(s);
        // Each object once per round; rounds back to back, the first after one interval.
        let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut per_second: BTreeMap<u64, usize> = BTreeMap::new();
        for _ in 0..2000 {
            let r = s.next().await.expect("a sweep never ends");
            let at = start.elapsed().as_secs();
            seen.entry(r.name.clone()).or_default().push(at);
            *per_second.entry(at).or_default() += 1;
        }
        assert_eq!(seen.len(), 1000);
        for (name, at) in &seen {
            assert_eq!(at.len(), 2, "{name}: {at:?}");
            assert!(at[0] >= 100 && at[0] < 200, "{name} first at {at:?}");
            assert!(at[1] >= 200 && at[1] < 300, "{name} again at {at:?}");
        }
        // Spread: 10 a second (1,000 over 100 s), never the whole round at once.
        assert!(per_second.values().all(|n| *n <= 10), "{per_second:?}");
        // An object deleted meanwhile is not named by the next round.
        writer.apply_watcher_event(&watcher::Event::Delete(cm("c7")));
        let mut next = Vec::new();
        for _ in 0..999 {
            next.push(s.next().await.expect("a sweep never ends").name);
        }
        assert!(!next.contains(&"c7".to_string()));
        // No resync: a zero interval never names anything (and does not spin).
        let none = sweep(writer.as_reader(), Duration::ZERO);
        futures::pin_mut!(none);
        let waited = tokio::time::timeout(Duration::from_secs(10 * 3600), none.next()).await;
        assert!(waited.is_err(), "a zero interval yielded {waited:?}");
    }
    use crate::controller::cached::volume_zone;
    use crate::controller::contract;
    use crate::controller::session::{build, plan};
    use crate::crd::v1alpha1::SessionPhase;
    use kube::ResourceExt;
    use serde_json::json;

    #[tokio::test(start_paused = true)]
    async fn memory_is_released_once_per_quiet_spell_and_never_when_idle() {
        use std::sync::atomic::AtomicUsize;
        static RELEASED: AtomicUsize = AtomicUsize::new(0);
        let released = || RELEASED.load(Ordering::SeqCst);
        let q = Arc::new(QuietRelease::new());
        q.activity();
        tokio::time::sleep(QUIET * 3).await;
        assert_eq!(released(), 0, "nothing registered: no release, no timer");
        let _ = q.release.set(|| {
            RELEASED.fetch_add(1, Ordering::SeqCst);
        });
        // A burst: events closer together than QUIET.
        for _ in 0..10 {
            q.activity();
            tokio::time::sleep(QUIET / 2).await;
        }
        assert_eq!(released(), 0, "not during a burst");
        tokio::time::sleep(QUIET).await;
        assert_eq!(released(), 1, "once the burst is over");
        tokio::time::sleep(QUIET * 100).await;
        assert_eq!(released(), 1, "idle: nothing more");
        q.activity();
        tokio::time::sleep(QUIET * 2).await;
        assert_eq!(released(), 2, "the next event arms it again");
    }

    /// A session pod as the API server sends it, parsed as the watch parses it.
    fn pod(conditions: serde_json::Value, phase: &str, waiting: &str) -> CachedPod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": "s-1", "namespace": "ns", "uid": "p1", "resourceVersion": "7",
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"cubicle.dev/server": "ws-1", "cubicle.dev/access": "paused",
                    "app.kubernetes.io/managed-by": "cubicle", "cubicle.dev/user": "u"},
                "annotations": {
                    contract::LAUNCH_ANNOTATION: "{\"server\":\"ws-1\"}",
                    contract::SETTINGS_ANNOTATION: "{\"big\": true}",
                    "kubectl.kubernetes.io/last-applied-configuration": "{}"
                },
                "ownerReferences": [{"apiVersion": "cubicle.dev/v1alpha1", "kind": "Session",
                    "name": "s-1", "uid": "s1", "controller": true}],
                "managedFields": [{"manager": "x"}]
            },
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}],
                "volumes": [{"name": "profile", "persistentVolumeClaim": {"claimName": "p"}}]},
            "status": {"phase": phase, "conditions": conditions, "message": "m",
                "podIP": "10.0.0.1", "qosClass": "Burstable",
                "initContainerStatuses": [{"name": "init", "image": "i", "imageID": "",
                    "ready": true, "restartCount": 0,
                    "state": {"terminated": {"exitCode": 0}}}],
                "containerStatuses": [
                    {"name": "a", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                        "state": {"running": {}}},
                    {"name": "b", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                        "state": {"waiting": {"reason": waiting, "message": "Back-off"}}}]}
        }))
        .unwrap()
    }

    #[test]
    fn a_cached_pod_reads_as_the_api_server_sent_it() {
        // (conditions, phase) → (session phase unpaused, ready, message, unschedulable problem)
        let cases = [
            (
                json!([
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Initialized", "status": "False", "message": "init"},
                    {"type": "Ready", "status": "False", "message": "not ready"},
                ]),
                "Pending",
                (SessionPhase::Pending, false, "init", None),
            ),
            (
                json!([
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                        "message": "0/3 nodes are available"},
                ]),
                "Pending",
                (
                    SessionPhase::Pending,
                    false,
                    "0/3 nodes are available",
                    Some("Unschedulable: 0/3 nodes are available"),
                ),
            ),
            (
                json!([
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"},
                    {"type": "Ready", "status": "True"},
                ]),
                "Running",
                (SessionPhase::Running, true, "m", None),
            ),
            (
                json!([]),
                "Failed",
                (SessionPhase::Failed, false, "m", None),
            ),
        ];
        for ((conditions, phase, expect), waiting) in cases
            .into_iter()
            .flat_map(|c| [(c.clone(), "ContainerCreating"), (c, "ImagePullBackOff")])
        {
            let (session_phase, ready, message, unschedulable) = expect;
            let mut p = pod(conditions, phase, waiting);
            let parsed = p.clone();
            trim_pod(&mut p);
            // Trimming changes no answer.
            assert_eq!(plan::pending_problem(&p), plan::pending_problem(&parsed));
            for paused in [false, true] {
                assert_eq!(
                    plan::observe(Some(&p), paused),
                    plan::observe(Some(&parsed), paused)
                );
            }
            // And the answers are those of the pod sent.
            let o = plan::observe(Some(&p), false);
            assert_eq!(o.phase, session_phase);
            assert_eq!(o.ready, ready);
            assert_eq!(o.node.as_deref(), Some("n1"));
            assert_eq!(o.message.as_deref(), Some(message));
            let pulling = (waiting == "ImagePullBackOff").then_some("ImagePullBackOff: Back-off");
            let problem = (session_phase == SessionPhase::Pending)
                .then(|| unschedulable.or(pulling))
                .flatten();
            assert_eq!(o.problem.as_deref(), problem);
            if ready {
                assert_eq!(plan::observe(Some(&p), true).phase, SessionPhase::Paused);
            }
            assert_eq!(
                build::parse_launch_record(p.launch_annotation())
                    .server
                    .as_deref(),
                Some("ws-1"),
                "the launch record survives"
            );
            assert_eq!(
                p.labels().keys().collect::<Vec<_>>(),
                [contract::ACCESS_LABEL, contract::SERVER_LABEL],
                "only the labels read"
            );
            assert_eq!(p.owner_references()[0].uid, "s1");
            assert_eq!(
                p.uid().as_deref(),
                Some("p1"),
                "deletes are preconditioned on it"
            );
            assert_eq!(p.resource_version(), None, "never read");
            assert!(p.creation_timestamp().is_some());
            assert!(p.metadata.annotations.is_none(), "kept apart from a map");
            assert!(p.metadata.managed_fields.is_none());
            let st = p.status.as_ref().unwrap();
            assert!(st.init_container_statuses.is_none(), "none waits");
            assert_eq!(
                st.container_statuses.as_ref().map(Vec::len),
                Some(1),
                "one waits"
            );
            assert!(
                st.conditions
                    .iter()
                    .flatten()
                    .all(|c| c.last_transition_time.is_none()),
                "condition times are not kept"
            );
        }
    }

    fn volume(claim_ns: Option<&str>) -> CachedVolume {
        let mut v: CachedVolume = serde_json::from_value(json!({
            "metadata": {"name": "pv-1", "uid": "v1", "resourceVersion": "3",
                "labels": {"a": "b"}, "annotations": {"x": "y"}},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "hostPath": {"path": "/tmp/x"},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": ["n1"]},
                    {"key": contract::ZONE_LABEL, "operator": "In", "values": ["zone-b"]}
                ]}]}}
            }
        }))
        .unwrap();
        if let Some(ns) = claim_ns {
            v.spec.as_mut().unwrap().claim_ref = Some(ObjectReference {
                namespace: Some(ns.into()),
                name: Some("profile-alice".into()),
                uid: Some("c1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                ..ObjectReference::default()
            });
        }
        v
    }

    #[test]
    fn volumes_are_cached_bound_in_scope_with_their_zone() {
        let all = Scope::All;
        let one = Scope::Namespace("ns".into());
        assert!(!bound_in(&all, &volume(None)), "unbound: never looked up");
        assert!(bound_in(&all, &volume(Some("other"))));
        assert!(bound_in(&one, &volume(Some("ns"))));
        assert!(!bound_in(&one, &volume(Some("other"))));
        let full = volume(Some("ns"));
        let mut v = full.clone();
        trim_volume(&mut v);
        assert_eq!(volume_zone(&v), Some("zone-b".into()));
        assert_eq!(volume_zone(&v), volume_zone(&full));
        let r = v.spec.as_ref().unwrap().claim_ref.as_ref().unwrap();
        assert_eq!(r.name.as_deref(), Some("profile-alice"));
        assert!(r.kind.is_none());
        assert!(v.metadata.labels.is_none() && v.metadata.annotations.is_none());
        assert_eq!(v.name_any(), full.name_any(), "looked up by name");
        assert_eq!((v.uid(), v.resource_version()), (None, None));
        assert!(r.uid.is_none());
        // The zone is kept as found, the affinity that told it is not.
        assert_eq!(v.zone.as_deref(), Some("zone-b"));
        assert!(v.spec.as_ref().unwrap().node_affinity.is_none());
        // The zone label alone (no affinity) survives too.
        let mut labelled = volume(Some("ns"));
        labelled.spec.as_mut().unwrap().node_affinity = None;
        labelled.metadata.labels =
            Some([(contract::ZONE_LABEL.to_string(), "zone-c".into())].into());
        trim_volume(&mut labelled);
        assert_eq!(volume_zone(&labelled), Some("zone-c".into()));
        assert!(labelled.metadata.labels.is_none());
        // No zone either way: none.
        let mut nowhere = volume(Some("ns"));
        nowhere.spec.as_mut().unwrap().node_affinity = None;
        trim_volume(&mut nowhere);
        assert_eq!(volume_zone(&nowhere), None);
    }

    #[test]
    fn claims_keep_labels_our_annotations_and_the_volume() {
        let mut c: CachedClaim = serde_json::from_value(json!({
            "metadata": {"name": "profile-alice", "namespace": "ns", "uid": "c1",
                "resourceVersion": "9", "labels": {contract::PROFILE_LABEL: "k"},
                "annotations": {contract::RESET_BY_ANNOTATION: "s1",
                    "pv.kubernetes.io/bind-completed": "yes"}},
            "spec": {"volumeName": "pv-1", "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}}},
            "status": {"phase": "Bound"}
        }))
        .unwrap();
        let untrimmed = c.marks().into_owned();
        trim_claim(&mut c);
        assert_eq!(c.marks().profile.as_deref(), Some("k"));
        assert_eq!(c.marks().reset_by.as_deref(), Some("s1"));
        assert!(!c.marks().archived);
        assert_eq!(
            *c.marks(),
            untrimmed,
            "the same, read from the maps or kept apart"
        );
        assert!(
            c.metadata.labels.is_none() && c.metadata.annotations.is_none(),
            "no map kept"
        );
        assert_eq!(
            c.spec.as_ref().unwrap().volume_name.as_deref(),
            Some("pv-1")
        );
        assert_eq!(c.name_any(), "profile-alice");
        assert_eq!(
            (c.uid(), c.resource_version()),
            (None, None),
            "looked up by name only"
        );
    }
}
