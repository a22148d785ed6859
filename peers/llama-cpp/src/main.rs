//! Decode speed of llama.cpp on a GGUF file: load, a short prompt, then greedy tokens one at a time
//! (the same work as usine's `speed` example). Prints one JSON line.

use std::num::NonZeroU32;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [gguf, threads, tokens] = args.as_slice() else {
        return Err("usage: usine-peer-llama-cpp MODEL.gguf THREADS TOKENS".into());
    };
    let (threads, tokens): (i32, usize) = (threads.parse()?, tokens.parse()?);
    let mut backend = LlamaBackend::init()?;
    if std::env::var_os("USINE_PEER_LOGS").is_none() {
        backend.void_logs();
    }
    let start = Instant::now();
    let model = LlamaModel::load_from_file(&backend, gguf, &LlamaModelParams::default())?;
    let load = start.elapsed();
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(512))
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let run = || -> Result<(usize, f64), Box<dyn std::error::Error>> {
        let mut context = model.new_context(&backend, params.clone())?;
        let prompt = model.vocab().tokenize(b"The kernel", false, false);
        let mut batch = LlamaBatch::new(512, 1);
        let start = Instant::now();
        let last = prompt.len() - 1;
        for (position, token) in prompt.iter().enumerate() {
            batch.add(*token, i32::try_from(position)?, &[0], position == last)?;
        }
        context.decode(&mut batch)?;
        let mut position = prompt.len();
        let mut generated = 0;
        while generated < tokens {
            let logits = context.get_logits_ith(batch.n_tokens() - 1);
            let best = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(index, _)| index);
            generated += 1;
            batch.clear();
            batch.add(LlamaToken::new(i32::try_from(best)?), i32::try_from(position)?, &[0], true)?;
            context.decode(&mut batch)?;
            position += 1;
        }
        Ok((generated, start.elapsed().as_secs_f64()))
    };
    run()?; // warm caches and pages
    let (generated, seconds) = run()?;
    println!(
        "{{\"load_seconds\": {}, \"tokens\": {generated}, \"tokens_per_second\": {}}}",
        load.as_secs_f64(),
        generated as f64 / seconds
    );
    Ok(())
}
