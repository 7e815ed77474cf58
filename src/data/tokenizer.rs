//! Tokenizers: raw bytes (vocab 256, nothing to train) or a byte-level BPE trained with
//! HF `tokenizers` and stored as the standard `tokenizer.json`, so other tools can read it.
//!
//! Both are lossless: `decode(encode(text)) == text` for any UTF-8 text, because the BPE
//! works on bytes and adds no prefix space.

use std::collections::HashSet;
use std::path::Path;

use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::models::TrainerWrapper;

use crate::{Error, Result};

/// Texts are tokenized in chunks of about this many bytes (cut at line ends) so that
/// encoding can run on several threads and BPE training sees bounded sequences.
const CHUNK_BYTES: usize = 64 * 1024;

/// One token per byte. Useful as a baseline and when no training time is wanted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ByteTokenizer;

/// A byte-level BPE (GPT-2 style pre-tokenization, no prefix space).
#[derive(Clone)]
pub struct BpeTokenizer {
    /// Boxed: the HF tokenizer is large and `Tokenizer` is passed around by value.
    inner: Box<tokenizers::Tokenizer>,
}

/// The tokenizer a run uses: the training loop only needs `encode`, `decode`, `vocab_size`.
#[derive(Clone)]
pub enum Tokenizer {
    Byte(ByteTokenizer),
    Bpe(BpeTokenizer),
}

impl ByteTokenizer {
    pub const VOCAB_SIZE: usize = 256;
}

impl BpeTokenizer {
    /// Trains a byte-level BPE with `vocab_size` entries (at least 257: the 256 byte symbols
    /// plus one merge) on `texts`.
    pub fn train(texts: &[&str], vocab_size: usize) -> Result<Self> {
        if vocab_size <= ByteTokenizer::VOCAB_SIZE {
            return Err(Error::config(
                "vocab_size",
                vocab_size,
                "more than 256 for a BPE (256 byte symbols plus merges); use the byte tokenizer for 256",
            ));
        }
        let byte_level = ByteLevel::new(false, false, true);
        let mut inner = tokenizers::Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(byte_level)).with_decoder(Some(byte_level));
        let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
        let trainer = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .initial_alphabet(alphabet)
            .limit_alphabet(ByteTokenizer::VOCAB_SIZE)
            .build();
        let mut trainer = TrainerWrapper::from(trainer);
        let chunks = texts.iter().flat_map(|t| chunks(t));
        inner
            .train(&mut trainer, chunks)
            .map_err(|e| Error::Invalid(format!("BPE training failed: {e}")))?;
        Ok(Self { inner: Box::new(inner) })
    }

    pub fn load(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::bad_file(path, format!("not a readable tokenizer.json: {e}")))?;
        Ok(Self { inner: Box::new(inner) })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        self.inner
            .save(path, false)
            .map_err(|e| Error::bad_file(path, format!("cannot write tokenizer: {e}")))
    }
}

impl Tokenizer {
    /// `"byte"` gives the byte tokenizer; anything else is read as a path to a tokenizer.json.
    pub fn load(spec: &str) -> Result<Self> {
        if spec == "byte" {
            Ok(Self::Byte(ByteTokenizer))
        } else {
            BpeTokenizer::load(Path::new(spec)).map(Self::Bpe)
        }
    }

    /// The tokenizer as text to embed in a checkpoint: `None` for bytes, else tokenizer.json.
    pub fn to_json(&self) -> Result<Option<String>> {
        match self {
            Self::Byte(_) => Ok(None),
            Self::Bpe(b) => b.inner.to_string(false).map(Some).map_err(|e| Error::Invalid(format!("cannot serialise tokenizer: {e}"))),
        }
    }

    /// The inverse of [`Tokenizer::to_json`]; `origin` names where the text came from.
    pub fn from_json(json: Option<&str>, origin: &Path) -> Result<Self> {
        match json {
            None => Ok(Self::Byte(ByteTokenizer)),
            Some(text) => {
                let inner: tokenizers::Tokenizer = text.parse().map_err(|e| Error::bad_file(origin, format!("embedded tokenizer is unreadable: {e}")))?;
                Ok(Self::Bpe(BpeTokenizer { inner: Box::new(inner) }))
            }
        }
    }

    /// Number of distinct token ids; every id `encode` returns is below this.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Byte(_) => ByteTokenizer::VOCAB_SIZE,
            Self::Bpe(b) => b.inner.get_vocab_size(true),
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Self::Byte(_) => Ok(text.bytes().map(u32::from).collect()),
            Self::Bpe(b) => {
                let encodings = b
                    .inner
                    .encode_batch_fast(chunks(text).collect::<Vec<_>>(), false)
                    .map_err(|e| Error::Invalid(format!("BPE encoding failed: {e}")))?;
                Ok(encodings.iter().flat_map(|e| e.get_ids().iter().copied()).collect())
            }
        }
    }

    /// Text for `ids`; byte sequences that are not valid UTF-8 (e.g. a cut multi-byte
    /// character in a sample) come out as U+FFFD rather than failing.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Self::Byte(_) => {
                let bytes = ids
                    .iter()
                    .map(|&id| u8::try_from(id).map_err(|_| Error::Invalid(format!("token id {id} is not a byte (vocab 256)"))))
                    .collect::<Result<Vec<u8>>>()?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Self::Bpe(b) => {
                b.inner.decode(ids, false).map_err(|e| Error::Invalid(format!("BPE decoding failed: {e}")))
            }
        }
    }
}

/// Splits `text` into pieces of about `CHUNK_BYTES`, each ending at a line end (or the text end).
fn chunks(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut cut = rest.len().min(CHUNK_BYTES);
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        let cut = match rest[cut..].find('\n') {
            Some(i) if cut < rest.len() => cut + i + 1,
            _ => rest.len(),
        };
        let (head, tail) = rest.split_at(cut);
        rest = tail;
        Some(head)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "It is a truth universally acknowledged, that a single man in possession \
        of a good fortune, must be in want of a wife.\nHowever little known the feelings or views \
        of such a man may be on his first entering a neighbourhood — café, naïve.\n\n";

    #[test]
    fn chunks_cover_the_text_and_end_at_lines() {
        let text = "ab\n".repeat(50_000);
        let pieces: Vec<&str> = chunks(&text).collect();
        assert!(pieces.len() > 1);
        assert_eq!(pieces.concat(), text);
        assert!(pieces.iter().all(|p| p.ends_with('\n')));
    }

    #[test]
    fn byte_round_trip() {
        let t = Tokenizer::Byte(ByteTokenizer);
        let ids = t.encode(TEXT).unwrap();
        assert_eq!(ids.len(), TEXT.len());
        assert_eq!(t.decode(&ids).unwrap(), TEXT);
        assert!(t.decode(&[300]).is_err());
    }

    #[test]
    fn bpe_trains_saves_loads_and_round_trips() {
        let corpus = TEXT.repeat(20);
        let bpe = BpeTokenizer::train(&[&corpus], 300).unwrap();
        let dir = std::env::temp_dir().join(format!("motley-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        bpe.save(&path).unwrap();
        let t = Tokenizer::load(path.to_str().unwrap()).unwrap();
        assert!(t.vocab_size() <= 300 && t.vocab_size() > 256, "vocab {}", t.vocab_size());
        let ids = t.encode(TEXT).unwrap();
        assert!(ids.len() < TEXT.len(), "merges should shorten the text");
        assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
        assert_eq!(t.decode(&ids).unwrap(), TEXT);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_tokenizer_file_names_the_file() {
        let path = std::env::temp_dir().join(format!("motley-badtok-{}.json", std::process::id()));
        std::fs::write(&path, "{not json").unwrap();
        let err = Tokenizer::load(path.to_str().unwrap()).err().unwrap().to_string();
        assert!(err.contains(path.to_str().unwrap()), "{err}");
        std::fs::remove_file(&path).unwrap();
        assert!(BpeTokenizer::train(&["x"], 256).is_err());
    }
}
