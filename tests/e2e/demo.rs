//! The quickstart (`cubicle dev up --demo` is `dev up` plus this): `cubicle dev demo` installs
//! the CRDs, applies `examples/`, runs the real operator binary and prints session changes; it
//! stops everything when asked. Run here against the shared control plane, with the examples
//! put into the test's namespace.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;

use crate::support::{self, TestNs, wait_for};

#[tokio::test]
async fn the_quickstart_applies_the_examples_runs_the_operator_and_shows_sessions() {
    let ns = TestNs::new("demo").await;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let docs = cubicle::devenv::demo::kustomize(&examples).unwrap();
    let sessions: BTreeSet<String> = docs
        .iter()
        .filter(|d| d["kind"] == "Session")
        .map(|d| d["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert!(sessions.len() >= 3, "{sessions:?}");
    let log_dir = support::run_dir().join(format!("demo-{}", ns.name));
    let started = Instant::now();
    let (mut child, lines) = spawn_demo(&ns.name, &log_dir, &[]);
    let output = || lines.lock().unwrap().join("\n");
    let has = |needle: String| {
        let lines = lines.clone();
        async move {
            lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(&needle))
                .then_some(())
        }
    };
    let long = Duration::from_secs(90);
    wait_for("the CRDs installed", long, || {
        has(format!(
            "installed {} Cubicle CRDs",
            cubicle::crd::all().len()
        ))
    })
    .await;
    wait_for("the examples applied", long, || {
        has(format!(
            "applied {} objects from {} into namespace {}",
            docs.len(),
            examples.display(),
            ns.name
        ))
    })
    .await;
    wait_for("the operator ready", long, || {
        has("operator `cubicle run` (pid ".into())
    })
    .await;
    let ready_after = started.elapsed();
    for s in &sessions {
        wait_for(&format!("a line for session {s}"), long, || {
            has(format!("{}/{s} ", ns.name))
        })
        .await;
    }
    // At least one example session runs, and its line names the node its pod is on.
    let pods = ns.api::<Pod>();
    let (name, node) = wait_for("an example session Running", long, || async {
        let text = output();
        for s in &sessions {
            let key = format!("{}/{s} ", ns.name);
            let Some(line) = text
                .lines()
                .rfind(|l| l.contains(&key) && l.contains(" Running "))
            else {
                continue;
            };
            let node = line.split_whitespace().nth(3)?.to_string();
            return Some((s.clone(), node));
        }
        None
    })
    .await;
    let pod = pods.get(&name).await.unwrap();
    assert_eq!(
        pod.spec.unwrap().node_name.as_deref(),
        Some(node.as_str()),
        "{}",
        output()
    );
    eprintln!(
        "[demo] CRDs, {} example objects and the operator up in {} ms; {name} Running on {node}",
        docs.len(),
        ready_after.as_millis()
    );

    // Closing stdin is the tests' Ctrl-C: the demo stops the operator and exits cleanly.
    let pid_line = output()
        .lines()
        .find(|l| l.starts_with("operator `cubicle run` (pid "))
        .unwrap()
        .to_string();
    let pid: u32 = pid_line
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {pid_line}"));
    drop(child.stdin.take());
    let status = wait_for("the demo to exit", Duration::from_secs(20), || {
        std::future::ready(child.try_wait().ok().flatten())
    })
    .await;
    assert!(status.success(), "{status}\n{}", output());
    assert!(output().contains("stopping the operator"), "{}", output());
    assert!(
        !Path::new("/proc").join(pid.to_string()).exists(),
        "the operator (pid {pid}) outlived the demo"
    );
    let log = std::fs::read_to_string(log_dir.join("operator.log")).unwrap();
    assert!(log.contains("stopped"), "{log}");
    assert!(!log.contains('\u{1b}'), "no terminal colours in a log file");
}

/// `cubicle dev demo --gateway-port`: the demo people sign in with the example Users' identities
/// and the dashboard shows their workspaces; the gateway runs as its own ServiceAccount with
/// the chart's rules and an impersonation grant limited to those identities, and a launch from
/// the dashboard goes through it as the person.
#[tokio::test]
async fn the_demo_dashboard_shows_the_example_users_to_their_people() {
    let Some(b) = crate::browser::Browser::start("demo-dashboard").await else {
        return;
    };
    let ns = TestNs::new("demo-gw").await;
    let log_dir = support::run_dir().join(format!("demo-{}", ns.name));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (mut child, lines) = spawn_demo(
        &ns.name,
        &log_dir,
        &["--gateway-port".into(), port.to_string()],
    );
    let output = || lines.lock().unwrap().join("\n");
    let long = Duration::from_secs(180);
    let prefix = "  sign in as alice@northwind.example with password ";
    let password = wait_for("the demo's sign-in line for alice", long, || {
        let text = output();
        std::future::ready(
            text.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .map(|p| p.trim().to_string()),
        )
    })
    .await;
    let portal = format!("http://cubicle.localhost:{port}");
    b.goto(&format!("{portal}/")).await;
    b.click("a[href='/.cubicle/login']").await;
    crate::browser::sign_in(&b, "alice@northwind.example", &password).await;
    let who = b
        .wait_until(
            "const w = document.getElementById('who'); return w && w.textContent",
            long,
        )
        .await;
    assert_eq!(who, "alice@northwind.example", "{}", output());
    let page = b.text().await;
    assert!(
        !page.contains("No user for you") && page.contains(&format!("alice in {}", ns.name)),
        "the example User alice is not shown to her: {page}"
    );
    // Launch alice's first workspace from the dashboard: the gateway's own account impersonates
    // her (its grant names her), and the API server lets her create her Session.
    b.eval(
        "window.confirm = function() { return true }; window.cubiclePaused = true; return 1",
        vec![],
    )
    .await;
    b.click(&format!(
        "section[aria-labelledby='u-{}-alice'] button.launch",
        ns.name
    ))
    .await;
    let notice = b
        .wait_until(
            "const n = document.getElementById('notice'); const f = document.getElementById('what'); \
             return (n && n.textContent) || (f && ('failed: ' + f.textContent))",
            long,
        )
        .await;
    assert!(
        notice.as_str().is_some_and(|n| n.starts_with("Launched ")),
        "{notice:?}\n{}",
        output()
    );
    let sessions = ns
        .api::<cubicle::crd::v1alpha1::Session>()
        .list(&Default::default())
        .await
        .unwrap();
    assert!(
        sessions.items.iter().any(|s| s.spec.user == "alice"),
        "no Session of alice's launched"
    );
    drop(child.stdin.take());
    let status = wait_for("the demo to exit", Duration::from_secs(30), || {
        std::future::ready(child.try_wait().ok().flatten())
    })
    .await;
    assert!(status.success(), "{status}\n{}", output());
    b.close().await;
}

/// Starts `cubicle dev demo` (with `extra` arguments) into namespace `ns`, logging to
/// `log_dir`; its stdout and stderr lines are collected, in order, into the returned log.
fn spawn_demo(
    ns: &str,
    log_dir: &Path,
    extra: &[String],
) -> (std::process::Child, Arc<Mutex<Vec<String>>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cubicle"))
        .args([
            "dev",
            "demo",
            "--stub-missing-classes",
            "--exit-on-stdin-eof",
        ])
        .args(extra)
        .arg("--kubeconfig")
        .arg(support::kubeconfig())
        .arg("--namespace")
        .arg(ns)
        .arg("--log-dir")
        .arg(log_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start `cubicle dev demo`");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let sink = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stream).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
    }
    (child, lines)
}
