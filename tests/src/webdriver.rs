//! A real browser for the dashboard's tests: Debian's headless `chromium`, driven through
//! `chromedriver` with the W3C WebDriver protocol (plain JSON over HTTP on loopback).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The key WebDriver names an element reference by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    /// Where screenshots go.
    pub shots: PathBuf,
    _profile: tempfile::TempDir,
}

/// Whether this machine has the browser and its driver (`script/test` installs them).
pub fn available() -> bool {
    ["chromium", "chromedriver"].iter().all(|b| {
        Command::new("which")
            .arg(b)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Browser {
    /// Starts chromedriver and a headless chromium that resolves each `(name, ip)` to `ip`
    /// and trusts only the certificate whose public key has SHA-256 `spki_pin` (base64) beside
    /// the system's.
    pub async fn start(resolve: &[(&str, &str)], spki_pin: &str, shots: &Path) -> Browser {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        // The port is free when picked and may be taken before chromedriver binds it: a
        // driver that exits at once is started again on another port.
        let mut started = None;
        for _ in 0..3 {
            let port = free_port();
            let mut driver = Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver");
            let base = format!("http://127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(20);
            let ready = loop {
                if driver.try_wait().ok().flatten().is_some() {
                    break false;
                }
                let up = http
                    .get(format!("{base}/status"))
                    .send()
                    .await
                    .ok()
                    .filter(|r| r.status().is_success());
                if up.is_some() {
                    break true;
                }
                assert!(Instant::now() < deadline, "chromedriver did not start");
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            if ready {
                started = Some((driver, base));
                break;
            }
            let _ = driver.wait();
        }
        let (driver, base) = started.expect("chromedriver exited at start three times");
        let profile = tempfile::tempdir().expect("profile dir");
        let rules = resolve
            .iter()
            .map(|(name, ip)| format!("MAP {name} {ip}"))
            .collect::<Vec<_>>()
            .join(", ");
        let args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".to_string(),
            "--disable-gpu".to_string(),
            "--disable-dev-shm-usage".to_string(),
            "--no-first-run".to_string(),
            "--disable-background-networking".to_string(),
            "--disable-component-update".to_string(),
            "--disable-sync".to_string(),
            "--window-size=1280,900".to_string(),
            format!("--user-data-dir={}", profile.path().display()),
            format!("--host-resolver-rules={rules}, EXCLUDE localhost"),
            format!("--ignore-certificate-errors-spki-list={spki_pin}"),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": false,
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
        }}});
        let r: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("session answer");
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {r}"))
            .to_string();
        std::fs::create_dir_all(shots).expect("screenshot dir");
        Browser {
            driver,
            base,
            session,
            http,
            shots: shots.to_path_buf(),
            _profile: profile,
        }
    }

    async fn try_cmd(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let mut req = self.http.request(method.clone(), &url);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req
            .send()
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(format!(
                "{method} {path}: {status} {}",
                v["value"]["message"]
            ));
        }
        Ok(v["value"].clone())
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        self.try_cmd(method, path, body)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs `path` on the element `css` selects; a failure names the element.
    async fn on_element(&self, css: &str, path: &str, body: Value) {
        let id = self.wait_for(css, Duration::from_secs(10)).await;
        let path = format!("/element/{id}/{path}");
        if let Err(e) = self.try_cmd(reqwest::Method::POST, &path, Some(body)).await {
            let shot = self.screenshot("failed").await;
            panic!("{css}: {e} (see {})", shot.display());
        }
    }

    pub async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// Runs `script` in the page (its `return` is the answer).
    pub async fn eval(&self, script: &str) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// The element `css` selects, once there is one (within `timeout`).
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let url = format!("{}/session/{}/element", self.base, self.session);
            let r = self
                .http
                .post(&url)
                .json(&json!({"using": "css selector", "value": css}))
                .send()
                .await
                .expect("find element");
            let ok = r.status().is_success();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            if let Some(id) = v["value"][ELEMENT].as_str().filter(|_| ok) {
                return id.to_string();
            }
            if Instant::now() >= deadline {
                let shot = self.screenshot("timed-out").await;
                let url = self.cmd(reqwest::Method::GET, "/url", None).await;
                let body = self
                    .eval("return document.body ? document.body.innerText : ''")
                    .await;
                panic!(
                    "no element {css} in {timeout:?} at {url}; the page says {body}; see {}",
                    shot.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn click(&self, css: &str) {
        self.on_element(css, "click", json!({})).await;
    }

    /// Replaces what the input `css` holds with `text` (typed, as a user would).
    pub async fn fill(&self, css: &str, text: &str) {
        self.on_element(css, "clear", json!({})).await;
        self.on_element(css, "value", json!({ "text": text })).await;
    }

    /// Chooses the local file `path` in the file input `css`.
    pub async fn choose_file(&self, css: &str, path: &Path) {
        let text = path.to_str().expect("a UTF-8 path");
        self.on_element(css, "value", json!({ "text": text })).await;
    }

    /// The visible text of `css` (empty when there is no such element).
    pub async fn text(&self, css: &str) -> String {
        let js = format!(
            "const e = document.querySelector({}); return e ? e.innerText : '';",
            serde_json::to_string(css).expect("json")
        );
        self.eval(&js)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the text of `css` satisfies `ok`; returns it.
    pub async fn wait_text(
        &self,
        css: &str,
        timeout: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.text(css).await;
            if ok(&t) {
                return t;
            }
            if Instant::now() >= deadline {
                self.screenshot("timed-out").await;
                panic!("{css} never matched within {timeout:?}; it says: {t:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Saves a PNG of the page as `NAME.png` in the screenshot directory.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        use base64::Engine;
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("screenshot is base64"))
            .expect("base64 PNG");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let url = format!("{}/session/{}", self.base, self.session);
        // chromedriver closes chromium when its session ends; then the driver itself goes.
        let _ = std::process::Command::new("curl")
            .args(["-s", "-m", "5", "-X", "DELETE", &url])
            .stdout(Stdio::null())
            .status();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The base64 SHA-256 of a PEM certificate's public key (what chromium's
/// `--ignore-certificate-errors-spki-list` takes), computed by `openssl`.
pub fn spki_pin(cert_pem: &str) -> String {
    let script = "openssl x509 -pubkey -noout | openssl pkey -pubin -outform der \
                  | openssl dgst -sha256 -binary | base64";
    let mut child = Command::new("sh")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(cert_pem.as_bytes())
        .expect("write certificate");
    let out = child.wait_with_output().expect("openssl output");
    assert!(
        out.status.success(),
        "openssl could not read the certificate"
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
