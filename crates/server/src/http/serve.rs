//! The HTTP server loop: hyper's HTTP/1 connections under limits a stranger
//! cannot push past. `axum::serve` has no header read timeout and no
//! connection cap, so half-sent requests could be held open forever.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What one request and all of them together may hold before anyone is
/// authenticated (DESIGN.md, HTTP).
#[derive(Clone, Debug)]
pub struct IntakeLimits {
    /// Open connections; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// A request's head must arrive within this (also closes idle
    /// keep-alive connections).
    pub header_read_timeout: Duration,
    /// A webhook body must arrive within this after its head.
    pub body_read_timeout: Duration,
    /// Bytes of webhook bodies being read or checked at once, over all
    /// requests; a body that does not fit is answered 503 at once.
    pub body_budget_bytes: usize,
}

impl Default for IntakeLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            // The commit deadline (5 s) runs from the head too: a body
            // slower than that could not be acknowledged in time anyway.
            body_read_timeout: super::WEBHOOK_DEADLINE,
            // One body of GitHub's largest (25 MiB) plus room for many
            // ordinary ones (tens of KiB) beside it.
            body_budget_bytes: 48 * 1024 * 1024,
        }
    }
}

/// hyper's per-connection read buffer cap: enough for any request head
/// GitHub sends, and small enough that a thousand connections stay cheap.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// In-flight requests get this long to finish once shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Serves `app` on `listener` until `shutdown` resolves, then stops
/// accepting and lets open requests finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: &IntakeLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let max = limits.max_connections.clamp(1, u32::MAX as usize);
    // One permit per open connection; all of them back means all closed.
    let connections = Arc::new(Semaphore::new(max));
    let draining = CancellationToken::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(READ_BUFFER_BYTES);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break,
            p = Arc::clone(&connections).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather
                    // than spin; the connection limit normally prevents it.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let draining = draining.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                r = connection.as_mut() => r,
                () = draining.cancelled() => {
                    // Finishes the request in flight, then closes; an idle
                    // connection closes at once.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    draining.cancel();
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain timeout; closing them");
    }
}
