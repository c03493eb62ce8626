//! Pure decisions of the Session reconcile: inputs read from the caches plus `now` in, what to
//! do out. No client, no clock, no I/O: the reconcile shell ([`super::reconcile`]) reads the
//! caches, calls these, and applies what they return.
//!
//! - [`expiry`]: the keepalive, the deadline that binds (keepalive, time limit, usage budget),
//!   whether it is due now, and the timers to set.
//! - [`pod_status`]: the status a session's pod tells (phase, node, start, conditions), and
//!   whether a starting pod is worth a status write yet.
//! - [`merge_conditions`]: which of the old conditions a new status keeps.
//!
//! The decision table of the Session controller is their unit tests, with those of
//! [`super::plan`] (launch checks, placement, the profile claim rule, state changes).

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};

use super::build::{self, ProfileMount};
use super::expiry::{Budget, ceil_ms, until};
use super::plan::{self, Cond, reasons};
use crate::controller::cached::CachedPod;
use crate::crd::v1alpha1::{
    DesiredState, Keepalive, KeepaliveExpirationAction, KeepaliveSource, PersistentProfile,
    ProfileMode, ProfileOutcome, ProfileStatus, SessionPhase, SessionStatus,
};
use crate::expiry::{Deadline, Open, Policy, SessionTimes};
use crate::resolve::EffectiveSettings;

/// The state the session is to be in, and the refusal of the requested one if any: stop and
/// pause need their permissions (the expiry needs none), and a refused change leaves the
/// session as it was.
pub fn state(
    desired: DesiredState,
    allow_stop: bool,
    allow_pause: bool,
    by_expiry: bool,
    phase: Option<SessionPhase>,
) -> (DesiredState, Option<plan::Refusal>) {
    match plan::check_state_change(desired, allow_stop, allow_pause, by_expiry) {
        Ok(()) => (desired, None),
        Err(r) => (
            match phase {
                Some(SessionPhase::Stopped) => DesiredState::Stopped,
                Some(SessionPhase::Paused) => DesiredState::Paused,
                _ => DesiredState::Running,
            },
            Some(r),
        ),
    }
}

/// What the profile decision looks at (the workspace's profile, when the mode is not Disabled).
pub struct ProfileInputs<'a> {
    /// The workspace's persistent profile (None: Disabled, or none configured).
    pub cfg: Option<&'a PersistentProfile>,
    /// The mode that applies.
    pub mode: ProfileMode,
    /// The user's username and id (for the templates).
    pub username: &'a str,
    /// The user's id.
    pub user_id: &'a str,
    /// This session's uid.
    pub uid: &'a str,
    /// The profile status this session already has (a Reset is done once).
    pub old: Option<&'a ProfileStatus>,
    /// Of a claim template: the active claim of the user's profile (name, and the uid of the
    /// session whose Reset created it), as cached.
    pub active: Option<(&'a str, Option<&'a str>)>,
    /// Of a claim template: the name a new claim would take (the base name, or a suffixed one
    /// when the base is taken).
    pub next_name: &'a str,
    /// Now, in unix seconds (archive names).
    pub now_second: i64,
}

/// A profile claim to create (first launch, or a Reset), and the claim it archives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPlan {
    /// The claim to create.
    pub name: String,
    /// The template-derived base name (the profile's key).
    pub base: String,
    /// The claim archived (labelled, never deleted), if any.
    pub archive: Option<String>,
    /// The uid of the session whose Reset creates it.
    pub reset_by: Option<String>,
}

/// What the profile decision says.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfilePlan {
    /// `status.profile`.
    pub status: ProfileStatus,
    /// A claim to create (and one to archive).
    pub claim: Option<ClaimPlan>,
    /// How the pod mounts the profile.
    pub mount: Option<ProfileMount>,
    /// The claim whose bound volume's zone the session must run in, if any.
    pub zone_of: Option<String>,
}

/// The base name of a claim template's claims for a user.
pub fn claim_base(template_name: &str, username: &str, user_id: &str) -> String {
    build::dns_name(&build::render_template(template_name, username, user_id))
}

/// The profile of a launch: which claim (or shared directory) it mounts, what it creates or
/// archives, and what its status says. A Reset is done once per session: a session that already
/// reset (its status, or the active claim's reset-by mark) mounts what it created.
pub fn profile(i: &ProfileInputs) -> ProfilePlan {
    let disabled = ProfilePlan {
        status: ProfileStatus {
            outcome: Some(ProfileOutcome::Disabled),
            ..Default::default()
        },
        claim: None,
        mount: None,
        zone_of: None,
    };
    let Some(cfg) = i.cfg.filter(|_| i.mode != ProfileMode::Disabled) else {
        return disabled;
    };
    let already_reset = i.old.and_then(|p| p.outcome).is_some_and(|o| {
        matches!(
            o,
            ProfileOutcome::ResetArchived | ProfileOutcome::ResetFresh
        )
    });
    let reset = i.mode == ProfileMode::Reset && !already_reset;
    if let Some(t) = &cfg.claim_template {
        let base = claim_base(&t.name, i.username, i.user_id);
        let done_by_me = i.active.is_some_and(|(_, by)| by == Some(i.uid));
        let (claim_name, plan, zone_of) = match (i.active, reset && !done_by_me) {
            (Some((name, _)), false) => (name.to_string(), None, Some(name.to_string())),
            (old, true) => (
                i.next_name.to_string(),
                Some(ClaimPlan {
                    name: i.next_name.to_string(),
                    base: base.clone(),
                    archive: old.map(|(n, _)| n.to_string()),
                    reset_by: Some(i.uid.to_string()),
                }),
                None,
            ),
            (None, false) => (
                base.clone(),
                Some(ClaimPlan {
                    name: base.clone(),
                    base: base.clone(),
                    archive: None,
                    reset_by: None,
                }),
                None,
            ),
        };
        let archived_before = done_by_me && i.old.and_then(|p| p.archived_as.as_ref()).is_some();
        let outcome = if reset || done_by_me {
            if plan.as_ref().is_some_and(|p| p.archive.is_some()) || archived_before {
                ProfileOutcome::ResetArchived
            } else {
                ProfileOutcome::ResetFresh
            }
        } else {
            ProfileOutcome::Mounted
        };
        return ProfilePlan {
            status: ProfileStatus {
                claim: Some(claim_name.clone()),
                outcome: Some(outcome),
                archived_as: plan.as_ref().and_then(|p| p.archive.clone()),
                ..Default::default()
            },
            claim: plan,
            mount: Some(ProfileMount::Claim {
                claim: claim_name,
                mount_path: cfg.mount_path.clone(),
            }),
            zone_of,
        };
    }
    let Some(sv) = &cfg.shared_volume else {
        return disabled;
    };
    let sub_path = build::render_template(&sv.sub_path, i.username, i.user_id);
    let archive_to = reset.then(|| format!("{sub_path}.archived-{}", i.now_second));
    ProfilePlan {
        status: ProfileStatus {
            claim: Some(sv.claim_name.clone()),
            sub_path: Some(sub_path.clone()),
            outcome: Some(if reset {
                ProfileOutcome::ResetArchived
            } else {
                ProfileOutcome::Mounted
            }),
            archived_as: archive_to.clone(),
            message: reset.then(|| {
                "the old profile directory is renamed (never deleted) by the profile-reset init container"
                    .to_string()
            }),
        },
        claim: None,
        mount: Some(ProfileMount::SubPath {
            claim: sv.claim_name.clone(),
            sub_path,
            mount_path: cfg.mount_path.clone(),
            archive_to,
        }),
        zone_of: Some(sv.claim_name.clone()),
    }
}

/// What the expiry looks at.
pub struct ExpiryInputs<'a> {
    /// The status as cached.
    pub old: &'a SessionStatus,
    /// The user's effective settings.
    pub settings: &'a EffectiveSettings,
    /// The keepalive the client reported (the annotation), if any.
    pub reported_keepalive: Option<Timestamp>,
    /// `metadata.creationTimestamp` (now if absent).
    pub created: Timestamp,
    /// The pod, if it is this session's.
    pub pod: Option<&'a CachedPod>,
    /// The session's uid.
    pub uid: &'a str,
    /// The usage budget that applies, if any.
    pub budget: Option<&'a Budget>,
    /// The state the session is to be in (a refused change leaves it as it was).
    pub effective: DesiredState,
    /// Running requested of a stopped or paused session (and not refused).
    pub resuming: bool,
    /// Now.
    pub now: Timestamp,
}

/// What the expiry decided.
#[derive(Debug, Clone, PartialEq)]
pub enum ExpiryDecision {
    /// The deadline is due: act on it now (delete, stop or pause).
    Due(Deadline),
    /// Not due: the status fields to write and the timers to set.
    Waiting(ExpiryStatus),
}

/// The expiry's part of the status, and its timers.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpiryStatus {
    /// `status.lastKeepalive`.
    pub last_keepalive: Option<Keepalive>,
    /// The deadline that binds, if any (`status.expiresAt`, `expiryRule`, `expiryAction`).
    pub deadline: Option<Deadline>,
    /// `status.usageRemainingSeconds` (with a budget).
    pub usage_remaining_seconds: Option<u64>,
    /// When to look again (the deadline, a new usage window), if sooner than the resync.
    pub requeue: Option<Duration>,
    /// The deadline the fast path may enforce at its instant (not a usage deadline: that one
    /// moves with other sessions, so only a reconcile computes it).
    pub armable: Option<Deadline>,
}

/// When the session really started: as persisted, else now if its pod is seen ready.
pub fn started(old: &SessionStatus, pod: Option<&CachedPod>, now: Timestamp) -> Option<Timestamp> {
    old.started_at.as_ref().map(|t| t.0).or_else(|| {
        pod.filter(|p| plan::observe(Some(p), false).ready)
            .map(|p| plan::started_at(p, now))
    })
}

/// The keepalive, the binding deadline and whether it is due (see [`ExpiryDecision`]).
pub fn expiry(i: &ExpiryInputs) -> ExpiryDecision {
    let old = i.old;
    let now = i.now;
    let persisted = old.last_keepalive.as_ref().map(|k| k.time.0);
    let mut next = crate::expiry::next_keepalive(persisted, i.reported_keepalive, now);
    let mut source = if next.is_some() && next != persisted {
        KeepaliveSource::Annotation
    } else {
        old.last_keepalive
            .as_ref()
            .map(|k| k.source)
            .unwrap_or(KeepaliveSource::Start)
    };
    if i.resuming {
        // Resuming is activity: the keepalive clock restarts now.
        next = Some(now);
        source = KeepaliveSource::Start;
    }
    let started = started(old, i.pod, now);
    // The start counts as activity: no keepalive yet, or one older than the start (written
    // before the session existed, or by a client clock running behind), means the start.
    if let Some(start) = started.or(next.map(|_| i.created))
        && next.is_none_or(|k| k < start)
    {
        next = Some(start);
        source = KeepaliveSource::Start;
    }
    let stopped = old.phase == Some(SessionPhase::Stopped) && !i.resuming;
    let st = i.settings;
    let policy = Policy {
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
    let usage_deadline = match (i.budget, started) {
        (Some(b), Some(start)) => {
            let mut b = b.clone();
            if !b.open.iter().any(|o| o.uid == i.uid) {
                b.open.push(Open {
                    uid: i.uid.to_string(),
                    start: ceil_ms(start),
                });
            }
            b.exhausted_at(now)
        }
        _ => None,
    };
    let times = SessionTimes {
        created: i.created,
        started,
        last_keepalive: next.or(started),
    };
    let d = crate::expiry::deadline(&times, &policy, usage_deadline);
    // Stop and pause are done once requested (the pod follows spec.state).
    let noop = match d.action {
        KeepaliveExpirationAction::Delete => false,
        KeepaliveExpirationAction::Stop => stopped || i.effective == DesiredState::Stopped,
        KeepaliveExpirationAction::Pause => {
            stopped || matches!(i.effective, DesiredState::Paused | DesiredState::Stopped)
        }
    };
    if crate::expiry::is_due(&d, now) && !noop && !i.resuming {
        return ExpiryDecision::Due(d);
    }
    let mut requeue: Option<Duration> = None;
    let mut sooner = |d: Duration| requeue = Some(requeue.map_or(d, |r: Duration| r.min(d)));
    let bounded = d.at < Timestamp::MAX;
    let mut armable = None;
    if bounded && !noop {
        sooner(until(d.at, now));
        if i.budget.is_none() {
            armable = Some(d.clone());
        }
    }
    if let Some(end) = i.budget.and_then(|b| b.window.end) {
        sooner(until(end, now));
    }
    ExpiryDecision::Waiting(ExpiryStatus {
        last_keepalive: next.map(|k| Keepalive {
            time: MicroTime(k),
            source,
        }),
        deadline: bounded.then_some(d),
        usage_remaining_seconds: i.budget.map(|b| b.remaining_ms(now) / 1000),
        requeue,
        armable,
    })
}

/// A condition of `type_`, keeping the transition time of the same condition in `old` when its
/// status did not change.
pub fn condition(
    type_: Cond,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    old: &[Condition],
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let type_ = type_.as_str();
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

/// Which of `old`'s conditions the new status keeps beside the recomputed `new` ones: those not
/// recomputed, unless they no longer apply (a refused state change once it is no longer refused,
/// a refused resume once the session is no longer stopped, a refused admission once the session
/// is not refused).
pub fn merge_conditions(
    old: &[Condition],
    mut new: Vec<Condition>,
    state_refused: bool,
    effective: DesiredState,
    phase: Option<SessionPhase>,
) -> Vec<Condition> {
    for c in old {
        let recomputed = new.iter().any(|n| n.type_ == c.type_);
        let stale = (c.type_ == Cond::StateChange.as_str() && !state_refused)
            || (c.type_ == Cond::Resumed.as_str() && effective != DesiredState::Stopped)
            || (c.type_ == Cond::Admitted.as_str()
                && phase != Some(SessionPhase::Refused)
                && c.status == "False");
        if !recomputed && !stale {
            new.push(c.clone());
        }
    }
    new
}

/// What a session's pod tells its status.
#[derive(Debug, Clone, PartialEq)]
pub struct PodStatus {
    /// The phase.
    pub phase: SessionPhase,
    /// The node.
    pub node: Option<String>,
    /// `status.startedAt`, set the first time the pod is seen ready.
    pub started_at: Option<MicroTime>,
    /// The conditions the pod decides (Ready, Admitted).
    pub conditions: Vec<Condition>,
    /// A starting pod not worth a status write yet: look again after this long (a problem
    /// becomes worth reporting, or a slow start).
    pub quiet_for: Option<Duration>,
}

/// The status a session's pod tells at `now` (`paused`: the session is to be paused).
/// `state_refused`: a state change was refused (that is worth a write, even while starting).
pub fn pod_status(
    pod: &CachedPod,
    paused: bool,
    old: &SessionStatus,
    generation: Option<i64>,
    state_refused: bool,
    now: &Time,
) -> PodStatus {
    let obs = plan::observe(Some(pod), paused);
    let oc = &old.conditions;
    let mut conditions = Vec::new();
    let mut quiet_for = None;
    let started_at = match &old.started_at {
        Some(t) => Some(t.clone()),
        None => obs.ready.then(|| MicroTime(plan::started_at(pod, now.0))),
    };
    if obs.phase == SessionPhase::Pending {
        let age = pod
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| now.0.duration_since(t.0).as_secs_f64())
            .unwrap_or_default();
        let report = super::pending_report(obs.problem.as_deref(), age, oc);
        let reported_before = oc.iter().any(|c| {
            c.type_ == Cond::Ready.as_str() && c.status == "False" && c.reason == "PodPending"
        });
        if report.is_none() && !reported_before && !state_refused {
            // On its way: not worth a status write (the floor writes nothing while a pod
            // starts either). Look again when the pod changes, and when a problem or a slow
            // start becomes worth reporting.
            let left = match obs.problem.as_deref() {
                Some(p) => super::report_after(p).as_secs_f64() - age,
                None => super::SLOW_START_REPORT_AFTER.as_secs_f64() - age,
            };
            quiet_for = Some(Duration::from_secs_f64(left.max(0.1)));
        }
        conditions.push(condition(
            Cond::Ready,
            false,
            "PodPending",
            // A problem reported before and now gone: say the pod is on its way.
            &report.unwrap_or_else(|| "waiting for the session pod to start".into()),
            generation,
            oc,
            now,
        ));
    }
    if obs.phase == SessionPhase::Failed {
        conditions.push(condition(
            Cond::Ready,
            false,
            "PodFailed",
            obs.message.as_deref().unwrap_or("the session pod failed"),
            generation,
            oc,
            now,
        ));
    }
    if obs.ready {
        // A paused session's pod runs, but nobody can use it: not Ready. No Event for a
        // routine start: the phase, the Ready transition and startedAt record it, and an Event
        // would be one more API write per launch than the floor.
        conditions.push(if paused {
            condition(
                Cond::Ready,
                false,
                reasons::PAUSED,
                "the session is paused: access is cut, its pod and resources kept",
                generation,
                oc,
                now,
            )
        } else {
            condition(Cond::Ready, true, reasons::RUNNING, "", generation, oc, now)
        });
    }
    conditions.push(condition(
        Cond::Admitted,
        true,
        reasons::ADMITTED,
        "",
        generation,
        oc,
        now,
    ));
    PodStatus {
        phase: obs.phase,
        node: obs.node,
        started_at,
        conditions,
        quiet_for,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures;
    use crate::crd::v1alpha1::ExpiryRule;
    use crate::expiry::{Ledger, Window};

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const T0: &str = "2026-01-01T10:00:00Z";

    fn settings(
        keepalive_s: u64,
        limit_s: Option<u64>,
        action: KeepaliveExpirationAction,
    ) -> EffectiveSettings {
        // The defaults (a user of no group), with the three expiry settings of the row.
        let user: crate::crd::v1alpha1::User = serde_json::from_value(serde_json::json!({
            "apiVersion": "cubicle.dev/v1alpha1", "kind": "User",
            "metadata": {"name": "u", "namespace": "ns"}, "spec": {}
        }))
        .unwrap();
        let dir = crate::resolve::Directory {
            namespace: "ns".into(),
            ..Default::default()
        };
        EffectiveSettings {
            keepalive_expiration: Duration::from_secs(keepalive_s),
            session_time_limit: limit_s.map(Duration::from_secs),
            keepalive_expiration_action: action,
            ..crate::resolve::resolve_user(&dir, &user).settings
        }
    }

    fn ready_pod() -> CachedPod {
        let status = serde_json::json!({"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T09:59:59Z"}
        ]});
        fixtures::pod(Some("2026-01-01T09:59:58Z"), Some("n1"), status)
    }

    fn pending_pod(age_s: i64, problem: Option<&str>) -> CachedPod {
        let created = ts(T0) - jiff::SignedDuration::from_secs(age_s);
        let mut conditions = vec![serde_json::json!({"type": "Ready", "status": "False"})];
        if let Some(p) = problem {
            conditions.push(
                serde_json::json!({"type": "PodScheduled", "status": "False",
                "reason": "Unschedulable", "message": p}),
            );
        }
        let status = serde_json::json!({"phase": "Pending", "conditions": conditions});
        fixtures::pod(Some(&created.to_string()), None, status)
    }

    fn status(phase: Option<SessionPhase>, started: Option<&str>) -> SessionStatus {
        SessionStatus {
            phase,
            started_at: started.map(|s| MicroTime(ts(s))),
            ..SessionStatus::default()
        }
    }

    struct Case<'a> {
        old: SessionStatus,
        settings: EffectiveSettings,
        pod: Option<&'a CachedPod>,
        reported: Option<&'a str>,
        budget: Option<&'a Budget>,
        effective: DesiredState,
        resuming: bool,
        now: &'a str,
    }

    impl Case<'_> {
        fn run(&self) -> ExpiryDecision {
            expiry(&ExpiryInputs {
                old: &self.old,
                settings: &self.settings,
                reported_keepalive: self.reported.map(ts),
                created: ts("2026-01-01T09:59:50Z"),
                pod: self.pod,
                uid: "me",
                budget: self.budget,
                effective: self.effective,
                resuming: self.resuming,
                now: ts(self.now),
            })
        }
    }

    fn case<'a>(old: SessionStatus, settings: EffectiveSettings, now: &'a str) -> Case<'a> {
        Case {
            old,
            settings,
            pod: None,
            reported: None,
            budget: None,
            effective: DesiredState::Running,
            resuming: false,
            now,
        }
    }

    fn waiting(d: ExpiryDecision) -> ExpiryStatus {
        match d {
            ExpiryDecision::Waiting(s) => s,
            ExpiryDecision::Due(d) => panic!("due: {d:?}"),
        }
    }

    // Decision table, expiry rows.

    #[test]
    fn row_keepalive_counts_from_the_real_start_seen_at_once() {
        // The pod became ready at :59 (whole seconds); the reconcile sees it at 10:00:00.
        let pod = ready_pod();
        let mut c = case(
            status(Some(SessionPhase::Pending), None),
            settings(5, None, KeepaliveExpirationAction::Delete),
            T0,
        );
        c.pod = Some(&pod);
        let s = waiting(c.run());
        let d = s.deadline.unwrap();
        assert_eq!(
            d.at,
            ts("2026-01-01T10:00:05Z"),
            "the start (at most the next whole second after Ready) + 5 s"
        );
        assert_eq!(d.rule, ExpiryRule::Keepalive);
        assert_eq!(s.last_keepalive.unwrap().source, KeepaliveSource::Start);
        assert_eq!(s.requeue, Some(Duration::from_secs(5)));
        assert!(
            s.armable.is_some(),
            "the fast path enforces it at its instant"
        );
    }

    #[test]
    fn row_keepalive_due_is_acted_on_never_before() {
        let c = case(
            status(Some(SessionPhase::Running), Some(T0)),
            settings(5, None, KeepaliveExpirationAction::Delete),
            "2026-01-01T10:00:04.999Z",
        );
        assert!(
            matches!(c.run(), ExpiryDecision::Waiting(_)),
            "a millisecond early is early"
        );
        let c = case(
            status(Some(SessionPhase::Running), Some(T0)),
            settings(5, None, KeepaliveExpirationAction::Delete),
            "2026-01-01T10:00:05Z",
        );
        assert!(
            matches!(c.run(), ExpiryDecision::Due(d) if d.action == KeepaliveExpirationAction::Delete)
        );
    }

    #[test]
    fn row_a_reported_keepalive_moves_the_deadline() {
        let mut c = case(
            status(Some(SessionPhase::Running), Some(T0)),
            settings(5, None, KeepaliveExpirationAction::Delete),
            "2026-01-01T10:00:04Z",
        );
        c.reported = Some("2026-01-01T10:00:03Z");
        let s = waiting(c.run());
        assert_eq!(s.deadline.unwrap().at, ts("2026-01-01T10:00:08Z"));
        assert_eq!(
            s.last_keepalive.unwrap().source,
            KeepaliveSource::Annotation
        );
        // A keepalive from the future (a client clock ahead) counts as now.
        c.reported = Some("2026-01-01T11:00:00Z");
        assert_eq!(
            waiting(c.run()).deadline.unwrap().at,
            ts("2026-01-01T10:00:09Z")
        );
    }

    #[test]
    fn row_time_limit_counts_from_creation_and_overrides_keepalive() {
        let c = case(
            status(Some(SessionPhase::Running), Some(T0)),
            settings(5, Some(60), KeepaliveExpirationAction::Delete),
            "2026-01-01T10:00:30Z",
        );
        let d = waiting(c.run()).deadline.unwrap();
        assert_eq!(
            (d.at, d.rule),
            (ts("2026-01-01T10:00:50Z"), ExpiryRule::SessionTimeLimit)
        );
    }

    #[test]
    fn row_stop_and_pause_are_done_once_requested() {
        // Stop at the deadline: a session already stopped has nothing more to do.
        let mut c = case(
            status(Some(SessionPhase::Running), Some(T0)),
            settings(5, None, KeepaliveExpirationAction::Stop),
            "2026-01-01T10:01:00Z",
        );
        assert!(matches!(c.run(), ExpiryDecision::Due(_)));
        c.effective = DesiredState::Stopped;
        let s = waiting(c.run());
        assert!(s.deadline.is_some() && s.armable.is_none() && s.requeue.is_none());
        // Pause: done once paused (or stopped).
        let mut c = case(
            status(Some(SessionPhase::Paused), Some(T0)),
            settings(5, None, KeepaliveExpirationAction::Pause),
            "2026-01-01T10:01:00Z",
        );
        c.effective = DesiredState::Paused;
        assert!(matches!(c.run(), ExpiryDecision::Waiting(_)));
    }

    #[test]
    fn row_a_stopped_session_has_only_the_hard_limits() {
        let c = case(
            status(Some(SessionPhase::Stopped), Some(T0)),
            settings(5, None, KeepaliveExpirationAction::Delete),
            "2026-01-02T10:00:00Z",
        );
        let s = waiting(c.run());
        assert_eq!(
            s.deadline, None,
            "no keepalive for a session without a client"
        );
        let c = case(
            status(Some(SessionPhase::Stopped), Some(T0)),
            settings(5, Some(60), KeepaliveExpirationAction::Delete),
            "2026-01-02T10:00:00Z",
        );
        assert!(
            matches!(c.run(), ExpiryDecision::Due(d) if d.rule == ExpiryRule::SessionTimeLimit)
        );
    }

    #[test]
    fn row_resuming_restarts_the_keepalive_clock_and_is_never_expired_on_the_way() {
        let mut old = status(Some(SessionPhase::Stopped), Some(T0));
        old.last_keepalive = Some(Keepalive {
            time: MicroTime(ts(T0)),
            source: KeepaliveSource::Start,
        });
        let mut c = case(
            old,
            settings(5, None, KeepaliveExpirationAction::Delete),
            "2026-01-01T12:00:00Z",
        );
        c.resuming = true;
        let s = waiting(c.run());
        assert_eq!(s.last_keepalive.unwrap().time.0, ts("2026-01-01T12:00:00Z"));
        assert_eq!(s.deadline.unwrap().at, ts("2026-01-01T12:00:05Z"));
    }

    fn budget(limit_s: u64, closed_s: u64, window_end: &str) -> Budget {
        Budget {
            scope: crate::crd::v1alpha1::UsageLimitType::PerUser,
            group: "g".into(),
            interval: crate::crd::v1alpha1::UsageLimitInterval::Daily,
            timezone: "UTC".into(),
            window: Window {
                start: Some(ts("2026-01-01T00:00:00Z")),
                end: Some(ts(window_end)),
            },
            ledger: Ledger {
                window_start: Some(ts("2026-01-01T00:00:00Z")),
                closed_ms: closed_s * 1000,
                closed_sessions: vec![],
            },
            open: vec![],
            limit_ms: limit_s * 1000,
            stale_window: false,
        }
    }

    #[test]
    fn row_the_usage_budget_binds_from_this_sessions_start_and_is_never_armed() {
        let b = budget(100, 40, "2026-01-02T00:00:00Z");
        let mut c = case(
            status(Some(SessionPhase::Running), Some(T0)),
            settings(3600, None, KeepaliveExpirationAction::Delete),
            "2026-01-01T10:00:10Z",
        );
        c.budget = Some(&b);
        let s = waiting(c.run());
        let d = s.deadline.clone().unwrap();
        // 60 s left from the start at 10:00:00 (the cache does not list this session yet).
        assert_eq!(
            (d.at, d.rule),
            (ts("2026-01-01T10:01:00Z"), ExpiryRule::UsageLimit)
        );
        assert_eq!(
            s.usage_remaining_seconds,
            Some(60),
            "the budget as the cache shows it"
        );
        assert!(
            s.armable.is_none(),
            "a usage deadline moves with other sessions"
        );
        assert_eq!(s.requeue, Some(Duration::from_secs(50)));
    }

    #[test]
    fn row_a_new_usage_window_is_looked_at_when_it_starts() {
        let b = budget(100_000, 0, "2026-01-01T10:00:30Z");
        let mut c = case(
            status(Some(SessionPhase::Running), Some(T0)),
            settings(3600, None, KeepaliveExpirationAction::Delete),
            "2026-01-01T10:00:10Z",
        );
        c.budget = Some(&b);
        assert_eq!(waiting(c.run()).requeue, Some(Duration::from_secs(20)));
    }

    // Decision table, pod rows.

    fn now() -> Time {
        Time(ts(T0))
    }

    fn ready_of(c: &[Condition]) -> (&str, &str) {
        let r = c.iter().find(|c| c.type_ == "Ready").unwrap();
        (r.status.as_str(), r.reason.as_str())
    }

    #[test]
    fn row_run_a_ready_pod_is_running_from_its_ready_time() {
        let p = pod_status(
            &ready_pod(),
            false,
            &SessionStatus::default(),
            Some(1),
            false,
            &now(),
        );
        assert_eq!(p.phase, SessionPhase::Running);
        assert_eq!(p.node.as_deref(), Some("n1"));
        assert_eq!(
            p.started_at.unwrap().0,
            T0.parse::<Timestamp>().unwrap(),
            "min(now, Ready + 1 s)"
        );
        assert_eq!(ready_of(&p.conditions), ("True", "Running"));
        assert!(p.quiet_for.is_none(), "written at once");
    }

    #[test]
    fn row_pause_a_paused_pod_is_not_ready() {
        let p = pod_status(
            &ready_pod(),
            true,
            &SessionStatus::default(),
            Some(1),
            false,
            &now(),
        );
        assert_eq!(p.phase, SessionPhase::Paused);
        assert_eq!(ready_of(&p.conditions), ("False", "Paused"));
    }

    #[test]
    fn row_a_starting_pod_is_quiet_until_held_up_or_slow() {
        let p = pod_status(
            &pending_pod(1, None),
            false,
            &SessionStatus::default(),
            Some(1),
            false,
            &now(),
        );
        assert_eq!(p.phase, SessionPhase::Pending);
        assert_eq!(p.quiet_for, Some(Duration::from_secs(299)));
        // Held up by the scheduler: quiet for 5 s, then reported (Pending, the scheduler's reason).
        let p = pod_status(
            &pending_pod(2, Some("0/3 nodes are available")),
            false,
            &SessionStatus::default(),
            Some(1),
            false,
            &now(),
        );
        assert_eq!(p.quiet_for, Some(Duration::from_secs(3)));
        let p = pod_status(
            &pending_pod(6, Some("0/3 nodes are available")),
            false,
            &SessionStatus::default(),
            Some(1),
            false,
            &now(),
        );
        assert_eq!(p.quiet_for, None);
        assert_eq!(
            p.phase,
            SessionPhase::Pending,
            "waiting on the scheduler stays Pending"
        );
        let r = p.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(r.reason, "PodPending");
        assert!(
            r.message.contains("0/3 nodes are available"),
            "{}",
            r.message
        );
        // A refused state change is worth a write even while starting.
        let p = pod_status(
            &pending_pod(1, None),
            false,
            &SessionStatus::default(),
            Some(1),
            true,
            &now(),
        );
        assert_eq!(p.quiet_for, None);
    }

    #[test]
    fn row_a_failed_pod_fails_the_session_with_its_message() {
        let pod: CachedPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s"},
            "status": {"phase": "Failed", "message": "evicted"}
        }))
        .unwrap();
        let p = pod_status(
            &pod,
            false,
            &SessionStatus::default(),
            Some(1),
            false,
            &now(),
        );
        assert_eq!(p.phase, SessionPhase::Failed);
        assert_eq!(ready_of(&p.conditions), ("False", "PodFailed"));
    }

    #[test]
    fn row_conditions_no_longer_true_are_dropped() {
        let c =
            |t: Cond, status: &str| condition(t, status == "True", "R", "", Some(1), &[], &now());
        let old = vec![
            c(Cond::StateChange, "False"),
            c(Cond::Resumed, "False"),
            c(Cond::Admitted, "False"),
        ];
        // Running again, nothing refused: the three refusals go.
        let kept = merge_conditions(
            &old,
            vec![c(Cond::Ready, "True")],
            false,
            DesiredState::Running,
            Some(SessionPhase::Running),
        );
        assert_eq!(kept.len(), 1);
        // Still stopped with the resume refused, a state change refused, still refused: kept.
        let kept = merge_conditions(
            &old,
            vec![],
            true,
            DesiredState::Stopped,
            Some(SessionPhase::Refused),
        );
        assert_eq!(kept.len(), 3);
        // A condition recomputed replaces the old one.
        let kept = merge_conditions(
            &old,
            vec![c(Cond::Admitted, "True")],
            true,
            DesiredState::Stopped,
            Some(SessionPhase::Running),
        );
        assert_eq!(kept.iter().filter(|c| c.type_ == "Admitted").count(), 1);
        assert_eq!(
            kept.iter().find(|c| c.type_ == "Admitted").unwrap().status,
            "True"
        );
    }

    #[test]
    fn row_a_transition_time_is_kept_while_the_status_holds() {
        let earlier = Time(ts("2026-01-01T09:00:00Z"));
        let old = vec![condition(
            Cond::Ready,
            true,
            "Running",
            "",
            Some(1),
            &[],
            &earlier,
        )];
        assert_eq!(
            condition(Cond::Ready, true, "Running", "", Some(2), &old, &now()).last_transition_time,
            earlier
        );
        assert_eq!(
            condition(Cond::Ready, false, "Stopped", "", Some(2), &old, &now())
                .last_transition_time,
            now()
        );
    }

    // Decision table, state change rows.

    #[test]
    fn row_state_changes_need_their_permissions_and_a_refusal_keeps_the_state() {
        use DesiredState::*;
        let running = Some(SessionPhase::Running);
        // Allowed: stop, pause, run (resume).
        assert_eq!(state(Stopped, true, false, false, running), (Stopped, None));
        assert_eq!(state(Paused, false, true, false, running), (Paused, None));
        assert_eq!(
            state(Running, false, false, false, Some(SessionPhase::Stopped)),
            (Running, None)
        );
        // Refused: the session stays as it was, with the reason.
        let (e, r) = state(Stopped, false, true, false, running);
        assert_eq!((e, r.unwrap().reason), (Running, reasons::STOP_NOT_ALLOWED));
        let (e, r) = state(Paused, true, false, false, running);
        assert_eq!(
            (e, r.unwrap().reason),
            (Running, reasons::PAUSE_NOT_ALLOWED)
        );
        let (e, _) = state(Stopped, false, false, false, Some(SessionPhase::Paused));
        assert_eq!(e, Paused, "a paused session refused a stop stays paused");
        // The expiry needs no permission.
        assert_eq!(state(Stopped, false, false, true, running), (Stopped, None));
        assert_eq!(state(Paused, false, false, true, running), (Paused, None));
    }

    // Decision table, profile rows.

    fn profile_cfg(shared: bool) -> PersistentProfile {
        serde_json::from_value(if shared {
            serde_json::json!({"mountPath": "/home/kasm-user",
                "sharedVolume": {"claimName": "homes", "subPath": "users/{username}"}})
        } else {
            serde_json::json!({"mountPath": "/home/kasm-user",
                "claimTemplate": {"name": "profile-{username}", "size": "1Gi"}})
        })
        .unwrap()
    }

    fn plan_of(
        cfg: &PersistentProfile,
        mode: ProfileMode,
        old: Option<&ProfileStatus>,
        active: Option<(&str, Option<&str>)>,
    ) -> ProfilePlan {
        profile(&ProfileInputs {
            cfg: Some(cfg),
            mode,
            username: "bob",
            user_id: "u-1",
            uid: "me",
            old,
            active,
            next_name: "profile-bob-r1767261600",
            now_second: 1_767_261_600,
        })
    }

    #[test]
    fn row_profile_disabled_mounts_nothing() {
        let p = plan_of(
            &profile_cfg(false),
            ProfileMode::Disabled,
            None,
            Some(("profile-bob", None)),
        );
        assert_eq!(p.status.outcome, Some(ProfileOutcome::Disabled));
        assert!(p.claim.is_none() && p.mount.is_none() && p.zone_of.is_none());
    }

    #[test]
    fn row_profile_enabled_creates_the_claim_once_then_mounts_it_in_its_zone() {
        let cfg = profile_cfg(false);
        let first = plan_of(&cfg, ProfileMode::Enabled, None, None);
        assert_eq!(
            first.claim.as_ref().map(|c| c.name.as_str()),
            Some("profile-bob")
        );
        assert_eq!(first.status.outcome, Some(ProfileOutcome::Mounted));
        assert!(first.zone_of.is_none(), "a new claim is not bound yet");
        let later = plan_of(
            &cfg,
            ProfileMode::Enabled,
            None,
            Some(("profile-bob", None)),
        );
        assert!(later.claim.is_none(), "nothing to create");
        assert_eq!(
            later.zone_of.as_deref(),
            Some("profile-bob"),
            "pinned to its volume's zone"
        );
        assert_eq!(
            later.mount,
            Some(ProfileMount::Claim {
                claim: "profile-bob".into(),
                mount_path: "/home/kasm-user".into()
            })
        );
    }

    #[test]
    fn row_profile_reset_archives_the_old_claim_and_creates_a_fresh_one_once() {
        let cfg = profile_cfg(false);
        let p = plan_of(&cfg, ProfileMode::Reset, None, Some(("profile-bob", None)));
        let c = p.claim.clone().unwrap();
        assert_eq!(
            (c.name.as_str(), c.archive.as_deref(), c.reset_by.as_deref()),
            ("profile-bob-r1767261600", Some("profile-bob"), Some("me"))
        );
        assert_eq!(p.status.outcome, Some(ProfileOutcome::ResetArchived));
        assert_eq!(
            p.status.archived_as.as_deref(),
            Some("profile-bob"),
            "archived, never deleted"
        );
        // No claim yet: a fresh one, nothing archived.
        let p = plan_of(&cfg, ProfileMode::Reset, None, None);
        assert_eq!(p.status.outcome, Some(ProfileOutcome::ResetFresh));
        assert_eq!(p.claim.unwrap().archive, None);
        // The reset done (the active claim is the one this session created): mounted again, not
        // reset twice (a resume, or a pod re-created after an eviction).
        let done = ProfileStatus {
            outcome: Some(ProfileOutcome::ResetArchived),
            archived_as: Some("profile-bob".into()),
            ..Default::default()
        };
        let p = plan_of(
            &cfg,
            ProfileMode::Reset,
            Some(&done),
            Some(("profile-bob-r1767261600", Some("me"))),
        );
        assert!(p.claim.is_none());
        assert_eq!(p.status.claim.as_deref(), Some("profile-bob-r1767261600"));
        // Its status lost meanwhile (a crash before the write): the claim's mark still tells.
        let p = plan_of(
            &cfg,
            ProfileMode::Reset,
            None,
            Some(("profile-bob-r1767261600", Some("me"))),
        );
        assert!(p.claim.is_none(), "never reset twice");
    }

    #[test]
    fn row_profile_shared_volume_mounts_a_sub_path_and_reset_renames_it() {
        let cfg = profile_cfg(true);
        let p = plan_of(&cfg, ProfileMode::Enabled, None, None);
        assert_eq!(p.status.sub_path.as_deref(), Some("users/bob"));
        assert_eq!(p.zone_of.as_deref(), Some("homes"));
        assert!(p.claim.is_none(), "the shared claim is the administrator's");
        let p = plan_of(&cfg, ProfileMode::Reset, None, None);
        assert_eq!(p.status.outcome, Some(ProfileOutcome::ResetArchived));
        assert_eq!(
            p.status.archived_as.as_deref(),
            Some("users/bob.archived-1767261600")
        );
        assert!(matches!(
            p.mount,
            Some(ProfileMount::SubPath {
                archive_to: Some(_),
                ..
            })
        ));
    }
}
