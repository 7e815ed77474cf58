//! Compiles every CUDA kernel to PTX for an architecture (default `sm_90a`, the H100's and
//! H200's) into the PTX cache folder, `MOTLEY_PTX_CACHE` (else `~/.cache/motley/ptx`), without a
//! GPU. bench/gpu/build.sh carries that folder to the GPU machine, whose `CudaBackend::new` then
//! loads the PTX without running NVRTC or needing the CUDA headers.
//!
//! Run: `MOTLEY_PTX_CACHE=DIR cargo run --release --features cuda --example ptx_cache [-- sm_90a]`
//! with libnvrtc on `LD_LIBRARY_PATH` and the headers in `MOTLEY_CUDA_INCLUDE`.

fn main() {
    let arch = std::env::args().nth(1).unwrap_or_else(|| "sm_90a".into());
    match motley::backend::cuda::nvrtc::precompile(&arch) {
        Ok(files) => files.iter().for_each(|f| println!("{}", f.display())),
        Err(e) => {
            eprintln!("ptx_cache: {e}");
            std::process::exit(1);
        }
    }
}
