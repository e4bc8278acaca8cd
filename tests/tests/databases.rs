//! Databases provisioned for apps (`flynn resource add postgres|redis`), on the database
//! image made from Debian's packages (`script/base-image OUT --databases`, made by
//! `script/test` and named by `FLYNN_TEST_DATABASES`): real Postgres 15 and Redis servers
//! in jobs, reached by apps' jobs at their stable service addresses, and the commands that
//! use them (`flynn pg psql|dump|restore`, `flynn redis redis-cli`).
//! Needs root; run with `--test-threads=1` like the other cluster cases.

use std::time::Duration;

use flynn_tests::{eventually, failed, ok, Cluster};

/// A cluster of `n` ready for jobs, with the database image, and an app `name` running the
/// busybox web server for each name in `apps`.
async fn cluster(n: usize, apps: &[&str]) -> Cluster {
    let image = std::env::var("FLYNN_TEST_DATABASES").expect(
        "FLYNN_TEST_DATABASES names the database image (script/test makes it with script/base-image OUT --databases)",
    );
    let mut c = Cluster::start(n);
    c.bootstrap(n);
    c.wait_leader(0, None).await;
    c.wait_ready_for_jobs(n).await;
    ok(&c.flynn(0, &["base-image", "push", "--name", "databases", &image]));
    let web = c.busybox_image("web", None);
    for app in apps {
        ok(&c.flynn(0, &["create", app]));
        ok(&c.flynn(0, &["-a", app, "docker", "push", web.to_str().unwrap()]));
    }
    c
}

fn env_get(c: &Cluster, app: &str, key: &str) -> String {
    ok(&c.flynn(0, &["-a", app, "env", "get", key]))
        .trim()
        .to_string()
}

/// `psql -tA -c SQL` on the app's database (through its stable address, from a job).
fn psql(c: &Cluster, app: &str, sql: &str) -> String {
    ok(&c.flynn(
        0,
        &[
            "-a",
            app,
            "pg",
            "psql",
            "--",
            "-tA",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ],
    ))
    .trim()
    .to_string()
}

/// The resource id `flynn resource add` printed ("Created resource ID and release ...").
fn added_id(out: &str) -> String {
    out.split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no resource id in {out:?}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn t01_postgres_resources_are_provisioned_used_dumped_restored_and_removed() {
    let c = cluster(1, &["web", "other"]).await;

    // Before any: bad input is refused and changes nothing.
    let err = failed(&c.flynn(0, &["-a", "web", "resource", "add", "mongodb"]));
    assert!(err.contains("provider \"mongodb\""), "{err}");
    assert!(err.contains("postgres, mysql, redis"), "{err}");

    // The first resource starts the server; its env is deployed with it.
    let before = ok(&c.flynn(0, &["-a", "web", "release", "show", "--json"]));
    let out = ok(&c.flynn(0, &["-a", "web", "resource", "add", "postgres"]));
    assert!(
        out.contains("Created resource") && out.contains("and release"),
        "{out}"
    );
    let id = added_id(&out);
    let after = ok(&c.flynn(0, &["-a", "web", "release", "show", "--json"]));
    assert_ne!(before, after, "the env came with a new release");
    let url = env_get(&c, "web", "DATABASE_URL");
    let db = env_get(&c, "web", "PGDATABASE");
    assert!(
        url.starts_with("postgres://") && url.contains("@100.100.0.2:5432/"),
        "{url}"
    );
    for key in ["PGHOST", "PGPORT", "PGUSER", "PGPASSWORD"] {
        assert!(!env_get(&c, "web", key).is_empty(), "{key} is set");
    }
    // The app's own jobs get the env.
    let seen = ok(&c.flynn(0, &["-a", "web", "run", "sh", "-c", "echo $PGDATABASE"]));
    assert_eq!(seen.trim(), db);

    // psql through the stable address, as the resource's own user.
    psql(&c, "web", "CREATE TABLE t (n int PRIMARY KEY, s text)");
    psql(
        &c,
        "web",
        "INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 500) g",
    );
    assert_eq!(
        psql(&c, "web", "SELECT count(*), sum(n) FROM t"),
        "500|125250"
    );
    assert_eq!(psql(&c, "web", "SELECT current_user"), db);

    // `flynn resource` lists it, and says a one-host cluster has no standby.
    let list = ok(&c.flynn(0, &["-a", "web", "resource"]));
    assert!(list.contains(&id) && list.contains("postgres"), "{list}");
    assert!(list.contains("not highly available"), "{list}");

    // One per app: a second would overwrite the first's env.
    let err = failed(&c.flynn(0, &["-a", "web", "resource", "add", "postgres"]));
    assert!(err.contains("already has a postgres resource"), "{err}");

    // Dump, then restore into another app's resource; the rows compare equal.
    let dump = c.root_path().join("web.dump");
    ok(&c.flynn(
        0,
        &["-a", "web", "pg", "dump", "-f", dump.to_str().unwrap()],
    ));
    let bytes = std::fs::read(&dump).unwrap();
    assert!(bytes.starts_with(b"PGDMP"), "a custom-format dump");
    let other_out = ok(&c.flynn(0, &["-a", "other", "resource", "add", "postgres"]));
    let other_id = added_id(&other_out);
    let other_db = env_get(&c, "other", "PGDATABASE");
    assert_ne!(other_db, db, "each resource has its own database");
    ok(&c.flynn(
        0,
        &["-a", "other", "pg", "restore", "-f", dump.to_str().unwrap()],
    ));
    let rows = "SELECT string_agg(n || ':' || s, ',' ORDER BY n) FROM t";
    assert_eq!(psql(&c, "other", rows), psql(&c, "web", rows));

    // A garbage file is refused and changes nothing.
    let garbage = c.root_path().join("garbage.dump");
    std::fs::write(&garbage, b"this is not a dump\n".repeat(100)).unwrap();
    let err = failed(&c.flynn(
        0,
        &[
            "-a",
            "other",
            "pg",
            "restore",
            "-f",
            garbage.to_str().unwrap(),
        ],
    ));
    assert!(err.contains("pg_restore"), "{err}");
    assert_eq!(psql(&c, "other", "SELECT count(*) FROM t"), "500");

    // Each resource's user reaches only its own database.
    let err = failed(&c.flynn(
        0,
        &[
            "-a", "web", "pg", "psql", "--", "-d", &other_db, "-c", "SELECT 1",
        ],
    ));
    assert!(err.contains("permission denied"), "{err}");

    // The server's volume is not deleted without --force.
    let volumes = ok(&c.flynn_host(0, &["volume", "list"]));
    let vol = volumes
        .lines()
        .find(|l| l.contains("postgres"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no postgres volume in {volumes}"))
        .to_string();
    let err = failed(&c.flynn_host(0, &["volume", "delete", &vol]));
    assert!(err.contains("--force"), "{err}");
    // An app with a resource is not deleted either.
    let err = failed(&c.flynn(0, &["-a", "web", "delete", "-y"]));
    assert!(err.contains("has resources"), "{err}");

    // Removing unsets the env (a new release) and drops the database; twice is not found.
    let out = ok(&c.flynn(0, &["-a", "web", "resource", "remove", "postgres", &id]));
    assert!(out.contains(&id), "{out}");
    let err = failed(&c.flynn(0, &["-a", "web", "env", "get", "DATABASE_URL"]));
    assert!(!err.is_empty());
    let err = failed(&c.flynn(0, &["-a", "web", "resource", "remove", &id]));
    assert!(err.contains("not found"), "{err}");
    // As the server's superuser (the postgres app's own env): the database is gone, the
    // other one is not.
    let names = ok(&c.flynn(
        0,
        &[
            "-a",
            "postgres",
            "run",
            "psql",
            "-tA",
            "-c",
            "SELECT string_agg(datname, ',') FROM pg_database WHERE datname LIKE 'flynn_%'",
        ],
    ));
    assert_eq!(names.trim(), other_db);
    // `pg` on an app without a resource says what to do.
    let err = failed(&c.flynn(0, &["-a", "web", "pg", "psql", "--", "-c", "SELECT 1"]));
    assert!(err.contains("resource add postgres"), "{err}");
    ok(&c.flynn(0, &["-a", "other", "resource", "remove", &other_id]));
}

#[tokio::test(flavor = "multi_thread")]
async fn t02_a_redis_resource_is_an_instance_of_its_own_with_a_password() {
    let c = cluster(1, &["web", "other"]).await;
    let out = ok(&c.flynn(0, &["-a", "web", "resource", "add", "redis"]));
    let id = added_id(&out);
    let url = env_get(&c, "web", "REDIS_URL");
    assert!(
        url.starts_with("redis://:") && url.contains("@100.100.0."),
        "{url}"
    );
    let cli = |app: &str, args: &[&str]| {
        let mut full = vec!["-a", app, "redis", "redis-cli", "--"];
        full.extend_from_slice(args);
        ok(&c.flynn(0, &full)).trim().to_string()
    };
    assert_eq!(cli("web", &["SET", "greeting", "hello world"]), "OK");
    assert_eq!(cli("web", &["GET", "greeting"]), "hello world");

    // Another app's Redis is another server: it does not see web's key.
    ok(&c.flynn(0, &["-a", "other", "resource", "add", "redis"]));
    let other_url = env_get(&c, "other", "REDIS_URL");
    assert_ne!(other_url, url);
    assert_eq!(cli("other", &["EXISTS", "greeting"]), "0");

    // Without the password the server answers nothing but NOAUTH.
    let host_port = url.rsplit('@').next().unwrap().to_string();
    let (ip, port) = host_port.split_once(':').unwrap();
    let server_app = format!("redis-{id}");
    let denied = c.flynn(
        0,
        &[
            "-a",
            &server_app,
            "run",
            "redis-cli",
            "-h",
            ip,
            "-p",
            port,
            "GET",
            "greeting",
        ],
    );
    let text = String::from_utf8_lossy(&denied.stdout).to_string()
        + &String::from_utf8_lossy(&denied.stderr);
    assert!(text.contains("NOAUTH"), "{text}");

    // Its data outlives a restart of its server (append-only file on its volume).
    let jobs = ok(&c.flynn(0, &["-a", &server_app, "ps"]));
    let job = jobs
        .lines()
        .find(|l| l.contains("redis"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no redis job in {jobs}"))
        .to_string();
    ok(&c.flynn(0, &["-a", &server_app, "kill", &job]));
    eventually(
        Duration::from_secs(60),
        "web's key back after a restart",
        || async {
            let out = c.flynn(
                0,
                &["-a", "web", "redis", "redis-cli", "--", "GET", "greeting"],
            );
            (out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "hello world")
                .then_some(())
        },
    )
    .await;

    ok(&c.flynn(0, &["-a", "web", "resource", "remove", "redis", &id]));
    let err = failed(&c.flynn(0, &["-a", "web", "env", "get", "REDIS_URL"]));
    assert!(!err.is_empty());
}
