//! The access log: one `tracing` event per request, at its end (the last byte of a stream sent, or the
//! client gone), under the target [`TARGET`], which `logging` writes on stderr when `access_log` is on.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use tokio::time::Instant;

/// The target of the access log's events.
pub(crate) const TARGET: &str = "usine::access";

/// The response header that carries the request's id, the one its log line has.
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What one line says, held until the response's body ends.
struct Line {
    id: String,
    method: Method,
    path: String,
    status: u16,
    start: Instant,
    bytes: u64,
    /// The body was sent to its end (`false`: the client went away first).
    complete: bool,
}

impl Drop for Line {
    fn drop(&mut self) {
        let duration_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            target: TARGET,
            request_id = %self.id,
            method = %self.method,
            path = %self.path,
            status = self.status,
            duration_ms = (duration_ms * 10.0).round() / 10.0,
            bytes = self.bytes,
            complete = self.complete,
            "request"
        );
    }
}

/// A response body that counts its bytes and writes the line when it ends or is dropped.
struct Counted {
    inner: Body,
    line: Line,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                self.line.bytes += frame.data_ref().map_or(0, |data| data.len() as u64);
                // A body of known length is not polled past its last byte.
                self.line.complete = self.inner.is_end_stream();
            }
            Poll::Ready(None) => self.line.complete = true,
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A fresh id: 16 hex digits, unguessable from the ones before.
fn request_id() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    format!("{:016x}", hasher.finish())
}

/// Gives each request an id (`x-request-id` on the response) and logs it once its body is done. The
/// path is logged without its query string, which may hold a model id of any length.
pub(crate) async fn log(request: Request, next: Next) -> Response {
    let start = Instant::now();
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let id = request_id();
    let mut response = next.run(request).await;
    response.headers_mut().insert(REQUEST_ID, HeaderValue::from_str(&id).expect("hex digits are a header value"));
    let status = response.status().as_u16();
    response.map(|inner| {
        let line = Line { id, method, path, status, start, bytes: 0, complete: inner.is_end_stream() };
        Body::new(Counted { inner, line })
    })
}
