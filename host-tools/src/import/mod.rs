//! ONNX import: tract-onnx reads the file and resolves shapes; we lower its typed model.

pub mod lower;

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tract_onnx::prelude::*;

use crate::ir::Graph;
pub use lower::{LowerOptions, UnsupportedOps};

/// A concrete input shape given by the user: `name=1x3x48x192`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSpec {
    /// Input name (as in the ONNX file).
    pub name: String,
    /// Concrete dimensions.
    pub dims: Vec<usize>,
}

impl std::str::FromStr for InputSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<InputSpec> {
        let (name, dims) = s
            .split_once('=')
            .ok_or_else(|| anyhow!("expected name=1x3x224x224, got {s:?}"))?;
        let dims = dims
            .split(['x', ','])
            .map(|d| {
                d.trim()
                    .parse::<usize>()
                    .map_err(|_| anyhow!("bad dimension {d:?} in {s:?}"))
            })
            .collect::<Result<Vec<_>>>()?;
        if dims.is_empty() || dims.contains(&0) {
            bail!("dimensions must be positive in {s:?}");
        }
        Ok(InputSpec {
            name: name.to_string(),
            dims,
        })
    }
}

/// Loads an ONNX file with concrete input shapes (from `specs`, else from the file) into a typed
/// tract model. The same function builds the reference model `eval` and `bench` compare with.
pub fn load_typed(path: &Path, specs: &[InputSpec]) -> Result<TypedModel> {
    let mut model = tract_onnx::onnx()
        .with_ignore_value_info(true)
        .model_for_path(path)
        .map_err(|e| anyhow!("{e:?}"))
        .with_context(|| format!("loading ONNX model {}", path.display()))?;
    let n_inputs = model.input_outlets()?.len();
    let names: Vec<String> = (0..n_inputs)
        .map(|i| {
            model
                .node(model.input_outlets().unwrap()[i].node)
                .name
                .clone()
        })
        .collect();
    for spec in specs {
        if !names.contains(&spec.name) {
            bail!(
                "--input {}: the model has no input of that name (inputs: {})",
                spec.name,
                names.join(", ")
            );
        }
    }
    for (i, name) in names.iter().enumerate() {
        let fact = model.input_fact(i)?.clone();
        let dt = fact
            .datum_type()
            .ok_or_else(|| anyhow!("input {name}: unknown element type"))?;
        let shape: Vec<usize> = match specs.iter().find(|s| &s.name == name) {
            Some(s) => s.dims.clone(),
            None => {
                let dims = fact.shape.as_concrete_finite().ok().flatten().ok_or_else(|| {
                    anyhow!("input {name} has a symbolic or unknown shape ({:?}); give it with --input {name}=AxBx...", fact.shape)
                })?;
                dims.to_vec()
            }
        };
        model.set_input_fact(i, InferenceFact::dt_shape(dt, &shape))?;
    }
    let typed = model
        .into_typed()
        .map_err(|e| anyhow!("{e:?}"))
        .context("resolving types and shapes")?
        .into_decluttered()
        .map_err(|e| anyhow!("{e:?}"))
        .context("decluttering")?;
    Ok(typed)
}

/// Imports an ONNX file into an optimized edgetune graph.
pub fn import(path: &Path, specs: &[InputSpec], opts: LowerOptions) -> Result<Graph> {
    let typed = load_typed(path, specs)?;
    let mut g = lower::lower(&typed, opts)?;
    crate::passes::optimize(&mut g);
    g.meta.push((
        "producer".into(),
        format!("edgetune {}", env!("CARGO_PKG_VERSION")),
    ));
    g.meta.push((
        "source".into(),
        path.file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default(),
    ));
    Ok(g)
}
