// Hands the memory of a tensor the saver drops back to the operating
// system, so that a save holds about one tensor of memory however the
// producer allocates, or a reader of a memory-mapped checkpoint holds about
// one tensor of it. Knows torch tensors, the C library and the process's
// memory map; nothing of checkpoint files or Python.
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

// Drops this process's pages of the memory of `tensor`'s storage (the whole
// pages inside it: those shared with a neighbour stay) when that memory lies
// in a mapping of a file, as torch.load(mmap=True) and safetensors'
// safe_open make them. Returns the bytes released, 0 where the memory is
// not one file mapping's (anonymous memory would lose its contents) or the
// system has no madvise.
//
// Why: a page of a file mapping, once read, stays in the process until the
// mapping goes, and counts in its resident memory (and in its peak, VmHWM),
// so a reader walking a mapped checkpoint tensor by tensor grew by the whole
// checkpoint. Once dropped, a page that is read again is faulted back in
// from the file, so the tensor stays readable. The caller must not have
// written to a private mapping's pages through the tensor: those writes would
// be dropped as well.
std::size_t release_file_pages(const at::Tensor& tensor);

}  // namespace trinity_stream_saver
