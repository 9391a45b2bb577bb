// Streams tensors into a safetensors file whose header space was reserved
// up front from the caller's metadata (format/file_plan), then writes the
// header last. Knows torch tensors and the file format; knows nothing of
// Python.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_set>
#include <vector>

#include <trinity_stream_saver/tensor_meta.h>

#include "format/file_plan.h"
#include "format/header.h"
#include "io/file_sink.h"
#include "io/sequential_sink.h"
#include "writer/overlap_target.h"

namespace trinity_stream_saver {

// Overlap mode writes through the narrow OverlapTarget (see overlap_target.h);
// everything else through the members below.
class TensorWriter final : public OverlapTarget {
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

  // In order, for a sink that cannot seek (an object store): writes the
  // whole header that `meta` and `metadata` describe now, then the data as
  // it comes. Since the header is already sent, each tensor must match its
  // row of `meta` exactly (name, dtype, shape, in order): one that does not
  // is refused with ValueError before any of its bytes are written (the
  // file sink instead writes the header last, from the tensors yielded).
  // Finish with finish_in_order(). `sink` must outlive the writer.
  TensorWriter(SequentialSink& sink, const std::vector<TensorMeta>& meta,
               const std::optional<Metadata>& metadata,
               std::function<void()> between_chunks = {});

  // Checks `tensor` and appends its bytes in C order straight from its
  // memory: add() and write_data() in one. Throws ValueError naming the
  // tensor if it cannot be saved; such a tensor leaves the file as it was.
  //
  // Once writing a tensor's bytes (or closing the file) has failed, the
  // file may hold part of a tensor: every later write and close throws
  // ValueError saying what failed, so that a caller who carries on never
  // gets a corrupt file.
  void write(const std::string& name, const at::Tensor& tensor);

  // Checks `tensor` and records its header entry as the next in the file;
  // returns its size in bytes. Its bytes must be appended next (with
  // write_data(), or through OverlapTarget). Throws ValueError naming the
  // tensor.
  std::uint64_t add(const std::string& name, const at::Tensor& tensor) override;

  // Appends the bytes of the tensor just added, reading its memory here.
  void write_data(const at::Tensor& tensor);

  // Bytes of the largest tensor state_dict_meta describes.
  std::uint64_t largest_tensor() const noexcept { return planned_.largest_tensor; }

  // Writes the header, closes the file and renames it to `destination`;
  // with `sync`, durably (see FileSink::close_and_rename).
  void close_and_rename(const std::string& destination, bool sync);
  // Writes the header and closes the file, leaving it at its temporary path;
  // returns the descriptor that holds its lock (see FileSink::close_and_keep).
  FileDescriptor close_and_keep(bool sync);

  // In-order writer: throws ValueError unless every row of `meta` was
  // written. The caller then finishes its sink.
  void finish_in_order();

  // N: the header length reserved in the file.
  std::uint64_t reserved_header_size() const noexcept { return reserved_; }

 private:
  // OverlapTarget: only overlap mode appends bytes apart from a tensor.
  void append_owned(const void* data, std::size_t size) override;
  void append_foreign(const std::string& name, const void* data, std::size_t size,
                      const std::function<void()>& between_chunks) override;

  // Throws ValueError if an earlier call left the file incomplete.
  void check_usable(const std::string& what) const;
  // Runs `step`, which changes the file; if it throws, the writer refuses
  // every later call.
  template <typename Step>
  void failing_for_good(Step&& step);
  Dtype check_tensor(const std::string& name, const at::Tensor& tensor) const;
  void write_contiguous(const at::Tensor& tensor);
  void stage_and_append(const at::Tensor& view);
  void finish_file();
  // Throws ValueError if this writer writes in order, to no file.
  void check_writes_file() const;
  // Throws ValueError unless as many tensors were written as `meta` lists.
  void check_all_rows_written() const;
  // In order: throws ValueError unless `entry`, tensor `name`'s header
  // entry, is the one already written for the next row.
  void check_matches_row(const std::string& name, const std::string& entry) const;

  const FileLayout planned_;
  const std::uint64_t reserved_;
  // The file when writing to a path; null when writing to a caller's
  // SequentialSink in order.
  std::unique_ptr<FileSink> file_;
  SequentialSink& sink_;  // *file_, or the caller's
  // In order: the entries of the header already written, one per row of
  // `meta`; tensor i must produce exactly entry i. Empty for a file.
  std::vector<std::string> sent_entries_;
  HeaderJson header_;
  const std::vector<std::string> planned_names_;  // for the missing-rows hint
  std::unordered_set<std::string> names_;
  std::uint64_t data_size_ = 0;
  at::Tensor staging_;  // reused between non-contiguous tensors
  std::function<void()> between_chunks_;
  // Why this writer refuses further calls: set by the first that failed.
  // Set once, by whichever thread writes the bytes (the overlap worker
  // too), and read by the caller's thread: the flag publishes the text.
  std::string failure_;
  std::atomic<bool> failed_{false};
};

}  // namespace trinity_stream_saver
