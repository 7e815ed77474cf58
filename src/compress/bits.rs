//! Fractional bit widths by mixing two integer widths.
//!
//! How 2.5 bits is reached: every compressor splits its matrix into units (RTN: rows; k-means and
//! JLCM: row groups) and gives each unit either `⌊b⌋` or `⌊b⌋ + 1` index bits. Units are promoted
//! greedily in order of error reduction per weight (measured by the caller at both widths) while
//! the average index width stays `≤ b`. With unequal unit sizes the average can land a little
//! below `b`; [`average_bits`] reports what was reached, and the file-size bits/weight (which also
//! counts codebooks and scales) is the number to quote.

use crate::{Error, Result};

/// The widest index we pack: codebooks have at most 256 entries, so indices fit a byte.
pub const MAX_BITS: u8 = 8;

/// `(⌊b⌋, ⌈b⌉)` for a target average index width; errors unless `1 ≤ b ≤ 8`.
pub fn bit_range(target: f32) -> Result<(u8, u8)> {
    if !(target.is_finite() && (1.0..=MAX_BITS as f32).contains(&target)) {
        return Err(Error::config("bits", target, format!("a number of index bits between 1 and {MAX_BITS}")));
    }
    Ok((target.floor() as u8, target.ceil() as u8))
}

/// Per-unit widths for units of `sizes[i]` weights whose error drops by `gains[i]` when promoted
/// from `⌊target⌋` to `⌈target⌉` bits. Ties go to the earlier unit, so the result is deterministic.
pub fn allocate(sizes: &[usize], gains: &[f64], target: f32) -> Result<Vec<u8>> {
    let (lo, hi) = bit_range(target)?;
    let mut bits = vec![lo; sizes.len()];
    if lo == hi {
        return Ok(bits);
    }
    let total: usize = sizes.iter().sum();
    let budget = target as f64 * total as f64;
    let mut used = lo as f64 * total as f64;
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    let per_weight = |i: usize| gains[i] / sizes[i].max(1) as f64;
    order.sort_by(|&a, &b| per_weight(b).total_cmp(&per_weight(a)).then(a.cmp(&b)));
    for i in order {
        if used + sizes[i] as f64 <= budget + 1e-9 {
            bits[i] = hi;
            used += sizes[i] as f64;
        }
    }
    Ok(bits)
}

/// The size-weighted average of per-unit widths.
pub fn average_bits(sizes: &[usize], bits: &[u8]) -> f64 {
    let total: usize = sizes.iter().sum();
    sizes.iter().zip(bits).map(|(&s, &b)| s as f64 * b as f64).sum::<f64>() / total.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_and_half_for_equal_units_and_best_gains_promoted() {
        let bits = allocate(&[10, 10, 10, 10], &[1.0, 4.0, 3.0, 2.0], 2.5).unwrap();
        assert_eq!(bits, vec![2, 3, 3, 2]);
        assert_eq!(average_bits(&[10; 4], &bits), 2.5);
    }

    #[test]
    fn never_exceeds_the_budget_and_rejects_bad_targets() {
        let sizes = [7, 13, 5];
        let bits = allocate(&sizes, &[1.0, 1.0, 1.0], 2.5).unwrap();
        assert!(average_bits(&sizes, &bits) <= 2.5);
        assert_eq!(allocate(&sizes, &[0.0; 3], 3.0).unwrap(), vec![3, 3, 3]);
        assert!(bit_range(0.5).is_err() && bit_range(9.0).is_err() && bit_range(f32::NAN).is_err());
    }
}
