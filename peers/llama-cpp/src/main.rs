//! llama.cpp's side of `cargo xtask bench-peers` and `cargo xtask parity`, one JSON line per command:
//!
//! - `MODEL.gguf THREADS TOKENS PROMPT_IDS`: the same work as usine's `speed run`: from the GGUF file on
//!   disk to the first token ready (load the file, make a context, decode the prompt, the first greedy
//!   token), then the other greedy tokens one at a time. The prompt comes as token ids (usine's), so that
//!   both sides start from the same ones; the context holds the prompt and the tokens, as many as
//!   they are. Prints the times (`load_seconds`: the file mapped and the model ready;
//!   `first_token_seconds`: from before the load), the greedy tokens, and at each step the runner-up
//!   and its logit's gap to the best, for the comparison's near-ties, and the CPU time other programs
//!   took meanwhile.
//! - `logits MODEL.gguf THREADS IDS OUT.bin`: teacher-forced, the ids decoded one position at a time,
//!   and the logits of every position written to `OUT.bin` (little-endian f32, positions × vocab,
//!   row-major). Prints the vocabulary's size and the positions.
//! - `tokenize MODEL.gguf STRINGS.bin OUT.bin`: each string of `STRINGS.bin` (each a little-endian u32
//!   length and its bytes) tokenized twice, as a prompt (`add_special`, `parse_special`) and as plain
//!   text (neither), and the plain ids detokenized (`remove_special`, not `unparse_special`). `OUT.bin`
//!   holds, per string, the two id lists (a u32 count, then i32 ids) and the text (u32 length, bytes).
//! - `tokenize-speed MODEL.gguf TEXT TURNS`: the file `TEXT` tokenized as plain text `TURNS` times;
//!   prints each turn's seconds and the tokens.
//! - `template MODEL.gguf CHATS.bin OUT.bin`: each conversation of `CHATS.bin` (a u32 count of
//!   messages, then role and content as strings) rendered by the model's chat template through
//!   llama.cpp's built-in templates (`llama_chat_apply_template`, the assistant's turn asked for).
//!   `OUT.bin` holds, per conversation, a u8 (1: rendered) and the text or the error (a string), and
//!   after a text its ids as a prompt (a u32 count, then i32 ids).

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;

type Error = Box<dyn std::error::Error>;

/// The least context of `logits`, which otherwise holds just its ids.
const LOGITS_CONTEXT: u32 = 64;
/// llama.h's `LLAMA_FLASH_ATTN_TYPE_DISABLED` (`llama-cpp-sys-2`, which names it, is no dependency here).
const FLASH_ATTENTION_DISABLED: i32 = 0;

/// The best logit's index and the runner-up's, the lowest index first among equal logits (as usine's
/// greedy choice), and the gap between their logits.
fn top_two(logits: &[f32]) -> Result<(usize, usize, f32), Error> {
    if logits.len() < 2 {
        return Err(format!("{} logits: no runner-up", logits.len()).into());
    }
    let (mut best, mut second) = if logits[1] > logits[0] { (1, 0) } else { (0, 1) };
    for index in 2..logits.len() {
        if logits[index] > logits[best] {
            (best, second) = (index, best);
        } else if logits[index] > logits[second] {
            second = index;
        }
    }
    Ok((best, second, logits[best] - logits[second]))
}

/// CPU ticks (Linux's USER_HZ, 100 a second): the machine's busy ones (steal included: another
/// virtual machine's), and this process's.
fn cpu_ticks() -> Result<(u64, u64), Error> {
    let machine = std::fs::read_to_string("/proc/stat")?;
    let fields: Vec<u64> = machine
        .lines()
        .next()
        .ok_or("empty /proc/stat")?
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy =
        fields.iter().take(8).enumerate().filter(|(index, _)| !matches!(index, 3 | 4)).map(|(_, ticks)| ticks).sum();
    let own = std::fs::read_to_string("/proc/self/stat")?;
    // After the command's name, in parentheses: the state is field 3, utime 14 and stime 15.
    let own: Vec<&str> = own.rsplit_once(')').ok_or("no command in /proc/self/stat")?.1.split_whitespace().collect();
    let field = |index: usize| -> Result<u64, Error> { Ok(own.get(index).ok_or("short /proc/self/stat")?.parse()?) };
    Ok((busy, field(11)? + field(12)?))
}

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["logits", gguf, threads, ids, out] => logits(gguf, threads.parse()?, &token_ids(ids)?, out),
        ["tokenize", gguf, strings, out] => tokenize(gguf, strings, out),
        ["tokenize-speed", gguf, text, turns] => tokenize_speed(gguf, text, turns.parse()?),
        ["template", gguf, chats, out] => template(gguf, chats, out),
        ["batch", gguf, threads, streams, tokens, prompt] => {
            batch(gguf, threads.parse()?, streams.parse()?, tokens.parse()?, &token_ids(prompt)?)
        }
        [gguf, threads, tokens, prompt] => greedy(gguf, threads.parse()?, tokens.parse()?, &token_ids(prompt)?),
        _ => Err("usage: usine-peer-llama-cpp MODEL.gguf THREADS TOKENS PROMPT_IDS | usine-peer-llama-cpp logits \
                  MODEL.gguf THREADS IDS OUT.bin (ids comma-separated) | usine-peer-llama-cpp tokenize MODEL.gguf \
                  STRINGS.bin OUT.bin | usine-peer-llama-cpp tokenize-speed MODEL.gguf TEXT TURNS | \
                  usine-peer-llama-cpp template MODEL.gguf CHATS.bin OUT.bin | usine-peer-llama-cpp batch MODEL.gguf \
                  THREADS STREAMS TOKENS PROMPT_IDS"
            .into()),
    }
}

/// `streams` sequences decoded together, as llama.cpp's server batches its slots: each starts from
/// `prompt` (all the prompts in one batch), then every step advances all of them in one batch, greedy,
/// `tokens` tokens each (an end of sequence does not stop one: every step has all the sequences). Prints
/// the aggregate tokens a second over the whole, prompts included, and the time to the first tokens.
fn batch(gguf: &str, threads: i32, streams: usize, tokens: usize, prompt: &[LlamaToken]) -> Result<(), Error> {
    if prompt.is_empty() || streams == 0 || tokens == 0 {
        return Err("a prompt of 1 or more tokens, 1 or more streams and tokens".into());
    }
    let backend = backend()?;
    let model = LlamaModel::load_from_file(&backend, gguf, &LlamaModelParams::default())?;
    // One cache for all the sequences, each taking its prompt and tokens; a batch holds every prompt.
    let context_size = u32::try_from(streams * (prompt.len() + tokens))?;
    let batch_size = u32::try_from(streams * prompt.len().max(1))?;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(context_size))
        .with_n_batch(batch_size)
        .with_n_ubatch(batch_size)
        .with_n_seq_max(u32::try_from(streams)?)
        .with_kv_unified(true)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut context = model.new_context(&backend, params)?;
    let start = Instant::now();
    let mut batch = LlamaBatch::new(streams * prompt.len(), i32::try_from(streams)?);
    let last = prompt.len() - 1;
    for stream in 0..streams {
        let sequence = i32::try_from(stream)?;
        for (position, token) in prompt.iter().enumerate() {
            batch.add(*token, i32::try_from(position)?, &[sequence], position == last)?;
        }
    }
    context.decode(&mut batch)?;
    let mut outputs: Vec<i32> = (0..streams).map(|stream| i32::try_from((stream + 1) * prompt.len() - 1)).collect::<Result<_, _>>()?;
    let mut first = None;
    let mut generated = 0;
    for step in 0..tokens {
        let next: Vec<usize> = outputs
            .iter()
            .map(|&output| top_two(context.get_logits_ith(output)).map(|(best, ..)| best))
            .collect::<Result<_, _>>()?;
        first.get_or_insert_with(|| start.elapsed());
        generated += streams;
        if step + 1 == tokens {
            break;
        }
        batch.clear();
        let position = i32::try_from(prompt.len() + step)?;
        for (stream, token) in next.iter().enumerate() {
            batch.add(LlamaToken::new(i32::try_from(*token)?), position, &[i32::try_from(stream)?], true)?;
        }
        context.decode(&mut batch)?;
        outputs = (0..streams).map(i32::try_from).collect::<Result<_, _>>()?;
    }
    let (total, first) = (start.elapsed(), first.ok_or("no token")?);
    // Decode alone: the steps after the prompts' batch, every stream's token each.
    let decode = (streams * (tokens - 1)) as f64 / (total - first).as_secs_f64();
    println!(
        "{{\"streams\": {streams}, \"tokens\": {generated}, \"total_seconds\": {}, \"first_token_seconds\": {}, \"tokens_per_second\": {}, \"decode_tokens_per_second\": {decode}}}",
        total.as_secs_f64(),
        first.as_secs_f64(),
        generated as f64 / total.as_secs_f64(),
    );
    Ok(())
}

/// Comma-separated token ids.
fn token_ids(list: &str) -> Result<Vec<LlamaToken>, Error> {
    Ok(list.split(',').map(|id| id.trim().parse().map(LlamaToken::new)).collect::<Result<_, _>>()?)
}

/// The backend, quiet unless `USINE_PEER_LOGS` is set.
fn backend() -> Result<LlamaBackend, Error> {
    let mut backend = LlamaBackend::init()?;
    if std::env::var_os("USINE_PEER_LOGS").is_none() {
        backend.void_logs();
    }
    Ok(backend)
}

/// Teacher-forced logits: each id decoded in a batch of its own, its logits kept. One position at a
/// time, as usine's `parity logits` decodes: llama.cpp's path for a batch of many tokens (matrix
/// products rather than vector ones, another split of the attention) may round otherwise, and that
/// difference would be counted against usine.
///
/// Keys and values are kept in f32 and flash attention is off, unlike the greedy mode (llama.cpp's
/// defaults, as people run it): its f16 cache and its flash attention (which rounds keys, values and
/// the query to f16 even from an f32 cache) move these logits by up to 0.04 on bench-peers' 17m and 58m
/// models, more than some of the roundings `cargo xtask parity` means to tell apart. What is left is
/// the rounding of each product's activations to the type the weights' kernel takes.
fn logits(gguf: &str, threads: i32, ids: &[LlamaToken], out: &str) -> Result<(), Error> {
    if ids.is_empty() {
        return Err("no token ids".into());
    }
    let backend = backend()?;
    let model = LlamaModel::load_from_file(&backend, gguf, &LlamaModelParams::default())?;
    let vocab = usize::try_from(model.n_vocab())?;
    if let Some(id) = ids.iter().find(|id| usize::try_from(id.0).map_or(true, |id| id >= vocab)) {
        return Err(format!("token id {} is outside the vocabulary of {vocab}", id.0).into());
    }
    let size = u32::try_from(ids.len())?.max(LOGITS_CONTEXT);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(size))
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_type_k(KvCacheType::F32)
        .with_type_v(KvCacheType::F32)
        .with_flash_attention_policy(FLASH_ATTENTION_DISABLED);
    let mut context = model.new_context(&backend, params)?;
    let mut batch = LlamaBatch::new(1, 1);
    let mut bytes = Vec::with_capacity(ids.len() * vocab * 4);
    for (position, id) in ids.iter().enumerate() {
        batch.clear();
        batch.add(*id, i32::try_from(position)?, &[0], true)?;
        context.decode(&mut batch)?;
        let row = context.get_logits_ith(0);
        if row.len() != vocab {
            return Err(format!("{} logits at position {position}, not the vocabulary's {vocab}", row.len()).into());
        }
        bytes.extend(row.iter().flat_map(|logit| logit.to_le_bytes()));
    }
    std::fs::write(out, bytes).map_err(|error| format!("writing {out}: {error}"))?;
    println!("{{\"vocab\": {vocab}, \"positions\": {}}}", ids.len());
    Ok(())
}

/// Greedy decoding after a prompt, timed (see the file's doc).
fn greedy(gguf: &str, threads: i32, tokens: usize, prompt: &[LlamaToken]) -> Result<(), Error> {
    if prompt.is_empty() || tokens < 2 {
        return Err("a prompt of 1 or more tokens and 2 or more tokens to generate".into());
    }
    let backend = backend()?;
    // The context holds the prompt and the greedy tokens, and a batch the whole prompt (one decode).
    let context_size = u32::try_from(prompt.len() + tokens)?;
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(context_size))
        .with_n_batch(context_size)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let ticks = cpu_ticks()?;
    let start = Instant::now();
    let model = LlamaModel::load_from_file(&backend, gguf, &LlamaModelParams::default())?;
    let loaded = start.elapsed();
    let mut context = model.new_context(&backend, params)?;
    let mut batch = LlamaBatch::new(prompt.len(), 1);
    let last = prompt.len() - 1;
    for (position, token) in prompt.iter().enumerate() {
        batch.add(*token, i32::try_from(position)?, &[0], position == last)?;
    }
    context.decode(&mut batch)?;
    let (mut greedy, mut runner_up, mut gaps) = (Vec::new(), Vec::new(), Vec::new());
    let mut first = None;
    let mut position = prompt.len();
    loop {
        let (best, second, gap) = top_two(context.get_logits_ith(batch.n_tokens() - 1))?;
        first.get_or_insert_with(|| start.elapsed());
        greedy.push(best);
        runner_up.push(second);
        gaps.push(gap);
        if greedy.len() == tokens {
            break;
        }
        batch.clear();
        batch.add(LlamaToken::new(i32::try_from(best)?), i32::try_from(position)?, &[0], true)?;
        context.decode(&mut batch)?;
        position += 1;
    }
    let (first, total) = (first.ok_or("no token")?, start.elapsed());
    let after = cpu_ticks()?;
    let others = (after.0 - ticks.0).saturating_sub(after.1 - ticks.1) as f64 / 100.0;
    let list = |values: &[usize]| values.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    let gaps = gaps.iter().map(f32::to_string).collect::<Vec<_>>().join(",");
    println!(
        "{{\"load_seconds\": {}, \"first_token_seconds\": {}, \"tokens_per_second\": {}, \"total_seconds\": {}, \"others_cpu_seconds\": {others}, \"tokens\": [{}], \"runner_up\": [{}], \"gaps\": [{gaps}]}}",
        loaded.as_secs_f64(),
        first.as_secs_f64(),
        (tokens - 1) as f64 / (total - first).as_secs_f64(),
        total.as_secs_f64(),
        list(&greedy),
        list(&runner_up),
    );
    Ok(())
}

/// Reads length-prefixed byte strings (a little-endian u32 length, then the bytes) from `bytes`.
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

/// The model's vocabulary (and template) only: no weights are read.
fn vocabulary(backend: &LlamaBackend, gguf: &str) -> Result<LlamaModel, Error> {
    Ok(LlamaModel::load_from_file(backend, gguf, &LlamaModelParams::default().with_vocab_only(true))?)
}

fn tokenize(gguf: &str, strings: &str, out: &str) -> Result<(), Error> {
    let backend = backend()?;
    let model = vocabulary(&backend, gguf)?;
    let vocab = model.vocab();
    let input = std::fs::read(strings)?;
    let mut strings = Strings { bytes: &input };
    let mut output = Vec::new();
    let mut count = 0;
    while !strings.bytes.is_empty() {
        let text = strings.string()?;
        let prompt = vocab.tokenize(text, true, true);
        let plain = vocab.tokenize(text, false, false);
        for ids in [&prompt, &plain] {
            output.extend(u32::try_from(ids.len())?.to_le_bytes());
            output.extend(ids.iter().flat_map(|id| id.0.to_le_bytes()));
        }
        // llama-cpp-2's detokenize sizes its buffer from the ids less one: none would overflow it.
        let text = if plain.is_empty() { Vec::new() } else { vocab.detokenize(&plain, true, false) };
        push_string(&mut output, &text)?;
        count += 1;
    }
    std::fs::write(out, output).map_err(|error| format!("writing {out}: {error}"))?;
    println!("{{\"strings\": {count}}}");
    Ok(())
}

fn tokenize_speed(gguf: &str, text: &str, turns: usize) -> Result<(), Error> {
    let backend = backend()?;
    let model = vocabulary(&backend, gguf)?;
    let vocab = model.vocab();
    let text = std::fs::read(text)?;
    let mut seconds = Vec::new();
    let mut tokens = 0;
    for _ in 0..turns.max(1) {
        let start = Instant::now();
        tokens = vocab.tokenize(&text, false, false).len();
        seconds.push(start.elapsed().as_secs_f64().to_string());
    }
    println!("{{\"seconds\": [{}], \"tokens\": {tokens}}}", seconds.join(","));
    Ok(())
}

fn template(gguf: &str, chats: &str, out: &str) -> Result<(), Error> {
    use llama_cpp_2::model::LlamaChatMessage;
    let backend = backend()?;
    let model = vocabulary(&backend, gguf)?;
    let template = model.chat_template(None)?;
    let input = std::fs::read(chats)?;
    let mut chats = Strings { bytes: &input };
    let mut output = Vec::new();
    while !chats.bytes.is_empty() {
        let mut messages = Vec::new();
        for _ in 0..chats.u32()? {
            let role = String::from_utf8(chats.string()?.to_vec())?;
            let content = String::from_utf8(chats.string()?.to_vec())?;
            messages.push(LlamaChatMessage::new(role, content)?);
        }
        match model.apply_chat_template(&template, &messages, true) {
            Ok(text) => {
                output.push(1);
                push_string(&mut output, text.as_bytes())?;
                let ids = model.vocab().tokenize(text.as_bytes(), true, true);
                output.extend(u32::try_from(ids.len())?.to_le_bytes());
                output.extend(ids.iter().flat_map(|id| id.0.to_le_bytes()));
            }
            Err(error) => {
                output.push(0);
                push_string(&mut output, error.to_string().as_bytes())?;
            }
        }
    }
    std::fs::write(out, output).map_err(|error| format!("writing {out}: {error}"))?;
    Ok(())
}
