//! The executor's metrics, through the `metrics` facade, and the same figures as plain counters for
//! [`ExecutorStats`](crate::ExecutorStats).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Unit, describe_counter, describe_gauge, describe_histogram};

use crate::error::Phase;

/// From submission to the first token.
pub const TIME_TO_FIRST_TOKEN_SECONDS: &str = "usine_executor_time_to_first_token_seconds";
/// Between two tokens of one generation.
pub const TIME_BETWEEN_TOKENS_SECONDS: &str = "usine_executor_time_between_tokens_seconds";
/// Tokens generated.
pub const TOKENS_TOTAL: &str = "usine_executor_tokens_total";
/// Requests, by outcome.
pub const REQUESTS_TOTAL: &str = "usine_executor_requests_total";
/// Timeouts, by phase.
pub const TIMEOUTS_TOTAL: &str = "usine_executor_timeouts_total";
/// Transient failures retried.
pub const RETRIES_TOTAL: &str = "usine_executor_retries_total";
/// Requests waiting for a slot.
pub const QUEUE_DEPTH: &str = "usine_executor_queue_depth";
/// Generations running.
pub const RUNNING: &str = "usine_executor_running";
/// Time the compute stage waited for the prepare stage, per generation (its sum is the total dead time).
pub const PIPELINE_IDLE_SECONDS: &str = "usine_executor_pipeline_idle_seconds";

/// Generations pre-empted for kv blocks (resumed by recompute).
pub const PREEMPTIONS_TOTAL: &str = "usine_executor_preemptions_total";
/// Sequences a batched step advanced.
pub const BATCH_SIZE: &str = "usine_executor_batch_size";
/// Tokens a batched step computed: a step's one, a prompt chunk's all.
pub const PASS_TOKENS: &str = "usine_executor_pass_tokens";

/// How a request ended, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// It finished: length, stop sequence or end of sequence.
    Completed,
    /// Its reader dropped the stream.
    Cancelled,
    /// Refused at once: queue full, executor closed.
    Rejected,
    /// The request was wrong: parameters out of range, a prompt over the context.
    Invalid,
    /// A phase ran out of time.
    Timeout,
    /// Anything else.
    Failed,
}

const OUTCOMES: [Outcome; 6] =
    [Outcome::Completed, Outcome::Cancelled, Outcome::Rejected, Outcome::Invalid, Outcome::Timeout, Outcome::Failed];
pub(crate) const PHASES: [Phase; 5] =
    [Phase::Queue, Phase::FirstToken, Phase::BetweenTokens, Phase::Total, Phase::Reader];

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Rejected => "rejected",
            Self::Invalid => "invalid",
            Self::Timeout => "timeout",
            Self::Failed => "failed",
        }
    }
}

/// Describes every metric of this crate to the installed recorder.
pub fn describe_metrics() {
    describe_histogram!(
        TIME_TO_FIRST_TOKEN_SECONDS,
        Unit::Seconds,
        "Time from a request's submission to its first token."
    );
    describe_histogram!(TIME_BETWEEN_TOKENS_SECONDS, Unit::Seconds, "Time between two tokens of one generation.");
    describe_counter!(TOKENS_TOTAL, Unit::Count, "Tokens generated.");
    describe_counter!(
        REQUESTS_TOTAL,
        Unit::Count,
        "Requests, by outcome: completed, cancelled, rejected (refused at once), invalid (the request was wrong), timeout, failed."
    );
    describe_counter!(
        TIMEOUTS_TOTAL,
        Unit::Count,
        "Requests that ran out of time, by phase: queue, first_token, between_tokens, total, reader."
    );
    describe_counter!(RETRIES_TOTAL, Unit::Count, "Transient engine failures retried.");
    describe_gauge!(QUEUE_DEPTH, Unit::Count, "Requests waiting for a generation slot.");
    describe_gauge!(RUNNING, Unit::Count, "Generations running.");
    describe_histogram!(
        BATCH_SIZE,
        Unit::Count,
        "Sequences one batched step of a model advanced (steps and prompt chunks)."
    );
    describe_histogram!(
        PASS_TOKENS,
        Unit::Count,
        "Tokens one batched step of a model computed: a step's one, a prompt chunk's all."
    );
    describe_counter!(PREEMPTIONS_TOTAL, Unit::Count, "Generations pre-empted for kv blocks, resumed by recompute.");
    describe_histogram!(
        PIPELINE_IDLE_SECONDS,
        Unit::Seconds,
        "Time the compute stage of a generation sat idle waiting for the prepare stage (the pipeline's dead time)."
    );
}

/// Handles to the facade's metrics, bound once, and the counters behind `ExecutorStats`.
pub(crate) struct ExecutorMetrics {
    pub(crate) time_to_first_token: Histogram,
    pub(crate) time_between_tokens: Histogram,
    tokens: Counter,
    requests: [Counter; 6],
    timeouts: [Counter; 5],
    retries: Counter,
    queue_depth: Gauge,
    running: Gauge,
    pipeline_idle: Histogram,
    batch_size: Histogram,
    pass_tokens: Histogram,
    preemptions: Counter,
    pub(crate) counts: Counts,
}

/// Totals since the executor started.
#[derive(Default)]
pub(crate) struct Counts {
    pub(crate) outcomes: [AtomicU64; 6],
    pub(crate) timeouts: [AtomicU64; 5],
    pub(crate) tokens: AtomicU64,
    pub(crate) retries: AtomicU64,
    pub(crate) pipeline_idle_nanos: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) batched_steps: AtomicU64,
    pub(crate) filled_tokens: AtomicU64,
    pub(crate) preemptions: AtomicU64,
}

impl ExecutorMetrics {
    pub(crate) fn register() -> Self {
        describe_metrics();
        Self {
            time_to_first_token: metrics::histogram!(TIME_TO_FIRST_TOKEN_SECONDS),
            time_between_tokens: metrics::histogram!(TIME_BETWEEN_TOKENS_SECONDS),
            tokens: metrics::counter!(TOKENS_TOTAL),
            requests: OUTCOMES.map(|outcome| metrics::counter!(REQUESTS_TOTAL, "outcome" => outcome.as_str())),
            timeouts: PHASES.map(|phase| metrics::counter!(TIMEOUTS_TOTAL, "phase" => phase.as_str())),
            retries: metrics::counter!(RETRIES_TOTAL),
            queue_depth: metrics::gauge!(QUEUE_DEPTH),
            running: metrics::gauge!(RUNNING),
            pipeline_idle: metrics::histogram!(PIPELINE_IDLE_SECONDS),
            batch_size: metrics::histogram!(BATCH_SIZE),
            pass_tokens: metrics::histogram!(PASS_TOKENS),
            preemptions: metrics::counter!(PREEMPTIONS_TOTAL),
            counts: Counts::default(),
        }
    }

    /// A batched step of `steps` and `fills` prompt chunks, `tokens` in all.
    #[expect(clippy::cast_precision_loss, reason = "at most MAX_BATCH sequences and MAX_PASS_TOKENS tokens")]
    pub(crate) fn batch(&self, steps: usize, fills: usize, tokens: usize) {
        self.batch_size.record((steps + fills) as f64);
        self.pass_tokens.record(tokens as f64);
        if steps > 0 {
            self.counts.batches.fetch_add(1, Ordering::Relaxed); // a pass of prompt chunks only steps none
        }
        self.counts.batched_steps.fetch_add(steps as u64, Ordering::Relaxed);
        self.counts.filled_tokens.fetch_add((tokens - steps) as u64, Ordering::Relaxed);
    }

    /// A generation pre-empted for kv blocks.
    pub(crate) fn preemption(&self) {
        self.preemptions.increment(1);
        self.counts.preemptions.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_load(&self, running: usize, queued: usize) {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        {
            self.running.set(running as f64);
            self.queue_depth.set(queued as f64);
        }
    }

    pub(crate) fn outcome(&self, outcome: Outcome) {
        let index = OUTCOMES.iter().position(|o| *o == outcome).expect("every outcome is listed");
        self.requests[index].increment(1);
        self.counts.outcomes[index].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn timeout(&self, phase: Phase) {
        let index = PHASES.iter().position(|p| *p == phase).expect("every phase is listed");
        self.timeouts[index].increment(1);
        self.counts.timeouts[index].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn retry(&self) {
        self.retries.increment(1);
        self.counts.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// Emitted once per generation, at its end (cancelled ones included).
    pub(crate) fn generation(&self, tokens: u32, pipeline_idle: Duration) {
        self.tokens.increment(u64::from(tokens));
        self.counts.tokens.fetch_add(u64::from(tokens), Ordering::Relaxed);
        self.pipeline_idle.record(pipeline_idle.as_secs_f64());
        self.counts.pipeline_idle_nanos.fetch_add(saturating_nanos(pipeline_idle), Ordering::Relaxed);
    }

    pub(crate) fn outcomes(&self, outcome: Outcome) -> u64 {
        let index = OUTCOMES.iter().position(|o| *o == outcome).expect("every outcome is listed");
        self.counts.outcomes[index].load(Ordering::Relaxed)
    }

    pub(crate) fn timeouts_in(&self, phase: Phase) -> u64 {
        let index = PHASES.iter().position(|p| *p == phase).expect("every phase is listed");
        self.counts.timeouts[index].load(Ordering::Relaxed)
    }
}

pub(crate) fn saturating_nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}
