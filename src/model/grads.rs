//! Which parameter gradients a step has written so far, so that the first product into a
//! matrix's gradient writes it (β = 0) instead of adding to zeros: zeroing H100-ref's 3.8 GB of
//! f32 gradients and reading the zeros back cost 7.6 GB of memory traffic a step.
//!
//! The block matrices (qkv, output, router, experts) are written only by matmuls, so a step
//! leaves them unzeroed and each one's first product writes it; the rest (embedding, norm
//! gains, head), whose ops add into them, are zeroed when the step starts. A matrix no product
//! wrote (an expert that received no token) is zeroed when the backward ends, so every
//! gradient is whole before anything reads it.

use std::collections::HashSet;
use std::ops::Range;

use super::params::ParamLayout;
use crate::backend::{Backend, Gemm, Pick};

#[derive(Clone, Debug)]
pub struct GradLedger {
    /// The gradients only products write, as (offset, len), sorted by offset.
    products: Vec<(usize, usize)>,
    written: Vec<bool>,
    /// Everything else, merged into ranges: zeroed when a step starts.
    accumulated: Vec<Range<usize>>,
}

impl GradLedger {
    /// The ledger of `layout`'s gradients, as a buffer of zeros is: every gradient written.
    pub fn new(layout: &ParamLayout) -> Self {
        let matrices: HashSet<usize> = layout.blocks.iter().flat_map(|b| [b.wqkv, b.wo, b.router].into_iter().chain(b.experts.iter().flat_map(|&(gu, down)| [gu, down]))).collect();
        let products: Vec<(usize, usize)> = layout.specs.iter().filter(|s| matrices.contains(&s.offset)).map(|s| (s.offset, s.len())).collect();
        let accumulated = layout.runs(|s| matrices.contains(&s.offset)).into_iter().filter(|(_, by_products)| !by_products).map(|(r, _)| r).collect();
        GradLedger { written: vec![true; products.len()], products, accumulated }
    }

    /// Starts a step: the products' gradients count as unwritten; returns the ranges the caller
    /// must zero (those ops add into).
    pub fn start_step(&mut self) -> &[Range<usize>] {
        self.written.fill(false);
        &self.accumulated
    }

    /// Whether a product into the gradient at `offset` adds to it (an earlier product this step
    /// wrote it) rather than writes it; from now on it counts as written.
    pub fn accumulates(&mut self, offset: usize) -> bool {
        let i = self.products.binary_search_by_key(&offset, |p| p.0).unwrap_or_else(|_| panic!("no product-written gradient at offset {offset}"));
        std::mem::replace(&mut self.written[i], true)
    }

    /// Ends the step's products into gradients within `range` (a block whose backward has
    /// run): returns those no product wrote, which the caller must zero; they count as written
    /// from now on, as every gradient does once each block is closed.
    pub fn close(&mut self, range: Range<usize>) -> Vec<Range<usize>> {
        let first = self.products.partition_point(|p| p.0 < range.start);
        let last = self.products.partition_point(|p| p.0 < range.end);
        let mut unwritten = Vec::new();
        for (&(off, len), written) in self.products[first..last].iter().zip(&mut self.written[first..last]) {
            assert!(off + len <= range.end, "a gradient at {off} straddles the closed range {range:?}");
            if !std::mem::replace(written, true) {
                unwritten.push(off..off + len);
            }
        }
        unwritten
    }
}

/// The gradient buffer and its ledger, as the backward writes them.
pub struct Grads<'a, B: Backend> {
    pub buf: &'a mut B::Buf,
    pub ledger: &'a mut GradLedger,
}

impl<B: Backend> Grads<'_, B> {
    /// The gradient at `off` (`len` values) for a product, and whether the product adds to it.
    pub fn product(&mut self, off: usize, len: usize) -> (B::ViewMut<'_>, bool) {
        let accumulate = self.ledger.accumulates(off);
        (B::view_mut(self.buf, off..off + len), accumulate)
    }

    /// The gradient at `off` for an op that adds into it (zeroed when the step started).
    pub fn accumulated(&mut self, off: usize, len: usize) -> B::ViewMut<'_> {
        B::view_mut(self.buf, off..off + len)
    }

    /// The experts' weight gradients `aᵀ · b` into gradients (each product's `out` an offset
    /// into the buffer; an operand's rows picked where it has a [`Pick`], see
    /// `Backend::grouped_weight_grad`): one call for the gradients it writes first, one for
    /// those it adds to.
    pub fn grouped_weight_grad(&mut self, be: &B, a: (B::View<'_>, Option<Pick<'_>>), b: (B::View<'_>, Option<Pick<'_>>), gemms: &[Gemm]) {
        let (adds, writes): (Vec<Gemm>, Vec<Gemm>) = gemms.iter().partition(|g| self.ledger.accumulates(g.out));
        for (group, accumulate) in [(writes, false), (adds, true)] {
            if !group.is_empty() {
                be.grouped_weight_grad(B::full_mut(self.buf), a, b, &group, accumulate);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn products_write_first_then_add_and_the_rest_is_zeroed() {
        let c = Config::default_with(&[]).unwrap();
        let layout = ParamLayout::new(&c.model, &c.moe);
        let mut ledger = GradLedger::new(&layout);
        let b = &layout.blocks[0];
        // A fresh buffer is zeros: every product adds.
        assert!(ledger.accumulates(b.wo));
        let zeroed = ledger.start_step().to_vec();
        // The zeroed ranges and the products' gradients tile the buffer exactly.
        let mut cover: Vec<Range<usize>> = zeroed.clone();
        cover.extend(ledger.products.iter().map(|&(o, l)| o..o + l));
        cover.sort_by_key(|r| r.start);
        assert_eq!(cover.first().unwrap().start, 0);
        assert_eq!(cover.last().unwrap().end, layout.total);
        assert!(cover.windows(2).all(|w| w[0].end == w[1].start));
        for name in ["tok_embedding", "layers.0.attn_norm", "final_norm", "lm_head"] {
            let r = layout.get(name).unwrap().range();
            assert!(zeroed.iter().any(|z| z.start <= r.start && r.end <= z.end), "{name} is zeroed at the step's start");
        }
        assert!(!ledger.accumulates(b.wo), "the first product writes");
        assert!(ledger.accumulates(b.wo), "later ones add");
        let mut unwritten = Vec::new();
        for l in (0..layout.blocks.len()).rev() {
            let block = layout.block_range(l);
            let closed = ledger.close(block.clone());
            assert!(closed.iter().all(|r| block.start <= r.start && r.end <= block.end), "block {l} closes its own gradients only");
            unwritten.extend(closed);
        }
        assert_eq!(unwritten.len(), ledger.products.len() - 1);
        assert!(!unwritten.iter().any(|r| r.start == b.wo));
        assert!((0..layout.blocks.len()).all(|l| ledger.close(layout.block_range(l)).is_empty()), "closed gradients count as written");
    }
}
