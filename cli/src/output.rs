//! Output for people and for machines: tables (boxed on a terminal, plain columns otherwise), JSON, and
//! figures in readable units.

use std::io::IsTerminal as _;
use std::time::Duration;

use comfy_table::{ContentArrangement, Table, presets};

use crate::config::Loaded;

/// A table of `rows` under `header`: boxed on a terminal, plain columns when piped.
pub(crate) fn table<const N: usize>(header: [&str; N], rows: impl IntoIterator<Item = [String; N]>) -> String {
    let mut table = Table::new();
    if std::io::stdout().is_terminal() {
        table.load_preset(presets::UTF8_FULL_CONDENSED).set_content_arrangement(ContentArrangement::Dynamic);
        if let Some((_, columns)) = console::Term::stdout().size_checked() {
            table.set_width(columns); // long cells wrap inside the terminal
        }
    } else {
        table.load_preset(presets::NOTHING);
    }
    table.set_header(header);
    for row in rows {
        table.add_row(row);
    }
    if std::io::stdout().is_terminal() {
        table.to_string()
    } else {
        // Piped, no line carries the padding of the widest cell of its last column (a model's long
        // description padded every row to 170 columns).
        table.to_string().lines().map(str::trim_end).collect::<Vec<_>>().join("\n")
    }
}

/// Pretty JSON on stdout.
pub(crate) fn json(value: &serde_json::Value) {
    outln!("{}", serde_json::to_string_pretty(value).expect("a JSON value prints"));
}

/// `n` things, in the singular for one: `1 graph`, `3 graphs`.
pub(crate) fn count(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A large count in short: `950`, `1.4K`, `1.4M`, `1.1B`.
pub(crate) fn magnitude(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1_000_000_000, "B"), (1_000_000, "M"), (1_000, "K")];
    match UNITS.iter().find(|(unit, _)| n >= *unit) {
        #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
        Some((unit, name)) => format!("{:.1}{name}", n as f64 / *unit as f64),
        None => n.to_string(),
    }
}

/// Bytes in binary units: `512 B`, `4.0 KiB`, `3.5 GiB`.
pub(crate) fn bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A duration for people: `850 ms`, `4.15 s`.
pub(crate) fn duration(duration: Duration) -> String {
    if duration < Duration::from_millis(10) {
        format!("{:.1} ms", duration.as_secs_f64() * 1e3)
    } else if duration < Duration::from_secs(1) {
        format!("{} ms", duration.as_millis())
    } else {
        format!("{:.2} s", duration.as_secs_f64())
    }
}

/// `usine config show`.
pub(crate) fn config_show(loaded: &Loaded, json: bool) {
    let settings = loaded.show();
    if json {
        let settings = settings
            .iter()
            .map(|(key, value, origin)| serde_json::json!({ "key": key, "value": value, "source": origin }))
            .collect();
        crate::output::json(&serde_json::Value::Array(settings));
        return;
    }
    let rows = settings.into_iter().map(|(key, value, origin)| [key.to_owned(), value, origin]);
    outln!("{}", table(["key", "value", "source"], rows));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_well() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(4096), "4.0 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(duration(Duration::from_millis(850)), "850 ms");
        assert_eq!(duration(Duration::from_micros(2460)), "2.5 ms");
        assert_eq!(duration(Duration::from_millis(4150)), "4.15 s");
    }
}
