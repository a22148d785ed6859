//! `usine cache`: the compiled-graph store, read and maintained.

use std::time::{Duration, SystemTime};

use clap::Subcommand;
use serde_json::json;
use usine_storage::{Cleanup, CurrentEngine, EntryStatus, Maintenance, StorageManager};

use crate::app::App;
use crate::config::{Flags, Loaded};
use crate::output;

#[derive(Debug, Subcommand)]
pub(crate) enum CacheCommand {
    /// Lists the stored graphs with their headers.
    #[command(after_help = "Examples:\n  usine cache ls\n  usine cache ls --json")]
    Ls(Json),
    /// Shows the store's size.
    #[command(after_help = "Example:\n  usine cache stats")]
    Stats(Json),
    /// Checks every graph's checksum; damaged files are quarantined.
    #[command(after_help = "Example:\n  usine cache verify")]
    Verify(Json),
    /// Says whether a model's graph is stored, and else what differs from the closest one.
    #[command(after_help = "Examples:\n  usine cache explain 7b\n  usine cache explain --engine transformers cpu-1b")]
    Explain(OfModel),
    /// Removes graphs of engine versions no longer built, and graphs unused for a while.
    #[command(after_help = "Examples:\n  usine cache gc\n  usine cache gc --unused-for-days 30")]
    Gc {
        /// Also remove graphs unused for this many days (1 to 36500).
        #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u64).range(1..=MAX_DAYS))]
        unused_for_days: Option<u64>,
        #[command(flatten)]
        json: Json,
    },
    /// Upgrades stored graphs of older schemas through the engines' migrations (a load also upgrades its own).
    #[command(after_help = "Example:\n  usine cache migrate")]
    Migrate(Json),
    /// Fetches a model's graph from the fleet's remote tier (`remote`) into the cache, verified: a new
    /// host ready before its first load.
    #[command(
        after_help = "Examples:\n  usine cache pull 7b\n  usine cache pull --engine candle candle/qwen.gguf --json"
    )]
    Pull(OfModel),
    /// Removes every stored graph.
    #[command(after_help = "Example:\n  usine cache clear --yes")]
    Clear {
        /// Confirms: without it, nothing is removed.
        #[arg(long)]
        yes: bool,
    },
}

/// A command about one model: its name (as `--model`) or the model flags, and `--json`.
#[derive(Debug, clap::Args)]
pub(crate) struct OfModel {
    /// The model (as `--model`).
    #[arg(value_name = "MODEL", conflicts_with = "model")]
    name: Option<String>,
    #[command(flatten)]
    model: crate::ModelArgs,
    #[command(flatten)]
    json: Json,
}

#[derive(Debug, Clone, Copy, clap::Args)]
pub(crate) struct Json {
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

impl CacheCommand {
    /// The flags that set configuration values.
    pub(crate) fn flags(&self) -> Flags {
        match self {
            Self::Explain(OfModel { model, name, .. }) | Self::Pull(OfModel { model, name, .. }) => {
                let mut model = model.clone();
                model.model = model.model.or_else(|| name.clone());
                crate::model_flags(&model)
            }
            _ => Flags::default(),
        }
    }
}

/// Most days `gc --unused-for-days` takes (a century).
const MAX_DAYS: u64 = 36_500;

pub(crate) async fn cache(loaded: &Loaded, command: CacheCommand) -> anyhow::Result<()> {
    let storage = crate::app::storage(loaded)?;
    match command {
        CacheCommand::Ls(Json { json }) => ls(&storage, json),
        CacheCommand::Stats(Json { json }) => stats(&storage, crate::app::remote_status(loaded).await?, json),
        CacheCommand::Pull(OfModel { json: Json { json }, .. }) => pull(loaded, &storage, json).await,
        CacheCommand::Verify(Json { json }) => {
            let report = storage.verify()?;
            if json {
                let quarantined: Vec<_> =
                    report.quarantined.iter().map(|(file, why)| json!({ "file": file, "reason": why })).collect();
                output::json(&json!({ "valid": report.valid, "newer": report.newer, "quarantined": quarantined }));
            } else {
                outln!(
                    "{} valid, {} of a newer usine (left alone), {} quarantined",
                    report.valid,
                    report.newer,
                    report.quarantined.len()
                );
                for (file, why) in &report.quarantined {
                    outln!("  {file}: {why} (moved to {})", storage.quarantine_dir().display());
                }
            }
            Ok(())
        }
        CacheCommand::Explain(OfModel { json: Json { json }, .. }) => {
            let app = App::build(loaded)?;
            let model = app.model(loaded)?;
            let key = app.kernel.graph_key(&model.id)?;
            let explanation = storage.explain(&key)?;
            if json {
                let closest = explanation.closest.as_ref().map(|(key, differs)| {
                    json!({ "key": key.to_string(), "differs": differs.iter().map(|part| part.as_str()).collect::<Vec<_>>() })
                });
                output::json(&json!({
                    "model": model.id, "key": key.to_string(), "file": key.file_name(),
                    "stored": explanation.stored, "closest": closest,
                }));
            } else {
                outln!("{explanation}");
                outln!("file: {}", storage.path_of(&key).display());
            }
            Ok(())
        }
        CacheCommand::Gc { unused_for_days, json: Json { json } } => {
            let app = App::build(loaded)?;
            let current = app
                .catalog
                .engines()
                .into_iter()
                .filter_map(|engine| {
                    app.kernel.engine_for(&app.catalog.models.iter().find(|m| m.engine == engine)?.id).ok()
                })
                .map(|engine| {
                    let descriptor = engine.descriptor();
                    CurrentEngine {
                        engine: descriptor.name.clone(),
                        version: descriptor.version.clone(),
                        schema: descriptor.graph_schema,
                    }
                })
                .collect();
            let policy =
                Cleanup { unused_for: unused_for_days.map(|days| Duration::from_secs(days * 86_400)), current };
            maintenance("removed", &storage.cleanup(&policy)?, json);
            Ok(())
        }
        CacheCommand::Migrate(Json { json }) => {
            maintenance("migrated", &storage.migrate()?, json);
            Ok(())
        }
        CacheCommand::Clear { yes } => {
            let entries = storage.list()?;
            if !yes {
                outln!(
                    "{} in {}; run `usine cache clear --yes` to remove them",
                    output::count(entries.len() as u64, "graph", "graphs"),
                    storage.graphs_dir().display()
                );
                return Ok(());
            }
            let mut removed = 0;
            for entry in entries.iter().filter(|entry| entry.header().is_some()) {
                // The file listed, not one another process saved at its path since.
                removed += usize::from(storage.remove_listed(entry)?);
            }
            outln!(
                "removed {removed} of {} (files of a newer usine or unreadable are left to `verify`)",
                output::count(entries.len() as u64, "graph", "graphs")
            );
            Ok(())
        }
    }
}

fn ls(storage: &StorageManager, json: bool) -> anyhow::Result<()> {
    let entries = storage.list()?;
    let age = |time: SystemTime| SystemTime::now().duration_since(time).unwrap_or_default();
    if json {
        let entries: Vec<_> = entries
            .iter()
            .map(|entry| {
                let (status, key) = match &entry.status {
                    EntryStatus::Valid(header) => ("valid", Some(header.key.to_string())),
                    EntryStatus::Newer(_) => ("newer", None),
                    EntryStatus::Unreadable(_) => ("unreadable", None),
                    EntryStatus::Inaccessible(_) => ("inaccessible", None),
                };
                json!({
                    "file": entry.file_name, "bytes": entry.bytes, "status": status, "key": key,
                    "idle_seconds": age(entry.last_use).as_secs(),
                })
            })
            .collect();
        output::json(&serde_json::Value::Array(entries));
        return Ok(());
    }
    if entries.is_empty() {
        outln!("no compiled graphs in {}", storage.graphs_dir().display());
        return Ok(());
    }
    let rows = entries.iter().map(|entry| {
        let (model, engine, device, status) = match &entry.status {
            EntryStatus::Valid(header) => {
                let key = &header.key;
                (
                    key.model.clone(),
                    format!("{} {}", key.engine, key.engine_version),
                    key.device.clone(),
                    "valid".to_owned(),
                )
            }
            EntryStatus::Newer(format) => {
                (String::new(), String::new(), String::new(), format!("format {format}, newer"))
            }
            EntryStatus::Unreadable(why) => (String::new(), String::new(), String::new(), format!("unreadable: {why}")),
            EntryStatus::Inaccessible(why) => {
                (String::new(), String::new(), String::new(), format!("inaccessible: {why}"))
            }
        };
        let file: String = entry.file_name.chars().take(12).collect();
        [
            model,
            engine,
            device,
            output::bytes(entry.bytes),
            format!("{} ago", output::duration(age(entry.last_use))),
            status,
            file,
        ]
    });
    outln!("{}", output::table(["model", "engine", "profile", "size", "last use", "status", "file"], rows));
    Ok(())
}

fn stats(storage: &StorageManager, remote: Option<crate::app::RemoteStatus>, json: bool) -> anyhow::Result<()> {
    let stats = storage.stats()?;
    if json {
        output::json(&json!({
            "root": storage.root(), "graphs": stats.graphs, "bytes": stats.bytes, "quarantined": stats.quarantined,
            "evicted": stats.evicted, "remote": remote.as_ref().map(crate::app::RemoteStatus::json),
        }));
        return Ok(());
    }
    outln!(
        "{}, {} in {}",
        output::count(stats.graphs as u64, "graph", "graphs"),
        output::bytes(stats.bytes),
        storage.graphs_dir().display()
    );
    if let Some(remote) = remote {
        outln!("remote tier: {}", remote.line());
    }
    Ok(())
}

/// `cache pull`: the model's graph from the remote tier into the store; an error when the tier has
/// none, or is unreachable.
#[cfg(feature = "remote")]
async fn pull(loaded: &Loaded, storage: &StorageManager, json: bool) -> anyhow::Result<()> {
    use usine_storage::remote::Fetched;
    let app = App::build(loaded)?;
    // The tier the kernel shares through, made by `App::build` from `remote`.
    let Some(tier) = app.kernel.remote_tier() else {
        anyhow::bail!("no remote tier to pull from: set `remote` (redis://host:port) in usine.toml or USINE_REMOTE")
    };
    let model = app.model(loaded)?;
    let key = app.kernel.graph_key(&model.id)?;
    let started = std::time::Instant::now();
    let fetched = tier.fetch(storage, &key).await;
    let seconds = started.elapsed().as_secs_f64();
    let bytes = match fetched {
        Fetched::Hit { bytes } => bytes,
        Fetched::Absent => anyhow::bail!("{}: the remote tier {} has no graph of it", model.id, tier.url()),
        Fetched::Damaged { reason } => {
            anyhow::bail!("{}: the remote tier's graph was damaged ({reason}); it was not stored", model.id)
        }
        Fetched::Unavailable { reason } => anyhow::bail!("{}: the remote tier {}: {reason}", model.id, tier.url()),
    };
    if json {
        output::json(&json!({ "model": model.id, "bytes": bytes, "seconds": seconds, "file": storage.path_of(&key) }));
    } else {
        outln!(
            "{}: {} fetched from {} in {}; stored in {}",
            model.id,
            output::bytes(bytes),
            tier.url(),
            output::duration(std::time::Duration::from_secs_f64(seconds)),
            storage.path_of(&key).display()
        );
    }
    Ok(())
}

#[cfg(not(feature = "remote"))]
async fn pull(_: &Loaded, _: &StorageManager, _: bool) -> anyhow::Result<()> {
    anyhow::bail!("this build has no remote tier (feature `remote`)")
}

fn maintenance(verb: &str, done: &Maintenance, json: bool) {
    if json {
        let list = |items: &[(usine_storage::GraphKey, String)]| {
            items.iter().map(|(key, why)| json!({ "key": key.to_string(), "reason": why })).collect::<Vec<_>>()
        };
        output::json(&json!({ verb: list(&done.done), "failed": list(&done.failed) }));
        return;
    }
    if done.done.is_empty() && done.failed.is_empty() {
        outln!("nothing to do");
    }
    for (key, why) in &done.done {
        outln!("{verb} {key}: {why}");
    }
    for (key, why) in &done.failed {
        outln!("failed {key}: {why}");
    }
}
