//! Usage windows and the usage ledger, in integer milliseconds.
//!
//! All running time counts, paused and stopped time included (seed 002: users are charged for
//! the full duration of a session). A session is therefore "open" from its start for as long as
//! it exists, and is "closed" into the [`Ledger`] exactly once, when it ends (before its
//! object disappears). The used time in a window is the closed milliseconds plus each open
//! session's overlap with `[window.start, now)`.
//!
//! Instants are floored to the millisecond (towards the past) before any arithmetic, so every
//! figure is an exact integer and the same inputs always give the same result.

use std::collections::HashSet;

use jiff::Timestamp;
use jiff::civil::{Date, Time};
use jiff::tz::TimeZone;
use serde::{Deserialize, Serialize};

use crate::crd::v1alpha1::UsageLimitInterval;

/// A usage window: `[start, end)`. `None` is unbounded (both are `None` for `total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    /// First instant of the window (inclusive).
    pub start: Option<Timestamp>,
    /// First instant of the next window (exclusive).
    pub end: Option<Timestamp>,
}

impl Window {
    /// The unbounded window of the `total` interval.
    pub const TOTAL: Window = Window {
        start: None,
        end: None,
    };

    /// True when `t` is in `[start, end)`.
    pub fn contains(&self, t: Timestamp) -> bool {
        self.start.is_none_or(|s| s <= t) && self.end.is_none_or(|e| t < e)
    }

    /// The window's bounds in milliseconds, unbounded sides as `i64::MIN` / `i64::MAX`.
    fn bounds(&self) -> (i64, i64) {
        (
            self.start.map_or(i64::MIN, millis),
            self.end.map_or(i64::MAX, millis),
        )
    }
}

/// The window of `interval` that contains `now`, with boundaries at local midnight in `tz`.
///
/// - `daily`: local midnight to the next local midnight. Days are 23 or 25 hours long on DST
///   transitions; when midnight itself does not exist (a transition at 00:00), the day starts at
///   its first existing instant, and when it occurs twice, at the first of them.
/// - `weekly`: ISO weeks, Monday 00:00 to the next Monday 00:00.
/// - `monthly`: the 1st 00:00 to the next month's 1st 00:00 (28 to 31 days; leap years
///   honoured).
/// - `total`: unbounded ([`Window::TOTAL`]); it never rolls.
///
/// Always `start <= now < end`. A boundary beyond jiff's range (year ±9999) is `None`.
pub fn window(interval: UsageLimitInterval, now: Timestamp, tz: &TimeZone) -> Window {
    let step: fn(Date, i32) -> Option<Date> = match interval {
        UsageLimitInterval::Total => return Window::TOTAL,
        UsageLimitInterval::Daily => |d, n| d.checked_add(jiff::Span::new().days(n)).ok(),
        UsageLimitInterval::Weekly => |d, n| d.checked_add(jiff::Span::new().weeks(n)).ok(),
        UsageLimitInterval::Monthly => |d, n| d.checked_add(jiff::Span::new().months(n)).ok(),
    };
    let today = tz.to_datetime(now).date();
    let first = match interval {
        UsageLimitInterval::Weekly => {
            let back = i64::from(today.weekday().to_monday_zero_offset());
            today.checked_sub(jiff::Span::new().days(back)).ok()
        }
        UsageLimitInterval::Monthly => Some(today.first_of_month()),
        _ => Some(today),
    };
    let Some(mut first) = first else {
        return Window {
            start: None,
            end: local_midnight(step(today, 1), tz),
        };
    };
    // The local calendar normally gives `start <= now < end` at once; the loops only matter in
    // zones whose clocks jump back across midnight, where the local date of `now` can belong to
    // a day whose midnight is later than `now`. They take at most a step or two.
    for _ in 0..4 {
        let start = local_midnight(Some(first), tz);
        if start.is_some_and(|s| s > now) {
            match step(first, -1) {
                Some(prev) => first = prev,
                None => break,
            }
            continue;
        }
        let end = local_midnight(step(first, 1), tz);
        if end.is_some_and(|e| e <= now) {
            match step(first, 1) {
                Some(next) => first = next,
                None => break,
            }
            continue;
        }
        return Window { start, end };
    }
    Window {
        start: local_midnight(Some(first), tz).filter(|s| *s <= now),
        end: local_midnight(step(first, 1), tz).filter(|e| *e > now),
    }
}

/// The first instant of local day `date` in `tz` (midnight, or the end of a gap over it).
fn local_midnight(date: Option<Date>, tz: &TimeZone) -> Option<Timestamp> {
    let dt = date?.to_datetime(Time::midnight());
    tz.to_ambiguous_timestamp(dt).compatible().ok()
}

/// The persisted usage of one budget in one window.
///
/// `closed_ms` is the time of sessions that have ended ("closed") in the window, and
/// `closed_sessions` the uids of those sessions, so that closing the same session again (a retry
/// after a crash between persisting the ledger and removing the session's finalizer) adds
/// nothing, and an open session already closed is not counted twice.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ledger {
    /// Start of the window this ledger belongs to (`None` for `total`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_start: Option<Timestamp>,
    /// Milliseconds of closed sessions in the window.
    #[serde(default)]
    pub closed_ms: u64,
    /// Uids of the sessions closed into the window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub closed_sessions: Vec<String>,
}

/// Rolls the ledger into `w`: unchanged if it already belongs to `w` (same start), otherwise a
/// new, empty ledger for `w` (0 closed ms, no closed sessions). The previous window's figures
/// are dropped: a new window resets the budget.
///
/// The window is recognised by its start alone, so the caller must compute `w` from a clock that
/// does not go back across a window boundary (a clock going back to the previous window would
/// reset the ledger).
pub fn roll(ledger: &Ledger, w: &Window) -> Ledger {
    if ledger.window_start == w.start {
        ledger.clone()
    } else {
        Ledger {
            window_start: w.start,
            ..Ledger::default()
        }
    }
}

/// Closes one session's segment `[start, end)` into the ledger (rolled into `w` first): adds its
/// overlap with the window and records `uid`. A no-op when `uid` is already closed into the
/// window. The caller passes the session's end as `end` (its deletion, at the latest `now`).
pub fn close(ledger: &Ledger, w: &Window, uid: &str, start: Timestamp, end: Timestamp) -> Ledger {
    let mut next = roll(ledger, w);
    if next.closed_sessions.iter().any(|u| u == uid) {
        return next;
    }
    let (lo, hi) = w.bounds();
    next.closed_ms = next
        .closed_ms
        .saturating_add(overlap(millis(start), millis(end), lo, hi));
    next.closed_sessions.push(uid.to_owned());
    next
}

/// Drops from the ledger the uids of closed sessions that no longer exist (`exists(uid)` false),
/// keeping `closed_ms`. Bounds the list for long windows (`total`).
///
/// Safe once a session's object is gone for good: it can be neither closed again nor listed as
/// open. Call it with the same view of the sessions that is passed as `open`, so that a session
/// still seen (a stale cache) keeps its uid and is not counted as open again.
pub fn prune(ledger: &Ledger, exists: impl Fn(&str) -> bool) -> Ledger {
    Ledger {
        window_start: ledger.window_start,
        closed_ms: ledger.closed_ms,
        closed_sessions: ledger
            .closed_sessions
            .iter()
            .filter(|u| exists(u))
            .cloned()
            .collect(),
    }
}

/// An open (still existing) session: uid and start. Sessions whose uid is already closed into
/// the ledger are ignored, and a uid listed twice counts once (its first entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    /// The Session's `metadata.uid`.
    pub uid: String,
    /// When it started consuming usage.
    pub start: Timestamp,
}

/// Used milliseconds in the window at `now`: closed + each open segment's overlap with
/// `[window.start, now)`. A ledger of another window contributes nothing (it would be rolled).
pub fn used_ms(ledger: &Ledger, w: &Window, open: &[Open], now: Timestamp) -> u64 {
    let meter = Meter::new(ledger, w, open);
    meter.used_at(millis(now))
}

/// When the budget runs out if the open sessions keep running (`k` open sessions consume `k` ms
/// per ms), exact to the millisecond: at the returned instant used >= limit, one millisecond
/// earlier used < limit (unless the closed time alone already exceeds the limit, when it is the
/// first open session's start in the window).
///
/// `None` if it does not run out before the window ends (the next window resets it; running out
/// exactly at the end counts as not running out) or nothing is open. Already exhausted at `now`:
/// the exact past instant when it ran out (stable across calls), never later than `now`.
pub fn exhausted_at(
    limit_ms: u64,
    ledger: &Ledger,
    w: &Window,
    open: &[Open],
    now: Timestamp,
) -> Option<Timestamp> {
    let meter = Meter::new(ledger, w, open);
    let now_ms = millis(now);
    let t = meter.reaches(limit_ms)?;
    let t = if meter.used_at(now_ms) >= limit_ms {
        // Already exhausted. `t <= now` unless every open session starts in the future (clock
        // skew) while the closed time alone is over the limit.
        t.min(now_ms)
    } else {
        t
    };
    Timestamp::from_millisecond(t).ok()
}

/// Milliseconds of budget left at `now` (0 when spent; saturating).
pub fn remaining_ms(
    limit_ms: u64,
    ledger: &Ledger,
    w: &Window,
    open: &[Open],
    now: Timestamp,
) -> u64 {
    limit_ms.saturating_sub(used_ms(ledger, w, open, now))
}

/// True when the budget is spent at `now`: new sessions are refused.
pub fn is_spent(limit_ms: u64, ledger: &Ledger, w: &Window, open: &[Open], now: Timestamp) -> bool {
    remaining_ms(limit_ms, ledger, w, open, now) == 0
}

/// Hours (a non-negative decimal, as in `usageLimit.hours`) to milliseconds, rounding down.
///
/// Computed from the shortest decimal form of the number, so decimal inputs are exact
/// (`1.15` is 4,140,000 ms, not 4,139,999 from binary floating point). Negative and NaN give 0;
/// values beyond `u64` saturate.
pub fn limit_ms(hours: f64) -> u64 {
    const MS_PER_HOUR: u128 = 3_600_000;
    if hours.is_nan() || hours <= 0.0 {
        return 0;
    }
    if hours.is_infinite() {
        return u64::MAX;
    }
    // Rust prints floats without exponent, in the shortest form that reads back the same value.
    let text = format!("{hours}");
    let (int, frac) = text.split_once('.').unwrap_or((&text, ""));
    let mut whole: u128 = 0;
    for c in int.bytes() {
        whole = whole
            .saturating_mul(10)
            .saturating_add(u128::from(c - b'0'));
    }
    // Thirty digits are more than a millisecond's worth; dropping the rest only rounds down.
    let frac = &frac[..frac.len().min(30)];
    let mut num: u128 = 0;
    for c in frac.bytes() {
        num = num * 10 + u128::from(c - b'0');
    }
    let den = 10u128.pow(frac.len() as u32);
    let total = whole
        .saturating_mul(MS_PER_HOUR)
        .saturating_add(num * MS_PER_HOUR / den);
    u64::try_from(total).unwrap_or(u64::MAX)
}

/// Instant to milliseconds since the epoch, floored.
fn millis(t: Timestamp) -> i64 {
    // jiff's range (±10,000 years) fits in i64 milliseconds.
    t.as_nanosecond().div_euclid(1_000_000) as i64
}

/// Length of `[a, b) ∩ [lo, hi)` in milliseconds.
fn overlap(a: i64, b: i64, lo: i64, hi: i64) -> u64 {
    let s = a.max(lo);
    let e = b.min(hi);
    if e > s {
        (i128::from(e) - i128::from(s)) as u64
    } else {
        0
    }
}

/// The used time of one budget in one window as a function of time.
struct Meter {
    /// Closed milliseconds (of this window).
    closed: u64,
    /// Effective starts of the counted open sessions (clamped to the window start), sorted.
    starts: Vec<i64>,
    /// Window bounds in milliseconds.
    lo: i64,
    hi: i64,
}

impl Meter {
    fn new(ledger: &Ledger, w: &Window, open: &[Open]) -> Meter {
        let same = ledger.window_start == w.start;
        let closed = if same { ledger.closed_ms } else { 0 };
        let mut seen: HashSet<&str> = HashSet::new();
        if same {
            seen.extend(ledger.closed_sessions.iter().map(String::as_str));
        }
        let (lo, hi) = w.bounds();
        let mut starts: Vec<i64> = open
            .iter()
            .filter(|o| seen.insert(o.uid.as_str()))
            .map(|o| millis(o.start).max(lo))
            .filter(|s| *s < hi)
            .collect();
        starts.sort_unstable();
        Meter {
            closed,
            starts,
            lo,
            hi,
        }
    }

    /// Used milliseconds at `t`.
    fn used_at(&self, t: i64) -> u64 {
        self.starts.iter().fold(self.closed, |acc, s| {
            acc.saturating_add(overlap(*s, t, self.lo, self.hi))
        })
    }

    /// The first millisecond `t` from the first open start on with `used_at(t) >= limit`, if it
    /// comes before the window's end. The used time is piecewise linear: its slope is the number
    /// of sessions started, and it changes only at starts.
    fn reaches(&self, limit: u64) -> Option<i64> {
        let first = *self.starts.first()?;
        let (mut t, mut used, mut rate, mut i) = (first, u128::from(self.closed), 0u128, 0usize);
        let limit = u128::from(limit);
        loop {
            while i < self.starts.len() && self.starts[i] <= t {
                rate += 1;
                i += 1;
            }
            if used >= limit {
                return Some(t);
            }
            let next = self.starts.get(i).copied().unwrap_or(self.hi);
            // rate >= 1 here: t is at or after the first start.
            let dt = (limit - used).div_ceil(rate);
            let at = i128::from(t) + dt as i128;
            if at < i128::from(next) {
                return Some(at as i64);
            }
            if next >= self.hi {
                // Runs out at or after the window's end: the next window resets the budget.
                return None;
            }
            used += rate * (i128::from(next) - i128::from(t)) as u128;
            t = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    use UsageLimitInterval::{Daily, Monthly, Total, Weekly};

    const H: u64 = 3_600_000;
    const M: u64 = 60_000;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn at_ms(m: i64) -> Timestamp {
        Timestamp::from_millisecond(m).unwrap()
    }

    fn plus(t: Timestamp, ms: i64) -> Timestamp {
        at_ms(millis(t) + ms)
    }

    fn win(start: &str, end: &str) -> Window {
        Window {
            start: Some(ts(start)),
            end: Some(ts(end)),
        }
    }

    fn hours(w: &Window) -> i64 {
        (millis(w.end.unwrap()) - millis(w.start.unwrap())) / H as i64
    }

    fn open(uid: &str, start: &str) -> Open {
        Open {
            uid: uid.into(),
            start: ts(start),
        }
    }

    // POSIX rules, so that the tests do not depend on the system's tz database.
    fn paris() -> TimeZone {
        TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap()
    }

    fn new_york() -> TimeZone {
        TimeZone::posix("EST5EDT,M3.2.0,M11.1.0").unwrap()
    }

    /// Brazil's rules of 2018: clocks change at midnight (a gap over 00:00, then a fold back
    /// across it).
    fn sao_paulo_2018() -> TimeZone {
        TimeZone::posix("<-03>3<-02>,M11.1.0/0,M2.3.0/0").unwrap()
    }

    fn utc() -> TimeZone {
        TimeZone::UTC
    }

    #[test]
    fn daily_utc_boundaries() {
        let w = win("2025-06-10T00:00:00Z", "2025-06-11T00:00:00Z");
        assert_eq!(window(Daily, ts("2025-06-10T12:34:56.789Z"), &utc()), w);
        assert_eq!(window(Daily, ts("2025-06-10T00:00:00Z"), &utc()), w);
        assert_eq!(
            window(Daily, ts("2025-06-10T23:59:59.999999999Z"), &utc()),
            w
        );
        assert_eq!(
            window(Daily, ts("2025-06-11T00:00:00Z"), &utc()),
            win("2025-06-11T00:00:00Z", "2025-06-12T00:00:00Z")
        );
    }

    #[test]
    fn daily_in_a_fixed_offset_zone() {
        let tz = TimeZone::fixed(jiff::tz::offset(9));
        assert_eq!(
            window(Daily, ts("2025-06-10T14:59:59Z"), &tz),
            win("2025-06-09T15:00:00Z", "2025-06-10T15:00:00Z")
        );
        assert_eq!(
            window(Daily, ts("2025-06-10T15:00:00Z"), &tz),
            win("2025-06-10T15:00:00Z", "2025-06-11T15:00:00Z")
        );
    }

    #[test]
    fn weekly_is_iso_monday_to_monday() {
        // 2025-01-01 is a Wednesday: the week started on Monday 2024-12-30.
        let w = win("2024-12-30T00:00:00Z", "2025-01-06T00:00:00Z");
        assert_eq!(window(Weekly, ts("2025-01-01T08:00:00Z"), &utc()), w);
        assert_eq!(window(Weekly, ts("2024-12-30T00:00:00Z"), &utc()), w);
        // Sunday night is still the same week.
        assert_eq!(window(Weekly, ts("2025-01-05T23:59:59.999Z"), &utc()), w);
        assert_eq!(
            window(Weekly, ts("2025-01-06T00:00:00Z"), &utc()),
            win("2025-01-06T00:00:00Z", "2025-01-13T00:00:00Z")
        );
    }

    #[test]
    fn monthly_lengths_and_leap_years() {
        let jan = win("2025-01-01T00:00:00Z", "2025-02-01T00:00:00Z");
        assert_eq!(window(Monthly, ts("2025-01-31T23:59:59.999Z"), &utc()), jan);
        assert_eq!(hours(&jan), 31 * 24);
        let feb = window(Monthly, ts("2025-02-01T00:00:00Z"), &utc());
        assert_eq!(feb, win("2025-02-01T00:00:00Z", "2025-03-01T00:00:00Z"));
        assert_eq!(hours(&feb), 28 * 24);
        // 2028 is a leap year: February has 29 days and the 29th is in it.
        let feb28 = window(Monthly, ts("2028-02-29T12:00:00Z"), &utc());
        assert_eq!(feb28, win("2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z"));
        assert_eq!(hours(&feb28), 29 * 24);
        assert_eq!(
            window(Monthly, ts("2028-03-01T00:00:00Z"), &utc()).start,
            Some(ts("2028-03-01T00:00:00Z"))
        );
        // 2100 is not a leap year.
        assert_eq!(
            hours(&window(Monthly, ts("2100-02-10T00:00:00Z"), &utc())),
            28 * 24
        );
        // December rolls into January of the next year.
        let dec = window(Monthly, ts("2025-12-31T23:59:59Z"), &utc());
        assert_eq!(dec, win("2025-12-01T00:00:00Z", "2026-01-01T00:00:00Z"));
        assert_eq!(
            window(Monthly, ts("2026-01-01T00:00:00Z"), &utc()),
            win("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z")
        );
        // April has 30 days.
        assert_eq!(
            hours(&window(Monthly, ts("2025-04-15T00:00:00Z"), &utc())),
            30 * 24
        );
    }

    #[test]
    fn dst_days_in_paris() {
        let tz = paris();
        // Spring forward on Sunday 2025-03-30 (02:00 -> 03:00): a 23-hour day.
        let spring = window(Daily, ts("2025-03-30T12:00:00Z"), &tz);
        assert_eq!(spring, win("2025-03-29T23:00:00Z", "2025-03-30T22:00:00Z"));
        assert_eq!(hours(&spring), 23);
        // Fall back on Sunday 2025-10-26 (03:00 -> 02:00): a 25-hour day.
        let fall = window(Daily, ts("2025-10-26T01:30:00Z"), &tz);
        assert_eq!(fall, win("2025-10-25T22:00:00Z", "2025-10-26T23:00:00Z"));
        assert_eq!(hours(&fall), 25);
        // The week holding the spring transition is 167 hours, March 743.
        let week = window(Weekly, ts("2025-03-27T10:00:00Z"), &tz);
        assert_eq!(week, win("2025-03-23T23:00:00Z", "2025-03-30T22:00:00Z"));
        assert_eq!(hours(&week), 7 * 24 - 1);
        let march = window(Monthly, ts("2025-03-31T21:59:59.999Z"), &tz);
        assert_eq!(march, win("2025-02-28T23:00:00Z", "2025-03-31T22:00:00Z"));
        assert_eq!(hours(&march), 31 * 24 - 1);
        // An ordinary day is 24 hours, in winter and in summer time.
        assert_eq!(hours(&window(Daily, ts("2025-01-15T12:00:00Z"), &tz)), 24);
        assert_eq!(
            window(Daily, ts("2025-07-15T12:00:00Z"), &tz),
            win("2025-07-14T22:00:00Z", "2025-07-15T22:00:00Z")
        );
    }

    #[test]
    fn dst_days_in_new_york() {
        let tz = new_york();
        // Spring forward on Sunday 2025-03-09.
        let spring = window(Daily, ts("2025-03-09T15:00:00Z"), &tz);
        assert_eq!(spring, win("2025-03-09T05:00:00Z", "2025-03-10T04:00:00Z"));
        assert_eq!(hours(&spring), 23);
        // Fall back on Sunday 2025-11-02; the repeated hour 01:00-02:00 is in the same day.
        let fall = window(Daily, ts("2025-11-02T05:30:00Z"), &tz);
        assert_eq!(fall, win("2025-11-02T04:00:00Z", "2025-11-03T05:00:00Z"));
        assert_eq!(hours(&fall), 25);
        assert_eq!(window(Daily, ts("2025-11-02T06:30:00Z"), &tz), fall);
        // Local midnight, not UTC midnight: 2025-11-03T03:00Z is still Nov 2 in New York.
        assert_eq!(window(Daily, ts("2025-11-03T03:00:00Z"), &tz), fall);
    }

    #[test]
    fn dst_transitions_at_midnight() {
        let tz = sao_paulo_2018();
        // 2018-11-04 00:00 does not exist (clocks jump to 01:00 -02): the day starts at 01:00,
        // and is 23 hours long.
        let day = window(Daily, ts("2018-11-04T12:00:00Z"), &tz);
        assert_eq!(day, win("2018-11-04T03:00:00Z", "2018-11-05T02:00:00Z"));
        assert_eq!(hours(&day), 23);
        assert_eq!(hours(&window(Daily, ts("2018-11-03T12:00:00Z"), &tz)), 24);
        // 2019-02-17 00:00 -02 goes back to 2019-02-16 23:00 -03: Feb 16 is 25 hours long.
        let day = window(Daily, ts("2019-02-16T12:00:00Z"), &tz);
        assert_eq!(day, win("2019-02-16T02:00:00Z", "2019-02-17T03:00:00Z"));
        assert_eq!(hours(&day), 25);
        // During the repeated hour, still Feb 16.
        assert_eq!(window(Daily, ts("2019-02-17T02:30:00Z"), &tz), day);
    }

    #[test]
    fn total_never_rolls() {
        for now in [
            "1999-12-31T23:59:59Z",
            "2025-01-01T00:00:00Z",
            "2090-06-01T00:00:00Z",
        ] {
            assert_eq!(window(Total, ts(now), &paris()), Window::TOTAL);
        }
        let l = Ledger {
            window_start: None,
            closed_ms: 7 * H,
            closed_sessions: vec!["a".into()],
        };
        assert_eq!(roll(&l, &Window::TOTAL), l);
        let l2 = close(
            &l,
            &Window::TOTAL,
            "b",
            ts("2001-01-01T00:00:00Z"),
            ts("2001-01-01T02:00:00Z"),
        );
        assert_eq!(l2.closed_ms, 9 * H);
        // A segment of any age counts in `total`.
        assert_eq!(
            used_ms(
                &l2,
                &Window::TOTAL,
                &[open("c", "1990-01-01T00:00:00Z")],
                ts("1990-01-01T01:00:00Z")
            ),
            10 * H
        );
    }

    #[test]
    fn rollover_counts_only_the_part_in_the_new_window() {
        let tz = utc();
        let day1 = window(Daily, ts("2025-06-10T23:00:00Z"), &tz);
        let now1 = ts("2025-06-10T23:30:00Z");
        let running = [open("s1", "2025-06-10T23:00:00Z")];
        let mut ledger = close(
            &Ledger::default(),
            &day1,
            "s0",
            ts("2025-06-10T08:00:00Z"),
            ts("2025-06-10T10:00:00Z"),
        );
        assert_eq!(used_ms(&ledger, &day1, &running, now1), 2 * H + 30 * M);

        // After midnight: yesterday's closed time is gone, the running session counts from 00:00.
        let now2 = ts("2025-06-11T01:00:00Z");
        let day2 = window(Daily, now2, &tz);
        assert_eq!(day2.start, Some(ts("2025-06-11T00:00:00Z")));
        assert_eq!(used_ms(&ledger, &day2, &running, now2), H);
        ledger = roll(&ledger, &day2);
        assert_eq!(
            ledger,
            Ledger {
                window_start: day2.start,
                ..Ledger::default()
            }
        );
        // Ending at 01:30, it closes 1.5 h into the new day (not its 2.5 h in all).
        ledger = close(
            &ledger,
            &day2,
            "s1",
            ts("2025-06-10T23:00:00Z"),
            ts("2025-06-11T01:30:00Z"),
        );
        assert_eq!(ledger.closed_ms, 90 * M);
        assert_eq!(
            used_ms(&ledger, &day2, &running, ts("2025-06-11T02:00:00Z")),
            90 * M
        );
        // Rolling into the same window changes nothing.
        assert_eq!(roll(&ledger, &day2), ledger);
    }

    #[test]
    fn close_is_idempotent_per_uid() {
        let w = win("2025-06-10T00:00:00Z", "2025-06-11T00:00:00Z");
        let once = close(
            &Ledger::default(),
            &w,
            "u1",
            ts("2025-06-10T01:00:00Z"),
            ts("2025-06-10T02:00:00Z"),
        );
        assert_eq!(once.closed_ms, H);
        assert_eq!(once.closed_sessions, vec!["u1".to_string()]);
        let twice = close(
            &once,
            &w,
            "u1",
            ts("2025-06-10T01:00:00Z"),
            ts("2025-06-10T02:00:00Z"),
        );
        assert_eq!(twice, once);
        // Even with a different segment: the uid was already accounted for.
        assert_eq!(
            close(
                &once,
                &w,
                "u1",
                ts("2025-06-10T03:00:00Z"),
                ts("2025-06-10T09:00:00Z")
            ),
            once
        );
        // An open session already closed is not counted again.
        let now = ts("2025-06-10T05:00:00Z");
        assert_eq!(
            used_ms(&once, &w, &[open("u1", "2025-06-10T01:00:00Z")], now),
            H
        );
        // Another uid adds.
        let other = close(
            &once,
            &w,
            "u2",
            ts("2025-06-10T01:00:00Z"),
            ts("2025-06-10T01:00:01Z"),
        );
        assert_eq!(other.closed_ms, H + 1000);
    }

    #[test]
    fn close_clips_to_the_window_and_ignores_empty_segments() {
        let w = win("2025-06-10T00:00:00Z", "2025-06-11T00:00:00Z");
        let l = close(
            &Ledger::default(),
            &w,
            "a",
            ts("2025-06-09T20:00:00Z"),
            ts("2025-06-11T04:00:00Z"),
        );
        assert_eq!(l.closed_ms, 24 * H);
        let l = close(
            &l,
            &w,
            "b",
            ts("2025-06-10T05:00:00Z"),
            ts("2025-06-10T04:00:00Z"),
        );
        assert_eq!(l.closed_ms, 24 * H);
        assert_eq!(l.closed_sessions, vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn close_into_a_new_window_rolls_first() {
        let day1 = win("2025-06-10T00:00:00Z", "2025-06-11T00:00:00Z");
        let day2 = win("2025-06-11T00:00:00Z", "2025-06-12T00:00:00Z");
        let l = close(
            &Ledger::default(),
            &day1,
            "a",
            ts("2025-06-10T20:00:00Z"),
            ts("2025-06-10T21:00:00Z"),
        );
        // "a" was closed yesterday; its uid no longer matters today.
        let l = close(
            &l,
            &day2,
            "a",
            ts("2025-06-10T20:00:00Z"),
            ts("2025-06-11T00:00:01Z"),
        );
        assert_eq!(
            l,
            Ledger {
                window_start: day2.start,
                closed_ms: 1000,
                closed_sessions: vec!["a".into()]
            }
        );
    }

    #[test]
    fn used_ms_counts_open_sessions_once_and_only_up_to_now() {
        let w = win("2025-06-10T00:00:00Z", "2025-06-11T00:00:00Z");
        let now = ts("2025-06-10T03:00:00Z");
        let sessions = [
            open("a", "2025-06-10T01:00:00Z"),
            open("a", "2025-06-10T00:00:00Z"),
            open("b", "2025-06-09T22:00:00Z"),
            open("future", "2025-06-10T04:00:00Z"),
        ];
        // a: 2 h (first entry), b: 3 h (from the window start), future: nothing yet.
        assert_eq!(used_ms(&Ledger::default(), &w, &sessions, now), 5 * H);
        // A ledger of another window contributes nothing.
        let stale = Ledger {
            window_start: Some(ts("2025-06-09T00:00:00Z")),
            closed_ms: 10 * H,
            closed_sessions: vec!["a".into()],
        };
        assert_eq!(used_ms(&stale, &w, &sessions, now), 5 * H);
        assert_eq!(remaining_ms(6 * H, &stale, &w, &sessions, now), H);
        assert_eq!(remaining_ms(4 * H, &stale, &w, &sessions, now), 0);
        assert!(is_spent(5 * H, &stale, &w, &sessions, now));
        assert!(!is_spent(5 * H + 1, &stale, &w, &sessions, now));
    }

    #[test]
    fn exhausted_at_one_session() {
        let w = win("2025-06-10T00:00:00Z", "2025-06-11T00:00:00Z");
        let s = [open("a", "2025-06-10T00:00:00Z")];
        let now = ts("2025-06-10T00:10:00Z");
        let t = exhausted_at(H, &Ledger::default(), &w, &s, now).unwrap();
        assert_eq!(t, ts("2025-06-10T01:00:00Z"));
        assert_eq!(used_ms(&Ledger::default(), &w, &s, t), H);
        assert_eq!(used_ms(&Ledger::default(), &w, &s, plus(t, -1)), H - 1);
        // With 20 minutes already closed.
        let l = close(
            &Ledger::default(),
            &w,
            "old",
            ts("2025-06-09T23:00:00Z"),
            ts("2025-06-10T00:20:00Z"),
        );
        assert_eq!(
            exhausted_at(H, &l, &w, &s, now),
            Some(ts("2025-06-10T00:40:00Z"))
        );
    }

    #[test]
    fn exhausted_at_two_and_three_sessions() {
        let w = win("2025-06-10T00:00:00Z", "2025-06-11T00:00:00Z");
        let l = Ledger::default();
        let now = ts("2025-06-10T00:10:00Z");
        // Two since midnight: 20 min used at 00:10, 40 min left at 2 ms/ms.
        let two = [
            open("a", "2025-06-10T00:00:00Z"),
            open("b", "2025-06-10T00:00:00Z"),
        ];
        assert_eq!(
            exhausted_at(H, &l, &w, &two, now),
            Some(ts("2025-06-10T00:30:00Z"))
        );
        // Three, started 00:00, 00:05 and 00:10: 15 min used at 00:10, 45 min left at 3 ms/ms.
        let three = [
            open("a", "2025-06-10T00:00:00Z"),
            open("b", "2025-06-10T00:05:00Z"),
            open("c", "2025-06-10T00:10:00Z"),
        ];
        let t = exhausted_at(H, &l, &w, &three, now).unwrap();
        assert_eq!(t, ts("2025-06-10T00:25:00Z"));
        assert_eq!(used_ms(&l, &w, &three, t), H);
        // A remainder not divisible by the rate rounds up (never early): 1 h + 1 ms left, 3 ms/ms.
        let t = exhausted_at(H + 1 + 15 * M, &l, &w, &three, now).unwrap();
        assert_eq!(t, plus(ts("2025-06-10T00:30:00Z"), 1));
        assert!(used_ms(&l, &w, &three, t) >= H + 1 + 15 * M);
        assert!(used_ms(&l, &w, &three, plus(t, -1)) < H + 1 + 15 * M);
        // A session starting later (clock skew) raises the rate only from its start: one session
        // until 00:30, then two.
        let later = [
            open("a", "2025-06-10T00:00:00Z"),
            open("b", "2025-06-10T00:30:00Z"),
        ];
        assert_eq!(
            exhausted_at(H, &l, &w, &later, now),
            Some(ts("2025-06-10T00:45:00Z"))
        );
    }

    #[test]
    fn exhausted_at_none_cases() {
        let w = win("2025-06-10T00:00:00Z", "2025-06-11T00:00:00Z");
        let l = Ledger::default();
        let now = ts("2025-06-10T20:00:00Z");
        // Nothing open.
        assert_eq!(exhausted_at(H, &l, &w, &[], now), None);
        let closed = close(
            &l,
            &w,
            "a",
            ts("2025-06-10T00:00:00Z"),
            ts("2025-06-10T05:00:00Z"),
        );
        assert_eq!(
            exhausted_at(H, &closed, &w, &[open("a", "2025-06-10T00:00:00Z")], now),
            None
        );
        // Runs out after the window's end: the next window resets the budget.
        let s = [open("b", "2025-06-10T20:00:00Z")];
        assert_eq!(exhausted_at(5 * H, &l, &w, &s, now), None);
        // Exactly at the end is not running out either; one millisecond before it is.
        assert_eq!(exhausted_at(4 * H, &l, &w, &s, now), None);
        assert_eq!(
            exhausted_at(4 * H - 1, &l, &w, &s, now),
            Some(plus(w.end.unwrap(), -1))
        );
    }

    #[test]
    fn exhausted_at_in_the_past_is_stable() {
        let w = win("2025-06-10T00:00:00Z", "2025-06-11T00:00:00Z");
        let l = Ledger::default();
        let s = [
            open("a", "2025-06-10T00:00:00Z"),
            open("b", "2025-06-10T01:00:00Z"),
        ];
        // 1 h + 2 × 0.5 h: ran out at 01:30.
        for now in [
            "2025-06-10T01:30:00Z",
            "2025-06-10T03:00:00Z",
            "2025-06-10T23:59:59Z",
        ] {
            assert_eq!(
                exhausted_at(2 * H, &l, &w, &s, ts(now)),
                Some(ts("2025-06-10T01:30:00Z"))
            );
        }
        // Closed time alone over the limit: exhausted from the first open session's start.
        let over = close(
            &l,
            &w,
            "z",
            ts("2025-06-10T00:00:00Z"),
            ts("2025-06-10T03:00:00Z"),
        );
        let now = ts("2025-06-10T05:00:00Z");
        assert_eq!(
            exhausted_at(2 * H, &over, &w, &s, now),
            Some(ts("2025-06-10T00:00:00Z"))
        );
        // A zero budget runs out as soon as anything runs.
        assert_eq!(
            exhausted_at(0, &l, &w, &s, now),
            Some(ts("2025-06-10T00:00:00Z"))
        );
        // Closed time over the limit and the only open session starts later than now: now.
        let skew = [open("c", "2025-06-10T06:00:00Z")];
        assert_eq!(exhausted_at(2 * H, &over, &w, &skew, now), Some(now));
    }

    #[test]
    fn exhausted_at_counts_from_the_window_start() {
        // A session running since yesterday only consumes today's budget from midnight.
        let w = win("2025-06-10T00:00:00Z", "2025-06-11T00:00:00Z");
        let s = [open("a", "2025-06-09T18:00:00Z")];
        let t = exhausted_at(
            2 * H,
            &Ledger::default(),
            &w,
            &s,
            ts("2025-06-10T00:30:00Z"),
        );
        assert_eq!(t, Some(ts("2025-06-10T02:00:00Z")));
    }

    #[test]
    fn limit_ms_conversions() {
        assert_eq!(limit_ms(1.0), H);
        assert_eq!(limit_ms(1.5), 90 * M);
        assert_eq!(limit_ms(1.15), 4_140_000);
        assert_eq!(limit_ms(0.1), 360_000);
        assert_eq!(limit_ms(2.675), 9_630_000);
        assert_eq!(limit_ms(100_000.0), 360_000_000_000);
        // Rounding down below a millisecond.
        assert_eq!(limit_ms(0.0000001), 0);
        assert_eq!(limit_ms(0.0000003), 1);
        assert_eq!(limit_ms(0.0), 0);
        assert_eq!(limit_ms(-0.0), 0);
        assert_eq!(limit_ms(-3.0), 0);
        assert_eq!(limit_ms(f64::NAN), 0);
        assert_eq!(limit_ms(f64::INFINITY), u64::MAX);
        assert_eq!(limit_ms(1e300), u64::MAX);
        assert_eq!(limit_ms(f64::MIN_POSITIVE), 0);
    }

    #[test]
    fn prune_keeps_existing_uids_and_the_total() {
        let l = Ledger {
            window_start: None,
            closed_ms: 42,
            closed_sessions: vec!["gone".into(), "here".into()],
        };
        let p = prune(&l, |u| u == "here");
        assert_eq!(
            p,
            Ledger {
                window_start: None,
                closed_ms: 42,
                closed_sessions: vec!["here".into()]
            }
        );
    }

    #[test]
    fn ledger_serde_roundtrip() {
        let l = Ledger {
            window_start: Some(ts("2025-06-10T00:00:00Z")),
            closed_ms: 1234,
            closed_sessions: vec!["uid-1".into()],
        };
        let json = serde_json::to_value(&l).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"windowStart": "2025-06-10T00:00:00Z", "closedMs": 1234, "closedSessions": ["uid-1"]})
        );
        assert_eq!(serde_json::from_value::<Ledger>(json).unwrap(), l);
        assert_eq!(
            serde_json::from_value::<Ledger>(serde_json::json!({})).unwrap(),
            Ledger::default()
        );
    }

    #[test]
    fn window_contains() {
        let w = win("2025-06-10T00:00:00Z", "2025-06-11T00:00:00Z");
        assert!(w.contains(ts("2025-06-10T00:00:00Z")));
        assert!(!w.contains(ts("2025-06-11T00:00:00Z")));
        assert!(!w.contains(ts("2025-06-09T23:59:59.999Z")));
        assert!(Window::TOTAL.contains(Timestamp::MIN));
    }

    // --- properties ---

    /// 1950 .. 2100, millisecond precision.
    fn arb_ms() -> impl Strategy<Value = i64> {
        -631_152_000_000i64..4_102_444_800_000
    }

    fn arb_tz() -> impl Strategy<Value = TimeZone> {
        prop_oneof![
            Just(utc()),
            Just(paris()),
            Just(new_york()),
            Just(sao_paulo_2018()),
            Just(TimeZone::fixed(jiff::tz::offset(-11))),
            Just(TimeZone::fixed(
                jiff::tz::Offset::from_seconds(5 * 3600 + 45 * 60).unwrap()
            )),
            Just(TimeZone::posix("<+1030>-10:30<+11>-11,M10.1.0,M4.1.0").unwrap()),
        ]
    }

    fn arb_interval() -> impl Strategy<Value = UsageLimitInterval> {
        prop_oneof![Just(Daily), Just(Weekly), Just(Monthly), Just(Total)]
    }

    /// A window around `now`, of any kind, in any of the test zones.
    fn arb_window_now() -> impl Strategy<Value = (Window, i64)> {
        (arb_interval(), arb_ms(), arb_tz())
            .prop_map(|(i, now, tz)| (window(i, at_ms(now), &tz), now))
    }

    /// Up to 4 open sessions starting within 40 days before `now` (some a little after it).
    fn arb_open(now: i64) -> impl Strategy<Value = Vec<Open>> {
        proptest::collection::vec((0u8..6, -3_456_000_000i64..60_000), 0..5).prop_map(move |v| {
            v.into_iter()
                .map(|(uid, off)| Open {
                    uid: format!("s{uid}"),
                    start: at_ms(now + off),
                })
                .collect()
        })
    }

    fn arb_case() -> impl Strategy<Value = (Window, i64, Ledger, Vec<Open>)> {
        arb_window_now().prop_flat_map(|(w, now)| {
            let ledger = (
                0u64..100 * H,
                proptest::collection::vec(0u8..6, 0..3),
                any::<bool>(),
            )
                .prop_map(move |(closed_ms, uids, same)| Ledger {
                    window_start: if same { w.start } else { Some(at_ms(0)) },
                    closed_ms,
                    closed_sessions: uids.into_iter().map(|u| format!("s{u}")).collect(),
                });
            (Just(w), Just(now), ledger, arb_open(now))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn prop_window_contains_now_and_tiles(interval in arb_interval(), now in arb_ms(), tz in arb_tz()) {
            let t = at_ms(now);
            let w = window(interval, t, &tz);
            prop_assert!(w.contains(t));
            if interval == Total {
                prop_assert_eq!(w, Window::TOTAL);
            } else {
                let (s, e) = (w.start.unwrap(), w.end.unwrap());
                prop_assert!(s < e);
                // Lengths: a day 23..=25 h (Samoa-style skipped days aside), a week 7 days ± 1 h,
                // a month 28..=31 days ± 1 h.
                let len = millis(e) - millis(s);
                let (lo, hi) = match interval {
                    Daily => (22, 26),
                    Weekly => (7 * 24 - 2, 7 * 24 + 2),
                    _ => (28 * 24 - 2, 31 * 24 + 2),
                };
                prop_assert!(len >= lo * H as i64 && len <= hi * H as i64, "length {len}");
                // Every instant of the window gives the same window; neighbours are adjacent.
                prop_assert_eq!(window(interval, s, &tz), w);
                prop_assert_eq!(window(interval, plus(e, -1), &tz), w);
                prop_assert_eq!(window(interval, e, &tz).start, Some(e));
                prop_assert_eq!(window(interval, plus(s, -1), &tz).end, Some(s));
                // Boundaries are local midnights (the first instant of a local day).
                let local = tz.to_datetime(s);
                let after_gap = tz.to_datetime(plus(s, -1)).date() < local.date();
                prop_assert!(local.time() == Time::midnight() || after_gap);
                match interval {
                    Weekly => prop_assert_eq!(local.date().weekday(), jiff::civil::Weekday::Monday),
                    Monthly => prop_assert_eq!(local.date().day(), 1),
                    _ => {}
                }
            }
        }

        #[test]
        fn prop_used_ms_bounded((w, now, ledger, open) in arb_case()) {
            let used = used_ms(&ledger, &w, &open, at_ms(now));
            let closed = if ledger.window_start == w.start { ledger.closed_ms } else { 0 };
            prop_assert!(used >= closed);
            let (lo, _) = w.bounds();
            let k = open.len() as u64;
            let earliest = open.iter().map(|o| millis(o.start).max(lo)).min();
            let elapsed = earliest.map_or(0, |e| (now - e).max(0) as u64);
            prop_assert!(used <= closed + k * elapsed, "used {used} closed {closed} k {k} elapsed {elapsed}");
            // Non-decreasing in time.
            prop_assert!(used_ms(&ledger, &w, &open, at_ms(now + 1)) >= used);
            prop_assert_eq!(remaining_ms(used, &ledger, &w, &open, at_ms(now)), 0);
            prop_assert_eq!(remaining_ms(used + 5, &ledger, &w, &open, at_ms(now)), 5);
        }

        #[test]
        fn prop_closed_total_is_the_sum_of_overlaps(
            (w, now) in arb_window_now(),
            segs in proptest::collection::vec((-3_456_000_000i64..0, 0i64..3_456_000_000), 0..8),
        ) {
            let mut ledger = roll(&Ledger::default(), &w);
            let mut expected: u64 = 0;
            for (i, (a, len)) in segs.iter().enumerate() {
                let (start, end) = (at_ms(now + a), at_ms(now + a + len));
                ledger = close(&ledger, &w, &format!("u{i}"), start, end);
                // Independently: clip with jiff and measure.
                let s = w.start.map_or(start, |ws| start.max(ws));
                let e = w.end.map_or(end, |we| end.min(we));
                if e > s {
                    expected += e.duration_since(s).as_millis() as u64;
                }
            }
            prop_assert_eq!(ledger.closed_ms, expected);
            prop_assert_eq!(ledger.closed_sessions.len(), segs.len());
            prop_assert_eq!(ledger.window_start, w.start);
        }

        #[test]
        fn prop_close_twice_is_once(
            (w, now, ledger, _open) in arb_case(),
            uid in 0u8..8,
            a in -3_456_000_000i64..0,
            len in 0i64..3_456_000_000,
        ) {
            let uid = format!("s{uid}");
            let (s, e) = (at_ms(now + a), at_ms(now + a + len));
            let once = close(&ledger, &w, &uid, s, e);
            prop_assert_eq!(close(&once, &w, &uid, s, e), once.clone());
            // Closing a session does not change the used time at its end when it was open.
            let rolled = roll(&ledger, &w);
            if !rolled.closed_sessions.contains(&uid) {
                let open = [Open { uid: uid.clone(), start: s }];
                prop_assert_eq!(used_ms(&once, &w, &[], e), used_ms(&rolled, &w, &open, e));
            }
        }

        #[test]
        fn prop_exhausted_at_is_exact(
            (w, now, ledger, open) in arb_case(),
            limit in 0u64..200 * H,
        ) {
            let now_t = at_ms(now);
            let used_now = used_ms(&ledger, &w, &open, now_t);
            match exhausted_at(limit, &ledger, &w, &open, now_t) {
                Some(t) => {
                    prop_assert!(w.contains(t) || (used_now >= limit && t == now_t));
                    prop_assert!(used_ms(&ledger, &w, &open, t) >= limit);
                    if t > now_t {
                        prop_assert!(used_now < limit);
                        prop_assert!(used_ms(&ledger, &w, &open, plus(t, -1)) < limit);
                    } else {
                        prop_assert!(used_now >= limit, "past instant but not exhausted");
                    }
                    prop_assert_eq!(remaining_ms(limit, &ledger, &w, &open, t), 0);
                    // Stable: asking again later (while nothing changes) gives the same instant.
                    if t <= now_t && t > plus(now_t, -1) {
                        prop_assert_eq!(exhausted_at(limit, &ledger, &w, &open, plus(now_t, 1000)), Some(t));
                    }
                }
                None => {
                    // Either nothing counted is open, or it does not run out in this window.
                    let rolled = roll(&ledger, &w);
                    let counted = open.iter().any(|o| !rolled.closed_sessions.contains(&o.uid));
                    prop_assert!(!counted || used_now < limit);
                    if let (true, Some(end)) = (counted, w.end) {
                        prop_assert!(used_ms(&ledger, &w, &open, plus(end, -1)) < limit);
                    }
                }
            }
        }
    }
}
