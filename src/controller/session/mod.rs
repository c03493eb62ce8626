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
pub mod children;
pub mod credentials;
pub mod decide;
pub mod expiry;
pub mod plan;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt, future::BoxFuture};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use self::build::{Placement, PodInputs, ProfileMount};
use self::decide::condition;
use self::plan::{AdmissionInputs, Cond, PoolKind, Refusal, ServerCandidate, reasons};
use super::cached::{CachedClaim, CachedPod, volume_zone};
use super::contract::{
    self, ACCESS_LABEL, ACCESS_PAUSED, FIELD_MANAGER, SERVER_LABEL, SET_BY_EXPIRY,
    STATE_SET_BY_ANNOTATION, ZONE_LABEL,
};
use super::error::Verb;
use super::gate::Inputs;
use super::status::directory;
use super::stores::{Reflectors, Stores, digest, in_namespace, sweep, when_changed};
use super::{CONTROLLER_NAME, Context, Error};
use crate::crd::v1alpha1::{
    DesiredState, KeepaliveExpirationAction, ProfileMode, Server, ServerAssignment, ServerPool,
    Session, SessionPhase, SessionStatus, User, Workspace,
};
use crate::resolve;

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
    let reported = old.iter().find(|c| {
        c.type_ == Cond::Ready.as_str() && c.status == "False" && c.reason == "PodPending"
    });
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
    /// Sessions whose usage view refresh was refused because the cache was behind (409): the
    /// next pass refreshes it again (see [`expiry::view_due`]).
    views_owed: Mutex<std::collections::HashSet<String>>,
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
    /// Records whether `session`'s usage view is still owed after this pass; returns whether
    /// it was owed before it.
    fn owe_view(&self, session: &str, owed: bool) -> bool {
        let mut v = self.views_owed.lock().unwrap_or_else(|p| p.into_inner());
        if owed {
            !v.insert(session.to_string())
        } else {
            v.remove(session)
        }
    }
    fn view_owed(&self, session: &str) -> bool {
        self.views_owed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(session)
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
    let budget_peers = {
        let stores = stores.clone();
        move |s: Arc<Session>| peers_of(&stores, &s)
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
    let claims = {
        let stores = stores.clone();
        move |c: Arc<CachedClaim>| {
            let user = c.marks().user.clone().unwrap_or_default();
            session_refs(c.namespace(), |ns| stores.sessions_of_user_label(ns, &user))
        }
    };
    // Deletions are not broadcast to change subscribers: a deleted pod (eviction) must be
    // re-created. (A deleted session frees a slot, but refusals are final: nothing waits.)
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
        .map(
            r.sessions.subscribe().filter(when_changed(|s: &Session| {
                digest(
                    &s.status
                        .as_ref()
                        .and_then(|st| st.started_at.as_ref())
                        .map(|t| t.0.as_millisecond()),
                )
            })),
            budget_peers,
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
        .map(r.claims.subscribe(), claims)
        .refs(lost_pods)
        .refs(ctx.expiries.retries())
        .refs(sweep(r.sessions.reader.clone(), resync))
        .run(
            r.sessions.reader.clone(),
            concurrency,
            depth,
            move |s, ctx| async move {
                let r = ObjectRef::from_obj(s.as_ref());
                let res = reconcile(s, ctx.clone(), resync).await;
                if res.is_ok() {
                    // Whatever path the reconcile took: a success resets the backoff.
                    ctx.backoff.succeeded(&r);
                }
                res
            },
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
    with_expiry_timers(timers_ctx, controller).boxed()
}

/// Runs `controller` with the expiry fast path beside it, on a thread and a timer of its own,
/// until the controller ends.
async fn with_expiry_timers(ctx: Arc<Context>, controller: impl Future<Output = ()>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let main = tokio::runtime::Handle::current();
    let thread = std::thread::Builder::new()
        .name("cubicle-expiry".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(rt) => rt.block_on(run_timers(ctx, main, stopped)),
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

/// The other sessions sharing a usage budget with `s`, for a change of its `startedAt`: a session
/// that starts splits its budget another way, so each of them has its usage deadline moved;
/// mapped from the session's own event, they are reconciled from a cache that already shows
/// the start.
fn peers_of(stores: &Stores, s: &Arc<Session>) -> Vec<ObjectRef<Session>> {
    let me = s.uid();
    session_refs(s.namespace(), |ns| {
        let mut v = expiry::budget_peers(stores, ns, s);
        v.retain(|p| p.uid() != me);
        v
    })
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

/// Running or paused with a ready pod, stopped, or refused (final): nothing for another
/// object to unblock.
fn is_steady(s: &Session) -> bool {
    matches!(
        s.status.as_ref().and_then(|st| st.phase),
        Some(
            SessionPhase::Running
                | SessionPhase::Paused
                | SessionPhase::Stopped
                | SessionPhase::Refused
        )
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
        super::status::apply::<Session>(
            &self.ctx.client,
            &self.ns,
            &self.name,
            FIELD_MANAGER,
            status,
            None,
        )
        .await
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

/// An Event to publish: type, reason, note, action.
type Ev = (EventType, &'static str, String, &'static str);

/// What a reconcile reads of the caches for one session (the dereference step).
struct Read {
    /// The pod, if it is this session's.
    pod: Option<Arc<CachedPod>>,
    user: Option<Arc<User>>,
    workspace: Option<Arc<Workspace>>,
    resolved: Option<resolve::Resolved>,
    access: Option<resolve::Access>,
}

impl Read {
    /// Reads `session`'s pod, user, workspace and what they resolve to; None while a pod of an
    /// older session of the same name still waits for the garbage collector.
    fn of(stores: &Stores, ns: &str, session: &Session) -> Option<Self> {
        let pod = stores
            .pods
            .get(&ObjectRef::new(&contract::pod_name(session)).within(ns));
        let uid = session.uid().unwrap_or_default();
        let pod = match pod {
            Some(p) if p.owner_references().iter().any(|o| o.uid == uid) => Some(p),
            Some(_) => return None,
            None => None,
        };
        let user = stores
            .users
            .get(&ObjectRef::new(&session.spec.user).within(ns));
        let workspace = stores
            .workspaces
            .get(&ObjectRef::new(&session.spec.workspace).within(ns));
        let dir = directory(stores, ns);
        let resolved = user.as_ref().map(|u| resolve::resolve_user(&dir, u));
        let access = match (&user, &resolved, &workspace) {
            (Some(u), Some(r), Some(w)) => Some(resolve::access(&dir, u, r, w)),
            _ => None,
        };
        Some(Self {
            pod,
            user,
            workspace,
            resolved,
            access,
        })
    }

    fn settings(&self) -> Option<&resolve::EffectiveSettings> {
        self.resolved.as_ref().map(|r| &r.settings)
    }
}

/// One reconcile pass: the status as read, the status and conditions it decides, the Events of
/// the transitions, and its timers.
struct Pass<'a> {
    sh: Shell<'a>,
    old: SessionStatus,
    status: SessionStatus,
    generation: Option<i64>,
    conditions: Vec<Condition>,
    events: Vec<Ev>,
    requeue: Duration,
    /// The deadline this pass leaves armed, if the fast path may enforce it.
    armable: Option<crate::expiry::Deadline>,
}

impl Pass<'_> {
    fn condition(&mut self, type_: Cond, ok: bool, reason: &str, message: &str) {
        let c = condition(
            type_,
            ok,
            reason,
            message,
            self.generation,
            &self.old.conditions,
            &self.sh.now,
        );
        self.conditions.push(c);
    }

    /// A refusal: a False condition of `type_` with the reason, and a Warning Event the first
    /// time this reason appears (Events on transitions only).
    fn refuse(&mut self, type_: Cond, r: &Refusal, action: &'static str) {
        self.condition(type_, false, r.reason, &r.message);
        if self.old.conditions.iter().all(|c| c.reason != r.reason) {
            self.events
                .push((EventType::Warning, r.reason, r.message.clone(), action));
        }
    }

    async fn publish_events(&mut self) {
        for (t, reason, note, action) in std::mem::take(&mut self.events) {
            self.sh.event(t, reason, note, action).await;
        }
    }

    /// Applies the expiry's decision to the status; Some(action) when the deadline is due and
    /// the reconcile ends here.
    fn expiry(
        &mut self,
        ctx: &Arc<Context>,
        session: &Arc<Session>,
        read: &Read,
        effective: DesiredState,
        resuming: bool,
        budget: Option<&expiry::Budget>,
    ) -> Option<Action> {
        let now = self.sh.now.0;
        let st = read.settings()?;
        if !expiry::armed(self.old.phase, read.pod.is_some()) {
            return None;
        }
        let uid = session.uid().unwrap_or_default();
        let decision = decide::expiry(&decide::ExpiryInputs {
            old: &self.old,
            settings: st,
            reported_keepalive: expiry::reported_keepalive(session.as_ref()),
            created: session.creation_timestamp().map(|t| t.0).unwrap_or(now),
            pod: read.pod.as_deref(),
            uid: &uid,
            budget,
            effective,
            resuming,
            now,
        });
        match decision {
            decide::ExpiryDecision::Due(d) => {
                // Decided here; the API calls run in a task of their own, so a reconcile slot
                // is never held for a round trip.
                Some(
                    match Expiring::decide(ctx, session, &self.sh.ns, &self.sh.name, &d, now) {
                        Some(e) => {
                            tokio::spawn(e.carry_out());
                            Action::await_change()
                        }
                        // This replica is already carrying it out; look again once it is done.
                        None => Action::requeue(Duration::from_secs(1)),
                    },
                )
            }
            decide::ExpiryDecision::Waiting(e) => {
                let status = &mut self.status;
                if e.last_keepalive.is_some() {
                    status.last_keepalive = e.last_keepalive;
                }
                status.expires_at = e.deadline.as_ref().map(|d| MicroTime(d.at));
                status.expiry_rule = e.deadline.as_ref().map(|d| d.rule);
                status.expiry_action = e.deadline.as_ref().map(|d| d.action);
                if e.usage_remaining_seconds.is_some() {
                    status.usage_remaining_seconds = e.usage_remaining_seconds;
                }
                if let Some(r) = e.requeue {
                    self.requeue = self.requeue.min(r);
                }
                self.armable = e.armable;
                None
            }
        }
    }

    /// Stop: the pod removed (volumes kept), the session Stopped once it was admitted.
    async fn stop(
        &mut self,
        ctx: &Context,
        pod: Option<&CachedPod>,
        admitted_before: bool,
    ) -> Result<(), Error> {
        if let Some(p) = pod {
            children::delete_pod(ctx, &self.sh.ns, p).await?;
            self.events.push((
                EventType::Normal,
                "Stopped",
                "session stopped: pod removed, volumes kept".into(),
                "Stop",
            ));
        }
        ctx.launches
            .forget(&session_key(&self.sh.ns, &self.sh.name));
        if admitted_before || self.old.phase == Some(SessionPhase::Stopped) {
            self.status.phase = Some(SessionPhase::Stopped);
            self.status.url = None;
            self.status.node = None;
            self.status.pod = None;
            self.condition(
                Cond::Ready,
                false,
                reasons::STOPPED,
                "the session is stopped: its pod is removed, its volumes kept",
            );
        }
        Ok(())
    }

    /// Running or paused with a pod: its access label brought to the desired value, and the
    /// status the pod tells. Some(action) when a starting pod is not worth a write yet.
    async fn follow_pod(
        &mut self,
        ctx: &Context,
        p: &CachedPod,
        paused: bool,
        state_refused: bool,
    ) -> Result<Option<Action>, Error> {
        // The executor brings the pod's owned metadata (pause cuts access with a label, resume
        // restores it, a hand edit is undone) and the other children to their desired form.
        let target = if paused {
            SessionPhase::Paused
        } else {
            SessionPhase::Running
        };
        let transition = self.old.phase != Some(target);
        let session = self.sh.session;
        let record = build::parse_launch_record(p.launch_annotation());
        let desired = children::pod_meta(session, record.server.as_deref(), paused);
        let problem = plan::observe(Some(p), paused).problem;
        let was_paused = p
            .labels()
            .get(ACCESS_LABEL)
            .is_some_and(|v| v == ACCESS_PAUSED);
        let repaired =
            children::ensure_running(ctx, &self.sh.ns, session, p, &desired, problem.as_deref())
                .await?;
        if repaired.pod {
            if was_paused != paused && transition {
                self.events.push(access_event(paused));
            } else {
                warn!(pod = %p.name_any(), paused, "owned labels or annotations restored on a session pod (edited by hand, or of an older build)");
            }
        }
        let told = decide::pod_status(
            p,
            paused,
            &self.old,
            self.generation,
            state_refused,
            &self.sh.now,
        );
        if let Some(wait) = told.quiet_for {
            // Not worth a status write yet: the pod is on its way.
            self.publish_events().await;
            return Ok(Some(Action::requeue(wait.min(self.requeue))));
        }
        let uid = session.uid().unwrap_or_default();
        let status = &mut self.status;
        status.url = ctx
            .config
            .gateway_url
            .as_ref()
            .filter(|_| told.phase == SessionPhase::Running)
            .map(|g| g.session(&uid));
        status.phase = Some(told.phase);
        status.node = told.node;
        status.pod = Some(p.name_any());
        status.started_at = told.started_at;
        status.server = record.server.or(status.server.clone());
        if record.profile.is_some() {
            status.profile = record.profile;
        }
        self.conditions.extend(told.conditions);
        Ok(None)
    }

    /// What a launch that did not create a pod means for the status.
    fn launch_failed(&mut self, outcome: Launched) {
        match outcome {
            Launched::Created | Launched::Waiting => {}
            Launched::Failed(r) => {
                self.status.phase = Some(SessionPhase::Failed);
                self.refuse(Cond::Ready, &r, "Launch");
            }
            Launched::Refused(r) if self.old.phase == Some(SessionPhase::Stopped) => {
                // A stopped session that cannot resume stays stopped and says why.
                self.refuse(Cond::Resumed, &r, "Resume");
            }
            Launched::Refused(r) => {
                self.status.phase = Some(SessionPhase::Refused);
                self.refuse(Cond::Admitted, &r, "Launch");
                // Nor ready: the same reason, without a second event.
                self.condition(Cond::Ready, false, r.reason, &r.message);
            }
        }
    }

    /// Writes the status if it changed (and was not already written for this version of the
    /// session), then the Events of the transition. Returns whether it wrote, and the session's
    /// resourceVersion after this pass.
    async fn write_status(&mut self, ctx: &Context) -> Result<(bool, Option<String>), Error> {
        let session = self.sh.session;
        let mut version = session.resource_version();
        let written = &ctx.launches.statuses;
        written.seen(session);
        // The status (and the Events of its transition) already went out for this version of
        // the session: the cache has not caught up with that write yet.
        let changed = !same_status(&self.status, &self.old);
        let repeat = changed && written.already(session, &self.status);
        if changed && !repeat {
            version = self.sh.patch_status(&self.status).await?.resource_version();
            written.record(session, &self.status);
            let ready = self
                .status
                .conditions
                .iter()
                .find(|c| c.type_ == Cond::Ready.as_str());
            info!(
                session = %session_key(&self.sh.ns, &self.sh.name),
                phase = ?self.status.phase,
                ready = ready.map(|c| c.status.as_str()),
                reason = ready.map(|c| c.reason.as_str()),
                detail = ready.map(|c| c.message.as_str()),
                "session status updated"
            );
        }
        if repeat {
            self.events.clear();
        }
        self.publish_events().await;
        Ok((changed && !repeat, version))
    }
}

impl Pass<'_> {
    /// A pod was created: the status is written when the pod's own event says it runs.
    async fn launched(&mut self, resuming: bool) -> Result<(), Error> {
        // The status is written when the pod's own event says it runs (what the launch
        // decided travels on the pod: LAUNCH_ANNOTATION); the requeue is only a safety
        // net should the pod never show up. A resume records its keepalive at once, so
        // the old one cannot expire it.
        if resuming && self.status.last_keepalive != self.old.last_keepalive {
            let s = SessionStatus {
                last_keepalive: self.status.last_keepalive.clone(),
                expires_at: self.status.expires_at.clone(),
                expiry_rule: self.status.expiry_rule,
                expiry_action: self.status.expiry_action,
                ..self.old.clone()
            };
            self.sh.patch_status(&s).await?;
        }
        Ok(())
    }

    /// The usage view (User or Group status.usage) shows the current window with the running
    /// sessions: refreshed when this session starts, when a new window has begun, and again
    /// after a refresh the API server refused because the cache was behind (409: the view is
    /// owed, and the session requeued). Returns whether the view is still owed.
    async fn refresh_usage(
        &self,
        b: &expiry::Budget,
        u: &User,
        l: &resolve::ResolvedUsageLimit,
        wrote: bool,
    ) -> Result<bool, Error> {
        let launches = &self.sh.ctx.launches;
        let key = session_key(&self.sh.ns, &self.sh.name);
        let started_now =
            wrote && self.old.started_at.is_none() && self.status.started_at.is_some();
        let due = expiry::view_due(
            started_now,
            launches.view_owed(&key),
            b.stale_window,
            &self.sh.session.uid().unwrap_or_default(),
            self.status.started_at.as_ref().map(|t| t.0),
        );
        let Some(started) = due else {
            return Ok(false);
        };
        let written =
            expiry::refresh_view(self.sh.ctx, &self.sh.ns, u, l, b, started, self.sh.now.0).await?;
        let owed = written == expiry::UsageWrite::Behind;
        if launches.owe_view(&key, owed) && owed {
            debug!(session = %key, "usage view refused again (the cache is behind): retrying");
        }
        Ok(owed)
    }

    /// A running or paused session with nothing else to do: its deadline goes to the fast path
    /// (enforced at the instant without resolving settings again, as long as nothing it was
    /// computed from has changed), and the controller's own requeue, a moment later, is only
    /// the safety net. Returns the requeue.
    fn arm_expiry(&self, read: &Read, version: Option<String>, resync: Duration) -> Duration {
        let ctx = self.sh.ctx;
        let key = session_key(&self.sh.ns, &self.sh.name);
        let (Some(d), Some(version), Some(SessionPhase::Running | SessionPhase::Paused)) =
            (self.armable, version, self.status.phase)
        else {
            return self.requeue;
        };
        ctx.expiries.arm(
            &key,
            expiry::Arm {
                at: d.at,
                rule: d.rule,
                action: d.action,
                uid: self.sh.session.uid().unwrap_or_default(),
                session_version: version,
                user_generation: read.user.as_ref().and_then(|u| u.metadata.generation),
                groups: expiry::groups_digest(&ctx.stores, &self.sh.ns),
            },
        );
        horizon(resync).min(expiry::until(d.at, self.sh.now.0) + FAST_PATH_GRACE)
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
        ctx.launches.owe_view(&key, false);
        return finalize(&ctx, &ns, &session).await;
    }
    let stores = &ctx.stores;
    // Dereference: a pod of an older session of the same name waits for GC.
    let Some(read) = Read::of(stores, &ns, &session) else {
        return Ok(Action::requeue(Duration::from_secs(2)));
    };
    if read.pod.is_some() {
        ctx.launches.forget(&key);
    }
    let old = session.status.clone().unwrap_or_default();
    let settings = read.settings();
    let desired = session.spec.state.unwrap_or(DesiredState::Running);
    let by_expiry = session
        .annotations()
        .get(STATE_SET_BY_ANNOTATION)
        .is_some_and(|v| v == SET_BY_EXPIRY);
    let (effective, state_refusal) = decide::state(
        desired,
        settings.is_some_and(|s| s.allow_kasm_stop),
        settings.is_some_and(|s| s.allow_kasm_pause),
        by_expiry,
        old.phase,
    );
    let mut pass = Pass {
        sh: Shell {
            ctx: &ctx,
            session: &session,
            ns: ns.clone(),
            name: name.clone(),
            now: Time(jiff::Timestamp::now()),
        },
        status: SessionStatus {
            observed_generation: session.metadata.generation,
            ..old.clone()
        },
        old,
        generation: session.metadata.generation,
        conditions: Vec::new(),
        events: Vec::new(),
        requeue: horizon(resync),
        armable: None,
    };
    let now_ts = pass.sh.now.0;
    ctx.expiries.disarm(&key);
    // Usage budget (when a usage limit applies to the user).
    let limit = settings.and_then(|s| s.usage_limit.as_ref());
    let budget = match (&read.user, limit) {
        (Some(u), Some(l)) => Some(expiry::budget(stores, &ns, u, l, now_ts)),
        _ => None,
    };
    // Keepalive and deadline, for admitted sessions.
    let resuming = effective == DesiredState::Running
        && matches!(
            pass.old.phase,
            Some(SessionPhase::Stopped | SessionPhase::Paused)
        );
    if let Some(action) = pass.expiry(&ctx, &session, &read, effective, resuming, budget.as_ref()) {
        return Ok(action);
    }
    let admitted_before = read.pod.is_some()
        || matches!(
            pass.old.phase,
            Some(SessionPhase::Running | SessionPhase::Paused | SessionPhase::Stopped)
        );
    let paused = effective == DesiredState::Paused;
    match (effective, read.pod.as_deref()) {
        (DesiredState::Stopped, pod) => pass.stop(&ctx, pod, admitted_before).await?,
        (_, Some(p)) => {
            if let Some(action) = pass
                .follow_pod(&ctx, p, paused, state_refusal.is_some())
                .await?
            {
                return Ok(action);
            }
        }
        // A refusal is final: a refused session never starts later on its own (the person
        // launches again), and a refused resume waits for the next change of the spec.
        (_, None) if plan::refusal_is_final(&pass.old, pass.generation) => {
            return Ok(requeue_within(pass.requeue, resync));
        }
        // Launch (or resume after a stop, or re-create a pod lost to eviction) — unless this
        // replica just created the pod and the cache has not shown it yet.
        (_, None) if ctx.launches.in_flight(&key) => {
            return Ok(Action::requeue(PENDING_REPORT_AFTER.min(pass.requeue)));
        }
        (_, None) => {
            let outcome = launch(
                &pass.sh,
                budget.as_ref(),
                read.user.as_deref(),
                read.workspace.as_deref(),
                read.resolved.as_ref(),
                read.access.as_ref(),
                admitted_before,
                paused,
            )
            .await?;
            if let Launched::Waiting = outcome {
                return Ok(Action::requeue(Duration::from_secs(1).min(pass.requeue)));
            }
            if let Launched::Created = outcome {
                pass.launched(resuming).await?;
                return Ok(Action::requeue(PENDING_REPORT_AFTER.min(pass.requeue)));
            }
            pass.launch_failed(outcome);
        }
    }
    if let Some(r) = &state_refusal {
        pass.refuse(Cond::StateChange, r, "ChangeState");
    }
    if !pass.conditions.is_empty() || pass.status.phase != pass.old.phase {
        // Keep conditions this pass did not compute only if they still apply.
        pass.status.conditions = decide::merge_conditions(
            &pass.old.conditions,
            std::mem::take(&mut pass.conditions),
            state_refusal.is_some(),
            effective,
            pass.status.phase,
        );
    }
    let (wrote, version) = pass.write_status(&ctx).await?;
    let mut view_owed = false;
    if let (Some(b), Some(u), Some(l)) = (&budget, &read.user, limit) {
        view_owed = pass.refresh_usage(b, u, l, wrote).await?;
    }
    let mut requeue = pass.arm_expiry(&read, version, resync);
    if view_owed {
        requeue = requeue.min(CACHE_BEHIND_RETRY);
    }
    Ok(requeue_within(requeue, resync))
}

/// How soon a pass whose guarded usage write was refused (the cache was behind) runs again:
/// long enough for the watch to deliver the write that got in first, which usually takes
/// milliseconds.
const CACHE_BEHIND_RETRY: Duration = Duration::from_millis(500);

/// A session being deleted: with the usage finalizer, its running time is accounted before it
/// disappears, then it is let go. Were the ledger write refused because the cache is behind
/// (another session of the budget closed a moment ago), the finalizer stays and the session is
/// closed again once the cache has caught up (closing is idempotent by uid).
async fn finalize(ctx: &Context, ns: &str, session: &Session) -> Result<Action, Error> {
    if !session
        .finalizers()
        .iter()
        .any(|f| f == contract::USAGE_FINALIZER)
    {
        return Ok(Action::await_change());
    }
    let user = ctx
        .stores
        .users
        .get(&ObjectRef::new(&session.spec.user).within(ns));
    let limit = user.as_ref().and_then(|u| {
        resolve::resolve_user(&directory(&ctx.stores, ns), u)
            .settings
            .usage_limit
    });
    let now = jiff::Timestamp::now();
    let closed =
        expiry::close_session(ctx, ns, session, user.as_deref(), limit.as_ref(), now).await?;
    if closed == expiry::UsageWrite::Behind {
        debug!(session = %ObjectRef::from_obj(session), "usage ledger refused (the cache is behind): closing again");
        return Ok(Action::requeue(CACHE_BEHIND_RETRY));
    }
    expiry::remove_finalizer(ctx, ns, session).await?;
    Ok(Action::await_change())
}

/// The Event of a pause or resume the executor carried out.
fn access_event(paused: bool) -> (EventType, &'static str, String, &'static str) {
    let (reason, note) = if paused {
        (
            "Paused",
            "session paused: access cut, pod and resources kept",
        )
    } else {
        ("Resumed", "session resumed from pause")
    };
    (EventType::Normal, reason, note.into(), "Pause")
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

enum Launched {
    Created,
    /// Not yet: the profile claim's holder is not placed (see [`plan::waits_for_holder`]).
    Waiting,
    Refused(Refusal),
    Failed(Refusal),
}

#[allow(clippy::too_many_arguments)]
async fn launch(
    sh: &Shell<'_>,
    budget: Option<&expiry::Budget>,
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
    let mut inputs = admission(sh, budget, user, workspace, resolved, access);
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
    let (profile, profile_zone) = plan_profile(sh, profile_cfg, mode, &username, &user_id);
    let (profile_status, claim_plan, mount) = (profile.status, profile.claim, profile.mount);

    // Placement.
    let pool_kind = pool_kind(stores, ns, access, &launched, &key);
    // A claim template's claim that one node (or one pod) mounts at a time: where another
    // session of the user has it.
    let holder = match (&mount, profile_cfg.and_then(|c| c.claim_template.as_ref())) {
        (Some(ProfileMount::Claim { claim, .. }), Some(t)) => {
            claim_holder(stores, session, claim, claim_reach(&t.access_modes))
        }
        _ => None,
    };
    if plan::waits_for_holder(holder.as_ref()) {
        return Ok(Launched::Waiting);
    }
    let placement = match plan::place_with_claim(
        &pool_kind,
        session.spec.zone.as_deref(),
        profile_zone.as_deref(),
        holder.as_ref(),
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
        let claim = build::profile_claim(
            &cp.name,
            &cp.base,
            t,
            &session.spec.user,
            &workspace.name_any(),
            ns,
            cp.reset_by.as_deref(),
        );
        children::ensure_claim(ctx, ns, cp.archive.as_deref(), &claim, sh.now.0.as_second())
            .await?;
    }
    let record = build::LaunchRecord {
        server: server.clone(),
        profile: Some(profile_status),
    };
    let mut pod = launch_pod(
        session,
        user,
        workspace,
        resolved,
        &placement,
        mount.as_ref(),
        &record,
        paused,
    );
    if let Some(key) = &ctx.config.credentials {
        credentials::inject(&mut pod, session, workspace);
        children::ensure_secret(ctx, ns, &credentials::secret(session, key)).await?;
    }
    if budget.is_some() {
        // Usage-limited: the session must be accounted before it can disappear.
        expiry::add_finalizer(ctx, ns, session).await?;
    }
    if let Some(rejected) = children::create_pod(ctx, ns, &pod).await? {
        return Ok(Launched::Failed(rejected));
    }
    ctx.launches.remember(key, server);
    Ok(Launched::Created)
}

/// What admission decides from, before the slots are counted (`earlier_active` 0).
fn admission(
    sh: &Shell<'_>,
    budget: Option<&expiry::Budget>,
    user: Option<&User>,
    workspace: Option<&Workspace>,
    resolved: Option<&resolve::Resolved>,
    access: Option<&resolve::Access>,
) -> AdmissionInputs {
    let session = sh.session;
    let settings = resolved.map(|r| &r.settings);
    AdmissionInputs {
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
    }
}

/// The profile a launch uses (its claim, existing or to create), and the zone its bound volume
/// is in.
fn plan_profile(
    sh: &Shell<'_>,
    profile_cfg: Option<&crate::crd::v1alpha1::PersistentProfile>,
    mode: ProfileMode,
    username: &str,
    user_id: &str,
) -> (decide::ProfilePlan, Option<String>) {
    let stores = &sh.ctx.stores;
    let session = sh.session;
    let ns = &sh.ns;
    let uid = session.uid().unwrap_or_default();
    let base = profile_cfg
        .and_then(|c| c.claim_template.as_ref())
        .map(|t| decide::claim_base(&t.name, username, user_id));
    let active = base.as_ref().and_then(|b| active_claim(stores, ns, b));
    let marks = active.as_ref().map(|c| c.marks().into_owned());
    let active_name = active.as_ref().map(|c| c.name_any());
    let next_name = base
        .as_ref()
        .map(|b| next_claim_name(stores, ns, b, sh.now.0.as_second()))
        .unwrap_or_default();
    let profile = decide::profile(&decide::ProfileInputs {
        cfg: profile_cfg,
        mode,
        username,
        user_id,
        uid: &uid,
        old: session.status.as_ref().and_then(|s| s.profile.as_ref()),
        active: active_name
            .as_deref()
            .map(|n| (n, marks.as_ref().and_then(|m| m.reset_by.as_deref()))),
        next_name: &next_name,
        now_second: sh.now.0.as_second(),
    });
    let profile_zone = profile
        .zone_of
        .as_ref()
        .and_then(|c| stores.claims.get(&ObjectRef::new(c).within(ns)))
        .and_then(|c| bound_zone(stores, &c));
    (profile, profile_zone)
}

/// The pod a launch creates.
#[allow(clippy::too_many_arguments)]
fn launch_pod(
    session: &Session,
    user: &User,
    workspace: &Workspace,
    resolved: &resolve::Resolved,
    placement: &Placement,
    mount: Option<&ProfileMount>,
    record: &build::LaunchRecord,
    paused: bool,
) -> k8s_openapi::api::core::v1::Pod {
    let settings = &resolved.settings;
    let ns = session.namespace().unwrap_or_default();
    let username = user
        .spec
        .username
        .clone()
        .unwrap_or_else(|| user.name_any());
    let user_id = resolve::user_id(&ns, user);
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
        placement,
        profile: mount,
        expose_user_env: settings.expose_user_env,
        ssh_keys_secret: ssh_secret.as_deref(),
        group_volume_mappings: &settings.volume_mappings,
        file_mappings: &file_mappings,
        group_run_config: settings.run_config.as_ref(),
        settings_json: &settings_json,
        paused,
        launch: record,
    };
    build::pod(&inputs)
}

/// How the workspace places sessions, as the caches show it: the scheduler (the zones that have
/// nodes), an autoscaled pool, or a pool of servers with their load (this replica's launches
/// not yet in the pod cache included, `me` excluded).
fn pool_kind(
    stores: &Stores,
    ns: &str,
    access: &resolve::Access,
    launched: &HashMap<String, Option<String>>,
    key: &str,
) -> PoolKind {
    match &access.pool {
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
                            load: server_load(stores, ns, &name, launched, key),
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
    }
}

/// How many mounts a claim with `modes` allows at a time.
fn claim_reach(modes: &[crate::crd::v1alpha1::AccessMode]) -> plan::ClaimReach {
    use crate::crd::v1alpha1::AccessMode;
    if modes.is_empty() {
        plan::ClaimReach::OneNode // ReadWriteOnce, the default
    } else if modes
        .iter()
        .any(|m| matches!(m, AccessMode::ReadWriteMany | AccessMode::ReadOnlyMany))
    {
        plan::ClaimReach::ManyNodes
    } else if modes.contains(&AccessMode::ReadWriteOnce) {
        plan::ClaimReach::OneNode
    } else {
        plan::ClaimReach::OnePod
    }
}

/// Another live session of `me`'s user whose pod mounts `claim` (from the pods' launch records
/// in the cache, or this replica's launches not yet in it), with the node it runs on.
fn claim_holder(
    stores: &Stores,
    me: &Session,
    claim: &str,
    reach: plan::ClaimReach,
) -> Option<plan::ClaimHolder> {
    let ns = me.namespace().unwrap_or_default();
    stores
        .sessions_of_user(&ns, &me.spec.user)
        .iter()
        .filter(|o| o.metadata.name != me.metadata.name)
        .filter_map(|o| {
            let pod = stores
                .pods
                .get(&ObjectRef::new(&contract::pod_name(o)).within(&ns))?;
            if pod.metadata.deletion_timestamp.is_some() {
                return None; // on its way out: the claim is being released
            }
            let record = build::parse_launch_record(pod.launch_annotation());
            let mounted = record.profile.and_then(|p| p.claim);
            (mounted.as_deref() == Some(claim)).then(|| plan::ClaimHolder {
                claim: claim.to_string(),
                session: o.name_any(),
                node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                reach,
            })
        })
        // A placed holder decides; of several, the one already on a node.
        .max_by_key(|h| h.node.is_some())
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
                .get(&ObjectRef::new(&contract::pod_name(o)).within(&ns))
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
    let label = contract::label_value(server);
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
                    Err(e) => Err((Verb::Delete, e)),
                }
            }
            KeepaliveExpirationAction::Stop | KeepaliveExpirationAction::Pause => {
                let state = if kind == KeepaliveExpirationAction::Stop {
                    "Stopped"
                } else {
                    "Paused"
                };
                let patch = json!({
                    "metadata": {"annotations": {STATE_SET_BY_ANNOTATION: SET_BY_EXPIRY}},
                    "spec": {"state": state},
                });
                api.patch(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .map(|_| ())
                    .map_err(|e| (Verb::Patch, e))
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
            let wait = ctx.backoff.failed(&ObjectRef::from_obj(session.as_ref()));
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
