//! `cargo xtask tidy`: the architecture invariants of ARCHITECTURE.md, checked on the real workspace.
//!
//! - Layers: a crate depends only on the workspace crates its row of ARCHITECTURE.md's layer table
//!   allows ([`layers`] reads it: the table is the one source).
//! - No library crate reaches `metrics-exporter-prometheus`, `tracing-subscriber`, `clap`, `axum` or
//!   `anyhow`, even through a third-party crate; only the applications (`usine-cli`, `xtask`,
//!   `usine-tests`) may.
//! - Every crate takes the workspace lints, and every Rust file opens with a `//!` line saying what it is for
//!   (a library's `lib.rs` may include its README as its crate docs instead).
//!
//! The checks are pure functions over a small [`Workspace`] model, so that their tests can feed them
//! broken workspaces; [`Workspace::load`] fills the model from `cargo metadata`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cargo_metadata::{DependencyKind, MetadataCommand};

/// A row of the layer table: a crate, and the workspace crates it may depend on (any kind: normal,
/// build or dev); `None` for every one.
pub(crate) type Layer = (String, Option<Vec<String>>);

/// The layer table, read from ARCHITECTURE.md (its one source): the rows of the table whose header is
/// `| folder | package | may depend on |`, each naming its package and the packages it may reach in
/// backticks, or `everything` or `nothing`.
pub(crate) fn layers(architecture: &str) -> Result<Vec<Layer>> {
    let ticked = |cell: &str| -> Vec<String> { cell.split('`').skip(1).step_by(2).map(str::to_owned).collect() };
    let mut lines = architecture.lines().skip_while(|line| !line.starts_with("| folder | package | may depend on |"));
    lines.next().context("ARCHITECTURE.md has no layer table (`| folder | package | may depend on |`)")?;
    let mut layers = Vec::new();
    for line in lines.skip(1).take_while(|line| line.starts_with('|')) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (Some(package), Some(allowed)) = (cells.get(2), cells.get(3)) else {
            anyhow::bail!("a layer row without its cells: {line}");
        };
        let package =
            ticked(package).into_iter().next().with_context(|| format!("a layer row names no package: {line}"))?;
        let allowed = if allowed.starts_with("everything") { None } else { Some(ticked(allowed)) };
        layers.push((package, allowed));
    }
    anyhow::ensure!(!layers.is_empty(), "ARCHITECTURE.md's layer table has no rows");
    Ok(layers)
}

/// Crates that belong to applications: reaching them from a library is a violation.
pub(crate) const APPLICATION_ONLY: &[&str] =
    &["metrics-exporter-prometheus", "tracing-subscriber", "clap", "axum", "anyhow"];

/// The crates allowed to use [`APPLICATION_ONLY`] crates.
const APPLICATIONS: &[&str] = &["usine-cli", "usine-tests", "xtask"];

/// What the checks need to know of the workspace.
#[derive(Debug, Default)]
pub(crate) struct Workspace {
    /// Workspace crates, by name, with their folder.
    pub(crate) members: BTreeMap<String, PathBuf>,
    /// Direct dependencies of each workspace crate on other workspace crates, all kinds.
    pub(crate) internal: BTreeMap<String, BTreeSet<String>>,
    /// The resolved graph of normal and build dependencies (what a user of the crate compiles), by name.
    pub(crate) graph: BTreeMap<String, BTreeSet<String>>,
}

impl Workspace {
    /// Reads the workspace whose root manifest is in `root`.
    pub(crate) fn load(root: &Path) -> Result<Self> {
        let metadata =
            MetadataCommand::new().manifest_path(root.join("Cargo.toml")).exec().context("running `cargo metadata`")?;
        let members: BTreeSet<_> = metadata.workspace_members.iter().collect();
        let mut workspace = Self::default();
        let mut names = BTreeMap::new();
        for package in &metadata.packages {
            names.insert(&package.id, package.name.to_string());
            if !members.contains(&package.id) {
                continue;
            }
            let folder = package.manifest_path.parent().context("a manifest has a folder")?;
            workspace.members.insert(package.name.to_string(), folder.as_std_path().to_owned());
        }
        for package in metadata.packages.iter().filter(|package| members.contains(&package.id)) {
            let internal = package
                .dependencies
                .iter()
                .filter(|dependency| workspace.members.contains_key(&dependency.name))
                .map(|dependency| dependency.name.clone())
                .collect();
            workspace.internal.insert(package.name.to_string(), internal);
        }
        let resolve = metadata.resolve.context("`cargo metadata` resolved no graph")?;
        for node in &resolve.nodes {
            let compiled = node
                .deps
                .iter()
                .filter(|dep| dep.dep_kinds.iter().any(|info| info.kind != DependencyKind::Development))
                .map(|dep| names[&dep.pkg].clone());
            workspace.graph.entry(names[&node.id].clone()).or_default().extend(compiled);
        }
        Ok(workspace)
    }
}

/// Violations of the layer table: unknown crates, and dependencies their row does not allow.
pub(crate) fn check_layers(workspace: &Workspace, layers: &[Layer]) -> Vec<String> {
    let layers: BTreeMap<&str, &Option<Vec<String>>> =
        layers.iter().map(|(krate, allowed)| (krate.as_str(), allowed)).collect();
    let mut violations = Vec::new();
    for (krate, deps) in &workspace.internal {
        let Some(allowed) = layers.get(krate.as_str()) else {
            violations.push(format!("`{krate}` is not in the layer table of ARCHITECTURE.md"));
            continue;
        };
        let Some(allowed) = allowed else { continue };
        // A crate may name itself (a dev-dependency that turns on its own test features).
        for dep in deps.iter().filter(|dep| *dep != krate && !allowed.contains(dep)) {
            violations.push(format!("`{krate}` depends on `{dep}`, a layer it may not reach (allowed: {allowed:?})"));
        }
    }
    violations
}

/// Violations of "no library reaches an application-only crate", with the path that reaches it.
pub(crate) fn check_application_only(workspace: &Workspace) -> Vec<String> {
    let mut violations = Vec::new();
    for krate in workspace.members.keys().filter(|krate| !APPLICATIONS.contains(&krate.as_str())) {
        // Breadth first, remembering how each crate was reached, to print the shortest path.
        let mut via: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = VecDeque::from([krate.as_str()]);
        while let Some(current) = queue.pop_front() {
            for dep in workspace.graph.get(current).into_iter().flatten() {
                if dep == krate || via.contains_key(dep.as_str()) {
                    continue;
                }
                via.insert(dep, current);
                if APPLICATION_ONLY.contains(&dep.as_str()) {
                    let mut path = vec![dep.as_str()];
                    while let Some(&previous) = via.get(path[path.len() - 1]) {
                        path.push(previous);
                    }
                    path.reverse();
                    violations.push(format!(
                        "library `{krate}` reaches `{dep}`, which only applications may use: {}",
                        path.join(" -> ")
                    ));
                } else {
                    queue.push_back(dep);
                }
            }
        }
    }
    violations
}

/// Crates whose manifest does not take the workspace lints.
pub(crate) fn check_lints(workspace: &Workspace) -> Result<Vec<String>> {
    let mut violations = Vec::new();
    for (krate, folder) in &workspace.members {
        let manifest = std::fs::read_to_string(folder.join("Cargo.toml"))?;
        if !manifest.contains("[lints]\nworkspace = true") {
            violations.push(format!("`{krate}` does not say `[lints] workspace = true` in its Cargo.toml"));
        }
    }
    Ok(violations)
}

/// Rust files that do not open with a `//!` line.
pub(crate) fn check_file_docs(workspace: &Workspace) -> Result<Vec<String>> {
    let mut violations = Vec::new();
    for folder in workspace.members.values() {
        for file in rust_files(folder)? {
            let text = std::fs::read_to_string(&file)?;
            // A library's crate docs may be its README (what crates.io shows), included whole.
            let readme = file.ends_with("src/lib.rs") && text.starts_with("#![doc = include_str!(\"../README.md\")]");
            if !text.starts_with("//!") && !readme {
                violations.push(format!("{} does not open with a `//!` line saying what it is for", file.display()));
            }
        }
    }
    Ok(violations)
}

/// The `.rs` files of a crate's folder, skipping build output and nested crates.
fn rust_files(folder: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![folder.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                let nested_crate = path.join("Cargo.toml").exists();
                if !nested_crate && path.file_name().is_some_and(|name| name != "target") {
                    pending.push(path);
                }
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Every check on the workspace in `root`.
pub(crate) fn run(root: &Path) -> Result<Vec<String>> {
    let workspace = Workspace::load(root)?;
    let architecture = std::fs::read_to_string(root.join("ARCHITECTURE.md")).context("reading ARCHITECTURE.md")?;
    let mut violations = check_layers(&workspace, &layers(&architecture)?);
    violations.extend(check_application_only(&workspace));
    violations.extend(check_lints(&workspace)?);
    violations.extend(check_file_docs(&workspace)?);
    Ok(violations)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This workspace's layer table.
    fn table() -> Vec<Layer> {
        layers(include_str!("../../ARCHITECTURE.md")).unwrap()
    }

    fn check_layers(workspace: &Workspace) -> Vec<String> {
        super::check_layers(workspace, &table())
    }

    #[test]
    fn the_layer_table_reads_from_architecture_md() {
        let table = table();
        let row = |krate: &str| table.iter().find(|(name, _)| name == krate).map(|(_, allowed)| allowed.clone());
        assert_eq!(row("usine-engine"), Some(Some(Vec::new())), "nothing");
        assert_eq!(row("usine-memory"), Some(Some(vec!["usine-engine".to_owned()])), "a note in words is not a crate");
        assert_eq!(row("usine-cli"), Some(None), "everything");
        let kernel = row("usine-kernel").unwrap().unwrap();
        assert_eq!(kernel, ["usine-memory", "usine-storage", "usine-engine"]);
        assert!(layers("no table here").is_err());
    }

    fn workspace(internal: &[(&str, &[&str])], graph: &[(&str, &[&str])]) -> Workspace {
        let set = |names: &[&str]| names.iter().map(|name| name.to_string()).collect();
        Workspace {
            members: internal.iter().map(|(name, _)| (name.to_string(), PathBuf::new())).collect(),
            internal: internal.iter().map(|(name, deps)| (name.to_string(), set(deps))).collect(),
            graph: graph.iter().map(|(name, deps)| (name.to_string(), set(deps))).collect(),
        }
    }

    #[test]
    fn this_workspace_is_tidy() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace root");
        let violations = run(root).unwrap();
        assert!(violations.is_empty(), "tidy found:\n{}", violations.join("\n"));
    }

    #[test]
    fn this_workspace_is_read_whole() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let workspace = Workspace::load(root).unwrap();
        assert!(workspace.members.contains_key("usine-memory"));
        assert!(workspace.graph["xtask"].contains("anyhow"), "the graph follows normal dependencies");
        assert!(
            !workspace.graph["usine-memory"].contains("proptest"),
            "dev-dependencies do not reach a library's users"
        );
    }

    #[test]
    fn a_lower_layer_reaching_a_higher_one_is_reported() {
        let bad = workspace(&[("usine-memory", &["usine-kernel"]), ("usine-kernel", &["usine-memory"])], &[]);
        let violations = check_layers(&bad);
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(violations[0].contains("`usine-memory` depends on `usine-kernel`"));
    }

    #[test]
    fn the_kernel_may_not_name_a_concrete_engine() {
        let bad = workspace(&[("usine-kernel", &["usine-engine", "usine-engine-webllm"])], &[]);
        assert_eq!(check_layers(&bad).len(), 1);
    }

    #[test]
    fn a_crate_may_name_itself_for_its_own_test_features() {
        let fine = workspace(&[("usine-engine", &["usine-engine"])], &[]);
        assert!(check_layers(&fine).is_empty());
    }

    #[test]
    fn an_unknown_crate_must_join_the_table() {
        let bad = workspace(&[("usine-surprise", &[])], &[]);
        assert!(check_layers(&bad)[0].contains("not in the layer table"));
    }

    #[test]
    fn applications_may_depend_on_everything() {
        let fine = workspace(&[("usine-cli", &["usine-memory", "usine-kernel"]), ("usine-tests", &["usine-cli"])], &[]);
        assert!(check_layers(&fine).is_empty());
    }

    #[test]
    fn a_library_reaching_anyhow_through_a_third_party_crate_is_reported_with_the_path() {
        let bad = workspace(
            &[("usine-storage", &[]), ("usine-cli", &[])],
            &[
                ("usine-storage", &["helper"]),
                ("helper", &["anyhow"]),
                ("usine-cli", &["clap", "axum", "metrics-exporter-prometheus"]),
            ],
        );
        let violations = check_application_only(&bad);
        assert_eq!(
            violations,
            [
                "library `usine-storage` reaches `anyhow`, which only applications may use: usine-storage -> helper -> anyhow"
            ]
        );
    }

    #[test]
    fn every_application_only_crate_is_caught_in_a_library() {
        for forbidden in APPLICATION_ONLY {
            let bad = workspace(&[("usine-memory", &[])], &[("usine-memory", &[forbidden])]);
            assert_eq!(check_application_only(&bad).len(), 1, "{forbidden}");
        }
    }
}
