//! Map keys, map values and start-up parameters shared by sockscope's kernel programs
//! (agent-ebpf) and its agent. Every type is `#[repr(C)]` without padding holes, so the
//! bytes the kernel hashes are exactly the fields.
#![no_std]

/// Port value that stands for the label `other`: the port had no listener in its network
/// namespace and was not watched when the event was counted.
pub const PORT_OTHER: u16 = 0;

/// `state` value that stands for "no socket" (the tracepoint passed none).
pub const STATE_NONE: u8 = 0;

/// TCP state of a listening socket (`TCP_LISTEN` in include/net/tcp_states.h).
pub const TCP_LISTEN: u32 = 10;

/// `IPPROTO_TCP`, as `sock:inet_sock_set_state` reports the protocol.
pub const IPPROTO_TCP: u16 = 6;

/// `reason` value used when the running kernel's tracepoint carries no reason field
/// (kernels before 6.10).
pub const REASON_UNKNOWN: u8 = u8::MAX;

/// Offset value that marks a field the running kernel does not have.
pub const FIELD_ABSENT: u32 = u32::MAX;

/// Key of the reset counters: one series of `sockscope_tcp_resets_{sent,received}_total`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResetKey {
    /// Network namespace inode number.
    pub netns: u32,
    /// Local port, or [`PORT_OTHER`].
    pub port: u16,
    /// TCP state of the socket (`TCP_ESTABLISHED` = 1 …), or [`STATE_NONE`].
    pub state: u8,
    /// `enum sk_rst_reason` value (sent resets only; 0 for received), or [`REASON_UNKNOWN`].
    pub reason: u8,
}

/// Key of the listener-port set the programs consult to decide a `port` label.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenPortKey {
    /// Network namespace inode number.
    pub netns: u32,
    /// Local port of a listening socket.
    pub port: u16,
    /// Always zero: keeps the key free of padding.
    pub pad: u16,
}

/// Key of the per-listener event counters (`LISTEN_EVENTS`): the listener's identity and
/// what happened ([`listen_kind`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerKey {
    /// Network namespace inode number.
    pub netns: u32,
    /// Listening port.
    pub port: u16,
    /// `AF_INET` (2) or `AF_INET6` (10).
    pub family: u8,
    /// One of [`listen_kind`].
    pub kind: u8,
    /// The listener's bound address: IPv4 in the first 4 bytes, or IPv6.
    pub addr: [u8; 16],
}

/// What a `LISTEN_EVENTS` entry counts.
pub mod listen_kind {
    /// A SYN dropped because the accept queue was full.
    pub const OVERFLOW_SYN: u8 = 0;
    /// A handshake-completing ACK dropped because the accept queue was full.
    pub const OVERFLOW_ACK: u8 = 1;
    /// SYN queue full (or syncookies=2) and cookies off: SYN dropped.
    pub const SYN_QUEUE_FULL_DROP: u8 = 2;
    /// SYN queue full (or syncookies=2) and cookies on: a cookie was wanted.
    pub const SYN_QUEUE_FULL_COOKIE: u8 = 3;
    /// A SYN-ACK retransmitted.
    pub const SYNACK_RETRANSMIT: u8 = 4;
    /// The accept queue was full when a child was to be made without a request in the SYN
    /// queue (a SYN cookie's ACK, a Fast Open SYN): an ACK-stage overflow whose segment TCP
    /// does not discard on the listener.
    pub const OVERFLOW_ACK_UNQUEUED: u8 = 5;
    /// Number of occupancy buckets: upper bounds 0, 1, 2, 4, … 2^16, then +Inf.
    pub const OCCUPANCY_BUCKETS: u8 = 19;
}

/// Value of `HANDSHAKES`: a listener's handshakes completed into its accept queue, and the
/// queue lengths they made (a histogram and its sum). One entry holds them all, so a
/// handshake costs one map lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeCounts {
    /// Handshakes completed.
    pub handshakes: u64,
    /// Sum of the accept-queue lengths seen at those handshakes (histogram'd ones only).
    pub occupancy_sum: u64,
    /// Occupancy histogram: bucket `i` counts lengths up to the `i`-th bound (see
    /// [`listen_kind::OCCUPANCY_BUCKETS`]).
    pub occupancy: [u64; listen_kind::OCCUPANCY_BUCKETS as usize],
}

impl HandshakeCounts {
    /// All zero: a new entry.
    pub const ZERO: Self = Self {
        handshakes: 0,
        occupancy_sum: 0,
        occupancy: [0; listen_kind::OCCUPANCY_BUCKETS as usize],
    };
}

/// The listener a non-SYN segment was just delivered to on this CPU (`HANDSHAKE_STASH`):
/// lets the handshake counter attribute the child socket to its listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandshakeStash {
    /// Kernel address of the listener.
    pub listener: u64,
    /// The listener's key (kind unused).
    pub key: ListenerKey,
}

/// Key of `TIME_WAIT_ENTERED`: full sockets handed over to the kernel's timewait table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimeWaitKey {
    /// Network namespace inode number.
    pub netns: u32,
    /// Local port when `class` is [`tw_class::PORT`], else 0.
    pub port: u16,
    /// One of [`tw_class`]: how the local port is labelled.
    pub class: u8,
    /// Always zero: keeps the key free of padding.
    pub pad: u8,
}

/// The `port` label class of a [`TimeWaitKey`], decided when the socket is counted.
pub mod tw_class {
    /// A listener port of the namespace (or a watched port): labelled by its number.
    pub const PORT: u8 = 0;
    /// Inside the namespace's `ip_local_port_range`: `ephemeral`.
    pub const EPHEMERAL: u8 = 1;
    /// Anything else: `other`.
    pub const OTHER: u8 = 2;
}

/// Number of u64 words in the watched-port bitmap (one bit per port).
pub const WATCH_PORT_WORDS: u32 = 1024;

/// Ports per entry of `LISTEN_PORT_SEEN` (one byte each), and groups of ports per entry of
/// `LISTEN_GROUP_SEEN` (one byte per group of this many ports).
pub const PORT_SEEN_SPAN: u32 = 64;
/// Entries of `LISTEN_PORT_SEEN`: every port has its byte.
pub const PORT_SEEN_ENTRIES: u32 = 65536 / PORT_SEEN_SPAN;
/// Entries of `LISTEN_GROUP_SEEN`: every group of [`PORT_SEEN_SPAN`] ports has its byte.
pub const PORT_GROUP_ENTRIES: u32 = PORT_SEEN_ENTRIES / PORT_SEEN_SPAN;

/// Indices of the per-CPU `MAP_ERRORS` array: counts of in-kernel map updates that failed.
pub mod map_error {
    /// `RESETS_SENT` was full.
    pub const RESETS_SENT: u32 = 0;
    /// `RESETS_RECV` was full.
    pub const RESETS_RECV: u32 = 1;
    /// `LISTEN_PORTS` was full.
    pub const LISTEN_PORTS: u32 = 2;
    /// `LISTEN_EVENTS` was full.
    pub const LISTEN_EVENTS: u32 = 3;
    /// `TIME_WAIT_ENTERED` was full.
    pub const TIME_WAIT_ENTERED: u32 = 4;
    /// `TCP_SEGMENTS` was full.
    pub const TCP_SEGMENTS: u32 = 5;
    /// `HANDSHAKES` was full.
    pub const HANDSHAKES: u32 = 6;
    /// Length of the array.
    pub const COUNT: u32 = 7;
    /// Map names, by index, as they appear in the `map` label.
    pub const NAMES: [&str; COUNT as usize] = [
        "resets_sent",
        "resets_recv",
        "listen_ports",
        "listen_events",
        "time_wait_entered",
        "tcp_segments",
        "handshakes",
    ];
}

/// Where the fields the programs read live on the running kernel. The agent resolves every
/// offset at start-up from BTF and the tracepoints' format files and hands this to the
/// programs as the global `LAYOUT`: nothing is fixed at build time for one kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelLayout {
    /// `struct sock_common`: `skc_net` (a `possible_net_t`, whose first member is the pointer).
    pub sk_net: u32,
    /// `struct sock_common`: `skc_state`.
    pub sk_state: u32,
    /// `struct net`: `ns.inum`.
    pub net_inum: u32,
    /// `struct sk_buff`: `dev`.
    pub skb_dev: u32,
    /// `struct net_device`: `nd_net`.
    pub dev_net: u32,
    /// `struct sock_common`: `skc_family`.
    pub sk_family: u32,
    /// `struct sock_common`: `skc_num` (local port, host order).
    pub sk_num: u32,
    /// `struct sock_common`: `skc_rcv_saddr`.
    pub sk_rcv_saddr: u32,
    /// `struct sock_common`: `skc_v6_rcv_saddr`.
    pub sk_v6_rcv_saddr: u32,
    /// `struct sock`: `sk_ack_backlog` (accept queue length).
    pub sk_ack_backlog: u32,
    /// `struct sock`: `sk_max_ack_backlog` (accept queue limit).
    pub sk_max_ack_backlog: u32,
    /// `struct inet_connection_sock`: `icsk_accept_queue.qlen` (SYN queue length).
    pub icsk_qlen: u32,
    /// `struct net`: `ipv4.sysctl_tcp_syncookies`.
    pub net_syncookies: u32,
    /// `struct inet_sock`: `inet_sport` (network order). Unlike `skc_num`, it survives the
    /// move to CLOSE, which releases the port before an abort sends its RST.
    pub inet_sport: u32,
    /// `struct sock`: `sk_protocol` (a u16 since Linux 5.6), or [`FIELD_ABSENT`].
    pub sk_protocol: u32,
    /// `struct sk_buff`: `head`.
    pub skb_head: u32,
    /// `struct sk_buff`: `transport_header` (u16 offset from `head`).
    pub skb_transport_header: u32,
    /// 1 when the kernel calls the SYN queue full at `qlen >= limit` (before Linux 6.14 and
    /// where a stable backport has not changed it; chosen by kernel version only), 0 for
    /// `qlen > limit`.
    pub synq_full_at_limit: u32,

    /// `tcp:tcp_send_reset`: `skaddr`.
    pub rst_send_skaddr: u32,
    /// `tcp:tcp_send_reset`: `skbaddr`.
    pub rst_send_skbaddr: u32,
    /// `tcp:tcp_send_reset`: `state`.
    pub rst_send_state: u32,
    /// `tcp:tcp_send_reset`: `reason`, or [`FIELD_ABSENT`].
    pub rst_send_reason: u32,
    /// `tcp:tcp_send_reset`: where the local port is (`sport`, or inside `saddr`).
    pub rst_send_port: u32,
    /// 1 when `rst_send_port` points into a `sockaddr` (network byte order), 0 for a
    /// host-order `__u16 sport`.
    pub rst_send_port_be: u32,

    /// `tcp:tcp_receive_reset`: `skaddr`.
    pub rst_recv_skaddr: u32,
    /// `tcp:tcp_receive_reset`: `sport` (host order, the local port).
    pub rst_recv_port: u32,

    /// `sock:inet_sock_set_state`: `skaddr`.
    pub state_skaddr: u32,
    /// `sock:inet_sock_set_state`: `oldstate`.
    pub state_oldstate: u32,
    /// `sock:inet_sock_set_state`: `newstate`.
    pub state_newstate: u32,
    /// `sock:inet_sock_set_state`: `sport` (host order).
    pub state_sport: u32,
    /// `sock:inet_sock_set_state`: `protocol`.
    pub state_protocol: u32,

    /// `skb:kfree_skb`: `rx_sk` (the socket the packet was for; Linux 6.11).
    pub kfree_rx_sk: u32,
    /// `skb:kfree_skb`: `reason`.
    pub kfree_reason: u32,
    /// Value of `SKB_DROP_REASON_TCP_LISTEN_OVERFLOW` on this kernel, or [`FIELD_ABSENT`].
    pub reason_listen_overflow: u32,

    /// `tcp:tcp_retransmit_synack`: `skaddr` (the listener).
    pub synack_skaddr: u32,

    /// Raw tracepoint `tcp_send_reset`: 2 when its third argument is the reason (6.10),
    /// else [`FIELD_ABSENT`].
    pub raw_send_reason: u32,

    /// `struct sock_common`: `skc_hash` (the ehash value a timewait socket inherits).
    pub sk_hash: u32,
    /// `struct sock_common`: `skc_addrpair` (IPv4 remote and local address).
    pub sk_addrpair: u32,
    /// `struct sock_common`: `skc_dport` (network order).
    pub sk_dport: u32,
    /// `struct sock_common`: `skc_v6_daddr`, or [`FIELD_ABSENT`].
    pub sk_v6_daddr: u32,
    /// `struct sock_common`: `skc_nulls_node` (the ehash chain link).
    pub sk_nulls_node: u32,
    /// `struct net`: `ipv4.tcp_death_row.hashinfo` (the table timewait sockets enter).
    pub net_tw_hashinfo: u32,
    /// `struct inet_hashinfo`: `ehash`.
    pub hashinfo_ehash: u32,
    /// `struct inet_hashinfo`: `ehash_mask`.
    pub hashinfo_ehash_mask: u32,
    /// `struct net`: `ipv4.ip_local_ports.range`: one u32, low | high << 16, or (kernels
    /// whose `struct local_ports` still has a seqlock) two ints, low then high.
    pub net_port_range: u32,
    /// 1 when `net_port_range` is the older pair of ints.
    pub net_port_range_ints: u32,

    /// BTF type ids in the running kernel, for `bpf_rdonly_cast` (see [`RDONLY_CAST_CALL`]);
    /// all [`FIELD_ABSENT`] where the kernel lacks it (before Linux 6.2), and the programs
    /// then read through `bpf_probe_read_kernel`. `struct sock`.
    pub btf_sock: u32,
    /// `struct inet_sock`.
    pub btf_inet_sock: u32,
    /// `struct tcp_sock`.
    pub btf_tcp_sock: u32,
    /// `struct sock_common`.
    pub btf_sock_common: u32,
    /// `struct tcphdr`.
    pub btf_tcphdr: u32,
    /// `struct hlist_nulls_node` (a link of an established-hash chain; its first member
    /// points to the next).
    pub btf_nulls_node: u32,
}

/// The helper number the programs call in place of the kernel function
/// `bpf_rdonly_cast(ptr, btf_id)`, which a compiled object cannot name: before loading, the
/// agent rewrites each such call into a call of the kernel function (or, where the kernel
/// has none, into a plain move whose result no verified path reads). No helper has this
/// number.
pub const RDONLY_CAST_CALL: i32 = 0x5c0c_a570;

impl KernelLayout {
    /// A layout where every field is absent: the programs then count nothing.
    pub const ABSENT: Self = Self {
        sk_net: FIELD_ABSENT,
        sk_state: FIELD_ABSENT,
        net_inum: FIELD_ABSENT,
        skb_dev: FIELD_ABSENT,
        dev_net: FIELD_ABSENT,
        sk_family: FIELD_ABSENT,
        sk_num: FIELD_ABSENT,
        sk_rcv_saddr: FIELD_ABSENT,
        sk_v6_rcv_saddr: FIELD_ABSENT,
        sk_ack_backlog: FIELD_ABSENT,
        sk_max_ack_backlog: FIELD_ABSENT,
        icsk_qlen: FIELD_ABSENT,
        net_syncookies: FIELD_ABSENT,
        inet_sport: FIELD_ABSENT,
        sk_protocol: FIELD_ABSENT,
        skb_head: FIELD_ABSENT,
        skb_transport_header: FIELD_ABSENT,
        synq_full_at_limit: 0,
        rst_send_skaddr: FIELD_ABSENT,
        rst_send_skbaddr: FIELD_ABSENT,
        rst_send_state: FIELD_ABSENT,
        rst_send_reason: FIELD_ABSENT,
        rst_send_port: FIELD_ABSENT,
        rst_send_port_be: 0,
        rst_recv_skaddr: FIELD_ABSENT,
        rst_recv_port: FIELD_ABSENT,
        state_skaddr: FIELD_ABSENT,
        state_oldstate: FIELD_ABSENT,
        state_newstate: FIELD_ABSENT,
        state_sport: FIELD_ABSENT,
        state_protocol: FIELD_ABSENT,
        kfree_rx_sk: FIELD_ABSENT,
        kfree_reason: FIELD_ABSENT,
        reason_listen_overflow: FIELD_ABSENT,
        synack_skaddr: FIELD_ABSENT,
        raw_send_reason: FIELD_ABSENT,
        sk_hash: FIELD_ABSENT,
        sk_addrpair: FIELD_ABSENT,
        sk_dport: FIELD_ABSENT,
        sk_v6_daddr: FIELD_ABSENT,
        sk_nulls_node: FIELD_ABSENT,
        net_tw_hashinfo: FIELD_ABSENT,
        hashinfo_ehash: FIELD_ABSENT,
        hashinfo_ehash_mask: FIELD_ABSENT,
        net_port_range: FIELD_ABSENT,
        net_port_range_ints: 0,
        btf_sock: FIELD_ABSENT,
        btf_inet_sock: FIELD_ABSENT,
        btf_tcp_sock: FIELD_ABSENT,
        btf_sock_common: FIELD_ABSENT,
        btf_tcphdr: FIELD_ABSENT,
        btf_nulls_node: FIELD_ABSENT,
    };
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: plain `#[repr(C)]` integers without padding; every bit pattern is valid.
    unsafe impl aya::Pod for ResetKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ListenPortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for KernelLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ListenerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for HandshakeStash {}
    // SAFETY: as above.
    unsafe impl aya::Pod for HandshakeCounts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for TimeWaitKey {}
    unsafe impl aya::Pod for SegmentKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn keys_have_no_padding() {
        assert_eq!(size_of::<ResetKey>(), 4 + 2 + 1 + 1);
        assert_eq!(size_of::<ListenPortKey>(), 4 + 2 + 2);
        assert_eq!(size_of::<KernelLayout>(), 52 * 4);
        assert_eq!(size_of::<TimeWaitKey>(), 4 + 2 + 1 + 1);
        assert_eq!(size_of::<ListenerKey>(), 4 + 2 + 1 + 1 + 16);
        assert_eq!(size_of::<HandshakeStash>(), 8 + 24);
    }
}

/// Key of the built-in socket filter's counters (`TCP_SEGMENTS`): one series of
/// `sockscope_tcp_segments_total`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentKey {
    /// Interface index the packet socket is bound to.
    pub ifindex: u32,
    /// Local port (destination of ingress segments, source of egress ones), or
    /// [`PORT_OTHER`].
    pub port: u16,
    /// [`segment::INGRESS`] or [`segment::EGRESS`].
    pub direction: u8,
    /// One of the `segment::FLAGS_*` classes.
    pub flags: u8,
}

/// Values of [`SegmentKey`]'s fields.
pub mod segment {
    /// Received by the interface.
    pub const INGRESS: u8 = 0;
    /// Sent by the interface.
    pub const EGRESS: u8 = 1;
    /// SYN without ACK.
    pub const FLAGS_SYN: u8 = 0;
    /// SYN with ACK.
    pub const FLAGS_SYN_ACK: u8 = 1;
    /// RST (with any other flag).
    pub const FLAGS_RST: u8 = 2;
    /// FIN without SYN or RST.
    pub const FLAGS_FIN: u8 = 3;
    /// Anything else (data, pure ACKs).
    pub const FLAGS_OTHER: u8 = 4;
    /// The `flags` label of each class, by value.
    pub const FLAG_NAMES: [&str; 5] = ["syn", "syn_ack", "rst", "fin", "other"];
}
