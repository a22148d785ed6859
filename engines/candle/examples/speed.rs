//! This engine's side of `cargo xtask bench-peers`, one JSON line per command:
//!
//! - `speed compile WEIGHTS.safetensors q8_0|q4_0 OUT.gguf`: compiles the weights to GGUF and times it.
//!   The first compile writes `OUT.gguf` (synced, then renamed into place); a later one writes nothing
//!   and fails unless its bytes are the file's, so every run reads the same file.
//! - `speed run MODEL.gguf THREADS TOKENS`: from the file on disk to the first token ready (read the
//!   file, load it, prefill the prompt, the first greedy token), then the other greedy tokens one at a
//!   time; prints the prompt's token ids and the greedy ones, for the peer to run and compare, and the
//!   CPU time other programs took meanwhile.

#![allow(clippy::print_stdout, reason = "the JSON line is the output")]

use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use usine_engine::{Engine, GenerationParams, ModelSpec, NoProgress};
use usine_engine_candle::{CandleEngine, NAME, PROFILE, WEIGHTS_OPTION, gguf_from_safetensors, kernels};

type Error = Box<dyn std::error::Error>;

/// The prompt both sides start from, as this engine's byte tokens.
const PROMPT: &str = "The kernel";

fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["compile", weights, quantization, gguf] => runtime.block_on(compile(weights, quantization, Path::new(gguf))),
        ["run", gguf, threads, tokens] => runtime.block_on(run(Path::new(gguf), threads.parse()?, tokens.parse()?)),
        _ => {
            Err("usage: speed compile WEIGHTS.safetensors q8_0|q4_0 OUT.gguf | speed run MODEL.gguf THREADS TOKENS"
                .into())
        }
    }
}

/// CPU ticks (Linux's USER_HZ, 100 a second): the machine's busy ones (steal included: another
/// virtual machine's), and this process's. None where Linux does not say.
fn cpu_ticks() -> Option<(u64, u64)> {
    let machine = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> =
        machine.lines().next()?.split_whitespace().skip(1).map(str::parse).collect::<Result<_, _>>().ok()?;
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    let busy =
        fields.iter().take(8).enumerate().filter(|(index, _)| !matches!(index, 3 | 4)).map(|(_, ticks)| ticks).sum();
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    // After the command's name, in parentheses: the state is field 3, utime 14 and stime 15.
    let own: Vec<&str> = own.rsplit_once(')')?.1.split_whitespace().collect();
    Some((busy, own.get(11)?.parse::<u64>().ok()? + own.get(12)?.parse::<u64>().ok()?))
}

/// Seconds of CPU that other programs took since `before` ([`cpu_ticks`]).
fn others_seconds(before: (u64, u64)) -> Result<f64, Error> {
    let after = cpu_ticks().ok_or("no /proc/stat to read")?;
    #[expect(clippy::cast_precision_loss, reason = "ticks of one run")]
    let ticks = (after.0 - before.0).saturating_sub(after.1 - before.1) as f64;
    Ok(ticks / 100.0)
}

async fn compile(weights: &str, quantization: &str, gguf: &Path) -> Result<(), Error> {
    let weights = std::fs::read(weights).map_err(|error| format!("reading {weights}: {error}"))?;
    let start = Instant::now();
    let compiled = gguf_from_safetensors(&weights, quantization)?;
    let seconds = start.elapsed().as_secs_f64();
    let written = match std::fs::read(gguf) {
        Ok(existing) => {
            if existing != compiled {
                let at = existing.iter().zip(&compiled).position(|(a, b)| a != b);
                return Err(format!(
                    "{}: this compile gives other bytes than the file ({} bytes, not {}; first difference at {at:?})",
                    gguf.display(),
                    compiled.len(),
                    existing.len()
                )
                .into());
            }
            false
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            // Synced, so that a peer's cold run can drop every page of it (dirty pages stay).
            let partial = gguf.with_extension("gguf.partial");
            let mut file = std::fs::File::create(&partial)?;
            file.write_all(&compiled)?;
            file.sync_all()?;
            std::fs::rename(&partial, gguf)?;
            true
        }
        Err(error) => return Err(format!("reading {}: {error}", gguf.display()).into()),
    };
    println!("{{\"compile_seconds\": {seconds}, \"gguf_bytes\": {}, \"written\": {written}}}", compiled.len());
    Ok(())
}

async fn run(gguf: &Path, threads: usize, tokens: u32) -> Result<(), Error> {
    if tokens < 2 {
        return Err("2 tokens or more: the first, and a rate over the others".into());
    }
    let engine = CandleEngine::with_threads(threads)?;
    let params = GenerationParams { max_tokens: tokens, temperature: 0.0, ..GenerationParams::default() };
    let ticks = cpu_ticks().ok_or("no /proc/stat to read")?;
    let start = Instant::now();
    // What a first use of the file does without usine's graph cache: compile it (read, repack), then
    // load the graph.
    let mut spec = ModelSpec::new("speed", NAME, PROFILE);
    spec.options.insert(WEIGHTS_OPTION.into(), gguf.display().to_string());
    let graph = engine.compile(&spec, &NoProgress).await?;
    let model = engine.load(&graph).await?;
    let loaded = start.elapsed();
    let prompt = model.tokenize(PROMPT);
    let sequence = usine_engine::prefill(model.as_ref(), &prompt, &[], &params).await?;
    let mut generated = Vec::with_capacity(tokens as usize);
    let mut first = None;
    for step in 0..tokens {
        let previous = generated.last().or(prompt.last()).copied();
        // Greedy tokens after an end of sequence too: the peer decodes on alike.
        let token = sequence.compute(sequence.prepare(step).await?, previous).await?;
        generated.push(token.id);
        first.get_or_insert_with(|| start.elapsed());
    }
    let (first, total) = (first.ok_or("no token")?, start.elapsed());
    let others = others_seconds(ticks)?;
    #[expect(clippy::cast_precision_loss, reason = "a rate for people")]
    let rate = (generated.len() - 1) as f64 / (total - first).as_secs_f64();
    let list = |ids: &[u32]| ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    println!(
        "{{\"kernels\": \"{}\", \"load_seconds\": {}, \"first_token_seconds\": {}, \"tokens_per_second\": {rate}, \"total_seconds\": {}, \"others_cpu_seconds\": {others}, \"prompt\": [{}], \"tokens\": [{}]}}",
        kernels()?,
        loaded.as_secs_f64(),
        first.as_secs_f64(),
        total.as_secs_f64(),
        list(&prompt),
        list(&generated)
    );
    Ok(())
}
