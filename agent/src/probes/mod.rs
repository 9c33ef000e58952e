//! Loading and attaching the kernel programs, probe by probe.
//!
//! Each probe names the kernel interface it relies on ([`PROBES`]). Start-up resolves what
//! the running kernel offers; a probe whose interface is missing is reported as down
//! (`sockscope_probe_up 0`, a warning naming why) and the others keep working.

pub mod ports;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use agent_common::KernelLayout;
use aya::{
    Ebpf, EbpfLoader,
    maps::Map,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, TracePoint},
};

use crate::kernel::{self, btf::KernelBtf, layout, tracefs::Format};

/// The compiled kernel programs, built by build.rs from agent-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockscope"));

/// Where a probe attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// A classic tracepoint: category and name.
    Tracepoint(&'static str, &'static str),
    /// cgroup_skb ingress at the root of the cgroup v2 hierarchy.
    CgroupSkbIngress,
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tracepoint(c, n) => write!(f, "tracepoint {c}:{n}"),
            Self::CgroupSkbIngress => write!(f, "cgroup_skb ingress at the cgroup v2 root"),
        }
    }
}

/// One probe: a program and the kernel interface it attaches to.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSpec {
    /// Value of the `probe` label; also the program's name.
    pub name: &'static str,
    /// Where it attaches.
    pub hook: Hook,
    /// Collectors whose metrics depend on it; it is left out when all are disabled.
    pub collectors: &'static [&'static str],
    /// What the kernel must offer, for `sockscope check` and the docs.
    pub needs: &'static str,
    /// Fills the offsets this probe reads.
    resolve: fn(&Resolver, &mut KernelLayout) -> Result<(), String>,
}

/// Every probe the agent knows, in attach order.
pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        name: "listen_track",
        hook: Hook::Tracepoint("sock", "inet_sock_set_state"),
        collectors: &["resets", "listen"],
        needs: "tracepoint sock:inet_sock_set_state (Linux 4.16)",
        resolve: |r, l| {
            layout::set_state(&r.format("sock:inet_sock_set_state")?, l).map_err(|e| e.to_string())
        },
    },
    ProbeSpec {
        name: "rst_send",
        hook: Hook::Tracepoint("tcp", "tcp_send_reset"),
        collectors: &["resets"],
        needs: "tracepoint tcp:tcp_send_reset (Linux 4.15; `reason` and resets without a socket since 6.10)",
        resolve: |r, l| {
            layout::send_reset(&r.format("tcp:tcp_send_reset")?, l).map_err(|e| e.to_string())
        },
    },
    ProbeSpec {
        name: "rst_recv",
        hook: Hook::Tracepoint("tcp", "tcp_receive_reset"),
        collectors: &["resets"],
        needs: "tracepoint tcp:tcp_receive_reset (Linux 4.15)",
        resolve: |r, l| {
            layout::receive_reset(&r.format("tcp:tcp_receive_reset")?, l).map_err(|e| e.to_string())
        },
    },
    ProbeSpec {
        name: "listen_ingress",
        hook: Hook::CgroupSkbIngress,
        collectors: &["listen"],
        needs: "cgroup v2 with cgroup_skb programs and bpf_link (Linux 5.7), BTF for struct sock and struct net",
        resolve: |r, l| {
            r.cgroup2.as_ref().map_err(Clone::clone)?;
            layout::listener_offsets(r.btf()?, l).map_err(|e| e.to_string())
        },
    },
    ProbeSpec {
        name: "listen_ack_drop",
        hook: Hook::Tracepoint("skb", "kfree_skb"),
        collectors: &["listen"],
        needs: "tracepoint skb:kfree_skb with `rx_sk` (Linux 6.11) and drop reason TCP_LISTEN_OVERFLOW",
        resolve: |r, l| {
            let format = r.format("skb:kfree_skb")?;
            layout::kfree_skb(r.btf().ok(), &format, l).map_err(|e| e.to_string())
        },
    },
    ProbeSpec {
        name: "listen_synack",
        hook: Hook::Tracepoint("tcp", "tcp_retransmit_synack"),
        collectors: &["listen"],
        needs: "tracepoint tcp:tcp_retransmit_synack (Linux 4.15)",
        resolve: |r, l| {
            layout::retransmit_synack(&r.format("tcp:tcp_retransmit_synack")?, l)
                .map_err(|e| e.to_string())
        },
    },
];

/// What start-up found out about the kernel, for the probes' `resolve`.
pub struct Resolver {
    tracefs: Result<PathBuf, String>,
    btf: Result<KernelBtf, String>,
    cgroup2: Result<PathBuf, String>,
}

impl Resolver {
    /// A tracepoint's format.
    fn format(&self, tracepoint: &str) -> Result<Format, String> {
        let dir = self.tracefs.as_ref().map_err(Clone::clone)?;
        layout::format(dir, tracepoint).map_err(|e| e.to_string())
    }

    fn btf(&self) -> Result<&KernelBtf, String> {
        self.btf.as_ref().map_err(Clone::clone)
    }
}

/// Whether one probe works, and why not.
#[derive(Clone, Debug)]
pub struct ProbeStatus {
    /// The probe.
    pub spec: ProbeSpec,
    /// Attached and counting.
    pub up: bool,
    /// Why it is down, or what it attached to.
    pub detail: String,
}

/// Errors that stop every probe at once.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The kernel refused the object (no BPF, no capability, verifier).
    #[error("loading the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    /// The object built without the eBPF step (AYA_BUILD_SKIP).
    #[error(
        "this binary was built without its kernel programs (AYA_BUILD_SKIP); rebuild with `cargo xtask build`"
    )]
    NoObject,
}

/// Where the agent finds the kernel's interfaces; `None` means find them.
#[derive(Clone, Debug, Default)]
pub struct Paths {
    /// tracefs.
    pub tracefs: Option<PathBuf>,
    /// The root of the cgroup v2 hierarchy.
    pub cgroup2: Option<PathBuf>,
}

/// What the running kernel offers for the probes, resolved without loading anything.
pub struct KernelSupport {
    /// The layout to hand to the programs.
    pub layout: KernelLayout,
    /// Per probe: `Ok(())` when its interface exists, else why not.
    pub probes: Vec<(ProbeSpec, Result<(), String>)>,
    /// Names of `enum sk_rst_reason` values.
    pub reset_reasons: HashMap<u8, String>,
    /// Where tracefs is.
    pub tracefs: Option<PathBuf>,
    /// Where the cgroup v2 root is.
    pub cgroup2: Option<PathBuf>,
}

impl KernelSupport {
    /// Resolves BTF offsets and tracepoint layouts. Never fails: what is missing makes the
    /// probes that need it unavailable, with the reason.
    pub fn probe(disabled: &[&str], paths: &Paths) -> Self {
        let mut layout = KernelLayout::ABSENT;
        let resolver = Resolver {
            tracefs: kernel::tracefs::tracefs_dir(paths.tracefs.as_deref())
                .map_err(|e| e.to_string()),
            btf: KernelBtf::load().map_err(|e| e.to_string()),
            cgroup2: kernel::cgroup::cgroup2_root(paths.cgroup2.as_deref())
                .map_err(|e| e.to_string()),
        };
        let structs = resolver
            .btf()
            .and_then(|b| layout::struct_offsets(b, &mut layout).map_err(|e| e.to_string()));
        layout.synq_full_at_limit = u32::from(kernel::release_below(6, 14));
        let probes = PROBES
            .iter()
            .map(|spec| {
                let available = if spec.collectors.iter().all(|c| disabled.contains(c)) {
                    Err(format!(
                        "collector {} is disabled",
                        spec.collectors.join(", ")
                    ))
                } else {
                    structs
                        .clone()
                        .and_then(|()| (spec.resolve)(&resolver, &mut layout))
                };
                (*spec, available)
            })
            .collect();
        let send_format = resolver.format("tcp:tcp_send_reset").ok();
        let reset_reasons = layout::reset_reasons(resolver.btf.as_ref().ok(), send_format.as_ref());
        Self {
            layout,
            probes,
            reset_reasons,
            tracefs: resolver.tracefs.ok(),
            cgroup2: resolver.cgroup2.ok(),
        }
    }
}

/// The loaded programs and their maps. Dropping it detaches every program.
pub struct Probes {
    ebpf: Ebpf,
    /// Per probe, whether it is attached.
    pub status: Vec<ProbeStatus>,
    /// Names of `enum sk_rst_reason` values on this kernel.
    pub reset_reasons: HashMap<u8, String>,
    _logger_task: Option<tokio::task::JoinHandle<()>>,
}

impl Probes {
    /// Loads the object with the resolved layout and attaches every available probe.
    pub fn load(support: KernelSupport) -> Result<Self, ProbeError> {
        if EBPF_OBJECT.is_empty() {
            return Err(ProbeError::NoObject);
        }
        raise_memlock_limit();
        let mut ebpf = EbpfLoader::new()
            .override_global("LAYOUT", &support.layout, true)
            .load(EBPF_OBJECT)?;
        let logger_task = forward_kernel_log(&mut ebpf);
        let cgroup2 = support.cgroup2.clone();
        let status = support
            .probes
            .into_iter()
            .map(|(spec, available)| {
                let result = available.and_then(|()| {
                    attach(&mut ebpf, &spec, cgroup2.as_deref()).map_err(|e| e.to_string())
                });
                match result {
                    Ok(()) => ProbeStatus {
                        spec,
                        up: true,
                        detail: format!("attached to {}", spec.hook),
                    },
                    Err(detail) => {
                        tracing::warn!(probe = spec.name, "probe unavailable: {detail}");
                        ProbeStatus {
                            spec,
                            up: false,
                            detail,
                        }
                    }
                }
            })
            .collect();
        Ok(Self {
            ebpf,
            status,
            reset_reasons: support.reset_reasons,
            _logger_task: logger_task,
        })
    }

    /// Takes a map out of the object, for a collector to own.
    pub fn take_map(&mut self, name: &str) -> Option<Map> {
        self.ebpf.take_map(name)
    }

    /// Whether `probe` is attached.
    pub fn is_up(&self, probe: &str) -> bool {
        self.status.iter().any(|s| s.spec.name == probe && s.up)
    }
}

fn attach(
    ebpf: &mut Ebpf,
    spec: &ProbeSpec,
    cgroup2: Option<&Path>,
) -> Result<(), Box<dyn std::error::Error>> {
    let program = ebpf
        .program_mut(spec.name)
        .ok_or_else(|| format!("program {} missing from the object", spec.name))?;
    match spec.hook {
        Hook::Tracepoint(category, name) => {
            let program: &mut TracePoint = program.try_into()?;
            program.load()?;
            program.attach(category, name)?;
        }
        Hook::CgroupSkbIngress => {
            let root = cgroup2.ok_or("no cgroup v2 hierarchy")?;
            let cgroup =
                std::fs::File::open(root).map_err(|e| format!("{}: {e}", root.display()))?;
            let program: &mut CgroupSkb = program.try_into()?;
            program.load()?;
            // Through bpf_link (Linux 5.7+) the attachment never displaces or blocks other
            // programs on the same cgroup; the multi flag is for the older prog_attach path
            // only, and bpf_link_create refuses it (EINVAL).
            let mode = if kernel::release_below(5, 7) {
                CgroupAttachMode::AllowMultiple
            } else {
                CgroupAttachMode::Single
            };
            program.attach(&cgroup, CgroupSkbAttachType::Ingress, mode)?;
        }
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Forwards the programs' aya-log records to the agent's log (only inside the agent's
/// runtime: `check` loads the programs without one).
fn forward_kernel_log(ebpf: &mut Ebpf) -> Option<tokio::task::JoinHandle<()>> {
    tokio::runtime::Handle::try_current().ok()?;
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            tracing::debug!("no kernel-side log: {e}");
            return None;
        }
    };
    // SAFETY: the logger owns its ring buffer's fd, and the AsyncFd owns the logger: the fd
    // stays open and the same for the AsyncFd's whole life.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!("cannot poll the kernel-side log: {e}");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        while let Ok(mut guard) = fd.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}
