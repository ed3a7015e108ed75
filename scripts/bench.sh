#!/usr/bin/env bash
# make bench: blkbench in both modes, side by side, per engine. The device
# mode runs the whole virtio-blk stack through the test guest driver; the
# engine mode drives the same engine on the same file directly (the limit).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
bench=$top/${1:-build}/blkbench
seconds=${BENCH_SECONDS:-5}
file=${BENCH_FILE:-/var/tmp/lkvm-blkbench.raw}

run() { "$bench" "$@" --seconds "$seconds" --file "$file" | tail -n 1; }
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p" <<< "$2"; }

echo "blkbench: 4k randread, 1 queue, QD64, ${seconds}s per run, file $file"
printf '%-8s %-7s | %10s %8s %8s | %10s %8s %8s | %6s\n' engine direct "dev IOPS" "p50us" "p99us" "eng IOPS" "p50us" "p99us" "ratio"
for spec in "null:" "sync:" "native:" "native:--direct"; do
    engine=${spec%%:*} extra=${spec#*:}
    dev=$(run --engine "$engine" --mode device --qd 64 --bs 4k --rw randread $extra)
    eng=$(run --engine "$engine" --mode engine --qd 64 --bs 4k --rw randread $extra)
    di=$(field IOPS "$dev") ei=$(field IOPS "$eng")
    printf '%-8s %-7s | %10s %8s %8s | %10s %8s %8s | %6s\n' "$engine" "${extra:+yes}" \
        "$di" "$(field p50_us "$dev")" "$(field p99_us "$dev")" "$ei" "$(field p50_us "$eng")" "$(field p99_us "$eng")" \
        "$(awk -v a="$di" -v b="$ei" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')"
done
if [ "${BENCH_NESTED:-0}" = 1 ]; then bash "$top/scripts/bench-nested.sh" "${1:-build}"; fi
