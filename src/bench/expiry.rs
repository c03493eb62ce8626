//! `cubicle bench-expiry`: how late the operator enforces session deadlines, for N armed
//! sessions on the local control plane.
//!
//! For each N: a fresh namespace with one Group (`sessionTimeLimit` = `--limit`, action delete),
//! one User and one Workspace without a profile; the real operator as a child process
//! (`cubicle run --log-format json`, unlimited API budget); N sessions created evenly over
//! `--spread`. Once all are Running (armed), the harness waits for every deadline and measures
//! per session:
//!
//! - **action start**: `late_seconds` of the operator's `"session expired"` log line (the
//!   operator's own clock at the moment it acts, against `status.expiresAt`);
//! - **request sent**: `sent_late_seconds` of the same line (the moment the action's task,
//!   on a worker thread, sends the API call);
//! - **landed**: the time the harness's watch sees the Session gone, minus `status.expiresAt`.
//!
//! A session counts as **early** when its action started, or its deletion was seen, before its
//! `expiresAt`. Deadlines are `creationTimestamp + limit`, and `creationTimestamp` has whole
//! seconds, so sessions created within the same second share one deadline instant.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use jiff::Timestamp;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde::Serialize;
use serde_json::json;

use super::cluster::{self, HARNESS_CONCURRENCY, WORKSPACE};
use super::operator::{OperatorProcess, OperatorSpec};
use super::report::median;
use super::sys::Machine;
use super::{BenchError, Budget, Context};
use crate::crd::v1alpha1::{Group, Session, SessionPhase, User, Workspace};
use crate::devenv::DevCluster;

/// Arguments of `cubicle bench-expiry`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExpiryArgs {
    /// Armed sessions per run, for each N (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pub sessions: Vec<usize>,
    /// The Group's `sessionTimeLimit` (`90s`, `2m`). Default: scaled with N so that the last
    /// session is Running well before the first deadline (20 s + spread + 40 ms per session).
    #[arg(long, value_parser = parse_duration)]
    pub limit: Option<Duration>,
    /// Sessions are created evenly over this long, so their deadlines are spread too.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub spread: Duration,
    /// Runs per N; the table shows the median of each figure.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Working directory (control plane, operator logs). Default: a fresh temporary directory,
    /// removed after a successful run.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// `90s`, `2m`, `1500ms` or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let v: f64 = num.parse().map_err(|_| format!("{s:?}: not a duration"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// Lateness figures of one set of values, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Stats {
    /// Median.
    pub p50: f64,
    /// 99th percentile (nearest rank).
    pub p99: f64,
    /// Maximum.
    pub max: f64,
}

impl Stats {
    /// The figures of `ms` (NaN when empty).
    pub fn of(mut ms: Vec<f64>) -> Self {
        if ms.is_empty() {
            return Self {
                p50: f64::NAN,
                p99: f64::NAN,
                max: f64::NAN,
            };
        }
        ms.sort_by(f64::total_cmp);
        Self {
            p50: percentile(&ms, 50.0),
            p99: percentile(&ms, 99.0),
            max: ms[ms.len() - 1],
        }
    }

    /// The median of each figure over runs.
    pub fn median(runs: &[Stats]) -> Self {
        let m = |f: fn(&Stats) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        Self {
            p50: m(|s| s.p50),
            p99: m(|s| s.p99),
            max: m(|s| s.max),
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One run of N sessions.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Run {
    /// Sessions created.
    pub sessions: usize,
    /// Sessions Running before their deadline (armed).
    pub armed: usize,
    /// Seconds from the first creation until all were Running.
    pub armed_after_s: f64,
    /// Distinct deadline instants.
    pub deadlines: usize,
    /// Sessions with a `"session expired"` log line.
    pub acted: usize,
    /// Sessions seen gone.
    pub landed: usize,
    /// Sessions acted on or seen deleted before `expiresAt`.
    pub early: usize,
    /// `late_seconds` of the log, ms.
    pub action_start_ms: Stats,
    /// `sent_late_seconds` of the log, ms.
    pub request_sent_ms: Stats,
    /// Gone (as seen by the harness's watch) minus `expiresAt`, ms.
    pub landed_ms: Stats,
}

/// The figures for one N (medians over its runs).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    /// N.
    pub sessions: usize,
    /// `sessionTimeLimit`, seconds.
    pub limit_s: f64,
    /// Fewest armed sessions of any run.
    pub armed: usize,
    /// Most early actions of any run.
    pub early: usize,
    /// Median over runs.
    pub action_start_ms: Stats,
    /// Median over runs.
    pub request_sent_ms: Stats,
    /// Median over runs.
    pub landed_ms: Stats,
    /// Every run.
    pub runs: Vec<Run>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExpiryReport {
    /// Where it ran.
    pub machine: Machine,
    /// `--spread`, seconds.
    pub spread_s: f64,
    /// One row per N.
    pub rows: Vec<Row>,
}

impl ExpiryReport {
    /// A Markdown table.
    pub fn table(&self) -> String {
        let m = &self.machine;
        let mut out = format!(
            "Expiry lateness (sessionTimeLimit, action delete; sessions created over {} s)\n\
             machine: {} cores, {:.1} GiB RAM, {}\n\n\
             | armed sessions | deadline instants | limit | action start p50 / p99 / max | request sent p50 / p99 / max | landed p50 / p99 / max | early | runs |\n\
             |---:|---:|---:|---:|---:|---:|---:|---:|\n",
            num(self.spread_s),
            m.cores,
            m.memory_gib,
            m.cpu_model
        );
        for r in &self.rows {
            let ms = |s: &Stats| format!("{:.1} / {:.1} / {:.1} ms", s.p50, s.p99, s.max);
            out.push_str(&format!(
                "| {} of {} | {} | {} s | {} | {} | {} | {} | {} |\n",
                r.armed,
                r.sessions,
                r.runs.first().map_or(0, |x| x.deadlines),
                num(r.limit_s),
                ms(&r.action_start_ms),
                ms(&r.request_sent_ms),
                ms(&r.landed_ms),
                r.early,
                r.runs.len()
            ));
        }
        out
    }
}

fn num(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn progress(msg: impl std::fmt::Display) {
    eprintln!("[bench-expiry] {msg}");
}

/// `cubicle bench-expiry`.
pub async fn main(args: ExpiryArgs) -> ExitCode {
    match run(&args).await {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("the report serializes")
                );
            } else {
                print!("{}", report.table());
            }
            if report.rows.iter().any(|r| r.early > 0) {
                eprintln!("cubicle bench-expiry: some sessions were acted on early");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cubicle bench-expiry: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The default limit for N sessions.
fn default_limit(n: usize, spread: Duration) -> Duration {
    Duration::from_secs(20) + spread + Duration::from_millis(40 * n as u64)
}

/// Runs the benchmark.
pub async fn run(args: &ExpiryArgs) -> Result<ExpiryReport, BenchError> {
    if args.sessions.is_empty() || args.sessions.contains(&0) {
        return Err(BenchError("--sessions needs sizes of at least 1".into()));
    }
    let bin = std::env::current_exe().ctx("find this executable")?;
    let (dir, temporary) = match &args.dir {
        Some(d) => (std::path::absolute(d).unwrap_or_else(|_| d.clone()), false),
        None => (
            std::env::temp_dir().join(format!("cubicle-bench-expiry-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).ctx(format!("create {}", dir.display()))?;
    // The operator must log JSON (and at info) whatever the caller's environment says.
    let wrapper = dir.join("operator.sh");
    let quoted = bin.display().to_string().replace('\'', r"'\''");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexport CUBICLE_LOG_FORMAT=json RUST_LOG=info,kube=warn\nexec '{quoted}' \"$@\"\n"
        ),
    )
    .ctx("write the operator wrapper")?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
            .ctx("make the operator wrapper executable")?;
    }
    let largest = args.sessions.iter().copied().max().unwrap_or(1);
    let (cluster, _) = cluster::start_control_plane(&dir, largest, progress).await?;
    let result = all_sizes(args, &cluster, &wrapper, &dir).await;
    cluster.stop().await;
    if result.is_ok() && temporary {
        let _ = std::fs::remove_dir_all(&dir);
    } else if result.is_err() {
        progress(format!("logs kept in {}", dir.display()));
    }
    result
}

async fn all_sizes(
    args: &ExpiryArgs,
    cluster: &DevCluster,
    wrapper: &Path,
    dir: &Path,
) -> Result<ExpiryReport, BenchError> {
    cluster::install_crds(&cluster.client).await?;
    let mut rows = Vec::new();
    for &n in &args.sessions {
        let limit = args.limit.unwrap_or_else(|| default_limit(n, args.spread));
        let mut runs = Vec::new();
        for rep in 0..args.repeat.max(1) {
            let ns = format!("expiry-{n}-{rep}");
            let spec = OperatorSpec {
                bin: wrapper.to_path_buf(),
                kubeconfig: cluster.ready.kubeconfig.clone(),
                namespace: ns.clone(),
                budget: Budget::UNLIMITED,
                concurrency: 16,
                resync: crate::controller::DEFAULT_RESYNC,
                log: dir.join(format!("operator-{ns}.log")),
            };
            let r = one_run(&cluster.client, &spec, n, limit, args.spread).await?;
            progress(format!(
                "N={n} run {}: armed {}/{n} after {:.1} s, action start p99 {:.1} ms, landed p99 {:.1} ms, early {}",
                rep + 1,
                r.armed,
                r.armed_after_s,
                r.action_start_ms.p99,
                r.landed_ms.p99,
                r.early
            ));
            runs.push(r);
        }
        let starts: Vec<Stats> = runs.iter().map(|r| r.action_start_ms).collect();
        let sent: Vec<Stats> = runs.iter().map(|r| r.request_sent_ms).collect();
        let lands: Vec<Stats> = runs.iter().map(|r| r.landed_ms).collect();
        rows.push(Row {
            sessions: n,
            limit_s: limit.as_secs_f64(),
            armed: runs.iter().map(|r| r.armed).min().unwrap_or(0),
            early: runs.iter().map(|r| r.early).max().unwrap_or(0),
            action_start_ms: Stats::median(&starts),
            request_sent_ms: Stats::median(&sent),
            landed_ms: Stats::median(&lands),
            runs,
        });
    }
    Ok(ExpiryReport {
        machine: Machine::detect(),
        spread_s: args.spread.as_secs_f64(),
        rows,
    })
}

/// What the harness's watch saw of one session (wall-clock times of this process).
#[derive(Debug, Clone, Default)]
struct Seen {
    expires_at: Option<Timestamp>,
    running: Option<Timestamp>,
    deleting: Option<Timestamp>,
    gone: Option<Timestamp>,
    failed: bool,
}

type SeenMap = Arc<Mutex<HashMap<String, Seen>>>;

fn lock(m: &SeenMap) -> std::sync::MutexGuard<'_, HashMap<String, Seen>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Watches the sessions of `api` into `seen`; returns once the first list is in.
async fn watch(api: Api<Session>, seen: SeenMap) -> tokio::task::JoinHandle<()> {
    let synced = Arc::new(tokio::sync::Notify::new());
    let s = synced.clone();
    let task = tokio::spawn(async move {
        let events = watcher(api, watcher::Config::default()).default_backoff();
        futures::pin_mut!(events);
        while let Ok(Some(ev)) = events.try_next().await {
            let now = Timestamp::now();
            match ev {
                watcher::Event::InitDone => s.notify_one(),
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) => {
                    let mut m = lock(&seen);
                    let e = m.entry(o.name_any()).or_default();
                    let status = o.status.as_ref();
                    if let Some(t) = status.and_then(|s| s.expires_at.as_ref()) {
                        e.expires_at = Some(t.0);
                    }
                    match status.and_then(|s| s.phase) {
                        Some(SessionPhase::Running) if e.running.is_none() => e.running = Some(now),
                        Some(SessionPhase::Refused | SessionPhase::Failed) => e.failed = true,
                        _ => {}
                    }
                    if o.metadata.deletion_timestamp.is_some() && e.deleting.is_none() {
                        e.deleting = Some(now);
                    }
                }
                watcher::Event::Delete(o) => {
                    let mut m = lock(&seen);
                    let e = m.entry(o.name_any()).or_default();
                    if let Some(t) = o.status.as_ref().and_then(|s| s.expires_at.as_ref()) {
                        e.expires_at = Some(t.0);
                    }
                    e.gone.get_or_insert(now);
                    e.deleting.get_or_insert(now);
                }
                watcher::Event::Init => {}
            }
        }
    });
    synced.notified().await;
    task
}

async fn create_tenant(client: &Client, ns: &str, limit: Duration) -> Result<(), BenchError> {
    let limit = format!("{}ms", limit.as_millis());
    let group: Group = serde_json::from_value(json!({
        "apiVersion": "cubicle.dev/v1alpha1", "kind": "Group",
        "metadata": {"name": "everyone"},
        "spec": {"priority": 100, "settings": {
            "autoAddLocalUsers": true,
            "sessionTimeLimit": limit,
            "keepaliveExpirationAction": "delete"}},
    }))
    .ctx("build the Group")?;
    let workspace: Workspace = serde_json::from_value(json!({
        "apiVersion": "cubicle.dev/v1alpha1", "kind": "Workspace",
        "metadata": {"name": WORKSPACE},
        "spec": {"image": "example.invalid/desktop:1", "groups": ["everyone"]},
    }))
    .ctx("build the Workspace")?;
    let user: User = serde_json::from_value(json!({
        "apiVersion": "cubicle.dev/v1alpha1", "kind": "User",
        "metadata": {"name": "alice"}, "spec": {"realm": "local"},
    }))
    .ctx("build the User")?;
    let pp = PostParams::default();
    Api::<Group>::namespaced(client.clone(), ns)
        .create(&pp, &group)
        .await
        .ctx("create the Group")?;
    Api::<Workspace>::namespaced(client.clone(), ns)
        .create(&pp, &workspace)
        .await
        .ctx("create the Workspace")?;
    Api::<User>::namespaced(client.clone(), ns)
        .create(&pp, &user)
        .await
        .ctx("create the User")?;
    Ok(())
}

/// The operator's `"session expired"` lines of namespace `ns`: session name to
/// (`late_seconds`, `sent_late_seconds`, log timestamp).
fn expired_lines(log: &Path, ns: &str) -> HashMap<String, (f64, f64, Option<Timestamp>)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let prefix = format!("{ns}/");
    let mut out = HashMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["message"] != "session expired" {
            continue;
        }
        let Some(name) = v["session"].as_str().and_then(|s| s.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(late) = v["late_seconds"].as_f64() else {
            continue;
        };
        let sent = v["sent_late_seconds"].as_f64().unwrap_or(late);
        let at = v["timestamp"].as_str().and_then(|t| t.parse().ok());
        out.entry(name.to_string()).or_insert((late, sent, at));
    }
    out
}

async fn one_run(
    client: &Client,
    spec: &OperatorSpec,
    n: usize,
    limit: Duration,
    spread: Duration,
) -> Result<Run, BenchError> {
    let ns = spec.namespace.as_str();
    progress(format!(
        "N={n}: namespace {ns}, sessionTimeLimit {} s, created over {} s",
        num(limit.as_secs_f64()),
        num(spread.as_secs_f64())
    ));
    cluster::create_namespace(client, ns).await?;
    create_tenant(client, ns, limit).await?;
    let op = OperatorProcess::start(spec).await?;
    let api: Api<Session> = Api::namespaced(client.clone(), ns);
    let seen: SeenMap = Arc::default();
    let task = watch(api.clone(), seen.clone()).await;

    let t0 = Instant::now();
    let step = spread.div_f64(n as f64);
    let failed = stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                tokio::time::sleep_until((t0 + step.mul_f64(i as f64)).into()).await;
                let s = cluster::session(&format!("s-{i}"), "alice");
                api.create(&PostParams::default(), &s).await.is_err()
            }
        })
        .buffer_unordered(HARNESS_CONCURRENCY)
        .filter(|f| futures::future::ready(*f))
        .count()
        .await;
    if failed > 0 {
        return Err(BenchError(format!("{failed} of {n} sessions not created")));
    }

    // Armed: all Running (or gone: a late-armed session may already have expired).
    let deadline_wait = limit + spread + Duration::from_secs(120);
    let armed_after = loop {
        {
            let m = lock(&seen);
            if let Some((name, _)) = m.iter().find(|(_, s)| s.failed) {
                return Err(BenchError(format!("session {name} was refused or failed")));
            }
            let ready = m
                .values()
                .filter(|s| s.running.is_some() || s.gone.is_some())
                .count();
            if ready >= n {
                break t0.elapsed();
            }
        }
        if t0.elapsed() > deadline_wait {
            return Err(BenchError(format!("not all {n} sessions Running in time")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    progress(format!(
        "N={n}: all Running after {:.1} s; waiting for the deadlines",
        armed_after.as_secs_f64()
    ));
    loop {
        let gone = lock(&seen).values().filter(|s| s.gone.is_some()).count();
        if gone >= n {
            break;
        }
        if t0.elapsed() > deadline_wait {
            progress(format!("N={n}: only {gone} of {n} sessions gone in time"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    task.abort();
    // Let the last log lines reach the file before the operator stops.
    tokio::time::sleep(Duration::from_millis(500)).await;
    op.stop().await;

    let lines = expired_lines(&spec.log, ns);
    let m = lock(&seen).clone();
    let mut starts = Vec::new();
    let mut sent = Vec::new();
    let mut lands = Vec::new();
    let (mut armed, mut early, mut landed) = (0, 0, 0);
    let mut instants: Vec<Timestamp> = Vec::new();
    for (name, s) in &m {
        let Some(exp) = s.expires_at else { continue };
        instants.push(exp);
        if s.running.is_some_and(|r| r < exp) {
            armed += 1;
        }
        let ms = |t: Timestamp| t.duration_since(exp).as_secs_f64() * 1000.0;
        let mut is_early = s.deleting.is_some_and(|d| d < exp);
        if let Some((late, sent_late, at)) = lines.get(name) {
            starts.push(late * 1000.0);
            sent.push(sent_late * 1000.0);
            is_early |= *late < 0.0 || at.is_some_and(|a| a < exp);
        }
        if let Some(g) = s.gone {
            landed += 1;
            lands.push(ms(g));
        }
        early += usize::from(is_early);
    }
    instants.sort();
    instants.dedup();

    cluster::cleanup(client, ns).await?;
    Ok(Run {
        sessions: n,
        armed,
        armed_after_s: armed_after.as_secs_f64(),
        deadlines: instants.len(),
        acted: lines.len(),
        landed,
        early,
        action_start_ms: Stats::of(starts),
        request_sent_ms: Stats::of(sent),
        landed_ms: Stats::of(lands),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_percentiles() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("3h").is_err());
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        let s = Stats::of(v);
        assert_eq!((s.p50, s.p99, s.max), (50.0, 99.0, 100.0));
    }
}
