// Overlap mode: a thread that writes tensor k while the caller produces
// tensor k+1. Knows torch tensors and the TensorWriter; nothing of Python.
//
// At most one tensor is handed over at a time: write() waits until the
// previous tensor is on its way to disk before it hands over the next, so
// the caller holds at most one tensor beyond the one being written. The
// worker never drops a tensor itself: dropping the last reference to a
// tensor that Python created may need the GIL, so written tensors go back
// to the caller's thread and are released there, at the next write() or
// finish().
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "writer/tensor_writer.h"

namespace trinity_stream_saver {

class BackgroundWriter final {
 public:
  // How often a waiting caller runs `while_waiting` (e.g. to notice Ctrl-C).
  static constexpr std::chrono::milliseconds kWaitSlice{50};

  // Tensors smaller than this are written on the caller's thread (once the
  // worker is idle): handing one over costs more than writing it.
  static constexpr std::size_t kInlineBytes = std::size_t{1} << 20;

  // Starts the worker. `writer` must outlive this object. `while_waiting`
  // runs on the caller's thread, without the lock, while write() or
  // finish() waits; whatever it throws propagates.
  BackgroundWriter(TensorWriter& writer, std::function<void()> while_waiting);

  // Stops the worker (a write in progress is abandoned at its next chunk)
  // and waits for it.
  ~BackgroundWriter();

  BackgroundWriter(const BackgroundWriter&) = delete;
  BackgroundWriter& operator=(const BackgroundWriter&) = delete;

  // Waits for the previous tensor to be written (rethrowing its error),
  // returns it to the caller to drop via `finished`, and hands over this one
  // (or writes it at once if it is small).
  void write(std::string name, at::Tensor tensor, at::Tensor* finished);

  // Waits for the last tensor to be written and rethrows its error.
  void finish(at::Tensor* finished);

 private:
  struct Job {
    std::string name;
    at::Tensor tensor;
  };

  void run();
  // Waits until the worker is idle; then takes back the written tensor.
  void wait_idle(std::unique_lock<std::mutex>& lock, at::Tensor* finished);

  TensorWriter& writer_;
  const std::function<void()> while_waiting_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::optional<Job> job_;       // handed over, not yet written
  at::Tensor written_;           // written, not yet given back
  bool busy_ = false;            // a job is handed over or being written
  std::exception_ptr error_;
  std::atomic<bool> stopping_{false};
  std::thread worker_;           // last: started once the rest is ready
};

}  // namespace trinity_stream_saver
