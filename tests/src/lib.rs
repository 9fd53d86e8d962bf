//! Shared helpers for the end-to-end tests: where fixtures live and how to import them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use edgetune_cli::import::{import, InputSpec, LowerOptions};
use edgetune_cli::model_file::AlignedBytes;
use edgetune_cli::pack::{pack, PlanReport};
use edgetune_cli::runner::Ours;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A file of the bundled digits fixtures.
pub fn digits(name: &str) -> PathBuf {
    repo().join("tests/fixtures/digits").join(name)
}

/// A file of the shared models folder that sits beside the checkout.
pub fn shared(rel: &str) -> PathBuf {
    repo().join("../shared/models").join(rel)
}

/// A model fetched by `scripts/fetch-models.sh` into the cache folder (`EDGETUNE_CACHE` or
/// `cache/`). Fails with the command to run when it is missing: a missing model is a failure,
/// never a skip.
pub fn cached(name: &str) -> Result<PathBuf> {
    let dir = std::env::var_os("EDGETUNE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("cache"));
    let p = dir.join(name);
    anyhow::ensure!(
        p.exists(),
        "{} is missing: run scripts/fetch-models.sh first",
        p.display()
    );
    Ok(p)
}

/// Imports an ONNX file with the given input shapes and loads the packed model.
pub fn import_model(path: &Path, inputs: &[&str]) -> Result<(Ours, PlanReport)> {
    let specs: Vec<InputSpec> = inputs.iter().map(|s| s.parse()).collect::<Result<_>>()?;
    let g = import(path, &specs, LowerOptions::default())
        .with_context(|| format!("importing {}", path.display()))?;
    let (bytes, plan) = pack(&g)?;
    Ok((Ours::from_bytes(AlignedBytes::from(&bytes[..]))?, plan))
}
