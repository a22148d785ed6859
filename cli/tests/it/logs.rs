//! Logs: the libraries' `tracing` events on stderr, chosen by `RUST_LOG` or the `log_level` key, as text
//! or JSON; stdout stays the answer.

use std::path::Path;
use std::process::Output;

use serde_json::Value;

use crate::{stderr, stdout, usine};

/// `usine run` of the tiny model in `dir`, with `env` set and `RUST_LOG` only if `env` sets it.
fn run(dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut command = usine(dir);
    command.env_remove("RUST_LOG").env_remove("NO_COLOR").args(["run", "-m", "tiny", "--max-tokens", "3", "Hi"]);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    output
}

/// The stderr lines the kernel logged.
fn kernel_lines(output: &Output) -> Vec<String> {
    stderr(output).lines().filter(|line| line.contains("usine_kernel")).map(str::to_owned).collect()
}

// Would catch: no subscriber installed, one that ignores RUST_LOG, or logs written to stdout.
#[test]
fn rust_log_shows_the_kernels_load_events_on_stderr_and_the_answer_stays_alone_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let quiet = run(dir.path(), &[]);
    assert_eq!(kernel_lines(&quiet), Vec::<String>::new(), "warn by default: a clean run logs nothing");

    let logged = run(dir.path(), &[("RUST_LOG", "usine_kernel=info")]);
    let lines = kernel_lines(&logged);
    let loaded = lines.iter().find(|line| line.contains(" loaded ")).unwrap_or_else(|| panic!("{lines:#?}"));
    assert!(loaded.contains(" INFO load{model=\"webllm/tiny\"}: usine_kernel"), "{loaded}");
    assert!(loaded.contains("source=\"disk\""), "the second run reads the stored graph: {loaded}");
    assert_eq!(stdout(&logged), stdout(&quiet), "the same answer, and nothing else, on stdout");
    assert!(!lines.iter().any(|line| line.contains('\u{1b}')), "no colour when stderr is not a terminal");
}

#[test]
fn the_log_level_key_sets_the_level_and_rust_log_wins_over_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("usine.toml"), "log_level = \"info\"\n").unwrap();
    let lines = kernel_lines(&run(dir.path(), &[]));
    assert!(lines.iter().any(|line| line.contains(" compiling ")), "{lines:#?}");
    assert!(lines.iter().any(|line| line.contains(" loaded ") && line.contains("source=\"compile\"")), "{lines:#?}");

    assert_eq!(kernel_lines(&run(dir.path(), &[("RUST_LOG", "off")])), Vec::<String>::new());
    let from_env = kernel_lines(&run(dir.path(), &[("USINE_LOG_LEVEL", "warn")]));
    assert_eq!(from_env, Vec::<String>::new(), "USINE_LOG_LEVEL over the file");

    let shown = stdout(&usine(dir.path()).args(["config", "show", "--json"]).output().unwrap());
    let shown: Value = serde_json::from_str(&shown).unwrap();
    let row = shown.as_array().unwrap().iter().find(|row| row["key"] == "log_level").expect("config show lists it");
    assert_eq!(row["value"], "info", "{row}");
}

#[test]
fn a_bad_log_level_or_rust_log_is_a_usage_error_that_names_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("usine.toml"), "log_level = \"loud\"\n").unwrap();
    let output = usine(dir.path()).env_remove("RUST_LOG").args(["run", "-m", "tiny", "Hi"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    let message = stderr(&output);
    assert!(message.contains("usine.toml: key `log_level`: `loud` is not a level: expected off, error"), "{message}");

    std::fs::remove_file(dir.path().join("usine.toml")).unwrap();
    let output = usine(dir.path()).env("RUST_LOG", "usine_kernel=loud").args(["run", "-m", "tiny", "Hi"]).output();
    let output = output.unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("environment variable RUST_LOG is `usine_kernel=loud`"), "{}", stderr(&output));
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(dir.path(), &[("USINE_LOG_FORMAT", "json"), ("RUST_LOG", "usine_kernel=info")]);
    let events: Vec<Value> = stderr(&output)
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("{error}: {line}")))
        .collect();
    let loaded = events.iter().find(|event| event["fields"]["message"] == "loaded").expect("a loaded event");
    assert_eq!(loaded["level"], "INFO");
    assert_eq!(loaded["fields"]["model"], "webllm/tiny");
    assert_eq!(loaded["fields"]["source"], "compile");
    assert_eq!(loaded["span"]["name"], "load");
}

// Would catch: a damaged graph moved aside without a word in the logs at `warn` (the default of every
// command but `run`, which says it in its own words, once, and logs only errors unless told).
#[test]
fn a_quarantined_graph_is_a_warning_at_the_default_level() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), &[]);
    crate::damage_a_graph(dir.path());

    let quiet = stderr(&run(dir.path(), &[]));
    assert!(!quiet.contains(" WARN "), "run logs only errors by default: {quiet}");
    assert_eq!(quiet.matches("its stored graph was damaged").count(), 1, "{quiet}");
    crate::damage_a_graph(dir.path());

    let output = run(dir.path(), &[("USINE_LOG_LEVEL", "warn")]);
    let text = stderr(&output);
    let warning =
        text.lines().find(|line| line.contains("damaged graph quarantined")).unwrap_or_else(|| panic!("{text}"));
    assert!(warning.contains(" WARN ") && warning.contains("usine_storage"), "{warning}");
    assert!(!text.lines().any(|line| line.contains(" INFO ")), "nothing below warn: {text}");
}
