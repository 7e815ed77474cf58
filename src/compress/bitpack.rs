//! Fixed-width bit packing, LSB-first: codebook indices (1..=8 bits) and row permutations
//! (⌈log2 rows⌉ bits, up to 32).
//!
//! Value `i` of a `b`-bit stream occupies stream bits `i·b .. (i+1)·b`, stream bit `k` being bit
//! `k % 8` of byte `k / 8`, least significant bit of the value first. Streams of different widths
//! can be concatenated without padding (row groups of a matrix may use different widths); only the
//! last byte of the whole stream is padded, with zero bits.

use crate::{Error, Result};

/// The widest value packed.
pub const MAX_WIDTH: u8 = 32;

/// Bytes needed for `count` values of `bits` bits.
pub fn packed_len(count: usize, bits: u8) -> usize {
    (count * bits as usize).div_ceil(8)
}

/// Bits per entry of a permutation of `n` elements: `⌈log2 n⌉`, at least 1.
pub fn width_for(n: usize) -> u8 {
    (usize::BITS - n.saturating_sub(1).leading_zeros()).max(1) as u8
}

/// Appends fixed-width values to a byte buffer.
#[derive(Default)]
pub struct BitWriter {
    bytes: Vec<u8>,
    bit_len: usize,
}

impl BitWriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `values`, each `bits` wide; errors on a width outside 1..=32 or a value that does
    /// not fit (it would silently corrupt its neighbours otherwise).
    pub fn push<T: Copy + Into<u32>>(&mut self, values: &[T], bits: u8) -> Result<()> {
        check_bits(bits)?;
        if let Some(v) = values.iter().map(|&v| v.into() as u64).find(|v| v >> bits != 0) {
            return Err(Error::Invalid(format!("value {v} does not fit in {bits} bits")));
        }
        self.bytes.resize((self.bit_len + values.len() * bits as usize).div_ceil(8), 0);
        for &v in values {
            let (mut v, mut left) = (v.into(), bits as usize);
            while left > 0 {
                let (byte, shift) = (self.bit_len / 8, self.bit_len % 8);
                let take = left.min(8 - shift);
                self.bytes[byte] |= ((v & ((1 << take) - 1)) << shift) as u8;
                v >>= take;
                left -= take;
                self.bit_len += take;
            }
        }
        Ok(())
    }

    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

/// Reads fixed-width values back from a packed buffer.
pub struct BitReader<'a> {
    bytes: &'a [u8],
    bit_pos: usize,
}

impl<'a> BitReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        BitReader { bytes, bit_pos: 0 }
    }

    /// Reads `count` values of `bits` bits (1..=32); errors if the buffer ends first.
    pub fn read(&mut self, count: usize, bits: u8) -> Result<Vec<u32>> {
        check_bits(bits)?;
        let end = count
            .checked_mul(bits as usize)
            .and_then(|n| n.checked_add(self.bit_pos))
            .filter(|&end| end <= self.bytes.len() * 8)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "packed data ends after {} bits but {count} more {bits}-bit values were expected",
                    self.bytes.len() * 8
                ))
            })?;
        let mut out = Vec::with_capacity(count);
        while self.bit_pos < end {
            let (mut v, mut got) = (0u32, 0usize);
            while got < bits as usize {
                let (byte, shift) = (self.bit_pos / 8, self.bit_pos % 8);
                let take = (bits as usize - got).min(8 - shift);
                v |= ((self.bytes[byte] as u32 >> shift) & ((1 << take) - 1)) << got;
                got += take;
                self.bit_pos += take;
            }
            out.push(v);
        }
        Ok(out)
    }

    /// True when every bit after the read position is zero: a clean stream has only zero padding.
    pub fn rest_is_zero(&self) -> bool {
        let (byte, shift) = (self.bit_pos / 8, self.bit_pos % 8);
        let partial_ok = shift == 0 || self.bytes.get(byte).is_none_or(|b| b >> shift == 0);
        let whole_from = byte + usize::from(shift != 0);
        partial_ok && self.bytes.get(whole_from..).is_none_or(|rest| rest.iter().all(|&b| b == 0))
    }
}

fn check_bits(bits: u8) -> Result<()> {
    if !(1..=MAX_WIDTH).contains(&bits) {
        return Err(Error::config("bits", bits, format!("a packed width between 1 and {MAX_WIDTH}")));
    }
    Ok(())
}

/// Packs one stream of `bits`-bit values.
pub fn pack<T: Copy + Into<u32>>(values: &[T], bits: u8) -> Result<Vec<u8>> {
    let mut w = BitWriter::new();
    w.push(values, bits)?;
    Ok(w.finish())
}

/// Unpacks `count` values of `bits` bits.
pub fn unpack(bytes: &[u8], count: usize, bits: u8) -> Result<Vec<u32>> {
    BitReader::new(bytes).read(count, bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn round_trip_is_exact_for_every_width_and_odd_lengths() {
        let mut rng = Rng::new(3);
        for bits in 1..=MAX_WIDTH {
            for len in [0usize, 1, 3, 7, 13, 101, 1023] {
                // Random values plus the extremes of the width.
                let max = (1u64 << bits) - 1;
                let mut values: Vec<u32> = (0..len).map(|_| (rng.below(1 << bits.min(31)) as u64 & max) as u32).collect();
                if len >= 2 {
                    (values[0], values[len - 1]) = (max as u32, 0);
                }
                let packed = pack(&values, bits).unwrap();
                assert_eq!(packed.len(), packed_len(len, bits), "bits {bits} len {len}");
                assert_eq!(unpack(&packed, len, bits).unwrap(), values, "bits {bits} len {len}");
                let mut r = BitReader::new(&packed);
                r.read(len, bits).unwrap();
                assert!(r.rest_is_zero());
                if bits <= 8 {
                    let bytes: Vec<u8> = values.iter().map(|&v| v as u8).collect();
                    assert_eq!(pack(&bytes, bits).unwrap(), packed, "u8 and u32 inputs pack alike");
                }
            }
        }
    }

    #[test]
    fn permutation_width_is_the_ceiling_of_log2() {
        let cases = [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (128, 7), (129, 8), (384, 9), (1 << 20, 20), ((1 << 20) + 1, 21)];
        for (n, bits) in cases {
            assert_eq!(width_for(n), bits, "n = {n}");
            assert!(n - 1 < 1 << bits, "n = {n}: the largest entry fits");
        }
    }

    #[test]
    fn layout_is_lsb_first() {
        // 3-bit values 5 (101), 3 (011), 7 (111): stream bits 101 110 111 (LSB first per value).
        assert_eq!(pack(&[5u8, 3, 7], 3).unwrap(), vec![0b1101_1101, 0b0000_0001]);
    }

    #[test]
    fn mixed_widths_concatenate() {
        let mut w = BitWriter::new();
        w.push(&[1u8, 2, 3], 2).unwrap();
        w.push(&[6u8, 0, 5, 7, 1], 3).unwrap();
        let bytes = w.finish();
        assert_eq!(bytes.len(), 3); // 3·2 + 5·3 = 21 bits
        let mut r = BitReader::new(&bytes);
        assert_eq!(r.read(3, 2).unwrap(), vec![1, 2, 3]);
        assert_eq!(r.read(5, 3).unwrap(), vec![6, 0, 5, 7, 1]);
        assert!(r.rest_is_zero());
    }

    #[test]
    fn errors_on_overflowing_values_bad_widths_and_short_buffers() {
        assert!(pack(&[4u8], 2).is_err() && pack(&[1u32 << 20], 20).is_err());
        assert!(pack(&[0u8], 0).is_err() && pack(&[0u32], 33).is_err());
        let e = unpack(&[0xff], 3, 3).unwrap_err().to_string();
        assert!(e.contains("expected"), "{e}");
        let mut r = BitReader::new(&[0b1000_0000]);
        r.read(1, 2).unwrap();
        assert!(!r.rest_is_zero());
    }
}
