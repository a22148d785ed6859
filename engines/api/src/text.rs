//! Text helpers every engine and executor needs: UTF-8 that arrives byte by byte, and stop sequences
//! that must never leak half-matched into a stream.

/// Decodes UTF-8 that arrives in pieces: complete characters come out at once, a character split
/// across pieces waits for its last byte, and bytes that can never be UTF-8 become U+FFFD.
#[derive(Debug, Clone, Default)]
pub struct Utf8Decoder {
    pending: Vec<u8>,
}

impl Utf8Decoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// The text that `bytes` completes.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut text = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(valid) => {
                    text.push_str(valid);
                    self.pending.clear();
                    return text;
                }
                Err(error) => {
                    let (valid, rest) = self.pending.split_at(error.valid_up_to());
                    text.push_str(std::str::from_utf8(valid).expect("checked valid just above"));
                    match error.error_len() {
                        // An incomplete character at the end: wait for more.
                        None => {
                            self.pending = rest.to_vec();
                            return text;
                        }
                        Some(bad) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            self.pending = rest[bad..].to_vec();
                        }
                    }
                }
            }
        }
    }

    /// Whatever is still pending at the end, as U+FFFD if it is an unfinished character.
    pub fn finish(&mut self) -> String {
        let text = if self.pending.is_empty() { String::new() } else { char::REPLACEMENT_CHARACTER.to_string() };
        self.pending.clear();
        text
    }
}

/// Watches streamed text for stop sequences.
///
/// Text that could be the start of a stop sequence is held back until it is clear either way, so a
/// reader never sees part of a stop sequence; the stop sequence itself is never emitted.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

/// What [`StopMatcher::push`] lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// Text safe to emit now.
    pub text: String,
    /// Whether a stop sequence was reached (everything after it is dropped).
    pub stopped: bool,
}

impl StopMatcher {
    /// A matcher for these stop sequences (empty ones are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|stop| !stop.is_empty()).cloned().collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Takes the next piece of text; returns what may be emitted.
    pub fn push(&mut self, delta: &str) -> Released {
        if self.stopped {
            return Released { text: String::new(), stopped: true };
        }
        self.held.push_str(delta);
        if let Some(at) = self.stops.iter().filter_map(|stop| self.held.find(stop.as_str())).min() {
            self.stopped = true;
            let text = self.held[..at].to_owned();
            self.held.clear();
            return Released { text, stopped: true };
        }
        // Hold back the longest tail that is the start of some stop sequence.
        let keep = self
            .held
            .char_indices()
            .map(|(at, _)| at)
            .find(|&at| self.stops.iter().any(|stop| stop.starts_with(&self.held[at..])))
            .unwrap_or(self.held.len());
        let text = self.held[..keep].to_owned();
        self.held.drain(..keep);
        Released { text, stopped: false }
    }

    /// The text still held back, at the end of the stream (it did not become a stop sequence).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_split_across_pieces_wait_for_their_last_byte() {
        let mut decoder = Utf8Decoder::new();
        let bytes = "é€😀".as_bytes();
        let mut text = String::new();
        for byte in bytes {
            text.push_str(&decoder.push(&[*byte]));
        }
        assert_eq!(text, "é€😀");
        assert_eq!(decoder.push(&[0xE2, 0x82]), "");
        assert_eq!(decoder.finish(), "\u{FFFD}");
        assert_eq!(decoder.push(&[b'a', 0xFF, b'b']), "a\u{FFFD}b");
    }

    #[test]
    fn a_stop_sequence_is_never_emitted_even_in_part() {
        let mut matcher = StopMatcher::new(&["\n\nUser:".into(), "###".into()]);
        let mut out = String::new();
        for piece in ["Hello", " there", "\n", "\n", "Us", "er", ":", " more"] {
            let released = matcher.push(piece);
            out.push_str(&released.text);
            if released.stopped {
                break;
            }
        }
        assert_eq!(out, "Hello there");
        assert!(matcher.push("late").stopped, "nothing passes after a stop");
    }

    #[test]
    fn held_text_that_does_not_become_a_stop_is_released() {
        let mut matcher = StopMatcher::new(&["###".into()]);
        assert_eq!(matcher.push("a#").text, "a");
        assert_eq!(matcher.push("#b").text, "##b");
        assert_eq!(matcher.push("#").text, "");
        assert_eq!(matcher.finish(), "#");
        let mut none = StopMatcher::new(&[]);
        assert_eq!(none.push("anything"), Released { text: "anything".into(), stopped: false });
    }

    #[test]
    fn the_earliest_stop_wins_and_multibyte_text_is_cut_on_character_boundaries() {
        let mut matcher = StopMatcher::new(&["ü".into(), "xyz".into()]);
        assert_eq!(matcher.push("aé"), Released { text: "aé".into(), stopped: false });
        assert_eq!(matcher.push("bxyzcü"), Released { text: "b".into(), stopped: true });
    }
}

/// The detokenizer of byte-level vocabularies: token `b` below 256 is byte `b`; tokens from 256 up
/// (special tokens, such as an end of sequence) have no text.
#[derive(Debug, Default)]
pub struct ByteDetokenizer {
    utf8: Utf8Decoder,
}

impl crate::engine::Detokenizer for ByteDetokenizer {
    fn push(&mut self, token: crate::types::TokenId) -> String {
        match u8::try_from(token) {
            Ok(byte) => self.utf8.push(&[byte]),
            Err(_) => String::new(),
        }
    }

    fn finish(&mut self) -> String {
        self.utf8.finish()
    }
}
