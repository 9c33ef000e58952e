//! `sockscope`: see the crate documentation of the `agent` library.
use std::process::ExitCode;

fn main() -> ExitCode {
    agent::main()
}
