//! The operator as a process: the real `cubicle run` binary against the local control plane,
//! with JSON logs, `/healthz`, `/readyz` (caches synced), `/metrics`, and a graceful exit on
//! SIGTERM.

use std::time::{Duration, Instant};

use cubicle::crd::v1alpha1::SessionPhase;
use serde_json::json;

use crate::api::install_crds;
use crate::binary::OperatorBin;
use crate::sessions::{create, session, tenant, wait_phase};
use crate::support::{self, TestNs};

/// The value of the sample `name{labels}` in an OpenMetrics text, if present.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn the_binary_serves_probes_and_metrics_and_exits_cleanly_on_sigterm() {
    install_crds().await;
    let ns = TestNs::new("proc").await;
    tenant(&ns).await;
    let started = Instant::now();
    let mut op = OperatorBin::spawn(
        "proc",
        support::kubeconfig(),
        &[format!("--namespace={}", ns.name)],
        &[],
    );
    let (code, body) = op.get("/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok"), "/healthz");
    op.wait_ready(Duration::from_secs(30)).await;
    eprintln!(
        "[proc] cubicle run: /readyz 200 after {} ms",
        started.elapsed().as_millis()
    );

    create(&ns, &session("bob-1", "bob", "desktop", json!({}))).await;
    wait_phase(&ns, "bob-1", SessionPhase::Running).await;

    let (code, metrics) = op.get("/metrics").await;
    assert_eq!(code, 200);
    let at_least_one = |series: &str| {
        let v = sample(&metrics, series)
            .unwrap_or_else(|| panic!("/metrics has no {series}:\n{metrics}"));
        assert!(v >= 1.0, "{series} = {v}");
    };
    at_least_one("cubicle_reconcile_total{kind=\"Session\"}");
    at_least_one("cubicle_reconcile_total{kind=\"User\"}");
    at_least_one("cubicle_reconcile_duration_seconds_count{kind=\"Session\"}");
    at_least_one("cubicle_api_requests_total{verb=\"create\",resource=\"pods\"}");
    at_least_one("cubicle_api_requests_total{verb=\"patch\",resource=\"sessions/status\"}");
    at_least_one("cubicle_api_requests_total{verb=\"watch\",resource=\"sessions\"}");
    assert_eq!(
        sample(&metrics, "cubicle_sessions{phase=\"Running\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE cubicle_reconcile_duration_seconds histogram"));
    for kind in [
        "Session",
        "User",
        "Group",
        "Server",
        "ServerPool",
        "ServerAssignment",
    ] {
        let series = format!("cubicle_reconcile_queue{{kind=\"{kind}\"}}");
        let v = sample(&metrics, &series).unwrap_or_else(|| panic!("no {series}:\n{metrics}"));
        assert!(v >= 0.0, "{series} = {v}");
    }
    assert!(metrics.ends_with("# EOF\n"));
    // Bounded labels: no object name appears in any label.
    for l in metrics.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !l.contains("bob-1") && !l.contains(&ns.name),
            "an object name in a label: {l}"
        );
    }

    let t = Instant::now();
    op.signal("TERM");
    let status = op
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("exits within 5 s of SIGTERM");
    eprintln!(
        "[proc] SIGTERM to exit: {} ms ({status})",
        t.elapsed().as_millis()
    );
    assert!(status.success(), "exit status {status}");

    // Every log line is a JSON object with a level and a message.
    let events = op.events();
    assert!(events.len() >= 3, "{events:?}");
    for e in &events {
        assert!(e["level"].is_string() && e["message"].is_string(), "{e}");
    }
    for m in ["starting", "caches synced", "shutdown requested", "stopped"] {
        assert!(op.logged(m), "no {m:?} event in {events:?}");
    }
}

#[tokio::test]
async fn the_binary_refuses_to_start_when_its_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cubicle"))
        .args(["run", &format!("--metrics-addr={addr}")])
        .env("KUBECONFIG", support::kubeconfig())
        .output();
    let out = tokio::time::timeout(Duration::from_secs(10), out)
        .await
        .expect("exits at once")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "{stderr}"
    );
}
