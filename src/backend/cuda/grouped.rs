//! Grouped matmuls (the experts of one projection, each with its own rows and width) as one
//! cuBLAS call, `cublasGemmGroupedBatchedEx`: every expert is a group of one problem with its own
//! m, n, k, so nothing is padded to the widest expert and nothing waits on the host per expert.
//!
//! That call takes bf16 operands with a bf16 output; the weight gradients (bf16 operands
//! accumulated into f32) and f32 storage run one cuBLASLt matmul per product instead.
//! Row-major to column-major as in `blas.rs`: `outᵀ = op(b)ᵀ · op(a)ᵀ`.

use std::ffi::{c_int, c_void};
use std::sync::Arc;

use cudarc::cublas::{sys, CudaBlas};
use cudarc::driver::CudaStream;

use super::blas::Operand;
use super::nvrtc::Storage;
use super::staging::Staging;
use crate::backend::Gemm;

pub struct Grouped {
    blas: CudaBlas,
}

impl Grouped {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, String> {
        let blas = CudaBlas::new(stream.clone()).map_err(|e| format!("cuBLAS init failed: {e:?}"))?;
        Ok(Grouped { blas })
    }

    /// Whether one grouped call takes these products: bf16 operands and output, every matrix
    /// at a 16-byte-aligned address with leading dimensions of whole 16-byte lines (cuBLAS's
    /// requirement for bf16; a misaligned pointer would fault the whole context), and no empty
    /// inner dimension.
    pub fn supports(out: Operand, a: Operand, b: Operand, gemms: &[Gemm], ta: bool, tb: bool) -> bool {
        let bf16 = [out.storage, a.storage, b.storage].iter().all(|&s| s == Storage::Bf16);
        let aligned = |base: u64, elems: usize| (base + 2 * elems as u64).is_multiple_of(16);
        let lines = |ld: usize| ld.is_multiple_of(8);
        bf16 && gemms.iter().all(|g| {
            g.k > 0
                && aligned(out.ptr, g.out)
                && aligned(a.ptr, g.a)
                && aligned(b.ptr, g.b)
                && lines(g.n)
                && lines(if ta { g.m } else { g.k })
                && lines(if tb { g.k } else { g.n })
        })
    }

    /// `out[g] [+]= op(a[g]) · op(b[g])` for every product, at the element offsets of `gemms`
    /// (the caller checks sizes and that [`Self::supports`] holds); the pointer arrays go up
    /// through `staging`.
    #[allow(clippy::too_many_arguments)]
    pub fn run(&self, staging: &Staging, out: Operand, a: Operand, b: Operand, gemms: &[Gemm], ta: bool, tb: bool, accumulate: bool) {
        let count = gemms.len();
        if count == 0 {
            return;
        }
        let bytes = Storage::Bf16.bytes() as u64;
        let at = |base: u64, elems: usize| base + elems as u64 * bytes;
        // Device arrays of pointers, column-major roles: A = b, B = a, C = out.
        let mut ptrs: Vec<u64> = gemms.iter().map(|g| at(b.ptr, g.b)).collect();
        ptrs.extend(gemms.iter().map(|g| at(a.ptr, g.a)));
        ptrs.extend(gemms.iter().map(|g| at(out.ptr, g.out)));
        let dev = staging.upload(&ptrs, "grouped matmul pointer upload");
        let base = dev.ptr;
        let array = |i: usize| (base + (i * count * 8) as u64) as *const *const c_void;

        let op = |t: bool| if t { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N };
        let dims = |f: &dyn Fn(&Gemm) -> usize| gemms.iter().map(|g| f(g) as c_int).collect::<Vec<c_int>>();
        let (transa, transb) = (vec![op(tb); count], vec![op(ta); count]);
        let (m, n, k) = (dims(&|g| g.n), dims(&|g| g.m), dims(&|g| g.k));
        let lda = dims(&|g| if tb { g.k } else { g.n });
        let ldb = dims(&|g| if ta { g.m } else { g.k });
        let ldc = m.clone();
        let (alpha, beta) = (vec![1f32; count], vec![if accumulate { 1f32 } else { 0.0 }; count]);
        let sizes = vec![1 as c_int; count];
        let bf16 = sys::cudaDataType_t::CUDA_R_16BF;
        // SAFETY: host arrays hold `count` entries each and live through the call; the device
        // pointer arrays were copied on this stream before the call, and their ring range is
        // handed out again only once the upload is dropped, after the call is queued; every
        // product's extent was checked by the caller.
        let status = unsafe {
            sys::cublasGemmGroupedBatchedEx(
                *self.blas.handle(),
                transa.as_ptr(),
                transb.as_ptr(),
                m.as_ptr(),
                n.as_ptr(),
                k.as_ptr(),
                alpha.as_ptr() as *const c_void,
                array(0),
                bf16,
                lda.as_ptr(),
                array(1),
                bf16,
                ldb.as_ptr(),
                beta.as_ptr() as *const c_void,
                array(2) as *const *mut c_void,
                bf16,
                ldc.as_ptr(),
                count as c_int,
                sizes.as_ptr(),
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            )
        };
        if status != sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            panic!("cublasGemmGroupedBatchedEx over {count} products failed: {status:?}");
        }
        drop(dev);
    }
}
