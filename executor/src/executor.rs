//! `TaskExecutor`: admits requests, runs each generation as a task, and hands back its stream.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use usine_kernel::RuntimeManager;
use usine_memory::MemoryManager;

use crate::admission::{Admission, Ticket};
use crate::config::{ConfigError, ExecutorConfig};
use crate::error::ExecutorError;
use crate::metrics::{ExecutorMetrics, Outcome};
use crate::request::Request;
use crate::run::{Shared, run};
use crate::stream::GenerationStream;

/// Turns requests into streams of tokens: admission, the model from the kernel, memory from the pools,
/// pipelined steps, retries and time limits. Cheap to clone.
#[derive(Clone)]
pub struct TaskExecutor {
    shared: Arc<Shared>,
    admission: Arc<Admission>,
    runtime: tokio::runtime::Handle,
    requests: Arc<AtomicU64>,
    closed: Arc<AtomicBool>,
}

/// The executor's figures since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExecutorStats {
    /// Generations running now.
    pub running: usize,
    /// Requests waiting for a slot now.
    pub queued: usize,
    /// Requests that finished (length, stop sequence or end of sequence).
    pub completed: u64,
    /// Requests whose reader dropped the stream first.
    pub cancelled: u64,
    /// Requests refused at once: queue full, executor closed.
    pub rejected: u64,
    /// Requests that were wrong: parameters out of range, a prompt over the context.
    pub invalid: u64,
    /// Requests that ran out of time, in any phase.
    pub timed_out: u64,
    /// Requests that failed otherwise.
    pub failed: u64,
    /// Timeouts in each phase: queue, first token, between tokens, total, reader.
    pub timeouts_by_phase: [u64; 5],
    /// Tokens generated.
    pub tokens: u64,
    /// Transient failures retried.
    pub retries: u64,
    /// Time compute stages sat idle waiting for prepare stages.
    pub pipeline_idle: Duration,
    /// Batched steps run (each advancing one or more sequences of a model that batches; a pass that
    /// only computed prompts' chunks is not one).
    pub batches: u64,
    /// Sequence steps those advanced: over `batches`, the mean batch size.
    pub batched_steps: u64,
    /// Prompt tokens computed in chunks in those passes (chunked prefill).
    pub filled_tokens: u64,
    /// Generations pre-empted for kv blocks, each resumed by recompute.
    pub preemptions: u64,
}

impl TaskExecutor {
    /// An executor over `kernel`, taking memory from `memory`'s pools named in `config` (they must
    /// exist), on the current tokio runtime.
    pub fn new(config: ExecutorConfig, kernel: &RuntimeManager, memory: &MemoryManager) -> Result<Self, ExecutorError> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ExecutorError::NoRuntime)?;
        let pool = |name: &'static str, pool: &str| {
            memory.pool(pool).map_err(|error| ConfigError {
                name,
                value: format!("`{pool}`"),
                limit: format!("the memory manager's pools ({error})"),
            })
        };
        let kv = pool("kv_pool", &config.kv_pool)?;
        let activations = pool("activations_pool", &config.activations_pool)?;
        let metrics = Arc::new(ExecutorMetrics::register());
        let admission = Admission::new(config.max_concurrent, config.queue_capacity, Arc::clone(&metrics));
        let shared = Arc::new(Shared {
            kernel: kernel.clone(),
            kv,
            activations,
            config,
            metrics,
            batchers: crate::batch::Batchers::default(),
            spaces: crate::paged::Spaces::default(),
        });
        Ok(Self {
            shared,
            admission,
            runtime,
            requests: Arc::new(AtomicU64::new(0)),
            closed: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Starts a generation and returns its stream of events.
    ///
    /// Admission is decided now: with every slot taken and the queue full, this fails at once with
    /// [`ExecutorError::QueueFull`] (a server answers 429). Everything after (the queue wait, the load, the
    /// tokens) comes through the stream; dropping it cancels the generation.
    pub fn generate(&self, request: Request) -> Result<GenerationStream, ExecutorError> {
        let mut streams = self.generate_batch(vec![request])?;
        Ok(streams.pop().expect("one stream per request"))
    }

    /// Starts several generations in one admission pass: all are admitted (running or queued) or, if
    /// the queue cannot take all that must wait, none is. Free slots go to the most urgent first. A
    /// request whose parameters are out of range refuses the batch ([`ExecutorError::InvalidRequest`]).
    pub fn generate_batch(&self, requests: Vec<Request>) -> Result<Vec<GenerationStream>, ExecutorError> {
        if self.closed.load(Ordering::Acquire) {
            requests.iter().for_each(|_| self.shared.metrics.outcome(Outcome::Rejected));
            return Err(ExecutorError::ShuttingDown);
        }
        // Parameters out of range are refused before they take a place, a slot or a model load.
        for request in &requests {
            if let Err(source) = request.params.validate() {
                requests.iter().for_each(|_| self.shared.metrics.outcome(Outcome::Invalid));
                return Err(ExecutorError::InvalidRequest { model: request.model.clone(), source });
            }
        }
        let submitted = Instant::now();
        let priorities: Vec<_> = requests.iter().map(|request| request.priority).collect();
        let tickets = match self.admission.admit(&priorities) {
            Ok(tickets) => {
                // Fields are computed only when the event is enabled.
                let queued = tickets.iter().filter(|ticket| matches!(ticket, Ticket::Queued(_)));
                tracing::debug!(requests = tickets.len(), queued = queued.count(), "admitted");
                tickets
            }
            Err(error) => {
                tracing::debug!(%error, "refused");
                for _ in &requests {
                    self.shared.metrics.outcome(Outcome::Rejected);
                }
                return Err(error);
            }
        };
        let first = self.requests.fetch_add(requests.len() as u64, Ordering::Relaxed);
        let streams = requests
            .into_iter()
            .zip(tickets)
            .zip(first..)
            .map(|((request, ticket), number)| {
                // One place more, kept for the last event.
                let (events, receiver) = mpsc::channel(self.shared.config.channel_capacity + 1);
                let seed = self.shared.config.retry.seed ^ number.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                let span = tracing::info_span!("generation", model = request.model, request = number);
                let task = run(Arc::clone(&self.shared), request, ticket, submitted, seed, events);
                let task = tracing::Instrument::instrument(task, span);
                GenerationStream::new(receiver, self.runtime.spawn(task))
            })
            .collect();
        Ok(streams)
    }

    /// Refuses new requests from now on ([`ExecutorError::ShuttingDown`]); those admitted go on.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// The kernel the executor loads models from.
    pub fn kernel(&self) -> &RuntimeManager {
        &self.shared.kernel
    }

    /// The settings.
    pub fn config(&self) -> &ExecutorConfig {
        &self.shared.config
    }

    /// The figures since the executor started.
    pub fn stats(&self) -> ExecutorStats {
        let (running, queued) = self.admission.load();
        let metrics = &self.shared.metrics;
        ExecutorStats {
            running,
            queued,
            completed: metrics.outcomes(Outcome::Completed),
            cancelled: metrics.outcomes(Outcome::Cancelled),
            rejected: metrics.outcomes(Outcome::Rejected),
            invalid: metrics.outcomes(Outcome::Invalid),
            timed_out: metrics.outcomes(Outcome::Timeout),
            failed: metrics.outcomes(Outcome::Failed),
            timeouts_by_phase: crate::metrics::PHASES.map(|phase| metrics.timeouts_in(phase)),
            tokens: metrics.counts.tokens.load(Ordering::Relaxed),
            retries: metrics.counts.retries.load(Ordering::Relaxed),
            pipeline_idle: Duration::from_nanos(metrics.counts.pipeline_idle_nanos.load(Ordering::Relaxed)),
            batches: metrics.counts.batches.load(Ordering::Relaxed),
            batched_steps: metrics.counts.batched_steps.load(Ordering::Relaxed),
            filled_tokens: metrics.counts.filled_tokens.load(Ordering::Relaxed),
            preemptions: metrics.counts.preemptions.load(Ordering::Relaxed),
        }
    }
}

impl std::fmt::Debug for TaskExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskExecutor").field("config", &self.shared.config).field("stats", &self.stats()).finish()
    }
}
