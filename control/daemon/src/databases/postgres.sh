#!/bin/sh
# The postgres app's server: PostgreSQL 15 from the database image, its data on the job's
# volume at /data. Written into the image by flynn-host (databases/mod.rs); runs as the
# image's postgres user. The superuser's password is the app's PGPASSWORD.
set -eu
bin=/usr/lib/postgresql/15/bin
data=/data/pgdata
umask 077
if [ ! -s "$data/PG_VERSION" ]; then
    # A half-made cluster from an interrupted first start is made again.
    rm -rf "$data"
    pwfile=/data/.pwfile
    printf '%s\n' "$PGPASSWORD" >"$pwfile"
    "$bin/initdb" --pgdata="$data" --username=postgres --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --no-locale \
        --no-instructions >&2
    rm -f "$pwfile"
fi
# Settings are the cluster's, rewritten on every start; postgresql.conf only includes them.
cat >"$data/flynn.conf" <<CONF
listen_addresses = '*'
port = ${PORT:-5432}
unix_socket_directories = '/tmp'
password_encryption = scram-sha-256
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
hot_standby = on
synchronous_commit = on
fsync = on
full_page_writes = on
wal_log_hints = on
logging_collector = off
log_destination = 'stderr'
log_line_prefix = '%m [%p] %q%u@%d '
CONF
grep -q "^include_if_exists = 'flynn.conf'" "$data/postgresql.conf" ||
    echo "include_if_exists = 'flynn.conf'" >>"$data/postgresql.conf"
cat >"$data/pg_hba.conf" <<HBA
local all all trust
host all all 0.0.0.0/0 scram-sha-256
host replication all 0.0.0.0/0 scram-sha-256
HBA
# A stop (SIGTERM) is a fast shutdown: clients are disconnected, not waited for.
"$bin/postgres" -D "$data" &
pid=$!
trap 'kill -INT "$pid" 2>/dev/null' TERM INT
status=0
while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" || status=$?
done
exit "$status"
