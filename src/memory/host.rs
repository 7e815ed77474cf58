//! The host tier: where offloaded activations wait between a layer's forward and its backward.
//!
//! One pool of host memory (the backend's [`Backend::alloc_host`]: page-locked on a GPU, so the
//! copies run on a copy stream at full bandwidth), used as a stack: the forward offloads layer 0,
//! 1, …, the backward brings them back in reverse order, so the newest segment is always the next
//! to go and the pool never fragments. This module keeps the byte ranges; the store does the
//! copies. The pool is allocated at the first offload, at the tier's limit, and kept.
//!
//! [`Backend::alloc_host`]: crate::backend::Backend::alloc_host

use crate::{Error, Result};

/// Segments start at multiples of this many bytes, so every element type stays aligned and DMA
/// runs on whole lines.
const SEG_ALIGN: u64 = 256;

/// A segment of the pool: `len` bytes from byte `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostSeg {
    pub start: u64,
    pub len: u64,
}

/// A stack of byte segments with a limit.
#[derive(Debug, Default)]
pub struct HostTier {
    /// Segments in push order, with whether each is still live; dead ones on top are popped.
    segs: Vec<(HostSeg, bool)>,
    limit_bytes: u64,
    peak_bytes: u64,
}

impl HostTier {
    pub fn new(limit_bytes: u64) -> Self {
        HostTier { limit_bytes, ..Default::default() }
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    /// Reserves `len` bytes on top of the stack.
    pub fn push(&mut self, len: u64) -> Result<HostSeg> {
        let start = self.used_bytes().next_multiple_of(SEG_ALIGN);
        let end = start + len;
        if end > self.limit_bytes {
            return Err(Error::Invalid(format!(
                "host tier full: offloading {len} B more would need {end} B of host memory but the limit is {} B; \
                 lower memory.alpha or raise the host memory",
                self.limit_bytes
            )));
        }
        self.peak_bytes = self.peak_bytes.max(end);
        let seg = HostSeg { start, len };
        self.segs.push((seg, true));
        Ok(seg)
    }

    /// Frees `seg`; the pool shrinks once every segment above it is free too.
    pub fn free(&mut self, seg: HostSeg) {
        if let Some(entry) = self.segs.iter_mut().rev().find(|(s, live)| *live && *s == seg) {
            entry.1 = false;
        }
        while self.segs.last().is_some_and(|(_, live)| !live) {
            self.segs.pop();
        }
    }

    pub fn used_bytes(&self) -> u64 {
        self.segs.last().map_or(0, |(s, _)| s.start + s.len)
    }

    pub fn peak_bytes(&self) -> u64 {
        self.peak_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_frees_out_of_order_aligns_segments_and_enforces_the_limit() {
        let mut h = HostTier::new(1024);
        let a = h.push(100).unwrap();
        let b = h.push(300).unwrap();
        assert_eq!((a.start, b.start), (0, 256), "segments start on 256-byte lines");
        assert!(h.push(500).is_err(), "556 + 500 bytes exceed the 1024-byte limit");
        h.free(a);
        assert_eq!(h.used_bytes(), 556, "a is below b: held until b goes");
        h.free(b);
        assert_eq!(h.used_bytes(), 0);
        assert_eq!(h.peak_bytes(), 556);
        assert_eq!(h.push(8).unwrap().start, 0, "freed space is reused");
    }
}
