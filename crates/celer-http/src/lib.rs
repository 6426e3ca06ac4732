//! celer-http: serving an axum app over HTTP/1.1 with the limits of a
//! service exposed to a network: the control service's API (`celer-meta`)
//! and the storage node's admin server (`celer-node`) both serve through
//! [`serve`].
//!
//! - Request headers must arrive within `header_read_timeout`, counted from
//!   when the server starts waiting for them (a new connection, or the next
//!   request on a kept-alive one): half-sent requests and idle keep-alive
//!   connections are closed after it.
//! - A request body must arrive within `body_timeout` of its headers, or
//!   reading it fails (the handler answers 400 and the connection closes).
//! - At most `connections_max` connections at once, and at most
//!   `connections_per_ip_max` from one source IP, so one host cannot take
//!   every slot; a connection over a cap is closed at accept, with a log
//!   line.
//!
//! The process needs a file descriptor limit (RLIMIT_NOFILE) above
//! `connections_max` plus its own files, or accept fails first (it then
//! backs off and retries; nothing is lost but time).

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use http_body::{Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// Time allowed for a request's headers.
pub const HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Time allowed for a request's body, from its headers.
pub const BODY_TIMEOUT_MS: u64 = 30_000;

/// The limits [`serve`] enforces (see the module doc).
#[derive(Clone, Debug)]
pub struct HttpLimits {
    pub header_read_timeout: Duration,
    pub body_timeout: Duration,
    pub connections_max: usize,
    pub connections_per_ip_max: usize,
}

impl HttpLimits {
    /// The default timeouts with these connection caps.
    pub fn with_caps(connections_max: usize, connections_per_ip_max: usize) -> HttpLimits {
        HttpLimits {
            header_read_timeout: Duration::from_millis(HEADER_READ_TIMEOUT_MS),
            body_timeout: Duration::from_millis(BODY_TIMEOUT_MS),
            connections_max,
            connections_per_ip_max,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then stops
/// accepting, lets each connection finish its request in progress, and
/// returns when all are closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    let app = app.layer(axum::middleware::from_fn_with_state(
        limits.body_timeout,
        body_deadline,
    ));
    let slots_max = limits.connections_max.clamp(1, Semaphore::MAX_PERMITS) as u32;
    let slots = Arc::new(Semaphore::new(slots_max as usize));
    let per_ip = Arc::new(Mutex::new(HashMap::new()));
    let (closing_tx, closing) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Out of file descriptors, mostly: wait for some to close.
                    tracing::warn!("HTTP accept failed (retrying in 50 ms): {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                %peer,
                "refusing an HTTP connection: {} already open",
                limits.connections_max
            );
            continue;
        };
        let Some(ip_slot) = IpSlot::take(&per_ip, peer.ip(), limits.connections_per_ip_max) else {
            tracing::warn!(
                %peer,
                "refusing an HTTP connection: {} already open from {}",
                limits.connections_per_ip_max,
                peer.ip()
            );
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let header_read_timeout = limits.header_read_timeout;
        let mut closing = closing.clone();
        tokio::spawn(async move {
            let _held = (slot, ip_slot);
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let r = tokio::select! {
                r = conn.as_mut() => r,
                () = async { let _ = closing.wait_for(|c| *c).await; } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = r {
                // Timeouts and clients that went away: not the server's problem.
                tracing::debug!(%peer, "HTTP connection closed: {e}");
            }
        });
    }
    drop(listener);
    closing_tx.send_replace(true);
    // Every connection gives its slot back when it ends.
    let _ = slots.acquire_many(slots_max).await;
}

/// A connection's place in the per-source-IP counts.
struct IpSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

fn lock(m: &Mutex<HashMap<IpAddr, usize>>) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
    // Updated whole under the lock: a panic elsewhere leaves them right.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl IpSlot {
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr, max: usize) -> Option<Self> {
        let mut c = lock(counts);
        let n = c.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        if let Some(n) = c.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.ip);
            }
        }
    }
}

/// Gives the request body [`HttpLimits::body_timeout`] to arrive.
async fn body_deadline(State(timeout): State<Duration>, req: Request, next: Next) -> Response {
    use http_body::Body as _;
    let req = req.map(|body| {
        if body.is_end_stream() {
            return body; // nothing to wait for (GET, DELETE)
        }
        Body::new(DeadlineBody {
            inner: body,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        })
    });
    next.run(req).await
}

/// A body that fails once its deadline passes before its end.
struct DeadlineBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let msg = format!(
                "the request body did not arrive within {} ms",
                self.timeout.as_millis()
            );
            return Poll::Ready(Some(Err(axum::Error::new(msg))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Compares two secrets in time that depends on their lengths only, not on
/// where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    // Keeps the compiler from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn per_ip_slots_count_and_give_back() {
        let counts = Arc::new(Mutex::new(HashMap::new()));
        let ip: IpAddr = [10, 0, 0, 1].into();
        let a = IpSlot::take(&counts, ip, 2).expect("first");
        let _b = IpSlot::take(&counts, ip, 2).expect("second");
        assert!(IpSlot::take(&counts, ip, 2).is_none());
        assert!(IpSlot::take(&counts, [10, 0, 0, 2].into(), 2).is_some());
        drop(a);
        assert!(IpSlot::take(&counts, ip, 2).is_some());
        assert_eq!(lock(&counts).len(), 1, "entries at zero are removed");
    }
}
