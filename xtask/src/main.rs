//! Developer commands for sockscope: `cargo xtask run` and `cargo xtask test` are all a fresh
//! machine needs, because every command first installs what is missing (see `setup`).

mod matrix;
mod setup;
mod support;

use std::ffi::{OsStr, OsString};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

/// What `cargo xtask run` passes to the agent when given no arguments.
const DEFAULT_AGENT_ARGS: &[&str] = &["run"];

/// Variables the outer `cargo run` sets for us; a child cargo that inherits them is pinned to
/// the outer toolchain and its rustc, so `cargo +nightly` would silently use stable.
const INHERITED_TOOLCHAIN_VARS: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_TOOLCHAIN_SOURCE",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO",
];

#[derive(Parser)]
#[command(name = "xtask", about = "sockscope developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: Debian packages, Rust nightly with rust-src, bpf-linker
    Setup,
    /// Build the agent (release unless --debug)
    Build {
        #[arg(long)]
        debug: bool,
    },
    /// Build the agent in release and run it with ARGS (default: `run`)
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Lint, then run the workspace's tests
    Test(TestArgs),
    /// rustfmt check, clippy on the host crates, clippy on agent-ebpf for the BPF target
    Lint,
    /// Run every fuzz target (fuzz/, cargo-fuzz on nightly) for a bounded time
    Fuzz(FuzzArgs),
    /// Build the release binaries and run the benchmarks with ARGS
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

#[derive(Args)]
struct TestArgs {
    /// Skip the lint phase
    #[arg(long)]
    no_lint: bool,
    /// Kernels to test on, comma-separated: `host` (this machine's kernel, `cargo test`),
    /// `6.1` and `6.12` (Debian's kernels in qemu guests, see docs/KERNEL-MATRIX.md), `all`
    #[arg(long, default_value = "all", value_delimiter = ',')]
    kernels: Vec<String>,
    /// Extra arguments for `cargo test` (after `--`)
    #[arg(last = true)]
    extra: Vec<OsString>,
}

#[derive(Args)]
struct FuzzArgs {
    /// Seconds of fuzzing per target (after the build)
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Targets to run (all of `cargo fuzz list` when none are given)
    targets: Vec<String>,
}

/// Seconds per fuzz target in `cargo xtask test`.
const TEST_FUZZ_SECONDS: u64 = 20;

fn main() -> ExitCode {
    // Our own report, not anyhow's: with RUST_BACKTRACE set, that one ends in a backtrace of
    // xtask, which says nothing about what failed.
    match dispatch(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Cmd) -> Result<()> {
    if !matches!(command, Cmd::Setup) {
        setup::ensure_all()?;
    }
    match command {
        Cmd::Setup => setup::ensure_all(),
        Cmd::Build { debug } => build_agent(!debug),
        Cmd::Run { args } => run_agent(args),
        Cmd::Test(args) => test(args),
        Cmd::Lint => lint(),
        Cmd::Fuzz(args) => fuzz(args.seconds, &args.targets),
        Cmd::Bench { args } => bench(args),
    }
}

fn build_agent(release: bool) -> Result<()> {
    let mut build = cargo("build -p agent");
    if release {
        build.arg("--release");
    }
    run_checked(&mut build)
}

fn run_agent(mut args: Vec<OsString>) -> Result<()> {
    build_agent(true)?;
    if args.is_empty() {
        args = DEFAULT_AGENT_ARGS.iter().map(OsString::from).collect();
    }
    let agent = release_dir().join("sockscope");
    // exec, so that signals reach the agent directly and its exit code is ours.
    exec(Command::new(agent).args(args))
}

/// One step of `cargo xtask test`; new ones (such as runs under other kernels) slot into `test`.
type Phase<'a> = (&'static str, Box<dyn FnOnce() -> Result<()> + 'a>);

fn test(args: TestArgs) -> Result<()> {
    let mut phases: Vec<Phase> = Vec::new();
    if !args.no_lint {
        phases.push(("lint", Box::new(lint)));
    }
    let (host, guests) = kernels(&args.kernels)?;
    if host {
        phases.push(("cargo test", Box::new(|| cargo_test(&args.extra))));
    }
    if !guests.is_empty() {
        phases.push(("kernel matrix", Box::new(move || matrix::run(&guests))));
    }
    phases.push(("fuzz", Box::new(|| fuzz(TEST_FUZZ_SECONDS, &[]))));
    run_phases(phases)
}

/// Whether `list` names the host, and the guest kernels it names.
fn kernels(list: &[String]) -> Result<(bool, Vec<&'static matrix::Series>)> {
    let mut host = false;
    let mut guests: Vec<&'static matrix::Series> = Vec::new();
    for name in list.iter().map(|k| k.trim()) {
        match name {
            "all" => {
                host = true;
                guests = matrix::SERIES.iter().collect();
            }
            "host" => host = true,
            _ => match matrix::SERIES.iter().find(|s| s.name == name) {
                Some(s) if !guests.iter().any(|g| g.name == s.name) => guests.push(s),
                Some(_) => {}
                None => {
                    let known: Vec<&str> = matrix::SERIES.iter().map(|s| s.name).collect();
                    bail!(
                        "unknown kernel `{name}` in --kernels: use host, {} or all",
                        known.join(", ")
                    );
                }
            },
        }
    }
    Ok((host, guests))
}

/// Runs every phase even after a failure, so that a formatting slip does not hide test results.
fn run_phases(phases: Vec<Phase>) -> Result<()> {
    let mut failed = Vec::new();
    for (name, phase) in phases {
        println!("xtask: {name}");
        if let Err(err) = phase() {
            eprintln!("xtask: {name} failed: {err:#}");
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        bail!("failed phases: {}", failed.join(", "));
    }
    Ok(())
}

fn cargo_test(extra: &[OsString]) -> Result<()> {
    // Debug is enough: agent/build.rs always builds the eBPF object in release.
    let mut test = cargo("test --workspace --exclude agent-ebpf --no-fail-fast");
    test.args(extra).env("RUST_BACKTRACE", "1");
    run_checked(&mut test)
}

fn lint() -> Result<()> {
    let checks = [
        cargo("fmt --all -- --check"),
        cargo("clippy --workspace --exclude agent-ebpf --all-targets -- -D warnings"),
        // agent-ebpf is not a default member: it only means something for the BPF target,
        // which needs nightly's build-std.
        cargo(concat!(
            "+nightly clippy -p agent-ebpf --target bpfel-unknown-none -Z build-std=core",
            " -- -D warnings",
        )),
    ];
    // Run them all: one report with every complaint beats fixing them one rerun at a time.
    let errors: Vec<String> = checks
        .into_iter()
        .filter_map(|mut check| run_checked(&mut check).err())
        .map(|err| format!("{err:#}"))
        .collect();
    if !errors.is_empty() {
        bail!("{}", errors.join("\n  "));
    }
    Ok(())
}

/// Builds the fuzz targets and runs each for `seconds` from its corpus (fuzz/corpus/NAME,
/// seeded in git); a crash fails with the input saved under fuzz/artifacts/.
fn fuzz(seconds: u64, targets: &[String]) -> Result<()> {
    let dir = workspace_root().join("fuzz");
    let fuzz_cargo = |line: &str| {
        let mut cmd = cargo(&format!("+nightly fuzz {line}"));
        // The targets need the agent's library, not its kernel programs.
        cmd.current_dir(&dir).env("AYA_BUILD_SKIP", "1");
        cmd
    };
    let targets: Vec<String> = if targets.is_empty() {
        stdout_of(&mut fuzz_cargo("list"))?
            .lines()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect()
    } else {
        targets.to_vec()
    };
    if targets.is_empty() {
        bail!("no fuzz targets in {}", dir.display());
    }
    run_checked(&mut fuzz_cargo("build"))?;
    for target in &targets {
        println!("xtask: fuzzing {target} for {seconds} s");
        std::fs::create_dir_all(dir.join("corpus").join(target))?;
        run_checked(&mut fuzz_cargo(&format!(
            "run {target} corpus/{target} -- -max_total_time={seconds} -timeout=10 \
             -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1"
        )))?;
    }
    Ok(())
}

fn bench(args: Vec<OsString>) -> Result<()> {
    run_checked(&mut cargo("build --release -p agent -p testkit --bins"))?;
    let release = release_dir();
    let bench = release.join("sockscope-bench");
    if !bench.is_file() {
        bail!(
            "{} was not built: the testkit crate has no `sockscope-bench` binary yet",
            bench.display()
        );
    }
    let agent = release.join("sockscope");
    exec(Command::new(bench).arg("--agent").arg(agent).args(args))
}

/// The workspace root: xtask lives one level below it.
pub(crate) fn workspace_root() -> &'static Path {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir)
}

/// Where `cargo build --release` puts binaries. The workspace sets no `build.target-dir`, so
/// the environment decides; this spares a `cargo metadata` run and a JSON parser.
fn release_dir() -> PathBuf {
    let target = ["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR"]
        .iter()
        .find_map(std::env::var_os)
        .unwrap_or_else(|| "target".into());
    workspace_root().join(target).join("release")
}

/// PATH with `$CARGO_HOME/bin` (where rustup and `cargo install` put binaries) first: rustup's
/// `cargo` proxy, which understands `+nightly`, and the bpf-linker we install must win.
fn child_path() -> OsString {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")));
    let current = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&current).collect();
    if let Some(bin) = cargo_home.map(|home| home.join("bin")) {
        dirs.retain(|dir| *dir != bin);
        dirs.insert(0, bin);
    }
    std::env::join_paths(dirs).unwrap_or(current)
}

/// `program` with the arguments in `line` (split on whitespace), cleaned of the outer cargo's
/// toolchain pins, run from the workspace root.
pub(crate) fn tool(program: &str, line: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(line.split_whitespace());
    for var in INHERITED_TOOLCHAIN_VARS {
        cmd.env_remove(var);
    }
    cmd.env("PATH", child_path()).current_dir(workspace_root());
    cmd
}

pub(crate) fn cargo(line: &str) -> Command {
    tool("cargo", line)
}

/// The command line as a user would type it, for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let words = std::iter::once(cmd.get_program()).chain(cmd.get_args());
    let words: Vec<_> = words.map(OsStr::to_string_lossy).collect();
    words.join(" ")
}

/// Runs `cmd` with inherited stdio and fails unless it succeeds.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails unless it succeeds.
pub(crate) fn stdout_of(cmd: &mut Command) -> Result<String> {
    let output = cmd
        .output()
        .with_context(|| format!("could not start `{}`", describe(cmd)))?;
    if !output.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Replaces this process with `cmd`; returns only if that fails.
fn exec(cmd: &mut Command) -> Result<()> {
    let err = cmd.exec();
    Err(err).with_context(|| format!("could not run `{}`", describe(cmd)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Cmd {
        let args = std::iter::once("xtask").chain(line.split_whitespace());
        Cli::try_parse_from(args).expect("parses").command
    }

    #[test]
    fn run_passes_flags_through_to_the_agent() {
        let Cmd::Run { args } = parse("run --web.listen-address :9000 -v") else {
            panic!("not run");
        };
        assert_eq!(args, ["--web.listen-address", ":9000", "-v"]);
    }

    #[test]
    fn fuzz_takes_seconds_and_targets() {
        let Cmd::Fuzz(args) = parse("fuzz --seconds 5 web_config") else {
            panic!("not fuzz");
        };
        assert_eq!(args.seconds, 5);
        assert_eq!(args.targets, ["web_config"]);
    }

    #[test]
    fn test_takes_extra_cargo_args_after_double_dash() {
        let Cmd::Test(args) = parse("test --no-lint -- -p agent -- --nocapture") else {
            panic!("not test");
        };
        assert!(args.no_lint);
        assert_eq!(args.extra, ["-p", "agent", "--", "--nocapture"]);
        assert_eq!(args.kernels, ["all"]);
    }

    #[test]
    fn kernels_list_host_and_guests() {
        let Cmd::Test(args) = parse("test --kernels host,6.12") else {
            panic!("not test");
        };
        let (host, guests) = kernels(&args.kernels).expect("known kernels");
        assert!(host);
        assert_eq!(guests.iter().map(|g| g.name).collect::<Vec<_>>(), ["6.12"]);
        let (host, guests) = kernels(&["6.1".into()]).expect("known");
        assert!(!host && guests.len() == 1);
        let err = kernels(&["5.4".into()]).expect_err("unknown");
        assert!(err.to_string().contains("unknown kernel `5.4`"), "{err}");
    }
}
