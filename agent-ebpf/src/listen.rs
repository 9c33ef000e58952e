//! Listener tracking from `sock:inet_sock_set_state`: every socket that enters LISTEN
//! marks its (netns, port) at once, so events on a brand-new listener keep their port label.

use agent_common::{IPPROTO_TCP, ListenPortKey, TCP_LISTEN, map_error};
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

use crate::kernel::{LISTEN_PORTS, count_map_error, layout, record, sk_netns};

/// `sock:inet_sock_set_state` → `LISTEN_PORTS`.
#[tracepoint]
pub fn listen_track(ctx: TracePointContext) -> u32 {
    let newstate: i32 = record(&ctx, layout(|l| &l.state_newstate)).unwrap_or(0);
    let protocol: u16 = record(&ctx, layout(|l| &l.state_protocol)).unwrap_or(0);
    if newstate as u32 != TCP_LISTEN || protocol != IPPROTO_TCP {
        return 0;
    }
    let sk: u64 = record(&ctx, layout(|l| &l.state_skaddr)).unwrap_or(0);
    let port: u16 = record(&ctx, layout(|l| &l.state_sport)).unwrap_or(0);
    let key = ListenPortKey {
        netns: sk_netns(sk),
        port,
        pad: 0,
    };
    if LISTEN_PORTS.insert(key, 1u8, 0).is_err() {
        count_map_error(map_error::LISTEN_PORTS);
    }
    0
}
