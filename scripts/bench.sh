#!/usr/bin/env bash
# make bench: blkbench in both modes, side by side. The device mode runs the
# whole virtio-blk or virtio-scsi stack (test guest driver with one thread per
# queue as the vCPUs, transport, device, I/O threads); the engine mode drives the same
# engine on the same file directly with as many threads as the device has
# I/O threads (the limit). Every configuration keeps 64 requests in flight.
# The driver threads halt-poll as KVM's vCPUs do by default (200 us);
# BENCH_HALT_POLL_NS=0 makes them sleep on every interrupt.
# BENCH_DIRECT_ROUNDS (5): device runs per O_DIRECT row, medians shown.
# BENCH_NESTED=1 adds scripts/bench-nested.sh (lkvm vs QEMU in the nested rig).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
bench=$top/${1:-build}/blkbench
seconds=${BENCH_SECONDS:-4}
file=${BENCH_FILE:-/var/tmp/lkvm-blkbench.raw}
halt_poll_ns=${BENCH_HALT_POLL_NS:-200000}  # KVM's default for a vCPU
direct_rounds=${BENCH_DIRECT_ROUNDS:-5}  # device runs per O_DIRECT row (the disk drifts)

run() { "$bench" "$@" --seconds "$seconds" --file "$file" --bs 4k --rw randread; }
field() { sed -n "s/.*$1=\([0-9.]*\).*/\1/p" <<< "$2" | tail -n 1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }'; }
# median FORMAT N...: the middle number, or the mean of the middle two.
median() {
    local format=$1
    shift
    printf '%s\n' "$@" | sort -g | awk -v format="$format" '{ v[NR] = $1 }
        END { printf format, (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}
# median_run RUN...: the run whose IOPS is the median (the lower middle of an even count).
median_run() {
    local runs=("$@") middle
    middle=$(for i in "${!runs[@]}"; do echo "$(field IOPS "${runs[$i]}") $i"; done | sort -g | awk -v n=$# 'NR == int((n + 1) / 2) { print $2 }')
    printf '%s' "${runs[$middle]}"
}
# round_ratios NAME: the median over rounds r of run r's IOPS against the
# mean of limits r and r + 1 (the limit runs before and after it).
round_ratios() {
    local -n runs=$1
    local r
    median %.2f $(for r in "${!runs[@]}"; do
        awk -v a="$(field IOPS "${runs[$r]}")" -v b="$(field IOPS "${limits[$r]}")" -v c="$(field IOPS "${limits[$((r + 1))]}")" \
            'BEGIN { printf "%.4f\n", (b + c > 0 ? 2 * a / (b + c) : 0) }'
    done)
}
us() { awk -v a="$1" 'BEGIN { printf "%.2f", a }'; }
difference() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.2f", a - b }'; }

# The buffered rows measure the page cache, not the disk: read the file in
# first, or the first rows pay for whatever evicted it since.
[ -f "$file" ] || "$bench" --mode engine --engine sync --seconds 0.1 --file "$file" > /dev/null
cat "$file" > /dev/null
echo "blkbench: 4k randread, 64 in flight per configuration, ${seconds}s per run, file $file ($(nproc) host CPUs), driver halt polling ${halt_poll_ns} ns"
echo "threads: 'dedicated' is the device's own thread; N is a group of N I/O threads (queues spread round robin)"
echo "rows with direct: $direct_rounds rounds of device runs between limit runs; ratios are the median of each run against the limit runs either side"
echo "blk and scsi: the same engine, file and threads through virtio-blk and through virtio-scsi (one LUN)"
echo "CPU us/req: the I/O threads' CPU (device) or the engine threads' CPU (eng) per request; own = device - eng, what lkvm adds"
row='%-8s %-6s %-9s %6s %4s | %9s %7s %7s | %9s %7s %7s | %9s %7s %7s | %7s %8s %9s | %6s %6s | %6s %6s %6s %6s %6s | %s\n'
printf "$row" engine direct threads queues qd "blk IOPS" "p50us" "p99us" "scsi IOPS" "p50us" "p99us" \
    "eng IOPS" "p50us" "p99us" blk/eng scsi/eng scsi/blk "blk 2v1" "scsi 2v1" \
    "blk us" "scsi" "eng" "own b" "own s" "CPU (blk run)"
for spec in "null:" "sync:" "native:" "io_uring:" "native:--direct" "io_uring:--direct"; do
    engine=${spec%%:*} extra=${spec#*:}
    one_blk= one_scsi=
    for config in "0 1 64" "1 2 32" "2 2 32"; do
        read -r threads queues qd <<< "$config"
        limit_threads=$((threads > 1 ? threads : 1))
        device() { run --device "$1" --engine "$engine" --mode device --iothreads "$threads" --queues "$queues" --qd "$qd" --halt-poll-ns "$halt_poll_ns" $extra; }
        limit() { run --engine "$engine" --mode engine --iothreads "$limit_threads" --qd $((64 / limit_threads)) $extra; }
        # The limit before and after each round of device runs: a disk whose
        # speed drifts (a cloud volume's does) moves both sides alike. The
        # O_DIRECT rows take several rounds: each device run is set against
        # the limit runs either side of it, and the ratios are those rounds'
        # median; the IOPS, latencies and CPU shown are the runs' medians.
        rounds=1
        [ -n "$extra" ] && rounds=$direct_rounds
        limits=("$(limit)") blks=() scsis=()
        for ((r = 0; r < rounds; r++)); do
            blks+=("$(device blk)")
            scsis+=("$(device scsi)")
            limits+=("$(limit)")
        done
        blk=$(median_run "${blks[@]}") scsi=$(median_run "${scsis[@]}")
        eng=$(for f in IOPS:%d p50_us:%.1f p99_us:%.1f cpu_us_per_req:%.3f; do
            printf '%s=%s ' "${f%:*}" "$(median "${f#*:}" $(for l in "${limits[@]}"; do field "${f%:*}" "$l"; done))"; done)
        blk_eng=$(round_ratios blks) scsi_eng=$(round_ratios scsis)
        bi=$(field IOPS "$blk") si=$(field IOPS "$scsi") ei=$(field IOPS "$eng")
        bc=$(field cpu_us_per_req "$blk") sc=$(field cpu_us_per_req "$scsi") ec=$(field cpu_us_per_req "$eng")
        blk_scaling=- scsi_scaling=-
        [ "$threads" = 1 ] && one_blk=$bi one_scsi=$si
        [ "$threads" = 2 ] && blk_scaling=$(ratio "$bi" "$one_blk") scsi_scaling=$(ratio "$si" "$one_scsi")
        printf "$row" "$engine" "${extra:+yes}" "$([ "$threads" = 0 ] && echo dedicated || echo "$threads")" "$queues" "$qd" \
            "$bi" "$(field p50_us "$blk")" "$(field p99_us "$blk")" "$si" "$(field p50_us "$scsi")" "$(field p99_us "$scsi")" \
            "$ei" "$(field p50_us "$eng")" "$(field p99_us "$eng")" \
            "$blk_eng" "$scsi_eng" "$(ratio "$si" "$bi")" "$blk_scaling" "$scsi_scaling" \
            "$(us "$bc")" "$(us "$sc")" "$(us "$ec")" "$(difference "$bc" "$ec")" "$(difference "$sc" "$ec")" \
            "$(sed -n 's/^cpu: //p' <<< "$blk")"
    done
done
if [ "${BENCH_NESTED:-0}" = 1 ]; then bash "$top/scripts/bench-nested.sh" "${1:-build}"; fi
