//! The engine's logits against llama.cpp's, without llama.cpp: `tests/fixtures/` holds llama.cpp's
//! teacher-forced logits on the smallest generated GGUF files (the `tiny-llama` and `tiny-qwen2` presets,
//! two layers, a few weight types; 16 positions of a vocabulary of 384, 24 KiB a file), which `cargo xtask
//! parity --bless` wrote with bench-peers' llama.cpp peer (llama.cpp as the `llama-cpp-2` crate named in
//! the manifest, `llama-cpp-logits.txt`, builds it; keys and values in f32, no flash attention, one
//! position at a time). The manifest names each file by `random_gguf`'s arguments and the BLAKE3 of its
//! bytes, and the token ids; the test regenerates the file (milliseconds), refuses it if its bytes are
//! not those llama.cpp read, runs the same ids through [`Decoder`] and holds the logits to the type's
//! tolerance of `cargo xtask parity` ([`usine_engine_candle::tolerance`], the same file). That verb
//! remains the proof, on 64 positions, every type and real widths; this is its excerpt that runs
//! everywhere.
//!
//! When the generator or candle's quantizer changes the files' bytes, or the fixtures change, re-bless:
//! `cargo xtask parity --bless` (it builds the peer: cmake and libclang, minutes the first time), then
//! commit `engines/candle/tests/fixtures/`.

use usine_engine_candle::tolerance::{BY_TYPE, Logits, Q8_K, compare};
use usine_engine_candle::{Decoder, TYPES, presets, random_gguf};

/// The fixtures' folder and its manifest.
const FOLDER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const MANIFEST: &str = "llama-cpp-logits.txt";
const REBLESS: &str = "re-bless with `cargo xtask parity --bless` and commit engines/candle/tests/fixtures/";

/// A line of the manifest: a generated file and the ids llama.cpp ran through it.
struct Fixture {
    preset: String,
    kind: String,
    layers: usize,
    seed: u64,
    blake3: String,
    ids: Vec<u32>,
}

impl Fixture {
    fn name(&self) -> String {
        format!("{}-{}", self.preset, self.kind)
    }

    /// The generated file, checked to be the one llama.cpp's logits come from.
    fn gguf(&self) -> Vec<u8> {
        let presets = presets();
        let preset = presets.iter().find(|preset| preset.name == self.preset);
        let preset = preset.unwrap_or_else(|| panic!("{}: no preset `{}`; {REBLESS}", self.name(), self.preset));
        let bytes = random_gguf(preset, self.layers, &self.kind, self.seed).unwrap();
        let digest = blake3::hash(&bytes).to_hex();
        assert!(
            digest.as_str() == self.blake3,
            "{}: the generated file is not the one llama.cpp's logits were taken from (blake3 {digest}, the \
             fixture's {}): `random_gguf` or candle's quantizer writes other bytes now; {REBLESS}",
            self.name(),
            self.blake3
        );
        bytes
    }

    /// usine's logits for every id, on one thread, and the vocabulary's size.
    fn ours(&self) -> (Vec<f32>, usize) {
        let mut decoder = Decoder::new(&self.gguf(), 1, self.ids.len()).unwrap();
        let vocab = decoder.config().vocab;
        let logits = self.ids.iter().flat_map(|id| decoder.step(*id).unwrap()).collect();
        (logits, vocab)
    }

    /// llama.cpp's logits for every id.
    fn theirs(&self, vocab: usize) -> Vec<f32> {
        let path = format!("{FOLDER}/{}.f32", self.name());
        let bytes = std::fs::read(&path).unwrap_or_else(|error| panic!("{path}: {error}; {REBLESS}"));
        assert_eq!(
            bytes.len(),
            self.ids.len() * vocab * 4,
            "{path}: not {} positions × {vocab} f32 logits; {REBLESS}",
            self.ids.len()
        );
        bytes.chunks_exact(4).map(|word| f32::from_le_bytes(word.try_into().unwrap())).collect()
    }

    fn tolerance(&self) -> f64 {
        let tolerance = BY_TYPE.iter().find(|(kind, _)| *kind == self.kind);
        tolerance.unwrap_or_else(|| panic!("{}: no tolerance for `{}`", self.name(), self.kind)).1
    }
}

/// The manifest's files (lines but `#` comments: preset, type, layers, seed, BLAKE3, comma-separated ids).
fn fixtures() -> Vec<Fixture> {
    let path = format!("{FOLDER}/{MANIFEST}");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{path}: {error}; {REBLESS}"));
    let lines = text.lines().filter(|line| !line.starts_with('#') && !line.trim().is_empty());
    lines
        .map(|line| match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            [preset, kind, layers, seed, blake3, ids] => Fixture {
                preset: (*preset).to_owned(),
                kind: (*kind).to_owned(),
                layers: layers.parse().unwrap(),
                seed: seed.parse().unwrap(),
                blake3: (*blake3).to_owned(),
                ids: ids.split(',').map(|id| id.parse().unwrap()).collect(),
            },
            _ => panic!("{path}: not a fixture line: {line}"),
        })
        .collect()
}

// Would catch: a wrong rope (positions, pairs or halves, frequency factors), norm, bias, tied output,
// attention or dequantization in either architecture, as `cargo xtask parity` does, where llama.cpp
// cannot run; and a fixture quietly compared against another file's logits.
#[test]
fn the_logits_of_the_smallest_generated_files_are_llama_cpps_within_each_types_tolerance() {
    let fixtures = fixtures();
    let presets: std::collections::BTreeSet<_> = fixtures.iter().map(|fixture| fixture.preset.as_str()).collect();
    assert_eq!(presets.into_iter().collect::<Vec<_>>(), ["tiny-llama", "tiny-qwen2"], "both architectures");
    let mut failures = Vec::new();
    let mut ours = std::collections::BTreeMap::new();
    for fixture in &fixtures {
        let (logits, vocab) = fixture.ours();
        let theirs = fixture.theirs(vocab);
        let figures: Logits =
            compare(&logits, &theirs, vocab).unwrap_or_else(|error| panic!("{}: {error}", fixture.name()));
        let tolerance = fixture.tolerance();
        eprintln!(
            "{}: {} positions, worst {:.2e} of the spread ({:.2e}), argmax {}/{}, tolerance {tolerance:e}",
            fixture.name(),
            figures.positions,
            figures.worst_relative,
            figures.worst_abs,
            figures.argmax_equal,
            figures.positions
        );
        failures
            .extend(figures.failures(tolerance).into_iter().map(|failure| format!("{}: {failure}", fixture.name())));
        ours.insert(fixture.name(), (logits, theirs, vocab));
    }
    assert!(failures.is_empty(), "usine's logits are not llama.cpp's:\n{}", failures.join("\n"));
    // The tolerance tells a file from another type's: usine's Q8_0 logits of tiny-llama are not
    // llama.cpp's Q4_K_M ones (its weights move the logits by about 0.1 of the spread).
    let (q8_0, _, vocab) = &ours["tiny-llama-q8_0"];
    let (_, q4_k_m, _) = &ours["tiny-llama-q4_k_m"];
    let crossed = compare(q8_0, q4_k_m, *vocab).unwrap();
    eprintln!("tiny-llama-q8_0 against llama.cpp's q4_k_m: worst {:.2e} of the spread", crossed.worst_relative);
    assert!(!crossed.failures(Q8_K).is_empty(), "Q8_0 logits pass for Q4_K_M's: {crossed:?}");
}

// Would catch: a weight type the engine generates without a tolerance, or one listed under another name.
#[test]
fn every_generated_type_has_a_tolerance() {
    assert_eq!(BY_TYPE.map(|(kind, _)| kind), TYPES);
}
