// Hands the memory of a tensor the saver drops back to the operating
// system, so that a save holds about one tensor of memory however the
// producer allocates. Knows torch tensors and the C library; nothing of
// files or Python.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace trinity_stream_saver {

// Storages at least this large are returned to the system when the saver
// drops the last reference to them. Smaller ones are left to the allocator:
// they are many, and what they leave behind is small.
inline constexpr std::size_t kReturnedBytes = std::size_t{1} << 20;

// Drops the saver's reference to `tensor` (leaving it undefined). If that
// was the last reference to a storage of at least kReturnedBytes, the
// allocator's free memory is handed back to the system at once (glibc,
// see released_memory.cpp); elsewhere this only drops the reference.
void release_tensor(at::Tensor& tensor);

}  // namespace trinity_stream_saver
