//! The `llama` (SentencePiece-style) tokenizer: the text's characters, the pair of neighbours whose
//! joined text is the best-scored token merged first (the leftmost among equals), until no pair is a
//! token; then each piece is its token, or its bytes' `<0xNN>` tokens.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashSet};

use usine_engine::TokenId;

use super::Tokenizer;

#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of `left` and its next symbol.
#[derive(Debug)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bigram {
    /// The best score first, then the leftmost. Scores compare as llama.cpp's `<` and `==` do: -0 and
    /// +0 are equal, and a NaN is equal to anything (the heap stays sound, in some order).
    fn cmp(&self, other: &Self) -> Ordering {
        let score = self.score.partial_cmp(&other.score).unwrap_or(Ordering::Equal);
        score.then_with(|| Reverse(self.left).cmp(&Reverse(other.left)))
    }
}

/// The pairs of neighbouring characters that some token holds: where two characters of a text are no
/// such pair, no token can span them, so no merge ever crosses there.
pub(super) fn pairs(tokens: &[String]) -> HashSet<(char, char)> {
    let mut pairs = HashSet::new();
    for token in tokens {
        let mut chars = token.chars();
        if let Some(mut previous) = chars.next() {
            for c in chars {
                pairs.insert((previous, c));
                previous = c;
            }
        }
    }
    pairs
}

/// Appends the tokens of `text` (spaces already written `▁`) to `out`.
///
/// The text is cut where no token can span two neighbouring characters ([`pairs`]), and each piece
/// merged on its own: no merge crosses such a cut, so the pieces' merges are the whole text's, and the
/// result is llama.cpp's, which merges the whole text in one queue (a queue of a piece is small and
/// stays in cache; one of a megabyte's does not).
pub(super) fn encode(tokenizer: &Tokenizer, text: &str, out: &mut Vec<TokenId>) {
    let mut buffers = (Vec::new(), BinaryHeap::new());
    let mut start = 0;
    let mut previous: Option<char> = None;
    for (at, c) in text.char_indices() {
        if let Some(before) = previous
            && !tokenizer.pairs.contains(&(before, c))
        {
            encode_piece(tokenizer, &text[start..at], out, &mut buffers);
            start = at;
        }
        previous = Some(c);
    }
    encode_piece(tokenizer, &text[start..], out, &mut buffers);
}

fn encode_piece(
    tokenizer: &Tokenizer,
    text: &str,
    out: &mut Vec<TokenId>,
    (symbols, queue): &mut (Vec<Symbol>, BinaryHeap<Bigram>),
) {
    symbols.clear();
    queue.clear();
    for (start, c) in text.char_indices() {
        let index = symbols.len();
        symbols.push(Symbol { start, len: c.len_utf8(), prev: index.checked_sub(1), next: Some(index + 1) });
    }
    let Some(last) = symbols.last_mut() else { return };
    last.next = None;
    let push = |queue: &mut BinaryHeap<Bigram>, symbols: &[Symbol], left: Option<usize>, right: Option<usize>| {
        let (Some(left), Some(right)) = (left, right) else { return };
        let (a, b) = (symbols[left], symbols[right]);
        let joined = &text.as_bytes()[a.start..b.start + b.len];
        if let Some(id) = tokenizer.id(joined) {
            let score = tokenizer.vocabulary.scores[id as usize];
            queue.push(Bigram { score, left, right, len: joined.len() });
        }
    };
    for left in 0..symbols.len() - 1 {
        push(queue, symbols, Some(left), Some(left + 1));
    }
    while let Some(bigram) = queue.pop() {
        let (left, right) = (symbols[bigram.left], symbols[bigram.right]);
        // A pair whose symbols changed since it was queued is stale.
        if left.len == 0 || right.len == 0 || left.len + right.len != bigram.len {
            continue;
        }
        symbols[bigram.left].len += right.len;
        symbols[bigram.left].next = right.next;
        symbols[bigram.right].len = 0;
        if let Some(next) = right.next {
            symbols[next].prev = Some(bigram.left);
        }
        push(queue, symbols, left.prev, Some(bigram.left));
        push(queue, symbols, Some(bigram.left), right.next);
    }
    let mut at = Some(0);
    while let Some(index) = at {
        let symbol = symbols[index];
        let piece = &text.as_bytes()[symbol.start..symbol.start + symbol.len];
        match tokenizer.id(piece) {
            Some(id) => out.push(id),
            None => {
                for &byte in piece {
                    let fallback = tokenizer.bytes[usize::from(byte)]
                        .or_else(|| tokenizer.id(&[byte]))
                        .or(tokenizer.vocabulary.unk);
                    out.extend(fallback);
                }
            }
        }
        at = symbol.next;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a panic is a test failure with its message")]

    use super::*;
    use crate::tokenizer::vocabulary;

    // Would catch: a cut where a token could span, which would split a merge llama.cpp makes (llama.cpp
    // merges the whole text in one queue; `encode` merges piece by piece).
    #[test]
    fn merging_piece_by_piece_gives_the_whole_texts_tokens() {
        let tokenizer = Tokenizer::new(vocabulary("mistral", 0).unwrap());
        // Texts of the vocabulary's own pieces, spaces and other characters, seeded.
        let pieces: Vec<&str> =
            tokenizer.vocabulary.tokens.iter().map(String::as_str).filter(|t| !t.starts_with('<')).collect();
        let others = ["▁", "▁▁", "é", "中", "😀", "\n", "\t", "x", "::", "0"];
        let mut state = 7_u64;
        let mut next = |n: usize| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            usize::try_from(state >> 33).unwrap() % n
        };
        for _ in 0..2000 {
            let text: String = (0..1 + next(24))
                .map(|_| if next(3) == 0 { others[next(others.len())] } else { pieces[next(pieces.len())] })
                .collect();
            let (mut cut, mut whole) = (Vec::new(), Vec::new());
            encode(&tokenizer, &text, &mut cut);
            encode_piece(&tokenizer, &text, &mut whole, &mut (Vec::new(), BinaryHeap::new()));
            assert_eq!(cut, whole, "{text:?}");
        }
    }
}
