//! `SimEngine`: an `Engine` that simulates compute time and nothing else. Compiled graphs are real bytes
//! (checked on load), tokens are real tokens of real text, and every delay goes through `tokio::time`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Mutex, OnceCell};
use usine_engine::{
    BatchStep, CompiledGraph, Detokenizer, Device, Engine, EngineDescriptor, EngineError, GenerationParams,
    LoadedModel, MemoryPlan, ModelSpec, Prefill, Prepared, Progress, ProgressSink, Sequence, Token, TokenId,
    check_graph, check_spec,
};

use crate::pace::Pacer;
use crate::profile::{Profile, Quantization};
use crate::rng::Rng;
use crate::text::{END_OF_SEQUENCE, Language, SimDetokenizer};

/// What makes one simulated engine differ from another.
#[derive(Debug, Clone)]
pub struct Flavor {
    /// The engine's name.
    pub name: &'static str,
    /// Its version.
    pub version: &'static str,
    /// Where it computes.
    pub device: Device,
    /// Its profiles; the first is the default.
    pub profiles: Vec<Profile>,
    /// Its quantizations; the first is the default and the reference speed.
    pub quantizations: Vec<Quantization>,
}

/// Faults to inject, for the tests of the layers above.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Every compile fails (fatal).
    pub compile_fails: bool,
    /// Every load runs out of memory.
    pub load_out_of_memory: bool,
    /// The compute of token `k` fails with a transient error, `n` times in all: across every sequence
    /// of every model this engine loads.
    pub transient_at: Option<(u32, u32)>,
    /// The compute of token `k` fails with a fatal error, every time.
    pub fatal_at: Option<u32>,
    /// The compute of token `k` stalls for this long, every time.
    pub stall_at: Option<(u32, Duration)>,
}

/// How a simulated engine behaves.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimConfig {
    /// Delays vary by up to this fraction around their nominal value (0, the default: exact timelines).
    pub jitter: f64,
    /// Seed of the jitter (the text's seed is the generation's).
    pub seed: u64,
    /// Faults to inject.
    pub faults: Faults,
}

/// A configuration or flavor that cannot make an engine.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Jitter is a fraction of each delay, from 0 to 1.
    #[error("jitter {0} is outside 0..=1")]
    Jitter(f64),
    /// A flavor needs at least one profile and one quantization.
    #[error("flavor `{0}` has no {1}")]
    Empty(&'static str, &'static str),
}

/// A simulated engine of some [`Flavor`].
pub struct SimEngine {
    flavor: Flavor,
    descriptor: EngineDescriptor,
    config: SimConfig,
    language: Arc<Language>,
    transient_left: Arc<AtomicU32>,
}

/// The first bytes of a simulated graph.
const GRAPH_MAGIC: &[u8] = b"usine-sim-graph\n";

/// The schema of the simulated graphs: 2 carries the memory plan in the graph's metadata (1 did not;
/// [`Flavor::upgrade_graph`] brings a graph of schema 1 to 2).
pub const GRAPH_SCHEMA: u32 = 2;

/// The metadata keys of the memory plan, in the order of [`plan_figures`].
const PLAN_KEYS: [&str; 4] = ["weights_bytes", "kv_bytes_per_token", "activation_bytes_per_step", "max_context_tokens"];

fn plan_figures(plan: &MemoryPlan) -> [u64; 4] {
    [plan.weights_bytes, plan.kv_bytes_per_token, plan.activation_bytes_per_step, u64::from(plan.max_context_tokens)]
}

/// Writes `plan` into a graph's metadata.
fn record_plan(metadata: &mut std::collections::BTreeMap<String, String>, plan: &MemoryPlan) {
    for (key, figure) in PLAN_KEYS.iter().zip(plan_figures(plan)) {
        metadata.insert((*key).to_owned(), figure.to_string());
    }
}

/// The memory plan a graph carries; a graph without one (or with a figure that does not parse) is corrupt.
fn recorded_plan(graph: &CompiledGraph) -> Result<MemoryPlan, EngineError> {
    let mut figures = [0_u64; 4];
    for (figure, key) in figures.iter_mut().zip(PLAN_KEYS) {
        *figure =
            graph.metadata.get(key).and_then(|value| value.parse().ok()).ok_or_else(|| EngineError::CorruptGraph {
                message: format!("no memory plan in the graph: `{key}` missing or not a number"),
            })?;
    }
    let [weights_bytes, kv_bytes_per_token, activation_bytes_per_step, context] = figures;
    let max_context_tokens = u32::try_from(context)
        .map_err(|_| EngineError::CorruptGraph { message: format!("a context of {context} tokens") })?;
    Ok(MemoryPlan { weights_bytes, kv_bytes_per_token, activation_bytes_per_step, max_context_tokens })
}

impl Flavor {
    /// The profile and quantization a spec names, if this flavor has them.
    fn find(&self, spec: &ModelSpec) -> Option<(&Profile, &Quantization)> {
        let profile = self.profiles.iter().find(|p| p.name == spec.profile)?;
        let quantization = match &spec.quantization {
            Some(name) => self.quantizations.iter().find(|q| q.name == name)?,
            None => self.quantizations.first()?,
        };
        Some((profile, quantization))
    }

    /// Brings a graph of an older schema to [`GRAPH_SCHEMA`] (the graph store's migration step): schema 1
    /// gains its memory plan, from the profile and quantization its spec names. A graph of a profile this
    /// flavor does not have keeps no plan, and its load fails as corrupt, which compiles it again.
    pub fn upgrade_graph(&self, mut graph: CompiledGraph) -> CompiledGraph {
        if graph.schema == 1 {
            if let Some((profile, quantization)) = self.find(&graph.spec) {
                record_plan(&mut graph.metadata, &profile.shape.memory_plan(quantization));
            }
            graph.schema = 2;
        }
        graph
    }
}

impl SimEngine {
    /// An engine of `flavor` configured by `config`.
    pub fn new(flavor: Flavor, config: SimConfig) -> Result<Self, ConfigError> {
        if !(0.0..=1.0).contains(&config.jitter) {
            return Err(ConfigError::Jitter(config.jitter));
        }
        if flavor.profiles.is_empty() {
            return Err(ConfigError::Empty(flavor.name, "profile"));
        }
        if flavor.quantizations.is_empty() {
            return Err(ConfigError::Empty(flavor.name, "quantization"));
        }
        let descriptor = EngineDescriptor {
            name: flavor.name.into(),
            version: flavor.version.into(),
            graph_schema: GRAPH_SCHEMA,
            device: flavor.device,
            quantizations: flavor.quantizations.iter().map(|q| q.name.to_owned()).collect(),
            profiles: flavor.profiles.iter().map(|p| p.name.to_owned()).collect(),
        };
        let transient_left = Arc::new(AtomicU32::new(config.faults.transient_at.map_or(0, |(_, times)| times)));
        Ok(Self { flavor, descriptor, config, language: Arc::new(Language::corpus()), transient_left })
    }

    /// The profile and quantization a spec names (checked against the descriptor first).
    fn resolve(&self, spec: &ModelSpec) -> Result<(Profile, Quantization), EngineError> {
        check_spec(&self.descriptor, spec)?;
        let (profile, quantization) = self.flavor.find(spec).expect("checked by check_spec");
        Ok((profile.clone(), *quantization))
    }

    /// A pacer for one stream of work, seeded from the engine's seed and `salt`.
    fn pacer(&self, salt: u64) -> Pacer {
        Pacer::new(self.config.seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15), self.config.jitter)
    }
}

impl std::fmt::Debug for SimEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimEngine").field("descriptor", &self.descriptor).field("config", &self.config).finish()
    }
}

/// The graph's bytes: a magic line, the profile and quantization, seeded filler up to the profile's
/// size, and an FNV-1a checksum of all that.
fn graph_bytes(profile: &Profile, quantization: &Quantization, seed: u64) -> Vec<u8> {
    let mut bytes = GRAPH_MAGIC.to_vec();
    bytes.extend_from_slice(format!("{} {}\n", profile.name, quantization.name).as_bytes());
    let mut rng = Rng::new(seed);
    let body = profile.graph_bytes.max(64) - 8;
    while bytes.len() < body {
        let word = rng.next_u64().to_le_bytes();
        let take = word.len().min(body - bytes.len());
        bytes.extend_from_slice(&word[..take]);
    }
    let sum = fnv1a(&bytes);
    bytes.extend_from_slice(&sum.to_le_bytes());
    bytes
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |hash, &byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01B3))
}

/// Checks a graph's bytes: magic, checksum, and the profile and quantization its spec names.
fn check_bytes(graph: &CompiledGraph, profile: &Profile, quantization: &Quantization) -> Result<(), EngineError> {
    let corrupt = |message: &str| Err(EngineError::CorruptGraph { message: message.to_owned() });
    let Some((body, sum)) = graph.bytes.split_last_chunk::<8>() else { return corrupt("too short") };
    if !body.starts_with(GRAPH_MAGIC) {
        return corrupt("not a simulated graph");
    }
    if fnv1a(body) != u64::from_le_bytes(*sum) {
        return corrupt("checksum mismatch");
    }
    let expected = format!("{} {}\n", profile.name, quantization.name);
    if !body[GRAPH_MAGIC.len()..].starts_with(expected.as_bytes()) {
        return corrupt("compiled for another profile or quantization");
    }
    Ok(())
}

#[async_trait]
impl Engine for SimEngine {
    fn descriptor(&self) -> &EngineDescriptor {
        &self.descriptor
    }

    async fn compile(&self, spec: &ModelSpec, progress: &dyn ProgressSink) -> Result<CompiledGraph, EngineError> {
        let (profile, quantization) = self.resolve(spec)?;
        let total = profile.timeline.compile_total();
        let mut pacer = self.pacer(0xC0);
        let mut done = Duration::ZERO;
        for (stage, duration) in &profile.timeline.compile {
            let fraction = done.as_secs_f64() / total.as_secs_f64().max(f64::MIN_POSITIVE);
            progress.report(Progress { stage: (*stage).to_owned(), fraction, eta: Some(total - done) });
            pacer.wait(*duration).await;
            done += *duration;
            if self.config.faults.compile_fails {
                return Err(EngineError::Fatal { message: format!("injected: compile failed in `{stage}`") });
            }
        }
        progress.report(Progress { stage: "done".into(), fraction: 1.0, eta: Some(Duration::ZERO) });
        let mut metadata = std::collections::BTreeMap::new();
        metadata.insert("profile".to_owned(), profile.name.to_owned());
        metadata.insert("quantization".to_owned(), quantization.name.to_owned());
        metadata.insert("source".to_owned(), profile.source.to_owned());
        record_plan(&mut metadata, &profile.shape.memory_plan(&quantization));
        Ok(CompiledGraph {
            engine: self.descriptor.name.clone(),
            engine_version: self.descriptor.version.clone(),
            schema: self.descriptor.graph_schema,
            spec: spec.clone(),
            metadata,
            bytes: graph_bytes(&profile, &quantization, self.config.seed),
            raw: usine_engine::RawSection::default(),
        })
    }

    fn memory_plan(&self, graph: &CompiledGraph) -> Result<MemoryPlan, EngineError> {
        check_graph(&self.descriptor, graph)?;
        self.resolve(&graph.spec)?;
        recorded_plan(graph)
    }

    async fn load(&self, graph: &CompiledGraph) -> Result<Arc<dyn LoadedModel>, EngineError> {
        check_graph(&self.descriptor, graph)?;
        let (profile, quantization) = self.resolve(&graph.spec)?;
        check_bytes(graph, &profile, &quantization)?;
        let plan = recorded_plan(graph)?;
        self.pacer(0x10AD).wait(profile.timeline.load).await;
        if self.config.faults.load_out_of_memory {
            return Err(EngineError::OutOfMemory { needed: plan.weights_bytes, available: plan.weights_bytes / 2 });
        }
        // Whole milliseconds, tokio's timer resolution, so that timelines stay exact on paused time.
        let step_ms = (profile.timeline.compute.as_secs_f64() * 1e3 * quantization.step_factor).round();
        let per_sequence = profile.timeline.batch.per_sequence.mul_f64(quantization.step_factor);
        Ok(Arc::new(SimModel {
            step: Duration::from_secs_f64(step_ms / 1e3),
            per_sequence,
            profile,
            plan,
            device: self.flavor.device,
            config: self.config.clone(),
            language: Arc::clone(&self.language),
            transient_left: Arc::clone(&self.transient_left),
            warm: OnceCell::new(),
            hardware: Arc::new(Mutex::new(())),
        }))
    }
}

struct SimModel {
    profile: Profile,
    plan: MemoryPlan,
    device: Device,
    /// The compute stage of one step, with this quantization.
    step: Duration,
    /// What each sequence after the first adds to a batched step, with this quantization.
    per_sequence: Duration,
    config: SimConfig,
    language: Arc<Language>,
    transient_left: Arc<AtomicU32>,
    /// Set once the first-use cost is paid; a wait dropped half way leaves it unset.
    warm: OnceCell<()>,
    /// The device (or, for a CPU flavor, the cores) that the model's sequences take turns on.
    hardware: Arc<Mutex<()>>,
}

impl SimModel {
    /// Pays the first-use cost once; callers that come while it is being paid wait for it too.
    async fn first_use(&self) {
        self.warm
            .get_or_init(|| async {
                Pacer::new(self.config.seed, self.config.jitter).wait(self.profile.timeline.first_use).await;
            })
            .await;
    }
}

#[async_trait]
impl LoadedModel for SimModel {
    fn memory_plan(&self) -> MemoryPlan {
        self.plan
    }

    fn tokenize(&self, text: &str) -> Vec<TokenId> {
        self.language.tokenize(text)
    }

    fn detokenizer(&self) -> Box<dyn Detokenizer> {
        Box::new(SimDetokenizer::new(Arc::clone(&self.language)))
    }

    async fn warm_up(&self) -> Result<(), EngineError> {
        self.first_use().await;
        Ok(())
    }

    fn max_batch(&self) -> usize {
        self.profile.timeline.batch.max.max(1)
    }

    /// One turn on the device for all: a step's compute, the profile's share for each sequence after
    /// the first, and the longest stall injected among them (paced by the first sequence's device).
    async fn compute_batch(&self, steps: Vec<BatchStep>) -> Vec<Result<Token, EngineError>> {
        let mut own = Vec::with_capacity(steps.len());
        for step in &steps {
            let any: &dyn std::any::Any = &*step.sequence;
            match any.downcast_ref::<SimSequence>() {
                Some(sequence) if sequence.model == Arc::as_ptr(&self.hardware).cast::<()>() as usize => {
                    own.push(sequence);
                }
                _ => {
                    let message = "a batched step of another model's sequence".to_owned();
                    return steps.iter().map(|_| Err(EngineError::Fatal { message: message.clone() })).collect();
                }
            }
        }
        let Some(first) = own.first() else { return Vec::new() };
        let stall = steps
            .iter()
            .zip(&own)
            .filter_map(|(step, sequence)| {
                sequence.faults.stall_at.filter(|&(at, _)| at == step.prepared.step()).map(|(_, stall)| stall)
            })
            .max()
            .unwrap_or_default();
        let others = u32::try_from(steps.len() - 1).unwrap_or(u32::MAX);
        {
            let _device = self.hardware.lock().await;
            first.device.lock().await.wait(self.step + self.per_sequence * others + stall).await;
        }
        steps.iter().zip(own).map(|(step, sequence)| sequence.draw(step.prepared.step(), step.previous)).collect()
    }

    async fn prefill(&self, input: Prefill<'_>) -> Result<Box<dyn Sequence>, EngineError> {
        let (prompt, generated, params) = (input.prompt(), input.generated(), input.params());
        self.first_use().await;
        let seed = self.config.seed ^ params.seed;
        let mut pacer = Pacer::new(seed, self.config.jitter);
        let tokens = u32::try_from(prompt.len() + generated.len()).unwrap_or(u32::MAX);
        {
            let _hardware = self.hardware.lock().await;
            pacer.wait(self.profile.timeline.prefill_per_token * tokens).await;
        }
        // On a CPU both stages are one stream of work on the same cores: one pacer, so that the timer's
        // overshoot in one stage is paid back in the other. On a GPU each stage keeps its own pace.
        let device = Arc::new(Mutex::new(pacer));
        let cpu = match self.device {
            Device::Gpu => Arc::new(Mutex::new(Pacer::new(seed ^ 1, self.config.jitter))),
            Device::Cpu => Arc::clone(&device),
        };
        Ok(Box::new(SimSequence {
            prepare: self.profile.timeline.prepare,
            step: self.step,
            params: params.clone(),
            faults: self.config.faults.clone(),
            language: Arc::clone(&self.language),
            transient_left: Arc::clone(&self.transient_left),
            hardware: Arc::clone(&self.hardware),
            model: Arc::as_ptr(&self.hardware).cast::<()>() as usize,
            prepare_on_hardware: self.device == Device::Cpu,
            cpu,
            device,
        }))
    }
}

struct SimSequence {
    prepare: Duration,
    step: Duration,
    params: GenerationParams,
    faults: Faults,
    language: Arc<Language>,
    transient_left: Arc<AtomicU32>,
    /// The model's device: compute stages of all its sequences take turns on it.
    hardware: Arc<Mutex<()>>,
    /// Which model's it is (its device's address).
    model: usize,
    /// On a CPU engine the prepare stage needs the same cores, so it takes its turn too; on a GPU engine
    /// it runs on the CPU beside the device's work.
    prepare_on_hardware: bool,
    cpu: Arc<Mutex<Pacer>>,
    device: Arc<Mutex<Pacer>>,
}

#[async_trait]
impl Sequence for SimSequence {
    async fn prepare(&self, step: u32) -> Result<Prepared, EngineError> {
        let _cores = if self.prepare_on_hardware { Some(self.hardware.lock().await) } else { None };
        self.cpu.lock().await.wait(self.prepare).await;
        Ok(Prepared::new(step, ()))
    }

    async fn compute(&self, prepared: Prepared, previous: Option<TokenId>) -> Result<Token, EngineError> {
        let step = prepared.step();
        let stall = self.faults.stall_at.filter(|&(at, _)| at == step).map_or(Duration::ZERO, |(_, d)| d);
        {
            let _device = self.hardware.lock().await;
            self.device.lock().await.wait(self.step + stall).await;
        }
        self.draw(step, previous)
    }
}

impl SimSequence {
    /// The token of `step` after `previous`, or the fault injected there.
    fn draw(&self, step: u32, previous: Option<TokenId>) -> Result<Token, EngineError> {
        if self.faults.fatal_at == Some(step) {
            return Err(EngineError::Fatal { message: format!("injected: fatal error at token {step}") });
        }
        if self.faults.transient_at.is_some_and(|(at, _)| at == step)
            && self.transient_left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(1)).is_ok()
        {
            return Err(EngineError::Transient { message: format!("injected: transient error at token {step}") });
        }
        // The draw of a step depends on the seed and the step alone: a resumed sequence, or a pipelined
        // one, draws what an unbroken one would. A model says something before it ends its answer.
        let mut rng = Rng::new(self.params.seed ^ u64::from(step).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let params = &self.params;
        let id = self.language.sample(previous, step > 0, params.temperature, params.top_p, params.top_k, &mut rng);
        Ok(Token { id, end_of_sequence: id == END_OF_SEQUENCE })
    }
}
