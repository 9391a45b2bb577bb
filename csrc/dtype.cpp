#include "dtype.h"

#include <array>

namespace trinity_stream_saver {

namespace {

constexpr std::array<Dtype, 20> kDtypes{{
    {"BOOL", 8},        {"U8", 8},          {"I8", 8},
    {"I16", 16},        {"U16", 16},        {"I32", 32},
    {"U32", 32},        {"I64", 64},        {"U64", 64},
    {"F16", 16},        {"BF16", 16},       {"F32", 32},
    {"F64", 64},        {"C64", 64},        {"F8_E4M3", 8},
    {"F8_E4M3FNUZ", 8}, {"F8_E5M2", 8},     {"F8_E5M2FNUZ", 8},
    {"F8_E8M0", 8},     {"F4", 4},
}};

}  // namespace

std::span<const Dtype> supported_dtypes() { return kDtypes; }

std::optional<Dtype> find_dtype(std::string_view name) {
  for (const Dtype& dtype : kDtypes) {
    if (dtype.name == name) return dtype;
  }
  return std::nullopt;
}

std::string supported_dtype_names() {
  std::string names;
  for (const Dtype& dtype : kDtypes) {
    if (!names.empty()) names += ", ";
    names += dtype.name;
  }
  return names;
}

std::optional<std::uint64_t> byte_size(const Dtype& dtype,
                                       std::uint64_t element_count) {
  if (dtype.bits % 8 == 0) {
    std::uint64_t bytes = 0;
    if (__builtin_mul_overflow(element_count, static_cast<std::uint64_t>(dtype.bits / 8),
                               &bytes)) {
      return std::nullopt;
    }
    return bytes;
  }
  // Sub-byte dtypes (F4): several elements share each byte.
  const std::uint64_t per_byte = 8 / static_cast<std::uint64_t>(dtype.bits);
  if (element_count % per_byte != 0) return std::nullopt;
  return element_count / per_byte;
}

}  // namespace trinity_stream_saver
