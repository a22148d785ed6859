//! The OpenAI-compatible endpoints: completions and chat completions (one JSON body, or server-sent
//! events ending with `[DONE]`), and the list of models.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt as _};
use serde::Deserialize;
use serde_json::{Value, json};
use usine_engine::{FinishReason, GenerationParams};
use usine_executor::{Event, ExecutorError, GenerationStream, Message, Request, Role, Usage};

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

/// The most generation events (tokens, or text held back to the end) that one server-sent event carries.
/// A reader that keeps up gets an event per token; one that falls behind gets the tokens already waiting
/// for it in one event, their texts joined, as OpenAI's clients join chunks anyway. The executor's
/// channel holds 16 events by default, so today a reader's whole backlog fits in one event; the bound
/// keeps an event small (64 tokens' text) were the channel larger.
const MAX_TOKENS_PER_EVENT: usize = 64;

/// The answer as server-sent events: a chunk per piece of text, a last chunk with the finish reason
/// (and, when asked, one with the usage), then `[DONE]`. A failure after the start becomes an `error`
/// event. When the client goes away, the body is dropped, and with it the generation.
fn stream_body(answer: Answer, first: Event, stream: GenerationStream, include_usage: bool) -> impl IntoResponse {
    let events = Chunks::new(answer, first, stream, include_usage)
        .map(|data| Ok::<_, Infallible>(SseEvent::default().data(data)));
    Sse::new(events).keep_alive(KeepAlive::default())
}

/// The `data` of an answer's server-sent events, read from the generation's events. Each poll takes every
/// token already waiting (at most [`MAX_TOKENS_PER_EVENT`]) without waiting for more, and makes them one
/// chunk: a reader that falls behind catches up in fewer, larger events, and one that keeps up gets each
/// token as soon as it comes. The end (finish, usage, `[DONE]`) or an error follows the text taken before
/// it, in the generation's order. A chunk carries no per-token field (`logprobs` is always null).
struct Chunks<S> {
    answer: Answer,
    events: S,
    /// The event read before the answer was committed, handled first.
    held: Option<Event>,
    /// No chunk sent yet (a chat's first chunk names the role).
    first: bool,
    /// Data made and not yet sent, in order.
    pending: VecDeque<String>,
    /// The generation's last event was read: what remains is `pending`.
    done: bool,
    include_usage: bool,
}

impl<S> Chunks<S> {
    fn new(answer: Answer, first: Event, events: S, include_usage: bool) -> Self {
        Self { answer, events, held: Some(first), first: true, pending: VecDeque::new(), done: false, include_usage }
    }

    /// A chunk of the text of the tokens taken together, unless it is empty (a chat's first chunk is sent
    /// even so, for the role).
    fn text(&mut self, text: &str) {
        if !text.is_empty() || (self.first && self.answer.kind == Kind::Chat) {
            let chunk = self.answer.chunk(Some(text), None, self.first);
            self.first = false;
            self.pending.push_back(chunk.to_string());
        }
    }

    /// The generation's last event, or its end without one (`None`).
    fn end(&mut self, end: Option<Result<Event, ExecutorError>>) {
        self.done = true;
        match end {
            Some(Ok(Event::Finished(usage))) => {
                let last = self.answer.chunk(None, Some(finish_reason(usage.finish)), self.first);
                self.pending.push_back(last.to_string());
                if self.include_usage {
                    let answer = &self.answer;
                    let usage = json!({
                        "id": answer.id, "object": answer.object(true), "created": answer.created,
                        "model": answer.model, "choices": [], "usage": answer.usage(&usage),
                    });
                    self.pending.push_back(usage.to_string());
                }
                self.pending.push_back("[DONE]".to_owned());
            }
            Some(Err(error)) => self.pending.push_back(ApiError::from(error).body().to_string()),
            // Tokens and `Started` are taken before `end` is called. A stream that ends without its last
            // event ends the body as it is (the executor's stream reports that end as an error first).
            Some(Ok(Event::Token { .. } | Event::Text(_) | Event::Started { .. })) | None => {}
        }
    }
}

impl<S> Stream for Chunks<S>
where
    S: Stream<Item = Result<Event, ExecutorError>> + Unpin,
{
    type Item = String;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<String>> {
        let this = self.get_mut();
        loop {
            if let Some(data) = this.pending.pop_front() {
                return Poll::Ready(Some(data));
            }
            if this.done {
                return Poll::Ready(None);
            }
            // Every token ready now, and the event that ends the batch if it is the last.
            let mut text: Option<String> = None;
            let mut taken = 0;
            let mut end = None;
            let mut waiting = false;
            while taken < MAX_TOKENS_PER_EVENT {
                let event = match this.held.take() {
                    Some(event) => Some(Ok(event)),
                    None => match this.events.poll_next_unpin(cx) {
                        Poll::Ready(event) => event,
                        Poll::Pending => {
                            waiting = true; // the waker is registered: a token to come wakes the body
                            break;
                        }
                    },
                };
                match event {
                    Some(Ok(Event::Token { text: piece, .. } | Event::Text(piece))) => {
                        match &mut text {
                            None => text = Some(piece),
                            Some(text) => text.push_str(&piece),
                        }
                        taken += 1;
                    }
                    Some(Ok(Event::Started { .. })) => {}
                    last => {
                        end = Some(last);
                        break;
                    }
                }
            }
            if let Some(text) = text {
                this.text(&text);
            }
            if let Some(end) = end {
                this.end(end);
            }
            if waiting && this.pending.is_empty() {
                return Poll::Pending;
            }
        }
    }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is a test failure with its message")]

    use std::time::Duration;

    use futures_util::FutureExt as _;

    use super::*;

    fn answer(kind: Kind) -> Answer {
        Answer { id: "cmpl-test".into(), created: 0, model: "zero/default".into(), kind, prompt_tokens: 2 }
    }

    fn token(index: u32, text: &str) -> Event {
        Event::Token { index, id: 0, text: text.into() }
    }

    fn finished(generated_tokens: u32) -> Event {
        Event::Finished(Usage {
            finish: FinishReason::Length,
            prompt_tokens: 2,
            cached_tokens: 0,
            generated_tokens,
            time_to_first_token: Duration::ZERO,
            tokens_per_second: 0.0,
            queued: Duration::ZERO,
            total: Duration::ZERO,
            retries: 0,
            pipeline_idle: Duration::ZERO,
        })
    }

    /// The data of every event of an answer whose generation's events (after the first) are all ready at
    /// once, as for a reader that fell far behind.
    fn all_ready(kind: Kind, first: Event, rest: Vec<Result<Event, ExecutorError>>) -> Vec<Value> {
        let chunks = Chunks::new(answer(kind), first, futures_util::stream::iter(rest), true);
        let data = chunks.collect::<Vec<String>>().now_or_never().expect("every event is ready");
        data.iter().map(|data| serde_json::from_str(data).unwrap_or_else(|_| json!(data))).collect()
    }

    // Would catch: a backlog sent in one event of any size (no bound), a bound off by one, or text lost or
    // reordered at a batch's edge.
    #[test]
    fn a_backlog_is_sent_in_events_of_at_most_64_tokens_in_order() {
        let texts: Vec<String> = (0..150).map(|i| format!("{i} ")).collect();
        let rest = (1..150).map(|i| Ok(token(i, &texts[i as usize]))).chain([Ok(finished(150))]).collect();
        let data = all_ready(Kind::Completion, token(0, &texts[0]), rest);
        let pieces: Vec<&str> = data[..3].iter().map(|chunk| chunk["choices"][0]["text"].as_str().unwrap()).collect();
        assert_eq!(pieces, [texts[..64].concat(), texts[64..128].concat(), texts[128..].concat()]);
        assert!(data[..3].iter().all(|chunk| chunk["choices"][0]["finish_reason"].is_null()));
        assert_eq!(
            data[3]["choices"][0],
            json!({ "index": 0, "text": "", "logprobs": null, "finish_reason": "length" })
        );
        assert_eq!(data[4]["usage"]["completion_tokens"], 150);
        assert_eq!(data[5], "[DONE]");
        assert_eq!(data.len(), 6);
    }

    // Would catch: an error that waited behind tokens sent before their text, or their text dropped.
    #[test]
    fn an_error_behind_waiting_tokens_comes_after_their_text() {
        let rest = vec![Ok(token(1, "b")), Ok(Event::Text("c".into())), Err(ExecutorError::Aborted)];
        let data = all_ready(Kind::Chat, token(0, "a"), rest);
        assert_eq!(data.len(), 2, "{data:?}");
        assert_eq!(data[0]["choices"][0]["delta"], json!({ "role": "assistant", "content": "abc" }));
        assert_eq!(data[1], ApiError::from(ExecutorError::Aborted).body());
    }
}
