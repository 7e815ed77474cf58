//! The host tier: where offloaded activations wait between a layer's forward and its backward.
//!
//! One pool, used as a stack: the forward offloads layer 0, 1, …, the backward brings them back in
//! reverse order, so the newest segment is always the next to go and the pool never fragments. On
//! CUDA this is the pinned buffer the D2H/H2D streams copy through; on CPU it is a separate
//! allocation, so the offload path (copy out, drop, copy back) runs end to end and can be measured.

use crate::{Error, Result};

/// Bytes of one stored element (activations are f32 on the CPU engine).
pub const ELEM_BYTES: u64 = std::mem::size_of::<f32>() as u64;

/// A segment of the pool: `len` elements from `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostSeg {
    pub start: usize,
    pub len: usize,
}

/// A stack of host segments with a byte limit.
#[derive(Debug, Default)]
pub struct HostTier {
    pool: Vec<f32>,
    /// Segments in push order, with whether each is still live; dead ones on top are popped.
    segs: Vec<(HostSeg, bool)>,
    limit_bytes: u64,
    peak_bytes: u64,
}

impl HostTier {
    pub fn new(limit_bytes: u64) -> Self {
        HostTier { limit_bytes, ..Default::default() }
    }

    /// Reserves `len` elements on top of the stack and hands them out for filling.
    pub fn push(&mut self, len: usize) -> Result<(HostSeg, &mut [f32])> {
        let start = self.pool.len();
        let bytes = (start + len) as u64 * ELEM_BYTES;
        if bytes > self.limit_bytes {
            return Err(Error::Invalid(format!(
                "host tier full: offloading {} B more would need {bytes} B of host memory but the limit is {} B; \
                 lower memory.alpha or raise the host memory",
                len as u64 * ELEM_BYTES,
                self.limit_bytes
            )));
        }
        self.pool.resize(start + len, 0.0);
        self.peak_bytes = self.peak_bytes.max(bytes);
        let seg = HostSeg { start, len };
        self.segs.push((seg, true));
        Ok((seg, &mut self.pool[start..start + len]))
    }

    pub fn get(&self, seg: HostSeg) -> &[f32] {
        &self.pool[seg.start..seg.start + seg.len]
    }

    /// Frees `seg`; the pool shrinks once every segment above it is free too.
    pub fn free(&mut self, seg: HostSeg) {
        if let Some(entry) = self.segs.iter_mut().rev().find(|(s, live)| *live && *s == seg) {
            entry.1 = false;
        }
        while self.segs.last().is_some_and(|(_, live)| !live) {
            let (s, _) = self.segs.pop().expect("checked non-empty");
            self.pool.truncate(s.start);
        }
    }

    pub fn used_bytes(&self) -> u64 {
        self.pool.len() as u64 * ELEM_BYTES
    }

    pub fn peak_bytes(&self) -> u64 {
        self.peak_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_frees_out_of_order_and_enforces_the_limit() {
        let mut h = HostTier::new(10 * ELEM_BYTES);
        let (a, buf) = h.push(4).unwrap();
        buf.fill(1.0);
        let (b, buf) = h.push(4).unwrap();
        buf.fill(2.0);
        assert!(h.push(3).is_err(), "11 elements exceed a 10-element limit");
        assert_eq!(h.get(a), &[1.0; 4]);
        h.free(a);
        assert_eq!(h.used_bytes(), 8 * ELEM_BYTES, "a is below b: held until b goes");
        assert_eq!(h.get(b), &[2.0; 4]);
        h.free(b);
        assert_eq!(h.used_bytes(), 0);
        assert_eq!(h.peak_bytes(), 8 * ELEM_BYTES);
    }
}
