#!/usr/bin/env bash
# The build against every Debian 12 kernel header version, not only the one
# installed here. A user who keeps Debian 12 patched has newer linux-libc-dev
# headers than a fresh image; 6.1.192's <linux/ioprio.h> broke our C++ build.
#
# 1. tests/unit/test_uapi.cc (the guard translation unit, built with the unit
#    tests) includes every <linux/...> and <asm/...> header the tree includes.
# 2. For each linux-libc-dev version in the apt archive other than the
#    installed one, the .deb is downloaded (apt-get download: nothing is
#    installed or upgraded), unpacked under BUILD/uapi/VERSION, and every
#    translation unit of every binary goes through the compiler with the
#    project's flags (-Werror) against it (make uapi-check). A translation
#    unit that preprocesses to the same text as against the installed headers
#    is the same compiler input as in the build itself and is not compiled
#    again: a version changes a few headers, and few units see the change.
# Ends with "uapi: N passed, N failed".
# Usage: tests/uapi/run.sh [BUILD_DIR]
set -uo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-build}
cd "$top"
passed=0 failed=0
pass() { echo "  ok    $1"; passed=$((passed + 1)); }
fail() { echo "  FAIL  $1"; failed=$((failed + 1)); }

guard=tests/unit/test_uapi.cc
missing=$(grep -rhoE --include='*.cc' --include='*.h' '^#include <(linux|asm)/[^>]+>' base disk hw virtio kvm tests |
          sort -u | while read -r line; do grep -qxF "$line" "$guard" || echo "$line"; done)
if [ -z "$missing" ]; then
    pass "$guard includes every uapi header the tree does"
else
    fail "$guard lacks what the tree includes; add it there: $(echo $missing)"
fi

installed=$(dpkg-query -W -f='${Version}' linux-libc-dev 2>/dev/null)
archive_versions() {
    apt-cache madison linux-libc-dev 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' | sort -uV | grep -vxF "${installed:-none}"
}
versions=$(archive_versions)
if [ -z "$versions" ] && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null 2>&1
    versions=$(archive_versions)
fi
echo "  installed linux-libc-dev ${installed:-(none)}: the build itself; the archive's others: $(echo ${versions:-none})"
[ -n "$versions" ] || fail "no other linux-libc-dev version in the apt lists (apt-get update as root, then run again)"

for v in $versions; do
    dir=$top/$build/uapi/$v
    if [ ! -f "$dir/.unpacked" ]; then
        rm -rf "$dir" && mkdir -p "$dir"
        # apt fetches as user _apt: give it a directory it may write to.
        dl=$(mktemp -d) && chmod 755 "$dl" && { chown _apt "$dl" 2>/dev/null || true; }
        if (cd "$dl" && apt-get download -qq "linux-libc-dev=$v" >/dev/null 2>&1) && dpkg -x "$dl"/*.deb "$dir"; then
            touch "$dir/.unpacked"
        fi
        rm -rf "$dl"
    fi
    if [ ! -f "$dir/.unpacked" ]; then
        fail "linux-libc-dev $v: could not download it from the apt archive"
        continue
    fi
    log=$(mktemp)
    start=$SECONDS
    if make -j"$(nproc)" --no-print-directory -s uapi-check UAPI="$dir" UAPI_BASE="$top/$build/uapi/installed" >"$log" 2>&1; then
        compiled=$(grep -rlx compiled "$dir/checked" --include='*.ok' | wc -l)
        same=$(grep -rlx same "$dir/checked" --include='*.ok' | wc -l)
        pass "linux-libc-dev $v: every translation unit builds: $compiled compiled, $same the same after preprocessing ($((SECONDS - start)) s)"
    else
        fail "linux-libc-dev $v: the build breaks:"
        grep -E 'error|warning' "$log" | head -20 | sed 's/^/        /'
    fi
    rm -f "$log"
done

echo "uapi: $passed passed, $failed failed"
[ "$failed" = 0 ]
