//! The operator's HTTP endpoints: `/metrics`, `/healthz` (the process serves) and `/readyz`
//! (every cache has synced, and this replica leads or is allowed to run).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// Shared state of the endpoints.
#[derive(Clone)]
pub struct HttpState {
    /// Metrics to encode.
    pub metrics: Arc<Metrics>,
    /// Set once every reflector store has synced.
    pub ready: Arc<AtomicBool>,
}

async fn metrics(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(s): State<HttpState>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "caches not synced")
    }
}

/// The router.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves on `listener` until `shutdown` resolves. Bind first (with
/// [`tokio::net::TcpListener::bind`]) so that a port in use stops the process at startup.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: HttpState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// A minimal HTTP/1.0 GET of `path` on `addr`: the status code and the body. For probes of the
/// operator's own endpoints (the local demo, tests); not a general HTTP client.
pub async fn probe(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn endpoints_answer_and_readyz_follows_the_flag() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        drop(metrics.reconcile_timer("Session"));
        let state = HttpState {
            metrics,
            ready: Arc::new(AtomicBool::new(false)),
        };
        let ready = state.ready.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, state, async {
            let _ = rx.await;
        }));
        assert_eq!(probe(addr, "/healthz").await.unwrap(), (200, "ok".into()));
        assert_eq!(probe(addr, "/readyz").await.unwrap().0, 503);
        ready.store(true, Ordering::Relaxed);
        assert_eq!(probe(addr, "/readyz").await.unwrap().0, 200);
        let (code, body) = probe(addr, "/metrics").await.unwrap();
        assert_eq!(code, 200);
        assert!(
            body.contains("cubicle_reconcile_total{kind=\"Session\"} 1"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert_eq!(probe(addr, "/nope").await.unwrap().0, 404);
        let _ = tx.send(());
        server.await.unwrap().unwrap();
    }
}
