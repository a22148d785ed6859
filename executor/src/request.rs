//! What a caller asks for: a model, a prompt or a conversation, how to generate, how urgent it is and
//! how long it may take.

use usine_engine::{GenerationParams, Message, render_plain};

use crate::config::TimeoutOverrides;

/// How urgent a request is: a free slot goes to the most urgent request queued, the oldest first
/// among equals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    /// Batch work that may wait.
    Low,
    /// The default.
    #[default]
    Normal,
    /// A person is waiting.
    High,
}

/// What the model continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A text to continue.
    Prompt(String),
    /// A conversation to answer, rendered by [`Input::render`].
    Chat(Vec<Message>),
}

impl Input {
    /// The text of a prompt; a conversation as a model without a chat template reads it
    /// ([`render_plain`]; a model renders its own with [`LoadedModel::chat_prompt`]).
    ///
    /// [`LoadedModel::chat_prompt`]: usine_engine::LoadedModel::chat_prompt
    pub fn render(&self) -> String {
        match self {
            Self::Prompt(prompt) => prompt.clone(),
            Self::Chat(messages) => render_plain(messages),
        }
    }
}

/// A generation request.
///
/// ```
/// use std::time::Duration;
/// use usine_executor::{Priority, Request, TimeoutOverrides};
///
/// let request = Request::prompt("tiny", "Once upon a time")
///     .max_tokens(32)
///     .priority(Priority::High)
///     .timeouts(TimeoutOverrides { total: Some(Duration::from_secs(10)), ..TimeoutOverrides::default() });
/// assert_eq!(request.params.max_tokens, 32);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The model's id in the kernel's catalog.
    pub model: String,
    /// What to continue.
    pub input: Input,
    /// How to generate.
    pub params: GenerationParams,
    /// How urgent it is.
    pub priority: Priority,
    /// Limits of this request; each one set replaces the executor's.
    pub timeouts: TimeoutOverrides,
    /// `params.max_tokens` is a default, not the caller's choice: when the prompt and it overflow the
    /// model's context, generate what fits (up to the context's end) instead of refusing the request.
    pub fit_to_context: bool,
}

impl Request {
    /// A request to continue `prompt` with `model`, with default parameters.
    pub fn prompt(model: impl Into<String>, prompt: impl Into<String>) -> Self {
        Self::new(model, Input::Prompt(prompt.into()))
    }

    /// A request to answer a conversation with `model`, with default parameters.
    pub fn chat(model: impl Into<String>, messages: Vec<Message>) -> Self {
        Self::new(model, Input::Chat(messages))
    }

    fn new(model: impl Into<String>, input: Input) -> Self {
        Self {
            model: model.into(),
            input,
            params: GenerationParams::default(),
            priority: Priority::default(),
            timeouts: TimeoutOverrides::default(),
            fit_to_context: false,
        }
    }

    /// Sets the generation parameters.
    #[must_use]
    pub fn params(mut self, params: GenerationParams) -> Self {
        self.params = params;
        self
    }

    /// Sets the most tokens to generate.
    #[must_use]
    pub fn max_tokens(mut self, max_tokens: u32) -> Self {
        self.params.max_tokens = max_tokens;
        self
    }

    /// Says that `max_tokens` is a default the caller did not choose: a prompt that leaves less room in
    /// the context gets what fits instead of an error.
    #[must_use]
    pub fn fit_to_context(mut self) -> Self {
        self.fit_to_context = true;
        self
    }

    /// Sets the priority.
    #[must_use]
    pub fn priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// Sets this request's own time limits (those left `None` keep the executor's).
    #[must_use]
    pub fn timeouts(mut self, timeouts: TimeoutOverrides) -> Self {
        self.timeouts = timeouts;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_order_low_to_high() {
        assert!(Priority::Low < Priority::Normal && Priority::Normal < Priority::High);
    }
}
