//! `cubicle bench` at a small N, so that the harness cannot rot: it starts its own local control
//! plane, runs the operator as a child process, and must print every section of the table with
//! the launch cost at the floor (3 writes, then 2; none when steady or on a resync), at most
//! one User status write per launch, no uncached reads and no failed launch. Counts only:
//! timings depend on the machine.
//!
//! The launch floor is held on the writes that took effect: a create the API server refuses as
//! a duplicate (409, when a reconcile runs before the cache shows the pod it just created)
//! depends on timing, so it is reported by the table (`dup`, and its own target) rather than
//! made to fail this test at random.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn f(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} missing in {v:#}"))
}

fn all_writes(requests: &Value) -> f64 {
    f(requests, "/launchWrites") + f(requests, "/otherWrites") + f(requests, "/events")
}

#[test]
fn bench_quick_run_reports_the_floor() {
    let dir = target_dir()
        .join("cubicle-bench-smoke")
        .join(format!("run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the run directory");
    let json_path = dir.join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_cubicle"))
        .args(["bench", "--sessions", "10", "--quick", "--json-file"])
        .arg(&json_path)
        .arg("--dir")
        .arg(dir.join("work"))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run cubicle bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "cubicle bench failed; logs in {}\n{stdout}\n{stderr}",
        dir.display()
    );

    for row in [
        "API requests per launch",
        "first session of a user",
        "later session of the same user",
        "burst of 10, unlimited, per session",
        "resync (restart), 10 sessions",
        "Burst convergence",
        "20 qps, burst 40",
        "Controller memory",
        "idle (no sessions)",
        "forced relist",
        "Controller CPU",
        "per launch, burst of 10",
        "idle, 10 sessions Running, a full resync every 10h amortized",
        "Targets",
    ] {
        assert!(stdout.contains(row), "no {row:?} in the table:\n{stdout}");
    }

    let report: Value = serde_json::from_str(
        &std::fs::read_to_string(&json_path).expect("the JSON report was written"),
    )
    .expect("the JSON report parses");
    let launch = &report["launch"];
    let effective = |r: &str| {
        f(launch, &format!("/{r}/launchWrites")) - f(launch, &format!("/{r}/refusedCreates"))
    };
    assert_eq!(
        effective("first"),
        3.0,
        "a user's first session: profile claim, pod, status\n{stdout}"
    );
    assert_eq!(
        effective("later"),
        2.0,
        "a later session: pod, status\n{stdout}"
    );
    for r in ["first", "later"] {
        assert!(
            f(launch, &format!("/{r}/otherWrites")) <= 1.0,
            "{r} session: at most one User status write (activeSessions and lastSessionTime \
             change together)\n{stdout}"
        );
    }
    let quiet = launch["quiet"].as_array().expect("quiet periods");
    assert!(!quiet.is_empty(), "{stdout}");
    for q in quiet {
        assert_eq!(
            all_writes(&q["requests"]),
            0.0,
            "steady: no writes\n{stdout}"
        );
    }
    let resync = launch["resync"].as_array().expect("resyncs");
    assert_eq!(resync.len(), 1, "{stdout}");
    assert_eq!(f(&resync[0], "/sessions"), 10.0, "{stdout}");
    assert_eq!(
        all_writes(&resync[0]["requests"]),
        0.0,
        "a resync of steady sessions writes nothing\n{stdout}"
    );
    assert!(
        f(&resync[0], "/cpuMs") > 0.0,
        "the restarted operator's CPU is measured\n{stdout}"
    );

    let bursts = report["bursts"].as_array().expect("bursts");
    assert_eq!(bursts.len(), 2, "one burst per budget\n{stdout}");
    let mut gets = f(launch, "/first/gets") + f(launch, "/later/gets");
    gets += f(&resync[0], "/requests/gets");
    for b in bursts {
        assert_eq!(f(b, "/sessions"), 10.0);
        assert_eq!(f(b, "/failures"), 0.0, "{stdout}");
        assert_eq!(f(b, "/floorFailures"), 0.0, "{stdout}");
        assert!(f(b, "/floorS") > 0.0 && f(b, "/operatorS") > 0.0);
        gets += f(b, "/perLaunch/gets");
    }
    assert_eq!(gets, 0.0, "uncached reads\n{stdout}");

    let memory = report["memory"].as_array().expect("memory rows");
    assert!(
        memory.iter().all(|m| f(m, "/rssMb") > 0.0),
        "every memory row was read: {memory:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
