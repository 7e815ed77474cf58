//! Compiles every CUDA kernel with NVRTC for `sm_90a`, without a GPU, so that a kernel that does
//! not compile fails CI. Both storage variants are compiled: f32 and bf16 (what `train --device cuda` uses).
//! With `MOTLEY_PTXAS` naming NVIDIA's `ptxas`, each PTX file is also assembled for `sm_90a`, as
//! the driver does at load time (inline PTX that NVRTC passes through is only checked there),
//! the register and spill counts of the tensor-core kernels (attention, the fused experts) are
//! printed, and a bf16 one that keeps anything in local memory (a stack frame: spilled
//! registers, or a register array the compiler could not index statically) fails, as does one
//! whose wgmmas ptxas serializes. With `MOTLEY_NVDISASM` naming NVIDIA's `nvdisasm` as well, the
//! Hopper kernels' SASS is checked for the order their loops were written in
//! (`waits_follow_exponentials` for attention's, `products_precede_copies`).
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
                        Ok(Some(assembled)) if storage == Storage::Bf16 => {
                            failures.extend(
                                assembled.frames.iter().filter(|(_, bytes)| *bytes > 0).map(|(f, bytes)| format!("{} (Bf16) {f}: {bytes} bytes of stack frame (local memory), expected none", file.name)),
                            );
                            if let Some(sass) = &assembled.sass {
                                // The expert kernels' exponentials are their epilogues' (SwiGLU), which
                                // read the finished product: only attention's overlap a product.
                                if file.name == "attention" {
                                    failures.extend(file.hopper.iter().filter_map(|k| waits_follow_exponentials(sass, k).err()));
                                }
                                failures.extend(file.hopper.iter().filter_map(|k| products_precede_copies(sass, k).err()));
                            }
                        }
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

/// What `assemble` reports of a tensor-core file.
struct Assembled {
    /// Each entry point's stack-frame bytes.
    frames: Vec<(String, u64)>,
    /// `nvdisasm -c` of the cubin, where `MOTLEY_NVDISASM` names nvdisasm (CI sets it).
    sass: Option<String>,
}

/// Assembles `ptx` with the `ptxas` named by `MOTLEY_PTXAS` (nothing when unset: CI sets it);
/// with `report`, prints each kernel's registers and spills and returns what `Assembled` holds.
fn assemble(ptx: &str, name: &str, report: bool) -> Result<Option<Assembled>, String> {
    let Some(ptxas) = std::env::var_os("MOTLEY_PTXAS") else { return Ok(None) };
    let dir = std::env::temp_dir().join(format!("motley-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (src, out) = (dir.join(format!("{name}.ptx")), dir.join(format!("{name}.cubin")));
    std::fs::write(&src, ptx).map_err(|e| format!("{}: {e}", src.display()))?;
    let run = std::process::Command::new(&ptxas).args([&format!("-arch={ARCH}"), "-v"]).arg(&src).arg("-o").arg(&out).output();
    let sass = match (report, std::env::var_os("MOTLEY_NVDISASM")) {
        (true, Some(nvdisasm)) if out.is_file() => Some(disassemble(&nvdisasm, &out)),
        _ => None,
    };
    let _ = std::fs::remove_dir_all(&dir);
    let run = run.map_err(|e| format!("running {}: {e}", ptxas.to_string_lossy()))?;
    let sass = sass.transpose()?;
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
    Ok(Some(Assembled { frames, sass }))
}

fn disassemble(nvdisasm: &std::ffi::OsStr, cubin: &std::path::Path) -> Result<String, String> {
    let run = std::process::Command::new(nvdisasm).arg("-c").arg(cubin).output().map_err(|e| format!("running {}: {e}", nvdisasm.to_string_lossy()))?;
    if !run.status.success() {
        return Err(format!("nvdisasm failed on {}: {}", cubin.display(), String::from_utf8_lossy(&run.stderr)));
    }
    Ok(String::from_utf8_lossy(&run.stdout).into_owned())
}

/// One kernel's SASS lines (`nvdisasm -c`) and its loops: a branch back to an earlier label, as
/// (label line, branch line), in the order their branches appear, none spanning an `EXIT` (ptxas
/// puts the retries of an mbarrier wait after the kernel's end, branching back to the wait: a
/// span over most of the kernel that is no loop of its code).
struct KernelSass<'a> {
    body: Vec<&'a str>,
    loops: Vec<(usize, usize)>,
}

fn kernel_loops<'a>(sass: &'a str, kernel: &str) -> Result<KernelSass<'a>, String> {
    let header = format!(".text.{kernel}:");
    let body: Vec<&str> = sass.lines().skip_while(|l| !l.starts_with(&header)).skip(1).take_while(|l| !l.starts_with(".text.")).collect();
    if body.is_empty() {
        return Err(format!("{kernel}: not in the SASS"));
    }
    let (mut labels, mut loops) = (std::collections::HashMap::new(), Vec::new());
    for (i, line) in body.iter().enumerate() {
        if let Some(label) = line.strip_suffix(':').filter(|l| l.starts_with(".L_x_")) {
            labels.insert(label, i);
        } else if let Some(target) = line.contains("BRA").then(|| line.split('(').nth(1).and_then(|t| t.split(')').next())).flatten() {
            if let Some(&start) = labels.get(target) {
                if !body[start..i].iter().any(|l| l.contains("EXIT")) {
                    loops.push((start, i));
                }
            }
        }
    }
    Ok(KernelSass { body, loops })
}

/// In an attention kernel's largest loop, no wait for every wgmma group (`WARPGROUP.DEPBAR.LE gsb0, 0x0`)
/// before the loop's last exponential (`MUFU.EX2`): a softmax written to run while a product is
/// in flight must not wait for it first. ptxas is free to hoist such a wait (it did so in the
/// Hopper attention forward, to the top of the softmax: the tile's exponentials then ran after
/// its P V instead of beside it), so what the source intends is checked in what runs. Loops
/// without exponentials pass.
fn waits_follow_exponentials(sass: &str, kernel: &str) -> Result<(), String> {
    let KernelSass { body, loops } = kernel_loops(sass, kernel)?;
    let Some(&(start, end)) = loops.iter().max_by_key(|(a, b)| b - a) else { return Ok(()) };
    let in_loop = &body[start..=end];
    let last_exp = in_loop.iter().rposition(|l| l.contains("MUFU.EX2"));
    let first_full_wait = in_loop.iter().position(|l| l.contains("WARPGROUP.DEPBAR.LE gsb0, 0x0"));
    match (last_exp, first_full_wait) {
        (Some(e), Some(w)) if w < e => Err(format!(
            "{kernel}: its main loop waits for every wgmma group (SASS line {}) before its last exponential (line {}): the softmax no longer overlaps the product in flight",
            start + w,
            start + e
        )),
        _ => Ok(()),
    }
}

/// In every loop of `kernel` that both multiplies (`HGMMA`) and stages tiles (`LDGSTS`, cp.async),
/// the first product comes before the first copy: after the barrier that says a step's tiles
/// have arrived, the tensor cores get the step's work before each thread issues its share of a
/// later step's copies (tens to a hundred instructions a warp in these kernels).
fn products_precede_copies(sass: &str, kernel: &str) -> Result<(), String> {
    let KernelSass { body, loops } = kernel_loops(sass, kernel)?;
    for (start, end) in loops {
        let in_loop = &body[start..=end];
        let first = |what: &str| in_loop.iter().position(|l| l.contains(what));
        if let (Some(product), Some(copy)) = (first("HGMMA"), first("LDGSTS")) {
            if copy < product {
                return Err(format!("{kernel}: the loop at SASS line {start} issues a copy (line {}) before its first product (line {})", start + copy, start + product));
            }
        }
    }
    Ok(())
}
