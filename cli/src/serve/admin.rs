//! Model lifecycle endpoints, under `/usine`: load, unload, pin, unpin, warm up, what is loaded, a
//! model's load progress as server-sent events, and the pools.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::response::IntoResponse;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;
use usine_kernel::{KeepAlive as ModelKeepAlive, LoadOptions};

use super::error::known_model;
use super::{ApiError, AppState};

#[derive(Debug, Deserialize)]
pub(crate) struct ModelBody {
    model: String,
    /// `load`: keep the model this long once idle (seconds); `-1` forever.
    keep_alive_seconds: Option<i64>,
    /// `load`: run a throwaway generation after the load.
    #[serde(default)]
    warm: bool,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ModelsBody {
    models: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ModelQuery {
    model: String,
}

/// Most seconds of keep-alive a request may set (a year); beyond, `-1` keeps a model forever.
const MAX_KEEP_ALIVE_SECONDS: i64 = 365 * 86_400;

fn body<T>(body: Result<Json<T>, JsonRejection>, state: &AppState) -> Result<T, ApiError> {
    body.map(|Json(body)| body).map_err(|rejection| super::error::rejected(rejection, state))
}

/// `POST /usine/models/load`: loads a model (compiling it the first time) and says from where.
pub(crate) async fn load(
    State(state): State<AppState>,
    request: Result<Json<ModelBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let request = body(request, &state)?;
    known_model(&state, &request.model)?;
    state.ready()?;
    let keep_alive = match request.keep_alive_seconds {
        None => None,
        Some(-1) => Some(ModelKeepAlive::Forever),
        Some(seconds) if (0..=MAX_KEEP_ALIVE_SECONDS).contains(&seconds) => {
            Some(ModelKeepAlive::For(Duration::from_secs(seconds.unsigned_abs())))
        }
        Some(seconds) => {
            return Err(ApiError::out_of_range(format!(
                "`keep_alive_seconds` is {seconds}, outside 0..={MAX_KEEP_ALIVE_SECONDS} (or -1 for forever)"
            )));
        }
    };
    let start = Instant::now();
    let options = LoadOptions { keep_alive, warm: request.warm, ..LoadOptions::default() };
    let handle = state.app.kernel.load_with(&request.model, options).await?;
    Ok(Json(json!({
        "model": handle.id(), "source": handle.source().as_str(), "seconds": start.elapsed().as_secs_f64(),
        "weights_bytes": handle.memory_plan().weights_bytes,
    })))
}

/// `POST /usine/models/unload`.
pub(crate) async fn unload(
    State(state): State<AppState>,
    request: Result<Json<ModelBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let request = body(request, &state)?;
    known_model(&state, &request.model)?;
    Ok(Json(json!({ "model": request.model, "unloaded": state.app.kernel.unload(&request.model) })))
}

/// `POST /usine/models/pin`.
pub(crate) async fn pin(
    State(state): State<AppState>,
    request: Result<Json<ModelBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let request = body(request, &state)?;
    known_model(&state, &request.model)?;
    state.app.kernel.pin(&request.model)?;
    Ok(Json(json!({ "model": request.model, "pinned": true })))
}

/// `POST /usine/models/unpin`.
pub(crate) async fn unpin(
    State(state): State<AppState>,
    request: Result<Json<ModelBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let request = body(request, &state)?;
    known_model(&state, &request.model)?;
    state.app.kernel.unpin(&request.model);
    Ok(Json(json!({ "model": request.model, "pinned": false })))
}

/// `POST /usine/warmup`: queues warm-ups, which user requests pre-empt.
pub(crate) async fn warmup(
    State(state): State<AppState>,
    request: Result<Json<ModelsBody>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let request = body(request, &state)?;
    request.models.iter().try_for_each(|model| known_model(&state, model))?;
    let models: Vec<&str> = request.models.iter().map(String::as_str).collect();
    state.app.kernel.warm_up(&models)?;
    Ok((axum::http::StatusCode::ACCEPTED, Json(json!({ "queued": state.app.kernel.warm_queue() }))))
}

/// `GET /usine/models/loaded`: size, pins, idle time and expiry of each loaded model.
pub(crate) async fn loaded(State(state): State<AppState>) -> Json<Value> {
    let models: Vec<Value> = state
        .app
        .kernel
        .loaded()
        .into_iter()
        .map(|info| {
            json!({
                "model": info.id, "weights_bytes": info.weights_bytes, "source": info.source.as_str(),
                "load_seconds": info.load_duration.as_secs_f64(), "handles": info.handles, "pinned": info.pinned,
                "idle_seconds": info.idle_for.map(|idle| idle.as_secs_f64()),
                "expires_in_seconds": info.expires_in.map(|left| left.as_secs_f64()),
            })
        })
        .collect();
    Json(json!({ "models": models }))
}

/// `GET /usine/models/progress?model=ID`: the model's compile progress as server-sent events, until it
/// is loaded (or its load fails); it ends at once when no load of the model is running.
pub(crate) async fn progress(
    State(state): State<AppState>,
    query: Result<Query<ModelQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(query) = query.map_err(|rejection| super::error::bad_query(&rejection))?;
    known_model(&state, &query.model)?;
    let reports = state.app.kernel.progress(&query.model)?;
    // Nothing to follow unless a load runs now: a stream that waits for a load nobody started would
    // never end.
    let loaded = !state.app.kernel.is_loading(&query.model);
    let events = futures_util::stream::unfold((reports, loaded), |(mut reports, done)| async move {
        if done {
            return None;
        }
        let event = match reports.next().await {
            Some(progress) => json!({
                "stage": progress.stage, "fraction": progress.fraction,
                "eta_seconds": progress.eta.map(|eta| eta.as_secs_f64()),
            }),
            None => return None,
        };
        Some((Ok::<_, Infallible>(SseEvent::default().data(event.to_string())), (reports, false)))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// `GET /usine/pools`: every pool's figures.
pub(crate) async fn pools(State(state): State<AppState>) -> Json<Value> {
    let pools: Vec<Value> = state
        .app
        .memory
        .stats()
        .pools
        .iter()
        .map(|pool| {
            json!({
                "name": pool.name, "capacity": pool.capacity, "used": pool.used, "peak": pool.peak,
                "leases": pool.active_leases, "waiters": pool.waiters,
            })
        })
        .collect();
    Json(json!({ "pools": pools }))
}
