//! The real node: containerd, runc, the CNI bridge and the kubelet from the control plane's
//! multi-call binary, started and stopped by `tests/node/node.sh` beside the fake nodes.
//!
//! The node registers as [`NODE_NAME`] with the label and the `NoSchedule` taint
//! [`REAL_NODE_LABEL`]`=true`, so only pods that ask for it (node selector and toleration) run
//! there; everything else keeps landing on the fake nodes. Its images are built here by
//! `tests/images/build.sh` (cached by a hash of their inputs) and imported into its containerd.
//! Stopping it puts the host back as it was (the script compares and fails otherwise).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use tokio::process::Command;

use super::DevError;

/// Name of the real node.
pub const NODE_NAME: &str = "real-node-0";
/// Label (and `NoSchedule` taint key) of the real node; its value is `"true"`.
pub const REAL_NODE_LABEL: &str = "cubicle.dev/real-node";

/// The repository's `tests/node/node.sh` (known at compile time, like the control plane source).
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/node/node.sh")
}

/// What `node.sh up` writes to `<dir>/node-ready`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReady {
    /// Node name.
    pub name: String,
    /// The node's working directory (containerd, kubelet, logs, volumes).
    pub dir: PathBuf,
    /// The pods' subnet on the node's bridge.
    pub subnet: String,
    /// From `up` to the node Ready, ms (includes image imports).
    pub startup_ms: u64,
    /// Importing the images into containerd, ms.
    pub import_ms: u64,
    /// From the kubelet's start to the node Ready, ms.
    pub kubelet_to_ready_ms: u64,
}

/// A running real node; [`RealNode::stop`] stops it and restores the host.
pub struct RealNode {
    dir: PathBuf,
    stopped: bool,
    /// The ready record.
    pub ready: NodeReady,
}

/// The outcome of asking for a real node.
pub enum Started {
    /// The node is Ready.
    Node(RealNode),
    /// The host cannot run containers; the reason names what is missing.
    Unavailable(String),
}

/// Why this host cannot run a real node (`node.sh check`), or `None` if it can.
pub async fn missing() -> Result<Option<String>, DevError> {
    let out = Command::new("bash")
        .arg(script())
        .arg("check")
        .output()
        .await
        .map_err(|source| DevError::Io {
            what: format!("run {} check", script().display()),
            source,
        })?;
    Ok((!out.status.success()).then(|| String::from_utf8_lossy(&out.stdout).trim().to_string()))
}

/// Starts the real node in `dir` against the control plane of `kubeconfig`, importing the
/// images named in `images` (`operator`, `desktop`; the pause image always).
pub async fn start(
    dir: &Path,
    kubeconfig: &Path,
    controlplane_bin: &Path,
    images: &[String],
) -> Result<Started, DevError> {
    if let Some(why) = missing().await? {
        return Ok(Started::Unavailable(why));
    }
    let status = Command::new("bash")
        .arg(script())
        .arg("up")
        .arg(dir)
        .arg(kubeconfig)
        .arg(NODE_NAME)
        .env("CUBICLE_CONTROLPLANE_BIN", controlplane_bin)
        .env(
            "CUBICLE_NODE_IMAGES",
            images
                .iter()
                .filter(|i| !i.is_empty() && *i != "none")
                .cloned()
                .collect::<Vec<_>>()
                .join(" "),
        )
        .env(
            "CUBICLE_OPERATOR_BIN",
            std::env::var_os("CUBICLE_OPERATOR_BIN")
                .map(PathBuf::from)
                .or_else(|| std::env::current_exe().ok())
                .unwrap_or_default(),
        )
        .stdin(Stdio::null())
        .status()
        .await
        .map_err(|source| DevError::Io {
            what: format!("run {} up", script().display()),
            source,
        })?;
    let mut node = RealNode {
        dir: dir.to_path_buf(),
        stopped: false,
        ready: NodeReady {
            name: NODE_NAME.into(),
            dir: dir.to_path_buf(),
            subnet: String::new(),
            startup_ms: 0,
            import_ms: 0,
            kubelet_to_ready_ms: 0,
        },
    };
    if !status.success() {
        // Whatever part of it started is stopped and the host restored before failing.
        node.stop_now();
        return Err(DevError::Startup(format!(
            "the real node did not start ({} up exited with {status}); logs in {}/logs",
            script().display(),
            dir.display()
        )));
    }
    let text = std::fs::read_to_string(dir.join("node-ready")).map_err(|source| DevError::Io {
        what: format!("read {}/node-ready", dir.display()),
        source,
    })?;
    node.ready = serde_json::from_str(&text)
        .map_err(|e| DevError::Startup(format!("bad node-ready file: {e}")))?;
    Ok(Started::Node(node))
}

impl RealNode {
    /// Stops the node and restores the host; an error says what differs from before.
    pub async fn stop(mut self) -> Result<(), DevError> {
        self.stopped = true;
        let status = Command::new("bash")
            .arg(script())
            .arg("down")
            .arg(&self.dir)
            .status()
            .await
            .map_err(|source| DevError::Io {
                what: format!("run {} down", script().display()),
                source,
            })?;
        if status.success() {
            Ok(())
        } else {
            Err(DevError::Startup(format!(
                "stopping the real node left the host changed: {}/host-diff",
                self.dir.display()
            )))
        }
    }

    fn stop_now(&mut self) {
        if !self.stopped {
            self.stopped = true;
            let _ = std::process::Command::new("bash")
                .arg(script())
                .arg("down")
                .arg(&self.dir)
                .status();
        }
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.stop_now();
    }
}
