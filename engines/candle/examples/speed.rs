//! Compiles source weights to a GGUF file (kept, for a peer to run) and measures this engine on it:
//! compile and load times, and decode tokens/s over greedy tokens after a short prompt. Prints one JSON
//! line. Run by `cargo xtask bench-peers`.

#![allow(clippy::print_stdout, reason = "the JSON line is the output")]

use std::time::Instant;

use usine_engine::{Engine, GenerationParams, ModelSpec, NoProgress, generate};
use usine_engine_candle::{CandleEngine, NAME, PROFILE, WEIGHTS_OPTION};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [weights, quantization, threads, tokens, gguf] = args.as_slice() else {
        return Err("usage: speed WEIGHTS.safetensors q8_0|q4_0 THREADS TOKENS OUT.gguf".into());
    };
    let (threads, tokens): (usize, u32) = (threads.parse()?, tokens.parse()?);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut spec = ModelSpec::new("speed", NAME, PROFILE).quantization(quantization.as_str());
    spec.options.insert(WEIGHTS_OPTION.into(), weights.clone());
    let engine = CandleEngine::with_threads(threads)?;
    runtime.block_on(async {
        let start = Instant::now();
        let graph = engine.compile(&spec, &NoProgress).await?;
        let compile = start.elapsed();
        std::fs::write(gguf, &graph.bytes)?;
        let start = Instant::now();
        let model = engine.load(&graph).await?;
        let load = start.elapsed();
        let params = GenerationParams { max_tokens: tokens, temperature: 0.0, ..GenerationParams::default() };
        generate(model.as_ref(), "The kernel", &params).await?; // warm caches and pages
        let start = Instant::now();
        let out = generate(model.as_ref(), "The kernel", &params).await?;
        let decode = start.elapsed();
        if out.tokens.len() != tokens as usize {
            return Err(format!("{} tokens generated of {tokens}: the model ended early", out.tokens.len()).into());
        }
        #[expect(clippy::cast_precision_loss, reason = "a rate for people")]
        let rate = out.tokens.len() as f64 / decode.as_secs_f64();
        println!(
            "{{\"compile_seconds\": {}, \"load_seconds\": {}, \"tokens\": {}, \"tokens_per_second\": {rate}, \"gguf_bytes\": {}}}",
            compile.as_secs_f64(),
            load.as_secs_f64(),
            out.tokens.len(),
            graph.bytes.len()
        );
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}
