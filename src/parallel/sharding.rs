//! Expert sharding in training (MoE Parallel Folding with TP = CP = PP = ETP = 1): dense tensors
//! are replicated on every rank and belong to the attention data-parallel group (the world);
//! expert tensors live on one rank of each expert-parallel (EP) group and are replicated over the
//! expert data-parallel group (EDP: the ranks that hold the same experts).
//!
//! This module reduces gradients over the right group, computes the global gradient norm of the
//! whole (unsharded) model, and gathers the full parameter set for checkpoints.

use std::ops::Range;

use crate::backend::{Backend, DeviceGroup};
use crate::model::params::{ParamLayout, ParamSpec};
use crate::parallel::comm::Communicator;
use crate::parallel::dispatch::expert_shard;
use crate::parallel::ranks::{MoeGroup, ParallelConfig, ParallelLayout};
use crate::Result;

/// Megatron-Core's default axis order (fastest first): EP groups are runs of consecutive ranks.
const ORDER: &str = "tp-cp-ep-dp-pp";

/// This rank's expert-parallel and expert-data-parallel groups for `ep` over `world`.
pub struct ExpertGroups {
    pub ep: Box<dyn Communicator>,
    pub edp: Box<dyn Communicator>,
}

impl ExpertGroups {
    /// Splits `world` (the attention data-parallel group) by the MoE layout of Parallel Folding.
    pub fn new(world: &dyn Communicator, ep: usize) -> Result<Self> {
        let cfg = ParallelConfig { world: world.size(), tp: 1, cp: 1, pp: 1, ep, etp: 1, order: ORDER.into() };
        let layout = ParallelLayout::new(&cfg)?;
        Ok(ExpertGroups { ep: world.split(layout.moe_groups(MoeGroup::Ep))?, edp: world.split(layout.moe_groups(MoeGroup::Dp))? })
    }
}

/// A device reducer over one group, or `None`: through host memory.
type OnDevice<B> = Option<Box<dyn DeviceGroup<B>>>;

/// Ranges of the gradients to sum over a group, and the group's device reducer (if any).
type Reduction<'a, B> = (Vec<Range<usize>>, &'a dyn Communicator, &'a OnDevice<B>);

/// Contiguous element ranges of the dense and of the expert tensors of a layout, and what sums
/// them over the ranks.
pub struct GradBuckets<B: Backend> {
    dense: Vec<Range<usize>>,
    expert: Vec<Range<usize>>,
    /// The device reducers over the dense and the expert tensors' groups that
    /// [`GradBuckets::reduce_on_device`] opened; `None`: through host memory.
    on_device: [OnDevice<B>; 2],
}

/// Appends `r` to `ranges`, merging it with the last range when they touch.
fn push_merged(ranges: &mut Vec<Range<usize>>, r: Range<usize>) {
    match ranges.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ => ranges.push(r),
    }
}

/// The elements of `ranges` of `buf`, one after another, on the host.
fn pack<B: Backend>(be: &B, buf: &B::Buf, ranges: &[Range<usize>]) -> Vec<f32> {
    let mut packed = Vec::with_capacity(ranges.iter().map(|r| r.len()).sum());
    for r in ranges {
        packed.extend(be.download(B::view(buf, r.clone())));
    }
    packed
}

fn unpack<B: Backend>(be: &B, buf: &mut B::Buf, ranges: &[Range<usize>], packed: &[f32]) {
    let mut at = 0;
    for r in ranges {
        be.upload(B::view_mut(buf, r.clone()), &packed[at..at + r.len()]);
        at += r.len();
    }
}

impl<B: Backend> GradBuckets<B> {
    pub fn new(layout: &ParamLayout) -> Self {
        let (mut dense, mut expert) = (Vec::new(), Vec::new());
        for s in &layout.specs {
            push_merged(if s.expert.is_some() { &mut expert } else { &mut dense }, s.range());
        }
        GradBuckets { dense, expert, on_device: [None, None] }
    }

    /// Sums on the devices over `dp` (and `edp`, as [`GradBuckets::average`] takes them) where
    /// `be` can (NCCL), instead of through host memory; says what sums, for the log. A
    /// collective over both groups.
    pub fn reduce_on_device(&mut self, be: &B, dp: &dyn Communicator, edp: Option<&dyn Communicator>) -> Result<String> {
        let mut said = Vec::new();
        for (slot, group) in self.on_device.iter_mut().zip([Some(dp), edp]) {
            let Some(group) = group.filter(|g| g.size() > 1) else { continue };
            let (what, reducer) = be.device_group(group)?.into_parts(group.size());
            *slot = reducer;
            said.push(what);
        }
        Ok(said.join("; the experts' "))
    }

    /// The reductions of `range` (a range the backward has finished, see
    /// [`crate::model::GradsReady`]): its dense part over `dp`, its expert part over `edp`
    /// (`None`: experts are not sharded, so all of it over `dp`). A group of one rank has
    /// nothing to sum.
    fn groups<'a>(&'a self, range: Range<usize>, dp: &'a dyn Communicator, edp: Option<&'a dyn Communicator>) -> Vec<Reduction<'a, B>> {
        let within = |ranges: &[Range<usize>]| -> Vec<Range<usize>> { ranges.iter().map(|r| r.start.max(range.start)..r.end.min(range.end)).filter(|r| !r.is_empty()).collect() };
        let [on_dp, on_edp] = &self.on_device;
        let groups = match edp {
            None => vec![(vec![range.clone()], dp, on_dp)],
            Some(edp) => vec![(within(&self.dense), dp, on_dp), (within(&self.expert), edp, on_edp)],
        };
        groups.into_iter().filter(|(ranges, comm, _)| comm.size() > 1 && !ranges.is_empty()).collect()
    }

    /// Starts summing `range` of the gradients over the ranks where the devices sum (each
    /// range as the backward finishes it, so the sums overlap the rest of the backward); the
    /// host path sums everything in [`GradBuckets::average`] instead, since a host collective
    /// would stop the computing thread.
    pub fn reduce_ready(&self, grads: &mut B::Buf, range: Range<usize>, dp: &dyn Communicator, edp: Option<&dyn Communicator>) -> Result<()> {
        for (ranges, _, on_device) in self.groups(range, dp, edp) {
            if let Some(device) = on_device {
                ranges.iter().try_for_each(|r| device.all_reduce_sum(B::view_mut(grads, r.clone())))?;
            }
        }
        Ok(())
    }

    /// Averages gradients over the ranks of `dp` and the `micro_batches` each added up (every
    /// micro-batch's loss is a mean over its own tokens), after [`GradBuckets::reduce_ready`]
    /// has been given every range: waits for the devices' sums, sums the rest through host
    /// memory, then scales by 1/(|dp| · micro_batches).
    pub fn average(&self, be: &B, grads: &mut B::Buf, dp: &dyn Communicator, edp: Option<&dyn Communicator>, micro_batches: usize) -> Result<()> {
        for (ranges, comm, on_device) in self.groups(0..B::len(grads), dp, edp) {
            match (on_device, B::host_mut(grads)) {
                (Some(device), _) => device.join()?,
                // Host memory: reduce each range in place.
                (None, Some(host)) => ranges.iter().try_for_each(|r| comm.all_reduce_sum(&mut host[r.clone()]))?,
                (None, None) => {
                    let mut packed = pack(be, grads, &ranges);
                    comm.all_reduce_sum(&mut packed)?;
                    unpack(be, grads, &ranges, &packed);
                }
            }
        }
        be.scale(B::full_mut(grads), 1.0 / (dp.size() * micro_batches) as f32);
        Ok(())
    }

    /// The L2 norm of the whole model's gradient: the dense part (the same on every rank) plus
    /// the expert parts summed over `ep`, whose ranks together hold every expert once.
    pub fn global_norm(&self, be: &B, grads: &B::Buf, ep: &dyn Communicator) -> Result<f32> {
        let squares = |ranges: &[Range<usize>]| -> f64 { ranges.iter().map(|r| be.sum_squares(B::view(grads, r.clone()))).sum() };
        let mut expert = [squares(&self.expert) as f32];
        ep.all_reduce_sum(&mut expert)?;
        Ok((squares(&self.dense) + expert[0] as f64).sqrt() as f32)
    }
}

/// The expert tensors of EP rank `r` of `size`, in layout order.
fn experts_of(full: &ParamLayout, n_experts: usize, size: usize, r: usize) -> impl Iterator<Item = &ParamSpec> {
    let local = expert_shard(n_experts, size, r);
    full.specs.iter().filter(move |s| s.expert.is_some_and(|e| local.contains(&e)))
}

/// Gathers a buffer laid out like `local` (this rank's shard) into the full layout on EP rank 0;
/// `None` on the other ranks. A collective over `ep`. Shards differ in size (expert widths
/// differ), so each is padded to the largest for the all-gather.
pub fn gather_full(full: &ParamLayout, local: &ParamLayout, buf: &[f32], n_experts: usize, ep: &dyn Communicator) -> Result<Option<Vec<f32>>> {
    let size = ep.size();
    let shard_len = |r: usize| experts_of(full, n_experts, size, r).map(ParamSpec::len).sum::<usize>();
    let longest = (0..size).map(shard_len).max().unwrap_or(0);
    let mut mine: Vec<f32> = local.specs.iter().filter(|s| s.expert.is_some()).flat_map(|s| buf[s.range()].iter().copied()).collect();
    mine.resize(longest, 0.0);
    let all = ep.all_gather(&mine)?;
    if ep.rank() != 0 {
        return Ok(None);
    }
    let mut out = vec![0f32; full.total];
    for s in full.specs.iter().filter(|s| s.expert.is_none()) {
        let l = local.get(&s.name).expect("every rank holds the dense tensors");
        out[s.range()].copy_from_slice(&buf[l.range()]);
    }
    for r in 0..size {
        let mut at = r * longest;
        for s in experts_of(full, n_experts, size, r) {
            out[s.range()].copy_from_slice(&all[at..at + s.len()]);
            at += s.len();
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::config::Config;
    use crate::model::config::{ModelConfig, MoeConfig};
    use crate::parallel::comm::LocalGroup;

    fn shapes() -> (ModelConfig, MoeConfig) {
        let c = Config::default_with(&["model.n_layers=2".into(), "model.d_model=16".into(), "model.n_heads=2".into(), "model.n_kv_heads=2".into(), "model.vocab_size=300".into(), "moe.expert_widths=[8,16,24,32]".into()]).unwrap();
        (c.model, c.moe)
    }

    #[test]
    fn pack_and_unpack_round_trip() {
        let be = Cpu::new(1);
        let buf: Vec<f32> = (0..20).map(|i| i as f32).collect();
        let ranges = [2..5, 9..10, 12..20];
        let packed = pack(&be, &buf, &ranges);
        assert_eq!(packed, [2., 3., 4., 9., 12., 13., 14., 15., 16., 17., 18., 19.]);
        let mut out = vec![-1f32; 20];
        unpack(&be, &mut out, &ranges, &packed);
        for (i, v) in out.iter().enumerate() {
            assert_eq!(*v, if ranges.iter().any(|r| r.contains(&i)) { i as f32 } else { -1.0 });
        }
    }

    #[test]
    fn ep_groups_are_consecutive_ranks_and_edp_strided() {
        let got = LocalGroup::run(4, |w| {
            let g = ExpertGroups::new(&w, 2).unwrap();
            (w.rank(), g.ep.rank(), g.ep.size(), g.edp.rank(), g.edp.size())
        })
        .unwrap();
        assert_eq!(got, vec![(0, 0, 2, 0, 2), (1, 1, 2, 0, 2), (2, 0, 2, 1, 2), (3, 1, 2, 1, 2)]);
    }

    #[test]
    fn gathering_shards_restores_the_full_layout() {
        let (m, moe) = shapes();
        let full = ParamLayout::new(&m, &moe);
        let values = full.init_values(7);
        for ep in [1, 2, 4] {
            let gathered = LocalGroup::run(ep, |comm| {
                let r = comm.rank();
                let local = ParamLayout::sharded(&m, &moe, expert_shard(4, ep, r));
                let mut buf = vec![0f32; local.total];
                for s in &local.specs {
                    buf[s.range()].copy_from_slice(&values[full.get(&s.name).unwrap().range()]);
                }
                gather_full(&full, &local, &buf, 4, &comm).unwrap()
            })
            .unwrap();
            assert_eq!(gathered[0].as_deref(), Some(&values[..]), "ep = {ep}");
            assert!(gathered[1..].iter().all(Option::is_none));
        }
    }

    #[test]
    fn sharded_init_equals_the_full_init_tensor_by_tensor() {
        let (m, moe) = shapes();
        let (full, part) = (ParamLayout::new(&m, &moe), ParamLayout::sharded(&m, &moe, 2..4));
        let (fv, pv) = (full.init_values(3), part.init_values(3));
        assert_eq!(part.specs.iter().filter(|s| s.expert.is_some()).count(), 2 * 2 * 2);
        for s in &part.specs {
            assert_eq!(&pv[s.range()], &fv[full.get(&s.name).unwrap().range()], "{}", s.name);
        }
    }

    #[test]
    fn norm_and_average_over_groups() {
        let (m, moe) = shapes();
        let full = ParamLayout::new(&m, &moe);
        let grads: Vec<f32> = (0..full.total).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
        let want = grads.iter().map(|&g| g as f64 * g as f64).sum::<f64>().sqrt() as f32;
        // Two EP ranks holding experts 0..2 and 2..4 see the norm of the full gradient.
        let norms = LocalGroup::run(2, |comm| {
            let r = comm.rank();
            let local = ParamLayout::sharded(&m, &moe, 2 * r..2 * r + 2);
            let mut buf = vec![0f32; local.total];
            for s in &local.specs {
                buf[s.range()].copy_from_slice(&grads[full.get(&s.name).unwrap().range()]);
            }
            GradBuckets::new(&local).global_norm(&Cpu::new(1), &buf, &comm).unwrap()
        })
        .unwrap();
        for n in norms {
            assert!((n - want).abs() <= 1e-6 * want, "{n} vs {want}");
        }
        // World 4 as EP 2 × EDP 2: dense parts average over 4, expert parts over their EDP pair.
        let out = LocalGroup::run(4, |w| {
            let g = ExpertGroups::new(&w, 2).unwrap();
            let local = ParamLayout::sharded(&m, &moe, 2 * g.ep.rank()..2 * g.ep.rank() + 2);
            let mut buf = vec![(w.rank() + 1) as f32; local.total];
            GradBuckets::new(&local).average(&Cpu::new(1), &mut buf, &w, Some(g.edp.as_ref()), 1).unwrap();
            (local, buf)
        })
        .unwrap();
        for (r, (local, buf)) in out.iter().enumerate() {
            for s in &local.specs {
                // Dense: (1+2+3+4)/4; experts: ranks r and r±2 hold the same experts.
                let want = if s.expert.is_some() { ((r % 2 + 1) + (r % 2 + 3)) as f32 / 4.0 } else { 2.5 };
                assert!(buf[s.range()].iter().all(|&v| v == want), "rank {r} {}", s.name);
            }
        }
    }
}
