//! The chart's gateway (values block `gateway`), rendered with `helm template` (no cluster):
//! off by default; on, a restricted Deployment of 2 replicas with a budget, least-privilege
//! RBAC (SubjectAccessReviews, one Secret by name), a NetworkPolicy guarding session pods, one
//! wildcard Ingress, and the operator's session credentials switched on.

use std::path::Path;
use std::process::Command;

use serde::Deserialize;
use serde_json::Value;

fn helm() -> String {
    if let Ok(h) = std::env::var("HELM") {
        return h;
    }
    let out = Command::new("bash")
        .arg("tests/tools/helm.sh")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run tests/tools/helm.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string()
}

fn template(set: &[&str]) -> Result<Vec<Value>, String> {
    let mut cmd = Command::new(helm());
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "template",
            "cubicle",
            "charts/cubicle",
            "--namespace",
            "cubicle-system",
        ])
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
        );
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().expect("run helm");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).unwrap();
    Ok(serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect())
}

const ON: &[&str] = &[
    "gateway.enabled=true",
    "gateway.publicUrl=https://cubicle.example.com",
    "gateway.auth.oidc.issuer=https://id.example.com",
    "gateway.auth.oidc.clientSecret.name=cubicle-oidc",
    "gateway.ingress.enabled=true",
    "gateway.ingress.tlsSecretName=cubicle-wildcard",
    "gateway.networkPolicy.namespaces={team-a}",
];

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn the_gateway_is_off_by_default() {
    let objs = template(&[]).unwrap();
    assert!(
        objs.iter().all(|o| !o["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .contains("gateway")),
        "no gateway object without gateway.enabled"
    );
    let _ = Path::new(env!("CARGO_MANIFEST_DIR"));
}

#[test]
fn the_gateway_deploys_restricted_with_a_budget_and_least_privilege() {
    let objs = template(ON).unwrap();
    let d = find(&objs, "Deployment", "cubicle-gateway");
    assert_eq!(d["spec"]["replicas"], 2);
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["command"], serde_json::json!(["cubicle", "gateway"]));
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let env: Vec<&str> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(env.contains(&"CUBICLE_OIDC_CLIENT_SECRET"), "{env:?}");
    // The gateway's pods are not the operator's.
    let op = find(&objs, "Deployment", "cubicle");
    assert_ne!(op["spec"]["selector"], d["spec"]["selector"]);
    let op_env =
        serde_json::to_string(&op["spec"]["template"]["spec"]["containers"][0]["env"]).unwrap();
    assert!(
        op_env.contains("CUBICLE_SESSION_CREDENTIALS")
            && op_env.contains("https://cubicle.example.com")
    );
    let pdb = find(&objs, "PodDisruptionBudget", "cubicle-gateway");
    assert_eq!(pdb["spec"]["selector"], d["spec"]["selector"]);

    // RBAC: SubjectAccessReviews yes; Secrets only the master key, by name.
    let cr = find(&objs, "ClusterRole", "cubicle-gateway");
    let rules = cr["rules"].as_array().unwrap();
    assert!(rules.iter().any(
        |r| r["resources"] == serde_json::json!(["subjectaccessreviews"])
            && r["verbs"] == serde_json::json!(["create"])
    ));
    assert!(
        !serde_json::to_string(rules).unwrap().contains("secrets"),
        "no Secrets cluster-wide"
    );
    assert!(
        !serde_json::to_string(rules).unwrap().contains("\"*\""),
        "no wildcards"
    );
    let key = find(&objs, "Role", "cubicle-gateway-key");
    assert_eq!(
        key["rules"][0]["resourceNames"],
        serde_json::json!(["cubicle-session-key"])
    );
    assert_eq!(key["rules"][0]["verbs"], serde_json::json!(["get"]));
    let creds = find(&objs, "ClusterRole", "cubicle-session-credentials");
    assert_eq!(
        creds["rules"][0]["verbs"],
        serde_json::json!(["create"]),
        "the operator never reads session Secrets"
    );

    // Session pods reachable from the gateway only; one wildcard Ingress.
    let np = find(&objs, "NetworkPolicy", "cubicle-gateway-sessions");
    assert_eq!(np["metadata"]["namespace"], "team-a");
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "cubicle-session"
    );
    assert_eq!(
        np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"],
        d["spec"]["selector"]["matchLabels"]
    );
    let ing = find(&objs, "Ingress", "cubicle-gateway");
    let hosts: Vec<&str> = ing["spec"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["cubicle.example.com", "*.cubicle.example.com"]);
    // Nothing random: two renders are the same.
    assert_eq!(objs, template(ON).unwrap());
}

#[test]
fn bad_gateway_values_are_refused_with_the_field_named() {
    let e = template(&[
        "gateway.enabled=true",
        "gateway.auth.oidc.issuer=https://id",
    ])
    .unwrap_err();
    assert!(e.contains("gateway.publicUrl"), "{e}");
    let e = template(&[
        "gateway.enabled=true",
        "gateway.publicUrl=https://c.example.com",
    ])
    .unwrap_err();
    assert!(e.contains("gateway.auth.oidc.issuer"), "{e}");
    let e = template(&["gateway.enabled=true", "gateway.publicUrl=ftp://x"]).unwrap_err();
    assert!(e.contains("publicUrl"), "{e}");
    let e = template(&["gateway.auth.mode=magic"]).unwrap_err();
    assert!(e.contains("mode"), "{e}");
    // Trusted-header mode needs no OIDC settings.
    let objs = template(&[
        "gateway.enabled=true",
        "gateway.publicUrl=https://c.example.com",
        "gateway.auth.mode=trustedHeader",
    ])
    .unwrap();
    let d = find(&objs, "Deployment", "cubicle-gateway");
    let env =
        serde_json::to_string(&d["spec"]["template"]["spec"]["containers"][0]["env"]).unwrap();
    assert!(
        env.contains("X-Auth-Request-User") && !env.contains("OIDC"),
        "{env}"
    );
}

#[test]
fn the_dashboard_may_impersonate_only_the_listed_people() {
    // Nothing listed: no impersonation grant at all.
    let objs = template(ON).unwrap();
    assert!(
        !objs
            .iter()
            .any(|o| o["metadata"]["name"] == "cubicle-gateway-impersonate"),
        "an impersonation grant without names"
    );
    let mut set = ON.to_vec();
    set.push("gateway.dashboard.impersonate.users={oidc:alice,oidc:bob}");
    let objs = template(&set).unwrap();
    let cr = find(&objs, "ClusterRole", "cubicle-gateway-impersonate");
    assert_eq!(
        cr["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["users"], "verbs": ["impersonate"],
                            "resourceNames": ["oidc:alice", "oidc:bob"]}]),
        "users by name only, no groups"
    );
    let crb = find(&objs, "ClusterRoleBinding", "cubicle-gateway-impersonate");
    assert_eq!(crb["subjects"][0]["name"], "cubicle-gateway");
    set.push("gateway.dashboard.impersonate.groups={oidc:staff}");
    let objs = template(&set).unwrap();
    let cr = find(&objs, "ClusterRole", "cubicle-gateway-impersonate");
    assert_eq!(cr["rules"][1]["resources"], serde_json::json!(["groups"]));
    assert_eq!(
        cr["rules"][1]["resourceNames"],
        serde_json::json!(["oidc:staff"])
    );
    // The cluster's own powers are never listed: the render refuses them, naming the field.
    for (field, name) in [
        ("users", "system:admin"),
        ("users", "system:serviceaccount:kube-system:default"),
        ("groups", "system:masters"),
    ] {
        let mut bad = set.clone();
        let value = format!("gateway.dashboard.impersonate.{field}={{oidc:alice,{name}}}");
        bad.push(&value);
        let e = template(&bad).unwrap_err();
        assert!(
            e.contains(&format!("gateway.dashboard.impersonate.{field}")) && e.contains(name),
            "{name} in {field}: {e}"
        );
    }
}

/// `cubicle dev up --demo` runs its gateway with the chart's rules and impersonation grant (the
/// same least privilege), not as an administrator. The grant names whom its provider signs in
/// and the groups their ID tokens carry: with `dev up`'s provider that includes root, in
/// `cubicle-admins` as well as `cubicle-people`.
#[test]
fn the_demo_gateway_gets_the_charts_rules_and_grant() {
    let mut set = ON.to_vec();
    set.push(
        "gateway.dashboard.impersonate.users={alice@northwind.example,root@northwind.example}",
    );
    set.push("gateway.dashboard.impersonate.groups={cubicle-admins,cubicle-people}");
    let objs = template(&set).unwrap();
    let person = |name: &str, groups: &[&str]| cubicle::devenv::oidc::Person {
        name: name.into(),
        password: "unused".into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
    };
    let (users, groups) = cubicle::devenv::demo::impersonated(&[
        person(
            "root@northwind.example",
            &["cubicle-people", "cubicle-admins"],
        ),
        person("alice@northwind.example", &["cubicle-people"]),
    ]);
    let demo = cubicle::devenv::demo::gateway_rbac("northwind", &users, &groups);
    assert_eq!(
        find(&demo, "ClusterRole", "cubicle-demo-gateway")["rules"],
        find(&objs, "ClusterRole", "cubicle-gateway")["rules"],
        "the demo gateway's rules and the chart's"
    );
    assert_eq!(
        find(&demo, "ClusterRole", "cubicle-demo-gateway-impersonate")["rules"],
        find(&objs, "ClusterRole", "cubicle-gateway-impersonate")["rules"],
        "the demo's impersonation grant and the chart's"
    );
}
