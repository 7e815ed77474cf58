//! The corpora compiled into the binary (gzip-compressed, public domain) and the
//! train/validation split. Embedding them means `motley train` needs no files at all.

use std::io::Read;
use std::path::Path;

use crate::{Error, Result};

/// Jane Austen's six novels (4.0 MB of text).
const AUSTEN_GZ: &[u8] = include_bytes!("../../data/austen.txt.gz");
/// The King James Bible with chapter headings and verse numbers (4.3 MB of text).
const KJV_GZ: &[u8] = include_bytes!("../../data/kjv.txt.gz");

/// Names accepted after `embedded:` in `data.corpus`.
pub const EMBEDDED: [&str; 2] = ["austen", "kjv"];

/// Checks that `name` is an embedded corpus, without decompressing it.
pub fn check_embedded(name: &str) -> Result<()> {
    if EMBEDDED.contains(&name) {
        return Ok(());
    }
    Err(Error::config(
        "data.corpus",
        format!("\"embedded:{name}\""),
        format!("an embedded corpus ({}) or a path to a text file", EMBEDDED.map(|n| format!("embedded:{n}")).join(", ")),
    ))
}

/// The text of the embedded corpus `name` (`"austen"` or `"kjv"`).
pub fn embedded(name: &str) -> Result<String> {
    check_embedded(name)?;
    let gz = if name == "austen" { AUSTEN_GZ } else { KJV_GZ };
    let mut text = String::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_string(&mut text)
        .map_err(|e| Error::Invalid(format!("embedded corpus `{name}` is damaged: {e}")))?;
    Ok(text)
}

/// The embedded corpus names of a `data.corpus` spec (`embedded:austen+kjv` → austen, kjv);
/// `None` for a file path. Checks every name, and that none repeats (a repeated source would
/// leak the same text into both training and validation weights twice).
pub fn embedded_names(spec: &str) -> Result<Option<Vec<&str>>> {
    let Some(list) = spec.strip_prefix("embedded:") else { return Ok(None) };
    let names: Vec<&str> = list.split('+').collect();
    for (i, name) in names.iter().enumerate() {
        check_embedded(name)?;
        if names[..i].contains(name) {
            return Err(Error::config("data.corpus", format!("\"{spec}\""), format!("each corpus at most once (`{name}` is named twice)")));
        }
    }
    Ok(Some(names))
}

/// Checks a `data.corpus` spec without reading any text.
pub fn check_spec(spec: &str) -> Result<()> {
    if spec.is_empty() {
        return Err(Error::config("data.corpus", "\"\"", "\"embedded:austen\", \"embedded:kjv\", \"embedded:austen+kjv\" or a path to a text file"));
    }
    embedded_names(spec).map(|_| ())
}

/// One named text of a corpus spec; validation is split from each source separately so that
/// every source is represented in the held-out data and can be evaluated on its own.
pub struct Source {
    /// The embedded name, or `"file"` for a path.
    pub name: String,
    pub text: String,
}

/// The sources named by `data.corpus`: one per embedded name, or the one file.
pub fn load_sources(spec: &str) -> Result<Vec<Source>> {
    match embedded_names(spec)? {
        Some(names) => names.into_iter().map(|n| Ok(Source { name: n.to_string(), text: embedded(n)? })).collect(),
        None => Ok(vec![Source { name: "file".into(), text: load(spec)? }]),
    }
}

/// The text named by `data.corpus`: `embedded:NAME` or a path to a UTF-8 file.
pub fn load(spec: &str) -> Result<String> {
    match spec.strip_prefix("embedded:") {
        Some(name) => embedded(name),
        None => {
            let path = Path::new(spec);
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            String::from_utf8(bytes).map_err(|e| {
                Error::bad_file(path, format!("not UTF-8 text (invalid byte at offset {})", e.utf8_error().valid_up_to()))
            })
        }
    }
}

/// Splits `text` into (train, validation): validation is the last `val_fraction` of the
/// bytes, moved forward to the next line start so no line is cut in two.
pub fn split(text: &str, val_fraction: f32) -> (&str, &str) {
    let mut cut = ((text.len() as f64) * (1.0 - f64::from(val_fraction.clamp(0.0, 1.0)))) as usize;
    cut = cut.min(text.len());
    while !text.is_char_boundary(cut) {
        cut += 1;
    }
    if let Some(i) = text[cut..].find('\n') {
        cut += i + 1;
    }
    text.split_at(cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_corpora_decompress() {
        let austen = embedded("austen").unwrap();
        assert_eq!(austen.len(), 4_025_029);
        assert!(austen.contains("Emma Woodhouse"));
        assert!(embedded("kjv").unwrap().contains("In the beginning God created"));
        let e = load("embedded:dickens").unwrap_err().to_string();
        assert!(e.contains("embedded:dickens") && e.contains("embedded:austen"), "{e}");
    }

    #[test]
    fn combined_spec_names_each_source_once() {
        assert_eq!(embedded_names("embedded:austen+kjv").unwrap(), Some(vec!["austen", "kjv"]));
        assert_eq!(embedded_names("some/file.txt").unwrap(), None);
        let e = check_spec("embedded:kjv+bible").unwrap_err().to_string();
        assert!(e.contains("data.corpus") && e.contains("embedded:bible"), "{e}");
        assert!(check_spec("embedded:kjv+kjv").unwrap_err().to_string().contains("twice"));
        assert!(check_spec("").is_err());
        let s = load_sources("embedded:austen+kjv").unwrap();
        assert_eq!(s.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["austen", "kjv"]);
        assert!(s[1].text.contains("In the beginning God created"));
    }

    #[test]
    fn split_keeps_lines_whole_and_covers_text() {
        let text = "first line\nsecond line é\nthird line\nfourth\n";
        let (train, val) = split(text, 0.5);
        assert_eq!(format!("{train}{val}"), text);
        assert!(train.ends_with('\n'));
        assert!(!val.is_empty() && val.len() < text.len() / 2 + 12);
    }

    #[test]
    fn file_errors_name_the_file() {
        let path = std::env::temp_dir().join(format!("motley-latin1-{}.txt", std::process::id()));
        std::fs::write(&path, b"caf\xe9").unwrap();
        let e = load(path.to_str().unwrap()).unwrap_err().to_string();
        assert!(e.contains(path.to_str().unwrap()) && e.contains("UTF-8"), "{e}");
        std::fs::remove_file(&path).unwrap();
        assert!(load("/nonexistent/corpus.txt").unwrap_err().to_string().contains("/nonexistent/corpus.txt"));
    }
}
