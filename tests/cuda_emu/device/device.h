// Shared by the emulated CUDA libraries (driver.cpp, nvrtc.cpp, blas.cpp): what the emulated
// driver exports to the others, and the "PTX" the emulated NVRTC hands the driver.
#pragma once

#include <cstddef>
#include <string>

#define EXPORT __attribute__((visibility("default")))

// The emulated NVRTC's output: the kernel file and storage the driver loads from the kernel
// emulator (built from the same sources by the test), e.g. "// motley-emu module norm bf16".
#define MOTLEY_EMU_PTX_FORMAT "// motley-emu module %63s %7s"

EXPORT std::string strprintf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Whether [p, p + bytes) lies inside one live device allocation.
EXPORT bool motley_emu_in_allocation(const void* p, size_t bytes);
// Whether `stream` (a CUstream) runs after every operation this thread queued on the null stream
// so far: the null stream itself, or a created stream that has waited for an event recorded
// after them.
EXPORT bool motley_emu_after_compute(void* stream);
// Runs op(data) in `stream`'s order (a CUstream; null: the null stream).
EXPORT void motley_emu_enqueue(void* stream, void (*op)(void*), void* data);
// Prints why a call of an emulated library fails.
EXPORT void motley_emu_report(const char* what);
