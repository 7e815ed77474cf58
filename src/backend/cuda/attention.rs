//! Launch code of the flash-attention kernels (`kernels/attention.cu`): shape checks, the
//! shared-memory budget of each kernel (mirroring how the kernel carves its dynamic shared
//! memory), grids, and the three-kernel backward. The geometry is public so that the kernel
//! emulator's test (`tests/cuda_emu.rs`) launches exactly as the backend does.

use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

use super::{expect, ok, CudaBackend, DevView, DevViewMut, Storage};
use crate::backend::AttnShape;
use crate::{Error, Result};

/// `BLOCK` of attention.cu: rows of key tiles and of the backward's query tiles.
const BLOCK: usize = 64;
/// `THREADS` of attention.cu: 4 warps.
const THREADS: u32 = 128;
/// `PAD` of attention.cu: bf16 of padding per shared-memory row.
const PAD: usize = 8;
/// Largest head_dim with compiled kernels (`ATTENTION_ENTRIES` of attention.cu: every multiple
/// of 16 up to this).
pub const MAX_HEAD_DIM: usize = 128;

/// The entry points of attention.cu: Δ, then forward, dK/dV and dQ for each head_dim.
pub const FUNCTIONS: &[&str] = &[
    "attn_bwd_delta",
    "attn_fwd_d16", "attn_bwd_dkv_d16", "attn_bwd_dq_d16",
    "attn_fwd_d32", "attn_bwd_dkv_d32", "attn_bwd_dq_d32",
    "attn_fwd_d48", "attn_bwd_dkv_d48", "attn_bwd_dq_d48",
    "attn_fwd_d64", "attn_bwd_dkv_d64", "attn_bwd_dq_d64",
    "attn_fwd_d80", "attn_bwd_dkv_d80", "attn_bwd_dq_d80",
    "attn_fwd_d96", "attn_bwd_dkv_d96", "attn_bwd_dq_d96",
    "attn_fwd_d112", "attn_bwd_dkv_d112", "attn_bwd_dq_d112",
    "attn_fwd_d128", "attn_bwd_dkv_d128", "attn_bwd_dq_d128",
];

/// One head_dim's kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    GradKv,
    GradQ,
}

impl Pass {
    pub const ALL: [Pass; 3] = [Pass::Forward, Pass::GradKv, Pass::GradQ];

    /// The entry point of this pass for head_dim `d`.
    pub fn function(self, d: usize) -> String {
        let stem = match self {
            Pass::Forward => "attn_fwd",
            Pass::GradKv => "attn_bwd_dkv",
            Pass::GradQ => "attn_bwd_dq",
        };
        format!("{stem}_d{d}")
    }

    /// Row atoms of 16 rows per warp: two at head_dim ≤ 64 for the forward (query rows) and
    /// dK/dV (key rows), `FWD_ATOMS` and `DKV_ATOMS` of attention.cu.
    fn atoms(self, d: usize) -> usize {
        match self {
            Pass::Forward | Pass::GradKv if d <= 64 => 2,
            _ => 1,
        }
    }

    /// Rows along the sequence one block owns: query rows, or key rows for dK/dV (4 warps).
    pub fn block_rows(self, d: usize) -> usize {
        4 * 16 * self.atoms(d)
    }

    /// Bytes of dynamic shared memory at head_dim `d`, as the kernel carves it: bf16 tiles of
    /// rows × (d + PAD), plus f32 query statistics for dK/dV.
    pub fn smem_bytes(self, d: usize) -> usize {
        let rows = |n: usize| n * (d + PAD) * 2;
        match self {
            Pass::Forward => rows(self.block_rows(d)) + 4 * rows(BLOCK), // Q, 2 × (K, V)
            Pass::GradKv => {
                let query_tile = BLOCK / self.atoms(d); // QT: the scores of one 16 × 64 atom pair
                2 * rows(self.block_rows(d)) + 4 * rows(query_tile) + 4 * query_tile * 4 // K, V, 2 × (Q, dO), 2 × (lse, Δ)
            }
            Pass::GradQ => 6 * rows(BLOCK), // Q, dO, 2 × (K, V)
        }
    }

    /// Grid of this pass: blocks along the sequence × (batch · heads), kv heads for dK/dV.
    pub fn grid(self, s: AttnShape) -> (u32, u32, u32) {
        let heads = if self == Pass::GradKv { s.n_kv_heads } else { s.n_heads };
        (s.seq.div_ceil(self.block_rows(s.head_dim)) as u32, (s.batch * heads) as u32, 1)
    }
}

/// Head dims with kernels: the multiples of 16 up to [`MAX_HEAD_DIM`].
pub fn head_dims() -> impl Iterator<Item = usize> {
    (16..=MAX_HEAD_DIM).step_by(16)
}

/// `struct Heads` of attention.cu.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Heads {
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

pub fn heads(s: AttnShape) -> Heads {
    Heads { seq: s.seq as i32, n_heads: s.n_heads as i32, n_kv_heads: s.n_kv_heads as i32, d: s.head_dim as i32 }
}

/// The launch of `pass` for `s`; panics, naming the shape, when the GPU does not allow a block
/// the shared memory this head_dim needs (GPUs before Hopper at head_dim 128).
pub fn launch_config(smem_limit: usize, pass: Pass, s: AttnShape) -> LaunchConfig {
    let smem = pass.smem_bytes(s.head_dim);
    assert!(smem <= smem_limit, "attention ({pass:?}) needs {smem} bytes of shared memory per block at head_dim {}; this GPU allows {smem_limit}", s.head_dim);
    let grid = pass.grid(s);
    assert!(grid.1 <= 65_535, "attention: batch × heads = {} exceeds the grid's 65535 in y", grid.1);
    LaunchConfig { grid_dim: grid, block_dim: (THREADS, 1, 1), shared_mem_bytes: smem as u32 }
}

/// `attn_bwd_delta`: one warp per (token, head), 256 threads a block.
pub fn delta_config(s: AttnShape) -> LaunchConfig {
    let warps = s.tokens() * s.n_heads;
    LaunchConfig { grid_dim: ((warps * 32).div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

fn assert_shapes(s: AttnShape, qkv: usize, out: usize, lse: usize) {
    if let Err(e) = check(s) {
        panic!("{e}");
    }
    assert!(qkv == s.tokens() * s.qkv_width() && out == s.tokens() * s.out_width() && lse == s.batch * s.n_heads * s.seq, "attention buffer sizes for {s:?}");
}

/// Tiles are copied in 16-byte pieces (cp.async) and results stored in pairs: every activation
/// must start 16-byte aligned (row strides are multiples of 16 bf16 for any head_dim allowed).
fn assert_aligned(op: &str, args: &[(&str, u64)]) {
    for &(arg, ptr) in args {
        assert!(ptr.is_multiple_of(16), "{op}: `{arg}` at {ptr:#x} is not 16-byte aligned");
    }
}

/// out (N, H·D), lse (B·H·T); one block per (query rows, batch·head).
pub fn forward(be: &CudaBackend, out: DevViewMut<'_>, lse: DevViewMut<'_>, qkv: DevView<'_>, s: AttnShape) {
    assert_shapes(s, qkv.len(), out.len(), lse.len());
    expect("attention_fwd", "out", out.storage, be.storage());
    expect("attention_fwd", "qkv", qkv.storage, be.storage());
    expect("attention_fwd", "lse", lse.storage, Storage::F32);
    if s.tokens() == 0 {
        return;
    }
    assert_aligned("attention_fwd", &[("out", out.ptr), ("qkv", qkv.ptr)]);
    let h = heads(s);
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let cfg = launch_config(be.k.attn_smem, Pass::Forward, s);
    // SAFETY: `attn_fwd_dD(act_t* out, float* lse, const act_t* qkv, Heads, float)`; sizes,
    // types and alignment asserted; the shared memory is within the limit set at load time.
    ok(unsafe { be.stream.launch_builder(be.k.attention(Pass::Forward, s.head_dim)).arg(&out.ptr).arg(&lse.ptr).arg(&qkv.ptr).arg(&h).arg(&scale).launch(cfg) }, "attn_fwd");
}

/// Overwrites dqkv: Δ first, then dK/dV (k, v columns) and dQ (q columns).
pub fn backward(be: &CudaBackend, dqkv: DevViewMut<'_>, dout: DevView<'_>, out: DevView<'_>, lse: DevView<'_>, qkv: DevView<'_>, s: AttnShape) {
    assert_shapes(s, qkv.len(), out.len(), lse.len());
    assert!(dqkv.len() == qkv.len() && dout.len() == out.len(), "attention gradient sizes");
    for (arg, st) in [("dqkv", dqkv.storage), ("dout", dout.storage), ("out", out.storage), ("qkv", qkv.storage)] {
        expect("attention_bwd", arg, st, be.storage());
    }
    expect("attention_bwd", "lse", lse.storage, Storage::F32);
    if s.tokens() == 0 {
        return;
    }
    assert_aligned("attention_bwd", &[("dqkv", dqkv.ptr), ("dout", dout.ptr), ("qkv", qkv.ptr)]);
    let mut delta = be.scratch_f32(s.batch * s.n_heads * s.seq);
    let h = heads(s);
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let tokens = s.tokens() as i32;
    let delta_cfg = delta_config(s);
    let (dq, g, o, l, q) = (&dqkv.ptr, &dout.ptr, &out.ptr, &lse.ptr, &qkv.ptr);
    // SAFETY: signatures of attn_bwd_delta, attn_bwd_dkv_dD and attn_bwd_dq_dD in attention.cu;
    // sizes, types and alignment asserted; `delta` holds B·H·T floats; shared memory within the
    // limit set at load time.
    unsafe {
        ok(be.stream.launch_builder(&be.k.attn_delta).arg(&mut delta).arg(g).arg(o).arg(&h).arg(&tokens).launch(delta_cfg), "attn_bwd_delta");
        for pass in [Pass::GradKv, Pass::GradQ] {
            let cfg = launch_config(be.k.attn_smem, pass, s);
            ok(be.stream.launch_builder(be.k.attention(pass, s.head_dim)).arg(dq).arg(g).arg(l).arg(&delta).arg(q).arg(&h).arg(&scale).launch(cfg), "attn_bwd");
        }
    }
}
