//! Can this machine run the CUDA backend? Checked before anything touches the driver, because
//! cudarc loads the CUDA libraries lazily and panics when one is missing.

use cudarc::driver::CudaContext;

use super::nvrtc::nvrtc_present;

const LIBS_HINT: &str = "put the folders holding libnvrtc.so.13, libcublasLt.so.13 and libcublas.so.13 on LD_LIBRARY_PATH \
(e.g. a Python env with `pip install nvidia-cuda-nvrtc==13.0.* nvidia-cublas==13.0.*`: \
<site-packages>/nvidia/cu13/lib, or /usr/local/cuda/lib64)";

/// `Ok(())` when the driver, a GPU, NVRTC, cuBLASLt and cuBLAS are all usable; otherwise one sentence
/// saying what is missing and what to do, for `--device cuda` to print before falling back.
pub fn cuda_available() -> Result<(), String> {
    // SAFETY: these only try to dlopen the libraries by their candidate names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err("CUDA driver library (libcuda.so) not found: this machine has no NVIDIA driver; use --device cpu".into());
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => {}
        Ok(_) => return Err("the CUDA driver reports no GPU; use --device cpu".into()),
        Err(e) => return Err(format!("the CUDA driver failed to initialise ({e:?}); use --device cpu")),
    }
    if !nvrtc_present() {
        return Err(format!("NVRTC (libnvrtc) not found, needed to compile the kernels: {LIBS_HINT}"));
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
        return Err(format!("cuBLASLt (libcublasLt) not found, needed for the matmuls: {LIBS_HINT}"));
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(format!("cuBLAS (libcublas) not found, needed for the experts' grouped matmuls: {LIBS_HINT}"));
    }
    Ok(())
}
