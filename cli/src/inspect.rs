//! `usine pools` and `usine models`: the memory pools and the catalog, as this configuration makes them.

use serde_json::json;

use crate::app::{self, App};
use crate::config::Loaded;
use crate::output;

/// `usine pools`: every pool this configuration creates, with its figures.
pub(crate) fn pools(loaded: &Loaded, json: bool) -> anyhow::Result<()> {
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
    println!("{}", output::table(["pool", "capacity", "block", "used", "peak", "leases", "waiters"], rows));
    println!("(this process's pools; `usine serve` shows a running server's at /metrics)");
    Ok(())
}

/// `usine models`: the catalog, each model's compiled graph, and what is loaded.
pub(crate) async fn models(loaded: &Loaded, json: bool) -> anyhow::Result<()> {
    let app = App::build(loaded)?;
    let resident = app.kernel.loaded();
    let default = app.model(loaded)?.id.clone();
    let mut rows = Vec::new();
    for model in &app.catalog.models {
        let key = app.kernel.graph_key(&model.id)?;
        let compiled = app.storage.explain(&key)?.stored; // a look at the folder: no read, no use recorded
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
        let shape = model.about.split(';').next().unwrap_or(model.about); // the rest is in `--json`
        [id, if compiled { "yes".into() } else { "no".into() }, state, shape.to_owned()]
    });
    println!("{}", output::table(["model", "compiled", "state", "about"], rows));
    Ok(())
}
