#![doc = include_str!("../README.md")]

mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
mod generate;
mod gguf;
mod graph;
mod kernel;
mod matrix;
mod model;
#[cfg(feature = "cuda")]
mod on_gpu;
mod sample;
mod shape;
mod team;
pub mod tokenizer;
pub mod tolerance;
// Also in the crate's own tests, so that `cargo test` checks the training code that made the
// committed weights.
#[cfg(any(test, feature = "train"))]
pub mod train;

use std::sync::Arc;

use async_trait::async_trait;
use usine_engine::{
    BatchStep, CompiledGraph, Detokenizer, Device, Engine, EngineDescriptor, EngineError, Fill, GenerationParams,
    LoadedModel, MemoryPlan, Message, ModelSpec, PassOutcome, Prefill, Prepared, Progress, ProgressSink, Sequence,
    Token, TokenId, check_graph, check_spec, render_plain,
};

pub use config::{Architecture, Config};
pub use generate::{Preset, TYPES, presets, random_gguf, random_gguf_with};
pub use gguf::{QUANTIZATIONS, random_weights, source_shape};
pub use kernel::ISA_VARIABLE;
pub use shape::{END_OF_SEQUENCE, Shape, VOCAB};

use crate::config::{ModelFile, Refused};
use crate::model::{Arena, KvCache, Model};

/// Tokens per kv block of a paged sequence: vLLM's default.
const KV_BLOCK_TOKENS: u32 = 16;
use crate::team::Team;
use crate::tokenizer::{Packed, Tokenizer, Vocabulary};

/// The engine's name, as model specs name it.
pub const NAME: &str = "candle";
/// The spec option naming the source weights: a safetensors file, or `builtin:NAME` for weights the
/// program holds in memory (see [`CandleEngine::with_builtin`]).
///
/// A `tokenizer.json` beside a safetensors file (Hugging Face's, byte-level BPE, as many tokens as the
/// weights' embeddings), and the `tokenizer_config.json` beside it (start and end tokens, chat template),
/// are the model's tokenizer; without them, the bytes. The graph is stored under the spec's key: a
/// program that changes those files gives the spec an option that says so (usine's CLI keys a file by
/// its size and time).
pub const WEIGHTS_OPTION: &str = "weights";
/// The prefix of a [`WEIGHTS_OPTION`] that names built-in weights.
pub const BUILTIN_PREFIX: &str = "builtin:";
/// The spec option holding the weights' BLAKE3 digest (hex): when set, compile refuses other weights.
pub const WEIGHTS_DIGEST_OPTION: &str = "weights_blake3";
/// The spec option capping the context, in tokens (default: the model's own).
pub const CONTEXT_OPTION: &str = "context";
/// The spec option naming the card a graph is compiled for ([`CandleEngine::kernels_key`]): its
/// kernels are in the graph, and the key of a graph for another card differs.
pub const DEVICE_OPTION: &str = "device";
/// The one profile: the CPU.
pub const PROFILE: &str = "cpu";

/// Where the engine runs its forward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// The first NVIDIA card where the build has the `cuda` feature and the machine a card and its
    /// driver; the CPU otherwise.
    #[default]
    Auto,
    /// The CPU's cores.
    Cpu,
    /// The NVIDIA card of this ordinal (feature `cuda`).
    Cuda(usize),
}

impl std::str::FromStr for Target {
    type Err = String;

    /// `auto`, `cpu`, `cuda` (card 0) or `cuda:N`.
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|ordinal| ordinal.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("`{other}`: expected auto, cpu, cuda or cuda:N")),
        }
    }
}

/// The candle engine.
pub struct CandleEngine {
    descriptor: EngineDescriptor,
    /// The threads its forward passes use.
    team: Arc<Team>,
    /// The card its passes run on, if any.
    #[cfg(feature = "cuda")]
    card: Option<cuda::Card>,
    /// Weights held by the program (a binary that ships its model), by name.
    builtin: std::collections::BTreeMap<String, &'static [u8]>,
}

impl std::fmt::Debug for CandleEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandleEngine").field("threads", &self.team.threads()).finish_non_exhaustive()
    }
}

/// Threads of the forward pass when none is asked for, on a machine with as many cores: two. On this
/// project's two-core machine a second thread makes decoding 1.6 to 1.9 times as fast (17M and 58M
/// parameters, Q8_0 and Q4_0; `cargo bench -p usine-engine-candle`); more threads than cores only
/// spin. See [`default_threads`].
pub const DEFAULT_THREADS: usize = 2;

/// [`DEFAULT_THREADS`], or fewer on a machine with fewer cores.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get).min(DEFAULT_THREADS)
}

/// Most threads an engine takes.
pub const MAX_THREADS: usize = 256;

impl Default for CandleEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl CandleEngine {
    /// The engine, with [`default_threads`].
    pub fn new() -> Self {
        Self::with_threads(default_threads()).expect("the default thread count is valid")
    }

    /// The engine, its forward passes on `threads` threads (1 to [`MAX_THREADS`]) of the CPU.
    pub fn with_threads(threads: usize) -> Result<Self, EngineError> {
        Self::with_target(threads, Target::Cpu)
    }

    /// The engine, its forward passes on `target` (its CPU work on `threads` threads). A card asked
    /// for that this build or machine lacks is [`EngineError::Unsupported`]; [`Target::Auto`] then
    /// takes the CPU.
    pub fn with_target(threads: usize, target: Target) -> Result<Self, EngineError> {
        let engine = Self::cpu(threads)?;
        let unavailable = |why: String| EngineError::Unsupported {
            engine: NAME.to_owned(),
            what: "device",
            name: format!("{target:?}"),
            known: vec![why],
        };
        match target {
            Target::Cpu => {}
            #[cfg(not(feature = "cuda"))]
            Target::Auto => {}
            #[cfg(not(feature = "cuda"))]
            Target::Cuda(_) => return Err(unavailable("cpu (this build has no `cuda` feature)".to_owned())),
            #[cfg(feature = "cuda")]
            Target::Auto | Target::Cuda(_) => {
                let ordinal = if let Target::Cuda(ordinal) = target { ordinal } else { 0 };
                match cuda::detect(ordinal) {
                    Some(card) => {
                        let mut engine = engine;
                        engine.descriptor.device = Device::Gpu;
                        engine.card = Some(card);
                        return Ok(engine);
                    }
                    None if target == Target::Auto => {}
                    None => return Err(unavailable(format!("cpu (no CUDA card {ordinal} or driver on this machine)"))),
                }
            }
        }
        Ok(engine)
    }

    /// The spec option ([`DEVICE_OPTION`]) of a graph compiled for the engine's card: the name of the
    /// kernels it holds (architecture, driver, source). `None` on the CPU.
    pub fn kernels_key(&self) -> Option<String> {
        #[cfg(feature = "cuda")]
        return self.card.as_ref().map(cuda::Card::kernels_name);
        #[cfg(not(feature = "cuda"))]
        None
    }

    /// The card the engine's passes run on (feature `cuda`), described.
    pub fn card(&self) -> Option<String> {
        #[cfg(feature = "cuda")]
        return self.card.as_ref().map(ToString::to_string);
        #[cfg(not(feature = "cuda"))]
        None
    }

    fn cpu(threads: usize) -> Result<Self, EngineError> {
        if !(1..=MAX_THREADS).contains(&threads) {
            return Err(EngineError::InvalidParams {
                name: "threads",
                value: threads.to_string(),
                limit: format!("1..={MAX_THREADS}"),
            });
        }
        let team = Team::new(threads)?;
        Ok(Self {
            descriptor: EngineDescriptor {
                name: NAME.into(),
                version: env!("CARGO_PKG_VERSION").into(),
                graph_schema: graph::SCHEMA,
                device: Device::Cpu,
                quantizations: QUANTIZATIONS.iter().map(|(name, _)| (*name).to_owned()).collect(),
                profiles: vec![PROFILE.into()],
            },
            team: Arc::new(team),
            #[cfg(feature = "cuda")]
            card: None,
            builtin: std::collections::BTreeMap::new(),
        })
    }

    /// The engine, also offering `weights` (safetensors bytes) as `builtin:NAME`: a program that
    /// embeds its model compiles it without writing it to a file first.
    #[must_use]
    pub fn with_builtin(mut self, name: &str, weights: &'static [u8]) -> Self {
        self.builtin.insert(name.to_owned(), weights);
        self
    }
}

/// The kernels loads use: the best this CPU runs (`avx512vnni`, `avx2`, else `portable`), or the lower
/// set [`ISA_VARIABLE`] names, read once per process. A set this CPU lacks, or an unknown name, is
/// [`EngineError::InvalidParams`], which every load then returns.
pub fn kernels() -> Result<&'static str, EngineError> {
    kernel::Isa::chosen().map(kernel::Isa::name)
}

/// One sequence of a GGUF model, run a token at a time with its logits out: for checks against another
/// implementation (`cargo xtask parity`) and for tools. Applications use [`CandleEngine`] through the
/// `Engine` trait.
pub struct Decoder {
    model: Model,
    team: Team,
    cache: KvCache,
    position: usize,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").field("config", &self.model.config).field("position", &self.position).finish()
    }
}

impl Decoder {
    /// The model in GGUF `bytes`, on `threads` threads, for sequences of up to `capacity` tokens.
    pub fn new(bytes: &[u8], threads: usize, capacity: usize) -> Result<Self, EngineError> {
        kernels()?;
        let file = ModelFile::read(bytes).map_err(unsupported)?;
        let team = Team::new(threads.clamp(1, MAX_THREADS))?;
        let model = Model::new(&file, file.config.context, team.tuner()).map_err(unsupported)?;
        let cache = KvCache::new(&model.config, capacity.clamp(1, model.config.context))?;
        Ok(Self { model, team, cache, position: 0 })
    }

    /// The model's configuration.
    pub fn config(&self) -> &Config {
        &self.model.config
    }

    /// Runs `token` at the next position and returns the logits of the token after it.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>, EngineError> {
        let logits = self.model.forward(&self.team, Some(token), self.position, &self.cache)?;
        self.position += 1;
        Ok(logits)
    }
}

/// The vocabulary of the `tokenizer.json` (and `tokenizer_config.json`) beside the weights file `path`,
/// if there is one.
fn beside(path: &std::path::Path) -> Result<Option<Vocabulary>, EngineError> {
    let read = |name: &str| -> Result<Option<String>, EngineError> {
        let file = path.with_file_name(name);
        match std::fs::read_to_string(&file) {
            Ok(text) => Ok(Some(text)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(EngineError::Fatal { message: format!("reading {}: {error}", file.display()) }),
        }
    };
    let Some(tokenizer) = read("tokenizer.json")? else { return Ok(None) };
    let config = read("tokenizer_config.json")?;
    tokenizer::from_tokenizer_json(&tokenizer, config.as_deref())
        .map(Some)
        .map_err(|message| EngineError::UnsupportedModel { message })
}

/// The tokenizer of the GGUF file `bytes` (read as a model: a file usine cannot run is refused).
pub fn tokenizer_of(bytes: &[u8]) -> Result<Tokenizer, EngineError> {
    let file = ModelFile::read(bytes).map_err(unsupported)?;
    Ok(Tokenizer::new(file.vocabulary))
}

/// A compiled graph that does not read: damaged, or of another layout (compile again).
fn corrupt(message: String) -> EngineError {
    EngineError::CorruptGraph { message }
}

/// The compiled graph of the model in `file`: its table and raw section (`graph.rs`).
fn repack(file: &ModelFile<'_>) -> Result<(Vec<u8>, Vec<u8>), EngineError> {
    // A team of one: the model is built to be written, never run.
    let team = Team::new(1)?;
    let model = Model::new(file, file.config.context, team.tuner()).map_err(unsupported)?;
    let vocabulary = Packed::serialize(&file.vocabulary).map_err(|message| EngineError::Fatal { message })?;
    Ok(model.write(&vocabulary))
}

/// A source file that is not a model this engine runs.
fn unsupported(refused: Refused) -> EngineError {
    EngineError::UnsupportedModel { message: refused.0 }
}

/// The context cap a spec sets ([`CONTEXT_OPTION`]), if any.
fn context_cap(spec: &ModelSpec) -> Result<Option<usize>, EngineError> {
    spec.options
        .get(CONTEXT_OPTION)
        .map(|value| match value.parse::<usize>() {
            Ok(tokens) if tokens > 0 => Ok(tokens),
            _ => Err(EngineError::InvalidParams {
                name: "context",
                value: value.clone(),
                limit: "a number of tokens, 1 or more".to_owned(),
            }),
        })
        .transpose()
}

/// usine's own byte-level model in safetensors `weights`, its matrices quantized to `quantization` (one
/// of [`QUANTIZATIONS`]), as a GGUF file that llama.cpp runs too (`cargo xtask bench-peers`).
pub fn gguf_from_safetensors(weights: &[u8], quantization: &str) -> Result<Vec<u8>, EngineError> {
    let dtype =
        QUANTIZATIONS.iter().find(|(name, _)| *name == quantization).map(|(_, dtype)| *dtype).ok_or_else(|| {
            EngineError::InvalidParams {
                name: "quantization",
                value: quantization.to_owned(),
                limit: QUANTIZATIONS.map(|(name, _)| name).join(", "),
            }
        })?;
    gguf::compile(weights, dtype, None, &usine_engine::NoProgress)
}

/// What a model file holds, for people (`usine models`) and for a compiled graph's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    /// The architecture.
    pub architecture: Architecture,
    /// Parameters in all.
    pub params: usize,
    /// The tensor type of the matrices (`q8_0`), or the types and their counts where they differ
    /// (`q4_k×12 q6_k×5 q8_0×1`).
    pub quantization: String,
    /// The context the model was trained for, in tokens.
    pub context: usize,
    /// The tokenizer, and whether a chat template comes with it (`gpt2 tokenizer (qwen2), chat template`).
    pub tokenizer: String,
}

/// What the GGUF file in `bytes` holds (its header and the tensors' places; no weight is read), or
/// why it is not a model this engine runs.
pub fn describe_file(bytes: &[u8]) -> Result<Described, EngineError> {
    let file = ModelFile::read(bytes).map_err(unsupported)?;
    Ok(describe(&file))
}

fn describe(file: &ModelFile<'_>) -> Described {
    let matrices: Vec<_> =
        file.types.iter().filter(|(dtype, _)| *dtype != candle_core::quantized::GgmlDType::F32).collect();
    let name = config::type_name;
    let quantization = match matrices.as_slice() {
        [] => "f32".to_owned(),
        [(dtype, _)] => name(*dtype),
        several => {
            several.iter().map(|(dtype, count)| format!("{}×{count}", name(*dtype))).collect::<Vec<_>>().join(" ")
        }
    };
    Described {
        architecture: file.config.architecture,
        params: file.config.params(),
        quantization,
        context: file.config.context,
        tokenizer: file.vocabulary.describe(),
    }
}

/// Runs CPU-bound work on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, EngineError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| EngineError::Fatal { message: format!("the engine's worker failed: {error}") })?
}

#[async_trait]
impl Engine for CandleEngine {
    fn descriptor(&self) -> &EngineDescriptor {
        &self.descriptor
    }

    fn memory_plan(&self, graph: &CompiledGraph) -> Result<MemoryPlan, EngineError> {
        check_graph(&self.descriptor, graph)?;
        let reader = graph::Reader::read(&graph.bytes, &graph.raw).map_err(corrupt)?;
        Ok(model::plan_of(&reader.config, reader.weight_bytes(), context_cap(&graph.spec)?, self.team.threads()))
    }

    async fn compile(&self, spec: &ModelSpec, progress: &dyn ProgressSink) -> Result<CompiledGraph, EngineError> {
        check_spec(&self.descriptor, spec)?;
        let quantization = spec.quantization.clone().unwrap_or_else(|| QUANTIZATIONS[0].0.to_owned());
        let dtype = QUANTIZATIONS.iter().find(|(name, _)| *name == quantization).expect("checked by check_spec").1;
        let path = spec.options.get(WEIGHTS_OPTION).cloned().ok_or_else(|| EngineError::InvalidParams {
            name: "weights",
            value: "(unset)".into(),
            limit: format!("the spec option `{WEIGHTS_OPTION}`: a safetensors file"),
        })?;
        let expected_digest = spec.options.get(WEIGHTS_DIGEST_OPTION).cloned();
        let asked_quantization = spec.quantization.clone();
        let builtin = match path.strip_prefix(BUILTIN_PREFIX) {
            None => None,
            Some(name) => Some(*self.builtin.get(name).ok_or_else(|| EngineError::InvalidParams {
                name: "weights",
                value: path.clone(),
                limit: format!("built-in weights: {:?}", self.builtin.keys().collect::<Vec<_>>()),
            })?),
        };
        // The compile reports from its thread through a channel; the sink is reported to from here.
        let (sender, mut reports) = tokio::sync::mpsc::unbounded_channel::<Progress>();
        let work = blocking(move || {
            let bytes =
                match builtin {
                    Some(bytes) => std::borrow::Cow::Borrowed(bytes),
                    None => std::borrow::Cow::Owned(std::fs::read(&path).map_err(|error| EngineError::Fatal {
                        message: format!("reading the weights {path}: {error}"),
                    })?),
                };
            let digest = blake3::hash(&bytes).to_hex().to_string();
            if let Some(expected) = &expected_digest
                && *expected != digest
            {
                // The graph would be stored under the key of other weights.
                return Err(EngineError::Fatal {
                    message: format!(
                        "the weights {path} are not those the spec names (blake3 {digest}, not {expected})"
                    ),
                });
            }
            if bytes.starts_with(b"GGUF") {
                if let Some(asked) = asked_quantization {
                    return Err(EngineError::InvalidParams {
                        name: "quantization",
                        value: asked,
                        limit: "none for a GGUF file: it keeps its own tensor types".to_owned(),
                    });
                }
                let file = ModelFile::read(&bytes).map_err(unsupported)?;
                let described = describe(&file);
                return Ok((repack(&file)?, digest, described));
            }
            let sink = move |progress: Progress| {
                let _ = sender.send(progress);
            };
            let vocabulary = if builtin.is_none() { beside(std::path::Path::new(&path))? } else { None };
            if let Some(vocabulary) = &vocabulary
                && vocabulary.tokens.len() != crate::shape::VOCAB
            {
                return Err(EngineError::UnsupportedModel {
                    message: format!(
                        "the tokenizer.json beside {path} holds {} tokens; the weights' embeddings hold {}",
                        vocabulary.tokens.len(),
                        crate::shape::VOCAB
                    ),
                });
            }
            let gguf = gguf::compile(&bytes, dtype, vocabulary.as_ref(), &sink)?;
            let file = ModelFile::read(&gguf).map_err(|refused| EngineError::Fatal { message: refused.0 })?;
            let gguf = repack(&file)?;
            let shape = source_shape(&bytes)?;
            let described = Described {
                architecture: Architecture::Llama,
                params: shape.params(),
                quantization: quantization.clone(),
                context: shape.max_context,
                tokenizer: file.vocabulary.describe(),
            };
            Ok((gguf, digest, described))
        });
        tokio::pin!(work);
        let ((table, raw), digest, described) = loop {
            tokio::select! {
                Some(report) = reports.recv() => progress.report(report),
                done = &mut work => break done?,
            }
        };
        while let Ok(report) = reports.try_recv() {
            progress.report(report);
        }
        #[cfg(feature = "cuda")]
        let (table, raw) = match self.card.clone() {
            None => (table, raw),
            Some(card) => {
                blocking(move || {
                    let (mut table, mut raw) = (table, raw);
                    graph::append_bytes(&mut table, &mut raw, &card.kernels_name(), &cuda::compile(&card)?);
                    Ok((table, raw))
                })
                .await?
            }
        };
        let mut metadata = std::collections::BTreeMap::new();
        metadata.insert("source_blake3".to_owned(), digest);
        metadata.insert("architecture".to_owned(), described.architecture.name().to_owned());
        metadata.insert("parameters".to_owned(), described.params.to_string());
        metadata.insert("quantization".to_owned(), described.quantization);
        metadata.insert("context".to_owned(), described.context.to_string());
        Ok(CompiledGraph {
            engine: self.descriptor.name.clone(),
            engine_version: self.descriptor.version.clone(),
            schema: self.descriptor.graph_schema,
            spec: spec.clone(),
            metadata,
            bytes: table,
            raw: usine_engine::RawSection::new(raw),
        })
    }

    async fn load(&self, graph: &CompiledGraph) -> Result<Arc<dyn LoadedModel>, EngineError> {
        check_graph(&self.descriptor, graph)?;
        let plan = self.memory_plan(graph)?;
        kernels()?; // a refused `USINE_ISA`, before any matrix is built
        let tuner = self.team.tuner();
        let context = plan.max_context_tokens as usize;
        let reader = graph::Reader::read(&graph.bytes, &graph.raw).map_err(corrupt)?;
        // Pointing the matrices into the raw section takes microseconds: no blocking thread.
        let model = Model::from_graph(&reader, context, tuner).map_err(corrupt)?;
        // The vocabulary is read in place and checked now; made into a tokenizer at its first use.
        let vocabulary = reader.bytes_range("vocabulary").map_err(corrupt)?;
        let end_of_generation = read_vocabulary(&graph.raw, &vocabulary)
            .and_then(|packed| packed.check(model.config.vocab))
            .map_err(|error| corrupt(format!("the vocabulary: {error}")))?
            .into();
        let arena = Arc::new(Arena::new(&model.config, KV_BLOCK_TOKENS as usize));
        let model = CandleModel {
            arena,
            model: Arc::new(model),
            plan,
            team: Arc::clone(&self.team),
            vocabulary: (graph.raw.clone(), vocabulary),
            tokenizer: std::sync::OnceLock::new(),
            template: std::sync::OnceLock::new(),
            end_of_generation,
        };
        #[cfg(feature = "cuda")]
        if let Some(card) = self.card.clone() {
            // The kernels the compile stored for this card, or (a graph compiled elsewhere) made now.
            let stored =
                reader.bytes_range(&card.kernels_name()).ok().map(|range| graph.raw.as_bytes()[range].to_vec());
            let host = Arc::clone(&model.model);
            let gpu = blocking(move || {
                let cubin = match stored {
                    Some(cubin) => cubin,
                    None => cuda::compile(&card)?,
                };
                cuda::GpuModel::new(cuda::Gpu::open(card.ordinal, cubin)?, host)
            })
            .await?;
            return Ok(Arc::new(on_gpu::CudaModel { base: model, gpu: Arc::new(gpu) }));
        }
        Ok(Arc::new(model))
    }
}

struct CandleModel {
    model: Arc<Model>,
    /// The kv storage of its paged sequences.
    arena: Arc<Arena>,
    plan: MemoryPlan,
    team: Arc<Team>,
    /// Where the vocabulary lies (checked at the load), for the tokenizer built at its first use (or
    /// the warm-up), not at the load: a real vocabulary's maps take 40 to 50 ms, a load of the weights
    /// about 20.
    vocabulary: (usine_engine::RawSection, std::ops::Range<usize>),
    tokenizer: std::sync::OnceLock<Arc<Tokenizer>>,
    /// The chat template, parsed at its first use (`None`: the model has none).
    template: std::sync::OnceLock<Option<Result<tokenizer::Template, tokenizer::ChatError>>>,
    end_of_generation: Arc<[TokenId]>,
}

impl CandleModel {
    fn tokenizer(&self) -> &Arc<Tokenizer> {
        self.tokenizer.get_or_init(|| {
            let (raw, range) = &self.vocabulary;
            let packed = read_vocabulary(raw, range).expect("read once at the load, and the bytes are immutable");
            Arc::new(Tokenizer::new(packed.unpack()))
        })
    }

    fn template(&self) -> Option<&Result<tokenizer::Template, tokenizer::ChatError>> {
        self.template
            .get_or_init(|| {
                let vocabulary = self.tokenizer().vocabulary();
                let source = vocabulary.chat_template.as_deref()?;
                let (bos, eos) = (vocabulary.text(vocabulary.bos), vocabulary.text(vocabulary.eos));
                Some(tokenizer::Template::new(source, bos, eos))
            })
            .as_ref()
    }
}

#[async_trait]
impl LoadedModel for CandleModel {
    fn memory_plan(&self) -> MemoryPlan {
        self.plan
    }

    /// The prompt's tokens as llama.cpp's `llama_tokenize` gives them with `add_special` and
    /// `parse_special`: the start token if the vocabulary adds one, special tokens' texts as those
    /// tokens.
    fn tokenize(&self, text: &str) -> Vec<TokenId> {
        self.tokenizer().encode(text, true, true)
    }

    fn detokenizer(&self) -> Box<dyn Detokenizer> {
        Box::new(self.tokenizer().stream())
    }

    /// Rendered by the model's chat template when it has one (see [`tokenizer::chat`]); otherwise
    /// [`render_plain`], whose text is all plain (no special token parsed).
    fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<TokenId>, EngineError> {
        let tokenizer = self.tokenizer();
        match self.template() {
            None => Ok(tokenizer.encode(&render_plain(messages), true, false)),
            Some(Err(error)) => Err(chat_error(error.clone())),
            Some(Ok(template)) => {
                let rendered = template.render(messages, true, tokenizer.guard()).map_err(chat_error)?;
                Ok(tokenizer.encode_chat(&rendered))
            }
        }
    }

    /// Its sequences' kv in blocks of the model's arena, where the executor hands them out.
    fn kv_block_tokens(&self) -> Option<u32> {
        Some(KV_BLOCK_TOKENS)
    }

    /// As many sequences as a pass's activations cover (the plan counts a prompt's chunk of tokens).
    fn max_batch(&self) -> usize {
        model::PREFILL_CHUNK
    }

    /// One pass for all (a single step takes the one-token pass, the fastest alone); a failed pass fails
    /// each step with its error.
    async fn compute_batch(&self, steps: Vec<BatchStep>) -> Vec<Result<Token, EngineError>> {
        if steps.len() == 1 {
            return usine_engine::compute_each(steps).await;
        }
        match self.compute_together(&[], &steps).await {
            Ok(tokens) => tokens.into_iter().map(Ok).collect(),
            Err(error) => steps.iter().map(|_| Err(error.clone())).collect(),
        }
    }

    /// Builds the tokenizer and parses the chat template, so that the first request does not.
    async fn warm_up(&self) -> Result<(), EngineError> {
        let tokenizer = self.tokenizer();
        let _ = tokenizer.encode("", false, true); // builds the special tokens' finder
        if self.template().is_some() {
            let _ = tokenizer.guard();
        }
        Ok(())
    }

    async fn prefill(&self, input: Prefill<'_>) -> Result<Box<dyn Sequence>, EngineError> {
        self.start(input, true).await
    }

    /// The sequence with its kv-cache, its context computed by [`compute_pass`](Self::compute_pass).
    async fn open(&self, input: Prefill<'_>) -> Result<Box<dyn Sequence>, EngineError> {
        self.start(input, false).await
    }

    fn max_pass_tokens(&self) -> usize {
        model::PREFILL_CHUNK
    }

    /// Fills and steps in one pass: every product reads each weight once for all their tokens.
    async fn compute_pass(&self, fills: Vec<Fill>, steps: Vec<BatchStep>) -> PassOutcome {
        if fills.is_empty() {
            return (Vec::new(), self.compute_batch(steps).await);
        }
        let together = self.compute_together(&fills, &steps).await;
        pass_outcome(fills.len(), steps.len(), together)
    }
}

/// A pass's outcome for its `fills` and `steps` from one result for all: each its own, or the error for
/// each (a pass fails whole).
pub(crate) fn pass_outcome(fills: usize, steps: usize, together: Result<Vec<Token>, EngineError>) -> PassOutcome {
    match together {
        Ok(tokens) => (vec![Ok(()); fills], tokens.into_iter().map(Ok).collect()),
        Err(error) => (vec![Err(error.clone()); fills], vec![Err(error); steps]),
    }
}

impl CandleModel {
    /// A sequence of `input` with its kv-cache, the context but its last token (the first step's input)
    /// computed now if `now`, else left to passes ([`Sequence::unfilled`]); tokens the paged blocks
    /// hold already are not computed again.
    async fn start(&self, input: Prefill<'_>, now: bool) -> Result<Box<dyn Sequence>, EngineError> {
        let (prompt, generated, params) = (input.prompt(), input.generated(), input.params());
        debug_assert!(input.capacity() <= self.plan.max_context_tokens as usize, "checked against another plan");
        // An empty prompt starts from the end-of-sequence token, which takes position 0; a resume of it
        // must run that token too, or every position after would shift.
        let start = if prompt.is_empty() { vec![self.model.start_token()] } else { Vec::new() };
        let context: Vec<TokenId> = start.iter().chain(prompt).chain(generated).copied().collect();
        // The kv-cache, once: the context and the tokens asked for (what the executor reserved).
        let capacity = input.capacity();
        let base = context.len().saturating_sub(1);
        let model = Arc::clone(&self.model);
        let team = Arc::clone(&self.team);
        let per_token = self.plan.kv_bytes_per_token;
        // A dropped prefill stops at the next token instead of running the whole prompt.
        let cancelled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guard = CancelOnDrop(Arc::clone(&cancelled));
        // A paged sequence's kv goes to the model's arena through its blocks, whose first tokens may be
        // cached already; another's to a cache of its own, allocated now.
        let paged = input.blocks().map(|blocks| (self.arena.view(blocks.ids), blocks.cached_tokens));
        let (model, cache, cached, context) = blocking(move || {
            let (cache, cached) = match paged {
                Some(paged) => paged,
                None => {
                    let cache = KvCache::new(&model.config, capacity.max(1))?;
                    // The tensors are the bytes the plan announced: what the pool's figures count.
                    debug_assert_eq!(cache.bytes() as u64, capacity.max(1) as u64 * per_token);
                    (cache, 0)
                }
            };
            // A pass per chunk of tokens on the engine's threads, so that other sequences' steps
            // interleave.
            if now && base > cached {
                let stop = || cancelled.load(std::sync::atomic::Ordering::Relaxed);
                model.prefill(&team, &context[cached..base], cached, &cache, &stop)?;
            }
            Ok((model, cache, cached, context))
        })
        .await?;
        drop(guard);
        let unfilled = if now { Vec::new() } else { context.get(cached..base).unwrap_or_default().to_vec() };
        let course = Course::new(base, input.first_step(), unfilled);
        Ok(Box::new(CandleSequence {
            model,
            cache: std::sync::Mutex::new(Arc::new(cache)),
            arena: input.blocks().map(|_| Arc::clone(&self.arena)),
            team: Arc::clone(&self.team),
            course,
            params: params.clone(),
            end_of_generation: Arc::clone(&self.end_of_generation),
        }))
    }

    /// `sequence` as this model's own.
    fn own<'s>(&self, sequence: &'s Arc<dyn Sequence>) -> Result<&'s CandleSequence, EngineError> {
        let any: &dyn std::any::Any = &**sequence;
        any.downcast_ref::<CandleSequence>()
            .filter(|sequence| Arc::ptr_eq(&sequence.model, &self.model))
            .ok_or_else(|| EngineError::Fatal { message: "a pass with another model's sequence".to_owned() })
    }

    /// One pass for `fills` and `steps`, each of a sequence of this model's: the fills' tokens at their
    /// positions, each step's token at its position, every product reading each weight once for all,
    /// each step's token sampled as its own compute samples it.
    async fn compute_together(&self, fills: &[Fill], steps: &[BatchStep]) -> Result<Vec<Token>, EngineError> {
        let mut chunks = Vec::with_capacity(fills.len());
        for fill in fills {
            let sequence = self.own(&fill.sequence)?;
            let (tokens, start) = sequence.course.chunk(fill)?;
            chunks.push((tokens.to_vec(), start, sequence.cache()));
        }
        let mut batch = Vec::with_capacity(steps.len());
        for step in steps {
            let sequence = self.own(&step.sequence)?;
            let position = sequence.course.position(&step.prepared)?;
            batch.push((
                step.previous,
                position,
                sequence.cache(),
                sequence.params.clone(),
                step.prepared.step(),
                Arc::clone(&sequence.end_of_generation),
            ));
        }
        let (model, team) = (Arc::clone(&self.model), Arc::clone(&self.team));
        let tokens = blocking(move || {
            let fills: Vec<_> = chunks.iter().map(|(tokens, start, cache)| (&tokens[..], *start, &**cache)).collect();
            let inputs: Vec<_> =
                batch.iter().map(|(token, position, cache, ..)| (*token, *position, &**cache)).collect();
            model.forward_pass(&team, &fills, &inputs, |index, logits| {
                let (.., params, step, end) = &batch[index];
                let id = sample::sample(logits, params, *step);
                Token { id, end_of_sequence: end.contains(&id) }
            })
        })
        .await?;
        for fill in fills {
            self.own(&fill.sequence)?.course.filled(fill);
        }
        Ok(tokens)
    }
}

/// A conversation the template refuses is the caller's error; a template that fails is the model's.
fn chat_error(error: tokenizer::ChatError) -> EngineError {
    match error {
        tokenizer::ChatError::Refused(message) => EngineError::ChatTemplate { message },
        tokenizer::ChatError::Broken(message) => EngineError::Fatal { message },
    }
}

/// The packed vocabulary at `range` of `raw`.
fn read_vocabulary<'r>(
    raw: &'r usine_engine::RawSection,
    range: &std::ops::Range<usize>,
) -> Result<Packed<'r>, String> {
    let bytes = raw.as_bytes().get(range.clone()).ok_or("outside the raw section")?;
    bincode::deserialize(bytes).map_err(|error| error.to_string())
}

/// Tells a blocking prefill to stop when its future is dropped.
struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

struct CandleSequence {
    model: Arc<Model>,
    /// Its kv-cache: its own, or a view of the model's arena through its blocks (replaced as they grow).
    cache: std::sync::Mutex<Arc<KvCache>>,
    /// The arena, for a paged sequence.
    arena: Option<Arc<Arena>>,
    team: Arc<Team>,
    course: Course,
    params: GenerationParams,
    end_of_generation: Arc<[TokenId]>,
}

/// Where a sequence of either device stands: the position of its first step's input token, its first
/// step, and the context tokens an opened sequence has its passes compute (positions up to `base`),
/// with how many of them they have.
pub(crate) struct Course {
    base: usize,
    first_step: u32,
    unfilled: Vec<TokenId>,
    filled: std::sync::atomic::AtomicUsize,
}

impl Course {
    pub(crate) fn new(base: usize, first_step: u32, unfilled: Vec<TokenId>) -> Self {
        Self { base, first_step, unfilled, filled: std::sync::atomic::AtomicUsize::new(0) }
    }

    /// Context tokens still to fill.
    pub(crate) fn unfilled(&self) -> usize {
        self.unfilled.len() - self.filled.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The prepared stage of `step`: its input token's position.
    pub(crate) fn prepare(&self, step: u32) -> Result<Prepared, EngineError> {
        let offset = step.checked_sub(self.first_step).ok_or_else(|| EngineError::Fatal {
            message: format!("step {step} comes before this sequence's first, {}", self.first_step),
        })?;
        Ok(Prepared::new(step, self.base + offset as usize))
    }

    /// The position `prepared` was made for, once the context is filled (its kv is there).
    pub(crate) fn position(&self, prepared: &Prepared) -> Result<usize, EngineError> {
        let position = *prepared.data::<usize>().ok_or_else(|| EngineError::Fatal {
            message: format!("step {} was prepared by another engine's sequence", prepared.step()),
        })?;
        match self.unfilled() {
            0 => Ok(position),
            left => Err(EngineError::Fatal { message: format!("a step with {left} context tokens unfilled") }),
        }
    }

    /// The tokens `fill` computes and the position of the first, checked against what is filled.
    pub(crate) fn chunk(&self, fill: &Fill) -> Result<(&[TokenId], usize), EngineError> {
        let filled = self.filled.load(std::sync::atomic::Ordering::Acquire);
        let end = fill.done + fill.tokens;
        if fill.done != filled || end > self.unfilled.len() || fill.tokens == 0 {
            return Err(EngineError::Fatal {
                message: format!(
                    "a fill of tokens {}..{end} of a sequence with {filled} of {} filled",
                    fill.done,
                    self.unfilled.len()
                ),
            });
        }
        Ok((&self.unfilled[fill.done..end], self.base - self.unfilled.len() + fill.done))
    }

    /// Counts `fill`'s tokens as computed.
    pub(crate) fn filled(&self, fill: &Fill) {
        self.filled.fetch_add(fill.tokens, std::sync::atomic::Ordering::AcqRel);
    }
}

impl CandleSequence {
    /// Its kv-cache as it is now.
    fn cache(&self) -> Arc<KvCache> {
        Arc::clone(&self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

#[async_trait]
impl Sequence for CandleSequence {
    /// A paged sequence's view grows with its blocks.
    fn set_blocks(&self, ids: &[u32]) {
        if let Some(arena) = &self.arena {
            *self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(arena.view(ids));
        }
    }

    fn unfilled(&self) -> usize {
        self.course.unfilled()
    }

    async fn prepare(&self, step: u32) -> Result<Prepared, EngineError> {
        self.course.prepare(step)
    }

    async fn compute(&self, prepared: Prepared, previous: Option<TokenId>) -> Result<Token, EngineError> {
        let (step, position) = (prepared.step(), self.course.position(&prepared)?);
        let (model, cache, team) = (Arc::clone(&self.model), self.cache(), Arc::clone(&self.team));
        let logits = blocking(move || model.forward(&team, previous, position, &cache)).await?;
        let id = sample::sample(&logits, &self.params, step);
        Ok(Token { id, end_of_sequence: self.end_of_generation.contains(&id) })
    }
}
