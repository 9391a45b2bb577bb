#include "writer/background_writer.h"

#include <algorithm>
#include <utility>

#include <trinity_stream_saver/errors.h>
#include "format/file_plan.h"
#include "writer/c_order.h"
#include "writer/released_memory.h"

namespace trinity_stream_saver {

namespace {

// Thrown inside the worker to abandon a write when the save is cancelled.
struct Cancelled {};

}  // namespace

BackgroundWriter::BackgroundWriter(OverlapTarget& target, std::uint64_t max_queued_bytes,
                                   std::function<void()> while_waiting)
    : target_(target),
      max_queued_bytes_(max_queued_bytes),
      while_waiting_(std::move(while_waiting)) {
  worker_ = std::thread([this] { run(); });
}

BackgroundWriter::~BackgroundWriter() {
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  worker_.join();
}  // The jobs left, and the tensors they hold, are dropped here, on the caller's thread.

void BackgroundWriter::run() {
  // Between chunks of a large tensor: a save being torn down abandons it.
  const std::function<void()> unless_stopping = [this] {
    if (stopping_.load(std::memory_order_relaxed)) throw Cancelled{};
  };
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    changed_.wait(lock, [this] { return stopping_ || (!queue_.empty() && !error_); });
    if (stopping_) return;
    Job job = std::move(queue_.front());
    queue_.pop_front();
    queued_bytes_ -= job.size;
    writing_ = true;
    lock.unlock();
    changed_.notify_all();  // room in the queue
    std::exception_ptr error;
    try {
      if (job.owned.data) {
        target_.append_owned(job.data, job.size);
      } else {
        target_.append_foreign(job.held.name, job.data, job.size, unless_stopping);
      }
    } catch (const Cancelled&) {
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    writing_ = false;
    if (error && !error_) error_ = error;
    written_.push_back(std::move(job));
    changed_.notify_all();
  }
}

void BackgroundWriter::wait(std::unique_lock<std::mutex>& lock,
                            const std::function<bool()>& done) {
  while (!changed_.wait_for(lock, kWaitSlice, done)) {
    if (while_waiting_) {
      lock.unlock();
      while_waiting_();
      lock.lock();
    }
  }
}

BackgroundWriter::Buffer BackgroundWriter::take_buffer(std::size_t size) {
  for (auto spare = spare_.rbegin(); spare != spare_.rend(); ++spare) {
    if (spare->capacity >= size) {
      Buffer buffer = std::move(*spare);
      spare_.erase(std::next(spare).base());
      return buffer;
    }
  }
  const std::size_t capacity = std::max(size, kBatchBytes);
  return {std::make_unique_for_overwrite<char[]>(capacity), capacity};
}

void BackgroundWriter::submit(Job job) {
  {
    std::unique_lock<std::mutex> lock(mutex_);
    // A job larger than the bound still goes, alone, once the worker is idle.
    wait(lock, [&] {
      return error_ || queued_bytes_ + job.size <= max_queued_bytes_ ||
             (queue_.empty() && !writing_);
    });
    if (error_) std::rethrow_exception(error_);
    queued_bytes_ += job.size;
    queue_.push_back(std::move(job));
  }
  changed_.notify_all();
}

void BackgroundWriter::submit_batch() {
  if (batch_used_ == 0) return;
  Job job;
  job.owned = std::move(batch_);
  job.data = job.owned.data.get();
  job.size = std::exchange(batch_used_, 0);
  submit(std::move(job));
}

void BackgroundWriter::write(const std::string& name, const at::Tensor& tensor) {
  // A failed write on the worker is reported as itself, not as the writer
  // refusing the next tensor.
  collect();
  const std::uint64_t bytes = target_.add(name, tensor);
  if (bytes < kInlineBytes) {  // an empty tensor too: it copies nothing
    if (batch_used_ + bytes > kBatchBytes) submit_batch();
    if (!batch_.data) batch_ = take_buffer(kBatchBytes);
    copy_in_c_order(tensor, batch_.data.get() + batch_used_);
    batch_used_ += bytes;
  } else if (is_c_order(tensor)) {
    submit_batch();
    Job job;
    job.data = static_cast<const char*>(tensor.const_data_ptr());
    job.size = bytes;
    const c10::Storage& storage = tensor.storage();
    job.held = {name, tensor, storage.data(), storage.nbytes(),
                tensor.is_inference() ? -1 : tensor._version()};
    ++held_;
    submit(std::move(job));
  } else {
    // Staged here, so that the worker never reads the producer's memory
    // outside write(2), and the producer's tensor is not held at all.
    submit_batch();
    bool first = true;
    for_each_piece(tensor, kPieceBytes, [&](const at::Tensor& piece) {
      if (!first && while_waiting_) while_waiting_();
      first = false;
      Job job;
      job.size = static_cast<std::size_t>(piece.numel()) * piece.element_size();
      job.owned = take_buffer(job.size);
      copy_in_c_order(piece, job.owned.data.get());
      job.data = job.owned.data.get();
      submit(std::move(job));
    });
  }
  collect();
}

void BackgroundWriter::finish() {
  submit_batch();
  {
    std::unique_lock<std::mutex> lock(mutex_);
    wait(lock, [this] { return error_ || (queue_.empty() && !writing_); });
  }
  collect();
}

void BackgroundWriter::collect() {
  std::vector<Job> written;
  std::exception_ptr error;
  {
    const std::lock_guard<std::mutex> lock(mutex_);
    written.swap(written_);
    error = error_;
  }
  // Every written job is taken back before any error is raised, so that
  // the count of held tensors and the spare buffers stay true after one.
  std::exception_ptr changed;
  for (Job& job : written) {
    if (job.owned.data) {
      spare_.push_back(std::move(job.owned));
      continue;
    }
    --held_;
    if (!changed) {  // the first tensor found changed is the one named
      try {
        check_unchanged(job.held);
      } catch (...) {
        changed = std::current_exception();
      }
    }
    release_tensor(job.held.tensor);
  }
  if (changed) std::rethrow_exception(changed);
  if (error) std::rethrow_exception(error);
}

void BackgroundWriter::check_unchanged(const Held& held) {
  const std::string where = "tensor " + quoted_name(held.name);
  const c10::Storage& storage = held.tensor.storage();
  if (storage.data() != held.storage_data || storage.nbytes() != held.storage_bytes) {
    throw ValueError(
        where + " lost its memory while the saver held it for writing: the producer "
        "freed or resized its storage (e.g. untyped_storage().resize_(0)) too early. "
        "With overlap=True the saver holds a yielded tensor until it is written, with at "
        "most max_queued_bytes (default: the largest tensor in state_dict_meta) queued "
        "beyond the one being written; free a tensor only once it is released, or save "
        "with overlap=False.");
  }
  if (held.version >= 0 && held.tensor._version() != held.version) {
    throw ValueError(
        where + " was modified in place while the saver held it for writing, so the "
        "file could hold the wrong bytes: the producer reused its memory too early (a "
        "staging buffer refilled while still queued?). With overlap=True, a ring of R "
        "buffers of S bytes is safe when R >= 2 + max_queued_bytes // S; use more "
        "buffers, a smaller max_queued_bytes, or overlap=False.");
  }
}

}  // namespace trinity_stream_saver
