//! `cubicle gateway`: the way from a browser to a session.
//!
//! A stateless reverse proxy (any number of replicas) that routes by host name from its own
//! caches of Sessions and their pods: the portal on the base domain, each session on an origin
//! of its own (`<session uid>.<base domain>`), so a session's web content never shares cookies
//! with the portal or another session. No Ingress or route object per session.
//!
//! Every request to a session is authorized with the rule of the Session admission policy (a
//! SubjectAccessReview for verb `use` on `users/<spec.user>`, cached briefly); a session that
//! does not exist and one the person may not use get the same 404. Open connections are the
//! session's activity: the gateway writes the `cubicle.dev/keepalive` annotation at most once
//! per `keepaliveInterval` per session, and closes a session's connections when it stops,
//! pauses, expires or is deleted, or the person loses access.

pub mod authz;
pub mod cache;
pub mod conns;
pub mod core;
pub mod dashboard;
pub mod oidc;
pub mod pages;
pub mod proxy;
pub mod settings;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use http::header::HeaderName;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::{self, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use self::core::{Access, Identity, PublicUrl, Route};
use crate::crd::v1alpha1::{KEEPALIVE_ANNOTATION, Session};
use crate::credentials::MasterKey;

/// Every cookie the gateway sets starts with this (and the proxy strips them upstream).
pub const COOKIE_PREFIX: &str = "__Host-cubicle";

/// How people are identified.
#[derive(Debug, Clone)]
pub enum AuthMode {
    /// Behind an authenticating proxy (oauth2-proxy): the proxy's headers name the person. Only
    /// that proxy may reach the gateway (a NetworkPolicy), or anyone could claim any name.
    TrustedHeader {
        /// The username header, e.g. `X-Forwarded-User` or `X-Auth-Request-User`.
        user: HeaderName,
        /// The groups header (comma-separated), e.g. `X-Forwarded-Groups`.
        groups: Option<HeaderName>,
    },
    /// OpenID Connect login on the portal, tickets into each session's origin.
    Oidc(Arc<oidc::Oidc>),
}

/// The gateway's configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The public address (scheme, base domain, port).
    pub public: PublicUrl,
    /// Namespaces whose sessions are served (empty: every namespace).
    pub namespaces: Vec<String>,
    /// How people are identified.
    pub auth: AuthMode,
    /// Prefix put before usernames, as the API server's OIDC authenticator does (e.g. `oidc:`).
    pub username_prefix: String,
    /// Prefix put before group names.
    pub groups_prefix: String,
    /// The master key (session passwords, signing).
    pub key: MasterKey,
}

/// Counters of a running gateway.
#[derive(Debug, Default)]
pub struct Stats {
    /// Keepalive annotations written.
    pub keepalive_writes: AtomicU64,
    /// Keepalive writes refused by a conflict (another replica wrote first).
    pub keepalive_conflicts: AtomicU64,
    /// Requests served.
    pub requests: AtomicU64,
}

/// State shared by every connection.
pub struct State {
    config: GatewayConfig,
    signing: crate::credentials::SigningKey,
    client: Client,
    /// The caches.
    pub cache: Arc<cache::Cache>,
    /// Open connections.
    pub registry: Arc<conns::Registry>,
    /// Authorization.
    pub authz: authz::Authorizer,
    /// Counters.
    pub stats: Stats,
    recheck: tokio::sync::Notify,
    intervals: std::sync::Mutex<
        std::collections::HashMap<conns::SessionKey, (Duration, std::time::Instant)>,
    >,
}

/// A running gateway; dropping it stops it (open connections close).
pub struct Gateway {
    /// Its state.
    pub state: Arc<State>,
    /// The address it listens on.
    pub addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // Connections' tasks are detached: close them too.
        for k in self.state.registry.sessions() {
            self.state.registry.close(&k, None);
        }
    }
}

impl Gateway {
    /// Whether its caches have synced (it serves sessions only then).
    pub fn ready(&self) -> bool {
        self.state.cache.synced()
    }
}

/// Starts a gateway on `listener`.
pub fn start(client: Client, config: GatewayConfig, listener: TcpListener) -> Gateway {
    let addr = listener.local_addr().expect("a bound listener");
    let (cache, mut tasks) = cache::start(client.clone(), &config.namespaces);
    let state = Arc::new(State {
        authz: authz::Authorizer::new(client.clone()),
        signing: config.key.signing_key(),
        config,
        client: client.clone(),
        cache,
        registry: Arc::default(),
        stats: Stats::default(),
        recheck: tokio::sync::Notify::new(),
        intervals: Default::default(),
    });
    tasks.push(tokio::spawn(accept(listener, state.clone())));
    tasks.push(tokio::spawn(sweeper(state.clone())));
    tasks.push(tokio::spawn(keepalives(state.clone())));
    tasks.push(tokio::spawn(rechecks(state.clone())));
    for t in watch_rbac(client, state.clone()) {
        tasks.push(t);
    }
    info!(%addr, public = %state.config.public.portal(), "gateway listening");
    Gateway { state, addr, tasks }
}

async fn accept(listener: TcpListener, state: Arc<State>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(state, req, peer).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await
            {
                debug!(error = %e, "client connection ended");
            }
        });
    }
}

fn host_of(req: &Request<Incoming>) -> String {
    req.headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(String::from)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default()
}

/// Answers one request.
pub async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<proxy::Body> {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    let host = host_of(&req);
    match core::route(&host, &state.config.public.domain) {
        Route::Unknown => pages::not_found(),
        Route::Portal => portal(&state, req).await,
        Route::Session(label) => session(state, req, &label, &host, peer).await,
    }
}

/// The person making `req` to origin `label` (`""`: the portal).
fn identify(state: &State, req: &Request<Incoming>, label: &str) -> Option<Identity> {
    match &state.config.auth {
        AuthMode::Oidc(o) => o.identity(req, &state.config.public, &state.signing, label),
        AuthMode::TrustedHeader { user, groups } => {
            let name = req.headers().get(user)?.to_str().ok()?.trim();
            if name.is_empty() {
                return None;
            }
            let groups = groups
                .as_ref()
                .and_then(|g| req.headers().get(g))
                .and_then(|v| v.to_str().ok())
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|g| !g.is_empty())
                        .map(|g| format!("{}{g}", state.config.groups_prefix))
                        .collect()
                })
                .unwrap_or_default();
            Some(Identity {
                username: format!("{}{name}", state.config.username_prefix),
                groups,
            })
        }
    }
}

async fn portal(state: &State, req: Request<Incoming>) -> Response<proxy::Body> {
    if let AuthMode::Oidc(o) = &state.config.auth {
        let req = &req;
        let (public, key) = (&state.config.public, &state.signing);
        match req.uri().path() {
            "/.cubicle/login" => return o.login(req, public, key).await,
            "/.cubicle/callback" => {
                return o
                    .callback(
                        req,
                        public,
                        key,
                        &state.config.username_prefix,
                        &state.config.groups_prefix,
                    )
                    .await;
            }
            "/.cubicle/go" => return o.go(req, public, key),
            _ => {}
        }
    }
    let who = identify(state, &req, "");
    let body: String = match who {
        Some(w) => return dashboard::serve(state, req, w).await,
        None if matches!(state.config.auth, AuthMode::Oidc(_)) => {
            "<p>Not signed in. <a href=\"/.cubicle/login\">Sign in</a>.</p>".into()
        }
        None => "<p>Not signed in.</p>".into(),
    };
    pages::page(StatusCode::OK, "Cubicle", &body, None)
}

fn strip_headers(state: &State) -> Vec<HeaderName> {
    match &state.config.auth {
        AuthMode::TrustedHeader { user, groups } => {
            let mut v = vec![user.clone()];
            v.extend(groups.clone());
            v
        }
        AuthMode::Oidc(_) => Vec::new(),
    }
}

async fn session(
    state: Arc<State>,
    req: Request<Incoming>,
    label: &str,
    host: &str,
    peer: SocketAddr,
) -> Response<proxy::Body> {
    if !state.cache.synced() {
        return pages::not_ready();
    }
    if let AuthMode::Oidc(o) = &state.config.auth
        && req.uri().path() == "/.cubicle/ticket"
    {
        return o.redeem(&req, &state.config.public, &state.signing, label);
    }
    let Some(who) = identify(&state, &req, label) else {
        if matches!(state.config.auth, AuthMode::Oidc(_)) {
            // Sign in on the portal, which hands a ticket back to this origin.
            return pages::redirect(&format!(
                "{}/.cubicle/go?s={label}",
                state.config.public.portal()
            ));
        }
        return pages::page(
            StatusCode::UNAUTHORIZED,
            "Not signed in",
            "<p>No identity reached the gateway.</p>",
            None,
        );
    };
    let Some(s) = state.cache.sessions.by_uid(label) else {
        return pages::not_found();
    };
    let ns = s.namespace().unwrap_or_default();
    match state.authz.may_use(&who, &ns, &s.spec.user).await {
        Ok(true) => {}
        Ok(false) => return pages::not_found(),
        Err(e) => {
            warn!(error = %e, "SubjectAccessReview failed");
            return pages::page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again",
                "<p>The gateway could not check your access.</p>",
                Some(2),
            );
        }
    }
    let pod = state.cache.pod_of(&s);
    let ws = state.cache.workspaces.get(&ns, &s.spec.workspace);
    match core::access(&s, pod.as_deref(), ws.as_deref(), Timestamp::now()) {
        Access::Proxy(up) => {
            let key = session_key(&s);
            let guard = state.registry.open(key, Arc::new(who));
            let auth = crate::credentials::basic_auth(
                &state
                    .config
                    .key
                    .session_password(s.metadata.uid.as_deref().unwrap_or_default()),
            );
            let strip = strip_headers(&state);
            proxy::forward(
                req,
                &up,
                &auth,
                &strip,
                (&state.config.public.scheme, host, peer),
                guard,
            )
            .await
        }
        Access::Pending => pages::pending(),
        Access::Stopped => {
            let allowed = resolved(&state, &s).is_some_and(|r| r.settings.allow_kasm_stop);
            pages::stopped(allowed, &ns, &s.name_any())
        }
        Access::Paused(reason) => pages::paused(&reason),
        Access::Ended(reason) => pages::ended(&reason),
    }
}

fn session_key(s: &Session) -> conns::SessionKey {
    conns::SessionKey {
        ns: s.namespace().unwrap_or_default(),
        name: s.name_any(),
        uid: s.metadata.uid.clone().unwrap_or_default(),
        user: s.spec.user.clone(),
    }
}

fn resolved(state: &State, s: &Session) -> Option<crate::resolve::Resolved> {
    let ns = s.namespace().unwrap_or_default();
    let user = state.cache.users.get(&ns, &s.spec.user)?;
    Some(crate::resolve::resolve_user(
        &state.cache.directory(&ns),
        &user,
    ))
}

/// Kasm's default `keepaliveInterval`, when the User is not in the cache.
const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(300);

fn keepalive_interval(state: &State, key: &conns::SessionKey, s: &Session) -> Duration {
    let mut m = state.intervals.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((d, at)) = m.get(key)
        && at.elapsed() < Duration::from_secs(30)
    {
        return *d;
    }
    let d = resolved(state, s)
        .map(|r| r.settings.keepalive_interval)
        .unwrap_or(DEFAULT_KEEPALIVE_INTERVAL);
    if m.len() > 100_000 {
        m.clear();
    }
    m.insert(key.clone(), (d, std::time::Instant::now()));
    d
}

/// Closes the connections of sessions that may no longer be used, whenever a Session or pod
/// changes and at each connected session's deadline. A change wakes a look at the changed
/// sessions alone (a keepalive write comes back as a Session event, so with many connected
/// sessions a scan of every one per change was most of the gateway's idle CPU); a deadline, a
/// relist and every few seconds, a look at every connected session.
async fn sweeper(state: Arc<State>) {
    let mut only: Option<std::collections::HashSet<cache::Key>> = None;
    let mut next = Timestamp::now();
    loop {
        let now = Timestamp::now();
        if only.is_none() || next <= now {
            only = None;
            next = now + jiff::SignedDuration::from_secs(5);
        }
        // Looked up by borrowed names: no allocation per connected session.
        let wanted: Option<std::collections::HashSet<(&str, &str)>> = only
            .as_ref()
            .map(|o| o.iter().map(|(ns, n)| (ns.as_str(), n.as_str())).collect());
        for key in state.registry.sessions() {
            if let Some(w) = &wanted
                && !w.contains(&(key.ns.as_str(), key.name.as_str()))
            {
                continue;
            }
            let s = state
                .cache
                .sessions
                .get(&key.ns, &key.name)
                .filter(|s| s.metadata.uid.as_deref() == Some(key.uid.as_str()));
            let verdict = match &s {
                None => Access::Ended("deleted".into()),
                Some(s) => {
                    let pod = state.cache.pod_of(s);
                    let ws = state.cache.workspaces.get(&key.ns, &s.spec.workspace);
                    core::access(s, pod.as_deref(), ws.as_deref(), now)
                }
            };
            if !verdict.connected() {
                let n = state.registry.close(&key, None);
                if n > 0 {
                    info!(session = %format!("{}/{}", key.ns, key.name), connections = n, reason = ?verdict, "closed connections");
                }
            } else if let Some(at) = s
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .and_then(|st| st.expires_at.as_ref())
            {
                next = next.min(at.0);
            }
        }
        drop(wanted);
        let wait = next
            .duration_since(Timestamp::now())
            .try_into()
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = state.cache.changed.notified() => {
                // Every keepalive write comes back as one or two Session events (the annotation,
                // then the operator's status): coalesce a burst into one sweep.
                tokio::time::sleep(SWEEP_COALESCE).await;
                let changes = state.cache.take_changes();
                only = (!changes.all).then_some(changes.keys);
            }
            _ = tokio::time::sleep(wait) => only = None,
        }
    }
}

/// How long the sweeper gathers cache changes before one sweep (well under the promised second
/// to close a connection).
const SWEEP_COALESCE: Duration = Duration::from_millis(100);
/// The keepalive writer wakes at most this often: the writes due within it go out as one batch
/// instead of one scan of every connected session per write (a write is at most this late).
const KEEPALIVE_BATCH: Duration = Duration::from_millis(500);
/// The longest the keepalive writer goes without looking at a connected session (a shorter
/// `keepaliveInterval` is seen within it, as the intervals are re-read).
const KEEPALIVE_RECHECK: Duration = Duration::from_secs(30);

/// Persists the activity of open connections: a keepalive per session at most once per its
/// `keepaliveInterval`, written only if the session has not changed since this gateway looked
/// (so two replicas never both write one interval's keepalive), never earlier than the last.
async fn keepalives(state: Arc<State>) {
    // When each connected session is worth looking at again: its next keepalive's time, or
    // sooner (KEEPALIVE_RECHECK, as often as the intervals are re-read). A batch skips the others
    // instead of re-reading every connected session twice a second.
    let mut not_before: std::collections::HashMap<conns::SessionKey, Timestamp> =
        Default::default();
    let recheck = jiff::SignedDuration::try_from(KEEPALIVE_RECHECK).unwrap_or_default();
    loop {
        let now = Timestamp::now();
        let mut next = now + jiff::SignedDuration::from_secs(5);
        let mut due = Vec::new();
        let keys = state.registry.sessions();
        if not_before.len() > 2 * keys.len() + 64 {
            let live: std::collections::HashSet<&conns::SessionKey> = keys.iter().collect();
            not_before.retain(|k, _| live.contains(k));
        }
        for key in keys {
            if let Some(at) = not_before.get(&key)
                && now < *at
            {
                next = next.min(*at);
                continue;
            }
            let Some(s) = state
                .cache
                .sessions
                .get(&key.ns, &key.name)
                .filter(|s| s.metadata.uid.as_deref() == Some(key.uid.as_str()))
            else {
                continue;
            };
            let pod = state.cache.pod_of(&s);
            let ws = state.cache.workspaces.get(&key.ns, &s.spec.workspace);
            if !core::access(&s, pod.as_deref(), ws.as_deref(), now).connected() {
                continue;
            }
            let interval = keepalive_interval(&state, &key, &s);
            let annotated = s
                .annotations()
                .get(KEEPALIVE_ANNOTATION)
                .and_then(|v| v.parse::<Timestamp>().ok());
            let persisted = s
                .status
                .as_ref()
                .and_then(|st| st.last_keepalive.as_ref())
                .map(|k| k.time.0);
            let last = [annotated, persisted, state.registry.written(&key)]
                .into_iter()
                .flatten()
                .max();
            let (again, write) = match core::keepalive_due(last, interval, now) {
                Some(at) => (core::keepalive_next(Some(at), interval, now), Some(at)),
                None => (core::keepalive_next(last, interval, now), None),
            };
            next = next.min(again);
            not_before.insert(key.clone(), again.min(now + recheck));
            if let Some(at) = write {
                due.push((key, s, at));
            }
        }
        let results = futures::stream::iter(due.into_iter().map(|(key, s, at)| {
            let state = state.clone();
            async move {
                let api: Api<Session> = Api::namespaced(state.client.clone(), &key.ns);
                let patch = serde_json::json!({
                    "metadata": {
                        "resourceVersion": s.resource_version(),
                        "annotations": {KEEPALIVE_ANNOTATION: at.to_string()},
                    }
                });
                // A metadata patch: the API server answers with the metadata alone, not the
                // whole Session for the gateway to parse (it comes back on the watch anyway).
                match api
                    .patch_metadata(&key.name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                {
                    Ok(_) => {
                        state.registry.record_written(&key, at);
                        state.stats.keepalive_writes.fetch_add(1, Ordering::Relaxed);
                        debug!(session = %format!("{}/{}", key.ns, key.name), %at, "keepalive written");
                        None
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        state
                            .stats
                            .keepalive_conflicts
                            .fetch_add(1, Ordering::Relaxed);
                        debug!(session = %format!("{}/{}", key.ns, key.name), "keepalive conflict, retried");
                        Some((key, Duration::from_millis(200)))
                    }
                    Err(e) => {
                        debug!(error = %e, "keepalive write failed");
                        Some((key, Duration::from_secs(1)))
                    }
                }
            }
        }))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
        let mut wait: Duration = next
            .duration_since(Timestamp::now())
            .try_into()
            .unwrap_or(Duration::ZERO);
        wait = wait.max(KEEPALIVE_BATCH);
        for (key, retry) in results.into_iter().flatten() {
            // Not written: looked at again at the retry.
            not_before.remove(&key);
            wait = wait.min(retry);
        }
        tokio::select! {
            _ = state.registry.opened.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Watches RBAC: any change after the first list re-checks every open connection.
fn watch_rbac(client: Client, state: Arc<State>) -> Vec<tokio::task::JoinHandle<()>> {
    use kube::core::PartialObjectMeta;
    fn spawn<K>(api: Api<PartialObjectMeta<K>>, state: Arc<State>) -> tokio::task::JoinHandle<()>
    where
        K: kube::Resource
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
        K::DynamicType: Default,
    {
        tokio::spawn(async move {
            let stream = watcher(api, watcher::Config::default());
            let stream = kube::runtime::WatchStreamExt::default_backoff(stream);
            futures::pin_mut!(stream);
            let mut listed = false;
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::InitDone) => {
                        if listed {
                            state.recheck.notify_one();
                        }
                        listed = true;
                    }
                    Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                        state.recheck.notify_one()
                    }
                    Ok(_) => {}
                    Err(e) => debug!(error = %e, "RBAC watch error (retrying)"),
                }
            }
        })
    }
    vec![
        spawn(
            Api::<PartialObjectMeta<RoleBinding>>::all(client.clone()),
            state.clone(),
        ),
        spawn(
            Api::<PartialObjectMeta<Role>>::all(client.clone()),
            state.clone(),
        ),
        spawn(
            Api::<PartialObjectMeta<ClusterRoleBinding>>::all(client.clone()),
            state.clone(),
        ),
        spawn(Api::<PartialObjectMeta<ClusterRole>>::all(client), state),
    ]
}

/// Re-checks every open connection's access after an RBAC change (several times over the next
/// second: the API server's authorizer sees the change through its own cache, a moment later),
/// and every [`authz::ALLOWED_TTL`] anyway.
async fn rechecks(state: Arc<State>) {
    loop {
        let changed = tokio::select! {
            _ = state.recheck.notified() => true,
            _ = tokio::time::sleep(authz::ALLOWED_TTL) => false,
        };
        let passes: &[u64] = if changed { &[0, 150, 300, 300] } else { &[0] };
        for delay in passes {
            tokio::time::sleep(Duration::from_millis(*delay)).await;
            state.authz.forget();
            for key in state.registry.sessions() {
                for who in state.registry.people(&key) {
                    match state.authz.may_use(&who, &key.ns, &key.user).await {
                        Ok(true) => {}
                        Ok(false) => {
                            let n = state.registry.close(&key, Some(&who));
                            info!(session = %format!("{}/{}", key.ns, key.name), user = %who.username, connections = n, "access removed: closed connections");
                        }
                        Err(e) => debug!(error = %e, "re-check failed"),
                    }
                }
            }
        }
    }
}
