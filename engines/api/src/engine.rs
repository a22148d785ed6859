//! The traits: an `Engine` compiles and loads, a `LoadedModel` tokenizes, prefills and steps several
//! sequences in one pass, a `Sequence` decodes in two stages that can overlap.

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;

use crate::chat::{Message, render_plain};
use crate::error::EngineError;
use crate::generate::check_context;
use crate::types::{
    CompiledGraph, EngineDescriptor, GenerationParams, MemoryPlan, ModelSpec, ProgressSink, Token, TokenId,
};

/// An inference engine: compiles a model into a graph, and loads a graph into a model.
///
/// Object safe: engines are chosen at run time, by name. The kernel keeps the graphs (storage) and the
/// memory (pools); an engine computes, and says what memory it needs ([`Engine::memory_plan`]), before
/// it loads anything.
///
/// Every future of this trait and of [`LoadedModel`] and [`Sequence`] may be dropped at any `.await`
/// (a cancelled request, a pre-empted warm-up): the engine, its models and other sequences stay usable,
/// and nothing is counted as done that did not finish.
#[async_trait]
pub trait Engine: Send + Sync {
    /// What the engine is and offers.
    fn descriptor(&self) -> &EngineDescriptor;

    /// What a model loaded from `graph` will need, known without loading it: the kernel reserves the
    /// weights (evicting other models if it must) before it calls [`load`](Self::load).
    fn memory_plan(&self, graph: &CompiledGraph) -> Result<MemoryPlan, EngineError>;

    /// Compiles `spec` into a graph, reporting progress from 0 to 1 (never backwards) as it goes.
    async fn compile(&self, spec: &ModelSpec, progress: &dyn ProgressSink) -> Result<CompiledGraph, EngineError>;

    /// Loads a graph this engine compiled (same name, version and schema; see [`check_graph`]).
    async fn load(&self, graph: &CompiledGraph) -> Result<Arc<dyn LoadedModel>, EngineError>;
}

/// A model ready to generate.
#[async_trait]
pub trait LoadedModel: Send + Sync {
    /// What the model needs from the memory pools.
    fn memory_plan(&self) -> MemoryPlan;

    /// The tokens of `text`; every text has some (byte fallback).
    fn tokenize(&self, text: &str) -> Vec<TokenId>;

    /// A detokenizer that turns tokens into text one at a time, as they stream.
    fn detokenizer(&self) -> Box<dyn Detokenizer>;

    /// The prompt of a conversation, ending where the assistant's answer starts: by default the plain
    /// rendering ([`render_plain`]) tokenized; a model with a chat template of its own renders it, and
    /// refuses a conversation its template refuses ([`EngineError::ChatTemplate`]).
    ///
    /// No message's content may start or end a turn: text in it that spells a special token is text.
    fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<TokenId>, EngineError> {
        Ok(self.tokenize(&render_plain(messages)))
    }

    /// Runs a throwaway generation so that the first real one pays no first-use cost (kernel
    /// compilation, caches); what the kernel's warm-up calls. Does nothing by default.
    async fn warm_up(&self) -> Result<(), EngineError> {
        Ok(())
    }

    /// Processes the prompt and starts a sequence whose first step is the count of tokens already
    /// generated ([`Prefill::first_step`]).
    ///
    /// Those are none for a new generation. To resume one after a failure, the input holds the tokens
    /// already generated, and the same parameters but for `max_tokens`, which counts what is left (the
    /// original less those, so that the context counts each token once): the sequence goes on from
    /// there and produces what an uninterrupted run would have (so a reader never sees a token twice,
    /// nor a different one). The input was checked when it was made: the engine checks nothing again.
    async fn prefill(&self, input: Prefill<'_>) -> Result<Box<dyn Sequence>, EngineError>;

    /// Tokens per kv block, where the model keeps its sequences' kv-cache in blocks whose ids the
    /// executor hands it ([`Prefill::with_blocks`], [`Sequence::set_blocks`]): a paged kv-cache, whose
    /// full blocks an earlier sequence computed can serve a later one with the same leading tokens (a
    /// prefix cache). `None` (the default): each sequence keeps a kv-cache of its own.
    fn kv_block_tokens(&self) -> Option<u32> {
        None
    }

    /// Most sequences one [`compute_batch`](Self::compute_batch) advances in one pass: 1 (the default)
    /// for a model that does not batch, whose sequences the executor steps each on its own.
    fn max_batch(&self) -> usize {
        1
    }

    /// Most tokens one [`compute_pass`](Self::compute_pass) takes: a step counts one, a fill its
    /// tokens. By default [`max_batch`](Self::max_batch).
    fn max_pass_tokens(&self) -> usize {
        self.max_batch()
    }

    /// Starts a sequence as [`prefill`](Self::prefill) does, except where the model prefills in passes:
    /// then it computes none of the context, and the sequence's [`Sequence::unfilled`] tokens are
    /// computed in chunks ([`Fill`]) by [`compute_pass`](Self::compute_pass), mixed with other
    /// sequences' steps, before its first step can run. By default, [`prefill`](Self::prefill).
    async fn open(&self, input: Prefill<'_>) -> Result<Box<dyn Sequence>, EngineError> {
        self.prefill(input).await
    }

    /// One pass of `fills` (each a chunk of an opened sequence's context, at most one per sequence) and
    /// `steps` (as [`compute_batch`](Self::compute_batch) takes them, none of a sequence still
    /// unfilled), at most [`max_pass_tokens`](Self::max_pass_tokens) in all: each fill's outcome, then
    /// each step's token, in their orders. By default the steps go to
    /// [`compute_batch`](Self::compute_batch), and a fill fails: a model that does not override this
    /// opens no sequence with anything unfilled.
    async fn compute_pass(&self, fills: Vec<Fill>, steps: Vec<BatchStep>) -> PassOutcome {
        let refused = |_: Fill| Err(EngineError::Fatal { message: "this model does not prefill in passes".to_owned() });
        let filled = fills.into_iter().map(refused).collect();
        let tokens = if steps.is_empty() { Vec::new() } else { self.compute_batch(steps).await };
        (filled, tokens)
    }

    /// Runs the compute stage of each of `steps` (sequences of this model, at most
    /// [`max_batch`](Self::max_batch), each at most once) and returns their tokens in the same order:
    /// for each, what its [`Sequence::compute`] would have returned. An engine that batches reads its
    /// weights once for all of them; the default computes them one after another.
    async fn compute_batch(&self, steps: Vec<BatchStep>) -> Vec<Result<Token, EngineError>> {
        compute_each(steps).await
    }
}

/// Each of `steps` computed by its own sequence, one after another: [`LoadedModel::compute_batch`]'s
/// default, and what an engine that batches falls back to where a pass would not pay.
pub async fn compute_each(steps: Vec<BatchStep>) -> Vec<Result<Token, EngineError>> {
    let mut tokens = Vec::with_capacity(steps.len());
    for BatchStep { sequence, prepared, previous } in steps {
        tokens.push(sequence.compute(prepared, previous).await);
    }
    tokens
}

/// What a [`LoadedModel::compute_pass`] returns: each fill's outcome, then each step's token.
pub type PassOutcome = (Vec<Result<(), EngineError>>, Vec<Result<Token, EngineError>>);

/// A chunk of an opened sequence's context in a [`LoadedModel::compute_pass`]: of its
/// [`Sequence::unfilled`] tokens, `done` were computed by earlier passes, and this pass computes the
/// next `tokens` (at least one; `done + tokens` at most the unfilled).
pub struct Fill {
    /// The sequence (shared: the executor's scheduler holds it between passes).
    pub sequence: std::sync::Arc<dyn Sequence>,
    /// Its unfilled tokens computed before this pass.
    pub done: usize,
    /// Its unfilled tokens this pass computes.
    pub tokens: usize,
}

impl std::fmt::Debug for Fill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fill").field("done", &self.done).field("tokens", &self.tokens).finish()
    }
}

/// One sequence's step in a [`LoadedModel::compute_batch`]: what its [`Sequence::compute`] takes.
pub struct BatchStep {
    /// The sequence (shared: the executor's scheduler holds it between steps).
    pub sequence: std::sync::Arc<dyn Sequence>,
    /// Its prepared step.
    pub prepared: Prepared,
    /// The token before the step (`None` for step 0 of an empty prompt).
    pub previous: Option<TokenId>,
}

impl std::fmt::Debug for BatchStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchStep").field("prepared", &self.prepared).field("previous", &self.previous).finish()
    }
}

/// A prefill's input, checked once: every parameter within its limit ([`GenerationParams::validate`])
/// and the context (the prompt, the tokens already generated, and `max_tokens`) within the model's
/// ([`check_context`]). Made only by [`Prefill::new`], against the model's plan (its
/// [`LoadedModel::memory_plan`], which is the plan [`Engine::memory_plan`] gave for its graph), so an
/// engine that receives one knows it holds.
#[derive(Debug, Clone, Copy)]
pub struct Prefill<'a> {
    prompt: &'a [TokenId],
    generated: &'a [TokenId],
    params: &'a GenerationParams,
    blocks: Option<Blocks<'a>>,
}

/// A paged sequence's kv blocks at its prefill (see [`LoadedModel::kv_block_tokens`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocks<'a> {
    /// The block ids, in order: block `i` holds the kv of positions `i × block tokens` onwards.
    pub ids: &'a [u32],
    /// Leading context tokens (the prompt, then the tokens generated before) whose kv the blocks hold
    /// already: the prefill computes the others only.
    pub cached_tokens: usize,
}

impl<'a> Prefill<'a> {
    /// Checks `params` and the context against `plan`, the model's.
    pub fn new(
        plan: &MemoryPlan,
        prompt: &'a [TokenId],
        generated: &'a [TokenId],
        params: &'a GenerationParams,
    ) -> Result<Self, EngineError> {
        params.validate()?;
        check_context(plan, prompt.len() + generated.len(), params)?;
        Ok(Self { prompt, generated, params, blocks: None })
    }

    /// The same input for a paged model ([`LoadedModel::kv_block_tokens`] is `block_tokens`): its kv
    /// blocks, which must hold the context's tokens, and how many of those are cached already (fewer
    /// than the context: the last token's kv is the first step's).
    pub fn with_blocks(self, block_tokens: u32, blocks: Blocks<'a>) -> Result<Self, EngineError> {
        let context = self.prompt.len() + self.generated.len();
        let room = blocks.ids.len().saturating_mul(block_tokens as usize);
        if block_tokens == 0 || room < context.max(1) || (blocks.cached_tokens > 0 && blocks.cached_tokens >= context) {
            return Err(EngineError::InvalidParams {
                name: "blocks",
                value: format!("{} blocks of {block_tokens} tokens, {} cached", blocks.ids.len(), blocks.cached_tokens),
                limit: format!("room for the context's {context} tokens, fewer of them cached"),
            });
        }
        Ok(Self { blocks: Some(blocks), ..self })
    }

    /// The kv blocks of a paged sequence ([`with_blocks`](Self::with_blocks)).
    pub fn blocks(&self) -> Option<Blocks<'a>> {
        self.blocks
    }

    /// The prompt's tokens.
    pub fn prompt(&self) -> &'a [TokenId] {
        self.prompt
    }

    /// The tokens generated before a resume (none for a new generation).
    pub fn generated(&self) -> &'a [TokenId] {
        self.generated
    }

    /// How to generate.
    pub fn params(&self) -> &'a GenerationParams {
        self.params
    }

    /// The sequence's first step: the tokens generated before.
    pub fn first_step(&self) -> u32 {
        u32::try_from(self.generated.len()).expect("the context check bounds it")
    }

    /// Most tokens the sequence holds: the prompt, the tokens generated before and `max_tokens` (what
    /// its kv-cache reserves).
    pub fn capacity(&self) -> usize {
        self.prompt.len() + self.generated.len() + self.params.max_tokens as usize
    }
}

/// Turns tokens into text incrementally: a token's text is out as soon as it is whole (a character split
/// across tokens comes out with its last byte).
pub trait Detokenizer: Send {
    /// The text that `token` completes.
    fn push(&mut self, token: TokenId) -> String;

    /// Whatever is still held back at the end.
    fn finish(&mut self) -> String;
}

/// One sequence being decoded, one token per step, in two stages.
///
/// The **prepare** stage of step N+1 (CPU work: positions, masks, buffers, sampling state) needs only
/// the step number, never the token of step N; so it can run while the **compute** stage of step N
/// (the forward pass and the sampling, on the device) is still going. Both take `&self` for that
/// reason. Step 0 is the first generated token; its compute takes the last prompt token (or `None`
/// for an empty prompt). Steps are numbered across resumes (see [`LoadedModel::prefill`]).
///
/// After an error from either stage, the sequence is done: resume with a new one from `prefill`.
/// Activations: at most two steps are in flight (one prepared, one computing), and the engine's
/// [`MemoryPlan::activation_bytes_per_step`] covers one step (or one batched step of up to
/// [`LoadedModel::max_batch`] sequences); reserve it for each.
///
/// A sequence is `Any`, so that a model's [`LoadedModel::compute_batch`] can reach its own sequences'
/// state (`let any: &dyn Any = sequence;`).
#[async_trait]
pub trait Sequence: Any + Send + Sync {
    /// A paged sequence's kv blocks now, as its tokens outgrow those it had (the ids it had first,
    /// then more): the executor calls it before the steps that need them. Ignored by a sequence that
    /// keeps its own kv-cache (the default).
    fn set_blocks(&self, ids: &[u32]) {
        let _ = ids;
    }

    /// Context tokens still to compute before the first step can run: those of a sequence that a model
    /// prefilling in passes [opened](LoadedModel::open), for [`LoadedModel::compute_pass`] to fill.
    /// None by default (a prefill computes the whole context).
    fn unfilled(&self) -> usize {
        0
    }

    /// The prepare stage of `step`.
    async fn prepare(&self, step: u32) -> Result<Prepared, EngineError>;

    /// The compute stage: runs the step `prepared` was made for, from the token before it, and returns
    /// the next token.
    async fn compute(&self, prepared: Prepared, previous: Option<TokenId>) -> Result<Token, EngineError>;
}

/// What the prepare stage hands to the compute stage: the step and the engine's own data.
pub struct Prepared {
    step: u32,
    data: Box<dyn Any + Send + Sync>,
}

impl Prepared {
    /// The prepared work of `step`.
    pub fn new(step: u32, data: impl Any + Send + Sync) -> Self {
        Self { step, data: Box::new(data) }
    }

    /// The step it was prepared for.
    pub fn step(&self) -> u32 {
        self.step
    }

    /// The engine's data, if it is a `T`.
    pub fn data<T: Any>(&self) -> Option<&T> {
        self.data.downcast_ref()
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").field("step", &self.step).finish_non_exhaustive()
    }
}

/// Checks that `graph` was compiled by the engine `descriptor` describes: same name, version and schema.
pub fn check_graph(descriptor: &EngineDescriptor, graph: &CompiledGraph) -> Result<(), EngineError> {
    if graph.engine == descriptor.name
        && graph.engine_version == descriptor.version
        && graph.schema == descriptor.graph_schema
    {
        return Ok(());
    }
    Err(EngineError::GraphMismatch {
        found: format!("{} {} (schema {})", graph.engine, graph.engine_version, graph.schema),
        expected: format!("{} {} (schema {})", descriptor.name, descriptor.version, descriptor.graph_schema),
    })
}

/// Checks that `spec` names a profile and a quantization the engine has.
pub fn check_spec(descriptor: &EngineDescriptor, spec: &ModelSpec) -> Result<(), EngineError> {
    let unsupported = |what, name: &str, known: &[String]| EngineError::Unsupported {
        engine: descriptor.name.clone(),
        what,
        name: name.to_owned(),
        known: known.to_vec(),
    };
    if spec.engine != descriptor.name {
        return Err(unsupported("engine name", &spec.engine, std::slice::from_ref(&descriptor.name)));
    }
    if !descriptor.profiles.contains(&spec.profile) {
        return Err(unsupported("profile", &spec.profile, &descriptor.profiles));
    }
    if let Some(quantization) = &spec.quantization
        && !descriptor.quantizations.contains(quantization)
    {
        return Err(unsupported("quantization", quantization, &descriptor.quantizations));
    }
    Ok(())
}
