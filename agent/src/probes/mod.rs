//! Loading and attaching the kernel programs, probe by probe.
//!
//! Each probe names the kernel interface it relies on ([`PROBES`]). Start-up resolves what
//! the running kernel offers; a probe whose interface is missing is reported as down
//! (`sockscope_probe_up 0`, a warning naming why) and the others keep working.

mod kfunc;
pub mod listen;
pub mod ports;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use agent_common::KernelLayout;
use aya::{
    Ebpf, EbpfLoader,
    maps::Map,
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, FEntry, RawTracePoint,
        TracePoint,
    },
};

use crate::kernel::{self, btf::KernelBtf, layout, tracefs::Format};

/// The compiled kernel programs, built by build.rs from agent-ebpf.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockscope"));

/// Where a probe attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// fentry on a kernel function (BPF trampoline; needs a kernel that permits it).
    Fentry(&'static str),
    /// A BTF tracepoint (`tp_btf`): the raw tracepoint's arguments with their kernel types,
    /// so the program reads fields with plain loads instead of helper calls (cheapest).
    BtfTracepoint(&'static str),
    /// A raw tracepoint: the `TP_PROTO` arguments, no record formatted (cheapest).
    RawTracepoint(&'static str),
    /// A classic tracepoint: category and name.
    Tracepoint(&'static str, &'static str),
    /// cgroup_skb ingress at the root of the cgroup v2 hierarchy.
    CgroupSkbIngress,
}

impl Hook {
    /// The `--probe.mode` family this hook belongs to.
    pub fn mode(&self) -> ProbeMode {
        match self {
            Self::Fentry(_) => ProbeMode::Fentry,
            Self::BtfTracepoint(_) => ProbeMode::BtfTracepoint,
            Self::RawTracepoint(_) => ProbeMode::RawTracepoint,
            Self::Tracepoint(..) => ProbeMode::Tracepoint,
            Self::CgroupSkbIngress => ProbeMode::Auto,
        }
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fentry(n) => write!(f, "fentry {n}"),
            Self::BtfTracepoint(n) => write!(f, "BTF tracepoint {n}"),
            Self::RawTracepoint(n) => write!(f, "raw tracepoint {n}"),
            Self::Tracepoint(c, n) => write!(f, "tracepoint {c}:{n}"),
            Self::CgroupSkbIngress => write!(f, "cgroup_skb ingress at the cgroup v2 root"),
        }
    }
}

/// Which kind of hook the probes may use (`--probe.mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeMode {
    /// The cheapest hook the kernel offers, falling back to the next.
    #[default]
    Auto,
    /// BTF tracepoints only (where a probe has that path).
    #[value(name = "btf_tracepoint")]
    BtfTracepoint,
    /// Raw tracepoints only (where a probe has that path).
    #[value(name = "raw_tracepoint")]
    RawTracepoint,
    /// Classic tracepoints only (where a probe has that path).
    Tracepoint,
    /// fentry where a probe has that path; the other probes take their usual paths.
    Fentry,
}

impl ProbeMode {
    /// The label value of a path of this kind.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Auto => "cgroup_skb",
            Self::BtfTracepoint => "btf_tracepoint",
            Self::RawTracepoint => "raw_tracepoint",
            Self::Tracepoint => "tracepoint",
            Self::Fentry => "fentry",
        }
    }

    /// A forced mode binds the probes that have a path of its kind; the others keep their
    /// own choice.
    fn allows(&self, spec: &ProbeSpec, hook: Hook) -> bool {
        if !spec.paths.iter().any(|p| p.hook.mode() == *self) {
            return true;
        }
        *self == Self::Auto || hook.mode() == Self::Auto || hook.mode() == *self
    }
}

/// One way of running a probe: a program on a hook.
#[derive(Clone, Copy, Debug)]
pub struct ProbePath {
    /// Program name in the object.
    pub program: &'static str,
    /// Where it attaches.
    pub hook: Hook,
    /// Fills the offsets this path reads.
    resolve: fn(&Resolver, &mut KernelLayout) -> Result<(), String>,
    /// Further programs the path needs, all attached or none.
    pub also: &'static [(&'static str, Hook)],
}

/// One probe: what it counts, and the paths to it in order of preference.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSpec {
    /// Value of the `probe` label.
    pub name: &'static str,
    /// Collectors whose metrics depend on it; it is left out when all are disabled.
    pub collectors: &'static [&'static str],
    /// What the kernel must offer, for `sockscope check` and the docs.
    pub needs: &'static str,
    /// Alternatives, preferred first.
    pub paths: &'static [ProbePath],
}

fn e(err: impl ToString) -> String {
    err.to_string()
}

/// Every probe the agent knows, in attach order.
pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        name: "listen_track",
        collectors: &["resets", "listen", "timewait"],
        needs: "tracepoint sock:inet_sock_set_state (Linux 4.16)",
        paths: &[
            ProbePath {
                program: "lsn_track_btf",
                also: &[],
                hook: Hook::BtfTracepoint("inet_sock_set_state"),
                resolve: |r, l| {
                    layout::raw_offsets(r.btf()?, l).map_err(e)?;
                    layout::raw_set_state(&r.raw_args("inet_sock_set_state")?).map_err(e)
                },
            },
            ProbePath {
                program: "lsn_track_raw",
                also: &[],
                hook: Hook::RawTracepoint("inet_sock_set_state"),
                resolve: |r, l| {
                    layout::raw_offsets(r.btf()?, l).map_err(e)?;
                    layout::raw_set_state(&r.raw_args("inet_sock_set_state")?).map_err(e)
                },
            },
            ProbePath {
                program: "lsn_track_tp",
                also: &[],
                hook: Hook::Tracepoint("sock", "inet_sock_set_state"),
                resolve: |r, l| {
                    layout::set_state(&r.format("sock:inet_sock_set_state")?, l).map_err(e)
                },
            },
        ],
    },
    ProbeSpec {
        name: "rst_send",
        collectors: &["resets"],
        needs: "tracepoint tcp:tcp_send_reset with `reason` (Linux 6.10), else fentry on tcp_send_active_reset, tcp_v4_send_reset and tcp_v6_send_reset (no reason)",
        paths: &[
            ProbePath {
                program: "rst_send_btf",
                also: &[],
                hook: Hook::BtfTracepoint("tcp_send_reset"),
                resolve: |r, l| {
                    layout::raw_offsets(r.btf()?, l).map_err(e)?;
                    layout::raw_send_reset(&r.raw_args("tcp_send_reset")?, l).map_err(e)
                },
            },
            ProbePath {
                program: "rst_send_raw",
                also: &[],
                hook: Hook::RawTracepoint("tcp_send_reset"),
                resolve: |r, l| {
                    layout::raw_offsets(r.btf()?, l).map_err(e)?;
                    layout::raw_send_reset(&r.raw_args("tcp_send_reset")?, l).map_err(e)
                },
            },
            ProbePath {
                program: "rst_send_tp",
                also: &[],
                hook: Hook::Tracepoint("tcp", "tcp_send_reset"),
                resolve: |r, l| layout::send_reset(&r.format("tcp:tcp_send_reset")?, l).map_err(e),
            },
            // Last: it has no reset reason. Before 6.10, where the tracepoint misses resets
            // sent without a full socket, it is the exact path.
            ProbePath {
                program: "rst_send_active_fentry",
                also: &[
                    ("rst_send_v4_fentry", Hook::Fentry("tcp_v4_send_reset")),
                    ("rst_send_v6_fentry", Hook::Fentry("tcp_v6_send_reset")),
                ],
                hook: Hook::Fentry("tcp_send_active_reset"),
                resolve: |r, l| layout::raw_offsets(r.btf()?, l).map_err(e),
            },
        ],
    },
    ProbeSpec {
        name: "rst_recv",
        collectors: &["resets"],
        needs: "fentry on tcp_reset where the kernel permits it, else tracepoint tcp:tcp_receive_reset (Linux 4.15)",
        paths: &[
            ProbePath {
                program: "rst_recv_fentry",
                also: &[],
                hook: Hook::Fentry("tcp_reset"),
                resolve: |r, _| r.btf().map(|_| ()),
            },
            ProbePath {
                program: "rst_recv_btf",
                also: &[],
                hook: Hook::BtfTracepoint("tcp_receive_reset"),
                resolve: |r, _| {
                    layout::raw_sock_first("tcp_receive_reset", &r.raw_args("tcp_receive_reset")?)
                        .map_err(e)
                },
            },
            ProbePath {
                program: "rst_recv_raw",
                also: &[],
                hook: Hook::RawTracepoint("tcp_receive_reset"),
                resolve: |r, _| {
                    layout::raw_sock_first("tcp_receive_reset", &r.raw_args("tcp_receive_reset")?)
                        .map_err(e)
                },
            },
            ProbePath {
                program: "rst_recv_tp",
                also: &[],
                hook: Hook::Tracepoint("tcp", "tcp_receive_reset"),
                resolve: |r, l| {
                    layout::receive_reset(&r.format("tcp:tcp_receive_reset")?, l).map_err(e)
                },
            },
        ],
    },
    ProbeSpec {
        name: "listen_ingress",
        collectors: &["listen"],
        needs: "cgroup v2 with cgroup_skb programs and bpf_link (Linux 5.7), BTF for struct sock and struct net",
        paths: &[ProbePath {
            program: "lsn_ingress",
            also: &[],
            hook: Hook::CgroupSkbIngress,
            resolve: |r, l| {
                r.cgroup2.as_ref().map_err(Clone::clone)?;
                layout::listener_offsets(r.btf()?, l).map_err(e)
            },
        }],
    },
    ProbeSpec {
        name: "listen_ack_drop",
        collectors: &["listen"],
        needs: "tracepoint skb:kfree_skb with `rx_sk` (Linux 6.11) and drop reason TCP_LISTEN_OVERFLOW, else fentry on tcp_v4_syn_recv_sock and tcp_v6_syn_recv_sock",
        paths: &[
            ProbePath {
                program: "lsn_ackdrop_raw",
                also: &[],
                hook: Hook::RawTracepoint("kfree_skb"),
                resolve: |r, l| {
                    layout::raw_kfree_skb(r.btf()?, &r.raw_args("kfree_skb")?, l).map_err(e)
                },
            },
            ProbePath {
                program: "lsn_ackdrop_tp",
                also: &[],
                hook: Hook::Tracepoint("skb", "kfree_skb"),
                resolve: |r, l| {
                    layout::kfree_skb(r.btf().ok(), &r.format("skb:kfree_skb")?, l).map_err(e)
                },
            },
            // Last: it reads the accept queue an instant before the kernel does, where the
            // tracepoints report the kernel's own decision.
            ProbePath {
                program: "lsn_ackdrop_v4_fentry",
                also: &[(
                    "lsn_ackdrop_v6_fentry",
                    Hook::Fentry("tcp_v6_syn_recv_sock"),
                )],
                hook: Hook::Fentry("tcp_v4_syn_recv_sock"),
                resolve: |r, l| {
                    let btf = r.btf()?;
                    layout::raw_offsets(btf, l).map_err(e)?;
                    layout::listener_offsets(btf, l).map_err(e)
                },
            },
        ],
    },
    ProbeSpec {
        name: "listen_synack",
        collectors: &["listen"],
        needs: "tracepoint tcp:tcp_retransmit_synack (Linux 4.15)",
        paths: &[
            ProbePath {
                program: "lsn_synack_raw",
                also: &[],
                hook: Hook::RawTracepoint("tcp_retransmit_synack"),
                resolve: |r, _| {
                    layout::raw_sock_first(
                        "tcp_retransmit_synack",
                        &r.raw_args("tcp_retransmit_synack")?,
                    )
                    .map_err(e)
                },
            },
            ProbePath {
                program: "lsn_synack_tp",
                also: &[],
                hook: Hook::Tracepoint("tcp", "tcp_retransmit_synack"),
                resolve: |r, l| {
                    layout::retransmit_synack(&r.format("tcp:tcp_retransmit_synack")?, l).map_err(e)
                },
            },
        ],
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

    /// A raw tracepoint's argument types.
    fn raw_args(&self, tracepoint: &str) -> Result<Vec<String>, String> {
        self.btf()?.tracepoint_args(tracepoint).map_err(e)
    }
}

/// Whether one probe works, and why not.
#[derive(Clone, Debug)]
pub struct ProbeStatus {
    /// The probe.
    pub spec: ProbeSpec,
    /// Attached and counting.
    pub up: bool,
    /// The path attached, when up.
    pub path: Option<ProbePath>,
    /// The kernel's id of the attached program (for its run statistics).
    pub program_id: Option<u32>,
    /// Why it is down, or what it attached to.
    pub detail: String,
}

/// Errors that stop every probe at once.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The kernel refused the object (no BPF, no capability, verifier).
    #[error("loading the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    /// The object could not be prepared for this kernel.
    #[error("{0}")]
    Object(String),
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

/// One path of a probe and whether this kernel offers it (else why not).
pub type PathSupport = (ProbePath, Result<(), String>);

/// What the running kernel offers for the probes, resolved without loading anything.
pub struct KernelSupport {
    /// The layout to hand to the programs.
    pub layout: KernelLayout,
    /// Per probe and path: `Ok(())` when its interface exists, else why not.
    pub probes: Vec<(ProbeSpec, Vec<PathSupport>)>,
    /// Names of `enum sk_rst_reason` values.
    pub reset_reasons: HashMap<u8, String>,
    /// Where tracefs is.
    pub tracefs: Option<PathBuf>,
    /// Where the cgroup v2 root is.
    pub cgroup2: Option<PathBuf>,
    /// Whether `listen_track` counts TIME_WAIT entries: the `timewait` collector is on and
    /// the offsets it reads resolved (else why not).
    pub timewait: Result<(), String>,
    /// The BTF id of `bpf_rdonly_cast`, through which the programs read kernel memory with
    /// plain loads (else why they read through the helper).
    pub rdonly_cast: Result<u32, String>,
}

impl KernelSupport {
    /// Resolves BTF offsets and tracepoint layouts. Never fails: what is missing makes the
    /// probes that need it unavailable, with the reason.
    pub fn probe(disabled: &[&str], paths: &Paths, mode: ProbeMode) -> Self {
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
        layout.synq_full_at_limit = u32::from(kernel::synq_full_at_limit());
        let rdonly_cast = resolver
            .btf()
            .and_then(|b| layout::cast_types(b, &mut layout));
        let timewait = if disabled.contains(&"timewait") {
            Err("collector timewait is disabled".to_string())
        } else {
            resolver
                .btf()
                .and_then(|b| layout::timewait_offsets(b, &mut layout).map_err(|e| e.to_string()))
        };
        let probes = PROBES
            .iter()
            .map(|spec| {
                let off = spec.collectors.iter().all(|c| disabled.contains(c));
                let paths = spec
                    .paths
                    .iter()
                    .map(|path| {
                        let available = if off {
                            Err(format!(
                                "collector {} is disabled",
                                spec.collectors.join(", ")
                            ))
                        } else if !mode.allows(spec, path.hook) {
                            Err(format!("--probe.mode={} excludes it", mode.label()))
                        } else {
                            structs
                                .clone()
                                .and_then(|()| (path.resolve)(&resolver, &mut layout))
                        };
                        (*path, available)
                    })
                    .collect();
                (*spec, paths)
            })
            .collect();
        tracing::debug!(?layout, "kernel layout resolved");
        let send_format = resolver.format("tcp:tcp_send_reset").ok();
        let reset_reasons = layout::reset_reasons(resolver.btf.as_ref().ok(), send_format.as_ref());
        Self {
            layout,
            probes,
            reset_reasons,
            tracefs: resolver.tracefs.ok(),
            cgroup2: resolver.cgroup2.ok(),
            timewait,
            rdonly_cast,
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
    /// Whether `listen_track` counts TIME_WAIT entries (else why not).
    pub timewait: Result<(), String>,
    _logger_task: Option<tokio::task::JoinHandle<()>>,
}

impl Probes {
    /// Loads the object with the resolved layout and attaches every available probe.
    pub fn load(support: KernelSupport, watching: bool) -> Result<Self, ProbeError> {
        if EBPF_OBJECT.is_empty() {
            return Err(ProbeError::NoObject);
        }
        raise_memlock_limit();
        let object = kfunc::link(EBPF_OBJECT, support.rdonly_cast.as_ref().ok().copied())
            .map_err(ProbeError::Object)?;
        match &support.rdonly_cast {
            Ok(_) => tracing::debug!(
                calls = object.calls,
                "programs read kernel memory with plain loads ({})",
                layout::RDONLY_CAST
            ),
            Err(why) => {
                tracing::info!("programs read kernel memory through bpf_probe_read_kernel: {why}")
            }
        }
        let mut ebpf = EbpfLoader::new()
            .override_global("LAYOUT", &support.layout, true)
            .override_global("WATCH_ANY", &u32::from(watching), true)
            .override_global("TIMEWAIT_ON", &u32::from(support.timewait.is_ok()), true)
            .load(object.bytes())?;
        let logger_task = forward_kernel_log(&mut ebpf);
        let cgroup2 = support.cgroup2.clone();
        let status = support
            .probes
            .into_iter()
            .map(|(spec, paths)| {
                // The first path that resolves and attaches wins; the reasons of the others
                // are kept for the message when none does.
                let mut reasons = Vec::new();
                for (path, available) in paths {
                    let result =
                        available.and_then(|()| attach_all(&mut ebpf, &path, cgroup2.as_deref()));
                    match result {
                        Ok(program_id) => {
                            tracing::debug!(probe = spec.name, "attached to {}", path.hook);
                            return ProbeStatus {
                                spec,
                                up: true,
                                path: Some(path),
                                program_id,
                                detail: format!("attached to {}", path.hook),
                            };
                        }
                        Err(why) => reasons.push(format!("{}: {why}", path.hook)),
                    }
                }
                let detail = reasons.join("; ");
                tracing::warn!(probe = spec.name, "probe unavailable: {detail}");
                ProbeStatus {
                    spec,
                    up: false,
                    path: None,
                    program_id: None,
                    detail,
                }
            })
            .collect();
        Ok(Self {
            ebpf,
            status,
            reset_reasons: support.reset_reasons,
            timewait: support.timewait,
            _logger_task: logger_task,
        })
    }

    /// A second handle on a hash map of the object (for the upkeep that removes dead
    /// namespaces' entries while a collector owns the first); taken before the map is.
    pub fn second_handle(&self, name: &str) -> Option<Map> {
        let map = self.ebpf.map(name)?;
        let data = match map {
            Map::PerCpuHashMap(d) | Map::HashMap(d) => d,
            _ => return None,
        };
        let data = aya::maps::MapData::from_id(data.info().ok()?.id()).ok()?;
        Some(match map {
            Map::PerCpuHashMap(_) => Map::PerCpuHashMap(data),
            _ => Map::HashMap(data),
        })
    }

    /// Second handles on the hash maps of `names` (object name, `map` label) that exist,
    /// for watching their fill; taken before the collectors take the maps.
    pub fn watched_maps(
        &self,
        names: &[(&str, &'static str)],
    ) -> Vec<crate::metrics::ebpf::WatchedMap> {
        names
            .iter()
            .filter_map(|(name, label)| {
                let id = match self.ebpf.map(name)? {
                    Map::PerCpuHashMap(d) | Map::HashMap(d) => d.info().ok()?.id(),
                    _ => return None,
                };
                let map = aya::maps::MapData::from_id(id).ok()?;
                Some(crate::metrics::ebpf::WatchedMap { label, map })
            })
            .collect()
    }

    /// Takes a map out of the object, for a collector to own.
    pub fn take_map(&mut self, name: &str) -> Option<Map> {
        self.ebpf.take_map(name)
    }

    /// A program of the object, for a caller that attaches it itself (socket filters).
    pub fn program_mut(&mut self, name: &str) -> Option<&mut aya::programs::Program> {
        self.ebpf.program_mut(name)
    }

    /// The path `probe` is attached through.
    pub fn path_of(&self, probe: &str) -> Option<ProbePath> {
        self.status
            .iter()
            .find(|s| s.spec.name == probe)
            .and_then(|s| s.path)
    }

    /// `(program name, kernel id)` of every attached program.
    pub fn program_ids(&self) -> Vec<(&'static str, u32)> {
        self.status
            .iter()
            .filter_map(|s| Some((s.path?.program, s.program_id?)))
            .collect()
    }

    /// Whether `probe` is attached.
    pub fn is_up(&self, probe: &str) -> bool {
        self.status.iter().any(|s| s.spec.name == probe && s.up)
    }
}

/// Attaches the path's program and its `also` programs; on a failure, unloads (detaches)
/// those already attached, so that no half of a path counts.
fn attach_all(
    ebpf: &mut Ebpf,
    path: &ProbePath,
    cgroup2: Option<&Path>,
) -> Result<Option<u32>, String> {
    let mut done: Vec<&'static str> = Vec::new();
    let mut result = Ok(None);
    for (program, hook) in
        std::iter::once((path.program, path.hook)).chain(path.also.iter().copied())
    {
        match attach(ebpf, program, hook, cgroup2) {
            Ok(id) => {
                if program == path.program {
                    result = Ok(id);
                }
                done.push(program);
            }
            Err(err) => {
                for name in done {
                    if let Some(p) = ebpf.program_mut(name) {
                        let _ = unload(p);
                    }
                }
                return Err(format!(
                    "{program} on {hook}: {}",
                    with_causes(err.as_ref())
                ));
            }
        }
    }
    result
}

/// An error with its causes, outermost first (aya's syscall errors name the call and leave
/// the errno to their source).
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}

fn unload(program: &mut aya::programs::Program) -> Result<(), aya::programs::ProgramError> {
    match program {
        aya::programs::Program::FEntry(p) => p.unload(),
        aya::programs::Program::RawTracePoint(p) => p.unload(),
        aya::programs::Program::TracePoint(p) => p.unload(),
        aya::programs::Program::CgroupSkb(p) => p.unload(),
        _ => Ok(()),
    }
}

fn attach(
    ebpf: &mut Ebpf,
    name: &str,
    hook: Hook,
    cgroup2: Option<&Path>,
) -> Result<Option<u32>, Box<dyn std::error::Error>> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| format!("program {name} missing from the object"))?;
    match hook {
        Hook::BtfTracepoint(name) => {
            let btf = aya::Btf::from_sys_fs()?;
            let program: &mut BtfTracePoint = program.try_into()?;
            program.load(name, &btf)?;
            program.attach()?;
        }
        Hook::Fentry(function) => {
            let btf = aya::Btf::from_sys_fs()?;
            let program: &mut FEntry = program.try_into()?;
            program.load(function, &btf)?;
            program.attach()?;
        }
        Hook::RawTracepoint(name) => {
            let program: &mut RawTracePoint = program.try_into()?;
            program.load()?;
            program.attach(name)?;
        }
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
            // Only through bpf_link (Linux 5.7+): such an attachment goes away with the
            // agent, even on SIGKILL, and coexists with other multi-attached programs on the
            // cgroup (the multi flag belongs to the legacy prog_attach path, which outlives
            // the process, and bpf_link_create refuses it with EINVAL).
            if kernel::release_below(5, 7) {
                return Err(
                    "cgroup programs need bpf_link (Linux 5.7); older attachments would outlive the agent".into(),
                );
            }
            program.attach(
                &cgroup,
                CgroupSkbAttachType::Ingress,
                CgroupAttachMode::Single,
            )?;
        }
    }
    // The id names the program in the kernel's run statistics; not having it is no failure.
    let id = ebpf
        .program(name)
        .and_then(|p| p.info().ok())
        .map(|info| info.id());
    Ok(id)
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
