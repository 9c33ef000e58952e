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

/// Number of u64 words in the watched-port bitmap (one bit per port).
pub const WATCH_PORT_WORDS: u32 = 1024;

/// Indices of the per-CPU `MAP_ERRORS` array: counts of in-kernel map updates that failed.
pub mod map_error {
    /// `RESETS_SENT` was full.
    pub const RESETS_SENT: u32 = 0;
    /// `RESETS_RECV` was full.
    pub const RESETS_RECV: u32 = 1;
    /// `LISTEN_PORTS` was full.
    pub const LISTEN_PORTS: u32 = 2;
    /// Length of the array.
    pub const COUNT: u32 = 3;
    /// Map names, by index, as they appear in the `map` label.
    pub const NAMES: [&str; COUNT as usize] = ["resets_sent", "resets_recv", "listen_ports"];
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
    /// `sock:inet_sock_set_state`: `newstate`.
    pub state_newstate: u32,
    /// `sock:inet_sock_set_state`: `sport` (host order).
    pub state_sport: u32,
    /// `sock:inet_sock_set_state`: `protocol`.
    pub state_protocol: u32,
}

impl KernelLayout {
    /// A layout where every field is absent: the programs then count nothing.
    pub const ABSENT: Self = Self {
        sk_net: FIELD_ABSENT,
        sk_state: FIELD_ABSENT,
        net_inum: FIELD_ABSENT,
        skb_dev: FIELD_ABSENT,
        dev_net: FIELD_ABSENT,
        rst_send_skaddr: FIELD_ABSENT,
        rst_send_skbaddr: FIELD_ABSENT,
        rst_send_state: FIELD_ABSENT,
        rst_send_reason: FIELD_ABSENT,
        rst_send_port: FIELD_ABSENT,
        rst_send_port_be: 0,
        rst_recv_skaddr: FIELD_ABSENT,
        rst_recv_port: FIELD_ABSENT,
        state_skaddr: FIELD_ABSENT,
        state_newstate: FIELD_ABSENT,
        state_sport: FIELD_ABSENT,
        state_protocol: FIELD_ABSENT,
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn keys_have_no_padding() {
        assert_eq!(size_of::<ResetKey>(), 4 + 2 + 1 + 1);
        assert_eq!(size_of::<ListenPortKey>(), 4 + 2 + 2);
        assert_eq!(size_of::<KernelLayout>(), 17 * 4);
    }
}
