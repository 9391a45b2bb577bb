#include "format/header.h"

#include <cassert>
#include <nlohmann/json.hpp>

namespace trinity_stream_saver {

// nlohmann's ensure_ascii output matches Python's json.dumps: every
// character outside 0x20-0x7E becomes \uXXXX (lowercase hex, surrogate
// pairs above U+FFFF) except the short escapes \b \f \n \r \t.
std::string json_string(std::string_view text) {
  // Most tensor names are plain printable ASCII and need no escaping; they
  // skip building a JSON value (it matters with 50,000 small tensors).
  bool plain = true;
  for (const char c : text) {
    if (c < 0x20 || c > 0x7e || c == '"' || c == '\\') {
      plain = false;
      break;
    }
  }
  if (plain) {
    std::string quoted;
    quoted.reserve(text.size() + 2);
    quoted += '"';
    quoted += text;
    quoted += '"';
    return quoted;
  }
  return nlohmann::json(std::string(text))
      .dump(/*indent=*/-1, /*indent_char=*/' ', /*ensure_ascii=*/true);
}

namespace {

void append_int_array(std::string& out, std::span<const std::int64_t> values) {
  out += '[';
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (i != 0) out += ',';
    out += std::to_string(values[i]);
  }
  out += ']';
}

}  // namespace

std::string tensor_entry(std::string_view name, const Dtype& dtype,
                         std::span<const std::int64_t> shape,
                         std::uint64_t begin, std::uint64_t end) {
  std::string out = json_string(name);
  out += R"(:{"dtype":)";
  out += json_string(dtype.name);
  out += R"(,"shape":)";
  append_int_array(out, shape);
  out += R"(,"data_offsets":[)";
  out += std::to_string(begin);
  out += ',';
  out += std::to_string(end);
  out += "]}";
  return out;
}

std::string metadata_entry(const Metadata& metadata) {
  std::string out = json_string(kMetadataKey);
  out += ":{";
  for (std::size_t i = 0; i < metadata.size(); ++i) {
    if (i != 0) out += ',';
    out += json_string(metadata[i].first);
    out += ':';
    out += json_string(metadata[i].second);
  }
  out += '}';
  return out;
}

std::uint64_t HeaderJson::size_with(const std::string& entry) const {
  return size_ + entry.size() + (entries_.empty() ? 0 : 1);
}

void HeaderJson::append(std::string entry) {
  size_ = size_with(entry);
  entries_.push_back(std::move(entry));
}

std::string HeaderJson::str() const {
  std::string out;
  out.reserve(size_);
  out += '{';
  for (std::size_t i = 0; i < entries_.size(); ++i) {
    if (i != 0) out += ',';
    out += entries_[i];
  }
  out += '}';
  return out;
}

std::uint64_t padded_header_size(std::uint64_t json_size) {
  return (json_size + 7) / 8 * 8;
}

std::string encode_header(const std::string& json, std::uint64_t padded_size) {
  assert(json.size() <= padded_size);
  std::string out(8 + padded_size, ' ');
  for (int i = 0; i < 8; ++i) {
    out[i] = static_cast<char>((padded_size >> (8 * i)) & 0xff);
  }
  out.replace(8, json.size(), json);
  return out;
}

}  // namespace trinity_stream_saver
