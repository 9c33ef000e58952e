//! `--filter NAME=EXPR` and `sockscope filter check`: any text through libpcap's compiler
//! (for Ethernet and loopback, as the agent compiles it), the `tcpdump -d` listing and the
//! translation to eBPF. None of it may panic; an expression libpcap rejects is an error.
#![no_main]

use agent::filters::{compile, translate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(expr) = std::str::from_utf8(data) else {
        return;
    };
    // ARPHRD_ETHER and ARPHRD_LOOPBACK.
    for arphrd in [1u16, 772] {
        let Some(linktype) = compile::linktype_of_arphrd(arphrd) else {
            panic!("no link type for ARPHRD {arphrd}");
        };
        let Ok(program) = compile::compile_dead(linktype, expr) else {
            continue;
        };
        let _ = program.image();
        let _ = program.check_size("fuzz");
        // The map descriptor is only written into the instructions: any value will do.
        let _ = translate::translate(&program.insns, -1, 0);
    }
});
