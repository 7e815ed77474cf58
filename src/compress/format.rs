//! Compressed matrices in memory and on disk.
//!
//! In memory a [`CompressedMatrix`] is a list of contiguous row groups (in stored order), each
//! with an index width, a codebook id and a scale, plus one codebook index per weight. This one
//! shape covers every method here: k-means per matrix (one group), k-means per row block, JLCM
//! with one codebook per group (`scale = 1`) and JLCM with a shared codebook per width and a scale
//! per group; mixed widths (fractional bits) are just groups with different `bits`.
//!
//! On disk, a set of named matrices plus small dense f32 tensors (norms, biases) go into one
//! safetensors file. Matrix `NAME` becomes up to four tensors:
//! - `NAME:indices` (U8): all indices in stored row order, LSB-first bit-packed, each group at its
//!   own width, concatenated without padding ([`bitpack`](super::bitpack));
//! - `NAME:codebooks` (F32 or F16): all codebooks concatenated;
//! - `NAME:scales` (one per group): only when some scale is not 1;
//! - `NAME:zeros` (one per group): only when some zero is not 0 (affine codebooks, i.e. RTN);
//! - `NAME:perm` (U8): only when the row order is [`RowOrder::Stored`]: one entry per stored row,
//!   bit-packed at `⌈log2 rows⌉` bits ([`width_for`](super::bitpack::width_for)), the least any
//!   fixed-width code of a row number can use. Versions 1 and 2 stored it as U32.
//!
//! Scales and zeros are F16 when every one of them is an exact f16 value (RTN rounds its
//! (scale, zero) pairs to f16, so it pays 32 bits per row as its own accounting says), else F32.
//! Dense tensors are F32 or F16 ([`DenseTensor::dtype`]).
//!
//! Everything else (shape, method, groups, codebook sizes, dtypes, row order, the list of dense
//! tensors, free-form `attrs` such as the model config hash) is JSON under the `__metadata__` key
//! [`METADATA_KEY`]. Consecutive identical groups are written once with a `repeat` count, so
//! RTN's one group per row costs a few bytes of header per matrix rather than per row. Loading
//! checks every field and every index and names the tensor in the error. Version 1 files (no
//! zeros, repeats, F16 scales or F16 dense tensors) and version 2 files (U32 permutations) still
//! load.

use super::bitpack::{self, BitReader, BitWriter};
use super::bits::MAX_BITS;
use super::matrix::Matrix;
use crate::{Error, Result};
use half::f16;
use safetensors::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// The `__metadata__` key holding this module's JSON.
pub const METADATA_KEY: &str = "motley.compressed";
const FORMAT_VERSION: u32 = 3;
/// Versions this build reads: 2 only added optional fields to 1; 3 packs permutations.
const READABLE_VERSIONS: [u32; 3] = [1, 2, 3];
/// The last version that stored permutations as U32.
const U32_PERM_VERSION: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Kmeans,
    Jlcm,
    /// Round-to-nearest on a uniform grid: an affine codebook per row (`zero + scale · q`).
    Rtn,
}

/// Storage type of codebook entries. Compressors round their codebooks to it, so what is saved is
/// exactly what was evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CodebookDtype {
    F32,
    F16,
}

impl CodebookDtype {
    pub fn round(self, v: f32) -> f32 {
        match self {
            CodebookDtype::F32 => v,
            CodebookDtype::F16 => f16::from_f32(v).to_f32(),
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            CodebookDtype::F32 => 4,
            CodebookDtype::F16 => 2,
        }
    }
}

/// A contiguous block of rows sharing an index width, a codebook and a scale.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RowGroup {
    pub rows: usize,
    pub bits: u8,
    pub codebook: usize,
    /// Decoded weight = `zero + scale · codebooks[codebook][index]`.
    #[serde(skip, default = "one")]
    pub scale: f32,
    /// Offset of an affine codebook (0 for the codebook methods).
    #[serde(skip, default)]
    pub zero: f32,
}

fn one() -> f32 {
    1.0
}

/// How stored rows relate to the original matrix's rows.
#[derive(Clone, Debug, PartialEq)]
pub enum RowOrder {
    /// Stored row `i` is original row `i`.
    Original,
    /// Stored row `i` is original row `perm[i]`; [`CompressedMatrix::decode`] undoes it.
    Stored(Vec<u32>),
    /// Rows were reordered and the caller folded the permutation into the neighbouring layers
    /// (e.g. permuted the next layer's input columns), so it is not stored and `decode` returns
    /// rows in stored order.
    Folded,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CompressedMatrix {
    pub rows: usize,
    pub cols: usize,
    pub method: Method,
    pub groups: Vec<RowGroup>,
    pub codebooks: Vec<Vec<f32>>,
    pub codebook_dtype: CodebookDtype,
    /// One per weight, stored row order, row-major.
    pub indices: Vec<u8>,
    pub row_order: RowOrder,
}

impl CompressedMatrix {
    /// Builds and validates; every compressor goes through here.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rows: usize,
        cols: usize,
        method: Method,
        groups: Vec<RowGroup>,
        codebooks: Vec<Vec<f32>>,
        codebook_dtype: CodebookDtype,
        indices: Vec<u8>,
        row_order: RowOrder,
    ) -> Result<Self> {
        let m = CompressedMatrix { rows, cols, method, groups, codebooks, codebook_dtype, indices, row_order };
        m.validate().map_err(Error::Invalid)?;
        Ok(m)
    }

    /// Every invariant `decode` relies on, as a sentence naming the offending part.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.rows == 0 || self.cols == 0 {
            return Err(format!("shape {}×{} has no weights", self.rows, self.cols));
        }
        let group_rows: usize = self.groups.iter().map(|g| g.rows).sum();
        if group_rows != self.rows {
            return Err(format!("row groups cover {group_rows} rows but the matrix has {}", self.rows));
        }
        for (c, cb) in self.codebooks.iter().enumerate() {
            if cb.is_empty() || cb.len() > 1 << MAX_BITS {
                return Err(format!("codebook {c} has {} entries (allowed 1..={})", cb.len(), 1 << MAX_BITS));
            }
            if let Some(v) = cb.iter().find(|v| !v.is_finite() || self.codebook_dtype.round(**v) != **v) {
                return Err(format!("codebook {c} entry {v} is not a finite {:?} value", self.codebook_dtype));
            }
        }
        for (g, grp) in self.groups.iter().enumerate() {
            if grp.rows == 0 || !(1..=MAX_BITS).contains(&grp.bits) {
                return Err(format!("group {g}: {} rows at {} bits (need ≥ 1 row, 1..={MAX_BITS} bits)", grp.rows, grp.bits));
            }
            let Some(cb) = self.codebooks.get(grp.codebook) else {
                return Err(format!("group {g} refers to codebook {} of {}", grp.codebook, self.codebooks.len()));
            };
            if cb.len() > 1 << grp.bits {
                return Err(format!("group {g}: codebook {} has {} entries, more than {} bits can address", grp.codebook, cb.len(), grp.bits));
            }
            if !grp.scale.is_finite() || !grp.zero.is_finite() {
                return Err(format!("group {g}: scale {} or zero {} is not finite", grp.scale, grp.zero));
            }
        }
        if Some(self.indices.len()) != self.rows.checked_mul(self.cols) {
            return Err(format!("{} indices for {}×{} weights", self.indices.len(), self.rows, self.cols));
        }
        let mut row = 0;
        for grp in &self.groups {
            let size = self.codebooks[grp.codebook].len();
            let block = &self.indices[row * self.cols..(row + grp.rows) * self.cols];
            if let Some(i) = block.iter().position(|&v| v as usize >= size) {
                let (r, c) = (row + i / self.cols, i % self.cols);
                return Err(format!("index {} at stored row {r}, col {c} is out of range for codebook {} of {size} entries", block[i], grp.codebook));
            }
            row += grp.rows;
        }
        if let RowOrder::Stored(perm) = &self.row_order {
            check_permutation(perm, self.rows)?;
        }
        Ok(())
    }

    /// The dense matrix in original row order (or stored order when the permutation was folded).
    pub fn decode(&self) -> Result<Matrix> {
        self.validate().map_err(Error::Invalid)?;
        let mut data = vec![0.0f32; self.rows * self.cols];
        let mut row = 0;
        for grp in &self.groups {
            let cb = &self.codebooks[grp.codebook];
            for r in row..row + grp.rows {
                let dest = match &self.row_order {
                    RowOrder::Stored(perm) => perm[r] as usize,
                    RowOrder::Original | RowOrder::Folded => r,
                };
                let src = &self.indices[r * self.cols..(r + 1) * self.cols];
                for (d, &i) in data[dest * self.cols..(dest + 1) * self.cols].iter_mut().zip(src) {
                    *d = grp.zero + grp.scale * cb[i as usize];
                }
            }
            row += grp.rows;
        }
        Matrix::new(self.rows, self.cols, data)
    }

    /// Total index bits (each group at its own width).
    pub fn index_bits(&self) -> usize {
        self.groups.iter().map(|g| g.rows * self.cols * g.bits as usize).sum()
    }

    fn has_scales(&self) -> bool {
        self.groups.iter().any(|g| g.scale != 1.0)
    }

    fn has_zeros(&self) -> bool {
        self.groups.iter().any(|g| g.zero != 0.0)
    }

    /// F16 when every scale and zero is an exact f16 value, else F32.
    fn affine_dtype(&self) -> CodebookDtype {
        let exact = |v: f32| CodebookDtype::F16.round(v) == v;
        if self.groups.iter().all(|g| exact(g.scale) && exact(g.zero)) {
            CodebookDtype::F16
        } else {
            CodebookDtype::F32
        }
    }

    /// Tensor payload bytes this matrix adds to a file (header JSON not included):
    /// `⌈index bits / 8⌉ + codebook entries · dtype bytes + (2 or 4) · groups (if scaled, and
    /// again if offset) + ⌈rows · ⌈log2 rows⌉ / 8⌉ (if the permutation is stored)`.
    pub fn payload_bytes(&self) -> usize {
        let affine = self.affine_dtype().bytes() * self.groups.len();
        self.index_bits().div_ceil(8)
            + self.codebooks.iter().map(Vec::len).sum::<usize>() * self.codebook_dtype.bytes()
            + if self.has_scales() { affine } else { 0 }
            + if self.has_zeros() { affine } else { 0 }
            + if matches!(self.row_order, RowOrder::Stored(_)) { bitpack::packed_len(self.rows, bitpack::width_for(self.rows)) } else { 0 }
    }
}

fn check_permutation(perm: &[u32], rows: usize) -> std::result::Result<(), String> {
    if perm.len() != rows {
        return Err(format!("permutation has {} entries for {rows} rows", perm.len()));
    }
    let mut seen = vec![false; rows];
    for (i, &p) in perm.iter().enumerate() {
        match seen.get_mut(p as usize) {
            Some(s) if !*s => *s = true,
            _ => return Err(format!("permutation entry {i} = {p} is out of range or repeated")),
        }
    }
    Ok(())
}

/// An uncompressed tensor kept alongside the matrices (norm gains, routers, embeddings).
#[derive(Clone, Debug, PartialEq)]
pub struct DenseTensor {
    pub shape: Vec<usize>,
    /// Exact values of `dtype` (checked when saving).
    pub data: Vec<f32>,
    pub dtype: CodebookDtype,
}

impl DenseTensor {
    /// Rounds `data` to `dtype`.
    pub fn new(shape: Vec<usize>, data: &[f32], dtype: CodebookDtype) -> DenseTensor {
        DenseTensor { shape, data: data.iter().map(|&v| dtype.round(v)).collect(), dtype }
    }

    pub fn payload_bytes(&self) -> usize {
        self.data.len() * self.dtype.bytes()
    }
}

/// Everything one compressed checkpoint file holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompressedFile {
    pub matrices: BTreeMap<String, CompressedMatrix>,
    pub dense: BTreeMap<String, DenseTensor>,
    /// Free-form provenance saved in the header (e.g. the model config hash the file belongs to).
    pub attrs: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
struct FileMeta {
    version: u32,
    matrices: BTreeMap<String, MatrixMeta>,
    dense: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    attrs: BTreeMap<String, String>,
}

/// `repeat` consecutive copies of one group shape (scales and zeros live in tensors).
#[derive(Serialize, Deserialize)]
struct GroupRun {
    #[serde(flatten)]
    group: RowGroup,
    #[serde(default = "one_usize", skip_serializing_if = "is_one")]
    repeat: usize,
}

fn one_usize() -> usize {
    1
}

fn is_one(v: &usize) -> bool {
    *v == 1
}

/// Consecutive groups with equal (rows, bits, codebook) merged into runs.
fn group_runs(groups: &[RowGroup]) -> Vec<GroupRun> {
    let mut runs: Vec<GroupRun> = Vec::new();
    for g in groups {
        match runs.last_mut() {
            Some(r) if (r.group.rows, r.group.bits, r.group.codebook) == (g.rows, g.bits, g.codebook) => r.repeat += 1,
            _ => runs.push(GroupRun { group: RowGroup { scale: 1.0, zero: 0.0, ..g.clone() }, repeat: 1 }),
        }
    }
    runs
}

#[derive(Serialize, Deserialize)]
struct MatrixMeta {
    rows: usize,
    cols: usize,
    method: Method,
    codebook_dtype: CodebookDtype,
    codebook_sizes: Vec<usize>,
    groups: Vec<GroupRun>,
    scales: bool,
    #[serde(default)]
    zeros: bool,
    /// Storage type of scales and zeros.
    #[serde(default = "f32_dtype")]
    affine_dtype: CodebookDtype,
    /// "original", "stored" or "folded".
    row_order: String,
}

fn f32_dtype() -> CodebookDtype {
    CodebookDtype::F32
}

/// Tensor-name suffixes; `:` keeps them apart from dotted parameter names.
const INDICES: &str = ":indices";
const CODEBOOKS: &str = ":codebooks";
const SCALES: &str = ":scales";
const ZEROS: &str = ":zeros";
const PERM: &str = ":perm";

/// Byte buffers in safetensors' `View` shape.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        (&self.bytes[..]).into()
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// `values` as a tensor of `dtype` (values must already be exact in it).
fn typed(dtype: CodebookDtype, values: &[f32], shape: Vec<usize>) -> Raw {
    match dtype {
        CodebookDtype::F32 => Raw { dtype: Dtype::F32, shape, bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect() },
        CodebookDtype::F16 => Raw { dtype: Dtype::F16, shape, bytes: values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect() },
    }
}

fn safetensors_dtype(dtype: CodebookDtype) -> Dtype {
    match dtype {
        CodebookDtype::F32 => Dtype::F32,
        CodebookDtype::F16 => Dtype::F16,
    }
}

/// Little-endian F32 or F16 bytes as f32 values.
fn untyped(dtype: CodebookDtype, raw: &[u8]) -> Vec<f32> {
    match dtype {
        CodebookDtype::F32 => raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        CodebookDtype::F16 => raw.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
    }
}

impl CompressedFile {
    /// Total number of weights in the compressed matrices (the denominator of bits/weight).
    pub fn compressed_weights(&self) -> usize {
        self.matrices.values().map(|m| m.rows * m.cols).sum()
    }

    /// The safetensors bytes of this file.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors: BTreeMap<String, Raw> = BTreeMap::new();
        let mut metas = BTreeMap::new();
        for (name, m) in &self.matrices {
            m.validate().map_err(|e| Error::Invalid(format!("matrix `{name}`: {e}")))?;
            for suffix in [INDICES, CODEBOOKS, SCALES, ZEROS, PERM] {
                if self.dense.contains_key(&format!("{name}{suffix}")) {
                    return Err(Error::Invalid(format!("dense tensor `{name}{suffix}` clashes with matrix `{name}`")));
                }
            }
            let mut w = BitWriter::new();
            let mut row = 0;
            for g in &m.groups {
                w.push(&m.indices[row * m.cols..(row + g.rows) * m.cols], g.bits)?;
                row += g.rows;
            }
            let packed = w.finish();
            tensors.insert(format!("{name}{INDICES}"), Raw { dtype: Dtype::U8, shape: vec![packed.len()], bytes: packed });
            let entries: Vec<f32> = m.codebooks.concat();
            tensors.insert(format!("{name}{CODEBOOKS}"), typed(m.codebook_dtype, &entries, vec![entries.len()]));
            let affine = m.affine_dtype();
            if m.has_scales() {
                let scales: Vec<f32> = m.groups.iter().map(|g| g.scale).collect();
                tensors.insert(format!("{name}{SCALES}"), typed(affine, &scales, vec![m.groups.len()]));
            }
            if m.has_zeros() {
                let zeros: Vec<f32> = m.groups.iter().map(|g| g.zero).collect();
                tensors.insert(format!("{name}{ZEROS}"), typed(affine, &zeros, vec![m.groups.len()]));
            }
            let row_order = match &m.row_order {
                RowOrder::Original => "original",
                RowOrder::Folded => "folded",
                RowOrder::Stored(perm) => {
                    let bytes = bitpack::pack(&perm[..], bitpack::width_for(m.rows))?;
                    tensors.insert(format!("{name}{PERM}"), Raw { dtype: Dtype::U8, shape: vec![bytes.len()], bytes });
                    "stored"
                }
            };
            metas.insert(
                name.clone(),
                MatrixMeta {
                    rows: m.rows,
                    cols: m.cols,
                    method: m.method,
                    codebook_dtype: m.codebook_dtype,
                    codebook_sizes: m.codebooks.iter().map(Vec::len).collect(),
                    groups: group_runs(&m.groups),
                    scales: m.has_scales(),
                    zeros: m.has_zeros(),
                    affine_dtype: affine,
                    row_order: row_order.into(),
                },
            );
        }
        for (name, t) in &self.dense {
            if t.shape.iter().product::<usize>() != t.data.len() {
                return Err(Error::Invalid(format!("dense tensor `{name}`: shape {:?} does not match {} values", t.shape, t.data.len())));
            }
            if let Some(v) = t.data.iter().find(|v| !v.is_finite() || t.dtype.round(**v) != **v) {
                return Err(Error::Invalid(format!("dense tensor `{name}`: value {v} is not a finite {:?} value", t.dtype)));
            }
            tensors.insert(name.clone(), typed(t.dtype, &t.data, t.shape.clone()));
        }
        let meta = FileMeta { version: FORMAT_VERSION, matrices: metas, dense: self.dense.keys().cloned().collect(), attrs: self.attrs.clone() };
        let json = serde_json::to_string(&meta).map_err(|e| Error::Invalid(format!("metadata: {e}")))?;
        let info = HashMap::from([(METADATA_KEY.to_string(), json)]);
        safetensors::serialize(tensors.iter().map(|(n, r)| (n.as_str(), r)), Some(info))
            .map_err(|e| Error::Invalid(format!("serializing compressed file: {e}")))
    }

    /// Writes the file; returns its size in bytes.
    pub fn save(&self, path: &Path) -> Result<u64> {
        let bytes = self.to_bytes()?;
        std::fs::write(path, &bytes).map_err(|e| Error::io(path, e))?;
        Ok(bytes.len() as u64)
    }

    pub fn load(path: &Path) -> Result<CompressedFile> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes).map_err(|reason| Error::bad_file(path, reason))
    }

    /// Parses and fully validates file bytes; the error is a sentence naming the bad tensor.
    pub fn from_bytes(bytes: &[u8]) -> std::result::Result<CompressedFile, String> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| match truncated_tensor(bytes) {
            Some(reason) => reason,
            None => format!("not a valid safetensors file: {e}"),
        })?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| format!("not a valid safetensors file: {e}"))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or_else(|| format!("no `{METADATA_KEY}` metadata: not a motley compressed file"))?;
        let meta: FileMeta = serde_json::from_str(json).map_err(|e| format!("metadata `{METADATA_KEY}`: {e}"))?;
        if !READABLE_VERSIONS.contains(&meta.version) {
            return Err(format!("format version {} (this build reads {READABLE_VERSIONS:?})", meta.version));
        }
        let mut claimed = BTreeSet::new();
        let mut get = |name: String, dtype: Dtype, len: usize, what: &str| -> std::result::Result<Vec<u8>, String> {
            let t = st.tensor(&name).map_err(|_| format!("tensor `{name}` ({what}) is missing"))?;
            if t.dtype() != dtype || t.shape() != [len] {
                return Err(format!("tensor `{name}` ({what}): expected {dtype:?} of shape [{len}], found {:?} of shape {:?}", t.dtype(), t.shape()));
            }
            claimed.insert(name);
            Ok(t.data().to_vec())
        };
        let mut out = CompressedFile::default();
        for (name, mm) in meta.matrices {
            let bad = |e: String| format!("matrix `{name}`: {e}");
            // Runs are expanded only up to the row count, so a huge `repeat` cannot allocate.
            let mut groups: Vec<RowGroup> = Vec::new();
            let mut covered = 0usize;
            for run in &mm.groups {
                for _ in 0..run.repeat {
                    covered = covered.saturating_add(run.group.rows);
                    if covered > mm.rows || run.group.rows == 0 {
                        return Err(bad(format!("row groups cover more than the {} rows or include an empty group", mm.rows)));
                    }
                    groups.push(run.group.clone());
                }
            }
            // Shape checks come before any allocation sized by the metadata: once the packed
            // length matches, rows · cols is bounded by the file size.
            let group_rows = groups.iter().try_fold(0usize, |acc, g| acc.checked_add(g.rows));
            if group_rows != Some(mm.rows) || groups.iter().any(|g| !(1..=MAX_BITS).contains(&g.bits)) {
                return Err(bad(format!("row groups do not cover the {} rows exactly or use widths outside 1..={MAX_BITS}", mm.rows)));
            }
            let index_bits = groups
                .iter()
                .try_fold(0usize, |acc, g| g.rows.checked_mul(mm.cols)?.checked_mul(g.bits as usize)?.checked_add(acc))
                .ok_or_else(|| bad(format!("shape {}×{} is too large", mm.rows, mm.cols)))?;
            let packed = get(format!("{name}{INDICES}"), Dtype::U8, index_bits.div_ceil(8), "packed indices")?;
            let total = mm.codebook_sizes.iter().try_fold(0usize, |acc, &s| acc.checked_add(s)).ok_or_else(|| bad("codebook sizes overflow".into()))?;
            let raw = get(format!("{name}{CODEBOOKS}"), safetensors_dtype(mm.codebook_dtype), total, "codebooks")?;
            let entries = untyped(mm.codebook_dtype, &raw);
            let mut codebooks = Vec::new();
            let mut at = 0;
            for &size in &mm.codebook_sizes {
                codebooks.push(entries[at..at + size].to_vec());
                at += size;
            }
            let affine = safetensors_dtype(mm.affine_dtype);
            if mm.scales {
                let raw = get(format!("{name}{SCALES}"), affine, groups.len(), "group scales")?;
                groups.iter_mut().zip(untyped(mm.affine_dtype, &raw)).for_each(|(g, v)| g.scale = v);
            }
            if mm.zeros {
                let raw = get(format!("{name}{ZEROS}"), affine, groups.len(), "group zeros")?;
                groups.iter_mut().zip(untyped(mm.affine_dtype, &raw)).for_each(|(g, v)| g.zero = v);
            }
            let row_order = match mm.row_order.as_str() {
                "original" => RowOrder::Original,
                "folded" => RowOrder::Folded,
                "stored" if meta.version <= U32_PERM_VERSION => {
                    let raw = get(format!("{name}{PERM}"), Dtype::U32, mm.rows, "row permutation")?;
                    RowOrder::Stored(raw.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
                }
                "stored" => {
                    let bits = bitpack::width_for(mm.rows);
                    let raw = get(format!("{name}{PERM}"), Dtype::U8, bitpack::packed_len(mm.rows, bits), "packed row permutation")?;
                    let mut reader = BitReader::new(&raw);
                    let perm = reader.read(mm.rows, bits).map_err(|e| bad(format!("row permutation: {e}")))?;
                    if !reader.rest_is_zero() {
                        return Err(bad("packed row permutation has non-zero padding bits".into()));
                    }
                    RowOrder::Stored(perm)
                }
                other => return Err(bad(format!("row order `{other}` (expected original, stored or folded)"))),
            };
            let mut reader = BitReader::new(&packed);
            let mut indices = Vec::with_capacity(mm.rows * mm.cols);
            for g in &groups {
                // Widths were checked to be ≤ 8 above, so every value fits a byte.
                indices.extend(reader.read(g.rows * mm.cols, g.bits).map_err(|e| bad(e.to_string()))?.into_iter().map(|v| v as u8));
            }
            if !reader.rest_is_zero() {
                return Err(bad("packed indices have non-zero padding bits".into()));
            }
            let m = CompressedMatrix { rows: mm.rows, cols: mm.cols, method: mm.method, groups, codebooks, codebook_dtype: mm.codebook_dtype, indices, row_order };
            m.validate().map_err(bad)?;
            out.matrices.insert(name, m);
        }
        for name in meta.dense {
            let t = st.tensor(&name).map_err(|_| format!("dense tensor `{name}` is missing"))?;
            let dtype = match t.dtype() {
                Dtype::F32 => CodebookDtype::F32,
                Dtype::F16 => CodebookDtype::F16,
                other => return Err(format!("dense tensor `{name}`: expected F32 or F16, found {other:?}")),
            };
            let data = untyped(dtype, t.data());
            if let Some(v) = data.iter().find(|v| !v.is_finite()) {
                return Err(format!("dense tensor `{name}`: value {v} is not finite"));
            }
            claimed.insert(name.clone());
            out.dense.insert(name, DenseTensor { shape: t.shape().to_vec(), data, dtype });
        }
        out.attrs = meta.attrs;
        if let Some(extra) = st.names().into_iter().find(|n| !claimed.contains(*n)) {
            return Err(format!("tensor `{extra}` is not described by the metadata"));
        }
        Ok(out)
    }
}

/// When safetensors rejects a file whose header is intact but whose data section is short, names
/// the first tensor that does not fit, so the message says what was lost.
fn truncated_tensor(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let available = bytes.len() - 8 - n;
    header
        .iter()
        .filter_map(|(name, v)| {
            let offsets = v.get("data_offsets")?.as_array()?;
            let (start, end) = (offsets.first()?.as_u64()? as usize, offsets.get(1)?.as_u64()? as usize);
            (end > available).then_some((start, name, end))
        })
        .min()
        .map(|(_, name, end)| format!("truncated: tensor `{name}` needs data bytes up to {end} but the file holds {available}"))
}

/// Bits per weight of a file of `file_bytes` bytes holding `n_weights` compressed weights —
/// everything in the file (header, codebooks, scales, permutations, dense tensors) is charged.
pub fn bits_per_weight(file_bytes: u64, n_weights: u64) -> f64 {
    if n_weights == 0 {
        return f64::INFINITY;
    }
    8.0 * file_bytes as f64 / n_weights as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A matrix exercising everything: two widths, a 3-entry codebook (so index 3 is invalid at
    /// 2 bits), scales, a stored permutation and an odd number of index bits.
    fn sample() -> CompressedMatrix {
        let (rows, cols) = (5, 7);
        let groups = vec![
            RowGroup { rows: 2, bits: 2, codebook: 0, scale: 0.5, zero: 0.0 },
            RowGroup { rows: 3, bits: 3, codebook: 1, scale: 2.0, zero: 0.0 },
        ];
        let codebooks = vec![vec![-1.0, 0.25, 1.5], vec![-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0]];
        let indices: Vec<u8> = (0..rows * cols).map(|i| if i < 2 * cols { (i % 3) as u8 } else { (i * 5 % 8) as u8 }).collect();
        CompressedMatrix::new(rows, cols, Method::Jlcm, groups, codebooks, CodebookDtype::F16, indices, RowOrder::Stored(vec![3, 0, 4, 1, 2])).unwrap()
    }

    fn sample_file() -> CompressedFile {
        let mut f = CompressedFile::default();
        f.matrices.insert("layers.0.mlp.w1".into(), sample());
        let mut plain = sample();
        plain.row_order = RowOrder::Folded;
        plain.groups.iter_mut().for_each(|g| g.scale = 1.0);
        plain.codebook_dtype = CodebookDtype::F32;
        f.matrices.insert("layers.0.mlp.w2".into(), plain);
        f.dense.insert("layers.0.norm.weight".into(), DenseTensor { shape: vec![3], data: vec![1.0, 0.5, -2.0], dtype: CodebookDtype::F32 });
        f
    }

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("motley-compress-{}-{name}.safetensors", std::process::id()))
    }

    /// Byte range of tensor `name` inside the file.
    fn data_range(bytes: &[u8], name: &str) -> std::ops::Range<usize> {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let off = &header[name]["data_offsets"];
        8 + n + off[0].as_u64().unwrap() as usize..8 + n + off[1].as_u64().unwrap() as usize
    }

    #[test]
    fn decode_applies_scales_codebooks_and_permutation() {
        let m = sample();
        let d = m.decode().unwrap();
        // Stored row 0 (group 0, scale 0.5) is original row 3; its first index is 0 → −1 · 0.5.
        assert_eq!(d.row(3)[0], -0.5);
        // Stored row 2 (group 1, scale 2) is original row 4; index (14·5) % 8 = 6 → 3 · 2.
        assert_eq!(d.row(4)[0], 6.0);
    }

    #[test]
    fn file_round_trip_is_exact_and_size_matches_the_formula() {
        let f = sample_file();
        let path = temp("roundtrip");
        let size = f.save(&path).unwrap();
        let back = CompressedFile::load(&path).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!(back, f);
        let bytes = f.to_bytes().unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        let payload: usize = f.matrices.values().map(CompressedMatrix::payload_bytes).sum::<usize>() + 3 * 4;
        assert_eq!(size, 8 + header + payload as u64);
        // w1: 2·7·2 + 3·7·3 = 91 index bits → 12 bytes; 11 f16 entries; 2 scales (exact in f16,
        // so stored as f16); 5-entry perm at ⌈log2 5⌉ = 3 bits → 15 bits → 2 bytes.
        assert_eq!(f.matrices["layers.0.mlp.w1"].payload_bytes(), 12 + 22 + 4 + 2);
        // w2: no scales, folded permutation, f32 codebooks.
        assert_eq!(f.matrices["layers.0.mlp.w2"].payload_bytes(), 12 + 44);
        assert_eq!(bits_per_weight(size, f.compressed_weights() as u64), 8.0 * size as f64 / 70.0);
    }

    #[test]
    fn corrupt_files_give_errors_naming_the_tensor() {
        let good = sample_file().to_bytes().unwrap();
        let err = |bytes: &[u8]| CompressedFile::from_bytes(bytes).unwrap_err();

        // safetensors orders data by dtype, so find the tensor stored last.
        let names = ["layers.0.mlp.w1:indices", "layers.0.mlp.w1:codebooks", "layers.0.mlp.w1:scales", "layers.0.mlp.w1:perm"];
        let names = names.into_iter().chain(["layers.0.mlp.w2:indices", "layers.0.mlp.w2:codebooks", "layers.0.norm.weight"]);
        let last = names.max_by_key(|n| data_range(&good, n).end).unwrap();
        let e = err(&good[..good.len() - 5]);
        assert!(e.contains("truncated") && e.contains(&format!("`{last}`")), "{e}");
        assert!(err(&good[..4]).contains("not a valid safetensors file"));

        // Index 3 in the 2-bit group whose codebook has 3 entries.
        let mut bad = good.clone();
        bad[data_range(&good, "layers.0.mlp.w1:indices").start] |= 0b11;
        let e = err(&bad);
        assert!(e.contains("layers.0.mlp.w1") && e.contains("index 3 at stored row 0, col 0") && e.contains("3 entries"), "{e}");

        // Metadata claims 4 entries in codebook 0 (same byte length, so the header still parses).
        let needle = br#"codebook_sizes\":[3,8]"#;
        let at = good.windows(needle.len()).position(|w| w == needle).expect("metadata holds the sizes");
        let mut bad = good.clone();
        bad[at + needle.len() - 4] = b'4';
        let e = err(&bad);
        assert!(e.contains("layers.0.mlp.w1:codebooks") && e.contains("shape [12]") && e.contains("shape [11]"), "{e}");

        // The permutation [3, 0, 4, 1, 2] at 3 bits: byte 0 holds entries 0, 1 and two bits of 2.
        let perm = data_range(&good, "layers.0.mlp.w1:perm");
        assert_eq!(perm.len(), 2);
        // Entry 0 set to 0, repeating entry 1.
        let mut bad = good.clone();
        bad[perm.start] = 0;
        let e = err(&bad);
        assert!(e.contains("layers.0.mlp.w1") && e.contains("permutation entry 1 = 0"), "{e}");
        // Entry 0 set to 7, which 3 bits can hold but 5 rows cannot.
        let mut bad = good.clone();
        bad[perm.start] |= 0b111;
        let e = err(&bad);
        assert!(e.contains("layers.0.mlp.w1") && e.contains("permutation entry 0 = 7 is out of range"), "{e}");
        // A set padding bit after the 15 permutation bits.
        let mut bad = good.clone();
        bad[perm.start + 1] |= 0x80;
        let e = err(&bad);
        assert!(e.contains("layers.0.mlp.w1") && e.contains("permutation has non-zero padding"), "{e}");

        // Non-zero padding after the last index.
        let mut bad = good.clone();
        bad[data_range(&good, "layers.0.mlp.w2:indices").end - 1] |= 0x80;
        assert!(err(&bad).contains("padding"));

        // A non-finite codebook entry.
        let mut bad = good.clone();
        let cb = data_range(&good, "layers.0.mlp.w2:codebooks");
        bad[cb.start..cb.start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        let e = err(&bad);
        assert!(e.contains("layers.0.mlp.w2") && e.contains("not a finite"), "{e}");

        // Through `load`, the path is named too.
        let path = temp("corrupt");
        std::fs::write(&path, &good[..good.len() - 5]).unwrap();
        let e = CompressedFile::load(&path).unwrap_err().to_string();
        std::fs::remove_file(&path).ok();
        assert!(e.contains("motley-compress") && e.contains("truncated"), "{e}");
    }

    /// `f` with its metadata claiming `version`, and with permutations as U32 of shape [rows]
    /// (as versions 1 and 2 wrote them) when `u32_perms`.
    fn as_version(f: &CompressedFile, version: u32, u32_perms: bool) -> Vec<u8> {
        let bytes = f.to_bytes().unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: BTreeMap<String, Raw> =
            st.tensors().into_iter().map(|(n, v)| (n, Raw { dtype: v.dtype(), shape: v.shape().to_vec(), bytes: v.data().to_vec() })).collect();
        if u32_perms {
            for (name, m) in &f.matrices {
                if let RowOrder::Stored(perm) = &m.row_order {
                    let bytes = perm.iter().flat_map(|p| p.to_le_bytes()).collect();
                    tensors.insert(format!("{name}{PERM}"), Raw { dtype: Dtype::U32, shape: vec![perm.len()], bytes });
                }
            }
        }
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let json = &header.metadata().as_ref().unwrap()[METADATA_KEY];
        let current = format!("\"version\":{FORMAT_VERSION},");
        assert!(json.contains(&current), "{json}");
        let json = json.replace(&current, &format!("\"version\":{version},"));
        safetensors::serialize(tensors.iter().map(|(n, r)| (n.as_str(), r)), Some(HashMap::from([(METADATA_KEY.to_string(), json)]))).unwrap()
    }

    #[test]
    fn version_2_files_with_u32_permutations_still_load_and_unknown_versions_are_named() {
        let f = sample_file();
        let v2 = as_version(&f, 2, true);
        assert_eq!(CompressedFile::from_bytes(&v2).unwrap(), f);
        // The packed permutation saves 4 · 5 − 2 bytes of payload (the header differs only in
        // the version digit, the dtype and the shape).
        let v3 = f.to_bytes().unwrap();
        assert!(v2.len() >= v3.len() + 18, "{} vs {}", v2.len(), v3.len());
        // A version 3 file whose metadata claims version 2 expects U32 and says so.
        let e = CompressedFile::from_bytes(&as_version(&f, 2, false)).unwrap_err();
        assert!(e.contains("layers.0.mlp.w1:perm") && e.contains("expected U32"), "{e}");
        let e = CompressedFile::from_bytes(&as_version(&f, 4, false)).unwrap_err();
        assert!(e.contains("format version 4") && e.contains("[1, 2, 3]"), "{e}");
    }

    #[test]
    fn constructor_rejects_inconsistent_matrices() {
        let m = sample();
        let bad = |f: &dyn Fn(&mut CompressedMatrix)| {
            let mut c = m.clone();
            f(&mut c);
            CompressedMatrix::new(c.rows, c.cols, c.method, c.groups, c.codebooks, c.codebook_dtype, c.indices, c.row_order).unwrap_err().to_string()
        };
        assert!(bad(&|c| c.groups[0].rows = 3).contains("cover 6 rows"));
        assert!(bad(&|c| c.indices.pop().map(drop).unwrap_or(())).contains("34 indices"));
        assert!(bad(&|c| c.codebooks[0][0] = 0.1).contains("not a finite F16"));
        assert!(bad(&|c| c.groups[1].codebook = 2).contains("codebook 2 of 2"));
        assert!(bad(&|c| c.groups[0].bits = 1).contains("more than 1 bits"));
    }
}
