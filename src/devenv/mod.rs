//! The local development environment: the project's own Kubernetes control plane (real etcd,
//! kube-apiserver, kube-controller-manager and kube-scheduler, built from the upstream Go modules
//! in `tests/controlplane`), plus a fake kubelet and a fake storage provisioner so that pods run
//! and claims bind without a container runtime. With a real node ([`realnode`]), pods that ask
//! for it run in real containers beside the fake nodes.
//!
//! `cubicle dev up` and the test harness in `tests/` both use this module, so what a newcomer
//! tries is what CI tests.

pub mod controlplane;
pub mod demo;
pub mod kubelet;
pub mod oidc;
pub mod people;
pub mod provisioner;
pub mod realnode;
pub mod standin;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::{Deserialize, Serialize};

/// Writes `text` to `path`, readable by its owner only (mode 0600): kubeconfigs with tokens,
/// the demo's people and passwords.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(text.as_bytes())
}

/// Errors of the development environment.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// A local I/O step failed.
    #[error("failed to {what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Building the control plane binary failed.
    #[error("failed to build the control plane: {0}")]
    Build(String),
    /// The control plane did not come up.
    #[error("control plane failed to start: {0}")]
    Startup(String),
    /// A Kubernetes API call failed.
    #[error("failed to {what}")]
    Kube {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
    /// The kubeconfig could not be loaded.
    #[error("failed to load kubeconfig {path}: {message}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// The cause.
        message: String,
    },
}

/// Options for [`DevCluster::start`].
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Working directory (PKI, kubeconfig, logs).
    pub dir: PathBuf,
    /// Number of fake nodes.
    pub nodes: usize,
    /// Number of zones the nodes are spread over.
    pub zones: usize,
    /// How long to wait for the control plane.
    pub timeout: Duration,
    /// Start a real node too, importing these images (`operator`, `desktop`) beside the pause
    /// image. Where the host cannot run containers, the fake nodes carry on and
    /// [`DevReady::real_node_unavailable`] says what is missing.
    pub real_node: Option<Vec<String>>,
    /// Start a local OpenID Provider for the demo people ([`people::PEOPLE`], by identity
    /// (`username`, the same name as their static token's) as login name and `sub`, in groups
    /// [`people::PEOPLE_GROUP`] and their own) that the API server trusts, accepting
    /// these redirect URIs besides [`oidc::DEV_REDIRECT_URI`]; its record goes to
    /// `<dir>/oidc/issuer.json` ([`oidc::IssuerRecord`]).
    pub oidc: Option<Vec<String>>,
}

/// What `cubicle dev up` writes to `<dir>/dev-ready` once nodes and storage are in place.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DevReady {
    /// Admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// API server URL.
    pub server: String,
    /// Component logs.
    pub log_dir: PathBuf,
    /// Control plane start to ready, ms.
    pub control_plane_startup_ms: u64,
    /// Whole environment start to ready, ms.
    pub startup_ms: u64,
    /// Fake node names.
    pub nodes: Vec<String>,
    /// Zones in use.
    pub zones: Vec<String>,
    /// The real node, when one was asked for and started.
    #[serde(default)]
    pub real_node: Option<realnode::NodeReady>,
    /// Why a real node was asked for but not started (what the host lacks).
    #[serde(default)]
    pub real_node_unavailable: Option<String>,
}

/// A running development cluster.
pub struct DevCluster {
    plane: controlplane::ControlPlane,
    _kubelet: kubelet::FakeKubelet,
    _provisioner: provisioner::Provisioner,
    real_node: Option<realnode::RealNode>,
    /// The OpenID Provider the API server trusts (with `oidc`).
    pub issuer: Option<oidc::Issuer>,
    /// Admin client.
    pub client: Client,
    /// The ready record.
    pub ready: DevReady,
}

/// Builds a client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client, DevError> {
    let err = |message: String| DevError::Kubeconfig {
        path: path.to_path_buf(),
        message,
    };
    let kc = Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .map_err(|e| err(e.to_string()))?;
    Client::try_from(config).map_err(|e| err(e.to_string()))
}

/// Starts the OpenID Provider the API server will trust (TLS material in `dir/oidc-tls`, so the
/// tests' own issuers in the same directory share its CA) and writes its record and the API
/// server's authentication configuration; returns the issuer and that file.
async fn start_trusted_issuer(
    dir: &Path,
    redirects: &[String],
) -> Result<(oidc::Issuer, PathBuf), DevError> {
    let io = |what: String| move |source| DevError::Io { what, source };
    oidc::Tls::create(dir)?;
    let groups: Vec<Vec<&str>> = people::PEOPLE
        .iter()
        .map(|p| {
            let mut g = vec![people::PEOPLE_GROUP];
            g.extend(p.groups.iter().copied());
            g
        })
        .collect();
    let who: Vec<(&str, &[&str])> = people::PEOPLE
        .iter()
        .zip(&groups)
        .map(|(p, g)| (p.username, g.as_slice()))
        .collect();
    let mut uris = redirects.to_vec();
    uris.push(oidc::DEV_REDIRECT_URI.to_string());
    let issuer = oidc::start_with_groups(&dir.join("oidc"), &who, &uris).await?;
    let ca = std::fs::read_to_string(&issuer.ca_file)
        .map_err(io(format!("read {}", issuer.ca_file.display())))?;
    let file = dir.join("authentication-config.yaml");
    std::fs::write(
        &file,
        oidc::authentication_config(&[(&issuer.url, &issuer.client_id, &ca)]),
    )
    .map_err(io(format!("write {}", file.display())))?;
    let record = oidc::IssuerRecord::path(dir);
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let _ = std::fs::remove_file(&record);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&record)
            .and_then(|mut f| {
                f.write_all(&serde_json::to_vec_pretty(&issuer.record()).expect("json"))
            })
            .map_err(io(format!("write {}", record.display())))?;
    }
    Ok((issuer, file))
}

impl DevCluster {
    /// Builds (if needed) and starts the control plane, then registers fake nodes and storage.
    pub async fn start(opts: &DevOptions) -> Result<Self, DevError> {
        let started = Instant::now();
        let bin = controlplane::binary().await?;
        people::write_tokens(&opts.dir)?;
        let (issuer, auth_config) = match &opts.oidc {
            None => (None, None),
            Some(redirects) => {
                let (issuer, file) = start_trusted_issuer(&opts.dir, redirects).await?;
                (Some(issuer), Some(file))
            }
        };
        let plane = controlplane::ControlPlane::start(
            &bin,
            &opts.dir,
            opts.timeout,
            auth_config.as_deref(),
        )
        .await?;
        people::write_kubeconfigs(&opts.dir, &plane.ready.kubeconfig)?;
        let client = client_from_kubeconfig(&plane.ready.kubeconfig).await?;
        // Sessions act only for Users their requester may use (issue 19): the same rule as
        // the chart's, in force from the start.
        // With the OpenID Provider, the same groups as its ID tokens name them.
        let admin_oidc = format!("{}{}", oidc::GROUPS_PREFIX, people::ADMIN_GROUP);
        let people_oidc = format!("{}{}", oidc::GROUPS_PREFIX, people::PEOPLE_GROUP);
        let (mut admins, mut everyone) = (vec![people::ADMIN_GROUP], vec![people::PEOPLE_GROUP]);
        if issuer.is_some() {
            admins.push(&admin_oidc);
            everyone.push(&people_oidc);
        }
        crate::access::install(&client, &admins, &everyone)
            .await
            .map_err(|source| DevError::Kube {
                what: "install the Session admission policy and the people's roles".into(),
                source,
            })?;
        kubelet::ensure_lease_namespace(client.clone()).await?;
        let nodes = kubelet::default_nodes(opts.nodes, opts.zones);
        let mut zones: Vec<String> = nodes.iter().map(|n| n.zone.clone()).collect();
        zones.sort();
        zones.dedup();
        let node_names = nodes.iter().map(|n| n.name.clone()).collect();
        let kubelet = kubelet::start(client.clone(), nodes).await?;
        // Real-node pods write their volumes for real: they live under the node's directory.
        let node_dir = opts.dir.join("node");
        let volume_root = opts.real_node.as_ref().map(|_| node_dir.join("volumes"));
        let provisioner = provisioner::start(client.clone(), zones.clone(), volume_root).await?;
        let (real_node, real_node_unavailable) = match &opts.real_node {
            None => (None, None),
            Some(images) => {
                match realnode::start(&node_dir, &plane.ready.kubeconfig, &bin, images).await? {
                    realnode::Started::Node(n) => (Some(n), None),
                    realnode::Started::Unavailable(why) => (None, Some(why)),
                }
            }
        };
        let ready = DevReady {
            kubeconfig: plane.ready.kubeconfig.clone(),
            server: plane.ready.server.clone(),
            log_dir: plane.ready.log_dir.clone(),
            control_plane_startup_ms: plane.ready.startup_ms,
            startup_ms: started.elapsed().as_millis() as u64,
            nodes: node_names,
            zones,
            real_node: real_node.as_ref().map(|n| n.ready.clone()),
            real_node_unavailable,
        };
        Ok(Self {
            plane,
            _kubelet: kubelet,
            _provisioner: provisioner,
            real_node,
            issuer,
            client,
            ready,
        })
    }

    /// Stops everything. A real node is stopped first; if that leaves the host changed, the
    /// error says so (the differences are in `<dir>/node/host-diff`), after the rest stopped.
    pub async fn stop_checked(self) -> Result<(), DevError> {
        let Self {
            plane,
            _kubelet,
            _provisioner,
            real_node,
            issuer,
            ..
        } = self;
        let node = match real_node {
            Some(node) => node.stop().await,
            None => Ok(()),
        };
        drop(_kubelet);
        drop(_provisioner);
        plane.stop().await;
        drop(issuer);
        node
    }

    /// Stops everything; a real node that left the host changed is reported on standard error.
    pub async fn stop(self) {
        if let Err(e) = self.stop_checked().await {
            eprintln!("{e}");
        }
    }
}
