//! What the tests and benchmarks of usine's crates share (feature `test-util`): one scripted engine, the
//! zero engine with each stage taking the time its [`Script`] says on tokio's clock (paused in tests, so
//! timelines are exact), faults injected where the script says, and a log of what it was asked; and
//! [`metrics_snapshot`], what a debugging recorder received, by rendered key.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::engine::{BatchStep, Detokenizer, Engine, Fill, LoadedModel, PassOutcome, Prefill, Prepared, Sequence};
use crate::error::EngineError;
use crate::types::{CompiledGraph, EngineDescriptor, MemoryPlan, ModelSpec, ProgressSink, Token, TokenId};
use crate::zero::ZeroEngine;

/// What the scripted engine does, and what it saw. Change it at any time through
/// [`ScriptedEngine::script`]: every stage reads it when it starts.
#[derive(Debug, Default)]
pub struct Script {
    /// Time of a compile.
    pub compile: Duration,
    /// Time of a load.
    pub load: Duration,
    /// Time of a prefill.
    pub prefill: Duration,
    /// Time of a step's prepare stage.
    pub prepare: Duration,
    /// Time of a step's compute stage.
    pub compute: Duration,
    /// The model batches: a [`LoadedModel::compute_batch`] of up to this many sequences takes one
    /// `compute` plus `per_sequence` for each sequence after the first (`None`: the model does not
    /// batch, and its sequences compute one at a time).
    pub batch: Option<Batching>,
    /// The model pages its kv-cache in blocks of this many tokens (`None`: each sequence keeps its own).
    pub kv_block_tokens: Option<u32>,
    /// Where the model batches, it prefills in passes: [`LoadedModel::open`] computes nothing (it takes
    /// no `prefill` time), and each context token a pass fills adds this to the pass's time (`None`:
    /// a sequence is prefilled whole).
    pub fill: Option<Duration>,
    /// Each stage of a sequence pays back the timer's overshoot of its earlier waits (measured inside
    /// each wait), so that a benchmark on a real clock keeps the script's pace.
    pub paced: bool,
    /// The load of this model fails (fatal), after its time.
    pub fail_load: Option<String>,
    /// Step → failures left: the compute of that step fails with a transient error.
    pub transient: BTreeMap<u32, u32>,
    /// The compute of this step fails with a fatal error.
    pub fatal: Option<u32>,
    /// The compute of this step takes this much longer.
    pub stall: Option<(u32, Duration)>,
    /// The compute of this step ends the sequence.
    pub end_at: Option<u32>,
    /// The compute of this step panics (an engine bug).
    pub panic_at: Option<u32>,
    /// Log: compiles started.
    pub compiles: usize,
    /// Log: every prefill, as prompt tokens, tokens already generated, `max_tokens` asked.
    pub prefills: Vec<(usize, usize, u32)>,
    /// Log: computes started.
    pub computes: u32,
    /// Log: every pass that filled contexts, as each fill's tokens, and the steps beside them.
    pub passes: Vec<(Vec<usize>, usize)>,
    /// Log: the kv blocks of every paged prefill (their ids, and how many leading tokens were cached),
    /// and then each time its sequence's blocks grew.
    pub blocks: Vec<(Vec<u32>, usize)>,
}

/// How a scripted model batches: at most `max` sequences a pass, each after the first adding
/// `per_sequence` to the pass's `compute` (a GPU's is small, a CPU's larger).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Most sequences a pass.
    pub max: usize,
    /// Time a pass takes for each sequence after the first.
    pub per_sequence: Duration,
}

/// A shared [`Script`].
#[derive(Debug, Clone, Default)]
pub struct ScriptHandle(Arc<Mutex<Script>>);

impl ScriptHandle {
    /// The script, to read or change (a panic while it was held does not poison it).
    pub fn lock(&self) -> MutexGuard<'_, Script> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The zero engine as its script says. See the module's documentation.
#[derive(Debug, Clone)]
pub struct ScriptedEngine {
    zero: ZeroEngine,
    script: ScriptHandle,
}

impl ScriptedEngine {
    /// The engine of `script`, with the zero engine's memory plan.
    pub fn new(script: Script) -> Self {
        Self { zero: ZeroEngine::new(), script: ScriptHandle(Arc::new(Mutex::new(script))) }
    }

    /// The engine of `script`, its models needing `plan`.
    pub fn with_plan(plan: MemoryPlan, script: Script) -> Self {
        Self { zero: ZeroEngine::with_plan(plan), script: ScriptHandle(Arc::new(Mutex::new(script))) }
    }

    /// Its script, shared.
    pub fn script(&self) -> ScriptHandle {
        self.script.clone()
    }
}

#[async_trait]
impl Engine for ScriptedEngine {
    fn descriptor(&self) -> &EngineDescriptor {
        self.zero.descriptor()
    }

    fn memory_plan(&self, graph: &CompiledGraph) -> Result<MemoryPlan, EngineError> {
        self.zero.memory_plan(graph)
    }

    async fn compile(&self, spec: &ModelSpec, progress: &dyn ProgressSink) -> Result<CompiledGraph, EngineError> {
        let delay = {
            let mut script = self.script.lock();
            script.compiles += 1;
            script.compile
        };
        tokio::time::sleep(delay).await;
        self.zero.compile(spec, progress).await
    }

    async fn load(&self, graph: &CompiledGraph) -> Result<Arc<dyn LoadedModel>, EngineError> {
        let delay = self.script.lock().load;
        tokio::time::sleep(delay).await;
        if self.script.lock().fail_load.as_deref() == Some(graph.spec.id.as_str()) {
            return Err(EngineError::Fatal { message: "injected".into() });
        }
        Ok(Arc::new(ScriptedModel { inner: self.zero.load(graph).await?, script: self.script.clone() }))
    }
}

struct ScriptedModel {
    inner: Arc<dyn LoadedModel>,
    script: ScriptHandle,
}

#[async_trait]
impl LoadedModel for ScriptedModel {
    fn memory_plan(&self) -> MemoryPlan {
        self.inner.memory_plan()
    }

    fn tokenize(&self, text: &str) -> Vec<TokenId> {
        self.inner.tokenize(text)
    }

    fn detokenizer(&self) -> Box<dyn Detokenizer> {
        self.inner.detokenizer()
    }

    async fn prefill(&self, input: Prefill<'_>) -> Result<Box<dyn Sequence>, EngineError> {
        let (delay, paced) = {
            let mut script = self.script.lock();
            script.prefills.push((input.prompt().len(), input.generated().len(), input.params().max_tokens));
            if let Some(blocks) = input.blocks() {
                script.blocks.push((blocks.ids.to_vec(), blocks.cached_tokens));
            }
            (script.prefill, script.paced)
        };
        tokio::time::sleep(delay).await;
        let inner = self.inner.prefill(input).await?;
        let debts = paced.then(|| Mutex::new([Duration::ZERO; 2]));
        Ok(Box::new(ScriptedSequence { inner, script: self.script.clone(), debts, unfilled: 0, filled: 0.into() }))
    }

    /// Where the script fills in passes: the context but its last token, less the cached tokens, left
    /// unfilled, at no cost now.
    async fn open(&self, input: Prefill<'_>) -> Result<Box<dyn Sequence>, EngineError> {
        let fills = {
            let script = self.script.lock();
            script.fill.is_some() && script.batch.is_some()
        };
        if !fills {
            return self.prefill(input).await;
        }
        let paced = {
            let mut script = self.script.lock();
            script.prefills.push((input.prompt().len(), input.generated().len(), input.params().max_tokens));
            if let Some(blocks) = input.blocks() {
                script.blocks.push((blocks.ids.to_vec(), blocks.cached_tokens));
            }
            script.paced
        };
        let context = (input.prompt().len() + input.generated().len()).max(1);
        let unfilled = (context - 1).saturating_sub(input.blocks().map_or(0, |blocks| blocks.cached_tokens));
        let inner = self.inner.prefill(input).await?;
        let debts = paced.then(|| Mutex::new([Duration::ZERO; 2]));
        Ok(Box::new(ScriptedSequence { inner, script: self.script.clone(), debts, unfilled, filled: 0.into() }))
    }

    fn max_pass_tokens(&self) -> usize {
        self.max_batch()
    }

    /// One pass: `compute`, `per_sequence` for each step after the first, `fill` for each filled token,
    /// and the longest stall among the steps; then each step's faults, as its own compute would have.
    async fn compute_pass(&self, fills: Vec<Fill>, steps: Vec<BatchStep>) -> PassOutcome {
        let (batching, fill) = {
            let script = self.script.lock();
            (script.batch, script.fill)
        };
        let (Some(batching), Some(fill)) = (batching, fill) else {
            let refused = |_| Err(EngineError::Fatal { message: "this model does not prefill in passes".to_owned() });
            return (fills.into_iter().map(refused).collect(), self.compute_batch(steps).await);
        };
        let tokens: usize = fills.iter().map(|fill| fill.tokens).sum();
        let delay = {
            let mut script = self.script.lock();
            if !fills.is_empty() {
                script.passes.push((fills.iter().map(|fill| fill.tokens).collect(), steps.len()));
            }
            let filled = u32::try_from(tokens).unwrap_or(u32::MAX);
            self.batch_delay(&mut script, &steps, batching) + fill * filled
        };
        tokio::time::sleep(delay).await;
        let filled = fills
            .iter()
            .map(|fill| {
                let any: &dyn std::any::Any = &*fill.sequence;
                let own = any
                    .downcast_ref::<ScriptedSequence>()
                    .ok_or_else(|| EngineError::Fatal { message: "a fill of another model's sequence".to_owned() })?;
                let done = own.filled.load(std::sync::atomic::Ordering::Acquire);
                if fill.done != done || fill.tokens == 0 || done + fill.tokens > own.unfilled {
                    return Err(EngineError::Fatal {
                        message: format!(
                            "a fill of {} at {} of {done} filled of {}",
                            fill.tokens, fill.done, own.unfilled
                        ),
                    });
                }
                own.filled.fetch_add(fill.tokens, std::sync::atomic::Ordering::AcqRel);
                Ok(())
            })
            .collect();
        (filled, self.step_each(steps).await)
    }

    fn kv_block_tokens(&self) -> Option<u32> {
        self.script.lock().kv_block_tokens
    }

    fn max_batch(&self) -> usize {
        self.script.lock().batch.map_or(1, |batching| batching.max.max(1))
    }

    /// One pass for all of `steps` when the script batches: `compute`, `per_sequence` for each after the
    /// first, and the longest stall among them; then each step's faults, as its own compute would have.
    async fn compute_batch(&self, steps: Vec<BatchStep>) -> Vec<Result<Token, EngineError>> {
        let Some(batching) = self.script.lock().batch else {
            return crate::engine::compute_each(steps).await;
        };
        let delay = self.batch_delay(&mut self.script.lock(), &steps, batching);
        tokio::time::sleep(delay).await;
        self.step_each(steps).await
    }
}

impl ScriptedModel {
    /// A batched pass of `steps`: `compute`, `per_sequence` for each after the first, and the longest
    /// stall among them (each step's compute counted).
    fn batch_delay(&self, script: &mut Script, steps: &[BatchStep], batching: Batching) -> Duration {
        script.computes += u32::try_from(steps.len()).unwrap_or(u32::MAX);
        let stall = steps
            .iter()
            .filter_map(|step| script.stall.filter(|&(at, _)| at == step.prepared.step()).map(|(_, d)| d))
            .max()
            .unwrap_or_default();
        let others = u32::try_from(steps.len().saturating_sub(1)).unwrap_or(u32::MAX);
        script.compute + batching.per_sequence * others + stall
    }

    /// Each step's token once its pass's time is up, or the fault the script injects there.
    async fn step_each(&self, steps: Vec<BatchStep>) -> Vec<Result<Token, EngineError>> {
        let mut tokens = Vec::with_capacity(steps.len());
        for BatchStep { sequence, prepared, previous } in steps {
            let any: &dyn std::any::Any = &*sequence;
            let token = match any.downcast_ref::<ScriptedSequence>() {
                Some(own) => match injected(&self.script, prepared.step()) {
                    Some(injected) => injected,
                    None => own.inner.compute(prepared, previous).await,
                },
                None => Err(EngineError::Fatal { message: "a step of another model's sequence".to_owned() }),
            };
            tokens.push(token);
        }
        tokens
    }
}

/// The fault the script injects at `step`'s compute, if any (a transient one is used up).
fn injected(script: &ScriptHandle, step: u32) -> Option<Result<Token, EngineError>> {
    let mut script = script.lock();
    assert_ne!(script.panic_at, Some(step), "injected panic at {step}");
    if script.fatal == Some(step) {
        Some(Err(EngineError::Fatal { message: format!("injected at {step}") }))
    } else if let Some(left) = script.transient.get_mut(&step).filter(|left| **left > 0) {
        *left -= 1;
        Some(Err(EngineError::Transient { message: format!("injected at {step}") }))
    } else if script.end_at == Some(step) {
        Some(Ok(Token { id: ZeroEngine::END_OF_SEQUENCE, end_of_sequence: true }))
    } else {
        None
    }
}

struct ScriptedSequence {
    inner: Box<dyn Sequence>,
    script: ScriptHandle,
    /// Paced: each stage's timer overshoot not yet paid back (prepare, compute).
    debts: Option<Mutex<[Duration; 2]>>,
    /// Context tokens an opened sequence's passes fill, and those filled.
    unfilled: usize,
    filled: std::sync::atomic::AtomicUsize,
}

const PREPARE: usize = 0;
const COMPUTE: usize = 1;

impl ScriptedSequence {
    /// Waits `duration` for `stage`, less what its earlier waits overshot when paced.
    async fn wait(&self, stage: usize, duration: Duration) {
        let Some(debts) = &self.debts else {
            tokio::time::sleep(duration).await;
            return;
        };
        let owed = debts.lock().unwrap_or_else(PoisonError::into_inner)[stage].min(duration);
        let asked = duration - owed;
        let started = Instant::now();
        tokio::time::sleep(asked).await;
        let overshoot = started.elapsed().saturating_sub(asked);
        let mut debts = debts.lock().unwrap_or_else(PoisonError::into_inner);
        debts[stage] = debts[stage].saturating_sub(owed) + overshoot;
    }
}

#[async_trait]
impl Sequence for ScriptedSequence {
    fn set_blocks(&self, ids: &[u32]) {
        self.script.lock().blocks.push((ids.to_vec(), 0));
    }

    fn unfilled(&self) -> usize {
        self.unfilled - self.filled.load(std::sync::atomic::Ordering::Acquire)
    }

    async fn prepare(&self, step: u32) -> Result<Prepared, EngineError> {
        let delay = self.script.lock().prepare;
        self.wait(PREPARE, delay).await;
        self.inner.prepare(step).await
    }

    async fn compute(&self, prepared: Prepared, previous: Option<TokenId>) -> Result<Token, EngineError> {
        let step = prepared.step();
        let delay = {
            let mut script = self.script.lock();
            script.computes += 1;
            script.compute + script.stall.filter(|&(at, _)| at == step).map_or(Duration::ZERO, |(_, d)| d)
        };
        self.wait(COMPUTE, delay).await;
        if let Some(injected) = injected(&self.script, step) {
            return injected;
        }
        self.inner.compute(prepared, previous).await
    }
}

/// What `recorder` received, by metric name and labels rendered as `name{label=value,...}`, with each
/// value and description.
pub fn metrics_snapshot(
    recorder: &metrics_util::debugging::DebuggingRecorder,
) -> BTreeMap<String, (metrics_util::debugging::DebugValue, Option<String>)> {
    recorder
        .snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _unit, description, value)| {
            let key = key.key();
            let labels: Vec<String> = key.labels().map(|label| format!("{}={}", label.key(), label.value())).collect();
            (format!("{}{{{}}}", key.name(), labels.join(",")), (value, description.map(|text| text.to_string())))
        })
        .collect()
}
