//! Login with OpenID Connect (authorization code with PKCE, via the `openidconnect` crate), and
//! the hand-off from the portal's origin to a session's by a one-time, short-lived, signed
//! ticket.
//!
//! Everything is stateless across replicas: the login's state, nonce and PKCE verifier travel
//! in a signed cookie of the portal's origin; the sign-in in a signed cookie per origin. Only a
//! ticket's one-time use is remembered in memory, by the replica that redeems it (a ticket
//! lives 30 s and names the one origin it opens).
//!
//! Cookies are `__Host-` cookies (`Secure`, `Path=/`, no `Domain`: the exact origin only) when
//! the public URL is https. On the plain-http local demo (`*.localhost`), browsers refuse
//! `Secure` and `__Host-` cookies from http origins, so the names drop the prefix and the
//! `Secure` flag; they stay host-only, `HttpOnly` and `SameSite=Lax`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use openidconnect::core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata};
use openidconnect::{
    AuthorizationCode, ClientId, ClientSecret, CsrfToken, EndpointMaybeSet, EndpointNotSet,
    EndpointSet, IssuerUrl, Nonce, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
    TokenResponse,
};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use super::core::{self as gw, Identity, PublicUrl, Ticket};
use super::pages;
use super::proxy::Body;
use crate::credentials::SigningKey;

/// How long a ticket is valid.
pub const TICKET_TTL_SECS: i64 = 30;
/// How long a sign-in lasts.
pub const SIGN_IN_TTL_SECS: i64 = 8 * 3600;
/// How long a login may take at the provider.
const LOGIN_TTL_SECS: i64 = 600;

/// OIDC settings.
#[derive(Debug, Clone)]
pub struct OidcSettings {
    /// The issuer URL.
    pub issuer: String,
    /// Client id.
    pub client_id: String,
    /// Client secret.
    pub client_secret: String,
    /// The claim naming the person (`sub` by default; `email`, `preferred_username`).
    pub username_claim: String,
    /// Extra CA certificates (PEM) for an https issuer.
    pub ca_file: Option<std::path::PathBuf>,
    /// The claim listing the person's groups (`groups`, as the API server's
    /// `--oidc-groups-claim`); `None`: groups are not taken from the token.
    pub groups_claim: Option<String>,
}

/// The groups in claim `claim` of a (verified) ID token `jwt`: a list of strings or one string,
/// as the API server reads it; absent or null is no groups.
pub fn groups_claim(jwt: &str, claim: &str) -> Result<Vec<String>, String> {
    use base64::Engine;
    let payload = jwt
        .split('.')
        .nth(1)
        .ok_or_else(|| "the ID token is not a JWT".to_string())?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| format!("the ID token's payload is not base64url: {e}"))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("the ID token's payload is not JSON: {e}"))?;
    match v.get(claim) {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::String(g)) => Ok(vec![g.clone()]),
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|g| {
                g.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("claim {claim:?} holds a non-string: {g}"))
            })
            .collect(),
        Some(other) => Err(format!(
            "claim {claim:?} is neither a string nor a list of strings: {other}"
        )),
    }
}

type Client = CoreClient<
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

impl std::fmt::Debug for Oidc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Oidc({})", self.settings.issuer)
    }
}

/// The login machinery.
pub struct Oidc {
    settings: OidcSettings,
    client: tokio::sync::OnceCell<Client>,
    http: HttpClient,
    redeemed: Mutex<HashMap<String, i64>>,
}

/// The cookie names for a public URL.
pub fn cookie_name(public: &PublicUrl, what: &str) -> String {
    if public.secure() {
        format!("{}-{what}", super::COOKIE_PREFIX)
    } else {
        format!("cubicle-{what}")
    }
}

fn set_cookie(public: &PublicUrl, what: &str, value: &str, max_age: i64) -> String {
    let secure = if public.secure() { "; Secure" } else { "" };
    format!(
        "{}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}",
        cookie_name(public, what)
    )
}

/// The value of cookie `name` in the request.
pub fn cookie<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn query<'a>(req: &'a Request<Incoming>, key: &str) -> Option<&'a str> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Serialize, Deserialize)]
struct LoginState {
    #[serde(rename = "s")]
    state: String,
    #[serde(rename = "n")]
    nonce: String,
    #[serde(rename = "v")]
    verifier: String,
    /// The session host label to go to afterwards, if any.
    #[serde(rename = "h", default)]
    next: Option<String>,
    #[serde(rename = "e")]
    exp: i64,
}

/// Errors of HTTP calls to the provider.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HttpError(String);

#[derive(Clone)]
struct HttpClient {
    tls: Arc<rustls::ClientConfig>,
}

impl HttpClient {
    fn new(ca_file: Option<&std::path::Path>) -> Result<Self, String> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
        if let Some(f) = ca_file {
            for c in rustls::pki_types::CertificateDer::pem_file_iter(f)
                .map_err(|e| format!("{}: {e}", f.display()))?
            {
                roots
                    .add(c.map_err(|e| format!("{}: {e}", f.display()))?)
                    .map_err(|e| format!("{}: {e}", f.display()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(Self { tls: Arc::new(tls) })
    }

    /// A client function whose futures own what they use (`Send`, `'static`).
    fn boxed(
        &self,
    ) -> impl Fn(
        openidconnect::HttpRequest,
    ) -> futures::future::BoxFuture<
        'static,
        Result<openidconnect::HttpResponse, HttpError>,
    > + Send
    + Sync
    + 'static {
        let me = self.clone();
        move |r| {
            let me = me.clone();
            Box::pin(async move { me.call(r).await })
        }
    }

    async fn call(
        &self,
        req: openidconnect::HttpRequest,
    ) -> Result<openidconnect::HttpResponse, HttpError> {
        let e = |e: &dyn std::fmt::Display| HttpError(e.to_string());
        let uri = req.uri().clone();
        let host = uri
            .host()
            .ok_or_else(|| HttpError("no host".into()))?
            .to_string();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|x| e(&x))?;
        let (parts, body) = req.into_parts();
        let mut out = Request::from_parts(parts, Full::new(Bytes::from(body)));
        *out.uri_mut() = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse()
            .map_err(|x| e(&x))?;
        let authority = uri
            .authority()
            .map(|a| a.to_string())
            .unwrap_or(host.clone());
        out.headers_mut()
            .insert(header::HOST, authority.parse().map_err(|x| e(&x))?);
        let resp = if https {
            let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|x| e(&x))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|x| e(&x))?;
            send(TokioIo::new(tls), out).await?
        } else {
            send(TokioIo::new(tcp), out).await?
        };
        Ok(resp)
    }
}

async fn send<I>(io: I, req: Request<Full<Bytes>>) -> Result<openidconnect::HttpResponse, HttpError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let e = |e: &dyn std::fmt::Display| HttpError(e.to_string());
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|x| e(&x))?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|x| e(&x))?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|x| e(&x))?.to_bytes();
    Ok(Response::from_parts(parts, body.to_vec()))
}

impl Oidc {
    /// The login machinery (discovery happens at the first login).
    pub fn new(settings: OidcSettings) -> Result<Self, String> {
        let http = HttpClient::new(settings.ca_file.as_deref())?;
        Ok(Self {
            settings,
            client: tokio::sync::OnceCell::new(),
            http,
            redeemed: Mutex::default(),
        })
    }

    async fn client(&self, public: &PublicUrl) -> Result<&Client, String> {
        self.client
            .get_or_try_init(|| async {
                let http = self.http.boxed();
                let issuer =
                    IssuerUrl::new(self.settings.issuer.clone()).map_err(|e| e.to_string())?;
                let metadata = CoreProviderMetadata::discover_async(issuer, &http)
                    .await
                    .map_err(|e| format!("OIDC discovery at {}: {e}", self.settings.issuer))?;
                let redirect = RedirectUrl::new(format!("{}/.cubicle/callback", public.portal()))
                    .map_err(|e| e.to_string())?;
                Ok(CoreClient::from_provider_metadata(
                    metadata,
                    ClientId::new(self.settings.client_id.clone()),
                    Some(ClientSecret::new(self.settings.client_secret.clone())),
                )
                .set_redirect_uri(redirect))
            })
            .await
    }

    /// The signed-in person of this origin (`host`: a session's label, or `""` for the portal).
    pub fn identity(
        &self,
        req: &Request<Incoming>,
        public: &PublicUrl,
        key: &SigningKey,
        host: &str,
    ) -> Option<Identity> {
        let raw = cookie(req, &cookie_name(public, "signin"))?;
        let t: Ticket = serde_json::from_slice(&key.open(raw)?).ok()?;
        gw::check_token(&t, 'c', host, Timestamp::now()).ok()?;
        Some(t.identity)
    }

    /// `/.cubicle/login?s=<label>`: off to the provider.
    pub async fn login(
        &self,
        req: &Request<Incoming>,
        public: &PublicUrl,
        key: &SigningKey,
    ) -> Response<Body> {
        let client = match self.client(public).await {
            Ok(c) => c,
            Err(e) => {
                info!(error = %e, "login unavailable");
                return pages::page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Sign-in unavailable",
                    "<p>The identity provider does not answer.</p>",
                    None,
                );
            }
        };
        let next = query(req, "s")
            .map(percent_decode)
            .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let (url, state, nonce) = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .add_scope(Scope::new("email".into()))
            .add_scope(Scope::new("profile".into()))
            .set_pkce_challenge(challenge)
            .url();
        let st = LoginState {
            state: state.secret().clone(),
            nonce: nonce.secret().clone(),
            verifier: verifier.secret().clone(),
            next,
            exp: Timestamp::now().as_second() + LOGIN_TTL_SECS,
        };
        let sealed = key.seal(&serde_json::to_vec(&st).expect("serializable"));
        let mut r = pages::redirect(url.as_str());
        r.headers_mut().append(
            header::SET_COOKIE,
            set_cookie(public, "login", &sealed, LOGIN_TTL_SECS)
                .parse()
                .expect("a valid cookie"),
        );
        r
    }

    /// `/.cubicle/callback`: the code exchanged (with the PKCE verifier), the ID token verified,
    /// the person signed in on the portal, and on to the session asked for.
    pub async fn callback(
        &self,
        req: &Request<Incoming>,
        public: &PublicUrl,
        key: &SigningKey,
        username_prefix: &str,
        groups_prefix: &str,
    ) -> Response<Body> {
        let refuse = |why: &str| {
            debug!(why, "login refused");
            pages::page(
                StatusCode::BAD_REQUEST,
                "Sign-in failed",
                &format!("<p>{}. <a href=\"/.cubicle/login\">Try again</a>.</p>", why),
                None,
            )
        };
        let Some(st) = cookie(req, &cookie_name(public, "login"))
            .and_then(|c| key.open(c))
            .and_then(|b| serde_json::from_slice::<LoginState>(&b).ok())
        else {
            return refuse("The sign-in was not started here");
        };
        if Timestamp::now().as_second() >= st.exp {
            return refuse("The sign-in took too long");
        }
        if query(req, "state").map(percent_decode).as_deref() != Some(st.state.as_str()) {
            return refuse("The sign-in does not match");
        }
        let Some(code) = query(req, "code").map(percent_decode) else {
            return refuse("The provider sent no code");
        };
        let client = match self.client(public).await {
            Ok(c) => c,
            Err(_) => return refuse("The identity provider does not answer"),
        };
        let http = self.http.boxed();
        let exchange = match client.exchange_code(AuthorizationCode::new(code)) {
            Ok(x) => x,
            Err(_) => return refuse("The provider has no token endpoint"),
        };
        let token = match exchange
            .set_pkce_verifier(PkceCodeVerifier::new(st.verifier.clone()))
            .request_async(&http)
            .await
        {
            Ok(t) => t,
            Err(e) => {
                debug!(error = %e, "code exchange failed");
                return refuse("The provider refused the code");
            }
        };
        let Some(id_token) = token.id_token() else {
            return refuse("The provider sent no ID token");
        };
        let claims =
            match id_token.claims(&client.id_token_verifier(), &Nonce::new(st.nonce.clone())) {
                Ok(c) => c,
                Err(e) => {
                    debug!(error = %e, "ID token refused");
                    return refuse("The ID token is not valid");
                }
            };
        let name = match self.settings.username_claim.as_str() {
            "email" => claims.email().map(|e| e.as_str().to_string()),
            "preferred_username" => claims.preferred_username().map(|u| u.as_str().to_string()),
            _ => Some(claims.subject().as_str().to_string()),
        };
        let Some(name) = name.filter(|n| !n.is_empty()) else {
            return refuse("The ID token lacks the username claim");
        };
        // The signature was checked just above over these very bytes; the groups claim is
        // read from the same payload (the crate's standard claims do not carry it).
        let groups = match &self.settings.groups_claim {
            Some(claim) => match groups_claim(&id_token.to_string(), claim) {
                Ok(g) => g,
                Err(e) => {
                    debug!(error = %e, "groups claim refused");
                    return refuse("The ID token's groups claim is not a list of names");
                }
            },
            None => Vec::new(),
        };
        let identity = Identity {
            username: format!("{username_prefix}{name}"),
            groups: groups
                .iter()
                .map(|g| format!("{groups_prefix}{g}"))
                .collect(),
        };
        info!(user = %identity.username, "signed in");
        let signin = seal(key, &identity, "", 'c', SIGN_IN_TTL_SECS);
        let to = match &st.next {
            Some(label) => format!("/.cubicle/go?s={label}"),
            None => "/".into(),
        };
        let mut r = pages::redirect(&to);
        r.headers_mut().append(
            header::SET_COOKIE,
            set_cookie(public, "signin", &signin, SIGN_IN_TTL_SECS)
                .parse()
                .expect("a valid cookie"),
        );
        r.headers_mut().append(
            header::SET_COOKIE,
            set_cookie(public, "login", "", 0)
                .parse()
                .expect("a valid cookie"),
        );
        r
    }

    /// `/.cubicle/go?s=<label>` on the portal: a ticket for that session's origin.
    pub fn go(
        &self,
        req: &Request<Incoming>,
        public: &PublicUrl,
        key: &SigningKey,
    ) -> Response<Body> {
        let Some(label) = query(req, "s")
            .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        else {
            return pages::not_found();
        };
        let Some(who) = self.identity(req, public, key, "") else {
            return pages::redirect(&format!("/.cubicle/login?s={label}"));
        };
        let ticket = seal(key, &who, label, 't', TICKET_TTL_SECS);
        let origin = public.session(label);
        pages::redirect(&format!("{origin}.cubicle/ticket?t={ticket}"))
    }

    /// `/.cubicle/ticket?t=` on a session's origin: a one-time ticket exchanged for this
    /// origin's sign-in cookie.
    pub fn redeem(
        &self,
        req: &Request<Incoming>,
        public: &PublicUrl,
        key: &SigningKey,
        label: &str,
    ) -> Response<Body> {
        let refused = |why: &str| {
            pages::page(
                StatusCode::FORBIDDEN,
                "Ticket refused",
                &format!("<p>{why}</p>"),
                None,
            )
        };
        let Some(raw) = query(req, "t") else {
            return refused("No ticket.");
        };
        let Some(t) = key
            .open(raw)
            .and_then(|b| serde_json::from_slice::<Ticket>(&b).ok())
        else {
            return refused("This ticket is not one of ours.");
        };
        let now = Timestamp::now();
        match gw::check_token(&t, 't', label, now) {
            Ok(()) => {}
            Err(gw::Refused::Expired) => return refused("This ticket has expired."),
            Err(_) => return refused("This ticket is for somewhere else."),
        }
        {
            let mut seen = self.redeemed.lock().unwrap_or_else(|p| p.into_inner());
            seen.retain(|_, exp| *exp > now.as_second());
            if seen.insert(t.nonce.clone(), t.exp).is_some() {
                return refused("This ticket has been used.");
            }
        }
        let signin = seal(key, &t.identity, label, 'c', SIGN_IN_TTL_SECS);
        let mut r = pages::redirect("/");
        r.headers_mut().append(
            header::SET_COOKIE,
            set_cookie(public, "signin", &signin, SIGN_IN_TTL_SECS)
                .parse()
                .expect("a valid cookie"),
        );
        r
    }
}

/// A signed token of `kind` for `host`.
pub fn seal(key: &SigningKey, who: &Identity, host: &str, kind: char, ttl: i64) -> String {
    let mut nonce = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .expect("the system random source works");
    let t = Ticket {
        identity: who.clone(),
        host: host.to_string(),
        exp: Timestamp::now().as_second() + ttl,
        nonce: nonce.iter().map(|b| format!("{b:02x}")).collect(),
        path: "/".into(),
        kind,
    };
    key.seal(&serde_json::to_vec(&t).expect("serializable"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_host_cookies_on_https_and_plain_on_the_local_http_demo() {
        let s = PublicUrl::parse("https://c.example.com").unwrap();
        assert_eq!(cookie_name(&s, "signin"), "__Host-cubicle-signin");
        let c = set_cookie(&s, "signin", "v", 60);
        assert!(c.contains("; Secure") && c.contains("Path=/") && !c.contains("Domain"));
        let h = PublicUrl::parse("http://cubicle.localhost:8080").unwrap();
        assert_eq!(cookie_name(&h, "signin"), "cubicle-signin");
        assert!(!set_cookie(&h, "signin", "v", 60).contains("Secure"));
    }

    #[test]
    fn groups_come_from_the_named_claim_as_a_list_or_one_string() {
        use base64::Engine;
        let jwt = |payload: serde_json::Value| {
            let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            format!(
                "{}.{}.sig",
                e.encode(br#"{"alg":"RS256"}"#),
                e.encode(payload.to_string())
            )
        };
        let t =
            jwt(serde_json::json!({"sub": "carol", "groups": ["admins", "staff"], "team": "x"}));
        assert_eq!(groups_claim(&t, "groups").unwrap(), ["admins", "staff"]);
        assert_eq!(groups_claim(&t, "team").unwrap(), ["x"]);
        assert!(groups_claim(&t, "roles").unwrap().is_empty());
        let bad = jwt(serde_json::json!({"groups": [1]}));
        assert!(
            groups_claim(&bad, "groups")
                .unwrap_err()
                .contains("non-string")
        );
        let bad = jwt(serde_json::json!({"groups": {"a": 1}}));
        assert!(groups_claim(&bad, "groups").is_err());
        assert!(groups_claim("not-a-jwt", "groups").is_err());
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(percent_decode("a%2Fb+c"), "a/b c");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
