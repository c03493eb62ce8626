//! Pure decisions of the Session controller: launch checks, placement, profile zone, and the
//! phase observed from the pod. No I/O, no clock.

use crate::controller::cached::CachedPod;

use super::build::Placement;
use crate::crd::v1alpha1::{DesiredState, ProfileMode, SessionPhase};

/// Why a launch (or a state change) is refused: a CamelCase reason and a message that names the
/// objects and fields involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Condition reason / event reason.
    pub reason: &'static str,
    /// Human-readable explanation.
    pub message: String,
}

impl Refusal {
    /// A refusal.
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// The condition types of a Session's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    /// The session can be used now (its pod runs and access is open).
    Ready,
    /// The launch checks passed (False: refused, with the reason).
    Admitted,
    /// A stopped session's resume (False: refused, with the reason).
    Resumed,
    /// A requested state change (False: refused, with the reason).
    StateChange,
}

impl Cond {
    /// The type as written in the status.
    pub const fn as_str(self) -> &'static str {
        match self {
            Cond::Ready => "Ready",
            Cond::Admitted => "Admitted",
            Cond::Resumed => "Resumed",
            Cond::StateChange => "StateChange",
        }
    }
}

/// When the session really started: the pod's Ready transition. The API server records it in
/// whole seconds, so the next whole second stands for it (never before the real start, at most
/// a second after); `now` when it comes first (the start seen at once) or is not known.
pub fn started_at(pod: &CachedPod, now: jiff::Timestamp) -> jiff::Timestamp {
    let ready_since = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0);
    match ready_since.and_then(|t| t.checked_add(jiff::SignedDuration::from_secs(1)).ok()) {
        Some(t) => t.min(now),
        None => now,
    }
}

/// Whether a refusal recorded in `old` is final for the session at `generation`: a refused
/// launch always (the session never starts later on its own; the person launches again), a
/// refused resume until the session's spec changes.
pub fn refusal_is_final(
    old: &crate::crd::v1alpha1::SessionStatus,
    generation: Option<i64>,
) -> bool {
    match old.phase {
        Some(SessionPhase::Refused) => true,
        Some(SessionPhase::Stopped) => old.conditions.iter().any(|c| {
            c.type_ == Cond::Resumed.as_str()
                && c.status == "False"
                && c.observed_generation == generation
        }),
        _ => false,
    }
}

/// Condition reasons.
pub mod reasons {
    /// Running, ready for use.
    pub const RUNNING: &str = "Running";
    /// Paused: access cut.
    pub const PAUSED: &str = "Paused";
    /// Stopped: pod removed, volumes kept.
    pub const STOPPED: &str = "Stopped";
    /// The referenced User does not exist.
    pub const USER_NOT_FOUND: &str = "UserNotFound";
    /// The referenced Workspace does not exist.
    pub const WORKSPACE_NOT_FOUND: &str = "WorkspaceNotFound";
    /// The user is disabled (locked).
    pub const USER_DISABLED: &str = "UserDisabled";
    /// No group of the user may use the workspace.
    pub const NOT_ALLOWED: &str = "WorkspaceNotAllowed";
    /// maxKasmsPerUser reached.
    pub const MAX_SESSIONS: &str = "MaxSessionsReached";
    /// The usage budget is spent.
    pub const USAGE_EXHAUSTED: &str = "UsageLimitExhausted";
    /// Assignment-enabled pool without an assigned server.
    pub const NO_ASSIGNED_SERVER: &str = "NoAssignedServer";
    /// Zone requested without allowZoneSelection.
    pub const ZONE_NOT_ALLOWED: &str = "ZoneSelectionNotAllowed";
    /// No capacity (or no node) in the requested zone.
    pub const NO_CAPACITY_IN_ZONE: &str = "NoCapacityInZone";
    /// No server of the pool has capacity.
    pub const NO_CAPACITY: &str = "NoServerCapacity";
    /// Persistent profile requested without allowPersistentProfile.
    pub const PROFILE_NOT_ALLOWED: &str = "PersistentProfileNotAllowed";
    /// The profile volume is in another zone than the one requested or available.
    pub const PROFILE_ZONE: &str = "ProfileZoneConflict";
    /// Stop requested without allowKasmStop.
    pub const STOP_NOT_ALLOWED: &str = "StopNotAllowed";
    /// Pause requested without allowKasmPause.
    pub const PAUSE_NOT_ALLOWED: &str = "PauseNotAllowed";
    /// A reference is broken (pool, server) in a way the user cannot fix.
    pub const CONFIGURATION: &str = "ConfigurationError";
    /// Admitted.
    pub const ADMITTED: &str = "Admitted";
    /// The user's profile claim mounts on one node (or one pod) at a time, and another session
    /// has it where this one cannot go.
    pub const PROFILE_IN_USE: &str = "ProfileClaimInUse";
    /// The API server rejected the session pod (invalid spec or admission).
    pub const POD_REJECTED: &str = "PodRejected";
}

/// What the launch checks look at.
#[derive(Debug, Clone, Default)]
pub struct AdmissionInputs {
    /// `spec.user` (for messages).
    pub user: String,
    /// `spec.workspace` (for messages).
    pub workspace: String,
    /// The User exists.
    pub user_found: bool,
    /// The User is disabled.
    pub user_disabled: bool,
    /// The Workspace exists.
    pub workspace_found: bool,
    /// A denial from the access rules (groups, assignment), with its reason.
    pub access_denial: Option<Refusal>,
    /// maxKasmsPerUser (None: unlimited).
    pub max_sessions: Option<u32>,
    /// Active sessions of the same user that come before this one.
    pub earlier_active: u32,
    /// Usage budget spent: the message (with the window and the figures).
    pub usage_exhausted: Option<String>,
    /// `spec.zone`.
    pub requested_zone: Option<String>,
    /// allowZoneSelection.
    pub allow_zone_selection: bool,
    /// `spec.persistentProfile`.
    pub requested_profile: Option<ProfileMode>,
    /// allowPersistentProfile.
    pub allow_persistent_profile: bool,
    /// The workspace configures a persistent profile.
    pub workspace_has_profile: bool,
}

/// The launch checks, in a fixed order; the first failing one is the reason.
pub fn admit(i: &AdmissionInputs) -> Result<(), Refusal> {
    use reasons::*;
    if !i.user_found {
        return Err(Refusal::new(
            USER_NOT_FOUND,
            format!(
                "spec.user: User {:?} does not exist in this namespace",
                i.user
            ),
        ));
    }
    if !i.workspace_found {
        return Err(Refusal::new(
            WORKSPACE_NOT_FOUND,
            format!(
                "spec.workspace: Workspace {:?} does not exist in this namespace",
                i.workspace
            ),
        ));
    }
    if i.user_disabled {
        return Err(Refusal::new(
            USER_DISABLED,
            format!(
                "User {:?} is disabled (spec.disabled: true); it cannot start sessions until re-enabled",
                i.user
            ),
        ));
    }
    if let Some(d) = &i.access_denial {
        return Err(d.clone());
    }
    if let Some(max) = i.max_sessions
        && i.earlier_active >= max
    {
        return Err(Refusal::new(
            MAX_SESSIONS,
            format!(
                "User {:?} already has {} active session(s); maxKasmsPerUser is {max}",
                i.user, i.earlier_active
            ),
        ));
    }
    if let Some(msg) = &i.usage_exhausted {
        return Err(Refusal::new(USAGE_EXHAUSTED, msg.clone()));
    }
    if let Some(z) = &i.requested_zone
        && !i.allow_zone_selection
    {
        return Err(Refusal::new(
            ZONE_NOT_ALLOWED,
            format!(
                "spec.zone: {z:?} requested, but none of the user's groups sets allowZoneSelection: true"
            ),
        ));
    }
    if matches!(
        i.requested_profile,
        Some(ProfileMode::Enabled | ProfileMode::Reset)
    ) {
        if !i.workspace_has_profile {
            return Err(Refusal::new(
                CONFIGURATION,
                format!(
                    "spec.persistentProfile: {:?} requested, but Workspace {:?} has no persistentProfile",
                    i.requested_profile.unwrap_or(ProfileMode::Enabled),
                    i.workspace
                ),
            ));
        }
        if !i.allow_persistent_profile {
            return Err(Refusal::new(
                PROFILE_NOT_ALLOWED,
                "spec.persistentProfile requested, but none of the user's groups sets allowPersistentProfile: true",
            ));
        }
    }
    Ok(())
}

/// The profile mode that applies: an explicit request, else Enabled when the workspace has a
/// profile and the user may use it, else Disabled.
pub fn profile_mode(i: &AdmissionInputs) -> ProfileMode {
    match i.requested_profile {
        Some(m) => m,
        None if i.workspace_has_profile && i.allow_persistent_profile => ProfileMode::Enabled,
        None => ProfileMode::Disabled,
    }
}

/// A server the session could go to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerCandidate {
    /// Server name.
    pub name: String,
    /// Its node.
    pub node: String,
    /// Its zone, if known.
    pub zone: Option<String>,
    /// Sessions on it now (including reservations).
    pub load: u32,
    /// maxSessions (None: unlimited).
    pub capacity: Option<u32>,
}

/// How the workspace places sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolKind {
    /// No pool: the scheduler; `zones` are the zones that have nodes.
    None {
        /// Zones with at least one node.
        zones: Vec<String>,
    },
    /// A pool of servers (already filtered to the user's assigned ones when assignment is on).
    Servers {
        /// Pool name.
        pool: String,
        /// Candidates.
        candidates: Vec<ServerCandidate>,
    },
    /// An autoscaled pool.
    Autoscale {
        /// Pool name.
        pool: String,
        /// Its node selector.
        node_selector: std::collections::BTreeMap<String, String>,
        /// Zones with at least one matching node.
        zones: Vec<String>,
    },
}

/// Picks where the session runs. The zone is the requested one or the profile's; a named zone
/// is never substituted; among servers, the least loaded with room wins (ties by name).
pub fn place(
    pool: &PoolKind,
    requested_zone: Option<&str>,
    profile_zone: Option<&str>,
) -> Result<Placement, Refusal> {
    use reasons::*;
    if let (Some(r), Some(p)) = (requested_zone, profile_zone)
        && r != p
    {
        return Err(Refusal::new(
            PROFILE_ZONE,
            format!(
                "spec.zone is {r:?}, but the user's profile volume is bound to zone {p:?}; request zone {p:?} or no zone"
            ),
        ));
    }
    let zone = requested_zone.or(profile_zone);
    let why_zone = |z: &str| {
        if requested_zone.is_some() {
            format!("requested zone {z:?}")
        } else {
            format!("zone {z:?} of the user's profile volume")
        }
    };
    match pool {
        PoolKind::None { zones } | PoolKind::Autoscale { zones, .. } => {
            if let Some(z) = zone
                && !zones.iter().any(|x| x == z)
            {
                let reason = if requested_zone.is_some() {
                    NO_CAPACITY_IN_ZONE
                } else {
                    PROFILE_ZONE
                };
                return Err(Refusal::new(
                    reason,
                    format!("no node is available in the {}", why_zone(z)),
                ));
            }
            Ok(match pool {
                PoolKind::Autoscale { node_selector, .. } => Placement::Autoscale {
                    node_selector: node_selector.clone(),
                    zone: zone.map(String::from),
                },
                _ => Placement::Scheduler {
                    zone: zone.map(String::from),
                },
            })
        }
        PoolKind::Servers { pool, candidates } => {
            let in_zone: Vec<&ServerCandidate> = candidates
                .iter()
                .filter(|c| zone.is_none_or(|z| c.zone.as_deref() == Some(z)))
                .collect();
            if let Some(z) = zone
                && in_zone.is_empty()
            {
                let reason = if requested_zone.is_some() {
                    NO_CAPACITY_IN_ZONE
                } else {
                    PROFILE_ZONE
                };
                return Err(Refusal::new(
                    reason,
                    format!(
                        "ServerPool {pool:?} has no server available to the user in the {}",
                        why_zone(z)
                    ),
                ));
            }
            let best = in_zone
                .iter()
                .filter(|c| c.capacity.is_none_or(|cap| c.load < cap))
                .min_by(|a, b| a.load.cmp(&b.load).then_with(|| a.name.cmp(&b.name)));
            match best {
                Some(c) => Ok(Placement::Server {
                    server: c.name.clone(),
                    node: c.node.clone(),
                    zone: c.zone.clone(),
                }),
                None if zone.is_some() => Err(Refusal::new(
                    NO_CAPACITY_IN_ZONE,
                    format!(
                        "every server of ServerPool {pool:?} in the {} is full (maxSessions)",
                        why_zone(zone.unwrap_or_default())
                    ),
                )),
                None if in_zone.is_empty() => Err(Refusal::new(
                    NO_CAPACITY,
                    format!("ServerPool {pool:?} has no server available to the user"),
                )),
                None => Err(Refusal::new(
                    NO_CAPACITY,
                    format!(
                        "every server of ServerPool {pool:?} available to the user is full (maxSessions)"
                    ),
                )),
            }
        }
    }
}

/// Another session of the same user that has the profile claim mounted (or is about to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimHolder {
    /// The claim.
    pub claim: String,
    /// The session holding it.
    pub session: String,
    /// The node its pod runs on (None: not placed yet).
    pub node: Option<String>,
    /// How the claim may be mounted.
    pub reach: ClaimReach,
}

/// How many mounts a profile claim allows at a time (from its access modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimReach {
    /// Any number of nodes (ReadWriteMany, ReadOnlyMany): no rule.
    ManyNodes,
    /// One node (ReadWriteOnce, the default): every pod on that node.
    OneNode,
    /// One pod (ReadWriteOncePod).
    OnePod,
}

/// Whether the launch must wait for the claim's holder to be placed: a claim one node mounts,
/// held by a session whose pod has no node yet (two sessions of one user created together).
/// Not a refusal, since refusals are final: the launch looks again once the holder is placed,
/// and [`place_with_claim`] then follows it to its node.
pub fn waits_for_holder(holder: Option<&ClaimHolder>) -> bool {
    holder.is_some_and(|h| h.reach == ClaimReach::OneNode && h.node.is_none())
}

/// The placement rule of a profile claim another session holds: with [`ClaimReach::OneNode`]
/// the session goes to the holder's node (a server on that node for a pool of servers), or is
/// refused with [`reasons::PROFILE_IN_USE`] saying why; with [`ClaimReach::OnePod`] it is refused.
/// Without a holder (or for a claim many nodes mount), [`place`] alone decides.
pub fn place_with_claim(
    pool: &PoolKind,
    requested_zone: Option<&str>,
    profile_zone: Option<&str>,
    holder: Option<&ClaimHolder>,
) -> Result<Placement, Refusal> {
    use reasons::PROFILE_IN_USE;
    let Some(h) = holder.filter(|h| h.reach != ClaimReach::ManyNodes) else {
        return place(pool, requested_zone, profile_zone);
    };
    let held = format!(
        "profile claim {:?} is mounted by session {:?}",
        h.claim, h.session
    );
    let node = match (&h.reach, &h.node) {
        (ClaimReach::OnePod, _) => {
            return Err(Refusal::new(
                PROFILE_IN_USE,
                format!(
                    "{held}, and its access mode (ReadWriteOncePod) allows one pod at a time; end that session first"
                ),
            ));
        }
        (_, None) => {
            return Err(Refusal::new(
                PROFILE_IN_USE,
                format!(
                    "{held}, whose pod is not placed on a node yet, and the claim (ReadWriteOnce) mounts on one node at a time; launch again once it runs"
                ),
            ));
        }
        (_, Some(n)) => n.clone(),
    };
    let on_node = |r: Refusal| {
        Refusal::new(
            PROFILE_IN_USE,
            format!(
                "{held} on node {node:?}, and the claim (ReadWriteOnce) mounts on one node at a time: this session can only run there, but {}",
                r.message
            ),
        )
    };
    match pool {
        PoolKind::Servers { pool, candidates } => {
            let there: Vec<ServerCandidate> = candidates
                .iter()
                .filter(|c| c.node == node)
                .cloned()
                .collect();
            if there.is_empty() {
                return Err(on_node(Refusal::new(
                    PROFILE_IN_USE,
                    format!(
                        "no server of ServerPool {pool:?} available to the user is on that node"
                    ),
                )));
            }
            let narrowed = PoolKind::Servers {
                pool: pool.clone(),
                candidates: there,
            };
            place(&narrowed, requested_zone, profile_zone).map_err(on_node)
        }
        PoolKind::None { .. } | PoolKind::Autoscale { .. } => {
            match place(pool, requested_zone, profile_zone) {
                Ok(Placement::Scheduler { zone }) => Ok(Placement::OnNode {
                    node,
                    node_selector: Default::default(),
                    zone,
                }),
                Ok(Placement::Autoscale {
                    node_selector,
                    zone,
                }) => Ok(Placement::OnNode {
                    node,
                    node_selector,
                    zone,
                }),
                Ok(other) => Ok(other),
                Err(r) => Err(r),
            }
        }
    }
}

/// Whether a requested state change is allowed; stop and pause need their permissions.
pub fn check_state_change(
    desired: DesiredState,
    allow_stop: bool,
    allow_pause: bool,
    by_expiry: bool,
) -> Result<(), Refusal> {
    use reasons::*;
    match desired {
        DesiredState::Stopped if !allow_stop && !by_expiry => Err(Refusal::new(
            STOP_NOT_ALLOWED,
            "spec.state: Stopped requested, but none of the user's groups sets allowKasmStop: true; the session keeps running",
        )),
        DesiredState::Paused if !allow_pause && !by_expiry => Err(Refusal::new(
            PAUSE_NOT_ALLOWED,
            "spec.state: Paused requested, but none of the user's groups sets allowKasmPause: true; the session keeps running",
        )),
        _ => Ok(()),
    }
}

/// What the pod says about the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The phase.
    pub phase: SessionPhase,
    /// The node, once scheduled.
    pub node: Option<String>,
    /// The pod is Ready.
    pub ready: bool,
    /// Why not ready, when known (scheduler or container message).
    pub message: Option<String>,
    /// What holds a pending pod up, when it needs attention (the scheduler cannot place it, an
    /// image cannot be pulled, a container cannot be created): `Reason: message`. None while it
    /// is merely on its way (scheduled, volumes being provisioned, image being pulled).
    pub problem: Option<String>,
}

/// Container waiting reasons that are part of a normal start.
const STARTING: &[&str] = &["ContainerCreating", "PodInitializing"];

/// Whether a scheduler's message says the pod waits for its claims: one the scheduler has not
/// seen yet (`persistentvolumeclaim "..." not found`, while its cache catches up with a claim
/// created just before the pod) or one with immediate binding not bound yet. Either passes on
/// its own in moments; it is a problem only if it lasts.
pub fn waits_for_claims(message: &str) -> bool {
    let not_seen = message
        .split("persistentvolumeclaim \"")
        .skip(1)
        .any(|rest| {
            rest.split_once('"')
                .is_some_and(|(_, after)| after.starts_with(" not found"))
        });
    not_seen || message.contains("pod has unbound immediate PersistentVolumeClaims")
}

/// What holds a pending pod up, if anything needs attention (see [`Observed::problem`]).
pub fn pending_problem(pod: &CachedPod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let unscheduled = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False");
    if let Some(c) = unscheduled {
        let reason = c.reason.as_deref().unwrap_or("Unschedulable");
        return Some(match c.message.as_deref() {
            Some(m) if !m.is_empty() => format!("{reason}: {m}"),
            _ => reason.to_string(),
        });
    }
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .filter_map(|c| c.state.as_ref()?.waiting.as_ref())
        .find(|w| w.reason.as_deref().is_some_and(|r| !STARTING.contains(&r)))
        .map(|w| {
            let reason = w.reason.clone().unwrap_or_default();
            match w.message.as_deref() {
                Some(m) if !m.is_empty() => format!("{reason}: {m}"),
                _ => reason,
            }
        })
}

/// The session's phase from its pod (when it should be running or paused).
pub fn observe(pod: Option<&CachedPod>, paused: bool) -> Observed {
    let Some(pod) = pod else {
        return Observed {
            phase: SessionPhase::Pending,
            node: None,
            ready: false,
            message: None,
            problem: None,
        };
    };
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let conds = status.and_then(|s| s.conditions.as_ref());
    let ready = conds.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let message = conds
        .and_then(|c| {
            c.iter()
                .find(|c| c.status == "False" && c.message.is_some())
        })
        .and_then(|c| c.message.clone())
        .or_else(|| status.and_then(|s| s.message.clone()));
    let phase = match phase {
        "Failed" => SessionPhase::Failed,
        "Succeeded" => SessionPhase::Failed,
        "Running" if ready && paused => SessionPhase::Paused,
        "Running" if ready => SessionPhase::Running,
        _ => SessionPhase::Pending,
    };
    let problem = if phase == SessionPhase::Pending {
        pending_problem(pod)
    } else {
        None
    };
    Observed {
        phase,
        node,
        ready,
        message,
        problem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launch_waits_for_an_unplaced_holder_of_a_one_node_claim_instead_of_refusing() {
        let holder = |reach, node: Option<&str>| ClaimHolder {
            claim: "profile-bob".into(),
            session: "bob-1".into(),
            node: node.map(str::to_owned),
            reach,
        };
        assert!(waits_for_holder(Some(&holder(ClaimReach::OneNode, None))));
        assert!(!waits_for_holder(Some(&holder(
            ClaimReach::OneNode,
            Some("n1")
        ))));
        assert!(
            !waits_for_holder(Some(&holder(ClaimReach::OnePod, None))),
            "refused instead"
        );
        assert!(!waits_for_holder(Some(&holder(
            ClaimReach::ManyNodes,
            None
        ))));
        assert!(!waits_for_holder(None));
    }

    fn ok_inputs() -> AdmissionInputs {
        AdmissionInputs {
            user: "alice".into(),
            workspace: "desktop".into(),
            user_found: true,
            workspace_found: true,
            ..Default::default()
        }
    }

    #[test]
    fn admits_a_plain_request() {
        assert_eq!(admit(&ok_inputs()), Ok(()));
    }

    #[test]
    fn each_check_refuses_with_its_reason() {
        let cases: Vec<(Box<dyn Fn(&mut AdmissionInputs)>, &str)> = vec![
            (Box::new(|i| i.user_found = false), reasons::USER_NOT_FOUND),
            (
                Box::new(|i| i.workspace_found = false),
                reasons::WORKSPACE_NOT_FOUND,
            ),
            (Box::new(|i| i.user_disabled = true), reasons::USER_DISABLED),
            (
                Box::new(|i| i.access_denial = Some(Refusal::new(reasons::NOT_ALLOWED, "no"))),
                reasons::NOT_ALLOWED,
            ),
            (
                Box::new(|i| {
                    i.max_sessions = Some(2);
                    i.earlier_active = 2;
                }),
                reasons::MAX_SESSIONS,
            ),
            (
                Box::new(|i| i.usage_exhausted = Some("spent".into())),
                reasons::USAGE_EXHAUSTED,
            ),
            (
                Box::new(|i| i.requested_zone = Some("zone-a".into())),
                reasons::ZONE_NOT_ALLOWED,
            ),
            (
                Box::new(|i| {
                    i.requested_profile = Some(ProfileMode::Enabled);
                    i.workspace_has_profile = true;
                }),
                reasons::PROFILE_NOT_ALLOWED,
            ),
        ];
        for (mutate, reason) in cases {
            let mut i = ok_inputs();
            mutate(&mut i);
            assert_eq!(admit(&i).unwrap_err().reason, reason);
        }
    }

    #[test]
    fn max_sessions_counts_only_earlier_sessions() {
        let mut i = ok_inputs();
        i.max_sessions = Some(2);
        i.earlier_active = 1;
        assert!(admit(&i).is_ok());
        i.max_sessions = Some(0);
        i.earlier_active = 0;
        assert_eq!(admit(&i).unwrap_err().reason, reasons::MAX_SESSIONS);
    }

    #[test]
    fn profile_defaults_to_enabled_only_when_allowed_and_configured() {
        let mut i = ok_inputs();
        assert_eq!(profile_mode(&i), ProfileMode::Disabled);
        i.workspace_has_profile = true;
        assert_eq!(profile_mode(&i), ProfileMode::Disabled);
        i.allow_persistent_profile = true;
        assert_eq!(profile_mode(&i), ProfileMode::Enabled);
        i.requested_profile = Some(ProfileMode::Reset);
        assert_eq!(profile_mode(&i), ProfileMode::Reset);
    }

    fn cand(name: &str, zone: &str, load: u32, cap: Option<u32>) -> ServerCandidate {
        ServerCandidate {
            name: name.into(),
            node: format!("node-{name}"),
            zone: Some(zone.into()),
            load,
            capacity: cap,
        }
    }

    #[test]
    fn least_loaded_server_with_room_wins() {
        let pool = PoolKind::Servers {
            pool: "p".into(),
            candidates: vec![
                cand("a", "z1", 3, Some(4)),
                cand("b", "z1", 1, Some(1)),
                cand("c", "z2", 2, None),
            ],
        };
        match place(&pool, None, None).unwrap() {
            Placement::Server { server, .. } => assert_eq!(server, "c"),
            other => panic!("{other:?}"),
        }
        match place(&pool, Some("z1"), None).unwrap() {
            Placement::Server { server, .. } => assert_eq!(server, "a"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_named_zone_is_never_substituted() {
        let pool = PoolKind::Servers {
            pool: "p".into(),
            candidates: vec![cand("a", "z1", 4, Some(4)), cand("b", "z2", 0, None)],
        };
        assert_eq!(
            place(&pool, Some("z1"), None).unwrap_err().reason,
            reasons::NO_CAPACITY_IN_ZONE
        );
        assert_eq!(
            place(&pool, Some("z3"), None).unwrap_err().reason,
            reasons::NO_CAPACITY_IN_ZONE
        );
        let sched = PoolKind::None {
            zones: vec!["z1".into()],
        };
        assert_eq!(
            place(&sched, Some("z2"), None).unwrap_err().reason,
            reasons::NO_CAPACITY_IN_ZONE
        );
        assert_eq!(
            place(&sched, Some("z1"), None).unwrap(),
            Placement::Scheduler {
                zone: Some("z1".into())
            }
        );
    }

    #[test]
    fn a_session_follows_its_profile_zone_or_is_refused() {
        let sched = PoolKind::None {
            zones: vec!["z1".into(), "z2".into()],
        };
        assert_eq!(
            place(&sched, None, Some("z2")).unwrap(),
            Placement::Scheduler {
                zone: Some("z2".into())
            }
        );
        assert_eq!(
            place(&sched, Some("z1"), Some("z2")).unwrap_err().reason,
            reasons::PROFILE_ZONE
        );
        let pool = PoolKind::Servers {
            pool: "p".into(),
            candidates: vec![cand("a", "z1", 0, None)],
        };
        assert_eq!(
            place(&pool, None, Some("z2")).unwrap_err().reason,
            reasons::PROFILE_ZONE
        );
    }

    #[test]
    fn full_pool_is_refused_with_capacity_reason() {
        let pool = PoolKind::Servers {
            pool: "p".into(),
            candidates: vec![cand("a", "z1", 1, Some(1))],
        };
        assert_eq!(
            place(&pool, None, None).unwrap_err().reason,
            reasons::NO_CAPACITY
        );
        let empty = PoolKind::Servers {
            pool: "p".into(),
            candidates: vec![],
        };
        assert_eq!(
            place(&empty, None, None).unwrap_err().reason,
            reasons::NO_CAPACITY
        );
    }

    #[test]
    fn stop_and_pause_need_permission_unless_the_expiry_asks() {
        assert!(check_state_change(DesiredState::Stopped, false, false, false).is_err());
        assert!(check_state_change(DesiredState::Stopped, true, false, false).is_ok());
        assert!(check_state_change(DesiredState::Paused, true, false, false).is_err());
        assert!(check_state_change(DesiredState::Paused, false, false, true).is_ok());
        assert!(check_state_change(DesiredState::Running, false, false, false).is_ok());
    }

    fn pending_pod(status: serde_json::Value) -> CachedPod {
        crate::controller::fixtures::pod(None, None, status)
    }

    #[test]
    fn a_pod_on_its_way_has_no_problem() {
        let creating = pending_pod(serde_json::json!({
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": "session", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}],
        }));
        assert_eq!(pending_problem(&creating), None);
        assert_eq!(observe(Some(&creating), false).problem, None);
        // Not yet looked at by the scheduler (or waiting for its volumes): no condition at all.
        assert_eq!(
            pending_problem(&pending_pod(serde_json::json!({"phase": "Pending"}))),
            None
        );
    }

    #[test]
    fn unschedulable_and_image_errors_are_problems() {
        let unschedulable = pending_pod(serde_json::json!({
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient memory."}],
        }));
        assert_eq!(
            pending_problem(&unschedulable).as_deref(),
            Some("Unschedulable: 0/3 nodes are available: 3 Insufficient memory.")
        );
        let pull = pending_pod(serde_json::json!({
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "initContainerStatuses": [{"name": "init", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": "PodInitializing"}}}],
            "containerStatuses": [{"name": "session", "image": "i", "imageID": "", "ready": false,
                "restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff",
                "message": "Back-off pulling image"}}}],
        }));
        assert_eq!(
            observe(Some(&pull), false).problem.as_deref(),
            Some("ImagePullBackOff: Back-off pulling image")
        );
        // A running pod has no pending problem, whatever its containers say.
        let running = pending_pod(serde_json::json!({
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
        }));
        assert_eq!(observe(Some(&running), false).problem, None);
    }

    fn pod_ready_since(t: Option<&str>) -> CachedPod {
        let status = serde_json::json!({"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": t}
        ]});
        crate::controller::fixtures::pod(None, None, status)
    }

    #[test]
    fn a_session_starts_when_its_pod_became_ready_never_earlier() {
        let ts = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        let pod = pod_ready_since(Some("2026-01-01T10:00:33Z"));
        // Seen at once: now (the Ready time is whole seconds; the real start is in [33, 34)).
        assert_eq!(
            started_at(&pod, ts("2026-01-01T10:00:33.717Z")),
            ts("2026-01-01T10:00:33.717Z")
        );
        // Seen late (a slow reconcile): the next whole second after the Ready time, at most a
        // second after the real start and never before it.
        assert_eq!(
            started_at(&pod, ts("2026-01-01T10:00:38.707Z")),
            ts("2026-01-01T10:00:34Z")
        );
        // Unknown: now.
        let pod = pod_ready_since(None);
        assert_eq!(
            started_at(&pod, ts("2026-01-01T10:00:38.707Z")),
            ts("2026-01-01T10:00:38.707Z")
        );
    }

    #[test]
    fn refusals_are_final_and_a_refused_resume_waits_for_a_spec_change() {
        use crate::crd::v1alpha1::SessionStatus;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
        let cond = |type_: Cond, status: &str, generation: i64| Condition {
            type_: type_.as_str().into(),
            status: status.into(),
            reason: reasons::MAX_SESSIONS.into(),
            message: String::new(),
            observed_generation: Some(generation),
            last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
        };
        let st = |phase: Option<SessionPhase>, conditions: Vec<Condition>| SessionStatus {
            phase,
            conditions,
            ..Default::default()
        };
        let refused = st(
            Some(SessionPhase::Refused),
            vec![cond(Cond::Admitted, "False", 1)],
        );
        assert!(refusal_is_final(&refused, Some(1)));
        assert!(
            refusal_is_final(&refused, Some(2)),
            "whatever changes later"
        );
        let resume_refused = st(
            Some(SessionPhase::Stopped),
            vec![cond(Cond::Resumed, "False", 3)],
        );
        assert!(refusal_is_final(&resume_refused, Some(3)));
        assert!(!refusal_is_final(&resume_refused, Some(4)), "asked again");
        for phase in [
            None,
            Some(SessionPhase::Pending),
            Some(SessionPhase::Running),
            Some(SessionPhase::Paused),
            Some(SessionPhase::Stopped),
            Some(SessionPhase::Failed),
        ] {
            assert!(!refusal_is_final(&st(phase, vec![]), Some(1)), "{phase:?}");
        }
    }

    fn candidate(name: &str, node: &str, load: u32, capacity: Option<u32>) -> ServerCandidate {
        ServerCandidate {
            name: name.into(),
            node: node.into(),
            zone: None,
            load,
            capacity,
        }
    }

    fn holder(node: Option<&str>, reach: ClaimReach) -> ClaimHolder {
        ClaimHolder {
            claim: "profile-bob".into(),
            session: "bob-1".into(),
            node: node.map(String::from),
            reach,
        }
    }

    #[test]
    fn a_second_session_follows_its_single_node_claim_or_is_refused_saying_so() {
        let sched = PoolKind::None {
            zones: vec!["zone-a".into()],
        };
        // No holder, or a claim many nodes mount: placement as usual.
        assert_eq!(
            place_with_claim(&sched, None, None, None),
            Ok(Placement::Scheduler { zone: None })
        );
        assert_eq!(
            place_with_claim(
                &sched,
                None,
                None,
                Some(&holder(Some("n1"), ClaimReach::ManyNodes))
            ),
            Ok(Placement::Scheduler { zone: None })
        );
        // ReadWriteOnce held on n1: pinned there.
        assert_eq!(
            place_with_claim(
                &sched,
                None,
                None,
                Some(&holder(Some("n1"), ClaimReach::OneNode))
            ),
            Ok(Placement::OnNode {
                node: "n1".into(),
                node_selector: Default::default(),
                zone: None
            })
        );
        // An autoscaled pool keeps its selector on that node.
        let auto = PoolKind::Autoscale {
            pool: "gpu".into(),
            node_selector: [("gpu".to_string(), "yes".to_string())].into(),
            zones: vec![],
        };
        assert!(matches!(
            place_with_claim(&auto, None, None, Some(&holder(Some("n1"), ClaimReach::OneNode))),
            Ok(Placement::OnNode { node, node_selector, .. }) if node == "n1" && node_selector.len() == 1
        ));
        // A pool of servers: the server on that node, even if another is less loaded.
        let servers = PoolKind::Servers {
            pool: "p".into(),
            candidates: vec![
                candidate("ws-a", "n0", 0, None),
                candidate("ws-b", "n1", 3, None),
            ],
        };
        assert!(matches!(
            place_with_claim(&servers, None, None, Some(&holder(Some("n1"), ClaimReach::OneNode))),
            Ok(Placement::Server { server, .. }) if server == "ws-b"
        ));
        // Refused, saying why: no server there, the server there is full, the holder not placed
        // yet, or a claim of one pod.
        let refused = |pool: &PoolKind, h: ClaimHolder| {
            let r = place_with_claim(pool, None, None, Some(&h)).unwrap_err();
            assert_eq!(r.reason, reasons::PROFILE_IN_USE);
            assert!(
                r.message.contains("profile-bob") && r.message.contains("bob-1"),
                "{}",
                r.message
            );
            r.message
        };
        assert!(refused(&servers, holder(Some("n9"), ClaimReach::OneNode)).contains("n9"));
        let full = PoolKind::Servers {
            pool: "p".into(),
            candidates: vec![
                candidate("ws-a", "n0", 0, None),
                candidate("ws-b", "n1", 1, Some(1)),
            ],
        };
        assert!(refused(&full, holder(Some("n1"), ClaimReach::OneNode)).contains("full"));
        assert!(refused(&sched, holder(None, ClaimReach::OneNode)).contains("not placed"));
        assert!(
            refused(&sched, holder(Some("n1"), ClaimReach::OnePod)).contains("ReadWriteOncePod")
        );
    }
}
