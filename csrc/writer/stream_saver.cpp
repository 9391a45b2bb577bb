// The single-file save behind the public API: one TensorWriter fed by the
// stream loop (writer/stream_loop). Knows torch; knows nothing of Python
// (the bindings wrap a Python iterator as a TensorSource).
#include <trinity_stream_saver/stream_saver.h>

#include <cerrno>

#include "format/file_plan.h"
#include "io/durability.h"
#include "io/system_calls.h"
#include "io/temp_file.h"
#include "writer/stream_loop.h"
#include "writer/tensor_writer.h"
#include "writer/torch_dtype.h"
#include "writer/verify_file.h"

namespace trinity_stream_saver {

namespace {

// A destination must name a file: "dir/" would make the temporary file
// "dir/.tmp", and "" would make it ".tmp" in the working directory.
void check_file_path(const std::string& path, const char* argument) {
  if (path.empty()) throw ValueError(std::string(argument) + " is empty; give a file name.");
  if (path.back() == '/') {
    throw ValueError(std::string(argument) + " '" + path +
                     "' ends with a path separator, so it names a directory; give a file "
                     "name inside it (e.g. '" + path + "model.safetensors').");
  }
}

}  // namespace

std::string save_safetensors_streaming(const TensorSource& next, const std::string& filepath,
                                       const std::vector<TensorMeta>& state_dict_meta,
                                       const SaveOptions& options) {
  check_file_path(filepath, "filepath");
  // Fails before any work: the rename would refuse the destination anyway.
  if (options.rename) check_destination(filepath);
  const std::string temp_path = filepath + ".tmp";
  TensorWriter writer(temp_path, state_dict_meta, options.metadata, options.poll);
  write_stream(next, writer, options.overlap, options.max_queued_bytes, options.poll);
  if (!options.rename) {
    writer.close_and_keep(options.fsync);
    return temp_path;
  }
  writer.close_and_rename(filepath, options.fsync);
  return filepath;
}

std::string finalize(const std::string& tmp_path, const std::string& filepath, bool fsync) {
  check_file_path(filepath, "filepath");
  // The lock is held until the rename is done: a save to the same
  // destination that starts meanwhile fails instead of replacing the file
  // being finalized.
  FileDescriptor fd = open_finished_temp_file(tmp_path);
  if (std::optional<std::string> problem = safetensors_file_problem(fd.get(), tmp_path)) {
    throw ValueError("cannot finalize '" + tmp_path + "': it is not a complete safetensors " +
                     "file (" + *problem + "). It was left where it is, and '" + filepath +
                     "' was not touched.");
  }
  if (fsync && system_calls().fdatasync(fd.get()) != 0) {
    throw OsError(errno, tmp_path, "sync to disk");
  }
  check_still_named(fd, tmp_path);
  rename_into_place(tmp_path, filepath);
  if (fsync) sync_after_rename(tmp_path, filepath);
  return filepath;
}

std::vector<TensorMeta> collect_state_dict_meta(const TensorSource& next) {
  std::vector<TensorMeta> meta;
  for (;;) {
    std::optional<std::pair<std::string, at::Tensor>> item = next();
    if (!item) return meta;
    const at::Tensor& tensor = item->second;
    if (const std::optional<Dtype> dtype = safetensors_dtype(tensor.scalar_type())) {
      meta.push_back({std::move(item->first), std::string(dtype->name), tensor.sizes().vec()});
    }
  }  // `item` is released here, before next() runs again.
}

std::uint64_t reserved_header_size(const std::vector<TensorMeta>& state_dict_meta,
                                   const std::optional<Metadata>& metadata) {
  return plan_file(state_dict_meta, metadata).header_size;
}

std::uint64_t data_size(const std::vector<TensorMeta>& state_dict_meta) {
  return plan_file(state_dict_meta, std::nullopt).data_size;
}

TensorMeta tensor_meta(const std::string& name, const at::Tensor& tensor) {
  const std::optional<Dtype> dtype = safetensors_dtype(tensor.scalar_type());
  if (!dtype) {
    throw ValueError(unsupported_dtype_message("tensor " + quoted_name(name),
                                               c10::toString(tensor.scalar_type())));
  }
  return {name, std::string(dtype->name), tensor.sizes().vec()};
}

}  // namespace trinity_stream_saver
