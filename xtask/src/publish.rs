//! `cargo xtask publish`: the library crates are ready for crates.io. `cargo publish --dry-run
//! --workspace` packages each one and builds it from its package alone (what crates.io would hold:
//! no file from outside the crate, every dependency with a version); then `xtask/consumer`, a program
//! outside the workspace written from usine-memory's and usine-storage's READMEs alone, is built and
//! run (against the crates' folders, by path: what it checks is the documented interface).

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{Context as _, Result, ensure};

pub(crate) fn run(root: &Path) -> Result<ExitCode> {
    forget_earlier_packages(root)?;
    // ... and what it built of them, which cargo never rebuilds (a registry's sources are immutable):
    // the dry run builds in a folder of its own, emptied first.
    let built = root.join("target").join("publish");
    if built.exists() {
        std::fs::remove_dir_all(&built).with_context(|| format!("removing {}", built.display()))?;
    }
    eprintln!("publish: cargo publish --dry-run --workspace");
    let status = Command::new(env!("CARGO"))
        .args(["publish", "--dry-run", "--workspace", "--allow-dirty", "--quiet"])
        .env("CARGO_TARGET_DIR", &built)
        .current_dir(root)
        .status()
        .context("running cargo publish")?;
    ensure!(status.success(), "cargo publish --dry-run --workspace failed");
    eprintln!("publish: the consumer of usine-memory and usine-storage (xtask/consumer)");
    let status = Command::new(env!("CARGO"))
        .args(["run", "--quiet", "--locked", "--manifest-path"])
        .arg(root.join("xtask/consumer/Cargo.toml"))
        .env("CARGO_TARGET_DIR", root.join("target").join("consumer"))
        .status()
        .context("running the consumer")?;
    ensure!(status.success(), "the consumer of usine-memory and usine-storage failed");
    eprintln!("publish: every library crate packages and builds alone, and the consumer runs");
    Ok(ExitCode::SUCCESS)
}

/// Removes the workspace's packages that an earlier dry run left extracted in cargo's cache. The dry
/// run builds each package against the others from a local registry, which cargo extracts under
/// `$CARGO_HOME/registry/src/-<hash>/` by name and version only: a second run would build against the
/// first run's sources (same version, other code). Only the workspace's own packages at their versions
/// go, only real folders (no link is followed), only under local registries (`-` folders).
fn forget_earlier_packages(root: &Path) -> Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new().current_dir(root).no_deps().exec()?;
    let ours: Vec<String> =
        metadata.workspace_packages().iter().map(|package| format!("{}-{}", package.name, package.version)).collect();
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .context("no CARGO_HOME nor HOME")?;
    let Ok(registries) = std::fs::read_dir(home.join("registry").join("src")) else { return Ok(()) };
    for registry in registries {
        let registry = registry?;
        // Local registries' folders start with `-`; crates.io's with its host name.
        if !registry.file_type()?.is_dir() || !registry.file_name().to_string_lossy().starts_with('-') {
            continue;
        }
        for package in std::fs::read_dir(registry.path())? {
            let package = package?;
            if package.file_type()?.is_dir() && ours.iter().any(|name| package.file_name().to_string_lossy() == *name) {
                let path = package.path();
                std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    Ok(())
}
