//! How far this engine's logits may sit from llama.cpp's on the same GGUF file, per weight type, and how
//! that distance is measured: the rule of `cargo xtask parity` and of the integration test that holds
//! the engine to llama.cpp's committed logits (`tests/it/llama_cpp.rs`).
//!
//! xtask compiles this very file as a module of its own (`#[path]` in `xtask/src/main.rs`): the numbers
//! live in one place, and xtask, which may depend on no workspace crate (`xtask/src/tidy.rs`), does not
//! build the engine. So it names nothing of the crate around it and no dependency, only `std`.
//!
//! A tolerance is a share of the spread of llama.cpp's logits at the same position (its largest less its
//! smallest): rounding moves logits by a share of their scale, so one share holds across presets, where a
//! wrong rope, norm or dequantization moves them by a good part of the spread. The same share bounds a
//! near-tie: usine's pick may part from llama.cpp's only where llama.cpp's logit for it is that close to
//! its best. Both sides read the same weights; what differs is how each rounds the activations going into
//! a product (llama.cpp rounds them to the type its kernel for the weights takes) and the order of its
//! sums. The peer keeps keys and values in f32, without flash attention, so that its attention adds no
//! rounding of its own.
//!
//! Each tolerance is two to three times the worst share measured on the `tiny` files of both
//! architectures, `qwen2.5-0.5b` and `tinyllama-1.1b` (two layers; logit spreads of 3 to 5), given beside
//! it, while usine multiplied K-quant and float weights dense, in f32 (so those differences were
//! llama.cpp's rounding alone; a kernel of usine's own that rounds may add to them). For scale: Q4_0
//! weights, read the same way by both sides, move usine's logits from its own F32 ones by 0.12 to 0.16 of
//! the spread, and Q4_K_M's by 0.08 to 0.11.

/// F32 weights: llama.cpp's activations stay f32; only the order of sums differs. Measured 7.6e-7.
pub const F32: f64 = 1e-5;
/// F16 weights: llama.cpp rounds the activations to f16 (11 significant bits). Measured 3.7e-4.
pub const F16: f64 = 1e-3;
/// BF16 weights: llama.cpp rounds the activations to bf16 (8 significant bits). Measured 3.3e-3.
pub const BF16: f64 = 1e-2;
/// Q8_0 and Q4_0 weights: llama.cpp quantizes the activations to Q8_0 (8 bits per value, an f16 scale
/// per 32). Measured 1.1e-2, about what Q8_0 weights themselves move the logits by (1.0e-2 to 1.3e-2).
pub const Q8_0: f64 = 2.5e-2;
/// K-quants (Q4_K_M and Q5_K_M: Q4_K or Q5_K, with Q6_K for some matrices; Q6_K): llama.cpp quantizes the
/// activations to Q8_K (8 bits per value, an f32 scale per 256). Measured 1.25e-2.
pub const Q8_K: f64 = 2.5e-2;

/// Every weight type a generated file takes (the crate's `TYPES`, in its order), with its tolerance.
pub const BY_TYPE: [(&str, f64); 8] = [
    ("f32", F32),
    ("f16", F16),
    ("bf16", BF16),
    ("q8_0", Q8_0),
    ("q4_0", Q8_0),
    ("q4_k_m", Q8_K),
    ("q5_k_m", Q8_K),
    ("q6_k", Q8_K),
];

/// usine's teacher-forced logits against llama.cpp's, over every position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Logits {
    /// Positions compared.
    pub positions: usize,
    /// The largest difference of any logit.
    pub worst_abs: f64,
    /// The largest difference of any logit as a share of llama.cpp's spread at its position.
    pub worst_relative: f64,
    /// Positions where usine's best logit is llama.cpp's best.
    pub argmax_equal: usize,
    /// Where they part, the widest gap between llama.cpp's best logit and its logit for usine's pick, as a
    /// share of its spread there; zero where they never part.
    pub widest_parting: f64,
}

impl Logits {
    /// What puts these figures beyond `tolerance` (a share of the spread), if anything.
    pub fn failures(&self, tolerance: f64) -> Vec<String> {
        let mut failures = Vec::new();
        if self.worst_relative > tolerance {
            failures.push(format!(
                "logits differ by up to {:.2e} of their position's spread (by up to {:.2e}); rounding explains {tolerance:e}",
                self.worst_relative, self.worst_abs
            ));
        }
        if self.widest_parting > tolerance {
            failures.push(format!(
                "usine's best logit parts from llama.cpp's where llama.cpp's gap is {:.2e} of the spread; a near-tie \
                 is {tolerance:e} at most",
                self.widest_parting
            ));
        }
        failures
    }
}

/// Logits that [`compare`] cannot measure.
#[derive(Debug, Clone, PartialEq)]
pub enum Unmeasurable {
    /// Not the same number of logits on both sides, none, or not whole rows of the vocabulary.
    Shape {
        /// usine's count.
        ours: usize,
        /// llama.cpp's count.
        theirs: usize,
        /// The vocabulary: a row's length.
        vocab: usize,
    },
    /// A logit that is NaN or infinite: it would pass every comparison unseen.
    NotFinite {
        /// `usine` or `llama.cpp`.
        side: &'static str,
        /// The logit's index in its row.
        index: usize,
        /// Its row.
        position: usize,
        /// The logit.
        value: f32,
    },
}

impl std::fmt::Display for Unmeasurable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Shape { ours, theirs, vocab } => {
                write!(f, "usine gave {ours} logits and llama.cpp {theirs}: not the same whole rows of {vocab}")
            }
            Self::NotFinite { side, index, position, value } => {
                write!(f, "{side}'s logit {index} at position {position} is {value}")
            }
        }
    }
}

impl std::error::Error for Unmeasurable {}

/// The index of the best logit, the lowest first among equals (as both sides' greedy choice).
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (index, &logit) in row.iter().enumerate() {
        if logit > row[best] {
            best = index;
        }
    }
    best
}

/// `ours` against `theirs` (llama.cpp's), both positions × `vocab` logits, row-major.
pub fn compare(ours: &[f32], theirs: &[f32], vocab: usize) -> Result<Logits, Unmeasurable> {
    if vocab == 0 || theirs.is_empty() || ours.len() != theirs.len() || !theirs.len().is_multiple_of(vocab) {
        return Err(Unmeasurable::Shape { ours: ours.len(), theirs: theirs.len(), vocab });
    }
    let mut logits = Logits {
        positions: theirs.len() / vocab,
        worst_abs: 0.0,
        worst_relative: 0.0,
        argmax_equal: 0,
        widest_parting: 0.0,
    };
    for (position, (ours, theirs)) in ours.chunks(vocab).zip(theirs.chunks(vocab)).enumerate() {
        for (side, row) in [("usine", ours), ("llama.cpp", theirs)] {
            if let Some(index) = row.iter().position(|logit| !logit.is_finite()) {
                return Err(Unmeasurable::NotFinite { side, index, position, value: row[index] });
            }
        }
        let (lowest, best) = (theirs.iter().copied().fold(f32::INFINITY, f32::min), argmax(theirs));
        let spread = f64::from(theirs[best] - lowest).max(f64::MIN_POSITIVE);
        let worst = ours.iter().zip(theirs).map(|(a, b)| f64::from((a - b).abs())).fold(0.0, f64::max);
        logits.worst_abs = logits.worst_abs.max(worst);
        logits.worst_relative = logits.worst_relative.max(worst / spread);
        let pick = argmax(ours);
        if pick == best {
            logits.argmax_equal += 1;
        } else {
            logits.widest_parting = logits.widest_parting.max(f64::from(theirs[best] - theirs[pick]) / spread);
        }
    }
    Ok(logits)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is a test failure with its message")]

    use super::*;

    /// `positions` rows of `vocab` logits spread over about [-3, 3], from `seed` (an LCG's high bits).
    fn logits(seed: u64, positions: usize, vocab: usize) -> Vec<f32> {
        let mut state = seed;
        (0..positions * vocab)
            .map(|_| {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                let draw = u16::try_from(state >> 48).expect("the top 16 bits");
                6.0 * f32::from(draw) / f32::from(u16::MAX) - 3.0
            })
            .collect()
    }

    #[test]
    fn rounding_noise_passes_and_a_real_difference_fails() {
        let theirs = logits(1, 8, 100);
        // Noise of up to 1e-3 on a spread of about 6: a share of 1.7e-4 at most.
        let noise = logits(2, 8, 100);
        let ours: Vec<f32> = theirs.iter().zip(&noise).map(|(a, b)| a + b / 3000.0).collect();
        let figures = compare(&ours, &theirs, 100).unwrap();
        assert!(figures.worst_abs > 0.0 && figures.worst_abs <= 1e-3, "{figures:?}");
        assert!(figures.failures(1e-3).is_empty(), "{figures:?}");
        assert_eq!(figures.failures(1e-4).len(), 1, "{figures:?}");
        // One logit of one position off by 0.5, as a wrong bias or scale would put it.
        let mut wrong = ours.clone();
        wrong[5 * 100 + 17] += 0.5;
        let figures = compare(&wrong, &theirs, 100).unwrap();
        assert!((figures.worst_abs - 0.5).abs() < 1e-3, "{figures:?}");
        assert!(!figures.failures(Q8_0).is_empty(), "{figures:?}");
    }

    #[test]
    fn the_best_logit_may_part_only_at_a_near_tie() {
        // llama.cpp's best is 2.0 (index 1), then 1.97 (index 2): a gap of 0.03 on a spread of 3.
        let theirs = [-1.0, 2.0, 1.97, 0.0];
        let parted = [-1.0, 1.984, 1.986, 0.0];
        let figures = compare(&parted, &theirs, 4).unwrap();
        assert_eq!((figures.argmax_equal, figures.positions), (0, 1));
        assert!((figures.widest_parting - 0.01).abs() < 1e-6, "{figures:?}");
        // Each logit within 0.016 of llama.cpp's (0.0053 of the spread): a tolerance of 0.02 takes the
        // parting as a near-tie, one of 0.006 takes the differences but not the parting.
        assert!(figures.failures(0.02).is_empty(), "{figures:?}");
        let failures = figures.failures(0.006);
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(failures[0].contains("near-tie"), "{failures:?}");
        let equal = compare(&theirs, &theirs, 4).unwrap();
        assert_eq!((equal.argmax_equal, equal.worst_abs, equal.widest_parting), (1, 0.0, 0.0));
        assert!(equal.failures(0.0).is_empty());
    }

    #[test]
    fn logits_of_another_shape_or_not_finite_are_unmeasurable() {
        let theirs = logits(3, 4, 10);
        assert!(matches!(compare(&theirs[..30], &theirs, 10), Err(Unmeasurable::Shape { ours: 30, .. })));
        assert!(compare(&theirs, &theirs, 7).is_err());
        assert!(compare(&[], &[], 10).is_err());
        let mut nan = theirs.clone();
        nan[23] = f32::NAN;
        let error = compare(&nan, &theirs, 10).unwrap_err().to_string();
        assert_eq!(error, "usine's logit 3 at position 2 is NaN");
        assert!(compare(&theirs, &nan, 10).is_err());
    }
}
