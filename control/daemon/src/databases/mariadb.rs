//! Each MariaDB resource's own database and user, made and dropped by the server's own
//! client in a one-off job of the mariadb app (as its root, whose password is the app's
//! `MYSQL_PWD`), reaching the server at its service address.

use std::time::{Duration, Instant};

use flynn_state::JobState;

use crate::error::{ApiError, ApiResult};
use crate::host::Host;

const APP: &str = "mariadb";
/// How long a server that has just started may refuse connections.
const WITHIN: Duration = Duration::from_secs(90);

pub async fn create(host: &Host, name: &str, password: &str) -> ApiResult<()> {
    run_sql(
        host,
        &format!(
            "CREATE DATABASE `{name}`; \
             CREATE USER '{name}'@'%' IDENTIFIED BY '{password}'; \
             GRANT ALL PRIVILEGES ON `{name}`.* TO '{name}'@'%';"
        ),
    )
    .await
}

pub async fn drop(host: &Host, name: &str) -> ApiResult<()> {
    run_sql(
        host,
        &format!("DROP DATABASE IF EXISTS `{name}`; DROP USER IF EXISTS '{name}'@'%';"),
    )
    .await
}

/// Runs `sql` with the mariadb client until it succeeds (the server may be starting) or
/// [`WITHIN`] passes.
async fn run_sql(host: &Host, sql: &str) -> ApiResult<()> {
    let node = host.node()?;
    let deadline = Instant::now() + WITHIN;
    loop {
        let release = node
            .state
            .read(|a| a.state.jobs.current_release(APP).map(|r| r.id.clone()))
            .ok_or_else(|| ApiError::Unavailable("the mariadb server has no release".into()))?;
        let job = crate::jobs::oneoff::place(
            node,
            host.jobs().is_some().then_some(host.id),
            flynn_state::jobs::NewJob::one_off(
                APP,
                release,
                vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "exec mariadb --connect-timeout=5 -u root -h \"$MYSQL_HOST\" -P \"$MYSQL_PORT\" -e \"$0\""
                        .into(),
                    sql.into(),
                ],
            ),
        )
        .await?;
        let status = ended(node, &job.id, deadline).await?;
        if status == Some(0) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ApiError::Unavailable(format!(
                "the mariadb server did not take the change (job {} ended with {status:?}; flynn -a mariadb log -j {})",
                job.id, job.id
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits for job `id` to end; its exit status (none: it could not start).
async fn ended(node: &crate::node::Node, id: &str, deadline: Instant) -> ApiResult<Option<i32>> {
    let mut changes = node.state.changes();
    loop {
        let state = node
            .state
            .read(|a| a.state.jobs.jobs.get(id).map(|j| (j.state, j.exit_status)));
        match state {
            Some((JobState::Done | JobState::Crashed | JobState::Failed, status)) => {
                return Ok(status)
            }
            None => return Ok(None),
            _ => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ApiError::Unavailable(format!(
                "the mariadb client job {id} did not end in time"
            )));
        }
        let _ = tokio::time::timeout(left.min(Duration::from_secs(1)), changes.changed()).await;
    }
}
