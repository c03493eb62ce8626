//! Forwarding one request to a session's desktop: plain HTTP with bodies streamed both ways, or
//! a WebSocket (any HTTP/1.1 upgrade) tunnelled byte for byte. The upstream gets Kasm's basic
//! auth; the client's own credentials (the gateway's cookies, an `Authorization` header) never
//! reach it. Either way the connection is registered, so it counts as activity and the gateway
//! can close it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::WaitForCancellationFutureOwned;
use tracing::debug;

use super::conns::Guard;
use super::core::Upstream;

/// Errors of a body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The gateway's response body.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(b.into())
        .map_err(|e| match e {})
        .boxed()
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether the request asks for a protocol upgrade (a WebSocket).
pub fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The TLS client configuration for session desktops (their self-signed certificates are not
/// verified; see [`AnyCertificate`]).
pub fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let verifier = Arc::new(AnyCertificate(provider.clone()));
            Arc::new(
                rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default protocol versions")
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth(),
            )
        })
        .clone()
}

/// KasmVNC serves a self-signed certificate made when the container starts: there is nothing to
/// verify it against. The connection goes to the pod's own IP, which only the gateway may reach
/// (the chart's NetworkPolicy); the handshake's signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

async fn connect(up: &Upstream) -> Result<Box<dyn Io>, BoxError> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(up.addr))
        .await
        .map_err(|_| format!("connecting to the session at {} timed out", up.addr))??;
    tcp.set_nodelay(true)?;
    if !up.tls {
        return Ok(Box::new(tcp));
    }
    let name = rustls::pki_types::ServerName::IpAddress(up.addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(tls_config())
        .connect(name, ReadAhead::new(tcp))
        .await?;
    Ok(Box::new(tls))
}

/// How much [`ReadAhead`] reads from the socket at once.
const READ_AHEAD: usize = 64 * 1024;

/// A socket read in large reads. rustls asks its socket for 4 KiB at a time, so a 16 KiB TLS
/// record costs four or five system calls; under it, this wrapper reads up to [`READ_AHEAD`]
/// bytes in one call and serves the small reads from memory. The buffer exists only while it
/// holds bytes: an idle connection (most of a gateway's) keeps none. Writes go straight through.
pub struct ReadAhead<T> {
    io: T,
    buf: bytes::BytesMut,
}

impl<T> ReadAhead<T> {
    /// Wraps `io`.
    pub fn new(io: T) -> Self {
        ReadAhead {
            io,
            buf: bytes::BytesMut::new(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        use bytes::Buf;
        let this = self.get_mut();
        if this.buf.is_empty() {
            if out.remaining() >= READ_AHEAD {
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            let mut buf = bytes::BytesMut::with_capacity(READ_AHEAD);
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut buf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => this.buf = buf,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = out.remaining().min(this.buf.len());
        out.put_slice(&this.buf[..n]);
        this.buf.advance(n);
        if this.buf.is_empty() {
            this.buf = bytes::BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Drops the gateway's own cookies from a `Cookie` header; `None` if nothing is left.
fn foreign_cookies(v: &HeaderValue) -> Option<HeaderValue> {
    let s = v.to_str().ok()?;
    let kept: Vec<&str> = s
        .split(';')
        .map(str::trim)
        .filter(|c| {
            !c.is_empty() && !c.starts_with(super::COOKIE_PREFIX) && !c.starts_with("cubicle-")
        })
        .collect();
    (!kept.is_empty())
        .then(|| HeaderValue::from_str(&kept.join("; ")).ok())
        .flatten()
}

/// Forwards `req` to `up` with `auth` (the basic-auth header value), holding `guard` for as long
/// as the exchange (or the tunnel) lasts.
pub async fn forward(
    mut req: Request<Incoming>,
    up: &Upstream,
    auth: &str,
    strip: &[HeaderName],
    forwarded: (&str, &str, std::net::SocketAddr),
    guard: Guard,
) -> Response<Body> {
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    // Headers: hop-by-hop ones dropped (an upgrade keeps its two), credentials replaced.
    let mut headers = std::mem::take(&mut parts.headers);
    let upgrade_to = headers.get(header::UPGRADE).cloned();
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    for h in strip {
        headers.remove(h);
    }
    headers.remove(header::AUTHORIZATION);
    if let Some(c) = headers.remove(header::COOKIE)
        && let Some(kept) = foreign_cookies(&c)
    {
        headers.insert(header::COOKIE, kept);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(u) = upgrade_to {
            headers.insert(header::UPGRADE, u);
        }
    }
    if let Ok(v) = HeaderValue::from_str(auth) {
        headers.insert(header::AUTHORIZATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&up.addr.to_string()) {
        headers.insert(header::HOST, v);
    }
    let (proto, host, peer) = forwarded;
    if let Ok(v) = HeaderValue::from_str(&peer.ip().to_string()) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    if let Ok(v) = HeaderValue::from_str(proto) {
        headers.insert(HeaderName::from_static("x-forwarded-proto"), v);
    }
    if let Ok(v) = HeaderValue::from_str(host) {
        headers.insert(HeaderName::from_static("x-forwarded-host"), v);
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let path = match up.path.trim_end_matches('/') {
        "" => path.to_string(),
        prefix => format!("{prefix}{path}"),
    };
    let mut up_req = Request::builder()
        .method(parts.method.clone())
        .uri(path)
        .body(body)
        .expect("a request from valid parts");
    *up_req.headers_mut() = headers;

    let io = match connect(up).await {
        Ok(io) => io,
        Err(e) => {
            debug!(upstream = %up.addr, error = %e, "upstream unreachable");
            return super::pages::unreachable();
        }
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(io)).await {
        Ok(x) => x,
        Err(e) => {
            debug!(upstream = %up.addr, error = %e, "upstream handshake failed");
            return super::pages::unreachable();
        }
    };
    let cancel = guard.cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            r = conn.with_upgrades() => if let Err(e) = r {
                debug!(error = %e, "upstream connection ended");
            },
            _ = cancel.cancelled() => {}
        }
    });
    let mut resp = match sender.send_request(up_req).await {
        Ok(r) => r,
        Err(e) => {
            debug!(upstream = %up.addr, error = %e, "upstream request failed");
            return super::pages::unreachable();
        }
    };
    debug!(upstream = %up.addr, status = %resp.status(), upgrade, "upstream answered");
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_upgrade) = client_upgrade
    {
        let up_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let guard = guard;
            let tunnel = async {
                let (c, u) = tokio::try_join!(client_upgrade, up_upgrade)?;
                let mut c = TokioIo::new(c);
                let mut u = TokioIo::new(u);
                let n = tokio::io::copy_bidirectional(&mut c, &mut u).await?;
                Ok::<_, BoxError>(n)
            };
            tokio::select! {
                r = tunnel => debug!(result = ?r, "tunnel ended"),
                _ = guard.cancel.cancelled() => debug!("tunnel closed by the gateway"),
            }
        });
        let (parts, _) = resp.into_parts();
        return Response::from_parts(parts, full(Bytes::new()));
    }
    let (mut parts, body) = resp.into_parts();
    for h in HOP_BY_HOP {
        parts.headers.remove(h);
    }
    let cancelled = Box::pin(guard.cancel.clone().cancelled_owned());
    Response::from_parts(
        parts,
        Guarded {
            inner: body,
            cancelled,
            _guard: guard,
        }
        .boxed(),
    )
}

/// A response body that ends when the gateway closes its connection, and keeps the connection
/// registered while it streams.
struct Guarded {
    inner: Incoming,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    _guard: Guard,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err("closed by the gateway".into())));
        }
        Pin::new(&mut this.inner)
            .poll_frame(cx)
            .map_err(|e| Box::new(e) as BoxError)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, ReadBuf};

    /// A socket that hands out its bytes in the given pieces (and nothing after them: EOF).
    struct Pieces {
        data: Vec<u8>,
        at: usize,
        pieces: Vec<usize>,
        reads: usize,
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let this = self.get_mut();
            this.reads += 1;
            let piece = this
                .pieces
                .get(this.reads - 1)
                .copied()
                .unwrap_or(usize::MAX);
            let n = piece.min(out.remaining()).min(this.data.len() - this.at);
            out.put_slice(&this.data[this.at..this.at + n]);
            this.at += n;
            Poll::Ready(Ok(()))
        }
    }

    proptest! {
        /// Whatever the socket's pieces and the reader's sizes, the bytes come out whole and in
        /// order, small reads cost one socket read per [`READ_AHEAD`] bytes, and nothing is held
        /// once they are drained.
        #[test]
        fn read_ahead_hands_out_every_byte_in_order_and_keeps_nothing_when_drained(
            len in 0usize..300_000,
            pieces in proptest::collection::vec(1usize..100_000, 1..20),
            sizes in proptest::collection::vec(1usize..20_000, 1..20),
        ) {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut ra = ReadAhead::new(Pieces { data: data.clone(), at: 0, pieces, reads: 0 });
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let got = rt.block_on(async {
                let mut got = Vec::new();
                for i in 0.. {
                    let mut b = vec![0u8; sizes[i % sizes.len()]];
                    let n = ra.read(&mut b).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&b[..n]);
                }
                got
            });
            prop_assert_eq!(got, data);
            prop_assert_eq!(ra.buf.capacity(), 0);
        }
    }

    #[tokio::test]
    async fn small_reads_cost_one_socket_read_per_read_ahead() {
        let data = vec![7u8; 4 * READ_AHEAD];
        let mut ra = ReadAhead::new(Pieces {
            data,
            at: 0,
            pieces: vec![],
            reads: 0,
        });
        let mut b = [0u8; 4096];
        let mut total = 0;
        loop {
            let n = ra.read(&mut b).await.unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, 4 * READ_AHEAD);
        // Four full reads and the one that saw the end, instead of 65 at rustls' 4 KiB.
        assert_eq!(ra.io.reads, 5);
    }

    #[test]
    fn the_gateways_cookies_never_reach_the_session() {
        let v = HeaderValue::from_static(
            "__Host-cubicle-s=abc; theme=dark; __Host-cubicle-x=1; cubicle-signin=z",
        );
        assert_eq!(
            foreign_cookies(&v),
            Some(HeaderValue::from_static("theme=dark"))
        );
        let only = HeaderValue::from_static("__Host-cubicle-s=abc");
        assert_eq!(foreign_cookies(&only), None);
    }
}
