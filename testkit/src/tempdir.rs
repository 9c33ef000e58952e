//! Temporary directories removed on drop, and a trimmed copy of tracefs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, ensure};

/// A temporary directory, `sockscope-PREFIX-PID-N` under the temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory.
    pub fn new(prefix: &str) -> Result<TempDir> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("sockscope-{prefix}-{}-{n}", std::process::id()));
        fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(TempDir(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `text` to the file `name` in it through a rename, as certificate tools do, so
    /// that a reader never sees half a file; returns the file's path.
    pub fn write(&self, name: &str, text: &str) -> std::io::Result<PathBuf> {
        let path = self.0.join(name);
        let tmp = self.0.join(format!(".{name}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(&tmp, &path)?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A fake tracefs holding only the `events/CATEGORY/NAME/format` files of `tracepoints`
/// (`"tcp/tcp_send_reset"`), copied from the real one: a kernel without the other tracepoints,
/// for `--path.tracefs` with `--probe.mode=tracepoint`.
///
/// When tracefs is not mounted yet (a fresh machine), `agent check` mounts it first.
pub fn partial_tracefs(agent: &Path, tracepoints: &[&str]) -> Result<TempDir> {
    let events = Path::new("/sys/kernel/tracing/events");
    if !events.is_dir() {
        let out = Command::new(agent)
            .args(["check", "--probe.mode=tracepoint"])
            .output()
            .with_context(|| format!("run {} check", agent.display()))?;
        ensure!(out.status.code().is_some(), "sockscope check did not run");
    }
    let dir = TempDir::new("tracefs")?;
    for tp in tracepoints {
        let src = events.join(tp).join("format");
        let dst = dir.path().join("events").join(tp);
        fs::create_dir_all(&dst)?;
        fs::copy(&src, dst.join("format")).with_context(|| src.display().to_string())?;
    }
    Ok(dir)
}
