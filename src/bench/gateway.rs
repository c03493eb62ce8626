//! `cubicle bench-gateway`: the gateway measured on the local control plane, against going
//! straight to the desktop (the fake kubelet's KasmVNC stand-in) in the same run.
//!
//! The operator runs in this process; the gateway is a child process (`cubicle gateway`, in
//! trusted-header mode) so that its memory and CPU are its own.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::{BenchError, Context};
use crate::crd::v1alpha1::{KEEPALIVE_ANNOTATION, Session, SessionPhase};

/// Arguments of `cubicle bench-gateway`.
#[derive(clap::Args, Debug)]
pub struct GatewayBenchArgs {
    /// Working directory (the control plane's files, the gateway's log).
    #[arg(long, default_value = ".cubicle/bench-gateway")]
    pub dir: std::path::PathBuf,
    /// Sessions (and open WebSocket connections, one each) for the footprint.
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// WebSocket round trips measured each way.
    #[arg(long, default_value_t = 5000)]
    pub round_trips: usize,
    /// Size of the streamed body, MB.
    #[arg(long, default_value_t = 100)]
    pub stream_mb: u64,
    /// keepaliveInterval of the sessions (keepalive writes are counted over two of them).
    #[arg(long, default_value = "10")]
    pub keepalive_interval_secs: u64,
}

const NS: &str = "bench-gateway";
const KEY: &str = "cubicle-session-key";

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn connect(addr: SocketAddr, tls: bool) -> Result<Box<dyn Io>, BenchError> {
    let tcp = TcpStream::connect(addr)
        .await
        .ctx(format!("connect {addr}"))?;
    tcp.set_nodelay(true).ctx("nodelay")?;
    if !tls {
        return Ok(Box::new(tcp));
    }
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let s = tokio_rustls::TlsConnector::from(crate::gateway::proxy::tls_config())
        .connect(name, crate::gateway::proxy::ReadAhead::new(tcp))
        .await
        .ctx("TLS to the desktop")?;
    Ok(Box::new(s))
}

/// A WebSocket to `/websockify` of `host` at `addr` with `headers`.
async fn websocket(
    addr: SocketAddr,
    tls: bool,
    host: &str,
    headers: &[(&'static str, String)],
) -> Result<tokio_tungstenite::WebSocketStream<Box<dyn Io>>, BenchError> {
    let mut req = format!("ws://{host}/websockify")
        .into_client_request()
        .ctx("request")?;
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().ctx("header")?);
    }
    let io = connect(addr, tls).await?;
    let (ws, _) = tokio_tungstenite::client_async(req, io)
        .await
        .ctx(format!("WebSocket via {addr}"))?;
    Ok(ws)
}

async fn round_trips(
    ws: &mut tokio_tungstenite::WebSocketStream<Box<dyn Io>>,
    n: usize,
) -> Result<Vec<Duration>, BenchError> {
    let mut out = Vec::with_capacity(n);
    let payload = vec![7u8; 32];
    for _ in 0..n {
        let t = Instant::now();
        ws.send(Message::binary(payload.clone()))
            .await
            .ctx("send")?;
        ws.next()
            .await
            .ok_or_else(|| BenchError("closed".into()))?
            .ctx("receive")?;
        out.push(t.elapsed());
    }
    out.sort();
    Ok(out)
}

/// Stream pairs (direct, then through the gateway) measured.
const STREAM_PAIRS: usize = 9;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}

fn pct(v: &[Duration], p: f64) -> Duration {
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

async fn stream(
    addr: SocketAddr,
    tls: bool,
    host: &str,
    headers: &[(&str, String)],
    bytes: u64,
) -> Result<f64, BenchError> {
    let io = connect(addr, tls).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .ctx("handshake")?;
    tokio::spawn(conn);
    let mut req = http::Request::get(format!("/stream?bytes={bytes}")).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let t = Instant::now();
    let resp = sender
        .send_request(req.body(Empty::<Bytes>::new()).ctx("request")?)
        .await
        .ctx("stream request")?;
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.ctx("stream")?.into_data() {
            got += d.len() as u64;
        }
    }
    if got != bytes {
        return Err(BenchError(format!("streamed {got} of {bytes} bytes")));
    }
    Ok(bytes as f64 / 1e6 / t.elapsed().as_secs_f64())
}

async fn get_status(addr: SocketAddr, host: &str, user: &str) -> Option<u16> {
    let io = connect(addr, false).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = http::Request::get("/")
        .header("host", host)
        .header("x-user", user)
        .body(Empty::<Bytes>::new())
        .ok()?;
    let r = sender.send_request(req).await.ok()?;
    Some(r.status().as_u16())
}

async fn setup_tenant(client: &Client, interval: u64) -> Result<(), BenchError> {
    let docs = [
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Group", "metadata": {"name": "everyone"},
               "spec": {"priority": 100, "settings": {"keepaliveInterval": format!("{interval}s"),
                        "keepaliveExpiration": "1h"}}}),
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "User", "metadata": {"name": "alice"},
               "spec": {"groups": ["everyone"]}}),
        json!({"apiVersion": "cubicle.dev/v1alpha1", "kind": "Workspace", "metadata": {"name": super::cluster::WORKSPACE},
               "spec": {"image": "example.invalid/desktop:1", "groups": ["everyone"]}}),
    ];
    for d in docs {
        let obj: kube::api::DynamicObject = serde_json::from_value(d).ctx("object")?;
        let tm = obj.types.clone().expect("typed");
        let (g, v) = tm.api_version.split_once('/').expect("group/version");
        let gvk = kube::core::GroupVersionKind::gvk(g, v, &tm.kind);
        let ar = kube::core::ApiResource::from_gvk_with_plural(
            &gvk,
            &format!("{}s", tm.kind.to_lowercase()),
        );
        Api::<kube::api::DynamicObject>::namespaced_with(client.clone(), NS, &ar)
            .create(&PostParams::default(), &obj)
            .await
            .ctx(format!("create {}", tm.kind))?;
    }
    let role: Role = serde_json::from_value(json!({"metadata": {"name": "use-alice"},
        "rules": [{"apiGroups": ["cubicle.dev"], "resources": ["users"], "verbs": ["use"], "resourceNames": ["alice"]}]}))
    .ctx("role")?;
    Api::<Role>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &role)
        .await
        .ctx("create Role")?;
    let rb: RoleBinding = serde_json::from_value(json!({"metadata": {"name": "use-alice"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "use-alice"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "bench:alice"}]}))
    .ctx("binding")?;
    Api::<RoleBinding>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &rb)
        .await
        .ctx("create RoleBinding")?;
    Ok(())
}

fn progress(s: String) {
    eprintln!("[bench-gateway] {s}");
}

/// Runs the benchmark and prints the table.
pub async fn main(args: GatewayBenchArgs) -> std::process::ExitCode {
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cubicle bench-gateway: {}", e.0);
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: GatewayBenchArgs) -> Result<(), BenchError> {
    let dir = std::path::absolute(&args.dir).unwrap_or(args.dir.clone());
    let _ = std::fs::remove_dir_all(&dir);
    let (cluster, _opts) =
        super::cluster::start_control_plane(&dir, args.sessions + 10, progress).await?;
    let client = cluster.client.clone();
    super::cluster::install_crds(&client).await?;
    super::cluster::create_namespace(&client, NS).await?;
    let key = crate::credentials::ensure(client.clone(), NS, KEY)
        .await
        .ctx("master key")?;
    setup_tenant(&client, args.keepalive_interval_secs).await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ctx("a free port")?
        .local_addr()
        .ctx("addr")?
        .port();
    let public =
        crate::gateway::core::PublicUrl::parse(&format!("http://cubicle.localhost:{port}"))
            .map_err(BenchError)?;
    // The operator, in this process.
    let cfg = crate::controller::OperatorConfig {
        namespaces: vec![NS.into()],
        credentials: Some(key.clone()),
        gateway_url: Some(public.clone()),
        ..Default::default()
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let op_client = client.clone();
    let operator = tokio::spawn(async move {
        crate::controller::run(
            op_client,
            cfg,
            Arc::new(crate::metrics::Metrics::default()),
            crate::controller::ALL,
            Arc::new(AtomicBool::new(false)),
            None,
            async {
                let _ = stop_rx.await;
            },
        )
        .await
    });
    // The gateway, a child process.
    let log = std::fs::File::create(dir.join("gateway.log")).ctx("gateway.log")?;
    let mut gw = tokio::process::Command::new(std::env::current_exe().ctx("current exe")?)
        .args([
            "gateway",
            "--public-url",
            &public.portal(),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--namespace",
            NS,
            "--trusted-user-header",
            "x-user",
        ])
        .args([
            "--username-prefix",
            "bench:",
            "--key-secret",
            &format!("{NS}/{KEY}"),
            "--exit-on-stdin-eof",
        ])
        .env("KUBECONFIG", &cluster.ready.kubeconfig)
        .env(
            "RUST_LOG",
            std::env::var("CUBICLE_BENCH_GATEWAY_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::piped())
        .stdout(log.try_clone().ctx("log")?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .ctx("start the gateway")?;
    let gw_pid = gw.id().unwrap_or_default();
    let gw_addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let user = [("x-user", "alice".to_string())];

    // 1. From Running to the URL answering.
    let sessions: Api<Session> = Api::namespaced(client.clone(), NS);
    // Let the gateway's caches sync first (it answers 503 until then).
    let warm = Instant::now();
    while get_status(gw_addr, &format!("cubicle.localhost:{port}"), "alice").await != Some(200) {
        if warm.elapsed() > Duration::from_secs(60) {
            return Err(BenchError("the gateway did not come up".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress("gateway up; launching the first session".into());
    sessions
        .create(
            &PostParams::default(),
            &super::cluster::session("s0", "alice"),
        )
        .await
        .ctx("create s0")?;
    let mut ready_to_url = Vec::new();
    let s0 = loop {
        let s = sessions.get("s0").await.ctx("get s0")?;
        if s.status.as_ref().and_then(|st| st.phase) == Some(SessionPhase::Running) {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let running_at = Instant::now();
    let host0 = public.session_authority(&s0.uid().unwrap_or_default());
    while get_status(gw_addr, &host0, "alice").await != Some(200) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    ready_to_url.push(running_at.elapsed());

    // 2. WebSocket round trips, through the gateway and direct, in the same run.
    let pod = Api::<Pod>::namespaced(client.clone(), NS)
        .get("s0")
        .await
        .ctx("pod s0")?;
    let ip = pod
        .status
        .and_then(|s| s.pod_ip)
        .ok_or_else(|| BenchError("no pod IP".into()))?;
    let direct: SocketAddr = format!("{ip}:6901").parse().ctx("pod address")?;
    let auth = [(
        "authorization",
        crate::credentials::basic_auth(&key.session_password(&s0.uid().unwrap_or_default())),
    )];
    progress(format!(
        "{} WebSocket round trips each way",
        args.round_trips
    ));
    let mut via = websocket(gw_addr, false, &host0, &user).await?;
    let mut dir_ws = websocket(direct, true, &ip, &auth).await?;
    round_trips(&mut via, 200).await?;
    round_trips(&mut dir_ws, 200).await?;
    let rt_via = round_trips(&mut via, args.round_trips).await?;
    let rt_direct = round_trips(&mut dir_ws, args.round_trips).await?;
    drop((via, dir_ws));

    // 3. A large stream, through the gateway and direct.
    let bytes = args.stream_mb * 1_000_000;
    progress(format!("streaming {} MB each way", args.stream_mb));
    // A 100 MB stream takes tens of milliseconds here, so one pair says little: pairs taken in
    // turn, medians of each side and of the pairs' ratios, and the gateway's CPU per GB.
    let (mut tp_via, mut tp_direct, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut stream_cpu = Duration::ZERO;
    stream(gw_addr, false, &host0, &user, bytes).await?;
    for _ in 0..STREAM_PAIRS {
        let d = stream(direct, true, &ip, &auth, bytes).await?;
        let cpu0 = super::sys::cpu_time(gw_pid).unwrap_or_default();
        let v = stream(gw_addr, false, &host0, &user, bytes).await?;
        stream_cpu += super::sys::cpu_time(gw_pid)
            .unwrap_or_default()
            .saturating_sub(cpu0);
        tp_direct.push(d);
        tp_via.push(v);
        ratios.push(v / d);
    }
    let cpu_per_gb = stream_cpu.as_secs_f64() * 1e3 / (bytes as f64 * STREAM_PAIRS as f64 / 1e9);

    // 4. N sessions, one open connection each: the gateway's memory, idle CPU, keepalive writes.
    progress(format!("launching {} more sessions", args.sessions - 1));
    let names: Vec<(String, String)> = (1..args.sessions)
        .map(|i| (format!("s{i}"), "alice".to_string()))
        .collect();
    let failed = super::cluster::create_sessions(&client, NS, names).await;
    if failed > 0 {
        return Err(BenchError(format!("{failed} sessions not created")));
    }
    let start = Instant::now();
    let all = loop {
        let list = sessions
            .list(&Default::default())
            .await
            .ctx("list sessions")?;
        let running = list
            .items
            .iter()
            .filter(|s| s.status.as_ref().and_then(|st| st.phase) == Some(SessionPhase::Running))
            .count();
        if running == args.sessions {
            break list.items;
        }
        if start.elapsed() > Duration::from_secs(600) {
            return Err(BenchError(format!(
                "{running} of {} sessions Running after 600 s",
                args.sessions
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    progress(format!(
        "{} sessions Running in {:.1} s; opening one WebSocket each",
        all.len(),
        start.elapsed().as_secs_f64()
    ));
    let rss_before = super::sys::memory(gw_pid)
        .map(|m| m.rss_mib())
        .unwrap_or_default();
    let mut conns = Vec::with_capacity(all.len());
    for s in &all {
        let host = public.session_authority(&s.uid().unwrap_or_default());
        conns.push(websocket(gw_addr, false, &host, &user).await?);
    }
    // Settle one interval (every session's first keepalive), then count over two.
    let interval = Duration::from_secs(args.keepalive_interval_secs);
    tokio::time::sleep(interval + Duration::from_secs(2)).await;
    let before_ann = sessions.list(&Default::default()).await.ctx("list")?;
    let cpu0 = super::sys::cpu_time(gw_pid).unwrap_or_default();
    let t0 = Instant::now();
    // Count keepalive annotation changes by listing twice a second (writes are an interval
    // apart, so none is missed).
    let mut last: std::collections::HashMap<String, Option<String>> = before_ann
        .items
        .iter()
        .map(|s| {
            (
                s.name_any(),
                s.annotations().get(KEEPALIVE_ANNOTATION).cloned(),
            )
        })
        .collect();
    let mut changes = 0u64;
    while t0.elapsed() < interval * 2 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for s in sessions.list(&Default::default()).await.ctx("list")?.items {
            let a = s.annotations().get(KEEPALIVE_ANNOTATION).cloned();
            if last.insert(s.name_any(), a.clone()).is_some_and(|p| p != a) {
                changes += 1;
            }
        }
    }
    let idle = t0.elapsed();
    let cpu = super::sys::cpu_time(gw_pid)
        .unwrap_or_default()
        .saturating_sub(cpu0);
    let rss = super::sys::memory(gw_pid)
        .map(|m| m.rss_mib())
        .unwrap_or_default();
    // Per interval of the window as it ran (a little over two: the last list ends after it).
    let writes_per_interval =
        changes as f64 / all.len() as f64 / (idle.as_secs_f64() / interval.as_secs_f64());
    // The same connections with no keepalive due: keepaliveInterval 50m (the gateway re-reads a
    // session's interval within 30 s), then CPU over a quiet window: what the connections
    // themselves cost, writes separated.
    progress("keepaliveInterval 50m: measuring idle CPU with no keepalive due".into());
    let groups: Api<kube::api::DynamicObject> = Api::namespaced_with(
        client.clone(),
        NS,
        &kube::core::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("cubicle.dev", "v1alpha1", "Group"),
            "groups",
        ),
    );
    groups
        .patch(
            "everyone",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"settings": {"keepaliveInterval": "50m"}}})),
        )
        .await
        .ctx("patch Group everyone")?;
    tokio::time::sleep(Duration::from_secs(35)).await;
    let quiet_before = sessions.list(&Default::default()).await.ctx("list")?;
    let cpu1 = super::sys::cpu_time(gw_pid).unwrap_or_default();
    let t1 = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let quiet = t1.elapsed();
    let quiet_cpu = super::sys::cpu_time(gw_pid)
        .unwrap_or_default()
        .saturating_sub(cpu1);
    let quiet_after = sessions.list(&Default::default()).await.ctx("list")?;
    let keepalive =
        |l: &kube::core::ObjectList<Session>| -> std::collections::HashMap<String, Option<String>> {
            l.items
                .iter()
                .map(|s| {
                    (
                        s.name_any(),
                        s.annotations().get(KEEPALIVE_ANNOTATION).cloned(),
                    )
                })
                .collect()
        };
    let (qb, qa) = (keepalive(&quiet_before), keepalive(&quiet_after));
    let quiet_writes = qa.iter().filter(|(k, v)| qb.get(*k) != Some(*v)).count();
    drop(conns);

    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let (v50, v99, d50, d99) = (
        pct(&rt_via, 0.5),
        pct(&rt_via, 0.99),
        pct(&rt_direct, 0.5),
        pct(&rt_direct, 0.99),
    );
    println!("| gateway measure | figure | target |");
    println!("|---|---|---|");
    println!(
        "| WebSocket round trip p50: via gateway / direct / added | {:.0} µs / {:.0} µs / {:.0} µs | added ≤ 50 µs |",
        us(v50),
        us(d50),
        us(v50) - us(d50)
    );
    println!(
        "| WebSocket round trip p99: via gateway / direct / added | {:.0} µs / {:.0} µs / {:.0} µs | added ≤ 1 ms |",
        us(v99),
        us(d99),
        us(v99) - us(d99)
    );
    let (ratio_lo, ratio_hi) = min_max(&ratios);
    println!(
        "| {} MB stream, median of {STREAM_PAIRS} pairs: via gateway / direct / ratio (pairs' range) | {:.0} MB/s / {:.0} MB/s / {:.2} ({:.2}-{:.2}) | ≥ 0.8 |",
        args.stream_mb,
        median(&mut tp_via),
        median(&mut tp_direct),
        median(&mut ratios),
        ratio_lo,
        ratio_hi,
    );
    println!("| gateway CPU per GB streamed through it | {cpu_per_gb:.0} ms | - |");
    println!(
        "| gateway RSS: {} open connections to {} sessions (before: {:.1} MiB) | {:.1} MiB | ≤ 64 MB |",
        all.len(),
        all.len(),
        rss_before,
        rss
    );
    println!(
        "| gateway CPU while connections idle, keepalives flowing ({:.0} s) | {:.2} % of a core | ~0 |",
        idle.as_secs_f64(),
        cpu.as_secs_f64() / idle.as_secs_f64() * 100.0
    );
    println!(
        "| gateway CPU, same connections, no keepalive due ({:.0} s, {} writes) | {:.2} % of a core | ~0 |",
        quiet.as_secs_f64(),
        quiet_writes,
        quiet_cpu.as_secs_f64() / quiet.as_secs_f64() * 100.0
    );
    println!(
        "| keepalive writes per session per interval ({} s) | {:.2} | ≤ 1 |",
        args.keepalive_interval_secs, writes_per_interval
    );
    println!(
        "| Running → URL answering (first session) | {:.0} ms | ≤ 1 s |",
        ready_to_url[0].as_secs_f64() * 1e3
    );
    println!(
        "(one run on this machine; it is shared with other builds and tests, so figures are noisy)"
    );

    drop(gw.stdin.take());
    let _ = tokio::time::timeout(Duration::from_secs(5), gw.wait()).await;
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), operator).await;
    cluster.stop().await;
    Ok(())
}
