//! The `usine` command: run a model, benchmark engines, inspect the graph cache, the pools and the
//! catalog, check the machine.

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a command line prints: that is its job")]

/// `println!` that ends the process quietly when stdout is a closed pipe (`usine cache ls | head -1`),
/// as a command killed by SIGPIPE would, instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(error) = writeln!(std::io::stdout(), $($arg)*) {
            $crate::stdout_failed(&error);
        }
    }};
}

mod app;
mod bench;
mod cache;
mod config;
mod doctor;
mod inspect;
mod logging;
mod output;
mod plot;
mod run;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};

/// `usine --version`: the version, and the notice of the model built into the binary.
#[cfg(feature = "candle")]
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\n\nThe candle engine's built-in model, candle/tiny-llama:\n",
    include_str!("../../engines/candle/weights/NOTICE")
);
#[cfg(not(feature = "candle"))]
const LONG_VERSION: &str = env!("CARGO_PKG_VERSION");

/// usine: the runtime kernel for LLM inference, from the command line.
#[derive(Debug, Parser)]
#[command(name = "usine", version, long_version = LONG_VERSION, about, propagate_version = true)]
#[command(
    after_help = "Examples:\n  usine run \"Bonjour\"\n  usine bench warm --json\n  usine cache ls\n  usine doctor"
)]
struct Cli {
    /// A configuration file, instead of `usine.toml` in the working folder and the user's config folder.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    /// The compiled-graph cache folder (default: USINE_CACHE_DIR, else the platform's cache folder).
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Streams a model's answer to a prompt (read from stdin when not given).
    #[command(
        after_help = "Examples:\n  usine run \"Bonjour\"\n  echo \"What is usine?\" | usine run --engine transformers\n  usine run --model tiny --max-tokens 20 --json \"Hi\""
    )]
    Run(RunArgs),
    /// Benchmarks an engine: cold start, warm runs, prompt length, max tokens, pipelining.
    #[command(
        after_help = "Examples:\n  usine bench\n  usine bench warm --runs 5 --model tiny\n  usine bench all --json --plot bench.svg"
    )]
    Bench(bench::BenchArgs),
    /// Inspects and maintains the compiled-graph cache.
    #[command(
        subcommand,
        after_help = "Examples:\n  usine cache ls\n  usine cache explain --model 7b\n  usine cache gc --unused-for-days 30"
    )]
    Cache(cache::CacheCommand),
    /// Shows the memory pools: capacity, use, peak, waiters (of a running server with `--server`).
    #[command(after_help = "Examples:\n  usine pools --json\n  usine pools --server http://127.0.0.1:8080")]
    Pools(Inspect),
    /// Shows the catalog of models and which are compiled, loaded, pinned, idle or expiring (of a running
    /// server with `--server`).
    #[command(after_help = "Examples:\n  usine models\n  usine models --server http://127.0.0.1:8080")]
    Models(Inspect),
    /// Shows what this machine is and the profile usine picks for it.
    #[command(after_help = "Example:\n  usine doctor --json")]
    Doctor(JsonArg),
    /// Shows the configuration and where each value came from.
    #[command(subcommand, after_help = "Example:\n  USINE_MAX_TOKENS=20 usine config show")]
    Config(ConfigCommand),
    /// Serves the OpenAI-compatible HTTP API, model lifecycle endpoints and Prometheus metrics.
    #[command(
        after_help = "Examples:\n  usine serve\n  USINE_API_KEY=$(openssl rand -hex 16) usine serve --bind 0.0.0.0:8080\n  curl -s localhost:8080/v1/completions -H 'content-type: application/json' \\\n    -d '{\"model\": \"webllm/tiny\", \"prompt\": \"Hi\", \"stream\": true}'"
    )]
    Serve {
        /// The address to listen on (default: `bind` in the configuration, 127.0.0.1:8080).
        #[arg(long, value_name = "ADDRESS:PORT")]
        bind: Option<String>,
        /// A folder whose GGUF files join the catalog (default: `models_dir` in the configuration).
        #[arg(long, value_name = "FOLDER")]
        models_dir: Option<PathBuf>,
    },
    /// Prints a shell completion script.
    #[command(after_help = "Example:\n  usine completions bash > ~/.local/share/bash-completion/completions/usine")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Prints every setting, its value and its source.
    #[command(after_help = "Examples:\n  usine config show\n  USINE_MAX_TOKENS=20 usine config show --json")]
    Show(JsonArg),
}

/// `--json` and `--server`.
#[derive(Debug, Args)]
struct Inspect {
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Ask a running `usine serve` at this address (with `api_key` from the configuration, if set).
    #[arg(long, value_name = "URL")]
    server: Option<String>,
}

/// `--json`.
#[derive(Debug, Args)]
struct JsonArg {
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

/// Which model: shared by the commands that run one.
#[derive(Debug, Clone, Args)]
pub(crate) struct ModelArgs {
    /// The model: a profile of the engine (`7b`, `tiny`, `cpu-1b`), `engine/profile`, or a GGUF file
    /// (`./model.gguf`, run by the candle engine).
    #[arg(long, short)]
    model: Option<String>,
    /// The engine: `webllm`, `transformers` (simulated), `candle` (a real model on the CPU), or `zero` (no
    /// work at all, to measure usine itself).
    #[arg(long, short)]
    engine: Option<String>,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The prompt; read from stdin when absent.
    prompt: Option<String>,
    #[command(flatten)]
    model: ModelArgs,
    /// Most tokens to generate.
    #[arg(long)]
    max_tokens: Option<u32>,
    /// Sampling temperature, 0 (greedy) to 2.
    #[arg(long)]
    temperature: Option<f32>,
    /// Seed of the sampler: the same seed gives the same text.
    #[arg(long)]
    seed: Option<u64>,
    /// Sample among this many most likely tokens only (0: all).
    #[arg(long)]
    top_k: Option<u32>,
    /// Warm the model up after loading it (the default), so that the first answer is fast.
    #[arg(long, overrides_with = "no_warm")]
    warm: bool,
    /// Do not warm the model up.
    #[arg(long)]
    no_warm: bool,
    /// One JSON event per line on stdout, for scripts.
    #[arg(long)]
    json: bool,
    /// The prompt is a user's message: a conversation, rendered by the model's chat template (or, for a
    /// model without one, as `User: ...` lines), answered by the assistant.
    #[arg(long)]
    chat: bool,
    /// With `--chat`: a system message before the user's.
    #[arg(long, value_name = "TEXT", requires = "chat")]
    system: Option<String>,
}

/// An error that is the user's to fix (a flag, the configuration): exit code 2, as for bad usage.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) anyhow::Error);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for UsageError {}

/// Exit code of a run stopped by Ctrl-C (128 + SIGINT), as shells expect.
pub(crate) const INTERRUPTED: u8 = 130;
/// Exit code when stdout's reader went away (128 + SIGPIPE), as shells expect.
const CLOSED_PIPE: u8 = 141;

/// Stdout failed: a closed pipe ends the command quietly; anything else is an error line.
pub(crate) fn stdout_failed(error: &std::io::Error) -> ! {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(i32::from(CLOSED_PIPE));
    }
    eprintln!("error: writing to stdout: {error}");
    std::process::exit(1);
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(error) => {
            let closed = error.chain().any(|cause| {
                cause.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            });
            if closed {
                return ExitCode::from(CLOSED_PIPE);
            }
            let code = if error.is::<UsageError>() { 2 } else { 1 };
            if std::env::var_os("RUST_BACKTRACE").is_some_and(|value| value != "0") {
                eprintln!("error: {error:?}");
            } else {
                eprintln!("error: {}", chain(&error));
            }
            ExitCode::from(code)
        }
    }
}

/// An error and its causes on one line, each cause once: a library error that already says its
/// source in its own message (`model `m`: <the engine's error>`) is not followed by that source again.
fn chain(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// Loads the configuration with the flags that set values; a bad one is a usage error.
fn configure(
    cli_config: Option<&std::path::Path>,
    cache_dir: Option<PathBuf>,
    flags: config::Flags,
) -> anyhow::Result<config::Loaded> {
    configure_logging(cli_config, cache_dir, flags, false)
}

/// [`configure`] for `usine run`: unless `log_level` is set, only errors are logged, since the command
/// says in its own words what the warnings would (a damaged graph, a wait for another process).
fn configure_run(
    cli_config: Option<&std::path::Path>,
    cache_dir: Option<PathBuf>,
    flags: config::Flags,
) -> anyhow::Result<config::Loaded> {
    configure_logging(cli_config, cache_dir, flags, true)
}

/// Loads the configuration, then installs the logs (errors only when `quiet` and `log_level` is unset).
fn configure_logging(
    cli_config: Option<&std::path::Path>,
    cache_dir: Option<PathBuf>,
    flags: config::Flags,
    quiet: bool,
) -> anyhow::Result<config::Loaded> {
    let mut flags = flags;
    if let Some(dir) = &cache_dir {
        let dir = dir
            .to_str()
            .ok_or_else(|| UsageError(anyhow::anyhow!("--cache-dir {} is not valid UTF-8", dir.display())))?;
        flags.set("cache_dir", Some(dir));
    }
    let loaded = config::files(cli_config).and_then(|files| config::load(&files, flags)).map_err(UsageError)?;
    let level = if quiet && loaded.origin_of("log_level") == "default" {
        logging::LogLevel::Error
    } else {
        loaded.config.log_level
    };
    // Before any library work, so that its events are logged from the first.
    logging::install(level, loaded.config.log_format, loaded.config.access_log)?;
    Ok(loaded)
}

fn model_flags(model: &ModelArgs) -> config::Flags {
    let mut flags = config::Flags::default();
    flags.set("model", model.model.clone());
    flags.set("engine", model.engine.clone());
    flags
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let Cli { config: file, cache_dir, command } = cli;
    let file = file.as_deref();
    // The runtime is shut down without waiting long for blocking work (a load queued behind another
    // process's compile, say): a command that is done, or interrupted, exits.
    let block_on = |future: std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<ExitCode>>>>| {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let result = runtime.block_on(future);
        runtime.shutdown_timeout(std::time::Duration::from_millis(500));
        result
    };
    match command {
        Command::Run(args) => {
            let mut flags = model_flags(&args.model);
            flags.set("max_tokens", args.max_tokens);
            flags.set("temperature", args.temperature);
            flags.set("seed", args.seed);
            flags.set("top_k", args.top_k);
            flags.set("warm", if args.no_warm { Some(false) } else { args.warm.then_some(true) });
            let loaded = configure_run(file, cache_dir, flags)?;
            let chat = args.chat.then_some(args.system);
            block_on(Box::pin(run::run(&loaded, args.prompt, chat, args.json)))
        }
        Command::Bench(args) => {
            let loaded = configure(file, cache_dir, model_flags(&args.model))?;
            block_on(Box::pin(async { bench::bench(&loaded, &args).await.map(|()| ExitCode::SUCCESS) }))
        }
        Command::Cache(command) => {
            let loaded = configure(file, cache_dir, command.flags())?;
            block_on(Box::pin(async { cache::cache(&loaded, command).await.map(|()| ExitCode::SUCCESS) }))
        }
        Command::Pools(Inspect { json, server }) => {
            let loaded = configure(file, cache_dir, config::Flags::default())?;
            inspect::pools(&loaded, json, server.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Models(Inspect { json, server }) => {
            let loaded = configure(file, cache_dir, config::Flags::default())?;
            block_on(Box::pin(async {
                inspect::models(&loaded, json, server.as_deref()).await.map(|()| ExitCode::SUCCESS)
            }))
        }
        Command::Doctor(JsonArg { json }) => {
            let loaded = configure(file, cache_dir, config::Flags::default())?;
            block_on(Box::pin(async {
                let remote = app::remote_status(&loaded).await?;
                doctor::doctor(&loaded, remote, json).map(|()| ExitCode::SUCCESS)
            }))
        }
        Command::Config(ConfigCommand::Show(JsonArg { json })) => {
            let loaded = configure(file, cache_dir, config::Flags::default())?;
            output::config_show(&loaded, json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { bind, models_dir } => {
            let mut flags = config::Flags::default();
            flags.set("models_dir", models_dir);
            let loaded = configure(file, cache_dir, flags)?;
            block_on(Box::pin(async { serve::serve(loaded, bind).await.map(|()| ExitCode::SUCCESS) }))
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "usine", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
