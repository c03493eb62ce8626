//! The desktop in a browser, on the real node: headless Chromium signs in through the local
//! OpenID provider at the gateway's portal, opens the session's own origin and sees the desktop
//! (noVNC's `vnc_lite.html` connected over the gateway's WebSocket, a canvas with pixels drawn by
//! the container's X server). Then the live connection keeps the session alive past its
//! `keepaliveExpiration`, and once the tab is closed the session expires on time: not before
//! `keepaliveExpiration` after the last keepalive.
//!
//! The operator and the gateway run in-process (the operator's controllers scoped to the test's
//! namespace); the session is a real container on the real node, the provider a real one.
//!
//! Robustness (a previous version failed in CI): the session is opened with a long
//! `keepaliveExpiration` and only shortened (by patching the Group) once the desktop is
//! connected. With a short one from the start, a slow page load let the session expire while
//! noVNC's modules were still loading: the gateway closed those responses (status 0 in the
//! browser) and, the expired session deleted, answered 404 on the reload. Every wait prints the
//! Session's phase and conditions, the pod's state, the gateway's counters and the browser's
//! resource timings when it gives up.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cubicle::crd::v1alpha1::{KEEPALIVE_ANNOTATION, Session, SessionPhase};
use cubicle::credentials;
use cubicle::devenv::realnode::REAL_NODE_LABEL;
use cubicle::gateway::Gateway;
use cubicle::gateway::core::PublicUrl;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use crate::browser::Browser;
use crate::operator::Operator;
use crate::support::TestNs;

const TEST: &str = "realnode_desktop";
const KEY_SECRET: &str = "cubicle-session-key";
/// How long the session lives without a keepalive once the expiry part starts.
const EXPIRATION: Duration = Duration::from_secs(20);
const INTERVAL: &str = "3s";
/// Generous waits: the machine is shared and slow.
const LONG: Duration = Duration::from_secs(180);

fn tenant(ns: &str) -> Vec<Value> {
    vec![
        // A long keepaliveExpiration while the desktop connects; shortened later.
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Group", "metadata": {"name": "everyone", "namespace": ns},
               "spec": {"priority": 100, "settings": {"keepaliveExpiration": "1h", "keepaliveInterval": INTERVAL,
                        "keepaliveExpirationAction": "delete", "allowPersistentProfile": false}}}),
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "User", "metadata": {"name": "alice", "namespace": ns},
               "spec": {"groups": ["everyone"]}}),
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Workspace", "metadata": {"name": "desktop", "namespace": ns},
               "spec": {"image": "cubicle.localhost/desktop:1", "imagePullPolicy": "Never", "groups": ["everyone"],
                        "resources": {"cores": "1", "memory": "1Gi"},
                        "runConfig": {"pod": {
                            "nodeSelector": {REAL_NODE_LABEL: "true"},
                            "tolerations": [{"key": REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}]}}}}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
               "metadata": {"name": "use-alice", "namespace": ns},
               "rules": [{"apiGroups": ["cubicle.dev"], "resources": ["users"], "verbs": ["use"],
                          "resourceNames": ["alice"]}]}),
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "use-alice", "namespace": ns},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "use-alice"},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "oidc:alice"}]}),
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Session", "metadata": {"name": "desk", "namespace": ns},
               "spec": {"user": "alice", "workspace": "desktop"}}),
    ]
}

/// Everything a failure report needs: the Session, its pod, the gateway, the browser's page.
struct Scene<'a> {
    ns: &'a TestNs,
    gw: &'a Gateway,
    browser: Option<&'a Browser>,
}

impl Scene<'_> {
    async fn report(&self) -> String {
        let mut out = crate::diagnose(self.ns, "desk").await;
        let st = &self.gw.state;
        out += &format!(
            "gateway: {} requests, {} keepalive writes, {} open sessions, {} connections closed by it\n",
            st.stats.requests.load(Ordering::Relaxed),
            st.stats.keepalive_writes.load(Ordering::Relaxed),
            st.registry.sessions().len(),
            st.registry.closed_by_gateway.load(Ordering::Relaxed),
        );
        if let Some(b) = self.browser {
            out += &format!("browser at {}\n", b.url().await);
            let timings = b
                .client
                .execute(
                    "return performance.getEntriesByType('resource').map(e => \
                     `${e.name} ${e.responseStatus} ${Math.round(e.startTime)}+${Math.round(e.duration)}ms`).join('\\n')",
                    vec![],
                )
                .await
                .unwrap_or(Value::Null);
            out += &format!(
                "resource timings:\n{}\npage text: {}\n",
                timings.as_str().unwrap_or("(none)"),
                b.text().await
            );
            let shot = b.screenshot("failure").await;
            out += &format!("screenshot: {}\n", shot.display());
        }
        out
    }

    /// Polls `check` every 250 ms until it returns `Some`; after `timeout`, panics with the report.
    async fn wait<T, F, Fut>(&self, what: &str, timeout: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = check().await {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{TEST}: {what}: not after {timeout:?}\n{}",
                    self.report().await
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Whether `script` returns `true` in the page within `timeout`.
    async fn page_within(&self, script: &str, timeout: Duration) -> bool {
        let b = self.browser.expect("a browser");
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if b.client.execute(script, vec![]).await.ok() == Some(Value::Bool(true)) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        false
    }

    /// Runs `script` in the page until it returns `true`.
    async fn page_until(&self, what: &str, script: &str, timeout: Duration) {
        let b = self.browser.expect("a browser");
        self.wait(what, timeout, || async {
            b.client
                .execute(script, vec![])
                .await
                .ok()
                .filter(|v| v == &Value::Bool(true))
                .map(|_| ())
        })
        .await
    }
}

/// The newest keepalive the Session carries (annotation or status).
fn last_keepalive(s: &Session) -> Option<jiff::Timestamp> {
    let annotated = s
        .annotations()
        .get(KEEPALIVE_ANNOTATION)
        .and_then(|v| v.parse::<jiff::Timestamp>().ok());
    let persisted = s
        .status
        .as_ref()
        .and_then(|st| st.last_keepalive.as_ref())
        .map(|k| k.time.0);
    annotated.max(persisted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_signs_in_sees_the_desktop_and_the_tab_keeps_the_session_alive() {
    let _node = crate::take_the_node();
    if !crate::real_node_or_skip(TEST) {
        return;
    }
    let Some(browser) = Browser::start(TEST).await else {
        return;
    };
    let started = Instant::now();
    crate::kubectl(&["apply", "--server-side", "-f", "crds/"]);
    crate::kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        "--timeout=60s",
    ]);
    let ns = crate::restricted_ns("rn-desk").await;
    let key = credentials::ensure(ns.client.clone(), &ns.name, KEY_SECRET)
        .await
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let public = PublicUrl::parse(&format!("http://cubicle.localhost:{port}")).unwrap();
    let (k, p) = (key.clone(), public.clone());
    let op = Operator::start_with(&ns.name, move |c| {
        c.credentials = Some(k);
        c.gateway_url = Some(p);
    })
    .await;
    let people: [(&str, &[&str]); 1] = [("alice", &[])];
    let (issuer, gw) = crate::support::oidc_gateway(&ns, &public, &key, port, &people).await;
    let mut scene = Scene {
        ns: &ns,
        gw: &gw,
        browser: None,
    };

    let t = Instant::now();
    let path = crate::support::run_dir().join(format!("{}-desktop.yaml", ns.name));
    let docs: Vec<String> = tenant(&ns.name)
        .iter()
        .map(|d| serde_json::to_string(d).unwrap())
        .collect();
    std::fs::write(&path, docs.join("\n---\n")).unwrap();
    crate::kubectl(&["apply", "-n", &ns.name, "-f", path.to_str().unwrap()]);
    let api = ns.api::<Session>();
    let s = scene
        .wait("the session Running", LONG, || async {
            let s = api.get("desk").await.ok()?;
            (s.status.as_ref()?.phase == Some(SessionPhase::Running)).then_some(s)
        })
        .await;
    let pod = crate::running_pod(&ns, "desk").await;
    let uid = s.uid().unwrap();
    let ip = pod.status.as_ref().unwrap().pod_ip.clone().unwrap();
    // The desktop's own web server answers with the session's password (the gateway's).
    let auth = format!("kasm_user:{}", key.session_password(&uid));
    scene
        .wait("the desktop's web server on 6901", LONG, || async {
            let url = format!("https://{ip}:6901/vnc_lite.html");
            (crate::desktop_status(&url, &auth) == "200").then_some(())
        })
        .await;
    eprintln!(
        "[realnode] session to a Ready desktop on {ip}: {} ms",
        t.elapsed().as_millis()
    );

    // Sign in: the session's origin sends the browser to the portal, the portal to the provider.
    let t = Instant::now();
    let origin = public.session(&uid);
    browser.goto(&origin).await;
    crate::browser::sign_in(&browser, "alice", &issuer.people[0].password).await;
    scene.browser = Some(&browser);
    let o = origin.clone();
    scene
        .wait("back on the session's origin, signed in", LONG, || async {
            browser.url().await.starts_with(&o).then_some(())
        })
        .await;
    eprintln!(
        "[realnode] Chromium sign-in to the session's origin: {} ms",
        t.elapsed().as_millis()
    );

    // The desktop: noVNC connects through the gateway and draws the X server's screen.
    let t = Instant::now();
    browser
        .goto(&format!("{origin}vnc_lite.html?path=websockify"))
        .await;
    const CONNECTED: &str = "const s = document.getElementById('status'); \
                             return !!s && s.textContent.startsWith('Connected to')";
    if !scene.page_within(CONNECTED, Duration::from_secs(90)).await {
        // Say what the page and the session looked like, then give it one more load.
        eprintln!(
            "[realnode] noVNC not connected after 90 s, reloading once:\n{}",
            scene.report().await
        );
        browser.client.refresh().await.unwrap();
    }
    scene
        .page_until("noVNC connected", CONNECTED, Duration::from_secs(90))
        .await;
    // Pixels, not only a canvas: the X server's root window and the xterm differ in colour.
    scene
        .page_until(
            "the desktop drawn on noVNC's canvas",
            "const c = document.querySelector('#screen canvas'); \
             if (!c || c.width < 100 || c.height < 100) return false; \
             const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; \
             const seen = new Set(); \
             for (let i = 0; i < d.length; i += 4 * 97) seen.add(d[i] << 16 | d[i+1] << 8 | d[i+2]); \
             return seen.size >= 2",
            Duration::from_secs(60),
        )
        .await;
    eprintln!(
        "[realnode] noVNC connected and drawing: {} ms",
        t.elapsed().as_millis()
    );
    let shot = browser.screenshot("desktop").await;
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 5000,
        "{TEST}: not a screenshot of a desktop: {} bytes",
        png.len()
    );
    eprintln!("[realnode] desktop screenshot: {}", shot.display());

    // Now a short keepaliveExpiration: the live connection's keepalives keep the session.
    let groups = ns.api::<cubicle::crd::v1alpha1::Group>();
    groups
        .patch(
            "everyone",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"settings": {
                "keepaliveExpiration": format!("{}s", EXPIRATION.as_secs())}}})),
        )
        .await
        .unwrap();
    let applied = scene
        .wait("the short keepaliveExpiration applied", LONG, || async {
            let s = api.get("desk").await.ok()?;
            let at = s.status.as_ref()?.expires_at.as_ref()?.0;
            let left = at.duration_since(jiff::Timestamp::now());
            (left < jiff::SignedDuration::try_from(EXPIRATION * 2).unwrap())
                .then_some(jiff::Timestamp::now())
        })
        .await;
    let first = last_keepalive(&api.get("desk").await.unwrap());
    // Twice the expiration and a bit: without the connection the session would be gone.
    let hold = EXPIRATION * 2 + Duration::from_secs(5);
    let until = Instant::now() + hold;
    while Instant::now() < until {
        let s = api.get_opt("desk").await.unwrap();
        let alive = s.as_ref().is_some_and(|s| {
            s.metadata.deletion_timestamp.is_none()
                && s.status.as_ref().and_then(|st| st.phase) == Some(SessionPhase::Running)
        });
        if !alive {
            panic!(
                "{TEST}: the session ended while the tab was open ({} s after the short expiration applied at {applied})\n{}",
                jiff::Timestamp::now().duration_since(applied).as_secs(),
                scene.report().await
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let s = api.get("desk").await.unwrap();
    let latest = last_keepalive(&s);
    assert!(
        latest > first,
        "{TEST}: no keepalive written in {hold:?} while connected (first {first:?}, latest {latest:?})\n{}",
        scene.report().await
    );
    let connected: bool = browser
        .eval(
            "const s = document.getElementById('status'); return s.textContent.startsWith('Connected to')",
            vec![],
        )
        .await
        .as_bool()
        .unwrap_or(false);
    assert!(
        connected,
        "{TEST}: noVNC dropped its connection\n{}",
        scene.report().await
    );
    eprintln!(
        "[realnode] alive {} s past a {} s keepaliveExpiration with the tab open; {} keepalive writes",
        hold.as_secs(),
        EXPIRATION.as_secs(),
        gw.state.stats.keepalive_writes.load(Ordering::Relaxed)
    );

    // Close the tab (a fresh one stays, so the browser lives): the session expires on time.
    let fresh = browser.client.new_window(true).await.unwrap();
    browser.client.close_window().await.unwrap();
    browser.client.switch_to_window(fresh.handle).await.unwrap();
    let closed_at = jiff::Timestamp::now();
    let last = std::sync::Mutex::new(latest);
    let gone = scene
        .wait(
            "the session deleted after the tab closed",
            EXPIRATION + LONG,
            || async {
                match api.get_opt("desk").await.ok()? {
                    None => Some(jiff::Timestamp::now()),
                    Some(s) if s.metadata.deletion_timestamp.is_some() => {
                        Some(jiff::Timestamp::now())
                    }
                    Some(s) => {
                        let mut l = last.lock().unwrap();
                        *l = (*l).max(last_keepalive(&s));
                        None
                    }
                }
            },
        )
        .await;
    let last = last.into_inner().unwrap().expect("a keepalive was written");
    let after = gone.duration_since(last);
    eprintln!(
        "[realnode] tab closed at {closed_at}, last keepalive {last}, session deleted {} ms after it (keepaliveExpiration {} s)",
        after.as_millis(),
        EXPIRATION.as_secs()
    );
    assert!(
        after >= jiff::SignedDuration::try_from(EXPIRATION).unwrap(),
        "{TEST}: expired early, {after:?} after the last keepalive"
    );
    assert!(
        after < jiff::SignedDuration::try_from(EXPIRATION + Duration::from_secs(15)).unwrap(),
        "{TEST}: expired late, {after:?} after the last keepalive"
    );
    scene
        .wait("no connection left open at the gateway", LONG, || async {
            gw.state.registry.sessions().is_empty().then_some(())
        })
        .await;
    browser.close().await;
    drop(gw);
    drop(issuer);
    op.stop().await;
    eprintln!(
        "[realnode] desktop in the browser, keepalive and expiry: {} ms",
        started.elapsed().as_millis()
    );
}
