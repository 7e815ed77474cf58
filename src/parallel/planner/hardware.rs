//! What the planner assumes about the machines: device peaks, links, and the achieved fractions
//! of those peaks per op class.
//!
//! Every number here is either measured on motley's own H100 (stated as such) or a stated default;
//! docs/cluster-planner.md lists them all. Bandwidths are bytes per second **per direction per
//! GPU**; FLOP rates are dense bf16.

use serde::Serialize;

const GB: f64 = 1e9;
const GIB: f64 = (1u64 << 30) as f64;
const TFLOP: f64 = 1e12;

/// One GPU model and the links a node of them has.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Gpu {
    pub name: String,
    /// Dense bf16 peak (datasheet), FLOP/s.
    pub peak_flops: f64,
    /// Device memory, bytes.
    pub hbm_bytes: f64,
    /// Device memory bandwidth (datasheet), bytes/s.
    pub hbm_bw: f64,
    /// NVLink bandwidth per GPU per direction, bytes/s.
    pub nvlink_bw: f64,
    /// Inter-node (InfiniBand) bandwidth per GPU per direction, bytes/s.
    pub ib_bw: f64,
    /// Host↔device copy bandwidth per direction (pinned memory), bytes/s.
    pub pcie_bw: f64,
    /// Host memory available to one GPU for offloaded activations, bytes.
    pub host_bytes: f64,
    /// Achieved fraction of `peak_flops` on a large bf16 GEMM (8192³).
    pub gemm_eff: f64,
    /// Achieved fraction of `peak_flops` of flash attention, forward + backward.
    pub attn_eff: f64,
}

impl Gpu {
    /// H100 SXM. GEMM 802 TFLOP/s (81 %), SDPA fwd+bwd 394–442 TFLOP/s (we take 418, 42 %) and
    /// pinned copies at 55 GB/s are issue #6's figures from the lent H100 (measured by the issue's
    /// author, not yet by motley's own benches); the rest is datasheet.
    pub fn h100() -> Gpu {
        Gpu {
            name: "h100".into(),
            peak_flops: 989.0 * TFLOP,
            hbm_bytes: 80.0 * GIB,
            hbm_bw: 3350.0 * GB,
            nvlink_bw: 450.0 * GB,
            ib_bw: 50.0 * GB,
            pcie_bw: 55.0 * GB,
            host_bytes: 256.0 * GIB,
            gemm_eff: 802.0 / 989.0,
            attn_eff: 418.0 / 989.0,
        }
    }

    /// H200 SXM: the H100's compute and links with 141 GB of faster memory; efficiencies are the
    /// H100's measured ones (same SM count and clocks).
    pub fn h200() -> Gpu {
        Gpu { name: "h200".into(), hbm_bytes: 141.0 * GB, hbm_bw: 4800.0 * GB, ..Gpu::h100() }
    }

    /// A100 SXM 80 GB, HDR InfiniBand (200 Gb/s per GPU), PCIe 4. Not measured here: GEMM 85 %
    /// of peak and flash attention 60 % (FlashAttention-2's published A100 figures) are defaults.
    pub fn a100() -> Gpu {
        Gpu {
            name: "a100".into(),
            peak_flops: 312.0 * TFLOP,
            hbm_bytes: 80.0 * GIB,
            hbm_bw: 2039.0 * GB,
            nvlink_bw: 300.0 * GB,
            ib_bw: 25.0 * GB,
            pcie_bw: 25.0 * GB,
            host_bytes: 256.0 * GIB,
            gemm_eff: 0.85,
            attn_eff: 0.60,
        }
    }

    /// A800: an A100 with NVLink capped at 400 GB/s bidirectional; MEMO's testbed.
    pub fn a800() -> Gpu {
        Gpu { name: "a800".into(), nvlink_bw: 200.0 * GB, ..Gpu::a100() }
    }

    /// `h100`, `h200`, `a100` or `a800`.
    pub fn by_name(name: &str) -> Option<Gpu> {
        match name.to_ascii_lowercase().as_str() {
            "h100" => Some(Gpu::h100()),
            "h200" => Some(Gpu::h200()),
            "a100" => Some(Gpu::a100()),
            "a800" => Some(Gpu::a800()),
            _ => None,
        }
    }
}

/// Modelling choices that are not properties of one GPU; each is a stated default.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Assumptions {
    /// GEMM efficiency falls off as `x / (x + half_dim)` along each of M, N, K (normalised so an
    /// 8192³ GEMM gets the measured efficiency): TP and ETP shrink GEMMs and pay for it. Flash
    /// attention pays the same factor on its sequence chunk, which CP shortens.
    pub gemm_half_dim: f64,
    /// Grouped expert GEMM efficiency relative to a plain GEMM of the same per-expert shape.
    pub grouped_gemm: f64,
    /// Bytes moved by memory-bound ops (norms, RoPE, SwiGLU, permute, residuals) per skeletal
    /// activation byte, forward; the backward moves twice that.
    pub elementwise_traffic: f64,
    /// Achieved fraction of `hbm_bw` for those ops.
    pub hbm_eff: f64,
    /// Achieved NCCL bus bandwidth of ring collectives (all-gather, reduce-scatter) over NVLink,
    /// as a fraction of `nvlink_bw`.
    pub nvlink_ring_eff: f64,
    /// Achieved all-to-all bandwidth over NVLink, fraction of `nvlink_bw`.
    pub nvlink_a2a_eff: f64,
    /// Achieved bandwidth over InfiniBand, fraction of `ib_bw` (collectives and all-to-all).
    pub ib_eff: f64,
    /// Fixed cost of one collective inside a node / across nodes, seconds.
    pub latency_intra: f64,
    pub latency_inter: f64,
    /// Fraction of device memory the planner may fill (CUDA context, NCCL buffers, fragmentation).
    pub usable_hbm: f64,
    /// Peak op transients (activation gradients, workspaces) as a fraction of one layer's
    /// skeletal bytes: the widest is the SwiGLU backward's gradients of its intermediates.
    pub transient_frac: f64,
    /// Bytes per logit on the last stage: bf16 logits and their gradient (fused cross-entropy).
    pub logit_bytes: f64,
    /// Coefficient of variation of one expert's routed load around its expected share (a router
    /// balanced by an auxiliary loss still drifts). An EP rank sums `E/EP` experts, so its
    /// relative spread is `cv / sqrt(E/EP)`, and the busiest of EP ranks sits about
    /// `sqrt(2 ln EP)` spreads above the mean: few experts per rank means more imbalance.
    pub expert_load_cv: f64,
    /// Fraction of TP communication hidden under GEMMs (Megatron's `--tp-comm-overlap`).
    pub tp_overlap: f64,
}

impl Default for Assumptions {
    fn default() -> Self {
        Assumptions {
            gemm_half_dim: 128.0,
            grouped_gemm: 0.9,
            elementwise_traffic: 2.0,
            hbm_eff: 0.7,
            nvlink_ring_eff: 0.8,
            nvlink_a2a_eff: 0.6,
            ib_eff: 0.8,
            latency_intra: 15e-6,
            latency_inter: 30e-6,
            usable_hbm: 0.9,
            transient_frac: 0.5,
            logit_bytes: 4.0,
            expert_load_cv: 0.05,
            tp_overlap: 0.0,
        }
    }
}

impl Assumptions {
    /// Efficiency multiplier of one kernel dimension of size `x`, 1 at 8192.
    pub fn dim_shape(&self, x: f64) -> f64 {
        ((x / (x + self.gemm_half_dim)) / (8192.0 / (8192.0 + self.gemm_half_dim))).min(1.0)
    }

    /// Efficiency multiplier of a GEMM with dimensions `m × n × k`, 1 at 8192³.
    pub fn gemm_shape(&self, m: f64, n: f64, k: f64) -> f64 {
        self.dim_shape(m) * self.dim_shape(n) * self.dim_shape(k)
    }
}
