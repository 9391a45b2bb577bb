#include "python/meta_from_python.h"

#include <climits>
#include <string>
#include <unordered_map>

#include "format/dtype.h"
#include <trinity_stream_saver/errors.h>

namespace py = pybind11;

namespace trinity_stream_saver {

namespace {

std::string short_repr(py::handle object) {
  std::string text = py::repr(object).cast<std::string>();
  if (text.size() > 120) text = text.substr(0, 117) + "...";
  return text;
}

std::string type_name(py::handle object) { return Py_TYPE(object.ptr())->tp_name; }

std::string entry_name(py::handle entry, py::handle name) {
  return "state_dict_meta entry " + short_repr(PyUnicode_Check(name.ptr()) ? name : entry);
}

std::string utf8(py::handle text, const std::string& where) {
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(text.ptr(), &size);
  if (data == nullptr) {
    PyErr_Clear();
    throw ValueError(where + " has a name that is not valid Unicode (a lone surrogate?); "
                     "rename the tensor.");
  }
  return std::string(data, static_cast<std::size_t>(size));
}

std::vector<std::int64_t> shape_from_python(py::handle shape, const std::string& where) {
  if (PyUnicode_Check(shape.ptr()) || PyBytes_Check(shape.ptr()) ||
      !PySequence_Check(shape.ptr())) {
    throw TypeError(where + " has a shape of type " + type_name(shape) +
                    "; expected a sequence of ints.");
  }
  py::object dims = py::reinterpret_steal<py::object>(PySequence_Fast(shape.ptr(), ""));
  if (!dims) throw py::error_already_set();
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(dims.ptr());
  std::vector<std::int64_t> result;
  result.reserve(static_cast<std::size_t>(count));
  for (Py_ssize_t i = 0; i < count; ++i) {
    PyObject* dim = PySequence_Fast_GET_ITEM(dims.ptr(), i);
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
    if (!(PyTuple_Check(entry.ptr()) || PyList_Check(entry.ptr())) ||
        PySequence_Size(entry.ptr()) != 3) {
      throw TypeError("state_dict_meta entries must be TensorMeta or (name, dtype, shape) "
                      "tuples; got " + short_repr(entry) + ".");
    }
    py::handle name = PySequence_Fast_GET_ITEM(entry.ptr(), 0);
    py::handle dtype = PySequence_Fast_GET_ITEM(entry.ptr(), 1);
    py::handle shape = PySequence_Fast_GET_ITEM(entry.ptr(), 2);
    const std::string where = entry_name(entry, name);
    if (!PyUnicode_Check(name.ptr())) {
      throw TypeError(where + " has a name of type " + type_name(name) + "; expected a str.");
    }
    TensorMeta row{utf8(name, where), "", shape_from_python(shape, where)};
    std::string spelling;
    if (PyUnicode_Check(dtype.ptr())) {
      spelling = utf8(dtype, where);
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

}  // namespace trinity_stream_saver
