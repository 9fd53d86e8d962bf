//! Turns a graph into `.etm` bytes: weight encodings, scratch tensors, the arena plan.

use anyhow::{bail, Context, Result};
use edgetune_core::ops::{scratch_bytes, Storage, TensorMeta};
use edgetune_core::writer::{ModelFile, OpSpec, TensorSpec};
use edgetune_core::{DType, Encoding, Model, Op, Shape, PANEL};

use crate::ir::{ConstData, Graph, TensorId};

/// Alignment of every arena tensor.
const ARENA_ALIGN: u64 = 64;

/// What the arena planner decided.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanReport {
    /// Arena bytes the plan needs.
    pub arena_bytes: u64,
    /// The largest sum of bytes live at one time step: no plan can need less.
    pub lower_bound: u64,
}

/// Packs an f32 `[n, k]` matrix into [`Encoding::PanelF32`] bytes.
pub fn pack_panels(w: &[f32], n: usize, k: usize) -> Vec<u8> {
    let panels = n.div_ceil(PANEL);
    let mut out = Vec::with_capacity(panels * k * PANEL * 4);
    for p in 0..panels {
        for kk in 0..k {
            for j in 0..PANEL {
                let r = p * PANEL + j;
                let v = if r < n { w[r * k + kk] } else { 0.0 };
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    out
}

fn encode_const(t: &crate::ir::Tensor) -> Result<(Encoding, Vec<u8>, [u32; 4])> {
    if let Some(e) = &t.encoded {
        return Ok((e.encoding, e.bytes.clone(), e.params));
    }
    let v = t.value.as_ref().expect("constant");
    Ok(match t.encoding {
        Encoding::Plain => (Encoding::Plain, v.to_le_bytes(), [0; 4]),
        Encoding::PanelF32 => {
            let ConstData::F32(w) = v else {
                bail!("{}: panel layout needs f32", t.name)
            };
            (
                Encoding::PanelF32,
                pack_panels(w, t.shape[0], t.shape[1]),
                [0; 4],
            )
        }
        other => bail!(
            "{}: {} weights are written by the compressor, not from plain values",
            t.name,
            other.name()
        ),
    })
}

/// Live range of an arena buffer in time steps, and its bytes.
#[derive(Debug, Clone, Copy)]
struct Buffer {
    first: u32,
    last: u32,
    bytes: u64,
    offset: u64,
}

/// Greedy-by-size placement (TFLite Micro's planner): biggest first, each at the lowest offset
/// free of every placed buffer live at an overlapping time.
fn place(buffers: &mut [Buffer]) -> u64 {
    let mut order: Vec<usize> = (0..buffers.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(buffers[i].bytes), buffers[i].first));
    let mut placed: Vec<usize> = Vec::new();
    let mut total = 0;
    for &i in &order {
        let b = buffers[i];
        let mut busy: Vec<(u64, u64)> = placed
            .iter()
            .map(|&j| buffers[j])
            .filter(|o| o.first <= b.last && b.first <= o.last)
            .map(|o| (o.offset, o.offset + o.bytes))
            .collect();
        busy.sort();
        let mut offset = 0u64;
        for (s, e) in busy {
            if offset + b.bytes <= s {
                break;
            }
            offset = offset.max(e.div_ceil(ARENA_ALIGN) * ARENA_ALIGN);
        }
        buffers[i].offset = offset;
        total = total.max(offset + b.bytes);
        placed.push(i);
    }
    total.div_ceil(ARENA_ALIGN) * ARENA_ALIGN
}

fn meta_of(g: &Graph, t: TensorId) -> TensorMeta {
    let x = &g.tensors[t];
    TensorMeta {
        params: x.encoded.as_ref().map(|e| e.params).unwrap_or([0; 4]),
        dtype: x.dtype,
        encoding: x
            .encoded
            .as_ref()
            .map(|e| e.encoding)
            .unwrap_or(if x.is_const() {
                x.encoding
            } else {
                Encoding::Plain
            }),
        shape: x.core_shape(),
        storage: if x.is_const() {
            Storage::Const
        } else {
            Storage::Arena
        },
    }
}

/// Writes the graph as `.etm` bytes and reports the arena plan. The bytes are validated by
/// [`Model::from_bytes`] before they are returned.
pub fn pack(g: &Graph) -> Result<(Vec<u8>, PlanReport)> {
    pack_with(g, None)
}

/// Metadata key recording that ops from this index on can be re-run alone: everything they read
/// from earlier ops stays intact (prefix caching for fine-tuning).
pub const RESUMABLE_FROM: &str = "resumable_from";

/// [`pack`], optionally planning the arena so the ops from `resumable_from` on can run again
/// without re-running the ops before them: every tensor computed earlier and read from there
/// on stays live to the end.
pub fn pack_with(g: &Graph, resumable_from: Option<usize>) -> Result<(Vec<u8>, PlanReport)> {
    // Tensors that appear in the file, renumbered densely.
    let mut used = vec![false; g.tensors.len()];
    for n in &g.nodes {
        n.inputs.iter().for_each(|&t| used[t] = true);
        used[n.output] = true;
    }
    for &(_, t) in g.inputs.iter().chain(&g.outputs) {
        used[t] = true;
    }
    for t in 0..g.tensors.len() {
        if used[t] {
            if let Some(r) = g.tensors[t].alias_of {
                used[r] = true;
            }
        }
    }
    let mut new_id = vec![u32::MAX; g.tensors.len()];
    let mut specs: Vec<TensorSpec> = Vec::new();
    for (t, x) in g.tensors.iter().enumerate() {
        if !used[t] {
            continue;
        }
        new_id[t] = specs.len() as u32;
        let shape = Shape::new(&x.shape).with_context(|| format!("{}: rank above 6", x.name))?;
        let spec = if x.is_const() {
            let (encoding, bytes, params) = encode_const(x)?;
            let mut s = TensorSpec::constant(&x.name, x.dtype, encoding, shape, bytes);
            s.params = params;
            s
        } else {
            TensorSpec::arena(&x.name, x.dtype, shape)
        };
        specs.push(spec);
    }
    for (t, x) in g.tensors.iter().enumerate() {
        if used[t] {
            if let Some(r) = x.alias_of {
                specs[new_id[t] as usize].alias_of = Some(new_id[r]);
            }
        }
    }
    let root = |t: TensorId| g.tensors[t].alias_of.unwrap_or(t);
    // Live ranges of arena roots; time i + 1 is node i.
    let n_ops = g.nodes.len() as u32;
    let mut live: Vec<Option<(u32, u32)>> = vec![None; g.tensors.len()];
    let touch = |t: TensorId, time: u32, live: &mut Vec<Option<(u32, u32)>>| {
        let e = live[t].get_or_insert((time, time));
        e.0 = e.0.min(time);
        e.1 = e.1.max(time);
    };
    for &(_, t) in &g.inputs {
        touch(t, 0, &mut live);
    }
    let mut ops = Vec::new();
    let mut scratch_specs = Vec::new();
    for (i, n) in g.nodes.iter().enumerate() {
        let time = i as u32 + 1;
        for &t in &n.inputs {
            if !g.tensors[t].is_const() {
                touch(root(t), time, &mut live);
            }
        }
        if g.tensors[n.output].alias_of.is_some() {
            bail!("{}: an op may not write an alias", n.name);
        }
        touch(n.output, time, &mut live);
        let metas: Vec<TensorMeta> = n.inputs.iter().map(|&t| meta_of(g, t)).collect();
        let need = scratch_bytes(&n.op, &metas);
        let scratch = (need > 0).then(|| {
            let id = (specs.len() + scratch_specs.len()) as u32;
            let mut s = TensorSpec::arena(
                format!("{}.scratch", n.name),
                DType::F32,
                Shape::new(&[(need / 4) as usize]).unwrap(),
            );
            s.live = (time, time);
            scratch_specs.push(s);
            id
        });
        ops.push(OpSpec {
            op: n.op,
            inputs: n.inputs.iter().map(|&t| new_id[t]).collect(),
            outputs: vec![new_id[n.output]],
            scratch,
            name: n.name.clone(),
        });
    }
    // Outputs stay until read; inputs stay too, so a session can run again on the same inputs
    // (and fine-tuning can re-run a model without copying its batch back in).
    for &(_, t) in g.outputs.iter().chain(&g.inputs) {
        touch(root(t), n_ops + 1, &mut live);
    }
    if let Some(k) = resumable_from {
        // Op k runs at time k + 1: what it or later ops read from before stays to the end.
        let start = k as u32 + 1;
        for l in live.iter_mut().flatten() {
            if l.0 < start && l.1 >= start {
                l.1 = n_ops + 1;
            }
        }
    }
    // Place roots and scratch buffers.
    let mut buffers = Vec::new();
    let mut owners: Vec<usize> = Vec::new();
    for (t, x) in g.tensors.iter().enumerate() {
        if used[t] && !x.is_const() && x.alias_of.is_none() {
            let (first, last) =
                live[t].with_context(|| format!("{}: activation never used", x.name))?;
            buffers.push(Buffer {
                first,
                last,
                bytes: specs[new_id[t] as usize].arena_len,
                offset: 0,
            });
            owners.push(new_id[t] as usize);
        }
    }
    let base = specs.len();
    specs.extend(scratch_specs);
    for i in base..specs.len() {
        buffers.push(Buffer {
            first: specs[i].live.0,
            last: specs[i].live.1,
            bytes: specs[i].arena_len,
            offset: 0,
        });
        owners.push(i);
    }
    let arena_bytes = place(&mut buffers);
    for (b, &o) in buffers.iter().zip(&owners) {
        specs[o].arena_offset = b.offset;
        specs[o].live = (b.first, b.last);
    }
    // Lower bound: the most bytes live at once.
    let mut lower_bound = 0;
    for time in 0..=n_ops + 1 {
        let sum: u64 = buffers
            .iter()
            .filter(|b| b.first <= time && time <= b.last)
            .map(|b| b.bytes)
            .sum();
        lower_bound = lower_bound.max(sum);
    }
    let mut meta: Vec<(String, String)> = g
        .meta
        .iter()
        .filter(|(k, _)| k != RESUMABLE_FROM)
        .cloned()
        .collect();
    if let Some(k) = resumable_from {
        meta.push((RESUMABLE_FROM.into(), k.to_string()));
    }
    let file = ModelFile {
        tensors: specs,
        ops,
        inputs: g
            .inputs
            .iter()
            .map(|(n, t)| (n.clone(), new_id[*t]))
            .collect(),
        outputs: g
            .outputs
            .iter()
            .map(|(n, t)| (n.clone(), new_id[*t]))
            .collect(),
        meta,
        arena_bytes,
    };
    let bytes = file.to_bytes();
    let aligned = crate::model_file::AlignedBytes::from(&bytes[..]);
    Model::from_bytes(aligned.as_bytes())
        .map_err(|e| anyhow::anyhow!("internal error: packed model does not validate: {e}"))?;
    Ok((
        bytes,
        PlanReport {
            arena_bytes,
            lower_bound,
        },
    ))
}

/// True when the op computes something (used in reports).
pub fn is_compute(op: &Op) -> bool {
    !matches!(
        op,
        Op::Reshape
            | Op::Transpose { .. }
            | Op::Concat { .. }
            | Op::Slice { .. }
            | Op::Gather { .. }
            | Op::Expand
            | Op::Cast
    )
}
