//! The benchmark's results, their targets, and the plain-text table.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::sys::Machine;

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// `release` or `debug` (of the operator binary measured).
    pub build: String,
    /// The local control plane as configured for the run.
    pub control_plane: String,
    /// The run's parameters.
    pub settings: Settings,
    /// API requests per launch, per quiet period and per resync.
    pub launch: LaunchCost,
    /// Burst convergence against the floor.
    pub bursts: Vec<Burst>,
    /// Controller memory.
    pub memory: Vec<MemoryRow>,
    /// Controller CPU.
    pub cpu: Vec<CpuRow>,
    /// Each target, met or missed.
    pub checks: Vec<Check>,
    /// Remarks on how a figure was obtained.
    pub notes: Vec<String>,
    /// Wall time of the whole run, seconds.
    pub duration_s: f64,
    /// `/proc/loadavg` (1, 5 and 15 minutes) when the run started and when it ended: other
    /// work on the machine shows here.
    pub load_average: [String; 2],
}

/// The run's parameters.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Settings {
    /// Burst sizes.
    pub sessions: Vec<usize>,
    /// Operator API budgets, as printed.
    pub budgets: Vec<String>,
    /// Operator reconcile concurrency, and the floor client's.
    pub concurrency: u16,
    /// Repetitions of each burst (medians reported).
    pub repeat: usize,
    /// Users probed for the launch cost (medians reported).
    pub probes: usize,
    /// Length of each quiet period, seconds.
    pub quiet_s: f64,
    /// Fake nodes.
    pub nodes: usize,
    /// The CI variant.
    pub quick: bool,
}

/// API requests of the operator, split as the targets need them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Requests {
    /// Writes (create, patch, update, delete) of the launch's own objects: profile claims,
    /// pods, sessions and their status. The launch floor: 3, then 2.
    pub launch_writes: f64,
    /// Of `launch_writes`, the creates the API server refused because the object already
    /// existed (409): duplicate work. From the API server's own metrics (`POST` of pods and
    /// claims answered 409 while only the operator creates them).
    pub refused_creates: f64,
    /// Other writes, Events aside (the User status, ...).
    pub other_writes: f64,
    /// Event writes.
    pub events: f64,
    /// Uncached reads of one object.
    pub gets: f64,
    /// Lists.
    pub lists: f64,
    /// Watches.
    pub watches: f64,
    /// Every request, by `"verb resource"`.
    pub by_request: BTreeMap<String, f64>,
}

/// The objects a launch itself writes.
pub const LAUNCH_RESOURCES: &[&str] = &[
    "persistentvolumeclaims",
    "pods",
    "sessions",
    "sessions/status",
];

impl Requests {
    /// Every write, Events included.
    pub fn all_writes(&self) -> f64 {
        self.launch_writes + self.other_writes + self.events
    }

    /// Classifies a `"verb resource"` map, dividing each count by `per`.
    pub fn from_counts(counts: &BTreeMap<String, f64>, per: f64) -> Self {
        let mut r = Requests::default();
        let per = if per > 0.0 { per } else { 1.0 };
        for (key, v) in counts {
            let v = v / per;
            let (verb, resource) = key.split_once(' ').unwrap_or((key.as_str(), ""));
            match verb {
                "get" => r.gets += v,
                "list" => r.lists += v,
                "watch" => r.watches += v,
                _ if resource == "events" => r.events += v,
                _ if LAUNCH_RESOURCES.contains(&resource) => r.launch_writes += v,
                _ => r.other_writes += v,
            }
            r.by_request.insert(key.clone(), v);
        }
        r
    }

    /// The median of each figure over `runs`.
    pub fn median(runs: &[Requests]) -> Self {
        let keys: std::collections::BTreeSet<&String> =
            runs.iter().flat_map(|r| r.by_request.keys()).collect();
        let pick = |f: &dyn Fn(&Requests) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        Requests {
            launch_writes: pick(&|r| r.launch_writes),
            refused_creates: pick(&|r| r.refused_creates),
            other_writes: pick(&|r| r.other_writes),
            events: pick(&|r| r.events),
            gets: pick(&|r| r.gets),
            lists: pick(&|r| r.lists),
            watches: pick(&|r| r.watches),
            by_request: keys
                .into_iter()
                .map(|k| {
                    let v = pick(&|r| r.by_request.get(k).copied().unwrap_or_default());
                    (k.clone(), v)
                })
                .filter(|(_, v)| *v != 0.0)
                .collect(),
        }
    }

    fn writes_list(&self) -> String {
        let list: Vec<String> = self
            .by_request
            .iter()
            .filter(|(k, _)| !k.starts_with("get ") && !k.starts_with("list "))
            .filter(|(k, _)| !k.starts_with("watch "))
            .map(|(k, v)| format!("{k} {}", num(*v)))
            .collect();
        if list.is_empty() {
            "-".into()
        } else {
            list.join(", ")
        }
    }
}

/// The median of `xs` (0 when empty).
pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Launch cost, quiet periods and resyncs.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LaunchCost {
    /// How many users were probed.
    pub samples: usize,
    /// A user's first session (median).
    pub first: Requests,
    /// The same user's second session (median).
    pub later: Requests,
    /// Quiet periods with every session Running.
    pub quiet: Vec<Quiet>,
    /// Full resyncs: a restarted operator re-lists and reconciles every session.
    pub resync: Vec<Resync>,
}

/// A quiet period.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Quiet {
    /// Sessions Running throughout.
    pub sessions: usize,
    /// Length, seconds.
    pub seconds: f64,
    /// The operator's requests during it.
    pub requests: Requests,
}

/// A resync of every session.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Resync {
    /// Sessions reconciled.
    pub sessions: usize,
    /// From process start until every session was reconciled and the operator was quiet, s.
    pub seconds: f64,
    /// CPU of the restarted operator over those seconds, ms: an upper bound of a resync's (it
    /// also parsed every object of its lists).
    pub cpu_ms: f64,
    /// All requests of the restarted operator (lists and watches included).
    pub requests: Requests,
    /// Writes per session (target 0).
    pub writes_per_session: f64,
}

/// One burst size at one API budget.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Burst {
    /// Sessions created at once.
    pub sessions: usize,
    /// The operator's API budget.
    pub budget: String,
    /// Whether the budget is the one compared with the floor (the floor's client has none).
    pub compared: bool,
    /// Repetitions (figures are medians).
    pub runs: usize,
    /// The floor: a plain client creating the same claims and pods, until all pods Running, s.
    pub floor_s: f64,
    /// The operator: sessions created until all Running, s.
    pub operator_s: f64,
    /// `operator_s / floor_s`.
    pub ratio: f64,
    /// Sessions that did not reach Running (all runs).
    pub failures: usize,
    /// Floor items that did not reach Running (all runs).
    pub floor_failures: usize,
    /// Failed reconciles, retried (all runs).
    pub reconcile_errors: f64,
    /// The operator's highest API request rate over one second, requests/s.
    pub peak_rps: f64,
    /// The floor client's highest request rate over one second, requests/s.
    pub floor_peak_rps: f64,
    /// Operator CPU per launch, ms.
    pub cpu_ms_per_launch: f64,
    /// The operator's requests per launch during the burst.
    pub per_launch: Requests,
    /// Seconds from the first create until: every pod existed, every pod ran, every session ran.
    pub phases: BTreeMap<String, f64>,
    /// Seconds from the first create until: every floor item was created, every floor pod ran.
    pub floor_phases: BTreeMap<String, f64>,
    /// CPU seconds by process during the operator's burst.
    pub cpu_s: BTreeMap<String, f64>,
    /// CPU seconds by process during the floor's burst.
    pub floor_cpu_s: BTreeMap<String, f64>,
    /// Error responses of the API server during the operator's burst, every client counted,
    /// by `"VERB resource code"`.
    pub api_errors: BTreeMap<String, f64>,
    /// The same during the floor's burst.
    pub floor_api_errors: BTreeMap<String, f64>,
    /// Seconds the API server spent on requests during the operator's burst, every client
    /// counted, by `"VERB resource"` (watches left out).
    pub api_seconds: BTreeMap<String, f64>,
    /// The same during the floor's burst.
    pub floor_api_seconds: BTreeMap<String, f64>,
    /// Watch events the API server sent during the operator's burst (every watcher), by
    /// resource.
    pub watch_events: BTreeMap<String, f64>,
    /// The same during the floor's burst.
    pub floor_watch_events: BTreeMap<String, f64>,
    /// From each pod Running (Ready) to its Session's status Running, as the bench's watches
    /// saw them: p50 / p99 / max over the burst's sessions, ms (median of the runs).
    pub status_lag_ms: super::expiry::Stats,
}

/// A memory reading of the operator.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemoryRow {
    /// What state the operator was in.
    pub what: String,
    /// Sessions in its namespace.
    pub sessions: usize,
    /// `VmRSS`, MB (10^6 bytes).
    pub rss_mb: f64,
    /// Of `rss_mb`, the anonymous memory (`RssAnon`: heap and stacks), MB.
    pub anon_mb: f64,
    /// `VmHWM` (peak since the process started), MB.
    pub peak_mb: f64,
    /// The target this row is held to, MB (RSS for steady rows, peak for relist rows).
    pub target_mb: Option<f64>,
    /// What the operator cached then, by kind.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub cache: BTreeMap<String, CacheEntry>,
}

/// Objects of one kind in the operator's caches.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheEntry {
    /// How many.
    pub objects: usize,
    /// Their JSON size as cached (trimmed as the operator's watches trim them), MB.
    pub json_mb: f64,
}

/// A CPU reading of the operator.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CpuRow {
    /// What was measured.
    pub what: String,
    /// The figure.
    pub value: f64,
    /// Its unit.
    pub unit: String,
}

/// One target.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Check {
    /// What is held to a target.
    pub what: String,
    /// What was measured.
    pub measured: String,
    /// The target.
    pub target: String,
    /// Met.
    pub ok: bool,
}

/// Memory target: 30 MB plus 10 MB per 1,000 sessions.
pub fn memory_target_mb(sessions: usize) -> f64 {
    30.0 + 10.0 * sessions as f64 / 1000.0
}

/// A number without needless decimals; a small one that is not whole never reads as whole
/// (3.001 writes per session, one extra in a burst of 1,000, is not shown as 3.00).
pub fn num(x: f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{}", x.round() as i64)
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        (2..=4)
            .map(|d| format!("{x:.d$}"))
            .find(|s| s.parse::<f64>().is_ok_and(|v| v != x.round()))
            .unwrap_or_else(|| format!("{x:.4}"))
    }
}

/// A header line: each cell padded to its width (negative: left-aligned), as the rows are.
fn cols(cells: &[(&str, isize)]) -> String {
    let mut s = String::from(" ");
    for (text, w) in cells {
        let width = w.unsigned_abs();
        if *w < 0 {
            let _ = write!(s, " {text:<width$}");
        } else {
            let _ = write!(s, " {text:>width$}");
        }
    }
    s.trim_end().to_string()
}

fn secs_list(m: &BTreeMap<String, f64>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k} {v:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn cpu_list(m: &BTreeMap<String, f64>) -> String {
    let mut v: Vec<(&String, &f64)> = m.iter().collect();
    v.sort_by(|a, b| b.1.total_cmp(a.1));
    v.iter()
        .map(|(k, s)| format!("{k} {s:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Report {
    /// The plain-text table.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let m = &self.machine;
        let _ = writeln!(
            o,
            "cubicle bench: {} cores, {}, {:.1} GiB RAM, Linux {}; {} build; {:.0} s",
            m.cores, m.cpu_model, m.memory_gib, m.kernel, self.build, self.duration_s
        );
        let _ = writeln!(
            o,
            "load average at the start: {}; at the end: {}",
            self.load_average[0], self.load_average[1]
        );
        let _ = writeln!(o, "control plane: {}", self.control_plane);
        let s = &self.settings;
        let _ = writeln!(
            o,
            "operator: `cubicle run` child process, --concurrency {}; floor: plain kube-rs client, {} in flight",
            s.concurrency, s.concurrency
        );
        let _ = writeln!(o);

        let l = &self.launch;
        let _ = writeln!(
            o,
            "API requests per launch (median of {} users). launch: writes of the claim, pod and \
             session; dup: of those, creates refused as already existing (409); other: writes of \
             anything else but Events",
            l.samples
        );
        let _ = writeln!(
            o,
            "{}",
            cols(&[
                ("", -44),
                ("launch", 6),
                ("target", 6),
                ("dup", 4),
                ("other", 5),
                ("events", 6),
                ("get", 4),
                ("list", 5),
                ("watch", 5),
                (" writes by verb and resource", 0),
            ])
        );
        let row = |o: &mut String, label: String, r: &Requests, target: &str| {
            let flag = if r.gets > 0.0 { "  ! uncached get" } else { "" };
            let _ = writeln!(
                o,
                "  {:<44} {:>6} {:>6} {:>4} {:>5} {:>6} {:>4} {:>5} {:>5}  {}{}",
                label,
                num(r.launch_writes),
                target,
                num(r.refused_creates),
                num(r.other_writes),
                num(r.events),
                num(r.gets),
                num(r.lists),
                num(r.watches),
                r.writes_list(),
                flag
            );
        };
        row(&mut o, "first session of a user".into(), &l.first, "3");
        row(
            &mut o,
            "later session of the same user".into(),
            &l.later,
            "2",
        );
        for b in &self.bursts {
            row(
                &mut o,
                format!("burst of {}, {}, per session", b.sessions, b.budget),
                &b.per_launch,
                "3",
            );
        }
        for q in &l.quiet {
            row(
                &mut o,
                format!("quiet {:.0} s, {} sessions Running", q.seconds, q.sessions),
                &q.requests,
                "0",
            );
        }
        for r in &l.resync {
            row(
                &mut o,
                format!("resync (restart), {} sessions, total", r.sessions),
                &r.requests,
                "0",
            );
        }
        let _ = writeln!(o);

        let _ = writeln!(
            o,
            "Burst convergence: N sessions at once until all Running (median of {})",
            s.repeat
        );
        let _ = writeln!(
            o,
            "{}",
            cols(&[
                ("N", 6),
                ("operator API budget", -22),
                ("floor s", 8),
                ("operator s", 10),
                ("ratio", 6),
                ("target", 6),
                ("failures", 8),
                ("peak rq/s", 9),
                ("floor rq/s", 10),
                ("CPU ms/ses", 10),
            ])
        );
        for b in &self.bursts {
            let _ = writeln!(
                o,
                "  {:>6} {:<22} {:>8.1} {:>10.1} {:>6.2} {:>6} {:>8} {:>9.0} {:>10.0} {:>10.2}",
                b.sessions,
                b.budget,
                b.floor_s,
                b.operator_s,
                b.ratio,
                if b.compared { "<=1.2" } else { "-" },
                b.failures + b.floor_failures,
                b.peak_rps,
                b.floor_peak_rps,
                b.cpu_ms_per_launch
            );
        }
        for b in &self.bursts {
            let _ = writeln!(
                o,
                "  N={} {}: status after the pod ran p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                b.sessions, b.budget, b.status_lag_ms.p50, b.status_lag_ms.p99, b.status_lag_ms.max
            );
        }
        for b in &self.bursts {
            let _ = writeln!(
                o,
                "  N={} {}: floor reached {}; operator reached {}",
                b.sessions,
                b.budget,
                secs_list(&b.floor_phases),
                secs_list(&b.phases)
            );
            let _ = writeln!(
                o,
                "    CPU s during the floor: {}; during the operator: {}",
                cpu_list(&b.floor_cpu_s),
                cpu_list(&b.cpu_s)
            );
            let errors = |m: &BTreeMap<String, f64>| {
                if m.is_empty() {
                    "none".to_string()
                } else {
                    m.iter()
                        .map(|(k, v)| format!("{k} x{}", num(*v)))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            };
            let _ = writeln!(
                o,
                "    API server error responses (all clients) during the floor: {}; during the \
                 operator: {}",
                errors(&b.floor_api_errors),
                errors(&b.api_errors)
            );
            // Where the API server's time went: the largest request kinds, then the rest.
            let top = |m: &BTreeMap<String, f64>, digits: usize| {
                let total: f64 = m.values().sum();
                let mut v: Vec<(&String, &f64)> = m.iter().collect();
                v.sort_by(|a, b| b.1.total_cmp(a.1).then(a.0.cmp(b.0)));
                let shown: Vec<String> = v
                    .iter()
                    .take(6)
                    .map(|(k, x)| format!("{k} {:.digits$}", x))
                    .collect();
                let rest: f64 = v.iter().skip(6).map(|(_, x)| **x).sum();
                format!(
                    "{:.digits$} in all: {}{}",
                    total,
                    shown.join(", "),
                    if v.len() > 6 {
                        format!(", others {rest:.digits$}")
                    } else {
                        String::new()
                    }
                )
            };
            let _ = writeln!(
                o,
                "    API server request seconds (all clients, watches left out) during the \
                 floor: {}; during the operator: {}",
                top(&b.floor_api_seconds, 1),
                top(&b.api_seconds, 1)
            );
            let _ = writeln!(
                o,
                "    API server watch events sent (all watchers) during the floor: {}; during \
                 the operator: {}",
                top(&b.floor_watch_events, 0),
                top(&b.watch_events, 0)
            );
            if b.reconcile_errors > 0.0 {
                let _ = writeln!(
                    o,
                    "    {} failed reconciles (retried)",
                    num(b.reconcile_errors)
                );
            }
        }
        let _ = writeln!(o);

        let _ = writeln!(o, "Controller memory (MB = 10^6 bytes)");
        let _ = writeln!(
            o,
            "{}",
            cols(&[
                ("", -48),
                ("sessions", 8),
                ("RSS MB", 7),
                ("anon MB", 8),
                ("peak MB", 8),
                ("target MB", 10),
            ])
        );
        for r in &self.memory {
            let _ = writeln!(
                o,
                "  {:<48} {:>8} {:>7.1} {:>8.1} {:>8.1} {:>10}",
                r.what,
                r.sessions,
                r.rss_mb,
                r.anon_mb,
                r.peak_mb,
                r.target_mb.map(|t| format!("{t:.1}")).unwrap_or("-".into())
            );
            if !r.cache.is_empty() {
                let list: Vec<String> = r
                    .cache
                    .iter()
                    .map(|(k, e)| format!("{k} {} ({:.2} MB)", e.objects, e.json_mb))
                    .collect();
                let _ = writeln!(o, "    cached then, as JSON: {}", list.join(", "));
            }
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "Controller CPU");
        for c in &self.cpu {
            let _ = writeln!(o, "  {:<48} {:>8.2} {}", c.what, c.value, c.unit);
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "Targets");
        for c in &self.checks {
            let _ = writeln!(
                o,
                "  {:<4} {:<52} {} (target {})",
                if c.ok { "ok" } else { "MISS" },
                c.what,
                c.measured,
                c.target
            );
        }
        if !self.notes.is_empty() {
            let _ = writeln!(o);
            for n in &self.notes {
                let _ = writeln!(o, "note: {n}");
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_that_are_not_whole_never_read_as_whole() {
        assert_eq!(num(3.0), "3");
        assert_eq!(num(3.001), "3.001");
        assert_eq!(num(2.9999), "2.9999");
        assert_eq!(num(1.5), "1.50");
        assert_eq!(num(0.004), "0.004");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(1234.5), "1234");
    }

    #[test]
    fn requests_are_split_into_writes_events_and_reads() {
        let counts: BTreeMap<String, f64> = [
            ("create pods", 4.0),
            ("create persistentvolumeclaims", 2.0),
            ("patch sessions/status", 4.0),
            ("create events", 4.0),
            ("patch users/status", 2.0),
            ("get pods", 2.0),
            ("list sessions", 2.0),
            ("watch sessions", 2.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let r = Requests::from_counts(&counts, 2.0);
        assert_eq!(r.launch_writes, 5.0);
        assert_eq!(r.other_writes, 1.0);
        assert_eq!(r.events, 2.0);
        assert_eq!(r.all_writes(), 8.0);
        assert_eq!((r.gets, r.lists, r.watches), (1.0, 1.0, 1.0));
        assert_eq!(r.by_request.get("create pods"), Some(&2.0));
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        let a = Requests::from_counts(&[("create pods".to_string(), 1.0)].into(), 1.0);
        let b = Requests::from_counts(&[("create pods".to_string(), 3.0)].into(), 1.0);
        let c = Requests::from_counts(&[("create pods".to_string(), 2.0)].into(), 1.0);
        assert_eq!(Requests::median(&[a, b, c]).launch_writes, 2.0);
    }
}
