//! What the benchmark does on the control plane as an administrator: CRDs, the tenant, sessions,
//! the floor's plain PVCs and Pods, watching progress, and cleaning up between runs.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::operator::samples;
use super::report::CacheEntry;
use super::{BenchError, Context};
use crate::controller::cached::{CachedClaim, CachedPod, CachedVolume};
use crate::controller::session::build::pod_name;
use crate::controller::stores::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::crd::v1alpha1::{
    Group, Server, ServerAssignment, ServerPool, Session, SessionPhase, User, Workspace,
};

const MANAGER: &str = "cubicle-bench";
/// The one Workspace of the tenant.
pub const WORKSPACE: &str = "desktop";
/// How many requests the harness keeps in flight when it creates or deletes objects.
pub const HARNESS_CONCURRENCY: usize = 64;

/// Starts the local control plane in `dir/cluster` with enough fake nodes for `pods` pods
/// (110 per node, the kubelet default, keeping a tenth of the room free; at least 3), saying
/// so through `progress`.
pub async fn start_control_plane(
    dir: &std::path::Path,
    pods: usize,
    progress: fn(String),
) -> Result<(crate::devenv::DevCluster, crate::devenv::DevOptions), BenchError> {
    let nodes = pods.div_ceil(100).max(3);
    progress(format!(
        "starting the local control plane with {nodes} fake nodes in {}",
        dir.display()
    ));
    let opts = crate::devenv::DevOptions {
        dir: dir.join("cluster"),
        nodes,
        zones: 3,
        timeout: Duration::from_secs(300),
        real_node: None,
        oidc: None,
    };
    let cluster = crate::devenv::DevCluster::start(&opts)
        .await
        .ctx("start the local control plane")?;
    Ok((cluster, opts))
}

/// Installs the CRDs (server-side apply) and waits until they are Established.
pub async fn install_crds(client: &Client) -> Result<(), BenchError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let ssa = PatchParams::apply(MANAGER).force();
    let mut names = Vec::new();
    for crd in crate::crd::all() {
        let name = crd.name_any();
        api.patch(&name, &ssa, &Patch::Apply(&crd))
            .await
            .ctx(format!("apply CRD {name}"))?;
        names.push(name);
    }
    for name in names {
        tokio::time::timeout(
            Duration::from_secs(60),
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .map_err(|_| BenchError(format!("CRD {name} not Established after 60 s")))?
        .ctx(format!("wait for CRD {name}"))?;
    }
    Ok(())
}

/// Creates namespace `name`.
pub async fn create_namespace(client: &Client, name: &str) -> Result<(), BenchError> {
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .ctx(format!("create namespace {name}"))?;
    Ok(())
}

/// The tenant: one Group that every local user joins and that allows persistent profiles, one
/// Workspace with a per-user profile claim, and `users`.
pub async fn create_tenant(client: &Client, ns: &str, users: &[String]) -> Result<(), BenchError> {
    let group: Group = from_json(json!({
        "apiVersion": "cubicle.dev/v1alpha1", "kind": "Group",
        "metadata": {"name": "everyone"},
        "spec": {"priority": 100, "settings": {
            "autoAddLocalUsers": true, "allowPersistentProfile": true}},
    }))?;
    let workspace: Workspace = from_json(json!({
        "apiVersion": "cubicle.dev/v1alpha1", "kind": "Workspace",
        "metadata": {"name": WORKSPACE},
        "spec": {
            "image": "example.invalid/desktop:1",
            "groups": ["everyone"],
            "persistentProfile": {
                "mountPath": "/home/kasm-user",
                "claimTemplate": {"name": "profile-{username}", "size": "1Gi"},
            },
        },
    }))?;
    let pp = PostParams::default();
    Api::<Group>::namespaced(client.clone(), ns)
        .create(&pp, &group)
        .await
        .ctx("create the Group")?;
    Api::<Workspace>::namespaced(client.clone(), ns)
        .create(&pp, &workspace)
        .await
        .ctx("create the Workspace")?;
    let api: Api<User> = Api::namespaced(client.clone(), ns);
    let results: Vec<Result<User, kube::Error>> = stream::iter(users.iter().cloned())
        .map(|name| {
            let api = api.clone();
            async move {
                let user: User = serde_json::from_value(json!({
                    "apiVersion": "cubicle.dev/v1alpha1", "kind": "User",
                    "metadata": {"name": name}, "spec": {"realm": "local"},
                }))
                .expect("static user");
                api.create(&PostParams::default(), &user).await
            }
        })
        .buffer_unordered(HARNESS_CONCURRENCY)
        .collect()
        .await;
    for r in results {
        r.ctx("create a User")?;
    }
    Ok(())
}

fn from_json<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, BenchError> {
    serde_json::from_value(v).ctx("build an object")
}

/// A Session of `user` for the tenant's Workspace.
pub fn session(name: &str, user: &str) -> Session {
    serde_json::from_value(json!({
        "apiVersion": "cubicle.dev/v1alpha1", "kind": "Session",
        "metadata": {"name": name},
        "spec": {"user": user, "workspace": WORKSPACE},
    }))
    .expect("static session")
}

/// Creates `sessions` (name, user) with [`HARNESS_CONCURRENCY`] requests in flight; returns how
/// many creations failed.
pub async fn create_sessions(client: &Client, ns: &str, sessions: Vec<(String, String)>) -> usize {
    let api: Api<Session> = Api::namespaced(client.clone(), ns);
    stream::iter(sessions)
        .map(|(name, user)| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &session(&name, &user))
                    .await
                    .is_err()
            }
        })
        .buffer_unordered(HARNESS_CONCURRENCY)
        .filter(|failed| futures::future::ready(*failed))
        .count()
        .await
}

/// Polls session `name` until it is Running (the harness's reads are not the operator's).
pub async fn wait_running(
    client: &Client,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> Result<Session, BenchError> {
    let api: Api<Session> = Api::namespaced(client.clone(), ns);
    let start = std::time::Instant::now();
    loop {
        if let Some(s) = api.get_opt(name).await.ctx(format!("get session {name}"))? {
            match s.status.as_ref().and_then(|st| st.phase) {
                Some(SessionPhase::Running) => return Ok(s),
                Some(p @ (SessionPhase::Refused | SessionPhase::Failed)) => {
                    return Err(BenchError(format!("session {name} ended {p:?}: {s:?}")));
                }
                _ => {}
            }
        }
        if start.elapsed() > timeout {
            return Err(BenchError(format!(
                "session {name} not Running after {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The PVC and Pod the operator made for one session, as templates for the floor: the same
/// objects, created directly by a plain client.
#[derive(Clone)]
pub struct Template {
    pvc: PersistentVolumeClaim,
    pod: Pod,
    claim_volume: String,
}

/// Reads the pod and profile claim of the operator's session `session` and strips what the
/// API server and controllers added (node, bound volume, status, identity).
pub async fn capture_template(
    client: &Client,
    ns: &str,
    session: &Session,
) -> Result<Template, BenchError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pod = pods
        .get(&pod_name(session))
        .await
        .ctx("read the operator's pod")?;
    let spec = pod.spec.clone().unwrap_or_default();
    let (claim_volume, claim_name) = spec
        .volumes
        .iter()
        .flatten()
        .find_map(|v| {
            let c = v.persistent_volume_claim.as_ref()?;
            Some((v.name.clone(), c.claim_name.clone()))
        })
        .ok_or_else(|| BenchError("the operator's pod mounts no profile claim".into()))?;
    let pvc = claims
        .get(&claim_name)
        .await
        .ctx("read the operator's profile claim")?;
    let mut pvc_spec = pvc.spec.clone().unwrap_or_default();
    pvc_spec.volume_name = None;
    let mut pod_spec = spec;
    pod_spec.node_name = None;
    Ok(Template {
        pvc: PersistentVolumeClaim {
            metadata: template_meta(&pvc.metadata),
            spec: Some(pvc_spec),
            status: None,
        },
        pod: Pod {
            metadata: template_meta(&pod.metadata),
            spec: Some(pod_spec),
            status: None,
        },
        claim_volume,
    })
}

/// Labels, and the annotations the operator set (not those of the scheduler or PV binder).
fn template_meta(m: &ObjectMeta) -> ObjectMeta {
    ObjectMeta {
        labels: m.labels.clone(),
        annotations: m.annotations.as_ref().map(|a| {
            a.iter()
                .filter(|(k, _)| k.starts_with("cubicle.dev/"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }),
        ..Default::default()
    }
}

impl Template {
    /// The claim, named `name`.
    pub fn pvc(&self, name: &str) -> PersistentVolumeClaim {
        let mut pvc = self.pvc.clone();
        pvc.metadata.name = Some(name.into());
        pvc
    }

    /// The pod, named `name`, mounting claim `claim`.
    pub fn pod(&self, name: &str, claim: &str) -> Pod {
        let mut pod = self.pod.clone();
        pod.metadata.name = Some(name.into());
        if let Some(spec) = pod.spec.as_mut() {
            for v in spec.volumes.iter_mut().flatten() {
                if v.name == self.claim_volume
                    && let Some(c) = v.persistent_volume_claim.as_mut()
                {
                    c.claim_name = claim.into();
                }
            }
        }
        pod
    }
}

/// Creates claim and pod `floor-<i>` for each `i < n`, claim first, with `concurrency` items in
/// flight (as the operator's reconciles do); returns how many items failed.
pub async fn create_floor(
    client: &Client,
    ns: &str,
    template: &Template,
    n: usize,
    concurrency: usize,
) -> usize {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    stream::iter(0..n)
        .map(|i| {
            let (claims, pods) = (claims.clone(), pods.clone());
            async move {
                let name = format!("floor-{i}");
                let pp = PostParams::default();
                let claim = claims.create(&pp, &template.pvc(&name)).await;
                if claim.is_err() {
                    return true;
                }
                pods.create(&pp, &template.pod(&name, &name)).await.is_err()
            }
        })
        .buffer_unordered(concurrency.max(1))
        .filter(|failed| futures::future::ready(*failed))
        .count()
        .await
}

/// Where an object stands in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Exists.
    Seen,
    /// Reached the goal (pod Running, session Running).
    Done,
    /// Will not reach it.
    Failed,
}

/// Counts of a [`Tracker`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Objects seen (in any stage).
    pub seen: usize,
    /// Objects done.
    pub done: usize,
    /// Objects failed.
    pub failed: usize,
}

impl Tally {
    /// Notes that object `name` is now in stage `now` (`stages`: each object's last stage).
    fn observe(&mut self, stages: &mut HashMap<String, Stage>, name: String, now: Stage) {
        match stages.insert(name, now) {
            Some(was) => self.count(was, -1),
            None => self.seen += 1,
        }
        self.count(now, 1);
    }

    fn count(&mut self, stage: Stage, by: isize) {
        let n = match stage {
            Stage::Done => &mut self.done,
            Stage::Failed => &mut self.failed,
            Stage::Seen => return,
        };
        *n = n.saturating_add_signed(by);
    }
}

/// Follows the objects of one namespace through a watch and counts their stages (an object
/// counts in the stage it was last seen in).
pub struct Tracker {
    tally: Arc<Mutex<Tally>>,
    /// When each object was first seen done (by name), on this process's clock.
    done_at: Arc<Mutex<HashMap<String, std::time::Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Tracker {
    /// Starts watching `api`; returns once the first list is in.
    pub async fn start<K, F>(api: Api<K>, stage: F) -> Self
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Default,
        F: Fn(&K) -> Stage + Send + 'static,
    {
        let tally = Arc::new(Mutex::new(Tally::default()));
        let done_at = Arc::new(Mutex::new(HashMap::new()));
        let synced = Arc::new(tokio::sync::Notify::new());
        let (t, s, d) = (tally.clone(), synced.clone(), done_at.clone());
        let task = tokio::spawn(async move {
            let mut stages: HashMap<String, Stage> = HashMap::new();
            let mut c = Tally::default();
            let events = watcher(api, watcher::Config::default()).default_backoff();
            futures::pin_mut!(events);
            // A watch error (a dropped connection, an expired resourceVersion under load) is
            // retried by the watcher after its backoff: it must not end the tracking, or a
            // burst never sees its last objects arrive.
            while let Some(ev) = events.next().await {
                let o = match ev {
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => o,
                    Ok(watcher::Event::InitDone) => {
                        s.notify_one();
                        continue;
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        eprintln!("[bench] tracking watch error, retrying: {e}");
                        continue;
                    }
                };
                let st = stage(&o);
                if matches!(st, Stage::Done) {
                    d.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(o.name_any())
                        .or_insert_with(std::time::Instant::now);
                }
                c.observe(&mut stages, o.name_any(), st);
                *t.lock().unwrap_or_else(|p| p.into_inner()) = c;
            }
        });
        synced.notified().await;
        Self {
            tally,
            done_at,
            task,
        }
    }

    /// When each object was first seen done, by name.
    pub fn done_at(&self) -> HashMap<String, std::time::Instant> {
        self.done_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The counts now.
    pub fn tally(&self) -> Tally {
        *self.tally.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A pod's stage: Running (the fake kubelet reports it) or Failed.
pub fn pod_stage(p: &Pod) -> Stage {
    match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Running") => Stage::Done,
        Some("Failed") => Stage::Failed,
        _ => Stage::Seen,
    }
}

/// A session's stage: Running, or refused/failed.
pub fn session_stage(s: &Session) -> Stage {
    match s.status.as_ref().and_then(|st| st.phase) {
        Some(SessionPhase::Running) => Stage::Done,
        Some(SessionPhase::Refused | SessionPhase::Failed) => Stage::Failed,
        _ => Stage::Seen,
    }
}

/// Sessions of a namespace as listed: counts by stage, and when the last of them started.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionOutcome {
    /// Sessions listed.
    pub seen: usize,
    /// Running.
    pub done: usize,
    /// Refused or failed.
    pub failed: usize,
    /// The latest `status.startedAt` among them.
    pub last_started: Option<jiff::Timestamp>,
}

/// Lists the sessions of `ns` (in pages) and tells how far they got.
pub async fn session_outcome(client: &Client, ns: &str) -> Result<SessionOutcome, BenchError> {
    let api: Api<Session> = Api::namespaced(client.clone(), ns);
    let mut out = SessionOutcome::default();
    let mut lp = ListParams::default().limit(500);
    loop {
        let page = api
            .list(&lp)
            .await
            .ctx(format!("list the sessions of {ns}"))?;
        for s in &page.items {
            out.seen += 1;
            match session_stage(s) {
                Stage::Done => out.done += 1,
                Stage::Failed => out.failed += 1,
                Stage::Seen => {}
            }
            let started = s.status.as_ref().and_then(|st| st.started_at.as_ref());
            if let Some(t) = started
                && out.last_started.is_none_or(|l| t.0 > l)
            {
                out.last_started = Some(t.0);
            }
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => return Ok(out),
        }
    }
}

/// Empties namespace `ns` quickly and deletes it, so that the next run starts on a cluster
/// without leftovers: sessions first (the operator is stopped by then), pods at once (grace 0),
/// claims and their volumes with their protection finalizers removed (the volumes are
/// `Retain`ed, and the operator caches every PersistentVolume of the cluster).
pub async fn cleanup(client: &Client, ns: &str) -> Result<(), BenchError> {
    let lp = ListParams::default();
    let sessions: Api<Session> = Api::namespaced(client.clone(), ns);
    delete_all(&sessions, &DeleteParams::default())
        .await
        .ctx(format!("delete the sessions of {ns}"))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    delete_all(&pods, &DeleteParams::default().grace_period(0))
        .await
        .ctx(format!("delete the pods of {ns}"))?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    let names: Vec<String> = claims
        .list_metadata(&lp)
        .await
        .ctx(format!("list the claims of {ns}"))?
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    drop_finalizers(&claims, names).await;
    delete_all(&claims, &DeleteParams::default())
        .await
        .ctx(format!("delete the claims of {ns}"))?;
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let mine: Vec<String> = volumes
        .list(&lp)
        .await
        .ctx("list PersistentVolumes")?
        .items
        .iter()
        .filter(|v| {
            v.spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|c| c.namespace.as_deref())
                == Some(ns)
        })
        .map(|v| v.name_any())
        .collect();
    drop_finalizers(&volumes, mine.clone()).await;
    stream::iter(mine)
        .for_each_concurrent(HARNESS_CONCURRENCY, |name| {
            let volumes = volumes.clone();
            async move {
                let _ = volumes.delete(&name, &DeleteParams::default()).await;
            }
        })
        .await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(ns, &DeleteParams::default())
        .await;
    Ok(())
}

/// Deletes every object of `api`, trying again while the API server times out: a collection of
/// thousands takes it longer than its request timeout (60 s), and it goes on deleting after it
/// has answered with the timeout.
async fn delete_all<K>(api: &Api<K>, dp: &DeleteParams) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let mut tries = 0;
    loop {
        match api.delete_collection(dp, &ListParams::default()).await {
            Ok(_) => return Ok(()),
            Err(e) if tries < 20 => {
                tries += 1;
                super::progress(format!("deleting a collection, trying again: {e}"));
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn drop_finalizers<K>(api: &Api<K>, names: Vec<String>)
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let patch = Patch::Merge(json!({"metadata": {"finalizers": null}}));
    stream::iter(names)
        .for_each_concurrent(HARNESS_CONCURRENCY, |name| {
            let api = api.clone();
            let patch = &patch;
            async move {
                let _ = api.patch(&name, &PatchParams::default(), patch).await;
            }
        })
        .await;
}

/// Error responses the API server has served so far, by `"VERB resource code"`, from its own
/// `apiserver_request_total` (every client counted; empty if the metrics cannot be read).
pub async fn apiserver_errors(client: &Client) -> BTreeMap<String, f64> {
    let text = apiserver_metrics(client).await;
    sum_series(&text, "apiserver_request_total", error_key)
}

/// `"VERB resource code"` of an error response's series.
fn error_key(l: &BTreeMap<String, String>) -> Option<String> {
    let code = l.get("code").map(String::as_str).unwrap_or_default();
    (code.starts_with('4') || code.starts_with('5'))
        .then(|| format!("{} {} {code}", label(l, "verb"), resource(l)))
}

/// `"VERB resource"` of a request duration series, but a watch's (it stays open).
fn seconds_key(l: &BTreeMap<String, String>) -> Option<String> {
    let verb = label(l, "verb");
    (!matches!(verb.as_str(), "WATCH" | "WATCHLIST" | "CONNECT"))
        .then(|| format!("{verb} {}", resource(l)))
}

/// The resource of a watch event series.
fn watch_key(l: &BTreeMap<String, String>) -> Option<String> {
    l.get("resource").or(l.get("kind")).cloned()
}

/// What the API server has done so far for every client: the seconds it spent on requests, by
/// `"VERB resource"` (from `apiserver_request_duration_seconds`; watches, which stay open, are
/// left out), and the watch events it sent, by resource (`apiserver_watch_events_total`).
/// Empty if its metrics cannot be read.
pub async fn apiserver_work(client: &Client) -> ApiServerWork {
    let text = apiserver_metrics(client).await;
    ApiServerWork {
        seconds: sum_series(&text, "apiserver_request_duration_seconds_sum", seconds_key),
        watch_events: sum_series(&text, "apiserver_watch_events_total", watch_key),
    }
}

/// See [`apiserver_work`].
#[derive(Debug, Clone, Default)]
pub struct ApiServerWork {
    /// Seconds spent on requests, by `"VERB resource"`.
    pub seconds: BTreeMap<String, f64>,
    /// Watch events sent, by resource.
    pub watch_events: BTreeMap<String, f64>,
}

async fn apiserver_metrics(client: &Client) -> String {
    let Ok(req) = http::Request::get("/metrics").body(Vec::new()) else {
        return String::new();
    };
    client.request_text(req).await.unwrap_or_default()
}

fn label(l: &BTreeMap<String, String>, k: &str) -> String {
    l.get(k).cloned().unwrap_or_default()
}

/// `resource` or `resource/subresource`.
fn resource(l: &BTreeMap<String, String>) -> String {
    let sub = label(l, "subresource");
    if sub.is_empty() {
        label(l, "resource")
    } else {
        format!("{}/{sub}", label(l, "resource"))
    }
}

/// Sums the samples of series `name` in Prometheus text `text` by the key `key` gives their
/// labels (samples it gives no key are skipped).
fn sum_series(
    text: &str,
    name: &str,
    key: impl Fn(&BTreeMap<String, String>) -> Option<String>,
) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    // The API server's text is long: only the lines of `name` have their labels parsed.
    let lines = text.lines().filter(|l| {
        l.strip_prefix(name)
            .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
    });
    for (_, labels, v) in lines.flat_map(samples) {
        if let Some(k) = key(&labels) {
            *out.entry(k).or_default() += v;
        }
    }
    out
}

/// What the operator of namespace `ns` holds in its caches: objects and their JSON size as
/// cached (trimmed by the operator's own functions), by kind. Pods and claims are the
/// operator's own (label-selected), PersistentVolumes those bound in `ns`, Nodes every one
/// (labels only).
pub async fn cache_profile(
    client: &Client,
    ns: &str,
) -> Result<BTreeMap<String, CacheEntry>, BenchError> {
    use crate::controller::stores::{self as st, Scope};
    let all = ListParams::default();
    let managed = ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let c = client;
    let mut out = BTreeMap::new();
    out.insert(
        "User".into(),
        sizes(Api::<User>::namespaced(c.clone(), ns), &all, st::trim_user).await?,
    );
    out.insert(
        "Group".into(),
        sizes(Api::<Group>::namespaced(c.clone(), ns), &all, st::trim).await?,
    );
    out.insert(
        "Workspace".into(),
        sizes(Api::<Workspace>::namespaced(c.clone(), ns), &all, st::trim).await?,
    );
    out.insert(
        "ServerPool".into(),
        sizes(Api::<ServerPool>::namespaced(c.clone(), ns), &all, st::trim).await?,
    );
    out.insert(
        "Server".into(),
        sizes(Api::<Server>::namespaced(c.clone(), ns), &all, st::trim).await?,
    );
    out.insert(
        "ServerAssignment".into(),
        sizes(
            Api::<ServerAssignment>::namespaced(c.clone(), ns),
            &all,
            st::trim,
        )
        .await?,
    );
    out.insert(
        "Session".into(),
        sizes(Api::<Session>::namespaced(c.clone(), ns), &all, st::trim).await?,
    );
    out.insert(
        "Pod".into(),
        sizes(
            Api::<CachedPod>::namespaced(c.clone(), ns),
            &managed,
            st::trim_pod,
        )
        .await?,
    );
    out.insert(
        "PersistentVolumeClaim".into(),
        sizes(
            Api::<CachedClaim>::namespaced(c.clone(), ns),
            &managed,
            st::trim_claim,
        )
        .await?,
    );
    // The operator caches only the volumes bound in its scope (its namespace here).
    let scope = Scope::Namespace(ns.to_string());
    let mut volumes = Api::<CachedVolume>::all(c.clone())
        .list(&all)
        .await
        .ctx("list PersistentVolume")?
        .items;
    volumes.retain(|v| st::bound_in(&scope, v));
    out.insert(
        "PersistentVolume".into(),
        json_size(volumes, st::trim_volume as fn(&mut CachedVolume)),
    );
    let nodes = Api::<Node>::all(c.clone())
        .list_metadata(&all)
        .await
        .ctx("list Node metadata")?
        .items;
    out.insert("Node (metadata)".into(), json_size(nodes, st::trim_node));
    out.retain(|_, e| e.objects > 0);
    Ok(out)
}

async fn sizes<K>(api: Api<K>, lp: &ListParams, trim: fn(&mut K)) -> Result<CacheEntry, BenchError>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
    K::DynamicType: Default,
{
    let items = api
        .list(lp)
        .await
        .ctx(format!("list {}", K::kind(&Default::default())))?
        .items;
    Ok(json_size(items, trim))
}

/// Objects as the operator caches them (trimmed as its watches trim them), as JSON.
fn json_size<K: Serialize>(mut items: Vec<K>, trim: fn(&mut K)) -> CacheEntry {
    let bytes: usize = items
        .iter_mut()
        .map(|o| {
            trim(o);
            serde_json::to_vec(o).map(|v| v.len()).unwrap_or(0)
        })
        .sum();
    CacheEntry {
        objects: items.len(),
        json_mb: bytes as f64 / 1e6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_counts_each_object_in_its_last_stage() {
        let (mut t, mut stages) = (Tally::default(), HashMap::new());
        t.observe(&mut stages, "a".into(), Stage::Seen);
        t.observe(&mut stages, "b".into(), Stage::Done);
        t.observe(&mut stages, "a".into(), Stage::Done);
        t.observe(&mut stages, "b".into(), Stage::Done);
        assert_eq!(
            t,
            Tally {
                seen: 2,
                done: 2,
                failed: 0
            }
        );
        t.observe(&mut stages, "b".into(), Stage::Failed);
        assert_eq!(
            t,
            Tally {
                seen: 2,
                done: 1,
                failed: 1
            }
        );
    }

    const METRICS: &str = r#"# HELP apiserver_request_total [STABLE] Counter of apiserver requests
apiserver_request_total{code="201",component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="",verb="POST",version="v1"} 10
apiserver_request_total{code="409",component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="",verb="POST",version="v1"} 2
apiserver_request_total{code="500",component="apiserver",dry_run="",group="cubicle.dev",resource="sessions",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 1
apiserver_request_duration_seconds_sum{component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="",verb="POST",version="v1"} 1.5
apiserver_request_duration_seconds_sum{component="apiserver",dry_run="",group="",resource="pods",scope="namespace",subresource="",verb="POST",version="v1"} 0.5
apiserver_request_duration_seconds_sum{component="apiserver",dry_run="",group="",resource="pods",scope="namespace",subresource="",verb="WATCH",version="v1"} 900
apiserver_request_duration_seconds_sum{component="apiserver",dry_run="",group="cubicle.dev",resource="users",scope="resource",subresource="status",verb="PATCH",version="v1alpha1"} 0.25
apiserver_request_duration_seconds_count{component="apiserver",dry_run="",group="",resource="pods",scope="resource",subresource="",verb="POST",version="v1"} 12
apiserver_watch_events_total{group="",resource="pods",version="v1"} 40
apiserver_watch_events_total{group="cubicle.dev",resource="sessions",version="v1alpha1"} 7
"#;

    #[test]
    fn api_server_metrics_are_summed_by_request_kind() {
        let errors = sum_series(METRICS, "apiserver_request_total", error_key);
        assert_eq!(
            errors,
            BTreeMap::from([
                ("PATCH sessions/status 500".to_string(), 1.0),
                ("POST pods 409".to_string(), 2.0),
            ])
        );
        let seconds = sum_series(
            METRICS,
            "apiserver_request_duration_seconds_sum",
            seconds_key,
        );
        assert_eq!(
            seconds,
            BTreeMap::from([
                ("PATCH users/status".to_string(), 0.25),
                ("POST pods".to_string(), 2.0),
            ]),
            "scopes summed, watches and _count left out"
        );
        let watch = sum_series(METRICS, "apiserver_watch_events_total", watch_key);
        assert_eq!(watch["pods"], 40.0);
        assert_eq!(watch["sessions"], 7.0);
    }
}

/// Milliseconds from each pod's first sighting Running to its Session's first sighting Running
/// (both watched by the same process; a session's pod has the session's name). Sessions or pods
/// never seen Running are left out.
pub fn status_lags_ms(
    pods: &HashMap<String, std::time::Instant>,
    sessions: &HashMap<String, std::time::Instant>,
) -> Vec<f64> {
    sessions
        .iter()
        .filter_map(|(name, s)| {
            let p = pods.get(name)?;
            Some(s.saturating_duration_since(*p).as_secs_f64() * 1000.0)
        })
        .collect()
}

#[cfg(test)]
mod status_lag_tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_status_lag_pairs_each_session_with_its_pod_by_name() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let pods = HashMap::from([("a".to_string(), ms(100)), ("b".to_string(), ms(200))]);
        let sessions = HashMap::from([
            ("a".to_string(), ms(150)),
            ("b".to_string(), ms(180)), // seen before its pod: no lag, never negative
            ("c".to_string(), ms(300)), // its pod never seen Running: left out
        ]);
        let mut lags = status_lags_ms(&pods, &sessions);
        lags.sort_by(f64::total_cmp);
        assert_eq!(lags, vec![0.0, 50.0]);
    }
}
