//! What `sockscope listeners` shows, whichever source measured it, and the diagnosis in
//! plain words.
//!
//! Both sources (the kernel itself, or a running agent's page) fill a [`Report`];
//! [`Report::finish`] then diagnoses every listener and sorts the troubled ones first, so
//! the table and the JSON document say the same thing.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;

/// What "full" means for an accept queue in this report. The kernel drops a new connection
/// when `sk_ack_backlog > sk_max_ack_backlog`, so the length can reach limit + 1; at
/// length == limit the queue has room for exactly one more, which a burst takes at once.
pub const FULL_MEANS: &str =
    "accept queue length >= limit (the kernel admits one more and drops past limit + 1)";

/// Whether an accept queue counts as full (see [`FULL_MEANS`]). A `listen(fd, 0)` socket
/// has limit 0 and still admits one connection: an empty one is not full.
pub fn is_full(length: u64, limit: u64) -> bool {
    length >= limit.max(1)
}

/// Figures that could not be measured, and why.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Unavailable {
    /// Which columns or figures.
    pub what: String,
    /// Why, in words a person can act on.
    pub why: String,
}

/// The TCP settings of a namespace that the diagnosis names (read at the end of the interval).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Settings {
    /// `net.core.somaxconn`.
    pub somaxconn: Option<i64>,
    /// `net.ipv4.tcp_syncookies`.
    pub tcp_syncookies: Option<i64>,
    /// `net.ipv4.tcp_max_syn_backlog`.
    pub tcp_max_syn_backlog: Option<i64>,
}

/// A namespace's own counters' increase during the interval.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct NsCounters {
    /// `TcpExtListenOverflows`.
    pub listen_overflows: Option<u64>,
    /// `TcpExtListenDrops`.
    pub listen_drops: Option<u64>,
    /// `TcpExtTCPReqQFullDrop`.
    pub syn_queue_full_drops: Option<u64>,
    /// `TcpExtTCPReqQFullDoCookies`.
    pub syn_queue_full_cookies: Option<u64>,
}

/// A network namespace with at least one listener.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Namespace {
    /// Its inode (the `netns` label).
    pub netns: u64,
    /// Its `ip netns` name; empty when it has none.
    pub name: String,
    /// The lowest pid living in it, if any.
    pub pid: Option<u32>,
    /// That process's command name.
    pub comm: String,
    /// Its TCP settings.
    pub settings: Settings,
    /// Its counters' increase during the interval, when read at both ends.
    pub counters: Option<NsCounters>,
}

impl Namespace {
    /// What tells a person which namespace this is: its name, else the comm of its first
    /// process, else nothing.
    pub fn label(&self) -> &str {
        if self.name.is_empty() {
            &self.comm
        } else {
            &self.name
        }
    }
}

/// The process holding a listening socket open.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Process {
    /// Its pid (the lowest, when several share the socket: a pre-forking server's master).
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`).
    pub comm: String,
}

/// The accept queue over the interval.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct AcceptQueue {
    /// Length at the end (summed over the sockets of the listener).
    pub length: u64,
    /// Limit (`min(backlog, somaxconn)`, summed over the sockets).
    pub limit: u64,
    /// Longest seen in a sample.
    pub max: u64,
    /// Samples of this listener taken (it may have appeared during the interval).
    pub samples: u32,
    /// Samples in which it was full (see [`FULL_MEANS`]).
    pub full_samples: u32,
    /// `full_samples` in percent of `samples`.
    pub full_percent: f64,
}

/// The SYN queue (half-open requests) over the interval.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct SynQueue {
    /// Length at the end.
    pub length: u64,
    /// Longest seen in a sample.
    pub max: u64,
}

/// Accept-queue overflows during the interval, by stage; `None` where this run cannot count
/// that stage (the unavailable list says why).
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Overflows {
    /// SYNs dropped because the accept queue was full.
    pub syn: Option<u64>,
    /// Handshake-completing ACKs dropped because the accept queue was full.
    pub ack: Option<u64>,
    /// Both stages that could be counted.
    pub total: Option<u64>,
}

impl Overflows {
    /// Overflows of the stages that could be counted.
    pub fn new(syn: Option<u64>, ack: Option<u64>) -> Self {
        let total = match (syn, ack) {
            (None, None) => None,
            (s, a) => Some(s.unwrap_or(0) + a.unwrap_or(0)),
        };
        Self { syn, ack, total }
    }
}

/// SYNs that met a full SYN queue (or any SYN with `tcp_syncookies=2`) during the interval.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct SynQueueFull {
    /// Dropped (cookies off).
    pub drop: u64,
    /// Answered with a SYN cookie.
    pub cookie: u64,
}

/// One listener: every socket listening on one address and port of one namespace.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Listener {
    /// Network namespace inode.
    pub netns: u64,
    /// `ipv4` or `ipv6`.
    pub family: &'static str,
    /// Listening address as the kernel holds it.
    pub addr: IpAddr,
    /// Port.
    pub port: u16,
    /// `addr:port`, `[v6]:port`.
    pub listen: String,
    /// Sockets behind it (more than 1 for an SO_REUSEPORT group).
    pub sockets: u32,
    /// The process holding it open, when it could be found.
    pub process: Option<Process>,
    /// Accept queue.
    pub accept_queue: AcceptQueue,
    /// SYN queue.
    pub syn_queue: SynQueue,
    /// Accept-queue overflows during the interval.
    pub overflows: Overflows,
    /// SYN-queue-full events during the interval; `None` when they cannot be counted.
    pub syn_queue_full: Option<SynQueueFull>,
    /// Every drop charged to the listener during the interval (`sk_drops`: the per-listener
    /// share of `TcpExtListenDrops`); `None` when the kernel did not report it.
    pub drops: Option<u64>,
    /// Plain-words findings; `["ok"]` when there is nothing to say.
    pub diagnosis: Vec<String>,
    /// Whether the diagnosis found a problem.
    pub troubled: bool,
}

impl Listener {
    /// A listener with its identity set and nothing measured yet.
    pub fn new(netns: u64, addr: IpAddr, port: u16) -> Self {
        Self {
            netns,
            family: if addr.is_ipv4() { "ipv4" } else { "ipv6" },
            addr,
            port,
            listen: SocketAddr::new(addr, port).to_string(),
            sockets: 1,
            process: None,
            accept_queue: AcceptQueue::default(),
            syn_queue: SynQueue::default(),
            overflows: Overflows::default(),
            syn_queue_full: None,
            drops: None,
            diagnosis: Vec::new(),
            troubled: false,
        }
    }
}

/// One measurement over one interval.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    /// `kernel` (read directly) or the agent's URL.
    pub source: String,
    /// Seconds between the first and the last reading.
    pub interval_seconds: f64,
    /// Times the queues were read during the interval (both readings included).
    pub samples: u32,
    /// What a full accept queue means here.
    pub full_means: &'static str,
    /// Figures that could not be measured, and why.
    pub unavailable: Vec<Unavailable>,
    /// The namespaces with listeners.
    pub namespaces: Vec<Namespace>,
    /// The listeners, troubled first.
    pub listeners: Vec<Listener>,
}

impl Report {
    /// An empty report from `source`.
    pub fn new(source: String) -> Self {
        Self {
            source,
            interval_seconds: 0.0,
            samples: 0,
            full_means: FULL_MEANS,
            unavailable: Vec::new(),
            namespaces: Vec::new(),
            listeners: Vec::new(),
        }
    }

    /// The namespace `netns`, if it has listeners.
    pub fn namespace(&self, netns: u64) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.netns == netns)
    }

    /// Computes the percentages, diagnoses every listener and sorts: troubled first (most
    /// drops first), then by namespace, port and address.
    pub fn finish(&mut self) {
        self.namespaces.sort_by_key(|n| n.netns);
        let namespaces = std::mem::take(&mut self.namespaces);
        for l in &mut self.listeners {
            let q = &mut l.accept_queue;
            q.full_percent = if q.samples == 0 {
                0.0
            } else {
                f64::from(q.full_samples) * 100.0 / f64::from(q.samples)
            };
            let ns = namespaces.iter().find(|n| n.netns == l.netns);
            l.diagnosis = diagnose(l, ns);
            l.troubled = l.diagnosis.iter().any(|d| d != OK);
        }
        self.namespaces = namespaces;
        self.listeners.sort_by(|a, b| {
            b.troubled
                .cmp(&a.troubled)
                .then(b.drops.unwrap_or(0).cmp(&a.drops.unwrap_or(0)))
                .then(
                    b.overflows
                        .total
                        .unwrap_or(0)
                        .cmp(&a.overflows.total.unwrap_or(0)),
                )
                .then(
                    b.accept_queue
                        .full_samples
                        .cmp(&a.accept_queue.full_samples),
                )
                .then(a.netns.cmp(&b.netns))
                .then(a.port.cmp(&b.port))
                .then(a.addr.cmp(&b.addr))
        });
    }
}

/// The diagnosis of a healthy listener.
pub const OK: &str = "ok";

/// What went wrong at `l` during the interval, in plain words naming the numbers; `["ok"]`
/// when nothing did. `ns` gives the namespace's settings and counters.
pub fn diagnose(l: &Listener, ns: Option<&Namespace>) -> Vec<String> {
    let settings = ns.map(|n| n.settings).unwrap_or_default();
    let mut out = Vec::new();
    let q = &l.accept_queue;
    let overflows = l.overflows.total.unwrap_or(0);
    if q.full_samples > 0 || overflows > 0 {
        let mut s = if q.full_samples > 0 {
            format!(
                "accept queue full {} of the time ({} of {} samples)",
                percent(q.full_samples, q.samples),
                q.full_samples,
                q.samples
            )
        } else {
            // Overflows without a full sample: bursts that filled it between two samples.
            "accept queue full between samples".to_owned()
        };
        if overflows > 0 {
            s.push_str(&format!(", {overflows} {}", plural(overflows, "overflow")));
        }
        s.push_str(": the application accepts too slowly");
        s.push_str(&backlog_advice(l, settings.somaxconn));
        out.push(s);
    }
    if let Some(full) = l.syn_queue_full {
        if full.drop > 0 {
            let setting = match settings.tcp_syncookies {
                Some(v) if v != 0 => format!("net.ipv4.tcp_syncookies was 0; it is {v} now"),
                _ => "net.ipv4.tcp_syncookies=0".to_owned(),
            };
            out.push(format!(
                "SYN queue full and syncookies off: {} {} dropped ({setting})",
                full.drop,
                plural(full.drop, "SYN")
            ));
        }
        // With tcp_syncookies=2 the kernel answers every SYN with a cookie and counts it as
        // a full queue: that is the setting at work, not a full queue.
        if full.cookie > 0 && settings.tcp_syncookies != Some(2) {
            out.push(format!(
                "SYN queue full: answering with SYN cookies ({}); check for a SYN flood or raise the backlog",
                full.cookie
            ));
        }
    }
    if let Some(drops) = l.drops.filter(|d| *d > 0) {
        out.extend(unexplained_drops(l, drops, settings, ns));
    }
    if out.is_empty() {
        out.push(OK.to_owned());
    }
    out
}

/// What the backlog settings have to do with a full accept queue.
fn backlog_advice(l: &Listener, somaxconn: Option<i64>) -> String {
    let sockets = l.sockets.max(1);
    let per_socket = l.accept_queue.limit / u64::from(sockets);
    let each = if sockets > 1 {
        format!(" per socket ({sockets} sockets)")
    } else {
        String::new()
    };
    match somaxconn {
        Some(max) if i64::try_from(per_socket).is_ok_and(|p| p < max) => format!(
            "; its listen(backlog) gives {per_socket}{each} while net.core.somaxconn is {max}: raise the backlog"
        ),
        Some(max) => format!(
            "; its limit {per_socket}{each} is net.core.somaxconn ({max}): raising somaxconn and the backlog may help, but the accept loop is the cause"
        ),
        None => format!("; its limit is {per_socket}{each}"),
    }
}

/// Drops that the overflows and SYN-queue drops do not account for.
fn unexplained_drops(
    l: &Listener,
    drops: u64,
    settings: Settings,
    ns: Option<&Namespace>,
) -> Option<String> {
    match (l.overflows.total, l.syn_queue_full) {
        (Some(overflows), Some(full)) => {
            let rest = drops.saturating_sub(overflows + full.drop);
            if rest == 0 {
                return None;
            }
            let max_syn = settings
                .tcp_max_syn_backlog
                .map_or_else(|| "tcp_max_syn_backlog".to_owned(), |v| v.to_string());
            let ack = if l.overflows.ack.is_none() {
                "; ACK-stage overflows, which this run cannot count, are among them"
            } else {
                ""
            };
            Some(format!(
                "{rest} {} not explained by queue overflow (without cookies, SYNs from unproven peers are dropped past 3/4 of net.ipv4.tcp_max_syn_backlog = {max_syn}; or memory{ack})",
                plural(rest, "drop")
            ))
        }
        // Without the kernel programs a drop's cause is unknown per listener; the
        // namespace's own counters narrow it down.
        _ => {
            let context = ns.and_then(|n| n.counters).map_or(String::new(), |c| {
                format!(
                    "; the namespace counted {} accept-queue overflows and {} SYN-queue-full drops",
                    c.listen_overflows.unwrap_or(0),
                    c.syn_queue_full_drops.unwrap_or(0)
                )
            });
            Some(format!(
                "{drops} {} (why needs the kernel programs, unavailable here{context})",
                plural(drops, "drop")
            ))
        }
    }
}

/// `part` of `whole` in percent, never rounded to 0 % or 100 % when it is not.
fn percent(part: u32, whole: u32) -> String {
    if whole == 0 {
        return "0%".to_owned();
    }
    let p = (f64::from(part) * 100.0 / f64::from(whole)).round();
    if p < 1.0 && part > 0 {
        "<1%".to_owned()
    } else if p >= 100.0 && part < whole {
        ">99%".to_owned()
    } else {
        format!("{p:.0}%")
    }
}

fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        word.to_owned()
    } else {
        format!("{word}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(somaxconn: i64, syncookies: i64) -> Namespace {
        Namespace {
            netns: 1,
            settings: Settings {
                somaxconn: Some(somaxconn),
                tcp_syncookies: Some(syncookies),
                tcp_max_syn_backlog: Some(512),
            },
            ..Namespace::default()
        }
    }

    fn listener() -> Listener {
        let mut l = Listener::new(1, "127.0.0.1".parse().expect("addr"), 8080);
        l.accept_queue = AcceptQueue {
            length: 0,
            limit: 128,
            max: 0,
            samples: 30,
            full_samples: 0,
            full_percent: 0.0,
        };
        l.overflows = Overflows::new(Some(0), Some(0));
        l.syn_queue_full = Some(SynQueueFull::default());
        l.drops = Some(0);
        l
    }

    #[test]
    fn a_quiet_listener_is_ok() {
        assert_eq!(diagnose(&listener(), Some(&ns(4096, 1))), vec!["ok"]);
    }

    #[test]
    fn a_full_accept_queue_names_the_backlog_and_somaxconn() {
        let mut l = listener();
        l.accept_queue.full_samples = 11;
        l.overflows = Overflows::new(Some(37), Some(0));
        l.drops = Some(37);
        let d = diagnose(&l, Some(&ns(4096, 1)));
        assert_eq!(
            d,
            vec![
                "accept queue full 37% of the time (11 of 30 samples), 37 overflows: the application accepts too slowly; its listen(backlog) gives 128 while net.core.somaxconn is 4096: raise the backlog"
            ]
        );
        let d = diagnose(&l, Some(&ns(128, 1)));
        assert!(
            d[0].contains("is net.core.somaxconn (128): raising somaxconn and the backlog may help, but the accept loop is the cause"),
            "{d:?}"
        );
        l.sockets = 4;
        l.accept_queue.limit = 512;
        let d = diagnose(&l, Some(&ns(4096, 1)));
        assert!(d[0].contains("gives 128 per socket (4 sockets)"), "{d:?}");
    }

    #[test]
    fn syn_queue_drops_and_cookies() {
        let mut l = listener();
        l.syn_queue_full = Some(SynQueueFull { drop: 5, cookie: 0 });
        l.drops = Some(5);
        assert_eq!(
            diagnose(&l, Some(&ns(4096, 0))),
            vec!["SYN queue full and syncookies off: 5 SYNs dropped (net.ipv4.tcp_syncookies=0)"]
        );
        l.syn_queue_full = Some(SynQueueFull { drop: 0, cookie: 9 });
        l.drops = Some(0);
        assert_eq!(
            diagnose(&l, Some(&ns(4096, 1))),
            vec![
                "SYN queue full: answering with SYN cookies (9); check for a SYN flood or raise the backlog"
            ]
        );
        // tcp_syncookies=2: every SYN is a cookie; no full queue to speak of.
        assert_eq!(diagnose(&l, Some(&ns(4096, 2))), vec!["ok"]);
    }

    #[test]
    fn drops_beyond_the_overflows_are_called_unexplained() {
        let mut l = listener();
        l.overflows = Overflows::new(Some(2), Some(0));
        l.drops = Some(5);
        let d = diagnose(&l, Some(&ns(4096, 0)));
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(
            d[1].starts_with("3 drops not explained by queue overflow"),
            "{d:?}"
        );
        assert!(d[1].contains("tcp_max_syn_backlog = 512"), "{d:?}");
    }

    #[test]
    fn without_the_kernel_programs_drops_point_at_the_namespace_counters() {
        let mut l = listener();
        l.overflows = Overflows::new(None, None);
        l.syn_queue_full = None;
        l.drops = Some(4);
        let mut n = ns(4096, 1);
        n.counters = Some(NsCounters {
            listen_overflows: Some(4),
            listen_drops: Some(4),
            syn_queue_full_drops: Some(0),
            syn_queue_full_cookies: Some(0),
        });
        let d = diagnose(&l, Some(&n));
        assert_eq!(
            d,
            vec![
                "4 drops (why needs the kernel programs, unavailable here; the namespace counted 4 accept-queue overflows and 0 SYN-queue-full drops)"
            ]
        );
    }

    #[test]
    fn percentages_never_round_to_the_ends() {
        assert_eq!(percent(1, 1000), "<1%");
        assert_eq!(percent(999, 1000), ">99%");
        assert_eq!(percent(30, 30), "100%");
        assert_eq!(percent(0, 30), "0%");
        assert_eq!(percent(0, 0), "0%");
    }

    #[test]
    fn full_is_length_at_least_limit_but_never_empty() {
        assert!(is_full(4, 4));
        assert!(is_full(5, 4));
        assert!(!is_full(3, 4));
        assert!(!is_full(0, 0), "listen(fd, 0) still admits one");
        assert!(is_full(1, 0));
    }

    #[test]
    fn troubled_listeners_come_first_most_drops_first() {
        let mut r = Report::new("kernel".into());
        r.namespaces.push(ns(4096, 1));
        let mut a = listener();
        a.port = 1;
        let mut b = listener();
        b.port = 2;
        b.overflows = Overflows::new(Some(3), Some(0));
        b.drops = Some(3);
        let mut c = listener();
        c.port = 3;
        c.overflows = Overflows::new(Some(9), Some(0));
        c.drops = Some(9);
        r.listeners = vec![a, b, c];
        r.finish();
        let ports: Vec<u16> = r.listeners.iter().map(|l| l.port).collect();
        assert_eq!(ports, vec![3, 2, 1]);
        assert!(r.listeners[0].troubled && !r.listeners[2].troubled);
    }
}
