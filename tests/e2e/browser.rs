//! Headless Chromium for the tests that need a real browser (login, the dashboard, the desktop).
//!
//! Chromium and chromedriver come from Debian (`chromium`, `chromium-driver`; `.ci/run` installs
//! them). Each [`Browser`] starts its own chromedriver on a free loopback port and one Chromium
//! session with a fresh profile under `/tmp/cubicle-chromium-<port>/` (short on purpose:
//! Chromium's singleton socket path must stay under 108 bytes however deep the checkout is).
//! WebDriver is spoken over plain HTTP to 127.0.0.1, so no TLS stack is linked in. The one
//! certificate Chromium accepts without a public CA is the run's OpenID Provider's
//! (`--ignore-certificate-errors-spki-list` with its key's hash).
//!
//! Where Chromium is missing the tests say so and pass, unless `CUBICLE_REQUIRE_BROWSER=1` (CI
//! sets it): then a missing browser fails them. Screenshots go to
//! `target/artefacts/<test>/<name>.png`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// A running chromedriver with one headless Chromium session.
pub struct Browser {
    pub client: Client,
    test: String,
    driver: Child,
    scratch: PathBuf,
}

fn which(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for n in names {
            let p = dir.join(n);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Where a test's screenshots go.
pub fn artefacts(test: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("artefacts").join(test);
    std::fs::create_dir_all(&dir).expect("create the artefacts directory");
    dir
}

impl Browser {
    /// Starts chromedriver and a headless Chromium, or returns `None` (with a message) when the
    /// host has none and `CUBICLE_REQUIRE_BROWSER` is not `1`.
    pub async fn start(test: &str) -> Option<Browser> {
        let required = std::env::var("CUBICLE_REQUIRE_BROWSER").is_ok_and(|v| v == "1");
        let driver_bin = std::env::var_os("CUBICLE_CHROMEDRIVER")
            .map(PathBuf::from)
            .or_else(|| which(&["chromedriver"]));
        let chromium = std::env::var_os("CUBICLE_CHROMIUM")
            .map(PathBuf::from)
            .or_else(|| which(&["chromium", "chromium-browser", "google-chrome"]));
        let (Some(driver_bin), Some(chromium)) = (driver_bin, chromium) else {
            let why = "no chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)";
            if required {
                panic!("{test}: a browser is required (CUBICLE_REQUIRE_BROWSER=1): {why}");
            }
            eprintln!("{test}: skipped, {why}");
            return None;
        };
        let port = free_port();
        let scratch = PathBuf::from(format!("/tmp/cubicle-chromium-{port}"));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(scratch.join("tmp")).expect("create Chromium's scratch folder");
        let log = std::fs::File::create(artefacts(test).join("chromedriver.log"))
            .expect("create chromedriver.log");
        let mut driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .env("TMPDIR", scratch.join("tmp"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{test}: start {}: {e}", driver_bin.display()));
        let url = format!("http://127.0.0.1:{port}");
        // The local OpenID Provider's login pages are https with a certificate of this run's
        // own CA: Chromium accepts that one certificate, by its key's hash, and no other
        // certificate error (the switch needs --user-data-dir, given below).
        let issuer_tls = cubicle::devenv::oidc::Tls::find_or_create(crate::support::run_dir())
            .unwrap_or_else(|e| panic!("{test}: the run's OpenID Provider TLS material: {e}"));
        let caps = json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    // Tests run as root in CI, where Chromium's sandbox cannot start.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--window-size=1280,800",
                    format!("--user-data-dir={}", scratch.join("profile").display()),
                    format!("--ignore-certificate-errors-spki-list={}", issuer_tls.spki_sha256),
                ],
            },
        });
        let caps = match caps {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = loop {
            let mut builder =
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
            builder.capabilities(caps.clone());
            match builder.connect(&url).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = driver.try_wait() {
                        panic!(
                            "{test}: chromedriver exited ({status}); see its log in the artefacts"
                        );
                    }
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("{test}: no Chromium session from chromedriver in 60 s: {e}"),
            }
        };
        Some(Browser {
            client,
            test: test.to_string(),
            driver,
            scratch,
        })
    }

    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("{}: open {url}: {e}", self.test));
    }

    pub async fn url(&self) -> String {
        self.client
            .current_url()
            .await
            .map(|u| u.to_string())
            .unwrap_or_default()
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page.
    pub async fn eval(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("{}: script failed: {e}\n{script}", self.test))
    }

    /// The page's text (`document.body.innerText`).
    pub async fn text(&self) -> String {
        self.eval(
            "return document.body ? document.body.innerText : ''",
            vec![],
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// Types `value` into the element `css` (clearing it first).
    pub async fn fill(&self, css: &str, value: &str) {
        let el = self.find(css).await;
        el.clear()
            .await
            .unwrap_or_else(|e| panic!("{}: clear {css}: {e}", self.test));
        el.send_keys(value)
            .await
            .unwrap_or_else(|e| panic!("{}: type into {css}: {e}", self.test));
    }

    pub async fn click(&self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("{}: click {css}: {e}", self.test));
    }

    /// Waits up to 30 s for an element matching `css`.
    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.client.find(Locator::Css(css)).await {
                Ok(el) => return el,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => {
                    let shot = self.screenshot("find-failed").await;
                    panic!(
                        "{}: no element {css} in 30 s at {} ({e}); screenshot {}\npage text: {}",
                        self.test,
                        self.url().await,
                        shot.display(),
                        self.text().await
                    )
                }
            }
        }
    }

    /// Polls `script` every 100 ms until it returns something other than `null`, `false`, `""`
    /// or `0`, and returns that; panics (with a screenshot) after `timeout`.
    pub async fn wait_until(&self, script: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self
                .client
                .execute(script, vec![])
                .await
                .unwrap_or(Value::Null);
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => b == &true,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return v;
            }
            if Instant::now() >= deadline {
                let shot = self.screenshot("wait-until").await;
                panic!(
                    "{}: {script:?} stayed falsy for {timeout:?} at {} (screenshot {})\npage text: {}",
                    self.test,
                    self.url().await,
                    shot.display(),
                    self.text().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of the viewport as `target/artefacts/<test>/<name>.png` and returns its path.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let path = artefacts(&self.test).join(format!("{name}.png"));
        match self.client.screenshot().await {
            Ok(png) => {
                std::fs::write(&path, png).expect("write the screenshot");
            }
            Err(e) => eprintln!("{}: no screenshot {name}: {e}", self.test),
        }
        path
    }

    /// Ends the Chromium session and chromedriver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // A test that panics never reaches close(): end chromedriver and the Chromium processes
        // of this session's profile (they would outlive a killed chromedriver).
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(self.scratch.as_os_str())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// How long a portal page (a render on a loaded machine, a gateway still listing) may take.
pub const PORTAL_PAGE_WITHIN: Duration = Duration::from_secs(180);

impl Browser {
    /// Opens a portal page at `url` and waits for it (it names the person); then pauses the
    /// page's live reload, so what a test reads and clicks is not replaced under it.
    pub async fn open_portal(&self, url: &str) {
        self.goto(url).await;
        self.wait_until(
            "return document.getElementById('who') && document.getElementById('who').textContent",
            PORTAL_PAGE_WITHIN,
        )
        .await;
        self.eval("window.cubiclePaused = true; return 1", vec![])
            .await;
    }

    /// The form token of the portal page that is open (what a forged post would lack).
    pub async fn form_token(&self) -> Value {
        self.eval(
            "return document.querySelector('input[name=token]').value",
            vec![],
        )
        .await
    }

    /// Posts `fields` as a form to `path` from inside the page (same origin, its cookies);
    /// returns the status and the text of the answer.
    pub async fn post_form(&self, path: &str, fields: Value) -> (u64, String) {
        let v = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1]; \
                 const body = new URLSearchParams(arguments[1]); \
                 fetch(arguments[0], {method: 'POST', body, credentials: 'same-origin', redirect: 'manual'}) \
                   .then(r => r.text().then(t => done([r.status, t]))) \
                   .catch(e => done([0, String(e)]));",
                vec![serde_json::json!(path), fields],
            )
            .await
            .unwrap_or_else(|e| panic!("{}: post {path}: {e}", self.test));
        (
            v[0].as_u64().unwrap_or(0),
            v[1].as_str().unwrap_or("").to_string(),
        )
    }
}

/// How long [`sign_in`] waits for the provider's login form: the way there is several
/// redirects, and Chromium on a loaded two-core machine can take many seconds per navigation.
pub const SIGN_IN_FORM_WITHIN: Duration = Duration::from_secs(90);

/// Signs `username` in on the OpenID Provider's own login form (tests/oidc) that the browser is
/// on, or on its way to: waits for the form (up to [`SIGN_IN_FORM_WITHIN`]; on timeout, fails
/// with a screenshot, the address and the page's text), fills in the username and password and
/// submits. Returns the form's address (the provider's), for the caller to check; the caller
/// then waits for where the sign-in leads.
pub async fn sign_in(b: &Browser, username: &str, password: &str) -> String {
    let at = b
        .wait_until(
            "return document.getElementById('username') && document.getElementById('password') \
             && location.href.includes('authRequestID') && location.href",
            SIGN_IN_FORM_WITHIN,
        )
        .await;
    b.fill("#username", username).await;
    b.fill("#password", password).await;
    b.click("button[type=submit]").await;
    at.as_str().unwrap_or_default().to_string()
}
