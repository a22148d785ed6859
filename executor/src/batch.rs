//! Continuous batching: one loop per loaded model that batches (its [`LoadedModel::max_batch`] is
//! above 1) advances every sequence ready for a step in one [`LoadedModel::compute_batch`], and
//! sequences join and leave it between steps (iteration-level scheduling).
//!
//! A generation keeps its own task (its time limits, retries, stop sequences and events are its own);
//! it hands its sequence to the loop ([`Batcher::join`]) and then *allows* steps: step `s` runs only
//! once the generation allows it, having covered its kv-cache for it. It allows one step ahead of the
//! token it waits for, so the loop computes step N+1 while the generation sends token N to its reader,
//! and every sequence of a pass is ready again for the next without waiting for its task. A generation
//! whose reader falls behind stops allowing, and its sequence sits out the passes until it catches up.
//!
//! Where the model prefills in passes ([`LoadedModel::open`]), a sequence's context is computed in
//! chunks in the same passes as the others' steps (chunked prefill), so a long prompt holds no one's
//! next token back for longer than a pass.
//!
//! The loop fills a pass by priority within a token budget (a step counts one token, a chunk its
//! tokens) and the batch's bound of sequences; at one priority, steps before chunks. One passed over
//! [`AGING_PASSES`] times in a row goes first, whatever its priority (no starvation). A pass's
//! activations come from the pool, one step's worth for the whole pass (an engine's plan covers a
//! batched step of its [`LoadedModel::max_pass_tokens`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use parking_lot::Mutex;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use usine_engine::{BatchStep, EngineError, Fill, LoadedModel, Prepared, Sequence, Token, TokenId};
use usine_memory::{Lease, MemoryError, Pool, ScopeId};

use crate::metrics::ExecutorMetrics;
use crate::request::Priority;

/// Passes a ready sequence may be passed over in a row before it goes first.
pub(crate) const AGING_PASSES: u32 = 8;

/// What a step of a batched sequence gives its generation.
pub(crate) type Outcome = Result<Stepped, StepFailure>;

/// A batched step's token, and the time its compute waited for prepare stages (the pipeline's dead
/// time, as a generation that steps alone counts it).
#[derive(Debug)]
pub(crate) struct Stepped {
    pub(crate) token: Token,
    pub(crate) idle: Duration,
}

/// A batched step that failed.
#[derive(Debug)]
pub(crate) enum StepFailure {
    Engine(EngineError),
    Memory(MemoryError),
    /// The engine panicked during the pass (a bug): each generation of the pass ends as one whose
    /// engine panicked in its own task does.
    Panicked(String),
}

/// The loops of one executor, one per loaded model that batches, made at the first generation that
/// needs one and ended when the last that used it leaves.
#[derive(Default)]
pub(crate) struct Batchers {
    loops: Mutex<HashMap<usize, Weak<Batcher>>>,
}

/// What a loop needs besides its model.
pub(crate) struct LoopContext {
    pub(crate) activations: Pool,
    pub(crate) activation_bytes: u64,
    pub(crate) memory_wait: Duration,
    pub(crate) max_batch: usize,
    /// Most tokens a pass computes.
    pub(crate) max_pass_tokens: usize,
    /// Prepare the next pass's steps while this one computes.
    pub(crate) pipelining: bool,
    pub(crate) metrics: Arc<ExecutorMetrics>,
}

impl Batchers {
    /// The loop of `model`, started now if it has none.
    pub(crate) fn of(&self, model: &Arc<dyn LoadedModel>, context: impl FnOnce() -> LoopContext) -> Arc<Batcher> {
        // The address of a model alive (the loop holds it) is its alone.
        let key = Arc::as_ptr(model).cast::<()>() as usize;
        let mut loops = self.loops.lock();
        if let Some(batcher) = loops.get(&key).and_then(Weak::upgrade)
            && Arc::ptr_eq(&batcher.model, model)
        {
            return batcher;
        }
        loops.retain(|_, batcher| batcher.strong_count() > 0);
        let (joins, members) = mpsc::unbounded_channel();
        let wake = Arc::new(Notify::new());
        let batcher = Arc::new(Batcher { model: Arc::clone(model), joins, wake: Arc::clone(&wake) });
        loops.insert(key, Arc::downgrade(&batcher));
        tokio::spawn(run(Arc::clone(model), members, wake, context()));
        batcher
    }
}

/// One model's loop, as its generations see it.
pub(crate) struct Batcher {
    model: Arc<dyn LoadedModel>,
    joins: mpsc::UnboundedSender<Member>,
    wake: Arc<Notify>,
}

/// A sequence's place in its model's loop, shared by the generation and the loop.
struct Lane {
    /// Steps below this may run: the generation covered their kv-cache.
    allowed: AtomicU32,
    /// The generation left (its [`Seat`] dropped).
    gone: AtomicBool,
}

/// A generation's seat in its model's loop: it allows steps and receives their tokens; dropping it
/// leaves the loop (a step under way is finished and its token dropped).
pub(crate) struct Seat {
    lane: Arc<Lane>,
    wake: Arc<Notify>,
    tokens: mpsc::UnboundedReceiver<Outcome>,
    /// Keeps the loop alive while the seat is taken.
    _batcher: Arc<Batcher>,
}

impl Batcher {
    /// Seats `sequence`, whose next step is `first` (its token before it `previous`), ending before
    /// `end`; its unfilled context is computed in passes at once, but no step runs until the generation
    /// allows it.
    pub(crate) fn join(
        self: &Arc<Self>,
        sequence: Arc<dyn Sequence>,
        first: u32,
        end: u32,
        previous: Option<TokenId>,
        priority: Priority,
    ) -> Seat {
        let lane = Arc::new(Lane { allowed: AtomicU32::new(first), gone: AtomicBool::new(false) });
        let (sender, tokens) = mpsc::unbounded_channel();
        let member = Member {
            lane: Arc::clone(&lane),
            unfilled: sequence.unfilled(),
            filled: 0,
            sequence,
            next: first,
            end,
            previous,
            priority,
            passed_over: 0,
            ahead: None,
            tokens: sender,
        };
        // The loop runs while a batcher exists (its sender is ours): the send cannot fail.
        let _ = self.joins.send(member);
        Seat { lane, wake: Arc::clone(&self.wake), tokens, _batcher: Arc::clone(self) }
    }
}

impl Seat {
    /// Lets the loop run every step below `end`.
    pub(crate) fn allow(&self, end: u32) {
        if self.lane.allowed.fetch_max(end, Ordering::AcqRel) < end {
            self.wake.notify_one();
        }
    }

    /// The outcome of the next step, in step order.
    pub(crate) async fn next(&mut self) -> Outcome {
        self.tokens.recv().await.unwrap_or_else(|| {
            Err(StepFailure::Engine(EngineError::Fatal { message: "the batching loop ended".to_owned() }))
        })
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.lane.gone.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// A seated sequence, as the loop holds it.
struct Member {
    lane: Arc<Lane>,
    sequence: Arc<dyn Sequence>,
    /// Its context tokens to compute in passes before its first step, and those computed.
    unfilled: usize,
    filled: usize,
    /// Its next step, and the step it ends before.
    next: u32,
    end: u32,
    previous: Option<TokenId>,
    priority: Priority,
    /// Passes in a row it was ready for and left out of.
    passed_over: u32,
    /// Its next step, prepared during the last pass's compute.
    ahead: Option<Prepared>,
    tokens: mpsc::UnboundedSender<Outcome>,
}

impl Member {
    fn ready(&self) -> bool {
        self.filled == self.unfilled && self.next < self.end && self.next < self.lane.allowed.load(Ordering::Acquire)
    }

    /// Context tokens it still has to fill (none once it may step).
    fn filling(&self) -> usize {
        if self.next < self.end { self.unfilled - self.filled } else { 0 }
    }

    fn left(&self) -> bool {
        self.gone() || self.next >= self.end
    }

    fn gone(&self) -> bool {
        self.lane.gone.load(Ordering::Acquire) || self.tokens.is_closed()
    }
}

/// The loop of one model: until its last generation leaves, a pass over the sequences ready, or a wait
/// for one to be.
async fn run(
    model: Arc<dyn LoadedModel>,
    mut joins: mpsc::UnboundedReceiver<Member>,
    wake: Arc<Notify>,
    context: LoopContext,
) {
    let max_batch = context.max_batch.min(model.max_batch()).max(1);
    let max_tokens = context.max_pass_tokens.min(model.max_pass_tokens()).max(1);
    let scope = ScopeId::fresh();
    let mut members: Vec<Member> = Vec::new();
    // The activations of the steps prepared ahead, during the last pass.
    let mut ahead: Option<Lease> = None;
    loop {
        let mut closed = false;
        loop {
            match joins.try_recv() {
                Ok(member) => members.push(member),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        members.retain(|member| !member.left());
        if members.iter().all(|member| member.ahead.is_none()) {
            ahead = None;
        }
        if closed && members.is_empty() {
            return; // no generation holds a seat, and none can take one
        }
        let mut ready: Vec<usize> =
            (0..members.len()).filter(|&index| members[index].ready() || members[index].filling() > 0).collect();
        if ready.is_empty() {
            // Nothing to run until a generation allows a step: the steps prepared ahead give their
            // activations back meanwhile (they are prepared again when they run).
            ahead = None;
            members.iter_mut().for_each(|member| member.ahead = None);
            // A grant and a leave notify; a permit stored while we looked is not lost.
            tokio::select! {
                joined = joins.recv() => match joined {
                    Some(member) => members.push(member),
                    None if members.is_empty() => return,
                    None => wake.notified().await,
                },
                () = wake.notified() => {}
            }
            continue;
        }
        // The long-passed-over first, then by priority, steps before chunks, then in order of joining.
        ready.sort_by_key(|&index| {
            let member = &members[index];
            (member.passed_over < AGING_PASSES, std::cmp::Reverse(member.priority), member.filling() > 0)
        });
        let (mut chosen, mut fills, mut budget) = (Vec::new(), Vec::new(), max_tokens);
        for index in ready {
            let member = &mut members[index];
            let filling = member.filling();
            if budget == 0 || chosen.len() + fills.len() == max_batch {
                member.passed_over += 1;
            } else if filling > 0 {
                let tokens = filling.min(budget);
                fills.push((index, tokens));
                budget -= tokens;
            } else {
                chosen.push(index);
                budget -= 1;
            }
        }
        chosen.sort_unstable(); // the batch in joining order (an engine's pass does not care; tests read it)
        fills.sort_unstable();
        ahead = pass(&model, &mut members, (&chosen, &fills), &context, scope, ahead.take(), &wake).await;
    }
}

/// One pass over `chosen` members' steps and `fills` (members, and the tokens of their contexts to
/// compute): their activations (those of the steps prepared ahead, or new), the steps' prepare stages
/// where none was made ahead, one compute beside the prepare stages of their next steps (pipelining,
/// and the first step of a sequence this pass fills up), and each token sent to its generation.
/// Returns the activations of the steps prepared ahead.
async fn pass(
    model: &Arc<dyn LoadedModel>,
    members: &mut [Member],
    (chosen, fills): (&[usize], &[(usize, usize)]),
    context: &LoopContext,
    scope: ScopeId,
    ahead: Option<Lease>,
    wake: &Notify,
) -> Option<Lease> {
    let activations = match (ahead, context.activation_bytes) {
        (Some(lease), _) => Some(lease),
        (None, 0) => None,
        (None, bytes) => match context.activations.allocate_wait(bytes, scope, context.memory_wait).await {
            Ok(lease) => Some(lease),
            Err(error) => {
                for &index in chosen.iter().chain(fills.iter().map(|(index, _)| index)) {
                    fail(&mut members[index], StepFailure::Memory(error.clone()));
                }
                return None;
            }
        },
    };
    // Steps not prepared ahead are prepared now, together: the compute waits for them all.
    let since = Instant::now();
    let preparing = chosen.iter().map(|&index| {
        let member = &mut members[index];
        member.passed_over = 0;
        let (ahead, sequence, step) = (member.ahead.take(), Arc::clone(&member.sequence), member.next);
        async move {
            match ahead {
                Some(prepared) if prepared.step() == step => Ok(prepared),
                _ => sequence.prepare(step).await,
            }
        }
    });
    let prepared = futures_util::future::join_all(preparing.collect::<Vec<_>>()).await;
    let mut steps = Vec::with_capacity(chosen.len());
    let mut stepped = Vec::with_capacity(chosen.len());
    for (&index, prepared) in chosen.iter().zip(prepared) {
        let member = &mut members[index];
        match prepared {
            Ok(prepared) => {
                steps.push(BatchStep { sequence: Arc::clone(&member.sequence), prepared, previous: member.previous });
                stepped.push(index);
            }
            Err(error) => fail(member, StepFailure::Engine(error)),
        }
    }
    let waited = since.elapsed();
    if steps.is_empty() && fills.is_empty() {
        return None;
    }
    let filled: Vec<Fill> = fills
        .iter()
        .map(|&(index, tokens)| {
            let member = &mut members[index];
            member.passed_over = 0;
            Fill { sequence: Arc::clone(&member.sequence), done: member.filled, tokens }
        })
        .collect();
    let tokens = steps.len() + fills.iter().map(|(_, tokens)| tokens).sum::<usize>();
    context.metrics.batch(steps.len(), filled.len(), tokens);
    // The next steps prepared during the compute, with activations of their own if free now (waiting
    // for them would hold back this pass's tokens): a stepped member's next, a member filled up now's
    // first.
    let next: Vec<(usize, Arc<dyn Sequence>, u32)> = stepped
        .iter()
        .filter(|&&index| members[index].next + 1 < members[index].end)
        .map(|&index| (index, members[index].next + 1))
        .chain(
            fills
                .iter()
                .filter(|&&(index, tokens)| members[index].filled + tokens == members[index].unfilled)
                .map(|&(index, _)| (index, members[index].next)),
        )
        .filter(|_| context.pipelining)
        .map(|(index, step)| (index, Arc::clone(&members[index].sequence), step))
        .collect();
    let ahead_activations = match context.activation_bytes {
        _ if next.is_empty() => None,
        0 => Some(None),
        bytes => context.activations.allocate(bytes, scope).ok().map(Some),
    };
    let compute = async {
        let outcomes = std::panic::AssertUnwindSafe(model.compute_pass(filled, steps)).catch_unwind().await;
        drop(activations); // the next pass's compute may need the room
        (outcomes, Instant::now())
    };
    let prepare = async {
        let preparing = next
            .iter()
            .filter(|_| ahead_activations.is_some())
            .map(|(index, sequence, step)| async move { (*index, sequence.prepare(*step).await) });
        (futures_util::future::join_all(preparing).await, Instant::now())
    };
    // A pass whose generations all left is dropped at once, and its activations with it.
    let passed: Vec<usize> = stepped.iter().copied().chain(fills.iter().map(|&(index, _)| index)).collect();
    let lanes: Vec<Arc<Lane>> = passed.iter().map(|&index| Arc::clone(&members[index].lane)).collect();
    let all_gone = async {
        loop {
            let notified = wake.notified();
            if lanes.iter().all(|lane| lane.gone.load(Ordering::Acquire)) {
                return;
            }
            notified.await;
        }
    };
    let ((outcomes, computed_at), (prepared, prepared_at)) = tokio::select! {
        done = async { tokio::join!(compute, prepare) } => done,
        () = all_gone => {
            for &index in &passed {
                members[index].end = members[index].next;
            }
            return None;
        }
    };
    let (fill_outcomes, outcomes) = match outcomes {
        Ok(outcomes) => outcomes,
        Err(panic) => {
            let message = panic_message(panic.as_ref());
            for &index in &passed {
                fail(&mut members[index], StepFailure::Panicked(message.clone()));
            }
            return None;
        }
    };
    let ahead_idle = prepared_at.saturating_duration_since(computed_at);
    if outcomes.len() != stepped.len() || fill_outcomes.len() != fills.len() {
        let message = format!(
            "the engine returned {} tokens and {} fills for a pass of {} steps and {} fills",
            outcomes.len(),
            fill_outcomes.len(),
            stepped.len(),
            fills.len()
        );
        for &index in &passed {
            fail(&mut members[index], StepFailure::Engine(EngineError::Fatal { message: message.clone() }));
        }
        return None;
    }
    for (&(index, tokens), outcome) in fills.iter().zip(fill_outcomes) {
        match outcome {
            Ok(()) => members[index].filled += tokens,
            Err(error) => {
                members[index].ahead = None;
                fail(&mut members[index], StepFailure::Engine(error));
            }
        }
    }
    let mut failed_ahead = Vec::new();
    for (index, prepared) in prepared {
        match prepared {
            Ok(prepared) => members[index].ahead = Some(prepared),
            Err(error) => failed_ahead.push((index, error)),
        }
    }
    for (&index, outcome) in stepped.iter().zip(outcomes) {
        let member = &mut members[index];
        match outcome {
            Ok(token) => {
                member.next += 1;
                member.previous = Some(token.id);
                if token.end_of_sequence {
                    member.end = member.next; // nothing after it: the member leaves
                }
                let idle = waited + if member.ahead.is_some() { ahead_idle } else { Duration::ZERO };
                // A generation gone meanwhile leaves at the next pass.
                let _ = member.tokens.send(Ok(Stepped { token, idle }));
            }
            Err(error) => {
                member.ahead = None;
                fail(member, StepFailure::Engine(error));
            }
        }
    }
    // A step prepared ahead that failed fails after the token before it is out.
    for (index, error) in failed_ahead {
        fail(&mut members[index], StepFailure::Engine(error));
    }
    ahead_activations.flatten()
}

/// What a panic said, if it said it in words.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|message| (*message).to_owned()))
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Tells `member`'s generation that its step failed; the member leaves (a retry seats a new one).
fn fail(member: &mut Member, failure: StepFailure) {
    member.end = member.next;
    let _ = member.tokens.send(Err(failure));
}
