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

echo "== uapi headers (the whole build against every Debian 12 linux-libc-dev)"
uapi_log=$(mktemp) uapi_start=$SECONDS
bash tests/uapi/run.sh "$build" 2>&1 | tee "$uapi_log"
read -r up uf < <(sed -n 's/^uapi: \([0-9]*\) passed, \([0-9]*\) failed$/\1 \2/p' "$uapi_log")
if [ -z "${up:-}" ]; then echo "uapi header tests did not report"; up=0 uf=1; fi
add "$up" "$uf"
rm -f "$uapi_log"
echo "   ($((SECONDS - uapi_start)) s)"

echo "== system tests (real guests through scripts/nested-run.sh)"
sys_log=$(mktemp) sys_start=$SECONDS
LKVM_BUILD=$build bash tests/system/run.sh 2>&1 | tee "$sys_log"
read -r sp sf < <(sed -n 's/^system: \([0-9]*\) passed, \([0-9]*\) failed$/\1 \2/p' "$sys_log")
if [ -z "${sp:-}" ]; then echo "system tests did not report"; sp=0 sf=1; fi
add "$sp" "$sf"
rm -f "$sys_log"
echo "   ($((SECONDS - sys_start)) s)"

echo "$total_passed passed, $total_failed failed"
[ "$total_failed" = 0 ]
