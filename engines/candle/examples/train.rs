//! Trains the tiny byte-level llama that `usine run --engine candle` answers with, from a fixed seed, on
//! English the project may redistribute a model of (see `cargo xtask train`), and writes its
//! safetensors. The last 2% of the text is held out: its loss, printed at the end, says how well the
//! model does on text it has not seen.

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a tool that reports as it goes")]

use std::path::{Path, PathBuf};

use usine_engine_candle::Shape;
use usine_engine_candle::train::{Schedule, Trainer, tokens_of};

/// About a million parameters: 128 wide, 5 layers, 4 heads sharing 2 key-value heads; its context is the
/// one it is trained on (positions beyond were never seen).
const SHAPE: Shape = Shape { dim: 128, layers: 5, heads: 4, kv_heads: 2, ffn: 352, max_context: 256 };

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().ok_or("usage: train OUT.safetensors STEPS TEXT...")?);
    let steps: usize = args.next().ok_or("STEPS")?.parse()?;
    let documents: Vec<String> = args.map(std::fs::read_to_string).collect::<Result<_, _>>()?;
    let text = tokens_of(&documents);
    let (seen, held_out) = text.split_at(text.len() - text.len() / 50);
    eprintln!(
        "train: {} parameters, {} bytes of text ({} held out), {steps} steps",
        SHAPE.params(),
        seen.len(),
        held_out.len()
    );
    // Two shards: each step's gradient is computed on two threads (on one core, the same step, slower).
    // Fixed rather than the number of cores, so that the number of cores does not change the weights
    // (the CPU still may: the matrix products pick their kernels for it).
    let schedule = Schedule {
        steps,
        batch: 8,
        context: SHAPE.max_context,
        learning_rate: 3e-3,
        warmup: 200,
        seed: 2026,
        shards: 2,
    };
    let trainer = Trainer::new(SHAPE, schedule.seed)?;
    let start = std::time::Instant::now();
    // Every 1,000 steps, the weights as they are, beside OUT: a look at a long run on its way, or what is
    // left of one cut short (training cannot resume from it: the optimizer's state is not saved).
    let checkpoint = out.with_extension("checkpoint.safetensors");
    trainer.train(seen, &schedule, |step, loss| {
        if step % 25 == 0 || step + 1 == schedule.steps {
            eprintln!("step {step:>5}  loss {loss:.3} nats/byte  {:.0?}", start.elapsed());
        }
        if step % 1000 == 999
            && let Err(error) = save(&trainer, &checkpoint)
        {
            eprintln!("train: no checkpoint at step {step}: {error}");
        }
    })?;
    let windows: Vec<&[u32]> = held_out.chunks_exact(SHAPE.max_context + 1).collect();
    let mut total = 0.0;
    for window in &windows {
        total += trainer.loss(window)?;
    }
    #[expect(clippy::cast_precision_loss, reason = "a mean for people")]
    let held_out_loss = total / windows.len().max(1) as f32;
    eprintln!("train: held-out loss {held_out_loss:.3} nats/byte over {} windows", windows.len());
    for prompt in ["The kernel", "Rust is", "When we"] {
        let tokens: Vec<u32> = prompt.bytes().map(u32::from).collect();
        let sample: Vec<u8> = trainer
            .continue_greedily(&tokens, 120)?
            .into_iter()
            .map(|token| u8::try_from(token).unwrap_or(b'|'))
            .collect();
        eprintln!("train: {prompt}{}", String::from_utf8_lossy(&sample).replace('\n', " / "));
    }
    save(&trainer, &out)?;
    eprintln!("train: wrote {}", out.display());
    // The checkpoint has served its turn (and must not be taken for the weights).
    let _ = std::fs::remove_file(&checkpoint);
    Ok(())
}

/// Writes the weights to `out` whole or not at all: a sibling file, flushed to the disk, then renamed
/// over it.
fn save(trainer: &Trainer, out: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use std::io::Write as _;
    let partial = out.with_extension("partial");
    let mut file = std::fs::File::create(&partial)?;
    file.write_all(&trainer.to_safetensors()?)?;
    file.sync_all()?;
    std::fs::rename(&partial, out)?;
    Ok(())
}
