//! Round-to-nearest uniform quantization: the no-data, no-codebook baseline.
//!
//! Each row, or each block of `group_size` columns in a row, gets `2^B` evenly spaced levels from
//! its minimum to its maximum (asymmetric): `ŵ = zero + scale · q`, `q ∈ 0..2^B`, with
//! `zero = min` and `scale = (max − min) / (2^B − 1)`. Scale and zero are rounded to f16 before
//! quantizing, as a storage format would keep them, so the error and the overhead accounting
//! (32 bits per group) describe the same thing. With a fractional `bits`, blocks of
//! [`WIDTH_BLOCK_ROWS`] consecutive rows are the units of the two-width mix (see
//! [`bits`](super::bits)): per-row widths would be slightly more accurate, but every change of
//! width between neighbouring rows costs a row-group entry in the saved header.
//!
//! Saving: [`RtnMatrix::to_compressed`] turns per-row (scale, zero) into the file format's affine
//! row groups (`zero + scale · q` over the shared codebook `0, 1, …, 2^B − 1`).

use super::bits;
use super::format::{CodebookDtype, CompressedMatrix, Method, RowGroup, RowOrder};
use super::matrix::Matrix;
use crate::{Error, Result};
use half::f16;
use rayon::prelude::*;

#[derive(Clone, Debug)]
pub struct RtnConfig {
    /// Average index bits per weight.
    pub bits: f32,
    /// Columns per scale/zero pair; `None` = one pair per row.
    pub group_size: Option<usize>,
}

/// A quantized matrix: per-row widths, codes and one (scale, zero) per row-group of columns.
#[derive(Clone, Debug)]
pub struct RtnMatrix {
    pub rows: usize,
    pub cols: usize,
    pub group_size: usize,
    pub row_bits: Vec<u8>,
    pub codes: Vec<u8>,
    /// `rows × ⌈cols / group_size⌉`, row-major.
    pub scales: Vec<f32>,
    pub zeros: Vec<f32>,
}

impl RtnMatrix {
    pub fn dequantize(&self) -> Result<Matrix> {
        let per_row = self.cols.div_ceil(self.group_size);
        let data = self
            .codes
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let g = (i / self.cols) * per_row + (i % self.cols) / self.group_size;
                self.zeros[g] + self.scales[g] * q as f32
            })
            .collect();
        Matrix::new(self.rows, self.cols, data)
    }

    /// The file-format form: one affine group per row over a shared integer codebook per width.
    /// Only per-row quantization (`group_size == cols`) fits row groups; column-blocked RTN is
    /// refused rather than silently re-quantized.
    pub fn to_compressed(&self) -> Result<CompressedMatrix> {
        if self.group_size != self.cols {
            return Err(Error::Invalid(format!(
                "RTN with {} columns per (scale, zero) cannot be saved: the file format has one (scale, zero) per row; quantize with group_size = None",
                self.group_size
            )));
        }
        let mut widths = self.row_bits.clone();
        widths.sort_unstable();
        widths.dedup();
        let codebooks: Vec<Vec<f32>> = widths.iter().map(|&b| (0..1u32 << b).map(|q| q as f32).collect()).collect();
        let groups = (0..self.rows)
            .map(|r| {
                let codebook = widths.iter().position(|&b| b == self.row_bits[r]).unwrap_or(0);
                RowGroup { rows: 1, bits: self.row_bits[r], codebook, scale: self.scales[r], zero: self.zeros[r] }
            })
            .collect();
        CompressedMatrix::new(self.rows, self.cols, Method::Rtn, groups, codebooks, CodebookDtype::F16, self.codes.clone(), RowOrder::Original)
    }

    /// Index bits plus 2 × 16 bits per (scale, zero) pair, per weight.
    pub fn bits_per_weight(&self) -> f64 {
        let index: f64 = self.row_bits.iter().map(|&b| b as f64 * self.cols as f64).sum();
        (index + 32.0 * self.scales.len() as f64) / (self.rows * self.cols) as f64
    }
}

/// Rows per unit of the width mix at fractional bits.
pub const WIDTH_BLOCK_ROWS: usize = 16;

/// Quantizes one row at `bits`; returns codes, scales, zeros and the squared error.
fn quantize_row(row: &[f32], bits: u8, group_size: usize) -> (Vec<u8>, Vec<f32>, Vec<f32>, f64) {
    let levels = ((1u32 << bits) - 1) as f32;
    let (mut codes, mut scales, mut zeros, mut err) = (Vec::with_capacity(row.len()), Vec::new(), Vec::new(), 0.0);
    for block in row.chunks(group_size) {
        let (lo, hi) = block.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let zero = f16::from_f32(lo).to_f32();
        let scale = f16::from_f32((hi - lo) / levels).to_f32();
        for &v in block {
            let q = if scale > 0.0 { ((v - zero) / scale).round().clamp(0.0, levels) } else { 0.0 };
            codes.push(q as u8);
            err += ((zero + scale * q) as f64 - v as f64).powi(2);
        }
        scales.push(scale);
        zeros.push(zero);
    }
    (codes, scales, zeros, err)
}

pub fn quantize_rtn(w: &Matrix, cfg: &RtnConfig) -> Result<RtnMatrix> {
    let (lo, hi) = bits::bit_range(cfg.bits)?;
    let group_size = cfg.group_size.unwrap_or(w.cols);
    if group_size == 0 {
        return Err(Error::config("group_size", 0, "at least 1 column"));
    }
    let at = |b: u8| -> Vec<_> { (0..w.rows).into_par_iter().map(|r| quantize_row(w.row(r), b, group_size)).collect() };
    let low = at(lo);
    let row_bits = if hi > lo {
        let high = at(hi);
        let gains: Vec<f64> = low.chunks(WIDTH_BLOCK_ROWS).zip(high.chunks(WIDTH_BLOCK_ROWS)).map(|(l, h)| l.iter().zip(h).map(|(l, h)| l.3 - h.3).sum()).collect();
        let sizes: Vec<usize> = (0..w.rows).step_by(WIDTH_BLOCK_ROWS).map(|r| WIDTH_BLOCK_ROWS.min(w.rows - r) * w.cols).collect();
        let block_bits = bits::allocate(&sizes, &gains, cfg.bits)?;
        (0..w.rows).map(|r| block_bits[r / WIDTH_BLOCK_ROWS]).collect()
    } else {
        vec![lo; w.rows]
    };
    let mut out = RtnMatrix { rows: w.rows, cols: w.cols, group_size, row_bits, codes: Vec::new(), scales: Vec::new(), zeros: Vec::new() };
    for (r, row) in low.into_iter().enumerate() {
        let (codes, scales, zeros, _) = if out.row_bits[r] == lo { row } else { quantize_row(w.row(r), hi, group_size) };
        out.codes.extend(codes);
        out.scales.extend(scales);
        out.zeros.extend(zeros);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_on_grid_values_and_error_halves_per_bit() {
        // Values already on a 2-bit grid from 0 to 3 are reproduced exactly.
        let w = Matrix::new(1, 4, vec![0.0, 1.0, 2.0, 3.0]).unwrap();
        let q = quantize_rtn(&w, &RtnConfig { bits: 2.0, group_size: None }).unwrap();
        assert_eq!(q.dequantize().unwrap(), w);
        // Two width blocks of 16 rows, so 2.5 bits gives one block each width.
        let ramp = Matrix::new(32, 256, (0..32 * 256).map(|i| (i as f32 * 0.37).sin() * (1.0 + (i / 256) as f32 * 0.1)).collect()).unwrap();
        let err = |b: f32| {
            let d = quantize_rtn(&ramp, &RtnConfig { bits: b, group_size: Some(64) }).unwrap().dequantize().unwrap();
            d.data.iter().zip(&ramp.data).map(|(a, b)| (a - b).powi(2)).sum::<f32>()
        };
        assert!(err(3.0) < 0.4 * err(2.0) && err(4.0) < 0.4 * err(3.0), "{} {} {}", err(2.0), err(3.0), err(4.0));
        assert!(err(2.5) < err(2.0) && err(2.5) > err(3.0));
    }

    #[test]
    fn saved_form_decodes_to_the_same_matrix_and_round_trips() {
        let w = Matrix::new(40, 24, (0..960).map(|i| ((i * 7919) % 113) as f32 * 0.01 - 0.5).collect()).unwrap();
        for bits in [2.0, 2.5, 4.0] {
            let q = quantize_rtn(&w, &RtnConfig { bits, group_size: None }).unwrap();
            let c = q.to_compressed().unwrap();
            assert_eq!(c.decode().unwrap(), q.dequantize().unwrap());
            let mut f = crate::compress::CompressedFile::default();
            f.matrices.insert("w".into(), c.clone());
            let bytes = f.to_bytes().unwrap();
            assert_eq!(crate::compress::CompressedFile::from_bytes(&bytes).unwrap().matrices["w"], c);
            // f16 (scale, zero) per row: 32 bits per row, as `bits_per_weight` counts.
            let codebooks = c.codebooks.iter().map(Vec::len).sum::<usize>() * 2;
            assert_eq!(c.payload_bytes(), c.index_bits().div_ceil(8) + 40 * 4 + codebooks);
            // Widths change only at block boundaries, so the header stays small.
            assert!(q.row_bits.chunks(WIDTH_BLOCK_ROWS).all(|b| b.iter().all(|&x| x == b[0])));
        }
        let blocked = quantize_rtn(&w, &RtnConfig { bits: 2.0, group_size: Some(8) }).unwrap();
        assert!(blocked.to_compressed().unwrap_err().to_string().contains("group_size = None"));
    }

    #[test]
    fn overhead_is_counted() {
        let w = Matrix::new(4, 64, vec![0.5; 256]).unwrap();
        let q = quantize_rtn(&w, &RtnConfig { bits: 3.0, group_size: Some(32) }).unwrap();
        assert_eq!(q.bits_per_weight(), 3.0 + 1.0);
        assert!(quantize_rtn(&w, &RtnConfig { bits: 3.0, group_size: Some(0) }).is_err());
    }
}
