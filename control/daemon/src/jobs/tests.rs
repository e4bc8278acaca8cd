//! The runner's phases without a cluster: a real `ClusterState` behind [`FakeState`],
//! real directories, sockets and a directory volume provider. Containers themselves are
//! tested on real hosts (tests/tests/jobs.rs).

use std::sync::Arc;
use std::time::Duration;

use flynn_state::jobs::{JobsCommand, NewJob};
use flynn_state::{AppsCommand, Job, JobState, NewRelease, VolumeReq};

use super::state::{FakeState, State};
use super::supervise::{wait_listening, Ended, Outcome};
use super::*;

/// A runner of host 1 with its directories under `dir`, no blobstore, volumes on
/// directories.
fn runner(dir: &std::path::Path) -> Arc<JobRunner> {
    let args = JobsArgs {
        no_jobs: false,
        log_dir: dir.join("log"),
        log_max_size: "1M".into(),
        job_ports: "45000-45010".into(),
        job_network: "host".into(),
        job_memory: "1G".into(),
        job_cpu: "auto".into(),
    };
    let cfg = args.validate(dir).unwrap().expect("jobs enabled");
    let volumes = crate::components::volumes::VolumeConfig {
        provider: "dir".into(),
        pool: flynn_volume::PoolConfig::under(dir, "flynn-test"),
        dir_root: dir.join("volumes"),
    };
    let volumes =
        Arc::new(crate::components::volumes::VolumesComponent::start(&volumes, 1).unwrap());
    Arc::new(JobRunner::start(&cfg, 1, "127.0.0.1:1113".into(), None, volumes).unwrap())
}

/// An image that runs `/bin/httpd`, of `layers`.
fn image(layers: Vec<flynn_state::Layer>) -> flynn_state::Image {
    flynn_state::Image {
        layers,
        config: flynn_state::ImageConfig {
            cmd: vec!["/bin/httpd".into()],
            ..Default::default()
        },
    }
}

/// A layer this host has not unpacked.
fn layer(hex: &str) -> flynn_state::Layer {
    flynn_state::Layer {
        sha512: hex.repeat(64),
        size: 1,
        compression: flynn_state::LayerCompression::Gzip,
    }
}

/// An app `web` with one release whose `web` type has `volumes`; its id.
fn release(state: &FakeState, volumes: Vec<VolumeReq>) -> String {
    state.apply(AppsCommand::CreateApp { name: "web".into() });
    let process = flynn_state::ProcessType {
        volumes,
        ..Default::default()
    };
    let r = state.apply(JobsCommand::CreateRelease {
        app: "web".into(),
        release: NewRelease {
            image: image(vec![]),
            processes: Some([("web".to_string(), process)].into()),
        },
        now_ms: 1,
    });
    flynn_state::Release::try_from(r).unwrap().id
}

fn place(state: &FakeState, release: &str) -> Job {
    let r = state.apply(JobsCommand::PlaceJobs {
        jobs: vec![NewJob {
            app: "web".into(),
            release: release.into(),
            proc_type: "web".into(),
            host: 1,
            oneoff: false,
            args: vec![],
            stdin: false,
            build: None,
            tty: None,
            env: Default::default(),
        }],
        now_ms: 2,
    });
    Vec::<Job>::try_from(r).unwrap().remove(0)
}

fn running_job(job: Job) -> RunningJob {
    RunningJob {
        timeline: None,
        job,
        pid: Default::default(),
        stop: tokio::sync::Notify::new(),
        stopping: Default::default(),
        io: None,
        stdin: std::sync::Mutex::new(None),
        procs: Default::default(),
    }
}

#[test]
fn t01_config_checks_ports_sizes_and_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = JobsArgs {
        no_jobs: false,
        log_dir: dir.path().join("log"),
        log_max_size: "100M".into(),
        job_ports: "49152-59999".into(),
        job_network: "auto".into(),
        job_memory: "2G".into(),
        job_cpu: "1500m".into(),
    };
    let cfg = args.validate(dir.path()).unwrap().unwrap();
    assert_eq!(cfg.ports, 49152..=59999);
    assert_eq!(cfg.memory, 2 << 30);
    assert_eq!(cfg.cpu_millis, 1500);
    let auto = JobsArgs {
        job_cpu: "auto".into(),
        ..args.clone()
    };
    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    assert_eq!(
        auto.validate(dir.path()).unwrap().unwrap().cpu_millis,
        cores * 1000
    );
    assert_eq!(cfg.log_max_bytes, 100 << 20);
    for (field, bad, says) in [
        ("ports", "60000-50000", "FIRST-LAST"),
        ("ports", "0-10", "FIRST-LAST"),
        ("size", "10", "at least 1K"),
        ("memory", "lots", "--job-memory"),
        ("cpu", "0", "--job-cpu"),
        ("cpu", "many", "--job-cpu"),
    ] {
        let mut a = args.clone();
        match field {
            "ports" => a.job_ports = bad.into(),
            "size" => a.log_max_size = bad.into(),
            "cpu" => a.job_cpu = bad.into(),
            _ => a.job_memory = bad.into(),
        }
        let err = a.validate(dir.path()).unwrap_err().to_string();
        assert!(err.contains(says), "{field}={bad}: {err}");
    }
    args.no_jobs = true;
    assert!(args.validate(dir.path()).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn t02_reports_land_through_a_leader_change_and_stop_at_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let r = runner(dir.path());
    let fake = FakeState::booted();
    let rel = release(&fake, vec![]);
    let job = place(&fake, &rel);
    let state: State = fake.clone();
    // Two proposals fail as if no leader were there; the report lands on the third.
    fake.unavailable
        .store(2, std::sync::atomic::Ordering::SeqCst);
    r.report(
        &state,
        &job.id,
        JobState::Starting,
        None,
        None,
        None,
        flynn_state::jobs::JobFault::App,
    )
    .await;
    assert_eq!(
        state.read(|s| s.jobs.jobs[&job.id].state),
        JobState::Starting
    );
    assert_eq!(fake.proposed.lock().unwrap().len(), 3);
    // A report the state machine refuses (no such job) is not retried.
    runner::propose_retrying(
        &state,
        JobsCommand::UpdateJob {
            id: "no-such-job".into(),
            state: JobState::Running,
            addr: None,
            exit_status: None,
            error: None,
            now_ms: 3,
            fault: Default::default(),
        }
        .into(),
    )
    .await;
    assert_eq!(fake.proposed.lock().unwrap().len(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn t03_prepare_says_why_a_job_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let r = runner(dir.path());
    let fake = FakeState::booted();
    let state: State = fake.clone();
    let rel = release(&fake, vec![]);
    let mut job = place(&fake, &rel);
    // Its release gone: named.
    job.release = "web-v99".into();
    let err = r
        .prepare(&state, &running_job(job.clone()))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, JobError::ReleaseGone(_)));
    assert_eq!(err.to_string(), "release web-v99 no longer exists");
    // Its layers: this host keeps none, and has no blobstore to fetch them from.
    let r2 = {
        let fake2 = FakeState::booted();
        let rel2 = release(&fake2, vec![]);
        let mut j = place(&fake2, &rel2);
        // An image with one layer this host has not unpacked.
        fake2.apply(JobsCommand::CreateRelease {
            app: "web".into(),
            release: NewRelease {
                image: image(vec![layer("ab")]),
                processes: None,
            },
            now_ms: 5,
        });
        j.release = "web-v2".into();
        let s2: State = fake2;
        r.prepare(&s2, &running_job(j)).await.err().unwrap()
    };
    assert!(matches!(r2, JobError::NoBlobstore(_)), "{r2}");
    assert!(
        r2.to_string()
            .contains("no blobstore to fetch image layers from"),
        "{r2}"
    );
}

#[test]
fn t04_an_end_is_classified_as_its_record_says() {
    let ended = |code, stop_requested, oom, init_error: Option<&str>, up| {
        Outcome::of(&Ended {
            code,
            stop_requested,
            oom,
            init_error: init_error.map(String::from),
            up,
            registers: true,
        })
    };
    let cases = [
        (ended(143, true, false, None, true), JobState::Done, None),
        (
            ended(137, false, true, None, true),
            JobState::Crashed,
            Some("out of memory"),
        ),
        (
            ended(
                flynn_job::init::EXIT_NOT_FOUND,
                false,
                false,
                Some("no such file: /bin/x"),
                false,
            ),
            JobState::Failed,
            Some("no such file: /bin/x"),
        ),
        (
            ended(0, false, false, None, false),
            JobState::Crashed,
            Some("exited before its port answered"),
        ),
        (ended(0, false, false, None, true), JobState::Done, None),
        (
            ended(137, false, false, None, true),
            JobState::Crashed,
            Some("killed by signal 9"),
        ),
        (
            ended(3, false, false, None, true),
            JobState::Crashed,
            Some("exited with status 3"),
        ),
    ];
    for (i, (o, state, error)) in cases.into_iter().enumerate() {
        assert_eq!((o.state, o.error.as_deref()), (state, error), "case {i}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t05_up_means_its_port_answers_and_its_health_path_too() {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for (i, c) in l.incoming().enumerate() {
            let Ok(mut c) = c else { continue };
            let mut req = [0u8; 256];
            let _ = c.read(&mut req);
            // The first two health checks fail, then it is healthy.
            let status = if i < 2 { "503 Busy" } else { "200 OK" };
            let _ = write!(c, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
        }
    });
    assert!(wait_listening(addr, None, Duration::from_secs(5)).await);
    assert!(wait_listening(addr, Some("/health"), Duration::from_secs(5)).await);
    // Nothing listening: false once the time is up.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = closed.local_addr().unwrap();
    drop(closed);
    let t = std::time::Instant::now();
    assert!(!wait_listening(gone, None, Duration::from_millis(300)).await);
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread")]
async fn t06_data_volumes_are_made_recorded_and_dropped_with_their_job() {
    let dir = tempfile::tempdir().unwrap();
    let r = runner(dir.path());
    let fake = FakeState::booted();
    let state: State = fake.clone();
    let rel = release(
        &fake,
        vec![
            VolumeReq {
                path: "/data".into(),
                delete_on_stop: false,
            },
            VolumeReq {
                path: "/scratch".into(),
                delete_on_stop: true,
            },
        ],
    );
    let job = place(&fake, &rel);
    let proc = state.read(|s| s.jobs.releases[&rel].processes["web"].clone());
    let mounts = r.data_volumes(&state, &job, &proc).await.unwrap();
    assert_eq!(
        mounts.iter().map(|m| m.path.as_str()).collect::<Vec<_>>(),
        ["/data", "/scratch"]
    );
    for m in &mounts {
        assert!(m.host.is_dir(), "{}", m.host.display());
    }
    let recorded = state.read(|s| s.volumes.volumes.len());
    assert_eq!(recorded, 2, "both recorded with their job as owner");
    // The job goes: the scratch volume with it, the data volume stays, recorded.
    r.drop_volumes(&state, &job).await;
    assert!(mounts[0].host.is_dir() && !mounts[1].host.exists());
    let left: Vec<String> =
        state.read(|s| s.volumes.volumes.values().map(|v| v.id.clone()).collect());
    assert_eq!(left, [JobRunner::volume_id(&job.id, 0)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn t07_a_placed_job_that_cannot_start_is_reported_failed_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let r = runner(dir.path());
    let fake = FakeState::booted();
    let state: State = fake.clone();
    fake.apply(AppsCommand::CreateApp { name: "web".into() });
    fake.apply(JobsCommand::CreateRelease {
        app: "web".into(),
        release: NewRelease {
            image: image(vec![layer("cd")]),
            processes: None,
        },
        now_ms: 1,
    });
    let job = place(&fake, "web-v1");
    // Reconcile: placement to runner to prepare (no blobstore here) to the report.
    r.reconcile(&state);
    let mut seen = None;
    for _ in 0..200 {
        let (st, why) = state.read(|s| {
            let j = &s.jobs.jobs[&job.id];
            (j.state, j.error.clone())
        });
        if st == JobState::Failed {
            seen = why;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let why = seen.expect("the job reported failed");
    assert!(
        why.contains("no blobstore to fetch image layers from"),
        "{why}"
    );
    // The runner reports the end before it lets the job go (so a reconcile in between
    // never takes it for one lost with a restart): its table empties just after.
    let mut let_go = false;
    for _ in 0..200 {
        if r.local_jobs().is_empty() {
            let_go = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(let_go, "the runner let it go");
}

/// Writes an executable script, and waits until it can run: a process another test thread
/// forks meanwhile holds the file open for writing until its own exec ("Text file busy").
fn script(path: &std::path::Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    for _ in 0..200 {
        match std::process::Command::new(path).output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            _ => return,
        }
    }
}

#[test]
fn t20_flynn_init_is_used_only_when_it_is_this_build() {
    let dir = tempfile::tempdir().unwrap();
    let candidate = dir.path().join("flynn-init");
    assert_eq!(super::supervise::separate_init(&candidate), None, "missing");
    // Another build (or not flynn-init at all) is not used.
    script(&candidate, "#!/bin/sh\necho 0.0.0-other\n");
    assert_eq!(
        super::supervise::separate_init(&candidate),
        None,
        "another build"
    );
    // The same build is.
    script(
        &candidate,
        &format!("#!/bin/sh\necho {}\n", flynn_job::init::BUILD),
    );
    assert_eq!(
        super::supervise::separate_init(&candidate),
        Some(candidate.clone())
    );
}
