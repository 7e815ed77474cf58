//! `Routing`: which tokens go to which experts with which gate, in expert-major slot order.
//! The router produces it; the local permute, the EP dispatcher and the aux losses consume it.

use rayon::prelude::*;

/// One token's choice of an expert: the renormalised gate that weights the expert's output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Choice {
    pub token: u32,
    pub expert: u32,
    pub gate: f32,
}

/// Per expert, the tokens routed to it and their gates (see [`Routing::from_expert_lists`]).
pub type ExpertLists = Vec<(Vec<u32>, Vec<f32>)>;

/// Token→expert assignments laid out as slots in expert-major order, ascending token index
/// within an expert (the order experts consume and the dispatcher exchanges).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routing {
    pub n_tokens: usize,
    pub n_experts: usize,
    /// Token of each slot.
    pub token: Vec<u32>,
    /// Gate of each slot.
    pub gate: Vec<f32>,
    /// Expert `e` owns slots `offsets[e]..offsets[e + 1]`; `offsets.len() == n_experts + 1`.
    pub offsets: Vec<usize>,
}

impl Routing {
    /// Lays out `choices` (any order) in expert-major slot order, stably: choices given in
    /// ascending token order stay in ascending token order within each expert.
    pub fn from_choices(n_tokens: usize, n_experts: usize, choices: &[Choice]) -> Self {
        let mut by_expert = vec![(Vec::new(), Vec::new()); n_experts];
        for c in choices {
            by_expert[c.expert as usize].0.push(c.token);
            by_expert[c.expert as usize].1.push(c.gate);
        }
        Self::from_expert_lists(n_tokens, n_experts, &[by_expert])
    }

    /// The layout of choices collected in `parts`, each part's `(tokens, gates)` per expert:
    /// expert `x`'s slots are its lists of every part in part order. The experts are filled in
    /// parallel (the router collects a part per chunk of tokens).
    pub fn from_expert_lists(n_tokens: usize, n_experts: usize, parts: &[ExpertLists]) -> Self {
        let mut offsets = vec![0usize; n_experts + 1];
        for x in 0..n_experts {
            offsets[x + 1] = offsets[x] + parts.iter().map(|p| p[x].0.len()).sum::<usize>();
        }
        let (mut token, mut gate) = (vec![0u32; offsets[n_experts]], vec![0f32; offsets[n_experts]]);
        let mut spans = Vec::with_capacity(n_experts);
        let (mut rest_t, mut rest_g) = (&mut token[..], &mut gate[..]);
        for x in 0..n_experts {
            let len = offsets[x + 1] - offsets[x];
            let (tx, tr) = rest_t.split_at_mut(len);
            let (gx, gr) = rest_g.split_at_mut(len);
            spans.push((x, tx, gx));
            (rest_t, rest_g) = (tr, gr);
        }
        spans.into_par_iter().for_each(|(x, tokens, gates)| {
            let mut at = 0;
            for p in parts {
                let (t, g) = &p[x];
                tokens[at..at + t.len()].copy_from_slice(t);
                gates[at..at + g.len()].copy_from_slice(g);
                at += t.len();
            }
        });
        Routing { n_tokens, n_experts, token, gate, offsets }
    }

    pub fn n_slots(&self) -> usize {
        self.token.len()
    }

    /// Tokens routed to each expert.
    pub fn counts(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// Slots of each token in ascending slot order, as CSR: token `t` owns
    /// `slots[offsets[t]..offsets[t + 1]]`.
    pub fn by_token(&self) -> (Vec<u32>, Vec<u32>) {
        incidence(self.n_tokens, self.token.iter().copied(), self.token.iter().enumerate().map(|(s, &t)| (t, s as u32)))
    }

    /// Expert of each slot.
    pub fn expert_of_slots(&self) -> Vec<u32> {
        (0..self.n_experts).flat_map(|e| std::iter::repeat_n(e as u32, self.offsets[e + 1] - self.offsets[e])).collect()
    }

    /// Each expert's slots of tokens below `split`: the head of its slot range (slots ascend by
    /// token within an expert), what a token split (MEMO) keeps of it.
    pub fn slots_below(&self, split: usize) -> Vec<usize> {
        (0..self.n_experts).map(|e| self.token[self.slots_of(e)].partition_point(|&t| (t as usize) < split)).collect()
    }

    /// Slot range of expert `e`.
    pub fn slots_of(&self, e: usize) -> std::ops::Range<usize> {
        self.offsets[e]..self.offsets[e + 1]
    }
}

/// `(token, slot)` pairs as CSR by token, each token's slots in the order given; `tokens` are
/// the pairs' tokens in any order.
fn incidence(n_tokens: usize, tokens: impl Iterator<Item = u32>, pairs: impl Iterator<Item = (u32, u32)>) -> (Vec<u32>, Vec<u32>) {
    let mut offsets = vec![0u32; n_tokens + 1];
    for t in tokens {
        offsets[t as usize + 1] += 1;
    }
    for t in 0..n_tokens {
        offsets[t + 1] += offsets[t];
    }
    let mut next: Vec<u32> = offsets[..n_tokens].to_vec();
    let mut slots = vec![0u32; offsets[n_tokens] as usize];
    for (t, s) in pairs {
        slots[next[t as usize] as usize] = s;
        next[t as usize] += 1;
    }
    (offsets, slots)
}

/// A layer's routing after its experts' capacity (`parallel::dispatch::apply_capacity`): `kept`
/// holds the slots the experts run, `dropped` the chosen ones past their expert's capacity (both
/// expert-major, ascending tokens). A dropped slot adds nothing to the output, but its gate was
/// normalised together with its token's kept ones, so the router's backward still takes it (with
/// a zero gate gradient), and the aux losses count it (counts before dropping, as Megatron's).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Capped {
    pub kept: Routing,
    pub dropped: Routing,
}

/// The slots [`crate::backend::Backend::router_bwd`] runs over (see [`Capped::router_slots`]).
#[derive(Clone, Debug, PartialEq)]
pub struct RouterSlots {
    /// Each token's slots in expert order, as CSR ([`Routing::by_token`]).
    pub offsets: Vec<u32>,
    pub slots: Vec<u32>,
    /// Expert and gate of each slot.
    pub expert: Vec<u32>,
    pub gate: Vec<f32>,
}

impl Capped {
    /// Every slot kept (dropless routing).
    pub fn dropless(kept: Routing) -> Self {
        let dropped = Routing { n_tokens: kept.n_tokens, n_experts: kept.n_experts, offsets: vec![0; kept.n_experts + 1], ..Routing::default() };
        Capped { kept, dropped }
    }

    /// Tokens routed to each expert before dropping.
    pub fn chosen_counts(&self) -> Vec<usize> {
        self.kept.counts().iter().zip(self.dropped.counts()).map(|(k, d)| k + d).collect()
    }

    pub fn n_dropped(&self) -> usize {
        self.dropped.n_slots()
    }

    /// Every chosen slot: the kept ones `0..K` in `kept`'s order (the slots gate gradients are
    /// formed for), then the dropped ones `K..K + D` in `dropped`'s, each token's in expert order.
    /// Without drops, exactly `kept`'s slots and incidence.
    pub fn router_slots(&self) -> RouterSlots {
        let (kept, dropped, k) = (&self.kept, &self.dropped, self.kept.n_slots() as u32);
        if dropped.n_slots() == 0 {
            let (offsets, slots) = kept.by_token();
            return RouterSlots { offsets, slots, expert: kept.expert_of_slots(), gate: kept.gate.clone() };
        }
        // Visiting expert by expert puts each token's slots in expert order.
        let pairs = (0..kept.n_experts).flat_map(|e| {
            let kept_slots = kept.slots_of(e).map(|s| (kept.token[s], s as u32));
            kept_slots.chain(dropped.slots_of(e).map(move |s| (dropped.token[s], k + s as u32)))
        });
        let (offsets, slots) = incidence(kept.n_tokens, kept.token.iter().chain(&dropped.token).copied(), pairs);
        RouterSlots {
            offsets,
            slots,
            expert: [kept.expert_of_slots(), dropped.expert_of_slots()].concat(),
            gate: [&kept.gate[..], &dropped.gate[..]].concat(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expert_major_with_ascending_tokens() {
        let c = |token, expert| Choice { token, expert, gate: 0.5 };
        let r = Routing::from_choices(3, 3, &[c(0, 2), c(0, 0), c(1, 2), c(1, 1), c(2, 0), c(2, 2)]);
        assert_eq!(r.offsets, vec![0, 2, 3, 6]);
        assert_eq!(r.token, vec![0, 2, 1, 0, 1, 2]);
        assert_eq!(r.counts(), vec![2, 1, 3]);
        let (off, slots) = r.by_token();
        assert_eq!(off, vec![0, 2, 4, 6]);
        assert_eq!(slots, vec![0, 3, 2, 4, 1, 5]);
        assert_eq!(r.expert_of_slots(), vec![0, 0, 1, 2, 2, 2]);
    }

    /// The router's slots put each token's kept and dropped slots together in expert order; the
    /// dropped ones numbered after every kept one.
    #[test]
    fn router_slots_join_kept_and_dropped_in_expert_order() {
        let c = |token, expert, gate| Choice { token, expert, gate };
        let kept = Routing::from_choices(3, 3, &[c(0, 0, 0.6), c(1, 0, 0.5), c(1, 2, 0.5), c(2, 2, 0.7)]);
        let dropped = Routing::from_choices(3, 3, &[c(0, 1, 0.4), c(2, 1, 0.3)]);
        let capped = Capped { kept: kept.clone(), dropped };
        assert_eq!(capped.chosen_counts(), vec![2, 2, 2]);
        let r = capped.router_slots();
        // Kept slots: 0 (t0 e0), 1 (t1 e0), 2 (t1 e2), 3 (t2 e2); dropped: 4 (t0 e1), 5 (t2 e1).
        assert_eq!(r.offsets, vec![0, 2, 4, 6]);
        assert_eq!(r.slots, vec![0, 4, 1, 2, 5, 3]);
        assert_eq!(r.expert, vec![0, 0, 2, 2, 1, 1]);
        assert_eq!(r.gate, vec![0.6, 0.5, 0.5, 0.7, 0.4, 0.3]);
        let none = Capped::dropless(kept.clone()).router_slots();
        assert_eq!((none.offsets, none.slots), kept.by_token());
        assert_eq!((none.expert, none.gate), (kept.expert_of_slots(), kept.gate));
    }
}
