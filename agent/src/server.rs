//! The HTTP endpoint: `/metrics`, `/healthz`, and a small index page.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, header, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::watch};

use crate::metrics::{CONTENT_TYPE, Metrics};

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

const INDEX: &str = "<!doctype html>\n<html><head><title>sockscope</title></head><body>\n\
<h1>sockscope</h1>\n<p>The kernel's TCP listen backlog and resets, per listener and network namespace, as Prometheus metrics.</p>\n\
<p><a href=\"/metrics\">Metrics</a></p>\n</body></html>\n";

/// Serves until `shutdown` turns true. A client has 10 s to send its request headers, so idle
/// or slow connections do not pile up (more limits belong to the web configuration).
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let metrics = Arc::clone(&metrics);
                async move { Ok::<_, Infallible>(route(&req, &metrics).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, "connection: {e}");
            }
        });
    }
}

async fn route(req: &Request<Incoming>, metrics: &Arc<Metrics>) -> Response<Full<Bytes>> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD\n",
            "text/plain",
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let response = match req.uri().path() {
        "/metrics" => {
            let metrics = Arc::clone(metrics);
            // Reading maps and /proc blocks: keep it off the async workers.
            match tokio::task::spawn_blocking(move || metrics.render()).await {
                Ok(Ok(body)) => with_body(StatusCode::OK, body, CONTENT_TYPE),
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
        // The server only starts once every probe has been attached or reported down.
        "/healthz" => text(StatusCode::OK, "ok\n", "text/plain"),
        "/" => text(StatusCode::OK, INDEX, "text/html; charset=utf-8"),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; see /metrics\n",
            "text/plain",
        ),
    };
    if head {
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, Full::new(Bytes::new()));
    }
    response
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
