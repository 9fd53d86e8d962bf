//! `edgetune inspect`: what a model file holds and what it costs.

use std::collections::BTreeMap;

use edgetune_core::layout::QBlockLayout;
use edgetune_core::model::TensorInfo;
use edgetune_core::ops::{macs, TensorMeta};
use edgetune_core::{Encoding, Model, Storage};
use half::f16;
use serde::Serialize;

/// Bytes and tensor count of one encoding.
#[derive(Debug, Clone, Serialize, Default)]
pub struct EncodingBytes {
    /// Tensors with this encoding.
    pub tensors: usize,
    /// Bytes they occupy.
    pub bytes: u64,
    /// Weights (logical elements) they hold.
    pub elements: u64,
}

/// One op, for `--ops`.
#[derive(Debug, Clone, Serialize)]
pub struct OpLine {
    /// Execution position.
    pub index: u32,
    /// Op name.
    pub op: String,
    /// Source node.
    pub node: String,
    /// Output shape.
    pub output: String,
    /// Multiply-accumulates.
    pub macs: u64,
}

/// One weight, for `--weights`.
#[derive(Debug, Clone, Serialize)]
pub struct WeightLine {
    /// Tensor name.
    pub name: String,
    /// Shape.
    pub shape: String,
    /// Encoding and its parameters, e.g. `ternary (2-bit codes), scale per 64, int8
    /// activations, rows tiled by 16`.
    pub encoding: String,
    /// Bytes in the file.
    pub bytes: u64,
    /// Bits per weight, tables and scales included.
    pub bits_per_weight: f64,
}

/// What `inspect` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// File size.
    pub file_bytes: u64,
    /// Graph inputs: name, type, shape.
    pub inputs: Vec<(String, String, String)>,
    /// Graph outputs.
    pub outputs: Vec<(String, String, String)>,
    /// Op count by name.
    pub ops: BTreeMap<String, usize>,
    /// Constant bytes per encoding.
    pub encodings: BTreeMap<String, EncodingBytes>,
    /// Arena bytes the plan needs.
    pub arena_bytes: u64,
    /// Most bytes live at one time: the floor for any plan.
    pub arena_lower_bound: u64,
    /// Total multiply-accumulates per run.
    pub macs: u64,
    /// Metadata.
    pub meta: BTreeMap<String, String>,
    /// Per-op listing (with `--ops`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub op_list: Vec<OpLine>,
    /// Per-weight listing (with `--weights`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub weights: Vec<WeightLine>,
}

fn describe(m: &Model<'_>, id: u32) -> (String, String) {
    let t = m.tensor(id);
    (t.meta.dtype.name().to_string(), format!("{}", t.meta.shape))
}

/// A weight's encoding with its parameters, read back from the file.
fn encoding_detail(t: &TensorInfo<'_>, bytes: &[u8]) -> String {
    match t.meta.encoding {
        Encoding::QBlock => {
            // Validated at load: block-quantized weights are [N, K].
            let (n, k) = (t.meta.shape.dim(0), t.meta.shape.dim(1));
            let Some(l) = QBlockLayout::new(n, k, t.params) else {
                return "qblock (bad parameters)".into();
            };
            let f16_at = |o: usize| f16::from_le_bytes([bytes[o], bytes[o + 1]]).to_f32();
            let levels: Vec<f32> = (0..l.entries())
                .map(|c| f16_at(l.lut_off + 2 * c))
                .collect();
            let kind = if l.tables > 1 {
                format!("codebook, {} tables", l.tables)
            } else if levels == [-1.0, 0.0, 1.0, 2.0] {
                "ternary".into()
            } else if levels == [-1.0, 1.0] {
                "binary".into()
            } else if l.bits == 8
                && levels
                    .iter()
                    .skip(1)
                    .zip(1..)
                    .all(|(&v, c)| v == c as f32 - 128.0)
            {
                // As `--int8` writes it: code c is c − 128 (code 0 unused).
                "int8".into()
            } else if levels
                .iter()
                .zip(0..)
                .all(|(&v, c)| v == levels[0] + c as f32)
            {
                "integer levels".into()
            } else {
                "codebook".into()
            };
            let mut s = format!("{kind} ({}-bit codes), scale per {}", l.bits, l.group);
            if l.int8_activations() {
                s += ", int8 activations";
            }
            if l.row_tiles() {
                s += ", rows tiled by 16";
            }
            s
        }
        Encoding::SparseNM => format!("sparse {}:{}", t.params[0], t.params[1]),
        e => format!("{} {}", t.meta.dtype.name(), e.name()),
    }
}

/// Builds the report: `with_ops` lists every op, `with_weights` every weight.
pub fn report(m: &Model<'_>, with_ops: bool, with_weights: bool) -> Report {
    let mut encodings: BTreeMap<String, EncodingBytes> = BTreeMap::new();
    let mut weights = Vec::new();
    for id in 0..m.tensor_count() {
        let t = m.tensor(id);
        if t.meta.storage == Storage::Const && with_weights && t.meta.shape.numel() > 1 {
            weights.push(WeightLine {
                name: t.name.to_string(),
                shape: format!("{}", t.meta.shape),
                encoding: encoding_detail(&t, m.const_bytes(id)),
                bytes: t.len,
                bits_per_weight: 8.0 * t.len as f64 / t.meta.shape.numel() as f64,
            });
        }
        if t.meta.storage == Storage::Const {
            let e = encodings
                .entry(t.meta.encoding.name().to_string())
                .or_default();
            e.tensors += 1;
            e.bytes += t.len;
            e.elements += t.meta.shape.numel() as u64;
        }
    }
    let mut ops = BTreeMap::new();
    let mut total_macs = 0;
    let mut op_list = Vec::new();
    for op in m.ops() {
        *ops.entry(op.op.name().to_string()).or_insert(0) += 1;
        let ins: Vec<TensorMeta> = op.inputs().map(|t| m.tensor(t).meta).collect();
        let outs: Vec<TensorMeta> = op.outputs().map(|t| m.tensor(t).meta).collect();
        let n = macs(&op.op, &ins, &outs);
        total_macs += n;
        if with_ops {
            op_list.push(OpLine {
                index: op.index,
                op: op.op.name().to_string(),
                node: op.name.to_string(),
                output: format!("{}", outs[0].shape),
                macs: n,
            });
        }
    }
    let mut lower = 0;
    for time in 0..=m.op_count() + 1 {
        let live: u64 = (0..m.tensor_count())
            .map(|i| m.tensor(i))
            .filter(|t| {
                t.meta.storage == Storage::Arena
                    && t.alias_of.is_none()
                    && t.live.0 <= time
                    && time <= t.live.1
            })
            .map(|t| t.len)
            .sum();
        lower = lower.max(live);
    }
    Report {
        file_bytes: m.file_len(),
        inputs: m
            .inputs()
            .map(|io| {
                let (d, s) = describe(m, io.tensor);
                (io.name.to_string(), d, s)
            })
            .collect(),
        outputs: m
            .outputs()
            .map(|io| {
                let (d, s) = describe(m, io.tensor);
                (io.name.to_string(), d, s)
            })
            .collect(),
        ops,
        encodings,
        arena_bytes: m.arena_bytes(),
        arena_lower_bound: lower,
        macs: total_macs,
        meta: m
            .meta_entries()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        op_list,
        weights,
    }
}

/// Human-readable bytes.
pub fn bytes(n: u64) -> String {
    if n >= 10 << 20 {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    } else if n >= 10 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

/// Prints the report as text.
pub fn print(r: &Report) {
    println!(
        "file        {} ({} bytes)",
        bytes(r.file_bytes),
        r.file_bytes
    );
    for (n, d, s) in &r.inputs {
        println!("input       {n}: {d} {s}");
    }
    for (n, d, s) in &r.outputs {
        println!("output      {n}: {d} {s}");
    }
    println!(
        "arena       {} ({} bytes; lower bound {} bytes, waste {:.1}%)",
        bytes(r.arena_bytes),
        r.arena_bytes,
        r.arena_lower_bound,
        100.0 * (r.arena_bytes as f64 - r.arena_lower_bound as f64) / r.arena_bytes.max(1) as f64
    );
    println!(
        "compute     {:.3} M multiply-accumulates per run",
        r.macs as f64 / 1e6
    );
    println!("weights by encoding:");
    for (e, b) in &r.encodings {
        println!(
            "  {e:<14} {:>4} tensors  {:>12} elements  {:>10}  ({:.2} bits/element)",
            b.tensors,
            b.elements,
            bytes(b.bytes),
            8.0 * b.bytes as f64 / b.elements.max(1) as f64
        );
    }
    let ops: Vec<String> = r.ops.iter().map(|(k, v)| format!("{k}×{v}")).collect();
    println!("ops         {}", ops.join(", "));
    for (k, v) in &r.meta {
        println!("meta        {k} = {v}");
    }
    for w in &r.weights {
        println!(
            "  {:<56} {:<12} {:>10} {:>6.2} bits/weight  {}",
            w.name,
            w.shape,
            bytes(w.bytes),
            w.bits_per_weight,
            w.encoding
        );
    }
    for o in &r.op_list {
        println!(
            "  #{:<4} {:<14} {:<40} -> {:<18} {:>12} MACs",
            o.index, o.op, o.node, o.output, o.macs
        );
    }
}
