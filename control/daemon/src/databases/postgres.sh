#!/bin/sh
# A server of the postgres app: PostgreSQL 15 from the database image, its data on the
# job's volume at /data. Written into the image by flynn-host (databases/mod.rs); runs as
# the image's postgres user. The superuser's password is the app's PGPASSWORD.
#
# Its role comes from the keeper on its host (databases/keeper.rs), which follows the
# cluster's shape record: the file /data/flynn-role.$FLYNN_JOB_ID says `primary`, or
# `standby IP PORT` (the primary to follow). A primary makes its cluster if the volume has
# none; a standby copies the primary's (pg_basebackup), or, if it has data of its own (a
# deposed primary, a standby that fell behind), first rewinds it onto the primary's
# timeline (pg_rewind), copying it whole only when that fails.
set -eu
bin=/usr/lib/postgresql/15/bin
data=/data/pgdata
me="h${FLYNN_HOST_ID:-0}"
umask 077
role_file=/data/flynn-role.$FLYNN_JOB_ID
n=0
while [ ! -s "$role_file" ]; do
    n=$((n + 1))
    if [ "$n" -gt 500 ]; then
        echo "flynn-postgres: no role from the keeper after 50 s" >&2
        exit 1
    fi
    sleep 0.1
done
# Older roles of earlier jobs on this volume go.
find /data -maxdepth 1 -name 'flynn-role.*' ! -name "flynn-role.$FLYNN_JOB_ID" -delete
set -- $(cat "$role_file")
role=$1
# A copy of the primary replaces the data only once it is whole: a primary that cannot be
# reached leaves this server's data as it was.
copy_primary() {
    rm -rf "$data.copy"
    "$bin/pg_basebackup" --host="$1" --port="$2" --username=postgres --pgdata="$data.copy" \
        --wal-method=stream --checkpoint=fast >&2
    rm -rf "$data"
    mv "$data.copy" "$data"
}
case "$role" in
primary)
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
    rm -f "$data/standby.signal"
    ;;
standby)
    host=$2 port=$3
    if [ ! -s "$data/PG_VERSION" ]; then
        copy_primary "$host" "$port"
    else
        # Crash recovery first (pg_rewind needs a cleanly stopped cluster), then onto the
        # primary's timeline; a copy of the primary when the rewind cannot be done.
        rm -f "$data/standby.signal" "$data/postmaster.pid"
        "$bin/postgres" --single -D "$data" postgres </dev/null >/dev/null 2>&1 || true
        # pg_rewind reads the primary's timeline from its control file, which a freshly
        # promoted primary updates only at its first checkpoint after promotion (begun at
        # promotion, spread over minutes). Until then pg_rewind finds "no rewind required",
        # and this server, its WAL past the fork, cannot follow the new timeline. So the
        # primary must be out of recovery (the role may name it a moment before its keeper
        # promotes it), then checkpoint. Each step is bounded: a primary that stalls holds
        # this start up for a few minutes at most, then it fails and is tried again.
        src="host=$host port=$port user=postgres dbname=postgres connect_timeout=10"
        give_up=$(($(date +%s) + 60))
        until [ "$(timeout 15 "$bin/psql" -XqAt "$src" -c 'SELECT pg_is_in_recovery()' 2>/dev/null)" = f ]; do
            if [ "$(date +%s)" -gt "$give_up" ]; then
                echo "flynn-postgres: the primary at $host:$port is not serving as a primary after 60 s" >&2
                exit 1
            fi
            sleep 1
        done
        timeout 120 "$bin/psql" -XqAt "$src" -c CHECKPOINT >&2 ||
            echo "flynn-postgres: the primary did not checkpoint" >&2
        if ! "$bin/pg_rewind" --target-pgdata="$data" \
            --source-server="host=$host port=$port user=postgres dbname=postgres" >&2; then
            echo "flynn-postgres: pg_rewind failed; copying the primary instead" >&2
            copy_primary "$host" "$port"
        fi
    fi
    touch "$data/standby.signal"
    sed -i '/^primary_conninfo/d' "$data/postgresql.auto.conf"
    echo "primary_conninfo = 'host=$host port=$port user=postgres password=$PGPASSWORD application_name=$me'" \
        >>"$data/postgresql.auto.conf"
    ;;
*)
    echo "flynn-postgres: unknown role $role" >&2
    exit 1
    ;;
esac
# Every server archives the WAL it has (the primary what it writes, a standby what it
# receives) into wal-archive/ on its volume; the keeper ships it to the blobstore
# (databases/archive.rs). A segment is closed at least once a minute.
mkdir -p /data/wal-archive
# Settings are the cluster's, rewritten on every start; postgresql.conf only includes them.
cat >"$data/flynn.conf" <<CONF
listen_addresses = '*'
port = ${PORT:-5432}
unix_socket_directories = '/tmp'
password_encryption = scram-sha-256
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = 512MB
hot_standby = on
hot_standby_feedback = on
synchronous_commit = on
fsync = on
full_page_writes = on
wal_log_hints = on
recovery_target_timeline = 'latest'
archive_mode = always
archive_command = 'cp %p /data/wal-archive/%f.part && mv -f /data/wal-archive/%f.part /data/wal-archive/%f'
archive_timeout = 60
cluster_name = '$me'
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
