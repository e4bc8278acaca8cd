//! HTTP clients for the controller API (`flynn`) and the host API (`flynn-host`).

pub mod pin;
pub mod types;

use std::time::Duration;

use futures::StreamExt;
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use flynn_model::{App, Certificate, NewCertificate, Route, Service};
pub use types::*;

/// Header carrying the cluster secret on host-to-host and host-admin requests.
pub const SECRET_HEADER: &str = "x-flynn-cluster-secret";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status and body.
    #[error("{message}")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    /// The request did not complete; for a write the outcome is unknown.
    #[error("cannot reach {url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("unexpected answer from {url}: {reason}")]
    Decode { url: String, reason: String },
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True when the server may or may not have applied the write.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            ClientError::Transport { .. } | ClientError::Decode { .. } => true,
            ClientError::Api { code, .. } => *code == ErrorCode::UnknownOutcome,
        }
    }
}

#[derive(Clone)]
struct Http {
    base: String,
    http: reqwest::Client,
    auth: Auth,
}

#[derive(Clone)]
enum Auth {
    Key(String),
    Secret(Option<String>),
}

/// How to reach a controller beyond its URL.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// Trust exactly the certificate with this pin (`flynn cluster add -p`).
    pub pin: Option<String>,
    /// Connect here instead of resolving the URL's host name (a cluster without DNS yet).
    pub ip: Option<std::net::IpAddr>,
}

/// Pooled connections idle longer than this are not reused: the API closes connections that
/// sit idle for 10 s, and a request sent on one it is closing would fail.
pub const POOL_IDLE: Duration = Duration::from_secs(5);

impl Http {
    fn new(base: &str, auth: Auth, timeout: Duration) -> Self {
        Self::with_tls(base, auth, timeout, &Tls::default()).expect("plain http client")
    }

    fn with_tls(base: &str, auth: Auth, timeout: Duration, tls: &Tls) -> Result<Self, ClientError> {
        let bad = |reason: String| ClientError::Transport {
            url: base.to_string(),
            reason,
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2).min(timeout))
            .timeout(timeout)
            .pool_idle_timeout(POOL_IDLE);
        if let Some(pin) = &tls.pin {
            builder = builder.use_preconfigured_tls(pin::pinned_config(pin).map_err(bad)?);
        }
        if let Some(ip) = tls.ip {
            let url = reqwest::Url::parse(base).map_err(|e| bad(e.to_string()))?;
            let host = url.host_str().unwrap_or_default().to_string();
            let port = url.port_or_known_default().unwrap_or(443);
            builder = builder.resolve(&host, std::net::SocketAddr::new(ip, port));
        }
        let http = builder.build().map_err(|e| bad(error_chain(&e)))?;
        Ok(Http {
            base: base.trim_end_matches('/').to_string(),
            http,
            auth,
        })
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        match &self.auth {
            Auth::Key(k) => rb.bearer_auth(k),
            Auth::Secret(Some(s)) => rb.header(SECRET_HEADER, s),
            Auth::Secret(None) => rb,
        }
    }

    /// Sends a request; a non-success answer becomes `ClientError::Api` (with the code and
    /// message of its JSON error body when it has one).
    async fn execute(
        &self,
        rb: reqwest::RequestBuilder,
    ) -> Result<(String, reqwest::Response), ClientError> {
        let req = rb.build().map_err(|e| ClientError::Transport {
            url: self.base.clone(),
            reason: e.to_string(),
        })?;
        let url = req.url().to_string();
        let transport = |e: reqwest::Error| ClientError::Transport {
            url: url.clone(),
            reason: error_chain(&e),
        };
        let resp = self.http.execute(req).await.map_err(transport)?;
        let status = resp.status();
        if status.is_success() {
            return Ok((url, resp));
        }
        let bytes = resp.bytes().await.map_err(transport)?;
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => ClientError::Api {
                status: status.as_u16(),
                code: b.error,
                message: b.message,
            },
            Err(_) => ClientError::Api {
                status: status.as_u16(),
                code: ErrorCode::from_status(status.as_u16()),
                message: String::from_utf8_lossy(&bytes).trim().to_string(),
            },
        })
    }

    async fn send<T: DeserializeOwned>(
        &self,
        rb: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let (url, resp) = self.execute(rb).await?;
        let bytes = resp.bytes().await.map_err(|e| ClientError::Transport {
            url: url.clone(),
            reason: error_chain(&e),
        })?;
        let body: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        serde_json::from_slice(body).map_err(|e| ClientError::Decode {
            url,
            reason: e.to_string(),
        })
    }

    /// A streamed download: the response once its status says success. Archives take as
    /// long as they take: no overall timeout, only the connect and idle limits.
    async fn download(&self, path: &str) -> Result<reqwest::Response, ClientError> {
        let rb = self
            .request(Method::GET, path)
            .timeout(Duration::from_secs(7 * 24 * 3600));
        Ok(self.execute(rb).await?.1)
    }

    /// A streamed upload answered with JSON.
    async fn upload<T: DeserializeOwned>(
        &self,
        path: &str,
        body: reqwest::Body,
    ) -> Result<T, ClientError> {
        let rb = self
            .request(Method::PUT, path)
            .timeout(Duration::from_secs(7 * 24 * 3600))
            .body(body);
        self.send(rb).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send(self.request(Method::GET, path)).await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        self.send(self.request(Method::POST, path).json(body)).await
    }

    async fn put<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ClientError> {
        self.send(self.request(Method::PUT, path).json(body)).await
    }

    async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.send::<serde_json::Value>(self.request(Method::DELETE, path))
            .await
            .map(|_| ())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Percent-encodes one path segment.
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Client of the controller API served by every host.
#[derive(Clone)]
pub struct ControllerClient {
    http: Http,
}

impl ControllerClient {
    pub fn new(url: &str, key: &str) -> Self {
        Self::with_timeout(url, key, Duration::from_secs(30))
    }

    /// A client that reaches the controller over TLS with a pinned certificate and/or a
    /// fixed address (see [`Tls`]).
    pub fn with_tls(url: &str, key: &str, tls: &Tls) -> Result<Self, ClientError> {
        Ok(ControllerClient {
            http: Http::with_tls(
                url,
                Auth::Key(key.to_string()),
                Duration::from_secs(30),
                tls,
            )?,
        })
    }

    pub fn with_timeout(url: &str, key: &str, timeout: Duration) -> Self {
        ControllerClient {
            http: Http::new(url, Auth::Key(key.to_string()), timeout),
        }
    }

    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        self.http.get("/status").await
    }

    pub async fn apps(&self) -> Result<Vec<App>, ClientError> {
        self.http.get("/apps").await
    }

    pub async fn app(&self, name: &str) -> Result<App, ClientError> {
        self.http.get(&format!("/apps/{}", seg(name))).await
    }

    pub async fn create_app(&self, name: &str) -> Result<App, ClientError> {
        self.http
            .post("/apps", &CreateApp { name: name.into() })
            .await
    }

    pub async fn delete_app(&self, name: &str) -> Result<(), ClientError> {
        self.http.delete(&format!("/apps/{}", seg(name))).await
    }

    /// What the cluster provisions (`GET /providers`).
    pub async fn providers(&self) -> Result<Vec<ProviderInfo>, ClientError> {
        self.http.get("/providers").await
    }

    /// The app's resources, oldest first.
    pub async fn app_resources(
        &self,
        app: &str,
    ) -> Result<Vec<flynn_model::Resource>, ClientError> {
        self.http
            .get(&format!("/apps/{}/resources", seg(app)))
            .await
    }

    /// Provisions a `provider` resource for `app`: its database made and its env deployed.
    /// A first one also starts the provider's server, so this may take minutes.
    pub async fn add_resource(
        &self,
        provider: &str,
        app: &str,
    ) -> Result<ProvisionedResource, ClientError> {
        let req = ProvisionRequest {
            app: Some(app.into()),
            apps: Vec::new(),
        };
        let rb = self
            .http
            .request(
                Method::POST,
                &format!("/providers/{}/resources", seg(provider)),
            )
            .timeout(Duration::from_secs(300))
            .json(&req);
        self.http.send(rb).await
    }

    /// The Postgres server's base backups and archived WAL (`flynn pg backups`).
    pub async fn pg_backups(&self, app: &str) -> Result<serde_json::Value, ClientError> {
        self.http
            .get(&format!("/apps/{}/pg/backups", seg(app)))
            .await
    }

    /// A base backup of the Postgres server now (`flynn pg backups capture`).
    pub async fn pg_capture(&self, app: &str) -> Result<serde_json::Value, ClientError> {
        let rb = self
            .http
            .request(Method::POST, &format!("/apps/{}/pg/backups", seg(app)))
            .timeout(Duration::from_secs(3600));
        self.http.send(rb).await
    }

    /// The app's database as it was at `to` (RFC 3339), or at its last archived commit
    /// (`flynn pg backups restore [--to TIME]`).
    pub async fn pg_restore(
        &self,
        app: &str,
        to: Option<&str>,
    ) -> Result<serde_json::Value, ClientError> {
        let rb = self
            .http
            .request(Method::POST, &format!("/apps/{}/pg/restore", seg(app)))
            .timeout(Duration::from_secs(3600))
            .json(&serde_json::json!({ "to": to }));
        self.http.send(rb).await
    }

    /// Removes a resource (of `provider`, when given): its env unset, its database dropped.
    pub async fn remove_resource(
        &self,
        provider: Option<&str>,
        id: &str,
    ) -> Result<flynn_model::Resource, ClientError> {
        let path = match provider {
            Some(p) => format!("/providers/{}/resources/{}", seg(p), seg(id)),
            None => format!("/resources/{}", seg(id)),
        };
        self.http
            .send(self.http.request(Method::DELETE, &path))
            .await
    }

    /// `GET /backup`: the cluster backup archive, streamed (headers `x-flynn-backup-*`
    /// say what it holds).
    pub async fn backup(&self) -> Result<reqwest::Response, ClientError> {
        self.http.download("/backup").await
    }

    /// `GET /apps/APP/export`: the app's export archive, streamed.
    pub async fn export_app(&self, app: &str) -> Result<reqwest::Response, ClientError> {
        self.http
            .download(&format!("/apps/{}/export", seg(app)))
            .await
    }

    /// `PUT /apps/import?name=&routes=`: imports an app export archive.
    pub async fn import_app(
        &self,
        name: Option<&str>,
        routes: bool,
        body: reqwest::Body,
    ) -> Result<serde_json::Value, ClientError> {
        let mut path = format!("/apps/import?routes={routes}");
        if let Some(n) = name {
            path.push_str(&format!("&name={}", seg(n)));
        }
        self.http.upload(&path, body).await
    }

    /// The env a process of `proc_type` sees (global merged with the override).
    pub async fn env(
        &self,
        app: &str,
        proc_type: Option<&str>,
    ) -> Result<std::collections::BTreeMap<String, String>, ClientError> {
        let q = proc_type
            .map(|t| format!("?type={}", seg(t)))
            .unwrap_or_default();
        self.http.get(&format!("/apps/{}/env{q}", seg(app))).await
    }

    /// Like [`Self::env`] but answered from the contacted host's applied state, without
    /// confirming with the leader (faster, possibly stale).
    pub async fn env_stale(
        &self,
        app: &str,
    ) -> Result<std::collections::BTreeMap<String, String>, ClientError> {
        self.http
            .get(&format!("/apps/{}/env?stale=true", seg(app)))
            .await
    }

    pub async fn update_env(&self, app: &str, update: &EnvUpdate) -> Result<App, ClientError> {
        self.http
            .post(&format!("/apps/{}/env", seg(app)), update)
            .await
    }

    pub async fn routes(&self, app: &str) -> Result<Vec<Route>, ClientError> {
        self.http.get(&format!("/apps/{}/routes", seg(app))).await
    }

    pub async fn add_route(&self, app: &str, route: &RouteRequest) -> Result<Route, ClientError> {
        self.http
            .post(&format!("/apps/{}/routes", seg(app)), route)
            .await
    }

    pub async fn remove_route(&self, app: &str, id: &str) -> Result<(), ClientError> {
        self.http
            .delete(&format!("/apps/{}/routes/{}", seg(app), seg(id)))
            .await
    }

    pub async fn certificates(&self) -> Result<Vec<Certificate>, ClientError> {
        self.http.get("/certificates").await
    }

    pub async fn add_certificate(&self, c: &NewCertificate) -> Result<Certificate, ClientError> {
        self.http.post("/certificates", c).await
    }

    pub async fn service(&self, name: &str) -> Result<Service, ClientError> {
        self.http.get(&format!("/services/{}", seg(name))).await
    }

    pub async fn register_instance(
        &self,
        service: &str,
        id: &str,
        reg: &InstanceRegistration,
    ) -> Result<flynn_model::Instance, ClientError> {
        self.http
            .put(
                &format!("/services/{}/instances/{}", seg(service), seg(id)),
                reg,
            )
            .await
    }

    pub async fn heartbeat(
        &self,
        service: &str,
        id: &str,
    ) -> Result<flynn_model::Instance, ClientError> {
        self.http
            .post(
                &format!("/services/{}/instances/{}/heartbeat", seg(service), seg(id)),
                &serde_json::json!({}),
            )
            .await
    }

    /// Whether the cluster already stores the layer with this SHA-512.
    pub async fn has_layer(&self, sha512: &str) -> Result<bool, ClientError> {
        match self
            .http
            .get::<serde_json::Value>(&format!("/layers/{}", seg(sha512)))
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Uploads a layer (its bytes as stored), streamed; the host checks it against `sha512`.
    pub async fn put_layer(
        &self,
        sha512: &str,
        body: reqwest::Body,
    ) -> Result<serde_json::Value, ClientError> {
        let rb = self
            .http
            .request(Method::PUT, &format!("/layers/{}", seg(sha512)))
            .timeout(Duration::from_secs(3600))
            .body(body);
        self.http.send(rb).await
    }

    /// A named image of the cluster (`base`).
    pub async fn image(&self, name: &str) -> Result<flynn_model::Image, ClientError> {
        self.http.get(&format!("/images/{}", seg(name))).await
    }

    pub async fn put_image(
        &self,
        name: &str,
        image: &flynn_model::Image,
    ) -> Result<flynn_model::Image, ClientError> {
        self.http
            .put(&format!("/images/{}", seg(name)), image)
            .await
    }

    /// Makes a release and deploys it; with `wait`, answers once it runs (or has been rolled
    /// back, as an error).
    pub async fn create_release(
        &self,
        app: &str,
        req: &flynn_model::NewRelease,
        wait: bool,
    ) -> Result<flynn_model::Release, ClientError> {
        let path = format!("/apps/{}/releases?wait={wait}", seg(app));
        let rb = self
            .http
            .request(Method::POST, &path)
            .timeout(Duration::from_secs(180))
            .json(req);
        self.http.send(rb).await
    }

    pub async fn releases(&self, app: &str) -> Result<Vec<flynn_model::Release>, ClientError> {
        self.http.get(&format!("/apps/{}/releases", seg(app))).await
    }

    pub async fn release(&self, id: &str) -> Result<flynn_model::Release, ClientError> {
        self.http.get(&format!("/releases/{}", seg(id))).await
    }

    /// Where a release's rollout stands.
    pub async fn rollout(
        &self,
        app: &str,
        release: &str,
    ) -> Result<flynn_model::Rollout, ClientError> {
        self.http
            .get(&format!(
                "/apps/{}/releases/{}/rollout",
                seg(app),
                seg(release)
            ))
            .await
    }

    pub async fn formation(&self, app: &str) -> Result<flynn_model::Formation, ClientError> {
        self.http
            .get(&format!("/apps/{}/formation", seg(app)))
            .await
    }

    pub async fn scale(
        &self,
        app: &str,
        req: &ScaleRequest,
    ) -> Result<flynn_model::Formation, ClientError> {
        self.http
            .post(&format!("/apps/{}/scale", seg(app)), req)
            .await
    }

    pub async fn set_limits(
        &self,
        app: &str,
        req: &SetLimits,
    ) -> Result<flynn_model::Release, ClientError> {
        self.http
            .post(&format!("/apps/{}/limits", seg(app)), req)
            .await
    }

    pub async fn jobs(&self, app: &str) -> Result<Vec<flynn_model::Job>, ClientError> {
        self.http.get(&format!("/apps/{}/jobs", seg(app))).await
    }

    pub async fn kill_job(&self, app: &str, id: &str) -> Result<flynn_model::Job, ClientError> {
        let path = format!("/apps/{}/jobs/{}", seg(app), seg(id));
        self.http
            .send(self.http.request(Method::DELETE, &path))
            .await
    }

    /// Starts a one-off job of the app's current release.
    pub async fn run(&self, app: &str, req: &RunRequest) -> Result<flynn_model::Job, ClientError> {
        self.http
            .post(&format!("/apps/{}/run", seg(app)), req)
            .await
    }

    /// Sets the window size of a one-off job's terminal.
    pub async fn job_resize(
        &self,
        app: &str,
        id: &str,
        size: flynn_model::TtySize,
    ) -> Result<serde_json::Value, ClientError> {
        self.http
            .post(
                &format!("/apps/{}/jobs/{}/resize", seg(app), seg(id)),
                &size,
            )
            .await
    }

    pub async fn build(
        &self,
        app: &str,
        req: &BuildRequest,
    ) -> Result<flynn_model::Job, ClientError> {
        self.http
            .post(&format!("/apps/{}/builds", seg(app)), req)
            .await
    }

    /// Uploads a one-off job's stdin, streamed; its end closes the job's stdin.
    pub async fn job_stdin(
        &self,
        app: &str,
        id: &str,
        body: reqwest::Body,
    ) -> Result<serde_json::Value, ClientError> {
        let path = format!("/apps/{}/jobs/{}/stdin", seg(app), seg(id));
        let rb = self
            .http
            .request(Method::PUT, &path)
            .timeout(Duration::from_secs(7 * 86400))
            .body(body);
        self.http.send(rb).await
    }

    /// A one-off job's output: NDJSON lines `{"stream","data"(base64)}`, then `{"exit":N}`.
    pub async fn job_output(&self, app: &str, id: &str) -> Result<reqwest::Response, ClientError> {
        let path = format!("/apps/{}/jobs/{}/output", seg(app), seg(id));
        let rb = self
            .http
            .request(Method::GET, &path)
            .timeout(Duration::from_secs(7 * 86400));
        Ok(self.http.execute(rb).await?.1)
    }

    /// The app's log lines from every host, in order.
    pub async fn app_log(
        &self,
        q: &flynn_model::LogQuery,
    ) -> Result<Vec<flynn_model::LogLine>, ClientError> {
        let path = format!("/apps/{}/log", seg(&q.app));
        let rb = self
            .http
            .request(Method::GET, &path)
            .query(&LogParams::from(q));
        self.http.send(rb).await
    }

    /// Opens the watch stream and hands each line to `f` until it returns false or the
    /// stream ends.
    pub async fn watch(
        &self,
        since: u64,
        f: impl FnMut(WatchLine) -> bool,
    ) -> Result<(), ClientError> {
        self.watch_from(since, false, f).await
    }

    /// Like [`Self::watch`]; with `stale`, the host answers from its own applied state even
    /// when it cannot reach the leader (what a router on that host wants).
    pub async fn watch_from(
        &self,
        since: u64,
        stale: bool,
        mut f: impl FnMut(WatchLine) -> bool,
    ) -> Result<(), ClientError> {
        // The stream is long-lived: no overall timeout.
        let rb = self
            .http
            .request(Method::GET, &format!("/watch?since={since}&stale={stale}"))
            .timeout(Duration::from_secs(24 * 3600));
        let (url, resp) = self.http.execute(rb).await?;
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ClientError::Transport {
                url: url.clone(),
                reason: error_chain(&e),
            })?;
            buf.extend_from_slice(&chunk);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let item: WatchLine =
                    serde_json::from_slice(&line).map_err(|e| ClientError::Decode {
                        url: url.clone(),
                        reason: e.to_string(),
                    })?;
                if !f(item) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// Client of a host's own API: bootstrap, membership and host listing.
#[derive(Clone)]
pub struct HostClient {
    http: Http,
}

impl HostClient {
    /// `secret` is the cluster secret; calls that need none work without it.
    pub fn new(url: &str, secret: Option<&str>, timeout: Duration) -> Self {
        HostClient {
            http: Http::new(url, Auth::Secret(secret.map(String::from)), timeout),
        }
    }

    pub async fn info(&self) -> Result<HostInfo, ClientError> {
        self.http.get("/host/info").await
    }

    pub async fn status(&self) -> Result<ClusterStatus, ClientError> {
        self.http.get("/host/status").await
    }

    pub async fn list(&self) -> Result<Vec<HostEntry>, ClientError> {
        self.http.get("/host/list").await
    }

    /// Every component the host runs, with its status (`/host/components`).
    pub async fn components(&self) -> Result<serde_json::Value, ClientError> {
        self.http.get("/host/components").await
    }

    /// `POST /host/drain`: marks `host` draining (its jobs move elsewhere) or not.
    pub async fn drain(
        &self,
        host: &str,
        draining: bool,
    ) -> Result<serde_json::Value, ClientError> {
        self.http
            .post(
                "/host/drain",
                &serde_json::json!({"host": host, "draining": draining}),
            )
            .await
    }

    /// `PUT /host/update`: sends a new `flynn-host` binary (or, with `rollback`, asks for
    /// the one the last update replaced); the daemon replaces itself by it.
    pub async fn update(
        &self,
        binary: Option<reqwest::Body>,
        expect: Option<&str>,
    ) -> Result<serde_json::Value, ClientError> {
        let mut path = format!("/host/update?rollback={}", binary.is_none());
        if let Some(v) = expect {
            path.push_str(&format!("&expect={}", seg(v)));
        }
        match binary {
            Some(b) => self.http.upload(&path, b).await,
            None => {
                self.http
                    .upload(&path, reqwest::Body::from(Vec::new()))
                    .await
            }
        }
    }

    /// `PUT /host/restore`: restores a checked backup archive into this new cluster.
    pub async fn restore(&self, body: reqwest::Body) -> Result<serde_json::Value, ClientError> {
        self.http.upload("/host/restore", body).await
    }

    /// This host's own health checks (`GET /host/health`, cluster secret).
    pub async fn health(&self) -> Result<HostHealth, ClientError> {
        self.http.get("/host/health").await
    }

    /// The XDP firewall's interfaces, policy and counters (JSON as the host reports it).
    pub async fn firewall(&self) -> Result<serde_json::Value, ClientError> {
        self.http.get("/host/firewall").await
    }

    pub async fn bootstrap(&self, req: &BootstrapRequest) -> Result<HostInfo, ClientError> {
        self.http.post("/host/bootstrap", req).await
    }

    pub async fn join(&self, req: &JoinRequest) -> Result<serde_json::Value, ClientError> {
        self.http.post("/host/join", req).await
    }

    pub async fn promote(&self, host: &str) -> Result<Vec<HostEntry>, ClientError> {
        self.http
            .post(
                "/host/promote",
                &MembershipRequest {
                    host: host.into(),
                    force: false,
                },
            )
            .await
    }

    pub async fn demote(&self, host: &str, force: bool) -> Result<Vec<HostEntry>, ClientError> {
        self.http
            .post(
                "/host/demote",
                &MembershipRequest {
                    host: host.into(),
                    force,
                },
            )
            .await
    }

    /// This host's volumes (`all`: every host's, from the cluster state).
    pub async fn volumes(&self, all: bool) -> Result<serde_json::Value, ClientError> {
        let path = if all {
            "/host/volumes?all=true"
        } else {
            "/host/volumes"
        };
        self.http.get(path).await
    }

    pub async fn create_volume(&self, req: &NewVolume) -> Result<serde_json::Value, ClientError> {
        self.http.post("/host/volumes", req).await
    }

    pub async fn volume(&self, id: &str) -> Result<serde_json::Value, ClientError> {
        self.http.get(&format!("/host/volumes/{}", seg(id))).await
    }

    /// Deletes a volume; `force` also one that holds a database server's data.
    pub async fn delete_volume(&self, id: &str, force: bool) -> Result<(), ClientError> {
        self.http
            .delete(&format!("/host/volumes/{}?force={force}", seg(id)))
            .await
    }

    pub async fn snapshot_volume(
        &self,
        id: &str,
        name: Option<&str>,
    ) -> Result<serde_json::Value, ClientError> {
        let body = serde_json::json!({ "name": name });
        let path = format!("/host/volumes/{}/snapshots", seg(id));
        self.http.post(&path, &body).await
    }

    /// Jobs placed on this host (`all`: with its stopped ones).
    pub async fn jobs(&self, all: bool) -> Result<Vec<serde_json::Value>, ClientError> {
        self.http.get(&format!("/host/jobs?all={all}")).await
    }

    /// The cluster state's records whose storage key starts with `prefix`, and the revision.
    pub async fn state(&self, prefix: &str) -> Result<serde_json::Value, ClientError> {
        self.http
            .get(&format!("/host/state?prefix={}", seg(prefix)))
            .await
    }

    pub async fn stop_job(&self, id: &str) -> Result<flynn_model::Job, ClientError> {
        let path = format!("/host/jobs/{}/stop", seg(id));
        self.http.post(&path, &serde_json::json!({})).await
    }

    /// This host's log lines for an app.
    pub async fn logs(
        &self,
        q: &flynn_model::LogQuery,
    ) -> Result<Vec<flynn_model::LogLine>, ClientError> {
        let mut params = LogParams::from(q);
        params.app = Some(&q.app);
        let rb = self.http.request(Method::GET, "/host/logs").query(&params);
        self.http.send(rb).await
    }

    pub async fn send_volume(
        &self,
        id: &str,
        req: &SendVolume,
    ) -> Result<serde_json::Value, ClientError> {
        let path = format!("/host/volumes/{}/send", seg(id));
        self.http.post(&path, req).await
    }

    /// `PUT /host/volumes/{id}/receive` (cluster secret): a `zfs send` stream received into
    /// volume `id` on this host, recorded with `owner` (app, and process type with mount
    /// path) when given.
    pub async fn receive_volume(
        &self,
        id: &str,
        owner: Option<(&str, Option<(&str, &str)>)>,
        stream: reqwest::Body,
    ) -> Result<serde_json::Value, ClientError> {
        let mut path = format!("/host/volumes/{}/receive", seg(id));
        if let Some((app, typed)) = owner {
            path.push_str(&format!("?app={}", seg(app)));
            if let Some((proc_type, mount)) = typed {
                path.push_str(&format!(
                    "&proc_type={}&path={}",
                    seg(proc_type),
                    seg(mount)
                ));
            }
        }
        self.http.upload(&path, stream).await
    }

    /// `GET /host/volumes/{id}/export` (cluster secret): volume `id`'s full `zfs send`
    /// stream, as it comes.
    pub async fn export_volume(&self, id: &str) -> Result<reqwest::Response, ClientError> {
        self.http
            .download(&format!("/host/volumes/{}/export", seg(id)))
            .await
    }
}

/// A log query as URL parameters.
#[derive(Serialize)]
struct LogParams<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    app: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    job: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    proc_type: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lines: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    after: Option<&'a str>,
}

impl<'a> From<&'a flynn_model::LogQuery> for LogParams<'a> {
    fn from(q: &'a flynn_model::LogQuery) -> Self {
        LogParams {
            app: None,
            job: q.job.as_deref(),
            proc_type: q.proc_type.as_deref(),
            lines: q.lines,
            after: q.after.as_deref(),
        }
    }
}
