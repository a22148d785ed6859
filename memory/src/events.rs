//! Events about pools and leases, broadcast to any number of subscribers without slowing allocations.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_stream::Stream;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::lease::{LeaseId, ScopeId};

/// A pool's name, shared cheaply between events.
pub type PoolName = Arc<str>;

/// Something that happened to a pool or a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A pool was created.
    PoolCreated {
        /// The new pool.
        pool: PoolName,
        /// Its capacity in bytes.
        capacity: u64,
        /// Its block size in bytes.
        block_size: u64,
    },
    /// A lease was handed out (at once or to a waiter).
    Allocated {
        /// The pool.
        pool: PoolName,
        /// The new lease.
        lease: LeaseId,
        /// Bytes reserved (whole blocks).
        bytes: u64,
        /// The lease's scope.
        scope: ScopeId,
    },
    /// A lease grew or shrank by whole blocks.
    Resized {
        /// The pool.
        pool: PoolName,
        /// The lease.
        lease: LeaseId,
        /// Bytes reserved before.
        from: u64,
        /// Bytes reserved after.
        to: u64,
    },
    /// A lease was dropped and its blocks returned.
    Freed {
        /// The pool.
        pool: PoolName,
        /// The lease.
        lease: LeaseId,
        /// Bytes returned.
        bytes: u64,
    },
    /// A lease was revoked and its blocks returned, by the GC or a scope release.
    Reclaimed {
        /// The pool.
        pool: PoolName,
        /// The revoked lease.
        lease: LeaseId,
        /// Bytes returned.
        bytes: u64,
        /// The lease's scope.
        scope: ScopeId,
        /// How long the lease had not been used.
        idle: Duration,
        /// Who took it back.
        reason: ReclaimReason,
    },
    /// An allocation failed.
    AllocationFailed {
        /// The pool.
        pool: PoolName,
        /// Bytes requested.
        requested: u64,
        /// Bytes free at that moment.
        available: u64,
        /// Why it failed.
        reason: FailureReason,
    },
    /// A request began to wait for space.
    WaitStarted {
        /// The pool.
        pool: PoolName,
        /// Bytes requested.
        requested: u64,
        /// Bytes free when it began to wait.
        available: u64,
        /// Waiters ahead of it.
        ahead: usize,
    },
    /// A waiting request gave up after its timeout.
    WaitTimedOut {
        /// The pool.
        pool: PoolName,
        /// Bytes requested.
        requested: u64,
        /// How long it waited.
        waited: Duration,
    },
    /// Use reached the pool's high-water mark (pressure high), or fell back to its low-water mark
    /// (pressure normal).
    Pressure {
        /// The pool.
        pool: PoolName,
        /// Bytes in use after the change.
        used: u64,
        /// The pool's capacity.
        capacity: u64,
        /// Which side of the mark use is now on.
        level: PressureLevel,
    },
}

/// Who revoked a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReclaimReason {
    /// The GC found it idle longer than the pool's idle timeout.
    Idle,
    /// Its scope was released.
    Scope,
}

impl ReclaimReason {
    /// A short fixed name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Scope => "scope",
        }
    }
}

/// Why an allocation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// Not enough free space at that moment.
    Exhausted,
    /// More than the pool's whole capacity.
    TooLarge,
    /// Waited the whole timeout.
    TimedOut,
}

impl FailureReason {
    /// A short fixed name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exhausted => "exhausted",
            Self::TooLarge => "too_large",
            Self::TimedOut => "timed_out",
        }
    }
}

/// Which side of the high-water mark a pool's use is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PressureLevel {
    /// Use reached the high-water mark.
    High,
    /// Use fell back to the low-water mark.
    Normal,
}

/// The broadcast side, shared by the manager and its pools.
#[derive(Debug)]
pub(crate) struct EventBus {
    sender: broadcast::Sender<Event>,
    /// Live subscribers; read on every emit so that nobody listening costs one atomic load.
    subscribers: Arc<AtomicUsize>,
}

impl EventBus {
    pub(crate) fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity.clamp(1, crate::config::MAX_EVENT_CAPACITY));
        Self { sender, subscribers: Arc::new(AtomicUsize::new(0)) }
    }

    /// Sends the event built by `event`, building it only when someone listens.
    ///
    /// Never waits: a subscriber that falls behind loses the oldest events and is told how many.
    pub(crate) fn emit(&self, event: impl FnOnce() -> Event) {
        if self.subscribers.load(Ordering::Relaxed) > 0 {
            // An error only means every subscriber left in the meantime.
            let _ = self.sender.send(event());
        }
    }

    pub(crate) fn subscribe(&self) -> EventStream {
        self.subscribers.fetch_add(1, Ordering::Relaxed);
        EventStream { inner: BroadcastStream::new(self.sender.subscribe()), subscribers: Arc::clone(&self.subscribers) }
    }
}

/// A subscriber fell behind and lost this many of the oldest events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("event subscriber lagged behind and missed {missed} events")]
pub struct Lagged {
    /// How many events were lost.
    pub missed: u64,
}

/// The events of a [`MemoryManager`](crate::MemoryManager), from the moment of subscribing.
///
/// A `Stream` of `Result<Event, Lagged>`: an `Err` says how many events a slow reader missed, then
/// the stream goes on with the oldest event still held. It ends when the manager, its pools and
/// their leases are all gone.
pub struct EventStream {
    inner: BroadcastStream<Event>,
    subscribers: Arc<AtomicUsize>,
}

impl Stream for EventStream {
    type Item = Result<Event, Lagged>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx).map(|item| {
            item.map(|received| received.map_err(|BroadcastStreamRecvError::Lagged(missed)| Lagged { missed }))
        })
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventStream").finish_non_exhaustive()
    }
}
