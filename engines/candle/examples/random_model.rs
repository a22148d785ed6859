//! Writes a random-weight model of a named size as safetensors, for speed work (never committed). Run
//! through `cargo xtask random-model 17m|58m OUT`.

#![allow(clippy::print_stderr, reason = "a tool that reports what it wrote")]

use usine_engine_candle::{Shape, random_weights};

/// The sizes: about 17 and 58 million parameters (the issue's), and a tiny one for tests.
fn shape(size: &str) -> Option<Shape> {
    match size {
        "17m" => Some(Shape { dim: 384, layers: 11, heads: 6, kv_heads: 2, ffn: 1024, max_context: 2048 }),
        "58m" => Some(Shape { dim: 640, layers: 13, heads: 10, kv_heads: 2, ffn: 1728, max_context: 2048 }),
        "tiny" => Some(Shape { dim: 64, layers: 2, heads: 4, kv_heads: 2, ffn: 192, max_context: 256 }),
        _ => None,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let size = args.next().ok_or("usage: random_model 17m|58m|tiny OUT.safetensors")?;
    let out = args.next().ok_or("OUT.safetensors")?;
    let shape = shape(&size).ok_or_else(|| format!("unknown size `{size}` (17m, 58m, tiny)"))?;
    std::fs::write(&out, random_weights(&shape, 58)?)?;
    eprintln!("random_model: {} parameters in {out}", shape.params());
    Ok(())
}
