//! The local OpenID Provider: a real one (zitadel/oidc's `pkg/op` with its example storage,
//! built from Go modules by `tests/oidc/build.sh`), serving demo people with random passwords
//! and one confidential client, the gateway.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::DevError;

/// A demo person.
#[derive(Debug, Clone)]
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
    /// The issuer URL (`http://127.0.0.1:PORT/`).
    pub url: String,
    /// The gateway's client id.
    pub client_id: String,
    /// The gateway's client secret.
    pub client_secret: String,
    /// The people it knows.
    pub people: Vec<Person>,
    _child: Child,
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
    let bin = binary().await?;
    let child = Command::new(&bin)
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
        _child: child,
    })
}
