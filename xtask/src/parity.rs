//! `cargo xtask parity`: the candle engine's numbers against llama.cpp's on the same GGUF files, for
//! each architecture (llama, qwen2) and weight type the engine reads, so that a wrong rope, norm, bias or
//! dequantization shows as a difference far above rounding.
//!
//! The files hold random weights, written by the candle engine's `random_model` example into
//! `target/parity/` (never committed): a small shape of each architecture, or with `--preset` a real
//! model's widths, vocabulary and heads, two layers (see [`PRESETS`]). For each file, both sides' logits
//! at [`POSITIONS`] teacher-forced positions of the same seeded ids ([`compare`], checked against the
//! type's tolerance in [`TYPES`] by [`Logits::failures`]), then [`TOKENS`] greedy tokens from a
//! [`PROMPT`]-token prompt on both sides, compared by bench-peers' [`agreement`]. llama.cpp's side is
//! bench-peers' peer (`peers/llama-cpp`). A table goes to stderr, and the command fails if any file does.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use crate::bench_peers::{Agreement, agreement, build, build_peer, ids, run_json};

/// The files of each `--preset`, as architecture and `random_model`'s preset: a small test shape of
/// each architecture, or a real model's widths, vocabulary and heads (two layers).
const PRESETS: [(&str, &[(&str, &str)]); 3] = [
    ("tiny", &[("llama", "tiny-llama"), ("qwen2", "tiny-qwen2")]),
    ("qwen2.5-0.5b", &[("qwen2", "qwen2.5-0.5b")]),
    ("tinyllama-1.1b", &[("llama", "tinyllama-1.1b")]),
];
/// Teacher-forced positions whose logits are compared.
const POSITIONS: usize = 64;
/// The greedy comparison's prompt, and the tokens it generates.
const PROMPT: usize = 8;
const TOKENS: usize = 64;
/// The seeds of the teacher-forced ids and of the greedy prompt.
const IDS_SEED: u64 = 2026;
const PROMPT_SEED: u64 = 2027;

// How far usine's logits may sit from llama.cpp's, as a share of the spread of llama.cpp's logits at the
// same position (its largest less its smallest): rounding moves logits by a share of their scale, so one
// share holds across presets, where a wrong rope, norm or dequantization moves them by a good part of the
// spread. The same share bounds a near-tie: usine's pick may part from llama.cpp's only where llama.cpp's
// logit for it is that close to its best. Both sides read the same weights; what differs is how each
// rounds the activations going into a product (llama.cpp rounds them to the type its kernel for the
// weights takes) and the order of its sums. The peer keeps keys and values in f32, without flash
// attention, so that its attention adds no rounding of its own.
//
// Each tolerance is two to three times the worst share measured on the `tiny` files of both
// architectures, `qwen2.5-0.5b` and `tinyllama-1.1b` (two layers; logit spreads of 3 to 5), given
// beside it, while usine multiplied K-quant and float weights dense, in f32 (so those differences were
// llama.cpp's rounding alone; a kernel of usine's own that rounds may add to them). For scale: Q4_0
// weights, read the same way by both sides, move usine's logits from its own F32 ones by 0.12 to 0.16
// of the spread, and Q4_K_M's by 0.08 to 0.11.
/// F32 weights: llama.cpp's activations stay f32; only the order of sums differs. Measured 7.6e-7.
const F32_TOLERANCE: f64 = 1e-5;
/// F16 weights: llama.cpp rounds the activations to f16 (11 significant bits). Measured 3.7e-4.
const F16_TOLERANCE: f64 = 1e-3;
/// BF16 weights: llama.cpp rounds the activations to bf16 (8 significant bits). Measured 3.3e-3.
const BF16_TOLERANCE: f64 = 1e-2;
/// Q8_0 and Q4_0 weights: llama.cpp quantizes the activations to Q8_0 (8 bits per value, an f16 scale
/// per 32). Measured 1.1e-2, about what Q8_0 weights themselves move the logits by (1.0e-2 to 1.3e-2).
const Q8_0_TOLERANCE: f64 = 2.5e-2;
/// K-quants (Q4_K_M and Q5_K_M: Q4_K or Q5_K, with Q6_K for some matrices; Q6_K): llama.cpp quantizes
/// the activations to Q8_K (8 bits per value, an f32 scale per 256). Measured 1.25e-2.
const Q8_K_TOLERANCE: f64 = 2.5e-2;

/// The weight types compared, as `random_model` names them, each with its tolerance.
const TYPES: [(&str, f64); 8] = [
    ("f32", F32_TOLERANCE),
    ("f16", F16_TOLERANCE),
    ("bf16", BF16_TOLERANCE),
    ("q8_0", Q8_0_TOLERANCE),
    ("q4_0", Q8_0_TOLERANCE),
    ("q4_k_m", Q8_K_TOLERANCE),
    ("q5_k_m", Q8_K_TOLERANCE),
    ("q6_k", Q8_K_TOLERANCE),
];

/// usine's teacher-forced logits against llama.cpp's, over every position.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Logits {
    positions: usize,
    /// The largest difference of any logit.
    worst_abs: f64,
    /// The largest difference of any logit as a share of llama.cpp's spread at its position.
    worst_relative: f64,
    /// Positions where usine's best logit is llama.cpp's best.
    argmax_equal: usize,
    /// Where they part, the widest gap between llama.cpp's best logit and its logit for usine's pick,
    /// as a share of its spread there; zero where they never part.
    widest_parting: f64,
}

impl Logits {
    /// What puts these figures beyond `tolerance` (a share of the spread), if anything.
    fn failures(&self, tolerance: f64) -> Vec<String> {
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

    fn argmax_cell(&self) -> String {
        let parted = self.positions - self.argmax_equal;
        if parted == 0 {
            format!("{}/{}", self.argmax_equal, self.positions)
        } else {
            format!("{}/{} ({parted} near-tie, widest {:.1e})", self.argmax_equal, self.positions, self.widest_parting)
        }
    }
}

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
fn compare(ours: &[f32], theirs: &[f32], vocab: usize) -> Result<Logits> {
    ensure!(vocab > 0 && !theirs.is_empty(), "no logits");
    ensure!(ours.len() == theirs.len(), "usine gave {} logits, llama.cpp {}", ours.len(), theirs.len());
    ensure!(theirs.len().is_multiple_of(vocab), "{} logits are not whole rows of {vocab}", theirs.len());
    let mut logits = Logits {
        positions: theirs.len() / vocab,
        worst_abs: 0.0,
        worst_relative: 0.0,
        argmax_equal: 0,
        widest_parting: 0.0,
    };
    for (position, (ours, theirs)) in ours.chunks(vocab).zip(theirs.chunks(vocab)).enumerate() {
        // A NaN would pass every comparison below unseen.
        for (side, row) in [("usine", ours), ("llama.cpp", theirs)] {
            if let Some(index) = row.iter().position(|logit| !logit.is_finite()) {
                bail!("{side}'s logit {index} at position {position} is {}", row[index]);
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

/// `count` pseudo-random token ids below `vocab`, the same for a seed on every run (SplitMix64).
fn token_ids(seed: u64, count: usize, vocab: usize) -> Vec<u64> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) % vocab as u64
        })
        .collect()
}

fn id_list(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

/// A file of little-endian f32 logits, `positions` × `vocab`.
fn read_logits(path: &Path, positions: usize, vocab: usize) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        bytes.len() == positions * vocab * 4,
        "{}: {} bytes, not {positions} positions × {vocab} f32 logits",
        path.display(),
        bytes.len()
    );
    Ok(bytes.chunks_exact(4).map(|word| f32::from_le_bytes(word.try_into().expect("chunks of 4"))).collect())
}

/// The binaries and folder every file's check uses.
struct Sides {
    generator: PathBuf,
    parity: PathBuf,
    peer: PathBuf,
    threads: String,
    work: PathBuf,
}

/// One file's figures; `greedy` is an error where the greedy tokens disagree.
struct Outcome {
    logits: Logits,
    greedy: Result<Agreement>,
}

impl Sides {
    /// `random_model`'s `preset` with `kind` weights, and its vocabulary's size. `random_model` writes
    /// the file unless it did so already since it was last built: its JSON line, written beside the
    /// file once the file is complete, says so.
    fn model(&self, preset: &str, kind: &str) -> Result<(PathBuf, usize)> {
        let name = format!("{preset}-{kind}");
        let (gguf, line) = (self.work.join(format!("{name}.gguf")), self.work.join(format!("{name}.json")));
        let built = std::fs::metadata(&self.generator)?.modified()?;
        let fresh =
            gguf.exists() && std::fs::metadata(&line).and_then(|line| line.modified()).is_ok_and(|at| at >= built);
        let value: Value = if fresh {
            let text = std::fs::read_to_string(&line).with_context(|| format!("reading {}", line.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", line.display()))?
        } else {
            std::fs::remove_file(&line).or_else(|error| match error.kind() {
                std::io::ErrorKind::NotFound => Ok(()),
                _ => Err(error).with_context(|| format!("removing {}", line.display())),
            })?;
            let value = run_json(Command::new(&self.generator).args(["gguf", preset, kind]).arg(&gguf))?;
            let bytes = value["bytes"].as_u64().with_context(|| format!("no `bytes` in {value}"))?;
            let written = std::fs::metadata(&gguf).with_context(|| format!("{}", gguf.display()))?.len();
            ensure!(written == bytes, "random_model says {bytes} bytes, but {} has {written}", gguf.display());
            std::fs::write(&line, value.to_string()).with_context(|| format!("writing {}", line.display()))?;
            value
        };
        let vocab = value["vocab"].as_u64().with_context(|| format!("no `vocab` in {value}"))?;
        Ok((gguf, usize::try_from(vocab)?))
    }

    /// Both sides' logits and greedy tokens on `random_model`'s `preset` with `kind` weights.
    fn check(&self, preset: &str, kind: &str) -> Result<Outcome> {
        let (gguf, vocab) = self.model(preset, kind)?;
        ensure!(vocab >= 2, "{}: a vocabulary of {vocab}", gguf.display());
        let forced = id_list(&token_ids(IDS_SEED, POSITIONS, vocab));
        let name = format!("{preset}-{kind}");
        let (ours, theirs) =
            (self.work.join(format!("{name}.usine.bin")), self.work.join(format!("{name}.llama-cpp.bin")));
        for (side, value) in [
            ("usine", run_json(Command::new(&self.parity).arg("logits").arg(&gguf).arg(&forced).arg(&ours))?),
            (
                "llama.cpp",
                run_json(
                    Command::new(&self.peer).arg("logits").arg(&gguf).arg(&self.threads).arg(&forced).arg(&theirs),
                )?,
            ),
        ] {
            let shape = (value["vocab"].as_u64(), value["positions"].as_u64());
            ensure!(
                shape == (Some(vocab as u64), Some(POSITIONS as u64)),
                "{side} says {value}: the file's vocabulary is {vocab}, and {POSITIONS} positions were asked for"
            );
        }
        let logits = compare(&read_logits(&ours, POSITIONS, vocab)?, &read_logits(&theirs, POSITIONS, vocab)?, vocab)?;
        let prompt = id_list(&token_ids(PROMPT_SEED, PROMPT, vocab));
        let tokens = TOKENS.to_string();
        let ours = run_json(Command::new(&self.parity).arg("greedy").arg(&gguf).args([&prompt, &tokens]))?;
        let reference = run_json(Command::new(&self.peer).arg(&gguf).args([&self.threads, &tokens, &prompt]))?;
        Ok(Outcome { logits, greedy: agreement(&ids(&ours, "tokens")?, &reference) })
    }
}

fn greedy_cell(greedy: &Result<Agreement>) -> String {
    match greedy {
        Ok(Agreement { matched, near_tie: None }) => format!("{matched}/{TOKENS}"),
        Ok(Agreement { matched, near_tie: Some(gap) }) => format!("{matched}/{TOKENS} (near-tie, gap {gap:.4})"),
        Err(_) => "differ".to_owned(),
    }
}

/// The `--preset` names.
pub(crate) fn presets() -> String {
    PRESETS.iter().map(|(name, _)| *name).collect::<Vec<_>>().join("|")
}

/// Every file of `preset` (see [`PRESETS`]) in every type; the table and any failure's reasons go to
/// stderr.
pub(crate) fn run(root: &Path, preset: &str) -> Result<ExitCode> {
    let (_, models) = PRESETS
        .iter()
        .find(|(name, _)| *name == preset)
        .with_context(|| format!("no preset `{preset}` ({})", presets()))?;
    let peer = build_peer(root)?;
    let example = |name: &str| {
        build(
            Command::new(env!("CARGO"))
                .args(["build", "--release", "--quiet", "-p", "usine-engine-candle", "--example", name])
                .current_dir(root),
            &format!("usine's {name} example"),
        )
    };
    let (generator, parity) = (example("random_model")?, example("parity")?);
    let work = root.join("target").join("parity");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let threads = std::thread::available_parallelism().map_or(1, usize::from).to_string();
    let sides = Sides { generator, parity, peer, threads, work };
    let header =
        "| arch | type | worst abs diff | worst relative diff | tolerance | argmax equal | greedy tokens equal | |";
    let mut table = vec![header.to_owned(), "|---|---|---|---|---|---|---|---|".to_owned()];
    let mut reasons = Vec::new();
    for (arch, model) in *models {
        for (kind, tolerance) in TYPES {
            let line = match sides.check(model, kind) {
                Ok(Outcome { logits, greedy }) => {
                    let mut failures = logits.failures(tolerance);
                    if let Err(error) = &greedy {
                        failures.push(format!("{error:#}"));
                    }
                    let verdict = if failures.is_empty() { "ok" } else { "FAIL" };
                    reasons.extend(failures.into_iter().map(|failure| format!("{model} {kind}: {failure}")));
                    format!(
                        "| {arch} | {kind} | {:.2e} | {:.2e} | {tolerance:e} | {} | {} | {verdict} |",
                        logits.worst_abs,
                        logits.worst_relative,
                        logits.argmax_cell(),
                        greedy_cell(&greedy)
                    )
                }
                Err(error) => {
                    reasons.push(format!("{model} {kind}: {error:#}"));
                    format!("| {arch} | {kind} | | | {tolerance:e} | | | FAIL (error) |")
                }
            };
            eprintln!("parity: {line}");
            table.push(line);
        }
    }
    eprintln!(
        "\nparity, preset {preset}: usine against llama.cpp, {POSITIONS} teacher-forced positions and {TOKENS} greedy \
         tokens per file (relative: a share of llama.cpp's logit spread at the position)"
    );
    for line in &table {
        eprintln!("{line}");
    }
    for reason in &reasons {
        eprintln!("{reason}");
    }
    Ok(if reasons.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is a test failure with its message")]

    use super::*;

    /// `positions` rows of `vocab` logits spread over about [-3, 3], from `seed`.
    fn logits(seed: u64, positions: usize, vocab: usize) -> Vec<f32> {
        token_ids(seed, positions * vocab, 6001).into_iter().map(|draw| draw as f32 / 1000.0 - 3.0).collect()
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
        assert!(!figures.failures(2e-2).is_empty(), "{figures:?}");
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
    fn logits_of_another_shape_or_not_finite_are_errors() {
        let theirs = logits(3, 4, 10);
        assert!(compare(&theirs[..30], &theirs, 10).is_err());
        assert!(compare(&theirs, &theirs, 7).is_err());
        assert!(compare(&[], &[], 10).is_err());
        let mut nan = theirs.clone();
        nan[23] = f32::NAN;
        let error = compare(&nan, &theirs, 10).unwrap_err().to_string();
        assert!(error.contains("usine's logit 3 at position 2 is NaN"), "{error}");
        assert!(compare(&theirs, &nan, 10).is_err());
    }

    #[test]
    fn ids_are_seeded_below_the_vocabulary_and_spread_over_it() {
        let ids = token_ids(IDS_SEED, 1000, 257);
        assert_eq!(ids, token_ids(IDS_SEED, 1000, 257));
        assert_ne!(ids, token_ids(PROMPT_SEED, 1000, 257));
        assert!(ids.iter().all(|&id| id < 257));
        let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
        assert!(distinct.len() > 200, "{} distinct ids of 257", distinct.len());
    }

    #[test]
    fn logit_files_are_little_endian_rows_of_the_vocabulary() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("logits.bin");
        let values = [1.5_f32, -2.25, 0.0, 3.0e-3, 7.0, -0.5];
        std::fs::write(&path, values.iter().flat_map(|value| value.to_le_bytes()).collect::<Vec<_>>()).unwrap();
        assert_eq!(read_logits(&path, 2, 3).unwrap(), values);
        assert!(read_logits(&path, 3, 3).is_err());
    }
}
