//! `cargo xtask parity`: the candle engine's numbers against llama.cpp's on the same GGUF files, for
//! each architecture (llama, qwen2) and weight type the engine reads, so that a wrong rope, norm, bias or
//! dequantization shows as a difference far above rounding.
//!
//! The files hold random weights, written by the candle engine's `random_model` example into
//! `target/parity/` (never committed): a small shape of each architecture, or with `--preset` a real
//! model's widths, vocabulary and heads, two layers (see [`PRESETS`]). For each file, both sides' logits
//! at [`POSITIONS`] teacher-forced positions of the same seeded ids ([`compare`], checked against the
//! type's tolerance in [`BY_TYPE`] by [`Logits::failures`]: the engine's `tolerance.rs`), then [`TOKENS`]
//! greedy tokens from a [`PROMPT`]-token prompt on both sides, compared by bench-peers' [`agreement`].
//! llama.cpp's side is bench-peers' peer (`peers/llama-cpp`). A table goes to stderr, and the command
//! fails if any file does.
//!
//! `--bless` ([`bless`]) writes llama.cpp's logits on the [`FIXTURES`] into the engine's test fixtures
//! instead, with each generated file's BLAKE3, so that `cargo test` checks the engine's maths without
//! llama.cpp.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

use crate::bench_peers::{Agreement, agreement, build, build_peer, ids, run_json};
use crate::tolerance::{BY_TYPE, Logits, compare};

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

/// The files whose llama.cpp logits `--bless` commits, as `random_model`'s preset and type, for
/// `cargo test` to hold the engine to without llama.cpp (`engines/candle/tests/it/llama_cpp.rs`): both
/// architectures (rope factors on llama; tied output and biases on qwen2), the engine's kernel types
/// (Q8_0, Q4_0), a K-quant mix and the floats, whose tight tolerances catch what a rounding one would not.
const FIXTURES: [(&str, &str); 5] = [
    ("tiny-llama", "f32"),
    ("tiny-llama", "q8_0"),
    ("tiny-llama", "q4_k_m"),
    ("tiny-qwen2", "f16"),
    ("tiny-qwen2", "q4_0"),
];
/// The teacher-forced positions of each fixture: the first of the same ids [`POSITIONS`] compares
/// (16 × a vocabulary of 384 f32 logits: 24 KiB a file).
const FIXTURE_POSITIONS: usize = 16;
/// Where the fixtures go, under the workspace's root, and their manifest there.
const FIXTURE_FOLDER: &str = "engines/candle/tests/fixtures";
const FIXTURE_MANIFEST: &str = "llama-cpp-logits.txt";

/// The table's argmax cell: positions where the best logits agree, and how far apart they lie elsewhere.
fn argmax_cell(logits: &Logits) -> String {
    let parted = logits.positions - logits.argmax_equal;
    if parted == 0 {
        format!("{}/{}", logits.argmax_equal, logits.positions)
    } else {
        format!(
            "{}/{} ({parted} near-tie, widest {:.1e})",
            logits.argmax_equal, logits.positions, logits.widest_parting
        )
    }
}

/// `count` pseudo-random token ids below `vocab`, the same for a seed on every run (SplitMix64).
fn token_ids(seed: u64, count: usize, vocab: usize) -> Vec<u64> {
    let mut seeded = crate::tokens::Seeded(seed);
    (0..count).map(|_| seeded.next() % vocab as u64).collect()
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
    /// `random_model`'s `preset` with `kind` weights (two layers, its default), its vocabulary's size,
    /// and `random_model`'s JSON line.
    fn model(&self, preset: &str, kind: &str) -> Result<(PathBuf, usize, Value)> {
        let (gguf, value) = crate::model::generated_gguf(&self.generator, &self.work, preset, 2, kind)?;
        let vocab = value["vocab"].as_u64().with_context(|| format!("no `vocab` in {value}"))?;
        Ok((gguf, usize::try_from(vocab)?, value))
    }

    /// llama.cpp's teacher-forced logits of `ids` on `gguf` (a vocabulary of `vocab`), written to `out`.
    fn peer_logits(&self, gguf: &Path, vocab: usize, ids: &[u64], out: &Path) -> Result<Vec<f32>> {
        let value =
            run_json(Command::new(&self.peer).arg("logits").arg(gguf).arg(&self.threads).arg(id_list(ids)).arg(out))?;
        let shape = (value["vocab"].as_u64(), value["positions"].as_u64());
        ensure!(
            shape == (Some(vocab as u64), Some(ids.len() as u64)),
            "llama.cpp says {value}: the file's vocabulary is {vocab}, and {} positions were asked for",
            ids.len()
        );
        read_logits(out, ids.len(), vocab)
    }

    /// Both sides' logits and greedy tokens on `random_model`'s `preset` with `kind` weights.
    fn check(&self, preset: &str, kind: &str) -> Result<Outcome> {
        let (gguf, vocab, _) = self.model(preset, kind)?;
        ensure!(vocab >= 2, "{}: a vocabulary of {vocab}", gguf.display());
        let forced = token_ids(IDS_SEED, POSITIONS, vocab);
        let name = format!("{preset}-{kind}");
        let (ours, theirs) =
            (self.work.join(format!("{name}.usine.bin")), self.work.join(format!("{name}.llama-cpp.bin")));
        let value = run_json(Command::new(&self.parity).arg("logits").arg(&gguf).arg(id_list(&forced)).arg(&ours))?;
        let shape = (value["vocab"].as_u64(), value["positions"].as_u64());
        ensure!(
            shape == (Some(vocab as u64), Some(POSITIONS as u64)),
            "usine says {value}: the file's vocabulary is {vocab}, and {POSITIONS} positions were asked for"
        );
        let theirs = self.peer_logits(&gguf, vocab, &forced, &theirs)?;
        let logits = compare(&read_logits(&ours, POSITIONS, vocab)?, &theirs, vocab)?;
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

impl Sides {
    /// Builds both sides (the peer, and the engine's `random_model` and `parity` examples).
    fn build(root: &Path) -> Result<Self> {
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
        Ok(Self { generator, parity, peer, threads, work })
    }
}

/// Every file of `preset` (see [`PRESETS`]) in every type; the table and any failure's reasons go to
/// stderr.
pub(crate) fn run(root: &Path, preset: &str) -> Result<ExitCode> {
    let (_, models) = PRESETS
        .iter()
        .find(|(name, _)| *name == preset)
        .with_context(|| format!("no preset `{preset}` ({})", presets()))?;
    let sides = Sides::build(root)?;
    let header =
        "| arch | type | worst abs diff | worst relative diff | tolerance | argmax equal | greedy tokens equal | |";
    let mut table = vec![header.to_owned(), "|---|---|---|---|---|---|---|---|".to_owned()];
    let mut reasons = Vec::new();
    for (arch, model) in *models {
        for (kind, tolerance) in BY_TYPE {
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
                        argmax_cell(&logits),
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
    let tokenizer_table = if preset == "tiny" { tokenizers(root, &sides, &mut reasons)? } else { Vec::new() };
    eprintln!(
        "\nparity, preset {preset}: usine against llama.cpp, {POSITIONS} teacher-forced positions and {TOKENS} greedy \
         tokens per file (relative: a share of llama.cpp's logit spread at the position)"
    );
    for line in &table {
        eprintln!("{line}");
    }
    if !tokenizer_table.is_empty() {
        eprintln!(
            "\nparity of the tokenizers: every string as a prompt and as text, the chats through each template, \
             and {} MB of them tokenized {} times by each (median MB/s, spread min–max)",
            crate::tokens::SPEED_BYTES >> 20,
            crate::tokens::SPEED_TURNS
        );
        for line in &tokenizer_table {
            eprintln!("{line}");
        }
    }
    for reason in &reasons {
        eprintln!("{reason}");
    }
    Ok(if reasons.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The tokenizers' table (see `tokens.rs`); failures go to `reasons`.
fn tokenizers(root: &Path, sides: &Sides, reasons: &mut Vec<String>) -> Result<Vec<String>> {
    let strings = crate::tokens::corpus(root)?;
    let speed_text = crate::tokens::speed_text(&strings, &sides.work)?;
    let mut table: Vec<String> = crate::tokens::HEADER.iter().map(|line| (*line).to_owned()).collect();
    for (vocabulary, _) in crate::tokens::VOCABULARIES {
        let binaries = (sides.generator.as_path(), sides.parity.as_path(), sides.peer.as_path(), sides.work.as_path());
        match crate::tokens::check(binaries, vocabulary, &strings, &speed_text) {
            Ok(outcome) => {
                eprintln!("parity: {}", outcome.line);
                table.push(outcome.line);
                reasons.extend(outcome.failures);
            }
            Err(error) => reasons.push(format!("tokenizer {vocabulary}: {error:#}")),
        }
    }
    Ok(table)
}

/// Only the tokenizers' part of [`run`].
pub(crate) fn run_tokenizers(root: &Path) -> Result<ExitCode> {
    let sides = Sides::build(root)?;
    let mut reasons = Vec::new();
    let table = tokenizers(root, &sides, &mut reasons)?;
    for line in table.iter().chain(&reasons) {
        eprintln!("{line}");
    }
    Ok(if reasons.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The version of `llama-cpp-2` (which builds llama.cpp) in the peer's `Cargo.lock`.
fn peer_version(lock: &str) -> Result<String> {
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == "name = \"llama-cpp-2\"" {
            let version = lines.next().and_then(|line| line.strip_prefix("version = \"")?.strip_suffix('"'));
            return version.map(str::to_owned).context("no version after llama-cpp-2's name");
        }
    }
    bail!("no llama-cpp-2 package")
}

/// The fixtures' manifest: how they were made, then one line per file (see the engine's test).
fn manifest(peer_version: &str, lines: &[String]) -> String {
    let header = format!(
        "# llama.cpp's teacher-forced logits on generated GGUF files, which `cargo test -p usine-engine-candle`
# holds the candle engine's to within `cargo xtask parity`'s tolerances (tests/it/llama_cpp.rs), without
# llama.cpp. Written by `cargo xtask parity --bless`: llama.cpp as llama-cpp-2 {peer_version} builds it (for
# the CPU that ran it), one position at a time, keys and values in f32, no flash attention.
# A line: preset, weight type, layers, seed (`random_gguf`'s arguments), the generated file's BLAKE3, and
# the token ids; the logits are PRESET-TYPE.f32 beside this file, little-endian f32, a row of the
# vocabulary per id.
"
    );
    lines.iter().fold(header, |text, line| text + line + "\n")
}

/// `--bless`: llama.cpp's teacher-forced logits on each of [`FIXTURES`] (the first [`FIXTURE_POSITIONS`]
/// of [`run`]'s ids), written into [`FIXTURE_FOLDER`] as `PRESET-TYPE.f32`, and the manifest naming each
/// file's generator arguments, BLAKE3 and ids, from which the engine's test regenerates and checks it.
pub(crate) fn bless(root: &Path) -> Result<ExitCode> {
    let sides = Sides::build(root)?;
    let folder = root.join(FIXTURE_FOLDER);
    std::fs::create_dir_all(&folder).with_context(|| format!("creating {}", folder.display()))?;
    // The logits of a file no longer blessed would lie there unread.
    for entry in std::fs::read_dir(&folder).with_context(|| format!("reading {}", folder.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|extension| extension == "f32") {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    let lock = root.join("peers/llama-cpp/Cargo.lock");
    let version = peer_version(&std::fs::read_to_string(&lock).with_context(|| format!("{}", lock.display()))?)?;
    let mut lines = Vec::new();
    for (preset, kind) in FIXTURES {
        let (gguf, vocab, value) = sides.model(preset, kind)?;
        let field = |key: &str| {
            let field = &value[key];
            field.as_u64().map(|number| number.to_string()).or_else(|| field.as_str().map(str::to_owned))
        };
        let (Some(layers), Some(seed), Some(digest)) = (field("layers"), field("seed"), field("blake3")) else {
            bail!("random_model's line {value} lacks `layers`, `seed` or `blake3`");
        };
        let ids = token_ids(IDS_SEED, FIXTURE_POSITIONS, vocab);
        let out = folder.join(format!("{preset}-{kind}.f32"));
        sides.peer_logits(&gguf, vocab, &ids, &out)?;
        eprintln!("parity --bless: {} ({} positions of {vocab} logits)", out.display(), ids.len());
        lines.push(format!("{preset} {kind} {layers} {seed} {digest} {}", id_list(&ids)));
    }
    let path = folder.join(FIXTURE_MANIFEST);
    std::fs::write(&path, manifest(&version, &lines)).with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "parity --bless: {} (llama-cpp-2 {version}); `cargo test -p usine-engine-candle --test it` holds the engine \
         to them",
        path.display()
    );
    let binaries = (sides.generator.as_path(), sides.peer.as_path(), sides.work.as_path());
    let tokens = crate::tokens::bless(root, binaries, &version, &folder)?;
    eprintln!("parity --bless: {}", tokens.display());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is a test failure with its message")]

    use super::*;

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

    #[test]
    fn the_peers_version_is_read_from_its_lock_file() {
        let lock = "[[package]]\nname = \"llama-cpp-sys-2\"\nversion = \"0.1.9\"\n\n[[package]]\nname = \"llama-cpp-2\"\n\
                    version = \"0.1.160\"\nsource = \"registry\"\n";
        assert_eq!(peer_version(lock).unwrap(), "0.1.160");
        assert!(peer_version("[[package]]\nname = \"other\"\n").is_err());
    }

    #[test]
    fn the_manifest_is_comments_then_a_line_per_file() {
        let text =
            manifest("0.1.160", &["tiny-llama q8_0 2 58 ab 1,2".to_owned(), "tiny-qwen2 f16 2 58 cd 3,4".to_owned()]);
        assert!(text.contains("llama-cpp-2 0.1.160 builds"), "{text}");
        let lines: Vec<_> = text.lines().filter(|line| !line.starts_with('#')).collect();
        assert_eq!(lines, ["tiny-llama q8_0 2 58 ab 1,2", "tiny-qwen2 f16 2 58 cd 3,4"]);
    }
}
