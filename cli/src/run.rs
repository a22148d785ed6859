//! `usine run`: load the model (showing the compile the first time), then stream the answer token by
//! token; Ctrl-C stops the generation cleanly.

use std::io::{IsTerminal as _, Read as _, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use tokio::time::Instant;
use usine_engine::Progress;
use usine_executor::{Event, Message, Request, Role, Usage};
use usine_kernel::{KernelEvent, LoadOptions, LoadSource, RuntimeManager};

use crate::app::App;
use crate::config::Loaded;
use crate::output;

/// The longest prompt read from stdin: a bigger input is a mistake (a file piped by accident).
pub(crate) const MAX_PROMPT_BYTES: usize = 1 << 20;

/// Generates from `prompt` (stdin when absent); with `chat`, the prompt is a user's message, after the
/// system message `chat` holds if any.
pub(crate) async fn run(
    loaded: &Loaded,
    prompt: Option<String>,
    chat: Option<Option<String>>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let prompt = match prompt {
        Some(prompt) => prompt,
        None => read_prompt()?,
    };
    let app = App::build(loaded)?;
    let model = app.model(loaded)?.clone();

    // One listener for the whole run: a Ctrl-C at any point after this is seen (a new listener would
    // miss one that came between two).
    let interrupt = tokio::signal::ctrl_c();
    tokio::pin!(interrupt);
    let started = Instant::now();
    let load = load(&app.kernel, &model.id, loaded.config.warm, json, &mut interrupt);
    let Some(handle) = load.await? else {
        if json {
            outln!("{}", json!({ "event": "cancelled", "generated_tokens": 0 }));
        } else {
            eprintln!("stopped while loading {}", model.id);
        }
        return Ok(ExitCode::from(crate::INTERRUPTED));
    };
    let took = started.elapsed();
    let source = handle.source();
    if json {
        let event =
            json!({ "event": "loaded", "model": model.id, "source": source.as_str(), "seconds": took.as_secs_f64() });
        outln!("{event}");
    } else {
        let warmed = if loaded.config.warm { " and warmed up" } else { "" };
        let took = output::duration(took);
        match source {
            LoadSource::Compile => {
                eprintln!(
                    "{}: compiled{warmed} in {took}; the graph is cached in {}",
                    model.id,
                    app.storage.root().display()
                );
            }
            LoadSource::Disk => eprintln!("{}: loaded from the compiled-graph cache{warmed} in {took}", model.id),
            LoadSource::Remote => {
                let remote = loaded.config.remote.as_deref().map(crate::config::redact).unwrap_or_default();
                eprintln!("{}: fetched from the fleet's graph tier {remote}{warmed} in {took}", model.id);
            }
            LoadSource::Memory => eprintln!("{}: already in memory", model.id),
        }
    }

    let request = match chat {
        None => Request::prompt(&model.id, prompt),
        Some(system) => {
            let system = system.map(|system| Message::new(Role::System, system));
            Request::chat(&model.id, system.into_iter().chain([Message::new(Role::User, prompt)]).collect())
        }
    };
    let request = request.params(loaded.params());
    // `max_tokens` left at its default fits what the context leaves; one the user set is kept (and a
    // prompt that leaves less room is refused with the value that would fit).
    let request = if loaded.origin_of("max_tokens") == "default" { request.fit_to_context() } else { request };
    let mut stream = app.executor.generate(request)?;
    let mut stdout = std::io::stdout().lock();
    let mut tokens = 0_u32;
    let mut printed = false;
    loop {
        let event = tokio::select! {
            event = stream.next() => event,
            _ = &mut interrupt => {
                drop(stream); // cancels the generation; its memory goes back at once
                if json {
                    writeln!(stdout, "{}", json!({ "event": "cancelled", "generated_tokens": tokens }))?;
                } else {
                    writeln!(stdout)?;
                    eprintln!("stopped after {tokens} tokens");
                }
                return Ok(ExitCode::from(crate::INTERRUPTED));
            }
        };
        let Some(event) = event else { break };
        match event {
            Ok(Event::Started { .. }) => {}
            Ok(Event::Token { index, id, text }) => {
                tokens += 1;
                if json {
                    writeln!(stdout, "{}", json!({ "event": "token", "index": index, "id": id, "text": text }))?;
                } else {
                    // The answer starts on its own line: leading spaces there are noise.
                    let text = if printed { &text } else { text.trim_start() };
                    printed |= !text.is_empty();
                    write!(stdout, "{text}")?;
                    stdout.flush()?;
                }
            }
            Ok(Event::Text(text)) => {
                if json {
                    writeln!(stdout, "{}", json!({ "event": "text", "text": text }))?;
                } else {
                    write!(stdout, "{text}")?;
                }
            }
            Ok(Event::Finished(usage)) => {
                if json {
                    writeln!(stdout, "{}", json!({ "event": "finished", "usage": usage_json(&usage) }))?;
                } else {
                    writeln!(stdout)?;
                    eprintln!("{}", summary(&usage));
                }
            }
            Err(error) => {
                if !json && printed {
                    writeln!(stdout)?; // the error line starts on a line of its own
                }
                if json {
                    writeln!(
                        stdout,
                        "{}",
                        json!({ "event": "error", "code": error.code(), "message": error.to_string() })
                    )?;
                }
                return Err(error).context("generation failed");
            }
        }
    }
    drop(handle);
    app.kernel.save_usage().await?;
    Ok(ExitCode::SUCCESS)
}

/// Reads the prompt from stdin, unless stdin is a terminal (then there is nothing to read).
fn read_prompt() -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Err(crate::UsageError(anyhow::anyhow!(
            "no prompt: give one (`usine run \"Bonjour\"`) or pipe it on stdin"
        ))
        .into());
    }
    let mut prompt = String::new();
    let read = stdin
        .lock()
        .take(MAX_PROMPT_BYTES as u64 + 1)
        .read_to_string(&mut prompt)
        .context("reading the prompt from stdin")?;
    anyhow::ensure!(
        read <= MAX_PROMPT_BYTES,
        "the prompt on stdin is longer than {MAX_PROMPT_BYTES} bytes (the limit)"
    );
    let prompt = prompt.trim_end().to_owned();
    anyhow::ensure!(!prompt.is_empty(), "the prompt on stdin is empty");
    Ok(prompt)
}

/// Loads `model`, showing its compile's progress as it goes; `None` when `interrupt` came first (the
/// display is cleared either way before this returns).
pub(crate) async fn load(
    kernel: &RuntimeManager,
    model: &str,
    warm: bool,
    json: bool,
    interrupt: &mut (impl std::future::Future + Unpin),
) -> anyhow::Result<Option<usine_kernel::ModelHandle>> {
    let mut progress = kernel.progress(model)?;
    let mut events = kernel.subscribe();
    let model_id = model.to_owned();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shown = tokio::spawn(async move {
        let mut display = CompileDisplay::new(&model_id, json);
        tokio::pin!(stopped);
        let mut listening = true;
        loop {
            tokio::select! {
                report = progress.next() => match report {
                    Some(report) => display.show(&report),
                    None => break,
                },
                event = futures_util::StreamExt::next(&mut events), if listening => match event {
                    Some(Ok(KernelEvent::WaitingForCompile { model })) if model == model_id => {
                        display.note("waiting", "another usine process is compiling it; waiting for its graph", None);
                    }
                    Some(Ok(KernelEvent::WaitingForHost { model })) if model == model_id => {
                        display.note("waiting", "another host is compiling it; waiting for its graph in the remote tier", None);
                    }
                    Some(Ok(KernelEvent::GraphQuarantined { model, reason })) if model == model_id => {
                        let text = format!("its stored graph was damaged ({reason}); compiling it again");
                        display.note("quarantined", &text, Some(&reason));
                    }
                    None => listening = false,
                    Some(_) => {}
                },
                _ = &mut stopped => break,
            }
        }
        display.finish();
    });
    let handle = tokio::select! {
        handle = kernel.load_with(model, LoadOptions { warm, ..LoadOptions::default() }) => Some(handle),
        _ = interrupt => None,
    };
    let _ = stop.send(()); // a memory hit, or a load that ended without an event, ends the display too
    let _ = shown.await;
    handle.transpose().map_err(Into::into)
}

/// How a compile shows: a progress bar with the stage and the time left on a terminal, one line per
/// stage otherwise, a JSON event per report with `--json`.
struct CompileDisplay {
    model: String,
    bar: Option<ProgressBar>,
    json: bool,
    stage: String,
}

impl CompileDisplay {
    fn new(model: &str, json: bool) -> Self {
        Self { model: model.to_owned(), bar: None, json, stage: String::new() }
    }

    /// A line about the load that is not a compile's progress: a wait for another process, a damaged
    /// graph. With `--json`, an event named `event` (with the `reason`, when there is one).
    fn note(&mut self, event: &str, text: &str, reason: Option<&str>) {
        if self.json {
            outln!("{}", json!({ "event": event, "model": self.model, "reason": reason }));
        } else if let Some(bar) = &self.bar {
            bar.suspend(|| eprintln!("{}: {text}", self.model));
        } else {
            eprintln!("{}: {text}", self.model);
        }
    }

    fn show(&mut self, report: &Progress) {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a fraction in 0..=1, as per mille"
        )]
        let position = (report.fraction.clamp(0.0, 1.0) * 1000.0).round() as u64;
        let left = report
            .eta
            .filter(|eta| !eta.is_zero())
            .map(|eta| format!(" · {} left", output::duration(eta)))
            .unwrap_or_default();
        if self.json {
            let eta = report.eta.map(|eta| eta.as_secs_f64());
            outln!(
                "{}",
                json!({ "event": "progress", "stage": report.stage, "fraction": report.fraction, "eta_seconds": eta })
            );
        } else if std::io::stderr().is_terminal() {
            let bar = self.bar.get_or_insert_with(|| {
                let bar = ProgressBar::with_draw_target(Some(1000), ProgressDrawTarget::stderr());
                let style = ProgressStyle::with_template("compiling {prefix} [{bar:30}] {percent:>3}% {msg}")
                    .expect("a valid template")
                    .progress_chars("=> ");
                bar.set_style(style);
                bar.set_prefix(self.model.clone());
                bar.enable_steady_tick(Duration::from_millis(100));
                bar
            });
            bar.set_position(position);
            bar.set_message(format!("{}{left}", report.stage));
        } else if report.stage != self.stage {
            eprintln!("compiling {}: {} ({:.0} %){left}", self.model, report.stage, report.fraction * 100.0);
        }
        self.stage.clone_from(&report.stage);
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// One line of figures after an answer. The rate is the decode speed after the first token (what
/// `tokens_per_second` measures), so it is said apart from the total, which counts the first token's wait.
fn summary(usage: &Usage) -> String {
    format!(
        "{} in {} · first token after {}{}{}",
        output::count(usage.generated_tokens, "token", "tokens"),
        output::duration(usage.total),
        output::duration(usage.time_to_first_token),
        if usage.generated_tokens > 1 {
            format!(" · then {:.1} tokens/s", usage.tokens_per_second)
        } else {
            String::new()
        },
        if usage.retries > 0 {
            format!(" · {}", output::count(usage.retries, "retry", "retries"))
        } else {
            String::new()
        }
    )
}

/// The usage figures as JSON.
pub(crate) fn usage_json(usage: &Usage) -> serde_json::Value {
    json!({
        "finish": usage.finish,
        "prompt_tokens": usage.prompt_tokens,
        "generated_tokens": usage.generated_tokens,
        "time_to_first_token_seconds": usage.time_to_first_token.as_secs_f64(),
        "tokens_per_second": usage.tokens_per_second,
        "queued_seconds": usage.queued.as_secs_f64(),
        "total_seconds": usage.total.as_secs_f64(),
        "retries": usage.retries,
        "pipeline_idle_seconds": usage.pipeline_idle.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use usine_engine::FinishReason;

    use super::*;

    fn usage(generated_tokens: u32, retries: u32) -> Usage {
        Usage {
            finish: FinishReason::Length,
            prompt_tokens: 2,
            cached_tokens: 0,
            generated_tokens,
            time_to_first_token: Duration::from_millis(50),
            tokens_per_second: 27.65,
            queued: Duration::ZERO,
            total: Duration::from_millis(1280),
            retries,
            pipeline_idle: Duration::ZERO,
        }
    }

    #[test]
    fn the_summary_says_one_token_and_gives_the_rate_after_the_first() {
        assert_eq!(summary(&usage(1, 0)), "1 token in 1.28 s · first token after 50 ms");
        assert_eq!(
            summary(&usage(34, 1)),
            "34 tokens in 1.28 s · first token after 50 ms · then 27.6 tokens/s · 1 retry"
        );
        assert_eq!(
            summary(&usage(34, 2)),
            "34 tokens in 1.28 s · first token after 50 ms · then 27.6 tokens/s · 2 retries"
        );
    }
}
