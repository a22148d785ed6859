//! `usine bench`: the seeds' benchmark suite on any engine and model, in real time: cold start, warm
//! runs, prompt length, max tokens, pipelining on and off. A table, JSON, or a plot.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use tokio::time::Instant;
use usine_executor::{ExecutorConfig, Request, TaskExecutor, Usage};
use usine_kernel::LoadOptions;

use crate::app::App;
use crate::config::Loaded;
use crate::output;

#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// Which suite to run.
    #[arg(value_enum, default_value_t = Suite::All)]
    suite: Suite,
    #[command(flatten)]
    pub(crate) model: crate::ModelArgs,
    /// Runs of the warm suite (1 to 1000).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
    /// Also draws latency against tokens and pipelining on against off, as SVG or PNG (by extension).
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Suite {
    /// Load and first generation, without and with warming.
    Cold,
    /// Repeated generations on a loaded model: mean, median, min, max, standard deviation.
    Warm,
    /// Short, medium and long prompts.
    Context,
    /// 25, 50, 100 and 150 tokens.
    MaxTokens,
    /// Pipelining on against off.
    Pipeline,
    /// Every suite.
    All,
}

/// Everything measured, for the table, the JSON and the plot.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Results {
    pub(crate) model: String,
    cold: Option<Cold>,
    warm: Option<Warm>,
    context: Vec<ContextRow>,
    pub(crate) max_tokens: Vec<LengthRow>,
    pub(crate) pipeline: Option<Pipeline>,
}

#[derive(Debug, Serialize)]
struct Cold {
    /// The compile, when the graph was not stored yet.
    compile_seconds: Option<f64>,
    without_warming: ColdRun,
    with_warming: ColdRun,
}

#[derive(Debug, Serialize)]
struct ColdRun {
    /// Where the model came from: `disk` (the graph cache), or `compile` when the stored graph did not
    /// serve (damaged, say).
    source: &'static str,
    load_seconds: f64,
    first_token_seconds: f64,
    total_seconds: f64,
}

#[derive(Debug, Serialize)]
struct Warm {
    runs: u32,
    tokens: u32,
    mean_seconds: f64,
    median_seconds: f64,
    min_seconds: f64,
    max_seconds: f64,
    stddev_seconds: f64,
    tokens_per_second: f64,
}

#[derive(Debug, Serialize)]
struct ContextRow {
    prompt: &'static str,
    prompt_tokens: u32,
    first_token_seconds: f64,
    total_seconds: f64,
    tokens_per_second: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct LengthRow {
    pub(crate) max_tokens: u32,
    pub(crate) tokens: u32,
    pub(crate) total_seconds: f64,
    pub(crate) tokens_per_second: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Pipeline {
    pub(crate) tokens: u32,
    pub(crate) on_tokens_per_second: f64,
    pub(crate) off_tokens_per_second: f64,
    pub(crate) speedup: f64,
}

/// Tokens generated in each run of the prompt-length suite.
const CONTEXT_TOKENS: u32 = 32;
/// The max-tokens suite's lengths (the seeds').
const LENGTHS: [u32; 4] = [25, 50, 100, 150];
/// A sentence of the simulated engines' corpus, repeated to make medium and long prompts.
const SENTENCE: &str = "The kernel keeps the right models resident and loads them fast. ";

pub(crate) async fn bench(loaded: &Loaded, args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.plot {
        // Checked before minutes of measuring, not after.
        crate::plot::check(path).map_err(crate::UsageError)?;
        let plotted = [Suite::MaxTokens, Suite::Pipeline, Suite::All];
        if !plotted.contains(&args.suite) {
            return Err(crate::UsageError(anyhow::anyhow!(
                "--plot draws the `max-tokens` and `pipeline` suites; run one of them or `all`"
            ))
            .into());
        }
    }
    let app = App::build(loaded)?;
    let model = app.model(loaded)?.id.clone();
    let runs = |suite| args.suite == suite || args.suite == Suite::All;
    let mut results = Results { model: model.clone(), ..Results::default() };
    let say = |what: &str| {
        if !args.json {
            eprintln!("{model}: {what}…");
        }
    };
    if runs(Suite::Cold) {
        say("cold start");
        results.cold = Some(cold(&app, &model, loaded).await?);
    }
    // The other suites run on a loaded, warm model.
    let _model = app.kernel.load_with(&model, LoadOptions { warm: true, ..LoadOptions::default() }).await?;
    if runs(Suite::Warm) {
        say(&format!("{} warm runs", args.runs));
        results.warm = Some(warm(&app.executor, &model, loaded, args.runs).await?);
    }
    if runs(Suite::Context) {
        say("prompt lengths");
        for (name, repeat) in [("short", 1), ("medium", 10), ("long", 60)] {
            // A set length (greedy), so that only the prompt differs between the rows.
            let usage = generate(&app.executor, &model, &SENTENCE.repeat(repeat), loaded, Some(CONTEXT_TOKENS)).await?;
            results.context.push(ContextRow {
                prompt: name,
                prompt_tokens: usage.prompt_tokens,
                first_token_seconds: usage.time_to_first_token.as_secs_f64(),
                total_seconds: usage.total.as_secs_f64(),
                tokens_per_second: usage.tokens_per_second,
            });
        }
    }
    if runs(Suite::MaxTokens) {
        say("max tokens");
        for max_tokens in LENGTHS {
            let usage = generate(&app.executor, &model, SENTENCE, loaded, Some(max_tokens)).await?;
            results.max_tokens.push(LengthRow {
                max_tokens,
                tokens: usage.generated_tokens,
                total_seconds: usage.total.as_secs_f64(),
                tokens_per_second: usage.tokens_per_second,
            });
        }
    }
    if runs(Suite::Pipeline) {
        say("pipelining on and off");
        let off = ExecutorConfig { pipelining: false, ..loaded.executor_config() };
        let off = TaskExecutor::new(off, &app.kernel, &app.memory)?;
        let on = TaskExecutor::new(
            ExecutorConfig { pipelining: true, ..loaded.executor_config() },
            &app.kernel,
            &app.memory,
        )?;
        let on = generate(&on, &model, SENTENCE, loaded, Some(100)).await?;
        let off = generate(&off, &model, SENTENCE, loaded, Some(100)).await?;
        results.pipeline = Some(Pipeline {
            tokens: on.generated_tokens,
            on_tokens_per_second: on.tokens_per_second,
            off_tokens_per_second: off.tokens_per_second,
            speedup: if off.tokens_per_second > 0.0 { on.tokens_per_second / off.tokens_per_second } else { 0.0 },
        });
    }
    if args.json {
        output::json(&serde_json::to_value(&results).context("the results are plain data")?);
    } else {
        print_tables(&results);
    }
    if let Some(path) = &args.plot {
        crate::plot::draw(&results, path)?;
        if !args.json {
            eprintln!("plot written to {}", path.display());
        }
    }
    // The bench's loads are not the user's: `usage.json` (what start-up warms) is left as it was.
    Ok(())
}

/// One generation to its end. With `max_tokens` given, decoding is greedy, so that the model does not
/// end its answer early and every length is reached (the suites that compare lengths need them).
async fn generate(
    executor: &TaskExecutor,
    model: &str,
    prompt: &str,
    loaded: &Loaded,
    max_tokens: Option<u32>,
) -> anyhow::Result<Usage> {
    let mut params = loaded.params();
    if let Some(max_tokens) = max_tokens {
        params.max_tokens = max_tokens;
        params.temperature = 0.0;
    }
    let output = executor.generate(Request::prompt(model, prompt).params(params))?.output().await?;
    Ok(output.usage)
}

/// Unloads `model`, waiting for the handles still on their way back (a load's own, released by its
/// task just after its callers have theirs).
async fn unload(app: &App, model: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    while !app.kernel.unload(model) && app.kernel.loaded().iter().any(|info| info.id == model) {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(5),
            "{model} is still in use after 5 s: cannot measure a cold start"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

async fn cold(app: &App, model: &str, loaded: &Loaded) -> anyhow::Result<Cold> {
    unload(app, model).await?;
    let key = app.kernel.graph_key(model)?;
    let compile_seconds = if app.storage.path_of(&key).exists() {
        None
    } else {
        let start = Instant::now();
        drop(app.kernel.load_with(model, LoadOptions::default()).await?);
        Some(start.elapsed().as_secs_f64())
    };
    let run = async |warm: bool| -> anyhow::Result<ColdRun> {
        unload(app, model).await?;
        let start = Instant::now();
        let handle = app.kernel.load_with(model, LoadOptions { warm, ..LoadOptions::default() }).await?;
        let load = start.elapsed();
        let source = handle.source().as_str();
        let usage = generate(&app.executor, model, SENTENCE, loaded, None).await?;
        drop(handle);
        Ok(ColdRun {
            source,
            load_seconds: load.as_secs_f64(),
            first_token_seconds: (load + usage.time_to_first_token).as_secs_f64(),
            total_seconds: start.elapsed().as_secs_f64(),
        })
    };
    let without_warming = run(false).await?;
    let with_warming = run(true).await?;
    Ok(Cold { compile_seconds, without_warming, with_warming })
}

async fn warm(executor: &TaskExecutor, model: &str, loaded: &Loaded, runs: u32) -> anyhow::Result<Warm> {
    let mut totals = Vec::new();
    let mut tokens = 0;
    let mut rates = 0.0;
    for _ in 0..runs {
        let usage = generate(executor, model, SENTENCE, loaded, None).await?;
        totals.push(usage.total.as_secs_f64());
        tokens += usage.generated_tokens;
        rates += usage.tokens_per_second;
    }
    let n = f64::from(runs);
    let mean = totals.iter().sum::<f64>() / n;
    let variance = if runs > 1 { totals.iter().map(|t| (t - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    let mut sorted = totals.clone();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    let median = if sorted.len() % 2 == 0 { f64::midpoint(sorted[middle - 1], sorted[middle]) } else { sorted[middle] };
    Ok(Warm {
        runs,
        tokens,
        mean_seconds: mean,
        median_seconds: median,
        min_seconds: sorted[0],
        max_seconds: sorted[sorted.len() - 1],
        stddev_seconds: variance.sqrt(),
        tokens_per_second: rates / n,
    })
}

fn seconds(value: f64) -> String {
    output::duration(Duration::from_secs_f64(value.max(0.0)))
}

fn print_tables(results: &Results) {
    outln!("model {}", results.model);
    if let Some(cold) = &results.cold {
        if let Some(compile) = cold.compile_seconds {
            outln!("\ncompile (first load, graph not cached): {}", seconds(compile));
        }
        let rows =
            [("without warming", &cold.without_warming), ("with warming", &cold.with_warming)].map(|(name, run)| {
                [
                    name.to_owned(),
                    run.source.to_owned(),
                    seconds(run.load_seconds),
                    seconds(run.first_token_seconds),
                    seconds(run.total_seconds),
                ]
            });
        outln!("\ncold start\n{}", output::table(["", "from", "load", "first token", "total"], rows));
    }
    if let Some(warm) = &results.warm {
        let row = [
            warm.runs.to_string(),
            seconds(warm.mean_seconds),
            seconds(warm.median_seconds),
            seconds(warm.min_seconds),
            seconds(warm.max_seconds),
            seconds(warm.stddev_seconds),
            format!("{:.1}", warm.tokens_per_second),
        ];
        let header = ["runs", "mean", "median", "min", "max", "std dev", "tokens/s"];
        outln!("\nwarm runs\n{}", output::table(header, [row]));
    }
    if !results.context.is_empty() {
        let rows = results.context.iter().map(|row| {
            [
                row.prompt.to_owned(),
                row.prompt_tokens.to_string(),
                seconds(row.first_token_seconds),
                seconds(row.total_seconds),
                format!("{:.1}", row.tokens_per_second),
            ]
        });
        outln!("\nprompt length\n{}", output::table(["prompt", "tokens", "first token", "total", "tokens/s"], rows));
    }
    if !results.max_tokens.is_empty() {
        let rows = results.max_tokens.iter().map(|row| {
            [
                row.max_tokens.to_string(),
                row.tokens.to_string(),
                seconds(row.total_seconds),
                format!("{:.1}", row.tokens_per_second),
            ]
        });
        outln!("\nmax tokens (greedy)\n{}", output::table(["max tokens", "generated", "latency", "tokens/s"], rows));
    }
    if let Some(pipeline) = &results.pipeline {
        let row = [
            pipeline.tokens.to_string(),
            format!("{:.1}", pipeline.on_tokens_per_second),
            format!("{:.1}", pipeline.off_tokens_per_second),
            format!("{:.2}×", pipeline.speedup),
        ];
        outln!(
            "\npipelining (greedy)\n{}",
            output::table(["tokens", "on, tokens/s", "off, tokens/s", "speed-up"], [row])
        );
    }
}
