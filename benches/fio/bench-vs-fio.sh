#!/usr/bin/env bash
# `cryptvol bench` against fio on the same jobs and the same server, alternating runs so that
# machine noise hits both alike. Prints one line per run and the median of each tool per job.
#
#   benches/fio/bench-vs-fio.sh [--bench BIN] [--uri URI] [--time S] [--reps N]
# Default server: a fresh `nbdkit memory 1G` on a Unix socket (the protocol without storage).
# BIN: a `cryptvol` binary (its `bench` subcommand is used), or the `nbd_load` bench target
# (`cargo bench --bench nbd_load --no-run`), which takes the same arguments.
set -euo pipefail
PY=/usr/bin/python3
bin="" uri="" t=5 reps=2
while [ $# -gt 0 ]; do
    case "$1" in
        --bench) bin=$2; shift ;;
        --uri) uri=$2; shift ;;
        --time) t=$2; shift ;;
        --reps) reps=$2; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$bin" ] || { echo "--bench BIN is required" >&2; exit 2; }
sub=(); case $(basename "$bin") in cryptvol*) sub=(bench) ;; esac
work=$(mktemp -d)
trap 'kill $(cat "$work/pid" 2>/dev/null) 2>/dev/null || true; rm -rf "$work"' EXIT
if [ -z "$uri" ]; then
    nbdkit -U "$work/sock" -P "$work/pid" memory 1G
    uri="nbd+unix:///?socket=$work/sock"
    until nbdinfo --size "$uri" >/dev/null 2>&1; do sleep 0.05; done
    # Write the whole export once so reads are of real data.
    fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1M --iodepth=8 >/dev/null
fi
echo "job tool MiB/s IOPS p50_us p99_us p99.9_us"
for j in randread:4k:32 randwrite:4k:32 read:1M:8 write:1M:8 randread:4k:1; do
    IFS=: read -r rw bs qd <<<"$j"
    for r in $(seq 1 "$reps"); do
        fio --name=j --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" \
            --time_based --runtime="$t" --ramp_time=1 --norandommap --randrepeat=0 \
            --output-format=json --output="$work/fio.json" >/dev/null
        $PY - "$work/fio.json" "$rw/$bs/QD$qd" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))["jobs"][0]
x = d["read"] if d["read"]["io_bytes"] else d["write"]
p = x["clat_ns"]["percentile"]  # fio's clat: submit to completion, as cryptvol bench measures
print(sys.argv[2], "fio", f'{x["bw_bytes"]/1048576:.1f}', f'{x["iops"]:.0f}',
      f'{p["50.000000"]/1e3:.0f}', f'{p["99.000000"]/1e3:.0f}', f'{p["99.900000"]/1e3:.0f}')
PYEOF
        "$bin" "${sub[@]}" "$uri" --json --rw "$rw" --bs "$bs" --iodepth "$qd" --time "$t" --ramp 1 \
            > "$work/bench.json"
        $PY - "$work/bench.json" "$rw/$bs/QD$qd" <<'PYEOF'
import json, sys
d = json.load(open(sys.argv[1]))
x = d["total"]; l = x["lat_us"]
print(sys.argv[2], "bench", f'{x["mib_s"]:.1f}', f'{x["iops"]:.0f}',
      f'{l["p50"]:.0f}', f'{l["p99"]:.0f}', f'{l["p99.9"]:.0f}')
PYEOF
    done
done
