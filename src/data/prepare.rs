//! Turning text into the files a run reads: tokenizer.json + train.bin + val.bin.
//!
//! Tokenizing is deterministic, so its output is cached in a directory named by a hash of
//! everything it depends on (corpus bytes, tokenizer choice, vocab size, split); a second
//! run with the same data section starts immediately. The cache is filled through a
//! temporary directory and a rename, so an interrupted run never leaves a half cache.

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::corpus;
use super::shard::{self, Shard};
use super::tokenizer::{BpeTokenizer, Tokenizer};
use crate::config::{stable_hash, Config};
use crate::{Error, Result};

/// Bump when the cache's content or layout changes, so old caches are not reused.
/// 2: the key hashes every source of a combined corpus; per-source validation shards.
const CACHE_FORMAT: u32 = 2;

/// Tokenized data ready for loaders.
pub struct Prepared {
    pub tokenizer: Tokenizer,
    /// Directory holding `tokenizer.json` (BPE only), `train.bin` and `val.bin`.
    pub dir: PathBuf,
    pub train: PathBuf,
    pub val: PathBuf,
    pub train_tokens: usize,
    pub val_tokens: usize,
    /// Validation shard of each source of a combined corpus (`embedded:austen+kjv`), as
    /// (source name, `val-NAME.bin`), so a run can report a loss per source; empty for one source.
    pub val_sources: Vec<(String, PathBuf)>,
    /// True when an earlier run's files were reused.
    pub reused: bool,
    /// Seconds spent training the BPE (0 when reused or not BPE) and encoding.
    pub bpe_seconds: f64,
    pub encode_seconds: f64,
}

/// Prepares the data of `config.data` for a model with `config.model.vocab_size` in a
/// subdirectory of `cache_dir`, reusing it when it already exists.
pub fn prepare(config: &Config, cache_dir: &Path) -> Result<Prepared> {
    let data = &config.data;
    let vocab = config.model.vocab_size;
    let sources = corpus::load_sources(&data.corpus)?;
    let mut key = Vec::new();
    key.extend_from_slice(&CACHE_FORMAT.to_le_bytes());
    for s in &sources {
        key.extend_from_slice(s.name.as_bytes());
        key.extend_from_slice(&stable_hash(s.text.as_bytes()).to_le_bytes());
    }
    key.extend_from_slice(data.tokenizer.as_bytes());
    key.extend_from_slice(&vocab.to_le_bytes());
    key.extend_from_slice(&data.val_fraction.to_le_bytes());
    let source = match data.tokenizer.as_str() {
        "byte" => TokenizerSource::Byte,
        "bpe" => TokenizerSource::Train(vocab),
        path => {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            key.extend_from_slice(&stable_hash(&bytes).to_le_bytes());
            TokenizerSource::File(PathBuf::from(path))
        }
    };
    let name = data.corpus.strip_prefix("embedded:").unwrap_or("file");
    // Per-source validation shards only matter when there is more than one source.
    let names: Vec<String> = if sources.len() > 1 { sources.iter().map(|s| s.name.clone()).collect() } else { Vec::new() };
    let kind = match &source {
        TokenizerSource::Byte => "byte".to_string(),
        TokenizerSource::Train(v) => format!("bpe{v}"),
        TokenizerSource::File(_) => "tok".to_string(),
    };
    let dir = cache_dir.join(format!("{}-{kind}-{:016x}", sanitize(name), stable_hash(&key)));
    let prepared = if dir.join("val.bin").is_file() {
        reuse(&dir, &source, &names)?
    } else {
        let texts: Vec<&str> = sources.iter().map(|s| s.text.as_str()).collect();
        build(&texts, &names, &source, data.val_fraction, &dir)?
    };
    if prepared.tokenizer.vocab_size() > vocab {
        return Err(Error::config(
            "model.vocab_size",
            vocab,
            format!("at least the tokenizer's vocabulary size {} ({})", prepared.tokenizer.vocab_size(), data.tokenizer),
        ));
    }
    Ok(prepared)
}

/// `motley tokenize`: trains a BPE with `vocab_size` entries on the training part of
/// `inputs` (the last `val_fraction` of each file is held out) and writes
/// `out/tokenizer.json`, `out/train.bin`, `out/val.bin`.
pub fn tokenize_files(inputs: &[PathBuf], vocab_size: usize, val_fraction: f32, out: &Path) -> Result<Prepared> {
    if inputs.is_empty() {
        return Err(Error::Invalid("tokenize: give at least one --input text file".into()));
    }
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        return Err(Error::config("val_fraction", val_fraction, "a number in (0, 1)"));
    }
    let texts = inputs
        .iter()
        .map(|p| corpus::load(p.to_str().ok_or_else(|| Error::bad_file(p, "path is not UTF-8"))?))
        .collect::<Result<Vec<_>>>()?;
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    if out.exists() && out.join("val.bin").exists() {
        return Err(Error::Invalid(format!("{}: already holds tokenized data; choose an empty --out directory", out.display())));
    }
    build(&texts, &[], &TokenizerSource::Train(vocab_size), val_fraction, out)
}

enum TokenizerSource {
    Byte,
    Train(usize),
    File(PathBuf),
}

/// Path of the validation shard of source `name` inside a prepared directory.
fn source_val(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("val-{}.bin", sanitize(name)))
}

/// Tokenizes `texts` into `dir`. When `names` is non-empty (one per text), each text's
/// validation part is also written on its own as `val-NAME.bin`.
fn build(texts: &[&str], names: &[String], source: &TokenizerSource, val_fraction: f32, dir: &Path) -> Result<Prepared> {
    let splits: Vec<(&str, &str)> = texts.iter().map(|t| corpus::split(t, val_fraction)).collect();
    let started = Instant::now();
    let tokenizer = match source {
        TokenizerSource::Byte => Tokenizer::Byte(Default::default()),
        TokenizerSource::Train(vocab) => {
            let train_texts: Vec<&str> = splits.iter().map(|s| s.0).collect();
            Tokenizer::Bpe(BpeTokenizer::train(&train_texts, *vocab)?)
        }
        TokenizerSource::File(path) => Tokenizer::Bpe(BpeTokenizer::load(path)?),
    };
    let bpe_seconds = if matches!(source, TokenizerSource::Train(_)) { started.elapsed().as_secs_f64() } else { 0.0 };
    let started = Instant::now();
    let mut train = Vec::new();
    let mut val = Vec::new();
    let mut per_source = Vec::new();
    for (t, v) in &splits {
        train.extend(tokenizer.encode(t)?);
        let ids = tokenizer.encode(v)?;
        val.extend_from_slice(&ids);
        per_source.push(ids);
    }
    let encode_seconds = started.elapsed().as_secs_f64();

    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let file_name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("data");
    let tmp = parent.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let written = (|| {
        if let Tokenizer::Bpe(b) = &tokenizer {
            b.save(&tmp.join("tokenizer.json"))?;
        }
        shard::write(&tmp.join("train.bin"), &train)?;
        for (name, ids) in names.iter().zip(&per_source) {
            shard::write(&source_val(&tmp, name), ids)?;
        }
        // val.bin last: its presence marks a complete cache.
        shard::write(&tmp.join("val.bin"), &val)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        // `tokenize --out` into an existing (checked: not yet tokenized) directory.
        for f in ["tokenizer.json", "train.bin", "val.bin"] {
            let from = tmp.join(f);
            if from.exists() {
                std::fs::rename(&from, dir.join(f)).map_err(|e| Error::io(dir.join(f), e))?;
            }
        }
        let _ = std::fs::remove_dir_all(&tmp);
    } else {
        std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(Prepared {
        tokenizer,
        dir: dir.to_path_buf(),
        train: dir.join("train.bin"),
        val: dir.join("val.bin"),
        train_tokens: train.len(),
        val_tokens: val.len(),
        val_sources: names.iter().map(|n| (n.clone(), source_val(dir, n))).collect(),
        reused: false,
        bpe_seconds,
        encode_seconds,
    })
}

fn reuse(dir: &Path, source: &TokenizerSource, names: &[String]) -> Result<Prepared> {
    let tokenizer = match source {
        TokenizerSource::Byte => Tokenizer::Byte(Default::default()),
        _ => Tokenizer::Bpe(BpeTokenizer::load(&dir.join("tokenizer.json"))?),
    };
    let (train, val) = (dir.join("train.bin"), dir.join("val.bin"));
    let (train_tokens, val_tokens) = (Shard::open(&train)?.len(), Shard::open(&val)?.len());
    let val_sources: Vec<(String, PathBuf)> = names.iter().map(|n| (n.clone(), source_val(dir, n))).collect();
    for (_, path) in &val_sources {
        Shard::open(path)?;
    }
    Ok(Prepared { tokenizer, dir: dir.to_path_buf(), train, val, train_tokens, val_tokens, val_sources, reused: true, bpe_seconds: 0.0, encode_seconds: 0.0 })
}

fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("motley-prep-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn prepare_byte_corpus_caches_and_round_trips() {
        let dir = tmp_dir("byte");
        let text_path = dir.with_extension("txt");
        let text = "Call me Ishmael. Some years ago — never mind how long precisely.\n".repeat(40);
        std::fs::write(&text_path, &text).unwrap();
        let config = Config::default_with(&[
            "data.tokenizer=byte".into(),
            format!("data.corpus=\"{}\"", text_path.display()),
            "data.val_fraction=0.25".into(),
        ])
        .unwrap();
        let first = prepare(&config, &dir).unwrap();
        assert!(!first.reused);
        assert_eq!(first.train_tokens + first.val_tokens, text.len());
        let second = prepare(&config, &dir).unwrap();
        assert!(second.reused);
        assert_eq!(second.dir, first.dir);
        let train = Shard::open(&second.train).unwrap().to_vec();
        let val = Shard::open(&second.val).unwrap().to_vec();
        let decoded = second.tokenizer.decode(&train).unwrap() + &second.tokenizer.decode(&val).unwrap();
        assert_eq!(decoded, text);
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_file(&text_path).unwrap();
    }

    #[test]
    fn combined_corpus_has_a_validation_shard_per_source() {
        let dir = tmp_dir("combined");
        let config = Config::default_with(&["data.tokenizer=byte".into(), "data.corpus=\"embedded:austen+kjv\"".into(), "data.val_fraction=0.01".into()]).unwrap();
        let p = prepare(&config, &dir).unwrap();
        let names: Vec<&str> = p.val_sources.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["austen", "kjv"]);
        let parts: Vec<Vec<u32>> = p.val_sources.iter().map(|(_, path)| Shard::open(path).unwrap().to_vec()).collect();
        assert_eq!([parts[0].clone(), parts[1].clone()].concat(), Shard::open(&p.val).unwrap().to_vec());
        assert!(p.tokenizer.decode(&parts[1]).unwrap().contains("Revelation") || p.tokenizer.decode(&parts[1]).unwrap().contains("Jesus"));
        assert!(!p.tokenizer.decode(&parts[0]).unwrap().contains("Jesus"));
        let again = prepare(&config, &dir).unwrap();
        assert!(again.reused);
        assert_eq!(again.val_sources, p.val_sources);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tokenize_files_writes_bpe_and_shards() {
        let out = tmp_dir("tok");
        let input = out.with_extension("txt");
        let text = "the quick brown fox jumps over the lazy dog\nthe dog sleeps\n".repeat(200);
        std::fs::write(&input, &text).unwrap();
        let p = tokenize_files(std::slice::from_ref(&input), 300, 0.1, &out).unwrap();
        for f in ["tokenizer.json", "train.bin", "val.bin"] {
            assert!(out.join(f).is_file(), "{f} missing");
        }
        let t = Tokenizer::load(out.join("tokenizer.json").to_str().unwrap()).unwrap();
        let train = Shard::open(&p.train).unwrap().to_vec();
        let val = Shard::open(&p.val).unwrap().to_vec();
        assert!(train.len() + val.len() < text.len() / 2, "BPE should compress repetitive text");
        assert_eq!(t.decode(&train).unwrap() + &t.decode(&val).unwrap(), text);
        let again = tokenize_files(std::slice::from_ref(&input), 300, 0.1, &out).err().unwrap().to_string();
        assert!(again.contains("already holds"), "{again}");
        std::fs::remove_dir_all(&out).unwrap();
        std::fs::remove_file(&input).unwrap();
    }

    #[test]
    fn tokenizer_larger_than_model_vocab_is_rejected() {
        let dir = tmp_dir("vocab");
        let out = dir.join("tok");
        let input = dir.with_extension("txt");
        std::fs::write(&input, "abc abd abe abf abg abh\n".repeat(300)).unwrap();
        tokenize_files(std::slice::from_ref(&input), 280, 0.1, &out).unwrap();
        let config = Config::default_with(&[
            format!("data.tokenizer=\"{}\"", out.join("tokenizer.json").display()),
            format!("data.corpus=\"{}\"", input.display()),
            "model.vocab_size=257".into(),
        ])
        .unwrap();
        let e = prepare(&config, &dir.join("cache")).err().unwrap().to_string();
        assert!(e.contains("model.vocab_size"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_file(&input).unwrap();
    }
}
