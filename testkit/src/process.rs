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
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
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
