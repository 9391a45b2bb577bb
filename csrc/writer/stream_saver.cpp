// The single-file save behind the public API: one TensorWriter fed by the
// stream loop (writer/stream_loop). Knows torch; knows nothing of Python
// (the bindings wrap a Python iterator as a TensorSource).
#include <trinity_stream_saver/stream_saver.h>

#include "format/file_plan.h"
#include "io/durability.h"
#include "writer/stream_loop.h"
#include "writer/tensor_writer.h"
#include "writer/torch_dtype.h"

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
  write_stream(next, writer, options.overlap, options.poll);
  if (!options.rename) {
    writer.close_and_keep(options.fsync);
    return temp_path;
  }
  writer.close_and_rename(filepath, options.fsync);
  return filepath;
}

std::string finalize(const std::string& tmp_path, const std::string& filepath, bool fsync) {
  check_file_path(filepath, "filepath");
  finalize_file(tmp_path, filepath, fsync);
  return filepath;
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
