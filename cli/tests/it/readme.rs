//! The README's tour cannot drift from the binary: every `$ usine ...` command pasted in a `text` block
//! runs again here, in order, in one fresh folder, and its output (stderr and stdout together, as a
//! terminal shows them piped) must match what the README shows. Figures change from run to run, so
//! every run of digits matches any other, runs of spaces match any run of spaces, and the README's
//! `[...]` stands for the rest of a line or, alone on its line, for any number of lines.

use std::path::Path;

/// Where the tour's cache folder was when it was pasted.
const TOUR_CACHE: &str = "/tmp/tour/cache";

/// The commands of the README's `text` blocks, each with the lines it printed.
fn tour(readme: &str) -> Vec<(String, Vec<String>)> {
    let mut commands: Vec<(String, Vec<String>)> = Vec::new();
    let mut in_text = false;
    for line in readme.lines() {
        match line {
            "```text" => in_text = true,
            "```" => in_text = false,
            _ if in_text => match line.strip_prefix("$ ") {
                Some(command) => commands.push((command.to_owned(), Vec::new())),
                None => {
                    if let Some((_, lines)) = commands.last_mut() {
                        lines.push(line.to_owned());
                    }
                }
            },
            _ => {}
        }
    }
    commands.retain(|(command, _)| command.starts_with("usine "));
    for (_, lines) in &mut commands {
        while lines.last().is_some_and(|line| line.trim().is_empty()) {
            lines.pop(); // the blank line between two commands of a block
        }
    }
    commands
}

/// The units that may follow a figure; a figure and its unit match any other (991 ms and 1.02 s).
const UNITS: [&str; 9] = ["ns", "µs", "ms", "s", "B", "KiB", "MiB", "GiB", "TiB"];

/// A line with its figures and spacing made comparable.
fn shape(line: &str) -> String {
    let mut shaped = String::new();
    let mut rest = line.trim();
    while let Some(c) = rest.chars().next() {
        if c.is_ascii_digit() {
            let end = rest.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(rest.len());
            rest = &rest[end..];
            // A unit after a space, as a word of its own, goes with the figure.
            if let Some(after) = rest.strip_prefix(' ') {
                let unit = UNITS.iter().find(|unit| {
                    after
                        .strip_prefix(**unit)
                        .is_some_and(|tail| tail.chars().next().is_none_or(|c| !c.is_alphanumeric()))
                });
                if let Some(unit) = unit {
                    rest = &after[unit.len()..];
                }
            }
            shaped.push('#');
        } else if c == ' ' {
            rest = rest.trim_start_matches(' ');
            shaped.push(' ');
        } else {
            shaped.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    shaped
}

/// Whether `actual` lines match the README's `expected` lines.
fn matches(expected: &[String], actual: &[String]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((first, rest)) if first.trim() == "[...]" => {
            (0..=actual.len()).any(|skipped| matches(rest, &actual[skipped..]))
        }
        Some((first, rest)) => actual.split_first().is_some_and(|(line, actual_rest)| {
            let (want, got) = (shape(first), shape(line));
            let line_matches = match want.strip_suffix("[...]") {
                Some(prefix) => got.starts_with(prefix.trim_end()),
                None => want == got,
            };
            line_matches && matches(rest, actual_rest)
        }),
    }
}

/// Splits a command line of the README into its words (double quotes group words).
fn words(command: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in command.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

#[test]
fn the_readme_tour_is_what_the_binary_prints() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let commands = tour(&readme);
    assert!(commands.len() >= 7, "the tour's commands: {commands:?}");
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut drifted = Vec::new();
    for (command, expected) in &commands {
        let words = words(command);
        // stderr and stdout through one pipe, in the order they were written, as the README shows them.
        let script = "exec \"$0\" \"$@\" 2>&1";
        let mut run = std::process::Command::new("sh");
        for (key, _) in std::env::vars().filter(|(key, _)| key.starts_with("USINE_") || key == "RUST_LOG") {
            run.env_remove(key);
        }
        let output = run
            .args(["-c", script])
            .arg(assert_cmd::cargo::cargo_bin("usine"))
            .args(&words[1..])
            .current_dir(dir.path())
            .env("USINE_CACHE_DIR", &cache)
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env("HOME", dir.path())
            .env_remove("RUST_BACKTRACE")
            .output()
            .unwrap();
        let text = String::from_utf8(output.stdout).unwrap().replace(&cache.display().to_string(), TOUR_CACHE);
        let mut actual: Vec<String> = text.lines().map(str::to_owned).collect();
        while actual.last().is_some_and(|line| line.trim().is_empty()) {
            actual.pop();
        }
        if !matches(expected, &actual) {
            drifted.push(format!("$ {command}\n--- README\n{}\n--- now\n{}", expected.join("\n"), text));
        }
    }
    assert!(drifted.is_empty(), "the README's tour has drifted:\n\n{}", drifted.join("\n\n"));
}

#[test]
fn the_tour_matcher_sees_a_difference() {
    let lines = |text: &str| text.lines().map(str::to_owned).collect::<Vec<_>>();
    let expected = lines("34 tokens in 1.28 s · first token\n[...]\nend [...]");
    assert!(matches(&expected, &lines("3 tokens in 9.1 s · first token\na\nb\nend of it")));
    assert!(matches(&expected, &lines("3 tokens  in 9 s · first token\nend")));
    assert!(!matches(&expected, &lines("3 token in 9.1 s · first token\nend")), "a word differs");
    assert!(!matches(&expected, &lines("3 tokens in 9.1 s · first token")), "a line is missing");
    assert!(!matches(&lines("a\nb"), &lines("a\nb\nc")), "a line too many");
    assert!(matches(&lines("loaded in 991 ms, 64.6 KiB"), &lines("loaded in 1.02 s, 1.0 MiB")), "figures and units");
    assert!(!matches(&lines("5 warm runs"), &lines("5 cold runs")));
}
