//! The listen backlog: which listener dropped what, and why.
//!
//! - `listen_track` (`sock:inet_sock_set_state`): listeners entering LISTEN mark their port
//!   at once; children moving SYN_RECV → ESTABLISHED count a completed handshake and the
//!   accept-queue length it found.
//! - `listen_ingress` (cgroup_skb ingress at the cgroup v2 root): runs for every segment
//!   delivered to a listener, before TCP handles it, and applies the kernel's own tests of
//!   `tcp_conn_request()` to a SYN to tell which drop or cookie follows. It always passes the
//!   packet: it observes, it never filters.
//! - `listen_ack_drop` (`skb:kfree_skb`, reason `TCP_LISTEN_OVERFLOW`, Linux 6.11+): a
//!   handshake-completing ACK dropped because the accept queue was full. Older kernels that
//!   permit fentry: `tcp_v4_syn_recv_sock` / `tcp_v6_syn_recv_sock`, which test the accept
//!   queue first thing.
//! - `listen_synack` (`tcp:tcp_retransmit_synack`): SYN-ACK retransmits per listener.

use agent_common::{
    FIELD_ABSENT, HandshakeCounts, HandshakeStash, IPPROTO_TCP, ListenPortKey, ListenerKey,
    TCP_LISTEN, listen_kind, map_error,
};
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_F_NO_PREALLOC,
    macros::{btf_tracepoint, cgroup_skb, fentry, map, raw_tracepoint, tracepoint},
    maps::{PerCpuArray, PerCpuHashMap},
    programs::{
        BtfTracePointContext, FEntryContext, RawTracePointContext, SkBuffContext, TracePointContext,
    },
};

use crate::{
    kernel::{
        AF_INET6, LISTEN_PORTS, count_map_error, increment, kread, layout, listener_key, load,
        mark_listen_port, peek, record, sk_netns, tcp_sock, v4_in_16, value_of,
    },
    timewait,
};

/// Per-listener counters, keyed by listener and [`listen_kind`].
#[map]
static LISTEN_EVENTS: PerCpuHashMap<ListenerKey, u64> = PerCpuHashMap::with_max_entries(32768, 0);

/// Completed handshakes per listener (key `kind` 0), with the accept-queue lengths they
/// made. Allocated as listeners appear: a preallocated table of these values would cost
/// every CPU of a large host megabytes for listeners it may never have.
#[map]
static HANDSHAKES: PerCpuHashMap<ListenerKey, HandshakeCounts> =
    PerCpuHashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

/// A new `HANDSHAKES` entry.
static NEW_HANDSHAKES: HandshakeCounts = HandshakeCounts::ZERO;

/// The listener the last non-SYN segment on this CPU went to (see [`HandshakeStash`]).
#[map]
static HANDSHAKE_STASH: PerCpuArray<HandshakeStash> = PerCpuArray::with_max_entries(1, 0);

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_RECV: i32 = 3;
const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86DD;
const TH_SYN: u8 = 0x02;
const TH_ACK: u8 = 0x10;

#[inline(always)]
fn count<C: aya_ebpf::EbpfContext>(ctx: &C, mut key: ListenerKey, kind: u8) {
    key.kind = kind;
    increment(ctx, &LISTEN_EVENTS, &key, map_error::LISTEN_EVENTS);
}

/// What `inet_sock_set_state` tells: mark new listeners, count completed handshakes.
#[inline(always)]
fn set_state<C: EbpfContext>(
    ctx: &C,
    sk: u64,
    netns: u32,
    oldstate: i32,
    newstate: i32,
    port: u16,
) {
    if newstate as u32 == TCP_LISTEN {
        let key = ListenPortKey {
            netns,
            port,
            pad: 0,
        };
        if LISTEN_PORTS.insert(key, 1u8, 0).is_err() {
            let _ = count_map_error(map_error::LISTEN_PORTS);
        }
        // After the insert: a program that finds the mark finds the entry too.
        mark_listen_port(port);
    } else if oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED {
        handshake(ctx, sk, netns, port);
    }
}

/// Whether a transition matters here: most do not, and are left before the socket is read.
#[inline(always)]
fn wanted(oldstate: i32, newstate: i32) -> bool {
    newstate as u32 == TCP_LISTEN || (oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED)
}

/// BTF `inet_sock_set_state(sk, oldstate, newstate)`: as [`lsn_track_raw`], reading the
/// socket with plain loads.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn lsn_track_btf(ctx: BtfTracePointContext) -> i32 {
    let oldstate = ctx.arg::<u64>(1) as i32;
    let newstate = ctx.arg::<u64>(2) as i32;
    let tw = timewait::may_enter(oldstate, newstate);
    if !tw && !wanted(oldstate, newstate) {
        return 0;
    }
    let sk: *const u8 = ctx.arg(0);
    if sk.is_null() {
        return 0;
    }
    // The tracepoint also fires for SCTP and MPTCP sockets.
    if layout(|l| &l.sk_protocol) != FIELD_ABSENT
        && u32::from(load::<u16>(sk, layout(|l| &l.sk_protocol))) != u32::from(IPPROTO_TCP)
    {
        return 0;
    }
    if tw {
        let _ = timewait::closed_typed(&ctx, sk);
        return 0;
    }
    let port: u16 = load(sk, layout(|l| &l.sk_num));
    let net: *const u8 = load(sk, layout(|l| &l.sk_net));
    let netns: u32 = load(net, layout(|l| &l.net_inum));
    set_state(&ctx, sk as u64, netns, oldstate, newstate, port);
    0
}

/// Raw `inet_sock_set_state(sk, oldstate, newstate)`.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn lsn_track_raw(ctx: RawTracePointContext) -> i32 {
    let oldstate = ctx.arg::<u64>(1) as i32;
    let newstate = ctx.arg::<u64>(2) as i32;
    // Most transitions matter to nobody here: decide before reading the socket.
    let tw = timewait::may_enter(oldstate, newstate);
    if !tw && !wanted(oldstate, newstate) {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    // The tracepoint also fires for SCTP and MPTCP sockets.
    if let Some(protocol) = kread::<u16>(sk, layout(|l| &l.sk_protocol))
        && protocol != IPPROTO_TCP
    {
        return 0;
    }
    if tw {
        let _ = timewait::closed(&ctx, sk);
        return 0;
    }
    let port: u16 = kread(sk, layout(|l| &l.sk_num)).unwrap_or(0);
    set_state(&ctx, sk, sk_netns(sk), oldstate, newstate, port);
    0
}

/// Classic `sock:inet_sock_set_state`.
#[tracepoint]
pub fn lsn_track_tp(ctx: TracePointContext) -> u32 {
    let protocol: u16 = record(&ctx, layout(|l| &l.state_protocol)).unwrap_or(0);
    if protocol != IPPROTO_TCP {
        return 0;
    }
    let sk: u64 = record(&ctx, layout(|l| &l.state_skaddr)).unwrap_or(0);
    let oldstate: i32 = record(&ctx, layout(|l| &l.state_oldstate)).unwrap_or(0);
    let newstate: i32 = record(&ctx, layout(|l| &l.state_newstate)).unwrap_or(0);
    if timewait::may_enter(oldstate, newstate) {
        let _ = timewait::closed(&ctx, sk);
        return 0;
    }
    let port: u16 = record(&ctx, layout(|l| &l.state_sport)).unwrap_or(0);
    if !wanted(oldstate, newstate) {
        return 0;
    }
    set_state(&ctx, sk, sk_netns(sk), oldstate, newstate, port);
    0
}

/// A passive child became ESTABLISHED: it was just added to its listener's accept queue.
#[inline(always)]
fn handshake<C: EbpfContext>(ctx: &C, child: u64, netns: u32, port: u16) {
    let stash = HANDSHAKE_STASH.get_ptr_mut(0);
    if let Some(stash) = stash {
        // SAFETY: this CPU's slot; the cgroup program filled it earlier in this softirq.
        let s = unsafe { &mut *stash };
        if s.listener != 0 && s.key.port == port && s.key.netns == netns {
            let listener = s.listener;
            let key = s.key;
            s.listener = 0;
            // The child is already in the queue: this is the length it made.
            let len = peek::<u32>(
                listener,
                layout(|l| &l.btf_sock),
                layout(|l| &l.sk_ack_backlog),
            );
            count_handshake(ctx, &key, len);
            return;
        }
    }
    // No listener seen (cgroup program unavailable, or TCP Fast Open): attribute by the
    // child's own address; the agent maps it to the listener series.
    if let Some(key) = listener_key(child) {
        count_handshake(ctx, &key, None);
    }
}

/// One handshake for `key`, with the accept-queue length it made when known.
#[inline(always)]
fn count_handshake<C: EbpfContext>(ctx: &C, key: &ListenerKey, len: Option<u32>) {
    // The new entry's value from read-only data: 168 bytes are too many for the stack.
    let Some(value) = value_of(
        ctx,
        &HANDSHAKES,
        key,
        &NEW_HANDSHAKES,
        map_error::HANDSHAKES,
    ) else {
        return;
    };
    // SAFETY: this CPU's value of an existing entry; no other CPU writes it.
    let v = unsafe { &mut *value };
    v.handshakes += 1;
    if let Some(len) = len {
        v.occupancy_sum += u64::from(len);
        let b = usize::from(bucket(len));
        if b < v.occupancy.len() {
            v.occupancy[b] += 1;
        }
    }
}

/// Histogram bucket of an accept-queue length: upper bounds 0, 1, 2, 4, … 65536, +Inf.
#[inline(always)]
fn bucket(len: u32) -> u8 {
    if len == 0 {
        return 0;
    }
    let mut bound = 1u32;
    let mut i = 1u8;
    while i < listen_kind::OCCUPANCY_BUCKETS - 1 {
        if len <= bound {
            return i;
        }
        bound <<= 1;
        i += 1;
    }
    listen_kind::OCCUPANCY_BUCKETS - 1
}

/// cgroup_skb ingress: a segment about to be handled by a listener.
#[cgroup_skb]
pub fn lsn_ingress(ctx: SkBuffContext) -> i32 {
    ingress(&ctx);
    1
}

#[inline(always)]
fn ingress(ctx: &SkBuffContext) -> Option<()> {
    // SAFETY: the context pointer is valid for the program's run.
    let skb = unsafe { &*ctx.skb.skb };
    // The socket first: most segments go to established sockets and stop here, before any
    // packet bytes are read.
    // SAFETY: `sk` is the union's only member for cgroup_skb programs.
    let sk = unsafe { skb.__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // `state` lies in `sock_common`: readable without `bpf_sk_fullsock`.
    // SAFETY: a socket pointer the verifier knows, null-checked above.
    let state = unsafe { core::ptr::read_volatile(&(*sk).state) };
    if state != TCP_LISTEN {
        return None;
    }
    let packet = Packet::new(ctx);
    // `protocol` holds the packet's big-endian 16-bit EtherType, zero-extended.
    let flags_at = match u32::from(u16::from_be(skb.protocol as u16)) {
        ETH_P_IP => {
            let v = packet.byte(ctx, 0)?;
            if packet.byte(ctx, 9)? != IPPROTO_TCP as u8 {
                return None;
            }
            usize::from(v & 0x0f) * 4 + 13
        }
        ETH_P_IPV6 => {
            if packet.byte(ctx, 6)? != IPPROTO_TCP as u8 {
                return None;
            }
            40 + 13
        }
        _ => return None,
    };
    let flags = packet.byte(ctx, flags_at)?;
    // As a `tcp_sock` the verifier knows the listener's kernel type: its fields are read
    // with plain loads, not a helper call each. A listener a TCP segment was delivered to
    // is a TCP socket.
    let tp = tcp_sock(sk);
    if tp.is_null() {
        return None;
    }
    let key = typed_listener_key(tp);
    if flags & TH_SYN == 0 {
        // An ACK for a request socket: remember the listener for the handshake counter.
        if let Some(stash) = HANDSHAKE_STASH.get_ptr_mut(0) {
            // The address as a plain number (the agent loads the programs with the right to
            // store kernel addresses in maps); read back later as a number.
            // SAFETY: this CPU's slot.
            unsafe {
                *stash = HandshakeStash {
                    listener: tp as u64,
                    key,
                }
            };
        }
        return None;
    }
    if flags & TH_ACK != 0 {
        return None;
    }
    syn_decision(ctx, tp, key)
}

/// 1, in read-only data: see [`Packet::byte`].
#[unsafe(no_mangle)]
static PACKET_BYTE: usize = 1;

/// The segment's linear bytes, read directly (`data` .. `data_end`, from the network
/// header on); a byte beyond them comes through the helper.
struct Packet {
    data: usize,
    end: usize,
}

impl Packet {
    #[inline(always)]
    fn new(ctx: &SkBuffContext) -> Self {
        // SAFETY: the context's __sk_buff; 32-bit loads of `data` and `data_end`, as the
        // verifier wants them.
        unsafe {
            let skb = ctx.skb.skb;
            Self {
                data: core::ptr::read_volatile(&(*skb).data) as usize,
                end: core::ptr::read_volatile(&(*skb).data_end) as usize,
            }
        }
    }

    #[inline(always)]
    fn byte(&self, ctx: &SkBuffContext, offset: usize) -> Option<u8> {
        let at = self.data + offset;
        // `at + 1` with a 1 the compiler cannot see: it would test `at < end` instead,
        // from which the verifier learns no readable range.
        // SAFETY: a valid static; volatile only prevents constant folding.
        let one = unsafe { core::ptr::read_volatile(&PACKET_BYTE) };
        if at + one <= self.end {
            // SAFETY: inside the packet's linear data, checked against `data_end`.
            Some(unsafe { *(at as *const u8) })
        } else {
            ctx.load(offset).ok()
        }
    }
}

/// [`listener_key`] of a listener the verifier knows by type, with plain loads.
#[inline(always)]
fn typed_listener_key(tp: *const u8) -> ListenerKey {
    let family: u16 = load(tp, layout(|l| &l.sk_family));
    let addr: [u8; 16] = if u32::from(family) == AF_INET6 {
        load(tp, layout(|l| &l.sk_v6_rcv_saddr))
    } else {
        v4_in_16(load(tp, layout(|l| &l.sk_rcv_saddr)))
    };
    let net: *const u8 = load(tp, layout(|l| &l.sk_net));
    ListenerKey {
        netns: load(net, layout(|l| &l.net_inum)),
        port: load(tp, layout(|l| &l.sk_num)),
        family: family as u8,
        kind: 0,
        addr,
    }
}

/// The tests of `tcp_conn_request()`, in its order, on the listener's state now.
#[inline(always)]
fn syn_decision(ctx: &SkBuffContext, tp: *const u8, key: ListenerKey) -> Option<()> {
    let net: *const u8 = load(tp, layout(|l| &l.sk_net));
    let syncookies: u8 = load(net, layout(|l| &l.net_syncookies));
    let qlen: i32 = load(tp, layout(|l| &l.icsk_qlen));
    let backlog: u32 = load(tp, layout(|l| &l.sk_ack_backlog));
    let limit: u32 = load(tp, layout(|l| &l.sk_max_ack_backlog));
    let qlen = qlen.max(0) as u32;
    let synq_full = if layout(|l| &l.synq_full_at_limit) != 0 {
        qlen >= limit
    } else {
        qlen > limit
    };
    if syncookies == 2 || synq_full {
        if syncookies != 0 {
            count(ctx, key, listen_kind::SYN_QUEUE_FULL_COOKIE);
        } else {
            count(ctx, key, listen_kind::SYN_QUEUE_FULL_DROP);
            return None;
        }
    }
    if backlog > limit {
        count(ctx, key, listen_kind::OVERFLOW_SYN);
    }
    Some(())
}

#[inline(always)]
fn ack_drop<C: EbpfContext>(ctx: &C, reason: u32, sk: u64) {
    if reason == layout(|l| &l.reason_listen_overflow)
        && let Some(key) = listener_key(sk)
    {
        count(ctx, key, listen_kind::OVERFLOW_ACK);
    }
}

/// Raw `kfree_skb(skb, location, reason, rx_sk)`: the ACK-stage accept-queue overflow, as
/// the kernel itself reports it. Argument positions checked by the agent in BTF.
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn lsn_ackdrop_raw(ctx: RawTracePointContext) -> i32 {
    let reason = ctx.arg::<u64>(2) as u32;
    if reason != layout(|l| &l.reason_listen_overflow) {
        return 0;
    }
    ack_drop(&ctx, reason, ctx.arg(3));
    0
}

/// Classic `skb:kfree_skb`.
#[tracepoint]
pub fn lsn_ackdrop_tp(ctx: TracePointContext) -> u32 {
    let reason: u32 = record(&ctx, layout(|l| &l.kfree_reason)).unwrap_or(u32::MAX);
    if reason != layout(|l| &l.reason_listen_overflow) {
        return 0;
    }
    ack_drop(
        &ctx,
        reason,
        record(&ctx, layout(|l| &l.kfree_rx_sk)).unwrap_or(0),
    );
    0
}

/// fentry on `tcp_v4_syn_recv_sock(sk, skb, req, dst, req_unhash, own_req)`: the listener
/// is about to make the child of a completed handshake, and its first test is whether the
/// accept queue is full (`ListenOverflows`, `ListenDrops`, no child). For kernels without the
/// `TCP_LISTEN_OVERFLOW` drop reason.
#[fentry(function = "tcp_v4_syn_recv_sock")]
pub fn lsn_ackdrop_v4_fentry(ctx: FEntryContext) -> i32 {
    syn_recv_sock(&ctx);
    0
}

/// fentry on `tcp_v6_syn_recv_sock(…)`, as [`lsn_ackdrop_v4_fentry`]. An IPv4 request on a
/// dual-stack listener is handed on to `tcp_v4_syn_recv_sock` before any test: that program
/// counts it.
#[fentry(function = "tcp_v6_syn_recv_sock")]
pub fn lsn_ackdrop_v6_fentry(ctx: FEntryContext) -> i32 {
    let req: *const u8 = ctx.arg(2);
    // A request socket begins with `sock_common`, as a socket does.
    if !req.is_null() && u32::from(load::<u16>(req, layout(|l| &l.sk_family))) == AF_INET6 {
        syn_recv_sock(&ctx);
    }
    0
}

/// The accept-queue test `syn_recv_sock` starts with (`sk_acceptq_is_full()`), an instant
/// before the kernel makes it.
#[inline(always)]
fn syn_recv_sock(ctx: &FEntryContext) {
    let sk: *const u8 = ctx.arg(0);
    if sk.is_null() {
        return;
    }
    let backlog: u32 = load(sk, layout(|l| &l.sk_ack_backlog));
    let limit: u32 = load(sk, layout(|l| &l.sk_max_ack_backlog));
    if backlog <= limit {
        return;
    }
    // `req_unhash` is the request being completed from the SYN queue (`tcp_check_req()`),
    // whose ACK TCP then discards on the listener; without one (a SYN cookie's ACK, a Fast
    // Open SYN) the segment is not discarded there. The agent needs the difference for
    // the listener's drops.
    let unhash: u64 = ctx.arg(4);
    let kind = if unhash != 0 {
        listen_kind::OVERFLOW_ACK
    } else {
        listen_kind::OVERFLOW_ACK_UNQUEUED
    };
    count(ctx, typed_listener_key(sk), kind);
}

/// Raw `tcp_retransmit_synack(sk, req)`: the listener retransmitted a SYN-ACK.
#[raw_tracepoint(tracepoint = "tcp_retransmit_synack")]
pub fn lsn_synack_raw(ctx: RawTracePointContext) -> i32 {
    if let Some(key) = listener_key(ctx.arg(0)) {
        count(&ctx, key, listen_kind::SYNACK_RETRANSMIT);
    }
    0
}

/// Classic `tcp:tcp_retransmit_synack`.
#[tracepoint]
pub fn lsn_synack_tp(ctx: TracePointContext) -> u32 {
    let sk: u64 = record(&ctx, layout(|l| &l.synack_skaddr)).unwrap_or(0);
    if let Some(key) = listener_key(sk) {
        count(&ctx, key, listen_kind::SYNACK_RETRANSMIT);
    }
    0
}
