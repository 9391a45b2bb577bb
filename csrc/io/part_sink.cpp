#include "io/part_sink.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

#include <trinity_stream_saver/errors.h>

namespace trinity_stream_saver {

namespace {

// How often a wait for the uploader wakes up to run `poll` (Ctrl-C).
constexpr std::chrono::milliseconds kPollInterval{50};

}  // namespace

PartSink::PartSink(std::string destination, std::size_t part_size, std::size_t max_parts,
                   HandOff hand_off, std::function<void()> poll)
    : destination_(std::move(destination)),
      part_size_(part_size),
      max_parts_(max_parts),
      hand_off_(std::move(hand_off)),
      poll_(std::move(poll)) {
  if (part_size_ == 0 || max_parts_ == 0) {
    throw ValueError("part_size and max_parts must be positive (" + destination_ + ").");
  }
}

PartSink::~PartSink() {
  // The uploader reads the buffers until it releases them; freeing them
  // earlier would let it send freed memory.
  wait_until_released();
}

void PartSink::wait_until_released() {
  // No poll: this runs on the way out of a failed save (and in the
  // destructor, which cannot throw); every upload ends, in success or error.
  std::unique_lock<std::mutex> lock(mutex_);
  released_.wait(lock, [this] { return in_flight_.empty(); });
}

void PartSink::throw_if_failed_locked() const {
  if (failed_part_ != 0) {
    throw OsError(EIO, destination_,
                  "upload part " + std::to_string(failed_part_));
  }
}

char* PartSink::take_buffer() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    throw_if_failed_locked();
    if (!free_.empty()) {
      char* buffer = free_.back();
      free_.pop_back();
      return buffer;
    }
    if (buffers_.size() < max_parts_) {
      // Not zero-filled: pages are touched only as the part fills, so a
      // small object costs only its own size.
      buffers_.emplace_back(new char[part_size_]);
      return buffers_.back().get();
    }
    if (released_.wait_for(lock, kPollInterval) == std::cv_status::timeout && poll_) {
      lock.unlock();
      poll_();
      lock.lock();
    }
  }
}

void PartSink::hand_off_current() {
  const Part part{next_number_, current_, filled_};
  {
    std::lock_guard<std::mutex> lock(mutex_);
    in_flight_.emplace(part.number, current_);
  }
  try {
    hand_off_(part);
  } catch (...) {
    std::lock_guard<std::mutex> lock(mutex_);
    in_flight_.erase(part.number);
    free_.push_back(current_);
    current_ = nullptr;
    filled_ = 0;
    throw;
  }
  ++next_number_;
  current_ = nullptr;
  filled_ = 0;
}

void PartSink::append(const void* data, std::size_t size) {
  const char* bytes = static_cast<const char*>(data);
  while (size != 0) {
    if (current_ == nullptr) current_ = take_buffer();
    const std::size_t n = std::min(size, part_size_ - filled_);
    std::memcpy(current_ + filled_, bytes, n);
    filled_ += n;
    bytes += n;
    size -= n;
    if (filled_ == part_size_) hand_off_current();
  }
}

void PartSink::finish() {
  if (current_ != nullptr && filled_ != 0) hand_off_current();
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    throw_if_failed_locked();
    if (in_flight_.empty()) return;
    if (released_.wait_for(lock, kPollInterval) == std::cv_status::timeout && poll_) {
      lock.unlock();
      poll_();
      lock.lock();
    }
  }
}

void PartSink::release(std::size_t number, bool uploaded) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto part = in_flight_.find(number);
  if (part == in_flight_.end()) return;  // released twice: the first counts
  free_.push_back(part->second);
  in_flight_.erase(part);
  if (!uploaded && failed_part_ == 0) failed_part_ = number;
  released_.notify_all();
}

}  // namespace trinity_stream_saver
