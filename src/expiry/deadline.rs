//! Keepalives and the binding deadline of a session.

use std::time::Duration;

use jiff::Timestamp;

use crate::crd::v1alpha1::{ExpiryRule, KeepaliveExpirationAction};

/// The keepalive to persist: never moves backwards, never later than now. `reported` is what the
/// client wrote (annotation), `previous` what is persisted; None when neither exists.
///
/// A reported time later than `now` (a client clock ahead, or a client trying to extend its
/// session) is clamped to `now`; a reported time earlier than `previous` is ignored. A
/// `previous` later than `now` can only come from a controller whose clock was ahead of this
/// one's; it is kept as is rather than moved back, so that a restart never changes a deadline
/// (the keepalive never moves backwards, whichever clock wrote it).
pub fn next_keepalive(
    previous: Option<Timestamp>,
    reported: Option<Timestamp>,
    now: Timestamp,
) -> Option<Timestamp> {
    let reported = reported.map(|r| r.min(now));
    match (previous, reported) {
        (Some(p), Some(r)) => Some(p.max(r)),
        (p, r) => p.or(r),
    }
}

/// The instants of a session that its deadline depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionTimes {
    /// When the Session was created (`metadata.creationTimestamp`).
    pub created: Timestamp,
    /// When its pod first ran (`status.startedAt`), if it has.
    pub started: Option<Timestamp>,
    /// The persisted keepalive (see [`next_keepalive`]).
    pub last_keepalive: Option<Timestamp>,
}

/// The effective lifetime settings of a session's user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// `keepaliveExpiration`: how long a session lives without a keepalive.
    pub keepalive_expiration: Duration,
    /// `sessionTimeLimit`: a hard lifetime from creation; when set, keepalive expiration is not
    /// used.
    pub session_time_limit: Option<Duration>,
    /// `keepaliveExpirationAction`: what happens at the keepalive or time-limit deadline.
    pub action: KeepaliveExpirationAction,
}

/// When a session expires, under which rule, and what happens then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    /// The exact instant of expiry (`status.expiresAt`). Enforced at this instant, never before.
    pub at: Timestamp,
    /// The rule that binds (`status.expiryRule`).
    pub rule: ExpiryRule,
    /// What happens at `at` (`status.expiryAction`).
    pub action: KeepaliveExpirationAction,
}

/// The binding deadline of a session.
///
/// - `sessionTimeLimit` set: `created + sessionTimeLimit`, rule `SessionTimeLimit`; keepalives
///   neither extend nor shorten it (keepalive expiration is not used at all, as in Kasm).
/// - otherwise: the last keepalive, else the start, else the creation, plus
///   `keepaliveExpiration`, rule `Keepalive`.
///
///   Both use the policy's action (`keepaliveExpirationAction`): like Kasm, which applies it to
///   whatever expiration date the session has, the time limit included.
/// - `usage_deadline` (from [`exhausted_at`](crate::expiry::exhausted_at)) wins when strictly
///   earlier, with rule `UsageLimit` and action `Delete` whatever the policy says: stopped and
///   paused sessions keep consuming usage (the seed charges for the full duration, paused and
///   stopped time included), so stopping or pausing would not stop the meter; only ending the
///   session does. On a tie the time-limit/keepalive rule wins (and its action applies).
///
/// Sums past the end of jiff's time range saturate to [`Timestamp::MAX`] (effectively never).
pub fn deadline(
    times: &SessionTimes,
    policy: &Policy,
    usage_deadline: Option<Timestamp>,
) -> Deadline {
    let (base, limit, rule) = match policy.session_time_limit {
        Some(limit) => (times.created, limit, ExpiryRule::SessionTimeLimit),
        None => (
            times
                .last_keepalive
                .or(times.started)
                .unwrap_or(times.created),
            policy.keepalive_expiration,
            ExpiryRule::Keepalive,
        ),
    };
    let lifetime = Deadline {
        at: add(base, limit),
        rule,
        action: policy.action,
    };
    match usage_deadline {
        Some(at) if at < lifetime.at => Deadline {
            at,
            rule: ExpiryRule::UsageLimit,
            action: KeepaliveExpirationAction::Delete,
        },
        _ => lifetime,
    }
}

/// Never early: due iff `now >= d.at`.
pub fn is_due(d: &Deadline, now: Timestamp) -> bool {
    now >= d.at
}

/// `t + d`, saturating at the end of jiff's range.
fn add(t: Timestamp, d: Duration) -> Timestamp {
    // Adding an unsigned duration to a timestamp cannot fail when saturating.
    t.saturating_add(d).unwrap_or(Timestamp::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use KeepaliveExpirationAction::{Delete, Pause, Stop};

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    const MIN: Duration = Duration::from_secs(60);

    fn times(created: &str, started: Option<&str>, keepalive: Option<&str>) -> SessionTimes {
        SessionTimes {
            created: ts(created),
            started: started.map(ts),
            last_keepalive: keepalive.map(ts),
        }
    }

    fn policy(
        keepalive: Duration,
        limit: Option<Duration>,
        action: KeepaliveExpirationAction,
    ) -> Policy {
        Policy {
            keepalive_expiration: keepalive,
            session_time_limit: limit,
            action,
        }
    }

    #[test]
    fn keepalive_none_when_nothing_known() {
        assert_eq!(next_keepalive(None, None, ts("2025-01-01T00:00:00Z")), None);
    }

    #[test]
    fn keepalive_first_report_is_taken() {
        let now = ts("2025-01-01T00:10:00Z");
        let r = ts("2025-01-01T00:09:00Z");
        assert_eq!(next_keepalive(None, Some(r), now), Some(r));
    }

    #[test]
    fn keepalive_never_backwards() {
        let now = ts("2025-01-01T00:10:00Z");
        let p = ts("2025-01-01T00:05:00Z");
        let older = ts("2025-01-01T00:04:59.999Z");
        assert_eq!(next_keepalive(Some(p), Some(older), now), Some(p));
        assert_eq!(next_keepalive(Some(p), None, now), Some(p));
        let newer = ts("2025-01-01T00:05:00.001Z");
        assert_eq!(next_keepalive(Some(p), Some(newer), now), Some(newer));
    }

    #[test]
    fn keepalive_clamped_to_now() {
        let now = ts("2025-01-01T00:10:00Z");
        let future = ts("2025-01-01T05:00:00Z");
        assert_eq!(next_keepalive(None, Some(future), now), Some(now));
        let p = ts("2025-01-01T00:05:00Z");
        assert_eq!(next_keepalive(Some(p), Some(future), now), Some(now));
        // Exactly now is allowed.
        assert_eq!(next_keepalive(Some(p), Some(now), now), Some(now));
    }

    #[test]
    fn keepalive_persisted_by_a_faster_clock_is_not_moved_back() {
        let now = ts("2025-01-01T00:10:00Z");
        let p = ts("2025-01-01T00:10:02Z");
        assert_eq!(next_keepalive(Some(p), Some(now), now), Some(p));
    }

    #[test]
    fn keepalive_rule_from_last_keepalive() {
        let t = times(
            "2025-01-01T00:00:00Z",
            Some("2025-01-01T00:00:30Z"),
            Some("2025-01-01T00:20:00Z"),
        );
        let d = deadline(&t, &policy(60 * MIN, None, Stop), None);
        assert_eq!(d.at, ts("2025-01-01T01:20:00Z"));
        assert_eq!(d.rule, ExpiryRule::Keepalive);
        assert_eq!(d.action, Stop);
    }

    #[test]
    fn keepalive_rule_falls_back_to_start_then_creation() {
        let p = policy(10 * MIN, None, Pause);
        let started = times("2025-01-01T00:00:00Z", Some("2025-01-01T00:00:30Z"), None);
        assert_eq!(deadline(&started, &p, None).at, ts("2025-01-01T00:10:30Z"));
        let created = times("2025-01-01T00:00:00Z", None, None);
        let d = deadline(&created, &p, None);
        assert_eq!(d.at, ts("2025-01-01T00:10:00Z"));
        assert_eq!((d.rule, d.action), (ExpiryRule::Keepalive, Pause));
    }

    #[test]
    fn due_exactly_at_deadline_not_one_ms_before() {
        let t = times("2025-01-01T00:00:00Z", None, Some("2025-01-01T00:00:00Z"));
        let d = deadline(&t, &policy(ms(5_000), None, Delete), None);
        assert_eq!(d.at, ts("2025-01-01T00:00:05Z"));
        assert!(!is_due(&d, ts("2025-01-01T00:00:04.999Z")));
        assert!(!is_due(&d, ts("2025-01-01T00:00:04.999999999Z")));
        assert!(is_due(&d, ts("2025-01-01T00:00:05Z")));
        assert!(is_due(&d, ts("2025-01-01T00:00:05.001Z")));
    }

    #[test]
    fn time_limit_overrides_keepalive() {
        // A keepalive after the time limit would have kept the session alive under the
        // keepalive rule; the time limit ignores it.
        let t = times(
            "2025-01-01T00:00:00Z",
            Some("2025-01-01T00:01:00Z"),
            Some("2025-01-01T00:59:00Z"),
        );
        let d = deadline(&t, &policy(60 * MIN, Some(30 * MIN), Pause), None);
        assert_eq!(d.at, ts("2025-01-01T00:30:00Z"));
        assert_eq!((d.rule, d.action), (ExpiryRule::SessionTimeLimit, Pause));
        // Even when the time limit is later than the keepalive deadline would be.
        let t = times("2025-01-01T00:00:00Z", None, None);
        let d = deadline(&t, &policy(MIN, Some(120 * MIN), Delete), None);
        assert_eq!(d.at, ts("2025-01-01T02:00:00Z"));
        assert_eq!(d.rule, ExpiryRule::SessionTimeLimit);
        assert!(!is_due(&d, ts("2025-01-01T01:59:59.999Z")));
        assert!(is_due(&d, ts("2025-01-01T02:00:00Z")));
    }

    #[test]
    fn time_limit_counts_from_creation_not_start() {
        let t = times("2025-01-01T00:00:00Z", Some("2025-01-01T00:05:00Z"), None);
        let d = deadline(&t, &policy(MIN, Some(10 * MIN), Delete), None);
        assert_eq!(d.at, ts("2025-01-01T00:10:00Z"));
    }

    #[test]
    fn earlier_usage_deadline_binds_and_deletes() {
        let t = times("2025-01-01T00:00:00Z", None, Some("2025-01-01T00:00:00Z"));
        let u = ts("2025-01-01T00:20:00Z");
        let d = deadline(&t, &policy(60 * MIN, None, Pause), Some(u));
        assert_eq!(
            d,
            Deadline {
                at: u,
                rule: ExpiryRule::UsageLimit,
                action: Delete
            }
        );
        let d = deadline(&t, &policy(60 * MIN, Some(15 * MIN), Stop), Some(u));
        assert_eq!(d.rule, ExpiryRule::SessionTimeLimit);
        assert_eq!(d.at, ts("2025-01-01T00:15:00Z"));
    }

    #[test]
    fn later_usage_deadline_does_not_bind() {
        let t = times("2025-01-01T00:00:00Z", None, None);
        let d = deadline(
            &t,
            &policy(10 * MIN, None, Stop),
            Some(ts("2025-01-01T00:10:00.001Z")),
        );
        assert_eq!(
            (d.at, d.rule, d.action),
            (ts("2025-01-01T00:10:00Z"), ExpiryRule::Keepalive, Stop)
        );
    }

    #[test]
    fn tie_goes_to_the_lifetime_rule() {
        let t = times("2025-01-01T00:00:00Z", None, None);
        let d = deadline(
            &t,
            &policy(10 * MIN, None, Stop),
            Some(ts("2025-01-01T00:10:00Z")),
        );
        assert_eq!((d.rule, d.action), (ExpiryRule::Keepalive, Stop));
        let d = deadline(
            &t,
            &policy(MIN, Some(10 * MIN), Pause),
            Some(ts("2025-01-01T00:10:00Z")),
        );
        assert_eq!((d.rule, d.action), (ExpiryRule::SessionTimeLimit, Pause));
    }

    #[test]
    fn past_usage_deadline_is_due_immediately() {
        let t = times("2025-01-01T00:00:00Z", None, None);
        let past = ts("2024-12-31T23:00:00Z");
        let d = deadline(&t, &policy(10 * MIN, None, Stop), Some(past));
        assert!(is_due(&d, ts("2025-01-01T00:00:00Z")));
        assert_eq!(d.at, past);
    }

    #[test]
    fn huge_durations_saturate() {
        let t = times("2025-01-01T00:00:00Z", None, None);
        let d = deadline(&t, &policy(Duration::MAX, None, Delete), None);
        assert_eq!(d.at, Timestamp::MAX);
        assert!(!is_due(&d, ts("9999-01-01T00:00:00Z")));
    }

    fn arb_ts() -> impl Strategy<Value = Timestamp> {
        // 1970 .. 2100, millisecond precision.
        (0i64..4_102_444_800_000).prop_map(|m| Timestamp::from_millisecond(m).unwrap())
    }

    fn arb_action() -> impl Strategy<Value = KeepaliveExpirationAction> {
        prop_oneof![Just(Delete), Just(Stop), Just(Pause)]
    }

    proptest! {
        #[test]
        fn prop_keepalive_monotonic_and_bounded(
            prev in proptest::option::of(arb_ts()),
            rep in proptest::option::of(arb_ts()),
            now in arb_ts(),
        ) {
            let k = next_keepalive(prev, rep, now);
            prop_assert_eq!(k.is_none(), prev.is_none() && rep.is_none());
            if let Some(k) = k {
                if let Some(p) = prev {
                    prop_assert!(k >= p, "moved backwards");
                }
                // Never later than now, except to keep an already persisted value.
                prop_assert!(k <= now || Some(k) == prev);
                // Only ever one of the inputs or now.
                prop_assert!(Some(k) == prev || Some(k) == rep || k == now);
            }
        }

        #[test]
        fn prop_deadline_never_early(
            created in arb_ts(),
            started_off in proptest::option::of(0u64..86_400_000),
            keepalive_off in proptest::option::of(0u64..86_400_000),
            keepalive_ms in 0u64..86_400_000,
            limit_ms in proptest::option::of(0u64..86_400_000),
            usage in proptest::option::of(arb_ts()),
            action in arb_action(),
        ) {
            let started = started_off.map(|o| add(created, ms(o)));
            let last_keepalive = keepalive_off.map(|o| add(created, ms(o)));
            let t = SessionTimes { created, started, last_keepalive };
            let p = policy(ms(keepalive_ms), limit_ms.map(ms), action);
            let d = deadline(&t, &p, usage);
            // What each rule allows, computed independently.
            let lifetime = match limit_ms {
                Some(l) => add(created, ms(l)),
                None => add(last_keepalive.or(started).unwrap_or(created), ms(keepalive_ms)),
            };
            prop_assert!(d.at <= lifetime);
            match usage {
                Some(u) if u < lifetime => {
                    prop_assert_eq!(d.at, u);
                    prop_assert_eq!(d.rule, ExpiryRule::UsageLimit);
                    prop_assert_eq!(d.action, Delete);
                }
                _ => {
                    prop_assert_eq!(d.at, lifetime);
                    prop_assert_eq!(d.action, action);
                    prop_assert_eq!(
                        d.rule,
                        if limit_ms.is_some() { ExpiryRule::SessionTimeLimit } else { ExpiryRule::Keepalive }
                    );
                }
            }
            // Never early, and due from the deadline on.
            let before = d.at.checked_sub(jiff::SignedDuration::from_nanos(1)).unwrap();
            prop_assert!(!is_due(&d, before));
            prop_assert!(is_due(&d, d.at));
        }
    }
}
