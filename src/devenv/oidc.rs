//! The local OpenID Provider: a real one (zitadel/oidc's `pkg/op` with its example storage,
//! built from Go modules by `tests/oidc/build.sh`), serving demo people with random passwords
//! and one confidential client, the gateway.
//!
//! It serves https (the kube-apiserver trusts only https issuers) with a certificate for
//! `127.0.0.1` and `localhost` signed by a local CA ([`Tls`]): the one in the nearest `oidc-tls/`
//! of its directory or an ancestor (what `cubicle dev up --oidc` writes into its directory, so
//! every issuer of one environment shares it), else a new one in its own directory. Clients
//! trust that CA (`Issuer::ca_file`); headless Chromium trusts the certificate's key by its
//! hash (`Tls::spki_sha256`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::DevError;

/// The prefix the API server puts before usernames from the issuer (and the gateway's default).
pub const USERNAME_PREFIX: &str = "oidc:";
/// The prefix the API server puts before group names from the issuer.
pub const GROUPS_PREFIX: &str = "oidc:";

/// A demo person.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Person {
    /// Login name (also the `sub` claim).
    pub name: String,
    /// Password (random, printed for the demo).
    pub password: String,
    /// Groups, carried by ID tokens as the `groups` claim.
    pub groups: Vec<String>,
}

/// A running provider; dropping it stops it.
pub struct Issuer {
    /// The issuer URL (`https://127.0.0.1:PORT/`).
    pub url: String,
    /// The gateway's client id.
    pub client_id: String,
    /// The gateway's client secret.
    pub client_secret: String,
    /// The people it knows.
    pub people: Vec<Person>,
    /// The CA that signed its certificate (PEM file).
    pub ca_file: PathBuf,
    /// Its TLS material.
    pub tls: Tls,
    /// The redirect URIs it accepts.
    pub redirect_uris: Vec<String>,
    _child: Child,
}

impl Issuer {
    /// What `cubicle dev up --oidc` writes about it.
    pub fn record(&self) -> IssuerRecord {
        IssuerRecord {
            url: self.url.clone(),
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            ca_file: self.ca_file.clone(),
            spki_sha256: self.tls.spki_sha256.clone(),
            redirect_uris: self.redirect_uris.clone(),
            people: self.people.clone(),
        }
    }
}

/// A CA and one serving certificate for `127.0.0.1` and `localhost` signed by it, in a directory
/// `oidc-tls/`: `ca.pem`, `tls.pem` (the certificate, then the CA), `tls-key.pem` (mode 0600) and
/// `spki-sha256` (the base64 SHA-256 of the certificate's SubjectPublicKeyInfo, what Chromium's
/// `--ignore-certificate-errors-spki-list` takes).
#[derive(Debug, Clone)]
pub struct Tls {
    /// The CA certificate (PEM).
    pub ca_file: PathBuf,
    /// The serving certificate chain (PEM).
    pub cert_file: PathBuf,
    /// Its key (PEM).
    pub key_file: PathBuf,
    /// base64(SHA-256(SubjectPublicKeyInfo)) of the serving certificate.
    pub spki_sha256: String,
}

impl Tls {
    /// The TLS material in `dir/oidc-tls`, if it is there.
    pub fn load(dir: &Path) -> Option<Tls> {
        let d = dir.join(TLS_DIR);
        let spki = std::fs::read_to_string(d.join("spki-sha256")).ok()?;
        let tls = Tls {
            ca_file: d.join("ca.pem"),
            cert_file: d.join("tls.pem"),
            key_file: d.join("tls-key.pem"),
            spki_sha256: spki.trim().to_string(),
        };
        (tls.ca_file.is_file() && tls.cert_file.is_file() && tls.key_file.is_file()).then_some(tls)
    }

    /// The material in the nearest `oidc-tls/` of `dir` or an ancestor, else new material in
    /// `dir/oidc-tls` (safe against concurrent callers: written aside, then renamed).
    pub fn find_or_create(dir: &Path) -> Result<Tls, DevError> {
        if let Some(t) = dir.ancestors().find_map(Tls::load) {
            return Ok(t);
        }
        Tls::create(dir)
    }

    /// The material in `dir/oidc-tls`, created there if missing.
    pub fn create(dir: &Path) -> Result<Tls, DevError> {
        if let Some(t) = Tls::load(dir) {
            return Ok(t);
        }
        let io = |what: String| move |source| DevError::Io { what, source };
        let gen_err = |e: rcgen::Error| DevError::Startup(format!("generate the issuer's CA: {e}"));
        let ca_key = rcgen::KeyPair::generate().map_err(gen_err)?;
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(
            rcgen::DnType::CommonName,
            "Cubicle local OpenID Provider CA",
        );
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = ca.self_signed(&ca_key).map_err(gen_err)?;
        let key = rcgen::KeyPair::generate().map_err(gen_err)?;
        let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .map_err(gen_err)?;
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, "Cubicle local OpenID Provider");
        leaf.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = leaf.signed_by(&key, &ca, &ca_key).map_err(gen_err)?;
        let spki = {
            use base64::Engine;
            let digest = ring::digest::digest(&ring::digest::SHA256, &key.public_key_der());
            base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
        };
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let tmp = dir.join(format!(
            ".{TLS_DIR}-{}-{}",
            std::process::id(),
            random_token(6)
        ));
        std::fs::create_dir_all(&tmp).map_err(io(format!("create {}", tmp.display())))?;
        let write = |name: &str, body: &str, mode: u32| -> Result<(), DevError> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let p = tmp.join(name);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&p)
                .and_then(|mut f| f.write_all(body.as_bytes()))
                .map_err(io(format!("write {}", p.display())))
        };
        write("ca.pem", &ca.pem(), 0o644)?;
        write("tls.pem", &format!("{}{}", leaf.pem(), ca.pem()), 0o644)?;
        write("tls-key.pem", &key.serialize_pem(), 0o600)?;
        write("spki-sha256", &format!("{spki}\n"), 0o644)?;
        // Another caller may have won the race: then its material is the one.
        if std::fs::rename(&tmp, dir.join(TLS_DIR)).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Tls::load(dir).ok_or_else(|| {
            DevError::Startup(format!(
                "no TLS material in {}",
                dir.join(TLS_DIR).display()
            ))
        })
    }
}

/// A redirect URI the issuer of `cubicle dev up --oidc` always accepts: nothing listens there;
/// a client that only wants tokens (a test, a script) takes the code from the redirect.
pub const DEV_REDIRECT_URI: &str = "http://cubicle.localhost/.cubicle/callback";

/// The directory name of [`Tls`] material.
pub const TLS_DIR: &str = "oidc-tls";

/// The kube-apiserver's structured authentication configuration (`--authentication-config`,
/// AuthenticationConfiguration v1beta1) trusting `issuers`: ID tokens for client `client_id`,
/// the person from claim `sub` and groups from claim `groups`, each with the prefix `oidc:`
/// ([`USERNAME_PREFIX`], [`GROUPS_PREFIX`]), the CA inline.
pub fn authentication_config(issuers: &[(&str, &str, &str)]) -> String {
    let jwt: Vec<serde_json::Value> = issuers
        .iter()
        .map(|(url, client_id, ca_pem)| {
            serde_json::json!({
                "issuer": {"url": url, "audiences": [client_id], "certificateAuthority": ca_pem},
                "claimMappings": {
                    "username": {"claim": "sub", "prefix": USERNAME_PREFIX},
                    "groups": {"claim": "groups", "prefix": GROUPS_PREFIX},
                },
            })
        })
        .collect();
    serde_yaml::to_string(&serde_json::json!({
        "apiVersion": "apiserver.config.k8s.io/v1beta1",
        "kind": "AuthenticationConfiguration",
        "jwt": jwt,
    }))
    .expect("yaml")
}

/// What `cubicle dev up --oidc` writes to `<dir>/oidc/issuer.json` (mode 0600): how to reach
/// the issuer the API server trusts, and its people's passwords.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssuerRecord {
    /// The issuer URL.
    pub url: String,
    /// The client id (also the audience the API server accepts).
    pub client_id: String,
    /// The client secret.
    pub client_secret: String,
    /// The CA of its certificate.
    pub ca_file: PathBuf,
    /// base64(SHA-256) of its certificate's public key (Chromium's SPKI list).
    pub spki_sha256: String,
    /// Redirect URIs it accepts.
    pub redirect_uris: Vec<String>,
    /// Its people.
    pub people: Vec<Person>,
}

impl IssuerRecord {
    /// The record's path in a dev directory.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("oidc").join("issuer.json")
    }

    /// Reads the record of the environment in `dir`.
    pub fn read(dir: &Path) -> Result<IssuerRecord, DevError> {
        let p = Self::path(dir);
        let b = std::fs::read(&p).map_err(|source| DevError::Io {
            what: format!("read {}", p.display()),
            source,
        })?;
        serde_json::from_slice(&b).map_err(|e| DevError::Startup(format!("{}: {e}", p.display())))
    }
}

fn random_token(n: usize) -> String {
    let mut b = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system random source works");
    b.iter()
        .map(|x| {
            let c = b"abcdefghijkmnpqrstuvwxyz23456789"[(*x as usize) % 32];
            c as char
        })
        .collect()
}

/// The provider binary: `$CUBICLE_OIDC_BIN`, or built by `tests/oidc/build.sh`.
pub async fn binary() -> Result<PathBuf, DevError> {
    super::controlplane::built_binary(
        "CUBICLE_OIDC_BIN",
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/oidc/build.sh"),
    )
    .await
}

/// Starts the provider in `dir` for `names` (in no groups), accepting `redirect_uris`.
pub async fn start(
    dir: &Path,
    names: &[&str],
    redirect_uris: &[String],
) -> Result<Issuer, DevError> {
    let people: Vec<(&str, &[&str])> = names.iter().map(|n| (*n, &[][..])).collect();
    start_with_groups(dir, &people, redirect_uris).await
}

/// Starts the provider in `dir` for `people` (name and groups), accepting `redirect_uris`.
pub async fn start_with_groups(
    dir: &Path,
    people: &[(&str, &[&str])],
    redirect_uris: &[String],
) -> Result<Issuer, DevError> {
    let io = |what: String| move |source| DevError::Io { what, source };
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    let people: Vec<Person> = people
        .iter()
        .map(|(n, groups)| Person {
            name: n.to_string(),
            password: random_token(12),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        })
        .collect();
    let users: serde_json::Map<String, serde_json::Value> = people
        .iter()
        .map(|p| {
            (
                p.name.clone(),
                serde_json::json!({
                    "ID": p.name, "Username": p.name, "Password": p.password,
                    "FirstName": p.name, "LastName": "Demo",
                    "Email": format!("{}@cubicle.localhost", p.name), "EmailVerified": true,
                    "PreferredLanguage": "en", "Groups": p.groups,
                }),
            )
        })
        .collect();
    let users_file = dir.join("oidc-users.json");
    std::fs::write(&users_file, serde_json::to_vec(&users).expect("json"))
        .map_err(io(format!("write {}", users_file.display())))?;
    let ready = dir.join("oidc-ready.json");
    let _ = std::fs::remove_file(&ready);
    let log = std::fs::File::create(dir.join("oidc.log"))
        .map_err(io(format!("create {}", dir.join("oidc.log").display())))?;
    let client_secret = random_token(24);
    let tls = Tls::find_or_create(dir)?;
    let bin = binary().await?;
    let child = Command::new(&bin)
        .arg("-tls-cert")
        .arg(&tls.cert_file)
        .arg("-tls-key")
        .arg(&tls.key_file)
        .arg("-users")
        .arg(&users_file)
        .args(["-client-id", "cubicle", "-client-secret", &client_secret])
        .args(["-redirect-uri", &redirect_uris.join(",")])
        .arg("-ready")
        .arg(&ready)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io("clone log".into()))?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(io(format!("start {}", bin.display())))?;
    let start = Instant::now();
    let url = loop {
        if let Ok(b) = std::fs::read(&ready)
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b)
            && let Some(u) = v["issuer"].as_str()
        {
            break u.to_string();
        }
        if start.elapsed() > Duration::from_secs(30) {
            return Err(DevError::Startup(format!(
                "the OpenID Provider did not start; see {}",
                dir.join("oidc.log").display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    Ok(Issuer {
        url,
        client_id: "cubicle".into(),
        client_secret,
        people,
        ca_file: tls.ca_file.clone(),
        tls,
        redirect_uris: redirect_uris.to_vec(),
        _child: child,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_server_config_trusts_the_issuer_with_prefixed_claims() {
        let y = authentication_config(&[("https://127.0.0.1:5556/", "cubicle", "PEM\n")]);
        let v: serde_json::Value = serde_yaml::from_str(&y).unwrap();
        assert_eq!(v["kind"], "AuthenticationConfiguration");
        assert_eq!(v["apiVersion"], "apiserver.config.k8s.io/v1beta1");
        let j = &v["jwt"][0];
        assert_eq!(j["issuer"]["url"], "https://127.0.0.1:5556/");
        assert_eq!(j["issuer"]["audiences"][0], "cubicle");
        assert_eq!(j["issuer"]["certificateAuthority"], "PEM\n");
        assert_eq!(j["claimMappings"]["username"]["claim"], "sub");
        assert_eq!(j["claimMappings"]["username"]["prefix"], "oidc:");
        assert_eq!(j["claimMappings"]["groups"]["claim"], "groups");
        assert_eq!(j["claimMappings"]["groups"]["prefix"], "oidc:");
    }

    #[test]
    fn tls_material_is_made_once_and_found_from_below() {
        let dir = std::env::temp_dir().join(format!("cubicle-oidc-tls-{}", random_token(8)));
        let made = Tls::create(&dir).unwrap();
        let again = Tls::find_or_create(&dir.join("a").join("b")).unwrap();
        assert_eq!(made.spki_sha256, again.spki_sha256);
        assert_eq!(made.ca_file, again.ca_file);
        assert_eq!(made.spki_sha256.len(), 44, "{}", made.spki_sha256);
        // The chain: the serving certificate, then the CA.
        let chain = std::fs::read_to_string(&made.cert_file).unwrap();
        let ca = std::fs::read_to_string(&made.ca_file).unwrap();
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(chain.ends_with(&ca));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&made.key_file)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is private: {mode:o}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
