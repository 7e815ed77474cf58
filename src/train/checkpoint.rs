//! Checkpoints: `RUN/checkpoints/step_NNNNNN/` holding `model.safetensors`,
//! `optimizer.safetensors` and `state.json` (step, RNG states, loader position, config).
//!
//! A checkpoint is written into a temporary sibling directory, every file fsynced, then
//! renamed into place, so a crash or error mid-write never damages the previous checkpoint
//! and `latest` never returns a half-written one. Older checkpoints are deleted only after
//! the new one is in place.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::data::loader::LoaderState;
use crate::{Error, Result};

/// A named f32 tensor to save: (name, shape, row-major data).
pub type TensorRef<'a> = (String, Vec<usize>, &'a [f32]);

const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";
const PREFIX: &str = "step_";
const TMP_PREFIX: &str = ".tmp-step_";

/// Everything besides tensors needed to continue a run exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Steps completed.
    pub step: u64,
    /// States of the run's random number generators, in an order the training loop defines.
    pub rng: Vec<u64>,
    pub loader: LoaderState,
    /// `Config::config_hash()` of the run that wrote the checkpoint.
    pub config_hash: String,
    /// `Config::to_toml()` of that run.
    pub config_toml: String,
    /// The run's tokenizer.json (None: byte tokenizer), so a checkpoint is self-contained.
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// Cumulative counted training FLOPs up to `step`, so a resumed run keeps its FLOP budget.
    #[serde(default)]
    pub flops: f64,
}

/// Named tensors read from one safetensors file.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSet {
    file: PathBuf,
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

/// A loaded, validated checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
    pub model: TensorSet,
    /// Optimizer moments, named as the training loop saved them (e.g. `m.<param>`, `v.<param>`).
    pub optimizer: TensorSet,
}

impl TensorSet {
    /// The data of tensor `name`, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<&[f32]> {
        let (saved, data) = self
            .tensors
            .get(name)
            .ok_or_else(|| Error::bad_file(&self.file, format!("no tensor `{name}` (the checkpoint has {} tensors)", self.tensors.len())))?;
        if saved != shape {
            return Err(Error::bad_file(&self.file, format!("tensor `{name}` has shape {saved:?}, the model expects {shape:?}")));
        }
        Ok(data)
    }

    /// Checks that the file holds exactly the tensors `expected` (names and shapes), no more.
    pub fn check(&self, expected: &[(String, Vec<usize>)]) -> Result<()> {
        for (name, shape) in expected {
            self.get(name, shape)?;
        }
        if let Some(extra) = self.tensors.keys().find(|k| !expected.iter().any(|(n, _)| n == *k)) {
            return Err(Error::bad_file(&self.file, format!("tensor `{extra}` is not part of this model")));
        }
        Ok(())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

/// Saves a checkpoint for `state.step` under `run_dir/checkpoints/`, keeps the newest
/// `keep_last`, and returns its directory. Checkpoints of later steps (left by a run that
/// was resumed from an earlier one) are removed too, so `latest` names this one.
pub fn save(run_dir: &Path, state: &TrainState, model: &[TensorRef], optimizer: &[TensorRef], keep_last: usize) -> Result<PathBuf> {
    save_checked(run_dir, state, model, optimizer, keep_last, &|_| Ok(()))
}

/// `save`, calling `after_write(file name)` after each file is written: tests inject failures here.
fn save_checked(
    run_dir: &Path,
    state: &TrainState,
    model: &[TensorRef],
    optimizer: &[TensorRef],
    keep_last: usize,
    after_write: &dyn Fn(&str) -> Result<()>,
) -> Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let name = format!("{PREFIX}{:06}", state.step);
    let tmp = root.join(format!("{TMP_PREFIX}{:06}", state.step));
    remove_dir_if_present(&tmp)?;
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = (|| {
        write_synced(&tmp.join(MODEL_FILE), &tensor_bytes(model, MODEL_FILE)?)?;
        after_write(MODEL_FILE)?;
        write_synced(&tmp.join(OPTIMIZER_FILE), &tensor_bytes(optimizer, OPTIMIZER_FILE)?)?;
        after_write(OPTIMIZER_FILE)?;
        let json = serde_json::to_vec_pretty(state).map_err(|e| Error::Invalid(format!("cannot encode checkpoint state: {e}")))?;
        write_synced(&tmp.join(STATE_FILE), &json)?;
        after_write(STATE_FILE)?;
        sync_dir(&tmp)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let dir = root.join(&name);
    // Re-saving a step (after a resume) replaces the old copy.
    replace_dir(&tmp, &dir)?;
    let (older, newer): (Vec<_>, Vec<_>) = list(run_dir)?.into_iter().filter(|(s, _)| *s != state.step).partition(|(s, _)| *s < state.step);
    let surplus = older.len().saturating_sub(keep_last.saturating_sub(1));
    for (_, path) in older.iter().take(surplus).chain(&newer) {
        remove_dir_if_present(path)?;
    }
    Ok(dir)
}

/// Checkpoints under `run_dir/checkpoints/`, oldest first, as (step, directory).
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let root = run_dir.join("checkpoints");
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&root).map_err(|e| Error::io(&root, e))? {
        let entry = entry.map_err(|e| Error::io(&root, e))?;
        let file_name = entry.file_name();
        let step = file_name.to_str().and_then(|n| n.strip_prefix(PREFIX)).and_then(|n| n.parse::<u64>().ok());
        if let Some(step) = step {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest checkpoint directory of a run, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(run_dir)?.pop().map(|(_, p)| p))
}

/// Loads the checkpoint in `dir`, refusing it when it was made for another model config.
pub fn load(dir: &Path, expected_hash: &str) -> Result<Checkpoint> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainState = serde_json::from_slice(&text)
        .map_err(|e| Error::bad_file(&state_path, format!("not a valid checkpoint state: {e}")))?;
    if state.config_hash != expected_hash {
        return Err(Error::Invalid(format!(
            "{}: checkpoint was written for model config hash {}, but this run's [model]/[moe] hash to {}; \
             resume with the checkpoint's own config (saved in its state.json) or start a new run in another directory",
            dir.display(),
            state.config_hash,
            expected_hash
        )));
    }
    Ok(Checkpoint { dir: dir.to_path_buf(), model: read_tensors(&dir.join(MODEL_FILE))?, optimizer: read_tensors(&dir.join(OPTIMIZER_FILE))?, state })
}

fn tensor_bytes(tensors: &[TensorRef], file: &str) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(tensors.len());
    let mut names = std::collections::HashSet::new();
    for (name, shape, data) in tensors {
        if data.len() != shape.iter().product::<usize>() {
            return Err(Error::Invalid(format!("{file}: tensor `{name}` has {} values but shape {shape:?}", data.len())));
        }
        if !names.insert(name.as_str()) {
            return Err(Error::Invalid(format!("{file}: tensor name `{name}` given twice")));
        }
        bytes.push(data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    }
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| Ok((name.as_str(), TensorView::new(Dtype::F32, shape.clone(), b)?)))
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| Error::Invalid(format!("{file}: {e}")))?;
    safetensors::serialize(views, None).map_err(|e| Error::Invalid(format!("{file}: {e}")))
}

fn read_tensors(path: &Path) -> Result<TensorSet> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let parsed = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::bad_file(path, format!("not a valid safetensors file ({e}); the checkpoint is damaged, use an older one")))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in parsed.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(Error::bad_file(path, format!("tensor `{name}` has dtype {:?}, expected F32", view.dtype())));
        }
        let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        tensors.insert(name, (view.shape().to_vec(), data));
    }
    Ok(TensorSet { file: path.to_path_buf(), tensors })
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).map_err(|e| Error::io(path, e))?;
    file.write_all(bytes).and_then(|_| file.sync_all()).map_err(|e| Error::io(path, e))
}

/// Makes a directory's entries (new files, renames) durable.
/// Puts the complete directory `tmp` at `dir` (a sibling), replacing what is there: the old
/// copy is moved aside, not deleted, until the new one is in place, so a failure at any point
/// leaves one whole copy at `dir` or beside it.
pub(crate) fn replace_dir(tmp: &Path, dir: &Path) -> Result<()> {
    let parent = dir.parent().ok_or_else(|| Error::Invalid(format!("{}: no parent folder", dir.display())))?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let displaced = parent.join(format!(".old-{name}"));
    if dir.exists() {
        remove_dir_if_present(&displaced)?;
        std::fs::rename(dir, &displaced).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(tmp, dir).map_err(|e| Error::io(dir, e))?;
    sync_dir(parent)?;
    remove_dir_if_present(&displaced)
}

/// Writes `bytes` to `path` through a temporary file and a rename, so `path` holds the old or
/// the new contents, never a torn mix.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(dir, e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("motley-ckpt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// A write that fails leaves the old file whole: the bytes go to a temporary file first
    /// (here one that cannot be created, a folder being in its place) and only a finished one
    /// is renamed over the old.
    #[test]
    fn a_failed_atomic_write_keeps_the_old_file() {
        let dir = run_dir("atomic");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.toml");
        std::fs::write(&path, "old").unwrap();
        std::fs::create_dir(path.with_extension("tmp")).unwrap();
        assert!(write_atomic(&path, b"new").is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        std::fs::remove_dir(path.with_extension("tmp")).unwrap();
        write_atomic(&path, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn state(step: u64) -> TrainState {
        TrainState {
            step,
            rng: vec![u64::MAX, 7],
            loader: LoaderState { epoch: 2, position: 17 },
            config_hash: "00112233deadbeef".into(),
            config_toml: "device = \"cpu\"\n".into(),
            tokenizer: Some("{}".into()),
            flops: 1.5e12,
        }
    }

    fn save_step(dir: &Path, step: u64, w: &[f32], keep: usize) -> Result<PathBuf> {
        let m: Vec<f32> = w.iter().map(|x| x * 0.5).collect();
        save(dir, &state(step), &[("w".into(), vec![2, 3], w), ("b".into(), vec![3], &w[..3])], &[("m.w".into(), vec![2, 3], &m)], keep)
    }

    const W: [f32; 6] = [1.0, -2.5, f32::MIN_POSITIVE, 1e-30, 3.25, -0.0];

    #[test]
    fn round_trip_is_exact() {
        let dir = run_dir("round");
        let path = save_step(&dir, 42, &W, 3).unwrap();
        assert!(path.ends_with("checkpoints/step_000042"));
        let c = load(&path, "00112233deadbeef").unwrap();
        assert_eq!(c.state, state(42));
        let w = c.model.get("w", &[2, 3]).unwrap();
        assert_eq!(w.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), W.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        assert_eq!(c.model.get("b", &[3]).unwrap(), &W[..3]);
        assert_eq!(c.optimizer.get("m.w", &[2, 3]).unwrap()[1], -1.25);
        c.model.check(&[("w".into(), vec![2, 3]), ("b".into(), vec![3])]).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mismatches_name_the_tensor_or_hashes() {
        let dir = run_dir("mismatch");
        let path = save_step(&dir, 1, &W, 3).unwrap();
        let c = load(&path, "00112233deadbeef").unwrap();
        let e = c.model.get("w", &[3, 2]).unwrap_err().to_string();
        assert!(e.contains("`w`") && e.contains("[2, 3]") && e.contains("[3, 2]") && e.contains("model.safetensors"), "{e}");
        assert!(c.model.get("nope", &[1]).unwrap_err().to_string().contains("`nope`"));
        assert!(c.model.check(&[("w".into(), vec![2, 3])]).unwrap_err().to_string().contains("`b`"));
        let e = load(&path, "ffffffffffffffff").unwrap_err().to_string();
        assert!(e.contains("00112233deadbeef") && e.contains("ffffffffffffffff") && e.contains("new run"), "{e}");
        let bad = save(&dir, &state(2), &[("w".into(), vec![4], &W)], &[], 3).unwrap_err().to_string();
        assert!(bad.contains("`w`"), "{bad}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_files_give_clear_errors() {
        let dir = run_dir("corrupt");
        let path = save_step(&dir, 5, &W, 3).unwrap();
        let model = path.join(MODEL_FILE);
        let bytes = std::fs::read(&model).unwrap();
        std::fs::write(&model, &bytes[..bytes.len() - 4]).unwrap();
        let e = load(&path, "00112233deadbeef").unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");
        std::fs::write(path.join(STATE_FILE), "{\"step\": 1").unwrap();
        let e = load(&path, "00112233deadbeef").unwrap_err().to_string();
        assert!(e.contains("state.json"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failed_write_leaves_previous_checkpoint_intact() {
        let dir = run_dir("fail");
        let first = save_step(&dir, 10, &W, 1).unwrap();
        let fail = |file: &str| if file == OPTIMIZER_FILE { Err(Error::Invalid("disk full (injected)".into())) } else { Ok(()) };
        let other = [9.0f32; 6];
        let e = save_checked(&dir, &state(20), &[("w".into(), vec![2, 3], &other)], &[], 1, &fail).unwrap_err();
        assert!(e.to_string().contains("injected"));
        assert_eq!(latest(&dir).unwrap(), Some(first.clone()));
        assert_eq!(load(&first, "00112233deadbeef").unwrap().model.get("w", &[2, 3]).unwrap(), &W);
        let leftovers: Vec<_> = std::fs::read_dir(dir.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "temporary directory removed: {leftovers:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keeps_the_last_n_and_drops_abandoned_later_steps() {
        let dir = run_dir("keep");
        assert_eq!(latest(&dir).unwrap(), None);
        for step in [100, 200, 300, 400] {
            save_step(&dir, step, &W, 2).unwrap();
        }
        let steps = |d: &Path| list(d).unwrap().into_iter().map(|(s, _)| s).collect::<Vec<_>>();
        assert_eq!(steps(&dir), vec![300, 400]);
        // Resumed from 300 and saved 350: 400 belongs to the abandoned continuation.
        save_step(&dir, 350, &W, 2).unwrap();
        assert_eq!(steps(&dir), vec![300, 350]);
        assert!(latest(&dir).unwrap().unwrap().ends_with("step_000350"));
        save_step(&dir, 350, &W, 2).unwrap();
        assert_eq!(steps(&dir), vec![300, 350], "re-saving a step replaces it");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
