//! Trains the tiny byte-level llama that `usine run --engine candle` answers with, from a fixed seed, on
//! the project's own documentation and the simulated engines' corpus (ours to redistribute), and writes
//! its safetensors. Run through `cargo xtask train`.

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a tool that reports as it goes")]

use std::path::PathBuf;

use usine_engine_candle::Shape;
use usine_engine_candle::train::{Schedule, Trainer, tokens_of};

/// About a million parameters: 128 wide, 5 layers, 4 heads sharing 2 key-value heads; its context is the
/// one it is trained on (positions beyond were never seen).
const SHAPE: Shape = Shape { dim: 128, layers: 5, heads: 4, kv_heads: 2, ffn: 352, max_context: 128 };

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().ok_or("usage: train OUT.safetensors STEPS TEXT...")?);
    let steps: usize = args.next().ok_or("STEPS")?.parse()?;
    let documents: Vec<String> = args.map(std::fs::read_to_string).collect::<Result<_, _>>()?;
    let text = tokens_of(&documents);
    eprintln!("train: {} parameters, {} bytes of text, {steps} steps", SHAPE.params(), text.len());
    let schedule = Schedule { steps, batch: 16, context: SHAPE.max_context, learning_rate: 3e-3, seed: 2026 };
    let mut trainer = Trainer::new(SHAPE, schedule.seed)?;
    let start = std::time::Instant::now();
    trainer.train(&text, &schedule, |step, loss| {
        if step % 25 == 0 || step + 1 == schedule.steps {
            eprintln!("step {step:>5}  loss {loss:.3} nats/byte  {:.0?}", start.elapsed());
        }
    })?;
    std::fs::write(&out, trainer.to_safetensors()?)?;
    eprintln!("train: wrote {}", out.display());
    Ok(())
}
