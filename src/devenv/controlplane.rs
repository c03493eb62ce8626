//! Starting and stopping the local control plane (the Go binary built from `tests/controlplane`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::process::{Child, Command};

use super::DevError;

/// What `controlplane up` writes to `<dir>/ready` once the API server serves.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ready {
    /// Path of an admin kubeconfig (usable by kube-rs and kubectl).
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub server: String,
    /// Directory holding one log file per component.
    pub log_dir: PathBuf,
    /// How long `up` took from start to ready, in milliseconds.
    pub startup_ms: u64,
}

/// A running control plane. Dropping it closes the child's stdin, which stops it; `stop` waits.
pub struct ControlPlane {
    child: Child,
    /// The ready record.
    pub ready: Ready,
}

/// The repository's `tests/controlplane` directory (known at compile time).
pub fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/controlplane")
}

/// Path of the control plane binary: `$CUBICLE_CONTROLPLANE_BIN`, or built (once per source hash,
/// cached outside the repository) by `tests/controlplane/build.sh`.
pub async fn binary() -> Result<PathBuf, DevError> {
    built_binary("CUBICLE_CONTROLPLANE_BIN", &source_dir().join("build.sh")).await
}

/// A binary of the project's own: the path in `$env`, or the last line printed by `script`, a
/// build script that builds once per source hash and prints the cached binary's path.
pub async fn built_binary(env: &str, script: &Path) -> Result<PathBuf, DevError> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let out = Command::new("bash")
        .arg(script)
        .stderr(Stdio::inherit())
        .output()
        .await
        .map_err(|source| DevError::Io {
            what: format!("run {}", script.display()),
            source,
        })?;
    if !out.status.success() {
        return Err(DevError::Build(format!(
            "{} exited with {}",
            script.display(),
            out.status
        )));
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    Ok(PathBuf::from(path))
}

impl ControlPlane {
    /// Starts `controlplane up --dir <dir>` (with `--authentication-config <file>` when given:
    /// the OIDC issuers the API server trusts) and waits until it has written `<dir>/ready`.
    pub async fn start(
        bin: &Path,
        dir: &Path,
        timeout: Duration,
        authentication_config: Option<&Path>,
    ) -> Result<Self, DevError> {
        std::fs::create_dir_all(dir).map_err(|source| DevError::Io {
            what: format!("create {}", dir.display()),
            source,
        })?;
        let ready_file = dir.join("ready");
        let _ = std::fs::remove_file(&ready_file);
        let log = std::fs::File::create(dir.join("up.log")).map_err(|source| DevError::Io {
            what: "create up.log".into(),
            source,
        })?;
        let log2 = log.try_clone().map_err(|source| DevError::Io {
            what: "clone up.log".into(),
            source,
        })?;
        // Demo people's static tokens (devenv::people), when written.
        let people = super::people::tokens_file(dir);
        let mut extra = Vec::new();
        if people.is_file() {
            extra.push(std::ffi::OsString::from("--extra-tokens"));
            extra.push(people.into_os_string());
        }
        if let Some(f) = authentication_config {
            extra.push(std::ffi::OsString::from("--authentication-config"));
            extra.push(f.as_os_str().to_owned());
        }
        let mut child = Command::new(bin)
            .arg("up")
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .arg("--exit-on-stdin-eof")
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| DevError::Io {
                what: format!("start {}", bin.display()),
                source,
            })?;
        let started = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&ready_file) {
                let ready: Ready = serde_json::from_str(&text)
                    .map_err(|e| DevError::Build(format!("bad ready file: {e}")))?;
                return Ok(Self { child, ready });
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.join("up.log")).unwrap_or_default();
                return Err(DevError::Startup(format!(
                    "controlplane up exited with {status}:\n{log}"
                )));
            }
            if started.elapsed() > timeout {
                return Err(DevError::Startup(format!(
                    "control plane not ready after {timeout:?}; logs in {}",
                    dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the control plane (closing its stdin asks it to shut down) and waits for it.
    pub async fn stop(mut self) {
        drop(self.child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
