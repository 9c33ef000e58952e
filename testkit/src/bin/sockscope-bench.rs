//! Benchmark driver for sockscope (placeholder until it is written).

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("sockscope-bench: not written yet");
    ExitCode::FAILURE
}
