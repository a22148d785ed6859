//! This engine's side of `cargo xtask parity`, one JSON line per command:
//!
//! - `parity logits MODEL.gguf IDS OUT.bin`: runs the comma-separated token ids through the model one
//!   position at a time (teacher-forced) and writes the logits of every position to OUT.bin, f32
//!   little-endian, positions × vocabulary.
//! - `parity greedy MODEL.gguf PROMPT_IDS TOKENS`: greedy decoding from the prompt; the tokens, and at
//!   each step the runner-up and the gap between their logits (for the comparison's near-ties).
//!
//! Both run on one thread: the product's rows are split across threads, never its sums, so the figures
//! do not depend on the count, and one thread keeps the machine free for the peer.

#![allow(clippy::print_stdout, reason = "the JSON line is the output")]

use std::io::Write as _;

use usine_engine_candle::Decoder;

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
        _ => {
            return Err(
                "usage: parity logits MODEL.gguf IDS OUT.bin | parity greedy MODEL.gguf PROMPT_IDS TOKENS".into()
            );
        }
    }
    Ok(())
}
