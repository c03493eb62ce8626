//! The gateway's decisions, pure: where a host name goes, what a session's state allows, what a
//! ticket or cookie says, when a keepalive is due. Inputs and `now` in, a decision out.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::crd::v1alpha1::{DesiredState, Session, SessionPhase, Workspace, WorkspaceSpec};

/// Where a request's host name sends it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The base domain: the portal (login, hand-off to sessions).
    Portal,
    /// `<label>.<base domain>`: the session whose host label is this.
    Session(String),
    /// Anything else.
    Unknown,
}

/// Routes `host` (a `Host` header, with or without a port) against `base` (the base domain).
pub fn route(host: &str, base: &str) -> Route {
    let host = strip_port(host).trim_end_matches('.').to_ascii_lowercase();
    let base = base.trim_end_matches('.').to_ascii_lowercase();
    if host == base {
        return Route::Portal;
    }
    match host.strip_suffix(&base).and_then(|h| h.strip_suffix('.')) {
        Some(label) if is_label(label) => Route::Session(label.to_string()),
        _ => Route::Unknown,
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host; // an IPv6 literal is never one of ours
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A session's host label: its uid. A uid is a valid DNS label, unique, never reused, and a
/// Session re-created under the same name gets a new origin (no cookie carries over).
pub fn session_host(uid: &str) -> String {
    uid.to_ascii_lowercase()
}

/// The gateway's public address, e.g. `https://cubicle.example.com` or
/// `http://cubicle.localhost:8080`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicUrl {
    /// `http` or `https`.
    pub scheme: String,
    /// The base domain.
    pub domain: String,
    /// The port, when not the scheme's default.
    pub port: Option<u16>,
}

impl PublicUrl {
    /// Parses `scheme://domain[:port][/]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("invalid public URL {s:?}: expected http(s)://domain[:port]");
        let (scheme, rest) = s.split_once("://").ok_or_else(bad)?;
        if scheme != "http" && scheme != "https" {
            return Err(bad());
        }
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.is_empty() {
            return Err(bad());
        }
        let (domain, port) = match rest.rsplit_once(':') {
            Some((d, p)) => (d, Some(p.parse::<u16>().map_err(|_| bad())?)),
            None => (rest, None),
        };
        if domain
            .split('.')
            .any(|l| !is_label(&l.to_ascii_lowercase()))
        {
            return Err(bad());
        }
        Ok(Self {
            scheme: scheme.into(),
            domain: domain.to_ascii_lowercase(),
            port,
        })
    }

    fn with_host(&self, host: &str) -> String {
        match self.port {
            Some(p) => format!("{}://{host}:{p}", self.scheme),
            None => format!("{}://{host}", self.scheme),
        }
    }

    /// The portal's origin.
    pub fn portal(&self) -> String {
        self.with_host(&self.domain)
    }

    /// A session's origin (its URL, with a trailing slash).
    pub fn session(&self, uid: &str) -> String {
        format!(
            "{}/",
            self.with_host(&format!("{}.{}", session_host(uid), self.domain))
        )
    }

    /// The session origin's host (with port if any), as in a `Host` header.
    pub fn session_authority(&self, uid: &str) -> String {
        let h = format!("{}.{}", session_host(uid), self.domain);
        match self.port {
            Some(p) => format!("{h}:{p}"),
            None => h,
        }
    }

    /// Whether cookies must be `Secure` (`https`).
    pub fn secure(&self) -> bool {
        self.scheme == "https"
    }
}

/// How a session's desktop is reached inside the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The pod's IP and the workspace's port.
    pub addr: SocketAddr,
    /// TLS (KasmVNC's self-signed certificate) or plain HTTP.
    pub tls: bool,
    /// Path prefix on the upstream (`/` by default).
    pub path: String,
}

/// The part of a session pod the gateway keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// The owning Session's uid.
    pub owner_uid: String,
    /// `status.podIP`.
    pub ip: Option<IpAddr>,
    /// Running and Ready.
    pub ready: bool,
    /// Carries the paused access label.
    pub paused: bool,
    /// Being deleted.
    pub deleting: bool,
}

/// What a request to a session gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Proxied to the desktop.
    Proxy(Upstream),
    /// Admitted or resuming, the desktop not up yet: a page that waits.
    Pending,
    /// Stopped: a page that offers Resume (when allowed).
    Stopped,
    /// Paused: refused, with the reason.
    Paused(String),
    /// Expired, refused, failed or being deleted: a page that says so.
    Ended(String),
}

impl Access {
    /// Whether open connections may stay open.
    pub fn connected(&self) -> bool {
        matches!(self, Access::Proxy(_))
    }
}

/// Port, scheme (`true`: https) and path of a workspace's desktop (defaults: Kasm's).
pub fn workspace_upstream(ws: Option<&Workspace>) -> (u16, bool, String) {
    match ws {
        Some(w) => w.spec.desktop(),
        None => WorkspaceSpec::default_desktop(),
    }
}

/// What the session's state allows at `now`.
pub fn access(
    session: &Session,
    pod: Option<&PodView>,
    ws: Option<&Workspace>,
    now: Timestamp,
) -> Access {
    // Borrowed, not cloned: the sweeper and the keepalive writer ask this of every connected
    // session many times a second.
    let status = session.status.as_ref();
    let phase = status.and_then(|s| s.phase);
    if session.metadata.deletion_timestamp.is_some() {
        return Access::Ended("the session is being deleted".into());
    }
    if let Some(at) = status.and_then(|s| s.expires_at.as_ref())
        && now >= at.0
    {
        return Access::Ended("the session has expired".into());
    }
    let desired = session.spec.state.unwrap_or(DesiredState::Running);
    match phase {
        Some(SessionPhase::Expired) => return Access::Ended("the session has expired".into()),
        Some(SessionPhase::Refused) => {
            return Access::Ended("the session was refused; its status says why".into());
        }
        Some(SessionPhase::Failed) => {
            return Access::Ended("the session failed; its status says why".into());
        }
        Some(SessionPhase::Stopped) if desired != DesiredState::Running => {
            return Access::Stopped;
        }
        Some(SessionPhase::Paused) => {
            return Access::Paused(
                "the session is paused: its desktop is kept, access is cut until it is resumed"
                    .into(),
            );
        }
        _ => {}
    }
    match desired {
        DesiredState::Stopped => return Access::Stopped,
        DesiredState::Paused => {
            return Access::Paused(
                "the session is being paused: access is cut until it is resumed".into(),
            );
        }
        DesiredState::Running => {}
    }
    let uid = session.metadata.uid.as_deref().unwrap_or_default();
    match pod {
        Some(p) if p.owner_uid == uid && p.paused => Access::Paused(
            "the session is paused: its desktop is kept, access is cut until it is resumed".into(),
        ),
        Some(p)
            if p.owner_uid == uid
                && p.ready
                && !p.deleting
                && phase == Some(SessionPhase::Running) =>
        {
            match p.ip {
                Some(ip) => {
                    let (port, tls, path) = workspace_upstream(ws);
                    Access::Proxy(Upstream {
                        addr: SocketAddr::new(ip, port),
                        tls,
                        path,
                    })
                }
                None => Access::Pending,
            }
        }
        _ => Access::Pending,
    }
}

/// Who a request comes from, as the Kubernetes API server would name them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Identity {
    /// Username (with the configured prefix).
    #[serde(rename = "u")]
    pub username: String,
    /// Groups (with the configured prefix).
    #[serde(rename = "g", default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// A one-time ticket entering one session's origin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    /// The person.
    #[serde(rename = "i")]
    pub identity: Identity,
    /// The session's host label it is for.
    #[serde(rename = "h")]
    pub host: String,
    /// Expiry, Unix seconds.
    #[serde(rename = "e")]
    pub exp: i64,
    /// A random nonce (the one-time part).
    #[serde(rename = "n")]
    pub nonce: String,
    /// Where to go after (a path on the session origin).
    #[serde(rename = "p", default)]
    pub path: String,
    /// What kind of token this is (`t`: ticket, `c`: cookie); a cookie is never a ticket.
    #[serde(rename = "k")]
    pub kind: char,
}

/// Why a ticket or cookie was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Bad signature or malformed.
    Forged,
    /// Past its expiry.
    Expired,
    /// For another origin, or another kind of token.
    WrongPlace,
}

/// Checks an opened (signature-verified) token: kind, host and expiry.
pub fn check_token(t: &Ticket, kind: char, host: &str, now: Timestamp) -> Result<(), Refused> {
    if t.kind != kind || t.host != host {
        return Err(Refused::WrongPlace);
    }
    if now.as_second() >= t.exp {
        return Err(Refused::Expired);
    }
    Ok(())
}

/// The time a keepalive should be written now, if one is due: the session has an open
/// connection and the last keepalive (persisted, reported or written by this gateway) is at
/// least `interval` old. Never earlier than the last one (time never moves backwards).
pub fn keepalive_due(
    last: Option<Timestamp>,
    interval: Duration,
    now: Timestamp,
) -> Option<Timestamp> {
    match last {
        None => Some(now),
        Some(l) if now <= l => None,
        Some(l) => {
            let age = now.duration_since(l);
            (age.as_secs_f64() >= interval.as_secs_f64()).then_some(now)
        }
    }
}

/// When the next keepalive of a session falls due.
pub fn keepalive_next(last: Option<Timestamp>, interval: Duration, now: Timestamp) -> Timestamp {
    match last {
        None => now,
        Some(l) => l
            .checked_add(jiff::SignedDuration::try_from(interval).unwrap_or_default())
            .unwrap_or(Timestamp::MAX)
            .max(now),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::v1alpha1::{SessionSpec, SessionStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    #[test]
    fn hosts_route_to_the_portal_a_session_or_nowhere() {
        let b = "cubicle.localhost";
        assert_eq!(route("cubicle.localhost:8080", b), Route::Portal);
        assert_eq!(route("CUBICLE.localhost", b), Route::Portal);
        assert_eq!(
            route("abc-1.cubicle.localhost:8080", b),
            Route::Session("abc-1".into())
        );
        assert_eq!(route("a.b.cubicle.localhost", b), Route::Unknown);
        assert_eq!(route("evilcubicle.localhost", b), Route::Unknown);
        assert_eq!(route("other.example", b), Route::Unknown);
        assert_eq!(route("-x.cubicle.localhost", b), Route::Unknown);
        assert_eq!(route("[::1]:80", b), Route::Unknown);
    }

    #[test]
    fn public_urls_parse_and_build_origins() {
        let u = PublicUrl::parse("http://cubicle.localhost:8080/").unwrap();
        assert_eq!(u.portal(), "http://cubicle.localhost:8080");
        assert_eq!(u.session("ABC"), "http://abc.cubicle.localhost:8080/");
        assert!(!u.secure());
        let s = PublicUrl::parse("https://c.example.com").unwrap();
        assert_eq!(s.session("x"), "https://x.c.example.com/");
        assert!(s.secure());
        for bad in ["ftp://x", "https://", "https://a/b", "https://a:99999", "x"] {
            assert!(PublicUrl::parse(bad).is_err(), "{bad}");
        }
    }

    fn session(phase: Option<SessionPhase>, state: Option<DesiredState>) -> Session {
        let mut s = Session::new(
            "s",
            SessionSpec {
                user: "alice".into(),
                workspace: "w".into(),
                persistent_profile: None,
                zone: None,
                state,
            },
        );
        s.metadata.uid = Some("uid-1".into());
        s.status = Some(SessionStatus {
            phase,
            ..Default::default()
        });
        s
    }

    fn pod(ready: bool, paused: bool) -> PodView {
        PodView {
            owner_uid: "uid-1".into(),
            ip: Some("127.1.0.2".parse().unwrap()),
            ready,
            paused,
            deleting: false,
        }
    }

    #[test]
    fn only_a_running_session_with_a_ready_pod_is_proxied() {
        let now = Timestamp::now();
        let run = session(Some(SessionPhase::Running), None);
        assert_eq!(
            access(&run, Some(&pod(true, false)), None, now),
            Access::Proxy(Upstream {
                addr: "127.1.0.2:6901".parse().unwrap(),
                tls: true,
                path: "/".into()
            })
        );
        assert_eq!(
            access(&run, Some(&pod(false, false)), None, now),
            Access::Pending
        );
        assert_eq!(access(&run, None, None, now), Access::Pending);
        // Another session's pod of the same name (waiting for GC) is not this one's.
        let mut other = pod(true, false);
        other.owner_uid = "uid-0".into();
        assert_eq!(access(&run, Some(&other), None, now), Access::Pending);
        assert!(matches!(
            access(&run, Some(&pod(true, true)), None, now),
            Access::Paused(_)
        ));
        let stopping = session(Some(SessionPhase::Running), Some(DesiredState::Stopped));
        assert_eq!(
            access(&stopping, Some(&pod(true, false)), None, now),
            Access::Stopped
        );
        let pausing = session(Some(SessionPhase::Running), Some(DesiredState::Paused));
        assert!(matches!(
            access(&pausing, Some(&pod(true, false)), None, now),
            Access::Paused(_)
        ));
        let resuming = session(Some(SessionPhase::Stopped), Some(DesiredState::Running));
        assert_eq!(access(&resuming, None, None, now), Access::Pending);
        let stopped = session(Some(SessionPhase::Stopped), Some(DesiredState::Stopped));
        assert_eq!(access(&stopped, None, None, now), Access::Stopped);
        for p in [
            SessionPhase::Expired,
            SessionPhase::Refused,
            SessionPhase::Failed,
        ] {
            assert!(matches!(
                access(&session(Some(p), None), None, None, now),
                Access::Ended(_)
            ));
        }
    }

    #[test]
    fn a_session_past_its_deadline_or_being_deleted_is_ended_never_before() {
        let now = Timestamp::now();
        let mut s = session(Some(SessionPhase::Running), None);
        s.status.as_mut().unwrap().expires_at = Some(MicroTime(now));
        assert!(matches!(
            access(&s, Some(&pod(true, false)), None, now),
            Access::Ended(_)
        ));
        let just_before = now - jiff::SignedDuration::from_millis(1);
        assert!(access(&s, Some(&pod(true, false)), None, just_before).connected());
        let mut d = session(Some(SessionPhase::Running), None);
        d.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
        assert!(matches!(
            access(&d, Some(&pod(true, false)), None, now),
            Access::Ended(_)
        ));
    }

    #[test]
    fn tokens_are_checked_for_kind_place_and_time() {
        let now = Timestamp::from_second(1_000).unwrap();
        let t = Ticket {
            identity: Identity {
                username: "oidc:alice".into(),
                groups: vec![],
            },
            host: "uid-1".into(),
            exp: 1_030,
            nonce: "n".into(),
            path: "/".into(),
            kind: 't',
        };
        assert_eq!(check_token(&t, 't', "uid-1", now), Ok(()));
        assert_eq!(check_token(&t, 'c', "uid-1", now), Err(Refused::WrongPlace));
        assert_eq!(check_token(&t, 't', "uid-2", now), Err(Refused::WrongPlace));
        let later = Timestamp::from_second(1_030).unwrap();
        assert_eq!(check_token(&t, 't', "uid-1", later), Err(Refused::Expired));
    }

    #[test]
    fn keepalives_are_due_once_per_interval_and_never_move_backwards() {
        let i = Duration::from_secs(2);
        let t0 = Timestamp::from_second(100).unwrap();
        assert_eq!(keepalive_due(None, i, t0), Some(t0));
        let t1 = t0 + jiff::SignedDuration::from_millis(1999);
        assert_eq!(keepalive_due(Some(t0), i, t1), None);
        let t2 = t0 + jiff::SignedDuration::from_secs(2);
        assert_eq!(keepalive_due(Some(t0), i, t2), Some(t2));
        // A keepalive in the future (another clock): nothing is written before it.
        assert_eq!(keepalive_due(Some(t2), Duration::ZERO, t1), None);
        assert_eq!(keepalive_next(Some(t0), i, t1), t2);
        let t4 = t2 + jiff::SignedDuration::from_secs(2);
        assert_eq!(keepalive_next(Some(t0), i, t4), t4);
    }
}
