//! The pre-tokenizers of `gpt2` vocabularies: text cut into words, each merged on its own. Each is the
//! regular expression of its model's `tokenizer.json`, run as llama.cpp runs it (a hand-written scanner
//! per expression, whose edge cases are llama.cpp's: a run of spaces gives its last one to the next
//! word, an unassigned character is punctuation; letters and numbers by Unicode 15.1, the version of
//! llama.cpp's tables); and GPT-2's byte alphabet.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use unicode_general_category::{GeneralCategory, get_general_category};

/// A pre-tokenizer, by the name `tokenizer.ggml.pre` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pre {
    /// No words: a vocabulary without merges (bytes), or a `llama` one.
    None,
    /// `gpt-2`: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    Gpt2,
    /// `llama-bpe` (Llama 3): contractions in any case, a letter run with one leading non-letter, digits
    /// by three, punctuation with its line breaks, line breaks with the spaces before them.
    Llama3,
    /// `qwen2`: Llama 3's, digits one by one.
    Qwen2,
    /// `smollm`: each digit a word of its own, then GPT-2's.
    SmolLm,
}

impl Pre {
    /// The pre-tokenizer `name` stands for (llama.cpp's names).
    pub fn from_name(name: &str) -> Result<Self, String> {
        match name {
            "gpt-2" => Ok(Self::Gpt2),
            "llama3" | "llama-v3" | "llama-bpe" => Ok(Self::Llama3),
            "qwen2" => Ok(Self::Qwen2),
            "smollm" => Ok(Self::SmolLm),
            other => Err(format!(
                "pre-tokenizer `{other}` is not one usine reads (gpt-2, llama-bpe, qwen2, smollm); a vocabulary \
                 without merges needs none"
            )),
        }
    }

    /// Its name in a GGUF file.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "default",
            Self::Gpt2 => "gpt-2",
            Self::Llama3 => "llama-bpe",
            Self::Qwen2 => "qwen2",
            Self::SmolLm => "smollm",
        }
    }

    /// Whether a vocabulary of this pre-tokenizer starts prompts with its start token unless it says.
    pub(crate) fn adds_bos(self) -> bool {
        self == Self::Llama3
    }

    /// Whether a word that is a token is taken whole, without merging (llama.cpp's `ignore_merges`).
    pub(crate) fn ignores_merges(self) -> bool {
        self == Self::Llama3
    }

    /// The words of `text`, in order; together they are `text`.
    pub fn split(self, text: &str) -> Vec<&str> {
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let mut words: Vec<Range<usize>> = Vec::with_capacity(chars.len() / 3 + 1);
        match self {
            Self::None => words.push(0..chars.len()),
            Self::Gpt2 => gpt2(&chars, 0..chars.len(), &mut words),
            Self::Llama3 => llama3(&chars, 0..chars.len(), 3, &mut words),
            Self::Qwen2 => llama3(&chars, 0..chars.len(), 1, &mut words),
            Self::SmolLm => {
                let mut start = 0;
                for (at, &(_, c)) in chars.iter().enumerate() {
                    if class(c).number {
                        gpt2(&chars, start..at, &mut words);
                        words.push(at..at + 1);
                        start = at + 1;
                    }
                }
                gpt2(&chars, start..chars.len(), &mut words);
            }
        }
        let offset = |at: usize| chars.get(at).map_or(text.len(), |&(offset, _)| offset);
        words
            .into_iter()
            .filter(|word| !word.is_empty())
            .map(|word| &text[offset(word.start)..offset(word.end)])
            .collect()
    }
}

/// What the expressions ask of a character.
#[derive(Debug, Clone, Copy, Default)]
struct Class {
    /// In range (a position past the segment's end has no class).
    some: bool,
    letter: bool,
    number: bool,
    space: bool,
}

fn class(c: char) -> Class {
    if c.is_ascii() {
        return Class {
            some: true,
            letter: c.is_ascii_alphabetic(),
            number: c.is_ascii_digit(),
            space: c.is_ascii_whitespace() || c == '\u{0B}',
        };
    }
    use GeneralCategory as Category;
    let category = get_general_category(c);
    Class {
        some: true,
        letter: matches!(
            category,
            Category::UppercaseLetter
                | Category::LowercaseLetter
                | Category::TitlecaseLetter
                | Category::ModifierLetter
                | Category::OtherLetter
        ) || CJK_EXTENSION_I.contains(&c),
        number: matches!(category, Category::DecimalNumber | Category::LetterNumber | Category::OtherNumber),
        space: c.is_whitespace(),
    }
}

/// The letters Unicode 15.1 added (CJK Extension I): with the crate's 15.0 tables, the letters and
/// numbers of llama.cpp's tables (15.1). Characters assigned since are unassigned to both, as to
/// llama.cpp: punctuation-like to the expressions.
const CJK_EXTENSION_I: std::ops::RangeInclusive<char> = '\u{2EBF0}'..='\u{2EE5D}';

/// The scanner's view of a segment of characters: positions outside it have no character.
struct Segment<'c> {
    chars: &'c [(usize, char)],
    range: Range<usize>,
}

impl Segment<'_> {
    fn char(&self, at: usize) -> Option<char> {
        self.range.contains(&at).then(|| self.chars[at].1)
    }

    fn class(&self, at: usize) -> Class {
        self.char(at).map(class).unwrap_or_default()
    }

    /// The length of the contraction (`'s`, `'re`, ...) at `at`, if one starts there.
    fn contraction(&self, at: usize, any_case: bool) -> Option<usize> {
        if self.char(at) != Some('\'') {
            return None;
        }
        let lower = |c: Option<char>| if any_case { c.map(|c| c.to_ascii_lowercase()) } else { c };
        let next = lower(self.char(at + 1))?;
        if matches!(next, 's' | 't' | 'm' | 'd') {
            return Some(2);
        }
        let after = lower(self.char(at + 2))?;
        matches!((next, after), ('r', 'e') | ('v', 'e') | ('l', 'l')).then_some(3)
    }

    /// The whitespace at `at`: how many characters, and the end of its last line break, if any.
    fn spaces(&self, at: usize) -> (usize, Option<usize>) {
        let mut count = 0;
        let mut line_end = None;
        while self.class(at + count).space {
            if matches!(self.char(at + count), Some('\r' | '\n')) {
                line_end = Some(at + count + 1);
            }
            count += 1;
        }
        (count, line_end)
    }
}

/// GPT-2's expression over `range` of `chars`.
fn gpt2(chars: &[(usize, char)], range: Range<usize>, words: &mut Vec<Range<usize>>) {
    let segment = Segment { chars, range: range.clone() };
    let mut pos = range.start;
    while pos < range.end {
        let start = pos;
        let c = segment.char(pos);
        if let Some(length) = segment.contraction(pos, false) {
            pos += length;
        } else {
            let space = usize::from(c == Some(' '));
            let next = segment.class(pos + space);
            let other = |class: Class| class.some && !(class.space || class.letter || class.number);
            if next.letter || next.number || other(next) {
                let same = |class: Class| {
                    if next.letter {
                        class.letter
                    } else if next.number {
                        class.number
                    } else {
                        other(class)
                    }
                };
                pos += space;
                while same(segment.class(pos)) {
                    pos += 1;
                }
            } else {
                let (count, _) = segment.spaces(pos);
                pos += if count > 1 && segment.char(pos + count).is_some() {
                    count - 1 // `\s+(?!\S)`: the last space goes with the next word
                } else {
                    count.max(1)
                };
            }
        }
        words.push(start..pos);
    }
}

/// Llama 3's expression over `range` of `chars`, digits by `digits` (Qwen2's: by one).
fn llama3(chars: &[(usize, char)], range: Range<usize>, digits: usize, words: &mut Vec<Range<usize>>) {
    let segment = Segment { chars, range: range.clone() };
    let mut pos = range.start;
    while pos < range.end {
        let start = pos;
        let c = segment.char(pos);
        let here = segment.class(pos);
        if let Some(length) = segment.contraction(pos, true) {
            pos += length;
            words.push(start..pos);
            continue;
        }
        // `[^\r\n\p{L}\p{N}]?\p{L}+`
        if !(matches!(c, Some('\r' | '\n')) || here.number) && (here.letter || segment.class(pos + 1).letter) {
            pos += 1;
            while segment.class(pos).letter {
                pos += 1;
            }
            words.push(start..pos);
            continue;
        }
        // `\p{N}{1,3}` (or `\p{N}`)
        if here.number {
            let mut first = pos;
            while segment.class(pos).number {
                pos += 1;
                if pos - first >= digits {
                    words.push(first..pos);
                    first = pos;
                }
            }
            words.push(first..pos);
            continue;
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        let next = if c == Some(' ') { segment.class(pos + 1) } else { here };
        let other = |class: Class| class.some && !(class.space || class.letter || class.number);
        if !(next.space || next.letter || next.number) && here.some {
            pos += usize::from(c == Some(' '));
            while other(segment.class(pos)) {
                pos += 1;
            }
            while matches!(segment.char(pos), Some('\r' | '\n')) {
                pos += 1;
            }
            words.push(start..pos);
            continue;
        }
        let (count, line_end) = segment.spaces(pos);
        pos = match line_end {
            // `\s*[\r\n]+`
            Some(end) => end,
            // `\s+(?!\S)`, then `\s+`
            None if count > 1 && segment.char(pos + count).is_some() => pos + count - 1,
            None => pos + count.max(1),
        };
        words.push(start..pos);
    }
}

/// GPT-2's alphabet: each byte as a character (printable Latin-1 bytes stand for themselves).
fn alphabet() -> &'static ([char; 256], std::collections::HashMap<char, u8>) {
    static ALPHABET: std::sync::OnceLock<([char; 256], std::collections::HashMap<char, u8>)> =
        std::sync::OnceLock::new();
    ALPHABET.get_or_init(|| {
        let mut chars = ['\0'; 256];
        let mut shifted = 0;
        for byte in 0..=255u8 {
            let printable = (33..=126).contains(&byte) || (161..=172).contains(&byte) || byte >= 174;
            chars[usize::from(byte)] = if printable {
                char::from(byte)
            } else {
                shifted += 1;
                char::from_u32(255 + shifted).expect("below the surrogates")
            };
        }
        let bytes = chars.iter().enumerate().map(|(byte, &c)| (c, u8::try_from(byte).expect("a byte"))).collect();
        (chars, bytes)
    })
}

/// `word`'s bytes in GPT-2's alphabet.
pub(crate) fn byte_encode(word: &str) -> String {
    let (chars, _) = alphabet();
    word.bytes().map(|byte| chars[usize::from(byte)]).collect()
}

/// The bytes `text` spells in GPT-2's alphabet; a character outside it stands for itself (UTF-8).
pub(crate) fn byte_decode(text: &str) -> Vec<u8> {
    let (_, bytes) = alphabet();
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match bytes.get(&c) {
            Some(&byte) => out.push(byte),
            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_expression_cuts_as_its_regular_expression() {
        let text = "Hello world's  end\n\n  x 12345 ÄÖ!!\r\n";
        assert_eq!(
            Pre::Gpt2.split(text),
            ["Hello", " world", "'s", " ", " end", "\n\n ", " x", " 12345", " ÄÖ", "!!", "\r\n"]
        );
        assert_eq!(
            Pre::Llama3.split(text),
            ["Hello", " world", "'s", " ", " end", "\n\n", " ", " x", " ", "123", "45", " ÄÖ", "!!\r\n"]
        );
        assert_eq!(Pre::Qwen2.split("a 12"), ["a", " ", "1", "2"]);
        assert_eq!(Pre::SmolLm.split("a 12b"), ["a", " ", "1", "2", "b"]);
        assert_eq!(Pre::Llama3.split("I'M"), ["I", "'M"], "Llama 3's contractions are in any case");
        assert_eq!(Pre::Gpt2.split("I'M"), ["I", "'", "M"]);
    }

    #[test]
    fn the_byte_alphabet_round_trips_every_byte() {
        let bytes: Vec<u8> = (0..=255).collect();
        let text = spelled(&bytes);
        assert_eq!(byte_decode(&text), bytes);
        assert_eq!(byte_encode(" a"), "Ġa");
        assert_eq!(byte_encode("\n"), "Ċ");
    }

    /// Bytes that are not UTF-8, through the alphabet (what a byte-level token can hold).
    fn spelled(bytes: &[u8]) -> String {
        let (chars, _) = alphabet();
        bytes.iter().map(|&byte| chars[usize::from(byte)]).collect()
    }
}
