//! Simulated compute time: a delay with seeded jitter, slept through `tokio::time`, with the overshoot of
//! the timer carried over so that a long run keeps the profile's pace.

use std::time::Duration;

use tokio::time::Instant;

use crate::rng::Rng;

/// Paces one stream of work (a compile, a sequence's steps).
#[derive(Debug)]
pub struct Pacer {
    rng: Rng,
    jitter: f64,
    /// Time slept beyond what was asked, paid back by the next delays.
    debt: Duration,
}

impl Pacer {
    /// A pacer whose delays vary by up to `jitter` (a fraction, 0 for none) around their nominal value.
    pub fn new(seed: u64, jitter: f64) -> Self {
        Self { rng: Rng::new(seed), jitter: jitter.clamp(0.0, 1.0), debt: Duration::ZERO }
    }

    /// The delay to simulate for a nominal `duration`: the same seed gives the same sequence.
    pub fn jittered(&mut self, duration: Duration) -> Duration {
        if self.jitter == 0.0 {
            return duration;
        }
        let factor = 1.0 + self.jitter * (2.0 * self.rng.unit() - 1.0);
        duration.mul_f64(factor)
    }

    /// Waits for `duration` (jittered), less what earlier waits overshot.
    pub async fn wait(&mut self, duration: Duration) {
        let target = self.jittered(duration);
        let owed = self.debt.min(target);
        let started = Instant::now();
        tokio::time::sleep(target - owed).await;
        let slept = started.elapsed();
        self.debt = (self.debt - owed) + slept.saturating_sub(target - owed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_timer_overshoot_is_paid_back_by_the_next_wait() {
        let mut pacer = Pacer::new(0, 0.0);
        let start = Instant::now();
        pacer.wait(Duration::from_micros(1500)).await; // the timer counts whole milliseconds: 2 ms
        assert_eq!(start.elapsed(), Duration::from_millis(2));
        pacer.wait(Duration::from_micros(1500)).await; // 1 ms, paying back the half millisecond
        assert_eq!(start.elapsed(), Duration::from_millis(3));
        for _ in 0..98 {
            pacer.wait(Duration::from_micros(1500)).await;
        }
        assert_eq!(start.elapsed(), Duration::from_millis(150), "100 waits of 1.5 ms");
    }

    #[test]
    fn jitter_stays_within_its_bound_and_repeats_with_the_seed() {
        let draws = |seed| {
            let mut pacer = Pacer::new(seed, 0.05);
            (0..1000).map(|_| pacer.jittered(Duration::from_millis(100))).collect::<Vec<_>>()
        };
        let a = draws(1);
        // Seed 1's first three SplitMix64 draws in [0, 1), computed apart from this crate:
        // 0.56656..., 0.74578..., 0.97100...; the jitter maps u to 100 ms x (1 + 0.05 (2u - 1)).
        for (draw, nanos) in a.iter().zip([100_665_616, 102_457_818, 104_710_028]) {
            assert!(draw.as_nanos().abs_diff(nanos) <= 1, "{draw:?} against {nanos} ns");
        }
        assert!(a.iter().all(|d| (95..=105).contains(&d.as_millis())));
        let mean = a.iter().sum::<Duration>() / 1000;
        assert!((99..=101).contains(&mean.as_millis()), "{mean:?}");
        assert_ne!(draws(2), a);
    }
}
