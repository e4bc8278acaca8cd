//! Apps that run: images pushed as `docker save` archives, releases, the scheduler placing
//! jobs on hosts, containers started by each host, discovery and the router sending traffic
//! to them, logs, failures. Real daemons in network namespaces, real containers (namespaces,
//! overlay roots, cgroups) running Debian's busybox. Needs root; run with
//! `--test-threads=1` like the other cluster cases.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flynn_model::{Job, JobState};
use flynn_tests::router::get;
use flynn_tests::{eventually, failed, ok, Cluster};

const DOMAIN: &str = "jobs.test";

fn http(c: &Cluster, i: usize) -> SocketAddr {
    format!("{}:80", c.hosts[i].ip).parse().unwrap()
}

async fn cluster(n: usize) -> Cluster {
    let mut c = Cluster::start(n);
    c.bootstrap_with(n, &["--domain", DOMAIN]);
    c.wait_leader(0, None).await;
    // Hosts beyond the peers join as proxies a moment later.
    for i in 0..n {
        let host = c.host_client(i);
        eventually(
            Duration::from_secs(20),
            &format!("host {i} in the cluster"),
            || async {
                host.status()
                    .await
                    .ok()
                    .filter(|s| s.bootstrapped)
                    .map(|_| ())
            },
        )
        .await;
    }
    // And every host ready to run jobs (it says so in service flynn-host).
    c.wait_ready_for_jobs(n).await;
    c
}

/// Starts the daemons of a cluster made with `Cluster::create` (set up as a test needs),
/// every host a peer, and waits until every host runs jobs.
async fn boot(c: &mut Cluster) {
    let n = c.hosts.len();
    for i in 0..n {
        c.start_daemon(i);
    }
    for i in 0..n {
        c.wait_up(i);
    }
    c.bootstrap_with(n, &["--domain", DOMAIN]);
    c.wait_leader(0, None).await;
    c.wait_ready_for_jobs(n).await;
}

/// The index of the host with this node id.
async fn host_index(c: &Cluster, node_id: u64) -> usize {
    for i in 0..c.hosts.len() {
        if c.host_client(i).info().await.map(|h| h.node_id).ok() == Some(node_id) {
            return i;
        }
    }
    panic!("no host has node id {node_id}");
}

async fn jobs(c: &Cluster, app: &str) -> Vec<Job> {
    c.client(0).jobs(app).await.unwrap()
}

fn running(jobs: &[Job]) -> Vec<&Job> {
    jobs.iter()
        .filter(|j| j.state == JobState::Running)
        .collect()
}

/// The env the job that answered saw (from the image's CGI script).
async fn env_via_router(c: &Cluster, i: usize, app: &str) -> Option<BTreeMap<String, String>> {
    let r = get(http(c, i), &format!("{app}.{DOMAIN}"), "/cgi-bin/env").await;
    (r.status == 200).then(|| {
        r.text()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    })
}

/// Waits for a crashed job of `release` (of app web1).
async fn crash_of(c: &Cluster, release: &str) -> Job {
    eventually(Duration::from_secs(20), "a crashed job", || async {
        jobs(c, "web1")
            .await
            .into_iter()
            .find(|j| j.release == release && j.state == JobState::Crashed)
    })
    .await
}

/// Waits until `n` jobs of `release` run and nothing else of the app is active.
async fn settled(c: &Cluster, app: &str, release: &str, n: usize) -> Vec<Job> {
    eventually(
        Duration::from_secs(30),
        &format!("{n} jobs of {release} running, nothing else"),
        || async {
            let all = jobs(c, app).await;
            let active: Vec<&Job> = all.iter().filter(|j| j.state.is_active()).collect();
            let ok = active.len() == n
                && active
                    .iter()
                    .all(|j| j.release == release && j.state == JobState::Running);
            ok.then_some(all)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn t10_deploy_scale_route_kill_and_redeploy_on_env_change() {
    let c = cluster(3).await;
    let image = c.busybox_image("v1", None);
    ok(&c.flynn(0, &["create", "web1"]));
    // `flynn create` routes APP.$DOMAIN to the web processes.
    let routes = ok(&c.flynn(0, &["-a", "web1", "route"]));
    assert!(
        routes.contains("web1.jobs.test") && routes.contains("web1-web"),
        "{routes}"
    );

    let push = c.flynn(
        1,
        &["-a", "web1", "docker", "push", image.to_str().unwrap()],
    );
    let out = ok(&push);
    assert!(out.contains("web1-v1"), "{out}");
    assert!(String::from_utf8_lossy(&push.stderr).contains("uploading"));
    // The same layers again are not uploaded again.
    let again = c.flynn(
        2,
        &["-a", "web1", "docker", "push", image.to_str().unwrap()],
    );
    ok(&again);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already in the cluster"));

    ok(&c.flynn(0, &["-a", "web1", "scale", "web=3"]));
    let all = settled(&c, "web1", "web1-v2", 3).await;
    let hosts: BTreeSet<u64> = running(&all).iter().map(|j| j.host).collect();
    assert_eq!(hosts.len(), 3, "spread over the three hosts: {all:?}");

    // Every host's router reaches every job.
    let mut seen = BTreeSet::new();
    for n in 0..60 {
        let env = env_via_router(&c, n % 3, "web1")
            .await
            .expect("200 through the router");
        assert_eq!(env["FLYNN_APP_ID"], "web1");
        assert_eq!(env["FLYNN_PROCESS_TYPE"], "web");
        assert!(
            c.hosts.iter().any(|h| h.ip == env["EXTERNAL_IP"]),
            "{env:?}"
        );
        seen.insert(env["FLYNN_JOB_ID"].clone());
    }
    assert_eq!(
        seen.len(),
        3,
        "requests spread over the three jobs: {seen:?}"
    );
    // One client connection kept alive through host 0's router: 200 requests one after
    // another, each answered when its job answers (the io_uring backend once waited ~30 ms
    // per request, 6 s for these; busybox httpd closes every connection it serves, so each
    // also opens a new one to the job).
    let mut client = flynn_tests::router::Client::connect(http(&c, 0)).await;
    let start = Instant::now();
    for i in 0..200 {
        client
            .send(format!(
                "GET /index.html?{i} HTTP/1.1\r\nHost: web1.{DOMAIN}\r\n\r\n"
            ))
            .await;
        let r = client
            .read(false)
            .await
            .expect("an answer on the kept-alive connection");
        assert_eq!((r.status, r.text().trim()), (200, "hello from busybox v1"));
    }
    let took = start.elapsed();
    eprintln!("200 sequential requests through the daemon's router: {took:?}");
    assert!(
        took < Duration::from_secs(4),
        "200 sequential requests through the daemon's router took {took:?}"
    );

    // Each job has an address of its own on its host's subnet.
    let addrs: BTreeSet<&str> = running(&all)
        .iter()
        .map(|j| j.addr.as_deref().unwrap())
        .collect();
    assert_eq!(addrs.len(), 3);
    assert!(
        addrs
            .iter()
            .all(|a| a.starts_with("100.100.") && a.ends_with(":8080")),
        "{addrs:?}"
    );
    // `flynn-host ps` on the job's host lists it.
    let victim = running(&all)[0].clone();
    let on = host_index(&c, victim.host).await;
    let ps = ok(&c.flynn_host(on, &["ps"]));
    assert!(ps.contains(&victim.id), "{ps}");
    let victim = victim.id;

    // A killed job is replaced.
    ok(&c.flynn(0, &["-a", "web1", "kill", &victim]));
    eventually(
        Duration::from_secs(20),
        "the killed job replaced",
        || async {
            let all = jobs(&c, "web1").await;
            let r = running(&all);
            (r.len() == 3 && r.iter().all(|j| j.id != victim)).then_some(())
        },
    )
    .await;

    // Logs: each job said it started, in order per job, from every host.
    let log = ok(&c.flynn(0, &["-a", "web1", "log"]));
    assert!(
        log.contains(&format!(
            "web1[web.{victim}]: web {victim} starting on port"
        )),
        "{log}"
    );
    let starts = log
        .lines()
        .filter(|l| l.contains("starting on port"))
        .count();
    assert!(starts >= 4, "{log}");
    let one = ok(&c.flynn(0, &["-a", "web1", "log", "-j", &victim, "-n", "1"]));
    assert_eq!(one.lines().count(), 1, "{one}");

    // An env change is a new release, deployed with a rolling restart.
    ok(&c.flynn(0, &["-a", "web1", "env", "set", "GREETING=hi"]));
    settled(&c, "web1", "web1-v3", 3).await;
    let env = env_via_router(&c, 2, "web1").await.unwrap();
    assert_eq!(env["GREETING"], "hi");
    assert_eq!(env["FLYNN_RELEASE_ID"], "web1-v3");
    let releases = ok(&c.flynn(0, &["-a", "web1", "release"]));
    assert!(
        releases.contains("web1-v3") && releases.contains("web1-v1"),
        "{releases}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn t11_a_dead_host_s_jobs_run_elsewhere_and_leave_the_router() {
    let mut c = cluster(3).await;
    let image = c.busybox_image("v1", None);
    ok(&c.flynn(0, &["create", "web1"]));
    ok(&c.flynn(
        0,
        &["-a", "web1", "docker", "push", image.to_str().unwrap()],
    ));
    ok(&c.flynn(0, &["-a", "web1", "scale", "web=3"]));
    let all = settled(&c, "web1", "web1-v1", 3).await;
    // Host 2 (not the one we ask) dies with its jobs.
    let dead = c.host_client(2).info().await.unwrap().node_id;
    let dead_ip = c.hosts[2].ip.clone();
    let lost: Vec<String> = running(&all)
        .iter()
        .filter(|j| j.host == dead)
        .map(|j| j.id.clone())
        .collect();
    assert_eq!(lost.len(), 1);
    let t0 = Instant::now();
    c.kill(2);
    let all = eventually(
        Duration::from_secs(20),
        "replacement on a live host",
        || async {
            let all = jobs(&c, "web1").await;
            let r = running(&all);
            (r.len() == 3 && r.iter().all(|j| j.host != dead)).then_some(all)
        },
    )
    .await;
    let took = t0.elapsed();
    assert!(all
        .iter()
        .any(|j| j.id == lost[0] && j.state == JobState::Failed));
    eprintln!("replaced in {took:?}");
    // The router no longer sends to the dead host: every request succeeds.
    for n in 0..30 {
        let env = env_via_router(&c, n % 2, "web1").await;
        assert!(env.is_some(), "request {n} failed");
        assert_ne!(env.unwrap()["EXTERNAL_IP"], dead_ip);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t12_rolling_deploy_under_load_fails_no_request() {
    let c = cluster(2).await;
    let v1 = c.busybox_image("v1", None);
    let v2 = c.busybox_image("v2", None);
    ok(&c.flynn(0, &["create", "web1"]));
    ok(&c.flynn(0, &["-a", "web1", "docker", "push", v1.to_str().unwrap()]));
    ok(&c.flynn(0, &["-a", "web1", "scale", "web=2"]));
    settled(&c, "web1", "web1-v1", 2).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (okc, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let addr = http(&c, 0);
    let load = {
        let (stop, okc, bad) = (stop.clone(), okc.clone(), bad.clone());
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut versions = BTreeSet::new();
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let r = get(addr, &format!("web1.{DOMAIN}"), "/").await;
                if r.status == 200 {
                    okc.fetch_add(1, Ordering::SeqCst);
                    versions.insert(r.text().trim().to_string());
                } else {
                    bad.fetch_add(1, Ordering::SeqCst);
                    eprintln!("failed request: {} {}", r.status, r.text());
                }
            }
            versions
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    ok(&c.flynn(0, &["-a", "web1", "docker", "push", v2.to_str().unwrap()]));
    settled(&c, "web1", "web1-v2", 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let versions = load.await.unwrap();
    assert_eq!(
        bad.load(Ordering::SeqCst),
        0,
        "failed requests during the deploy"
    );
    assert!(okc.load(Ordering::SeqCst) > 20);
    assert!(
        versions.contains("hello from busybox v1") && versions.contains("hello from busybox v2"),
        "{versions:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn t13_bad_images_commands_and_scales_get_clear_errors() {
    let c = cluster(1).await;
    ok(&c.flynn(0, &["create", "web1"]));
    let image = c.busybox_image("v1", None);

    // A truncated archive is refused before anything is deployed.
    let bytes = std::fs::read(&image).unwrap();
    let cut = image.with_extension("cut.tar");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = failed(&c.flynn(0, &["-a", "web1", "docker", "push", cut.to_str().unwrap()]));
    assert!(err.contains("truncated") || err.contains("tar"), "{err}");
    // A file that is no archive at all: named, with what was expected, never quoted.
    let text = image.with_extension("passwd");
    std::fs::write(
        &text,
        "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/:/bin/sh\n",
    )
    .unwrap();
    let err = failed(&c.flynn(0, &["-a", "web1", "docker", "push", text.to_str().unwrap()]));
    assert!(
        err.contains(text.to_str().unwrap()) && err.contains("not a tar archive"),
        "{err}"
    );
    assert!(!err.contains("root:x"), "the error quotes the file: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // A layer whose bytes do not match its digest.
    let mut corrupt = bytes.clone();
    let at = corrupt.len() / 2; // inside the layer, which is nearly all of the archive
    corrupt[at] ^= 0xff;
    let bad = image.with_extension("bad.tar");
    std::fs::write(&bad, &corrupt).unwrap();
    let err = failed(&c.flynn(0, &["-a", "web1", "docker", "push", bad.to_str().unwrap()]));
    assert!(err.contains("corrupt"), "{err}");
    assert!(jobs(&c, "web1").await.is_empty());

    // A command the image does not have: the deploy fails with the reason and runs nothing.
    let missing = c.busybox_image("missing", Some("exec no-such-server -p $PORT"));
    let err = failed(&c.flynn(
        0,
        &["-a", "web1", "docker", "push", missing.to_str().unwrap()],
    ));
    assert!(err.contains("deploy of web1-v1 failed"), "{err}");
    assert!(
        err.contains("no-such-server") || err.contains("exited"),
        "{err}"
    );

    // A good deploy, then a crashing one: rolled back, the good one keeps serving.
    ok(&c.flynn(
        0,
        &["-a", "web1", "docker", "push", image.to_str().unwrap()],
    ));
    let crashing = c.busybox_image("v9", Some("echo boom >&2; exit 3"));
    let err = failed(&c.flynn(
        0,
        &["-a", "web1", "docker", "push", crashing.to_str().unwrap()],
    ));
    assert!(err.contains("rolled back to web1-v2"), "{err}");
    assert!(err.contains("status 3") || err.contains("port"), "{err}");
    settled(&c, "web1", "web1-v2", 1).await;
    assert_eq!(
        get(http(&c, 0), &format!("web1.{DOMAIN}"), "/")
            .await
            .text()
            .trim(),
        "hello from busybox v1"
    );

    // Scales of unknown types and negative counts are refused, and change nothing.
    let err = failed(&c.flynn(0, &["-a", "web1", "scale", "worker=1"]));
    assert!(
        err.contains("unknown process type") && err.lines().count() == 1,
        "{err}"
    );
    let err = failed(&c.flynn(0, &["-a", "web1", "scale", "web=-1"]));
    assert!(err.contains("between 0 and"), "{err}");
    assert_eq!(ok(&c.flynn(0, &["-a", "web1", "scale"])).trim(), "web=1");
}

#[tokio::test(flavor = "multi_thread")]
async fn t14_crash_loops_back_off_and_memory_limits_kill_only_the_job() {
    let c = cluster(1).await;
    ok(&c.flynn(0, &["create", "web1"]));
    // Serves only after allocating 48 MB (dd's buffer).
    let hungry = c.busybox_image(
        "v1",
        Some("dd if=/dev/zero of=/dev/null bs=48M count=1 && exec httpd -f -p $PORT -h /www"),
    );
    ok(&c.flynn(
        0,
        &["-a", "web1", "docker", "push", hungry.to_str().unwrap()],
    ));
    settled(&c, "web1", "web1-v1", 1).await;
    // Under a 16 MB limit the new release's job is killed: crashed, out of memory. The old
    // job keeps serving (a deploy never stops old jobs before new ones run).
    // The command waits for the rollout, and its failure names the job and why.
    let err = failed(&c.flynn(0, &["-a", "web1", "limit", "set", "web", "memory=16MB"]));
    assert!(
        err.contains("rollout of web1-v2 failed") && err.contains("out of memory"),
        "{err}"
    );
    let oom = crash_of(&c, "web1-v2").await;
    assert_eq!(oom.error.as_deref(), Some("out of memory"), "{oom:?}");
    let r = get(http(&c, 0), &format!("web1.{DOMAIN}"), "/").await;
    assert_eq!(r.status, 200, "the old job still serves");
    let limits = ok(&c.flynn(0, &["-a", "web1", "limit"]));
    assert!(limits.contains("memory=16MB"), "{limits}");

    // It keeps crashing: restarts back off, and the host's history stays bounded.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let all = jobs(&c, "web1").await;
    let crashed = all.iter().filter(|j| j.state == JobState::Crashed).count();
    assert!(crashed <= 25, "history bounded: {crashed}");
    assert!(
        (4..=12).contains(&crashed),
        "backed off (4 immediate restarts, then 1 s, 2 s, 4 s ...): {crashed} crashes in ~12 s"
    );
    let status = c.client(0).formation("web1").await.unwrap();
    assert_eq!(status.release, "web1-v2");
    // `env set` waits for its rollout too: a release that cannot run fails it, naming the
    // job; `--detach` returns at once.
    let out = c.flynn(0, &["-a", "web1", "env", "set", "GREETING=hi"]);
    let err = failed(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Env updated"));
    assert!(
        err.contains("web1-v3") && err.contains("out of memory"),
        "{err}"
    );
    let named = err.split_whitespace().any(|w| w.starts_with("web1-web-"));
    assert!(named, "names the job: {err}");
    let detached = std::time::Instant::now();
    ok(&c.flynn(0, &["-a", "web1", "env", "set", "--detach", "GREETING=bye"]));
    assert!(
        detached.elapsed() < Duration::from_secs(5),
        "--detach does not wait"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn t15_run_passes_stdin_output_and_the_exit_status_on_a_pipe_or_a_pty() {
    let c = cluster(2).await;
    ok(&c.flynn(0, &["create", "web1"]));
    let image = c.busybox_image("v1", None);
    ok(&c.flynn(
        0,
        &["-a", "web1", "docker", "push", image.to_str().unwrap()],
    ));
    // 100 KB through stdin, back through stdout, byte for byte; stderr apart; the status.
    let input: Vec<u8> = (0..100_000u32)
        .map(|i| b"abcdefghij\n"[(i % 11) as usize])
        .collect();
    let out = c.flynn_with_stdin(
        1,
        &[
            "-a",
            "web1",
            "run",
            "sh",
            "-c",
            "cat; echo to-stderr >&2; exit 7",
        ],
        &input,
    );
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, input);
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-stderr"));
    // Its env is the release's, with Flynn's own.
    let env = ok(&c.flynn(0, &["-a", "web1", "run", "env"]));
    assert!(
        env.contains("FLYNN_PROCESS_TYPE=run") && env.contains("IMAGE_VERSION=v1"),
        "{env}"
    );
    // A command the image lacks: the init says so, and `run` exits 127.
    let out = c.flynn(0, &["-a", "web1", "run", "no-such-command"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot run \"no-such-command\""));
    // Detached: the id at once; the job is a one-off, never restarted.
    let id = ok(&c.flynn(0, &["-a", "web1", "run", "-d", "sleep", "1"]));
    let id = id.trim().to_string();
    eventually(Duration::from_secs(15), "the detached job done", || async {
        let all = jobs(&c, "web1").await;
        all.iter()
            .find(|j| j.id == id && j.state == JobState::Done)
            .map(|_| ())
    })
    .await;
    // An app with no release has nothing to run.
    ok(&c.flynn(0, &["create", "empty"]));
    let err = failed(&c.flynn(0, &["-a", "empty", "run", "true"]));
    assert!(err.contains("no release"), "{err}");

    // On a pty (-t; from a terminal it is the default): the job's streams are a terminal
    // of the caller's size (80x24 when the caller has none), keys are read as typed, and
    // the terminal echoes them.
    let script = "test -t 0 && test -t 1 && test -t 2 && echo on-a-tty; stty size; \
                  read line; echo \"got:$line\"; exit 3";
    let out = c.flynn_with_stdin(
        1,
        &["-a", "web1", "run", "-t", "sh", "-c", script],
        b"hello\n",
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(3), "{text}");
    assert!(text.contains("on-a-tty\r\n24 80\r\n"), "{text:?}");
    // Echoed by the terminal when it arrived (before or after the prompt), then read.
    assert!(text.contains("got:hello\r\n"), "{text:?}");
    assert_eq!(text.matches("hello\r\n").count(), 2, "{text:?}");
    // ^C is the terminal's: the job's foreground gets SIGINT. A resize reaches the job too.
    let mut cli = c.spawn_flynn_piped(
        1,
        &[
            "-a",
            "web1",
            "run",
            "-t",
            "sh",
            "-c",
            "trap 'stty size' WINCH; echo ready; sleep 20 & wait; sleep 20; echo not-interrupted",
        ],
    );
    let mut stdin = cli.stdin.take().unwrap();
    let stdout = cli.stdout.take().unwrap();
    let (seen_tx, seen_rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut all = Vec::new();
        let mut stdout = stdout;
        let mut buf = [0u8; 1024];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            let _ = seen_tx.send(String::from_utf8_lossy(&all).into_owned());
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    let wait_for = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(text) = seen_rx.recv_timeout(Duration::from_millis(200)) {
                if text.contains(what) {
                    return;
                }
            }
        }
        panic!("no {what:?} from the job");
    };
    wait_for("ready");
    let job = jobs(&c, "web1")
        .await
        .into_iter()
        .find(|j| j.state == JobState::Running && j.tty.is_some())
        .expect("the job on a pty");
    let size = flynn_model::TtySize {
        cols: 132,
        rows: 43,
    };
    c.client(0).job_resize("web1", &job.id, size).await.unwrap();
    wait_for("43 132");
    std::io::Write::write_all(&mut stdin, b"\x03").unwrap();
    let status = cli.wait().unwrap();
    let text = reader.join().unwrap();
    assert_eq!(status.code(), Some(130), "{text:?}");
    assert!(!text.contains("not-interrupted"), "{text:?}");
    // Without a pty, ^C (SIGINT) on `flynn run` stops the job as well as the command.
    let mut cli = c.spawn_flynn_piped(
        1,
        &["-a", "web1", "run", "sh", "-c", "echo started; sleep 30"],
    );
    let stdout = cli.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    assert_eq!(lines.next().unwrap().unwrap(), "started");
    let job = jobs(&c, "web1")
        .await
        .into_iter()
        .find(|j| j.state == JobState::Running && j.args.contains(&"echo started; sleep 30".into()))
        .expect("the job running");
    // `timeout` (the harness's guard) passes the signal on to `flynn`.
    let sent = std::process::Command::new("kill")
        .args(["-INT", &cli.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = cli.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted: stopping job"));
    eventually(
        Duration::from_secs(20),
        "the interrupted job stopped",
        || async {
            let all = jobs(&c, "web1").await;
            all.iter()
                .find(|j| j.id == job.id && !j.state.is_active())
                .map(|_| ())
        },
    )
    .await;
    // A job that has no terminal cannot be resized.
    let plain = ok(&c.flynn(0, &["-a", "web1", "run", "-d", "sleep", "5"]));
    let err = c
        .client(0)
        .job_resize("web1", plain.trim(), size)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no terminal"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn t16_logs_are_ordered_bounded_followed_rotated_and_survive_a_restart() {
    let mut c = Cluster::create(1);
    c.hosts[0]
        .args
        .extend(["--log-max-size", "256K"].map(String::from));
    c.start_daemon(0);
    c.wait_up(0);
    c.bootstrap_with(1, &["--domain", DOMAIN]);
    c.wait_leader(0, None).await;
    ok(&c.flynn(0, &["create", "web1"]));
    let image = c.busybox_image("v1", None);
    ok(&c.flynn(
        0,
        &["-a", "web1", "docker", "push", image.to_str().unwrap()],
    ));

    // 1,500 numbered lines from one job: all there, in order.
    let out = ok(&c.flynn(0, &["-a", "web1", "run", "seq", "1", "1500"]));
    assert_eq!(out.lines().count(), 1500);
    let jobs_now = jobs(&c, "web1").await;
    let run = jobs_now
        .iter()
        .find(|j| j.proc_type == "run")
        .unwrap()
        .id
        .clone();
    let read = |args: &[&str]| {
        let mut full = vec!["-a", "web1", "log", "-j", run.as_str()];
        full.extend_from_slice(args);
        ok(&c.flynn(0, &full))
    };
    let numbers = |text: &str| -> Vec<u64> {
        text.lines()
            .filter_map(|l| l.rsplit(": ").next()?.trim().parse().ok())
            .collect()
    };
    assert_eq!(numbers(&read(&[])), (1..=1500).collect::<Vec<_>>());
    assert_eq!(numbers(&read(&["-n", "3"])), vec![1498, 1499, 1500]);

    // Far more than the file limit: rotated, one old file kept, the newest lines intact.
    ok(&c.flynn(0, &["-a", "web1", "run", "seq", "1", "20000"]));
    // Lines reach the file a moment after the job printed them.
    let all = eventually(Duration::from_secs(15), "the last line logged", || async {
        let all = ok(&c.flynn(0, &["-a", "web1", "log"]));
        all.lines()
            .last()
            .is_some_and(|l| l.ends_with(": 20000"))
            .then_some(all)
    })
    .await;
    let dir = c.hosts[0].data_dir.join("logs");
    let cur = std::fs::metadata(dir.join("web1.log")).unwrap().len();
    let old = std::fs::metadata(dir.join("web1.log.1")).unwrap().len();
    assert!(
        cur < 300_000 && (256 * 1024..300_000).contains(&old),
        "{cur} {old}"
    );
    assert!(all.lines().count() <= 10_000);

    // A restart of the host (and so of what serves the logs) loses nothing. (Other jobs'
    // lines may follow: the web job restarts with its host.)
    let big = jobs(&c, "web1")
        .await
        .into_iter()
        .filter(|j| j.proc_type == "run")
        .max_by_key(|j| j.created_ms)
        .unwrap()
        .id;
    let before = ok(&c.flynn(0, &["-a", "web1", "log", "-j", &big]));
    assert!(before.lines().count() <= 10_000 && before.ends_with(": 20000\n"));
    c.kill(0);
    c.start_daemon(0);
    c.wait_up(0);
    c.wait_leader(0, None).await;
    let again = eventually(
        Duration::from_secs(15),
        "logs after the restart",
        || async {
            let out = c.flynn(0, &["-a", "web1", "log", "-j", &big]);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        },
    )
    .await;
    assert_eq!(again, before);

    // -f follows: a line written after it started arrives.
    let follow = c.spawn_flynn_output(0, &["-a", "web1", "log", "-f", "-n", "1"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    ok(&c.flynn(0, &["-a", "web1", "run", "echo", "followed-marker"]));
    let text = eventually(Duration::from_secs(15), "the followed line", || async {
        let t = follow.output_so_far();
        t.contains("followed-marker").then_some(t)
    })
    .await;
    assert!(text.contains("followed-marker"));
}

#[tokio::test(flavor = "multi_thread")]
async fn t17_jobs_reach_published_ports_only_and_the_outside_through_their_host() {
    let c = cluster(2).await;
    ok(&c.flynn(0, &["create", "web1"]));
    let image = c.busybox_image("v1", None);
    ok(&c.flynn(
        0,
        &["-a", "web1", "docker", "push", image.to_str().unwrap()],
    ));
    ok(&c.flynn(0, &["-a", "web1", "scale", "web=2"]));
    let all = settled(&c, "web1", "web1-v1", 2).await;
    // A one-off job serving on a port it does not publish.
    let run_d = [
        "-a", "web1", "run", "-d", "httpd", "-f", "-p", "9000", "-h", "/www",
    ];
    let hidden = ok(&c.flynn(0, &run_d)).trim().to_string();
    let hidden_ip = eventually(
        Duration::from_secs(15),
        "the hidden server running",
        || async {
            jobs(&c, "web1").await.into_iter().find_map(|j| {
                (j.id == hidden && j.state == JobState::Running)
                    .then(|| j.addr.unwrap().split(':').next().unwrap().to_string())
            })
        },
    )
    .await;
    let get = |from: usize, addr: String| {
        let (ip, port) = addr.split_once(':').unwrap();
        let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} {port}");
        c.flynn(from, &["-a", "web1", "run", "sh", "-c", &script])
    };
    // From other jobs, wherever they run: each web job's published port answers...
    for web in running(&all) {
        let out = ok(&get(0, web.addr.clone().unwrap()));
        assert!(out.contains("hello from busybox v1"), "{out}");
    }
    // ...and a port a job did not publish does not, from jobs on any host...
    for from in [0, 1] {
        let out = get(from, format!("{hidden_ip}:9000"));
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("hello"),
            "a job reached an unpublished port: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // ...though the server is there: its own host reaches it.
    let on = host_index(
        &c,
        jobs(&c, "web1")
            .await
            .iter()
            .find(|j| j.id == hidden)
            .unwrap()
            .host,
    )
    .await;
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 {hidden_ip} 9000");
    let direct = c.run_cmd_in(on, &["sh", "-c", &script]);
    assert!(String::from_utf8_lossy(&direct.stdout).contains("hello from busybox v1"));
    // The host knows the job's MAC (made from its address) for good: no ARP, and no entry
    // in the kernel's ARP table, which every namespace shares and which ~500 jobs filled.
    let octets: std::net::Ipv4Addr = hidden_ip.parse().unwrap();
    let mac = octets
        .octets()
        .iter()
        .fold("0a:58".to_string(), |m, o| format!("{m}:{o:02x}"));
    let neigh = ok(&c.run_cmd_in(on, &["ip", "neigh", "show", &hidden_ip]));
    assert!(
        neigh.contains(&format!("lladdr {mac} PERMANENT")),
        "the host's neighbour entry for {hidden_ip}: {neigh}"
    );
    ok(&c.flynn(0, &["-a", "web1", "kill", &hidden]));
    // Jobs reach a network beyond the cluster (here the test's own address, which has no
    // route to job subnets) through their host's address.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("hello.txt"), "from outside\n").unwrap();
    let server = flynn_tests::serve_dir(&c.bridge_ip(), outside.path());
    let (ip, port) = (server.ip(), server.port());
    for from in [0, 1] {
        let script = format!("printf 'GET /hello.txt HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} {port}");
        let out = ok(&c.flynn(from, &["-a", "web1", "run", "sh", "-c", &script]));
        assert!(out.contains("from outside"), "from host {from}: {out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t18_process_limits_are_enforced_and_host_tools_show_jobs() {
    let c = cluster(1).await;
    ok(&c.flynn(0, &["create", "web1"]));
    // Starts 30 sleepers before serving.
    let forky = c.busybox_image(
        "forky",
        Some(
            "i=0; while [ $i -lt 30 ]; do sleep 300 & i=$((i+1)); done; \
             set -- /proc/[0-9]*; echo started $# processes; \
             kill -9 -1; exec httpd -f -p $PORT -h /www",
        ),
    );
    ok(&c.flynn(
        0,
        &["-a", "web1", "docker", "push", forky.to_str().unwrap()],
    ));
    settled(&c, "web1", "web1-v1", 1).await;
    // Under a limit of 10 processes the shell cannot fork its sleepers: the job crashes
    // saying so, and the old release keeps serving.
    let err = failed(&c.flynn(0, &["-a", "web1", "limit", "set", "web", "procs=10"]));
    assert!(err.contains("rollout of web1-v2 failed"), "{err}");
    let crashed = crash_of(&c, "web1-v2").await;
    let log = ok(&c.flynn(0, &["-a", "web1", "log", "-j", &crashed.id]));
    assert!(log.contains("can't fork"), "{log}");
    let r = get(http(&c, 0), &format!("web1.{DOMAIN}"), "/").await;
    assert_eq!(r.status, 200, "the old job still serves");
    // With room for them, it runs.
    ok(&c.flynn(0, &["-a", "web1", "limit", "set", "web", "procs=100"]));
    let job = settled(&c, "web1", "web1-v3", 1).await;
    let id = running(&job)[0].id.clone();

    // flynn-host: inspect, log and stop a job of this host.
    let inspect = ok(&c.flynn_host(0, &["inspect", &id]));
    let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    assert_eq!(v["state"], "running");
    assert!(v["pid"].as_u64().is_some_and(|p| p > 1));
    let hlog = ok(&c.flynn_host(0, &["log", &id]));
    assert!(hlog.contains("started"), "{hlog}");
    ok(&c.flynn_host(0, &["stop", &id]));
    eventually(
        Duration::from_secs(20),
        "the stopped job replaced",
        || async {
            let all = jobs(&c, "web1").await;
            let done = all.iter().any(|j| j.id == id && j.state == JobState::Done);
            (done && running(&all).len() == 1).then_some(())
        },
    )
    .await;
    let ps = ok(&c.flynn_host(0, &["ps", "-a"]));
    assert!(ps.contains(&id) && ps.contains("done"), "{ps}");

    // CPU is reserved as memory is: a type that fits on no host is not placed, the command
    // says why and the scheduler's log too, and the job before keeps serving. The limits
    // not named stay.
    let err = failed(&c.flynn(0, &["-a", "web1", "limit", "set", "web", "cpu=64cores"]));
    assert!(
        err.contains("no live host has room") && err.contains("64000m CPU"),
        "{err}"
    );
    let limits = ok(&c.flynn(0, &["-a", "web1", "limit"]));
    assert!(
        limits.contains("cpu=64000m") && limits.contains("procs=100"),
        "{limits}"
    );
    assert!(
        c.hosts[0].log_text().contains("no live host has room"),
        "the scheduler says so in its log"
    );
    let r = get(http(&c, 0), &format!("web1.{DOMAIN}"), "/").await;
    assert_eq!(r.status, 200, "the job before still serves");
    let out = c.flynn(0, &["-a", "web1", "limit", "set", "web", "cpu=250m"]);
    ok(&out);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("web 1/1"),
        "progress shown: {out:?}"
    );
    let limits = ok(&c.flynn(0, &["-a", "web1", "limit"]));
    assert!(limits.contains("cpu=250m"), "{limits}");
}

#[tokio::test(flavor = "multi_thread")]
async fn t19_deploy_a_directory_with_a_procfile_on_the_base_image() {
    let c = cluster(1).await;
    ok(&c.flynn(0, &["create", "site"]));
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("public")).unwrap();
    std::fs::write(
        dir.path().join("public/index.html"),
        "deployed from a directory\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("Procfile"),
        "web: exec httpd -f -p $PORT -h /app/public\nclock: while true; do echo tick; sleep 1; done\n",
    )
    .unwrap();
    // Version control history stays behind.
    std::fs::create_dir_all(dir.path().join(".git/objects")).unwrap();
    std::fs::write(dir.path().join(".git/config"), "[core]\n").unwrap();
    let deploy = ["-a", "site", "deploy", dir.path().to_str().unwrap()];
    // No base image yet: the error says what the operator does about it.
    let err = failed(&c.flynn(0, &deploy));
    assert!(err.contains("base-image push"), "{err}");
    let base = c.busybox_image("base", None);
    ok(&c.flynn(0, &["base-image", "push", base.to_str().unwrap()]));
    ok(&c.flynn(0, &deploy));
    let r = get(http(&c, 0), &format!("site.{DOMAIN}"), "/").await;
    assert_eq!(r.text().trim(), "deployed from a directory");
    let listed = ok(&c.flynn(0, &["-a", "site", "run", "ls", "-a", "/app"]));
    assert!(
        listed.contains("Procfile") && listed.contains("public"),
        "{listed}"
    );
    assert!(!listed.contains(".git"), "{listed}");
    let show = ok(&c.flynn(0, &["-a", "site", "release", "show"]));
    assert!(
        show.contains("web: /bin/sh -c exec httpd") && show.contains("clock:"),
        "{show}"
    );
    // The clock type runs when scaled; the same directory again uploads nothing.
    ok(&c.flynn(0, &["-a", "site", "scale", "clock=1"]));
    eventually(Duration::from_secs(15), "the clock ticking", || async {
        let out = ok(&c.flynn(0, &["-a", "site", "log", "-t", "clock"]));
        out.contains("tick").then_some(())
    })
    .await;
    let again = c.flynn(0, &deploy);
    ok(&again);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already in the cluster"));
    // A Procfile that names nothing is refused before anything is sent.
    std::fs::write(dir.path().join("Procfile"), "# nothing\n").unwrap();
    let err = failed(&c.flynn(0, &deploy));
    assert!(err.contains("Procfile"), "{err}");

    // System apps that run inside flynn-host have their logs where apps' are.
    let bad = c.flynn(
        0,
        &["-a", "blobstore", "env", "set", "BACKEND_X=backend=nope"],
    );
    failed(&bad);
    let log = eventually(Duration::from_secs(10), "the blobstore's log", || async {
        let out = ok(&c.flynn(0, &["-a", "blobstore", "log"]));
        out.contains("configuration refused").then_some(out)
    })
    .await;
    assert!(log.contains("blobstore[blobstore.host-"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn t20_data_volumes_outlive_their_job_unless_asked_not_to() {
    let c = cluster(1).await;
    ok(&c.flynn(0, &["create", "vol"]));
    let image = c.busybox_image("vol", None);
    ok(&c.flynn(0, &["-a", "vol", "docker", "push", image.to_str().unwrap()]));
    settled(&c, "vol", "vol-v1", 1).await;
    // A data volume at /data (kept) and a scratch one at /scratch (deleted with the job);
    // the job, running as nobody, writes to both before serving.
    let update = c.root_path().join("update.json");
    std::fs::write(
        &update,
        r#"{"processes": {"web": {"ports": true,
            "args": ["sh", "-c", "echo kept > /data/greeting && echo gone > /scratch/x && exec httpd -f -p $PORT -h /www"],
            "volumes": [{"path": "/data"}, {"path": "/scratch", "delete_on_stop": true}]}}}"#,
    )
    .unwrap();
    let out = ok(&c.flynn(
        0,
        &["-a", "vol", "release", "update", update.to_str().unwrap()],
    ));
    assert!(out.contains("vol-v2"), "{out}");
    let shown = ok(&c.flynn(0, &["-a", "vol", "release", "show"]));
    assert!(shown.contains("[volumes /data /scratch]"), "{shown}");
    let job = settled(&c, "vol", "vol-v2", 1).await;
    let id = running(&job)[0].id.clone();
    let volumes: serde_json::Value =
        serde_json::from_str(&ok(&c.flynn_host(0, &["volume", "list", "--all", "--json"])))
            .unwrap();
    let mine: Vec<&serde_json::Value> = volumes
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["job"] == id.as_str())
        .collect();
    assert_eq!(mine.len(), 2, "{volumes}");
    assert!(mine.iter().all(|v| v["app"] == "vol"), "{volumes}");
    let kept_id = format!("{id}-v0");
    let path_of = |vid: &str| -> std::path::PathBuf {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&c.flynn_host(0, &["volume", "inspect", vid]))).unwrap();
        std::path::PathBuf::from(v["path"].as_str().unwrap())
    };
    let kept = path_of(&kept_id).join("greeting");
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), "kept\n");
    // Stopped: the data volume and its file stay, recorded with the job; the scratch one goes.
    ok(&c.flynn(0, &["-a", "vol", "scale", "web=0"]));
    settled(&c, "vol", "vol-v2", 0).await;
    eventually(
        Duration::from_secs(20),
        "the scratch volume deleted",
        || async {
            let volumes: serde_json::Value =
                serde_json::from_str(&ok(&c.flynn_host(0, &["volume", "list", "--all", "--json"])))
                    .ok()?;
            let ids: Vec<String> = volumes
                .as_array()?
                .iter()
                .filter(|v| v["job"] == id.as_str())
                .filter_map(|v| v["id"].as_str().map(str::to_string))
                .collect();
            (ids == [kept_id.clone()]).then_some(())
        },
    )
    .await;
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), "kept\n");
    // Scaled up again: the new job takes the kept volume up (its data is there), and only
    // the scratch volume is new.
    ok(&c.flynn(0, &["-a", "vol", "scale", "web=1"]));
    let job = settled(&c, "vol", "vol-v2", 1).await;
    let new_id = running(&job)[0].id.clone();
    let volumes: serde_json::Value =
        serde_json::from_str(&ok(&c.flynn_host(0, &["volume", "list", "--all", "--json"])))
            .unwrap();
    let held: Vec<&str> = volumes
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["job"] == new_id.as_str())
        .filter_map(|v| v["id"].as_str())
        .collect();
    assert_eq!(held.len(), 2, "{volumes}");
    assert!(held.contains(&kept_id.as_str()), "{volumes}");
    assert_eq!(std::fs::read_to_string(&kept).unwrap(), "kept\n");
    // A deploy (an env change) of a type with a kept volume is stop-first: the new
    // release's job takes the same volume up instead of starting on an empty one.
    ok(&c.flynn(0, &["-a", "vol", "env", "set", "K=v"]));
    let job = settled(&c, "vol", "vol-v3", 1).await;
    let newest = running(&job)[0].id.clone();
    let volumes: serde_json::Value =
        serde_json::from_str(&ok(&c.flynn_host(0, &["volume", "list", "--all", "--json"])))
            .unwrap();
    let owner = volumes
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == kept_id.as_str())
        .map(|v| v["job"].clone());
    assert_eq!(owner, Some(serde_json::json!(newest)), "{volumes}");
    // A volume path that is not absolute is refused with the reason.
    std::fs::write(
        &update,
        r#"{"processes": {"web": {"ports": true, "volumes": [{"path": "data"}]}}}"#,
    )
    .unwrap();
    let err = failed(&c.flynn(
        0,
        &["-a", "vol", "release", "update", update.to_str().unwrap()],
    ));
    assert!(err.contains("volume path"), "{err}");
}

// A throwaway key made with ssh-keygen for this test; it guards nothing.
const BUILD_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\nQyNTUxOQAAACCCYX8NhyxzADculhxeUSXsC6LIoLwwtnZ+8C4SHTW3pwAAAJBzeSiEc3ko\nhAAAAAtzc2gtZWQyNTUxOQAAACCCYX8NhyxzADculhxeUSXsC6LIoLwwtnZ+8C4SHTW3pw\nAAAEC/EkkJX5mcLriZ1duylw1VmmW2lDpMAm5oBCwiPM3lEoJhfw2HLHMANy6WHF5RJewL\nosigvDC2dn7wLhIdNbenAAAAB3Jvb3RAdm0BAgMEBQY=\n-----END OPENSSH PRIVATE KEY-----\n";

/// What the build job saw, as its bin/compile reports it on the deploy's stderr.
const COMPILE: &str = r#"#!/bin/sh
set -e
echo "-----> compiling in $1 as $(id -u)"
if [ -e "$HOME/.ssh/id_rsa" ]; then
  echo "key sha256 $(sha256sum < "$HOME/.ssh/id_rsa" | cut -d' ' -f1)"
  echo "key mode $(stat -c %a "$HOME/.ssh/id_rsa") owner $(stat -c %u "$HOME/.ssh/id_rsa")"
  echo "hosts $(cut -d' ' -f1 "$HOME/.ssh/known_hosts")"
  if touch "$HOME/.ssh/extra" 2>/dev/null || chmod 600 "$HOME/.ssh/id_rsa" 2>/dev/null; then
    echo "the key is writable"; exit 9
  fi
  echo "the key is read-only"
else
  echo "no key"
fi
if env | grep -q SSH_CLIENT; then echo "the key is in the env"; exit 8; fi
n=$(cat "$2/count" 2>/dev/null || echo 0); n=$((n + 1)); echo $n > "$2/count"
echo "build number $n"
if [ -e "$1/fail" ]; then echo "failing on purpose"; exit 3; fi
if [ -e "$1/hog" ]; then big=$(head -c 200000000 /dev/zero | tr '\0' a); echo "held ${#big}"; fi
echo "$(cat "$3/GREETING") from the build" > "$1/public/built.txt"
echo "-----> done"
"#;

fn sha256_hex(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn t21_builds_run_bin_compile_with_the_ssh_client_key_read_only_and_a_kept_cache() {
    // Three hosts: the build runs where the deploy asked, its slug runs on every host.
    let c = cluster(3).await;
    ok(&c.flynn(0, &["create", "built"]));
    let base = c.busybox_image("base", None);
    ok(&c.flynn(0, &["base-image", "push", base.to_str().unwrap()]));
    ok(&c.flynn(0, &["-a", "built", "env", "set", "GREETING=hello"]));
    let hosts = "github.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIJhfw2HLHMANy6WHF5RJewLosigvDC2dn7wLhIdNben";
    ok(&c.flynn(
        0,
        &[
            "-a",
            "gitreceive",
            "env",
            "set",
            &format!("SSH_CLIENT_KEY={BUILD_KEY}"),
            &format!("SSH_CLIENT_HOSTS={hosts}"),
        ],
    ));
    let dir = tempfile::tempdir().unwrap();
    for sub in ["bin", "public"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    let compile = dir.path().join("bin/compile");
    std::fs::write(&compile, COMPILE).unwrap();
    let deploy = ["-a", "built", "deploy", dir.path().to_str().unwrap()];
    std::fs::write(
        dir.path().join("Procfile"),
        "web: exec httpd -f -p $PORT -h /app/public\n",
    )
    .unwrap();
    let err = failed(&c.flynn(0, &deploy));
    assert!(err.contains("not executable"), "{err}");
    std::fs::set_permissions(
        &compile,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = c.flynn(1, &deploy);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(&out);
    // The build ran as the image's user (nobody), with gitreceive's key and hosts as files
    // it owns and can read but not change, and not in its environment.
    assert!(said.contains("compiling in /app as 65534"), "{said}");
    let sum = sha256_hex(BUILD_KEY.as_bytes());
    assert!(said.contains(&format!("key sha256 {sum}")), "{said}");
    assert!(said.contains("key mode 400 owner 65534"), "{said}");
    assert!(said.contains("hosts github.com"), "{said}");
    assert!(said.contains("the key is read-only"), "{said}");
    assert!(said.contains("-----> done"), "{said}");
    assert!(said.contains("build number 1"), "{said}");
    assert!(!said.contains("PRIVATE KEY"), "{said}");
    // What runs is the built tree: the file bin/compile wrote, with the app's env.
    ok(&c.flynn(0, &["-a", "built", "scale", "web=3"]));
    let release = ok(&c.flynn(0, &["-a", "built", "release", "show"]));
    let id = release
        .split_whitespace()
        .find(|w| w.starts_with("built-v"))
        .unwrap()
        .to_string();
    let placed = settled(&c, "built", &id, 3).await;
    let hosts: BTreeSet<u64> = running(&placed).iter().map(|j| j.host).collect();
    assert_eq!(hosts.len(), 3, "{placed:?}");
    for i in 0..3 {
        let r = get(http(&c, i), &format!("built.{DOMAIN}"), "/built.txt").await;
        assert_eq!(r.text().trim(), "hello from the build");
    }
    // The key stays with builds: not in the slug, not in the app's jobs.
    let seen = ok(&c.flynn(
        0,
        &[
            "-a",
            "built",
            "run",
            "sh",
            "-c",
            "ls /home/build/.ssh 2>&1; grep -rl 'PRIVATE KEY' /app /home /tmp; echo end",
        ],
    ));
    assert!(
        seen.contains("No such file") && seen.trim_end().ends_with("end"),
        "{seen}"
    );
    assert!(!seen.contains("id_rsa"), "{seen}");

    // A build that fails deploys nothing and says so.
    std::fs::write(dir.path().join("fail"), "").unwrap();
    let err = failed(&c.flynn(0, &deploy));
    assert!(
        err.contains("failing on purpose") && err.contains("bin/compile exited 3"),
        "{err}"
    );
    assert_eq!(
        ok(&c.flynn(0, &["-a", "built", "release", "show"])),
        release
    );
    // Without a configured key a build runs with no .ssh at all.
    std::fs::remove_file(dir.path().join("fail")).unwrap();
    ok(&c.flynn(
        0,
        &[
            "-a",
            "gitreceive",
            "env",
            "unset",
            "SSH_CLIENT_KEY",
            "SSH_CLIENT_HOSTS",
        ],
    ));
    ok(&c.flynn(0, &["-a", "built", "env", "set", "GREETING=bonjour"]));
    let out = c.flynn(0, &deploy);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(&out);
    assert!(said.contains("no key"), "{said}");
    // The cache a successful build left is the next build's; a failed build's is not kept.
    assert!(said.contains("build number 2"), "{said}");
    // Old jobs leave the routers as the new ones run.
    eventually(Duration::from_secs(20), "the new build served", || async {
        let r = get(http(&c, 0), &format!("built.{DOMAIN}"), "/built.txt").await;
        (r.text().trim() == "bonjour from the build").then_some(())
    })
    .await;
    // Builds run under gitreceive's memory limit (Flynn's setting; 1 GiB by default): a
    // build that needs more is killed and deploys nothing.
    let set_limit = |v: &str| {
        c.flynn(
            0,
            &[
                "-a",
                "gitreceive",
                "env",
                "set",
                &format!("SLUGBUILDER_DEFAULT_MEMORY_LIMIT={v}"),
            ],
        )
    };
    for bad in ["lots", "1MB"] {
        let err = failed(&set_limit(bad));
        assert!(err.contains("SLUGBUILDER_DEFAULT_MEMORY_LIMIT"), "{err}");
    }
    ok(&set_limit("96MB"));
    std::fs::write(dir.path().join("hog"), "").unwrap();
    let err = failed(&c.flynn(0, &deploy));
    assert!(err.contains("bin/compile exited 137"), "{err}");
    ok(&c.flynn(
        0,
        &[
            "-a",
            "gitreceive",
            "env",
            "unset",
            "SLUGBUILDER_DEFAULT_MEMORY_LIMIT",
        ],
    ));
    let out = c.flynn(0, &deploy);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(&out);
    assert!(said.contains("held 200000000"), "{said}");
    // Deleting the app deletes its build cache.
    let cache = ["state", "get", "blob//build-cache/built.tar.gz"];
    ok(&c.flynn_host(0, &cache));
    ok(&c.flynn(0, &["-a", "built", "delete", "-y"]));
    failed(&c.flynn_host(0, &cache));
}

/// Requests through host `i`'s router until stopped: those that got an answer other than
/// 200 (always a failure), and transport errors after the router had answered once more
/// following `back` being set (a router that is back fails nothing).
struct Load {
    stop: Arc<AtomicBool>,
    back: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, Vec<String>)>,
}

impl Load {
    fn start(addr: SocketAddr, host: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let back = Arc::new(AtomicBool::new(true));
        let task = {
            let (stop, back) = (stop.clone(), back.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(180);
                let (mut served, mut failures) = (0u64, Vec::new());
                let mut answered_since_back = true;
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    if !back.load(Ordering::SeqCst) {
                        answered_since_back = false;
                    }
                    // A request in flight when the router was killed is not the router's
                    // failure once back: only those begun and ended while it is back count.
                    let counts = |answered: bool| answered && back.load(Ordering::SeqCst);
                    let attempt = tokio::time::timeout(
                        Duration::from_secs(5),
                        tokio::net::TcpStream::connect(addr),
                    )
                    .await;
                    let mut client = match attempt {
                        Ok(Ok(s)) => flynn_tests::router::Client::from_stream(s),
                        _ => {
                            if counts(answered_since_back) {
                                failures.push("connect failed".to_string());
                            }
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    };
                    let req =
                        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
                    let written = {
                        use tokio::io::AsyncWriteExt;
                        client.stream.write_all(req.as_bytes()).await.is_ok()
                    };
                    let answer = if written {
                        client.read_or_cut(false).await
                    } else {
                        None
                    };
                    match answer {
                        Some(r) if r.status == 200 => {
                            served += 1;
                            if back.load(Ordering::SeqCst) {
                                answered_since_back = true;
                            }
                        }
                        Some(r) => failures.push(format!("{} {}", r.status, r.text())),
                        None if counts(answered_since_back) => failures.push("no answer".into()),
                        None => {}
                    }
                }
                (served, failures)
            })
        };
        Load { stop, back, task }
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

/// Whether process `pid` runs (an orphan that ended may stay a zombie until its new parent
/// reaps it).
fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s[s.rfind(')')? + 2..].starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// The `tick N` numbers of a job's log, in order.
fn ticks(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.rsplit_once("tick ")?.1.trim().parse().ok())
        .collect()
}

const TICKING: &str =
    "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.05; done & exec httpd -f -p $PORT -h /www";

#[tokio::test(flavor = "multi_thread")]
async fn t22_jobs_outlive_a_killed_daemon_and_are_taken_up_again() {
    let mut c = cluster(1).await;
    ok(&c.flynn(0, &["create", "web1"]));
    let image = c.busybox_image("v1", Some(TICKING));
    ok(&c.flynn(
        0,
        &["-a", "web1", "docker", "push", image.to_str().unwrap()],
    ));
    let job = settled(&c, "web1", "web1-v1", 1).await;
    let id = running(&job)[0].id.clone();
    let inspect = |c: &Cluster| -> serde_json::Value {
        serde_json::from_str(&ok(&c.flynn_host(0, &["inspect", &id]))).unwrap()
    };
    let pid = inspect(&c)["pid"].as_u64().unwrap();
    let load = Load::start(http(&c, 0), format!("web1.{DOMAIN}"));
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The daemon dies (router and all); the job does not.
    load.back.store(false, Ordering::SeqCst);
    c.kill_daemon(0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(alive(pid), "the job's init outlived its daemon");
    c.start_daemon(0);
    c.wait_up(0);
    load.back.store(true, Ordering::SeqCst);
    c.wait_leader(0, None).await;
    // The same job, the same processes, running and served again.
    eventually(Duration::from_secs(20), "the job taken up", || async {
        let v = inspect(&c);
        (v["state"] == "running" && v["pid"].as_u64() == Some(pid)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (served, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(served > 20, "{served}");
    let all = jobs(&c, "web1").await;
    let ids: Vec<&str> = running(&all).iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, [id.as_str()], "nothing restarted or replaced");
    assert!(
        !c.hosts[0]
            .log_text()
            .contains("its host restarted while it ran"),
        "not reported lost"
    );
    // Every line the job wrote, while its daemon was away too, once and in order.
    let log = ok(&c.flynn(0, &["-a", "web1", "log", "-j", &id]));
    let n = ticks(&log);
    assert!(n.len() > 60, "{} lines", n.len());
    assert_eq!(n, (1..=n.len() as u64).collect::<Vec<_>>(), "{log}");

    // A taken-up job stops as any other: replaced, and its init gone.
    ok(&c.flynn_host(0, &["stop", &id]));
    eventually(
        Duration::from_secs(20),
        "the stopped job replaced",
        || async {
            let all = jobs(&c, "web1").await;
            let done = all.iter().any(|j| j.id == id && j.state == JobState::Done);
            (done && running(&all).len() == 1).then_some(())
        },
    )
    .await;
    assert!(!alive(pid), "its init ended");
}

#[tokio::test(flavor = "multi_thread")]
async fn t23_on_three_hosts_a_daemon_restart_fails_nothing_and_a_job_replaced_meanwhile_is_stopped()
{
    let mut c = cluster(3).await;
    ok(&c.flynn(0, &["create", "web1"]));
    let image = c.busybox_image("v1", Some(TICKING));
    ok(&c.flynn(
        0,
        &["-a", "web1", "docker", "push", image.to_str().unwrap()],
    ));
    ok(&c.flynn(0, &["-a", "web1", "scale", "web=3"]));
    let before = settled(&c, "web1", "web1-v1", 3).await;
    let mut ids: Vec<String> = running(&before).iter().map(|j| j.id.clone()).collect();
    ids.sort();
    // Host 2's daemon is killed and back within the host-down time: the router of host 0
    // keeps sending to host 2's job, which never stopped.
    let load = Load::start(http(&c, 0), format!("web1.{DOMAIN}"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.kill_daemon(2);
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.start_daemon(2);
    c.wait_up(2);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (served, failures) = load.finish().await;
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(served > 20, "{served}");
    let after = jobs(&c, "web1").await;
    let mut now: Vec<String> = running(&after).iter().map(|j| j.id.clone()).collect();
    now.sort();
    assert_eq!(now, ids, "the same jobs");

    // Away longer than the host-down time: its job is marked failed and replaced. When the
    // daemon comes back, the old job is stopped, not left beside its replacement.
    let node2 = c.host_client(2).info().await.unwrap().node_id;
    let on2 = running(&after)
        .iter()
        .find(|j| j.host == node2)
        .map(|j| j.id.clone())
        .expect("a job on host 2");
    let shims = flynn_tests::live_shims(&c.hosts[2].data_dir);
    assert_eq!(shims.len(), 1, "{shims:?}");
    c.kill_daemon(2);
    eventually(Duration::from_secs(30), "the job replaced", || async {
        let all = jobs(&c, "web1").await;
        let failed = all
            .iter()
            .any(|j| j.id == on2 && j.state == JobState::Failed);
        (failed && running(&all).len() == 3).then_some(())
    })
    .await;
    c.start_daemon(2);
    c.wait_up(2);
    eventually(Duration::from_secs(20), "the old job ended", || async {
        (!alive(u64::from(shims[0]))).then_some(())
    })
    .await;
    let all = jobs(&c, "web1").await;
    assert_eq!(running(&all).len(), 3);
    assert!(all
        .iter()
        .any(|j| j.id == on2 && j.state == JobState::Failed));
}

#[tokio::test(flavor = "multi_thread")]
async fn t24_jobs_in_two_subnets_reach_each_other_s_published_ports_over_vxlan() {
    // Hosts 0 and 1 on one subnet, host 2 on another, joined by a router: no L2 between.
    let mut c = Cluster::create(3);
    c.split_subnets(&[2]);
    boot(&mut c).await;
    // `auto`: a route to the host on this subnet, VXLAN to the one behind the router.
    let overlay = eventually(Duration::from_secs(20), "the overlay set up", || async {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&c.flynn_host(0, &["components"]))).ok()?;
        let between = v["jobs"]["network"]["between_hosts"].clone();
        (between["hosts_by_vxlan"] == 1 && between["hosts_by_route"] == 1).then_some(between)
    })
    .await;
    assert_eq!(overlay["mode"], "auto", "{overlay}");

    ok(&c.flynn(0, &["create", "web1"]));
    let image = c.busybox_image("v1", None);
    ok(&c.flynn(
        0,
        &["-a", "web1", "docker", "push", image.to_str().unwrap()],
    ));
    ok(&c.flynn(0, &["-a", "web1", "scale", "web=3"]));
    let all = settled(&c, "web1", "web1-v1", 3).await;
    let node2 = c.host_client(2).info().await.unwrap().node_id;
    let far = running(&all)
        .into_iter()
        .find(|j| j.host == node2)
        .expect("a job on host 2")
        .clone();
    // The router of host 0 sends to every job, the one across the router too.
    for n in 0..12 {
        let r = get(http(&c, 0), &format!("web1.{DOMAIN}"), "/").await;
        assert_eq!(r.status, 200, "request {n}: {}", r.text());
    }
    // Jobs reach a job in the other subnet on its published port, both ways...
    let get_from = |from: usize, addr: &str| {
        let (ip, port) = addr.split_once(':').unwrap();
        let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} {port}");
        c.flynn(from, &["-a", "web1", "run", "sh", "-c", &script])
    };
    let out = ok(&get_from(0, far.addr.as_deref().unwrap()));
    assert!(out.contains("hello from busybox v1"), "{out}");
    for near in running(&all).into_iter().filter(|j| j.host != node2) {
        let out = ok(&get_from(2, near.addr.as_deref().unwrap()));
        assert!(out.contains("hello from busybox v1"), "{out}");
    }
    // ...and not on a port it did not publish.
    let hidden = ok(&c.flynn(
        2,
        &[
            "-a", "web1", "run", "-d", "httpd", "-f", "-p", "9000", "-h", "/www",
        ],
    ))
    .trim()
    .to_string();
    let hidden_job = eventually(Duration::from_secs(15), "the hidden server", || async {
        jobs(&c, "web1")
            .await
            .into_iter()
            .find(|j| j.id == hidden && j.state == JobState::Running)
    })
    .await;
    assert_eq!(
        hidden_job.host, node2,
        "a one-off job runs where it was asked"
    );
    let hidden_ip = hidden_job
        .addr
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let out = get_from(0, &format!("{hidden_ip}:9000"));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("hello"),
        "a job reached an unpublished port across the overlay"
    );
    ok(&c.flynn(0, &["-a", "web1", "kill", &hidden]));
}

/// Host `i`'s job network as `flynn-host components` says it.
fn job_network(c: &Cluster, i: usize) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&ok(&c.flynn_host(i, &["components"]))).unwrap();
    v["jobs"]["network"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn t25_a_host_past_one_subnet_claims_another_keeps_it_across_a_restart_and_gives_it_back() {
    // Host 1 holds two 32 MB jobs: nearly all of 300 go to host 0, past one subnet's 253.
    // Host 1 reaches host 0's subnets over VXLAN: an extra subnet goes through the VTEP of
    // the first (routes via an address, the other way, are the same as for a first one).
    let mut c = Cluster::create(2);
    c.hosts[1].args = ["--job-memory", "64MB", "--job-network", "vxlan"]
        .map(String::from)
        .to_vec();
    boot(&mut c).await;
    let first = job_network(&c, 0);
    assert_eq!(first["subnets"].as_array().unwrap().len(), 1, "{first}");
    assert_eq!(first["capacity"], 253, "{first}");

    ok(&c.flynn(0, &["create", "web1"]));
    let image = c.busybox_image("v1", None);
    ok(&c.flynn(
        0,
        &["-a", "web1", "docker", "push", image.to_str().unwrap()],
    ));
    ok(&c.flynn(0, &["-a", "web1", "limit", "set", "web", "memory=32MB"]));
    ok(&c.flynn(0, &["-a", "web1", "scale", "web=300"]));
    let release = c.client(0).formation("web1").await.unwrap().release;
    let all = eventually(Duration::from_secs(240), "300 jobs running", || async {
        let all = jobs(&c, "web1").await;
        (running(&all).len() == 300).then_some(all)
    })
    .await;
    assert!(
        all.iter().all(|j| j.state != JobState::Failed),
        "no job failed for want of an address: {:?}",
        all.iter().find(|j| j.state == JobState::Failed)
    );
    let net = job_network(&c, 0);
    let subnets: Vec<String> = net["subnets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    assert_eq!(subnets.len(), 2, "{net}");
    assert_eq!(net["capacity"], 506, "{net}");
    assert_eq!(net["subnet"], first["subnet"], "the first subnet is kept");
    // A job on the extra subnet, reached from the other host (its route to that subnet)
    // and through its router.
    let extra_prefix = subnets
        .iter()
        .find(|s| **s != first["subnet"])
        .unwrap()
        .trim_end_matches("0/24")
        .to_string();
    let far = running(&all)
        .into_iter()
        .find(|j| {
            j.addr
                .as_deref()
                .is_some_and(|a| a.starts_with(&extra_prefix))
        })
        .expect("a job on the extra subnet")
        .clone();
    let far_addr = far.addr.clone().unwrap();
    let fetch = |c: &Cluster| {
        let (ip, port) = far_addr.split_once(':').unwrap();
        let script =
            format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 10 busybox nc -w 3 {ip} {port}");
        c.run_cmd_in(1, &["sh", "-c", &script])
    };
    // Host 1 routes the new subnet once the claim reaches it (it may lag the burst).
    let since = Instant::now();
    eventually(
        Duration::from_secs(30),
        "host 1 reaching the extra subnet",
        || async {
            let out = fetch(&c);
            String::from_utf8_lossy(&out.stdout)
                .contains("hello from busybox v1")
                .then_some(())
        },
    )
    .await;
    eprintln!(
        "host 1 reached the extra subnet after {:?}",
        since.elapsed()
    );
    for n in 0..10 {
        let r = get(http(&c, 1), &format!("web1.{DOMAIN}"), "/").await;
        assert_eq!(r.status, 200, "request {n}: {}", r.text());
    }

    // A restarted daemon takes both subnets up again, jobs on the extra one and all.
    c.kill_daemon(0);
    c.start_daemon(0);
    c.wait_up(0);
    c.wait_leader(0, None).await;
    let again = eventually(Duration::from_secs(30), "the job network again", || async {
        let net = job_network(&c, 0);
        (net["mode"] == "routed").then_some(net)
    })
    .await;
    assert_eq!(again["subnets"], net["subnets"], "{again}");
    assert!(ok(&fetch(&c)).contains("hello from busybox v1"));
    settled(&c, "web1", &release, 300).await;

    // Host 1 routes the extra subnet (over VXLAN, through host 0's first VTEP).
    let extra_subnet = format!("{extra_prefix}0/24");
    let routed = |c: &Cluster| ok(&c.run_cmd_in(1, &["ip", "route", "show", &extra_subnet]));
    let route = routed(&c);
    assert!(route.contains("dev flynnvx"), "{route}");

    // Scaled away, the extra subnet is given back (the first kept): the cluster no longer
    // lists it, so host 1 stops routing it.
    ok(&c.flynn(0, &["-a", "web1", "scale", "web=0"]));
    let back = eventually(
        Duration::from_secs(120),
        "the extra subnet given back",
        || async {
            let net = job_network(&c, 0);
            (net["subnets"].as_array().map(Vec::len) == Some(1)).then_some(net)
        },
    )
    .await;
    assert_eq!(back["subnet"], first["subnet"], "{back}");
    assert_eq!(back["capacity"], 253, "{back}");
    eventually(
        Duration::from_secs(30),
        "host 1 no longer routing the given-back subnet",
        || async { routed(&c).trim().is_empty().then_some(()) },
    )
    .await;
    ok(&c.flynn(0, &["-a", "web1", "scale", "web=1"]));
    settled(&c, "web1", &release, 1).await;
}

/// `GET /hosts/details` of the cluster, by node id.
async fn host_details(c: &Cluster) -> BTreeMap<u64, serde_json::Value> {
    let v: Vec<serde_json::Value> = reqwest::Client::new()
        .get(format!("{}/hosts/details", c.hosts[0].url()))
        .bearer_auth(&c.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v.into_iter()
        .map(|h| (h["id"].as_str().unwrap().parse().unwrap(), h))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn t26_a_host_that_cannot_start_jobs_is_passed_over_and_says_why() {
    // Host 1 runs jobs in its own network with one port to give: past its first job, a job
    // placed there cannot start. That is the host's trouble, not the app's: its jobs go to
    // host 0, and the host is shown failing.
    let mut c = Cluster::create(2);
    c.hosts[1].args = ["--job-network", "host", "--job-ports", "50100-50100"]
        .map(String::from)
        .to_vec();
    boot(&mut c).await;
    let far = c.host_client(1).info().await.unwrap().node_id;
    ok(&c.flynn(0, &["create", "web1"]));
    let image = c.busybox_image("v1", None);
    ok(&c.flynn(
        0,
        &["-a", "web1", "docker", "push", image.to_str().unwrap()],
    ));
    ok(&c.flynn(0, &["-a", "web1", "scale", "web=8"]));
    let started = Instant::now();
    let all = eventually(Duration::from_secs(60), "8 jobs running", || async {
        let all = jobs(&c, "web1").await;
        (running(&all).len() == 8).then_some(all)
    })
    .await;
    let failed: Vec<&Job> = all.iter().filter(|j| j.state == JobState::Failed).collect();
    assert!(
        !failed.is_empty(),
        "some job was placed on host 1 and failed"
    );
    for j in &failed {
        assert_eq!(j.host, far, "only host 1 fails: {j:?}");
        assert!(
            j.error
                .as_deref()
                .unwrap_or_default()
                .contains("no free port"),
            "{j:?}"
        );
    }
    let on_far = running(&all).iter().filter(|j| j.host == far).count();
    assert!(on_far <= 1, "{on_far} running on a host with one port");
    // Host 1's one job may have come up after its failures, which clears its record. Four
    // more jobs: spread by type, they go to host 1 first, where none can start now.
    ok(&c.flynn(0, &["-a", "web1", "scale", "web=12"]));
    let all = eventually(Duration::from_secs(60), "12 jobs running", || async {
        let all = jobs(&c, "web1").await;
        (running(&all).len() == 12).then_some(all)
    })
    .await;
    let on_far = running(&all).iter().filter(|j| j.host == far).count();
    assert!(on_far <= 1, "{on_far} running on a host with one port");
    // A generous bound that catches the app being backed off for the host's failures (1 s
    // after the fourth, doubling with each), not a timing goal.
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "{:?} to run 8 jobs, then 12",
        started.elapsed()
    );
    let details = host_details(&c).await;
    let faults = &details[&far]["start_failures"];
    assert!(faults["count"].as_u64().unwrap() >= 1, "{faults}");
    let pause = faults["paused_until_ms"].as_u64().unwrap() - faults["last_ms"].as_u64().unwrap();
    assert!((500..=30_000).contains(&pause), "{faults}");
    let near = c.host_client(0).info().await.unwrap().node_id;
    assert!(details[&near]["start_failures"].is_null(), "{details:?}");
}
