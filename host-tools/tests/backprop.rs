//! The first-order baseline (`finetune::backprop`): gradients against finite differences for
//! every adapter entry kind, the forward pass against the runtime, and a short recovery run on a
//! ternary digits MLP.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use edgetune_cli::compress::{compress, KeepEnds, Method, Recipe, Rule};
use edgetune_cli::finetune::backprop::{
    identity_values, Backprop, BackpropError, FirstOrderConfig, Optimizer,
};
use edgetune_cli::import::{import, LowerOptions};
use edgetune_cli::model_file::AlignedBytes;
use edgetune_cli::npy::{self, Array, ArrayData};
use edgetune_cli::pack::{pack, pack_panels};
use edgetune_cli::runner::Ours;
use edgetune_core::adapter::{Entry, EntryKind};
use edgetune_core::ops::{self, Conv, Pool};
use edgetune_core::writer::{ModelFile, OpSpec, TensorSpec};
use edgetune_core::{
    ActKind, Activation, BinaryKind, DType, Encoding, Model, Op, Shape, Storage, TensorMeta,
};
use edgetune_quant::encode::{encode_qblock, QBlockParts};
use edgetune_runtime::adapter::Adapter;

// ---------------------------------------------------------------------------------------------
// Small deterministic helpers.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }
    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

fn shape(dims: &[usize]) -> Shape {
    Shape::new(dims).unwrap()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A graph builder on top of [`ModelFile`] (as in `core/tests/parse_robustness.rs`): adds output
/// and scratch tensors per op, derives live ranges and a first-fit arena plan.
#[derive(Default)]
struct Graph {
    f: ModelFile,
}

impl Graph {
    fn push(&mut self, t: TensorSpec) -> u32 {
        self.f.tensors.push(t);
        self.f.tensors.len() as u32 - 1
    }

    fn input(&mut self, name: &str, dims: &[usize]) -> u32 {
        let id = self.push(TensorSpec::arena(name, DType::F32, shape(dims)));
        self.f.inputs.push((name.into(), id));
        id
    }

    fn constant(&mut self, name: &str, dims: &[usize], v: &[f32]) -> u32 {
        assert_eq!(v.len(), shape(dims).numel(), "{name}");
        self.push(TensorSpec::constant(
            name,
            DType::F32,
            Encoding::Plain,
            shape(dims),
            f32_bytes(v),
        ))
    }

    fn panel_weight(&mut self, name: &str, n: usize, k: usize, w: &[f32]) -> u32 {
        self.push(TensorSpec::constant(
            name,
            DType::F32,
            Encoding::PanelF32,
            shape(&[n, k]),
            pack_panels(w, n, k),
        ))
    }

    /// A block-quantized `[n, k]` weight with random codes, tables and scales.
    fn qweight(
        &mut self,
        name: &str,
        n: usize,
        k: usize,
        bits: usize,
        group: usize,
        rows_per_table: usize,
        rng: &mut Rng,
    ) -> u32 {
        let codes: Vec<u8> = (0..n * k).map(|_| rng.below(1 << bits) as u8).collect();
        let tables = n.div_ceil(rows_per_table) * (1 << bits);
        let lut = rng.vec(tables, 1.0);
        let groups = k.div_ceil(32) * 32 / group;
        let scales: Vec<f32> = (0..n * groups)
            .map(|_| 0.2 + 0.3 * rng.uniform().abs())
            .collect();
        let e = encode_qblock(&QBlockParts {
            n,
            k,
            bits,
            group,
            rows_per_table,
            int8_activations: false,
            codes: &codes,
            tables: &lut,
            scales: &scales,
        })
        .unwrap();
        let mut t =
            TensorSpec::constant(name, DType::F32, Encoding::QBlock, shape(&[n, k]), e.bytes);
        t.params = e.params;
        self.push(t)
    }

    fn meta_of(&self, id: u32) -> TensorMeta {
        let t = &self.f.tensors[id as usize];
        TensorMeta {
            params: t.params,
            dtype: t.dtype,
            encoding: t.encoding,
            shape: t.shape,
            storage: t.storage,
        }
    }

    fn op(&mut self, name: &str, op: Op, inputs: &[u32], out_dims: &[usize]) -> u32 {
        let y = self.push(TensorSpec::arena(name, DType::F32, shape(out_dims)));
        let metas: Vec<TensorMeta> = inputs.iter().map(|&i| self.meta_of(i)).collect();
        let need = ops::scratch_bytes(&op, &metas);
        let scratch = (need > 0).then(|| {
            self.push(TensorSpec::arena(
                format!("{name}.scratch"),
                DType::F32,
                shape(&[need.div_ceil(4) as usize]),
            ))
        });
        self.f.ops.push(OpSpec {
            op,
            inputs: inputs.to_vec(),
            outputs: vec![y],
            scratch,
            name: name.into(),
        });
        y
    }

    fn alias(&mut self, name: &str, root: u32, dims: &[usize]) -> u32 {
        let mut t = TensorSpec::arena(name, DType::F32, shape(dims));
        assert_eq!(t.arena_len, self.f.tensors[root as usize].arena_len);
        t.alias_of = Some(root);
        self.push(t)
    }

    fn output(&mut self, name: &str, id: u32) {
        self.f.outputs.push((name.into(), id));
    }

    fn finish(mut self) -> Vec<u8> {
        let f = &mut self.f;
        let n = f.ops.len() as u32;
        let root = |f: &ModelFile, id: u32| f.tensors[id as usize].alias_of.unwrap_or(id);
        let mut live: Vec<Option<(u32, u32)>> = vec![None; f.tensors.len()];
        for (_, id) in &f.inputs {
            live[*id as usize] = Some((0, 0));
        }
        for (i, o) in f.ops.iter().enumerate() {
            let t = i as u32 + 1;
            for &id in &o.inputs {
                let r = root(f, id) as usize;
                if f.tensors[r].storage == Storage::Arena {
                    let l = live[r].as_mut().expect("read before written");
                    l.1 = l.1.max(t);
                }
            }
            for &id in o.outputs.iter().chain(&o.scratch) {
                live[id as usize] = Some((t, t));
            }
        }
        for (_, id) in &f.outputs {
            let r = root(f, *id) as usize;
            live[r].as_mut().expect("output never written").1 = n + 1;
        }
        let mut placed: Vec<(u64, u64, (u32, u32))> = Vec::new();
        let mut arena = 0u64;
        for (id, t) in f.tensors.iter_mut().enumerate() {
            if t.storage != Storage::Arena || t.alias_of.is_some() {
                continue;
            }
            let l = live[id].unwrap_or_else(|| panic!("{} never written", t.name));
            t.live = l;
            let clash = |off: u64| {
                placed.iter().any(|&(o, len, (a, b))| {
                    a <= l.1 && l.0 <= b && off < o + len && o < off + t.arena_len
                })
            };
            let mut cands: Vec<u64> = std::iter::once(0)
                .chain(
                    placed
                        .iter()
                        .map(|&(o, len, _)| (o + len).div_ceil(16) * 16),
                )
                .collect();
            cands.sort_unstable();
            let off = cands.into_iter().find(|&o| !clash(o)).unwrap();
            t.arena_offset = off;
            placed.push((off, t.arena_len, l));
            arena = arena.max(off + t.arena_len);
        }
        // Aliases copy their owner's placement.
        for id in 0..f.tensors.len() {
            if let Some(r) = f.tensors[id].alias_of {
                let (off, l) = (
                    f.tensors[r as usize].arena_offset,
                    f.tensors[r as usize].live,
                );
                f.tensors[id].arena_offset = off;
                f.tensors[id].live = l;
            }
        }
        f.arena_bytes = arena.div_ceil(64) * 64;
        self.f.to_bytes()
    }
}

fn act(kind: ActKind, a: f32, b: f32) -> Activation {
    Activation { kind, a, b }
}

fn conv(
    kernel: u32,
    stride: u32,
    pad: u32,
    dilation: u32,
    groups: u32,
    act: Activation,
    col_tile: u32,
) -> Op {
    Op::Conv(Conv {
        kernel: [kernel; 2],
        stride: [stride; 2],
        pads: [pad; 4],
        dilation: [dilation; 2],
        groups,
        act,
        col_tile,
    })
}

// ---------------------------------------------------------------------------------------------
// Test models for the gradient check.

/// x[4,40] → dense (3-bit codebook, 3 tables, 2 scale groups over a padded row; tanh) →
/// layer norm → dense (f32 panels, no bias; gelu) → hard-swish → ·c → + residual → − c →
/// reshape [4,2,16] → softmax → alias [4,32] → ·8 → dense (plain) → logits [4,10].
fn model_dense() -> Vec<u8> {
    let mut r = Rng(11);
    let mut g = Graph::default();
    let x = g.input("x", &[4, 40]);
    let w1 = g.qweight("d1.w", 48, 40, 3, 32, 16, &mut r);
    let b1 = g.constant("d1.b", &[48], &r.vec(48, 0.2));
    let d1 = g.op(
        "d1",
        Op::Dense(ops::Dense {
            act: act(ActKind::Tanh, 0.0, 0.0),
        }),
        &[x, w1, b1],
        &[4, 48],
    );
    let gamma: Vec<f32> = (0..48).map(|_| 1.0 + 0.2 * r.uniform()).collect();
    let gm = g.constant("ln.g", &[48], &gamma);
    let bt = g.constant("ln.b", &[48], &r.vec(48, 0.1));
    let ln = g.op(
        "ln",
        Op::LayerNorm {
            axis: 1,
            eps: 1e-5,
            rms: false,
        },
        &[d1, gm, bt],
        &[4, 48],
    );
    let w2 = r.vec(32 * 48, 0.3);
    let w2 = g.panel_weight("d2.w", 32, 48, &w2);
    let d2 = g.op(
        "d2",
        Op::Dense(ops::Dense {
            act: act(ActKind::Gelu, 0.0, 0.0),
        }),
        &[ln, w2],
        &[4, 32],
    );
    let hs = g.op(
        "hswish",
        Op::Unary(act(ActKind::HardSwish, 1.0 / 6.0, 0.5)),
        &[d2],
        &[4, 32],
    );
    let c1 = g.constant("c1", &[1, 32], &r.vec(32, 1.5));
    let m = g.op("mul", Op::Binary(BinaryKind::Mul), &[hs, c1], &[4, 32]);
    let a = g.op("add", Op::Binary(BinaryKind::Add), &[m, d2], &[4, 32]);
    let c2 = g.constant("c2", &[32], &r.vec(32, 0.5));
    let s = g.op("sub", Op::Binary(BinaryKind::Sub), &[a, c2], &[4, 32]);
    let rs = g.op("reshape", Op::Reshape, &[s], &[4, 2, 16]);
    let sm = g.op("softmax", Op::Softmax { axis: 2 }, &[rs], &[4, 2, 16]);
    let flat = g.alias("flat", sm, &[4, 32]);
    let eight = g.constant("eight", &[1], &[8.0]);
    let sc = g.op(
        "scale",
        Op::Binary(BinaryKind::Mul),
        &[flat, eight],
        &[4, 32],
    );
    let w3 = r.vec(10 * 32, 0.5);
    let w3 = g.constant("d3.w", &[10, 32], &w3);
    let b3 = g.constant("d3.b", &[10], &r.vec(10, 0.1));
    let d3 = g.op(
        "d3",
        Op::Dense(ops::Dense {
            act: Activation::NONE,
        }),
        &[sc, w3, b3],
        &[4, 10],
    );
    g.output("logits", d3);
    g.finish()
}

/// x[2,3,7,7] → conv 3×3 (4-bit blocks, im2col tile; leaky relu) → depthwise 3×3 stride 2
/// dilation 2 (clip) → max pool 2×2/1 → pointwise conv (f32 panels, no bias; sigmoid) → average
/// pool 3×3/2 pad 1 (padding counted) → grouped conv 2×2 (2 groups; tanh) → alias [2,6] → RMS norm
/// (no gain or shift) → dense (ternary blocks) → logits [2,5]. `smooth` swaps the kinked
/// functions (leaky relu, clip, max pool) for tanh and average pooling, so finite differences see
/// no kinks.
fn model_conv(smooth: bool) -> Vec<u8> {
    let mut r = Rng(23);
    let mut g = Graph::default();
    let x = g.input("x", &[2, 3, 7, 7]);
    let w1 = g.qweight("c1.w", 8, 27, 4, 32, 8, &mut r);
    let b1 = g.constant("c1.b", &[8], &r.vec(8, 0.2));
    let a1 = if smooth {
        act(ActKind::Tanh, 0.0, 0.0)
    } else {
        act(ActKind::LeakyRelu, 0.1, 0.0)
    };
    let a2 = if smooth {
        act(ActKind::Tanh, 0.0, 0.0)
    } else {
        act(ActKind::Clip, -1.0, 2.0)
    };
    let c1 = g.op(
        "c1",
        conv(3, 1, 1, 1, 1, a1, 10),
        &[x, w1, b1],
        &[2, 8, 7, 7],
    );
    let w2 = g.constant("c2.w", &[8, 9], &r.vec(72, 0.5));
    let b2 = g.constant("c2.b", &[8], &r.vec(8, 0.2));
    let c2 = g.op(
        "c2",
        conv(3, 2, 2, 2, 8, a2, 0),
        &[c1, w2, b2],
        &[2, 8, 4, 4],
    );
    let p1 = g.op(
        "p1",
        Op::Pool(Pool {
            max: !smooth,
            kernel: [2, 2],
            stride: [1, 1],
            pads: [0; 4],
            count_include_pad: false,
        }),
        &[c2],
        &[2, 8, 3, 3],
    );
    let w3 = r.vec(12 * 8, 0.6);
    let w3 = g.panel_weight("c3.w", 12, 8, &w3);
    let c3 = g.op(
        "c3",
        conv(1, 1, 0, 1, 1, act(ActKind::Sigmoid, 0.0, 0.0), 0),
        &[p1, w3],
        &[2, 12, 3, 3],
    );
    let p2 = g.op(
        "p2",
        Op::Pool(Pool {
            max: false,
            kernel: [3, 3],
            stride: [2, 2],
            pads: [1; 4],
            count_include_pad: true,
        }),
        &[c3],
        &[2, 12, 2, 2],
    );
    let w4 = g.constant("c4.w", &[6, 24], &r.vec(6 * 24, 0.8));
    let b4 = g.constant("c4.b", &[6], &r.vec(6, 0.2));
    let c4 = g.op(
        "c4",
        conv(2, 1, 0, 1, 2, act(ActKind::Tanh, 0.0, 0.0), 0),
        &[p2, w4, b4],
        &[2, 6, 1, 1],
    );
    let flat = g.alias("flat", c4, &[2, 6]);
    let rn = g.op(
        "rms",
        Op::LayerNorm {
            axis: 1,
            eps: 1e-5,
            rms: true,
        },
        &[flat],
        &[2, 6],
    );
    let w5 = g.qweight("d.w", 5, 6, 2, 32, 5, &mut r);
    let b5 = g.constant("d.b", &[5], &r.vec(5, 0.2));
    let d = g.op(
        "d",
        Op::Dense(ops::Dense {
            act: Activation::NONE,
        }),
        &[rn, w5, b5],
        &[2, 5],
    );
    g.output("logits", d);
    g.finish()
}

/// Entries built with the runtime's `Adapter::add`, valued as the identity adapter plus noise
/// (so LoRA's `B` and the log-scales are not at zero, and every gradient is generic).
fn adapter(model: &Model<'_>, spec: &[(EntryKind, u32, u16)], seed: u64) -> (Vec<Entry>, Vec<f32>) {
    let mut values = vec![0.0f32; 1 << 16];
    let mut work = vec![0.0f32; 1 << 16];
    let mut a = Adapter::empty(&mut values, &mut work);
    for &(kind, op, rank) in spec {
        a.add(model, kind, op, rank, 2.0 * rank.max(1) as f32, |_| 0.0)
            .unwrap_or_else(|e| panic!("{kind:?} on op {op}: {e}"));
    }
    let entries = a.entries().to_vec();
    let mut v = identity_values(model, &entries, seed).unwrap();
    let mut r = Rng(seed ^ 0x5555);
    for e in &entries {
        let scale = match e.kind {
            EntryKind::LogScale => 0.2,
            EntryKind::LoraB => 0.3,
            _ => 0.05,
        };
        v[e.range()]
            .iter_mut()
            .for_each(|x| *x += scale * r.uniform());
    }
    (entries, v)
}

#[derive(Default, Debug, Clone, Copy)]
struct CheckStats {
    /// ‖fd − g‖ / max(‖fd‖, ‖g‖) over the checked coordinates.
    rel_norm: f64,
    /// max_i |fd_i − g_i| / max(|fd_i|, |g_i|, 1e-2 · max_j |g_j|).
    rel_max: f64,
    checked: usize,
    /// Coordinates whose relative error is under 5%.
    close: usize,
}

/// Central finite differences (loss in f64, step 1e-2) against the backward pass, on up to
/// `per_entry` coordinates of each entry.
fn grad_check(
    bytes: &[u8],
    spec: &[(EntryKind, u32, u16)],
    per_entry: usize,
    seed: u64,
) -> BTreeMap<&'static str, CheckStats> {
    let aligned = AlignedBytes::from(bytes);
    let model = Model::from_bytes(aligned.as_bytes()).unwrap();
    let (entries, values) = adapter(&model, spec, seed);
    let mut bp = Backprop::new(model, &entries).unwrap();
    let input = model
        .tensor(model.input(0).unwrap().tensor)
        .meta
        .shape
        .numel();
    let mut r = Rng(seed);
    let x = r.vec(input, 1.0);
    let labels: Vec<i64> = (0..bp.batch())
        .map(|_| r.below(bp.classes()) as i64)
        .collect();
    let mut grad = vec![0.0f32; values.len()];
    let loss = bp.loss_and_grad(&x, &labels, &values, &mut grad).unwrap();
    // The loss matches the runtime's definition.
    let logits = bp.forward(&x, &values).unwrap().to_vec();
    let ce = edgetune_runtime::train::cross_entropy(
        &logits,
        bp.classes(),
        labels.iter().map(|&l| l as usize),
    );
    assert!(
        (ce as f64 - loss).abs() < 1e-5 * loss.max(1.0),
        "loss {loss} vs runtime's {ce}"
    );
    let h = 1e-2f32;
    let mut out = BTreeMap::new();
    for e in &entries {
        let range = e.range();
        let n = range.len();
        let picks: Vec<usize> = if n <= per_entry {
            (0..n).collect()
        } else {
            (0..per_entry)
                .map(|j| j * n / per_entry + r.below(n / per_entry))
                .collect()
        };
        let (mut d2, mut f2, mut g2) = (0.0f64, 0.0f64, 0.0f64);
        let gmax = picks
            .iter()
            .map(|&j| grad[range.start + j].abs() as f64)
            .fold(0.0, f64::max);
        let mut rel_max = 0.0f64;
        let mut close = 0;
        for &j in &picks {
            let at = range.start + j;
            let mut v = values.clone();
            v[at] = values[at] + h;
            let lp = bp.loss(&x, &labels, &v).unwrap();
            v[at] = values[at] - h;
            let lm = bp.loss(&x, &labels, &v).unwrap();
            let fd = (lp - lm) / (2.0 * h as f64);
            let g = grad[at] as f64;
            d2 += (fd - g) * (fd - g);
            f2 += fd * fd;
            g2 += g * g;
            let rel = (fd - g).abs() / fd.abs().max(g.abs()).max(1e-2 * gmax).max(1e-12);
            rel_max = rel_max.max(rel);
            close += (rel < 5e-2) as usize;
        }
        let s = out.entry(e.kind.name()).or_insert(CheckStats::default());
        let rel_norm = d2.sqrt() / f2.sqrt().max(g2.sqrt()).max(1e-12);
        assert!(g2 > 0.0, "{} on op {}: zero gradient", e.kind.name(), e.op);
        s.rel_norm = s.rel_norm.max(rel_norm);
        s.rel_max = s.rel_max.max(rel_max);
        s.checked += picks.len();
        s.close += close;
    }
    out
}

fn print_stats(name: &str, stats: &BTreeMap<&'static str, CheckStats>) {
    for (kind, s) in stats {
        println!(
            "{name}: {kind:10} checked {:4}  rel(norm) {:.2e}  rel(max) {:.2e}  within 5%: {}",
            s.checked, s.rel_norm, s.rel_max, s.close
        );
    }
}

/// Smooth models: every checked coordinate agrees.
fn assert_exact(name: &str, stats: &BTreeMap<&'static str, CheckStats>) {
    print_stats(name, stats);
    for (kind, s) in stats {
        assert!(
            s.rel_norm < 1e-2,
            "{name}: {kind}: relative error {:.3e}",
            s.rel_norm
        );
        assert!(
            s.rel_max < 5e-2,
            "{name}: {kind}: worst coordinate relative error {:.3e}",
            s.rel_max
        );
    }
}

/// Models with kinks (relu, clip, max pool): a finite difference that straddles a kink averages
/// two slopes, so only most coordinates must agree; a wrong backward rule fails nearly all.
fn assert_mostly(name: &str, stats: &BTreeMap<&'static str, CheckStats>) {
    print_stats(name, stats);
    for (kind, s) in stats {
        assert!(
            s.close * 10 >= s.checked * 8,
            "{name}: {kind}: {} of {} coordinates within 5%",
            s.close,
            s.checked
        );
        assert!(
            s.rel_norm < 0.25,
            "{name}: {kind}: relative error {:.3e}",
            s.rel_norm
        );
    }
}

#[test]
fn gradients_match_finite_differences() {
    use EntryKind::*;
    let dense = model_dense();
    // Ops: 0 d1, 1 ln, 2 d2, 3 hswish, 4 mul, 5 add, 6 sub, 7 reshape, 8 softmax, 9 scale, 10 d3.
    let spec = [
        (Bias, 0, 0),
        (LogScale, 0, 0),
        (Centroids, 0, 0),
        (LoraA, 0, 3),
        (LoraB, 0, 3),
        (NormGain, 1, 0),
        (NormBias, 1, 0),
        (Bias, 2, 0),
        (LoraA, 2, 2),
        (LoraB, 2, 2),
        (Head, 10, 0),
        (Bias, 10, 0),
    ];
    let s1 = grad_check(&dense, &spec, 40, 1);
    assert_exact("dense model", &s1);

    // Ops: 0 c1, 1 c2 (depthwise), 2 p1, 3 c3 (pointwise), 4 p2, 5 c4 (grouped), 6 rms, 7 d.
    let spec = [
        (Bias, 0, 0),
        (LogScale, 0, 0),
        (Centroids, 0, 0),
        (LoraA, 0, 2),
        (LoraB, 0, 2),
        (Bias, 1, 0),
        (Bias, 3, 0),
        (LoraA, 3, 2),
        (LoraB, 3, 2),
        (Bias, 5, 0),
        (NormGain, 6, 0),
        (NormBias, 6, 0),
        (LogScale, 7, 0),
        (Centroids, 7, 0),
        (Head, 7, 0),
    ];
    // A head hides the weight's scales and tables: check those without it, and the head apart.
    let without_head: Vec<_> = spec.iter().copied().filter(|s| s.0 != Head).collect();
    let smooth = model_conv(true);
    let s2 = grad_check(&smooth, &without_head, 40, 2);
    assert_exact("conv model (smooth)", &s2);
    let s3 = grad_check(&smooth, &[(Head, 7, 0), (Bias, 1, 0)], 40, 3);
    assert_exact("conv model (smooth), head", &s3);
    // On the kinked model, entries whose coordinates each move one channel (a centroid or a LoRA
    // factor of the first layer moves every activation, so nearly every difference straddles a
    // kink): their gradients flow back through leaky relu, clip and max pool.
    let kinked = model_conv(false);
    let per_channel: Vec<_> = without_head
        .iter()
        .copied()
        .filter(|s| matches!(s.0, Bias | LogScale | NormGain | NormBias))
        .collect();
    assert_mostly(
        "conv model (leaky relu, clip, max pool)",
        &grad_check(&kinked, &per_channel, 40, 2),
    );
    let kinds: std::collections::BTreeSet<_> =
        s1.keys().chain(s2.keys()).chain(s3.keys()).collect();
    assert_eq!(kinds.len(), 8, "every entry kind checked: {kinds:?}");
}

fn ours(bytes: &[u8]) -> Ours {
    Ours::from_bytes(AlignedBytes::from(bytes)).unwrap()
}

fn run_ours(o: &mut Ours, dims: &[usize], x: &[f32]) -> Vec<f32> {
    let out = o
        .run(&[Array {
            shape: dims.to_vec(),
            data: ArrayData::F32(x.to_vec()),
        }])
        .unwrap();
    out[0].to_f32()
}

#[test]
fn forward_matches_the_runtime_on_test_models() {
    for (name, bytes) in [
        ("dense", model_dense()),
        ("conv", model_conv(false)),
        ("smooth conv", model_conv(true)),
    ] {
        let aligned = AlignedBytes::from(&bytes[..]);
        let model = Model::from_bytes(aligned.as_bytes()).unwrap();
        let dims: Vec<usize> = model
            .tensor(model.input(0).unwrap().tensor)
            .meta
            .shape
            .dims()
            .iter()
            .map(|&d| d as usize)
            .collect();
        let x = Rng(5).vec(dims.iter().product(), 1.0);
        let mut bp = Backprop::new(model, &[]).unwrap();
        let mine = bp.forward(&x, &[]).unwrap().to_vec();
        let theirs = run_ours(&mut ours(&bytes), &dims, &x);
        let diff = mine
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        println!("{name} model: forward vs runtime max |diff| {diff:.2e}");
        assert!(diff < 1e-5, "{name}: {diff}");
    }
}

#[test]
fn forward_with_adapters_matches_the_runtime() {
    use EntryKind::*;
    // The runtime applies log-scales of one-scale-per-row weights after the fast kernel, and
    // other overrides through the reference kernel: both must agree with the trainer's forward.
    let cases: [(&str, Vec<u8>, Vec<(EntryKind, u32, u16)>); 3] = [
        (
            "dense (grouped scales, tables, LoRA)",
            model_dense(),
            vec![
                (Bias, 0, 0),
                (LogScale, 0, 0),
                (Centroids, 0, 0),
                (LoraA, 0, 3),
                (LoraB, 0, 3),
                (Bias, 2, 0),
                (LoraA, 2, 2),
                (LoraB, 2, 2),
            ],
        ),
        (
            "conv (row scales, LoRA)",
            model_conv(false),
            vec![
                (Bias, 0, 0),
                (LogScale, 0, 0),
                (LoraA, 0, 2),
                (LoraB, 0, 2),
                (LogScale, 7, 0),
                (Bias, 7, 0),
            ],
        ),
        (
            "conv (row scales and tables)",
            model_conv(true),
            vec![
                (LogScale, 0, 0),
                (Centroids, 0, 0),
                (Bias, 3, 0),
                (LoraA, 3, 2),
                (LoraB, 3, 2),
            ],
        ),
    ];
    for (name, bytes, spec) in cases {
        let aligned = AlignedBytes::from(&bytes[..]);
        let model = Model::from_bytes(aligned.as_bytes()).unwrap();
        let (entries, values) = adapter(&model, &spec, 4);
        let dims: Vec<usize> = model
            .tensor(model.input(0).unwrap().tensor)
            .meta
            .shape
            .dims()
            .iter()
            .map(|&d| d as usize)
            .collect();
        let x = Rng(6).vec(dims.iter().product(), 1.0);
        let mut bp = Backprop::new(model, &entries).unwrap();
        let mine = bp.forward(&x, &values).unwrap().to_vec();
        let mut rt = ours(&bytes);
        rt.adapter = Some(edgetune_cli::runner::HostAdapter::new(
            &model, entries, values,
        ));
        let theirs = run_ours(&mut rt, &dims, &x);
        let diff = mine
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let scale = mine.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        println!(
            "{name}: adapted forward vs runtime max |diff| {diff:.2e} (outputs up to {scale:.2})"
        );
        assert!(diff < 1e-5 * scale.max(1.0), "{name}: {diff}");
    }
}

// ---------------------------------------------------------------------------------------------
// The digits models.

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/digits")
}

fn digits(file: &str, batch: usize, recipe: Option<&Recipe>) -> Vec<u8> {
    let spec = format!("x={batch}x1x8x8").parse().unwrap();
    let mut g = import(&fixtures().join(file), &[spec], LowerOptions::default()).unwrap();
    if let Some(r) = recipe {
        compress(&mut g, r, None, false).unwrap();
    }
    pack(&g).unwrap().0
}

fn load(name: &str) -> Array {
    npy::read(&fixtures().join(name)).unwrap()
}

#[test]
fn forward_matches_the_runtime_on_digits() {
    let x = load("x_test.npy").to_f32();
    for file in ["cnn.onnx", "mlp.onnx"] {
        let bytes = digits(file, 8, None);
        let aligned = AlignedBytes::from(&bytes[..]);
        let model = Model::from_bytes(aligned.as_bytes()).unwrap();
        let ops: Vec<&str> = model.ops().map(|o| o.op.name()).collect();
        let mut bp = Backprop::new(model, &[]).unwrap();
        let mut rt = ours(&bytes);
        let mut worst = 0.0f32;
        let per = 8 * 64;
        for b in 0..x.len() / per {
            let xb = &x[b * per..(b + 1) * per];
            let mine = bp.forward(xb, &[]).unwrap().to_vec();
            let theirs = run_ours(&mut rt, &[8, 1, 8, 8], xb);
            worst = mine
                .iter()
                .zip(&theirs)
                .map(|(a, b)| (a - b).abs())
                .fold(worst, f32::max);
        }
        println!(
            "digits {file} ({}): forward vs runtime max |diff| {worst:.2e} over {} batches",
            ops.join(" "),
            x.len() / per
        );
        assert!(worst < 1e-5, "{file}: {worst}");
    }
}

#[test]
fn unsupported_ops_are_typed_errors() {
    // A transpose-free matmul in the tail: the trainer names it instead of panicking.
    let mut g = Graph::default();
    let x = g.input("x", &[2, 4]);
    let w = g.constant("w", &[4, 4], &Rng(3).vec(16, 1.0));
    let d = g.op(
        "d",
        Op::Dense(ops::Dense {
            act: Activation::NONE,
        }),
        &[x, w],
        &[2, 4],
    );
    let m = g.op("mm", Op::MatMul(ops::MatMul::standard(2)), &[d, w], &[2, 4]);
    g.output("y", m);
    let aligned = AlignedBytes::from(&g.finish()[..]);
    let model = Model::from_bytes(aligned.as_bytes()).unwrap();
    let (entries, _) = adapter(&model, &[(EntryKind::Bias, 0, 0)], 1);
    match Backprop::new(model, &entries) {
        Err(
            e @ BackpropError::UnsupportedOp {
                op: 1,
                kind: "matmul",
                ..
            },
        ) => println!("{e}"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("matmul accepted"),
    }
}

#[test]
fn first_order_recovers_a_ternary_mlp() {
    let recipe = Recipe {
        rules: vec![Rule {
            pattern: "*".into(),
            method: Method::Ternary { group: 256 },
            gptq: false,
        }],
        keep_ends: KeepEnds::Same,
        ..Recipe::default()
    };
    let batch = 32;
    let bytes = digits("mlp.onnx", batch, Some(&recipe));
    let aligned = AlignedBytes::from(&bytes[..]);
    let model = Model::from_bytes(aligned.as_bytes()).unwrap();
    let dense: Vec<u32> = model
        .ops()
        .filter(|o| matches!(o.op, Op::Dense(_)))
        .map(|o| o.index)
        .collect();
    let mut spec = Vec::new();
    for &op in &dense {
        spec.push((EntryKind::Bias, op, 0));
        spec.push((EntryKind::LogScale, op, 0));
    }
    let mut values = vec![0.0f32; 1 << 16];
    let mut work = vec![0.0f32; 0];
    let mut a = Adapter::empty(&mut values, &mut work);
    for &(kind, op, rank) in &spec {
        a.add(&model, kind, op, rank, 0.0, |_| 0.0).unwrap();
    }
    let entries = a.entries().to_vec();
    let mut values = identity_values(&model, &entries, 0).unwrap();
    let (xtr, ytr) = (load("x_train.npy").to_f32(), load("y_train.npy").to_i64());
    let (xte, yte) = (load("x_test.npy").to_f32(), load("y_test.npy").to_i64());
    let mut bp = Backprop::new(model, &entries).unwrap();
    let (loss0, acc0) = bp.evaluate(&xte, &yte, &values).unwrap();
    let cfg = FirstOrderConfig {
        optimizer: Optimizer::Adam { lr: 1e-2 },
        steps: 600,
        seed: 7,
        weight_decay: 0.0,
    };
    let t = Instant::now();
    let log = bp.train(&mut values, &xtr, &ytr, &cfg).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let (loss1, acc1) = bp.evaluate(&xte, &yte, &values).unwrap();
    let first: f32 = log[..20].iter().map(|l| l.1).sum::<f32>() / 20.0;
    let last: f32 = log[log.len() - 20..].iter().map(|l| l.1).sum::<f32>() / 20.0;
    println!(
        "ternary MLP, {} trainables (biases + log-scales), Adam lr {} batch {batch}: test acc {:.2}% -> {:.2}% (loss {loss0:.3} -> {loss1:.3}); \
         train loss {first:.3} -> {last:.3}; {} steps in {secs:.1} s",
        values.len(),
        cfg.optimizer.lr(),
        acc0 * 100.0,
        acc1 * 100.0,
        cfg.steps,
    );
    assert!(acc1 > acc0 + 0.03, "accuracy {acc0} -> {acc1}");
    assert!(last < first, "train loss {first} -> {last}");
}
