// The stream loop behind the public API: pulls (name, tensor) items from a
// TensorSource and hands them to the TensorWriter, in turn or overlapped.
// Knows torch; knows nothing of Python (the bindings wrap a Python
// iterator as a TensorSource).
#include <trinity_stream_saver/stream_saver.h>

#include "format/file_plan.h"
#include "io/durability.h"
#include "writer/background_writer.h"
#include "writer/tensor_writer.h"
#include "writer/torch_dtype.h"

namespace trinity_stream_saver {

namespace {

// Default mode: each tensor is written, then released, before the source
// is asked for the next one, so only one tensor is alive at a time.
void write_in_turn(const TensorSource& next, TensorWriter& writer) {
  for (;;) {
    std::optional<std::pair<std::string, at::Tensor>> item = next();
    if (!item) return;
    writer.write(item->first, item->second);
  }  // `item` is released here, before next() runs again.
}

// Overlap mode: a worker thread writes tensor k while the source produces
// tensor k+1.
void write_overlapped(const TensorSource& next, TensorWriter& writer,
                      const std::function<void()>& poll) {
  BackgroundWriter background(writer, poll);
  at::Tensor finished;
  for (;;) {
    std::optional<std::pair<std::string, at::Tensor>> item = next();
    if (!item) break;
    background.write(std::move(item->first), std::move(item->second), &finished);
    finished.reset();
  }
  background.finish(&finished);
}

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
  if (options.overlap) {
    write_overlapped(next, writer, options.poll);
  } else {
    write_in_turn(next, writer);
  }
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
