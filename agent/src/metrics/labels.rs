//! Decoding kernel values into label values.

use agent_common::{PORT_OTHER, REASON_UNKNOWN, STATE_NONE};

/// `state` label of a TCP state number (include/net/tcp_states.h).
pub fn tcp_state(state: u8) -> &'static str {
    match state {
        STATE_NONE => "none",
        1 => "established",
        2 => "syn_sent",
        3 => "syn_recv",
        4 => "fin_wait1",
        5 => "fin_wait2",
        6 => "time_wait",
        7 => "close",
        8 => "close_wait",
        9 => "last_ack",
        10 => "listen",
        11 => "closing",
        12 => "new_syn_recv",
        13 => "bound_inactive",
        _ => "unknown",
    }
}

/// `port` label: the port number, or `other`.
pub fn port(port: u16) -> String {
    if port == PORT_OTHER {
        "other".into()
    } else {
        port.to_string()
    }
}

/// `reason` label of an `enum sk_rst_reason` value, from the names this kernel gives.
pub fn reset_reason(reason: u8, names: &std::collections::HashMap<u8, String>) -> String {
    if reason == REASON_UNKNOWN {
        return "unknown".into();
    }
    names
        .get(&reason)
        .cloned()
        .unwrap_or_else(|| format!("reason_{reason}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_states_ports_and_reasons() {
        assert_eq!(tcp_state(0), "none");
        assert_eq!(tcp_state(7), "close");
        assert_eq!(tcp_state(200), "unknown");
        assert_eq!(port(0), "other");
        assert_eq!(port(443), "443");
        let names = [(1u8, "no_socket".to_string())].into_iter().collect();
        assert_eq!(reset_reason(1, &names), "no_socket");
        assert_eq!(reset_reason(40, &names), "reason_40");
        assert_eq!(reset_reason(REASON_UNKNOWN, &names), "unknown");
    }
}
