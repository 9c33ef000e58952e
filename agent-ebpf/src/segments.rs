//! The built-in socket filter: classifies the TCP segments an interface sends and receives
//! into `TCP_SEGMENTS` and returns 0, so no packet is ever queued to its packet socket.
//! Link layer: Ethernet (also `lo`), with at most one VLAN tag left in the frame. The head of
//! the packet is read once, with one helper call, and parsed from the stack.

use core::mem::MaybeUninit;

use agent_common::{PORT_OTHER, SegmentKey, map_error, segment};
use aya_ebpf::{
    helpers::bpf_skb_load_bytes,
    macros::{map, socket_filter},
    maps::{Array, PerCpuHashMap},
    programs::SkBuffContext,
};

use crate::kernel::{count_map_error, port_label};

/// Counters by interface, direction, flags class and local port.
#[map]
static TCP_SEGMENTS: PerCpuHashMap<SegmentKey, u64> = PerCpuHashMap::with_max_entries(8192, 0);

/// The network namespace (inode) of the interfaces, written by the agent: the listener
/// ports of that namespace keep their `port` label.
#[map]
static SEGMENTS_NETNS: Array<u32> = Array::with_max_entries(1, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const PACKET_OUTGOING: u32 = 4;

#[socket_filter]
pub fn tcp_segments(ctx: SkBuffContext) -> i64 {
    let _ = classify(&ctx);
    0
}

/// How much of the packet head is read at once: the TCP flags of a VLAN-tagged IPv4 packet
/// with the longest options end at byte 92 (18 + 60 + 14).
const HEAD: usize = 96;

/// The stack buffer the head is read into: a power of two, so that [`Head::byte`] can bound
/// every index with a mask.
const BUFFER: usize = 128;

/// `BUFFER - 1`, in read-only data: the compiler cannot drop the mask as redundant (it can
/// prove every index small), while the verifier reads its value and learns the bound. Older
/// verifiers (Linux 6.1) do not carry `index < len` over to the index, so without it they
/// refuse the variable-offset stack read.
#[unsafe(no_mangle)]
static HEAD_INDEX_MASK: usize = BUFFER - 1;

/// The first `len` bytes of the packet, read with one helper call. Zeroed (the verifier
/// wants the whole buffer written before a read at a variable offset) by sixteen 8-byte
/// stores in [`Head::zeroed`]: left to the compiler, the zeroing becomes a call to an
/// out-of-line `memset`, a loop of 128 one-byte stores, run for every packet.
#[repr(C, align(8))]
struct Head {
    bytes: [u8; BUFFER],
    len: usize,
}

impl Head {
    /// Zeroes `slot` in place (a `Head` moved out would be copied by a `memset` call again).
    #[inline(always)]
    fn zeroed(slot: &mut MaybeUninit<Head>) -> &mut Head {
        let words = slot.as_mut_ptr().cast::<u64>();
        for i in 0..size_of::<Head>() / 8 {
            // SAFETY: within the (8-aligned) `Head`. Volatile, so that the compiler keeps
            // the stores and does not turn them back into a `memset` call.
            unsafe { core::ptr::write_volatile(words.add(i), 0) };
        }
        // SAFETY: every byte was written (`Head` has no padding: its size is 8 × 17).
        unsafe { slot.assume_init_mut() }
    }

    /// Reads the first `min(len, HEAD)` bytes into `self`; false when the packet is too
    /// short to hold TCP. Filled in place: a `Head` returned by value is copied, twice.
    #[inline(always)]
    fn read(&mut self, ctx: &SkBuffContext) -> bool {
        let len = (ctx.len() as usize).min(HEAD);
        // The helper wants a length of at least one byte; a shorter packet holds no TCP.
        if len < 14 {
            return false;
        }
        self.len = len;
        // SAFETY: `len` bytes fit in the buffer; the helper checks the packet's bounds.
        let rc = unsafe {
            bpf_skb_load_bytes(
                ctx.skb.skb.cast(),
                0,
                self.bytes.as_mut_ptr().cast(),
                len as u32,
            )
        };
        rc == 0
    }

    /// The byte at `offset`, if the packet has it.
    #[inline(always)]
    fn byte(&self, offset: usize) -> Option<u8> {
        // SAFETY: a valid static; volatile only prevents constant folding.
        let at = offset & unsafe { core::ptr::read_volatile(&HEAD_INDEX_MASK) };
        // Offsets stay below HEAD + 14 < BUFFER, so the mask never changes one.
        if at < self.len && at < BUFFER {
            Some(self.bytes[at])
        } else {
            None
        }
    }

    #[inline(always)]
    fn be16(&self, offset: usize) -> Option<u16> {
        Some(u16::from(self.byte(offset)?) << 8 | u16::from(self.byte(offset + 1)?))
    }
}

#[inline(always)]
fn classify(ctx: &SkBuffContext) -> Option<()> {
    let mut slot = MaybeUninit::uninit();
    let head = Head::zeroed(&mut slot);
    if !head.read(ctx) {
        return None;
    }
    let mut l3 = 14usize;
    let mut proto = head.be16(12)?;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = head.be16(16)?;
        l3 = 18;
    }
    let l4 = match proto {
        ETH_P_IP => {
            let version_ihl = head.byte(l3)?;
            if version_ihl >> 4 != 4 || head.byte(l3 + 9)? != IPPROTO_TCP {
                return None;
            }
            // Later fragments carry no TCP header.
            if head.be16(l3 + 6)? & 0x1fff != 0 {
                return None;
            }
            l3 + usize::from(version_ihl & 0x0f) * 4
        }
        ETH_P_IPV6 => {
            if head.byte(l3 + 6)? != IPPROTO_TCP {
                return None;
            }
            l3 + 40
        }
        _ => return None,
    };
    let source = head.be16(l4)?;
    let dest = head.be16(l4 + 2)?;
    let tcp_flags = head.byte(l4 + 13)?;
    let flags = if tcp_flags & 0x04 != 0 {
        segment::FLAGS_RST
    } else if tcp_flags & 0x02 != 0 {
        if tcp_flags & 0x10 != 0 {
            segment::FLAGS_SYN_ACK
        } else {
            segment::FLAGS_SYN
        }
    } else if tcp_flags & 0x01 != 0 {
        segment::FLAGS_FIN
    } else {
        segment::FLAGS_OTHER
    };
    // SAFETY: the context's __sk_buff, readable by socket filters.
    let (pkt_type, ifindex) = unsafe { ((*ctx.skb.skb).pkt_type, (*ctx.skb.skb).ifindex) };
    let (direction, local) = if pkt_type == PACKET_OUTGOING {
        (segment::EGRESS, source)
    } else {
        (segment::INGRESS, dest)
    };
    let port = match SEGMENTS_NETNS.get(0) {
        Some(&netns) if netns != 0 => port_label(netns, local),
        _ => PORT_OTHER,
    };
    let key = SegmentKey {
        ifindex,
        port,
        direction,
        flags,
    };
    if let Some(value) = TCP_SEGMENTS.get_ptr_mut(key) {
        // SAFETY: this CPU's value of an existing entry.
        unsafe { *value += 1 };
    } else if TCP_SEGMENTS.insert(key, 1, 0).is_err() {
        count_map_error(map_error::TCP_SEGMENTS);
    }
    Some(())
}
