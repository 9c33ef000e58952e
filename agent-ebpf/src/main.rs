//! sockscope's kernel programs. They only count: each event increments a per-CPU counter
//! keyed by its label tuple; the agent reads and sums the maps at scrape time.
#![no_std]
#![no_main]

mod kernel;
mod listen;
mod resets;
mod segments;
mod timewait;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach this; it is never called.
    loop {}
}

// GPL-compatible: bpf_probe_read_kernel is a GPL-only helper.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
