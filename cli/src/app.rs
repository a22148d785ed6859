//! What every command builds from the configuration: the catalog of models, and the pools, graph store,
//! kernel and executor that run them.

use std::sync::Arc;

use anyhow::Context as _;
use usine_engine::{CompiledGraph, MemoryPlan, ModelSpec, ZeroEngine};
use usine_engine_sim::{Profile, SimConfig};
use usine_executor::TaskExecutor;
use usine_kernel::{KernelConfig, RuntimeManager};
use usine_memory::{MemoryManager, StandardPools};
use usine_storage::{Migrations, StorageConfig, StorageManager};

use crate::config::Loaded;

/// A model of the catalog: one profile of one engine (a simulated engine's profile is its model), or one
/// set of weights of the candle engine.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Model {
    /// `engine/name`: the id the kernel, the store and the server know it by.
    pub(crate) id: String,
    pub(crate) engine: &'static str,
    /// The model's name within its engine (`--model`).
    pub(crate) name: &'static str,
    pub(crate) profile: &'static str,
    /// Where the profile's figures come from.
    pub(crate) about: &'static str,
}

/// Every model usine can run: each profile of each engine.
pub(crate) struct Catalog {
    pub(crate) models: Vec<Model>,
}

/// Each engine's model when none is named: the seeds' 7B on a laptop GPU, a 1B on a CPU.
const DEFAULTS: &[(&str, &str)] = &[
    (usine_engine_webllm::NAME, "7b"),
    (usine_engine_transformers::NAME, "cpu-1b"),
    (ZeroEngine::NAME, "default"),
    ("candle", "tiny-llama"),
];

/// The zero engine's memory plan: small but real leases, so that overhead measurements include them.
const ZERO_PLAN: MemoryPlan = MemoryPlan {
    weights_bytes: 1 << 20,
    kv_bytes_per_token: 1024,
    activation_bytes_per_step: 4096,
    max_context_tokens: 8192,
};

impl Catalog {
    pub(crate) fn standard() -> Self {
        let threads = usine_engine_transformers::REFERENCE_THREADS;
        let engines: [(&'static str, Vec<Profile>); 2] = [
            (usine_engine_webllm::NAME, usine_engine_webllm::flavor().profiles),
            (usine_engine_transformers::NAME, usine_engine_transformers::flavor(threads).profiles),
        ];
        let mut models: Vec<Model> = engines
            .into_iter()
            .flat_map(|(engine, profiles)| {
                profiles.into_iter().map(move |profile| Model {
                    id: format!("{engine}/{}", profile.name),
                    engine,
                    name: profile.name,
                    profile: profile.name,
                    about: profile.source,
                })
            })
            .collect();
        models.push(Model {
            id: format!("{}/default", ZeroEngine::NAME),
            engine: ZeroEngine::NAME,
            name: "default",
            profile: "default",
            about: "the zero-cost engine: no work at all, to measure usine itself; its text is fixed",
        });
        #[cfg(feature = "candle")]
        models.push(Model {
            id: format!("{}/{}", usine_engine_candle::NAME, candle::MODEL),
            engine: usine_engine_candle::NAME,
            name: candle::MODEL,
            profile: usine_engine_candle::PROFILE,
            about: "the project's own byte-level llama, about 1M parameters, trained on its docs and The Rust Programming Language (notice: usine --version)",
        });
        Self { models }
    }

    /// The engines, in the catalog's order.
    pub(crate) fn engines(&self) -> Vec<&'static str> {
        let mut engines: Vec<_> = self.models.iter().map(|model| model.engine).collect();
        engines.dedup();
        engines
    }

    /// The model `model` names (a profile of `engine`, or a full `engine/profile` id), or `engine`'s
    /// default model.
    pub(crate) fn resolve(&self, engine: &str, model: Option<&str>) -> anyhow::Result<&Model> {
        let engines = self.engines();
        if let Some(id) = model.filter(|id| id.contains('/')) {
            return self.models.iter().find(|m| m.id == id).with_context(|| {
                let known: Vec<_> = self.models.iter().map(|m| m.id.as_str()).collect();
                format!("unknown model `{id}` (known: {})", known.join(", "))
            });
        }
        anyhow::ensure!(engines.contains(&engine), "unknown engine `{engine}` (known: {})", engines.join(", "));
        let profile = match model {
            Some(profile) => profile,
            None => DEFAULTS.iter().find(|(name, _)| *name == engine).map(|(_, profile)| *profile).unwrap_or_default(),
        };
        self.models.iter().find(|m| m.engine == engine && m.name == profile).with_context(|| {
            let known: Vec<_> = self.models.iter().filter(|m| m.engine == engine).map(|m| m.name).collect();
            format!("engine `{engine}` has no model `{profile}` (it has: {})", known.join(", "))
        })
    }
}

/// The running parts.
pub(crate) struct App {
    pub(crate) memory: MemoryManager,
    pub(crate) storage: StorageManager,
    pub(crate) kernel: RuntimeManager,
    pub(crate) executor: TaskExecutor,
    pub(crate) catalog: Catalog,
}

/// The graph store the configuration names.
pub(crate) fn storage(loaded: &Loaded) -> anyhow::Result<StorageManager> {
    let config = match &loaded.config.cache_dir {
        Some(dir) => StorageConfig::at(dir),
        None => StorageConfig::from_env().context("no cache folder: set `cache_dir` or USINE_CACHE_DIR")?,
    };
    let root = config.root.clone();
    StorageManager::open(config, migrations(loaded))
        .with_context(|| format!("cannot open the graph cache in {}", root.display()))
}

/// The engines' graph migrations: the simulated engines' graphs of schema 1 gain their memory plan.
fn migrations(loaded: &Loaded) -> Migrations {
    let mut migrations = Migrations::new();
    let webllm = usine_engine_webllm::flavor();
    migrations.register(usine_engine_webllm::NAME, 1, move |graph: CompiledGraph| webllm.upgrade_graph(graph));
    let transformers = usine_engine_transformers::flavor(threads(loaded));
    migrations
        .register(usine_engine_transformers::NAME, 1, move |graph: CompiledGraph| transformers.upgrade_graph(graph));
    migrations
}

/// The threads of the CPU engine.
pub(crate) fn threads(loaded: &Loaded) -> usize {
    loaded.config.threads.unwrap_or_else(usine_engine_transformers::default_threads)
}

/// The three standard pools cut from the configured budget.
pub(crate) fn pools(loaded: &Loaded) -> anyhow::Result<StandardPools> {
    StandardPools::from_budget(loaded.config.memory_budget_mib << 20).context("`memory_budget_mib` is too small")
}

impl App {
    /// Builds everything on the current tokio runtime, with the whole catalog registered.
    pub(crate) fn build(loaded: &Loaded) -> anyhow::Result<Self> {
        let config = &loaded.config;
        let memory = MemoryManager::with_standard_pools(&pools(loaded)?)?;
        let storage = storage(loaded)?;
        let kernel_config =
            KernelConfig { weights_capacity: config.weights_budget_mib << 20, ..KernelConfig::default() };
        let kernel = RuntimeManager::new(kernel_config, &memory, storage.clone())?;
        let sim = SimConfig { jitter: config.jitter, seed: config.seed, ..SimConfig::default() };
        kernel.register_engine(Arc::new(usine_engine_webllm::webllm(sim.clone())?));
        kernel.register_engine(Arc::new(usine_engine_transformers::transformers(sim, threads(loaded))?));
        kernel.register_engine(Arc::new(ZeroEngine::with_plan(ZERO_PLAN)));
        #[cfg(feature = "candle")]
        kernel.register_engine(Arc::new(
            usine_engine_candle::CandleEngine::with_threads(
                loaded.config.threads.unwrap_or_else(usine_engine_candle::default_threads),
            )?
            .with_builtin(candle::MODEL, candle::WEIGHTS),
        ));
        let catalog = Catalog::standard();
        for model in &catalog.models {
            let mut spec = ModelSpec::new(&model.id, model.engine, model.profile);
            #[cfg(feature = "candle")]
            if model.engine == usine_engine_candle::NAME {
                spec.options = candle::options();
            }
            kernel.register_model(spec);
        }
        let executor = TaskExecutor::new(loaded.executor_config(), &kernel, &memory)?;
        Ok(Self { memory, storage, kernel, executor, catalog })
    }

    /// The model the configuration names.
    pub(crate) fn model(&self, loaded: &Loaded) -> anyhow::Result<&Model> {
        self.catalog.resolve(&loaded.config.engine, loaded.config.model.as_deref())
    }
}

/// The candle engine's model: its weights ship in the binary, and the engine compiles them from memory.
#[cfg(feature = "candle")]
mod candle {
    use std::collections::BTreeMap;

    /// The model's name.
    pub(crate) const MODEL: &str = "tiny-llama";
    /// Its weights, trained by `cargo xtask train`.
    pub(crate) const WEIGHTS: &[u8] = include_bytes!("../../engines/candle/weights/tiny-llama.safetensors");

    /// The spec options: the built-in weights, and their digest, which keys the compiled graph by the
    /// weights' content (hashing 4 MB takes about a millisecond).
    pub(crate) fn options() -> BTreeMap<String, String> {
        BTreeMap::from([
            (usine_engine_candle::WEIGHTS_OPTION.to_owned(), format!("{}{MODEL}", usine_engine_candle::BUILTIN_PREFIX)),
            (usine_engine_candle::WEIGHTS_DIGEST_OPTION.to_owned(), blake3::hash(WEIGHTS).to_hex().to_string()),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_resolve_by_profile_by_id_or_by_default() {
        let catalog = Catalog::standard();
        assert_eq!(catalog.resolve("webllm", None).unwrap().id, "webllm/7b");
        assert_eq!(catalog.resolve("transformers", None).unwrap().id, "transformers/cpu-1b");
        assert_eq!(catalog.resolve("webllm", Some("tiny")).unwrap().id, "webllm/tiny");
        assert_eq!(catalog.resolve("webllm", Some("transformers/tiny")).unwrap().id, "transformers/tiny");
        let error = catalog.resolve("webllm", Some("13b")).unwrap_err().to_string();
        assert_eq!(error, "engine `webllm` has no model `13b` (it has: tiny, 7b)");
        let error = catalog.resolve("cuda", None).unwrap_err().to_string();
        assert_eq!(error, "unknown engine `cuda` (known: webllm, transformers, zero, candle)");
        assert_eq!(catalog.resolve("candle", None).unwrap().id, "candle/tiny-llama");
        assert_eq!(catalog.resolve("zero", None).unwrap().id, "zero/default");
    }
}
