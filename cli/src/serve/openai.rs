//! The OpenAI-compatible endpoints: completions and chat completions (one JSON body, or server-sent
//! events ending with `[DONE]`), and the list of models.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use usine_engine::{FinishReason, GenerationParams};
use usine_executor::{Event, GenerationStream, Message, Request, Role, Usage};

use super::{ApiError, AppState};

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `prompt`: one string, or a list of one.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Prompt {
    One(String),
    Many(Vec<String>),
}

/// The sampling fields both endpoints take.
#[derive(Debug, Deserialize)]
pub(crate) struct Sampling {
    // Whole numbers are read as i64 and checked here, so that `-1` is a 422 naming the limit, not a 400.
    max_tokens: Option<i64>,
    /// The chat endpoint's newer name for `max_tokens`.
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Not OpenAI's, but taken by most servers that speak its API.
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    n: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    model: String,
    prompt: Prompt,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ChatMessage {
    role: String,
    content: String,
}

/// Which endpoint: they differ in the shape of their answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

pub(crate) async fn completions(
    State(state): State<AppState>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|rejection| super::error::rejected(rejection, &state))?;
    let prompt = match body.prompt {
        Prompt::One(prompt) => prompt,
        Prompt::Many(mut prompts) if prompts.len() == 1 => prompts.remove(0),
        Prompt::Many(prompts) => {
            return Err(ApiError::out_of_range(format!("`prompt` has {} texts; this server takes one", prompts.len())));
        }
    };
    check_prompt_len(&state, prompt.len())?;
    let request = Request::prompt(&body.model, prompt);
    generate(&state, request, body.sampling, Kind::Completion).await
}

pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(|rejection| super::error::rejected(rejection, &state))?;
    if body.messages.is_empty() {
        return Err(ApiError::out_of_range("`messages` is empty; it needs at least one message"));
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    for message in body.messages {
        let role = match message.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => {
                return Err(ApiError::out_of_range(format!(
                    "message role `{}` is not one of system, developer, user, assistant",
                    other.chars().take(32).collect::<String>()
                )));
            }
        };
        messages.push(Message::new(role, message.content));
    }
    let request = Request::chat(&body.model, messages);
    check_prompt_len(&state, request.input.render().len())?; // the messages, plainly (a template adds its markers)
    generate(&state, request, body.sampling, Kind::Chat).await
}

fn check_prompt_len(state: &AppState, bytes: usize) -> Result<(), ApiError> {
    let limit = state.loaded.config.max_prompt_bytes;
    if bytes > limit {
        return Err(ApiError::out_of_range(format!(
            "the prompt is {bytes} bytes, more than the limit of {limit} bytes"
        )));
    }
    Ok(())
}

/// The generation parameters of a request: the server's defaults, what the request sets, its limits.
fn params(state: &AppState, sampling: &Sampling) -> Result<GenerationParams, ApiError> {
    let defaults = state.loaded.params();
    let limit = state.loaded.config.max_tokens_limit;
    let max_tokens = match sampling.max_completion_tokens.or(sampling.max_tokens) {
        None => defaults.max_tokens.min(limit),
        Some(asked) => u32::try_from(asked).ok().filter(|&asked| (1..=limit).contains(&asked)).ok_or_else(|| {
            ApiError::out_of_range(format!("`max_tokens` is {asked}, outside 1..={limit} (the limit)"))
        })?,
    };
    let seed = match sampling.seed {
        // No seed asked: a fresh one, as OpenAI's API does, so that equal prompts do not give equal text.
        None => fresh_seed(),
        Some(seed) => {
            u64::try_from(seed).map_err(|_| ApiError::out_of_range(format!("`seed` is {seed}, outside 0..")))?
        }
    };
    if sampling.n.is_some_and(|n| n != 1) {
        return Err(ApiError::out_of_range("`n` must be 1: this server generates one choice per request"));
    }
    let stop = match &sampling.stop {
        None => Vec::new(),
        Some(Stop::One(stop)) => vec![stop.clone()],
        Some(Stop::Many(stops)) => stops.clone(),
    };
    let params = GenerationParams {
        max_tokens,
        temperature: sampling.temperature.unwrap_or(defaults.temperature),
        top_p: sampling.top_p.unwrap_or(defaults.top_p),
        top_k: match sampling.top_k {
            None => defaults.top_k,
            Some(asked) => {
                u32::try_from(asked).map_err(|_| ApiError::out_of_range(format!("`top_k` is {asked}, outside 0..")))?
            }
        },
        seed,
        stop,
    };
    // Checked once, by the executor when the request is submitted (a 422 naming the limit).
    Ok(params)
}

/// Starts the generation and answers: the status is decided by the first event (a model that cannot be
/// loaded, a prompt too long for the context, a queue that is full), then the body follows.
async fn generate(state: &AppState, request: Request, sampling: Sampling, kind: Kind) -> Result<Response, ApiError> {
    state.ready()?;
    let params = params(state, &sampling)?;
    // A server default for `max_tokens`, not the client's: what fits the context is generated.
    let fit = sampling.max_completion_tokens.or(sampling.max_tokens).is_none();
    let request = if fit { request.fit_to_context() } else { request };
    let model = request.model.clone();
    super::error::known_model(state, &model)?; // a 404 before anything queues
    let mut stream = state.app.executor.generate(request.params(params))?;
    let prompt_tokens = match stream.next().await {
        Some(Ok(Event::Started { prompt_tokens, .. })) => prompt_tokens,
        Some(Err(error)) => return Err(error.into()),
        Some(Ok(_)) | None => {
            return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the generation did not start", "aborted"));
        }
    };
    let answer = Answer { id: answer_id(kind), created: now(), model, kind, prompt_tokens };
    if sampling.stream {
        // The status is committed with the first piece of the answer: a prefill that runs out of time,
        // or fails for good, is still a 504 or a 5xx, not a 200 with an error inside.
        let first = match stream.next().await {
            Some(Ok(event)) => event,
            Some(Err(error)) => return Err(error.into()),
            None => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the generation ended at once",
                    "aborted",
                ));
            }
        };
        let include_usage = sampling.stream_options.is_some_and(|options| options.include_usage);
        return Ok(stream_body(answer, first, stream, include_usage).into_response());
    }
    let mut text = String::new();
    while let Some(event) = stream.next().await {
        match event? {
            Event::Token { text: delta, .. } | Event::Text(delta) => text.push_str(&delta),
            Event::Started { .. } => {}
            Event::Finished(usage) => return Ok(Json(answer.whole(&text, &usage)).into_response()),
        }
    }
    Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "the generation ended without a result", "aborted"))
}

/// What every chunk of one answer repeats.
struct Answer {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: u32,
}

/// A seed no other request had.
fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    hasher.finish()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs())
}

fn answer_id(kind: Kind) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let number = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let prefix = if kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    format!("{prefix}-usine-{:x}-{number}", now())
}

fn finish_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::EndOfSequence => "stop",
        FinishReason::Cancelled => "stop", // not an OpenAI reason; a cancelled answer has no reader anyway
    }
}

impl Answer {
    fn usage(&self, usage: &Usage) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": usage.generated_tokens,
            "total_tokens": self.prompt_tokens + usage.generated_tokens,
        })
    }

    /// The whole answer, for `stream: false`.
    fn whole(&self, text: &str, usage: &Usage) -> Value {
        let finish = finish_reason(usage.finish);
        let choice = match self.kind {
            Kind::Completion => json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }),
            Kind::Chat => json!({
                "index": 0, "message": { "role": "assistant", "content": text }, "logprobs": null, "finish_reason": finish,
            }),
        };
        json!({
            "id": self.id, "object": self.object(false), "created": self.created, "model": self.model,
            "choices": [choice], "usage": self.usage(usage),
        })
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    /// One chunk of a stream: a piece of text, or the end (`finish`).
    fn chunk(&self, text: Option<&str>, finish: Option<&str>, first: bool) -> Value {
        let choice = match self.kind {
            Kind::Completion => {
                json!({ "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish })
            }
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(text) = text {
                    delta.insert("content".into(), text.into());
                }
                json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish })
            }
        };
        json!({ "id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice] })
    }
}

/// The answer as server-sent events: a chunk per piece of text, a last chunk with the finish reason
/// (and, when asked, one with the usage), then `[DONE]`. A failure after the start becomes an `error`
/// event. When the client goes away, the body is dropped, and with it the generation.
fn stream_body(answer: Answer, first: Event, stream: GenerationStream, include_usage: bool) -> impl IntoResponse {
    struct Progress {
        answer: Answer,
        stream: GenerationStream,
        /// The event read before the answer was committed, handled first.
        held: Option<Event>,
        first: bool,
        pending: std::collections::VecDeque<String>,
        done: bool,
        include_usage: bool,
    }
    let start = Progress {
        answer,
        stream,
        held: Some(first),
        first: true,
        pending: std::collections::VecDeque::new(),
        done: false,
        include_usage,
    };
    let events = futures_util::stream::unfold(start, |mut progress| async move {
        loop {
            if let Some(data) = progress.pending.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), progress));
            }
            if progress.done {
                return None;
            }
            let event = match progress.held.take() {
                Some(event) => Some(Ok(event)),
                None => progress.stream.next().await,
            };
            match event {
                Some(Ok(Event::Token { text, .. } | Event::Text(text))) => {
                    if !text.is_empty() || (progress.first && progress.answer.kind == Kind::Chat) {
                        let chunk = progress.answer.chunk(Some(&text), None, progress.first);
                        progress.first = false;
                        progress.pending.push_back(chunk.to_string());
                    }
                }
                Some(Ok(Event::Started { .. })) => {}
                Some(Ok(Event::Finished(usage))) => {
                    let last = progress.answer.chunk(None, Some(finish_reason(usage.finish)), progress.first);
                    progress.pending.push_back(last.to_string());
                    if progress.include_usage {
                        let answer = &progress.answer;
                        let usage = json!({
                            "id": answer.id, "object": answer.object(true), "created": answer.created,
                            "model": answer.model, "choices": [], "usage": answer.usage(&usage),
                        });
                        progress.pending.push_back(usage.to_string());
                    }
                    progress.pending.push_back("[DONE]".to_owned());
                    progress.done = true;
                }
                Some(Err(error)) => {
                    progress.pending.push_back(ApiError::from(error).body().to_string());
                    progress.done = true;
                }
                None => progress.done = true,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// `GET /v1/models`.
pub(crate) async fn models(State(state): State<AppState>) -> Json<Value> {
    let created = now();
    let data: Vec<Value> = state
        .app
        .catalog
        .models
        .iter()
        .map(|model| json!({ "id": model.id, "object": "model", "created": created, "owned_by": "usine" }))
        .collect();
    Json(json!({ "object": "list", "data": data }))
}
