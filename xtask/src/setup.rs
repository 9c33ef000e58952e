//! Installs, idempotently, what building and testing sockscope needs. Each check is one quick
//! command, so a machine that has everything pays well under a second and sees no output.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, describe, run_checked, stdout_of, tool};

/// A Debian package and why we need it.
type Package = (&'static str, &'static str);

const PACKAGES: &[Package] = &[
    ("llvm-22-dev", "bpf-linker links against LLVM 22"),
    ("libpolly-22-dev", "for bpf-linker's LLVM 22 link"),
    ("libzstd-dev", "for bpf-linker's LLVM 22 link"),
    ("zlib1g-dev", "for bpf-linker's LLVM 22 link"),
    ("prometheus", "the tests check metrics with its promtool"),
    (
        "libpcap-dev",
        "socket filters compile tcpdump expressions with libpcap",
    ),
    (
        "tcpdump",
        "the socket filter tests compare counts and captures with tcpdump",
    ),
    (
        "systemd",
        "the tests check the systemd unit with systemd-analyze verify",
    ),
    (
        "python3-venv",
        "the tests check dashboards and Kubernetes manifests with Python packages",
    ),
    ("busybox-static", "the kernel matrix's guests run on it"),
    ("cpio", "the kernel matrix packs its initramfs with it"),
    (
        "kmod",
        "the kernel matrix reads module dependencies with modinfo",
    ),
    (
        "xz-utils",
        "the kernel matrix unpacks Debian's compressed modules",
    ),
    (
        "binutils",
        "the kernel matrix strips the test binaries for its guests",
    ),
];

/// Where the Python checkers live, relative to the workspace root (the tests look there).
const PYTHON_VENV: &str = "target/tools/python";
/// The Python packages the tests use, pinned: the Grafana SDK's dashboard model and the
/// Kubernetes JSON schemas.
const PYTHON_PACKAGES: &[&str] = &[
    "grafana-foundation-sdk==1769699998!10.1.0",
    "kubernetes-validate==1.37.0",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

pub fn ensure_all() -> Result<()> {
    ensure_packages().context("setup step: Debian packages")?;
    ensure_qemu().context("setup step: qemu for the kernel matrix")?;
    ensure_nightly().context("setup step: Rust nightly with rust-src")?;
    ensure_bpf_linker().context("setup step: bpf-linker")?;
    ensure_python_tools().context("setup step: Python checkers")?;
    ensure_cargo_fuzz().context("setup step: cargo-fuzz")
}

/// A virtual environment with [`PYTHON_PACKAGES`], made with Debian's Python.
fn ensure_python_tools() -> Result<()> {
    let venv = crate::workspace_root().join(PYTHON_VENV);
    let python = venv.join("bin/python3");
    let ready = Command::new(&python)
        .args(["-c", "import grafana_foundation_sdk, kubernetes_validate"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ready {
        return Ok(());
    }
    println!(
        "xtask: installing {} into {} (the tests' dashboard and manifest checks)",
        PYTHON_PACKAGES.join(" "),
        venv.display()
    );
    run_checked(
        Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(&venv),
    )?;
    run_checked(
        Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(PYTHON_PACKAGES),
    )
}

/// `cargo fuzz` runs the fuzz targets (`cargo xtask fuzz`, and `cargo xtask test`).
fn ensure_cargo_fuzz() -> Result<()> {
    let installed = tool("cargo-fuzz", "--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if installed {
        return Ok(());
    }
    println!("xtask: installing cargo-fuzz (runs the fuzz targets; about two minutes)");
    run_checked(&mut cargo("install cargo-fuzz --locked"))
}

fn ensure_packages() -> Result<()> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        return Ok(());
    }
    let names = names_of(&missing);
    if !is_root() {
        bail!(
            "missing Debian packages: {names}. Install them as root with:\n  \
             apt-get update && apt-get install -y --no-install-recommends {names}"
        );
    }
    for (name, why) in &missing {
        println!("xtask: installing {name} ({why})");
    }
    run_checked(&mut apt("update -q"))?;
    // --force-conf*: keep existing config files instead of asking.
    let mut install = apt(concat!(
        "install -y -q --no-install-recommends",
        " -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold",
    ));
    install.args(missing.iter().map(|(name, _)| name));
    let installed = run_checked(&mut install);
    // Judge by the result, not apt's exit code: a prometheus service that fails to start fails
    // the install yet leaves promtool, all we want from it, in place.
    let still_missing = missing_packages()?;
    if !still_missing.is_empty() {
        installed?;
        bail!(
            "`{}` left missing: {}",
            describe(&install),
            names_of(&still_missing)
        );
    }
    if let Err(err) = installed {
        eprintln!("xtask: warning: {err:#}; every package we need is usable anyway");
    }
    Ok(())
}

/// qemu-system-x86 from bookworm-backports (10.x, like the qemu-utils these machines have:
/// bookworm's 7.2 would remove it), through a private APT_CONFIG so the host's sources stay
/// as they are, and with --no-remove so nothing else goes.
fn ensure_qemu() -> Result<()> {
    if package_usable("qemu-system-x86") {
        return Ok(());
    }
    if !is_root() {
        bail!("qemu-system-x86 is missing; install it as root (see docs/KERNEL-MATRIX.md)");
    }
    println!(
        "xtask: installing qemu-system-x86 from bookworm-backports (the kernel matrix boots \
         Debian's kernels in it)"
    );
    let dir = crate::workspace_root().join("target").join("apt-backports");
    std::fs::create_dir_all(dir.join("lists/partial"))?;
    std::fs::create_dir_all(dir.join("sources.list.d"))?;
    let mirror = debian_mirror();
    let security = mirror.replace("/debian", "/debian-security");
    let sources = format!(
        "deb {mirror} bookworm main\ndeb {mirror} bookworm-updates main\n\
         deb {mirror} bookworm-backports main\ndeb {security} bookworm-security main\n"
    );
    std::fs::write(dir.join("sources.list"), sources)?;
    let config = format!(
        "Dir::Etc::SourceList \"{0}/sources.list\";\n\
         Dir::Etc::SourceParts \"{0}/sources.list.d\";\n\
         Dir::State::Lists \"{0}/lists\";\n",
        dir.display()
    );
    let config_path = dir.join("apt.conf");
    std::fs::write(&config_path, config)?;
    let private = |line: &str| {
        let mut cmd = apt(line);
        cmd.env("APT_CONFIG", &config_path);
        cmd
    };
    run_checked(&mut private("update -q"))?;
    run_checked(&mut private(concat!(
        "install -y -q --no-install-recommends --no-remove -t bookworm-backports",
        " -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold",
        " qemu-system-x86",
    )))
}

/// The Debian mirror of the host's apt sources (deb822 `URIs:` or one-line `deb URI`).
fn debian_mirror() -> String {
    let mut texts = vec![std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        texts.extend(dir.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok()));
    }
    texts
        .iter()
        .flat_map(|t| t.lines())
        .filter_map(|line| {
            let line = line.trim();
            let rest = line
                .strip_prefix("URIs:")
                .or_else(|| line.strip_prefix("deb "))?;
            rest.split_whitespace()
                .find(|w| w.starts_with("http") && w.trim_end_matches('/').ends_with("/debian"))
                .map(|w| w.trim_end_matches('/').to_owned())
        })
        .next()
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

fn package_usable(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout) == "install ok installed")
}

fn apt(line: &str) -> Command {
    let mut apt = Command::new("apt-get");
    apt.args(line.split_whitespace());
    apt.env("DEBIAN_FRONTEND", "noninteractive");
    apt
}

/// The packages not usable yet, from a single `dpkg-query` for all of them.
fn missing_packages() -> Result<Vec<Package>> {
    let mut query = Command::new("dpkg-query");
    query
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(PACKAGES.iter().map(|(name, _)| name));
    let output = query
        .output()
        .with_context(|| format!("could not start `{}` (is this Debian?)", describe(&query)))?;
    // dpkg-query exits non-zero when a package is unknown; stdout still lists the rest.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let usable = |wanted: &str| {
        stdout.lines().any(|line| {
            line.split_once(' ')
                .is_some_and(|(name, status)| name == wanted && is_usable(name, status))
        })
    };
    Ok(PACKAGES
        .iter()
        .copied()
        .filter(|(name, _)| !usable(name))
        .collect())
}

fn names_of(packages: &[Package]) -> String {
    let names: Vec<&str> = packages.iter().map(|(name, _)| *name).collect();
    names.join(" ")
}

fn is_usable(name: &str, status: &str) -> bool {
    status == "install ok installed"
        // We need prometheus only for promtool: a service that failed to start leaves the
        // package half-configured, with promtool unpacked and working.
        || (name == "prometheus"
            && status.starts_with("install ok")
            && Path::new("/usr/bin/promtool").is_file())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn ensure_nightly() -> Result<()> {
    let toolchains = stdout_of(&mut rustup("toolchain list"))?;
    if !toolchains.lines().any(is_plain_nightly) {
        println!("xtask: installing Rust nightly (agent-ebpf builds for the BPF target with it)");
        run_checked(&mut rustup("toolchain install nightly --profile minimal"))?;
    }
    let components = stdout_of(&mut rustup(
        "component list --toolchain nightly --installed",
    ))?;
    if !components.lines().any(|c| c.trim().starts_with("rust-src")) {
        println!("xtask: installing rust-src for nightly (-Z build-std=core needs core's source)");
        run_checked(&mut rustup("component add rust-src --toolchain nightly"))?;
    }
    Ok(())
}

fn rustup(line: &str) -> Command {
    tool("rustup", line)
}

/// `nightly-<host>` as `rustup toolchain list` shows it, but not a dated `nightly-2025-…`,
/// which `+nightly` would not select.
fn is_plain_nightly(line: &str) -> bool {
    let name = line.split_whitespace().next().unwrap_or_default();
    name == "nightly"
        || name
            .strip_prefix("nightly-")
            .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

fn ensure_bpf_linker() -> Result<()> {
    let found = bpf_linker_version();
    if found.as_deref() == Some(BPF_LINKER_VERSION) {
        return Ok(());
    }
    let found = found.map(|v| format!("found {v}; ")).unwrap_or_default();
    println!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} ({found}it links the eBPF programs; \
         builds against LLVM 22, about a minute)"
    );
    // --force: replace a bpf-linker of another version, even one cargo did not install.
    let mut install = cargo(&format!(
        "install bpf-linker --version {BPF_LINKER_VERSION} --locked --force \
         --no-default-features --features llvm-22"
    ));
    run_checked(install.env("LLVM_PREFIX", LLVM_PREFIX))
}

/// The version of the bpf-linker our child commands will find (`$CARGO_HOME/bin` first).
fn bpf_linker_version() -> Option<String> {
    let output = tool("bpf-linker", "--version").output().ok()?;
    // "bpf-linker 0.13.0"
    let stdout = String::from_utf8_lossy(&output.stdout);
    let version = stdout.split_whitespace().nth(1)?;
    output.status.success().then(|| version.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_undated_nightly_counts() {
        assert!(is_plain_nightly("nightly-x86_64-unknown-linux-gnu"));
        assert!(is_plain_nightly(
            "nightly-x86_64-unknown-linux-gnu (override)"
        ));
        assert!(!is_plain_nightly(
            "nightly-2025-06-01-x86_64-unknown-linux-gnu"
        ));
        assert!(!is_plain_nightly(
            "stable-x86_64-unknown-linux-gnu (active, default)"
        ));
    }

    #[test]
    fn only_configured_packages_count() {
        assert!(is_usable("iproute2", "install ok installed"));
        assert!(!is_usable("iproute2", "install ok half-configured"));
        assert!(!is_usable("iproute2", "deinstall ok config-files"));
    }
}
