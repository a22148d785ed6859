//! This engine's side of `cargo xtask parity`, one JSON line per command:
//!
//! - `parity logits MODEL.gguf IDS OUT.bin`: runs the comma-separated token ids through the model one
//!   position at a time (teacher-forced) and writes the logits of every position to OUT.bin, f32
//!   little-endian, positions × vocabulary.
//! - `parity greedy MODEL.gguf PROMPT_IDS TOKENS`: greedy decoding from the prompt; the tokens, and at
//!   each step the runner-up and the gap between their logits (for the comparison's near-ties).
//!
//! - `parity tokenize MODEL.gguf STRINGS.bin OUT.bin`, `parity tokenize-speed MODEL.gguf TEXT TURNS` and
//!   `parity template MODEL.gguf CHATS.bin OUT.bin`: the tokenizer and the chat template, in the files
//!   and lines of the llama.cpp peer's modes of the same names (see `peers/llama-cpp`), so that the
//!   two compare byte for byte. `template` writes, after each rendered text, the conversation's prompt
//!   ids (`chat_prompt`'s); the peer writes llama.cpp's ids of its rendered text.
//!
//! The model runs on one thread: the product's rows are split across threads, never its sums, so the figures
//! do not depend on the count, and one thread keeps the machine free for the peer.

#![allow(clippy::print_stdout, reason = "the JSON line is the output")]

use std::io::Write as _;

use usine_engine::{Message, Role};
use usine_engine_candle::tokenizer::Template;
use usine_engine_candle::{Decoder, tokenizer_of};

type Error = Box<dyn std::error::Error>;

fn ids(list: &str) -> Result<Vec<u32>, Error> {
    Ok(list.split(',').map(|id| id.trim().parse()).collect::<Result<_, _>>()?)
}

/// The best logit's index and the runner-up's (the lowest index first among equals), and their gap.
fn top_two(logits: &[f32]) -> (usize, usize, f32) {
    let (mut best, mut second) = if logits[1] > logits[0] { (1, 0) } else { (0, 1) };
    for (index, logit) in logits.iter().enumerate().skip(2) {
        if *logit > logits[best] {
            (best, second) = (index, best);
        } else if *logit > logits[second] {
            second = index;
        }
    }
    (best, second, logits[best] - logits[second])
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["logits", model, list, out] => {
            let ids = ids(list)?;
            let mut decoder = Decoder::new(&std::fs::read(model)?, 1, ids.len())?;
            let mut file = std::io::BufWriter::new(std::fs::File::create(out)?);
            for id in &ids {
                for logit in decoder.step(*id)? {
                    file.write_all(&logit.to_le_bytes())?;
                }
            }
            file.flush()?;
            println!("{{\"vocab\": {}, \"positions\": {}}}", decoder.config().vocab, ids.len());
        }
        ["greedy", model, list, tokens] => {
            let (prompt, tokens): (Vec<u32>, usize) = (ids(list)?, tokens.parse()?);
            let mut decoder = Decoder::new(&std::fs::read(model)?, 1, prompt.len() + tokens)?;
            let mut logits = Vec::new();
            for id in &prompt {
                logits = decoder.step(*id)?;
            }
            let (mut greedy, mut runner_up, mut gaps) = (Vec::new(), Vec::new(), Vec::new());
            while greedy.len() < tokens {
                let (best, second, gap) = top_two(&logits);
                greedy.push(best);
                runner_up.push(second);
                gaps.push(gap);
                if greedy.len() < tokens {
                    logits = decoder.step(u32::try_from(best)?)?;
                }
            }
            let list = |values: &[usize]| values.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
            let gaps = gaps.iter().map(f32::to_string).collect::<Vec<_>>().join(",");
            println!("{{\"tokens\": [{}], \"runner_up\": [{}], \"gaps\": [{gaps}]}}", list(&greedy), list(&runner_up));
        }
        ["tokenize", model, strings, out] => {
            let tokenizer = tokenizer_of(&std::fs::read(model)?)?;
            let input = std::fs::read(strings)?;
            let mut strings = Strings { bytes: &input };
            let (mut output, mut count) = (Vec::new(), 0);
            while !strings.bytes.is_empty() {
                let text = std::str::from_utf8(strings.string()?)?;
                let prompt = tokenizer.encode(text, true, true);
                let plain = tokenizer.encode(text, false, false);
                for ids in [&prompt, &plain] {
                    push_ids(&mut output, ids)?;
                }
                push_string(&mut output, tokenizer.decode(&plain).as_bytes())?;
                count += 1;
            }
            std::fs::write(out, output)?;
            println!("{{\"strings\": {count}}}");
        }
        ["tokenize-speed", model, text, turns] => {
            let tokenizer = tokenizer_of(&std::fs::read(model)?)?;
            let text = std::fs::read_to_string(text)?;
            let (mut seconds, mut tokens) = (Vec::new(), 0);
            for _ in 0..turns.parse::<usize>()?.max(1) {
                let start = std::time::Instant::now();
                tokens = tokenizer.encode(&text, false, false).len();
                seconds.push(start.elapsed().as_secs_f64().to_string());
            }
            println!("{{\"seconds\": [{}], \"tokens\": {tokens}}}", seconds.join(","));
        }
        ["template", model, chats, out] => {
            let tokenizer = tokenizer_of(&std::fs::read(model)?)?;
            let vocabulary = tokenizer.vocabulary();
            let source = vocabulary.chat_template.as_deref().ok_or("the model has no chat template")?;
            let template = Template::new(source, vocabulary.text(vocabulary.bos), vocabulary.text(vocabulary.eos))?;
            let input = std::fs::read(chats)?;
            let mut chats = Strings { bytes: &input };
            let mut output = Vec::new();
            while !chats.bytes.is_empty() {
                let mut messages = Vec::new();
                for _ in 0..chats.u32()? {
                    let role = match chats.string()? {
                        b"system" => Role::System,
                        b"user" => Role::User,
                        b"assistant" => Role::Assistant,
                        other => return Err(format!("role {:?}", String::from_utf8_lossy(other)).into()),
                    };
                    messages.push(Message::new(role, std::str::from_utf8(chats.string()?)?));
                }
                match template.render(&messages, true, tokenizer.guard()) {
                    Ok(rendered) => {
                        output.push(1);
                        push_string(&mut output, rendered.unescape(&rendered.text).as_bytes())?;
                        push_ids(&mut output, &tokenizer.encode_chat(&rendered))?;
                    }
                    Err(error) => {
                        output.push(0);
                        push_string(&mut output, error.to_string().as_bytes())?;
                    }
                }
            }
            std::fs::write(out, output)?;
        }
        _ => {
            return Err("usage: parity logits MODEL.gguf IDS OUT.bin | parity greedy MODEL.gguf PROMPT_IDS TOKENS | \
                        parity tokenize MODEL.gguf STRINGS.bin OUT.bin | parity tokenize-speed MODEL.gguf TEXT TURNS | \
                        parity template MODEL.gguf CHATS.bin OUT.bin"
                .into());
        }
    }
    Ok(())
}

/// Length-prefixed byte strings (a little-endian u32 length, then the bytes), as the peer reads them.
struct Strings<'b> {
    bytes: &'b [u8],
}

impl<'b> Strings<'b> {
    fn u32(&mut self) -> Result<u32, Error> {
        let (head, rest) = self.bytes.split_first_chunk::<4>().ok_or("a truncated length")?;
        self.bytes = rest;
        Ok(u32::from_le_bytes(*head))
    }

    fn string(&mut self) -> Result<&'b [u8], Error> {
        let len = usize::try_from(self.u32()?)?;
        if len > self.bytes.len() {
            return Err("a truncated string".into());
        }
        let (text, rest) = self.bytes.split_at(len);
        self.bytes = rest;
        Ok(text)
    }
}

fn push_string(out: &mut Vec<u8>, text: &[u8]) -> Result<(), Error> {
    out.extend(u32::try_from(text.len())?.to_le_bytes());
    out.extend_from_slice(text);
    Ok(())
}

fn push_ids(out: &mut Vec<u8>, ids: &[u32]) -> Result<(), Error> {
    out.extend(u32::try_from(ids.len())?.to_le_bytes());
    out.extend(ids.iter().flat_map(|id| id.to_le_bytes()));
    Ok(())
}
