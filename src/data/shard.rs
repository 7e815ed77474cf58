//! Token shards in llm.c's layout, so shards can be shared with that ecosystem:
//! a header of 256 little-endian i32 — `[0]` magic 20240520, `[1]` version (1: u16 tokens,
//! 2: u32 tokens), `[2]` token count — followed by the tokens, little-endian.
//!
//! Shards are read through a memory map: a multi-GB corpus costs no RAM and opens instantly.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{Error, Result};

pub const MAGIC: i32 = 20240520;
pub const HEADER_INTS: usize = 256;
const HEADER_BYTES: usize = HEADER_INTS * 4;

/// Writes `tokens` to `path` (through a temporary file and a rename, so a reader never sees
/// half a shard). Uses 16-bit tokens (version 1) when every id fits, else 32-bit (version 2).
pub fn write(path: &Path, tokens: &[u32]) -> Result<()> {
    let count = i32::try_from(tokens.len())
        .map_err(|_| Error::Invalid(format!("{}: {} tokens exceed one shard's limit of {}", path.display(), tokens.len(), i32::MAX)))?;
    let narrow = tokens.iter().all(|&t| t <= u32::from(u16::MAX));
    let mut header = [0i32; HEADER_INTS];
    header[0] = MAGIC;
    header[1] = if narrow { 1 } else { 2 };
    header[2] = count;
    let width = if narrow { 2 } else { 4 };
    let mut bytes = Vec::with_capacity(HEADER_BYTES + tokens.len() * width);
    header.iter().for_each(|h| bytes.extend_from_slice(&h.to_le_bytes()));
    for &t in tokens {
        if narrow {
            bytes.extend_from_slice(&(t as u16).to_le_bytes());
        } else {
            bytes.extend_from_slice(&t.to_le_bytes());
        }
    }
    let tmp = path.with_extension("bin.tmp");
    let mut file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    file.write_all(&bytes).and_then(|_| file.sync_all()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// A validated, memory-mapped shard.
pub struct Shard {
    path: PathBuf,
    map: Mmap,
    wide: bool,
    len: usize,
}

impl Shard {
    /// Maps `path` and checks magic, version and that the length matches the header's count.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; shards are written once (via rename) and not modified
        // while a run reads them.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        if map.len() < HEADER_BYTES {
            return Err(Error::bad_file(path, format!("truncated shard: {} bytes, shorter than the {HEADER_BYTES}-byte header", map.len())));
        }
        let int = |i: usize| i32::from_le_bytes(map[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        if int(0) != MAGIC {
            return Err(Error::bad_file(path, format!("wrong magic {} (expected {MAGIC}): not an llm.c token shard", int(0))));
        }
        let wide = match int(1) {
            1 => false,
            2 => true,
            v => return Err(Error::bad_file(path, format!("unsupported shard version {v} (1 = u16 tokens, 2 = u32 tokens)"))),
        };
        let len = usize::try_from(int(2)).map_err(|_| Error::bad_file(path, format!("negative token count {}", int(2))))?;
        let expected = HEADER_BYTES + len * if wide { 4 } else { 2 };
        if map.len() != expected {
            let what = if map.len() < expected { "truncated" } else { "trailing bytes after the tokens" };
            return Err(Error::bad_file(
                path,
                format!("{what}: header says {len} tokens ({expected} bytes) but the file has {} bytes", map.len()),
            ));
        }
        Ok(Self { path: path.to_path_buf(), map, wide, len })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies tokens `start..start + out.len()` into `out`; the range must lie inside the shard.
    pub fn read(&self, start: usize, out: &mut [u32]) {
        assert!(start + out.len() <= self.len, "shard read {start}+{} past {} tokens", out.len(), self.len);
        let body = &self.map[HEADER_BYTES..];
        if self.wide {
            for (o, c) in out.iter_mut().zip(body[start * 4..].chunks_exact(4)) {
                *o = u32::from_le_bytes(c.try_into().expect("4 bytes"));
            }
        } else {
            for (o, c) in out.iter_mut().zip(body[start * 2..].chunks_exact(2)) {
                *o = u32::from(u16::from_le_bytes(c.try_into().expect("2 bytes")));
            }
        }
    }

    /// Every token, copied out.
    pub fn to_vec(&self) -> Vec<u32> {
        let mut out = vec![0; self.len];
        self.read(0, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("motley-shard-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("s.bin")
    }

    #[test]
    fn round_trip_narrow_and_wide() {
        for (name, tokens) in [("narrow", vec![0u32, 1, 65535, 7, 300]), ("wide", vec![70000u32, 1, 2, u32::MAX])] {
            let path = tmp(name);
            write(&path, &tokens).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(i32::from_le_bytes(bytes[0..4].try_into().unwrap()), MAGIC);
            let width = if name == "narrow" { 2 } else { 4 };
            assert_eq!(bytes.len(), 1024 + width * tokens.len());
            let shard = Shard::open(&path).unwrap();
            assert_eq!(shard.to_vec(), tokens);
            let mut mid = [0u32; 2];
            shard.read(1, &mut mid);
            assert_eq!(mid, [tokens[1], tokens[2]]);
            std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
        }
    }

    #[test]
    fn damaged_shards_are_rejected_naming_the_file() {
        let path = tmp("bad");
        write(&path, &[1, 2, 3, 4]).unwrap();
        let good = std::fs::read(&path).unwrap();
        let check = |bytes: &[u8], want: &str| {
            std::fs::write(&path, bytes).unwrap();
            let e = Shard::open(&path).err().expect("damaged shard opened").to_string();
            assert!(e.contains(path.to_str().unwrap()) && e.contains(want), "{e}");
        };
        check(&good[..good.len() - 1], "truncated");
        check(&good[..100], "truncated");
        let mut magic = good.clone();
        magic[0] ^= 1;
        check(&magic, "wrong magic");
        let mut version = good.clone();
        version[4] = 9;
        check(&version, "version 9");
        let mut long = good.clone();
        long.push(0);
        check(&long, "trailing");
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
