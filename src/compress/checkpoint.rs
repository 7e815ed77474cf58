//! Compressed checkpoints on disk, and the body of `motley compress`.
//!
//! A compressed checkpoint is a directory:
//! - `model.compressed.safetensors` ([`COMPRESSED_FILE`]): the [`CompressedFile`] — compressed
//!   matrices, dense tensors, and the attribute `config_hash` (the source run's
//!   [`Config::config_hash`]), so a file can never be decoded into a model of another shape
//!   even if it is copied next to another `config.toml`;
//! - `config.toml` ([`CONFIG_FILE`]): the source run's resolved config (`Config::to_toml`);
//! - `tokenizer.json` ([`TOKENIZER_FILE`]): the run's BPE tokenizer (absent for `"byte"`);
//! - `compress.json` ([`REPORT_FILE`]): the [`CompressReport`] (provenance, not read back).
//!
//! [`load_compressed_model`] needs only the first two; [`load_compressed_tokenizer`] the
//! tokenizer. `motley eval` / `generate` can thus take either kind of checkpoint directory,
//! telling them apart by the presence of `model.compressed.safetensors`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::format::{bits_per_weight, CompressedFile, CompressedMatrix, Method};
use super::jlcm::CodebookKind;
use super::model::{calibrates, compress_model_detailed, decompress_to_values, Embeddings, ExpertBits, ModelCompressConfig};
use crate::backend::cpu::Cpu;
use crate::config::Config;
use crate::data::loader::Loader;
use crate::data::prepare::prepare;
use crate::data::shard::Shard;
use crate::data::tokenizer::{BpeTokenizer, Tokenizer};
use crate::model::params::ParamLayout;
use crate::model::Model;
use crate::train::trainer::{load_checkpoint, validation_loss};
use crate::train::checkpoint::{replace_dir, write_atomic};
use crate::{Error, Result};

pub const COMPRESSED_FILE: &str = "model.compressed.safetensors";
pub const CONFIG_FILE: &str = "config.toml";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const REPORT_FILE: &str = "compress.json";
/// The file attribute naming the model config the file was made from.
pub const HASH_ATTR: &str = "config_hash";
/// Rows per calibration forward (bounds the activation memory of one forward).
const CALIB_ROWS: usize = 8;
/// Calibration and validation batches are drawn with this loader seed (fixed, so every method
/// sees the same tokens).
const DATA_SEED: u64 = 0x00c0_ffee;

/// `--method jlcm|kmeans|rtn`.
pub fn parse_method(name: &str) -> Result<Method> {
    match name {
        "jlcm" => Ok(Method::Jlcm),
        "kmeans" => Ok(Method::Kmeans),
        "rtn" => Ok(Method::Rtn),
        other => Err(Error::config("--method", other, "one of jlcm, kmeans, rtn")),
    }
}

/// `--codebooks shared-scaled|per-group`.
pub fn parse_codebooks(name: &str) -> Result<CodebookKind> {
    match name {
        "shared-scaled" => Ok(CodebookKind::SharedScaled),
        "per-group" => Ok(CodebookKind::PerGroup),
        other => Err(Error::config("--codebooks", other, "shared-scaled or per-group")),
    }
}

/// `--expert-bits uniform|share`.
pub fn parse_expert_bits(name: &str) -> Result<ExpertBits> {
    match name {
        "uniform" => Ok(ExpertBits::Uniform),
        "share" => Ok(ExpertBits::Share),
        other => Err(Error::config("--expert-bits", other, "uniform or share")),
    }
}

/// Everything `motley compress` takes.
#[derive(Clone, Debug)]
pub struct CompressArgs {
    /// A training checkpoint directory `RUN/checkpoints/step_N` (with `state.json`).
    pub checkpoint: PathBuf,
    pub method: Method,
    pub bits: f32,
    pub groups: usize,
    pub codebooks: CodebookKind,
    pub expert_bits: ExpertBits,
    /// Training tokens run through the model to calibrate JLCM and `ExpertBits::Share` (RTN and
    /// k-means at uniform bits need none).
    pub calib_tokens: usize,
    pub out: PathBuf,
    pub embeddings: Embeddings,
    /// Validation batches (`train.batch_size × train.seq_len` tokens each) for the perplexities;
    /// 0 skips evaluation.
    pub eval_batches: usize,
}

/// What `motley compress` reports (and writes to `compress.json`).
#[derive(Clone, Debug, Serialize)]
pub struct CompressReport {
    pub method: Method,
    pub bits: f32,
    pub file: PathBuf,
    pub file_bytes: u64,
    /// All model parameters, compressed or not.
    pub params: usize,
    /// Weights in compressed matrices.
    pub compressed_weights: usize,
    /// `8 · file bytes / params`: everything in the file (header, codebooks, scales,
    /// permutations, dense tensors) charged to every parameter.
    pub bits_per_param: f64,
    /// `8 · file bytes / compressed weights` ([`bits_per_weight`]): the whole file charged to
    /// the compressed weights only.
    pub bits_per_weight: f64,
    /// Payload of the compressed matrices alone (indices, codebooks, scales, permutations) per
    /// compressed weight: the method's own rate.
    pub matrix_bits_per_weight: f64,
    pub calib_tokens: usize,
    /// Calibration tokens routed to each layer's experts (when calibrated).
    pub expert_tokens: Option<Vec<Vec<usize>>>,
    /// Index bits of each layer's experts under `--expert-bits share` (0: left dense).
    pub expert_bits: Option<Vec<Vec<u8>>>,
    pub seconds: f64,
    pub val_loss_fp32: Option<f64>,
    pub val_loss: Option<f64>,
    pub val_ppl_fp32: Option<f64>,
    pub val_ppl: Option<f64>,
}

/// Writes a compressed checkpoint directory (layout in the module doc); returns the file size.
/// The files are written into a sibling temporary folder that then replaces `dir`, so a failed
/// write never leaves a torn file, or a file and config of different runs, in place of a good
/// one.
pub fn save_compressed(dir: &Path, file: &CompressedFile, config: &Config, tokenizer: &Tokenizer) -> Result<u64> {
    let name = dir.file_name().ok_or_else(|| Error::Invalid(format!("--out {}: not a folder name", dir.display())))?;
    // The folder is replaced whole: refuse one that holds anything but a compressed checkpoint.
    if let Ok(entries) = std::fs::read_dir(dir) {
        let ours = [COMPRESSED_FILE, CONFIG_FILE, TOKENIZER_FILE, REPORT_FILE];
        if let Some(other) = entries.flatten().map(|e| e.file_name()).find(|n| !ours.iter().any(|o| n.as_os_str() == *o)) {
            return Err(Error::Invalid(format!(
                "--out {}: holds {} besides a compressed checkpoint; give an empty or new folder, or one written by `motley compress`",
                dir.display(),
                other.to_string_lossy()
            )));
        }
    }
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let tmp = parent.join(format!(".tmp-{}-{}", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = (|| {
        let mut file = file.clone();
        file.attrs.insert(HASH_ATTR.into(), config.config_hash());
        let bytes = file.save(&tmp.join(COMPRESSED_FILE))?;
        let config_path = tmp.join(CONFIG_FILE);
        std::fs::write(&config_path, config.to_toml()?).map_err(|e| Error::io(&config_path, e))?;
        if let Tokenizer::Bpe(bpe) = tokenizer {
            bpe.save(&tmp.join(TOKENIZER_FILE))?;
        }
        Ok(bytes)
    })();
    let bytes = written.and_then(|b| replace_dir(&tmp, dir).map(|()| b));
    if bytes.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    bytes
}

/// Loads a compressed checkpoint directory as a dense model and its config. Fails, naming the
/// file, when the file was made for another model config or does not match its shapes.
pub fn load_compressed_model(dir: &Path, be: &Cpu) -> Result<(Model<Cpu>, Config)> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
    let config = Config::from_toml_str(&text, &config_path.display().to_string(), &[])?;
    let path = dir.join(COMPRESSED_FILE);
    let file = CompressedFile::load(&path)?;
    let expected = config.config_hash();
    match file.attrs.get(HASH_ATTR) {
        Some(h) if *h == expected => {}
        Some(h) => {
            return Err(Error::bad_file(
                &path,
                format!("written for model config hash {h}, but {} hashes to {expected}: the file belongs to another model; compress this model's checkpoint again", config_path.display()),
            ))
        }
        None => return Err(Error::bad_file(&path, format!("no `{HASH_ATTR}` attribute: not written by `motley compress`"))),
    }
    let layout = ParamLayout::new(&config.model, &config.moe);
    let values = decompress_to_values(&file, &layout).map_err(|e| Error::bad_file(&path, e.to_string()))?;
    let model = Model::from_values(be, config.model.clone(), config.moe.clone(), &values)?.with_dispatch(config.dispatch)?;
    Ok((model, config))
}

/// The tokenizer of a compressed checkpoint: its `tokenizer.json`, or the byte tokenizer when
/// the run used `data.tokenizer = "byte"`.
pub fn load_compressed_tokenizer(dir: &Path, config: &Config) -> Result<Tokenizer> {
    let path = dir.join(TOKENIZER_FILE);
    if path.is_file() {
        return BpeTokenizer::load(&path).map(Tokenizer::Bpe);
    }
    match config.data.tokenizer.as_str() {
        "byte" => Ok(Tokenizer::Byte(Default::default())),
        other => Err(Error::bad_file(&path, format!("missing: the model was trained with tokenizer `{other}`"))),
    }
}

/// About `tokens` tokens of `shard` as forward batches of at most [`CALIB_ROWS`] × `seq`.
pub fn calibration_batches(shard: &Path, tokens: usize, seq: usize) -> Result<Vec<(Vec<u32>, usize, usize)>> {
    let rows = tokens.div_ceil(seq).max(1);
    let mut loader = Loader::new(Shard::open(shard)?, 1, seq, DATA_SEED)?;
    let mut out = Vec::new();
    let mut left = rows;
    while left > 0 {
        let b = left.min(CALIB_ROWS);
        let inputs = (0..b).flat_map(|_| loader.next_batch().inputs).collect();
        out.push((inputs, b, seq));
        left -= b;
    }
    Ok(out)
}

/// `motley compress`: loads the checkpoint, calibrates on its run's training data, compresses,
/// writes the compressed checkpoint to `args.out`, reloads it from disk and evaluates it.
pub fn run_compress(be: &Cpu, args: &CompressArgs) -> Result<CompressReport> {
    let (model, config, _, _) = load_checkpoint(&args.checkpoint, be)?;
    // RUN/checkpoints/step_N → RUN/data, the cache the training run filled.
    let run_dir = args.checkpoint.parent().and_then(Path::parent).unwrap_or(Path::new("."));
    let data = prepare(&config, &run_dir.join("data"))?;
    let seq = config.train.seq_len;
    let calibrate = calibrates(args.method, args.expert_bits);
    let calib = if calibrate { calibration_batches(&data.train, args.calib_tokens, seq)? } else { Vec::new() };
    let cfg = ModelCompressConfig {
        bits: args.bits,
        groups: args.groups,
        codebook: args.codebooks,
        embeddings: args.embeddings,
        expert_bits: args.expert_bits,
        ..ModelCompressConfig::default()
    };
    let started = Instant::now();
    let compression = compress_model_detailed(be, &model, &calib, args.method, &cfg)?;
    let seconds = started.elapsed().as_secs_f64();
    let file = &compression.file;
    let file_bytes = save_compressed(&args.out, file, &config, &data.tokenizer)?;
    let (compressed, _) = load_compressed_model(&args.out, be)?;
    let (val_loss_fp32, val_loss) = if args.eval_batches > 0 {
        let eval = |m: &Model<Cpu>| validation_loss(be, m, &data.val, config.train.batch_size, seq, args.eval_batches);
        (Some(eval(&model)?), Some(eval(&compressed)?))
    } else {
        (None, None)
    };
    let mut report = report(args.method, args.bits, &args.out.join(COMPRESSED_FILE), file_bytes, file, model.n_params(), calib.iter().map(|c| c.0.len()).sum(), seconds, val_loss_fp32, val_loss);
    (report.expert_tokens, report.expert_bits) = (compression.expert_tokens, compression.expert_bits);
    let path = args.out.join(REPORT_FILE);
    let json = serde_json::to_vec_pretty(&report).map_err(|e| Error::Invalid(format!("cannot encode the report: {e}")))?;
    write_atomic(&path, &json)?;
    Ok(report)
}

/// The report's derived numbers from what was written.
#[allow(clippy::too_many_arguments)]
pub fn report(method: Method, bits: f32, path: &Path, file_bytes: u64, file: &CompressedFile, params: usize, calib_tokens: usize, seconds: f64, val_loss_fp32: Option<f64>, val_loss: Option<f64>) -> CompressReport {
    let weights = file.compressed_weights();
    let payload: usize = file.matrices.values().map(CompressedMatrix::payload_bytes).sum();
    CompressReport {
        method,
        bits,
        file: path.to_path_buf(),
        file_bytes,
        params,
        compressed_weights: weights,
        bits_per_param: 8.0 * file_bytes as f64 / params.max(1) as f64,
        bits_per_weight: bits_per_weight(file_bytes, weights as u64),
        matrix_bits_per_weight: 8.0 * payload as f64 / weights.max(1) as f64,
        calib_tokens,
        expert_tokens: None,
        expert_bits: None,
        seconds,
        val_loss_fp32,
        val_loss,
        val_ppl_fp32: val_loss_fp32.map(f64::exp),
        val_ppl: val_loss.map(f64::exp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::model::compress_model;
    use crate::data::loader::LoaderState;
    use crate::train::checkpoint::{self, TrainState};

    fn config(overrides: &[&str]) -> Config {
        let base = [
            "model.vocab_size=256",
            "model.d_model=64",
            "model.n_layers=2",
            "model.n_heads=2",
            "model.n_kv_heads=2",
            "model.seq_len=32",
            "moe.n_experts=3",
            "moe.total_width=288",
            "train.seq_len=32",
            "train.batch_size=2",
            "data.tokenizer=byte",
        ];
        let all: Vec<String> = base.iter().chain(overrides).map(|s| s.to_string()).collect();
        Config::default_with(&all).unwrap()
    }

    /// A training checkpoint of a freshly initialised model under `run/checkpoints/step_000001`.
    fn training_checkpoint(run: &Path, config: &Config) -> PathBuf {
        let be = Cpu::new(2);
        let model = Model::new(&be, config.model.clone(), config.moe.clone(), 3).unwrap();
        let tensors: Vec<checkpoint::TensorRef> = model.layout.specs.iter().map(|s| (s.name.clone(), s.shape.clone(), &model.params.master()[s.range()])).collect();
        let state = TrainState { step: 1, flops: 0.0, rng: vec![], loader: LoaderState::default(), config_hash: config.config_hash(), config_toml: config.to_toml().unwrap(), tokenizer: None };
        checkpoint::save(run, &state, &tensors, &[], 1).unwrap()
    }

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("motley-compressed-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn run_compress_writes_a_checkpoint_that_loads_and_evaluates() {
        let be = Cpu::new(2);
        let run = temp("run");
        let config = config(&[]);
        let ck = training_checkpoint(&run, &config);
        let out = run.join("compressed");
        let args = CompressArgs {
            checkpoint: ck.clone(),
            method: Method::Jlcm,
            bits: 2.5,
            groups: 4,
            codebooks: CodebookKind::SharedScaled,
            expert_bits: ExpertBits::Uniform,
            calib_tokens: 256,
            out: out.clone(),
            embeddings: Embeddings::Dense(super::super::CodebookDtype::F16),
            eval_batches: 2,
        };
        let r = run_compress(&be, &args).unwrap();
        assert_eq!(r.file_bytes, std::fs::metadata(out.join(COMPRESSED_FILE)).unwrap().len());
        assert_eq!(r.calib_tokens, 256);
        assert!(r.bits_per_weight > r.matrix_bits_per_weight, "{r:?}");
        assert!(r.val_ppl.unwrap().is_finite() && r.val_ppl_fp32.unwrap() > 1.0);
        assert!(out.join(REPORT_FILE).is_file() && !out.join(TOKENIZER_FILE).exists());
        let (model, back) = load_compressed_model(&out, &be).unwrap();
        assert_eq!(back, config);
        let file = CompressedFile::load(&out.join(COMPRESSED_FILE)).unwrap();
        assert_eq!(*model.params.master(), decompress_to_values(&file, &model.layout).unwrap());
        // The matrices' payload is their indices (at most 2.5 bits on average) plus codebooks and
        // permutations.
        let index_bits = file.matrices.values().map(CompressedMatrix::index_bits).sum::<usize>() as f64 / r.compressed_weights as f64;
        assert!(index_bits <= 2.5 && r.matrix_bits_per_weight > index_bits, "{index_bits} {r:?}");
        assert!(matches!(load_compressed_tokenizer(&out, &back).unwrap(), Tokenizer::Byte(_)));

        // RTN goes through the same path (and needs no calibration).
        let rtn = run_compress(&be, &CompressArgs { method: Method::Rtn, bits: 3.0, out: run.join("rtn"), eval_batches: 0, ..args.clone() }).unwrap();
        assert_eq!((rtn.calib_tokens, rtn.val_ppl, rtn.expert_bits), (0, None, None));
        load_compressed_model(&run.join("rtn"), &be).unwrap();
        // Bits by routed share calibrate even RTN, and report the widths and the counts.
        let share = CompressArgs { method: Method::Rtn, bits: 3.0, out: run.join("rtn-share"), eval_batches: 0, expert_bits: ExpertBits::Share, ..args };
        let r = run_compress(&be, &share).unwrap();
        let (widths, tokens) = (r.expert_bits.unwrap(), r.expert_tokens.unwrap());
        assert_eq!((r.calib_tokens, widths.len(), tokens.len()), (256, 2, 2));
        assert!(widths.iter().flatten().all(|&b| (1..=8).contains(&b)), "{widths:?}");
        assert_eq!(tokens.iter().map(|l| l.iter().sum::<usize>()).collect::<Vec<_>>(), vec![2 * 256; 2], "top-2 routing");
        load_compressed_model(&run.join("rtn-share"), &be).unwrap();
        std::fs::remove_dir_all(&run).unwrap();
    }

    /// Saving over a compressed checkpoint replaces it whole; a folder holding anything else is
    /// refused and left as it was.
    #[test]
    fn save_replaces_a_compressed_checkpoint_and_refuses_other_folders() {
        let be = Cpu::new(2);
        let dir = temp("replace");
        let config = config(&[]);
        let model = Model::new(&be, config.model.clone(), config.moe.clone(), 5).unwrap();
        let cfg = ModelCompressConfig { bits: 2.0, ..ModelCompressConfig::default() };
        let file = compress_model(&be, &model, &[], Method::Kmeans, &cfg).unwrap();
        let byte = Tokenizer::Byte(Default::default());
        save_compressed(&dir, &file, &config, &byte).unwrap();
        std::fs::write(dir.join(REPORT_FILE), "{}").unwrap();
        save_compressed(&dir, &file, &config, &byte).unwrap();
        load_compressed_model(&dir, &be).unwrap();
        let other = temp("replace-other");
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("notes.txt"), "keep me").unwrap();
        let e = save_compressed(&other, &file, &config, &byte).unwrap_err().to_string();
        assert!(e.contains("notes.txt") && e.contains("--out"), "{e}");
        assert_eq!(std::fs::read_to_string(other.join("notes.txt")).unwrap(), "keep me");
        assert!(!other.join(COMPRESSED_FILE).exists());
        for d in [dir, other] {
            std::fs::remove_dir_all(d).unwrap();
        }
    }

    #[test]
    fn corrupt_or_foreign_compressed_checkpoints_give_clear_errors() {
        let be = Cpu::new(2);
        let dir = temp("corrupt");
        let config = config(&[]);
        let model = Model::new(&be, config.model.clone(), config.moe.clone(), 5).unwrap();
        let cfg = ModelCompressConfig { bits: 2.0, ..ModelCompressConfig::default() };
        let file = compress_model(&be, &model, &[], Method::Kmeans, &cfg).unwrap();
        save_compressed(&dir, &file, &config, &Tokenizer::Byte(Default::default())).unwrap();
        load_compressed_model(&dir, &be).unwrap();
        let path = dir.join(COMPRESSED_FILE);
        let good = std::fs::read(&path).unwrap();
        let err = || load_compressed_model(&dir, &be).map(|_| ()).unwrap_err().to_string();

        std::fs::write(&path, &good[..good.len() - 3]).unwrap();
        let e = err();
        assert!(e.contains(COMPRESSED_FILE) && e.contains("truncated") && e.contains('`'), "{e}");

        // An unknown method in the header's JSON (same length, so the header still parses).
        let mut bad = good.clone();
        let at = good.windows(6).position(|w| w == b"kmeans").unwrap();
        bad[at + 5] = b'z';
        std::fs::write(&path, &bad).unwrap();
        let e = err();
        assert!(e.contains(COMPRESSED_FILE) && e.contains("metadata"), "{e}");

        // The same file next to another model's config.
        std::fs::write(&path, &good).unwrap();
        let other = config_with_wider_model();
        std::fs::write(dir.join(CONFIG_FILE), other.to_toml().unwrap()).unwrap();
        let e = err();
        assert!(e.contains(COMPRESSED_FILE) && e.contains(&config.config_hash()) && e.contains(&other.config_hash()) && e.contains("another model"), "{e}");

        std::fs::remove_file(dir.join(CONFIG_FILE)).unwrap();
        assert!(err().contains(CONFIG_FILE));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn config_with_wider_model() -> Config {
        config(&["model.d_model=128"])
    }

    #[test]
    fn method_and_codebook_names_parse_or_say_what_is_allowed() {
        assert_eq!(parse_method("rtn").unwrap(), Method::Rtn);
        assert!(parse_method("gptq").unwrap_err().to_string().contains("jlcm, kmeans, rtn"));
        assert_eq!(parse_codebooks("shared-scaled").unwrap(), CodebookKind::SharedScaled);
        assert!(parse_codebooks("one").is_err());
        assert_eq!(parse_expert_bits("share").unwrap(), ExpertBits::Share);
        assert!(parse_expert_bits("by-width").unwrap_err().to_string().contains("uniform or share"));
    }
}
