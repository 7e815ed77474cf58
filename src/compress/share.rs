//! Bits per expert by routed share (`motley compress --expert-bits share`).
//!
//! An expert that few tokens reach contributes little to the model's loss, so its bits are better
//! spent on a busy expert. The rule, with the expert matrices' total index bits fixed at what a
//! uniform `b` would spend:
//!
//! minimise `Σ_e s_e · h_e · D(b_e)` subject to `Σ_e n_e · b_e ≤ b · Σ_e n_e`, integer `b_e ∈ 1..=8`,
//!
//! where `s_e` is expert `e`'s routed share in its layer, `h_e` its width, `n_e = 3 · d_model · h_e`
//! its weights (gate/up and down together: both get `b_e`), and `D(b)` the relative error of a
//! `b`-bit quantizer. The model behind it: a token routed to `e` gets an output error of about
//! `D(b_e)` times the expert's output energy, and that energy grows with the number of hidden
//! units summed, `h_e`; every routed token weighs the same. A bit costs `n_e ∝ h_e` index bits,
//! so the width cancels and the loss reduction per index bit is `s_e · (D(b_e) − D(b_e + 1))`
//! (up to a constant): bits follow the share alone. (Charging relative error per weight instead,
//! `s_e · ΔD / n_e`, moved bits from wide to narrow experts and lost to uniform bits on the
//! larger benchmark model: k-means at 2 bits, Δppl +4.5 vs +3.1.) `D` is the Lloyd–Max
//! distortion of a unit Gaussian ([`distortion`]), the optimum a per-codebook k-means approaches;
//! only its ratios matter (3.1× per bit at 1 → 2 bits, 3.6× at 3 → 4, 4× in the limit), so a
//! share must be about 3× another's before it earns a whole bit more at the low rates.
//!
//! Solved greedily (marginal analysis): start every expert at 1 bit and repeatedly give one more
//! bit to the expert with the largest loss reduction per index bit, among those the budget still
//! admits. `D` is convex, so marginal gains only fall as an expert gains bits; the greedy stops
//! when no expert fits, so the average is at most `b` and below it by less than
//! `min_e n_e / Σ n_e`, the minimum taken over the experts below 8 bits (all of them at the
//! targets of interest). Consequence: no expert gets fewer bits than one that is less busy and
//! no narrower (at equal bits its gain is larger, and it fits whenever the other does) — in
//! particular than a less busy one of the same width.
//!
//! Shares come from the calibration forward's routing counts, smoothed by one pseudo-token per
//! expert (`(tokens_e + 1) / (Σ tokens + E)` per layer) so an expert that calibration never
//! reached still gets a nonzero share.

use super::bits::{bit_range, MAX_BITS};
use crate::{Error, Result};

/// Mean squared error of the optimal `b`-level scalar quantizer of a unit Gaussian, `b = 1..=6`
/// (Lloyd–Max, computed by Lloyd iterations on the exact density).
const LLOYD_MAX: [f64; 6] = [0.363_380, 0.117_482, 0.034_548, 0.009_501, 0.002_505, 0.000_644];

/// Relative error of a `bits`-bit quantizer: [`LLOYD_MAX`], then the high-rate limit
/// `(√3 π / 2) · 4^-b` (Panter–Dite) from 7 bits on; `D(0) = 1` (the weight dropped).
pub fn distortion(bits: u8) -> f64 {
    match bits {
        0 => 1.0,
        1..=6 => LLOYD_MAX[bits as usize - 1],
        b => 3f64.sqrt() * std::f64::consts::PI / 2.0 * 4f64.powi(-(b as i32)),
    }
}

/// Smoothed routed shares of each layer's experts from routing counts `tokens[layer][expert]`.
pub fn shares(tokens: &[Vec<usize>]) -> Vec<Vec<f64>> {
    tokens
        .iter()
        .map(|layer| {
            let total = layer.iter().sum::<usize>() + layer.len();
            layer.iter().map(|&t| (t + 1) as f64 / total as f64).collect()
        })
        .collect()
}

/// Integer bits per expert (the rule of the module doc) for experts of `sizes[e]` weights and
/// routed share `share[e]`, spending at most `target` index bits per weight on average.
pub fn allocate(sizes: &[usize], share: &[f64], target: f32) -> Result<Vec<u8>> {
    bit_range(target)?;
    if sizes.len() != share.len() || sizes.contains(&0) {
        return Err(Error::Invalid(format!("{} expert sizes (none may be 0) for {} shares", sizes.len(), share.len())));
    }
    if let Some(s) = share.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
        return Err(Error::config("expert share", s, "a finite share ≥ 0"));
    }
    let total: usize = sizes.iter().sum();
    let budget = (target as f64 * total as f64).floor() as usize;
    let mut bits = vec![1u8; sizes.len()];
    let mut used = total;
    loop {
        let gain = |e: usize| share[e] * (distortion(bits[e]) - distortion(bits[e] + 1));
        let best = (0..sizes.len())
            .filter(|&e| bits[e] < MAX_BITS && used + sizes[e] <= budget)
            // Largest gain; ties to the earlier expert, so the result is deterministic.
            .max_by(|&a, &b| gain(a).total_cmp(&gain(b)).then(b.cmp(&a)));
        let Some(e) = best else { break };
        bits[e] += 1;
        used += sizes[e];
    }
    Ok(bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::bits::average_bits;
    use crate::rng::Rng;

    #[test]
    fn distortion_falls_by_a_shrinking_factor_toward_four() {
        let ratios: Vec<f64> = (1..MAX_BITS).map(|b| distortion(b) / distortion(b + 1)).collect();
        assert!(ratios.windows(2).all(|r| r[0] <= r[1] + 0.05), "{ratios:?}");
        assert!(ratios.iter().all(|&r| (3.0..=4.1).contains(&r)), "{ratios:?}");
    }

    #[test]
    fn equal_shares_and_sizes_get_the_target_and_busier_experts_get_more() {
        assert_eq!(allocate(&[100; 4], &[0.25; 4], 3.0).unwrap(), vec![3; 4]);
        let bits = allocate(&[100; 4], &[0.55, 0.25, 0.15, 0.05], 3.0).unwrap();
        assert_eq!(average_bits(&[100; 4], &bits), 3.0);
        assert!(bits.windows(2).all(|p| p[0] >= p[1]) && bits[0] > bits[3], "{bits:?}");
    }

    /// Random layers of HMoE-like experts: the average stays within the stated bound below the
    /// target, and no expert gets fewer bits than one that is less busy and no narrower (in
    /// particular: less busy and of the same width).
    #[test]
    fn budget_bound_and_share_monotonicity_on_random_experts() {
        let mut rng = Rng::new(17);
        for case in 0..200 {
            let n = 2 + rng.below(30);
            let widths = [72usize, 104, 136, 184];
            let sizes: Vec<usize> = (0..n).map(|_| 3 * 128 * widths[rng.below(widths.len())]).collect();
            let tokens: Vec<usize> = (0..n).map(|_| if rng.below(8) == 0 { 0 } else { rng.below(5000) }).collect();
            let share = &shares(&[tokens])[0];
            let target = [1.0f32, 2.0, 2.5, 3.0, 3.3, 4.0, 7.5][case % 7];
            let bits = allocate(&sizes, share, target).unwrap();
            let avg = average_bits(&sizes, &bits);
            let open = sizes.iter().zip(&bits).filter(|(_, &b)| b < MAX_BITS).map(|(&n, _)| n).min().unwrap_or(0);
            let slack = open as f64 / sizes.iter().sum::<usize>() as f64;
            assert!(avg <= target as f64 + 1e-12 && avg > target as f64 - slack, "case {case}: {avg} for {target}, slack {slack}");
            for a in 0..n {
                for b in 0..n {
                    if share[a] > share[b] && sizes[a] <= sizes[b] {
                        assert!(bits[a] >= bits[b], "case {case}: {} weights, share {} got {} bits; {} weights, share {} got {}", sizes[a], share[a], bits[a], sizes[b], share[b], bits[b]);
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert!(allocate(&[10, 10], &[0.5], 2.0).is_err());
        assert!(allocate(&[10, 0], &[0.5, 0.5], 2.0).is_err());
        assert!(allocate(&[10, 10], &[0.5, f64::NAN], 2.0).unwrap_err().to_string().contains("expert share"));
        assert!(allocate(&[10, 10], &[0.5, 0.5], 0.5).is_err());
    }
}
