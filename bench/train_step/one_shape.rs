//! One shape on one device: `--device cpu|cuda --shape NAME [--batch B --seq T --policy P
//! --steps N --warmup W --max-seconds S --host-gib G --bandwidth-gbs X --threads N --json FILE
//! --profile]`
//! (`--max-seconds`: fewer timed steps when they take longer than that, at least one;
//! `--profile`: a table of time per op over the timed steps).

use motley::backend::cpu::Cpu;
use motley::config::MemoryConfig;
use serde_json::json;

use crate::common::args::{fail, show_size, Args};
use crate::common::device::{print_profile, BenchBackend, DeviceKind, Hopper};
use crate::common::shapes::{find, Shape};
use crate::common::step::{gib, gpu_link_gbs, measure, parse_policy, Run, Summary};

/// What one measurement is of (the rows of the table and the JSON line).
pub struct Case {
    pub device: DeviceKind,
    pub shape_name: String,
    pub shape: Shape,
    pub batch: usize,
    pub seq: usize,
    pub memory: MemoryConfig,
    pub warmup: usize,
    pub steps: usize,
    pub threads: usize,
    /// The opt-in Hopper (wgmma) kernels it runs on (`--hopper`, `--hopper-experts`).
    pub hopper: Hopper,
}

impl Case {
    /// The flags this module and the sweep share; `default_batch` overrides the shape's own B
    /// (the sweep's B=1).
    pub fn from_args(args: &Args, default_batch: Option<usize>, default_policy: &str, default_steps: usize, default_warmup: usize) -> Case {
        let device = DeviceKind::parse(args.value("--device").unwrap_or("cpu"));
        let hopper = Hopper::from_args(args);
        if device == DeviceKind::Cpu && hopper != Hopper::Off {
            fail("--hopper and --hopper-experts run the Hopper (wgmma) kernels: they need --device cuda");
        }
        let shape_name = args.value("--shape").unwrap_or(if device == DeviceKind::Cuda { "h100-ref" } else { "tiny" }).to_string();
        let shape = find(&shape_name).unwrap_or_else(|e| fail(&e));
        // The α LP's host tier and link: on the GPU half the device machine's 128 GiB of host
        // memory and the copy bandwidth issue #6 gives for the H100; on the CPU the config defaults.
        let (host_default, link_default) = match device {
            DeviceKind::Cuda => (64.0, gpu_link_gbs()),
            DeviceKind::Cpu => (8.0, 10.0),
        };
        let memory = parse_policy(args.value("--policy").unwrap_or(default_policy), args.get("--host-gib", host_default), args.get("--bandwidth-gbs", link_default)).unwrap_or_else(|e| fail(&e));
        Case {
            device,
            batch: args.size("--batch", default_batch.unwrap_or(shape.B)),
            seq: args.size("--seq", shape.T),
            shape,
            shape_name,
            memory,
            warmup: args.get("--warmup", default_warmup),
            steps: args.get("--steps", default_steps),
            threads: args.get("--threads", 0),
            hopper,
        }
    }

    /// The flags that rebuild this case in a child process.
    pub fn to_args(&self, policy: &str) -> Vec<String> {
        let flags = [
            ("--device", self.device.name().to_string()),
            ("--shape", self.shape_name.clone()),
            ("--batch", self.batch.to_string()),
            ("--seq", self.seq.to_string()),
            ("--policy", policy.to_string()),
            ("--host-gib", self.memory.host_gib.to_string()),
            ("--bandwidth-gbs", self.memory.bandwidth_gbs.to_string()),
            ("--warmup", self.warmup.to_string()),
            ("--steps", self.steps.to_string()),
            ("--threads", self.threads.to_string()),
        ];
        flags.into_iter().flat_map(|(f, v)| [f.to_string(), v]).chain(self.hopper.flag().map(str::to_string)).collect()
    }
}

pub const HEADER: &str = "| shape | device | B × T | policy | params | steps | step ms | tokens/s | model TFLOP/s | MFU | peak memory GiB |\n|---|---|---|---|---|---|---|---|---|---|---|";

/// One table row; MFU only on the GPU (the peak is a GPU's).
pub fn row(case: &Case, policy: &str, params: usize, s: &Summary) -> String {
    let mfu = if case.device == DeviceKind::Cuda { format!("{:.1}%", s.mfu_pct()) } else { "—".into() };
    format!(
        "| {} | {} | {} × {} | {policy} | {:.1} M | {} | {:.1} | {:.0} | {:.1} | {mfu} | {:.2} |",
        case.shape_name,
        case.device.name(),
        case.batch,
        show_size(case.seq),
        params as f64 / 1e6,
        s.steps,
        s.step_s() * 1e3,
        s.tokens_per_s(),
        s.flops_per_s() / 1e12,
        gib(s.peak_bytes)
    )
}

/// The JSON line, with torch_hmoe.py's field names so bench/gpu/table.py puts both in one table.
pub fn json_line(case: &Case, policy: &str, params: usize, status: &str, s: Option<&Summary>) -> serde_json::Value {
    let mut v = json!({
        "impl": case.hopper.label(), "device": case.device.name(), "shape": case.shape_name, "mode": policy,
        "B": case.batch, "T": case.seq, "params_M": (params as f64 / 1e5).round() / 10.0, "status": status,
    });
    if let Some(s) = s {
        let fields = json!({
            "step_s": s.step_s(), "tok_s": s.tokens_per_s().round(), "model_TFLOPs": s.flops_per_s() / 1e12,
            "mfu_pct": (case.device == DeviceKind::Cuda).then(|| s.mfu_pct()), "peak_GiB": gib(s.peak_bytes),
        });
        v.as_object_mut().unwrap().extend(fields.as_object().unwrap().clone());
    }
    v
}

pub fn run(args: &Args) {
    let case = Case::from_args(args, None, "keep", 10, 2);
    let profile = args.has("--profile");
    match case.device {
        DeviceKind::Cpu => {
            let be = Cpu::new(case.threads);
            measure_and_print(&if profile { be.with_profile() } else { be }, &case, args)
        }
        DeviceKind::Cuda => {
            #[cfg(feature = "cuda")]
            return measure_and_print(&crate::common::device::open_cuda(profile, case.hopper), &case, args);
            #[cfg(not(feature = "cuda"))]
            crate::common::device::no_cuda_feature();
        }
    }
}

fn measure_and_print<B: BenchBackend>(be: &B, case: &Case, args: &Args) {
    eprintln!("building {} (B={} T={}) on {}", case.shape_name, case.batch, case.seq, be.label());
    let mut run = Run::new(be, &case.shape, case.batch, case.seq, &case.memory, case.device.name()).unwrap_or_else(|e| fail(&format!("{e}")));
    let policy = run.policy_label();
    let max_seconds = args.get("--max-seconds", f64::INFINITY);
    let times = measure(be, &mut run, case.warmup, case.steps, max_seconds, |t| {
        eprintln!("{} step: {:.3} s", if t.warmup { "warm-up" } else { "timed" }, t.seconds);
        if t.warmup {
            be.take_profile(); // the profile covers the timed steps only
        }
    })
    .unwrap_or_else(|e| fail(&format!("{e}")));
    let Some(summary) = Summary::of(&times) else { fail("--steps 0: nothing timed") };
    println!("motley training step on {}, {} timed steps after {} warm-up; peak memory: {}", be.label(), summary.steps, case.warmup, be.memory_kind());
    println!("{HEADER}\n{}", row(case, &policy, run.n_params(), &summary));
    let title = format!("time per op over {} steps ({})", summary.steps, if case.device == DeviceKind::Cuda { "GPU stream time between events around each op" } else { "wall time inside the backend" });
    print_profile(&title, &be.take_profile(), summary.steps, summary.seconds / summary.steps as f64);
    args.append_json(&json_line(case, &policy, run.n_params(), "ok", Some(&summary)));
}
