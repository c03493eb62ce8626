//! Sessions belong to the person who asked (issue 19): the Session admission policy, the
//! per-User RBAC the operator keeps, and the end-user role, on the real control plane with
//! several static-token identities (`cubicle::devenv::people`: alice, bob, mallory who has no
//! User, root who is in the admin group).

use std::time::Duration;

use cubicle::crd::v1alpha1::{Session, SessionPhase, User};
use cubicle::devenv::people;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::api::install_crds;
use crate::operator::Operator;
use crate::sessions::{session, tenant, wait_phase};
use crate::support::{self, TestNs, wait_for};

const LONG: Duration = Duration::from_secs(90);
/// How long a grant or revocation may take to reach the API server's authorizer (the operator
/// reconciles at once; RBAC's own caches follow within a second or so).
const SETTLE: Duration = Duration::from_secs(20);

/// A client acting as demo person `short`.
async fn person(short: &str) -> Client {
    let kc = people::kubeconfig(support::run_dir(), short);
    cubicle::devenv::client_from_kubeconfig(&kc)
        .await
        .unwrap_or_else(|e| panic!("{short}'s kubeconfig {}: {e}", kc.display()))
}

fn username(short: &str) -> &'static str {
    people::PEOPLE
        .iter()
        .find(|p| p.short == short)
        .map(|p| p.username)
        .unwrap()
}

/// A tenant whose alice and bob carry the demo identities, the end-user role bound to every
/// demo person in the namespace, and an operator.
async fn setup(prefix: &str) -> (TestNs, Operator) {
    install_crds().await;
    let ns = TestNs::new(prefix).await;
    tenant(&ns).await;
    for (user, short) in [("alice", "alice"), ("bob", "bob")] {
        set_identity(&ns, user, Some(username(short))).await;
    }
    let rb: RoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "people"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": cubicle::access::DEV_USER_ROLE},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                      "name": people::PEOPLE_GROUP}]
    }))
    .unwrap();
    ns.api::<RoleBinding>()
        .create(&PostParams::default(), &rb)
        .await
        .unwrap();
    let op = Operator::start(&ns.name).await;
    (ns, op)
}

async fn set_identity(ns: &TestNs, user: &str, identity: Option<&str>) {
    let id = identity.map(|u| json!({"username": u}));
    ns.api::<User>()
        .patch(
            user,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"identity": id}})),
        )
        .await
        .unwrap();
}

fn sessions_as(c: &Client, ns: &TestNs) -> Api<Session> {
    Api::namespaced(c.clone(), &ns.name)
}

/// Creates `s` as `c`, retrying while the person's grant is still on its way (403).
async fn create_allowed(c: &Client, ns: &TestNs, s: &Session) {
    let api = sessions_as(c, ns);
    wait_for("the create to be allowed", SETTLE, || async {
        match api.create(&PostParams::default(), s).await {
            Ok(_) => Some(()),
            Err(kube::Error::Api(e)) if e.code == 403 => None,
            Err(e) => panic!("create {:?}: {e}", s.metadata.name),
        }
    })
    .await;
}

/// Asserts a refusal by the admission policy naming the requester, the User and the rule.
fn assert_refused<T: std::fmt::Debug>(r: Result<T, kube::Error>, requester: &str, user: &str) {
    match r {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{e:?}");
            let want = format!("{requester} may not act for User {user}");
            assert!(e.message.contains(&want), "{:?} lacks {want:?}", e.message);
            assert!(
                e.message.contains(&format!("users/{user}, verb use")),
                "the rule is named: {}",
                e.message
            );
        }
        other => panic!("expected a refusal of {requester} acting for {user}, got {other:?}"),
    }
}

fn state(s: &str) -> Patch<serde_json::Value> {
    Patch::Merge(json!({"spec": {"state": s}}))
}

#[tokio::test]
async fn own_session_create_pause_stop_resume_delete_are_allowed() {
    let (ns, op) = setup("id-own").await;
    let alice = person("alice").await;
    let api = sessions_as(&alice, &ns);
    create_allowed(&alice, &ns, &session("a1", "alice", "desktop", json!({}))).await;
    wait_phase(&ns, "a1", SessionPhase::Running).await;
    let pp = PatchParams::default();
    api.patch("a1", &pp, &state("Paused")).await.unwrap();
    wait_phase(&ns, "a1", SessionPhase::Paused).await;
    api.patch("a1", &pp, &state("Running")).await.unwrap();
    wait_phase(&ns, "a1", SessionPhase::Running).await;
    api.patch("a1", &pp, &state("Stopped")).await.unwrap();
    wait_phase(&ns, "a1", SessionPhase::Stopped).await;
    api.patch("a1", &pp, &state("Running")).await.unwrap();
    wait_phase(&ns, "a1", SessionPhase::Running).await;
    api.delete("a1", &DeleteParams::default()).await.unwrap();
    // The operator's own writes (status, the accounting finalizer) pass the policy: the
    // Session goes away completely.
    wait_for("a1 gone", LONG, || async {
        matches!(ns.api::<Session>().get_opt("a1").await, Ok(None)).then_some(())
    })
    .await;
    op.stop().await;
}

#[tokio::test]
async fn another_persons_create_patch_and_delete_are_refused() {
    let (ns, op) = setup("id-other").await;
    let alice = person("alice").await;
    // Alice's own grant is in place (so the refusals below are about bob, not a slow grant).
    create_allowed(&alice, &ns, &session("mine", "alice", "desktop", json!({}))).await;
    let api = sessions_as(&alice, &ns);
    let alice_name = username("alice");
    assert_refused(
        api.create(
            &PostParams::default(),
            &session("theirs", "bob", "desktop", json!({})),
        )
        .await,
        alice_name,
        "bob",
    );
    assert!(
        ns.api::<Session>()
            .get_opt("theirs")
            .await
            .unwrap()
            .is_none()
    );
    // Bob's own session, then alice tries to change and delete it.
    let bob = person("bob").await;
    create_allowed(&bob, &ns, &session("bobs", "bob", "desktop", json!({}))).await;
    assert_refused(
        api.patch("bobs", &PatchParams::default(), &state("Stopped"))
            .await,
        alice_name,
        "bob",
    );
    assert_refused(
        api.delete("bobs", &DeleteParams::default()).await,
        alice_name,
        "bob",
    );
    let s = ns.api::<Session>().get("bobs").await.unwrap();
    assert!(s.metadata.deletion_timestamp.is_none());
    assert_ne!(
        s.spec.state,
        Some(cubicle::crd::v1alpha1::DesiredState::Stopped)
    );
    op.stop().await;
}

#[tokio::test]
async fn a_delete_of_the_collection_removes_only_the_requesters_own() {
    let (ns, op) = setup("id-coll").await;
    let alice = person("alice").await;
    let bob = person("bob").await;
    create_allowed(&alice, &ns, &session("a1", "alice", "desktop", json!({}))).await;
    create_allowed(&alice, &ns, &session("a2", "alice", "desktop", json!({}))).await;
    create_allowed(&bob, &ns, &session("b1", "bob", "desktop", json!({}))).await;
    let r = sessions_as(&alice, &ns)
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    // The API server deletes what passes and reports the refusal of the rest.
    if let Err(kube::Error::Api(e)) = &r {
        assert!(
            e.message.contains("may not act for User bob"),
            "{:?}",
            e.message
        );
    }
    wait_for("alice's sessions gone", LONG, || async {
        let l = ns
            .api::<Session>()
            .list(&ListParams::default())
            .await
            .ok()?;
        let left: Vec<String> = l
            .items
            .iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        (left == ["b1"]).then_some(())
    })
    .await;
    op.stop().await;
}

#[tokio::test]
async fn a_session_for_a_missing_user_is_refused() {
    let (ns, op) = setup("id-missing").await;
    let alice = person("alice").await;
    create_allowed(&alice, &ns, &session("mine", "alice", "desktop", json!({}))).await;
    assert_refused(
        sessions_as(&alice, &ns)
            .create(
                &PostParams::default(),
                &session("ghost", "nobody", "desktop", json!({})),
            )
            .await,
        username("alice"),
        "nobody",
    );
    op.stop().await;
}

#[tokio::test]
async fn an_admin_group_member_may_act_for_every_user() {
    let (ns, op) = setup("id-admin").await;
    let root = person("root").await;
    let api = sessions_as(&root, &ns);
    for u in ["alice", "bob", "dave"] {
        api.create(
            &PostParams::default(),
            &session(&format!("for-{u}"), u, "desktop", json!({})),
        )
        .await
        .unwrap_or_else(|e| panic!("root acting for {u}: {e}"));
    }
    api.patch("for-bob", &PatchParams::default(), &state("Stopped"))
        .await
        .unwrap();
    api.delete("for-alice", &DeleteParams::default())
        .await
        .unwrap();
    op.stop().await;
}

#[tokio::test]
async fn a_person_with_no_user_is_refused() {
    let (ns, op) = setup("id-nouser").await;
    let mallory = person("mallory").await;
    for u in ["alice", "bob", "mallory"] {
        assert_refused(
            sessions_as(&mallory, &ns)
                .create(
                    &PostParams::default(),
                    &session(&format!("m-{u}"), u, "desktop", json!({})),
                )
                .await,
            username("mallory"),
            u,
        );
    }
    assert!(
        ns.api::<Session>()
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    op.stop().await;
}

#[tokio::test]
async fn spec_user_is_immutable() {
    let (ns, op) = setup("id-immut").await;
    let alice = person("alice").await;
    create_allowed(&alice, &ns, &session("a1", "alice", "desktop", json!({}))).await;
    // Even the admin (whom the policy lets act for anyone) cannot move a Session to another
    // User: the CRD's own validation refuses it.
    let r = ns
        .api::<Session>()
        .patch(
            "a1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"user": "bob"}})),
        )
        .await;
    match r {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422, "{e:?}");
            assert!(e.message.contains("user is immutable"), "{}", e.message);
        }
        other => panic!("spec.user changed: {other:?}"),
    }
    // And alice, who may not act for bob, is refused by the policy as well.
    let r = sessions_as(&alice, &ns)
        .patch(
            "a1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"user": "bob"}})),
        )
        .await;
    assert!(
        matches!(r, Err(kube::Error::Api(ref e)) if e.code == 403 || e.code == 422),
        "{r:?}"
    );
    assert_eq!(
        ns.api::<Session>().get("a1").await.unwrap().spec.user,
        "alice"
    );
    op.stop().await;
}

async fn may(
    c: &Client,
    ns: &str,
    verb: &str,
    (group, resource): (&str, &str),
    sub: Option<&str>,
) -> bool {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(ns.into()),
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource: sub.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<SelfSubjectAccessReview>::all(c.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .unwrap()
        .allowed
}

#[tokio::test]
async fn the_end_user_role_grants_no_pods_exec_claims_or_secrets() {
    let (ns, op) = setup("id-role").await;
    let alice = person("alice").await;
    create_allowed(&alice, &ns, &session("a1", "alice", "desktop", json!({}))).await;
    wait_phase(&ns, "a1", SessionPhase::Running).await;
    let pods: Api<Pod> = Api::namespaced(alice.clone(), &ns.name);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "mine"},
        "spec": {"containers": [{"name": "c", "image": "example.invalid/x:1"}]}
    }))
    .unwrap();
    let forbidden = |r: Result<_, kube::Error>, what: &str| match r {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{what}: {e:?}"),
        Ok(_) => panic!("{what} was allowed"),
        Err(e) => panic!("{what}: {e}"),
    };
    forbidden(
        pods.create(&PostParams::default(), &pod).await.map(|_| ()),
        "creating a pod",
    );
    forbidden(pods.get("a1").await.map(|_| ()), "reading the session pod");
    forbidden(
        Api::<PersistentVolumeClaim>::namespaced(alice.clone(), &ns.name)
            .list(&ListParams::default())
            .await
            .map(|_| ()),
        "listing claims",
    );
    forbidden(
        Api::<Secret>::namespaced(alice.clone(), &ns.name)
            .list(&ListParams::default())
            .await
            .map(|_| ()),
        "listing Secrets",
    );
    // exec and port-forward are a create on the subresource (and the WebSocket upgrade a get).
    for (verb, sub) in [
        ("create", "exec"),
        ("get", "exec"),
        ("create", "portforward"),
        ("get", "portforward"),
    ] {
        assert!(
            !may(&alice, &ns.name, verb, ("", "pods"), Some(sub)).await,
            "{verb} pods/{sub} allowed"
        );
    }
    // What the role is for, for contrast.
    assert!(
        may(
            &alice,
            &ns.name,
            "create",
            ("cubicle.dev", "sessions"),
            None
        )
        .await
    );
    assert!(!may(&alice, &ns.name, "create", ("", "pods"), None).await);
    Api::<User>::namespaced(alice.clone(), &ns.name)
        .list(&ListParams::default())
        .await
        .expect("people read the namespace's Users");
    op.stop().await;
}

#[tokio::test]
async fn an_identity_removed_from_a_user_loses_access_within_one_reconcile() {
    let (ns, op) = setup("id-revoke").await;
    let alice = person("alice").await;
    create_allowed(&alice, &ns, &session("a1", "alice", "desktop", json!({}))).await;
    // The grant the operator made: owned by the User, bound to her identity only.
    let rb = ns
        .api::<RoleBinding>()
        .get("cubicle-use-alice")
        .await
        .unwrap();
    let subjects = rb.subjects.unwrap();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].name, username("alice"));
    assert_eq!(rb.metadata.owner_references.unwrap()[0].kind, "User");

    // Re-identified: dave's identity now acts for User alice, hers no longer.
    set_identity(&ns, "alice", Some(username("dave"))).await;
    wait_for("the binding follows the new identity", SETTLE, || async {
        let rb = ns
            .api::<RoleBinding>()
            .get("cubicle-use-alice")
            .await
            .ok()?;
        (rb.subjects?[0].name == username("dave")).then_some(())
    })
    .await;
    let api = sessions_as(&alice, &ns);
    let refused = wait_for("alice refused after re-identification", SETTLE, || async {
        match api
            .create(
                &PostParams::default(),
                &session("a2", "alice", "desktop", json!({})),
            )
            .await
        {
            Err(e @ kube::Error::Api(_)) => Some(Err::<Session, _>(e)),
            Ok(_) => {
                let _ = ns
                    .api::<Session>()
                    .delete("a2", &DeleteParams::default())
                    .await;
                None
            }
            Err(e) => panic!("{e}"),
        }
    })
    .await;
    assert_refused(refused, username("alice"), "alice");
    let dave = person("dave").await;
    create_allowed(&dave, &ns, &session("d1", "alice", "desktop", json!({}))).await;

    // Identity removed: nobody but the admins acts for alice; the Role and binding are gone.
    let removed = std::time::Instant::now();
    set_identity(&ns, "alice", None).await;
    wait_for("the grant removed", SETTLE, || async {
        let rb = ns
            .api::<RoleBinding>()
            .get_opt("cubicle-use-alice")
            .await
            .ok()?;
        let role = ns.api::<Role>().get_opt("cubicle-use-alice").await.ok()?;
        (rb.is_none() && role.is_none()).then_some(())
    })
    .await;
    let api = sessions_as(&dave, &ns);
    let refused = wait_for("dave refused once the identity is gone", SETTLE, || async {
        match api.delete("d1", &DeleteParams::default()).await {
            Err(e @ kube::Error::Api(_)) => Some(Err::<(), _>(e)),
            Ok(_) => panic!("dave deleted alice's session after losing the identity"),
            Err(e) => panic!("{e}"),
        }
    })
    .await;
    assert_refused(refused, username("dave"), "alice");
    eprintln!(
        "[identity] identity removed to first refusal: {} ms",
        removed.elapsed().as_millis()
    );

    // A deleted User takes its grant with it.
    ns.api::<User>()
        .delete("bob", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("bob's grant removed with him", SETTLE, || async {
        ns.api::<RoleBinding>()
            .get_opt("cubicle-use-bob")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    op.stop().await;
}

/// Waits until `short` may `use` User `user` (the operator's grant has reached the authorizer).
async fn wait_may_use(short: &str, ns: &TestNs, user: &str) {
    let c = person(short).await;
    wait_for(&format!("{short} may use User {user}"), SETTLE, || async {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(ns.name.clone()),
                    verb: Some("use".into()),
                    group: Some("cubicle.dev".into()),
                    resource: Some("users".into()),
                    name: Some(user.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let r = Api::<SelfSubjectAccessReview>::all(c.clone())
            .create(&PostParams::default(), &review)
            .await
            .ok()?;
        r.status?.allowed.then_some(())
    })
    .await;
}

/// The people CLI as `cubicle` with `--kubeconfig`, or through kubectl as the plugin
/// `kubectl cubicle` (the binary symlinked as `kubectl-cubicle` on PATH) with `KUBECONFIG`.
struct Cli {
    bin_dir: std::path::PathBuf,
}

impl Cli {
    fn new() -> Self {
        let bin_dir = support::run_dir().join("plugin-bin");
        std::fs::create_dir_all(&bin_dir).unwrap();
        let link = bin_dir.join("kubectl-cubicle");
        if !link.exists() {
            std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_cubicle"), &link).unwrap();
        }
        Self { bin_dir }
    }

    /// `cubicle ARGS --kubeconfig <short's>` (asynchronously: the operator runs on this
    /// test's runtime).
    async fn cubicle(&self, short: &str, args: &[&str]) -> std::process::Output {
        let kc = people::kubeconfig(support::run_dir(), short);
        tokio::process::Command::new(env!("CARGO_BIN_EXE_cubicle"))
            .args(args)
            .arg("--kubeconfig")
            .arg(&kc)
            .env("RUST_LOG", "error")
            .output()
            .await
            .unwrap()
    }

    /// `kubectl cubicle ARGS` as `short`.
    async fn kubectl(&self, short: &str, args: &[&str]) -> std::process::Output {
        let kc = people::kubeconfig(support::run_dir(), short);
        let path = format!(
            "{}:{}",
            self.bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        tokio::process::Command::new("kubectl")
            .arg("cubicle")
            .args(args)
            .env("PATH", path)
            .env("KUBECONFIG", &kc)
            .env("RUST_LOG", "error")
            .output()
            .await
            .unwrap()
    }
}

fn ok(o: &std::process::Output, what: &str) -> String {
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{what} failed: {}\n{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn refused(o: &std::process::Output, what: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{what} succeeded: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{what}: one line: {err}");
    err
}

async fn names_of(ns: &TestNs, user: &str) -> Vec<String> {
    let mut v: Vec<String> = ns
        .api::<Session>()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|s| s.spec.user == user && s.metadata.deletion_timestamp.is_none())
        .map(|s| s.metadata.name.unwrap())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn the_cli_acts_for_two_people_and_refuses_with_the_reason() {
    let (ns, op) = setup("id-cli").await;
    wait_may_use("alice", &ns, "alice").await;
    wait_may_use("bob", &ns, "bob").await;
    let cli = Cli::new();
    let n = ns.name.as_str();

    // Alice, with `cubicle`: launch and wait.
    let out = ok(
        &cli.cubicle("alice", &["launch", "desktop", "--wait", "-n", n])
            .await,
        "alice's launch",
    );
    assert!(out.contains("launched desktop as User alice"), "{out}");
    assert!(out.contains("Running on fake-node-"), "{out}");
    let alice_sessions = names_of(&ns, "alice").await;
    assert_eq!(alice_sessions.len(), 1);
    let a1 = alice_sessions[0].clone();

    // Bob, through kubectl as a plugin.
    let out = ok(
        &cli.kubectl("bob", &["launch", "desktop", "--wait", "-n", n])
            .await,
        "bob's launch via kubectl",
    );
    assert!(out.contains("as User bob"), "{out}");
    let b1 = names_of(&ns, "bob").await[0].clone();

    // Each sees their own sessions only.
    let out = ok(
        &cli.cubicle("alice", &["sessions", "-n", n]).await,
        "alice's list",
    );
    assert!(out.contains(&a1) && !out.contains(&b1), "{out}");
    assert!(
        out.contains("Running") && out.contains("keepalive"),
        "{out}"
    );
    assert!(out.contains("usage: "), "{out}");
    let out = ok(
        &cli.kubectl("bob", &["sessions", "-n", n]).await,
        "bob's list",
    );
    assert!(out.contains(&b1) && !out.contains(&a1), "{out}");

    // Refused before anything is created: bob may not choose a zone (his groups do not allow
    // it); the line names him, his User and the rule.
    let err = refused(
        &cli.cubicle("bob", &["launch", "desktop", "--zone", "zone-a", "-n", n])
            .await,
        "bob's zoned launch",
    );
    assert!(
        err.contains("bob.martin@northwind.example as User bob: refused (ZoneSelectionNotAllowed)"),
        "{err}"
    );
    // Refused by the operator (the dedicated pool assigns servers, bob has none): the reason
    // comes back with --wait, and the refused Session is removed.
    let err = refused(
        &cli.kubectl("bob", &["launch", "dedicated", "--wait", "-n", n])
            .await,
        "bob's dedicated launch",
    );
    assert!(
        err.contains("bob.martin@northwind.example as User bob: refused (NoAssignedServer)"),
        "{err}"
    );
    assert_eq!(
        names_of(&ns, "bob").await,
        [b1.clone()],
        "nothing left behind"
    );
    // A person with no User.
    let err = refused(
        &cli.cubicle("mallory", &["launch", "desktop", "-n", n])
            .await,
        "mallory's launch",
    );
    assert!(
        err.contains("mallory@northwind.example: no User in namespace"),
        "{err}"
    );

    // Alice cannot touch bob's session.
    let err = refused(
        &cli.cubicle("alice", &["stop", &b1, "-n", n]).await,
        "alice stopping bob's session",
    );
    assert!(
        err.contains("alice@northwind.example as User alice: refused: Session")
            && err.contains("belongs to User bob"),
        "{err}"
    );
    let err = refused(
        &cli.kubectl("alice", &["delete", &b1, "-n", n]).await,
        "alice deleting bob's session",
    );
    assert!(err.contains("belongs to User bob"), "{err}");
    assert_eq!(names_of(&ns, "bob").await, [b1.clone()]);

    // Her own: keepalive (the existing command, on her kubeconfig), pause, resume, stop, delete.
    let kc = people::kubeconfig(support::run_dir(), "alice");
    let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_cubicle"))
        .args(["keepalive", &a1, "-n", n])
        .env("KUBECONFIG", &kc)
        .output()
        .await
        .unwrap();
    ok(&o, "alice's keepalive");
    ok(
        &cli.cubicle("alice", &["pause", &a1, "-n", n]).await,
        "pause",
    );
    wait_phase(&ns, &a1, SessionPhase::Paused).await;
    ok(
        &cli.kubectl("alice", &["resume", &a1, "-n", n]).await,
        "resume",
    );
    wait_phase(&ns, &a1, SessionPhase::Running).await;
    ok(&cli.cubicle("alice", &["stop", &a1, "-n", n]).await, "stop");
    wait_phase(&ns, &a1, SessionPhase::Stopped).await;
    ok(
        &cli.cubicle("alice", &["delete", &a1, "-n", n]).await,
        "delete",
    );
    wait_for("alice's session gone", LONG, || async {
        names_of(&ns, "alice").await.is_empty().then_some(())
    })
    .await;
    op.stop().await;
}
