//! `usine serve`: an HTTP API that OpenAI clients speak, model lifecycle endpoints, `/metrics` for
//! Prometheus and `/health`; bearer-token auth off loopback; graceful shutdown on SIGTERM or SIGINT.

mod access_log;
mod admin;
mod conn;
mod error;
mod hosts;
mod openai;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;
use tokio::time::Instant;

pub(crate) use self::access_log::TARGET as ACCESS_LOG_TARGET;
pub(crate) use self::error::ApiError;
use crate::app::App;
use crate::config::Loaded;

/// HTTP requests, by route and status.
const HTTP_REQUESTS_TOTAL: &str = "usine_http_requests_total";
/// HTTP request durations (to the response's head; a stream's body goes on after), by route.
const HTTP_REQUEST_DURATION_SECONDS: &str = "usine_http_request_duration_seconds";

/// Histogram buckets, in seconds: from a millisecond (a step of a small model) to five minutes (a compile).
const BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// What the handlers share.
pub(crate) struct Shared {
    pub(crate) app: App,
    pub(crate) loaded: Loaded,
    metrics: PrometheusHandle,
    /// Why the server is not ready yet (`None`: ready).
    not_ready: Mutex<Option<String>>,
    /// SIGTERM came: no new work.
    draining: AtomicBool,
}

pub(crate) type AppState = Arc<Shared>;

impl Shared {
    pub(crate) fn new(app: App, loaded: Loaded, metrics: PrometheusHandle) -> Self {
        Self { app, loaded, metrics, not_ready: Mutex::new(None), draining: AtomicBool::new(false) }
    }

    /// Fails with 503 while the server is not ready or is shutting down.
    pub(crate) fn ready(&self) -> Result<(), ApiError> {
        if self.draining.load(Ordering::Acquire) {
            return Err(ApiError::unavailable("the server is shutting down", "shutting_down"));
        }
        match self.not_ready.lock().as_deref() {
            Some(reason) => Err(ApiError::unavailable(format!("not ready: {reason}"), "not_ready")),
            None => Ok(()),
        }
    }
}

/// Installs the Prometheus recorder: before anything registers a metric, so that every handle reaches it.
fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .context("histogram buckets")?
        .install_recorder()
        .context("installing the Prometheus recorder")?;
    metrics::describe_counter!(HTTP_REQUESTS_TOTAL, metrics::Unit::Count, "HTTP requests, by route and status.");
    metrics::describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Time to an HTTP response's head, by route (a stream's body goes on after)."
    );
    Ok(handle)
}

/// The whole router over `state`.
pub(crate) fn router(state: AppState) -> Router {
    let limit = state.loaded.config.max_body_bytes;
    let api = Router::new()
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route("/usine/models/load", post(admin::load))
        .route("/usine/models/unload", post(admin::unload))
        .route("/usine/models/pin", post(admin::pin))
        .route("/usine/models/unpin", post(admin::unpin))
        .route("/usine/models/loaded", get(admin::loaded))
        .route("/usine/models/progress", get(admin::progress))
        .route("/usine/warmup", post(admin::warmup))
        .route("/usine/pools", get(admin::pools));
    let metrics_route = Router::new().route("/metrics", get(metrics_text));
    let (api, metrics_route) = if state.loaded.config.metrics_need_key {
        (api.merge(metrics_route), Router::new())
    } else {
        (api, metrics_route)
    };
    let api = api.route_layer(middleware::from_fn_with_state(Arc::clone(&state), authorize));
    let router = Router::new()
        .merge(api)
        .merge(metrics_route)
        .route("/health", get(health))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint", "not_found") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this endpoint does not take that method",
                "method_not_allowed",
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), refuse_announced_excess))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), hosts::loopback_only));
    let access_log = state.loaded.config.access_log;
    let router = router.layer(middleware::from_fn(count)).with_state(state);
    if access_log { router.layer(middleware::from_fn(access_log::log)) } else { router }
}

/// Counts each request and times it to its response's head.
async fn count(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let start = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(HTTP_REQUESTS_TOTAL, "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!(HTTP_REQUEST_DURATION_SECONDS, "route" => route).record(start.elapsed().as_secs_f64());
    response
}

/// Refuses a body whose announced length is over the limit at once, before reading any of it (a body
/// without a length, or lying about it, still stops at the limit as it is read).
async fn refuse_announced_excess(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.loaded.config.max_body_bytes;
    let announced = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|length| length > limit as u64) {
        let message = format!("the body is larger than the limit of {limit} bytes");
        return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, message, "body_too_large").into_response();
    }
    next.run(request).await
}

/// Demands the bearer token, when one is configured.
async fn authorize(State(state): State<AppState>, headers: HeaderMap, request: Request, next: Next) -> Response {
    let Some(key) = &state.loaded.config.api_key else { return next.run(request).await };
    let given = headers.get(header::AUTHORIZATION).and_then(|value| value.to_str().ok()).and_then(|value| {
        let (scheme, token) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
    });
    match given {
        Some(given) if constant_time_eq(given.as_bytes(), key.as_bytes()) => next.run(request).await,
        _ => {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "a valid API key is needed: `Authorization: Bearer <key>`",
                "invalid_api_key",
            )
            .into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
            response
        }
    }
}

/// Compares without stopping at the first difference, so that the time taken says nothing of the key.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |diff, (x, y)| diff | (x ^ y)) == 0
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let body = state.metrics.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

async fn health(State(state): State<AppState>) -> Response {
    match state.ready() {
        Ok(()) => axum::Json(serde_json::json!({ "status": "ready" })).into_response(),
        Err(error) => {
            let body = serde_json::json!({ "status": "not_ready", "reason": error.message() });
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
        }
    }
}

/// Whether `address` is loopback: the only place the server listens without a key.
fn is_loopback(address: &SocketAddr) -> bool {
    address.ip().is_loopback()
}

pub(crate) async fn serve(loaded: Loaded, bind: Option<String>) -> anyhow::Result<()> {
    // The signal handlers first: a SIGTERM during start-up is a clean shutdown too.
    let terminated = terminated()?;
    let metrics = install_metrics()?;
    {
        // Histograms are kept as raw samples until rendered; upkeep folds them in, so that a server
        // nobody scrapes does not grow.
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs(5));
            loop {
                ticks.tick().await;
                metrics.run_upkeep();
            }
        });
    }
    let bind = bind.unwrap_or_else(|| loaded.config.bind.clone());
    let address: SocketAddr =
        bind.parse().map_err(|_| crate::UsageError(anyhow::anyhow!("--bind `{bind}` is not an address and port")))?;
    if !is_loopback(&address) && loaded.config.api_key.is_none() {
        return Err(crate::UsageError(anyhow::anyhow!(
            "binding {address} (not loopback) needs an API key: set `api_key` in usine.toml or USINE_API_KEY"
        ))
        .into());
    }
    let app = App::build(&loaded)?;
    let _gc = app.memory.start_gc()?; // idle leases return to their pools while the server runs
    for model in &loaded.config.warmup {
        app.kernel.engine_for(model).map_err(|error| crate::UsageError(anyhow::anyhow!("`warmup`: {error}")))?;
    }
    let grace = Duration::from_secs(loaded.config.shutdown_grace_seconds);
    let state = Arc::new(Shared::new(app, loaded, metrics));
    drop(start_warmup(&state)); // detached: it runs while the server serves

    let listener =
        tokio::net::TcpListener::bind(address).await.with_context(|| format!("cannot listen on {address}"))?;
    let local = listener.local_addr()?;
    eprintln!("usine serve: listening on http://{local} (OpenAI API under /v1, metrics at /metrics)");
    let draining = Arc::new(tokio::sync::Notify::new());
    let shutdown = {
        let (state, draining) = (Arc::clone(&state), Arc::clone(&draining));
        async move {
            terminated.await;
            eprintln!("usine serve: shutting down; running streams have {} s", grace.as_secs());
            state.draining.store(true, Ordering::Release);
            state.app.executor.close();
            draining.notify_one();
        }
    };
    let limits = conn::Limits::new(&state.loaded.config);
    let server = conn::serve(listener, router(Arc::clone(&state)), limits, shutdown);
    tokio::select! {
        served = server => served.context("serving")?,
        () = async { draining.notified().await; tokio::time::sleep(grace).await } => {
            eprintln!("usine serve: the grace period is over; cancelling what still runs");
        }
    }
    if let Err(error) = state.app.kernel.save_usage().await {
        eprintln!("usine serve: the counts of use were not saved: {error}"); // the shutdown itself went well
    }
    Ok(())
}

/// Starts the warm-up of the models of `warmup` (checked to exist) in the background, one after the other. With
/// `wait_for_warmup`, the server is not ready from now until they are all loaded, and stays so, saying
/// why, if one failed. The task is returned for tests to await.
fn start_warmup(state: &AppState) -> Option<tokio::task::JoinHandle<()>> {
    let warmup = state.loaded.config.warmup.clone();
    if warmup.is_empty() {
        return None;
    }
    if state.loaded.config.wait_for_warmup {
        *state.not_ready.lock() = Some(format!("warming up {}", warmup.join(", ")));
    }
    let state = Arc::clone(state);
    Some(tokio::spawn(async move {
        let mut failed = None;
        for model in &warmup {
            let options = usine_kernel::LoadOptions { warm: true, ..usine_kernel::LoadOptions::default() };
            if let Err(error) = state.app.kernel.load_with(model, options).await {
                eprintln!("usine serve: warm-up of {model} failed: {error}");
                failed.get_or_insert(format!("warm-up of {model} failed: {error}"));
            }
        }
        let mut not_ready = state.not_ready.lock();
        // Waiting for a warm-up that failed: not ready, and /health says why.
        *not_ready = if not_ready.is_some() { failed } else { None };
    }))
}

/// SIGTERM or Ctrl-C, listened for from now on.
fn terminated() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("listening for SIGTERM")?;
    let interrupt = tokio::signal::ctrl_c();
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt => {}
        }
        #[cfg(not(unix))]
        let _ = interrupt.await;
    })
}
