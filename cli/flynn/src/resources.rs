//! `flynn resource`, `flynn pg`, `flynn redis` and `flynn mysql`: databases provisioned for
//! an app, and the commands that use them, each a one-off job on the database image with
//! the app's resource env (as Flynn's were).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use flynn_cli_util::print_table;
use flynn_client::ControllerClient;

use crate::jobs;

#[derive(Subcommand)]
pub enum ResourceCmd {
    /// Provision a database for the app: `postgres`, `mysql` or `redis`. Its env
    /// (`DATABASE_URL`, `PGHOST`, ... or `REDIS_URL`) is set and deployed with it.
    Add { provider: String },
    /// Remove a resource: its env is unset (a new release) and its database dropped.
    /// `flynn resource remove [PROVIDER] ID`.
    Remove {
        #[arg(num_args = 1..=2, required = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum PgCmd {
    /// Open psql on the app's database (`flynn pg psql -- -c 'SELECT 1'`).
    Psql {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Dump the app's database (pg_dump's custom format, no owners or privileges) to FILE,
    /// or to stdout.
    Dump(DumpFile),
    /// Restore a dump from `flynn pg dump` (FILE, or stdin) into the app's database, in one
    /// transaction: a dump that fails to restore changes nothing.
    Restore(DumpFile),
    /// Base backups and point-in-time restore, from the WAL every server archives to the
    /// blobstore continuously. Without a command: the backups there are.
    Backups {
        #[command(subcommand)]
        cmd: Option<PgBackupsCmd>,
    },
}

#[derive(Subcommand)]
pub enum PgBackupsCmd {
    /// Take a base backup of the Postgres server now (it covers every app's database on it).
    Capture,
    /// Put the app's database back as it was at TIME (RFC 3339: 2026-12-06T12:00:00Z), or
    /// at its last committed transaction, in one transaction.
    Restore {
        #[arg(long)]
        to: Option<String>,
    },
}

/// Where a dump is written or read: `-f FILE`, else stdout or stdin.
#[derive(clap::Args)]
pub struct DumpFile {
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum RedisCmd {
    /// Open redis-cli on the app's Redis (`flynn redis redis-cli -- PING`).
    RedisCli {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Dump the app's Redis (an RDB file, as `redis-cli --rdb` makes) to FILE, or stdout.
    Dump(DumpFile),
    /// Restore an RDB file from `flynn redis dump` (FILE, or stdin): it replaces every key.
    Restore(DumpFile),
}

#[derive(Subcommand)]
pub enum MysqlCmd {
    /// Open the mariadb client on the app's database.
    Console {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Dump the app's database (SQL, in one consistent snapshot) to FILE, or to stdout.
    Dump(DumpFile),
    /// Restore SQL from `flynn mysql dump` (FILE, or stdin) into the app's database.
    Restore(DumpFile),
}

pub async fn resource_cmd(
    client: &ControllerClient,
    app: &str,
    cmd: Option<ResourceCmd>,
) -> anyhow::Result<()> {
    match cmd {
        None => {
            let list = client.app_resources(app).await?;
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|r| {
                    let keys: Vec<&str> = r.env.keys().map(String::as_str).collect();
                    vec![r.id.clone(), r.provider.clone(), keys.join(",")]
                })
                .collect();
            print_table(&["ID", "PROVIDER", "ENV"], &rows);
            // How available each provider in use is: a single server is said plainly.
            let providers = client.providers().await?;
            for p in providers
                .iter()
                .filter(|p| list.iter().any(|r| r.provider == p.name) && p.name != "redis")
            {
                let note = match &p.shape {
                    Some(sh) if sh.sync != 0 => format!(
                        "{} servers: primary h{}, sync h{} ({}), {} async; generation {}",
                        p.servers,
                        sh.primary,
                        sh.sync,
                        if sh.sync_ready {
                            "caught up"
                        } else {
                            "catching up"
                        },
                        sh.asyncs.len(),
                        sh.generation
                    ),
                    _ if p.servers > 1 => format!("{} servers, no sync standby yet", p.servers),
                    _ => "1 server, no standby: not highly available".to_string(),
                };
                println!("{}: {note}", p.name);
            }
        }
        Some(ResourceCmd::Add { provider }) => {
            eprintln!(
                "Provisioning a {provider} resource for {app} (a first one starts the server)..."
            );
            let added = client.add_resource(&provider, app).await?;
            match &added.release {
                Some(release) => println!(
                    "Created resource {} and release {release}.",
                    added.resource.id
                ),
                None => println!(
                    "Created resource {} (the env is set for {app}'s first release).",
                    added.resource.id
                ),
            }
        }
        Some(ResourceCmd::Remove { args }) => {
            let (provider, id) = match args.as_slice() {
                [id] => (None, id.as_str()),
                [provider, id] => (Some(provider.as_str()), id.as_str()),
                _ => bail!("usage: flynn resource remove [PROVIDER] ID"),
            };
            let removed = client.remove_resource(provider, id).await?;
            println!(
                "Deleted resource {} ({}) of {}.",
                removed.id, removed.provider, removed.app
            );
        }
    }
    Ok(())
}

/// Runs an interactive client (psql, redis-cli, mariadb): on a pty from a terminal.
async fn console(
    client: &ControllerClient,
    app: &str,
    provider: &str,
    args: Vec<String>,
) -> anyhow::Result<i32> {
    let tty = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    jobs::run(client, app, args, false, tty, Some(provider)).await
}

/// Runs `args` with stdout into `file` (whole or not at all: written beside it, then
/// renamed), or to stdout.
async fn dump(
    client: &ControllerClient,
    app: &str,
    provider: &str,
    args: Vec<String>,
    file: Option<&Path>,
) -> anyhow::Result<i32> {
    let Some(path) = file else {
        return jobs::run_piped(client, app, args, Some(provider), None, None).await;
    };
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    let mut out =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let code = jobs::run_piped(client, app, args, Some(provider), None, Some(&mut out)).await;
    let kept = match code {
        Ok(0) => out
            .sync_all()
            .and_then(|_| std::fs::rename(&tmp, path))
            .with_context(|| format!("writing {}", path.display())),
        _ => Ok(()),
    };
    let _ = std::fs::remove_file(&tmp);
    kept?;
    code
}

/// Runs `args` with `file` (or this stdin) as its stdin.
async fn restore(
    client: &ControllerClient,
    app: &str,
    provider: &str,
    args: Vec<String>,
    file: Option<&Path>,
) -> anyhow::Result<i32> {
    let input = match file {
        Some(p) => std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
        None => {
            if std::io::stdin().is_terminal() {
                bail!("give the dump with -f FILE, or pipe it in");
            }
            // This process's stdin, as a file the upload reads.
            std::fs::File::open("/dev/stdin").context("reading stdin")?
        }
    };
    jobs::run_piped(client, app, args, Some(provider), Some(input), None).await
}

fn shell(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

/// The provider's dump or restore client (one definition, shared with export and backup).
async fn dump_or_restore(
    client: &ControllerClient,
    app: &str,
    provider: &str,
    restoring: bool,
    file: DumpFile,
) -> anyhow::Result<i32> {
    use flynn_model::db_clients;
    let argv = if restoring {
        db_clients::restore(provider)
    } else {
        db_clients::dump(provider)
    }
    .with_context(|| format!("{provider} has no dump client"))?;
    if restoring {
        restore(client, app, provider, argv, file.file.as_deref()).await
    } else {
        dump(client, app, provider, argv, file.file.as_deref()).await
    }
}

pub async fn pg_cmd(client: &ControllerClient, app: &str, cmd: PgCmd) -> anyhow::Result<i32> {
    match cmd {
        PgCmd::Psql { args } => {
            let mut argv = vec!["psql".to_string()];
            argv.extend(args);
            console(client, app, "postgres", argv).await
        }
        PgCmd::Dump(f) => dump_or_restore(client, app, "postgres", false, f).await,
        PgCmd::Restore(f) => dump_or_restore(client, app, "postgres", true, f).await,
        PgCmd::Backups { cmd } => {
            pg_backups(client, app, cmd).await?;
            Ok(0)
        }
    }
}

async fn pg_backups(
    client: &ControllerClient,
    app: &str,
    cmd: Option<PgBackupsCmd>,
) -> anyhow::Result<()> {
    match cmd {
        None => {
            let v = client.pg_backups(app).await?;
            let rows: Vec<Vec<String>> = v["backups"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    vec![
                        flynn_cli_util::rfc3339_ms(b["taken_ms"].as_u64().unwrap_or(0)),
                        b["bytes"].as_u64().unwrap_or(0).to_string(),
                        b["path"].as_str().unwrap_or("").to_string(),
                    ]
                })
                .collect();
            if rows.is_empty() {
                println!("No base backups yet: flynn -a {app} pg backups capture");
            } else {
                print_table(&["TAKEN", "BYTES", "PATH"], &rows);
            }
            println!(
                "{} WAL segment(s) archived.",
                v["wal_segments"].as_u64().unwrap_or(0)
            );
        }
        Some(PgBackupsCmd::Capture) => {
            let b = client.pg_capture(app).await?;
            println!(
                "Captured a base backup ({} bytes) at {}.",
                b["bytes"],
                flynn_cli_util::rfc3339_ms(b["taken_ms"].as_u64().unwrap_or(0))
            );
        }
        Some(PgBackupsCmd::Restore { to }) => {
            let r = client.pg_restore(app, to.as_deref()).await?;
            println!(
                "Restored {} to {}.",
                r["database"].as_str().unwrap_or("?"),
                to.as_deref().unwrap_or("its last committed transaction")
            );
        }
    }
    Ok(())
}

fn quoted(args: &[String]) -> String {
    args.iter()
        .map(|a| format!(" '{}'", a.replace('\'', "'\\''")))
        .collect()
}

pub async fn redis_cmd(client: &ControllerClient, app: &str, cmd: RedisCmd) -> anyhow::Result<i32> {
    match cmd {
        RedisCmd::RedisCli { args } => {
            // REDIS_URL is redis://:PASSWORD@HOST:PORT; the password goes in the env
            // (REDISCLI_AUTH), never in the arguments.
            let script = format!(
                "{}exec redis-cli -h \"${{addr%:*}}\" -p \"${{addr##*:}}\"{}",
                concat!(
                    "rest=${REDIS_URL#redis://:}; addr=${rest##*@}; ",
                    "export REDISCLI_AUTH=${rest%@*}; "
                ),
                quoted(&args)
            );
            console(client, app, "redis", shell(&script)).await
        }
        RedisCmd::Dump(f) => dump_or_restore(client, app, "redis", false, f).await,
        RedisCmd::Restore(f) => dump_or_restore(client, app, "redis", true, f).await,
    }
}

pub async fn mysql_cmd(client: &ControllerClient, app: &str, cmd: MysqlCmd) -> anyhow::Result<i32> {
    match cmd {
        MysqlCmd::Console { args } => {
            let script = format!(
                "exec mariadb -h \"$MYSQL_HOST\" -P \"$MYSQL_PORT\" -u \"$MYSQL_USER\" \"$MYSQL_DATABASE\"{}",
                quoted(&args)
            );
            console(client, app, "mysql", shell(&script)).await
        }
        MysqlCmd::Dump(f) => dump_or_restore(client, app, "mysql", false, f).await,
        MysqlCmd::Restore(f) => dump_or_restore(client, app, "mysql", true, f).await,
    }
}
