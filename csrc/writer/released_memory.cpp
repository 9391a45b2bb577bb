#include "writer/released_memory.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif

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

}  // namespace trinity_stream_saver
