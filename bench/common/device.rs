//! The backends a bench runs on, with what a benchmark needs beyond the `Backend` trait: waiting
//! for queued work, and the peak memory of a measurement.

use motley::backend::cpu::Cpu;
use motley::backend::{Backend, OpTime};

use super::args::fail;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    pub fn parse(name: &str) -> DeviceKind {
        match name {
            "cpu" => DeviceKind::Cpu,
            "cuda" => DeviceKind::Cuda,
            other => fail(&format!("--device {other}: expected cpu or cuda")),
        }
    }
    /// The name `motley` uses (`device = "cuda"`), which also picks the α LP's assumed speed.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }
}

pub trait BenchBackend: Backend {
    /// For table captions, e.g. `NVIDIA H100 80GB HBM3 (sm_90)`.
    fn label(&self) -> String;
    /// What [`Self::peak_bytes`] measures.
    fn memory_kind(&self) -> &'static str;
    /// Waits until all queued work is done (before reading a clock).
    fn sync(&self);
    /// Starts a new peak-memory measurement.
    fn reset_peak(&self);
    fn peak_bytes(&self) -> u64;
    /// Per op recorded since the last call, slowest first; empty unless the backend was built
    /// with its profile on.
    fn take_profile(&self) -> Vec<OpTime>;
}

impl BenchBackend for Cpu {
    fn label(&self) -> String {
        "CPU (f32)".into()
    }
    fn memory_kind(&self) -> &'static str {
        "process peak RSS"
    }
    fn sync(&self) {}
    /// Writing 5 to `clear_refs` resets the kernel's peak RSS (`VmHWM`) to the current RSS.
    fn reset_peak(&self) {
        let _ = std::fs::write("/proc/self/clear_refs", "5");
    }
    fn peak_bytes(&self) -> u64 {
        proc_status_kib("VmHWM:") * 1024
    }
    fn take_profile(&self) -> Vec<OpTime> {
        Cpu::take_profile(self)
    }
}

/// `VmRSS` or `VmHWM` of this process, in KiB.
pub fn proc_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    line[field.len()..].trim().trim_end_matches("kB").trim().parse().unwrap_or_else(|_| panic!("bad {line:?}"))
}

#[cfg(feature = "cuda")]
mod cuda {
    use motley::backend::cuda::CudaBackend;
    use motley::backend::OpTime;

    use super::BenchBackend;

    impl BenchBackend for CudaBackend {
        fn label(&self) -> String {
            self.device().to_string()
        }
        fn memory_kind(&self) -> &'static str {
            "device pool high-water"
        }
        fn sync(&self) {
            self.synchronize().unwrap_or_else(|e| panic!("{e}"));
        }
        fn reset_peak(&self) {
            self.reset_peak_device_bytes().unwrap_or_else(|e| panic!("{e}"));
        }
        fn peak_bytes(&self) -> u64 {
            self.peak_device_bytes().unwrap_or_else(|e| panic!("{e}"))
        }
        fn take_profile(&self) -> Vec<OpTime> {
            CudaBackend::take_profile(self)
        }
    }
}

/// Which of the opt-in Hopper (wgmma) kernels a bench runs: `--hopper` all of them (attention at
/// head_dim 64 and the experts' grouped GEMMs), `--hopper-experts` the experts' only (so that
/// their timing does not depend on the attention kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hopper {
    Off,
    All,
    Experts,
}

impl Hopper {
    pub fn from_args(args: &super::args::Args) -> Hopper {
        match (args.has("--hopper"), args.has("--hopper-experts")) {
            (false, false) => Hopper::Off,
            (true, false) => Hopper::All,
            (false, true) => Hopper::Experts,
            (true, true) => fail("--hopper already runs the experts' Hopper kernels: give one of --hopper, --hopper-experts"),
        }
    }

    /// The flag that asks for it (to pass to a child process).
    pub fn flag(self) -> Option<&'static str> {
        match self {
            Hopper::Off => None,
            Hopper::All => Some("--hopper"),
            Hopper::Experts => Some("--hopper-experts"),
        }
    }

    /// The `impl` name of a motley row run on these kernels.
    pub fn label(self) -> &'static str {
        match self {
            Hopper::Off => "motley",
            Hopper::All => "motley (Hopper kernels)",
            Hopper::Experts => "motley (Hopper expert kernels)",
        }
    }
}

/// GPU 0 in bf16 mixed precision (what `motley train --device cuda` runs), or exit 2 saying
/// what is missing (driver, GPU, NVRTC, cuBLAS); on the Hopper kernels `hopper` asks for (exit
/// 2 on other GPUs).
#[cfg(feature = "cuda")]
pub fn open_cuda(profile: bool, hopper: Hopper) -> motley::backend::cuda::CudaBackend {
    use motley::backend::cuda::{cuda_available, CudaBackend, Storage};
    if let Err(why) = cuda_available() {
        fail(&format!("--device cuda: {why}"));
    }
    let be = CudaBackend::new(0, Storage::Bf16).unwrap_or_else(|e| fail(&format!("--device cuda: {e}")));
    let be = match hopper {
        Hopper::Off => Ok(be),
        Hopper::All => be.with_hopper_kernels(),
        Hopper::Experts => be.with_hopper_experts(),
    }
    .unwrap_or_else(|e| fail(&format!("{}: {e}", hopper.flag().unwrap_or_default())));
    if profile {
        be.with_profile()
    } else {
        be
    }
}

/// The table of `take_profile` rows over `steps` steps of `step_seconds` each: per op, calls,
/// milliseconds per step and share of the step; where the backend counts them (CUDA), the
/// device-memory GB/s and TFLOP/s the op's least bytes and FLOPs come to in its time, to set
/// beside the GPU's bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s) and tensor rate (989 TFLOP/s).
/// The rest of the step is time outside every op.
pub fn print_profile(title: &str, ops: &[OpTime], steps: usize, step_seconds: f64) {
    if ops.is_empty() {
        return;
    }
    let counted = ops.iter().any(|o| o.bytes > 0.0);
    let steps = steps.max(1) as f64;
    let (extra_head, extra_rule) = if counted { (" GB/s | TFLOP/s |", "---|---|") } else { ("", "") };
    println!("\n{title}\n| op | calls/step | ms/step | share of step |{extra_head}\n|---|---|---|---|{extra_rule}");
    let per_step = |secs: f64| secs / steps * 1e3;
    let step_ms = step_seconds * 1e3;
    let rate = |amount: f64, unit: f64, secs: f64| match amount / secs / unit {
        _ if amount <= 0.0 || secs <= 0.0 => String::new(),
        r if r < 10.0 => format!("{r:.2}"),
        r => format!("{r:.0}"),
    };
    for o in ops {
        let extra = if counted { format!(" {} | {} |", rate(o.bytes, 1e9, o.seconds), rate(o.flops, 1e12, o.seconds)) } else { String::new() };
        println!("| {} | {} | {:.2} | {:.1}% |{extra}", o.op, (o.calls as f64 / steps).round(), per_step(o.seconds), 100.0 * per_step(o.seconds) / step_ms);
    }
    let inside: f64 = ops.iter().map(|o| per_step(o.seconds)).sum();
    let blank = if counted { " | |" } else { "" };
    println!("| (outside any op) | | {:.2} | {:.1}% |{blank}", step_ms - inside, 100.0 * (step_ms - inside) / step_ms);
    println!("| (step) | | {step_ms:.2} | 100% |{blank}\n");
}

/// Exit 2: `--device cuda` in a build without the feature.
pub fn no_cuda_feature() -> ! {
    fail("--device cuda: this bench was built without the `cuda` feature; run it with `cargo bench --features cuda --bench …`, or use bench/gpu/build.sh")
}
