//! TIME_WAIT entries per local port (`TIME_WAIT_ENTERED`), counted from
//! `inet_sock_set_state` by `listen_track` (no program of its own: one hook, one run).
//!
//! No tracepoint shows a socket entering TIME_WAIT: `tcp_time_wait()` puts a new timewait
//! socket into the established hash (at the head of the chain of the socket's own hash
//! value, replacing the full socket) and then calls `tcp_done()`, whose move to CLOSE is
//! the tracepoint. So at every move to CLOSE from FIN_WAIT1, FIN_WAIT2 or CLOSING the
//! program looks at that chain: a timewait socket with this connection's addresses, ports,
//! hash and namespace there means the socket was just handed over. A socket that dies
//! without one (reset received or sent, FIN_WAIT2 timeout, orphan limits, and
//! `tcp_max_tw_buckets` reached) finds none. See docs/KERNEL.md for the limits.

use agent_common::{FIELD_ABSENT, TimeWaitKey, map_error, tw_class};
use aya_ebpf::{EbpfContext, macros::map, maps::PerCpuHashMap};

use crate::kernel::{
    AF_INET6, SkCommon, as_number, increment, kread, layout, load, peek, peek_address, port_label,
    tcp_sock,
};

/// TIME_WAIT entries per namespace and local-port label.
#[map]
static TIME_WAIT_ENTERED: PerCpuHashMap<TimeWaitKey, u64> =
    PerCpuHashMap::with_max_entries(16384, 0);

/// 1 when the `timewait` collector is on: saves the hash walk otherwise.
#[unsafe(no_mangle)]
static TIMEWAIT_ON: u32 = 0;

/// `TCP_FIN_WAIT1`, `TCP_FIN_WAIT2`, `TCP_CLOSE`, `TCP_CLOSING`, `TCP_TIME_WAIT`.
const TCP_FIN_WAIT1: i32 = 4;
const TCP_FIN_WAIT2: i32 = 5;
const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE: i32 = 7;
const TCP_CLOSING: i32 = 11;

/// Entries of the chain looked at. Older kernels put the timewait socket at the head of the
/// chain; newer ones put it where the full socket was (`sk_nulls_replace_node_init_rcu`),
/// and full sockets are added at the tail: the walk has to cover a whole ordinary chain.
const CHAIN_STEPS: usize = 32;

/// Whether a move `oldstate` → `newstate` may be the hand-over to a timewait socket.
#[inline(always)]
pub fn may_enter(oldstate: i32, newstate: i32) -> bool {
    newstate == TCP_CLOSE
        && (oldstate == TCP_FIN_WAIT1 || oldstate == TCP_FIN_WAIT2 || oldstate == TCP_CLOSING)
        // SAFETY: TIMEWAIT_ON is a valid static; volatile only prevents constant folding.
        && unsafe { core::ptr::read_volatile(&TIMEWAIT_ON) } != 0
}

/// The closing socket's identity, and where its timewait socket would be.
struct Closing {
    /// `struct net *`, compared with the candidates' own.
    net: u64,
    netns: u32,
    hash: u32,
    addrs: u64,
    dport: u16,
    family: u16,
    sport: u16,
    /// `inet_hashinfo.ehash` (as a plain number) and `ehash_mask`.
    ehash: u64,
    mask: u32,
}

/// The full socket `sk` is moving to CLOSE from FIN_WAIT1/FIN_WAIT2/CLOSING: count it when
/// its timewait socket is in the established hash. Reads through the helper.
#[inline(always)]
pub fn closed<C: EbpfContext>(ctx: &C, sk: u64) -> Option<()> {
    let c = SkCommon::read(sk)?;
    let net: u64 = c.field(layout(|l| &l.sk_net))?;
    let hashinfo: u64 = kread(net, layout(|l| &l.net_tw_hashinfo))?;
    let closing = Closing {
        net,
        netns: kread(net, layout(|l| &l.net_inum))?,
        hash: c.field(layout(|l| &l.sk_hash))?,
        addrs: c.field(layout(|l| &l.sk_addrpair))?,
        dport: c.field(layout(|l| &l.sk_dport))?,
        family: c.field(layout(|l| &l.sk_family))?,
        // skc_num is already 0 here when the port was released: inet_sport survives.
        sport: u16::from_be(kread::<u16>(sk, layout(|l| &l.inet_sport))?),
        ehash: kread(hashinfo, layout(|l| &l.hashinfo_ehash))?,
        mask: kread(hashinfo, layout(|l| &l.hashinfo_ehash_mask))?,
    };
    count_if_handed_over(ctx, sk, &closing, || port_range(net))
}

/// [`closed`] for a socket the verifier knows by its BTF type (the BTF tracepoint): the
/// socket, its namespace and the hash table are read with plain loads; only the chain walk,
/// whose addresses the verifier cannot follow, goes through the helper.
#[inline(always)]
pub fn closed_typed<C: EbpfContext>(ctx: &C, sk: *const u8) -> Option<()> {
    // A socket moving from FIN_WAIT1/FIN_WAIT2/CLOSING, and of protocol TCP: a TCP socket.
    let tp = tcp_sock(sk);
    if tp.is_null() {
        return None;
    }
    let net: *const u8 = load(tp, layout(|l| &l.sk_net));
    let hashinfo: *const u8 = load(net, layout(|l| &l.net_tw_hashinfo));
    let ehash: u64 = load(hashinfo, layout(|l| &l.hashinfo_ehash));
    let closing = Closing {
        // A number, as the candidates' `skc_net` is read.
        net: as_number(net as u64)?,
        netns: load(net, layout(|l| &l.net_inum)),
        hash: load(tp, layout(|l| &l.sk_hash)),
        addrs: load(tp, layout(|l| &l.sk_addrpair)),
        dport: load(tp, layout(|l| &l.sk_dport)),
        family: load(tp, layout(|l| &l.sk_family)),
        // skc_num is already 0 here when the port was released: inet_sport survives.
        sport: u16::from_be(load(tp, layout(|l| &l.inet_sport))),
        // The bucket is indexed by a run-time value, which the verifier allows only on a
        // plain number.
        ehash: as_number(ehash)?,
        mask: load(hashinfo, layout(|l| &l.hashinfo_ehash_mask)),
    };
    let range = if layout(|l| &l.net_port_range_ints) != 0 {
        let r: [i32; 2] = load(net, layout(|l| &l.net_port_range));
        (r[0] as u32, r[1] as u32)
    } else {
        let range: u32 = load(net, layout(|l| &l.net_port_range));
        (range & 0xffff, range >> 16)
    };
    count_if_handed_over(ctx, sk as u64, &closing, || range)
}

/// The namespace's `ip_local_port_range`, through the helper.
#[inline(always)]
fn port_range(net: u64) -> (u32, u32) {
    let at = layout(|l| &l.net_port_range);
    if layout(|l| &l.net_port_range_ints) != 0 {
        // Read without the seqlock: a range being rewritten now may be seen half-done.
        let r: [i32; 2] = kread(net, at).unwrap_or([1, 0]);
        (r[0] as u32, r[1] as u32)
    } else {
        let range: u32 = kread(net, at).unwrap_or(0);
        (range & 0xffff, range >> 16)
    }
}

/// Walks the chain of `c`'s hash value for its timewait socket, and counts the entry.
#[inline(always)]
fn count_if_handed_over<C: EbpfContext>(
    ctx: &C,
    sk: u64,
    c: &Closing,
    range: impl FnOnce() -> (u32, u32),
) -> Option<()> {
    // struct inet_ehash_bucket is one hlist_nulls_head: one pointer, where a chain link
    // (hlist_nulls_node) has its `next`.
    let links = layout(|l| &l.btf_nulls_node);
    let mut node = peek_address(c.ehash + u64::from(c.hash & c.mask) * 8, links, 0)?;
    let link = u64::from(layout(|l| &l.sk_nulls_node));
    let v6 = u32::from(c.family) == AF_INET6;
    let mut found = false;
    for _ in 0..CHAIN_STEPS {
        // The end of a nulls list is an odd marker value.
        if node & 1 != 0 || node == 0 {
            return None;
        }
        let tw = node - link;
        if is_handed_over(c, tw)? && (!v6 || same_v6_peer(sk, tw)) {
            found = true;
            break;
        }
        node = peek_address(node, links, 0)?;
    }
    if !found {
        return None;
    }
    let mut key = TimeWaitKey {
        netns: c.netns,
        port: port_label(c.netns, c.sport),
        class: tw_class::PORT,
        pad: 0,
    };
    if key.port == 0 {
        let (low, high) = range();
        key.class = if u32::from(c.sport) >= low && u32::from(c.sport) <= high {
            tw_class::EPHEMERAL
        } else {
            tw_class::OTHER
        };
    }
    increment(ctx, &TIME_WAIT_ENTERED, &key, map_error::TIME_WAIT_ENTERED);
    Some(())
}

/// Whether the socket at `tw` in the chain is `c`'s timewait socket (IPv4 addresses only):
/// field by field with plain loads where the kernel allows them, else from one read of its
/// `sock_common`.
#[inline(always)]
fn is_handed_over(c: &Closing, tw: u64) -> Option<bool> {
    let common = layout(|l| &l.btf_sock_common);
    if common == FIELD_ABSENT {
        let t = SkCommon::read(tw)?;
        return Some(
            t.field::<u8>(layout(|l| &l.sk_state)) == Some(TCP_TIME_WAIT)
                && t.field::<u64>(layout(|l| &l.sk_net)) == Some(c.net)
                && t.field::<u32>(layout(|l| &l.sk_hash)) == Some(c.hash)
                && t.field::<u64>(layout(|l| &l.sk_addrpair)) == Some(c.addrs)
                && t.field::<u16>(layout(|l| &l.sk_dport)) == Some(c.dport)
                && t.field::<u16>(layout(|l| &l.sk_num)) == Some(c.sport),
        );
    }
    Some(
        peek::<u8>(tw, common, layout(|l| &l.sk_state)) == Some(TCP_TIME_WAIT)
            && peek::<u32>(tw, common, layout(|l| &l.sk_hash)) == Some(c.hash)
            && peek::<u64>(tw, common, layout(|l| &l.sk_addrpair)) == Some(c.addrs)
            && peek::<u16>(tw, common, layout(|l| &l.sk_dport)) == Some(c.dport)
            && peek::<u16>(tw, common, layout(|l| &l.sk_num)) == Some(c.sport)
            && peek_address(tw, common, layout(|l| &l.sk_net)) == Some(c.net),
    )
}

/// IPv6 sockets: the remote addresses match too (`skc_addrpair` holds only IPv4 ones).
#[inline(always)]
fn same_v6_peer(sk: u64, tw: u64) -> bool {
    let at = layout(|l| &l.sk_v6_daddr);
    match (kread::<[u64; 2]>(sk, at), kread::<[u64; 2]>(tw, at)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}
