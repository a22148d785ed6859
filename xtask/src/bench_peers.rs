//! `cargo xtask bench-peers`: the candle engine against llama.cpp on the same GGUF files. Random-weight
//! models of about 17 M and 58 M parameters, Q8_0 and Q4_0, one and two threads: decode tokens/s of
//! each, their ratio, and the engine's compile (quantize) and load times. Each side runs once to warm
//! up, then five times in turns with the other; the table shows medians. usine is the portable build
//! (its kernels pick their instructions at run time); llama.cpp is built for this CPU. It is built from source
//! by the `llama-cpp-2` crate in `peers/llama-cpp` (a workspace of its own, out of the default build and
//! of `cargo test`); it needs cmake and libclang, installed from Debian's packages when missing.

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, ensure};

const SIZES: [&str; 2] = ["17m", "58m"];
const QUANTIZATIONS: [&str; 2] = ["q8_0", "q4_0"];
const THREADS: [&str; 2] = ["1", "2"];
const TOKENS: &str = "128";
/// Measured runs of each side per row; the table shows the median.
const REPEATS: usize = 5;

fn run_json(command: &mut Command) -> Result<serde_json::Value> {
    let output = command.output()?;
    ensure!(output.status.success(), "{command:?} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout)?;
    let line = text.lines().last().context("no output")?;
    serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))
}

/// The run with the median `key` of `runs`.
fn median<'a>(runs: &'a [serde_json::Value], key: &str) -> &'a serde_json::Value {
    let mut sorted: Vec<&serde_json::Value> = runs.iter().collect();
    sorted.sort_by(|a, b| a[key].as_f64().unwrap_or(0.0).total_cmp(&b[key].as_f64().unwrap_or(0.0)));
    sorted[sorted.len() / 2]
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
        // llama.cpp at its best: built for this CPU (GGML_NATIVE, as a build of its own defaults to), so
        // that it uses AVX-512 and VNNI where usine's kernels find them at run time.
        .env("RUSTFLAGS", "-C target-cpu=native")
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
                let ours_command = || {
                    let mut command = Command::new(env!("CARGO"));
                    command
                        .args(["run", "--quiet", "--release", "-p", "usine-engine-candle", "--example", "speed", "--"])
                        .arg(&weights)
                        .args([quantization, threads, TOKENS])
                        .arg(&gguf)
                        .current_dir(root);
                    command
                };
                // A first run of each, not counted: the GGUF file written, caches and clocks warm.
                run_json(&mut ours_command())?;
                run_json(Command::new(&peer).arg(&gguf).args([threads, TOKENS]))?;
                // Then turns, one side then the other, so that a slow spell of the machine falls on both.
                let (mut ours, mut theirs) = (Vec::new(), Vec::new());
                for _ in 0..REPEATS {
                    ours.push(run_json(&mut ours_command())?);
                    theirs.push(run_json(Command::new(&peer).arg(&gguf).args([threads, TOKENS]))?);
                }
                let (ours, theirs) = (median(&ours, "tokens_per_second"), median(&theirs, "tokens_per_second"));
                let seconds = |value: &serde_json::Value, key: &str| value[key].as_f64().unwrap_or(0.0);
                let rate = |value: &serde_json::Value| seconds(value, "tokens_per_second");
                println!(
                    "| {size} | {quantization} | {threads} | {:.1} | {:.1} | {:.2} | {:.2} s | {:.0} ms / {:.0} ms |",
                    rate(ours),
                    rate(theirs),
                    rate(ours) / rate(theirs).max(f64::MIN_POSITIVE),
                    seconds(ours, "compile_seconds"),
                    seconds(ours, "load_seconds") * 1e3,
                    seconds(theirs, "load_seconds") * 1e3,
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
