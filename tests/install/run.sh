#!/usr/bin/env bash
# make install and what it installs, without KVM: installs into a temporary
# DESTDIR, runs the installed lkvm (its help, its version, and that it finds
# its default kernel and initramfs in PREFIX/share/lkvm), renders the man page
# with man -l, checks that the man page and the bash completion name exactly
# the commands and options `lkvm --help` and `lkvm run --help` do (so that a
# new option fails here until both have it), drives the completion under bash
# with bash-completion loaded, then uninstalls and checks that no file is left.
# Ends with "install: N passed, N failed".
# Usage: tests/install/run.sh [BUILD_DIR]   (after make: it installs what is built)
set -uo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-build}
cd "$top"
passed=0 failed=0
pass() { echo "  ok    $1"; passed=$((passed + 1)); }
fail() { echo "  FAIL  $1"; [ -n "${2:-}" ] && sed 's/^/        /' <<< "$2"; failed=$((failed + 1)); }
# check NAME COMMAND...: passes when COMMAND succeeds; its output is shown when it does not.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1); then pass "$name"; else fail "$name" "$out"; fi
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dest=$tmp/dest prefix=/usr/local
root=$dest$prefix
# Nothing here may reach a real guest's control socket.
export XDG_RUNTIME_DIR=$tmp/run HOME=$tmp/home
mkdir -p "$XDG_RUNTIME_DIR" "$HOME"
make_install() { make --no-print-directory "$@" PREFIX=$prefix DESTDIR="$dest" LKVM="$build/lkvm"; }

# ---- install
# A man page that `make` would build (its rule is there) but has not.
check "make install refuses what is not built, rather than building it (sudo make install leaves build/ alone)" \
    bash -c "! make --no-print-directory install PREFIX=$prefix DESTDIR='$tmp/none' MAN_PAGE='$tmp/unbuilt/lkvm.1' &&
             [ ! -e '$tmp/unbuilt' ] && [ ! -e '$tmp/none' ]"
check "make install PREFIX=$prefix DESTDIR=..." make_install install
installed=(bin/lkvm share/lkvm/vmlinuz share/lkvm/initramfs.cpio.gz share/lkvm/initramfs-fio.cpio.gz
           share/man/man1/lkvm.1 share/bash-completion/completions/lkvm)
missing=$(for f in "${installed[@]}"; do [ -f "$root/$f" ] || echo "$f"; done)
if [ -z "$missing" ]; then pass "installed: ${installed[*]}"; else fail "not installed" "$missing"; fi
check "the installed lkvm is executable" test -x "$root/bin/lkvm"

# ---- the installed binary
lkvm=$root/bin/lkvm
help=$("$lkvm" --help 2>&1)
check "lkvm --help lists the commands" grep -q '^commands:' <<< "$help"
run_help=$("$lkvm" run --help 2>&1)
check "lkvm run --help lists the options" grep -q -- '--kernel' <<< "$run_help"
check "lkvm version" grep -qE '^lkvm [0-9]+\.[0-9]+' <<< "$("$lkvm" version 2>&1)"
# More memory than any host has is refused after the kernel and initramfs are
# read and the bzImage parsed, and before /dev/kvm is opened: the error says
# the default files were found (else it names where it looked).
out=$("$lkvm" run -m 100000G 2>&1)
check "the installed lkvm boots its kernel and initramfs from $prefix/share/lkvm" \
    grep -q 'the host has only .* MiB of memory' <<< "$out"
[ -f "$root/share/lkvm/vmlinuz" ] && mv "$root/share/lkvm/vmlinuz" "$tmp/vmlinuz"
out=$("$lkvm" run -m 100000G 2>&1)
check "without it, one line names both places and -k" \
    grep -qF "neither $root/bin/kernel/vmlinuz (a build tree: run 'make') nor $root/share/lkvm/vmlinuz (installed: 'make install') exists: pass -k BZIMAGE" <<< "$out"
[ -f "$tmp/vmlinuz" ] && mv "$tmp/vmlinuz" "$root/share/lkvm/vmlinuz"

# ---- the man page
page=$root/share/man/man1/lkvm.1
rendered=$(LC_ALL=C MANWIDTH=80 man --warnings -l "$page" 2> "$tmp/man.err")
check "man -l renders lkvm(1) without warnings" bash -c "[ ! -s '$tmp/man.err' ] || { cat '$tmp/man.err'; false; }"
check "man -l shows NAME and EXIT STATUS" bash -c 'grep -q "^NAME" <<< "$1" && grep -q "^EXIT STATUS" <<< "$1"' _ "$rendered"

# What --help names: the commands (the lines under "commands:"), and each
# command's options: those in its synopsis there ("stop NAME | --all") and, when
# it has a help of its own (lkvm run --help), those its option lines define
# ("  -k, --kernel BZIMAGE"); not the options of other programs its prose quotes
# (gdb's -ex).
commands=$(awk '/^commands:/ { on = 1; next } on && /^$/ { exit } on && /^  [a-z]/ { print $1 }' <<< "$help")
own_help() {  # lkvm COMMAND --help, when it is not the general help
    local own
    own=$(timeout 10 "$lkvm" "$1" --help 2>&1)
    [ "$own" != "$help" ] && printf '%s\n' "$own"
}
command_help() {  # the lines that name the options of command $1: its synopsis, its own option lines
    awk -v c="$1" '/^commands:/ { on = 1; next } on && /^$/ { exit } on && /^  [a-z]/ && $1 == c' <<< "$help"
    own_help "$1" | grep -E '^ {1,8}-'
}
options() {  # the --long and -s options of these lines, up to their description (two blanks)
    sed -E 's/^ +//; s/  .*//' <<< "$1" | grep -oE -- '(^|[^A-Za-z0-9-])--?[A-Za-z][A-Za-z0-9-]*=?' | grep -v '=$' |
        sed 's/^[^-]*//' | sort -u
}
help_options=$(for c in $commands; do options "$(command_help "$c")"; done | sort -u)
roff_bold=$(grep -oE '\\fB[^\\]*' "$page" | sed 's/^\\fB//')
man_options=$(grep -oE -- '^--?[A-Za-z][A-Za-z0-9-]*' <<< "$roff_bold" | sort -u)
man_commands=$(awk '/^\.SH/ { on = ($0 == ".SH COMMANDS"); next } on' "$page" | grep -oE '^\\fB[a-z]+\\fR' | sed 's/\\f[BR]//g' | sort -u)
check_same() {  # NAME WHAT-A A WHAT-B B: the two lists are the same set
    local only_a only_b
    only_a=$(comm -23 <(sort -u <<< "$3") <(sort -u <<< "$5") | xargs)
    only_b=$(comm -13 <(sort -u <<< "$3") <(sort -u <<< "$5") | xargs)
    if [ -z "$only_a$only_b" ]; then pass "$1"
    else fail "$1" "${only_a:+in $2 but not in $4: $only_a}${only_a:+${only_b:+$'\n'}}${only_b:+in $4 but not in $2: $only_b}"; fi
}
check_same "the man page's commands are lkvm --help's" "lkvm --help" "$commands" "lkvm(1)'s COMMANDS" "$man_commands"
check_same "the man page's options are --help's" "--help" "$help_options" "lkvm(1) (in bold)" "$man_options"
# The sub-options --help names (aio=, poll-max-ns=, ...) are in the page too.
help_keys=$({ printf '%s\n' "$help"; for c in $commands; do own_help "$c"; done; } | grep -oE '(^|[^A-Za-z0-9-])[a-z][a-z0-9-]*=' | sed 's/^[^a-z]*//' | sort -u)
missing=$(while read -r key; do grep -qF -- "$key" "$page" || echo "$key"; done <<< "$help_keys" | xargs)
if [ -z "$missing" ]; then pass "every sub-option --help names is in the man page ($(wc -l <<< "$help_keys"))"
else fail "sub-options in --help but not in lkvm(1): $missing"; fi

# ---- bash completion, as bash-completion loads it
# complete LINE: the completions bash offers at the end of LINE, one a line.
# COMP_WORDS is split as bash splits it: at blanks, and at '=' and ':' (in
# COMP_WORDBREAKS), which make words of their own.
shim=$tmp/shim
mkdir -p "$shim"
# `lkvm list` of two running guests, for the guest names (no guest runs without KVM).
cat > "$shim/lkvm" <<'SHIM'
#!/bin/sh
[ "$1" = list ] || exit 1
printf '%-8s %8s %-7s %5s %7s  %s\n' NAME PID STATE VCPUS MEM DISKS dev 4242 running 2 512M disk.raw \
    build-vm 4343 paused 1 512M -
SHIM
chmod +x "$shim/lkvm"
complete_line() {
    PATH=$shim:$PATH bash -c '
        source /usr/share/bash-completion/bash_completion || exit 1
        source "$1" || exit 1
        line=$2
        words=() word=
        for ((i = 0; i < ${#line}; i++)); do
            c=${line:i:1}
            if [[ $c == " " ]]; then [ -n "$word" ] && words+=("$word"); word=
            elif [[ $c == [=:] && $word != *[=:] ]]; then [ -n "$word" ] && words+=("$word"); word=$c
            elif [[ $c != [=:] && $word == *[=:] ]]; then words+=("$word"); word=$c
            else word+=$c; fi
        done
        words+=("$word")
        COMP_WORDS=("${words[@]}") COMP_CWORD=$((${#words[@]} - 1)) COMP_LINE=$line COMP_POINT=${#line}
        compopt() { :; }  # only works while readline completes
        cd "$3" && _lkvm lkvm "${words[COMP_CWORD]}" "${words[COMP_CWORD - 1]}"
        printf "%s\n" "${COMPREPLY[@]}"' _ "$root/share/bash-completion/completions/lkvm" "$1" "$tmp/files"
}
mkdir -p "$tmp/files" && touch "$tmp/files/bzImage-6.1" "$tmp/files/disk.raw"
# expect_completion LINE WANT...: each WANT is among the completions of LINE.
expect_completion() {
    local line=$1 got want missing=
    shift
    got=$(complete_line "$line")
    for want; do grep -qxF -- "$want" <<< "$got" || missing+=" '$want'"; done
    if [ -z "$missing" ]; then pass "completion: '$line<TAB>' offers $*"
    else fail "completion: '$line<TAB>' lacks$missing" "offered: $(xargs <<< "$got")"; fi
}
expect_completion "lkvm st" stat stop
expect_completion "lkvm run --io" --iothreads
expect_completion "lkvm run -d disk.raw," disk.raw,direct disk.raw,ro disk.raw,cache= disk.raw,aio= disk.raw,iops-max=
expect_completion "lkvm run -d disk.raw,aio=" io_uring native sync null
# Readline replaces what follows the word's last '=': "none,aio=" from "none,a".
expect_completion "lkvm run -d disk.raw,cache=none,a" none,aio=
expect_completion "lkvm run -d disk.raw,cache=" writeback none writethrough directsync unsafe
expect_completion "lkvm run --iothreads 2,s" 2,sched=
expect_completion "lkvm run -k bzI" bzImage-6.1
expect_completion "lkvm run -d di" disk.raw
expect_completion "lkvm run --loglevel " error warn info debug
expect_completion "lkvm stop " dev build-vm
expect_completion "lkvm stat b" build-vm
expect_completion "lkvm stop -" --all
# What is completed after `--` is the guest's command, not lkvm's.
got=$(complete_line "lkvm run -c 2 -- sh --")
if [ -z "$got" ]; then pass "completion: nothing of lkvm's after '--'"; else fail "completion after '--' offers $(xargs <<< "$got")"; fi
# The completion's commands and each command's options are --help's.
check_same "the completion's commands are lkvm --help's" "lkvm --help" "$commands" "the completion" "$(complete_line "lkvm ")"
for c in $commands; do
    got=$(complete_line "lkvm $c -" | grep -vxF -- --)
    check_same "the completion's options of '$c' are --help's" "--help" "$(options "$(command_help "$c")")" "the completion" "$got"
done

# ---- uninstall
check "make uninstall PREFIX=$prefix DESTDIR=..." make_install uninstall
left=$(find "$dest" ! -type d)
if [ -z "$left" ]; then pass "make uninstall leaves no file in DESTDIR"; else fail "make uninstall left files" "$left"; fi
check "make uninstall removes share/lkvm" test ! -e "$root/share/lkvm"

echo "install: $passed passed, $failed failed"
[ "$failed" = 0 ]
