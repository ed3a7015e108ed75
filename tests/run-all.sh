#!/usr/bin/env bash
# Runs every test tier and ends with one line summing them: "N passed, N failed".
# Usage: tests/run-all.sh [BUILD_DIR]
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-build}
cd "$top"
total_passed=0 total_failed=0

add() { total_passed=$((total_passed + $1)); total_failed=$((total_failed + $2)); }

echo "== unit tests (doctest)"
unit_log=$(mktemp)
"$build/unit-tests" --no-intro 2>&1 | tee "$unit_log" | grep -E 'FAILED|ERROR|test cases' || true
read -r up uf < <(sed -n 's/.*test cases: *[0-9]* | *\([0-9]*\) passed | *\([0-9]*\) failed.*/\1 \2/p' "$unit_log")
if [ -z "${up:-}" ]; then echo "unit tests did not report (crashed?)"; up=0 uf=1; fi
add "$up" "$uf"
rm -f "$unit_log"

echo "== device tests (virtio devices through the test guest driver, no KVM)"
dev_log=$(mktemp)
"$build/device-tests" --no-intro 2>&1 | tee "$dev_log" | grep -E 'FAILED|ERROR|test cases' || true
read -r dp df < <(sed -n 's/.*test cases: *[0-9]* | *\([0-9]*\) passed | *\([0-9]*\) failed.*/\1 \2/p' "$dev_log")
if [ -z "${dp:-}" ]; then echo "device tests did not report (crashed?)"; dp=0 df=1; fi
add "$dp" "$df"
rm -f "$dev_log"

echo "== system tests (real guests through scripts/nested-run.sh)"
sys_log=$(mktemp)
LKVM_BUILD=$build bash tests/system/run.sh 2>&1 | tee "$sys_log"
read -r sp sf < <(sed -n 's/^system: \([0-9]*\) passed, \([0-9]*\) failed$/\1 \2/p' "$sys_log")
if [ -z "${sp:-}" ]; then echo "system tests did not report"; sp=0 sf=1; fi
add "$sp" "$sf"
rm -f "$sys_log"

echo "$total_passed passed, $total_failed failed"
[ "$total_failed" = 0 ]
