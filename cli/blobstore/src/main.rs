//! `flynn-blobstore migrate`: moves every blobstore file that is not on the default backend
//! to it (the blobstore does the copying; this streams its progress). Run it on a host, or
//! as a one-off job of the `blobstore` app.

use std::io::Write;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use futures::StreamExt;

#[derive(Parser)]
#[command(name = "flynn-blobstore", version, about = "Blobstore maintenance")]
struct Cli {
    /// The blobstore to talk to (any host's). Default: the host's own, at `$EXTERNAL_IP`
    /// in a job, else on 127.0.0.1, port 5001.
    #[arg(long, env = "BLOBSTORE_URL", global = true)]
    url: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Copy every file not on the default backend to it, verify the copy, and switch the file.
    /// Safe to interrupt and run again.
    Migrate {
        /// Delete the old copy of each file once it is switched.
        #[arg(long)]
        delete: bool,
        /// Files copied at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Only files whose path starts with this.
        #[arg(long, default_value = "/")]
        prefix: String,
    },
}

fn main() {
    let cli = Cli::parse();
    flynn_cli_util::run_main("flynn-blobstore", run(cli))
}

fn size(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn num(v: &serde_json::Value, k: &str) -> f64 {
    v.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Command::Migrate {
        delete,
        concurrency,
        prefix,
    } = cli.command;
    let base = cli.url.unwrap_or_else(|| {
        let ip = std::env::var("EXTERNAL_IP").unwrap_or_else(|_| "127.0.0.1".into());
        format!("http://{ip}:5001")
    });
    let url = format!("{}/_migrate", base.trim_end_matches('/'));
    let resp = reqwest::Client::new()
        .post(&url)
        .query(&[
            ("delete", delete.to_string()),
            ("concurrency", concurrency.to_string()),
            ("prefix", prefix),
        ])
        .send()
        .await
        .with_context(|| format!("cannot reach the blobstore at {base}"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        let msg = body
            .get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("no reason given");
        bail!("migration refused ({status}): {msg}");
    }
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut last: Option<serde_json::Value> = None;
    let mut errors = 0u64;
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.context("the blobstore stopped answering mid-migration")?);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
                continue;
            };
            match v.get("event").and_then(|e| e.as_str()) {
                Some("start") => println!(
                    "migrating {} files ({}) to {}",
                    num(&v, "files"),
                    size(num(&v, "bytes")),
                    v.get("to").and_then(|t| t.as_str()).unwrap_or("?")
                ),
                Some("error") => {
                    errors += 1;
                    eprintln!(
                        "failed: {}: {}",
                        v.get("path").and_then(|p| p.as_str()).unwrap_or("?"),
                        v.get("error").and_then(|p| p.as_str()).unwrap_or("?")
                    );
                }
                Some("progress") | Some("done") => {
                    println!(
                        "{}/{} files, {}/{}, {}/s, ~{}s left, {} failed, {} changed meanwhile",
                        num(&v, "files_done"),
                        num(&v, "files"),
                        size(num(&v, "bytes_done")),
                        size(num(&v, "bytes")),
                        size(num(&v, "rate_bytes_per_s")),
                        num(&v, "remaining_s"),
                        num(&v, "failed"),
                        num(&v, "skipped"),
                    );
                    let _ = std::io::stdout().flush();
                    if v["event"] == "done" {
                        last = Some(v);
                    }
                }
                _ => {}
            }
        }
    }
    let Some(done) = last else {
        bail!("the migration was cut off before it finished; run it again to carry on");
    };
    let failed = num(&done, "failed") as u64;
    if failed > 0 || errors > 0 {
        bail!(
            "{} files could not be migrated (see above); run it again to retry them",
            failed.max(errors)
        );
    }
    Ok(())
}
