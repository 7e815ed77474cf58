//! Row-major matmuls on cuBLASLt (column-major underneath), into f32 or the inputs' type, with a cache
//! of matmul plans.
//!
//! A row-major `m×n` matrix is the column-major `n×m` transpose, so `out = op(a)·op(b)` is
//! computed as `outᵀ = op(b)ᵀ·op(a)ᵀ`: swap the operands and their transpose flags.
//! Operand types: `a` and `b` share one type; the output may be f32 or that type. bf16 inputs
//! run on bf16 tensor cores with f32 accumulation (so a bf16·bf16 product can land in an f32
//! gradient with `beta = 1`, as weight gradients do); f32 inputs on TF32 tensor cores.
//!
//! Describing a matmul and asking the heuristic for an algorithm costs tens of microseconds,
//! more than a small GEMM, and a training step repeats the same few dozen shapes; so each
//! (shape, types, alignment) gets its plan once and keeps it.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::nvrtc::Storage;
use crate::backend::cuda_scratch::BLAS_WORKSPACE_BYTES;

/// One matrix: device address and element type.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub ptr: u64,
    pub storage: Storage,
}

fn data_type(s: Storage) -> sys::cudaDataType {
    match s {
        Storage::F32 => sys::cudaDataType::CUDA_R_32F,
        Storage::Bf16 => sys::cudaDataType::CUDA_R_16BF,
    }
}

/// Largest power of two (up to 256 bytes, what cuBLASLt's fastest kernels ask for) dividing the
/// address: views start anywhere in a buffer, and an algorithm that assumes more alignment
/// than the pointer has must not be chosen.
fn alignment(ptr: u64) -> u32 {
    1u32 << ptr.trailing_zeros().min(8)
}

/// What a plan depends on, in cuBLASLt's column-major terms.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    m: u64,
    n: u64,
    k: u64,
    transa: bool,
    transb: bool,
    inputs: Storage,
    output: Storage,
    /// Of A, B, C and D (column-major roles: A = b, B = a, C the addend, D = out).
    align: [u32; 4],
}

/// A described matmul with its chosen algorithm.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    c: sys::cublasLtMatrixLayout_t,
    algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are plain heap objects of cuBLASLt, used under the cache's mutex.
unsafe impl Send for Plan {}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created by this plan and destroyed once; errors at teardown are not actionable.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.c);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

pub struct Lt {
    handle: sys::cublasLtHandle_t,
    stream: Arc<CudaStream>,
    /// Owns the memory at `workspace_ptr`.
    _workspace: CudaSlice<u8>,
    workspace_ptr: u64,
    plans: Mutex<HashMap<Key, Plan>>,
}

// SAFETY: the handle is used from one stream; cuBLASLt handles are thread-safe for that use.
unsafe impl Send for Lt {}
unsafe impl Sync for Lt {}

fn check<T>(r: Result<T, cudarc::cublaslt::result::CublasError>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("cuBLASLt {what} failed: {e:?}"))
}

impl Lt {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, String> {
        let handle = lt::create_handle().map_err(|e| format!("cuBLASLt init failed: {e:?}"))?;
        let workspace = stream.alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES).map_err(|e| format!("cuBLASLt workspace: {e:?}"))?;
        let workspace_ptr = workspace.device_ptr(&stream).0;
        Ok(Lt { handle, stream, _workspace: workspace, workspace_ptr, plans: Mutex::new(HashMap::new()) })
    }

    /// `out (m×n) = op(a) (m×k) · op(b) (k×n) [+ c]`, all row-major and dense; `a` and `b` of
    /// one type, `c` (`out` itself to accumulate) of `out`'s. The caller checks the buffer sizes.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(&self, out: Operand, a: Operand, b: Operand, m: usize, k: usize, n: usize, ta: bool, tb: bool, c: Option<Operand>) {
        assert_eq!(a.storage, b.storage, "cuBLASLt matmul: operands of one type");
        assert!(out.storage == Storage::F32 || out.storage == a.storage, "cuBLASLt matmul: {:?} inputs cannot write {:?}", a.storage, out.storage);
        // Column-major: outᵀ (n×m) = op(b)ᵀ (n×k) · op(a)ᵀ (k×m).
        assert!(c.is_none_or(|c| c.storage == out.storage), "cuBLASLt matmul: the addend has the output's type");
        let c_ptr = c.map_or(out.ptr, |c| c.ptr);
        let key = Key { m: n as u64, n: m as u64, k: k as u64, transa: tb, transb: ta, inputs: a.storage, output: out.storage, align: [alignment(b.ptr), alignment(a.ptr), alignment(c_ptr), alignment(out.ptr)] };
        let mut plans = self.plans.lock().expect("matmul plan cache");
        let plan = match plans.get(&key) {
            Some(p) => p,
            None => {
                let p = self.describe(key);
                plans.entry(key).or_insert(p)
            }
        };
        let (alpha, beta) = (1.0f32, if c.is_some() { 1.0f32 } else { 0.0 });
        // SAFETY: the plan describes exactly these shapes and types, the caller checked the
        // sizes, and the workspace outlives the call (it is freed with `self`).
        let r = unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                b.ptr as *const c_void,
                plan.a,
                a.ptr as *const c_void,
                plan.b,
                c_ptr as *const c_void,
                plan.c,
                out.ptr as *mut c_void,
                plan.c,
                &plan.algo,
                self.workspace_ptr as *mut c_void,
                BLAS_WORKSPACE_BYTES,
                self.stream.cu_stream() as *mut _,
            )
        };
        check(r, &format!("matmul {m}×{k}×{n}"));
    }

    fn describe(&self, key: Key) -> Plan {
        let compute = match key.inputs {
            Storage::F32 => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            Storage::Bf16 => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        let desc = check(lt::create_matmul_desc(compute, sys::cudaDataType::CUDA_R_32F), "matmul descriptor");
        let set_desc = |attr, v: i32| {
            // SAFETY: TRANSA/TRANSB take a cublasOperation_t (a 32-bit enum: 0 = N, 1 = T).
            check(unsafe { lt::set_matmul_desc_attribute(desc, attr, &v as *const i32 as *const c_void, 4) }, "matmul descriptor attribute")
        };
        set_desc(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, key.transa as i32);
        set_desc(sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, key.transb as i32);
        let (t_in, t_out) = (data_type(key.inputs), data_type(key.output));
        let (a_rows, a_cols) = if key.transa { (key.k, key.m) } else { (key.m, key.k) };
        let (b_rows, b_cols) = if key.transb { (key.n, key.k) } else { (key.k, key.n) };
        let a = check(lt::create_matrix_layout(t_in, a_rows, a_cols, a_rows as i64), "matrix layout");
        let b = check(lt::create_matrix_layout(t_in, b_rows, b_cols, b_rows as i64), "matrix layout");
        let c = check(lt::create_matrix_layout(t_out, key.m, key.n, key.m as i64), "matrix layout");
        let pref = check(lt::create_matmul_pref(), "matmul preference");
        type P = sys::cublasLtMatmulPreferenceAttributes_t;
        let [al_a, al_b, al_c, al_d] = key.align;
        // SAFETY: each attribute's value has the type the cuBLASLt documentation gives it
        // (u64 workspace bytes, u32 alignments).
        let heuristic = unsafe {
            let ws = BLAS_WORKSPACE_BYTES as u64;
            check(lt::set_matmul_pref_attribute(pref, P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws as *const u64 as *const c_void, 8), "preference");
            for (attr, v) in [(P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, al_a), (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, al_b), (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, al_c), (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, al_d)] {
                check(lt::set_matmul_pref_attribute(pref, attr, &v as *const u32 as *const c_void, 4), "preference");
            }
            let h = lt::get_matmul_algo_heuristic(self.handle, desc, a, b, c, c, pref);
            let _ = lt::destroy_matmul_pref(pref);
            h
        };
        let heuristic = heuristic.unwrap_or_else(|e| {
            panic!("cuBLASLt has no algorithm for a {}×{}×{} matmul ({:?} → {:?}, alignment {:?}): {e:?}", key.m, key.n, key.k, key.inputs, key.output, key.align)
        });
        Plan { desc, a, b, c, algo: heuristic.algo }
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.lock().map(|mut p| p.clear()).ok();
        // SAFETY: created in `new`, destroyed once, after the plans that were made with it.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1040), 64);
        assert_eq!(alignment(0x1004), 4);
    }
}
