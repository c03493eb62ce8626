//! The quickstart: install the CRDs, apply the example configuration repository, run the real
//! operator binary, and print every session's phase as it changes.
//!
//! `cubicle dev up --demo` does this on a fresh local control plane; `cubicle dev demo` does it
//! against the cluster of a kubeconfig (the end-to-end tests run it against theirs).
//!
//! The examples are read the way `kubectl apply -k` reads them, for the kustomize features the
//! examples use (`resources` and `namespace`); any other kustomize feature is refused rather
//! than silently applied differently. Every document is server-side applied, Namespaces first.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DynamicObject, Patch, PatchParams, ValidationDirective};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiCapabilities, ApiResource, Scope, pinned_kind};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::Value;
use tokio::process::{Child, ChildStdin, Command};

use crate::crd::v1alpha1::Session;

/// Field manager of everything the demo applies.
pub const MANAGER: &str = "cubicle-dev";

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A file of the configuration repository is unusable.
    #[error("{file}: {message}")]
    Config {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A Kubernetes API call failed.
    #[error("failed to {what}")]
    Kube {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// A local I/O step failed.
    #[error("failed to {what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The operator process failed.
    #[error("{0}")]
    Operator(String),
    /// Something did not happen in time.
    #[error("timed out: {0}")]
    Timeout(String),
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> DemoError {
    let what = what.into();
    move |source| DemoError::Kube { what, source }
}

/// Server-side applies every CRD of [`crate::crd::all`] and waits until each is Established.
/// Returns how many there are.
pub async fn install_crds(client: &Client) -> Result<usize, DemoError> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let ssa = PatchParams::apply(MANAGER).force();
    let crds = crate::crd::all();
    for crd in &crds {
        let name = crd.name_any();
        api.patch(&name, &ssa, &Patch::Apply(crd))
            .await
            .map_err(kube_err(format!("apply CRD {name}")))?;
    }
    for crd in &crds {
        let name = crd.name_any();
        tokio::time::timeout(
            Duration::from_secs(60),
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .map_err(|_| DemoError::Timeout(format!("CRD {name} to be Established")))?
        .map_err(|e| DemoError::Operator(format!("watching CRD {name}: {e}")))?;
    }
    Ok(crds.len())
}

const SUPPORTED_KUSTOMIZE_KEYS: &[&str] = &["apiVersion", "kind", "namespace", "resources"];

/// Every document of the kustomize tree at `dir` (which holds a `kustomization.yaml`), in
/// `resources` order; a kustomization's `namespace` is set on each of its documents except
/// Namespaces (cluster-scoped kinds lose it again when applied).
pub fn kustomize(dir: &Path) -> Result<Vec<Value>, DemoError> {
    let kfile = ["kustomization.yaml", "kustomization.yml", "Kustomization"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| DemoError::Config {
            file: dir.to_path_buf(),
            message: "no kustomization.yaml".into(),
        })?;
    let config = |message: String| DemoError::Config {
        file: kfile.clone(),
        message,
    };
    let text = std::fs::read_to_string(&kfile).map_err(|e| config(e.to_string()))?;
    let k: Value = serde_yaml::from_str(&text).map_err(|e| config(e.to_string()))?;
    let keys = k
        .as_object()
        .ok_or_else(|| config("not a mapping".into()))?;
    if let Some(other) = keys
        .keys()
        .find(|key| !SUPPORTED_KUSTOMIZE_KEYS.contains(&key.as_str()))
    {
        return Err(config(format!(
            "kustomize `{other}` is not supported by the demo (use `kubectl apply -k`)"
        )));
    }
    let namespace = k["namespace"].as_str();
    let mut docs = Vec::new();
    for r in k["resources"].as_array().into_iter().flatten() {
        let r = r
            .as_str()
            .ok_or_else(|| config("resources must be paths".into()))?;
        let path = dir.join(r);
        let mut found = if path.is_dir() {
            kustomize(&path)?
        } else {
            read_documents(&path)?
        };
        if let Some(ns) = namespace {
            for d in &mut found {
                if d["kind"] != "Namespace" {
                    d["metadata"]["namespace"] = Value::String(ns.to_string());
                }
            }
        }
        docs.extend(found);
    }
    Ok(docs)
}

fn read_documents(path: &Path) -> Result<Vec<Value>, DemoError> {
    let config = |message: String| DemoError::Config {
        file: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| config(e.to_string()))?;
    let mut docs = Vec::new();
    for d in serde_yaml::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(d).map_err(|e| config(e.to_string()))?;
        if v.is_null() {
            continue;
        }
        if !v["kind"].is_string() || !v["metadata"]["name"].is_string() {
            return Err(config("a document without kind or metadata.name".into()));
        }
        docs.push(v);
    }
    Ok(docs)
}

/// What [`apply_documents`] did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Objects applied.
    pub objects: usize,
    /// The namespaces the namespaced objects went to.
    pub namespaces: BTreeSet<String>,
    /// Objects by kind.
    pub kinds: BTreeMap<String, usize>,
}

fn gvk_of(doc: &Value) -> GroupVersionKind {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, doc["kind"].as_str().unwrap_or_default())
}

/// Finds the resource of `gvk`, retrying for a while: discovery lags a CRD's establishment.
async fn discover(
    client: &Client,
    gvk: &GroupVersionKind,
) -> Result<(ApiResource, ApiCapabilities), DemoError> {
    let start = Instant::now();
    loop {
        match pinned_kind(client, gvk).await {
            Ok(found) => return Ok(found),
            Err(e) if start.elapsed() > Duration::from_secs(30) => {
                return Err(kube_err(format!(
                    "discover {}/{}",
                    gvk.api_version(),
                    gvk.kind
                ))(e));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Server-side applies `docs` (Namespaces first), with strict field validation. With
/// `namespace`, every namespaced object goes there and Namespace objects are renamed to it
/// (as a kustomize `namespace:` on top would).
pub async fn apply_documents(
    client: &Client,
    docs: &[Value],
    namespace: Option<&str>,
) -> Result<Applied, DemoError> {
    let mut ordered: Vec<Value> = docs.to_vec();
    ordered.sort_by_key(|d| d["kind"] != "Namespace");
    let mut pp = PatchParams::apply(MANAGER).force();
    pp.field_validation = Some(ValidationDirective::Strict);
    let mut found: HashMap<GroupVersionKind, (ApiResource, ApiCapabilities)> = HashMap::new();
    let mut applied = Applied::default();
    for mut doc in ordered {
        let gvk = gvk_of(&doc);
        if !found.contains_key(&gvk) {
            let d = discover(client, &gvk).await?;
            found.insert(gvk.clone(), d);
        }
        let (ar, caps) = &found[&gvk];
        if let Some(ns) = namespace
            && gvk.kind == "Namespace"
        {
            doc["metadata"]["name"] = Value::String(ns.to_string());
        }
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Cluster => {
                if let Some(m) = doc["metadata"].as_object_mut() {
                    m.remove("namespace");
                }
                Api::all_with(client.clone(), ar)
            }
            Scope::Namespaced => {
                let ns = namespace
                    .or(doc["metadata"]["namespace"].as_str())
                    .unwrap_or("default")
                    .to_string();
                doc["metadata"]["namespace"] = Value::String(ns.clone());
                applied.namespaces.insert(ns.clone());
                Api::namespaced_with(client.clone(), &ns, ar)
            }
        };
        api.patch(&name, &pp, &Patch::Apply(&doc))
            .await
            .map_err(kube_err(format!("apply {} {name}", gvk.kind)))?;
        applied.objects += 1;
        *applied.kinds.entry(gvk.kind.clone()).or_default() += 1;
    }
    Ok(applied)
}

/// Names of the PriorityClasses and RuntimeClasses `docs` refer to (`priorityClassName`,
/// `runtimeClassName` at any depth, as in a run config).
pub fn referenced_classes(docs: &[Value]) -> (BTreeSet<String>, BTreeSet<String>) {
    fn walk(v: &Value, priority: &mut BTreeSet<String>, runtime: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v.as_str()) {
                        ("priorityClassName", Some(n)) => {
                            priority.insert(n.to_string());
                        }
                        ("runtimeClassName", Some(n)) => {
                            runtime.insert(n.to_string());
                        }
                        _ => walk(v, priority, runtime),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, priority, runtime)),
            _ => {}
        }
    }
    let (mut priority, mut runtime) = (BTreeSet::new(), BTreeSet::new());
    for d in docs {
        walk(d, &mut priority, &mut runtime);
    }
    (priority, runtime)
}

/// For a cluster with the fake kubelet only: creates the PriorityClasses and RuntimeClasses that
/// `docs` refer to and the cluster lacks, so that the pods that use them are admitted (a real
/// cluster has its own; a RuntimeClass handler here runs nothing). Returns what it created.
pub async fn stub_missing_classes(
    client: &Client,
    docs: &[Value],
) -> Result<Vec<String>, DemoError> {
    use k8s_openapi::api::node::v1::RuntimeClass;
    use k8s_openapi::api::scheduling::v1::PriorityClass;
    use kube::api::{ObjectMeta, PostParams};
    let meta = |name: &str| ObjectMeta {
        name: Some(name.to_string()),
        labels: Some(
            [(
                "app.kubernetes.io/managed-by".to_string(),
                MANAGER.to_string(),
            )]
            .into(),
        ),
        ..Default::default()
    };
    let (priority, runtime) = referenced_classes(docs);
    let mut created = Vec::new();
    let pcs: Api<PriorityClass> = Api::all(client.clone());
    for name in priority {
        let pc = PriorityClass {
            metadata: meta(&name),
            value: 1000,
            description: Some("Created by the Cubicle demo: the examples refer to it.".into()),
            ..Default::default()
        };
        match pcs.create(&PostParams::default(), &pc).await {
            Ok(_) => created.push(format!("PriorityClass {name}")),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(kube_err(format!("create PriorityClass {name}"))(e)),
        }
    }
    let rcs: Api<RuntimeClass> = Api::all(client.clone());
    for name in runtime {
        let rc = RuntimeClass {
            metadata: meta(&name),
            handler: name.clone(),
            ..Default::default()
        };
        match rcs.create(&PostParams::default(), &rc).await {
            Ok(_) => created.push(format!("RuntimeClass {name}")),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(kube_err(format!("create RuntimeClass {name}"))(e)),
        }
    }
    Ok(created)
}

/// A `cubicle run` child process. It runs with `--exit-on-stdin-eof`, so it stops (gracefully)
/// when this process closes the pipe, and also when this process dies.
pub struct OperatorProcess {
    child: Child,
    // Held apart from `child`: tokio closes a child's stdin before waiting on it.
    stdin: Option<ChildStdin>,
    /// Its /metrics, /healthz and /readyz address.
    pub metrics_addr: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
}

/// A free local address (the port is free now; it is handed to a child right away).
pub fn free_local_addr() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

impl OperatorProcess {
    /// Starts `exe run` with `KUBECONFIG=kubeconfig`, watching `namespaces`, logging to `log`.
    pub async fn spawn(
        exe: &Path,
        kubeconfig: &Path,
        namespaces: &[String],
        metrics_addr: SocketAddr,
        log: &Path,
    ) -> Result<Self, DemoError> {
        Self::spawn_command(
            exe,
            "run",
            kubeconfig,
            namespaces,
            metrics_addr,
            log,
            &[],
            &[],
        )
        .await
    }

    /// `cubicle <command>` with `args` and `env` added (the operator, or the gateway).
    #[allow(clippy::too_many_arguments)]
    pub async fn spawn_command(
        exe: &Path,
        command: &str,
        kubeconfig: &Path,
        namespaces: &[String],
        metrics_addr: SocketAddr,
        log: &Path,
        args: &[String],
        env: &[(String, String)],
    ) -> Result<Self, DemoError> {
        let io = |what: String| move |source| DemoError::Io { what, source };
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        }
        let file = std::fs::File::create(log).map_err(io(format!("create {}", log.display())))?;
        let file2 = file.try_clone().map_err(io("clone the log file".into()))?;
        let mut cmd = Command::new(exe);
        cmd.arg(command)
            .arg(format!("--metrics-addr={metrics_addr}"))
            .arg("--exit-on-stdin-eof")
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)));
        for ns in namespaces {
            cmd.arg(format!("--namespace={ns}"));
        }
        let mut child = cmd
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::piped())
            .stdout(file)
            .stderr(file2)
            .kill_on_drop(true)
            .spawn()
            .map_err(io(format!("start {}", exe.display())))?;
        let stdin = child.stdin.take();
        Ok(Self {
            child,
            stdin,
            metrics_addr,
            log: log.to_path_buf(),
        })
    }

    /// The child's process id.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits until `/readyz` answers 200 (every cache synced), or fails if the process exits.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<Duration, DemoError> {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = crate::http::probe(self.metrics_addr, "/readyz").await {
                return Ok(start.elapsed());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(DemoError::Operator(format!(
                    "the operator exited with {status}; see {}",
                    self.log.display()
                )));
            }
            if start.elapsed() > timeout {
                return Err(DemoError::Timeout(format!(
                    "the operator's /readyz after {timeout:?}; see {}",
                    self.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Resolves when the process exits on its own.
    pub async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Asks the operator to stop (closes its stdin) and waits up to 10 s, then kills it.
    pub async fn stop(mut self) -> Option<ExitStatus> {
        drop(self.stdin.take());
        match tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                let _ = self.child.kill().await;
                None
            }
        }
    }
}

/// The columns printed for a session (without the time): `namespace/name phase node expiresAt
/// rule note`, `-` where unset. The note is the reason of each condition that is not True
/// (`Admitted`, `Ready`, `StateChange`...): why a session is refused, pending, or not in the state
/// its spec asks for.
pub fn session_columns(s: &Session) -> [String; 6] {
    let status = s.status.as_ref();
    let text = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let enum_text = |v: Option<Value>| {
        v.and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| "-".into())
    };
    let notes: Vec<&str> = status
        .into_iter()
        .flat_map(|st| st.conditions.iter())
        .filter(|c| c.status != "True")
        .map(|c| c.reason.as_str())
        .collect();
    [
        format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()),
        enum_text(
            status
                .and_then(|st| st.phase)
                .and_then(|p| serde_json::to_value(p).ok()),
        ),
        text(status.and_then(|st| st.node.clone())),
        text(status.and_then(|st| st.expires_at.as_ref().map(|t| t.0.to_string()))),
        enum_text(
            status
                .and_then(|st| st.expiry_rule)
                .and_then(|r| serde_json::to_value(r).ok()),
        ),
        if notes.is_empty() {
            String::new()
        } else {
            notes.join(",")
        },
    ]
}

/// The header of the session lines.
pub const SESSION_HEADER: [&str; 6] = ["SESSION", "PHASE", "NODE", "EXPIRES-AT", "RULE", "NOTE"];

/// One line: the local time, then the columns, aligned.
pub fn format_line(time: &str, cols: &[impl AsRef<str>]) -> String {
    let widths = [36, 9, 12, 28, 17, 0];
    let mut line = format!("{time:<9}");
    for (c, w) in cols.iter().zip(widths) {
        line.push_str(&format!(" {:<w$}", c.as_ref()));
    }
    line.trim_end().to_string()
}

/// Watches the sessions of `namespaces` and calls `print` with a line each time a session's
/// columns change (and once when it is deleted). Returns only if every watch ends.
pub async fn watch_sessions(
    client: &Client,
    namespaces: &BTreeSet<String>,
    mut print: impl FnMut(String),
) {
    let streams = namespaces.iter().map(|ns| {
        let api: Api<Session> = Api::namespaced(client.clone(), ns);
        watcher(api, watcher::Config::default()).boxed()
    });
    let mut events = futures::stream::select_all(streams);
    let mut last: HashMap<String, [String; 6]> = HashMap::new();
    let now = || jiff::Zoned::now().strftime("%H:%M:%S").to_string();
    loop {
        match events.try_next().await {
            Ok(Some(watcher::Event::Apply(s) | watcher::Event::InitApply(s))) => {
                let cols = session_columns(&s);
                if last.get(&cols[0]) != Some(&cols) {
                    print(format_line(&now(), &cols));
                    last.insert(cols[0].clone(), cols);
                }
            }
            Ok(Some(watcher::Event::Delete(s))) => {
                let key = format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any());
                if last.remove(&key).is_some() {
                    print(format_line(&now(), &[key.as_str(), "deleted"]));
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => return,
            // The watcher retries on its own; a transient error is not worth a line.
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// What [`run`] needs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The cluster's kubeconfig (also handed to the operator).
    pub kubeconfig: PathBuf,
    /// The kustomize tree to apply.
    pub examples: PathBuf,
    /// Put every namespaced object there instead (for tests).
    pub namespace: Option<String>,
    /// Where `operator.log` goes.
    pub log_dir: PathBuf,
    /// The operator's /metrics address (port 0: a free port).
    pub metrics_addr: SocketAddr,
    /// The `cubicle` binary to run as the operator.
    pub operator_exe: PathBuf,
    /// Create the PriorityClasses and RuntimeClasses the examples refer to and the cluster
    /// lacks (only for a cluster whose nodes are the fake kubelet).
    pub stub_classes: bool,
    /// Also run the local OpenID Provider and the gateway on `*.cubicle.localhost:<port>`.
    pub gateway_port: Option<u16>,
    /// The OpenID Provider the API server trusts (`cubicle dev up` started it): the gateway
    /// signs people in there. None: the demo starts a provider of its own.
    pub issuer: Option<super::oidc::IssuerRecord>,
}

/// Installs the CRDs, applies the examples, starts the operator on their namespaces and prints
/// session changes on stdout until `shutdown` resolves (then stops the operator), or fails if
/// the operator exits on its own.
pub async fn run(
    client: &Client,
    opts: &DemoOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DemoError> {
    let start = Instant::now();
    let n = install_crds(client).await?;
    println!(
        "installed {n} Cubicle CRDs (server-side apply), Established in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    let docs = kustomize(&opts.examples)?;
    if opts.stub_classes {
        let created = stub_missing_classes(client, &docs).await?;
        if !created.is_empty() {
            println!(
                "created what the examples refer to and this cluster lacks: {}",
                created.join(", ")
            );
        }
    }
    let applied = apply_documents(client, &docs, opts.namespace.as_deref()).await?;
    let kinds: Vec<String> = applied
        .kinds
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    println!(
        "applied {} objects from {} into namespace {}: {}",
        applied.objects,
        opts.examples.display(),
        applied
            .namespaces
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
        kinds.join(", ")
    );
    let mut addr = opts.metrics_addr;
    if addr.port() == 0 {
        addr = free_local_addr().map_err(|source| DemoError::Io {
            what: "find a free port".into(),
            source,
        })?;
    }
    let namespaces: Vec<String> = applied.namespaces.iter().cloned().collect();
    let log = opts.log_dir.join("operator.log");
    let public = opts
        .gateway_port
        .map(|p| format!("http://cubicle.localhost:{p}"));
    let key_ns = namespaces
        .first()
        .cloned()
        .unwrap_or_else(|| "default".into());
    let mut operator_args = Vec::new();
    let mut operator_env = Vec::new();
    if let Some(public) = &public {
        operator_args.extend([
            "--session-credentials".to_string(),
            format!("--public-url={public}"),
        ]);
        operator_env.push(("POD_NAMESPACE".to_string(), key_ns.clone()));
    }
    let mut operator = OperatorProcess::spawn_command(
        &opts.operator_exe,
        "run",
        &opts.kubeconfig,
        &namespaces,
        addr,
        &log,
        &operator_args,
        &operator_env,
    )
    .await?;
    let took = operator.wait_ready(Duration::from_secs(60)).await?;
    println!(
        "operator `cubicle run` (pid {}) ready in {:.1}s: http://{addr}/metrics; logs {}",
        operator.id().unwrap_or_default(),
        took.as_secs_f64(),
        log.display()
    );
    // The way in: a local OpenID Provider with the examples' people, and the gateway.
    let mut _gateway = None;
    let mut _issuer = None;
    if let (Some(port), Some(public)) = (opts.gateway_port, &public) {
        let (gw, issuer) = start_gateway(client, opts, &namespaces, &key_ns, port, public).await?;
        _gateway = Some(gw);
        _issuer = issuer;
    }
    println!("watching sessions (Ctrl-C stops everything)");
    println!("{}", format_line("TIME", &SESSION_HEADER));
    let watch = watch_sessions(client, &applied.namespaces, |line| println!("{line}"));
    let result = tokio::select! {
        _ = shutdown => Ok(()),
        status = operator.exited() => Err(DemoError::Operator(format!(
            "the operator exited ({}); see {}",
            status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
            log.display()
        ))),
        _ = watch => Err(DemoError::Operator("the session watch ended".into())),
    };
    if result.is_ok() {
        eprintln!("stopping the operator");
        match operator.stop().await {
            Some(s) if s.success() => {}
            Some(s) => eprintln!("the operator exited with {s}; see {}", log.display()),
            None => eprintln!("the operator did not stop in 10 s and was killed"),
        }
    }
    result
}

/// Signs people in at the OpenID Provider `cubicle dev up` started ([`DemoOptions::issuer`]:
/// every demo person of [`super::people::PEOPLE`] by identity, with their groups) or else at one
/// of its own (one person per User with an identity: the identity as login name and `sub`, in
/// the people's group [`super::people::PEOPLE_GROUP`]), printing the passwords; runs `cubicle
/// gateway` on `public` as a ServiceAccount of its own with the chart's rules (read what it
/// serves, the master key by name) and its impersonation grant limited to the provider's people
/// and their groups (the dashboard acts as the person, by the API server's own names: no
/// prefixes). The operator grants each identity `use` on its User (the per-User Role) and dev up
/// binds the end-user role to the people's group and `use` on every User to the admins' group,
/// so the dashboard shows and does exactly what the person's own kubectl may.
async fn start_gateway(
    client: &Client,
    opts: &DemoOptions,
    namespaces: &[String],
    key_ns: &str,
    port: u16,
    public: &str,
) -> Result<(OperatorProcess, Option<super::oidc::Issuer>), DemoError> {
    use kube::api::ListParams;
    let kube_err = |what: &str| {
        let what = what.to_string();
        move |e: kube::Error| DemoError::Operator(format!("{what}: {e}"))
    };
    let mut identities: Vec<String> = Vec::new();
    for ns in namespaces {
        let users: Api<crate::crd::v1alpha1::User> = Api::namespaced(client.clone(), ns);
        for u in users
            .list(&ListParams::default())
            .await
            .map_err(kube_err("list Users"))?
        {
            if let Some(id) = u.spec.identity.as_ref() {
                identities.push(id.username.clone());
            }
        }
    }
    identities.sort();
    identities.dedup();
    // The provider `cubicle dev up` started (the API server trusts it; its people are all the
    // demo people by identity), else one of the demo's own for the Users' identities.
    let (issuer, own) = match &opts.issuer {
        Some(record) => (record.clone(), None),
        None => {
            let group = super::people::PEOPLE_GROUP;
            let people: Vec<(&str, &[&str])> = identities
                .iter()
                .map(|i| (i.as_str(), std::slice::from_ref(&group)))
                .collect();
            let own = super::oidc::start_with_groups(
                &opts.log_dir.join("oidc"),
                &people,
                &[format!("{public}/.cubicle/callback")],
            )
            .await
            .map_err(|e| DemoError::Operator(format!("the OpenID Provider: {e}")))?;
            (own.record(), Some(own))
        }
    };
    // The gateway may impersonate exactly whom this provider signs in (a person without a User
    // gets the dashboard's "no user" page, not an impersonation error) and the groups their
    // ID tokens carry.
    let (users, groups) = impersonated(&issuer.people);
    let kubeconfig = gateway_identity(client, opts, key_ns, &users, &groups).await?;
    let addr = free_local_addr().map_err(|source| DemoError::Io {
        what: "find a free port".into(),
        source,
    })?;
    let log = opts.log_dir.join("gateway.log");
    let mut gw = OperatorProcess::spawn_command(
        &opts.operator_exe,
        "gateway",
        &kubeconfig,
        namespaces,
        addr,
        &log,
        &[
            format!("--public-url={public}"),
            format!("--listen=127.0.0.1:{port}"),
            // The identities are the API server's own names (static tokens, no prefix).
            "--username-prefix=".to_string(),
            "--groups-prefix=".to_string(),
            format!("--oidc-issuer={}", issuer.url),
            format!("--oidc-client-id={}", issuer.client_id),
            format!("--oidc-ca-file={}", issuer.ca_file.display()),
            format!(
                "--key-secret={key_ns}/{}",
                crate::credentials::DEFAULT_KEY_SECRET
            ),
        ],
        &[(
            "CUBICLE_OIDC_CLIENT_SECRET".to_string(),
            issuer.client_secret.clone(),
        )],
    )
    .await?;
    gw.wait_ready(Duration::from_secs(60)).await?;
    println!(
        "gateway `cubicle gateway` (pid {}): {public} (sessions on <uid>.cubicle.localhost:{port}, \
         each session's status.url); OpenID Provider {}; logs {}",
        gw.id().unwrap_or_default(),
        issuer.url,
        log.display()
    );
    if own.is_none() {
        println!(
            "  the API server trusts this provider too: its ID tokens act as oidc:<name> with \
             groups oidc:<group> (kubectl --token)"
        );
    }
    for p in &issuer.people {
        println!("  sign in as {} with password {}", p.name, p.password);
    }
    Ok((gw, own))
}

/// The demo gateway's ServiceAccount in `key_ns`.
pub const GATEWAY_ACCOUNT: &str = "cubicle-demo-gateway";

/// Whom the demo gateway may impersonate for the provider's `people`: their names (the `sub` of
/// their ID tokens) and every group their tokens carry, each sorted once (pure).
pub fn impersonated(people: &[super::oidc::Person]) -> (Vec<String>, Vec<String>) {
    let users: BTreeSet<String> = people.iter().map(|p| p.name.clone()).collect();
    let groups: BTreeSet<String> = people.iter().flat_map(|p| p.groups.clone()).collect();
    (users.into_iter().collect(), groups.into_iter().collect())
}

/// The RBAC of the demo gateway: the chart's gateway rules (`templates/gateway-rbac.yaml`) and
/// its impersonation grant, limited to `identities` and `groups` (pure).
pub fn gateway_rbac(key_ns: &str, identities: &[String], groups: &[String]) -> Vec<Value> {
    let subject = serde_json::json!([{"kind": "ServiceAccount", "name": GATEWAY_ACCOUNT,
                                       "namespace": key_ns}]);
    let labels = serde_json::json!({"app.kubernetes.io/part-of": "cubicle"});
    let cluster = |name: &str, rules: Value| {
        [
            serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": name, "labels": labels}, "rules": rules}),
            serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding", "metadata": {"name": name, "labels": labels},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                            "name": name},
                "subjects": subject}),
        ]
    };
    let mut out = Vec::new();
    out.extend(cluster(
        GATEWAY_ACCOUNT,
        serde_json::json!([
            {"apiGroups": ["cubicle.dev"],
             "resources": ["sessions", "users", "groups", "workspaces", "userpreferences"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["cubicle.dev"], "resources": ["sessions"], "verbs": ["patch"]},
            {"apiGroups": ["cubicle.dev"], "resources": ["users"], "verbs": ["use"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"],
             "verbs": ["create"]},
            {"apiGroups": ["rbac.authorization.k8s.io"],
             "resources": ["roles", "rolebindings", "clusterroles", "clusterrolebindings"],
             "verbs": ["list", "watch"]},
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]},
        ]),
    ));
    out.extend(cluster(
        &format!("{GATEWAY_ACCOUNT}-impersonate"),
        serde_json::json!([
            {"apiGroups": [""], "resources": ["users"], "verbs": ["impersonate"],
             "resourceNames": identities},
            {"apiGroups": [""], "resources": ["groups"], "verbs": ["impersonate"],
             "resourceNames": groups},
        ]),
    ));
    let key = format!("{GATEWAY_ACCOUNT}-key");
    out.push(
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": key, "namespace": key_ns, "labels": labels},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                   "resourceNames": [crate::credentials::DEFAULT_KEY_SECRET]}]}),
    );
    out.push(
        serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding", "metadata": {"name": key, "namespace": key_ns, "labels": labels},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": key},
        "subjects": subject}),
    );
    out
}

/// Creates the demo gateway's ServiceAccount and RBAC ([`gateway_rbac`]) and writes a kubeconfig
/// with a token of that account (12 h) into the log folder; returns its path.
async fn gateway_identity(
    client: &Client,
    opts: &DemoOptions,
    key_ns: &str,
    identities: &[String],
    groups: &[String],
) -> Result<PathBuf, DemoError> {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use kube::api::PostParams;
    let err =
        |what: &'static str| move |e: kube::Error| DemoError::Operator(format!("{what}: {e}"));
    let ssa = PatchParams::apply("cubicle-demo").force();
    let sa: ServiceAccount = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": GATEWAY_ACCOUNT, "namespace": key_ns}}))
    .expect("static account");
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), key_ns);
    accounts
        .patch(GATEWAY_ACCOUNT, &ssa, &Patch::Apply(&sa))
        .await
        .map_err(err("the gateway's ServiceAccount"))?;
    for doc in gateway_rbac(key_ns, identities, groups) {
        let (ar, _) = discover(client, &gvk_of(&doc)).await?;
        let api = match doc["metadata"]["namespace"].as_str() {
            Some(ns) => Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ar),
            None => Api::all_with(client.clone(), &ar),
        };
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        api.patch(&name, &ssa, &Patch::Apply(&doc))
            .await
            .map_err(err("the gateway's RBAC"))?;
    }
    let tr: TokenRequest = serde_json::from_value(serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": 12 * 3600}}))
    .expect("static request");
    let token = accounts
        .create_token_request(GATEWAY_ACCOUNT, &PostParams::default(), &tr)
        .await
        .map_err(err("a token for the gateway"))?
        .status
        .map(|s| s.token)
        .unwrap_or_default();
    let admin = std::fs::read_to_string(&opts.kubeconfig).map_err(|source| DemoError::Io {
        what: format!("read {}", opts.kubeconfig.display()),
        source,
    })?;
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&admin)
        .map_err(|e| DemoError::Operator(format!("parse {}: {e}", opts.kubeconfig.display())))?;
    doc["users"][0]["user"] =
        serde_yaml::to_value(serde_json::json!({ "token": token })).expect("a token is YAML");
    let path = opts.log_dir.join("gateway.kubeconfig");
    write_private(&path, &serde_yaml::to_string(&doc).expect("YAML"))?;
    Ok(path)
}

fn write_private(path: &Path, text: &str) -> Result<(), DemoError> {
    super::write_private(path, text).map_err(|source| DemoError::Io {
        what: format!("write {}", path.display()),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_gateway_may_impersonate_whom_its_provider_signs_in_and_their_groups() {
        let person = |name: &str, groups: &[&str]| super::super::oidc::Person {
            name: name.into(),
            password: "p".into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        };
        // The dev-up provider's people: all of them, a person without a User (mallory) and an
        // admin (root) included.
        let people: Vec<_> = super::super::people::PEOPLE
            .iter()
            .map(|p| {
                let mut g = vec![super::super::people::PEOPLE_GROUP];
                g.extend(p.groups.iter().copied());
                person(p.username, &g)
            })
            .collect();
        let (users, groups) = impersonated(&people);
        assert_eq!(users.len(), super::super::people::PEOPLE.len(), "{users:?}");
        assert!(users.contains(&"mallory@northwind.example".to_string()));
        assert!(users.contains(&"root@northwind.example".to_string()));
        assert_eq!(groups, ["cubicle-admins", "cubicle-people"]);
        let rbac = gateway_rbac("northwind", &users, &groups);
        let grant = rbac
            .iter()
            .find(|o| o["metadata"]["name"] == "cubicle-demo-gateway-impersonate")
            .unwrap();
        assert_eq!(grant["rules"][0]["resourceNames"], serde_json::json!(users));
        assert_eq!(
            grant["rules"][1]["resourceNames"],
            serde_json::json!(groups)
        );
        // A provider of the demo's own: the Users' identities, the people's group only.
        let (users, groups) = impersonated(&[
            person("bob@x", &["cubicle-people"]),
            person("alice@x", &["cubicle-people"]),
        ]);
        assert_eq!(users, ["alice@x", "bob@x"]);
        assert_eq!(groups, ["cubicle-people"]);
    }

    fn examples() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
    }

    #[test]
    fn reads_the_examples_like_kustomize() {
        let docs = kustomize(&examples()).unwrap();
        assert!(docs.len() > 30, "{} documents", docs.len());
        assert_eq!(docs[0]["kind"], "Namespace");
        for d in &docs {
            if d["kind"] != "Namespace" {
                assert_eq!(d["metadata"]["namespace"], "northwind", "{}", d["metadata"]);
            }
        }
        let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        for k in [
            "User",
            "Group",
            "Workspace",
            "ServerPool",
            "Server",
            "Session",
        ] {
            assert!(kinds.contains(k), "{k} missing: {kinds:?}");
        }
    }

    #[test]
    fn refuses_kustomize_features_it_does_not_apply() {
        let dir = std::env::temp_dir().join(format!("cubicle-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("kustomization.yaml"),
            "resources: []\ncommonLabels: {a: b}\n",
        )
        .unwrap();
        let err = kustomize(&dir).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(err.contains("commonLabels"), "{err}");
    }

    #[test]
    fn finds_the_classes_the_examples_refer_to() {
        let (priority, runtime) = referenced_classes(&kustomize(&examples()).unwrap());
        assert!(priority.contains("northwind-interactive"), "{priority:?}");
        assert!(runtime.contains("gvisor"), "{runtime:?}");
    }

    #[test]
    fn session_columns_show_phase_node_deadline_and_rule() {
        let s: Session = serde_json::from_value(serde_json::json!({
            "apiVersion": "cubicle.dev/v1alpha1", "kind": "Session",
            "metadata": {"name": "a", "namespace": "ns"},
            "spec": {"user": "u", "workspace": "w"},
            "status": {"phase": "Running", "node": "fake-node-1",
                       "expiresAt": "2026-11-22T10:00:00Z", "expiryRule": "keepalive"}
        }))
        .unwrap();
        assert_eq!(
            session_columns(&s),
            [
                "ns/a",
                "Running",
                "fake-node-1",
                "2026-11-22T10:00:00Z",
                "keepalive",
                ""
            ]
        );
        let r: Session = serde_json::from_value(serde_json::json!({
            "apiVersion": "cubicle.dev/v1alpha1", "kind": "Session",
            "metadata": {"name": "b", "namespace": "ns"},
            "spec": {"user": "u", "workspace": "w"},
            "status": {"phase": "Refused", "conditions": [
                {"type": "Admitted", "status": "False", "reason": "UserDisabled", "message": "m",
                 "lastTransitionTime": "2026-11-22T10:00:00Z"},
                {"type": "Ready", "status": "True", "reason": "Running", "message": "",
                 "lastTransitionTime": "2026-11-22T10:00:00Z"}]}
        }))
        .unwrap();
        let cols = session_columns(&r);
        assert_eq!((cols[1].as_str(), cols[2].as_str()), ("Refused", "-"));
        assert_eq!(cols[5], "UserDisabled");
        let line = format_line("10:00:00", &cols);
        assert_eq!(
            line.split_whitespace().collect::<Vec<_>>(),
            ["10:00:00", "ns/b", "Refused", "-", "-", "-", "UserDisabled"],
            "{line}"
        );
        let header = format_line("TIME", &SESSION_HEADER);
        for (a, b) in [
            ("SESSION", "ns/b"),
            ("PHASE", "Refused"),
            ("NOTE", "UserDisabled"),
        ] {
            assert_eq!(
                header.find(a),
                line.find(b),
                "{a} aligned:\n{header}\n{line}"
            );
        }
    }
}
