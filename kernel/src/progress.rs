//! One model's compile progress, as a stream of the kernel's events.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::sync::broadcast;
use tokio_stream::Stream;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use usine_engine::Progress;

use crate::error::KernelError;
use crate::events::KernelEvent;

/// One model's compile progress; see [`RuntimeManager::progress`](crate::RuntimeManager::progress).
/// A [`Stream`] of reports that ends with the load it follows.
pub struct ProgressStream {
    events: BroadcastStream<KernelEvent>,
    model: String,
    ended: Option<ProgressEnd>,
    _slot: StreamSlot,
}

impl std::fmt::Debug for ProgressStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressStream").field("model", &self.model).field("ended", &self.ended).finish()
    }
}

/// Why a [`ProgressStream`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressEnd {
    /// The model is loaded.
    Loaded,
    /// Its load failed.
    Failed,
    /// Its warm-up gave its slot to a user's load and went back to the front of the queue: it starts
    /// again later, and a new stream can follow it.
    Preempted,
    /// The kernel is gone.
    KernelGone,
}

impl ProgressStream {
    /// A stream of `model`'s progress in `events`, one of at most `limit` open at once (`open` counts
    /// them).
    pub(crate) fn open(
        events: broadcast::Receiver<KernelEvent>,
        model: &str,
        open: &Arc<AtomicUsize>,
        limit: usize,
    ) -> Result<Self, KernelError> {
        if open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < limit).then_some(n + 1)).is_err() {
            return Err(KernelError::TooManyProgressStreams { limit });
        }
        let slot = StreamSlot(Arc::clone(open));
        Ok(Self { events: BroadcastStream::new(events), model: model.to_owned(), ended: None, _slot: slot })
    }

    /// The next report (stage, fraction, time left), or `None` once the load it follows ends: loaded,
    /// failed, or a warm-up pre-empted ([`ended`](Self::ended) says which). A reader that falls behind
    /// skips the reports it missed.
    pub async fn next(&mut self) -> Option<Progress> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }

    /// Why the stream ended; `None` while it runs.
    pub fn ended(&self) -> Option<ProgressEnd> {
        self.ended
    }
}

impl Stream for ProgressStream {
    type Item = Progress;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Progress>> {
        while self.ended.is_none() {
            let end = match Pin::new(&mut self.events).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(event))) => match event {
                    KernelEvent::Progress { model, progress } if model == self.model => {
                        return Poll::Ready(Some(progress));
                    }
                    KernelEvent::Loaded { model, .. } if model == self.model => ProgressEnd::Loaded,
                    KernelEvent::LoadFailed { model, .. } if model == self.model => ProgressEnd::Failed,
                    KernelEvent::WarmupPreempted { model } if model == self.model => ProgressEnd::Preempted,
                    _ => continue,
                },
                Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(_)))) => continue,
                Poll::Ready(None) => ProgressEnd::KernelGone,
            };
            self.ended = Some(end);
        }
        Poll::Ready(None)
    }
}

/// One of the [`KernelConfig::max_progress_streams`](crate::KernelConfig::max_progress_streams)
/// slots, given back when its stream is dropped.
struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
