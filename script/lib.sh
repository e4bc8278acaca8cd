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

# Stops with one line naming the shortfall when DIR's filesystem has less than GIB GiB free.
need_free_gib() {
    local dir=$1 gib=$2 avail
    avail=$(df -Pk "$dir" | awk 'NR == 2 { print int($4 / 1048576) }')
    if [ "$avail" -lt "$gib" ]; then
        echo "$dir has ${avail} GiB free; the tests need ${gib} GiB: free some space first" >&2
        exit 1
    fi
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

# Writes ROOT (a root filesystem) as a one-layer `docker save` archive OUT (manifest.json,
# its config and the gzip layer as blobs named by their sha256), without a Docker engine.
#   save_image ROOT OUT TAG SHELL_COMMAND "K=V K=V" WORKDIR
save_image() {
    local root=$1 out=$2 tag=$3 cmd=$4 env=$5 workdir=$6
    local img
    img=$(mktemp -d)
    mkdir -p "$img/blobs/sha256"
    tar --numeric-owner --owner=0 --group=0 --mtime=@0 --sort=name -C "$root" -cf "$img/layer.tar" .
    local diff_id layer config
    diff_id=$(sha256sum "$img/layer.tar" | cut -d' ' -f1)
    gzip -n -c "$img/layer.tar" >"$img/layer.tar.gz"
    rm -f "$img/layer.tar"
    layer=$(sha256sum "$img/layer.tar.gz" | cut -d' ' -f1)
    mv "$img/layer.tar.gz" "$img/blobs/sha256/$layer"
    python3 - "$cmd" "$env" "$workdir" "$diff_id" >"$img/config.json" <<'PY'
import json, sys
cmd, env, workdir, diff_id = sys.argv[1:5]
print(json.dumps({"architecture": "amd64", "os": "linux",
    "config": {"Env": env.split(), "Cmd": ["/bin/sh", "-c", cmd] if cmd else None,
               "WorkingDir": workdir},
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff_id]}}))
PY
    config=$(sha256sum "$img/config.json" | cut -d' ' -f1)
    mv "$img/config.json" "$img/blobs/sha256/$config"
    printf '[{"Config":"blobs/sha256/%s","RepoTags":["%s"],"Layers":["blobs/sha256/%s"]}]\n' \
        "$config" "$tag" "$layer" >"$img/manifest.json"
    tar -C "$img" -cf "$out" manifest.json blobs
    rm -rf "$img"
}
