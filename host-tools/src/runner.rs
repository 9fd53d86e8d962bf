//! Running a model on host data: our runtime and, as the reference, tract on the ONNX file.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use edgetune_core::adapter::{Entry, EntryKind};
use edgetune_core::{DType, Model};
use edgetune_runtime::adapter::lora_workspace;
use edgetune_runtime::adapter::Adapter;
use edgetune_runtime::kernels::Kernels;
use edgetune_runtime::Session;
use tract_onnx::prelude::*;

use crate::import::{load_typed, InputSpec};
use crate::model_file::AlignedBytes;
use crate::npy::{Array, ArrayData};

/// A loaded `.etm` model with its arena, ready to run repeatedly.
pub struct Ours {
    bytes: AlignedBytes,
    arena: AlignedBytes,
    /// Kernels used.
    pub kernels: Kernels,
    /// Adapter applied on every run, if any.
    pub adapter: Option<HostAdapter>,
}

/// Name, element type and shape of a graph input.
#[derive(Debug, Clone)]
pub struct InputInfo {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl Ours {
    /// Loads and validates a model file.
    pub fn load(path: &Path) -> Result<Ours> {
        Self::from_bytes(AlignedBytes::read(path)?)
    }

    /// Validates model bytes.
    pub fn from_bytes(bytes: AlignedBytes) -> Result<Ours> {
        let model =
            Model::from_bytes(bytes.as_bytes()).map_err(|e| anyhow!("invalid model: {e}"))?;
        let arena = AlignedBytes::zeroed(model.arena_bytes() as usize);
        Ok(Ours {
            bytes,
            arena,
            kernels: Kernels::best(),
            adapter: None,
        })
    }

    /// The validated model.
    pub fn model(&self) -> Model<'_> {
        // SAFETY: `bytes` passed `Model::from_bytes` in `from_bytes` and is never mutated.
        unsafe { Model::from_validated_bytes(self.bytes.as_bytes()) }
    }

    /// The file bytes.
    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_bytes()
    }

    /// Graph inputs.
    pub fn inputs(&self) -> Vec<InputInfo> {
        let m = self.model();
        m.inputs()
            .map(|io| {
                let t = m.tensor(io.tensor);
                InputInfo {
                    name: io.name.to_string(),
                    dtype: t.meta.dtype,
                    shape: t.meta.shape.dims().iter().map(|&d| d as usize).collect(),
                }
            })
            .collect()
    }

    /// Runs on one batch (arrays in input order, shapes equal to the model's) and returns every
    /// output as f32 with its shape.
    pub fn run(&mut self, inputs: &[Array]) -> Result<Vec<Array>> {
        self.run_observed(inputs, |_, _| {})
    }

    /// [`Ours::run`] with an adapter applied.
    pub fn run_adapter(
        &mut self,
        inputs: &[Array],
        adapter: Option<&mut Adapter<'_>>,
    ) -> Result<Vec<Array>> {
        self.run_inner(inputs, adapter, |_, _| {})
    }

    /// [`Ours::run`], calling `after(op_index, session)` after every op (calibration).
    pub fn run_observed(
        &mut self,
        inputs: &[Array],
        after: impl FnMut(u32, &Session<'_, '_>),
    ) -> Result<Vec<Array>> {
        self.run_inner(inputs, None, after)
    }

    /// Loads an adapter (`.eta`) to apply on every run.
    pub fn load_adapter(&mut self, path: &std::path::Path) -> Result<()> {
        // SAFETY: `bytes` passed `Model::from_bytes` in `from_bytes` and is never mutated.
        let model = unsafe { Model::from_validated_bytes(self.bytes.as_bytes()) };
        self.adapter = Some(HostAdapter::load(path, &model)?);
        Ok(())
    }

    fn run_inner(
        &mut self,
        inputs: &[Array],
        adapter: Option<&mut Adapter<'_>>,
        mut after: impl FnMut(u32, &Session<'_, '_>),
    ) -> Result<Vec<Array>> {
        // SAFETY: as in `model`.
        let model = unsafe { Model::from_validated_bytes(self.bytes.as_bytes()) };
        let mut s = Session::with_kernels(&model, self.arena.as_bytes_mut(), self.kernels)?;
        for (i, a) in inputs.iter().enumerate() {
            match &a.data {
                ArrayData::F32(v) => s.set_input(i, v)?,
                ArrayData::I64(v) => s.set_input(i, v)?,
                ArrayData::Bool(v) => s.set_input(i, v)?,
            }
        }
        match (adapter, self.adapter.as_mut()) {
            (Some(ad), _) => s.run_with(Some(ad))?,
            (None, Some(h)) => s.run_with(Some(&mut h.adapter(&model)?))?,
            (None, None) => s.run_observed(&mut after)?,
        }
        let mut out = Vec::new();
        for (i, io) in model.outputs().enumerate() {
            let t = model.tensor(io.tensor);
            let shape: Vec<usize> = t.meta.shape.dims().iter().map(|&d| d as usize).collect();
            let data = match t.meta.dtype {
                DType::F32 => s.output::<f32>(i)?.to_vec(),
                DType::I64 => s.output::<i64>(i)?.iter().map(|&v| v as f32).collect(),
                DType::I32 => s.output::<i32>(i)?.iter().map(|&v| v as f32).collect(),
                _ => s.output::<u8>(i)?.iter().map(|&v| v as f32).collect(),
            };
            out.push(Array {
                shape,
                data: ArrayData::F32(data),
            });
        }
        Ok(out)
    }
}

/// A host adapter: entries and owned buffers, turned into a runtime [`Adapter`] on demand.
#[derive(Debug, Clone)]
pub struct HostAdapter {
    /// Entries.
    pub entries: Vec<Entry>,
    /// Values.
    pub values: Vec<f32>,
    /// Workspace.
    pub work: Vec<f32>,
}

impl HostAdapter {
    /// Builds from entries and values for `model`.
    pub fn new(model: &Model<'_>, entries: Vec<Entry>, values: Vec<f32>) -> HostAdapter {
        let work_len = entries
            .iter()
            .filter(|e| e.kind == EntryKind::LoraA)
            .map(|e| lora_workspace(model, e.op, e.rank))
            .max()
            .unwrap_or(0);
        HostAdapter {
            entries,
            values,
            work: vec![0.0; work_len],
        }
    }

    /// Loads a `.eta` file checked against `model`.
    pub fn load(path: &Path, model: &Model<'_>) -> Result<HostAdapter> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let view = edgetune_core::adapter::AdapterView::from_bytes(&bytes, model)
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let entries: Vec<Entry> = (0..view.len()).map(|i| view.entry(i)).collect();
        let values: Vec<f32> = (0..view.value_count()).map(|i| view.value(i)).collect();
        Ok(HostAdapter::new(model, entries, values))
    }

    /// The runtime view over these buffers.
    pub fn adapter<'a>(&'a mut self, model: &Model<'_>) -> Result<Adapter<'a>> {
        Adapter::from_parts(model, &self.entries, &mut self.values, &mut self.work)
            .map_err(|e| anyhow!("{e}"))
    }

    /// The `.eta` bytes for `model`.
    pub fn to_bytes(&self, model: &Model<'_>) -> Result<Vec<u8>> {
        let mut out =
            vec![0u8; edgetune_core::adapter::adapter_len(self.entries.len(), self.values.len())];
        let n = edgetune_core::adapter::write_adapter(&self.entries, &self.values, model, &mut out)
            .map_err(|e| anyhow!("{e}"))?
            .len();
        out.truncate(n);
        Ok(out)
    }
}

/// tract running the ONNX file with the same concrete input shapes.
pub struct Reference {
    plan: Arc<TypedRunnableModel>,
    /// For each tract input, the index of the matching caller input.
    order: Vec<usize>,
}

impl Reference {
    /// Loads `path` with the given input shapes and optimizes it as tract users do.
    pub fn load(path: &Path, inputs: &[InputInfo]) -> Result<Reference> {
        let specs: Vec<InputSpec> = inputs
            .iter()
            .map(|i| InputSpec {
                name: i.name.clone(),
                dims: i.shape.clone(),
            })
            .collect();
        let typed = load_typed(path, &specs)?;
        let order = typed
            .input_outlets()?
            .iter()
            .map(|o| {
                let name = &typed.node(o.node).name;
                inputs
                    .iter()
                    .position(|i| &i.name == name)
                    .ok_or_else(|| anyhow!("reference model input {name} has no data"))
            })
            .collect::<Result<Vec<_>>>()?;
        let plan = typed
            .into_optimized()
            .map_err(|e| anyhow!("{e:?}"))
            .context("tract optimisation")?
            .into_runnable()
            .map_err(|e| anyhow!("{e:?}"))?;
        Ok(Reference { plan, order })
    }

    /// Runs one batch.
    pub fn run(&self, inputs: &[Array]) -> Result<Vec<Array>> {
        let tv: TVec<TValue> = self
            .order
            .iter()
            .map(|&i| to_tensor(&inputs[i]))
            .collect::<Result<_>>()?;
        let out = self.plan.run(tv).map_err(|e| anyhow!("tract: {e:?}"))?;
        out.iter()
            .map(|t| {
                let f = t.cast_to::<f32>().map_err(|e| anyhow!("{e:?}"))?;
                Ok(Array {
                    shape: t.shape().to_vec(),
                    data: ArrayData::F32(
                        f.to_plain_array_view::<f32>()
                            .map_err(|e| anyhow!("{e:?}"))?
                            .iter()
                            .copied()
                            .collect(),
                    ),
                })
            })
            .collect()
    }
}

fn to_tensor(a: &Array) -> Result<TValue> {
    let t = match &a.data {
        ArrayData::F32(v) => {
            tract_ndarray::ArrayD::from_shape_vec(a.shape.clone(), v.clone())?.into_tensor()
        }
        ArrayData::I64(v) => {
            tract_ndarray::ArrayD::from_shape_vec(a.shape.clone(), v.clone())?.into_tensor()
        }
        ArrayData::Bool(v) => tract_ndarray::ArrayD::from_shape_vec(
            a.shape.clone(),
            v.iter().map(|&b| b != 0).collect::<Vec<bool>>(),
        )?
        .into_tensor(),
    };
    Ok(t.into_tvalue())
}

/// Cuts data arrays (leading axis = samples) into batches of the model's input shapes; the last
/// batch is padded with copies of the final sample. Returns the batches and the sample count.
pub fn batches(inputs: &[InputInfo], data: &[Array]) -> Result<(Vec<Vec<Array>>, usize)> {
    if inputs.len() != data.len() {
        bail!(
            "the model has {} inputs, {} data arrays given",
            inputs.len(),
            data.len()
        );
    }
    let mut samples = None;
    for (info, a) in inputs.iter().zip(data) {
        let per: usize = info.shape[1..].iter().product();
        let n = a.shape.first().copied().unwrap_or(0);
        let tail: usize = a.shape[1..].iter().product();
        if tail != per || a.shape.len() != info.shape.len() {
            bail!("input {}: data shape {:?} does not match the model's {:?} (leading axis = samples)", info.name, a.shape, info.shape);
        }
        if *samples.get_or_insert(n) != n {
            bail!("data arrays hold different sample counts");
        }
    }
    let n = samples.unwrap_or(0);
    if n == 0 {
        bail!("no samples");
    }
    let b = inputs[0].shape[0];
    let mut out = Vec::new();
    for start in (0..n).step_by(b) {
        let mut batch = Vec::new();
        for (info, a) in inputs.iter().zip(data) {
            let per: usize = info.shape[1..].iter().product();
            let idx = |j: usize| (start + j).min(n - 1);
            let data = match &a.data {
                ArrayData::F32(v) => ArrayData::F32(
                    (0..b)
                        .flat_map(|j| v[idx(j) * per..(idx(j) + 1) * per].to_vec())
                        .collect(),
                ),
                ArrayData::I64(v) => ArrayData::I64(
                    (0..b)
                        .flat_map(|j| v[idx(j) * per..(idx(j) + 1) * per].to_vec())
                        .collect(),
                ),
                ArrayData::Bool(v) => ArrayData::Bool(
                    (0..b)
                        .flat_map(|j| v[idx(j) * per..(idx(j) + 1) * per].to_vec())
                        .collect(),
                ),
            };
            let data = match (info.dtype, data) {
                (DType::I64, ArrayData::F32(v)) => {
                    ArrayData::I64(v.iter().map(|&x| x as i64).collect())
                }
                (DType::F32, ArrayData::I64(v)) => {
                    ArrayData::F32(v.iter().map(|&x| x as f32).collect())
                }
                (_, d) => d,
            };
            batch.push(Array {
                shape: info.shape.clone(),
                data,
            });
        }
        out.push(batch);
    }
    Ok((out, n))
}
