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

impl DevCluster {
    /// Builds (if needed) and starts the control plane, then registers fake nodes and storage.
    pub async fn start(opts: &DevOptions) -> Result<Self, DevError> {
        let started = Instant::now();
        let bin = controlplane::binary().await?;
        people::write_tokens(&opts.dir)?;
        let plane = controlplane::ControlPlane::start(&bin, &opts.dir, opts.timeout).await?;
        people::write_kubeconfigs(&opts.dir, &plane.ready.kubeconfig)?;
        let client = client_from_kubeconfig(&plane.ready.kubeconfig).await?;
        // Sessions act only for Users their requester may use (issue 19): the same rule as
        // the chart's, in force from the start.
        crate::access::install(&client, &[people::ADMIN_GROUP], &[people::PEOPLE_GROUP])
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
            ..
        } = self;
        let node = match real_node {
            Some(node) => node.stop().await,
            None => Ok(()),
        };
        drop(_kubelet);
        drop(_provisioner);
        plane.stop().await;
        node
    }

    /// Stops everything; a real node that left the host changed is reported on standard error.
    pub async fn stop(self) {
        if let Err(e) = self.stop_checked().await {
            eprintln!("{e}");
        }
    }
}
