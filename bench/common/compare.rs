//! How far an output is from its reference, shared by the benches (bench/attention.rs) and the
//! GPU parity tests (tests/cuda_parity.rs).

/// Normalised max error: max |got − want| / max |want| (the scale floored at 1e-6). Infinite
/// where `got` holds a NaN or an infinity, so a broken output never passes a tolerance (a plain
/// `f64::max` fold would skip NaN).
pub fn normalised_error(want: &[f32], got: &[f32]) -> f64 {
    assert_eq!(want.len(), got.len(), "lengths");
    if got.iter().any(|g| !g.is_finite()) {
        return f64::INFINITY;
    }
    let scale = want.iter().fold(0f64, |m, &x| m.max(x.abs() as f64)).max(1e-6);
    want.iter().zip(got).fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs())) / scale
}
