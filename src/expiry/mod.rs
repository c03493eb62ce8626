//! Session expiry and usage metering, as pure functions (seed 002, "Session Time Limits").
//!
//! Nothing here reads a clock or does I/O: `now` is always a parameter, so the controller can
//! inject its clock and every rule is testable to the millisecond. Durations are
//! [`std::time::Duration`], instants [`jiff::Timestamp`].
//!
//! Two halves:
//!
//! - [`deadline()`]: which rule ends a session and when. `sessionTimeLimit` (from creation) when
//!   set, otherwise `keepaliveExpiration` after the last keepalive; a usage budget running out
//!   earlier overrides both. [`next_keepalive`] is the keepalive to persist.
//! - usage: [`window`]s (`daily`, `weekly`, `monthly`, `total`) in an explicit time zone and the
//!   usage [`Ledger`]: the milliseconds of sessions that have ended in the window, plus the uids
//!   closed into it so that a retry never counts a session twice. Open sessions are counted
//!   from their start (or the window start) up to `now`; all arithmetic is in integer
//!   milliseconds.
//!
//! All running time counts against a usage budget, paused and stopped time included (seed 002:
//! users are charged for the full duration of a session), so running out of budget always
//! deletes the session: stopping or pausing it would not stop the meter.
//!
//! Use by a controller, for one budget (a user's, or a group's shared one):
//!
//! 1. `w = window(interval, now, &tz)`, `ledger = roll(&persisted, &w)`.
//! 2. When a session ends (before its finalizer is removed):
//!    `ledger = close(&ledger, &w, uid, start, now)`; persist the ledger, then let it go. A retry
//!    after a crash in between adds nothing.
//! 3. `open` = the budget's sessions that still exist and have started (paused and stopped ones
//!    included); `remaining_ms` for the status, `is_spent` to refuse new sessions, and
//!    `exhausted_at` as the usage deadline given to [`deadline()`] for each of them.
//! 4. Re-evaluate at the window's end as well: the next window resets the budget.
//! 5. From time to time `prune` the uids of sessions that no longer exist.

mod deadline;
mod usage;

pub use deadline::{Deadline, Policy, SessionTimes, deadline, is_due, next_keepalive};
pub use usage::{
    Ledger, Open, Window, close, exhausted_at, is_spent, limit_ms, prune, remaining_ms, roll,
    used_ms, window,
};
