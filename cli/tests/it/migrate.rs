//! A graph of an older schema, as an earlier usine saved it, upgraded by `usine cache migrate` and by a
//! plain `usine run`, end to end. The fixture is the `webllm/tiny` graph that usine 0.1.0 wrote at the
//! simulated engines' schema 1 (`usine run -m tiny` with an empty cache, before schema 2).

use std::path::Path;

use crate::{stderr, stdout, usine};

/// The fixture's file name in the cache: the digest of its key, schema 1 included.
const SCHEMA_1_FILE: &str = "4ee4f08d746ab009ab4872aeb02b50b2.graph";

fn cache_with_the_old_graph(dir: &Path) {
    let graphs = dir.join("cache/graphs");
    std::fs::create_dir_all(&graphs).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/webllm-tiny-schema1.graph");
    std::fs::copy(fixture, graphs.join(SCHEMA_1_FILE)).unwrap();
}

/// The graph files in the cache.
fn graphs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("cache/graphs"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".graph"))
        .collect();
    names.sort();
    names
}

#[test]
fn cache_migrate_upgrades_an_old_schema_and_the_next_run_loads_it_without_compiling() {
    let dir = tempfile::tempdir().unwrap();
    cache_with_the_old_graph(dir.path());
    let migrate = usine(dir.path()).args(["cache", "migrate"]).output().unwrap();
    assert!(migrate.status.success(), "{}", stderr(&migrate));
    assert!(stdout(&migrate).starts_with("migrated webllm/tiny"), "{}", stdout(&migrate));
    assert!(stdout(&migrate).trim_end().ends_with(": schema 1 -> 2"), "{}", stdout(&migrate));
    let after = graphs(dir.path());
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after[0], SCHEMA_1_FILE, "the old file is replaced by the graph at schema 2");
    let again = usine(dir.path()).args(["cache", "migrate"]).output().unwrap();
    assert_eq!(stdout(&again), "nothing to do\n");

    let run = usine(dir.path()).args(["run", "--model", "tiny", "--max-tokens", "3", "Hi"]).output().unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(stderr(&run).contains("webllm/tiny: loaded from the compiled-graph cache"), "{}", stderr(&run));
    assert_eq!(graphs(dir.path()), after);
}

#[test]
fn a_run_upgrades_an_old_schema_on_read_instead_of_compiling() {
    let dir = tempfile::tempdir().unwrap();
    cache_with_the_old_graph(dir.path());
    let run = usine(dir.path()).args(["run", "--model", "tiny", "--max-tokens", "3", "Hi"]).output().unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(stderr(&run).contains("webllm/tiny: loaded from the compiled-graph cache"), "{}", stderr(&run));
    let after = graphs(dir.path());
    assert_eq!(after.len(), 1, "the upgraded graph replaces the old one: {after:?}");
    assert_ne!(after[0], SCHEMA_1_FILE);
}
