//! The Cubicle API on a real API server: the generated CRDs install, every example applies and
//! reads back unchanged, every invalid fixture is rejected with its message, immutable fields
//! stay immutable, and `kubectl` shows the field descriptions and printer columns.
//!
//! Other tests call [`install_crds`] before using Cubicle kinds.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cubicle::crd::v1alpha1::*;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, Patch, PatchParams, ValidationDirective};
use kube::core::GroupVersionKind;
use kube::discovery::pinned_kind;
use kube::runtime::wait::{await_condition, conditions};
use kube::{Api, Client};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use crate::support::{self, TestNs, wait_for};

const MANAGER: &str = "cubicle-e2e";
const LONG: Duration = Duration::from_secs(60);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

static INSTALLED: OnceCell<()> = OnceCell::const_new();

/// Installs (server-side applies) every CRD of `crds/` and waits until each is Established.
/// Idempotent and shared: the first caller in the test process does the work, later callers
/// wait for it.
pub async fn install_crds() {
    INSTALLED.get_or_init(install).await;
}

async fn install() {
    let client = support::client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    let ssa = PatchParams::apply(MANAGER).force();
    let mut names = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("crds"))
        .expect("read crds/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for file in files {
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&std::fs::read_to_string(&file).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(&name, &ssa, &Patch::Apply(&crd))
            .await
            .unwrap_or_else(|e| panic!("apply {}: {e}", file.display()));
        names.push(name);
    }
    for name in names {
        tokio::time::timeout(
            LONG,
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .unwrap_or_else(|_| panic!("CRD {name} not Established"))
        .unwrap();
    }
}

/// Every YAML document of the files under `dir` (recursively, sorted), with its file.
fn yaml_docs(dir: &Path) -> Vec<(PathBuf, Value)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, &mut files);
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for d in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(d).unwrap();
            if !v.is_null() {
                docs.push((f.clone(), v));
            }
        }
    }
    docs
}

fn gvk_of(doc: &Value) -> GroupVersionKind {
    let api_version = doc["apiVersion"].as_str().expect("apiVersion");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, doc["kind"].as_str().expect("kind"))
}

/// A dynamic API for the document's kind in `ns`, found by discovery.
async fn api_for(client: &Client, doc: &Value, ns: &str) -> Api<DynamicObject> {
    let (ar, _) = pinned_kind(client, &gvk_of(doc))
        .await
        .unwrap_or_else(|e| panic!("discover {}: {e}", doc["kind"]));
    Api::namespaced_with(client.clone(), ns, &ar)
}

fn strict_apply() -> PatchParams {
    let mut pp = PatchParams::apply(MANAGER);
    pp.field_validation = Some(ValidationDirective::Strict);
    pp
}

/// Server-side applies `doc` into `ns` (its namespace rewritten).
async fn apply(client: &Client, doc: &Value, ns: &str) -> Result<DynamicObject, kube::Error> {
    let mut doc = doc.clone();
    doc["metadata"]["namespace"] = json!(ns);
    let name = doc["metadata"]["name"].as_str().unwrap().to_string();
    api_for(client, &doc, ns)
        .await
        .patch(&name, &strict_apply(), &Patch::Apply(&doc))
        .await
}

/// Numbers compare by value (`40` and `40.0` are the same hours).
fn normalize(v: &Value) -> Value {
    match v {
        Value::Number(n) => json!(n.as_f64().unwrap()),
        Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
        Value::Object(m) => {
            Value::Object(m.iter().map(|(k, v)| (k.clone(), normalize(v))).collect())
        }
        other => other.clone(),
    }
}

fn typed_spec<K: DeserializeOwned + Serialize>(v: &Value) -> Value {
    let k: K = serde_json::from_value(v.clone())
        .unwrap_or_else(|e| panic!("{} {}: {e}", v["kind"], v["metadata"]["name"]));
    serde_json::to_value(k).unwrap()["spec"].clone()
}

/// The spec as the typed API sees it.
fn typed(kind: &str, v: &Value) -> Value {
    match kind {
        "User" => typed_spec::<User>(v),
        "Group" => typed_spec::<Group>(v),
        "Workspace" => typed_spec::<Workspace>(v),
        "ServerPool" => typed_spec::<ServerPool>(v),
        "Server" => typed_spec::<Server>(v),
        "ServerAssignment" => typed_spec::<ServerAssignment>(v),
        "Session" => typed_spec::<Session>(v),
        other => panic!("not a Cubicle kind: {other}"),
    }
}

#[tokio::test]
async fn crds_install_idempotently_and_are_established() {
    install_crds().await;
    // A second, independent install changes nothing and still succeeds.
    install().await;
    let client = support::client().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    for c in cubicle::crd::all() {
        let name = c.metadata.name.unwrap();
        let live = crds.get(&name).await.unwrap();
        let conds = live.status.and_then(|s| s.conditions).unwrap_or_default();
        for t in ["Established", "NamesAccepted"] {
            assert!(
                conds.iter().any(|c| c.type_ == t && c.status == "True"),
                "{name}: {t} is not True: {conds:?}"
            );
        }
        assert_eq!(live.spec.names.categories, Some(vec!["cubicle".into()]));
    }
}

#[tokio::test]
async fn every_example_applies_and_reads_back_unchanged() {
    install_crds().await;
    let ns = TestNs::new("api-examples").await;
    let docs: Vec<(PathBuf, Value)> = yaml_docs(&root().join("examples"))
        .into_iter()
        .filter(|(f, d)| {
            f.file_name().is_some_and(|n| n != "kustomization.yaml") && d["kind"] != "Namespace"
        })
        .collect();
    assert!(docs.len() > 30, "only {} example documents", docs.len());
    for (file, doc) in &docs {
        apply(&ns.client, doc, &ns.name).await.unwrap_or_else(|e| {
            panic!(
                "{}: {} {} rejected: {e}",
                file.display(),
                doc["kind"],
                doc["metadata"]["name"]
            )
        });
    }
    let mut cubicle_objects = 0;
    for (file, doc) in &docs {
        let kind = doc["kind"].as_str().unwrap();
        let name = doc["metadata"]["name"].as_str().unwrap();
        let api = api_for(&ns.client, doc, &ns.name).await;
        let live = serde_json::to_value(api.get(name).await.unwrap()).unwrap();
        let what = format!("{}: {kind} {name}", file.display());
        for field in ["labels", "annotations"] {
            if let Some(want) = doc["metadata"].get(field) {
                assert_eq!(&live["metadata"][field], want, "{what}: metadata.{field}");
            }
        }
        match kind {
            "ConfigMap" => assert_eq!(live["data"], doc["data"], "{what}: data"),
            "Secret" => {
                let keys = |m: &Value| {
                    m.as_object()
                        .map(|m| m.keys().cloned().collect::<Vec<_>>())
                        .unwrap_or_default()
                };
                assert_eq!(
                    keys(&live["data"]),
                    keys(&doc["stringData"]),
                    "{what}: keys"
                );
            }
            "PersistentVolumeClaim" => {
                assert_eq!(
                    live["spec"]["accessModes"], doc["spec"]["accessModes"],
                    "{what}"
                )
            }
            _ => {
                cubicle_objects += 1;
                // Byte for byte (numbers by value): nothing pruned, nothing defaulted.
                assert_eq!(
                    normalize(&live["spec"]),
                    normalize(&doc["spec"]),
                    "{what}: the spec read back differs from the one applied"
                );
                // And the typed API reads it back the same.
                assert_eq!(typed(kind, &live), typed(kind, doc), "{what}: typed spec");
            }
        }
    }
    assert!(
        cubicle_objects >= 20,
        "only {cubicle_objects} Cubicle objects"
    );
}

#[tokio::test]
async fn every_invalid_fixture_is_rejected_with_its_message() {
    install_crds().await;
    let ns = TestNs::new("api-invalid").await;
    let dir = root().join("tests/fixtures/invalid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: no `# expect:` line", file.display()))
            .trim();
        let doc: Value = serde_yaml::from_str(&text).unwrap();
        match apply(&ns.client, &doc, &ns.name).await {
            Ok(_) => failures.push(format!("{}: accepted", file.display())),
            Err(kube::Error::Api(status)) if status.message.contains(expect) => {}
            Err(e) => failures.push(format!(
                "{}: rejected, but without {expect:?}: {e}",
                file.display()
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    // The fixtures are each broken in one way only: with the broken part removed they would
    // apply, which a valid look-alike of each kind demonstrates.
    for doc in [
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "ServerPool",
               "metadata": {"name": "burst"},
               "spec": {"assignmentEnabled": false, "autoscale": {"nodeSelector": {"node-group": "burst"}}}}),
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Group",
               "metadata": {"name": "engineering"},
               "spec": {"priority": 0, "settings": {"keepaliveExpiration": "0", "maxKasmsPerUser": 0,
                   "usageLimit": {"type": "perUser", "interval": "total", "hours": 0}}}}),
    ] {
        apply(&ns.client, &doc, &ns.name)
            .await
            .unwrap_or_else(|e| panic!("valid {} rejected: {e}", doc["kind"]));
    }
}

/// A merge patch of `spec` that should be rejected with `expect`.
async fn assert_spec_patch_rejected<K>(api: &Api<K>, name: &str, patch: Value, expect: &str)
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => panic!("{patch} was accepted"),
        Err(kube::Error::Api(s)) => assert!(
            s.message.contains(expect),
            "{patch}: rejected without {expect:?}: {}",
            s.message
        ),
        Err(e) => panic!("{patch}: {e}"),
    }
}

async fn spec_patch<K>(api: &Api<K>, name: &str, patch: Value) -> K
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("{patch} rejected: {e}"))
}

#[tokio::test]
async fn a_sessions_user_and_workspace_cannot_change() {
    install_crds().await;
    let ns = TestNs::new("api-immutable-session").await;
    let sessions = ns.api::<Session>();
    let s = Session::new(
        "alice-desktop",
        SessionSpec {
            user: "alice".into(),
            workspace: "desktop".into(),
            persistent_profile: None,
            zone: None,
            state: None,
        },
    );
    sessions
        .patch("alice-desktop", &strict_apply(), &Patch::Apply(&s))
        .await
        .unwrap();
    assert_spec_patch_rejected(
        &sessions,
        "alice-desktop",
        json!({"spec": {"user": "bob"}}),
        "user is immutable",
    )
    .await;
    assert_spec_patch_rejected(
        &sessions,
        "alice-desktop",
        json!({"spec": {"workspace": "cad"}}),
        "workspace is immutable",
    )
    .await;
    // Other fields stay editable: that is how a client stops or pauses a session.
    let s = spec_patch(
        &sessions,
        "alice-desktop",
        json!({"spec": {"state": "Paused"}}),
    )
    .await;
    assert_eq!(s.spec.state, Some(DesiredState::Paused));
    assert_eq!(s.spec.user, "alice");
}

#[tokio::test]
async fn a_users_id_cannot_change_or_disappear_once_set() {
    install_crds().await;
    let ns = TestNs::new("api-immutable-user").await;
    let users = ns.api::<User>();
    let apply_user = |name: &'static str, user_id: Option<&'static str>| {
        let users = users.clone();
        async move {
            let u: User = serde_json::from_value(json!({
                "apiVersion": "cubicle.dev/v1alpha1", "kind": "User",
                "metadata": {"name": name},
                "spec": {"realm": "local", "userId": user_id}
            }))
            .unwrap();
            users
                .patch(name, &strict_apply(), &Patch::Apply(&u))
                .await
                .unwrap()
        }
    };
    apply_user("alice", Some("6f1c2a9e")).await;
    assert_spec_patch_rejected(
        &users,
        "alice",
        json!({"spec": {"userId": "0000aaaa"}}),
        "userId is immutable once set",
    )
    .await;
    assert_spec_patch_rejected(
        &users,
        "alice",
        json!({"spec": {"userId": null}}),
        "userId is immutable once set",
    )
    .await;
    // Other fields stay editable.
    let u = spec_patch(&users, "alice", json!({"spec": {"disabled": true}})).await;
    assert_eq!(u.spec.user_id.as_deref(), Some("6f1c2a9e"));

    // An unset id may be set once (for example to pin the derived one), then it is fixed.
    apply_user("bob", None).await;
    let u = spec_patch(&users, "bob", json!({"spec": {"userId": "b0b"}})).await;
    assert_eq!(u.spec.user_id.as_deref(), Some("b0b"));
    assert_spec_patch_rejected(
        &users,
        "bob",
        json!({"spec": {"userId": "b0b2"}}),
        "userId is immutable once set",
    )
    .await;
}

fn kubectl(args: &[&str]) -> String {
    let out = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(support::kubeconfig())
        .args(args)
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `kubectl explain` for a Cubicle path, retried while the API server publishes the CRD's
/// OpenAPI (it lags a CRD's establishment by a few seconds).
async fn explain(path: &str) -> String {
    wait_for(&format!("kubectl explain {path}"), LONG, || async {
        let out = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(support::kubeconfig())
            .args(["explain", path, "--api-version=cubicle.dev/v1alpha1"])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    })
    .await
}

/// Whitespace-insensitive containment (kubectl wraps descriptions).
fn contains_text(haystack: &str, needle: &str) -> bool {
    let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    squash(haystack).contains(&squash(needle))
}

#[tokio::test]
async fn kubectl_explains_fields_and_prints_columns() {
    install_crds().await;
    let ns = TestNs::new("api-kubectl").await;

    let settings = explain("groups.spec.settings").await;
    for text in [
        "keepaliveExpirationAction",
        "Kasm: `keepalive_expiration_action`",
        "What happens to an expired session",
        "allow2faSelfEnrollment",
        "Kasm: `max_kasms_per_user`",
    ] {
        assert!(
            contains_text(&settings, text),
            "no {text:?} in:\n{settings}"
        );
    }
    let session = explain("sessions.spec").await;
    for text in [
        "Name of the User the session is for. Immutable.",
        "Unset means `Running`",
    ] {
        assert!(contains_text(&session, text), "no {text:?} in:\n{session}");
    }
    let profile = explain("workspaces.spec.persistentProfile.claimTemplate.name").await;
    assert!(
        contains_text(&profile, "must contain `{username}` or `{user_id}`"),
        "{profile}"
    );

    // Printer columns, with a Session and a User to list (kubectl prints no header for none).
    for doc in yaml_docs(&root().join("examples/sessions"))
        .into_iter()
        .chain(yaml_docs(&root().join("examples/users")))
    {
        apply(&ns.client, &doc.1, &ns.name).await.unwrap();
    }
    let sessions = kubectl(&["get", "sessions.cubicle.dev", "-n", &ns.name]);
    let header: Vec<&str> = sessions
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "PHASE",
            "USER",
            "WORKSPACE",
            "EXPIRES",
            "NODE",
            "URL",
            "READY",
            "AGE"
        ],
        "{sessions}"
    );
    assert!(sessions.contains("alice-cad-7k2p"), "{sessions}");
    let wide = kubectl(&["get", "csess", "-n", &ns.name, "-o", "wide"]);
    assert!(wide.lines().next().unwrap().contains("RULE"), "{wide}");

    let users = kubectl(&["get", "users.cubicle.dev", "-n", &ns.name]);
    let header: Vec<&str> = users.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "USERNAME", "GROUPS", "SESSIONS", "DISABLED", "READY", "AGE"
        ],
        "{users}"
    );
    let wide = kubectl(&["get", "cusr", "-n", &ns.name, "-o", "wide"]);
    assert!(
        wide.lines().next().unwrap().contains("IDENTITY")
            && wide.contains("alice@northwind.example"),
        "{wide}"
    );
    let alice = users.lines().find(|l| l.starts_with("alice ")).unwrap();
    assert!(
        alice.contains("engineering") && alice.contains("design"),
        "{users}"
    );

    // The category lists every Cubicle kind present.
    let all = kubectl(&["get", "cubicle", "-n", &ns.name, "-o", "name"]);
    assert!(all.contains("session.cubicle.dev/alice-cad-7k2p"), "{all}");
    assert!(all.contains("user.cubicle.dev/erin"), "{all}");

    // The example repository is a valid kustomization.
    let built = kubectl(&["kustomize", root().join("examples").to_str().unwrap()]);
    let docs = serde_yaml::Deserializer::from_str(&built).count();
    let files = yaml_docs(&root().join("examples"))
        .into_iter()
        .filter(|(f, _)| f.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .count();
    assert_eq!(
        docs, files,
        "kustomize output has a different number of objects"
    );
}
