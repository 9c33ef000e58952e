//! Throwaway network namespaces, entered per thread, never named and never mounted.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

use crate::counters::{Counters, Sockstat};
use crate::process::ChildGuard;

/// The calling thread's network namespace (not the process's: see the crate docs).
const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// A network namespace held by an fd: it lives as long as this value or anything inside it.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    inode: u64,
}

/// Keeps the current thread inside a [`Netns`]; restores the previous namespace on drop.
#[derive(Debug)]
#[must_use = "the thread leaves the namespace again when the guard drops"]
pub struct NetnsGuard {
    previous: OwnedFd,
    /// setns applies to one thread: the guard must stay on it.
    _not_send: PhantomData<*const ()>,
}

impl Netns {
    /// Creates a fresh anonymous network namespace with `lo` up, leaving the caller's thread as it is.
    pub fn new() -> Result<Netns> {
        let fd = std::thread::Builder::new()
            .name("testkit-netns".into())
            .spawn(|| -> Result<OwnedFd> {
                // This thread alone moves; it ends right after, and the fd keeps the namespace.
                unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
                set_loopback_up()?;
                let file =
                    File::open(THREAD_NETNS).with_context(|| format!("open {THREAD_NETNS}"))?;
                Ok(file.into())
            })
            .context("spawn the netns creation thread")?
            .join()
            .map_err(|_| anyhow!("the netns creation thread panicked"))??;
        Self::from_fd(fd)
    }

    /// The calling thread's current network namespace (the host's, in a plain test thread).
    ///
    /// Careful: [`Netns::sysctl`] on the host's namespace changes the host.
    pub fn current() -> Result<Netns> {
        let file = File::open(THREAD_NETNS).with_context(|| format!("open {THREAD_NETNS}"))?;
        Self::from_fd(file.into())
    }

    /// Inode of the calling thread's current network namespace.
    pub fn current_inode() -> Result<u64> {
        Ok(Self::current()?.inode)
    }

    /// Another handle on the same namespace (a duplicated fd).
    pub fn try_clone(&self) -> Result<Netns> {
        Self::from_fd(self.fd.try_clone().context("dup the netns fd")?)
    }

    fn from_fd(fd: OwnedFd) -> Result<Netns> {
        let stat = nix::sys::stat::fstat(&fd).context("fstat the netns fd")?;
        Ok(Netns {
            fd,
            inode: stat.st_ino,
        })
    }

    /// The namespace's inode number: the value the agent puts in its `netns` label.
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Moves the current thread into this namespace until the returned guard drops.
    ///
    /// Only the network namespace changes: `/sys/class/net` still shows the namespace that
    /// mounted sysfs. Prefer [`Netns::run`], which cannot leak the thread's namespace.
    pub fn enter(&self) -> Result<NetnsGuard> {
        let previous: OwnedFd = File::open(THREAD_NETNS)
            .with_context(|| format!("open {THREAD_NETNS}"))?
            .into();
        setns(&self.fd, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns into netns {}", self.inode))?;
        Ok(NetnsGuard {
            previous,
            _not_send: PhantomData,
        })
    }

    /// Runs `f` on a scoped thread inside this namespace and returns its result (a panic in `f` propagates).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("netns-{}", self.inode))
                .spawn_scoped(scope, || -> Result<T> {
                    // The thread ends after `f`: no need to switch back.
                    setns(&self.fd, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("setns into netns {}", self.inode))?;
                    Ok(f())
                })
                .context("spawn a thread for the netns")?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Sets a per-namespace sysctl (`net.ipv4.tcp_syncookies`) in this namespace only.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = sysctl_path(key)?;
        // /proc/sys/net resolves by the opening thread's namespace: open it from inside.
        self.run(|| std::fs::write(&path, value))?
            .with_context(|| format!("set sysctl {key}={value} in netns {}", self.inode))
    }

    /// Reads a per-namespace sysctl in this namespace, without the trailing newline.
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        let path = sysctl_path(key)?;
        let text = self
            .run(|| std::fs::read_to_string(&path))?
            .with_context(|| format!("read sysctl {key} in netns {}", self.inode))?;
        Ok(text.trim_end_matches('\n').to_owned())
    }

    /// The namespace's kernel counters (`nstat -az` names: `TcpOutRsts`, `TcpExtListenDrops`…).
    pub fn counters(&self) -> Result<Counters> {
        self.run(Counters::read_current)?
    }

    /// The namespace's `/proc/net/sockstat` (TCP inuse, orphan, tw, alloc, mem).
    pub fn sockstat(&self) -> Result<Sockstat> {
        self.run(Sockstat::read_current)?
    }

    /// Spawns `cmd` inside this namespace; the guard stops it on drop.
    ///
    /// The child also gets SIGKILL when the *thread* that spawned it exits (`PR_SET_PDEATHSIG`),
    /// so a test runner killed by a timeout leaves nothing behind: keep the guard on the
    /// spawning thread (not inside [`Netns::run`], whose thread ends with the closure).
    pub fn spawn(&self, mut cmd: Command) -> Result<ChildGuard> {
        // Why pre_exec rather than forking from a thread that entered the namespace: the fork
        // then happens on the caller's thread, which owns the guard (and so PDEATHSIG), and no
        // helper thread has to outlive the call. The raw fd is valid in the child until exec:
        // a fork copies every fd, and O_CLOEXEC only closes it at exec, after setns.
        let ns_fd = self.fd.as_raw_fd();
        let parent = libc::pid_t::try_from(std::process::id()).context("pid out of range")?;
        // SAFETY: between fork and exec the closure only makes async-signal-safe system calls
        // (setns, prctl, getppid) and builds io::Errors from raw codes, which does not allocate.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    // The parent died before PDEATHSIG was armed.
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {program} in netns {}", self.inode))?;
        Ok(ChildGuard::new(child))
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(err) = setns(&self.previous, CloneFlags::CLONE_NEWNET) {
            // A thread left in the wrong namespace would silently poison later work on it.
            if std::thread::panicking() {
                eprintln!("testkit: could not restore the thread's netns: {err}");
            } else {
                panic!("testkit: could not restore the thread's netns: {err}");
            }
        }
    }
}

/// Whether the calling thread is in the initial network namespace (that of pid 1); false
/// when that cannot be read (then we are not root, or in a pid namespace of our own).
pub(crate) fn in_initial_netns() -> Result<bool> {
    let Ok(init) = std::fs::metadata("/proc/1/ns/net") else {
        return Ok(false);
    };
    let init = std::os::unix::fs::MetadataExt::ino(&init);
    Ok(Netns::current_inode()? == init)
}

/// Errors if `ns` is the initial (host) network namespace: test set-ups never change it.
pub(crate) fn refuse_initial(ns: &Netns, what: &str) -> Result<()> {
    if let Ok(init) = std::fs::metadata("/proc/1/ns/net")
        && std::os::unix::fs::MetadataExt::ino(&init) == ns.inode()
    {
        bail!("refusing to {what} in the host's network namespace: use Netns::new()");
    }
    Ok(())
}

/// `/proc/sys/...` path of a `net.*` sysctl given in dotted (or slash) form.
fn sysctl_path(key: &str) -> Result<PathBuf> {
    let rel = if key.contains('/') {
        key.trim_start_matches('/').to_owned()
    } else {
        key.replace('.', "/")
    };
    let parts: Vec<&str> = rel.split('/').collect();
    if parts.first() != Some(&"net")
        || parts.len() < 2
        || parts.iter().any(|p| p.is_empty() || *p == "..")
    {
        bail!("not a per-netns sysctl key: {key:?} (expected net.<...>)");
    }
    Ok(PathBuf::from("/proc/sys").join(rel))
}

/// Sets IFF_UP on `lo` in the calling thread's namespace.
fn set_loopback_up() -> Result<()> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("socket(AF_INET, SOCK_DGRAM) for the lo ioctl")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes ifru_flags inside `req`, which outlives the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(io::Error::last_os_error()).context("ioctl(SIOCGIFFLAGS, lo)");
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the name and flags from `req`.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
        return Err(io::Error::last_os_error()).context("ioctl(SIOCSIFFLAGS, lo up)");
    }
    Ok(())
}

/// A namespace bind-mounted under /run/netns (what `ip netns add` does), so that whoever
/// walks /run/netns finds it; unmounted and removed on drop, also when a test fails.
pub struct NamedNetns(PathBuf);

impl NamedNetns {
    /// Names `ns` as `/run/netns/<name>`.
    pub fn new(ns: &Netns, name: &str) -> Result<Self> {
        use nix::mount::{MsFlags, mount};
        std::fs::create_dir_all("/run/netns")?;
        let path = PathBuf::from("/run/netns").join(name);
        File::create(&path).with_context(|| path.display().to_string())?;
        let source = format!("/proc/self/fd/{}", ns.as_fd().as_raw_fd());
        if let Err(e) = mount(
            Some(source.as_str()),
            &path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        ) {
            let _ = std::fs::remove_file(&path);
            return Err(e).context("bind-mounting the namespace");
        }
        Ok(Self(path))
    }
}

impl Drop for NamedNetns {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpListener};
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::{connect_closed_port, require_root, tcp_pair, wait_until};

    #[test]
    fn sysctl_keys() {
        assert_eq!(
            sysctl_path("net.ipv4.tcp_syncookies").expect("valid"),
            Path::new("/proc/sys/net/ipv4/tcp_syncookies")
        );
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.100/forwarding").expect("valid"),
            Path::new("/proc/sys/net/ipv4/conf/eth0.100/forwarding")
        );
        assert!(sysctl_path("kernel.pid_max").is_err());
        assert!(sysctl_path("net..x").is_err());
        assert!(sysctl_path("net/../kernel/x").is_err());
        assert!(sysctl_path("net").is_err());
    }

    #[test]
    fn namespaces_are_isolated() -> Result<()> {
        if !require_root() {
            return Ok(());
        }
        let host = Netns::current()?;
        let a = Netns::new()?;
        let b = Netns::new()?;
        assert_ne!(a.inode(), b.inode());
        assert_ne!(a.inode(), host.inode());
        assert_ne!(b.inode(), host.inode());
        assert_eq!(a.try_clone()?.inode(), a.inode());

        // run() and enter() put the thread in the namespace; the guard restores it.
        assert_eq!(a.run(Netns::current_inode)??, a.inode());
        {
            let _guard = b.enter()?;
            assert_eq!(Netns::current_inode()?, b.inode());
        }
        assert_eq!(Netns::current_inode()?, host.inode());

        // lo is up: a TCP round trip on 127.0.0.1 works.
        let echoed = a.run(|| -> Result<Vec<u8>> {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let (mut client, mut server) = tcp_pair(&listener)?;
            client.write_all(b"ping")?;
            let mut buf = [0u8; 4];
            server.read_exact(&mut buf)?;
            Ok(buf.to_vec())
        })??;
        assert_eq!(echoed, b"ping");

        // A sysctl set in one namespace changes neither the other nor the host.
        let host_before = host.read_sysctl("net.ipv4.tcp_syncookies")?;
        let b_before = b.read_sysctl("net.ipv4.tcp_syncookies")?;
        a.sysctl("net.ipv4.tcp_syncookies", "2")?;
        assert_eq!(a.read_sysctl("net.ipv4.tcp_syncookies")?, "2");
        assert_eq!(b.read_sysctl("net.ipv4.tcp_syncookies")?, b_before);
        assert_eq!(host.read_sysctl("net.ipv4.tcp_syncookies")?, host_before);
        assert_ne!(b_before, "2", "a fresh namespace starts with the default");

        // Counters follow traffic in their own namespace only.
        let a0 = a.counters()?;
        let b0 = b.counters()?;
        let closed: SocketAddr = "127.0.0.1:9".parse()?;
        assert_eq!(a.run(|| connect_closed_port(closed, 3))??, 3);
        let da = a.counters()?.delta(&a0);
        let db = b.counters()?.delta(&b0);
        assert!(da.get("TcpOutRsts")? >= 1, "TcpOutRsts delta {da:?}");
        assert!(
            da.get("TcpAttemptFails")? >= 1,
            "TcpAttemptFails delta {da:?}"
        );
        assert_eq!(da.get("TcpOutRsts")?, 3);
        assert_eq!(db.get("TcpOutRsts")?, 0);
        assert_eq!(db.get("TcpAttemptFails")?, 0);
        assert!(a0.get("TcpExtListenOverflows").is_ok());
        assert!(a0.get("TcpExtTCPReqQFullDoCookies").is_ok());
        assert!(a0.get("NoSuchCounter").is_err());

        // sockstat: a connection the client closes first leaves one TIME_WAIT socket.
        let s0 = a.sockstat()?;
        assert_eq!(s0.tcp_inuse, 0, "every socket closed");
        assert_eq!(s0.tcp_tw, 1, "the echo pair above left one");
        a.run(|| -> Result<()> {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let (client, mut server) = tcp_pair(&listener)?;
            let inuse = Sockstat::read_current()?.tcp_inuse;
            assert_eq!(inuse, 3, "listener + both ends");
            client.shutdown(Shutdown::Write)?;
            let mut rest = Vec::new();
            server.read_to_end(&mut rest)?;
            drop(client);
            drop(server);
            Ok(())
        })??;
        wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
            Ok(a.sockstat()?.tcp_tw == s0.tcp_tw + 1)
        })?;
        assert_eq!(b.sockstat()?.tcp_tw, 0);
        Ok(())
    }

    #[test]
    fn spawn_runs_inside_and_cleans_up() -> Result<()> {
        if !require_root() {
            return Ok(());
        }
        let Some(sleep) = ["/bin/sleep", "/usr/bin/sleep"]
            .into_iter()
            .find(|p| Path::new(p).exists())
        else {
            eprintln!("skipping: no sleep binary");
            return Ok(());
        };
        let ns = Netns::new()?;
        let mut cmd = Command::new(sleep);
        cmd.arg("30");
        let mut child = ns.spawn(cmd)?;
        let pid = child.pid();
        let child_ns = std::fs::metadata(format!("/proc/{pid}/ns/net"))?;
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&child_ns), ns.inode());
        let status = child.terminate(Duration::from_secs(5))?;
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM)
        );
        // Terminating twice reports the same status and signals nothing.
        assert_eq!(child.terminate(Duration::from_secs(1))?, status);

        // Dropping the guard stops a running child.
        let mut cmd = Command::new(sleep);
        cmd.arg("30");
        let child = ns.spawn(cmd)?;
        let pid = child.pid();
        drop(child);
        assert!(!Path::new(&format!("/proc/{pid}")).exists() || pid_reused(pid));
        Ok(())
    }

    /// Whether `pid` now names some other process than our reaped child (pids can be reused).
    fn pid_reused(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains("(sleep)"))
            .unwrap_or(true)
    }
}
