//! Whole-model compression: every weight matrix of an HMoE model through RTN, k-means or JLCM,
//! into one [`CompressedFile`], and back to a parameter vector for [`Model::from_values`].
//!
//! What is compressed (names are the [`ParamLayout`] names):
//! - each block's `wqkv`, `wo`, and every expert's `w_gate_up` and `w_down`, at `bits`;
//! - `tok_embedding` and `lm_head` only with [`Embeddings::Compress`] (same method and bits);
//!   by default they stay dense in f16, as is common practice: they are a large share of a
//!   small model and every token goes through them;
//! - never: norm gains (f32) and routers (f32: tiny, and routing decisions are discrete, so a
//!   small error can send a token to another expert), nor any matrix with fewer than
//!   [`MIN_COMPRESSED_WEIGHTS`] weights (codebooks and header would cost more than they save).
//!
//! Only JLCM reads calibration data ([`calib`](super::calib)); RTN and k-means are data-free and
//! skip the calibration forward. `lm_head` and `tok_embedding` under JLCM: the head uses the
//! Hessian of the final-norm output; the embedding is a lookup table, not `y = Wx`, so it gets
//! the identity Hessian (weight-space error).
//!
//! Permutation folding (JLCM with `fold_experts`): an expert's hidden units can be reordered
//! without changing its function if gate row `i`, up row `h + i` and down column `i` move
//! together. So the expert's `w_gate_up` is compressed in *paired* form — `h` rows `[gate_i |
//! up_i]` of width `2C` with Hessian `blockdiag(H, H)` — JLCM's row grouping yields a hidden-unit
//! order π that is stored as [`RowOrder::Folded`] (no index map), and `w_down` is compressed with
//! its columns (and its input Hessian) already in π order. Everything else keeps its row
//! permutation in the file ([`RowOrder::Stored`]): the rows of `wqkv` feed RoPE and attention
//! (q/k dimensions are paired by frequency), `wo`, `w_down` and `lm_head` rows are residual-stream
//! or vocabulary coordinates shared by the whole model.
//!
//! Bits per expert ([`ExpertBits::Share`]): each expert's two matrices get an integer width from
//! its routed share in the calibration forward ([`share`](super::share) has the rule), spending
//! the same index bits on the experts as `bits` would; every other matrix gets `bits`.

use std::collections::BTreeSet;

use super::calib::{self, Calibration};
use super::format::{CodebookDtype, CompressedFile, CompressedMatrix, DenseTensor, Method};
use super::jlcm::{compress_jlcm, CodebookKind, JlcmConfig};
use super::kmeans::{quantize_kmeans, KMeansQuantConfig};
use super::matrix::{Hessian, Matrix};
use super::rtn::{quantize_rtn, RtnConfig};
use super::share;
use crate::backend::cpu::Cpu;
use crate::config::stable_hash;
use crate::model::params::{ParamLayout, ParamSpec};
use crate::model::Model;
use crate::{Error, Result};

/// Matrices with fewer weights stay dense.
pub const MIN_COMPRESSED_WEIGHTS: usize = 4096;

/// What happens to `tok_embedding` and `lm_head`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Embeddings {
    /// Kept dense at this precision.
    Dense(CodebookDtype),
    /// Compressed like the block matrices.
    Compress,
}

/// How the experts' bit widths are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertBits {
    /// Every expert at `bits`, like every other matrix.
    Uniform,
    /// From each expert's routed share (module doc); needs calibration data, whatever the method.
    Share,
}

/// Settings of [`compress_model`] besides the method.
#[derive(Clone, Debug)]
pub struct ModelCompressConfig {
    /// Average index bits per weight of the compressed matrices (fractional mixes two widths).
    pub bits: f32,
    /// Row groups per matrix: JLCM's clusters, k-means' contiguous row blocks (capped at the rows).
    pub groups: usize,
    pub codebook: CodebookKind,
    /// JLCM rounds of (codebook update, assignment sweep).
    pub jlcm_steps: usize,
    pub embeddings: Embeddings,
    /// Fold JLCM's expert hidden-unit permutation into the expert (see the module doc).
    pub fold_experts: bool,
    pub expert_bits: ExpertBits,
    pub seed: u64,
}

impl Default for ModelCompressConfig {
    fn default() -> Self {
        ModelCompressConfig {
            bits: 2.0,
            groups: 8,
            codebook: CodebookKind::PerGroup,
            jlcm_steps: 20,
            embeddings: Embeddings::Dense(CodebookDtype::F16),
            fold_experts: true,
            expert_bits: ExpertBits::Uniform,
            seed: 0,
        }
    }
}

/// A folded expert: stored hidden unit `i` is original unit `order[i]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertFold {
    pub layer: usize,
    pub expert: usize,
    pub order: Vec<usize>,
}

/// Compresses every weight matrix of `model` (see the module doc for which, and how).
/// `calib` holds `(inputs, batch, seq)` token batches; JLCM and [`ExpertBits::Share`] read them.
pub fn compress_model(be: &Cpu, model: &Model<Cpu>, calib: &[(Vec<u32>, usize, usize)], method: Method, cfg: &ModelCompressConfig) -> Result<CompressedFile> {
    compress_model_detailed(be, model, calib, method, cfg).map(|c| c.file)
}

/// [`compress_model_detailed`]'s result: the file and how it was made (for tests and reports).
pub struct ModelCompression {
    pub file: CompressedFile,
    pub folds: Vec<ExpertFold>,
    /// Calibration tokens routed to each layer's experts (when calibrated).
    pub expert_tokens: Option<Vec<Vec<usize>>>,
    /// Index bits of each layer's experts under [`ExpertBits::Share`]; 0 marks an expert outside
    /// the shared budget (a matrix of it too small to compress), whose compressible matrix, if
    /// any, gets the uniform bits.
    pub expert_bits: Option<Vec<Vec<u8>>>,
}

/// Whether compressing with `method` and `expert_bits` runs the calibration tokens through the
/// model: JLCM for its Hessians, [`ExpertBits::Share`] for the routing counts.
pub fn calibrates(method: Method, expert_bits: ExpertBits) -> bool {
    method == Method::Jlcm || expert_bits == ExpertBits::Share
}

/// [`compress_model`], also returning the folds, routing counts and expert widths.
pub fn compress_model_detailed(be: &Cpu, model: &Model<Cpu>, calib: &[(Vec<u32>, usize, usize)], method: Method, cfg: &ModelCompressConfig) -> Result<ModelCompression> {
    if cfg.groups == 0 {
        return Err(Error::config("groups", 0, "at least 1 row group"));
    }
    let calibration = if calibrates(method, cfg.expert_bits) { Some(calib::calibrate(be, model, calib)?) } else { None };
    let values: &[f32] = model.params.master();
    let layout = &model.layout;
    let spec_at = |offset: usize| spec_index(layout, offset);
    // Target bits of each parameter tensor (only matrices read theirs).
    let mut bits = vec![cfg.bits; layout.specs.len()];
    let expert_bits = match (cfg.expert_bits, &calibration) {
        (ExpertBits::Share, Some(cal)) => {
            let widths = share_bits(layout, &cal.expert_tokens, cfg.bits)?;
            for (block, layer) in layout.blocks.iter().zip(&widths) {
                // Width 0: the expert is outside the shared budget (one of its matrices is too
                // small to compress); a compressible other matrix keeps the uniform bits.
                for (&(gu, down), &b) in block.experts.iter().zip(layer).filter(|(_, &b)| b > 0) {
                    for i in [spec_at(gu), spec_at(down)].into_iter().flatten() {
                        bits[i] = b as f32;
                    }
                }
            }
            Some(widths)
        }
        _ => None,
    };
    let at_bits = |i: usize| ModelCompressConfig { bits: bits[i], ..cfg.clone() };
    let mut file = CompressedFile::default();
    let mut folds = Vec::new();
    let mut done = vec![false; layout.specs.len()];

    // Experts first: a fold ties each expert's two matrices together.
    for (l, block) in layout.blocks.iter().enumerate() {
        for (e, &(gu_off, down_off)) in block.experts.iter().enumerate() {
            let (Some(gi), Some(di)) = (spec_at(gu_off), spec_at(down_off)) else { continue };
            let (gu, down) = (&layout.specs[gi], &layout.specs[di]);
            if method != Method::Jlcm || !cfg.fold_experts || !compressible(gu) || !compressible(down) {
                continue;
            }
            let (mg, md, order) = fold_expert(values, gu, down, calibration.as_ref(), &at_bits(gi))?;
            file.matrices.insert(gu.name.clone(), mg);
            file.matrices.insert(down.name.clone(), md);
            folds.push(ExpertFold { layer: l, expert: e, order });
            done[gi] = true;
            done[di] = true;
        }
    }
    for (i, spec) in layout.specs.iter().enumerate() {
        if done[i] {
            continue;
        }
        let is_embedding = spec.offset == layout.embedding || spec.offset == layout.lm_head;
        let data = &values[spec.range()];
        match (is_embedding, cfg.embeddings) {
            (true, Embeddings::Dense(dtype)) => {
                file.dense.insert(spec.name.clone(), DenseTensor::new(spec.shape.clone(), data, dtype));
            }
            _ if compressible(spec) && !is_router(layout, spec) => {
                let w = Matrix::new(spec.shape[0], spec.shape[1], data.to_vec())?;
                let h = calibration.as_ref().and_then(|c| c.hessians.get(&spec.name));
                let m = compress_matrix(&w, h, method, &at_bits(i), seed_of(cfg.seed, &spec.name), false)?.0;
                file.matrices.insert(spec.name.clone(), m);
            }
            _ => {
                file.dense.insert(spec.name.clone(), DenseTensor::new(spec.shape.clone(), data, CodebookDtype::F32));
            }
        }
    }
    let expert_tokens = calibration.map(|c| c.expert_tokens);
    Ok(ModelCompression { file, folds, expert_tokens, expert_bits })
}

fn compressible(spec: &ParamSpec) -> bool {
    spec.shape.len() == 2 && spec.len() >= MIN_COMPRESSED_WEIGHTS
}

/// Index in `layout.specs` of the tensor at `offset`.
fn spec_index(layout: &ParamLayout, offset: usize) -> Option<usize> {
    layout.specs.iter().position(|s| s.offset == offset)
}

/// [`share::allocate`] over every expert whose two matrices are compressed, all layers together
/// (each layer's shares sum to 1, so layers weigh the same); 0 for the others.
fn share_bits(layout: &ParamLayout, tokens: &[Vec<usize>], target: f32) -> Result<Vec<Vec<u8>>> {
    let shares = share::shares(tokens);
    let size_of = |offset: usize| spec_index(layout, offset).map(|i| &layout.specs[i]).filter(|s| compressible(s)).map(ParamSpec::len);
    let mut units = Vec::new();
    for (l, block) in layout.blocks.iter().enumerate() {
        for (e, &(gu, down)) in block.experts.iter().enumerate() {
            if let (Some(a), Some(b)) = (size_of(gu), size_of(down)) {
                units.push((l, e, a + b, shares[l][e]));
            }
        }
    }
    let sizes: Vec<usize> = units.iter().map(|u| u.2).collect();
    let unit_shares: Vec<f64> = units.iter().map(|u| u.3).collect();
    let mut widths: Vec<Vec<u8>> = layout.blocks.iter().map(|b| vec![0; b.experts.len()]).collect();
    for (u, b) in units.iter().zip(share::allocate(&sizes, &unit_shares, target)?) {
        widths[u.0][u.1] = b;
    }
    Ok(widths)
}

fn is_router(layout: &ParamLayout, spec: &ParamSpec) -> bool {
    layout.blocks.iter().any(|b| b.router == spec.offset)
}

/// A per-matrix seed, so one matrix's result does not depend on which others were compressed.
fn seed_of(seed: u64, name: &str) -> u64 {
    seed ^ stable_hash(name.as_bytes())
}

/// One matrix through `method`; returns it and its stored row order (stored row `i` = original
/// row `order[i]`). JLCM without a Hessian uses the identity (weight-space error).
fn compress_matrix(w: &Matrix, h: Option<&Hessian>, method: Method, cfg: &ModelCompressConfig, seed: u64, fold: bool) -> Result<(CompressedMatrix, Vec<usize>)> {
    let groups = cfg.groups.min(w.rows);
    let identity: Vec<usize> = (0..w.rows).collect();
    match method {
        Method::Rtn => Ok((quantize_rtn(w, &RtnConfig { bits: cfg.bits, group_size: None })?.to_compressed()?, identity)),
        Method::Kmeans => {
            let kc = KMeansQuantConfig { bits: cfg.bits, row_groups: groups, iters: 30, seed, codebook_dtype: CodebookDtype::F16 };
            Ok((quantize_kmeans(w, &kc)?, identity))
        }
        Method::Jlcm => {
            let eye;
            let h = match h {
                Some(h) => h,
                None => {
                    eye = Hessian { cols: w.cols, data: (0..w.cols * w.cols).map(|i| if i % (w.cols + 1) == 0 { 1.0 } else { 0.0 }).collect() };
                    &eye
                }
            };
            let jc = JlcmConfig {
                bits: cfg.bits,
                groups,
                codebook: cfg.codebook,
                steps: cfg.jlcm_steps,
                seed,
                fold_permutation: fold,
                codebook_dtype: CodebookDtype::F16,
                ..JlcmConfig::default()
            };
            let out = compress_jlcm(w, h, &jc)?;
            Ok((out.matrix, out.order))
        }
    }
}

/// `w_gate_up (2h, C)` as `h` rows `[gate_i | up_i]` of width `2C`.
fn pair_rows(gate_up: &[f32], h: usize, c: usize) -> Result<Matrix> {
    let data = (0..h).flat_map(|i| gate_up[i * c..(i + 1) * c].iter().chain(&gate_up[(h + i) * c..(h + i + 1) * c]).copied()).collect();
    Matrix::new(h, 2 * c, data)
}

/// Inverse of [`pair_rows`].
fn unpair_rows(paired: &Matrix) -> Vec<f32> {
    let (h, c) = (paired.rows, paired.cols / 2);
    let mut out = vec![0f32; 2 * h * c];
    for i in 0..h {
        let (g, u) = paired.row(i).split_at(c);
        out[i * c..(i + 1) * c].copy_from_slice(g);
        out[(h + i) * c..(h + i + 1) * c].copy_from_slice(u);
    }
    out
}

/// JLCM on one expert with its hidden-unit order folded in (module doc).
fn fold_expert(values: &[f32], gu: &ParamSpec, down: &ParamSpec, calibration: Option<&Calibration>, cfg: &ModelCompressConfig) -> Result<(CompressedMatrix, CompressedMatrix, Vec<usize>)> {
    let (h, c) = (down.shape[1], down.shape[0]);
    let paired = pair_rows(&values[gu.range()], h, c)?;
    let hessian = |name: &str| calibration.and_then(|cal| cal.hessians.get(name));
    let h_gu = hessian(&gu.name).map(calib::paired);
    let (mg, order) = compress_matrix(&paired, h_gu.as_ref(), Method::Jlcm, cfg, seed_of(cfg.seed, &gu.name), true)?;
    let d = &values[down.range()];
    let permuted = Matrix::new(c, h, (0..c).flat_map(|r| order.iter().map(move |&j| d[r * h + j])).collect())?;
    let h_down = hessian(&down.name).map(|hd| calib::permuted(hd, &order));
    let (md, _) = compress_matrix(&permuted, h_down.as_ref(), Method::Jlcm, cfg, seed_of(cfg.seed, &down.name), false)?;
    Ok((mg, md, order))
}

/// The full parameter vector (layout order) of a compressed file: every layout tensor must be
/// present exactly once, as a matrix of its shape (or, for an expert's `w_gate_up`, in paired
/// form) or as a dense tensor of its shape; nothing else may be in the file.
pub fn decompress_to_values(file: &CompressedFile, layout: &ParamLayout) -> Result<Vec<f32>> {
    let mut values = vec![0f32; layout.total];
    for spec in &layout.specs {
        let name = &spec.name;
        let dst = &mut values[spec.range()];
        match (file.matrices.get(name), file.dense.get(name)) {
            (Some(_), Some(_)) => return Err(Error::Invalid(format!("tensor `{name}` is stored both compressed and dense"))),
            (Some(m), None) => {
                let decoded = m.decode().map_err(|e| Error::Invalid(format!("matrix `{name}`: {e}")))?;
                let natural = spec.shape == [m.rows, m.cols];
                let paired = spec.shape.len() == 2 && [2 * m.rows, m.cols] == [spec.shape[0], 2 * spec.shape[1]] && name.ends_with(".w_gate_up");
                if natural {
                    dst.copy_from_slice(&decoded.data);
                } else if paired {
                    dst.copy_from_slice(&unpair_rows(&decoded));
                } else {
                    return Err(Error::Invalid(format!("matrix `{name}` is {}×{} but the model expects shape {:?}: was it compressed from another model config?", m.rows, m.cols, spec.shape)));
                }
            }
            (None, Some(t)) => {
                if t.shape != spec.shape {
                    return Err(Error::Invalid(format!("dense tensor `{name}` has shape {:?} but the model expects {:?}: was it compressed from another model config?", t.shape, spec.shape)));
                }
                dst.copy_from_slice(&t.data);
            }
            (None, None) => return Err(Error::Invalid(format!("tensor `{name}` is missing from the compressed file"))),
        }
    }
    let known: BTreeSet<&str> = layout.specs.iter().map(|s| s.name.as_str()).collect();
    if let Some(extra) = file.matrices.keys().chain(file.dense.keys()).find(|n| !known.contains(n.as_str())) {
        return Err(Error::Invalid(format!("tensor `{extra}` in the compressed file is not part of this model")));
    }
    Ok(values)
}

/// Bytes of everything but the header: the exact size of a saved file is
/// `8 + header length + payload_bytes(file)`.
pub fn payload_bytes(file: &CompressedFile) -> usize {
    file.matrices.values().map(CompressedMatrix::payload_bytes).sum::<usize>() + file.dense.values().map(DenseTensor::payload_bytes).sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{ModelConfig, MoeConfig, Routing};
    use crate::rng::Rng;

    /// A small model whose every expert is large enough to be compressed (and folded).
    fn small_model(be: &Cpu) -> Model<Cpu> {
        let config = ModelConfig { vocab_size: 96, d_model: 64, n_layers: 2, n_heads: 2, n_kv_heads: 2, seq_len: 32, rope_theta: 10000.0, norm_eps: 1e-5, init_std: 0.05 };
        let moe = MoeConfig { expert_widths: vec![64, 96, 128], routing: Routing::TopK, top_k: 2, top_p: 1.0, load_balance: 0.0, p_penalty: 0.0, entropy: 0.0, z_loss: 0.0 };
        Model::new(be, config, moe, 7).unwrap()
    }

    fn tokens(n: usize, seed: u64) -> Vec<u32> {
        let mut rng = Rng::new(seed);
        (0..n).map(|_| rng.below(96) as u32).collect()
    }

    fn calib() -> Vec<(Vec<u32>, usize, usize)> {
        vec![(tokens(4 * 32, 1), 4, 32), (tokens(2 * 32, 2), 2, 32)]
    }

    fn cfg(bits: f32) -> ModelCompressConfig {
        ModelCompressConfig { bits, groups: 4, jlcm_steps: 3, ..ModelCompressConfig::default() }
    }

    fn loss(be: &Cpu, model: &Model<Cpu>, values: &[f32]) -> f64 {
        let m = Model::from_values(be, model.config.clone(), model.moe.clone(), values).unwrap();
        let x = tokens(2 * 32, 9);
        let y: Vec<u32> = x.iter().map(|t| (t + 1) % 96).collect();
        m.evaluate(be, &x, &y, 2, 32).unwrap().lm_loss
    }

    #[test]
    fn file_round_trip_decodes_to_each_matrix_and_size_matches_the_formula() {
        let be = Cpu::new(2);
        let model = small_model(&be);
        for (method, bits) in [(Method::Rtn, 3.0), (Method::Kmeans, 2.5), (Method::Jlcm, 2.0)] {
            let file = compress_model(&be, &model, &calib(), method, &cfg(bits)).unwrap();
            // Which tensors are compressed: the rule of the module doc.
            let layout = &model.layout;
            for spec in &layout.specs {
                let compressed = file.matrices.contains_key(&spec.name);
                let expect = spec.shape.len() == 2 && spec.len() >= MIN_COMPRESSED_WEIGHTS && !spec.name.ends_with("router") && !["tok_embedding", "lm_head"].contains(&spec.name.as_str());
                assert_eq!(compressed, expect, "{method:?} {}", spec.name);
            }
            assert_eq!(file.dense["lm_head"].dtype, CodebookDtype::F16);
            let bytes = file.to_bytes().unwrap();
            let back = CompressedFile::from_bytes(&bytes).unwrap();
            assert_eq!(back, file);
            let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            assert_eq!(bytes.len(), 8 + header + payload_bytes(&file));
            let values = decompress_to_values(&back, layout).unwrap();
            for (name, m) in &file.matrices {
                let spec = layout.get(name).unwrap();
                let d = m.decode().unwrap();
                let want = if spec.shape == [m.rows, m.cols] { d.data } else { unpair_rows(&d) };
                assert_eq!(&values[spec.range()], &want[..], "{method:?} {name}");
            }
            for (name, t) in &file.dense {
                assert_eq!(&values[layout.get(name).unwrap().range()], &t.data[..], "{name}");
            }
        }
    }

    #[test]
    fn folded_expert_permutation_preserves_the_model_function() {
        let be = Cpu::new(2);
        let model = small_model(&be);
        let original: Vec<f32> = model.params.master().clone();
        let ModelCompression { file, folds, .. } = compress_model_detailed(&be, &model, &calib(), Method::Jlcm, &cfg(3.0)).unwrap();
        assert_eq!(folds.len(), 2 * 3, "every expert folded");
        assert!(folds.iter().any(|f| f.order.iter().enumerate().any(|(i, &o)| i != o)), "some fold is not the identity");
        let folded = decompress_to_values(&file, &model.layout).unwrap();
        // Undo each fold: hidden unit order[i] gets stored unit i (gate row, up row, down column).
        let mut unfolded = folded.clone();
        for f in &folds {
            let (gu, down) = model.layout.blocks[f.layer].experts[f.expert];
            let (h, c) = (model.moe.expert_widths[f.expert], model.config.d_model);
            for (i, &o) in f.order.iter().enumerate() {
                for half in [0, h] {
                    let (src, dst) = (gu + (half + i) * c, gu + (half + o) * c);
                    unfolded[dst..dst + c].copy_from_slice(&folded[src..src + c]);
                }
                for r in 0..c {
                    unfolded[down + r * h + o] = folded[down + r * h + i];
                }
            }
        }
        let (lf, lu) = (loss(&be, &model, &folded), loss(&be, &model, &unfolded));
        assert!((lf - lu).abs() < 1e-5, "folded {lf} vs unfolded {lu}");
        // Unfolded, the experts approximate the original weights; folded, rows are moved.
        let rel = |v: &[f32], range: std::ops::Range<usize>| {
            let e: f64 = range.clone().map(|i| (v[i] - original[i]) as f64 * (v[i] - original[i]) as f64).sum();
            e / range.map(|i| original[i] as f64 * original[i] as f64).sum::<f64>()
        };
        let spec = model.layout.get("layers.0.experts.2.w_gate_up").unwrap();
        assert!(rel(&unfolded, spec.range()) < 0.1, "{}", rel(&unfolded, spec.range()));
        assert!(rel(&folded, spec.range()) > 0.5, "{}", rel(&folded, spec.range()));
        assert!((lu - loss(&be, &model, &original)).abs() < 0.5);
    }

    /// An expert whose gate/up matrix is large enough to compress but whose down matrix is not
    /// (2·h·C ≥ MIN_COMPRESSED_WEIGHTS > h·C) stays outside the shared budget: its gate/up is
    /// compressed at the uniform bits, its down kept dense, and share mode does not fail.
    #[test]
    fn share_mode_keeps_uniform_bits_for_a_half_compressible_expert() {
        let be = Cpu::new(2);
        let mut model = small_model(&be);
        let h = MIN_COMPRESSED_WEIGHTS / model.config.d_model - 16; // h·C < MIN ≤ 2·h·C
        assert!(h * model.config.d_model < MIN_COMPRESSED_WEIGHTS && 2 * h * model.config.d_model >= MIN_COMPRESSED_WEIGHTS);
        let mut moe = model.moe.clone();
        moe.expert_widths.push(h);
        model = Model::new(&be, model.config.clone(), moe, 7).unwrap();
        let layout = &model.layout;
        for method in [Method::Rtn, Method::Kmeans, Method::Jlcm] {
            let share_cfg = ModelCompressConfig { expert_bits: ExpertBits::Share, ..cfg(3.0) };
            let c = compress_model_detailed(&be, &model, &calib(), method, &share_cfg).unwrap_or_else(|e| panic!("{method:?}: {e}"));
            let widths = c.expert_bits.unwrap();
            for (l, block) in layout.blocks.iter().enumerate() {
                let (gu, down) = *block.experts.last().unwrap();
                assert_eq!(widths[l][block.experts.len() - 1], 0, "{method:?}: the half-compressible expert is outside the budget");
                let gu_name = &layout.specs[spec_index(layout, gu).unwrap()].name;
                let m = &c.file.matrices[gu_name];
                assert!(m.groups.iter().all(|g| g.bits == 3), "{method:?} {gu_name}: {:?}", m.groups);
                let down_name = &layout.specs[spec_index(layout, down).unwrap()].name;
                assert!(!c.file.matrices.contains_key(down_name), "{method:?}: {down_name} is too small to compress");
            }
        }
    }

    /// `--expert-bits share`: the experts' average index width is within the stated bound below
    /// the target, the file is the size of the uniform one, a busier expert of the same shape
    /// never has fewer bits, and the matrices carry the allocated widths.
    #[test]
    fn bits_by_share_keep_the_budget_and_follow_the_shares() {
        let be = Cpu::new(2);
        let model = small_model(&be);
        let layout = &model.layout;
        // Same-shape experts given different bits: the share ordering was put to the test.
        let mut split_pairs = 0;
        for (method, target) in [(Method::Kmeans, 2.0f32), (Method::Kmeans, 2.5), (Method::Jlcm, 3.0)] {
            let share_cfg = ModelCompressConfig { expert_bits: ExpertBits::Share, ..cfg(target) };
            let c = compress_model_detailed(&be, &model, &calib(), method, &share_cfg).unwrap();
            let (widths, tokens) = (c.expert_bits.unwrap(), c.expert_tokens.unwrap());
            let shares = share::shares(&tokens);
            let (mut index_bits, mut weights, mut smallest) = (0usize, 0usize, usize::MAX);
            let mut experts = Vec::new();
            for (l, block) in layout.blocks.iter().enumerate() {
                for (e, &(gu, down)) in block.experts.iter().enumerate() {
                    let b = widths[l][e];
                    let mut n = 0;
                    for off in [gu, down] {
                        let spec = &layout.specs[spec_index(layout, off).unwrap()];
                        let m = &c.file.matrices[&spec.name];
                        assert!(m.groups.iter().all(|g| g.bits == b), "{method:?} {}: groups at {:?}, allocated {b}", spec.name, m.groups);
                        index_bits += m.index_bits();
                        n += m.rows * m.cols;
                    }
                    (weights, smallest) = (weights + n, smallest.min(n));
                    experts.push((n, shares[l][e], b));
                }
            }
            let avg = index_bits as f64 / weights as f64;
            let bound = smallest as f64 / weights as f64;
            assert!(avg <= target as f64 && avg > target as f64 - bound, "{method:?} {target}: experts average {avg} bits (bound {bound})");
            for a in &experts {
                for b in &experts {
                    assert!(!(a.0 == b.0 && a.1 > b.1 && a.2 < b.2), "{method:?} {target}: share {} got {} bits, share {} got {}", a.1, a.2, b.1, b.2);
                    split_pairs += usize::from(a.0 == b.0 && a.2 > b.2);
                }
            }
            // The whole file (everything included) against uniform bits: within 1%, here and at
            // model scale (the index bits differ by at most `bound`, codebooks by a few entries).
            let size = |f: &CompressedFile| f.to_bytes().unwrap().len() as f64;
            let uniform = compress_model(&be, &model, &calib(), method, &cfg(target)).unwrap();
            let ratio = size(&c.file) / size(&uniform);
            assert!((0.99..=1.01).contains(&ratio), "{method:?} {target}: share file / uniform file = {ratio}");
        }
        assert!(split_pairs > 0, "no two experts of one shape got different bits");
    }

    #[test]
    fn decoding_into_another_layout_names_the_tensor() {
        let be = Cpu::new(2);
        let model = small_model(&be);
        let file = compress_model(&be, &model, &[], Method::Rtn, &cfg(2.0)).unwrap();
        let mut other_cfg = model.config.clone();
        other_cfg.vocab_size = 100;
        let other = ParamLayout::new(&other_cfg, &model.moe);
        let e = decompress_to_values(&file, &other).unwrap_err().to_string();
        assert!(e.contains("`tok_embedding`") && e.contains("[100, 64]"), "{e}");
        let mut wider = model.moe.clone();
        wider.expert_widths[0] = 72;
        let e = decompress_to_values(&file, &ParamLayout::new(&model.config, &wider)).unwrap_err().to_string();
        assert!(e.contains("layers.0.experts.0.w_gate_up") && e.contains("another model config"), "{e}");
        let mut missing = file.clone();
        missing.dense.remove("final_norm");
        assert!(decompress_to_values(&missing, &model.layout).unwrap_err().to_string().contains("`final_norm` is missing"));
        let mut extra = file.clone();
        extra.dense.insert("layers.9.attn_norm".into(), DenseTensor::new(vec![1], &[1.0], CodebookDtype::F32));
        assert!(decompress_to_values(&extra, &model.layout).unwrap_err().to_string().contains("`layers.9.attn_norm`"));
        assert!(compress_model(&be, &model, &[], Method::Jlcm, &cfg(2.0)).is_err(), "JLCM needs calibration data");
    }
}
