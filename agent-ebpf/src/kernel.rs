//! Shared access to kernel memory and to the counters: offsets come from the agent
//! (`LAYOUT`, resolved at start-up from the running kernel's BTF and format files).

use agent_common::{
    FIELD_ABSENT, KernelLayout, ListenPortKey, ListenerKey, PORT_GROUP_ENTRIES, PORT_OTHER,
    PORT_SEEN_ENTRIES, PORT_SEEN_SPAN, RDONLY_CAST_CALL, WATCH_PORT_WORDS,
};

/// `AF_INET6`.
pub const AF_INET6: u32 = 10;
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    cty::c_void,
    helpers::{bpf_probe_read_kernel, bpf_skc_to_tcp_sock},
    macros::map,
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap},
    programs::TracePointContext,
};
use aya_log_ebpf::warn;

/// Field offsets of the running kernel, written by the agent before load.
#[unsafe(no_mangle)]
static LAYOUT: KernelLayout = KernelLayout::ABSENT;

/// Listening ports per network namespace: filled here on every move to LISTEN, seeded and
/// pruned by the agent from sock_diag.
#[map]
pub static LISTEN_PORTS: HashMap<ListenPortKey, u8> = HashMap::with_max_entries(16384, 0);

/// Ports that have had a listener in some namespace since the programs were loaded, one
/// byte per port: set here on every move to LISTEN, never cleared. With
/// [`LISTEN_PORT_SEEDED`], the agent's marks, a port marked in neither has no listener
/// anywhere: the port rule answers `other` without the hash lookup in `LISTEN_PORTS`. Most
/// events (resets to closed ports, the ephemeral side of a connection) end there. Two maps
/// because the agent writes whole entries: one writer each, so neither can undo the other's
/// marks; bytes, not bits, because a plain store then marks a port without touching another
/// CPU's marks.
#[map]
pub static LISTEN_PORT_SEEN: Array<[u8; PORT_SEEN_SPAN as usize]> =
    Array::with_max_entries(PORT_SEEN_ENTRIES, 0);

/// The agent's marks: the ports of the listeners it seeds into `LISTEN_PORTS` from
/// sock_diag (those that were listening before the programs were loaded).
#[map]
pub static LISTEN_PORT_SEEDED: Array<[u8; PORT_SEEN_SPAN as usize]> =
    Array::with_max_entries(PORT_SEEN_ENTRIES, 0);

/// One byte per group of [`PORT_SEEN_SPAN`] ports, marked with any port of the group in
/// [`LISTEN_PORT_SEEN`] (and after it): 1 KiB, looked at first. The port arrays are 64 KiB
/// each, too large to stay in cache between two events (perf found the first load of a
/// reset's mark missing it most of the time); a port whose group has no mark is `other`
/// from these.
#[map]
pub static LISTEN_GROUP_SEEN: Array<[u8; PORT_SEEN_SPAN as usize]> =
    Array::with_max_entries(PORT_GROUP_ENTRIES, 0);

/// The group marks of [`LISTEN_PORT_SEEDED`], written by the agent.
#[map]
pub static LISTEN_GROUP_SEEDED: Array<[u8; PORT_SEEN_SPAN as usize]> =
    Array::with_max_entries(PORT_GROUP_ENTRIES, 0);

/// Sets byte `at` of entry `index` of `map`. A plain byte store: concurrent marks of other
/// ports touch other bytes, and a mark is never undone.
#[inline(always)]
fn mark(map: &Array<[u8; PORT_SEEN_SPAN as usize]>, index: u32, at: u32) {
    if let Some(span) = map.get_ptr_mut(index) {
        let at = (at % PORT_SEEN_SPAN) as usize;
        // SAFETY: an element of the array map; `at` is below its length.
        unsafe { core::ptr::write_volatile((*span).as_mut_ptr().add(at), 1) };
    }
}

/// Whether byte `at` of entry `index` of `map` is set.
#[inline(always)]
fn marked(map: &Array<[u8; PORT_SEEN_SPAN as usize]>, index: u32, at: u32) -> bool {
    map.get(index)
        .is_some_and(|span| span[(at % PORT_SEEN_SPAN) as usize] != 0)
}

/// Marks `port` in [`LISTEN_PORT_SEEN`], then its group in [`LISTEN_GROUP_SEEN`]: a program
/// that finds the group's mark finds the port's too.
#[inline(always)]
pub fn mark_listen_port(port: u16) {
    let group = u32::from(port) / PORT_SEEN_SPAN;
    mark(&LISTEN_PORT_SEEN, group, u32::from(port));
    mark(&LISTEN_GROUP_SEEN, group / PORT_SEEN_SPAN, group);
}

/// 1 when any port is watched: saves the bitmap lookup on every event otherwise.
#[unsafe(no_mangle)]
static WATCH_ANY: u32 = 0;

/// Ports whose label is never folded (`--watch.ports`), one bit per port.
#[map]
static WATCH_PORTS: Array<u64> = Array::with_max_entries(WATCH_PORT_WORDS, 0);

/// One word per CPU through which [`as_number`] passes kernel addresses.
#[map]
static ADDRESS_SLOT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// A kernel address the verifier knows as a typed pointer, as a plain number (to index
/// into, or to keep): stored in a per-CPU map slot and read back, which the verifier
/// allows programs loaded with `CAP_PERFMON` (the agent's right to read kernel memory).
/// Cheaper than reading it back from the stack through `bpf_probe_read_kernel`.
#[inline(always)]
pub fn as_number(address: u64) -> Option<u64> {
    let slot = ADDRESS_SLOT.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot of the array map.
    unsafe {
        core::ptr::write_volatile(slot, address);
        Some(core::ptr::read_volatile(slot))
    }
}

/// In-kernel map updates that failed, per map (`agent_common::map_error`).
#[map]
static MAP_ERRORS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(agent_common::map_error::COUNT, 0);

/// Reads one field of the layout. `read_volatile` keeps the compiler from folding the
/// build-time value: the agent rewrites it before the programs load.
#[inline(always)]
pub fn layout<F: Copy + 'static>(field: impl FnOnce(&'static KernelLayout) -> &'static F) -> F {
    // SAFETY: LAYOUT is a valid static; volatile only prevents constant folding.
    unsafe { core::ptr::read_volatile(field(&LAYOUT)) }
}

/// Reads a `T` from a tracepoint record at `offset`, if the field exists.
#[inline(always)]
pub fn record<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    if offset == FIELD_ABSENT {
        return None;
    }
    // SAFETY: the offset comes from this kernel's format file; the read is checked.
    unsafe { ctx.read_at::<T>(offset as usize).ok() }
}

/// Reads a `T` from kernel memory at `base + offset`.
#[inline(always)]
pub fn kread<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == FIELD_ABSENT {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address; a fault returns an error.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

/// `bpf_rdonly_cast(address, btf_id)`: the address as a read-only pointer to the kernel type
/// `btf_id`, through which plain loads read kernel memory (the verifier makes each a
/// fault-tolerant load, as for the BTF tracepoints' arguments) instead of one helper call per
/// read. The kernel replaces the call with a move. See [`agent_common::RDONLY_CAST_CALL`].
#[inline(always)]
fn rdonly_cast(address: u64, btf_id: u32) -> *const u8 {
    // SAFETY: the agent rewrites this call into one of the kernel function before loading.
    let cast: unsafe extern "C" fn(u64, u32) -> *const u8 =
        unsafe { core::mem::transmute(RDONLY_CAST_CALL as usize) };
    // SAFETY: the kernel function only retypes its argument.
    unsafe { cast(address, btf_id) }
}

/// The TCP socket `sk` as a `struct tcp_sock` the verifier knows, whose fields are then plain
/// loads: retyped for free where the kernel has `bpf_rdonly_cast`, else checked by the
/// helper `bpf_skc_to_tcp_sock` (null when it is no full TCP socket). Only for sockets known
/// to be TCP ones.
#[inline(always)]
pub fn tcp_sock<T>(sk: *const T) -> *const u8 {
    let id = layout(|l| &l.btf_tcp_sock);
    if id != FIELD_ABSENT {
        rdonly_cast(sk as u64, id)
    } else {
        // SAFETY: helper call on a socket the verifier knows; it checks the socket's kind.
        unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) as *const u8 }
    }
}

/// Reads a `T` from kernel memory at `base + offset`, `base` being a `struct` of BTF type
/// `btf_id` (a [`LAYOUT`] field): a plain load where the kernel has `bpf_rdonly_cast`, else
/// through the helper. A fault reads as zero on the first path, as `None` on the second.
#[inline(always)]
pub fn peek<T: Copy>(base: u64, btf_id: u32, offset: u32) -> Option<T> {
    if btf_id == FIELD_ABSENT {
        return kread(base, offset);
    }
    if base == 0 || offset == FIELD_ABSENT {
        return None;
    }
    Some(load(rdonly_cast(base, btf_id), offset))
}

/// A pointer field read with [`peek`], as a plain number (to test, offset or compare).
#[inline(always)]
pub fn peek_address(base: u64, btf_id: u32, offset: u32) -> Option<u64> {
    let address: u64 = peek(base, btf_id, offset)?;
    if btf_id == FIELD_ABSENT {
        Some(address)
    } else {
        as_number(address)
    }
}

/// Reads a `T` at `base + offset` with a plain load: only for pointers the verifier knows
/// by their BTF type (BTF tracepoint and fentry arguments, and pointers loaded from them),
/// where it checks the access against the type and turns a fault into a zero. `offset`
/// must come from [`LAYOUT`] (read-only, so the verifier sees a constant); a field the
/// kernel lacks reads as zero.
#[inline(always)]
pub fn load<T: Copy>(base: *const u8, offset: u32) -> T {
    if offset == FIELD_ABSENT {
        // SAFETY: only integers and pointers are loaded, for which zero is valid.
        return unsafe { core::mem::zeroed() };
    }
    // SAFETY: see above: the verifier checks the access against the kernel's BTF and
    // rewrites it into a fault-tolerant load.
    unsafe { core::ptr::read_volatile(base.add(offset as usize).cast::<T>()) }
}

/// Destination port of a received segment (the local port), from its TCP header.
#[inline(always)]
pub fn skb_local_port(skb: u64) -> u16 {
    let head: u64 = kread(skb, layout(|l| &l.skb_head)).unwrap_or(0);
    let th: u16 = kread(skb, layout(|l| &l.skb_transport_header)).unwrap_or(0);
    if head == 0 || th == u16::MAX {
        return 0;
    }
    peek::<u16>(head + u64::from(th), layout(|l| &l.btf_tcphdr), TCPHDR_DEST)
        .map_or(0, u16::from_be)
}

/// Offset of `dest` in `struct tcphdr` (the wire format).
pub const TCPHDR_DEST: u32 = 2;

/// Bytes of `struct sock_common` read at once: state, ports, family and the namespace
/// pointer all sit in this prefix on the kernels we know; a field beyond it is read alone.
const SKC_PREFIX: usize = 64;

/// The first bytes of a socket's `sock_common`, read with one helper call instead of one per
/// field (each call costs as much as the rest of a program).
pub struct SkCommon {
    sk: u64,
    bytes: [u8; SKC_PREFIX],
}

impl SkCommon {
    /// Reads the prefix of `sk`'s `sock_common`.
    #[inline(always)]
    pub fn read(sk: u64) -> Option<Self> {
        let bytes = kread::<[u8; SKC_PREFIX]>(sk, 0)?;
        Some(Self { sk, bytes })
    }

    /// The field at `offset`, from the prefix or, beyond it, from the socket.
    #[inline(always)]
    pub fn field<T: Copy>(&self, offset: u32) -> Option<T> {
        if offset == FIELD_ABSENT {
            return None;
        }
        let at = offset as usize;
        if at + core::mem::size_of::<T>() <= SKC_PREFIX {
            // SAFETY: in bounds of the buffer, checked above; unaligned read of plain data.
            Some(unsafe { core::ptr::read_unaligned(self.bytes.as_ptr().add(at).cast::<T>()) })
        } else {
            kread(self.sk, offset)
        }
    }

    /// The socket's network namespace inode.
    #[inline(always)]
    pub fn netns(&self) -> u32 {
        let net: u64 = self.field(layout(|l| &l.sk_net)).unwrap_or(0);
        kread(net, layout(|l| &l.net_inum)).unwrap_or(0)
    }
}

/// Network namespace inode of a socket (`sock_common`, so request and timewait sockets too).
#[inline(always)]
pub fn sk_netns(sk: u64) -> u32 {
    let net: u64 = kread(sk, layout(|l| &l.sk_net)).unwrap_or(0);
    kread(net, layout(|l| &l.net_inum)).unwrap_or(0)
}

/// An IPv4 address as the 16 bytes of a key: its four bytes (as read, in memory order)
/// first, then zeros. Built from words: a byte array zeroed and then partly overwritten
/// compiles to a call to an out-of-line `memset` loop.
#[inline(always)]
pub fn v4_in_16(v4: u32) -> [u8; 16] {
    // SAFETY: both types are 16 bytes of plain data; the transmute keeps memory order.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>([v4, 0, 0, 0]) }
}

/// Identity of a listening socket (`sock_common` fields), with `kind` still to set.
#[inline(always)]
pub fn listener_key(sk: u64) -> Option<ListenerKey> {
    let family: u16 = kread(sk, layout(|l| &l.sk_family))?;
    let port: u16 = kread(sk, layout(|l| &l.sk_num))?;
    let addr: [u8; 16] = if u32::from(family) == AF_INET6 {
        kread(sk, layout(|l| &l.sk_v6_rcv_saddr))?
    } else {
        v4_in_16(kread(sk, layout(|l| &l.sk_rcv_saddr))?)
    };
    Some(ListenerKey {
        netns: sk_netns(sk),
        port,
        family: family as u8,
        kind: 0,
        addr,
    })
}

/// Network namespace inode of a packet's device.
#[inline(always)]
pub fn skb_netns(skb: u64) -> u32 {
    let dev: u64 = kread(skb, layout(|l| &l.skb_dev)).unwrap_or(0);
    let net: u64 = kread(dev, layout(|l| &l.dev_net)).unwrap_or(0);
    kread(net, layout(|l| &l.net_inum)).unwrap_or(0)
}

/// The `port` label rule of METRICS.md, decided now and never re-folded: the port itself if
/// it is watched or has a listener in `netns`, else [`PORT_OTHER`].
#[inline(always)]
pub fn port_label(netns: u32, port: u16) -> u16 {
    // SAFETY: WATCH_ANY is a valid static; volatile only prevents constant folding.
    let watching = unsafe { core::ptr::read_volatile(&WATCH_ANY) } != 0;
    if watching
        && let Some(word) = WATCH_PORTS.get(u32::from(port) / 64)
        && word & (1u64 << (port % 64)) != 0
    {
        return port;
    }
    let group = u32::from(port) / PORT_SEEN_SPAN;
    let (groups, port) = (group / PORT_SEEN_SPAN, u32::from(port));
    if !marked(&LISTEN_GROUP_SEEN, groups, group) && !marked(&LISTEN_GROUP_SEEDED, groups, group) {
        return PORT_OTHER;
    }
    if !marked(&LISTEN_PORT_SEEN, group, port) && !marked(&LISTEN_PORT_SEEDED, group, port) {
        return PORT_OTHER;
    }
    let port = port as u16;
    let key = ListenPortKey {
        netns,
        port,
        pad: 0,
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { LISTEN_PORTS.get(key) }.is_some() {
        port
    } else {
        PORT_OTHER
    }
}

/// Adds one to `map[key]` on this CPU; see [`add`].
#[inline(always)]
pub fn increment<C: EbpfContext, K>(
    ctx: &C,
    map: &PerCpuHashMap<K, u64>,
    key: &K,
    error_index: u32,
) {
    add(ctx, map, key, 1, error_index);
}

/// Adds `n` to `map[key]` on this CPU, creating the entry; see [`value_of`].
#[inline(always)]
pub fn add<C: EbpfContext, K>(
    ctx: &C,
    map: &PerCpuHashMap<K, u64>,
    key: &K,
    n: u64,
    error_index: u32,
) {
    if let Some(value) = value_of(ctx, map, key, &0, error_index) {
        // SAFETY: per-CPU value of an existing entry; no other CPU writes it.
        unsafe { *value += n };
    }
}

/// This CPU's value of `map[key]`, the entry created with `init` when missing; a full map
/// is counted in `MAP_ERRORS[error_index]` and logged instead of being lost silently.
#[inline(always)]
pub fn value_of<C: EbpfContext, K, V>(
    ctx: &C,
    map: &PerCpuHashMap<K, V>,
    key: &K,
    init: &V,
    error_index: u32,
) -> Option<*mut V> {
    if let Some(value) = map.get_ptr_mut(key) {
        return Some(value);
    }
    // A failure is a full map, or another CPU creating the entry meanwhile: look again.
    let _ = map.insert(key, init, u64::from(BPF_NOEXIST));
    if let Some(value) = map.get_ptr_mut(key) {
        return Some(value);
    }
    // Logged once per CPU and map, not per lost event: a full map would otherwise flood the
    // log; the agent exports the running count (sockscope_ebpf_map_update_errors_total).
    if count_map_error(error_index) == 0 {
        warn!(
            ctx,
            "counter map {} is full: events are not counted (sockscope_ebpf_map_update_errors_total)",
            error_index
        );
    }
    None
}

/// Counts one failed map update; returns this CPU's count before it.
#[inline(always)]
pub fn count_map_error(index: u32) -> u64 {
    match MAP_ERRORS.get_ptr_mut(index) {
        Some(errors) => {
            // SAFETY: per-CPU array slot of this CPU.
            let before = unsafe { *errors };
            // SAFETY: as above.
            unsafe { *errors = before + 1 };
            before
        }
        None => 1,
    }
}
