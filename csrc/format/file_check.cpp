#include "format/file_check.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <vector>

#include "format/dtype.h"
#include "format/file_plan.h"
#include "format/header.h"

namespace trinity_stream_saver {

namespace {

using Json = nlohmann::json;

struct Span {
  std::uint64_t begin;
  std::uint64_t end;
  std::string name;
};

// The problem with the "__metadata__" entry, or nothing.
std::optional<std::string> check_metadata(const Json& metadata) {
  if (!metadata.is_object()) {
    return "\"__metadata__\" is a JSON " + std::string(metadata.type_name()) +
           ", not an object of strings";
  }
  for (const auto& [key, value] : metadata.items()) {
    if (!value.is_string()) {
      return "\"__metadata__\" maps " + quoted_name(key) + " to a JSON " +
             std::string(value.type_name()) + "; safetensors allows strings only";
    }
  }
  return std::nullopt;
}

// The bytes a tensor entry's dtype and shape need, or the problem with them.
std::optional<std::string> needed_bytes(const std::string& where, const Json& entry,
                                        std::uint64_t* bytes) {
  const auto dtype_field = entry.find("dtype");
  if (dtype_field == entry.end() || !dtype_field->is_string()) {
    return where + " has no \"dtype\" string";
  }
  const std::optional<Dtype> dtype = find_dtype(dtype_field->get_ref<const std::string&>());
  if (!dtype) {
    return where + " has the unknown dtype " + quoted_name(dtype_field->get<std::string>()) +
           " (known: " + supported_dtype_names() + ")";
  }
  const auto shape = entry.find("shape");
  if (shape == entry.end() || !shape->is_array()) return where + " has no \"shape\" list";
  // In the header, a packed dtype's shape counts values (two F4 values per
  // byte), which is what byte_size() takes.
  std::uint64_t values = 1;
  for (const Json& dimension : *shape) {
    if (!dimension.is_number_unsigned()) {
      return where + " has a shape entry " + dimension.dump() + " that is not a size";
    }
    if (__builtin_mul_overflow(values, dimension.get<std::uint64_t>(), &values)) {
      return where + " has a shape whose size overflows 64 bits";
    }
  }
  const std::optional<std::uint64_t> size = byte_size(*dtype, values);
  if (!size) return where + " has a shape that is not a whole number of bytes";
  *bytes = *size;
  return std::nullopt;
}

// The tensor entry's place in the data, or the problem with it.
std::optional<std::string> check_tensor(const std::string& name, const Json& entry,
                                        Span* span) {
  const std::string where = "tensor " + quoted_name(name);
  if (!entry.is_object()) {
    return where + " is a JSON " + std::string(entry.type_name()) + ", not an object";
  }
  std::uint64_t bytes = 0;
  if (std::optional<std::string> problem = needed_bytes(where, entry, &bytes)) return problem;
  const auto offsets = entry.find("data_offsets");
  if (offsets == entry.end() || !offsets->is_array() || offsets->size() != 2 ||
      !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned()) {
    return where + " has no \"data_offsets\" pair of sizes";
  }
  const auto begin = (*offsets)[0].get<std::uint64_t>();
  const auto end = (*offsets)[1].get<std::uint64_t>();
  if (end < begin || end - begin != bytes) {
    return where + " has data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
           "], but its dtype and shape need " + std::to_string(bytes) + " bytes";
  }
  *span = {begin, end, name};
  return std::nullopt;
}

}  // namespace

std::optional<std::uint64_t> decode_header_length(std::string_view prefix) {
  if (prefix.size() < 8) return std::nullopt;
  std::uint64_t length = 0;
  for (int i = 7; i >= 0; --i) length = (length << 8) | static_cast<unsigned char>(prefix[i]);
  return length;
}

std::optional<std::string> check_header_length(std::string_view prefix, std::uint64_t file_size) {
  const std::optional<std::uint64_t> length = decode_header_length(prefix);
  if (!length || file_size < 8) {
    return "the file holds " + std::to_string(file_size) +
           " bytes, fewer than the 8 that give the header length";
  }
  if (*length == 0) {
    return "the header length is 0: the file was never finished (a save writes the "
           "header last)";
  }
  if (*length > kMaxHeaderBytes) {
    return "the header length " + std::to_string(*length) + " is more than the " +
           std::to_string(kMaxHeaderBytes) + " bytes safetensors reads";
  }
  if (*length > file_size - 8) {
    return "the header length " + std::to_string(*length) + " reaches beyond the end of the " +
           std::to_string(file_size) + "-byte file (the file is cut short)";
  }
  return std::nullopt;
}

std::optional<std::string> check_header(std::string_view header, std::uint64_t file_size) {
  if (file_size < 8 || file_size - 8 < header.size()) {
    return "the header reaches beyond the end of the " + std::to_string(file_size) + "-byte file";
  }
  const Json json = Json::parse(header.begin(), header.end(), /*cb=*/nullptr,
                                /*allow_exceptions=*/false);
  if (json.is_discarded()) return std::string("the header is not valid JSON");
  if (!json.is_object()) {
    return "the header is a JSON " + std::string(json.type_name()) + ", not an object";
  }
  std::vector<Span> spans;
  spans.reserve(json.size());
  for (const auto& [name, entry] : json.items()) {
    if (name == kMetadataKey) {
      if (std::optional<std::string> problem = check_metadata(entry)) return problem;
      continue;
    }
    Span span;
    if (std::optional<std::string> problem = check_tensor(name, entry, &span)) return problem;
    spans.push_back(std::move(span));
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t covered = 0;
  for (const Span& span : spans) {
    if (span.begin != covered) {
      return "tensor " + quoted_name(span.name) + " starts at byte " + std::to_string(span.begin) +
             " of the data, but the tensors before it end at byte " + std::to_string(covered) +
             (span.begin < covered ? " (they overlap)" : " (a gap)");
    }
    covered = span.end;
  }
  const std::uint64_t data = file_size - 8 - header.size();
  if (covered != data) {
    return "the tensors take " + std::to_string(covered) + " bytes of data, but the file holds " +
           std::to_string(data) + " after the header" +
           (data < covered ? " (the file is cut short)" : " (extra bytes at the end)");
  }
  return std::nullopt;
}

}  // namespace trinity_stream_saver
