#include "writer/released_memory.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>

namespace trinity_stream_saver {

// Why: glibc serves a large block from its heap rather than with mmap once
// a block of that size has been freed (its mmap threshold rises with every
// freed block, up to 32 MiB), and keeps freed heap memory mapped. A
// producer that makes each tensor when asked (a .cpu() copy, a gather) then
// finds the freed tensors' memory too fragmented to reuse whole, and the
// process grew by the whole checkpoint instead of one tensor. malloc_trim
// hands the free pages back, wherever they lie in the heap; the next tensor
// faults fresh pages in, as an mmap'd one would. Setting the threshold
// with mallopt instead would change every allocation of the caller's
// process, for as long as it runs.
void release_tensor(at::Tensor& tensor) {
  if (!tensor.has_storage() || tensor.storage().nbytes() < kReturnedBytes) {
    tensor.reset();
    return;
  }
  // Whether dropping the reference frees the memory is seen afterwards: a
  // producer that keeps its tensors (a model's own weights) costs nothing
  // here, and references kept by Python objects need no guessing.
  const c10::weak_intrusive_ptr<c10::StorageImpl> storage =
      tensor.storage().getWeakStorageImpl();
  tensor.reset();
#ifdef __GLIBC__
  if (storage.expired()) ::malloc_trim(0);
#endif
}

#ifdef __linux__
namespace {

// Whether [begin, end) lies inside a single mapping of a file, as
// /proc/self/maps lists the process's mappings ("start-end perms offset
// dev inode path"; anonymous memory has inode 0). Read afresh at each call:
// the map changes under the caller, and a tensor is worth far more than
// the few hundred lines.
bool in_one_file_mapping(std::uintptr_t begin, std::uintptr_t end) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    std::uintptr_t low = 0, high = 0;
    std::uint64_t inode = 0;
    if (std::sscanf(line.c_str(), "%" SCNxPTR "-%" SCNxPTR " %*s %*s %*s %" SCNu64, &low, &high,
                    &inode) != 3) {
      continue;
    }
    if (begin >= low && begin < high) return end <= high && inode != 0;
  }
  return false;
}

}  // namespace
#endif

std::size_t release_file_pages(const at::Tensor& tensor) {
#ifdef __linux__
  if (!tensor.has_storage() || tensor.storage().data() == nullptr) return 0;
  const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  const auto start = reinterpret_cast<std::uintptr_t>(tensor.storage().data());
  const std::uintptr_t begin = (start + page - 1) / page * page;
  const std::uintptr_t end = (start + tensor.storage().nbytes()) / page * page;
  if (end <= begin || !in_one_file_mapping(begin, end)) return 0;
  if (::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED) != 0) return 0;
  return end - begin;
#else
  (void)tensor;
  return 0;
#endif
}

}  // namespace trinity_stream_saver
