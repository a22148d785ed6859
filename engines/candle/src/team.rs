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

use crate::kernel::{QMatrix, ROWS};

/// A barrier that spins: its waits are short, between threads that are all running. A thread that
/// panics poisons it, so that the others stop waiting instead of spinning forever.
struct SpinBarrier {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    poisoned: AtomicBool,
}

/// Spins before a waiting thread starts yielding its core: tens of microseconds, longer than the
/// steps between products take.
const SPINS: u32 = 1 << 14;

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
        }
    }

    fn wait(&self) -> Result<(), Abandoned> {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            // The last to arrive resets the count before it lets the others go, so that none of them
            // can arrive at the next barrier first.
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return Ok(());
        }
        let mut spins = 0_u32;
        while self.generation.load(Ordering::Acquire) == generation {
            if self.poisoned.load(Ordering::Relaxed) {
                return Err(Abandoned);
            }
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                // A partner the system has descheduled (more threads than free cores): let it run.
                std::thread::yield_now();
            }
        }
        Ok(())
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

    /// Runs `pass` on every thread of the team, with exchange buffers of `width` values, and returns
    /// the first thread's result. Passes from several callers take turns (a pass needs every thread).
    pub(crate) fn run<T: Send>(
        &self,
        width: usize,
        pass: impl Fn(&Rank<'_>) -> Result<T, Abandoned> + Sync,
    ) -> Result<T, EngineError> {
        let mut exchange = self.exchange.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        exchange.barrier.poisoned.store(false, Ordering::Relaxed);
        exchange.barrier.arrived.store(0, Ordering::Relaxed);
        for buffer in &mut exchange.buffers {
            if buffer.len() < width {
                buffer.resize_with(width, || AtomicU32::new(0));
            }
        }
        let exchange = &*exchange;
        let run_rank = |index: usize| {
            let rank = Rank { index, threads: self.threads, exchange, turn: std::cell::Cell::new(0) };
            // A panic poisons the barrier on its way out, so that the other threads stop waiting.
            let poison = PoisonOnPanic(&exchange.barrier);
            let result = pass(&rank);
            std::mem::forget(poison);
            result
        };
        // A panic in a pass (a bug) reaches the caller as an error; the other threads, told by the
        // poisoned barrier, have returned `Abandoned`.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &self.pool {
            None => run_rank(0),
            Some(pool) => pool.broadcast(|context| run_rank(context.index())).swap_remove(0),
        }));
        match outcome {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(Abandoned)) | Err(_) => {
                Err(EngineError::Fatal { message: "a forward pass panicked and was abandoned".to_owned() })
            }
        }
    }
}

struct PoisonOnPanic<'a>(&'a SpinBarrier);

impl Drop for PoisonOnPanic<'_> {
    fn drop(&mut self) {
        self.0.poisoned.store(true, Ordering::Relaxed);
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

    /// `matrix · x`: this thread's groups of rows, then the whole result gathered.
    pub(crate) fn matvec(&self, matrix: &QMatrix, x: &[f32]) -> Result<Vec<f32>, Abandoned> {
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

    /// Three threads exchange their shares a thousand times in a row (both buffers, over and over):
    /// each sees every share of every round, none from another round.
    #[test]
    fn shares_meet_whole_round_after_round() {
        let team = Team::new(3).unwrap();
        let rounds = team
            .run(9, |rank| {
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

    /// A thread that panics mid-pass does not leave the others waiting: the pass fails with an error,
    /// and the next one runs.
    #[test]
    fn a_panic_abandons_the_pass_and_the_team_goes_on() {
        let team = Team::new(2).unwrap();
        let outcome = team.run(1, |rank| {
            if rank.index == 1 {
                panic!("a bug in a pass");
            }
            rank.gather(&[1.0], 0, 1)?;
            Ok(())
        });
        let error = outcome.unwrap_err().to_string();
        assert!(error.contains("panicked"), "{error}");
        let value = team.run(2, |rank| rank.gather(&[rank.index as f32], rank.index, 2)).unwrap();
        assert_eq!(value, [0.0, 1.0]);
    }
}
