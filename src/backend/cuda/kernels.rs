//! Loading the compiled kernels into the context, with an on-disk PTX cache, and the small
//! host-side helpers whose output the kernels consume.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute_enum};
use cudarc::driver::{CudaContext, CudaFunction, DeviceRepr};
use cudarc::nvrtc::Ptx;

use super::attention::{head_dims, Pass, MAX_HEAD_DIM};
use super::experts::{self, Fused};
use super::nvrtc::{arch_for, cached_ptx_all, include_dirs_from_env, KernelFile, Storage, KERNEL_FILES};
use crate::backend::AdamW;
use crate::{Error, Result};

/// The elementwise kernels of one storage variant (`elementwise.cu`).
pub struct Elementwise {
    pub add_assign: CudaFunction,
    pub add: CudaFunction,
    pub scale: CudaFunction,
    pub fill: CudaFunction,
    pub sum_squares_partial: CudaFunction,
    pub sum_squares_final: CudaFunction,
}

/// Every entry point of `nvrtc::KERNEL_FILES`, by name, compiled for one activation storage;
/// the elementwise kernels also for f32 buffers (gradients, moments) when that storage is bf16.
pub struct Kernels {
    pub storage: Storage,
    /// Dynamic shared memory the attention kernels may use on this GPU.
    pub attn_smem: usize,
    /// Elementwise ops on activation-storage buffers.
    pub act: Elementwise,
    /// Elementwise ops on f32 buffers (the same functions when the storage is f32).
    pub f32: Elementwise,
    pub f32_to_act: CudaFunction,
    pub act_to_f32: CudaFunction,
    pub embedding_fwd: CudaFunction,
    pub embedding_bwd: CudaFunction,
    pub rmsnorm_fwd: CudaFunction,
    pub rmsnorm_bwd_dx: CudaFunction,
    pub rmsnorm_dw_partial: CudaFunction,
    pub rmsnorm_dw_reduce: CudaFunction,
    pub rope: CudaFunction,
    pub swiglu_fwd: CudaFunction,
    pub swiglu_bwd: CudaFunction,
    pub softmax_rows_fwd: CudaFunction,
    pub router_bwd: CudaFunction,
    pub route_select: CudaFunction,
    pub route_group_sums: CudaFunction,
    pub route_scan: CudaFunction,
    pub route_layout: CudaFunction,
    pub gather_rows: CudaFunction,
    pub combine_rows: CudaFunction,
    pub gathered_dots: CudaFunction,
    pub softmax_xent: CudaFunction,
    pub adamw: CudaFunction,
    pub attn_delta: CudaFunction,
    /// Forward and backward kernels (`Pass::ALL` order) of each head_dim in `head_dims()`.
    attn: Vec<[CudaFunction; 2]>,
    /// The wgmma forward and backward at head_dim 64 (`Pass::ALL` order), where compiled for
    /// Hopper (`sm_90a`).
    pub attn_hopper: Option<[CudaFunction; 2]>,
    /// The experts' grouped GEMM kernels (`experts::Fused::ALL` order), where compiled for
    /// Hopper.
    pub experts: Option<[CudaFunction; Fused::ALL.len()]>,
}

type Functions = HashMap<&'static str, CudaFunction>;

/// Loads `file`'s module from `ptx`, compiled for `storage`.
fn load_file(ctx: &Arc<CudaContext>, file: &KernelFile, arch: &str, ptx: Ptx, storage: Storage) -> Result<Functions> {
    let module = ctx.load_module(ptx).map_err(|e| Error::Invalid(format!("loading kernels/{}.cu ({storage:?}): {e:?}", file.name)))?;
    file.entry_points(arch)
        .map(|name| {
            let f = module.load_function(name).map_err(|e| Error::Invalid(format!("kernel `{name}` missing from kernels/{}.cu: {e:?}", file.name)))?;
            Ok((name, f))
        })
        .collect()
}

fn elementwise(f: &Functions) -> Elementwise {
    let get = |name: &str| f[name].clone();
    Elementwise {
        add_assign: get("add_assign"),
        add: get("add"),
        scale: get("scale"),
        fill: get("fill"),
        sum_squares_partial: get("sum_squares_partial"),
        sum_squares_final: get("sum_squares_final"),
    }
}

impl Kernels {
    /// Compiles every kernel file for the device's architecture and `storage` (or reads the
    /// cached PTX) and loads its entry points; the attention kernels get their shared-memory
    /// limit raised.
    pub fn load(ctx: &Arc<CudaContext>, major: i32, minor: i32, storage: Storage) -> Result<Self> {
        let arch = arch_for(major, minor);
        // Every file in `storage`; with bf16 storage, the elementwise kernels in f32 too (for
        // gradients), last.
        let elementwise_file = KERNEL_FILES.iter().find(|k| k.name == "elementwise").expect("elementwise.cu is a kernel file");
        let mut jobs: Vec<(&KernelFile, Storage)> = KERNEL_FILES.iter().map(|file| (file, storage)).collect();
        if storage == Storage::Bf16 {
            jobs.push((elementwise_file, Storage::F32));
        }
        let mut ptx = cached_ptx_all(&jobs, &arch, &include_dirs_from_env()).map_err(Error::Invalid)?.into_iter();
        let mut f: Functions = HashMap::new();
        for (file, ptx) in KERNEL_FILES.iter().zip(ptx.by_ref()) {
            f.extend(load_file(ctx, file, &arch, ptx, storage)?);
        }
        // Each attention kernel may use the shared memory its head_dim needs, up to what the GPU
        // allows a block (less than head_dim 128 needs before Hopper; launches check each shape).
        let optin = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(|e| Error::Invalid(format!("shared memory per block: {e:?}")))?;
        let smem_limit = optin.max(0) as usize;
        let allow = |name: &str, smem: usize| {
            let smem = smem.min(smem_limit);
            f[name]
                .set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
                .map_err(|e| Error::Invalid(format!("{name}: cannot allow {smem} bytes of shared memory: {e:?}")))
        };
        for d in head_dims() {
            for pass in Pass::ALL {
                allow(&pass.function(d), pass.smem_bytes(d))?;
            }
        }
        let hopper = f.contains_key(Pass::Forward.hopper_function());
        if hopper {
            for pass in Pass::ALL {
                allow(pass.hopper_function(), pass.hopper_smem_bytes())?;
            }
        }
        let experts = f.contains_key(Fused::Up.function());
        if experts {
            for fused in Fused::ALL {
                allow(fused.function(), experts::SMEM_BYTES)?;
            }
        }
        let act = elementwise(&f);
        let f32 = match storage {
            Storage::F32 => elementwise(&f),
            Storage::Bf16 => elementwise(&load_file(ctx, elementwise_file, &arch, ptx.next().expect("the f32 elementwise job"), Storage::F32)?),
        };
        // Every name below is listed in KERNEL_FILES and was inserted above.
        let mut take = |name: &str| f.remove(name).expect("kernel listed in KERNEL_FILES");
        Ok(Kernels {
            storage,
            attn_smem: smem_limit,
            act,
            f32,
            f32_to_act: take("f32_to_act"),
            act_to_f32: take("act_to_f32"),
            embedding_fwd: take("embedding_fwd"),
            embedding_bwd: take("embedding_bwd"),
            rmsnorm_fwd: take("rmsnorm_fwd"),
            rmsnorm_bwd_dx: take("rmsnorm_bwd_dx"),
            rmsnorm_dw_partial: take("rmsnorm_dw_partial"),
            rmsnorm_dw_reduce: take("rmsnorm_dw_reduce"),
            rope: take("rope"),
            swiglu_fwd: take("swiglu_fwd"),
            swiglu_bwd: take("swiglu_bwd"),
            softmax_rows_fwd: take("softmax_rows_fwd"),
            router_bwd: take("router_bwd"),
            route_select: take("route_select"),
            route_group_sums: take("route_group_sums"),
            route_scan: take("route_scan"),
            route_layout: take("route_layout"),
            gather_rows: take("gather_rows"),
            combine_rows: take("combine_rows"),
            gathered_dots: take("gathered_dots"),
            softmax_xent: take("softmax_xent"),
            adamw: take("adamw"),
            attn_delta: take("attn_bwd_delta"),
            attn: head_dims().map(|d| Pass::ALL.map(|pass| take(&pass.function(d)))).collect(),
            attn_hopper: hopper.then(|| Pass::ALL.map(|pass| take(pass.hopper_function()))),
            experts: experts.then(|| Fused::ALL.map(|fused| take(fused.function()))),
        })
    }

    /// The attention kernel of `pass` for `head_dim` (a multiple of 16 up to MAX_HEAD_DIM,
    /// checked by `attention::check`).
    pub fn attention(&self, pass: Pass, head_dim: usize) -> &CudaFunction {
        debug_assert!(head_dim.is_multiple_of(16) && head_dim <= MAX_HEAD_DIM);
        &self.attn[head_dim / 16 - 1][pass as usize]
    }

    /// The elementwise kernels for buffers of `storage`.
    pub fn elementwise(&self, storage: Storage) -> &Elementwise {
        if storage == Storage::F32 {
            &self.f32
        } else {
            &self.act
        }
    }
}

/// Token positions grouped by token id, for the deterministic embedding backward: group `g` is
/// token `ids[g]` at `positions[offsets[g]..offsets[g + 1]]`, positions ascending.
pub struct Groups {
    pub ids: Vec<u32>,
    pub offsets: Vec<u32>,
    pub positions: Vec<u32>,
}

pub fn group_positions(tokens: &[u32]) -> Groups {
    let mut positions: Vec<u32> = (0..tokens.len() as u32).collect();
    positions.sort_by_key(|&i| tokens[i as usize]); // stable: ascending positions within a token
    let (mut ids, mut offsets) = (Vec::new(), Vec::new());
    for (k, &i) in positions.iter().enumerate() {
        let t = tokens[i as usize];
        if ids.last() != Some(&t) {
            ids.push(t);
            offsets.push(k as u32);
        }
    }
    offsets.push(positions.len() as u32);
    Groups { ids, offsets, positions }
}

/// `struct AdamW` of optim.cu: hyper-parameters with the bias corrections precomputed on the
/// host exactly as the CPU backend computes them.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AdamWArgs {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bc1: f32,
    bc2: f32,
}

// SAFETY: plain #[repr(C)] f32 fields, the same layout as the CUDA struct.
unsafe impl DeviceRepr for AdamWArgs {}

impl AdamWArgs {
    pub fn new(hp: AdamW, decay: bool) -> Self {
        AdamWArgs {
            lr: hp.lr,
            beta1: hp.beta1,
            beta2: hp.beta2,
            eps: hp.eps,
            weight_decay: if decay { hp.weight_decay } else { 0.0 },
            bc1: 1.0 - hp.beta1.powi(hp.step as i32),
            bc2: 1.0 - hp.beta2.powi(hp.step as i32),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::group_positions;

    #[test]
    fn groups_positions_by_token_in_order() {
        let g = group_positions(&[3, 1, 3, 9, 1, 3]);
        assert_eq!(g.ids, [1, 3, 9]);
        assert_eq!(g.offsets, [0, 2, 5, 6]);
        assert_eq!(g.positions, [1, 4, 0, 2, 5, 3]);
    }
}
