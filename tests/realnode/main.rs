//! The whole product on a real node: the chart installed by `helm install` with the image built
//! here, the operator running as a pod (leader election, probes, metrics), sessions as real
//! containers under Pod Security "restricted", a profile's files across stop, resume, delete and
//! Reset, and the desktop image's Kasm contract (basic auth, https on 6901, `/websockify`).
//!
//! The harness (shared with `tests/e2e`) starts `cubicle dev up --real-node`. Where the host
//! cannot run containers the tests say so and pass, unless `CUBICLE_REQUIRE_REAL_NODE=1` (CI
//! sets it): then a missing or broken real node fails them.

#[path = "../e2e/support.rs"]
mod support;

#[path = "../e2e/browser.rs"]
mod browser;
mod desktop;
#[path = "../e2e/operator.rs"]
mod operator;

/// The harness's `cubicle dev up` also starts the real node with both images.
pub const DEV_UP_ARGS: &[&str] = &["--real-node", "--node-images", "operator,desktop"];

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cubicle::crd::v1alpha1::{Session, SessionPhase};
use cubicle::devenv::realnode::{NODE_NAME, REAL_NODE_LABEL};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use support::{TestNs, wait_for};

const LONG: Duration = Duration::from_secs(120);
/// The desktop's basic-auth password in these tests (Kasm's `VNC_PW`).
const VNC_PW: &str = "real-node-test-pw";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `true` if the real node runs; `false` (with a message) if the host cannot run one and it is
/// not required. Panics if it is required but absent.
fn real_node_or_skip(test: &str) -> bool {
    let env = support::env();
    if env.real_node.is_some() {
        return true;
    }
    let why = env
        .real_node_unavailable
        .clone()
        .unwrap_or_else(|| "the harness did not ask for one".into());
    if std::env::var("CUBICLE_REQUIRE_REAL_NODE").is_ok_and(|v| v == "1") {
        panic!("{test}: the real node is required (CUBICLE_REQUIRE_REAL_NODE=1) but absent: {why}");
    }
    eprintln!("{test}: skipped, no real node on this host: {why}");
    false
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn kubectl(args: &[&str]) -> String {
    run(Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(support::kubeconfig())
        .args(args))
}

fn helm(args: &[&str]) -> String {
    let out = run(Command::new("bash")
        .arg("tests/tools/helm.sh")
        .current_dir(root()));
    let bin = out.lines().last().unwrap_or_default().trim().to_string();
    let tmp = std::env::temp_dir();
    run(Command::new(bin)
        .args(args)
        .arg("--kubeconfig")
        .arg(support::kubeconfig())
        .current_dir(root())
        .env("HELM_CACHE_HOME", tmp.join("cubicle-helm-cache"))
        .env("HELM_CONFIG_HOME", tmp.join("cubicle-helm-config"))
        .env("HELM_DATA_HOME", tmp.join("cubicle-helm-data")))
}

/// A namespace that enforces Pod Security "restricted".
async fn restricted_ns(prefix: &str) -> TestNs {
    let ns = TestNs::new(prefix).await;
    Api::<Namespace>::all(ns.client.clone())
        .patch(
            &ns.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
            }}})),
        )
        .await
        .unwrap();
    ns
}

/// What session `name` of `ns`, its pod (of the same name) and the real node are in, for a
/// failure message: the Session's phase, deadline, keepalive and conditions; the pod's phase,
/// node, conditions and containers; the pod's Events (the scheduler's reasons, e.g.
/// Insufficient cpu); the node's conditions and what it can allocate. The one report of the
/// real-node tests.
async fn diagnose(ns: &TestNs, name: &str) -> String {
    use cubicle::crd::v1alpha1::KEEPALIVE_ANNOTATION;
    use k8s_openapi::api::core::v1::{Event, Node};
    let mut out = String::new();
    match ns.api::<Session>().get_opt(name).await {
        Ok(Some(s)) => {
            let st = s.status.clone().unwrap_or_default();
            out += &format!(
                "session {name}: phase {:?}, expiresAt {:?}, lastKeepalive {:?}, keepalive annotation {:?}, deleting {}\n  conditions: {}\n",
                st.phase,
                st.expires_at.map(|t| t.0.to_string()),
                st.last_keepalive.as_ref().map(|k| k.time.0.to_string()),
                s.annotations().get(KEEPALIVE_ANNOTATION),
                s.metadata.deletion_timestamp.is_some(),
                serde_json::to_string(&st.conditions).unwrap_or_default(),
            );
        }
        Ok(None) => out += &format!("session {name}: gone\n"),
        Err(e) => out += &format!("session {name}: {e}\n"),
    }
    match ns.api::<Pod>().get_opt(name).await {
        Ok(Some(p)) => {
            let st = p.status.clone().unwrap_or_default();
            out += &format!(
                "pod {name}: phase {:?} ip {:?} node {:?} deleting {}\n  conditions: {}\n  containers: {}\n",
                st.phase,
                st.pod_ip,
                p.spec.as_ref().and_then(|s| s.node_name.clone()),
                p.metadata.deletion_timestamp.is_some(),
                serde_json::to_string(&st.conditions).unwrap_or_default(),
                serde_json::to_string(&st.container_statuses).unwrap_or_default(),
            );
        }
        Ok(None) => out += &format!("pod {name}: gone\n"),
        Err(e) => out += &format!("pod {name}: {e}\n"),
    }
    let events = ns
        .api::<Event>()
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await;
    match events {
        Ok(list) => {
            for e in list.items.iter().rev().take(10) {
                out += &format!(
                    "  event {} {}: {} (x{})\n",
                    e.involved_object.kind.as_deref().unwrap_or("?"),
                    e.reason.as_deref().unwrap_or("?"),
                    e.message.as_deref().unwrap_or(""),
                    e.count.unwrap_or(1),
                );
            }
        }
        Err(e) => out += &format!("  events: {e}\n"),
    }
    match Api::<Node>::all(ns.client.clone()).get_opt(NODE_NAME).await {
        Ok(Some(n)) => {
            let st = n.status.clone().unwrap_or_default();
            let conditions: Vec<String> = st
                .conditions
                .unwrap_or_default()
                .iter()
                .map(|c| format!("{}={}", c.type_, c.status))
                .collect();
            out += &format!(
                "node {NODE_NAME}: {}; allocatable {}\n",
                conditions.join(" "),
                serde_json::to_string(&st.allocatable).unwrap_or_default(),
            );
        }
        Ok(None) => out += &format!("node {NODE_NAME}: absent\n"),
        Err(e) => out += &format!("node {NODE_NAME}: {e}\n"),
    }
    out
}

/// Polls `check` every 250 ms until it returns `Some`; after `timeout`, panics saying what
/// session `name`, its pod and the real node are in ([`diagnose`]).
async fn wait_on<T, F, Fut>(ns: &TestNs, name: &str, what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    match tokio::time::timeout(timeout, wait_for(what, Duration::MAX, check)).await {
        Ok(v) => v,
        Err(_) => panic!(
            "{}: {what}: not after {timeout:?}\n{}",
            ns.name,
            diagnose(ns, name).await
        ),
    }
}

/// The HTTP status the desktop's web server at `url` answers with basic auth `user`
/// (`user:password`), or "000" while nothing answers.
fn desktop_status(url: &str, user: &str) -> String {
    let out = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(["--max-time", "5", "-u", user, url])
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&out.stdout).to_string()
}

async fn wait_phase(ns: &TestNs, name: &str, phase: SessionPhase) -> Session {
    let api = ns.api::<Session>();
    wait_on(
        ns,
        name,
        &format!("session {name} {phase:?}"),
        LONG,
        || async {
            let s = api.get(name).await.ok()?;
            (s.status.as_ref()?.phase == Some(phase)).then_some(s)
        },
    )
    .await
}

async fn set_state(ns: &TestNs, name: &str, state: &str) {
    ns.api::<Session>()
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"state": state}})),
        )
        .await
        .unwrap();
}

async fn create_session(ns: &TestNs, name: &str, extra: serde_json::Value) {
    let mut spec = json!({"user": "bob", "workspace": "desktop"});
    if let serde_json::Value::Object(m) = extra {
        for (k, v) in m {
            spec[k] = v;
        }
    }
    let s: Session = serde_json::from_value(json!({
        "apiVersion": "cubicle.dev/v1alpha1", "kind": "Session",
        "metadata": {"name": name}, "spec": spec}))
    .unwrap();
    ns.api::<Session>()
        .create(&Default::default(), &s)
        .await
        .unwrap();
}

/// Waits until the session's pod runs in a real container on the real node, and returns it.
async fn running_pod(ns: &TestNs, name: &str) -> Pod {
    wait_on(
        ns,
        name,
        &format!("pod {name} Ready on {NODE_NAME}"),
        LONG,
        || async {
            let p = ns.api::<Pod>().get(name).await.ok()?;
            let ready = p
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            (ready && p.metadata.deletion_timestamp.is_none()).then_some(p)
        },
    )
    .await
}

fn exec(ns: &TestNs, pod: &str, script: &str) -> String {
    kubectl(&["exec", "-n", &ns.name, pod, "--", "sh", "-c", script])
}

/// The tenant: one group, one user, a desktop workspace that runs on the real node.
fn tenant_yaml() -> String {
    format!(
        r#"
apiVersion: cubicle.dev/v1alpha1
kind: Group
metadata: {{name: everyone}}
spec:
  priority: 100
  settings: {{autoAddLocalUsers: true, allowPersistentProfile: true, allowKasmStop: true, maxKasmsPerUser: 2}}
---
apiVersion: cubicle.dev/v1alpha1
kind: User
metadata: {{name: bob}}
spec: {{realm: local}}
---
apiVersion: cubicle.dev/v1alpha1
kind: Workspace
metadata: {{name: desktop}}
spec:
  image: cubicle.localhost/desktop:1
  imagePullPolicy: Never
  groups: [everyone]
  resources: {{cores: "1", memory: 1Gi}}
  env: [{{name: VNC_PW, value: {VNC_PW}}}]
  persistentProfile:
    mountPath: /home/kasm-user
    claimTemplate: {{name: "profile-{{username}}", size: 1Gi}}
  runConfig:
    pod:
      nodeSelector: {{"{REAL_NODE_LABEL}": "true"}}
      tolerations: [{{key: {REAL_NODE_LABEL}, operator: Exists, effect: NoSchedule}}]
"#
    )
}

/// `helm install`s the chart (the image built here, on the real node, leader election on) for
/// the tenant namespace and waits for the operator pod to be Ready and to hold the Lease.
async fn install_operator(tenant: &TestNs) -> (TestNs, String, Pod) {
    let system = restricted_ns("rn-sys").await;
    let release = format!("cubicle-{}", system.name.rsplit('-').next().unwrap());
    let t = Instant::now();
    helm(&[
        "install",
        &release,
        "charts/cubicle",
        "--namespace",
        &system.name,
        "--skip-crds",
        "--set",
        "image.pullPolicy=Never",
        "--set",
        "rbac.scope=namespaces",
        "--set",
        &format!("rbac.namespaces={{{}}}", tenant.name),
        "--set",
        "leaderElection.enabled=true",
        "--set-string",
        &format!("nodeSelector.{}=true", REAL_NODE_LABEL.replace('.', "\\.")),
        "--set",
        &format!("tolerations[0].key={REAL_NODE_LABEL}"),
        "--set",
        "tolerations[0].operator=Exists",
    ]);
    let pods: Api<Pod> = system.api();
    let pod = wait_for("the operator pod Ready", LONG, || async {
        let list = pods.list(&ListParams::default()).await.ok()?;
        list.items.into_iter().find(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
    })
    .await;
    eprintln!(
        "[realnode] helm install to operator pod Ready (readiness probe passed): {} ms",
        t.elapsed().as_millis()
    );
    assert_eq!(
        pod.spec.as_ref().unwrap().node_name.as_deref(),
        Some(NODE_NAME)
    );
    let leases: Api<Lease> = system.api();
    let holder = wait_for("the operator to hold its Lease", LONG, || async {
        let lease = leases.get(&format!("{release}-leader")).await.ok()?;
        lease.spec?.holder_identity
    })
    .await;
    assert_eq!(holder, pod.name_any(), "the pod holds the leader Lease");
    (system, release, pod)
}

/// The real node is one small node: its tests take turns, or one's pods leave the other's
/// unschedulable (Insufficient cpu).
static REAL_NODE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds the real node for one test (a panicked test's turn still ends).
pub fn take_the_node() -> std::sync::MutexGuard<'static, ()> {
    REAL_NODE.lock().unwrap_or_else(|e| e.into_inner())
}

#[tokio::test]
async fn the_helm_installed_operator_runs_restricted_sessions_with_lasting_profiles() {
    let _node = take_the_node();
    if !real_node_or_skip("realnode") {
        return;
    }
    let started = Instant::now();
    kubectl(&["apply", "--server-side", "-f", "crds/"]);
    kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd",
        "--all",
        "--timeout=60s",
    ]);
    let ns = restricted_ns("rn").await;
    let path = support::run_dir().join(format!("{}-tenant.yaml", ns.name));
    std::fs::write(&path, tenant_yaml()).unwrap();
    kubectl(&["apply", "-n", &ns.name, "-f", path.to_str().unwrap()]);
    let (system, release, operator) = install_operator(&ns).await;

    // Metrics and probes are served on the pod's IP, from the host across the node's bridge.
    let op_ip = operator.status.as_ref().unwrap().pod_ip.clone().unwrap();
    let metrics = run(Command::new("curl").args([
        "-sf",
        "--max-time",
        "5",
        &format!("http://{op_ip}:8080/metrics"),
    ]));
    assert!(metrics.contains("cubicle_"), "metrics: {metrics:.300}");

    // The kubelet refuses anonymous callers (a pod on the node's bridge could reach it); the API
    // server, with its kubelet client certificate, still gets logs (and exec, below).
    kubelet_refuses_anonymous(&ns).await;
    let logs = kubectl(&["logs", "-n", &system.name, &operator.name_any()]);
    assert!(
        logs.contains("caches synced") || logs.lines().count() > 2,
        "kubectl logs of the operator pod on the real node: {logs:.500}"
    );

    // A session becomes a real container, admitted under "restricted", running as uid 1000.
    let t = Instant::now();
    create_session(&ns, "s1", json!({})).await;
    wait_phase(&ns, "s1", SessionPhase::Running).await;
    let pod = running_pod(&ns, "s1").await;
    eprintln!(
        "[realnode] session to a Ready desktop container: {} ms",
        t.elapsed().as_millis()
    );
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some(NODE_NAME));
    let uid = spec
        .security_context
        .as_ref()
        .and_then(|s| s.run_as_user)
        .or_else(|| {
            spec.containers[0]
                .security_context
                .as_ref()
                .and_then(|s| s.run_as_user)
        })
        .expect("the session pod names its uid");
    let container_id = pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .container_id
        .clone()
        .unwrap_or_default();
    assert!(container_id.starts_with("containerd://"), "{container_id}");
    // PID 1 of the container (the desktop's entrypoint) and an exec'd process run as that uid.
    let status = exec(
        &ns,
        "s1",
        "cat /proc/1/status; echo exec-uid $(id -u) $(id -g)",
    );
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    let uids: Vec<&str> = uid_line.split_whitespace().skip(1).collect();
    assert_eq!(uids, vec![uid.to_string(); 4], "{uid_line}");
    assert!(status.contains(&format!("exec-uid {uid} ")), "{status}");
    let caps = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    assert!(
        caps.ends_with("0000000000000000"),
        "no capabilities: {caps}"
    );
    let nnp = status
        .lines()
        .find(|l| l.starts_with("NoNewPrivs:"))
        .unwrap();
    assert!(nnp.ends_with('1'), "{nnp}");
    let seccomp = status.lines().find(|l| l.starts_with("Seccomp:")).unwrap();
    assert!(seccomp.ends_with('2'), "seccomp filter mode: {seccomp}");

    // The desktop: https on 6901 with basic auth, and the VNC WebSocket at /websockify.
    let ip = pod.status.as_ref().unwrap().pod_ip.clone().unwrap();
    desktop_contract(&ip).await;

    // A file written in the profile survives stop, resume, delete and a new session.
    exec(&ns, "s1", "echo kept > /home/kasm-user/kept.txt");
    set_state(&ns, "s1", "Stopped").await;
    wait_phase(&ns, "s1", SessionPhase::Stopped).await;
    wait_for("s1's pod gone", LONG, || async {
        matches!(ns.api::<Pod>().get_opt("s1").await, Ok(None)).then_some(())
    })
    .await;
    set_state(&ns, "s1", "Running").await;
    wait_phase(&ns, "s1", SessionPhase::Running).await;
    running_pod(&ns, "s1").await;
    assert_eq!(exec(&ns, "s1", "cat /home/kasm-user/kept.txt"), "kept\n");
    ns.api::<Session>()
        .delete("s1", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("s1 and its pod gone", LONG, || async {
        (matches!(ns.api::<Session>().get_opt("s1").await, Ok(None))
            && matches!(ns.api::<Pod>().get_opt("s1").await, Ok(None)))
        .then_some(())
    })
    .await;
    create_session(&ns, "s2", json!({})).await;
    wait_phase(&ns, "s2", SessionPhase::Running).await;
    running_pod(&ns, "s2").await;
    assert_eq!(exec(&ns, "s2", "cat /home/kasm-user/kept.txt"), "kept\n");
    ns.api::<Session>()
        .delete("s2", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("s2 and its pod gone", LONG, || async {
        (matches!(ns.api::<Session>().get_opt("s2").await, Ok(None))
            && matches!(ns.api::<Pod>().get_opt("s2").await, Ok(None)))
        .then_some(())
    })
    .await;

    // Reset archives the profile: the file stays on the archived claim, the new one is empty.
    create_session(&ns, "s3", json!({"persistentProfile": "Reset"})).await;
    let s3 = wait_phase(&ns, "s3", SessionPhase::Running).await;
    running_pod(&ns, "s3").await;
    let profile = s3.status.unwrap().profile.unwrap();
    assert_eq!(profile.archived_as.as_deref(), Some("profile-bob"));
    let fresh = profile.claim.unwrap();
    assert_ne!(fresh, "profile-bob");
    assert_eq!(
        exec(
            &ns,
            "s3",
            "ls -A /home/kasm-user | grep -c kept.txt || true"
        ),
        "0\n",
        "the new profile is empty of the old files"
    );
    let claims: Api<PersistentVolumeClaim> = ns.api();
    let archived = claims.get("profile-bob").await.unwrap();
    assert!(archived.labels().contains_key("cubicle.dev/archived"));
    let pv_name = archived.spec.unwrap().volume_name.unwrap();
    let pv = Api::<PersistentVolume>::all(ns.client.clone())
        .get(&pv_name)
        .await
        .unwrap();
    let dir = pv.spec.unwrap().host_path.unwrap().path;
    assert_eq!(
        std::fs::read_to_string(Path::new(&dir).join("kept.txt")).unwrap(),
        "kept\n",
        "the file is still on the archived claim's volume"
    );

    helm(&["uninstall", &release, "--namespace", &system.name]);
    eprintln!(
        "[realnode] operator, sessions, profiles and desktop on the real node: {} ms",
        started.elapsed().as_millis()
    );
}

/// Requests to the real node's kubelet without credentials get 401, on the read-write port and
/// for the paths logs and exec use.
async fn kubelet_refuses_anonymous(ns: &TestNs) {
    let node = Api::<k8s_openapi::api::core::v1::Node>::all(ns.client.clone())
        .get(NODE_NAME)
        .await
        .unwrap();
    let status = node.status.unwrap();
    let port = status
        .daemon_endpoints
        .and_then(|d| d.kubelet_endpoint)
        .map(|e| e.port)
        .expect("the node reports its kubelet port");
    let ip = status
        .addresses
        .unwrap_or_default()
        .into_iter()
        .find(|a| a.type_ == "InternalIP")
        .expect("the node has an InternalIP")
        .address;
    for path in ["/pods", "/containerLogs/kube-system/x/c", "/healthz"] {
        let code = run(Command::new("curl").args([
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            &format!("https://{ip}:{port}{path}"),
        ]));
        assert_eq!(
            code, "401",
            "an anonymous request to the kubelet at {ip}:{port}{path}"
        );
    }
}

/// Kasm's contract, checked from the host against the pod IP: right password 200, wrong 401,
/// and a WebSocket upgrade on /websockify answered 101.
async fn desktop_contract(ip: &str) {
    let url = format!("https://{ip}:6901/");
    let code = |user: &str| desktop_status(&url, user);
    // websockify starts a moment after the container: wait for it to answer at all.
    let right = format!("kasm_user:{VNC_PW}");
    wait_for("the desktop's web server on 6901", LONG, || async {
        (code(&right) == "200").then_some(())
    })
    .await;
    assert_eq!(code("kasm_user:wrong-password"), "401");
    assert_eq!(code(&format!("someone:{VNC_PW}")), "401");
    let upgrade = Command::new("curl")
        .args([
            "-sk",
            "-i",
            "--max-time",
            "3",
            "-u",
            &right,
            "-H",
            "Connection: Upgrade",
            "-H",
            "Upgrade: websocket",
            "-H",
            "Sec-WebSocket-Version: 13",
            "-H",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "-H",
            "Sec-WebSocket-Protocol: binary",
            &format!("{url}websockify"),
        ])
        .output()
        .unwrap();
    // curl times out holding the open WebSocket; the status line is what matters.
    let head = String::from_utf8_lossy(&upgrade.stdout);
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "WebSocket upgrade on /websockify: {head:.300}"
    );
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head:.300}");
}
