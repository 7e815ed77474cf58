//! The model's parameters: f32 master values, which the optimizer updates and checkpoints hold,
//! and, on backends that compute in lower precision, the working copy every op reads.
//!
//! The working copy is refreshed wherever the master changes (construction, [`Weights::set`],
//! the optimizer's AdamW, which writes both in one pass), so it never goes stale.

use std::ops::Range;

use crate::backend::Backend;

pub struct Weights<B: Backend> {
    master: B::Buf,
    work: Option<B::Buf>,
}

impl<B: Backend> Weights<B> {
    /// Weights holding `values` (layout order).
    pub fn new(be: &B, values: &[f32]) -> Self {
        let master = be.alloc_f32(values.len());
        let work = be.uses_working_copy().then(|| be.alloc(values.len()));
        let mut w = Weights { master, work };
        w.set(be, values);
        w
    }

    /// The f32 master values.
    pub fn master(&self) -> &B::Buf {
        &self.master
    }

    /// What the ops read: the working copy, or the master where the backend has none.
    pub fn compute(&self) -> &B::Buf {
        self.work.as_ref().unwrap_or(&self.master)
    }

    /// Replaces every master value (a loaded checkpoint) and refreshes the working copy.
    pub fn set(&mut self, be: &B, values: &[f32]) {
        be.upload(B::full_mut(&mut self.master), values);
        if let Some(work) = &mut self.work {
            be.refresh_working_copy(B::full_mut(work), B::full(&self.master));
        }
    }

    /// Writable views of the master's `range` and of its working copy, for the optimizer.
    pub fn range_mut(&mut self, range: Range<usize>) -> (B::ViewMut<'_>, Option<B::ViewMut<'_>>) {
        (B::view_mut(&mut self.master, range.clone()), self.work.as_mut().map(|w| B::view_mut(w, range)))
    }
}
