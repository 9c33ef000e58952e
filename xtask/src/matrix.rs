//! The kernel matrix: the integration tests inside qemu guests running Debian's kernels.
//!
//! Per kernel: the newest matching `linux-image-…-unsigned` package is downloaded once and
//! cached under `target/kernels/` (only `./boot` and the few modules the tests need are
//! unpacked; nothing is installed into the host). An initramfs carries static busybox, the
//! test binaries, the `sockscope` binary they spawn (at the same absolute path as on the
//! host), their shared libraries and the modules; its `/init` mounts what the agent needs,
//! loads the modules, runs the tests with `CI=true SOCKSCOPE_GUEST=1`, prints marker lines and
//! powers off. The guests boot in parallel under software emulation and a time limit; their
//! serial logs are parsed into a per-kernel, per-test report. See docs/KERNEL-MATRIX.md.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, describe, run_checked, stdout_of, workspace_root};

/// A Debian kernel series the matrix can boot.
#[derive(Debug)]
pub struct Series {
    /// The name used on the command line (`--kernels 6.1`).
    pub name: &'static str,
    /// Package names are `{prefix}{number}{suffix}`; the highest number wins.
    prefix: &'static str,
    suffix: &'static str,
}

pub const SERIES: &[Series] = &[
    Series {
        name: "6.1",
        prefix: "linux-image-6.1.0-",
        suffix: "-amd64-unsigned",
    },
    Series {
        name: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "+deb12-amd64-unsigned",
    },
];

/// Kernel modules (Debian builds them separately) that the tests need, by file stem. Their
/// dependencies must be in this list too; they are loaded in dependency order.
const MODULES: &[&str] = &["inet_diag", "tcp_diag", "udp_diag", "veth"];
/// Where those modules sit in the package, for `tar --wildcards`.
const MODULE_GLOBS: &[&str] = &[
    "./lib/modules/*/kernel/net/ipv4/*_diag.ko*",
    "./lib/modules/*/kernel/drivers/net/veth.ko*",
];

/// The integration test binaries run in the guests, with libtest arguments (one test at a
/// time: an emulated CPU shared by two agents and a flood misses start-up deadlines). Chosen
/// for the time budget (the matrix should add about 5 minutes on 2 cores under emulation;
/// 8 on a busy host, the guests running side by side):
/// every reset test, the listen tests whose figures depend on the kernel (SYN-queue
/// comparison, cookies, accept-queue overflow, sock_diag gauges), and the TIME_WAIT entry
/// tests (the hash-chain walk depends on the kernel's layout).
/// The rest stay on the host; docs/KERNEL-MATRIX.md says why for each. Tests needing outside
/// tools skip themselves in a guest (`testkit::host_only`).
pub const GUEST_TESTS: &[(&str, &[&str])] = &[
    ("resets", &["--test-threads=1"]),
    (
        "listen_accuracy",
        &[
            "--test-threads=1",
            "--exact",
            "accept_queue_overflow_ipv4_equals_listen_overflows",
            "ack_stage_overflow_is_told_from_syn_stage",
            "ack_stage_overflow_ipv6",
            "syn_queue_full_without_cookies_counts_drops",
            "syn_queue_full_with_cookies_counts_cookies",
            "syncookies_always_counts_every_syn_as_a_cookie",
        ],
    ),
    (
        "listen_gauges",
        &[
            "--test-threads=1",
            "--exact",
            "accept_queue_and_drops_equal_the_kernel",
            "syn_queue_counts_the_requests_of_each_listener",
        ],
    ),
    (
        "timewait",
        &[
            "--test-threads=1",
            "--exact",
            "client_and_server_closes_btf_tracepoints",
            "orphaned_fin_wait2_sockets_enter_once",
            "a_full_time_wait_table_is_counted_as_overflow",
        ],
    ),
    (
        "reload",
        &[
            "--test-threads=1",
            "--exact",
            "reloads_under_traffic_hand_the_one_tap_over_exactly",
        ],
    ),
    ("promtool", &[]),
    // The agent's own unit tests that load programs: the filter translation, run through
    // each kernel's verifier and BPF_PROG_TEST_RUN.
    ("unit", &["--test-threads=1", "filters::translate"]),
];

/// How long one guest may take, boot to power-off. A run takes 200-390 s under software
/// emulation, depending on how busy the host is.
const GUEST_TIMEOUT: Duration = Duration::from_secs(900);

/// The marker line `/init` prints last; a log without it is a failed run.
const DONE_MARKER: &str = "SOCKSCOPE-GUEST-DONE";

fn cache_dir() -> PathBuf {
    workspace_root().join("target").join("kernels")
}

/// A kernel unpacked in the cache.
struct Unpacked {
    series: &'static str,
    /// The package's kernel release, e.g. `6.1.0-56-amd64`.
    release: String,
    vmlinuz: PathBuf,
    /// Decompressed modules, in load order.
    modules: Vec<PathBuf>,
}

/// One test binary's exit code (none when cut short) and per test `(name, result)`.
pub type BinaryResult = (Option<i32>, Vec<(String, String)>);

/// What one guest reported.
#[derive(Default)]
pub struct GuestReport {
    pub series: String,
    pub release: String,
    pub log: PathBuf,
    pub elapsed: Duration,
    /// Per test binary: exit code and per test `(name, result)`.
    pub binaries: BTreeMap<String, BinaryResult>,
    /// The `sockscope check` lines from the guest.
    pub check: Vec<String>,
    /// Why the run as a whole failed (timeout, no marker…).
    pub problem: Option<String>,
}

impl GuestReport {
    pub fn passed(&self) -> bool {
        self.problem.is_none()
            && self.binaries.len() == GUEST_TESTS.len()
            && self
                .binaries
                .values()
                .all(|(rc, tests)| *rc == Some(0) && tests.iter().all(|(_, r)| r != "FAILED"))
    }
}

/// Runs the matrix for `series` (names from [`SERIES`]) and prints the report.
pub fn run(series: &[&'static Series]) -> Result<()> {
    let started = Instant::now();
    let kernels: Vec<Unpacked> = series
        .iter()
        .map(|s| unpacked(s).with_context(|| format!("kernel {}", s.name)))
        .collect::<Result<_>>()?;
    let binaries = build_tests()?;
    let prepared = started.elapsed();
    let reports: Vec<GuestReport> = std::thread::scope(|scope| {
        let handles: Vec<_> = kernels
            .iter()
            .map(|k| scope.spawn(|| boot(k, &binaries)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("guest thread panicked"))
            .collect::<Result<Vec<_>>>()
    })?;
    print_report(&reports);
    println!(
        "xtask: kernel matrix took {:.0?} ({:.0?} to fetch and build, {:.0?} in the guests)",
        started.elapsed(),
        prepared,
        started.elapsed() - prepared
    );
    crate::support::write(&reports)?;
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.series.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("the tests failed on kernel {}", failed.join(", "));
    }
    Ok(())
}

/// The newest package of the series, downloaded and unpacked once.
fn unpacked(series: &'static Series) -> Result<Unpacked> {
    let root = cache_dir();
    fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    // A cached kernel of the series is used as it is: no apt look-up on every run.
    let cached = newest_in(
        series,
        fs::read_dir(&root)?.filter_map(|e| {
            let e = e.ok()?;
            e.path()
                .join(".complete")
                .is_file()
                .then(|| e.file_name().to_string_lossy().into_owned())
        }),
    );
    let package = match cached {
        Some(p) => p,
        None => fetch(series, &root)?,
    };
    let dir = root.join(&package);
    let boot = dir.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("read {}", boot.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz in {}", boot.display()))?;
    let release = vmlinuz
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_owned();
    let modules = fs::read_to_string(dir.join("modules.order"))?
        .lines()
        .map(|m| dir.join("modules").join(m))
        .collect();
    Ok(Unpacked {
        series: series.name,
        release,
        vmlinuz,
        modules,
    })
}

fn newest_in(series: &Series, names: impl Iterator<Item = String>) -> Option<String> {
    names
        .filter_map(|name| {
            let n = name
                .strip_prefix(series.prefix)?
                .strip_suffix(series.suffix)?;
            Some((n.parse::<u32>().ok()?, name))
        })
        .max()
        .map(|(_, name)| name)
}

/// Downloads the newest package of the series and unpacks `./boot` and the modules.
fn fetch(series: &Series, root: &Path) -> Result<String> {
    let search = || -> Result<Option<String>> {
        let pattern = format!("^{}", series.prefix.replace('.', "\\."));
        let out = stdout_of(Command::new("apt-cache").args(["search", "--names-only", &pattern]))?;
        Ok(newest_in(
            series,
            out.lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_owned)),
        ))
    };
    let package = match search()? {
        Some(p) => p,
        None => {
            // A fresh machine may have no package lists yet.
            run_checked(Command::new("apt-get").args(["update", "-q"]))?;
            search()?.with_context(|| {
                format!(
                    "no package {}N{} in the apt sources",
                    series.prefix, series.suffix
                )
            })?
        }
    };
    println!(
        "xtask: downloading {package} (kernel {}, cached under target/kernels)",
        series.name
    );
    let download = root.join("download");
    fs::create_dir_all(&download)?;
    run_checked(
        Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(&download),
    )?;
    let deb = fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&format!("{package}_")) && n.ends_with(".deb")
            })
        })
        .with_context(|| format!("apt-get download left no {package}_*.deb"))?;
    let dir = root.join(&package);
    let _ = fs::remove_dir_all(&dir);
    let unpack = dir.join("unpack");
    fs::create_dir_all(&unpack)?;
    // dpkg-deb --fsys-tarfile deb | tar -x ./boot <modules>
    let mut tarfile = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(&deb)
        .stdout(Stdio::piped())
        .spawn()
        .context("could not start dpkg-deb")?;
    let mut tar = Command::new("tar");
    tar.args(["-x", "--wildcards", "-C"])
        .arg(&unpack)
        .arg("./boot")
        .args(MODULE_GLOBS)
        .stdin(tarfile.stdout.take().context("dpkg-deb stdout")?);
    run_checked(&mut tar)?;
    if !tarfile.wait()?.success() {
        bail!("dpkg-deb --fsys-tarfile {} failed", deb.display());
    }
    fs::rename(unpack.join("boot"), dir.join("boot"))?;
    let order = prepare_modules(&unpack, &dir.join("modules"))?;
    fs::write(dir.join("modules.order"), order.join("\n") + "\n")?;
    fs::remove_dir_all(&unpack)?;
    fs::remove_file(&deb)?;
    fs::write(dir.join(".complete"), "")?;
    Ok(package)
}

/// Decompresses the wanted modules into `out` and returns their file names in load order
/// (dependencies first, from each module's `depends` field: the package has no modules.dep).
fn prepare_modules(unpack: &Path, out: &Path) -> Result<Vec<String>> {
    fs::create_dir_all(out)?;
    let mut found = BTreeMap::new();
    let mut stack = vec![unpack.join("lib")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            let stem = name.split(".ko").next().unwrap_or_default().to_owned();
            if MODULES.contains(&stem.as_str()) {
                found.insert(stem, path);
            }
        }
    }
    let mut deps = BTreeMap::new();
    for (stem, path) in &found {
        let target = out.join(format!("{stem}.ko"));
        if path.extension().is_some_and(|e| e == "xz") {
            let data = Command::new("xz").arg("-dc").arg(path).output()?;
            if !data.status.success() {
                bail!("xz -dc {} failed", path.display());
            }
            fs::write(&target, data.stdout)?;
        } else {
            fs::copy(path, &target)?;
        }
        let depends = stdout_of(Command::new("modinfo").args(["-F", "depends"]).arg(&target))?;
        let depends: Vec<String> = depends
            .trim()
            .split(',')
            .filter(|d| !d.is_empty())
            .map(str::to_owned)
            .collect();
        deps.insert(stem.clone(), depends);
    }
    let mut order: Vec<String> = Vec::new();
    fn visit(
        m: &str,
        deps: &BTreeMap<String, Vec<String>>,
        order: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> Result<()> {
        if !seen.insert(m.to_owned()) {
            return Ok(());
        }
        let Some(ds) = deps.get(m) else {
            bail!("module {m} is needed but not carried: add it to MODULES in xtask/src/matrix.rs");
        };
        for d in ds {
            visit(d, deps, order, seen)?;
        }
        order.push(format!("{m}.ko"));
        Ok(())
    }
    let mut seen = BTreeSet::new();
    for m in MODULES {
        visit(m, &deps, &mut order, &mut seen)?;
    }
    Ok(order)
}

/// Paths of the test binaries and of the `sockscope` binary they spawn.
struct Binaries {
    tests: BTreeMap<String, PathBuf>,
    agent: PathBuf,
}

fn build_tests() -> Result<Binaries> {
    // The same profile as the host's `cargo test`, so nothing is built twice.
    let mut build = cargo("test -p agent --no-run --message-format=json-render-diagnostics");
    build.stdout(Stdio::piped());
    let mut child = build
        .spawn()
        .with_context(|| format!("could not start `{}`", describe(&build)))?;
    let stdout = child.stdout.take().context("cargo stdout")?;
    let mut tests = BTreeMap::new();
    let mut agent = None;
    for message in cargo_metadata::Message::parse_stream(BufReader::new(stdout)) {
        if let cargo_metadata::Message::CompilerArtifact(a) = message? {
            let Some(exe) = a.executable else { continue };
            let kind: Vec<String> = a.target.kind.iter().map(|k| k.to_string()).collect();
            if kind.iter().any(|k| k == "test") {
                tests.insert(a.target.name.to_string(), exe.into_std_path_buf());
            } else if kind.iter().any(|k| k == "lib") && a.profile.test {
                // The library's unit tests: `unit` in GUEST_TESTS.
                tests.insert("unit".to_owned(), exe.into_std_path_buf());
            } else if kind.iter().any(|k| k == "bin")
                && a.target.name == "sockscope"
                && !a.profile.test
            {
                agent = Some(exe.into_std_path_buf());
            }
        }
    }
    if !child.wait()?.success() {
        bail!("`{}` failed", describe(&build));
    }
    Ok(Binaries {
        tests,
        agent: agent.context("cargo built no sockscope binary")?,
    })
}

/// Builds the guest's initramfs, boots it and parses its log.
fn boot(kernel: &Unpacked, binaries: &Binaries) -> Result<GuestReport> {
    let work = cache_dir().join(format!("guest-{}", kernel.series));
    let initrd = initramfs(kernel, binaries, &work)
        .with_context(|| format!("initramfs for kernel {}", kernel.series))?;
    let log = work.join("serial.log");
    let log_file = fs::File::create(&log)?;
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-accel",
        "tcg",
        "-m",
        "1024",
        "-smp",
        "2",
        "-nographic",
        "-no-reboot",
    ])
    .args([
        "-nic",
        "none",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ])
    .arg("-kernel")
    .arg(&kernel.vmlinuz)
    .arg("-initrd")
    .arg(&initrd)
    .args(["-append", "console=ttyS0 panic=-1 quiet no_timer_check"])
    .stdin(Stdio::null())
    .stdout(log_file.try_clone()?)
    .stderr(log_file);
    println!(
        "xtask: booting kernel {} ({}), serial log {}",
        kernel.series,
        kernel.release,
        log.display()
    );
    let started = Instant::now();
    let mut child = qemu
        .spawn()
        .with_context(|| format!("could not start `{}`", describe(&qemu)))?;
    let mut problem = None;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() > GUEST_TIMEOUT {
            // Our own child, by its handle.
            let _ = child.kill();
            let _ = child.wait();
            problem = Some(format!("no power-off within {GUEST_TIMEOUT:?}"));
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = String::from_utf8_lossy(&fs::read(&log)?).replace('\r', "");
    let mut report = parse_log(&text);
    report.series = kernel.series.to_owned();
    report.release = kernel.release.clone();
    report.log = log;
    report.elapsed = started.elapsed();
    if report.problem.is_none() {
        report.problem = problem;
    }
    Ok(report)
}

fn parse_log(text: &str) -> GuestReport {
    let mut report = GuestReport::default();
    let mut current: Option<String> = None;
    let mut in_check = false;
    let mut done = None;
    for line in text.lines() {
        // The console may put kernel messages on the same line; take our markers anywhere.
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("=== begin ") {
            current = Some(rest.trim().to_owned());
            report
                .binaries
                .entry(rest.trim().to_owned())
                .or_insert((None, Vec::new()));
        } else if let Some(rest) = line.strip_prefix("=== end ") {
            let mut words = rest.split_whitespace();
            let name = words.next().unwrap_or_default().to_owned();
            let rc = words
                .next()
                .and_then(|w| w.strip_prefix("rc="))
                .and_then(|n| n.parse().ok());
            report.binaries.entry(name).or_insert((None, Vec::new())).0 = rc;
            current = None;
        } else if line == "=== check begin" {
            in_check = true;
        } else if line == "=== check end" {
            in_check = false;
        } else if in_check {
            report.check.push(line.to_owned());
        } else if let Some(rest) = line.strip_prefix(DONE_MARKER) {
            done = Some(rest.trim().to_owned());
        } else if let (Some(bin), Some(rest)) = (&current, line.strip_prefix("test "))
            && let Some((name, result)) = rest.rsplit_once(" ... ")
        {
            let entry = report.binaries.entry(bin.clone()).or_default();
            entry.1.push((name.to_owned(), result.trim().to_owned()));
        }
    }
    if done.is_none() {
        report.problem = Some(format!("the guest never printed its {DONE_MARKER} line"));
    }
    report
}

fn print_report(reports: &[GuestReport]) {
    let mut out = String::new();
    for r in reports {
        let verdict = if r.passed() { "PASSED" } else { "FAILED" };
        let _ = writeln!(
            out,
            "xtask: kernel {} ({}): {verdict} in {:.0?}; serial log {}",
            r.series,
            r.release,
            r.elapsed,
            r.log.display()
        );
        if let Some(p) = &r.problem {
            let _ = writeln!(out, "  problem: {p}");
        }
        for (name, _) in GUEST_TESTS {
            match r.binaries.get(*name) {
                None => {
                    let _ = writeln!(out, "  {name}: did not run");
                }
                Some((rc, tests)) => {
                    let passed = tests.iter().filter(|(_, r)| r == "ok").count();
                    let failed: Vec<&str> = tests
                        .iter()
                        .filter(|(_, r)| r == "FAILED")
                        .map(|(n, _)| n.as_str())
                        .collect();
                    let rc = rc.map_or("none (cut short)".into(), |c| c.to_string());
                    let _ = writeln!(
                        out,
                        "  {name}: {passed} ok, {} failed (exit {rc})",
                        failed.len()
                    );
                    for t in failed {
                        let _ = writeln!(out, "    FAILED {t}");
                    }
                }
            }
        }
    }
    print!("{out}");
    let _ = std::io::stdout().flush();
}

/// Writes the guest's root tree and packs it as an uncompressed newc cpio (the kernel takes
/// it as it is; compressing 40 MB costs more than loading it).
fn initramfs(kernel: &Unpacked, binaries: &Binaries, work: &Path) -> Result<PathBuf> {
    let root = work.join("root");
    let _ = fs::remove_dir_all(&root);
    for dir in [
        "bin", "dev", "proc", "sys", "tmp", "run", "modules", "tests",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .context("no busybox: `cargo xtask setup` installs busybox-static")?;
    fs::copy(busybox, root.join("bin/busybox"))?;
    let mut elves = vec![binaries.agent.clone()];
    let agent_in_guest = place(&root, &binaries.agent)?;
    strip(&binaries.agent, &agent_in_guest)?;
    for (name, _) in GUEST_TESTS {
        let exe = binaries
            .tests
            .get(*name)
            .with_context(|| format!("cargo built no test binary {name}"))?;
        strip(exe, &root.join("tests").join(name))?;
        elves.push(exe.clone());
    }
    for lib in shared_libraries(&elves)? {
        let dest = place(&root, &lib)?;
        fs::copy(&lib, &dest).with_context(|| format!("copy {}", lib.display()))?;
    }
    for module in &kernel.modules {
        fs::copy(
            module,
            root.join("modules")
                .join(module.file_name().unwrap_or_default()),
        )?;
    }
    let order: Vec<String> = kernel
        .modules
        .iter()
        .map(|m| {
            format!(
                "/modules/{}",
                m.file_name().unwrap_or_default().to_string_lossy()
            )
        })
        .collect();
    let init = root.join("init");
    fs::write(
        &init,
        init_script(&order, &agent_in_guest_path(&binaries.agent)),
    )?;
    set_mode(&init, 0o755)?;
    set_mode(&root, 0o755)?;
    let cpio_path = work.join("initramfs.cpio");
    let files = walk(&root)?;
    let mut cpio = Command::new("cpio");
    cpio.args(["-o", "-H", "newc", "--quiet", "-R", "0:0"])
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(fs::File::create(&cpio_path)?);
    let mut child = cpio.spawn().context("could not start cpio")?;
    {
        let mut stdin = child.stdin.take().context("cpio stdin")?;
        for f in files {
            writeln!(stdin, "{f}")?;
        }
    }
    if !child.wait()?.success() {
        bail!("cpio failed");
    }
    Ok(cpio_path)
}

fn agent_in_guest_path(agent: &Path) -> String {
    agent.to_string_lossy().into_owned()
}

/// The path in the guest's root tree for host path `path`, its parent created.
fn place(root: &Path, path: &Path) -> Result<PathBuf> {
    let dest = root.join(path.strip_prefix("/").unwrap_or(path));
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    Ok(dest)
}

fn strip(from: &Path, to: &Path) -> Result<()> {
    run_checked(Command::new("strip").arg("-o").arg(to).arg(from))
}

/// Shared libraries and the ELF interpreter of `elves`, from `ldd`.
fn shared_libraries(elves: &[PathBuf]) -> Result<BTreeSet<PathBuf>> {
    let mut libs = BTreeSet::new();
    for elf in elves {
        let out = stdout_of(Command::new("ldd").arg(elf))?;
        for line in out.lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux… (0x…)"
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                libs.insert(PathBuf::from(p));
            }
        }
    }
    Ok(libs)
}

fn walk(root: &Path) -> Result<Vec<String>> {
    let mut out = vec![".".to_owned()];
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            out.push(format!("./{rel}"));
            if path.is_dir() && !path.is_symlink() {
                stack.push(path);
            }
        }
    }
    Ok(out)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// The guest's `/init`: mounts, modules, `sockscope check`, the tests, marker, power-off.
fn init_script(modules: &[String], agent: &str) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# /tmp and /run stay on the initramfs itself (writable): a tmpfs mounted there would hide
# the test binaries and the agent when the checkout lives below them.
mkdir -p /tmp /run
mount -t bpf bpf /sys/fs/bpf
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug
# The agent's cgroup_skb program attaches at the cgroup v2 root.
mount -t cgroup2 cgroup2 /sys/fs/cgroup
"#,
    );
    for m in modules {
        let _ = writeln!(s, "insmod {m} || echo \"insmod {m} failed\"");
    }
    let _ = write!(
        s,
        r#"ip link set lo up
# The flood tests open thousands of sockets; the kernel's default soft limit is 1024.
ulimit -n 65536
export CI=true SOCKSCOPE_GUEST=1 RUST_BACKTRACE=1 HOME=/tmp
echo "=== kernel $(uname -r)"
echo "=== check begin"
{agent} check 2>&1
echo "=== check end"
fail=0
"#
    );
    for (name, args) in GUEST_TESTS {
        let _ = write!(
            s,
            r#"echo "=== begin {name}"
/tests/{name} {args}
rc=$?
echo "=== end {name} rc=$rc"
[ $rc = 0 ] || fail=1
"#,
            args = args.join(" ")
        );
    }
    let _ = write!(
        s,
        r#"echo "{DONE_MARKER} fail=$fail"
poweroff -f
"#
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_package_of_a_series_wins() {
        let names = [
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-56-amd64-unsigned",
            "linux-image-6.1.0-56-cloud-amd64-unsigned",
            "linux-image-6.12.117+deb12-amd64-unsigned",
        ]
        .map(String::from);
        assert_eq!(
            newest_in(&SERIES[0], names.clone().into_iter()).as_deref(),
            Some("linux-image-6.1.0-56-amd64-unsigned")
        );
        assert_eq!(
            newest_in(&SERIES[1], names.into_iter()).as_deref(),
            Some("linux-image-6.12.117+deb12-amd64-unsigned")
        );
    }

    #[test]
    fn a_log_without_the_marker_fails_and_failures_are_named() {
        let log = "=== begin resets\nrunning 2 tests\ntest a ... ok\ntest b ... FAILED\n\
                   === end resets rc=101\n";
        let r = parse_log(log);
        assert!(r.problem.is_some());
        assert!(!r.passed());
        let (rc, tests) = &r.binaries["resets"];
        assert_eq!(*rc, Some(101));
        assert_eq!(tests[1], ("b".to_owned(), "FAILED".to_owned()));
    }
}
