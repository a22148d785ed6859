//! `GenerationStream`: the reader's end of a generation. Dropping it cancels the generation.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use usine_engine::TokenId;

use crate::error::ExecutorError;
use crate::event::{Event, Usage};

/// The events of one generation, as they come ([`Event`] gives their order). A `Stream`, and also
/// readable without one with [`next`](Self::next).
///
/// Dropping it stops the generation within one step and returns every lease it held.
#[derive(Debug)]
pub struct GenerationStream {
    events: mpsc::Receiver<Result<Event, ExecutorError>>,
    task: JoinHandle<()>,
    /// The last event (`Finished` or an error) was read, or the end was reported.
    ended: bool,
}

/// A whole generation, read to its end by [`GenerationStream::output`].
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The text, without the prompt and without a stop sequence.
    pub text: String,
    /// The tokens generated.
    pub tokens: Vec<TokenId>,
    /// The figures.
    pub usage: Usage,
}

impl GenerationStream {
    pub(crate) fn new(events: mpsc::Receiver<Result<Event, ExecutorError>>, task: JoinHandle<()>) -> Self {
        Self { events, task, ended: false }
    }

    /// The next event; `None` after the last. A generation whose task ended without its last event (the
    /// engine panicked) yields [`ExecutorError::Aborted`] once.
    pub async fn next(&mut self) -> Option<Result<Event, ExecutorError>> {
        let event = self.events.recv().await;
        self.settle(event)
    }

    /// Notes the end of the stream, and reports a task that ended without saying so.
    fn settle(&mut self, event: Option<Result<Event, ExecutorError>>) -> Option<Result<Event, ExecutorError>> {
        match event {
            Some(event) => {
                self.ended |= matches!(event, Ok(Event::Finished(_)) | Err(_));
                Some(event)
            }
            None if self.ended => None,
            None => {
                self.ended = true;
                Some(Err(ExecutorError::Aborted))
            }
        }
    }

    /// Reads the whole generation.
    pub async fn output(mut self) -> Result<Output, ExecutorError> {
        let mut text = String::new();
        let mut tokens = Vec::new();
        while let Some(event) = self.next().await {
            match event? {
                Event::Started { .. } => {}
                Event::Token { id, text: delta, .. } => {
                    tokens.push(id);
                    text.push_str(&delta);
                }
                Event::Text(delta) => text.push_str(&delta),
                Event::Finished(usage) => return Ok(Output { text, tokens, usage }),
            }
        }
        Err(ExecutorError::Aborted) // unreachable: `next` reports an end without `Finished` as an error
    }
}

impl futures_core::Stream for GenerationStream {
    type Item = Result<Event, ExecutorError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let event = std::task::ready!(self.events.poll_recv(cx));
        Poll::Ready(self.settle(event))
    }
}

impl Drop for GenerationStream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
