//! tcpdump expressions compiled by libpcap, exactly as tcpdump compiles them.
//!
//! The code libpcap emits depends on the handle it compiles for: the link type decides the
//! offsets, and on a live Linux handle `vlan` reads the kernel's VLAN ancillary data
//! (`SKF_AD_VLAN_TAG_PRESENT`) because the kernel strips the tag before a packet socket's
//! filter runs. A program meant for a packet socket on an interface is therefore compiled on
//! an activated live handle on that very interface (what tcpdump attaches); a dead handle of
//! the interface's link type is the fallback for showing code offline.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};

use pcap::{Activated, Capture, Linktype};

/// The snapshot length tcpdump uses by default.
pub const SNAPLEN: i32 = 262_144;

/// The most instructions the kernel accepts in a classic socket filter (`BPF_MAXINSNS`).
pub const BPF_MAXINSNS: usize = 4096;

/// A compiled classic BPF program.
#[derive(Clone, Debug)]
pub struct Program {
    /// The instructions, in the kernel's `struct sock_filter` layout.
    pub insns: Vec<libc::sock_filter>,
    /// The link type it was compiled for.
    pub linktype: Linktype,
}

/// Why an expression could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// libpcap rejected the expression.
    #[error("invalid filter expression `{expr}`: {message}")]
    Invalid {
        /// The expression.
        expr: String,
        /// libpcap's message.
        message: String,
    },
    /// The handle to compile on could not be opened.
    #[error("{0}")]
    Handle(String),
}

// libpcap's own functions the `pcap` crate does not wrap; the crate links libpcap.
unsafe extern "C" {
    fn bpf_image(insn: *const libc::sock_filter, n: c_int) -> *const c_char;
    fn pcap_compile(
        p: *mut c_void,
        fp: *mut BpfProgramRaw,
        s: *const c_char,
        optimize: c_int,
        netmask: c_uint,
    ) -> c_int;
    fn pcap_geterr(p: *mut c_void) -> *const c_char;
    fn pcap_freecode(fp: *mut BpfProgramRaw);
    fn pcap_open_dead_with_tstamp_precision(
        linktype: c_int,
        snaplen: c_int,
        precision: c_uint,
    ) -> *mut c_void;
    fn pcap_close(p: *mut c_void);
    fn pcap_setfilter(p: *mut c_void, fp: *mut BpfProgramRaw) -> c_int;
}

/// Sets `program` on a live handle (libpcap puts it in the kernel, as tcpdump's).
pub fn set_filter(handle: &mut Capture<pcap::Active>, program: &Program) -> Result<(), String> {
    let mut insns = program.insns.clone();
    let mut raw = BpfProgramRaw {
        bf_len: insns.len() as c_uint,
        bf_insns: insns.as_mut_ptr(),
    };
    let p: *mut c_void = handle.as_ptr().cast();
    // SAFETY: a live handle and a program of `bf_len` instructions; libpcap copies it.
    if unsafe { pcap_setfilter(p, &mut raw) } != 0 {
        // SAFETY: the handle's NUL-terminated error buffer.
        let message = unsafe { CStr::from_ptr(pcap_geterr(p)) };
        return Err(message.to_string_lossy().into_owned());
    }
    Ok(())
}

/// `struct bpf_program`.
#[repr(C)]
struct BpfProgramRaw {
    bf_len: c_uint,
    bf_insns: *mut libc::sock_filter,
}

/// `PCAP_NETMASK_UNKNOWN`: only `ip broadcast` needs the netmask, and refuses without one.
const NETMASK_UNKNOWN: c_uint = 0xffff_ffff;

/// Compiles `expr` on an activated handle (live or offline), optimized as tcpdump does.
pub fn compile_on<T: Activated + ?Sized>(
    handle: &Capture<T>,
    expr: &str,
) -> Result<Program, CompileError> {
    // SAFETY: the handle is activated and outlives the call.
    unsafe { compile_raw(handle.as_ptr().cast(), handle.get_datalink(), expr) }
}

/// # Safety
/// `p` must be a valid pcap_t for the duration of the call.
unsafe fn compile_raw(
    p: *mut c_void,
    linktype: Linktype,
    expr: &str,
) -> Result<Program, CompileError> {
    let invalid = |message: String| CompileError::Invalid {
        expr: expr.to_string(),
        message,
    };
    let text = CString::new(expr).map_err(|_| invalid("it contains a NUL byte".into()))?;
    let mut raw = BpfProgramRaw {
        bf_len: 0,
        bf_insns: std::ptr::null_mut(),
    };
    // SAFETY: `p` is valid (caller); `raw` is freed below.
    let rc = unsafe { pcap_compile(p, &mut raw, text.as_ptr(), 1, NETMASK_UNKNOWN) };
    if rc != 0 {
        // SAFETY: pcap_geterr returns the handle's NUL-terminated error buffer.
        let message = unsafe { CStr::from_ptr(pcap_geterr(p)) }
            .to_string_lossy()
            .into_owned();
        return Err(invalid(message));
    }
    let insns = if raw.bf_insns.is_null() {
        Vec::new()
    } else {
        // SAFETY: libpcap filled `bf_len` instructions at `bf_insns`.
        unsafe { std::slice::from_raw_parts(raw.bf_insns, raw.bf_len as usize) }.to_vec()
    };
    // SAFETY: allocated by pcap_compile above.
    unsafe { pcap_freecode(&mut raw) };
    Ok(Program { insns, linktype })
}

/// Compiles `expr` for a packet socket on interface `iface` of the current network
/// namespace: on an activated live handle there, as tcpdump does.
pub fn compile_live(iface: &str, expr: &str) -> Result<Program, CompileError> {
    let handle = open_live_for_compile(iface)?;
    compile_on(&handle, expr)
}

/// An activated live handle on `iface`, kept small: it only serves to compile.
pub fn open_live_for_compile(iface: &str) -> Result<Capture<pcap::Active>, CompileError> {
    Capture::from_device(iface)
        .and_then(|c| c.snaplen(SNAPLEN).buffer_size(1 << 16).open())
        .map_err(|e| CompileError::Handle(interface_error(iface, &e)))
}

/// A clear message for a handle that could not be opened on `iface`.
pub fn interface_error(iface: &str, e: &pcap::Error) -> String {
    if nix::net::if_::if_nametoindex(iface).is_err() {
        format!(
            "interface `{iface}` does not exist in this network namespace (list them with `ip link`)"
        )
    } else {
        format!("cannot open interface `{iface}`: {e}")
    }
}

/// Compiles `expr` for link type `linktype` without any interface, as `tcpdump -d -y`, with
/// tcpdump's snapshot length.
pub fn compile_dead(linktype: Linktype, expr: &str) -> Result<Program, CompileError> {
    // SAFETY: plain constructor, checked for NULL, closed below.
    let p = unsafe { pcap_open_dead_with_tstamp_precision(linktype.0, SNAPLEN, 0) };
    if p.is_null() {
        return Err(CompileError::Handle(format!(
            "libpcap cannot open a handle of link type {}",
            linktype.0
        )));
    }
    // SAFETY: `p` is valid until pcap_close.
    let result = unsafe { compile_raw(p, linktype, expr) };
    // SAFETY: opened above, closed once.
    unsafe { pcap_close(p) };
    result
}

impl Program {
    /// The program as `tcpdump -d` prints it, one instruction a line.
    pub fn image(&self) -> String {
        let mut out = String::new();
        for (n, insn) in self.insns.iter().enumerate() {
            // SAFETY: bpf_image reads one instruction and returns a static buffer, copied
            // at once (we call it from one thread at a time per process: `filter check`).
            let line = unsafe { CStr::from_ptr(bpf_image(insn, n as c_int)) };
            out.push_str(&line.to_string_lossy());
            out.push('\n');
        }
        out
    }

    /// Fails when the kernel would refuse the program for its size.
    pub fn check_size(&self, name: &str) -> Result<(), String> {
        if self.insns.len() > BPF_MAXINSNS {
            return Err(format!(
                "filter `{name}` compiles to {} classic BPF instructions; the kernel accepts at most {BPF_MAXINSNS} (BPF_MAXINSNS) in a socket filter: split it into smaller filters",
                self.insns.len()
            ));
        }
        Ok(())
    }
}

/// The link type of an interface from its ARPHRD type, as libpcap maps the common ones.
pub fn linktype_of_arphrd(arphrd: u16) -> Option<Linktype> {
    match arphrd {
        libc::ARPHRD_ETHER | libc::ARPHRD_LOOPBACK => Some(Linktype::ETHERNET),
        // DLT_RAW as Linux numbers it.
        libc::ARPHRD_NONE => Some(Linktype(12)),
        _ => None,
    }
}
