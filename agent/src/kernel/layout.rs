//! Resolves [`KernelLayout`] for the running kernel: struct offsets from BTF, record
//! offsets from the tracepoints' format files.

use std::{collections::HashMap, path::Path};

use agent_common::{FIELD_ABSENT, KernelLayout};

use super::{KernelError, btf::KernelBtf, tracefs::Format};

/// Struct offsets every program needs to find a socket's or packet's network namespace.
pub fn struct_offsets(btf: &KernelBtf, layout: &mut KernelLayout) -> Result<(), KernelError> {
    // `skc_net` is a possible_net_t whose only member is the `struct net *`.
    let net_ptr = btf.offset_of("possible_net_t", &["net"]).unwrap_or(0);
    layout.sk_net = btf.offset_of("sock_common", &["skc_net"])? + net_ptr;
    layout.sk_state = btf.offset_of("sock_common", &["skc_state"])?;
    layout.net_inum = btf.offset_of("net", &["ns", "inum"])?;
    layout.skb_dev = btf.offset_of("sk_buff", &["dev"])?;
    layout.dev_net = btf.offset_of("net_device", &["nd_net"])? + net_ptr;
    layout.sk_family = btf.offset_of("sock_common", &["skc_family"])?;
    layout.sk_num = btf.offset_of("sock_common", &["skc_num"])?;
    layout.sk_rcv_saddr = btf.offset_of("sock_common", &["skc_rcv_saddr"])?;
    // Absent on kernels built without IPv6.
    layout.sk_v6_rcv_saddr = btf
        .offset_of("sock_common", &["skc_v6_rcv_saddr"])
        .unwrap_or(FIELD_ABSENT);
    Ok(())
}

/// What the TIME_WAIT count reads at a move to CLOSE (`agent-ebpf/src/timewait.rs`): the
/// connection's identity and the established hash of its namespace.
pub fn timewait_offsets(btf: &KernelBtf, layout: &mut KernelLayout) -> Result<(), KernelError> {
    layout.inet_sport = btf.offset_of("inet_sock", &["inet_sport"])?;
    layout.sk_hash = btf.offset_of("sock_common", &["skc_hash"])?;
    layout.sk_addrpair = btf.offset_of("sock_common", &["skc_addrpair"])?;
    layout.sk_dport = btf.offset_of("sock_common", &["skc_dport"])?;
    layout.sk_v6_daddr = btf
        .offset_of("sock_common", &["skc_v6_daddr"])
        .unwrap_or(FIELD_ABSENT);
    layout.sk_nulls_node = btf.offset_of("sock_common", &["skc_nulls_node"])?;
    // An embedded death row with its own hashinfo pointer: Linux 6.1 and later.
    layout.net_tw_hashinfo = btf.offset_of("net", &["ipv4", "tcp_death_row", "hashinfo"])?;
    layout.hashinfo_ehash = btf.offset_of("inet_hashinfo", &["ehash"])?;
    layout.hashinfo_ehash_mask = btf.offset_of("inet_hashinfo", &["ehash_mask"])?;
    layout.net_port_range = btf.offset_of("net", &["ipv4", "ip_local_ports", "range"])?;
    // Older kernels keep `int range[2]` beside a seqlock; newer ones one packed u32.
    layout.net_port_range_ints = u32::from(btf.offset_of("local_ports", &["lock"]).is_ok());
    Ok(())
}

/// The kernel function that lets programs read kernel memory with plain loads (Linux 6.2).
pub const RDONLY_CAST: &str = "bpf_rdonly_cast";

/// Where the kernel has [`RDONLY_CAST`]: its BTF id, and the ids of the structs the programs
/// read through it filled into `layout`. Otherwise they stay absent and the programs read
/// through `bpf_probe_read_kernel`.
pub fn cast_types(btf: &KernelBtf, layout: &mut KernelLayout) -> Result<u32, String> {
    let kfunc = btf
        .func_id(RDONLY_CAST)
        .ok_or_else(|| format!("this kernel has no kernel function {RDONLY_CAST}"))?;
    let id = |name| btf.struct_id(name).map_err(|e| e.to_string());
    let ids = [
        id("sock")?,
        id("inet_sock")?,
        id("tcp_sock")?,
        id("sock_common")?,
        id("tcphdr")?,
        id("hlist_nulls_node")?,
    ];
    [
        layout.btf_sock,
        layout.btf_inet_sock,
        layout.btf_tcp_sock,
        layout.btf_sock_common,
        layout.btf_tcphdr,
        layout.btf_nulls_node,
    ] = ids;
    Ok(kfunc)
}

/// What the listener program reads of a listening socket and its namespace.
pub fn listener_offsets(btf: &KernelBtf, layout: &mut KernelLayout) -> Result<(), KernelError> {
    layout.sk_ack_backlog = btf.offset_of("sock", &["sk_ack_backlog"])?;
    layout.sk_max_ack_backlog = btf.offset_of("sock", &["sk_max_ack_backlog"])?;
    // `qlen` is an atomic_t, whose only member is the int.
    layout.icsk_qlen = btf.offset_of(
        "inet_connection_sock",
        &["icsk_accept_queue", "qlen", "counter"],
    )?;
    layout.net_syncookies = btf.offset_of("net", &["ipv4", "sysctl_tcp_syncookies"])?;
    Ok(())
}

/// `skb:kfree_skb`: needs `rx_sk` (6.11) and the drop reason `TCP_LISTEN_OVERFLOW`.
pub fn kfree_skb(
    btf: Option<&KernelBtf>,
    format: &Format,
    layout: &mut KernelLayout,
) -> Result<(), KernelError> {
    const TP: &str = "skb:kfree_skb";
    let rx_sk = format.field(TP, "rx_sk")?.offset;
    let reason = format.field(TP, "reason")?.offset;
    layout.reason_listen_overflow = listen_overflow_reason(btf, Some(format))?;
    layout.kfree_rx_sk = rx_sk;
    layout.kfree_reason = reason;
    Ok(())
}

/// `tcp:tcp_retransmit_synack`.
pub fn retransmit_synack(format: &Format, layout: &mut KernelLayout) -> Result<(), KernelError> {
    layout.synack_skaddr = format.field("tcp:tcp_retransmit_synack", "skaddr")?.offset;
    Ok(())
}

/// Why `tcp_send_reset` without a reset reason is no path for `rst_send`: the reason and the
/// call for resets sent without a socket came together in Linux 6.10.
pub const SEND_RESET_BEFORE_6_10: &str = "it carries no reset reason, so this kernel predates \
    Linux 6.10, where resets sent without a socket (a connect to a closed port) do not reach \
    it: its count would fall short of the kernel's OutRsts";

/// `tcp:tcp_send_reset`. Since 6.10 the record holds the local address as a `sockaddr`
/// (`saddr[28]`, port in network order at byte 2) and a `reason`; before, a host-order `sport`
/// and no reason.
pub fn send_reset(format: &Format, layout: &mut KernelLayout) -> Result<(), KernelError> {
    const TP: &str = "tcp:tcp_send_reset";
    layout.rst_send_skaddr = format.field(TP, "skaddr")?.offset;
    layout.rst_send_skbaddr = format.field(TP, "skbaddr")?.offset;
    layout.rst_send_state = format.field(TP, "state")?.offset;
    layout.rst_send_reason = format
        .fields
        .get("reason")
        .ok_or_else(|| KernelError::TracepointLayout {
            tracepoint: TP.into(),
            detail: SEND_RESET_BEFORE_6_10.into(),
        })?
        .offset;
    if let Some(sport) = format.fields.get("sport") {
        layout.rst_send_port = sport.offset;
        layout.rst_send_port_be = 0;
    } else {
        let saddr = format.field(TP, "saddr")?;
        if saddr.size < 16 {
            return Err(KernelError::TracepointLayout {
                tracepoint: TP.into(),
                detail: format!("`saddr` is {} bytes, not a sockaddr", saddr.size),
            });
        }
        layout.rst_send_port = saddr.offset + 2;
        layout.rst_send_port_be = 1;
    }
    Ok(())
}

/// `tcp:tcp_receive_reset`.
pub fn receive_reset(format: &Format, layout: &mut KernelLayout) -> Result<(), KernelError> {
    const TP: &str = "tcp:tcp_receive_reset";
    layout.rst_recv_skaddr = format.field(TP, "skaddr")?.offset;
    layout.rst_recv_port = format.field(TP, "sport")?.offset;
    Ok(())
}

/// `sock:inet_sock_set_state`.
pub fn set_state(format: &Format, layout: &mut KernelLayout) -> Result<(), KernelError> {
    const TP: &str = "sock:inet_sock_set_state";
    layout.state_skaddr = format.field(TP, "skaddr")?.offset;
    layout.state_oldstate = format.field(TP, "oldstate")?.offset;
    layout.state_newstate = format.field(TP, "newstate")?.offset;
    layout.state_sport = format.field(TP, "sport")?.offset;
    layout.state_protocol = format.field(TP, "protocol")?.offset;
    Ok(())
}

/// Names of `enum sk_rst_reason` values on this kernel: from BTF, else from the
/// tracepoint's own print format.
pub fn reset_reasons(btf: Option<&KernelBtf>, format: Option<&Format>) -> HashMap<u8, String> {
    let mut names: HashMap<u8, String> = HashMap::new();
    if let Some(btf) = btf {
        for (value, name) in btf.enum_names("sk_rst_reason", "SK_RST_REASON_") {
            if let Ok(v) = u8::try_from(value) {
                names.insert(v, name);
            }
        }
    }
    if names.is_empty()
        && let Some(format) = format
    {
        for (value, name) in format.symbols("reason") {
            if let Ok(v) = u8::try_from(value) {
                names.insert(v, name);
            }
        }
    }
    names
}

/// Reads a tracepoint's format, tracefs being at `tracefs`.
pub fn format(tracefs: &Path, tracepoint: &str) -> Result<Format, KernelError> {
    let (category, name) = tracepoint.split_once(':').unwrap_or(("", tracepoint));
    Format::read(tracefs, category, name)
}

/// Struct offsets the raw tracepoint programs read beyond [`struct_offsets`].
pub fn raw_offsets(btf: &KernelBtf, layout: &mut KernelLayout) -> Result<(), KernelError> {
    layout.inet_sport = btf.offset_of("inet_sock", &["inet_sport"])?;
    layout.skb_head = btf.offset_of("sk_buff", &["head"])?;
    layout.skb_transport_header = btf.offset_of("sk_buff", &["transport_header"])?;
    // A bitfield before Linux 5.6: then the protocol is not checked.
    layout.sk_protocol = btf
        .offset_of("sock", &["sk_protocol"])
        .unwrap_or(FIELD_ABSENT);
    Ok(())
}

/// Checks that a raw tracepoint's arguments start with `expected` (the positions the
/// programs read; `None` accepts any type there).
fn raw_args_match(
    tracepoint: &str,
    args: &[String],
    expected: &[Option<&str>],
) -> Result<(), KernelError> {
    let ok = args.len() >= expected.len()
        && expected
            .iter()
            .zip(args)
            .all(|(want, have)| want.is_none_or(|w| w == have));
    if ok {
        Ok(())
    } else {
        Err(KernelError::TracepointLayout {
            tracepoint: tracepoint.to_string(),
            detail: format!(
                "arguments ({}) are not ({})",
                args.join(", "),
                expected
                    .iter()
                    .map(|e| e.unwrap_or("_"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }
}

/// Raw `tcp_send_reset(sk, skb[, reason])`: the reason arrived in 6.10.
pub fn raw_send_reset(args: &[String], layout: &mut KernelLayout) -> Result<(), KernelError> {
    raw_args_match(
        "tcp_send_reset",
        args,
        &[Some("struct sock *"), Some("struct sk_buff *")],
    )?;
    if args.get(2).is_none_or(|a| a != "enum sk_rst_reason") {
        return Err(KernelError::TracepointLayout {
            tracepoint: "tcp_send_reset".into(),
            detail: SEND_RESET_BEFORE_6_10.into(),
        });
    }
    layout.raw_send_reason = 2;
    Ok(())
}

/// Checks that argument 0 of a raw tracepoint is the socket the program reads.
pub fn raw_sock_first(tracepoint: &str, args: &[String]) -> Result<(), KernelError> {
    raw_args_match(tracepoint, args, &[Some("struct sock *")])
}

/// Raw `inet_sock_set_state(sk, oldstate, newstate)`.
pub fn raw_set_state(args: &[String]) -> Result<(), KernelError> {
    raw_args_match(
        "inet_sock_set_state",
        args,
        &[Some("struct sock *"), Some("int"), Some("int")],
    )
}

/// Raw `kfree_skb(skb, location, reason, rx_sk)`: `rx_sk` arrived in 6.11.
pub fn raw_kfree_skb(
    btf: &KernelBtf,
    args: &[String],
    layout: &mut KernelLayout,
) -> Result<(), KernelError> {
    raw_args_match(
        "kfree_skb",
        args,
        &[
            Some("struct sk_buff *"),
            None,
            Some("enum skb_drop_reason"),
            Some("struct sock *"),
        ],
    )?;
    layout.reason_listen_overflow = listen_overflow_reason(Some(btf), None)?;
    Ok(())
}

/// Value of `SKB_DROP_REASON_TCP_LISTEN_OVERFLOW`: from BTF, else the tracepoint's print format.
fn listen_overflow_reason(
    btf: Option<&KernelBtf>,
    format: Option<&Format>,
) -> Result<u32, KernelError> {
    const NAME: &str = "tcp_listen_overflow";
    btf.and_then(|b| {
        b.enum_names("skb_drop_reason", "SKB_DROP_REASON_")
            .into_iter()
            .find(|(_, n)| n == NAME)
    })
    .map(|(v, _)| v)
    .or_else(|| {
        format.and_then(|f| {
            f.symbols("reason")
                .into_iter()
                .find(|(_, n)| n == NAME)
                .map(|(v, _)| v)
        })
    })
    .and_then(|v| u32::try_from(v).ok())
    .ok_or_else(|| KernelError::TracepointLayout {
        tracepoint: "skb:kfree_skb".into(),
        detail: "this kernel has no drop reason TCP_LISTEN_OVERFLOW".into(),
    })
}
