//! A stand-in for KasmVNC where no container runs: it listens on the pod's IP and port, speaks
//! TLS (a self-signed certificate made at start, like KasmVNC's) or plain HTTP on the same port,
//! and refuses anything without Kasm's basic auth (`kasm_user` and the session's password).
//!
//! - `/websockify`: a WebSocket echo (what the browser client of KasmVNC opens);
//! - `/stream?bytes=N`: N bytes, streamed (throughput);
//! - `/headers`: the request's header names, one a line (what reached the desktop);
//! - anything else: a small HTML page.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::gateway::proxy::{Body, BoxError, full};

/// What a stand-in saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Requests with the right password.
    pub authorized: AtomicU64,
    /// Requests refused (no or wrong password).
    pub refused: AtomicU64,
    /// WebSocket connections open now.
    pub open_websockets: AtomicU64,
}

/// A running stand-in; dropping it stops it and closes its connections.
pub struct StandIn {
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it saw.
    pub seen: Arc<Seen>,
    stop: CancellationToken,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn tls_acceptor() -> Option<tokio_rustls::TlsAcceptor> {
    static ACCEPTOR: std::sync::OnceLock<Option<tokio_rustls::TlsAcceptor>> =
        std::sync::OnceLock::new();
    ACCEPTOR
        .get_or_init(|| {
            let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).ok()?;
            let cert = ck.cert.der().clone();
            let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .ok()?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .ok()?;
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
        })
        .clone()
}

/// Starts a stand-in on `addr` expecting `password`.
pub async fn start(addr: SocketAddr, password: &str) -> std::io::Result<StandIn> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let seen = Arc::new(Seen::default());
    let stop = CancellationToken::new();
    let expected = Arc::new(crate::credentials::basic_auth(password));
    let (s, st) = (seen.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                _ = st.cancelled() => return,
            };
            let _ = stream.set_nodelay(true);
            let (seen, stop, expected) = (s.clone(), st.clone(), expected.clone());
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                let tls = matches!(stream.peek(&mut first).await, Ok(1) if first[0] == 0x16);
                let svc = {
                    let (seen, stop) = (seen.clone(), stop.clone());
                    hyper::service::service_fn(move |req| {
                        let (seen, stop, expected) = (seen.clone(), stop.clone(), expected.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(serve(req, &expected, seen, stop))
                        }
                    })
                };
                let conn = async {
                    if tls {
                        let Some(acceptor) = tls_acceptor() else {
                            return;
                        };
                        match acceptor.accept(stream).await {
                            Ok(s) => {
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(s), svc)
                                    .with_upgrades()
                                    .await;
                            }
                            Err(e) => debug!(error = %e, "stand-in TLS handshake failed"),
                        }
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .with_upgrades()
                            .await;
                    }
                };
                tokio::select! {
                    _ = conn => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    });
    Ok(StandIn { addr, seen, stop })
}

fn serve(
    mut req: Request<Incoming>,
    expected: &str,
    seen: Arc<Seen>,
    stop: CancellationToken,
) -> Response<Body> {
    let authorized = req
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == expected.as_bytes());
    if !authorized {
        seen.refused.fetch_add(1, Ordering::Relaxed);
        return Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(header::WWW_AUTHENTICATE, "Basic realm=\"Websockify\"")
            .body(full("unauthorized"))
            .expect("static response");
    }
    seen.authorized.fetch_add(1, Ordering::Relaxed);
    match req.uri().path() {
        p if p == "/websockify" || p.ends_with("/websockify") => {
            let websocket = req
                .headers()
                .get(header::UPGRADE)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
            let key = req
                .headers()
                .get("sec-websocket-key")
                .cloned()
                .filter(|_| websocket);
            let Some(key) = key else {
                return Response::builder()
                    .status(StatusCode::BAD_REQUEST)
                    .body(full("a WebSocket is expected here"))
                    .expect("static response");
            };
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let up = match upgrade.await {
                    Ok(up) => up,
                    Err(e) => {
                        debug!(error = %e, "stand-in upgrade failed");
                        return;
                    }
                };
                let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(up),
                    Role::Server,
                    None,
                )
                .await;
                seen.open_websockets.fetch_add(1, Ordering::Relaxed);
                loop {
                    let msg = tokio::select! {
                        m = ws.next() => m,
                        _ = stop.cancelled() => None,
                    };
                    match msg {
                        Some(Ok(m)) if m.is_binary() || m.is_text() => {
                            if ws.send(m).await.is_err() {
                                break;
                            }
                        }
                        Some(Ok(m)) if m.is_close() => break,
                        Some(Ok(_)) => {}
                        other => {
                            debug!(?other, "stand-in WebSocket ended");
                            break;
                        }
                    }
                }
                seen.open_websockets.fetch_sub(1, Ordering::Relaxed);
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::CONNECTION, "upgrade")
                .header(header::UPGRADE, "websocket")
                .header("sec-websocket-accept", accept)
                .body(full(""))
                .expect("static response")
        }
        "/stream" => {
            let n: u64 = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("bytes="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures::stream::unfold(n, move |left| {
                let chunk = chunk.clone();
                async move {
                    (left > 0).then(|| {
                        let take = left.min(chunk.len() as u64);
                        (
                            Ok::<_, BoxError>(hyper::body::Frame::data(
                                chunk.slice(..take as usize),
                            )),
                            left - take,
                        )
                    })
                }
            });
            Response::builder()
                .header(header::CONTENT_LENGTH, n)
                .body(BodyExt::boxed(http_body_util::StreamBody::new(stream)))
                .expect("static response")
        }
        "/headers" => {
            let names: Vec<String> = req
                .headers()
                .iter()
                .map(|(k, v)| {
                    if k == header::AUTHORIZATION {
                        format!("{k}: (basic auth)")
                    } else {
                        format!("{k}: {}", v.to_str().unwrap_or("?"))
                    }
                })
                .collect();
            Response::new(full(names.join("\n")))
        }
        _ => Response::builder()
            .header(header::CONTENT_TYPE, "text/html")
            .body(full(
                "<!doctype html><title>KasmVNC stand-in</title><h1>KasmVNC stand-in</h1>",
            ))
            .expect("static response"),
    }
}
