#!/usr/bin/env bash
# Runs every test tier and ends with one line summing them: "N passed, N failed".
# Usage: tests/run-all.sh [BUILD_DIR] [--san DIR] [--tsan DIR] [--fuzz SECONDS]
#   --san DIR, --tsan DIR: also the unit and device tiers of that tree, built
#     with ASan+UBSan (make test: build-fuzz, clang) or ThreadSanitizer
#     (build-tsan, g++);
#   --fuzz SECONDS: also every libFuzzer target (build-fuzz), all at once,
#     SECONDS of wall time each; one pass or fail per target.
# Plain `make test` passes all three; each tier prints its seconds.
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
build=build
if (($#)) && [[ $1 != --* ]]; then build=$1; shift; fi
san= tsan= fuzz_seconds=
while (($#)); do
    case $1 in
        --san) san=$2; shift 2 ;;
        --tsan) tsan=$2; shift 2 ;;
        --fuzz) fuzz_seconds=$2; shift 2 ;;
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
script_tier "uapi headers (the whole build against every Debian 12 linux-libc-dev)" uapi bash tests/uapi/run.sh "$build"
script_tier "system tests (real guests through scripts/nested-run.sh)" system env LKVM_BUILD="$build" bash tests/system/run.sh

echo "$total_passed passed, $total_failed failed"
[ "$total_failed" = 0 ]
