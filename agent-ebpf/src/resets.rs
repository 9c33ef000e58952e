//! Resets sent and received → `sockscope_tcp_resets_{sent,received}_total`, from the
//! `tcp_send_reset` and `tcp_receive_reset` tracepoints: as raw tracepoints (preferred:
//! no record is formatted) or as classic tracepoints.

use agent_common::{FIELD_ABSENT, REASON_UNKNOWN, ResetKey, STATE_NONE, map_error};
use aya_ebpf::{
    EbpfContext,
    macros::{btf_tracepoint, fentry, map, raw_tracepoint, tracepoint},
    maps::PerCpuHashMap,
    programs::{BtfTracePointContext, FEntryContext, RawTracePointContext, TracePointContext},
};

use crate::kernel::{
    SkCommon, TCPHDR_DEST, increment, kread, layout, load, peek, port_label, record, sk_netns,
    skb_local_port, skb_netns,
};

/// Resets sent, by (netns, port, state, reason).
#[map]
static RESETS_SENT: PerCpuHashMap<ResetKey, u64> = PerCpuHashMap::with_max_entries(8192, 0);

/// Resets received and acted on, by (netns, port, state).
#[map]
static RESETS_RECV: PerCpuHashMap<ResetKey, u64> = PerCpuHashMap::with_max_entries(8192, 0);

const TCP_CLOSE: u8 = 7;
const TCP_TIME_WAIT: u8 = 6;
const TCP_NEW_SYN_RECV: u8 = 12;

#[inline(always)]
fn reason_label(reason: Option<u32>) -> u8 {
    match reason {
        Some(r) if r < u32::from(REASON_UNKNOWN) => r as u8,
        _ => REASON_UNKNOWN,
    }
}

#[inline(always)]
fn count_sent<C: EbpfContext>(ctx: &C, netns: u32, port: u16, state: u8, reason: u8) {
    let key = ResetKey {
        netns,
        port: port_label(netns, port),
        state,
        reason,
    };
    increment(ctx, &RESETS_SENT, &key, map_error::RESETS_SENT);
}

#[inline(always)]
fn count_received<C: EbpfContext>(ctx: &C, netns: u32, port: u16, state: u8) {
    let key = ResetKey {
        netns,
        port: port_label(netns, port),
        state,
        reason: 0,
    };
    increment(ctx, &RESETS_RECV, &key, map_error::RESETS_RECV);
}

/// Raw `tcp_send_reset(sk, skb[, reason])`: every RST the stack sends. The argument
/// positions are the tracepoint's ABI; the agent checks their types in BTF before choosing
/// this path (the verifier only allows constant offsets into the context).
#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn rst_send_raw(ctx: RawTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let reason = if layout(|l| &l.raw_send_reason) == FIELD_ABSENT {
        None
    } else {
        Some(ctx.arg::<u64>(2) as u32)
    };
    sent_by(&ctx, sk, Some(ctx.arg(1)), reason_label(reason));
    0
}

/// Counts a reset sent by the socket `sk`, read through the helper; without a socket, by
/// the segment `skb` it answers, when there is one.
#[inline(always)]
fn sent_by<C: EbpfContext>(ctx: &C, sk: u64, skb: Option<u64>, reason: u8) {
    if let Some(common) = SkCommon::read(sk) {
        // Full, request and timewait sockets all begin with sock_common.
        let state: u8 = common.field(layout(|l| &l.sk_state)).unwrap_or(STATE_NONE);
        count_sent(
            ctx,
            common.netns(),
            local_port(&common, state),
            state,
            reason,
        );
    } else if let Some(skb) = skb {
        count_sent(ctx, skb_netns(skb), skb_local_port(skb), STATE_NONE, reason);
    }
}

/// The local port of a socket in `state`: `inet_sport` for full sockets (their `skc_num` is
/// already 0 when an abort moves them to CLOSE before the RST), `skc_num` for timewait and
/// request sockets, which have no `inet_sock`.
#[inline(always)]
fn local_port(common: &SkCommon, state: u8) -> u16 {
    if state == TCP_TIME_WAIT || state == TCP_NEW_SYN_RECV {
        common.field(layout(|l| &l.sk_num)).unwrap_or(0)
    } else {
        common
            .field::<u16>(layout(|l| &l.inet_sport))
            .map_or(0, u16::from_be)
    }
}

/// Raw `tcp_receive_reset(sk)`: an RST accepted by a socket (`tcp_reset()`).
#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn rst_recv_raw(ctx: RawTracePointContext) -> i32 {
    received_by(&ctx, ctx.arg(0));
    0
}

/// Counts a reset accepted by the socket `sk`, read through the helper.
#[inline(always)]
fn received_by<C: EbpfContext>(ctx: &C, sk: u64) {
    if let Some(common) = SkCommon::read(sk) {
        let state: u8 = common.field(layout(|l| &l.sk_state)).unwrap_or(STATE_NONE);
        count_received(ctx, common.netns(), local_port(&common, state), state);
    }
}

/// fentry on `tcp_reset(sk, skb)`, the function that raises `tcp_receive_reset` first thing:
/// the same events without the tracepoint (kernels that permit fentry).
#[fentry(function = "tcp_reset")]
pub fn rst_recv_fentry(ctx: FEntryContext) -> i32 {
    received_by(&ctx, ctx.arg(0));
    0
}

/// fentry on `tcp_send_active_reset(sk, …)`: an RST the socket sends on its own (abort,
/// `SO_LINGER` 0). The kernel counts `OutRsts` on entry there. The reset reason is not read
/// (this path is for kernels before 6.10, which have none): `unknown`.
#[fentry(function = "tcp_send_active_reset")]
pub fn rst_send_active_fentry(ctx: FEntryContext) -> i32 {
    sent_by(&ctx, ctx.arg(0), None, REASON_UNKNOWN);
    0
}

/// fentry on `tcp_v4_send_reset(sk, skb, …)`: the reply to a segment, with a socket (full,
/// request or timewait) or without one.
#[fentry(function = "tcp_v4_send_reset")]
pub fn rst_send_v4_fentry(ctx: FEntryContext) -> i32 {
    reply_reset(&ctx, ctx.arg(0), ctx.arg(1));
    0
}

/// fentry on `tcp_v6_send_reset(sk, skb, …)`.
#[fentry(function = "tcp_v6_send_reset")]
pub fn rst_send_v6_fentry(ctx: FEntryContext) -> i32 {
    reply_reset(&ctx, ctx.arg(0), ctx.arg(1));
    0
}

const TH_RST: u8 = 0x04;

/// A reset in reply to `skb`. The function returns without sending when `skb` is itself an
/// RST (a reset is never answered): those are left out, as the kernel's `OutRsts` leaves
/// them out.
#[inline(always)]
fn reply_reset<C: EbpfContext>(ctx: &C, sk: u64, skb: u64) {
    let head: u64 = kread(skb, layout(|l| &l.skb_head)).unwrap_or(0);
    let th: u16 = kread(skb, layout(|l| &l.skb_transport_header)).unwrap_or(u16::MAX);
    if head == 0 || th == u16::MAX {
        return;
    }
    let flags: u8 = kread(head + u64::from(th), 13).unwrap_or(TH_RST);
    if flags & TH_RST != 0 {
        return;
    }
    sent_by(ctx, sk, Some(skb), REASON_UNKNOWN);
}

/// BTF `tcp_send_reset(sk, skb[, reason])`: as [`rst_send_raw`], but the verifier knows the
/// arguments' types, so fields are read with plain loads instead of helper calls (each call
/// costs about as much as the rest of the program).
#[btf_tracepoint(function = "tcp_send_reset")]
pub fn rst_send_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    let reason = if layout(|l| &l.raw_send_reason) == FIELD_ABSENT {
        None
    } else {
        Some(ctx.arg::<u64>(2) as u32)
    };
    if !sk.is_null() {
        let state: u8 = load(sk, layout(|l| &l.sk_state));
        let net: *const u8 = load(sk, layout(|l| &l.sk_net));
        let netns: u32 = load(net, layout(|l| &l.net_inum));
        // `skc_num` is 0 once an abort has moved a full socket to CLOSE; `inet_sport` lies
        // beyond `struct sock`, where the verifier allows no plain load.
        let port = if state == TCP_CLOSE {
            peek::<u16>(
                sk as u64,
                layout(|l| &l.btf_inet_sock),
                layout(|l| &l.inet_sport),
            )
            .map_or(0, u16::from_be)
        } else {
            load(sk, layout(|l| &l.sk_num))
        };
        count_sent(&ctx, netns, port, state, reason_label(reason));
    } else {
        let skb: *const u8 = ctx.arg(1);
        if skb.is_null() {
            return 0;
        }
        let dev: *const u8 = load(skb, layout(|l| &l.skb_dev));
        let net: *const u8 = load(dev, layout(|l| &l.dev_net));
        let netns: u32 = load(net, layout(|l| &l.net_inum));
        let head: u64 = load(skb, layout(|l| &l.skb_head));
        let th: u16 = load(skb, layout(|l| &l.skb_transport_header));
        let port = if head == 0 || th == u16::MAX {
            0
        } else {
            peek::<u16>(head + u64::from(th), layout(|l| &l.btf_tcphdr), TCPHDR_DEST)
                .map_or(0, u16::from_be)
        };
        count_sent(&ctx, netns, port, STATE_NONE, reason_label(reason));
    }
    0
}

/// BTF `tcp_receive_reset(sk)`: as [`rst_recv_raw`], with plain loads.
#[btf_tracepoint(function = "tcp_receive_reset")]
pub fn rst_recv_btf(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    if sk.is_null() {
        return 0;
    }
    // A socket that accepts a reset is established or on its way: never CLOSE, so its
    // `skc_num` is set.
    let state: u8 = load(sk, layout(|l| &l.sk_state));
    let port: u16 = load(sk, layout(|l| &l.sk_num));
    let net: *const u8 = load(sk, layout(|l| &l.sk_net));
    let netns: u32 = load(net, layout(|l| &l.net_inum));
    count_received(&ctx, netns, port, state);
    0
}

/// Classic `tcp:tcp_send_reset`.
#[tracepoint]
pub fn rst_send_tp(ctx: TracePointContext) -> u32 {
    let sk: u64 = record(&ctx, layout(|l| &l.rst_send_skaddr)).unwrap_or(0);
    let netns = if sk != 0 {
        sk_netns(sk)
    } else {
        let skb: u64 = record(&ctx, layout(|l| &l.rst_send_skbaddr)).unwrap_or(0);
        skb_netns(skb)
    };
    // The record holds `sk ? sk->sk_state : 0`; 0 is no TCP state, so it means "none".
    let state: i32 = record(&ctx, layout(|l| &l.rst_send_state)).unwrap_or(0);
    let state = if (1..=255).contains(&state) {
        state as u8
    } else {
        STATE_NONE
    };
    let reason = record::<u32>(&ctx, layout(|l| &l.rst_send_reason));
    let port = record::<u16>(&ctx, layout(|l| &l.rst_send_port)).unwrap_or(0);
    let port = if layout(|l| &l.rst_send_port_be) != 0 {
        u16::from_be(port)
    } else {
        port
    };
    count_sent(&ctx, netns, port, state, reason_label(reason));
    0
}

/// Classic `tcp:tcp_receive_reset`.
#[tracepoint]
pub fn rst_recv_tp(ctx: TracePointContext) -> u32 {
    let sk: u64 = record(&ctx, layout(|l| &l.rst_recv_skaddr)).unwrap_or(0);
    let port = record::<u16>(&ctx, layout(|l| &l.rst_recv_port)).unwrap_or(0);
    // The classic record carries no state on recent kernels: read it from the socket.
    let state: u8 = kread(sk, layout(|l| &l.sk_state)).unwrap_or(STATE_NONE);
    count_received(&ctx, sk_netns(sk), port, state);
    0
}
