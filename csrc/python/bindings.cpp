// The Python face of the writer: pulls (name, tensor) items from a Python
// iterator, hands each tensor to the TensorWriter with the GIL released,
// and turns our typed C++ errors into the matching Python exceptions.
// Translation only: every check on tensors and metadata lives below.
#include <Python.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <vector>

#include <trinity_stream_saver/errors.h>
#include <trinity_stream_saver/shard_plan.h>
#include <trinity_stream_saver/sharded_saver.h>
#include <trinity_stream_saver/stream_saver.h>

#include "format/dtype.h"
#include "format/file_check.h"
#include "format/file_plan.h"
#include "format/header.h"
#include "format/shard_index.h"
#include "io/part_sink.h"
#include "format/shard_plan.h"
#include "python/meta_from_python.h"
#include "writer/background_writer.h"
#include "writer/released_memory.h"
#include "writer/tensor_writer.h"
#include "writer/torch_dtype.h"

namespace py = pybind11;

namespace trinity_stream_saver {
namespace {

// Raises KeyboardInterrupt (or whatever a signal handler raised) in C++ form.
void raise_pending_signals() {
  if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

// The same, from code that runs with the GIL released: takes it briefly.
void raise_pending_signals_without_gil() {
  py::gil_scoped_acquire gil;
  raise_pending_signals();
}

// Takes the name and tensor out of one item; the caller drops the item.
void unpack_item(py::handle item, std::size_t index, std::string* name,
                 at::Tensor* tensor) {
  const std::string position = "item " + std::to_string(index);
  if (!(PyTuple_Check(item.ptr()) || PyList_Check(item.ptr())) ||
      PySequence_Size(item.ptr()) != 2) {
    throw TypeError("tensor_iter must yield (name, tensor) pairs, but " + position +
                    " is " + type_name(item) + " " + short_repr(item) + ".");
  }
  py::object key = py::reinterpret_steal<py::object>(PySequence_GetItem(item.ptr(), 0));
  py::object value = py::reinterpret_steal<py::object>(PySequence_GetItem(item.ptr(), 1));
  if (!key || !value) throw py::error_already_set();
  if (!PyUnicode_Check(key.ptr())) {
    throw TypeError("tensor_iter must yield (name, tensor) pairs with a str name, but " +
                    position + " has a name of " + type_name(key) + " " +
                    short_repr(key) + ".");
  }
  Py_ssize_t size = 0;
  const char* utf8 = PyUnicode_AsUTF8AndSize(key.ptr(), &size);
  if (utf8 == nullptr) {
    PyErr_Clear();
    throw ValueError("tensor_iter " + position + " has the name " + short_repr(key) +
                     ", which is not valid Unicode (a lone surrogate?); rename the tensor.");
  }
  *name = std::string(utf8, static_cast<std::size_t>(size));
  if (!THPVariable_Check(value.ptr())) {
    throw TypeError("tensor_iter must yield (name, tensor) pairs, but " + position +
                    " (" + quoted_name(*name) + ") holds " + type_name(value) +
                    " instead of a torch.Tensor.");
  }
  *tensor = THPVariable_Unpack(value.ptr());
}

// Pulls the next (name, tensor) item; false at the end of the iterator.
bool next_item(py::handle iterator, std::size_t index, std::string* name, at::Tensor* tensor) {
  raise_pending_signals();
  // The item lives only in this scope: once its name and tensor are taken,
  // nothing of ours keeps the Python item (or a second tensor) alive.
  py::object item = py::reinterpret_steal<py::object>(PyIter_Next(iterator.ptr()));
  if (!item) {
    if (PyErr_Occurred()) throw py::error_already_set();
    return false;
  }
  unpack_item(item, index, name, tensor);
  return true;
}

// iter(iterable), or the Python error it raised.
py::object iterator_of(py::handle iterable) {
  py::object iterator = py::reinterpret_steal<py::object>(PyObject_GetIter(iterable.ptr()));
  if (!iterator) throw py::error_already_set();
  return iterator;
}

// The Python iterator as the core's TensorSource: takes the GIL to call
// next() and checks for Ctrl-C first.
TensorSource python_source(py::handle iterator) {
  return [iterator, index = std::size_t{0}]() mutable
         -> std::optional<std::pair<std::string, at::Tensor>> {
    py::gil_scoped_acquire gil;
    std::string name;
    at::Tensor tensor;
    if (!next_item(iterator, index, &name, &tensor)) return std::nullopt;
    ++index;
    return std::make_pair(std::move(name), std::move(tensor));
  };
}

py::bytes save(py::handle tensor_iter, const std::string& filepath, py::handle state_dict_meta,
               py::handle resolve_dtype, py::handle metadata, bool rename, bool sync,
               bool overlap, std::optional<std::uint64_t> max_queued_bytes) {
  const std::vector<TensorMeta> meta = meta_from_python(state_dict_meta, resolve_dtype);
  py::object iterator = iterator_of(tensor_iter);
  SaveOptions options;
  options.rename = rename;
  options.fsync = sync;
  options.overlap = overlap;
  options.max_queued_bytes = max_queued_bytes;
  options.metadata = metadata_from_python(metadata);
  // Between chunks of a large tensor, and while waiting for the writer
  // thread, take the GIL back briefly so that Ctrl-C stops a multi-GB
  // write within a chunk's time.
  options.poll = raise_pending_signals_without_gil;
  std::string written;
  {
    py::gil_scoped_release nogil;
    written = save_safetensors_streaming(python_source(iterator), filepath, meta, options);
  }
  return py::bytes(written);
}

// [(name, dtype, shape)] for collect_state_dict_meta.
py::list collect_state_dict_meta_from_python(py::handle tensor_iter) {
  py::object iterator = iterator_of(tensor_iter);
  std::vector<TensorMeta> meta;
  {
    py::gil_scoped_release nogil;
    meta = collect_state_dict_meta(python_source(iterator));
  }
  py::list rows;
  for (const TensorMeta& row : meta) {
    rows.append(py::make_tuple(py::str(row.name), py::str(row.dtype), py::cast(row.shape)));
  }
  return rows;
}

std::uint64_t reserved_header_size_from_python(py::handle state_dict_meta,
                                               py::handle resolve_dtype, py::handle metadata) {
  return reserved_header_size(meta_from_python(state_dict_meta, resolve_dtype),
                              metadata_from_python(metadata));
}

std::uint64_t data_size_from_python(py::handle state_dict_meta, py::handle resolve_dtype) {
  return data_size(meta_from_python(state_dict_meta, resolve_dtype));
}

ShardPlan plan_shards_from_python(py::handle state_dict_meta, py::handle resolve_dtype,
                                  std::uint64_t max_shard_size,
                                  const std::string& filename_pattern) {
  return plan_shards(meta_from_python(state_dict_meta, resolve_dtype), max_shard_size,
                     filename_pattern);
}

// (filename, [tensor names], bytes) for each file, in file-number order.
py::list plan_files(const ShardPlan& plan) {
  py::list files;
  for (const ShardFile& file : plan.files) {
    py::list names;
    for (const TensorMeta& row : file.tensors) names.append(py::str(row.name));
    files.append(py::make_tuple(py::str(file.filename), names, file.bytes));
  }
  return files;
}

ShardWriteOptions write_options(py::handle metadata,
                                std::optional<std::uint64_t> total_parameters, bool sync,
                                bool overlap) {
  ShardWriteOptions options;
  options.fsync = sync;
  options.overlap = overlap;
  options.metadata = metadata_from_python(metadata);
  options.total_parameters = total_parameters;
  options.poll = raise_pending_signals_without_gil;
  return options;
}

py::bytes save_sharded(py::handle tensor_iter, const std::string& directory, const ShardPlan& plan,
                       py::handle metadata, bool sync, bool overlap) {
  py::object iterator = iterator_of(tensor_iter);
  const ShardWriteOptions options = write_options(metadata, std::nullopt, sync, overlap);
  std::string written;
  {
    py::gil_scoped_release nogil;
    written = save_sharded_streaming(python_source(iterator), directory, plan, options);
  }
  return py::bytes(written);
}

// The phases of a sharded save for Python (the distributed save):
// a ShardedWriter for the files named by `filenames` (all when None).
std::unique_ptr<ShardedWriter> make_sharded_writer(
    const ShardPlan& plan, const std::string& directory,
    const std::optional<std::vector<std::string>>& filenames, py::handle metadata, bool sync,
    bool overlap) {
  const std::vector<std::size_t> files = filenames ? file_indices(plan, *filenames) : all_files(plan);
  return std::make_unique<ShardedWriter>(directory, plan, files,
                                         write_options(metadata, std::nullopt, sync, overlap));
}

void sharded_writer_write(ShardedWriter& writer, py::handle tensor_iter) {
  py::object iterator = iterator_of(tensor_iter);
  py::gil_scoped_release nogil;
  writer.write(python_source(iterator));
}

std::vector<py::bytes> as_bytes(const std::vector<std::string>& paths) {
  return std::vector<py::bytes>(paths.begin(), paths.end());
}

py::bytes finish_sharded_from_python(const ShardPlan& plan, const std::string& directory,
                                     py::handle metadata,
                                     std::optional<std::uint64_t> total_parameters, bool sync) {
  const ShardWriteOptions options = write_options(metadata, total_parameters, sync, false);
  std::string written;
  {
    py::gil_scoped_release nogil;
    written = finish_sharded_checkpoint(directory, plan, options);
  }
  return py::bytes(written);
}

std::unique_ptr<CheckpointFinisher> make_checkpoint_finisher(
    const ShardPlan& plan, const std::string& directory, py::handle metadata,
    std::optional<std::uint64_t> total_parameters, bool sync) {
  const ShardWriteOptions options = write_options(metadata, total_parameters, sync, false);
  py::gil_scoped_release nogil;
  return std::make_unique<CheckpointFinisher>(directory, plan, options);
}

py::bytes finish_checkpoint(CheckpointFinisher& finisher) {
  std::string written;
  {
    py::gil_scoped_release nogil;
    written = finisher.finish();
  }
  return py::bytes(written);
}

void finalize_without_gil(const std::string& temp_path, const std::string& destination, bool sync) {
  py::gil_scoped_release nogil;
  finalize(temp_path, destination, sync);
}

void check_file_without_gil(const std::string& path) {
  py::gil_scoped_release nogil;
  check_safetensors_file(path);
}

// ---- Object storage: files streamed in order into upload parts ----
//
// One file of an object-store save: a TensorWriter in order over a
// PartSink. Python drives it tensor by tensor (it decides which upload a
// tensor goes to, since a sharded save has a shard's upload and a large
// tensor's own upload open at once). Each filled part goes to
// `upload(number, memoryview, release)`, called with the GIL, which queues
// the upload on a Python thread and returns; that thread calls
// release(ok) exactly once, when it no longer reads the memoryview. The
// Python side calls finish() or, on failure, wait_until_released() before
// it drops this object, so that no memoryview outlives the buffers.
class PartUpload final {
 public:
  PartUpload(py::handle state_dict_meta, py::handle resolve_dtype, py::handle metadata,
             const std::string& destination, std::size_t part_size, std::size_t max_parts,
             py::object upload)
      : upload_(std::move(upload)),
        sink_(destination, part_size, max_parts,
              [this](const Part& part) { hand_off(part); }, raise_pending_signals_without_gil),
        writer_(sink_, meta_from_python(state_dict_meta, resolve_dtype),
                metadata_from_python(metadata), raise_pending_signals_without_gil) {}

  // Writes item `index` of the caller's iterator, a (name, tensor) pair.
  void write(py::handle item, std::size_t index) {
    std::string name;
    at::Tensor tensor;
    unpack_item(item, index, &name, &tensor);
    py::gil_scoped_release nogil;
    writer_.write(name, tensor);
  }

  // Checks that every row was written, sends the last part and waits for
  // every upload; returns the number of parts.
  std::size_t finish() {
    py::gil_scoped_release nogil;
    writer_.finish_in_order();
    sink_.finish();
    return sink_.parts();
  }

  void wait_until_released() {
    py::gil_scoped_release nogil;
    sink_.wait_until_released();
  }

 private:
  // Runs on the writing thread, which holds no GIL.
  void hand_off(const Part& part) {
    py::gil_scoped_acquire gil;
    py::object view = py::reinterpret_steal<py::object>(PyMemoryView_FromMemory(
        const_cast<char*>(part.data), static_cast<Py_ssize_t>(part.size), PyBUF_READ));
    if (!view) throw py::error_already_set();
    PartSink* sink = &sink_;
    const std::size_t number = part.number;
    upload_(number, view, py::cpp_function([sink, number](bool uploaded) {
              sink->release(number, uploaded);
            }));
  }

  py::object upload_;
  PartSink sink_;
  TensorWriter writer_;
};

std::optional<std::string> safetensors_dtype_name(at::ScalarType scalar_type) {
  const std::optional<Dtype> dtype = safetensors_dtype(scalar_type);
  if (!dtype) return std::nullopt;
  return std::string(dtype->name);
}

std::vector<std::string> supported_dtype_list() {
  std::vector<std::string> names;
  for (const Dtype& dtype : supported_dtypes()) names.emplace_back(dtype.name);
  return names;
}

void translate_errors(std::exception_ptr error) {
  try {
    if (error) std::rethrow_exception(error);
  } catch (const TypeError& e) {
    PyErr_SetString(PyExc_TypeError, e.what());
  } catch (const ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const OsError& e) {
    // OSError(errno, strerror, filename) picks the subclass for errno
    // (FileNotFoundError, PermissionError, ...) and shows the filename.
    py::object filename = py::reinterpret_steal<py::object>(
        PyUnicode_DecodeFSDefaultAndSize(e.path().data(), e.path().size()));
    py::object exception = py::reinterpret_steal<py::object>(PyObject_CallFunction(
        PyExc_OSError, "isO", e.error_number(), e.reason().c_str(), filename.ptr()));
    if (exception) {
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exception.ptr())), exception.ptr());
    }
  }
}

}  // namespace
}  // namespace trinity_stream_saver

PYBIND11_MODULE(_C, m) {
  namespace tss = trinity_stream_saver;
  m.doc() = "C++ core of trinity_stream_saver; use the Python package's API.";
  py::register_exception_translator(&tss::translate_errors);
  m.def("save", &tss::save, py::arg("tensor_iter"), py::arg("filepath"),
        py::arg("state_dict_meta"), py::arg("resolve_dtype"), py::arg("metadata"),
        py::arg("rename"), py::arg("sync"), py::arg("overlap"), py::arg("max_queued_bytes"),
        "Streams (name, tensor) items into filepath + '.tmp'; renames it to filepath "
        "if rename. Returns the path written (bytes).");
  m.def("finalize", &tss::finalize_without_gil, py::arg("temp_path"), py::arg("destination"),
        py::arg("sync"), "Optionally syncs temp_path, renames it, syncs the directory.");
  m.def("collect_state_dict_meta", &tss::collect_state_dict_meta_from_python,
        py::arg("tensor_iter"),
        "(name, dtype, shape) of every (name, tensor) item whose dtype safetensors stores.");
  m.def("reserved_header_size", &tss::reserved_header_size_from_python, py::arg("state_dict_meta"),
        py::arg("resolve_dtype"), py::arg("metadata"),
        "N: the header length a save of state_dict_meta reserves.");
  py::class_<tss::ShardPlan>(m, "ShardPlan",
                             "A shard plan made in C++ (see trinity_stream_saver.plan_shards).")
      .def_readonly("filename_pattern", &tss::ShardPlan::filename_pattern)
      .def_readonly("total_size", &tss::ShardPlan::total_size)
      .def_readonly("total_parameters", &tss::ShardPlan::total_parameters)
      .def_property_readonly("is_sharded", &tss::ShardPlan::is_sharded)
      .def_property_readonly("index_filename", &tss::ShardPlan::index_filename)
      .def_property_readonly("files", &tss::plan_files,
                             "(filename, [tensor names], bytes) per file, in order.");
  m.def("plan_shards", &tss::plan_shards_from_python, py::arg("state_dict_meta"),
        py::arg("resolve_dtype"), py::arg("max_shard_size"), py::arg("filename_pattern"),
        "The shard plan of state_dict_meta, as huggingface_hub's split_torch_state_dict_into_shards.");
  m.def("data_size", &tss::data_size_from_python, py::arg("state_dict_meta"),
        py::arg("resolve_dtype"),
        "Bytes of tensor data that state_dict_meta describes.");
  m.def("save_sharded", &tss::save_sharded, py::arg("tensor_iter"), py::arg("directory"),
        py::arg("plan"), py::arg("metadata"), py::arg("sync"), py::arg("overlap"),
        "Writes, commits and finishes a sharded checkpoint. Returns the index or single file's path.");
  py::class_<tss::ShardedWriter>(m, "ShardedWriter",
                                 "Phases 1 and 2 of a sharded save (sharded_saver.h).")
      .def(py::init(&tss::make_sharded_writer), py::arg("plan"), py::arg("directory"),
           py::arg("filenames"), py::arg("metadata"), py::arg("sync"), py::arg("overlap"))
      .def("write", &tss::sharded_writer_write, py::arg("tensor_iter"),
           "Pulls every item; writes this writer's files under temporary names.")
      .def("commit", [](tss::ShardedWriter& w) {
             std::vector<std::string> paths;
             {
               py::gil_scoped_release nogil;
               paths = w.commit();
             }
             return tss::as_bytes(paths);
           }, "Renames the temporary files; returns the final paths.")
      .def("abort", &tss::ShardedWriter::abort, "Removes the temporary files not yet renamed.");
  m.def("finish_sharded_checkpoint", &tss::finish_sharded_from_python, py::arg("plan"),
        py::arg("directory"), py::arg("metadata"), py::arg("total_parameters"), py::arg("sync"),
        "Writes the index (when sharded) and removes an older checkpoint's files.");
  py::class_<tss::CheckpointFolderLock>(
      m, "CheckpointFolderLock",
      "Holds a folder for one sharded save (sharded_saver.h); OSError EBUSY while another holds it.")
      .def(py::init<const std::string&>(), py::arg("directory"))
      .def("release", &tss::CheckpointFolderLock::release, "Lets the next save take the folder.");
  py::class_<tss::CheckpointFinisher>(
      m, "CheckpointFinisher",
      "Phase 3 of a sharded save, the index written before phase 2 (sharded_saver.h).")
      .def(py::init(&tss::make_checkpoint_finisher), py::arg("plan"), py::arg("directory"),
           py::arg("metadata"), py::arg("total_parameters"), py::arg("sync"))
      .def("finish", &tss::finish_checkpoint,
           "Puts the index in place and removes an older checkpoint's files; returns the path.");
  py::class_<tss::PartUpload>(m, "PartUpload",
                              "One safetensors file streamed in order into upload parts.")
      .def(py::init<py::handle, py::handle, py::handle, const std::string&, std::size_t,
                    std::size_t, py::object>(),
           py::arg("state_dict_meta"), py::arg("resolve_dtype"), py::arg("metadata"),
           py::arg("destination"), py::arg("part_size"), py::arg("max_parts"),
           py::arg("upload"))
      .def("write", &tss::PartUpload::write, py::arg("item"), py::arg("index"))
      .def("finish", &tss::PartUpload::finish)
      .def("wait_until_released", &tss::PartUpload::wait_until_released);
  m.def("shard_file_metadata", [](const tss::ShardPlan& plan, py::handle metadata) {
          return tss::shard_file_metadata(plan, tss::metadata_from_python(metadata));
        }, py::arg("plan"), py::arg("metadata"),
        "The __metadata__ of each file of a sharded save.");
  m.def("shard_filename", &tss::shard_filename, py::arg("pattern"), py::arg("number"),
        py::arg("count"), "The name of file number of count (from 1) a save with pattern writes.");
  m.def("is_checkpoint_filename", &tss::is_checkpoint_filename, py::arg("pattern"),
        py::arg("filename"), "Whether a save with pattern writes a file of that name.");
  m.def("shard_index_json", [](const tss::ShardPlan& plan, py::handle metadata) {
          return py::bytes(tss::shard_index_json(plan, plan.total_parameters,
                                                 tss::metadata_from_python(metadata)));
        }, py::arg("plan"), py::arg("metadata"),
        "The index of a sharded save, as transformers writes it.");
  m.def("check_file", &tss::check_file_without_gil, py::arg("path"),
        "Raises ValueError naming path and the problem unless it is a complete "
        "safetensors file (header length, JSON, dtypes, offsets covering the data, size).");
  // The same checks on bytes the caller read (the command line reads an
  // object's first 8 bytes, then its header, by HTTP range requests).
  m.def("header_length_problem", [](py::bytes prefix, std::uint64_t file_size) {
          return tss::check_header_length(std::string(prefix), file_size);
        }, py::arg("prefix"), py::arg("file_size"),
        "What is wrong with a file of file_size bytes starting with prefix (its first 8 "
        "bytes) as far as its header length goes, or None.");
  m.def("header_problem", [](py::bytes header, std::uint64_t file_size) {
          return tss::check_header(std::string(header), file_size);
        }, py::arg("header"), py::arg("file_size"),
        "What is wrong with the header (the N bytes after the length) of a file of "
        "file_size bytes, or None if the file is complete.");
  m.def("safetensors_dtype", &tss::safetensors_dtype_name, py::arg("dtype"),
        "The safetensors dtype name for a torch.dtype, or None if it cannot be saved.");
  m.def("release_file_pages", &tss::release_file_pages, py::arg("tensor"),
        py::call_guard<py::gil_scoped_release>(),
        "Drops the process's pages of tensor's storage if it lies in a mapping of a file "
        "(a later read faults them back in); returns the bytes released, 0 for other memory.");
  m.def("supported_dtypes", &tss::supported_dtype_list,
        "The safetensors dtype names this library writes.");
  // The torch this extension was compiled against: torch's C++ ABI changes
  // between releases, so the package refuses to run beside another one.
  m.attr("BUILT_WITH_TORCH") = TSS_TORCH_VERSION;
  m.def("short_repr", [](py::handle object) { return tss::short_repr(object); },
        py::arg("object"), "repr(object), cut short for error messages.");
  m.attr("MAX_HEADER_BYTES") = tss::kMaxHeaderBytes;
  m.attr("CHUNK_BYTES") = tss::TensorWriter::kChunkBytes;
  m.attr("INLINE_BYTES") = tss::kInlineBytes;
}
