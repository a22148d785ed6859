//! The executor's settings: slots and queue, pipelining, memory, retry and time limits.

use std::time::Duration;

use usine_memory::{ACTIVATIONS, KV_CACHE};

/// Most generation slots and queue places one executor takes: beyond, a setting is an error.
pub const MAX_SLOTS: usize = 1 << 16;
/// Most tokens buffered between a generation and its reader.
pub const MAX_CHANNEL_CAPACITY: usize = 1 << 16;
/// Most pre-emptions of one generation one setting allows.
pub const MAX_PREEMPTIONS: u32 = 1 << 10;
/// Most sequences one batched step may advance.
pub const MAX_BATCH: usize = 1 << 10;
/// Most tokens one batched step may compute.
pub const MAX_PASS_TOKENS: usize = 1 << 16;
/// The longest wait between two tries of a request.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// How a sequence's kv-cache is reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvReservation {
    /// All of it before the first step: the prompt plus `max_tokens`, up to
    /// [`ExecutorConfig::kv_up_front_share`] of the pool; past that, one token's more per step. A
    /// generation within the share always has the memory to finish; one that stops early held more
    /// than it used.
    #[default]
    UpFront,
    /// The prompt's before the first step, then one token's more per step (waiting for it under
    /// pressure): a generation holds what it uses, and may wait mid-stream.
    PerToken,
}

/// Retries of transient engine failures, with exponential backoff and jitter.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Most retries of one request (3); 0 turns retrying off.
    pub max_retries: u32,
    /// The wait before the first retry (50 ms); it doubles each time.
    pub initial_backoff: Duration,
    /// The longest wait between two tries (2 s).
    pub max_backoff: Duration,
    /// Each wait varies by up to this fraction around its value (0.2), so that failed requests do not
    /// all retry at the same instant; 0 for exact waits.
    pub jitter: f64,
    /// Seed of the jitter.
    pub seed: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 3,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            jitter: 0.2,
            seed: 0x5EED,
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 for the first), before jitter.
    pub fn backoff(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        self.initial_backoff.saturating_mul(1 << doublings).min(self.max_backoff)
    }
}

/// Time limits of a request's phases; `None` is no limit. See [`Phase`](crate::Phase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timeouts {
    /// Waiting in the admission queue.
    pub queue: Option<Duration>,
    /// From leaving the queue to the first token: load (a compile, the first time), prefill, first step.
    pub first_token: Option<Duration>,
    /// Between two tokens, not counting time blocked on a slow reader.
    pub between_tokens: Option<Duration>,
    /// The whole request.
    pub total: Option<Duration>,
    /// Blocked on a reader that takes no event while its channel is full; past it, the generation is
    /// cancelled and its memory, model and slot return at once.
    pub reader: Option<Duration>,
}

impl Timeouts {
    /// The executor's standard limits (its default): a minute in the queue, five minutes to the first
    /// token (room for a compile), thirty seconds between tokens, ten minutes for the whole (the first
    /// token's five and 4,096 tokens at 28 a second, the slowest model of the catalog, fit with room),
    /// ten seconds blocked on a reader. (`default()` sets no limit at all.)
    pub fn standard() -> Self {
        Self {
            queue: Some(Duration::from_secs(60)),
            first_token: Some(Duration::from_secs(300)),
            between_tokens: Some(Duration::from_secs(30)),
            total: Some(Duration::from_secs(600)),
            reader: Some(Duration::from_secs(10)),
        }
    }

    /// These limits, each replaced by `overrides`' where that one is set.
    pub fn overridden_by(self, overrides: &TimeoutOverrides) -> Self {
        Self {
            queue: overrides.queue.or(self.queue),
            first_token: overrides.first_token.or(self.first_token),
            between_tokens: overrides.between_tokens.or(self.between_tokens),
            total: overrides.total.or(self.total),
            reader: overrides.reader.or(self.reader),
        }
    }
}

/// A request's own time limits: each one set replaces the executor's ([`Timeouts`]); `None` keeps the
/// executor's (which may be no limit). See [`Phase`](crate::Phase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeoutOverrides {
    /// Waiting in the admission queue.
    pub queue: Option<Duration>,
    /// From leaving the queue to the first token.
    pub first_token: Option<Duration>,
    /// Between two tokens, not counting time blocked on a slow reader.
    pub between_tokens: Option<Duration>,
    /// The whole request.
    pub total: Option<Duration>,
    /// Blocked on a reader that takes no event while its channel is full.
    pub reader: Option<Duration>,
}

/// The executor's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutorConfig {
    /// Most generations running at once (4).
    pub max_concurrent: usize,
    /// Most requests waiting for a slot (64); beyond, requests are refused at once.
    pub queue_capacity: usize,
    /// Overlap the prepare stage of step N+1 with the compute stage of step N (on).
    pub pipelining: bool,
    /// Events buffered between a generation and its reader (16): a slower reader slows the generation.
    pub channel_capacity: usize,
    /// The pool of the sequences' kv-cache.
    pub kv_pool: String,
    /// The pool of the steps' activations.
    pub activations_pool: String,
    /// How the kv-cache is reserved.
    pub kv_reservation: KvReservation,
    /// The largest part of the kv-cache pool one generation reserves before its first token (0.25, a
    /// quarter: the four slots of the default each find room); past it, it reserves per token.
    pub kv_up_front_share: f64,
    /// How long a generation waits for memory under pressure before it fails (500 ms).
    pub memory_wait: Duration,
    /// Retries of transient failures.
    pub retry: RetryPolicy,
    /// Time limits; a request may set its own.
    pub timeouts: Timeouts,
    /// Most sequences of one model one batched step advances (64), where the model batches (its
    /// engine's own bound applies too); 1 turns batching off, each sequence then steps on its own.
    pub max_batch: usize,
    /// The token budget of one batched step (512; the engine's own bound applies too): a sequence's step
    /// counts one token, a chunk of a prompt computed in the step (where the model prefills in passes)
    /// its tokens. Steps go first at one priority; the budget left takes prompts' chunks.
    pub max_pass_tokens: usize,
    /// Most times one generation is pre-empted (16): a paged sequence that finds no kv block within
    /// `memory_wait` gives its blocks back and resumes by recompute once blocks come free; past this,
    /// it fails with the memory error.
    pub max_preemptions: u32,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            max_concurrent: 4,
            queue_capacity: 64,
            pipelining: true,
            channel_capacity: 16,
            kv_pool: KV_CACHE.into(),
            activations_pool: ACTIVATIONS.into(),
            kv_reservation: KvReservation::UpFront,
            kv_up_front_share: 0.25,
            memory_wait: Duration::from_millis(500),
            retry: RetryPolicy::default(),
            timeouts: Timeouts::standard(),
            max_batch: 64,
            max_pass_tokens: 512,
            max_preemptions: 16,
        }
    }
}

/// A setting outside its limit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("executor setting `{name}` is {value}, outside {limit}")]
pub struct ConfigError {
    /// The setting.
    pub name: &'static str,
    /// Its value.
    pub value: String,
    /// What is allowed.
    pub limit: String,
}

impl ExecutorConfig {
    /// Checks every setting against its limit.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let outside = |name, value: String, limit: String| Err(ConfigError { name, value, limit });
        if !(1..=MAX_SLOTS).contains(&self.max_concurrent) {
            return outside("max_concurrent", self.max_concurrent.to_string(), format!("1..={MAX_SLOTS}"));
        }
        if self.queue_capacity > MAX_SLOTS {
            return outside("queue_capacity", self.queue_capacity.to_string(), format!("0..={MAX_SLOTS}"));
        }
        if !(1..=MAX_CHANNEL_CAPACITY).contains(&self.channel_capacity) {
            let limit = format!("1..={MAX_CHANNEL_CAPACITY}");
            return outside("channel_capacity", self.channel_capacity.to_string(), limit);
        }
        if self.max_preemptions > MAX_PREEMPTIONS {
            return outside("max_preemptions", self.max_preemptions.to_string(), format!("0..={MAX_PREEMPTIONS}"));
        }
        if !(1..=MAX_BATCH).contains(&self.max_batch) {
            return outside("max_batch", self.max_batch.to_string(), format!("1..={MAX_BATCH}"));
        }
        if !(1..=MAX_PASS_TOKENS).contains(&self.max_pass_tokens) {
            return outside("max_pass_tokens", self.max_pass_tokens.to_string(), format!("1..={MAX_PASS_TOKENS}"));
        }
        if !(0.0..=1.0).contains(&self.kv_up_front_share) {
            return outside("kv_up_front_share", self.kv_up_front_share.to_string(), "0..=1".into());
        }
        if !(0.0..=1.0).contains(&self.retry.jitter) {
            return outside("retry.jitter", self.retry.jitter.to_string(), "0..=1".into());
        }
        for (name, backoff) in
            [("retry.initial_backoff", self.retry.initial_backoff), ("retry.max_backoff", self.retry.max_backoff)]
        {
            if backoff > MAX_BACKOFF {
                return outside(name, format!("{backoff:?}"), format!("at most {MAX_BACKOFF:?}"));
            }
        }
        Ok(())
    }
}
