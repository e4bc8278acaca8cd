#!/bin/sh
# A Redis resource's own server: redis-server from the database image, its data (an
# append-only file and RDB snapshots) on the job's volume at /data, password-protected.
# Written into the image by flynn-host (databases/mod.rs); runs as the image's redis user.
set -eu
umask 077
conf=/data/redis.conf
cat >"$conf" <<CONF
port ${PORT:-6379}
bind 0.0.0.0
protected-mode no
dir /data
appendonly yes
appendfsync everysec
save 3600 1 300 100 60 10000
requirepass $REDIS_PASSWORD
CONF
exec redis-server "$conf"
