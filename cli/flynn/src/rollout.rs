//! Deploy commands wait for their rollout: each type's jobs of the new release coming up is
//! printed as it happens (on stderr), and a rollout that fails is an error naming the job.

use std::time::{Duration, Instant};

use anyhow::bail;
use flynn_client::ControllerClient;
use flynn_model::{NewRelease, Release, Rollout, RolloutState};

/// Longest a command waits for a rollout (the server's own deploy wait is 120 s).
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(150);
/// How long "no live host has room" may last before the wait gives up: long enough for a
/// stopping job to free its reservation, or a host's heartbeat to say it has more.
const NO_ROOM_GRACE: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(250);

/// `web1-v3: web 1/2, worker 0/1`.
fn progress_line(r: &Rollout) -> String {
    let types: Vec<String> = r
        .processes
        .iter()
        .map(|(t, p)| {
            if p.omni {
                format!("{t} {} running (one per host)", p.running)
            } else {
                format!("{t} {}/{}", p.running, p.want)
            }
        })
        .collect();
    if types.is_empty() {
        format!("{}: nothing to run", r.release)
    } else {
        format!("{}: {}", r.release, types.join(", "))
    }
}

/// Waits until `release` of `app` runs every type's count. The jobs of the release before
/// keep serving while it rolls out, and after it fails (the scheduler retries it).
pub async fn follow(client: &ControllerClient, app: &str, release: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + ROLLOUT_TIMEOUT;
    let mut shown = String::new();
    let mut no_room_since: Option<Instant> = None;
    loop {
        let r = client.rollout(app, release).await?;
        let line = progress_line(&r);
        if line != shown {
            eprintln!("{line}");
            shown = line;
        }
        match r.state {
            RolloutState::Done => {
                eprintln!("{release} is running.");
                return Ok(());
            }
            RolloutState::Failed => bail!(
                "the rollout of {release} failed: {}; the release before keeps serving",
                r.error.as_deref().unwrap_or("no reason given")
            ),
            RolloutState::Deploying => {}
        }
        match &r.waiting {
            Some(why) => {
                if no_room_since.get_or_insert_with(Instant::now).elapsed() > NO_ROOM_GRACE {
                    bail!(
                        "the rollout of {release} cannot go on: {why}; the release before keeps serving"
                    );
                }
            }
            None => no_room_since = None,
        }
        if Instant::now() > deadline {
            bail!(
                "the rollout of {release} did not finish within {} s ({shown})",
                ROLLOUT_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// After a change that may deploy a new release (env set), follows that release's rollout
/// unless `detach`; `before` is the release that ran before the change.
pub async fn follow_change(
    client: &ControllerClient,
    app: &str,
    before: &str,
    detach: bool,
) -> anyhow::Result<()> {
    if before.is_empty() {
        // An app that runs no release (a system app's settings, one not deployed yet): the
        // change deploys nothing. Not asked either: the change may have just retired this
        // command's own key (the controller key's rotation).
        return Ok(());
    }
    let now = client.formation(app).await?.release;
    if now.is_empty() || now == before {
        return Ok(()); // nothing runs, or nothing changed
    }
    if detach {
        eprintln!("deploying {now} (not waiting)");
        return Ok(());
    }
    follow(client, app, &now).await
}

/// The release that runs before a change: empty for an app without one.
pub async fn current(client: &ControllerClient, app: &str) -> anyhow::Result<String> {
    Ok(client.formation(app).await?.release)
}

/// Makes a release and, unless `detach`, waits as the server does (rolling back when it
/// cannot run), printing its progress meanwhile.
pub async fn deploy(
    client: &ControllerClient,
    app: &str,
    req: &NewRelease,
    detach: bool,
) -> anyhow::Result<Release> {
    if detach {
        return Ok(client.create_release(app, req, false).await?);
    }
    let before = current(client, app).await.unwrap_or_default();
    eprintln!("deploying to {app}, waiting for its jobs to run...");
    let progress = async {
        let mut shown = String::new();
        loop {
            tokio::time::sleep(POLL).await;
            let Ok(f) = client.formation(app).await else {
                continue;
            };
            if f.release.is_empty() || f.release == before {
                continue;
            }
            if let Ok(r) = client.rollout(app, &f.release).await {
                let line = progress_line(&r);
                if line != shown && r.state == RolloutState::Deploying {
                    eprintln!("{line}");
                    shown = line;
                }
            }
        }
    };
    tokio::select! {
        r = client.create_release(app, req, true) => Ok(r?),
        () = progress => unreachable!("the progress loop never ends"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flynn_model::TypeRollout;

    #[test]
    fn t01_progress_names_each_type_and_its_count() {
        let mut r = Rollout {
            release: "web1-v3".into(),
            ..Rollout::default()
        };
        assert_eq!(progress_line(&r), "web1-v3: nothing to run");
        r.processes.insert(
            "web".into(),
            TypeRollout {
                running: 1,
                want: 2,
                omni: false,
            },
        );
        r.processes.insert(
            "agent".into(),
            TypeRollout {
                running: 3,
                want: 1,
                omni: true,
            },
        );
        assert_eq!(
            progress_line(&r),
            "web1-v3: agent 3 running (one per host), web 1/2"
        );
    }
}
