//! Fixed-width bit packing of codebook indices, LSB-first.
//!
//! Value `i` of a `b`-bit stream occupies stream bits `i·b .. (i+1)·b`, stream bit `k` being bit
//! `k % 8` of byte `k / 8`, least significant bit of the value first. Streams of different widths
//! can be concatenated without padding (row groups of a matrix may use different widths); only the
//! last byte of the whole stream is padded, with zero bits.

use super::bits::MAX_BITS;
use crate::{Error, Result};

/// Bytes needed for `count` values of `bits` bits.
pub fn packed_len(count: usize, bits: u8) -> usize {
    (count * bits as usize).div_ceil(8)
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

    /// Appends `values`, each `bits` wide; errors on a width outside 1..=8 or a value that does
    /// not fit (it would silently corrupt its neighbours otherwise).
    pub fn push(&mut self, values: &[u8], bits: u8) -> Result<()> {
        check_bits(bits)?;
        if let Some(v) = values.iter().find(|&&v| (v as u32) >> bits != 0) {
            return Err(Error::Invalid(format!("index {v} does not fit in {bits} bits")));
        }
        self.bytes.resize((self.bit_len + values.len() * bits as usize).div_ceil(8), 0);
        for &v in values {
            // A value of ≤ 8 bits spans at most two bytes.
            let (byte, shift) = (self.bit_len / 8, self.bit_len % 8);
            let wide = (v as u16) << shift;
            self.bytes[byte] |= wide as u8;
            if shift + bits as usize > 8 {
                self.bytes[byte + 1] |= (wide >> 8) as u8;
            }
            self.bit_len += bits as usize;
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

    /// Reads `count` values of `bits` bits; errors if the buffer ends first.
    pub fn read(&mut self, count: usize, bits: u8) -> Result<Vec<u8>> {
        check_bits(bits)?;
        let end = count
            .checked_mul(bits as usize)
            .and_then(|n| n.checked_add(self.bit_pos))
            .filter(|&end| end <= self.bytes.len() * 8)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "packed indices end after {} bits but {count} more {bits}-bit values were expected",
                    self.bytes.len() * 8
                ))
            })?;
        let mask = ((1u16 << bits) - 1) as u16;
        let mut out = Vec::with_capacity(count);
        while self.bit_pos < end {
            let (byte, shift) = (self.bit_pos / 8, self.bit_pos % 8);
            let lo = self.bytes[byte] as u16;
            let hi = self.bytes.get(byte + 1).copied().unwrap_or(0) as u16;
            out.push((((lo | hi << 8) >> shift) & mask) as u8);
            self.bit_pos += bits as usize;
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
    if !(1..=MAX_BITS).contains(&bits) {
        return Err(Error::config("bits", bits, format!("an index width between 1 and {MAX_BITS}")));
    }
    Ok(())
}

/// Packs one stream of `bits`-bit values.
pub fn pack(values: &[u8], bits: u8) -> Result<Vec<u8>> {
    let mut w = BitWriter::new();
    w.push(values, bits)?;
    Ok(w.finish())
}

/// Unpacks `count` values of `bits` bits.
pub fn unpack(bytes: &[u8], count: usize, bits: u8) -> Result<Vec<u8>> {
    BitReader::new(bytes).read(count, bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn round_trip_is_exact_for_every_width_and_odd_lengths() {
        let mut rng = Rng::new(3);
        for bits in 1..=8u8 {
            for len in [0usize, 1, 3, 7, 13, 101, 1023] {
                let values: Vec<u8> = (0..len).map(|_| rng.below(1 << bits) as u8).collect();
                let packed = pack(&values, bits).unwrap();
                assert_eq!(packed.len(), packed_len(len, bits), "bits {bits} len {len}");
                assert_eq!(unpack(&packed, len, bits).unwrap(), values, "bits {bits} len {len}");
                let mut r = BitReader::new(&packed);
                r.read(len, bits).unwrap();
                assert!(r.rest_is_zero());
            }
        }
    }

    #[test]
    fn layout_is_lsb_first() {
        // 3-bit values 5 (101), 3 (011), 7 (111): stream bits 101 110 111 (LSB first per value).
        assert_eq!(pack(&[5, 3, 7], 3).unwrap(), vec![0b1101_1101, 0b0000_0001]);
    }

    #[test]
    fn mixed_widths_concatenate() {
        let mut w = BitWriter::new();
        w.push(&[1, 2, 3], 2).unwrap();
        w.push(&[6, 0, 5, 7, 1], 3).unwrap();
        let bytes = w.finish();
        assert_eq!(bytes.len(), 3); // 3·2 + 5·3 = 21 bits
        let mut r = BitReader::new(&bytes);
        assert_eq!(r.read(3, 2).unwrap(), vec![1, 2, 3]);
        assert_eq!(r.read(5, 3).unwrap(), vec![6, 0, 5, 7, 1]);
        assert!(r.rest_is_zero());
    }

    #[test]
    fn errors_on_overflowing_values_bad_widths_and_short_buffers() {
        assert!(pack(&[4], 2).is_err());
        assert!(pack(&[0], 0).is_err() && pack(&[0], 9).is_err());
        let e = unpack(&[0xff], 3, 3).unwrap_err().to_string();
        assert!(e.contains("expected"), "{e}");
        let mut r = BitReader::new(&[0b1000_0000]);
        r.read(1, 2).unwrap();
        assert!(!r.rest_is_zero());
    }
}
