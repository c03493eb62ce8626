//! The person's own settings (seed 001) in headless Chromium on the real control plane: saved
//! on the Settings page and shown again after a reload, the theme applied to every page, auto
//! launch after the next sign-in (a fresh browser), a GitOps server-side apply of the
//! configuration repository leaving them in place, and another person unable to read or write
//! them (a forged post and a direct API request as that person). The auto-launched session is
//! then paused, resumed and deleted with the dashboard's buttons.

use std::time::{Duration, Instant};

use cubicle::crd::v1alpha1::{Session, SessionPhase, Theme, User, UserPreferences};
use cubicle::credentials;
use cubicle::gateway::core::PublicUrl;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

use crate::api::install_crds;
use crate::browser::Browser;
use crate::operator::Operator;
use crate::sessions::wait_phase;
use crate::support::{TestNs, wait_for};

/// Generous: a loaded 2-core machine runs this beside other tests.
const LONG: Duration = Duration::from_secs(180);

/// The configuration repository: what a GitOps tool applies. No UserPreferences in it.
fn repo(first_name: &str) -> String {
    format!(
        r#"
apiVersion: cubicle.dev/v1alpha1
kind: Group
metadata: {{name: team}}
spec:
  priority: 10
  settings:
    allowKasmStop: true
    allowKasmPause: true
    allowKasmDelete: true
    sessionTimeLimit: 3h
    keepaliveExpiration: 3h
---
apiVersion: cubicle.dev/v1alpha1
kind: User
metadata: {{name: alice}}
spec:
  firstName: {first_name}
  groups: [team]
  identity: {{username: "oidc:alice"}}
  settings: {{chatSoundEffects: false}}
---
apiVersion: cubicle.dev/v1alpha1
kind: User
metadata: {{name: bob}}
spec: {{groups: [team], identity: {{username: "oidc:bob"}}}}
---
apiVersion: cubicle.dev/v1alpha1
kind: Workspace
metadata: {{name: desktop}}
spec:
  image: example.invalid/desktop:1
  displayName: Desktop
  description: A full desktop.
  groups: [team]
  resources: {{cores: "1", memory: 1Gi}}
---
apiVersion: cubicle.dev/v1alpha1
kind: Workspace
metadata: {{name: notes}}
spec:
  image: example.invalid/notes:1
  displayName: Notes
  groups: [team]
"#
    )
}

/// Server-side applies the configuration repository as a GitOps tool does (its own field
/// manager, conflicts forced).
async fn apply_repo(ns: &TestNs, manager: &str, first_name: &str) {
    use kube::core::{ApiResource, GroupVersionKind};
    use serde::Deserialize;
    for doc in serde_yaml::Deserializer::from_str(&repo(first_name)) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        let obj: DynamicObject = serde_yaml::from_value(v).unwrap();
        let tm = obj.types.clone().unwrap();
        let (group, version) = tm.api_version.split_once('/').unwrap();
        let gvk = GroupVersionKind::gvk(group, version, &tm.kind);
        let ar = ApiResource::from_gvk_with_plural(&gvk, &format!("{}s", tm.kind.to_lowercase()));
        Api::<DynamicObject>::namespaced_with(ns.client.clone(), &ns.name, &ar)
            .patch(
                &obj.name_any(),
                &PatchParams::apply(manager).force(),
                &Patch::Apply(&obj),
            )
            .await
            .unwrap_or_else(|e| panic!("apply {} {}: {e}", tm.kind, obj.name_any()));
    }
}

/// A client that acts as `user` (impersonation by the test's admin credentials).
async fn client_as(user: &str) -> Client {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    let kc = Kubeconfig::read_from(crate::support::kubeconfig()).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    config.auth_info.impersonate = Some(user.into());
    config.auth_info.impersonate_groups = Some(vec!["system:authenticated".into()]);
    Client::try_from(config).expect("client")
}

/// What the namespace holds, for failure messages.
async fn state_of(ns: &TestNs) -> String {
    let prefs = ns
        .api::<UserPreferences>()
        .list(&Default::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .map(|p| format!("{} {:?}", p.name_any(), p.spec))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_else(|e| format!("(list failed: {e})"));
    let sessions = ns
        .api::<Session>()
        .list(&Default::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .map(|s| {
                    format!(
                        "{} user={} ws={} state={:?} phase={:?}",
                        s.name_any(),
                        s.spec.user,
                        s.spec.workspace,
                        s.spec.state,
                        s.status.as_ref().and_then(|st| st.phase)
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_else(|e| format!("(list failed: {e})"));
    format!("preferences: [{prefs}]\nsessions: [{sessions}]")
}

/// Signs in as `who` through the provider's own form, starting at the portal.
async fn sign_in(b: &Browser, portal: &str, who: &str, password: &str) {
    b.goto(&format!("{portal}/")).await;
    b.click("a[href='/.cubicle/login']").await;
    crate::browser::sign_in(b, who, password).await;
}

/// The computed background colour of the page's body.
async fn background(b: &Browser) -> String {
    b.eval(
        "return getComputedStyle(document.body).backgroundColor",
        vec![],
    )
    .await
    .as_str()
    .unwrap_or_default()
    .to_string()
}

/// The settings form of `user` as the page shows it.
async fn form_values(b: &Browser, id: &str) -> Value {
    b.eval(
        "const f = document.getElementById('f-' + arguments[0]); if (!f) return null; \
         const c = n => f.querySelector('[name=' + n + ']').checked; \
         return {auto: c('autoLaunchSession'), tips: c('showTipsDuringSession'), \
                 panel: c('toggleControlPanel'), chat: c('chatSoundEffects'), \
                 ws: f.querySelector('[name=defaultWorkspace]').value, \
                 theme: (f.querySelector('[name=theme]:checked') || {}).value}",
        vec![json!(id)],
    )
    .await
}

/// Sets the form of `id` to `want` (the keys of [`form_values`]) and saves it; waits for the
/// page that says so.
async fn save(b: &Browser, id: &str, want: &Value) {
    b.eval(
        "const f = document.getElementById('f-' + arguments[0]); const w = arguments[1]; \
         const set = (n, v) => { f.querySelector('[name=' + n + ']').checked = v }; \
         set('autoLaunchSession', w.auto); set('showTipsDuringSession', w.tips); \
         set('toggleControlPanel', w.panel); set('chatSoundEffects', w.chat); \
         f.querySelector('[name=defaultWorkspace]').value = w.ws; \
         f.querySelector('[name=theme][value=' + w.theme + ']').checked = true; return 1",
        vec![json!(id), want.clone()],
    )
    .await;
    b.click(&format!("#f-{id} button.save")).await;
    let notice = b
        .wait_until(
            "const n = document.getElementById('notice'); return n && n.textContent",
            LONG,
        )
        .await;
    assert_eq!(
        notice.as_str(),
        Some("Saved the settings of alice."),
        "page: {}",
        b.text().await
    );
}

/// Clicks the session's `action` button on the dashboard and waits for the notice.
async fn act(b: &Browser, ns: &TestNs, portal: &str, name: &str, action: &str) {
    let css = format!("#s-{name} button.act-{action}");
    let deadline = Instant::now() + LONG;
    loop {
        b.open_portal(&format!("{portal}/")).await;
        let there = b
            .eval(
                "return !!document.querySelector(arguments[0])",
                vec![json!(css)],
            )
            .await;
        if there == json!(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no {action} button for {name}; page: {}\n{}",
            b.text().await,
            state_of(ns).await
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    b.click(&css).await;
    let notice = b
        .wait_until(
            "const n = document.getElementById('notice'); return n && n.textContent",
            LONG,
        )
        .await;
    assert!(
        notice.as_str().is_some_and(|n| n.starts_with("Done:")),
        "{action} {name}: {notice:?}; page: {}",
        b.text().await
    );
}

#[tokio::test]
async fn a_persons_settings_are_theirs_survive_gitops_and_auto_launch_after_sign_in() {
    let Some(b) = Browser::start("settings").await else {
        return;
    };
    install_crds().await;
    let ns = TestNs::new("prefs").await;
    let n = ns.name.clone();
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
    apply_repo(&ns, "gitops", "Alice").await;
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
    let people: [(&str, &[&str]); 2] = [("alice", &[]), ("bob", &[])];
    let (issuer, gw) = crate::support::oidc_gateway(&ns, &public, &key, port, &people).await;
    // The operator has granted alice her own preferences (the per-User Role).
    let as_alice = client_as("oidc:alice").await;
    wait_for("alice's Role grants her preferences", LONG, || {
        let c = as_alice.clone();
        let ns = ns.name.clone();
        async move { can_i(&c, "create", "alice", &ns).await.then_some(()) }
    })
    .await;
    let password = |who: &str| {
        issuer
            .people
            .iter()
            .find(|p| p.name == who)
            .unwrap()
            .password
            .clone()
    };

    // 1. Sign in; no settings yet: no auto launch, the dashboard.
    sign_in(&b, &portal, "alice", &password("alice")).await;
    let who = b
        .wait_until(
            "const w = document.getElementById('who'); return w && w.textContent",
            LONG,
        )
        .await;
    assert_eq!(who, "oidc:alice");
    assert!(
        ns.api::<Session>()
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "a session was launched without auto launch: {}",
        state_of(&ns).await
    );

    // 2. The Settings page shows what is in force: the User's own chatSoundEffects: false
    //    from the repository, Kasm's defaults otherwise, the browser's theme.
    let settings = format!("{portal}/.cubicle/settings");
    b.open_portal(&settings).await;
    let id = format!("{n}-alice");
    assert_eq!(
        form_values(&b, &id).await,
        json!({"auto": false, "tips": true, "panel": true, "chat": false, "ws": "", "theme": "auto"})
    );
    let auto_bg = background(&b).await;

    // 3. Save: dark, auto launch of Desktop, no tips. Shown again after the save and after a
    //    reload; stored in alice's UserPreferences, by the dashboard, as alice.
    let dark = json!({"auto": true, "tips": false, "panel": true, "chat": true, "ws": "desktop", "theme": "dark"});
    save(&b, &id, &dark).await;
    assert_eq!(form_values(&b, &id).await, dark, "after saving");
    b.open_portal(&settings).await;
    assert_eq!(form_values(&b, &id).await, dark, "after a reload");
    let dark_bg = background(&b).await;
    assert_eq!(dark_bg, "rgb(18, 20, 23)", "the dark theme's background");
    b.screenshot("settings-dark").await;
    b.open_portal(&format!("{portal}/")).await;
    assert_eq!(
        background(&b).await,
        dark_bg,
        "the dashboard follows the theme too"
    );
    let prefs = ns.api::<UserPreferences>().get("alice").await.unwrap();
    assert_eq!(prefs.spec.theme, Some(Theme::Dark));
    assert_eq!(prefs.spec.auto_launch_session, Some(true));
    assert_eq!(prefs.spec.default_workspace.as_deref(), Some("desktop"));
    assert_eq!(prefs.spec.show_tips_during_session, Some(false));
    let managers: Vec<String> = prefs
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(
        managers,
        ["cubicle-dashboard"],
        "written by the dashboard only"
    );
    let user = ns.api::<User>().get("alice").await.unwrap();
    assert!(
        user.managed_fields()
            .iter()
            .all(|m| m.manager.as_deref() != Some("cubicle-dashboard")),
        "the dashboard wrote into the User: {:?}",
        user.managed_fields()
    );

    // 4. Light: the background differs from dark.
    let light = json!({"auto": true, "tips": false, "panel": true, "chat": true, "ws": "desktop", "theme": "light"});
    b.open_portal(&settings).await;
    save(&b, &id, &light).await;
    let light_bg = background(&b).await;
    assert_eq!(light_bg, "rgb(255, 255, 255)");
    assert_ne!(light_bg, dark_bg);
    assert!(
        [&light_bg, &dark_bg].contains(&&auto_bg),
        "auto is the browser's light or dark: {auto_bg}"
    );
    b.screenshot("settings-light").await;
    b.open_portal(&settings).await;
    save(&b, &id, &dark).await;

    // 5. The GitOps tool applies the repository again (a changed first name; conflicts
    //    forced): alice's settings stay as she left them.
    apply_repo(&ns, "argocd", "Alicia").await;
    let user = ns.api::<User>().get("alice").await.unwrap();
    assert_eq!(user.spec.first_name.as_deref(), Some("Alicia"));
    let after = ns.api::<UserPreferences>().get("alice").await.unwrap();
    assert_eq!(
        after.spec, prefs.spec,
        "the repository's apply changed them"
    );
    b.open_portal(&settings).await;
    assert_eq!(form_values(&b, &id).await, dark, "after the GitOps apply");

    // 6. Another person can neither read nor write them: a forged post (without a token, and
    //    with alice's token for bob's) is refused, and bob's own API requests are denied.
    let token = b.form_token().await;
    let (status, body) = b
        .post_form(
            "/.cubicle/settings",
            json!({"ns": n, "user": "alice", "theme": "light"}),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("did not carry a valid token"), "{body}");
    let (status, body) = b
        .post_form(
            "/.cubicle/settings",
            json!({"token": token, "ns": n, "user": "bob", "theme": "light"}),
        )
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("The cluster refused to save the settings of bob"),
        "{body}"
    );
    assert!(
        ns.api::<UserPreferences>()
            .get_opt("bob")
            .await
            .unwrap()
            .is_none(),
        "alice wrote bob's preferences"
    );
    let as_bob: Api<UserPreferences> = Api::namespaced(client_as("oidc:bob").await, &n);
    match as_bob.get("alice").await {
        Err(kube::Error::Api(e)) if e.code == 403 => {}
        other => panic!("bob read alice's preferences: {other:?}"),
    }
    let patch = Patch::Merge(json!({"spec": {"theme": "light"}}));
    match as_bob.patch("alice", &PatchParams::default(), &patch).await {
        Err(kube::Error::Api(e)) if e.code == 403 => {}
        other => panic!("bob changed alice's preferences: {other:?}"),
    }
    match as_bob.list(&Default::default()).await {
        Err(kube::Error::Api(e)) if e.code == 403 => {}
        other => panic!("bob listed preferences: {other:?}"),
    }
    // (Alice herself may: the denial above is bob's, not everyone's.)
    let mine: Api<UserPreferences> = Api::namespaced(as_alice.clone(), &n);
    assert_eq!(mine.get("alice").await.unwrap().spec, prefs.spec);
    assert_eq!(
        ns.api::<UserPreferences>().get("alice").await.unwrap().spec,
        prefs.spec
    );
    b.close().await;

    // 7. The next sign-in, in a fresh browser: auto launch starts Desktop and takes alice to
    //    the new session's own address.
    let b = Browser::start("settings-autolaunch")
        .await
        .expect("a second browser");
    sign_in(&b, &portal, "alice", &password("alice")).await;
    let s = wait_for("the auto-launched session", LONG, || async {
        let l = ns.api::<Session>().list(&Default::default()).await.ok()?;
        l.items.into_iter().find(|s| s.spec.user == "alice")
    })
    .await;
    assert_eq!(s.spec.workspace, "desktop");
    assert_eq!(s.spec.persistent_profile, None, "the default profile mode");
    let origin = public.session(s.metadata.uid.as_deref().unwrap());
    let deadline = Instant::now() + LONG;
    loop {
        let url = b.url().await;
        if url.starts_with(&origin) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "auto launch did not take alice to {origin}: at {url}; page: {}\n{}",
            b.text().await,
            state_of(&ns).await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let name = s.name_any();
    wait_phase(&ns, &name, SessionPhase::Running).await;
    assert_eq!(
        ns.api::<Session>()
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .len(),
        1,
        "one launch only: {}",
        state_of(&ns).await
    );

    // 8. Pause, Resume and Delete with the dashboard's buttons, as alice.
    act(&b, &ns, &portal, &name, "pause").await;
    wait_phase(&ns, &name, SessionPhase::Paused).await;
    act(&b, &ns, &portal, &name, "resume").await;
    wait_phase(&ns, &name, SessionPhase::Running).await;
    act(&b, &ns, &portal, &name, "delete").await;
    wait_for("the session deleted", LONG, || async {
        match ns.api::<Session>().get_opt(&name).await {
            Ok(None) => Some(()),
            _ => None,
        }
    })
    .await;

    drop(gw);
    op.stop().await;
    b.close().await;
}

/// Whether `client` may `verb` the UserPreferences `name` in `ns` (a SelfSubjectAccessReview).
async fn can_i(client: &Client, verb: &str, name: &str, ns: &str) -> bool {
    use k8s_openapi::api::authorization::v1::SelfSubjectAccessReview;
    let review: SelfSubjectAccessReview = serde_json::from_value(json!({
        "spec": {"resourceAttributes": {"group": "cubicle.dev", "resource": "userpreferences",
                 "verb": verb, "name": name, "namespace": ns}}
    }))
    .unwrap();
    Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .ok()
        .and_then(|r| r.status)
        .is_some_and(|s| s.allowed)
}
