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
        let mut offsets = vec![0u32; self.n_tokens + 1];
        for &t in &self.token {
            offsets[t as usize + 1] += 1;
        }
        for t in 0..self.n_tokens {
            offsets[t + 1] += offsets[t];
        }
        let mut next: Vec<u32> = offsets[..self.n_tokens].to_vec();
        let mut slots = vec![0u32; self.n_slots()];
        for (s, &t) in self.token.iter().enumerate() {
            slots[next[t as usize] as usize] = s as u32;
            next[t as usize] += 1;
        }
        (offsets, slots)
    }

    /// Expert of each slot.
    pub fn expert_of_slots(&self) -> Vec<u32> {
        (0..self.n_experts).flat_map(|e| std::iter::repeat_n(e as u32, self.offsets[e + 1] - self.offsets[e])).collect()
    }

    /// Slot range of expert `e`.
    pub fn slots_of(&self, e: usize) -> std::ops::Range<usize> {
        self.offsets[e]..self.offsets[e + 1]
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
}
