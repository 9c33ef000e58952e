//! Resets sent and received, from the `tcp:tcp_send_reset` and `tcp:tcp_receive_reset`
//! tracepoints → `sockscope_tcp_resets_{sent,received}_total`.

use agent_common::{REASON_UNKNOWN, ResetKey, STATE_NONE, map_error};
use aya_ebpf::{
    macros::{map, tracepoint},
    maps::PerCpuHashMap,
    programs::TracePointContext,
};

use crate::kernel::{increment, kread, layout, port_label, record, sk_netns, skb_netns};

/// Resets sent, by (netns, port, state, reason).
#[map]
static RESETS_SENT: PerCpuHashMap<ResetKey, u64> = PerCpuHashMap::with_max_entries(8192, 0);

/// Resets received and acted on, by (netns, port, state).
#[map]
static RESETS_RECV: PerCpuHashMap<ResetKey, u64> = PerCpuHashMap::with_max_entries(8192, 0);

/// `tcp:tcp_send_reset`: every RST the stack sends, with or without a socket.
#[tracepoint]
pub fn rst_send(ctx: TracePointContext) -> u32 {
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
    let reason = match record::<u32>(&ctx, layout(|l| &l.rst_send_reason)) {
        Some(r) if r < u32::from(REASON_UNKNOWN) => r as u8,
        _ => REASON_UNKNOWN,
    };
    let port = record::<u16>(&ctx, layout(|l| &l.rst_send_port)).unwrap_or(0);
    let port = if layout(|l| &l.rst_send_port_be) != 0 {
        u16::from_be(port)
    } else {
        port
    };
    let key = ResetKey {
        netns,
        port: port_label(netns, port),
        state,
        reason,
    };
    increment(&ctx, &RESETS_SENT, &key, map_error::RESETS_SENT);
    0
}

/// `tcp:tcp_receive_reset`: an RST accepted by a socket (`tcp_reset()`).
#[tracepoint]
pub fn rst_recv(ctx: TracePointContext) -> u32 {
    let sk: u64 = record(&ctx, layout(|l| &l.rst_recv_skaddr)).unwrap_or(0);
    let netns = sk_netns(sk);
    // The record carries no state on recent kernels: read it from the socket.
    let state: u8 = kread(sk, layout(|l| &l.sk_state)).unwrap_or(STATE_NONE);
    let port = record::<u16>(&ctx, layout(|l| &l.rst_recv_port)).unwrap_or(0);
    let key = ResetKey {
        netns,
        port: port_label(netns, port),
        state,
        reason: 0,
    };
    increment(&ctx, &RESETS_RECV, &key, map_error::RESETS_RECV);
    0
}
