//! `metrics.jsonl`: one JSON object per line, `"kind": "train"` or `"kind": "eval"`.
//!
//! JSON lines survive a crash (every record is one complete write) and are easy to read from
//! any tool. Extra fields (routing shares, memory use, ...) ride along without schema changes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// One training step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    pub step: u64,
    /// Total loss that was differentiated (`lm_loss + aux_loss`).
    pub loss: f32,
    pub lm_loss: f32,
    pub aux_loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub tokens_per_s: f32,
    /// Parameters used per token (attention + the experts the router picked, on average).
    pub activated_params: f64,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One evaluation on the validation split.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub step: u64,
    pub val_loss: f32,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Train(TrainRecord),
    Eval(EvalRecord),
}

impl Record {
    pub fn step(&self) -> u64 {
        match self {
            Record::Train(r) => r.step,
            Record::Eval(r) => r.step,
        }
    }
}

/// Appends records to a metrics file.
pub struct MetricsWriter {
    path: PathBuf,
    file: File,
}

impl MetricsWriter {
    /// Starts a new file at `path` (replacing any old one).
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    /// Continues `path` after a resume from `step`: records of later steps (written by the
    /// run before it stopped, after its last checkpoint) are dropped, since they will be redone.
    pub fn resume(path: &Path, step: u64) -> Result<Self> {
        let kept: Vec<Record> = if path.exists() { read(path)?.into_iter().filter(|r| r.step() <= step).collect() } else { Vec::new() };
        let tmp = path.with_extension("jsonl.tmp");
        let mut writer = Self::create(&tmp)?;
        for r in &kept {
            writer.write(r)?;
        }
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        let file = OpenOptions::new().append(true).open(path).map_err(|e| Error::io(path, e))?;
        Ok(Self { path: path.to_path_buf(), file })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn train(&mut self, record: &TrainRecord) -> Result<()> {
        self.line("train", serde_json::to_value(record))
    }

    pub fn eval(&mut self, record: &EvalRecord) -> Result<()> {
        self.line("eval", serde_json::to_value(record))
    }

    pub fn write(&mut self, record: &Record) -> Result<()> {
        match record {
            Record::Train(r) => self.train(r),
            Record::Eval(r) => self.eval(r),
        }
    }

    fn line(&mut self, kind: &str, value: serde_json::Result<Value>) -> Result<()> {
        let mut object = match value {
            Ok(Value::Object(o)) => o,
            other => return Err(Error::Invalid(format!("{}: cannot encode a {kind} record: {other:?}", self.path.display()))),
        };
        object.insert("kind".into(), Value::String(kind.into()));
        // Non-finite floats have no JSON form; serde_json writes them as null, which `read` rejects,
        // so a NaN loss is visible as an unreadable record rather than a silently plotted 0.
        let mut line = serde_json::to_string(&object).map_err(|e| Error::Invalid(format!("{}: {e}", self.path.display())))?;
        line.push('\n');
        self.file.write_all(line.as_bytes()).map_err(|e| Error::io(&self.path, e))
    }
}

/// Every record in a metrics file, in file order; errors name the file and line.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |why: String| Error::bad_file(path, format!("line {}: {why}", i + 1));
        let mut object = match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(o)) => o,
            Ok(_) => return Err(bad("not a JSON object".into())),
            Err(e) => return Err(bad(e.to_string())),
        };
        let kind = object.remove("kind");
        let record = match kind.as_ref().and_then(Value::as_str) {
            Some("train") => serde_json::from_value(Value::Object(object)).map(Record::Train),
            Some("eval") => serde_json::from_value(Value::Object(object)).map(Record::Eval),
            _ => return Err(bad(format!("`kind` is {kind:?}, expected \"train\" or \"eval\""))),
        };
        out.push(record.map_err(|e| bad(e.to_string()))?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("motley-metrics-{}-{name}.jsonl", std::process::id()))
    }

    fn train(step: u64, loss: f32) -> TrainRecord {
        let mut extra = Map::new();
        extra.insert("expert_share".into(), serde_json::json!([0.5, 0.25, 0.25]));
        TrainRecord { step, loss, lm_loss: loss - 0.1, aux_loss: 0.1, lr: 1e-3, grad_norm: 0.7, tokens_per_s: 1234.5, activated_params: 1.5e6, extra }
    }

    #[test]
    fn write_read_round_trip_with_extra_fields() {
        let path = tmp("rt");
        let mut w = MetricsWriter::create(&path).unwrap();
        w.train(&train(1, 5.0)).unwrap();
        w.eval(&EvalRecord { step: 1, val_loss: 5.5, extra: Map::new() }).unwrap();
        w.train(&train(2, 4.0)).unwrap();
        let records = read(&path).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[0], Record::Train(train(1, 5.0)));
        assert!(matches!(&records[1], Record::Eval(e) if e.val_loss == 5.5));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().all(|l| l.contains("\"kind\"")));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn resume_drops_records_after_the_checkpoint() {
        let path = tmp("resume");
        let mut w = MetricsWriter::create(&path).unwrap();
        for s in 1..=5 {
            w.train(&train(s, 6.0 - s as f32)).unwrap();
        }
        let mut w = MetricsWriter::resume(&path, 3).unwrap();
        w.train(&train(4, 9.0)).unwrap();
        let steps: Vec<u64> = read(&path).unwrap().iter().map(Record::step).collect();
        assert_eq!(steps, vec![1, 2, 3, 4]);
        assert!(matches!(&read(&path).unwrap()[3], Record::Train(r) if r.loss == 9.0));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let path = tmp("bad");
        let mut w = MetricsWriter::create(&path).unwrap();
        w.train(&train(1, f32::NAN)).unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains(path.to_str().unwrap()) && e.contains("line 1"), "{e}");
        std::fs::write(&path, "{\"kind\":\"train\",\"step\":1}\n").unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("missing field"));
        std::fs::write(&path, "{\"step\":1}\n").unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("kind"));
        std::fs::remove_file(&path).unwrap();
    }
}
