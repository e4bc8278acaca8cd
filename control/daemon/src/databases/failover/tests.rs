use flynn_state::jobs::{JobsCommand, NewJob};
use flynn_state::resources::{DbMember, ShapeCommand};
use flynn_state::{
    AppsCommand, ClusterCommand, ClusterState, Command, Image, ImageConfig, JobState, NewRelease,
    ResourcesCommand,
};

use super::{plan, APP, PROC_TYPE};

/// When the plans are made: every report in these tests is recent.
const NOW: u64 = 5_000;

fn apply(s: &mut ClusterState, c: impl Into<Command>) {
    s.apply(c.into()).0.unwrap();
}

/// A cluster whose postgres app runs one server job on each of `hosts`.
fn servers(hosts: &[u64]) -> ClusterState {
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
    if s.apps.get(APP).is_none() {
        apply(&mut s, AppsCommand::CreateApp { name: APP.into() });
    }
    let r = s
        .apply(
            JobsCommand::CreateRelease {
                app: APP.into(),
                release: NewRelease {
                    image: Image {
                        layers: vec![],
                        config: ImageConfig {
                            cmd: vec!["postgres".into()],
                            ..ImageConfig::default()
                        },
                    },
                    processes: Some(
                        [(PROC_TYPE.to_string(), flynn_state::ProcessType::default())].into(),
                    ),
                },
                now_ms: 0,
            }
            .into(),
        )
        .0
        .unwrap();
    let release = flynn_state::Release::try_from(r).unwrap().id;
    for (i, h) in hosts.iter().enumerate() {
        start(&mut s, &release, *h, i as u64 + 1);
    }
    s
}

fn start(s: &mut ClusterState, release: &str, host: u64, now: u64) {
    let placed = s
        .apply(
            JobsCommand::PlaceJobs {
                jobs: vec![NewJob {
                    app: APP.into(),
                    release: release.into(),
                    proc_type: PROC_TYPE.into(),
                    host,
                    oneoff: false,
                    args: vec![],
                    stdin: false,
                    build: None,
                    tty: None,
                    env: Default::default(),
                }],
                now_ms: now,
            }
            .into(),
        )
        .0
        .unwrap();
    let job = Vec::<flynn_state::Job>::try_from(placed).unwrap().remove(0);
    apply(
        s,
        JobsCommand::UpdateJob {
            id: job.id,
            state: JobState::Running,
            addr: Some(format!("100.100.{host}.2:8080")),
            exit_status: None,
            error: None,
            now_ms: now,
            fault: Default::default(),
        },
    );
    // Its keeper reports it.
    report(s, host, 0);
}

fn report(s: &mut ClusterState, host: u64, lsn: u64) {
    apply(
        s,
        ResourcesCommand::Shape(ShapeCommand::Report {
            app: APP.into(),
            host,
            member: DbMember {
                job: format!("j{host}"),
                addr: String::new(),
                lsn,
                in_recovery: true,
                reported_ms: NOW - 1,
            },
        }),
    );
}

fn renew(s: &mut ClusterState, lsn: u64, ready: bool) {
    let shape = &s.resources.shapes[APP];
    let cmd = ShapeCommand::Renew {
        app: APP.into(),
        generation: shape.generation,
        host: shape.primary,
        confirmed_lsn: lsn,
        sync_ready: ready,
    };
    apply(s, ResourcesCommand::Shape(cmd));
}

/// Applies the plan once; the roles after it.
fn step(s: &mut ClusterState, lapsed: bool) -> (u64, u64, Vec<u64>) {
    if let Some(cmd) = plan(s, lapsed, NOW) {
        apply(s, ResourcesCommand::Shape(cmd));
    }
    let shape = &s.resources.shapes[APP];
    (shape.primary, shape.sync, shape.asyncs.clone())
}

fn end_job_on(s: &mut ClusterState, host: u64) {
    let id = s.jobs.active_on(host).next().unwrap().id.clone();
    apply(
        s,
        JobsCommand::UpdateJob {
            id,
            state: JobState::Failed,
            addr: None,
            exit_status: None,
            error: Some("host down".into()),
            now_ms: 100,
            fault: Default::default(),
        },
    );
}

#[test]
fn t10_the_oldest_server_is_the_first_primary_the_next_its_sync() {
    let mut s = servers(&[7, 3, 5]);
    assert_eq!(step(&mut s, false), (7, 3, vec![5]));
    assert!(plan(&s, false, NOW).is_none(), "settled");
}

#[test]
fn t11_a_ready_sync_that_has_every_confirmed_commit_is_promoted() {
    let mut s = servers(&[1, 2, 3]);
    step(&mut s, false);
    report(&mut s, 2, 500);
    report(&mut s, 3, 450);
    renew(&mut s, 500, true);
    // The primary's lease lapses: the sync takes over, the async becomes the new sync.
    assert_eq!(step(&mut s, true), (2, 3, vec![]));
    let shape = &s.resources.shapes[APP];
    assert_eq!(shape.generation, 2);
    assert!(
        !shape.sync_ready,
        "the new sync must catch up before it may be promoted"
    );
    // The new sync cannot be promoted until its primary says it caught up.
    end_job_on(&mut s, 2);
    assert_eq!(
        step(&mut s, true),
        (2, 3, vec![]),
        "no promotion of a sync not ready"
    );
}

#[test]
fn t12_no_promotion_of_a_sync_that_may_miss_an_acknowledged_commit() {
    // Not caught up yet.
    let mut s = servers(&[1, 2, 3]);
    step(&mut s, false);
    report(&mut s, 2, 500);
    renew(&mut s, 500, false);
    assert_eq!(step(&mut s, true), (1, 2, vec![3]));
    // Ready, but its last report is behind what the primary said it confirmed.
    renew(&mut s, 900, true);
    assert_eq!(step(&mut s, true), (1, 2, vec![3]));
    report(&mut s, 2, 900);
    assert_eq!(step(&mut s, true), (2, 3, vec![]));
}

#[test]
fn t14_a_server_not_heard_from_lately_is_neither_made_sync_nor_promoted() {
    let mut s = servers(&[1, 2, 3]);
    step(&mut s, false);
    renew(&mut s, 10, true);
    report(&mut s, 2, 10);
    // Reports older than ten seconds: host 2 may be cut off, whatever its job record says.
    assert!(plan(&s, true, NOW + 20_000).is_none());
    // The sync's job is gone and host 3 is silent: it is not made the sync; the primary
    // goes on alone (as Patroni's synchronous mode does) rather than stop taking writes.
    end_job_on(&mut s, 2);
    let ShapeCommand::SetShape { sync, asyncs, .. } = plan(&s, false, NOW + 20_000).unwrap() else {
        panic!("a shape change")
    };
    assert_eq!((sync, asyncs), (0, vec![3]));
}

#[test]
fn t13_a_lost_sync_is_replaced_by_the_most_advanced_async_and_a_new_server_joins() {
    let mut s = servers(&[1, 2, 3]);
    step(&mut s, false);
    end_job_on(&mut s, 2);
    assert_eq!(step(&mut s, false), (1, 3, vec![]));
    // A server on a new host joins as an async.
    let release = s.jobs.current_release(APP).unwrap().id.clone();
    start(&mut s, &release, 4, 50);
    assert_eq!(step(&mut s, false), (1, 3, vec![4]));
    // The primary's job ended (crashed, or its host is gone) with the sync ready.
    renew(&mut s, 10, true);
    report(&mut s, 3, 10);
    end_job_on(&mut s, 1);
    assert_eq!(step(&mut s, false), (3, 4, vec![]));
}
