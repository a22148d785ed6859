//! What a user sees around a run: a damaged graph and a wait for another process are said, a default
//! `max_tokens` fits the context, one set by the user is refused with the value that would fit, tables
//! piped carry no padding.

use std::time::Duration;

use crate::{stderr, stdout, usine};

#[test]
fn a_damaged_graph_is_said_and_compiled_again() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        usine(dir.path()).args(["run", "-m", "tiny", "--max-tokens", "2", "Hi"]).output().unwrap().status.success()
    );
    crate::damage_a_graph(dir.path());
    let run = usine(dir.path()).args(["run", "-m", "tiny", "--max-tokens", "2", "Hi"]).output().unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let said = stderr(&run);
    assert!(said.contains("webllm/tiny: its stored graph was damaged (corrupt ("), "{said}");
    assert!(said.contains("quarantined); compiling it again"), "{said}");
    assert!(said.contains("webllm/tiny: compiled and warmed up in"), "{said}");
}

#[test]
fn a_run_that_waits_for_another_process_compiling_says_so() {
    let dir = tempfile::tempdir().unwrap();
    // The 7B profile compiles for 4 s, holding the graph's lock meanwhile.
    let mut first = std::process::Command::new(assert_cmd::cargo::cargo_bin("usine"))
        .args(["run", "--max-tokens", "1", "--no-warm", "Hi"])
        .current_dir(dir.path())
        .env("USINE_CACHE_DIR", dir.path().join("cache"))
        .env("HOME", dir.path())
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let locks = dir.path().join("cache/graphs/locks");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::fs::read_dir(&locks).map_or(0, Iterator::count) == 0 {
        assert!(std::time::Instant::now() < deadline, "the first run never took the lock");
        std::thread::sleep(Duration::from_millis(5));
    }
    let second = usine(dir.path()).args(["run", "--max-tokens", "1", "--no-warm", "Hi"]).output().unwrap();
    assert!(first.wait().unwrap().success());
    assert!(second.status.success(), "{}", stderr(&second));
    let said = stderr(&second);
    assert!(said.contains("webllm/7b: another usine process is compiling it; waiting for its graph"), "{said}");
    assert!(said.contains("webllm/7b: loaded from the compiled-graph cache"), "{said}");
}

#[test]
fn a_default_max_tokens_fits_the_context_and_a_chosen_one_says_what_would() {
    let dir = tempfile::tempdir().unwrap();
    // The tiny profile takes 2,048 tokens; this prompt leaves 8 of them.
    let words = "Warm ".repeat(2040);
    let prompt = words.trim_end();
    let fitted = usine(dir.path()).args(["run", "-m", "tiny", "--json", "--no-warm", prompt]).output().unwrap();
    assert!(fitted.status.success(), "{}", stderr(&fitted));
    let last = stdout(&fitted).lines().last().unwrap().to_owned();
    let finished: serde_json::Value = serde_json::from_str(&last).unwrap();
    let usage = &finished["usage"];
    let (prompt_tokens, generated) = (usage["prompt_tokens"].as_u64().unwrap(), usage["generated_tokens"].as_u64());
    assert!(prompt_tokens < 2048 && prompt_tokens + 64 > 2048, "a prompt that leaves less than 64: {prompt_tokens}");
    assert!(generated.unwrap() <= 2048 - prompt_tokens, "{last}");

    let chosen =
        usine(dir.path()).args(["run", "-m", "tiny", "--max-tokens", "64", "--no-warm", prompt]).output().unwrap();
    assert_eq!(chosen.status.code(), Some(1));
    let said = stderr(&chosen);
    let fits = 2048 - prompt_tokens;
    assert!(said.contains(&format!("max_tokens {fits} would fit")), "{said}");
    assert_eq!(said.matches("exceed the context").count(), 1, "said once: {said}");
}

#[test]
fn tables_piped_carry_no_trailing_padding() {
    let dir = tempfile::tempdir().unwrap();
    for command in [&["models"][..], &["pools"], &["config", "show"]] {
        let output = usine(dir.path()).args(command).output().unwrap();
        assert!(output.status.success(), "{command:?}: {}", stderr(&output));
        let text = stdout(&output);
        assert!(text.lines().all(|line| line == line.trim_end()), "{command:?}:\n{text}");
    }
}
