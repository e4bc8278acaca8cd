# Shared helpers for the project's scripts. Sourced, not run.

# Installs the Debian packages named, when any is missing (one `apt-get update` first).
need_debs() {
    local missing=()
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "==> installing ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# What building the workspace needs: RocksDB from Debian (linked, not compiled: see
# ARCHITECTURE.md), libclang for its bindings, iproute2 for the multi-host tests.
setup_build_deps() {
    need_debs build-essential pkg-config librocksdb-dev libclang-dev iproute2 curl
    if ! command -v cargo >/dev/null; then
        echo "cargo is missing: install Rust (https://rustup.rs) first" >&2
        exit 1
    fi
}

# ZFS for the volume tests. On a host with kernel ZFS `zpool` already answers; here (no ZFS
# module in this kernel) Debian's zfs-fuse is the real ZFS, a daemon in user space.
# zpool aborts (SIGABRT) while zfs-fuse's socket is half gone; the shell's report of that
# goes to the group's stderr too.
zfs_answers() { { zpool list; } >/dev/null 2>&1; }

start_zfs() {
    zfs_answers && return 0
    need_debs zfs-fuse
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    # A zfs-fuse that does not answer may be on its way out: let it finish first.
    for _ in $(seq 100); do
        pgrep -x zfs-fuse >/dev/null || break
        zfs_answers && return 0
        sleep 0.1
    done
    if pgrep -x zfs-fuse >/dev/null; then
        echo "zfs-fuse is running but does not answer; stop it (pkill zfs-fuse) and retry" >&2
        exit 1
    fi
    echo "==> starting zfs-fuse (log: /var/log/zfs-fuse.log)"
    # In the foreground of its own session: daemon mode refuses to start after an unclean
    # stop (a stale pid file), and this needs no pid file at all.
    $sudo setsid nohup zfs-fuse --no-daemon >>/var/log/zfs-fuse.log 2>&1 </dev/null &
    for _ in $(seq 200); do
        zfs_answers && return 0
        sleep 0.1
    done
    echo "zfs-fuse started but zpool does not answer (see /var/log/zfs-fuse.log)" >&2
    exit 1
}
