//! A save the file system refuses (a full disk, a quota): the error names the file and the cause, no
//! temporary file is left behind, the graph saved before is still served, and the next save succeeds.
//! The refusal is real: the test runs itself in a child process whose file size limit (`ulimit -f`,
//! 1 MiB) makes the kernel fail the write with `EFBIG`, as a full disk fails it with `ENOSPC`.

use serde::{Deserialize, Serialize};
use usine_storage::{Lookup, Migrations, StorageConfig, StorageError, StorageManager};

use crate::key;

const CHILD_DIR: &str = "USINE_TEST_FULL_DISK_DIR";

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Blob {
    #[serde(with = "serde_bytes")]
    bytes: Vec<u8>,
}

fn blob(len: usize, fill: u8) -> Blob {
    Blob { bytes: vec![fill; len] }
}

const SMALL: usize = 64 << 10;
const LARGE: usize = 8 << 20;

#[test]
fn a_refused_save_is_an_error_that_leaves_the_previous_graph_and_no_temporary_file() {
    if let Some(dir) = std::env::var_os(CHILD_DIR) {
        // The child, limited to files of 1 MiB.
        let store = StorageManager::open(StorageConfig::at(&dir), Migrations::new()).unwrap();
        store.save(&key("full"), &blob(SMALL, 1)).unwrap();
        let error = store.save(&key("full"), &blob(LARGE, 2)).unwrap_err();
        let StorageError::Io { source, path, .. } = &error else { panic!("not an I/O error: {error}") };
        assert_eq!(source.raw_os_error(), Some(27), "EFBIG: {error}"); // File too large
        assert!(path.starts_with(store.graphs_dir()), "the error names the file: {error}");
        let temporaries: Vec<_> = std::fs::read_dir(store.graphs_dir())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(".tmp-"))
            .collect();
        assert!(temporaries.is_empty(), "a refused save left {temporaries:?}");
        let Lookup::Hit(hit) = store.get::<Blob>(&key("full")).unwrap() else { panic!("the saved graph is gone") };
        assert_eq!(hit.graph, blob(SMALL, 1));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("sh")
        // A limit exceeded sends SIGXFSZ, which would kill the child; ignored, the write fails instead.
        .args(["-c", "trap '' XFSZ; ulimit -f 2048; exec \"$0\" \"$@\""])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "full::a_refused_save_is_an_error_that_leaves_the_previous_graph_and_no_temporary_file"])
        .args(["--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "the child with a full disk failed: {status}");
    // The next run, with room again: the same save succeeds and replaces the old graph.
    let store = StorageManager::open(StorageConfig::at(dir.path()), Migrations::new()).unwrap();
    store.save(&key("full"), &blob(LARGE, 2)).unwrap();
    let Lookup::Hit(hit) = store.get::<Blob>(&key("full")).unwrap() else { panic!("not saved") };
    assert_eq!(hit.graph, blob(LARGE, 2));
}
