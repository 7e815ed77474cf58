//! Launch code of the flash-attention kernels (`kernels/attention.cu`): shape checks, the
//! shared-memory budget of each kernel (mirroring how the kernel carves its dynamic shared
//! memory), grids, and the three-kernel backward.

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use super::{expect, ok, CudaBackend, DevView, DevViewMut, Storage};
use crate::backend::AttnShape;
use crate::{Error, Result};

/// `TILE` of attention.cu: query rows and key columns per tile.
const TILE: usize = 64;
/// `THREADS` of attention.cu: 4 warps of 16 rows.
const THREADS: u32 = 128;
/// Largest head_dim the shared-memory layout is sized for.
const MAX_HEAD_DIM: usize = 128;

/// `struct Heads` of attention.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct Heads {
    seq: i32,
    n_heads: i32,
    n_kv_heads: i32,
    d: i32,
}

// SAFETY: plain #[repr(C)] i32 fields, the same layout as the CUDA struct.
unsafe impl DeviceRepr for Heads {}

pub fn check(s: AttnShape) -> Result<()> {
    if s.head_dim == 0 || !s.head_dim.is_multiple_of(16) || s.head_dim > MAX_HEAD_DIM {
        return Err(Error::Invalid(format!("CUDA attention needs head_dim a multiple of 16 and at most {MAX_HEAD_DIM}; got {}", s.head_dim)));
    }
    if s.n_kv_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
        return Err(Error::Invalid(format!("attention: n_heads ({}) must be a multiple of n_kv_heads ({})", s.n_heads, s.n_kv_heads)));
    }
    Ok(())
}

/// Bytes of dynamic shared memory of `attn_fwd`: Q, K, V tiles (bf16), S (f32), P (bf16),
/// O (f32), m and l (f32).
fn fwd_smem(d: usize) -> usize {
    3 * TILE * d * 2 + TILE * TILE * (4 + 2) + TILE * d * 4 + 2 * TILE * 4
}
/// `attn_bwd_dkv`: K, V, Q, dO (bf16), dK, dV (f32), Sᵀ, dPᵀ (f32), Pᵀ, dSᵀ (bf16), lse, Δ.
fn dkv_smem(d: usize) -> usize {
    4 * TILE * d * 2 + 2 * TILE * d * 4 + 2 * TILE * TILE * 4 + 2 * TILE * TILE * 2 + 2 * TILE * 4
}
/// `attn_bwd_dq`: Q, dO, K, V (bf16), dQ (f32), S, dP (f32), dS (bf16), lse, Δ.
fn dq_smem(d: usize) -> usize {
    4 * TILE * d * 2 + TILE * d * 4 + 2 * TILE * TILE * 4 + TILE * TILE * 2 + 2 * TILE * 4
}

/// The opt-in shared-memory limit set on the attention kernels (the largest any shape needs,
/// 177 KiB at head_dim 128: within Hopper's 227 KiB per block).
pub fn max_smem_bytes() -> usize {
    fwd_smem(MAX_HEAD_DIM).max(dkv_smem(MAX_HEAD_DIM)).max(dq_smem(MAX_HEAD_DIM))
}

fn heads(s: AttnShape) -> Heads {
    Heads { seq: s.seq as i32, n_heads: s.n_heads as i32, n_kv_heads: s.n_kv_heads as i32, d: s.head_dim as i32 }
}

/// A launch of tiles over the sequence; panics, naming the shape, when the GPU does not allow a
/// block the shared memory this head_dim needs (GPUs before Hopper at head_dim 128).
fn tiles(be: &CudaBackend, grid_y: usize, seq: usize, smem: usize) -> LaunchConfig {
    assert!(smem <= be.k.attn_smem, "attention needs {smem} bytes of shared memory per block at this head_dim; this GPU allows {}", be.k.attn_smem);
    assert!(grid_y <= 65_535, "attention: batch × heads = {grid_y} exceeds the grid's 65535 in y");
    LaunchConfig { grid_dim: (seq.div_ceil(TILE) as u32, grid_y as u32, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: smem as u32 }
}

fn assert_shapes(s: AttnShape, qkv: usize, out: usize, lse: usize) {
    if let Err(e) = check(s) {
        panic!("{e}");
    }
    assert!(qkv == s.tokens() * s.qkv_width() && out == s.tokens() * s.out_width() && lse == s.batch * s.n_heads * s.seq, "attention buffer sizes for {s:?}");
}

/// out (N, H·D), lse (B·H·T); one block per (query tile, batch·head).
pub fn forward(be: &CudaBackend, out: DevViewMut<'_>, lse: DevViewMut<'_>, qkv: DevView<'_>, s: AttnShape) {
    assert_shapes(s, qkv.len(), out.len(), lse.len());
    expect("attention_fwd", "out", out.storage, be.act());
    expect("attention_fwd", "qkv", qkv.storage, be.act());
    expect("attention_fwd", "lse", lse.storage, Storage::F32);
    if s.tokens() == 0 {
        return;
    }
    let h = heads(s);
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let cfg = tiles(be, s.batch * s.n_heads, s.seq, fwd_smem(s.head_dim));
    // SAFETY: `attn_fwd(act_t* out, float* lse, const act_t* qkv, Heads, float)`; sizes and
    // types asserted; the shared memory is within the limit set at load time.
    ok(unsafe { be.stream.launch_builder(&be.k.attn_fwd).arg(&out.ptr).arg(&lse.ptr).arg(&qkv.ptr).arg(&h).arg(&scale).launch(cfg) }, "attn_fwd");
}

/// Overwrites dqkv: Δ first, then dK/dV (k, v columns) and dQ (q columns).
pub fn backward(be: &CudaBackend, dqkv: DevViewMut<'_>, dout: DevView<'_>, out: DevView<'_>, lse: DevView<'_>, qkv: DevView<'_>, s: AttnShape) {
    assert_shapes(s, qkv.len(), out.len(), lse.len());
    assert!(dqkv.len() == qkv.len() && dout.len() == out.len(), "attention gradient sizes");
    for (arg, st) in [("dqkv", dqkv.storage), ("dout", dout.storage), ("out", out.storage), ("qkv", qkv.storage)] {
        expect("attention_bwd", arg, st, be.act());
    }
    expect("attention_bwd", "lse", lse.storage, Storage::F32);
    if s.tokens() == 0 {
        return;
    }
    let mut delta = be.scratch_f32(s.batch * s.n_heads * s.seq);
    let h = heads(s);
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let tokens = s.tokens() as i32;
    let warps = s.tokens() * s.n_heads;
    let delta_cfg = LaunchConfig { grid_dim: ((warps * 32).div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (dq, g, o, l, q) = (&dqkv.ptr, &dout.ptr, &out.ptr, &lse.ptr, &qkv.ptr);
    // SAFETY: signatures of attn_bwd_delta, attn_bwd_dkv and attn_bwd_dq in attention.cu; sizes
    // and types asserted; `delta` holds B·H·T floats; shared memory within the limit set at
    // load time.
    unsafe {
        ok(be.stream.launch_builder(&be.k.attn_bwd_delta).arg(&mut delta).arg(g).arg(o).arg(&h).arg(&tokens).launch(delta_cfg), "attn_bwd_delta");
        let cfg = tiles(be, s.batch * s.n_kv_heads, s.seq, dkv_smem(s.head_dim));
        ok(be.stream.launch_builder(&be.k.attn_bwd_dkv).arg(dq).arg(g).arg(l).arg(&delta).arg(q).arg(&h).arg(&scale).launch(cfg), "attn_bwd_dkv");
        let cfg = tiles(be, s.batch * s.n_heads, s.seq, dq_smem(s.head_dim));
        ok(be.stream.launch_builder(&be.k.attn_bwd_dq).arg(dq).arg(g).arg(l).arg(&delta).arg(q).arg(&h).arg(&scale).launch(cfg), "attn_bwd_dq");
    }
}
