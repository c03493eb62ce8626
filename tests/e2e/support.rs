//! The test harness: one local control plane per test run, shared by every test, and a fresh
//! namespace per test.
//!
//! The first test to ask starts `cubicle dev up` (the same command a newcomer runs) as a child
//! process with a piped stdin. The child lives as long as this test process: when the process
//! exits, for any reason, the pipe closes and the control plane shuts down. Set
//! `CUBICLE_TEST_KUBECONFIG` to run the tests against an environment that is already up.
//!
//! Component logs stay in `target/cubicle-e2e/run-<pid>/`; a failing test prints that path.

#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use cubicle::devenv::{DevReady, client_from_kubeconfig};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

struct Shared {
    ready: DevReady,
    dir: PathBuf,
    _child: Option<Mutex<Child>>,
}

static SHARED: OnceLock<Shared> = OnceLock::new();

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn start_shared() -> Shared {
    if let Some(kc) = std::env::var_os("CUBICLE_TEST_KUBECONFIG") {
        let kc = PathBuf::from(kc);
        return Shared {
            ready: DevReady {
                kubeconfig: kc.clone(),
                server: String::new(),
                log_dir: PathBuf::new(),
                control_plane_startup_ms: 0,
                startup_ms: 0,
                nodes: (0..3).map(|i| format!("fake-node-{i}")).collect(),
                zones: vec!["zone-a".into(), "zone-b".into(), "zone-c".into()],
                real_node: None,
                real_node_unavailable: None,
            },
            dir: kc.parent().map(Path::to_path_buf).unwrap_or_default(),
            _child: None,
        };
    }
    let root = target_dir().join("cubicle-e2e");
    // Directories of earlier runs whose process is gone are removed (a concurrent run's is
    // kept); those kept for a failed test stay.
    if let Ok(entries) = std::fs::read_dir(&root) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(pid) = name.strip_prefix("run-")
                && !Path::new("/proc").join(pid).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = root.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the test run directory");
    let log = std::fs::File::create(dir.join("dev-up.log")).expect("create dev-up.log");
    let child = Command::new(env!("CARGO_BIN_EXE_cubicle"))
        .args([
            "dev",
            "up",
            "--exit-on-stdin-eof",
            "--nodes",
            "3",
            "--zones",
            "3",
            // An OpenID Provider the API server trusts; the tests' own issuers share its CA.
            "--oidc",
            "--dir",
        ])
        .arg(&dir)
        .args(crate::DEV_UP_ARGS)
        .stdin(Stdio::piped())
        .stdout(log.try_clone().expect("clone log"))
        .stderr(log)
        .spawn()
        .expect("start `cubicle dev up`");
    let child = Mutex::new(child);
    let ready_file = dir.join("dev-ready");
    let started = Instant::now();
    // A cold machine also builds the control plane here (tests/controlplane/build.sh).
    let limit = Duration::from_secs(
        std::env::var("CUBICLE_TEST_STARTUP_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3600),
    );
    loop {
        if let Ok(text) = std::fs::read_to_string(&ready_file) {
            let ready: DevReady = serde_json::from_str(&text).expect("parse dev-ready");
            eprintln!(
                "[harness] local control plane ready: control plane {} ms, with nodes and storage {} ms; logs {}",
                ready.control_plane_startup_ms,
                ready.startup_ms,
                dir.display()
            );
            return Shared {
                ready,
                dir,
                _child: Some(child),
            };
        }
        if let Ok(Some(status)) = child.lock().expect("child lock").try_wait() {
            let log = std::fs::read_to_string(dir.join("dev-up.log")).unwrap_or_default();
            panic!("`cubicle dev up` exited with {status} before it was ready:\n{log}");
        }
        if started.elapsed() > limit {
            panic!(
                "`cubicle dev up` not ready after {limit:?}; see {}",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn shared() -> &'static Shared {
    SHARED.get_or_init(start_shared)
}

/// The shared environment's ready record.
pub fn env() -> &'static DevReady {
    &shared().ready
}

/// This run's directory (logs written here are kept for a failing test).
pub fn run_dir() -> &'static Path {
    &shared().dir
}

/// The admin kubeconfig path.
pub fn kubeconfig() -> &'static Path {
    &shared().ready.kubeconfig
}

/// A fresh admin client (each `#[tokio::test]` has its own runtime, so clients are not shared).
pub async fn client() -> Client {
    let kc = kubeconfig().to_path_buf();
    client_from_kubeconfig(&kc)
        .await
        .expect("client from the test kubeconfig")
}

/// A namespace of one test. On a failing test (a panic), it prints where the logs are.
pub struct TestNs {
    /// Admin client.
    pub client: Client,
    /// Namespace name.
    pub name: String,
    test: String,
}

impl TestNs {
    /// Creates a namespace `<prefix>-<random suffix>`.
    pub async fn new(prefix: &str) -> Self {
        let client = client().await;
        let suffix = format!("{:06x}", rand_u32() & 0xffffff);
        let name = format!("{}-{}", prefix, suffix);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create test namespace");
        Self {
            client,
            name,
            test: prefix.to_string(),
        }
    }

    /// A namespaced API in this test's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let s = shared();
            let keep = s
                .dir
                .parent()
                .unwrap_or(&s.dir)
                .join(format!("failed-{}", self.test));
            let _ = copy_dir(&s.dir, &keep);
            eprintln!(
                "[harness] test {} failed in namespace {}; component logs kept in {} (live: {})",
                self.test,
                self.name,
                keep.display(),
                s.ready.log_dir.display()
            );
        }
    }
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            if e.file_name() != "pki" {
                copy_dir(&e.path(), &dest)?;
            }
        } else if e.path().extension().is_some_and(|x| x == "log") {
            std::fs::copy(e.path(), dest)?;
        }
    }
    Ok(())
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish() as u32
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Writes a kubeconfig for the shared API server that authenticates with `token`.
pub fn kubeconfig_with_token(token: &str, path: &Path) {
    let admin = std::fs::read_to_string(kubeconfig()).expect("read kubeconfig");
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&admin).expect("parse kubeconfig");
    doc["users"][0]["user"] =
        serde_yaml::to_value(serde_json::json!({ "token": token })).expect("yaml");
    std::fs::write(path, serde_yaml::to_string(&doc).expect("yaml")).expect("write kubeconfig");
}

/// An OpenID Provider (tests/oidc, logs and state in `run_dir()/oidc-<namespace>`) knowing
/// `people` (name and groups), and a gateway for `ns` on 127.0.0.1:`port` (the port of
/// `public`) that signs people in with it: usernames as the token's `sub` and groups from its
/// `groups` claim, both prefixed `oidc:`. Returns once the gateway's caches have synced.
///
/// The one OIDC gateway setup of the tests: every field of the settings is here, so a field a
/// change adds is set once for all of them.
pub async fn oidc_gateway(
    ns: &TestNs,
    public: &cubicle::gateway::core::PublicUrl,
    key: &cubicle::credentials::MasterKey,
    port: u16,
    people: &[(&str, &[&str])],
) -> (cubicle::devenv::oidc::Issuer, cubicle::gateway::Gateway) {
    use cubicle::gateway::oidc::{Oidc, OidcSettings};
    use cubicle::gateway::{AuthMode, GatewayConfig};
    let dir = run_dir().join(format!("oidc-{}", ns.name));
    // https with the run's CA (`dev up --oidc` made it; made here if the environment lacks it),
    // which the gateway, the tests' HTTP clients and Chromium trust.
    cubicle::devenv::oidc::Tls::find_or_create(run_dir())
        .unwrap_or_else(|e| panic!("{}: the run's OpenID Provider CA: {e}", ns.name));
    let issuer = cubicle::devenv::oidc::start_with_groups(
        &dir,
        people,
        &[format!("{}/.cubicle/callback", public.portal())],
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{}: start the OpenID Provider in {}: {e}",
            ns.name,
            dir.display()
        )
    });
    let oidc = Oidc::new(OidcSettings {
        issuer: issuer.url.clone(),
        client_id: issuer.client_id.clone(),
        client_secret: issuer.client_secret.clone(),
        username_claim: "sub".into(),
        ca_file: Some(issuer.ca_file.clone()),
        groups_claim: Some("groups".into()),
    })
    .unwrap_or_else(|e| panic!("{}: OIDC settings of {}: {e}", ns.name, issuer.url));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap_or_else(|e| panic!("{}: bind the gateway to 127.0.0.1:{port}: {e}", ns.name));
    let gw = cubicle::gateway::start(
        ns.client.clone(),
        GatewayConfig {
            public: public.clone(),
            namespaces: vec![ns.name.clone()],
            auth: AuthMode::Oidc(std::sync::Arc::new(oidc)),
            username_prefix: "oidc:".into(),
            groups_prefix: "oidc:".into(),
            key: key.clone(),
        },
        listener,
    );
    // Generous: the caches list every kind of the namespace, on a loaded two-core machine.
    wait_for(
        "the gateway's caches synced",
        Duration::from_secs(120),
        || async { gw.ready().then_some(()) },
    )
    .await;
    (issuer, gw)
}
