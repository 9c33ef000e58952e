//! Reads the listen-backlog event counters (`LISTEN_EVENTS`, and `HANDSHAKES` with the
//! accept-queue occupancy) for the listen collector.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use agent_common::{HandshakeCounts, ListenerKey, listen_kind};
use aya::maps::{MapData, MapError, PerCpuHashMap};

use crate::metrics::listen::{ListenEventKind, ListenEventSource, ListenEvents, ListenerId};

/// Upper bounds of the occupancy buckets, as the kernel program sorts lengths into them.
pub fn occupancy_bounds() -> Vec<f64> {
    let n = usize::from(listen_kind::OCCUPANCY_BUCKETS);
    let mut bounds = Vec::with_capacity(n);
    bounds.push(0.0);
    let mut b = 1.0;
    while bounds.len() < n - 1 {
        bounds.push(b);
        b *= 2.0;
    }
    bounds.push(f64::INFINITY);
    bounds
}

/// The kernel's per-listener counters.
pub struct ListenMap {
    map: PerCpuHashMap<MapData, ListenerKey, u64>,
    handshakes: PerCpuHashMap<MapData, ListenerKey, HandshakeCounts>,
}

impl ListenMap {
    /// Wraps the `LISTEN_EVENTS` and `HANDSHAKES` maps.
    pub fn new(
        map: PerCpuHashMap<MapData, ListenerKey, u64>,
        handshakes: PerCpuHashMap<MapData, ListenerKey, HandshakeCounts>,
    ) -> Self {
        Self { map, handshakes }
    }
}

fn listener_id(key: &ListenerKey) -> ListenerId {
    let addr = if u32::from(key.family) == libc::AF_INET6 as u32 {
        IpAddr::V6(Ipv6Addr::from(key.addr))
    } else {
        IpAddr::V4(Ipv4Addr::new(
            key.addr[0],
            key.addr[1],
            key.addr[2],
            key.addr[3],
        ))
    };
    ListenerId {
        netns: u64::from(key.netns),
        addr,
        port: key.port,
    }
}

fn event_kind(kind: u8) -> Option<ListenEventKind> {
    Some(match kind {
        listen_kind::OVERFLOW_SYN => ListenEventKind::OverflowSyn,
        listen_kind::OVERFLOW_ACK => ListenEventKind::OverflowAck,
        listen_kind::OVERFLOW_ACK_UNQUEUED => ListenEventKind::OverflowAckUnqueued,
        listen_kind::SYN_QUEUE_FULL_DROP => ListenEventKind::SynQueueFullDrop,
        listen_kind::SYN_QUEUE_FULL_COOKIE => ListenEventKind::SynQueueFullCookie,
        listen_kind::SYNACK_RETRANSMIT => ListenEventKind::SynackRetransmit,
        _ => return None,
    })
}

impl ListenEventSource for ListenMap {
    fn read(&self) -> anyhow::Result<ListenEvents> {
        let buckets = usize::from(listen_kind::OCCUPANCY_BUCKETS);
        let mut counters = Vec::new();
        for entry in self.map.iter() {
            let (key, values) = match entry {
                Ok(kv) => kv,
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(e.into()),
            };
            if let Some(kind) = event_kind(key.kind) {
                counters.push((listener_id(&key), kind, values.iter().sum()));
            }
        }
        let mut occupancy: HashMap<ListenerId, Vec<u64>> = HashMap::new();
        let mut sums: HashMap<ListenerId, u64> = HashMap::new();
        for entry in self.handshakes.iter() {
            let (key, values) = match entry {
                Ok(kv) => kv,
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(e.into()),
            };
            let id = listener_id(&key);
            let mut handshakes = 0;
            let histogram = occupancy.entry(id).or_insert_with(|| vec![0; buckets]);
            let sum = sums.entry(id).or_insert(0);
            for cpu in values.iter() {
                handshakes += cpu.handshakes;
                *sum += cpu.occupancy_sum;
                for (total, n) in histogram.iter_mut().zip(cpu.occupancy) {
                    *total += n;
                }
            }
            counters.push((id, ListenEventKind::Handshake, handshakes));
        }
        // Handshakes attributed without a listener carry no lengths: no empty histogram.
        occupancy.retain(|_, h| h.iter().any(|&n| n != 0));
        sums.retain(|id, _| occupancy.contains_key(id));
        Ok(ListenEvents {
            counters,
            occupancy: occupancy.into_iter().collect(),
            occupancy_sums: sums.into_iter().collect(),
            occupancy_bounds: occupancy_bounds(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_match_the_kernel_buckets() {
        let b = occupancy_bounds();
        assert_eq!(b.len(), usize::from(listen_kind::OCCUPANCY_BUCKETS));
        assert_eq!(&b[..4], &[0.0, 1.0, 2.0, 4.0]);
        assert_eq!(b[b.len() - 2], 65536.0);
        assert!(b[b.len() - 1].is_infinite());
    }

    #[test]
    fn decodes_keys() {
        let mut key = ListenerKey {
            netns: 7,
            port: 80,
            family: 2,
            kind: 0,
            addr: [0; 16],
        };
        key.addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let id = listener_id(&key);
        assert_eq!(id.addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        key.family = 10;
        key.addr = Ipv6Addr::LOCALHOST.octets();
        assert_eq!(listener_id(&key).addr, IpAddr::V6(Ipv6Addr::LOCALHOST));
    }
}
