//! Tracepoint format files: where each field of a tracepoint record is on this kernel.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use super::KernelError;

/// Places tracefs is commonly found; the first with an `events` directory wins.
const TRACEFS_DIRS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Finds tracefs (at `configured` when given), mounting it at /sys/kernel/tracing when it is
/// not mounted anywhere.
pub fn tracefs_dir(configured: Option<&Path>) -> Result<PathBuf, KernelError> {
    if let Some(dir) = configured {
        return if dir.join("events").is_dir() {
            Ok(dir.to_path_buf())
        } else {
            Err(KernelError::Tracefs(format!(
                "{} has no events/ directory",
                dir.display()
            )))
        };
    }
    if let Some(dir) = find_tracefs() {
        return Ok(dir);
    }
    let target = Path::new(TRACEFS_DIRS[0]);
    nix::mount::mount(
        Some("nodev"),
        target,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| {
        KernelError::Tracefs(format!("mount -t tracefs nodev {}: {e}", target.display()))
    })?;
    tracing::info!("mounted tracefs at {}", target.display());
    find_tracefs().ok_or_else(|| KernelError::Tracefs("tracefs mounted but has no events/".into()))
}

fn find_tracefs() -> Option<PathBuf> {
    TRACEFS_DIRS
        .iter()
        .map(PathBuf::from)
        .find(|d| d.join("events").is_dir())
}

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// Byte offset in the record.
    pub offset: u32,
    /// Size in bytes.
    pub size: u32,
    /// The C declaration before the name, e.g. `const void *` or `__u8`.
    pub ctype: String,
}

/// The parsed format file of one tracepoint.
#[derive(Clone, Debug, Default)]
pub struct Format {
    /// Fields by name.
    pub fields: HashMap<String, Field>,
    /// The `print fmt:` line, which holds the symbolic names of enum values.
    pub print_fmt: String,
}

impl Format {
    /// Reads `events/<category>/<name>/format` under tracefs.
    pub fn read(tracefs: &Path, category: &str, name: &str) -> Result<Self, KernelError> {
        let path = tracefs
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        let text = fs::read_to_string(&path).map_err(|e| KernelError::TracepointMissing {
            tracepoint: format!("{category}:{name}"),
            detail: format!("{}: {e}", path.display()),
        })?;
        Ok(Self::parse(&text))
    }

    /// Parses the text of a format file.
    pub fn parse(text: &str) -> Self {
        let mut format = Self::default();
        for line in text.lines() {
            let line = line.trim();
            if let Some(fmt) = line.strip_prefix("print fmt:") {
                format.print_fmt = fmt.trim().to_string();
                continue;
            }
            let Some(rest) = line.strip_prefix("field:") else {
                continue;
            };
            let mut parts = rest.split(';').map(str::trim);
            let (Some(decl), Some(offset), Some(size)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Some(offset), Some(size)) = (
                offset.strip_prefix("offset:").and_then(|v| v.parse().ok()),
                size.strip_prefix("size:").and_then(|v| v.parse().ok()),
            ) else {
                continue;
            };
            // `__u8 saddr[28]` → name `saddr`; the type is everything before the name.
            let decl = decl.split('[').next().unwrap_or(decl).trim();
            let split = decl
                .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                .map_or(0, |i| i + 1);
            let (ctype, name) = decl.split_at(split);
            format.fields.insert(
                name.to_string(),
                Field {
                    offset,
                    size,
                    ctype: ctype.trim().to_string(),
                },
            );
        }
        format
    }

    /// A field, or an error naming the tracepoint and the field.
    pub fn field(&self, tracepoint: &str, name: &str) -> Result<&Field, KernelError> {
        self.fields
            .get(name)
            .ok_or_else(|| KernelError::TracepointLayout {
                tracepoint: tracepoint.to_string(),
                detail: format!("no field `{name}` in its format file"),
            })
    }

    /// The `{ value, "NAME" }` pairs of the `__print_symbolic(REC-><field>, …)` call, as
    /// lower-case names: how the kernel itself names the values of an enum field.
    pub fn symbols(&self, field: &str) -> HashMap<u64, String> {
        let mut symbols = HashMap::new();
        let needle = format!("__print_symbolic(REC->{field},");
        let Some(start) = self.print_fmt.find(&needle) else {
            return symbols;
        };
        let mut rest = &self.print_fmt[start + needle.len()..];
        // Pairs follow until the call's closing parenthesis.
        while let Some(open) = rest.find('{') {
            if rest[..open].contains(')') {
                break;
            }
            let Some(close) = rest[open..].find('}') else {
                break;
            };
            let pair = &rest[open + 1..open + close];
            rest = &rest[open + close + 1..];
            let mut it = pair.splitn(2, ',');
            let (Some(value), Some(name)) = (it.next(), it.next()) else {
                continue;
            };
            let name = name.trim().trim_matches('"').to_ascii_lowercase();
            let value = value.trim();
            let value = if let Some(hex) = value.strip_prefix("0x") {
                u64::from_str_radix(hex, 16).ok()
            } else {
                value.parse().ok()
            };
            if let Some(value) = value {
                symbols.insert(value, name);
            }
        }
        symbols
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEND_RESET_6_18: &str = r#"name: tcp_send_reset
ID: 2280
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:const void * skbaddr;	offset:8;	size:8;	signed:0;
	field:const void * skaddr;	offset:16;	size:8;	signed:0;
	field:int state;	offset:24;	size:4;	signed:1;
	field:enum sk_rst_reason reason;	offset:28;	size:4;	signed:0;
	field:__u8 saddr[28];	offset:32;	size:28;	signed:0;

print fmt: "state=%s reason=%s", REC->state ? __print_symbolic(REC->state, { TCP_ESTABLISHED, "TCP_ESTABLISHED" }) : "UNKNOWN", __print_symbolic(REC->reason, { 0, "NOT_SPECIFIED" }, { 1, "NO_SOCKET" }, { 11, "TCP_ABORT_ON_CLOSE" })
"#;

    #[test]
    fn parses_fields_and_types() {
        let f = Format::parse(SEND_RESET_6_18);
        let saddr = f.field("tcp:tcp_send_reset", "saddr").expect("saddr");
        assert_eq!(
            (saddr.offset, saddr.size, saddr.ctype.as_str()),
            (32, 28, "__u8")
        );
        let skaddr = f.field("t", "skaddr").expect("skaddr");
        assert_eq!((skaddr.offset, skaddr.ctype.as_str()), (16, "const void *"));
        assert_eq!(
            f.field("t", "reason").expect("reason").ctype,
            "enum sk_rst_reason"
        );
        assert!(f.field("t", "sport").is_err());
    }

    #[test]
    fn parses_symbolic_names_of_one_field_only() {
        let f = Format::parse(SEND_RESET_6_18);
        let reasons = f.symbols("reason");
        assert_eq!(reasons.get(&1).map(String::as_str), Some("no_socket"));
        assert_eq!(
            reasons.get(&11).map(String::as_str),
            Some("tcp_abort_on_close")
        );
        assert_eq!(reasons.len(), 3);
        // `state` uses symbolic constants, not numbers: nothing parses.
        assert!(f.symbols("state").is_empty());
    }
}
