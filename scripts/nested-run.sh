#!/usr/bin/env bash
# nested-run.sh LKVM-ARGS...: runs build/lkvm LKVM-ARGS... as it would run on a
# host with hardware KVM: same console output, same exit status, and files
# named on the command line are this host's own files.
#
# Where /dev/kvm is hardware KVM it simply runs lkvm. Elsewhere it boots an
# L1 guest under QEMU's TCG (which emulates AMD SVM with nested paging), loads
# kvm-amd there, mounts this host's root over 9p and runs lkvm inside it, in
# the same directory. Every stage has a deadline; a missed one is named, with
# lkvm's thread states. A run is retried once, and only when the rig itself
# failed (L1 never came up, or L1's own kernel locked up or stalled, which
# the host sees from outside), never for anything lkvm or its guest did.
#
# nested-run.sh --batch DIR: runs every DIR/*.sh (each a job that runs
# build/lkvm) in one L1 boot, in name order, LKVM_RIG_LANES of them at a time,
# leaving each job's output in JOB.sh.out and its status in JOB.sh.status.
# System tests use this to share one L1 boot.
#
# Environment: LKVM_RIG=auto|direct|nested (default auto),
#              LKVM_RIG_TIMEOUT=seconds for each lkvm job inside L1 (default 600),
#              LKVM_RIG_LANES=jobs run at once in a batch (default 1: with 2,
#                which L1's 2 vCPUs allow, three full system runs of 38 jobs
#                each lost L2 vCPUs or L1 itself; see DESIGN.md on the rig),
#              LKVM_RIG_VERBOSE=1 to show L1's own log on stderr.
# Exit status: lkvm's, or 125 when the rig failed.
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
lkvm=$top/build/lkvm
rig_failed=125

say() { echo "nested-run: $*" >&2; }

hardware_kvm() {
    # PVM (kvm_pvm) offers /dev/kvm without hardware virtualization; it cannot
    # boot an unmodified kernel in reasonable time, so it does not count.
    [ -c /dev/kvm ] && [ -r /dev/kvm ] && [ ! -d /sys/module/kvm_pvm ] && grep -qwE 'vmx|svm' /proc/cpuinfo
}

batch=
if [ "${1:-}" = --batch ]; then
    batch=$(cd "${2:?--batch needs a directory}" && pwd)
    shift 2
    lanes=${LKVM_RIG_LANES:-1}
    [[ $lanes =~ ^[1-9][0-9]*$ ]] || { say "LKVM_RIG_LANES=$lanes: give a number of jobs, 1 or more"; exit $rig_failed; }
fi

mode=${LKVM_RIG:-auto}
if [ "$mode" = direct ] || { [ "$mode" = auto ] && hardware_kvm; }; then
    if [ -n "$batch" ]; then
        for job in "$batch"/*.sh; do
            while (( $(jobs -rp | wc -l) >= lanes )); do wait -n; done
            { bash "$job" > "$job.out" 2>&1 < /dev/null; echo $? > "$job.status"; } &
        done
        wait
        exit 0
    fi
    exec "$lkvm" "$@"
fi

[ -x "$lkvm" ] || { say "build/lkvm is missing: run 'make' first"; exit $rig_failed; }
l1_initrd=$top/build/rig/l1.cpio.gz
if [ ! -f "$l1_initrd" ] || [ "$top/scripts/rig/l1-init" -nt "$l1_initrd" ]; then
    bash "$top/scripts/rig/build-l1.sh" || { say "cannot build the L1 initramfs"; exit $rig_failed; }
fi

# L1 needs the guest's memory plus room for itself.
guest_mib=512
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --) break ;;
        -m|--mem) v=${args[i+1]:-}; ;;
        --mem=*) v=${args[i]#--mem=} ;;
        *) continue ;;
    esac
    case "$v" in *[Gg]) guest_mib=$(( ${v%[Gg]} * 1024 ));; *[Mm]) guest_mib=${v%[Mm]};; [0-9]*) guest_mib=$v;; esac
done
l1_mib=$(( guest_mib + 1024 ))
(( l1_mib < 2048 )) && l1_mib=2048

deadline=${LKVM_RIG_TIMEOUT:-600}
work=$(mktemp -d /tmp/lkvm-rig.XXXXXX)
qemu=
trap '[ -n "$qemu" ] && kill $qemu 2> /dev/null; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM HUP
if [ -n "$batch" ]; then
    job_param="rig.batch=$batch rig.lanes=$lanes"
    l1_mib=$(( 3072 + 1024 * lanes ))
else
    job_param="rig.job=$work/job.sh"
fi
{
    printf 'cd %q || exit 125\n' "$PWD"
    printf 'exec %q' "$lkvm"
    printf ' %q' "$@"
    printf '\n'
} > "$work/job.sh"

# What an L1 kernel prints when one of its CPUs is stuck: the rig itself broke.
l1_broken='soft lockup|rcu_sched self-detected stall|rcu: INFO: rcu_.* detected stalls|Kernel panic'
# How long a booted L1 may print nothing on its report channel (it reports
# "alive" every 15 s) before the host takes it for frozen.
l1_silence=90

run_once() {
    : > "$work/l1.log"
    local console="stdio,id=con,signal=off"
    [ -n "$batch" ] && console="null,id=con"
    # A background job's stdin would be /dev/null: QEMU gets ours through fd 3.
    exec 3<&0
    qemu-system-x86_64 -M q35 -cpu max -accel tcg,thread=multi -smp 2 -m "$l1_mib" \
        -nodefaults -display none -no-reboot \
        -kernel "$top/build/kernel/vmlinuz" -initrd "$l1_initrd" \
        -append "console=ttyS1 quiet panic=-1 $job_param rig.deadline=$deadline" \
        -chardev "$console" -serial chardev:con \
        -serial "file:$work/l1.log" \
        -fsdev local,id=hostroot,path=/,security_model=passthrough,multidevs=remap \
        -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot <&3 3<&- &
    qemu=$!
    local progress=-1 last=$SECONDS why=
    exec 3<&-
    # Watch L1 from outside: its own watchdog cannot help when its kernel is stuck.
    while kill -0 $qemu 2> /dev/null; do
        sleep 1
        if grep -qE "$l1_broken" "$work/l1.log"; then
            why="L1's kernel locked up: $(grep -m1 -oE "$l1_broken" "$work/l1.log")"
        else
            local now_progress
            now_progress=$(grep -c '^rig: ' "$work/l1.log")
            if [ "$now_progress" != "$progress" ]; then
                progress=$now_progress last=$SECONDS
            elif (( SECONDS - last > (progress > 0 ? l1_silence : deadline + 90) )); then
                # Before l1-ready: its boot; after it, L1's heartbeat (every 15 s) stopped.
                why="L1 made no progress for $((SECONDS - last))s"
            fi
        fi
        if [ -n "$why" ]; then
            kill $qemu 2> /dev/null; sleep 2; kill -9 $qemu 2> /dev/null
            break
        fi
    done
    wait $qemu 2> /dev/null
    local qemu_status=$?
    qemu=
    [ "${LKVM_RIG_VERBOSE:-0}" = 1 ] && sed 's/^/L1: /' "$work/l1.log" >&2
    if ! grep -q '^rig: l1-ready' "$work/l1.log"; then
        say "stage 'L1 boot' failed (QEMU status $qemu_status${why:+; $why}); L1's last lines:"
        tail -n 15 "$work/l1.log" | sed 's/^/  L1: /' >&2
        return 2
    fi
    if grep -q '^rig: deadline' "$work/l1.log"; then
        say "stage 'lkvm run' missed its ${deadline}s deadline; lkvm's threads:"
        grep '^rig: \(deadline\|thread\|done\)' "$work/l1.log" | sed 's/^rig: /  /' >&2
        [ -n "$batch" ] || return 1
    fi
    if [ -n "$why" ]; then
        local at
        at=$(sed -n 's/^rig: done //p' "$work/l1.log" | tail -n 1)
        say "stage 'lkvm run' stopped by the rig: $why${at:+ (after job $at)}; L1's last lines:"
        grep -v '^rig: done' "$work/l1.log" | tail -n 8 | sed 's/^/  L1: /' >&2
        return 2
    fi
    local status
    status=$(sed -n 's/^rig: exit \([0-9]*\).*/\1/p' "$work/l1.log" | tail -n 1)
    if [ -z "$status" ]; then
        say "stage 'lkvm run' ended without a status (QEMU status $qemu_status); L1's last lines:"
        tail -n 15 "$work/l1.log" | sed 's/^/  L1: /' >&2
        return 1
    fi
    return 0
}

if [ -n "$batch" ]; then
    # Each job gets one retry when the rig fails under it; after a second
    # failure it is marked failed (status 125) and the rest go on in a new L1.
    # The jobs the rig failed under are those L1 started and did not finish
    # (up to one per lane; the rig cannot tell which of them it broke under).
    declare -A retried
    while :; do
        run_once
        case $? in
            0)
                # A job whose lkvm saw a vCPU back at the reset vector in real
                # mode (a triple fault there, or parked there at the deadline),
                # which no guest of ours asks for: the rig reset or lost that
                # vCPU (DESIGN.md). It runs once more. Not a job that makes its
                # guest triple-fault on purpose: on AMD, KVM resets a vCPU after
                # a shutdown, so a real triple fault is reported there too.
                again=0
                for job in "$batch"/*.sh; do
                    grep -q '^# rig: the guest triple-faults on purpose' "$job" && continue
                    [ -z "${retried[$job]:-}" ] &&
                        grep -qE "lkvm: vCPU [0-9]*(: triple fault \(KVM_EXIT_SHUTDOWN\) at| was at) RIP 0xfff0 CS 0xf000 \(real mode\)" \
                            "$job.out" 2> /dev/null || continue
                    retried[$job]=1
                    again=1
                    say "retrying $(basename "$job") once: the rig reset one of its vCPUs ($(grep -m 1 "RIP 0xfff0 CS 0xf000" "$job.out"))"
                    mv "$job.out" "$job.out.first"
                    rm -f "$job.status" "$job.seconds"
                done
                [ $again = 1 ] || exit 0
                continue ;;
            2) ;;
            *) exit $rig_failed ;;
        esac
        stuck=()
        started=$(tr -d '\r' < "$work/l1.log" | sed -n 's/^rig: start //p')
        for job in "$batch"/*.sh; do
            [ -f "$job.status" ] || ! grep -qxF -- "$job" <<< "$started" || stuck+=("$job")
        done
        if [ ${#stuck[@]} = 0 ]; then
            # L1 broke before it started a job (or after the last one): nothing to blame it on.
            for job in "$batch"/*.sh; do [ -f "$job.status" ] || stuck+=("$job"); done
            [ ${#stuck[@]} = 0 ] && exit 0
            stuck=("${stuck[0]}")
        fi
        for job in "${stuck[@]}"; do
            if [ -n "${retried[$job]:-}" ]; then
                say "the rig failed twice under $(basename "$job"): marking it failed, going on with the rest"
                echo "nested-run: the rig failed twice under this job (see nested-run's messages)" >> "$job.out"
                echo $rig_failed > "$job.status"
            else
                retried[$job]=1
                say "retrying $(basename "$job") once: the failure was the rig's own (finished jobs are kept)"
            fi
        done
    done
fi

for attempt in 1 2; do
    run_once
    case $? in
        0) exit "$(sed -n 's/^rig: exit \([0-9]*\).*/\1/p' "$work/l1.log" | tail -n 1)" ;;
        2) [ $attempt = 1 ] && say "retrying once: the failure was the rig's own" ;;
        *) exit $rig_failed ;;
    esac
done
exit $rig_failed
