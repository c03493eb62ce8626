//! Runs the operator's controllers in-process against the shared control plane, scoped to one
//! test namespace, with a request counter on its client.

#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use cubicle::apicount::ApiCounter;
use cubicle::client::{self, ApiBudget};
use cubicle::controller::{self, OperatorConfig};
use cubicle::metrics::Metrics;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::oneshot;

use crate::support;

/// A running operator; stops when dropped.
pub struct Operator {
    /// Every API request the operator made.
    pub counter: ApiCounter,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), String>>>,
}

impl Operator {
    /// Starts every controller for `namespace`.
    pub async fn start(namespace: &str) -> Self {
        Self::start_with(namespace, |_| {}).await
    }

    /// Starts every controller for `namespace`, with `configure` applied to its configuration.
    pub async fn start_with(namespace: &str, configure: impl FnOnce(&mut OperatorConfig)) -> Self {
        // Operator logs go to the test output (shown for failing tests); RUST_LOG filters them.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info,kube=warn".into()),
            )
            .with_test_writer()
            .try_init();
        let kc = Kubeconfig::read_from(support::kubeconfig()).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("config");
        let counter = ApiCounter::default();
        let client = client::build(config, counter.clone(), ApiBudget::UNLIMITED).expect("client");
        let metrics = Arc::new(Metrics::default());
        let mut cfg = OperatorConfig {
            namespaces: vec![namespace.to_string()],
            identity: format!("e2e-{namespace}"),
            ..OperatorConfig::default()
        };
        configure(&mut cfg);
        let (tx, rx) = oneshot::channel::<()>();
        let ready = Arc::new(AtomicBool::new(false));
        let m = metrics.clone();
        let task = tokio::spawn(async move {
            controller::run(client, cfg, m, controller::ALL, ready, None, async {
                let _ = rx.await;
            })
            .await
        });
        Self {
            counter,
            metrics,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Stops the operator and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}
