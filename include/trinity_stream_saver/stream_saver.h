// trinity_stream_saver's C++ API: stream a safetensors checkpoint to disk
// one tensor at a time, from any LibTorch program. The Python package is a
// thin layer over these same functions: behaviour, errors and bytes are
// the same.
//
//   #include <trinity_stream_saver/stream_saver.h>
//   namespace tss = trinity_stream_saver;
//   auto params = module->named_parameters();
//   std::vector<tss::TensorMeta> meta;
//   for (const auto& p : params) meta.push_back(tss::tensor_meta(p.key(), p.value()));
//   std::size_t i = 0;
//   tss::save_safetensors_streaming(
//       [&]() -> std::optional<std::pair<std::string, at::Tensor>> {
//         if (i == params.size()) return std::nullopt;
//         const auto& p = params[i++];
//         return std::make_pair(p.key(), p.value().detach());
//       },
//       "model.safetensors", meta);
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <trinity_stream_saver/errors.h>
#include <trinity_stream_saver/tensor_meta.h>

namespace trinity_stream_saver {

struct SaveOptions {
  // Atomically replace `filepath` with the finished file; with false, the
  // finished file stays at `filepath + ".tmp"` for finalize().
  bool rename = true;
  // The data is on disk before the rename, and the rename before returning.
  bool fsync = false;
  // A thread writes the tensors already yielded while `next` produces the
  // following ones (see README, "Overlap"). Tensors below 1 MiB, and
  // tensors not in C order, are copied into the saver's memory at once;
  // the others are held until written.
  bool overlap = false;
  // With overlap: the most bytes queued beyond the tensor being written
  // (one larger tensor still goes, alone, once the writer is idle). While
  // `next` runs, the saver holds the producer's tensors only as the one
  // being written and this queue; so a ring of R staging buffers of S bytes
  // may be reused safely when R >= 2 + max_queued_bytes / S (rounded
  // down). A held tensor modified in place or freed meanwhile fails the
  // save with ValueError. Default: the largest tensor in state_dict_meta.
  std::optional<std::uint64_t> max_queued_bytes;
  // Stored as the header's "__metadata__"; none when empty (an engaged but
  // empty list is written as {}, as safetensors does).
  std::optional<Metadata> metadata;
  // Called on the calling thread between chunks of a large tensor and
  // while waiting for the writer thread. Throw from it to cancel the save
  // (the Python bindings raise KeyboardInterrupt there).
  std::function<void()> poll;
};

// Yields the next (name, tensor) pair, or nullopt at the end. Called on the
// thread that called the save, one item at a time.
using TensorSource = std::function<std::optional<std::pair<std::string, at::Tensor>>()>;

// Streams every tensor `next` yields into `filepath + ".tmp"`, with the
// header space reserved from `state_dict_meta` (one row per tensor, in the
// order they are yielded), then renames it to `filepath`. A tensor whose
// dtype or shape differs from its row is written as it is, and the file
// describes it, while its header entry still fits the reserved space; one
// whose entry outgrows it fails with ValueError naming it. If `next` ends
// before it has yielded as many tensors as state_dict_meta has rows, the
// save fails with ValueError (a checkpoint missing tensors is not a save). Each tensor is
// written from its own memory and released before `next` is called again
// (with options.overlap, see above). Returns `filepath`, or the temporary
// file's path with options.rename == false.
//
// The temporary file is never written through a symbolic link, and a
// second save to the same `filepath` while this one runs fails at once
// with OsError (EBUSY); a stale temporary file that no running save holds
// is replaced. A symbolic link at `filepath` is itself replaced (as
// os.replace does); a directory, device node, FIFO or socket there is
// refused (OsError EISDIR / EEXIST) before anything is written.
//
// Throws TypeError/ValueError for bad input (naming the tensor; a
// `filepath` that is empty or ends with '/'), OsError for a failed system
// call (with errno and the path), and rethrows what `next` or options.poll
// throw. On any error the temporary file is removed and a file at
// `filepath` is left untouched, except when only the directory sync after
// the rename fails (options.fsync): the new file is then in place, and the
// OsError says so.
std::string save_safetensors_streaming(const TensorSource& next, const std::string& filepath,
                                       const std::vector<TensorMeta>& state_dict_meta,
                                       const SaveOptions& options = {});

// Finishes a save made with rename == false: checks that `tmp_path` is a
// complete safetensors file that no save is writing, with `fsync` puts its
// data on disk, renames it to `filepath`, and syncs the directory. Returns
// `filepath`. Throws ValueError naming `tmp_path` and what is wrong with it
// (a file cut short, a header that does not cover the data, ...), OsError
// otherwise (EBUSY while a save writes it, ELOOP for a symbolic link). If
// the rename does not happen, the temporary file stays where it is and
// `filepath` is untouched.
std::string finalize(const std::string& tmp_path, const std::string& filepath, bool fsync = true);

// Throws ValueError naming `path` and what is wrong with it unless it is a
// complete safetensors file (header length, JSON, dtypes, data_offsets
// covering the data after the header exactly, file size): what finalize()
// checks before it puts a file in place. OsError if it cannot be opened or
// read.
void check_safetensors_file(const std::string& path);

// The state_dict_meta row of a tensor. Throws ValueError if safetensors
// cannot store its dtype.
TensorMeta tensor_meta(const std::string& name, const at::Tensor& tensor);

// The state_dict_meta rows of the tensors `next` yields, in order, skipping
// those whose dtype safetensors cannot store. Each tensor is released
// before `next` is called again. Rethrows what `next` throws.
std::vector<TensorMeta> collect_state_dict_meta(const TensorSource& next);

// N, the JSON header length (a multiple of 8) that a save of
// `state_dict_meta` with `metadata` reserves. Throws ValueError as the save
// would for bad rows, duplicate names or a header too large.
std::uint64_t reserved_header_size(const std::vector<TensorMeta>& state_dict_meta,
                                   const std::optional<Metadata>& metadata = std::nullopt);

// The bytes of tensor data that `state_dict_meta` describes (the file's
// size less 8 and the header). Throws as reserved_header_size.
std::uint64_t data_size(const std::vector<TensorMeta>& state_dict_meta);

}  // namespace trinity_stream_saver
