//! The scheduler at cluster scale, as a simulation: the real state machine and the real,
//! pure `plan`, fed a state of many hosts and jobs. This machine runs three daemons at
//! most, so hosts here are heartbeats in the state, and "running" is a state update, as a
//! host would report it. What is timed is one scheduler pass, as the leader runs it.
//!
//! Cases, each repeated `--rounds` times on a copy of the same settled state:
//! - `steady`: a pass over a settled cluster (plans nothing; the leader does this often);
//! - `host_down`: a host stops heartbeating: the pass that marks its jobs failed, then the
//!   pass that places their replacements;
//! - `deploy`: a new release of the app with the big formation: the pass that places all of
//!   its new jobs, then (once they run) the pass that stops all of the old ones.
//!
//! Prints JSON lines and a markdown table.

use std::time::{Duration, Instant};

use clap::Parser;
use flynn_daemon::jobs::scheduler::plan;
use flynn_daemon::jobs::{CPU_META, HOST_SERVICE, JOBS_META, MEMORY_META};
use flynn_state::jobs::JobsCommand;
use flynn_state::{
    AppsCommand, ClusterCommand, ClusterState, Command, DiscoveryCommand, Image, ImageConfig,
    JobState, NewRelease,
};

#[derive(Parser)]
struct Opts {
    /// Live hosts.
    #[arg(long, default_value_t = 1000)]
    hosts: u64,
    /// Jobs in all, spread over the apps (the big formation included).
    #[arg(long, default_value_t = 10_000)]
    jobs: u64,
    /// Apps besides the big one; their jobs share what the big one leaves.
    #[arg(long, default_value_t = 900)]
    apps: u64,
    /// Jobs of the one big formation that the deploy case rolls.
    #[arg(long, default_value_t = 1000)]
    deploy: u64,
    /// Times each case is run (on a fresh copy of the settled state).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// Heartbeats last this long, as a host's do.
const TTL_MS: u64 = 10_000;

fn apply(s: &mut ClusterState, c: impl Into<Command>) {
    if let Err(e) = s.apply(c.into()).0 {
        panic!("the simulation's own command was refused: {e}");
    }
}

fn heartbeat(s: &mut ClusterState, host: u64, now: u64) {
    apply(
        s,
        DiscoveryCommand::RegisterInstance {
            service: HOST_SERVICE.into(),
            id: flynn_state::host_instance_id(host),
            addr: format!("10.{}.{}.1:1113", host >> 8, host & 255),
            // Each host takes 64 GiB, 32 cores and 253 jobs (its job addresses).
            meta: [
                (MEMORY_META.to_string(), (64u64 << 30).to_string()),
                (CPU_META.to_string(), "32000".to_string()),
                (JOBS_META.to_string(), "253".to_string()),
            ]
            .into(),
            ttl_ms: TTL_MS,
            now_ms: now,
        },
    );
}

fn create_app(s: &mut ClusterState, name: &str, count: u64) {
    apply(
        s,
        AppsCommand::CreateApp {
            name: name.to_string(),
        },
    );
    apply(
        s,
        JobsCommand::CreateRelease {
            app: name.to_string(),
            release: NewRelease {
                image: Image {
                    layers: vec![],
                    config: ImageConfig {
                        cmd: vec!["httpd".into()],
                        ..ImageConfig::default()
                    },
                },
                processes: None,
            },
            now_ms: 0,
        },
    );
    // Every job reserves memory and CPU, so the pass checks room on every candidate.
    apply(
        s,
        JobsCommand::SetLimits {
            app: name.to_string(),
            proc_type: "web".into(),
            limits: flynn_state::Limits {
                memory: Some(256 << 20),
                cpu_millis: Some(250),
                ..Default::default()
            },
            now_ms: 0,
        },
    );
    apply(
        s,
        JobsCommand::Scale {
            app: name.to_string(),
            processes: [("web".to_string(), count as i64)].into(),
        },
    );
}

/// What hosts do after a pass: new jobs run, stopping ones end.
fn hosts_react(s: &mut ClusterState, now: u64) {
    let moving: Vec<(String, JobState)> = s
        .jobs
        .jobs
        .values()
        .filter_map(|j| match j.state {
            JobState::Pending | JobState::Starting => Some((j.id.clone(), JobState::Running)),
            JobState::Stopping => Some((j.id.clone(), JobState::Done)),
            _ => None,
        })
        .collect();
    for (id, state) in moving {
        apply(
            s,
            JobsCommand::UpdateJob {
                id,
                state,
                addr: None,
                exit_status: None,
                error: None,
                now_ms: now,
                fault: Default::default(),
            },
        );
    }
}

/// One timed pass; applies what it planned. Returns the time and the commands' count.
fn timed_pass(s: &mut ClusterState, now: u64) -> (Duration, Vec<Command>) {
    let t = Instant::now();
    let commands = plan(s, now);
    let took = t.elapsed();
    for c in commands.clone() {
        apply(s, c);
    }
    (took, commands)
}

fn placed(commands: &[Command]) -> usize {
    commands
        .iter()
        .map(|c| match c {
            Command::Jobs(JobsCommand::PlaceJobs { jobs, .. }) => jobs.len(),
            _ => 0,
        })
        .sum()
}

fn stopped(commands: &[Command]) -> usize {
    commands
        .iter()
        .filter(|c| matches!(c, Command::Jobs(JobsCommand::StopJob { .. })))
        .count()
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Case {
    name: &'static str,
    what: String,
    times: Vec<Duration>,
}

impl Case {
    fn p50_max(&self) -> (f64, f64) {
        let mut t = self.times.clone();
        t.sort();
        (ms(t[t.len() / 2]), ms(*t.last().expect("rounds > 0")))
    }
}

fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    anyhow::ensure!(opts.rounds > 0, "--rounds must be at least 1");
    anyhow::ensure!(opts.hosts > 1, "--hosts must be at least 2");
    anyhow::ensure!(
        opts.jobs >= opts.deploy,
        "--jobs must include the --deploy formation"
    );

    let rss_before = rss_kib();
    let built = Instant::now();
    let mut s = ClusterState::default();
    apply(
        &mut s,
        ClusterCommand::Bootstrap {
            auth_key: "0123456789abcdef0123".into(),
            domain: None,
            controller_certificate: None,
            system_env: Default::default(),
        },
    );
    for h in 1..=opts.hosts {
        heartbeat(&mut s, h, 0);
    }
    create_app(&mut s, "big", opts.deploy);
    let rest = opts.jobs - opts.deploy;
    for a in 0..opts.apps {
        // The remaining jobs, shared as evenly as they go.
        let n = rest / opts.apps + u64::from(a < rest % opts.apps);
        create_app(&mut s, &format!("app{a}"), n);
    }
    // The first fill: everything placed from nothing, in passes as the leader would.
    let mut now = 1;
    let mut fill = Duration::ZERO;
    let mut fill_passes = 0;
    loop {
        let (took, commands) = timed_pass(&mut s, now);
        if commands.is_empty() {
            break;
        }
        fill += took;
        fill_passes += 1;
        hosts_react(&mut s, now);
        now += 1;
    }
    let running = s
        .jobs
        .jobs
        .values()
        .filter(|j| j.state == JobState::Running)
        .count() as u64;
    anyhow::ensure!(
        running == opts.jobs,
        "the fill ran {running} jobs, not {}",
        opts.jobs
    );
    let rss_state = rss_kib().saturating_sub(rss_before);
    let json_bytes = serde_json::to_vec(&s)?.len();
    eprintln!(
        "built {} hosts, {} jobs in {:.1}s",
        opts.hosts,
        opts.jobs,
        built.elapsed().as_secs_f64()
    );

    let mut steady = Case {
        name: "steady",
        what: "a pass over the settled cluster (plans nothing)".into(),
        times: vec![],
    };
    let mut down_mark = Case {
        name: "host_down_mark",
        what: "a host stops heartbeating: the pass that marks it down".into(),
        times: vec![],
    };
    let mut down_replace = Case {
        name: "host_down_replace",
        what: String::new(),
        times: vec![],
    };
    let mut deploy_place = Case {
        name: "deploy_place",
        what: format!(
            "a new release of a {}-job formation: its placements",
            opts.deploy
        ),
        times: vec![],
    };
    let mut deploy_stop = Case {
        name: "deploy_stop_old",
        what: "the new jobs run: the pass that stops the old ones".into(),
        times: vec![],
    };

    for round in 0..opts.rounds {
        let (took, commands) = timed_pass(&mut s.clone(), now);
        anyhow::ensure!(
            commands.is_empty(),
            "a settled cluster planned {commands:?}"
        );
        steady.times.push(took);

        // A host failure: every host but one heartbeats past the first's expiry.
        let mut f = s.clone();
        let later = now + TTL_MS + 1;
        let lost = 1 + round as u64 % opts.hosts;
        for h in (1..=opts.hosts).filter(|h| *h != lost) {
            heartbeat(&mut f, h, later);
        }
        let on_lost = f
            .jobs
            .jobs
            .values()
            .filter(|j| j.host == lost && j.state == JobState::Running)
            .count();
        let (took, commands) = timed_pass(&mut f, later + 1);
        anyhow::ensure!(
            commands
                .iter()
                .any(|c| matches!(c, Command::Jobs(JobsCommand::HostDown { .. }))),
            "host {lost} was not marked down"
        );
        down_mark.times.push(took);
        let (took, commands) = timed_pass(&mut f, later + 2);
        anyhow::ensure!(
            placed(&commands) == on_lost,
            "{} replacements for {on_lost} lost jobs",
            placed(&commands)
        );
        anyhow::ensure!(
            commands.iter().all(|c| match c {
                Command::Jobs(JobsCommand::PlaceJobs { jobs, .. }) =>
                    jobs.iter().all(|j| j.host != lost),
                _ => true,
            }),
            "a replacement went to the lost host"
        );
        down_replace.what = format!("then the pass that places its {on_lost} jobs elsewhere");
        down_replace.times.push(took);

        // A deploy of the big formation.
        let mut d = s.clone();
        apply(
            &mut d,
            AppsCommand::UpdateEnv {
                app: "big".into(),
                proc_type: None,
                set: [("ROUND".to_string(), round.to_string())].into(),
                unset: vec![],
                now_ms: now,
            },
        );
        let (took, commands) = timed_pass(&mut d, now + 1);
        anyhow::ensure!(
            placed(&commands) == opts.deploy as usize && stopped(&commands) == 0,
            "the deploy's first pass placed {} and stopped {}",
            placed(&commands),
            stopped(&commands)
        );
        deploy_place.times.push(took);
        hosts_react(&mut d, now + 1);
        let (took, commands) = timed_pass(&mut d, now + 2);
        anyhow::ensure!(
            stopped(&commands) == opts.deploy as usize,
            "the deploy's second pass stopped {} old jobs",
            stopped(&commands)
        );
        deploy_stop.times.push(took);
    }

    let cases = [steady, down_mark, down_replace, deploy_place, deploy_stop];
    println!(
        "{}",
        serde_json::json!({"case": "state", "hosts": opts.hosts, "jobs": opts.jobs,
            "apps": opts.apps + 1, "rss_kib": rss_state, "json_bytes": json_bytes,
            "fill_passes": fill_passes, "fill_plan_ms": ms(fill)})
    );
    for c in &cases {
        let (p50, max) = c.p50_max();
        println!(
            "{}",
            serde_json::json!({"case": c.name, "p50_ms": p50, "max_ms": max, "rounds": opts.rounds})
        );
    }
    println!();
    println!(
        "Scheduler simulation: {} hosts, {} jobs in {} apps; state {:.1} MiB resident ({:.1} MiB as JSON). First fill from nothing: {} passes, {:.1} ms planning in all.",
        opts.hosts,
        opts.jobs,
        opts.apps + 1,
        rss_state as f64 / 1024.0,
        json_bytes as f64 / (1 << 20) as f64,
        fill_passes,
        ms(fill)
    );
    println!();
    println!("| pass | what | p50 | max |");
    println!("|---|---|---|---|");
    for c in &cases {
        let (p50, max) = c.p50_max();
        println!("| {} | {} | {p50:.2} ms | {max:.2} ms |", c.name, c.what);
    }
    Ok(())
}
