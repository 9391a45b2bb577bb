#include "python/meta_from_python.h"

#include <climits>
#include <string>
#include <unordered_map>

#include "format/dtype.h"
#include <trinity_stream_saver/errors.h>

namespace py = pybind11;

namespace trinity_stream_saver {

std::string short_repr(py::handle object) {
  std::string text = py::repr(object).cast<std::string>();
  if (text.size() > 100) text = text.substr(0, 97) + "...";
  return text;
}

std::string type_name(py::handle object) { return Py_TYPE(object.ptr())->tp_name; }

namespace {

std::string entry_name(py::handle entry, py::handle name) {
  return "state_dict_meta entry " + short_repr(PyUnicode_Check(name.ptr()) ? name : entry);
}

// `text` as UTF-8; `problem` completes the error when it is not valid Unicode.
std::string utf8(py::handle text, const std::string& problem) {
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(text.ptr(), &size);
  if (data == nullptr) {
    PyErr_Clear();
    throw ValueError(problem);
  }
  return std::string(data, static_cast<std::size_t>(size));
}

std::string bad_name(const std::string& where) {
  return where + " has a name that is not valid Unicode (a lone surrogate?); rename the tensor.";
}

// A tuple holding strong references to the items of `sequence`, with its
// real length: a list may be changed, and a subclass may lie about its
// length, while we read it. Nullptr (with the Python error cleared) if
// `sequence` cannot be iterated.
py::object as_tuple(py::handle sequence) {
  py::object tuple = py::reinterpret_steal<py::object>(PySequence_Tuple(sequence.ptr()));
  if (!tuple) {
    if (!PyErr_ExceptionMatches(PyExc_TypeError)) throw py::error_already_set();
    PyErr_Clear();
  }
  return tuple;
}

std::vector<std::int64_t> shape_from_python(py::handle shape, const std::string& where) {
  if (PyUnicode_Check(shape.ptr()) || PyBytes_Check(shape.ptr()) ||
      !PySequence_Check(shape.ptr())) {
    throw TypeError(where + " has a shape of type " + type_name(shape) +
                    "; expected a sequence of ints.");
  }
  const py::object dims = as_tuple(shape);
  if (!dims) {
    throw TypeError(where + " has a shape of type " + type_name(shape) +
                    " that cannot be read as a sequence of ints (a 0-d array?); "
                    "pass a list of ints such as list(tensor.shape).");
  }
  const Py_ssize_t count = PyTuple_GET_SIZE(dims.ptr());
  std::vector<std::int64_t> result;
  result.reserve(static_cast<std::size_t>(count));
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* dim = PyTuple_GET_ITEM(dims.ptr(), i);
    if (PyBool_Check(dim) || !PyIndex_Check(dim)) {
      throw TypeError(where + " has shape " + short_repr(shape) + "; every dimension must be an int.");
    }
    py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(dim));
    if (!index) throw py::error_already_set();
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (overflow > 0) {
      throw ValueError(where + " has shape " + short_repr(shape) +
                       ", a tensor too large to store; check its shape.");
    }
    if (overflow < 0 || value < 0) {
      throw ValueError(where + " has shape " + short_repr(shape) +
                       "; dimensions must not be negative.");
    }
    result.push_back(value);
  }
  return result;
}

}  // namespace

std::vector<TensorMeta> meta_from_python(py::handle state_dict_meta, py::handle resolve_dtype) {
  py::object iterator = py::reinterpret_steal<py::object>(PyObject_GetIter(state_dict_meta.ptr()));
  if (!iterator) throw py::error_already_set();
  // Odd spellings repeat across a model (every entry says "bfloat16");
  // resolve each once.
  std::unordered_map<std::string, std::string> resolved;
  std::vector<TensorMeta> meta;
  while (py::object entry = py::reinterpret_steal<py::object>(PyIter_Next(iterator.ptr()))) {
    py::object fields;
    if (PyTuple_Check(entry.ptr()) || PyList_Check(entry.ptr())) fields = as_tuple(entry);
    if (!fields || PyTuple_GET_SIZE(fields.ptr()) != 3) {
      throw TypeError("state_dict_meta entries must be TensorMeta or (name, dtype, shape) "
                      "tuples; got " + short_repr(entry) + ".");
    }
    py::handle name = PyTuple_GET_ITEM(fields.ptr(), 0);
    py::handle dtype = PyTuple_GET_ITEM(fields.ptr(), 1);
    py::handle shape = PyTuple_GET_ITEM(fields.ptr(), 2);
    const std::string where = entry_name(fields, name);
    if (!PyUnicode_Check(name.ptr())) {
      throw TypeError(where + " has a name of type " + type_name(name) + "; expected a str.");
    }
    TensorMeta row{utf8(name, bad_name(where)), "", shape_from_python(shape, where)};
    std::string spelling;
    if (PyUnicode_Check(dtype.ptr())) {
      spelling = utf8(dtype, where + " has a dtype that is not valid Unicode.");
      if (find_dtype(spelling)) {
        row.dtype = std::move(spelling);
        meta.push_back(std::move(row));
        continue;
      }
      if (auto known = resolved.find(spelling); known != resolved.end()) {
        row.dtype = known->second;
        meta.push_back(std::move(row));
        continue;
      }
    }
    row.dtype = resolve_dtype(name, dtype).cast<std::string>();
    if (!spelling.empty()) resolved.emplace(std::move(spelling), row.dtype);
    meta.push_back(std::move(row));
  }
  if (PyErr_Occurred()) throw py::error_already_set();
  return meta;
}

std::optional<Metadata> metadata_from_python(py::handle metadata) {
  if (metadata.is_none()) return std::nullopt;
  Metadata result;
  for (py::handle pair : metadata) {
    const py::tuple key_value = py::reinterpret_borrow<py::tuple>(pair);
    const std::string where = "metadata key " + short_repr(key_value[0]);
    std::string key = utf8(key_value[0], where + " is not valid Unicode (a lone surrogate, "
                                                  "as os.fsdecode makes?); fix the key.");
    std::string value = utf8(key_value[1], "the value of " + where +
                                               " is not valid Unicode (a lone surrogate, as "
                                               "os.fsdecode makes?); fix the value.");
    result.emplace_back(std::move(key), std::move(value));
  }
  return result;
}

}  // namespace trinity_stream_saver
