//! The primitives of common.cuh as test cases (kernels in primitives.cu), written once for both
//! places that run them: the kernel emulator (tests/cuda_emu.rs) and the device
//! (tests/cuda_parity.rs, where on a GPU they say whether the hardware reads mma's fragments,
//! ldmatrix's rows and wgmma's swizzled layouts and descriptors as the emulator does, before the
//! attention kernels built on them are judged). A case is one launch and a check of its outputs
//! against the PTX ISA's definition of the instruction.
#![allow(dead_code)]

use motley::rng::Rng;

/// One kernel argument.
pub enum Arg {
    /// An output of this many 32-bit words (f32 or u32).
    Out(usize),
    /// bf16 values, as bit patterns.
    Bf16(Vec<u16>),
    F32(Vec<f32>),
    U32(Vec<u32>),
    I32(i32),
    /// A tensor map (TMA descriptor) of a bf16 matrix, passed by value: `bits` row-major, `rows` ×
    /// `cols`, boxes of 64 columns × 64 rows, the 128-byte swizzle, zeros out of bounds.
    TensorMap { bits: Vec<u16>, rows: usize, cols: usize },
}

/// The box of a tensor map [`Arg::TensorMap`]: columns, rows, planes (the maps are of rank 3,
/// one plane, as the kernels' are).
pub const TMA_BOX: [u32; 3] = [64, 64, 1];

/// The dims and strides (bytes) of [`Arg::TensorMap`]'s rank-3 map of `rows` × `cols` bf16.
pub fn tma_layout(rows: usize, cols: usize) -> ([u64; 3], [u64; 2]) {
    let (r, c) = (rows as u64, cols as u64);
    ([c, r, 1], [2 * c, 2 * c * r])
}

/// Checks a launch's outputs (the words of its `Out` arguments, in argument order).
type Check = Box<dyn Fn(&[Vec<u32>]) -> Result<(), String>>;

pub struct Case {
    /// What the case checks, for messages.
    pub name: &'static str,
    pub kernel: &'static str,
    pub threads: u32,
    pub smem: u32,
    /// The kernel uses wgmma: sm_90a only.
    pub hopper: bool,
    pub args: Vec<Arg>,
    check: Check,
}

impl Case {
    /// Checks a launch's outputs: the `Out` arguments' words, in argument order.
    pub fn check(&self, outputs: &[Vec<u32>]) -> Result<(), String> {
        (self.check)(outputs).map_err(|e| format!("{} (`{}`): {e}", self.name, self.kernel))
    }
}

pub fn bf16_bits(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}

fn bits(values: &[f32]) -> Vec<u16> {
    values.iter().map(|&v| bf16_bits(v)).collect()
}

/// Small integers in [−4, 4]: every product and sum of a case is exact in f32, so a layout is
/// checked bit for bit.
fn small(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.below(9) as f32 - 4.0).collect()
}

/// `a` (m × k) · `b` (k × n), row-major, in f64.
fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|t| a[i * k + t] as f64 * b[t * n + j] as f64).sum();
        }
    }
    out
}

fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|i| x[(i % rows) * cols + i / rows]).collect()
}

fn close(got: f64, want: f64, tol: Option<f64>) -> bool {
    match tol {
        None => got == want,
        Some(t) => (got - want).abs() <= t * (1.0 + want.abs()),
    }
}

/// `got` (f32 words, rows of `n`) against `want`; on a mismatch names the wrong entries and which
/// of `others` (what a misread layout would give) the output is instead.
fn check_product(got: &[u32], want: &[f64], n: usize, tol: Option<f64>, others: &[(&str, Vec<f64>)]) -> Result<(), String> {
    let got: Vec<f64> = got.iter().map(|&w| f32::from_bits(w) as f64).collect();
    let wrong: Vec<usize> = (0..want.len()).filter(|&i| !close(got[i], want[i], tol)).collect();
    if wrong.is_empty() {
        return Ok(());
    }
    let first: Vec<String> = wrong.iter().take(4).map(|&i| format!("d[{}][{}] = {} instead of {}", i / n, i % n, got[i], want[i])).collect();
    let instead: Vec<&str> = others.iter().filter(|(_, o)| (0..o.len()).all(|i| close(got[i], o[i], tol))).map(|(what, _)| *what).collect();
    let guess = if instead.is_empty() { String::new() } else { format!("; the output is {}", instead.join(" and ")) };
    Err(format!("{} of {} entries wrong, e.g. {}{guess}", wrong.len(), want.len(), first.join(", ")))
}

/// The cases, in the order of the instructions the kernels depend on; `hopper` adds the wgmma and
/// TMA ones.
pub fn cases(hopper: bool) -> Vec<Case> {
    let mut rng = Rng::new(61);
    let mut out = vec![mma(&mut rng, true), mma(&mut rng, false), ldmatrix(), cp_async(), exp2_ftz()];
    if hopper {
        out.extend([wgmma_ss(&mut rng, 0), wgmma_ss_mn_major(&mut rng), wgmma_rs(&mut rng, false), wgmma_rs(&mut rng, true), wgmma_n256(&mut rng, false), wgmma_n256(&mut rng, true), wgmma_n256_tn(&mut rng), stmatrix_trans()]);
        out.extend([tma_load(0), tma_wgmma(&mut rng)]);
    }
    out
}

/// The shared-memory bytes of a 64 × 64 bf16 box at column `x`, row `y` of `m` (`rows` × `cols`,
/// row-major bit patterns): element (r, c) at byte 128 r + 2 c, zero outside the matrix, then
/// with `swizzle` the 16-byte chunk bits 4–6 of the offset XOR bits 7–9 (the tile 1024-byte
/// aligned).
fn box_bytes(m: &[u16], rows: usize, cols: usize, x: usize, y: usize, swizzle: bool) -> Vec<u8> {
    let mut out = vec![0u8; 64 * 128];
    for r in 0..64 {
        for c in 0..64 {
            let v = if y + r < rows && x + c < cols { m[(y + r) * cols + x + c] } else { 0 };
            let mut at = 128 * r + 2 * c;
            if swizzle {
                at ^= ((at >> 7) & 7) << 4;
            }
            out[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    out
}

fn words(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks(4).map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes"))).collect()
}

/// Two TMA copies of 64 × 64 boxes with the 128-byte swizzle on one mbarrier's phases 0 and 1
/// (`test_tma_load`): a box inside an 80 × 96 bf16 matrix and one past its right and bottom edges
/// (zeros there), each against the documented layout; `misuse` as the kernel says (the emulator's
/// reports: `tests/cuda_emu.rs`).
pub fn tma_load(misuse: i32) -> Case {
    let (rows, cols) = (80, 96);
    // Distinct patterns, none of them zero: a misplaced element or a missing zero fill shows.
    let m: Vec<u16> = (0..rows * cols).map(|i| 0x3c00 + i as u16).collect();
    let want: Vec<Vec<u32>> = [(16, 8), (48, 40)].iter().map(|&(x, y)| words(&box_bytes(&m, rows, cols, x, y, true))).collect();
    let plain: Vec<Vec<u32>> = [(16, 8), (48, 40)].iter().map(|&(x, y)| words(&box_bytes(&m, rows, cols, x, y, false))).collect();
    Case {
        name: "cp.async.bulk.tensor.2d (TMA), 128-byte swizzle, on mbarrier phases 0 and 1",
        kernel: "test_tma_load",
        threads: 128,
        smem: 2 * 8192 + 8 + 1024,
        hopper: true,
        args: vec![Arg::Out(2 * 2048), Arg::TensorMap { bits: m, rows, cols }, Arg::I32(misuse)],
        check: Box::new(move |o| {
            for (k, (want, plain)) in want.iter().zip(&plain).enumerate() {
                let got = &o[0][2048 * k..2048 * (k + 1)];
                let wrong: Vec<usize> = (0..2048).filter(|&i| got[i] != want[i]).collect();
                if let Some(&i) = wrong.first() {
                    let instead = if got == &plain[..] { "; the tile is the box without the swizzle" } else { "" };
                    return Err(format!("box {k}: {} of 2048 words wrong, e.g. word {i} = {:#010x} instead of {:#010x}{instead}", wrong.len(), got[i], want[i]));
                }
            }
            Ok(())
        }),
    }
}

/// d (64 × 128) = a · bᵀ with both tiles brought by TMA (`test_tma_wgmma`): wgmma reads the
/// 128-byte swizzled boxes through the same descriptors as cp.async's tiles.
fn tma_wgmma(rng: &mut Rng) -> Case {
    let (a, b, want) = a_bt_128(rng);
    Case {
        name: "wgmma m64n128k16 on tiles a TMA copy brought (128-byte swizzle)",
        kernel: "test_tma_wgmma",
        threads: 128,
        smem: 3 * 8192 + 8 + 1024,
        hopper: true,
        args: vec![Arg::Out(64 * 128), Arg::TensorMap { bits: bits(&a), rows: 64, cols: 64 }, Arg::TensorMap { bits: bits(&b), rows: 128, cols: 64 }],
        check: Box::new(move |o| check_product(&o[0], &want, 128, None, &[])),
    }
}

/// d (16 × 8) = a (16 × 16) · b (16 × 8) + c on one warp (`mma16816`): exactly on small integers,
/// to f32 rounding on random bf16 values.
fn mma(rng: &mut Rng, exact: bool) -> Case {
    let values = |rng: &mut Rng, n: usize| if exact { small(rng, n) } else { (0..n).map(|_| half::bf16::from_f32(rng.normal() as f32).to_f32()).collect() };
    let (a, b, c) = (values(rng, 256), values(rng, 128), values(rng, 128));
    let want: Vec<f64> = matmul(&a, &b, 16, 16, 8).iter().zip(&c).map(|(p, &c)| p + c as f64).collect();
    let tol = (!exact).then_some(1e-5);
    Case {
        name: if exact { "mma.m16n8k16, small integers" } else { "mma.m16n8k16, random bf16" },
        kernel: "test_mma",
        threads: 32,
        smem: 0,
        hopper: false,
        args: vec![Arg::Out(128), Arg::Bf16(bits(&a)), Arg::Bf16(bits(&b)), Arg::F32(c)],
        check: Box::new(move |o| check_product(&o[0], &want, 8, tol, &[])),
    }
}

/// `ldmatrix_x4` and `ldmatrix_x4_trans` against the documented distribution of rows to lanes.
fn ldmatrix() -> Case {
    // m[i][r][c] = 1 + 64i + 8r + c, as raw 16-bit patterns.
    let m: Vec<u16> = (0..256).map(|k| 1 + k as u16).collect();
    let patterns = m.clone();
    let check = move |o: &[Vec<u32>]| {
        let at = |i: usize, r: usize, c: usize| patterns[64 * i + 8 * r + c] as u32;
        for lane in 0..32 {
            let (row, col) = (lane / 4, 2 * (lane % 4));
            for i in 0..4 {
                // Thread t gets fragment t % 4 of row t / 4 (two elements, the first in the low
                // half); .trans loads the matrix column-major: the same of its transpose.
                let want = at(i, row, col) | at(i, row, col + 1) << 16;
                let want_t = at(i, col, row) | at(i, col + 1, row) << 16;
                if o[0][4 * lane + i] != want {
                    return Err(format!("ldmatrix_x4 lane {lane} register {i}: {:#x} instead of {want:#x}", o[0][4 * lane + i]));
                }
                if o[1][4 * lane + i] != want_t {
                    return Err(format!("ldmatrix_x4_trans lane {lane} register {i}: {:#x} instead of {want_t:#x}", o[1][4 * lane + i]));
                }
            }
        }
        Ok(())
    };
    Case { name: "ldmatrix", kernel: "test_ldmatrix", threads: 32, smem: 1024, hopper: false, args: vec![Arg::Out(128), Arg::Out(128), Arg::Bf16(m.clone())], check: Box::new(check) }
}

/// `stmatrix_x4_trans` (sm_90) against the documented distribution: the store is ldmatrix's
/// inverse, each matrix written transposed, row a of matrix i from lane 8i + a's address.
fn stmatrix_trans() -> Case {
    // m[i][r][c] = 1 + 64i + 8r + c, as raw 16-bit patterns.
    let m: Vec<u16> = (0..256).map(|k| 1 + k as u16).collect();
    let check = move |o: &[Vec<u32>]| {
        let at = |i: usize, r: usize, c: usize| 1 + (64 * i + 8 * r + c) as u32;
        for lane in 0..32 {
            let (i, a) = (lane / 8, lane % 8);
            for k in 0..4 {
                // Stored row a of matrix i is its column a: elements (2k, a) and (2k + 1, a).
                let want = at(i, 2 * k, a) | at(i, 2 * k + 1, a) << 16;
                if o[0][4 * lane + k] != want {
                    return Err(format!("stmatrix_x4_trans lane {lane} word {k}: {:#x} instead of {want:#x}", o[0][4 * lane + k]));
                }
            }
        }
        Ok(())
    };
    Case { name: "stmatrix (.trans)", kernel: "test_stmatrix_trans", threads: 32, smem: 1024, hopper: true, args: vec![Arg::Out(128), Arg::Bf16(m)], check: Box::new(check) }
}

/// `cp_async16`: a copy, a zero-fill, and the wait groups.
fn cp_async() -> Case {
    let src: Vec<u32> = (1..=8).collect();
    let want: Vec<u32> = src[..4].iter().copied().chain([0; 4]).collect();
    let check = move |o: &[Vec<u32>]| {
        let got = &o[0];
        if got[..8] != want[..] {
            return Err(format!("group 0 after cp_async_wait_pending<1> (then a zero-fill): {:?} instead of {want:?}", &got[..8]));
        }
        // got[8..12) is read before group 1's wait: anything on a GPU (the emulator leaves its
        // poison there; cuda_emu checks that).
        if got[12..] != [5, 6, 7, 8] {
            return Err(format!("group 1 after cp_async_wait_all: {:?} instead of [5, 6, 7, 8]", &got[12..]));
        }
        Ok(())
    };
    Case { name: "cp.async", kernel: "test_cp_async", threads: 1, smem: 64, hopper: false, args: vec![Arg::Out(16), Arg::U32(src)], check: Box::new(check) }
}

/// `exp2_ftz` (ex2.approx.ftz, the attention kernels' exponential): within 2⁻²¹ of 2^x where
/// that is a normal float, 0 where it is below the smallest (flushed), 0 at −∞, 1 at 0.
fn exp2_ftz() -> Case {
    let mut x: Vec<f32> = (0..60).map(|i| -130.0 + 2.3 * i as f32).collect();
    x.extend([f32::NEG_INFINITY, 0.0, -126.0, -126.5]);
    let inputs = x.clone();
    let check = move |o: &[Vec<u32>]| {
        for (i, (&x, &got)) in inputs.iter().zip(&o[0]).enumerate() {
            let (got, exact) = (f32::from_bits(got) as f64, (x as f64).exp2());
            let ok = if exact < f32::MIN_POSITIVE as f64 { got == 0.0 } else { (got - exact).abs() <= exact * 2f64.powi(-21) };
            if !ok {
                return Err(format!("exp2_ftz({x}) [{i}] = {got:e}, want {exact:e} (0 below 2^-126)"));
            }
        }
        Ok(())
    };
    Case { name: "exp2_ftz (ex2.approx.ftz)", kernel: "test_exp2_ftz", threads: 32, smem: 0, hopper: false, args: vec![Arg::Out(64), Arg::F32(x)], check: Box::new(check) }
}

/// a (64 × 64), b (128 × 64) of small integers and a · bᵀ (64 × 128), the m64n128k16 cases'.
fn a_bt_128(rng: &mut Rng) -> (Vec<f32>, Vec<f32>, Vec<f64>) {
    let (a, b) = (small(rng, 64 * 64), small(rng, 128 * 64));
    let want = matmul(&a, &transpose(&b, 128, 64), 64, 64, 128);
    (a, b, want)
}

/// d (64 × 128) = a (64 × 64) · bᵀ (b: 128 × 64) with both operands K-major in shared memory
/// (`wgmma_m64n128k16_ss`, the forward's S = Q Kᵀ). `misuse` > 0 makes the kernel break a rule
/// the emulator must report (cuda_emu only).
pub fn wgmma_ss(rng: &mut Rng, misuse: i32) -> Case {
    let (a, b, want) = a_bt_128(rng);
    Case {
        name: "wgmma m64n128k16, A and B K-major from shared memory",
        kernel: "test_wgmma_ss",
        threads: 128,
        smem: 64 * 128 + 128 * 128 + 1024,
        hopper: true,
        args: vec![Arg::Out(64 * 128), Arg::Bf16(bits(&a)), Arg::Bf16(bits(&b)), Arg::I32(misuse)],
        check: Box::new(move |o| check_product(&o[0], &want, 128, None, &[])),
    }
}

/// What a 64 × 64 product `a · B` would be if B (stored `b`) were read the other way, or the
/// accumulator layout were transposed.
fn misreads(a: &[f32], b: &[f32], b_is_transposed: bool, want: &[f64]) -> Vec<(&'static str, Vec<f64>)> {
    let other = if b_is_transposed { b.to_vec() } else { transpose(b, 64, 64) };
    let want_t: Vec<f64> = (0..64 * 64).map(|i| want[(i % 64) * 64 + i / 64]).collect();
    vec![("a · B with B read K-major instead of MN-major (or the reverse)", matmul(a, &other, 64, 64, 64)), ("the product transposed (accumulator layout)", want_t)]
}

/// d (64 × 64) = a · b with a K-major and b MN-major in shared memory
/// (`wgmma_m64n64k16_ss<1>`, the backward's dQ = dS K).
fn wgmma_ss_mn_major(rng: &mut Rng) -> Case {
    let (a, b) = (small(rng, 64 * 64), small(rng, 64 * 64));
    let want = matmul(&a, &b, 64, 64, 64);
    let others = misreads(&a, &b, false, &want);
    Case {
        name: "wgmma m64n64k16, A K-major and B MN-major from shared memory",
        kernel: "test_wgmma_ss_mnmajor",
        threads: 128,
        smem: 2 * 64 * 128 + 1024,
        hopper: true,
        args: vec![Arg::Out(64 * 64), Arg::Bf16(bits(&a)), Arg::Bf16(bits(&b))],
        check: Box::new(move |o| check_product(&o[0], &want, 64, None, &others)),
    }
}

/// d (64 × 256) = a · B with both operands from shared memory (`wgmma_m64n256k16_ss`, the
/// experts' kernels): B = bᵀ read K-major (b: 256 × 64), or B = b read MN-major (b: 64 × 256) as
/// four 64-column strips, the descriptor's leading byte offset apart.
fn wgmma_n256(rng: &mut Rng, mn_major: bool) -> Case {
    let (a, b) = (small(rng, 64 * 64), small(rng, 64 * 256));
    let want = if mn_major { matmul(&a, &b, 64, 64, 256) } else { matmul(&a, &transpose(&b, 256, 64), 64, 64, 256) };
    Case {
        name: if mn_major { "wgmma m64n256k16, A K-major, B MN-major in strips from shared memory" } else { "wgmma m64n256k16, A and B K-major from shared memory" },
        kernel: if mn_major { "test_wgmma_n256_mnmajor" } else { "test_wgmma_n256_kmajor" },
        threads: 128,
        smem: 64 * 128 + 256 * 128 + 1024,
        hopper: true,
        args: vec![Arg::Out(64 * 256), Arg::Bf16(bits(&a)), Arg::Bf16(bits(&b))],
        check: Box::new(move |o| check_product(&o[0], &want, 256, None, &[])),
    }
}

/// d (64 × 256) = aᵀ · b with both operands MN-major from shared memory (a: 64 × 64 and b:
/// 64 × 256, both with k as their rows; `wgmma_m64n256k16_ss<1, 1>`, the experts'
/// weight-gradient kernel). Also says whether the output is what reading A the other way
/// (K-major, a · b) would give.
fn wgmma_n256_tn(rng: &mut Rng) -> Case {
    let (a, b) = (small(rng, 64 * 64), small(rng, 64 * 256));
    let want = matmul(&transpose(&a, 64, 64), &b, 64, 64, 256);
    let others = vec![("A read K-major (a · b)", matmul(&a, &b, 64, 64, 256))];
    Case {
        name: "wgmma m64n256k16, A MN-major, B MN-major in strips from shared memory",
        kernel: "test_wgmma_n256_tn",
        threads: 128,
        smem: 64 * 128 + 256 * 128 + 1024,
        hopper: true,
        args: vec![Arg::Out(64 * 256), Arg::Bf16(bits(&a)), Arg::Bf16(bits(&b))],
        check: Box::new(move |o| check_product(&o[0], &want, 256, None, &others)),
    }
}

/// d (64 × 64) = a · B with A from registers (`wgmma_m64n64k16_rs`): B = bᵀ read K-major
/// (the backward's Sᵀ = K Qᵀ), or B = b read MN-major (the forward's P V, the backward's
/// dV += Pᵀ dO).
fn wgmma_rs(rng: &mut Rng, mn_major: bool) -> Case {
    let (a, b) = (small(rng, 64 * 64), small(rng, 64 * 64));
    let want = if mn_major { matmul(&a, &b, 64, 64, 64) } else { matmul(&a, &transpose(&b, 64, 64), 64, 64, 64) };
    let others = misreads(&a, &b, !mn_major, &want);
    Case {
        name: if mn_major { "wgmma m64n64k16, A from registers, B MN-major" } else { "wgmma m64n64k16, A from registers, B K-major" },
        kernel: if mn_major { "test_wgmma_rs_mnmajor" } else { "test_wgmma_rs_kmajor" },
        threads: 128,
        smem: 64 * 128 + 1024,
        hopper: true,
        args: vec![Arg::Out(64 * 64), Arg::Bf16(bits(&a)), Arg::Bf16(bits(&b))],
        check: Box::new(move |o| check_product(&o[0], &want, 64, None, &others)),
    }
}
