//! `usine pools` and `usine models`: the memory pools and the catalog, as this configuration makes them.

use serde_json::json;

use crate::app::{self, App};
use crate::config::Loaded;
use crate::output;

/// GETs `path` from a running server, with the configured API key.
fn ask(loaded: &Loaded, server: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let url = format!("{}{path}", server.trim_end_matches('/'));
    let mut request = ureq::get(&url).timeout(std::time::Duration::from_secs(10));
    if let Some(key) = &loaded.config.api_key {
        request = request.set("Authorization", &format!("Bearer {key}"));
    }
    let response = request.call().map_err(|error| anyhow::anyhow!("asking {url}: {error}"))?;
    response.into_json().map_err(|error| anyhow::anyhow!("{url} answered something other than JSON: {error}"))
}

/// `usine pools`: every pool this configuration creates, with its figures; a running server's with
/// `server`.
pub(crate) fn pools(loaded: &Loaded, json: bool, server: Option<&str>) -> anyhow::Result<()> {
    if let Some(server) = server {
        let answer = ask(loaded, server, "/usine/pools")?;
        if json {
            output::json(&answer["pools"]);
            return Ok(());
        }
        let empty = Vec::new();
        let rows = answer["pools"].as_array().unwrap_or(&empty).iter().map(|pool| {
            let figure = |key: &str| pool[key].as_u64().unwrap_or(0);
            [
                pool["name"].as_str().unwrap_or("?").to_owned(),
                output::bytes(figure("capacity")),
                output::bytes(figure("used")),
                output::bytes(figure("peak")),
                figure("leases").to_string(),
                figure("waiters").to_string(),
            ]
        });
        outln!("{}", output::table(["pool", "capacity", "used", "peak", "leases", "waiters"], rows));
        return Ok(());
    }
    let memory = usine_memory::MemoryManager::with_standard_pools(&app::pools(loaded)?)?;
    let weights = loaded.config.weights_budget_mib << 20;
    memory.create_pool("weights", usine_memory::PoolConfig::new(weights, 1).idle_timeout(None))?;
    let stats = memory.stats();
    if json {
        let pools: Vec<_> = stats
            .pools
            .iter()
            .map(|pool| {
                json!({
                    "name": pool.name, "capacity": pool.capacity, "block_size": pool.block_size, "used": pool.used,
                    "peak": pool.peak, "leases": pool.active_leases, "waiters": pool.waiters,
                })
            })
            .collect();
        output::json(&serde_json::Value::Array(pools));
        return Ok(());
    }
    let rows = stats.pools.iter().map(|pool| {
        [
            pool.name.clone(),
            output::bytes(pool.capacity),
            output::bytes(pool.block_size),
            output::bytes(pool.used),
            output::bytes(pool.peak),
            pool.active_leases.to_string(),
            pool.waiters.to_string(),
        ]
    });
    outln!("{}", output::table(["pool", "capacity", "block", "used", "peak", "leases", "waiters"], rows));
    outln!("(the pools this configuration makes, unused; `--server URL` shows a running server's)");
    Ok(())
}

/// `usine models`: the catalog, each model's compiled graph, and what is loaded (in a running server,
/// with `server`: what `ollama ps` shows).
pub(crate) async fn models(loaded: &Loaded, json: bool, server: Option<&str>) -> anyhow::Result<()> {
    if let Some(server) = server {
        let answer = ask(loaded, server, "/usine/models/loaded")?;
        if json {
            output::json(&answer["models"]);
            return Ok(());
        }
        let empty = Vec::new();
        let seconds = |value: &serde_json::Value| {
            value
                .as_f64()
                .map_or_else(|| "-".to_owned(), |s| output::duration(std::time::Duration::from_secs_f64(s.max(0.0))))
        };
        let rows = answer["models"].as_array().unwrap_or(&empty).iter().map(|model| {
            let state = if model["pinned"] == true {
                "pinned"
            } else if model["handles"].as_u64().unwrap_or(0) > 0 {
                "in use"
            } else {
                "idle"
            };
            [
                model["model"].as_str().unwrap_or("?").to_owned(),
                output::bytes(model["weights_bytes"].as_u64().unwrap_or(0)),
                state.to_owned(),
                seconds(&model["idle_seconds"]),
                seconds(&model["expires_in_seconds"]),
                model["source"].as_str().unwrap_or("?").to_owned(),
            ]
        });
        outln!("{}", output::table(["model", "size", "state", "idle", "expires in", "loaded from"], rows));
        return Ok(());
    }
    let app = App::build(loaded)?;
    let resident = app.kernel.loaded();
    let default = app.model(loaded)?.id.clone();
    let mut rows = Vec::new();
    for model in &app.catalog.models {
        let key = app.kernel.graph_key(&model.id)?;
        let compiled = app.storage.path_of(&key).exists(); // a look at the folder: no read, no use recorded
        let info = resident.iter().find(|info| info.id == model.id);
        let state = match info {
            None => "not loaded".to_owned(),
            Some(info) if info.pinned => "pinned".to_owned(),
            Some(info) if info.handles > 0 => "in use".to_owned(),
            Some(info) => match info.expires_in {
                Some(left) => format!("idle, expires in {}", output::duration(left)),
                None => "idle".to_owned(),
            },
        };
        rows.push((model, compiled, state));
    }
    if json {
        let models: Vec<_> = rows
            .iter()
            .map(|(model, compiled, state)| {
                json!({
                    "id": model.id, "engine": model.engine, "profile": model.profile, "compiled": compiled,
                    "state": state, "default": model.id == default, "about": model.about,
                })
            })
            .collect();
        output::json(&serde_json::Value::Array(models));
        return Ok(());
    }
    let rows = rows.into_iter().map(|(model, compiled, state)| {
        let id = if model.id == default { format!("{} (default)", model.id) } else { model.id.clone() };
        let shape = model.about.split(';').next().unwrap_or(&model.about); // the rest is in `--json`
        [id, if compiled { "yes".into() } else { "no".into() }, state, shape.to_owned()]
    });
    outln!("{}", output::table(["model", "compiled", "state", "about"], rows));
    Ok(())
}
