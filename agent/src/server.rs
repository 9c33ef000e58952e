//! The HTTP endpoint: `/metrics`, `/healthz`, and a small index page, over plain HTTP or TLS
//! with optional basic authentication (see [`crate::web`]).
//!
//! Limits keep it answering under hostile or careless clients: a connection cap (excess
//! connections are closed at once), a cap on requests in flight (excess requests get 503 at
//! once), at most [`RENDERS`] renders of the page at a time, a deadline for the request
//! headers (HTTP/2, negotiated over TLS: a connection idle that long is closed), for the TLS
//! handshake and for each request, and a maximum age per connection.

use std::{
    convert::Infallible,
    io::Write as _,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    HeaderMap, Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::{Semaphore, watch},
};

use crate::{
    metrics::{CONTENT_TYPE, Metrics},
    web::{Active, WebState},
};

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may take from its headers to its response.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// After this, a keep-alive connection is closed once its request in flight is answered.
const CONNECTION_MAX_AGE: Duration = Duration::from_secs(300);
/// The largest request head accepted (hyper answers 431 beyond it).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Requests one HTTP/2 connection may have open at once (each also takes a place among
/// the requests in flight).
const H2_STREAMS: u32 = 8;
/// How often an HTTP/2 connection is pinged while it has requests in flight (an idle one
/// is closed after [`HEADER_READ_TIMEOUT`]); a peer that does not answer within
/// [`HEADER_READ_TIMEOUT`] is gone, and its connection is closed.
const H2_PING_INTERVAL: Duration = Duration::from_secs(10);
/// Renders of the page at a time; more scrapes wait for one of them.
pub const RENDERS: usize = 2;

const INDEX: &str = "<!doctype html>\n<html><head><title>sockscope</title></head><body>\n\
<h1>sockscope</h1>\n<p>The kernel's TCP listen backlog and resets, per listener and network namespace, as Prometheus metrics.</p>\n\
<p><a href=\"/metrics\">Metrics</a></p>\n</body></html>\n";

/// Caps on what clients can hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Requests in flight at once (`--web.max-requests`); excess ones get 503.
    pub max_requests: usize,
    /// Open connections at once (`--web.max-connections`); excess ones are closed.
    pub max_connections: usize,
}

struct Shared {
    metrics: Arc<Metrics>,
    web: Arc<WebState>,
    requests: Semaphore,
    renders: Arc<Semaphore>,
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    web: Arc<WebState>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    let shared = Arc::new(Shared {
        metrics,
        web,
        requests: Semaphore::new(limits.max_requests.max(1)),
        renders: Arc::new(Semaphore::new(RENDERS)),
    });
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            tracing::debug!(%peer, "connection limit reached: closing");
            drop(stream);
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _permit = permit;
            let active = shared.web.current();
            match &active.tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                            connection(tls, shared, peer, h2).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
                None => connection(stream, shared, peer, false).await,
            }
        });
    }
}

/// Serves one connection: HTTP/2 where TLS negotiated it (ALPN `h2`), else HTTP/1.1.
async fn connection<S>(stream: S, shared: Arc<Shared>, peer: SocketAddr, h2: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let idle = Arc::new(Idle::new());
    let watch = Arc::clone(&idle);
    let service = service_fn(move |req| {
        let shared = Arc::clone(&shared);
        // In flight from here until the response's body is dropped: sent, or the request
        // cancelled (an HTTP/2 stream reset drops this future on the spot).
        let in_flight = InFlight::begin(&watch);
        async move {
            let response = handle(req, &shared).await;
            Ok::<_, Infallible>(response.map(|body| Tracked {
                body,
                _in_flight: in_flight,
            }))
        }
    });
    let io = TokioIo::new(stream);
    // Runs the connection until it ends or `closing` fires; then lets it finish the requests
    // in flight (at most REQUEST_TIMEOUT) and closes it.
    macro_rules! serve_until {
        ($conn:expr, $closing:expr, $why:literal) => {{
            let mut conn = std::pin::pin!($conn);
            tokio::select! {
                result = conn.as_mut() => result,
                _ = $closing => {
                    conn.as_mut().graceful_shutdown();
                    match tokio::time::timeout(REQUEST_TIMEOUT, conn.as_mut()).await {
                        Ok(result) => result,
                        Err(_) => {
                            tracing::debug!(%peer, concat!("connection closed: ", $why));
                            return;
                        }
                    }
                }
            }
        }};
    }
    let result = if h2 {
        // HTTP/2 has no header deadline: a connection without a request in flight for
        // HEADER_READ_TIMEOUT is closed instead, so idle clients cannot hold the places.
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_STREAMS)
            .max_header_list_size(MAX_HEAD_BYTES as u32)
            .keep_alive_interval(Some(H2_PING_INTERVAL))
            .keep_alive_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(io, service);
        let closing = async {
            tokio::select! {
                _ = tokio::time::sleep(CONNECTION_MAX_AGE) => {}
                _ = idle.expired(HEADER_READ_TIMEOUT) => {}
            }
        };
        serve_until!(conn, closing, "past its maximum age or idle")
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(io, service);
        serve_until!(
            conn,
            tokio::time::sleep(CONNECTION_MAX_AGE),
            "past its maximum age"
        )
    };
    if let Err(e) = result {
        tracing::debug!(%peer, "connection: {e}");
    }
}

/// One request in flight on a connection, until dropped.
struct InFlight(Arc<Idle>);

impl InFlight {
    fn begin(idle: &Arc<Idle>) -> Self {
        idle.in_flight.fetch_add(1, SeqCst);
        Self(Arc::clone(idle))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.0.start.elapsed().as_millis() as u64;
        self.0.last_ms.store(now, SeqCst);
        self.0.in_flight.fetch_sub(1, SeqCst);
    }
}

/// A response body that keeps its request [`InFlight`] until it is dropped.
struct Tracked {
    body: Full<Bytes>,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Requests in flight on one connection, and when the last one ended.
struct Idle {
    start: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `start` to the end of the last request (or to `start`).
    last_ms: AtomicU64,
}

impl Idle {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            in_flight: Default::default(),
            last_ms: Default::default(),
        }
    }

    /// Resolves once no request has been in flight for `limit`.
    async fn expired(&self, limit: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(SeqCst));
            let due = self.start + last + limit;
            if Instant::now() >= due && self.in_flight.load(SeqCst) == 0 {
                return;
            }
            let wake = due.max(Instant::now() + Duration::from_millis(100));
            tokio::time::sleep_until(wake.into()).await;
        }
    }
}

async fn handle(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let Ok(_in_flight) = shared.requests.try_acquire() else {
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in flight; retry later\n",
            "text/plain",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return r;
    };
    let active = shared.web.current();
    let head = req.method() == Method::HEAD;
    let mut response =
        match tokio::time::timeout(REQUEST_TIMEOUT, respond(&req, shared, &active)).await {
            Ok(r) => r,
            Err(_) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the request timed out\n",
                "text/plain",
            ),
        };
    for (name, value) in &active.headers {
        response.headers_mut().insert(name.clone(), value.clone());
    }
    if head {
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, Full::new(Bytes::new()));
    }
    response
}

async fn respond(
    req: &Request<Incoming>,
    shared: &Shared,
    active: &Arc<Active>,
) -> Response<Full<Bytes>> {
    if active.auth.is_some() && !authorized(req.headers(), active).await {
        let mut r = text(StatusCode::UNAUTHORIZED, "Unauthorized\n", "text/plain");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"sockscope\""),
        );
        return r;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD\n",
            "text/plain",
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => metrics_page(shared, accepts_gzip(req.headers())).await,
        // The server only starts once every probe has been attached or reported down.
        "/healthz" => text(StatusCode::OK, "ok\n", "text/plain"),
        "/" => text(StatusCode::OK, INDEX, "text/html; charset=utf-8"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; see /metrics\n",
            "text/plain",
        ),
    }
}

/// Checks the `Authorization` header; bcrypt runs off the async workers, once per new
/// user and password.
async fn authorized(headers: &HeaderMap, active: &Arc<Active>) -> bool {
    let Some(auth) = &active.auth else {
        return true;
    };
    let Some(credentials) =
        auth.credentials(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()))
    else {
        return false;
    };
    if let Some(granted) = auth.cached(&credentials) {
        return granted;
    }
    let active = Arc::clone(active);
    tokio::task::spawn_blocking(move || {
        active.auth.as_ref().is_some_and(|a| a.verify(&credentials))
    })
    .await
    .unwrap_or(false)
}

async fn metrics_page(shared: &Shared, gzip: bool) -> Response<Full<Bytes>> {
    let Ok(permit) = Arc::clone(&shared.renders).acquire_owned().await else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n",
            "text/plain",
        );
    };
    let metrics = Arc::clone(&shared.metrics);
    // Reading maps and /proc blocks: keep it off the async workers. The permit goes with
    // the render, so a timed-out request still counts until its render ends.
    let rendered = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let body = metrics.render()?;
        if gzip {
            let mut encoder = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 4),
                // Level 1: the page's repeated names and labels shrink ~20× even so, at a
                // fraction of the default level's time (`cargo xtask bench --only web`).
                flate2::Compression::fast(),
            );
            encoder.write_all(&body)?;
            return Ok((encoder.finish()?, true));
        }
        anyhow::Ok((body, false))
    })
    .await;
    match rendered {
        Ok(Ok((body, gzipped))) => {
            let mut r = with_body(StatusCode::OK, body, CONTENT_TYPE);
            r.headers_mut().insert(
                header::VARY,
                header::HeaderValue::from_static("Accept-Encoding"),
            );
            if gzipped {
                r.headers_mut().insert(
                    header::CONTENT_ENCODING,
                    header::HeaderValue::from_static("gzip"),
                );
            }
            r
        }
        Ok(Err(e)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("encoding metrics: {e}\n"),
            "text/plain",
        ),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("scrape failed: {e}\n"),
            "text/plain",
        ),
    }
}

/// Whether `Accept-Encoding` names gzip (or x-gzip) with a non-zero quality.
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or_default().trim();
            let zero_quality = parts.any(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .and_then(|q| q.trim().parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding.eq_ignore_ascii_case("x-gzip"))
                && !zero_quality
        })
}

fn text(status: StatusCode, body: &str, content_type: &'static str) -> Response<Full<Bytes>> {
    with_body(status, body.as_bytes().to_vec(), content_type)
}

fn with_body(
    status: StatusCode,
    body: Vec<u8>,
    content_type: &'static str,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_is_idle_only_once_every_request_and_body_is_gone() {
        let limit = Duration::from_millis(200);
        let expired = |idle: &Arc<Idle>| {
            let idle = Arc::clone(idle);
            async move { tokio::time::timeout(Duration::from_secs(2), idle.expired(limit)).await }
        };
        // A response body not yet sent keeps the connection busy.
        let idle = Arc::new(Idle::new());
        let request = InFlight::begin(&idle);
        let body = Tracked {
            body: Full::new(Bytes::from_static(b"page")),
            _in_flight: request,
        };
        let started = Instant::now();
        let waiting = tokio::spawn(expired(&idle));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !waiting.is_finished(),
            "idle while a response body was unsent"
        );
        drop(body);
        assert!(
            waiting.await.expect("joins").is_ok(),
            "never idle after the body went"
        );
        assert!(started.elapsed() >= Duration::from_millis(700));
        // A request future dropped before it ends (an HTTP/2 stream reset) leaves nothing in
        // flight.
        let idle = Arc::new(Idle::new());
        let future = {
            let in_flight = InFlight::begin(&idle);
            async move {
                let _in_flight = in_flight;
                std::future::pending::<()>().await;
            }
        };
        assert_eq!(idle.in_flight.load(SeqCst), 1);
        drop(future);
        assert_eq!(idle.in_flight.load(SeqCst), 0);
        assert!(expired(&idle).await.is_ok());
    }

    fn with_accept(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(
                header::ACCEPT_ENCODING,
                header::HeaderValue::from_str(v).expect("valid"),
            );
        }
        headers
    }

    #[test]
    fn gzip_negotiation() {
        assert!(accepts_gzip(&with_accept(&["gzip"])));
        assert!(accepts_gzip(&with_accept(&["deflate, GZIP;q=0.5"])));
        assert!(accepts_gzip(&with_accept(&["br", "x-gzip"])));
        assert!(!accepts_gzip(&with_accept(&["gzip;q=0"])));
        assert!(!accepts_gzip(&with_accept(&["identity", "br"])));
        assert!(!accepts_gzip(&with_accept(&[])));
    }
}
