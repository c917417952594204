#!/usr/bin/env bash
# Sector-cipher speed beside `openssl speed -evp aes-256-xts` in one run, as ratios (single
# core, CPU time on both sides like openssl). "512" = one 512-byte unit per call on both sides;
# "512x8" = a run of 8 units per call on our side (a 4 KiB request on a 512-byte-sector volume),
# against openssl's one-unit figure (openssl speed has no multi-unit mode).
# Targets: aws-lc >= 1.5x at 512 B (runs), rust >= 0.9x at 4 KiB.
# `benches/cipher-vs-openssl.sh [SECONDS] [ROUNDS]`: ROUNDS interleaved rounds (ours, then
# openssl), one table per round. With BASE=<an xtsspeed binary of another commit> each round
# runs that one too (rows named base-...), for A/B in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-2}
rounds=${2:-1}
cargo build --release --example xtsspeed -q
for ((r = 1; r <= rounds; r++)); do
    ours=""
    if [[ -n "${BASE:-}" ]]; then
        ours=$("$BASE" "$secs" | sed 's/^/base-/')$'\n'
    fi
    ours+=$(target/release/examples/xtsspeed "$secs")
    declare -A ssl
    for b in 512 4096; do
        # openssl prints "... in 2.00s" lines and a final table; take the k-bytes/s column.
        kbs=$(openssl speed -evp aes-256-xts -bytes "$b" -seconds "$secs" 2>/dev/null | awk '/^AES-256-XTS|^aes-256-xts/ {v=$NF} END {sub("k","",v); print v}')
        ssl[$b]=$(awk -v k="$kbs" 'BEGIN {printf "%.3f", k * 1000 / 1e9}')
    done
    echo "# round $r, $(uptime | sed 's/.*load/load/')"
    printf "%-12s %8s %10s %12s %8s\n" backend unit "GB/s" "openssl GB/s" ratio
    while read -r name unit gbs; do
        base=${unit%%x*}
        printf "%-12s %8s %10s %12s %7.2fx\n" "$name" "$unit" "$gbs" "${ssl[$base]}" "$(awk -v a="$gbs" -v b="${ssl[$base]}" 'BEGIN {print a / b}')"
    done <<< "$ours"
done
