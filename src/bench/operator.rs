//! The operator under test: `cubicle run` as a child process (the real binary, with its own
//! client, caches and API budget), observed through its `/metrics` endpoint and `/proc`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::sys::{self, Memory};
use super::{BenchError, Budget, Context};

/// How to start the operator.
#[derive(Debug, Clone)]
pub struct OperatorSpec {
    /// The `cubicle` binary.
    pub bin: PathBuf,
    /// Admin kubeconfig of the local control plane.
    pub kubeconfig: PathBuf,
    /// The one namespace it watches.
    pub namespace: String,
    /// Its client-side API budget.
    pub budget: Budget,
    /// Parallel reconciles per controller.
    pub concurrency: u16,
    /// Its resync interval.
    pub resync: std::time::Duration,
    /// Where its logs go (appended).
    pub log: PathBuf,
}

/// A running operator process.
pub struct OperatorProcess {
    child: Child,
    /// Its process id.
    pub pid: u32,
    addr: SocketAddr,
    /// Under heaptrack: stopped with SIGKILL, so that what its trace shows as leaked is what
    /// was live at the stop.
    heaptrack: bool,
}

impl OperatorProcess {
    /// Starts `cubicle run --namespace NS --metrics-addr 127.0.0.1:PORT --api-qps Q --api-burst B`
    /// and waits until `/readyz` says every cache has synced.
    pub async fn start(spec: &OperatorSpec) -> Result<Self, BenchError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .ctx("pick a free port for the operator's metrics")?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)
            .ctx(format!("open {}", spec.log.display()))?;
        let log2 = log.try_clone().ctx("clone the operator log")?;
        let mut cmd = Command::new(&spec.bin);
        cmd.arg("run")
            .arg("--namespace")
            .arg(&spec.namespace)
            .arg("--metrics-addr")
            .arg(addr.to_string())
            .arg("--api-qps")
            .arg(spec.budget.qps.to_string())
            .arg("--api-burst")
            .arg(spec.budget.burst.to_string())
            .arg("--concurrency")
            .arg(spec.concurrency.to_string())
            .arg("--resync")
            .arg(format!("{}s", spec.resync.as_secs()))
            .env("KUBECONFIG", &spec.kubeconfig)
            // Settings from the caller's environment would change what is measured.
            .env_remove("CUBICLE_LEADER_ELECT")
            .env_remove("CUBICLE_NAMESPACES")
            .env_remove("CUBICLE_RESYNC")
            .env_remove("DUMP_HEAPTRACK_OUTPUT")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true);
        let heaptrack = diagnostics::heaptrack_dir();
        if let Some(dir) = &heaptrack {
            // heaptrack's preload library in the operator itself (not the `heaptrack` script,
            // whose shell would be the child): same pid, raw trace to a file per process.
            cmd.env("LD_PRELOAD", diagnostics::HEAPTRACK_PRELOAD)
                .env("DUMP_HEAPTRACK_OUTPUT", diagnostics::next_trace(dir));
        }
        let child = cmd
            .spawn()
            .ctx(format!("start {} run", spec.bin.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| BenchError("the operator exited at once".into()))?;
        let mut me = Self {
            child,
            pid,
            addr,
            heaptrack: heaptrack.is_some(),
        };
        me.wait_ready(Duration::from_secs(120), &spec.log).await?;
        Ok(me)
    }

    async fn wait_ready(
        &mut self,
        timeout: Duration,
        log: &std::path::Path,
    ) -> Result<(), BenchError> {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(self.addr, "/readyz").await {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(BenchError(format!(
                    "the operator exited with {status} before it was ready; see {}",
                    log.display()
                )));
            }
            if start.elapsed() > timeout {
                return Err(BenchError(format!(
                    "the operator was not ready after {timeout:?}; see {}",
                    log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its counters now.
    pub async fn scrape(&self) -> Result<Scrape, BenchError> {
        let (code, body) = http_get(self.addr, "/metrics")
            .await
            .ctx("scrape the operator's /metrics")?;
        if code != 200 {
            return Err(BenchError(format!("/metrics answered {code}")));
        }
        Ok(Scrape::parse(&body))
    }

    /// Its memory now (and its peak so far).
    pub fn memory(&self) -> Memory {
        let m = sys::memory(self.pid).unwrap_or_default();
        diagnostics::dump_proc(self.pid, &m);
        m
    }

    /// The CPU time it has used so far.
    pub fn cpu(&self) -> Duration {
        sys::cpu_time(self.pid).unwrap_or_default()
    }

    /// Waits until the operator has been quiet for `window` (no API request and no reconcile),
    /// and at least `min_reconciles` Session reconciles have happened; returns the counters then.
    ///
    /// Reconciles alone never make it wait longer than [`RESYNC_QUIET`]: with more objects than
    /// the resync interval gets through in a burst (10,000 sessions take longer than the 300 s
    /// resync), the resync's reconciles, which make no request, never stop; no request for that
    /// long is quiet too.
    pub async fn settle(
        &self,
        window: Duration,
        min_reconciles: f64,
        timeout: Duration,
    ) -> Result<Scrape, BenchError> {
        let start = Instant::now();
        let mut last = self.scrape().await?;
        let (mut no_request, mut no_reconcile) = (Instant::now(), Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = self.scrape().await?;
            if now.total_requests() != last.total_requests() {
                no_request = Instant::now();
            }
            if now.total_reconciles() != last.total_reconciles() {
                no_reconcile = Instant::now();
            }
            last = now;
            let reconciled = last.reconciles.get("Session").copied().unwrap_or_default();
            if quiet(no_request.elapsed(), no_reconcile.elapsed(), window)
                && reconciled >= min_reconciles
            {
                return Ok(last);
            }
            if start.elapsed() > timeout {
                return Err(BenchError(format!(
                    "the operator did not settle within {timeout:?} ({reconciled} of {min_reconciles} session reconciles, \
                     {:.0} s since its last request, {:.0} s since its last reconcile)",
                    no_request.elapsed().as_secs_f64(),
                    no_reconcile.elapsed().as_secs_f64()
                )));
            }
        }
    }

    /// Stops it (SIGTERM, then SIGKILL after 10 s) and waits for it.
    pub async fn stop(mut self) {
        let signal = if self.heaptrack { "-KILL" } else { "-TERM" };
        let _ = Command::new("kill")
            .arg(signal)
            .arg(self.pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// The operator's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    /// `cubicle_api_requests_total` by `"verb resource"`.
    pub requests: BTreeMap<String, f64>,
    /// `cubicle_reconcile_total` by kind.
    pub reconciles: BTreeMap<String, f64>,
    /// Sum of `cubicle_reconcile_errors_total`.
    pub errors: f64,
}

impl Scrape {
    /// Parses the OpenMetrics text of `/metrics`.
    pub fn parse(text: &str) -> Self {
        let mut s = Scrape::default();
        for (name, labels, value) in samples(text) {
            let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
            match name {
                "cubicle_api_requests_total" => {
                    *s.requests
                        .entry(format!("{} {}", label("verb"), label("resource")))
                        .or_default() += value;
                }
                "cubicle_reconcile_total" => {
                    *s.reconciles.entry(label("kind")).or_default() += value;
                }
                "cubicle_reconcile_errors_total" => s.errors += value,
                _ => {}
            }
        }
        s
    }

    /// Every API request so far.
    pub fn total_requests(&self) -> f64 {
        self.requests.values().sum()
    }

    /// Every reconcile so far.
    pub fn total_reconciles(&self) -> f64 {
        self.reconciles.values().sum()
    }

    /// Requests made since `before`, by `"verb resource"` (zero entries dropped).
    pub fn requests_since(&self, before: &Scrape) -> BTreeMap<String, f64> {
        self.requests
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v - before.requests.get(k).copied().unwrap_or_default(),
                )
            })
            .filter(|(_, v)| *v != 0.0)
            .collect()
    }
}

/// Diagnostics of the operator's memory, off unless asked for by environment variables of the
/// bench: `CUBICLE_BENCH_PROC_DUMP=DIR` copies `/proc/<pid>/{status,smaps_rollup,smaps}` at
/// every memory reading (`DIR/NN-<pid>.*`, numbered in reading order, with an `index` line
/// each); `CUBICLE_BENCH_HEAPTRACK=DIR` runs each operator under heaptrack's preload library
/// (raw traces `DIR/operator-N.raw`; read them with `heaptrack_interpret < RAW | zstd >
/// OUT.zst` and `heaptrack_print OUT.zst`). Memory read under heaptrack includes its own.
mod diagnostics {
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::Memory;

    pub const HEAPTRACK_PRELOAD: &str = "/usr/lib/heaptrack/libheaptrack_preload.so";

    static READINGS: AtomicUsize = AtomicUsize::new(0);
    static TRACES: AtomicUsize = AtomicUsize::new(0);

    pub fn heaptrack_dir() -> Option<PathBuf> {
        let dir = PathBuf::from(std::env::var_os("CUBICLE_BENCH_HEAPTRACK")?);
        std::fs::create_dir_all(&dir).ok()?;
        Some(dir)
    }

    pub fn next_trace(dir: &Path) -> PathBuf {
        let k = TRACES.fetch_add(1, Ordering::Relaxed);
        dir.join(format!("operator-{k}.raw"))
    }

    pub fn dump_proc(pid: u32, m: &Memory) {
        let Some(dir) = std::env::var_os("CUBICLE_BENCH_PROC_DUMP").map(PathBuf::from) else {
            return;
        };
        let _ = std::fs::create_dir_all(&dir);
        let k = READINGS.fetch_add(1, Ordering::Relaxed);
        for file in ["status", "smaps_rollup", "smaps"] {
            let _ = std::fs::copy(
                format!("/proc/{pid}/{file}"),
                dir.join(format!("{k:02}-{pid}.{file}")),
            );
        }
        if let Ok(mut index) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("index"))
        {
            let _ = writeln!(
                index,
                "{k:02} pid {pid} rss_kib {} anon_kib {} hwm_kib {}",
                m.rss_kib, m.anon_kib, m.hwm_kib
            );
        }
    }
}

/// The samples of a Prometheus or OpenMetrics text: series name, labels, value (comments and
/// unreadable lines skipped).
pub(crate) fn samples(text: &str) -> impl Iterator<Item = (&str, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let value = value.parse::<f64>().ok()?;
            Some(match series.split_once('{') {
                Some((n, rest)) => (n, parse_labels(rest.trim_end_matches('}')), value),
                None => (series, BTreeMap::new(), value),
            })
        })
}

/// The labels of a Prometheus series: `a="x",b="y"`.
pub(crate) fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(n);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                _ => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    out
}

/// A plain HTTP/1.1 GET with `Connection: close`; returns the status code and the body.
/// How long without an API request counts as quiet while reconciles go on ([`OperatorProcess::settle`]).
pub const RESYNC_QUIET: Duration = Duration::from_secs(30);

/// Whether an operator is settled: no request and no reconcile for `window`, or no request for
/// [`RESYNC_QUIET`] (the longer of the two) whatever it reconciles.
fn quiet(no_request: Duration, no_reconcile: Duration, window: Duration) -> bool {
    no_request >= window && (no_reconcile >= window || no_request >= RESYNC_QUIET.max(window))
}

async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let fetch = async {
        let mut stream = TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "GET timed out"))??;
    let text = String::from_utf8_lossy(&buf);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked");
    let body = if chunked {
        dechunk(body).ok_or_else(bad)?
    } else {
        body.to_string()
    };
    Ok((code, body))
}

fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_means_no_request_and_no_reconcile_or_no_request_for_long() {
        let (s, w) = (Duration::from_secs, Duration::from_millis(1500));
        assert!(quiet(s(2), s(2), w));
        // Still reconciling after a request: not yet.
        assert!(!quiet(s(2), s(0), w));
        assert!(!quiet(s(0), s(5), w));
        // Reconciling on and on without a request (a resync of 10,000): quiet after a while.
        assert!(!quiet(s(29), s(0), w));
        assert!(quiet(RESYNC_QUIET, s(0), w));
        // A window longer than that still holds.
        assert!(!quiet(s(40), s(0), s(60)));
    }

    #[test]
    fn parses_the_operator_counters() {
        let text = "# TYPE cubicle_api_requests counter\n\
            cubicle_api_requests_total{verb=\"create\",resource=\"pods\"} 3\n\
            cubicle_api_requests_total{verb=\"patch\",resource=\"sessions/status\"} 2\n\
            cubicle_reconcile_total{kind=\"Session\"} 7\n\
            cubicle_reconcile_errors_total{kind=\"Session\",category=\"kube\"} 1\n\
            cubicle_reconcile_duration_seconds_bucket{kind=\"Session\",le=\"0.001\"} 4\n\
            # EOF\n";
        let s = Scrape::parse(text);
        assert_eq!(s.requests.get("create pods"), Some(&3.0));
        assert_eq!(s.requests.get("patch sessions/status"), Some(&2.0));
        assert_eq!(s.reconciles.get("Session"), Some(&7.0));
        assert_eq!(s.errors, 1.0);
        assert_eq!(s.total_requests(), 5.0);
        let mut later = s.clone();
        *later.requests.get_mut("create pods").unwrap() += 2.0;
        let d = later.requests_since(&s);
        assert_eq!(d.len(), 1);
        assert_eq!(d.get("create pods"), Some(&2.0));
    }

    #[test]
    fn decodes_chunked_bodies() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").as_deref(),
            Some("hello world")
        );
    }
}
