//! The tokenizers against llama.cpp's ids, without llama.cpp: `tests/fixtures/llama-cpp-tokens.txt`
//! holds llama.cpp's ids of a sample of `cargo xtask parity`'s corpus (every twelfth string, its first 100 characters: prose,
//! code, spaces, digits, scripts, emoji, special tokens' texts, control characters) on each vocabulary
//! the generator writes, as a prompt and as text. The test writes each vocabulary's file as the
//! fixture's was written (the tiny-llama preset, one q8_0 layer), reads its tokenizer back from the
//! GGUF bytes as the engine does, and holds every id to llama.cpp's. `cargo xtask parity` remains the
//! proof on the whole corpus; re-bless with `cargo xtask parity --bless` when the vocabularies change.

use usine_engine_candle::tokenizer::{self, Tokenizer};
use usine_engine_candle::{presets, random_gguf_with, tokenizer_of};

const FIXTURE: &str = include_str!("../fixtures/llama-cpp-tokens.txt");

fn ids(list: &str) -> Vec<u32> {
    list.split(',').filter(|id| !id.is_empty()).map(|id| id.parse().unwrap()).collect()
}

fn tokenizer(vocabulary: &str) -> Tokenizer {
    let preset = presets().into_iter().find(|preset| preset.name == "tiny-llama").unwrap();
    let vocabulary = tokenizer::vocabulary(vocabulary, preset.config.vocab).unwrap();
    tokenizer_of(&random_gguf_with(&preset, 1, "q8_0", 58, &vocabulary).unwrap()).unwrap()
}

#[test]
fn every_vocabulary_tokenizes_the_sample_as_llama_cpp_does() {
    let mut current: Option<(String, Tokenizer)> = None;
    let (mut checked, mut vocabularies) = (0, std::collections::BTreeSet::new());
    for line in FIXTURE.lines().filter(|line| !line.starts_with('#')) {
        let fields: Vec<&str> = line.split('\t').collect();
        let [vocabulary, text, prompt, plain] = fields.as_slice() else { panic!("a bad fixture line: {line}") };
        if current.as_ref().is_none_or(|(name, _)| name != vocabulary) {
            current = Some(((*vocabulary).to_owned(), tokenizer(vocabulary)));
        }
        let (_, tokenizer) = current.as_ref().unwrap();
        let text: String = serde_json::from_str(text).unwrap();
        assert_eq!(tokenizer.encode(&text, true, true), ids(prompt), "{vocabulary}: {text:?} as a prompt");
        assert_eq!(tokenizer.encode(&text, false, false), ids(plain), "{vocabulary}: {text:?} as text");
        checked += 1;
        vocabularies.insert((*vocabulary).to_owned());
    }
    assert_eq!(vocabularies.len(), tokenizer::VOCABULARIES.len(), "every vocabulary has its lines");
    assert!(checked >= 7 * 100, "{checked} strings");
}
