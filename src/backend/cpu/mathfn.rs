//! A branch-free `exp` that the compiler vectorizes (libm's `expf` is a scalar call), used by
//! the softmax inside attention and the classifier. Relative error < 5e-7 on the range
//! softmax needs; inputs below −87 give ≈ 0.
//!
//! Softmax reductions (max, Σ exp) go through [`max`] and [`exp_shifted`]: a plain sequential
//! f32 fold cannot be vectorized (the compiler may not reorder float additions), so they keep
//! `LANES` partial results and combine them in a fixed order — the same for any thread count.

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split so that n · LN2_HI is exact for the n that occur (Cody–Waite reduction).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // n = round(x / ln 2) with the 1.5·2²³ trick (vectorizes, unlike `round`): the sum's low
    // mantissa bits hold n, so 2ⁿ is built from them by integer ops (`n as i32` would be a
    // saturating cast, which the compiler does lane by lane).
    let shifted = x * LOG2E + 12_582_912.0;
    let n = shifted - 12_582_912.0;
    let f = (x - n * LN2_HI) - n * LN2_LO; // |f| ≤ ln2 / 2
    // Taylor series of e^f to degree 7: truncation < 1e-8 relative on |f| ≤ 0.347.
    let p = 1.0 + f * (1.0 + f * (0.5 + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    let n_bits = shifted.to_bits().wrapping_sub(0x4B40_0000); // n, two's complement
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// Partial results kept by the lane-wise reductions (one AVX-512 register of f32).
const LANES: usize = 16;

/// The largest element (−∞ for none).
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    acc.iter().fold(tail, |m, &a| m.max(a))
}

/// `x ← e^(x − shift)` for every element (in place when `write`), returning Σ e^(x − shift).
pub fn exp_shifted(xs: &mut [f32], shift: f32, write: bool) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
            let e = exp(*x - shift);
            if write {
                *x = e;
            }
            *a += e;
        }
    }
    let mut tail = 0.0;
    for x in chunks.into_remainder() {
        let e = exp(*x - shift);
        if write {
            *x = e;
        }
        tail += e;
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    #[test]
    fn lane_reductions_match_sequential_ones() {
        for n in [0, 1, 15, 16, 17, 100, 4096] {
            let xs: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.1).collect();
            let want_max = xs.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(super::max(&xs), want_max, "n = {n}");
            let want: f64 = xs.iter().map(|&x| ((x - 1.0) as f64).exp()).sum();
            let mut ys = xs.clone();
            let got = super::exp_shifted(&mut ys, 1.0, true);
            assert!((got as f64 - want).abs() <= 1e-5 * want.max(1e-30), "n = {n}: {got} vs {want}");
            assert_eq!(super::exp_shifted(&mut xs.clone(), 1.0, false), got);
            for (y, x) in ys.iter().zip(&xs) {
                assert!((*y as f64 - ((x - 1.0) as f64).exp()).abs() <= 1e-6 * ((x - 1.0) as f64).exp());
            }
        }
    }

    #[test]
    fn matches_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (got, want) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.01337;
        }
        assert!(worst < 5e-7, "worst relative error {worst:e}");
    }
}
