//! Tests that run the `motley` binary: resume is bit-identical, and bad input fails with a
//! one-line cause naming the file or field, exit code ≠ 0, and no good file overwritten.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A model small enough to train 20 steps in about a second.
const SMALL: &[&str] = &[
    "model.vocab_size=256",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=2",
    "model.seq_len=32",
    "moe.expert_widths=[16,32,48]",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.eval_batches=2",
    "train.eval_every=0",
    "train.warmup_steps=2",
    "train.threads=2",
    "data.tokenizer=\"byte\"",
];

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("motley-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn motley(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_motley")).args(args).output().expect("run motley")
}

fn train(out: &Path, extra: &[&str]) -> Output {
    let out_s = out.to_str().unwrap().to_string();
    let mut args: Vec<String> = vec!["train".into(), "--out".into(), out_s, "--prompt".into(), "".into()];
    for s in SMALL.iter().chain(extra.iter().filter(|s| s.contains('='))) {
        args.push("--set".into());
        args.push(s.to_string());
    }
    args.extend(extra.iter().filter(|s| !s.contains('=')).map(|s| s.to_string()));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    motley(&refs)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The single `error:` line of a failed run.
fn assert_fails_with(o: &Output, needles: &[&str]) {
    assert!(!o.status.success(), "expected failure, got success:\n{}", stderr(o));
    let err = stderr(o);
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line in:\n{err}"));
    for n in needles {
        assert!(line.contains(n), "error line {line:?} does not mention {n:?}");
    }
}

fn read(p: PathBuf) -> Vec<u8> {
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn resume_continues_bit_identically() {
    // The constant schedule makes the 10-step run's learning rates those of the 20-step run.
    let whole = temp("whole");
    let o = train(&whole, &["train.steps=20", "train.schedule=\"constant\"", "checkpoint.every=10"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let split = temp("split");
    let o = train(&split, &["train.steps=10", "train.schedule=\"constant\"", "checkpoint.every=10"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = train(&split, &["train.steps=20", "train.schedule=\"constant\"", "checkpoint.every=10", "--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let a = read(whole.join("checkpoints/step_000020").join(file));
        let b = read(split.join("checkpoints/step_000020").join(file));
        assert!(a == b, "{file} differs between 20 straight steps and 10 + resume + 10");
    }
    // Everything but the timings must match record for record.
    let losses = |dir: &Path| -> Vec<serde_json::Value> {
        String::from_utf8(read(dir.join("metrics.jsonl")))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["kind"] == "train")
            .map(|mut r| {
                let o = r.as_object_mut().unwrap();
                o.remove("tokens_per_s");
                o.remove("gflops");
                r
            })
            .collect()
    };
    assert_eq!(losses(&whole).len(), 20);
    assert_eq!(losses(&whole), losses(&split), "per-step records differ after resume");
    assert!(whole.join("loss.png").exists());
}

#[test]
fn an_existing_run_is_not_overwritten() {
    let out = temp("existing");
    assert!(train(&out, &["train.steps=3"]).status.success());
    let before = read(out.join("checkpoints/step_000003/model.safetensors"));
    assert_fails_with(&train(&out, &["train.steps=3"]), &["already holds checkpoints", "--resume"]);
    assert_eq!(before, read(out.join("checkpoints/step_000003/model.safetensors")));
}

/// CI has no GPU: `--device cuda` says why it cannot use one and trains on the CPU.
#[test]
fn cuda_without_a_gpu_falls_back_to_the_cpu() {
    let out = temp("cuda-fallback");
    let o = train(&out, &["train.steps=2", "--device", "cuda"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("device = \"cuda\"") && err.contains("training on the CPU instead"), "{err}");
    assert!(out.join("checkpoints/step_000002/model.safetensors").exists());
    assert_fails_with(&train(&temp("tpu"), &["--device", "tpu"]), &["device", "tpu"]);
}

#[test]
fn bad_config_fields_are_named() {
    let out = temp("badcfg");
    assert_fails_with(&train(&out, &["model.colour=3"]), &["model.colour"]);
    assert_fails_with(&train(&out, &["train.batch_size=\"big\""]), &["train.batch_size"]);
    assert_fails_with(&train(&out, &["model.d_model=30", "model.n_heads=4"]), &["model.d_model", "30"]);
    assert_fails_with(&train(&out, &["moe.expert_widths=[]"]), &["moe.expert_widths"]);
    assert_fails_with(&train(&out, &["moe.routing=\"top_p\"", "moe.top_p=1.5"]), &["moe.top_p", "1.5"]);
    assert_fails_with(&train(&out, &["moe.routing=\"top_p\"", "moe.top_p=0"]), &["moe.top_p"]);
    let missing = temp("missing.toml");
    std::fs::write(&missing, "device = \"cpu\"\n[model]\nvocab_size = 256\n").unwrap();
    let o = motley(&["train", "--config", missing.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_fails_with(&o, &["missing"]);
    assert!(!out.join("checkpoints").exists(), "a failed config must not start a run");
}

#[test]
fn bad_shards_and_checkpoints_are_named() {
    let out = temp("shards");
    assert!(train(&out, &["train.steps=2"]).status.success());
    let ck = out.join("checkpoints/step_000002");
    let val = std::fs::read_dir(out.join("data")).unwrap().next().unwrap().unwrap().path().join("val.bin");
    let bytes = read(val.clone());

    let truncated = temp("truncated.bin");
    std::fs::write(&truncated, &bytes[..bytes.len() - 7]).unwrap();
    assert_fails_with(&motley(&["eval", "--checkpoint", ck.to_str().unwrap(), "--data", truncated.to_str().unwrap()]), &["truncated.bin"]);
    let mut wrong = bytes.clone();
    wrong[0] ^= 0xff;
    let magic = temp("magic.bin");
    std::fs::write(&magic, &wrong).unwrap();
    assert_fails_with(&motley(&["eval", "--checkpoint", ck.to_str().unwrap(), "--data", magic.to_str().unwrap()]), &["magic.bin", "magic"]);

    // A checkpoint from another model shape is refused by --resume, naming both hashes.
    assert_fails_with(&train(&out, &["train.steps=4", "model.d_model=64", "--resume"]), &["hash"]);

    // A corrupt weights file is named; the run directory is left as it was.
    let model = ck.join("model.safetensors");
    let good = read(model.clone());
    std::fs::write(&model, &good[..good.len() / 2]).unwrap();
    assert_fails_with(&motley(&["eval", "--checkpoint", ck.to_str().unwrap()]), &["model.safetensors"]);
}

#[test]
fn a_diverging_run_stops_without_a_checkpoint() {
    let out = temp("nan");
    let o = train(&out, &["train.steps=30", "train.lr=1e30", "train.min_lr=1e30", "train.grad_clip=0.0", "checkpoint.every=0"]);
    assert_fails_with(&o, &["not finite", "without writing a checkpoint"]);
    assert!(!out.join("checkpoints").exists() || std::fs::read_dir(out.join("checkpoints")).unwrap().next().is_none());
}

#[test]
fn generate_and_eval_read_a_checkpoint() {
    let out = temp("gen");
    assert!(train(&out, &["train.steps=2"]).status.success());
    let o = motley(&["generate", "--checkpoint", out.to_str().unwrap(), "--prompt", "Emma", "--max-tokens", "5", "--seed", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("Emma"));
    let o = motley(&["eval", "--checkpoint", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("perplexity"));
    assert_fails_with(&motley(&["eval", "--checkpoint", "/nonexistent/run"]), &["/nonexistent/run"]);
}

/// An expert capacity: the evaluation lines say what share of the routed slots it dropped,
/// and the checkpoint's model, loaded for `eval` and `generate`, drops as training did.
#[test]
fn an_expert_capacity_reports_its_drops_and_stays_with_the_checkpoint() {
    use motley::parallel::dispatch::{DispatchMode, DropPolicy};
    let out = temp("capacity");
    let o = train(&out, &["train.steps=2", "train.eval_every=1", "moe.capacity_factor=0.5", "moe.drop_policy=\"position\""]);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let line = err.lines().find(|l| l.starts_with("step 2: validation loss")).unwrap_or_else(|| panic!("no evaluation line in:\n{err}"));
    assert!(line.contains("% of routed slots dropped by the experts' capacity"), "{line}");
    let (model, ..) = motley::train::trainer::load_checkpoint(&out, &motley::backend::cpu::Cpu::new(1)).unwrap();
    assert_eq!(model.dispatch(), DispatchMode::Capacity { factor: 0.5, policy: DropPolicy::Position });
    assert!(!stderr(&train(&temp("dropless"), &["train.steps=1", "train.eval_every=1"])).contains("dropped"));
}

/// `train.micro_batch_size`: the run says how it splits each step, `plan-memory` plans one
/// micro-batch by default, and a size that does not divide the batch is named.
#[test]
fn micro_batches_are_said_and_planned() {
    let o = train(&temp("micro"), &["train.steps=1", "train.batch_size=4", "train.micro_batch_size=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("each step adds up 2 micro-batches of 2 sequences on each of 1 rank(s)"), "{}", stderr(&o));
    let planned = |extra: &[&str]| {
        let args: Vec<&str> = ["plan-memory", "--set", "train.batch_size=4"].into_iter().chain(extra.iter().flat_map(|s| ["--set", *s])).collect();
        let o = motley(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        out.lines().find(|l| l.starts_with("device:")).unwrap_or_else(|| panic!("no device line in:\n{out}")).to_string()
    };
    let (whole, half) = (planned(&[]), planned(&["train.micro_batch_size=2"]));
    assert!(whole != half && whole == planned(&["train.micro_batch_size=4"]), "whole batch: {whole}; micro-batch of 2: {half}");
    assert_fails_with(&train(&temp("micro_bad"), &["train.batch_size=4", "train.micro_batch_size=3"]), &["train.micro_batch_size", "divisor"]);
}

/// `memory.policy = "auto"` plans within `memory.device_gib` (on the CPU, which has no device
/// memory of its own, only where it is set): halfway between what keeping and recomputing every
/// layer need, it trains on a mix of both and says so; where no plan fits, it fails before the
/// run starts, naming what to change.
#[test]
fn auto_memory_policy_plans_within_the_device_budget() {
    let device_bytes = |policy: &str| {
        let mut args = vec!["plan-memory".to_string(), "--json".into(), "--set".into(), format!("memory.policy=\"{policy}\"")];
        for s in SMALL {
            args.extend(["--set".into(), s.to_string()]);
        }
        let o = motley(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "plan-memory {policy}: {}", stderr(&o));
        let json = String::from_utf8_lossy(&o.stdout);
        let at = json.find("\"device_bytes\": ").expect("device_bytes in the report") + "\"device_bytes\": ".len();
        json[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse::<f64>().unwrap()
    };
    let halfway_gib = (device_bytes("keep") + device_bytes("recompute")) / 2.0 / (1u64 << 30) as f64;
    let out = temp("auto");
    let o = train(&out, &["memory.policy=\"auto\"", &format!("memory.device_gib={halfway_gib}"), "train.steps=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let said = stderr(&o);
    assert!(said.contains("memory.policy = \"auto\": recompute ×1, keep ×1"), "{said}");
    let tight = temp("auto_tight");
    assert_fails_with(&train(&tight, &["memory.policy=\"auto\"", "memory.device_gib=0.000001", "train.steps=2"]), &["memory.device_gib", "leanest"]);
    assert!(!tight.join("checkpoints").exists(), "a plan that does not fit must not start a run");
}
