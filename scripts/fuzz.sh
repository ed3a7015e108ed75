#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/fuzz_*.cc, clang, ASan + UBSan,
# build-fuzz/) and runs each for SECONDS in turn, one at a time. Usage:
#
#   scripts/fuzz.sh [SECONDS [TARGET...]]     (make fuzz FUZZ_SECONDS=N)
#
# TARGET is a name like chain or scsi (default: all). Each target starts from
# its seeds in tests/fuzz/corpus/<target>/ and from what earlier runs found,
# kept in build-fuzz/corpus/<target>/ (new inputs go there, never into the
# committed seeds). A crash, sanitizer report or failed check stops that
# target and leaves its input in build-fuzz/findings/<target>/; the full
# output is in build-fuzz/logs/<target>.log. The last lines are one per
# target: executions, coverage (libFuzzer's cov: and ft: at the end) and
# findings (0, or the input that failed), then "fuzz: N passed, N failed"
# (one per target). Exit status 1 when any target failed.
#
#   scripts/fuzz.sh --parallel SECONDS [TARGET...]
#
# runs the targets all at once instead, each for SECONDS of wall time (so each
# gets a share of the CPUs, not SECONDS of a CPU): make test's fuzz tier.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

parallel=0
if [ "${1:-}" = --parallel ]; then parallel=1; shift; fi
seconds=${1:-60}
shift || true
[[ $seconds =~ ^[0-9]+$ ]] && ((seconds > 0)) || { echo "fuzz: SECONDS must be a positive number, not '$seconds'" >&2; exit 2; }

fuzzer_runtime() { [ -e "$(clang++ -print-resource-dir)/lib/linux/libclang_rt.fuzzer-x86_64.a" ]; }
if ! command -v clang++ >/dev/null || ! fuzzer_runtime; then
    bash scripts/install-deps.sh
fi

targets=("$@")
goals=("${targets[@]/#/build-fuzz/fuzz_}")
if ((${#targets[@]} == 0)); then
    goals=(fuzz-build)
    for src in tests/fuzz/fuzz_*.cc; do
        name=${src#tests/fuzz/fuzz_}
        targets+=("${name%.cc}")
    done
fi
make --no-print-directory -j"${JOBS:-$(nproc)}" "${goals[@]}"

# UBSan's reports end the run (the build has -fno-sanitize-recover), with a stack.
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
# run_target T: one libFuzzer run of target T; its exit status goes to build-fuzz/logs/T.status.
run_target() {
    local t=$1 work=build-fuzz/corpus/$1 findings=build-fuzz/findings/$1 log=build-fuzz/logs/$1.log status=0
    mkdir -p "$work" "$findings" "$(dirname "$log")"
    rm -f "build-fuzz/logs/$t.status"
    # -timeout: an input running 10 s is a hang, reported like a crash.
    "build-fuzz/fuzz_$t" -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$findings/" "$work" "tests/fuzz/corpus/$t" >"$log" 2>&1 || status=$?
    echo "$status" > "build-fuzz/logs/$t.status"
}
if ((parallel)); then
    echo "fuzz: ${targets[*]}: all at once, ${seconds}s of wall time each, on $(nproc) CPUs"
    pids=()
    for t in "${targets[@]}"; do run_target "$t" & pids+=($!); done
    wait "${pids[@]}"
else
    for t in "${targets[@]}"; do
        echo "fuzz: $t for ${seconds}s"
        run_target "$t"
    done
fi

summary=()
failed=0 npassed=0 nfailed=0
for t in "${targets[@]}"; do
    log=build-fuzz/logs/$t.log
    status=$(cat "build-fuzz/logs/$t.status" 2>/dev/null || echo '?')
    execs=$(awk '/^stat::number_of_executed_units:/ {print $2}' "$log")
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -n 1 | awk '{print $2 " / " $4}')
    found=0
    if [ "$status" != 0 ]; then
        failed=1 nfailed=$((nfailed + 1))
        found=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
        found=${found:-"exit status $status, see $log"}
        echo "fuzz: $t failed:"
        grep -E 'ERROR:|FUZZ_CHECK|runtime error|SUMMARY' "$log" | head -n 5 || true
    else
        npassed=$((npassed + 1))
    fi
    summary+=("$(printf '%-12s executions %10s  cov/ft %-14s findings %s' "$t" "${execs:-?}" "${cov:-?}" "$found")")
done
printf '%s\n' "${summary[@]}"
echo "fuzz: $npassed passed, $nfailed failed"
exit "$failed"
