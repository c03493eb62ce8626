//! One watch per kind, shared by every controller: reflector stores for lookups (reconcile makes
//! no uncached reads) and subscriber streams for triggers.
//!
//! Children (pods, profile claims) are watched through a label selector, so the operator caches
//! only what it manages; Nodes are watched as metadata only (the zone label is all we read).
//! `managedFields` are stripped before caching.

use std::sync::Arc;

use futures::channel::mpsc;
use futures::{StreamExt, future};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::PartialObjectMeta;
use kube::runtime::reflector::{self, ReflectHandle, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::crd::v1alpha1::{Group, Server, ServerAssignment, ServerPool, Session, User, Workspace};

/// Label on every object the operator creates.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Its value.
pub const MANAGED_BY: &str = "cubicle";

/// Buffer of each shared stream (events a slow subscriber may lag behind).
const BUFFER: usize = 1024;

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
    pub pods: Store<Pod>,
    /// Profile claims (label-selected).
    pub claims: Store<PersistentVolumeClaim>,
    /// Nodes, metadata only.
    pub nodes: Store<PartialObjectMeta<Node>>,
    /// PersistentVolumes (to learn the zone a profile claim is bound to).
    pub volumes: Store<PersistentVolume>,
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
}

impl<K> Shared<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default,
{
    fn new() -> Self {
        let (reader, writer) = reflector::store_shared(BUFFER);
        Self {
            writer,
            reader,
            deletes: Vec::new(),
        }
    }

    /// A stream of deleted objects. Shared subscribers only see changes, and a controller must
    /// also react when, say, a session that held a user's last slot goes away.
    pub fn subscribe_deletes(&mut self) -> mpsc::UnboundedReceiver<Arc<K>> {
        let (tx, rx) = mpsc::unbounded();
        self.deletes.push(tx);
        rx
    }

    /// A stream of changed objects for one controller's triggers.
    pub fn subscribe(&self) -> ReflectHandle<K> {
        self.writer
            .subscribe()
            .expect("shared stores hand out subscribers")
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
    pub pods: Shared<Pod>,
    /// Profile claims.
    pub claims: Shared<PersistentVolumeClaim>,
    nodes: (
        Store<PartialObjectMeta<Node>>,
        Writer<PartialObjectMeta<Node>>,
    ),
    volumes: (Store<PersistentVolume>, Writer<PersistentVolume>),
}

impl Reflectors {
    /// Prepares the caches of one scope.
    pub fn new(client: Client, scope: Scope) -> Self {
        let nodes = reflector::store();
        let volumes = reflector::store();
        Self {
            client,
            scope,
            users: Shared::new(),
            groups: Shared::new(),
            workspaces: Shared::new(),
            pools: Shared::new(),
            servers: Shared::new(),
            assignments: Shared::new(),
            sessions: Shared::new(),
            pods: Shared::new(),
            claims: Shared::new(),
            nodes,
            volumes,
        }
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
        }
    }

    /// Starts every watch. The returned tasks run until aborted.
    pub fn start(self) -> Vec<JoinHandle<()>> {
        let c = &self.client;
        let s = &self.scope;
        let managed =
            watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
        let all = watcher::Config::default();
        // An Api of PartialObjectMeta makes metadata-only requests.
        let nodes_api: Api<PartialObjectMeta<Node>> = Api::all(c.clone());
        let (_, node_writer) = self.nodes;
        let (_, volume_writer) = self.volumes;
        let volumes_api: Api<PersistentVolume> = Api::all(c.clone());
        let volume_task = tokio::spawn(
            watcher(volumes_api, all.clone())
                .default_backoff()
                .modify(|v| v.managed_fields_mut().clear())
                .reflect(volume_writer)
                .for_each(log_errors::<PersistentVolume>("PersistentVolume")),
        );
        let node_task = tokio::spawn(
            watcher(nodes_api, all.clone())
                .default_backoff()
                .modify(|n| n.managed_fields_mut().clear())
                .reflect(node_writer)
                .for_each(log_errors::<PartialObjectMeta<Node>>("Node")),
        );
        vec![
            drive(s.api::<User>(c), all.clone(), self.users, "User"),
            drive(s.api::<Group>(c), all.clone(), self.groups, "Group"),
            drive(
                s.api::<Workspace>(c),
                all.clone(),
                self.workspaces,
                "Workspace",
            ),
            drive(
                s.api::<ServerPool>(c),
                all.clone(),
                self.pools,
                "ServerPool",
            ),
            drive(s.api::<Server>(c), all.clone(), self.servers, "Server"),
            drive(
                s.api::<ServerAssignment>(c),
                all.clone(),
                self.assignments,
                "ServerAssignment",
            ),
            drive(s.api::<Session>(c), all, self.sessions, "Session"),
            drive(s.api::<Pod>(c), managed.clone(), self.pods, "Pod"),
            drive(
                s.api::<PersistentVolumeClaim>(c),
                managed,
                self.claims,
                "PersistentVolumeClaim",
            ),
            node_task,
            volume_task,
        ]
    }
}

fn log_errors<K>(
    kind: &'static str,
) -> impl FnMut(Result<watcher::Event<K>, watcher::Error>) -> future::Ready<()> {
    move |ev| {
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
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default + Send + Sync,
{
    let Shared {
        writer, deletes, ..
    } = shared;
    let mut log = log_errors::<K>(kind);
    tokio::spawn(
        watcher(api, cfg)
            .default_backoff()
            .modify(|o: &mut K| o.managed_fields_mut().clear())
            .reflect_shared(writer)
            .for_each(move |ev| {
                if let Ok(watcher::Event::Delete(obj)) = &ev {
                    let obj = Arc::new(obj.clone());
                    for tx in &deletes {
                        let _ = tx.unbounded_send(obj.clone());
                    }
                }
                log(ev)
            }),
    )
}

impl Stores {
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
