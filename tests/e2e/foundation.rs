//! The local control plane behaves like a real cluster: scheduling, garbage collection, volume
//! binding with zones, CRDs with CEL validation, and RBAC.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{
    ConfigMap, Node, PersistentVolume, PersistentVolumeClaim, Pod, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::support::{self, TestNs, wait_for};

const LONG: Duration = Duration::from_secs(120);

fn pod_running(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

#[tokio::test]
async fn deployment_pods_are_scheduled_onto_fake_nodes_and_run() {
    let ns = TestNs::new("sched").await;
    let deploy: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1",
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}
            }
        }
    }))
    .unwrap();
    ns.api::<Deployment>()
        .create(&PostParams::default(), &deploy)
        .await
        .unwrap();
    let pods = ns.api::<Pod>();
    let running = wait_for("3 running web pods", LONG, || async {
        let list = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        let running: Vec<Pod> = list.items.into_iter().filter(pod_running).collect();
        (running.len() == 3).then_some(running)
    })
    .await;
    let nodes = &support::env().nodes;
    for p in &running {
        let node = p
            .spec
            .as_ref()
            .unwrap()
            .node_name
            .clone()
            .expect("scheduled");
        assert!(
            nodes.contains(&node),
            "pod {} on unknown node {node}",
            p.name_any()
        );
        let ready = p.status.as_ref().unwrap().conditions.as_ref().unwrap();
        assert!(
            ready
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        );
    }
    // The Deployment controller (kube-controller-manager) sees them available.
    let deploys = ns.api::<Deployment>();
    wait_for("deployment available", LONG, || async {
        let d = deploys.get("web").await.ok()?;
        (d.status?.available_replicas == Some(3)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn deleting_an_owner_garbage_collects_its_dependents() {
    let ns = TestNs::new("gc").await;
    let cms = ns.api::<ConfigMap>();
    let owner: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "owner"}, "data": {"k": "v"}})).unwrap();
    let owner = cms.create(&PostParams::default(), &owner).await.unwrap();
    let dependent: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "dependent", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.uid().unwrap()}]},
        "data": {"k": "v"}
    }))
    .unwrap();
    cms.create(&PostParams::default(), &dependent)
        .await
        .unwrap();
    let unrelated: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "unrelated"}})).unwrap();
    cms.create(&PostParams::default(), &unrelated)
        .await
        .unwrap();

    cms.delete("owner", &DeleteParams::background())
        .await
        .unwrap();
    // The garbage collector re-reads discovery every 30 s; allow for it.
    wait_for("dependent garbage-collected", LONG, || async {
        match cms.get_opt("dependent").await {
            Ok(None) => Some(()),
            _ => None,
        }
    })
    .await;
    assert!(
        cms.get_opt("unrelated").await.unwrap().is_some(),
        "GC removed an unowned object"
    );

    // Foreground deletion through a Deployment: ReplicaSet and pods go too, and the fake kubelet
    // finishes off the terminating pods.
    let deploy: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "app"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "gc"}},
            "template": {"metadata": {"labels": {"app": "gc"}},
                "spec": {"containers": [{"name": "c", "image": "example.invalid/c:1"}]}}}
    }))
    .unwrap();
    let deploys = ns.api::<Deployment>();
    deploys
        .create(&PostParams::default(), &deploy)
        .await
        .unwrap();
    let pods = ns.api::<Pod>();
    wait_for("2 running pods", LONG, || async {
        let l = pods
            .list(&ListParams::default().labels("app=gc"))
            .await
            .ok()?;
        (l.items.iter().filter(|p| pod_running(p)).count() == 2).then_some(())
    })
    .await;
    deploys
        .delete("app", &DeleteParams::foreground())
        .await
        .unwrap();
    wait_for("pods of the deleted deployment gone", LONG, || async {
        let l = pods
            .list(&ListParams::default().labels("app=gc"))
            .await
            .ok()?;
        l.items.is_empty().then_some(())
    })
    .await;
    wait_for("deployment gone", LONG, || async {
        matches!(deploys.get_opt("app").await, Ok(None)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_claim_binds_and_its_pod_lands_in_the_volume_zone() {
    let ns = TestNs::new("pvc").await;
    let client = ns.client.clone();
    let claims = ns.api::<PersistentVolumeClaim>();
    // Immediate binding: the volume (and its zone) exists before any pod uses it.
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "profile"},
        "spec": {"storageClassName": "standard-immediate", "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}}}
    }))
    .unwrap();
    claims.create(&PostParams::default(), &pvc).await.unwrap();
    let bound = wait_for("claim bound", LONG, || async {
        let c = claims.get("profile").await.ok()?;
        (c.status.as_ref()?.phase.as_deref() == Some("Bound")).then_some(c)
    })
    .await;
    assert_eq!(
        bound.spec.as_ref().unwrap().storage_class_name.as_deref(),
        Some("standard-immediate")
    );
    let pv_name = bound.spec.unwrap().volume_name.unwrap();
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get(&pv_name)
        .await
        .unwrap();
    let zone = pv
        .labels()
        .get("topology.kubernetes.io/zone")
        .cloned()
        .expect("zoned volume");

    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "user"},
        "spec": {
            "containers": [{"name": "c", "image": "example.invalid/c:1",
                "volumeMounts": [{"name": "home", "mountPath": "/home/user"}]}],
            "volumes": [{"name": "home", "persistentVolumeClaim": {"claimName": "profile"}}]
        }
    }))
    .unwrap();
    let pods = ns.api::<Pod>();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let running = wait_for("pod with the claim running", LONG, || async {
        let p = pods.get("user").await.ok()?;
        pod_running(&p).then_some(p)
    })
    .await;
    let node_name = running.spec.unwrap().node_name.unwrap();
    let node = Api::<Node>::all(client).get(&node_name).await.unwrap();
    assert_eq!(
        node.labels().get("topology.kubernetes.io/zone"),
        Some(&zone)
    );

    // WaitForFirstConsumer (the default class, filled in by the DefaultStorageClass admission
    // plugin): the volume is provisioned in the zone the scheduler chose.
    let wffc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "late"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    }))
    .unwrap();
    claims.create(&PostParams::default(), &wffc).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pending = claims.get("late").await.unwrap();
    assert_eq!(
        pending.status.and_then(|s| s.phase).as_deref(),
        Some("Pending")
    );
    let pod2: Pod = serde_json::from_value(json!({
        "metadata": {"name": "late-user"},
        "spec": {"containers": [{"name": "c", "image": "example.invalid/c:1"}],
            "volumes": [{"name": "home", "persistentVolumeClaim": {"claimName": "late"}}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod2).await.unwrap();
    let p2 = wait_for("wffc pod running", LONG, || async {
        let p = pods.get("late-user").await.ok()?;
        pod_running(&p).then_some(p)
    })
    .await;
    let c2 = claims.get("late").await.unwrap();
    let pv2 = Api::<PersistentVolume>::all(ns.client.clone())
        .get(c2.spec.unwrap().volume_name.as_ref().unwrap())
        .await
        .unwrap();
    let node2 = Api::<Node>::all(ns.client.clone())
        .get(p2.spec.unwrap().node_name.as_ref().unwrap())
        .await
        .unwrap();
    assert_eq!(
        pv2.labels().get("topology.kubernetes.io/zone"),
        node2.labels().get("topology.kubernetes.io/zone")
    );
}

#[tokio::test]
async fn a_crd_with_a_cel_rule_rejects_invalid_objects_with_its_message() {
    let ns = TestNs::new("cel").await;
    let crds = Api::<CustomResourceDefinition>::all(ns.client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.e2e.cubicle.dev"},
        "spec": {
            "group": "e2e.cubicle.dev",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "scope": "Namespaced",
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object",
                        "x-kubernetes-validations": [{"rule": "self.min <= self.max",
                            "message": "min must not exceed max"}],
                        "properties": {"min": {"type": "integer"}, "max": {"type": "integer"}}}}}}}]
        }
    }))
    .unwrap();
    crds.patch(
        "widgets.e2e.cubicle.dev",
        &PatchParams::apply("cubicle-e2e").force(),
        &Patch::Apply(crd),
    )
    .await
    .unwrap();
    tokio::time::timeout(
        LONG,
        await_condition(
            crds,
            "widgets.e2e.cubicle.dev",
            conditions::is_crd_established(),
        ),
    )
    .await
    .expect("CRD established in time")
    .unwrap();

    let gvk = GroupVersionKind::gvk("e2e.cubicle.dev", "v1", "Widget");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    let widgets: Api<DynamicObject> = Api::namespaced_with(ns.client.clone(), &ns.name, &ar);
    let mk = |name: &str, min: i64, max: i64| -> DynamicObject {
        serde_json::from_value(json!({"apiVersion": "e2e.cubicle.dev/v1", "kind": "Widget",
            "metadata": {"name": name}, "spec": {"min": min, "max": max}}))
        .unwrap()
    };
    // Discovery of a fresh CRD can lag a moment behind Established.
    wait_for("valid widget accepted", LONG, || async {
        widgets
            .create(&PostParams::default(), &mk("ok", 1, 2))
            .await
            .ok()
    })
    .await;
    let err = widgets
        .create(&PostParams::default(), &mk("bad", 3, 2))
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 422, "{s:?}");
            assert!(
                s.message.contains("min must not exceed max"),
                "message: {}",
                s.message
            );
        }
        other => panic!("expected an API rejection, got {other:?}"),
    }
}

#[tokio::test]
async fn rbac_is_enforced_for_a_service_account() {
    let ns = TestNs::new("rbac").await;
    let sas = ns.api::<ServiceAccount>();
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "reader"}})).unwrap();
    sas.create(&PostParams::default(), &sa).await.unwrap();
    let tr: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": 3600}
    }))
    .unwrap();
    let token = sas
        .create_token_request("reader", &PostParams::default(), &tr)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let dir = tempdir();
    let kc = dir.join("reader.kubeconfig");
    support::kubeconfig_with_token(&token, &kc);
    let reader = cubicle::devenv::client_from_kubeconfig(&kc).await.unwrap();
    let as_reader: Api<ConfigMap> = Api::namespaced(reader.clone(), &ns.name);

    match as_reader.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }

    // Grant list on configmaps only: listing works, listing secrets still does not.
    let role: Role = serde_json::from_value(json!({"metadata": {"name": "cm-reader"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}]}))
    .unwrap();
    ns.api::<Role>()
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let rb: RoleBinding = serde_json::from_value(json!({"metadata": {"name": "cm-reader"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": ns.name}]}))
    .unwrap();
    ns.api::<RoleBinding>()
        .create(&PostParams::default(), &rb)
        .await
        .unwrap();
    wait_for("role binding takes effect", LONG, || async {
        as_reader.list(&ListParams::default()).await.ok()
    })
    .await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(reader, &ns.name);
    match secrets.list(&ListParams::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("expected 403 on secrets, got {other:?}"),
    }
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("cubicle-e2e-{}-{}", std::process::id(), line!()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
