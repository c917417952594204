# shellcheck shell=bash
# Shared pieces of the benchmark scripts (and tests/kernel/run.sh): source it, don't run it.
#   pids      the background processes to end on exit (append with pids+=("$!"))
#   kill_pids ends them (call from the script's own EXIT trap, beside its own cleanup)
#   wait_nbd URI [SECS]     waits until an NBD handshake answers (never sleep-and-hope), at
#                           most SECS (10) seconds: more for servers that pay a PBKDF first
#   to_bytes SIZE           512, 64K, 2M, 1G -> bytes
#   cryptvol_daemon BIN DIR LOG [EXTRA]
#       `BIN init` a state dir in DIR, write DIR/cryptvol.toml (control socket DIR/control.sock,
#       NBD socket DIR/nbd.sock, EXTRA appended: e.g. a [ceph] section), start `BIN serve`
#       with its output in LOG, wait until its control socket answers.

pids=()

kill_pids() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}

wait_nbd() {
    for _ in $(seq 1 $(( ${2:-10} * 20 ))); do
        nbdinfo --size "$1" >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "$(basename "$0"): no NBD server answers at $1" >&2
    return 1
}

to_bytes() {
    local s=${1^^} n
    case "$s" in
        *K) n=$(( ${s%K} << 10 )) ;;
        *M) n=$(( ${s%M} << 20 )) ;;
        *G) n=$(( ${s%G} << 30 )) ;;
        *) n=$(( s )) ;;
    esac
    echo "$n"
}

# The [ceph] section for a micro-ceph cluster in CDIR (tests/ceph/micro-ceph.sh) as CLIENT.
ceph_section() { # CDIR CLIENT
    printf '[ceph]\nconf = "%s"\nclient = "%s"\nkeyring = "%s"\npool = "rbd"\n' \
        "$1/ceph.conf" "$2" "$1/client.$2.keyring"
}

cryptvol_daemon() { # BIN DIR LOG [EXTRA]
    local bin=$1 st=$2 logf=$3 extra=${4:-}
    mkdir -p "$st"
    "$bin" init --state-dir "$st/state" >/dev/null
    cat > "$st/cryptvol.toml" <<TOML
state_dir = "$st/state"
[control]
socket = "$st/control.sock"
[nbd]
unix_socket = "$st/nbd.sock"
[kms]
root_key_file = "$st/state/root.key"
$extra
TOML
    "$bin" serve --config "$st/cryptvol.toml" >"$logf" 2>&1 &
    pids+=("$!")
    for _ in $(seq 1 200); do
        "$bin" --socket "$st/control.sock" volume list >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    echo "$(basename "$0"): cryptvol at $st did not answer (log: $logf)" >&2
    return 1
}
