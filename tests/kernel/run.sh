#!/usr/bin/env bash
# Kernel-client tier: the real Linux nbd.ko + nbd-client (in a throwaway QEMU VM, see
# ../shared/kernel-nbd/README.md) against cryptvol, then an independent check of what landed.
#
#   tests/kernel/run.sh [--server cryptvol|qemu-nbd] [--only CASE,CASE] [--cryptvol PATH]
#
# Cases (one VM run each, workload raw+fs; about 40 s each under TCG):
#   s512        512-byte-sector volume, nbd-client default block size (512)
#   s4096       4096-byte-sector volume, default block size: 512-aligned I/O, server-side RMW
#   s4096-b4k   4096-byte-sector volume, nbd-client -b 4096
#   s4096-mc2   4096-byte-sector volume, -C 2 (multi-conn; the kernel demands CAN_MULTI_CONN)
#   rbd-s4096   4096-byte-sector volume on Ceph RBD (a throwaway tests/ceph/micro-ceph.sh
#               cluster; 64 MiB image, smaller pattern and perf runs: memstore keeps data in
#               RAM). Only with the cryptvol server and ceph-mon/ceph-osd/rbd installed
#               (CRYPTVOL_REQUIRE_CEPH=1 makes their absence an error; CRYPTVOL_KERNEL_RBD=0 skips it).
# After each VM stops: detach and re-attach the volume (the DEK is unwrapped anew), copy the
# export out with another client (nbdcopy, libnbd) and check on the host what the guest
# reported: the random pattern's sha256, the unaligned marker, e2fsck -fn, and every file of
# the MANIFEST extracted with debugfs.
# `--server qemu-nbd` runs the same harness against qemu-nbd on a raw file (debugging the
# harness without cryptvol; "re-attach" = restart qemu-nbd).
# Exit: 0 all passed, 1 a check failed, 2 setup error, 77 skipped (no kernel script, no daemon).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
server=cryptvol
only=""
cryptvol_bin="${CRYPTVOL:-}"
while [ $# -gt 0 ]; do
    case "$1" in
        --server) server=$2; shift ;;
        --only) only=$2; shift ;;
        --cryptvol) cryptvol_bin=$2; shift ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "kernel/run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
say() { echo "[kernel $(date -u +%H:%M:%S)] $*" >&2; }
skip() { say "SKIPPED: $*"; exit 77; }

# The kernel script: shared dir next to the repo in CI, /work/shared on the dev machines.
knbd=""
for c in "${KNBD_SCRIPT:-}" "$repo/../shared/kernel-nbd/run-kernel-client.sh" \
         /work/shared/kernel-nbd/run-kernel-client.sh; do
    [ -n "$c" ] && [ -x "$c" ] && { knbd=$c; break; }
done
[ -n "$knbd" ] || skip "run-kernel-client.sh not found (../shared/kernel-nbd/ or \$KNBD_SCRIPT)"
[ "$(id -u)" = 0 ] || skip "the kernel client VM needs root"
for tool in nbdcopy nbdinfo e2fsck debugfs sha256sum; do
    command -v "$tool" >/dev/null || skip "$tool is not installed"
done

work=$(mktemp -d /tmp/cryptvol-kernel.XXXXXX)
size_mb=256
rbd_size_mb=64
# shellcheck source=../../benches/lib.sh
. "$repo/benches/lib.sh" # pids, kill_pids, wait_nbd, cryptvol_daemon, ceph_section
ceph_dir=""
cleanup() {
    [ -z "$ceph_dir" ] || bash "$repo/tests/ceph/micro-ceph.sh" stop "$ceph_dir" >/dev/null 2>&1 || true
    kill_pids
    rm -rf "$work"
}
trap cleanup EXIT

# The RBD case: a throwaway one-node cluster, when Ceph is installed.
use_rbd=0
if [ "$server" = cryptvol ] && [ "${CRYPTVOL_KERNEL_RBD:-1}" = 1 ]; then
    if command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null && command -v rbd >/dev/null; then
        use_rbd=1
    elif [ "${CRYPTVOL_REQUIRE_CEPH:-0}" = 1 ]; then
        say "CRYPTVOL_REQUIRE_CEPH=1 but ceph-mon/ceph-osd/rbd are not installed"; exit 2
    else
        say "rbd-s4096 skipped: ceph-mon/ceph-osd/rbd not installed"
    fi
fi

# --- server back ends: setup, create VOLUME SECTOR STORE, uri VOLUME, reattach VOLUME ---------
case $server in
cryptvol)
    bin=$cryptvol_bin
    [ -n "$bin" ] || for c in "$repo/target/release/cryptvol" "$repo/target/debug/cryptvol"; do
        [ -x "$c" ] && { bin=$c; break; }
    done
    [ -n "$bin" ] && "$bin" serve --help >/dev/null 2>&1 \
        || skip "no cryptvol binary with a working 'serve' (cargo build first)"
    st=$work/cryptvol ctl=$work/cryptvol/control.sock nbdsock=$work/cryptvol/nbd.sock
    cv() { "$bin" --socket "$ctl" "$@"; }
    srv_setup() {
        local extra=""
        if [ "$use_rbd" = 1 ]; then
            ceph_dir=$work/ceph
            bash "$repo/tests/ceph/micro-ceph.sh" start "$ceph_dir" > "$work/ceph.log" 2>&1 \
                || { say "micro-ceph start failed:"; cat "$work/ceph.log" >&2; exit 2; }
            extra="$(ceph_section "$ceph_dir" cryptvol-a)"$'\n'"op_timeout_secs = 30"
        fi
        cryptvol_daemon "$bin" "$st" "$work/cryptvol.log" "$extra" \
            || { cat "$work/cryptvol.log" >&2; exit 2; }
        cv key create --alias kernel-tests >/dev/null
    }
    srv_create() { # name sector [store]
        if [ "${3:-file}" = rbd ]; then
            cv volume create "$1" --size "${rbd_size_mb}M" --key kernel-tests --sector-size "$2" \
                --store rbd >/dev/null
        else
            cv volume create "$1" --size "${size_mb}M" --key kernel-tests --sector-size "$2" >/dev/null
        fi
        cv volume attach "$1" >/dev/null
    }
    srv_sock() { echo "$nbdsock"; }
    srv_reattach() { cv volume detach "$1" >/dev/null && cv volume attach "$1" >/dev/null; }
    ;;
qemu-nbd)
    command -v qemu-nbd >/dev/null || skip "qemu-nbd is not installed"
    declare -A qpid
    srv_setup() { :; }
    srv_start_q() {
        qemu-nbd -k "$work/$1.sock" -t -e 3 -f raw -x "$1" "$work/$1.raw" \
            > "$work/$1.qemu.log" 2>&1 &
        qpid[$1]=$!
        pids+=($!)
    }
    srv_create() { truncate -s "${size_mb}M" "$work/$1.raw"; srv_start_q "$1"; }
    srv_sock() { echo "$work/$1.sock"; }
    srv_reattach() {
        kill "${qpid[$1]}"; wait "${qpid[$1]}" 2>/dev/null || true
        srv_start_q "$1"
    }
    ;;
*) echo "kernel/run.sh: unknown --server $server" >&2; exit 2 ;;
esac

# --- host-side verification through another client -----------------------------------------
verify_copy() { # name console.log
    local name=$1 con=$2 img=$work/$name.copy.raw rc=0 off len sum text got
    local uri="nbd+unix:///$name?socket=$(srv_sock "$name")"
    wait_nbd "$uri"
    nbdcopy "$uri" "$img"
    while read -r _ off len sum; do
        off=${off#offset=} len=${len#length=} sum=${sum#sha256=}
        got=$(dd if="$img" iflag=skip_bytes,count_bytes skip="$off" count="$len" bs=1M 2>/dev/null | sha256sum | cut -d' ' -f1)
        if [ "$got" = "$sum" ]; then say "$name: pattern PASS ($len bytes @ $off)"
        else say "$name: pattern FAIL ($got != $sum)"; rc=1; fi
    done < <(tr -d '\r' < "$con" | grep '^KNBD-PATTERN ')
    while read -r _ off text; do
        off=${off#offset=} text=${text#text=}
        got=$(dd if="$img" iflag=skip_bytes,count_bytes skip="$off" count="${#text}" bs=4096 2>/dev/null)
        if [ "$got" = "$text" ]; then say "$name: marker PASS"
        else say "$name: marker FAIL (got '$got')"; rc=1; fi
    done < <(tr -d '\r' < "$con" | grep '^KNBD-MARKER ')
    if e2fsck -fn "$img" > "$work/$name.e2fsck.log" 2>&1; then say "$name: e2fsck -fn PASS"
    else say "$name: e2fsck -fn FAIL"; sed 's/^/    /' "$work/$name.e2fsck.log" >&2; rc=1; fi
    local d=$work/$name.files
    mkdir -p "$d"
    debugfs -R "dump /MANIFEST $d/MANIFEST" "$img" >/dev/null 2>&1 || true
    if [ -s "$d/MANIFEST" ]; then
        awk -v d="$d" '{print "dump /" $2 " " d "/" $2}' "$d/MANIFEST" > "$d/.cmds"
        awk -v d="$d" '{print d "/" $2}' "$d/MANIFEST" | xargs -n1 dirname | sort -u | xargs mkdir -p
        debugfs -f "$d/.cmds" "$img" >/dev/null 2>&1 || true
        if (cd "$d" && sha256sum -c --quiet MANIFEST) > "$work/$name.files.log" 2>&1; then
            say "$name: files PASS ($(wc -l < "$d/MANIFEST") files match the MANIFEST)"
        else say "$name: files FAIL"; sed 's/^/    /' "$work/$name.files.log" >&2; rc=1; fi
    else say "$name: files FAIL (no MANIFEST in the filesystem)"; rc=1; fi
    rm -f "$img"
    return $rc
}

# --- the cases -------------------------------------------------------------------------------
cases=("s512:512:" "s4096:4096:" "s4096-b4k:4096:--block-size 4096" "s4096-mc2:4096:--connections 2")
[ "$use_rbd" = 1 ] && cases+=("rbd-s4096:4096:--pattern-mb 8 --perf-mb 16:rbd")
srv_setup
results=()
overall=0
for c in "${cases[@]}"; do
    IFS=: read -r name sector extra store <<<"$c"
    if [ -n "$only" ] && [[ ",$only," != *",$name,"* ]]; then continue; fi
    srv_create "$name" "$sector" "${store:-file}"
    sock=$(srv_sock "$name")
    wait_nbd "nbd+unix:///$name?socket=$sock"
    out=$work/run-$name
    say "$name: kernel client ($extra) against $server, ${sector}-byte sectors, ${store:-file} store"
    t0=$(date +%s)
    # shellcheck disable=SC2086 # $extra is a list of options
    set +e
    "$knbd" --server "unix:$sock" --export "$name" $extra --out "$out" > "$work/$name.knbd.log" 2>&1
    vm_rc=$?
    set -e
    t1=$(date +%s)
    grep -E '^(guest|result|timing|client)' "$work/$name.knbd.log" | sed "s/^/    /" >&2 || true
    status=PASS
    if [ "$vm_rc" != 0 ]; then
        say "$name: kernel run failed (exit $vm_rc); log:"; tail -40 "$work/$name.knbd.log" >&2
        status=FAIL
    else
        srv_reattach "$name"
        verify_copy "$name" "$out/console.log" || status=FAIL
    fi
    [ "$status" = PASS ] || overall=1
    results+=("$name $status $((t1 - t0))s")
    # Keep the run directory for a failing case.
    if [ "$status" = FAIL ]; then
        keep=/tmp/cryptvol-kernel-failed-$name-$(date +%s)
        cp -r "$out" "$keep" 2>/dev/null && say "$name: run directory kept in $keep"
        [ "$server" = cryptvol ] && cp "$work/cryptvol.log" "$keep/" 2>/dev/null || true
    fi
done
echo "==== kernel tier against $server"
printf '  %s\n' "${results[@]}"
exit $overall
