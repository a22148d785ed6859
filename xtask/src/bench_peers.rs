//! `cargo xtask bench-peers`: the candle engine against llama.cpp on the same GGUF files. Random-weight
//! models of about 17 M and 58 M parameters, Q8_0 and Q4_0, one and two threads: decode tokens/s of
//! each, their ratio, and the engine's compile (quantize) and load times. llama.cpp is built from source
//! by the `llama-cpp-2` crate in `peers/llama-cpp` (a workspace of its own, out of the default build and
//! of `cargo test`); it needs cmake and libclang, installed from Debian's packages when missing.

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, ensure};

const SIZES: [&str; 2] = ["17m", "58m"];
const QUANTIZATIONS: [&str; 2] = ["q8_0", "q4_0"];
const THREADS: [&str; 2] = ["1", "2"];
const TOKENS: &str = "64";

fn run_json(command: &mut Command) -> Result<serde_json::Value> {
    let output = command.output()?;
    ensure!(output.status.success(), "{command:?} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout)?;
    let line = text.lines().last().context("no output")?;
    serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))
}

#[allow(clippy::print_stdout, reason = "the table is the command's output")]
pub(crate) fn run(root: &Path) -> Result<ExitCode> {
    crate::integration::installed("cmake", "cmake")?;
    crate::integration::installed("llvm-config", "libclang-dev").ok(); // libclang has no command of its own
    let work = root.join("target").join("bench-peers");
    std::fs::create_dir_all(&work)?;
    eprintln!("bench-peers: building the llama.cpp peer (a few minutes the first time)");
    let manifest = root.join("peers/llama-cpp/Cargo.toml");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", work.join("target"))
        .status()?;
    ensure!(status.success(), "building the llama.cpp peer failed");
    let peer = work.join("target/release/usine-peer-llama-cpp");
    println!(
        "| model | quantization | threads | usine tokens/s | llama.cpp tokens/s | usine / llama.cpp | compile | load (usine / llama.cpp) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for size in SIZES {
        let weights = work.join(format!("{size}.safetensors"));
        if !weights.exists() {
            crate::model::random_model(root, size, &weights.display().to_string())?;
        }
        for quantization in QUANTIZATIONS {
            let gguf = work.join(format!("{size}-{quantization}.gguf"));
            for threads in THREADS {
                let ours = run_json(
                    Command::new(env!("CARGO"))
                        .args(["run", "--quiet", "--release", "-p", "usine-engine-candle", "--example", "speed", "--"])
                        .arg(&weights)
                        .args([quantization, threads, TOKENS])
                        .arg(&gguf)
                        .current_dir(root),
                )?;
                let theirs = run_json(Command::new(&peer).arg(&gguf).args([threads, TOKENS]))?;
                let rate = |value: &serde_json::Value| value["tokens_per_second"].as_f64().unwrap_or(0.0);
                let seconds = |value: &serde_json::Value, key: &str| value[key].as_f64().unwrap_or(0.0);
                println!(
                    "| {size} | {quantization} | {threads} | {:.1} | {:.1} | {:.2} | {:.2} s | {:.0} ms / {:.0} ms |",
                    rate(&ours),
                    rate(&theirs),
                    rate(&ours) / rate(&theirs).max(f64::MIN_POSITIVE),
                    seconds(&ours, "compile_seconds"),
                    seconds(&ours, "load_seconds") * 1e3,
                    seconds(&theirs, "load_seconds") * 1e3,
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
