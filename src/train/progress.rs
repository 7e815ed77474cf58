//! Progress reporting: a live bar (step, loss, tok/s, ETA) when stderr is a terminal, and
//! plain log lines every N steps when it is not, so logs redirected to files stay readable.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    log_every: u64,
    first_step: u64,
    total_steps: u64,
    started: Instant,
}

impl Progress {
    /// Reporting for a run that goes from `first_step` (steps already done, e.g. after a
    /// resume) to `total_steps`; without a terminal, one line every `log_every` steps.
    pub fn new(first_step: u64, total_steps: u64, log_every: u64) -> Self {
        Self::with_terminal(first_step, total_steps, log_every, std::io::stderr().is_terminal())
    }

    fn with_terminal(first_step: u64, total_steps: u64, log_every: u64, terminal: bool) -> Self {
        let bar = terminal.then(|| {
            let bar = ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr()).with_position(first_step);
            let style = ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg} eta {eta}")
                .expect("the template is valid")
                .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        Self { bar, log_every: log_every.max(1), first_step, total_steps, started: Instant::now() }
    }

    /// Reports that `step` steps are done, with the latest loss and throughput.
    pub fn step(&self, step: u64, loss: f32, tokens_per_s: f32) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(format!("loss {loss:.4} | {tokens_per_s:.0} tok/s"));
            }
            None => {
                if let Some(line) = self.log_line(step, loss, tokens_per_s, self.started.elapsed()) {
                    eprintln!("{line}");
                }
            }
        }
    }

    /// Prints a line (evaluation result, checkpoint saved, ...) without breaking the bar.
    pub fn note(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Leaves the final bar state on screen.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }

    /// The plain line for `step`, if one is due (every `log_every` steps, the first and the last).
    fn log_line(&self, step: u64, loss: f32, tokens_per_s: f32, elapsed: Duration) -> Option<String> {
        let due = step.is_multiple_of(self.log_every) || step == self.first_step + 1 || step == self.total_steps;
        if !due {
            return None;
        }
        let done = step.saturating_sub(self.first_step).max(1);
        let left = self.total_steps.saturating_sub(step);
        let eta = elapsed.as_secs_f64() / done as f64 * left as f64;
        let width = self.total_steps.to_string().len();
        Some(format!("step {step:>width$}/{} | loss {loss:.4} | {tokens_per_s:.0} tok/s | eta {}", self.total_steps, clock(eta)))
    }
}

/// Seconds as `h:mm:ss` or `m:ss`.
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_every_n_steps_with_eta() {
        let p = Progress::with_terminal(0, 100, 10, false);
        assert!(p.log_line(1, 5.0, 100.0, Duration::from_secs(1)).is_some(), "first step logged");
        assert!(p.log_line(7, 5.0, 100.0, Duration::from_secs(7)).is_none());
        let line = p.log_line(20, 4.25, 1234.4, Duration::from_secs(20)).unwrap();
        assert_eq!(line, "step  20/100 | loss 4.2500 | 1234 tok/s | eta 1:20");
        assert!(p.log_line(100, 3.0, 1.0, Duration::from_secs(99)).unwrap().contains("eta 0:00"));
    }

    #[test]
    fn eta_counts_only_steps_done_in_this_process() {
        let p = Progress::with_terminal(50, 100, 10, false);
        let line = p.log_line(60, 3.0, 1.0, Duration::from_secs(10)).unwrap();
        assert!(line.ends_with("eta 0:40"), "{line}");
        assert_eq!(clock(3725.0), "1:02:05");
    }
}
