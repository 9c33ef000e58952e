//! A raw-socket TCP SYN generator with spoofed sources (IPv4 and IPv6).
//!
//! Use it from an "attacker" namespace whose peer routes the spoofed range back to it and
//! which then stays silent (see [`crate::VethLab`]): on plain loopback the kernel answers each
//! SYN-ACK with an RST, which empties the SYN queue again.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// IPv4 header (no options) + TCP header with one MSS option.
const IPV4_SYN_LEN: usize = 20 + TCP_SYN_LEN;
/// IPv6 header + TCP header with one MSS option.
const IPV6_SYN_LEN: usize = 40 + TCP_SYN_LEN;
/// TCP header (20 bytes) + MSS option (4 bytes).
const TCP_SYN_LEN: usize = 24;
/// The MSS our SYNs announce.
const SYN_MSS: u16 = 1460;

/// Spoofed source addresses (a prefix) and ports for [`syn_flood`]: every SYN is a new flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSpec {
    /// Network address of the source range (host bits are ignored).
    pub net: IpAddr,
    /// Prefix length of the source range.
    pub prefix: u8,
    /// Source ports to combine with each address.
    pub ports: RangeInclusive<u16>,
}

impl SourceSpec {
    /// Source range `net/prefix` with source ports `ports`; errors on an invalid prefix or empty port range.
    pub fn new(net: IpAddr, prefix: u8, ports: RangeInclusive<u16>) -> Result<SourceSpec> {
        let bits = if net.is_ipv4() { 32 } else { 128 };
        if prefix > bits {
            bail!("prefix /{prefix} too long for {net}");
        }
        if ports.is_empty() {
            bail!("empty source port range {ports:?}");
        }
        Ok(SourceSpec { net, prefix, ports })
    }

    /// Number of usable source addresses (host part all-zeros/all-ones skipped when there are more than 2; capped at 2^32).
    pub fn hosts(&self) -> u64 {
        let bits = if self.net.is_ipv4() { 32 } else { 128 };
        let host_bits = u32::from(bits - self.prefix).min(32);
        let all = 1u64 << host_bits;
        if all > 2 { all - 2 } else { all }
    }

    /// Number of distinct (address, port) flows.
    pub fn flows(&self) -> u64 {
        let ports = u64::from(*self.ports.end() - *self.ports.start()) + 1;
        self.hosts().saturating_mul(ports)
    }

    /// The `i`-th flow: addresses vary fastest, then ports (so `i < flows()` never repeats).
    pub fn flow(&self, i: u64) -> (IpAddr, u16) {
        let hosts = self.hosts();
        let host = i % hosts + u64::from(hosts > 2);
        let nports = u64::from(*self.ports.end() - *self.ports.start()) + 1;
        let port = *self.ports.start() + ((i / hosts) % nports) as u16;
        let addr = match self.net {
            IpAddr::V4(net) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.prefix))
                };
                IpAddr::V4(Ipv4Addr::from((u32::from(net) & mask) | host as u32))
            }
            IpAddr::V6(net) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.prefix))
                };
                IpAddr::V6(Ipv6Addr::from((u128::from(net) & mask) | u128::from(host)))
            }
        };
        (addr, port)
    }
}

/// Bounds and pacing for [`syn_flood`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynFloodOptions {
    /// SYNs per second; `None` sends as fast as the kernel takes them.
    pub rate: Option<u32>,
    /// Stop after this long even if fewer than `count` SYNs went out.
    pub time_limit: Duration,
    /// Index of the first flow in the [`SourceSpec`] (lets repeated floods use new flows).
    pub first_flow: u64,
}

impl Default for SynFloodOptions {
    /// As fast as possible, at most 10 s, from the first flow.
    fn default() -> Self {
        SynFloodOptions {
            rate: None,
            time_limit: Duration::from_secs(10),
            first_flow: 0,
        }
    }
}

/// Sends `count` TCP SYNs to `target` from spoofed `sources` (each a new flow) through a raw
/// socket in the calling thread's namespace; returns how many went out.
///
/// Needs CAP_NET_RAW. Stops early at `options.time_limit`. The family of `target` and
/// `sources` must match. Call it inside [`crate::Netns::run`] of the attacker namespace: from
/// the initial (host) namespace it refuses any target but loopback.
pub fn syn_flood(
    target: SocketAddr,
    sources: &SourceSpec,
    count: usize,
    options: &SynFloodOptions,
) -> Result<usize> {
    if target.is_ipv4() != sources.net.is_ipv4() {
        bail!(
            "target {target} and sources {}/{} differ in family",
            sources.net,
            sources.prefix
        );
    }
    if !target.ip().is_loopback() && crate::netns::in_initial_netns()? {
        bail!(
            "refusing to send spoofed SYNs to {target} from the host's network namespace: \
             run syn_flood inside a test namespace (Netns::run)"
        );
    }
    let last = options.first_flow.saturating_add(count as u64);
    if last > sources.flows() {
        bail!(
            "{count} SYNs from flow {} need more than the {} flows of {}/{} ports {:?}",
            options.first_flow,
            sources.flows(),
            sources.net,
            sources.prefix,
            sources.ports
        );
    }
    let domain = if target.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    // IPPROTO_RAW implies IP_HDRINCL (IPv4) / IPV6_HDRINCL (IPv6): we write the IP header.
    let socket = Socket::new(
        domain,
        Type::from(libc::SOCK_RAW),
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )
    .context("socket(SOCK_RAW, IPPROTO_RAW) (needs CAP_NET_RAW)")?;
    // A raw IPv6 socket takes the port as a protocol number: it must be 0 (or ≤ 255).
    let mut dest = target;
    dest.set_port(0);
    let dest = SockAddr::from(dest);

    let start = Instant::now();
    let mut sent = 0usize;
    while sent < count {
        let elapsed = start.elapsed();
        if elapsed >= options.time_limit {
            break;
        }
        if let Some(rate) = options.rate.filter(|r| *r > 0) {
            let due = Duration::from_secs_f64(sent as f64 / f64::from(rate));
            if due > elapsed {
                std::thread::sleep((due - elapsed).min(options.time_limit - elapsed));
                continue;
            }
        }
        let flow = options.first_flow + sent as u64;
        let (src, sport) = sources.flow(flow);
        let seq = mix(flow);
        let packet = match (src, target.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => syn_v4(s, sport, d, target.port(), seq).to_vec(),
            (IpAddr::V6(s), IpAddr::V6(d)) => syn_v6(s, sport, d, target.port(), seq).to_vec(),
            _ => unreachable!("families checked above"),
        };
        match socket.send_to(&packet, &dest) {
            Ok(_) => sent += 1,
            // A full device queue or neighbour queue: back off briefly and try again.
            Err(err) if matches!(err.raw_os_error(), Some(libc::ENOBUFS) | Some(libc::EAGAIN)) => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(err) => {
                return Err(err).with_context(|| format!("send SYN {sent} to {target}"));
            }
        }
    }
    Ok(sent)
}

/// A pseudo-random initial sequence number for flow `i` (splitmix64).
fn mix(i: u64) -> u32 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

/// An IPv4 packet carrying a TCP SYN with an MSS option, both checksums filled in.
pub(crate) fn syn_v4(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    seq: u32,
) -> [u8; IPV4_SYN_LEN] {
    let mut p = [0u8; IPV4_SYN_LEN];
    p[0] = 0x45; // version 4, IHL 5
    p[2..4].copy_from_slice(&(IPV4_SYN_LEN as u16).to_be_bytes());
    p[4..6].copy_from_slice(&(seq as u16).to_be_bytes()); // identification
    p[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    p[8] = 64; // TTL
    p[9] = libc::IPPROTO_TCP as u8;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let ip_sum = checksum(&[&p[..20]]);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    write_tcp_syn(&mut p[20..], sport, dport, seq);
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = libc::IPPROTO_TCP as u8;
    pseudo[10..12].copy_from_slice(&(TCP_SYN_LEN as u16).to_be_bytes());
    let tcp_sum = checksum(&[&pseudo, &p[20..]]);
    p[36..38].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

/// An IPv6 packet carrying a TCP SYN with an MSS option, the TCP checksum filled in.
pub(crate) fn syn_v6(
    src: Ipv6Addr,
    sport: u16,
    dst: Ipv6Addr,
    dport: u16,
    seq: u32,
) -> [u8; IPV6_SYN_LEN] {
    let mut p = [0u8; IPV6_SYN_LEN];
    p[0] = 0x60; // version 6, traffic class 0, flow label 0
    p[4..6].copy_from_slice(&(TCP_SYN_LEN as u16).to_be_bytes()); // payload length
    p[6] = libc::IPPROTO_TCP as u8; // next header
    p[7] = 64; // hop limit
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    write_tcp_syn(&mut p[40..], sport, dport, seq);
    let mut pseudo = [0u8; 40];
    pseudo[..16].copy_from_slice(&src.octets());
    pseudo[16..32].copy_from_slice(&dst.octets());
    pseudo[32..36].copy_from_slice(&(TCP_SYN_LEN as u32).to_be_bytes());
    pseudo[39] = libc::IPPROTO_TCP as u8;
    let tcp_sum = checksum(&[&pseudo, &p[40..]]);
    p[56..58].copy_from_slice(&tcp_sum.to_be_bytes());
    p
}

/// Writes a TCP SYN header (checksum zero) with an MSS option into `t` (24 bytes).
fn write_tcp_syn(t: &mut [u8], sport: u16, dport: u16, seq: u32) {
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    // ack 0
    t[12] = ((TCP_SYN_LEN / 4) as u8) << 4; // data offset
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&64240u16.to_be_bytes()); // window
    // checksum and urgent pointer 0
    t[20] = 2; // MSS option
    t[21] = 4;
    t[22..24].copy_from_slice(&SYN_MSS.to_be_bytes());
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts` (each of even length but the last).
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        let mut chunks = part.chunks_exact(2);
        for c in &mut chunks {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u32::from(*last) << 8;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify() {
        let p = syn_v4(
            Ipv4Addr::new(198, 19, 0, 1),
            1024,
            Ipv4Addr::new(198, 18, 0, 1),
            80,
            0x1234_5678,
        );
        // A correct checksum makes the sum over the covered bytes 0 (0xffff before the final !).
        assert_eq!(checksum(&[&p[..20]]), 0, "IPv4 header checksum");
        let mut pseudo = [0u8; 12];
        pseudo[..4].copy_from_slice(&p[12..16]);
        pseudo[4..8].copy_from_slice(&p[16..20]);
        pseudo[9] = 6;
        pseudo[11] = TCP_SYN_LEN as u8;
        assert_eq!(checksum(&[&pseudo, &p[20..]]), 0, "TCP checksum");
        assert_eq!(p[33], 0x02, "SYN flag only");
        assert_eq!(
            u32::from_be_bytes([p[24], p[25], p[26], p[27]]),
            0x1234_5678
        );

        let q = syn_v6(
            "2001:2:0:1::5".parse().expect("v6"),
            4000,
            "2001:2::1".parse().expect("v6"),
            443,
            7,
        );
        let mut pseudo = [0u8; 40];
        pseudo[..32].copy_from_slice(&q[8..40]);
        pseudo[35] = TCP_SYN_LEN as u8;
        pseudo[39] = 6;
        assert_eq!(checksum(&[&pseudo, &q[40..]]), 0, "TCPv6 checksum");
        assert_eq!(u16::from_be_bytes([q[42], q[43]]), 443);
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: 0001 f203 f4f5 f6f7 sums to ddf2 (checksum 220d).
        assert_eq!(
            checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]),
            0x220d
        );
        assert_eq!(checksum(&[&[0x00, 0x01, 0xf2], &[]]), !0xf201);
    }

    #[test]
    fn flows_are_distinct() -> Result<()> {
        let spec = SourceSpec::new("198.19.7.7".parse()?, 16, 1000..=1002)?;
        assert_eq!(spec.hosts(), 65534);
        assert_eq!(spec.flows(), 65534 * 3);
        assert_eq!(spec.flow(0), ("198.19.0.1".parse()?, 1000));
        assert_eq!(spec.flow(65533), ("198.19.255.254".parse()?, 1000));
        assert_eq!(spec.flow(65534), ("198.19.0.1".parse()?, 1001));
        let mut seen = std::collections::HashSet::new();
        for i in 0..spec.flows() {
            assert!(seen.insert(spec.flow(i)), "flow {i} repeats");
        }
        let v6 = SourceSpec::new("2001:2:0:1::".parse()?, 64, 1024..=65535)?;
        assert_eq!(v6.hosts(), (1 << 32) - 2);
        assert_eq!(v6.flow(0), ("2001:2:0:1::1".parse()?, 1024));
        assert_eq!(v6.flow(0x1_0000), ("2001:2:0:1::1:1".parse()?, 1024));
        let tiny = SourceSpec::new("198.19.0.9".parse()?, 32, 5..=5)?;
        assert_eq!(tiny.flows(), 1);
        assert_eq!(tiny.flow(0), ("198.19.0.9".parse()?, 5));
        assert!(SourceSpec::new("198.19.0.0".parse()?, 33, 1..=2).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let empty = 2..=1;
        assert!(SourceSpec::new("198.19.0.0".parse()?, 16, empty).is_err());
        Ok(())
    }

    #[test]
    fn flood_refuses_the_host_namespace() -> Result<()> {
        if !crate::netns::in_initial_netns()? {
            eprintln!("skipping: not in the initial network namespace");
            return Ok(());
        }
        let spec = SourceSpec::new("198.19.0.0".parse()?, 16, 1024..=65535)?;
        // count 0: nothing would be sent even without the guard.
        let err = syn_flood(
            "198.18.0.1:80".parse()?,
            &spec,
            0,
            &SynFloodOptions::default(),
        )
        .expect_err("the host's namespace is refused");
        assert!(err.to_string().contains("refusing"), "{err}");
        let err = crate::netns::refuse_initial(&crate::Netns::current()?, "test")
            .expect_err("the host's namespace is refused");
        assert!(err.to_string().contains("refusing"), "{err}");
        Ok(())
    }

    #[test]
    fn flood_checks_its_bounds() -> Result<()> {
        let spec = SourceSpec::new("198.19.0.9".parse()?, 32, 5..=6)?;
        let target: SocketAddr = "127.0.0.1:9".parse()?;
        let err =
            syn_flood(target, &spec, 3, &SynFloodOptions::default()).expect_err("only 2 flows");
        assert!(err.to_string().contains("flows"), "{err}");
        let err = syn_flood("[::1]:9".parse()?, &spec, 1, &SynFloodOptions::default())
            .expect_err("family mismatch");
        assert!(err.to_string().contains("family"), "{err}");
        Ok(())
    }
}
