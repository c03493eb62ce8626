//! Leader election on a `coordination.k8s.io/v1` Lease, so that only one replica writes.
//!
//! The rules follow client-go's leader election:
//! - a candidate takes the lease when there is none, or when the holder has not renewed it for
//!   a whole lease duration *as observed by the candidate's own clock* (so clock skew between
//!   replicas cannot shorten a lease);
//! - the leader renews every `retry_period`; every write is a compare-and-swap on the Lease's
//!   `resourceVersion`, so two candidates can never both win;
//! - a leader that has not renewed for `renew_deadline` (shorter than the lease duration) stops:
//!   the process exits, before anyone else can take the lease, so two replicas never both write;
//! - on a graceful shutdown the leader empties the holder once its controllers have stopped, so a
//!   standby takes over at its next retry rather than after a lease duration.
//!
//! The decision is a pure function ([`decide`]), tested without a cluster.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Lease timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    /// How long a lease is valid after its last renewal.
    pub lease_duration: Duration,
    /// A leader that could not renew for this long gives up (must be < lease_duration).
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        Self {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

impl LeaseTimings {
    /// The timings, if they are coherent: a leader must give up (`renew_deadline`) before its
    /// lease can run out for the others (`lease_duration`), and must try to renew
    /// (`retry_period`) more often than it gives up. Otherwise two replicas could both lead.
    /// The error names the flags, as the user sets them.
    pub fn check(self) -> Result<Self, String> {
        let secs = |d: Duration| d.as_secs_f64();
        if self.renew_deadline >= self.lease_duration {
            return Err(format!(
                "--renew-deadline ({} s) must be shorter than --lease-duration ({} s): a leader \
                 must stop before another replica may take the lease",
                secs(self.renew_deadline),
                secs(self.lease_duration)
            ));
        }
        if self.retry_period.is_zero() || self.retry_period >= self.renew_deadline {
            return Err(format!(
                "--retry-period ({} s) must be above zero and shorter than --renew-deadline \
                 ({} s): a leader must try to renew before it gives up",
                secs(self.retry_period),
                secs(self.renew_deadline)
            ));
        }
        Ok(self)
    }
}

/// What a candidate saw of the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Current holder.
    pub holder: Option<String>,
    /// The holder's renew time as written (used only to notice that it changed).
    pub renew_time: Option<String>,
    /// When this candidate first saw this (holder, renew_time) pair.
    pub since: Instant,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Write ourselves as the holder (create, take over or renew).
    Claim,
    /// Someone else validly holds it.
    Wait,
}

/// Decides from the observed lease. `observed` is `None` when there is no Lease object.
pub fn decide(
    me: &str,
    observed: Option<&Observed>,
    now: Instant,
    lease_duration: Duration,
) -> Decision {
    match observed {
        None => Decision::Claim,
        Some(o) => match o.holder.as_deref() {
            None | Some("") => Decision::Claim,
            Some(h) if h == me => Decision::Claim,
            Some(_) if now.duration_since(o.since) >= lease_duration => Decision::Claim,
            Some(_) => Decision::Wait,
        },
    }
}

/// Leadership state published to the rest of the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leadership {
    /// Not (yet) the leader: do not write.
    Follower,
    /// The leader: write.
    Leader,
    /// Was the leader and lost the lease: stop writing and exit.
    Lost,
}

/// A running election: its published state, and a way to step down on shutdown.
pub struct Election {
    /// The state, for [`crate::controller::run`].
    pub leadership: watch::Receiver<Leadership>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Election {
    /// Stops the election loop and, if this replica holds the lease, releases it (empty holder,
    /// written with the same compare-and-swap as a renewal), so that a standby takes over at its
    /// next retry instead of after a whole lease duration. Call it only after the controllers have
    /// stopped: from here on this replica must not write.
    pub async fn step_down(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .is_err()
        {
            warn!("the leader election did not stop in time");
            self.task.abort();
        }
    }
}

/// Starts the election loop, publishing the state on [`Election::leadership`].
pub fn spawn(
    client: Client,
    namespace: &str,
    name: &str,
    me: String,
    timings: LeaseTimings,
) -> Election {
    let (tx, rx) = watch::channel(Leadership::Follower);
    let (stop_tx, stop_rx) = oneshot::channel();
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let name = name.to_string();
    let task = tokio::spawn(async move { run(api, name, me, timings, tx, stop_rx).await });
    Election {
        leadership: rx,
        stop: Some(stop_tx),
        task,
    }
}

async fn run(
    api: Api<Lease>,
    name: String,
    me: String,
    t: LeaseTimings,
    tx: watch::Sender<Leadership>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut observed: Option<Observed> = None;
    let mut last_renew: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let leading = *tx.borrow() == Leadership::Leader;
        if leading && last_renew.is_some_and(|r| now.duration_since(r) >= t.renew_deadline) {
            warn!(lease = %name, "could not renew the lease in time; giving up leadership");
            let _ = tx.send(Leadership::Lost);
            return;
        }
        match try_once(&api, &name, &me, &mut observed, t).await {
            Ok(true) => {
                last_renew = Some(Instant::now());
                if !leading {
                    info!(lease = %name, identity = %me, "acquired leadership");
                    let _ = tx.send(Leadership::Leader);
                }
            }
            Ok(false) => {
                if leading {
                    warn!(lease = %name, "the lease is held by another replica; stopping");
                    let _ = tx.send(Leadership::Lost);
                    return;
                }
            }
            Err(e) => warn!(lease = %name, error = %e, "lease update failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(t.retry_period) => {}
            _ = &mut stop => {
                if *tx.borrow() == Leadership::Leader {
                    let _ = tx.send(Leadership::Lost);
                    match release(&api, &name, &me).await {
                        Ok(true) => info!(lease = %name, "released the lease"),
                        Ok(false) => {}
                        Err(e) => warn!(lease = %name, error = %e, "could not release the lease"),
                    }
                }
                return;
            }
        }
    }
}

/// Empties the lease's holder if it is still `me` (compare-and-swap). Ok(true) when released.
async fn release(api: &Api<Lease>, name: &str, me: &str) -> Result<bool, kube::Error> {
    let Some(mut lease) = api.get_opt(name).await? else {
        return Ok(false);
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(me) {
        return Ok(false);
    }
    spec.holder_identity = None;
    spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

fn holder_of(lease: &Lease) -> (Option<String>, Option<String>) {
    let spec = lease.spec.as_ref();
    (
        spec.and_then(|s| s.holder_identity.clone()),
        spec.and_then(|s| s.renew_time.as_ref())
            .map(|t| t.0.to_string()),
    )
}

/// One round: read, decide, and write with a resourceVersion precondition. Ok(true) = we hold it.
async fn try_once(
    api: &Api<Lease>,
    name: &str,
    me: &str,
    observed: &mut Option<Observed>,
    t: LeaseTimings,
) -> Result<bool, kube::Error> {
    let now = Instant::now();
    let current = api.get_opt(name).await?;
    if let Some(l) = &current {
        let (holder, renew_time) = holder_of(l);
        let changed = observed
            .as_ref()
            .is_none_or(|o| o.holder != holder || o.renew_time != renew_time);
        if changed {
            *observed = Some(Observed {
                holder,
                renew_time,
                since: now,
            });
        }
    } else {
        *observed = None;
    }
    if decide(me, observed.as_ref(), now, t.lease_duration) == Decision::Wait {
        return Ok(false);
    }
    let stamp = MicroTime(jiff::Timestamp::now());
    let result = match current {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.into()),
                    lease_duration_seconds: Some(t.lease_duration.as_secs() as i32),
                    acquire_time: Some(stamp.clone()),
                    renew_time: Some(stamp),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() != Some(me) {
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                spec.acquire_time = Some(stamp.clone());
                spec.holder_identity = Some(me.into());
            }
            spec.lease_duration_seconds = Some(t.lease_duration.as_secs() as i32);
            spec.renew_time = Some(stamp);
            // `replace` sends metadata.resourceVersion: a concurrent writer makes this fail (409).
            api.replace(name, &PostParams::default(), &lease).await
        }
    };
    match result {
        Ok(l) => {
            let (holder, renew_time) = holder_of(&l);
            *observed = Some(Observed {
                holder,
                renew_time,
                since: Instant::now(),
            });
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timings_check_refuses_a_renew_deadline_not_below_the_lease() {
        let ok = LeaseTimings::default();
        assert_eq!(ok.check(), Ok(ok));
        let equal = LeaseTimings {
            renew_deadline: ok.lease_duration,
            ..ok
        };
        let e = equal.check().unwrap_err();
        assert!(
            e.contains("--renew-deadline (15 s)") && e.contains("--lease-duration (15 s)"),
            "{e}"
        );
        let longer = LeaseTimings {
            renew_deadline: Duration::from_secs(20),
            ..ok
        };
        assert!(longer.check().is_err());
        let slow_retry = LeaseTimings {
            retry_period: Duration::from_secs(10),
            ..ok
        };
        assert!(
            slow_retry
                .check()
                .unwrap_err()
                .contains("--retry-period (10 s)")
        );
        let zero_retry = LeaseTimings {
            retry_period: Duration::ZERO,
            ..ok
        };
        assert!(zero_retry.check().is_err());
    }

    const D: Duration = Duration::from_secs(15);

    fn seen(holder: &str, since: Instant) -> Observed {
        Observed {
            holder: Some(holder.into()),
            renew_time: Some("t".into()),
            since,
        }
    }

    #[test]
    fn claims_a_missing_or_empty_lease() {
        let now = Instant::now();
        assert_eq!(decide("a", None, now, D), Decision::Claim);
        let empty = Observed {
            holder: None,
            renew_time: None,
            since: now,
        };
        assert_eq!(decide("a", Some(&empty), now, D), Decision::Claim);
    }

    #[test]
    fn renews_its_own_lease() {
        let now = Instant::now();
        assert_eq!(decide("a", Some(&seen("a", now)), now, D), Decision::Claim);
    }

    #[test]
    fn waits_for_a_live_holder_and_takes_over_only_after_a_full_duration() {
        let t0 = Instant::now();
        let o = seen("b", t0);
        assert_eq!(decide("a", Some(&o), t0, D), Decision::Wait);
        assert_eq!(
            decide("a", Some(&o), t0 + D - Duration::from_millis(1), D),
            Decision::Wait
        );
        assert_eq!(decide("a", Some(&o), t0 + D, D), Decision::Claim);
    }
}
