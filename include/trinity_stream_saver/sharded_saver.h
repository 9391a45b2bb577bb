// Sharded Hugging Face checkpoints, streamed: model-00001-of-00005.safetensors
// ... plus model.safetensors.index.json, laid out as huggingface_hub's
// save_torch_state_dict and transformers' save_pretrained lay them out,
// written one tensor at a time.
//
//   tss::ShardOptions options;
//   options.max_shard_size = 2'000'000'000;
//   tss::save_sharded_streaming(next, "checkpoint/", meta, options);
//
// A save is three phases, which save_sharded_streaming composes and a
// distributed save runs on several processes:
//   1. ShardedWriter::write: every file (or a given subset) under a
//      temporary name "<file>.tmp"; nothing visible changes.
//   2. ShardedWriter::commit: the temporary files take their final names.
//   3. finish_sharded_checkpoint (or a CheckpointFinisher made before
//      phase 2): the index, then the removal of files an older save left
//      (once, after every writer committed).
// One process holds a CheckpointFolderLock on the folder through all three,
// so that two saves into one folder never remove each other's files.
// Until phase 2 a failure leaves the folder as it was. During phases 2 and
// 3 a crash can leave a mix of old and new files (each file whole), in an
// order chosen so that a loader's first choice is never stale: an older
// single file goes before the new index appears, and an older index goes
// before the shards it names.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <trinity_stream_saver/errors.h>
#include <trinity_stream_saver/shard_plan.h>
#include <trinity_stream_saver/stream_saver.h>
#include <trinity_stream_saver/tensor_meta.h>

namespace trinity_stream_saver {

// What the phases need besides the plan.
struct ShardWriteOptions {
  // Each file's data is on disk before the renames, and the renames and the
  // index before returning.
  bool fsync = false;
  // A thread writes tensor k while the source produces tensor k+1 (see
  // SaveOptions::overlap).
  bool overlap = false;
  // The user's metadata: in the index's "metadata" for a sharded
  // checkpoint, in the file's "__metadata__" (after "format": "pt") for a
  // single file. huggingface_hub's save_torch_state_dict does the same.
  std::optional<Metadata> metadata;
  // The index's "total_parameters"; the sum of the rows' numel without it
  // (a transformers model's num_parameters() when the state dict holds its
  // parameters, each once).
  std::optional<std::uint64_t> total_parameters;
  // As SaveOptions::poll: called between chunks and while waiting; throw
  // from it to cancel.
  std::function<void()> poll;
};

struct ShardOptions : ShardWriteOptions {
  std::uint64_t max_shard_size = kDefaultMaxShardSize;
  std::string filename_pattern = kDefaultFilenamePattern;
};

// Streams every tensor `next` yields (in state_dict_meta's order) into the
// files of plan_shards(state_dict_meta, ...) in `directory` (created if
// missing), then renames them, writes the index when there is more than one
// file, and removes the files of an older checkpoint of the same pattern
// that the new one does not name. Returns the index's path, or the single
// file's path.
//
// Throws as save_safetensors_streaming does, and ValueError for a tensor
// that is not in state_dict_meta, does not match its row, comes out of
// state_dict_meta's order (before the rest of the file being written), or
// is missing at the end. On any error before the renames, the folder is
// left as it was, without temporary files (a folder the save created stays,
// empty). Holds a CheckpointFolderLock throughout: OsError EBUSY while
// another sharded save into `directory` runs.
std::string save_sharded_streaming(const TensorSource& next, const std::string& directory,
                                   const std::vector<TensorMeta>& state_dict_meta,
                                   const ShardOptions& options = {});

// The same from a plan made beforehand (plan_shards).
std::string save_sharded_streaming(const TensorSource& next, const std::string& directory,
                                   const ShardPlan& plan, const ShardWriteOptions& options);

// Phases 1 and 2 for some files of a plan. Destroying it before commit()
// removes its temporary files.
class ShardedWriter final {
 public:
  // Writes plan.files[i] for each i in `files` into `directory`, which must
  // exist. Throws ValueError for an index out of range or metadata the
  // index cannot hold, before any file is created.
  ShardedWriter(std::string directory, ShardPlan plan, const std::vector<std::size_t>& files,
                ShardWriteOptions options);
  ~ShardedWriter();
  ShardedWriter(const ShardedWriter&) = delete;
  ShardedWriter& operator=(const ShardedWriter&) = delete;

  // Phase 1, called once: pulls every item of `next`, which yields all of
  // the plan's tensors in order; writes the tensors of this writer's files
  // under temporary names and releases the others unwritten. A tensor that
  // has a file of its own is written as it comes, so two files may be open
  // at once. On error, every temporary file is removed.
  void write(const TensorSource& next);

  // Phase 2: renames each temporary file to its final name (data already
  // on disk with fsync; the directory is synced after). Returns the final
  // paths. Throws std::logic_error unless write() completed.
  std::vector<std::string> commit();

  // Removes the temporary files that have not been renamed.
  void abort() noexcept;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// The indices of all of `plan`'s files.
std::vector<std::size_t> all_files(const ShardPlan& plan);

// Holds `directory` (which must exist) for one sharded save, from before
// its first temporary file to the end of its clean-up: a second save into
// the folder fails at once with EBUSY instead of removing this one's files.
// Take it in one process per save: a distributed save takes it on the rank
// that finishes the checkpoint only, its other ranks write their files
// into the held folder. Released by release() or the destructor, and by
// the kernel when the process dies.
class CheckpointFolderLock final {
 public:
  // Throws OsError: EBUSY while another save holds the folder, ENOENT or
  // ENOTDIR if `directory` is not a folder.
  explicit CheckpointFolderLock(const std::string& directory);
  ~CheckpointFolderLock();
  CheckpointFolderLock(const CheckpointFolderLock&) = delete;
  CheckpointFolderLock& operator=(const CheckpointFolderLock&) = delete;

  void release() noexcept;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Phase 3, split so that the index can fail before any shard is renamed:
// its bytes depend on the plan only, so it is written under its temporary
// name first, and a full disk or a directory at the index's path leaves
// the older checkpoint whole.
class CheckpointFinisher final {
 public:
  // For a sharded plan, checks the index's path and writes the index as
  // "<index>.tmp" in `directory` (which must exist). Nothing visible
  // changes. Throws OsError (EISDIR for a directory at the index's path)
  // and ValueError as check_index_metadata.
  CheckpointFinisher(std::string directory, ShardPlan plan, ShardWriteOptions options);
  // Removes the index's temporary file unless finish() put it in place.
  ~CheckpointFinisher();
  CheckpointFinisher(const CheckpointFinisher&) = delete;
  CheckpointFinisher& operator=(const CheckpointFinisher&) = delete;

  // Once every file is committed: for a sharded plan, removes an older
  // single file (loaders prefer it to an index) and then renames the index
  // into place; then removes the files in `directory` that a save with
  // plan.filename_pattern writes and `plan` does not name, an older index
  // before the shards it names. Directories are never removed. Returns the
  // index's path or the single file's path. Throws OsError; if only a
  // removal after the index failed, the new checkpoint is complete and the
  // error says so. Called once.
  std::string finish();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// CheckpointFinisher(directory, plan, options).finish(): phase 3 for a
// caller that did not prepare the index before phase 2.
std::string finish_sharded_checkpoint(const std::string& directory, const ShardPlan& plan,
                                      const ShardWriteOptions& options);

}  // namespace trinity_stream_saver
