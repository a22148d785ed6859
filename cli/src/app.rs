//! What every command builds from the configuration: the catalog of models, and the pools, graph store,
//! kernel and executor that run them.

use std::path::{Path, PathBuf};
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
/// set of weights of the candle engine (built in, or a GGUF file).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Model {
    /// `engine/name`: the id the kernel, the store and the server know it by.
    pub(crate) id: String,
    pub(crate) engine: &'static str,
    /// The model's name within its engine (`--model`).
    pub(crate) name: String,
    pub(crate) profile: &'static str,
    /// Where the profile's figures come from, or what the file holds.
    pub(crate) about: String,
    /// The GGUF file it runs, and whether the engine runs it (why not, where not).
    pub(crate) file: Option<(PathBuf, Result<(), String>)>,
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

/// Whether `--model` names a file rather than a model of the catalog.
pub(crate) fn names_a_file(model: &str) -> bool {
    Path::new(model).extension().is_some_and(|extension| extension.eq_ignore_ascii_case("gguf"))
}

impl Catalog {
    /// The standard catalog, the GGUF files of `models_dir`, and the file `--model` names.
    pub(crate) fn new(config: &crate::config::Config) -> anyhow::Result<Self> {
        let mut catalog = Self::standard();
        let mut files = Vec::new();
        if let Some(dir) = &config.models_dir {
            let entries =
                std::fs::read_dir(dir).with_context(|| format!("cannot read the folder {}", dir.display()))?;
            for entry in entries {
                let path = entry.with_context(|| format!("cannot read the folder {}", dir.display()))?.path();
                if names_a_file(&path.to_string_lossy()) {
                    files.push(path);
                }
            }
            files.sort();
        }
        // `--model` naming a file that is not there is reported by `resolve`.
        if let Some(path) = config.model.as_deref().filter(|model| names_a_file(model)).map(std::path::absolute)
            && let Ok(path) = path
            && path.is_file()
        {
            files.push(path);
        }
        for path in files {
            let model = file_model(&path);
            if let Some(known) = catalog.models.iter().find(|known| known.id == model.id) {
                if known.file.as_ref().map(|(known, _)| known) == Some(&path) {
                    continue; // named twice: in `models_dir` and by `--model`
                }
                anyhow::bail!(
                    "two models would be `{}`: {} and {}",
                    model.id,
                    path.display(),
                    known
                        .file
                        .as_ref()
                        .map_or_else(|| "a built-in model".to_owned(), |(path, _)| path.display().to_string())
                );
            }
            catalog.models.push(model);
        }
        Ok(catalog)
    }

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
                    name: profile.name.to_owned(),
                    profile: profile.name,
                    about: profile.source.to_owned(),
                    file: None,
                })
            })
            .collect();
        models.push(Model {
            id: format!("{}/default", ZeroEngine::NAME),
            engine: ZeroEngine::NAME,
            name: "default".to_owned(),
            profile: "default",
            about: "the zero-cost engine: no work at all, to measure usine itself; its text is fixed".to_owned(),
            file: None,
        });
        #[cfg(feature = "candle")]
        models.push(Model {
            id: format!("{}/{}", usine_engine_candle::NAME, candle::MODEL),
            engine: usine_engine_candle::NAME,
            name: candle::MODEL.to_owned(),
            profile: usine_engine_candle::PROFILE,
            about: "the project's own byte-level llama, about 1M parameters, trained on its docs and The Rust Programming Language (notice: usine --version)".to_owned(),
            file: None,
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
        if let Some(path) = model.filter(|model| names_a_file(model)) {
            let path = std::path::absolute(path).with_context(|| format!("the model file {path}"))?;
            let found = self.models.iter().find(|m| m.file.as_ref().is_some_and(|(file, _)| *file == path));
            let found = found.with_context(|| format!("no model file {}", path.display()))?;
            if let Some((_, Err(why))) = &found.file {
                anyhow::bail!("{}: {why}", path.display());
            }
            return Ok(found);
        }
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
            let known: Vec<_> = self.models.iter().filter(|m| m.engine == engine).map(|m| m.name.as_str()).collect();
            format!("engine `{engine}` has no model `{profile}` (it has: {})", known.join(", "))
        })
    }
}

/// The catalog entry of the GGUF file at `path`: `candle/<file name>`, and what it holds (read from
/// its header through a mapping: no weight is read), or why the engine does not run it.
fn file_model(path: &Path) -> Model {
    let name = path.file_stem().map_or_else(String::new, |stem| stem.to_string_lossy().into_owned());
    let (about, runs) = match describe(path) {
        Ok(about) => (about, Ok(())),
        Err(why) => (format!("not runnable: {why}"), Err(why)),
    };
    Model {
        id: format!("candle/{name}"),
        engine: "candle",
        name,
        profile: "cpu",
        about,
        file: Some((path.to_owned(), runs)),
    }
}

#[cfg(feature = "candle")]
fn describe(path: &Path) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|error| format!("cannot be opened: {error}"))?;
    let size = file.metadata().map_err(|error| format!("cannot be read: {error}"))?.len();
    // SAFETY: read only, to parse the header; a file changed meanwhile gives a refusal or a wrong
    // description, never undefined behaviour in safe code that copies what it reads.
    #[allow(unsafe_code, reason = "a read-only mapping of the model file's header")]
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|error| format!("cannot be mapped: {error}"))?;
    let described = usine_engine_candle::describe_file(&bytes).map_err(|error| error.to_string())?;
    Ok(format!(
        "{}, {} parameters, {}, context {}, {}, {}; {}",
        described.architecture.name(),
        crate::output::magnitude(described.params as u64),
        described.quantization,
        described.context,
        described.tokenizer,
        crate::output::bytes(size),
        path.display()
    ))
}

#[cfg(not(feature = "candle"))]
fn describe(_: &Path) -> Result<String, String> {
    Err("needs the candle engine, which this build of usine leaves out (feature `candle`)".to_owned())
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
        #[cfg(feature = "remote")]
        if let Some(url) = &config.remote {
            kernel.share_through(usine_storage::remote::RemoteTier::new(loaded.remote_config(url))?);
        }
        let sim = SimConfig { jitter: config.jitter, seed: config.seed, ..SimConfig::default() };
        kernel.register_engine(Arc::new(usine_engine_webllm::webllm(sim.clone())?));
        kernel.register_engine(Arc::new(usine_engine_transformers::transformers(sim, threads(loaded))?));
        kernel.register_engine(Arc::new(ZeroEngine::with_plan(ZERO_PLAN)));
        #[cfg(feature = "candle")]
        let device_option = {
            let target = config.device.parse().map_err(|message: String| anyhow::anyhow!("device: {message}"))?;
            let engine = usine_engine_candle::CandleEngine::with_target(
                loaded.config.threads.unwrap_or_else(usine_engine_candle::default_threads),
                target,
            )?
            .with_builtin(candle::MODEL, candle::WEIGHTS);
            // A graph compiled for a card holds its kernels: its key names the card.
            let option = engine.kernels_key();
            kernel.register_engine(Arc::new(engine));
            option
        };
        let catalog = Catalog::new(config)?;
        for model in &catalog.models {
            let mut spec = ModelSpec::new(&model.id, model.engine, model.profile);
            #[cfg(feature = "candle")]
            if model.engine == usine_engine_candle::NAME {
                spec.options = match &model.file {
                    None => candle::options(),
                    Some((path, _)) => candle::file_options(path)?,
                };
                if let Some(tokens) = config.max_context {
                    spec.options.insert(usine_engine_candle::CONTEXT_OPTION.to_owned(), tokens.to_string());
                }
                if let Some(kernels) = &device_option {
                    spec.options.insert(usine_engine_candle::DEVICE_OPTION.to_owned(), kernels.clone());
                }
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

    /// The spec options of a GGUF file: its path, and its size and modification time, which key the
    /// compiled graph (hashing gigabytes at every start would cost seconds; a file rewritten in place
    /// with the same size in the same nanosecond goes unnoticed, as in ccache's direct mode).
    pub(crate) fn file_options(path: &std::path::Path) -> anyhow::Result<BTreeMap<String, String>> {
        use anyhow::Context as _;
        let metadata = std::fs::metadata(path).with_context(|| format!("the model file {}", path.display()))?;
        let modified = metadata
            .modified()
            .ok()
            .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |since| since.as_nanos());
        Ok(BTreeMap::from([
            (usine_engine_candle::WEIGHTS_OPTION.to_owned(), path.display().to_string()),
            ("weights_stat".to_owned(), format!("{} bytes, modified {modified} ns", metadata.len())),
        ]))
    }
}

/// The remote tier the configuration names, and whether it answers: `None` when `remote` is unset.
pub(crate) async fn remote_status(loaded: &Loaded) -> anyhow::Result<Option<RemoteStatus>> {
    let Some(url) = &loaded.config.remote else { return Ok(None) };
    #[cfg(feature = "remote")]
    {
        let tier = usine_storage::remote::RemoteTier::new(loaded.remote_config(url))?;
        Ok(Some(RemoteStatus { url: tier.url().to_owned(), ping: tier.ping().await }))
    }
    #[cfg(not(feature = "remote"))]
    {
        let _ = url;
        anyhow::bail!("`remote` is set, but this build has no remote tier (feature `remote`)")
    }
}

/// A remote tier's address (its password hidden) and its answer to a `PING`: the round trip, or why not.
pub(crate) struct RemoteStatus {
    pub(crate) url: String,
    pub(crate) ping: Result<std::time::Duration, String>,
}

impl RemoteStatus {
    pub(crate) fn json(&self) -> serde_json::Value {
        match &self.ping {
            Ok(took) => {
                serde_json::json!({ "url": self.url, "reachable": true, "round_trip_seconds": took.as_secs_f64() })
            }
            Err(error) => serde_json::json!({ "url": self.url, "reachable": false, "error": error }),
        }
    }

    pub(crate) fn line(&self) -> String {
        match &self.ping {
            Ok(took) => format!("{} (answers in {})", self.url, crate::output::duration(*took)),
            Err(error) => format!("{} (unreachable: {error}; loads go on without it)", self.url),
        }
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
