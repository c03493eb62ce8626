//! The dashboard in headless Chromium on the real control plane: sign in through the real
//! OpenID Provider's form, launch with each profile mode, read the operator's reasons for
//! refused launches, check the countdown against `expiresAt` and the usage against the ledger,
//! see only the permitted buttons, stop a session, and have a forged post refused. One Chromium
//! session for all of it (each start costs seconds).

use std::time::{Duration, Instant};

use cubicle::crd::v1alpha1::{Session, SessionPhase, User};
use cubicle::credentials;
use cubicle::gateway::core::PublicUrl;
use cubicle::gateway::{self, AuthMode, GatewayConfig};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::ResourceExt;
use kube::api::PostParams;
use serde_json::json;
use tokio::net::TcpListener;

use crate::api::install_crds;
use crate::browser::Browser;
use crate::operator::Operator;
use crate::sessions::{create, session, wait_phase};
use crate::support::{TestNs, wait_for};

const LONG: Duration = Duration::from_secs(120);

const TENANT: &str = r#"
apiVersion: cubicle.dev/v1alpha1
kind: Group
metadata: {name: team}
spec:
  priority: 10
  settings:
    allowKasmStop: true
    allowKasmPause: true
    allowKasmDelete: true
    allowPersistentProfile: true
    allowZoneSelection: true
    sessionTimeLimit: 2h
    keepaliveExpiration: 3h
    usageLimit: {type: perUser, interval: daily, hours: 5}
---
apiVersion: cubicle.dev/v1alpha1
kind: Group
metadata: {name: plain}
spec:
  priority: 10
  settings:
    maxKasmsPerUser: 1
    allowKasmStop: false
    allowKasmPause: false
    allowKasmDelete: false
    allowZoneSelection: false
    allowPersistentProfile: false
---
apiVersion: cubicle.dev/v1alpha1
kind: Group
metadata: {name: spent}
spec:
  priority: 10
  settings:
    usageLimit: {type: perUser, interval: total, hours: 0}
---
apiVersion: cubicle.dev/v1alpha1
kind: Group
metadata: {name: nozone}
spec:
  priority: 10
  settings:
    allowZoneSelection: false
---
apiVersion: cubicle.dev/v1alpha1
kind: User
metadata: {name: alice-nozone}
spec: {groups: [nozone], identity: {username: "oidc:alice"}}
---
apiVersion: cubicle.dev/v1alpha1
kind: User
metadata: {name: alice}
spec: {groups: [team], identity: {username: "oidc:alice"}}
---
apiVersion: cubicle.dev/v1alpha1
kind: User
metadata: {name: alice-plain}
spec: {groups: [plain], identity: {username: "oidc:alice"}}
---
apiVersion: cubicle.dev/v1alpha1
kind: User
metadata: {name: alice-locked}
spec: {groups: [team], disabled: true, identity: {username: "oidc:alice"}}
---
apiVersion: cubicle.dev/v1alpha1
kind: User
metadata: {name: alice-spent}
spec: {groups: [spent], identity: {username: "oidc:alice"}}
---
apiVersion: cubicle.dev/v1alpha1
kind: User
metadata: {name: bob}
spec: {groups: [team], identity: {username: "oidc:bob"}}
---
apiVersion: cubicle.dev/v1alpha1
kind: Workspace
metadata: {name: desktop}
spec:
  image: example.invalid/desktop:1
  displayName: Desktop
  description: A full desktop with a browser.
  groups: [team, plain, spent, nozone]
  resources: {cores: "1", memory: 1Gi}
  persistentProfile:
    mountPath: /home/kasm-user
    claimTemplate: {name: "dash-{username}", size: 1Gi}
"#;

async fn apply(ns: &TestNs) {
    use kube::api::{DynamicObject, Patch, PatchParams};
    use kube::core::{ApiResource, GroupVersionKind};
    use serde::Deserialize;
    for doc in serde_yaml::Deserializer::from_str(TENANT) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        let obj: DynamicObject = serde_yaml::from_value(v).unwrap();
        let tm = obj.types.clone().unwrap();
        let (group, version) = tm.api_version.split_once('/').unwrap();
        let gvk = GroupVersionKind::gvk(group, version, &tm.kind);
        let ar = ApiResource::from_gvk_with_plural(&gvk, &format!("{}s", tm.kind.to_lowercase()));
        kube::Api::<DynamicObject>::namespaced_with(ns.client.clone(), &ns.name, &ar)
            .patch(
                &obj.name_any(),
                &PatchParams::apply("e2e").force(),
                &Patch::Apply(&obj),
            )
            .await
            .unwrap_or_else(|e| panic!("apply {} {}: {e}", tm.kind, obj.name_any()));
    }
}

/// The person's end-user role in the namespace (what an administrator binds).
async fn bind_people(ns: &TestNs) {
    let rb: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "people"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": cubicle::access::DEV_USER_ROLE},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "oidc:alice"},
                     {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "oidc:bob"}]
    }))
    .unwrap();
    ns.api::<RoleBinding>()
        .create(&PostParams::default(), &rb)
        .await
        .unwrap();
}

/// Every Session of the namespace, for failure messages.
async fn sessions_state(ns: &TestNs) -> String {
    let list = ns.api::<Session>().list(&Default::default()).await;
    match list {
        Ok(l) => l
            .items
            .iter()
            .map(|s| {
                format!(
                    "{} user={} spec={:?} status={}",
                    s.name_any(),
                    s.spec.user,
                    s.spec,
                    serde_json::to_string(&s.status).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("(list failed: {e})"),
    }
}

/// Opens the dashboard at `portal` and waits for it (its live reload paused).
async fn open(b: &Browser, portal: &str) {
    b.open_portal(&format!("{portal}/")).await;
}

/// Launches `desktop` for `user` from its form (`profile`, `zone` when offered); returns the
/// new Session's name from the page's notice.
async fn launch(b: &Browser, portal: &str, ns: &str, user: &str, profile: Option<&str>) -> String {
    open(b, portal).await;
    let form = format!("#w-{ns}-{user}-desktop form");
    if let Some(p) = profile {
        b.eval(
            "const s = document.querySelector(arguments[0] + ' select[name=profile]'); \
             s.value = arguments[1]; return s.value",
            vec![json!(form), json!(p)],
        )
        .await;
    }
    // Reset asks for confirmation: answer it, and keep what it said.
    b.eval(
        "window.confirm = function(m) { sessionStorage.setItem('confirmed', m); return true }; return 1",
        vec![],
    )
    .await;
    b.click(&format!("{form} button.launch")).await;
    let notice = b
        .wait_until(
            "const n = document.getElementById('notice'); return n && n.textContent",
            LONG,
        )
        .await;
    let notice = notice.as_str().unwrap().to_string();
    notice
        .strip_prefix("Launched desktop as ")
        .and_then(|n| n.strip_suffix('.'))
        .unwrap_or_else(|| panic!("no launch notice: {notice:?}"))
        .to_string()
}

/// Waits (with the page's own live updates) until session `name` shows a reason containing
/// `words`.
async fn reason_shown(b: &Browser, ns: &TestNs, portal: &str, name: &str, words: &str) {
    b.goto(&format!("{portal}/")).await;
    let script = format!(
        "const e = document.querySelector('#s-{name} .reason'); \
         return e && e.textContent.includes({}) && e.textContent",
        serde_json::to_string(words).unwrap()
    );
    let deadline = Instant::now() + LONG;
    loop {
        let v = b.eval(&format!("{script} || ''"), vec![]).await;
        if v.as_str().is_some_and(|s| !s.is_empty()) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "session {name} never showed {words:?}; page: {}\nsessions:\n{}",
                b.text().await,
                sessions_state(ns).await
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Posts a form from inside the page (`fields` as given, no token added); returns the status
/// and the text of the answer.
/// Screenshots of the page in the light and the dark theme
/// (`target/artefacts/dashboard/<name>-{light,dark}.png`; README shows copies in docs/).
async fn shoot(b: &Browser, name: &str) {
    for theme in ["light", "dark"] {
        b.eval(
            "document.documentElement.dataset.theme = arguments[0]; return 1",
            vec![json!(theme)],
        )
        .await;
        b.screenshot(&format!("{name}-{theme}")).await;
    }
    b.eval(
        "delete document.documentElement.dataset.theme; return 1",
        vec![],
    )
    .await;
}

#[tokio::test]
async fn a_person_launches_watches_and_stops_sessions_in_the_browser() {
    let Some(b) = Browser::start("dashboard").await else {
        return;
    };
    install_crds().await;
    let ns = TestNs::new("dash").await;
    let key = credentials::ensure(ns.client.clone(), &ns.name, "cubicle-session-key")
        .await
        .unwrap();
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    drop(probe);
    let public = PublicUrl::parse(&format!("http://cubicle.localhost:{port}")).unwrap();
    let portal = public.portal();
    let (k, p) = (key.clone(), public.clone());
    let op = Operator::start_with(&ns.name, move |c| {
        c.credentials = Some(k);
        c.gateway_url = Some(p);
    })
    .await;
    apply(&ns).await;
    bind_people(&ns).await;
    let people: [(&str, &[&str]); 2] = [("alice", &[]), ("bob", &[])];
    let (issuer, gw) = crate::support::oidc_gateway(&ns, &public, &key, port, &people).await;
    // Sessions an administrator started: alice-plain's one (its maximum) and bob's.
    create(
        &ns,
        &session(
            "plain-1",
            "alice-plain",
            "desktop",
            json!({"persistentProfile": "Disabled"}),
        ),
    )
    .await;
    create(&ns, &session("bob-1", "bob", "desktop", json!({}))).await;
    wait_phase(&ns, "plain-1", SessionPhase::Running).await;
    wait_phase(&ns, "bob-1", SessionPhase::Running).await;

    // 1. Sign in through the provider's own form.
    b.goto(&format!("{portal}/")).await;
    b.click("a[href='/.cubicle/login']").await;
    let alice = issuer.people.iter().find(|p| p.name == "alice").unwrap();
    crate::browser::sign_in(&b, "alice", &alice.password).await;
    let who = b
        .wait_until(
            "const w = document.getElementById('who'); return w && w.textContent",
            LONG,
        )
        .await;
    assert_eq!(who, "oidc:alice", "signed in as someone else");
    let page = b.text().await;
    assert!(
        page.contains("A full desktop with a browser.") && page.contains("1 cores · 1Gi memory"),
        "the workspace with its description and resources: {page}"
    );
    assert!(
        !page.contains("bob-1"),
        "another person's session is shown: {page}"
    );
    // 2. Launch with each profile mode; the operator mounts, skips or resets the profile.
    let n = &ns.name;
    let enabled = launch(&b, &portal, n, "alice", Some("Enabled")).await;
    let s = wait_phase(&ns, &enabled, SessionPhase::Running).await;
    assert_eq!(
        s.spec.persistent_profile,
        Some(cubicle::crd::v1alpha1::ProfileMode::Enabled)
    );
    let disabled = launch(&b, &portal, n, "alice", Some("Disabled")).await;
    let s = wait_phase(&ns, &disabled, SessionPhase::Running).await;
    assert_eq!(
        s.spec.persistent_profile,
        Some(cubicle::crd::v1alpha1::ProfileMode::Disabled)
    );
    let reset = launch(&b, &portal, n, "alice", Some("Reset")).await;
    let confirmed = b
        .eval("return sessionStorage.getItem('confirmed')", vec![])
        .await;
    assert!(
        confirmed
            .as_str()
            .is_some_and(|m| m.contains("archived, not deleted")),
        "Reset asked no confirmation saying the old profile is kept: {confirmed:?}"
    );
    let s = wait_phase(&ns, &reset, SessionPhase::Running).await;
    assert_eq!(
        s.spec.persistent_profile,
        Some(cubicle::crd::v1alpha1::ProfileMode::Reset)
    );

    // 3. The countdown agrees with expiresAt to the second, and names its rule; Connect goes
    //    to the session's address.
    open(&b, &portal).await;
    // The deadline may still be moving when the page opens: the usage limit is shared by the
    // person's running sessions, so each launch (the Reset one just above) moves the others'
    // expiresAt a moment after it runs, and the page may have been rendered from the cache
    // before that. The page follows on its own (it polls and reloads when what it shows
    // changes): wait until it shows the Session's current expiresAt, holding the page still
    // (no reload) while it is read, then check the countdown against that deadline.
    let settle = Instant::now() + LONG;
    let (st, expires, shown, before, after) = loop {
        let s = ns.api::<Session>().get(&enabled).await.unwrap();
        let st = s.status.clone().unwrap();
        let expires = st.expires_at.clone().unwrap().0;
        let before = jiff::Timestamp::now();
        let shown = b
            .wait_until(
                &format!(
                    "const e = document.querySelector('#s-{enabled} .countdown'); \
                     if (!e || !window.cubicleTick) return null; \
                     window.cubiclePaused = true; window.cubicleTick(); \
                     return [Number(e.dataset.left), Number(e.dataset.expires), \
                     document.querySelector('#s-{enabled} .rule').textContent, \
                     document.querySelector('#s-{enabled} a.connect').getAttribute('href'), \
                     Number(window.cubicleSkew)]"
                ),
                LONG,
            )
            .await;
        let after = jiff::Timestamp::now();
        if shown[1].as_i64() == Some(expires.as_millisecond()) {
            break (st, expires, shown, before, after);
        }
        assert!(
            Instant::now() < settle,
            "the page still shows the deadline {} {LONG:?} later, the Session's expiresAt is \
             {expires} (rule {:?}, phase {:?})",
            shown[1],
            st.expiry_rule,
            st.phase
        );
        b.eval("window.cubiclePaused = false; return true", vec![])
            .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    // The page counts from the server's time at render plus the time since its script started
    // (the browser's clock may differ from the server's), so it runs behind by the time from
    // render to script start (its skew, here on one clock) and by the eval's own round trip:
    // allowed on top of the second, on a loaded machine these are not negligible.
    let left = shown[0].as_f64().unwrap();
    let lag = shown[4].as_f64().unwrap_or(0.0).max(0.0) / 1000.0;
    let latest = expires.duration_since(before).as_secs_f64();
    let earliest = expires.duration_since(after).as_secs_f64();
    assert!(
        left >= earliest - 1.5 && left <= latest + lag + 1.5,
        "countdown {left} s, expiresAt {expires} is {earliest:.1} to {latest:.1} s away \
         (page lag {lag:.1} s)"
    );
    assert_eq!(
        shown[1].as_i64().unwrap(),
        expires.as_millisecond(),
        "the deadline is expiresAt"
    );
    let rule = match st.expiry_rule {
        Some(cubicle::crd::v1alpha1::ExpiryRule::Keepalive) => "keepalive expiration",
        Some(cubicle::crd::v1alpha1::ExpiryRule::SessionTimeLimit) => "session time limit",
        Some(cubicle::crd::v1alpha1::ExpiryRule::UsageLimit) => "usage limit",
        None => "",
    };
    assert_eq!(shown[2], rule, "the rule that sets expiresAt");
    assert_eq!(
        shown[3].as_str(),
        st.url.as_deref(),
        "Connect goes to status.url"
    );
    b.eval("window.cubiclePaused = false; return true", vec![])
        .await;

    // 4. Usage agrees with the ledger (the page follows it as it moves).
    let deadline = Instant::now() + LONG;
    loop {
        let u = ns.api::<User>().get("alice").await.unwrap();
        let ledger = u.status.and_then(|s| s.usage.first().cloned());
        let page = b
            .eval(
                &format!(
                    "const d = document.querySelector('#u-{n}-alice').parentElement.querySelector('dd[data-used]'); \
                     return d && [Number(d.dataset.used), Number(d.dataset.limit), d.textContent]"
                ),
                vec![],
            )
            .await;
        if let (Some(l), Some(p)) = (&ledger, page.as_array())
            && p[0].as_u64() == Some(l.used_seconds)
            && p[1].as_u64() == Some(l.limit_seconds)
        {
            assert_eq!(l.limit_seconds, 5 * 3600);
            assert!(
                p[2].as_str().unwrap().contains("remaining of 5h 00m 00s"),
                "{p:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "usage on the page {page:?} never matched the ledger {ledger:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        open(&b, &portal).await;
    }
    shoot(&b, "dashboard").await;

    // 5. Buttons only where the groups allow them.
    let buttons = |name: &str| {
        let name = name.to_string();
        let b = &b;
        async move {
            b.eval(
                &format!(
                    "return Array.from(document.querySelectorAll('#s-{name} button')).map(x => x.className)"
                ),
                vec![],
            )
            .await
        }
    };
    assert_eq!(
        buttons(&enabled).await,
        json!(["act-stop", "act-pause", "act-delete danger"])
    );
    assert_eq!(
        buttons("plain-1").await,
        json!([]),
        "alice-plain may not stop, pause or delete"
    );
    let plain_form = b
        .eval(
            &format!("return document.querySelector('#w-{n}-alice-plain-desktop').innerHTML"),
            vec![],
        )
        .await;
    let plain_form = plain_form.as_str().unwrap();
    assert!(
        !plain_form.contains("name=\"profile\"") && !plain_form.contains("name=\"zone\""),
        "profile and zone offered though not allowed: {plain_form}"
    );

    // 6. Refused launches show the operator's reason, live (the page reloads on its own).
    let locked = launch(&b, &portal, n, "alice-locked", Some("Disabled")).await;
    reason_shown(&b, &ns, &portal, &locked, "is disabled").await;
    let max = launch(&b, &portal, n, "alice-plain", None).await;
    reason_shown(&b, &ns, &portal, &max, "maxKasmsPerUser is 1").await;
    let spent = launch(&b, &portal, n, "alice-spent", None).await;
    reason_shown(&b, &ns, &portal, &spent, "UsageLimitExhausted").await;
    // A zone sent though the groups do not allow it (the form offers none: added by hand).
    open(&b, &portal).await;
    b.eval(
        &format!(
            "const f = document.querySelector('#w-{n}-alice-nozone-desktop form'); \
             if (f.querySelector('[name=zone]')) return 0; \
             const i = document.createElement('input'); i.type = 'hidden'; i.name = 'zone'; \
             i.value = 'zone-a'; f.appendChild(i); return 1"
        ),
        vec![],
    )
    .await;
    b.click(&format!("#w-{n}-alice-nozone-desktop form button.launch"))
        .await;
    let notice = b
        .wait_until(
            "const n = document.getElementById('notice'); return n && n.textContent",
            LONG,
        )
        .await;
    let nozone = notice
        .as_str()
        .unwrap()
        .trim_start_matches("Launched desktop as ")
        .trim_end_matches('.')
        .to_string();
    reason_shown(&b, &ns, &portal, &nozone, "allowZoneSelection").await;
    open(&b, &portal).await;
    b.eval(
        &format!("document.getElementById('s-{locked}').scrollIntoView(); return 1"),
        vec![],
    )
    .await;
    shoot(&b, "refused").await;

    // 7. Stop from the dashboard, as the person: the session stops.
    open(&b, &portal).await;
    b.click(&format!("#s-{disabled} button.act-stop")).await;
    b.wait_until(
        "const n = document.getElementById('notice'); return n && n.textContent",
        LONG,
    )
    .await;
    wait_phase(&ns, &disabled, SessionPhase::Stopped).await;

    // 8. Forged posts: without a token refused; with alice's token for bob's session refused by
    //    the cluster's own policy; bob's session untouched.
    open(&b, &portal).await;
    let token = b.form_token().await;
    let (status, body) = b
        .post_form(
            "/.cubicle/act",
            json!({"ns": n, "name": "bob-1", "action": "delete"}),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("did not carry a valid token"), "{body}");
    let (status, body) = b
        .post_form(
            "/.cubicle/act",
            json!({"token": token, "ns": n, "name": "bob-1", "action": "delete"}),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("The cluster refused to delete session bob-1")
            && body.contains("may not act for User bob"),
        "the policy's refusal in words: {body}"
    );
    let bob1 = ns.api::<Session>().get("bob-1").await.unwrap();
    assert!(
        bob1.metadata.deletion_timestamp.is_none(),
        "bob's session was touched"
    );
    // The failure page, as a person sees it.
    b.eval(
        "document.open(); document.write(arguments[0]); document.close(); return 1",
        vec![json!(body)],
    )
    .await;
    shoot(&b, "refused-action").await;

    drop(gw);
    op.stop().await;
    b.close().await;
}

/// Figures, printed (run with `--nocapture`): the dashboard of a person with 20 sessions
/// (server time and bytes), and the API requests that 1,000 open dashboards cause (each loads
/// the page and polls once). The only assertion is that showing and polling make no API request
/// at all beyond the gateway's own watches: the pages come from the caches.
#[tokio::test]
async fn dashboard_figures_for_twenty_sessions_and_a_thousand_open_dashboards() {
    use cubicle::apicount::ApiCounter;
    use cubicle::client::{self, ApiBudget};
    use kube::config::{KubeConfigOptions, Kubeconfig};

    install_crds().await;
    let ns = TestNs::new("dash-fig").await;
    let key = credentials::ensure(ns.client.clone(), &ns.name, "cubicle-session-key")
        .await
        .unwrap();
    apply(&ns).await;
    // 20 sessions of a disabled User: refused at once, no pods needed to fill the page.
    for i in 0..20 {
        create(
            &ns,
            &session(&format!("s-{i:02}"), "alice-locked", "desktop", json!({})),
        )
        .await;
    }
    let op = Operator::start(&ns.name).await;
    let kc = Kubeconfig::read_from(crate::support::kubeconfig()).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    let counter = ApiCounter::default();
    let counted = client::build(config, counter.clone(), ApiBudget::UNLIMITED).expect("client");
    let gw = gateway::start(
        counted,
        GatewayConfig {
            public: PublicUrl::parse("http://cubicle.localhost:1").unwrap(),
            namespaces: vec![ns.name.clone()],
            auth: AuthMode::TrustedHeader {
                user: http::HeaderName::from_static("x-user"),
                groups: None,
            },
            username_prefix: "oidc:".into(),
            groups_prefix: "oidc:".into(),
            key,
        },
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    wait_for("gateway synced", LONG, || async {
        gw.ready().then_some(())
    })
    .await;
    let addr = gw.addr;
    let get = |path: &'static str| async move {
        use http_body_util::BodyExt;
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut tx, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header("host", "cubicle.localhost:1")
            .header("x-user", "alice")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let start = Instant::now();
        let resp = tx.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, body, start.elapsed())
    };
    // Wait until every session is refused and shown so.
    wait_for("20 refused sessions on the page", LONG, || async {
        let (_, body, _) = get("/").await;
        let page = String::from_utf8_lossy(&body).into_owned();
        (page.matches("data-phase=\"Refused\"").count() == 20).then_some(())
    })
    .await;
    let before = counter.snapshot();
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..1000 {
        let (status, body, t) = get("/").await;
        assert_eq!(status, 200);
        bytes = body.len();
        times.push(t);
        let (status, _, _) = get("/.cubicle/state").await;
        assert_eq!(status, 200);
    }
    let after = counter.snapshot();
    times.sort();
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    let p50 = times[times.len() / 2];
    let p99 = times[times.len() * 99 / 100];
    let mut caused: Vec<String> = Vec::new();
    for (k, n) in &after {
        let d = n - before.get(k).copied().unwrap_or(0);
        if d > 0 && !matches!(k.verb, "watch" | "list") {
            caused.push(format!("{} {}: {d}", k.verb, k.resource));
        }
    }
    println!(
        "dashboard of a person with 20 sessions: {bytes} bytes; server time (request to last byte over loopback) median {:.2} ms, mean {:.2} ms, p99 {:.2} ms (targets: <= 20 ms, <= 100 KB)",
        p50.as_secs_f64() * 1000.0,
        mean.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0
    );
    println!(
        "1,000 open dashboards (1,000 page loads + 1,000 polls): {} API requests beyond the gateway's watches {caused:?}",
        caused.len()
    );
    assert!(
        caused.is_empty(),
        "showing the dashboard asked the API server: {caused:?}"
    );
    drop(gw);
    op.stop().await;
}
