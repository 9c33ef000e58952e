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
use aya::{Ebpf, EbpfLoader, maps::Map, programs::TracePoint};

use crate::kernel::{self, KernelError, btf::KernelBtf, layout, tracefs::Format};

/// The compiled kernel programs, built by build.rs from agent-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockscope"));

/// One probe: a program and the kernel interface it attaches to.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSpec {
    /// Value of the `probe` label; also the program's name.
    pub name: &'static str,
    /// Tracepoint category and name.
    pub tracepoint: (&'static str, &'static str),
    /// Collector whose metrics depend on it.
    pub collector: &'static str,
    /// What the kernel must offer, for `sockscope check` and the docs.
    pub needs: &'static str,
    /// Fills the record offsets this probe reads.
    resolve: fn(&Format, &mut KernelLayout) -> Result<(), KernelError>,
}

/// Every probe the agent knows, in attach order.
pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        name: "listen_track",
        tracepoint: ("sock", "inet_sock_set_state"),
        collector: "resets",
        needs: "tracepoint sock:inet_sock_set_state (Linux 4.16)",
        resolve: layout::set_state,
    },
    ProbeSpec {
        name: "rst_send",
        tracepoint: ("tcp", "tcp_send_reset"),
        collector: "resets",
        needs: "tracepoint tcp:tcp_send_reset (Linux 4.15; `reason` and resets without a socket since 6.10)",
        resolve: layout::send_reset,
    },
    ProbeSpec {
        name: "rst_recv",
        tracepoint: ("tcp", "tcp_receive_reset"),
        collector: "resets",
        needs: "tracepoint tcp:tcp_receive_reset (Linux 4.15)",
        resolve: layout::receive_reset,
    },
];

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
}

impl KernelSupport {
    /// Resolves BTF offsets and tracepoint layouts. Never fails: what is missing makes the
    /// probes that need it unavailable, with the reason.
    pub fn probe(forced_off: &[&str], tracefs: Option<&Path>) -> Self {
        let mut layout = KernelLayout::ABSENT;
        let tracefs = kernel::tracefs::tracefs_dir(tracefs);
        let btf = KernelBtf::load();
        let structs = btf
            .as_ref()
            .map_err(ToString::to_string)
            .and_then(|b| layout::struct_offsets(b, &mut layout).map_err(|e| e.to_string()));
        let mut send_format = None;
        let probes = PROBES
            .iter()
            .map(|spec| {
                let available = (|| {
                    if forced_off.contains(&spec.collector) {
                        return Err(format!("collector {} is disabled", spec.collector));
                    }
                    let dir = tracefs.as_ref().map_err(ToString::to_string)?;
                    structs.clone()?;
                    let format = Format::read(dir, spec.tracepoint.0, spec.tracepoint.1)
                        .map_err(|e| e.to_string())?;
                    (spec.resolve)(&format, &mut layout).map_err(|e| e.to_string())?;
                    if spec.name == "rst_send" {
                        send_format = Some(format);
                    }
                    Ok(())
                })();
                (*spec, available)
            })
            .collect();
        let reset_reasons = layout::reset_reasons(btf.as_ref().ok(), send_format.as_ref());
        Self {
            layout,
            probes,
            reset_reasons,
            tracefs: tracefs.ok(),
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
        let status = support
            .probes
            .into_iter()
            .map(|(spec, available)| {
                let result =
                    available.and_then(|()| attach(&mut ebpf, &spec).map_err(|e| e.to_string()));
                match result {
                    Ok(()) => ProbeStatus {
                        spec,
                        up: true,
                        detail: format!("attached to {}:{}", spec.tracepoint.0, spec.tracepoint.1),
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

fn attach(ebpf: &mut Ebpf, spec: &ProbeSpec) -> Result<(), Box<dyn std::error::Error>> {
    let program: &mut TracePoint = ebpf
        .program_mut(spec.name)
        .ok_or_else(|| format!("program {} missing from the object", spec.name))?
        .try_into()?;
    program.load()?;
    program.attach(spec.tracepoint.0, spec.tracepoint.1)?;
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
