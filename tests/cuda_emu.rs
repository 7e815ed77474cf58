//! Every CUDA kernel on a CPU emulator, against the CPU backend: kernel logic checked without a
//! GPU.
//!
//! The emulator (`tests/cuda_emu/`): `emu.h` is force-included before each kernel file, which
//! is compiled unchanged (the exact `nvrtc::full_source` text) with `-DMOTLEY_EMU` (and
//! `-DMOTLEY_ACT_BF16` for bf16 storage), each file inside a namespace of its own; `emu.cpp`
//! runs a launch with every CUDA thread a fiber on one OS thread, the blocks one after another,
//! warp collectives (shuffles, `__syncwarp`, `mma.sync`, `ldmatrix`) executed once all 32 lanes
//! wait at one, `cp.async` copies landing at their wait, and dynamic shared memory between
//! guards. `include/cuda_bf16.h` stands in for CUDA's; `primitives.cu` holds test kernels for
//! the emulator itself. This test builds one shared library per storage with g++ (cached under
//! `CARGO_TARGET_TMPDIR`, named by a hash of every input) and loads it.
//!
//! Each kernel is launched as the backend launches it: the geometry of `backend::cuda::launch`,
//! the argument order of `backend/cuda/mod.rs`; attention's from `backend::cuda::attention`
//! (per-head_dim entry points, shared memory at Hopper's limit). For every kernel file and both
//! storages:
//! - the two schedules give bitwise-identical outputs: blocks started in launch order, a block's
//!   warps, and each warp's lanes resumed in ascending order, then all three in descending
//!   order, each warp running as far as it can before the next, so a missing `__syncthreads` or
//!   `__syncwarp`, or a dependence on the order blocks start in, shows as a mismatch (or, for a
//!   block waiting on one that has not started, as a fault); cp.async copies land at their wait
//!   in the first and at once in the second, so a copy into a buffer still being read shows
//!   (for wgmma operands, as a fault); and so does a
//!   third run with grid-stride grids capped at 2 blocks (the backend's grid past 2²⁴ elements)
//!   and the expert kernels' persistent grid at 1 block (3 in the other two);
//! - no write lands outside a buffer (guards of signalling NaNs around each, which arithmetic
//!   changes) or outside shared memory, and outputs the op overwrites start as NaN, so an element
//!   left unwritten shows, as does a read of unwritten shared memory (poisoned with NaN); a
//!   misaligned access or an index past a fixed-size array stops the run (UBSan, with the line);
//! - outputs match the CPU backend run on the same inputs (rounded to bf16 where the kernel
//!   reads bf16, so the tolerance is the kernel's own error).
//!
//! Comparisons with the CPU. Exact (bitwise, after rounding the CPU's f32 result to the
//! output's storage) where the kernel does the CPU's f32 operations in the CPU's order: copies,
//! conversions, add/scale/fill, embedding, gather/combine, RoPE, RMSNorm dw, AdamW, the router's
//! backward (g++ does not contract into FMAs; NVRTC does, so a GPU is not exact). Elsewhere
//! max |emu − cpu| / max |cpu| per output:
//! - [`F32_TOL`] 2e-6 (16 f32 ulps of the largest value) for reductions summed in another order
//!   (block and warp trees) and the kernels' `expf`/`__expf`/`rsqrtf` against the CPU's own
//!   functions (measured ≤ 6e-7);
//! - [`BF16_TOL`] 4e-3 where the kernel rounds such a result into bf16 once: half a bf16 ulp,
//!   at most 2⁻⁸ of the element (measured ≤ 3.1e-3);
//! - [`SUMSQ_TOL`] 1e-12 for Σx² in f64 in another order (measured ≤ 2e-14);
//! - attention, [`ATTN_TOL`] 5e-3 with f32 storage: the CPU gets the bf16 values of q, k, v and
//!   dO, which the kernels stage as bf16 tiles in either storage, so what is left is the kernels'
//!   rounding of P and dS to bf16 (up to 2⁻⁸ each) before their products, which average it out
//!   least with few keys (measured ≤ 2.6e-3, at head_dim 16 and T = 70);
//!   [`BF16_ATTN_TOL`] 8e-3 with bf16 storage, which also rounds out and dqkv once (2⁻⁸) and
//!   reads O as bf16 for Δ (measured ≤ 3.4e-3);
//! - the experts' kernels: the plain grouped products and the up projection's `gu` within [`F32_TOL`] / [`BF16_TOL`]
//!   (products of bf16 operands summed in another order, then one rounding), its `act` within
//!   twice that (computed from the rounded `gu` and rounded again; measured 5.7e-3 with bf16)
//!   and bitwise what `swiglu_fwd` computes from that `gu`; the backward's `dgu` within twice
//!   the tolerance (from `dact` rounded to the storage, which the CPU keeps in f32, and rounded
//!   again), its `act` bitwise the forward's.
//!
//! The primitives are checked against the PTX ISA (cases in `cuda_emu/primitive_cases.rs`,
//! which `cuda_parity` runs on a GPU too): `mma16816` against a plain matmul (exactly on small
//! integers, to f32 rounding on random bf16), `ldmatrix_x4(_trans)` against the documented
//! distribution of rows to lanes, `cp_async16` against its zero-fill and wait-group semantics,
//! wgmma in every form the attention kernels use against a plain matmul, TMA's bulk tensor
//! copy (128-byte swizzle, zeros out of bounds) on mbarrier phases against the documented
//! layout and as wgmma's operand; and the emulator must report a deadlock, a shared-memory overflow, a race, a block
//! waiting for a turn that only a later block could pass, and an out-of-bounds global write.
//!
//! Needs g++ (`CXX` overrides it): without it the test fails when `CI=true` and prints a skip
//! otherwise.
#![cfg(feature = "cuda")]

mod common;
#[path = "cuda_emu/build.rs"]
mod emu_build;
#[path = "cuda_emu/primitive_cases.rs"]
mod primitive_cases;

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use common::{expert_chain, randn, ExpertChain};
use motley::backend::cpu::Cpu;
use motley::backend::cuda::launch::{self, grid_stride, per_row, warp_per_row, LaunchConfig, ROW_CHUNK, SUMSQ_BLOCKS};
use motley::backend::cuda::attention::{self as attn, Pass};
use motley::backend::cuda::experts::{self as expert_launch, Fused, Side};
use motley::backend::cuda::nvrtc::{Storage, KERNEL_FILES};
use motley::backend::cuda::{group_positions, AdamWArgs};
use motley::backend::{AdamW, AttnShape, Backend, Gemm, Pick, TokenSlots};
use motley::rng::Rng;
use motley::parallel::dispatch::{apply_capacity, DispatchMode, DropPolicy};
use primitive_cases::{Arg as CaseArg, Case};

const F32_TOL: f64 = 2e-6;
const BF16_TOL: f64 = 4e-3;
const SUMSQ_TOL: f64 = 1e-12;
const ATTN_TOL: f64 = 5e-3;
const BF16_ATTN_TOL: f64 = 8e-3;

// ---- loading the emulator ----------------------------------------------------------------------

type LaunchFn = unsafe extern "C" fn(*const c_char, *const u32, *const u32, usize, usize, *const *mut c_void, *const usize, i32) -> i32;
type LastErrorFn = unsafe extern "C" fn() -> *const c_char;
type EncodeMapFn = unsafe extern "C" fn(*mut c_void, u32, u32, *const c_void, *const u64, *const u64, *const u32, u32) -> *const c_char;

/// The emulator built for one storage.
struct Emulator {
    _lib: libloading::Library,
    launch: LaunchFn,
    last_error: LastErrorFn,
    /// cuTensorMapEncodeTiled's emulation (`tensor_map.h`).
    encode_map: EncodeMapFn,
}

/// The emulators for f32 and bf16 storage, built once per test run; `None` when g++ is missing.
fn emulator(storage: Storage) -> Option<&'static Emulator> {
    static EMULATORS: OnceLock<Option<[Emulator; 2]>> = OnceLock::new();
    let both = EMULATORS.get_or_init(|| {
        let cxx = emu_build::Compiler::find("cuda_emu")?;
        let libs = emu_build::kernel_libs(&cxx).unwrap_or_else(|e| panic!("building the kernel emulator: {e}"));
        Some(libs.map(|path| load(&path)))
    });
    both.as_ref().map(|e| &e[(storage == Storage::Bf16) as usize])
}

fn load(path: &Path) -> Emulator {
    // SAFETY: our own library, whose static initialisers only register kernels; the symbols
    // have the C signatures of emu.cpp's `emu_launch` and `emu_last_error`.
    unsafe {
        let lib = libloading::Library::new(path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
        let launch = *lib.get::<LaunchFn>(b"emu_launch").expect("emu_launch");
        let last_error = *lib.get::<LastErrorFn>(b"emu_last_error").expect("emu_last_error");
        let encode_map = *lib.get::<EncodeMapFn>(b"emu_encode_tensor_map").expect("emu_encode_tensor_map");
        Emulator { _lib: lib, launch, last_error, encode_map }
    }
}

// ---- device buffers ----------------------------------------------------------------------------

/// Bytes of guard before and after each buffer.
const GUARD: usize = 256;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Elem {
    F32,
    Bf16,
    F64,
    U32,
}

impl Elem {
    fn bytes(self) -> usize {
        match self {
            Elem::Bf16 => 2,
            Elem::F32 | Elem::U32 => 4,
            Elem::F64 => 8,
        }
    }
    /// One element of the guards of buffer number `id`: a signalling NaN whose payload is the
    /// buffer's, so that reading a guard makes the result NaN, arithmetic on it writes back a
    /// quiet NaN (other bits), and a copy from another buffer's guard other bits too. Indices
    /// get an absurdly large value.
    fn canary(self, id: u64) -> Vec<u8> {
        let payload = 1 + id % 63;
        match self {
            Elem::Bf16 => (0x7f80 | payload as u16).to_le_bytes().to_vec(),
            Elem::F32 => (0x7f80_0000 | payload as u32).to_le_bytes().to_vec(),
            Elem::F64 => (0x7ff0_0000_0000_0000 | payload).to_le_bytes().to_vec(),
            Elem::U32 => (0xdead_0000 | payload as u32).to_le_bytes().to_vec(),
        }
    }
}

#[derive(Clone, Copy)]
#[repr(C, align(256))]
struct Chunk([u8; 256]);

/// A device buffer in host memory: `len` elements of `elem`, 256-byte aligned like a CUDA
/// allocation, between two guards.
struct Buf {
    name: &'static str,
    elem: Elem,
    len: usize,
    /// The guard pattern, one element long.
    canary: Vec<u8>,
    mem: Vec<Chunk>,
    /// Start of the memory: every access goes through it (kernels write while we hold `&Buf`).
    base: *mut u8,
}

impl Buf {
    fn new(name: &'static str, elem: Elem, len: usize) -> Buf {
        let total = (2 * GUARD + len * elem.bytes()).div_ceil(256) * 256;
        let mut mem = vec![Chunk([0; 256]); total / 256];
        let base = mem.as_mut_ptr() as *mut u8;
        static BUFFERS: AtomicU64 = AtomicU64::new(0);
        let canary = elem.canary(BUFFERS.fetch_add(1, Ordering::Relaxed));
        // SAFETY: `total` bytes from `base` belong to `mem`.
        let all = unsafe { std::slice::from_raw_parts_mut(base, total) };
        all.iter_mut().enumerate().for_each(|(i, b)| *b = canary[i % canary.len()]);
        Buf { name, elem, len, canary, mem, base }
    }
    fn total(&self) -> usize {
        self.mem.len() * 256
    }
    fn data_ptr(&self) -> *mut u8 {
        // SAFETY: within the allocation (GUARD < total).
        unsafe { self.base.add(GUARD) }
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: the data region lies inside the allocation; no launch runs meanwhile.
        unsafe { std::slice::from_raw_parts(self.data_ptr(), self.len * self.elem.bytes()) }
    }
    fn write(&self, values: impl Iterator<Item = Vec<u8>>) {
        let mut at = self.data_ptr();
        for v in values.take(self.len) {
            // SAFETY: at most `len` elements of `elem.bytes()` bytes each, inside the data region.
            unsafe {
                std::ptr::copy_nonoverlapping(v.as_ptr(), at, v.len());
                at = at.add(v.len());
            }
        }
    }
    fn from_f64(name: &'static str, elem: Elem, values: &[f64]) -> Buf {
        let buf = Buf::new(name, elem, values.len());
        buf.write(values.iter().map(|&v| match elem {
            Elem::F32 => (v as f32).to_le_bytes().to_vec(),
            Elem::Bf16 => half::bf16::from_f32(v as f32).to_le_bytes().to_vec(),
            Elem::F64 => v.to_le_bytes().to_vec(),
            Elem::U32 => (v as u32).to_le_bytes().to_vec(),
        }));
        buf
    }
    fn values(&self) -> Vec<f64> {
        self.bytes()
            .chunks(self.elem.bytes())
            .map(|b| match self.elem {
                Elem::F32 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
                Elem::Bf16 => half::bf16::from_le_bytes(b.try_into().unwrap()).to_f64(),
                Elem::F64 => f64::from_le_bytes(b.try_into().unwrap()),
                Elem::U32 => u32::from_le_bytes(b.try_into().unwrap()) as f64,
            })
            .collect()
    }
    /// Names the first guard byte a kernel overwrote.
    fn check_guards(&self) -> Result<(), String> {
        let end = GUARD + self.len * self.elem.bytes();
        // SAFETY: the whole allocation.
        let all = unsafe { std::slice::from_raw_parts(self.base, self.total()) };
        match (0..GUARD).chain(end..self.total()).find(|&i| all[i] != self.canary[i % self.canary.len()]) {
            None => Ok(()),
            Some(i) if i < GUARD => Err(format!("wrote before buffer `{}` (guard byte {} before it changed)", self.name, GUARD - i)),
            Some(i) => Err(format!("wrote past the end of buffer `{}` of {} elements (guard byte {} after it changed)", self.name, self.len, i - end)),
        }
    }
    fn arg(&self) -> Arg<'_> {
        Arg::Buf(self, 0)
    }
    fn at(&self, element: usize) -> Arg<'_> {
        Arg::Buf(self, element)
    }
}

/// A kernel argument; `args[i]` of the launch points at its value's bytes.
enum Arg<'a> {
    /// The address of element `.1` of a buffer.
    Buf(&'a Buf, usize),
    Null,
    I32(i32),
    /// `size_t`.
    Size(usize),
    F32(f32),
    /// A struct by value.
    Bytes(Vec<u8>),
}

impl Arg<'_> {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Arg::Buf(b, at) => (b.data_ptr() as u64 + (at * b.elem.bytes()) as u64).to_le_bytes().to_vec(),
            Arg::Null => 0u64.to_le_bytes().to_vec(),
            Arg::I32(v) => v.to_le_bytes().to_vec(),
            Arg::Size(v) => (*v as u64).to_le_bytes().to_vec(),
            Arg::F32(v) => v.to_le_bytes().to_vec(),
            Arg::Bytes(v) => v.clone(),
        }
    }
}

/// The bytes of a `#[repr(C)]` value passed to a kernel by value.
fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: reads the value's own size_of::<T>() bytes; the types used are padding-free.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }.to_vec()
}

/// Kernels whose dynamic shared memory limit the backend raises (`kernels.rs`: the attention
/// passes and the fused expert kernel); every other launch gets CUDA's default 48 KiB.
fn raised_smem(kernel: &str) -> bool {
    attn::HOPPER_FUNCTIONS.contains(&kernel) || expert_launch::HOPPER_FUNCTIONS.contains(&kernel) || attn::head_dims().any(|d| Pass::ALL.iter().any(|p| p.function(d) == kernel))
}

/// Hopper's opt-in shared memory per block (227 KiB), the limit the attention launches get.
const HOPPER_SMEM: usize = 227 << 10;

impl Emulator {
    /// The 128-byte tensor map of bf16 `buf` with `dims` (elements, contiguous first), `strides`
    /// (bytes, one fewer) and `box_`, the 128-byte swizzle, as cuTensorMapEncodeTiled makes it.
    fn tensor_map(&self, buf: &Buf, dims: &[u64], strides: &[u64], box_: &[u32]) -> Result<Vec<u8>, String> {
        assert!(dims.len() == box_.len() && strides.len() + 1 == dims.len(), "a tensor map's dims, strides and box");
        let mut map = vec![0u8; 128];
        // SAFETY: `map` has the 128 bytes a CUtensorMap takes; the arrays have the rank's lengths
        // (asserted) and the address is the live buffer's.
        let why = unsafe { CStr::from_ptr((self.encode_map)(map.as_mut_ptr().cast(), dims.len() as u32, 2, buf.data_ptr() as *const c_void, dims.as_ptr(), strides.as_ptr(), box_.as_ptr(), 3)) };
        if !why.to_bytes().is_empty() {
            return Err(format!("tensor map: {}", why.to_string_lossy()));
        }
        Ok(map)
    }

    /// Runs `kernel`; then every buffer argument's guards must be intact.
    fn launch(&self, kernel: &str, cfg: LaunchConfig, args: &[Arg], schedule: i32) -> Result<(), String> {
        if cfg.shared_mem_bytes > 48 << 10 && !raised_smem(kernel) {
            return Err(format!("kernel `{kernel}`: {} bytes of dynamic shared memory without a raised limit", cfg.shared_mem_bytes));
        }
        let values: Vec<Vec<u8>> = args.iter().map(Arg::bytes).collect();
        let ptrs: Vec<*mut c_void> = values.iter().map(|v| v.as_ptr() as *mut c_void).collect();
        let sizes: Vec<usize> = values.iter().map(Vec::len).collect();
        let name = CString::new(kernel).expect("kernel name");
        let grid = [cfg.grid_dim.0, cfg.grid_dim.1, cfg.grid_dim.2];
        let block = [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2];
        // SAFETY: the arrays outlive the call and have the lengths passed; buffer arguments point
        // into live buffers (the kernels' bounds are what the guards check).
        let rc = unsafe { (self.launch)(name.as_ptr(), grid.as_ptr(), block.as_ptr(), cfg.shared_mem_bytes as usize, ptrs.len(), ptrs.as_ptr(), sizes.as_ptr(), schedule) };
        if rc != 0 {
            // SAFETY: emu_last_error returns a NUL-terminated string owned by the library.
            return Err(unsafe { CStr::from_ptr((self.last_error)()) }.to_string_lossy().into_owned());
        }
        for a in args {
            if let Arg::Buf(b, _) = a {
                b.check_guards().map_err(|e| format!("kernel `{kernel}` {e}"))?;
            }
        }
        Ok(())
    }
}

/// The emulator of one storage under one schedule, for a case to launch kernels on.
struct Gpu {
    emu: &'static Emulator,
    storage: Storage,
    schedule: i32,
    /// Grid-stride launches get at most 2 blocks.
    capped: bool,
}

impl Gpu {
    fn act_elem(&self) -> Elem {
        match self.storage {
            Storage::F32 => Elem::F32,
            Storage::Bf16 => Elem::Bf16,
        }
    }
    /// `v` in activation storage.
    fn act(&self, name: &'static str, v: &[f32]) -> Buf {
        Buf::from_f64(name, self.act_elem(), &v.iter().map(|&x| x as f64).collect::<Vec<_>>())
    }
    fn f32(&self, name: &'static str, v: &[f32]) -> Buf {
        Buf::from_f64(name, Elem::F32, &v.iter().map(|&x| x as f64).collect::<Vec<_>>())
    }
    fn u32(&self, name: &'static str, v: &[u32]) -> Buf {
        Buf::from_f64(name, Elem::U32, &v.iter().map(|&x| x as f64).collect::<Vec<_>>())
    }
    /// An output the kernel overwrites, all NaN until then.
    fn nan(&self, name: &'static str, elem: Elem, len: usize) -> Buf {
        Buf::from_f64(name, elem, &vec![f64::NAN; len])
    }
    /// The backend's grid-stride launch over `n` elements; capped, what it becomes past 2²⁴
    /// elements (65536 blocks), where every thread takes several elements.
    fn grid_stride(&self, n: usize) -> LaunchConfig {
        let mut cfg = grid_stride(n);
        if self.capped {
            cfg.grid_dim.0 = cfg.grid_dim.0.min(2);
        }
        cfg
    }
    /// The expert kernels' persistent grid on a device of 3 multiprocessors (a block takes
    /// several tiles, from several segments); capped, of 1 (one block takes them all).
    fn persistent(&self, call: &expert_launch::Call) -> LaunchConfig {
        call.kernel.config(call, if self.capped { 1 } else { 3 })
    }
    fn run(&self, kernel: &str, cfg: LaunchConfig, args: &[Arg]) {
        if let Err(e) = self.emu.launch(kernel, cfg, args, self.schedule) {
            panic!("{:?} storage: {e}", self.storage);
        }
    }
}

/// Runs `case` on the emulator under both schedules, and with grid-stride grids capped; every
/// buffer it returns must come out bitwise the same. The values of the first run; `None` when
/// the emulator is unavailable.
fn emulate(storage: Storage, case: impl Fn(&Gpu) -> Vec<Buf>) -> Option<Vec<Vec<f64>>> {
    let emu = emulator(storage)?;
    let asc = case(&Gpu { emu, storage, schedule: 0, capped: false });
    for (other, why) in [(Gpu { emu, storage, schedule: 1, capped: false }, "the descending schedule (a race: a missing barrier?)"), (Gpu { emu, storage, schedule: 0, capped: true }, "a 2-block grid-stride grid (the expert kernels: a 1-block grid)")] {
        for (a, o) in asc.iter().zip(&case(&other)) {
            if let Some(i) = a.bytes().chunks(a.elem.bytes()).zip(o.bytes().chunks(o.elem.bytes())).position(|(x, y)| x != y) {
                panic!("{storage:?}: `{}` differs under {why} at element {i}: {} instead of {}", a.name, o.values()[i], a.values()[i]);
            }
        }
    }
    Some(asc.iter().map(Buf::values).collect())
}

// ---- comparisons with the CPU backend ---------------------------------------------------------

/// The CPU reference for `storage`: with bf16 storage, AdamW writes a bf16-rounded working copy.
fn cpu_for(storage: Storage) -> Cpu {
    match storage {
        Storage::F32 => Cpu::new(2),
        Storage::Bf16 => Cpu::new(2).with_bf16_weights(),
    }
}

fn data(seed: u64, n: usize) -> Vec<f32> {
    randn(&mut Rng::new(seed), n, 1.0)
}

/// `v` as activation storage holds it: rounded to bf16 (nearest even) for bf16 storage.
fn act(storage: Storage, v: &[f32]) -> Vec<f32> {
    match storage {
        Storage::F32 => v.to_vec(),
        Storage::Bf16 => v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect(),
    }
}

/// Collects every comparison of a case, then fails naming all that are off.
struct Checks {
    case: String,
    failures: Vec<String>,
}

impl Checks {
    fn new(case: &str, storage: Storage) -> Checks {
        Checks { case: format!("{case} ({storage:?})"), failures: Vec::new() }
    }
    /// Bitwise equality.
    fn exact(&mut self, what: &str, want: &[f32], got: &[f64]) {
        assert_eq!(want.len(), got.len(), "{}: `{what}` lengths", self.case);
        match want.iter().zip(got).position(|(&w, &g)| w.to_bits() != (g as f32).to_bits()) {
            None => eprintln!("{}: {what} exact", self.case),
            Some(i) => self.failures.push(format!("{what}: element {i} is {} instead of {}", got[i], want[i])),
        }
    }
    /// max |got − want| / max |want| within `tol`.
    fn close(&mut self, what: &str, want: &[f64], got: &[f64], tol: f64) {
        assert_eq!(want.len(), got.len(), "{}: `{what}` lengths", self.case);
        if let Some(i) = got.iter().position(|g| !g.is_finite()) {
            self.failures.push(format!("{what}: element {i} is {}", got[i]));
            return;
        }
        let scale = want.iter().fold(0f64, |m, w| m.max(w.abs())).max(1e-30);
        let err = want.iter().zip(got).fold(0f64, |m, (w, g)| m.max((w - g).abs())) / scale;
        eprintln!("{}: {what} normalised max error {err:.2e} (tol {tol:.0e})", self.case);
        if err > tol {
            self.failures.push(format!("{what}: normalised max error {err:.3e} > {tol:.0e}"));
        }
    }
    fn close32(&mut self, what: &str, want: &[f32], got: &[f64], tol: f64) {
        self.close(what, &want.iter().map(|&w| w as f64).collect::<Vec<_>>(), got, tol);
    }
    fn finish(self) {
        assert!(self.failures.is_empty(), "{}: {}", self.case, self.failures.join("; "));
    }
}

/// The tolerance of a result computed in f32 and stored in `storage`.
fn tol(storage: Storage) -> f64 {
    match storage {
        Storage::F32 => F32_TOL,
        Storage::Bf16 => BF16_TOL,
    }
}

// ---- the kernel files, against the CPU backend -----------------------------------------------

fn elementwise(s: Storage) {
    let n = 70_001;
    let (a, b, c) = (act(s, &data(1, n)), act(s, &data(2, n)), act(s, &data(3, n)));
    // Conversions: random values plus the special ones (a tie to even, overflow to infinity,
    // a subnormal, infinities, NaN).
    let mut specials = data(4, 1000);
    specials.extend([1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0, f32::MAX, 1e-40, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
    let m = specials.len();
    let Some(got) = emulate(s, |g| {
        let (ab, bb) = (g.act("a", &a), g.act("b", &b));
        // One element a thread over all n (odd); 8 over the first n − 1 (a multiple of 8).
        let (sum, sum8) = (g.nan("sum", g.act_elem(), n), g.nan("sum8", g.act_elem(), n - 1));
        g.run("add", g.grid_stride(n), &[sum.arg(), ab.arg(), bb.arg(), Arg::Size(n), Arg::I32(1)]);
        g.run("add", g.grid_stride((n - 1) / 8), &[sum8.arg(), ab.arg(), bb.arg(), Arg::Size(n - 1), Arg::I32(8)]);
        let (acc, acc8) = (g.act("acc", &c), g.act("acc8", &c[..n - 1]));
        g.run("add_assign", g.grid_stride(n), &[acc.arg(), ab.arg(), Arg::Size(n), Arg::I32(1)]);
        g.run("add_assign", g.grid_stride((n - 1) / 8), &[acc8.arg(), ab.arg(), Arg::Size(n - 1), Arg::I32(8)]);
        let scaled = g.act("scaled", &c);
        g.run("scale", g.grid_stride(n), &[scaled.arg(), Arg::F32(0.37), Arg::Size(n)]);
        // A view from element 5 to n − 5, as `fill` of a subview launches.
        let filled = g.act("filled", &c);
        g.run("fill", g.grid_stride(n - 10), &[filled.at(5), Arg::F32(2.5), Arg::Size(n - 10)]);
        let (partial_cfg, final_cfg) = launch::sum_squares();
        // n is odd: with 8 a thread, the last n % 8 elements go one each.
        let (partial, total, total8) = (g.nan("partial", Elem::F64, SUMSQ_BLOCKS), g.nan("total", Elem::F64, 1), g.nan("total8", Elem::F64, 1));
        g.run("sum_squares_partial", partial_cfg, &[partial.arg(), ab.arg(), Arg::Size(n), Arg::I32(1)]);
        g.run("sum_squares_final", final_cfg, &[total.arg(), partial.arg(), Arg::I32(SUMSQ_BLOCKS as i32)]);
        g.run("sum_squares_partial", partial_cfg, &[partial.arg(), ab.arg(), Arg::Size(n), Arg::I32(8)]);
        g.run("sum_squares_final", final_cfg, &[total8.arg(), partial.arg(), Arg::I32(SUMSQ_BLOCKS as i32)]);
        // CudaBackend::convert, both ways.
        let (f, rounded) = (g.f32("specials", &specials), g.nan("rounded", g.act_elem(), m));
        g.run("f32_to_act", g.grid_stride(m), &[rounded.arg(), f.arg(), Arg::Size(m)]);
        let widened = g.nan("widened", Elem::F32, n);
        g.run("act_to_f32", g.grid_stride(n), &[widened.arg(), ab.arg(), Arg::Size(n)]);
        vec![sum, acc, scaled, filled, total, rounded, widened, sum8, acc8, total8]
    }) else {
        return;
    };
    let cpu = cpu_for(s);
    let mut want_sum = vec![0.0; n];
    cpu.add(&mut want_sum, &a, &b);
    let mut want_acc = c.clone();
    cpu.add_assign(&mut want_acc, &a);
    let mut want_scaled = c.clone();
    cpu.scale(&mut want_scaled, 0.37);
    let mut want_filled = c.clone();
    cpu.fill(&mut want_filled[5..n - 5], 2.5);
    let want_ss = cpu.sum_squares(&a);
    let mut ch = Checks::new("elementwise", s);
    ch.exact("add", &act(s, &want_sum), &got[0]);
    ch.exact("add_assign", &act(s, &want_acc), &got[1]);
    ch.exact("add (vec 8)", &act(s, &want_sum[..n - 1]), &got[7]);
    ch.exact("add_assign (vec 8)", &act(s, &want_acc[..n - 1]), &got[8]);
    ch.exact("scale", &act(s, &want_scaled), &got[2]);
    ch.exact("fill", &act(s, &want_filled), &got[3]);
    ch.close("sum_squares", &[want_ss], &got[4], SUMSQ_TOL);
    ch.close("sum_squares (vec 8)", &[want_ss], &got[9], SUMSQ_TOL);
    // f32_to_act rounds to nearest even like `half`, except that a NaN stays a NaN (CUDA's
    // canonical one, not half's).
    let nan = specials.iter().position(|x| x.is_nan()).expect("a NaN");
    assert!(got[5][nan].is_nan(), "{s:?}: f32_to_act turned NaN into {}", got[5][nan]);
    ch.exact("f32_to_act", &act(s, &specials[..nan]), &got[5][..nan]);
    ch.exact("act_to_f32", &a, &got[6]);
    ch.finish();
}

fn embed(s: Storage) {
    let (v, c, tokens) = (50, 300, [3u32, 7, 3, 49, 0, 7, 3, 11]);
    let n = tokens.len();
    let (table, dout, base) = (act(s, &data(7, v * c)), act(s, &data(8, n * c)), data(9, v * c));
    let groups = group_positions(&tokens);
    let Some(got) = emulate(s, |g| {
        let (tb, tk) = (g.act("table", &table), g.u32("tokens", &tokens));
        let out = g.nan("out", g.act_elem(), n * c);
        g.run("embedding_fwd", per_row(n), &[out.arg(), tb.arg(), tk.arg(), Arg::I32(c as i32)]);
        let (dtable, db) = (g.f32("dtable", &base), g.act("dout", &dout));
        let (ids, offsets, pos) = (g.u32("ids", &groups.ids), g.u32("offsets", &groups.offsets), g.u32("positions", &groups.positions));
        g.run("embedding_bwd", per_row(groups.ids.len()), &[dtable.arg(), db.arg(), ids.arg(), offsets.arg(), pos.arg(), Arg::I32(c as i32)]);
        vec![out, dtable]
    }) else {
        return;
    };
    let cpu = cpu_for(s);
    let mut want_out = vec![0.0; n * c];
    cpu.embedding_fwd(&mut want_out, &table, &tokens, c);
    let mut want_dtable = base.clone();
    cpu.embedding_bwd(&mut want_dtable, &dout, &tokens, c);
    let mut ch = Checks::new("embed", s);
    ch.exact("embedding_fwd", &want_out, &got[0]);
    ch.exact("embedding_bwd", &want_dtable, &got[1]);
    ch.finish();
}

fn norm(s: Storage) {
    // 150 rows: three row chunks, the last partial; 600 columns: three column blocks. 8 elements
    // a thread (600 is a multiple of 8), and one.
    for vec in [8, 1] {
        norm_with(s, vec);
    }
}

fn norm_with(s: Storage, vec: i32) {
    let (n, c, eps) = (150, 600, 1e-5);
    let (x, w, dy, dx0, dw0) = (act(s, &data(10, n * c)), act(s, &data(11, c)), act(s, &data(12, n * c)), act(s, &data(13, n * c)), data(14, c));
    let cpu = cpu_for(s);
    let (mut want_out, mut want_rstd) = (vec![0.0; n * c], vec![0.0; n]);
    cpu.rmsnorm_fwd(&mut want_out, &mut want_rstd, &x, &w, n, c, eps);
    let Some(got) = emulate(s, |g| {
        let (xb, wb) = (g.act("x", &x), g.act("w", &w));
        let (out, rs) = (g.nan("out", g.act_elem(), n * c), g.nan("rstd", Elem::F32, n));
        g.run("rmsnorm_fwd", per_row(n), &[out.arg(), rs.arg(), xb.arg(), wb.arg(), Arg::I32(c as i32), Arg::F32(eps), Arg::I32(vec)]);
        // The backward reads the CPU's rstd, as the CPU's backward does.
        let (residual, dw, dyb, rsb) = (g.act("residual", &dx0), g.f32("dw", &dw0), g.act("dout", &dy), g.f32("rstd_in", &want_rstd));
        let (dx, dx_alone) = (g.nan("dx", g.act_elem(), n * c), g.nan("dx (no residual)", g.act_elem(), n * c));
        let ci = c as i32;
        g.run("rmsnorm_bwd_dx", per_row(n), &[dx.arg(), residual.arg(), dyb.arg(), xb.arg(), wb.arg(), rsb.arg(), Arg::I32(ci), Arg::I32(vec)]);
        g.run("rmsnorm_bwd_dx", per_row(n), &[dx_alone.arg(), Arg::Null, dyb.arg(), xb.arg(), wb.arg(), rsb.arg(), Arg::I32(ci), Arg::I32(vec)]);
        // dW as the backend launches it (one pass here), and in passes of one chunk each (64,
        // 64 and 22 rows: the last partial) over a scratch of c partial sums.
        let dw_passes = g.f32("dw (passes)", &dw0);
        for (max_partials, dw) in [(launch::RMSNORM_PARTIALS, &dw), (c, &dw_passes)] {
            let part = g.nan("part", Elem::F32, max_partials);
            for pass in launch::rmsnorm_dw_passes(n, c, max_partials) {
                let at = pass.first_row * c;
                let args = [part.arg(), dyb.at(at), xb.at(at), rsb.at(pass.first_row), Arg::I32(pass.rows as i32), Arg::I32(ci), Arg::I32(ROW_CHUNK as i32)];
                g.run("rmsnorm_dw_partial", pass.cfg, &args);
                g.run("rmsnorm_dw_reduce", g.grid_stride(c), &[dw.arg(), part.arg(), Arg::I32(pass.chunks as i32), Arg::I32(ci)]);
            }
        }
        vec![out, rs, dx, dw, dx_alone, dw_passes]
    }) else {
        return;
    };
    let (mut want_dx, mut want_dx_alone, mut want_dw) = (vec![f32::NAN; n * c], vec![f32::NAN; n * c], dw0.clone());
    cpu.rmsnorm_bwd(&mut want_dx, &mut want_dw, &dy, &x, &w, &want_rstd, Some(&dx0), n, c);
    cpu.rmsnorm_bwd(&mut want_dx_alone, &mut vec![0.0; c], &dy, &x, &w, &want_rstd, None, n, c);
    let mut ch = Checks::new(&format!("norm (vec {vec})"), s);
    ch.close32("rmsnorm_fwd out", &want_out, &got[0], tol(s));
    ch.close32("rmsnorm_fwd rstd", &want_rstd, &got[1], F32_TOL);
    ch.close32("rmsnorm_bwd dx", &want_dx, &got[2], tol(s));
    ch.close32("rmsnorm_bwd dx without a residual", &want_dx_alone, &got[4], tol(s));
    ch.exact("rmsnorm_bwd dw", &want_dw, &got[3]);
    ch.exact("rmsnorm_bwd dw in three passes", &want_dw, &got[5]);
    ch.finish();
}

const ROPE: AttnShape = AttnShape { batch: 2, seq: 50, n_heads: 4, n_kv_heads: 2, head_dim: 32 };

fn rope(s: Storage) {
    let sh = ROPE;
    let w = sh.qkv_width();
    let (qkv, table) = (act(s, &data(15, sh.tokens() * w)), data(16, sh.seq * sh.head_dim));
    // The whole (B·T) layout, and rows 37.. alone (a recomputed token range).
    let cases = [(0, sh.tokens()), (37, sh.tokens() - 37)];
    // 8 elements a thread (16-byte accesses: head_dim is a multiple of 8), and one pair.
    assert_eq!(launch::vec_width(sh.head_dim, &[16, 32]), 8);
    let Some(got) = emulate(s, |g| {
        let tb = g.f32("table", &table);
        let mut outs = Vec::new();
        for vec in [8, 1] {
            for (first, rows) in cases {
                for sign in [1.0f32, -1.0] {
                    let q = g.act("qkv", &qkv[first * w..]);
                    let ints = [first, sh.seq, sh.n_heads + sh.n_kv_heads, sh.head_dim, w].map(|v| Arg::I32(v as i32));
                    let mut args = vec![q.arg(), tb.arg()];
                    args.extend(ints);
                    args.extend([Arg::F32(sign), Arg::I32(vec)]);
                    g.run("rope", per_row(rows), &args);
                    outs.push(q);
                }
            }
        }
        outs
    }) else {
        return;
    };
    let cpu = cpu_for(s);
    let mut ch = Checks::new("rope", s);
    let mut k = 0;
    for vec in [8, 1] {
        for (first, _) in cases {
            for inverse in [false, true] {
                let mut want = qkv[first * w..].to_vec();
                cpu.rope(&mut want, &table, sh, first, inverse);
                ch.exact(&format!("rope (vec {vec}) from row {first}, inverse {inverse}"), &act(s, &want), &got[k]);
                k += 1;
            }
        }
    }
    ch.finish();
}

fn swiglu(s: Storage) {
    let mut ch = Checks::new("swiglu", s);
    // One element a thread where h is not a multiple of 8; 8 (16-byte accesses) or 1 where it is.
    for (rows, h, vec) in [(77, 130, 1), (37, 136, 8), (37, 136, 1)] {
        assert!(vec == 1 || launch::vec_width(h, &[16, 32]) == 8, "the backend takes 8 only where h is a multiple of 8");
        let (gu, dout) = (act(s, &data(21, rows * 2 * h)), act(s, &data(22, rows * h)));
        let Some(got) = emulate(s, |g| {
            let (gub, db) = (g.act("gu", &gu), g.act("dout", &dout));
            let (out, dgu, out2, dgu_alone) = (g.nan("out", g.act_elem(), rows * h), g.nan("dgu", g.act_elem(), rows * 2 * h), g.nan("out (backward)", g.act_elem(), rows * h), g.nan("dgu (no out)", g.act_elem(), rows * 2 * h));
            let cfg = g.grid_stride(rows * h / vec);
            g.run("swiglu_fwd", cfg, &[out.arg(), gub.arg(), Arg::Size(rows), Arg::I32(h as i32), Arg::I32(vec as i32)]);
            g.run("swiglu_bwd", cfg, &[dgu.arg(), out2.arg(), db.arg(), gub.arg(), Arg::Size(rows), Arg::I32(h as i32), Arg::I32(vec as i32)]);
            g.run("swiglu_bwd", cfg, &[dgu_alone.arg(), Arg::Null, db.arg(), gub.arg(), Arg::Size(rows), Arg::I32(h as i32), Arg::I32(vec as i32)]);
            vec![out, dgu, out2, dgu_alone]
        }) else {
            return;
        };
        let cpu = cpu_for(s);
        let (mut want_out, mut want_dgu) = (vec![0.0; rows * h], vec![0.0; rows * 2 * h]);
        cpu.swiglu_fwd(&mut want_out, &gu, rows, h);
        cpu.swiglu_bwd(&mut want_dgu, None, &dout, &gu, rows, h);
        ch.close32(&format!("swiglu_fwd h={h} vec={vec}"), &want_out, &got[0], tol(s));
        ch.close32(&format!("swiglu_bwd h={h} vec={vec}"), &want_dgu, &got[1], tol(s));
        // The backward's output is the forward kernel's bit for bit, and dgu is the same without it.
        ch.exact(&format!("swiglu_bwd out h={h} vec={vec}"), &got[0].iter().map(|&x| x as f32).collect::<Vec<_>>(), &got[2]);
        ch.exact(&format!("swiglu_bwd without out h={h} vec={vec}"), &got[1].iter().map(|&x| x as f32).collect::<Vec<_>>(), &got[3]);
    }
    ch.finish();
}

fn softmax(s: Storage) {
    // Router rows are f32 in both storages; 40 columns take a warp two passes, and 91 rows leave
    // the last block's warps partly without a row.
    let (rows, cols) = (91, 40);
    let z = data(23, rows * cols);
    let cpu = cpu_for(s);
    let mut want_p = vec![0.0; rows * cols];
    cpu.softmax_rows(&mut want_p, &z, rows, cols);
    let Some(got) = emulate(s, |g| {
        let (zb, out) = (g.f32("logits", &z), g.nan("out", Elem::F32, rows * cols));
        g.run("softmax_rows_fwd", warp_per_row(rows), &[out.arg(), zb.arg(), Arg::I32(rows as i32), Arg::I32(cols as i32)]);
        vec![out]
    }) else {
        return;
    };
    let mut ch = Checks::new("softmax", s);
    ch.close32("softmax_rows_fwd", &want_p, &got[0], F32_TOL);
    ch.finish();
}

/// The router's backward (in softmax.cu) on a real routing of 600 tokens (three blocks of the
/// grid-stride launch, so the capped grid loops): Top-P with every aux loss on (1 to 6 experts a
/// token), and Top-K with none (the branches without the log); bitwise the CPU's f32 values
/// rounded to activation storage.
fn router_bwd(s: Storage) {
    use motley::model::config::{MoeConfig, Routing as Kind};
    use motley::model::router;
    let (n, e) = (600, 6);
    let z: Vec<f32> = data(31, n * e).iter().map(|v| 2.0 * v).collect();
    let cpu = cpu_for(s);
    let mut p = vec![0.0; n * e];
    cpu.softmax_rows(&mut p, &z, n, e);
    let moe = |routing, weights: f32| MoeConfig {
        expert_widths: vec![16, 32, 48, 64, 80, 96],
        routing,
        top_k: 2,
        top_p: 0.7,
        load_balance: 0.01 * weights,
        p_penalty: 0.1 * weights,
        entropy: 0.03 * weights,
        z_loss: 1e-3 * weights,
    };
    let mut ch = Checks::new("router_bwd", s);
    // The last with an expert capacity: gate gradients for the kept slots only.
    let capacity = DispatchMode::Capacity { factor: 0.8, policy: DropPolicy::Probs };
    let cases = [("top-p, every aux loss", moe(Kind::TopP, 1.0), DispatchMode::Dropless), ("top-k, no aux loss", moe(Kind::TopK, 0.0), DispatchMode::Dropless), ("top-k, capacity 0.8", moe(Kind::TopK, 1.0), capacity)];
    for (name, moe, mode) in cases {
        let routing = apply_capacity(router::select(&p, n, e, &moe), &p, mode).unwrap();
        assert_eq!(routing.n_dropped() > 0, mode != DispatchMode::Dropless, "{name}");
        let args = router::BackwardArgs::new(&routing, &moe);
        let grad = args.grad();
        let dgate = data(32, routing.kept.n_slots());
        let Some(got) = emulate(s, |g| {
            let (dg, pb, zb) = (g.f32("dgate", &dgate), g.f32("probs", &p), g.f32("logits", &z));
            let (off, sl, ex) = (g.u32("offsets", grad.by_token.offsets), g.u32("slots", grad.by_token.slots), g.u32("slot_expert", grad.slot_expert));
            let (gate, aux) = (g.f32("gate", grad.gate), g.f32("aux", &[grad.load_balance, grad.p_penalty].concat()));
            let dz = g.nan("dlogits", g.act_elem(), n * e);
            let buffers = [&dz, &dg, &pb, &zb, &off, &sl, &ex, &gate, &aux].map(|b| b.arg());
            let scalars = [Arg::F32(grad.entropy), Arg::F32(grad.z_loss), Arg::I32(n as i32), Arg::I32(e as i32), Arg::I32(dgate.len() as i32)];
            g.run("router_bwd", g.grid_stride(n), &buffers.into_iter().chain(scalars).collect::<Vec<_>>());
            vec![dz]
        }) else {
            return;
        };
        let mut want = vec![0.0; n * e];
        cpu.router_bwd(&mut want, &dgate, &p, &z, grad);
        ch.exact(&format!("router_bwd ({name})"), &act(s, &want), &got[0]);
    }
    ch.finish();
}

/// Routing on the device (softmax.cu's route_* kernels, launched as `Backend::route` launches
/// them) against `router::select` and `router::aux_losses` on the same probabilities: slots and
/// gates bitwise, counts exact, aux losses to f32 rounding. 2,100 tokens (66 groups of
/// ROUTE_GROUP, the last partial: route_scan's lanes take three groups each, the last lanes
/// none; capped grid-stride loops), exact ties between experts (equal logits on every seventh
/// token), Top-K and Top-P, E = 6 and E = 40 (the chosen mask's second word).
fn route(s: Storage) {
    use motley::backend::{RouteRule, RoutedSlots};
    use motley::model::config::{MoeConfig, Routing as Kind};
    use motley::model::router;
    let n: usize = 2100;
    let groups = n.div_ceil(launch::ROUTE_GROUP);
    let mut ch = Checks::new("route", s);
    for e in [6, 40] {
        let mut z: Vec<f32> = data(33, n * e).iter().map(|v| 2.0 * v).collect();
        for t in (0..n).step_by(7) {
            z[t * e + 3] = z[t * e + 1];
        }
        let mut p = vec![0.0; n * e];
        cpu_for(s).softmax_rows(&mut p, &z, n, e);
        for (kind, top_k, top_p) in [(Kind::TopK, 2, 0.0), (Kind::TopK, 5, 0.0), (Kind::TopP, 0, 0.6)] {
            let moe = MoeConfig { expert_widths: (1..=e).map(|i| 16 * i).collect(), routing: kind, top_k: top_k.max(1), top_p, load_balance: 0.01, p_penalty: 0.1, entropy: 0.03, z_loss: 1e-3 };
            let (rule_k, rule_p) = match router::rule(&moe) {
                RouteRule::TopK(k) => (k as i32, 0.0),
                RouteRule::TopP(p) => (0, p),
            };
            let capacity = n * e;
            let Some(got) = emulate(s, |g| {
                let (pb, zb) = (g.f32("probs", &p), g.f32("logits", &z));
                let (chosen, stats) = (g.nan("chosen", Elem::U32, 2 * n), g.nan("stats", Elem::F32, 2 * n));
                let (counts, sums) = (g.nan("counts", Elem::U32, e * groups), g.nan("sums", Elem::F64, (e + 2) * groups));
                let (offsets, totals, totals_q) = (g.nan("offsets", Elem::U32, e * groups), g.nan("totals", Elem::U32, e), g.nan("totals_q", Elem::F64, e + 2));
                let (token, gate) = (g.nan("token", Elem::U32, capacity), g.nan("gate", Elem::F32, capacity));
                let (ni, ei, gi, group) = (|| Arg::I32(n as i32), || Arg::I32(e as i32), || Arg::I32(groups as i32), || Arg::I32(launch::ROUTE_GROUP as i32));
                g.run("route_select", g.grid_stride(n), &[chosen.arg(), stats.arg(), pb.arg(), zb.arg(), ni(), ei(), Arg::I32(rule_k), Arg::F32(rule_p)]);
                g.run("route_group_sums", g.grid_stride((e + 2) * groups), &[counts.arg(), sums.arg(), chosen.arg(), pb.arg(), stats.arg(), ni(), ei(), gi(), group()]);
                g.run("route_scan", launch::route_scan(e), &[offsets.arg(), totals.arg(), totals_q.arg(), counts.arg(), sums.arg(), ei(), gi()]);
                g.run("route_layout", g.grid_stride(e * groups), &[token.arg(), gate.arg(), chosen.arg(), pb.arg(), offsets.arg(), totals.arg(), ni(), ei(), gi(), group()]);
                vec![totals, totals_q, token, gate]
            }) else {
                return;
            };
            let counts: Vec<usize> = got[0].iter().map(|&c| c as usize).collect();
            let slots: usize = counts.iter().sum();
            let device = RoutedSlots {
                token: got[2][..slots].iter().map(|&t| t as u32).collect(),
                gate: got[3][..slots].iter().map(|&g| g as f32).collect(),
                counts,
                sum_probs: got[1][..e].to_vec(),
                entropy: got[1][e],
                z: got[1][e + 1],
            };
            let (routing, aux) = router::from_slots(device, n, &moe);
            let want = router::select(&p, n, e, &moe);
            let case = format!("E {e}, {kind:?} (k {top_k}, p {top_p})");
            if routing != want {
                ch.failures.push(format!("{case}: the slots differ from router::select's ({} against {} slots)", routing.n_slots(), want.n_slots()));
            }
            let a = router::aux_losses(&p, &z, &want, &moe);
            let as_vec = |l: router::AuxLosses| vec![l.load_balance as f64, l.p_penalty as f64, l.entropy as f64, l.z_loss as f64];
            ch.close(&format!("{case}: aux losses"), &as_vec(a), &as_vec(aux), 1e-5);
        }
    }
    ch.finish();
}

fn permute(s: Storage) {
    // Rows of width 300 (one element a thread) and 304 (8, or one).
    for (c, vec) in [(300, 1), (304, 8), (304, 1)] {
        permute_with(s, c, vec);
    }
}

fn permute_with(s: Storage, c: usize, vec: i32) {
    // 5 tokens, 7 slots (top-k varies per token, one token has none).
    let index = [0u32, 2, 4, 1, 2, 4, 0];
    let offsets = [0u32, 2, 3, 5, 5, 7];
    let slots = [0u32, 6, 3, 1, 4, 2, 5];
    let weight: Vec<f32> = data(25, index.len()).iter().map(|w| w.abs()).collect();
    let (x, y, base) = (act(s, &data(26, 5 * c)), act(s, &data(27, index.len() * c)), act(s, &data(28, 5 * c)));
    let Some(got) = emulate(s, |g| {
        let (xb, yb, idx, wb) = (g.act("x", &x), g.act("y", &y), g.u32("index", &index), g.f32("weight", &weight));
        let baseb = g.act("residual", &base);
        let (off, sl) = (g.u32("offsets", &offsets), g.u32("slots", &slots));
        let mut outs = Vec::new();
        for weighted in [false, true] {
            let w = if weighted { wb.arg() } else { Arg::Null };
            let gathered = g.nan("gathered", g.act_elem(), index.len() * c);
            g.run("gather_rows", per_row(index.len()), &[gathered.arg(), xb.arg(), idx.arg(), w, Arg::I32(c as i32), Arg::I32(vec)]);
            // Weighted with a residual (the forward's unpermute), unweighted without (the backward's).
            let (w, residual) = if weighted { (wb.arg(), baseb.arg()) } else { (Arg::Null, Arg::Null) };
            let combined = g.nan("combined", g.act_elem(), 5 * c);
            g.run("combine_rows", per_row(5), &[combined.arg(), yb.arg(), off.arg(), sl.arg(), w, residual, Arg::I32(c as i32), Arg::I32(vec)]);
            outs.extend([gathered, combined]);
        }
        let dots = g.nan("dots", Elem::F32, index.len());
        g.run("gathered_dots", warp_per_row(index.len()), &[dots.arg(), xb.arg(), yb.arg(), idx.arg(), Arg::I32(index.len() as i32), Arg::I32(c as i32), Arg::I32(vec)]);
        outs.push(dots);
        outs
    }) else {
        return;
    };
    let cpu = cpu_for(s);
    let by_token = TokenSlots { offsets: &offsets, slots: &slots };
    let mut ch = Checks::new(&format!("permute (c {c}, vec {vec})"), s);
    for (k, weighted) in [false, true].into_iter().enumerate() {
        let mut gathered = vec![0.0; index.len() * c];
        let mut combined = vec![f32::NAN; 5 * c];
        if weighted {
            cpu.gather_rows_scaled(&mut gathered, &x, &index, &weight, c);
            cpu.combine_rows(&mut combined, &y, by_token, Some(&weight), Some(&base), c);
        } else {
            cpu.gather_rows(&mut gathered, &x, &index, c);
            cpu.combine_rows(&mut combined, &y, by_token, None, None, c);
        }
        ch.exact(&format!("gather_rows (weighted {weighted})"), &act(s, &gathered), &got[2 * k]);
        ch.exact(&format!("combine_rows (weighted {weighted})"), &act(s, &combined), &got[2 * k + 1]);
    }
    let mut dots = vec![0.0; index.len()];
    cpu.gathered_dots(&mut dots, &x, &y, &index, c);
    ch.close32("gathered_dots", &dots, &got[4], F32_TOL);
    ch.finish();
}

fn loss(s: Storage) {
    // 8 elements a thread (1000 is a multiple of 8), and one.
    for vec in [8, 1] {
        loss_with(s, vec);
    }
}

fn loss_with(s: Storage, vec: i32) {
    // The CPU reference is the classifier with W = I (c = v): its logits are x itself and its
    // dx is dlogits. The kernel reads logits in activation storage, so the reference gets them
    // rounded as stored.
    let (n, v) = (20, 1000);
    let logits = act(s, &data(30, n * v).iter().map(|z| 3.0 * z).collect::<Vec<_>>());
    let targets: Vec<u32> = (0..n as u32).map(|i| (i * 37) % v as u32).collect();
    let (dloss, grad_scale) = (1.5f32, 1.5 / n as f32);
    let Some(got) = emulate(s, |g| {
        let tb = g.u32("targets", &targets);
        let mut outs = Vec::new();
        for scale in [grad_scale, 0.0] {
            // The gradient overwrites the logits.
            let lb = g.act("logits", &logits);
            let losses = g.nan("losses", Elem::F32, n);
            g.run("softmax_xent", per_row(n), &[lb.arg(), losses.arg(), tb.arg(), Arg::I32(v as i32), Arg::F32(scale), Arg::I32(vec)]);
            outs.push(losses);
            outs.push(lb);
        }
        outs
    }) else {
        return;
    };
    let cpu = cpu_for(s);
    let eye: Vec<f32> = (0..v * v).map(|i| if i % (v + 1) == 0 { 1.0 } else { 0.0 }).collect();
    let (mut dx, mut dw) = (vec![0.0; n * v], vec![0.0; v * v]);
    let mut scratch = vec![0.0; cpu.classifier_scratch_len(n, v)];
    let want_losses = cpu.classifier(&logits, &eye, &targets, n, v, v, Some((dx.as_mut_slice(), dw.as_mut_slice(), dloss)), &mut scratch);
    let mut ch = Checks::new(&format!("loss (vec {vec})"), s);
    ch.close32("softmax_xent losses", &want_losses, &got[0], F32_TOL);
    ch.close32("softmax_xent dlogits", &dx, &got[1], tol(s));
    ch.close32("softmax_xent losses (no gradient)", &want_losses, &got[2], F32_TOL);
    ch.exact("softmax_xent without a gradient leaves the logits", &logits, &got[3]);
    ch.finish();
}

fn optim(s: Storage) {
    let n = 10_007;
    let (p, m, g) = (data(31, n), data(32, n), data(34, n));
    let v: Vec<f32> = data(33, n).iter().map(|x| x.abs()).collect();
    let hp = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, step: 7 };
    let (grad_scale, decay) = (0.5, true);
    let Some(got) = emulate(s, |gpu| {
        let mut outs = Vec::new();
        // Without a working copy (null, as with f32 storage) and with one; 8 elements a thread
        // over the first n − 7 (a multiple of 8), one over all n.
        for (with_work, vec) in [(false, 1), (true, 1), (true, 8)] {
            let n = if vec == 8 { n - 7 } else { n };
            let (pb, mb, vb, gb) = (gpu.f32("master", &p), gpu.f32("m", &m), gpu.f32("v", &v), gpu.f32("g", &g));
            let work = gpu.nan("work", gpu.act_elem(), n);
            let w = if with_work { work.arg() } else { Arg::Null };
            let args = AdamWArgs::new(hp, decay);
            let list = [pb.arg(), w, mb.arg(), vb.arg(), gb.arg(), Arg::Size(n), Arg::Bytes(bytes_of(&args)), Arg::F32(grad_scale), Arg::I32(vec)];
            gpu.run("adamw", gpu.grid_stride(n / vec as usize), &list);
            outs.extend([pb, mb, vb, work]);
        }
        outs
    }) else {
        return;
    };
    let cpu = cpu_for(s);
    let (mut wp, mut wm, mut wv, mut work) = (p.clone(), m.clone(), v.clone(), vec![0.0; n]);
    cpu.adamw(&mut wp, Some(work.as_mut_slice()), &mut wm, &mut wv, &g, hp, grad_scale, decay);
    let mut ch = Checks::new("optim", s);
    for k in 0..3 {
        // The vec-8 run covers the first n − 7 elements and leaves the rest as they were.
        let covered = if k == 2 { n - 7 } else { n };
        ch.exact("adamw master", &wp[..covered], &got[4 * k][..covered]);
        ch.exact("adamw m", &wm[..covered], &got[4 * k + 1][..covered]);
        ch.exact("adamw v", &wv[..covered], &got[4 * k + 2][..covered]);
    }
    ch.exact("adamw leaves what it is not given", &p[n - 7..], &got[8][n - 7..]);
    assert!(got[3].iter().all(|x| x.is_nan()), "adamw wrote a null working copy");
    ch.exact("adamw working copy", &work, &got[7]);
    ch.exact("adamw working copy (vec 8)", &work[..n - 7], &got[11][..n - 7]);
    ch.finish();
}

// ---- attention ---------------------------------------------------------------------------------

/// Every head_dim with kernels (16 to 128), sequences of exactly one tile (64) and one forward
/// block of two row atoms (128), one row past a tile (65, 129) or a block (130), partial last
/// tiles and blocks (with warps whose rows are all past the sequence, or all before the last
/// tile's keys: 200), and groups of 1, 2 and 4 query heads per kv head.
const ATTN: [AttnShape; 8] = [
    AttnShape { batch: 2, seq: 200, n_heads: 4, n_kv_heads: 2, head_dim: 64 },
    AttnShape { batch: 2, seq: 160, n_heads: 4, n_kv_heads: 2, head_dim: 128 },
    AttnShape { batch: 1, seq: 128, n_heads: 4, n_kv_heads: 1, head_dim: 16 },
    AttnShape { batch: 1, seq: 130, n_heads: 2, n_kv_heads: 2, head_dim: 32 },
    AttnShape { batch: 1, seq: 64, n_heads: 2, n_kv_heads: 1, head_dim: 48 },
    AttnShape { batch: 1, seq: 129, n_heads: 2, n_kv_heads: 1, head_dim: 80 },
    AttnShape { batch: 2, seq: 65, n_heads: 2, n_kv_heads: 2, head_dim: 96 },
    AttnShape { batch: 1, seq: 90, n_heads: 4, n_kv_heads: 4, head_dim: 112 },
];

fn attention(s: Storage) {
    check_attention("attention", &ATTN, s, |pass, sh| (pass.function(sh.head_dim), attn::launch_config(HOPPER_SMEM, pass, sh), Pass::query_tile(sh.head_dim), false));
}

/// The Hopper kernels (wgmma, head_dim 64) against the CPU, as the mma.sync ones are: forward
/// blocks and key blocks of 128 rows, the last partial or past the sequence; query tiles of 64,
/// the last partial; walks of one to five key tiles (forward: the three buffers each reused)
/// and of up to nine query tiles (backward); groups of 2 and 1 query heads per kv head.
const HOPPER_ATTN: [AttnShape; 3] = [
    AttnShape { batch: 2, seq: 200, n_heads: 4, n_kv_heads: 2, head_dim: 64 },
    AttnShape { batch: 1, seq: 300, n_heads: 2, n_kv_heads: 2, head_dim: 64 },
    AttnShape { batch: 1, seq: 520, n_heads: 2, n_kv_heads: 1, head_dim: 64 },
];

fn attention_hopper(s: Storage) {
    check_attention("attention_hopper", &HOPPER_ATTN, s, |pass, sh| (pass.hopper_function().to_string(), pass.hopper_config(sh), attn::HOPPER_QUERY_TILE, true));
}

/// Forward and backward of attention for `shapes` on the kernels `kernel` names (entry point,
/// launch, the backward's query tile, and whether it takes tensor maps: the Hopper kernels'
/// TMA copies, in bf16 storage), against the CPU.
fn check_attention(name: &str, shapes: &[AttnShape], s: Storage, kernel: impl Fn(Pass, AttnShape) -> (String, LaunchConfig, usize, bool)) {
    let mut ch = Checks::new(name, s);
    for (k, &sh) in shapes.iter().enumerate() {
        let seed = 40 + 10 * k as u64;
        // bf16 values for what the kernels stage as bf16 tiles in either storage.
        let bf = |v: &[f32]| act(Storage::Bf16, v);
        let (qkv, dout) = (bf(&data(seed, sh.tokens() * sh.qkv_width())), bf(&data(seed + 1, sh.tokens() * sh.out_width())));
        let cpu = cpu_for(s);
        let (mut want_out, mut lse) = (vec![0.0; sh.tokens() * sh.out_width()], vec![0.0; sh.batch * sh.n_heads * sh.seq]);
        cpu.attention_fwd(&mut want_out, &mut lse, &qkv, sh);
        // The backward's inputs, the same on both sides: O as stored, the CPU's lse.
        let out = act(s, &want_out);
        let mut want_dqkv = vec![0.0; qkv.len()];
        cpu.attention_bwd(&mut want_dqkv, &dout, &out, &lse, &qkv, sh, &mut []);
        let heads = bytes_of(&attn::heads(sh));
        let scale = 1.0 / (sh.head_dim as f32).sqrt();
        let Some(got) = emulate(s, |g| {
            let (q, o, lb, db) = (g.act("qkv", &qkv), g.act("out_in", &out), g.f32("lse_in", &lse), g.act("dout", &dout));
            let (fwd_out, fwd_lse) = (g.nan("out", g.act_elem(), want_out.len()), g.nan("lse", Elem::F32, lse.len()));
            // The tensor map of an activation of `width` columns as attention.rs's hopper_map
            // makes it (zeros where f32 storage leaves it unused).
            let map = |pass: Pass, buf: &Buf, width: usize| {
                let (dims, strides) = attn::hopper_map_layout(width, sh);
                Arg::Bytes(if s == Storage::Bf16 { g.emu.tensor_map(buf, &dims, &strides, &pass.hopper_box()).unwrap() } else { vec![0; 128] })
            };
            let (fwd, fwd_cfg, _, takes_maps) = kernel(Pass::Forward, sh);
            let mut fwd_args = vec![fwd_out.arg(), fwd_lse.arg(), q.arg(), Arg::Bytes(heads.clone()), Arg::F32(scale)];
            if takes_maps {
                fwd_args.push(map(Pass::Forward, &q, sh.qkv_width()));
            }
            g.run(&fwd, fwd_cfg, &fwd_args);
            let delta = g.nan("delta", Elem::F32, lse.len());
            let dqkv = g.nan("dqkv", g.act_elem(), qkv.len());
            // The dQ accumulator as the backend allocates it (not zeroed: NaN until written).
            let dq_acc = g.nan("dq_acc", Elem::F32, want_out.len());
            let mut runs = Vec::new();
            // Twice into the same dqkv: the backward overwrites it, bitwise the same.
            for _ in 0..2 {
                g.run("attn_bwd_delta", attn::delta_config(sh), &[delta.arg(), db.arg(), o.arg(), Arg::Bytes(heads.clone()), Arg::I32(sh.tokens() as i32)]);
                let (bwd, cfg, query_tile, takes_maps) = kernel(Pass::Backward, sh);
                let turns = g.u32("turns", &vec![0; attn::turns_len(sh, query_tile)]);
                let mut bwd_args = vec![dqkv.arg(), dq_acc.arg(), turns.arg(), db.arg(), lb.arg(), delta.arg(), q.arg(), Arg::Bytes(heads.clone()), Arg::F32(scale)];
                if takes_maps {
                    bwd_args.extend([map(Pass::Backward, &q, sh.qkv_width()), map(Pass::Backward, &db, sh.out_width())]);
                }
                g.run(&bwd, cfg, &bwd_args);
                runs.push(dqkv.values());
            }
            assert!(runs[0].iter().zip(&runs[1]).all(|(a, b)| a.to_bits() == b.to_bits()), "{s:?} {sh:?}: a second backward into dqkv differs");
            vec![fwd_out, fwd_lse, dqkv]
        }) else {
            return;
        };
        let tol = if s == Storage::F32 { ATTN_TOL } else { BF16_ATTN_TOL };
        ch.close32(&format!("{sh:?} out"), &want_out, &got[0], tol);
        ch.close32(&format!("{sh:?} lse"), &lse, &got[1], F32_TOL);
        ch.close32(&format!("{sh:?} dqkv"), &want_dqkv, &got[2], tol);
    }
    ch.finish();
}

// ---- the experts' grouped GEMMs ----------------------------------------------------------------

/// Every kernel of experts.cu against the CPU's grouped matmuls and SwiGLU: experts of widths
/// 128, 256, 128 and 384 with 130 rows (a partial second row tile), none, 70 and 129, d = 512
/// (eight steps, so each of the six shared buffers is refilled), as the model chains them: the up
/// projection with SwiGLU, the down projection (`grouped_nt_wgmma`, k = h per expert), SwiGLU's
/// backward through it, the input gradient (`grouped_nn_wgmma`, k = 2h). The up projection
/// gathers its rows from 200 tokens' by an index (every token twice or so, out of order), and
/// must give bitwise what it gives on those rows gathered beforehand; its `act` must be bitwise
/// what `swiglu_fwd` computes from its `gu`, and the backward's `act` (recomputed from that
/// `gu`) bitwise the forward's. The backward's kernels likewise pick their routed rows: `dy` as
/// the combined output's gradient of each slot's token times the slot's gate (SwiGLU's backward
/// and dW_down), bitwise what they give on `gather_rows_scaled`'s copy, and dW_gu's `xe`, plain
/// and weighted.
fn experts(s: Storage) {
    let c = 512;
    let experts = [(130, 128), (0, 256), (70, 128), (129, 384)];
    let ExpertChain { up, down, dact: dact_of, dx: dx_of, dw_down, dw_gu, rows, w_len, act_len } = expert_chain(c, &experts);
    // bf16 values: the kernels stage bf16 tiles in either storage.
    let bf = |v: &[f32]| act(Storage::Bf16, v);
    let tokens = 200;
    let index: Vec<u32> = (0..rows).map(|i| ((i * 7919 + 13) % tokens) as u32).collect();
    let (x_tokens, w, dy_tokens) = (bf(&data(61, tokens * c)), bf(&data(62, w_len)), bf(&data(63, tokens * c)));
    let gates: Vec<f32> = data(64, rows).iter().map(|g| g.abs() + 0.05).collect();
    // Each slot's row of a token matrix, times its gate where given: gather_rows(_scaled).
    let gather = |m: &[f32], gates: Option<&[f32]>| -> Vec<f32> {
        index.iter().enumerate().flat_map(|(i, &t)| m[t as usize * c..][..c].iter().map(move |&v| gates.map_or(v, |g| v * g[i]))).collect()
    };
    let (x, dy) = (gather(&x_tokens, None), bf(&gather(&dy_tokens, Some(&gates))));
    let Some(got) = emulate(s, |g| {
        let (xb, wb, dyb) = (g.act("xe", &x), g.act("w", &w), g.act("dy", &dy));
        let (xtb, dytb, ib, gb) = (g.act("x (tokens)", &x_tokens), g.act("dy (tokens)", &dy_tokens), g.u32("index", &index), g.f32("gates", &gates));
        let (gu_gathered, out_gathered) = (g.nan("gu (gathering)", g.act_elem(), 2 * act_len), g.nan("act (gathering)", g.act_elem(), act_len));
        let (gu, out, y) = (g.nan("gu", g.act_elem(), 2 * act_len), g.nan("act", g.act_elem(), act_len), g.nan("y", g.act_elem(), rows * c));
        let (dgu, out_bwd, dx) = (g.nan("dgu", g.act_elem(), 2 * act_len), g.nan("act (backward)", g.act_elem(), act_len), g.nan("dx", g.act_elem(), rows * c));
        // The weight gradients: dW_down written, dW_gu written, then dW_down added to (twice
        // the product); the expert without rows gets zeros. dW_gu again into dw2 with xe's rows
        // read through the index (the backward's gather fused), dW_down into dw3 with dy's rows
        // picked and weighted, dW_gu into dw4 with xe's weighted.
        let (dw, dw2) = (g.nan("dw", Elem::F32, w_len), g.nan("dw (gathering)", Elem::F32, w_len));
        let (dw3, dw4) = (g.nan("dw (picking dy)", Elem::F32, w_len), g.nan("dw (weighting xe)", Elem::F32, w_len));
        let (dgu_picked, act_picked) = (g.nan("dgu (picking dy)", g.act_elem(), 2 * act_len), g.nan("act (picking dy)", g.act_elem(), act_len));
        let addr = |b: &Buf| b.data_ptr() as u64;
        let ops = |a: &Buf, out: &Buf| expert_launch::Operands { a: addr(a), w: addr(&wb), out: addr(out), elem_bytes: g.act_elem().bytes(), ..Default::default() };
        let grad = |a: &Buf, b: &Buf, out: &Buf| expert_launch::Operands { a: addr(a), w: addr(b), out: addr(out), elem_bytes: g.act_elem().bytes(), ..Default::default() };
        let (index_at, gates_at) = (addr(&ib), addr(&gb));
        let pick = |side, weighted: bool| {
            move |mut c: expert_launch::Call| {
                c.place_pick(side, index_at, weighted.then_some(gates_at));
                c
            }
        };
        let calls = [
            expert_launch::up_call(expert_launch::Operands { act: addr(&out), ..ops(&xb, &gu) }, &up, false),
            expert_launch::up_call(expert_launch::Operands { act: addr(&out_gathered), ..ops(&xtb, &gu_gathered) }, &up, true).map(pick(Side::A, false)),
            expert_launch::gemm_call(ops(&out, &y), &down, true),
            expert_launch::dact_call(expert_launch::Operands { gu: addr(&gu), act: addr(&out_bwd), ..ops(&dyb, &dgu) }, &dact_of, false),
            expert_launch::dact_call(expert_launch::Operands { gu: addr(&gu), act: addr(&act_picked), ..ops(&dytb, &dgu_picked) }, &dact_of, true).map(pick(Side::A, true)),
            expert_launch::gemm_call(ops(&dgu, &dx), &dx_of, false),
            expert_launch::grad_call(grad(&dyb, &out_bwd, &dw), &dw_down, false, [false; 2]),
            expert_launch::grad_call(grad(&dgu, &xb, &dw), &dw_gu, false, [false; 2]),
            expert_launch::grad_call(grad(&dyb, &out_bwd, &dw), &dw_down, true, [false; 2]),
            expert_launch::grad_call(grad(&dgu, &xtb, &dw2), &dw_gu, false, [false, true]).map(pick(Side::W, false)),
            expert_launch::grad_call(grad(&dytb, &out_bwd, &dw3), &dw_down, false, [true, false]).map(pick(Side::A, true)),
            expert_launch::grad_call(grad(&dgu, &xtb, &dw4), &dw_gu, false, [false, true]).map(pick(Side::W, true)),
        ];
        for call in calls {
            let call = call.expect("the backend takes these products");
            let table = Buf::new("segments", Elem::U32, call.segments.len() * std::mem::size_of::<expert_launch::Segment>() / 4);
            table.write(call.segments.iter().map(bytes_of));
            let args = [table.arg(), Arg::I32(call.segments.len() as i32), Arg::I32(call.tiles as i32)];
            let cfg = g.persistent(&call);
            match call.kernel {
                Fused::Up => g.run("expert_up_wgmma", cfg, &args),
                Fused::Dact => g.run("expert_dact_wgmma", cfg, &args),
                Fused::GemmNt => g.run("grouped_nt_wgmma", cfg, &args),
                Fused::GemmNn => g.run("grouped_nn_wgmma", cfg, &args),
                Fused::GemmTn => g.run("grouped_tn_wgmma", cfg, &args),
                Fused::GemmTnAdd => g.run("grouped_tn_add_wgmma", cfg, &args),
            }
        }
        // What swiglu_fwd makes of the forward's gu, expert by expert.
        let again = g.nan("act (swiglu_fwd)", g.act_elem(), act_len);
        for glu in &up {
            let (m, h) = (glu.gemm.m, glu.gemm.n / 2);
            g.run("swiglu_fwd", g.grid_stride(m * h / 8), &[again.at(glu.act), gu.at(glu.gemm.out), Arg::Size(m), Arg::I32(h as i32), Arg::I32(8)]);
        }
        vec![gu, out, again, dgu, out_bwd, y, dx, gu_gathered, out_gathered, dw, dw2, dgu_picked, act_picked, dw3, dw4]
    }) else {
        return;
    };
    // Each step's CPU reference starts from the kernels' previous outputs: as staged (bf16) where
    // they are a product's operand, as stored where an epilogue reads them (dact's gu).
    let as_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
    let staged = |v: &[f64]| bf(&as_f32(v));
    let cpu = cpu_for(s);
    let (mut want_gu, mut want_act) = (vec![0.0; 2 * act_len], vec![0.0; act_len]);
    cpu.grouped_matmul_swiglu(&mut want_gu, &mut want_act, (&x_tokens, Some(Pick::rows(&index))), &w, &up);
    let mut want_y = vec![0.0; rows * c];
    cpu.grouped_matmul(&mut want_y, &staged(&got[1]), &w, &down, false, true, false);
    let (mut want_dgu, mut want_act_bwd, mut dact) = (vec![0.0; 2 * act_len], vec![0.0; act_len], vec![0.0; act_len]);
    cpu.grouped_matmul_swiglu_bwd(&mut want_dgu, &mut want_act_bwd, &mut dact, (&dy, None), &w, &as_f32(&got[0]), &dact_of);
    let mut want_dx = vec![0.0; rows * c];
    cpu.grouped_matmul(&mut want_dx, &staged(&got[3]), &w, &dx_of, false, false, false);
    let mut want_dw = vec![0.0; w_len];
    cpu.grouped_matmul(&mut want_dw, &dy, &staged(&got[4]), &dw_down, true, false, false);
    cpu.grouped_matmul(&mut want_dw, &staged(&got[3]), &x, &dw_gu, true, false, false);
    cpu.grouped_matmul(&mut want_dw, &dy, &staged(&got[4]), &dw_down, true, false, true);
    let mut ch = Checks::new("experts", s);
    ch.close32("expert_up_wgmma gu", &want_gu, &got[0], tol(s));
    ch.close32("expert_up_wgmma act", &want_act, &got[1], 2.0 * tol(s));
    ch.exact("expert_up_wgmma act is swiglu_fwd's of its gu", &as_f32(&got[2]), &got[1]);
    ch.exact("expert_up_wgmma gathering its rows: gu", &as_f32(&got[0]), &got[7]);
    ch.exact("expert_up_wgmma gathering its rows: act", &as_f32(&got[1]), &got[8]);
    ch.close32("grouped_nt_wgmma (down projection)", &want_y, &got[5], tol(s));
    ch.close32("expert_dact_wgmma dgu", &want_dgu, &got[3], 2.0 * tol(s));
    ch.close32("expert_dact_wgmma act", &want_act_bwd, &got[4], tol(s));
    ch.exact("expert_dact_wgmma act is the forward's", &as_f32(&got[1]), &got[4]);
    ch.close32("grouped_nn_wgmma (input gradient)", &want_dx, &got[6], tol(s));
    ch.close32("grouped_tn_wgmma, grouped_tn_add_wgmma (weight gradients)", &want_dw, &got[9], tol(s));
    let part = |gemms: &[Gemm], v: &[f64], times: f64| gemms.iter().flat_map(|g| v[g.out..g.out + g.m * g.n].iter().map(move |&x| x * times)).collect::<Vec<f64>>();
    let as_want = |v: Vec<f64>| as_f32(&v);
    ch.exact("grouped_tn_wgmma gathering b's rows: dW_gu", &as_want(part(&dw_gu, &got[9], 1.0)), &part(&dw_gu, &got[10], 1.0));
    ch.exact("expert_dact_wgmma picking dy's weighted rows: dgu", &as_f32(&got[3]), &got[11]);
    ch.exact("expert_dact_wgmma picking dy's weighted rows: act", &as_f32(&got[4]), &got[12]);
    // dw's dW_down is the product twice (written, then added to): exactly twice dw3's.
    ch.exact("grouped_tn_wgmma picking a's weighted rows: dW_down", &as_want(part(&dw_down, &got[9], 1.0)), &part(&dw_down, &got[13], 2.0));
    let mut want_dw4 = vec![0.0; w_len];
    cpu.grouped_matmul(&mut want_dw4, &staged(&got[3]), &bf(&gather(&x_tokens, Some(&gates))), &dw_gu, true, false, false);
    ch.close32("grouped_tn_wgmma picking b's weighted rows: dW_gu", &part(&dw_gu, &want_dw4.iter().map(|&x| x as f64).collect::<Vec<_>>(), 1.0).iter().map(|&x| x as f32).collect::<Vec<_>>(), &part(&dw_gu, &got[14], 1.0), tol(s));
    ch.finish();
}

/// One test per kernel file and storage: `<file>::f32` and `<file>::bf16`.
macro_rules! per_storage {
    ($($file:ident),*) => {$(
        mod $file {
            use super::*;
            #[test]
            fn f32() {
                super::$file(Storage::F32)
            }
            #[test]
            fn bf16() {
                super::$file(Storage::Bf16)
            }
        }
    )*};
}

per_storage!(elementwise, embed, norm, rope, swiglu, softmax, router_bwd, route, permute, loss, optim, attention, attention_hopper, experts);

/// Every entry point the backend loads is launched somewhere above: by its quoted name, or, for
/// the per-head_dim attention passes, by a shape of [`ATTN`] with that head_dim (the Hopper
/// passes by `attention_hopper`).
#[test]
fn every_kernel_is_launched() {
    let this = include_str!("cuda_emu.rs");
    // check_attention launches both passes of the kernels it is given for every shape.
    let by_shape = |func: &str| ATTN.iter().any(|sh| Pass::ALL.iter().any(|p| p.function(sh.head_dim) == func)) || Pass::ALL.iter().any(|p| p.hopper_function() == func);
    for f in KERNEL_FILES {
        for func in f.functions.iter().chain(f.hopper) {
            assert!(this.contains(&format!("run(\"{func}\"")) || by_shape(func), "kernels/{}.cu: `{func}` is never launched in tests/cuda_emu.rs", f.name);
        }
    }
}

// ---- the primitives, against the PTX ISA, and the emulator's own checks ---------------------

fn one_block(threads: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (1, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem }
}

/// Launches `case` on the emulator; the words of its outputs, in argument order.
fn run_case(emu: &Emulator, case: &Case) -> Result<Vec<Vec<u32>>, String> {
    run_case_on(emu, case, 0)
}

/// [`run_case`] under `schedule` (1: descending, bulk copies landing at issue).
fn run_case_on(emu: &Emulator, case: &Case, schedule: i32) -> Result<Vec<Vec<u32>>, String> {
    let bf16 = |bits: &[u16]| {
        let b = Buf::new("bf16 input", Elem::Bf16, bits.len());
        b.write(bits.iter().map(|x| x.to_le_bytes().to_vec()));
        b
    };
    let bufs: Vec<Option<Buf>> = case
        .args
        .iter()
        .map(|a| match a {
            CaseArg::Out(n) => Some(Buf::new("out", Elem::U32, *n)),
            CaseArg::Bf16(bits) | CaseArg::TensorMap { bits, .. } => Some(bf16(bits)),
            CaseArg::F32(v) => Some(Buf::from_f64("f32 input", Elem::F32, &v.iter().map(|&x| x as f64).collect::<Vec<_>>())),
            CaseArg::U32(v) => Some(Buf::from_f64("u32 input", Elem::U32, &v.iter().map(|&x| x as f64).collect::<Vec<_>>())),
            CaseArg::I32(_) => None,
        })
        .collect();
    let mut args = Vec::new();
    for (a, b) in case.args.iter().zip(&bufs) {
        args.push(match a {
            CaseArg::I32(v) => Arg::I32(*v),
            CaseArg::TensorMap { rows, cols, .. } => {
                let b = b.as_ref().expect("the matrix");
                let (dims, strides) = primitive_cases::tma_layout(*rows, *cols);
                Arg::Bytes(emu.tensor_map(b, &dims, &strides, &primitive_cases::TMA_BOX)?)
            }
            _ => b.as_ref().expect("a buffer").arg(),
        });
    }
    emu.launch(case.kernel, one_block(case.threads, case.smem), &args, schedule)?;
    let words = |b: &Buf| b.bytes().chunks(4).map(|w| u32::from_le_bytes(w.try_into().unwrap())).collect();
    Ok(case.args.iter().zip(&bufs).filter(|(a, _)| matches!(a, CaseArg::Out(_))).map(|(_, b)| words(b.as_ref().expect("an output"))).collect())
}

/// Every case of `primitive_cases` (the same ones `cuda_parity` runs on a GPU) against the PTX
/// ISA: mma and wgmma (in each form the attention kernels use) against a plain matmul, ldmatrix
/// against the documented distribution of rows to lanes, cp.async's zero-fill and wait groups.
#[test]
fn primitives_follow_the_ptx_isa() {
    let Some(emu) = emulator(Storage::F32) else { return };
    let cases = primitive_cases::cases(true);
    for f in emu_build::PRIMITIVES.functions.iter().filter(|f| f.starts_with("test_")) {
        assert!(cases.iter().any(|c| c.kernel == *f), "primitives.cu: `{f}` is no case of primitive_cases.rs");
    }
    for case in cases {
        let out = run_case(emu, &case).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        case.check(&out).unwrap();
        // The emulator completes a copy at the wait that covers it: read before, shared memory
        // still holds its poison (all ones), so a missing wait shows.
        if case.kernel == "test_cp_async" {
            assert_eq!(out[0][8..12], [u32::MAX; 4], "cp.async group 1 before its wait");
        }
    }
}

/// TMA copies on an mbarrier: they land under both schedules (at the wait, or at issue); read
/// before the wait the tile still holds shared memory's poison; more bytes than expect_tx
/// announced, a wait for a copy never issued and a wait that misses its phase are reported.
#[test]
fn tma_misuse_is_reported() {
    let Some(emu) = emulator(Storage::F32) else { return };
    let case = primitive_cases::tma_load(0);
    case.check(&run_case_on(emu, &case, 1).unwrap()).unwrap();
    let early = run_case(emu, &primitive_cases::tma_load(1)).unwrap();
    assert!(early[0][..2048].iter().all(|&w| w == u32::MAX), "a tile read before its mbarrier wait holds the poison");
    let e = run_case(emu, &primitive_cases::tma_load(2)).unwrap_err();
    assert!(e.contains("received 4096 transaction bytes more than expect_tx announced"), "{e}");
    let e = run_case(emu, &primitive_cases::tma_load(3)).unwrap_err();
    assert!(e.contains("deadlock") && e.contains("phase parity 1, which never completes") && e.contains("8192 transaction bytes outstanding"), "{e}");
    // Without the barrier between the phases, thread 0 runs through both while the others sleep
    // (descending schedule: its warp runs last): they then wait for the next phase of parity 0.
    let e = run_case_on(emu, &primitive_cases::tma_load(4), 1).unwrap_err();
    assert!(e.contains("deadlock") && e.contains("2 phases completed"), "{e}");
}

/// The misuse the PTX ISA rules out and the emulator reports: cp.async data (or a plain store)
/// read by wgmma without fence.proxy.async, accumulators read before wgmma.wait_group (they hold
/// NaN in flight), an operand overwritten while in flight, warps of one warpgroup giving
/// different descriptors.
#[test]
fn wgmma_misuse_is_reported() {
    let Some(emu) = emulator(Storage::F32) else { return };
    let ss = |misuse: i32| {
        let case = primitive_cases::wgmma_ss(&mut Rng::new(62), misuse);
        run_case(emu, &case).map(|out| out[0].iter().map(|&w| f32::from_bits(w)).collect::<Vec<f32>>())
    };
    let e = ss(1).unwrap_err();
    assert!(e.contains("has not fenced (fence.proxy.async)"), "{e}");
    assert!(ss(2).unwrap().iter().all(|x| x.is_nan()), "accumulators read before the wait hold NaN");
    let e = ss(3).unwrap_err();
    assert!(e.contains("B operand of a wgmma (shared memory) changed"), "{e}");
    let e = ss(4).unwrap_err();
    assert!(e.contains("wgmma number 0 differs between the warps of warpgroup 0"), "{e}");
    let e = ss(5).unwrap_err();
    assert!(e.contains("stored to since the last fence.proxy.async and __syncthreads"), "{e}");
}

#[test]
fn emulator_reports_deadlock_overflow_race_hang_and_out_of_bounds() {
    let Some(emu) = emulator(Storage::F32) else { return };
    let out = Buf::new("out", Elem::F32, 64);
    let e = emu.launch("bad_divergent_shuffle", one_block(32, 0), &[out.arg()], 0).unwrap_err();
    assert!(e.contains("bad_divergent_shuffle") && e.contains("deadlock") && e.contains("exited"), "{e}");

    let e = emu.launch("bad_smem_overflow", one_block(32, 64), &[Arg::I32(64)], 0).unwrap_err();
    assert!(e.contains("bad_smem_overflow") && e.contains("outside its 64 bytes of dynamic shared memory"), "{e}");

    // Without its __syncthreads the result depends on the schedule; with it, it does not.
    for sync in [0, 1] {
        let [asc, desc] = [0, 1].map(|schedule| {
            let out = Buf::new("out", Elem::F32, 64);
            emu.launch("racy_neighbour", one_block(64, 256), &[out.arg(), Arg::I32(sync)], schedule).unwrap();
            out.bytes().to_vec()
        });
        assert_eq!(asc == desc, sync == 1, "racy_neighbour with sync = {sync}");
    }

    // Turns in launch-ticket order pass whatever order blocks start in; turns in blockIdx order
    // pass when blocks start in launch order (schedule 0) and hang a GPU when they start in
    // reverse (schedule 1): block 3 starts first and waits for the three others.
    for (by_ticket, schedule) in [(0, 0), (1, 0), (1, 1), (0, 1)] {
        let (order, counters) = (Buf::new("order", Elem::U32, 4), Buf::from_f64("counters", Elem::U32, &[0.0, 0.0]));
        let cfg = LaunchConfig { grid_dim: (4, 1, 1), block_dim: (64, 1, 1), shared_mem_bytes: 0 };
        let run = emu.launch("turns_in_order", cfg, &[order.arg(), counters.arg(), Arg::I32(by_ticket)], schedule);
        if (by_ticket, schedule) != (0, 1) {
            run.unwrap();
            let started = if schedule == 0 { [0.0, 1.0, 2.0, 3.0] } else { [3.0, 2.0, 1.0, 0.0] };
            assert_eq!((order.values(), counters.values()[1]), (started.to_vec(), 4.0), "turns with by_ticket {by_ticket}, schedule {schedule}");
        } else {
            let e = run.unwrap_err();
            assert!(e.contains("turns_in_order") && e.contains("block (3,0,0)") && e.contains("wait forever"), "{e}");
        }
    }

    let small = Buf::new("small", Elem::F32, 100);
    let e = emu.launch("fill", grid_stride(101), &[small.arg(), Arg::F32(1.0), Arg::Size(101)], 0).unwrap_err();
    assert!(e.contains("fill") && e.contains("past the end of buffer `small`"), "{e}");

    let e = emu.launch("fill", grid_stride(10), &[small.arg(), Arg::F32(1.0), Arg::I32(10)], 0).unwrap_err();
    assert!(e.contains("argument 2 is 4 bytes"), "{e}");
}
