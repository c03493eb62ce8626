//! The gateway's own caches: Sessions (indexed by uid, the host label), a small view of their
//! pods, the Users, Groups and Workspaces that settings resolve from, and the people's own
//! preferences (UserPreferences). Fed by watches; a change to a Session or a pod wakes the
//! connection sweeper.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::debug;

use super::core::PodView;
use crate::controller::contract::ACCESS_LABEL;
use crate::crd::v1alpha1::{Group, Session, User, UserPreferences, Workspace};
use crate::resolve::Directory;

/// Namespace and name.
pub type Key = (String, String);

/// One kind's objects, keyed by namespace and name.
pub struct Table<T> {
    map: RwLock<HashMap<Key, Arc<T>>>,
    uids: RwLock<HashMap<String, Key>>,
    synced: AtomicUsize,
    scopes: usize,
}

impl<T> Table<T> {
    fn new(scopes: usize) -> Self {
        Self {
            map: RwLock::default(),
            uids: RwLock::default(),
            synced: AtomicUsize::new(0),
            scopes,
        }
    }

    /// The object `ns/name`.
    pub fn get(&self, ns: &str, name: &str) -> Option<Arc<T>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// The object with this uid.
    pub fn by_uid(&self, uid: &str) -> Option<Arc<T>> {
        let key = self
            .uids
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(uid)
            .cloned()?;
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned()
    }

    /// Every object of namespace `ns`.
    pub fn in_namespace(&self, ns: &str) -> Vec<Arc<T>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|((n, _), _)| n == ns)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every object.
    pub fn all(&self) -> Vec<Arc<T>> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Number of objects.
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire) >= self.scopes
    }

    fn put(&self, key: Key, uid: Option<String>, v: T) {
        if let Some(uid) = uid {
            self.uids
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(uid, key.clone());
        }
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, Arc::new(v));
    }

    fn remove(&self, key: &Key, uid: Option<&str>) {
        if let Some(uid) = uid {
            let mut uids = self.uids.write().unwrap_or_else(|p| p.into_inner());
            if uids.get(uid) == Some(key) {
                uids.remove(uid);
            }
        }
        self.map
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// After a (re)list of `scope` (a namespace, or every one): drops what the list did not
    /// have.
    fn replace_scope(&self, scope: Option<&str>, listed: HashMap<Key, (Option<String>, T)>) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        let mut uids = self.uids.write().unwrap_or_else(|p| p.into_inner());
        let in_scope = |k: &Key| scope.is_none_or(|s| k.0 == s);
        map.retain(|k, _| !in_scope(k));
        uids.retain(|_, k| !in_scope(k));
        for (k, (uid, v)) in listed {
            if let Some(uid) = uid {
                uids.insert(uid, k.clone());
            }
            map.insert(k, Arc::new(v));
        }
    }
}

/// The Sessions and pods that changed (a session's pod has the session's name, so one key
/// stands for both), or every one of them after a (re)list.
#[derive(Debug, Default)]
pub struct Changes {
    /// Everything may have changed.
    pub all: bool,
    /// The keys that did.
    pub keys: HashSet<Key>,
}

impl Changes {
    /// One object changed (`Some`), or every one may have (`None`: a relist).
    fn note(&mut self, key: Option<Key>) {
        match key {
            Some(k) if !self.all => {
                self.keys.insert(k);
            }
            Some(_) => {}
            None => {
                self.all = true;
                self.keys.clear();
            }
        }
    }
}

/// The gateway's caches.
pub struct Cache {
    /// Sessions.
    pub sessions: Table<Session>,
    /// Session pods (what the gateway needs of them).
    pub pods: Table<PodView>,
    /// Users.
    pub users: Table<User>,
    /// Groups.
    pub groups: Table<Group>,
    /// Workspaces.
    pub workspaces: Table<Workspace>,
    /// The people's own preferences (the dashboard's theme and auto launch).
    pub preferences: Table<UserPreferences>,
    /// Woken on every Session or pod change.
    pub changed: Notify,
    /// What changed since [`Cache::take_changes`] was last called.
    changes: Mutex<Changes>,
    /// Zones of the nodes (`topology.kubernetes.io/zone`), by node name: the dashboard's zone
    /// list.
    pub node_zones: RwLock<HashMap<String, String>>,
}

impl Cache {
    /// Whether every watch has listed at least once (before that, nothing is decided).
    pub fn synced(&self) -> bool {
        self.sessions.synced()
            && self.pods.synced()
            && self.users.synced()
            && self.groups.synced()
            && self.workspaces.synced()
            && self.preferences.synced()
    }

    /// What changed since the last call (the sweeper's: it checks those sessions alone).
    pub fn take_changes(&self) -> Changes {
        std::mem::take(&mut *self.changes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn note_change(&self, key: Option<Key>) {
        self.changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .note(key);
        self.changed.notify_one();
    }

    /// The directory settings resolve from in `ns`.
    pub fn directory(&self, ns: &str) -> Directory {
        Directory {
            namespace: ns.to_string(),
            groups: self.groups.in_namespace(ns),
            workspaces: self.workspaces.in_namespace(ns),
            pools: Vec::new(),
            servers: Vec::new(),
            assignments: Vec::new(),
        }
    }

    /// The zones of the nodes, sorted, without duplicates.
    pub fn zones(&self) -> Vec<String> {
        let m = self.node_zones.read().unwrap_or_else(|p| p.into_inner());
        let mut z: Vec<String> = m.values().cloned().collect();
        z.sort();
        z.dedup();
        z
    }

    /// The session's pod view.
    pub fn pod_of(&self, s: &Session) -> Option<Arc<PodView>> {
        self.pods.get(
            &s.namespace().unwrap_or_default(),
            &crate::controller::session::build::pod_name(s),
        )
    }
}

fn pod_view(p: &Pod) -> PodView {
    let status = p.status.as_ref();
    let ready = status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    PodView {
        owner_uid: p
            .owner_references()
            .iter()
            .find(|o| o.kind == "Session" && o.controller == Some(true))
            .map(|o| o.uid.clone())
            .unwrap_or_default(),
        ip: status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok()),
        ready,
        paused: p.labels().get(ACCESS_LABEL).is_some_and(|v| v == "paused"),
        deleting: p.metadata.deletion_timestamp.is_some(),
    }
}

/// Starts the watches; returns the cache and the tasks feeding it.
pub fn start(
    client: Client,
    namespaces: &[String],
) -> (Arc<Cache>, Vec<tokio::task::JoinHandle<()>>) {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().cloned().map(Some).collect()
    };
    let n = scopes.len();
    let cache = Arc::new(Cache {
        sessions: Table::new(n),
        pods: Table::new(n),
        users: Table::new(n),
        groups: Table::new(n),
        workspaces: Table::new(n),
        preferences: Table::new(n),
        changed: Notify::new(),
        changes: Mutex::default(),
        node_zones: RwLock::default(),
    });
    let mut tasks = vec![tokio::spawn(watch_zones(client.clone(), cache.clone()))];
    for scope in scopes {
        let c = cache.clone();
        tasks.push(tokio::spawn(feed(
            api::<Session>(&client, &scope),
            watcher::Config::default(),
            scope.clone(),
            move |cache: &Cache| &cache.sessions,
            |s: Session| s,
            true,
            c,
        )));
        let c = cache.clone();
        tasks.push(tokio::spawn(feed(
            api::<Pod>(&client, &scope),
            watcher::Config::default().labels("app.kubernetes.io/name=cubicle-session"),
            scope.clone(),
            move |cache: &Cache| &cache.pods,
            |p: Pod| pod_view(&p),
            true,
            c,
        )));
        let c = cache.clone();
        tasks.push(tokio::spawn(feed(
            api::<User>(&client, &scope),
            watcher::Config::default(),
            scope.clone(),
            move |cache: &Cache| &cache.users,
            |u: User| u,
            false,
            c,
        )));
        let c = cache.clone();
        tasks.push(tokio::spawn(feed(
            api::<Group>(&client, &scope),
            watcher::Config::default(),
            scope.clone(),
            move |cache: &Cache| &cache.groups,
            |g: Group| g,
            false,
            c,
        )));
        let c = cache.clone();
        tasks.push(tokio::spawn(feed(
            api::<Workspace>(&client, &scope),
            watcher::Config::default(),
            scope.clone(),
            move |cache: &Cache| &cache.workspaces,
            |w: Workspace| w,
            false,
            c,
        )));
        let c = cache.clone();
        tasks.push(tokio::spawn(feed(
            api::<UserPreferences>(&client, &scope),
            watcher::Config::default(),
            scope.clone(),
            move |cache: &Cache| &cache.preferences,
            |p: UserPreferences| p,
            false,
            c,
        )));
    }
    (cache, tasks)
}

/// Keeps [`Cache::node_zones`] from the nodes' metadata (a metadata-only watch). Not part of
/// [`Cache::synced`]: without it the zone list is only empty for a moment.
async fn watch_zones(client: Client, cache: Arc<Cache>) {
    use k8s_openapi::api::core::v1::Node;
    const ZONE: &str = "topology.kubernetes.io/zone";
    let api: Api<kube::core::PartialObjectMeta<Node>> = Api::all(client);
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut listing: HashMap<String, String> = HashMap::new();
    while let Some(ev) = stream.next().await {
        let zone =
            |m: &kube::core::ObjectMeta| m.labels.as_ref().and_then(|l| l.get(ZONE)).cloned();
        match ev {
            Ok(Event::Init) => listing.clear(),
            Ok(Event::InitApply(n)) => {
                if let Some(z) = zone(&n.metadata) {
                    listing.insert(n.name_any(), z);
                }
            }
            Ok(Event::InitDone) => {
                *cache.node_zones.write().unwrap_or_else(|p| p.into_inner()) =
                    std::mem::take(&mut listing);
            }
            Ok(Event::Apply(n)) => {
                let mut m = cache.node_zones.write().unwrap_or_else(|p| p.into_inner());
                match zone(&n.metadata) {
                    Some(z) => m.insert(n.name_any(), z),
                    None => m.remove(&n.name_any()),
                };
            }
            Ok(Event::Delete(n)) => {
                cache
                    .node_zones
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&n.name_any());
            }
            Err(e) => debug!(error = %e, "node watch error (retrying)"),
        }
    }
}

fn api<K>(client: &Client, scope: &Option<String>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as Resource>::DynamicType: Default,
{
    match scope {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

async fn feed<K, T>(
    api: Api<K>,
    config: watcher::Config,
    scope: Option<String>,
    table: impl Fn(&Cache) -> &Table<T> + Send + 'static,
    project: impl Fn(K) -> T + Send + 'static,
    notify: bool,
    cache: Arc<Cache>,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    T: Send + Sync + 'static,
{
    let stream = watcher::watcher(api, config).default_backoff();
    run_events(stream, scope, table, project, notify, cache).await;
}

async fn run_events<K, T>(
    stream: impl Stream<Item = Result<Event<K>, watcher::Error>>,
    scope: Option<String>,
    table: impl Fn(&Cache) -> &Table<T>,
    project: impl Fn(K) -> T,
    notify: bool,
    cache: Arc<Cache>,
) where
    K: Resource,
    T: Send + Sync,
{
    futures::pin_mut!(stream);
    let key = |o: &K| {
        (
            o.meta().namespace.clone().unwrap_or_default(),
            o.meta().name.clone().unwrap_or_default(),
        )
    };
    let mut listing: Option<HashMap<Key, (Option<String>, T)>> = None;
    let mut first = true;
    while let Some(ev) = stream.next().await {
        let t = table(&cache);
        match ev {
            Ok(Event::Init) => listing = Some(HashMap::new()),
            Ok(Event::InitApply(o)) => {
                let k = key(&o);
                let uid = o.meta().uid.clone();
                listing
                    .get_or_insert_with(HashMap::new)
                    .insert(k, (uid, project(o)));
            }
            Ok(Event::InitDone) => {
                t.replace_scope(scope.as_deref(), listing.take().unwrap_or_default());
                if first {
                    t.synced.fetch_add(1, Ordering::AcqRel);
                    first = false;
                }
                if notify {
                    cache.note_change(None);
                }
            }
            Ok(Event::Apply(o)) => {
                let k = key(&o);
                let uid = o.meta().uid.clone();
                let changed = notify.then(|| k.clone());
                t.put(k, uid, project(o));
                if changed.is_some() {
                    cache.note_change(changed);
                }
            }
            Ok(Event::Delete(o)) => {
                let k = key(&o);
                t.remove(&k, o.meta().uid.as_deref());
                if notify {
                    cache.note_change(Some(k));
                }
            }
            Err(e) => debug!(error = %e, "gateway watch error (retrying)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(name: &str) -> Option<Key> {
        Some(("ns".into(), name.into()))
    }

    #[test]
    fn changes_name_what_changed_until_a_relist_makes_it_everything() {
        let mut c = Changes::default();
        c.note(k("a"));
        c.note(k("b"));
        c.note(k("a"));
        assert!(!c.all);
        assert_eq!(c.keys.len(), 2);
        c.note(None);
        c.note(k("c"));
        assert!(c.all);
        assert!(c.keys.is_empty());
        assert!(std::mem::take(&mut c).all);
        assert!(!c.all && c.keys.is_empty());
    }
}
