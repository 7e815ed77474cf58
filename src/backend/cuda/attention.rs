//! Launch code of the flash-attention kernels (`kernels/attention.cu`): shape checks, the
//! shared-memory budget of each kernel (mirroring how the kernel carves its dynamic shared
//! memory), grids, and the backward (Δ, then one kernel for dQ, dK and dV). The geometry is
//! public so that the kernel emulator's test (`tests/cuda_emu.rs`) launches exactly as the
//! backend does.

use cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig, PushKernelArg};

use super::tma::TensorMap;
use super::{expect, ok, CudaBackend, DevView, DevViewMut, Storage};
use crate::backend::{cuda_scratch, AttnShape};
use crate::{Error, Result};

/// `BLOCK` of attention.cu: rows of the forward's key tiles (the backward's query tiles have
/// BLOCK / atoms).
const BLOCK: usize = 64;
/// `THREADS` of attention.cu: 4 warps.
const THREADS: u32 = 128;
/// `PAD` of attention.cu: bf16 of padding per shared-memory row.
const PAD: usize = 8;
/// Largest head_dim with compiled kernels (`ATTENTION_ENTRIES` of attention.cu: every multiple
/// of 16 up to this).
pub const MAX_HEAD_DIM: usize = 128;

/// The entry points of attention.cu: Δ, then forward and backward for each head_dim.
pub const FUNCTIONS: &[&str] = &[
    "attn_bwd_delta",
    "attn_fwd_d16", "attn_bwd_d16",
    "attn_fwd_d32", "attn_bwd_d32",
    "attn_fwd_d48", "attn_bwd_d48",
    "attn_fwd_d64", "attn_bwd_d64",
    "attn_fwd_d80", "attn_bwd_d80",
    "attn_fwd_d96", "attn_bwd_d96",
    "attn_fwd_d112", "attn_bwd_d112",
    "attn_fwd_d128", "attn_bwd_d128",
];

/// Entry points compiled only for Hopper (`sm_90a`): the wgmma forward and backward at head_dim
/// 64, in `Pass::ALL` order.
pub const HOPPER_FUNCTIONS: &[&str] = &["attn_fwd_wgmma_d64", "attn_bwd_wgmma_d64"];
/// Head dim of the Hopper kernels.
pub const HOPPER_HEAD_DIM: usize = 64;
/// Rows along the sequence a Hopper block owns (two warpgroups of 64: query rows, key rows for
/// the backward) and its threads.
const HOPPER_ROWS: usize = 128;
const HOPPER_THREADS: u32 = 256;
/// Rows of the Hopper backward's query tiles.
pub const HOPPER_QUERY_TILE: usize = 64;
/// Bytes of a swizzled tile of 64 rows of 64 bf16.
const HOPPER_HALF: usize = 64 * 128;

/// One head_dim's kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    Backward,
}

impl Pass {
    pub const ALL: [Pass; 2] = [Pass::Forward, Pass::Backward];

    /// The entry point of this pass for head_dim `d`.
    pub fn function(self, d: usize) -> String {
        let stem = match self {
            Pass::Forward => "attn_fwd",
            Pass::Backward => "attn_bwd",
        };
        format!("{stem}_d{d}")
    }

    /// Rows along the sequence one block owns (4 warps of `atoms` row atoms): query rows, or
    /// key rows for the backward.
    pub fn block_rows(self, d: usize) -> usize {
        4 * 16 * atoms(d)
    }

    /// Rows of the backward's query tiles (`QT`): the scores of one 16 × 64 atom pair.
    pub fn query_tile(d: usize) -> usize {
        BLOCK / atoms(d)
    }

    /// Bytes of dynamic shared memory at head_dim `d`, as the kernel carves it: bf16 tiles of
    /// rows × (d + PAD); the backward's f32 query statistics and its bf16 dSᵀ (keys × QT + PAD).
    pub fn smem_bytes(self, d: usize) -> usize {
        let rows = |n: usize| n * (d + PAD) * 2;
        match self {
            Pass::Forward => rows(self.block_rows(d)) + 4 * rows(BLOCK), // Q, 2 × (K, V)
            Pass::Backward => {
                let (keys, qt) = (self.block_rows(d), Pass::query_tile(d));
                // K, V, 2 × (Q, dO), 2 × (lse, Δ), dSᵀ
                2 * rows(keys) + 4 * rows(qt) + 4 * qt * 4 + keys * (qt + PAD) * 2
            }
        }
    }

    /// Grid of this pass: blocks along the sequence × (batch · heads), kv heads for the backward.
    pub fn grid(self, s: AttnShape) -> (u32, u32, u32) {
        let heads = if self == Pass::Backward { s.n_kv_heads } else { s.n_heads };
        (s.seq.div_ceil(self.block_rows(s.head_dim)) as u32, (s.batch * heads) as u32, 1)
    }
}

/// The Hopper kernels (head_dim 64), beside the mma.sync ones above.
impl Pass {
    pub fn hopper_function(self) -> &'static str {
        HOPPER_FUNCTIONS[self as usize]
    }

    /// Dynamic shared memory of the Hopper kernel, as it carves it: 1024 bytes to align its
    /// tiles, then for the forward Q and three buffers of K and V (128 rows each) and four
    /// mbarriers (the buffers' and Q's, for its TMA copies); for the backward
    /// K, V (128 rows), two buffers of Q and dO (64 rows), dS (64 × 128), the dQ columns the
    /// warpgroups exchange (2 × 16 × 128 f32), two buffers of lse and Δ (64 f32 each) and three
    /// mbarriers (the Q/dO buffers' and K and V's).
    pub fn hopper_smem_bytes(self) -> usize {
        match self {
            Pass::Forward => 1024 + 14 * HOPPER_HALF + 4 * 8,
            Pass::Backward => 1024 + 10 * HOPPER_HALF + 2 * 16 * 128 * 4 + 4 * HOPPER_QUERY_TILE * 4 + 3 * 8,
        }
    }

    /// The Hopper kernel's launch for `s` (head_dim 64): a block per 128 rows of the sequence
    /// and batch·head (batch·kv head for the backward).
    pub fn hopper_config(self, s: AttnShape) -> LaunchConfig {
        assert_eq!(s.head_dim, HOPPER_HEAD_DIM, "the Hopper attention kernels are for head_dim {HOPPER_HEAD_DIM}");
        let heads = if self == Pass::Backward { s.n_kv_heads } else { s.n_heads };
        let grid = (s.seq.div_ceil(HOPPER_ROWS) as u32, (s.batch * heads) as u32, 1);
        assert!(grid.1 <= 65_535, "attention: batch × heads = {} exceeds the grid's 65535 in y", grid.1);
        LaunchConfig { grid_dim: grid, block_dim: (HOPPER_THREADS, 1, 1), shared_mem_bytes: self.hopper_smem_bytes() as u32 }
    }
}

/// Row atoms of 16 rows per warp, the same for both passes: two at head_dim ≤ 64 (query rows of
/// the forward, key rows of the backward), `FWD_ATOMS` and `DKV_ATOMS` of attention.cu.
fn atoms(d: usize) -> usize {
    if d <= 64 {
        2
    } else {
        1
    }
}

/// Counters of a backward with query tiles of `query_tile` rows (u32, zero at launch): a launch
/// ticket per (batch, kv head), then a turn counter per (batch, q head, query tile).
pub fn turns_len(s: AttnShape, query_tile: usize) -> usize {
    s.batch * s.n_kv_heads + s.batch * s.n_heads * s.seq.div_ceil(query_tile)
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

/// The kernel of `pass` for `s`, its launch, (for the backward) its query tile and whether it is
/// a Hopper one: the Hopper one where the backend chose it and head_dim is 64, else the mma.sync
/// one of that head_dim.
fn kernel(be: &CudaBackend, pass: Pass, s: AttnShape) -> (&CudaFunction, LaunchConfig, usize, bool) {
    match &be.k.attn_hopper {
        Some(hopper) if be.hopper_attention && s.head_dim == HOPPER_HEAD_DIM => (&hopper[pass as usize], pass.hopper_config(s), HOPPER_QUERY_TILE, true),
        _ => (be.k.attention(pass, s.head_dim), launch_config(be.k.attn_smem, pass, s), Pass::query_tile(s.head_dim), false),
    }
}

impl Pass {
    /// The box of the Hopper kernel's TMA copies: 64 columns (a head) of 128 rows (the
    /// forward's tiles) or of 64 (the backward's query tiles; its K and V take two each) of one
    /// sequence.
    pub fn hopper_box(self) -> [u32; 3] {
        let rows = if self == Pass::Forward { HOPPER_ROWS } else { HOPPER_QUERY_TILE };
        [HOPPER_HEAD_DIM as u32, rows as u32, 1]
    }
}

/// The tensor map a Hopper kernel's TMA copies read from an activation of `width` columns (qkv,
/// or the backward's dout) at `ptr`: (column, row, sequence), so that a box past a sequence's
/// end reads zeros, not the next sequence; unused in f32 storage, which stages with cp.async.
pub fn hopper_map(storage: Storage, pass: Pass, ptr: u64, width: usize, s: AttnShape) -> Result<TensorMap> {
    if storage != Storage::Bf16 {
        return Ok(TensorMap::unused());
    }
    let (dims, strides) = hopper_map_layout(width, s);
    TensorMap::bf16_3d(ptr, dims, strides, pass.hopper_box()).map_err(Error::Invalid)
}

/// The dims (elements: column, row, sequence) and strides (bytes: a row, a sequence) of
/// [`hopper_map`]'s bf16 activation of `width` columns.
pub fn hopper_map_layout(width: usize, s: AttnShape) -> ([u64; 3], [u64; 2]) {
    let (w, t) = (width as u64, s.seq as u64);
    ([w, t, s.batch as u64], [2 * w, 2 * w * t])
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
    let (kernel, cfg, _, hopper) = kernel(be, Pass::Forward, s);
    let map = if hopper { Some(ok(hopper_map(be.storage(), Pass::Forward, qkv.ptr, s.qkv_width(), s), "attn_fwd tensor map")) } else { None };
    let mut launch = be.stream.launch_builder(kernel);
    launch.arg(&out.ptr).arg(&lse.ptr).arg(&qkv.ptr).arg(&h).arg(&scale);
    if let Some(map) = &map {
        launch.arg(map);
    }
    // SAFETY: `attn_fwd_dD(act_t* out, float* lse, const act_t* qkv, Heads, float)`, and
    // `attn_fwd_wgmma_d64` with qkv's tensor map after them; sizes, types and alignment
    // asserted; the shared memory is within the limit set at load time.
    ok(unsafe { launch.launch(cfg) }, "attn_fwd");
}

/// Overwrites dqkv: Δ first, then one kernel for dK/dV (k, v columns) and dQ (q columns), with
/// an f32 accumulator for dQ, Δ and zeroed turn counters in `scratch`
/// (`cuda_scratch::attention_bwd_bytes`: the caller's, so that the memory plan places it).
#[allow(clippy::too_many_arguments)]
pub fn backward(be: &CudaBackend, dqkv: DevViewMut<'_>, dout: DevView<'_>, out: DevView<'_>, lse: DevView<'_>, qkv: DevView<'_>, s: AttnShape, scratch: DevViewMut<'_>) {
    assert_shapes(s, qkv.len(), out.len(), lse.len());
    assert!(dqkv.len() == qkv.len() && dout.len() == out.len(), "attention gradient sizes");
    for (arg, st) in [("dqkv", dqkv.storage), ("dout", dout.storage), ("out", out.storage), ("qkv", qkv.storage)] {
        expect("attention_bwd", arg, st, be.storage());
    }
    expect("attention_bwd", "lse", lse.storage, Storage::F32);
    expect("attention_bwd", "scratch", scratch.storage, Storage::F32);
    if s.tokens() == 0 {
        return;
    }
    let need = cuda_scratch::attention_bwd_bytes(s) as usize / 4;
    assert!(scratch.len() >= need, "attention_bwd: scratch of {} f32 elements, the shape needs {need}", scratch.len());
    assert_aligned("attention_bwd", &[("dqkv", dqkv.ptr), ("dout", dout.ptr), ("qkv", qkv.ptr), ("scratch", scratch.ptr)]);
    // The dQ accumulator (N·H·D), written before it is read (the first key block of each query
    // tile stores its part); Δ (B·H·T), written by attn_bwd_delta; the counters after them.
    let dq_acc = scratch.ptr;
    let delta = dq_acc + 4 * (s.tokens() * s.out_width()) as u64;
    let turns = delta + 4 * (s.batch * s.n_heads * s.seq) as u64;
    let (kernel, cfg, query_tile, hopper) = kernel(be, Pass::Backward, s);
    let maps = if hopper {
        let map = |ptr, width| ok(hopper_map(be.storage(), Pass::Backward, ptr, width, s), "attn_bwd tensor map");
        Some([map(qkv.ptr, s.qkv_width()), map(dout.ptr, s.out_width())])
    } else {
        None
    };
    // f32 zeros are u32 zeros.
    be.elementwise_scalar(&be.k.elementwise(Storage::F32).fill, turns, 0.0, turns_len(s, query_tile), "attn_bwd turns");
    let h = heads(s);
    let scale = 1.0 / (s.head_dim as f32).sqrt();
    let tokens = s.tokens() as i32;
    let delta_cfg = delta_config(s);
    let mut launch = be.stream.launch_builder(kernel);
    launch.arg(&dqkv.ptr).arg(&dq_acc).arg(&turns).arg(&dout.ptr).arg(&lse.ptr).arg(&delta).arg(&qkv.ptr).arg(&h).arg(&scale);
    if let Some([qkv_map, dout_map]) = &maps {
        launch.arg(qkv_map).arg(dout_map);
    }
    // SAFETY: signatures of attn_bwd_delta and attn_bwd_dD in attention.cu, and of
    // attn_bwd_wgmma_d64 with qkv's and dout's tensor maps after them; sizes, types and
    // alignment asserted; in `scratch` (its length asserted), `delta` holds B·H·T floats,
    // `dq_acc` N·H·D, `turns` the kernel's turns_len zeroed counters (at most what
    // attention_bwd_bytes counts); shared memory within the limit set at load time.
    unsafe {
        ok(be.stream.launch_builder(&be.k.attn_delta).arg(&delta).arg(&dout.ptr).arg(&out.ptr).arg(&h).arg(&tokens).launch(delta_cfg), "attn_bwd_delta");
        ok(launch.launch(cfg), "attn_bwd");
    }
}
