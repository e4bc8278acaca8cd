//! Databases the cluster provisions (`flynn resource add postgres|mysql|redis`): their
//! servers, run as jobs of system apps from the cluster's database image, and each
//! resource's own database and user (Postgres, MariaDB) or instance (Redis).
//!
//! A server is an ordinary formation: the provider's app, one process type with a kept data
//! volume at `/data` (so it deploys stop-first and never loses its volume), its start script
//! written into the image as a layer of its own. Jobs reach the server's leader at a stable
//! service address (`100.100.0.N:PORT`, forwarded by every host: `jobs/network.rs`), which
//! is what a resource's env names, so the env stays true when the server moves.
//!
//! Provisioning makes the provider's database first, then records the resource and deploys
//! the app's new env in one state change (`ResourcesCommand::Provision`); if that change is
//! refused the database is dropped again, so nothing is left half-made.

pub mod archive;
pub mod dumps;
pub mod failover;
pub mod keeper;
mod mariadb;
pub(crate) mod postgres;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use flynn_state::jobs::JobsCommand;
use flynn_state::resources::{provider, Provider, Resource, ResourcesCommand, ServiceAddr};
use flynn_state::{AppsCommand, Image, ImageConfig, NewRelease, ProcessType, VolumeReq};

use crate::error::{ApiError, ApiResult};
use crate::host::Host;

/// The named image (`flynn base-image push --name databases`) the servers run on.
pub const IMAGE: &str = "databases";

/// How long provisioning waits for a server to serve (its first start unpacks the image).
const SERVER_START: Duration = Duration::from_secs(240);

/// One kind of server: its process type and start script.
struct ServerSpec {
    proc_type: &'static str,
    /// The script's path in the image, and the script.
    script: (&'static str, &'static str),
    /// The image's user it runs as (Debian's packages make them).
    user: &'static str,
}

fn spec(provider: &Provider) -> ServerSpec {
    match provider.name {
        "postgres" => ServerSpec {
            proc_type: "postgres",
            script: ("usr/local/bin/flynn-postgres", include_str!("postgres.sh")),
            user: "postgres",
        },
        "mysql" => ServerSpec {
            proc_type: "mariadb",
            script: ("usr/local/bin/flynn-mariadb", include_str!("mariadb.sh")),
            user: "mysql",
        },
        _ => ServerSpec {
            proc_type: "redis",
            script: ("usr/local/bin/flynn-redis", include_str!("redis.sh")),
            user: "redis",
        },
    }
}

/// A random secret of `n` bytes, as hex (safe inside URLs, SQL strings and config files).
fn secret(n: usize) -> String {
    (0..n)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Provisions a resource of `provider_name` for `app`: the server (made on first use), the
/// database, then the one state change. Answers the recorded resource.
pub async fn provision(host: &Host, provider_name: &str, app: &str) -> ApiResult<Resource> {
    let p = provider(provider_name).map_err(ApiError::from)?;
    let node = host.node()?;
    node.read_barrier().await?;
    // The state change checks all of this again; asking first spares a server start.
    node.state.read(|a| -> ApiResult<()> {
        let s = &a.state;
        if s.app(app)?.system {
            return Err(ApiError::Invalid(format!(
                "{app} is a system app; resources are for apps"
            )));
        }
        if let Some(r) = s
            .resources
            .of_app(app)
            .into_iter()
            .find(|r| r.provider == p.name)
        {
            return Err(ApiError::Conflict(format!(
                "{app} already has a {} resource ({}): remove it first (flynn resource remove {})",
                p.name, r.id, r.id
            )));
        }
        Ok(())
    })?;
    let id = secret(6);
    let resource = match p.name {
        "redis" => provision_redis(host, p, app, &id).await?,
        _ => {
            let server = ensure_server(host, p, p.app, BTreeMap::new()).await?;
            let name = format!("flynn_{id}");
            let password = secret(16);
            let (vip, port) = p.addr.expect("shared servers have an address");
            let vip = Ipv4Addr::from(vip);
            let su_password = server_env(host, p.app, password_key(p))?;
            match p.name {
                "postgres" => {
                    postgres::create(server, &su_password, &name, &password).await?;
                }
                _ => mariadb::create(host, &name, &password).await?,
            }
            Resource {
                id,
                provider: p.name.into(),
                app: app.into(),
                env: resource_env(p, vip, port, &name, &password),
                name,
                server: None,
                created_ms: 0,
            }
        }
    };
    let cmd = ResourcesCommand::Provision {
        resource: resource.clone(),
        now_ms: crate::now_ms(),
    };
    match node.propose_as::<Resource>(cmd).await {
        Ok(r) => {
            tracing::info!(target: "resources", id = %r.id, provider = %r.provider, app, "provisioned");
            Ok(r)
        }
        Err(e) => {
            // Not recorded: the database made for it goes again.
            if let Err(undo) = drop_database(host, &resource).await {
                tracing::warn!(id = %resource.id, error = %undo, "a refused resource's database was not dropped");
            }
            Err(e)
        }
    }
}

/// Removes resource `id` (of `provider_name`, when given): its record and its env in one
/// state change, then its database. Answers the removed resource.
pub async fn remove(host: &Host, provider_name: Option<&str>, id: &str) -> ApiResult<Resource> {
    let node = host.node()?;
    node.read_barrier().await?;
    if let Some(name) = provider_name {
        let p = provider(name).map_err(ApiError::from)?;
        let found = node.state.read(|a| {
            a.state
                .resources
                .resources
                .get(id)
                .map(|r| r.provider.clone())
        });
        if found.as_deref().is_some_and(|f| f != p.name) {
            return Err(ApiError::NotFound(format!("{} resource {id:?}", p.name)));
        }
    }
    let resource: Resource = node
        .propose_as(ResourcesCommand::Remove {
            id: id.to_string(),
            now_ms: crate::now_ms(),
        })
        .await?;
    // The env no longer names it; a database that cannot be dropped now is only space.
    if let Err(e) = drop_database(host, &resource).await {
        tracing::warn!(target: "resources", id, error = %e, "the removed resource's database was not dropped");
        return Err(ApiError::Unavailable(format!(
            "resource {id} is removed from {}, but its database was not dropped: {e}",
            resource.app
        )));
    }
    tracing::info!(target: "resources", id, provider = %resource.provider, app = %resource.app, "removed");
    Ok(resource)
}

/// Makes resource `r` (restored with a cluster backup) exist again on its server, which
/// started afresh: its database and user with the credentials its app's env already
/// holds (Postgres, MariaDB; a Redis server is its own, with its password), then restores
/// its dump from `dump`.
pub async fn reseed(host: &Host, r: &Resource, dump: &std::path::Path) -> ApiResult<()> {
    let p = provider(&r.provider).map_err(ApiError::from)?;
    let server_app = if r.server.is_some() {
        r.name.as_str()
    } else {
        p.app
    };
    let server = ensure_server(host, p, server_app, BTreeMap::new()).await?;
    let password = |key: &str| {
        r.env
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::Invalid(format!("resource {} has no {key} in its env", r.id)))
    };
    match p.name {
        "postgres" => {
            let su = server_env(host, p.app, password_key(p))?;
            postgres::create(server, &su, &r.name, &password("PGPASSWORD")?).await?;
        }
        "mysql" => mariadb::create(host, &r.name, &password("MYSQL_PWD")?).await?,
        _ => {}
    }
    dumps::restore(host, r, dump).await?;
    tracing::info!(target: "resources", id = %r.id, provider = %r.provider, app = %r.app, "restored from the backup");
    Ok(())
}

async fn drop_database(host: &Host, r: &Resource) -> ApiResult<()> {
    let p = provider(&r.provider).map_err(ApiError::from)?;
    match p.name {
        "postgres" => {
            let server = leader(host.node()?, p.service).ok_or_else(|| {
                ApiError::Unavailable("the postgres server is not running".into())
            })?;
            let su = server_env(host, p.app, password_key(p))?;
            postgres::drop(server, &su, &r.name).await
        }
        "mysql" => mariadb::drop(host, &r.name).await,
        _ => {
            // A Redis resource is its own app; deleting it stops the server. Its volume
            // stays (`flynn-host volume list`): data is deleted only on purpose.
            match host
                .node()?
                .propose(AppsCommand::DeleteApp {
                    name: r.name.clone(),
                })
                .await
            {
                Ok(_) | Err(ApiError::NotFound(_)) => Ok(()),
                Err(e) => Err(e),
            }
        }
    }
}

/// The env a resource sets on its app, with Flynn's names.
fn resource_env(
    p: &Provider,
    ip: Ipv4Addr,
    port: u16,
    name: &str,
    password: &str,
) -> BTreeMap<String, String> {
    let pairs: Vec<(&str, String)> = match p.name {
        "postgres" => vec![
            (
                "DATABASE_URL",
                format!("postgres://{name}:{password}@{ip}:{port}/{name}"),
            ),
            ("PGHOST", ip.to_string()),
            ("PGPORT", port.to_string()),
            ("PGUSER", name.into()),
            ("PGPASSWORD", password.into()),
            ("PGDATABASE", name.into()),
        ],
        "mysql" => vec![
            (
                "DATABASE_URL",
                format!("mysql://{name}:{password}@{ip}:{port}/{name}"),
            ),
            ("MYSQL_HOST", ip.to_string()),
            ("MYSQL_PORT", port.to_string()),
            ("MYSQL_USER", name.into()),
            ("MYSQL_PWD", password.into()),
            ("MYSQL_DATABASE", name.into()),
        ],
        _ => vec![("REDIS_URL", format!("redis://:{password}@{ip}:{port}"))],
    };
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// The server app's env key holding its administrator's password.
fn password_key(p: &Provider) -> &'static str {
    match p.name {
        "postgres" => "PGPASSWORD",
        "mysql" => "MYSQL_PWD",
        _ => "REDIS_PASSWORD",
    }
}

pub(crate) fn server_env(host: &Host, app: &str, key: &str) -> ApiResult<String> {
    host.node()?.state.read(|a| {
        a.state
            .apps
            .get(app)
            .and_then(|a| a.env.global.get(key).cloned())
            .ok_or_else(|| ApiError::Internal(format!("{app} has no {key}")))
    })
}

/// A Redis resource: an app of its own (`redis-ID`) with its server, at an address of its
/// own.
async fn provision_redis(host: &Host, p: &Provider, app: &str, id: &str) -> ApiResult<Resource> {
    let node = host.node()?;
    let server_app = format!("redis-{id}");
    let ip = node
        .state
        .read(|a| flynn_state::resources::free_service_ip(&a.state))
        .ok_or_else(|| ApiError::Unavailable("every service address is taken".into()))?;
    node.propose(AppsCommand::CreateApp {
        name: server_app.clone(),
    })
    .await?;
    let password = secret(16);
    let env: BTreeMap<String, String> = [("REDIS_PASSWORD".to_string(), password.clone())].into();
    let made = ensure_server(host, p, &server_app, env).await;
    if let Err(e) = made {
        let _ = node
            .propose(AppsCommand::DeleteApp { name: server_app })
            .await;
        return Err(e);
    }
    let port = 6379;
    let service = format!("{server_app}-{}", spec(p).proc_type);
    Ok(Resource {
        id: id.into(),
        provider: p.name.into(),
        app: app.into(),
        env: resource_env(p, ip, port, "", &password),
        name: server_app,
        server: Some(ServiceAddr { service, ip, port }),
        created_ms: 0,
    })
}

/// One server start at a time on this host, so two first provisionings make one release.
static SERVER_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Makes sure `server_app` runs its server (a release from the database image, scaled to
/// one) and answers its leader's address once it serves.
async fn ensure_server(
    host: &Host,
    p: &Provider,
    server_app: &str,
    mut env: BTreeMap<String, String>,
) -> ApiResult<SocketAddr> {
    let spec = spec(p);
    let node = host.node()?;
    let service = format!("{server_app}-{}", spec.proc_type);
    {
        let _one = SERVER_LOCK.lock().await;
        node.read_barrier().await?;
        if node.state.read(|a| a.state.apps.get(server_app).is_none()) {
            // A cluster bootstrapped before its provider's app was a system app.
            match node
                .propose(AppsCommand::CreateApp {
                    name: server_app.into(),
                })
                .await
            {
                Ok(_) | Err(ApiError::Conflict(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let (has_release, has_password, image) = node.state.read(|a| {
            let s = &a.state;
            (
                s.jobs.current_release(server_app).is_some(),
                s.apps
                    .get(server_app)
                    .is_some_and(|a| a.env.global.contains_key(password_key(p))),
                s.jobs.images.get(IMAGE).cloned(),
            )
        });
        if !has_release {
            let image = image.ok_or_else(|| {
                ApiError::Unavailable(format!(
                    "the cluster has no database image yet: an operator makes one with `script/base-image IMAGE.tar --databases` and pushes it with `flynn base-image push --name {IMAGE} IMAGE.tar`"
                ))
            })?;
            if !has_password {
                if let Some((ip, port)) = p.addr {
                    let ip = Ipv4Addr::from(ip);
                    let admin: Vec<(&str, String)> = match p.name {
                        "postgres" => vec![
                            ("PGUSER", "postgres".into()),
                            ("PGPASSWORD", secret(16)),
                            ("PGHOST", ip.to_string()),
                            ("PGPORT", port.to_string()),
                            ("PGDATABASE", "postgres".into()),
                        ],
                        _ => vec![
                            ("MYSQL_USER", "root".into()),
                            ("MYSQL_PWD", secret(16)),
                            ("MYSQL_HOST", ip.to_string()),
                            ("MYSQL_PORT", port.to_string()),
                        ],
                    };
                    env.extend(admin.into_iter().map(|(k, v)| (k.to_string(), v)));
                }
                if !env.is_empty() {
                    node.propose(AppsCommand::UpdateEnv {
                        app: server_app.into(),
                        proc_type: None,
                        set: env,
                        unset: Vec::new(),
                        now_ms: crate::now_ms(),
                    })
                    .await?;
                }
            }
            let (path, script) = spec.script;
            let entry = crate::jobs::system_image::store_files_layer(
                node,
                host.blobstore(),
                &[(path, script.as_bytes(), 0o755)],
            )
            .await?;
            let release = server_release(image, entry, &spec);
            // Postgres replicates: a primary, a sync and an async, one per host, where the
            // cluster has the hosts. The others run one server.
            let count = if p.name == "postgres" {
                node.state.read(|a| {
                    a.state
                        .discovery
                        .services
                        .get(crate::jobs::HOST_SERVICE)
                        .map_or(1, |svc| svc.instances.len().clamp(1, 3))
                })
            } else {
                1
            };
            node.propose(JobsCommand::CreateRelease {
                app: server_app.into(),
                release,
                now_ms: crate::now_ms(),
            })
            .await?;
            node.propose(JobsCommand::Scale {
                app: server_app.into(),
                processes: [(spec.proc_type.to_string(), count as i64)].into(),
            })
            .await?;
            tracing::info!(target: "resources", app = server_app, "started the database server");
        }
    }
    let deadline = Instant::now() + SERVER_START;
    let mut changes = node.state.changes();
    loop {
        if let Some(addr) = leader(node, &service) {
            return Ok(addr);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ApiError::Unavailable(format!(
                "the {server_app} server did not start within {} s (flynn -a {server_app} log)",
                SERVER_START.as_secs()
            )));
        }
        let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), changes.changed()).await;
    }
}

fn server_release(image: Image, entry: flynn_state::Layer, spec: &ServerSpec) -> NewRelease {
    let mut layers = image.layers;
    layers.push(entry);
    let run = format!("/{}", spec.script.0);
    NewRelease {
        image: Image {
            layers,
            config: ImageConfig {
                cmd: vec![run.clone()],
                user: spec.user.into(),
                ..image.config
            },
        },
        processes: Some(
            [(
                spec.proc_type.to_string(),
                ProcessType {
                    args: vec![run],
                    ports: true,
                    volumes: vec![VolumeReq {
                        path: "/data".into(),
                        delete_on_stop: false,
                    }],
                    one_per_host: true,
                    ..ProcessType::default()
                },
            )]
            .into(),
        ),
    }
}

/// Where `service`'s primary serves (a replicated shape's primary, else the service's
/// discovery leader), if it has one.
pub(crate) fn leader(node: &crate::node::Node, service: &str) -> Option<SocketAddr> {
    node.state.read(|a| {
        flynn_state::resources::service_target(&a.state, service)?
            .parse()
            .ok()
    })
}

/// Retries `f` until it succeeds or `within` passes (a server that has just started may
/// still refuse connections); the last error otherwise.
async fn retrying<T, F, Fut>(within: Duration, mut f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}
