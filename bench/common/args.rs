//! The benches' command line: `--flag value` pairs, lengths with K/M suffixes. A bench built
//! with [`Args::from_env_known`] refuses flags it does not know (a typo would otherwise run the
//! defaults: on a lent GPU, minutes lost); `--bench`, which `cargo bench` passes to every bench
//! binary, and `--json` are always accepted.

use std::str::FromStr;

pub struct Args(Vec<String>);

/// Prints `message` and exits with status 2 (bad arguments, or a device this build or machine
/// does not have).
pub fn fail(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(2)
}

/// `4096`, `16K` (16 384) or `1M` (1 048 576): binary multiples, as sequence lengths are given.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let (digits, unit) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        _ => (t, 1),
    };
    digits.parse::<usize>().ok().filter(|&n| n > 0).map(|n| n * unit).ok_or_else(|| format!("{text:?} is not a positive size (e.g. 4096, 16K, 1M)"))
}

/// A size the way the tables print it: `16K`, `1M`, or the plain number when not a multiple.
pub fn show_size(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n.is_multiple_of(1 << 20) => format!("{}M", n >> 20),
        n if n >= 1 << 10 && n.is_multiple_of(1 << 10) => format!("{}K", n >> 10),
        n => n.to_string(),
    }
}

impl Args {
    pub fn from_env() -> Self {
        Args(std::env::args().skip(1).collect())
    }

    /// The process's arguments; exits 2 naming any `--flag` not in `known`.
    pub fn from_env_known(known: &[&str]) -> Self {
        let args = Self::from_env();
        if let Some(bad) = args.0.iter().find(|a| a.starts_with("--") && !["--bench", "--json"].contains(&a.as_str()) && !known.contains(&a.as_str())) {
            fail(&format!("unknown flag {bad}; this bench takes {} --json", known.join(" ")));
        }
        args
    }

    pub fn from(list: &[&str]) -> Self {
        Args(list.iter().map(|s| s.to_string()).collect())
    }

    pub fn has(&self, flag: &str) -> bool {
        self.0.iter().any(|a| a == flag)
    }

    /// The word after `flag`, if the flag is given.
    pub fn value(&self, flag: &str) -> Option<&str> {
        let i = self.0.iter().position(|a| a == flag)?;
        match self.0.get(i + 1) {
            Some(v) => Some(v),
            None => fail(&format!("{flag} needs a value")),
        }
    }

    /// `flag`'s value parsed, or `default` when absent; exits saying why when it does not parse.
    pub fn get<T: FromStr>(&self, flag: &str, default: T) -> T {
        match self.value(flag) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| fail(&format!("{flag} {v}: not a valid value"))),
        }
    }

    /// A size (`16K`) or `default`.
    pub fn size(&self, flag: &str, default: usize) -> usize {
        self.value(flag).map_or(default, |v| parse_size(v).unwrap_or_else(|e| fail(&format!("{flag}: {e}"))))
    }

    /// Appends `line` to the file of `--json FILE`, if given (JSON lines, for bench/gpu/table.py).
    pub fn append_json(&self, line: &serde_json::Value) {
        use std::io::Write;
        if let Some(path) = self.value("--json") {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap_or_else(|e| fail(&format!("--json {path}: {e}")));
            writeln!(f, "{line}").unwrap_or_else(|e| fail(&format!("--json {path}: {e}")));
        }
    }

    /// A comma-separated list of sizes (`16K,32K,1M`), or `default`.
    pub fn sizes(&self, flag: &str, default: &str) -> Vec<usize> {
        let list = self.value(flag).unwrap_or(default);
        list.split(',').map(|v| parse_size(v).unwrap_or_else(|e| fail(&format!("{flag}: {e}")))).collect()
    }
}
