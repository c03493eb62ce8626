//! The real `cubicle` binary as a child process: `cubicle run` with JSON logs, its HTTP endpoints,
//! signals. Its logs go to `<run dir>/operator-<name>.log` (kept when a test fails).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support;

/// A running `cubicle run`. Killed (SIGKILL) when dropped; it also stops by itself when this
/// test process exits (it runs with `--exit-on-stdin-eof`).
pub struct OperatorBin {
    child: Child,
    /// A name for messages and the log file.
    pub name: String,
    lines: Arc<Mutex<Vec<String>>>,
    /// The log file.
    pub log: PathBuf,
}

impl OperatorBin {
    /// Starts `cubicle run <args> --log-format json --metrics-addr 127.0.0.1:0
    /// --exit-on-stdin-eof` with `KUBECONFIG=kubeconfig` and extra `env`.
    pub fn spawn(name: &str, kubeconfig: &Path, args: &[String], env: &[(&str, &str)]) -> Self {
        let log = support::run_dir().join(format!("operator-{name}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cubicle"));
        cmd.arg("run")
            .args(args)
            .args([
                "--log-format=json",
                "--metrics-addr=127.0.0.1:0",
                "--exit-on-stdin-eof",
            ])
            .env("KUBECONFIG", kubeconfig)
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,kube=warn");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start `cubicle run`");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let mut file = std::fs::File::create(&log).expect("create the operator log");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            child,
            name: name.to_string(),
            lines,
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every stderr line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Every stderr line, parsed as JSON; panics on a line that is not a JSON object.
    pub fn events(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .map(|l| {
                let v: Value = serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{}: a log line is not JSON ({e}): {l}", self.name));
                assert!(v.is_object(), "{}: not a JSON object: {l}", self.name);
                v
            })
            .collect()
    }

    /// Whether a log event has this message.
    pub fn logged(&self, message: &str) -> bool {
        self.lines().iter().any(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| v["message"].as_str() == Some(message))
        })
    }

    /// Waits for a log event with this message.
    pub async fn wait_logged(&self, message: &str, timeout: Duration) {
        let what = format!("{}: log event {message:?}", self.name);
        support::wait_for(&what, timeout, || async {
            self.logged(message).then_some(())
        })
        .await
    }

    /// The address of /metrics, /healthz and /readyz (from the `starting` log event).
    pub async fn addr(&mut self) -> SocketAddr {
        let start = Instant::now();
        loop {
            for l in self.lines() {
                if let Ok(v) = serde_json::from_str::<Value>(&l)
                    && v["message"] == "starting"
                    && let Some(a) = v["metrics"].as_str()
                {
                    return a.parse().expect("a socket address");
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before starting:\n{}",
                    self.name,
                    self.lines().join("\n")
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{}: no `starting` log event:\n{}",
                self.name,
                self.lines().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GET `path` on the operator's HTTP port.
    pub async fn get(&mut self, path: &str) -> (u16, String) {
        let addr = self.addr().await;
        cubicle::http::probe(addr, path)
            .await
            .unwrap_or_else(|e| panic!("{}: GET {path}: {e}", self.name))
    }

    /// Waits until `/readyz` answers 200; returns how long that took from now.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Duration {
        let start = Instant::now();
        let addr = self.addr().await;
        let name = self.name.clone();
        support::wait_for(&format!("{name}: /readyz 200"), timeout, || async {
            matches!(cubicle::http::probe(addr, "/readyz").await, Ok((200, _))).then_some(())
        })
        .await;
        start.elapsed()
    }

    /// Sends a signal (`TERM`, `KILL`, ...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -s {signal} {} failed", self.child.id());
    }

    /// Waits up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for OperatorBin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
