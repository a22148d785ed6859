//! Telemetry: what the executor emits through the `metrics` facade.

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use usine_engine::scripted::metrics_snapshot;
use usine_executor::{ExecutorConfig, Request, metrics as names};

use crate::{config, fixture};

#[tokio::test(start_paused = true)]
async fn requests_tokens_retries_and_latencies_are_emitted() {
    let recorder = DebuggingRecorder::new();
    let f = metrics::with_local_recorder(&recorder, || fixture(ExecutorConfig { max_concurrent: 1, ..config() }));
    f.script.lock().transient.insert(2, 1);
    let _model = f.loaded().await;
    f.executor.generate(Request::prompt("lab", "Hi").max_tokens(5)).unwrap().output().await.unwrap();
    drop(f.executor.generate(Request::prompt("lab", "Hi").max_tokens(5)).unwrap());
    tokio::task::yield_now().await;

    let seen = metrics_snapshot(&recorder);
    let value = |name: &str, label: Option<(&str, &str)>| {
        seen.iter()
            .find(|(key, _)| {
                let labels = key.strip_prefix(name).and_then(|rest| rest.strip_prefix('{')?.strip_suffix('}'));
                labels.is_some_and(|labels| {
                    label.is_none_or(|(k, v)| labels.split(',').any(|pair| pair == format!("{k}={v}")))
                })
            })
            .map(|(_, (value, _))| value)
            .unwrap_or_else(|| panic!("no {name} {label:?}"))
    };
    assert_eq!(*value(names::REQUESTS_TOTAL, Some(("outcome", "completed"))), DebugValue::Counter(1));
    assert_eq!(*value(names::REQUESTS_TOTAL, Some(("outcome", "cancelled"))), DebugValue::Counter(1));
    assert_eq!(*value(names::TOKENS_TOTAL, None), DebugValue::Counter(5));
    assert_eq!(*value(names::RETRIES_TOTAL, None), DebugValue::Counter(1));
    let DebugValue::Histogram(first) = value(names::TIME_TO_FIRST_TOKEN_SECONDS, None) else { panic!() };
    assert_eq!(first.len(), 1);
    assert_eq!(first[0], 0.025);
    let DebugValue::Histogram(between) = value(names::TIME_BETWEEN_TOKENS_SECONDS, None) else { panic!() };
    assert_eq!(between.len(), 4);
    let DebugValue::Histogram(idle) = value(names::PIPELINE_IDLE_SECONDS, None) else { panic!() };
    assert_eq!(idle.len(), 2, "one per generation, the cancelled one too");
    assert_eq!(*value(names::QUEUE_DEPTH, None), DebugValue::Gauge(0.0.into()));
    assert_eq!(*value(names::RUNNING, None), DebugValue::Gauge(0.0.into()));
}
