// The emulated device's tensor maps (TMA descriptors): what cuTensorMapEncodeTiled stores in the
// 128 opaque bytes of a CUtensorMap, and what the kernel emulator's bulk tensor copies read back.
// Included by emu.cpp (which exports the encoder as emu_encode_tensor_map, for tests that
// launch kernels without the driver) and by the emulated driver (cuTensorMapEncodeTiled). Only
// what the kernels use: two dimensions, tiles, no interleave, element strides 1, zeros out of
// bounds, no swizzle or the 128-byte swizzle.
#pragma once

#include <cstdint>
#include <cstring>

namespace emu_tma {

constexpr uint64_t MAGIC = 0x6d6f746c65795f74ull;  // "motley_t"

enum Swizzle : uint32_t { NONE = 0, B128 = 3 };  // CUtensorMapSwizzle's values

struct Map {
    uint64_t magic;
    uint64_t global;       // address of element (0, 0)
    uint64_t dims[2];      // elements along dimension 0 (contiguous) and rows (dimension 1)
    uint64_t row_bytes;    // bytes from one row to the next
    uint32_t box[2];       // the tile a copy moves: box[0] elements of box[1] rows
    uint32_t elem_bytes;
    uint32_t swizzle;
};
static_assert(sizeof(Map) <= 128, "a CUtensorMap is 128 bytes");

// "" or why the arguments are not a map the hardware accepts (cuTensorMapEncodeTiled's rules
// for these cases: 16-byte aligned address and row stride, boxes of 1…256 elements a dimension,
// a box row of at most 128 bytes under the 128-byte swizzle and a multiple of 16 bytes).
inline const char* encode(void* out, uint32_t elem_bytes, const void* global, const uint64_t dims[2], uint64_t row_bytes, const uint32_t box[2], uint32_t swizzle) {
    if (reinterpret_cast<uintptr_t>(global) % 16) return "the global address is not 16-byte aligned";
    if (row_bytes % 16) return "the row stride is not a multiple of 16 bytes";
    if (row_bytes < dims[0] * elem_bytes) return "rows overlap: the stride is shorter than a row";
    for (int d = 0; d < 2; d++)
        if (box[d] == 0 || box[d] > 256) return "a box dimension is outside 1…256";
    if (box[0] * elem_bytes % 16) return "a box row is not a multiple of 16 bytes";
    if (swizzle != NONE && swizzle != B128) return "only no swizzle and the 128-byte swizzle are emulated";
    if (swizzle == B128 && box[0] * elem_bytes > 128) return "a box row is longer than the 128-byte swizzle's span";
    Map m{MAGIC, reinterpret_cast<uintptr_t>(global), {dims[0], dims[1]}, row_bytes, {box[0], box[1]}, elem_bytes, swizzle};
    std::memset(out, 0, 128);
    std::memcpy(out, &m, sizeof m);
    return "";
}

// The map in `p`, or false when the bytes are no encoded map.
inline bool decode(const void* p, Map& m) {
    std::memcpy(&m, p, sizeof m);
    return m.magic == MAGIC;
}

}  // namespace emu_tma
