// Stand-in for CUDA's cuda_bf16.h in the kernel emulator: the bf16 type and the conversions the
// kernels use, with the device's semantics (round to nearest even; every NaN becomes the
// canonical 0x7fff, as cvt.rn.bf16.f32 and the header's host path do; subnormals kept).
#pragma once

#include <cstring>

struct __nv_bfloat16 {
    unsigned short x;
    __nv_bfloat16() = default;
    // The real header converts implicitly both ways (round to nearest even), so kernels that
    // rely on it compile here too.
    inline __nv_bfloat16(float f);
    inline operator float() const;
};

inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
    __nv_bfloat16 b;
    b.x = u;
    return b;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }

inline float __bfloat162float(__nv_bfloat16 b) {
    unsigned u = (unsigned)b.x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __ushort_as_bfloat16(0x7fff);
    unsigned rest = u & 0xffffu, hi = u >> 16;
    if (rest > 0x8000u || (rest == 0x8000u && (hi & 1u))) hi++;
    return __ushort_as_bfloat16((unsigned short)hi);
}

inline __nv_bfloat16::__nv_bfloat16(float f) : x(__float2bfloat16(f).x) {}
inline __nv_bfloat16::operator float() const { return __bfloat162float(*this); }
