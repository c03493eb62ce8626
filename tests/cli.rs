//! `cubicle validate` and `cubicle plan` as a platform team runs them: over `examples/` (which
//! must stay clean) and over a tree of broken repositories, `tests/fixtures/repos/<case>/`, each
//! with an `expect.txt` saying what validate must report:
//!
//! ```text
//! # comment
//! exit: 1                  exit code of `cubicle validate .` run in the case directory
//! strict-exit: 1           (optional) exit code with --strict
//! diagnostics: 2           number of diagnostic lines printed
//! expect: file:line: Kind/name: field: severity: message prefix...   (one per expected line)
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cubicle(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cubicle"))
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "error")
        .output()
        .expect("run cubicle")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn examples_validate_clean() {
    let o = cubicle(&root(), &["validate", "examples"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    let lines: Vec<&str> = out.lines().collect();
    // The examples keep one deliberate priority tie (bob is in engineering and trading) and one
    // assignment kept on a pool without assignment; nothing else.
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with("examples/groups/trading.yaml:10: Group/trading: spec.priority: warning: priority 10 ties with Group/engineering"),
        "{out}"
    );
    assert!(
        lines[1].starts_with(
            "examples/servers/assignments.yaml:29: ServerAssignment/erin-spare: spec.servers[0]: info:"
        ),
        "{out}"
    );
    let err = stderr(&o);
    assert!(err.contains("0 errors, 1 warning, 1 info"), "{err}");
    assert!(
        err.contains("ignored 5 documents of other API groups"),
        "{err}"
    );
    // Warnings fail under --strict.
    let o = cubicle(&root(), &["validate", "--strict", "examples"]);
    assert_eq!(o.status.code(), Some(1));
}

fn user<'a>(plan: &'a Value, name: &str) -> &'a Value {
    plan["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == name)
        .unwrap_or_else(|| panic!("no user {name}"))
}

fn setting<'a>(u: &'a Value, name: &str) -> &'a Value {
    u["settings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no setting {name}"))
}

fn workspace<'a>(u: &'a Value, name: &str) -> &'a Value {
    u["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["workspace"] == name)
        .unwrap_or_else(|| panic!("no workspace {name}"))
}

fn servers(w: &Value) -> Vec<(String, bool, bool)> {
    w["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["server"].as_str().unwrap().to_string(),
                s["assigned"].as_bool().unwrap(),
                s["inEffect"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn examples_plan_json_shows_groups_provenance_servers_and_launches() {
    let o = cubicle(&root(), &["plan", "examples", "--output", "json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let plan: Value = serde_json::from_slice(&o.stdout).expect("plan JSON");
    assert_eq!(plan["schema"], "cubicle.dev/plan/v1");
    let names: Vec<&str> = plan["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "bob", "carol", "dave", "erin"]);
    assert_eq!(plan["summary"]["errors"], 0);
    assert_eq!(plan["summary"]["warnings"], 1);

    let alice = user(&plan, "alice");
    assert_eq!(alice["userId"], "6f1c2a9e-3b7d-5e8f-9a1b-2c3d4e5f6a7b");
    assert_eq!(
        alice["identity"],
        serde_json::json!({"username": "alice@northwind.example", "uid": "northwind-1001"})
    );
    let groups: Vec<(String, u64, String)> = alice["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["name"].as_str().unwrap().into(),
                g["priority"].as_u64().unwrap(),
                g["via"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        vec![
            ("engineering".into(), 10, "spec".into()),
            ("design".into(), 20, "spec".into()),
            ("all-users".into(), 100, "autoAddLocalUsers".into()),
        ]
    );
    let exp = setting(alice, "keepaliveExpiration");
    assert_eq!(exp["value"], "2h");
    assert_eq!(exp["source"]["group"], "engineering");
    assert_eq!(exp["source"]["priority"], 10);
    let interval = setting(alice, "keepaliveInterval");
    assert_eq!(interval["source"]["group"], "all-users");
    assert_eq!(setting(alice, "defaultImage")["value"], "cad");
    assert_eq!(setting(alice, "defaultImage")["source"]["user"], true);
    let vols = setting(alice, "volumeMappings");
    assert_eq!(
        vols["source"]["merged"],
        serde_json::json!(["engineering", "design", "all-users"])
    );
    assert_eq!(
        setting(alice, "sessionTimeLimit")["source"]["default"],
        true
    );
    // The desktop's /etc/motd loses to the all-users group's (Group over Workspace) at launch;
    // the user-level list shows the user's and groups' mappings with their sources.
    let files = setting(alice, "fileMappings")["value"].as_array().unwrap();
    assert_eq!(
        files[0]["destination"],
        "/etc/opt/chrome/policies/managed/bookmarks.json"
    );
    assert_eq!(files[0]["source"]["user"], true);
    let cad = workspace(alice, "cad");
    assert_eq!(cad["allowed"], true);
    assert_eq!(cad["pool"], "dedicated");
    assert_eq!(
        servers(cad),
        vec![("ws-01".into(), true, true), ("ws-02".into(), true, true)]
    );
    let assigned = alice["assignedServers"].as_array().unwrap();
    assert_eq!(assigned.len(), 2);

    // Bob: the engineering/trading tie goes to engineering (name order).
    let bob = user(&plan, "bob");
    assert_eq!(setting(bob, "maxKasmsPerUser")["value"], 5);
    assert_eq!(
        setting(bob, "keepaliveInterval")["source"]["group"],
        "trading"
    );
    assert!(
        bob["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["code"] == "PriorityTie")
    );

    // Carol (SAML, not auto-added): contractors' hard limit; the CAD team's shared workstation.
    let carol = user(&plan, "carol");
    assert_eq!(setting(carol, "sessionTimeLimit")["value"], "8h");
    assert_eq!(
        setting(carol, "sessionTimeLimit")["source"]["group"],
        "contractors"
    );
    assert_eq!(
        servers(workspace(carol, "cad")),
        vec![("ws-02".into(), true, true)]
    );

    // Dave: not in a group of the CAD workspace; the shared pool has no assignment.
    let dave = user(&plan, "dave");
    let cad = workspace(dave, "cad");
    assert_eq!(cad["allowed"], false);
    assert_eq!(cad["reason"], "NotInAllowedGroup");
    let terminal = workspace(dave, "terminal");
    assert_eq!(terminal["allowed"], true);
    assert_eq!(servers(terminal), vec![("ws-03".into(), false, false)]);

    // Erin is locked: refused everywhere, and her kept assignment is not in effect.
    let erin = user(&plan, "erin");
    for w in erin["workspaces"].as_array().unwrap() {
        assert_eq!(w["reason"], "UserDisabled", "{w}");
    }
    assert_eq!(erin["assignedServers"][0]["inEffect"], false);
}

#[test]
fn examples_plan_text_is_readable_and_filters_one_user() {
    let o = cubicle(&root(), &["plan", "examples", "--user", "bob.martin"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with("User northwind/bob (username bob.martin, realm ldap"),
        "{out}"
    );
    assert!(!out.contains("User northwind/alice"), "{out}");
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l == "  acted for by: bob.martin@northwind.example"),
        "the identity is the second line: {out}"
    );
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("maxKasmsPerUser")
                && l.contains("Group/engineering, priority 10")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains("cad")
                && l.contains("may launch, on pool dedicated: ws-02 (assigned)")),
        "{out}"
    );
    assert!(out.contains("1 user planned"), "{out}");
    let o = cubicle(&root(), &["plan", "examples", "--user", "erin"]);
    assert!(stdout(&o).contains("refused (UserDisabled)"));
    let o = cubicle(&root(), &["plan", "examples", "--user", "nobody"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("no User named nobody"));
}

#[test]
fn unreadable_paths_are_usage_errors() {
    let o = cubicle(&root(), &["validate", "does/not/exist"]);
    assert_eq!(o.status.code(), Some(2));
    let o = cubicle(&root(), &["plan", "does/not/exist"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn a_resync_shorter_than_a_minute_is_refused_before_connecting() {
    for bad in ["30s", "59s", "500ms", "soon"] {
        let o = cubicle(&root(), &["run", "--resync", bad]);
        assert_eq!(o.status.code(), Some(2), "--resync {bad}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("--resync"),
            "--resync {bad}: the error names the flag: {}",
            stderr(&o)
        );
    }
    let o = cubicle(&root(), &["run", "--help"]);
    assert!(stdout(&o).contains("--resync"), "{}", stdout(&o));
    assert!(stdout(&o).contains("[default: 10h]"), "{}", stdout(&o));
    assert_eq!(
        cubicle::controller::DEFAULT_RESYNC,
        std::time::Duration::from_secs(10 * 3600),
        "the flag's default is the library's"
    );
}

#[test]
fn lease_timings_that_would_let_two_leaders_overlap_are_refused_before_connecting() {
    // No kubeconfig is needed to get this answer: the check comes first.
    let o = cubicle(
        &root(),
        &["run", "--lease-duration", "10s", "--renew-deadline", "10s"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--renew-deadline (10 s) must be shorter than --lease-duration (10 s)"),
        "{}",
        stderr(&o)
    );
    let o = cubicle(
        &root(),
        &["run", "--renew-deadline", "5s", "--retry-period", "5s"],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--retry-period (5 s)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn version_names_the_git_commit() {
    let o = cubicle(&root(), &["--version"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = stdout(&o);
    // `cubicle 0.1.0 (commit abcdef123456)`, or `(commit unknown)` outside a git checkout.
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        line.starts_with(&format!("cubicle {version} (commit ")),
        "{line}"
    );
    let commit = line
        .trim()
        .trim_end_matches(')')
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_string();
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        Some(head) => assert_eq!(commit, head, "--version's commit is HEAD's"),
        None => assert_eq!(commit, "unknown"),
    }
}

struct Expect {
    exit: i32,
    strict_exit: Option<i32>,
    diagnostics: usize,
    lines: Vec<String>,
}

fn parse_expect(path: &Path) -> Expect {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut e = Expect {
        exit: -1,
        strict_exit: None,
        diagnostics: usize::MAX,
        lines: Vec::new(),
    };
    for l in text.lines() {
        let l = l.trim_end();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let (k, v) = l
            .split_once(": ")
            .unwrap_or_else(|| panic!("{}: bad line {l:?}", path.display()));
        match k {
            "exit" => e.exit = v.parse().unwrap(),
            "strict-exit" => e.strict_exit = Some(v.parse().unwrap()),
            "diagnostics" => e.diagnostics = v.parse().unwrap(),
            "expect" => e.lines.push(v.to_string()),
            other => panic!("{}: unknown key {other}", path.display()),
        }
    }
    assert!(e.exit >= 0, "{}: no exit", path.display());
    assert!(
        e.diagnostics != usize::MAX,
        "{}: no diagnostics",
        path.display()
    );
    assert!(!e.lines.is_empty(), "{}: no expect lines", path.display());
    e
}

#[test]
fn every_broken_repository_yields_its_expected_findings() {
    let base = root().join("tests/fixtures/repos");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&base)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "{cases:?}");
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let e = parse_expect(&case.join("expect.txt"));
        let o = cubicle(case, &["validate", "."]);
        let out = stdout(&o);
        let lines: Vec<&str> = out.lines().collect();
        if o.status.code() != Some(e.exit) {
            failures.push(format!(
                "{name}: exit {:?}, expected {}\n{out}",
                o.status.code(),
                e.exit
            ));
        }
        if lines.len() != e.diagnostics {
            failures.push(format!(
                "{name}: {} diagnostics, expected {}\n{out}",
                lines.len(),
                e.diagnostics
            ));
        }
        for want in &e.lines {
            if !lines.iter().any(|l| l.starts_with(want.as_str())) {
                failures.push(format!("{name}: missing {want:?} in\n{out}"));
            }
        }
        if let Some(strict) = e.strict_exit {
            let o = cubicle(case, &["validate", "--strict", "."]);
            if o.status.code() != Some(strict) {
                failures.push(format!(
                    "{name}: --strict exit {:?}, expected {strict}",
                    o.status.code()
                ));
            }
        }
        // plan reads the same repositories: it refuses what cannot be loaded, and otherwise
        // shows the findings without failing.
        let o = cubicle(case, &["plan", ".", "--output", "json"]);
        let loaded = !out.contains(": yaml: ") && !lines.iter().any(|l| is_load_problem(l));
        let want = if loaded { 0 } else { 1 };
        if o.status.code() != Some(want) {
            failures.push(format!(
                "{name}: plan exit {:?}, expected {want}",
                o.status.code()
            ));
        }
        if serde_json::from_slice::<Value>(&o.stdout).is_err() {
            failures.push(format!("{name}: plan did not print JSON"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Load problems (the document is refused) as opposed to findings about loaded objects.
fn is_load_problem(line: &str) -> bool {
    [
        "unknown field",
        "invalid type",
        "missing field",
        "is also defined at",
        "unknown kind",
        "unknown version",
        "not a Kubernetes object",
    ]
    .iter()
    .any(|p| line.contains(p))
}
