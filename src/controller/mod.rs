//! The operator's controllers and the runtime they share.
//!
//! Startup order matters for safety: every cache completes its first list before any controller
//! starts (no decision on a half-synced cache), and controllers start only once this replica
//! holds the leader lease (when leader election is on). A replica that loses the lease exits.

pub mod assignment;
pub mod contract;
pub mod error;
#[cfg(test)]
pub(crate) mod fixtures;
pub mod group;
pub mod identity;
pub mod pool;
pub mod runtime;
pub mod server;
pub mod session;
pub mod status;
pub mod user;
pub mod workspace;
pub use runtime::{cached, events, gate, index, stores};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use kube::Client;
use kube::runtime::controller::Action;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::leader::Leadership;
use crate::metrics::Metrics;
pub use error::Error;
use stores::{Reflectors, Scope, Stores};

/// Name used for events and field managers.
pub const CONTROLLER_NAME: &str = "cubicle";

/// The default [`OperatorConfig::resync`]: ten hours, controller-runtime's default sync
/// period. Every reconcile of a resync costs CPU (about a quarter of a millisecond for a
/// Session or a User), so a steady operator spends `objects x cost / interval`: 10,000
/// Sessions and their Users cost about 18 ms of CPU a second at 5 minutes, 1.4 at an hour and
/// 0.14 at ten. Nothing waits for it: deadlines have their own requeue, and a watch that
/// re-lists reconciles everything it lists.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(10 * 3600);

/// The shortest resync the operator takes (0 aside: none). A shorter one is a polling loop.
pub const MIN_RESYNC: Duration = Duration::from_secs(60);

/// `d` as an [`OperatorConfig::resync`]: zero (none) or at least [`MIN_RESYNC`].
pub fn check_resync(d: Duration) -> Result<Duration, String> {
    if !d.is_zero() && d < MIN_RESYNC {
        return Err(format!(
            "a resync of {} s is shorter than a minute; use 0 for none or at least 60 s (1m)",
            d.as_secs_f64()
        ));
    }
    Ok(d)
}

/// How often the status of Servers and pools, read from Nodes (cached without a change stream),
/// is refreshed at the latest, whatever [`OperatorConfig::resync`] is.
pub const NODE_REFRESH: Duration = Duration::from_secs(300);

/// How the operator runs.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Namespaces to watch; empty means all.
    pub namespaces: Vec<String>,
    /// Parallel reconciles per controller.
    pub concurrency: u16,
    /// Periodic re-check of every object (safety net; no writes when steady): each controller
    /// sweeps its cache once per interval ([`stores::sweep`]), so an object waiting for it holds
    /// no entry in kube's scheduler. Zero: no resync. Deadlines never wait for it (each session
    /// is requeued at its own), and what is derived from Nodes, which have no change stream,
    /// is refreshed at least every [`NODE_REFRESH`] whatever this is.
    pub resync: Duration,
    /// This replica's identity (pod name).
    pub identity: String,
    /// The master key of session credentials: with it, each session gets a desktop password
    /// in a Secret of its own, injected as `VNC_PW` ([`session::credentials`]).
    pub credentials: Option<crate::credentials::MasterKey>,
    /// The gateway's public address: Running sessions get `status.url` on it.
    pub gateway_url: Option<crate::gateway::core::PublicUrl>,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            concurrency: 16,
            resync: DEFAULT_RESYNC,
            identity: "cubicle".into(),
            credentials: None,
            gateway_url: None,
        }
    }
}

/// The gauge of `kind`'s reconcile queue (`cubicle_reconcile_queue`).
pub fn queue_gauge(ctx: &Context, kind: &'static str) -> prometheus_client::metrics::gauge::Gauge {
    ctx.metrics
        .queued
        .get_or_create(&crate::metrics::KindLabel { kind })
        .clone()
}

/// Per-object retry counters for capped exponential backoff (kube has none built in).
///
/// Keyed by object reference (kind, namespace, name): the error policy records a failure and the
/// reconcile's success clears it under the same key, so a success resets the backoff and the map
/// holds only the objects failing now.
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<BackoffKey, u32>>,
}

/// The key of an object's backoff: what identifies it, never its resourceVersion or uid.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BackoffKey {
    kind: String,
    namespace: Option<String>,
    name: String,
}

impl BackoffKey {
    fn of<K: kube::Resource>(r: &ObjectRef<K>) -> Self {
        Self {
            kind: K::kind(&r.dyntype).into_owned(),
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        }
    }
}

impl Backoff {
    /// Records a failure of `r` and returns how long to wait: 1 s, 2 s, 4 s ... capped at 5 min.
    pub fn failed<K: kube::Resource>(&self, r: &ObjectRef<K>) -> Duration {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.entry(BackoffKey::of(r)).or_default();
        *n = n.saturating_add(1);
        Duration::from_secs(1u64 << (*n - 1).min(8)).min(Duration::from_secs(300))
    }

    /// Forgets `r`'s failures after a success.
    pub fn succeeded<K: kube::Resource>(&self, r: &ObjectRef<K>) {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        f.remove(&BackoffKey::of(r));
    }

    /// How many objects are backing off.
    pub fn len(&self) -> usize {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Whether no object is backing off.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What every reconcile gets.
pub struct Context {
    /// The API client (counted and rate-limited).
    pub client: Client,
    /// The caches.
    pub stores: Stores,
    /// Event recorder (one, shared, so that events aggregate).
    pub recorder: events::Recorder,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Configuration.
    pub config: OperatorConfig,
    /// Per-object backoff.
    pub backoff: Backoff,
    /// The Session controller's in-memory launch bookkeeping.
    pub launches: session::Launches,
    /// Expiry actions in flight.
    pub expiries: session::expiry::Actions,
}

impl Context {
    /// Builds the context of one scope.
    pub fn new(
        client: Client,
        stores: Stores,
        metrics: Arc<Metrics>,
        config: OperatorConfig,
    ) -> Self {
        let reporter = Reporter {
            controller: CONTROLLER_NAME.into(),
            instance: Some(config.identity.clone()),
        };
        let recorder = events::Recorder::new(client.clone(), reporter);
        Self {
            client,
            stores,
            recorder,
            metrics,
            config,
            backoff: Backoff::default(),
            launches: session::Launches::default(),
            expiries: session::expiry::Actions::default(),
        }
    }

    /// Waits until every cache of this scope has synced. Every controller awaits this before
    /// its first reconcile.
    pub async fn wait_synced(&self) {
        if self.stores.wait_until_ready().await.is_err() {
            std::future::pending::<()>().await
        }
    }

    /// The error policy shared by every controller: invalid objects wait for a change,
    /// transient errors back off per object.
    pub fn on_error<K>(&self, kind: &'static str, obj: &ObjectRef<K>, err: &Error) -> Action
    where
        K: kube::Resource,
        K::DynamicType: Eq + std::hash::Hash + Clone,
    {
        self.metrics.error(kind, err.category().as_str());
        warn!(kind, object = %obj, error = %error::chain(err), category = err.category().as_str(), "reconcile failed");
        if err.is_transient() {
            Action::requeue(self.backoff.failed(obj))
        } else {
            Action::await_change()
        }
    }
}

/// A controller to run: built from the shared reflectors before they start.
pub type ControllerFactory = fn(&mut Reflectors, Arc<Context>) -> BoxFuture<'static, ()>;

/// Every controller of the operator.
pub const ALL: &[ControllerFactory] = &[
    session::controller,
    user::controller,
    group::controller,
    server::controller,
    pool::controller,
    assignment::controller,
    identity::controller,
    workspace::controller,
];

/// The status controllers of the directory kinds (User, Group, Server, ServerPool, Workspace,
/// ServerAssignment).
pub const STATUS: &[ControllerFactory] = &[
    user::controller,
    group::controller,
    server::controller,
    pool::controller,
    assignment::controller,
    workspace::controller,
];

/// Runs `controllers` over every configured scope until `shutdown` resolves or leadership is lost.
///
/// With leader election, a replica first waits for the lease and only then builds its caches
/// (a follower keeps none: nothing can go stale behind a standby). `ready` backs `/readyz`: a
/// standby is ready; a leader is ready once every cache has synced.
pub async fn run(
    client: Client,
    config: OperatorConfig,
    metrics: Arc<Metrics>,
    controllers: &[ControllerFactory],
    ready: Arc<AtomicBool>,
    mut leadership: Option<watch::Receiver<Leadership>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), String> {
    tokio::pin!(shutdown);
    if let Some(rx) = leadership.as_mut() {
        ready.store(true, Ordering::Relaxed);
        info!("standing by for leadership");
        loop {
            match *rx.borrow_and_update() {
                Leadership::Leader => break,
                Leadership::Lost => return Err("lost leadership before starting".into()),
                Leadership::Follower => {}
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() {
                    return Err("leader election stopped".into());
                },
                _ = &mut shutdown => return Ok(()),
            }
        }
        ready.store(false, Ordering::Relaxed);
        info!("leading; building caches");
    }
    let scopes: Vec<Scope> = if config.namespaces.is_empty() {
        vec![Scope::All]
    } else {
        config
            .namespaces
            .iter()
            .map(|n| Scope::Namespace(n.clone()))
            .collect()
    };
    let mut watch_tasks = Vec::new();
    let mut caches = Vec::new();
    let mut all = Vec::new();
    for scope in scopes {
        let mut reflectors = Reflectors::new(client.clone(), scope.clone());
        let stores = reflectors.stores();
        metrics.observe_sessions(stores.sessions.clone());
        let ctx = Arc::new(Context::new(
            client.clone(),
            stores.clone(),
            metrics.clone(),
            config.clone(),
        ));
        let runs: Vec<_> = controllers
            .iter()
            .map(|f| f(&mut reflectors, ctx.clone()))
            .collect();
        watch_tasks.extend(reflectors.start());
        caches.push((scope, stores));
        all.extend(runs);
    }
    // Controllers are polled only once every cache has synced. kube's `Store::wait_until_ready`
    // keeps a single waker (a oneshot receiver inside `DelayedInit`): with several waiters at
    // once (each controller's runner, each reconcile's `Context::wait_synced`), all but the last
    // can miss the wake-up, leaving a controller, or one object's reconcile, stalled forever.
    // With one waiter (this loop) there is nothing to miss, and later waits return at once. A
    // store is marked ready before its first broadcast to subscribers, so the caches sync
    // without their subscribers being drained.
    let controllers = async {
        for (scope, stores) in &caches {
            if let Err(e) = stores.wait_until_ready().await {
                warn!(scope = ?scope, error = %e, "cache dropped");
                return Err("a cache stopped".to_string());
            }
            info!(scope = ?scope, "caches synced");
        }
        ready.store(true, Ordering::Relaxed);
        futures::future::join_all(all).await;
        Ok(())
    };
    let lost = async {
        match leadership.as_mut() {
            Some(rx) => loop {
                if *rx.borrow_and_update() == Leadership::Lost || rx.changed().await.is_err() {
                    return;
                }
            },
            None => std::future::pending::<()>().await,
        }
    };
    let result = tokio::select! {
        r = controllers => r,
        _ = &mut shutdown => { info!("shutting down"); Ok(()) }
        _ = lost => Err("lost leadership; exiting so that only the new leader writes".to_string()),
    };
    for t in watch_tasks {
        t.abort();
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::v1alpha1::Session;

    #[test]
    fn a_success_resets_the_backoff_under_the_key_the_failure_used() {
        let b = Backoff::default();
        let r = ObjectRef::<Session>::new("s").within("ns");
        let s = Duration::from_secs;
        assert_eq!(b.failed(&r), s(1));
        assert_eq!(b.failed(&r), s(2));
        assert_eq!(b.failed(&r), s(4));
        // The reconcile's reference carries the object's resourceVersion and uid; the error
        // policy's may not: the same object all the same.
        let mut seen = r.clone();
        seen.extra.resource_version = Some("42".into());
        seen.extra.uid = Some("u".into());
        b.succeeded(&seen);
        assert!(b.is_empty(), "the map holds only objects failing now");
        assert_eq!(b.failed(&r), s(1), "backoff starts over after a success");
        // Another kind or namespace of the same name is another object.
        let other = ObjectRef::<crate::crd::v1alpha1::User>::new("s").within("ns");
        assert_eq!(b.failed(&other), s(1));
        assert_eq!(
            b.failed(&ObjectRef::<Session>::new("s").within("ns2")),
            s(1)
        );
        assert_eq!(b.len(), 3);
        // Capped at five minutes.
        for _ in 0..20 {
            b.failed(&r);
        }
        assert_eq!(b.failed(&r), s(256).min(s(300)));
    }
}
