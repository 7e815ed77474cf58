// An emulated NVRTC (libnvrtc.so): "compiling" a kernel file records which file and which
// activation storage the backend asked for (`-DMOTLEY_ACT_BF16`), and the emulated driver loads
// that file's kernels from the kernel emulator, which the test built with g++ from the same
// text (`nvrtc::full_source`). Only the options the backend passes are accepted.
#include <cstring>
#include <string>
#include <vector>

#include "device.h"

namespace {
struct Program {
    std::string name, ptx, log;
};
enum { SUCCESS = 0, INVALID_INPUT = 3, INVALID_PROGRAM = 4, COMPILATION = 6 };
}  // namespace

extern "C" {

EXPORT int nvrtcCreateProgram(void** prog, const char* src, const char* name, int headers, const char* const*, const char* const*) {
    if (!src || headers != 0) return INVALID_INPUT;
    std::string file = name ? name : "";
    if (file.size() < 4 || file.compare(file.size() - 3, 3, ".cu")) {
        motley_emu_report(("emulated NVRTC: program name `" + file + "` is not `<kernel file>.cu`").c_str());
        return INVALID_INPUT;
    }
    *prog = new Program{file.substr(0, file.size() - 3), "", ""};
    return SUCCESS;
}

EXPORT int nvrtcDestroyProgram(void** prog) {
    delete static_cast<Program*>(*prog);
    *prog = nullptr;
    return SUCCESS;
}

EXPORT int nvrtcCompileProgram(void* prog, int count, const char* const* options) {
    auto* p = static_cast<Program*>(prog);
    if (!p) return INVALID_PROGRAM;
    bool bf16 = false;
    for (int i = 0; i < count; i++) {
        std::string o = options[i];
        if (o == "-DMOTLEY_ACT_BF16") bf16 = true;
        else if (o.rfind("--gpu-architecture=", 0) == 0 || o == "--std=c++17" || o.rfind("--include-path=", 0) == 0) continue;
        else {
            p->log = "emulated NVRTC: option `" + o + "` is not emulated";
            return COMPILATION;
        }
    }
    p->ptx = strprintf("// motley-emu module %s %s\n", p->name.c_str(), bf16 ? "bf16" : "f32");
    return SUCCESS;
}

EXPORT int nvrtcGetPTXSize(void* prog, size_t* size) {
    *size = static_cast<Program*>(prog)->ptx.size() + 1;
    return SUCCESS;
}
EXPORT int nvrtcGetPTX(void* prog, char* ptx) {
    auto* p = static_cast<Program*>(prog);
    memcpy(ptx, p->ptx.c_str(), p->ptx.size() + 1);
    return SUCCESS;
}
EXPORT int nvrtcGetProgramLogSize(void* prog, size_t* size) {
    *size = static_cast<Program*>(prog)->log.size() + 1;
    return SUCCESS;
}
EXPORT int nvrtcGetProgramLog(void* prog, char* log) {
    auto* p = static_cast<Program*>(prog);
    memcpy(log, p->log.c_str(), p->log.size() + 1);
    return SUCCESS;
}

}  // extern "C"
