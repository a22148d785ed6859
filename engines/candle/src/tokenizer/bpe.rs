//! The `gpt2` (byte-level BPE) tokenizer's merging: a word's characters (in GPT-2's byte alphabet),
//! the pair of neighbours of the earliest merge merged first (the leftmost among equals), until no
//! pair has a merge; then each piece is its token, or its bytes' tokens.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use usine_engine::TokenId;

use super::Tokenizer;

/// Where merge `merge` splits into its two texts: at the first space after its first character (as
/// llama.cpp).
fn split(merge: &str) -> Option<usize> {
    merge.as_bytes().iter().skip(1).position(|&byte| byte == b' ').map(|at| at + 1)
}

/// Checks that each of `merges` is two texts split by a space, and that there are at most
/// [`MAX_MERGES`].
pub(super) fn check(merges: &[String]) -> Result<(), String> {
    if merges.len() > MAX_MERGES {
        return Err(format!("{} merges, more than {MAX_MERGES}", merges.len()));
    }
    match merges.iter().position(|merge| split(merge).is_none()) {
        Some(rank) => Err(format!("merge {rank} ({:?}) is not two texts split by a space", merges[rank])),
        None => Ok(()),
    }
}

/// Most merges a vocabulary may hold.
pub(crate) const MAX_MERGES: usize = 1 << 21;

/// The merges, over interned texts: every token's text has its id as symbol; texts that merges name
/// and no token holds get symbols past the vocabulary.
#[derive(Debug)]
pub(super) struct Merges {
    /// The symbols of texts that are no token.
    extra: HashMap<Box<[u8]>, u32>,
    /// `(left, right)` to the merge's rank and the joined symbol.
    ranks: HashMap<(u32, u32), (u32, u32)>,
    tokens: u32,
}

impl Merges {
    /// The merges of `merges` over the tokens `ids`; a merge that is not two texts split by a space
    /// is skipped (a file's are checked when it is read: [`check`]).
    pub(super) fn new(merges: &[String], ids: &HashMap<Box<[u8]>, TokenId>, tokens: usize) -> Self {
        let tokens = u32::try_from(tokens).expect("the vocabulary is bounded");
        let mut extra: HashMap<Box<[u8]>, u32> = HashMap::new();
        let mut intern = |text: &[u8]| -> u32 {
            if let Some(&id) = ids.get(text) {
                return id;
            }
            let next = tokens + u32::try_from(extra.len()).expect("merges are bounded by the file");
            *extra.entry(text.into()).or_insert(next)
        };
        let mut ranks = HashMap::with_capacity(merges.len());
        for (rank, merge) in merges.iter().enumerate() {
            // As llama.cpp: the parts are split at the first space after the first character.
            let Some(at) = split(merge) else { continue };
            let (left, right) = (&merge.as_bytes()[..at], &merge.as_bytes()[at + 1..]);
            let joined = [left, right].concat();
            let (left, right, joined) = (intern(left), intern(right), intern(&joined));
            let rank = u32::try_from(rank).expect("merges are bounded");
            ranks.entry((left, right)).or_insert((rank, joined)); // the first of equal merges counts
        }
        Self { extra, ranks, tokens }
    }

    fn symbol(&self, tokenizer: &Tokenizer, text: &[u8]) -> Option<u32> {
        tokenizer.id(text).or_else(|| self.extra.get(text).copied())
    }

    /// Appends the tokens of `word` (in GPT-2's alphabet) to `out`.
    pub(super) fn encode(&self, tokenizer: &Tokenizer, word: &str, out: &mut Vec<TokenId>) {
        #[derive(Clone, Copy)]
        struct Symbol {
            start: usize,
            len: usize,
            id: Option<u32>,
            prev: Option<usize>,
            next: Option<usize>,
        }
        let bytes = word.as_bytes();
        let mut symbols: Vec<Symbol> = word
            .char_indices()
            .enumerate()
            .map(|(index, (start, c))| Symbol {
                start,
                len: c.len_utf8(),
                id: self.symbol(tokenizer, &bytes[start..start + c.len_utf8()]),
                prev: index.checked_sub(1),
                next: Some(index + 1),
            })
            .collect();
        let Some(last) = symbols.last_mut() else { return };
        last.next = None;
        // (rank, leftmost) first: the heap holds (Reverse(rank), Reverse(left), right, left id, right id).
        type Entry = (Reverse<u32>, Reverse<usize>, usize, u32, u32);
        let mut queue: BinaryHeap<Entry> = BinaryHeap::new();
        let push = |queue: &mut BinaryHeap<Entry>, symbols: &[Symbol], left: Option<usize>, right: Option<usize>| {
            let (Some(left), Some(right)) = (left, right) else { return };
            let (Some(a), Some(b)) = (symbols[left].id, symbols[right].id) else { return };
            if let Some(&(rank, _)) = self.ranks.get(&(a, b)) {
                queue.push((Reverse(rank), Reverse(left), right, a, b));
            }
        };
        for left in 0..symbols.len() - 1 {
            push(&mut queue, &symbols, Some(left), Some(left + 1));
        }
        while let Some((_, Reverse(left), right, a, b)) = queue.pop() {
            let (l, r) = (symbols[left], symbols[right]);
            // A pair whose symbols changed since it was queued is stale.
            if l.len == 0 || r.len == 0 || l.id != Some(a) || r.id != Some(b) || l.next != Some(right) {
                continue;
            }
            let (_, joined) = self.ranks[&(a, b)];
            symbols[left].len += r.len;
            symbols[left].id = Some(joined);
            symbols[left].next = r.next;
            symbols[right].len = 0;
            if let Some(next) = r.next {
                symbols[next].prev = Some(left);
            }
            push(&mut queue, &symbols, l.prev, Some(left));
            push(&mut queue, &symbols, Some(left), r.next);
        }
        let mut at = Some(0);
        while let Some(index) = at {
            let symbol = symbols[index];
            match symbol.id.filter(|&id| id < self.tokens) {
                Some(id) => out.push(id),
                // As llama.cpp: a piece that is no token falls back on the tokens of its single bytes.
                None => {
                    for &byte in &bytes[symbol.start..symbol.start + symbol.len] {
                        out.extend(tokenizer.id(&[byte]));
                    }
                }
            }
            at = symbol.next;
        }
    }
}
