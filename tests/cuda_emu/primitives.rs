//! The test kernels of `primitives.cu` as a kernel file: compiled into the CUDA emulator
//! (`build.rs`) and, for the GPU session, to PTX beside the product's kernels
//! (`bench/gpu/ptx_cache.rs`); never loaded by the backend.

use motley::backend::cuda::nvrtc::KernelFile;

pub const PRIMITIVES: KernelFile = KernelFile {
    name: "primitives",
    source: include_str!("primitives.cu"),
    functions: &[
        "test_mma",
        "test_ldmatrix",
        "test_cp_async",
        "test_exp2_ftz",
        "test_wgmma_ss",
        "test_wgmma_ss_mnmajor",
        "test_wgmma_rs_kmajor",
        "test_wgmma_rs_mnmajor",
        "test_wgmma_n256_kmajor",
        "test_wgmma_n256_mnmajor",
        "test_wgmma_n256_tn",
        "test_stmatrix_trans",
        "test_tma_load",
        "test_tma_wgmma",
        "bad_divergent_shuffle",
        "bad_smem_overflow",
        "racy_neighbour",
        "turns_in_order",
    ],
    hopper: &[],
};
