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
