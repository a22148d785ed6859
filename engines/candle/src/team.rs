//! The threads of a forward pass, working as a team: every thread runs the whole pass, computes its
//! share of each matrix product and of the attention heads, and the shares meet at a barrier.
//!
//! A pass is about sixty products at 58 M parameters. Waking a sleeping thread for each (a rayon task
//! per product) cost more than the second thread saved; here the team's threads are woken once per
//! pass (a rayon broadcast) and wait for each other at the barriers by spinning, which takes well
//! under a microsecond. The cheap steps between products (norms, rotations, activations) are done by
//! every thread on its own copy, rather than handed over.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use usine_engine::EngineError;

use crate::kernel::ROWS;
use crate::matrix::Matrix;

/// A barrier that spins, then parks: its waits are short between threads that all have a core, and a
/// waiter whose partner the system has descheduled (a busy machine) gives its core up instead of burning
/// it. A thread that panics poisons it, so that the others stop waiting instead of waiting forever.
struct SpinBarrier {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    poisoned: AtomicBool,
    /// The threads that stopped spinning and parked, woken by the last to arrive.
    parked: Mutex<Vec<std::thread::Thread>>,
}

/// Spins before a waiting thread parks: a few microseconds, longer than the steps between products take
/// when every thread has a core.
const SPINS: u32 = 1 << 14;

/// How long a parked waiter sleeps before it looks again on its own (a wake-up it missed, a poisoning).
const PARK: std::time::Duration = std::time::Duration::from_millis(1);

/// A thread of the team panicked: the pass is abandoned.
#[derive(Debug)]
pub(crate) struct Abandoned;

impl SpinBarrier {
    fn new(threads: usize) -> Self {
        Self {
            threads,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
            parked: Mutex::new(Vec::new()),
        }
    }

    fn wait(&self) -> Result<(), Abandoned> {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            // The last to arrive resets the count before it lets the others go, so that none of them
            // can arrive at the next barrier first.
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            self.wake();
            return Ok(());
        }
        let (mut spins, mut registered) = (0_u32, false);
        while self.generation.load(Ordering::Acquire) == generation {
            if self.poisoned.load(Ordering::Relaxed) {
                return Err(Abandoned);
            }
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else if !registered {
                // Registered before the last look, so that a release after it finds this thread.
                self.parked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(std::thread::current());
                registered = true;
            } else {
                std::thread::park_timeout(PARK);
            }
        }
        Ok(())
    }

    /// Unparks the parked waiters (an unpark before their park makes the park return at once).
    fn wake(&self) {
        let parked = std::mem::take(&mut *self.parked.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for thread in parked {
            thread.unpark();
        }
    }
}

/// What the threads share during a pass: two exchange buffers (a share is written into one while the
/// other may still be read) and the barrier.
struct Exchange {
    buffers: [Vec<AtomicU32>; 2],
    barrier: SpinBarrier,
}

/// The threads of an engine's forward passes; one pass at a time.
pub(crate) struct Team {
    /// None for one thread: the pass runs on the caller's thread.
    pool: Option<rayon::ThreadPool>,
    threads: usize,
    exchange: Mutex<Exchange>,
}

impl Team {
    pub(crate) fn new(threads: usize) -> Result<Self, EngineError> {
        let pool = if threads == 1 {
            None
        } else {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|index| format!("usine-candle-{index}"))
                    .build()
                    .map_err(|error| EngineError::Fatal { message: format!("starting {threads} threads: {error}") })?,
            )
        };
        let exchange = Exchange { buffers: [Vec::new(), Vec::new()], barrier: SpinBarrier::new(threads) };
        Ok(Self { pool, threads, exchange: Mutex::new(exchange) })
    }

    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// A tuner for the passes of one kind (one model's): each model is timed apart, since two models
    /// gain differently from more threads.
    pub(crate) fn tuner(&self) -> Mutex<Tuner> {
        Mutex::new(Tuner::new(self.threads))
    }

    /// Runs `pass` on the team's threads, as many as `tuner` finds fastest now, with exchange buffers
    /// of `width` values, and returns the first thread's result. Passes from several callers take
    /// turns (a pass needs every thread it runs on).
    pub(crate) fn run<T: Send>(
        &self,
        width: usize,
        tuner: &Mutex<Tuner>,
        pass: impl Fn(&Rank<'_>) -> Result<T, Abandoned> + Sync,
    ) -> Result<T, EngineError> {
        self.run_tokens(width, (tuner, 1), pass)
    }

    /// [`run`](Self::run) for a pass of `tokens` tokens, whose time `tuner` takes per token: a tuner
    /// whose passes vary in size (a batch's steps, a prompt's chunks beside them) compares like with
    /// like, and a long pass does not look like a slowdown.
    pub(crate) fn run_tokens<T: Send>(
        &self,
        width: usize,
        (tuner, tokens): (&Mutex<Tuner>, usize),
        pass: impl Fn(&Rank<'_>) -> Result<T, Abandoned> + Sync,
    ) -> Result<T, EngineError> {
        let mut guard = self.exchange.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Always taken after the exchange's lock: passes are serialized by it, so this never waits.
        let mut tuner = tuner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let active = tuner.next().min(self.threads);
        guard.barrier.threads = active;
        guard.barrier.poisoned.store(false, Ordering::Relaxed);
        guard.barrier.arrived.store(0, Ordering::Relaxed);
        for buffer in &mut guard.buffers {
            if buffer.len() < width {
                buffer.resize_with(width, || AtomicU32::new(0));
            }
        }
        let started = std::time::Instant::now();
        let exchange = &*guard;
        let run_rank = |index: usize| {
            let rank = Rank { index, threads: active, exchange, turn: std::cell::Cell::new(0) };
            // A panic poisons the barrier on its way out, so that the other threads stop waiting.
            let poison = PoisonOnPanic(&exchange.barrier);
            let result = pass(&rank);
            std::mem::forget(poison);
            result
        };
        // A panic in a pass (a bug) reaches the caller as an error; the other threads, told by the
        // poisoned barrier, have returned `Abandoned`.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &self.pool {
            Some(pool) if active > 1 => pool
                .broadcast(|context| (context.index() < active).then(|| run_rank(context.index())))
                .swap_remove(0)
                .expect("rank 0 is always active"),
            _ => run_rank(0),
        }));
        tuner.record(started.elapsed() / u32::try_from(tokens.max(1)).unwrap_or(u32::MAX));
        match outcome {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(Abandoned)) | Err(_) => {
                Err(EngineError::Fatal { message: "a forward pass panicked and was abandoned".to_owned() })
            }
        }
    }
}

/// Chooses how many of the team's threads a pass uses, by timing passes: more threads are faster on a
/// quiet machine and a large model, slower on a small model, and far slower when another process holds
/// a core (a thread waits at every barrier for a partner the system has descheduled). It runs the
/// current count, and now and then a few passes at a neighbouring count (half or double), keeping the
/// faster; a pass much slower than usual (a process started beside us) probes at once. Probes grow
/// rarer while they confirm the choice.
#[derive(Debug)]
pub(crate) struct Tuner {
    /// The counts it may choose: powers of two up to the team's size, and that size.
    counts: Vec<usize>,
    /// Index of the count in use.
    current: usize,
    /// The last passes at the count in use, in seconds; the fastest of them is its speed (a pass the
    /// system interrupted is slow, none is fast by chance).
    recent: Vec<f64>,
    /// Passes before the next probe, and between probes now.
    until_probe: u32,
    interval: u32,
    /// The probe under way: the count's index, and its passes so far (the first not counted).
    probe: Option<(usize, Vec<f64>)>,
    /// Which neighbour the next probe tries, when there are two.
    upward: bool,
    /// No pass has run yet.
    cold: bool,
}

/// Passes a count's speed is taken over (the fastest of them), and a probe's counted passes.
const WINDOW: usize = 4;
/// Passes before the first probe (after the first, cold one): a window.
const FIRST_PROBE: u32 = 4;
/// Passes between probes: from this while the choice changes...
const MIN_INTERVAL: u32 = 32;
/// ...doubling up to this while probes confirm it.
const MAX_INTERVAL: u32 = 512;
/// Two passes in a row this many times the speed probe at once (a process started beside us); a
/// probe's pass this slow ends it.
const SLOWDOWN: f64 = 3.0;
/// A probe's first pass wakes its threads: only this much slower ends the probe.
const WAKING_SLOWDOWN: f64 = 10.0;
/// A probed count is taken when its passes take at most this share of the current count's.
const GAIN: f64 = 0.9;

impl Tuner {
    /// The most threads it chooses: the team's.
    pub(crate) fn team_size(&self) -> usize {
        self.counts.last().copied().unwrap_or(1)
    }

    /// A tuner for long passes (a prompt's, 64 tokens each): it first probes after [`MIN_INTERVAL`]
    /// passes rather than [`FIRST_PROBE`], since a probe of one thread costs a whole long pass and a
    /// prompt of 512 tokens is only 8 of them (the early probes took a third of a prompt's passes).
    pub(crate) fn patient(threads: usize) -> Self {
        Self { until_probe: MIN_INTERVAL, ..Self::new(threads) }
    }

    pub(crate) fn new(threads: usize) -> Self {
        let mut counts: Vec<usize> =
            std::iter::successors(Some(1_usize), |n| n.checked_mul(2)).take_while(|&n| n < threads).collect();
        counts.push(threads.max(1));
        // Every thread first, the fastest on a quiet machine; the first probe finds out soon when fewer
        // are faster (a busy machine, a small model).
        let current = counts.len() - 1;
        Self {
            counts,
            current,
            recent: Vec::with_capacity(WINDOW),
            until_probe: FIRST_PROBE,
            interval: MIN_INTERVAL,
            probe: None,
            upward: false,
            cold: true,
        }
    }

    /// The threads of the next pass.
    fn next(&self) -> usize {
        self.counts[self.probe.as_ref().map_or(self.current, |(index, _)| *index)]
    }

    /// The speed of the count in use: its fastest recent pass.
    fn speed(&self) -> Option<f64> {
        self.recent.iter().copied().reduce(f64::min)
    }

    /// Counts the pass just run at [`next`](Self::next)'s count.
    fn record(&mut self, took: std::time::Duration) {
        let seconds = took.as_secs_f64();
        let speed = self.speed();
        if let Some((index, mut passes)) = self.probe.take() {
            passes.push(seconds);
            // One pass far slower than the current count's is evidence enough: a probe of a bad count
            // (two threads beside a busy process) costs one pass, not five.
            let bound = if passes.len() == 1 { WAKING_SLOWDOWN } else { SLOWDOWN };
            let hopeless = speed.is_some_and(|speed| seconds > bound * speed);
            if passes.len() <= WINDOW && !hopeless {
                self.probe = Some((index, passes));
                return;
            }
            let probed = passes[1..].iter().copied().reduce(f64::min);
            match (probed, speed) {
                (Some(probed), Some(speed)) if !hopeless && probed <= GAIN * speed => {
                    self.current = index;
                    self.recent = passes.split_off(1);
                    self.interval = MIN_INTERVAL;
                }
                _ => self.interval = (self.interval * 2).min(MAX_INTERVAL),
            }
            self.until_probe = self.interval;
            return;
        }
        if std::mem::take(&mut self.cold) {
            return; // the first pass of all pays for cold caches and pages: it says nothing of a count
        }
        let slow = |pass: f64| speed.is_some_and(|speed| pass > SLOWDOWN * speed);
        let sudden = slow(seconds) && self.recent.last().is_some_and(|&last| slow(last));
        if sudden {
            // The machine changed: the passes before are no longer this count's speed.
            self.recent.drain(..self.recent.len() - 1);
        } else if self.recent.len() == WINDOW {
            self.recent.remove(0);
        }
        self.recent.push(seconds);
        self.until_probe = self.until_probe.saturating_sub(1);
        if self.counts.len() > 1 && (sudden || self.until_probe == 0) {
            let last = self.counts.len() - 1;
            let index = match self.current {
                0 => 1,
                current if current == last => current - 1,
                current if self.upward => current + 1,
                current => current - 1,
            };
            self.upward = !self.upward;
            self.probe = Some((index, Vec::with_capacity(WINDOW + 1)));
        }
    }
}

struct PoisonOnPanic<'a>(&'a SpinBarrier);

impl Drop for PoisonOnPanic<'_> {
    fn drop(&mut self) {
        self.0.poisoned.store(true, Ordering::Relaxed);
        self.0.wake();
    }
}

/// One thread's place in a pass.
pub(crate) struct Rank<'a> {
    index: usize,
    threads: usize,
    exchange: &'a Exchange,
    /// Exchanges so far in this pass: which buffer is next.
    turn: std::cell::Cell<usize>,
}

impl Rank<'_> {
    /// Whether this is the pass's first thread, whose result [`Team::run`] returns.
    pub(crate) fn is_first(&self) -> bool {
        self.index == 0
    }

    /// This thread's share of `count` items: an even split, in order.
    pub(crate) fn share(&self, count: usize) -> Range<usize> {
        count * self.index / self.threads..count * (self.index + 1) / self.threads
    }

    /// The whole vector of `width` values, of which this thread computed `part`, placed at `at`; every
    /// thread's part is written, then read back whole after the barrier.
    pub(crate) fn gather(&self, part: &[f32], at: usize, width: usize) -> Result<Vec<f32>, Abandoned> {
        if self.threads == 1 {
            debug_assert_eq!((at, part.len()), (0, width));
            return Ok(part.to_vec());
        }
        let buffer = &self.exchange.buffers[self.turn.get() % 2];
        self.turn.set(self.turn.get() + 1);
        for (slot, value) in buffer[at..at + part.len()].iter().zip(part) {
            slot.store(value.to_bits(), Ordering::Relaxed);
        }
        // The barrier's release and acquire order these stores before the other threads' loads.
        self.exchange.barrier.wait()?;
        Ok(buffer[..width].iter().map(|slot| f32::from_bits(slot.load(Ordering::Relaxed))).collect())
    }

    /// The whole vectors of `width` values, of which this thread computed `parts` (one per vector),
    /// each placed at `at`: [`gather`](Self::gather) for several vectors, with one barrier.
    pub(crate) fn gather_many(&self, parts: &[Vec<f32>], at: usize, width: usize) -> Result<Vec<Vec<f32>>, Abandoned> {
        if self.threads == 1 {
            debug_assert!(parts.iter().all(|part| at == 0 && part.len() == width));
            return Ok(parts.to_vec());
        }
        let buffer = &self.exchange.buffers[self.turn.get() % 2];
        self.turn.set(self.turn.get() + 1);
        for (index, part) in parts.iter().enumerate() {
            let start = index * width + at;
            for (slot, value) in buffer[start..start + part.len()].iter().zip(part) {
                slot.store(value.to_bits(), Ordering::Relaxed);
            }
        }
        // The barrier's release and acquire order these stores before the other threads' loads.
        self.exchange.barrier.wait()?;
        Ok((0..parts.len())
            .map(|index| {
                buffer[index * width..(index + 1) * width]
                    .iter()
                    .map(|slot| f32::from_bits(slot.load(Ordering::Relaxed)))
                    .collect()
            })
            .collect())
    }

    /// `matrix · x` for each of `xs`: this thread's groups of rows for every vector, a tile of rows at
    /// a time, so that a tile's weights stay in the cache while every vector passes over them (read from
    /// memory once for all, where one product at a time reads them once each); then the whole results
    /// gathered. Each product is the one [`matvec`](Self::matvec) computes, to the bit.
    pub(crate) fn matmul(&self, matrix: &Matrix, xs: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, Abandoned> {
        /// Rows of a tile: 64 rows of a 2,048-wide Q8_0 matrix are 136 KB, well inside a core's L2.
        const TILE: usize = 16 * ROWS;
        let total = matrix.rows();
        let groups = self.share(total.div_ceil(ROWS));
        let rows = (groups.start * ROWS).min(total)..(groups.end * ROWS).min(total);
        let prepared: Vec<_> = xs.iter().map(|x| matrix.prepare(x)).collect();
        let mut parts = vec![vec![0.0; rows.len()]; xs.len()];
        let mut start = rows.start;
        while start < rows.end {
            let end = (start + TILE).min(rows.end);
            let tile = start - rows.start..end - rows.start;
            // Vectors two at a time: the kernels read each block of weights once for both.
            for (xs, parts) in prepared.chunks(2).zip(parts.chunks_mut(2)) {
                match (xs, &mut *parts) {
                    ([a, b], [part_a, part_b]) => {
                        matrix.matvec_prepared_pair(
                            [a, b],
                            start,
                            [&mut part_a[tile.clone()], &mut part_b[tile.clone()]],
                        );
                    }
                    _ => matrix.matvec_prepared(&xs[0], start, &mut parts[0][tile.clone()]),
                }
            }
            start = end;
        }
        self.gather_many(&parts, rows.start, total)
    }

    /// `matrix · x`: this thread's groups of rows, then the whole result gathered.
    pub(crate) fn matvec(&self, matrix: &Matrix, x: &[f32]) -> Result<Vec<f32>, Abandoned> {
        let groups = self.share(matrix.rows().div_ceil(ROWS));
        let rows = (groups.start * ROWS).min(matrix.rows())..(groups.end * ROWS).min(matrix.rows());
        let mut part = vec![0.0; rows.len()];
        matrix.matvec_rows(x, rows.start, &mut part);
        self.gather(&part, rows.start, matrix.rows())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is a test failure with its message")]

    use super::*;

    /// A tuner that always runs all `threads` (the barrier's tests).
    fn fixed(threads: usize) -> Mutex<Tuner> {
        Mutex::new(Tuner { counts: vec![threads], current: 0, ..Tuner::new(threads) })
    }

    /// Runs the tuner over passes whose time at each count `cost` gives, and returns the counts used.
    fn tune(tuner: &mut Tuner, passes: usize, cost: impl Fn(usize) -> f64) -> Vec<usize> {
        (0..passes)
            .map(|_| {
                let threads = tuner.next();
                tuner.record(std::time::Duration::from_secs_f64(cost(threads)));
                threads
            })
            .collect()
    }

    /// Quiet, two threads faster: it keeps two, probing one now and then, ever more rarely.
    /// Another process takes a core: it goes to one thread within one probe. The process ends: back to
    /// two within the longest interval between probes.
    #[test]
    fn the_tuner_follows_the_fastest_count_as_the_machine_changes() {
        let mut tuner = Tuner::new(2);
        let quiet = |threads: usize| if threads == 2 { 100e-6 } else { 180e-6 };
        let used = tune(&mut tuner, 2000, quiet);
        let at_one = used.iter().filter(|&&threads| threads == 1).count();
        assert_eq!(used[..7], [2, 2, 2, 2, 2, 1, 1], "two threads, then a probe of one");
        assert!(at_one > 0 && at_one < 40, "{at_one} passes of 2,000 at one thread");
        assert_eq!(used[1900..], [2; 100]);

        let busy = |threads: usize| if threads == 2 { 5e-3 } else { 200e-6 }; // 25 times slower
        let used = tune(&mut tuner, 2000, busy);
        let switched = used.iter().position(|&threads| threads == 1).unwrap();
        assert!(switched <= 2, "it probed at the second slow pass in a row: {switched}");
        // Never far below one thread all along: the probes of two threads cost one pass each.
        let spent: f64 = used.iter().map(|&threads| busy(threads)).sum();
        assert!(spent <= 1.15 * 2000.0 * busy(1), "{spent} s against {} s at one thread", 2000.0 * busy(1));

        let used = tune(&mut tuner, 1000, quiet);
        let back = used.windows(100).position(|window| window.iter().all(|&threads| threads == 2)).unwrap();
        assert!(back <= MAX_INTERVAL as usize + WINDOW + 1, "back to two threads after {back} passes");
    }

    /// A prompt's tuner runs every thread through a prompt's passes before its first probe.
    #[test]
    fn a_patient_tuner_probes_only_after_the_longest_prompt_of_passes() {
        let mut tuner = Tuner::patient(2);
        let used = tune(&mut tuner, 40, |threads| if threads == 2 { 1e-2 } else { 1.8e-2 });
        let first_probe = used.iter().position(|&threads| threads == 1).unwrap();
        assert_eq!(first_probe, MIN_INTERVAL as usize + 1, "the cold pass, then {MIN_INTERVAL} passes: {used:?}");
    }

    /// One thread: nothing to choose, nothing probed. Four threads: it tries two, then one, when they
    /// are faster.
    #[test]
    fn the_tuner_probes_neighbouring_counts_only() {
        let mut tuner = Tuner::new(1);
        assert!(tune(&mut tuner, 100, |_| 1e-4).iter().all(|&threads| threads == 1));
        let mut tuner = Tuner::new(4);
        assert_eq!(tuner.counts, [1, 2, 4]);
        let used = tune(&mut tuner, 3000, |threads| [0.0, 100e-6, 150e-6, 0.0, 300e-6][threads]);
        assert_eq!(used[2900..], [1; 100], "down to one, step by step");
        let tuner = Tuner::new(3);
        assert_eq!(tuner.counts, [1, 2, 3]);
    }

    /// Three threads exchange their shares a thousand times in a row (both buffers, over and over):
    /// each sees every share of every round, none from another round.
    #[test]
    fn shares_meet_whole_round_after_round() {
        let team = Team::new(3).unwrap();
        let rounds = team
            .run(9, &fixed(3), |rank| {
                let mut rounds = 0;
                for round in 0..1000_u16 {
                    let mine = rank.share(9);
                    let part: Vec<f32> = mine.clone().map(|i| f32::from(round) * 100.0 + i as f32).collect();
                    let whole = rank.gather(&part, mine.start, 9)?;
                    let expected: Vec<f32> = (0..9).map(|i| f32::from(round) * 100.0 + i as f32).collect();
                    assert_eq!(whole, expected, "rank {} round {round}", rank.index);
                    rounds += 1;
                }
                Ok(rounds)
            })
            .unwrap();
        assert_eq!(rounds, 1000);
    }

    /// A partner that comes late (descheduled on a busy machine) finds its waiting partner parked: the
    /// shares still meet whole, round after round, through the park and the wake.
    #[test]
    fn a_waiter_parks_for_a_late_partner_and_is_woken() {
        let team = Team::new(2).unwrap();
        let sum = team
            .run(2, &fixed(2), |rank| {
                let mut sum = 0.0;
                for round in 0..20_u8 {
                    if rank.index == 1 {
                        std::thread::sleep(std::time::Duration::from_millis(2)); // far past the spinning
                    }
                    let whole = rank.gather(&[f32::from(round) + rank.index as f32], rank.index, 2)?;
                    sum += whole.iter().sum::<f32>();
                }
                Ok(sum)
            })
            .unwrap();
        assert_eq!(sum, (0..20).map(|round| 2.0 * round as f32 + 1.0).sum::<f32>());
    }

    /// A thread that panics mid-pass does not leave the others waiting: the pass fails with an error,
    /// and the next one runs.
    #[test]
    fn a_panic_abandons_the_pass_and_the_team_goes_on() {
        let team = Team::new(2).unwrap();
        let tuner = fixed(2);
        let outcome = team.run(1, &tuner, |rank| {
            if rank.index == 1 {
                panic!("a bug in a pass");
            }
            rank.gather(&[1.0], 0, 1)?;
            Ok(())
        });
        let error = outcome.unwrap_err().to_string();
        assert!(error.contains("panicked"), "{error}");
        let value = team.run(2, &tuner, |rank| rank.gather(&[rank.index as f32], rank.index, 2)).unwrap();
        assert_eq!(value, [0.0, 1.0]);
    }
}
