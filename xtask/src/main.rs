//! `cargo xtask <verb>`: what a person would otherwise type by hand, in Rust.
//!
//! - `tidy`: checks the architecture invariants (layers, application-only crates, lints, file docs).
//!   The same checks run under `cargo test`.
//! - `integration`: starts `usine serve`, a real Prometheus and the official OpenAI Python client on
//!   loopback, and checks what a deployment would see.
//! - `bench-http`: tokens/s through `usine serve` to local clients with the zero-cost engine.
//! - `train`, `random-model`: the candle engine's models (see `model.rs`).
//! - `bench-peers`: the candle engine against llama.cpp (see `bench_peers.rs`); `--real` on models of real
//!   shapes through the `usine` binary (see `bench_peers/real.rs`); `--batch` 1 to 64 generations at once,
//!   usine's continuous batching against llama.cpp's batch API (see `bench_peers/batch.rs`).
//! - `gpu`: the candle engine on an NVIDIA card: `--bundle` builds what the GPU machine runs, then
//!   `gpu-bundle/xtask gpu` there checks and measures it (see `gpu.rs`).
//! - `parity`: the candle engine's logits and greedy tokens against llama.cpp's, per architecture and
//!   weight type (see `parity.rs`); `parity --bless` writes llama.cpp's logits on the smallest files into
//!   the engine's test fixtures.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Result, bail};

mod bench_http;
mod bench_peers;
mod fleet;
mod gpu;
mod integration;
mod model;
mod parity;
mod publish;
mod tidy;
mod tokens;
// The candle engine's tolerances and their measure, compiled here from the engine's own file: one place
// for the numbers, without a dependency on the engine that the layer table forbids (see that file).
#[allow(unreachable_pub, reason = "the engine's file: its items are public in the engine")]
#[path = "../../engines/candle/src/tolerance.rs"]
mod tolerance;

const USAGE: &str = "usage: cargo xtask <verb>\n\nverbs:\n  tidy         check the architecture invariants of ARCHITECTURE.md\n  \
                     integration  run usine serve with Prometheus and the OpenAI client on loopback, and check it\n  \
                     fleet        hosts sharing compiled graphs through a real redis-server: one compile for the fleet, Redis killed, paused, damaged; --bench: a graph's load from Redis against plain GETs and a compile\n  \
                     bench-http   tokens/s streamed through usine serve with the zero engine, 1 and 100 streams; --model FILE.gguf: a real model, 1 and 16 streams, and the time between events\n  \
                     bench-peers  the candle engine against llama.cpp on the same GGUF files (17M, 58M; Q8_0, Q4_0); --busy beside a process spinning on a core; --real: usine run on Qwen2.5-0.5B and TinyLlama-1.1B shapes (Q8_0, Q4_K_M), decode, prefill and cached load; --batch [--models 58m,qwen2.5-0.5b]: 1, 4, 16 and 64 generations at once, usine's batching against llama.cpp's\n  \
                     gpu          the candle engine on an NVIDIA card: --bundle builds gpu-bundle/ here (usine with cuda, the model generator, this xtask); gpu-bundle/xtask gpu on the GPU machine checks the card's tokens against the CPU's and measures decode, batching and starts\n  \
                     parity       the candle engine's logits and greedy tokens against llama.cpp's, every weight type; tiny llama and qwen2, or --preset qwen2.5-0.5b|tinyllama-1.1b (2 layers); --bless rewrites the engine's test fixtures of llama.cpp's logits; with the tiny ones, the tokenizers and chat templates of every vocabulary (--tokenizers: only those)\n  \
                     train        train the candle engine's tiny byte-level llama (writes its committed weights)\n  \
                     publish      cargo publish --dry-run of every library crate, and a consumer crate outside the workspace built from their docs\n  \
                     vocab        train the two small vocabularies the tokenizer tests use (writes engines/candle/vocab/; Python, pinned trainers)\n  \
                     random-model 17m|58m OUT: random weights of that size, for speed work";

fn main() -> Result<ExitCode> {
    let verb = std::env::args().nth(1);
    match verb.as_deref() {
        Some("tidy") => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root");
            let violations = tidy::run(root)?;
            for violation in &violations {
                eprintln!("tidy: {violation}");
            }
            if violations.is_empty() {
                eprintln!("tidy: the workspace keeps its invariants");
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("tidy: {} violations", violations.len());
                Ok(ExitCode::FAILURE)
            }
        }
        Some("bench-http") => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root");
            let model = match (std::env::args().nth(2).as_deref(), std::env::args().nth(3)) {
                (None, _) => None,
                (Some("--model"), Some(file)) => Some(std::path::PathBuf::from(file)),
                _ => anyhow::bail!("usage: cargo xtask bench-http [--model FILE.gguf]"),
            };
            bench_http::run(root, model.as_deref())
        }
        Some("bench-peers") => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root");
            match std::env::args().nth(2).as_deref() {
                None => bench_peers::run(root, false),
                Some("--busy") => bench_peers::run(root, true),
                Some("--real") => bench_peers::real::run(root),
                Some("--batch") => {
                    let args: Vec<String> = std::env::args().skip(3).collect();
                    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
                        [] => bench_peers::batch::run(root, None),
                        ["--models", names] => bench_peers::batch::run(root, Some(names)),
                        _ => bail!("bench-peers --batch takes `--models NAME,...` or nothing"),
                    }
                }
                Some(other) => bail!("bench-peers takes `--busy`, `--real`, `--batch` or nothing, not `{other}`"),
            }
        }
        Some("parity") => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root");
            let args: Vec<String> = std::env::args().skip(2).collect();
            match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
                [] => parity::run(root, "tiny"),
                ["--preset", preset] => parity::run(root, preset),
                ["--bless"] => parity::bless(root),
                ["--tokenizers"] => parity::run_tokenizers(root),
                _ => bail!("parity takes `--preset {}`, `--bless`, `--tokenizers` or nothing", parity::presets()),
            }
        }
        Some("train") => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root");
            model::train(root)
        }
        Some("random-model") => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root");
            let (Some(size), Some(out)) = (std::env::args().nth(2), std::env::args().nth(3)) else {
                bail!("usage: cargo xtask random-model 17m|58m OUT.safetensors");
            };
            model::random_model(root, &size, &out)
        }
        Some("publish") => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root");
            publish::run(root)
        }
        Some("vocab") => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root");
            tokens::train(root)
        }
        Some("fleet") => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root");
            match std::env::args().nth(2).as_deref() {
                None => fleet::run(root),
                Some("--bench") => fleet::bench(root),
                Some(other) => bail!("fleet takes `--bench` or nothing, not `{other}`"),
            }
        }
        Some("gpu") => match std::env::args().nth(2).as_deref() {
            Some("--bundle") => {
                let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root");
                gpu::bundle(root)
            }
            None => gpu::run(None),
            Some("--models") => match std::env::args().nth(3) {
                Some(names) => gpu::run(Some(&names)),
                None => bail!("gpu --models takes NAME,... (of PRESET-TYPE: 1b, 8b-q4_0)"),
            },
            Some(other) => bail!("gpu takes `--bundle`, `--models NAME,...` or nothing, not `{other}`"),
        },
        Some("integration") => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root");
            integration::run(root)
        }
        Some("help" | "--help" | "-h") | None => {
            eprintln!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        Some(other) => bail!("unknown verb `{other}`\n\n{USAGE}"),
    }
}
