//! The router, in process: answers in the OpenAI shapes, streamed to a reader that keeps up and to one
//! that falls behind, the statuses of every error, auth, health and the warm-up at start, lifecycle, and
//! a dropped stream's memory coming back.

#![allow(clippy::unwrap_used, reason = "a panic is a test failure with its message")]

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use futures_util::FutureExt as _;
use http_body_util::BodyExt as _;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use super::{Shared, router, start_warmup};
use crate::app::App;
use crate::config::{Flags, load};

struct Server {
    _dir: tempfile::TempDir,
    state: super::AppState,
}

fn server(settings: &[(&str, Value)]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut flags = Flags::default();
    flags.set("cache_dir", Some(dir.path().to_owned()));
    for (key, value) in settings {
        flags.set(key, Some(value.clone()));
    }
    let loaded = load(&[], flags).unwrap();
    let app = App::build(&loaded).unwrap();
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
    Server { _dir: dir, state: Arc::new(Shared::new(app, loaded, metrics)) }
}

impl Server {
    async fn send(&self, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
        let response = router(Arc::clone(&self.state)).oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, String::from_utf8(bytes.to_vec()).unwrap())
    }

    async fn post(&self, path: &str, body: impl Into<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
        let request = Request::post(path).header(header::CONTENT_TYPE, "application/json").body(body.into()).unwrap();
        self.send(request).await
    }

    async fn post_json(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let (status, _, text) = self.post(path, body.to_string()).await;
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let (status, _, text) = self.send(Request::get(path).body(Body::empty()).unwrap()).await;
        (status, text)
    }

    fn kv_used(&self) -> u64 {
        self.state.app.memory.pool_stats(usine_memory::KV_CACHE).unwrap().used
    }
}

/// The `data:` payloads of a server-sent event stream.
fn sse_data(text: &str) -> Vec<String> {
    text.lines().filter_map(|line| line.strip_prefix("data: ")).map(str::to_owned).collect()
}

#[tokio::test]
async fn a_completion_answers_in_the_openai_shape() {
    let s = server(&[]);
    let (status, body) = s
        .post_json("/v1/completions", &json!({ "model": "zero/default", "prompt": "Hi", "max_tokens": 8, "seed": 0 }))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["model"], "zero/default");
    assert_eq!(body["choices"][0]["text"], "the zero");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"], json!({ "prompt_tokens": 2, "completion_tokens": 8, "total_tokens": 10 }));
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
}

#[tokio::test]
async fn a_streamed_completion_sends_the_same_text_in_chunks_then_done() {
    let s = server(&[]);
    let request = json!({ "model": "zero/default", "prompt": "Hi", "max_tokens": 8, "seed": 0, "stream": true,
                          "stream_options": { "include_usage": true } });
    let (status, headers, text) = s.post("/v1/completions", request.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"].get(0)).map(|c| c["text"].as_str().unwrap()).collect();
    assert_eq!(streamed, "the zero");
    let finish = chunks.iter().filter_map(|c| c["choices"].get(0)).find(|c| !c["finish_reason"].is_null()).unwrap();
    assert_eq!(finish["finish_reason"], "length");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 8);
}

#[tokio::test]
async fn a_chat_completion_answers_as_the_assistant_streamed_or_not() {
    let s = server(&[]);
    let messages = json!([{ "role": "system", "content": "Be brief." }, { "role": "user", "content": "Hi" }]);
    let (status, body) = s
        .post_json(
            "/v1/chat/completions",
            &json!({ "model": "zero/default", "messages": messages, "max_tokens": 3, "seed": 0 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"], json!({ "role": "assistant", "content": "the" }));

    let request = json!({ "model": "zero/default", "messages": messages, "max_tokens": 3, "seed": 0, "stream": true });
    let (_, _, text) = s.post("/v1/chat/completions", request.to_string()).await;
    let data = sse_data(&text);
    let first: Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let content: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(content, "the");
}

#[tokio::test]
async fn every_bad_request_gets_its_status_and_an_openai_error() {
    let s = server(&[("max_body_bytes", json!(4096)), ("max_prompt_bytes", json!(1000))]);
    let cases = [
        ("{\"model\": ", StatusCode::BAD_REQUEST, "malformed_request"),
        ("{\"model\": \"zero/default\"}", StatusCode::BAD_REQUEST, "malformed_request"),
        ("{\"model\": \"../../etc/passwd\", \"prompt\": \"Hi\"}", StatusCode::NOT_FOUND, "model_not_found"),
        (
            "{\"model\": \"zero/default\", \"prompt\": \"Hi\", \"max_tokens\": 100000}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_parameter",
        ),
        (
            "{\"model\": \"zero/default\", \"prompt\": \"Hi\", \"temperature\": 5}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_parameter",
        ),
        (
            "{\"model\": \"zero/default\", \"prompt\": \"Hi\", \"max_tokens\": -1}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_parameter",
        ),
        (
            "{\"model\": \"zero/default\", \"prompt\": \"Hi\", \"seed\": -1}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_parameter",
        ),
        (
            "{\"model\": \"zero/default\", \"prompt\": \"Hi\", \"max_tokens\": \"many\"}",
            StatusCode::BAD_REQUEST,
            "malformed_request",
        ),
        (
            "{\"model\": \"zero/default\", \"prompt\": \"Hi\", \"n\": 3}",
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_parameter",
        ),
    ];
    for (body, status, code) in cases {
        let (got, _, text) = s.post("/v1/completions", body).await;
        let error: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!((got, error["error"]["code"].as_str().unwrap()), (status, code), "{body}: {text}");
        assert!(error["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (_, _, text) =
        s.post("/v1/completions", "{\"model\": \"zero/default\", \"prompt\": \"Hi\", \"max_tokens\": 100000}").await;
    assert!(text.contains("`max_tokens` is 100000, outside 1..=4096 (the limit)"), "{text}");

    let long_prompt = json!({ "model": "zero/default", "prompt": "x".repeat(2000) });
    let (status, body) = s.post_json("/v1/completions", &long_prompt).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(body["error"]["message"].as_str().unwrap().contains("more than the limit of 1000 bytes"));

    let huge = json!({ "model": "zero/default", "prompt": "x".repeat(10_000) });
    let (status, body) = s.post_json("/v1/completions", &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"]["message"], "the body is larger than the limit of 4096 bytes");

    let (status, body) = s.post_json("/v1/chat/completions", &json!({ "model": "zero/default", "messages": [] })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, text) = s.get("/nowhere").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(text.contains("\"code\":\"not_found\""), "{text}");
    let (status, text) = s.get("/v1/completions").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(text.contains("\"code\":\"method_not_allowed\""), "{text}");
    let (status, text) = s.get("/usine/models/progress").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("\"code\":\"malformed_request\""), "{text}");
    let long_id = "x".repeat(3000); // within the body limit of this server
    let (status, body) = s.post_json("/v1/completions", &json!({ "model": long_id, "prompt": "Hi" })).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"]["message"].as_str().unwrap().len() < 400, "the id is not echoed whole");
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let s = server(&[("max_concurrent", json!(1)), ("queue_capacity", json!(0))]);
    // A stream of 2,000 greedy tokens of the tiny model holds the only slot for four seconds.
    let long = json!({ "model": "webllm/tiny", "prompt": "Hi", "max_tokens": 2000, "temperature": 0, "stream": true });
    let request = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(long.to_string()))
        .unwrap();
    let response = router(Arc::clone(&s.state)).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (status, headers, text) =
        s.post("/v1/completions", json!({ "model": "zero/default", "prompt": "Hi" }).to_string()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{text}");
    assert_eq!(headers[header::RETRY_AFTER], "1");
    assert!(text.contains("\"type\":\"rate_limit_error\""));

    // The client goes away: the generation stops at its next token and its kv-cache returns. The deadline
    // is under the four seconds the stream had left, and a stream that ran out is counted as completed.
    assert!(s.kv_used() > 0);
    drop(response);
    let deadline = Instant::now() + Duration::from_secs(3);
    while s.kv_used() > 0 || s.state.app.executor.stats().cancelled == 0 {
        assert!(Instant::now() < deadline, "kv-cache {} bytes, stats {:?}", s.kv_used(), s.state.app.executor.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stats = s.state.app.executor.stats();
    assert_eq!((stats.cancelled, stats.completed), (1, 0), "{stats:?}");
}

#[tokio::test]
async fn off_loopback_every_endpoint_but_health_and_metrics_demands_the_key() {
    let key = "0123456789abcdef0123";
    let s = server(&[("api_key", json!(key))]);
    let (status, text) = s.get("/v1/models").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{text}");
    assert!(text.contains("invalid_api_key"));
    let request =
        Request::get("/v1/models").header(header::AUTHORIZATION, format!("Bearer {key}")).body(Body::empty()).unwrap();
    assert_eq!(s.send(request).await.0, StatusCode::OK);
    let request =
        Request::get("/v1/models").header(header::AUTHORIZATION, format!("bearer {key}")).body(Body::empty()).unwrap();
    assert_eq!(s.send(request).await.0, StatusCode::OK, "the scheme is case-insensitive");
    let (status, headers, _) = s.send(Request::get("/usine/pools").body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
    let request = Request::get("/v1/models").header(header::AUTHORIZATION, "Bearer wrong").body(Body::empty()).unwrap();
    assert_eq!(s.send(request).await.0, StatusCode::UNAUTHORIZED);
    assert_eq!(s.get("/health").await.0, StatusCode::OK);
    assert_eq!(s.get("/metrics").await.0, StatusCode::OK);

    let s = server(&[("api_key", json!(key)), ("metrics_need_key", json!(true))]);
    assert_eq!(s.get("/metrics").await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn health_says_why_it_is_not_ready_and_generations_wait_for_it() {
    let s = server(&[]);
    assert_eq!(s.get("/health").await, (StatusCode::OK, "{\"status\":\"ready\"}".to_owned()));
    *s.state.not_ready.lock() = Some("warming up webllm/7b".into());
    let (status, text) = s.get("/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(text.contains("warming up webllm/7b"));
    let (status, _) = s.post_json("/v1/completions", &json!({ "model": "zero/default", "prompt": "Hi" })).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

/// `/health` answered at once: before any other task, the warm-up's included, can run on this thread.
fn health_now(s: &Server) -> (StatusCode, Value) {
    let request = Request::get("/health").body(Body::empty()).unwrap();
    let response = router(Arc::clone(&s.state)).oneshot(request).now_or_never().expect("answered at once").unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().now_or_never().expect("a body in one piece").unwrap().to_bytes();
    (parts.status, serde_json::from_slice(&bytes).unwrap())
}

// Would catch: a warm-up that does not hold `/health` at 503 while it runs, that does not clear it when
// done, or that does not load the model.
#[tokio::test]
async fn with_wait_for_warmup_health_is_503_until_the_warm_up_is_done() {
    let s = server(&[("warmup", json!(["webllm/tiny"])), ("wait_for_warmup", json!(true))]);
    let warming = start_warmup(&s.state).expect("a warm-up to run");
    let (status, body) = health_now(&s);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body, json!({ "status": "not_ready", "reason": "not ready: warming up webllm/tiny" }));
    let (status, body) = s.post_json("/v1/completions", &json!({ "model": "zero/default", "prompt": "Hi" })).await;
    assert_eq!((status, body["error"]["code"].as_str().unwrap()), (StatusCode::SERVICE_UNAVAILABLE, "not_ready"));

    warming.await.unwrap();
    assert_eq!(s.get("/health").await, (StatusCode::OK, "{\"status\":\"ready\"}".to_owned()));
    let loaded: Vec<String> = s.state.app.kernel.loaded().iter().map(|model| model.id.clone()).collect();
    assert_eq!(loaded, ["webllm/tiny"], "the warm-up loaded the model");
}

// Would catch: a failed warm-up reported ready, or a 503 without its reason.
#[tokio::test]
async fn a_failed_warm_up_keeps_health_at_503_and_says_why() {
    // One MiB of weights cannot hold the tiny model: its load fails after the compile.
    let s = server(&[
        ("warmup", json!(["webllm/tiny"])),
        ("wait_for_warmup", json!(true)),
        ("weights_budget_mib", json!(1)),
    ]);
    start_warmup(&s.state).expect("a warm-up to run").await.unwrap();
    let (status, text) = s.get("/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["status"], "not_ready");
    let reason = body["reason"].as_str().unwrap();
    let expected = "not ready: warm-up of webllm/tiny failed: model `webllm/tiny` needs 5625000 bytes of weights, \
                    more than the whole pool (1048576 bytes)";
    assert_eq!(reason, expected);
    let (status, body) = s.post_json("/v1/completions", &json!({ "model": "zero/default", "prompt": "Hi" })).await;
    assert_eq!((status, body["error"]["code"].as_str().unwrap()), (StatusCode::SERVICE_UNAVAILABLE, "not_ready"));
}

// Would catch: the server held not ready by a warm-up nobody asked it to wait for.
#[tokio::test]
async fn without_wait_for_warmup_the_server_is_ready_during_the_warm_up() {
    let s = server(&[("warmup", json!(["webllm/tiny"]))]);
    let warming = start_warmup(&s.state).expect("a warm-up to run");
    assert_eq!(health_now(&s), (StatusCode::OK, json!({ "status": "ready" })));
    warming.await.unwrap();
    assert_eq!(s.get("/health").await.0, StatusCode::OK);
    assert_eq!(s.state.app.kernel.loaded().len(), 1, "the warm-up ran");
}

#[tokio::test]
async fn models_are_listed_loaded_pinned_and_unloaded() {
    let s = server(&[]);
    let (_, text) = s.get("/v1/models").await;
    let models: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(models["object"], "list");
    assert!(models["data"].as_array().unwrap().iter().any(|m| m["id"] == "webllm/7b" && m["object"] == "model"));

    let (status, body) =
        s.post_json("/usine/models/load", &json!({ "model": "webllm/tiny", "keep_alive_seconds": -1 })).await;
    assert_eq!((status, body["source"].as_str().unwrap()), (StatusCode::OK, "compile"), "{body}");
    assert_eq!(s.post_json("/usine/models/pin", &json!({ "model": "webllm/tiny" })).await.0, StatusCode::OK);
    let (_, text) = s.get("/usine/models/loaded").await;
    let loaded: Value = serde_json::from_str(&text).unwrap();
    let tiny = &loaded["models"][0];
    assert_eq!((tiny["model"].as_str().unwrap(), tiny["pinned"].as_bool().unwrap()), ("webllm/tiny", true));
    assert!(tiny["weights_bytes"].as_u64().unwrap() > 0);
    assert_eq!(s.post_json("/usine/models/unpin", &json!({ "model": "webllm/tiny" })).await.0, StatusCode::OK);
    let (_, body) = s.post_json("/usine/models/unload", &json!({ "model": "webllm/tiny" })).await;
    assert_eq!(body["unloaded"], true);
    let (status, _) = s.post_json("/usine/models/load", &json!({ "model": "nope" })).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) =
        s.post_json("/usine/models/load", &json!({ "model": "webllm/tiny", "keep_alive_seconds": -5 })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn a_compile_streams_its_progress() {
    let s = server(&[]);
    // The load starts first (a stream of progress ends at once when no load runs).
    let kernel = s.state.app.kernel.clone();
    let load = tokio::spawn(async move { kernel.load_model("webllm/tiny").await.map(drop) });
    while !s.state.app.kernel.is_loading("webllm/tiny") {
        tokio::task::yield_now().await;
    }
    let progress = router(Arc::clone(&s.state))
        .oneshot(Request::get("/usine/models/progress?model=webllm/tiny").body(Body::empty()).unwrap())
        .await;
    load.await.unwrap().unwrap();
    let text = progress.unwrap().into_body().collect().await.unwrap().to_bytes();
    let stages: Vec<Value> =
        sse_data(std::str::from_utf8(&text).unwrap()).iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert!(!stages.is_empty(), "the compile reported progress");
    assert_eq!(stages.last().unwrap()["fraction"], 1.0);
}

#[tokio::test]
async fn progress_of_a_model_nobody_loads_ends_at_once() {
    let s = server(&[]);
    let (status, text) = s.get("/usine/models/progress?model=webllm/tiny").await;
    assert_eq!((status, text.as_str()), (StatusCode::OK, ""));
}

/// A request with `headers`.
fn with_headers(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Request<Body> {
    let mut request = Request::builder().method(method).uri(path).header(header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Body::from(body.to_owned())).unwrap()
}

// Would catch: a page on another host driving the server through DNS rebinding (`Host: evil.example`)
// or from its own origin, while the server has no key.
#[tokio::test]
async fn without_a_key_a_foreign_host_or_origin_is_refused_with_403() {
    let s = server(&[]);
    let load = r#"{"model": "webllm/tiny"}"#;
    for (headers, code) in [
        (&[("host", "evil.example")][..], "forbidden_host"),
        (&[("host", "evil.example:8080")][..], "forbidden_host"),
        (&[("host", "localhost:8080"), ("origin", "http://evil.example")][..], "forbidden_origin"),
        (&[("host", "127.0.0.1:8080"), ("origin", "null")][..], "forbidden_origin"),
    ] {
        let (status, _, text) = s.send(with_headers("POST", "/usine/models/load", headers, load)).await;
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!((status, body["error"]["code"].as_str().unwrap()), (StatusCode::FORBIDDEN, code), "{headers:?}");
    }
    let (_, _, text) = s.send(with_headers("GET", "/v1/models", &[("host", "evil.example")], "")).await;
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        body["error"]["message"],
        "host `evil.example` is not loopback: without an API key this server answers only localhost, 127.0.0.1 \
         and [::1] (set `api_key` to serve other names)"
    );
    assert!(s.state.app.kernel.loaded().is_empty(), "no refused load ran");
    for headers in [
        &[("host", "localhost:8080"), ("origin", "http://localhost:3000")][..],
        &[("host", "127.0.0.1:8080")][..],
        &[("host", "[::1]:8080")][..],
    ] {
        let (status, _, text) = s.send(with_headers("GET", "/v1/models", headers, "")).await;
        assert_eq!(status, StatusCode::OK, "{headers:?}: {text}");
    }

    // With a key, the key is the guard: any host that brings it is served.
    let key = "0123456789abcdef0123";
    let s = server(&[("api_key", json!(key))]);
    let bearer = format!("Bearer {key}");
    let headers = [("host", "usine.example"), ("origin", "https://app.example"), ("authorization", bearer.as_str())];
    assert_eq!(s.send(with_headers("GET", "/v1/models", &headers, "")).await.0, StatusCode::OK);
}

// Would catch: an admin error echoing a client's model id whole (300 KiB back for 300 KiB sent).
#[tokio::test]
async fn admin_errors_show_at_most_64_characters_of_an_unknown_id() {
    let s = server(&[]);
    let long_id = format!("{}{}", "a".repeat(64), "b".repeat(300 << 10));
    let expected = format!(
        "unknown model `{}` (known: {})",
        "a".repeat(64),
        s.state.app.catalog.models.iter().map(|m| m.id.as_str()).collect::<Vec<_>>().join(", ")
    );
    for endpoint in ["load", "unload", "pin", "unpin"] {
        let (status, body) = s.post_json(&format!("/usine/models/{endpoint}"), &json!({ "model": long_id })).await;
        assert_eq!((status, body["error"]["message"].as_str().unwrap()), (StatusCode::NOT_FOUND, expected.as_str()));
    }
    let (status, body) = s.post_json("/usine/warmup", &json!({ "models": ["webllm/tiny", long_id] })).await;
    assert_eq!((status, body["error"]["message"].as_str().unwrap()), (StatusCode::NOT_FOUND, expected.as_str()));
    let (status, text) = s.get(&format!("/usine/models/progress?model={}", "c".repeat(10_000))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(text.contains(&format!("unknown model `{}` (known:", "c".repeat(64))) && text.len() < 1000, "{text}");
}

// Would catch: a client's error (a prompt over the context, 422) counted as the server's failure.
#[tokio::test]
async fn a_request_over_the_context_is_422_and_counted_invalid_not_failed() {
    let s = server(&[]);
    let request = json!({ "model": "webllm/tiny", "prompt": "Hi", "max_tokens": 4096 }); // the context is 2,048
    let (status, body) = s.post_json("/v1/completions", &request).await;
    assert_eq!(
        (status, body["error"]["code"].as_str().unwrap()),
        (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request")
    );
    let stats = s.state.app.executor.stats();
    assert_eq!((stats.invalid, stats.failed), (1, 0), "{stats:?}");
}

// Would catch: a stream whose client stops reading holding its slot and kv-cache for ever (the issue:
// four such clients took every slot and a 3-token request waited 60 s for a 504).
#[tokio::test]
async fn a_stalled_reader_is_cut_at_reader_timeout_ms_and_the_next_request_is_served() {
    let s = server(&[("reader_timeout_ms", json!(1000)), ("max_concurrent", json!(1))]);
    let _model = s.state.app.kernel.load_model("zero/default").await.unwrap(); // files written in real time
    tokio::time::pause();
    let start = tokio::time::Instant::now();
    let long = json!({ "model": "zero/default", "prompt": "Hi", "max_tokens": 2000, "stream": true });
    let request = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(long.to_string()))
        .unwrap();
    let stalled = router(Arc::clone(&s.state)).oneshot(request).await.unwrap(); // its body is never read
    assert_eq!(stalled.status(), StatusCode::OK);
    let (status, body) =
        s.post_json("/v1/completions", &json!({ "model": "zero/default", "prompt": "Hi", "max_tokens": 3 })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The slot came free at the reader's limit: paused here after a real-time load, the clock is off the
    // timer's millisecond grid, and a timer fires on the grid's next tick.
    let elapsed = start.elapsed();
    assert!((Duration::from_millis(1000)..=Duration::from_millis(1001)).contains(&elapsed), "{elapsed:?}");
    let stats = s.state.app.executor.stats();
    assert_eq!((stats.timeouts_by_phase[4], stats.completed, s.kv_used()), (1, 1, 0), "{stats:?}");

    // What the reader finds when it comes back: the tokens buffered, then why it was cut.
    let text = stalled.into_body().collect().await.unwrap().to_bytes();
    let data = sse_data(std::str::from_utf8(&text).unwrap());
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["message"], "wait for the reader exceeded its limit of 1s");
}

/// A streamed answer read event by event: each event's data (`[DONE]` as a string) and when it came,
/// from the request's start. The reader starts reading `behind` after the answer's head came.
async fn read_stream(s: &Server, path: &str, request: &Value, behind: Duration) -> Vec<(Duration, Value)> {
    let start = tokio::time::Instant::now();
    let request = Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(request.to_string()))
        .unwrap();
    let response = router(Arc::clone(&s.state)).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    if !behind.is_zero() {
        tokio::time::sleep(behind).await;
    }
    let mut body = response.into_body();
    let mut events = Vec::new();
    while let Some(frame) = body.frame().await {
        let at = start.elapsed();
        let Ok(bytes) = frame.unwrap().into_data() else { continue };
        for data in sse_data(std::str::from_utf8(&bytes).unwrap()) {
            events.push((at, serde_json::from_str(&data).unwrap_or(Value::String(data))));
        }
    }
    events
}

/// The text a chunk adds (a completion's `text`, a chat's `delta.content`); `None` for the chunk with
/// the finish reason, the usage and `[DONE]`.
fn chunk_text(chunk: &Value) -> Option<&str> {
    let choice = chunk["choices"].get(0).filter(|choice| choice["finish_reason"].is_null())?;
    choice["text"].as_str().or_else(|| choice["delta"]["content"].as_str())
}

/// A chunk without what differs between two answers to the same request (`id`, `created`).
fn without_id(mut chunk: Value) -> Value {
    if let Some(fields) = chunk.as_object_mut() {
        fields.remove("id");
        fields.remove("created");
    }
    chunk
}

/// A streamed request of 12 tokens from the tiny simulated model, with its usage at the end.
fn twelve_tokens(path: &str) -> Value {
    let mut request = json!({ "model": "webllm/tiny", "max_tokens": 12, "seed": 7, "stream": true,
                              "stream_options": { "include_usage": true } });
    if path == "/v1/chat/completions" {
        request["messages"] = json!([{ "role": "user", "content": "Hi" }]);
    } else {
        request["prompt"] = json!("Hi");
    }
    request
}

// Would catch: a reader that fell behind still sent an event per token, text lost, doubled or reordered
// when tokens are joined, a chat's role missing from the joined chunk, or the end (finish reason, usage,
// `[DONE]`) changed by the joining.
#[tokio::test(start_paused = true)]
async fn a_reader_that_falls_behind_gets_the_waiting_tokens_in_one_event_with_the_same_text_and_end() {
    let s = server(&[("jitter", json!(0))]);
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let request = twelve_tokens(path);
        let prompt = read_stream(&s, path, &request, Duration::ZERO).await;
        // A second behind: the 12 tokens and the end wait in the generation's channel (16 places).
        let behind = read_stream(&s, path, &request, Duration::from_secs(1)).await;

        let texts = |events: &[(Duration, Value)]| -> Vec<String> {
            events.iter().filter_map(|(_, chunk)| chunk_text(chunk).map(str::to_owned)).collect()
        };
        let (prompt_texts, behind_texts) = (texts(&prompt), texts(&behind));
        assert_eq!(prompt_texts.len(), 12, "{path}: one event per token for a reader that keeps up");
        assert_eq!(behind_texts, [prompt_texts.concat()], "{path}: one event with the same text");
        let ends = |events: &[(Duration, Value)]| -> Vec<Value> {
            events.iter().filter(|(_, chunk)| chunk_text(chunk).is_none()).map(|(_, c)| without_id(c.clone())).collect()
        };
        let end = ends(&behind);
        assert_eq!(end, ends(&prompt), "{path}");
        assert_eq!(end.len(), 3, "{path}: the finish, the usage, [DONE]: {end:?}");
        assert_eq!(end[1]["usage"]["completion_tokens"], 12, "{path}");
        assert_eq!(end[2], "[DONE]");
        if path == "/v1/chat/completions" {
            assert_eq!(behind[0].1["choices"][0]["delta"]["role"], "assistant");
        }
    }
}

// Would catch: a reader that keeps up made to wait for a batch to fill (a token held back until the next
// one comes, or a timer), or the end sent before the last token's text.
#[tokio::test(start_paused = true)]
async fn a_reader_that_keeps_up_gets_each_token_in_its_own_event_the_moment_the_executor_sends_it() {
    let s = server(&[("jitter", json!(0))]);
    let request = twelve_tokens("/v1/completions");
    read_stream(&s, "/v1/completions", &request, Duration::ZERO).await; // the model's first use is slower

    // When the executor's own reader gets each token of the same generation, from the request's start.
    let mut params = s.state.loaded.params();
    (params.max_tokens, params.seed) = (12, 7);
    let start = tokio::time::Instant::now();
    let mut stream =
        s.state.app.executor.generate(usine_executor::Request::prompt("webllm/tiny", "Hi").params(params)).unwrap();
    let mut sent = Vec::new();
    while let Some(event) = stream.next().await {
        if let usine_executor::Event::Token { .. } = event.unwrap() {
            sent.push(start.elapsed());
        }
    }
    assert_eq!(sent.len(), 12);

    let events = read_stream(&s, "/v1/completions", &request, Duration::ZERO).await;
    let came: Vec<Duration> =
        events.iter().filter(|(_, chunk)| chunk_text(chunk).is_some()).map(|(at, _)| *at).collect();
    assert_eq!(came, sent, "each token's event comes the moment the executor sends the token");
    assert!(sent.windows(2).all(|pair| pair[1] > pair[0]), "tokens come apart: {sent:?}");
    let (finish, last_token) = (&events[12], sent[11]);
    assert_eq!((finish.0, &finish.1["choices"][0]["finish_reason"]), (last_token, &json!("length")));
}

/// Every access log line of this test process, as JSON, from a subscriber installed once for the whole
/// process: a thread's own (scoped) subscriber raced with the callsite interest that tests on other
/// threads cached (the test failed 3 runs in 4), a process-wide one sees every thread. Each test picks
/// its own requests' lines by their ids.
fn access_log_lines() -> Arc<parking_lot::Mutex<Vec<u8>>> {
    use tracing_subscriber::layer::SubscriberExt as _;

    static LINES: std::sync::OnceLock<Arc<parking_lot::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    Arc::clone(LINES.get_or_init(|| {
        let lines = Arc::new(parking_lot::Mutex::new(Vec::<u8>::new()));
        let writer = {
            let lines = Arc::clone(&lines);
            move || Writer(Arc::clone(&lines))
        };
        let layer = crate::logging::access_layer(true, crate::logging::LogFormat::Json, false, writer);
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
            .expect("no other test of this process sets a global subscriber");
        lines
    }))
}

// Would catch: a request missing from the access log, or a line without its fields.
#[tokio::test]
async fn each_request_is_one_access_log_line_with_its_id_status_and_bytes() {
    let logged = access_log_lines();
    let s = server(&[]);
    let (status, headers, text) = s.send(Request::get("/v1/models?x=1").body(Body::empty()).unwrap()).await;
    let (status_422, headers_422, _) = s
        .post("/v1/completions", json!({ "model": "zero/default", "prompt": "Hi", "max_tokens": 0 }).to_string())
        .await;
    let ids = [&headers, &headers_422].map(|headers| headers["x-request-id"].to_str().unwrap().to_owned());
    let text_logged = String::from_utf8(logged.lock().clone()).unwrap();
    let lines: Vec<Value> = text_logged
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|line| ids.iter().any(|id| line["fields"]["request_id"] == id.as_str()))
        .collect();
    assert_eq!(lines.len(), 2, "{text_logged}");
    let fields = &lines[0]["fields"];
    assert_eq!((lines[0]["target"].as_str().unwrap(), lines[0]["level"].as_str().unwrap()), ("usine::access", "INFO"));
    assert_eq!(fields["request_id"], ids[0].as_str());
    assert_eq!(fields["request_id"].as_str().unwrap().len(), 16);
    let seen = (&fields["method"], &fields["path"], &fields["status"], &fields["bytes"], &fields["complete"]);
    assert_eq!(seen, (&json!("GET"), &json!("/v1/models"), &json!(status.as_u16()), &json!(text.len()), &json!(true)));
    assert!(fields["duration_ms"].as_f64().is_some(), "{fields}");
    assert_eq!(
        (&lines[1]["fields"]["path"], &lines[1]["fields"]["status"], &lines[1]["fields"]["request_id"]),
        (&json!("/v1/completions"), &json!(status_422.as_u16()), &json!(ids[1]))
    );
    assert_eq!(status_422, StatusCode::UNPROCESSABLE_ENTITY);
    assert_ne!(ids[0], ids[1]);
}

/// A log writer into shared bytes.
struct Writer(Arc<parking_lot::Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
