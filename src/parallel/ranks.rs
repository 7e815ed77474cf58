//! Rank mapping for MoE Parallel Folding, with Megatron-Core `RankGenerator` semantics.
//!
//! The world is laid out twice over the same ranks: once for the attention (dense) layers as
//! `TP·CP·DP·PP` and once for the MoE layers as `ETP·EP·EDP·PP`. Both layouts use one order string
//! (e.g. `tp-cp-ep-dp-pp`) that lists the axes from fastest-varying (stride 1) to slowest, so a
//! rank's coordinate on axis `a` is `(rank / stride_a) % size_a` with strides the prefix products
//! of the sizes in order. A group token such as `tp-ep` masks some axes: the ranks of one group
//! differ only along the masked axes, and the groups are enumerated over the unmasked ones. Because
//! both layouts share the strides of the slow axes, the MoE `ep` groups can "fold" onto the
//! attention `tp×cp` ranks, which keeps the EP all-to-all inside a node.
//!
//! Group order and the order of ranks inside a group follow Megatron exactly, so a mapping planned
//! here can be compared rank for rank with a Megatron run.

use std::fmt;

use serde_json::{Map, Value};

use crate::{Error, Result};

/// One parallelism axis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Axis {
    Tp,
    Cp,
    Ep,
    Dp,
    Pp,
}

impl Axis {
    pub const ALL: [Axis; 5] = [Axis::Tp, Axis::Cp, Axis::Ep, Axis::Dp, Axis::Pp];

    pub fn name(self) -> &'static str {
        match self {
            Axis::Tp => "tp",
            Axis::Cp => "cp",
            Axis::Ep => "ep",
            Axis::Dp => "dp",
            Axis::Pp => "pp",
        }
    }

    fn parse(s: &str) -> Option<Axis> {
        Axis::ALL.into_iter().find(|a| a.name() == s)
    }
}

/// Parses a `-`-separated list of distinct axis names, e.g. `tp-ep-pp`.
fn parse_axes(field: &str, s: &str) -> Result<Vec<Axis>> {
    let allowed = "a `-`-separated list of distinct axes among tp, cp, ep, dp, pp";
    let mut axes = Vec::new();
    for part in s.split('-') {
        let axis = Axis::parse(&part.trim().to_ascii_lowercase())
            .ok_or_else(|| Error::config(field, format!("{s:?}"), allowed))?;
        if axes.contains(&axis) {
            return Err(Error::config(field, format!("{s:?}"), format!("{allowed} (`{}` repeats)", axis.name())));
        }
        axes.push(axis);
    }
    Ok(axes)
}

/// The axis order, fastest-varying first; always holds all five axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Order([Axis; 5]);

impl Order {
    /// Parses an order string such as `tp-cp-ep-dp-pp`. Axes it leaves out are appended (slowest)
    /// in the canonical order; [`RankGenerator::new`] then requires them to have size 1, as
    /// Megatron does.
    pub fn parse(s: &str) -> Result<Order> {
        let mut axes = parse_axes("parallel.order", s)?;
        for a in Axis::ALL {
            if !axes.contains(&a) {
                axes.push(a);
            }
        }
        Ok(Order([axes[0], axes[1], axes[2], axes[3], axes[4]]))
    }

    pub fn axes(&self) -> [Axis; 5] {
        self.0
    }

    fn position(&self, axis: Axis) -> usize {
        self.0.iter().position(|&a| a == axis).expect("an Order holds every axis")
    }
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|a| a.name()).collect();
        f.write_str(&names.join("-"))
    }
}

/// Sizes of the five axes, indexed by [`Axis`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AxisSizes {
    pub tp: usize,
    pub cp: usize,
    pub ep: usize,
    pub dp: usize,
    pub pp: usize,
}

impl AxisSizes {
    pub fn get(&self, axis: Axis) -> usize {
        match axis {
            Axis::Tp => self.tp,
            Axis::Cp => self.cp,
            Axis::Ep => self.ep,
            Axis::Dp => self.dp,
            Axis::Pp => self.pp,
        }
    }

    pub fn product(&self) -> usize {
        Axis::ALL.iter().map(|&a| self.get(a)).product()
    }
}

/// Enumerates the process groups of one layout (dense or expert) of the world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankGenerator {
    sizes: AxisSizes,
    order: Order,
    /// Size of each axis in `order` position.
    ordered_size: [usize; 5],
    /// Stride of each axis in `order` position: prefix products of `ordered_size`.
    ordered_stride: [usize; 5],
}

impl RankGenerator {
    /// A layout with the given axis sizes over `sizes.product()` ranks.
    ///
    /// Refuses a zero size, an axis of size > 1 that `order` leaves out, and EP > 1 together with
    /// CP > 1: a generator describes either the attention layout (CP, no EP) or the MoE one (EP,
    /// no CP).
    pub fn new(sizes: AxisSizes, order: &str) -> Result<RankGenerator> {
        for a in Axis::ALL {
            if sizes.get(a) == 0 {
                return Err(Error::config(format!("parallel.{}", a.name()), 0, "a size of at least 1"));
            }
        }
        if sizes.ep > 1 && sizes.cp > 1 {
            return Err(Error::Invalid(format!(
                "one rank generator cannot have both ep = {} and cp = {} above 1: CP belongs to the \
                 attention layout and EP to the MoE layout",
                sizes.ep, sizes.cp
            )));
        }
        let named = parse_axes("parallel.order", order)?;
        for a in Axis::ALL {
            if !named.contains(&a) && sizes.get(a) != 1 {
                return Err(Error::config(
                    "parallel.order",
                    format!("{order:?}"),
                    format!("an order that names `{}`, whose size is {}", a.name(), sizes.get(a)),
                ));
            }
        }
        let order = Order::parse(order)?;
        let mut ordered_size = [1usize; 5];
        let mut ordered_stride = [1usize; 5];
        let mut stride = 1;
        for (i, a) in order.axes().into_iter().enumerate() {
            ordered_size[i] = sizes.get(a);
            ordered_stride[i] = stride;
            stride *= ordered_size[i];
        }
        Ok(RankGenerator { sizes, order, ordered_size, ordered_stride })
    }

    pub fn world_size(&self) -> usize {
        self.sizes.product()
    }

    pub fn sizes(&self) -> AxisSizes {
        self.sizes
    }

    pub fn order(&self) -> Order {
        self.order
    }

    /// The coordinate of `rank` along `axis`.
    pub fn coord(&self, rank: usize, axis: Axis) -> usize {
        let i = self.order.position(axis);
        (rank / self.ordered_stride[i]) % self.ordered_size[i]
    }

    /// The groups of a token such as `tp-ep` (axis order inside the token does not matter).
    ///
    /// Group `g` fixes the unmasked coordinates to the mixed-radix digits of `g` (fastest unmasked
    /// axis first); rank `j` of the group takes the masked coordinates from the digits of `j`
    /// (fastest masked axis first). Every group has the product of the masked sizes as its size,
    /// and the groups partition the world.
    pub fn groups(&self, token: &str) -> Result<Vec<Vec<usize>>> {
        let mut mask = [false; 5];
        for a in parse_axes("group token", token)? {
            mask[self.order.position(a)] = true;
        }
        Ok(self.masked_groups(mask))
    }

    /// Groups over the axes whose `mask` bit (in order position) is set.
    fn masked_groups(&self, mask: [bool; 5]) -> Vec<Vec<usize>> {
        let (masked, unmasked): (Vec<usize>, Vec<usize>) = (0..5).partition(|&i| mask[i]);
        let group_size: usize = masked.iter().map(|&i| self.ordered_size[i]).product();
        let n_groups = self.world_size() / group_size;
        // The rank with the mixed-radix digits of `index` on the axes `positions`.
        let place = |mut index: usize, positions: &[usize]| -> usize {
            let mut rank = 0;
            for &i in positions {
                rank += (index % self.ordered_size[i]) * self.ordered_stride[i];
                index /= self.ordered_size[i];
            }
            rank
        };
        (0..n_groups)
            .map(|g| {
                let base = place(g, &unmasked);
                (0..group_size).map(|j| base + place(j, &masked)).collect()
            })
            .collect()
    }
}

/// Process groups of the attention (dense) layers: built from TP, CP, DP, PP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttnGroup {
    Tp,
    Cp,
    Dp,
    Pp,
    DpCp,
    TpPp,
    TpCp,
    TpDp,
    TpDpCp,
}

impl AttnGroup {
    pub const ALL: [AttnGroup; 9] = [
        AttnGroup::Tp,
        AttnGroup::Cp,
        AttnGroup::Dp,
        AttnGroup::Pp,
        AttnGroup::DpCp,
        AttnGroup::TpPp,
        AttnGroup::TpCp,
        AttnGroup::TpDp,
        AttnGroup::TpDpCp,
    ];

    pub fn token(self) -> &'static str {
        match self {
            AttnGroup::Tp => "tp",
            AttnGroup::Cp => "cp",
            AttnGroup::Dp => "dp",
            AttnGroup::Pp => "pp",
            AttnGroup::DpCp => "dp-cp",
            AttnGroup::TpPp => "tp-pp",
            AttnGroup::TpCp => "tp-cp",
            AttnGroup::TpDp => "tp-dp",
            AttnGroup::TpDpCp => "tp-dp-cp",
        }
    }
}

/// Process groups of the MoE layers: built from ETP (`tp`), EP, EDP (`dp`), PP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MoeGroup {
    Tp,
    Ep,
    Dp,
    Pp,
    TpEp,
    TpEpPp,
}

impl MoeGroup {
    pub const ALL: [MoeGroup; 6] =
        [MoeGroup::Tp, MoeGroup::Ep, MoeGroup::Dp, MoeGroup::Pp, MoeGroup::TpEp, MoeGroup::TpEpPp];

    pub fn token(self) -> &'static str {
        match self {
            MoeGroup::Tp => "tp",
            MoeGroup::Ep => "ep",
            MoeGroup::Dp => "dp",
            MoeGroup::Pp => "pp",
            MoeGroup::TpEp => "tp-ep",
            MoeGroup::TpEpPp => "tp-ep-pp",
        }
    }
}

/// The user-facing parallel sizes: the data-parallel sizes are derived from the world.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParallelConfig {
    pub world: usize,
    /// Attention tensor parallel.
    pub tp: usize,
    /// Attention context parallel.
    pub cp: usize,
    /// Pipeline parallel, shared by both layouts.
    pub pp: usize,
    /// MoE expert parallel.
    pub ep: usize,
    /// MoE expert tensor parallel.
    pub etp: usize,
    /// Axis order, fastest first, e.g. `tp-cp-ep-dp-pp`.
    pub order: String,
}

/// Both layouts of the world with every group of every token, and each rank's group per token.
#[derive(Clone, Debug)]
pub struct ParallelLayout {
    dense: RankGenerator,
    expert: RankGenerator,
    /// Groups per [`AttnGroup::ALL`] entry, in generation order.
    attention: Vec<Vec<Vec<usize>>>,
    /// Groups per [`MoeGroup::ALL`] entry, in generation order.
    moe: Vec<Vec<Vec<usize>>>,
    /// `attention_of[t][rank]`: index of `rank`'s group in `attention[t]`.
    attention_of: Vec<Vec<usize>>,
    moe_of: Vec<Vec<usize>>,
}

/// Divides `world` by `denominator`, or names the sizes that do not divide it.
fn derive_dp(field: &str, world: usize, denominator: usize, what: &str) -> Result<usize> {
    if denominator == 0 || world == 0 || !world.is_multiple_of(denominator) {
        return Err(Error::config(
            field,
            format!("world {world} / ({what} = {denominator})"),
            format!("a world size that is a positive multiple of {what}"),
        ));
    }
    Ok(world / denominator)
}

/// For each rank, the index of the group that holds it. The groups partition `0..world`.
fn membership(groups: &[Vec<usize>], world: usize) -> Vec<usize> {
    let mut of = vec![0; world];
    for (g, group) in groups.iter().enumerate() {
        for &r in group {
            of[r] = g;
        }
    }
    of
}

impl ParallelLayout {
    /// Builds and validates both layouts: DP = world/(TP·CP·PP), EDP = world/(ETP·EP·PP).
    pub fn new(cfg: &ParallelConfig) -> Result<ParallelLayout> {
        for (field, v) in [("tp", cfg.tp), ("cp", cfg.cp), ("pp", cfg.pp), ("ep", cfg.ep), ("etp", cfg.etp)] {
            if v == 0 {
                return Err(Error::config(format!("parallel.{field}"), 0, "a size of at least 1"));
            }
        }
        let dp = derive_dp("parallel.world", cfg.world, cfg.tp * cfg.cp * cfg.pp, "tp·cp·pp")?;
        let edp = derive_dp("parallel.world", cfg.world, cfg.etp * cfg.ep * cfg.pp, "etp·ep·pp")?;
        let dense =
            RankGenerator::new(AxisSizes { tp: cfg.tp, cp: cfg.cp, ep: 1, dp, pp: cfg.pp }, &cfg.order)?;
        let expert =
            RankGenerator::new(AxisSizes { tp: cfg.etp, cp: 1, ep: cfg.ep, dp: edp, pp: cfg.pp }, &cfg.order)?;
        let pp_last = dense.order().axes()[4] == Axis::Pp;
        if !pp_last && cfg.pp > 1 && edp != dp {
            return Err(Error::Invalid(format!(
                "order {} does not end in pp and pp = {}, so the MoE data-parallel size (EDP = \
                 world {} / (etp {} · ep {} · pp {}) = {edp}) must equal the attention one (DP = \
                 world {} / (tp {} · cp {} · pp {}) = {dp}); choose etp·ep = tp·cp or put pp last",
                dense.order(), cfg.pp, cfg.world, cfg.etp, cfg.ep, cfg.pp, cfg.world, cfg.tp, cfg.cp, cfg.pp
            )));
        }
        let pp_dense = dense.groups("pp")?;
        if pp_dense != expert.groups("pp")? {
            return Err(Error::Invalid(format!(
                "order {} gives different pipeline groups to the attention layout (tp {} · cp {} · \
                 dp {dp}) and the MoE layout (etp {} · ep {} · edp {edp}); both must share pp \
                 groups: put pp last or make the axes before pp the same size in both",
                dense.order(), cfg.tp, cfg.cp, cfg.etp, cfg.ep
            )));
        }
        let attention: Vec<_> =
            AttnGroup::ALL.iter().map(|g| dense.groups(g.token())).collect::<Result<_>>()?;
        let moe: Vec<_> = MoeGroup::ALL.iter().map(|g| expert.groups(g.token())).collect::<Result<_>>()?;
        let attention_of = attention.iter().map(|gs| membership(gs, cfg.world)).collect();
        let moe_of = moe.iter().map(|gs| membership(gs, cfg.world)).collect();
        Ok(ParallelLayout { dense, expert, attention, moe, attention_of, moe_of })
    }

    pub fn world_size(&self) -> usize {
        self.dense.world_size()
    }

    /// The attention layout: tp=TP, cp=CP, ep=1, dp=DP, pp=PP.
    pub fn dense(&self) -> &RankGenerator {
        &self.dense
    }

    /// The MoE layout: tp=ETP, cp=1, ep=EP, dp=EDP, pp=PP.
    pub fn expert(&self) -> &RankGenerator {
        &self.expert
    }

    /// All groups of an attention token, in generation order.
    pub fn attention_groups(&self, g: AttnGroup) -> &[Vec<usize>] {
        &self.attention[g as usize]
    }

    /// All groups of a MoE token, in generation order.
    pub fn moe_groups(&self, g: MoeGroup) -> &[Vec<usize>] {
        &self.moe[g as usize]
    }

    /// The attention group of token `g` that holds `rank`.
    pub fn attention_group(&self, rank: usize, g: AttnGroup) -> Result<&[usize]> {
        self.check_rank(rank)?;
        Ok(&self.attention[g as usize][self.attention_of[g as usize][rank]])
    }

    /// The MoE group of token `g` that holds `rank`.
    pub fn moe_group(&self, rank: usize, g: MoeGroup) -> Result<&[usize]> {
        self.check_rank(rank)?;
        Ok(&self.moe[g as usize][self.moe_of[g as usize][rank]])
    }

    fn check_rank(&self, rank: usize) -> Result<()> {
        if rank >= self.world_size() {
            return Err(Error::config("rank", rank, format!("a rank below the world size {}", self.world_size())));
        }
        Ok(())
    }

    /// `{"attention": {"tp": [[...]], ...}, "moe": {"ep": [[...]], ...}}`, groups in generation order.
    pub fn to_json(&self) -> Value {
        let side = |tokens: Vec<&'static str>, groups: &[Vec<Vec<usize>>]| -> Value {
            let map: Map<String, Value> =
                tokens.into_iter().zip(groups).map(|(t, gs)| (t.to_string(), serde_json::json!(gs))).collect();
            Value::Object(map)
        };
        serde_json::json!({
            "attention": side(AttnGroup::ALL.iter().map(|g| g.token()).collect(), &self.attention),
            "moe": side(MoeGroup::ALL.iter().map(|g| g.token()).collect(), &self.moe),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn cfg(world: usize, tp: usize, cp: usize, pp: usize, ep: usize, etp: usize, order: &str) -> ParallelConfig {
        ParallelConfig { world, tp, cp, pp, ep, etp, order: order.to_string() }
    }

    /// Worked example of papers.md §3: world 16, `tp-cp-ep-dp-pp`, TP=CP=DP=PP=2, ETP=1, EP=4, EDP=2.
    #[test]
    fn worked_example_from_the_paper_notes() {
        let l = ParallelLayout::new(&cfg(16, 2, 2, 2, 4, 1, "tp-cp-ep-dp-pp")).unwrap();
        let a = |g| l.attention_groups(g).to_vec();
        let m = |g| l.moe_groups(g).to_vec();
        assert_eq!(a(AttnGroup::Tp), (0..8).map(|i| vec![2 * i, 2 * i + 1]).collect::<Vec<_>>());
        assert_eq!(
            a(AttnGroup::Cp),
            vec![vec![0, 2], vec![1, 3], vec![4, 6], vec![5, 7], vec![8, 10], vec![9, 11], vec![12, 14], vec![13, 15]]
        );
        assert_eq!(
            a(AttnGroup::Dp),
            vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7], vec![8, 12], vec![9, 13], vec![10, 14], vec![11, 15]]
        );
        assert_eq!(
            a(AttnGroup::DpCp),
            vec![vec![0, 2, 4, 6], vec![1, 3, 5, 7], vec![8, 10, 12, 14], vec![9, 11, 13, 15]]
        );
        assert_eq!(a(AttnGroup::Pp), (0..8).map(|i| vec![i, i + 8]).collect::<Vec<_>>());
        assert_eq!(m(MoeGroup::Ep), (0..4).map(|i| (4 * i..4 * i + 4).collect()).collect::<Vec<Vec<_>>>());
        // The fold: MoE ep groups are exactly the attention tp×cp groups.
        assert_eq!(m(MoeGroup::Ep), a(AttnGroup::TpCp));
        assert_eq!(
            m(MoeGroup::Dp),
            vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7], vec![8, 12], vec![9, 13], vec![10, 14], vec![11, 15]]
        );
        assert_eq!(m(MoeGroup::TpEpPp), vec![vec![0, 1, 2, 3, 8, 9, 10, 11], vec![4, 5, 6, 7, 12, 13, 14, 15]]);
        assert_eq!(l.expert().sizes().dp, 2);
        assert_eq!(l.attention_group(5, AttnGroup::DpCp).unwrap(), &[1, 3, 5, 7]);
        assert_eq!(l.moe_group(9, MoeGroup::TpEpPp).unwrap(), &[0, 1, 2, 3, 8, 9, 10, 11]);
        assert!(l.moe_group(16, MoeGroup::Ep).is_err());
    }

    #[test]
    fn json_lists_every_token_in_generation_order() {
        let l = ParallelLayout::new(&cfg(16, 2, 2, 2, 4, 1, "tp-cp-ep-dp-pp")).unwrap();
        let j = l.to_json();
        for g in AttnGroup::ALL {
            let v: Vec<Vec<usize>> = serde_json::from_value(j["attention"][g.token()].clone()).unwrap();
            assert_eq!(v, l.attention_groups(g), "attention {}", g.token());
        }
        for g in MoeGroup::ALL {
            let v: Vec<Vec<usize>> = serde_json::from_value(j["moe"][g.token()].clone()).unwrap();
            assert_eq!(v, l.moe_groups(g), "moe {}", g.token());
        }
        assert_eq!(j["attention"].as_object().unwrap().len(), AttnGroup::ALL.len());
        assert_eq!(j["moe"].as_object().unwrap().len(), MoeGroup::ALL.len());
        assert_eq!(j["moe"]["tp-ep"], serde_json::json!([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]));
    }

    #[test]
    fn token_axis_order_does_not_matter() {
        let g = RankGenerator::new(AxisSizes { tp: 2, cp: 3, ep: 1, dp: 2, pp: 2 }, "tp-cp-ep-dp-pp").unwrap();
        assert_eq!(g.groups("dp-cp").unwrap(), g.groups("cp-dp").unwrap());
        assert_eq!(g.groups("tp-dp-cp").unwrap(), g.groups("cp-tp-dp").unwrap());
    }

    #[test]
    fn invalid_sizes_and_strings_are_refused_with_the_sizes_named() {
        let err = |c: ParallelConfig| ParallelLayout::new(&c).unwrap_err().to_string();
        let e = err(cfg(12, 2, 2, 2, 1, 1, "tp-cp-ep-dp-pp"));
        assert!(e.contains("12") && e.contains("tp·cp·pp = 8"), "{e}");
        let e = err(cfg(16, 2, 2, 2, 3, 1, "tp-cp-ep-dp-pp"));
        assert!(e.contains("etp·ep·pp = 6"), "{e}");
        assert!(err(cfg(16, 0, 2, 2, 1, 1, "tp-cp-ep-dp-pp")).contains("parallel.tp"));
        assert!(err(cfg(16, 2, 2, 2, 4, 1, "tp-cp-xp-dp-pp")).contains("parallel.order"));
        assert!(err(cfg(16, 2, 2, 2, 4, 1, "tp-cp-tp-dp-pp")).contains("`tp` repeats"));
        // cp = 2 but the order leaves cp out.
        assert!(err(cfg(16, 2, 2, 2, 4, 1, "tp-ep-dp-pp")).contains("names `cp`"));
        // pp not last, pp > 1 and EDP (16/(1·2·2) = 4) ≠ DP (16/(2·2·2) = 2).
        let e = err(cfg(16, 2, 2, 2, 2, 1, "tp-cp-ep-pp-dp"));
        assert!(e.contains("= 4") && e.contains("= 2") && e.contains("must equal"), "{e}");
        // EDP = DP but the pp strides differ (tp 2 before pp vs etp 1 · ep 2 ... here ep after pp).
        let e = err(cfg(8, 2, 1, 2, 2, 1, "tp-pp-cp-ep-dp"));
        assert!(e.contains("different pipeline groups"), "{e}");
        // One generator with both EP and CP above 1.
        let e = RankGenerator::new(AxisSizes { tp: 1, cp: 2, ep: 2, dp: 1, pp: 1 }, "tp-cp-ep-dp-pp")
            .unwrap_err()
            .to_string();
        assert!(e.contains("ep = 2") && e.contains("cp = 2"), "{e}");
        let g = RankGenerator::new(AxisSizes { tp: 2, cp: 1, ep: 1, dp: 1, pp: 1 }, "tp-cp-ep-dp-pp").unwrap();
        assert!(g.groups("tp-zz").is_err());
    }

    fn divisors(n: usize) -> Vec<usize> {
        (1..=n).filter(|&d| n.is_multiple_of(d)).collect()
    }

    /// Coordinates of `rank` recomputed from scratch (mixed radix over `order`), to check against.
    fn coords(rank: usize, order: Order, sizes: AxisSizes) -> [usize; 5] {
        let mut c = [0; 5];
        let mut rest = rank;
        for a in order.axes() {
            c[a as usize] = rest % sizes.get(a);
            rest /= sizes.get(a);
        }
        c
    }

    /// Checks one token's groups against the definition: a partition of the world, sizes equal to
    /// the product of the masked sizes, members differing only along masked axes, generation order.
    fn check_groups(g: &RankGenerator, token: &str, groups: &[Vec<usize>]) {
        let masked = parse_axes("t", token).unwrap();
        let size: usize = masked.iter().map(|&a| g.sizes().get(a)).product();
        let world = g.world_size();
        let mut seen = vec![false; world];
        for group in groups {
            assert_eq!(group.len(), size, "{token} {:?} order {}", g.sizes(), g.order());
            let c0 = coords(group[0], g.order(), g.sizes());
            for &r in group {
                assert!(r < world && !seen[r], "{token}: rank {r} twice or out of range");
                seen[r] = true;
                let c = coords(r, g.order(), g.sizes());
                for a in Axis::ALL.into_iter().filter(|a| !masked.contains(a)) {
                    assert_eq!(c[a as usize], c0[a as usize], "{token}: {r} moves along {}", a.name());
                }
            }
            assert!(group.windows(2).all(|w| w[0] < w[1]), "{token}: group not ascending");
        }
        assert!(seen.iter().all(|&s| s), "{token}: groups do not cover the world");
        assert!(groups.windows(2).all(|w| w[0][0] < w[1][0]), "{token}: groups not in generation order");
    }

    /// Stride of pp: the product of the sizes of the axes before it in the order.
    fn pp_stride(order: Order, sizes: AxisSizes) -> usize {
        order.axes().into_iter().take_while(|&a| a != Axis::Pp).map(|a| sizes.get(a)).product()
    }

    #[test]
    fn random_sizes_partition_the_world_and_fold() {
        let mut rng = Rng::new(0x5EED);
        let (mut n_valid, mut n_invalid) = (0, 0);
        for _ in 0..600 {
            let (tp, cp, dp, pp) =
                (rng.pick(&[1, 2, 4]), rng.pick(&[1, 2, 3]), rng.pick(&[1, 2, 3, 4]), rng.pick(&[1, 2, 3]));
            let world = tp * cp * dp * pp;
            let etp = rng.pick(&divisors(world / pp));
            let ep = rng.pick(&divisors(world / pp / etp));
            let order = match rng.below(3) {
                0 => "tp-cp-ep-dp-pp".to_string(),
                1 => "tp-cp-ep-pp-dp".to_string(),
                _ => rng.permutation(5).into_iter().map(|i| Axis::ALL[i].name()).collect::<Vec<_>>().join("-"),
            };
            let edp = world / (etp * ep * pp);
            let o = Order::parse(&order).unwrap();
            let dense_sizes = AxisSizes { tp, cp, ep: 1, dp, pp };
            let expert_sizes = AxisSizes { tp: etp, cp: 1, ep, dp: edp, pp };
            let valid = pp == 1
                || ((o.axes()[4] == Axis::Pp || edp == dp) && pp_stride(o, dense_sizes) == pp_stride(o, expert_sizes));
            let got = ParallelLayout::new(&cfg(world, tp, cp, pp, ep, etp, &order));
            let l = match (valid, got) {
                (true, Ok(l)) => l,
                (false, Err(_)) => {
                    n_invalid += 1;
                    continue;
                }
                (v, g) => panic!("world {world} tp {tp} cp {cp} pp {pp} ep {ep} etp {etp} {order}: valid {v}, got {g:?}"),
            };
            n_valid += 1;
            for g in AttnGroup::ALL {
                check_groups(l.dense(), g.token(), l.attention_groups(g));
            }
            for g in MoeGroup::ALL {
                check_groups(l.expert(), g.token(), l.moe_groups(g));
            }
            assert_eq!(l.attention_groups(AttnGroup::Pp), l.moe_groups(MoeGroup::Pp));
            for r in 0..world {
                assert!(l.attention_group(r, AttnGroup::TpDpCp).unwrap().contains(&r));
                assert!(l.moe_group(r, MoeGroup::TpEp).unwrap().contains(&r));
            }
            // Folding: with tp, cp, ep leading the order, MoE tp×ep groups fill attention tp×cp
            // groups exactly when etp·ep = tp·cp, and nest inside them when etp·ep divides tp·cp.
            if order.starts_with("tp-cp-ep") {
                let (tpcp, tpep) = (l.attention_groups(AttnGroup::TpCp), l.moe_groups(MoeGroup::TpEp));
                if etp * ep == tp * cp {
                    assert_eq!(tpep, tpcp);
                    assert_eq!(l.moe_groups(MoeGroup::Dp), l.attention_groups(AttnGroup::Dp));
                } else if (tp * cp) % (etp * ep) == 0 {
                    for g in tpep {
                        let outer = l.attention_group(g[0], AttnGroup::TpCp).unwrap();
                        assert!(g.iter().all(|r| outer.contains(r)), "{g:?} not inside {outer:?}");
                    }
                }
            }
        }
        assert!(n_valid > 200 && n_invalid > 20, "coverage: {n_valid} valid, {n_invalid} invalid");
    }
}
