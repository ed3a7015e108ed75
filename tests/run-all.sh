#!/usr/bin/env bash
# Runs every test tier and ends with one line summing them: "N passed, N failed".
# Usage: tests/run-all.sh [BUILD_DIR] [--san DIR] [--tsan DIR] [--fuzz SECONDS] [--build COMMAND]
#   --san DIR, --tsan DIR: also the unit and device tiers of that tree, built
#     with ASan+UBSan (make test: build-fuzz, clang) or ThreadSanitizer
#     (build-tsan, g++);
#   --fuzz SECONDS: also every libFuzzer target (build-fuzz), all at once,
#     SECONDS of wall time each; one pass or fail per target;
#   --build COMMAND: first runs COMMAND (make test: the build of every binary
#     but lkvm and the guest images, which the system tier needs and make test
#     built already); a failed build counts as one failure.
# Plain `make test` passes all four; each tier prints its seconds.
#
# The system tier (one QEMU L1 booting real guests, about one core) starts
# first and runs beside the build and the other tiers, which run at a lower
# priority (nice) so that the rig's guests keep their pace; its lines come last.
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
build=build
if (($#)) && [[ $1 != --* ]]; then build=$1; shift; fi
san= tsan= fuzz_seconds= build_command=
while (($#)); do
    case $1 in
        --san) san=$2; shift 2 ;;
        --tsan) tsan=$2; shift 2 ;;
        --fuzz) fuzz_seconds=$2; shift 2 ;;
        --build) build_command=$2; shift 2 ;;
        *) echo "run-all: unknown argument $1" >&2; exit 2 ;;
    esac
done
cd "$top"
total_passed=0 total_failed=0
# For the sanitizer trees (here or as BUILD_DIR with make test SAN=1 / TSAN=1);
# tests/tsan.supp says, per entry, why what ThreadSanitizer reports there is benign.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1} UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}
[ -f tests/tsan.supp ] && export TSAN_OPTIONS="${TSAN_OPTIONS:-second_deadlock_stack=1} suppressions=$top/tests/tsan.supp"

add() { total_passed=$((total_passed + $1)); total_failed=$((total_failed + $2)); }

# doctest_tier TITLE BINARY: runs a doctest binary and adds its test-case counts.
# A binary that exits non-zero though every test case passed (a sanitizer's
# report at exit: LeakSanitizer, ThreadSanitizer's exit code 66) adds one failure.
doctest_tier() {
    echo "== $1"
    local log passed failed status=0 start=$SECONDS
    log=$(mktemp)
    "$2" --no-intro >"$log" 2>&1 || status=$?
    grep -E 'FAILED|ERROR|test cases' "$log" || true
    # Sanitizer reports, whole (up to 60 lines each).
    awk '/^(WARNING|ERROR): [A-Za-z]+Sanitizer|runtime error:/ {n = 60} n-- > 0' "$log"
    read -r passed failed < <(sed -n 's/.*test cases: *[0-9]* | *\([0-9]*\) passed | *\([0-9]*\) failed.*/\1 \2/p' "$log")
    if [ -z "${passed:-}" ]; then echo "$2 did not report (crashed? exit status $status)"; passed=0 failed=1
    elif ((status != 0 && failed == 0)); then echo "$2 exited with status $status after its tests (a sanitizer report?)"; failed=1
    fi
    add "$passed" "$failed"
    rm -f "$log"
    echo "   ($((SECONDS - start)) s)"
}

system_log=$(mktemp) system_end=$(mktemp) system_start=$SECONDS
{ env LKVM_BUILD="$build" bash tests/system/run.sh > "$system_log" 2>&1; echo $SECONDS > "$system_end"; } &
system_pid=$!
renice -n 10 -p $$ > /dev/null

if [ -n "$build_command" ]; then
    echo "== build: $build_command"
    start=$SECONDS
    if ! bash -c "$build_command"; then echo "the build failed"; add 0 1; fi
    echo "   ($((SECONDS - start)) s)"
fi
doctest_tier "unit tests (doctest)" "$build/unit-tests"
doctest_tier "device tests (virtio devices through the test guest driver, no KVM)" "$build/device-tests"
if [ -n "$san" ]; then
    doctest_tier "unit tests under ASan+UBSan ($san/)" "$san/unit-tests"
    doctest_tier "device tests under ASan+UBSan ($san/)" "$san/device-tests"
fi
if [ -n "$tsan" ]; then
    doctest_tier "unit tests under ThreadSanitizer ($tsan/)" "$tsan/unit-tests"
    doctest_tier "device tests under ThreadSanitizer ($tsan/)" "$tsan/device-tests"
fi

# script_tier TITLE NAME SCRIPT...: runs a test script that ends with "NAME: N passed, N failed" and adds its counts.
script_tier() {
    echo "== $1"
    local name=$2 log passed failed start=$SECONDS
    shift 2
    log=$(mktemp)
    "$@" 2>&1 | tee "$log"
    read -r passed failed < <(sed -n "s/^$name: \([0-9]*\) passed, \([0-9]*\) failed\$/\1 \2/p" "$log")
    if [ -z "${passed:-}" ]; then echo "$name tests did not report"; passed=0 failed=1; fi
    add "$passed" "$failed"
    rm -f "$log"
    echo "   ($((SECONDS - start)) s)"
}

if [ -n "$fuzz_seconds" ]; then
    script_tier "fuzz targets (libFuzzer, build-fuzz/: all at once, ${fuzz_seconds} s wall each)" fuzz bash scripts/fuzz.sh --parallel "$fuzz_seconds"
fi
script_tier "install (make install into a temporary DESTDIR; the man page and bash completion against --help; no KVM)" install bash tests/install/run.sh "$build"
script_tier "uapi headers (the whole build against every Debian 12 linux-libc-dev)" uapi bash tests/uapi/run.sh "$build"
echo "== system tests (real guests through scripts/nested-run.sh; started first, beside the tiers above)"
wait $system_pid
cat "$system_log"
read -r passed failed < <(sed -n 's/^system: \([0-9]*\) passed, \([0-9]*\) failed$/\1 \2/p' "$system_log")
if [ -z "${passed:-}" ]; then echo "system tests did not report"; passed=0 failed=1; fi
add "$passed" "$failed"
echo "   ($(($(cat "$system_end") - system_start)) s)"
rm -f "$system_log" "$system_end"

echo "$total_passed passed, $total_failed failed"
[ "$total_failed" = 0 ]
