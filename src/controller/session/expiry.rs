//! Expiry and usage metering in the Session controller: the I/O around the pure
//! [`crate::expiry`] library.
//!
//! - Keepalive: clients set the `cubicle.dev/keepalive` annotation (RFC 3339 time, or empty for
//!   "now" as seen by the API server's write); the controller persists it in
//!   `status.lastKeepalive`, never moving it backwards and never later than now.
//! - Deadlines: every admitted session has `status.expiresAt`, the binding rule and action. A
//!   running session's deadline is armed in one timer queue ([`Actions`], no sweep) and enforced
//!   at the instant if nothing it was computed from has changed; otherwise, and as a safety net
//!   a second later, the controller reconciles the session and decides again. An action is taken
//!   only when `now >= expiresAt`, and how late it started is recorded.
//! - Usage: budgets live in `User.status.usage` (perUser) or `Group.status.usage` (perGroup),
//!   written with their own field manager. A usage-limited session carries the
//!   `cubicle.dev/usage-accounting` finalizer: before it disappears, its running time is closed
//!   into the ledger (idempotently, by uid), and only then is the finalizer removed.

use crate::controller::contract::{USAGE_FINALIZER, USAGE_MANAGER};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::mpsc;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::super::stores::{Stores, in_namespace};
use super::super::{Context, Error};
use crate::crd::v1alpha1::{
    ExpiryRule, Group, KEEPALIVE_ANNOTATION, KeepaliveExpirationAction, Session, SessionPhase,
    UsageEntry, UsageLimitInterval, UsageLimitType, User,
};
use crate::expiry::{self, Ledger, Open, Window};
use crate::resolve::settings::ResolvedUsageLimit;

/// The keepalive the client reported: the annotation's time, clamped later by the caller.
pub fn reported_keepalive(s: &Session) -> Option<Timestamp> {
    s.annotations()
        .get(KEEPALIVE_ANNOTATION)
        .and_then(|v| v.trim().parse::<Timestamp>().ok())
}

/// One usage budget as seen at `now`.
#[derive(Debug, Clone)]
pub struct Budget {
    /// perUser or perGroup.
    pub scope: UsageLimitType,
    /// The group whose limit it is.
    pub group: String,
    /// Interval.
    pub interval: UsageLimitInterval,
    /// Time zone name.
    pub timezone: String,
    /// The window at `now`.
    pub window: Window,
    /// The persisted ledger, rolled into the window.
    pub ledger: Ledger,
    /// The budget's sessions that exist and have started.
    pub open: Vec<Open>,
    /// The limit in ms.
    pub limit_ms: u64,
    /// The persisted entry is of an earlier window (or absent): its view is to move to this one.
    pub stale_window: bool,
}

impl Budget {
    /// Remaining ms at `now`.
    pub fn remaining_ms(&self, now: Timestamp) -> u64 {
        expiry::remaining_ms(self.limit_ms, &self.ledger, &self.window, &self.open, now)
    }

    /// When the open sessions would spend it (None: not within this window).
    pub fn exhausted_at(&self, now: Timestamp) -> Option<Timestamp> {
        expiry::exhausted_at(self.limit_ms, &self.ledger, &self.window, &self.open, now)
    }

    /// Spent: new sessions are refused.
    pub fn spent(&self, now: Timestamp) -> bool {
        expiry::is_spent(self.limit_ms, &self.ledger, &self.window, &self.open, now)
    }

    /// A message for refusals.
    pub fn describe(&self, now: Timestamp) -> String {
        let used = expiry::used_ms(&self.ledger, &self.window, &self.open, now) / 1000;
        let window = match (self.window.start, self.window.end) {
            (Some(a), Some(b)) => format!("window {a} to {b} ({})", self.timezone),
            _ => "total (never resets)".to_string(),
        };
        format!(
            "usage limit of group {:?} ({:?}, {:?}): {} s used of {} s in the {window}",
            self.group,
            self.scope,
            self.interval,
            used,
            self.limit_ms / 1000
        )
    }
}

fn tz(name: Option<&str>) -> (TimeZone, String) {
    match name {
        Some(n) => match TimeZone::get(n) {
            Ok(t) => (t, n.to_string()),
            Err(_) => (TimeZone::UTC, "UTC".into()),
        },
        None => (TimeZone::UTC, "UTC".into()),
    }
}

fn entry_ledger(e: &UsageEntry) -> Ledger {
    Ledger {
        window_start: e.window_start.as_ref().map(|t| t.0),
        closed_ms: e.closed_ms.unwrap_or(0),
        closed_sessions: e.closed_sessions.clone(),
    }
}

fn find_entry<'a>(
    entries: &'a [UsageEntry],
    group: &str,
    scope: UsageLimitType,
) -> Option<&'a UsageEntry> {
    entries
        .iter()
        .find(|e| e.group.as_deref() == Some(group) && e.scope == scope)
}

/// The users whose sessions count against the budget of `limit` for `budget_user`: the user
/// alone, or the members of the limit's group (by its status; the user alone while the group or
/// its status is not there yet).
fn budget_users(
    stores: &Stores,
    ns: &str,
    limit: &ResolvedUsageLimit,
    budget_user: &str,
) -> Vec<String> {
    let members = match limit.limit.type_ {
        UsageLimitType::PerUser => None,
        UsageLimitType::PerGroup => stores
            .groups
            .get(&ObjectRef::new(&limit.group).within(ns))
            .and_then(|g| g.status.as_ref().map(|st| st.members.clone())),
    };
    let mut users = members.unwrap_or_else(|| vec![budget_user.to_string()]);
    users.sort();
    users.dedup();
    users
}

/// The budget that applies to `user`, with its ledger and open sessions.
pub fn budget(
    stores: &Stores,
    ns: &str,
    user: &User,
    limit: &ResolvedUsageLimit,
    now: Timestamp,
) -> Budget {
    let (zone, tz_name) = tz(limit.limit.timezone.as_deref());
    let window = expiry::window(limit.limit.interval, now, &zone);
    let scope = limit.limit.type_;
    let entries: Vec<UsageEntry> = match scope {
        UsageLimitType::PerUser => user
            .status
            .as_ref()
            .map(|s| s.usage.clone())
            .unwrap_or_default(),
        UsageLimitType::PerGroup => stores
            .groups
            .get(&ObjectRef::new(&limit.group).within(ns))
            .and_then(|g| g.status.as_ref().map(|s| s.usage.clone()))
            .unwrap_or_default(),
    };
    let entry = find_entry(&entries, &limit.group, scope);
    let stale_window = entry.is_none_or(|e| e.window_start.as_ref().map(|t| t.0) != window.start);
    let persisted = entry.map(entry_ledger).unwrap_or_default();
    let ledger = expiry::roll(&persisted, &window);
    let user_name = user.name_any();
    let open = budget_users(stores, ns, limit, &user_name)
        .iter()
        .flat_map(|u| stores.sessions_of_user(ns, u))
        .filter_map(|s| {
            let start = s.status.as_ref()?.started_at.as_ref()?.0;
            Some(Open {
                uid: s.uid()?,
                start: ceil_ms(start),
            })
        })
        .collect();
    Budget {
        scope,
        group: limit.group.clone(),
        interval: limit.limit.interval,
        timezone: tz_name,
        window,
        ledger,
        open,
        limit_ms: expiry::limit_ms(limit.limit.hours),
        stale_window,
    }
}

/// Rounds up to the millisecond: the ledger counts whole milliseconds, and rounding a start up
/// (never down) keeps every usage deadline at or after the exact one.
pub fn ceil_ms(t: Timestamp) -> Timestamp {
    let ns = t.as_nanosecond();
    let rem = ns.rem_euclid(1_000_000);
    if rem == 0 {
        t
    } else {
        Timestamp::from_nanosecond(ns - rem + 1_000_000).unwrap_or(t)
    }
}

fn to_time(t: Option<Timestamp>) -> Option<Time> {
    t.map(Time)
}

/// What a guarded write of a ledger entry came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageWrite {
    /// Nothing to write: the entry was already as computed (or there is no object to write to).
    Unchanged,
    /// Written.
    Written,
    /// Refused (409): the object changed since the cached version the entry was computed
    /// from. Nothing was written; the caller reads again (a requeue, once the cache has
    /// caught up) and decides again, so that no update is lost.
    Behind,
}

/// Whether this pass refreshes the usage view, and with which start of this session (the cache
/// may not show this pass's own status write yet). Due when this pass recorded the session's
/// start (`started_now`), when a new window has begun (`stale_window`), or when an earlier
/// pass's refresh was refused because the cache was behind (`owed`): a refused refresh is
/// retried, never dropped. `start` is the session's start as this pass sees it.
pub fn view_due(
    started_now: bool,
    owed: bool,
    stale_window: bool,
    uid: &str,
    start: Option<Timestamp>,
) -> Option<Option<Open>> {
    (started_now || owed || stale_window).then(|| {
        start.map(|t| Open {
            uid: uid.to_string(),
            start: ceil_ms(t),
        })
    })
}

/// Closes an ending session into its budget's ledger and persists it (idempotent by uid).
///
/// The write is guarded by the cached object's resourceVersion, so that two sessions closing
/// at once (each computing the ledger from the same cached entry) never overwrite each other's
/// closed time: the second is refused ([`UsageWrite::Behind`]), and the caller closes again once
/// the cache shows the first.
pub async fn close_session(
    ctx: &Context,
    ns: &str,
    session: &Session,
    user: Option<&User>,
    limit: Option<&ResolvedUsageLimit>,
    now: Timestamp,
) -> Result<UsageWrite, Error> {
    let (Some(user), Some(limit)) = (user, limit) else {
        return Ok(UsageWrite::Unchanged);
    };
    let Some(start) = session
        .status
        .as_ref()
        .and_then(|s| s.started_at.as_ref())
        .map(|t| t.0)
    else {
        return Ok(UsageWrite::Unchanged); // never ran: nothing to charge
    };
    let uid = session.uid().unwrap_or_default();
    let b = budget(&ctx.stores, ns, user, limit, now);
    // The session (and its pod) exists until its finalizer is removed, so it is charged up to
    // now. (deletionTimestamp has whole-second precision and would drop up to a second.)
    let end = now;
    let start = ceil_ms(start);
    let closed = expiry::close(&b.ledger, &b.window, &uid, start, end.max(start));
    if closed == b.ledger {
        return Ok(UsageWrite::Unchanged);
    }
    // Drop uids of sessions that no longer exist, except this one (still present, finalizing).
    let live: HashSet<String> = in_namespace(&ctx.stores.sessions, ns)
        .iter()
        .filter_map(|s| s.uid())
        .collect();
    let closed = expiry::prune(&closed, |u| u == uid || live.contains(u));
    write_ledger(ctx, ns, user, limit, &b, &closed, now).await
}

/// Persists a budget's ledger (and its view: used and limit seconds, window, time zone),
/// guarded by the cached object's resourceVersion.
async fn write_ledger(
    ctx: &Context,
    ns: &str,
    user: &User,
    limit: &ResolvedUsageLimit,
    b: &Budget,
    ledger: &Ledger,
    now: Timestamp,
) -> Result<UsageWrite, Error> {
    let entry = ledger_entry(limit, b, ledger, now);
    apply_entry(ctx, ns, user, limit, b.scope, entry).await
}

/// The ledger entry of budget `b` with `ledger` as its durable part, its view as at `now`: the
/// window, and the time used in it by the ended sessions and the running ones so far.
fn ledger_entry(
    limit: &ResolvedUsageLimit,
    b: &Budget,
    ledger: &Ledger,
    now: Timestamp,
) -> UsageEntry {
    let open: Vec<Open> = b
        .open
        .iter()
        .filter(|o| !ledger.closed_sessions.contains(&o.uid))
        .cloned()
        .collect();
    let used = expiry::used_ms(ledger, &b.window, &open, now);
    UsageEntry {
        scope: b.scope,
        group: Some(limit.group.clone()),
        interval: b.interval,
        window_start: to_time(b.window.start),
        window_end: to_time(b.window.end),
        used_seconds: used / 1000,
        limit_seconds: b.limit_ms / 1000,
        timezone: Some(b.timezone.clone()),
        closed_ms: Some(ledger.closed_ms),
        closed_sessions: ledger.closed_sessions.clone(),
    }
}

/// Refreshes the view of `b`'s ledger entry when it is out of date: its window is not the
/// current one (a new window has started: the entry moves to it), or the time used differs by
/// a second or more (a session of the budget has just started). `started` is the session seen
/// starting by this reconcile (the cache does not show its start yet).
///
/// The durable part is written back unchanged (rolled into the current window), guarded by the
/// cached object's resourceVersion: were the cache behind a ledger write (a session just
/// closed) or any other write to the object, the API server refuses and nothing is lost
/// ([`UsageWrite::Behind`]); the caller owes the view and refreshes it again once the cache has
/// caught up.
pub async fn refresh_view(
    ctx: &Context,
    ns: &str,
    user: &User,
    limit: &ResolvedUsageLimit,
    b: &Budget,
    started: Option<Open>,
    now: Timestamp,
) -> Result<UsageWrite, Error> {
    let mut b = b.clone();
    if let Some(o) = started
        && !b.open.iter().any(|x| x.uid == o.uid)
    {
        b.open.push(o);
    }
    let entry = ledger_entry(limit, &b, &b.ledger, now);
    let persisted = match b.scope {
        UsageLimitType::PerUser => user.status.as_ref().map(|s| s.usage.clone()),
        UsageLimitType::PerGroup => ctx
            .stores
            .groups
            .get(&ObjectRef::new(&limit.group).within(ns))
            .and_then(|g| g.status.as_ref().map(|s| s.usage.clone())),
    }
    .unwrap_or_default();
    if !view_outdated(find_entry(&persisted, &limit.group, b.scope), &entry) {
        return Ok(UsageWrite::Unchanged);
    }
    apply_entry(ctx, ns, user, limit, b.scope, entry).await
}

/// Whether a persisted entry's view differs from a fresh one: another window, or another
/// figure by a second or more.
fn view_outdated(persisted: Option<&UsageEntry>, fresh: &UsageEntry) -> bool {
    match persisted {
        None => true,
        Some(p) => {
            p.window_start != fresh.window_start
                || p.window_end != fresh.window_end
                || p.limit_seconds != fresh.limit_seconds
                || p.used_seconds.abs_diff(fresh.used_seconds) >= 1
        }
    }
}

/// Applies `entry` as the budget's entry in the User's (perUser) or the Group's (perGroup)
/// `status.usage`, the other entries as cached. The write carries the cached resourceVersion
/// (the other entries are only current as of it), and a conflict (the cache is behind) is no
/// error: [`UsageWrite::Behind`], for the caller to read again and retry.
async fn apply_entry(
    ctx: &Context,
    ns: &str,
    user: &User,
    limit: &ResolvedUsageLimit,
    scope: UsageLimitType,
    entry: UsageEntry,
) -> Result<UsageWrite, Error> {
    let (name, entries, version) = match scope {
        UsageLimitType::PerUser => (
            user.name_any(),
            user.status
                .as_ref()
                .map(|s| s.usage.clone())
                .unwrap_or_default(),
            user.resource_version(),
        ),
        UsageLimitType::PerGroup => {
            let group = ctx
                .stores
                .groups
                .get(&ObjectRef::new(&limit.group).within(ns));
            (
                limit.group.clone(),
                group
                    .as_ref()
                    .and_then(|g| g.status.as_ref().map(|s| s.usage.clone()))
                    .unwrap_or_default(),
                group.and_then(|g| g.resource_version()),
            )
        }
    };
    let mut entries = entries;
    entries.retain(|e| !(e.group.as_deref() == Some(&limit.group) && e.scope == scope));
    entries.push(entry);
    // No version: no such object in the cache (a perGroup budget's Group just deleted).
    let Some(guard) = version else {
        return Ok(UsageWrite::Unchanged);
    };
    // The one status path (status::apply), as the usage ledger's own field manager.
    let usage = json!({"usage": entries});
    let c = &ctx.client;
    use crate::controller::status::{apply, is_conflict};
    let result = match scope {
        UsageLimitType::PerUser => apply::<User>(c, ns, &name, USAGE_MANAGER, &usage, Some(&guard))
            .await
            .map(|_| ()),
        UsageLimitType::PerGroup => {
            apply::<Group>(c, ns, &name, USAGE_MANAGER, &usage, Some(&guard))
                .await
                .map(|_| ())
        }
    };
    match result {
        Ok(()) => Ok(UsageWrite::Written),
        Err(e) if is_conflict(&e) => Ok(UsageWrite::Behind),
        Err(e) => Err(e),
    }
}

/// Adds the usage finalizer (JSON patch guarded by the resourceVersion).
pub async fn add_finalizer(ctx: &Context, ns: &str, s: &Session) -> Result<(), Error> {
    if s.finalizers().iter().any(|f| f == USAGE_FINALIZER) {
        return Ok(());
    }
    let api: Api<Session> = Api::namespaced(ctx.client.clone(), ns);
    let rv = s.resource_version().unwrap_or_default();
    let ops = if s.finalizers().is_empty() {
        json!([{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
               {"op": "add", "path": "/metadata/finalizers", "value": [USAGE_FINALIZER]}])
    } else {
        json!([{"op": "test", "path": "/metadata/resourceVersion", "value": rv},
               {"op": "add", "path": "/metadata/finalizers/-", "value": USAGE_FINALIZER}])
    };
    let patch: json_patch::Patch = serde_json::from_value(ops).expect("static JSON patch");
    api.patch(
        &s.name_any(),
        &PatchParams::default(),
        &Patch::<()>::Json(patch),
    )
    .await
    .map_err(|source| Error::Finalizer {
        kind: "Session",
        name: s.name_any(),
        source,
    })?;
    Ok(())
}

/// Removes the usage finalizer.
pub async fn remove_finalizer(ctx: &Context, ns: &str, s: &Session) -> Result<(), Error> {
    let Some(i) = s.finalizers().iter().position(|f| f == USAGE_FINALIZER) else {
        return Ok(());
    };
    let api: Api<Session> = Api::namespaced(ctx.client.clone(), ns);
    let ops = json!([{"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": USAGE_FINALIZER},
                     {"op": "remove", "path": format!("/metadata/finalizers/{i}")}]);
    let patch: json_patch::Patch = serde_json::from_value(ops).expect("static JSON patch");
    match api
        .patch(
            &s.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(st)) if st.code == 404 => Ok(()),
        Err(source) => Err(Error::Finalizer {
            kind: "Session",
            name: s.name_any(),
            source,
        }),
    }
}

/// Expiry timers and actions of this replica.
///
/// **Timers.** A reconcile that leaves a session Running (or Paused) with a deadline and nothing
/// else to do *arms* it here with a fingerprint of everything the deadline was computed from: the
/// session's resourceVersion after the reconcile's own write, its user's, and every Group of the
/// namespace (their generations: settings and memberships come from specs). One task ([`super::run_timers`]) sleeps until the
/// earliest deadline; at it, a session whose fingerprint still matches the cache is acted on at
/// once, without resolving settings again, and any other goes back to a full reconcile. The
/// controller's own requeue, shortly after the deadline, stays as the safety net.
///
/// **Actions.** A due session's action (delete, or `spec.state` Stopped/Paused) is decided
/// synchronously and its API calls run in a task of their own, so deadlines that fall on the same
/// instant do not queue behind each other (each would hold a reconcile slot for a round trip).
/// A failed action is retried through [`Actions::retries`]. An action just carried out is
/// remembered for a few seconds so that a reconcile running before the watch shows its effect
/// does not repeat it.
pub struct Actions {
    in_flight: Mutex<HashSet<String>>,
    done: Mutex<Done>,
    retry_tx: mpsc::UnboundedSender<ObjectRef<Session>>,
    retry_rx: Mutex<Option<mpsc::UnboundedReceiver<ObjectRef<Session>>>>,
    timers: Mutex<Timers>,
    wake: tokio::sync::Notify,
}

/// How long a carried-out action is remembered (the watch shows its effect well within it).
const DONE_FOR: Duration = Duration::from_secs(5);

/// A deadline armed for the fast path, with the fingerprint it was computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arm {
    /// The deadline.
    pub at: Timestamp,
    /// The binding rule.
    pub rule: ExpiryRule,
    /// The action.
    pub action: KeepaliveExpirationAction,
    /// The session's uid.
    pub uid: String,
    /// The session's resourceVersion once the reconcile's own write (if any) landed.
    pub session_version: String,
    /// The user's generation (its spec: groups, settings, realm).
    pub user_generation: Option<i64>,
    /// Digest of every Group of the namespace (name and resourceVersion).
    pub groups: u64,
}

impl Arm {
    /// Whether the deadline still holds for `session` as the cache shows it now, with its
    /// user's generation and the namespace's groups digest: same object (uid), unchanged since
    /// armed (resourceVersion: no keepalive, state change or status write since), not being
    /// deleted, and the same user and group specs.
    pub fn still_holds(
        &self,
        session: &Session,
        user_generation: Option<i64>,
        groups: u64,
    ) -> bool {
        session.uid().as_deref() == Some(self.uid.as_str())
            && session.resource_version().as_deref() == Some(self.session_version.as_str())
            && session.metadata.deletion_timestamp.is_none()
            && user_generation == self.user_generation
            && groups == self.groups
    }
}

/// Actions carried out in the last [`DONE_FOR`]: by key, and in the order they finished (so
/// that forgetting them costs nothing per lookup).
#[derive(Default)]
struct Done {
    by_key: HashMap<String, (Timestamp, Instant)>,
    order: VecDeque<(Instant, String)>,
}

impl Done {
    fn forget_old(&mut self) {
        while let Some((when, key)) = self.order.front() {
            if when.elapsed() < DONE_FOR {
                break;
            }
            if self.by_key.get(key).is_some_and(|(_, w)| w == when) {
                self.by_key.remove(key);
            }
            self.order.pop_front();
        }
    }
}

#[derive(Default)]
struct Timers {
    by_key: HashMap<String, Arm>,
    queue: BTreeSet<(Timestamp, String)>,
}

impl Default for Actions {
    fn default() -> Self {
        let (retry_tx, retry_rx) = mpsc::unbounded();
        Self {
            in_flight: Mutex::new(HashSet::new()),
            done: Mutex::new(Done::default()),
            retry_tx,
            retry_rx: Mutex::new(Some(retry_rx)),
            timers: Mutex::new(Timers::default()),
            wake: tokio::sync::Notify::new(),
        }
    }
}

impl Actions {
    /// Marks `key`'s action for the deadline `at` as started; false when one is already in
    /// flight, or was carried out moments ago.
    pub fn begin(&self, key: &str, at: Timestamp) -> bool {
        {
            let done = self.done.lock().unwrap_or_else(|p| p.into_inner());
            if done
                .by_key
                .get(key)
                .is_some_and(|(a, when)| *a == at && when.elapsed() < DONE_FOR)
            {
                return false;
            }
        }
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string())
    }

    /// Marks `key`'s action as finished (`ok`: carried out).
    pub fn end(&self, key: &str, at: Timestamp, ok: bool) {
        if ok {
            let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
            done.forget_old();
            let now = Instant::now();
            done.by_key.insert(key.to_string(), (at, now));
            done.order.push_back((now, key.to_string()));
        }
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Whether an action of `key` is in flight.
    pub fn in_flight(&self, key: &str) -> bool {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    /// Asks for another reconcile of `obj`.
    pub fn retry(&self, obj: ObjectRef<Session>) {
        let _ = self.retry_tx.unbounded_send(obj);
    }

    /// The stream of retries, for the controller (taken once).
    pub fn retries(&self) -> mpsc::UnboundedReceiver<ObjectRef<Session>> {
        self.retry_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| mpsc::unbounded().1)
    }

    /// Arms (or re-arms) `key`'s deadline.
    pub fn arm(&self, key: &str, arm: Arm) {
        let earliest = {
            let mut t = self.timers.lock().unwrap_or_else(|p| p.into_inner());
            if t.by_key.get(key) == Some(&arm) {
                return;
            }
            if let Some(old) = t.by_key.remove(key) {
                t.queue.remove(&(old.at, key.to_string()));
            }
            t.queue.insert((arm.at, key.to_string()));
            let earliest = t
                .queue
                .first()
                .is_some_and(|(at, k)| *at == arm.at && k == key);
            t.by_key.insert(key.to_string(), arm);
            earliest
        };
        if earliest {
            self.wake.notify_one();
        }
    }

    /// Disarms `key` (no deadline, or one the controller handles itself).
    pub fn disarm(&self, key: &str) {
        let mut t = self.timers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = t.by_key.remove(key) {
            t.queue.remove(&(old.at, key.to_string()));
        }
    }

    /// Number of armed deadlines.
    pub fn armed(&self) -> usize {
        self.timers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_key
            .len()
    }

    /// The earliest armed deadline.
    pub fn next(&self) -> Option<Timestamp> {
        self.timers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue
            .first()
            .map(|(at, _)| *at)
    }

    /// Removes and returns every deadline due at `now` (`at <= now`), earliest first.
    pub fn take_due(&self, now: Timestamp) -> Vec<(String, Arm)> {
        let mut t = self.timers.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        while let Some((at, key)) = t.queue.first().cloned() {
            if at > now {
                break;
            }
            t.queue.pop_first();
            if let Some(arm) = t.by_key.remove(&key) {
                out.push((key, arm));
            }
        }
        out
    }

    /// Waits until an earlier deadline is armed (or `d` passes).
    pub async fn sleep(&self, d: Duration) {
        let _ = tokio::time::timeout(d, self.wake.notified()).await;
    }
}

/// Digest of the Groups of `ns` (names and generations): any change to a group's spec (settings,
/// `autoAddLocalUsers`), a new group or a deleted one changes it. Status writes do not.
pub fn groups_digest(stores: &Stores, ns: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut v: Vec<(String, i64)> = in_namespace(&stores.groups, ns)
        .iter()
        .map(|g| (g.name_any(), g.metadata.generation.unwrap_or_default()))
        .collect();
    v.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    h.finish()
}

/// Time until `at` from `now`, at least 1 ms (a timer never fires early: the reconcile checks
/// `now >= at` again when it wakes).
pub fn until(at: Timestamp, now: Timestamp) -> Duration {
    let d = at.duration_since(now);
    if d.is_negative() {
        Duration::from_millis(1)
    } else {
        Duration::try_from(d)
            .unwrap_or(Duration::from_millis(1))
            .max(Duration::from_millis(1))
    }
}

/// Whether the session is subject to expiry now: admitted and not refused/failed/expired.
pub fn armed(phase: Option<SessionPhase>, has_pod: bool) -> bool {
    has_pod
        || matches!(
            phase,
            Some(SessionPhase::Running | SessionPhase::Paused | SessionPhase::Stopped)
        )
}

/// Sessions in `ns` that may share a usage budget with `s`'s user (theirs included, `s` among
/// them): re-evaluated when `s` starts, since their usage deadline moves (when it ends, its
/// time closed into the User's ledger reaches the User's sessions through the User). None when no
/// Group of the user has a usage limit; the user's own sessions for a `perUser` limit, every
/// member's for a `perGroup` one. A superset (a member of a limited Group may resolve its limit
/// from another Group): a peer re-evaluated for nothing writes nothing.
pub fn budget_peers(stores: &Stores, ns: &str, s: &Session) -> Vec<Arc<Session>> {
    let mut users: Vec<String> = Vec::new();
    for g in stores.groups.state().iter() {
        let (Some(limit), Some(st)) = (g.spec.settings.usage_limit.as_ref(), g.status.as_ref())
        else {
            continue;
        };
        if g.namespace().as_deref() != Some(ns) || !st.members.contains(&s.spec.user) {
            continue;
        }
        users.push(s.spec.user.clone());
        if limit.type_ == UsageLimitType::PerGroup {
            users.extend(st.members.iter().cloned());
        }
    }
    users.sort();
    users.dedup();
    users
        .iter()
        .flat_map(|u| stores.sessions_of_user(ns, u))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn the_usage_view_counts_running_sessions_and_moves_to_the_new_window() {
        use crate::crd::v1alpha1::{UsageLimit, UsageLimitInterval};
        let ts = |s: &str| s.parse::<Timestamp>().unwrap();
        let limit = ResolvedUsageLimit {
            limit: UsageLimit {
                type_: UsageLimitType::PerUser,
                interval: UsageLimitInterval::Daily,
                hours: 1.0,
                timezone: None,
            },
            group: "g".into(),
            priority: 10,
        };
        let day = |d: &str| Window {
            start: Some(ts(&format!("{d}T00:00:00Z"))),
            end: None,
        };
        let now = ts("2026-01-02T10:00:00Z");
        let b = Budget {
            scope: UsageLimitType::PerUser,
            group: "g".into(),
            interval: UsageLimitInterval::Daily,
            timezone: "UTC".into(),
            window: day("2026-01-02"),
            ledger: Ledger {
                window_start: Some(ts("2026-01-02T00:00:00Z")),
                closed_ms: 60_000,
                closed_sessions: vec!["ended".into()],
            },
            open: vec![Open {
                uid: "running".into(),
                start: ts("2026-01-02T09:59:30Z"),
            }],
            limit_ms: 3_600_000,
            stale_window: false,
        };
        let e = ledger_entry(&limit, &b, &b.ledger, now);
        // Ended sessions (60 s) plus the running one so far (30 s).
        assert_eq!(e.used_seconds, 90);
        assert_eq!(e.limit_seconds, 3600);
        assert_eq!(e.closed_ms, Some(60_000), "the durable part as it was");
        assert_eq!(e.window_start.as_ref().map(|t| t.0), b.window.start);
        // Up to date: the same window and figures within a second.
        assert!(!view_outdated(Some(&e), &e));
        let mut later = e.clone();
        later.used_seconds += 1;
        assert!(
            view_outdated(Some(&e), &later),
            "a session started: refreshed"
        );
        // Yesterday's entry: out of date, whatever its figures.
        let mut yesterday = e.clone();
        yesterday.window_start = Some(Time(ts("2026-01-01T00:00:00Z")));
        assert!(view_outdated(Some(&yesterday), &e));
        assert!(view_outdated(None, &e), "no entry yet");
    }

    #[tokio::test]
    async fn an_action_runs_once_at_a_time_and_retries_reach_the_controller() {
        let a = Actions::default();
        let at = Timestamp::from_second(1_000).unwrap();
        assert!(a.begin("ns/s1", at));
        assert!(
            !a.begin("ns/s1", at),
            "a second action of the same session waits"
        );
        assert!(a.begin("ns/s2", at), "other sessions are independent");
        assert!(a.in_flight("ns/s1"));
        a.end("ns/s1", at, false);
        assert!(!a.in_flight("ns/s1"));
        assert!(a.begin("ns/s1", at), "a failed action is tried again");
        a.end("ns/s1", at, true);
        assert!(
            !a.begin("ns/s1", at),
            "a carried-out action is not repeated before the watch shows it"
        );
        let later = Timestamp::from_second(2_000).unwrap();
        assert!(a.begin("ns/s1", later), "a new deadline is acted on");

        let mut retries = a.retries();
        a.retry(ObjectRef::new("s1").within("ns"));
        let got = retries.next().await.expect("a retry");
        assert_eq!(got, ObjectRef::new("s1").within("ns"));
        // The stream is handed out once; a second taker gets an empty, closed stream.
        assert!(a.retries().next().await.is_none());
    }

    fn arm(at: i64) -> Arm {
        Arm {
            at: Timestamp::from_second(at).unwrap(),
            rule: ExpiryRule::SessionTimeLimit,
            action: KeepaliveExpirationAction::Delete,
            uid: "u".into(),
            session_version: "1".into(),
            user_generation: None,
            groups: 0,
        }
    }

    #[test]
    fn armed_deadlines_come_due_in_order_and_re_arming_replaces() {
        let a = Actions::default();
        a.arm("ns/b", arm(20));
        a.arm("ns/a", arm(10));
        a.arm("ns/c", arm(30));
        a.arm("ns/c", arm(15)); // re-armed earlier: replaces
        a.arm("ns/d", arm(5));
        a.disarm("ns/d");
        assert_eq!(a.armed(), 3);
        assert_eq!(a.next(), Some(Timestamp::from_second(10).unwrap()));
        assert!(a.take_due(Timestamp::from_second(9).unwrap()).is_empty());
        let due: Vec<String> = a
            .take_due(Timestamp::from_second(15).unwrap())
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            due,
            ["ns/a", "ns/c"],
            "due at exactly the deadline, earliest first"
        );
        assert_eq!(a.armed(), 1);
        assert_eq!(a.next(), Some(Timestamp::from_second(20).unwrap()));
    }

    #[test]
    fn an_armed_deadline_holds_only_while_its_inputs_are_unchanged() {
        let session = |uid: &str, rv: &str, deleting: bool| -> Session {
            let mut s: Session = serde_json::from_value(serde_json::json!({
                "apiVersion": "cubicle.dev/v1alpha1", "kind": "Session",
                "metadata": {"name": "s", "namespace": "ns", "uid": uid, "resourceVersion": rv},
                "spec": {"user": "u", "workspace": "w"}
            }))
            .unwrap();
            if deleting {
                s.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
            }
            s
        };
        let mut a = arm(10);
        a.user_generation = Some(3);
        a.groups = 42;
        assert!(a.still_holds(&session("u", "1", false), Some(3), 42));
        // A keepalive, a state change or any write to the session changes its version.
        assert!(!a.still_holds(&session("u", "2", false), Some(3), 42));
        // A session re-created under the same name.
        assert!(!a.still_holds(&session("other", "1", false), Some(3), 42));
        assert!(!a.still_holds(&session("u", "1", true), Some(3), 42));
        // The user's spec (groups, settings) or any group's spec changed.
        assert!(!a.still_holds(&session("u", "1", false), Some(4), 42));
        assert!(!a.still_holds(&session("u", "1", false), None, 42));
        assert!(!a.still_holds(&session("u", "1", false), Some(3), 43));
    }

    #[test]
    fn a_timer_never_fires_before_its_deadline() {
        let now = Timestamp::from_second(1_000).unwrap();
        assert_eq!(until(now, now), Duration::from_millis(1));
        assert_eq!(
            until(Timestamp::from_second(999).unwrap(), now),
            Duration::from_millis(1)
        );
        let at = Timestamp::from_nanosecond(1_000_000_000_000 + 2_500_000).unwrap();
        assert_eq!(until(at, now), Duration::from_micros(2_500));
    }

    #[test]
    fn a_carried_out_action_is_forgotten_after_its_time_and_only_its_own_entry() {
        let mut done = Done::default();
        let long_ago = Instant::now()
            .checked_sub(DONE_FOR + Duration::from_secs(1))
            .expect("the clock is past boot + 6 s");
        let at = Timestamp::UNIX_EPOCH;
        for key in ["ns/old", "ns/again"] {
            done.by_key.insert(key.into(), (at, long_ago));
            done.order.push_back((long_ago, key.into()));
        }
        // "again" was carried out once more just now: its old queue entry must not remove it.
        let now = Instant::now();
        done.by_key.insert("ns/again".into(), (at, now));
        done.order.push_back((now, "ns/again".into()));
        done.forget_old();
        assert!(!done.by_key.contains_key("ns/old"));
        assert_eq!(done.by_key.get("ns/again"), Some(&(at, now)));
        assert_eq!(done.order.len(), 1);
    }

    #[test]
    fn a_usage_view_refresh_is_due_when_a_session_starts_a_window_turns_or_one_was_refused() {
        let start = "2026-01-02T09:59:30.0000001Z".parse::<Timestamp>().unwrap();
        let open = Some(Open {
            uid: "s".into(),
            start: ceil_ms(start),
        });
        // (started now, owed by a refused write, stale window, start) -> due, with which start
        let rows = [
            ((false, false, false, Some(start)), None),
            ((true, false, false, Some(start)), Some(open.clone())),
            ((false, false, true, Some(start)), Some(open.clone())),
            ((false, false, true, None), Some(None)),
            // The flake this fixes: a refresh refused with a conflict (the cache behind the
            // User's last write) was dropped, and the view showed no running session until
            // some other change. Owed, the next pass refreshes it with the session's start.
            ((false, true, false, Some(start)), Some(open.clone())),
            ((false, true, false, None), Some(None)),
        ];
        for ((started_now, owed, stale, at), want) in rows {
            assert_eq!(
                view_due(started_now, owed, stale, "s", at),
                want,
                "started_now={started_now} owed={owed} stale={stale} start={at:?}"
            );
        }
    }
}
