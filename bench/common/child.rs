//! One case of a bench in a child process (the bench runs itself again with other arguments), so
//! that an out-of-memory, a crash or a time limit ends that case only, and per-process peaks
//! (RSS, the device pool) start from zero.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Done,
    OutOfMemory,
    /// Killed at the time limit.
    TimedOut,
    /// Exited with an error: the last line it printed on stderr.
    Failed(String),
}

impl Outcome {
    /// For tables: `ok`, `OOM`, `timeout`, `failed: …`.
    pub fn label(&self) -> String {
        match self {
            Outcome::Done => "ok".into(),
            Outcome::OutOfMemory => "OOM".into(),
            Outcome::TimedOut => "timeout".into(),
            Outcome::Failed(why) => format!("failed: {why}"),
        }
    }
}

/// What a child did: how it ended and every stdout line it printed (also those before a kill).
pub struct ChildRun {
    pub outcome: Outcome,
    pub stdout: Vec<String>,
    pub seconds: f64,
}

/// Messages that mean the child ran out of memory: the CUDA driver's error name (device) and
/// Rust's allocation-failure abort (host).
const OOM_MARKS: [&str; 3] = ["OUT_OF_MEMORY", "out of memory", "memory allocation of"];

/// The last line of `stderr` that says something: not blank, not the panic's backtrace hint.
fn last_message(stderr: &str) -> Option<String> {
    stderr.lines().map(str::trim).rev().find(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE")).map(String::from)
}

/// Runs this executable with `args`, killing it after `limit`. Its stderr goes to ours as well
/// (progress stays visible in logs) and is scanned for out-of-memory messages.
pub fn run_self(args: &[String], limit: Duration) -> ChildRun {
    let exe = std::env::current_exe().expect("current_exe");
    run(Command::new(exe).args(args), limit)
}

pub fn run(command: &mut Command, limit: Duration) -> ChildRun {
    let started = Instant::now();
    let mut child = match command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => return ChildRun { outcome: Outcome::Failed(format!("cannot start: {e}")), stdout: Vec::new(), seconds: 0.0 },
    };
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let out_reader = {
        let (pipe, lines) = (child.stdout.take().expect("piped stdout"), stdout.clone());
        std::thread::spawn(move || BufReader::new(pipe).lines().map_while(Result::ok).for_each(|l| lines.lock().unwrap().push(l)))
    };
    let err_reader = {
        let mut pipe = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                eprint!("{}", String::from_utf8_lossy(&chunk[..n]));
                text.extend_from_slice(&chunk[..n]);
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() >= limit => {
                let _ = child.kill();
                let _ = child.wait();
                timed_out = true;
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("waiting for the child: {e}"),
        }
    };
    let _ = out_reader.join();
    let stderr = err_reader.join().unwrap_or_default();
    let stdout = std::mem::take(&mut *stdout.lock().unwrap());
    let outcome = match status {
        _ if timed_out => Outcome::TimedOut,
        Some(s) if s.success() => Outcome::Done,
        _ if OOM_MARKS.iter().any(|m| stderr.contains(m)) => Outcome::OutOfMemory,
        Some(s) => Outcome::Failed(last_message(&stderr).unwrap_or_else(|| s.to_string())),
        None => unreachable!("no status only after a kill"),
    };
    ChildRun { outcome, stdout, seconds: started.elapsed().as_secs_f64() }
}
