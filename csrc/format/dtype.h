// The safetensors dtypes this library writes: their names in the header,
// their width, and how torch packs them. The one dtype table of the
// project: the torch bridge (writer/torch_dtype) refers to its rows by
// DtypeId, never by name. Pure data; nothing here knows about torch, files
// or Python.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace trinity_stream_saver {

// One per row of the table below, in its order.
enum class DtypeId : std::uint8_t {
  BOOL, U8, I8, I16, U16, I32, U32, I64, U64, F16, BF16, F32, F64, C64,
  F8_E4M3, F8_E4M3FNUZ, F8_E5M2, F8_E5M2FNUZ, F8_E8M0, F4,
};

struct Dtype {
  DtypeId id;
  std::string_view name;  // as written in the header, e.g. "BF16"
  int bits;               // width of one element as the header counts it
  // Header elements per element of a state_dict_meta (torch) shape:
  // torch's float4_e2m1fn_x2 packs two F4 values in each element, and
  // safetensors writes the shape of the unpacked values.
  int values_per_item;
};

// Every dtype that safetensors' own torch saver writes, in a fixed order.
inline constexpr std::array<Dtype, 20> kDtypes{{
    {DtypeId::BOOL, "BOOL", 8, 1},
    {DtypeId::U8, "U8", 8, 1},
    {DtypeId::I8, "I8", 8, 1},
    {DtypeId::I16, "I16", 16, 1},
    {DtypeId::U16, "U16", 16, 1},
    {DtypeId::I32, "I32", 32, 1},
    {DtypeId::U32, "U32", 32, 1},
    {DtypeId::I64, "I64", 64, 1},
    {DtypeId::U64, "U64", 64, 1},
    {DtypeId::F16, "F16", 16, 1},
    {DtypeId::BF16, "BF16", 16, 1},
    {DtypeId::F32, "F32", 32, 1},
    {DtypeId::F64, "F64", 64, 1},
    {DtypeId::C64, "C64", 64, 1},
    {DtypeId::F8_E4M3, "F8_E4M3", 8, 1},
    {DtypeId::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8, 1},
    {DtypeId::F8_E5M2, "F8_E5M2", 8, 1},
    {DtypeId::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8, 1},
    {DtypeId::F8_E8M0, "F8_E8M0", 8, 1},
    {DtypeId::F4, "F4", 4, 2},
}};

constexpr const Dtype& dtype_of(DtypeId id) { return kDtypes[static_cast<std::size_t>(id)]; }

static_assert([] {
  for (std::size_t i = 0; i < kDtypes.size(); ++i) {
    if (static_cast<std::size_t>(kDtypes[i].id) != i) return false;
  }
  return true;
}(), "kDtypes must list the dtypes in DtypeId order");

inline std::span<const Dtype> supported_dtypes() { return kDtypes; }

// The dtype named `name` in a header, or nothing if safetensors has no
// such dtype (or we do not write it).
std::optional<Dtype> find_dtype(std::string_view name);

// "BOOL, U8, ..." for error messages that must tell the user what would work.
std::string supported_dtype_names();

// Bytes taken by `element_count` elements, or nothing if that count does
// not fill whole bytes (safetensors refuses a slice that ends mid-byte) or
// the size does not fit in 64 bits.
std::optional<std::uint64_t> byte_size(const Dtype& dtype,
                                       std::uint64_t element_count);

// The "shape" that safetensors writes for a tensor whose torch shape is
// `sizes`, or nothing if the format cannot describe it (a 0-dim packed
// tensor has no last dimension to unpack) or a dimension would overflow.
std::optional<std::vector<std::int64_t>> header_shape(const Dtype& dtype,
                                                      std::span<const std::int64_t> sizes);

}  // namespace trinity_stream_saver
