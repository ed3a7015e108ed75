// The lkvm command line, kvmtool-compatible: parsing and validation only,
// no side effects, so every bad input has a unit test.
#pragma once

#include <string>
#include <vector>

#include "kvm/machine_config.h"

namespace lkvm {

// "PATH[,ro|snapshot][,direct][,cache=MODE][,detect-zeroes=off|on|unmap][,aio=ENGINE][,serial=S][,num-queues=Q]
//  [,iothread=K[+K...]][,ioprio=CLASS[/LEVEL]][,notify=mmio|pio][,bus=blk|scsi][,controller=C][,lun=L]
//  [,rotation-rate=N][,discard=unmap|ignore][,THROTTLE...][,throttle-group=NAME]
//  [,werror=report|ignore|stop|enospc][,rerror=report|ignore|stop]"
DiskSpec parse_disk_spec(const std::string& text);

// "--throttle-group NAME[,THROTTLE...]": limits the disks naming it share.
ThrottleGroupSpec parse_throttle_group_spec(const std::string& text);
// "--scsi-controller C[,num-queues=Q][,iothread=K[+K...]][,notify=mmio|pio]"
ScsiControllerSpec parse_scsi_controller_spec(const std::string& text);
// "--iothreads N[,affinity=CPUSET][,poll-max-ns=NS][,poll-grow=G][,poll-shrink=S][,aio-max-batch=B][,sched=P]"
IoThreadsSpec parse_iothreads_spec(const std::string& text);

// lkvm list | stop NAME|--all | pause NAME | resume NAME | stat NAME [--disks] [--iothreads] [--vcpus] [--json] [--watch SECS]
//      | throttle NAME DISK|GROUP LIMITS
struct ControlCommand {
    std::string name;         // the guest (its --name, or guest-<pid>); empty for list and stop --all
    bool all = false;         // stop --all
    bool disks = false, iothreads = false, vcpus = false;  // stat: which tables (none: all)
    bool json = false;        // stat: JSON lines instead of a table
    double watch_s = 0;       // stat --watch SECS: redraw every SECS; 0: print once
    std::string target;       // throttle: a --throttle-group's name, a disk's index (as lkvm stat shows it) or image
    std::string limits;       // throttle: "iops=500,...", checked with parse_throttle_limits
};

struct Command {
    enum class Kind { kHelp, kRunHelp, kVersion, kRun, kList, kStop, kPause, kResume, kStat, kThrottle };
    Kind kind = Kind::kHelp;
    RunOptions run;
    ControlCommand control;
};

constexpr unsigned kMinMemMib = 64;

// Throws lkvm::Error with the one line to print for any bad input.
Command parse_command_line(const std::vector<std::string>& args);

std::string usage();
std::string run_usage();

}  // namespace lkvm

