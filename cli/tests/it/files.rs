//! GGUF model files: `usine run --model FILE.gguf`, `models_dir`, and files usine does not run.

use std::path::{Path, PathBuf};

use usine_engine_candle::{presets, random_gguf};

use crate::{json_lines, stderr, stdout, usine};

/// The generated model `preset` (two layers, seed 58: `random_model gguf PRESET KIND OUT`) written to
/// `dir/NAME.gguf`.
fn model(dir: &Path, preset: &str, kind: &str, name: &str) -> PathBuf {
    let presets = presets();
    let preset = presets.iter().find(|known| known.name == preset).unwrap();
    let path = dir.join(format!("{name}.gguf"));
    std::fs::write(&path, random_gguf(preset, 2, kind, 58).unwrap()).unwrap();
    path
}

/// The greedy token ids of `usine run --model FILE --json` on the prompt "Hi".
fn greedy(dir: &Path, file: &Path) -> (Vec<u64>, String) {
    let output = usine(dir)
        .args(["run", "--model", &file.display().to_string(), "--max-tokens", "8", "--temperature", "0", "--json"])
        .arg("Hi")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let events = json_lines(&output);
    let ids = events.iter().filter(|event| event["event"] == "token").map(|event| event["id"].as_u64().unwrap());
    let loaded = events.iter().find(|event| event["event"] == "loaded").unwrap();
    (ids.collect(), loaded["source"].as_str().unwrap().to_owned())
}

// Would catch: a GGUF file not run, or run with another architecture's maths. The expected tokens are
// llama.cpp's greedy ones on the same files and prompt (its peer binary, `cargo xtask parity`); the
// second run loads the compiled graph.
#[test]
fn run_answers_from_a_llama_and_a_qwen2_file_as_llama_cpp_does_and_loads_from_the_cache_after() {
    let dir = tempfile::tempdir().unwrap();
    let llama = model(dir.path(), "tiny-llama", "q8_0", "llama");
    let qwen2 = model(dir.path(), "tiny-qwen2", "q4_k_m", "qwen2");
    assert_eq!(greedy(dir.path(), &llama), (vec![22, 146, 267, 188, 113, 313, 113, 65], "compile".to_owned()));
    assert_eq!(greedy(dir.path(), &qwen2), (vec![323; 8], "compile".to_owned()));
    assert_eq!(greedy(dir.path(), &llama).1, "disk");
}

// Would catch: a compiled graph whose weights (its raw section, run where they lie in the file's
// mapping) were damaged on disk, run anyway: the flip is caught, the graph quarantined and compiled again,
// and the answer is the undamaged one.
#[test]
fn a_flipped_byte_in_a_compiled_graphs_weights_is_caught_and_the_model_compiled_again() {
    let dir = tempfile::tempdir().unwrap();
    let llama = model(dir.path(), "tiny-llama", "q8_0", "llama");
    let (expected, _) = greedy(dir.path(), &llama);
    let graph = std::fs::read_dir(dir.path().join("cache/graphs"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .find(|path| path.extension().is_some_and(|ext| ext == "graph"))
        .unwrap();
    let mut bytes = std::fs::read(&graph).unwrap();
    let at = bytes.len() - 16 - 1000; // in the raw section, which ends before the 16-byte checksum
    bytes[at] ^= 0x04;
    std::fs::write(&graph, bytes).unwrap();
    assert_eq!(greedy(dir.path(), &llama), (expected, "compile".to_owned()));
    let quarantined = std::fs::read_dir(dir.path().join("cache/graphs/quarantine")).unwrap().count();
    assert_eq!(quarantined, 1);
}

// Would catch: a file that is no model (or one usine would run wrong) started anyway, or refused with a
// message that does not say why.
#[test]
fn a_file_usine_does_not_run_is_refused_saying_why() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a model at all").unwrap();
    let cases = [
        (junk.display().to_string(), "junk.gguf: the model is not one this engine runs: not a GGUF file usine reads"),
        ("missing.gguf".to_owned(), "key `model`: no model file "),
    ];
    for (file, expected) in cases {
        let output = usine(dir.path()).args(["run", "--model", &file, "Hi"]).output().unwrap();
        assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
        assert!(stderr(&output).contains(expected), "{}", stderr(&output));
        assert_eq!(stderr(&output).lines().count(), 1, "{}", stderr(&output));
    }
}

// Would catch: files of `models_dir` missing from the catalog, or listed without what they hold.
#[test]
fn the_files_of_models_dir_join_the_catalog_with_what_they_hold() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir(&models).unwrap();
    model(&models, "tiny-llama", "q4_k_m", "small");
    std::fs::write(models.join("notes.txt"), "not a model").unwrap();
    let output = usine(dir.path()).env("USINE_MODELS_DIR", &models).args(["models"]).output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let row = stdout(&output).lines().find(|line| line.contains("candle/small")).map(str::to_owned);
    let row = row.unwrap_or_else(|| panic!("{}", stdout(&output)));
    assert!(row.contains("llama, 1.4M parameters, q4_k×11 q6_k×5, context 512, byte tokenizer, 878.6 KiB"), "{row}");
    assert!(!stdout(&output).contains("notes"), "{}", stdout(&output));
}

// Would catch: `max_context` not reaching the engine (a prompt past it accepted), or taken from the file.
#[test]
fn max_context_caps_a_model_files_context() {
    let dir = tempfile::tempdir().unwrap();
    let llama = model(dir.path(), "tiny-llama", "q8_0", "llama");
    let run = |max_context: &str| {
        usine(dir.path())
            .env("USINE_MAX_CONTEXT", max_context)
            .args(["run", "--model", &llama.display().to_string(), "--max-tokens", "4", "--temperature", "0"])
            .arg("x".repeat(40))
            .output()
            .unwrap()
    };
    let refused = run("32");
    assert_eq!(refused.status.code(), Some(1), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("exceed the context of 32 tokens"), "{}", stderr(&refused));
    let answered = run("64");
    assert!(answered.status.success(), "{}", stderr(&answered));
}
