// The fault-injection seam of the device tests: an engine that passes
// requests to a real one, except those a rule picks, which complete with the
// rule's result (-EIO, -ENOSPC, or a short count) without reaching the disk.
// Installed through IoThreadOptions::make_engine; not a user option.
#pragma once

#include <cerrno>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "disk/io_engine.h"
#include "virtio/io_thread.h"

namespace lkvm::test {

// What a request gets instead of its I/O; nothing: it runs for real.
using FaultRule = std::function<std::optional<int64_t>(const IoRequest&)>;

class FaultyEngine final : public IoEngine {
public:
    FaultyEngine(std::unique_ptr<IoEngine> inner, FaultRule rule)
        : IoEngine(inner->capacity()), inner_(std::move(inner)), rule_(std::move(rule))
    {
    }
    const char* name() const override { return inner_->name(); }
    int event_fd() const override { return inner_->event_fd(); }
    void clear_event() override { inner_->clear_event(); }
    void set_event_notification(bool on) override { inner_->set_event_notification(on); }
    void register_file(int fd) override { inner_->register_file(fd); }
    void unregister_file(int fd) override { inner_->unregister_file(fd); }

    void submit(std::span<const IoRequest> batch) override
    {
        std::vector<IoRequest> real;
        for (const IoRequest& r : batch) {
            if (const auto result = rule_(r))
                failed_.push_back({r.cookie, *result});
            else
                real.push_back(r);
        }
        inner_->submit(real);
        in_flight_ += batch.size();
    }
    size_t reap(std::vector<IoCompletion>& out) override
    {
        const size_t n = failed_.size() + inner_->reap(out);
        out.insert(out.end(), failed_.begin(), failed_.end());
        failed_.clear();
        in_flight_ -= n;
        return n;
    }
    bool has_completions() const override { return !failed_.empty() || inner_->has_completions(); }

private:
    std::unique_ptr<IoEngine> inner_;
    FaultRule rule_;
    std::vector<IoCompletion> failed_;
};

// An engine factory for IoThreadOptions::make_engine that wraps every engine.
inline EngineFactory faulty_engines(FaultRule rule)
{
    return [rule](EngineKind kind, size_t capacity) -> std::unique_ptr<IoEngine> {
        return std::make_unique<FaultyEngine>(make_io_engine(kind, capacity), rule);
    };
}

// The device tests' failing disk: reads at byte 8 * 512 fail with EIO,
// writes at 16 * 512 with ENOSPC, reads at 24 * 512 move only short_bytes.
inline FaultRule eio_enospc_short_read(int64_t short_bytes)
{
    return [short_bytes](const IoRequest& r) -> std::optional<int64_t> {
        if (r.offset == 8 * 512 && r.op == IoOp::kRead)
            return -EIO;
        if (r.offset == 16 * 512 && r.op == IoOp::kWrite)
            return -ENOSPC;
        if (r.offset == 24 * 512 && r.op == IoOp::kRead)
            return short_bytes;
        return std::nullopt;
    };
}

}  // namespace lkvm::test
