//! Logs: the libraries' `tracing` events on stderr (stdout stays the answer), filtered by `RUST_LOG`
//! when it is set, else by the `log_level` key; plain text, or one JSON object per line.

use std::io::IsTerminal as _;

use serde::{Deserialize, Serialize};
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The `log_level` key: the least severe events written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub(crate) enum LogLevel {
    /// No logs.
    Off,
    /// Errors only.
    Error,
    /// Warnings: a damaged graph quarantined, a retry, a failed warm-up (the default).
    Warn,
    /// Also loads, compiles and evictions.
    Info,
    /// Also admission.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    fn filter(self) -> LevelFilter {
        match self {
            Self::Off => LevelFilter::OFF,
            Self::Error => LevelFilter::ERROR,
            Self::Warn => LevelFilter::WARN,
            Self::Info => LevelFilter::INFO,
            Self::Debug => LevelFilter::DEBUG,
            Self::Trace => LevelFilter::TRACE,
        }
    }
}

/// The `log_format` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub(crate) enum LogFormat {
    /// A line per event, for people (coloured on a terminal unless `NO_COLOR` is set).
    Text,
    /// A JSON object per line, for log collectors.
    Json,
}

impl TryFrom<String> for LogLevel {
    type Error = String;

    fn try_from(word: String) -> Result<Self, String> {
        Ok(match word.to_ascii_lowercase().as_str() {
            "off" => Self::Off,
            "error" => Self::Error,
            "warn" => Self::Warn,
            "info" => Self::Info,
            "debug" => Self::Debug,
            "trace" => Self::Trace,
            _ => return Err(format!("`{word}` is not a level: expected off, error, warn, info, debug or trace")),
        })
    }
}

impl TryFrom<String> for LogFormat {
    type Error = String;

    fn try_from(word: String) -> Result<Self, String> {
        match word.to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            _ => Err(format!("`{word}` is not a log format: expected text or json")),
        }
    }
}

/// The filter: `RUST_LOG` when set and not empty (`target=level` directives, such as
/// `usine_kernel=info,warn`), else `level` for every target.
fn filter(rust_log: Option<&str>, level: LogLevel) -> anyhow::Result<Targets> {
    match rust_log.map(str::trim).filter(|directives| !directives.is_empty()) {
        Some(directives) => directives.parse().map_err(|error| {
            anyhow::anyhow!(
                "environment variable RUST_LOG is `{directives}`, expected `target=level` directives separated by \
                 commas, such as `usine_kernel=info,warn` ({error})"
            )
        }),
        None => Ok(Targets::new().with_default(level.filter())),
    }
}

/// The access log's layer (`usine serve`'s requests, one line each) writing to `writer` in `format`, or
/// none when off.
pub(crate) fn access_layer<S, W>(
    on: bool,
    format: LogFormat,
    colour: bool,
    writer: W,
) -> Option<Box<dyn tracing_subscriber::Layer<S> + Send + Sync>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let only = Targets::new().with_target(crate::serve::ACCESS_LOG_TARGET, LevelFilter::INFO);
    // A request's line stands alone: the spans it ran in say nothing more.
    let layer = tracing_subscriber::fmt::layer().with_writer(writer);
    on.then(|| match format {
        LogFormat::Text => layer.with_ansi(colour).with_filter(only).boxed(),
        LogFormat::Json => layer.json().with_current_span(false).with_span_list(false).with_filter(only).boxed(),
    })
}

/// Installs the process's subscriber: once, before the libraries do any work. With `access_log`, the
/// access log's lines too, whatever the level (the other logs never carry them).
pub(crate) fn install(level: LogLevel, format: LogFormat, access_log: bool) -> anyhow::Result<()> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = filter(rust_log.as_deref(), level)
        .map_err(crate::UsageError)?
        .with_target(crate::serve::ACCESS_LOG_TARGET, LevelFilter::OFF);
    // The filter belongs to this layer alone: the access log brings its own.
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let registry = tracing_subscriber::registry().with(access_layer(access_log, format, colour, std::io::stderr));
    let installed = match format {
        LogFormat::Text => registry.with(layer.with_ansi(colour).with_filter(filter)).try_init(),
        LogFormat::Json => registry.with(layer.json().with_filter(filter)).try_init(),
    };
    installed.map_err(|error| anyhow::anyhow!("installing the log subscriber: {error}"))
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::*;

    /// Whether `filter` lets an event of `target` at `level` through.
    fn lets(filter: &Targets, target: &str, level: Level) -> bool {
        filter.would_enable(target, &level)
    }

    #[test]
    fn rust_log_wins_over_the_key_and_sets_levels_per_target() {
        let filter = filter(Some("usine_kernel=info,error"), LogLevel::Off).unwrap();
        assert!(lets(&filter, "usine_kernel::runtime", Level::INFO));
        assert!(!lets(&filter, "usine_storage::store", Level::WARN));
        assert!(lets(&filter, "usine_storage::store", Level::ERROR));
    }

    #[test]
    fn without_rust_log_the_key_sets_the_level() {
        for rust_log in [None, Some(""), Some("  ")] {
            let filter = filter(rust_log, LogLevel::Warn).unwrap();
            assert!(lets(&filter, "usine_storage::store", Level::WARN));
            assert!(!lets(&filter, "usine_kernel::runtime", Level::INFO));
        }
        assert!(!lets(&filter(None, LogLevel::Off).unwrap(), "usine_storage::store", Level::ERROR));
    }

    #[test]
    fn a_bad_rust_log_is_an_error_naming_it() {
        let error = filter(Some("usine_kernel=loud"), LogLevel::Warn).unwrap_err().to_string();
        assert!(error.starts_with("environment variable RUST_LOG is `usine_kernel=loud`"), "{error}");
    }

    #[test]
    fn levels_and_formats_read_as_words_in_any_case_and_write_in_lowercase() {
        let level: LogLevel = serde_json::from_str("\"Debug\"").unwrap();
        assert_eq!((level, serde_json::to_string(&level).unwrap().as_str()), (LogLevel::Debug, "\"debug\""));
        let format: LogFormat = serde_json::from_str("\"JSON\"").unwrap();
        assert_eq!(format, LogFormat::Json);
        let error = serde_json::from_str::<LogLevel>("\"loud\"").unwrap_err().to_string();
        assert!(error.starts_with("`loud` is not a level: expected off, error, warn"), "{error}");
    }
}
