//! The connections of `usine serve`: a cap at accept, time limits on a request's header, on an idle
//! connection and on a request's body, a bounded header, and a lingering close so that a client still
//! sending its body reads the answer; graceful shutdown of them all.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use axum::response::IntoResponse as _;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;

use super::ApiError;
use crate::config::Config;

/// How long a closing connection keeps reading what its client still sends, and how much of it, so that
/// a client that sends its whole body before reading (Python's `http.client`) reads the answer instead of
/// a reset.
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_BYTES: u64 = 64 << 20;

/// The connection limits, from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    pub(crate) header_read: Duration,
    pub(crate) idle: Duration,
    pub(crate) body_read: Duration,
    pub(crate) max_header_bytes: usize,
    pub(crate) send_buffer_bytes: usize,
}

impl Limits {
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            max_connections: config.max_connections,
            header_read: Duration::from_millis(config.header_read_timeout_ms),
            idle: Duration::from_millis(config.idle_timeout_ms),
            body_read: Duration::from_millis(config.body_read_timeout_ms),
            max_header_bytes: config.max_header_bytes,
            send_buffer_bytes: config.send_buffer_bytes,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves; then accepts no more, lets each connection
/// finish its request in flight, and returns once they are all closed.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let max = u32::try_from(limits.max_connections).expect("`max_connections` is validated under 2^20");
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop, stopped) = watch::channel(false);
    let census = Arc::new(Census::default());
    let mut shutdown = pin!(shutdown);
    // Since when the cap holds connections back: one line when it starts, one when it ends.
    let mut full_since: Option<Instant> = None;
    loop {
        // At the cap, new connections wait in the system's accept queue (no memory of ours) until one
        // closes, which the time limits guarantee; refusing would take a socket and a task per refusal.
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if full_since.is_none() {
                    full_since = Some(Instant::now());
                    eprintln!(
                        "usine serve: {max} connections open (`max_connections`); new ones wait until one closes"
                    );
                }
                tokio::select! {
                    slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
                    () = &mut shutdown => break,
                }
            }
        };
        let accepted = match futures_util::FutureExt::now_or_never(listener.accept()) {
            Some(accepted) => accepted,
            None => {
                // A free slot and nobody in the queue: the episode is over.
                if let Some(since) = full_since.take() {
                    let seconds = since.elapsed().as_secs_f64();
                    eprintln!("usine serve: under `max_connections` again after {seconds:.1} s");
                }
                tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = &mut shutdown => break,
                }
            }
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(_) => {
                // Out of file descriptors, or a connection reset before it was accepted: pause briefly
                // rather than spin on an error that is still there.
                drop(slot);
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(50)) => continue,
                    () = &mut shutdown => break,
                }
            }
        };
        // Left alone, Linux grows a send buffer to 4 MiB: a client that stops reading would park that
        // much of the kernel's memory, and a whole stream with it, before the server ever waits on it.
        if let Err(error) = socket2::SockRef::from(&stream).set_send_buffer_size(limits.send_buffer_bytes) {
            tracing::debug!(%error, "setting a connection's send buffer");
        }
        let connection = Connection {
            router: router.clone(),
            limits: limits.clone(),
            stopped: stopped.clone(),
            census: Arc::clone(&census),
        };
        census.opened();
        tokio::spawn(async move {
            connection.run(stream, peer).await;
            drop(slot);
        });
    }
    drop(listener);
    stop.send_replace(true);
    // Every connection holds a slot until it is closed.
    let all = slots.acquire_many(max).await.expect("the semaphore is never closed");
    drop(all);
    Ok(())
}

/// Open connections, to give memory back to the system once a flood of them is over.
#[derive(Default)]
struct Census {
    /// Open now, and the most open since memory was last given back.
    counts: Mutex<(usize, usize)>,
}

impl Census {
    /// After this many connections at once, the allocator keeps freed buffers worth giving back.
    const FLOOD: usize = 256;

    fn opened(&self) {
        let mut counts = self.counts.lock();
        counts.0 += 1;
        counts.1 = counts.1.max(counts.0);
    }

    fn closed(&self) {
        let mut counts = self.counts.lock();
        counts.0 -= 1;
        let (open, peak) = *counts;
        if peak >= Self::FLOOD && open <= peak / 8 {
            counts.1 = open;
            drop(counts);
            // Walking every arena can take milliseconds on a large heap: not on a worker thread.
            drop(tokio::task::spawn_blocking(give_memory_back));
        }
    }
}

/// Returns the free pages of glibc's heaps to the system: glibc keeps them after a flood of connections
/// (hundreds of MB) otherwise.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn give_memory_back() {
    #[allow(unsafe_code, reason = "malloc_trim takes no pointer and is thread-safe in glibc")]
    // SAFETY: `malloc_trim` only walks glibc's own heaps under their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn give_memory_back() {}

/// Why a connection was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// A request's header was not whole in time.
    Header,
    /// No request came in time.
    Idle,
}

/// One accepted connection and what it needs.
struct Connection {
    router: Router,
    limits: Limits,
    stopped: watch::Receiver<bool>,
    census: Arc<Census>,
}

impl Connection {
    async fn run(mut self, stream: TcpStream, peer: SocketAddr) {
        let watch = Arc::new(Watch::new());
        let returned = Arc::new(Mutex::new(None));
        let io = Io { stream: Some(stream), watch: Arc::clone(&watch), returned: Arc::clone(&returned) };
        let service = {
            let (service, watch, body_read) =
                (TowerToHyperService::new(self.router.clone()), Arc::clone(&watch), self.limits.body_read);
            hyper::service::service_fn(move |request: Request<Incoming>| {
                // Busy from the moment the header is parsed, before the handler first runs.
                let busy = Busy::start(Arc::clone(&watch), !http_body::Body::is_end_stream(request.body()));
                handle(service.clone(), request, peer, busy, body_read)
            })
        };
        let mut builder = hyper::server::conn::http1::Builder::new();
        // hyper's own header timeout runs from the moment it waits for a request, so it would cut idle
        // connections at the header's limit; `Watch` times the two apart.
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(self.limits.max_header_bytes)
            .max_header_size(self.limits.max_header_bytes);
        let mut conn = Box::pin(builder.serve_connection(TokioIo::new(io), service));
        let mut stopping = false;
        let cut = loop {
            tokio::select! {
                _ = conn.as_mut() => break None,
                cut = watch.expired(&self.limits) => break Some(cut),
                _ = self.stopped.changed(), if !stopping => {
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        };
        drop(conn); // hands the socket back through `returned`
        let stream = returned.lock().take();
        if let Some(mut stream) = stream {
            let (started_head, unread, eof) = watch.ending();
            if cut == Some(Cut::Header) && started_head {
                let message = format!(
                    "the request's header did not arrive within `header_read_timeout_ms` ({} ms)",
                    self.limits.header_read.as_millis()
                );
                let status = StatusCode::REQUEST_TIMEOUT;
                let error = ApiError::new(status, message, "header_timeout");
                let _ = tokio::time::timeout(LINGER_TIME, write_error(&mut stream, status, &error)).await;
            }
            if !eof && (started_head || unread) {
                linger(&mut stream).await;
            }
        }
        self.census.closed();
    }
}

/// Serves one request: the peer's address for the handlers, the body under its time limit, and the
/// connection busy until the response's body is over.
async fn handle(
    service: TowerToHyperService<Router>,
    request: Request<Incoming>,
    peer: SocketAddr,
    busy: Busy,
    body_read: Duration,
) -> Result<Response<Body>, Infallible> {
    let (mut parts, body) = request.into_parts();
    parts.extensions.insert(ConnectInfo(peer));
    let watch = Arc::clone(&busy.watch);
    let late = Arc::new(AtomicBool::new(false));
    let body = TimedBody {
        inner: body,
        deadline: Box::pin(tokio::time::sleep(body_read)),
        late: Arc::clone(&late),
        read: false,
        watch,
        body_read,
    };
    let response = hyper::service::Service::call(&service, Request::from_parts(parts, body)).await?;
    let mut response = if late.load(Ordering::Acquire) {
        let message = BodyTimeout(body_read).to_string();
        ApiError::new(StatusCode::REQUEST_TIMEOUT, message, "body_timeout").into_response()
    } else {
        response
    };
    if busy.unread() {
        // The rest of the body is not read: the connection cannot carry another request.
        response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response.map(|body| Body::new(Guarded { inner: body, _busy: busy })))
}

/// Writes `error` as a whole response, for a connection hyper no longer serves.
async fn write_error(stream: &mut TcpStream, status: StatusCode, error: &ApiError) -> io::Result<()> {
    let body = serde_json::to_vec(&error.body()).expect("an error's body is plain JSON");
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.flush().await
}

/// Closes the sending side, then reads and drops what the client still sends (bounded in time and bytes)
/// before the socket is closed: closing with unread data would reset the connection, and a client that
/// is still sending would see the reset before it reads the answer.
async fn linger(stream: &mut TcpStream) {
    let _ = stream.shutdown().await;
    let deadline = Instant::now() + LINGER_TIME;
    let mut buffer = vec![0; 16 << 10];
    let mut left = LINGER_BYTES;
    while left > 0 {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Ok(Ok(read)) if read > 0 => left = left.saturating_sub(read as u64),
            _ => break,
        }
    }
}

/// Where a connection is: what time limit applies, and what the end of the connection must do.
struct Watch {
    state: Mutex<State>,
    changed: Notify,
}

struct State {
    phase: Phase,
    /// When `phase` began.
    since: Instant,
    /// Requests whose response is not over.
    in_flight: usize,
    /// Requests whose body was not read to its end.
    unread: usize,
    /// The client closed its sending side.
    eof: bool,
    /// Since when a write has waited for the client to take bytes (its window full), if one waits.
    write_blocked: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request, and no byte of one.
    Idle,
    /// A request's header has begun.
    Head,
    /// A request is served.
    Busy,
}

impl Watch {
    fn new() -> Self {
        let state = State {
            phase: Phase::Idle,
            since: Instant::now(),
            in_flight: 0,
            unread: 0,
            eof: false,
            write_blocked: None,
        };
        Self { state: Mutex::new(state), changed: Notify::new() }
    }

    fn read(&self, bytes: usize) {
        let mut state = self.state.lock();
        if bytes == 0 {
            state.eof = true;
        } else if state.phase == Phase::Idle {
            state.phase = Phase::Head;
            state.since = Instant::now();
            drop(state);
            self.changed.notify_waiters();
        }
    }

    /// Resolves when the time limit of the connection's phase is over.
    async fn expired(&self, limits: &Limits) -> Cut {
        loop {
            let mut changed = pin!(self.changed.notified());
            changed.as_mut().enable();
            let (phase, since, write_blocked) = {
                let state = self.state.lock();
                (state.phase, state.since, state.write_blocked)
            };
            let (limit, cut, since) = match (phase, write_blocked) {
                (Phase::Idle, _) => (limits.idle, Cut::Idle, since),
                (Phase::Head, _) => (limits.header_read, Cut::Header, since),
                // A response the client does not take (a stream it stopped reading, its window shut)
                // would hold the connection and its place under the cap for ever: the idle limit.
                (Phase::Busy, Some(blocked)) => (limits.idle, Cut::Idle, blocked),
                (Phase::Busy, None) => {
                    changed.await;
                    continue;
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(since + limit) => return cut,
                () = changed => {}
            }
        }
    }

    /// A write to the client waited (`blocked`) or went through: the clock of a response nobody takes.
    fn wrote(&self, blocked: bool) {
        let mut state = self.state.lock();
        if state.write_blocked.is_some() != blocked {
            state.write_blocked = blocked.then(Instant::now);
            drop(state);
            self.changed.notify_waiters();
        }
    }

    /// Whether a request had begun, whether a body was left unread, and whether the client closed.
    fn ending(&self) -> (bool, bool, bool) {
        let state = self.state.lock();
        (state.phase != Phase::Idle, state.unread > 0, state.eof)
    }
}

/// A request in flight, from its header to the end of its response.
struct Busy {
    watch: Arc<Watch>,
}

impl Busy {
    fn start(watch: Arc<Watch>, has_body: bool) -> Self {
        {
            let mut state = watch.state.lock();
            state.phase = Phase::Busy;
            state.in_flight += 1;
            state.unread += usize::from(has_body);
        }
        watch.changed.notify_waiters();
        Self { watch }
    }

    fn unread(&self) -> bool {
        self.watch.state.lock().unread > 0
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.watch.state.lock();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            state.phase = Phase::Idle;
            state.since = Instant::now();
        }
        drop(state);
        self.watch.changed.notify_waiters();
    }
}

/// The request's body, cut when it is not whole within `body_read_timeout_ms`.
struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    late: Arc<AtomicBool>,
    /// Read to its end.
    read: bool,
    watch: Arc<Watch>,
    body_read: Duration,
}

/// The error of a body cut by its time limit.
#[derive(Debug)]
struct BodyTimeout(Duration);

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the request's body did not arrive within `body_read_timeout_ms` ({} ms)", self.0.as_millis())
    }
}

impl std::error::Error for BodyTimeout {}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if !this.read && (frame.is_none() || this.inner.is_end_stream()) {
                this.read = true;
                let mut state = this.watch.state.lock();
                state.unread = state.unread.saturating_sub(1);
            }
            return Poll::Ready(frame.map(|frame| frame.map_err(Into::into)));
        }
        ready!(this.deadline.as_mut().poll(cx));
        this.late.store(true, Ordering::Release);
        Poll::Ready(Some(Err(Box::new(BodyTimeout(this.body_read)))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response's body that keeps its connection busy until it is over or dropped.
struct Guarded {
    inner: Body,
    _busy: Busy,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket as hyper sees it: reads are reported to the `Watch`, and the socket is handed back through
/// `returned` when hyper drops it, for a last answer and a lingering close.
struct Io {
    stream: Option<TcpStream>,
    watch: Arc<Watch>,
    returned: Arc<Mutex<Option<TcpStream>>>,
}

impl Io {
    fn stream(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.stream.as_mut().expect("the stream is only taken on drop"))
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        *self.returned.lock() = self.stream.take();
    }
}

impl AsyncRead for Io {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(self.stream().poll_read(cx, buf))?;
        self.watch.read(buf.filled().len() - before);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Io {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = self.stream().poll_write(cx, buf);
        self.watch.wrote(written.is_pending());
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = self.stream().poll_write_vectored(cx, bufs);
        self.watch.wrote(written.is_pending());
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.as_ref().is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 4,
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            body_read: Duration::from_secs(60),
            max_header_bytes: 32 << 10,
            send_buffer_bytes: 64 << 10,
        }
    }

    // Would catch: a response the client stopped taking holding its connection (and its place under
    // `max_connections`) for ever.
    #[tokio::test(start_paused = true)]
    async fn a_response_the_client_does_not_take_is_cut_at_the_idle_limit() {
        let (watch, limits) = (Watch::new(), limits());
        watch.state.lock().phase = Phase::Busy;
        let start = Instant::now();
        let writes = async {
            tokio::time::sleep(Duration::from_secs(30)).await; // the server computes: no limit
            watch.wrote(true); // the client's window is full
            tokio::time::sleep(Duration::from_secs(20)).await;
            watch.wrote(false); // it took some bytes: the clock starts again
            watch.wrote(true);
            std::future::pending::<()>().await;
        };
        tokio::select! {
            cut = watch.expired(&limits) => assert_eq!(cut, Cut::Idle),
            () = writes => unreachable!(),
        }
        assert_eq!(start.elapsed(), Duration::from_secs(30 + 20 + 60));
    }
}
