//! Writes the fixture graphs of the released schemas into `storage/tests/fixtures/`, as this version of
//! the store saves them. Run it only when a new format or schema is released, and commit the files; the
//! migration tests only read them (`cargo test -p usine-storage` never writes a fixture).

#![allow(clippy::print_stdout, reason = "the files written are the output")]

#[path = "../tests/fixtures/schemas.rs"]
#[allow(unreachable_pub, dead_code, reason = "shared with the tests, which use all of it")]
mod schemas;

use std::path::PathBuf;

use schemas::{V1, V2, fixture_key, released};
use usine_storage::{Migrations, StorageConfig, StorageManager};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let dir = tempfile::tempdir()?;
    let store = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new())?;
    let [(first, _), (second, _)] = released();
    let v1 = store.save(&fixture_key(1), &V1 { name: "fixture".into(), layers: 12 })?;
    let v2 = store.save(&fixture_key(2), &V2 { name: "fixture".into(), layers: 12, heads: 4 })?;
    for (saved, file) in [(v1.path, first), (v2.path, second)] {
        std::fs::copy(saved, fixtures.join(file))?;
        println!("wrote {}", fixtures.join(file).display());
    }
    Ok(())
}
