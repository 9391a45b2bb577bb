#include "io/system_calls.h"

#include <stdio.h>
#include <unistd.h>

#include <atomic>

namespace trinity_stream_saver {

namespace {

constexpr SystemCalls kReal{::write, ::pwrite, ::fsync, ::fdatasync, ::close, ::rename};

std::atomic<const SystemCalls*> current{&kReal};

}  // namespace

const SystemCalls& system_calls() noexcept { return *current.load(std::memory_order_acquire); }

ScopedSystemCalls::ScopedSystemCalls(const SystemCalls& replacement) noexcept
    : previous_(current.exchange(&replacement, std::memory_order_acq_rel)) {}

ScopedSystemCalls::~ScopedSystemCalls() { current.store(previous_, std::memory_order_release); }

const SystemCalls& ScopedSystemCalls::real() noexcept { return kReal; }

}  // namespace trinity_stream_saver
