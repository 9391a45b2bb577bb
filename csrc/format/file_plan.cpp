#include "format/file_plan.h"

#include <algorithm>

#include <trinity_stream_saver/errors.h>

namespace trinity_stream_saver {

std::string quoted_name(const std::string& name) {
  // A name can be megabytes long; an error message needs its start.
  constexpr std::size_t kShown = 100;
  if (name.size() <= kShown) return "'" + name + "'";
  std::size_t cut = kShown;
  // Do not cut a UTF-8 sequence in half.
  while (cut > 0 && (static_cast<unsigned char>(name[cut]) & 0xC0) == 0x80) --cut;
  // Appended piece by piece: GCC 12 warns (-Wrestrict, a false positive)
  // on a chain of operator+ that starts with a string literal.
  std::string quoted = "'";
  quoted.append(name, 0, cut);
  quoted += "...' (" + std::to_string(name.size()) + " bytes)";
  return quoted;
}

void check_tensor_name(const std::string& name, const std::unordered_set<std::string>& seen,
                       const std::string& where) {
  if (name == kMetadataKey) {
    throw ValueError(where + ": the name '__metadata__' is reserved " +
                     "by safetensors for the file's metadata; rename the tensor.");
  }
  if (seen.count(name) != 0) {
    throw ValueError(where + ": duplicate tensor name " + quoted_name(name) +
                     "; every tensor in a safetensors file needs a unique name.");
  }
}

std::string unsupported_dtype_message(const std::string& where, const std::string& dtype) {
  return where + " has dtype " + dtype +
         ", which safetensors cannot store. Supported safetensors dtypes: " +
         supported_dtype_names() + ". Convert the tensor (e.g. .to(torch.float32)).";
}

CheckedMeta check_meta(const TensorMeta& meta) {
  const std::string where = "state_dict_meta entry " + quoted_name(meta.name);
  const std::optional<Dtype> dtype = find_dtype(meta.dtype);
  if (!dtype) throw ValueError(unsupported_dtype_message(where, meta.dtype));
  const std::string too_large =
      where + " describes a tensor too large to store (2^64 bytes or more); check its shape.";
  std::uint64_t values = static_cast<std::uint64_t>(dtype->values_per_item);
  for (const std::int64_t dim : meta.shape) {
    if (dim < 0) {
      throw ValueError(where + " has a negative dimension in its shape; " +
                       "shapes must be non-negative integers.");
    }
    if (__builtin_mul_overflow(values, static_cast<std::uint64_t>(dim), &values)) {
      throw ValueError(too_large);
    }
  }
  std::optional<std::vector<std::int64_t>> shape = header_shape(*dtype, meta.shape);
  if (!shape) {
    if (meta.shape.empty()) {
      throw ValueError(where + ": a 0-dim tensor of packed dtype " + meta.dtype +
                       " cannot be stored; give it at least one dimension.");
    }
    throw ValueError(too_large);
  }
  const std::optional<std::uint64_t> bytes = byte_size(*dtype, values);
  if (!bytes) throw ValueError(too_large);
  return {*dtype, std::move(*shape), *bytes};
}

FileLayout plan_file(const std::vector<TensorMeta>& meta, const std::optional<Metadata>& metadata,
                     std::vector<std::string>* entries) {
  HeaderJson json;
  if (metadata) {
    json.append(metadata_entry(*metadata));
    if (padded_header_size(json.size()) > kMaxHeaderBytes) {
      throw ValueError("metadata would take " + std::to_string(json.size()) +
                       " bytes of the header, more than the " +
                       std::to_string(kMaxHeaderBytes) +
                       " bytes safetensors can read; store less in metadata.");
    }
  }
  std::unordered_set<std::string> names;
  std::uint64_t offset = 0;
  std::uint64_t largest = 0;
  for (const TensorMeta& row : meta) {
    check_tensor_name(row.name, names, "state_dict_meta");
    names.insert(row.name);
    const CheckedMeta checked = check_meta(row);
    std::uint64_t end = 0;
    // Offsets are unsigned 64-bit in safetensors; within that range the
    // reserved size must match the original's, which uses Python ints.
    if (__builtin_add_overflow(offset, checked.bytes, &end)) {
      throw ValueError("state_dict_meta entry " + quoted_name(row.name) +
                       " describes a tensor too large to store (the data would reach 2^64 "
                       "bytes or more); check its shape.");
    }
    std::string entry = tensor_entry(row.name, checked.dtype, checked.header_shape, offset, end);
    if (entries != nullptr) entries->push_back(entry);
    json.append(std::move(entry));
    offset = end;
    largest = std::max(largest, checked.bytes);
  }
  const std::uint64_t reserved = padded_header_size(json.size());
  if (reserved > kMaxHeaderBytes) {
    throw ValueError("the header described by state_dict_meta would take " +
                     std::to_string(reserved) + " bytes, more than the " +
                     std::to_string(kMaxHeaderBytes) +
                     " bytes safetensors can read; split the checkpoint into "
                     "several files.");
  }
  return {reserved, offset, largest};
}

}  // namespace trinity_stream_saver
