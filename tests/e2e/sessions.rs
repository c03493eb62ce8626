//! Sessions on the real control plane: launch refusals, placement, zones, profiles, lifecycle,
//! Pod Security "restricted", and the API writes per launch.

use std::collections::BTreeMap;
use std::time::Duration;

use cubicle::crd::v1alpha1::{Server, ServerPool, Session, SessionPhase, User};
use k8s_openapi::api::core::v1::{Event, Namespace, Node, PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::api::install_crds;
use crate::operator::Operator;
use crate::support::{TestNs, wait_for};

const LONG: Duration = Duration::from_secs(90);

/// A small tenant: groups with different permissions, users, workspaces, a dedicated pool.
pub(crate) async fn tenant(ns: &TestNs) {
    let docs = r#"
apiVersion: cubicle.dev/v1alpha1
kind: Group
metadata: {name: everyone}
spec:
  priority: 100
  settings:
    autoAddLocalUsers: true
    allowPersistentProfile: true
    allowKasmStop: true
    allowKasmPause: false
    maxKasmsPerUser: 2
    exposeUserEnv: true
---
apiVersion: cubicle.dev/v1alpha1
kind: Group
metadata: {name: zoners}
spec:
  priority: 10
  settings:
    allowZoneSelection: true
    allowKasmPause: true
---
apiVersion: cubicle.dev/v1alpha1
kind: Group
metadata: {name: noprofile}
spec:
  priority: 5
  settings:
    allowPersistentProfile: false
---
apiVersion: cubicle.dev/v1alpha1
kind: User
metadata: {name: alice}
spec: {realm: local, groups: [zoners]}
---
apiVersion: cubicle.dev/v1alpha1
kind: User
metadata: {name: bob}
spec: {realm: local}
---
apiVersion: cubicle.dev/v1alpha1
kind: User
metadata: {name: carol}
spec: {realm: local, disabled: true}
---
apiVersion: cubicle.dev/v1alpha1
kind: User
metadata: {name: dave}
spec: {realm: ldap}
---
apiVersion: cubicle.dev/v1alpha1
kind: User
metadata: {name: erin}
spec: {realm: local, groups: [noprofile]}
---
apiVersion: cubicle.dev/v1alpha1
kind: Workspace
metadata: {name: desktop}
spec:
  image: example.invalid/desktop:1
  groups: [everyone, zoners, noprofile]
  resources: {cores: "1", memory: 1Gi}
  persistentProfile:
    mountPath: /home/kasm-user
    claimTemplate: {name: "profile-{username}", size: 1Gi}
---
apiVersion: cubicle.dev/v1alpha1
kind: Workspace
metadata: {name: dedicated}
spec:
  image: example.invalid/desktop:1
  groups: [everyone]
  serverPool: dedicated
---
apiVersion: cubicle.dev/v1alpha1
kind: ServerPool
metadata: {name: dedicated}
spec: {assignmentEnabled: true}
---
apiVersion: cubicle.dev/v1alpha1
kind: Server
metadata: {name: ws-a}
spec: {pool: dedicated, nodeName: fake-node-0, maxSessions: 1}
---
apiVersion: cubicle.dev/v1alpha1
kind: Server
metadata: {name: ws-b}
spec: {pool: dedicated, nodeName: fake-node-1, maxSessions: 2}
---
apiVersion: cubicle.dev/v1alpha1
kind: Server
metadata: {name: ws-c}
spec: {pool: dedicated, nodeName: fake-node-2}
---
apiVersion: cubicle.dev/v1alpha1
kind: ServerAssignment
metadata: {name: alice-dedicated}
spec: {users: [alice], servers: [ws-a, ws-b]}
"#;
    apply_yaml(ns, docs).await;
}

async fn apply_yaml(ns: &TestNs, docs: &str) {
    use kube::api::DynamicObject;
    use kube::core::{ApiResource, GroupVersionKind};
    for doc in serde_yaml::Deserializer::from_str(docs) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        let obj: DynamicObject = serde_yaml::from_value(v).unwrap();
        let tm = obj.types.clone().unwrap();
        let (group, version) = tm.api_version.split_once('/').unwrap();
        let gvk = GroupVersionKind::gvk(group, version, &tm.kind);
        let plural = format!("{}s", tm.kind.to_lowercase());
        let ar = ApiResource::from_gvk_with_plural(&gvk, &plural);
        let api: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &ar);
        api.patch(
            &obj.name_any(),
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap_or_else(|e| panic!("apply {} {}: {e}", tm.kind, obj.name_any()));
    }
}

use serde::Deserialize;

pub(crate) fn session(
    name: &str,
    user: &str,
    workspace: &str,
    extra: serde_json::Value,
) -> Session {
    let mut spec = json!({"user": user, "workspace": workspace});
    if let serde_json::Value::Object(m) = extra {
        for (k, v) in m {
            spec[k] = v;
        }
    }
    serde_json::from_value(json!({
        "apiVersion": "cubicle.dev/v1alpha1", "kind": "Session",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap()
}

pub(crate) async fn create(ns: &TestNs, s: &Session) {
    ns.api::<Session>()
        .create(&PostParams::default(), s)
        .await
        .unwrap();
}

pub(crate) async fn wait_phase(ns: &TestNs, name: &str, phase: SessionPhase) -> Session {
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

fn condition<'a>(
    s: &'a Session,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    s.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

async fn refused_with(ns: &TestNs, name: &str, reason: &str) {
    let s = wait_phase(ns, name, SessionPhase::Refused).await;
    let c = condition(&s, "Admitted").expect("Admitted condition");
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", reason),
        "{name}: {}",
        c.message
    );
    assert!(!c.message.is_empty());
    // The conditions tell the truth: a refused session is not ready, for the same reason.
    let ready = condition(&s, "Ready").expect("Ready condition");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", reason)
    );
    // A Warning event with the same reason, on the session.
    let events: Api<Event> = ns.api();
    wait_for(&format!("a {reason} event for {name}"), LONG, || async {
        let l = events.list(&ListParams::default()).await.ok()?;
        l.items
            .iter()
            .any(|e| {
                e.involved_object.name.as_deref() == Some(name)
                    && e.reason.as_deref() == Some(reason)
            })
            .then_some(())
    })
    .await;
    assert!(
        ns.api::<Pod>().get_opt(name).await.unwrap().is_none(),
        "a refused session has no pod"
    );
}

async fn setup(prefix: &str) -> (TestNs, Operator) {
    install_crds().await;
    let ns = TestNs::new(prefix).await;
    tenant(&ns).await;
    let op = Operator::start(&ns.name).await;
    (ns, op)
}

#[tokio::test]
async fn each_launch_check_refuses_with_a_reason_and_an_event() {
    let (ns, op) = setup("refuse").await;
    create(&ns, &session("carol-1", "carol", "desktop", json!({}))).await;
    create(&ns, &session("dave-1", "dave", "desktop", json!({}))).await;
    create(
        &ns,
        &session("bob-dedicated", "bob", "dedicated", json!({})),
    )
    .await;
    create(
        &ns,
        &session("bob-zone", "bob", "desktop", json!({"zone": "zone-a"})),
    )
    .await;
    create(
        &ns,
        &session(
            "erin-profile",
            "erin",
            "desktop",
            json!({"persistentProfile": "Enabled"}),
        ),
    )
    .await;
    create(
        &ns,
        &session(
            "alice-zone-c",
            "alice",
            "dedicated",
            json!({"zone": "zone-c"}),
        ),
    )
    .await;
    create(
        &ns,
        &session(
            "alice-zone-x",
            "alice",
            "desktop",
            json!({"zone": "zone-x"}),
        ),
    )
    .await;
    create(&ns, &session("nobody-1", "nobody", "desktop", json!({}))).await;
    create(
        &ns,
        &session("bob-nows", "bob", "no-such-workspace", json!({})),
    )
    .await;
    refused_with(&ns, "carol-1", "UserDisabled").await;
    refused_with(&ns, "dave-1", "NotInAllowedGroup").await;
    refused_with(&ns, "bob-dedicated", "NoAssignedServer").await;
    refused_with(&ns, "bob-zone", "ZoneSelectionNotAllowed").await;
    refused_with(&ns, "erin-profile", "PersistentProfileNotAllowed").await;
    refused_with(&ns, "alice-zone-c", "NoCapacityInZone").await;
    refused_with(&ns, "alice-zone-x", "NoCapacityInZone").await;
    refused_with(&ns, "nobody-1", "UserNotFound").await;
    refused_with(&ns, "bob-nows", "WorkspaceNotFound").await;

    // maxKasmsPerUser: 2 (group everyone): the third concurrent session is refused.
    for i in 1..=3 {
        create(
            &ns,
            &session(&format!("bob-{i}"), "bob", "desktop", json!({})),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(1100)).await; // distinct creation timestamps
    }
    wait_phase(&ns, "bob-1", SessionPhase::Running).await;
    wait_phase(&ns, "bob-2", SessionPhase::Running).await;
    refused_with(&ns, "bob-3", "MaxSessionsReached").await;
    // A refusal is final: ending one session frees the slot, but the refused request never
    // starts on its own; the person launches again.
    ns.api::<Session>()
        .delete("bob-1", &DeleteParams::default())
        .await
        .unwrap();
    create(&ns, &session("bob-4", "bob", "desktop", json!({}))).await;
    wait_phase(&ns, "bob-4", SessionPhase::Running).await;
    // Nor when the cause of a refusal goes away: the pool's assignment switched off.
    ns.api::<ServerPool>()
        .patch(
            "dedicated",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"assignmentEnabled": false}})),
        )
        .await
        .unwrap();
    create(
        &ns,
        &session("bob-dedicated-2", "bob", "dedicated", json!({})),
    )
    .await;
    // bob-4 and bob-2 hold both slots: this one is refused for that, not for the assignment.
    refused_with(&ns, "bob-dedicated-2", "MaxSessionsReached").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (name, reason) in [
        ("bob-3", "MaxSessionsReached"),
        ("bob-dedicated", "NoAssignedServer"),
    ] {
        let s = ns.api::<Session>().get(name).await.unwrap();
        assert_eq!(
            s.status.as_ref().and_then(|s| s.phase),
            Some(SessionPhase::Refused),
            "{name} stays refused"
        );
        let c = condition(&s, "Admitted").unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", reason));
        assert!(ns.api::<Pod>().get_opt(name).await.unwrap().is_none());
    }
    op.stop().await;
}

async fn pod_node(ns: &TestNs, name: &str) -> String {
    let pods = ns.api::<Pod>();
    wait_for(&format!("pod {name} scheduled"), LONG, || async {
        pods.get(name).await.ok()?.spec?.node_name
    })
    .await
}

async fn zone_of(ns: &TestNs, node: &str) -> String {
    Api::<Node>::all(ns.client.clone())
        .get(node)
        .await
        .unwrap()
        .labels()["topology.kubernetes.io/zone"]
        .clone()
}

#[tokio::test]
async fn sessions_go_to_assigned_servers_least_loaded_first_within_capacity() {
    let (ns, op) = setup("place").await;
    create(&ns, &session("a1", "alice", "dedicated", json!({}))).await;
    let s1 = wait_phase(&ns, "a1", SessionPhase::Running).await;
    // Both assigned servers are empty: ties go by name.
    assert_eq!(s1.status.as_ref().unwrap().server.as_deref(), Some("ws-a"));
    assert_eq!(pod_node(&ns, "a1").await, "fake-node-0");
    create(&ns, &session("a2", "alice", "dedicated", json!({}))).await;
    let s2 = wait_phase(&ns, "a2", SessionPhase::Running).await;
    // ws-a is full (maxSessions 1): the next goes to ws-b, never to the unassigned ws-c.
    assert_eq!(s2.status.as_ref().unwrap().server.as_deref(), Some("ws-b"));
    assert_eq!(pod_node(&ns, "a2").await, "fake-node-1");
    // The views count them: each server its own, the pool both, the user both.
    counts(&ns, [Some(1), Some(1), Some(0)], Some(2), Some(2)).await;
    // An ended session leaves every count.
    ns.api::<Session>()
        .delete("a1", &DeleteParams::default())
        .await
        .unwrap();
    counts(&ns, [Some(0), Some(1), Some(0)], Some(1), Some(1)).await;
    op.stop().await;
}

/// Waits until servers ws-a, ws-b and ws-c, pool `dedicated` and user alice report these
/// session counts.
async fn counts(ns: &TestNs, servers: [Option<u32>; 3], pool: Option<u32>, alice: Option<u32>) {
    let want = (servers, pool, alice);
    let mut seen = None;
    let got = tokio::time::timeout(LONG, async {
        loop {
            let mut now = ([None; 3], None, None);
            for (i, name) in ["ws-a", "ws-b", "ws-c"].into_iter().enumerate() {
                now.0[i] = ns
                    .api::<Server>()
                    .get(name)
                    .await
                    .ok()
                    .and_then(|s| s.status?.sessions);
            }
            now.1 = ns
                .api::<ServerPool>()
                .get("dedicated")
                .await
                .ok()
                .and_then(|p| p.status?.sessions);
            now.2 = ns
                .api::<User>()
                .get("alice")
                .await
                .ok()
                .and_then(|u| u.status?.active_sessions);
            if now == want {
                return;
            }
            seen = Some(now);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        got.is_ok(),
        "session counts (servers, pool, alice): want {want:?}, last seen {seen:?}"
    );
}

#[tokio::test]
async fn a_profile_pins_its_sessions_to_its_zone() {
    let (ns, op) = setup("zones").await;
    // A named zone: the new profile volume is provisioned there (WaitForFirstConsumer).
    create(
        &ns,
        &session("z1", "alice", "desktop", json!({"zone": "zone-b"})),
    )
    .await;
    wait_phase(&ns, "z1", SessionPhase::Running).await;
    let node = pod_node(&ns, "z1").await;
    assert_eq!(zone_of(&ns, &node).await, "zone-b");
    let claims = ns.api::<PersistentVolumeClaim>();
    wait_for("profile claim bound", LONG, || async {
        let c = claims.get("profile-alice").await.ok()?;
        (c.status?.phase.as_deref() == Some("Bound")).then_some(())
    })
    .await;
    // Another zone than the profile's is refused with the reason, never left unschedulable.
    create(
        &ns,
        &session("z2", "alice", "desktop", json!({"zone": "zone-a"})),
    )
    .await;
    refused_with(&ns, "z2", "ProfileZoneConflict").await;
    ns.api::<Session>()
        .delete("z2", &DeleteParams::default())
        .await
        .unwrap();
    // No zone: the session follows its profile.
    create(&ns, &session("z3", "alice", "desktop", json!({}))).await;
    wait_phase(&ns, "z3", SessionPhase::Running).await;
    let node3 = pod_node(&ns, "z3").await;
    assert_eq!(zone_of(&ns, &node3).await, "zone-b");
    op.stop().await;
}

#[tokio::test]
async fn profiles_survive_stop_delete_and_reset() {
    let (ns, op) = setup("profile").await;
    let claims = ns.api::<PersistentVolumeClaim>();
    create(&ns, &session("p1", "bob", "desktop", json!({}))).await;
    let s = wait_phase(&ns, "p1", SessionPhase::Running).await;
    let profile = s.status.as_ref().unwrap().profile.clone().unwrap();
    assert_eq!(profile.claim.as_deref(), Some("profile-bob"));
    let claim = claims.get("profile-bob").await.unwrap();
    assert!(
        claim.owner_references().is_empty(),
        "a profile claim is owned by nobody"
    );
    let pod = ns.api::<Pod>().get("p1").await.unwrap();
    let vols = pod.spec.unwrap().volumes.unwrap();
    assert!(vols.iter().any(|v| {
        v.persistent_volume_claim
            .as_ref()
            .is_some_and(|c| c.claim_name == "profile-bob")
    }));
    let uid = claim.uid();

    // Stop keeps the profile; delete keeps it too.
    ns.api::<Session>()
        .patch(
            "p1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"state": "Stopped"}})),
        )
        .await
        .unwrap();
    wait_phase(&ns, "p1", SessionPhase::Stopped).await;
    ns.api::<Session>()
        .delete("p1", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("session p1 gone", LONG, || async {
        matches!(ns.api::<Session>().get_opt("p1").await, Ok(None)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        claims.get("profile-bob").await.unwrap().uid(),
        uid,
        "the profile claim survived"
    );

    // Reset archives the old claim (relabelled, kept) and mounts a fresh one.
    create(
        &ns,
        &session(
            "p2",
            "bob",
            "desktop",
            json!({"persistentProfile": "Reset"}),
        ),
    )
    .await;
    let s2 = wait_phase(&ns, "p2", SessionPhase::Running).await;
    let p2 = s2.status.unwrap().profile.unwrap();
    assert_eq!(format!("{:?}", p2.outcome.unwrap()), "ResetArchived");
    assert_eq!(p2.archived_as.as_deref(), Some("profile-bob"));
    let fresh = p2.claim.unwrap();
    assert_ne!(fresh, "profile-bob");
    let old = claims.get("profile-bob").await.unwrap();
    assert_eq!(
        old.uid(),
        uid,
        "the archived claim is the old one, not deleted"
    );
    assert!(old.labels().contains_key("cubicle.dev/archived"));
    assert!(
        claims
            .get(&fresh)
            .await
            .unwrap()
            .labels()
            .get("cubicle.dev/archived")
            .is_none()
    );

    // Disabled: no profile volume at all.
    create(&ns, &session("p3", "erin", "desktop", json!({}))).await;
    let s3 = wait_phase(&ns, "p3", SessionPhase::Running).await;
    assert_eq!(
        format!("{:?}", s3.status.unwrap().profile.unwrap().outcome.unwrap()),
        "Disabled"
    );
    let pod3 = ns.api::<Pod>().get("p3").await.unwrap();
    assert!(
        pod3.spec
            .unwrap()
            .volumes
            .unwrap()
            .iter()
            .all(|v| v.persistent_volume_claim.is_none())
    );
    op.stop().await;
}

#[tokio::test]
async fn stop_resume_and_pause_follow_the_group_permissions() {
    let (ns, op) = setup("life").await;
    let sessions = ns.api::<Session>();
    let pods = ns.api::<Pod>();
    let set_state = |name: &'static str, state: &'static str| {
        let sessions = sessions.clone();
        async move {
            sessions
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"state": state}})),
                )
                .await
                .unwrap();
        }
    };
    create(&ns, &session("l1", "bob", "desktop", json!({}))).await;
    wait_phase(&ns, "l1", SessionPhase::Running).await;
    let first_uid = pods.get("l1").await.unwrap().uid();

    // bob may stop (everyone: allowKasmStop) but not pause.
    set_state("l1", "Paused").await;
    let s = wait_for("pause refused", LONG, || async {
        let s = sessions.get("l1").await.ok()?;
        condition(&s, "StateChange")
            .filter(|c| c.reason == "PauseNotAllowed")
            .is_some()
            .then_some(s)
    })
    .await;
    assert_eq!(
        s.status.unwrap().phase,
        Some(SessionPhase::Running),
        "a refused pause leaves it running"
    );
    assert!(
        pods.get("l1")
            .await
            .unwrap()
            .labels()
            .get("cubicle.dev/access")
            .is_none()
    );

    set_state("l1", "Stopped").await;
    let stopped = wait_phase(&ns, "l1", SessionPhase::Stopped).await;
    let ready = condition(&stopped, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Stopped"),
        "a stopped session is not ready"
    );
    wait_for("pod removed on stop", LONG, || async {
        matches!(pods.get_opt("l1").await, Ok(None)).then_some(())
    })
    .await;
    assert!(
        ns.api::<PersistentVolumeClaim>()
            .get_opt("profile-bob")
            .await
            .unwrap()
            .is_some()
    );
    let stopped = sessions.get("l1").await.unwrap();
    assert!(
        condition(&stopped, "StateChange").is_none(),
        "an allowed change clears the refusal"
    );

    set_state("l1", "Running").await;
    let resumed = wait_phase(&ns, "l1", SessionPhase::Running).await;
    let ready = condition(&resumed, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "Running")
    );
    let second_uid = pods.get("l1").await.unwrap().uid();
    assert_ne!(first_uid, second_uid, "resume recreates the pod");

    // alice may pause (zoners: allowKasmPause): the pod stays, access is cut.
    create(&ns, &session("l2", "alice", "desktop", json!({}))).await;
    wait_phase(&ns, "l2", SessionPhase::Running).await;
    let uid = pods.get("l2").await.unwrap().uid();
    set_state("l2", "Paused").await;
    let s = wait_phase(&ns, "l2", SessionPhase::Paused).await;
    let ready = condition(&s, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Paused"),
        "a paused session cannot be used"
    );
    let paused = pods.get("l2").await.unwrap();
    assert_eq!(paused.uid(), uid, "pause keeps the pod");
    assert_eq!(
        paused
            .labels()
            .get("cubicle.dev/access")
            .map(String::as_str),
        Some("paused")
    );
    // Drift: the access label removed by hand comes back (the pod's own event reconciles).
    pods.patch(
        "l2",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"cubicle.dev/access": null}}})),
    )
    .await
    .unwrap();
    wait_for("the paused pod's access label restored", LONG, || async {
        let p = pods.get("l2").await.ok()?;
        (p.labels().get("cubicle.dev/access").map(String::as_str) == Some("paused")).then_some(())
    })
    .await;
    assert_eq!(
        pods.get("l2").await.unwrap().uid(),
        uid,
        "repaired in place"
    );
    set_state("l2", "Running").await;
    wait_phase(&ns, "l2", SessionPhase::Running).await;
    assert!(
        pods.get("l2")
            .await
            .unwrap()
            .labels()
            .get("cubicle.dev/access")
            .is_none()
    );
    op.stop().await;
}

#[tokio::test]
async fn session_pods_pass_pod_security_restricted() {
    let (ns, op) = setup("psa").await;
    create(&ns, &session("r1", "bob", "desktop", json!({}))).await;
    wait_phase(&ns, "r1", SessionPhase::Running).await;
    let pod = ns.api::<Pod>().get("r1").await.unwrap();
    let spec = pod.spec.clone().unwrap();
    assert_eq!(spec.automount_service_account_token, Some(false));

    // The operator's pod spec, created (dry run) in a namespace that enforces "restricted".
    let restricted = format!("{}-restricted", ns.name);
    let nsobj = Namespace {
        metadata: ObjectMeta {
            name: Some(restricted.clone()),
            labels: Some(BTreeMap::from([
                (
                    "pod-security.kubernetes.io/enforce".to_string(),
                    "restricted".to_string(),
                ),
                (
                    "pod-security.kubernetes.io/enforce-version".to_string(),
                    "latest".to_string(),
                ),
            ])),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(ns.client.clone())
        .create(&PostParams::default(), &nsobj)
        .await
        .unwrap();
    let mut probe = Pod {
        metadata: ObjectMeta {
            name: Some("probe".into()),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    };
    let s = probe.spec.as_mut().unwrap();
    s.node_name = None;
    let api: Api<Pod> = Api::namespaced(ns.client.clone(), &restricted);
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    api.create(&dry, &probe)
        .await
        .expect("the session pod spec passes Pod Security 'restricted'");
    // And the check is real: a variant adding a capability is refused there.
    probe.spec.as_mut().unwrap().containers[0]
        .security_context
        .as_mut()
        .unwrap()
        .capabilities
        .as_mut()
        .unwrap()
        .add = Some(vec!["NET_ADMIN".into()]);
    let err = api.create(&dry, &probe).await.unwrap_err();
    assert!(err.to_string().contains("restricted"), "{err}");
    op.stop().await;
}

#[tokio::test]
async fn api_writes_per_launch_are_at_the_floor() {
    let (ns, op) = setup("writes").await;
    tokio::time::sleep(Duration::from_secs(2)).await; // let status controllers settle
    let launch_writes = |c: &cubicle::apicount::ApiCounter| -> BTreeMap<String, u64> {
        c.snapshot()
            .into_iter()
            .filter(|(k, _)| k.is_write())
            .filter(|(k, _)| {
                matches!(
                    k.resource.as_str(),
                    "pods" | "persistentvolumeclaims" | "sessions/status" | "sessions"
                )
            })
            .map(|(k, v)| (format!("{} {}", k.verb, k.resource), v))
            .collect()
    };
    let total = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();

    let event_writes = |c: &cubicle::apicount::ApiCounter| -> u64 {
        c.snapshot()
            .into_iter()
            .filter(|(k, _)| k.is_write() && k.resource == "events")
            .map(|(_, v)| v)
            .sum()
    };
    let events_before = event_writes(&op.counter);
    let before = launch_writes(&op.counter);
    create(&ns, &session("w1", "bob", "desktop", json!({}))).await;
    wait_phase(&ns, "w1", SessionPhase::Running).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let first = launch_writes(&op.counter);
    let first_n = total(&first) - total(&before);
    eprintln!("[writes] first launch: {first:?} (was {before:?})");

    create(&ns, &session("w2", "bob", "desktop", json!({}))).await;
    wait_phase(&ns, "w2", SessionPhase::Running).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = launch_writes(&op.counter);
    let second_n = total(&second) - total(&first);
    eprintln!("[writes] second launch: {second_n} writes; first launch: {first_n} writes");

    // Steady state: a quiet period makes no writes at all.
    let quiet_before = op.counter.writes();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let quiet = op.counter.writes() - quiet_before;
    eprintln!("[writes] steady state over 5 s: {quiet} writes");
    assert_eq!(first_n, 3, "first launch: profile claim, pod, status");
    assert_eq!(second_n, 2, "later launch: pod, status");
    assert_eq!(quiet, 0, "steady sessions cost no writes");
    // A routine start posts no Event (the status records it): Events are for refusals,
    // failures and what the operator does on its own.
    assert_eq!(
        event_writes(&op.counter) - events_before,
        0,
        "Event writes for two routine launches: {:?}",
        op.counter.snapshot()
    );
    // No uncached reads: the operator never GETs or LISTs outside its watches.
    let reads: u64 = op
        .counter
        .snapshot()
        .into_iter()
        .filter(|(k, _)| k.verb == "get")
        .map(|(_, v)| v)
        .sum();
    assert_eq!(reads, 0, "uncached GETs: {:?}", op.counter.snapshot());
    op.stop().await;
}

#[tokio::test]
async fn a_pod_the_api_server_rejects_fails_the_session_with_its_reason() {
    let (ns, op) = setup("rejected").await;
    apply_yaml(
        &ns,
        r#"
apiVersion: cubicle.dev/v1alpha1
kind: Workspace
metadata: {name: broken}
spec:
  image: example.invalid/desktop:1
  groups: [everyone]
  runConfig:
    pod: {priorityClassName: no-such-priority-class, hostname: "desk-{username}"}
"#,
    )
    .await;
    create(&ns, &session("bad-1", "bob", "broken", json!({}))).await;
    let s = wait_phase(&ns, "bad-1", SessionPhase::Failed).await;
    let c = condition(&s, "Ready").expect("Ready condition");
    assert_eq!(c.reason, "PodRejected", "{}", c.message);
    assert!(
        c.message.contains("no-such-priority-class"),
        "{}",
        c.message
    );
    op.stop().await;
}

#[tokio::test]
async fn a_single_node_profile_claim_keeps_a_users_sessions_on_its_node_or_says_why_not() {
    let (ns, op) = setup("rwo").await;
    apply_yaml(
        &ns,
        r#"
apiVersion: cubicle.dev/v1alpha1
kind: ServerPool
metadata: {name: pp}
spec: {}
---
apiVersion: cubicle.dev/v1alpha1
kind: Server
metadata: {name: pa}
spec: {pool: pp, nodeName: fake-node-0, maxSessions: 1}
---
apiVersion: cubicle.dev/v1alpha1
kind: Server
metadata: {name: pb}
spec: {pool: pp, nodeName: fake-node-1}
---
apiVersion: cubicle.dev/v1alpha1
kind: Workspace
metadata: {name: pooled}
spec:
  image: example.invalid/desktop:1
  groups: [everyone]
  serverPool: pp
  persistentProfile:
    mountPath: /home/kasm-user
    claimTemplate: {name: "pp-{username}", size: 1Gi}
"#,
    )
    .await;
    create(&ns, &session("p1", "bob", "pooled", json!({}))).await;
    wait_phase(&ns, "p1", SessionPhase::Running).await;
    assert_eq!(
        pod_node(&ns, "p1").await,
        "fake-node-0",
        "pa: least loaded, first by name"
    );
    // The claim (ReadWriteOnce) is mounted on fake-node-0, whose only server is full: the
    // second session is refused, and the reason says so (pb, on another node, has room).
    create(&ns, &session("p2", "bob", "pooled", json!({}))).await;
    refused_with(&ns, "p2", "ProfileClaimInUse").await;
    let s = ns.api::<Session>().get("p2").await.unwrap();
    let msg = &condition(&s, "Admitted").unwrap().message;
    assert!(
        msg.contains("pp-bob") && msg.contains("p1") && msg.contains("fake-node-0"),
        "{msg}"
    );
    // Without a profile the same user may use the other node.
    create(
        &ns,
        &session(
            "p3",
            "bob",
            "pooled",
            json!({"persistentProfile": "Disabled"}),
        ),
    )
    .await;
    wait_phase(&ns, "p3", SessionPhase::Running).await;
    assert_eq!(pod_node(&ns, "p3").await, "fake-node-1");
    op.stop().await;
}

/// The pod's labels and annotations, for a failure's message.
async fn pod_meta_text(ns: &TestNs, name: &str) -> String {
    match ns.api::<Pod>().get_opt(name).await {
        Ok(Some(p)) => format!(
            "pod {name} uid {:?} labels {:?} annotations {:?} phase {:?}",
            p.uid(),
            p.labels(),
            p.annotations()
                .iter()
                .filter(|(k, _)| !k.starts_with("cubicle.dev/file-"))
                .collect::<BTreeMap<_, _>>(),
            p.status.as_ref().and_then(|s| s.phase.clone())
        ),
        other => format!("pod {name}: {other:?}"),
    }
}

/// Waits (generously) until the pod satisfies `ok`; on a timeout, fails with what it shows.
async fn wait_pod(ns: &TestNs, name: &str, what: &str, ok: impl Fn(&Pod) -> bool) -> Pod {
    let pods = ns.api::<Pod>();
    let start = std::time::Instant::now();
    loop {
        if let Ok(Some(p)) = pods.get_opt(name).await
            && ok(&p)
        {
            return p;
        }
        if start.elapsed() > LONG {
            panic!(
                "timed out after {LONG:?} waiting for {what}: {}",
                pod_meta_text(ns, name).await
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The executor keeps every child of a running session in shape: owned labels and annotations
/// edited by hand come back (others' are left alone), and a child missing from a running session
/// (as under an older build: no credentials Secret, and a pod without the children version) is
/// created, while the pod runs on (same uid, same start).
#[tokio::test]
async fn the_executor_restores_owned_metadata_and_missing_children_without_a_restart() {
    use cubicle::controller::contract::{CHILDREN_ANNOTATION, CHILDREN_VERSION};
    use k8s_openapi::api::core::v1::Secret;
    install_crds().await;
    let ns = TestNs::new("children").await;
    tenant(&ns).await;
    let key = cubicle::credentials::ensure(ns.client.clone(), &ns.name, "cubicle-session-key")
        .await
        .unwrap();
    let op = Operator::start_with(&ns.name, move |c| c.credentials = Some(key)).await;
    create(&ns, &session("kept", "erin", "desktop", json!({}))).await;
    let started = wait_phase(&ns, "kept", SessionPhase::Running)
        .await
        .status
        .unwrap()
        .started_at;
    let pods = ns.api::<Pod>();
    let uid = pods.get("kept").await.unwrap().uid();
    let owned = |p: &Pod, label: &str| p.labels().get(label).cloned();
    let children = |p: &Pod| p.annotations().get(CHILDREN_ANNOTATION).cloned();
    let current = Some(CHILDREN_VERSION.to_string());

    // Hand edits: an owned label changed, another removed, the owned annotation changed; a
    // label the operator does not own added.
    pods.patch(
        "kept",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {
            "labels": {"cubicle.dev/user": "mallory", "app.kubernetes.io/name": null, "team": "a"},
            "annotations": {CHILDREN_ANNOTATION: "0"},
        }})),
    )
    .await
    .unwrap();
    let p = wait_pod(
        &ns,
        "kept",
        "the owned labels and annotation restored",
        |p| {
            owned(p, "cubicle.dev/user").as_deref() == Some("erin")
                && owned(p, "app.kubernetes.io/name").as_deref() == Some("cubicle-session")
                && children(p) == current
        },
    )
    .await;
    assert_eq!(
        owned(&p, "team").as_deref(),
        Some("a"),
        "a label the operator does not own is left alone: {}",
        pod_meta_text(&ns, "kept").await
    );

    // An older build's session: no credentials Secret, no children version on its pod.
    let secrets = ns.api::<Secret>();
    let before = secrets.get("kept-vnc").await.unwrap().data;
    secrets
        .delete("kept-vnc", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the Secret gone", LONG, || async {
        secrets
            .get_opt("kept-vnc")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    pods.patch(
        "kept",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {CHILDREN_ANNOTATION: null}}})),
    )
    .await
    .unwrap();
    let back = wait_for("the missing Secret created again", LONG, || async {
        secrets.get_opt("kept-vnc").await.unwrap()
    })
    .await;
    assert_eq!(back.data, before, "the same derived password");
    let p = wait_pod(&ns, "kept", "the children version recorded", |p| {
        children(p) == current
    })
    .await;
    assert_eq!(
        p.uid(),
        uid,
        "the session was not restarted: {}",
        pod_meta_text(&ns, "kept").await
    );
    let s = ns.api::<Session>().get("kept").await.unwrap();
    let status = s.status.unwrap();
    assert_eq!(status.phase, Some(SessionPhase::Running));
    assert_eq!(status.started_at, started, "the same start");

    // Once in shape, a quiet period writes nothing.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let quiet_before = op.counter.writes();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        op.counter.writes() - quiet_before,
        0,
        "writes once in shape: {:?}",
        op.counter.snapshot()
    );
    op.stop().await;
}
