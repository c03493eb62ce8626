//! `cubicle bench`: what a launch costs, how fast bursts converge against the floor, and the
//! operator's footprint, all measured in one run on the local control plane.
//!
//! The run starts its own control plane ([`DevCluster`](crate::devenv::DevCluster), with enough fake nodes for the largest
//! burst), installs the CRDs and runs the operator under test as a child process (`cubicle run`,
//! this very binary), scoped to one tenant namespace and read through its `/metrics`
//! (`cubicle_api_requests_total`) and `/proc/<pid>`. In order:
//!
//! 1. **Launch cost.** A few users each launch two sessions, one after the other; the operator's
//!    requests between "created" and "Running and quiet" are counted, by verb and resource.
//!    The operator is then left alone for a quiet period (no writes expected, idle CPU).
//! 2. **Bursts**, for each N: the floor first, a plain kube-rs client creating the same claims
//!    and pods as the operator did (copied from the launch-cost probe), with the operator's
//!    concurrency, until every pod runs. Then, for each API budget, a fresh tenant with N users
//!    and an operator with that budget; N sessions are created at once and the clock stops
//!    when all are Running. The operator's requests and CPU per launch, its peak request rate,
//!    and the CPU of every process are recorded. A quiet period follows, then (first budget
//!    only) a forced relist: the operator is restarted and re-lists and re-reconciles every
//!    session; its peak memory (`VmHWM`) then is the relist peak, and its writes are the
//!    resync's.
//!
//! Each namespace is emptied between runs (with the operator stopped), so every run starts on
//! a cluster without leftovers.

pub mod cluster;
pub mod expiry;
pub mod gateway;
pub mod operator;
pub mod report;
pub mod sys;

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client};
use serde::Serialize;

use crate::apicount::ApiCounter;
use crate::client::{self, ApiBudget};
use crate::crd::v1alpha1::Session;
use cluster::{Tally, Template, Tracker};
use operator::{OperatorProcess, OperatorSpec, Scrape};
use report::{
    Burst, Check, CpuRow, LaunchCost, MemoryRow, Quiet, Report, Requests, Resync, Settings, median,
    memory_target_mb, num,
};
use sys::{Machine, Memory};

/// How long after its last launch the operator may still reconcile on its own: a launched
/// session is looked at again 5 s after its pod was created (to report a pod still pending).
/// Quiet periods start after this much inactivity, so they measure steady state, not the tail
/// of the launches before them.
const LAUNCH_TAIL: Duration = Duration::from_secs(6);

/// A failed benchmark step.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BenchError(pub String);

/// Adds what was being done to an error.
pub(crate) trait Context<T> {
    fn ctx(self, what: impl Display) -> Result<T, BenchError>;
}

impl<T, E: std::error::Error> Context<T> for Result<T, E> {
    fn ctx(self, what: impl Display) -> Result<T, BenchError> {
        self.map_err(|e| {
            let mut s = format!("{what}: {e}");
            let mut cur = e.source();
            while let Some(c) = cur {
                s.push_str(&format!(": {c}"));
                cur = c.source();
            }
            BenchError(s)
        })
    }
}

/// The operator's client-side API budget for a burst: `QPS/BURST`, or `unlimited` (`0/0`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Budget {
    /// Sustained requests per second (0: unlimited).
    pub qps: f64,
    /// Burst above the sustained rate.
    pub burst: u32,
}

impl Budget {
    /// No client-side limit.
    pub const UNLIMITED: Budget = Budget { qps: 0.0, burst: 0 };

    fn is_unlimited(&self) -> bool {
        self.qps <= 0.0
    }
}

impl FromStr for Budget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "unlimited" {
            return Ok(Budget::UNLIMITED);
        }
        let (q, b) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?}: expected QPS/BURST (e.g. 20/40) or unlimited"))?;
        let qps: f64 = q.parse().map_err(|_| format!("{s:?}: bad QPS"))?;
        let burst: u32 = b.parse().map_err(|_| format!("{s:?}: bad burst"))?;
        Ok(Budget { qps, burst })
    }
}

impl Display for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_unlimited() {
            write!(f, "unlimited")
        } else {
            write!(f, "{} qps, burst {}", num(self.qps), self.burst)
        }
    }
}

/// Arguments of `cubicle bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Burst sizes: N sessions created at once, for each N (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    pub sessions: Vec<usize>,
    /// The operator's API budgets, as QPS/BURST or `unlimited`, comma-separated; each burst
    /// runs at each. The first is compared with the floor, whose client has no budget.
    #[arg(long, value_delimiter = ',', default_value = "unlimited,20/40")]
    pub budgets: Vec<Budget>,
    /// The operator's parallel reconciles, and the floor client's requests in flight.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u16,
    /// Run each burst (and its floor) this many times and report medians.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Users probed for the launch cost (each launches two sessions); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub probes: usize,
    /// Length of each quiet period (idle CPU, steady-state writes), seconds.
    #[arg(long, default_value_t = 10.0)]
    pub quiet: f64,
    /// The CI variant: one probe, 2 s quiet periods (none after the probes), shorter settling.
    /// Counts stay exact.
    #[arg(long)]
    pub quick: bool,
    /// The operator's `--resync`, seconds: 0 (none) or at least 60, as the operator takes it
    /// (its default unless given). The idle CPU with it amortized is reported: the CPU of a
    /// full resync (the forced relist's) over this.
    #[arg(long, default_value_t = crate::controller::DEFAULT_RESYNC.as_secs(), value_parser = resync_seconds)]
    pub resync_seconds: u64,
    /// Give up on a burst after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    /// Print the report as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    pub json_file: Option<PathBuf>,
    /// Working directory (control plane PKI and logs, operator logs). Default: a fresh temporary
    /// directory, removed after a successful run.
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// `cubicle bench`.
pub async fn main(args: BenchArgs) -> ExitCode {
    match run(&args).await {
        Ok(report) => {
            let json = serde_json::to_string_pretty(&report).expect("the report serializes");
            if let Some(path) = &args.json_file
                && let Err(e) = std::fs::write(path, &json)
            {
                eprintln!("cubicle bench: writing {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            if args.json {
                println!("{json}");
            } else {
                print!("{}", report.table());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cubicle bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// How often a long burst reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(60);
/// How long a burst's sessions watch may say nothing new before the sessions are listed.
const TRACKER_SILENT: Duration = Duration::from_secs(20);

fn progress(msg: impl Display) {
    eprintln!("[bench] {msg}");
}

/// Runs the benchmark and returns its report.
pub async fn run(args: &BenchArgs) -> Result<Report, BenchError> {
    let started = Instant::now();
    let load_start = sys::load_average();
    if args.sessions.is_empty() || args.sessions.contains(&0) {
        return Err(BenchError("--sessions needs sizes of at least 1".into()));
    }
    if args.budgets.is_empty() {
        return Err(BenchError("--budgets needs at least one budget".into()));
    }
    let bin = std::env::current_exe().ctx("find this executable")?;
    let (dir, temporary) = match &args.dir {
        Some(d) => (std::path::absolute(d).unwrap_or_else(|_| d.clone()), false),
        None => (
            std::env::temp_dir().join(format!("cubicle-bench-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&dir).ctx(format!("create {}", dir.display()))?;
    let probes = if args.quick { 1 } else { args.probes.max(1) };
    let largest = args.sessions.iter().copied().max().unwrap_or(1);
    let (cluster, opts) =
        cluster::start_control_plane(&dir, largest + 2 * probes, progress).await?;
    let mut components = control_plane_pids(&opts.dir);
    components.push(("bench (kubelet, provisioner)".into(), std::process::id()));
    let bench = Bench {
        args: args.clone(),
        quick: args.quick,
        probes,
        window: if args.quick {
            Duration::from_millis(1000)
        } else {
            Duration::from_millis(1500)
        },
        quiet: Duration::from_secs_f64(if args.quick { 2.0 } else { args.quiet }),
        timeout: Duration::from_secs(args.timeout),
        client: cluster.client.clone(),
        kubeconfig: cluster.ready.kubeconfig.clone(),
        dir: dir.clone(),
        bin,
        components,
    };
    let result = bench.run(opts.nodes, started).await.map(|mut r| {
        r.load_average = [load_start, sys::load_average()];
        r
    });
    cluster.stop().await;
    if result.is_ok() && temporary {
        let _ = std::fs::remove_dir_all(&dir);
    } else if result.is_err() {
        progress(format!("logs kept in {}", dir.display()));
    }
    result
}

/// Process ids of the control plane's components, from the ready file `controlplane up` writes.
fn control_plane_pids(dir: &std::path::Path) -> Vec<(String, u32)> {
    let text = std::fs::read_to_string(dir.join("ready")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let mut out: Vec<(String, u32)> = v["pids"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), u32::try_from(v.as_u64()?).ok()?)))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

struct Bench {
    args: BenchArgs,
    quick: bool,
    probes: usize,
    window: Duration,
    quiet: Duration,
    timeout: Duration,
    client: Client,
    kubeconfig: PathBuf,
    dir: PathBuf,
    bin: PathBuf,
    components: Vec<(String, u32)>,
}

/// What the launch-cost probe measured.
struct Probe {
    first: Vec<Requests>,
    later: Vec<Requests>,
    idle: Memory,
    idle_cpu: f64,
    quiet: Option<Quiet>,
    template: Template,
}

/// One floor run.
struct FloorRun {
    wall: f64,
    api_errors: BTreeMap<String, f64>,
    api_work: cluster::ApiServerWork,
    failures: usize,
    peak_rps: f64,
    phases: BTreeMap<String, f64>,
    cpu: BTreeMap<String, f64>,
}

/// One operator burst.
struct BurstRun {
    wall: f64,
    api_errors: BTreeMap<String, f64>,
    api_work: cluster::ApiServerWork,
    failures: usize,
    errors: f64,
    peak_rps: f64,
    cpu_ms_per_launch: f64,
    per_launch: Requests,
    phases: BTreeMap<String, f64>,
    cpu: BTreeMap<String, f64>,
    /// From each pod Running to its Session Running (as the bench's watches saw them), ms.
    status_lag: expiry::Stats,
    /// Only on the first run of the first budget of each size:
    footprint: Option<Footprint>,
}

struct Footprint {
    idle: Memory,
    steady: Memory,
    cache: BTreeMap<String, report::CacheEntry>,
    quiet: Quiet,
    quiet_cpu: f64,
    relist: Option<(Memory, Resync)>,
}

impl Bench {
    fn operator_spec(&self, ns: &str, budget: Budget) -> OperatorSpec {
        OperatorSpec {
            bin: self.bin.clone(),
            kubeconfig: self.kubeconfig.clone(),
            namespace: ns.into(),
            budget,
            concurrency: self.args.concurrency,
            resync: Duration::from_secs(self.args.resync_seconds),
            log: self.dir.join(format!("operator-{ns}.log")),
        }
    }

    fn cpu_snapshot(&self, extra: Option<u32>) -> BTreeMap<String, Duration> {
        let mut m: BTreeMap<String, Duration> = self
            .components
            .iter()
            .filter_map(|(name, pid)| Some((name.clone(), sys::cpu_time(*pid)?)))
            .collect();
        if let Some(pid) = extra
            && let Some(t) = sys::cpu_time(pid)
        {
            m.insert("cubicle operator".into(), t);
        }
        m
    }

    fn cpu_since(
        &self,
        before: &BTreeMap<String, Duration>,
        extra: Option<u32>,
    ) -> BTreeMap<String, f64> {
        self.cpu_snapshot(extra)
            .into_iter()
            .map(|(k, v)| {
                let b = before.get(&k).copied().unwrap_or_default();
                (k, v.saturating_sub(b).as_secs_f64())
            })
            .collect()
    }

    /// A quiet period: the operator's requests and CPU (ms per second) while nothing changes.
    /// It starts once the operator has made no request and no reconcile for [`LAUNCH_TAIL`]
    /// (or after a minute of trying: what keeps it busy then shows in the figures).
    async fn quiet_period(
        &self,
        op: &OperatorProcess,
        sessions: usize,
    ) -> Result<(Quiet, f64), BenchError> {
        let tail = if sessions > 0 {
            LAUNCH_TAIL
        } else {
            self.window
        };
        if let Err(e) = op.settle(tail, 0.0, Duration::from_secs(60)).await {
            progress(format!("before the quiet period: {e}"));
        }
        // The CPU is read inside the scrapes: serving one (encoding every metric) is the
        // bench's work, not the operator's idle cost.
        let before = op.scrape().await?;
        let cpu0 = op.cpu();
        let t0 = Instant::now();
        tokio::time::sleep(self.quiet).await;
        let cpu = op.cpu().saturating_sub(cpu0).as_secs_f64() * 1000.0;
        let secs = t0.elapsed().as_secs_f64();
        let after = op.scrape().await?;
        Ok((
            Quiet {
                sessions,
                seconds: secs,
                requests: Requests::from_counts(&after.requests_since(&before), 1.0),
            },
            cpu / secs,
        ))
    }

    async fn run(&self, nodes: usize, started: Instant) -> Result<Report, BenchError> {
        progress("installing the CRDs");
        cluster::install_crds(&self.client).await?;
        let probe = self.probe().await?;
        let mut bursts = Vec::new();
        let mut memory = vec![MemoryRow {
            what: "idle (no sessions)".into(),
            sessions: 0,
            rss_mb: mb(probe.idle.rss_kib),
            anon_mb: mb(probe.idle.anon_kib),
            peak_mb: mb(probe.idle.hwm_kib),
            target_mb: Some(memory_target_mb(0)),
            cache: BTreeMap::new(),
        }];
        let mut cpu = vec![CpuRow {
            what: "idle, no sessions".into(),
            value: probe.idle_cpu,
            unit: "ms CPU per s".into(),
        }];
        let mut quiets: Vec<Quiet> = probe.quiet.iter().cloned().collect();
        let mut resyncs = Vec::new();
        let mut sizes = self.args.sessions.clone();
        sizes.sort_unstable();
        sizes.dedup();
        for &n in &sizes {
            let mut floors = Vec::new();
            for rep in 0..self.args.repeat.max(1) {
                floors.push(self.floor(n, rep, &probe.template).await?);
            }
            for (bi, &budget) in self.args.budgets.iter().enumerate() {
                let mut runs = Vec::new();
                for rep in 0..self.args.repeat.max(1) {
                    let measure = bi == 0 && rep == 0;
                    runs.push(self.burst(n, bi, budget, rep, measure).await?);
                }
                if let Some(f) = runs.iter().find_map(|r| r.footprint.as_ref()) {
                    memory.push(MemoryRow {
                        what: format!("idle, {n} users, no sessions"),
                        sessions: 0,
                        rss_mb: mb(f.idle.rss_kib),
                        anon_mb: mb(f.idle.anon_kib),
                        peak_mb: mb(f.idle.hwm_kib),
                        target_mb: Some(memory_target_mb(0)),
                        cache: BTreeMap::new(),
                    });
                    memory.push(MemoryRow {
                        what: "steady after the burst (peak: the burst)".into(),
                        sessions: n,
                        rss_mb: mb(f.steady.rss_kib),
                        anon_mb: mb(f.steady.anon_kib),
                        peak_mb: mb(f.steady.hwm_kib),
                        target_mb: Some(memory_target_mb(n)),
                        cache: f.cache.clone(),
                    });
                    if let Some((m, r)) = &f.relist {
                        memory.push(MemoryRow {
                            what: "forced relist: restarted, re-listed, reconciled".into(),
                            sessions: n,
                            rss_mb: mb(m.rss_kib),
                            anon_mb: mb(m.anon_kib),
                            peak_mb: mb(m.hwm_kib),
                            target_mb: Some(2.0 * mb(f.steady.rss_kib)),
                            cache: BTreeMap::new(),
                        });
                        resyncs.push(r.clone());
                    }
                    cpu.push(CpuRow {
                        what: format!("idle, {n} sessions Running"),
                        value: f.quiet_cpu,
                        unit: "ms CPU per s".into(),
                    });
                    if let (Some((_, r)), resync @ 1..) = (&f.relist, self.args.resync_seconds) {
                        // The quiet window above sees a resync only when the burst outlasted
                        // its interval; steady, its cost is spread over the interval.
                        cpu.push(CpuRow {
                            what: format!(
                                "idle, {n} sessions Running, a full resync every {} amortized",
                                human_secs(resync)
                            ),
                            value: f.quiet_cpu + r.cpu_ms / resync as f64,
                            unit: "ms CPU per s".into(),
                        });
                    }
                    quiets.push(f.quiet.clone());
                }
                let floor_s = median(&floors.iter().map(|f| f.wall).collect::<Vec<_>>());
                let operator_s = median(&runs.iter().map(|r| r.wall).collect::<Vec<_>>());
                let burst = Burst {
                    sessions: n,
                    budget: budget.to_string(),
                    compared: bi == 0,
                    runs: runs.len(),
                    floor_s,
                    operator_s,
                    ratio: operator_s / floor_s.max(1e-9),
                    failures: runs.iter().map(|r| r.failures).sum(),
                    floor_failures: floors.iter().map(|f| f.failures).sum(),
                    reconcile_errors: runs.iter().map(|r| r.errors).sum(),
                    peak_rps: median(&runs.iter().map(|r| r.peak_rps).collect::<Vec<_>>()),
                    floor_peak_rps: median(&floors.iter().map(|f| f.peak_rps).collect::<Vec<_>>()),
                    cpu_ms_per_launch: median(
                        &runs.iter().map(|r| r.cpu_ms_per_launch).collect::<Vec<_>>(),
                    ),
                    per_launch: Requests::median(
                        &runs
                            .iter()
                            .map(|r| r.per_launch.clone())
                            .collect::<Vec<_>>(),
                    ),
                    phases: median_map(runs.iter().map(|r| &r.phases)),
                    floor_phases: median_map(floors.iter().map(|f| &f.phases)),
                    cpu_s: median_map(runs.iter().map(|r| &r.cpu)),
                    floor_cpu_s: median_map(floors.iter().map(|f| &f.cpu)),
                    api_errors: median_map(runs.iter().map(|r| &r.api_errors)),
                    floor_api_errors: median_map(floors.iter().map(|f| &f.api_errors)),
                    api_seconds: median_map(runs.iter().map(|r| &r.api_work.seconds)),
                    floor_api_seconds: median_map(floors.iter().map(|f| &f.api_work.seconds)),
                    watch_events: median_map(runs.iter().map(|r| &r.api_work.watch_events)),
                    status_lag_ms: expiry::Stats::median(
                        &runs.iter().map(|r| r.status_lag).collect::<Vec<_>>(),
                    ),
                    floor_watch_events: median_map(floors.iter().map(|f| &f.api_work.watch_events)),
                };
                cpu.push(CpuRow {
                    what: format!("per launch, burst of {n}, {budget}"),
                    value: burst.cpu_ms_per_launch,
                    unit: "ms CPU".into(),
                });
                bursts.push(burst);
            }
        }
        let launch = LaunchCost {
            samples: probe.first.len(),
            first: Requests::median(&probe.first),
            later: Requests::median(&probe.later),
            quiet: quiets,
            resync: resyncs,
        };
        let mut notes = vec![
            "launch writes are those of the launch's own objects (profile claim, pod, session \
             status), as the floor counts them; other writes (the User status controller's) and \
             Events are shown apart and held to the same target in 'all writes'"
                .to_string(),
            "forced relist: the operator process is restarted (SIGTERM, then a new process with \
             the same flags); it lists every kind again and reconciles every session, so its \
             VmHWM after settling is the relist peak and its writes are a full resync's"
                .to_string(),
            format!(
                "the operator runs with --resync {}: the quiet windows see its sweep only when \
                 a burst outlasted it, so the forced relist's CPU (an upper bound of a full \
                 resync's: it also parses every listed object) is spread over the interval in \
                 the 'amortized' idle row",
                human_secs(self.args.resync_seconds)
            ),
            "the floor creates, with a plain kube-rs client and no API budget, the claim and the \
             pod the operator made for a probe session, for N users, as many in flight as the \
             operator's --concurrency, and stops when every pod is Running"
                .to_string(),
        ];
        if !self.args.sessions.iter().any(|&n| n >= 10_000) {
            notes.push(
                "10,000 sessions not run (pass --sessions 10000; about 30 minutes on 2 cores: \
                 the floor alone takes about 6)"
                    .to_string(),
            );
        }
        let mut report = Report {
            machine: Machine::detect(),
            build: if cfg!(debug_assertions) {
                "debug".into()
            } else {
                "release".into()
            },
            control_plane: format!(
                "local etcd, kube-apiserver, kube-controller-manager and kube-scheduler \
                 (client QPS 200, burst 400), fake kubelet and provisioner in the bench process; \
                 {nodes} fake nodes x 110 pods in 3 zones"
            ),
            settings: Settings {
                sessions: sizes,
                budgets: self.args.budgets.iter().map(|b| b.to_string()).collect(),
                concurrency: self.args.concurrency,
                repeat: self.args.repeat.max(1),
                probes: self.probes,
                quiet_s: self.quiet.as_secs_f64(),
                nodes,
                quick: self.quick,
            },
            launch,
            bursts,
            memory,
            cpu,
            checks: Vec::new(),
            notes,
            duration_s: 0.0,
            load_average: Default::default(),
        };
        report.checks = checks(&report);
        report.duration_s = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Launch cost: `probes` users each launch two sessions, one at a time.
    async fn probe(&self) -> Result<Probe, BenchError> {
        let ns = "bench-probe";
        progress(format!(
            "launch cost: {} users launch two sessions each",
            self.probes
        ));
        cluster::create_namespace(&self.client, ns).await?;
        let users: Vec<String> = (0..self.probes).map(|k| format!("probe-{k}")).collect();
        cluster::create_tenant(&self.client, ns, &users).await?;
        let op = OperatorProcess::start(&self.operator_spec(ns, self.args.budgets[0])).await?;
        op.settle(self.window, 0.0, self.timeout).await?;
        let (_, idle_cpu) = self.quiet_period(&op, 0).await?;
        let idle = op.memory();
        let mut first = Vec::new();
        let mut later = Vec::new();
        let mut template = None;
        let wait = Duration::from_secs(120);
        for user in &users {
            for (k, out) in [(1, &mut first), (2, &mut later)] {
                let errors0 = cluster::apiserver_errors(&self.client).await;
                let before = op.scrape().await?;
                let name = format!("{user}-{k}");
                let created =
                    cluster::create_sessions(&self.client, ns, vec![(name.clone(), user.clone())])
                        .await;
                if created != 0 {
                    return Err(BenchError(format!("could not create session {name}")));
                }
                let s = cluster::wait_running(&self.client, ns, &name, wait).await?;
                let after = op.settle(self.window, 0.0, self.timeout).await?;
                let errors = delta(&cluster::apiserver_errors(&self.client).await, &errors0);
                let mut r = Requests::from_counts(&after.requests_since(&before), 1.0);
                r.refused_creates = refused_creates(&errors);
                out.push(r);
                if template.is_none() {
                    template = Some(cluster::capture_template(&self.client, ns, &s).await?);
                }
            }
        }
        // The quick run leaves the quiet period with sessions to the bursts.
        let quiet = if self.quick {
            None
        } else {
            Some(self.quiet_period(&op, 2 * users.len()).await?.0)
        };
        op.stop().await;
        cluster::cleanup(&self.client, ns).await?;
        Ok(Probe {
            first,
            later,
            idle,
            idle_cpu,
            quiet,
            template: template.expect("at least one probe"),
        })
    }

    /// A client of its own (its own connections): what follows a burst must not stall with
    /// the shared client, which the fake kubelet and provisioner load with thousands of
    /// requests. At 10,000 sessions the trackers' watches and a listing on the shared client
    /// stopped answering while the API server served everyone else.
    async fn own_client(&self) -> Result<Client, BenchError> {
        crate::devenv::client_from_kubeconfig(&self.kubeconfig)
            .await
            .map_err(|e| BenchError(format!("a client for the bench: {e}")))
    }

    /// The floor: the same claims and pods, created directly.
    async fn floor(
        &self,
        n: usize,
        rep: usize,
        template: &Template,
    ) -> Result<FloorRun, BenchError> {
        let ns = format!("floor-{n}-{rep}");
        progress(format!("floor: {n} claims and pods with a plain client"));
        cluster::create_namespace(&self.client, &ns).await?;
        let counter = ApiCounter::default();
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&self.kubeconfig).ctx("read the kubeconfig")?,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .ctx("load the kubeconfig")?;
        let plain =
            client::build(config, counter.clone(), ApiBudget::UNLIMITED).ctx("build a client")?;
        let pods = Tracker::start(
            Api::<Pod>::namespaced(self.own_client().await?, &ns),
            cluster::pod_stage,
        )
        .await;
        let errors0 = cluster::apiserver_errors(&self.client).await;
        let work0 = cluster::apiserver_work(&self.client).await;
        let cpu0 = self.cpu_snapshot(None);
        let t0 = Instant::now();
        let create = {
            let (plain, ns, template) = (plain.clone(), ns.clone(), template.clone());
            let c = usize::from(self.args.concurrency);
            tokio::spawn(async move { cluster::create_floor(&plain, &ns, &template, n, c).await })
        };
        let mut phases = BTreeMap::new();
        let total = || counter.snapshot().values().sum::<u64>() as f64;
        let mut rate = RateMeter::new(total());
        let mut create_failures = None;
        let mut create = Some(create);
        let done = loop {
            let t = pods.tally();
            if create.as_ref().is_some_and(|h| h.is_finished()) {
                let failed = create
                    .take()
                    .expect("checked")
                    .await
                    .ctx("the floor's creating task")?;
                create_failures = Some(failed);
                phases.insert("created".into(), t0.elapsed().as_secs_f64());
            }
            rate.sample(total());
            if let Some(failed) = create_failures
                && t.done + t.failed + failed >= n
            {
                phases.insert("running".into(), t0.elapsed().as_secs_f64());
                break t.done;
            }
            if t0.elapsed() > self.timeout {
                progress(format!("floor of {n}: timed out"));
                break t.done;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let wall = t0.elapsed().as_secs_f64();
        let cpu = self.cpu_since(&cpu0, None);
        let api_errors = delta(&cluster::apiserver_errors(&self.client).await, &errors0);
        let api_work = work_delta(&cluster::apiserver_work(&self.client).await, &work0);
        drop(pods);
        cluster::cleanup(&self.client, &ns).await?;
        progress(format!("floor of {n}: {wall:.1} s"));
        Ok(FloorRun {
            wall,
            api_errors,
            api_work,
            failures: n - done.min(n),
            peak_rps: rate.peak,
            phases,
            cpu,
        })
    }

    /// One operator burst of `n` sessions at `budget`.
    async fn burst(
        &self,
        n: usize,
        bi: usize,
        budget: Budget,
        rep: usize,
        measure: bool,
    ) -> Result<BurstRun, BenchError> {
        let ns = format!("bench-{n}-b{bi}-{rep}");
        progress(format!(
            "operator: {n} sessions at once, API budget {budget}"
        ));
        cluster::create_namespace(&self.client, &ns).await?;
        let users: Vec<String> = (0..n).map(|i| format!("u-{i}")).collect();
        cluster::create_tenant(&self.client, &ns, &users).await?;
        // An unlimited operator first writes the users' statuses, so that the one measured starts
        // on a settled tenant whatever its budget.
        let mut op = OperatorProcess::start(&self.operator_spec(&ns, Budget::UNLIMITED)).await?;
        op.settle(self.window, 0.0, self.timeout).await?;
        if !budget.is_unlimited() {
            op.stop().await;
            op = OperatorProcess::start(&self.operator_spec(&ns, budget)).await?;
            op.settle(self.window, 0.0, self.timeout).await?;
        }
        let idle = op.memory();
        let pods = Tracker::start(
            Api::<Pod>::namespaced(self.own_client().await?, &ns),
            cluster::pod_stage,
        )
        .await;
        let sessions = Tracker::start(
            Api::<Session>::namespaced(self.own_client().await?, &ns),
            cluster::session_stage,
        )
        .await;
        let errors0 = cluster::apiserver_errors(&self.client).await;
        let work0 = cluster::apiserver_work(&self.client).await;
        let before = op.scrape().await?;
        let cpu0 = self.cpu_snapshot(Some(op.pid));
        let op_cpu0 = op.cpu();
        let t0 = Instant::now();
        let t0_clock = jiff::Timestamp::now();
        let create = {
            let (client, ns) = (self.client.clone(), ns.clone());
            let items = (0..n)
                .map(|i| (format!("s-{i}"), format!("u-{i}")))
                .collect();
            tokio::spawn(async move { cluster::create_sessions(&client, &ns, items).await })
        };
        let mut phases = BTreeMap::new();
        let mut rate = RateMeter::new(before.total_requests());
        let mut create = Some(create);
        let mut create_failures = None;
        let mut next_sample = Instant::now();
        let (mut last_tally, mut moved) = (sessions.tally(), Instant::now());
        let mut next_report = Instant::now() + PROGRESS_EVERY;
        let mut listed_end: Option<f64> = None;
        let running = loop {
            let p = pods.tally();
            let mut s = sessions.tally();
            if s != last_tally {
                (last_tally, moved) = (s, Instant::now());
            }
            if Instant::now() >= next_report {
                next_report += PROGRESS_EVERY;
                progress(format!(
                    "operator burst of {n}: {:.0} s, sessions {} seen {} Running {} failed; pods {} seen {} Running",
                    t0.elapsed().as_secs_f64(),
                    s.seen,
                    s.done,
                    s.failed,
                    p.seen,
                    p.done
                ));
            }
            // The watch is the clock, but if it has said nothing new for a while the sessions
            // are listed: a burst must not wait for its timeout on a watch that fell silent.
            if create.is_none() && moved.elapsed() >= TRACKER_SILENT {
                moved = Instant::now();
                let listed = match tokio::time::timeout(
                    TRACKER_SILENT,
                    cluster::session_outcome(&self.own_client().await?, &ns),
                )
                .await
                {
                    Ok(listed) => listed?,
                    Err(_) => {
                        progress(format!(
                            "operator burst of {n}: listing the sessions timed out"
                        ));
                        cluster::SessionOutcome::default()
                    }
                };
                if listed.done + listed.failed > s.done + s.failed {
                    progress(format!(
                        "operator burst of {n}: the sessions watch fell silent at {} Running; listed {} Running, {} failed",
                        s.done, listed.done, listed.failed
                    ));
                    s = Tally {
                        seen: listed.seen,
                        done: listed.done,
                        failed: listed.failed,
                    };
                    listed_end = listed
                        .last_started
                        .map(|t| t.duration_since(t0_clock).as_secs_f64());
                }
            }
            if create.as_ref().is_some_and(|h| h.is_finished()) {
                let failed = create
                    .take()
                    .expect("checked")
                    .await
                    .ctx("the session-creating task")?;
                create_failures = Some(failed);
                phases.insert("sessions created".into(), t0.elapsed().as_secs_f64());
            }
            if p.seen >= n && !phases.contains_key("pods created") {
                phases.insert("pods created".into(), t0.elapsed().as_secs_f64());
            }
            if p.done >= n && !phases.contains_key("pods running") {
                phases.insert("pods running".into(), t0.elapsed().as_secs_f64());
            }
            if Instant::now() >= next_sample {
                // One scrape a second: the operator's own request counter.
                next_sample += Duration::from_secs(1);
                if let Ok(sc) = op.scrape().await {
                    rate.sample(sc.total_requests());
                }
            }
            if let Some(failed) = create_failures
                && s.done + s.failed + failed >= n
            {
                // From a listing: when the last session started, not when it was listed.
                let end = listed_end.unwrap_or_else(|| t0.elapsed().as_secs_f64());
                phases.insert("sessions running".into(), end);
                break s.done;
            }
            if t0.elapsed() > self.timeout {
                progress(format!("operator burst of {n}: timed out"));
                break s.done;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let wall = listed_end.unwrap_or_else(|| t0.elapsed().as_secs_f64());
        let cpu = self.cpu_since(&cpu0, Some(op.pid));
        let api_work = work_delta(&cluster::apiserver_work(&self.client).await, &work0);
        let status_lag = expiry::Stats::of(cluster::status_lags_ms(
            &pods.done_at(),
            &sessions.done_at(),
        ));
        drop(pods);
        drop(sessions);
        progress(format!(
            "operator burst of {n}: status after the pod ran p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            status_lag.p50, status_lag.p99, status_lag.max
        ));
        progress(format!(
            "operator burst of {n}: {running} Running at {wall:.1} s; waiting for the operator to settle"
        ));
        let after = op
            .settle(self.window, 0.0, self.timeout)
            .await
            .unwrap_or_else(|e| {
                progress(format!("{e}; counting what was done"));
                before.clone()
            });
        let op_cpu = op.cpu().saturating_sub(op_cpu0).as_secs_f64() * 1000.0;
        let api_errors = delta(&cluster::apiserver_errors(&self.client).await, &errors0);
        let mut per_launch = Requests::from_counts(&after.requests_since(&before), n as f64);
        per_launch.refused_creates = refused_creates(&api_errors) / n as f64;
        progress(format!(
            "operator burst of {n} ({budget}): {wall:.1} s, {running} of {n} Running"
        ));
        let footprint = if measure {
            let steady = op.memory();
            let cache = cluster::cache_profile(&self.client, &ns).await?;
            let (quiet, quiet_cpu) = self.quiet_period(&op, running).await?;
            progress(format!(
                "forced relist: restarting the operator with {running} sessions"
            ));
            let steady_rss = op.memory();
            op.stop().await;
            let t = Instant::now();
            op = OperatorProcess::start(&self.operator_spec(&ns, budget)).await?;
            let resynced = op.settle(self.window, running as f64, self.timeout).await?;
            let resync_cpu = op.cpu();
            let relist = op.memory();
            let requests = Requests::from_counts(&resynced.requests_since(&Scrape::default()), 1.0);
            let resync = Resync {
                sessions: running,
                seconds: t.elapsed().as_secs_f64(),
                cpu_ms: resync_cpu.as_secs_f64() * 1000.0,
                writes_per_session: requests.all_writes() / running.max(1) as f64,
                requests,
            };
            Some(Footprint {
                idle,
                steady: Memory {
                    hwm_kib: steady.hwm_kib.max(steady_rss.hwm_kib),
                    ..steady_rss
                },
                cache,
                quiet,
                quiet_cpu,
                relist: Some((relist, resync)),
            })
        } else {
            None
        };
        op.stop().await;
        cluster::cleanup(&self.client, &ns).await?;
        Ok(BurstRun {
            wall,
            api_errors,
            api_work,
            failures: n - running.min(n),
            errors: after.errors - before.errors,
            peak_rps: rate.peak,
            cpu_ms_per_launch: op_cpu / n as f64,
            per_launch,
            phases,
            cpu,
            status_lag,
            footprint,
        })
    }
}

/// The highest request rate over one-second windows of a growing counter.
struct RateMeter {
    last: f64,
    at: Instant,
    peak: f64,
}

impl RateMeter {
    fn new(total: f64) -> Self {
        Self {
            last: total,
            at: Instant::now(),
            peak: 0.0,
        }
    }

    /// Records the counter's value now; windows shorter than a second are left to grow.
    fn sample(&mut self, total: f64) {
        let dt = self.at.elapsed().as_secs_f64();
        if dt >= 1.0 {
            self.peak = self.peak.max((total - self.last) / dt);
            self.last = total;
            self.at = Instant::now();
        }
    }
}

fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

/// Creates of the launch's objects answered 409 (the object already existed), from the API
/// server's error counts of a period in which only the operator created pods and claims.
fn refused_creates(errors: &BTreeMap<String, f64>) -> f64 {
    ["POST pods 409", "POST persistentvolumeclaims 409"]
        .iter()
        .map(|k| errors.get(*k).copied().unwrap_or_default())
        .sum()
}

/// `after - before`, by key, without zeros.
fn delta(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or_default()))
        .filter(|(_, v)| *v != 0.0)
        .collect()
}

fn work_delta(
    after: &cluster::ApiServerWork,
    before: &cluster::ApiServerWork,
) -> cluster::ApiServerWork {
    cluster::ApiServerWork {
        seconds: delta(&after.seconds, &before.seconds),
        watch_events: delta(&after.watch_events, &before.watch_events),
    }
}

fn median_map<'a>(maps: impl Iterator<Item = &'a BTreeMap<String, f64>>) -> BTreeMap<String, f64> {
    let maps: Vec<&BTreeMap<String, f64>> = maps.collect();
    let keys: std::collections::BTreeSet<&String> = maps.iter().flat_map(|m| m.keys()).collect();
    keys.into_iter()
        .map(|k| {
            let v: Vec<f64> = maps.iter().filter_map(|m| m.get(k).copied()).collect();
            (k.clone(), median(&v))
        })
        .collect()
}

/// Holds every figure to its target.
pub fn checks(r: &Report) -> Vec<Check> {
    let mut c = Vec::new();
    let mut add = |what: String, measured: String, target: &str, ok: bool| {
        c.push(Check {
            what,
            measured,
            target: target.into(),
            ok,
        })
    };
    let l = &r.launch;
    add(
        "launch writes, first session of a user".into(),
        num(l.first.launch_writes),
        "3",
        l.first.launch_writes <= 3.0,
    );
    add(
        "launch writes, later session".into(),
        num(l.later.launch_writes),
        "2",
        l.later.launch_writes <= 2.0,
    );
    add(
        "all writes, first session (with other and Events)".into(),
        num(l.first.all_writes()),
        "3",
        l.first.all_writes() <= 3.0,
    );
    add(
        "all writes, later session (with other and Events)".into(),
        num(l.later.all_writes()),
        "2",
        l.later.all_writes() <= 2.0,
    );
    for b in r.bursts.iter().filter(|b| b.compared) {
        add(
            format!("launch writes per session, burst of {}", b.sessions),
            num(b.per_launch.launch_writes),
            "3",
            b.per_launch.launch_writes <= 3.0,
        );
    }
    let dups = l.first.refused_creates
        + l.later.refused_creates
        + r.bursts
            .iter()
            .filter(|b| b.compared)
            .map(|b| b.per_launch.refused_creates)
            .sum::<f64>();
    add(
        "duplicate creates (409) per launch, probes and bursts".into(),
        num(dups),
        "0",
        dups == 0.0,
    );
    for q in &l.quiet {
        add(
            format!(
                "all writes, quiet {:.0} s with {} sessions",
                q.seconds, q.sessions
            ),
            num(q.requests.all_writes()),
            "0",
            q.requests.all_writes() == 0.0,
        );
    }
    for s in &l.resync {
        add(
            format!("all writes, resync of {} sessions", s.sessions),
            num(s.requests.all_writes()),
            "0",
            s.requests.all_writes() == 0.0,
        );
    }
    let gets = l.first.gets
        + l.later.gets
        + l.quiet.iter().map(|q| q.requests.gets).sum::<f64>()
        + l.resync.iter().map(|s| s.requests.gets).sum::<f64>()
        + r.bursts.iter().map(|b| b.per_launch.gets).sum::<f64>();
    add("uncached reads (get)".into(), num(gets), "0", gets == 0.0);
    for b in &r.bursts {
        if b.compared {
            add(
                format!("burst of {}: operator / floor", b.sessions),
                format!("{:.2}x", b.ratio),
                "<= 1.2x",
                b.ratio <= 1.2,
            );
        }
        add(
            format!("burst of {} ({}): failures", b.sessions, b.budget),
            (b.failures + b.floor_failures).to_string(),
            "0",
            b.failures + b.floor_failures == 0,
        );
    }
    for m in &r.memory {
        if let Some(t) = m.target_mb {
            let relist = m.what.starts_with("forced relist");
            let v = if relist { m.peak_mb } else { m.rss_mb };
            add(
                format!(
                    "memory, {} ({} sessions){}",
                    m.what,
                    m.sessions,
                    if relist { ", peak" } else { "" }
                ),
                format!("{v:.1} MB"),
                &if relist {
                    format!("<= 2x steady = {t:.1} MB")
                } else {
                    format!("<= {t:.1} MB")
                },
                v <= t,
            );
        }
    }
    for cpu in r.cpu.iter().filter(|c| c.what.starts_with("idle")) {
        add(
            format!("CPU, {}", cpu.what),
            format!("{:.2} ms/s", cpu.value),
            "~0 (<= 1 ms/s)",
            cpu.value <= 1.0,
        );
    }
    c
}

/// `--resync-seconds`: what the operator's `--resync` accepts, refused here rather than by an
/// operator that would not start.
fn resync_seconds(s: &str) -> Result<u64, String> {
    let n: u64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    crate::controller::check_resync(Duration::from_secs(n)).map(|d| d.as_secs())
}

/// `s` seconds as the operator's flags write a duration: `1h`, `5m`, `90s`.
fn human_secs(s: u64) -> String {
    match s {
        0 => "0".into(),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_flags_write_them() {
        assert_eq!(human_secs(3600), "1h");
        assert_eq!(human_secs(7200), "2h");
        assert_eq!(human_secs(300), "5m");
        assert_eq!(human_secs(90), "90s");
        assert_eq!(human_secs(0), "0");
        assert_eq!(resync_seconds("0"), Ok(0));
        assert_eq!(resync_seconds("60"), Ok(60));
        assert!(resync_seconds("30").unwrap_err().contains("at least 60"));
        assert!(resync_seconds("soon").is_err());
    }

    #[test]
    fn budgets_parse() {
        assert_eq!("unlimited".parse::<Budget>(), Ok(Budget::UNLIMITED));
        assert_eq!(
            "20/40".parse::<Budget>(),
            Ok(Budget {
                qps: 20.0,
                burst: 40
            })
        );
        assert!("20".parse::<Budget>().is_err());
        assert_eq!(Budget::UNLIMITED.to_string(), "unlimited");
        assert_eq!(
            Budget {
                qps: 20.0,
                burst: 40
            }
            .to_string(),
            "20 qps, burst 40"
        );
    }
}
