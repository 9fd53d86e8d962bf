//! `.npy` arrays in and out (through the `npyz` crate).

use std::path::Path;

use anyhow::{bail, Context, Result};
use edgetune_core::DType;
use npyz::WriterBuilder;

/// An array read from or written to `.npy`.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    /// Shape.
    pub shape: Vec<usize>,
    /// Values.
    pub data: ArrayData,
}

/// Values of an [`Array`].
#[derive(Debug, Clone, PartialEq)]
pub enum ArrayData {
    /// f32 (f64 files are narrowed).
    F32(Vec<f32>),
    /// i64 (other integer files are widened).
    I64(Vec<i64>),
    /// bool.
    Bool(Vec<u8>),
}

impl Array {
    /// Element type as the runtime names it.
    pub fn dtype(&self) -> DType {
        match self.data {
            ArrayData::F32(_) => DType::F32,
            ArrayData::I64(_) => DType::I64,
            ArrayData::Bool(_) => DType::Bool,
        }
    }

    /// Values as f32 (integers converted).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.data {
            ArrayData::F32(v) => v.clone(),
            ArrayData::I64(v) => v.iter().map(|&x| x as f32).collect(),
            ArrayData::Bool(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }

    /// Values as i64 (floats truncated).
    pub fn to_i64(&self) -> Vec<i64> {
        match &self.data {
            ArrayData::F32(v) => v.iter().map(|&x| x as i64).collect(),
            ArrayData::I64(v) => v.clone(),
            ArrayData::Bool(v) => v.iter().map(|&x| x as i64).collect(),
        }
    }
}

/// Reads an `.npy` file.
pub fn read(path: &Path) -> Result<Array> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&bytes).with_context(|| format!("parsing {}", path.display()))
}

/// Parses `.npy` bytes.
pub fn parse(bytes: &[u8]) -> Result<Array> {
    let npy = npyz::NpyFile::new(bytes)?;
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    if npy.order() == npyz::Order::Fortran {
        bail!("Fortran-ordered arrays are not supported");
    }
    let descr = match npy.dtype() {
        npyz::DType::Plain(t) => t.to_string(),
        other => bail!("unsupported npy dtype {other:?}"),
    };
    let data = match &descr[1..] {
        "f4" => ArrayData::F32(npy.into_vec::<f32>()?),
        "f8" => ArrayData::F32(
            npy.into_vec::<f64>()?
                .into_iter()
                .map(|v| v as f32)
                .collect(),
        ),
        "i8" => ArrayData::I64(npy.into_vec::<i64>()?),
        "i4" => ArrayData::I64(npy.into_vec::<i32>()?.into_iter().map(i64::from).collect()),
        "u1" | "b1" => ArrayData::Bool(npy.into_vec::<u8>()?),
        other => bail!("unsupported npy element type {other}"),
    };
    Ok(Array { shape, data })
}

/// Writes an f32 array.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> Result<()> {
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let mut w = npyz::WriteOptions::new()
        .default_dtype()
        .shape(&shape)
        .writer(&mut file)
        .begin_nd()?;
    w.extend(data.iter().copied())?;
    w.finish()?;
    Ok(())
}
