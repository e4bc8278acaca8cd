#!/bin/sh
# The mariadb app's server: mariadbd from the database image, its data on the job's volume
# at /data. Written into the image by flynn-host (databases/mod.rs); runs as the image's
# mysql user. root's password is the app's MYSQL_PWD, set on every start.
set -eu
data=/data/mysql
umask 077
if [ ! -d "$data/mysql" ]; then
    rm -rf "$data"
    mariadb-install-db --datadir="$data" --auth-root-authentication-method=normal \
        --skip-test-db --skip-name-resolve >/dev/null
fi
init=/data/.init.sql
cat >"$init" <<SQL
CREATE USER IF NOT EXISTS 'root'@'%' IDENTIFIED BY '$MYSQL_PWD';
ALTER USER 'root'@'%' IDENTIFIED BY '$MYSQL_PWD';
GRANT ALL PRIVILEGES ON *.* TO 'root'@'%' WITH GRANT OPTION;
FLUSH PRIVILEGES;
SQL
# Durable commits (flushed at each), no files outside the volume and /tmp, and InnoDB's
# plain synchronous I/O (io_uring inside a job's limits is not what it is tested with).
exec mariadbd --datadir="$data" --port="${PORT:-3306}" --bind-address=0.0.0.0 \
    --socket=/tmp/mysqld.sock --pid-file=/tmp/mysqld.pid --skip-name-resolve \
    --init-file="$init" --innodb-flush-log-at-trx-commit=1 --innodb-use-native-aio=0
