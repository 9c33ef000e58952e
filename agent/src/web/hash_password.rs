//! `sockscope hash-password`: the bcrypt hash of a password for `basic_auth_users`.

use std::{io::BufRead as _, process::ExitCode};

use crate::cli::HashPasswordArgs;

/// Reads one line (the password, without its line end) from standard input and prints its
/// hash; exit 1 on an empty password or a read error.
pub fn main(args: &HashPasswordArgs) -> ExitCode {
    let mut line = String::new();
    if let Err(e) = std::io::stdin().lock().read_line(&mut line) {
        eprintln!("sockscope: reading the password from standard input: {e}");
        return ExitCode::FAILURE;
    }
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        eprintln!(
            "sockscope: no password on standard input; usage: \
             printf '%s\\n' \"$PASSWORD\" | sockscope hash-password"
        );
        return ExitCode::FAILURE;
    }
    match bcrypt::hash(password, args.cost) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sockscope: hashing the password: {e}");
            ExitCode::FAILURE
        }
    }
}
