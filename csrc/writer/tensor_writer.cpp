#include "writer/tensor_writer.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <bit>
#include <climits>
#include <sstream>
#include <unordered_set>

#include <trinity_stream_saver/errors.h>
#include "writer/torch_dtype.h"
#include "writer/transpose.h"

namespace trinity_stream_saver {

static_assert(std::endian::native == std::endian::little,
              "safetensors stores little-endian data; writing raw tensor "
              "memory is only correct on a little-endian host");

namespace {

// The integer dtype as wide as one element of a tensor (1, 2, 4 or 8 bytes).
c10::ScalarType same_width_integer(std::size_t element_size) {
  switch (element_size) {
    case 1: return c10::ScalarType::Byte;
    case 2: return c10::ScalarType::Short;
    case 4: return c10::ScalarType::Int;
    default: return c10::ScalarType::Long;
  }
}

std::string layout_name(c10::Layout layout) {
  std::ostringstream out;
  out << layout;
  return out.str();
}

// Wrapper subclasses (DTensor, FakeTensor, functional tensors) report a CPU
// device but their bytes live elsewhere or nowhere; writing from their data
// pointer would read garbage or crash.
bool has_plain_cpu_memory(const at::Tensor& tensor) {
  const c10::DispatchKeySet wrappers{c10::DispatchKey::Python,
                                     c10::DispatchKey::PythonTLSSnapshot,
                                     c10::DispatchKey::Functionalize};
  if (tensor.key_set().has_any(wrappers) || !tensor.has_storage()) return false;
  if (tensor.numel() == 0) return true;
  try {
    const c10::Storage& storage = tensor.storage();
    return storage.device().is_cpu() && storage.data() != nullptr;
  } catch (const c10::Error&) {
    return false;  // storage that refuses to give its data pointer
  }
}

// A transposed matrix (tensor.t(), or rows of one): what
// transpose_to_row_major copies faster than torch's strided copy.
// Conjugated or negated views need torch's copy, which applies the flag.
bool is_column_major_matrix(const at::Tensor& view) {
  return view.dim() == 2 && view.size(0) > 1 && view.size(1) > 1 && view.stride(0) == 1 &&
         view.stride(1) >= view.size(0) && view.element_size() <= 8 && !view.is_conj() &&
         !view.is_neg();
}

}  // namespace

TensorWriter::TensorWriter(std::string path, const std::vector<TensorMeta>& meta,
                           const std::optional<Metadata>& metadata,
                           std::function<void()> between_chunks)
    : planned_(plan_file(meta, metadata)),
      reserved_(planned_.header_size),
      sink_(std::move(path)),
      between_chunks_(std::move(between_chunks)) {
  if (metadata) header_.append(metadata_entry(*metadata));
  std::uint64_t file_size = 0;
  if (!__builtin_add_overflow(8 + reserved_, planned_.data_size, &file_size)) {
    sink_.reserve_space(file_size);
  }
  sink_.seek(8 + reserved_);
}

void TensorWriter::set_between_chunks(std::function<void()> between_chunks) {
  between_chunks_ = std::move(between_chunks);
}

Dtype TensorWriter::check_tensor(const std::string& name,
                                      const at::Tensor& tensor) const {
  const std::string where = "tensor " + quoted_name(name);
  check_tensor_name(name, names_, where);
  if (!tensor.defined()) {
    throw ValueError(where + " is an undefined tensor; yield a real tensor.");
  }
  if (tensor.is_nested()) {
    throw ValueError(where + " is a nested tensor; safetensors stores dense "
                     "tensors only. Save its components as separate tensors.");
  }
  if (tensor.layout() != c10::kStrided) {
    throw ValueError(where + " has layout " + layout_name(tensor.layout()) +
                     "; safetensors stores dense tensors only. Convert it with "
                     ".to_dense() first.");
  }
  if (!tensor.device().is_cpu()) {
    throw ValueError(where + " is on device " + tensor.device().str() +
                     "; move it to CPU first (e.g. tensor.cpu()).");
  }
  if (tensor.is_quantized()) {
    throw ValueError(where + " is quantized; safetensors stores plain dtypes "
                     "only. Dequantize it (tensor.dequantize()) first.");
  }
  if (!has_plain_cpu_memory(tensor)) {
    throw ValueError(where + " has no CPU memory of its own to write (a "
                     "wrapper tensor subclass such as DTensor, FakeTensor or a "
                     "functional tensor); pass a plain CPU tensor, e.g. "
                     ".full_tensor() or .to_local().");
  }
  const std::optional<Dtype> dtype = safetensors_dtype(tensor.scalar_type());
  if (!dtype) {
    throw ValueError(unsupported_dtype_message(where, c10::toString(tensor.scalar_type())));
  }
  return *dtype;
}

void TensorWriter::check_usable(const std::string& what) const {
  if (failure_) {
    throw ValueError("cannot " + what + ": this TensorWriter's file is incomplete because " +
                     *failure_ + "; start a new save.");
  }
}

template <typename Step>
void TensorWriter::failing_for_good(Step&& step) {
  // Only messages that are plain text are repeated: what() of an exception
  // from the caller's callback (a Python error) may need the interpreter.
  try {
    step();
  } catch (const OsError& error) {
    failure_ = "an earlier call failed (" + std::string(error.what()) + ")";
    throw;
  } catch (const ValueError& error) {
    failure_ = "an earlier call failed (" + std::string(error.what()) + ")";
    throw;
  } catch (const c10::Error& error) {
    failure_ = std::string("an earlier call failed (") + error.what_without_backtrace() + ")";
    throw;
  } catch (...) {
    failure_ = "an earlier call failed or was interrupted";
    throw;
  }
}

void TensorWriter::write(const std::string& name, const at::Tensor& tensor) {
  check_usable("write tensor " + quoted_name(name));
  const Dtype dtype = check_tensor(name, tensor);
  const std::optional<std::vector<std::int64_t>> shape =
      header_shape(dtype, std::span<const std::int64_t>(tensor.sizes().data(), tensor.sizes().size()));
  if (!shape) {
    throw ValueError("tensor " + quoted_name(name) + ": a 0-dim tensor of dtype " +
                     c10::toString(tensor.scalar_type()) +
                     " cannot be stored; give it at least one dimension.");
  }
  const std::uint64_t bytes =
      static_cast<std::uint64_t>(tensor.numel()) * tensor.element_size();
  std::string entry =
      tensor_entry(name, dtype, *shape, data_size_, data_size_ + bytes);
  if (header_.size_with(entry) > reserved_) {
    throw ValueError(
        "tensor " + quoted_name(name) + " does not fit in the header reserved from " +
        "state_dict_meta (" + std::to_string(reserved_) + " bytes): " +
        "state_dict_meta does not describe the tensors being saved. Pass " +
        "metadata for exactly the tensors the iterator yields (e.g. from " +
        "collect_state_dict_meta).");
  }

  // Autograd must not record the staging copies (nor keep the tensor alive
  // through a graph).
  const at::NoGradGuard no_grad;
  if (bytes != 0) {
    failing_for_good([&] {
      if (tensor.is_contiguous() && !tensor.is_conj() && !tensor.is_neg()) {
        write_contiguous(tensor);
      } else {
        write_strided(tensor);
      }
    });
  }
  data_size_ += bytes;
  header_.append(std::move(entry));
  names_.insert(name);
}

void TensorWriter::write_contiguous(const at::Tensor& tensor) {
  const char* data = static_cast<const char*>(tensor.const_data_ptr());
  const std::size_t size = tensor.numel() * tensor.element_size();
  for (std::size_t done = 0; done < size; done += kChunkBytes) {
    if (done != 0 && between_chunks_) between_chunks_();
    sink_.append(data + done, std::min(kChunkBytes, size - done));
  }
}

// Puts the tensor in C order piece by piece through the staging buffer:
// whole runs of rows when a row fits the buffer, otherwise row by row.
void TensorWriter::write_strided(const at::Tensor& view) {
  const std::size_t size = view.numel() * view.element_size();
  if (size <= kChunkBytes) {
    stage_and_append(view);
    return;
  }
  const std::int64_t rows = view.size(0);
  const std::size_t row_size = size / rows;
  const std::int64_t rows_per_chunk =
      std::max<std::int64_t>(1, static_cast<std::int64_t>(kChunkBytes / row_size));
  for (std::int64_t row = 0; row < rows; row += rows_per_chunk) {
    if (row != 0 && between_chunks_) between_chunks_();
    const at::Tensor part = view.narrow(0, row, std::min(rows_per_chunk, rows - row));
    if (row_size > kChunkBytes) {
      write_strided(part.select(0, 0));
    } else {
      stage_and_append(part);
    }
  }
}

void TensorWriter::stage_and_append(const at::Tensor& view) {
  const std::int64_t size = view.numel() * view.element_size();
  if (!staging_.defined() || staging_.numel() < size) {
    staging_ = at::empty({size}, at::TensorOptions().dtype(at::kByte));
  }
  if (is_column_major_matrix(view)) {
    transpose_to_row_major(view.const_data_ptr(), view.size(0), view.size(1), view.stride(1),
                           view.element_size(), staging_.mutable_data_ptr());
    sink_.append(staging_.const_data_ptr(), static_cast<std::size_t>(size));
    return;
  }
  at::Tensor source = view;
  at::Tensor target = staging_.narrow(0, 0, size);
  // Copy as same-width integers: a bit-exact copy that needs no copy kernel
  // for exotic dtypes (float8, float4). Lazily conjugated or negated views
  // need torch's own copy, which applies the conjugation.
  if (!view.is_conj() && !view.is_neg()) {
    source = view.view(same_width_integer(view.element_size()));
  }
  target = target.view(source.scalar_type()).view(source.sizes());
  target.copy_(source);
  sink_.append(staging_.const_data_ptr(), static_cast<std::size_t>(size));
}

void TensorWriter::finish_file() {
  // The preallocated size assumed every tensor of state_dict_meta; fewer
  // (or smaller) tensors leave preallocated space to cut off.
  if (data_size_ != planned_.data_size) sink_.truncate(8 + reserved_ + data_size_);
  const std::string header = encode_header(header_.str(), reserved_);
  sink_.write_at(0, header.data(), header.size());
}

void TensorWriter::close_and_rename(const std::string& destination, bool sync) {
  check_usable("finish the file");
  failing_for_good([&] {
    finish_file();
    sink_.close_and_rename(destination, sync);
  });
}

void TensorWriter::close_and_keep(bool sync) {
  check_usable("finish the file");
  failing_for_good([&] {
    finish_file();
    sink_.close_and_keep(sync);
  });
}

}  // namespace trinity_stream_saver
