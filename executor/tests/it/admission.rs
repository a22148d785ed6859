//! Admission: at most N at once, a bounded queue served by priority, refusals at once, batches whole.

use std::sync::Arc;

use parking_lot::Mutex;
use usine_executor::{Event, ExecutorConfig, ExecutorError, Priority, Request};

use crate::{config, fixture};

fn small() -> ExecutorConfig {
    ExecutorConfig { max_concurrent: 1, queue_capacity: 2, ..config() }
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_refuses_at_once_with_the_figures() {
    let f = fixture(small());
    let _streams: Vec<_> =
        (0..3).map(|_| f.executor.generate(Request::prompt("lab", "Hi").max_tokens(50)).unwrap()).collect();
    let refused = f.executor.generate(Request::prompt("lab", "Hi")).unwrap_err();
    let ExecutorError::QueueFull { running, queued, capacity, refused: count } = refused else { panic!("{refused}") };
    assert_eq!((running, queued, capacity, count), (1, 2, 2, 1));
    assert_eq!(refused.code(), "queue_full");
    assert_eq!(
        refused.to_string(),
        "admission queue full: 2 of 2 places taken, 1 generations running; refused 1 request(s)"
    );
    let stats = f.executor.stats();
    assert_eq!((stats.running, stats.queued, stats.rejected), (1, 2, 1));
}

#[tokio::test(start_paused = true)]
async fn a_free_slot_goes_to_the_most_urgent_then_the_oldest() {
    let f = fixture(ExecutorConfig { max_concurrent: 1, queue_capacity: 8, ..config() });
    let _model = f.loaded().await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    let requests = [
        ("first", Priority::Normal),
        ("low", Priority::Low),
        ("normal-1", Priority::Normal),
        ("high", Priority::High),
        ("normal-2", Priority::Normal),
    ];
    for (name, priority) in requests {
        let stream = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(3).priority(priority)).unwrap();
        let order = Arc::clone(&order);
        readers.push(tokio::spawn(async move {
            let mut stream = stream;
            while let Some(event) = stream.next().await {
                if let Ok(Event::Started { .. }) = event {
                    order.lock().push(name);
                }
            }
        }));
    }
    for reader in readers {
        reader.await.unwrap();
    }
    assert_eq!(*order.lock(), ["first", "high", "normal-1", "normal-2", "low"]);
}

#[tokio::test(start_paused = true)]
async fn a_batch_is_admitted_whole_or_refused_whole() {
    let f = fixture(small());
    let batch = |n| (0..n).map(|_| Request::prompt("lab", "Hi").max_tokens(5)).collect::<Vec<_>>();
    let refused = f.executor.generate_batch(batch(4)).unwrap_err();
    assert!(matches!(refused, ExecutorError::QueueFull { refused: 4, .. }), "{refused}");
    assert_eq!((f.executor.stats().running, f.executor.stats().queued), (0, 0), "nothing half admitted");
    let streams = f.executor.generate_batch(batch(3)).unwrap();
    assert_eq!((f.executor.stats().running, f.executor.stats().queued), (1, 2));
    for stream in streams {
        assert_eq!(stream.output().await.unwrap().usage.generated_tokens, 5);
    }
    assert_eq!(f.executor.stats().completed, 3);
}

#[tokio::test(start_paused = true)]
async fn a_request_dropped_while_queued_leaves_the_queue_and_the_slot_passes_on() {
    let f = fixture(small());
    let _model = f.loaded().await;
    let first = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(5)).unwrap();
    let dropped = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(5)).unwrap();
    let last = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(5)).unwrap();
    tokio::task::yield_now().await;
    drop(dropped);
    tokio::task::yield_now().await;
    assert_eq!(f.executor.stats().queued, 1);
    first.output().await.unwrap();
    assert_eq!(last.output().await.unwrap().usage.generated_tokens, 5);
    let stats = f.executor.stats();
    assert_eq!((stats.running, stats.queued, stats.completed, stats.cancelled), (0, 0, 2, 1));
}

#[tokio::test(start_paused = true)]
async fn a_closed_executor_takes_no_new_work() {
    let f = fixture(config());
    f.executor.close();
    assert!(matches!(f.executor.generate(Request::prompt("lab", "Hi")), Err(ExecutorError::ShuttingDown)));
}

#[tokio::test(start_paused = true)]
async fn an_unknown_model_is_a_typed_error_in_the_stream() {
    let f = fixture(config());
    let error = f.executor.generate(Request::prompt("nope", "Hi")).unwrap().output().await.unwrap_err();
    assert_eq!(error.code(), "unknown_model");
    assert!(error.to_string().contains("unknown model `nope` (known: lab)"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn parameters_out_of_range_are_refused_with_the_limit() {
    let f = fixture(config());
    // Refused at once, before a place in the queue or a model load.
    let error = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(0)).unwrap_err();
    assert_eq!(error.code(), "invalid_request");
    assert_eq!((f.executor.stats().invalid, f.executor.stats().rejected), (1, 0));
    assert!(f.kernel.loaded().is_empty());
    assert!(error.to_string().contains("`max_tokens` is 0, outside 1..="), "{error}");
    let error = f.executor.generate(Request::prompt("lab", "Hi").max_tokens(5000)).unwrap().output().await.unwrap_err();
    assert!(
        error.to_string().contains("the prompt's 2 tokens and max_tokens 5000 exceed the context of 4096 tokens"),
        "{error}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_default_max_tokens_is_fitted_to_the_context_and_a_chosen_one_is_refused() {
    let f = crate::fixture_with_pools(config(), 8 << 20, 1 << 20); // room for the whole context
    let long = "x".repeat(4000); // 4,000 tokens of the 4,096 the model takes
    let refused = Request::prompt("lab", long.clone()).max_tokens(200);
    let error = f.executor.generate(refused).unwrap().output().await.unwrap_err();
    assert!(error.to_string().ends_with("max_tokens 96 would fit"), "{error}");
    let fitted = Request::prompt("lab", long.clone()).max_tokens(200).fit_to_context();
    let output = f.executor.generate(fitted).unwrap().output().await.unwrap();
    assert_eq!((output.usage.prompt_tokens, output.usage.generated_tokens), (4000, 96));
    let under = Request::prompt("lab", "Hi").max_tokens(5).fit_to_context();
    assert_eq!(f.executor.generate(under).unwrap().output().await.unwrap().usage.generated_tokens, 5, "untouched");
    let full = Request::prompt("lab", "x".repeat(4096)).max_tokens(5).fit_to_context();
    let error = f.executor.generate(full).unwrap().output().await.unwrap_err();
    assert!(error.to_string().ends_with("the prompt alone fills it"), "{error}");
}

#[tokio::test(start_paused = true)]
async fn within_a_batch_free_slots_go_to_the_most_urgent() {
    let f = fixture(ExecutorConfig { max_concurrent: 1, queue_capacity: 8, ..config() });
    let _model = f.loaded().await;
    let batch = vec![
        Request::prompt("lab", "Hi").max_tokens(2).priority(Priority::Low),
        Request::prompt("lab", "Hi").max_tokens(2).priority(Priority::High),
    ];
    let mut streams = f.executor.generate_batch(batch).unwrap().into_iter();
    let (low, high) = (streams.next().unwrap(), streams.next().unwrap());
    let (low, high) = tokio::join!(low.output(), high.output());
    assert_eq!(high.unwrap().usage.queued, std::time::Duration::ZERO, "the urgent one took the slot");
    assert!(low.unwrap().usage.queued > std::time::Duration::ZERO);
}

// Would catch: a request the client got wrong (422) counted as the server's failure.
#[tokio::test(start_paused = true)]
async fn a_prompt_over_the_context_is_counted_as_invalid_not_failed() {
    let f = fixture(config());
    // Five prompt tokens and 4,092 more overflow the lab's context of 4,096.
    let error =
        f.executor.generate(Request::prompt("lab", "Hello").max_tokens(4092)).unwrap().output().await.unwrap_err();
    assert_eq!(error.code(), "invalid_request");
    let stats = f.executor.stats();
    assert_eq!((stats.invalid, stats.failed, stats.rejected), (1, 0, 0), "{stats:?}");
}
