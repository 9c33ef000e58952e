//! `sockscope listeners --agent URL`: the same table from a running agent's `/metrics`.
//!
//! The page is scraped at the start, every [`SCRAPE_PERIOD`] during the interval (for the
//! share of time a queue was full) and at the end; counters are the increase between the
//! first and the last scrape. The agent's page does not say which process owns a socket.
//!
//! The HTTP client is a plain blocking HTTP/1.1 GET over `std::net` with timeouts: one
//! request per connection, nothing more is needed to read a Prometheus page.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    io::{Read as _, Write as _},
    net::{IpAddr, TcpStream, ToSocketAddrs as _},
    time::{Duration, Instant},
};

use super::report::{
    AcceptQueue, Listener, Namespace, NsCounters, Overflows, Report, Settings, SynQueue,
    SynQueueFull, Unavailable, is_full,
};

/// How often the page is read during the interval.
pub const SCRAPE_PERIOD: Duration = Duration::from_secs(1);
/// Connect timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout of each read and write (a page of 10,000 listeners takes tens of ms to build).
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Pages larger than this are refused rather than held in memory.
const MAX_PAGE: u64 = 256 * 1024 * 1024;

/// Where the agent's metrics are: `http://host:port/path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentUrl {
    /// Host name or address (an IPv6 address without its brackets).
    pub host: String,
    /// Port; 80 when the URL has none.
    pub port: u16,
    /// Path; `/metrics` when the URL has none.
    pub path: String,
}

impl AgentUrl {
    /// Parses `http://host[:port][/path]` (the scheme may be left out).
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(format!("`{s}`: only http:// is supported, not {scheme}://"));
            }
            None => s,
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let path = if path.is_empty() || path == "/" {
            "/metrics".to_owned()
        } else {
            path.to_owned()
        };
        if path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(format!("`{s}`: the path must not contain spaces"));
        }
        let bad =
            || format!("`{s}` is not an agent URL; use http://host:port (http://127.0.0.1:9844)");
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(bad()),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() || host.contains(['@', ' ']) {
            return Err(bad());
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("`{s}`: bad port `{p}`"))?,
            None => 80,
        };
        Ok(Self {
            host: host.to_owned(),
            port,
            path,
        })
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for AgentUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority(), self.path)
    }
}

/// Why the agent's page could not be had.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// No connection, or it broke.
    #[error("cannot reach the agent at {url}: {source}")]
    Unreachable {
        /// What was asked for.
        url: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// It answered something else than a page.
    #[error("the agent at {url} answered {what}")]
    Answer {
        /// What was asked for.
        url: String,
        /// What came back.
        what: String,
    },
}

/// GETs the page.
pub fn get(url: &AgentUrl) -> Result<String, AgentError> {
    let unreachable = |source| AgentError::Unreachable {
        url: url.to_string(),
        source,
    };
    let answer = |what: String| AgentError::Answer {
        url: url.to_string(),
        what,
    };
    let addrs: Vec<_> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(unreachable)?
        .collect();
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address for the host");
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let mut stream = stream.ok_or_else(|| unreachable(last))?;
    let io = |r: std::io::Result<()>| r.map_err(unreachable);
    io(stream.set_read_timeout(Some(IO_TIMEOUT)))?;
    io(stream.set_write_timeout(Some(IO_TIMEOUT)))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: sockscope-listeners\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
        url.path,
        url.authority()
    );
    io(stream.write_all(request.as_bytes()))?;
    // The server closes after the answer; reading to the end leaves nothing unread, so our
    // close is a plain FIN.
    let mut raw = Vec::new();
    io((&mut stream).take(MAX_PAGE).read_to_end(&mut raw).map(drop))?;
    let (status, body) = parse_response(&raw).map_err(answer)?;
    if status != 200 {
        let first = body.lines().next().unwrap_or("").trim().to_owned();
        return Err(answer(format!("HTTP {status} {first}")));
    }
    Ok(body)
}

/// Status and body (Content-Length, chunked, or to the end) of a whole response.
fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no complete HTTP header")?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "a header that is not text")?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or("no HTTP status line")?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    let body = &raw[head_end + 4..];
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        body.get(..n)
            .ok_or("a body shorter than its Content-Length")?
            .to_vec()
    } else {
        body.to_vec()
    };
    let body = String::from_utf8(body).map_err(|_| "a body that is not UTF-8")?;
    Ok((status, body))
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("a cut chunked body")?;
        let size = std::str::from_utf8(&rest[..line_end])
            .ok()
            .and_then(|l| usize::from_str_radix(l.split(';').next()?.trim(), 16).ok())
            .ok_or("a bad chunk size")?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(rest.get(..size).ok_or("a cut chunk")?);
        rest = rest.get(size + 2..).ok_or("a cut chunk")?;
    }
}

/// One sample of a page: its labels and value.
#[derive(Clone, Debug, PartialEq)]
struct Sample {
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> &str {
        self.labels.get(name).map_or("", String::as_str)
    }

    /// The listener series the sample belongs to.
    fn listener(&self) -> Option<Key> {
        Some(Key {
            netns: self.label("netns").parse().ok()?,
            addr: self.label("addr").parse().ok()?,
            port: self.label("port").parse().ok()?,
        })
    }

    fn netns(&self) -> Option<u64> {
        self.label("netns").parse().ok()
    }
}

/// A listener series of the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    netns: u64,
    addr: IpAddr,
    port: u16,
}

/// The `sockscope_*` samples of a page, by metric name.
#[derive(Debug, Default)]
struct Page {
    samples: HashMap<String, Vec<Sample>>,
}

impl Page {
    /// Parses the text format; only `sockscope_` samples are kept.
    fn parse(text: &str) -> Result<Self, String> {
        let mut page = Self::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if !line.starts_with("sockscope_") {
                continue; // comments, blank lines, other exporters' metrics
            }
            let (name, sample) = parse_sample(line)
                .ok_or_else(|| format!("line {}: cannot read `{line}`", i + 1))?;
            page.samples.entry(name).or_default().push(sample);
        }
        Ok(page)
    }

    fn series(&self, name: &str) -> &[Sample] {
        self.samples.get(name).map_or(&[], Vec::as_slice)
    }

    /// Listener series of `name` (with an extra label `extra` = `value`, when given) → value.
    fn by_listener(&self, name: &str, extra: Option<(&str, &str)>) -> HashMap<Key, f64> {
        let mut out = HashMap::new();
        for s in self.series(name) {
            if extra.is_some_and(|(k, v)| s.label(k) != v) {
                continue;
            }
            if let Some(key) = s.listener() {
                *out.entry(key).or_insert(0.0) += s.value;
            }
        }
        out
    }

    /// Per-namespace series of `name` → value.
    fn by_netns(&self, name: &str) -> HashMap<u64, f64> {
        self.series(name)
            .iter()
            .filter_map(|s| Some((s.netns()?, s.value)))
            .collect()
    }

    /// `sockscope_probe_up` of `probe`, if on the page.
    fn probe_up(&self, probe: &str) -> Option<bool> {
        self.series("sockscope_probe_up")
            .iter()
            .find(|s| s.label("probe") == probe)
            .map(|s| s.value == 1.0)
    }
}

/// `name{a="x",b="y"} value [timestamp]`.
fn parse_sample(line: &str) -> Option<(String, Sample)> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = inner;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = rest.split_once("=\"")?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '"' => break i,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            };
            labels.insert(key.trim().to_owned(), value);
            rest = &after[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, Sample { labels, value }))
}

/// A running agent as the source of reports.
pub struct AgentSource {
    url: AgentUrl,
}

impl AgentSource {
    /// Reads the agent at `url`.
    pub fn new(url: AgentUrl) -> Self {
        Self { url }
    }

    fn scrape(&self) -> anyhow::Result<Page> {
        let text = get(&self.url)?;
        Page::parse(&text).map_err(|e| anyhow::anyhow!("the page of {}: {e}", self.url))
    }

    /// Measures for `interval`; `started` is called once the first page is in.
    pub fn measure(
        &mut self,
        interval: Duration,
        started: &mut dyn FnMut(),
    ) -> anyhow::Result<Report> {
        let start = Instant::now();
        let mut pages = vec![self.scrape()?];
        started();
        let deadline = start + interval;
        let mut next = start + SCRAPE_PERIOD;
        while next < deadline {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            pages.push(self.scrape()?);
            next += SCRAPE_PERIOD;
        }
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        pages.push(self.scrape()?);
        let mut report = build(&self.url.to_string(), &pages);
        report.interval_seconds = start.elapsed().as_secs_f64();
        Ok(report)
    }
}

const ACCEPT_LENGTH: &str = "sockscope_listen_accept_queue_length";
const ACCEPT_LIMIT: &str = "sockscope_listen_accept_queue_limit";
const SYN_LENGTH: &str = "sockscope_listen_syn_queue_length";
const SOCKETS: &str = "sockscope_listen_sockets";
const DROPS: &str = "sockscope_listen_drops_total";
const OVERFLOWS: &str = "sockscope_listen_overflows_total";
const SYN_FULL: &str = "sockscope_listen_syn_queue_full_total";

/// The report from the pages of one interval (at least one).
fn build(source: &str, pages: &[Page]) -> Report {
    let mut report = Report::new(source.to_owned());
    report.samples = u32::try_from(pages.len()).unwrap_or(u32::MAX);
    let (Some(first), Some(last)) = (pages.first(), pages.last()) else {
        return report;
    };
    let syn_stage = last.probe_up("listen_ingress");
    let ack_stage = last.probe_up("listen_ack_drop");
    for (probe, up, what) in [
        (
            "listen_ingress",
            syn_stage,
            "OVERFLOWS at the SYN stage and SYN-queue-full drops and cookies",
        ),
        ("listen_ack_drop", ack_stage, "OVERFLOWS at the ACK stage"),
    ] {
        match up {
            Some(true) => {}
            Some(false) => report.unavailable.push(Unavailable {
                what: what.to_owned(),
                why: format!(
                    "the agent's probe {probe} is down (`sockscope check` on its host says why)"
                ),
            }),
            None => report.unavailable.push(Unavailable {
                what: what.to_owned(),
                why: format!("the agent's page has no sockscope_probe_up for {probe}"),
            }),
        }
    }
    let lengths = last.by_listener(ACCEPT_LENGTH, None);
    if lengths.is_empty() && last.series(DROPS).is_empty() {
        report.unavailable.push(Unavailable {
            what: "listeners".to_owned(),
            why: "the agent's page has no sockscope_listen_* series (is its listen collector off?)"
                .to_owned(),
        });
    }

    // Samples: each page is one look at every queue.
    let mut taken: HashMap<Key, (u32, u32, u64, u64)> = HashMap::new();
    for page in pages {
        let limits = page.by_listener(ACCEPT_LIMIT, None);
        let syn = page.by_listener(SYN_LENGTH, None);
        for (key, length) in page.by_listener(ACCEPT_LENGTH, None) {
            let entry = taken.entry(key).or_default();
            entry.0 += 1;
            // The page sums an SO_REUSEPORT group: full here means the whole group is.
            if is_full(
                length as u64,
                limits.get(&key).copied().unwrap_or(0.0) as u64,
            ) {
                entry.1 += 1;
            }
            entry.2 = entry.2.max(length as u64);
            entry.3 = entry.3.max(syn.get(&key).copied().unwrap_or(0.0) as u64);
        }
    }

    let delta = |name: &str, extra: Option<(&str, &str)>| -> HashMap<Key, u64> {
        let before = first.by_listener(name, extra);
        last.by_listener(name, extra)
            .into_iter()
            .map(|(k, v)| (k, increase(before.get(&k).copied(), v)))
            .collect()
    };
    let drops = delta(DROPS, None);
    let syn_overflows = delta(OVERFLOWS, Some(("stage", "syn")));
    let ack_overflows = delta(OVERFLOWS, Some(("stage", "ack")));
    let cookie = delta(SYN_FULL, Some(("action", "cookie")));
    let synq_drop = delta(SYN_FULL, Some(("action", "drop")));

    let limits = last.by_listener(ACCEPT_LIMIT, None);
    let syn = last.by_listener(SYN_LENGTH, None);
    let sockets = last.by_listener(SOCKETS, None);
    let mut keys: Vec<Key> = lengths.keys().copied().collect();
    keys.sort_unstable();
    for key in keys {
        let mut l = Listener::new(key.netns, key.addr, key.port);
        let (samples, full, accept_max, syn_max) = taken.get(&key).copied().unwrap_or_default();
        l.sockets = sockets.get(&key).map_or(1, |s| *s as u32);
        l.accept_queue = AcceptQueue {
            length: lengths.get(&key).copied().unwrap_or(0.0) as u64,
            limit: limits.get(&key).copied().unwrap_or(0.0) as u64,
            max: accept_max,
            samples,
            full_samples: full,
            full_percent: 0.0,
        };
        l.syn_queue = SynQueue {
            length: syn.get(&key).copied().unwrap_or(0.0) as u64,
            max: syn_max,
        };
        let count = |m: &HashMap<Key, u64>| m.get(&key).copied().unwrap_or(0);
        let syn_up = syn_stage == Some(true);
        l.overflows = Overflows::new(
            syn_up.then(|| count(&syn_overflows)),
            (ack_stage == Some(true)).then(|| count(&ack_overflows)),
        );
        l.syn_queue_full = syn_up.then(|| SynQueueFull {
            drop: count(&synq_drop),
            cookie: count(&cookie),
        });
        l.drops = drops.get(&key).copied();
        report.listeners.push(l);
    }

    // Namespaces with listeners, with their settings and counters.
    let mut netns: Vec<u64> = report.listeners.iter().map(|l| l.netns).collect();
    netns.sort_unstable();
    netns.dedup();
    let info: HashMap<u64, &Sample> = last
        .series("sockscope_netns_info")
        .iter()
        .filter_map(|s| Some((s.netns()?, s)))
        .collect();
    let sysctl = |name: &str| last.by_netns(&format!("sockscope_sysctl_{name}"));
    let (somaxconn, syncookies, max_syn) = (
        sysctl("somaxconn"),
        sysctl("tcp_syncookies"),
        sysctl("tcp_max_syn_backlog"),
    );
    let counter = |name: &str| -> HashMap<u64, u64> {
        let name = format!("sockscope_netstat_{name}");
        let before = first.by_netns(&name);
        last.by_netns(&name)
            .into_iter()
            .map(|(k, v)| (k, increase(before.get(&k).copied(), v)))
            .collect()
    };
    let (overflows, listen_drops, full_drops, full_cookies) = (
        counter("listen_overflows_total"),
        counter("listen_drops_total"),
        counter("syn_queue_full_drops_total"),
        counter("syn_queue_full_cookies_total"),
    );
    for n in netns {
        let i = info.get(&n);
        let has_counters = overflows.contains_key(&n);
        report.namespaces.push(Namespace {
            netns: n,
            name: i.map_or("", |s| s.label("name")).to_owned(),
            pid: i.and_then(|s| s.label("pid").parse().ok()),
            comm: i.map_or("", |s| s.label("comm")).to_owned(),
            settings: Settings {
                somaxconn: somaxconn.get(&n).map(|v| *v as i64),
                tcp_syncookies: syncookies.get(&n).map(|v| *v as i64),
                tcp_max_syn_backlog: max_syn.get(&n).map(|v| *v as i64),
            },
            counters: has_counters.then(|| NsCounters {
                listen_overflows: overflows.get(&n).copied(),
                listen_drops: listen_drops.get(&n).copied(),
                syn_queue_full_drops: full_drops.get(&n).copied(),
                syn_queue_full_cookies: full_cookies.get(&n).copied(),
            }),
        });
    }
    report
}

/// A counter's increase; a series absent at the start started at 0 (the agent creates a
/// counter series with its first count), and one that went down was reset (an agent
/// restart): then its value is all the interval can claim.
fn increase(before: Option<f64>, now: f64) -> u64 {
    let before = before.unwrap_or(0.0);
    let d = if now >= before { now - before } else { now };
    d as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = AgentUrl::parse("http://127.0.0.1:9844").expect("url");
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 9844, "/metrics")
        );
        assert_eq!(u.to_string(), "http://127.0.0.1:9844/metrics");
        let u = AgentUrl::parse("http://[::1]:9/m").expect("url");
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("::1", 9, "/m"));
        assert_eq!(u.to_string(), "http://[::1]:9/m");
        let u = AgentUrl::parse("agent.example:9844/").expect("url");
        assert_eq!((u.host.as_str(), u.port), ("agent.example", 9844));
        assert_eq!(AgentUrl::parse("http://host").expect("url").port, 80);
        for bad in [
            "https://h:1",
            "http://:1",
            "http://h:x",
            "http://[::1",
            "http://h:70000",
        ] {
            assert!(AgentUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef";
        assert_eq!(parse_response(plain), Ok((200, "abc".to_owned())));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Ok((200, "abcde".to_owned())));
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn samples_with_escaped_labels() {
        let (name, s) =
            parse_sample(r#"sockscope_netns_info{netns="1",name="a\"b\\c",pid="",comm="x y"} 1"#)
                .expect("parses");
        assert_eq!(name, "sockscope_netns_info");
        assert_eq!(s.label("name"), "a\"b\\c");
        assert_eq!(s.label("comm"), "x y");
        assert_eq!(s.value, 1.0);
        let (_, s) = parse_sample("sockscope_x 2.5 1700000000").expect("parses");
        assert_eq!(s.value, 2.5);
        assert!(parse_sample("sockscope_x{a=\"1\"").is_none());
    }

    fn page(lines: &[String]) -> Page {
        Page::parse(&lines.join("\n")).expect("parses")
    }

    #[test]
    fn a_report_from_two_pages() {
        let l = r#"netns="7",family="ipv4",addr="127.0.0.1",port="80""#;
        let common = [
            r#"sockscope_probe_up{probe="listen_ingress"} 1"#.to_owned(),
            r#"sockscope_probe_up{probe="listen_ack_drop"} 1"#.to_owned(),
            r#"sockscope_netns_info{netns="7",name="blue",pid="9",comm="init"} 1"#.to_owned(),
            r#"sockscope_sysctl_somaxconn{netns="7"} 4096"#.to_owned(),
            r#"sockscope_sysctl_tcp_syncookies{netns="7"} 1"#.to_owned(),
            format!("sockscope_listen_accept_queue_limit{{{l}}} 4"),
            format!("sockscope_listen_sockets{{{l}}} 1"),
        ];
        let mut a: Vec<String> = common.to_vec();
        a.push(format!("sockscope_listen_accept_queue_length{{{l}}} 0"));
        a.push(format!("sockscope_listen_drops_total{{{l}}} 10"));
        a.push(r#"sockscope_netstat_listen_overflows_total{netns="7"} 10"#.to_owned());
        let mut b: Vec<String> = common.to_vec();
        b.push(format!("sockscope_listen_accept_queue_length{{{l}}} 5"));
        b.push(format!("sockscope_listen_drops_total{{{l}}} 25"));
        b.push(format!(
            "sockscope_listen_overflows_total{{{l},stage=\"syn\"}} 15"
        ));
        b.push(r#"sockscope_netstat_listen_overflows_total{netns="7"} 25"#.to_owned());
        let pages = [page(&a), page(&b)];
        let mut r = build("http://x/metrics", &pages);
        r.finish();
        assert!(r.unavailable.is_empty(), "{:?}", r.unavailable);
        let row = &r.listeners[0];
        assert_eq!(row.listen, "127.0.0.1:80");
        assert_eq!(row.drops, Some(15));
        assert_eq!(row.overflows.total, Some(15));
        assert_eq!(row.overflows.ack, Some(0));
        assert_eq!(
            (row.accept_queue.samples, row.accept_queue.full_samples),
            (2, 1)
        );
        assert!(
            row.diagnosis[0].contains("accepts too slowly"),
            "{:?}",
            row.diagnosis
        );
        let ns = r.namespace(7).expect("namespace");
        assert_eq!(ns.name, "blue");
        assert_eq!(ns.counters.and_then(|c| c.listen_overflows), Some(15));
    }

    #[test]
    fn counter_resets_and_new_series() {
        assert_eq!(increase(None, 4.0), 4);
        assert_eq!(increase(Some(4.0), 10.0), 6);
        assert_eq!(increase(Some(10.0), 3.0), 3);
    }
}
