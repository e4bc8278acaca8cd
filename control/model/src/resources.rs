//! Databases provisioned for apps (`flynn resource`): the record and its stable address.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// One provisioned database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// 1 to 64 lowercase letters, digits and `-`, chosen by the provisioning host.
    pub id: String,
    pub provider: String,
    /// The app whose env reaches it.
    pub app: String,
    /// What it put in the app's env.
    pub env: BTreeMap<String, String>,
    /// The provider's own name for it: the database and user (Postgres, MariaDB), or the
    /// instance's app (Redis).
    pub name: String,
    /// A server of its own (Redis): its discovery service and stable address
    /// (`100.100.0.N:PORT`), given by the provisioning host and unique in the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServiceAddr>,
    #[serde(default)]
    pub created_ms: u64,
}

/// A stable address in `100.100.0.0/24` that every host forwards to the leader of a
/// discovery service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAddr {
    pub service: String,
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// A replicated database's shape (the postgres app's servers): which server is the
/// primary, which is its synchronous standby, and which stream asynchronously. The failover
/// authority: it changes only by compare-and-set on `generation`, and every host points the
/// database's service address at the primary it names. Servers are named by their hosts
/// (one per host; a restarted job on the same host and volume is the same server).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbShape {
    /// The server app (`postgres`).
    pub app: String,
    /// Bumped by every change of roles.
    pub generation: u64,
    /// Raft node id of the primary's host (0: none yet).
    #[serde(default)]
    pub primary: u64,
    /// The synchronous standby's host (0: none; a single server commits alone).
    #[serde(default)]
    pub sync: u64,
    #[serde(default)]
    pub asyncs: Vec<u64>,
    /// The sync has flushed everything the primary wrote before it began waiting for it:
    /// only then may it be promoted (it then holds every acknowledged commit).
    #[serde(default)]
    pub sync_ready: bool,
    /// The last WAL position the sync confirmed flushed, as the primary reported it; a
    /// promotion needs the sync to have reached it.
    #[serde(default)]
    pub confirmed_lsn: u64,
    /// Renewals of the primary's lease so far. The primary renews about every second and
    /// stops taking writes when it cannot; the leader counts a lease as lapsed when it has
    /// seen no renewal for the lease's time on its own clock.
    #[serde(default)]
    pub lease_renewals: u64,
    /// Each server's last report, by host. On the wire a list of `[host, report]` pairs:
    /// a map with number keys would not read back inside a tagged enum (a command's
    /// result forwarded from the leader), where serde cannot turn `"123"` into 123.
    #[serde(default, with = "members_as_pairs")]
    pub members: BTreeMap<u64, DbMember>,
}

mod members_as_pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::DbMember;

    pub fn serialize<S: Serializer>(
        members: &BTreeMap<u64, DbMember>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let pairs: Vec<(&u64, &DbMember)> = members.iter().collect();
        pairs.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<u64, DbMember>, D::Error> {
        let pairs: Vec<(u64, DbMember)> = Vec::deserialize(d)?;
        Ok(pairs.into_iter().collect())
    }
}

/// One server's last report (from the keeper on its host).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbMember {
    /// Its current job and address.
    pub job: String,
    pub addr: String,
    /// Flushed WAL position (a standby: received and flushed; the primary: written).
    pub lsn: u64,
    /// It answers queries, as a standby (in recovery) or not.
    pub in_recovery: bool,
    pub reported_ms: u64,
}

impl DbShape {
    /// Every server named in a role, primary first.
    pub fn servers(&self) -> Vec<u64> {
        let mut v = Vec::new();
        for h in [self.primary, self.sync]
            .into_iter()
            .chain(self.asyncs.iter().copied())
        {
            if h != 0 && !v.contains(&h) {
                v.push(h);
            }
        }
        v
    }
}

/// The client commands that dump and restore a resource's data, run as one-off jobs on the
/// provider's server image with the resource's env (`flynn pg dump`, `flynn export`,
/// `flynn cluster backup`). One definition, so a dump made by one restores through any.
pub mod db_clients {
    fn shell(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    /// Splits `REDIS_URL` (`redis://:PASSWORD@HOST:PORT`) into `$host`, `$port` and
    /// `REDISCLI_AUTH`, so the password never appears in a process's arguments.
    const REDIS_CONNECT: &str = concat!(
        "rest=${REDIS_URL#redis://:}; addr=${rest##*@}; export REDISCLI_AUTH=${rest%@*}; ",
        "host=${addr%:*}; port=${addr##*:}; "
    );

    const MYSQL_CONNECT: &str = "-h \"$MYSQL_HOST\" -P \"$MYSQL_PORT\" -u \"$MYSQL_USER\"";

    /// Writes the resource's dump to stdout: pg_dump's custom format (no owners or
    /// privileges, so it restores into any database), mariadb-dump's SQL, or Redis's RDB.
    pub fn dump(provider: &str) -> Option<Vec<String>> {
        Some(match provider {
            "postgres" => ["pg_dump", "--format=custom", "--no-owner", "--no-acl"]
                .map(String::from)
                .to_vec(),
            "mysql" => shell(&format!(
                "exec mariadb-dump {MYSQL_CONNECT} --single-transaction --routines --triggers \"$MYSQL_DATABASE\""
            )),
            "redis" => shell(&format!(
                "{REDIS_CONNECT}exec redis-cli --no-auth-warning -h \"$host\" -p \"$port\" --rdb -"
            )),
            _ => return None,
        })
    }

    /// Restores a dump from [`dump`] (on stdin) into the resource. Postgres restores in one
    /// transaction, so a dump that fails changes nothing; Redis checks the RDB whole before
    /// the server takes it.
    pub fn restore(provider: &str) -> Option<Vec<String>> {
        Some(match provider {
            "postgres" => shell(
                "exec pg_restore --clean --if-exists --no-owner --no-acl --single-transaction --exit-on-error --dbname=\"$PGDATABASE\"",
            ),
            "mysql" => shell(&format!(
                "exec mariadb {MYSQL_CONNECT} \"$MYSQL_DATABASE\""
            )),
            "redis" => shell(&format!("{REDIS_CONNECT}{REDIS_RESTORE}")),
            _ => return None,
        })
    }

    /// Redis has no restore command: the job loads the dump into a throwaway server of its
    /// own, checks it whole, empties the resource's server and has the throwaway server
    /// `MIGRATE` every key to it (binary-safe, with its expiry), database by database.
    const REDIS_RESTORE: &str = r#"set -eu
target() { redis-cli --no-auth-warning -h "$host" -p "$port" "$@"; }
dumped() { env -u REDISCLI_AUTH redis-cli -h 127.0.0.1 -p 6390 "$@"; }
dir=$(mktemp -d)
cat >"$dir/dump.rdb"
if ! redis-check-rdb "$dir/dump.rdb" >"$dir/check" 2>&1; then
  echo "flynn: not a Redis dump (an RDB file, as flynn redis dump writes)" >&2; exit 1
fi
env -u REDISCLI_AUTH redis-server --port 6390 --bind 127.0.0.1 --dir "$dir" \
  --dbfilename dump.rdb --save '' --appendonly no --daemonize yes --logfile "$dir/log"
n=0
until dumped ping 2>/dev/null | grep -q PONG; do
  n=$((n+1))
  if [ $n -ge 600 ]; then echo "flynn: the dump did not load:" >&2; tail -n 5 "$dir/log" >&2; exit 1; fi
  sleep 0.1
done
if ! target ping 2>&1 | grep -q PONG; then
  echo "flynn: the Redis server does not answer: $(target ping 2>&1 | tail -n 1)" >&2; exit 1
fi
out=$(target flushall 2>&1)
[ "$out" = OK ] || { echo "flynn: the Redis server was not emptied: $out" >&2; exit 1; }
keys=$(printf %s "$REDISCLI_AUTH" | dumped -x eval '
local n = 0
for db = 0, 15 do
  redis.call("SELECT", db)
  local cur = "0"
  repeat
    local r = redis.call("SCAN", cur, "COUNT", 500)
    cur = r[1]
    if #r[2] > 0 then
      redis.call("MIGRATE", ARGV[1], ARGV[2], "", db, 60000, "COPY", "REPLACE",
        "AUTH", ARGV[3], "KEYS", unpack(r[2]))
      n = n + #r[2]
    end
  until cur == "0"
end
return n' 0 "$host" "$port")
case $keys in *[!0-9]*|"") echo "flynn: the keys were not all restored: $keys" >&2; exit 1;; esac
dumped shutdown nosave >/dev/null 2>&1 || true
echo "Restored $keys keys." >&2
"#;
}
