#!/usr/bin/env bash
# Sector-cipher speed beside `openssl speed -evp aes-256-xts` in one run, as ratios
# (single core, one data unit per call on both sides). Targets: aws-lc >= 1.6x, rust >= 0.9x.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-2}
cargo build --release --example xtsspeed -q
ours=$(target/release/examples/xtsspeed "$secs")
declare -A ssl
for b in 512 4096; do
    # openssl prints "... in 2.00s" lines and a final table; take the k-bytes/s column.
    kbs=$(openssl speed -evp aes-256-xts -bytes "$b" -seconds "$secs" 2>/dev/null | awk '/^AES-256-XTS|^aes-256-xts/ {v=$NF} END {sub("k","",v); print v}')
    ssl[$b]=$(awk -v k="$kbs" 'BEGIN {printf "%.3f", k * 1000 / 1e9}')
done
printf "%-8s %6s %10s %12s %8s\n" backend unit "GB/s" "openssl GB/s" ratio
while read -r name unit gbs; do
    printf "%-8s %6s %10s %12s %7.2fx\n" "$name" "$unit" "$gbs" "${ssl[$unit]}" "$(awk -v a="$gbs" -v b="${ssl[$unit]}" 'BEGIN {print a / b}')"
done <<< "$ours"
