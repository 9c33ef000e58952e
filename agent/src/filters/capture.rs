//! `sockscope capture [-i IFACE] [-w FILE|-] [-c COUNT] [-s SNAPLEN] [--duration SECS] EXPR`:
//! captures what an expression matches through libpcap (the same live handle, program and
//! VLAN/loopback handling as tcpdump) into a pcap file written with `pcap-file`.
//!
//! Packets are written in whole records: a full disk truncates the file back to its last
//! complete packet, and a closed pipe (EPIPE) ends the capture quietly. On stderr: a live
//! count of packets captured and dropped (each second), and tcpdump's summary at the end.

use std::{
    cell::RefCell,
    fs::File,
    io::{self, Write},
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::PathBuf,
    process::ExitCode,
    rc::Rc,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use clap::Args;
use pcap::Capture;
use pcap_file::{
    DataLink, Endianness, TsResolution,
    pcap::{PcapHeader, PcapPacket, PcapWriter},
};

use super::compile;

/// Options of `sockscope capture`.
#[derive(Clone, Debug, Args)]
pub struct CaptureArgs {
    /// Interface to capture on (of the current network namespace); libpcap's default
    /// device when not given, as tcpdump.
    #[arg(short = 'i', long = "iface", value_name = "IFACE")]
    pub iface: Option<String>,
    /// Write the packets to this pcap file, or to standard output with `-`; without it, one
    /// line per packet is printed.
    #[arg(short = 'w', value_name = "FILE")]
    pub write: Option<PathBuf>,
    /// Stop after this many packets.
    #[arg(short = 'c', value_name = "COUNT")]
    pub count: Option<u64>,
    /// Bytes kept of each packet; 0 means tcpdump's default, 262144.
    #[arg(short = 's', value_name = "SNAPLEN", default_value_t = compile::SNAPLEN)]
    pub snaplen: i32,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// The pcap-filter(7) expression; everything when empty.
    #[arg(value_name = "EXPR", num_args = 0..)]
    pub expr: Vec<String>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as usize;
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// A byte buffer the pcap writer fills, shared with the [`Output`] that empties it.
#[derive(Clone, Default)]
struct Chunk(Rc<RefCell<Vec<u8>>>);

impl Write for Chunk {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The pcap file being written, in whole records.
struct Output {
    writer: PcapWriter<Chunk>,
    chunk: Chunk,
    /// Ends of the complete records in `chunk`.
    ends: Vec<usize>,
    out: File,
    /// A regular file, which can be truncated back to its last complete record.
    seekable: bool,
    committed: u64,
    /// Packets written whole.
    records: u64,
}

const CHUNK_BYTES: usize = 64 * 1024;

impl Output {
    fn new(out: File, linktype: i32, snaplen: u32) -> io::Result<Self> {
        let seekable = out.metadata().map(|m| m.is_file()).unwrap_or(false);
        let chunk = Chunk::default();
        let header = PcapHeader {
            version_major: 2,
            version_minor: 4,
            ts_correction: 0,
            ts_accuracy: 0,
            snaplen,
            datalink: DataLink::from(file_linktype(linktype)),
            ts_resolution: TsResolution::MicroSecond,
            endianness: Endianness::native(),
        };
        let writer = PcapWriter::with_header(chunk.clone(), header).map_err(io::Error::other)?;
        let ends = vec![chunk.0.borrow().len()];
        let mut output = Self {
            writer,
            chunk,
            ends,
            out,
            seekable,
            committed: 0,
            records: 0,
        };
        output.flush()?;
        output.records = 0;
        Ok(output)
    }

    fn packet(&mut self, ts: Duration, len: u32, data: &[u8]) -> io::Result<()> {
        self.writer
            .write_packet(&PcapPacket::new(ts, len, data))
            .map_err(io::Error::other)?;
        let end = self.chunk.0.borrow().len();
        self.ends.push(end);
        if end >= CHUNK_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the buffered records; on failure a regular file is cut back to its last whole
    /// record.
    fn flush(&mut self) -> io::Result<()> {
        let buf = std::mem::take(&mut *self.chunk.0.borrow_mut());
        let ends = std::mem::take(&mut self.ends);
        let mut written = 0;
        while written < buf.len() {
            match self.out.write(&buf[written..]) {
                Ok(0) => return self.cut(written, &ends, io::ErrorKind::WriteZero.into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.cut(written, &ends, e),
            }
        }
        self.committed += buf.len() as u64;
        self.records += ends.len() as u64;
        Ok(())
    }

    fn cut(&mut self, written: usize, ends: &[usize], error: io::Error) -> io::Result<()> {
        if self.seekable {
            let whole: Vec<usize> = ends.iter().copied().filter(|&e| e <= written).collect();
            let keep = whole.last().copied().unwrap_or(0);
            let _ = self.out.set_len(self.committed + keep as u64);
            self.committed += keep as u64;
            self.records += whole.len() as u64;
        }
        Err(error)
    }
}

/// Waits until `fd` has something to read, a signal arrives, or `timeout` passes.
fn wait_readable(fd: std::os::fd::RawFd, timeout: Duration) {
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut poll, 1, timeout.as_millis() as libc::c_int) };
}

/// The LINKTYPE_ value of a file for libpcap's DLT_ value (they differ for a few).
fn file_linktype(dlt: i32) -> u32 {
    match dlt {
        12 | 14 => 101, // DLT_RAW → LINKTYPE_RAW
        other => other as u32,
    }
}

/// Runs `sockscope capture`.
pub fn main(args: &CaptureArgs) -> ExitCode {
    match capture(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sockscope: {e}");
            ExitCode::FAILURE
        }
    }
}

fn capture(args: &CaptureArgs) -> Result<ExitCode, String> {
    let expr = args.expr.join(" ");
    let snaplen = if args.snaplen <= 0 {
        compile::SNAPLEN
    } else {
        args.snaplen
    };
    let iface = match &args.iface {
        Some(i) => i.clone(),
        None => pcap::Device::lookup()
            .ok()
            .flatten()
            .map(|d| d.name)
            .ok_or("no interface to capture on; name one with -i IFACE")?,
    };
    let mut handle = Capture::from_device(iface.as_str())
        .and_then(|c| c.snaplen(snaplen).timeout(100).open())
        .map_err(|e| compile::interface_error(&iface, &e))?;
    let program = compile::compile_on(&handle, &expr).map_err(|e| e.to_string())?;
    compile::set_filter(&mut handle, &program).map_err(|e| format!("setting the filter: {e}"))?;
    let linktype = handle.get_datalink();
    // Non-blocking, with our own poll: with TPACKET_V3 libpcap's read timeout only runs
    // once a packet has arrived, so a quiet interface would never let us stop.
    let mut handle = handle
        .setnonblock()
        .map_err(|e| format!("capturing on {iface}: {e}"))?;

    let mut output = match &args.write {
        None => None,
        Some(path) => {
            let file = if path.as_os_str() == "-" {
                let fd: OwnedFd = io::stdout()
                    .as_fd()
                    .try_clone_to_owned()
                    .map_err(|e| format!("standard output: {e}"))?;
                File::from(fd)
            } else {
                File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?
            };
            Some(
                Output::new(file, linktype.0, snaplen as u32)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?,
            )
        }
    };
    let name = args
        .write
        .as_ref()
        .map_or_else(String::new, |p| p.display().to_string());
    eprintln!(
        "sockscope: listening on {iface}, link-type {} ({}), snapshot length {snaplen} bytes",
        linktype
            .get_name()
            .unwrap_or_else(|_| linktype.0.to_string()),
        linktype
            .get_description()
            .unwrap_or_else(|_| "unknown".into()),
    );
    install_signal_handlers();
    let started = Instant::now();
    let deadline = args
        .duration
        .map(|s| started + Duration::from_secs_f64(s.max(0.0)));
    let mut last_report = Instant::now();
    let mut captured: u64 = 0;
    let mut write_error = None;
    let stdout = io::stdout();
    while !STOP.load(Ordering::Relaxed) {
        if args.count.is_some_and(|c| captured >= c)
            || deadline.is_some_and(|d| Instant::now() >= d)
        {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            let dropped = handle.stats().map(|s| s.dropped).unwrap_or(0);
            eprintln!("sockscope: {captured} packets captured, {dropped} dropped by kernel");
        }
        match handle.next_packet() {
            Ok(packet) => {
                captured += 1;
                let ts = Duration::new(
                    packet.header.ts.tv_sec as u64,
                    (packet.header.ts.tv_usec as u32) * 1000,
                );
                let result = match output.as_mut() {
                    Some(out) => out.packet(ts, packet.header.len, packet.data),
                    None => writeln!(
                        stdout.lock(),
                        "{}.{:06} {iface} length {} captured {}",
                        packet.header.ts.tv_sec,
                        packet.header.ts.tv_usec,
                        packet.header.len,
                        packet.header.caplen
                    ),
                };
                if let Err(e) = result {
                    write_error = Some(e);
                    break;
                }
            }
            Err(pcap::Error::TimeoutExpired) => {
                // Nothing waiting: hand what we have to the reader (a pipe's tcpdump).
                if let Some(Err(e)) = output.as_mut().map(Output::flush) {
                    write_error = Some(e);
                    break;
                }
                wait_readable(handle.as_raw_fd(), Duration::from_millis(100));
            }
            Err(e) => return Err(format!("capturing on {iface}: {e}")),
        }
    }
    if write_error.is_none()
        && let Some(Err(e)) = output.as_mut().map(Output::flush)
    {
        write_error = Some(e);
    }
    let stats = handle.stats().ok();
    eprintln!("{captured} packets captured");
    if let Some(stats) = stats {
        eprintln!("{} packets received by filter", stats.received);
        eprintln!("{} packets dropped by kernel", stats.dropped);
    }
    match write_error {
        None => Ok(ExitCode::SUCCESS),
        Some(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            eprintln!("sockscope: the reader of {name} went away; stopped");
            Ok(ExitCode::SUCCESS)
        }
        Some(e) => Err(format!(
            "writing {name}: {e}; stopped: the file holds {} packets, each whole",
            output.map_or(0, |o| o.records)
        )),
    }
}
