// A tensor's bytes in C order (row-major, no lazy conjugation or negation),
// as safetensors stores them: whether its memory already holds them, and
// how to get them out of it piece by piece. Shared by the in-turn writer
// (writer/tensor_writer) and overlap mode (writer/background_writer).
// Knows torch tensors; nothing of files or Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <cstddef>
#include <functional>

namespace trinity_stream_saver {

// True if `tensor`'s memory holds its bytes in C order (no lazy
// conjugation or negation): they can be written straight from it.
bool is_c_order(const at::Tensor& tensor);

// Calls `piece` with consecutive views of `tensor` whose bytes, in C
// order, are the tensor's: whole runs of rows up to `max_bytes`, or single
// rows (recursively) when a row is larger. Bounds the memory a copy in C
// order needs at once.
void for_each_piece(const at::Tensor& tensor, std::size_t max_bytes,
                    const std::function<void(const at::Tensor&)>& piece);

// Copies the bytes of `view` in C order to `target` (view.nbytes() bytes),
// without autograd or Python dispatch modes.
void copy_in_c_order(const at::Tensor& view, void* target);

// The saver's own tensor operations (views, staging copies) run as plain
// ATen calls: not recorded by autograd, and not routed through a Python
// dispatch mode the caller has active (FakeTensorMode would turn the
// staging buffer into a tensor without memory).
struct PlainTensorOps {
  at::NoGradGuard no_grad;
  c10::impl::ExcludeDispatchKeyGuard no_python{
      c10::DispatchKeySet{c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                          c10::DispatchKey::PreDispatch}};
};

}  // namespace trinity_stream_saver
