//! A minimal blocking HTTP/1.1 GET client that closes its connections without resets.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

use crate::Netns;

/// Default connect, read and write timeout of [`http_get`].
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// GETs `path` from `addr` inside `netns`; returns (status, body). Timeouts of 10 s.
pub fn http_get(netns: &Netns, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    http_get_timeout(netns, addr, path, DEFAULT_TIMEOUT)
}

/// Like [`http_get`], with `timeout` for the connect and for each read and write.
pub fn http_get_timeout(
    netns: &Netns,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    netns
        .run(|| get_here(addr, path, timeout))?
        .with_context(|| format!("GET http://{addr}{path} in netns {}", netns.inode()))
}

/// The GET itself, in the calling thread's namespace.
fn get_here(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String)> {
    if !path.starts_with('/')
        || path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        bail!("bad request path {path:?}");
    }
    let mut stream = TcpStream::connect_timeout(&addr, timeout).context("connect")?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: sockscope-testkit\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .context("send request")?;
    // No shutdown(Write): some servers drop the response on a half-close. The server closes
    // after the response; reading to EOF leaves nothing unread, so our close is a FIN, not an RST.
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).context("read response")?;
    drop(stream);
    parse_response(&raw)
}

/// Splits a complete response into status and decoded body (Content-Length, chunked, or to EOF).
pub(crate) fn parse_response(raw: &[u8]) -> Result<(u16, String)> {
    let head_end =
        find(raw, b"\r\n\r\n").ok_or_else(|| anyhow!("response without end of headers"))?;
    let head = std::str::from_utf8(&raw[..head_end]).context("response headers are not UTF-8")?;
    let rest = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x status line: {status_line:?}");
    }
    let status: u16 = code
        .parse()
        .with_context(|| format!("status code in {status_line:?}"))?;

    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| anyhow!("bad header line {line:?}"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .with_context(|| format!("Content-Length {value:?}"))?,
            );
        }
    }

    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(len) = length {
        if rest.len() < len {
            bail!("body truncated: {} of {len} bytes", rest.len());
        }
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    let body = String::from_utf8(body).context("response body is not UTF-8")?;
    Ok((status, body))
}

fn decode_chunked(mut rest: &[u8]) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n").ok_or_else(|| anyhow!("chunk size line missing"))?;
        let line = std::str::from_utf8(&rest[..line_end]).context("chunk size line")?;
        let hex = line.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(hex, 16).with_context(|| format!("chunk size {line:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Trailers, if any, are ignored.
            return Ok(body);
        }
        if rest.len() < size + 2 {
            bail!("chunk truncated: {} of {size} bytes", rest.len());
        }
        if &rest[size..size + 2] != b"\r\n" {
            bail!("chunk of {size} bytes not followed by CRLF");
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length() -> Result<()> {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(parse_response(raw)?, (200, "hello".to_owned()));
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhello";
        assert!(parse_response(raw).is_err());
        Ok(())
    }

    #[test]
    fn chunked() -> Result<()> {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                    5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: y\r\n\r\n";
        assert_eq!(parse_response(raw)?, (200, "hello, world".to_owned()));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel";
        assert!(parse_response(raw).is_err());
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(parse_response(raw).is_err());
        Ok(())
    }

    #[test]
    fn to_eof_and_status() -> Result<()> {
        let raw = b"HTTP/1.0 404 Not Found\r\nServer: x\r\n\r\nnot here";
        assert_eq!(parse_response(raw)?, (404, "not here".to_owned()));
        assert_eq!(
            parse_response(b"HTTP/1.1 204 No Content\r\n\r\n")?,
            (204, String::new())
        );
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        Ok(())
    }
}
