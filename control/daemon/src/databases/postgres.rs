//! Each Postgres resource's own database and user, made and dropped on the server as its
//! superuser.

use std::net::SocketAddr;
use std::time::Duration;

use crate::error::{ApiError, ApiResult};

/// How long a server that has just started may refuse connections.
const CONNECT_WITHIN: Duration = Duration::from_secs(60);

async fn connect(server: SocketAddr, su_password: &str) -> ApiResult<tokio_postgres::Client> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(server.ip().to_string())
        .port(server.port())
        .user("postgres")
        .password(su_password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(5));
    let client = super::retrying(CONNECT_WITHIN, || {
        let cfg = cfg.clone();
        async move {
            let (client, conn) = cfg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            // Answers only once the server accepts queries (not while it starts up), as the
            // primary (not a standby the shape has just made primary, before its promotion).
            let row = client
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map_err(|e| e.to_string())?;
            if row.get::<_, bool>(0) {
                return Err("the server is a standby".to_string());
            }
            Ok(client)
        }
    })
    .await
    .map_err(|e| ApiError::Unavailable(format!("the postgres server does not answer: {e}")))?;
    Ok(client)
}

/// A quoted identifier (names here are `flynn_` and hex, but quote anyway).
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Makes user `name` with `password` and database `name` owned by it, which no other
/// resource's user may connect to.
pub async fn create(
    server: SocketAddr,
    su_password: &str,
    name: &str,
    password: &str,
) -> ApiResult<()> {
    let client = connect(server, su_password).await?;
    let n = ident(name);
    let pw = password.replace('\'', "''");
    let steps = [
        format!("CREATE ROLE {n} LOGIN PASSWORD '{pw}'"),
        // Not in a transaction: CREATE DATABASE cannot be.
        format!("CREATE DATABASE {n} OWNER {n}"),
        format!("REVOKE ALL ON DATABASE {n} FROM PUBLIC"),
    ];
    for sql in &steps {
        if let Err(e) = client.simple_query(sql).await {
            let _ = drop_with(&client, name).await;
            return Err(ApiError::Unavailable(format!(
                "making the database: {}",
                db_error(&e)
            )));
        }
    }
    Ok(())
}

/// Drops database and user `name`, disconnecting its clients.
pub async fn drop(server: SocketAddr, su_password: &str, name: &str) -> ApiResult<()> {
    let client = connect(server, su_password).await?;
    drop_with(&client, name)
        .await
        .map_err(|e| ApiError::Unavailable(format!("dropping the database: {}", db_error(&e))))
}

async fn drop_with(
    client: &tokio_postgres::Client,
    name: &str,
) -> Result<(), tokio_postgres::Error> {
    let n = ident(name);
    client
        .simple_query(&format!("DROP DATABASE IF EXISTS {n} WITH (FORCE)"))
        .await?;
    client
        .simple_query(&format!("DROP ROLE IF EXISTS {n}"))
        .await?;
    Ok(())
}

/// The server's own message, not tokio-postgres's "db error".
fn db_error(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

/// Ends the primary's current WAL segment (`pg_switch_wal`), so the archive gets it;
/// answers the segment's name.
pub async fn switch_wal(server: SocketAddr, su_password: &str) -> ApiResult<String> {
    let client = connect(server, su_password).await?;
    let row = client
        .query_one("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .map_err(|e| {
            ApiError::Unavailable(format!("switching the WAL segment: {}", db_error(&e)))
        })?;
    Ok(row.get(0))
}
