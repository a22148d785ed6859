//! What a generation stream yields: a start, tokens with their text, held-back text, and usage at the end.

use std::time::Duration;

use usine_engine::{FinishReason, TokenId};
use usine_kernel::LoadSource;

/// One event of a generation, in this order: [`Started`](Event::Started), any number of
/// [`Token`](Event::Token)s, at most one [`Text`](Event::Text), then [`Finished`](Event::Finished).
/// A stream that fails yields its error instead of whatever would have come next, and ends.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The model is ready and the kv-cache reserved: the prompt's prefill and the tokens follow.
    Started {
        /// Where the model came from when it was loaded into memory.
        source: LoadSource,
        /// Time in the admission queue.
        queued: Duration,
        /// Time this request spent getting the model ready (nothing for a model already loaded).
        load: Duration,
        /// Tokens in the prompt.
        prompt_tokens: u32,
    },
    /// A generated token.
    Token {
        /// Its place in the generation, from 0.
        index: u32,
        /// Its id.
        id: TokenId,
        /// The text it completes: may be empty (part of a character, or held back because it may begin
        /// a stop sequence), or hold the text of earlier tokens as well.
        text: String,
    },
    /// Text held back until the end (the start of a stop sequence that never completed, or an
    /// unfinished character).
    Text(String),
    /// The end, with the figures.
    Finished(Usage),
}

/// What a generation used and how fast it went.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    /// Why it ended.
    pub finish: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: u32,
    /// Leading prompt tokens whose kv-cache an earlier generation computed (the prefix cache, where
    /// the model pages its kv-cache): not computed again.
    pub cached_tokens: u32,
    /// Tokens generated (an end-of-sequence token is not counted).
    pub generated_tokens: u32,
    /// From submission to the first token.
    pub time_to_first_token: Duration,
    /// Decode speed: tokens after the first, over the time from the first to the last (0 with fewer than
    /// two tokens).
    pub tokens_per_second: f64,
    /// Time in the admission queue.
    pub queued: Duration,
    /// From submission to the end.
    pub total: Duration,
    /// Transient failures retried.
    pub retries: u32,
    /// Time the compute stage sat idle waiting for the prepare stage (the pipeline's dead time).
    pub pipeline_idle: Duration,
}
