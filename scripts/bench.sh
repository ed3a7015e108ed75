#!/usr/bin/env bash
# make bench: blkbench in both modes, side by side. The device mode runs the
# whole virtio-blk stack (test guest driver with one thread per queue as the
# vCPUs, transport, device, I/O threads); the engine mode drives the same
# engine on the same file directly with as many threads as the device has
# I/O threads (the limit). Every configuration keeps 64 requests in flight.
# BENCH_NESTED=1 adds scripts/bench-nested.sh (lkvm vs QEMU in the nested rig).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
bench=$top/${1:-build}/blkbench
seconds=${BENCH_SECONDS:-4}
file=${BENCH_FILE:-/var/tmp/lkvm-blkbench.raw}

run() { "$bench" "$@" --seconds "$seconds" --file "$file" --bs 4k --rw randread; }
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p" <<< "$2" | tail -n 1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }

echo "blkbench: 4k randread, 64 in flight per configuration, ${seconds}s per run, file $file ($(nproc) host CPUs)"
echo "threads: 'dedicated' is the disk's own thread; N is a group of N I/O threads (queues spread round robin)"
printf '%-8s %-6s %-9s %6s %4s | %9s %7s %7s | %9s %7s %7s | %7s %7s | %s\n' engine direct threads queues qd \
    "dev IOPS" "p50us" "p99us" "eng IOPS" "p50us" "p99us" dev/eng "2 vs 1" "CPU (device run)"
for spec in "null:" "sync:" "native:" "io_uring:" "native:--direct" "io_uring:--direct"; do
    engine=${spec%%:*} extra=${spec#*:}
    one_thread=
    for config in "0 1 64" "1 2 32" "2 2 32"; do
        read -r threads queues qd <<< "$config"
        limit_threads=$((threads > 1 ? threads : 1))
        dev=$(run --engine "$engine" --mode device --iothreads "$threads" --queues "$queues" --qd "$qd" $extra)
        eng=$(run --engine "$engine" --mode engine --iothreads "$limit_threads" --qd $((64 / limit_threads)) $extra)
        di=$(field IOPS "$dev") ei=$(field IOPS "$eng")
        scaling=-
        [ "$threads" = 1 ] && one_thread=$di
        [ "$threads" = 2 ] && scaling=$(ratio "$di" "$one_thread")
        printf '%-8s %-6s %-9s %6s %4s | %9s %7s %7s | %9s %7s %7s | %7s %7s | %s\n' "$engine" "${extra:+yes}" \
            "$([ "$threads" = 0 ] && echo dedicated || echo "$threads")" "$queues" "$qd" \
            "$di" "$(field p50_us "$dev")" "$(field p99_us "$dev")" "$ei" "$(field p50_us "$eng")" "$(field p99_us "$eng")" \
            "$(ratio "$di" "$ei")" "$scaling" "$(sed -n 's/^cpu: //p' <<< "$dev")"
    done
done
if [ "${BENCH_NESTED:-0}" = 1 ]; then bash "$top/scripts/bench-nested.sh" "${1:-build}"; fi
