//! What the kernel tells its subscribers.

use std::time::Duration;

use usine_engine::Progress;

/// Where a load got its model from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoadSource {
    /// Already loaded.
    Memory,
    /// A stored graph.
    Disk,
    /// A graph another host compiled, fetched from the fleet's remote tier into the local store.
    Remote,
    /// Compiled (and saved).
    Compile,
}

impl LoadSource {
    /// A short fixed name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Disk => "disk",
            Self::Remote => "remote",
            Self::Compile => "compile",
        }
    }

    /// Read from the local store (a graph stored there, or fetched there from the remote tier).
    pub(crate) fn stored(self) -> bool {
        matches!(self, Self::Disk | Self::Remote)
    }
}

/// Why a model left memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EvictReason {
    /// Room for another model's weights (least recently used first).
    Lru,
    /// Under the limit of loaded models.
    MaxLoaded,
    /// Idle past its keep-alive.
    KeepAlive,
    /// Unloaded by hand.
    Unloaded,
}

impl EvictReason {
    /// A short fixed name, used as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lru => "lru",
            Self::MaxLoaded => "max_loaded",
            Self::KeepAlive => "keep_alive",
            Self::Unloaded => "unloaded",
        }
    }
}

/// Something the kernel did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum KernelEvent {
    /// A load began (not a memory hit).
    LoadStarted {
        /// The model.
        model: String,
    },
    /// A compile progressed.
    Progress {
        /// The model.
        model: String,
        /// How far.
        progress: Progress,
    },
    /// A model is loaded.
    Loaded {
        /// The model.
        model: String,
        /// From where.
        source: LoadSource,
        /// How long it took.
        duration: Duration,
    },
    /// A load failed.
    LoadFailed {
        /// The model.
        model: String,
        /// The error, as text.
        message: String,
    },
    /// A model left memory.
    Evicted {
        /// The model.
        model: String,
        /// Why.
        reason: EvictReason,
    },
    /// A warm-up load gave its slot to a user load and went back to the front of the queue.
    WarmupPreempted {
        /// The model.
        model: String,
    },
    /// Another process compiles the model (it holds the graph's lock): this load waits for its graph.
    WaitingForCompile {
        /// The model.
        model: String,
    },
    /// Another host of the fleet compiles the model (it holds the remote tier's lease): this load waits
    /// for its graph, up to the tier's bound.
    WaitingForHost {
        /// The model.
        model: String,
    },
    /// The stored graph was damaged: the store moved it to quarantine, and the model compiles again.
    GraphQuarantined {
        /// The model.
        model: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A compiled graph could not be saved; the model is loaded all the same.
    SaveFailed {
        /// The model.
        model: String,
        /// The store's error.
        message: String,
    },
}

/// The kernel's events from a [`RuntimeManager::subscribe`](crate::RuntimeManager::subscribe) on: a
/// [`Stream`](tokio_stream::Stream), as the memory manager's and the executor's are. A subscriber that
/// falls behind is told how many it missed ([`Lagged`]), then reads on.
pub struct KernelEvents {
    inner: tokio_stream::wrappers::BroadcastStream<KernelEvent>,
}

/// Events a slow subscriber missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{missed} kernel events missed by a slow subscriber")]
pub struct Lagged {
    /// How many.
    pub missed: u64,
}

impl KernelEvents {
    pub(crate) fn new(receiver: tokio::sync::broadcast::Receiver<KernelEvent>) -> Self {
        Self { inner: tokio_stream::wrappers::BroadcastStream::new(receiver) }
    }

    /// The next event already sent, without waiting (missed ones skipped); `None` when there is none yet.
    pub fn try_next(&mut self) -> Option<KernelEvent> {
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        loop {
            match tokio_stream::Stream::poll_next(std::pin::Pin::new(&mut self.inner), &mut context) {
                std::task::Poll::Ready(Some(Ok(event))) => return Some(event),
                std::task::Poll::Ready(Some(Err(_))) => {}
                std::task::Poll::Ready(None) | std::task::Poll::Pending => return None,
            }
        }
    }
}

impl tokio_stream::Stream for KernelEvents {
    type Item = Result<KernelEvent, Lagged>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.inner).poll_next(cx).map(|item| {
            item.map(|received| {
                received.map_err(|tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(missed)| Lagged {
                    missed,
                })
            })
        })
    }
}

impl std::fmt::Debug for KernelEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelEvents").finish_non_exhaustive()
    }
}
