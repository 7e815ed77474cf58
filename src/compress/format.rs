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
//! - `NAME:scales` (F32, one per group): only when some scale is not 1;
//! - `NAME:perm` (U32, one per row): only when the row order is [`RowOrder::Stored`].
//!
//! Everything else (shape, method, groups, codebook sizes, dtype, row order, the list of dense
//! tensors) is JSON under the `__metadata__` key [`METADATA_KEY`]. Loading checks every field and
//! every index and names the tensor in the error.

use super::bitpack::{BitReader, BitWriter};
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
const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Kmeans,
    Jlcm,
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
    /// Decoded weight = `scale · codebooks[codebook][index]`. Stored in the file as f32.
    #[serde(skip, default = "one")]
    pub scale: f32,
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
            if !grp.scale.is_finite() {
                return Err(format!("group {g}: scale {} is not finite", grp.scale));
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
                    *d = grp.scale * cb[i as usize];
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

    /// Tensor payload bytes this matrix adds to a file (header JSON not included):
    /// `⌈index bits / 8⌉ + codebook entries · dtype bytes + 4 · groups (if scaled) + 4 · rows (if
    /// the permutation is stored)`.
    pub fn payload_bytes(&self) -> usize {
        self.index_bits().div_ceil(8)
            + self.codebooks.iter().map(Vec::len).sum::<usize>() * self.codebook_dtype.bytes()
            + if self.has_scales() { 4 * self.groups.len() } else { 0 }
            + if matches!(self.row_order, RowOrder::Stored(_)) { 4 * self.rows } else { 0 }
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

/// A small uncompressed tensor kept alongside the matrices (norm weights, biases).
#[derive(Clone, Debug, PartialEq)]
pub struct DenseTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Everything one compressed checkpoint file holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompressedFile {
    pub matrices: BTreeMap<String, CompressedMatrix>,
    pub dense: BTreeMap<String, DenseTensor>,
}

#[derive(Serialize, Deserialize)]
struct FileMeta {
    version: u32,
    matrices: BTreeMap<String, MatrixMeta>,
    dense: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct MatrixMeta {
    rows: usize,
    cols: usize,
    method: Method,
    codebook_dtype: CodebookDtype,
    codebook_sizes: Vec<usize>,
    groups: Vec<RowGroup>,
    scales: bool,
    /// "original", "stored" or "folded".
    row_order: String,
}

/// Tensor-name suffixes; `:` keeps them apart from dotted parameter names.
const INDICES: &str = ":indices";
const CODEBOOKS: &str = ":codebooks";
const SCALES: &str = ":scales";
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

fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(f32::to_le_bytes).collect()
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
            for suffix in [INDICES, CODEBOOKS, SCALES, PERM] {
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
            let (dtype, bytes) = match m.codebook_dtype {
                CodebookDtype::F32 => (Dtype::F32, f32_bytes(entries.iter().copied())),
                CodebookDtype::F16 => (Dtype::F16, entries.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect()),
            };
            tensors.insert(format!("{name}{CODEBOOKS}"), Raw { dtype, shape: vec![entries.len()], bytes });
            if m.has_scales() {
                let bytes = f32_bytes(m.groups.iter().map(|g| g.scale));
                tensors.insert(format!("{name}{SCALES}"), Raw { dtype: Dtype::F32, shape: vec![m.groups.len()], bytes });
            }
            let row_order = match &m.row_order {
                RowOrder::Original => "original",
                RowOrder::Folded => "folded",
                RowOrder::Stored(perm) => {
                    let bytes = perm.iter().flat_map(|p| p.to_le_bytes()).collect();
                    tensors.insert(format!("{name}{PERM}"), Raw { dtype: Dtype::U32, shape: vec![m.rows], bytes });
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
                    groups: m.groups.clone(),
                    scales: m.has_scales(),
                    row_order: row_order.into(),
                },
            );
        }
        for (name, t) in &self.dense {
            if t.shape.iter().product::<usize>() != t.data.len() {
                return Err(Error::Invalid(format!("dense tensor `{name}`: shape {:?} does not match {} values", t.shape, t.data.len())));
            }
            tensors.insert(name.clone(), Raw { dtype: Dtype::F32, shape: t.shape.clone(), bytes: f32_bytes(t.data.iter().copied()) });
        }
        let meta = FileMeta { version: FORMAT_VERSION, matrices: metas, dense: self.dense.keys().cloned().collect() };
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
        if meta.version != FORMAT_VERSION {
            return Err(format!("format version {} (this build reads {FORMAT_VERSION})", meta.version));
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
            // Shape checks come before any allocation sized by the metadata: once the packed
            // length matches, rows · cols is bounded by the file size.
            let group_rows = mm.groups.iter().try_fold(0usize, |acc, g| acc.checked_add(g.rows));
            if group_rows != Some(mm.rows) || mm.groups.iter().any(|g| !(1..=MAX_BITS).contains(&g.bits)) {
                return Err(bad(format!("row groups do not cover the {} rows exactly or use widths outside 1..={MAX_BITS}", mm.rows)));
            }
            let index_bits = mm
                .groups
                .iter()
                .try_fold(0usize, |acc, g| g.rows.checked_mul(mm.cols)?.checked_mul(g.bits as usize)?.checked_add(acc))
                .ok_or_else(|| bad(format!("shape {}×{} is too large", mm.rows, mm.cols)))?;
            let packed = get(format!("{name}{INDICES}"), Dtype::U8, index_bits.div_ceil(8), "packed indices")?;
            let total = mm.codebook_sizes.iter().try_fold(0usize, |acc, &s| acc.checked_add(s)).ok_or_else(|| bad("codebook sizes overflow".into()))?;
            let (dtype, width) = match mm.codebook_dtype {
                CodebookDtype::F32 => (Dtype::F32, 4),
                CodebookDtype::F16 => (Dtype::F16, 2),
            };
            let raw = get(format!("{name}{CODEBOOKS}"), dtype, total, "codebooks")?;
            let entries: Vec<f32> = raw
                .chunks_exact(width)
                .map(|b| match mm.codebook_dtype {
                    CodebookDtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    CodebookDtype::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
                })
                .collect();
            let mut codebooks = Vec::new();
            let mut at = 0;
            for &size in &mm.codebook_sizes {
                codebooks.push(entries[at..at + size].to_vec());
                at += size;
            }
            let mut groups = mm.groups;
            if mm.scales {
                let raw = get(format!("{name}{SCALES}"), Dtype::F32, groups.len(), "group scales")?;
                for (g, b) in groups.iter_mut().zip(raw.chunks_exact(4)) {
                    g.scale = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            let row_order = match mm.row_order.as_str() {
                "original" => RowOrder::Original,
                "folded" => RowOrder::Folded,
                "stored" => {
                    let raw = get(format!("{name}{PERM}"), Dtype::U32, mm.rows, "row permutation")?;
                    RowOrder::Stored(raw.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
                }
                other => return Err(bad(format!("row order `{other}` (expected original, stored or folded)"))),
            };
            let mut reader = BitReader::new(&packed);
            let mut indices = Vec::with_capacity(mm.rows * mm.cols);
            for g in &groups {
                indices.extend(reader.read(g.rows * mm.cols, g.bits).map_err(|e| bad(e.to_string()))?);
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
            if t.dtype() != Dtype::F32 {
                return Err(format!("dense tensor `{name}`: expected F32, found {:?}", t.dtype()));
            }
            let data: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            claimed.insert(name.clone());
            out.dense.insert(name, DenseTensor { shape: t.shape().to_vec(), data });
        }
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
            RowGroup { rows: 2, bits: 2, codebook: 0, scale: 0.5 },
            RowGroup { rows: 3, bits: 3, codebook: 1, scale: 2.0 },
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
        f.dense.insert("layers.0.norm.weight".into(), DenseTensor { shape: vec![3], data: vec![1.0, 0.5, -2.0] });
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
        // w1: 2·7·2 + 3·7·3 = 91 index bits → 12 bytes; 11 f16 entries; 2 scales; 5-entry perm.
        assert_eq!(f.matrices["layers.0.mlp.w1"].payload_bytes(), 12 + 22 + 8 + 20);
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

        // A repeated permutation entry.
        let mut bad = good.clone();
        let perm = data_range(&good, "layers.0.mlp.w1:perm");
        bad[perm.start..perm.start + 4].copy_from_slice(&0u32.to_le_bytes());
        let e = err(&bad);
        assert!(e.contains("layers.0.mlp.w1") && e.contains("permutation"), "{e}");

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
