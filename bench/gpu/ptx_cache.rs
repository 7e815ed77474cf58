//! Compiles every CUDA kernel to PTX for an architecture (default `sm_90a`, the H100's and
//! H200's) into the PTX cache folder, `MOTLEY_PTX_CACHE` (else `~/.cache/motley/ptx`), without a
//! GPU; with the test kernels of `tests/cuda_emu/primitives.cu`, which the GPU parity suite
//! checks the hardware's instructions with. bench/gpu/build.sh carries that folder to the GPU
//! machine, whose `CudaBackend::new` then loads the PTX without running NVRTC or needing the
//! CUDA headers.
//!
//! Run: `MOTLEY_PTX_CACHE=DIR cargo run --release --features cuda --example ptx_cache [-- sm_90a]`
//! with libnvrtc on `LD_LIBRARY_PATH` and the headers in `MOTLEY_CUDA_INCLUDE`.

#[path = "../../tests/cuda_emu/primitives.rs"]
mod primitives;

use motley::backend::cuda::nvrtc::{precompile, KERNEL_FILES};

fn main() {
    let arch = std::env::args().nth(1).unwrap_or_else(|| "sm_90a".into());
    match precompile(&arch, KERNEL_FILES.iter().chain([&primitives::PRIMITIVES])) {
        Ok(files) => files.iter().for_each(|f| println!("{}", f.display())),
        Err(e) => {
            eprintln!("ptx_cache: {e}");
            std::process::exit(1);
        }
    }
}
