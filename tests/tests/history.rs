//! t90: a history checker. Concurrent clients write and read registers (env vars of one
//! app) through random hosts while hosts are SIGKILLed, SIGSTOPped and cut off. Every
//! operation is logged as ok / failed / unknown, then each register's history is checked for
//! linearizability; final reads after healing are part of the history, so an acknowledged
//! write that vanished fails the check.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flynn_client::{ClientError, ControllerClient, EnvUpdate};
use flynn_tests::linearizability::{check_history, Op, OpKind, Outcome};
use flynn_tests::Cluster;
use rand::Rng;

const KEYS: usize = 8;
const CLIENTS: usize = 4;
const RUN: Duration = Duration::from_secs(24);
const MAX_OPS_PER_CLIENT: usize = 120;

fn classify_write(r: &Result<flynn_model::App, ClientError>) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        // 503: no leader took it (nothing was appended); 4xx: refused outright.
        Err(ClientError::Api { status, .. }) if *status == 503 || (400..500).contains(status) => {
            Outcome::Failed
        }
        Err(_) => Outcome::Unknown,
    }
}

async fn client_loop(
    id: usize,
    urls: Vec<String>,
    key: String,
    start: Instant,
    history: Arc<Mutex<Vec<Op>>>,
) {
    let clients: Vec<ControllerClient> = urls
        .iter()
        .map(|u| ControllerClient::with_timeout(u, &key, Duration::from_secs(12)))
        .collect();
    let now = || start.elapsed().as_nanos() as u64;
    for seq in 0..MAX_OPS_PER_CLIENT {
        if start.elapsed() > RUN {
            break;
        }
        let (host, reg, write, pause) = {
            let mut rng = rand::thread_rng();
            (
                rng.gen_range(0..clients.len()),
                format!("R{}", rng.gen_range(0..KEYS)),
                rng.gen_bool(0.5),
                rng.gen_range(50..200),
            )
        };
        let invoke = now();
        let (kind, outcome) = if write {
            let value = format!("c{id}-{seq}");
            let update = EnvUpdate {
                proc_type: None,
                set: BTreeMap::from([(reg.clone(), value.clone())]),
                unset: vec![],
            };
            let r = clients[host].update_env("jepsen", &update).await;
            (OpKind::Write(value), classify_write(&r))
        } else {
            match clients[host].env("jepsen", None).await {
                Ok(env) => (OpKind::Read(env.get(&reg).cloned()), Outcome::Ok),
                Err(_) => (OpKind::Read(None), Outcome::Unknown),
            }
        };
        history.lock().unwrap().push(Op {
            client: id,
            key: reg,
            kind,
            invoke,
            complete: now(),
            outcome,
        });
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn t90_linearizable_under_kill_pause_and_partition() {
    let mut c = Cluster::start(3);
    c.bootstrap(3);
    c.wait_leader(0, None).await;
    c.client(0).create_app("jepsen").await.unwrap();

    let start = Instant::now();
    let history = Arc::new(Mutex::new(Vec::new()));
    let urls: Vec<String> = c.hosts.iter().map(|h| h.url()).collect();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|id| {
            tokio::spawn(client_loop(
                id,
                urls.clone(),
                c.key.clone(),
                start,
                history.clone(),
            ))
        })
        .collect();

    // One fault at a time, so a majority is usually up; each lasts about two seconds.
    let mut faults = Vec::new();
    while start.elapsed() + Duration::from_secs(4) < RUN {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let leader = c.wait_leader(0, None).await;
        let (target, kind) = {
            let mut rng = rand::thread_rng();
            let target = if rng.gen_bool(0.5) {
                leader
            } else {
                rng.gen_range(0..3)
            };
            (target, rng.gen_range(0..3))
        };
        match kind {
            0 => {
                c.kill(target);
                tokio::time::sleep(Duration::from_secs(2)).await;
                c.start_daemon(target);
                c.wait_up(target);
                faults.push(format!("kill {target}"));
            }
            1 => {
                c.pause(target);
                tokio::time::sleep(Duration::from_secs(2)).await;
                c.resume(target);
                faults.push(format!("pause {target}"));
            }
            _ => {
                c.cut(target);
                tokio::time::sleep(Duration::from_secs(2)).await;
                c.heal(target);
                faults.push(format!("cut {target}"));
            }
        }
    }
    for t in tasks {
        t.await.unwrap();
    }

    // Healed: a final linearizable read of every register joins the history.
    c.wait_leader(0, None).await;
    let final_start = start.elapsed().as_nanos() as u64;
    let env = c.client(1).env("jepsen", None).await.expect("final read");
    let final_end = start.elapsed().as_nanos() as u64;
    let mut ops = history.lock().unwrap().clone();
    for k in 0..KEYS {
        let reg = format!("R{k}");
        ops.push(Op {
            client: usize::MAX,
            key: reg.clone(),
            kind: OpKind::Read(env.get(&reg).cloned()),
            invoke: final_start,
            complete: final_end,
            outcome: Outcome::Ok,
        });
    }

    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("t90-history.jsonl");
    let lines: Vec<String> = ops
        .iter()
        .map(|o| serde_json::to_string(o).unwrap())
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    let count = |o: Outcome| ops.iter().filter(|op| op.outcome == o).count();
    let ok_writes = ops
        .iter()
        .filter(|o| o.outcome == Outcome::Ok && matches!(o.kind, OpKind::Write(_)))
        .count();
    eprintln!(
        "t90: {} ops ({} ok, {} failed, {} unknown; {ok_writes} acked writes), faults: {faults:?}; history in {}",
        ops.len(),
        count(Outcome::Ok),
        count(Outcome::Failed),
        count(Outcome::Unknown),
        path.display()
    );
    assert!(faults.len() >= 5, "too few faults injected: {faults:?}");
    assert!(
        ok_writes >= 40,
        "too few acknowledged writes to mean anything: {ok_writes}"
    );
    if let Err(e) = check_history(&ops) {
        panic!("{e}; history in {}", path.display());
    }
}
