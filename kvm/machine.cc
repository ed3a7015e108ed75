#include "kvm/machine.h"

#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#include <boost/asio/post.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "base/error.h"
#include "base/log.h"
#include "kvm/cpuid.h"
#include "kvm/default_files.h"
#include "kvm/firmware_tables.h"
#include "kvm/host_kvm.h"
#include "kvm/layout.h"
#include "virtio/queue_mapping.h"

namespace lkvm {

namespace {

// APIC IDs are 8 bits in the MP tables and the MADT, and the IOAPIC takes the next one.
constexpr unsigned kMaxTableCpus = 254;

std::filesystem::path binary_dir()
{
    std::error_code ec;
    auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
    return ec ? std::filesystem::path(".") : exe.parent_path();
}

std::vector<uint8_t> read_file(const std::string& what, const std::string& path)
{
    Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd.valid())
        throw sys_error(what + " " + path);
    struct stat st {};
    if (::fstat(fd.get(), &st) < 0)
        throw sys_error(what + " " + path);
    if (S_ISDIR(st.st_mode))
        throw Error(what + " " + path + ": is a directory");
    if (!S_ISREG(st.st_mode))
        throw Error(what + " " + path + ": not a regular file");
    std::vector<uint8_t> data(static_cast<size_t>(st.st_size));
    size_t done = 0;
    while (done < data.size()) {
        const ssize_t n = ::read(fd.get(), data.data() + done, data.size() - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            throw sys_error(what + " " + path);
        if (n == 0)
            throw Error(what + " " + path + ": file shrank while being read");
        done += static_cast<size_t>(n);
    }
    return data;
}

uint64_t host_memory_bytes()
{
    struct sysinfo info {};
    if (::sysinfo(&info) < 0)
        return UINT64_MAX;
    return uint64_t{info.totalram} * info.mem_unit;
}

void empty_signal_handler(int) {}

std::vector<int> online_cpus()
{
    std::ifstream file("/sys/devices/system/cpu/online");
    std::string text;
    if (std::getline(file, text) && !text.empty())
        return parse_cpu_list("online CPUs", text);
    std::vector<int> cpus;
    for (long c = 0; c < ::sysconf(_SC_NPROCESSORS_ONLN); ++c)
        cpus.push_back(static_cast<int>(c));
    return cpus;
}

// Sets the level lkvm logs at; first of all, so that even the checks in
// Machine's member initializers log at the level asked for.
const RunOptions& with_log_level(const RunOptions& options)
{
    set_log_level(options.quiet ? LogLevel::kError : options.log_level);
    return options;
}

// /dev/kvm, refused before anything boots when it cannot run an ordinary
// guest kernel; --force-kvm tries it anyway (a PVM-enabled guest kernel).
Kvm open_usable_kvm(const RunOptions& options)
{
    Kvm kvm = Kvm::open();
    if (!options.force_kvm)
        if (const std::string why = unusable_kvm_reason(probe_host_virtualization()); !why.empty())
            throw Error(why);
    return kvm;
}

}  // namespace

Machine::BootFiles Machine::load_boot_files(const RunOptions& options)
{
    BootFiles boot;
    const std::string kernel =
        options.kernel.empty() ? find_default_file(kDefaultKernel, binary_dir()).string() : options.kernel;
    const std::string initrd =
        options.initrd.empty() ? find_default_file(kDefaultInitrd, binary_dir()).string() : options.initrd;
    boot.kernel_file = read_file("kernel", kernel);
    boot.image = parse_bzimage(boot.kernel_file, kernel);
    boot.initrd = read_file("initrd", initrd);

    const uint64_t ram = options.mem_mib << 20;
    const uint64_t host = host_memory_bytes();
    if (ram > host)
        throw Error("-m " + std::to_string(options.mem_mib) + ": the host has only " + std::to_string(host >> 20) +
                    " MiB of memory");
    boot.cmdline = kernel_cmdline(options);
    check_boot_fits(boot.image, boot.cmdline, ram);
    boot.initrd_addr = place_initrd(boot.image, ram, boot.initrd.size());
    return boot;
}

std::vector<DiskImage> Machine::open_disks(const RunOptions& options)
{
    // The I/O threads the disks get are checked here too, before KVM is touched.
    if (options.iothreads.count)
        if (const auto warning = check_iothreads_on_host(options.iothreads, online_cpus()); !warning.empty())
            log_warn(warning);
    std::vector<DiskImage> images;
    for (const auto& disk : options.disks) {
        images.push_back(DiskImage::open({disk.path, disk.read_only, disk.cache, disk.snapshot}));
        if (const SnapshotOverlay* snapshot = images.back().snapshot())
            log_info("disk " + disk.path + ": snapshot, the guest's writes go to a temporary overlay in " +
                     snapshot->dir());
    }
    return images;
}

void Machine::add_disks()
{
    virtio_host_ = std::make_unique<KvmVirtioHost>(vm_, mmio_, pio_);
    const IoThreadsSpec& group = options_.iothreads;
    const PollParams poll{group.poll_max_ns, group.poll_grow, group.poll_shrink};
    // A failed I/O thread ends lkvm through the usual way out, with its own status.
    const auto io_thread_failed = [this](const std::string& what) { finish({exit_status::kIoThreadFailed, what}); };
    const auto plans = plan_disk_devices(options_);
    std::vector<DiskQueues> queues;
    for (const auto& plan : plans)
        queues.push_back({plan.num_queues, plan.iothreads});
    std::vector<std::vector<unsigned>> map;
    if (group.count) {
        map = map_queues(group.count, queues);
        for (unsigned k = 0; k < group.count; ++k) {
            const int cpu = group.affinity.empty() ? -1 : group.affinity[k % group.affinity.size()];
            io_threads_.push_back(std::make_unique<IoThread>(IoThreadOptions{
                "iothread" + std::to_string(k), poll, group.aio_max_batch, cpu, group.policy, io_thread_failed}));
        }
    }
    for (const auto& group : options_.throttle_groups)
        throttle_groups_.push_back(std::make_unique<ThrottleGroup>(group.name, group.limits));
    std::vector<ThrottleGroup*> throttle_of_disk;
    for (size_t d = 0; d < options_.disks.size(); ++d) {
        const DiskSpec& spec = options_.disks[d];
        const auto named = std::ranges::find(throttle_groups_, spec.throttle_group, &ThrottleGroup::name);
        if (spec.throttle_group.empty() || named == throttle_groups_.end()) {
            throttle_groups_.push_back(std::make_unique<ThrottleGroup>(std::to_string(d), spec.throttle));
            throttle_of_disk.push_back(throttle_groups_.back().get());
        } else {
            throttle_of_disk.push_back(named->get());
        }
    }
    for (size_t p = 0; p < plans.size(); ++p) {
        const DiskDevicePlan& plan = plans[p];
        std::vector<IoThread*> threads;
        if (group.count) {
            for (const unsigned k : map[p])
                threads.push_back(io_threads_[k].get());
        } else {
            io_threads_.push_back(std::make_unique<IoThread>(IoThreadOptions{
                "disk" + std::to_string(plan.disks.front()) + "-io", poll, 0, -1, group.policy, io_thread_failed}));
            threads.assign(plan.num_queues, io_threads_.back().get());
        }
        auto engine_of = [](const DiskSpec& spec) {
            return spec.engine.empty() ? default_engine_kind() : parse_engine_kind(spec.engine);
        };
        if (plan.bus == DiskBus::kBlk) {
            const DiskSpec& spec = options_.disks[plan.disks.front()];
            BlkOptions blk{spec.serial,     engine_of(spec),  spec.ioprio,       256, spec.discard,
                           throttle_of_disk[plan.disks.front()], spec.read_error, spec.write_error, this,
                           spec.detect_zeroes};
            disks_.push_back(std::make_unique<VirtioBlk>(std::move(disk_images_[plan.disks.front()]), blk, *memory_,
                                                          std::move(threads)));
        } else {
            std::vector<ScsiLunSetup> luns;
            for (const size_t d : plan.disks) {
                const DiskSpec& spec = options_.disks[d];
                scsi::ScsiDiskOptions disk;
                disk.serial = spec.serial.empty() ? "lkvm-disk" + std::to_string(d) : spec.serial;
                disk.rotation_rate = spec.rotation_rate;
                disk.discard = spec.discard ? scsi::Discard::kUnmap : scsi::Discard::kIgnore;
                disk.detect_zeroes = spec.detect_zeroes;
                luns.push_back({static_cast<uint16_t>(spec.lun), std::move(disk_images_[d]), disk, engine_of(spec),
                                spec.ioprio, throttle_of_disk[d], spec.read_error, spec.write_error, this});
            }
            disks_.push_back(std::make_unique<VirtioScsi>(std::move(luns), 256, *memory_, std::move(threads), io_));
        }
        transports_.push_back(std::make_unique<VirtioPciDevice>(*disks_.back(), *virtio_host_, plan.notify));
        const unsigned slot = pci_.add_device(*transports_.back());
        transports_.back()->use_intx(pci_intx_gsi(slot));
    }
    disk_images_.clear();
}

Machine::Machine(const RunOptions& options)
    : options_(with_log_level(options)),
      boot_(load_boot_files(options)),
      disk_images_(open_disks(options)),
      console_log_(options.console_log.empty() ? Fd() : open_console_log(options.console_log)),
      kvm_(open_usable_kvm(options)),
      vm_(kvm_),
      console_(STDIN_FILENO, STDOUT_FILENO, console_log_.get()),
      serial_([this](bool high) { vm_.set_irq_line(Serial8250::kCom1Irq, high); },
              [this](uint8_t byte) {
                  const auto event = console_.output(byte);
                  if (event == PanicWatch::Event::kPanicEnded)
                      finish({exit_status::kGuestPanic, "guest kernel panic: " + *console_.panic_message()});
              }),
      i8042_([this](GuestRequest r) { on_guest_request(r); }),
      power_([this](GuestRequest r) { on_guest_request(r); },
             [this](uint8_t status) { finish({status, ""}); }),
      pci_(layout::kPciMmioBase, layout::kPciMmioSize, layout::kPciIoBase, layout::kPciIoSize)
{
    if (options_.cpus > kvm_.max_vcpus())
        throw Error("-c " + std::to_string(options_.cpus) + ": this host's KVM runs at most " +
                    std::to_string(kvm_.max_vcpus()) + " vCPUs in one guest");
    if (options_.cpus > kMaxTableCpus)
        throw Error("-c " + std::to_string(options_.cpus) + ": lkvm runs at most " + std::to_string(kMaxTableCpus) +
                    " vCPUs in one guest (8-bit APIC IDs in its MP and ACPI tables)");

    const uint64_t ram_size = options_.mem_mib << 20;
    void* ram = ::mmap(nullptr, ram_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (ram == MAP_FAILED)
        throw sys_error("cannot map " + std::to_string(options_.mem_mib) + " MiB of guest memory");
    ram_ = Mapping(ram, ram_size);
    ::madvise(ram, ram_size, MADV_HUGEPAGE);
    const RamLayout ram_split = ram_layout(ram_size);
    std::vector<MemoryRegion> regions = {{0, ram_split.low_size, ram_.data()}};
    vm_.add_memory(0, 0, ram_split.low_size, ram_.data());
    if (ram_split.high_size) {
        regions.push_back({layout::k4GiB, ram_split.high_size, ram_.data() + ram_split.low_size});
        vm_.add_memory(1, layout::k4GiB, ram_split.high_size, ram_.data() + ram_split.low_size);
    }
    memory_ = std::make_unique<GuestMemory>(std::move(regions));

    pio_.add(Serial8250::kCom1Base, 8, serial_);
    pio_.add(I8042::kDataPort, I8042::kSpan, i8042_);
    pio_.add(PowerControl::kBase, PowerControl::kSpan, power_);
    pio_.add(CmosRtc::kIndexPort, CmosRtc::kSpan, rtc_);
    pio_.add(PciHostBridge::kConfigAddressPort, PciHostBridge::kPortSpan, pci_);
    add_disks();

    // vCPUs, each with its own APIC ID in CPUID.
    const auto supported = kvm_.supported_cpuid();
    PlatformInfo platform{options_.cpus, 0, 0};
    for (const auto& e : supported)
        if (e.function == 1) {
            platform.cpu_signature = e.eax;
            platform.cpu_features = e.edx;
        }
    const bool tsc_deadline = kvm_.check_extension(KVM_CAP_TSC_DEADLINE_TIMER) > 0;
    for (unsigned i = 0; i < options_.cpus; ++i) {
        auto vcpu = std::make_unique<Vcpu>(kvm_, vm_, i);
        vcpu->set_cpuid(cpuid_for_vcpu(supported, {i, options_.cpus, tsc_deadline}));
        vcpu->init_local_apic();
        vcpus_.push_back(std::move(vcpu));
    }
    open_vcpu_stats();

    // Firmware tables, then the kernel, its command line and initrd.
    const auto mp = build_mp_tables(layout::kMpTables, platform);
    const auto acpi = build_acpi_tables(layout::kAcpiTables, platform);
    if (mp.size() > layout::kMpTablesEnd - layout::kMpTables || acpi.bytes.size() > layout::kAcpiTablesEnd - layout::kAcpiTables)
        throw Error("firmware tables for " + std::to_string(options_.cpus) + " vCPUs do not fit below 1 MiB");
    memory_->write(layout::kMpTables, mp.data(), mp.size());
    memory_->write(layout::kAcpiTables, acpi.bytes.data(), acpi.bytes.size());
    const auto reset_stub = reset_vector_stub();
    memory_->write(layout::kResetVector, reset_stub.data(), reset_stub.size());
    memory_->write(boot_.initrd_addr, boot_.initrd.data(), boot_.initrd.size());
    load_linux(*memory_, boot_.image, boot_.cmdline, ram_size, {boot_.initrd_addr, boot_.initrd.size(), acpi.rsdp});
    vcpus_[0]->enter_long_mode(entry_point_64(), layout::kBootParams, layout::kBootStack);
}

Machine::~Machine()
{
    stop_vcpus();
    console_.restore();
}

void Machine::finish(Outcome outcome)
{
    {
        std::lock_guard lock(outcome_mutex_);
        if (outcome_)
            return;  // the first reason to stop is the one reported
        outcome_ = std::move(outcome);
    }
    // The vCPU that ended the guest (exit status, power-off) must not run it
    // on: what it printed next would follow the guest's last line. The others
    // are kicked out when the main loop stops them.
    ended_.store(true, std::memory_order_release);
    io_.stop();
}

void Machine::on_guest_request(GuestRequest request)
{
    // panic=-1 reboots right after the banner: that reboot is the panic, not a clean exit.
    if (auto panic = console_.panic_message())
        return finish({exit_status::kGuestPanic, "guest kernel panic: " + *panic});
    (void)request;  // reboot and power-off both end lkvm cleanly
    finish({exit_status::kOk, ""});
}

void Machine::handle_io(kvm_run* run)
{
    auto* base = reinterpret_cast<uint8_t*>(run) + run->io.data_offset;
    console_activity_.port_io(run->io.port);
    for (uint32_t i = 0; i < run->io.count; ++i) {
        std::span<uint8_t> data(base + i * run->io.size, run->io.size);
        if (run->io.direction == KVM_EXIT_IO_OUT)
            pio_.write(run->io.port, data);
        else
            pio_.read(run->io.port, data);
    }
}

void Machine::handle_mmio(kvm_run* run)
{
    const uint32_t len = std::min<uint32_t>(run->mmio.len, sizeof(run->mmio.data));
    std::span<uint8_t> data(run->mmio.data, len);
    if (run->mmio.is_write)
        mmio_.write(run->mmio.phys_addr, data);
    else
        mmio_.read(run->mmio.phys_addr, data);
}

void Machine::vcpu_loop(Vcpu& vcpu)
{
    char name[16];
    std::snprintf(name, sizeof(name), "kvm-vcpu-%u", vcpu.index());
    ::pthread_setname_np(::pthread_self(), name);
    kvm_run* run = vcpu.run();
    const std::string who = "vCPU " + std::to_string(vcpu.index());
    auto fault = [&](const std::string& what) {
        finish({exit_status::kVcpuFault, who + ": " + what + " at " + vcpu.describe()});
    };
    while (!vcpu_gate_.stopping() && !ended_.load(std::memory_order_acquire)) {
        if (vcpu_gate_.held(vcpu.index())) {
            // The kick that paused us left immediate_exit set: cleared when we may run again.
            vcpu_gate_.park(vcpu.index(), [run] { run->immediate_exit = 0; });
            continue;
        }
        if (::ioctl(vcpu.fd(), KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            fault(std::string("KVM_RUN failed: ") + std::strerror(errno));
            return;
        }
        switch (run->exit_reason) {
        case KVM_EXIT_IO:
            handle_io(run);
            break;
        case KVM_EXIT_MMIO:
            handle_mmio(run);
            break;
        case KVM_EXIT_INTR:
        case KVM_EXIT_HLT:
            break;
        case KVM_EXIT_DEBUG:
            if (!debugger_) {
                fault("debug exit without a debugger");
                return;
            }
            debugger_->on_debug_exit(vcpu.index(), run->debug.arch);
            break;
        case KVM_EXIT_SHUTDOWN:
            fault("triple fault (KVM_EXIT_SHUTDOWN)");
            return;
        case KVM_EXIT_SYSTEM_EVENT:
            if (run->system_event.type == KVM_SYSTEM_EVENT_CRASH)
                finish({exit_status::kGuestPanic, "guest reported a crash (KVM_SYSTEM_EVENT_CRASH)"});
            else
                on_guest_request(run->system_event.type == KVM_SYSTEM_EVENT_RESET ? GuestRequest::kReset
                                                                                   : GuestRequest::kPowerOff);
            return;
        case KVM_EXIT_FAIL_ENTRY:
            fault("VM entry failed (hardware reason " +
                  std::to_string(run->fail_entry.hardware_entry_failure_reason) + ")");
            return;
        case KVM_EXIT_INTERNAL_ERROR:
            fault("KVM internal error (suberror " + std::to_string(run->internal.suberror) + ")");
            return;
        default:
            fault("unexpected exit reason " + std::to_string(run->exit_reason));
            return;
        }
    }
}

void Machine::start_gdb()
{
    debugger_ = std::make_unique<VmDebugger>(
        kvm_, vcpus_, vcpu_gate_, *memory_, [this] { boost::asio::post(io_, [this] { gdb_->vm_stopped(); }); },
        [this] { finish({exit_status::kOk, "ended by gdb (kill)", LogLevel::kInfo}); });
    gdb_.emplace(io_, options_.gdb_host, options_.gdb_port, *debugger_);
    const std::string where = options_.gdb_host + ":" + std::to_string(gdb_->port());
    if (options_.gdb_wait) {
        vcpu_gate_.debug_stop();  // before the vCPU threads start: they park at their first instruction
        log_info("waiting for gdb on " + where + " (gdb -ex 'target remote " + where + "')");
    } else {
        log_info("gdb stub on " + where);
    }
}

void Machine::warn_if_console_silent()
{
    // Under gdb the guest stands still whenever the debugger says so.
    if (console_activity_.used() || options_.gdb_port || ended_.load(std::memory_order_acquire))
        return;
    // A vCPU's registers can be read only while it is out of KVM_RUN.
    const bool was_paused = vcpu_gate_.paused();
    vcpu_gate_.pause();
    std::vector<std::string> states;
    for (const auto& vcpu : vcpus_)
        states.push_back(vcpu->describe());
    if (!was_paused)
        vcpu_gate_.resume();
    log_warn(silent_console_warning(options_.boot_timeout_s, states));
}

void Machine::kick_vcpus()
{
    // immediate_exit makes a KVM_RUN that is about to start return at once;
    // the signal kicks one that is already in the guest.
    for (size_t i = 0; i < vcpu_threads_.size(); ++i) {
        vcpus_[i]->run()->immediate_exit = 1;
        if (vcpu_threads_[i].joinable())
            ::pthread_kill(vcpu_threads_[i].native_handle(), SIGUSR1);
    }
}

void Machine::stop_vcpus()
{
    vcpu_gate_.stop();
    for (auto& t : vcpu_threads_)
        if (t.joinable())
            t.join();
    vcpu_threads_.clear();
}

void Machine::watch(std::function<void(const MachineEvent&)> watcher) { watcher_ = std::move(watcher); }

void Machine::report(MachineEvent event)
{
    if (watcher_)
        watcher_(event);
}

void Machine::pause()
{
    const bool was_paused = vcpu_gate_.paused();
    vcpu_gate_.pause();
    if (!was_paused)
        report({MachineEvent::Kind::kPaused, io_error_.empty() ? "" : "io-error"});
}

void Machine::resume()
{
    if (!io_error_.empty()) {
        // Posted to the I/O threads before the vCPUs run: the guest sees its
        // requests answered as if the disk had never failed them.
        io_error_.clear();
        for (auto& disk : disks_)
            disk->retry_failed();
    }
    const bool was_paused = vcpu_gate_.paused();
    vcpu_gate_.resume();
    if (was_paused)
        report({MachineEvent::Kind::kResumed, ""});
}

std::string Machine::state() const
{
    if (vcpu_gate_.debug_stopped())
        return "stopped by gdb";
    if (!vcpu_gate_.paused())
        return "running";
    return io_error_.empty() ? "paused" : "paused (io-error: " + io_error_ + ")";
}

void Machine::stop_for_io_error(const std::string& why)
{
    boost::asio::post(io_, [this, why] { pause_for_io_error(why); });
}

void Machine::pause_for_io_error(const std::string& why)
{
    const bool first = io_error_.empty();
    if (first)
        log_warn(why + "; the guest is paused (werror/rerror): fix the disk (free space), then 'lkvm resume " +
                 name() + "' retries it");
    io_error_ = why;
    if (first)
        report({MachineEvent::Kind::kIoError, why});
    pause();
}

void Machine::request_stop()
{
    finish({exit_status::kOk, "stopped by lkvm stop", LogLevel::kInfo});
}

std::string Machine::name() const
{
    return options_.name.empty() ? "guest-" + std::to_string(::getpid()) : options_.name;
}

void Machine::open_vcpu_stats()
{
    // All vCPUs or none: exits per request must count every vCPU's exits.
    std::string why_not = "this kernel has no KVM_CAP_BINARY_STATS_FD (Linux 5.14+)";
    if (kvm_.check_extension(KVM_CAP_BINARY_STATS_FD) > 0) {
        for (const auto& vcpu : vcpus_) {
            auto stats = VcpuStats::open(vcpu->fd(), why_not);
            if (!stats)
                break;
            vcpu_stats_.push_back(std::move(*stats));
        }
    }
    if (vcpu_stats_.size() != vcpus_.size()) {
        vcpu_stats_.clear();
        log_info("no vCPU exit counters in the statistics: " + why_not);
    }
}

std::vector<StatSnapshot::Vcpu> Machine::sample_vcpus() const
{
    std::vector<StatSnapshot::Vcpu> vcpus;
    for (size_t i = 0; i < vcpu_stats_.size(); ++i)
        vcpus.push_back({vcpus_[i]->index(), vcpu_stats_[i].sample()});
    return vcpus;
}

StatSnapshot Machine::sample_io_stats() const
{
    StatSnapshot snapshot = lkvm::sample_io_stats(io_threads_, disks_);
    snapshot.vcpus = sample_vcpus();
    if (const std::string now = state(); now != "running")
        snapshot.state = now;
    return snapshot;
}

std::string Machine::set_throttle(const std::string& target, const ThrottleLimits& limits)
{
    // A group's name first; then a disk, by its index or image, which names the
    // group it is in (its own, or a --throttle-group: as QEMU, that one changes).
    std::string group_name = target;
    const auto by_name = [&](const std::string& name) {
        return std::ranges::find_if(throttle_groups_, [&](const auto& g) { return g->name() == name; });
    };
    auto group = std::ranges::find_if(options_.throttle_groups, [&](const auto& g) { return g.name == target; }) !=
                         options_.throttle_groups.end()
                     ? by_name(target)
                     : throttle_groups_.end();
    if (group == throttle_groups_.end()) {
        for (size_t d = 0; d < options_.disks.size(); ++d) {
            if (target != std::to_string(d) && target != options_.disks[d].path)
                continue;
            const std::string& named = options_.disks[d].throttle_group;
            group = by_name(named.empty() ? std::to_string(d) : named);
            break;
        }
    }
    if (group == throttle_groups_.end())
        throw Error("throttle: no disk or throttle group '" + target + "' (disks: their number in lkvm stat, or image)");
    (*group)->set_limits(limits);
    log_info("throttle group " + (*group)->name() + ": new limits from the control socket");
    return (*group)->name();
}

GuestInfo Machine::info() const
{
    GuestInfo info{.name = name(), .state = state(), .pid = ::getpid(), .vcpus = options_.cpus, .mem_mib = options_.mem_mib, .disks = {}};
    for (const auto& disk : options_.disks)
        info.disks.push_back(disk.path);
    return info;
}

void Machine::start_input()
{
    // A separate open file description, so that the non-blocking mode Asio
    // sets on it does not leak into stdout, which may share the terminal's.
    int fd = ::open("/proc/self/fd/0", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    boost::system::error_code ec;
    input_.emplace(io_);
    input_->assign(fd, ec);
    if (ec) {  // a regular file or /dev/null cannot be waited on: the guest gets no input
        ::close(fd);
        input_.reset();
        return;
    }
    read_input();
}

void Machine::read_input()
{
    input_->async_read_some(boost::asio::buffer(input_buffer_), [this](const boost::system::error_code& error, size_t n) {
        if (error)
            return;  // EOF or error: no more input, the guest keeps running
        const auto result = escape_.feed(std::span(input_buffer_.data(), n));
        if (!result.to_guest.empty())
            serial_.receive(std::span(reinterpret_cast<const uint8_t*>(result.to_guest.data()), result.to_guest.size()));
        if (result.quit)
            return finish({exit_status::kOk, ""});
        read_input();
    });
}

int Machine::run()
{
    struct sigaction kick {};
    kick.sa_handler = empty_signal_handler;  // no SA_RESTART: KVM_RUN must return EINTR
    sigemptyset(&kick.sa_mask);
    ::sigaction(SIGUSR1, &kick, nullptr);

    boost::asio::signal_set signals(io_, SIGINT, SIGTERM, SIGHUP);
    signals.async_wait([this](const boost::system::error_code& error, int signal) {
        if (!error)
            finish({128 + signal, std::string("stopped by signal ") + ::strsignal(signal), LogLevel::kInfo});
    });
    boost::asio::steady_timer timeout(io_);
    if (options_.timeout_s) {
        timeout.expires_after(std::chrono::seconds(options_.timeout_s));
        timeout.async_wait([this](const boost::system::error_code& error) {
            if (!error)
                finish({exit_status::kTimeout,
                        "guest still running after " + std::to_string(options_.timeout_s) + " s (--timeout): stopped",
                        LogLevel::kWarn});
        });
    }
    boost::asio::steady_timer boot_timeout(io_);
    if (options_.boot_timeout_s) {
        boot_timeout.expires_after(std::chrono::seconds(options_.boot_timeout_s));
        boot_timeout.async_wait([this](const boost::system::error_code& error) {
            if (!error)
                warn_if_console_silent();
        });
    }
    start_input();
    if (options_.gdb_port)
        start_gdb();

    vcpu_gate_.set_threads(static_cast<unsigned>(vcpus_.size()));
    for (auto& vcpu : vcpus_)
        vcpu_threads_.emplace_back([this, v = vcpu.get()] {
            vcpu_loop(*v);
            vcpu_gate_.leave();
        });

    io_.run();
    {
        std::lock_guard lock(outcome_mutex_);
        if (!outcome_)
            outcome_ = Outcome{exit_status::kOk, ""};
    }
    report({MachineEvent::Kind::kShutdown, outcome_->message, outcome_->status});
    gdb_.reset();
    stop_vcpus();
    console_.restore();

    std::lock_guard lock(outcome_mutex_);
    if (!outcome_->message.empty())
        log_at(outcome_->level, outcome_->message);
    if (outcome_->status > 128 || outcome_->status == exit_status::kTimeout) {
        // Stopped from outside: say where the guest was, for whoever is debugging a hang.
        for (const auto& vcpu : vcpus_)
            log_info("vCPU " + std::to_string(vcpu->index()) + " was at " + vcpu->describe());
    }
    return outcome_->status;
}

}  // namespace lkvm
