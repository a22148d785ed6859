//! One generation, from its place in the queue to its last event: the model, the kv-cache, then the
//! steps, two deep, with retries and time limits.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use usine_engine::{
    Blocks, EngineError, ErrorKind, FinishReason, GenerationParams, LoadedModel, MemoryPlan, Prefill, Prepared,
    Sequence, StopMatcher, Token, TokenId,
};
use usine_kernel::RuntimeManager;
use usine_memory::{BlockTable, KvBlocks, Lease, MemoryError, Pool, ScopeId};

use crate::admission::{Slot, Ticket};
use crate::batch::{Batcher, Batchers, LoopContext, Seat, StepFailure, Stepped};
use crate::config::{ExecutorConfig, KvReservation, Timeouts};
use crate::error::{ExecutorError, Phase};
use crate::event::{Event, Usage};
use crate::metrics::{ExecutorMetrics, Outcome};
use crate::paged::{Holders, Holding, Spaces};
use crate::request::{Input, Priority, Request};

/// Prompts up to this many bytes are tokenized on the runtime's thread: microseconds, less than the
/// trip to a blocking thread.
const INLINE_TOKENIZE_MAX: usize = 4 << 10;

/// How often a generation blocked on its reader marks its kv-cache in use: well inside any idle timeout
/// a pool's GC would use.
const KEEP_ALIVE_TICK: Duration = Duration::from_secs(1);

/// What every generation of one executor shares.
pub(crate) struct Shared {
    pub(crate) kernel: RuntimeManager,
    pub(crate) kv: Pool,
    pub(crate) activations: Pool,
    pub(crate) config: ExecutorConfig,
    pub(crate) metrics: Arc<ExecutorMetrics>,
    /// The batching loops of the models that batch.
    pub(crate) batchers: Batchers,
    /// The kv blocks of the models that page their kv-cache.
    pub(crate) spaces: Spaces,
}

pub(crate) type Sender = mpsc::Sender<Result<Event, ExecutorError>>;

/// Why a generation stopped short of its end.
enum Halt {
    Failed(ExecutorError),
    /// The reader dropped the stream: nobody to tell.
    ReaderGone,
}

impl From<ExecutorError> for Halt {
    fn from(error: ExecutorError) -> Self {
        Self::Failed(error)
    }
}

/// Counts a generation's outcome, tokens and dead time once, however it ends: a task aborted by a
/// dropped stream is counted as cancelled.
struct Tally {
    metrics: Arc<ExecutorMetrics>,
    outcome: Outcome,
    tokens: u32,
    idle: Duration,
}

impl Drop for Tally {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.outcome = Outcome::Failed; // the engine panicked: the reader gets `Aborted`
        }
        self.metrics.generation(self.tokens, self.idle);
        self.metrics.outcome(self.outcome);
    }
}

/// The task that runs one request and sends its events. Its tally exists from now on, so that a
/// request dropped before its task first runs is counted too (as cancelled).
pub(crate) fn run(
    shared: Arc<Shared>,
    request: Request,
    ticket: Ticket,
    submitted: Instant,
    seed: u64,
    events: Sender,
) -> impl Future<Output = ()> + Send + 'static {
    let mut tally =
        Tally { metrics: Arc::clone(&shared.metrics), outcome: Outcome::Cancelled, tokens: 0, idle: Duration::ZERO };
    async move {
        // The last event has its place from the start: a reader cut for stalling still hears why.
        let Ok(last_place) = events.try_reserve() else { return }; // the reader is gone already
        let limits = Limits { submitted, timeouts: shared.config.timeouts.overridden_by(&request.timeouts) };
        let generation = Run {
            shared: &shared,
            model_id: &request.model,
            limits,
            retries: 0,
            preemptions: 0,
            jitter: fastrand::Rng::with_seed(seed),
            events: &events,
        };
        let result = generation.drive(&request, ticket, &mut tally).await;
        let last = match result {
            Ok(usage) => {
                tally.outcome = Outcome::Completed;
                Ok(Event::Finished(usage))
            }
            Err(Halt::ReaderGone) => return,
            Err(Halt::Failed(error)) => {
                tally.outcome = match &error {
                    ExecutorError::Timeout { phase, .. } => {
                        shared.metrics.timeout(*phase);
                        Outcome::Timeout
                    }
                    ExecutorError::InvalidRequest { .. } => Outcome::Invalid,
                    _ => Outcome::Failed,
                };
                Err(error)
            }
        };
        drop(tally); // counted before the reader sees the end
        last_place.send(last);
    }
}

/// The time limits of one request.
struct Limits {
    submitted: Instant,
    timeouts: Timeouts,
}

/// When a phase that began at `since` must end, and which limit ends it: the phase's own or the whole
/// request's, whichever comes first.
#[derive(Clone, Copy)]
struct Deadline {
    at: Instant,
    phase: Phase,
    limit: Duration,
}

impl Limits {
    fn deadline(&self, phase: Phase, since: Instant) -> Option<Deadline> {
        let own = match phase {
            Phase::Queue => self.timeouts.queue,
            Phase::FirstToken => self.timeouts.first_token,
            Phase::BetweenTokens => self.timeouts.between_tokens,
            Phase::Reader => self.timeouts.reader,
            Phase::Total => None,
        }
        // A limit too far to be an instant is no limit.
        .and_then(|limit| Some(Deadline { at: since.checked_add(limit)?, phase, limit }));
        let total = self
            .timeouts
            .total
            .and_then(|limit| Some(Deadline { at: self.submitted.checked_add(limit)?, phase: Phase::Total, limit }));
        match (own, total) {
            (Some(own), Some(total)) => Some(if total.at < own.at { total } else { own }),
            (own, total) => own.or(total),
        }
    }
}

/// Runs `future` to its end or to `deadline`.
async fn bounded<F: Future>(deadline: Option<Deadline>, future: F) -> Result<F::Output, ExecutorError> {
    match deadline {
        None => Ok(future.await),
        Some(Deadline { at, phase, limit }) => {
            tokio::time::timeout_at(at, future).await.map_err(|_| ExecutorError::Timeout { phase, limit })
        }
    }
}

/// A prepared step and the activations it holds until its compute ends.
struct Ready {
    prepared: Prepared,
    activations: Option<Lease>,
}

/// A failure inside a step.
enum Failure {
    Engine(EngineError),
    Memory(MemoryError),
    /// A paged sequence found no kv block in time: it gives its blocks back, so that the others can go
    /// on, and resumes by recompute once blocks come free.
    Preempted(MemoryError),
}

/// The sequence being decoded, and the step prepared ahead of it; or, where the model batches, its
/// seat in the model's batching loop.
#[derive(Default)]
struct Pipe {
    sequence: Option<Arc<dyn Sequence>>,
    seat: Option<Seat>,
    ahead: Option<Ready>,
    /// A failure of the step prepared ahead, met after the token before it came out.
    failed_ahead: Option<Failure>,
    /// The sequence's context is being computed in the loop's passes: its full blocks are published
    /// once its first token is out.
    publish: bool,
}

struct Run<'a> {
    shared: &'a Shared,
    model_id: &'a str,
    limits: Limits,
    retries: u32,
    /// Times its sequence was pre-empted for kv blocks.
    preemptions: u32,
    jitter: fastrand::Rng,
    events: &'a Sender,
}

/// The kv-cache of one sequence: one lease, grown in place, and more leases when it cannot grow; or,
/// where the model pages it, a table of blocks of the model's, the leading ones perhaps cached.
struct KvCache {
    leases: Vec<Lease>,
    per_token: u64,
    tokens: u64,
    paged: Option<(KvBlocks, BlockTable)>,
    /// Its place among the paged model's generations.
    holding: Option<Holding>,
    /// It gave its blocks back (pre-empted), and takes blocks again only as the oldest.
    preempted: bool,
}

impl Run<'_> {
    async fn drive(mut self, request: &Request, ticket: Ticket, tally: &mut Tally) -> Result<Usage, Halt> {
        let slot: Slot = match ticket {
            Ticket::Now(slot) => slot,
            Ticket::Queued(place) => {
                bounded(self.limits.deadline(Phase::Queue, self.limits.submitted), place.wait()).await?
            }
        };
        let started = Instant::now();
        let first_token = self.limits.deadline(Phase::FirstToken, started);

        let handle =
            bounded(first_token, self.shared.kernel.load_model(&request.model)).await?.map_err(ExecutorError::from)?;
        let load = started.elapsed();
        let model = Arc::clone(handle.model());
        let plan = handle.memory_plan();
        let prompt = bounded(first_token, self.tokenize(&model, &request.input)).await??;
        let fitted;
        let params = match fitted_max_tokens(request, &plan, prompt.len()) {
            Some(max_tokens) => {
                fitted = GenerationParams { max_tokens, ..request.params.clone() };
                &fitted
            }
            None => &request.params,
        };
        // The one check of the request against the model: its parameters (fitted) and its context.
        let checked = Prefill::new(&plan, &prompt, &[], params).map_err(|source| self.invalid(source))?;
        let scope = ScopeId::fresh();
        let space = match model.kv_block_tokens() {
            Some(block_tokens) if plan.kv_bytes_per_token > 0 => Some(
                self.shared.spaces.of(&model, block_tokens, &self.shared.kv).map_err(|source| self.memory(source))?,
            ),
            _ => None,
        };
        let reserved = self.reserve_kv(&plan, &prompt, params.max_tokens, scope, space);
        let mut kv = bounded(first_token, reserved).await??;
        let batcher = (self.shared.config.max_batch > 1 && model.max_batch() > 1).then(|| {
            self.shared.batchers.of(&model, || LoopContext {
                activations: self.shared.activations.clone(),
                activation_bytes: plan.activation_bytes_per_step,
                memory_wait: self.shared.config.memory_wait,
                max_batch: self.shared.config.max_batch,
                max_pass_tokens: self.shared.config.max_pass_tokens,
                pipelining: self.shared.config.pipelining,
                metrics: Arc::clone(&self.shared.metrics),
            })
        });

        let prompt_tokens = u32::try_from(prompt.len()).expect("the context check bounds the prompt");
        let queued = started - self.limits.submitted;
        self.send(Event::Started { source: handle.source(), queued, load, prompt_tokens }).await?;

        let mut detokenizer = model.detokenizer();
        let mut stops = StopMatcher::new(&params.stop);
        let mut generated: Vec<TokenId> = Vec::new();
        let mut pipe = Pipe::default();
        let mut phase = (Phase::FirstToken, started);
        let mut first_at = None;
        let mut last_at = started;
        let mut finish = FinishReason::Length;
        while let Some(step) = u32::try_from(generated.len()).ok().filter(|&step| step < params.max_tokens) {
            if let Some(failure) = pipe.failed_ahead.take() {
                self.recover(failure, &mut pipe, &mut kv, &prompt, phase).await?;
                continue;
            }
            let deadline = self.limits.deadline(phase.0, phase.1);
            let context = Step {
                model: model.as_ref(),
                plan: &plan,
                prompt: &prompt,
                generated: &generated,
                params,
                checked,
                scope,
                priority: request.priority,
                batcher: batcher.as_ref(),
            };
            let outcome = bounded(deadline, self.step(&context, &mut pipe, &mut kv, &mut tally.idle)).await?;
            let token = match outcome {
                Ok(token) => token,
                Err(failure) => {
                    self.recover(failure, &mut pipe, &mut kv, &prompt, phase).await?;
                    continue;
                }
            };
            if token.end_of_sequence {
                finish = FinishReason::EndOfSequence;
                break;
            }
            let now = Instant::now();
            match first_at {
                None => {
                    first_at = Some(now);
                    self.shared.metrics.time_to_first_token.record((now - self.limits.submitted).as_secs_f64());
                }
                Some(_) => self.shared.metrics.time_between_tokens.record((now - last_at).as_secs_f64()),
            }
            last_at = now;
            generated.push(token.id);
            let released = stops.push(&detokenizer.push(token.id));
            let event = Ok(Event::Token { index: step, id: token.id, text: released.text });
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(Halt::ReaderGone),
                Err(mpsc::error::TrySendError::Full(event)) => {
                    // The reader is behind: the step prepared ahead gives its activations back while we
                    // wait (it is prepared again, without overlap, once the reader catches up).
                    pipe.ahead = None;
                    self.wait_for_reader(event, &kv).await?;
                }
            }
            tally.tokens += 1;
            kv.touch().map_err(|source| self.memory(source))?; // in use, however long the reader took
            if released.stopped {
                finish = FinishReason::Stop;
                break;
            }
            phase = (Phase::BetweenTokens, Instant::now()); // time blocked on the reader is not the engine's
        }
        drop(pipe); // flush: a step prepared ahead returns its activations
        let cached_tokens = kv.paged.as_ref().map_or(0, |(_, table)| table.cached_tokens());
        let cached_tokens = u32::try_from(cached_tokens).expect("at most the prompt");
        drop((kv, handle, slot)); // memory, model and slot go back before the reader hears the end
        if finish != FinishReason::Stop {
            let released = stops.push(&detokenizer.finish());
            let mut text = released.text;
            if released.stopped {
                finish = FinishReason::Stop;
            } else {
                text.push_str(&stops.finish());
            }
            if !text.is_empty() {
                self.send(Event::Text(text)).await?;
            }
        }

        let ended = Instant::now();
        let generated_tokens = tally.tokens;
        let tokens_per_second = match first_at {
            Some(first) if generated_tokens > 1 && last_at > first => {
                f64::from(generated_tokens - 1) / (last_at - first).as_secs_f64()
            }
            _ => 0.0,
        };
        Ok(Usage {
            finish,
            prompt_tokens,
            cached_tokens,
            generated_tokens,
            time_to_first_token: first_at.map_or(Duration::ZERO, |first| first - self.limits.submitted),
            tokens_per_second,
            queued,
            total: ended - self.limits.submitted,
            retries: self.retries,
            pipeline_idle: tally.idle,
        })
    }

    /// One step: the sequence (prefilled again after a failure), the kv-cache for its token, its
    /// prepared stage (from the step before, or now), then its compute, beside the prepare stage of the
    /// next step when pipelining.
    async fn step(
        &self,
        context: &Step<'_>,
        pipe: &mut Pipe,
        kv: &mut KvCache,
        idle: &mut Duration,
    ) -> Result<Token, Failure> {
        let step = u32::try_from(context.generated.len()).expect("steps are bounded by max_tokens");
        if let Some(batcher) = context.batcher {
            return self.step_batched(context, batcher, pipe, kv, idle).await;
        }
        let needed = context.prompt.len() + context.generated.len() + 1;
        if pipe.sequence.is_none() {
            kv.cover(needed, self, context.scope, None).await?; // again, after a pre-emption
            pipe.sequence = Some(self.prefill(context, step, kv).await?);
            kv.touch().map_err(Failure::Memory)?; // a long prefill is use, not idleness
        }
        let sequence = pipe.sequence.as_deref().expect("set just above");
        kv.cover(needed, self, context.scope, Some(sequence)).await?;
        let current = match pipe.ahead.take() {
            Some(ready) => ready,
            None => {
                // Nothing overlaps this prepare stage: the compute stage waits for all of it.
                let since = Instant::now();
                let ready = self.prepare(sequence, step, context).await?;
                *idle += since.elapsed();
                ready
            }
        };
        let previous = context.generated.last().or(context.prompt.last()).copied();
        let Ready { prepared, activations } = current;
        // The step ahead takes its activations only if they are free now: waiting for them would hold
        // back this step's token. Without room, the next step is prepared after this one, as when
        // pipelining is off.
        let ahead = self.shared.config.pipelining && step + 1 < context.params.max_tokens;
        let Some(activations_ahead) = ahead.then(|| self.free_activations(context)).flatten() else {
            let token = sequence.compute(prepared, previous).await;
            drop(activations);
            return token.map_err(Failure::Engine);
        };
        let compute = async {
            let token = sequence.compute(prepared, previous).await;
            drop(activations); // the next step's compute may need the room
            (token, Instant::now())
        };
        let prepare = async {
            let prepared = sequence.prepare(step + 1).await.map_err(Failure::Engine);
            (prepared.map(|prepared| Ready { prepared, activations: activations_ahead }), Instant::now())
        };
        let ((token, computed_at), (next, prepared_at)) = tokio::join!(compute, prepare);
        let token = token.map_err(Failure::Engine)?; // a step prepared ahead of a failed one is dropped
        match next {
            Ok(ready) => {
                *idle += prepared_at.saturating_duration_since(computed_at);
                pipe.ahead = Some(ready);
            }
            Err(failure) => {
                pipe.sequence = None;
                pipe.failed_ahead = Some(failure);
            }
        }
        Ok(token)
    }

    /// The sequence, prefilled with the prompt, or for a resume with the prompt and the tokens already
    /// sent.
    /// Where the model pages its kv-cache, the prefill takes the sequence's blocks (its leading ones
    /// perhaps cached, and not computed again), and its full blocks are published after it.
    ///
    /// Where the model batches, the sequence is opened instead ([`LoadedModel::open`]): a model that
    /// prefills in passes leaves its context to the loop, and its blocks are published after.
    async fn prefill(&self, context: &Step<'_>, step: u32, kv: &mut KvCache) -> Result<Arc<dyn Sequence>, Failure> {
        // A resume asks for what is left, so that the context counts each token once.
        let left = GenerationParams { max_tokens: context.params.max_tokens - step, ..context.params.clone() };
        let input = if context.generated.is_empty() {
            Ok(context.checked)
        } else {
            Prefill::new(context.plan, context.prompt, context.generated, &left)
        };
        let input = match (input, &kv.paged) {
            (Ok(input), Some((space, table))) => input
                .with_blocks(space.block_tokens(), Blocks { ids: table.ids(), cached_tokens: table.cached_tokens() }),
            (input, _) => input,
        };
        let sequence = match (input, context.batcher) {
            (Ok(input), None) => context.model.prefill(input).await.map_err(Failure::Engine)?,
            (Ok(input), Some(_)) => context.model.open(input).await.map_err(Failure::Engine)?,
            (Err(error), _) => return Err(Failure::Engine(error)),
        };
        if sequence.unfilled() == 0 {
            publish(kv, context.prompt)?;
        }
        Ok(Arc::from(sequence))
    }

    /// One step where the model batches: the sequence seated in the model's loop (prefilled again
    /// after a failure), the kv-cache covered for this step and, pipelining, the next, those steps
    /// allowed, and this step's token from the loop.
    async fn step_batched(
        &self,
        context: &Step<'_>,
        batcher: &Arc<Batcher>,
        pipe: &mut Pipe,
        kv: &mut KvCache,
        idle: &mut Duration,
    ) -> Result<Token, Failure> {
        let step = u32::try_from(context.generated.len()).expect("steps are bounded by max_tokens");
        if pipe.seat.is_none() {
            let needed = context.prompt.len() + context.generated.len() + 1;
            kv.cover(needed, self, context.scope, None).await?; // again, after a pre-emption
            let sequence = self.prefill(context, step, kv).await?;
            kv.touch().map_err(Failure::Memory)?; // a long prefill is use, not idleness
            pipe.publish = sequence.unfilled() > 0;
            let previous = context.generated.last().or(context.prompt.last()).copied();
            let end = context.params.max_tokens;
            pipe.seat = Some(batcher.join(Arc::clone(&sequence), step, end, previous, context.priority));
            pipe.sequence = Some(sequence);
        }
        let (seat, sequence) = (pipe.seat.as_mut().expect("seated just above"), pipe.sequence.as_deref());
        let ahead = if self.shared.config.pipelining { 2 } else { 1 };
        let allowed = (step + ahead).min(context.params.max_tokens);
        let sequence = sequence.expect("seated with its sequence");
        kv.cover(context.prompt.len() + allowed as usize, self, context.scope, Some(sequence)).await?;
        seat.allow(allowed);
        match seat.next().await {
            Ok(Stepped { token, idle: waited }) => {
                *idle += waited;
                if std::mem::take(&mut pipe.publish) {
                    publish(kv, context.prompt)?; // the passes computed the context before this token
                }
                Ok(token)
            }
            Err(StepFailure::Engine(error)) => Err(Failure::Engine(error)),
            Err(StepFailure::Memory(error)) => Err(Failure::Memory(error)),
            // Ends this generation's task as the engine's panic would have in a step of its own.
            Err(StepFailure::Panicked(message)) => {
                std::panic::resume_unwind(Box::new(format!("the engine panicked in a batched step: {message}")))
            }
        }
    }

    /// A step's activations if they are free now (`Some(None)` when the model needs none).
    fn free_activations(&self, context: &Step<'_>) -> Option<Option<Lease>> {
        match context.plan.activation_bytes_per_step {
            0 => Some(None),
            bytes => self.shared.activations.allocate(bytes, context.scope).ok().map(Some),
        }
    }

    /// The prepare stage of `step`, with the activations it needs (waited for under pressure).
    async fn prepare(&self, sequence: &dyn Sequence, step: u32, context: &Step<'_>) -> Result<Ready, Failure> {
        let bytes = context.plan.activation_bytes_per_step;
        let activations = if bytes == 0 {
            None
        } else {
            let wait = self.shared.config.memory_wait;
            Some(self.shared.activations.allocate_wait(bytes, context.scope, wait).await.map_err(Failure::Memory)?)
        };
        let prepared = sequence.prepare(step).await.map_err(Failure::Engine)?;
        Ok(Ready { prepared, activations })
    }

    /// After a failure: a transient one is retried after a backoff (the sequence is prefilled again with
    /// the prompt and the tokens already sent, and goes on); anything else ends the generation.
    async fn recover(
        &mut self,
        failure: Failure,
        pipe: &mut Pipe,
        kv: &mut KvCache,
        prompt: &[TokenId],
        phase: (Phase, Instant),
    ) -> Result<(), ExecutorError> {
        *pipe = Pipe::default();
        let error = match failure {
            Failure::Memory(source) => return Err(ExecutorError::Memory { model: self.model_id.to_owned(), source }),
            Failure::Preempted(source) => {
                if self.preemptions >= self.shared.config.max_preemptions {
                    return Err(ExecutorError::Memory { model: self.model_id.to_owned(), source });
                }
                self.preemptions += 1;
                self.shared.metrics.preemption();
                kv.release(prompt);
                let (model, preemptions) = (self.model_id, self.preemptions);
                tracing::debug!(model, preemptions, "no kv block in time; pre-empted, resuming by recompute");
                return Ok(());
            }
            Failure::Engine(error) => error,
        };
        match error.kind() {
            ErrorKind::Transient => {}
            ErrorKind::InvalidInput => return Err(self.invalid(error)),
            _ => {
                return Err(ExecutorError::Engine {
                    model: self.model_id.to_owned(),
                    source: error,
                    retries: self.retries,
                });
            }
        }
        let policy = &self.shared.config.retry;
        if self.retries >= policy.max_retries {
            return Err(ExecutorError::RetriesExhausted {
                model: self.model_id.to_owned(),
                retries: self.retries,
                last: error,
            });
        }
        self.retries += 1;
        self.shared.metrics.retry();
        let backoff = policy.backoff(self.retries);
        let spread = policy.jitter * (2.0 * self.jitter.f64() - 1.0);
        let backoff = Duration::try_from_secs_f64(backoff.as_secs_f64() * (1.0 + spread)).unwrap_or(policy.max_backoff);
        let (model, retry, backoff_seconds) = (self.model_id, self.retries, backoff.as_secs_f64());
        tracing::warn!(model, retry, backoff_seconds, %error, "transient engine failure; retrying");
        bounded(self.limits.deadline(phase.0, phase.1), tokio::time::sleep(backoff)).await
    }

    async fn reserve_kv(
        &self,
        plan: &MemoryPlan,
        prompt_tokens: &[TokenId],
        max_tokens: u32,
        scope: ScopeId,
        space: Option<(KvBlocks, Holders)>,
    ) -> Result<KvCache, ExecutorError> {
        let prompt = prompt_tokens.len();
        let mut kv = KvCache {
            leases: Vec::new(),
            per_token: plan.kv_bytes_per_token,
            tokens: 0,
            paged: None,
            holding: None,
            preempted: false,
        };
        if kv.per_token == 0 {
            kv.tokens = u64::MAX;
            return Ok(kv);
        }
        let (pool, capacity) = (self.shared.kv.name().to_owned(), self.shared.kv.capacity());
        let tokens = match self.shared.config.kv_reservation {
            KvReservation::UpFront => {
                // A sequence the whole pool cannot hold fails now, not when it reaches the end.
                let whole = prompt as u64 + u64::from(max_tokens);
                let requested = whole.saturating_mul(kv.per_token);
                if requested > capacity {
                    return Err(self.memory(MemoryError::TooLarge { pool, requested, capacity }));
                }
                // At most the share of the pool, never less than the prompt: the rest comes per token.
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    reason = "a share of a u64, floored"
                )]
                #[expect(clippy::cast_precision_loss, reason = "a pool's bytes, far below 2^52")]
                let share = (capacity as f64 * self.shared.config.kv_up_front_share) as u64;
                whole.min((share / kv.per_token).max(prompt as u64))
            }
            KvReservation::PerToken => prompt as u64,
        };
        let Some(bytes) = tokens.checked_mul(kv.per_token) else {
            return Err(self.memory(MemoryError::TooLarge { pool, requested: u64::MAX, capacity }));
        };
        let wait = self.shared.config.memory_wait;
        if let Some((space, holders)) = space {
            // The leading blocks another sequence computed, then blocks for the rest (the empty
            // prompt's start token takes a position too).
            let mut table = space.start(prompt_tokens);
            let covered = usize::try_from(tokens.max(1)).unwrap_or(usize::MAX);
            space.cover_wait(&mut table, covered, wait).await.map_err(|source| self.memory(source))?;
            kv.tokens = covered as u64;
            kv.paged = Some((space, table));
            kv.holding = Some(holders.join());
            return Ok(kv);
        }
        let lease = self.shared.kv.allocate_wait(bytes, scope, wait).await.map_err(|source| self.memory(source))?;
        kv.leases.push(lease);
        kv.tokens = tokens;
        Ok(kv)
    }

    /// The prompt's tokens: on a blocking thread past a few kilobytes or for a conversation (a chat
    /// template runs), so that no runtime thread tokenizes a long prompt.
    async fn tokenize(&self, model: &Arc<dyn LoadedModel>, input: &Input) -> Result<Vec<TokenId>, ExecutorError> {
        let work = {
            let (model, input) = (Arc::clone(model), input.clone());
            move || match &input {
                Input::Prompt(text) => Ok(model.tokenize(text)),
                Input::Chat(messages) => model.chat_prompt(messages),
            }
        };
        let tokens = match input {
            Input::Prompt(text) if text.len() <= INLINE_TOKENIZE_MAX => work(),
            _ => tokio::task::spawn_blocking(work).await.map_err(|error| ExecutorError::Engine {
                model: self.model_id.to_owned(),
                source: EngineError::Fatal { message: format!("tokenizing: {error}") },
                retries: self.retries,
            })?,
        };
        tokens.map_err(|source| match source.kind() {
            ErrorKind::InvalidInput => self.invalid(source),
            _ => ExecutorError::Engine { model: self.model_id.to_owned(), source, retries: self.retries },
        })
    }

    fn invalid(&self, source: EngineError) -> ExecutorError {
        ExecutorError::InvalidRequest { model: self.model_id.to_owned(), source }
    }

    fn memory(&self, source: MemoryError) -> ExecutorError {
        ExecutorError::Memory { model: self.model_id.to_owned(), source }
    }

    /// Waits until a slow reader takes `event`, at most for the reader's limit (or to the request's whole
    /// limit), keeping the kv-cache marked in use meanwhile (a generation waiting for its reader is not
    /// idle memory). Past the limit the generation ends, and its memory, model and slot go back.
    async fn wait_for_reader(&self, event: Result<Event, ExecutorError>, kv: &KvCache) -> Result<(), Halt> {
        let send = self.events.send(event);
        let keep_alive = async {
            let mut ticks = tokio::time::interval(KEEP_ALIVE_TICK);
            loop {
                ticks.tick().await;
                if let Err(source) = kv.touch() {
                    return source;
                }
            }
        };
        let limit = self.limits.deadline(Phase::Reader, Instant::now());
        let outcome = bounded(limit, async {
            tokio::select! {
                sent = send => sent.map_err(|_| Halt::ReaderGone),
                revoked = keep_alive => Err(Halt::Failed(self.memory(revoked))),
            }
        });
        outcome.await?
    }

    /// Sends an event, waiting for a slow reader at most for the reader's limit (or to the request's
    /// whole limit).
    async fn send(&self, event: Event) -> Result<(), Halt> {
        let limit = self.limits.deadline(Phase::Reader, Instant::now());
        bounded(limit, self.events.send(Ok(event))).await?.map_err(|_| Halt::ReaderGone)
    }
}

/// What a step reads.
struct Step<'a> {
    model: &'a dyn LoadedModel,
    plan: &'a MemoryPlan,
    prompt: &'a [TokenId],
    generated: &'a [TokenId],
    params: &'a GenerationParams,
    /// The request's input, checked once at its start: a new sequence's prefill.
    checked: Prefill<'a>,
    scope: ScopeId,
    priority: Priority,
    /// The model's batching loop, where it batches.
    batcher: Option<&'a Arc<Batcher>>,
}

impl KvCache {
    /// Gives a paged sequence's blocks back (its published ones stay cached, and its prompt takes
    /// those it finds again): the next prefill covers its context anew.
    fn release(&mut self, prompt: &[TokenId]) {
        if let Some((space, table)) = &mut self.paged {
            *table = space.start(prompt);
            self.tokens = 0;
            self.preempted = true;
        }
    }

    /// Marks every lease in use now, so that the GC leaves them alone for another idle period.
    fn touch(&self) -> Result<(), MemoryError> {
        if let Some((space, table)) = &self.paged {
            space.touch(table)?;
        }
        self.leases.iter().try_for_each(Lease::touch)
    }

    /// Makes the cache hold `tokens` tokens, growing it by one token's worth at a time, or a block at a
    /// time where it is paged (then `sequence` learns its new blocks), waiting under pressure.
    async fn cover(
        &mut self,
        tokens: usize,
        generation: &Run<'_>,
        scope: ScopeId,
        sequence: Option<&dyn Sequence>,
    ) -> Result<(), Failure> {
        if let Some((space, table)) = &mut self.paged {
            if self.tokens < tokens as u64 {
                if std::mem::take(&mut self.preempted)
                    && let Some(holding) = &self.holding
                {
                    holding.turn().await;
                }
                let had = table.ids().len();
                let wait = generation.shared.config.memory_wait;
                loop {
                    match space.cover_wait(table, tokens, wait).await {
                        Ok(()) => break,
                        // The oldest waits on while the others give their blocks back.
                        Err(MemoryError::TimedOut { .. }) if self.holding.as_ref().is_some_and(Holding::is_oldest) => {}
                        // Blocks held by others: give ours back and resume later (`Failure::Preempted`).
                        Err(error @ (MemoryError::TimedOut { .. } | MemoryError::Exhausted { .. })) => {
                            return Err(Failure::Preempted(error));
                        }
                        Err(error) => return Err(Failure::Memory(error)),
                    }
                }
                self.tokens = tokens as u64;
                if let Some(sequence) = sequence.filter(|_| table.ids().len() > had) {
                    sequence.set_blocks(table.ids());
                }
            }
            return Ok(());
        }
        while self.tokens < tokens as u64 {
            let grown = match self.leases.last_mut() {
                Some(lease) => lease.try_grow(self.per_token),
                None => Err(MemoryError::Exhausted {
                    pool: generation.shared.kv.name().to_owned(),
                    requested: self.per_token,
                    available: 0,
                    waiters: 0,
                }),
            };
            match grown {
                Ok(()) => {}
                Err(MemoryError::Exhausted { .. }) => {
                    let wait = generation.shared.config.memory_wait;
                    let lease = generation.shared.kv.allocate_wait(self.per_token, scope, wait).await;
                    self.leases.push(lease.map_err(Failure::Memory)?);
                }
                Err(error) => return Err(Failure::Memory(error)),
            }
            self.tokens += 1;
        }
        Ok(())
    }
}

/// The `max_tokens` that fits the context after the prompt, when the request lets the executor fit it
/// (its `max_tokens` is a default) and its own does not fit; `None` to keep the request's. A prompt that
/// leaves no room keeps it too, and is refused by the context check.
fn fitted_max_tokens(request: &Request, plan: &MemoryPlan, prompt_tokens: usize) -> Option<u32> {
    let room = u64::from(plan.max_context_tokens).checked_sub(prompt_tokens as u64)?;
    let room = u32::try_from(room).expect("at most the context");
    (request.fit_to_context && room > 0 && room < request.params.max_tokens).then_some(room)
}

/// Publishes the full blocks of a paged sequence's prompt, whose kv (but the last token's, the first
/// step's) is computed.
fn publish(kv: &mut KvCache, prompt: &[TokenId]) -> Result<(), Failure> {
    if let Some((space, table)) = &mut kv.paged {
        space.publish(table, &prompt[..prompt.len().saturating_sub(1)]).map_err(Failure::Memory)?;
    }
    Ok(())
}
