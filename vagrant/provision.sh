#!/usr/bin/env bash
# Provisions a Vagrant host of the development cluster (see Vagrantfile):
#
#   provision.sh host IP                           install flynn-host and start its daemon
#   provision.sh bootstrap IP PEERS DOMAIN N       bootstrap the cluster, print the key
#
# Environment (defaults are the VM's; the test points them elsewhere):
#   FLYNN_FROM         built binaries to install           (/flynn/target/release)
#   FLYNN_PREFIX       install prefix                      (/usr/local)
#   FLYNN_DATA_DIR     the host's data dir                 (/var/lib/flynn)
#   FLYNN_SYSTEMD_DIR  where the unit goes                 (/etc/systemd/system)
#   FLYNN_LOG_FILE     the daemon's log file               (/var/log/flynn/flynn-host.log)
#   FLYNN_DAEMON_ARGS  extra daemon flags
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
from="${FLYNN_FROM:-/flynn/target/release}"
prefix="${FLYNN_PREFIX:-/usr/local}"
data_dir="${FLYNN_DATA_DIR:-/var/lib/flynn}"
systemd_dir="${FLYNN_SYSTEMD_DIR:-/etc/systemd/system}"
log_file="${FLYNN_LOG_FILE:-/var/log/flynn/flynn-host.log}"

fail() { echo "provision: $*" >&2; exit 1; }

case "${1:-}" in
host)
    ip="${2:?usage: provision.sh host IP}"
    if [ -d /run/systemd/system ] && command -v apt-get >/dev/null; then
        # What the daemon needs at run time on a fresh Debian VM.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq librocksdb7.8 zfs-fuse iproute2 curl python3 >/dev/null
    fi
    bash "$here/script/install-flynn" --from "$from" --prefix "$prefix" \
        --data-dir "$data_dir" --systemd-dir "$systemd_dir" --log-file "$log_file" \
        --daemon-args "--external-ip $ip ${FLYNN_DAEMON_ARGS:-}"
    if ! [ -d /run/systemd/system ] || [ "$systemd_dir" != /etc/systemd/system ]; then
        # No systemd to start it: run the unit's own command, detached.
        exec_start=$(sed -n 's/^ExecStart=//p' "$systemd_dir/flynn-host.service")
        mkdir -p "$(dirname "$log_file")"
        nohup $exec_start >/dev/null 2>&1 &
        echo "==> started the daemon (pid $!) without systemd"
    fi
    # Wait until it answers.
    for _ in $(seq 1 150); do
        curl -fsS "http://$ip:1113/host/info" >/dev/null 2>&1 && break
        sleep 0.2
    done
    curl -fsS "http://$ip:1113/host/info" >/dev/null || fail "the daemon on $ip does not answer"
    echo "==> flynn-host runs on $ip"
    ;;
bootstrap)
    ip="${2:?usage: provision.sh bootstrap IP PEERS DOMAIN N}"
    peers="${3:?peers}" domain="${4:?domain}" n="${5:?number of hosts}"
    out=$("$prefix/bin/flynn-host" bootstrap --json --timeout 300 --min-hosts "$n" \
        --peer-ips "$peers" --domain "$domain")
    key=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["controller_key"])')
    pin=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["controller_pin"])')
    echo "==> cluster bootstrapped; the controller key is $key"
    echo "    flynn cluster add -p $pin --ip $ip default $domain $key"
    ;;
*)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
