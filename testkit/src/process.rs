//! Child processes that cannot outlive their test.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long Drop waits after SIGTERM before it sends SIGKILL.
const DROP_GRACE: Duration = Duration::from_secs(5);

/// Owns a child process: on drop, SIGTERM, up to 5 s of grace, then SIGKILL, and always reaped.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
}

impl ChildGuard {
    /// Takes ownership of a spawned child.
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard { child }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the child has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("waitpid({})", self.pid()))
    }

    /// The wrapped child, e.g. for its piped stdio (do not wait on it behind the guard's back).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends SIGTERM and waits up to `timeout`; past it, SIGKILL, reap, and an error.
    ///
    /// Returns the status at once if the child had already exited; never signals a reaped pid.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        // std caches the status once reaped, so this also guards against pid reuse.
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let pid = self.pid();
        let raw = i32::try_from(pid).context("pid out of range")?;
        // Not reaped yet, so the pid is still ours (at worst a zombie).
        kill(Pid::from_raw(raw), Signal::SIGTERM).with_context(|| format!("SIGTERM {pid}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let status = self.kill()?;
        bail!("process {pid} ignored SIGTERM for {timeout:?}; killed it ({status})");
    }

    /// Sends SIGKILL (if still running) and reaps the child.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        let pid = self.pid();
        // Child::kill does nothing once the child has been reaped.
        self.child
            .kill()
            .with_context(|| format!("SIGKILL {pid}"))?;
        self.child.wait().with_context(|| format!("waitpid({pid})"))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(err) = self.terminate(DROP_GRACE) {
            eprintln!("testkit: stopping child {}: {err:#}", self.pid());
            // Last resort; terminate() normally reaped it already.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A command for `program` with `args`, standard input closed and output piped, that runs
/// without the capabilities `drop_caps` (numbers as in linux/capability.h): they are
/// dropped from the bounding set before exec, so even root's exec does not get them.
pub fn command_without_caps(
    program: &std::path::Path,
    args: &[&str],
    drop_caps: &[u32],
) -> std::process::Command {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = piped_command(program, args);
    let drop_caps = drop_caps.to_vec();
    // SAFETY: only async-signal-safe prctl calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for cap in &drop_caps {
                if libc::prctl(libc::PR_CAPBSET_DROP, *cap as libc::c_ulong, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// BPF objects (programs, links) a process holds open, from its fdinfo:
/// `("prog_id" | "link_id", id)`.
pub fn held_bpf_ids(pid: u32) -> anyhow::Result<std::collections::HashSet<(String, u32)>> {
    let mut ids = std::collections::HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        for line in text.lines() {
            for kind in ["prog_id", "link_id"] {
                if let Some(v) = line
                    .strip_prefix(kind)
                    .and_then(|r| r.trim_start_matches(':').trim().parse().ok())
                {
                    ids.insert((kind.to_string(), v));
                }
            }
        }
    }
    Ok(ids)
}

/// A command for `program` with `args` (standard input closed, output piped) that runs with
/// exactly the capabilities `keep` (numbers as in linux/capability.h): every other one is
/// dropped from the bounding set before exec. With `uid`, it runs as that user and group
/// (no supplementary groups) and gets `keep` as ambient capabilities, as systemd's
/// `User=` with `AmbientCapabilities=` would give; without, as root with the bounding set
/// reduced (`setpriv --bounding-set`).
pub fn command_with_caps(
    program: &std::path::Path,
    args: &[&str],
    keep: &[u32],
    uid: Option<u32>,
) -> std::process::Command {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = piped_command(program, args);
    let mask: u64 = keep.iter().fold(0, |m, c| m | (1u64 << c));
    let keep = keep.to_vec();
    // SAFETY: only system calls between fork and exec; nothing allocates.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_long| {
                if rc < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            for cap in 0..64u32 {
                if mask & (1u64 << cap) == 0
                    && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                    && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(uid) = uid {
                check(libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0).into())?;
                check(libc::setgroups(0, std::ptr::null()).into())?;
                check(libc::setresgid(uid, uid, uid).into())?;
                check(libc::setresuid(uid, uid, uid).into())?;
            }
            // capset(2), version 3: two 32-bit words per set.
            #[repr(C)]
            struct Header {
                version: u32,
                pid: libc::c_int,
            }
            #[repr(C)]
            #[derive(Clone, Copy)]
            struct Data {
                effective: u32,
                permitted: u32,
                inheritable: u32,
            }
            let header = Header {
                version: 0x2008_0522,
                pid: 0,
            };
            let word = |i: u32| (mask >> (32 * i)) as u32;
            let data = [0, 1].map(|i| Data {
                effective: word(i),
                permitted: word(i),
                inheritable: if uid.is_some() { word(i) } else { 0 },
            });
            check(libc::syscall(libc::SYS_capset, &header, data.as_ptr()))?;
            if uid.is_some() {
                for cap in &keep {
                    check(
                        libc::prctl(
                            libc::PR_CAP_AMBIENT,
                            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                            *cap as libc::c_ulong,
                            0,
                            0,
                        )
                        .into(),
                    )?;
                }
            }
            Ok(())
        });
    }
    cmd
}

/// The capability sets of every thread of `pid`: `(tid, [CapInh, CapPrm, CapEff, CapBnd,
/// CapAmb])`, from /proc.
pub fn thread_caps(pid: u32) -> anyhow::Result<Vec<(u32, [u64; 5])>> {
    let mut threads = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue; // the thread ended
        };
        let mut sets = [0u64; 5];
        for (i, name) in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"]
            .iter()
            .enumerate()
        {
            let value = status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .ok_or_else(|| anyhow::anyhow!("no {name} in {}", entry.path().display()))?;
            sets[i] = u64::from_str_radix(value.trim(), 16)?;
        }
        let tid = entry.file_name().to_string_lossy().parse()?;
        threads.push((tid, sets));
    }
    Ok(threads)
}

/// The program and link ids that exist in the kernel now (`("prog_id" | "link_id", id)`),
/// from the bpf(2) id iterators; needs CAP_SYS_ADMIN.
pub fn kernel_bpf_ids() -> std::collections::HashSet<(String, u32)> {
    let progs = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .map(|p| ("prog_id".to_string(), p.id()));
    let links = aya::programs::loaded_links()
        .filter_map(Result::ok)
        .map(|l| ("link_id".to_string(), l.id()));
    progs.chain(links).collect()
}

/// `program args` with no input and its output captured.
fn piped_command(program: &std::path::Path, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    cmd
}
