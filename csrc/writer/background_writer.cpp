#include "writer/background_writer.h"

#include <utility>

namespace trinity_stream_saver {

namespace {

// Thrown inside the worker to abandon a write when the save is cancelled.
struct Cancelled {};

}  // namespace

BackgroundWriter::BackgroundWriter(TensorWriter& writer,
                                   std::function<void()> while_waiting)
    : writer_(writer), while_waiting_(std::move(while_waiting)) {
  writer_.set_between_chunks([this] {
    if (stopping_.load(std::memory_order_relaxed)) throw Cancelled{};
  });
  worker_ = std::thread([this] { run(); });
}

BackgroundWriter::~BackgroundWriter() {
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  worker_.join();
  writer_.set_between_chunks({});
}

void BackgroundWriter::run() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    changed_.wait(lock, [this] { return stopping_ || job_.has_value(); });
    if (stopping_) return;
    Job job = std::move(*job_);
    job_.reset();
    lock.unlock();
    std::exception_ptr error;
    try {
      writer_.write(job.name, job.tensor);
    } catch (const Cancelled&) {
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    written_ = std::move(job.tensor);
    if (error) error_ = error;
    busy_ = false;
    changed_.notify_all();
  }
}

void BackgroundWriter::wait_idle(std::unique_lock<std::mutex>& lock,
                                 at::Tensor* finished) {
  while (!changed_.wait_for(lock, kWaitSlice, [this] { return !busy_; })) {
    if (while_waiting_) {
      lock.unlock();
      while_waiting_();
      lock.lock();
    }
  }
  *finished = std::move(written_);
  written_ = at::Tensor();
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

void BackgroundWriter::write(std::string name, at::Tensor tensor, at::Tensor* finished) {
  std::unique_lock<std::mutex> lock(mutex_);
  wait_idle(lock, finished);
  if (static_cast<std::size_t>(tensor.numel()) * tensor.element_size() < kInlineBytes) {
    // The worker is idle, so the writer is ours to use on this thread.
    lock.unlock();
    writer_.write(name, tensor);
    lock.lock();
    written_ = std::move(tensor);
    return;
  }
  job_ = Job{std::move(name), std::move(tensor)};
  busy_ = true;
  lock.unlock();
  changed_.notify_all();
}

void BackgroundWriter::finish(at::Tensor* finished) {
  std::unique_lock<std::mutex> lock(mutex_);
  wait_idle(lock, finished);
}

}  // namespace trinity_stream_saver
