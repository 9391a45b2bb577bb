#include "writer/tensor_writer.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <climits>
#include <cstring>
#include <sstream>
#include <unordered_set>

#include <trinity_stream_saver/errors.h>
#include "writer/c_order.h"
#include "writer/torch_dtype.h"

namespace trinity_stream_saver {

static_assert(std::endian::native == std::endian::little,
              "safetensors stores little-endian data; writing raw tensor "
              "memory is only correct on a little-endian host");

namespace {

// "[2, 3]", for messages.
std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string text = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    text += (i == 0 ? "" : ", ") + std::to_string(shape[i]);
  }
  return text + "]";
}

std::string layout_name(c10::Layout layout) {
  std::ostringstream out;
  out << layout;
  return out.str();
}

// Wrapper subclasses (DTensor, FakeTensor, functional tensors) report a CPU
// device but their bytes live elsewhere or nowhere; writing from their data
// pointer would read garbage or crash.
bool is_wrapper(const at::Tensor& tensor) {
  const c10::DispatchKeySet wrappers{c10::DispatchKey::Python,
                                     c10::DispatchKey::PythonTLSSnapshot,
                                     c10::DispatchKey::Functionalize};
  if (tensor.key_set().has_any(wrappers) || !tensor.has_storage()) return true;
  try {
    return !tensor.storage().device().is_cpu();
  } catch (const c10::Error&) {
    return true;  // storage that refuses to give its device
  }
}

// True if the storage holds every byte the tensor's view reaches. Not so
// after untyped_storage().resize_(0) (how FSDP frees a gathered parameter):
// writing from it would read freed memory.
bool storage_covers_view(const at::Tensor& tensor) {
  if (tensor.numel() == 0) return true;
  try {
    const c10::Storage& storage = tensor.storage();
    if (storage.data() == nullptr) return false;
    std::uint64_t last = static_cast<std::uint64_t>(tensor.storage_offset());
    for (std::int64_t dim = 0; dim < tensor.dim(); ++dim) {
      last += static_cast<std::uint64_t>(tensor.size(dim) - 1) *
              static_cast<std::uint64_t>(tensor.stride(dim));
    }
    return (last + 1) * tensor.element_size() <= storage.nbytes();
  } catch (const c10::Error&) {
    return false;  // storage that refuses to give its data pointer
  }
}

std::vector<std::string> names_of(const std::vector<TensorMeta>& meta) {
  std::vector<std::string> names;
  names.reserve(meta.size());
  for (const TensorMeta& row : meta) names.push_back(row.name);
  return names;
}

}  // namespace

TensorWriter::TensorWriter(std::string path, const std::vector<TensorMeta>& meta,
                           const std::optional<Metadata>& metadata,
                           std::function<void()> between_chunks)
    : planned_(plan_file(meta, metadata)),
      reserved_(planned_.header_size),
      file_(std::make_unique<FileSink>(std::move(path))),
      sink_(*file_),
      planned_names_(names_of(meta)),
      between_chunks_(std::move(between_chunks)) {
  if (metadata) header_.append(metadata_entry(*metadata));
  std::uint64_t file_size = 0;
  if (!__builtin_add_overflow(8 + reserved_, planned_.data_size, &file_size)) {
    file_->reserve_space(file_size);
  }
  file_->seek(8 + reserved_);
}

TensorWriter::TensorWriter(SequentialSink& sink, const std::vector<TensorMeta>& meta,
                           const std::optional<Metadata>& metadata,
                           std::function<void()> between_chunks)
    : planned_(plan_file(meta, metadata)),
      reserved_(planned_.header_size),
      sink_(sink),
      planned_names_(names_of(meta)),
      between_chunks_(std::move(between_chunks)) {
  if (metadata) header_.append(metadata_entry(*metadata));
  plan_file(meta, metadata, &sent_entries_);  // checked above; now the entries
  HeaderJson planned = header_;
  for (const std::string& entry : sent_entries_) planned.append(entry);
  const std::string header = encode_header(planned.str(), reserved_);
  failing_for_good([&] { sink_.append(header.data(), header.size()); });
}

void TensorWriter::check_matches_row(const std::string& name, const std::string& entry) const {
  const std::size_t row = names_.size();
  if (row >= sent_entries_.size()) {
    throw ValueError("tensor " + quoted_name(name) + " is one more than the " +
                     std::to_string(sent_entries_.size()) +
                     " tensors state_dict_meta lists; a save in order has already written "
                     "the header from state_dict_meta. List every tensor the iterator yields.");
  }
  if (entry != sent_entries_[row]) {
    throw ValueError("tensor " + quoted_name(name) + " (item " + std::to_string(row) +
                     ") differs from row " + quoted_name(planned_names_[row]) +
                     " of state_dict_meta in name, dtype or shape. A save in order (to object "
                     "storage) writes the header from state_dict_meta before any data, so "
                     "each tensor must match its row exactly, in the order yielded; collect "
                     "the meta from the tensors you save (collect_state_dict_meta).");
  }
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
  if (is_wrapper(tensor)) {
    throw ValueError(where + " has no CPU memory of its own to write (a "
                     "wrapper tensor subclass such as DTensor, FakeTensor or a "
                     "functional tensor); pass a plain CPU tensor, e.g. "
                     ".full_tensor() or .to_local().");
  }
  if (!storage_covers_view(tensor)) {
    throw ValueError(where + " has lost its memory: its storage was freed or shrunk "
                     "(e.g. untyped_storage().resize_(0)) before it was saved. Yield it "
                     "before freeing it; with overlap=True, free it only once the saver "
                     "has released it (see max_queued_bytes).");
  }
  const std::optional<Dtype> dtype = safetensors_dtype(tensor.scalar_type());
  if (!dtype) {
    throw ValueError(unsupported_dtype_message(where, c10::toString(tensor.scalar_type())));
  }
  return *dtype;
}

void TensorWriter::check_usable(const std::string& what) const {
  if (failed_.load(std::memory_order_acquire)) {
    throw ValueError("cannot " + what + ": this TensorWriter's file is incomplete because " +
                     failure_ + "; start a new save.");
  }
}

template <typename Step>
void TensorWriter::failing_for_good(Step&& step) {
  // Only messages that are plain text are repeated: what() of an exception
  // from the caller's callback (a Python error) may need the interpreter.
  // Only one thread writes bytes at a time, so only one can get here.
  const auto fail = [this](std::string why) {
    if (failed_.load(std::memory_order_relaxed)) return;
    failure_ = std::move(why);
    failed_.store(true, std::memory_order_release);
  };
  try {
    step();
  } catch (const OsError& error) {
    fail("an earlier call failed (" + std::string(error.what()) + ")");
    throw;
  } catch (const ValueError& error) {
    fail("an earlier call failed (" + std::string(error.what()) + ")");
    throw;
  } catch (const c10::Error& error) {
    fail(std::string("an earlier call failed (") + error.what_without_backtrace() + ")");
    throw;
  } catch (...) {
    fail("an earlier call failed or was interrupted");
    throw;
  }
}

void TensorWriter::write(const std::string& name, const at::Tensor& tensor) {
  add(name, tensor);
  write_data(tensor);
}

std::uint64_t TensorWriter::add(const std::string& name, const at::Tensor& tensor) {
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
  // A tensor may differ from its row in dtype or shape (as in the original
  // saver, whose callers may declare every row bfloat16): it is written as
  // it is, and the file describes it, as long as its entry still fits. A
  // save in order has sent the header already: there it must match its row.
  if (!file_) check_matches_row(name, entry);
  if (header_.size_with(entry) > reserved_) {
    throw ValueError(
        "tensor " + quoted_name(name) + " (" + std::string(dtype.name) + ", shape " +
        shape_text(*shape) + ") does not fit in the header reserved from " +
        "state_dict_meta (" + std::to_string(reserved_) + " bytes; the tensors so far " +
        "need " + std::to_string(header_.size_with(entry)) + "): state_dict_meta does " +
        "not describe the tensors being saved. A tensor may differ from its row in " +
        "dtype or shape only while the header still fits; list exactly the tensors the " +
        "iterator yields, in the order it yields them, with their dtypes and shapes " +
        "(e.g. from collect_state_dict_meta).");
  }
  data_size_ += bytes;
  header_.append(std::move(entry));
  names_.insert(name);
  return bytes;
}

void TensorWriter::write_data(const at::Tensor& tensor) {
  if (tensor.numel() == 0) return;
  const PlainTensorOps plain;
  failing_for_good([&] {
    if (is_c_order(tensor)) {
      write_contiguous(tensor);
      return;
    }
    bool first = true;
    for_each_piece(tensor, kChunkBytes, [&](const at::Tensor& piece) {
      if (!first && between_chunks_) between_chunks_();
      first = false;
      stage_and_append(piece);
    });
  });
}

void TensorWriter::write_contiguous(const at::Tensor& tensor) {
  const char* data = static_cast<const char*>(tensor.const_data_ptr());
  const std::size_t size = tensor.numel() * tensor.element_size();
  for (std::size_t done = 0; done < size; done += kChunkBytes) {
    if (done != 0 && between_chunks_) between_chunks_();
    sink_.append(data + done, std::min(kChunkBytes, size - done));
  }
}

void TensorWriter::stage_and_append(const at::Tensor& view) {
  const std::int64_t size = view.numel() * view.element_size();
  if (!staging_.defined() || staging_.numel() < size) {
    const PlainTensorOps plain;
    staging_ = at::empty({size}, at::TensorOptions().dtype(at::kByte));
  }
  copy_in_c_order(view, staging_.mutable_data_ptr());
  sink_.append(staging_.const_data_ptr(), static_cast<std::size_t>(size));
}

void TensorWriter::append_owned(const void* data, std::size_t size) {
  failing_for_good([&] { sink_.append(data, size); });
}

void TensorWriter::append_foreign(const std::string& name, const void* data, std::size_t size,
                                  const std::function<void()>& between_chunks) {
  if (!file_) {
    throw ValueError("overlap is not available for a save in order (to object storage): "
                     "its parts upload in the background already; save with overlap=False.");
  }
  const char* bytes = static_cast<const char*>(data);
  try {
    failing_for_good([&] {
      for (std::size_t done = 0; done < size; done += kChunkBytes) {
        if (done != 0 && between_chunks) between_chunks();
        file_->append_unbuffered(bytes + done, std::min(kChunkBytes, size - done));
      }
    });
  } catch (const OsError& error) {
    if (error.error_number() != EFAULT) throw;
    throw ValueError("tensor " + quoted_name(name) + " lost its memory while it was being "
                     "written: the producer freed its storage (e.g. untyped_storage()."
                     "resize_(0)) before the saver released it. With overlap=True, keep a "
                     "yielded tensor's memory until the saver has released it (see "
                     "max_queued_bytes), or save with overlap=False.");
  }
}

void TensorWriter::check_all_rows_written() const {
  // Counted, not matched by name: callers may yield renamed keys (e.g. FSDP
  // prefixes stripped after the meta was collected). The names only hint.
  if (names_.size() < planned_names_.size()) {
    const std::size_t missing = planned_names_.size() - names_.size();
    std::string never_yielded;
    std::size_t listed = 0;
    for (const std::string& name : planned_names_) {
      if (names_.count(name) != 0) continue;
      if (listed == 5) {
        never_yielded += ", ...";
        break;
      }
      never_yielded += (listed++ == 0 ? "" : ", ") + quoted_name(name);
    }
    throw ValueError(
        "the iterator stopped after " + std::to_string(names_.size()) +
        " tensors, but state_dict_meta lists " + std::to_string(planned_names_.size()) +
        ": " + std::to_string(missing) + " missing. A checkpoint without them would look " +
        "like a good save, so nothing was written. Yield every tensor state_dict_meta " +
        "describes, or pass state_dict_meta for only the tensors you save." +
        (listed != 0 ? " Rows never yielded by name: " + never_yielded + "." : ""));
  }
}

void TensorWriter::finish_in_order() {
  check_usable("finish the file");
  check_all_rows_written();
}

void TensorWriter::finish_file() {
  check_all_rows_written();
  // The preallocated size assumed every tensor of state_dict_meta; fewer
  // (or smaller) tensors leave preallocated space to cut off.
  if (data_size_ != planned_.data_size) file_->truncate(8 + reserved_ + data_size_);
  const std::string header = encode_header(header_.str(), reserved_);
  file_->write_at(0, header.data(), header.size());
}

void TensorWriter::check_writes_file() const {
  if (!file_) {
    throw ValueError("this TensorWriter writes in order to a sink, not a file; finish it "
                     "with finish_in_order().");
  }
}

void TensorWriter::close_and_rename(const std::string& destination, bool sync) {
  check_writes_file();
  check_usable("finish the file");
  failing_for_good([&] {
    finish_file();
    file_->close_and_rename(destination, sync);
  });
}

FileDescriptor TensorWriter::close_and_keep(bool sync) {
  check_writes_file();
  check_usable("finish the file");
  FileDescriptor lock;
  failing_for_good([&] {
    finish_file();
    lock = file_->close_and_keep(sync);
  });
  return lock;
}

}  // namespace trinity_stream_saver
