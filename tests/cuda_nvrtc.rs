//! Compiles every CUDA kernel with NVRTC for `sm_90a`, without a GPU, so that a kernel that does
//! not compile fails CI. Both storage variants are compiled: f32 and bf16 (what `train --device cuda` uses).
//! With `MOTLEY_PTXAS` naming NVIDIA's `ptxas`, each PTX file is also assembled for `sm_90a`, as
//! the driver does at load time (inline PTX that NVRTC passes through is only checked there),
//! the register and spill counts of the tensor-core kernels (attention, the fused experts) are
//! printed, and a bf16 one that keeps anything in local memory (a stack frame: spilled
//! registers, or a register array the compiler could not index statically) fails, as does one
//! whose wgmmas ptxas serializes.
//!
//! Needs libnvrtc on the library path and the CUDA headers (cuda_bf16.h, mma.h) in
//! `MOTLEY_CUDA_INCLUDE`, or a Python venv with NVIDIA's wheels in `MOTLEY_CUDA_HOME`;
//! `.ci/cuda-nvrtc.sh` sets both up. Without NVRTC the test fails when `CI=true` and prints a
//! skip notice otherwise.
#![cfg(feature = "cuda")]

use motley::backend::cuda::nvrtc::{compile, include_dirs_from_env, nvrtc_present, Storage, KERNEL_FILES};

const ARCH: &str = "sm_90a";
const INSTALL: &str = "pip install \"nvidia-cuda-nvrtc==13.0.*\" \"nvidia-cuda-runtime==13.0.*\" \"nvidia-cuda-cccl==13.0.*\" \
into a venv, put <site-packages>/nvidia/cu13/lib on LD_LIBRARY_PATH and set MOTLEY_CUDA_INCLUDE=<site-packages>/nvidia/cu13/include \
(or run .ci/cuda-nvrtc.sh)";

/// `Some(reason)` when the toolchain is missing: a failure under CI, a skip elsewhere.
fn missing_toolchain() -> Option<String> {
    if !nvrtc_present() {
        return Some("libnvrtc not loadable".into());
    }
    if !include_dirs_from_env().iter().any(|d| d.join("cuda_bf16.h").is_file()) {
        return Some("cuda_bf16.h not found in MOTLEY_CUDA_INCLUDE / MOTLEY_CUDA_HOME / /usr/local/cuda/include".into());
    }
    None
}

#[test]
fn every_kernel_compiles_for_sm90a() {
    if let Some(reason) = missing_toolchain() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CUDA kernel check cannot run: {reason}. {INSTALL}");
        }
        eprintln!("SKIPPED cuda_nvrtc: {reason}. To run it: {INSTALL}");
        return;
    }
    let includes = include_dirs_from_env();
    let mut failures = Vec::new();
    for storage in [Storage::F32, Storage::Bf16] {
        for file in KERNEL_FILES {
            let t = std::time::Instant::now();
            match compile(file, ARCH, &includes, storage) {
                Ok(ptx) => {
                    let text = ptx.to_src();
                    // The names the backend loads must be entry points of the PTX.
                    for f in file.entry_points(ARCH) {
                        if !text.contains(&format!(".entry {f}(")) {
                            failures.push(format!("kernels/{}.cu ({storage:?}): no entry point `{f}`", file.name));
                        }
                    }
                    eprintln!("compiled kernels/{}.cu ({storage:?}) for {ARCH} in {:.2}s", file.name, t.elapsed().as_secs_f64());
                    // The tensor-core files: attention and the fused experts (their Hopper kernels).
                    match assemble(&text, &format!("{}-{storage:?}", file.name), !file.hopper.is_empty()) {
                        Ok(Some(frames)) if storage == Storage::Bf16 => failures.extend(
                            frames.iter().filter(|(_, bytes)| *bytes > 0).map(|(f, bytes)| format!("{} (Bf16) {f}: {bytes} bytes of stack frame (local memory), expected none", file.name)),
                        ),
                        Ok(_) => {}
                        Err(e) => failures.push(e),
                    }
                }
                Err(e) => failures.push(e),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Assembles `ptx` with the `ptxas` named by `MOTLEY_PTXAS` (nothing when unset: CI sets it);
/// with `report`, prints each kernel's registers and spills and returns each entry point's
/// stack-frame bytes.
fn assemble(ptx: &str, name: &str, report: bool) -> Result<Option<Vec<(String, u64)>>, String> {
    let Some(ptxas) = std::env::var_os("MOTLEY_PTXAS") else { return Ok(None) };
    let dir = std::env::temp_dir().join(format!("motley-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (src, out) = (dir.join(format!("{name}.ptx")), dir.join(format!("{name}.cubin")));
    std::fs::write(&src, ptx).map_err(|e| format!("{}: {e}", src.display()))?;
    let run = std::process::Command::new(&ptxas).args([&format!("-arch={ARCH}"), "-v"]).arg(&src).arg("-o").arg(&out).output();
    let _ = std::fs::remove_dir_all(&dir);
    let run = run.map_err(|e| format!("running {}: {e}", ptxas.to_string_lossy()))?;
    let log = String::from_utf8_lossy(&run.stderr);
    if !run.status.success() {
        return Err(format!("ptxas rejected the PTX of {name}:\n{log}"));
    }
    // ptxas keeps wgmmas correct where it cannot prove their operands safe by running them one
    // at a time, which costs the tensor cores their overlap: a defect of the kernel.
    if let Some(line) = log.lines().find(|l| l.contains("wgmma.mma_async instructions are serialized")) {
        return Err(format!("ptxas serialized wgmma in {name}: {}", line.trim()));
    }
    if !report {
        return Ok(None);
    }
    // "Compiling entry function 'f'", then "N bytes stack frame, … spill stores, …", then "Used N
    // registers".
    let (mut entry, mut frames) = ("", Vec::new());
    for line in log.lines() {
        if let Some(f) = line.split("entry function '").nth(1) {
            entry = f.split('\'').next().unwrap_or(f);
        } else if line.contains("warning") || line.contains("Performance Loss") {
            eprintln!("  {name}: {}", line.trim());
        } else if line.contains("spill stores") || line.contains("Used ") {
            let info = line.trim().trim_start_matches("ptxas info    : ");
            eprintln!("  {name} {entry}: {info}");
            if let Some(bytes) = info.split_once(" bytes stack frame").and_then(|(n, _)| n.parse().ok()) {
                frames.push((entry.to_string(), bytes));
            }
        }
    }
    Ok(Some(frames))
}
