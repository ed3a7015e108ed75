// One guest: its KVM VM, memory, platform devices and vCPU threads, and the
// main loop that owns the console and decides when and how lkvm exits.
#pragma once

#include <sys/types.h>

#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>

#include <array>
#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "base/mapping.h"
#include "hw/bus.h"
#include "hw/cmos_rtc.h"
#include "hw/guest_memory.h"
#include "hw/pci.h"
#include "hw/platform.h"
#include "hw/serial8250.h"
#include "kvm/boot.h"
#include "kvm/console.h"
#include "kvm/gdb_server.h"
#include "kvm/kvm.h"
#include "kvm/machine_config.h"
#include "kvm/stat_snapshot.h"
#include "kvm/vcpu_debug.h"
#include "kvm/vcpu_gate.h"
#include "kvm/vcpu_stats.h"
#include "kvm/virtio_host.h"
#include "virtio/blk.h"
#include "virtio/io_thread.h"
#include "virtio/scsi.h"
#include "virtio/virtio_pci.h"

namespace lkvm {

// A change in the guest's state, as whoever watches the machine sees it.
struct MachineEvent {
    enum class Kind {
        kPaused,    // the vCPUs are held (pause(), or an I/O error below)
        kResumed,   // they run again
        kIoError,   // a disk's werror/rerror=stop policy paused the guest; `reason` says what failed
        kShutdown,  // the guest is over: lkvm exits with `exit_status`; `reason` says why ("" when the guest ended itself)
    };
    Kind kind;
    std::string reason;
    int exit_status = 0;
};

class Machine : private IoErrorStop {
public:
    // Validates everything (files, sizes, limits) and builds the VM, ready to run.
    // Throws lkvm::Error with the line to print; nothing is left behind.
    explicit Machine(const RunOptions& options);
    ~Machine();

    // Runs the guest until it ends; returns lkvm's exit status.
    int run();

    // ---- What the control socket (lkvm list/stop/pause/resume/stat) asks for.
    // Call these on the main loop thread, from a handler of the loop run()
    // runs (main_loop()): that is where a control server lives.

    // The loop run() runs: the place for whatever serves the machine from outside.
    boost::asio::io_context& main_loop() { return io_; }
    // Called on the main loop thread for every state change, from the first
    // one on; the shutdown event comes last, as run() ends (the loop has
    // stopped by then: what the watcher sends must go out at once).
    void watch(std::function<void(const MachineEvent&)> watcher);

    // Its --name, or "guest-<pid>".
    std::string name() const;
    // Holds every vCPU out of the guest; returns once each one is parked (or
    // has left its loop). The I/O threads keep running and finish what is in
    // flight. Idempotent; a stop ends a paused guest as promptly as a running one.
    void pause();
    // Lets the vCPUs run again. Idempotent. After a pause for an I/O error
    // (werror=stop, ...), the failed requests are submitted again first.
    void resume();
    // "running", "paused", or "paused (io-error: WHY)".
    std::string state() const;
    // Ends the guest with exit status 0, saying "stopped by lkvm stop" (info level).
    void request_stop();
    // The I/O threads', disk queues' and vCPUs' counters now.
    StatSnapshot sample_io_stats() const;
    GuestInfo info() const;
    // New limits for a --throttle-group (by name) or a disk (its index, as
    // lkvm stat shows it, or its image), which changes the group it is in.
    // Returns that group's name; throws Error when there is no such target.
    std::string set_throttle(const std::string& target, const ThrottleLimits& limits);

private:
    void report(MachineEvent event);
    void stop_for_io_error(const std::string& why) override;  // from an I/O thread
    void pause_for_io_error(const std::string& why);           // on the main loop
    struct Outcome {
        int status;
        std::string message;  // printed as "lkvm: <message>" when not empty
        LogLevel level = LogLevel::kError;  // of that message
    };
    void finish(Outcome outcome);
    void on_guest_request(GuestRequest request);
    void vcpu_loop(Vcpu& vcpu);
    void handle_io(kvm_run* run);
    void handle_mmio(kvm_run* run);
    void kick_vcpus();
    void warn_if_console_silent();  // --boot-timeout: on the main loop
    void start_gdb();
    void stop_vcpus();
    void start_input();
    void read_input();

    // What the guest boots, read and checked before KVM is touched.
    struct BootFiles {
        std::vector<uint8_t> kernel_file;
        BzImage image;  // views into kernel_file
        std::vector<uint8_t> initrd;
        uint64_t initrd_addr = 0;
        std::string cmdline;
    };
    static BootFiles load_boot_files(const RunOptions& options);
    static std::vector<DiskImage> open_disks(const RunOptions& options);
    void add_disks();
    void open_vcpu_stats();
    std::vector<StatSnapshot::Vcpu> sample_vcpus() const;

    RunOptions options_;
    BootFiles boot_;
    std::vector<DiskImage> disk_images_;  // opened and locked before KVM is touched
    Fd console_log_;                      // --console-log, opened before KVM is touched too
    Kvm kvm_;
    Vm vm_;
    Mapping ram_;
    std::unique_ptr<GuestMemory> memory_;
    Bus pio_{"port I/O"};
    Bus mmio_{"MMIO"};
    boost::asio::io_context io_{1};
    std::function<void(const MachineEvent&)> watcher_;
    std::unique_ptr<VmDebugger> debugger_;  // --gdb
    std::optional<GdbServer> gdb_;          // --gdb, while run() runs
    Console console_;
    Serial8250 serial_;
    I8042 i8042_;
    PowerControl power_;
    CmosRtc rtc_;
    PciHostBridge pci_;
    std::vector<std::unique_ptr<Vcpu>> vcpus_;
    std::vector<VcpuStats> vcpu_stats_;  // one per vCPU, or none at all

    // Destroyed in reverse: transports reset their devices, devices drain into
    // their I/O threads, and only then do the threads go.
    std::unique_ptr<KvmVirtioHost> virtio_host_;
    std::vector<std::unique_ptr<IoThread>> io_threads_;
    // The --throttle-groups, then one per disk not in one of them (named by
    // its index, as lkvm stat shows it): limits a running guest may change.
    std::vector<std::unique_ptr<ThrottleGroup>> throttle_groups_;
    std::vector<std::unique_ptr<DiskDevice>> disks_;
    std::vector<std::unique_ptr<VirtioPciDevice>> transports_;

    std::optional<boost::asio::posix::stream_descriptor> input_;
    std::array<uint8_t, 4096> input_buffer_{};
    EscapeFilter escape_;

    std::mutex outcome_mutex_;
    std::optional<Outcome> outcome_;
    ConsoleActivity console_activity_{Serial8250::kCom1Base};  // for --boot-timeout
    std::atomic<bool> ended_{false};  // outcome_ is set: no vCPU enters the guest again
    VcpuGate vcpu_gate_{[this] { kick_vcpus(); }};
    std::string io_error_;  // why the guest is paused for an I/O error; empty: it is not (main loop only)
    std::vector<std::thread> vcpu_threads_;
};

}  // namespace lkvm
