//! Eight requests decode at once on a deliberately small budget: watch backpressure, scope release and
//! the GC at work, then the books. Run with `cargo run -p usine-memory --example pressure`.

#![allow(clippy::print_stdout, reason = "an example prints what it shows")]

use std::time::Duration;

use tokio_stream::StreamExt;
use usine_memory::{ACTIVATIONS, Event, KV_CACHE, MemoryError, MemoryManager, ScopeId, StandardPools};

const REQUESTS: u64 = 8;
const TOKENS: u64 = 64;
/// Bytes of kv-cache one token adds (a small model: 2 x layers x heads x dim x 2 bytes).
const KV_PER_TOKEN: u64 = 16 * 1024;
/// Scratch space of one decode step.
const ACTIVATIONS_PER_STEP: u64 = 512 * 1024;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), MemoryError> {
    // 8 MiB in all: 70 % kv-cache, 25 % activations, 5 % uniforms.
    let memory = MemoryManager::with_standard_pools(&StandardPools::from_budget(8 << 20)?)?;
    let mut events = memory.subscribe();
    let watcher = tokio::spawn(async move {
        let (mut pressure, mut waits, mut lagged) = (0, 0, 0);
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Pressure { pool, used, capacity, level }) => {
                    pressure += 1;
                    if pressure <= 4 {
                        println!("  pressure {level:?} on `{pool}`: {used} of {capacity} bytes");
                    }
                }
                Ok(Event::WaitStarted { .. }) => waits += 1,
                Ok(_) => {}
                Err(missed) => lagged += missed.missed,
            }
        }
        (pressure, waits, lagged)
    });

    let mut requests = Vec::new();
    for request in 0..REQUESTS {
        let memory = memory.clone();
        requests.push(tokio::spawn(async move { decode(&memory, ScopeId::new(request)).await }));
    }
    for (request, outcome) in requests.into_iter().enumerate() {
        match outcome.await.expect("a request task does not panic") {
            Ok(tokens) => println!("request {request}: {tokens} tokens"),
            Err(error) => println!("request {request}: stopped: {error}"),
        }
    }

    // A lease nobody touches any more: the GC takes it back once it has been idle over 30 s.
    let forgotten = memory.allocate(KV_CACHE, 1 << 20, ScopeId::fresh())?;
    let reclaimed = memory.gc_now();
    println!("gc right away: {} leases reclaimed", reclaimed.leases);
    tokio::time::pause();
    tokio::time::advance(Duration::from_secs(31)).await;
    let reclaimed = memory.gc_now();
    println!(
        "gc after 31 s idle: {} lease, {} bytes reclaimed; the lease knows: revoked = {}",
        reclaimed.leases,
        reclaimed.bytes,
        forgotten.is_revoked()
    );

    println!(
        "\n{:<12} {:>9} {:>9} {:>9} {:>7} {:>6} {:>9} {:>9} {:>8}",
        "pool", "capacity", "used", "peak", "allocs", "frees", "reclaimed", "failures", "waited"
    );
    for pool in memory.stats().pools {
        println!(
            "{:<12} {:>9} {:>9} {:>9} {:>7} {:>6} {:>9} {:>9} {:>8.1?}",
            pool.name,
            pool.capacity,
            pool.used,
            pool.peak,
            pool.allocations,
            pool.frees,
            pool.reclaimed,
            pool.failures,
            pool.total_wait
        );
    }
    drop((memory, forgotten)); // the event stream ends with the last pool and lease
    let (pressure, waits, lagged) = watcher.await.expect("the watcher does not panic");
    println!("\n{pressure} pressure changes, {waits} waits, {lagged} events missed by the watcher");
    Ok(())
}

/// One request: its kv-cache grows token by token; each step waits for its activations.
async fn decode(memory: &MemoryManager, request: ScopeId) -> Result<u64, MemoryError> {
    let mut kv = memory.allocate(KV_CACHE, 0, request)?;
    for token in 0..TOKENS {
        if let Err(error) = kv.try_grow(KV_PER_TOKEN) {
            // Out of kv-cache: end the request early and give everything back at once.
            println!("request {}: kv-cache full after {token} tokens: {error}", request.get());
            memory.release_scope(request);
            return Ok(token);
        }
        let step = memory.allocate_wait(ACTIVATIONS, ACTIVATIONS_PER_STEP, request, Duration::from_millis(500)).await?;
        tokio::time::sleep(Duration::from_millis(2)).await; // the "GPU" step
        drop(step);
    }
    Ok(TOKENS)
}
