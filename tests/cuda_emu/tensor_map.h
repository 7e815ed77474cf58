// The emulated device's tensor maps (TMA descriptors): what cuTensorMapEncodeTiled stores in the
// 128 opaque bytes of a CUtensorMap, and what the kernel emulator's bulk tensor copies read back.
// Included by emu.cpp (which exports the encoder as emu_encode_tensor_map, for tests that
// launch kernels without the driver) and by the emulated driver (cuTensorMapEncodeTiled). Only
// what the kernels use: two or three dimensions, tiles, no interleave, element strides 1, zeros
// out of bounds, no swizzle or the 128-byte swizzle.
#pragma once

#include <cstdint>
#include <cstring>

namespace emu_tma {

constexpr uint64_t MAGIC = 0x6d6f746c65795f74ull;  // "motley_t"

enum Swizzle : uint32_t { NONE = 0, B128 = 3 };  // CUtensorMapSwizzle's values

// Rank 2 or 3 (a third dimension of 1 for rank 2).
struct Map {
    uint64_t magic;
    uint64_t global;       // address of element (0, 0, 0)
    uint64_t dims[3];      // elements along dimension 0 (contiguous), rows, and planes
    uint64_t strides[2];   // bytes from one row to the next, and from one plane to the next
    uint32_t box[3];       // the tile a copy moves: box[0] elements of box[1] rows of box[2] planes
    uint32_t elem_bytes;
    uint32_t swizzle;
    uint32_t rank;
};
static_assert(sizeof(Map) <= 128, "a CUtensorMap is 128 bytes");

// "" or why the arguments are not a map the hardware accepts (cuTensorMapEncodeTiled's rules
// for these cases: rank 2 or 3, 16-byte aligned address and strides, boxes of 1…256 elements a
// dimension, a box row of at most 128 bytes under the 128-byte swizzle and a multiple of 16 bytes).
// `strides` has rank − 1 entries.
inline const char* encode(void* out, uint32_t rank, uint32_t elem_bytes, const void* global, const uint64_t* dims, const uint64_t* strides, const uint32_t* box, uint32_t swizzle) {
    if (rank != 2 && rank != 3) return "only ranks 2 and 3 are emulated";
    if (reinterpret_cast<uintptr_t>(global) % 16) return "the global address is not 16-byte aligned";
    Map m{MAGIC, reinterpret_cast<uintptr_t>(global), {dims[0], dims[1], rank == 3 ? dims[2] : 1}, {strides[0], rank == 3 ? strides[1] : strides[0] * dims[1]},
          {box[0], box[1], rank == 3 ? box[2] : 1}, elem_bytes, swizzle, rank};
    for (int d = 0; d < 2; d++)
        if (m.strides[d] % 16) return "a stride is not a multiple of 16 bytes";
    if (m.strides[0] < m.dims[0] * elem_bytes || m.strides[1] < m.strides[0] * m.dims[1]) return "rows or planes overlap: a stride is shorter than what it steps over";
    for (int d = 0; d < 3; d++)
        if (m.box[d] == 0 || m.box[d] > 256) return "a box dimension is outside 1…256";
    if (m.box[0] * elem_bytes % 16) return "a box row is not a multiple of 16 bytes";
    if (swizzle != NONE && swizzle != B128) return "only no swizzle and the 128-byte swizzle are emulated";
    if (swizzle == B128 && m.box[0] * elem_bytes > 128) return "a box row is longer than the 128-byte swizzle's span";
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
