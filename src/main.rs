//! The `motley` binary: parse the command line, run it, report errors in one line.

fn main() {
    if let Err(e) = motley::cli::run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
