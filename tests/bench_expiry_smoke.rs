//! `cubicle bench-expiry` at N = 10, so that the harness cannot rot: it starts its own local
//! control plane, runs the operator as a child process, and must print the table with every
//! session armed, acted on, and none early. Counts only: timings depend on the machine.

use std::path::{Path, PathBuf};
use std::process::Command;

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

#[test]
fn bench_expiry_reports_no_early_action() {
    let dir = target_dir()
        .join("cubicle-bench-expiry-smoke")
        .join(format!("run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the run directory");
    let args = ["--sessions", "10", "--limit", "15s", "--spread", "2s"];
    let out = Command::new(env!("CARGO_BIN_EXE_cubicle"))
        .arg("bench-expiry")
        .args(args)
        .arg("--dir")
        .arg(dir.join("work"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run cubicle bench-expiry");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cubicle bench-expiry failed; logs in {}\n{stdout}\n{stderr}",
        dir.display()
    );
    assert!(stdout.contains("Expiry lateness"), "{stdout}");
    assert!(stdout.contains("action start p50 / p99 / max"), "{stdout}");
    assert!(stdout.contains("request sent p50 / p99 / max"), "{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("| 10 of 10 |"))
        .unwrap_or_else(|| panic!("no row with all 10 sessions armed:\n{stdout}\n{stderr}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    // | armed | instants | limit | start | sent | landed | early | runs |
    assert_eq!(cells[7], "0", "early actions: {row}");
    assert_eq!(cells[8], "1", "runs: {row}");
    assert!(
        stderr.contains("armed 10/10") && stderr.contains("early 0"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
