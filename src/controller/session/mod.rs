//! The Session controller: from a request to a running pod with its persistent profile.
//!
//! Each reconcile reads only the caches, decides purely ([`plan`], [`build`]) and then writes
//! the least it can: the profile claim when absent, the pod, and one status patch once the
//! session runs (a user's first launch: 3 writes; later launches: 2; a steady session: 0).
//!
//! Launches that compete for a limited resource (a user's `maxKasmsPerUser`, a pool's server
//! capacity) are serialised per user and per pool inside this replica, and every launched pod is
//! remembered until the pod cache shows it, so two concurrent launches never both take the last
//! slot. With leader election, only one replica ever launches.

pub mod build;
pub mod credentials;
pub mod expiry;
pub mod plan;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt, future::BoxFuture};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use self::build::{
    ACCESS_LABEL, ARCHIVED_LABEL, Placement, PodInputs, ProfileMount, SERVER_LABEL, ZONE_LABEL,
};
use self::plan::{AdmissionInputs, PoolKind, Refusal, ServerCandidate, reasons};
use super::cached::{CachedClaim, CachedPod, CachedVolume};
use super::gate::Inputs;
use super::status::directory;
use super::stores::{Reflectors, Stores, digest, in_namespace, sweep, when_changed};
use super::{CONTROLLER_NAME, Context, Error};
use crate::crd::v1alpha1::{
    DesiredState, Keepalive, KeepaliveExpirationAction, KeepaliveSource, ProfileMode,
    ProfileOutcome, ProfileStatus, Server, ServerAssignment, ServerPool, Session, SessionPhase,
    SessionStatus, User, Workspace,
};
use crate::resolve::{self, Directory};

/// Field manager of the Session controller's writes.
pub const FIELD_MANAGER: &str = "cubicle";
/// Annotation the expiry sets with `spec.state` when it stops or pauses a session, so the
/// permission check (allowKasmStop/allowKasmPause) applies to users, not to the expiry.
pub const STATE_SET_BY_ANNOTATION: &str = "cubicle.dev/state-set-by";
const KIND: &str = "Session";
/// How long a pending pod may be held up by a problem (unschedulable, image pull error...)
/// before the status says so.
const PENDING_REPORT_AFTER: Duration = Duration::from_secs(5);
/// How long the scheduler may hold a pod back for its claims (one it has not seen yet, one not
/// yet bound) before the status says so. In a burst the scheduler's cache lags the API server:
/// a pod can reach it before the claim created just ahead of it, and wait until it sees it.
const VOLUME_WAIT_REPORT_AFTER: Duration = Duration::from_secs(60);
/// How long a pod may take to start without a problem (volumes provisioning, a large image
/// pulling) before the status reports the slow start.
const SLOW_START_REPORT_AFTER: Duration = Duration::from_secs(300);

/// How long `problem` may last before it is reported.
fn report_after(problem: &str) -> Duration {
    if plan::waits_for_claims(problem) {
        VOLUME_WAIT_REPORT_AFTER
    } else {
        PENDING_REPORT_AFTER
    }
}

/// The `PodPending` message to write for a pending pod, if one is due: a problem once it has
/// lasted [`report_after`] it, a slow start after [`SLOW_START_REPORT_AFTER`]. A problem
/// already reported with the same reason keeps its message, so a scheduler retrying with new
/// node counts does not rewrite the status each time.
fn pending_report(problem: Option<&str>, age_secs: f64, old: &[Condition]) -> Option<String> {
    let reported = old
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "PodPending");
    match problem {
        Some(p) if age_secs >= report_after(p).as_secs_f64() => {
            let reason = |m: &str| m.split(':').next().unwrap_or_default().to_string();
            match reported {
                Some(c) if reason(&c.message) == reason(p) => Some(c.message.clone()),
                _ => Some(p.to_string()),
            }
        }
        _ if age_secs >= SLOW_START_REPORT_AFTER.as_secs_f64() => Some(
            reported
                .map(|c| c.message.clone())
                .unwrap_or_else(|| "the session pod is still starting".into()),
        ),
        _ => None,
    }
}

/// In-memory launch bookkeeping of this replica.
#[derive(Default)]
pub struct Launches {
    /// Sessions whose pod this replica created, with the server and when, until the pod cache
    /// shows it.
    launched: Mutex<HashMap<String, (Option<String>, std::time::Instant)>>,
    /// Per-user and per-pool launch locks.
    locks: Mutex<Locks>,
    /// Status writes the cache has not shown yet: a reconcile right after a write (a pod event
    /// queued meanwhile) still reads the session as it was, and must not write the same status
    /// again.
    statuses: super::status::Written,
}

#[derive(Default)]
struct Locks {
    locks: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Size at which the next pass drops the locks not in use.
    prune_at: usize,
}

/// How long a created pod may take to show up in the cache before the launch is retried.
const LAUNCH_VISIBLE_WITHIN: Duration = Duration::from_secs(30);

impl Launches {
    /// The lock of `key` (a user or a pool). A lock nobody holds or waits for is only in the
    /// map (one reference): such entries are dropped whenever the map has doubled since the
    /// last pass, so it stays as large as the locks in use, not as every user ever launched.
    fn lock(&self, key: String) -> Arc<tokio::sync::Mutex<()>> {
        let mut l = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if l.locks.len() >= l.prune_at {
            l.locks.retain(|_, m| Arc::strong_count(m) > 1);
            l.prune_at = (2 * l.locks.len()).max(64);
        }
        l.locks.entry(key).or_default().clone()
    }
    fn remember(&self, session: String, server: Option<String>) {
        self.launched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(session, (server, std::time::Instant::now()));
    }
    fn forget(&self, session: &str) {
        self.launched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(session);
    }
    /// A pod was created for `session` moments ago and the cache has not caught up yet.
    fn in_flight(&self, session: &str) -> bool {
        self.launched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(session)
            .is_some_and(|(_, at)| at.elapsed() < LAUNCH_VISIBLE_WITHIN)
    }
    fn snapshot(&self) -> HashMap<String, Option<String>> {
        self.launched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, (s, _))| (k.clone(), s.clone()))
            .collect()
    }
}

/// Builds the controller over the shared reflectors.
pub fn controller(r: &mut Reflectors, ctx: Arc<Context>) -> BoxFuture<'static, ()> {
    let stores = ctx.stores.clone();
    let by_user = {
        let stores = stores.clone();
        move |u: Arc<User>| {
            session_refs(u.namespace(), |ns| {
                stores.sessions_of_user(ns, &u.name_any())
            })
        }
    };
    let all_pending =
        |stores: Stores| move |ns: Option<String>| sessions_where(&stores, ns, |s| !is_steady(s));
    let groups = all_pending(stores.clone());
    let workspaces = {
        let stores = stores.clone();
        move |w: Arc<Workspace>| {
            session_refs(w.namespace(), |ns| {
                stores.sessions_of_workspace(ns, &w.name_any())
            })
        }
    };
    let servers = all_pending(stores.clone());
    let pools = all_pending(stores.clone());
    let assignments = all_pending(stores.clone());
    let siblings = {
        let stores = stores.clone();
        move |s: Arc<Session>| {
            session_refs(s.namespace(), |ns| {
                let mut v = stores.sessions_of_user(ns, &s.spec.user);
                v.retain(|o| o.metadata.name != s.metadata.name && waiting_for_room(o));
                v
            })
        }
    };
    let claims = {
        let stores = stores.clone();
        move |c: Arc<CachedClaim>| {
            let user = c.marks().user.clone().unwrap_or_default();
            session_refs(c.namespace(), |ns| stores.sessions_of_user_label(ns, &user))
        }
    };
    // Deletions are not broadcast to shared subscribers: a deleted session may free a slot for
    // its user's waiting sessions, and a deleted pod (eviction) must be re-created.
    let freed = {
        let stores = stores.clone();
        r.sessions
            .subscribe_deletes()
            .flat_map(move |s: Arc<Session>| {
                futures::stream::iter(session_refs(s.namespace(), |ns| {
                    let mut v = stores.sessions_of_user(ns, &s.spec.user);
                    v.retain(|o| waiting_for_room(o));
                    v
                }))
            })
    };
    let lost_pods = r.pods.subscribe_deletes().filter_map(|p: Arc<CachedPod>| {
        let owner = p
            .owner_references()
            .iter()
            .find(|o| o.kind == "Session" && o.controller == Some(true))
            .map(|o| ObjectRef::<Session>::new(&o.name).within(&p.namespace().unwrap_or_default()));
        futures::future::ready(owner)
    });
    let concurrency = ctx.config.concurrency;
    let depth = super::queue_gauge(&ctx, KIND);
    let resync = ctx.config.resync;
    let timers_ctx = ctx.clone();
    let owners = |p: Arc<CachedPod>| {
        let ns = p.namespace();
        p.owner_references()
            .iter()
            .filter_map(|o| ObjectRef::<Session>::from_owner_ref(ns.as_deref(), o, ()))
            .collect::<Vec<_>>()
    };
    let controller = Inputs::default()
        .own(r.sessions.subscribe())
        .map(r.pods.subscribe(), owners)
        // Status writes that sessions do not read (a User's activeSessions, a Server's or
        // a pool's session counts) change with every launch: passed on, each would fan out
        // to every session it maps to, quadratic in a burst. Only what sessions read (specs,
        // the usage ledger) goes through.
        .map(
            r.users.subscribe().filter(when_changed(|u: &User| {
                digest(&(
                    &u.metadata.generation,
                    u.status
                        .as_ref()
                        .map(|s| serde_json::to_string(&s.usage).ok()),
                ))
            })),
            by_user,
        )
        .map(r.groups.subscribe(), move |g| groups(g.namespace()))
        .map(r.workspaces.subscribe(), workspaces)
        .map(
            r.servers
                .subscribe()
                .filter(when_changed(|o: &Server| digest(&o.metadata.generation))),
            move |s| servers(s.namespace()),
        )
        .map(
            r.pools.subscribe().filter(when_changed(|o: &ServerPool| {
                digest(&o.metadata.generation)
            })),
            move |p| pools(p.namespace()),
        )
        .map(
            r.assignments
                .subscribe()
                .filter(when_changed(|o: &ServerAssignment| {
                    digest(&o.metadata.generation)
                })),
            move |a| assignments(a.namespace()),
        )
        .map(r.sessions.subscribe(), siblings)
        .map(r.claims.subscribe(), claims)
        .refs(freed)
        .refs(lost_pods)
        .refs(ctx.expiries.retries())
        .refs(sweep(r.sessions.reader.clone(), resync))
        .run(
            r.sessions.reader.clone(),
            concurrency,
            depth,
            move |s, ctx| reconcile(s, ctx, resync),
            |s, e, ctx: Arc<Context>| ctx.on_error(KIND, &ObjectRef::from_obj(s.as_ref()), e),
            ctx,
        )
        .for_each(|res| {
            match res {
                Ok((obj, _)) => debug!(session = %obj, "reconciled"),
                Err(e) => debug!(error = %e, "session controller event"),
            }
            futures::future::ready(())
        });
    // The fast path runs beside the controller from the moment the controller is first polled
    // (once every cache has synced) and stops with it. It has a thread and a timer of its own:
    // on the shared runtime, a timer is only looked at between other tasks' polls, and in a
    // burst of deletions those polls (cache updates, trigger mappings) would make it late. The
    // actions' API calls still run on the shared runtime.
    async move {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let main = tokio::runtime::Handle::current();
        let thread = std::thread::Builder::new()
            .name("cubicle-expiry".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                {
                    Ok(rt) => rt.block_on(run_timers(timers_ctx, main, stopped)),
                    Err(e) => warn!(error = %e, "expiry timer runtime not started"),
                }
            });
        if let Err(e) = thread {
            // The controller's own requeue still enforces every deadline, a second late.
            warn!(error = %e, "expiry timer thread not started");
        }
        controller.await;
        drop(stop);
    }
    .boxed()
}

/// Every session in `ns` for which `pred` holds: a pass over the namespace's sessions, for
/// triggers that are rare (a Group's, a Server's, a pool's or an assignment's spec changed).
fn sessions_where(
    stores: &Stores,
    ns: Option<String>,
    pred: impl Fn(&Session) -> bool,
) -> Vec<ObjectRef<Session>> {
    session_refs(ns, |ns| {
        let mut v = in_namespace(&stores.sessions, ns);
        v.retain(|s| pred(s));
        v
    })
}

/// References to the sessions `find` gives for namespace `ns` (none without one).
fn session_refs(
    ns: Option<String>,
    find: impl FnOnce(&str) -> Vec<Arc<Session>>,
) -> Vec<ObjectRef<Session>> {
    match ns {
        Some(ns) => find(&ns)
            .iter()
            .map(|s| ObjectRef::from_obj(s.as_ref()))
            .collect(),
        None => Vec::new(),
    }
}

/// Refused (or stopped and refused a resume): waiting for a slot a sibling may free.
fn waiting_for_room(s: &Session) -> bool {
    let phase = s.status.as_ref().and_then(|st| st.phase);
    phase == Some(SessionPhase::Refused)
        || (phase == Some(SessionPhase::Stopped)
            && s.spec.state.unwrap_or(DesiredState::Running) == DesiredState::Running)
}

/// Running or paused with a ready pod, or stopped: nothing for another object to unblock.
fn is_steady(s: &Session) -> bool {
    matches!(
        s.status.as_ref().and_then(|st| st.phase),
        Some(SessionPhase::Running | SessionPhase::Paused | SessionPhase::Stopped)
    )
}

fn session_key(ns: &str, name: &str) -> String {
    format!("{ns}/{name}")
}

fn node_zone(stores: &Stores, node: &str) -> Option<String> {
    stores.nodes.get(&ObjectRef::new(node)).and_then(|n| {
        n.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ZONE_LABEL).cloned())
    })
}

fn zones_with_nodes(stores: &Stores, selector: &BTreeMap<String, String>) -> Vec<String> {
    let mut zones: Vec<String> = stores
        .nodes
        .state()
        .iter()
        .filter_map(|n| {
            let labels = n.metadata.labels.as_ref()?;
            selector
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
                .then(|| labels.get(ZONE_LABEL).cloned())?
        })
        .collect();
    zones.sort();
    zones.dedup();
    zones
}

/// The zone a bound claim's volume is pinned to (node affinity or the zone label).
pub fn volume_zone(pv: &CachedVolume) -> Option<String> {
    if pv.zone.is_some() {
        return pv.zone.clone(); // as trimmed for the cache
    }
    let from_affinity = pv
        .spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
        .and_then(|r| {
            let zones: HashSet<&String> = r
                .node_selector_terms
                .iter()
                .flat_map(|t| t.match_expressions.iter().flatten())
                .filter(|e| e.key == ZONE_LABEL && e.operator == "In")
                .flat_map(|e| e.values.iter().flatten())
                .collect();
            (zones.len() == 1)
                .then(|| zones.into_iter().next().cloned())
                .flatten()
        });
    from_affinity.or_else(|| pv.labels().get(ZONE_LABEL).cloned())
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    old: &[Condition],
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: last,
    }
}

/// Status equality that ignores condition transition times (they are carried over anyway).
fn same_status(a: &SessionStatus, b: &SessionStatus) -> bool {
    let strip = |s: &SessionStatus| {
        let mut s = s.clone();
        // Remaining usage moves every second: it is refreshed whenever the status is written
        // for another reason, never on its own.
        s.usage_remaining_seconds = None;
        for c in &mut s.conditions {
            c.last_transition_time = Time(jiff::Timestamp::UNIX_EPOCH);
        }
        s.conditions.sort_by(|x, y| x.type_.cmp(&y.type_));
        s
    };
    strip(a) == strip(b)
}

struct Shell<'a> {
    ctx: &'a Context,
    session: &'a Session,
    ns: String,
    name: String,
    now: Time,
}

impl Shell<'_> {
    async fn patch_status(&self, status: &SessionStatus) -> Result<Session, Error> {
        let api: Api<Session> = Api::namespaced(self.ctx.client.clone(), &self.ns);
        let body =
            json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Session", "status": status});
        api.patch_status(
            &self.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(|source| Error::Status {
            kind: KIND,
            name: self.name.clone(),
            source,
        })
    }

    async fn event(&self, type_: EventType, reason: &str, note: String, action: &str) {
        let ev = Event {
            type_,
            reason: reason.into(),
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self
            .ctx
            .recorder
            .publish(&ev, &self.session.object_ref(&()))
            .await
        {
            debug!(error = %e, "event not recorded");
        }
    }
}

async fn reconcile(
    session: Arc<Session>,
    ctx: Arc<Context>,
    resync: Duration,
) -> Result<Action, Error> {
    debug!(session = %ObjectRef::from_obj(session.as_ref()), "reconcile");
    ctx.wait_synced().await;
    let _timer = ctx.metrics.reconcile_timer(KIND);
    let name = session.name_any();
    let Some(ns) = session.namespace() else {
        return Err(Error::NoNamespace { kind: KIND, name });
    };
    let key = session_key(&ns, &name);
    if session.metadata.deletion_timestamp.is_some() {
        ctx.launches.forget(&key);
        if session
            .finalizers()
            .iter()
            .any(|f| f == expiry::USAGE_FINALIZER)
        {
            // Account the session's running time before it disappears, then let it go.
            let user = ctx
                .stores
                .users
                .get(&ObjectRef::new(&session.spec.user).within(&ns));
            let limit = user.as_ref().and_then(|u| {
                resolve::resolve_user(&directory(&ctx.stores, &ns), u)
                    .settings
                    .usage_limit
            });
            let now = jiff::Timestamp::now();
            expiry::close_session(&ctx, &ns, &session, user.as_deref(), limit.as_ref(), now)
                .await?;
            expiry::remove_finalizer(&ctx, &ns, &session).await?;
        }
        return Ok(Action::await_change());
    }
    let sh = Shell {
        ctx: &ctx,
        session: &session,
        ns: ns.clone(),
        name: name.clone(),
        now: Time(jiff::Timestamp::now()),
    };
    let old = session.status.clone().unwrap_or_default();
    let stores = &ctx.stores;
    let generation = session.metadata.generation;

    // The pod, if it is this session's (a pod of an older session of the same name waits for GC).
    let pod = stores
        .pods
        .get(&ObjectRef::new(&build::pod_name(&session)).within(&ns));
    let uid = session.uid().unwrap_or_default();
    let pod = match pod {
        Some(p) if p.owner_references().iter().any(|o| o.uid == uid) => Some(p),
        Some(_) => return Ok(Action::requeue(Duration::from_secs(2))),
        None => None,
    };
    if pod.is_some() {
        ctx.launches.forget(&key);
    }

    let user = stores
        .users
        .get(&ObjectRef::new(&session.spec.user).within(&ns));
    let workspace = stores
        .workspaces
        .get(&ObjectRef::new(&session.spec.workspace).within(&ns));
    let dir = directory(stores, &ns);
    let resolved = user.as_ref().map(|u| resolve::resolve_user(&dir, u));
    let access = match (&user, &resolved, &workspace) {
        (Some(u), Some(r), Some(w)) => Some(resolve::access(&dir, u, r, w)),
        _ => None,
    };
    let settings = resolved.as_ref().map(|r| &r.settings);
    let allow_stop = settings.is_some_and(|s| s.allow_kasm_stop);
    let allow_pause = settings.is_some_and(|s| s.allow_kasm_pause);

    let desired = session.spec.state.unwrap_or(DesiredState::Running);
    let by_expiry = session
        .annotations()
        .get(STATE_SET_BY_ANNOTATION)
        .is_some_and(|v| v == "expiry");
    let state_refusal = plan::check_state_change(desired, allow_stop, allow_pause, by_expiry).err();
    // A refused state change leaves the session as it was.
    let effective = if state_refusal.is_some() {
        match old.phase {
            Some(SessionPhase::Stopped) => DesiredState::Stopped,
            Some(SessionPhase::Paused) => DesiredState::Paused,
            _ => DesiredState::Running,
        }
    } else {
        desired
    };

    let mut status = old.clone();
    status.observed_generation = generation;
    let mut conditions: Vec<Condition> = Vec::new();
    let mut requeue = horizon(resync);
    let now_ts = sh.now.0;
    // The deadline this pass leaves armed, if the fast path may enforce it (see below).
    let mut armable: Option<crate::expiry::Deadline> = None;
    ctx.expiries.disarm(&key);

    // Usage budget (when a usage limit applies to the user).
    let budget = match (&user, settings.and_then(|s| s.usage_limit.as_ref())) {
        (Some(u), Some(l)) => Some(expiry::budget(stores, &ns, u, l, now_ts)),
        _ => None,
    };

    // Keepalive and deadline, for admitted sessions.
    let resuming = effective == DesiredState::Running
        && matches!(
            old.phase,
            Some(SessionPhase::Stopped | SessionPhase::Paused)
        );
    if let Some(st) = settings
        && expiry::armed(old.phase, pod.is_some())
    {
        let persisted = old.last_keepalive.as_ref().map(|k| k.time.0);
        let reported = expiry::reported_keepalive(&session);
        let mut next = crate::expiry::next_keepalive(persisted, reported, now_ts);
        let mut source = if next.is_some() && next != persisted {
            KeepaliveSource::Annotation
        } else {
            old.last_keepalive
                .as_ref()
                .map(|k| k.source)
                .unwrap_or(KeepaliveSource::Start)
        };
        if resuming && state_refusal.is_none() {
            // Resuming is activity: the keepalive clock restarts now.
            next = Some(now_ts);
            source = KeepaliveSource::Start;
        }
        // Started: persisted, or now if this pass sees the pod ready for the first time (the
        // same instant the status write below records).
        let started = old.started_at.as_ref().map(|t| t.0).or_else(|| {
            pod.as_ref()
                .filter(|p| plan::observe(Some(p), false).ready)
                .map(|_| now_ts)
        });
        // The start counts as activity: no keepalive yet, or one older than the start (written
        // before the session existed, or by a client clock running behind), means the start.
        let created = session.creation_timestamp().map(|t| t.0).unwrap_or(now_ts);
        if let Some(start) = started.or(next.map(|_| created))
            && next.is_none_or(|k| k < start)
        {
            next = Some(start);
            source = KeepaliveSource::Start;
        }
        let stopped = old.phase == Some(SessionPhase::Stopped) && !resuming;
        let policy = crate::expiry::Policy {
            // A stopped session has no client: only the hard limits apply to it.
            keepalive_expiration: if stopped {
                Duration::MAX
            } else {
                st.keepalive_expiration
            },
            session_time_limit: st.session_time_limit,
            action: st.keepalive_expiration_action,
        };
        // This session consumes the budget from its start (even before the cache shows it).
        let uid = session.uid().unwrap_or_default();
        let usage_deadline = match (&budget, started) {
            (Some(b), Some(start)) => {
                let mut b = b.clone();
                if !b.open.iter().any(|o| o.uid == uid) {
                    b.open.push(crate::expiry::Open {
                        uid: uid.clone(),
                        start: expiry::ceil_ms(start),
                    });
                }
                b.exhausted_at(now_ts)
            }
            _ => None,
        };
        let times = crate::expiry::SessionTimes {
            created,
            started,
            last_keepalive: next.or(started),
        };
        let d = crate::expiry::deadline(&times, &policy, usage_deadline);
        // Stop and pause are done once requested (the pod follows spec.state).
        let noop = match d.action {
            KeepaliveExpirationAction::Delete => false,
            KeepaliveExpirationAction::Stop => stopped || effective == DesiredState::Stopped,
            KeepaliveExpirationAction::Pause => {
                stopped || matches!(effective, DesiredState::Paused | DesiredState::Stopped)
            }
        };
        if crate::expiry::is_due(&d, now_ts) && !noop && !resuming {
            // Decided here; the API calls run in a task of their own, so a reconcile slot is never
            // held for a round trip.
            return Ok(
                match Expiring::decide(&ctx, &session, &ns, &name, &d, now_ts) {
                    Some(e) => {
                        tokio::spawn(e.carry_out());
                        Action::await_change()
                    }
                    // This replica is already carrying it out; look again once it is done.
                    None => Action::requeue(Duration::from_secs(1)),
                },
            );
        }
        if let Some(k) = next {
            status.last_keepalive = Some(Keepalive {
                time: MicroTime(k),
                source,
            });
        }
        if d.at < jiff::Timestamp::MAX {
            status.expires_at = Some(MicroTime(d.at));
            status.expiry_rule = Some(d.rule);
            status.expiry_action = Some(d.action);
            if !noop {
                requeue = requeue.min(expiry::until(d.at, now_ts));
                // A usage deadline moves with other sessions: only the controller computes it.
                if budget.is_none() {
                    armable = Some(d);
                }
            }
        } else {
            status.expires_at = None;
            status.expiry_rule = None;
            status.expiry_action = None;
        }
        if let Some(b) = &budget {
            status.usage_remaining_seconds = Some(b.remaining_ms(now_ts) / 1000);
            if let Some(end) = b.window.end {
                requeue = requeue.min(expiry::until(end, now_ts));
            }
        }
    }
    let mut events: Vec<(EventType, &'static str, String, &'static str)> = Vec::new();
    // A refusal: a False condition of `type_` with the reason, and a Warning event the first
    // time this reason appears (events on transitions only).
    let refuse =
        |type_: &str,
         r: &Refusal,
         action: &'static str,
         conditions: &mut Vec<Condition>,
         events: &mut Vec<(EventType, &'static str, String, &'static str)>| {
            conditions.push(condition(
                type_,
                false,
                r.reason,
                &r.message,
                generation,
                &old.conditions,
                &sh.now,
            ));
            if old.conditions.iter().all(|c| c.reason != r.reason) {
                events.push((EventType::Warning, r.reason, r.message.clone(), action));
            }
        };

    let admitted_before = pod.is_some()
        || matches!(
            old.phase,
            Some(SessionPhase::Running | SessionPhase::Paused | SessionPhase::Stopped)
        );

    match effective {
        DesiredState::Stopped => {
            if let Some(p) = &pod {
                delete_pod(&ctx, &ns, p).await?;
                events.push((
                    EventType::Normal,
                    "Stopped",
                    "session stopped: pod removed, volumes kept".into(),
                    "Stop",
                ));
            }
            ctx.launches.forget(&key);
            if admitted_before || old.phase == Some(SessionPhase::Stopped) {
                status.phase = Some(SessionPhase::Stopped);
                status.url = None;
                status.node = None;
                status.pod = None;
            }
        }
        DesiredState::Running | DesiredState::Paused => {
            let paused = effective == DesiredState::Paused;
            if let Some(p) = &pod {
                // Pause keeps the pod and cuts access (label); resume restores it.
                let is_paused = p.labels().get(ACCESS_LABEL).is_some_and(|v| v == "paused");
                if is_paused != paused {
                    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
                    let value = if paused {
                        json!("paused")
                    } else {
                        serde_json::Value::Null
                    };
                    api.patch(
                        &p.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"labels": {ACCESS_LABEL: value}}})),
                    )
                    .await
                    .map_err(|source| Error::Child {
                        verb: "patch",
                        kind: "Pod",
                        name: p.name_any(),
                        source,
                    })?;
                    let (reason, note) = if paused {
                        (
                            "Paused",
                            "session paused: access cut, pod and resources kept",
                        )
                    } else {
                        ("Resumed", "session resumed from pause")
                    };
                    events.push((EventType::Normal, reason, note.into(), "Pause"));
                }
                let obs = plan::observe(Some(p), paused);
                if let Some(key) = &ctx.config.credentials
                    && credentials::missing(obs.problem.as_deref(), &session)
                {
                    credentials::ensure(&ctx, &ns, &session, key).await?;
                }
                status.url = ctx
                    .config
                    .gateway_url
                    .as_ref()
                    .filter(|_| obs.phase == SessionPhase::Running)
                    .map(|g| g.session(&uid));
                status.phase = Some(obs.phase);
                status.node = obs.node.clone();
                status.pod = Some(p.name_any());
                let record = build::parse_launch_record(p.launch_annotation());
                status.server = record.server.or(status.server.clone());
                if record.profile.is_some() {
                    status.profile = record.profile;
                }
                if obs.ready && status.started_at.is_none() {
                    status.started_at = Some(MicroTime(now_ts));
                }
                if obs.phase == SessionPhase::Pending {
                    let age = p
                        .creation_timestamp()
                        .map(|t| sh.now.0.duration_since(t.0).as_secs_f64())
                        .unwrap_or_default();
                    let report = pending_report(obs.problem.as_deref(), age, &old.conditions);
                    let reported_before = old.conditions.iter().any(|c| {
                        c.type_ == "Ready" && c.status == "False" && c.reason == "PodPending"
                    });
                    if report.is_none() && !reported_before && state_refusal.is_none() {
                        // Not worth a status write: the pod is on its way (the floor writes
                        // nothing while a pod starts either). Look again when the pod changes,
                        // and when a slow start becomes worth reporting.
                        for (t, reason, note, action) in events {
                            sh.event(t, reason, note, action).await;
                        }
                        let left = match obs.problem.as_deref() {
                            Some(p) => report_after(p).as_secs_f64() - age,
                            None => SLOW_START_REPORT_AFTER.as_secs_f64() - age,
                        };
                        let wait = Duration::from_secs_f64(left.max(0.1)).min(requeue);
                        return Ok(Action::requeue(wait));
                    }
                    conditions.push(condition(
                        "Ready",
                        false,
                        "PodPending",
                        // A problem reported before and now gone: say the pod is on its way.
                        &report.unwrap_or_else(|| "waiting for the session pod to start".into()),
                        generation,
                        &old.conditions,
                        &sh.now,
                    ));
                }
                if obs.phase == SessionPhase::Failed {
                    conditions.push(condition(
                        "Ready",
                        false,
                        "PodFailed",
                        obs.message.as_deref().unwrap_or("the session pod failed"),
                        generation,
                        &old.conditions,
                        &sh.now,
                    ));
                }
                if obs.ready {
                    conditions.push(condition(
                        "Ready",
                        true,
                        if paused { "Paused" } else { "Running" },
                        "",
                        generation,
                        &old.conditions,
                        &sh.now,
                    ));
                    // No Event for a routine start: the phase, the Ready condition's transition
                    // time and startedAt record it, and an Event would be one more API write per
                    // launch than the floor. Events are kept for what needs a reader's attention
                    // or what the operator did on its own (refusals, failures, expiry, stop,
                    // pause and resume).
                }
                conditions.push(condition(
                    "Admitted",
                    true,
                    reasons::ADMITTED,
                    "",
                    generation,
                    &old.conditions,
                    &sh.now,
                ));
            } else {
                // Launch (or resume after a stop, or re-create a pod lost to eviction) — unless
                // this replica just created the pod and the cache has not shown it yet.
                if ctx.launches.in_flight(&key) {
                    return Ok(Action::requeue(PENDING_REPORT_AFTER.min(requeue)));
                }
                let launch = launch(
                    &sh,
                    budget.as_ref(),
                    &dir,
                    user.as_deref(),
                    workspace.as_deref(),
                    resolved.as_ref(),
                    access.as_ref(),
                    admitted_before,
                    paused,
                )
                .await?;
                match launch {
                    Launched::Created => {
                        // Status is written once the pod runs (or after PENDING_REPORT_AFTER):
                        // what the launch decided travels on the pod (LAUNCH_ANNOTATION). A
                        // resume records its keepalive at once, so the old one cannot expire it.
                        if resuming && status.last_keepalive != old.last_keepalive {
                            let mut s = old.clone();
                            s.last_keepalive = status.last_keepalive.clone();
                            s.expires_at = status.expires_at.clone();
                            s.expiry_rule = status.expiry_rule;
                            s.expiry_action = status.expiry_action;
                            sh.patch_status(&s).await?;
                        }
                        return Ok(Action::requeue(PENDING_REPORT_AFTER.min(requeue)));
                    }
                    Launched::Failed(r) => {
                        status.phase = Some(SessionPhase::Failed);
                        refuse("Ready", &r, "Launch", &mut conditions, &mut events);
                    }
                    Launched::Refused(r) => {
                        if old.phase == Some(SessionPhase::Stopped) {
                            // A stopped session that cannot resume stays stopped and says why.
                            refuse("Resumed", &r, "Resume", &mut conditions, &mut events);
                        } else {
                            status.phase = Some(SessionPhase::Refused);
                            refuse("Admitted", &r, "Launch", &mut conditions, &mut events);
                        }
                    }
                }
            }
        }
    }
    if let Some(r) = &state_refusal {
        refuse(
            "StateChange",
            r,
            "ChangeState",
            &mut conditions,
            &mut events,
        );
    }
    if !conditions.is_empty() || status.phase != old.phase {
        // Keep conditions this pass did not compute only if they still apply.
        for c in &old.conditions {
            let recomputed = conditions.iter().any(|n| n.type_ == c.type_);
            let stale = (c.type_ == "StateChange" && state_refusal.is_none())
                || (c.type_ == "Resumed" && effective != DesiredState::Stopped)
                || (c.type_ == "Admitted"
                    && status.phase != Some(SessionPhase::Refused)
                    && c.status == "False");
            if !recomputed && !stale {
                conditions.push(c.clone());
            }
        }
        status.conditions = conditions;
    }
    let mut version = session.resource_version();
    let written = &ctx.launches.statuses;
    written.seen(session.as_ref());
    // The status (and the Events of its transition) already went out for this version of the
    // session: the cache has not caught up with that write yet.
    let changed = !same_status(&status, &old);
    let repeat = changed && written.already(session.as_ref(), &status);
    if changed && !repeat {
        version = sh.patch_status(&status).await?.resource_version();
        written.record(session.as_ref(), &status);
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
        info!(
            session = %key,
            phase = ?status.phase,
            ready = ready.map(|c| c.status.as_str()),
            reason = ready.map(|c| c.reason.as_str()),
            detail = ready.map(|c| c.message.as_str()),
            "session status updated"
        );
    }
    for (t, reason, note, action) in events.into_iter().filter(|_| !repeat) {
        sh.event(t, reason, note, action).await;
    }
    ctx.backoff.succeeded(&key);
    // A running or paused session with nothing else to do: its deadline goes to the fast path
    // (enforced at the instant without resolving settings again, as long as nothing it was
    // computed from has changed), and the controller's own requeue, a moment later, is only the
    // safety net.
    if let (Some(d), Some(version), Some(SessionPhase::Running | SessionPhase::Paused)) =
        (armable, version, status.phase)
    {
        ctx.expiries.arm(
            &key,
            expiry::Arm {
                at: d.at,
                rule: d.rule,
                action: d.action,
                uid: session.uid().unwrap_or_default(),
                session_version: version,
                user_generation: user.as_ref().and_then(|u| u.metadata.generation),
                groups: expiry::groups_digest(stores, &ns),
            },
        );
        requeue = horizon(resync).min(expiry::until(d.at, now_ts) + FAST_PATH_GRACE);
    }
    Ok(requeue_within(requeue, resync))
}

/// How far ahead a reconcile looks for its next requeue: the resync, or with none (zero) no
/// limit.
fn horizon(resync: Duration) -> Duration {
    if resync.is_zero() {
        Duration::MAX
    } else {
        resync
    }
}

/// Requeues at `requeue` when it comes before the resync; at the resync the controller's sweep
/// brings the session back ([`sweep`]), without an entry in kube's scheduler meanwhile (with no
/// resync, nothing brings it back but a change).
fn requeue_within(requeue: Duration, resync: Duration) -> Action {
    if requeue < horizon(resync) {
        Action::requeue(requeue)
    } else {
        Action::await_change()
    }
}

/// How long after an armed deadline the controller looks at the session itself, should the
/// fast path not have acted (it normally has, within milliseconds).
const FAST_PATH_GRACE: Duration = Duration::from_secs(1);

/// The fast path of the expiry: sleeps until the earliest armed deadline and, at it, enforces
/// every due session whose fingerprint still matches the cache; a session whose inputs changed
/// since it was armed goes back to a full reconcile (never acted on from stale inputs).
async fn run_timers(
    ctx: Arc<Context>,
    main: tokio::runtime::Handle,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        let now = jiff::Timestamp::now();
        // Every due session is decided first, then the whole batch is handed to the shared
        // runtime at once: spawning one by one would wake its workers (and their API calls)
        // while later sessions of the same instant still wait for their decision.
        let mut batch = Vec::new();
        let mut digests: HashMap<String, u64> = HashMap::new();
        for (key, arm) in ctx.expiries.take_due(now) {
            let (ns, name) = key.split_once('/').unwrap_or_default();
            let obj = ObjectRef::<Session>::new(name).within(ns);
            let Some(session) = ctx.stores.sessions.get(&obj) else {
                continue; // gone
            };
            let user_generation = ctx
                .stores
                .users
                .get(&ObjectRef::new(&session.spec.user).within(ns))
                .and_then(|u| u.metadata.generation);
            let groups = *digests
                .entry(ns.to_string())
                .or_insert_with(|| expiry::groups_digest(&ctx.stores, ns));
            if !arm.still_holds(&session, user_generation, groups) {
                ctx.expiries.retry(obj);
                continue;
            }
            let d = crate::expiry::Deadline {
                at: arm.at,
                rule: arm.rule,
                action: arm.action,
            };
            // The lateness is measured per session, at the moment each one is decided.
            if let Some(e) = Expiring::decide(&ctx, &session, ns, name, &d, jiff::Timestamp::now())
            {
                batch.push(e);
            }
        }
        if !batch.is_empty() {
            main.spawn(async move {
                for e in batch {
                    tokio::spawn(e.carry_out());
                }
            });
        }
        let wait = ctx
            .expiries
            .next()
            .map(|at| expiry::until(at, jiff::Timestamp::now()))
            .unwrap_or(Duration::from_secs(3600));
        tokio::select! {
            _ = ctx.expiries.sleep(wait) => {}
            _ = &mut stopped => return,
        }
    }
}

async fn delete_pod(ctx: &Context, ns: &str, p: &CachedPod) -> Result<(), Error> {
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
            verb: "delete",
            kind: "Pod",
            name: p.name_any(),
            source,
        }),
    }
}

enum Launched {
    Created,
    Refused(Refusal),
    Failed(Refusal),
}

#[allow(clippy::too_many_arguments)]
async fn launch(
    sh: &Shell<'_>,
    budget: Option<&expiry::Budget>,
    dir: &Directory,
    user: Option<&User>,
    workspace: Option<&Workspace>,
    resolved: Option<&resolve::Resolved>,
    access: Option<&resolve::Access>,
    admitted_before: bool,
    paused: bool,
) -> Result<Launched, Error> {
    let ctx = sh.ctx;
    let stores = &ctx.stores;
    let session = sh.session;
    let ns = &sh.ns;
    let key = session_key(ns, &sh.name);
    let settings = resolved.map(|r| &r.settings);
    let mut inputs = AdmissionInputs {
        user: session.spec.user.clone(),
        workspace: session.spec.workspace.clone(),
        user_found: user.is_some(),
        user_disabled: user.is_some_and(|u| u.spec.disabled.unwrap_or(false)),
        workspace_found: workspace.is_some(),
        access_denial: access
            .and_then(|a| a.allowed.as_ref().err())
            .map(|d| Refusal::new(d.reason(), d.to_string())),
        max_sessions: settings.and_then(|s| s.max_kasms_per_user),
        earlier_active: 0,
        usage_exhausted: budget.filter(|b| b.spent(sh.now.0)).map(|b| {
            format!(
                "{}: new sessions are refused until the window resets",
                b.describe(sh.now.0)
            )
        }),
        requested_zone: session.spec.zone.clone(),
        allow_zone_selection: settings.is_some_and(|s| s.allow_zone_selection),
        requested_profile: session.spec.persistent_profile,
        allow_persistent_profile: settings.is_some_and(|s| s.allow_persistent_profile),
        workspace_has_profile: workspace.is_some_and(|w| w.spec.persistent_profile.is_some()),
    };
    let (Some(user), Some(workspace), Some(resolved), Some(access)) =
        (user, workspace, resolved, access)
    else {
        return Ok(Launched::Refused(
            plan::admit(&inputs).expect_err("a missing object is refused"),
        ));
    };
    let settings = &resolved.settings;

    // Serialise launches that compete for the same limited slots.
    let user_lock = settings.max_kasms_per_user.map(|_| {
        ctx.launches
            .lock(format!("user/{ns}/{}", session.spec.user))
    });
    let _user_guard = match &user_lock {
        Some(l) => Some(l.lock().await),
        None => None,
    };
    let pool_lock = access
        .pool
        .as_ref()
        .map(|p| ctx.launches.lock(format!("pool/{ns}/{}", p.name_any())));
    let _pool_guard = match &pool_lock {
        Some(l) => Some(l.lock().await),
        None => None,
    };

    let launched = ctx.launches.snapshot();
    if !admitted_before {
        inputs.earlier_active = count_active_before(stores, session, &launched);
        if let Err(r) = plan::admit(&inputs) {
            return Ok(Launched::Refused(r));
        }
    }
    let mode = plan::profile_mode(&inputs);
    let username = user
        .spec
        .username
        .clone()
        .unwrap_or_else(|| user.name_any());
    let user_id = resolve::user_id(ns, user);

    // The profile: its claim (existing or to create), and the zone it is bound to.
    let profile_cfg = workspace
        .spec
        .persistent_profile
        .as_ref()
        .filter(|_| mode != ProfileMode::Disabled);
    let mut profile_status = ProfileStatus {
        outcome: Some(ProfileOutcome::Disabled),
        ..Default::default()
    };
    let mut profile_zone = None;
    let mut claim_plan: Option<ClaimPlan> = None;
    let mut mount: Option<ProfileMount> = None;
    let already_reset = session
        .status
        .as_ref()
        .and_then(|s| s.profile.as_ref())
        .and_then(|p| p.outcome)
        .is_some_and(|o| {
            matches!(
                o,
                ProfileOutcome::ResetArchived | ProfileOutcome::ResetFresh
            )
        });
    let reset = mode == ProfileMode::Reset && !already_reset;
    if let Some(cfg) = profile_cfg {
        if let Some(t) = &cfg.claim_template {
            let base = build::dns_name(&build::render_template(&t.name, &username, &user_id));
            let active = active_claim(stores, ns, &base);
            let uid = session.uid().unwrap_or_default();
            let done_by_me = active
                .as_ref()
                .is_some_and(|c| c.marks().reset_by.as_ref() == Some(&uid));
            let (claim_name, plan) = match (&active, reset && !done_by_me) {
                (Some(c), false) => {
                    profile_zone = bound_zone(stores, c);
                    (c.name_any(), None)
                }
                (old, true) => {
                    let name = next_claim_name(stores, ns, &base, sh.now.0.as_second());
                    (
                        name.clone(),
                        Some(ClaimPlan {
                            name,
                            base: base.clone(),
                            archive: old.as_ref().map(|c| c.name_any()),
                            reset_by: Some(uid.clone()),
                        }),
                    )
                }
                (None, false) => (
                    base.clone(),
                    Some(ClaimPlan {
                        name: base.clone(),
                        base: base.clone(),
                        archive: None,
                        reset_by: None,
                    }),
                ),
            };
            profile_status = ProfileStatus {
                claim: Some(claim_name.clone()),
                outcome: Some(if reset || done_by_me {
                    if plan.as_ref().is_some_and(|p| p.archive.is_some())
                        || (done_by_me
                            && session
                                .status
                                .as_ref()
                                .and_then(|s| s.profile.as_ref())
                                .and_then(|p| p.archived_as.clone())
                                .is_some())
                    {
                        ProfileOutcome::ResetArchived
                    } else {
                        ProfileOutcome::ResetFresh
                    }
                } else {
                    ProfileOutcome::Mounted
                }),
                archived_as: plan.as_ref().and_then(|p| p.archive.clone()),
                ..Default::default()
            };
            claim_plan = plan;
            mount = Some(ProfileMount::Claim {
                claim: claim_name,
                mount_path: cfg.mount_path.clone(),
            });
        } else if let Some(sv) = &cfg.shared_volume {
            let sub_path = build::render_template(&sv.sub_path, &username, &user_id);
            let archive_to = reset.then(|| format!("{sub_path}.archived-{}", sh.now.0.as_second()));
            profile_status = ProfileStatus {
                claim: Some(sv.claim_name.clone()),
                sub_path: Some(sub_path.clone()),
                outcome: Some(if reset { ProfileOutcome::ResetArchived } else { ProfileOutcome::Mounted }),
                archived_as: archive_to.clone(),
                message: reset.then(|| "the old profile directory is renamed (never deleted) by the profile-reset init container".to_string()),
            };
            if let Some(c) = stores
                .claims
                .get(&ObjectRef::new(&sv.claim_name).within(ns))
            {
                profile_zone = bound_zone(stores, &c);
            }
            mount = Some(ProfileMount::SubPath {
                claim: sv.claim_name.clone(),
                sub_path,
                mount_path: cfg.mount_path.clone(),
                archive_to,
            });
        }
    }

    // Placement.
    let pool_kind = match &access.pool {
        None => PoolKind::None {
            zones: zones_with_nodes(stores, &BTreeMap::new()),
        },
        Some(p) => match &p.spec.autoscale {
            Some(a) => PoolKind::Autoscale {
                pool: p.name_any(),
                node_selector: a.node_selector.clone(),
                zones: zones_with_nodes(stores, &a.node_selector),
            },
            None => PoolKind::Servers {
                pool: p.name_any(),
                candidates: access
                    .servers
                    .iter()
                    .map(|c| {
                        let s = &c.server;
                        let name = s.name_any();
                        ServerCandidate {
                            load: server_load(stores, ns, &name, &launched, &key),
                            zone: s
                                .spec
                                .zone
                                .clone()
                                .or_else(|| node_zone(stores, &s.spec.node_name)),
                            node: s.spec.node_name.clone(),
                            capacity: s.spec.max_sessions,
                            name,
                        }
                    })
                    .collect(),
            },
        },
    };
    let placement = match plan::place(
        &pool_kind,
        session.spec.zone.as_deref(),
        profile_zone.as_deref(),
    ) {
        Ok(p) => p,
        Err(r) => return Ok(Launched::Refused(r)),
    };
    let server = match &placement {
        Placement::Server { server, .. } => Some(server.clone()),
        _ => None,
    };

    // Writes: archive + claim (first launch or reset), then the pod.
    if let Some(cp) = &claim_plan
        && let Some(t) = profile_cfg.and_then(|c| c.claim_template.as_ref())
    {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
        if let Some(old) = &cp.archive {
            let patch =
                json!({"metadata": {"labels": {ARCHIVED_LABEL: sh.now.0.as_second().to_string()}}});
            api.patch(old, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .map_err(|source| Error::Child {
                    verb: "patch",
                    kind: "PersistentVolumeClaim",
                    name: old.clone(),
                    source,
                })?;
        }
        let pvc = build::profile_claim(
            &cp.name,
            &cp.base,
            t,
            &session.spec.user,
            &workspace.name_any(),
            ns,
            cp.reset_by.as_deref(),
        );
        match api.create(&PostParams::default(), &pvc).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(source) => {
                return Err(Error::Child {
                    verb: "create",
                    kind: "PersistentVolumeClaim",
                    name: cp.name.clone(),
                    source,
                });
            }
        }
    }
    let record = build::LaunchRecord {
        server: server.clone(),
        profile: Some(profile_status),
    };
    let settings_json = serde_json::to_string(&settings.raw).unwrap_or_else(|_| "{}".into());
    let file_mappings: Vec<_> = resolve::file_mappings_for(resolved, workspace)
        .into_iter()
        .map(|f| f.mapping)
        .collect();
    let ssh_secret = settings
        .inject_ssh_keys
        .then(|| {
            user.spec
                .ssh_keys
                .as_ref()
                .map(|k| k.secret_ref.name.clone())
        })
        .flatten();
    let inputs = PodInputs {
        session,
        user: &session.spec.user,
        username: &username,
        user_id: &user_id,
        workspace,
        placement: &placement,
        profile: mount.as_ref(),
        expose_user_env: settings.expose_user_env,
        ssh_keys_secret: ssh_secret.as_deref(),
        group_volume_mappings: &settings.volume_mappings,
        file_mappings: &file_mappings,
        group_run_config: settings.run_config.as_ref(),
        settings_json: &settings_json,
        paused,
        launch: &record,
    };
    let mut pod = build::pod(&inputs);
    if let Some(key) = &ctx.config.credentials {
        credentials::inject(&mut pod, session, workspace);
        credentials::ensure(ctx, ns, session, key).await?;
    }
    if budget.is_some() {
        // Usage-limited: the session must be accounted before it can disappear.
        expiry::add_finalizer(ctx, ns, session).await?;
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    match api.create(&PostParams::default(), &pod).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        // The API server will never accept this pod (invalid, or refused by admission such as
        // Pod Security): the session fails with the server's reason instead of retrying forever.
        Err(kube::Error::Api(s)) if matches!(s.code, 400 | 403 | 422) => {
            return Ok(Launched::Failed(Refusal::new(
                reasons::POD_REJECTED,
                format!("the API server rejected the session pod: {}", s.message),
            )));
        }
        Err(source) => {
            return Err(Error::Child {
                verb: "create",
                kind: "Pod",
                name: build::pod_name(session),
                source,
            });
        }
    }
    ctx.launches.remember(key, server);
    let _ = dir;
    Ok(Launched::Created)
}

struct ClaimPlan {
    name: String,
    base: String,
    archive: Option<String>,
    reset_by: Option<String>,
}

fn active_claim(stores: &Stores, ns: &str, base: &str) -> Option<Arc<CachedClaim>> {
    let key = build::profile_key(base);
    stores
        .claims_of_profile(ns, &key)
        .into_iter()
        .filter(|c| !c.marks().archived)
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .max_by(|a, b| {
            a.creation_timestamp()
                .map(|t| t.0)
                .cmp(&b.creation_timestamp().map(|t| t.0))
                .then_with(|| a.name_any().cmp(&b.name_any()))
        })
}

fn next_claim_name(stores: &Stores, ns: &str, base: &str, stamp: i64) -> String {
    let taken = |n: &str| stores.claims.get(&ObjectRef::new(n).within(ns)).is_some();
    if !taken(base) {
        return base.to_string();
    }
    let suffix = format!("-r{stamp}");
    let keep: String = base.chars().take(253 - suffix.len()).collect();
    format!("{keep}{suffix}")
}

fn bound_zone(stores: &Stores, claim: &CachedClaim) -> Option<String> {
    let pv = claim.spec.as_ref()?.volume_name.as_ref()?;
    stores
        .volumes
        .get(&ObjectRef::new(pv))
        .and_then(|v| volume_zone(&v))
}

/// Sessions of the same user that hold (or are about to hold) a slot and come before this one:
/// every session with a pod or in a held phase, and earlier sessions not yet decided.
fn count_active_before(
    stores: &Stores,
    me: &Session,
    launched: &HashMap<String, Option<String>>,
) -> u32 {
    let ns = me.namespace().unwrap_or_default();
    let my_key = (me.creation_timestamp().map(|t| t.0), me.name_any());
    stores
        .sessions_of_user(&ns, &me.spec.user)
        .iter()
        .filter(|o| o.metadata.name != me.metadata.name)
        .filter(|o| o.metadata.deletion_timestamp.is_none())
        .filter(|o| {
            let phase = o.status.as_ref().and_then(|s| s.phase);
            let has_pod = stores
                .pods
                .get(&ObjectRef::new(&build::pod_name(o)).within(&ns))
                .is_some()
                || launched.contains_key(&session_key(&ns, &o.name_any()));
            let earlier = (o.creation_timestamp().map(|t| t.0), o.name_any()) < my_key;
            match phase {
                Some(SessionPhase::Running | SessionPhase::Paused | SessionPhase::Stopped) => true,
                Some(SessionPhase::Refused | SessionPhase::Expired | SessionPhase::Failed) => {
                    has_pod
                }
                Some(SessionPhase::Pending) | None => has_pod || earlier,
            }
        })
        .count() as u32
}

/// Sessions on a server: pods labelled with it, plus launches not yet in the pod cache.
fn server_load(
    stores: &Stores,
    ns: &str,
    server: &str,
    launched: &HashMap<String, Option<String>>,
    me: &str,
) -> u32 {
    let label = build::label_value(server);
    let mut keys: HashSet<String> = in_namespace(&stores.pods, ns)
        .iter()
        .filter(|p| {
            p.labels().get(SERVER_LABEL) == Some(&label) && p.metadata.deletion_timestamp.is_none()
        })
        .map(|p| session_key(ns, &p.name_any()))
        .collect();
    keys.extend(
        launched
            .iter()
            .filter(|(_, s)| s.as_deref() == Some(server))
            .map(|(k, _)| k.clone()),
    );
    keys.remove(me);
    keys.len() as u32
}

/// The controller name, for the record.
pub const NAME: &str = CONTROLLER_NAME;

/// A due expiry, decided and committed to (in flight in [`Context::expiries`]), not yet sent:
/// delete the session, or stop/pause it through `spec.state` (marked as set by the expiry, so
/// the users' stop/pause permissions do not apply).
///
/// The reconcile or the timer loop decides; the API calls run in a task of their own (see
/// [`expiry::Actions`]), so deadlines that share an instant start together. A failed call is
/// logged and the session reconciled again after a short wait (it is still due, so the action is
/// retried); a crash in between is covered the same way by the next reconcile after a restart.
struct Expiring {
    ctx: Arc<Context>,
    session: Arc<Session>,
    ns: String,
    name: String,
    key: String,
    kind: KeepaliveExpirationAction,
    at: jiff::Timestamp,
    rule: crate::crd::v1alpha1::ExpiryRule,
    /// Seconds from the deadline to the decision.
    late: f64,
}

impl Expiring {
    /// Commits to `d`'s action for `session` at `now` (`now >= d.at`, checked by the caller);
    /// None when this replica is already carrying it out. The action starts here: its lateness
    /// is measured now, and nothing else (no I/O, no log write) happens before the caller hands
    /// it to a task.
    fn decide(
        ctx: &Arc<Context>,
        session: &Arc<Session>,
        ns: &str,
        name: &str,
        d: &crate::expiry::Deadline,
        now: jiff::Timestamp,
    ) -> Option<Self> {
        let key = session_key(ns, name);
        if !ctx.expiries.begin(&key, d.at) {
            return None;
        }
        Some(Self {
            ctx: ctx.clone(),
            session: session.clone(),
            ns: ns.to_string(),
            name: name.to_string(),
            key,
            kind: d.action,
            at: d.at,
            rule: d.rule,
            late: now.duration_since(d.at).as_secs_f64().max(0.0),
        })
    }

    /// Sends the action's API call, then records it (metric, log line, Event); a failed call
    /// backs off and re-queues the session, which is still due.
    async fn carry_out(self) {
        let Self {
            ctx,
            session,
            ns,
            name,
            key,
            kind,
            at,
            rule,
            late,
        } = self;
        let action = match kind {
            KeepaliveExpirationAction::Delete => "delete",
            KeepaliveExpirationAction::Stop => "stop",
            KeepaliveExpirationAction::Pause => "pause",
        };
        // How late the request leaves, for the record: the decision above is the action's
        // start; this adds the wait for a worker thread.
        let sent = jiff::Timestamp::now()
            .duration_since(at)
            .as_secs_f64()
            .max(0.0);
        ctx.metrics
            .expiry_lateness
            .get_or_create(&crate::metrics::ActionLabel { action })
            .observe(late);
        let api: Api<Session> = Api::namespaced(ctx.client.clone(), &ns);
        let result = match kind {
            KeepaliveExpirationAction::Delete => {
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: session.uid(),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match api.delete(&name, &dp).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
                    Err(e) => Err(("delete", e)),
                }
            }
            KeepaliveExpirationAction::Stop | KeepaliveExpirationAction::Pause => {
                let state = if kind == KeepaliveExpirationAction::Stop {
                    "Stopped"
                } else {
                    "Paused"
                };
                let patch = json!({
                    "metadata": {"annotations": {STATE_SET_BY_ANNOTATION: "expiry"}},
                    "spec": {"state": state},
                });
                api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .map(|_| ())
                    .map_err(|e| ("patch", e))
            }
        };
        ctx.expiries.end(&key, at, result.is_ok());
        let rule = format!("{rule:?}");
        info!(
            session = %key,
            rule = %rule,
            action,
            late_seconds = late,
            sent_late_seconds = sent,
            ok = result.is_ok(),
            "session expired"
        );
        let note = format!("{rule} deadline {at} reached ({late:.3} s late): {action}");
        let event = Event {
            type_: EventType::Normal,
            reason: "Expired".into(),
            note: Some(note),
            action: "Expire".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &session.object_ref(&())).await {
            debug!(error = %e, "event not recorded");
        }
        if let Err((verb, source)) = result {
            let err = Error::Child {
                verb,
                kind: KIND,
                name: name.clone(),
                source,
            };
            let wait = ctx.backoff.failed(&key);
            tracing::warn!(session = %key, error = %err, retry_in = ?wait, "expiry action failed");
            tokio::time::sleep(wait).await;
            ctx.expiries.retry(ObjectRef::from_obj(session.as_ref()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requeues_come_before_the_resync_or_without_one() {
        let s = Duration::from_secs;
        assert_eq!(requeue_within(s(30), s(3600)), Action::requeue(s(30)));
        // At or past the resync the sweep brings the session back: nothing to schedule.
        assert_eq!(requeue_within(s(3600), s(3600)), Action::await_change());
        // No resync: every deadline keeps its requeue, and a reconcile with none waits.
        assert_eq!(
            requeue_within(s(7200), Duration::ZERO),
            Action::requeue(s(7200))
        );
        assert_eq!(
            requeue_within(horizon(Duration::ZERO), Duration::ZERO),
            Action::await_change()
        );
    }

    fn pending(message: &str) -> Condition {
        Condition {
            type_: "Ready".into(),
            status: "False".into(),
            reason: "PodPending".into(),
            message: message.into(),
            observed_generation: None,
            last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
        }
    }

    #[test]
    fn launch_locks_in_use_are_kept_and_the_others_dropped() {
        let l = Launches::default();
        let held = l.lock("user/ns/held".into());
        let guard = held.try_lock().expect("free");
        for i in 0..1000 {
            drop(l.lock(format!("user/ns/u-{i}")));
        }
        let map = l.locks.lock().unwrap();
        // Bounded by the passes (at most twice the locks in use, or the floor of 64)...
        assert!(map.locks.len() <= 64, "{} locks kept", map.locks.len());
        drop(map);
        // ...and the held lock is the same one: a second launch of that user still waits.
        assert!(l.lock("user/ns/held".into()).try_lock().is_err());
        drop(guard);
        assert!(l.lock("user/ns/held".into()).try_lock().is_ok());
    }

    #[test]
    fn a_starting_pod_is_reported_only_when_held_up_or_slow() {
        // On its way: nothing to write, however many seconds (short of a slow start).
        assert_eq!(pending_report(None, 0.0, &[]), None);
        assert_eq!(pending_report(None, 299.0, &[]), None);
        assert_eq!(
            pending_report(None, 300.0, &[]).as_deref(),
            Some("the session pod is still starting")
        );
        // A problem: reported once it has lasted PENDING_REPORT_AFTER, not before.
        let p = "Unschedulable: 0/3 nodes are available";
        assert_eq!(pending_report(Some(p), 4.9, &[]), None);
        assert_eq!(pending_report(Some(p), 5.0, &[]).as_deref(), Some(p));
        // Held back for a claim the scheduler has not seen yet (or not bound yet): a wait, not
        // yet a problem.
        for p in [
            "Unschedulable: 0/3 nodes are available: persistentvolumeclaim \"profile-u-32\" not \
             found. preemption: 0/3 nodes are available: 3 Preemption is not helpful for \
             scheduling.",
            "Unschedulable: 0/3 nodes are available: pod has unbound immediate \
             PersistentVolumeClaims. preemption: 0/3 nodes are available",
        ] {
            assert_eq!(pending_report(Some(p), 5.0, &[]), None);
            assert_eq!(pending_report(Some(p), 59.0, &[]), None);
            assert_eq!(pending_report(Some(p), 60.0, &[]).as_deref(), Some(p));
        }
        // A claim being deleted is a problem at once.
        let p = "Unschedulable: 0/3 nodes are available: persistentvolumeclaim \"p\" is being \
                 deleted";
        assert_eq!(pending_report(Some(p), 5.0, &[]).as_deref(), Some(p));
    }

    #[test]
    fn a_reported_problem_keeps_its_message_until_its_reason_changes() {
        let old = [pending("Unschedulable: 0/3 nodes are available")];
        assert_eq!(
            pending_report(Some("Unschedulable: 0/4 nodes are available"), 60.0, &old).as_deref(),
            Some("Unschedulable: 0/3 nodes are available")
        );
        assert_eq!(
            pending_report(Some("ErrImagePull: not found"), 60.0, &old).as_deref(),
            Some("ErrImagePull: not found")
        );
    }
}
