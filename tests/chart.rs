//! The Helm chart (`charts/cubicle`): lint, render, determinism, least-privilege RBAC, security
//! defaults and the values schema.
//!
//! Helm comes from `bash tests/tools/helm.sh`, which installs it once into the cache (or prints
//! `$HELM`). Every check renders with `helm template`: no cluster is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde::Deserialize;
use serde_yaml::Value;

const CHART: &str = "charts/cubicle";
const RELEASE: &str = "cubicle";
const NAMESPACE: &str = "cubicle-system";
const LEASE: &str = "cubicle-leader";

/// The value sets every invariant is checked against.
const DEFAULTS: &[&str] = &[];
const NAMESPACED: &[&str] = &["rbac.scope=namespaces", "rbac.namespaces={team-a,team-b}"];
const HA: &[&str] = &["replicas=2"];
const NAMESPACED_HA: &[&str] = &[
    "rbac.scope=namespaces",
    "rbac.namespaces={team-a,team-b}",
    "replicas=3",
];
const SINGLE_WITH_LEASE: &[&str] = &["leaderElection.enabled=true"];
const EVERYTHING_ON: &[&str] = &[
    "replicas=2",
    "metrics.serviceMonitor.enabled=true",
    "podAnnotations.a=b",
    "podLabels.team=platform",
    "nodeSelector.kubernetes\\.io/os=linux",
    "priorityClassName=system-cluster-critical",
    "imagePullSecrets[0].name=pull",
];
const CLUSTER_WITH_POLICY: &[&str] = &["networkPolicy.pausedSessions.namespaces={team-a,team-c}"];
const ALL_SETS: &[&[&str]] = &[
    DEFAULTS,
    NAMESPACED,
    HA,
    NAMESPACED_HA,
    SINGLE_WITH_LEASE,
    EVERYTHING_ON,
    CLUSTER_WITH_POLICY,
];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The helm binary, installed once per machine by tests/tools/helm.sh.
fn helm() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let out = Command::new("bash")
            .arg("tests/tools/helm.sh")
            .current_dir(root())
            .output()
            .unwrap_or_else(|e| panic!("cannot run `bash tests/tools/helm.sh`: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "helm could not be installed by tests/tools/helm.sh (it needs npm; or set \
             HELM=/path/to/helm):\n{stderr}"
        );
        let stdout = String::from_utf8(out.stdout).expect("helm.sh prints a UTF-8 path");
        let path = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
        assert!(
            path.is_file() || std::env::var_os("HELM").is_some(),
            "tests/tools/helm.sh printed {path:?}, which is not a file:\n{stderr}"
        );
        path
    })
}

/// Runs helm in the repository root: stdout on success, stderr on failure.
fn helm_run(args: &[&str]) -> Result<String, String> {
    let out = Command::new(helm())
        .args(args)
        .current_dir(root())
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("cubicle-helm-cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("cubicle-helm-config"),
        )
        .env(
            "HELM_DATA_HOME",
            std::env::temp_dir().join("cubicle-helm-data"),
        )
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", helm()));
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("helm output is UTF-8"))
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn template(set: &[&str]) -> Result<String, String> {
    let mut args = vec!["template", RELEASE, CHART, "--namespace", NAMESPACE];
    for s in set {
        args.extend(["--set", s]);
    }
    helm_run(&args)
}

fn render(set: &[&str]) -> String {
    template(set).unwrap_or_else(|e| panic!("helm template with {set:?} failed:\n{e}"))
}

/// The rendered objects, parsed.
fn objects(set: &[&str]) -> Vec<Value> {
    let yaml = render(set);
    serde_yaml::Deserializer::from_str(&yaml)
        .map(|doc| Value::deserialize(doc).expect("helm renders valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn kind(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or_default()
}

fn name(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or_default()
}

fn namespace(o: &Value) -> Option<&str> {
    o["metadata"]["namespace"].as_str()
}

fn of_kind<'a>(objs: &'a [Value], k: &str) -> Vec<&'a Value> {
    objs.iter().filter(|o| kind(o) == k).collect()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_sequence()
        .map(|s| s.iter().map(|x| x.as_str().expect("a string")).collect())
        .unwrap_or_default()
}

fn deployment(objs: &[Value]) -> &Value {
    let d = of_kind(objs, "Deployment");
    assert_eq!(d.len(), 1, "exactly one Deployment");
    d[0]
}

fn container(objs: &[Value]) -> &Value {
    let c = &deployment(objs)["spec"]["template"]["spec"]["containers"];
    assert_eq!(c.as_sequence().map(Vec::len), Some(1), "one container");
    &c[0]
}

fn args(objs: &[Value]) -> Vec<String> {
    strings(&container(objs)["args"])
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// Where a rule applies: "ClusterRole" or "Role/<namespace>", then apiGroup, resource, names.
type Grant = (String, String, String, Vec<String>);

/// Every (scope, group, resource, resourceNames) → verbs granted to the operator's
/// ServiceAccount, after checking that every role is bound to it and every binding points at a
/// role of this chart (never a built-in one such as cluster-admin).
fn grants(objs: &[Value]) -> BTreeMap<Grant, BTreeSet<String>> {
    let sa = (NAMESPACE, RELEASE);
    let objs: Vec<Value> = objs.iter().filter(|o| !for_people(o)).cloned().collect();
    let objs = &objs[..];
    let roles: BTreeMap<(String, Option<String>, String), &Value> = objs
        .iter()
        .filter(|o| matches!(kind(o), "Role" | "ClusterRole"))
        .map(|o| {
            let key = (
                kind(o).to_owned(),
                namespace(o).map(str::to_owned),
                name(o).to_owned(),
            );
            (key, o)
        })
        .collect();
    let mut bound = BTreeSet::new();
    for b in objs
        .iter()
        .filter(|o| matches!(kind(o), "RoleBinding" | "ClusterRoleBinding"))
    {
        let r = &b["roleRef"];
        let rkind = r["kind"].as_str().unwrap();
        let rns = if kind(b) == "RoleBinding" && rkind == "Role" {
            namespace(b).map(str::to_owned)
        } else {
            None
        };
        let key = (
            rkind.to_owned(),
            rns,
            r["name"].as_str().unwrap().to_owned(),
        );
        assert!(
            roles.contains_key(&key),
            "{} {} binds {key:?}, which this chart does not define",
            kind(b),
            name(b)
        );
        let subjects = b["subjects"].as_sequence().expect("subjects");
        assert_eq!(subjects.len(), 1, "{} binds only the operator", name(b));
        let s = &subjects[0];
        assert_eq!(s["kind"].as_str(), Some("ServiceAccount"));
        assert_eq!(
            (
                s["namespace"].as_str().unwrap(),
                s["name"].as_str().unwrap()
            ),
            sa
        );
        bound.insert(key);
    }
    let mut out: BTreeMap<Grant, BTreeSet<String>> = BTreeMap::new();
    for (key, role) in &roles {
        assert!(bound.contains(key), "{key:?} is not bound to the operator");
        let scope = match &key.1 {
            Some(ns) => format!("Role/{ns}"),
            None => "ClusterRole".to_owned(),
        };
        assert!(
            role.get("aggregationRule").is_none(),
            "{key:?} must not aggregate"
        );
        for rule in role["rules"].as_sequence().expect("rules") {
            assert!(
                rule.get("nonResourceURLs").is_none(),
                "{key:?}: no nonResourceURLs"
            );
            let names: Vec<String> = strings(&rule["resourceNames"])
                .into_iter()
                .map(str::to_owned)
                .collect();
            for g in strings(&rule["apiGroups"]) {
                for r in strings(&rule["resources"]) {
                    let set = out
                        .entry((scope.clone(), g.to_owned(), r.to_owned(), names.clone()))
                        .or_default();
                    set.extend(strings(&rule["verbs"]).into_iter().map(str::to_owned));
                }
            }
        }
    }
    out
}

/// RBAC for people rather than the operator (templates/access-rbac.yaml).
fn for_people(o: &Value) -> bool {
    o["metadata"]["labels"]["cubicle.dev/for"].as_str() == Some("people")
}

/// What the operator needs on the namespaced objects it manages, per scope.
fn namespaced_needs(scope: &str) -> BTreeMap<Grant, BTreeSet<String>> {
    let mut m = BTreeMap::new();
    let mut put = |g: &str, r: &str, verbs: &[&str]| {
        m.insert(
            (scope.to_owned(), g.to_owned(), r.to_owned(), vec![]),
            verbs.iter().map(|v| (*v).to_owned()).collect(),
        );
    };
    let kinds = [
        "users",
        "groups",
        "workspaces",
        "serverpools",
        "servers",
        "serverassignments",
        "sessions",
    ];
    for k in kinds {
        let verbs: &[&str] = if k == "sessions" {
            // patch/update: the usage-accounting finalizer; delete: keepalive expiry action.
            &["get", "list", "watch", "patch", "update", "delete"]
        } else {
            &["get", "list", "watch"]
        };
        put("cubicle.dev", k, verbs);
        put(
            "cubicle.dev",
            &format!("{k}/status"),
            &["get", "patch", "update"],
        );
    }
    put("cubicle.dev", "sessions/finalizers", &["update"]);
    // use: its own Session writes pass the admission policy, and it may grant use to each
    // User's identity; roles and rolebindings: those grants (controller/identity.rs).
    m.insert(
        (
            scope.to_owned(),
            "cubicle.dev".into(),
            "users".into(),
            vec![],
        ),
        ["get", "list", "watch", "use"].map(String::from).into(),
    );
    let mut put = |g: &str, r: &str, verbs: &[&str]| {
        m.insert(
            (scope.to_owned(), g.to_owned(), r.to_owned(), vec![]),
            verbs.iter().map(|v| (*v).to_owned()).collect(),
        );
    };
    // The per-User Role grants these on the User's own preferences; RBAC lets only who holds
    // a permission grant it.
    put(
        "cubicle.dev",
        "userpreferences",
        &["get", "create", "update", "patch"],
    );
    for r in ["roles", "rolebindings"] {
        put(
            "rbac.authorization.k8s.io",
            r,
            &["list", "create", "patch", "delete"],
        );
    }
    put(
        "",
        "pods",
        &["get", "list", "watch", "create", "patch", "delete"],
    );
    put(
        "",
        "persistentvolumeclaims",
        &["get", "list", "watch", "create", "patch"],
    );
    put("", "events", &["create", "patch"]);
    put("events.k8s.io", "events", &["create", "patch"]);
    m
}

fn expected_grants(namespaces: &[&str], leader: bool) -> BTreeMap<Grant, BTreeSet<String>> {
    let mut m = BTreeMap::new();
    m.insert(
        ("ClusterRole".into(), "".into(), "nodes".into(), vec![]),
        ["get", "list", "watch"].map(String::from).into(),
    );
    m.insert(
        (
            "ClusterRole".into(),
            "".into(),
            "persistentvolumes".into(),
            vec![],
        ),
        ["get", "list", "watch"].map(String::from).into(),
    );
    if namespaces.is_empty() {
        m.extend(namespaced_needs("ClusterRole"));
    }
    for ns in namespaces {
        m.extend(namespaced_needs(&format!("Role/{ns}")));
    }
    if leader {
        let scope = format!("Role/{NAMESPACE}");
        m.insert(
            (
                scope.clone(),
                "coordination.k8s.io".into(),
                "leases".into(),
                vec![LEASE.into()],
            ),
            ["get", "update"].map(String::from).into(),
        );
        m.insert(
            (scope, "coordination.k8s.io".into(), "leases".into(), vec![]),
            ["create"].map(String::from).into(),
        );
    }
    m
}

#[test]
fn lint_passes_strict() {
    for strict in [false, true] {
        for set in [DEFAULTS, NAMESPACED, NAMESPACED_HA] {
            let mut args = vec!["lint", CHART];
            if strict {
                args.push("--strict");
            }
            for s in set {
                args.extend(["--set", s]);
            }
            let out = helm_run(&args).unwrap_or_else(|e| panic!("helm {args:?} failed:\n{e}"));
            assert!(out.contains("0 chart(s) failed"), "helm {args:?}:\n{out}");
        }
    }
}

#[test]
fn two_renders_are_byte_identical() {
    for set in ALL_SETS {
        let (a, b) = (render(set), render(set));
        assert!(
            a == b,
            "two renders with {set:?} differ: GitOps tools would see drift"
        );
        assert!(!a.is_empty());
    }
}

#[test]
fn rbac_is_exactly_what_the_operator_needs() {
    let cases: &[(&[&str], &[&str], bool)] = &[
        (DEFAULTS, &[], false),
        (NAMESPACED, &["team-a", "team-b"], false),
        (HA, &[], true),
        (NAMESPACED_HA, &["team-a", "team-b"], true),
        (SINGLE_WITH_LEASE, &[], true),
        (EVERYTHING_ON, &[], true),
    ];
    for (set, namespaces, leader) in cases {
        let got = grants(&objects(set));
        let want = expected_grants(namespaces, *leader);
        assert_eq!(
            got, want,
            "RBAC with {set:?} differs from what the operator needs (left: rendered)"
        );
    }
}

#[test]
fn rbac_invariants_hold_for_every_value_set() {
    for set in ALL_SETS {
        for ((scope, group, resource, names), verbs) in grants(&objects(set)) {
            let at = format!("{set:?}: {scope} {group}/{resource} {names:?} {verbs:?}");
            assert!(!verbs.contains("*"), "wildcard verb: {at}");
            assert!(resource != "*" && group != "*", "wildcard resource: {at}");
            for v in ["escalate", "bind", "impersonate", "deletecollection"] {
                assert!(!verbs.contains(v), "{v} is never needed: {at}");
            }
            if resource == "persistentvolumeclaims" {
                assert!(
                    !verbs.contains("delete"),
                    "the operator must never delete a user's profile: {at}"
                );
            }
            assert!(
                !matches!(resource.as_str(), "secrets" | "configmaps"),
                "pods mount secrets and configmaps by reference: {at}"
            );
            if resource == "leases" {
                assert_eq!(scope, format!("Role/{NAMESPACE}"), "leases: {at}");
                if names.is_empty() {
                    assert_eq!(verbs, BTreeSet::from(["create".to_owned()]), "{at}");
                }
            }
            if resource == "nodes" || resource == "persistentvolumes" {
                assert_eq!(scope, "ClusterRole");
                assert_eq!(verbs, ["get", "list", "watch"].map(String::from).into());
            }
        }
    }
}

#[test]
fn rbac_off_renders_no_rbac() {
    let objs = objects(&["rbac.create=false", "replicas=2"]);
    for k in ["Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"] {
        assert!(
            of_kind(&objs, k).is_empty(),
            "{k} rendered with rbac.create=false"
        );
    }
}

#[test]
fn leader_election_follows_replicas() {
    let single = objects(DEFAULTS);
    let d = deployment(&single);
    assert_eq!(d["spec"]["replicas"].as_u64(), Some(1));
    assert_eq!(d["spec"]["strategy"]["type"].as_str(), Some("Recreate"));
    assert!(
        !args(&single)
            .iter()
            .any(|a| a.starts_with("--leader-elect") || a.starts_with("--lease")),
        "no leader election with one replica: {:?}",
        args(&single)
    );
    assert!(of_kind(&single, "Role").is_empty(), "no Lease Role");

    for set in [HA, SINGLE_WITH_LEASE] {
        let objs = objects(set);
        let a = args(&objs);
        for want in [
            "--leader-elect",
            "--lease-name=cubicle-leader",
            "--lease-duration=15s",
            "--renew-deadline=10s",
            "--retry-period=2s",
        ] {
            assert!(
                a.iter().any(|x| x == want),
                "{set:?}: {want} missing from {a:?}"
            );
        }
        let roles = of_kind(&objs, "Role");
        assert_eq!(roles.len(), 1, "{set:?}: one Lease Role");
        assert_eq!(namespace(roles[0]), Some(NAMESPACE));
    }
    let ha = objects(HA);
    let strategy = &deployment(&ha)["spec"]["strategy"];
    assert_eq!(strategy["type"].as_str(), Some("RollingUpdate"));
    assert_eq!(
        deployment(&objects(SINGLE_WITH_LEASE))["spec"]["strategy"]["type"].as_str(),
        Some("Recreate")
    );

    let err = template(&["replicas=2", "leaderElection.enabled=false"])
        .expect_err("two replicas without leader election must not render");
    assert!(err.contains("both write"), "{err}");
}

#[test]
fn namespaced_scope_watches_only_those_namespaces() {
    let cluster = args(&objects(DEFAULTS));
    assert!(
        !cluster.iter().any(|a| a.starts_with("--namespace")),
        "cluster scope watches all namespaces: {cluster:?}"
    );
    let objs = objects(NAMESPACED);
    let a = args(&objs);
    let ns: Vec<&str> = a
        .iter()
        .filter_map(|x| x.strip_prefix("--namespace="))
        .collect();
    assert_eq!(ns, ["team-a", "team-b"]);
    let roles: Vec<_> = of_kind(&objs, "Role")
        .into_iter()
        .filter_map(namespace)
        .collect();
    assert_eq!(roles, ["team-a", "team-b"]);
    let cluster_roles: Vec<_> = of_kind(&objs, "ClusterRole")
        .into_iter()
        .filter(|o| !for_people(o))
        .map(name)
        .collect();
    assert_eq!(
        cluster_roles,
        ["cubicle-nodes"],
        "only nodes and persistentvolumes are cluster-wide (read-only)"
    );
}

#[test]
fn deployment_is_hardened_and_complete() {
    let objs = objects(DEFAULTS);
    let pod = &deployment(&objs)["spec"]["template"]["spec"];
    let c = container(&objs);

    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(psc["runAsUser"].as_u64(), Some(65532));
    assert_eq!(
        psc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["runAsUser"].as_u64(), Some(65532));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert!(sc["capabilities"].get("add").is_none());
    assert_eq!(
        sc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );

    let res = &c["resources"];
    assert!(res["requests"]["cpu"].as_str().is_some(), "cpu request");
    assert!(
        res["requests"]["memory"].as_str().is_some(),
        "memory request"
    );
    assert!(res["limits"]["memory"].as_str().is_some(), "memory limit");

    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(true));
    assert_eq!(pod["serviceAccountName"].as_str(), Some(RELEASE));
    assert!(pod["terminationGracePeriodSeconds"].as_u64().is_some());
    assert_eq!(strings(&c["command"]), ["cubicle", "run"]);

    let chart: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join(CHART).join("Chart.yaml")).unwrap(),
    )
    .unwrap();
    let app_version = chart["appVersion"].as_str().unwrap();
    assert_eq!(
        c["image"].as_str(),
        Some(format!("cubicle.localhost/cubicle:{app_version}").as_str())
    );

    assert_eq!(c["ports"][0]["name"].as_str(), Some("metrics"));
    assert_eq!(c["ports"][0]["containerPort"].as_u64(), Some(8080));
    assert!(args(&objs).contains(&"--metrics-addr=0.0.0.0:8080".to_owned()));
    assert_eq!(
        c["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"]["port"].as_str(),
        Some("metrics")
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"]["port"].as_str(),
        Some("metrics")
    );

    let env: BTreeMap<&str, &str> = c["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?,
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?,
            ))
        })
        .collect();
    assert_eq!(env.get("POD_NAME"), Some(&"metadata.name"));
    assert_eq!(env.get("POD_NAMESPACE"), Some(&"metadata.namespace"));

    // Passthrough values reach the pod.
    let objs = objects(EVERYTHING_ON);
    let tpl = &deployment(&objs)["spec"]["template"];
    assert_eq!(tpl["metadata"]["annotations"]["a"].as_str(), Some("b"));
    assert_eq!(tpl["metadata"]["labels"]["team"].as_str(), Some("platform"));
    assert_eq!(
        tpl["spec"]["nodeSelector"]["kubernetes.io/os"].as_str(),
        Some("linux")
    );
    assert_eq!(
        tpl["spec"]["imagePullSecrets"][0]["name"].as_str(),
        Some("pull")
    );
    let objs = objects(&[
        "tolerations[0].key=dedicated",
        "tolerations[0].operator=Exists",
        "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=zone",
        "affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
        "image.tag=1.2.3",
        "logFormat=text",
    ]);
    let pod = &deployment(&objs)["spec"]["template"]["spec"];
    assert_eq!(pod["tolerations"][0]["key"].as_str(), Some("dedicated"));
    assert!(pod["affinity"]["nodeAffinity"].is_mapping());
    assert_eq!(
        container(&objs)["image"].as_str(),
        Some("cubicle.localhost/cubicle:1.2.3")
    );
    assert!(args(&objs).contains(&"--log-format=text".to_owned()));
}

#[test]
fn every_object_has_the_standard_labels() {
    for set in ALL_SETS {
        let objs = objects(set);
        let mut templates = vec![];
        for o in &objs {
            templates.push(&o["metadata"]["labels"]);
            if kind(o) == "Deployment" {
                templates.push(&o["spec"]["template"]["metadata"]["labels"]);
            }
        }
        for labels in templates {
            assert_eq!(labels["app.kubernetes.io/name"].as_str(), Some("cubicle"));
            assert_eq!(labels["app.kubernetes.io/instance"].as_str(), Some(RELEASE));
            assert_eq!(
                labels["app.kubernetes.io/managed-by"].as_str(),
                Some("Helm")
            );
            assert!(labels["app.kubernetes.io/version"].as_str().is_some());
            assert_eq!(labels["helm.sh/chart"].as_str(), Some("cubicle-0.1.0"));
        }
        for o in &objs {
            let cluster_scoped = matches!(
                kind(o),
                "ClusterRole"
                    | "ClusterRoleBinding"
                    | "ValidatingAdmissionPolicy"
                    | "ValidatingAdmissionPolicyBinding"
            );
            assert_eq!(
                namespace(o).is_none(),
                cluster_scoped,
                "{} {}: namespace set exactly on namespaced objects",
                kind(o),
                name(o)
            );
        }
    }
}

#[test]
fn service_monitor_only_when_enabled() {
    let objs = objects(DEFAULTS);
    assert!(of_kind(&objs, "ServiceMonitor").is_empty());
    let svc = of_kind(&objs, "Service");
    assert_eq!(svc.len(), 1);
    assert_eq!(
        svc[0]["spec"]["ports"][0]["targetPort"].as_str(),
        Some("metrics")
    );

    let objs = objects(&["metrics.serviceMonitor.enabled=true"]);
    let sm = of_kind(&objs, "ServiceMonitor");
    assert_eq!(sm.len(), 1);
    assert_eq!(
        sm[0]["apiVersion"].as_str(),
        Some("monitoring.coreos.com/v1")
    );
    assert_eq!(
        sm[0]["spec"]["endpoints"][0]["port"].as_str(),
        Some("metrics")
    );
    assert_eq!(
        sm[0]["spec"]["selector"]["matchLabels"],
        deployment(&objs)["spec"]["selector"]["matchLabels"]
    );
}

#[test]
fn schema_and_guards_reject_bad_values() {
    let bad: &[(&[&str], &str)] = &[
        (&["replicas=abc"], "/replicas"),
        (&["replicas=-1"], "/replicas"),
        (&["rbac.scope=bogus"], "/rbac/scope"),
        (&["rbac.scope=namespaces"], "/rbac/namespaces"),
        (&["rbac.namespaces={team-a}"], "/rbac/namespaces"),
        (
            &["rbac.scope=namespaces", "rbac.namespaces={Not_A_Namespace}"],
            "/rbac/namespaces",
        ),
        (&["logFormat=xml"], "/logFormat"),
        (&["image.pullPolicy=Sometimes"], "/image/pullPolicy"),
        (&["leaderElection.enabled=maybe"], "/leaderElection/enabled"),
        (
            &["leaderElection.leaseDuration=15"],
            "/leaderElection/leaseDuration",
        ),
        (&["metrics.port=70000"], "/metrics/port"),
        (&["concurrency=0"], "/concurrency"),
        (&["resync=30s"], "/resync"),
        (&["resync=often"], "/resync"),
        (
            &["networkPolicy.pausedSessions.enabled=maybe"],
            "/networkPolicy/pausedSessions/enabled",
        ),
        (
            &["networkPolicy.pausedSessions.namespaces={Bad_Name}"],
            "/networkPolicy/pausedSessions/namespaces",
        ),
        (
            &["leaderElection.renewDeadline=15s"],
            "leaderElection.renewDeadline (15s) must be shorter than leaderElection.leaseDuration (15s)",
        ),
        (
            &[
                "leaderElection.leaseDuration=1m",
                "leaderElection.renewDeadline=2m",
            ],
            "must be shorter than leaderElection.leaseDuration",
        ),
        (
            &["leaderElection.retryPeriod=10s"],
            "leaderElection.retryPeriod (10s) must be shorter than leaderElection.renewDeadline (10s)",
        ),
        (
            &["podDisruptionBudget.maxUnavailable=0"],
            "/podDisruptionBudget/maxUnavailable",
        ),
        (
            &["networkPolicy.operator.enabled=maybe"],
            "/networkPolicy/operator/enabled",
        ),
        (&["typo=1"], "typo"),
        (&["rbac.typo=1"], "typo"),
        (
            &["replicas=2", "leaderElection.enabled=false"],
            "both write",
        ),
        (
            &[
                "metrics.serviceMonitor.enabled=true",
                "metrics.service.enabled=false",
            ],
            "metrics.service.enabled",
        ),
    ];
    for (set, mention) in bad {
        match template(set) {
            Ok(_) => panic!("helm template accepted bad values {set:?}"),
            Err(e) => assert!(
                e.contains(mention),
                "{set:?} failed without naming {mention}:\n{e}"
            ),
        }
    }
}

#[test]
fn chart_metadata_and_kube_version() {
    let chart: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join(CHART).join("Chart.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(chart["apiVersion"].as_str(), Some("v2"));
    assert_eq!(chart["name"].as_str(), Some("cubicle"));
    assert_eq!(chart["version"].as_str(), Some("0.1.0"));
    assert_eq!(chart["appVersion"].as_str(), Some("0.1.0"));
    // The Session admission policy is admissionregistration.k8s.io/v1 from 1.30.
    assert_eq!(chart["kubeVersion"].as_str(), Some(">=1.30.0-0"));
    let repo = "https://github.com/cubicle-dev/cubicle";
    assert_eq!(chart["home"].as_str(), Some(repo));
    assert_eq!(strings(&chart["sources"]), [repo]);
    // The icon is inlined (no host needed to show it) and is the icon.svg kept beside it.
    let icon = chart["icon"].as_str().expect("an icon");
    let svg = std::fs::read_to_string(root().join(CHART).join("icon.svg")).unwrap();
    let inlined = icon
        .strip_prefix("data:image/svg+xml;base64,")
        .expect("an inline SVG icon");
    assert_eq!(
        decode_base64(inlined),
        svg.trim_end().as_bytes(),
        "icon.svg and the inlined icon differ"
    );
    let notes = &chart["annotations"];
    assert_eq!(notes["artifacthub.io/license"].as_str(), Some("Apache-2.0"));
    assert_eq!(notes["artifacthub.io/operator"].as_str(), Some("true"));
    // The CRDs Artifact Hub lists are exactly the chart's.
    let listed: Vec<Value> =
        serde_yaml::from_str(notes["artifacthub.io/crds"].as_str().unwrap()).unwrap();
    let mut listed: Vec<String> = listed
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    let mut files: Vec<String> = std::fs::read_dir(root().join(CHART).join("crds"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".yaml")
                .to_owned()
        })
        .collect();
    files.sort();
    assert_eq!(listed, files);
    // The image Artifact Hub lists is the chart's default.
    let images: Vec<Value> =
        serde_yaml::from_str(notes["artifacthub.io/images"].as_str().unwrap()).unwrap();
    assert_eq!(
        images[0]["image"].as_str(),
        container(&objects(DEFAULTS))["image"].as_str()
    );
    assert!(
        root().join(CHART).join("README.md").is_file(),
        "the chart has a README"
    );

    let base = ["template", RELEASE, CHART, "--namespace", NAMESPACE];
    let old = [&base[..], &["--kube-version", "1.29.0"]].concat();
    assert!(helm_run(&old).is_err(), "kubeVersion must refuse 1.29");
    let ok = [&base[..], &["--kube-version", "1.30.0"]].concat();
    helm_run(&ok).expect("renders for Kubernetes 1.30");
}

/// Every key in values.yaml carries a comment, except inside Kubernetes objects passed through
/// as they are (resources, security contexts), whose own keys are Kubernetes' documentation.
#[test]
fn every_value_is_documented() {
    let text = std::fs::read_to_string(root().join(CHART).join("values.yaml")).unwrap();
    let passthrough = ["resources", "podSecurityContext", "securityContext"];
    let mut stack: Vec<(usize, String)> = vec![];
    let mut prev = "";
    let mut undocumented = vec![];
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if trimmed.is_empty() {
            continue;
        }
        if let Some((key, _)) = trimmed.split_once(':')
            && !trimmed.starts_with('#')
            && !trimmed.starts_with('-')
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            stack.retain(|(i, _)| *i < indent);
            let inside_passthrough = stack.iter().any(|(_, k)| passthrough.contains(&k.as_str()));
            if !inside_passthrough && !prev.trim_start().starts_with('#') {
                undocumented.push(key.to_owned());
            }
            stack.push((indent, key.to_owned()));
        }
        prev = line;
    }
    assert!(
        undocumented.is_empty(),
        "values.yaml keys without a comment above them: {undocumented:?}"
    );
}

/// The RBAC names exactly the kinds in the chart's CRDs (a renamed plural would otherwise leave
/// the operator forbidden), and each has the status subresource the rules grant.
#[test]
fn rbac_covers_exactly_the_chart_crds() {
    let dir = root().join(CHART).join("crds");
    let mut plurals = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir:?}: {e}")) {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let crd: Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{path:?}: {e}"));
        assert_eq!(crd["kind"].as_str(), Some("CustomResourceDefinition"));
        assert_eq!(
            crd["spec"]["group"].as_str(),
            Some("cubicle.dev"),
            "{path:?}"
        );
        // The person's preferences have no status (nothing observes them).
        let status_less = crd["spec"]["names"]["kind"] == "UserPreferences";
        for v in crd["spec"]["versions"].as_sequence().unwrap() {
            assert!(
                status_less || v["subresources"]["status"].is_mapping(),
                "{path:?}: the rules grant /status, so the CRD has the status subresource"
            );
        }
        plurals.insert(crd["spec"]["names"]["plural"].as_str().unwrap().to_owned());
    }
    assert!(
        !plurals.is_empty(),
        "{dir:?} is empty: copy the generated crds/*.yaml into it"
    );
    let in_rbac: BTreeSet<String> = grants(&objects(DEFAULTS))
        .into_keys()
        .filter(|(_, g, r, _)| g == "cubicle.dev" && !r.contains('/'))
        .map(|(_, _, r, _)| r)
        .collect();
    assert_eq!(in_rbac, plurals, "RBAC resources vs chart CRD plurals");

    let with_crds = helm_run(&[
        "template",
        RELEASE,
        CHART,
        "--namespace",
        NAMESPACE,
        "--include-crds",
    ])
    .expect("helm template --include-crds");
    assert_eq!(
        with_crds.matches("kind: CustomResourceDefinition").count(),
        plurals.len()
    );
}

/// Pause keeps the pod and cuts access: the operator labels the pod, and the chart's
/// NetworkPolicy denies pods with that label all ingress, in every session namespace it knows.
/// Standard base64 (RFC 4648, with padding), enough to read the chart's inline icon back.
fn decode_base64(s: &str) -> Vec<u8> {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = vec![];
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = alphabet.iter().position(|&a| a == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[test]
fn several_replicas_get_a_disruption_budget_and_spread() {
    let single = objects(DEFAULTS);
    assert!(
        of_kind(&single, "PodDisruptionBudget").is_empty(),
        "none with one replica"
    );
    assert!(
        deployment(&single)["spec"]["template"]["spec"]
            .get("topologySpreadConstraints")
            .is_none()
    );
    for set in [HA, NAMESPACED_HA] {
        let objs = objects(set);
        let pdbs = of_kind(&objs, "PodDisruptionBudget");
        assert_eq!(pdbs.len(), 1, "{set:?}");
        assert_eq!(namespace(pdbs[0]), Some(NAMESPACE));
        assert_eq!(pdbs[0]["spec"]["maxUnavailable"].as_u64(), Some(1));
        let pod = &deployment(&objs)["spec"]["template"];
        assert_eq!(
            pdbs[0]["spec"]["selector"]["matchLabels"],
            deployment(&objs)["spec"]["selector"]["matchLabels"],
            "{set:?}: the budget selects the operator pods"
        );
        let spread = pod["spec"]["topologySpreadConstraints"]
            .as_sequence()
            .expect("spread constraints");
        let keys: Vec<&str> = spread
            .iter()
            .map(|c| c["topologyKey"].as_str().unwrap())
            .collect();
        assert_eq!(
            keys,
            ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
        );
        for c in spread {
            assert_eq!(c["whenUnsatisfiable"].as_str(), Some("ScheduleAnyway"));
            assert_eq!(
                c["labelSelector"]["matchLabels"],
                deployment(&objs)["spec"]["selector"]["matchLabels"]
            );
        }
    }
    let own = [
        HA,
        &[
            "topologySpreadConstraints[0].maxSkew=2",
            "topologySpreadConstraints[0].topologyKey=rack",
            "topologySpreadConstraints[0].whenUnsatisfiable=DoNotSchedule",
        ],
    ]
    .concat();
    let objs = objects(&own);
    let spread = &deployment(&objs)["spec"]["template"]["spec"]["topologySpreadConstraints"];
    assert_eq!(
        spread[0]["topologyKey"].as_str(),
        Some("rack"),
        "the user's own replace the defaults"
    );
    assert_eq!(spread.as_sequence().unwrap().len(), 1);
    let off = [HA, &["podDisruptionBudget.enabled=false"]].concat();
    assert!(of_kind(&objects(&off), "PodDisruptionBudget").is_empty());
}

#[test]
fn the_operator_pod_admits_only_its_http_port() {
    let policy = |set: &[&str]| -> Option<Value> {
        of_kind(&objects(set), "NetworkPolicy")
            .into_iter()
            .find(|p| name(p) == "cubicle")
            .cloned()
    };
    for set in ALL_SETS {
        let objs = objects(set);
        let p = policy(set).unwrap_or_else(|| panic!("{set:?}: no operator NetworkPolicy"));
        assert_eq!(namespace(&p), Some(NAMESPACE));
        assert_eq!(
            p["spec"]["podSelector"]["matchLabels"],
            deployment(&objs)["spec"]["selector"]["matchLabels"],
            "{set:?}: selects the operator pods"
        );
        assert_eq!(strings(&p["spec"]["policyTypes"]), ["Ingress"]);
        let rules = p["spec"]["ingress"].as_sequence().unwrap();
        assert_eq!(rules.len(), 1);
        let ports = rules[0]["ports"].as_sequence().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(
            ports[0]["port"].as_u64(),
            Some(8080),
            "the metrics and probe port only"
        );
        assert!(rules[0].get("from").is_none(), "every source by default");
    }
    let from = policy(&[
        "networkPolicy.operator.metricsFrom[0].namespaceSelector.matchLabels.team=monitoring",
    ])
    .unwrap();
    assert_eq!(
        from["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["team"].as_str(),
        Some("monitoring")
    );
    assert!(policy(&["networkPolicy.operator.enabled=false"]).is_none());
}

#[test]
fn paused_sessions_lose_all_ingress() {
    let label = cubicle::controller::contract::ACCESS_LABEL;
    let policies = |set: &[&str]| -> Vec<(String, Value)> {
        of_kind(&objects(set), "NetworkPolicy")
            .into_iter()
            .filter(|p| name(p).ends_with("-paused-sessions"))
            .map(|p| (namespace(p).unwrap().to_owned(), p["spec"].clone()))
            .collect()
    };
    for (set, want) in [
        (NAMESPACED, vec!["team-a", "team-b"]),
        (NAMESPACED_HA, vec!["team-a", "team-b"]),
        (CLUSTER_WITH_POLICY, vec!["team-a", "team-c"]),
        // Cluster scope without a list: the chart cannot know the session namespaces.
        (DEFAULTS, vec![]),
    ] {
        let got = policies(set);
        let namespaces: Vec<&str> = got.iter().map(|(ns, _)| ns.as_str()).collect();
        assert_eq!(namespaces, want, "{set:?}");
        for (ns, spec) in &got {
            assert_eq!(
                spec["podSelector"]["matchLabels"][label].as_str(),
                Some("paused"),
                "{set:?} {ns}: selects exactly the paused pods"
            );
            assert_eq!(
                spec["podSelector"]["matchLabels"]
                    .as_mapping()
                    .map(|m| m.len()),
                Some(1)
            );
            assert_eq!(strings(&spec["policyTypes"]), ["Ingress"], "{set:?} {ns}");
            assert!(
                spec.get("ingress").is_none(),
                "{set:?} {ns}: no ingress rule, so all ingress is denied"
            );
        }
    }
    let off = [NAMESPACED, &["networkPolicy.pausedSessions.enabled=false"]].concat();
    assert!(policies(&off).is_empty(), "disabled: no NetworkPolicy");
}

/// The Session admission policy and its binding are there by default (the rule the access
/// tests run against), match Session writes but not their status, and deny; off when asked.
#[test]
fn the_session_policy_ships_and_denies() {
    let objs = objects(DEFAULTS);
    let policies = of_kind(&objs, "ValidatingAdmissionPolicy");
    assert_eq!(policies.len(), 1);
    let p = policies[0];
    assert_eq!(name(p), "cubicle-session-user");
    assert_eq!(p["spec"]["failurePolicy"].as_str(), Some("Fail"));
    let rule = &p["spec"]["matchConstraints"]["resourceRules"][0];
    assert_eq!(strings(&rule["resources"]), ["sessions"]);
    assert_eq!(strings(&rule["operations"]), ["CREATE", "UPDATE", "DELETE"]);
    let squash = |s: &str| s.split_whitespace().collect::<String>();
    assert_eq!(
        squash(p["spec"]["validations"][0]["expression"].as_str().unwrap()),
        squash(cubicle::access::CHECK_EXPRESSION)
    );
    assert_eq!(
        squash(p["spec"]["variables"][0]["expression"].as_str().unwrap()),
        squash(cubicle::access::TARGET_EXPRESSION)
    );
    let bindings = of_kind(&objs, "ValidatingAdmissionPolicyBinding");
    assert_eq!(bindings.len(), 1);
    assert_eq!(
        bindings[0]["spec"]["policyName"].as_str(),
        Some("cubicle-session-user")
    );
    assert_eq!(strings(&bindings[0]["spec"]["validationActions"]), ["Deny"]);
    let off = objects(&["access.sessionPolicy.enabled=false"]);
    assert!(of_kind(&off, "ValidatingAdmissionPolicy").is_empty());
    assert!(of_kind(&off, "ValidatingAdmissionPolicyBinding").is_empty());
}

/// The end-user role manages Sessions and reads the directory, and nothing else: no pods,
/// exec, port-forward, claims or Secrets, no aggregation into edit/admin. Admin groups are
/// bound to "use" on every User only when listed.
#[test]
fn people_get_sessions_and_nothing_on_pods_claims_or_secrets() {
    let objs = objects(DEFAULTS);
    let people: Vec<&Value> = objs.iter().filter(|o| for_people(o)).collect();
    assert_eq!(people.len(), 1, "only the end-user role by default");
    let role = people[0];
    assert_eq!((kind(role), name(role)), ("ClusterRole", "cubicle-user"));
    assert!(role.get("aggregationRule").is_none());
    for (k, _) in role["metadata"]["labels"].as_mapping().unwrap() {
        assert!(
            !k.as_str()
                .unwrap()
                .starts_with("rbac.authorization.k8s.io/aggregate"),
            "the end-user role must not aggregate into built-in roles"
        );
    }
    let mut granted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for rule in role["rules"].as_sequence().unwrap() {
        assert_eq!(strings(&rule["apiGroups"]), ["cubicle.dev"]);
        for r in strings(&rule["resources"]) {
            granted
                .entry(r.to_owned())
                .or_default()
                .extend(strings(&rule["verbs"]).into_iter().map(str::to_owned));
        }
    }
    assert_eq!(
        granted.keys().map(String::as_str).collect::<Vec<_>>(),
        ["groups", "sessions", "users", "workspaces"]
    );
    for r in ["users", "groups", "workspaces"] {
        assert_eq!(
            granted[r],
            ["get", "list", "watch"].map(String::from).into()
        );
    }
    assert!(!granted["sessions"].contains("*"));
    // `cubicle dev` and the tests install the same rules (cubicle::access::user_role).
    let dev = serde_yaml::to_value(cubicle::access::user_role("x").rules).unwrap();
    assert_eq!(
        role["rules"], dev,
        "the chart's end-user role and access::user_role"
    );
    assert!(granted["sessions"].contains("create") && granted["sessions"].contains("delete"));

    let objs = objects(&["access.adminGroups={platform-admins,oidc:ops}"]);
    let admin: Vec<&Value> = objs
        .iter()
        .filter(|o| for_people(o) && name(o) == "cubicle-act-for-every-user")
        .collect();
    assert_eq!(admin.len(), 2, "a ClusterRole and its binding");
    let cr = admin.iter().find(|o| kind(o) == "ClusterRole").unwrap();
    assert_eq!(strings(&cr["rules"][0]["verbs"]), ["use"]);
    assert_eq!(strings(&cr["rules"][0]["resources"]), ["users"]);
    let crb = admin
        .iter()
        .find(|o| kind(o) == "ClusterRoleBinding")
        .unwrap();
    let groups: Vec<&str> = crb["subjects"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|s| {
            assert_eq!(s["kind"].as_str(), Some("Group"));
            s["name"].as_str().unwrap()
        })
        .collect();
    assert_eq!(groups, ["platform-admins", "oidc:ops"]);
}
