//! Builds the CUDA emulator with g++, for `tests/cuda_emu.rs` (every kernel against the CPU),
//! `tests/cuda_parity.rs` and `tests/cuda_memory.rs` (the whole CUDA backend on the emulated
//! device, or on a GPU: [`device`] chooses):
//! - the kernel libraries, one per activation storage: each kernel file unchanged (the exact
//!   `nvrtc::full_source` text) with `emu.h` force-included, plus `emu.cpp`;
//! - the emulated device (`device/`): stand-ins for libcuda, libnvrtc, libcublasLt and libcublas
//!   that run the backend's calls on the CPU, launching kernels from the kernel libraries.
//!
//! Results are cached under `CARGO_TARGET_TMPDIR/cuda_emu`, named by a hash of every input, and
//! written under a temporary name then renamed, so a concurrent run never loads half a file.
#![allow(dead_code)]

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use motley::backend::cuda::cuda_available;
use motley::backend::cuda::nvrtc::{full_source, Storage, KERNEL_FILES};

const EMU_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cuda_emu");

/// `-fno-strict-aliasing`: the kernels read bf16 pairs through `unsigned*`, as CUDA allows;
/// `-ffp-contract=off`: no fused multiply-adds, so the exact comparisons hold on any machine;
/// UBSan's alignment and bounds checks: a misaligned access (an error on the GPU) or an index
/// past a fixed-size array (`__shared__ float scratch[32]`) stops the test with the source line.
const FLAGS: &[&str] = &[
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-shared",
    "-fvisibility=hidden",
    "-fno-strict-aliasing",
    "-ffp-contract=off",
    "-fsanitize=alignment,bounds",
    "-fno-sanitize-recover=all",
    "-DMOTLEY_EMU",
];

#[path = "primitives.rs"]
mod primitives;
pub use primitives::PRIMITIVES;

/// The C++ compiler (`CXX`, default g++) and its version (part of every cache key).
pub struct Compiler {
    cxx: String,
    version: Vec<u8>,
}

impl Compiler {
    /// The compiler, or `None` with a skip message when it is missing; under `CI=true` a missing
    /// compiler fails `test` instead.
    pub fn find(test: &str) -> Option<Compiler> {
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
        match Command::new(&cxx).arg("--version").output() {
            Ok(out) if out.status.success() => Some(Compiler { cxx, version: out.stdout }),
            _ => {
                let why = format!("`{cxx} --version` failed: the CUDA emulator needs g++ (apt-get install g++, or set CXX)");
                assert!(std::env::var("CI").as_deref() != Ok("true"), "{test} cannot run: {why}");
                eprintln!("SKIPPED {test}: {why}");
                None
            }
        }
    }

    fn spawn(&self, args: impl FnOnce(&mut Command)) -> Result<Child, String> {
        let mut cmd = Command::new(&self.cxx);
        args(&mut cmd);
        cmd.stderr(Stdio::piped()).spawn().map_err(|e| format!("{}: {e}", self.cxx))
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn cache_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("cuda_emu")
}

/// Waits for the compiler jobs, then renames each (temporary, final) output into place.
fn finish(cxx: &str, jobs: Vec<(PathBuf, PathBuf, Child)>, sources: &Path) -> Result<(), String> {
    for (lib, tmp, child) in jobs {
        let out = child.wait_with_output().map_err(|e| format!("{cxx}: {e}"))?;
        if !out.status.success() {
            return Err(format!("{cxx} failed for {} (sources in {}):\n{}", lib.display(), sources.display(), String::from_utf8_lossy(&out.stderr)));
        }
        std::fs::rename(&tmp, &lib).map_err(|e| format!("{}: {e}", lib.display()))?;
    }
    Ok(())
}

/// Removes cached files and folders of older inputs: those whose name has none of `current`.
fn prune(current: &[String]) {
    for old in std::fs::read_dir(cache_dir()).into_iter().flatten().flatten().map(|e| e.path()) {
        let name = old.to_string_lossy().into_owned();
        if !current.iter().any(|c| name.contains(c.as_str())) {
            let _ = if old.is_dir() { std::fs::remove_dir_all(old) } else { std::fs::remove_file(old) };
        }
    }
}

fn kernel_hash(c: &Compiler) -> String {
    let emu = Path::new(EMU_DIR);
    let mut h = DefaultHasher::new();
    (read(&emu.join("emu.h")), read(&emu.join("emu.cpp")), read(&emu.join("tensor_map.h")), read(&emu.join("include/cuda_bf16.h")), FLAGS, &c.version).hash(&mut h);
    for f in KERNEL_FILES.iter().chain([&PRIMITIVES]) {
        (f.name, full_source(f), f.functions, f.hopper).hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

const DEVICE_SOURCES: &[&str] = &["device.h", "driver.cpp", "nvrtc.cpp", "blas.cpp", "nccl.cpp"];

fn device_hash(c: &Compiler) -> String {
    let dir = Path::new(EMU_DIR).join("device");
    let mut h = DefaultHasher::new();
    for f in DEVICE_SOURCES {
        read(&dir.join(f)).hash(&mut h);
    }
    read(&Path::new(EMU_DIR).join("tensor_map.h")).hash(&mut h);
    c.version.hash(&mut h);
    format!("device-{:016x}", h.finish())
}

/// Builds (or finds in the cache) the kernel emulator libraries for f32 and bf16 storage, in
/// parallel.
pub fn kernel_libs(c: &Compiler) -> Result<[PathBuf; 2], String> {
    let emu = Path::new(EMU_DIR);
    let hash = kernel_hash(c);
    let dir = cache_dir();
    let libs = [Storage::F32, Storage::Bf16].map(|st| (st, dir.join(format!("libemu-{st:?}-{hash}.so").to_lowercase())));
    if libs.iter().all(|(_, lib)| lib.is_file()) {
        return Ok(libs.map(|(_, lib)| lib));
    }
    // Each kernel file as NVRTC sees it, and a wrapper that includes it inside a namespace of its
    // own (common.cuh has non-inline functions) and registers its entry points by name.
    let src = dir.join(format!("src-{hash}-{}", std::process::id()));
    std::fs::create_dir_all(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    let mut wrappers = Vec::new();
    for f in KERNEL_FILES.iter().chain([&PRIMITIVES]) {
        let mut wrapper = format!("namespace k_{0} {{\n#include \"{0}.cu\"\n}}\n", f.name);
        for (i, func) in f.functions.iter().chain(f.hopper).enumerate() {
            wrapper += &format!("static const emu::Registration r{i}(\"{func}\", &k_{}::{func});\n", f.name);
        }
        wrappers.push(src.join(format!("k_{}.cpp", f.name)));
        for (path, text) in [(src.join(format!("{}.cu", f.name)), full_source(f)), (wrappers[wrappers.len() - 1].clone(), wrapper)] {
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let mut jobs = Vec::new();
    for (storage, lib) in libs.iter().filter(|(_, lib)| !lib.is_file()) {
        let tmp = lib.with_extension(format!("tmp{}", std::process::id()));
        let child = c.spawn(|cmd| {
            cmd.args(FLAGS).args((*storage == Storage::Bf16).then_some("-DMOTLEY_ACT_BF16"));
            cmd.arg("-I").arg(emu.join("include")).arg("-I").arg(&src).arg("-include").arg(emu.join("emu.h"));
            cmd.arg(emu.join("emu.cpp")).args(&wrappers).arg("-o").arg(&tmp);
        })?;
        jobs.push((lib.clone(), tmp, child));
    }
    finish(&c.cxx, jobs, &src)?;
    // The sources stay, for the file and line of a UBSan message; those of older inputs go.
    prune(&[hash, device_hash(c)]);
    Ok(libs.map(|(_, lib)| lib))
}

/// The emulated CUDA libraries, in the order to load them: each named by the soname cudarc asks
/// for first (`libcuda.so`, …), so that once loaded by path, cudarc's loads by name find them.
pub const DEVICE_LIBS: [&str; 5] = ["libcuda.so", "libnvrtc.so", "libcublasLt.so", "libcublas.so", "libnccl.so"];

/// Builds (or finds in the cache) the emulated device's libraries, [`DEVICE_LIBS`] in order.
pub fn device_libs(c: &Compiler) -> Result<Vec<PathBuf>, String> {
    let src = Path::new(EMU_DIR).join("device");
    let hash = device_hash(c);
    let dir = cache_dir().join(&hash);
    let libs: Vec<PathBuf> = DEVICE_LIBS.iter().map(|name| dir.join(name)).collect();
    if libs.iter().all(|l| l.is_file()) {
        return Ok(libs);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let common = ["-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Werror"];
    let build = |lib: &Path, source: &str, link_driver: bool| {
        let tmp = lib.with_extension(format!("tmp{}", std::process::id()));
        let soname = lib.file_name().expect("library name").to_string_lossy().into_owned();
        let child = c.spawn(|cmd| {
            cmd.args(common).arg(format!("-Wl,-soname,{soname}")).arg(src.join(source)).arg("-o").arg(&tmp);
            if link_driver {
                // The others call the driver's exports (device.h); it is loaded first, by soname.
                cmd.arg(libs[0].clone()).arg("-Wl,-rpath,$ORIGIN");
            }
        });
        child.map(|ch| (lib.to_path_buf(), tmp, ch))
    };
    finish(&c.cxx, vec![build(&libs[0], "driver.cpp", false)?], &src)?;
    let jobs = vec![build(&libs[1], "nvrtc.cpp", true)?, build(&libs[2], "blas.cpp", true)?, build(&libs[3], "blas.cpp", true)?, build(&libs[4], "nccl.cpp", true)?];
    finish(&c.cxx, jobs, &src)?;
    prune(&[kernel_hash(c), hash]);
    Ok(libs)
}

/// Chooses, once per process, where the CUDA backend runs, as `MOTLEY_PARITY_DEVICE` asks: `gpu`
/// (fails without one), `emulator`, or `auto` (the default: a GPU when a CUDA driver can be
/// loaded, else the emulator). `Some(description)`, or `None` to skip `test` (the emulator
/// wanted and g++ missing, outside CI).
pub fn device(test: &str) -> Option<&'static str> {
    static DEVICE: OnceLock<Option<&'static str>> = OnceLock::new();
    *DEVICE.get_or_init(|| {
        let want = std::env::var("MOTLEY_PARITY_DEVICE").unwrap_or_else(|_| "auto".into());
        assert!(["auto", "gpu", "emulator"].contains(&want.as_str()), "MOTLEY_PARITY_DEVICE={want}: expected auto, gpu or emulator");
        // SAFETY: only tries to dlopen the driver library by its candidate names.
        if want != "emulator" && unsafe { cudarc::driver::sys::is_culib_present() } {
            if let Err(e) = cuda_available() {
                panic!("{test}: {e}. See docs/cuda.md for the GPU session command.");
            }
            eprintln!("{test} runs on the GPU");
            return Some("GPU");
        }
        assert!(want != "gpu", "MOTLEY_PARITY_DEVICE=gpu, but no CUDA driver (libcuda.so) can be loaded");
        load_emulated_device(test)?;
        eprintln!("{test} runs on the emulated device (tests/cuda_emu/device)");
        Some("emulator")
    })
}

/// Builds the kernel emulator and the emulated CUDA libraries, and loads the latter by path, so
/// that cudarc's loads by name (`libcuda.so`, …) find them among the loaded libraries.
fn load_emulated_device(test: &str) -> Option<()> {
    let cxx = Compiler::find(test)?;
    let [f32_kernels, bf16_kernels] = kernel_libs(&cxx).unwrap_or_else(|e| panic!("building the kernel emulator: {e}"));
    let libs = device_libs(&cxx).unwrap_or_else(|e| panic!("building the emulated device: {e}"));
    // The emulated NVRTC's output is not PTX: it gets a cache folder of its own.
    let ptx_cache = libs[0].parent().expect("library folder").join("ptx");
    std::env::set_var("MOTLEY_PTX_CACHE", ptx_cache);
    std::env::set_var("MOTLEY_EMU_KERNELS_F32", f32_kernels);
    std::env::set_var("MOTLEY_EMU_KERNELS_BF16", bf16_kernels);
    // Two devices, so that ranks on threads each hold one (NCCL's path in tests/cuda_parallel.rs).
    std::env::set_var("MOTLEY_EMU_DEVICE_COUNT", "2");
    for lib in libs {
        // SAFETY: our own libraries, with no initialisers beyond C++ statics; kept loaded for
        // the process's life, as cudarc keeps the CUDA libraries.
        let handle = unsafe { libloading::Library::new(&lib) }.unwrap_or_else(|e| panic!("loading {}: {e}", lib.display()));
        std::mem::forget(handle);
    }
    Some(())
}
