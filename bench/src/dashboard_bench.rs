//! The dashboard's first load on a cluster with many apps, measured in a real browser.
//!
//! A one-host cluster in a network namespace (as the multi-host tests run it) gets `--apps`
//! apps, each with a few env variables. Each round starts a fresh headless chromium (an
//! empty cache), logs in with the login token from a page that loads no asset (so the
//! session cookie is set and nothing is cached), then opens `https://dashboard.D/#/apps`
//! through the router and reads, from the browser's own Performance API:
//! - bytes transferred: the navigation plus every resource and API call (`transferSize`,
//!   headers included);
//! - time to interactive: from navigation start to the page's `flynn:rendered` mark, set
//!   when the apps table stands rendered from its data (the script is then idle).
//!
//! Prints one JSON line per round, then a markdown table with the median and the worst.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use flynn_tests::webdriver::{self, Browser};
use flynn_tests::{ok, Cluster};

#[derive(Parser)]
struct Opts {
    /// Apps the cluster holds.
    #[arg(long, default_value_t = 200)]
    apps: usize,
    /// Cold loads to measure (each in a fresh browser).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

const DOMAIN: &str = "bench.test";

#[derive(Debug, serde::Serialize)]
struct Round {
    round: usize,
    apps_shown: u64,
    bytes: u64,
    requests: u64,
    tti_ms: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    if std::env::var_os("FLYNN_BIN_DIR").is_none() {
        let exe = std::env::current_exe()?;
        std::env::set_var("FLYNN_BIN_DIR", exe.parent().expect("bin dir"));
    }
    anyhow::ensure!(
        webdriver::available(),
        "chromium and chromedriver are needed (apt-get install chromium chromium-driver)"
    );
    let mut c = Cluster::start(1);
    c.bootstrap_with(1, &["--domain", DOMAIN]);
    c.wait_leader(0, None).await;
    let client = c.client(0);
    for i in 0..opts.apps {
        let name = format!("app{i:03}");
        client.create_app(&name).await?;
        let update = flynn_client::EnvUpdate {
            proc_type: None,
            set: [
                ("DATABASE_URL", format!("postgres://user:pw@db/{name}")),
                ("LOG_LEVEL", "info".to_string()),
                ("FEATURE_FLAGS", "a,b,c".to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            unset: vec![],
        };
        client.update_env(&name, &update).await?;
    }
    let token = ok(&c.flynn(0, &["-a", "dashboard", "env", "get", "LOGIN_TOKEN"]))
        .trim()
        .to_string();
    let name = format!("dashboard.{DOMAIN}");
    let cert = client
        .certificates()
        .await?
        .into_iter()
        .find(|x| x.domains.contains(&name))
        .ok_or_else(|| anyhow::anyhow!("no certificate for {name}"))?;
    let pin = webdriver::spki_pin(&cert.cert_pem);
    let shots = PathBuf::from("target/dashboard-bench");
    let mut rounds = Vec::new();
    for round in 0..opts.rounds {
        let b = Browser::start(&[(name.as_str(), c.hosts[0].ip.as_str())], &pin, &shots).await;
        // A page with no assets, to log in from: the cache stays empty.
        b.goto(&format!("https://{name}/session")).await;
        let login = format!(
            "return fetch('/login', {{method: 'POST', headers: {{'content-type': 'application/json'}}, body: JSON.stringify({{token: {}}})}}).then(r => r.status)",
            serde_json::to_string(&token)?
        );
        let status = b.eval(&login).await;
        anyhow::ensure!(status == 200, "login answered {status}");
        b.goto(&format!("https://{name}/#/apps")).await;
        let rows = b
            .wait_text("#apps", Duration::from_secs(30), |t| {
                t.lines().count() > opts.apps.min(1)
            })
            .await
            .lines()
            .count() as u64
            - 1;
        let m = b
            .eval(
                "const nav = performance.getEntriesByType('navigation')[0];
                 const res = performance.getEntriesByType('resource');
                 const mark = performance.getEntriesByName('flynn:rendered')[0];
                 return {
                   bytes: nav.transferSize + res.reduce((s, r) => s + r.transferSize, 0),
                   requests: 1 + res.length,
                   tti: mark ? mark.startTime : -1,
                 };",
            )
            .await;
        if round == 0 {
            b.screenshot("apps-page").await;
        }
        let r = Round {
            round,
            apps_shown: rows,
            bytes: m["bytes"].as_u64().unwrap_or_default(),
            requests: m["requests"].as_u64().unwrap_or_default(),
            tti_ms: m["tti"].as_f64().unwrap_or(-1.0),
        };
        println!("{}", serde_json::to_string(&r)?);
        rounds.push(r);
    }
    let bytes = median(rounds.iter().map(|r| r.bytes as f64).collect());
    let worst_bytes = rounds.iter().map(|r| r.bytes).max().unwrap_or_default();
    let tti = median(rounds.iter().map(|r| r.tti_ms).collect());
    let worst_tti = rounds.iter().map(|r| r.tti_ms).fold(0.0, f64::max);
    println!();
    println!(
        "| apps | rounds | bytes (median / worst) | time to interactive ms (median / worst) | goal |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {} | {} | {:.0} / {} | {:.0} / {:.0} | < 300 KB, < 1000 ms |",
        opts.apps,
        rounds.len(),
        bytes,
        worst_bytes,
        tti,
        worst_tti
    );
    Ok(())
}
