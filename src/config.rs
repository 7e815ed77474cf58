//! TOML configuration: sections, validation, dotted-key overrides.
//!
//! A run is described by one TOML file with the sections `[model] [moe] [train] [data]
//! [checkpoint] [memory] [parallel] [cuda]` and a top-level `device`. Every key must be present
//! (except `[parallel]`, which defaults to no parallelism, and `[cuda]`, which defaults to the
//! portable kernels) and unknown keys are errors, so a typo never silently falls back to a
//! default. `configs/tiny.toml` is compiled into the
//! binary and is the config used when no file is given.
//!
//! Overrides (`--set moe.top_p=0.6`) are applied to the parsed TOML table *before* it is
//! turned into structs, so they go through exactly the same type checks as the file.

use std::path::Path;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::model::config::{ModelConfig, MoeConfig, Routing, WidthLayout};
use crate::parallel::dispatch::{DispatchMode, DropPolicy};
use crate::{Error, Result};

/// The default config (`configs/tiny.toml`), used when no file is given.
pub const DEFAULT_TOML: &str = include_str!("../configs/tiny.toml");

/// A fully resolved, validated run configuration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Config {
    /// `"cpu"` or `"cuda"`.
    pub device: String,
    pub model: ModelConfig,
    /// Expert widths are always explicit here, whichever way the file gave them.
    pub moe: MoeConfig,
    /// The MoE layers' token dispatch: dropless, or with `moe.capacity_factor`. Not part of the
    /// model's shape: a checkpoint trained either way resumes either way. Written into `[moe]`
    /// by [`Config::to_toml`].
    #[serde(skip)]
    pub dispatch: DispatchMode,
    pub train: TrainConfig,
    pub data: DataConfig,
    pub checkpoint: CheckpointConfig,
    pub memory: MemoryConfig,
    pub parallel: ParallelConfig,
    pub cuda: CudaConfig,
}

/// The `[moe]` section as written: widths either as an explicit `expert_widths` list or as
/// `layout` + `n_experts` + `total_width` (+ optional `width_granule`, default 8).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeSection {
    pub expert_widths: Option<Vec<usize>>,
    pub layout: Option<String>,
    pub n_experts: Option<usize>,
    pub total_width: Option<usize>,
    pub width_granule: Option<usize>,
    pub routing: Routing,
    pub top_k: usize,
    pub top_p: f32,
    pub load_balance: f32,
    pub p_penalty: f32,
    pub entropy: f32,
    pub z_loss: f32,
    /// Optional: each expert runs at most `ceil(k·N/E · factor)` of a step's N tokens per rank
    /// (the rest are dropped: the residual carries them); absent, routing is dropless.
    pub capacity_factor: Option<f64>,
    /// With `capacity_factor`: which tokens an over-full expert keeps (default "probs").
    pub drop_policy: Option<DropPolicy>,
}

/// Learning-rate schedule after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    /// Cosine decay from `lr` to `min_lr` at the last step.
    Cosine,
    /// `lr` throughout.
    Constant,
}

/// The `[train]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub seed: u64,
    /// Sequences per optimizer step, over all data-parallel ranks.
    pub batch_size: usize,
    /// Optional: sequences each rank runs through one forward and backward; a step adds up the
    /// gradients of its share of `batch_size` (which this must divide) one micro-batch at a
    /// time, so activations take a micro-batch's memory. Left out: the whole share at once.
    #[serde(default)]
    pub micro_batch_size: Option<usize>,
    /// Tokens per training sequence; at most `model.seq_len`.
    pub seq_len: usize,
    pub steps: u64,
    pub lr: f32,
    pub min_lr: f32,
    pub warmup_steps: u64,
    pub schedule: Schedule,
    pub weight_decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Global gradient-norm clip; 0 disables clipping.
    pub grad_clip: f32,
    /// Evaluate every this many steps; 0 evaluates only at the end.
    pub eval_every: u64,
    pub eval_batches: usize,
    /// Worker threads; 0 uses every core.
    pub threads: usize,
    /// Stop once the cumulative counted training FLOPs (`StepStats::train_flops`, from the
    /// tokens actually routed to each expert) reach this; 0 = no FLOP budget. With a budget,
    /// `steps` is only an upper bound, so runs of models with different FLOPs per token can be
    /// compared at equal compute. Optional so configs and checkpoints written before it load.
    #[serde(default)]
    pub max_flops: f64,
}

/// The `[data]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `"embedded:austen"`, `"embedded:kjv"`, `"embedded:austen+kjv"` (several embedded corpora,
    /// each split into train/validation on its own, then joined) or a path to a UTF-8 text file.
    pub corpus: String,
    /// `"byte"`, `"bpe"` (trained on the corpus with `model.vocab_size` entries) or a path to a tokenizer.json.
    pub tokenizer: String,
    /// Fraction of the corpus, taken from its end, held out for validation.
    pub val_fraction: f32,
}

/// The `[checkpoint]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every this many steps; 0 saves only at the end.
    pub every: u64,
    /// Checkpoints kept on disk (older ones are deleted once a new one is in place).
    pub keep_last: usize,
}

/// What happens to activations between forward and backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryPolicy {
    Keep,
    Recompute,
    Offload,
    /// The plan that repeats the least forward work among those that fit the device
    /// (`memory::auto`): it chooses each layer's policy and whether gate/up is saved.
    Auto,
}

/// What the last two layers do under `policy = "offload"`: their backward starts right after the
/// forward, before an offload could come back, so they keep everything (MEMO's choice: no
/// recompute), or recompute like `policy = "recompute"` (kept input and attention output only:
/// the step then holds one whole layer's skeletal tensors and one layer's offloaded rows at
/// most, instead of two whole layers, for two layers' non-attention forward again).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tail {
    #[default]
    Keep,
    Recompute,
}

/// What happens to the experts' gate/up product (`expert_gate_up`, SwiGLU's input: at H100-ref's
/// widths 42 % of an MoE block's skeletal bytes): saved like every skeletal tensor (MEMO's
/// inventory, the default), or not saved at all and recomputed by the backward a chunk of
/// routed rows at a time from the routed inputs it gathers anyway (one more up-projection GEMM
/// per block: at long context, where attention dominates, a few per cent of the FLOPs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GateUp {
    #[default]
    Save,
    Recompute,
}

/// Share of offloadable activations moved off the device: fixed, or chosen by the planner.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Alpha {
    Auto,
    Fixed(f32),
}

/// The `[memory]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    pub policy: MemoryPolicy,
    /// A number in [0, 1] or `"auto"`.
    pub alpha: Alpha,
    /// Host memory the offloaded activations may use, GiB (the α planner's `M_host`).
    #[serde(default = "default_host_gib")]
    pub host_gib: f64,
    /// Device→host copy bandwidth, GB/s (the α planner's `B_pcie`; CPU: a memory copy).
    #[serde(default = "default_bandwidth_gbs")]
    pub bandwidth_gbs: f64,
    /// The last two layers under `policy = "offload"`: `"keep"` (default) or `"recompute"`.
    #[serde(default)]
    pub tail: Tail,
    /// The experts' gate/up product: `"save"` (default) or `"recompute"` in the backward.
    #[serde(default)]
    pub gate_up: GateUp,
    /// Device memory `policy = "auto"` plans within, GiB; 0 (default): the GPU's (its free
    /// memory and what this run's pool holds), and no limit on the CPU.
    #[serde(default)]
    pub device_gib: f64,
}

fn default_host_gib() -> f64 {
    8.0
}

fn default_bandwidth_gbs() -> f64 {
    10.0
}

/// The `[parallel]` section: MoE Parallel Folding degrees. Data parallelism comes from the
/// number of ranks and `ep` executes; the other degrees are only planned so far.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelConfig {
    #[serde(default = "one")]
    pub tp: usize,
    #[serde(default = "one")]
    pub cp: usize,
    #[serde(default = "one")]
    pub pp: usize,
    #[serde(default = "one")]
    pub etp: usize,
    #[serde(default = "one")]
    pub ep: usize,
    /// On GPUs, gradients are summed and expert-parallel rows exchanged by NCCL where every
    /// rank has a GPU of its own and libnccl loads on every rank; `false` moves them through
    /// host memory by MPI.
    #[serde(default = "yes")]
    pub nccl: bool,
}

fn one() -> usize {
    1
}

fn yes() -> bool {
    true
}

/// The `[cuda]` section: which kernels `device = "cuda"` runs. By default the portable ones
/// (mma.sync attention, cuBLAS's grouped GEMM for the experts: any GPU from sm_80); the Hopper
/// kernels of our own (wgmma) are opt-in until a GPU session has checked and timed them
/// (docs/cuda.md). Ignored on the CPU.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CudaConfig {
    /// Causal attention at head_dim 64 on the Hopper kernels (H100, H200); other head dims run
    /// the portable ones.
    #[serde(default)]
    pub hopper_attention: bool,
    /// The experts' grouped GEMMs on the Hopper kernels, SwiGLU and the token gather fused in
    /// (H100, H200; products whose widths are not multiples of 128 run on cuBLAS, said once).
    #[serde(default)]
    pub hopper_experts: bool,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self { tp: 1, cp: 1, pp: 1, etp: 1, ep: 1, nccl: true }
    }
}

impl Serialize for Alpha {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Alpha::Auto => s.serialize_str("auto"),
            Alpha::Fixed(a) => s.serialize_f32(*a),
        }
    }
}

impl<'de> Deserialize<'de> for Alpha {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct AlphaVisitor;
        impl Visitor<'_> for AlphaVisitor {
            type Value = Alpha;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number in [0, 1] or \"auto\"")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Alpha, E> {
                Ok(Alpha::Fixed(v as f32))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Alpha, E> {
                Ok(Alpha::Fixed(v as f32))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Alpha, E> {
                Ok(Alpha::Fixed(v as f32))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Alpha, E> {
                if v == "auto" {
                    Ok(Alpha::Auto)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }
        }
        d.deserialize_any(AlphaVisitor)
    }
}

const SECTIONS: [&str; 8] = ["model", "moe", "train", "data", "checkpoint", "memory", "parallel", "cuda"];
const WIDTH_LIST_KEYS: [&str; 1] = ["expert_widths"];
const WIDTH_LAYOUT_KEYS: [&str; 4] = ["layout", "n_experts", "total_width", "width_granule"];

impl Config {
    /// The embedded default config (`configs/tiny.toml`) with `overrides` applied.
    pub fn default_with(overrides: &[String]) -> Result<Self> {
        Self::from_toml_str(DEFAULT_TOML, "configs/tiny.toml (embedded)", overrides)
    }

    /// Reads `path`, or the embedded default when `None`, and applies `overrides`
    /// (`"section.key=value"`, value in TOML syntax or a bare string).
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        match path {
            None => Self::default_with(overrides),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
                Self::from_toml_str(&text, &p.display().to_string(), overrides)
            }
        }
    }

    /// Parses TOML `text` (named `origin` in errors), applies `overrides`, resolves and validates.
    pub fn from_toml_str(text: &str, origin: &str, overrides: &[String]) -> Result<Self> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| Error::bad_file(origin, format!("not valid TOML: {e}")))?;
        for o in overrides {
            let (key, value) = parse_override(o)?;
            apply_override(&mut table, &key, value)?;
        }
        let config = Self::from_table(table)?;
        config.validate()?;
        Ok(config)
    }

    fn from_table(mut table: toml::Table) -> Result<Self> {
        let device = match table.remove("device") {
            Some(toml::Value::String(s)) => s,
            Some(other) => return Err(Error::config("device", other, "\"cpu\" or \"cuda\"")),
            None => return Err(Error::Invalid("config: missing key `device` (\"cpu\" or \"cuda\")".into())),
        };
        if let Some(key) = table.keys().find(|k| !SECTIONS.contains(&k.as_str())) {
            return Err(Error::config(
                key.clone(),
                "(unknown key)",
                format!("top-level keys are `device` and the sections {}", SECTIONS.map(|s| format!("[{s}]")).join(" ")),
            ));
        }
        let mut section = |name: &str| table.remove(name);
        let model: ModelConfig = parse_section("model", section("model"))?;
        let moe: MoeSection = parse_section("moe", section("moe"))?;
        let train = parse_section("train", section("train"))?;
        let data = parse_section("data", section("data"))?;
        let checkpoint = parse_section("checkpoint", section("checkpoint"))?;
        let memory = parse_section("memory", section("memory"))?;
        let parallel = match section("parallel") {
            None => ParallelConfig::default(),
            some => parse_section("parallel", some)?,
        };
        let cuda = match section("cuda") {
            None => CudaConfig::default(),
            some => parse_section("cuda", some)?,
        };
        let dispatch = moe.dispatch()?;
        Ok(Self { device, model, moe: moe.resolve()?, dispatch, train, data, checkpoint, memory, parallel, cuda })
    }

    /// Checks every field and the relations between fields; errors name field, value and what is allowed.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.device.as_str(), "cpu" | "cuda") {
            return Err(Error::config("device", format!("\"{}\"", self.device), "\"cpu\" or \"cuda\""));
        }
        self.model.validate()?;
        self.moe.validate()?;
        if !(self.moe.top_p > 0.0 && self.moe.top_p <= 1.0) {
            // Checked whatever the routing, so switching routing by override cannot expose a bad value.
            return Err(Error::config("moe.top_p", self.moe.top_p, "a number in (0, 1]"));
        }
        let t = &self.train;
        for (field, v) in [("train.batch_size", t.batch_size as u64), ("train.seq_len", t.seq_len as u64), ("train.steps", t.steps), ("train.eval_batches", t.eval_batches as u64)] {
            if v == 0 {
                return Err(Error::config(field, v, "a positive integer"));
            }
        }
        if let Some(micro) = t.micro_batch_size {
            if micro == 0 || !t.batch_size.is_multiple_of(micro) {
                return Err(Error::config("train.micro_batch_size", micro, format!("a positive divisor of train.batch_size = {} (leave it out to run each rank's share at once)", t.batch_size)));
            }
        }
        if t.seq_len > self.model.seq_len {
            return Err(Error::config("train.seq_len", t.seq_len, format!("at most model.seq_len = {}", self.model.seq_len)));
        }
        positive_finite("train.lr", t.lr)?;
        if !(t.min_lr.is_finite() && t.min_lr >= 0.0 && t.min_lr <= t.lr) {
            return Err(Error::config("train.min_lr", t.min_lr, format!("a number in [0, train.lr = {}]", t.lr)));
        }
        non_negative_finite("train.weight_decay", t.weight_decay)?;
        non_negative_finite("train.grad_clip", t.grad_clip)?;
        positive_finite("train.eps", t.eps)?;
        for (field, b) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::config(field, b, "a number in [0, 1)"));
            }
        }
        let d = &self.data;
        if d.corpus.is_empty() {
            return Err(Error::config("data.corpus", "\"\"", "\"embedded:austen\", \"embedded:kjv\" or a path to a text file"));
        }
        crate::data::corpus::check_spec(&d.corpus)?;
        if !(t.max_flops.is_finite() && t.max_flops >= 0.0) {
            return Err(Error::config("train.max_flops", t.max_flops, "a finite number ≥ 0 (0 = no FLOP budget)"));
        }
        match d.tokenizer.as_str() {
            "" => return Err(Error::config("data.tokenizer", "\"\"", "\"byte\", \"bpe\" or a path to a tokenizer.json")),
            "byte" if self.model.vocab_size < 256 => {
                return Err(Error::config("model.vocab_size", self.model.vocab_size, "at least 256 with data.tokenizer = \"byte\""));
            }
            "bpe" if self.model.vocab_size <= 256 => {
                return Err(Error::config("model.vocab_size", self.model.vocab_size, "more than 256 with data.tokenizer = \"bpe\" (256 bytes plus merges)"));
            }
            _ => {}
        }
        if !(d.val_fraction > 0.0 && d.val_fraction < 1.0) {
            return Err(Error::config("data.val_fraction", d.val_fraction, "a number in (0, 1)"));
        }
        if self.checkpoint.keep_last == 0 {
            return Err(Error::config("checkpoint.keep_last", 0, "at least 1"));
        }
        for (field, v) in [("memory.host_gib", self.memory.host_gib), ("memory.bandwidth_gbs", self.memory.bandwidth_gbs)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(Error::config(field, v, "a positive number"));
            }
        }
        if !(self.memory.device_gib.is_finite() && self.memory.device_gib >= 0.0) {
            return Err(Error::config("memory.device_gib", self.memory.device_gib, "a number ≥ 0 (0: the device's memory)"));
        }
        if let Alpha::Fixed(a) = self.memory.alpha {
            if !(0.0..=1.0).contains(&a) {
                return Err(Error::config("memory.alpha", a, "a number in [0, 1] or \"auto\""));
            }
        }
        let p = &self.parallel;
        for (field, v) in [("parallel.tp", p.tp), ("parallel.cp", p.cp), ("parallel.pp", p.pp), ("parallel.etp", p.etp)] {
            if v != 1 {
                return Err(Error::config(field, v, "1: TP, CP, PP and ETP above 1 can be planned (`motley plan-parallel`) but do not execute yet; data and expert parallelism do"));
            }
        }
        let experts = self.moe.expert_widths.len();
        if p.ep == 0 || !experts.is_multiple_of(p.ep) {
            return Err(Error::config("parallel.ep", p.ep, format!("a divisor of the number of experts ({experts})")));
        }
        Ok(())
    }

    /// The resolved config as TOML (explicit expert widths); loading it gives back an equal `Config`.
    pub fn to_toml(&self) -> Result<String> {
        let bad = |e: &dyn std::fmt::Display| Error::Invalid(format!("cannot write config as TOML: {e}"));
        let mut table = toml::Table::try_from(self).map_err(|e| bad(&e))?;
        if let (DispatchMode::Capacity { factor, policy }, Some(toml::Value::Table(moe))) = (self.dispatch, table.get_mut("moe")) {
            moe.insert("capacity_factor".into(), toml::Value::Float(factor));
            moe.insert("drop_policy".into(), toml::Value::try_from(policy).map_err(|e| bad(&e))?);
        }
        toml::to_string(&table).map_err(|e| bad(&e))
    }

    /// A stable 16-hex-digit hash of the parts that shape the parameters and their meaning
    /// (`[model]` and `[moe]`): equal hashes mean a checkpoint fits this model.
    pub fn config_hash(&self) -> String {
        let shaped = serde_json::to_vec(&(&self.model, &self.moe)).expect("model and moe sections serialize to JSON");
        format!("{:016x}", stable_hash(&shaped))
    }
}

impl MoeSection {
    /// The token dispatch `capacity_factor` and `drop_policy` ask for.
    pub fn dispatch(&self) -> Result<DispatchMode> {
        match (self.capacity_factor, self.drop_policy) {
            (None, None) => Ok(DispatchMode::Dropless),
            (None, Some(p)) => Err(Error::config("moe.drop_policy", format!("{p:?}"), "given only with moe.capacity_factor (dropless routing drops nothing)")),
            (Some(f), _) if !(f.is_finite() && f > 0.0) => Err(Error::config("moe.capacity_factor", f, "a finite number above 0 (leave it out for dropless routing)")),
            (Some(factor), policy) => Ok(DispatchMode::Capacity { factor, policy: policy.unwrap_or(DropPolicy::Probs) }),
        }
    }

    /// The model's `MoeConfig`, with widths generated from the layout when no list is given.
    pub fn resolve(self) -> Result<MoeConfig> {
        let layout_given = self.layout.is_some() || self.n_experts.is_some() || self.total_width.is_some();
        let expert_widths = match (self.expert_widths, layout_given) {
            (Some(_), true) => {
                return Err(Error::config(
                    "moe.expert_widths",
                    "(given with moe.layout/n_experts/total_width)",
                    "either an explicit list or layout + n_experts + total_width, not both",
                ))
            }
            (Some(list), false) => list,
            (None, _) => {
                let missing = |field: &str| {
                    Error::config(field, "(missing)", "required when moe.expert_widths is not given (or give moe.expert_widths)")
                };
                let layout = WidthLayout::parse(&self.layout.ok_or_else(|| missing("moe.layout"))?)?;
                let n = self.n_experts.ok_or_else(|| missing("moe.n_experts"))?;
                let total = self.total_width.ok_or_else(|| missing("moe.total_width"))?;
                let granule = self.width_granule.unwrap_or(8);
                if n == 0 {
                    return Err(Error::config("moe.n_experts", 0, "a positive integer"));
                }
                if granule == 0 {
                    return Err(Error::config("moe.width_granule", 0, "a positive integer"));
                }
                layout.widths(n, total, granule).map_err(|e| {
                    Error::config("moe.total_width", total, format!("large enough for {n} experts of granule {granule}: {e}"))
                })?
            }
        };
        Ok(MoeConfig {
            expert_widths,
            routing: self.routing,
            top_k: self.top_k,
            top_p: self.top_p,
            load_balance: self.load_balance,
            p_penalty: self.p_penalty,
            entropy: self.entropy,
            z_loss: self.z_loss,
        })
    }
}

/// Splits `"a.b=value"` into the dotted key and a TOML value; a value that is not valid TOML
/// (e.g. `top_p` without quotes) is taken as a bare string.
pub fn parse_override(text: &str) -> Result<(String, toml::Value)> {
    let (key, raw) = text
        .split_once('=')
        .ok_or_else(|| Error::Invalid(format!("override `{text}`: expected `section.key=value`")))?;
    let key = key.trim();
    let raw = raw.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(Error::Invalid(format!("override `{text}`: expected `section.key=value`")));
    }
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    Ok((key.to_string(), value))
}

/// Sets `key` (dotted) in `table`. Sections must exist already. The two ways of giving
/// expert widths exclude each other, so setting one drops the other from `[moe]`.
fn apply_override(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    let (last, path) = parts.split_last().expect("parse_override rejects empty keys");
    let mut current = table;
    for (i, part) in path.iter().enumerate() {
        let here = parts[..=i].join(".");
        if i == 0 && SECTIONS.contains(part) && !current.contains_key(*part) {
            current.insert(part.to_string(), toml::Value::Table(toml::Table::new()));
        }
        current = match current.get_mut(*part) {
            Some(toml::Value::Table(t)) => t,
            Some(_) => return Err(Error::config(key, "(override)", format!("`{here}` is not a section"))),
            None => {
                return Err(Error::config(key, "(override)", format!("no section `{here}`; sections are {}", SECTIONS.join(", "))))
            }
        };
    }
    if path == ["moe"] {
        let drop: &[&str] = if WIDTH_LIST_KEYS.contains(last) {
            &WIDTH_LAYOUT_KEYS
        } else if WIDTH_LAYOUT_KEYS.contains(last) {
            &WIDTH_LIST_KEYS
        } else {
            &[]
        };
        for k in drop {
            current.remove(*k);
        }
    }
    current.insert(last.to_string(), value);
    Ok(())
}

/// Deserializes one section; errors name the dotted key where TOML can point at one.
fn parse_section<T: de::DeserializeOwned>(name: &str, value: Option<toml::Value>) -> Result<T> {
    let table = match value {
        Some(toml::Value::Table(t)) => t,
        Some(other) => return Err(Error::config(name, other, format!("a [{name}] section"))),
        None => return Err(Error::Invalid(format!("config: missing section [{name}]"))),
    };
    let text = toml::to_string(&table).map_err(|e| Error::Invalid(format!("config [{name}]: {e}")))?;
    toml::from_str(&text).map_err(|e| {
        // A missing field's span is the whole table, which names no key.
        let missing = e.message().starts_with("missing field");
        let key = e.span().filter(|_| !missing).and_then(|span| key_at(&text, span.start));
        match key {
            Some(key) => Error::Invalid(format!("config `{name}.{key}`: {}", e.message().trim())),
            None => Error::Invalid(format!("config [{name}]: {}", e.message().trim())),
        }
    })
}

/// The key on the line of `text` containing byte `offset` (`key = value` lines only).
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    Some(key.trim().trim_matches('"').to_string())
}

fn positive_finite(field: &str, v: f32) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::config(field, v, "a positive finite number"))
    }
}

fn non_negative_finite(field: &str, v: f32) -> Result<()> {
    if v.is_finite() && v >= 0.0 {
        Ok(())
    } else {
        Err(Error::config(field, v, "a finite number ≥ 0"))
    }
}

/// FNV-1a, 64 bit: a hash that is the same on every platform and Rust version, for
/// config hashes and cache keys that are written to disk.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(overrides: &[&str]) -> Result<Config> {
        Config::default_with(&overrides.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    fn err(overrides: &[&str]) -> String {
        with(overrides).expect_err("config should be rejected").to_string()
    }

    /// The default config with one line removed or replaced, parsed from text.
    fn edited(find: &str, replace: &str) -> String {
        assert!(DEFAULT_TOML.contains(find), "tiny.toml has no `{find}`");
        Config::from_toml_str(&DEFAULT_TOML.replacen(find, replace, 1), "test.toml", &[])
            .expect_err("config should be rejected")
            .to_string()
    }

    #[test]
    fn default_config_resolves_layout_and_round_trips() {
        let c = with(&[]).unwrap();
        assert_eq!(c.moe.n_experts(), 8);
        assert_eq!(c.moe.expert_widths.iter().sum::<usize>(), 1024);
        let text = c.to_toml().unwrap();
        assert!(text.contains("expert_widths") && !text.contains("layout"), "{text}");
        let back = Config::from_toml_str(&text, "resolved", &[]).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.config_hash(), c.config_hash());
    }

    #[test]
    fn overrides_apply_with_toml_types() {
        let c = with(&["moe.routing=top_p", "moe.top_p=0.6", "moe.expert_widths=[64,128]", "train.seed=3", "checkpoint.every=50", "memory.policy=\"recompute\"", "memory.alpha=0.5"]).unwrap();
        assert_eq!(c.moe.routing, Routing::TopP);
        assert_eq!(c.moe.top_p, 0.6);
        assert_eq!(c.moe.expert_widths, vec![64, 128]);
        assert_eq!(c.train.seed, 3);
        assert_eq!(c.checkpoint.every, 50);
        assert_eq!(c.memory.policy, MemoryPolicy::Recompute);
        assert_eq!(c.memory.alpha, Alpha::Fixed(0.5));
        assert_eq!(with(&["memory.alpha=auto"]).unwrap().memory.alpha, Alpha::Auto);
        let geo = with(&["moe.layout=geometric"]).unwrap();
        assert_eq!(geo.moe.expert_widths.iter().sum::<usize>(), 1024);
        assert_ne!(geo.config_hash(), c.config_hash());
    }

    #[test]
    fn config_hash_ignores_training_settings() {
        let a = with(&[]).unwrap();
        assert_eq!(a.config_hash(), with(&["train.seed=9", "train.lr=0.01"]).unwrap().config_hash());
        assert_ne!(a.config_hash(), with(&["model.n_layers=2"]).unwrap().config_hash());
        assert_eq!(a.config_hash().len(), 16);
    }

    /// `[cuda]` may be left out (the portable kernels), set by override, and round-trips
    /// through a run's written config; its keys are checked like every other section's.
    #[test]
    fn the_cuda_section_defaults_to_the_portable_kernels() {
        let c = with(&[]).unwrap();
        assert_eq!(c.cuda, CudaConfig { hopper_attention: false, hopper_experts: false });
        let h = with(&["cuda.hopper_attention=true"]).unwrap();
        assert_eq!(h.cuda, CudaConfig { hopper_attention: true, hopper_experts: false });
        assert_eq!(Config::from_toml_str(&h.to_toml().unwrap(), "written", &[]).unwrap(), h);
        assert!(err(&["cuda.hopper=true"]).contains("cuda.hopper"), "{}", err(&["cuda.hopper=true"]));
        assert!(err(&["cuda.hopper_experts=1"]).contains("cuda.hopper_experts"));
        assert_eq!(c.config_hash(), h.config_hash(), "the kernels do not change what a checkpoint holds");
    }

    /// `moe.capacity_factor` (and `moe.drop_policy`) choose the dispatch, round-trip through a
    /// run's written config, leave the checkpoint hash alone, and are checked.
    #[test]
    fn the_expert_capacity_is_optional_and_checked() {
        let c = with(&[]).unwrap();
        assert_eq!(c.dispatch, DispatchMode::Dropless);
        let cap = with(&["moe.capacity_factor=1.25"]).unwrap();
        assert_eq!(cap.dispatch, DispatchMode::Capacity { factor: 1.25, policy: DropPolicy::Probs });
        let pos = with(&["moe.capacity_factor=2", "moe.drop_policy=\"position\""]).unwrap();
        assert_eq!(pos.dispatch, DispatchMode::Capacity { factor: 2.0, policy: DropPolicy::Position });
        for written in [&cap, &pos] {
            assert_eq!(&Config::from_toml_str(&written.to_toml().unwrap(), "written", &[]).unwrap(), written);
        }
        assert_eq!(c.config_hash(), cap.config_hash(), "dropping tokens does not change what a checkpoint holds");
        for bad in ["0", "-1", "nan", "inf"] {
            let e = err(&[&format!("moe.capacity_factor={bad}")]);
            assert!(e.contains("moe.capacity_factor") && e.contains("dropless"), "{e}");
        }
        let e = err(&["moe.drop_policy=\"position\""]);
        assert!(e.contains("moe.drop_policy") && e.contains("capacity_factor"), "{e}");
        let e = err(&["moe.capacity_factor=1.0", "moe.drop_policy=\"random\""]);
        assert!(e.contains("moe.drop_policy") && e.contains("position"), "{e}");
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        assert!(err(&["train.sede=3"]).contains("train.sede"), "{}", err(&["train.sede=3"]));
        assert!(err(&["nosuch.key=1"]).contains("nosuch"));
        assert!(edited("[model]", "colour = 1\n[model]").contains("colour"));
        assert!(edited("[memory]", "[memory]\nbeta = 2").contains("memory.beta"));
    }

    #[test]
    fn ill_typed_values_name_the_key() {
        let e = err(&["train.batch_size=\"big\""]);
        assert!(e.contains("train.batch_size") && e.contains("invalid type"), "{e}");
        let e = err(&["memory.alpha=sometimes"]);
        assert!(e.contains("memory.alpha"), "{e}");
        let e = err(&["memory.policy=swap"]);
        assert!(e.contains("memory.policy") && e.contains("recompute"), "{e}");
        assert!(err(&["train.steps=-1"]).contains("train.steps"));
        assert!(err(&["novalue"]).contains("section.key=value"));
    }

    #[test]
    fn missing_fields_and_sections_are_errors() {
        let e = edited("steps = ", "# steps = ");
        assert!(e.contains("[train]") && e.contains("steps"), "{e}");
        assert!(edited("[checkpoint]", "[not_checkpoint]").contains("not_checkpoint"));
        assert!(edited("device = \"cpu\"", "").contains("device"));
        let e = err(&["moe.layout=hexagonal"]);
        assert!(e.contains("moe.layout") && e.contains("arithmetic"), "{e}");
        assert!(err(&["moe.n_experts=0"]).contains("moe.n_experts"));
    }

    #[test]
    fn cross_field_checks_name_field_value_and_rule() {
        let e = err(&["model.d_model=130"]);
        assert!(e.contains("model.d_model") && e.contains("130") && e.contains("n_heads"), "{e}");
        let e = err(&["moe.expert_widths=[]"]);
        assert!(e.contains("moe.expert_widths") && e.contains("non-empty"), "{e}");
        for bad in ["0.0", "1.5", "-0.2"] {
            let e = err(&["moe.routing=top_p", &format!("moe.top_p={bad}")]);
            assert!(e.contains("moe.top_p") && e.contains("(0, 1]"), "{e}");
        }
        let e = err(&["train.seq_len=100000"]);
        assert!(e.contains("train.seq_len") && e.contains("model.seq_len"), "{e}");
        assert!(err(&["moe.top_k=9"]).contains("moe.top_k"));
        assert!(err(&["memory.alpha=1.5"]).contains("memory.alpha"));
        assert!(err(&["parallel.tp=2"]).contains("do not execute yet"));
        assert!(err(&["parallel.ep=3"]).contains("divisor of the number of experts"));
        assert_eq!(with(&["parallel.ep=2"]).unwrap().parallel.ep, 2);
        assert!(err(&["device=tpu"]).contains("device"));
        assert!(err(&["train.min_lr=1.0"]).contains("train.min_lr"));
        assert!(err(&["data.val_fraction=0"]).contains("data.val_fraction"));
        assert!(err(&["data.corpus=embedded:shakespeare"]).contains("shakespeare"));
        assert!(err(&["data.corpus=embedded:austen+shakespeare"]).contains("shakespeare"));
        assert!(err(&["data.corpus=embedded:austen+austen"]).contains("twice"));
        assert!(err(&["train.max_flops=-1.0"]).contains("train.max_flops"));
        assert_eq!(with(&[]).unwrap().train.micro_batch_size, None);
        let micro = with(&["train.micro_batch_size=4"]).unwrap();
        assert_eq!(micro.train.micro_batch_size, Some(4));
        assert_eq!(Config::from_toml_str(&micro.to_toml().unwrap(), "written", &[]).unwrap(), micro);
        assert_eq!(micro.config_hash(), with(&[]).unwrap().config_hash(), "micro-batches do not change what a checkpoint holds");
        for bad in ["train.micro_batch_size=0", "train.micro_batch_size=5"] {
            let e = err(&[bad]);
            assert!(e.contains("train.micro_batch_size") && e.contains("divisor of train.batch_size = 16"), "{bad}: {e}");
        }
        assert_eq!(with(&["train.max_flops=2e9"]).unwrap().train.max_flops, 2e9);
        assert_eq!(with(&["train.max_flops=5"]).unwrap().train.max_flops, 5.0);
        assert!(err(&["data.tokenizer=bpe", "model.vocab_size=256"]).contains("model.vocab_size"));
        let both = Config::from_toml_str(
            &DEFAULT_TOML.replacen("[moe]", "[moe]\nexpert_widths = [8, 8]", 1),
            "both.toml",
            &[],
        );
        assert!(both.unwrap_err().to_string().contains("not both"));
    }

    #[test]
    fn bad_toml_names_the_file() {
        let e = Config::from_toml_str("[model\n", "mine.toml", &[]).unwrap_err().to_string();
        assert!(e.contains("mine.toml"), "{e}");
        let e = Config::load(Some(Path::new("/nonexistent/x.toml")), &[]).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/x.toml"), "{e}");
    }
}
