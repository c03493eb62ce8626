//! A session's status follows its pod at once (the pod's own event writes it, not a timer), also
//! after other sessions came and went, and its deadline counts from the real start.

use std::time::{Duration, Instant};

use cubicle::crd::v1alpha1::{Session, SessionPhase};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;

use crate::api::install_crds;
use crate::operator::Operator;
use crate::support::{TestNs, wait_for};

const LONG: Duration = Duration::from_secs(90);

/// One group (`keepaliveExpiration` as given, delete on expiry), user `u`, workspace `w`.
async fn tenant(ns: &TestNs, keepalive: &str) {
    let docs = [
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Group", "metadata": {"name": "g"},
               "spec": {"priority": 10, "settings": {"keepaliveExpiration": keepalive,
                        "keepaliveExpirationAction": "delete", "maxKasmsPerUser": 100}}}),
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "User", "metadata": {"name": "u"},
               "spec": {"realm": "ldap", "groups": ["g"]}}),
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Workspace", "metadata": {"name": "w"},
               "spec": {"image": "example.invalid/desktop:1", "groups": ["g"]}}),
    ];
    create_all(ns, docs).await;
}

/// Creates the Cubicle objects `docs` (JSON, each with its kind) in `ns`.
async fn create_all(ns: &TestNs, docs: impl IntoIterator<Item = serde_json::Value>) {
    for d in docs {
        let kind = d["kind"].as_str().unwrap().to_string();
        let ar = kube::core::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("cubicle.dev", "v1alpha1", &kind),
            &format!("{}s", kind.to_lowercase()),
        );
        let api: kube::Api<kube::api::DynamicObject> =
            kube::Api::namespaced_with(ns.client.clone(), &ns.name, &ar);
        let obj: kube::api::DynamicObject = serde_json::from_value(d).unwrap();
        api.create(&PostParams::default(), &obj).await.unwrap();
    }
}

fn session(name: &str) -> Session {
    serde_json::from_value(json!({
        "apiVersion": "cubicle.dev/v1alpha1", "kind": "Session",
        "metadata": {"name": name},
        "spec": {"user": "u", "workspace": "w", "persistentProfile": "Disabled"}
    }))
    .unwrap()
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Polls the pod and the session of `name` every 10 ms: the instants (test clock) the pod was
/// first seen Ready and the session first seen Running (with its status).
async fn watch_start(ns: &TestNs, name: &str) -> (Instant, Instant, Session) {
    let pods = ns.api::<Pod>();
    let sessions = ns.api::<Session>();
    let limit = Instant::now() + LONG;
    let mut ready_at = None;
    loop {
        assert!(Instant::now() < limit, "session {name} never ran");
        if ready_at.is_none()
            && let Ok(Some(p)) = pods.get_opt(name).await
            && pod_ready(&p)
        {
            ready_at = Some(Instant::now());
        }
        if let Ok(s) = sessions.get(name).await
            && s.status.as_ref().and_then(|s| s.phase) == Some(SessionPhase::Running)
        {
            let seen = Instant::now();
            // The status can only be written once the pod is Ready.
            return (ready_at.unwrap_or(seen), seen, s);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_gone(ns: &TestNs, names: &[String]) {
    let pods = ns.api::<Pod>();
    let sessions = ns.api::<Session>();
    for n in names {
        wait_for(&format!("session {n} and its pod gone"), LONG, || async {
            let pod = pods.get_opt(n).await.ok()?;
            let s = sessions.get_opt(n).await.ok()?;
            (pod.is_none() && s.is_none()).then_some(())
        })
        .await;
    }
}

#[tokio::test]
async fn status_follows_the_pod_at_once_also_after_sessions_were_deleted() {
    install_crds().await;
    let ns = TestNs::new("prompt").await;
    tenant(&ns, "1h").await;
    let op = Operator::start(&ns.name).await;
    let api = ns.api::<Session>();
    // Churn first: sessions launched and deleted (their pods' last updates and removals came
    // in quick succession, which once silenced the pod trigger for good).
    for round in 0..2 {
        let names: Vec<String> = (0..5).map(|i| format!("churn-{round}-{i}")).collect();
        for n in &names {
            api.create(&PostParams::default(), &session(n))
                .await
                .unwrap();
        }
        for n in &names {
            watch_start(&ns, n).await;
        }
        for n in &names {
            let _ = api.delete(n, &DeleteParams::default()).await;
        }
        wait_gone(&ns, &names).await;
    }
    // Then single launches: each status comes with the pod's Running, not a timer later.
    let mut lags = Vec::new();
    for i in 0..5 {
        let n = format!("lone-{i}");
        api.create(&PostParams::default(), &session(&n))
            .await
            .unwrap();
        let (ready, running, s) = watch_start(&ns, &n).await;
        lags.push(running.duration_since(ready));
        let st = s.status.unwrap();
        assert!(st.started_at.is_some(), "{n}: startedAt with the phase");
        assert!(
            st.expires_at.is_some(),
            "{n}: the deadline is armed with the phase"
        );
    }
    lags.sort();
    eprintln!(
        "pod Ready seen -> session Running seen (10 ms polls): p50 {:?}, max {:?}",
        lags[lags.len() / 2],
        lags[lags.len() - 1]
    );
    // A timer (the 5 s pending report, or a deadline's requeue) would show as seconds.
    assert!(
        lags[lags.len() - 1] < Duration::from_millis(1000),
        "status written on the pod's own event: {lags:?}"
    );
    op.stop().await;
}

#[tokio::test]
async fn a_five_second_keepalive_ends_the_session_five_seconds_after_its_pod_ran() {
    install_crds().await;
    let ns = TestNs::new("prompt5s").await;
    tenant(&ns, "5s").await;
    let op = Operator::start(&ns.name).await;
    let api = ns.api::<Session>();
    // Deletions first, as in the report (4 runs of 4 ended 10 s after the pod ran).
    let names: Vec<String> = (0..4).map(|i| format!("churn-{i}")).collect();
    for n in &names {
        api.create(&PostParams::default(), &session(n))
            .await
            .unwrap();
    }
    for n in &names {
        watch_start(&ns, n).await;
    }
    for n in &names {
        let _ = api.delete(n, &DeleteParams::default()).await;
    }
    wait_gone(&ns, &names).await;
    api.create(&PostParams::default(), &session("lone"))
        .await
        .unwrap();
    let (ready, _, _) = watch_start(&ns, "lone").await;
    wait_for("session lone deleted by its keepalive", LONG, || async {
        matches!(api.get_opt("lone").await, Ok(None)).then_some(())
    })
    .await;
    let lived = ready.elapsed();
    eprintln!("pod Ready seen -> session gone: {lived:?}");
    assert!(
        lived >= Duration::from_millis(4800) && lived <= Duration::from_millis(6300),
        "gone between 5 and 6 s after its pod ran (250 ms polls for the end): {lived:?}"
    );
    op.stop().await;
}

#[tokio::test]
async fn usage_shows_the_current_window_with_running_sessions_before_any_ends() {
    use cubicle::crd::v1alpha1::{Group, User};
    install_crds().await;
    let ns = TestNs::new("usageview").await;
    let docs = [
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Group", "metadata": {"name": "pu"},
               "spec": {"priority": 10, "settings": {"keepaliveExpiration": "1h", "maxKasmsPerUser": 10,
                        "usageLimit": {"type": "perUser", "interval": "daily", "hours": 1}}}}),
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Group", "metadata": {"name": "pg"},
               "spec": {"priority": 10, "settings": {"keepaliveExpiration": "1h", "maxKasmsPerUser": 10,
                        "usageLimit": {"type": "perGroup", "interval": "daily", "hours": 2}}}}),
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "User", "metadata": {"name": "u"},
               "spec": {"realm": "ldap", "groups": ["pu"]}}),
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "User", "metadata": {"name": "v"},
               "spec": {"realm": "ldap", "groups": ["pg"]}}),
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Workspace", "metadata": {"name": "w"},
               "spec": {"image": "example.invalid/desktop:1", "groups": ["pu", "pg"]}}),
    ];
    create_all(&ns, docs).await;
    let op = Operator::start(&ns.name).await;
    let api = ns.api::<Session>();
    let mk = |name: &str, user: &str| -> Session {
        serde_json::from_value(json!({
            "apiVersion": "cubicle.dev/v1alpha1", "kind": "Session",
            "metadata": {"name": name}, "spec": {"user": user, "workspace": "w"}
        }))
        .unwrap()
    };
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .start_of_day()
        .unwrap()
        .timestamp();
    // perUser: the User's entry appears when the first session starts (none has ended).
    api.create(&PostParams::default(), &mk("u1", "u"))
        .await
        .unwrap();
    watch_start(&ns, "u1").await;
    let users = ns.api::<User>();
    let entry = wait_for("u's usage entry", LONG, || async {
        let u = users.get("u").await.ok()?;
        u.status?.usage.into_iter().next()
    })
    .await;
    assert_eq!(
        entry.window_start.as_ref().map(|t| t.0),
        Some(today),
        "the current window"
    );
    assert_eq!(entry.limit_seconds, 3600);
    // A second session started 3 s later: the entry counts the first one's running time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    api.create(&PostParams::default(), &mk("u2", "u"))
        .await
        .unwrap();
    watch_start(&ns, "u2").await;
    wait_for("u's usage with u1's running time", LONG, || async {
        let u = users.get("u").await.ok()?;
        let e = u.status?.usage.into_iter().next()?;
        (e.used_seconds >= 3).then_some(())
    })
    .await;
    // perGroup: the Group's entry, the same way.
    api.create(&PostParams::default(), &mk("v1", "v"))
        .await
        .unwrap();
    watch_start(&ns, "v1").await;
    let e = wait_for("pg's usage entry", LONG, || async {
        let g = ns.api::<Group>().get("pg").await.ok()?;
        g.status?.usage.into_iter().next()
    })
    .await;
    assert_eq!(e.window_start.as_ref().map(|t| t.0), Some(today));
    assert_eq!(e.limit_seconds, 7200);
    op.stop().await;
}

/// Sessions of one budget ending at once are each closed into the ledger: every close computes
/// the ledger from the cached User, so without a guard the last write would overwrite the
/// others' closed time; a close refused because another got in first is made again from the
/// newer User, never lost.
#[tokio::test]
async fn sessions_of_one_budget_ending_at_once_are_all_closed_into_the_ledger() {
    use cubicle::crd::v1alpha1::User;
    let ns = one_user_budget("ledger", 10.0).await;
    let op = Operator::start(&ns.name).await;
    let api = ns.api::<Session>();
    let names: Vec<String> = (0..4).map(|i| format!("end-{i}")).collect();
    for n in &names {
        api.create(&PostParams::default(), &session(n))
            .await
            .unwrap();
    }
    let mut started = Vec::new();
    for n in &names {
        let (_, _, s) = watch_start(&ns, n).await;
        let st = s.status.as_ref().and_then(|st| st.started_at.clone());
        started.push(
            st.unwrap_or_else(|| panic!("{n} Running without startedAt"))
                .0,
        );
    }
    // Each runs for 2 s or more, then all are deleted at the same moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deleting = jiff::Timestamp::now();
    let dp = DeleteParams::default();
    let deletes = names.iter().map(|n| api.delete(n, &dp));
    for r in futures::future::join_all(deletes).await {
        r.unwrap();
    }
    wait_gone(&ns, &names).await;
    let gone = jiff::Timestamp::now();
    let ms = |a: jiff::Timestamp, b: jiff::Timestamp| b.duration_since(a).as_millis().max(0) as u64;
    let at_least: u64 = started.iter().map(|s| ms(*s, deleting)).sum();
    let at_most: u64 = started.iter().map(|s| ms(*s, gone)).sum();
    let u = ns.api::<User>().get("u").await.unwrap();
    let usage = u.status.map(|s| s.usage).unwrap_or_default();
    let closed = usage.first().and_then(|e| e.closed_ms).unwrap_or(0);
    // A lost close loses 2 s or more; the 100 ms slack is for rounding starts up to the ms.
    assert!(
        closed + 100 >= at_least && closed <= at_most + 1000,
        "ledger closed {closed} ms; the sessions ran {at_least}..{at_most} ms in all \
         (started {started:?}, deleted at {deleting}, all gone by {gone}); usage: {}",
        serde_json::to_string(&usage).unwrap_or_default()
    );
    op.stop().await;
}

/// Two sessions of one usage budget started together: the budget is split two ways, so each
/// one's deadline is set by the usage limit (2,700 s left each of 5,400 s), not by its keepalive
/// (3,600 s), including the one that started first and was alone when it did. Its deadline is
/// moved by the other's start (the sessions sharing a budget are re-evaluated on it), not a
/// resync later: the view's refresh after that start writes nothing when the time used moved by
/// less than a second.
#[tokio::test]
async fn a_session_starting_moves_the_usage_deadline_of_the_sessions_sharing_its_budget() {
    use cubicle::crd::v1alpha1::ExpiryRule;
    let ns = one_user_budget("peers", 1.5).await;
    let op = Operator::start(&ns.name).await;
    let api = ns.api::<Session>();
    let names = ["first", "second"];
    let creates = names.iter().map(|n| {
        let api = api.clone();
        async move { api.create(&PostParams::default(), &session(n)).await }
    });
    for r in futures::future::join_all(creates).await {
        r.unwrap();
    }
    for n in names {
        watch_start(&ns, n).await;
    }
    // Both running: each deadline becomes the usage limit's (a resync is minutes away).
    let deadline = Instant::now() + Duration::from_secs(30);
    let all = loop {
        let mut all = Vec::new();
        for n in names {
            all.push(api.get(n).await.unwrap());
        }
        let rules: Vec<_> = all
            .iter()
            .map(|s| s.status.as_ref().and_then(|st| st.expiry_rule))
            .collect();
        if rules.iter().all(|r| *r == Some(ExpiryRule::UsageLimit)) {
            break all;
        }
        assert!(
            Instant::now() < deadline,
            "30 s after both ran, the deadlines' rules are {rules:?}, not both the usage \
             limit's; statuses: {}",
            serde_json::to_string(&all.iter().map(|s| &s.status).collect::<Vec<_>>())
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let starts: Vec<_> = all
        .iter()
        .map(|s| s.status.as_ref().unwrap().started_at.clone().unwrap().0)
        .collect();
    let latest = starts.iter().max().unwrap();
    // (5,400 s - the gap between the starts) / 2 after the later start.
    for s in &all {
        let st = s.status.as_ref().unwrap();
        let left = st
            .expires_at
            .as_ref()
            .unwrap()
            .0
            .duration_since(*latest)
            .as_secs_f64();
        assert!(
            (2600.0..=2705.0).contains(&left),
            "{}: expiresAt {:?} is {left:.1} s after the later start (starts {starts:?})",
            s.name_any(),
            st.expires_at
        );
    }
    op.stop().await;
}

/// A namespace with User `u` in Group `pu` (keepalive 1 h, a `perUser` budget of `hours` in
/// total) and Workspace `w`.
async fn one_user_budget(name: &str, hours: f64) -> TestNs {
    install_crds().await;
    let ns = TestNs::new(name).await;
    let docs = [
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Group", "metadata": {"name": "pu"},
               "spec": {"priority": 10, "settings": {"keepaliveExpiration": "1h", "maxKasmsPerUser": 10,
                        "usageLimit": {"type": "perUser", "interval": "total", "hours": hours}}}}),
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "User", "metadata": {"name": "u"},
               "spec": {"realm": "ldap", "groups": ["pu"]}}),
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Workspace", "metadata": {"name": "w"},
               "spec": {"image": "example.invalid/desktop:1", "groups": ["pu"]}}),
    ];
    create_all(&ns, docs).await;
    ns
}
