//! Graph rewrites after lowering: fold per-channel affine ops into convolutions and dense layers,
//! fuse activations into them, and recognise layer norm, hard-sigmoid and hard-swish chains that
//! tract presents as several elementary ops.

use edgetune_core::{ActKind, Activation, BinaryKind, Op};

use crate::ir::{ConstData, Graph, TensorId};

/// Runs every pass to a fixed point, then drops dead nodes.
pub fn optimize(g: &mut Graph) {
    loop {
        let mut changed = false;
        changed |= merge_clips(g);
        changed |= recognize_hard_sigmoid(g);
        changed |= recognize_hard_swish(g);
        changed |= recognize_layer_norm(g);
        changed |= fold_norm_affine(g);
        changed |= fold_into_linear(g);
        g.remove_dead_nodes();
        if !changed {
            break;
        }
    }
}

/// The one node reading `t` (directly or through one alias), with the tensor it reads.
fn sole_reader(g: &Graph, t: TensorId) -> Option<(usize, TensorId)> {
    if g.is_output(t) {
        return None;
    }
    let consumers = g.consumers();
    let aliases = g.aliases();
    let mut found = None;
    let mut count = 0;
    for &n in &consumers[t] {
        found = Some((n, t));
        count += 1;
    }
    for &a in &aliases[t] {
        for &n in &consumers[a] {
            found = Some((n, a));
            count += 1;
        }
    }
    (count == 1).then_some(found).flatten()
}

fn producer_op(g: &Graph, t: TensorId) -> Option<(usize, Op)> {
    g.producer(t).map(|i| (i, g.nodes[i].op))
}

fn scalar(g: &Graph, t: TensorId) -> Option<f32> {
    match g.tensors[t].value.as_ref()? {
        ConstData::F32(v) if v.len() == 1 => Some(v[0]),
        _ => None,
    }
}

/// Bounds of a clip-like activation (relu is clip to [0, ∞)).
fn clip_bounds(a: &Activation) -> Option<(f32, f32)> {
    match a.kind {
        ActKind::Relu => Some((0.0, f32::INFINITY)),
        ActKind::Clip => Some((a.a, a.b)),
        _ => None,
    }
}

fn clip(lo: f32, hi: f32) -> Activation {
    if lo == 0.0 && hi == f32::INFINITY {
        Activation::plain(ActKind::Relu)
    } else {
        Activation {
            kind: ActKind::Clip,
            a: lo,
            b: hi,
        }
    }
}

/// Removes node `i`, whose output `out` now stands for `replacement`.
fn bypass(g: &mut Graph, i: usize, replacement: TensorId) {
    let out = g.nodes[i].output;
    g.replace_uses(out, replacement);
    g.nodes.remove(i);
}

/// `clip(clip(x))` → one clip.
fn merge_clips(g: &mut Graph) -> bool {
    for i in 0..g.nodes.len() {
        let Op::Unary(outer) = g.nodes[i].op else {
            continue;
        };
        let Some((o_lo, o_hi)) = clip_bounds(&outer) else {
            continue;
        };
        let x = g.nodes[i].inputs[0];
        let Some((p, Op::Unary(inner))) = producer_op(g, x) else {
            continue;
        };
        let Some((i_lo, i_hi)) = clip_bounds(&inner) else {
            continue;
        };
        if sole_reader(g, x).map(|r| r.0) != Some(i) {
            continue;
        }
        // clip(clip(v, a, b), c, d) = clip(v, max(a, c), min(b, d)) when the ranges overlap.
        let (lo, hi) = (i_lo.max(o_lo), i_hi.min(o_hi));
        if lo > hi {
            continue;
        }
        g.nodes[p].op = Op::Unary(clip(lo, hi));
        bypass(g, i, x);
        return true;
    }
    false
}

/// `clip(x·α + β, 0, 1)` → hard-sigmoid.
fn recognize_hard_sigmoid(g: &mut Graph) -> bool {
    for i in 0..g.nodes.len() {
        let Op::Unary(a) = g.nodes[i].op else {
            continue;
        };
        if clip_bounds(&a) != Some((0.0, 1.0)) {
            continue;
        }
        let t = g.nodes[i].inputs[0];
        let Some((add, Op::Binary(BinaryKind::Add))) = producer_op(g, t) else {
            continue;
        };
        let Some(beta) = scalar(g, g.nodes[add].inputs[1]) else {
            continue;
        };
        let u = g.nodes[add].inputs[0];
        let Some((mul, Op::Binary(BinaryKind::Mul))) = producer_op(g, u) else {
            continue;
        };
        let Some(alpha) = scalar(g, g.nodes[mul].inputs[1]) else {
            continue;
        };
        if sole_reader(g, t).map(|r| r.0) != Some(i) || sole_reader(g, u).map(|r| r.0) != Some(add)
        {
            continue;
        }
        let x = g.nodes[mul].inputs[0];
        g.nodes[i].op = Op::Unary(Activation {
            kind: ActKind::HardSigmoid,
            a: alpha,
            b: beta,
        });
        g.nodes[i].inputs[0] = x;
        return true;
    }
    false
}

/// `x · clip(x + 3, 0, 6) / 6` and `x · hard_sigmoid(x)` → hard-swish.
fn recognize_hard_swish(g: &mut Graph) -> bool {
    for i in 0..g.nodes.len() {
        let n = &g.nodes[i];
        // Form 1: x · hard_sigmoid(x).
        if let Op::Binary(BinaryKind::Mul) = n.op {
            let (a, b) = (n.inputs[0], n.inputs[1]);
            for (x, h) in [(a, b), (b, a)] {
                if g.tensors[x].shape != g.tensors[h].shape {
                    continue;
                }
                if let Some((p, Op::Unary(act))) = producer_op(g, h) {
                    if act.kind == ActKind::HardSigmoid
                        && g.nodes[p].inputs[0] == x
                        && sole_reader(g, h).map(|r| r.0) == Some(i)
                    {
                        g.nodes[i].op = Op::Unary(Activation {
                            kind: ActKind::HardSwish,
                            a: act.a,
                            b: act.b,
                        });
                        g.nodes[i].inputs = vec![x];
                        return true;
                    }
                }
            }
        }
        // Form 2: (x · clip(x + 3, 0, 6)) · (1/6).
        let n = &g.nodes[i];
        let Op::Binary(BinaryKind::Mul) = n.op else {
            continue;
        };
        let Some(sixth) = scalar(g, n.inputs[1]) else {
            continue;
        };
        if (sixth - 1.0 / 6.0).abs() > 1e-6 {
            continue;
        }
        let m = n.inputs[0];
        let Some((mi, Op::Binary(BinaryKind::Mul))) = producer_op(g, m) else {
            continue;
        };
        let (p, q) = (g.nodes[mi].inputs[0], g.nodes[mi].inputs[1]);
        for (x, c) in [(p, q), (q, p)] {
            let Some((ci, Op::Unary(act))) = producer_op(g, c) else {
                continue;
            };
            if clip_bounds(&act) != Some((0.0, 6.0)) {
                continue;
            }
            let s = g.nodes[ci].inputs[0];
            let Some((si, Op::Binary(BinaryKind::Add))) = producer_op(g, s) else {
                continue;
            };
            if g.nodes[si].inputs[0] != x || scalar(g, g.nodes[si].inputs[1]) != Some(3.0) {
                continue;
            }
            if sole_reader(g, m).map(|r| r.0) != Some(i)
                || sole_reader(g, c).map(|r| r.0) != Some(mi)
            {
                continue;
            }
            g.nodes[i].op = Op::Unary(Activation {
                kind: ActKind::HardSwish,
                a: 1.0 / 6.0,
                b: 0.5,
            });
            g.nodes[i].inputs = vec![x];
            return true;
        }
    }
    false
}

/// `rms_norm(x − sum(x)·(1/n))` → layer norm of `x`.
fn recognize_layer_norm(g: &mut Graph) -> bool {
    for i in 0..g.nodes.len() {
        let Op::LayerNorm {
            axis,
            eps,
            rms: true,
        } = g.nodes[i].op
        else {
            continue;
        };
        if g.nodes[i].inputs.len() != 1 {
            continue;
        }
        let d = g.nodes[i].inputs[0];
        let Some((di, Op::Binary(BinaryKind::Sub))) = producer_op(g, d) else {
            continue;
        };
        let (x, m) = (g.nodes[di].inputs[0], g.nodes[di].inputs[1]);
        let Some((mi, Op::Binary(BinaryKind::Mul))) = producer_op(g, m) else {
            continue;
        };
        let s = g.nodes[mi].inputs[0];
        let Some(inv_n) = scalar(g, g.nodes[mi].inputs[1]) else {
            continue;
        };
        let Some((
            si,
            Op::Reduce {
                kind: edgetune_core::ReduceKind::Sum,
                axes,
                keep_dims: true,
            },
        )) = producer_op(g, s)
        else {
            continue;
        };
        let xs = &g.tensors[x].shape;
        let trailing: u32 = (axis..xs.len() as u32).fold(0, |m, a| m | (1 << a));
        let n: usize = xs[axis as usize..].iter().product();
        if g.nodes[si].inputs[0] != x
            || axes != trailing
            || (inv_n * n as f32 - 1.0).abs() > 1e-5
            || axis as usize != xs.len() - 1
        {
            continue;
        }
        if sole_reader(g, d).map(|r| r.0) != Some(i)
            || sole_reader(g, m).map(|r| r.0) != Some(di)
            || sole_reader(g, s).map(|r| r.0) != Some(mi)
        {
            continue;
        }
        g.nodes[i].op = Op::LayerNorm {
            axis,
            eps,
            rms: false,
        };
        g.nodes[i].inputs = vec![x];
        return true;
    }
    false
}

/// Per-feature values of a constant broadcast over the trailing `inner` elements, if it is one.
fn trailing_values(g: &Graph, c: TensorId, out_shape: &[usize], inner: usize) -> Option<Vec<f32>> {
    let v = g.tensors[c].value.as_ref()?.as_f32()?;
    let cs = &g.tensors[c].shape;
    if v.len() == 1 {
        return Some(vec![v[0]; inner]);
    }
    // All leading axes of the constant (right-aligned to the output) must be 1.
    let off = out_shape.len().checked_sub(cs.len())?;
    let mut tail = 1;
    let mut leading_ones = true;
    for (i, &d) in cs.iter().enumerate().rev() {
        if tail == inner {
            leading_ones &= d == 1;
        } else {
            if d != out_shape[off + i] {
                return None;
            }
            tail *= d;
        }
    }
    (tail == inner && leading_ones).then(|| v.to_vec())
}

/// `layer_norm(x) · γ + β` with constant γ, β → layer norm with parameters.
fn fold_norm_affine(g: &mut Graph) -> bool {
    for i in 0..g.nodes.len() {
        let Op::LayerNorm { axis, .. } = g.nodes[i].op else {
            continue;
        };
        let out = g.nodes[i].output;
        let shape = g.tensors[out].shape.clone();
        let inner: usize = shape[axis as usize..].iter().product();
        let Some((r, read)) = sole_reader(g, out) else {
            continue;
        };
        if read != out {
            continue;
        }
        let Op::Binary(kind) = g.nodes[r].op else {
            continue;
        };
        let rin = g.nodes[r].inputs.clone();
        let other = if rin[0] == out { rin[1] } else { rin[0] };
        if g.tensors[g.nodes[r].output].shape != shape {
            continue;
        }
        let Some(vals) = trailing_values(g, other, &shape, inner) else {
            continue;
        };
        let n_params = g.nodes[i].inputs.len();
        match (kind, n_params) {
            (BinaryKind::Mul, 1) => {
                let t = g.constant(
                    format!("{}.gamma", g.nodes[i].name),
                    edgetune_core::DType::F32,
                    vec![inner],
                    ConstData::F32(vals),
                );
                g.nodes[i].inputs.push(t);
            }
            (BinaryKind::Add, 1 | 2) => {
                if n_params == 1 {
                    let ones = g.constant(
                        format!("{}.gamma", g.nodes[i].name),
                        edgetune_core::DType::F32,
                        vec![inner],
                        ConstData::F32(vec![1.0; inner]),
                    );
                    g.nodes[i].inputs.push(ones);
                }
                let t = g.constant(
                    format!("{}.beta", g.nodes[i].name),
                    edgetune_core::DType::F32,
                    vec![inner],
                    ConstData::F32(vals),
                );
                g.nodes[i].inputs.push(t);
            }
            _ => continue,
        }
        bypass(g, r, out);
        return true;
    }
    false
}

/// Folds `y·s + b` (per output channel, constant) and activations into the convolution or dense
/// layer producing `y`.
fn fold_into_linear(g: &mut Graph) -> bool {
    for p in 0..g.nodes.len() {
        let (act, channel_axis) = match g.nodes[p].op {
            Op::Conv(c) => (c.act, 1),
            Op::Dense(d) => (d.act, g.tensors[g.nodes[p].output].shape.len() - 1),
            _ => continue,
        };
        if !act.is_identity() {
            continue;
        }
        let out = g.nodes[p].output;
        let Some((r, read)) = sole_reader(g, out) else {
            continue;
        };
        let ps = g.tensors[out].shape.clone();
        let channels = ps[channel_axis];
        let outer: usize = ps[..channel_axis].iter().product();
        match g.nodes[r].op {
            Op::Unary(a) => {
                set_act(g, p, a);
                bypass(g, r, read);
                return true;
            }
            Op::Binary(
                kind @ (BinaryKind::Add | BinaryKind::Sub | BinaryKind::Mul | BinaryKind::Div),
            ) => {
                let rin = g.nodes[r].inputs.clone();
                let (other, read_first) = if rin[0] == read {
                    (rin[1], true)
                } else {
                    (rin[0], false)
                };
                if other == read
                    || (!read_first && matches!(kind, BinaryKind::Sub | BinaryKind::Div))
                {
                    continue;
                }
                let ts = g.tensors[read].shape.clone();
                if g.tensors[g.nodes[r].output].shape != ts {
                    continue;
                }
                let Some(vals) = per_channel(g, other, &ts, outer, channels) else {
                    continue;
                };
                match kind {
                    BinaryKind::Add => add_bias(g, p, &vals, 1.0),
                    BinaryKind::Sub => add_bias(g, p, &vals, -1.0),
                    BinaryKind::Mul => scale(g, p, &vals),
                    _ => scale(g, p, &vals.iter().map(|v| 1.0 / v).collect::<Vec<_>>()),
                }
                bypass(g, r, read);
                return true;
            }
            _ => {}
        }
    }
    false
}

fn set_act(g: &mut Graph, p: usize, a: Activation) {
    match &mut g.nodes[p].op {
        Op::Conv(c) => c.act = a,
        Op::Dense(d) => d.act = a,
        _ => unreachable!(),
    }
}

/// Values of constant `c` if, broadcast to `ts`, it varies only along the channel axis (whose
/// elements sit after `outer` leading elements in memory).
fn per_channel(
    g: &Graph,
    c: TensorId,
    ts: &[usize],
    outer: usize,
    channels: usize,
) -> Option<Vec<f32>> {
    let v = g.tensors[c].value.as_ref()?.as_f32()?;
    if v.len() == 1 {
        return Some(vec![v[0]; channels]);
    }
    if v.len() != channels {
        return None;
    }
    let cs = &g.tensors[c].shape;
    let off = ts.len().checked_sub(cs.len())?;
    let axes: Vec<usize> = (0..cs.len())
        .filter(|&i| cs[i] != 1)
        .map(|i| i + off)
        .collect();
    let [j] = axes[..] else { return None };
    let lead: usize = ts[..j].iter().product();
    (ts[j] == channels && lead == outer).then(|| v.to_vec())
}

fn weight_rows(g: &mut Graph, p: usize) -> &mut Vec<f32> {
    let w = g.nodes[p].inputs[1];
    // A weight read by another node too is copied first.
    let shared = g
        .nodes
        .iter()
        .enumerate()
        .any(|(i, n)| i != p && n.inputs.contains(&w));
    let w = if shared {
        let t = g.tensors[w].clone();
        g.tensors.push(t);
        let id = g.tensors.len() - 1;
        g.nodes[p].inputs[1] = id;
        id
    } else {
        w
    };
    match g.tensors[w].value.as_mut() {
        Some(ConstData::F32(v)) => v,
        _ => unreachable!("lowering makes f32 weights"),
    }
}

fn bias_mut(g: &mut Graph, p: usize, channels: usize) -> &mut Vec<f32> {
    if g.nodes[p].inputs.len() < 3 {
        let name = format!("{}.bias", g.nodes[p].name);
        let b = g.constant(
            name,
            edgetune_core::DType::F32,
            vec![channels],
            ConstData::F32(vec![0.0; channels]),
        );
        g.nodes[p].inputs.push(b);
    } else {
        let b = g.nodes[p].inputs[2];
        if g.nodes
            .iter()
            .enumerate()
            .any(|(i, n)| i != p && n.inputs.contains(&b))
        {
            let t = g.tensors[b].clone();
            g.tensors.push(t);
            let id = g.tensors.len() - 1;
            g.nodes[p].inputs[2] = id;
        }
    }
    let b = g.nodes[p].inputs[2];
    match g.tensors[b].value.as_mut() {
        Some(ConstData::F32(v)) => v,
        _ => unreachable!("lowering makes f32 biases"),
    }
}

/// Adds `sign · vals` to the bias of node `p` (a dense or convolution node), giving it a zero
/// bias first if it has none and its own copy if the bias is shared.
pub(crate) fn add_bias(g: &mut Graph, p: usize, vals: &[f32], sign: f32) {
    for (b, v) in bias_mut(g, p, vals.len()).iter_mut().zip(vals) {
        *b += sign * v;
    }
}

fn scale(g: &mut Graph, p: usize, vals: &[f32]) {
    let rows = vals.len();
    let w = weight_rows(g, p);
    let k = w.len() / rows;
    for (row, &s) in w.chunks_exact_mut(k).zip(vals) {
        row.iter_mut().for_each(|x| *x *= s);
    }
    if g.nodes[p].inputs.len() > 2 {
        for (b, &s) in bias_mut(g, p, rows).iter_mut().zip(vals) {
            *b *= s;
        }
    }
}
