//! Compression that changes the graph: low-rank layers become two layers; structured pruning
//! removes output channels and the matching inputs of the layer that consumes them.

use anyhow::{bail, Result};
use edgetune_core::ops::{Conv, Dense};
use edgetune_core::{Activation, DType, Encoding, Op};
use edgetune_quant::encode::Encoded;
use edgetune_quant::prune;
use edgetune_quant::stats::ActStats;

use crate::ir::{ConstData, Graph, Node, TensorId};

fn weight_tensor(
    g: &mut Graph,
    name: String,
    n: usize,
    k: usize,
    v: Vec<f32>,
    e: Encoded,
) -> TensorId {
    let t = g.constant(name, DType::F32, vec![n, k], ConstData::F32(v));
    if e.encoding == Encoding::PanelF32 {
        g.tensors[t].encoding = Encoding::PanelF32;
    } else {
        g.tensors[t].encoded = Some(crate::ir::Encoded {
            encoding: e.encoding,
            bytes: e.bytes,
            params: e.params,
        });
    }
    t
}

/// Replaces layer `node` (`y = W x + b`) by `y = U (V x) + b` with `V` `[r, K]` and `U` `[N, r]`.
pub fn split_low_rank(
    g: &mut Graph,
    node: usize,
    (r, v, ev): (usize, Vec<f32>, Encoded),
    (u, eu): (Vec<f32>, Encoded),
) -> Result<()> {
    let n_out = g.tensors[g.nodes[node].inputs[1]].shape[0];
    let k = g.tensors[g.nodes[node].inputs[1]].shape[1];
    let name = g.nodes[node].name.clone();
    let x = g.nodes[node].inputs[0];
    let vt = weight_tensor(g, format!("{name}.lowrank_v"), r, k, v, ev);
    let ut = weight_tensor(g, format!("{name}.lowrank_u"), n_out, r, u, eu);
    let out_shape = g.tensors[g.nodes[node].output].shape.clone();
    let (first_op, mid_shape, second_op) = match g.nodes[node].op {
        Op::Dense(d) => {
            let mut s = out_shape.clone();
            *s.last_mut().unwrap() = r;
            (
                Op::Dense(Dense {
                    act: Activation::NONE,
                }),
                s,
                Op::Dense(d),
            )
        }
        Op::Conv(c) => {
            let mut s = out_shape.clone();
            s[1] = r;
            let pointwise = Conv {
                kernel: [1, 1],
                stride: [1, 1],
                pads: [0; 4],
                dilation: [1, 1],
                groups: 1,
                act: c.act,
                col_tile: 0,
            };
            (
                Op::Conv(Conv {
                    act: Activation::NONE,
                    ..c
                }),
                s,
                Op::Conv(pointwise),
            )
        }
        _ => bail!("{name}: low rank applies to dense and convolution layers"),
    };
    let mid = g.activation(format!("{name}.lowrank"), DType::F32, mid_shape);
    g.nodes.insert(
        node,
        Node {
            name: format!("{name}.lowrank_v"),
            op: first_op,
            inputs: vec![x, vt],
            output: mid,
        },
    );
    let second = &mut g.nodes[node + 1];
    second.op = second_op;
    second.inputs[0] = mid;
    second.inputs[1] = ut;
    super::fix_conv_tile(g, node)?;
    super::fix_conv_tile(g, node + 1)?;
    Ok(())
}

/// A step between a pruned layer and its consumer that keeps channels independent.
fn channelwise(op: &Op) -> bool {
    matches!(op, Op::Unary(_) | Op::Pool(_))
}

/// Removes the least important `fraction` of the output channels of layer `name` and the inputs
/// they feed in the next dense/convolution layer. The path between them may hold element-wise
/// activations, pooling and reshapes; anything else (residual adds, several readers, a graph
/// output) is an error naming what blocks it. Returns how many channels were removed.
pub fn prune_channels(
    g: &mut Graph,
    name: &str,
    fraction: f64,
    stats: Option<&ActStats>,
) -> Result<usize> {
    let Some(p) = g.nodes.iter().position(|n| n.name == name) else {
        bail!("no layer {name}")
    };
    let (w, cax) = match g.nodes[p].op {
        Op::Conv(c) if c.groups == 1 => (g.nodes[p].inputs[1], 1),
        Op::Dense(_) => (
            g.nodes[p].inputs[1],
            g.tensors[g.nodes[p].output].shape.len() - 1,
        ),
        _ => bail!("{name}: channel pruning applies to dense layers and ungrouped convolutions"),
    };
    let (n, k) = (g.tensors[w].shape[0], g.tensors[w].shape[1]);
    // Walk to the consumer, collecting every tensor whose channel axis shrinks.
    let mut chain: Vec<(TensorId, usize)> = vec![(g.nodes[p].output, cax)];
    let mut cur = g.nodes[p].output;
    let consumer = loop {
        if g.is_output(cur) {
            bail!("{name}: its channels reach a graph output");
        }
        let aliases = g.aliases()[cur].clone();
        let readers: Vec<(usize, TensorId)> = g
            .nodes
            .iter()
            .enumerate()
            .flat_map(|(i, nd)| {
                nd.inputs
                    .iter()
                    .filter(|&&t| t == cur || aliases.contains(&t))
                    .map(move |&t| (i, t))
            })
            .collect();
        let [(r, via)] = readers[..] else {
            bail!(
                "{name}: its output has {} readers; channel pruning needs one path",
                readers.len()
            )
        };
        if via != cur {
            // A reshape: either the channel axis survives, or (a flatten) channels become blocks
            // of the last axis.
            let (orig, axis) = (g.tensors[cur].shape.clone(), chain.last().unwrap().1);
            let alias = &g.tensors[via].shape;
            let lead: usize = orig[..axis].iter().product();
            let block: usize = orig[axis..].iter().product();
            let j = (0..alias.len())
                .find(|&j| alias[..j].iter().product::<usize>() == lead && alias[j] != 1);
            match j {
                Some(j) if alias[j] == orig[axis] => chain.push((via, j)),
                Some(j) if j == alias.len() - 1 && alias[j] == block => {
                    chain.push((via, usize::MAX))
                }
                _ => bail!("{name}: a reshape on the way mixes its channels"),
            }
        }
        let nd = &g.nodes[r];
        if channelwise(&nd.op) && nd.inputs.len() == 1 {
            chain.push((nd.output, 1));
            cur = nd.output;
            continue;
        }
        match nd.op {
            Op::Dense(_) | Op::Conv(Conv { groups: 1, .. }) if nd.inputs[0] == via => break r,
            _ => bail!(
                "{name}: {} ({}) between it and the next layer mixes channels",
                nd.name,
                nd.op.name()
            ),
        }
    };
    // Scores: row norms of W, weighted by input importance when calibrated.
    let wv = g.tensors[w]
        .value
        .as_ref()
        .and_then(|v| v.as_f32())
        .unwrap()
        .to_vec();
    let imp = stats.filter(|s| s.k() == k).map(|s| s.mean_sq());
    let scores = prune::channel_scores(&wv, n, k, imp.as_deref())?;
    let mut drop = prune::channels_to_drop(&scores, fraction)?;
    drop.sort();
    if drop.len() >= n {
        bail!("{name}: pruning {fraction} would remove every channel");
    }
    let keep: Vec<usize> = (0..n).filter(|c| !drop.contains(c)).collect();
    let nk = keep.len();
    // The producer: fewer rows (and bias entries).
    let rows: Vec<f32> = keep
        .iter()
        .flat_map(|&c| wv[c * k..(c + 1) * k].to_vec())
        .collect();
    super::set_f32(g, w, vec![nk, k], rows);
    g.tensors[w].encoding = Encoding::PanelF32;
    if let Some(&b) = g.nodes[p].inputs.get(2) {
        let bv = g.tensors[b]
            .value
            .as_ref()
            .and_then(|v| v.as_f32())
            .unwrap()
            .to_vec();
        super::set_f32(g, b, vec![nk], keep.iter().map(|&c| bv[c]).collect());
    }
    // Tensors on the path: the channel axis shrinks; a flatten shrinks by whole channel blocks.
    let mut spatial = 1;
    for &(t, axis) in &chain {
        let s = &mut g.tensors[t].shape;
        if axis == usize::MAX {
            let last = s.len() - 1;
            spatial = s[last] / n;
            s[last] = nk * spatial;
        } else {
            spatial = s[axis + 1..].iter().product();
            s[axis] = nk;
        }
    }
    // The consumer: drop the inputs fed by removed channels.
    let cw = g.nodes[consumer].inputs[1];
    let (cn, ck) = (g.tensors[cw].shape[0], g.tensors[cw].shape[1]);
    let per = match g.nodes[consumer].op {
        Op::Conv(c) => (c.kernel[0] * c.kernel[1]) as usize,
        _ => spatial,
    };
    if ck != n * per {
        bail!("{name}: the next layer's {ck} inputs are not {n} channels of {per}");
    }
    let cv = g.tensors[cw]
        .value
        .as_ref()
        .and_then(|v| v.as_f32())
        .unwrap()
        .to_vec();
    let mut out = Vec::with_capacity(cn * nk * per);
    for r in 0..cn {
        for &c in &keep {
            out.extend_from_slice(&cv[r * ck + c * per..r * ck + (c + 1) * per]);
        }
    }
    super::set_f32(g, cw, vec![cn, nk * per], out);
    g.tensors[cw].encoding = Encoding::PanelF32;
    Ok(drop.len())
}
