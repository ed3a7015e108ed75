#!/usr/bin/env bash
# Runs every test tier and ends with one line summing them: "N passed, N failed".
# Usage: tests/run-all.sh [BUILD_DIR]
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-build}
cd "$top"
total_passed=0 total_failed=0

add() { total_passed=$((total_passed + $1)); total_failed=$((total_failed + $2)); }

# doctest_tier TITLE BINARY: runs a doctest binary and adds its test-case counts.
doctest_tier() {
    echo "== $1"
    local log passed failed start=$SECONDS
    log=$(mktemp)
    "$2" --no-intro 2>&1 | tee "$log" | grep -E 'FAILED|ERROR|test cases' || true
    read -r passed failed < <(sed -n 's/.*test cases: *[0-9]* | *\([0-9]*\) passed | *\([0-9]*\) failed.*/\1 \2/p' "$log")
    if [ -z "${passed:-}" ]; then echo "$2 did not report (crashed?)"; passed=0 failed=1; fi
    add "$passed" "$failed"
    rm -f "$log"
    echo "   ($((SECONDS - start)) s)"
}

doctest_tier "unit tests (doctest)" "$build/unit-tests"
doctest_tier "device tests (virtio devices through the test guest driver, no KVM)" "$build/device-tests"

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

script_tier "uapi headers (the whole build against every Debian 12 linux-libc-dev)" uapi bash tests/uapi/run.sh "$build"
script_tier "system tests (real guests through scripts/nested-run.sh)" system env LKVM_BUILD="$build" bash tests/system/run.sh

echo "$total_passed passed, $total_failed failed"
[ "$total_failed" = 0 ]
