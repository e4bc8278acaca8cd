//! The web dashboard at `dashboard.$CLUSTER_DOMAIN`: its API without a browser (sessions,
//! CSRF tokens, origins, the login limit, expiry, key rotation), then the page itself in a
//! real headless chromium through the router, with the controller's certificate pinned.
//! Needs root; run with `--test-threads=1` like the other cluster cases.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use flynn_tests::webdriver::{self, Browser};
use flynn_tests::{eventually, ok, Cluster, PORT};
use reqwest::header::{COOKIE, SET_COOKIE};
use reqwest::StatusCode;
use serde_json::{json, Value};

const DOMAIN: &str = "dash.test";

fn dashboard_name() -> String {
    format!("dashboard.{DOMAIN}")
}

/// A cluster of `n` with the domain, ready for jobs.
async fn cluster(n: usize) -> Cluster {
    let mut c = Cluster::start(n);
    c.bootstrap_with(n, &["--domain", DOMAIN]);
    c.wait_leader(0, None).await;
    c.wait_ready_for_jobs(n).await;
    c
}

fn login_token(c: &Cluster) -> String {
    ok(&c.flynn(0, &["-a", "dashboard", "env", "get", "LOGIN_TOKEN"]))
        .trim()
        .to_string()
}

/// Talks to host `i`'s API as `dashboard.$DOMAIN` (no router in between: the API answers
/// by name), keeping no cookies of its own.
struct Dash {
    http: reqwest::Client,
    base: String,
}

impl Dash {
    fn new(c: &Cluster, i: usize) -> Dash {
        let addr: SocketAddr = format!("{}:{PORT}", c.hosts[i].ip).parse().unwrap();
        Dash {
            http: reqwest::Client::builder()
                .no_proxy()
                .resolve(&dashboard_name(), addr)
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            base: format!("http://{}:{PORT}", dashboard_name()),
        }
    }

    /// The dashboard's own origin, as a browser names it (HTTPS through the router).
    fn origin(&self) -> String {
        self.base.replacen("http://", "https://", 1)
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        cookie: Option<&str>,
        csrf: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(id) = cookie {
            req = req.header(COOKIE, format!("__Host-flynn_session={id}"));
        }
        if let Some(t) = csrf {
            req = req.header("x-csrf-token", t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.expect("dashboard request");
        let (status, headers) = (r.status(), r.headers().clone());
        let text = r.text().await.unwrap_or_default();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, v)
    }

    async fn post(
        &self,
        path: &str,
        cookie: Option<&str>,
        csrf: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        self.send(reqwest::Method::POST, path, cookie, csrf, body, &[])
            .await
    }

    async fn try_login(&self, secret: &str) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let body = json!({ "token": secret });
        self.post("/login", None, None, Some(body)).await
    }

    /// Logs in with `secret`; the session id and CSRF token.
    async fn login(&self, secret: &str) -> (String, String) {
        let (status, headers, body) = self.try_login(secret).await;
        assert_eq!(status, StatusCode::OK, "login: {body}");
        let cookie = headers
            .get(SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .expect("a session cookie")
            .to_string();
        for attr in ["HttpOnly", "Secure", "SameSite=Strict"] {
            assert!(cookie.contains(attr), "{cookie} lacks {attr}");
        }
        let id = cookie
            .split(';')
            .next()
            .and_then(|kv| kv.strip_prefix("__Host-flynn_session="))
            .expect("__Host-flynn_session=ID")
            .to_string();
        (id, body["csrf"].as_str().expect("csrf").to_string())
    }

    async fn get(&self, path: &str, cookie: Option<&str>) -> (StatusCode, Value) {
        let (s, _, v) = self
            .send(reqwest::Method::GET, path, cookie, None, None, &[])
            .await;
        (s, v)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t01_sessions_need_the_cookie_the_csrf_token_and_the_dashboards_origin() {
    let c = cluster(1).await;
    let d = Dash::new(&c, 0);
    let token = login_token(&c);
    assert_eq!(token.len(), 40, "bootstrap made a login token: {token:?}");

    // The page is there for anyone; the API is not.
    let page = d
        .http
        .get(format!("{}/", d.base))
        .send()
        .await
        .expect("page");
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page
        .headers()
        .get("content-security-policy")
        .is_some_and(|v| v.to_str().unwrap().contains("default-src 'self'")));
    assert!(page.text().await.unwrap().contains("/assets/app.js"));
    let (s, body) = d.get("/api/apps", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "unauthorized", "a JSON error: {body}");
    // The same paths on the API's own name are the controller API, which wants a key.
    let plain = reqwest::Client::new()
        .get(format!("{}/", c.hosts[0].url()))
        .send()
        .await
        .expect("status page");
    let plain = plain.text().await.unwrap_or_default();
    assert!(
        !plain.contains("/assets/app.js"),
        "only the dashboard's name gets the dashboard: {plain}"
    );

    // A malformed login is refused; the right token opens a session (wrong ones: at the
    // end, where they lock this address out).
    let (s, _, body) = d.post("/login", None, None, Some(json!({"tok": 1}))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "malformed: {body}");
    let (id, csrf) = d.login(&token).await;
    let (s, apps) = d.get("/api/apps", Some(&id)).await;
    assert_eq!(s, StatusCode::OK, "{apps}");
    assert!(apps
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["name"] == "dashboard"));
    // The browser never gets a key or the token, and a session cannot make itself one.
    let (s, env) = d.get("/api/apps/controller/env", Some(&id)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(env["AUTH_KEY"], "(hidden)", "{env}");
    let (_, env) = d.get("/api/apps/dashboard/env", Some(&id)).await;
    assert_eq!(env["LOGIN_TOKEN"], "(hidden)", "{env}");
    let (_, apps_text) = d.get("/api/apps", Some(&id)).await;
    let apps_text = apps_text.to_string();
    assert!(!apps_text.contains(&c.key) && !apps_text.contains(&token));
    let set_key = json!({"set": {"AUTH_KEY": format!("{},{}", c.key, "a".repeat(40))}});
    let (s, _, body) = d
        .post(
            "/api/apps/controller/env",
            Some(&id),
            Some(&csrf),
            Some(set_key),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    let unset = json!({"unset": ["LOGIN_TOKEN"]});
    let (s, _, _) = d
        .post(
            "/api/apps/dashboard/env",
            Some(&id),
            Some(&csrf),
            Some(unset),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(login_token(&c), token, "nothing changed");
    for path in ["/api/backup", "/api/apps/dashboard/export"] {
        assert_eq!(
            d.get(path, Some(&id)).await.0,
            StatusCode::FORBIDDEN,
            "{path}"
        );
    }
    // Only the controller API is under /api: no host-to-host or host-admin endpoint.
    for path in [
        "/api/host/state",
        "/api/host/list",
        "/host/list",
        "/raft/vote",
    ] {
        assert_eq!(
            d.get(path, Some(&id)).await.0,
            StatusCode::NOT_FOUND,
            "{path}"
        );
    }

    let (s, _) = d.get("/charts", None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "charts need a session");
    let (s, charts) = d.get("/charts", Some(&id)).await;
    assert_eq!(s, StatusCode::OK, "{charts}");
    let host = &charts["hosts"][0];
    assert_eq!(host["answered"], true, "{charts}");
    assert!(host["load1"].as_f64().is_some() && host["cpus"].as_f64() >= Some(1.0));
    let (s, info) = d.get("/session", Some(&id)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(info["csrf"], csrf.as_str());
    assert_eq!(info["credential"], "token");

    // A change needs the CSRF token, and the right one.
    let create = |csrf: Option<&str>, name: &str| {
        let body = json!({ "name": name });
        let csrf = csrf.map(str::to_string);
        let d = &d;
        let id = id.clone();
        async move {
            d.post("/api/apps", Some(&id), csrf.as_deref(), Some(body))
                .await
        }
    };
    let (s, _, body) = create(None, "nocsrf").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(body["message"].as_str().unwrap().contains("CSRF"), "{body}");
    let (s, _, body) = create(Some(&"0".repeat(64)), "badcsrf").await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    let (s, _, body) = create(Some(&csrf), "fromdash").await;
    assert!(s.is_success(), "{s} {body}");
    // No route of the page's apps may stand in front of the controller.
    for spec in [
        json!({"type": "http", "domain": format!("controller.{DOMAIN}"), "path": "/apps/"}),
        json!({"type": "http", "domain": "x.example.com", "service": "controller"}),
    ] {
        let (s, _, body) = d
            .post(
                "/api/apps/fromdash/routes",
                Some(&id),
                Some(&csrf),
                Some(spec),
            )
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    }
    let names = ok(&c.flynn(0, &["apps"]));
    assert!(names.contains("fromdash") && !names.contains("nocsrf") && !names.contains("badcsrf"));

    // A request that says it comes from another origin is refused, cookie or not.
    for headers in [
        vec![("origin", "https://evil.test")],
        vec![("sec-fetch-site", "cross-site")],
    ] {
        let (s, _, body) = d
            .send(
                reqwest::Method::GET,
                "/api/apps",
                Some(&id),
                None,
                None,
                &headers,
            )
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{headers:?}: {body}");
        let (s, _, _) = d
            .send(
                reqwest::Method::POST,
                "/api/apps",
                Some(&id),
                Some(&csrf),
                Some(json!({"name": "evil"})),
                &headers,
            )
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN);
    }
    let own = d.origin();
    let (s, _, _) = d
        .send(
            reqwest::Method::GET,
            "/api/apps",
            Some(&id),
            None,
            None,
            &[("origin", own.as_str()), ("sec-fetch-site", "same-origin")],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "its own origin passes");

    // Logout needs the token too, then ends the session.
    let (s, _, _) = d.post("/logout", Some(&id), None, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, headers, _) = d.post("/logout", Some(&id), Some(&csrf), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(headers[SET_COOKIE].to_str().unwrap().contains("Max-Age=0"));
    let (s, _) = d.get("/api/apps", Some(&id)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED, "logged out");

    // Five wrong logins in a row: each refused, then the address waits, even with the
    // right token.
    for _ in 0..5 {
        let (s, _, body) = d.try_login("wrong").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{body}");
    }
    let (s, headers, body) = d.try_login(&token).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "Retry-After {wait}");
}

#[tokio::test(flavor = "multi_thread")]
async fn t02_sessions_expire_and_rotating_the_key_ends_the_ones_it_opened() {
    let mut c = cluster(1).await;
    let d = Dash::new(&c, 0);
    let token = login_token(&c);
    ok(&c.flynn(0, &["-a", "dashboard", "env", "set", "SESSION_TTL=10s"]));
    let (short, _) = d.login(&token).await;
    assert_eq!(d.get("/api/apps", Some(&short)).await.0, StatusCode::OK);
    ok(&c.flynn(0, &["-a", "dashboard", "env", "unset", "SESSION_TTL"]));
    let (by_token, _) = d.login(&token).await;
    let old = c.key.clone();
    let (by_key, _) = d.login(&old).await;
    assert_eq!(
        d.get("/session", Some(&by_key)).await.1["credential"],
        "key"
    );
    eventually(
        Duration::from_secs(15),
        "the short session expired",
        || async {
            (d.get("/api/apps", Some(&short)).await.0 == StatusCode::UNAUTHORIZED).then_some(())
        },
    )
    .await;
    assert_eq!(d.get("/api/apps", Some(&by_token)).await.0, StatusCode::OK);

    // The documented rotation: both keys (the session lives on meanwhile), the new one
    // alone, the override dropped.
    let new = "feedfacefeedfacefeedfacefeedfacefeedface";
    let both = format!("AUTH_KEY={old},{new}");
    ok(&c.flynn(0, &["-a", "controller", "env", "set", "-t", "web", &both]));
    assert_eq!(
        d.get("/api/apps", Some(&by_key)).await.0,
        StatusCode::OK,
        "both keys accepted: the session lives on"
    );
    c.rotate_controller_key(0, new);
    assert_eq!(
        d.get("/api/apps", Some(&by_key)).await.0,
        StatusCode::UNAUTHORIZED,
        "the session opened with the rotated-out key ended"
    );
    assert_eq!(
        d.get("/api/apps", Some(&by_token)).await.0,
        StatusCode::OK,
        "a session opened with the login token is not the key's"
    );
    let (by_new, _) = d.login(new).await;
    assert_eq!(d.get("/api/apps", Some(&by_new)).await.0, StatusCode::OK);

    // A shorter session length ends the sessions already older than it.
    ok(&c.flynn(0, &["-a", "dashboard", "env", "set", "SESSION_TTL=10s"]));
    eventually(Duration::from_secs(5), "the old session ended", || async {
        (d.get("/api/apps", Some(&by_token)).await.0 == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn t03_a_session_opened_through_one_host_holds_on_every_host_at_once() {
    let c = cluster(3).await;
    let token = login_token(&c);
    let hosts: Vec<Dash> = (0..3).map(|i| Dash::new(&c, i)).collect();
    for round in 0..5 {
        let (id, csrf) = hosts[round % 3].login(&token).await;
        // At once, on every host: one that has not applied the session yet asks the leader.
        for (i, d) in hosts.iter().enumerate() {
            let (s, body) = d.get("/api/apps", Some(&id)).await;
            assert_eq!(s, StatusCode::OK, "round {round}, host {i}: {body}");
        }
        let (s, _, _) = hosts[(round + 1) % 3]
            .post("/logout", Some(&id), Some(&csrf), None)
            .await;
        assert_eq!(s, StatusCode::OK);
        for d in &hosts {
            eventually(Duration::from_secs(5), "logged out everywhere", || async {
                (d.get("/api/apps", Some(&id)).await.0 == StatusCode::UNAUTHORIZED).then_some(())
            })
            .await;
        }
    }
}

fn screenshot_dir() -> PathBuf {
    let dir = std::env::var_os("FLYNN_TEST_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard-screenshots")
        });
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn t10_the_page_in_a_real_browser_through_the_router() {
    assert!(
        webdriver::available(),
        "chromium and chromedriver are needed (script/test installs them)"
    );
    let mut c = cluster(1).await;
    let token = login_token(&c);
    let certs = c.client(0).certificates().await.expect("certificates");
    let cert = certs
        .iter()
        .find(|x| x.domains.contains(&dashboard_name()))
        .expect("the controller's certificate names the dashboard");
    let pin = webdriver::spki_pin(&cert.cert_pem);
    // An image whose web process writes a line every second and serves HTTP.
    let image = c.busybox_image(
        "web",
        Some("i=0; while true; do i=$((i+1)); echo tick $i; sleep 1; done & exec httpd -f -p $PORT -h /www"),
    );

    let b = Browser::start(
        &[(dashboard_name().as_str(), c.hosts[0].ip.as_str())],
        &pin,
        &screenshot_dir(),
    )
    .await;
    let url = format!("https://{}/", dashboard_name());
    b.goto(&url).await;
    b.wait_for("#secret", Duration::from_secs(20)).await;
    b.screenshot("01-login").await;

    // A wrong token is refused on the page.
    b.fill("#secret", "not-the-token").await;
    b.click("#login-submit").await;
    let said = b
        .wait_text("#login-error", Duration::from_secs(10), |t| !t.is_empty())
        .await;
    assert!(said.contains("wrong"), "{said}");

    // The right one shows the apps (none yet).
    b.fill("#secret", &token).await;
    b.click("#login-submit").await;
    b.wait_text("#apps", Duration::from_secs(10), |t| t.contains("No apps"))
        .await;
    let cookie_visible = b.eval("return document.cookie").await;
    assert_eq!(cookie_visible, "", "the session cookie is HttpOnly");

    // An app made on the page, an image archive deployed to it from the browser: its
    // layers uploaded, the release made, the rollout followed until the job runs.
    b.fill("#new-app", "web").await;
    b.click("#create-submit").await;
    b.choose_file("#deploy-file", &image).await;
    b.click("#deploy-submit").await;
    let said = b
        .wait_text("#deploy-status", Duration::from_secs(60), |t| {
            t.starts_with("Deployed") || t.contains("fail") || t.contains("corrupt")
        })
        .await;
    assert!(said.starts_with("Deployed web-v1"), "{said}");
    assert!(
        !said.contains(" 0 uploaded"),
        "the first deploy uploads: {said}"
    );
    b.wait_text("#jobs-body", Duration::from_secs(20), |t| {
        t.matches("running").count() == 1
    })
    .await;
    b.screenshot("02-app-deployed").await;
    let served = flynn_tests::router::get(
        format!("{}:80", c.hosts[0].ip).parse().unwrap(),
        &format!("web.{DOMAIN}"),
        "/",
    )
    .await;
    assert!(
        served.text().contains("hello from busybox web"),
        "{}",
        served.text()
    );
    // The same archive again: every layer is in the cluster already.
    b.choose_file("#deploy-file", &image).await;
    b.click("#deploy-submit").await;
    let said = b
        .wait_text("#deploy-status", Duration::from_secs(60), |t| {
            t.starts_with("Deployed web-v2")
        })
        .await;
    assert!(said.ends_with(" 0 uploaded)."), "{said}");
    // Something that is not an image archive is refused on the page, and nothing deploys.
    let junk = c.root_path().join("notes.tar");
    std::fs::write(&junk, "these are notes, not an image\n".repeat(100)).unwrap();
    b.choose_file("#deploy-file", &junk).await;
    b.click("#deploy-submit").await;
    let said = b
        .wait_text("#deploy-status", Duration::from_secs(20), |t| {
            t.contains("archive")
        })
        .await;
    assert!(
        said.contains("is not a tar archive (expected a docker save or OCI image archive)"),
        "{said}"
    );
    let release = c
        .client(0)
        .formation("web")
        .await
        .expect("formation")
        .release;
    assert_eq!(release, "web-v2", "nothing deployed");
    b.goto(&format!("{url}#/apps")).await;
    b.wait_text("#apps", Duration::from_secs(10), |t| t.contains("web"))
        .await;
    b.screenshot("02b-apps").await;

    // The app: its job running, then scaled to 2 (after the confirmation).
    b.goto(&format!("{url}#/apps/web")).await;
    b.wait_text("#jobs-body", Duration::from_secs(20), |t| {
        t.matches("running").count() == 1
    })
    .await;
    b.fill("#scale-web", "2").await;
    b.click("#scale-submit").await;
    let q = b
        .wait_text("#confirm-q", Duration::from_secs(5), |t| !t.is_empty())
        .await;
    assert!(q.contains("web 1 → 2"), "{q}");
    b.click("#confirm-yes").await;
    b.wait_text("#jobs-body", Duration::from_secs(30), |t| {
        t.matches("running").count() == 2
    })
    .await;
    b.screenshot("03-app-scaled").await;
    let jobs = c.client(0).jobs("web").await.expect("jobs");
    let running = jobs
        .iter()
        .filter(|j| j.state == flynn_model::JobState::Running)
        .count();
    assert_eq!(running, 2, "the cluster runs what the page shows");

    // The live charts: requests through the router show as requests/s and a p99, the
    // jobs' memory and CPU from their cgroups.
    let router: SocketAddr = format!("{}:80", c.hosts[0].ip).parse().unwrap();
    let load = tokio::spawn(async move {
        for _ in 0..400 {
            let r = flynn_tests::router::get(router, &format!("web.{DOMAIN}"), "/").await;
            assert_eq!(r.status, 200);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let rps = b
        .wait_text("#chart-rps-value", Duration::from_secs(15), |t| {
            t.parse::<f64>().is_ok_and(|v| v > 1.0)
        })
        .await;
    let p99 = b
        .wait_text("#chart-p99-value", Duration::from_secs(10), |t| {
            t.ends_with(" ms")
        })
        .await;
    let memory = b
        .wait_text("#chart-memory-value", Duration::from_secs(10), |t| {
            t.strip_suffix(" MiB")
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
        })
        .await;
    b.wait_text("#chart-cpu-value", Duration::from_secs(10), |t| {
        t.ends_with('%')
    })
    .await;
    b.screenshot("03b-app-charts").await;
    load.await.expect("load through the router");
    eprintln!("charts: {rps} requests/s, p99 {p99}, memory {memory}");

    // Env: a new variable saved makes a new release.
    let before = c
        .client(0)
        .formation("web")
        .await
        .expect("formation")
        .release;
    b.eval(
        "const e = document.getElementById('env'); e.value = e.value + '\\nGREETING=hello'; return 1;",
    )
    .await;
    b.click("#env-submit").await;
    let said = b
        .wait_text("#env-status", Duration::from_secs(20), |t| {
            t.contains("new release")
        })
        .await;
    let after = c
        .client(0)
        .formation("web")
        .await
        .expect("formation")
        .release;
    assert_ne!(before, after, "{said}");
    assert!(said.contains(&after), "{said} names {after}");
    let env = ok(&c.flynn(0, &["-a", "web", "env", "get", "GREETING"]));
    assert_eq!(env.trim(), "hello");
    b.screenshot("04-env-saved").await;

    // Logs follow what the app writes.
    b.goto(&format!("{url}#/apps/web/logs")).await;
    let first = b
        .wait_text("#log", Duration::from_secs(20), |t| t.contains("tick"))
        .await;
    let n = first.matches("tick").count();
    b.wait_text("#log", Duration::from_secs(20), |t| {
        t.matches("tick").count() > n + 1
    })
    .await;
    b.screenshot("05-logs").await;

    // Hosts and cluster pages read the same API.
    b.goto(&format!("{url}#/hosts")).await;
    b.wait_text("#hosts", Duration::from_secs(10), |t| t.contains("peer"))
        .await;
    let page = b.text("main").await;
    assert!(
        page.contains("router") && page.contains("jobs") && page.contains("web-web"),
        "each host's components and jobs: {page}"
    );
    b.screenshot("06-hosts").await;
    b.goto(&format!("{url}#/cluster")).await;
    b.wait_text("#cluster", Duration::from_secs(10), |t| {
        t.contains("Raft term")
    })
    .await;
    b.screenshot("07-cluster").await;

    // Log out: back to the login form, and the API refuses the old session.
    b.click("#logout").await;
    b.wait_for("#secret", Duration::from_secs(10)).await;
    let status = b
        .eval("return fetch('/api/apps').then(r => r.status)")
        .await;
    assert_eq!(status, 401, "logged out");

    // Log in with the controller key, rotate it out: the page is back at the login.
    b.fill("#secret", &c.key).await;
    b.click("#login-submit").await;
    b.wait_text("#apps", Duration::from_secs(10), |t| t.contains("web"))
        .await;
    c.rotate_controller_key(0, "0ddba11c0ffee0ddba11c0ffee0ddba11c0ffee0");
    b.goto(&format!("{url}#/apps")).await;
    b.eval("location.reload(); return 1;").await;
    b.wait_for("#secret", Duration::from_secs(10)).await;
    b.screenshot("08-after-key-rotation").await;
}

/// Fills a textarea in one step (typing a PEM key by key is slow and gains nothing).
async fn set_value(b: &Browser, css: &str, text: &str) {
    let js = format!(
        "document.querySelector({}).value = {}; return 1;",
        serde_json::to_string(css).unwrap(),
        serde_json::to_string(text).unwrap()
    );
    b.eval(&js).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn t11_routes_certificates_and_databases_from_the_page() {
    let image = std::env::var("FLYNN_TEST_DATABASES").expect(
        "FLYNN_TEST_DATABASES names the database image (script/test makes it with script/base-image OUT --databases)",
    );
    let c = cluster(1).await;
    ok(&c.flynn(0, &["base-image", "push", "--name", "databases", &image]));
    let token = login_token(&c);
    let certs = c.client(0).certificates().await.expect("certificates");
    let pin = webdriver::spki_pin(
        &certs
            .iter()
            .find(|x| x.domains.contains(&dashboard_name()))
            .expect("the dashboard's certificate")
            .cert_pem,
    );
    ok(&c.flynn(0, &["create", "web"]));
    let app_image = c.busybox_image("web", None);
    ok(&c.flynn(
        0,
        &["-a", "web", "docker", "push", app_image.to_str().unwrap()],
    ));

    let b = Browser::start(
        &[(dashboard_name().as_str(), c.hosts[0].ip.as_str())],
        &pin,
        &screenshot_dir(),
    )
    .await;
    let url = format!("https://{}/", dashboard_name());
    b.goto(&url).await;
    b.fill("#secret", &token).await;
    b.click("#login-submit").await;
    b.wait_text("#apps", Duration::from_secs(10), |t| t.contains("web"))
        .await;
    b.goto(&format!("{url}#/apps/web")).await;
    b.wait_text("#routes", Duration::from_secs(10), |t| {
        t.contains(&format!("web.{DOMAIN}"))
    })
    .await;

    // A TCP route on a port the router picks.
    b.click("#route-tcp-submit").await;
    let said = b
        .wait_text("#route-status", Duration::from_secs(10), |t| !t.is_empty())
        .await;
    assert!(said.starts_with("Added TCP port "), "{said}");
    let port: u16 = said
        .trim_start_matches("Added TCP port ")
        .trim_end_matches('.')
        .parse()
        .unwrap();
    assert!((3000..=3500).contains(&port), "{said}");

    // An HTTP route with its own certificate, plain HTTP redirected.
    let secure = format!("secure.{DOMAIN}");
    let cert = rcgen::generate_simple_self_signed(vec![secure.clone()]).unwrap();
    b.fill("#route-domain", &secure).await;
    set_value(&b, "#route-cert", &cert.cert.pem()).await;
    set_value(&b, "#route-key", &cert.signing_key.serialize_pem()).await;
    b.click("#route-https").await;
    b.click("#route-http-submit").await;
    b.wait_text("#route-status", Duration::from_secs(10), |t| {
        t.contains("with its certificate")
    })
    .await;
    let routes = b.text("#routes").await;
    assert!(
        routes.contains(&format!("tcp :{port}"))
            && routes.contains(&format!("certificate for {secure}, HTTP redirected")),
        "{routes}"
    );
    let listed = c.client(0).certificates().await.expect("certificates");
    let added = listed
        .iter()
        .find(|x| x.domains == vec![secure.clone()])
        .expect("the certificate is in the cluster");
    assert!(added.cert_pem.contains("BEGIN CERTIFICATE"));
    // Through the router: plain HTTP to the new name is sent to HTTPS.
    let router: SocketAddr = format!("{}:80", c.hosts[0].ip).parse().unwrap();
    let r = flynn_tests::router::get(router, &secure, "/").await;
    assert!(matches!(r.status, 301 | 302 | 307 | 308), "{}", r.status);
    b.screenshot("09-routes").await;

    // The TCP route removed from the page (after the confirmation).
    b.click(&format!(
        "#routes button[aria-label='Remove the route {port}']"
    ))
    .await;
    let q = b
        .wait_text("#confirm-q", Duration::from_secs(5), |t| !t.is_empty())
        .await;
    assert!(q.contains(&format!("tcp :{port}")), "{q}");
    b.click("#confirm-yes").await;
    b.wait_text("#routes", Duration::from_secs(10), |t| {
        !t.contains(&format!("tcp :{port}"))
    })
    .await;

    // A database from the page: provisioned, listed with the env it gave the app.
    b.wait_for("#provider option[value=redis]", Duration::from_secs(5))
        .await;
    b.eval("document.getElementById('provider').value = 'redis'; return 1;")
        .await;
    b.click("#resource-submit").await;
    let said = b
        .wait_text("#resource-status", Duration::from_secs(90), |t| {
            t.starts_with("Added") || t.contains("rror") || t.contains("fail")
        })
        .await;
    assert!(said.starts_with("Added redis "), "{said}");
    let listed = b.text("#resources").await;
    assert!(
        listed.contains("redis") && listed.contains("REDIS_URL"),
        "{listed}"
    );
    let env = ok(&c.flynn(0, &["-a", "web", "env", "get", "REDIS_URL"]));
    assert!(env.starts_with("redis://"), "{env}");
    b.screenshot("10-databases").await;
}
