//! Starting and stopping the real node leaves the host as it found it: sysctls, iptables,
//! mounts, links and addresses, routes, cgroups and the paths a kubelet or containerd create
//! (`tests/node/node.sh host-state` lists them). A pod runs on the node in between, so network
//! namespaces, volumes, container mounts and pod cgroups really existed.
//!
//! Skipped with a message where the host cannot run containers, unless
//! `CUBICLE_REQUIRE_REAL_NODE=1` (CI): then it fails.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn node_sh(arg: &str) -> std::process::Output {
    Command::new("bash")
        .arg(root().join("tests/node/node.sh"))
        .arg(arg)
        .output()
        .expect("run tests/node/node.sh")
}

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn stopping_the_real_node_restores_the_host() {
    let check = node_sh("check");
    if !check.status.success() {
        let why = String::from_utf8_lossy(&check.stdout);
        if std::env::var("CUBICLE_REQUIRE_REAL_NODE").is_ok_and(|v| v == "1") {
            panic!("the real node is required (CUBICLE_REQUIRE_REAL_NODE=1): {why}");
        }
        eprintln!("skipped: {why}");
        return;
    }
    // Another test binary's node (the realnode harness) may still be stopping: node.sh removes the
    // bridge last, once the sysctls and paths are restored, so its absence means the stop is over.
    wait(
        "another real node to stop",
        Duration::from_secs(300),
        || {
            !Command::new("ip")
                .args(["link", "show", "cubicle0"])
                .stderr(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .unwrap()
                .success()
        },
    );
    let before = String::from_utf8(node_sh("host-state").stdout).unwrap();
    assert!(before.contains("# sysctls") && before.contains("# mounts"));

    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("node-host-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = std::fs::File::create(dir.join("dev-up.log")).unwrap();
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_cubicle"))
        .args([
            "dev",
            "up",
            "--exit-on-stdin-eof",
            "--nodes",
            "1",
            "--zones",
            "1",
        ])
        .args(["--real-node", "--node-images", "none", "--dir"])
        .arg(dir.join("dev"))
        .stdin(Stdio::piped())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start cubicle dev up --real-node");
    let ready = dir.join("dev/dev-ready");
    wait("dev up --real-node", Duration::from_secs(1800), || {
        if let Ok(Some(s)) = child.try_wait() {
            panic!(
                "dev up exited with {s}: {}",
                std::fs::read_to_string(dir.join("dev-up.log")).unwrap_or_default()
            );
        }
        ready.exists()
    });
    let ready: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    assert!(
        ready["realNode"].is_object(),
        "no real node: {}",
        ready["realNodeUnavailable"]
    );
    eprintln!(
        "[realnode] dev up --real-node (pause image only): {} ms, node {} ms of it",
        t.elapsed().as_millis(),
        ready["realNode"]["startupMs"]
    );
    let kubeconfig = ready["kubeconfig"].as_str().unwrap().to_string();

    // A restricted pod with a volume on the node, so that every kind of host change happens.
    let pod = r#"{"apiVersion": "v1", "kind": "Pod",
      "metadata": {"name": "host-probe", "namespace": "default"},
      "spec": {"nodeSelector": {"cubicle.dev/real-node": "true"},
        "tolerations": [{"key": "cubicle.dev/real-node", "operator": "Exists"}],
        "automountServiceAccountToken": false,
        "securityContext": {"runAsNonRoot": true, "runAsUser": 4242, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        "containers": [{"name": "c", "image": "cubicle.localhost/pause:1", "imagePullPolicy": "Never",
          "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
          "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}}]}}"#;
    let mut apply = Command::new("kubectl")
        .args(["--kubeconfig", &kubeconfig, "apply", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    apply
        .stdin
        .take()
        .unwrap()
        .write_all(pod.as_bytes())
        .unwrap();
    assert!(apply.wait().unwrap().success());
    let out = Command::new("kubectl")
        .args(["--kubeconfig", &kubeconfig, "wait", "--for=condition=Ready"])
        .args(["pod/host-probe", "--timeout=120s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let during = String::from_utf8(node_sh("host-state").stdout).unwrap();
    assert_ne!(before, during, "the node changed the host while it ran");
    assert!(during.contains("cubicle0"), "{during}");

    // Closing stdin stops dev up, which stops the node and fails if the host differs.
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    let log = std::fs::read_to_string(dir.join("dev-up.log")).unwrap_or_default();
    assert!(status.success(), "dev up failed to stop cleanly:\n{log}");
    assert!(log.contains("host as before"), "{log}");
    let after = String::from_utf8(node_sh("host-state").stdout).unwrap();
    assert_eq!(before, after, "the host after the node is not as before");
    let _ = std::fs::remove_dir_all(&dir);
}
