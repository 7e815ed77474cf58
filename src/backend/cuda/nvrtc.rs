//! Kernel sources, their NVRTC compilation and the on-disk PTX cache.
//!
//! Every op family is one `.cu` file under `kernels/`, embedded with `include_str!` and prefixed
//! with `kernels/common.cuh`. The same function compiles them for the device at start-up and for
//! the CI test (`tests/cuda_nvrtc.rs`), which has no GPU and targets `sm_90a`.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};

/// One kernel file: its name, its source (without the common prefix) and the `extern "C"`
/// entry points the backend loads from it.
pub struct KernelFile {
    pub name: &'static str,
    pub source: &'static str,
    pub functions: &'static [&'static str],
    /// Entry points compiled only for `sm_90a` (wgmma), and on the kernel emulator.
    pub hopper: &'static [&'static str],
}

impl KernelFile {
    /// The entry points this file has when compiled for `arch`.
    pub fn entry_points(&self, arch: &str) -> impl Iterator<Item = &'static str> {
        let hopper = if arch == HOPPER_ARCH { self.hopper } else { &[] };
        self.functions.iter().chain(hopper).copied()
    }
}

/// The target of Hopper's arch-specific features (wgmma).
pub const HOPPER_ARCH: &str = "sm_90a";

/// The NVRTC target for a GPU of compute capability `major.minor`: Hopper's arch-specific
/// features need the `a` suffix; other GPUs use the plain target.
pub fn arch_for(major: i32, minor: i32) -> String {
    if (major, minor) == (9, 0) {
        HOPPER_ARCH.to_string()
    } else {
        format!("sm_{major}{minor}")
    }
}

const COMMON: &str = include_str!("kernels/common.cuh");

pub const KERNEL_FILES: &[KernelFile] = &[
    KernelFile {
        name: "elementwise",
        source: include_str!("kernels/elementwise.cu"),
        functions: &["add_assign", "add", "scale", "fill", "sum_squares_partial", "sum_squares_final", "f32_to_act", "act_to_f32"],
        hopper: &[],
    },
    KernelFile { name: "embed", source: include_str!("kernels/embed.cu"), functions: &["embedding_fwd", "embedding_bwd"], hopper: &[] },
    KernelFile {
        name: "norm",
        source: include_str!("kernels/norm.cu"),
        functions: &["rmsnorm_fwd", "rmsnorm_bwd_dx", "rmsnorm_dw_partial", "rmsnorm_dw_reduce"],
        hopper: &[],
    },
    KernelFile { name: "rope", source: include_str!("kernels/rope.cu"), functions: &["rope"], hopper: &[] },
    KernelFile { name: "swiglu", source: include_str!("kernels/swiglu.cu"), functions: &["swiglu_fwd", "swiglu_bwd"], hopper: &[] },
    KernelFile { name: "softmax", source: include_str!("kernels/softmax.cu"), functions: &["softmax_rows_fwd", "router_bwd", "route_select", "route_group_sums", "route_scan", "route_layout"], hopper: &[] },
    KernelFile {
        name: "permute",
        source: include_str!("kernels/permute.cu"),
        functions: &["gather_rows", "combine_rows", "gathered_dots"],
        hopper: &[],
    },
    KernelFile { name: "loss", source: include_str!("kernels/loss.cu"), functions: &["softmax_xent"], hopper: &[] },
    KernelFile { name: "optim", source: include_str!("kernels/optim.cu"), functions: &["adamw"], hopper: &[] },
    KernelFile { name: "experts", source: include_str!("kernels/experts.cu"), functions: &[], hopper: super::experts::HOPPER_FUNCTIONS },
    KernelFile {
        name: "attention",
        source: include_str!("kernels/attention.cu"),
        functions: super::attention::FUNCTIONS,
        hopper: super::attention::HOPPER_FUNCTIONS,
    },
];

/// Element type of a device buffer, and the activation storage (`act_t` in `common.cuh`) a
/// kernel file is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Storage {
    F32,
    /// bf16 activations and working weights; master weights, gradients and statistics stay f32.
    Bf16,
}

impl Storage {
    pub fn bytes(self) -> usize {
        match self {
            Storage::F32 => 4,
            Storage::Bf16 => 2,
        }
    }
}

/// The full translation unit NVRTC compiles for `file`.
pub fn full_source(file: &KernelFile) -> String {
    format!("{COMMON}\n// ---- {}.cu ----\n{}", file.name, file.source)
}

/// Compiles one kernel file to PTX for `arch` (e.g. `sm_90a`), with `include_dirs` holding
/// `cuda_bf16.h` and `mma.h`.
pub fn compile(file: &KernelFile, arch: &str, include_dirs: &[PathBuf], storage: Storage) -> Result<Ptx, String> {
    let mut options = vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string()];
    if storage == Storage::Bf16 {
        options.push("-DMOTLEY_ACT_BF16".to_string());
    }
    let opts = CompileOptions {
        include_paths: include_dirs.iter().map(|p| p.display().to_string()).collect(),
        options,
        name: Some(format!("{}.cu", file.name)),
        ..Default::default()
    };
    compile_ptx_with_opts(full_source(file), opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            format!("NVRTC failed on kernels/{}.cu for {arch} ({storage:?}):\n{}", file.name, log.to_string_lossy())
        }
        other => format!("NVRTC failed on kernels/{}.cu: {other:?}", file.name),
    })
}

/// Whether the NVRTC shared library can be loaded (cudarc would panic on first use otherwise).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Include directories for NVRTC: `MOTLEY_CUDA_INCLUDE` (colon-separated), else the
/// `nvidia/cu13/include` folder of the Python virtualenv at `MOTLEY_CUDA_HOME`, else
/// `/usr/local/cuda/include`. Only existing folders are returned.
pub fn include_dirs_from_env() -> Vec<PathBuf> {
    if let Ok(list) = std::env::var("MOTLEY_CUDA_INCLUDE") {
        return std::env::split_paths(&list).filter(|p| p.is_dir()).collect();
    }
    if let Ok(home) = std::env::var("MOTLEY_CUDA_HOME") {
        return venv_include(Path::new(&home)).into_iter().collect();
    }
    let system = PathBuf::from("/usr/local/cuda/include");
    if system.is_dir() {
        vec![system]
    } else {
        Vec::new()
    }
}

/// `<venv>/lib/python3.*/site-packages/nvidia/cu13/include`, if it holds `cuda_bf16.h`.
fn venv_include(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    lib.flatten()
        .map(|e| e.path().join("site-packages/nvidia/cu13/include"))
        .find(|p| p.join("cuda_bf16.h").is_file())
}

/// The PTX cache folder: `MOTLEY_PTX_CACHE` when set (e.g. PTX compiled on another machine by
/// `bench/gpu/build.sh`, carried to a GPU machine without the CUDA headers), else
/// `~/.cache/motley/ptx`.
pub fn ptx_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("MOTLEY_PTX_CACHE") {
        return Some(PathBuf::from(dir));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/motley/ptx"))
}

/// `<file>-<storage>-<hash>.ptx`, keyed by the full source, the architecture, the storage
/// variant and the crate version. The headers' location is not part of the key, so PTX compiled
/// elsewhere is found; the headers come from the CUDA release the crate pins (`cuda-13000`).
fn ptx_file_name(file: &KernelFile, arch: &str, storage: Storage) -> String {
    let mut h = DefaultHasher::new();
    (full_source(file), arch, storage, env!("CARGO_PKG_VERSION")).hash(&mut h);
    format!("{}-{storage:?}-{:016x}.ptx", file.name, h.finish()).to_lowercase()
}

/// The PTX of `file` for `arch` and `storage` from the cache, compiled and stored on a miss.
/// NVRTC takes seconds per file, so the cache saves that at every start after the first. The
/// file is written under a temporary name and renamed, so a process starting at the same time
/// never reads half of it; a cache that cannot be written only costs the next start a
/// recompile, so write errors are ignored.
pub fn cached_ptx(file: &KernelFile, arch: &str, includes: &[PathBuf], storage: Storage) -> Result<Ptx, String> {
    let path = ptx_cache_dir().map(|dir| dir.join(ptx_file_name(file, arch, storage)));
    if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        return Ok(Ptx::from_src(text));
    }
    let ptx = compile(file, arch, includes, storage)?;
    if let Some(p) = &path {
        let tmp = p.with_extension(format!("tmp.{}", std::process::id()));
        let _ = p.parent().map(std::fs::create_dir_all);
        if std::fs::write(&tmp, ptx.to_src()).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
    Ok(ptx)
}

/// [`cached_ptx`] of each `(file, storage)` of `jobs`, in order. On a cold cache the files
/// compile side by side, one a core: NVRTC takes ~10 s for each of the attention and expert
/// files alone, and is thread-safe across programs.
pub fn cached_ptx_all(jobs: &[(&KernelFile, Storage)], arch: &str, includes: &[PathBuf]) -> Result<Vec<Ptx>, String> {
    use rayon::prelude::*;
    jobs.par_iter().map(|&(file, storage)| cached_ptx(file, arch, includes, storage)).collect()
}

/// Compiles `files` (e.g. [`KERNEL_FILES`]) for `arch`, in both storage variants, into the PTX
/// cache ([`ptx_cache_dir`]) without a GPU, so that a GPU machine given the folder starts without
/// NVRTC compiling anything. Returns the cache files.
pub fn precompile<'a>(arch: &str, files: impl IntoIterator<Item = &'a KernelFile>) -> Result<Vec<PathBuf>, String> {
    if !nvrtc_present() {
        return Err("libnvrtc not loadable: put its folder on LD_LIBRARY_PATH (see .ci/cuda-nvrtc.sh)".into());
    }
    let dir = ptx_cache_dir().ok_or("no PTX cache folder: set MOTLEY_PTX_CACHE or HOME")?;
    let includes = include_dirs_from_env();
    let files: Vec<&KernelFile> = files.into_iter().collect();
    let jobs: Vec<(&KernelFile, Storage)> = [Storage::F32, Storage::Bf16].into_iter().flat_map(|storage| files.iter().map(move |&file| (file, storage))).collect();
    cached_ptx_all(&jobs, arch, &includes)?;
    jobs.iter()
        .map(|&(file, storage)| {
            let path = dir.join(ptx_file_name(file, arch, storage));
            path.is_file().then_some(path.clone()).ok_or_else(|| format!("{} was not written", path.display()))
        })
        .collect()
}
