// Streams tensors into a safetensors file whose header space was reserved
// up front from the caller's metadata (format/file_plan), then writes the
// header last. Knows torch tensors and the file format; knows nothing of
// Python.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include <trinity_stream_saver/tensor_meta.h>

#include "format/file_plan.h"
#include "format/header.h"
#include "io/file_sink.h"

namespace trinity_stream_saver {

class TensorWriter final {
 public:
  // Large tensors are written in pieces of this size, with `between_chunks`
  // called between pieces (where the bindings check for Ctrl-C); the same
  // size bounds the buffer that puts a non-contiguous tensor in C order, so
  // that such a tensor costs at most this much memory on top of itself.
  static constexpr std::size_t kChunkBytes = std::size_t{32} << 20;

  // Validates `meta`, reserves the header that it and `metadata` describe
  // and creates `path`, reserving space for the whole file that `meta`
  // describes (so that a full disk fails before any data is written). Without `metadata` the header has no "__metadata__"
  // entry; an empty one is written as {} (as safetensors does). Throws
  // ValueError for bad metadata (before creating any file), OsError if the
  // file cannot be created.
  TensorWriter(std::string path, const std::vector<TensorMeta>& meta,
               const std::optional<Metadata>& metadata,
               std::function<void()> between_chunks = {});

  // Checks `tensor` and appends its bytes in C order straight from its
  // memory. Throws ValueError naming the tensor if it cannot be saved; such
  // a tensor leaves the file as it was.
  //
  // Once writing a tensor's bytes (or closing the file) has failed, the
  // file may hold part of a tensor: every later write and close throws
  // ValueError saying what failed, so that a caller who carries on never
  // gets a corrupt file.
  void write(const std::string& name, const at::Tensor& tensor);

  // Replaces the callback between chunks (a background thread that writes
  // for Python needs a different check than Python's main thread).
  void set_between_chunks(std::function<void()> between_chunks);

  // Writes the header, closes the file and renames it to `destination`;
  // with `sync`, durably (see FileSink::close_and_rename).
  void close_and_rename(const std::string& destination, bool sync);
  // Writes the header and closes the file, leaving it at its temporary path.
  void close_and_keep(bool sync);

  // N: the header length reserved in the file.
  std::uint64_t reserved_header_size() const noexcept { return reserved_; }

 private:
  // Throws ValueError if an earlier call left the file incomplete.
  void check_usable(const std::string& what) const;
  // Runs `step`, which changes the file; if it throws, the writer refuses
  // every later call.
  template <typename Step>
  void failing_for_good(Step&& step);
  Dtype check_tensor(const std::string& name, const at::Tensor& tensor) const;
  void write_contiguous(const at::Tensor& tensor);
  void write_strided(const at::Tensor& view);
  void stage_and_append(const at::Tensor& view);
  void finish_file();

  const FileLayout planned_;
  const std::uint64_t reserved_;
  FileSink sink_;
  HeaderJson header_;
  std::unordered_set<std::string> names_;
  std::uint64_t data_size_ = 0;
  at::Tensor staging_;  // reused between non-contiguous tensors
  std::function<void()> between_chunks_;
  // Why this writer refuses further calls: set by the first that failed.
  std::optional<std::string> failure_;
};

}  // namespace trinity_stream_saver
