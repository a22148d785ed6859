//! `cargo xtask train` and `cargo xtask random-model`: the candle engine's models, made offline.
//!
//! `train` fits the tiny byte-level llama (about 1 M parameters, seed 2026, 2,400 steps) to text this
//! project may redistribute: its own README and ARCHITECTURE, and the simulated engines' corpus (all
//! under the project's licence). It writes `engines/candle/weights/tiny-llama.safetensors`, which is
//! committed. `random-model 17m|58m OUT` writes random weights of those sizes for speed work.

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, ensure};

/// Where the trained weights live in the repository.
pub(crate) const WEIGHTS: &str = "engines/candle/weights/tiny-llama.safetensors";
/// Optimizer steps of the committed model.
const STEPS: &str = "2400";

/// The simulated engines' corpus, taken out of its Rust string literal.
fn corpus(root: &Path) -> Result<String> {
    let source = std::fs::read_to_string(root.join("engines/sim/src/text.rs"))?;
    let start = source.find("pub const CORPUS: &str = \"").context("the corpus constant")? + 26;
    let end = start + source[start..].find("\";").context("the corpus's end")?;
    let text = source[start..end].replace("\\\n", "").replace("\\\"", "\"");
    Ok(text.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn example(root: &Path, name: &str, features: &[&str], args: &[&str]) -> Result<()> {
    let mut command = Command::new(env!("CARGO"));
    command.args(["run", "--quiet", "--release", "-p", "usine-engine-candle", "--example", name]);
    for feature in features {
        command.args(["--features", feature]);
    }
    let status = command.arg("--").args(args).current_dir(root).status()?;
    ensure!(status.success(), "the `{name}` example failed");
    Ok(())
}

pub(crate) fn train(root: &Path) -> Result<ExitCode> {
    let work = tempfile::tempdir()?;
    let corpus_file = work.path().join("corpus.txt");
    std::fs::write(&corpus_file, corpus(root)?)?;
    let corpus_file = corpus_file.display().to_string();
    example(root, "train", &["train"], &[WEIGHTS, STEPS, "README.md", "ARCHITECTURE.md", &corpus_file])?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn random_model(root: &Path, size: &str, out: &str) -> Result<ExitCode> {
    let out = std::path::absolute(out)?.display().to_string();
    example(root, "random_model", &[], &[size, &out])?;
    Ok(ExitCode::SUCCESS)
}
