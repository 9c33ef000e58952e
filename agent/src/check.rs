//! `sockscope check`: one line per feature, available or not and why.

use std::path::Path;

use crate::{
    caps,
    cli::CheckArgs,
    kernel,
    probes::{KernelSupport, Probes},
};

/// One line of the report.
struct Line {
    ok: bool,
    feature: String,
    detail: String,
}

/// Prints the report; `true` when the agent can run at all.
pub fn check(args: &CheckArgs) -> bool {
    let mut lines = Vec::new();
    let missing = caps::missing_required();
    let can_run = missing.is_empty();
    let required: Vec<String> = caps::required()
        .iter()
        .map(|(c, why)| format!("{c} ({why})"))
        .collect();
    lines.push(Line {
        ok: can_run,
        feature: "capabilities".into(),
        detail: if can_run {
            format!("have {}", required.join(", "))
        } else {
            format!(
                "missing {}: needed are {}",
                missing.join(", "),
                required.join(", ")
            )
        },
    });
    for (cap, why) in caps::optional() {
        let ok = caps::has(cap);
        lines.push(Line {
            ok,
            feature: format!("capability {cap}"),
            detail: if ok {
                format!("have it ({why})")
            } else {
                format!("missing: cannot {why}")
            },
        });
    }
    let kept: Vec<String> = caps::KEPT_AFTER_START
        .iter()
        .map(ToString::to_string)
        .collect();
    lines.push(Line {
        ok: true,
        feature: "capabilities after start-up".into(),
        detail: format!(
            "`run` keeps only {} once its programs are attached (and CAP_NET_RAW with --config.file, for socket filters a reload adds), and drops the rest",
            kept.join(", ")
        ),
    });
    lines.push(match kernel::btf::KernelBtf::load() {
        Ok(_) => Line {
            ok: true,
            feature: "btf".into(),
            detail: kernel::btf::VMLINUX_BTF.into(),
        },
        Err(e) => Line {
            ok: false,
            feature: "btf".into(),
            detail: e.to_string(),
        },
    });
    let support = KernelSupport::probe(&[], &args.paths.to_paths(), args.paths.probe_mode);
    lines.push(match &support.tracefs {
        Some(dir) => Line {
            ok: true,
            feature: "tracefs".into(),
            detail: dir.display().to_string(),
        },
        None => Line {
            ok: false,
            feature: "tracefs".into(),
            detail:
                "not mounted and could not be mounted (mount -t tracefs nodev /sys/kernel/tracing)"
                    .into(),
        },
    });
    lines.push(match &support.cgroup2 {
        Some(dir) => Line {
            ok: true,
            feature: "cgroup2".into(),
            detail: dir.display().to_string(),
        },
        None => Line {
            ok: false,
            feature: "cgroup2".into(),
            detail: "no cgroup v2 hierarchy found: listen_ingress (SYN-stage overflows, SYN-queue full) is unavailable; mount one or pass --path.cgroup2".into(),
        },
    });
    lines.push(Line {
        ok: support.timewait.is_ok(),
        feature: "timewait entries".into(),
        detail: match &support.timewait {
            Ok(()) => "listen_track finds timewait sockets in the established hash (BTF offsets resolved)".into(),
            Err(why) => format!("{why}; sockscope_tcp_time_wait_entered_total is unavailable (the gauges are not affected)"),
        },
    });
    // A cost, not a capability: both paths count the same.
    lines.push(Line {
        ok: true,
        feature: "kernel memory reads".into(),
        detail: match &support.rdonly_cast {
            Ok(_) => format!(
                "plain loads, through the kernel function {}",
                kernel::layout::RDONLY_CAST
            ),
            Err(why) => format!(
                "through bpf_probe_read_kernel, a helper call per read ({why}; Linux 6.2 has the kernel function)"
            ),
        },
    });
    // Nothing is pinned, so bpffs is only reported, never required.
    let bpffs = is_mounted(Path::new("/sys/fs/bpf"), "bpf");
    lines.push(Line {
        ok: true,
        feature: "bpffs".into(),
        detail: if bpffs {
            "/sys/fs/bpf (not needed: nothing is pinned)".into()
        } else {
            "not mounted; not needed (nothing is pinned)".into()
        },
    });
    // Attach for real when we may: a probe is only available if the kernel accepts it.
    if can_run {
        let specs: Vec<_> = support.probes.iter().map(|(s, _)| s.name).collect();
        match Probes::load(support, false) {
            Ok(probes) => {
                for status in &probes.status {
                    lines.push(Line {
                        ok: status.up,
                        feature: format!("probe {}", status.spec.name),
                        detail: if status.up {
                            status.detail.clone()
                        } else {
                            format!("{}; needs {}", status.detail, status.spec.needs)
                        },
                    });
                }
                // Dropping `probes` detaches everything again.
            }
            Err(e) => {
                for name in specs {
                    lines.push(Line {
                        ok: false,
                        feature: format!("probe {name}"),
                        detail: e.to_string(),
                    });
                }
            }
        }
    } else {
        for (spec, paths) in &support.probes {
            let usable = paths.iter().find(|(_, a)| a.is_ok());
            lines.push(Line {
                ok: false,
                feature: format!("probe {}", spec.name),
                detail: match usable {
                    Some((path, _)) => {
                        format!(
                            "kernel has {}; not attached without capabilities",
                            path.hook
                        )
                    }
                    None => paths
                        .iter()
                        .filter_map(|(p, a)| {
                            a.as_ref().err().map(|why| format!("{}: {why}", p.hook))
                        })
                        .collect::<Vec<_>>()
                        .join("; "),
                },
            });
        }
    }
    println!(
        "sockscope {} on Linux {}",
        env!("CARGO_PKG_VERSION"),
        kernel::kernel_release()
    );
    let width = lines.iter().map(|l| l.feature.len()).max().unwrap_or(0);
    for line in &lines {
        let mark = if line.ok { "ok" } else { "missing" };
        println!("{mark:<8} {:<width$}  {}", line.feature, line.detail);
    }
    can_run
}

fn is_mounted(dir: &Path, fstype: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let mut f = l.split_whitespace();
            let (_, mountpoint, ty) = (f.next(), f.next(), f.next());
            mountpoint == dir.to_str() && ty == Some(fstype)
        })
    })
}
