//! Text of its own: a small corpus written for usine, a tokenizer built on it (words, with a byte for
//! anything else), and a seeded bigram sampler with temperature and top-p that ends sentences, and
//! sometimes the whole answer, as a real model does.

use std::collections::HashMap;

use usine_engine::{Detokenizer, TokenId, Utf8Decoder};

use crate::rng::Rng;

/// The corpus: plain sentences about running models, written for this project (no licence to track).
/// A text file, which `cargo xtask train` reads too.
pub const CORPUS: &str = include_str!("../corpus.txt");
/// The first token id after the bytes and the end-of-sequence token.
const FIRST_WORD: TokenId = 257;
/// The end-of-sequence token.
pub const END_OF_SEQUENCE: TokenId = 256;
/// Chance that the model ends its answer after a sentence.
const END_AFTER_SENTENCE: f64 = 0.25;

/// Splits text into pieces: an optional leading space and a run of letters or digits, or an optional
/// leading space and one other character.
fn pieces(text: &str) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let body = rest.strip_prefix(' ').filter(|after| !after.is_empty() && !after.starts_with(' ')).unwrap_or(rest);
        let lead = rest.len() - body.len();
        let mut chars = body.char_indices();
        let (_, first) = chars.next().expect("rest is not empty");
        let len = if first.is_alphanumeric() {
            chars.find(|(_, c)| !c.is_alphanumeric()).map_or(body.len(), |(at, _)| at)
        } else {
            first.len_utf8()
        };
        pieces.push(&rest[..lead + len]);
        rest = &rest[lead + len..];
    }
    pieces
}

/// The corpus as a vocabulary and a bigram model.
#[derive(Debug)]
pub struct Language {
    words: Vec<String>,
    ids: HashMap<String, TokenId>,
    /// For each token, the tokens that follow it in the corpus, with counts.
    next: HashMap<TokenId, Vec<(TokenId, u32)>>,
    /// Tokens that start sentences, with counts.
    starts: Vec<(TokenId, u32)>,
}

impl Language {
    /// The language of [`CORPUS`].
    pub fn corpus() -> Self {
        let mut language = Self { words: Vec::new(), ids: HashMap::new(), next: HashMap::new(), starts: Vec::new() };
        let pieces = pieces(CORPUS);
        for piece in &pieces {
            if !language.ids.contains_key(*piece) {
                let id = FIRST_WORD + TokenId::try_from(language.words.len()).expect("a small corpus");
                language.ids.insert((*piece).to_owned(), id);
                language.words.push((*piece).to_owned());
            }
        }
        let ids: Vec<TokenId> = pieces.iter().map(|piece| language.ids[*piece]).collect();
        let count = |list: &mut Vec<(TokenId, u32)>, id| match list.iter_mut().find(|(known, _)| *known == id) {
            Some((_, n)) => *n += 1,
            None => list.push((id, 1)),
        };
        count(&mut language.starts, ids[0]);
        for pair in ids.windows(2) {
            count(language.next.entry(pair[0]).or_default(), pair[1]);
            if language.ends_sentence(pair[0]) {
                count(&mut language.starts, pair[1]);
            }
        }
        language
    }

    /// How many tokens there are: bytes, end of sequence, words.
    pub fn vocabulary_size(&self) -> usize {
        FIRST_WORD as usize + self.words.len()
    }

    /// The tokens of `text`: a corpus piece where there is one, its bytes otherwise.
    pub fn tokenize(&self, text: &str) -> Vec<TokenId> {
        let mut tokens = Vec::new();
        for piece in pieces(text) {
            match self.ids.get(piece) {
                Some(&id) => tokens.push(id),
                None => tokens.extend(piece.bytes().map(TokenId::from)),
            }
        }
        tokens
    }

    /// The bytes of one token (none for end of sequence or an unknown id).
    pub fn bytes_of(&self, token: TokenId) -> &[u8] {
        if let Ok(byte) = u8::try_from(token) {
            return std::slice::from_ref(&BYTES[byte as usize]);
        }
        token
            .checked_sub(FIRST_WORD)
            .and_then(|index| self.words.get(index as usize))
            .map_or(&[], |word| word.as_bytes())
    }

    fn ends_sentence(&self, token: TokenId) -> bool {
        self.bytes_of(token).last().is_some_and(|last| matches!(last, b'.' | b'!' | b'?'))
    }

    /// Samples the token after `previous` with `temperature`, `top_k` (0: all) and `top_p`; when `may_end` (something has
    /// been said already), may end the sequence after a sentence.
    pub fn sample(
        &self,
        previous: Option<TokenId>,
        may_end: bool,
        temperature: f32,
        top_p: f32,
        top_k: u32,
        rng: &mut Rng,
    ) -> TokenId {
        if may_end
            && let Some(previous) = previous
            && self.ends_sentence(previous)
            && rng.unit() < END_AFTER_SENTENCE
        {
            return END_OF_SEQUENCE;
        }
        let candidates = previous
            .and_then(|previous| self.next.get(&previous))
            .filter(|list| !list.is_empty())
            .unwrap_or(&self.starts);
        pick(candidates, temperature, top_p, top_k, rng)
    }
}

/// Every byte, so that a byte token can be handed out as a slice.
#[allow(clippy::cast_possible_truncation, reason = "i stays below 256")]
static BYTES: [u8; 256] = {
    let mut bytes = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        bytes[i] = i as u8;
        i += 1;
    }
    bytes
};

/// Temperature, then top-p, then a draw. Temperature 0 is greedy (ties to the lowest id).
fn pick(candidates: &[(TokenId, u32)], temperature: f32, top_p: f32, top_k: u32, rng: &mut Rng) -> TokenId {
    if temperature == 0.0 {
        let best = candidates.iter().map(|&(_, n)| n).max().unwrap_or(0);
        return candidates.iter().filter(|&&(_, n)| n == best).map(|&(id, _)| id).min().unwrap_or(END_OF_SEQUENCE);
    }
    // In log space, relative to the most frequent, so that a tiny temperature cannot overflow.
    let most = f64::from(candidates.iter().map(|&(_, n)| n).max().unwrap_or(1));
    let mut weighted: Vec<(TokenId, f64)> = candidates
        .iter()
        .map(|&(id, n)| (id, ((f64::from(n).ln() - most.ln()) / f64::from(temperature)).exp()))
        .collect();
    weighted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if top_k > 0 {
        weighted.truncate(top_k as usize);
    }
    let total: f64 = weighted.iter().map(|(_, w)| w).sum();
    let mut kept = 0.0;
    let mut cut = weighted.len();
    for (index, (_, weight)) in weighted.iter().enumerate() {
        kept += weight / total;
        if kept >= f64::from(top_p) {
            cut = index + 1;
            break;
        }
    }
    let weighted = &weighted[..cut];
    let total: f64 = weighted.iter().map(|(_, w)| w).sum();
    let mut draw = rng.unit() * total;
    for &(id, weight) in weighted {
        if draw < weight {
            return id;
        }
        draw -= weight;
    }
    weighted.last().map_or(END_OF_SEQUENCE, |&(id, _)| id)
}

/// Tokens back to text, one at a time.
pub struct SimDetokenizer {
    language: std::sync::Arc<Language>,
    utf8: Utf8Decoder,
}

impl SimDetokenizer {
    /// A detokenizer for `language`.
    pub fn new(language: std::sync::Arc<Language>) -> Self {
        Self { language, utf8: Utf8Decoder::new() }
    }
}

impl Detokenizer for SimDetokenizer {
    fn push(&mut self, token: TokenId) -> String {
        let bytes = self.language.bytes_of(token).to_vec();
        self.utf8.push(&bytes)
    }

    fn finish(&mut self) -> String {
        self.utf8.finish()
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn any_text_survives_a_round_trip() {
        let language = Language::corpus();
        for text in ["The kernel keeps models.", "  two  spaces ", "ünïcödé 日本語 ✓", "", "x"] {
            let tokens = language.tokenize(text);
            let bytes: Vec<u8> = tokens.iter().flat_map(|&t| language.bytes_of(t).to_vec()).collect();
            assert_eq!(String::from_utf8(bytes).unwrap(), text);
        }
        assert_eq!(language.tokenize(" kernel").len(), 1, "corpus words are single tokens");
        assert!(language.vocabulary_size() > 300);
    }

    #[test]
    fn a_tiny_temperature_is_all_but_greedy() {
        let language = Language::corpus();
        let the = language.tokenize("The")[0];
        let greedy = language.sample(Some(the), true, 0.0, 1.0, 0, &mut Rng::new(1));
        for seed in 0..20 {
            assert_eq!(language.sample(Some(the), true, 0.0005, 1.0, 0, &mut Rng::new(seed)), greedy);
        }
    }

    #[test]
    fn top_k_of_one_is_greedy_at_any_temperature() {
        // The first token of an answer: many sentence starts to choose from.
        let language = Language::corpus();
        let greedy = language.sample(None, false, 0.0, 1.0, 0, &mut Rng::new(1));
        for seed in 0..20 {
            assert_eq!(language.sample(None, false, 1.5, 1.0, 1, &mut Rng::new(seed)), greedy);
        }
        let spread: std::collections::BTreeSet<_> =
            (0..50).map(|seed| language.sample(None, false, 1.5, 1.0, 0, &mut Rng::new(seed))).collect();
        assert!(spread.len() > 1, "without top_k the draw spreads");
    }

    #[test]
    fn greedy_sampling_follows_the_corpus_and_seeds_repeat() {
        let language = Language::corpus();
        let the = language.tokenize("The")[0];
        let mut rng = Rng::new(1);
        let next = language.sample(Some(the), true, 0.0, 1.0, 0, &mut rng);
        assert!(String::from_utf8_lossy(language.bytes_of(next)).starts_with(' '));
        let run = |seed| {
            let mut rng = Rng::new(seed);
            let mut previous = None;
            (0..50)
                .map(|_| {
                    let token = language.sample(previous, true, 0.8, 0.9, 0, &mut rng);
                    previous = Some(token);
                    token
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }
}
