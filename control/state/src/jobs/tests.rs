use crate::jobs::{JobsCommand, NewJob, HISTORY_PER_APP_HOST};
use crate::testing::*;

fn deployed(app: &str) -> (ClusterState, Release) {
    let mut s = booted();
    ok(&mut s, AppsCommand::CreateApp { name: app.into() });
    let (r, _) = ok(
        &mut s,
        JobsCommand::CreateRelease {
            app: app.into(),
            release: NewRelease {
                image: image(),
                processes: None,
            },
            now_ms: 1,
        },
    );
    (s, Release::try_from(r).unwrap())
}

fn place(s: &mut ClusterState, release: &str, host: u64) -> Job {
    let (r, _) = ok(
        s,
        JobsCommand::PlaceJobs {
            jobs: vec![NewJob {
                app: "web1".into(),
                release: release.into(),
                proc_type: "web".into(),
                host,
                oneoff: false,
                args: vec![],
                stdin: false,
                build: None,
                tty: None,
                env: Default::default(),
            }],
            now_ms: 1,
        },
    );
    Vec::<Job>::try_from(r).unwrap().remove(0)
}

fn report(s: &mut ClusterState, id: &str, state: JobState, now_ms: u64) -> ApplyResult {
    apply(
        s,
        JobsCommand::UpdateJob {
            id: id.into(),
            state,
            addr: Some("10.0.0.1:5000".into()),
            exit_status: None,
            error: None,
            now_ms,
            fault: Default::default(),
        },
    )
    .0
}

#[test]
fn t10_first_release_runs_web_and_env_changes_redeploy() {
    let (mut s, r1) = deployed("web1");
    assert_eq!(r1.id, "web1-v1");
    assert!(r1.processes["web"].ports);
    let f = &s.jobs.formations["web1"];
    assert_eq!((f.release.as_str(), f.processes["web"]), ("web1-v1", 1));

    ok(&mut s, env_set("web1", None, "GREETING", "hi"));
    let r2 = s.jobs.current_release("web1").unwrap().clone();
    assert_eq!(r2.id, "web1-v2");
    assert_eq!(r2.env["GREETING"], "hi");
    assert_eq!(r2.image, r1.image, "an env change keeps the image");
    assert_eq!(
        s.jobs.formations["web1"].processes["web"], 1,
        "and the scale"
    );
}

#[test]
fn t11_bad_scales_are_refused_and_change_nothing() {
    let (mut s, _) = deployed("web1");
    let before = s.clone();
    for (t, n) in [("worker", 1), ("web", -1), ("web", 1001)] {
        let (r, _) = apply(
            &mut s,
            JobsCommand::Scale {
                app: "web1".into(),
                processes: [(t.to_string(), n)].into(),
            },
        );
        assert!(matches!(r, Err(StateError::Invalid(_))), "{t}={n}: {r:?}");
        assert_eq!(s, before);
    }
    ok(
        &mut s,
        JobsCommand::Scale {
            app: "web1".into(),
            processes: [("web".to_string(), 3)].into(),
        },
    );
    assert_eq!(s.jobs.formations["web1"].processes["web"], 3);
    // A release without any command to run is refused.
    let mut img = image();
    img.config.cmd.clear();
    let (r, _) = apply(
        &mut s,
        JobsCommand::CreateRelease {
            app: "web1".into(),
            release: NewRelease {
                image: img,
                processes: None,
            },
            now_ms: 2,
        },
    );
    assert!(matches!(r, Err(StateError::Invalid(_))), "{r:?}");
}

#[test]
fn t12_crashes_count_for_backoff_and_history_stays_bounded() {
    let (mut s, r1) = deployed("web1");
    for i in 0..40u64 {
        let job = place(&mut s, &r1.id, 7);
        report(&mut s, &job.id, JobState::Running, 1000 * i).unwrap();
        report(&mut s, &job.id, JobState::Crashed, 1000 * i + 10).unwrap();
    }
    let b = s.jobs.backoff["web1/web"];
    assert_eq!(b.crashes, 40);
    assert!(b.delay_ms() > 0);
    let kept = s.jobs.app_jobs("web1").filter(|j| j.host == 7).count();
    assert_eq!(kept, HISTORY_PER_APP_HOST);
    // A job that ran a while before crashing resets the count.
    let job = place(&mut s, &r1.id, 7);
    report(&mut s, &job.id, JobState::Running, 100_000).unwrap();
    report(&mut s, &job.id, JobState::Crashed, 200_000).unwrap();
    assert_eq!(s.jobs.backoff["web1/web"].crashes, 1);
    // An ended job cannot be revived by a late report.
    let r = report(&mut s, &job.id, JobState::Running, 200_001);
    assert!(matches!(r, Err(StateError::Conflict(_))), "{r:?}");
}

#[test]
fn t13_stop_sticks_and_host_down_fails_jobs_and_leaves_discovery() {
    let (mut s, r1) = deployed("web1");
    let a = place(&mut s, &r1.id, 2);
    let b = place(&mut s, &r1.id, 3);
    for j in [&a, &b] {
        report(&mut s, &j.id, JobState::Running, 5).unwrap();
        ok(
            &mut s,
            DiscoveryCommand::RegisterInstance {
                service: "web1-web".into(),
                id: j.id.clone(),
                addr: "10.0.0.1:5000".into(),
                meta: Default::default(),
                ttl_ms: 10_000,
                now_ms: 5,
            },
        );
    }
    ok(&mut s, JobsCommand::StopJob { id: a.id.clone() });
    // Out of discovery at once: routers stop sending before its host signals it.
    assert!(!s.discovery.services["web1-web"]
        .instances
        .contains_key(&a.id));
    report(&mut s, &a.id, JobState::Running, 6).unwrap();
    assert_eq!(s.jobs.jobs[&a.id].state, JobState::Stopping);

    let (_, events) = ok(&mut s, JobsCommand::HostDown { host: 3, now_ms: 7 });
    let gone = &s.jobs.jobs[&b.id];
    assert_eq!(gone.state, JobState::Failed);
    assert!(gone.error.as_deref().unwrap().contains("stopped answering"));
    assert!(
        !s.discovery.services.contains_key("web1-web"),
        "no instance left"
    );
    assert!(events
        .iter()
        .any(|e| matches!(&e.kind, EventKind::InstanceDown { id, .. } if *id == b.id)));
    // A host going down is not the app crashing.
    assert!(!s.jobs.backoff.contains_key("web1/web"));
}

#[test]
fn t14_a_build_job_needs_its_app_not_a_release_and_is_a_one_off() {
    let mut s = booted();
    ok(&mut s, AppsCommand::CreateApp { name: "src".into() });
    let build = |app: &str, oneoff: bool, source: &str| NewJob {
        app: app.into(),
        release: String::new(),
        proc_type: "build".into(),
        host: 2,
        oneoff,
        args: vec!["/app/bin/compile".into()],
        stdin: false,
        build: Some(Build {
            image: image(),
            source: Layer {
                sha512: source.into(),
                size: 1,
                compression: LayerCompression::Gzip,
            },
        }),
        tty: None,
        env: Default::default(),
    };
    let place = |s: &mut ClusterState, j: NewJob| {
        apply(
            s,
            JobsCommand::PlaceJobs {
                jobs: vec![j],
                now_ms: 1,
            },
        )
        .0
    };
    // Before the app's first release: the build carries its own image.
    let placed = place(&mut s, build("src", true, &"cd".repeat(64))).unwrap();
    let job = Vec::<Job>::try_from(placed).unwrap().remove(0);
    assert!(job.oneoff && job.build.is_some(), "{job:?}");
    assert_eq!(s.jobs.jobs[&job.id].build, job.build);
    for (bad, why) in [
        (build("nope", true, &"cd".repeat(64)), "nope"),
        (build("src", false, &"cd".repeat(64)), "one-off"),
        (build("src", true, "not-a-digest"), "SHA-512"),
    ] {
        let before = s.jobs.jobs.len();
        let e = place(&mut s, bad).unwrap_err().to_string();
        assert!(e.contains(why), "{e}");
        assert_eq!(s.jobs.jobs.len(), before);
    }
}

#[test]
fn t15_only_a_one_off_job_runs_on_a_terminal() {
    let (mut s, r1) = deployed("web1");
    let job = |oneoff: bool| NewJob {
        app: "web1".into(),
        release: r1.id.clone(),
        proc_type: if oneoff { "run" } else { "web" }.into(),
        host: 2,
        oneoff,
        args: vec!["sh".into()],
        stdin: true,
        build: None,
        tty: Some(TtySize { cols: 80, rows: 24 }),
        env: Default::default(),
    };
    let e = apply(
        &mut s,
        JobsCommand::PlaceJobs {
            jobs: vec![job(false)],
            now_ms: 1,
        },
    )
    .0
    .unwrap_err();
    assert!(e.to_string().contains("terminal"), "{e}");
    let (r, _) = ok(
        &mut s,
        JobsCommand::PlaceJobs {
            jobs: vec![job(true)],
            now_ms: 1,
        },
    );
    let placed = Vec::<Job>::try_from(r).unwrap().remove(0);
    assert_eq!(placed.tty, Some(TtySize { cols: 80, rows: 24 }));
}

#[test]
fn t16_build_memory_is_gitreceive_s_setting_or_1_gib() {
    use crate::jobs::{build_memory, BUILD_MEMORY_DEFAULT};
    assert_eq!(build_memory(None).unwrap(), BUILD_MEMORY_DEFAULT);
    assert_eq!(build_memory(Some(" ")).unwrap(), BUILD_MEMORY_DEFAULT);
    assert_eq!(build_memory(Some("2GB")).unwrap(), 2 << 30);
    for bad in ["lots", "1MB", "63M"] {
        assert!(build_memory(Some(bad)).is_err(), "{bad}");
    }
}

#[test]
fn t17_the_deploy_verdict_follows_the_release_s_jobs() {
    use crate::jobs::{deploy_status, DeployStatus};
    let (mut s, r1) = deployed("web1");
    // One web wanted: none running yet.
    assert_eq!(deploy_status(&s, &r1), DeployStatus::Deploying);
    let j = place(&mut s, &r1.id, 1);
    assert_eq!(deploy_status(&s, &r1), DeployStatus::Deploying);
    let web = |s: &crate::ClusterState| crate::jobs::rollout(s, &r1).processes["web"];
    assert_eq!((web(&s).running, web(&s).want), (0, 1));
    report(&mut s, &j.id, JobState::Running, 2).unwrap();
    assert_eq!(deploy_status(&s, &r1), DeployStatus::Done);
    let shown = crate::jobs::rollout(&s, &r1);
    assert_eq!(shown.state, crate::RolloutState::Done);
    assert_eq!((web(&s).running, web(&s).want), (1, 1));
    // A newer release supersedes it: done as far as the older one's deploy goes.
    ok(&mut s, env_set("web1", None, "GREETING", "hi"));
    assert_eq!(deploy_status(&s, &r1), DeployStatus::Done);
    // The newer one's job crashing fails its deploy, naming the job and why.
    let r2 = s.jobs.current_release("web1").unwrap().clone();
    let j2 = place(&mut s, &r2.id, 1);
    apply(
        &mut s,
        JobsCommand::UpdateJob {
            id: j2.id.clone(),
            state: JobState::Crashed,
            addr: None,
            exit_status: Some(3),
            error: Some("exited with status 3".into()),
            now_ms: 3,
            fault: Default::default(),
        },
    )
    .0
    .unwrap();
    match deploy_status(&s, &r2) {
        DeployStatus::Failed(why) => {
            assert!(why.contains(&j2.id) && why.contains("crashed"), "{why}");
            assert!(why.contains("exited with status 3"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    let shown = crate::jobs::rollout(&s, &r2);
    assert_eq!(shown.state, crate::RolloutState::Failed);
    assert!(shown.error.is_some_and(|e| e.contains(&j2.id)));
}

fn subnets(r: Response) -> Vec<u32> {
    match r {
        Response::Subnets { indexes } => indexes,
        Response::Subnet { index } => vec![index],
        other => panic!("{other:?}"),
    }
}

#[test]
fn t40_a_filling_host_claims_extra_subnets_and_gives_them_back() {
    use crate::jobs::MAX_SUBNETS_PER_HOST;
    let mut s = booted();
    let claim = |s: &mut ClusterState, host| subnets(ok(s, JobsCommand::ClaimSubnet { host }).0);
    let extra = |host, have| JobsCommand::ClaimExtraSubnet { host, have };
    // An extra subnet comes only after the first.
    assert!(apply(&mut s, extra(1, 1)).0.is_err());
    assert_eq!(claim(&mut s, 1), [1]);
    assert_eq!(claim(&mut s, 2), [2]);
    assert_eq!(claim(&mut s, 1), [1], "a host keeps its first subnet");
    assert_eq!(subnets(ok(&mut s, extra(1, 1)).0), [1, 3]);
    // A retried claim gets what the first got, and no more.
    assert_eq!(subnets(ok(&mut s, extra(1, 1)).0), [1, 3]);
    assert_eq!(s.jobs.host_subnets(1), [1, 3]);
    // Taken subnets are never handed out twice, first or extra.
    assert_eq!(claim(&mut s, 3), [4]);
    assert_eq!(subnets(ok(&mut s, extra(1, 2)).0), [1, 3, 5]);
    assert_eq!(subnets(ok(&mut s, extra(1, 3)).0), [1, 3, 5, 6]);
    // A restarted daemon's claim of its first subnet hears of its extra ones too.
    assert_eq!(claim(&mut s, 1), [1, 3, 5, 6]);
    let before = s.clone();
    let (r, _) = apply(&mut s, extra(1, MAX_SUBNETS_PER_HOST as u32));
    assert!(
        matches!(r, Err(StateError::Conflict(ref m)) if m.contains("at most")),
        "{r:?}"
    );
    assert_eq!(s, before);
    // Records round-trip with the extras.
    let mut loaded = ClusterState::default();
    for (k, v) in s.records() {
        loaded.load_record(&k, &v).unwrap();
    }
    s.take_dirty();
    assert_eq!(loaded, s);
    // Given back: the index is free for the next claim; the first subnet is kept.
    let release = |host, index| JobsCommand::ReleaseExtraSubnet { host, index };
    assert_eq!(subnets(ok(&mut s, release(1, 3)).0), [1, 5, 6]);
    assert_eq!(
        subnets(ok(&mut s, release(1, 3)).0),
        [1, 5, 6],
        "idempotent"
    );
    assert!(apply(&mut s, release(1, 1)).0.is_err());
    assert_eq!(subnets(ok(&mut s, extra(2, 1)).0), [2, 3]);
    ok(&mut s, release(1, 5));
    ok(&mut s, release(1, 6));
    assert_eq!(s.jobs.host_subnets(1), [1]);
    assert!(!s.jobs.extra_subnets.contains_key("1"));
    // Every index taken: a clear refusal.
    for host in 10..=260 {
        let _ = apply(&mut s, JobsCommand::ClaimSubnet { host });
    }
    let (r, _) = apply(&mut s, extra(1, 1));
    assert!(
        matches!(r, Err(StateError::Conflict(ref m)) if m.contains("254")),
        "{r:?}"
    );
}

fn host_failed(s: &mut ClusterState, id: &str, now_ms: u64) {
    apply(
        s,
        JobsCommand::UpdateJob {
            id: id.into(),
            state: JobState::Failed,
            addr: None,
            exit_status: None,
            error: Some("no free job address on this host".into()),
            now_ms,
            fault: crate::jobs::JobFault::Host,
        },
    )
    .0
    .unwrap();
}

#[test]
fn t41_a_host_that_cannot_start_jobs_is_paused_and_the_app_is_not_backed_off() {
    let (mut s, r1) = deployed("web1");
    // A burst of jobs the host had no address for: the app keeps no crash record.
    for i in 0..10u64 {
        let job = place(&mut s, &r1.id, 7);
        host_failed(&mut s, &job.id, 1_000 + i);
    }
    assert!(
        !s.jobs.backoff.contains_key("web1/web"),
        "the host's trouble backed the app off: {:?}",
        s.jobs.backoff
    );
    let f = s.jobs.host_faults["7"];
    assert_eq!((f.crashes, f.last_crash_ms), (10, 1_009));
    assert!(f.host_paused(1_009 + 29_999), "paused after ten in a row");
    assert!(!f.host_paused(1_009 + 30_000), "never longer than 30 s");
    // One failure pauses a host briefly; each more one doubles it.
    let one = crate::jobs::Backoff {
        crashes: 1,
        last_crash_ms: 0,
    };
    assert_eq!(one.host_delay_ms(), 500);
    assert_eq!(
        crate::jobs::Backoff { crashes: 2, ..one }.host_delay_ms(),
        1_000
    );
    // Another host, and the app's own crashes, are their own records.
    let other = place(&mut s, &r1.id, 8);
    report(&mut s, &other.id, JobState::Running, 2_000).unwrap();
    report(&mut s, &other.id, JobState::Crashed, 2_001).unwrap();
    assert_eq!(s.jobs.backoff["web1/web"].crashes, 1);
    assert!(!s.jobs.host_faults.contains_key("8"));
    // A job that comes up on the host clears its record.
    let job = place(&mut s, &r1.id, 7);
    report(&mut s, &job.id, JobState::Running, 3_000).unwrap();
    assert!(!s.jobs.host_faults.contains_key("7"));
    // The record is kept with the rest of the state.
    let job = place(&mut s, &r1.id, 7);
    host_failed(&mut s, &job.id, 4_000);
    let mut loaded = ClusterState::default();
    for (k, v) in s.records() {
        loaded.load_record(&k, &v).unwrap();
    }
    assert_eq!(loaded.jobs.host_faults, s.jobs.host_faults);
    assert_eq!(loaded.jobs.host_faults["7"].crashes, 1);
    // A failure a minute after the last starts the count again.
    let job = place(&mut s, &r1.id, 7);
    host_failed(&mut s, &job.id, 4_500);
    assert_eq!(s.jobs.host_faults["7"].crashes, 2);
    let job = place(&mut s, &r1.id, 7);
    host_failed(&mut s, &job.id, 4_500 + crate::jobs::HOST_FAULT_FORGET_MS);
    assert_eq!(s.jobs.host_faults["7"].crashes, 1);
    // A lost job counts against no one.
    let job = place(&mut s, &r1.id, 9);
    let lost = JobsCommand::UpdateJob {
        id: job.id.clone(),
        state: JobState::Failed,
        addr: None,
        exit_status: None,
        error: Some("its host restarted while it ran".into()),
        now_ms: 5_000,
        fault: crate::jobs::JobFault::Neither,
    };
    ok(&mut s, lost);
    assert!(!s.jobs.host_faults.contains_key("9"));
    assert_eq!(s.jobs.backoff["web1/web"].crashes, 1, "unchanged");
}

#[test]
fn t42_a_report_without_a_fault_reads_as_before() {
    // Entries logged before `fault` existed decode as the app's fault, and an app's
    // report is written exactly as before (older hosts read it the same).
    let old = r#"{"op":"update_job","id":"j1","state":"failed","now_ms":5}"#;
    match serde_json::from_str::<JobsCommand>(old).unwrap() {
        JobsCommand::UpdateJob { fault, .. } => assert_eq!(fault, crate::jobs::JobFault::App),
        other => panic!("{other:?}"),
    }
    let failed = |fault| JobsCommand::UpdateJob {
        id: "j1".into(),
        state: JobState::Failed,
        addr: None,
        exit_status: None,
        error: None,
        now_ms: 5,
        fault,
    };
    let text = serde_json::to_string(&failed(crate::jobs::JobFault::App)).unwrap();
    assert!(!text.contains("fault"), "{text}");
    // A host's fault goes through the log (a `Command`) and back as it was.
    let host = Command::from(failed(crate::jobs::JobFault::Host));
    let text = serde_json::to_string(&host).unwrap();
    assert!(text.contains(r#""fault":"host""#), "{text}");
    assert_eq!(serde_json::from_str::<Command>(&text).unwrap(), host);
}

#[test]
fn t43_limits_the_kernel_would_refuse_are_refused_up_front() {
    let (mut s, _) = deployed("web1");
    let set = |limits: Limits| JobsCommand::SetLimits {
        app: "web1".into(),
        proc_type: "web".into(),
        limits,
        now_ms: 2,
    };
    let before = s.clone();
    for (limits, why) in [
        (
            Limits {
                max_procs: Some(crate::jobs::MAX_PROCS_LIMIT + 1),
                ..Limits::default()
            },
            "the kernel's most",
        ),
        (
            Limits {
                max_procs: Some(0),
                ..Limits::default()
            },
            "positive",
        ),
        (
            Limits {
                memory: Some(1 << 20),
                ..Limits::default()
            },
            "under 4MB",
        ),
    ] {
        let (r, _) = apply(&mut s, set(limits));
        assert!(
            matches!(&r, Err(StateError::Invalid(m)) if m.contains(why)),
            "{r:?}"
        );
        assert_eq!(s, before, "a refused limit changes nothing");
    }
    // A release made with its process types is held to the same.
    let image = s.jobs.current_release("web1").unwrap().image.clone();
    let web = ProcessType {
        limits: Limits {
            max_procs: Some(crate::jobs::MAX_PROCS_LIMIT + 1),
            ..Limits::default()
        },
        ..ProcessType::default()
    };
    let (r, _) = apply(
        &mut s,
        JobsCommand::CreateRelease {
            app: "web1".into(),
            release: NewRelease {
                image,
                processes: Some([("web".to_string(), web)].into()),
            },
            now_ms: 2,
        },
    );
    assert!(
        matches!(&r, Err(StateError::Invalid(m)) if m.contains("the kernel's most")),
        "{r:?}"
    );
    let most = Limits {
        max_procs: Some(crate::jobs::MAX_PROCS_LIMIT),
        ..Limits::default()
    };
    ok(&mut s, set(most));
    let web = &s.jobs.current_release("web1").unwrap().processes["web"];
    assert_eq!(web.limits.max_procs, Some(crate::jobs::MAX_PROCS_LIMIT));
}
