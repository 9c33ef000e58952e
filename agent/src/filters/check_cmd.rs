//! `sockscope filter check EXPR [--pcap FILE] [-i IFACE | --linktype NAME]`: compiles an
//! expression as tcpdump does, prints the program as `tcpdump -d` does and, with a capture
//! file, counts the packets in it that match, offline.

use std::{
    ffi::{c_int, c_uint},
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Args;
use pcap::{Capture, Linktype};

use super::compile::{self, CompileError, Program};

/// Options of `sockscope filter check`.
#[derive(Clone, Debug, Args)]
pub struct CheckArgs {
    /// The expression, in pcap-filter(7) syntax (several words are joined with spaces, as
    /// tcpdump does).
    #[arg(value_name = "EXPR", required = true, num_args = 1..)]
    pub expr: Vec<String>,
    /// Count the packets of this capture file (pcap or pcapng) that match; the program is
    /// then compiled for the file's link type.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["iface", "linktype"])]
    pub pcap: Option<PathBuf>,
    /// Compile for a packet socket on this interface (of the current network namespace),
    /// exactly what a live capture there attaches.
    #[arg(
        short = 'i',
        long = "iface",
        value_name = "IFACE",
        conflicts_with = "linktype"
    )]
    pub iface: Option<String>,
    /// Compile for this link type (libpcap's name: EN10MB, RAW, LINUX_SLL...) without any
    /// interface; EN10MB (Ethernet, also the link type of `lo`) by default.
    #[arg(long, value_name = "NAME")]
    pub linktype: Option<String>,
}

impl CheckArgs {
    /// The expression as one string.
    pub fn expression(&self) -> String {
        self.expr.join(" ")
    }
}

unsafe extern "C" {
    fn bpf_filter(
        pc: *const libc::sock_filter,
        p: *const u8,
        wirelen: c_uint,
        buflen: c_uint,
    ) -> c_uint;
    fn bpf_validate(f: *const libc::sock_filter, len: c_int) -> c_int;
}

impl Program {
    /// Whether the program accepts a packet of `wire_len` bytes on the wire of which `data`
    /// was captured (libpcap's own interpreter, as `tcpdump -r` runs it).
    pub fn matches(&self, data: &[u8], wire_len: u32) -> bool {
        if self.insns.is_empty() {
            return false;
        }
        // SAFETY: a validated program (see `run_offline`) over `data`'s bytes only.
        unsafe {
            bpf_filter(
                self.insns.as_ptr(),
                data.as_ptr(),
                wire_len,
                data.len() as c_uint,
            ) != 0
        }
    }

    fn valid(&self) -> bool {
        // SAFETY: reads `len` instructions.
        !self.insns.is_empty()
            && unsafe { bpf_validate(self.insns.as_ptr(), self.insns.len() as c_int) } != 0
    }
}

/// What matched in a capture file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OfflineCount {
    /// Packets the program accepts.
    pub matched: u64,
    /// Packets in the file.
    pub total: u64,
}

/// Compiles `expr` for the link type of `file` and counts its matching packets.
pub fn run_offline(file: &Path, expr: &str) -> Result<(Program, OfflineCount), String> {
    let mut capture = Capture::from_file(file)
        .map_err(|e| format!("cannot read capture file {}: {e}", file.display()))?;
    let program = compile::compile_on(&capture, expr).map_err(|e| e.to_string())?;
    if !program.valid() {
        return Err(format!("libpcap produced an invalid program for `{expr}`"));
    }
    let mut count = OfflineCount {
        matched: 0,
        total: 0,
    };
    loop {
        match capture.next_packet() {
            Ok(packet) => {
                count.total += 1;
                if program.matches(packet.data, packet.header.len) {
                    count.matched += 1;
                }
            }
            Err(pcap::Error::NoMorePackets) => break,
            Err(e) => return Err(format!("reading {}: {e}", file.display())),
        }
    }
    Ok((program, count))
}

/// Runs `sockscope filter check`: 0 when the expression compiles, 1 when it does not or the
/// file cannot be read.
pub fn main(args: &CheckArgs) -> ExitCode {
    let expr = args.expression();
    let result = if let Some(file) = &args.pcap {
        run_offline(file, &expr).map(|(program, count)| {
            print!("{}", program.image());
            println!(
                "{} of {} packets in {} match",
                count.matched,
                count.total,
                file.display()
            );
        })
    } else {
        compile_for(args, &expr)
            .map(|program| print!("{}", program.image()))
            .map_err(|e| e.to_string())
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sockscope: {e}");
            ExitCode::FAILURE
        }
    }
}

fn compile_for(args: &CheckArgs, expr: &str) -> Result<Program, CompileError> {
    if let Some(iface) = &args.iface {
        return compile::compile_live(iface, expr);
    }
    let linktype = match &args.linktype {
        None => Linktype::ETHERNET,
        Some(name) => Linktype::from_name(name).map_err(|_| {
            CompileError::Handle(format!(
                "unknown link type `{name}`; use libpcap's names such as EN10MB, RAW or LINUX_SLL"
            ))
        })?,
    };
    compile::compile_dead(linktype, expr)
}
