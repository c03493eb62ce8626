//! Expiry and usage metering on the real control plane, with limits of a few seconds.

use std::time::Duration;

use cubicle::crd::v1alpha1::{Group, Session, SessionPhase, User};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

use crate::api::install_crds;
use crate::operator::Operator;
use crate::support::{TestNs, wait_for};

const LONG: Duration = Duration::from_secs(60);

/// A tenant whose groups each carry one expiry policy; users are members of one group each.
async fn tenant(ns: &TestNs) {
    let mk_group = |name: &str, settings: serde_json::Value| -> Group {
        serde_json::from_value(json!({
            "apiVersion": "cubicle.dev/v1alpha1", "kind": "Group",
            "metadata": {"name": name}, "spec": {"priority": 10, "settings": settings}
        }))
        .unwrap()
    };
    let groups = [
        (
            "ka-delete",
            json!({"keepaliveExpiration": "3s", "keepaliveExpirationAction": "delete", "keepaliveInterval": "1s"}),
        ),
        (
            "ka-stop",
            json!({"keepaliveExpiration": "3s", "keepaliveExpirationAction": "stop", "keepaliveInterval": "1s"}),
        ),
        (
            "ka-pause",
            json!({"keepaliveExpiration": "3s", "keepaliveExpirationAction": "pause", "keepaliveInterval": "1s"}),
        ),
        (
            "limit",
            json!({"keepaliveExpiration": "1h", "sessionTimeLimit": "4s", "keepaliveExpirationAction": "delete"}),
        ),
        (
            "metered",
            json!({"keepaliveExpiration": "1h", "usageLimit": {"type": "perUser", "interval": "daily", "hours": 0.0015}}),
        ),
        (
            "slow",
            json!({"keepaliveExpiration": "8s", "keepaliveExpirationAction": "delete", "keepaliveInterval": "2s"}),
        ),
    ];
    for (name, settings) in groups {
        ns.api::<Group>()
            .create(&PostParams::default(), &mk_group(name, settings))
            .await
            .unwrap();
    }
    for (user, group) in [
        ("dee", "ka-delete"),
        ("stu", "ka-stop"),
        ("pat", "ka-pause"),
        ("tim", "limit"),
        ("meg", "metered"),
        ("sam", "slow"),
    ] {
        let u: User = serde_json::from_value(json!({
            "apiVersion": "cubicle.dev/v1alpha1", "kind": "User",
            "metadata": {"name": user}, "spec": {"groups": [group]}
        }))
        .unwrap();
        ns.api::<User>()
            .create(&PostParams::default(), &u)
            .await
            .unwrap();
    }
    let ws: cubicle::crd::v1alpha1::Workspace = serde_json::from_value(json!({
        "apiVersion": "cubicle.dev/v1alpha1", "kind": "Workspace",
        "metadata": {"name": "desktop"},
        "spec": {"image": "example.invalid/desktop:1",
                 "groups": ["ka-delete", "ka-stop", "ka-pause", "limit", "metered", "slow"]}
    }))
    .unwrap();
    ns.api().create(&PostParams::default(), &ws).await.unwrap();
}

fn session(name: &str, user: &str) -> Session {
    serde_json::from_value(json!({
        "apiVersion": "cubicle.dev/v1alpha1", "kind": "Session",
        "metadata": {"name": name}, "spec": {"user": user, "workspace": "desktop"}
    }))
    .unwrap()
}

async fn wait_phase(ns: &TestNs, name: &str, phase: SessionPhase) -> Session {
    let api = ns.api::<Session>();
    wait_for(
        &format!("session {name} in phase {phase:?}"),
        LONG,
        || async {
            let s = api.get(name).await.ok()?;
            (s.status.as_ref()?.phase == Some(phase)).then_some(s)
        },
    )
    .await
}

async fn wait_gone(ns: &TestNs, name: &str) -> jiff::Timestamp {
    let api = ns.api::<Session>();
    wait_for(&format!("session {name} deleted"), LONG, || async {
        matches!(api.get_opt(name).await, Ok(None)).then(jiff::Timestamp::now)
    })
    .await
}

fn expires_at(s: &Session) -> jiff::Timestamp {
    s.status
        .as_ref()
        .unwrap()
        .expires_at
        .as_ref()
        .expect("expiresAt")
        .0
}

fn rule(s: &Session) -> String {
    format!(
        "{:?}",
        s.status.as_ref().unwrap().expiry_rule.expect("expiryRule")
    )
}

#[tokio::test]
async fn keepalive_expiration_deletes_stops_or_pauses_never_early() {
    install_crds().await;
    let ns = TestNs::new("expire").await;
    tenant(&ns).await;
    let op = Operator::start(&ns.name).await;
    for (name, user) in [("d1", "dee"), ("s1", "stu"), ("p1", "pat")] {
        ns.api::<Session>()
            .create(&PostParams::default(), &session(name, user))
            .await
            .unwrap();
    }
    let d1 = wait_phase(&ns, "d1", SessionPhase::Running).await;
    let s1 = wait_phase(&ns, "s1", SessionPhase::Running).await;
    let p1 = wait_phase(&ns, "p1", SessionPhase::Running).await;
    for s in [&d1, &s1, &p1] {
        assert_eq!(rule(s), "Keepalive");
        let ka = s
            .status
            .as_ref()
            .unwrap()
            .last_keepalive
            .as_ref()
            .unwrap()
            .time
            .0;
        assert_eq!(
            expires_at(s),
            ka + jiff::SignedDuration::from_secs(3),
            "expiresAt = keepalive + 3s"
        );
    }
    // delete: the session goes, never before its deadline.
    let gone = wait_gone(&ns, "d1").await;
    assert!(
        gone >= expires_at(&d1),
        "deleted at {gone}, before its deadline {}",
        expires_at(&d1)
    );
    // stop: pod removed, session kept as Stopped with the expiry recorded.
    let s1 = wait_phase(&ns, "s1", SessionPhase::Stopped).await;
    assert_eq!(
        s1.spec.state.map(|s| format!("{s:?}")).as_deref(),
        Some("Stopped")
    );
    assert_eq!(
        s1.annotations()
            .get("cubicle.dev/state-set-by")
            .map(String::as_str),
        Some("expiry")
    );
    wait_for("stopped pod removed", LONG, || async {
        matches!(ns.api::<Pod>().get_opt("s1").await, Ok(None)).then_some(())
    })
    .await;
    // pause: pod kept, access cut.
    wait_phase(&ns, "p1", SessionPhase::Paused).await;
    let pod = ns.api::<Pod>().get("p1").await.unwrap();
    assert_eq!(
        pod.labels().get("cubicle.dev/access").map(String::as_str),
        Some("paused")
    );
    // The lateness is recorded per action.
    let text = op.metrics.encode();
    assert!(
        text.contains("cubicle_expiry_lateness_seconds_count{action=\"delete\"} 1"),
        "{text}"
    );
    op.stop().await;
}

#[tokio::test]
async fn keepalives_extend_a_session_and_a_restart_changes_no_deadline() {
    install_crds().await;
    let ns = TestNs::new("keepalive").await;
    tenant(&ns).await;
    let op = Operator::start(&ns.name).await;
    let api = ns.api::<Session>();
    api.create(&PostParams::default(), &session("k1", "sam"))
        .await
        .unwrap();
    let first = wait_phase(&ns, "k1", SessionPhase::Running).await;
    let first_deadline = expires_at(&first);
    // Keepalives every second for 10 s keep it alive past its first deadline (8 s).
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = jiff::Timestamp::now().to_string();
        api.patch(
            "k1",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"cubicle.dev/keepalive": now}}})),
        )
        .await
        .unwrap();
    }
    let alive = wait_for("keepalive persisted", LONG, || async {
        let s = api.get("k1").await.ok()?;
        (expires_at(&s) > first_deadline + jiff::SignedDuration::from_secs(5)).then_some(s)
    })
    .await;
    let ka = alive
        .status
        .as_ref()
        .unwrap()
        .last_keepalive
        .as_ref()
        .unwrap();
    assert_eq!(format!("{:?}", ka.source), "Annotation");
    // The CLI sends one the same way.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cubicle"))
        .args(["keepalive", "k1", "-n", &ns.name])
        .env("KUBECONFIG", crate::support::kubeconfig())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let annotated = api.get("k1").await.unwrap();
    assert!(
        annotated
            .annotations()
            .contains_key("cubicle.dev/keepalive")
    );
    // A keepalive from the future is clamped to now, and one from the past never moves it back.
    let past = (jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3600)).to_string();
    api.patch(
        "k1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"cubicle.dev/keepalive": past}}})),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_restart = api.get("k1").await.unwrap();
    assert!(
        expires_at(&before_restart) >= expires_at(&alive),
        "a keepalive never moves backwards"
    );

    // Restart the controller: the deadline is persisted, not recomputed from a fresh clock.
    op.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let op2 = Operator::start(&ns.name).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_restart = api.get("k1").await.unwrap();
    assert_eq!(
        expires_at(&after_restart),
        expires_at(&before_restart),
        "a restart changes no deadline"
    );
    // Without keepalives it now expires (delete), not before its deadline.
    let gone = wait_gone(&ns, "k1").await;
    assert!(gone >= expires_at(&after_restart));
    op2.stop().await;
}

#[tokio::test]
async fn a_session_time_limit_overrides_keepalive() {
    install_crds().await;
    let ns = TestNs::new("timelimit").await;
    tenant(&ns).await;
    let op = Operator::start(&ns.name).await;
    let api = ns.api::<Session>();
    api.create(&PostParams::default(), &session("t1", "tim"))
        .await
        .unwrap();
    let s = wait_phase(&ns, "t1", SessionPhase::Running).await;
    assert_eq!(rule(&s), "SessionTimeLimit");
    let created = s.creation_timestamp().unwrap().0;
    assert_eq!(expires_at(&s), created + jiff::SignedDuration::from_secs(4));
    // Keepalives do not extend a time-limited session.
    let now = jiff::Timestamp::now().to_string();
    api.patch(
        "t1",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"cubicle.dev/keepalive": now}}})),
    )
    .await
    .unwrap();
    let gone = wait_gone(&ns, "t1").await;
    assert!(gone >= expires_at(&s));
    op.stop().await;
}

#[tokio::test]
async fn usage_exhaustion_ends_running_sessions_and_refuses_new_ones() {
    install_crds().await;
    let ns = TestNs::new("usage").await;
    tenant(&ns).await;
    let op = Operator::start(&ns.name).await;
    let api = ns.api::<Session>();
    // meg has 0.0015 h = 5.4 s per day.
    api.create(&PostParams::default(), &session("u1", "meg"))
        .await
        .unwrap();
    let s = wait_phase(&ns, "u1", SessionPhase::Running).await;
    assert!(
        s.finalizers()
            .iter()
            .any(|f| f == "cubicle.dev/usage-accounting")
    );
    let s = wait_for("usage deadline", LONG, || async {
        let s = api.get("u1").await.ok()?;
        (s.status
            .as_ref()?
            .expiry_rule
            .map(|r| format!("{r:?}"))
            .as_deref()
            == Some("UsageLimit"))
        .then_some(s)
    })
    .await;
    let started = s.status.as_ref().unwrap().started_at.as_ref().unwrap().0;
    // 5.4 s after the start, never before it (the ledger counts whole milliseconds, rounding up).
    let exact = started + jiff::SignedDuration::from_millis(5400);
    let at = expires_at(&s);
    assert!(
        at >= exact && at <= exact + jiff::SignedDuration::from_millis(2),
        "{at} vs {exact}"
    );
    let gone = wait_gone(&ns, "u1").await;
    assert!(gone >= expires_at(&s));
    // The ledger kept the session's time, once.
    let users = ns.api::<User>();
    let meg = wait_for("ledger written", LONG, || async {
        let u = users.get("meg").await.ok()?;
        (!u.status.as_ref()?.usage.is_empty()).then_some(u)
    })
    .await;
    let entry = &meg.status.unwrap().usage[0];
    let closed = entry.closed_ms.unwrap_or_default();
    assert!(closed >= 5400, "closed {closed} ms");
    assert_eq!(entry.closed_sessions.len(), 1);
    assert_eq!(entry.limit_seconds, 5);
    // A new session is refused while the budget is spent.
    api.create(&PostParams::default(), &session("u2", "meg"))
        .await
        .unwrap();
    let refused = wait_phase(&ns, "u2", SessionPhase::Refused).await;
    let c = refused
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Admitted")
        .unwrap();
    assert_eq!(c.reason, "UsageLimitExhausted", "{}", c.message);
    op.stop().await;
}

/// A deadline armed for the fast path is never enforced once what it was computed from has
/// changed: raising the group's keepaliveExpiration just before the old deadline moves it, and
/// the session outlives the old one.
#[tokio::test]
async fn a_setting_changed_before_the_deadline_moves_it() {
    install_crds().await;
    let ns = TestNs::new("rearm").await;
    tenant(&ns).await;
    let op = Operator::start(&ns.name).await;
    let api = ns.api::<Session>();
    api.create(&PostParams::default(), &session("r1", "sam"))
        .await
        .unwrap();
    let s = wait_phase(&ns, "r1", SessionPhase::Running).await;
    let old_deadline = expires_at(&s);
    // Raise the limit about a second before the old deadline (8 s keepalive expiration).
    let until_old = old_deadline
        .duration_since(jiff::Timestamp::now())
        .as_secs_f64()
        - 1.0;
    tokio::time::sleep(Duration::from_secs_f64(until_old.max(0.0))).await;
    ns.api::<Group>()
        .patch(
            "slow",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"settings": {"keepaliveExpiration": "1h"}}})),
        )
        .await
        .unwrap();
    let moved = wait_for("the deadline moves", LONG, || async {
        let s = api.get("r1").await.ok()?;
        (expires_at(&s) > old_deadline + jiff::SignedDuration::from_secs(600)).then_some(s)
    })
    .await;
    assert_eq!(rule(&moved), "Keepalive");
    // Well past the old deadline, the session is still there and running.
    let wait = old_deadline
        .duration_since(jiff::Timestamp::now())
        .as_secs_f64()
        + 2.0;
    tokio::time::sleep(Duration::from_secs_f64(wait.max(0.0))).await;
    let still = api
        .get("r1")
        .await
        .expect("the session outlives its old deadline");
    assert_eq!(
        still.status.as_ref().unwrap().phase,
        Some(SessionPhase::Running)
    );
    op.stop().await;
}
