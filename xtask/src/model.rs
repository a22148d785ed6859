//! `cargo xtask train` and `cargo xtask random-model`: the candle engine's models, made offline.
//!
//! `train` fits the tiny byte-level llama (about 1 M parameters, seed 2026) to English this project may
//! redistribute a model of:
//! - the prose of *The Rust Programming Language* (the book, dual-licensed MIT or Apache-2.0: a
//!   derived work may be shipped with the notice, see `engines/candle/weights/NOTICE`), its 22
//!   chapters (about 850 KB of paragraphs), read from the `rust-docs` component that rustup installs with every
//!   default toolchain: plain, friendly English, which is what makes the model's answers readable;
//! - the project's own README and ARCHITECTURE, and the simulated engines' corpus (under the project's
//!   licence), so that it knows usine's words.
//!
//! It writes `engines/candle/weights/tiny-llama.safetensors`, which is committed. `random-model
//! 17m|58m OUT` writes random weights of those sizes for speed work. [`generated_gguf`] writes the GGUF
//! files of `cargo xtask parity` and `bench-peers --real`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, ensure};

/// The engine's `random_model` example (`generator`)'s `preset` with `layers` layers of `kind` weights, in
/// `work`, and the JSON line it printed: written unless it was already since `random_model` was last
/// built (its JSON line, written beside the file once the file is complete, says so).
pub(crate) fn generated_gguf(
    generator: &Path,
    work: &Path,
    preset: &str,
    layers: usize,
    kind: &str,
) -> Result<(PathBuf, serde_json::Value)> {
    generated_gguf_with(generator, work, preset, layers, kind, "bytes")
}

/// [`generated_gguf`] with the generator's vocabulary `vocabulary`.
pub(crate) fn generated_gguf_with(
    generator: &Path,
    work: &Path,
    preset: &str,
    layers: usize,
    kind: &str,
    vocabulary: &str,
) -> Result<(PathBuf, serde_json::Value)> {
    let name = if vocabulary == "bytes" {
        format!("{preset}-{layers}-{kind}")
    } else {
        format!("{preset}-{layers}-{kind}-{vocabulary}")
    };
    let (gguf, line) = (work.join(format!("{name}.gguf")), work.join(format!("{name}.json")));
    let built = std::fs::metadata(generator)?.modified()?;
    let fresh = gguf.exists() && std::fs::metadata(&line).and_then(|line| line.modified()).is_ok_and(|at| at >= built);
    if fresh {
        let text = std::fs::read_to_string(&line).with_context(|| format!("reading {}", line.display()))?;
        let value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", line.display()))?;
        return Ok((gguf, value));
    }
    if line.exists() {
        std::fs::remove_file(&line).with_context(|| format!("removing {}", line.display()))?;
    }
    eprintln!("writing {}", gguf.display());
    let mut command = Command::new(generator);
    command.args(["gguf", preset, kind]).arg(&gguf).arg(layers.to_string()).arg(vocabulary);
    let value = crate::bench_peers::run_json(&mut command)?;
    let bytes = value["bytes"].as_u64().with_context(|| format!("no `bytes` in {value}"))?;
    let written = std::fs::metadata(&gguf).with_context(|| format!("{}", gguf.display()))?.len();
    ensure!(written == bytes, "random_model says {bytes} bytes, but {} has {written}", gguf.display());
    std::fs::write(&line, value.to_string()).with_context(|| format!("writing {}", line.display()))?;
    Ok((gguf, value))
}

/// Where the trained weights live in the repository.
pub(crate) const WEIGHTS: &str = "engines/candle/weights/tiny-llama.safetensors";
/// Optimizer steps of the committed model.
const STEPS: &str = "11000";

/// The simulated engines' corpus (a text file the sim crate includes too).
fn corpus(root: &Path) -> Result<String> {
    let text = std::fs::read_to_string(root.join("engines/sim/corpus.txt")).context("reading the corpus")?;
    Ok(text.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Chapters of the book read: all of them (ch00 to ch21, about 850 KB of prose). With six chapters
/// (160 KB), the 22 M tokens of a run went over the text 115 times and the model learnt it by heart
/// (0.75 nats/byte on it after 2,000 steps) rather than English.
const BOOK_CHAPTERS: usize = 22;

/// The chapters' paragraphs of *The Rust Programming Language* from the installed `rust-docs`, as plain ASCII text,
/// one paragraph per line, in chapter order.
fn book() -> Result<String> {
    let output = Command::new("rustc").args(["--print", "sysroot"]).output()?;
    let sysroot = String::from_utf8(output.stdout)?;
    let folder = Path::new(sysroot.trim()).join("share/doc/rust/html/book");
    let mut chapters: Vec<_> = std::fs::read_dir(&folder)
        .with_context(|| {
            format!(
                "{}: the book comes with rustup's `rust-docs` component (`rustup component add rust-docs`)",
                folder.display()
            )
        })?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .and_then(|name| name.strip_prefix("ch")?.get(..2)?.parse::<usize>().ok())
                .is_some_and(|chapter| chapter < BOOK_CHAPTERS)
        })
        .collect();
    chapters.sort();
    ensure!(!chapters.is_empty(), "{}: no chapters", folder.display());
    let mut paragraphs = Vec::new();
    for chapter in chapters {
        let page = std::fs::read_to_string(&chapter)?;
        paragraphs.extend(paragraphs_of(&page));
    }
    Ok(paragraphs.join("\n"))
}

/// The text of each `<p>` of an HTML page: tags dropped, the entities mdBook writes decoded, typographic
/// punctuation made ASCII; paragraphs that keep other characters (a few in foreign scripts) and the
/// page's keyboard help are left out. mdBook's output is regular enough that this needs no HTML parser.
fn paragraphs_of(page: &str) -> Vec<String> {
    let mut paragraphs = Vec::new();
    let mut rest = page;
    while let Some(start) = rest.find("<p>") {
        let Some(length) = rest[start..].find("</p>") else { break };
        let inner = &rest[start + 3..start + length];
        rest = &rest[start + length + 4..];
        let mut text = String::with_capacity(inner.len());
        let mut in_tag = false;
        for character in inner.chars() {
            match character {
                '<' => in_tag = true,
                '>' => in_tag = false,
                _ if !in_tag => text.push(character),
                _ => {}
            }
        }
        for (from, to) in [
            ("&lt;", "<"),
            ("&gt;", ">"),
            ("&quot;", "\""),
            ("&#39;", "'"),
            ("&#x27;", "'"),
            ("&nbsp;", " "),
            ("\u{2019}", "'"),
            ("\u{2018}", "'"),
            ("\u{201c}", "\""),
            ("\u{201d}", "\""),
            ("\u{2014}", " - "),
            ("\u{2013}", "-"),
            ("\u{2026}", "..."),
            ("&amp;", "&"),
        ] {
            text = text.replace(from, to);
        }
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if !text.is_empty() && text.is_ascii() && !text.starts_with("Press ") {
            paragraphs.push(text);
        }
    }
    paragraphs
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
    let book_file = work.path().join("book.txt");
    std::fs::write(&book_file, book()?)?;
    let book_file = book_file.display().to_string();
    example(root, "train", &["train"], &[WEIGHTS, STEPS, "README.md", "ARCHITECTURE.md", &corpus_file, &book_file])?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn random_model(root: &Path, size: &str, out: &str) -> Result<ExitCode> {
    let out = std::path::absolute(out)?.display().to_string();
    example(root, "random_model", &[], &[size, &out])?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraphs_come_out_as_plain_ascii_text() {
        let page = "<nav><p>Press <kbd>S</kbd> to search</p></nav>\
                    <p>Rust&#x27;s <code>Vec&lt;T&gt;</code> \u{2014} a \u{201c}vector\u{201d}\n  grows.</p>\
                    <p>\u{0437}\u{0434}</p><p></p><p>A &amp; B</p>";
        assert_eq!(paragraphs_of(page), ["Rust's Vec<T> - a \"vector\" grows.", "A & B"]);
    }
}
