// blkbench: 4k random I/O against virtio-blk or virtio-scsi (--device), either
// through the whole device stack (--mode device: the test guest driver, the
// transport, the device and its I/O threads) or against the same engine on the
// same file directly (--mode engine: the limit). Last line: IOPS=... p50_us=... p99_us=...
// cpu_us_per_req=... (the CPU the I/O threads, or the engine threads, spent per request).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "base/error.h"
#include "disk/disk_image.h"
#include "disk/io_engine.h"
#include "kvm/machine_config.h"
#include "tests/device/driver.h"
#include "virtio/blk.h"
#include "virtio/io_thread.h"
#include "virtio/queue_mapping.h"
#include "virtio/scsi.h"

using namespace lkvm;
using Clock = std::chrono::steady_clock;

namespace {
struct Options {
    std::string engine = "native", rw = "randread", mode = "device", device = "blk", file = "/tmp/blkbench.raw";
    unsigned queues = 1, qd = 64;
    unsigned iothreads = 0;  // device mode: 0 is a dedicated thread; engine mode: threads each with an engine
    uint64_t poll_max_ns = 32768;
    // Device mode: the driver threads stand in for vCPUs, and poll the used
    // ring up to N ns before they sleep on the interrupt, as KVM's halt
    // polling does a vCPU (its default, 200 us; 0: sleep at once). They give
    // way when more tasks are runnable than the host has CPUs, as KVM's does
    // (without that, measured here on 2 CPUs, the spinning drivers took the
    // I/O threads' CPU: 2 queues fell to 0.3 of the engine).
    uint64_t halt_poll_ns = 200'000;
    unsigned max_batch = 0;
    IoThreadPolicy sched = IoThreadPolicy::kBatch;
    uint32_t bs = 4096;
    double seconds = 5;
    bool direct = false;
    // io_uring: IORING_SETUP_* flags asked for, and whether memory is
    // registered as fixed buffers (the device registers it for direct disks;
    // the engine mode for direct files, or always with --fixed-buffers on).
    unsigned uring_setup = default_uring_setup_flags();
    int fixed_buffers = -1;  // -1: as lkvm does
    ThrottleLimits limits;   // --limits iops=500,...: the device's (its queues share them)
};

IoThreadPolicy parse_sched(const std::string& name)
{
    for (const auto policy : {IoThreadPolicy::kBatch, IoThreadPolicy::kOther, IoThreadPolicy::kIdle})
        if (name == io_thread_policy_name(policy))
            return policy;
    throw Error("--sched batch|other|idle");
}

Options parse(int argc, char** argv)
{
    Options o;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&]() -> std::string {
            if (i + 1 >= argc)
                throw Error(a + " needs a value");
            return argv[++i];
        };
        if (a == "--engine") o.engine = next();
        else if (a == "--queues") o.queues = static_cast<unsigned>(std::stoul(next()));
        else if (a == "--qd") o.qd = static_cast<unsigned>(std::stoul(next()));
        else if (a == "--bs") { auto v = next(); o.bs = static_cast<uint32_t>(std::stoul(v)) * (v.back() == 'k' ? 1024 : 1); }
        else if (a == "--rw") o.rw = next();
        else if (a == "--seconds") o.seconds = std::stod(next());
        else if (a == "--file") o.file = next();
        else if (a == "--direct") o.direct = true;
        else if (a == "--mode") o.mode = next();
        else if (a == "--device") o.device = next();
        else if (a == "--iothreads") o.iothreads = static_cast<unsigned>(std::stoul(next()));
        else if (a == "--poll-max-ns") o.poll_max_ns = std::stoull(next());
        else if (a == "--halt-poll-ns") o.halt_poll_ns = std::stoull(next());
        else if (a == "--aio-max-batch") o.max_batch = static_cast<unsigned>(std::stoul(next()));
        else if (a == "--sched") o.sched = parse_sched(next());
        else if (a == "--uring-setup") o.uring_setup = static_cast<unsigned>(std::stoul(next(), nullptr, 0));
        else if (a == "--limits") o.limits = parse_throttle_limits("--limits", next());
        else if (a == "--fixed-buffers") { auto v = next(); o.fixed_buffers = v == "on" ? 1 : v == "off" ? 0 : throw Error("--fixed-buffers on|off"); }
        else throw Error("unknown option " + a + " (--engine --queues --qd --bs --rw --seconds --file --direct --mode"
                         " --device --iothreads --poll-max-ns --halt-poll-ns --aio-max-batch --sched --uring-setup --fixed-buffers --limits)");
    }
    if (o.rw != "randread" && o.rw != "randwrite")
        throw Error("--rw randread|randwrite");
    if (o.mode != "device" && o.mode != "engine")
        throw Error("--mode device|engine");
    if (o.device != "blk" && o.device != "scsi")
        throw Error("--device blk|scsi");
    if (o.qd == 0 || o.qd > 80 || o.queues == 0 || o.queues > 8 || o.iothreads > 8 || o.bs % 512 || o.bs > 65536)
        throw Error("--qd 1-80, --queues 1-8, --iothreads 0-8, --bs a multiple of 512 up to 64k");
    return o;
}

struct Stats {
    uint64_t done = 0;
    double io_cpu_seconds = 0;  // of the threads doing the I/O (the engine's, or the device's I/O threads)
    static constexpr size_t kMaxSamples = 4'000'000;
    std::vector<double> latencies_us;
    // Before the clock starts: the samples' memory allocated and touched, so
    // that a run pays no page faults or reallocations for its own records.
    void prepare()
    {
        latencies_us.resize(kMaxSamples);
        latencies_us.clear();
    }
    void add(Clock::time_point start, Clock::time_point end)
    {
        ++done;
        if (latencies_us.size() < kMaxSamples)
            latencies_us.push_back(std::chrono::duration<double, std::micro>(end - start).count());
    }
    void merge(const Stats& other)
    {
        done += other.done;
        io_cpu_seconds += other.io_cpu_seconds;
        latencies_us.insert(latencies_us.end(), other.latencies_us.begin(), other.latencies_us.end());
    }
    void print(double seconds)
    {
        std::sort(latencies_us.begin(), latencies_us.end());
        auto pct = [&](double p) { return latencies_us.empty() ? 0.0 : latencies_us[static_cast<size_t>(p * (latencies_us.size() - 1))]; };
        std::printf("IOPS=%.0f p50_us=%.1f p99_us=%.1f cpu_us_per_req=%.3f\n", done / seconds, pct(0.50), pct(0.99),
                    done ? 1e6 * io_cpu_seconds / static_cast<double>(done) : 0.0);
    }
};

// CPU time a thread of this process has run so far, to the nanosecond
// (schedstat's first field; /proc's stat counts only clock ticks).
double cpu_seconds(pid_t tid)
{
    std::FILE* f = std::fopen(("/proc/self/task/" + std::to_string(tid) + "/schedstat").c_str(), "r");
    if (!f)
        return 0;
    unsigned long long ns = 0;
    if (std::fscanf(f, "%llu", &ns) != 1)
        ns = 0;
    std::fclose(f);
    return static_cast<double>(ns) / 1e9;
}

// Engines as --uring-setup and --fixed-buffers say.
std::unique_ptr<IoEngine> make_engine(const Options& o, EngineKind kind, size_t capacity)
{
    if (kind != EngineKind::kIoUring)
        return make_io_engine(kind, capacity);
    return make_uring_engine(capacity, o.uring_setup, o.fixed_buffers < 0 ? default_uring_fixed_buffers() : o.fixed_buffers);
}

// One engine driven at --qd on the file from the calling thread.
double run_engine_thread(const Options& o, DiskImage& image, Stats& stats, unsigned seed)
{
    auto engine = make_engine(o, parse_engine_kind(o.engine), o.qd);
    engine->register_file(image.fd());
    std::mt19937_64 rng(seed);
    stats.prepare();
    const uint64_t blocks = image.size() / o.bs;
    void* raw = nullptr;
    if (::posix_memalign(&raw, 4096, size_t{o.qd} * o.bs) != 0)
        throw Error("out of memory");
    std::unique_ptr<uint8_t, void (*)(void*)> buffers(static_cast<uint8_t*>(raw), ::free);
    if (o.fixed_buffers > 0 || (o.fixed_buffers < 0 && o.direct)) {
        const iovec area{buffers.get(), size_t{o.qd} * o.bs};
        engine->register_memory(std::span(&area, 1));
    }
    std::vector<iovec> iov(o.qd);
    std::vector<Clock::time_point> started(o.qd);
    const IoOp op = o.rw == "randread" ? IoOp::kRead : IoOp::kWrite;
    auto request = [&](unsigned slot) {
        iov[slot] = {buffers.get() + size_t{slot} * o.bs, o.bs};
        started[slot] = Clock::now();
        return IoRequest{op, image.fd(), (rng() % blocks) * o.bs, &iov[slot], 1, slot};
    };
    std::vector<IoRequest> batch;
    for (unsigned s = 0; s < o.qd; ++s)
        batch.push_back(request(s));
    const auto begin = Clock::now();
    const auto end = begin + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.seconds));
    const double cpu_begin = cpu_seconds(::gettid());
    engine->submit(batch);
    std::vector<IoCompletion> done;
    while (Clock::now() < end) {
        engine->wait_for_completions(100);
        done.clear();
        engine->reap(done);
        batch.clear();
        const auto now = Clock::now();
        for (const auto& c : done) {
            stats.add(started[c.cookie], now);
            batch.push_back(request(static_cast<unsigned>(c.cookie)));
        }
        engine->submit(batch);
    }
    const double elapsed = std::chrono::duration<double>(Clock::now() - begin).count();
    stats.io_cpu_seconds = cpu_seconds(::gettid()) - cpu_begin;
    while (engine->in_flight()) {
        engine->wait_for_completions(100);
        done.clear();
        engine->reap(done);
    }
    return elapsed;
}

// The limit: max(1, --iothreads) threads, each its own engine at --qd.
double run_engine(const Options& o, DiskImage& image, Stats& stats)
{
    const unsigned threads = std::max(1u, o.iothreads);
    std::vector<Stats> per(threads);
    std::vector<double> elapsed(threads);
    std::vector<std::thread> workers;
    std::vector<std::exception_ptr> errors(threads);
    for (unsigned t = 0; t < threads; ++t)
        workers.emplace_back([&, t] {
            try {
                elapsed[t] = run_engine_thread(o, image, per[t], 42 + t);
            } catch (...) {
                errors[t] = std::current_exception();
            }
        });
    for (auto& w : workers)
        w.join();
    for (unsigned t = 0; t < threads; ++t) {
        if (errors[t])
            std::rethrow_exception(errors[t]);
        stats.merge(per[t]);
    }
    return *std::max_element(elapsed.begin(), elapsed.end());
}

// The whole stack: one driver thread per queue (the guest's vCPUs), the
// queues served by a dedicated I/O thread or a group of --iothreads.
double run_device(const Options& o, DiskImage image, Stats& stats)
{
    test::GuestDriver driver;
    const PollParams poll{o.poll_max_ns, 0, 0};
    std::vector<std::unique_ptr<IoThread>> threads;
    std::vector<IoThread*> queue_threads;
    const EngineFactory factory = [&o](EngineKind kind, size_t capacity) { return make_engine(o, kind, capacity); };
    if (o.iothreads == 0) {
        threads.push_back(
            std::make_unique<IoThread>(IoThreadOptions{"disk0-io", poll, o.max_batch, -1, o.sched, {}, factory}));
        queue_threads.assign(o.queues, threads.back().get());
    } else {
        for (unsigned k = 0; k < o.iothreads; ++k)
            threads.push_back(std::make_unique<IoThread>(
                IoThreadOptions{"iothread" + std::to_string(k), poll, o.max_batch, -1, o.sched, {}, factory}));
        const auto map = map_queues(o.iothreads, {{o.queues, {}}});
        for (const unsigned k : map[0])
            queue_threads.push_back(threads[k].get());
    }
    // virtio-scsi's request queues come after its control and event queues;
    // its control loop is a thread of its own here, as lkvm's main loop is.
    const bool scsi = o.device == "scsi";
    const uint64_t blocks = image.size() / o.bs;
    const EngineKind engine = parse_engine_kind(o.engine);
    ThrottleGroup throttle("bench", o.limits);
    std::unique_ptr<IoThread> control_loop;
    std::unique_ptr<DiskDevice> device;
    if (scsi) {
        control_loop = std::make_unique<IoThread>(IoThreadOptions{"main-loop", {}, 0, -1});
        std::vector<ScsiLunSetup> luns;
        luns.push_back({0, std::move(image), {"bench", 1, scsi::Discard::kUnmap}, engine, 0, &throttle});
        device = std::make_unique<VirtioScsi>(std::move(luns), 256, driver.memory(), queue_threads,
                                              control_loop->context());
    } else {
        device = std::make_unique<VirtioBlk>(std::move(image), BlkOptions{"bench", engine, 0, 256, true, &throttle}, driver.memory(),
                                             queue_threads);
    }
    const unsigned first_queue = scsi ? 2 : 0;
    VirtioPciDevice transport(*device, driver.host_interface());
    driver.probe(transport, ~0ull, first_queue + o.queues);
    const bool reads = o.rw == "randread";
    // Slot (q, i): request and response in a small area, data packed like the
    // engine mode's buffers (so both touch as much memory), descriptors 3i..3i+2.
    auto slot = [&](unsigned q, unsigned i) { return uint64_t{q} * 80 + i; };
    auto header = [&](unsigned q, unsigned i) { return test::GuestDriver::kDataArea + slot(q, i) * 256; };
    auto data = [&](unsigned q, unsigned i) { return test::GuestDriver::kDataArea + (1 << 20) + slot(q, i) * o.bs; };
    // Writes the request for a random block; returns the chain's buffers.
    // (A fixed array: the guest side allocates nothing per request either.)
    auto frame = [&](unsigned q, unsigned i, std::mt19937_64& rng) -> std::array<test::Buffer, 3> {
        const uint64_t block = rng() % blocks;
        if (scsi) {
            // virtio_scsi_cmd_req with READ(16)/WRITE(16), then virtio_scsi_cmd_resp.
            uint8_t request[51] = {1, 0, 0x40, 0};
            uint8_t* cdb = request + 19;
            const uint64_t lba = block * (o.bs / 512);
            const uint32_t count = o.bs / 512;
            cdb[0] = reads ? 0x88 : 0x8a;
            for (int b = 0; b < 8; ++b)
                cdb[2 + b] = static_cast<uint8_t>(lba >> (56 - 8 * b));
            for (int b = 0; b < 4; ++b)
                cdb[10 + b] = static_cast<uint8_t>(count >> (24 - 8 * b));
            std::memcpy(driver.host(header(q, i)), request, sizeof(request));
            if (reads)
                return {{{header(q, i), 51, false}, {header(q, i) + 64, 108, true}, {data(q, i), o.bs, true}}};
            return {{{header(q, i), 51, false}, {data(q, i), o.bs, false}, {header(q, i) + 64, 108, true}}};
        }
        uint8_t request[16] = {};
        const uint32_t type = reads ? kBlkTIn : kBlkTOut;
        const uint64_t sector = block * (o.bs / 512);
        std::memcpy(request, &type, 4);
        std::memcpy(request + 8, &sector, 8);
        std::memcpy(driver.host(header(q, i)), request, 16);
        return {{{header(q, i), 16, false}, {data(q, i), o.bs, reads}, {header(q, i) + 16, 1, true}}};
    };
    std::vector<Stats> per(o.queues);
    std::vector<double> elapsed(o.queues);
    std::vector<double> driver_cpu(o.queues);
    auto drive = [&](unsigned q) {
        std::mt19937_64 rng(42 + q);
        per[q].prepare();
        std::vector<Clock::time_point> started(o.qd);
        // `now`: when the request goes; a completion's is the clock read that saw it.
        auto submit = [&](unsigned i, Clock::time_point now) {
            started[i] = now;
            driver.add_chain_at(first_queue + q, static_cast<uint16_t>(3 * i), frame(q, i, rng));
        };
        for (unsigned i = 0; i < o.qd; ++i)
            submit(i, Clock::now());
        driver.kick(first_queue + q);
        const auto begin = Clock::now();
        const auto end = begin + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(o.seconds));
        test::HaltPolling halt{o.halt_poll_ns};
        std::vector<std::pair<uint32_t, uint32_t>> used;
        while (Clock::now() < end) {
            driver.wait_used(first_queue + q, 1, 100, halt, used);
            const auto now = Clock::now();
            for (const auto& [head, len] : used) {
                per[q].add(started[head / 3], now);
                submit(head / 3, now);
            }
            // As Linux's virtqueue_kick_prepare(): only when the device asked for one.
            if (!used.empty())
                driver.kick_if_needed(first_queue + q);
        }
        elapsed[q] = std::chrono::duration<double>(Clock::now() - begin).count();
        driver_cpu[q] = cpu_seconds(::gettid());
    };
    auto io_cpu = [&] {
        double total = 0;
        for (const auto& t : threads)
            total += cpu_seconds(t->tid());
        return total;
    };
    const double io_cpu_begin = io_cpu();
    std::vector<std::thread> drivers;
    for (unsigned q = 0; q < o.queues; ++q)
        drivers.emplace_back(drive, q);
    for (auto& d : drivers)
        d.join();
    for (auto& p : per)
        stats.merge(p);
    stats.io_cpu_seconds = io_cpu() - io_cpu_begin;
    // Where the CPU time went, as a share of the run.
    const double seconds = *std::max_element(elapsed.begin(), elapsed.end());
    std::string cpu = "cpu:";
    for (const auto& t : threads) {
        // Its CPU share, requests per engine submission, and how often polling found the work.
        const ThreadStats& st = t->stats();
        const double batches = static_cast<double>(std::max<uint64_t>(st.batches.load(), 1));
        const double wakes = static_cast<double>(st.wakeups.load() + st.poll_hits.load());
        char line[160];
        std::snprintf(line, sizeof(line), " %s=%d%%(%.1f/batch,%d%%polled)", t->name().c_str(),
                      static_cast<int>(100 * cpu_seconds(t->tid()) / seconds),
                      static_cast<double>(st.io.counters().requests) / batches,
                      static_cast<int>(wakes > 0 ? 100 * static_cast<double>(st.poll_hits.load()) / wakes : 0));
        cpu += line;
    }
    double driver_total = 0;
    for (const double c : driver_cpu)
        driver_total += c;
    cpu += " driver=" + std::to_string(static_cast<int>(100 * driver_total / seconds)) + "%";
    std::printf("%s\n", cpu.c_str());
    // Each queue's own rate: whether queues sharing limits got even shares.
    std::string queue_iops = "queue_iops=";
    for (unsigned q = 0; q < o.queues; ++q)
        queue_iops += (q ? "," : "") + std::to_string(static_cast<uint64_t>(static_cast<double>(per[q].done) / elapsed[q]));
    std::printf("%s\n", queue_iops.c_str());
    return seconds;
}
}  // namespace

int main(int argc, char** argv)
{
    try {
        const Options o = parse(argc, argv);
        if (::access(o.file.c_str(), F_OK) != 0) {
            // 256 MiB of real (not sparse) data, so reads reach the disk.
            const int fd = ::open(o.file.c_str(), O_CREAT | O_WRONLY, 0644);
            std::vector<uint8_t> chunk(1 << 20, 0x5a);
            for (int i = 0; i < 256; ++i)
                if (::write(fd, chunk.data(), chunk.size()) < 0)
                    throw sys_error("writing " + o.file);
            ::close(fd);
        }
        DiskImage image = DiskImage::open({o.file, false, o.direct ? CacheMode::kNone : CacheMode::kWriteback});
        if (o.engine == "io_uring")
            std::printf("io_uring: setup flags 0x%x (asked 0x%x, kernel takes 0x%x), fixed buffers %s\n",
                        o.uring_setup & uring_setup_flags_supported(), o.uring_setup, uring_setup_flags_supported(),
                        o.fixed_buffers < 0 ? (default_uring_fixed_buffers() ? "default (on)" : "default (off)")
                                            : o.fixed_buffers ? "on" : "off");
        Stats stats;
        const double elapsed = o.mode == "engine" ? run_engine(o, image, stats) : run_device(o, std::move(image), stats);
        stats.print(elapsed);
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "blkbench: %s\n", e.what());
        return 1;
    }
}
