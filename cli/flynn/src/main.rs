//! `flynn`: the developer and operator CLI for the controller API.

use std::collections::BTreeMap;
use std::io::IsTerminal;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
mod archive;
mod flynnrc;
mod git;
mod image;
mod jobs;
mod resources;
mod rollout;

use flynn_cli_util::{print_table, run_main};
use flynn_client::{ControllerClient, EnvUpdate, RouteRequest};
use flynn_model::Route;
use flynnrc::FlynnRc;

#[derive(Parser)]
#[command(name = "flynn", version, about = "Manage apps on a Flynn cluster")]
struct Cli {
    /// App to act on.
    #[arg(short = 'a', long = "app", env = "FLYNN_APP", global = true)]
    app: Option<String>,
    /// Cluster (from flynnrc) to talk to; defaults to the default cluster.
    #[arg(
        short = 'c',
        long = "cluster",
        env = "FLYNN_CLUSTER_NAME",
        global = true
    )]
    cluster: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List, add and remove clusters in flynnrc.
    Cluster(ClusterArgs),
    /// Create an app; inside a git checkout, also add the remote `flynn` for it.
    Create {
        /// App name (defaults to -a).
        name: Option<String>,
        /// Name of the git remote to add.
        #[arg(short = 'r', long, default_value = "flynn")]
        remote: String,
        /// Add no git remote.
        #[arg(long)]
        no_remote: bool,
    },
    /// Manage the git remote of the app (`flynn -a APP remote add`).
    Remote {
        #[command(subcommand)]
        cmd: RemoteCmd,
    },
    /// git's credential helper for the cluster's git server (set by `flynn cluster add`).
    #[command(hide = true)]
    GitCredentials { action: String },
    /// The pre-receive hook the cluster's git server runs for a push.
    #[command(hide = true)]
    GitHook { hook: String },
    /// List apps.
    Apps,
    /// Export the app given with -a: config, current release with its image layers,
    /// formation, routes and data volumes, as one tar. To stdout without --file.
    Export {
        #[arg(long)]
        file: Option<std::path::PathBuf>,
    },
    /// Import an app export (from stdin without --file) as a new app: NAME.$CLUSTER_DOMAIN
    /// is always routed; the export's own routes only with --routes.
    Import {
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        /// The new app's name (default: the exported app's).
        #[arg(long)]
        name: Option<String>,
        /// Also add the exported app's routes.
        #[arg(long)]
        routes: bool,
    },
    /// Delete the app given with -a.
    Delete {
        /// Skip the confirmation prompt.
        #[arg(short = 'y', long = "yes")]
        yes: bool,
    },
    /// Show and change an app's env.
    Env(EnvArgs),
    /// Show and change an app's routes.
    Route(RouteArgs),
    /// Deploy a directory with a Procfile, as one layer on the cluster's base image.
    Deploy {
        /// Make the release without waiting for it to run.
        #[arg(long, visible_alias = "detach")]
        no_wait: bool,
        dir: std::path::PathBuf,
    },
    /// Show or set the cluster's base image (what `flynn deploy` builds on).
    BaseImage {
        /// Which named image to show (`databases`: what `flynn resource add` runs).
        #[arg(long = "name", default_value = "base")]
        show_name: String,
        #[command(subcommand)]
        cmd: Option<jobs::BaseImageCmd>,
    },
    /// Deploy images (`flynn docker push IMAGE.tar`).
    Docker {
        #[command(subcommand)]
        cmd: jobs::DockerCmd,
    },
    /// List the app's releases, or show one.
    Release {
        #[command(subcommand)]
        cmd: Option<jobs::ReleaseCmd>,
    },
    /// Show or change how many jobs of each process type run (`flynn scale web=3`).
    Scale {
        /// Do not wait for the jobs to settle.
        #[arg(long, visible_alias = "detach")]
        no_wait: bool,
        counts: Vec<String>,
    },
    /// List the app's jobs.
    Ps {
        /// Also the stopped jobs hosts keep (`-a` names the app).
        #[arg(long)]
        all: bool,
    },
    /// Show the app's log (its last 10,000 lines at most).
    Log {
        /// Keep printing new lines.
        #[arg(short = 'f', long)]
        follow: bool,
        /// The last N lines.
        #[arg(short = 'n', long = "number")]
        lines: Option<usize>,
        /// One job's lines.
        #[arg(short = 'j', long)]
        job: Option<String>,
        /// One process type's lines.
        #[arg(short = 't', long = "process-type")]
        proc_type: Option<String>,
    },
    /// Run a one-off command in a new job of the app's current release; it exits with the
    /// command's status. Piped stdin is passed to it; from a terminal it runs on a pty
    /// (`flynn run bash`), with keys, ^C and window size passed through.
    Run {
        /// Print the job's id and return at once.
        #[arg(short = 'd', long)]
        detached: bool,
        /// Run on a pty even when stdin or stdout is not a terminal.
        #[arg(short = 't', long, conflicts_with_all = ["detached", "no_tty"])]
        tty: bool,
        /// Never run on a pty, even from a terminal.
        #[arg(short = 'T', long)]
        no_tty: bool,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Stop a job (the scheduler replaces it if the formation still wants it).
    Kill { job: String },
    /// List the app's databases, or add or remove one (`flynn resource add postgres`).
    Resource {
        #[command(subcommand)]
        cmd: Option<resources::ResourceCmd>,
    },
    /// Use the app's Postgres: psql, dump, restore.
    Pg {
        #[command(subcommand)]
        cmd: resources::PgCmd,
    },
    /// Use the app's Redis: redis-cli.
    Redis {
        #[command(subcommand)]
        cmd: resources::RedisCmd,
    },
    /// Use the app's MariaDB: console, dump, restore.
    Mysql {
        #[command(subcommand)]
        cmd: resources::MysqlCmd,
    },
    /// Show or set process types' resource limits.
    Limit {
        #[command(subcommand)]
        cmd: Option<jobs::LimitCmd>,
    },
}

#[derive(Subcommand)]
enum RemoteCmd {
    /// Add (or repoint) the git remote for the app: `git push REMOTE main` deploys it.
    Add {
        #[arg(default_value = "flynn")]
        remote: String,
    },
}

#[derive(Args)]
struct ClusterArgs {
    #[command(subcommand)]
    cmd: Option<ClusterCmd>,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Add a cluster: NAME, its controller URL (or host:port) and a controller key; with
    /// -p, NAME, the cluster DOMAIN (https://controller.DOMAIN) and a key.
    Add {
        /// Make it the default cluster.
        #[arg(short = 'd', long = "default")]
        default: bool,
        /// Pin of the controller's TLS certificate, as `flynn-host bootstrap` printed it.
        #[arg(short = 'p', long = "tls-pin")]
        tls_pin: Option<String>,
        /// Connect to this address instead of resolving the controller's name (a cluster
        /// whose domain has no DNS yet).
        #[arg(long)]
        ip: Option<std::net::IpAddr>,
        name: String,
        url: String,
        key: String,
    },
    /// Remove a cluster from flynnrc.
    Remove { name: String },
    /// Back up the whole cluster into one tar: state, blob bytes (embedded and Postgres
    /// backends), data volumes, with a manifest of sha512 sums. To stdout without --file.
    Backup {
        #[arg(long)]
        file: Option<std::path::PathBuf>,
    },
    /// Show or set the default cluster.
    Default { name: Option<String> },
}

#[derive(Args)]
struct EnvArgs {
    /// Process type whose env to show.
    #[arg(short = 't', long = "process-type")]
    proc_type: Option<String>,
    #[command(subcommand)]
    cmd: Option<EnvCmd>,
}

#[derive(Subcommand)]
enum EnvCmd {
    /// Print one variable.
    Get {
        #[arg(short = 't', long = "process-type")]
        proc_type: Option<String>,
        key: String,
    },
    /// Set variables (KEY=VALUE ...), for one process type with -t. Waits for the new
    /// release to run (printing its progress) unless --detach.
    Set {
        #[arg(short = 't', long = "process-type")]
        proc_type: Option<String>,
        /// Return once the env is saved, without waiting for the rollout.
        #[arg(short = 'd', long)]
        detach: bool,
        #[arg(required = true)]
        pairs: Vec<String>,
    },
    /// Unset variables, for one process type with -t. Waits for the rollout unless --detach.
    Unset {
        #[arg(short = 't', long = "process-type")]
        proc_type: Option<String>,
        /// Return once the env is saved, without waiting for the rollout.
        #[arg(short = 'd', long)]
        detach: bool,
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

#[derive(Args)]
struct RouteArgs {
    #[command(subcommand)]
    cmd: Option<RouteCmd>,
}

#[derive(Subcommand)]
enum RouteCmd {
    /// Add a route.
    Add {
        #[command(subcommand)]
        kind: RouteKind,
    },
    /// Remove a route by id.
    Remove { id: String },
}

#[derive(Subcommand)]
enum RouteKind {
    /// An HTTP route: DOMAIN or DOMAIN/PATH.
    Http {
        /// Service to route to (default APP-web).
        #[arg(short = 's', long)]
        service: Option<String>,
        /// Pin each client to one backend with a cookie.
        #[arg(long)]
        sticky: bool,
        /// Send traffic only to the service's leader.
        #[arg(long, conflicts_with = "no_leader")]
        leader: bool,
        #[arg(long, hide = true)]
        no_leader: bool,
        /// Do not wait for in-flight requests when a backend goes away.
        #[arg(long)]
        no_drain_backends: bool,
        /// No keep-alive connections to backends.
        #[arg(long)]
        disable_keep_alives: bool,
        /// Certificate id (from the certificates API) to serve for the domain.
        #[arg(long)]
        certificate: Option<String>,
        /// Redirect plain-HTTP requests for this route to HTTPS.
        #[arg(long)]
        redirect_https: bool,
        /// Milliseconds a backend may take to start its response (default: the router's
        /// upstream timeout); past it, a GET or HEAD goes to another backend.
        #[arg(long)]
        response_timeout_ms: Option<u64>,
        domain: String,
    },
    /// A TCP route on a port (default: the first free one in 3000-3500).
    Tcp {
        #[arg(short = 's', long)]
        service: Option<String>,
        #[arg(short = 'p', long)]
        port: Option<u16>,
        #[arg(long)]
        leader: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    run_main("flynn", run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::GitHook { hook } = &cli.cmd {
        if hook != "pre-receive" {
            bail!("no such git hook {hook:?}");
        }
        return git::pre_receive().await;
    }
    let rc_path = flynnrc::path()?;
    let backup_file = match &cli.cmd {
        Cmd::Cluster(ClusterArgs {
            cmd: Some(ClusterCmd::Backup { file }),
        }) => Some(file.clone()),
        Cmd::Cluster(args) => return cluster_cmd(&rc_path, args).await,
        _ => None,
    };
    let rc = FlynnRc::load(&rc_path)?;
    if let Cmd::GitCredentials { action } = &cli.cmd {
        return git::credentials(&rc, action);
    }
    let cluster = rc.pick(cli.cluster.as_deref())?;
    let client = cluster.client()?;
    if let Some(file) = backup_file {
        return archive::backup(&client, file.as_deref()).await;
    }
    // Without -a, a checkout's git remote for this cluster names the app.
    let from_remote = match &cli.app {
        Some(_) => None,
        None => git::app_from_remote(cluster)?,
    };
    let app = || {
        cli.app.clone().or(from_remote.clone()).context(
            "no app given: use -a APP, set FLYNN_APP, or run inside a checkout with a flynn remote",
        )
    };
    match cli.cmd {
        Cmd::Cluster(_) => unreachable!("handled above"),
        Cmd::Export { file } => archive::export(&client, &app()?, file.as_deref()).await?,
        Cmd::Import { file, name, routes } => {
            archive::import(&client, file.as_deref(), name.as_deref(), routes).await?
        }
        Cmd::Create {
            name,
            remote,
            no_remote,
        } => {
            let name = name
                .or(cli.app.clone())
                .context("usage: flynn create NAME")?;
            let created = client.create_app(&name).await?;
            println!("Created {}", created.name);
            if !no_remote && git::in_checkout() {
                git::add_remote(cluster, &created.name, &remote)?;
            }
        }
        Cmd::Remote {
            cmd: RemoteCmd::Add { remote },
        } => {
            let app = app()?;
            client.app(&app).await?;
            git::add_remote(cluster, &app, &remote)?;
        }
        Cmd::GitCredentials { .. } | Cmd::GitHook { .. } => unreachable!("handled above"),
        Cmd::Apps => {
            let apps = client.apps().await?;
            let rows: Vec<Vec<String>> = apps
                .iter()
                .map(|a| {
                    vec![
                        a.name.clone(),
                        if a.system { "system" } else { "user" }.to_string(),
                        a.created_revision.to_string(),
                    ]
                })
                .collect();
            print_table(&["NAME", "KIND", "CREATED_REV"], &rows);
        }
        Cmd::Delete { yes } => {
            let app = app()?;
            if !yes {
                if !std::io::stdin().is_terminal() {
                    bail!("refusing to delete {app} without confirmation: pass -y");
                }
                eprint!("Are you sure you want to delete the app ({app})? (yes/no): ");
                let mut answer = String::new();
                std::io::stdin().read_line(&mut answer)?;
                if answer.trim() != "yes" {
                    bail!("not deleted");
                }
            }
            client.delete_app(&app).await?;
            println!("Deleted {app}");
        }
        Cmd::Env(args) => env_cmd(&client, &app()?, args).await?,
        Cmd::Route(args) => route_cmd(&client, &app()?, args).await?,
        Cmd::Docker {
            cmd: jobs::DockerCmd::Push { image, no_wait },
        } => jobs::docker_push(&client, &app()?, &image, no_wait).await?,
        Cmd::Release { cmd } => jobs::release_cmd(&client, &app()?, cmd).await?,
        Cmd::Deploy { no_wait, dir } => {
            jobs::deploy_dir(&client, &app()?, &dir, no_wait).await?;
        }
        Cmd::BaseImage {
            show_name,
            cmd: None,
        } => jobs::base_image_show(&client, &show_name).await?,
        Cmd::BaseImage {
            cmd: Some(jobs::BaseImageCmd::Push { name, image }),
            ..
        } => jobs::base_image_push(&client, &name, &image).await?,
        Cmd::Scale { no_wait, counts } => jobs::scale(&client, &app()?, &counts, no_wait).await?,
        Cmd::Ps { all } => jobs::ps(&client, &app()?, all).await?,
        Cmd::Log {
            follow,
            lines,
            job,
            proc_type,
        } => {
            let args = jobs::LogArgs {
                follow,
                lines,
                job,
                proc_type,
            };
            jobs::log(&client, &app()?, args).await?
        }
        Cmd::Run {
            detached,
            tty,
            no_tty,
            command,
        } => {
            use std::io::IsTerminal;
            let terminal = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
            let tty = !detached && !no_tty && (tty || terminal);
            let code = jobs::run(&client, &app()?, command, detached, tty, None).await?;
            if code != 0 || tty {
                // Exits now: a read of the terminal that is still waiting for a key would
                // otherwise hold the runtime's shutdown until one is pressed.
                use std::io::Write;
                let _ = std::io::stdout().flush();
                std::process::exit(code);
            }
        }
        Cmd::Kill { job } => {
            let app = app()?;
            client.kill_job(&app, &job).await?;
            println!("Job {job} stopped.");
        }
        Cmd::Limit { cmd } => jobs::limit(&client, &app()?, cmd).await?,
        Cmd::Resource { cmd } => resources::resource_cmd(&client, &app()?, cmd).await?,
        Cmd::Pg { cmd } => exit_with(resources::pg_cmd(&client, &app()?, cmd).await?),
        Cmd::Redis { cmd } => exit_with(resources::redis_cmd(&client, &app()?, cmd).await?),
        Cmd::Mysql { cmd } => exit_with(resources::mysql_cmd(&client, &app()?, cmd).await?),
    }
    Ok(())
}

async fn cluster_cmd(rc_path: &std::path::Path, args: &ClusterArgs) -> anyhow::Result<()> {
    let mut rc = FlynnRc::load(rc_path)?;
    match &args.cmd {
        None => {
            let rows: Vec<Vec<String>> = rc
                .clusters
                .iter()
                .map(|c| {
                    let mark = if rc.default.as_deref() == Some(&c.name) {
                        "(default)"
                    } else {
                        ""
                    };
                    vec![c.name.clone(), c.url.clone(), mark.to_string()]
                })
                .collect();
            print_table(&["NAME", "URL", ""], &rows);
            return Ok(());
        }
        Some(ClusterCmd::Add {
            default,
            tls_pin,
            ip,
            name,
            url,
            key,
        }) => {
            rc.add(name, url, key, tls_pin.as_deref(), *default)?;
            if let Some(c) = rc.clusters.iter_mut().find(|c| &c.name == name) {
                c.ip = *ip;
            }
            rc.save(rc_path)?;
            println!("Cluster {name} added.");
            // git push: the credential helper and the certificate to trust.
            let cluster = rc.pick(Some(name))?;
            let pem = match cluster.client() {
                Ok(client) if cluster.tls_pin.is_some() => {
                    git::ca_pem(&client, cluster).await.unwrap_or_else(|e| {
                        eprintln!("the cluster's certificate for git was not fetched: {e:#}");
                        None
                    })
                }
                _ => None,
            };
            let ca_file = rc_path
                .with_file_name(".flynn-ca-certs")
                .join(format!("{name}.pem"));
            git::configure(cluster, pem.as_deref(), &ca_file)?;
        }
        Some(ClusterCmd::Remove { name }) => {
            rc.remove(name)?;
            rc.save(rc_path)?;
            println!("Cluster {name} removed.");
        }
        Some(ClusterCmd::Default { name: None }) => {
            println!("{}", rc.pick(None)?.name);
        }
        Some(ClusterCmd::Default { name: Some(name) }) => {
            rc.pick(Some(name))?;
            rc.default = Some(name.clone());
            rc.save(rc_path)?;
            println!("\"{name}\" is now the default cluster.");
        }
        Some(ClusterCmd::Backup { .. }) => unreachable!("needs a client: handled in run"),
    }
    Ok(())
}

fn parse_pairs(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("{p:?} is not KEY=VALUE"))?;
        if k.is_empty() {
            bail!("{p:?} has an empty name");
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

async fn env_cmd(client: &ControllerClient, app: &str, args: EnvArgs) -> anyhow::Result<()> {
    match args.cmd {
        None => {
            for (k, v) in client.env(app, args.proc_type.as_deref()).await? {
                println!("{k}={v}");
            }
        }
        Some(EnvCmd::Get { proc_type, key }) => {
            let env = client
                .env(app, proc_type.as_deref().or(args.proc_type.as_deref()))
                .await?;
            match env.get(&key) {
                Some(v) => println!("{v}"),
                None => bail!("{key} is not set"),
            }
        }
        Some(EnvCmd::Set {
            proc_type,
            detach,
            pairs,
        }) => {
            let update = EnvUpdate {
                proc_type: proc_type.or(args.proc_type),
                set: parse_pairs(&pairs)?,
                unset: vec![],
            };
            let before = rollout::current(client, app).await?;
            client.update_env(app, &update).await?;
            println!("Env updated for {app}.");
            rollout::follow_change(client, app, &before, detach).await?;
        }
        Some(EnvCmd::Unset {
            proc_type,
            detach,
            keys,
        }) => {
            let update = EnvUpdate {
                proc_type: proc_type.or(args.proc_type),
                set: BTreeMap::new(),
                unset: keys,
            };
            let before = rollout::current(client, app).await?;
            client.update_env(app, &update).await?;
            println!("Env updated for {app}.");
            rollout::follow_change(client, app, &before, detach).await?;
        }
    }
    Ok(())
}

fn route_row(r: &Route) -> Vec<String> {
    match r {
        Route::Http(h) => vec![
            format!(
                "http:{}{}",
                h.domain,
                if h.path == "/" { "" } else { &h.path }
            ),
            h.service.clone(),
            h.id.clone(),
            h.sticky.to_string(),
            h.leader.to_string(),
        ],
        Route::Tcp(t) => vec![
            format!("tcp:{}", t.port),
            t.service.clone(),
            t.id.clone(),
            "false".into(),
            t.leader.to_string(),
        ],
    }
}

async fn route_cmd(client: &ControllerClient, app: &str, args: RouteArgs) -> anyhow::Result<()> {
    match args.cmd {
        None => {
            let rows: Vec<Vec<String>> = client.routes(app).await?.iter().map(route_row).collect();
            print_table(&["ROUTE", "SERVICE", "ID", "STICKY", "LEADER"], &rows);
        }
        Some(RouteCmd::Add { kind }) => {
            let req = match kind {
                RouteKind::Http {
                    service,
                    sticky,
                    leader,
                    no_leader: _,
                    no_drain_backends,
                    disable_keep_alives,
                    certificate,
                    redirect_https,
                    response_timeout_ms,
                    domain,
                } => {
                    let (domain, path) = match domain.find('/') {
                        Some(i) => (domain[..i].to_string(), Some(domain[i..].to_string())),
                        None => (domain, None),
                    };
                    RouteRequest::Http {
                        domain,
                        path,
                        service,
                        sticky,
                        leader,
                        disable_keepalive: disable_keep_alives,
                        no_drain_backends,
                        certificate,
                        https_redirect: redirect_https,
                        response_timeout_ms,
                    }
                }
                RouteKind::Tcp {
                    service,
                    port,
                    leader,
                } => RouteRequest::Tcp {
                    port,
                    service,
                    leader,
                },
            };
            let route = client.add_route(app, &req).await?;
            println!("{}", route.id());
        }
        Some(RouteCmd::Remove { id }) => {
            client.remove_route(app, &id).await?;
            println!("Route {id} removed.");
        }
    }
    Ok(())
}

/// Exits with a job's status when it is not 0 (now: a terminal read still waiting for a key
/// would otherwise hold the runtime's shutdown).
fn exit_with(code: i32) {
    if code != 0 {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::process::exit(code);
    }
}

#[cfg(test)]
mod tests {
    /// Flags of every subcommand must not clash with the global ones (clap checks this only
    /// in debug builds, at parse time: a clash would panic the command).
    #[test]
    fn t10_flags_do_not_clash() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
