// Emulated cuBLASLt and cuBLAS (built twice, as libcublasLt.so and libcublas.so): the matmul and
// grouped-GEMM calls of motley's CUDA backend, computed on the CPU in the order the emulated
// driver gives their stream.
//
// Semantics as cuBLAS documents them: column-major matrices with leading dimensions,
// D = alpha·op(A)·op(B) + beta·C with C not read when beta is 0, f32 accumulation, bf16 results
// rounded to nearest even, and with CUBLAS_COMPUTE_32F_FAST_TF32 the inputs rounded to TF32.
// Checked as a GPU would fail: the type combination (cuBLASLt's table of supported ones),
// leading dimensions, operands inside live device allocations, and, for cuBLASLt, pointers at
// least as aligned as the preference promised when the algorithm was chosen (a GPU would take a
// misaligned-address fault).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "device.h"

namespace {

enum : int { SUCCESS = 0, INVALID_VALUE = 7, NOT_SUPPORTED = 15, EXECUTION_FAILED = 13 };
enum : int { R_32F = 0, R_16BF = 14 };
enum : int { COMPUTE_32F = 68, COMPUTE_32F_FAST_TF32 = 77 };

int fail(int code, const std::string& why) {
    motley_emu_report(("emulated cuBLAS: " + why).c_str());
    return code;
}

size_t elem_bytes(int type) { return type == R_16BF ? 2 : 4; }

float bf16_to_f32(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (std::isnan(f)) return uint16_t((u >> 16) | 0x40);
    u += 0x7fff + ((u >> 16) & 1);  // round to nearest even
    return uint16_t(u >> 16);
}
// TF32 keeps 10 mantissa bits: round to nearest (ties away), as the tensor cores' conversion.
float tf32(float f) {
    if (!std::isfinite(f)) return f;
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0x1000) & 0xffffe000u;
    memcpy(&f, &u, 4);
    return f;
}

// A column-major matrix in device memory.
struct Mat {
    const void* p;
    int type;
    int64_t rows, cols, ld;
    float at(int64_t r, int64_t c) const {
        int64_t i = r + c * ld;
        return type == R_16BF ? bf16_to_f32(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
    }
    size_t span_bytes() const { return rows == 0 || cols == 0 ? 0 : size_t((cols - 1) * ld + rows) * elem_bytes(type); }
};

std::string check_mat(const Mat& m, const char* name) {
    if (m.ld < (m.rows > 1 ? m.rows : 1)) return strprintf("%s: leading dimension %ld < rows %ld", name, (long)m.ld, (long)m.rows);
    if (m.span_bytes() && !motley_emu_in_allocation(m.p, m.span_bytes()))
        return strprintf("%s: %ld×%ld (ld %ld) at %p is not inside one live device allocation", name, (long)m.rows, (long)m.cols, (long)m.ld, m.p);
    return "";
}

// D (m×n) = alpha·op(A)·op(B) + beta·C; op(A) is m×k, op(B) k×n. Sums in f32 over k in order.
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const Mat& A, const Mat& B, float beta, const Mat& C, void* D, int d_type,
          int64_t ldd, bool round_tf32) {
    std::vector<float> a(size_t(m * k)), b(size_t(n * k));  // op(A) by rows, op(B) by columns
    for (int64_t i = 0; i < m; i++)
        for (int64_t l = 0; l < k; l++) a[i * k + l] = ta ? A.at(l, i) : A.at(i, l);
    for (int64_t j = 0; j < n; j++)
        for (int64_t l = 0; l < k; l++) b[j * k + l] = tb ? B.at(j, l) : B.at(l, j);
    if (round_tf32) {
        for (float& x : a) x = tf32(x);
        for (float& x : b) x = tf32(x);
    }
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < m; i++) {
            float acc = 0;
            for (int64_t l = 0; l < k; l++) acc += a[i * k + l] * b[j * k + l];
            float v = alpha * acc;
            if (beta != 0) v += beta * C.at(i, j);
            int64_t at = i + j * ldd;
            if (d_type == R_16BF) static_cast<uint16_t*>(D)[at] = f32_to_bf16(v);
            else static_cast<float*>(D)[at] = v;
        }
}

// cuBLASLt's supported combinations that motley uses (its documentation's table of
// cublasLtMatmul types): bf16 inputs with f32 compute into bf16 or f32, f32 inputs with TF32.
bool supported(int compute, int scale, int ab, int c) {
    if (scale != R_32F) return false;
    if (compute == COMPUTE_32F && ab == R_16BF) return c == R_16BF || c == R_32F;
    if (compute == COMPUTE_32F_FAST_TF32 && ab == R_32F) return c == R_32F;
    if (compute == COMPUTE_32F && ab == R_32F) return c == R_32F;
    return false;
}

// ---- cuBLASLt objects ----

struct Desc {
    int compute, scale;
    int trans_a = 0, trans_b = 0;
};
struct Layout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
};
struct Pref {
    uint64_t workspace = 0;
    uint32_t align[4] = {256, 256, 256, 256};  // A, B, C, D; cuBLASLt's default assumes 256
};
// What the emulated algorithm assumes of the pointers (stored in cublasLtMatmulAlgo_t::data).
struct Algo {
    uint32_t magic;
    uint32_t align[4];
};
constexpr uint32_t ALGO_MAGIC = 0x6d6f746c;

int set_u32(const void* buf, size_t size, uint32_t& out) {
    if (size != 4) return INVALID_VALUE;
    memcpy(&out, buf, 4);
    return SUCCESS;
}

// Empty when desc and layouts describe a supported matmul; (m, n, k) from them.
std::string describe(const Desc& d, const Layout& a, const Layout& b, const Layout& c, const Layout& dl, int64_t& m, int64_t& n, int64_t& k) {
    if (a.type != b.type) return "A and B of different types";
    if (c.type != dl.type || c.rows != dl.rows || c.cols != dl.cols) return "C and D layouts differ";
    if (!supported(d.compute, d.scale, a.type, c.type))
        return strprintf("compute %d, scale %d, A/B type %d, C/D type %d is not a supported combination", d.compute, d.scale, a.type, c.type);
    m = c.rows, n = c.cols;
    k = d.trans_a ? a.rows : a.cols;
    int64_t am = d.trans_a ? a.cols : a.rows;
    int64_t bk = d.trans_b ? b.cols : b.rows, bn = d.trans_b ? b.rows : b.cols;
    if (am != m || bn != n || bk != k)
        return strprintf("shapes disagree: op(A) %ld×%ld, op(B) %ld×%ld, D %ld×%ld", (long)am, (long)k, (long)bk, (long)bn, (long)m, (long)n);
    for (const Layout* l : {&a, &b, &c})
        if (l->ld < (int64_t)(l->rows > 1 ? l->rows : 1)) return strprintf("leading dimension %ld < rows %lu", (long)l->ld, (unsigned long)l->rows);
    return "";
}

struct MatmulCall {
    Desc d;
    int64_t m, n, k;
    float alpha, beta;
    Mat A, B, C;
    void* D;
    int d_type;
    int64_t ldd;
};

void run_matmul(void* p) {
    auto* c = static_cast<MatmulCall*>(p);
    gemm(c->d.trans_a, c->d.trans_b, c->m, c->n, c->k, c->alpha, c->A, c->B, c->beta, c->C, c->D, c->d_type, c->ldd, c->d.compute == COMPUTE_32F_FAST_TF32);
    delete c;
}

// ---- cuBLAS's grouped call ----

struct GroupedCall {
    struct Problem {
        bool ta, tb;
        int m, n, k, lda, ldb, ldc;
        float alpha, beta;
    };
    std::vector<Problem> problems;
    const void* const* a;  // device arrays of pointers, read when the call runs
    const void* const* b;
    void* const* c;
};

void run_grouped(void* p) {
    auto* g = static_cast<GroupedCall*>(p);
    size_t count = g->problems.size();
    if (!motley_emu_in_allocation(g->a, count * 8) || !motley_emu_in_allocation(g->b, count * 8) || !motley_emu_in_allocation(g->c, count * 8)) {
        fail(EXECUTION_FAILED, "grouped GEMM: a pointer array was freed before the call ran");
        delete g;
        return;
    }
    for (size_t i = 0; i < count; i++) {
        const auto& q = g->problems[i];
        Mat A{g->a[i], R_16BF, q.ta ? q.k : q.m, q.ta ? q.m : q.k, q.lda};
        Mat B{g->b[i], R_16BF, q.tb ? q.n : q.k, q.tb ? q.k : q.n, q.ldb};
        Mat C{g->c[i], R_16BF, q.m, q.n, q.ldc};
        std::string e = check_mat(A, "A");
        if (e.empty()) e = check_mat(B, "B");
        if (e.empty()) e = check_mat(C, "C");
        if (!e.empty()) {
            fail(EXECUTION_FAILED, strprintf("grouped GEMM problem %zu: ", i) + e);
            continue;
        }
        gemm(q.ta, q.tb, q.m, q.n, q.k, q.alpha, A, B, q.beta, C, g->c[i], R_16BF, q.ldc, false);
    }
    delete g;
}

struct Handle {
    void* stream = nullptr;
};

}  // namespace

extern "C" {

// ---- cuBLASLt ----

EXPORT int cublasLtCreate(void** handle) {
    *handle = new Handle;
    return SUCCESS;
}
EXPORT int cublasLtDestroy(void* handle) {
    delete static_cast<Handle*>(handle);
    return SUCCESS;
}
EXPORT int cublasLtMatmulDescCreate(void** desc, int compute, int scale) {
    *desc = new Desc{compute, scale};
    return SUCCESS;
}
EXPORT int cublasLtMatmulDescDestroy(void* desc) {
    delete static_cast<Desc*>(desc);
    return SUCCESS;
}
EXPORT int cublasLtMatmulDescSetAttribute(void* desc, int attr, const void* buf, size_t size) {
    auto* d = static_cast<Desc*>(desc);
    uint32_t v;
    if (set_u32(buf, size, v)) return fail(INVALID_VALUE, strprintf("matmul descriptor attribute %d given %zu bytes", attr, size));
    switch (attr) {
        case 3: d->trans_a = v; break;
        case 4: d->trans_b = v; break;
        case 7:
            if (v != 1) return fail(NOT_SUPPORTED, strprintf("epilogue %u is not emulated", v));
            break;
        default: return fail(INVALID_VALUE, strprintf("matmul descriptor attribute %d is not emulated", attr));
    }
    if (d->trans_a > 1 || d->trans_b > 1) return fail(INVALID_VALUE, "transpose flags other than N and T");
    return SUCCESS;
}
EXPORT int cublasLtMatrixLayoutCreate(void** layout, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (type != R_32F && type != R_16BF) return fail(NOT_SUPPORTED, strprintf("matrix type %d is not emulated", type));
    *layout = new Layout{type, rows, cols, ld};
    return SUCCESS;
}
EXPORT int cublasLtMatrixLayoutDestroy(void* layout) {
    delete static_cast<Layout*>(layout);
    return SUCCESS;
}
EXPORT int cublasLtMatmulPreferenceCreate(void** pref) {
    *pref = new Pref;
    return SUCCESS;
}
EXPORT int cublasLtMatmulPreferenceDestroy(void* pref) {
    delete static_cast<Pref*>(pref);
    return SUCCESS;
}
EXPORT int cublasLtMatmulPreferenceSetAttribute(void* pref, int attr, const void* buf, size_t size) {
    auto* p = static_cast<Pref*>(pref);
    if (attr == 1) {
        if (size != 8) return fail(INVALID_VALUE, "MAX_WORKSPACE_BYTES takes 8 bytes");
        memcpy(&p->workspace, buf, 8);
        return SUCCESS;
    }
    if (attr >= 5 && attr <= 8) {
        uint32_t v;
        if (set_u32(buf, size, v) || v == 0 || (v & (v - 1))) return fail(INVALID_VALUE, "an alignment preference takes a power of two as 4 bytes");
        p->align[attr - 5] = v;
        return SUCCESS;
    }
    return fail(INVALID_VALUE, strprintf("matmul preference attribute %d is not emulated", attr));
}

struct HeuristicResult {
    uint64_t algo[8];
    size_t workspace;
    int state;
    float waves;
    int reserved[4];
};

EXPORT int cublasLtMatmulAlgoGetHeuristic(void*, void* desc, void* a, void* b, void* c, void* d, void* pref, int requested, HeuristicResult* results, int* count) {
    int64_t m, n, k;
    std::string e = describe(*static_cast<Desc*>(desc), *static_cast<Layout*>(a), *static_cast<Layout*>(b), *static_cast<Layout*>(c), *static_cast<Layout*>(d), m, n, k);
    if (!e.empty()) return fail(INVALID_VALUE, "matmul heuristic: " + e);
    if (requested < 1) return INVALID_VALUE;
    memset(results, 0, sizeof *results);
    Algo algo{ALGO_MAGIC, {}};
    memcpy(algo.align, static_cast<Pref*>(pref)->align, sizeof algo.align);
    memcpy(results->algo, &algo, sizeof algo);
    results->state = SUCCESS;
    results->waves = 1;
    *count = 1;
    return SUCCESS;
}

EXPORT int cublasLtMatmul(void*, void* desc, const void* alpha, const void* a, void* adesc, const void* b, void* bdesc, const void* beta, const void* c,
                          void* cdesc, void* d, void* ddesc, const void* algo_data, void*, size_t, void* stream) {
    const Desc& ds = *static_cast<Desc*>(desc);
    const Layout &la = *static_cast<Layout*>(adesc), &lb = *static_cast<Layout*>(bdesc), &lc = *static_cast<Layout*>(cdesc), &ld = *static_cast<Layout*>(ddesc);
    int64_t m, n, k;
    std::string e = describe(ds, la, lb, lc, ld, m, n, k);
    if (!e.empty()) return fail(INVALID_VALUE, "matmul: " + e);
    Algo algo;
    if (!algo_data) return fail(INVALID_VALUE, "matmul without an algorithm");
    memcpy(&algo, algo_data, sizeof algo);
    if (algo.magic != ALGO_MAGIC) return fail(INVALID_VALUE, "matmul: the algorithm did not come from the heuristic");
    const void* ptrs[4] = {a, b, c, d};
    for (int i = 0; i < 4; i++)
        if (reinterpret_cast<uintptr_t>(ptrs[i]) % algo.align[i])
            return fail(EXECUTION_FAILED, strprintf("matmul: %c at %p is less aligned than the %u bytes its algorithm was chosen for (a misaligned-address fault on a GPU)",
                                                    "ABCD"[i], ptrs[i], algo.align[i]));
    Mat A{a, la.type, (int64_t)la.rows, (int64_t)la.cols, la.ld}, B{b, lb.type, (int64_t)lb.rows, (int64_t)lb.cols, lb.ld};
    Mat C{c, lc.type, (int64_t)lc.rows, (int64_t)lc.cols, lc.ld}, D{d, ld.type, (int64_t)ld.rows, (int64_t)ld.cols, ld.ld};
    for (auto [mat, name] : {std::pair{&A, "A"}, {&B, "B"}, {&C, "C"}, {&D, "D"}}) {
        std::string why = check_mat(*mat, name);
        if (!why.empty()) return fail(EXECUTION_FAILED, "matmul: " + why);
    }
    float fa, fb;
    memcpy(&fa, alpha, 4);
    memcpy(&fb, beta, 4);
    motley_emu_enqueue(stream, run_matmul, new MatmulCall{ds, m, n, k, fa, fb, A, B, C, d, ld.type, ld.ld});
    return SUCCESS;
}

// ---- cuBLAS ----

EXPORT int cublasCreate_v2(void** handle) { return cublasLtCreate(handle); }
EXPORT int cublasDestroy_v2(void* handle) { return cublasLtDestroy(handle); }
EXPORT int cublasSetStream_v2(void* handle, void* stream) {
    static_cast<Handle*>(handle)->stream = stream;
    return SUCCESS;
}

EXPORT int cublasGemmGroupedBatchedEx(void* handle, const int* transa, const int* transb, const int* m, const int* n, const int* k, const void* alpha,
                                      const void* const* a, int a_type, const int* lda, const void* const* b, int b_type, const int* ldb, const void* beta,
                                      void* const* c, int c_type, const int* ldc, int groups, const int* group_size, int compute) {
    if (a_type != R_16BF || b_type != R_16BF || c_type != R_16BF || compute != COMPUTE_32F)
        return fail(NOT_SUPPORTED, strprintf("grouped GEMM types %d/%d/%d with compute %d are not emulated (motley passes bf16 with 32F)", a_type, b_type, c_type, compute));
    auto* call = new GroupedCall{{}, a, b, c};
    const float *al = static_cast<const float*>(alpha), *be = static_cast<const float*>(beta);
    int problem = 0;
    for (int g = 0; g < groups; g++) {
        if (group_size[g] < 0 || transa[g] > 1 || transb[g] > 1 || m[g] < 0 || n[g] < 0 || k[g] < 0) {
            delete call;
            return fail(INVALID_VALUE, strprintf("grouped GEMM group %d: bad size or transpose", g));
        }
        int a_rows = transa[g] ? k[g] : m[g], b_rows = transb[g] ? n[g] : k[g];
        if (lda[g] < (a_rows > 1 ? a_rows : 1) || ldb[g] < (b_rows > 1 ? b_rows : 1) || ldc[g] < (m[g] > 1 ? m[g] : 1)) {
            delete call;
            return fail(INVALID_VALUE, strprintf("grouped GEMM group %d: a leading dimension is below its matrix's rows", g));
        }
        for (int i = 0; i < group_size[g]; i++, problem++)
            call->problems.push_back({transa[g] == 1, transb[g] == 1, m[g], n[g], k[g], lda[g], ldb[g], ldc[g], al[g], be[g]});
    }
    motley_emu_enqueue(static_cast<Handle*>(handle)->stream, run_grouped, call);
    return SUCCESS;
}

}  // extern "C"
