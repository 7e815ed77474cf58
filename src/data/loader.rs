//! Batches of next-token training pairs from a shard.
//!
//! An epoch cuts the shard into windows of `seq_len + 1` tokens starting every `seq_len`
//! tokens (consecutive windows share one token, so every token is a target once), starting
//! at a random phase so epochs see different cuts, and visits them in a shuffled order.
//! Phase and order depend only on (seed, epoch), so `LoaderState {epoch, position}` is all
//! a checkpoint needs to continue with exactly the batches an uninterrupted run would see.

use serde::{Deserialize, Serialize};

use crate::rng::Rng;
use super::shard::Shard;
use crate::{Error, Result};

/// Where a loader is: the epoch and the index of the next window in that epoch's order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    pub position: u64,
}

/// `batch_size` rows of `seq_len` tokens, row-major; `targets` is `inputs` shifted by one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub batch_size: usize,
    pub seq_len: usize,
}

pub struct Loader {
    shard: Shard,
    batch_size: usize,
    seq_len: usize,
    seed: u64,
    /// Start token of each window of the current epoch, in visiting order.
    order: Vec<usize>,
    state: LoaderState,
}

impl Loader {
    /// A loader at the start of epoch 0. The shard needs at least `seq_len + 1` tokens.
    pub fn new(shard: Shard, batch_size: usize, seq_len: usize, seed: u64) -> Result<Self> {
        if batch_size == 0 || seq_len == 0 {
            return Err(Error::Invalid(format!("loader needs batch_size and seq_len > 0 (got {batch_size}, {seq_len})")));
        }
        if shard.len() < seq_len + 1 {
            return Err(Error::bad_file(
                shard.path(),
                format!("{} tokens: too few for one sequence of seq_len + 1 = {} tokens; use more text or a shorter train.seq_len", shard.len(), seq_len + 1),
            ));
        }
        let mut loader = Self { shard, batch_size, seq_len, seed, order: Vec::new(), state: LoaderState::default() };
        loader.start_epoch(0);
        Ok(loader)
    }

    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// Continues from `state` (as returned by `state()` of a loader on the same shard, seed and shapes).
    pub fn restore(&mut self, state: LoaderState) -> Result<()> {
        self.start_epoch(state.epoch);
        if state.position > self.order.len() as u64 {
            return Err(Error::Invalid(format!(
                "loader state position {} is past the {} sequences of epoch {} in {}: was the checkpoint made with another shard or seq_len?",
                state.position,
                self.order.len(),
                state.epoch,
                self.shard.path().display()
            )));
        }
        self.state.position = state.position;
        Ok(())
    }

    /// Sequences in the current epoch.
    pub fn sequences_per_epoch(&self) -> usize {
        self.order.len()
    }

    /// The next batch, rolling over into the next epoch when this one runs out.
    pub fn next_batch(&mut self) -> Batch {
        let t = self.seq_len;
        let mut inputs = vec![0; self.batch_size * t];
        let mut targets = vec![0; self.batch_size * t];
        let mut window = vec![0u32; t + 1];
        for row in 0..self.batch_size {
            if self.state.position as usize >= self.order.len() {
                self.start_epoch(self.state.epoch + 1);
            }
            let start = self.order[self.state.position as usize];
            self.state.position += 1;
            self.shard.read(start, &mut window);
            inputs[row * t..(row + 1) * t].copy_from_slice(&window[..t]);
            targets[row * t..(row + 1) * t].copy_from_slice(&window[1..]);
        }
        Batch { inputs, targets, batch_size: self.batch_size, seq_len: t }
    }

    fn start_epoch(&mut self, epoch: u64) {
        let t = self.seq_len;
        let len = self.shard.len();
        let mut rng = Rng::new(self.seed).derive(epoch);
        let phase = rng.below(t.min(len - t));
        let count = (len - 1 - phase) / t;
        self.order.clear();
        self.order.extend((0..count).map(|i| phase + i * t));
        rng.shuffle(&mut self.order);
        self.state = LoaderState { epoch, position: 0 };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shard;

    fn shard_of(name: &str, tokens: &[u32]) -> (Shard, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("motley-loader-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("train.bin");
        shard::write(&path, tokens).unwrap();
        (Shard::open(&path).unwrap(), dir)
    }

    #[test]
    fn targets_are_inputs_shifted_and_epochs_cover_the_shard() {
        let tokens: Vec<u32> = (0..1000).collect();
        let (s, dir) = shard_of("cover", &tokens);
        let mut l = Loader::new(s, 4, 10, 7).unwrap();
        let per_epoch = l.sequences_per_epoch();
        assert!((98..=99).contains(&per_epoch), "{per_epoch}");
        let mut starts = Vec::new();
        while starts.len() < per_epoch {
            let b = l.next_batch();
            for row in 0..4 {
                let (x, y) = (&b.inputs[row * 10..row * 10 + 10], &b.targets[row * 10..row * 10 + 10]);
                assert!(x.iter().zip(y).all(|(a, b)| b == &(a + 1)), "row {row}: {x:?} {y:?}");
                starts.push(x[0]);
            }
        }
        starts.truncate(per_epoch);
        assert!(starts.windows(2).any(|w| w[0] > w[1]), "order should be shuffled");
        starts.sort();
        starts.dedup();
        assert_eq!(starts.len(), per_epoch, "each window once per epoch");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn restore_continues_identically_across_epochs() {
        let tokens: Vec<u32> = (0..500).map(|i| (i * 7919) % 1000).collect();
        let (s, dir) = shard_of("restore", &tokens);
        let mut a = Loader::new(s, 3, 8, 42).unwrap();
        for _ in 0..25 {
            a.next_batch();
        }
        let saved = a.state();
        assert!(saved.epoch >= 1, "test should cross an epoch: {saved:?}");
        let expected: Vec<Batch> = (0..30).map(|_| a.next_batch()).collect();
        let mut b = Loader::new(Shard::open(&dir.join("train.bin")).unwrap(), 3, 8, 42).unwrap();
        b.restore(saved).unwrap();
        let got: Vec<Batch> = (0..30).map(|_| b.next_batch()).collect();
        assert_eq!(got, expected);
        let mut other_seed = Loader::new(Shard::open(&dir.join("train.bin")).unwrap(), 3, 8, 43).unwrap();
        other_seed.restore(saved).unwrap();
        assert_ne!(other_seed.next_batch(), expected[0]);
        assert!(b.restore(LoaderState { epoch: 0, position: 10_000 }).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn too_short_shard_is_an_error_naming_it() {
        let (s, dir) = shard_of("short", &[1, 2, 3]);
        let e = Loader::new(s, 1, 8, 0).err().unwrap().to_string();
        assert!(e.contains("train.bin") && e.contains("too few"), "{e}");
        let (s, _) = shard_of("short", &[1, 2, 3]);
        // Exactly seq_len + 1 tokens is enough: one window per epoch.
        let mut l = Loader::new(s, 2, 2, 0).unwrap();
        assert_eq!(l.next_batch().inputs, vec![1, 2, 1, 2]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
