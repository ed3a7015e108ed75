#include "virtio/io_thread.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <boost/asio/post.hpp>
#include <algorithm>
#include <chrono>
#include <cstring>
#include <exception>
#include <future>

#include "base/log.h"

namespace lkvm {

namespace {
// Requests each engine may hold at once; more wait in the thread's backlog.
constexpr size_t kEngineCapacity = 1024;
// Busy rounds between two runs of Asio's reactor (see loop()).
constexpr unsigned kReactorEvery = 64;
}  // namespace

uint64_t monotonic_ns()
{
    return static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
}

uint64_t next_poll_ns(uint64_t poll_ns, uint64_t block_ns, const PollParams& params)
{
    if (params.max_ns == 0)
        return 0;
    if (block_ns <= poll_ns)
        return poll_ns;  // polling caught it: the sweet spot
    if (block_ns > params.max_ns)
        return params.shrink ? poll_ns / params.shrink : 0;  // no poll time we allow would have
    if (poll_ns < params.max_ns) {
        const uint64_t grown = poll_ns ? poll_ns * (params.grow ? params.grow : 2) : kPollStartNs;
        return std::min(grown, params.max_ns);
    }
    return poll_ns;
}

namespace {
void apply_policy(const std::string& thread, IoThreadPolicy policy)
{
    if (policy == IoThreadPolicy::kOther)
        return;
    const sched_param param{};  // priority 0: the only one these policies take
    const int native = policy == IoThreadPolicy::kBatch ? SCHED_BATCH : SCHED_IDLE;
    if (const int err = ::pthread_setschedparam(::pthread_self(), native, &param))
        log_warn(thread + ": cannot use scheduling policy " + io_thread_policy_name(policy) + ": " +
                 std::strerror(err));
}
}  // namespace

IoThread::IoThread(IoThreadOptions options)
    : options_(std::move(options)), work_(boost::asio::make_work_guard(io_)), thread_([this] { loop(); })
{
}

IoThread::~IoThread()
{
    work_.reset();
    io_.stop();
    if (thread_.joinable())
        thread_.join();
}

void* WaitMemory::allocate(size_t bytes)
{
    if (bytes > sizeof(Block))
        return ::operator new(bytes);
    if (free_.empty()) {
        blocks_.push_back(std::make_unique<Block>());
        free_.reserve(blocks_.size());  // deallocate() never allocates
        return blocks_.back().get();
    }
    void* block = free_.back();
    free_.pop_back();
    return block;
}

void WaitMemory::deallocate(void* block, size_t bytes)
{
    if (bytes > sizeof(Block))
        ::operator delete(block);
    else
        free_.push_back(block);
}

void IoThread::run_and_wait(const std::function<void()>& fn)
{
    if (is_current()) {
        fn();
        return;
    }
    // An exception comes back through `error`, set before `done` is: this
    // thread then holds the exception's last reference and frees it. Through
    // promise::set_exception that thread could drop the last one after this
    // one had read it, ordered only by libsupc++'s (uninstrumented) atomic
    // count, which ThreadSanitizer reported as a race.
    std::exception_ptr error;
    std::promise<void> done;
    post([&] {
        try {
            fn();
        } catch (...) {
            error = std::current_exception();
        }
        done.set_value();
    });
    done.get_future().get();
    if (error)
        std::rethrow_exception(error);
}

void IoThread::loop()
{
    tid_ = ::gettid();
    ::pthread_setname_np(::pthread_self(), options_.name.substr(0, 15).c_str());
    if (options_.cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(options_.cpu, &set);
        if (const int err = ::pthread_setaffinity_np(::pthread_self(), sizeof(set), &set))
            log_warn(options_.name + ": cannot pin to CPU " + std::to_string(options_.cpu) + ": " + std::strerror(err));
    }
    apply_policy(options_.name, options_.policy);
    try {
        serve_rounds();
    } catch (const std::exception& e) {
        // Nothing a guest does should get here: a bug, or the host failing us.
        const std::string what = options_.name + " failed: " + e.what();
        if (options_.on_failure)
            options_.on_failure(what);  // its owner says it, as it ends
        else
            log_error(what);
    }
    // Stopped, or failed: whoever waits on run_and_wait (a reset, lkvm's
    // exit) must still get its answer, so posted work runs until the end.
    while (!io_.stopped()) {
        try {
            io_.run();
        } catch (const std::exception& e) {
            log_error(options_.name + ": " + e.what());
        }
    }
}

void IoThread::serve_rounds()
{
    unsigned rounds = 0;  // since the reactor last ran
    while (!io_.stopped()) {
        // Asio's reactor (an epoll_wait) only when something may wait
        // there that polling cannot see: work posted from another thread,
        // or, every kReactorEvery rounds, whatever else (a kick that came
        // although notifications were off). A round that slept ran it.
        if (take_posted() || ++rounds == kReactorEvery) {
            rounds = 0;
            round_ns_ = 0;
            io_.poll();
        }
        flush();
        end_round();
        const uint64_t start = monotonic_ns();
        bool found = false;
        if (poll_ns_ > 0) {
            const uint64_t deadline = start + poll_ns_;
            uint64_t now = start;
            do {
                round_ns_ = now;
                found = poll_once();
            } while (!found && (now = monotonic_ns()) < deadline);
        }
        if (found) {
            stats_.add(stats_.poll_hits);
        } else {
            // Notifications back on, then one more look: a kick or a
            // completion that came while they were off would otherwise
            // wait for the next one.
            set_polling(false);
            round_ns_ = 0;
            if (!poll_once()) {
                round_ns_ = 0;
                rounds = 0;
                io_.run_one();
                stats_.add(stats_.wakeups);
            }
            // Awake: notifications stay off until the thread is about to
            // sleep again (as QEMU's), so that the guest's kicks and the
            // engine's eventfd cost nothing while it works.
            set_polling(true);
        }
        if (options_.poll.max_ns) {
            poll_ns_ = next_poll_ns(poll_ns_, monotonic_ns() - start, options_.poll);
            stats_.set(stats_.poll_ns, poll_ns_);
        }
    }
}

uint64_t IoThread::round_ns()
{
    if (round_ns_ == 0)
        round_ns_ = monotonic_ns();
    return round_ns_;
}

void IoThread::post(std::function<void()> fn)
{
    boost::asio::post(io_, std::move(fn));
    // After the handler is queued: whoever sees the flag finds the handler.
    posted_.store(true, std::memory_order_release);
}

bool IoThread::take_posted()
{
    // A locked exchange only when something was posted: rare next to rounds.
    return posted_.load(std::memory_order_relaxed) && posted_.exchange(false, std::memory_order_acquire);
}

bool IoThread::poll_once()
{
    bool found = false;
    for (size_t i = 0; i < sources_.size(); ++i) {
        if (sources_[i]->ready()) {
            sources_[i]->run();
            found = true;
        }
    }
    for (auto& e : engines_) {
        if (e && e->engine->has_completions()) {
            reap(*e);
            found = true;
        }
    }
    if (found)
        flush();
    return found;
}

void IoThread::set_polling(bool active)
{
    if (polling_ == active)
        return;
    polling_ = active;
    for (auto* source : sources_)
        source->set_polling(active);
    for (auto& e : engines_)
        if (e)
            e->engine->set_event_notification(!active);
}

void IoThread::add_source(PollSource& source)
{
    sources_.push_back(&source);
    // Each source asks for round_end() once a round at most: room for all of
    // them now, so that the loop never grows these lists.
    round_end_.reserve(sources_.size());
    ending_.reserve(sources_.size());
    if (polling_)
        source.set_polling(true);
}

void IoThread::remove_source(PollSource& source)
{
    std::erase(sources_, &source);
    std::erase(round_end_, &source);
}

void IoThread::interrupt_at_round_end(PollSource& source)
{
    round_end_.push_back(&source);
}

void IoThread::end_round()
{
    // round_end() may queue again (for the next round): take the list first,
    // swapped with a spare so that both keep their storage.
    ending_.swap(round_end_);
    for (auto* source : ending_)
        source->round_end();
    ending_.clear();
}

uint32_t IoThread::add_sink(CompletionSink& sink)
{
    // The same for the sinks a reap touches.
    touched_sinks_.reserve(sinks_.size() + 1);
    spare_sinks_.reserve(sinks_.size() + 1);
    for (uint32_t id = 0; id < sinks_.size(); ++id) {
        if (!sinks_[id]) {
            sinks_[id] = &sink;
            return id;
        }
    }
    sinks_.push_back(&sink);
    return static_cast<uint32_t>(sinks_.size() - 1);
}

void IoThread::remove_sink(uint32_t id)
{
    sinks_.at(id) = nullptr;
}

IoThread::Engine& IoThread::engine(EngineKind kind)
{
    auto& slot = engines_.at(static_cast<size_t>(kind));
    if (!slot) {
        Engine e;
        e.engine = options_.make_engine ? options_.make_engine(kind, kEngineCapacity) : make_io_engine(kind, kEngineCapacity);
        // Sized for the most a round can hold, so that a burst larger than
        // any before it does not allocate on the request path.
        e.pending.reserve(kEngineCapacity);
        completions_.reserve(kEngineCapacity);
        e.event = std::make_unique<boost::asio::posix::stream_descriptor>(io_, ::dup(e.engine->event_fd()));
        slot.emplace(std::move(e));
        wait_completions(*slot);
    }
    return *slot;
}

void IoThread::prepare_engine(EngineKind kind, std::span<const iovec> memory)
{
    run_and_wait([&] {
        Engine& e = engine(kind);
        if (!memory.empty() && !e.memory_registered) {
            e.engine->register_memory(memory);
            e.memory_registered = true;
        }
    });
}

void IoThread::use_file(EngineKind kind, int fd, bool in_use)
{
    IoEngine& e = *engine(kind).engine;
    if (in_use)
        e.register_file(fd);
    else
        e.unregister_file(fd);
}

void IoThread::cancel_allocations(uint32_t sink)
{
    const auto of_sink = [sink](uint64_t cookie) { return cookie >> 32 == sink; };
    for (auto& e : engines_) {
        if (!e)
            continue;
        e->engine->cancel_allocations(of_sink);
        // Those still waiting for room in the engine never start.
        std::erase_if(e->pending, [&](const IoRequest& r) {
            if ((r.op != IoOp::kDiscard && r.op != IoOp::kWriteZeroes) || !of_sink(r.cookie))
                return false;
            sinks_[sink]->complete(static_cast<uint32_t>(r.cookie), -ECANCELED);
            return true;
        });
    }
}

void IoThread::submit(EngineKind kind, const IoRequest& request)
{
    engine(kind).pending.push_back(request);
}

void IoThread::flush()
{
    for (auto& e : engines_) {
        if (!e || e->pending.empty())
            continue;
        size_t done = 0;
        while (done < e->pending.size()) {
            const size_t room = e->engine->capacity() - e->engine->in_flight();
            size_t n = std::min(room, e->pending.size() - done);
            if (options_.max_batch)
                n = std::min<size_t>(n, options_.max_batch);
            if (n == 0)
                break;  // the engine is full: completions make room
            e->engine->submit(std::span(e->pending).subspan(done, n));
            done += n;
            stats_.add(stats_.batches);
        }
        e->pending.erase(e->pending.begin(), e->pending.begin() + static_cast<long>(done));
    }
}

void IoThread::wait_completions(Engine& e)
{
    if (e.waiting)
        return;
    e.waiting = true;
    e.event->async_wait(boost::asio::posix::stream_descriptor::wait_read,
                        wait_handler([this, &e](const boost::system::error_code& error) {
                            if (error)
                                return;
                            e.waiting = false;
                            e.engine->clear_event();
                            reap(e);
                            wait_completions(e);
                        }));
}

void IoThread::reap(Engine& e)
{
    completions_.clear();
    e.engine->reap(completions_);
    for (const auto& c : completions_) {
        const auto id = static_cast<uint32_t>(c.cookie >> 32);
        if (id >= sinks_.size() || !sinks_[id])
            continue;  // its queue went while this was in flight (it waited for it: cannot happen)
        sinks_[id]->complete(static_cast<uint32_t>(c.cookie), c.result);
        if (std::find(touched_sinks_.begin(), touched_sinks_.end(), id) == touched_sinks_.end())
            touched_sinks_.push_back(id);
    }
    // A sink may submit more, and reap, from completions_done(): take the
    // list first, swapped with a spare so that both keep their storage.
    std::vector<uint32_t> touched;
    touched.swap(spare_sinks_);
    touched.swap(touched_sinks_);
    for (const uint32_t id : touched)
        if (sinks_[id])
            sinks_[id]->completions_done();
    touched.clear();
    spare_sinks_.swap(touched);
}

void IoThread::drain_until(const std::function<bool()>& done)
{
    set_polling(false);  // it sleeps on the engines' eventfds: they must signal
    while (!done()) {
        flush();
        bool busy = false;
        for (auto& e : engines_) {
            if (!e || (e->engine->in_flight() == 0 && e->pending.empty()))
                continue;
            busy = true;
            e->engine->wait_for_completions(100);
            reap(*e);
        }
        if (!busy)
            return;  // nothing left anywhere to wait for
    }
}

}  // namespace lkvm
