//! Prometheus metrics (`prometheus-client`). Labels are bounded: kinds, error categories,
//! phases, verbs and resources; never object names.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use kube::runtime::reflector::Store;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::apicount::{ApiCounter, RequestKey};
use crate::crd::v1alpha1::{Session, SessionPhase};

/// `kind` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// The reconciled kind.
    pub kind: &'static str,
}

/// `kind` + `category` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The reconciled kind.
    pub kind: &'static str,
    /// The error category (bounded set).
    pub category: &'static str,
}

/// `phase` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// Session phase.
    pub phase: &'static str,
}

/// `verb` + `resource` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// API verb.
    pub verb: &'static str,
    /// Resource (bounded: the kinds the operator touches).
    pub resource: String,
}

/// `action` label for expiry.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    /// delete, stop or pause.
    pub action: &'static str,
}

/// All of the operator's metrics.
pub struct Metrics {
    /// The registry `/metrics` encodes.
    pub registry: Registry,
    /// Reconciles started, by kind.
    pub reconciles: Family<KindLabel, Counter>,
    /// Failed reconciles, by kind and error category.
    pub errors: Family<ErrorLabels, Counter>,
    /// Reconcile durations, by kind.
    pub duration: Family<KindLabel, Histogram>,
    /// Sessions by phase.
    pub sessions: Family<PhaseLabel, Gauge>,
    /// Objects waiting for a reconcile (triggered, not yet handed to a worker), by kind.
    pub queued: Family<KindLabel, Gauge>,
    /// How late an expiry action started after its deadline, in seconds.
    pub expiry_lateness: Family<ActionLabel, Histogram>,
    /// API requests made, by verb and resource.
    pub api_requests: Family<RequestLabels, Counter>,
    /// The session caches `sessions` is counted from at each scrape.
    session_stores: Mutex<Vec<Store<Session>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("cubicle");
        let reconciles = Family::<KindLabel, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0])
        });
        let sessions = Family::<PhaseLabel, Gauge>::default();
        let queued = Family::<KindLabel, Gauge>::default();
        let expiry_lateness = Family::<ActionLabel, Histogram>::new_with_constructor(|| {
            // 100 µs .. ~13 s
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        let api_requests = Family::<RequestLabels, Counter>::default();
        registry.register("reconcile", "Reconciles, by kind", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed reconciles, by kind and category",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration, by kind",
            duration.clone(),
        );
        registry.register("sessions", "Sessions, by phase", sessions.clone());
        registry.register(
            "reconcile_queue",
            "Objects triggered and waiting for a reconcile, by kind",
            queued.clone(),
        );
        registry.register(
            "expiry_lateness_seconds",
            "Delay between a session's deadline and the start of its expiry action",
            expiry_lateness.clone(),
        );
        registry.register(
            "api_requests",
            "Kubernetes API requests, by verb and resource",
            api_requests.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            sessions,
            queued,
            expiry_lateness,
            api_requests,
            session_stores: Mutex::default(),
        }
    }
}

/// Every phase label of `cubicle_sessions` (`None`: no phase recorded yet).
pub const PHASES: &[&str] = &[
    "None", "Pending", "Running", "Stopped", "Paused", "Expired", "Refused", "Failed",
];

fn phase_label(phase: Option<SessionPhase>) -> &'static str {
    match phase {
        None => "None",
        Some(SessionPhase::Pending) => "Pending",
        Some(SessionPhase::Running) => "Running",
        Some(SessionPhase::Stopped) => "Stopped",
        Some(SessionPhase::Paused) => "Paused",
        Some(SessionPhase::Expired) => "Expired",
        Some(SessionPhase::Refused) => "Refused",
        Some(SessionPhase::Failed) => "Failed",
    }
}

impl Metrics {
    /// An [`ApiCounter`] that feeds `cubicle_api_requests_total`.
    pub fn api_counter(self: &Arc<Self>) -> ApiCounter {
        let family = self.api_requests.clone();
        ApiCounter::with_hook(move |k: &RequestKey| {
            family
                .get_or_create(&RequestLabels {
                    verb: k.verb,
                    resource: k.resource.clone(),
                })
                .inc();
        })
    }

    /// Starts timing a reconcile of `kind`; the duration is recorded when the guard drops.
    pub fn reconcile_timer(&self, kind: &'static str) -> ReconcileTimer<'_> {
        self.reconciles.get_or_create(&KindLabel { kind }).inc();
        ReconcileTimer {
            metrics: self,
            kind,
            start: Instant::now(),
        }
    }

    /// Records a failed reconcile.
    pub fn error(&self, kind: &'static str, category: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { kind, category })
            .inc();
    }

    /// Counts the sessions of `store` in `cubicle_sessions` (at each scrape, from the cache: no
    /// API request, and never stale by more than the watch).
    pub fn observe_sessions(&self, store: Store<Session>) {
        if let Ok(mut s) = self.session_stores.lock() {
            s.push(store);
        }
    }

    fn count_sessions(&self) {
        let Ok(stores) = self.session_stores.lock() else {
            return;
        };
        if stores.is_empty() {
            return;
        }
        let mut counts: std::collections::BTreeMap<&'static str, i64> =
            PHASES.iter().map(|p| (*p, 0)).collect();
        for store in stores.iter() {
            for s in store.state() {
                *counts
                    .entry(phase_label(s.status.as_ref().and_then(|st| st.phase)))
                    .or_default() += 1;
            }
        }
        for (phase, n) in counts {
            self.sessions.get_or_create(&PhaseLabel { phase }).set(n);
        }
    }

    /// Encodes the registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        self.count_sessions();
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Records a reconcile's duration on drop.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    kind: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&KindLabel { kind: self.kind })
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_with_bounded_labels() {
        let m = Arc::new(Metrics::default());
        drop(m.reconcile_timer("Session"));
        m.error("Session", "kube");
        let text = m.encode();
        assert!(
            text.contains("cubicle_reconcile_total{kind=\"Session\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("cubicle_reconcile_errors_total{kind=\"Session\",category=\"kube\"} 1")
        );
        assert!(text.contains("cubicle_reconcile_duration_seconds_count{kind=\"Session\"} 1"));
    }

    #[test]
    fn sessions_are_counted_by_phase_from_the_caches() {
        use kube::runtime::reflector::store::Writer;
        use kube::runtime::watcher::Event;
        let m = Metrics::default();
        assert!(
            !m.encode().contains("cubicle_sessions{"),
            "no cache, no gauge"
        );
        let mut writer = Writer::<Session>::default();
        let session = |name: &str, phase: Option<&str>| -> Session {
            let mut v = serde_json::json!({
                "apiVersion": "cubicle.dev/v1alpha1", "kind": "Session",
                "metadata": {"name": name, "namespace": "ns"},
                "spec": {"user": "u", "workspace": "w"}
            });
            if let Some(p) = phase {
                v["status"] = serde_json::json!({ "phase": p });
            }
            serde_json::from_value(v).unwrap()
        };
        for s in [
            session("a", Some("Running")),
            session("b", Some("Running")),
            session("c", Some("Paused")),
            session("d", None),
        ] {
            writer.apply_watcher_event(&Event::Apply(s));
        }
        m.observe_sessions(writer.as_reader());
        let text = m.encode();
        for (phase, n) in [("Running", 2), ("Paused", 1), ("None", 1), ("Failed", 0)] {
            assert!(
                text.contains(&format!("cubicle_sessions{{phase=\"{phase}\"}} {n}\n")),
                "{phase} {n}: {text}"
            );
        }
    }
}
