// Copies a transposed matrix into C order, tile by tile. Knows nothing of
// torch or Python: elements are opaque bytes of a given width.
//
// Why not torch's copy_: a chunk of rows of a transposed matrix is a view
// whose column stride is not its row count, which torch's blocked transpose
// kernel does not accept, so it falls back to a strided gather. With a
// power-of-two stride every element read then misses the cache, and saving
// a transposed matrix ran slower than .contiguous() + write.
#pragma once

#include <cstddef>
#include <cstdint>

namespace trinity_stream_saver {

// Writes the `rows` x `cols` matrix whose element (r, c) is at
// `source + (r + c * column_stride) * element_size` (a column-major matrix,
// e.g. tensor.t() or rows of it) to `target` in row-major order.
// element_size is 1, 2, 4 or 8; column_stride >= rows.
void transpose_to_row_major(const void* source, std::int64_t rows, std::int64_t cols,
                            std::int64_t column_stride, std::size_t element_size,
                            void* target);

}  // namespace trinity_stream_saver
