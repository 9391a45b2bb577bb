// The sharded save behind the public API (sharded_saver.h): routes each
// tensor of one stream to the TensorWriter of its file, keeps finished
// files under temporary names until the stream ends, then commits them and
// writes the index. Knows torch; knows nothing of Python.
#include <trinity_stream_saver/sharded_saver.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "format/file_plan.h"
#include "format/shard_index.h"
#include "format/shard_plan.h"
#include "io/directory.h"
#include "io/durability.h"
#include "io/file_sink.h"
#include "io/folder_lock.h"
#include "io/temp_file.h"
#include "writer/stream_loop.h"
#include "writer/tensor_writer.h"
#include "writer/torch_dtype.h"

namespace trinity_stream_saver {

namespace {

using Item = std::pair<std::string, at::Tensor>;

std::string shape_text(c10::IntArrayRef shape) {
  std::string out = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i != 0) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

// The plan and the index come from state_dict_meta, so a tensor that
// differs from its row would make them lie. Tensors the writer rejects
// anyway (undefined, unsupported dtype) are left to its clearer message.
void check_matches_row(const Item& item, const TensorMeta& row) {
  const at::Tensor& tensor = item.second;
  if (!tensor.defined()) return;
  const std::optional<Dtype> dtype = safetensors_dtype(tensor.scalar_type());
  if (!dtype) return;
  if (dtype->name != row.dtype || tensor.sizes() != c10::IntArrayRef(row.shape)) {
    throw ValueError("tensor " + quoted_name(item.first) + " has dtype " +
                     std::string(dtype->name) + " and shape " + shape_text(tensor.sizes()) +
                     ", but state_dict_meta lists " + row.dtype + " " +
                     shape_text(row.shape) +
                     " for it. The shard plan and the index are made from state_dict_meta: "
                     "pass metadata for exactly the tensors the iterator yields.");
  }
}

}  // namespace

struct ShardedWriter::State {
  struct Location {
    std::size_t file;
    std::size_t row;
  };
  // An item of one of this writer's files that holds more than one tensor.
  struct Routed {
    std::size_t file;
    Item item;
  };

  std::string directory;
  ShardPlan plan;
  ShardWriteOptions options;
  Metadata file_metadata;
  std::vector<bool> mine;      // per file: written by this writer
  std::unordered_map<std::string, Location> locations;
  std::unordered_set<std::string> seen;
  // Finished temporary files not yet renamed, each with the descriptor
  // that holds its lock: until the rename or the abort, no other save to
  // this folder may take them for debris and put its own in their place.
  std::vector<std::pair<std::string, FileDescriptor>> kept;
  bool written = false;
  bool committed = false;

  std::string final_path(std::size_t file) const {
    return join_path(directory, plan.files[file].filename);
  }
  std::string temp_path(std::size_t file) const { return final_path(file) + ".tmp"; }

  Location locate(const std::string& name) {
    check_tensor_name(name, seen, "tensor " + quoted_name(name));
    const auto found = locations.find(name);
    if (found == locations.end()) {
      throw ValueError("tensor " + quoted_name(name) +
                       " is not in state_dict_meta, from which the shard plan was made; "
                       "pass metadata for exactly the tensors the iterator yields.");
    }
    seen.insert(name);
    return found->second;
  }

  std::unique_ptr<TensorWriter> open(std::size_t file) {
    return std::make_unique<TensorWriter>(temp_path(file), plan.files[file].tensors,
                                          file_metadata, options.poll);
  }

  void close(std::size_t file, TensorWriter& writer) {
    kept.emplace_back(temp_path(file), writer.close_and_keep(options.fsync));
  }

  // The next item of one of this writer's files that holds several
  // tensors, or nothing at the end. On the way, writes a file of one tensor
  // whole (a tensor over the size limit comes out of order: the file being
  // filled stays open meanwhile) and releases tensors of other writers'
  // files unwritten.
  std::optional<Routed> pull(const TensorSource& next) {
    for (;;) {
      std::optional<Item> item = next();
      if (!item) return std::nullopt;
      const Location at = locate(item->first);
      if (!mine[at.file]) continue;
      const ShardFile& file = plan.files[at.file];
      check_matches_row(*item, file.tensors[at.row]);
      if (file.tensors.size() > 1) return Routed{at.file, std::move(*item)};
      const std::unique_ptr<TensorWriter> writer = open(at.file);
      writer->write(item->first, item->second);
      close(at.file, *writer);
    }
  }

  // A tensor of another file came while `file` still lacked some of its
  // own: the stream does not follow state_dict_meta's order, which the
  // plan (and so the files) were made from.
  void check_file_complete(std::size_t file, const std::string& arrived) const {
    for (const TensorMeta& row : plan.files[file].tensors) {
      if (seen.count(row.name) == 0) {
        throw ValueError("tensor " + quoted_name(arrived) + " came before tensor " +
                         quoted_name(row.name) + " of " + plan.files[file].filename +
                         ", which was being written: yield the tensors in state_dict_meta's "
                         "order.");
      }
    }
  }

  void check_complete() const {
    for (std::size_t file = 0; file < plan.files.size(); ++file) {
      if (!mine[file]) continue;
      for (const TensorMeta& row : plan.files[file].tensors) {
        if (seen.count(row.name) == 0) {
          throw ValueError("tensor_iter ended without yielding tensor " + quoted_name(row.name) +
                           ", which state_dict_meta lists (for " + plan.files[file].filename +
                           "); the index would name a tensor that no file holds.");
        }
      }
    }
  }

  void remove_kept() noexcept {
    for (const auto& [path, lock] : kept) {
      if (still_named(lock, path)) ::unlink(path.c_str());
    }
    kept.clear();
  }
};

ShardedWriter::ShardedWriter(std::string directory, ShardPlan plan,
                             const std::vector<std::size_t>& files, ShardWriteOptions options)
    : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.directory = std::move(directory);
  s.plan = std::move(plan);
  s.options = std::move(options);
  if (s.plan.is_sharded()) check_index_metadata(s.options.metadata);
  s.file_metadata = shard_file_metadata(s.plan, s.options.metadata);
  s.mine.assign(s.plan.files.size(), false);
  for (const std::size_t file : files) {
    if (file >= s.plan.files.size()) {
      throw ValueError("file number " + std::to_string(file) + " is not in the shard plan, "
                       "which has " + std::to_string(s.plan.files.size()) + " files.");
    }
    s.mine[file] = true;
    // Fail on a header safetensors could not read before any data is written.
    plan_file(s.plan.files[file].tensors, s.file_metadata);
  }
  for (std::size_t file = 0; file < s.plan.files.size(); ++file) {
    const std::vector<TensorMeta>& rows = s.plan.files[file].tensors;
    for (std::size_t row = 0; row < rows.size(); ++row) {
      s.locations.emplace(rows[row].name, State::Location{file, row});
    }
  }
}

ShardedWriter::~ShardedWriter() { abort(); }

void ShardedWriter::write(const TensorSource& next) {
  State& s = *state_;
  if (s.written) throw std::logic_error("ShardedWriter::write() was called twice");
  try {
    std::optional<State::Routed> pending;
    for (;;) {
      std::optional<State::Routed> first = pending ? std::exchange(pending, std::nullopt)
                                                   : s.pull(next);
      if (!first) break;
      const std::size_t file = first->file;
      const std::unique_ptr<TensorWriter> writer = s.open(file);
      // The file's tensors, from `first` until an item of another file,
      // which waits in `pending` for the next round.
      std::optional<Item> head = std::move(first->item);
      first.reset();
      const TensorSource source = [&]() -> std::optional<Item> {
        if (head) return std::exchange(head, std::nullopt);
        std::optional<State::Routed> routed = s.pull(next);
        if (!routed) return std::nullopt;
        if (routed->file != file) {
          pending = std::move(routed);
          return std::nullopt;
        }
        return std::move(routed->item);
      };
      write_stream(source, *writer, s.options.overlap, std::nullopt, s.options.poll);
      // The stream ended, or moved on to another file, inside this one: say
      // which tensors are missing before the file's own count check would.
      if (pending) {
        s.check_file_complete(file, pending->item.first);
      } else {
        s.check_complete();
      }
      s.close(file, *writer);
    }
    s.check_complete();
    // An empty state dict plans one file without tensors, which no item
    // opened: it is written now, so that the save leaves a loadable file.
    for (std::size_t file = 0; file < s.plan.files.size(); ++file) {
      if (s.mine[file] && s.plan.files[file].tensors.empty()) s.close(file, *s.open(file));
    }
  } catch (...) {
    s.remove_kept();
    throw;
  }
  s.written = true;
}

std::vector<std::string> ShardedWriter::commit() {
  State& s = *state_;
  if (!s.written || s.committed) {
    throw std::logic_error("ShardedWriter::commit() needs one completed write()");
  }
  std::vector<std::string> paths;
  for (std::size_t file = 0; file < s.plan.files.size(); ++file) {
    if (!s.mine[file]) continue;
    // The data is on disk already (closed with fsync); one directory sync
    // after all renames. The lock is held through the rename.
    const auto kept = std::find_if(s.kept.begin(), s.kept.end(), [&](const auto& entry) {
      return entry.first == s.temp_path(file);
    });
    if (kept == s.kept.end()) {
      throw std::logic_error("ShardedWriter::commit(): a file of this writer was not kept");
    }
    check_still_named(kept->second, kept->first);
    check_destination(s.final_path(file));
    rename_into_place(kept->first, s.final_path(file));
    s.kept.erase(kept);
    paths.push_back(s.final_path(file));
  }
  s.committed = true;
  if (s.options.fsync && !paths.empty()) sync_parent_directory(paths.front());
  return paths;
}

void ShardedWriter::abort() noexcept { state_->remove_kept(); }

std::vector<std::size_t> all_files(const ShardPlan& plan) {
  std::vector<std::size_t> files(plan.files.size());
  for (std::size_t i = 0; i < files.size(); ++i) files[i] = i;
  return files;
}

struct CheckpointFolderLock::State {
  FileDescriptor held;
};

CheckpointFolderLock::CheckpointFolderLock(const std::string& directory)
    : state_(std::make_unique<State>(State{lock_folder(directory)})) {}

CheckpointFolderLock::~CheckpointFolderLock() = default;

void CheckpointFolderLock::release() noexcept { state_->held.reset(); }

namespace {

bool is_directory(const std::string& path) {
  struct stat info {};
  return ::lstat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode);
}

// Removes what a save with `plan`'s pattern writes and `plan` does not
// name. Indexes go first: an index that outlives a shard it names is a
// broken checkpoint to every index-based loader, while a shard that
// outlives its index is only a stray file (which verify notes).
void remove_older_checkpoint(const std::string& directory, const ShardPlan& plan,
                             const std::unordered_set<std::string>& keep, bool sync,
                             const std::string& result) {
  std::vector<std::string> stale;
  for (const std::string& name : list_directory(directory)) {
    if (keep.count(name) != 0 || !is_checkpoint_filename(plan.filename_pattern, name)) continue;
    // A folder of that name is the user's, never a file a save wrote.
    if (is_directory(join_path(directory, name))) continue;
    stale.push_back(name);
  }
  const std::string index = plan.index_filename();
  std::stable_partition(stale.begin(), stale.end(),
                        [&](const std::string& name) { return name == index; });
  std::optional<OsError> failed;
  for (const std::string& name : stale) {
    const std::string path = join_path(directory, name);
    try {
      remove_file(path);
    } catch (const OsError& error) {
      if (!failed) {
        failed.emplace(error.error_number(), path,
                       "remove a file of an older checkpoint; the new checkpoint is complete, "
                       "remove the file by hand");
      }
    }
  }
  if (!stale.empty() && sync) sync_parent_directory(result);
  if (failed) throw *failed;
}

}  // namespace

struct CheckpointFinisher::State {
  std::string directory;
  ShardPlan plan;
  ShardWriteOptions options;
  // The index under its temporary name, with the descriptor that holds its
  // lock until the rename (see ShardedWriter::State::kept).
  std::string index_temp;
  FileDescriptor index_lock;
  bool finished = false;

  std::string path_of(const std::string& name) const { return join_path(directory, name); }
};

CheckpointFinisher::CheckpointFinisher(std::string directory, ShardPlan plan,
                                       ShardWriteOptions options)
    : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.directory = std::move(directory);
  s.plan = std::move(plan);
  s.options = std::move(options);
  if (!s.plan.is_sharded()) return;
  const std::string json = shard_index_json(
      s.plan, s.options.total_parameters.value_or(s.plan.total_parameters), s.options.metadata);
  const std::string index = s.path_of(s.plan.index_filename());
  check_destination(index);
  FileSink sink(index + ".tmp");
  sink.append(json.data(), json.size());
  s.index_lock = sink.close_and_keep(s.options.fsync);
  s.index_temp = sink.path();
}

CheckpointFinisher::~CheckpointFinisher() {
  State& s = *state_;
  if (!s.finished && s.index_lock && still_named(s.index_lock, s.index_temp)) {
    ::unlink(s.index_temp.c_str());
  }
}

std::string CheckpointFinisher::finish() {
  State& s = *state_;
  if (s.finished) throw std::logic_error("CheckpointFinisher::finish() was called twice");
  std::unordered_set<std::string> keep;
  for (const ShardFile& file : s.plan.files) keep.insert(file.filename);
  std::string result = s.path_of(s.plan.files.front().filename);
  if (s.plan.is_sharded()) {
    // transformers loads model.safetensors when there is one, whatever index
    // lies next to it: an older single file must be gone before the new
    // index makes the folder look complete. A crash in between leaves new
    // shards without an index, which no loader takes for a checkpoint.
    const std::string single = s.path_of(shard_filename(s.plan.filename_pattern, 1, 1));
    struct stat found {};
    if (::lstat(single.c_str(), &found) == 0 && !S_ISDIR(found.st_mode)) {
      try {
        remove_file(single);
      } catch (const OsError& error) {
        throw OsError(error.error_number(), single,
                      "remove the older single-file checkpoint, which loaders would prefer to "
                      "the new index; the new shards are in place but the index was not "
                      "written: remove the file by hand and save again");
      }
    }
    result = s.path_of(s.plan.index_filename());
    check_still_named(s.index_lock, s.index_temp);
    rename_into_place(s.index_temp, result);
    s.index_lock.reset();
    if (s.options.fsync) sync_parent_directory(result);
    keep.insert(s.plan.index_filename());
  }
  s.finished = true;
  // As save_pretrained does: an older checkpoint's files that the new one
  // does not replace would confuse loaders (an old index next to the new
  // single file, shards of another count).
  remove_older_checkpoint(s.directory, s.plan, keep, s.options.fsync, result);
  return result;
}

std::string finish_sharded_checkpoint(const std::string& directory, const ShardPlan& plan,
                                      const ShardWriteOptions& options) {
  return CheckpointFinisher(directory, plan, options).finish();
}

std::string save_sharded_streaming(const TensorSource& next, const std::string& directory,
                                   const ShardPlan& plan, const ShardWriteOptions& options) {
  // The writer checks its arguments before the directory is made.
  ShardedWriter writer(directory, plan, all_files(plan), options);
  create_directories(directory);
  const CheckpointFolderLock lock(directory);
  // Before any data: a failure to write the index costs nothing yet.
  CheckpointFinisher finisher(directory, plan, options);
  writer.write(next);
  writer.commit();
  return finisher.finish();
}

std::string save_sharded_streaming(const TensorSource& next, const std::string& directory,
                                   const std::vector<TensorMeta>& state_dict_meta,
                                   const ShardOptions& options) {
  return save_sharded_streaming(
      next, directory,
      plan_shards(state_dict_meta, options.max_shard_size, options.filename_pattern), options);
}

}  // namespace trinity_stream_saver
