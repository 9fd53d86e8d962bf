//! Robustness of `Model::from_bytes` against damaged and hostile files.
//!
//! Builds a few small but realistic valid models with the writer, checks they validate, then feeds
//! the parser tens of thousands of deterministic mutations of them (truncations at every length,
//! bit flips, byte and word overwrites, header and section-table rewrites, splices, garbage), each
//! both with the stored CRC left stale and with it recomputed so validation past the checksum is
//! exercised. The parser must never panic; when it accepts a file, walking every tensor, op, graph
//! input/output and metadata entry must not panic either and must respect what validation promises.
//!
//! No new dependency: a SplitMix64 PRNG with fixed seeds makes every run identical, and a failure
//! names the seed and the mutation so it can be replayed.
//!
//! `EDGETUNE_WRITE_FUZZ_SEEDS=1 cargo test -p edgetune-core --test parse_robustness write_fuzz_seeds`
//! (re)writes the valid models into `core/fuzz/corpus/parse/` as starting points for `cargo fuzz`.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::mem::{offset_of, size_of};
use std::panic::{catch_unwind, AssertUnwindSafe};

use edgetune_core::format::{
    self, FileHeader, OpRecord, SectionEntry, TensorRecord, CRC_OFFSET, MAGIC,
};
use edgetune_core::ops::{self, Conv, Dense, MatMul, Pool};
use edgetune_core::writer::{ModelFile, OpSpec, TensorSpec};
use edgetune_core::{
    ActKind, Activation, BinaryKind, DType, Encoding, FormatError, Model, Op, Place, ReduceKind,
    Shape, Storage, TensorMeta, PANEL,
};
use zerocopy::{FromBytes, IntoBytes};

// ---------------------------------------------------------------------------------------------
// Deterministic PRNG.

/// SplitMix64: tiny, fast, good enough to pick mutations; the same seed gives the same stream.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
}

// ---------------------------------------------------------------------------------------------
// Aligned buffers.

/// Model bytes in a `u64`-backed buffer, so the view starts 8-byte aligned as the parser needs.
struct Aligned {
    words: Vec<u64>,
    len: usize,
}

impl Aligned {
    fn new(bytes: &[u8]) -> Aligned {
        let mut words = vec![0u64; bytes.len().div_ceil(8) + 1];
        words.as_mut_bytes()[..bytes.len()].copy_from_slice(bytes);
        Aligned {
            words,
            len: bytes.len(),
        }
    }
    fn bytes(&self) -> &[u8] {
        &self.words.as_bytes()[..self.len]
    }
    /// The same bytes starting one byte past an aligned address.
    fn misaligned_copy(bytes: &[u8]) -> (Vec<u64>, usize) {
        let mut words = vec![0u64; bytes.len().div_ceil(8) + 1];
        words.as_mut_bytes()[1..1 + bytes.len()].copy_from_slice(bytes);
        (words, bytes.len())
    }
}

// ---------------------------------------------------------------------------------------------
// Building valid models.

fn shape(dims: &[usize]) -> Shape {
    Shape::new(dims).expect("test shapes are valid")
}

fn f32_bytes(n: usize, seed: u32) -> Vec<u8> {
    (0..n)
        .flat_map(|i| {
            ((((i as u32).wrapping_mul(37).wrapping_add(seed) % 17) as f32 - 8.0) * 0.05)
                .to_le_bytes()
        })
        .collect()
}

/// A small graph builder on top of [`ModelFile`]: adds output and scratch tensors for each op,
/// then derives live ranges and a non-overlapping arena plan, so the models stay valid if the
/// scratch rules change.
#[derive(Default)]
struct Graph {
    f: ModelFile,
}

impl Graph {
    fn push(&mut self, t: TensorSpec) -> u32 {
        self.f.tensors.push(t);
        self.f.tensors.len() as u32 - 1
    }

    fn input(&mut self, name: &str, dtype: DType, dims: &[usize]) -> u32 {
        let id = self.push(TensorSpec::arena(name, dtype, shape(dims)));
        self.f.inputs.push((name.into(), id));
        id
    }

    fn constant(&mut self, name: &str, dtype: DType, dims: &[usize], data: Vec<u8>) -> u32 {
        let s = shape(dims);
        assert_eq!(
            data.len(),
            s.numel() * dtype.size(),
            "{name}: constant byte length"
        );
        self.push(TensorSpec::constant(name, dtype, Encoding::Plain, s, data))
    }

    fn weight(&mut self, name: &str, dims: &[usize]) -> u32 {
        let n: usize = dims.iter().product();
        self.constant(
            name,
            DType::F32,
            dims,
            f32_bytes(n, dims.len() as u32 + n as u32),
        )
    }

    /// An f32 `[n, k]` weight in the 16-wide panel layout: ceil(n/16)·k·16·4 bytes.
    fn panel_weight(&mut self, name: &str, n: usize, k: usize) -> u32 {
        let bytes = n.div_ceil(PANEL) * k * PANEL * 4;
        let mut data = vec![0u8; bytes];
        // Real values for the n live rows, zero padding past n.
        for p in 0..n.div_ceil(PANEL) {
            for kk in 0..k {
                for j in 0..PANEL {
                    let row = p * PANEL + j;
                    if row < n {
                        let v = ((row * 31 + kk * 7) % 13) as f32 * 0.01 - 0.06;
                        let at = ((p * k + kk) * PANEL + j) * 4;
                        data[at..at + 4].copy_from_slice(&v.to_le_bytes());
                    }
                }
            }
        }
        self.push(TensorSpec::constant(
            name,
            DType::F32,
            Encoding::PanelF32,
            shape(&[n, k]),
            data,
        ))
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

    /// Appends `op`, creating its output (and scratch, if the op needs one); returns the output id.
    fn op(
        &mut self,
        name: &str,
        op: Op,
        inputs: &[u32],
        out_dtype: DType,
        out_dims: &[usize],
    ) -> u32 {
        let y = self.push(TensorSpec::arena(name, out_dtype, shape(out_dims)));
        let metas: Vec<TensorMeta> = inputs.iter().map(|&i| self.meta_of(i)).collect();
        let need = ops::scratch_bytes(&op, &metas);
        let scratch = (need > 0).then(|| {
            let n = need.div_ceil(4) as usize;
            self.push(TensorSpec::arena(
                format!("{name}.scratch"),
                DType::F32,
                shape(&[n]),
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

    /// An arena tensor that reuses `root`'s bytes under another shape.
    fn alias(&mut self, name: &str, root: u32, dims: &[usize]) -> u32 {
        let r = &self.f.tensors[root as usize];
        let mut t = TensorSpec::arena(name, r.dtype, shape(dims));
        assert_eq!(
            t.arena_len, r.arena_len,
            "{name}: alias must keep the byte length"
        );
        t.alias_of = Some(root);
        self.push(t)
    }

    fn output(&mut self, name: &str, id: u32) {
        self.f.outputs.push((name.into(), id));
    }

    fn meta(&mut self, k: &str, v: &str) {
        self.f.meta.push((k.into(), v.into()));
    }

    /// Derives live ranges (inputs from 0, op `i` writes at `i + 1`, a tensor stays live through
    /// the last op reading it, outputs to `op_count + 1`) and places arena tensors first-fit at
    /// 16-byte aligned offsets so that tensors live at the same time never share bytes.
    fn finish(mut self) -> ModelFile {
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
                    let l = live[r]
                        .as_mut()
                        .expect("op reads a tensor before it is written");
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
            let l = live[id].unwrap_or_else(|| panic!("arena tensor {} is never written", t.name));
            t.live = l;
            let clash = |off: u64| {
                placed.iter().any(|&(o, len, (a, b))| {
                    a <= l.1 && l.0 <= b && off < o + len && o < off + t.arena_len
                })
            };
            let mut candidates: Vec<u64> = std::iter::once(0)
                .chain(
                    placed
                        .iter()
                        .map(|&(o, len, _)| (o + len).div_ceil(16) * 16),
                )
                .collect();
            candidates.sort_unstable();
            let off = candidates
                .into_iter()
                .find(|&o| !clash(o))
                .expect("the end of the arena is always free");
            t.arena_offset = off;
            placed.push((off, t.arena_len, l));
            arena = arena.max(off + t.arena_len);
        }
        f.arena_bytes = arena.div_ceil(64) * 64;
        self.f
    }
}

fn conv(
    kernel: [u32; 2],
    stride: [u32; 2],
    pads: [u32; 4],
    groups: u32,
    act: Activation,
    col_tile: u32,
) -> Op {
    Op::Conv(Conv {
        kernel,
        stride,
        pads,
        dilation: [1, 1],
        groups,
        act,
        col_tile,
    })
}

fn pool(
    max: bool,
    kernel: [u32; 2],
    stride: [u32; 2],
    pads: [u32; 4],
    count_include_pad: bool,
) -> Op {
    Op::Pool(Pool {
        max,
        kernel,
        stride,
        pads,
        count_include_pad,
    })
}

/// x[1,1,8,8] -> Conv 3x3 (pads 1, im2col tile, panel weight, bias) -> Relu -> MaxPool 2x2 ->
/// Reshape -> Dense -> logits, plus an alias output of the logits.
fn model_cnn() -> ModelFile {
    let mut g = Graph::default();
    let x = g.input("x", DType::F32, &[1, 1, 8, 8]);
    let w = g.panel_weight("conv.w", 4, 9);
    let b = g.weight("conv.b", &[4]);
    let c = g.op(
        "conv",
        conv([3, 3], [1, 1], [1; 4], 1, Activation::NONE, 16),
        &[x, w, b],
        DType::F32,
        &[1, 4, 8, 8],
    );
    let r = g.op(
        "relu",
        Op::Unary(Activation::plain(ActKind::Relu)),
        &[c],
        DType::F32,
        &[1, 4, 8, 8],
    );
    let p = g.op(
        "pool",
        pool(true, [2, 2], [2, 2], [0; 4], false),
        &[r],
        DType::F32,
        &[1, 4, 4, 4],
    );
    let f = g.op("flatten", Op::Reshape, &[p], DType::F32, &[1, 64]);
    let dw = g.weight("fc.w", &[10, 64]);
    let db = g.weight("fc.b", &[10]);
    let y = g.op(
        "fc",
        Op::Dense(Dense {
            act: Activation::NONE,
        }),
        &[f, dw, db],
        DType::F32,
        &[1, 10],
    );
    let yf = g.alias("logits.flat", y, &[10]);
    g.output("logits", y);
    g.output("logits_flat", yf);
    g.meta("producer", "parse_robustness");
    g.meta("model", "tiny-cnn");
    g.finish()
}

/// Token ids -> embedding Gather (i64 indices), positional Gather with const i64 indices,
/// broadcasting Add, LayerNorm, Q·Kᵀ MatMul with permuted axes (scratch), scale, Softmax, P·V
/// MatMul, Transpose, Concat with a constant, strided Slice with a negative step.
fn model_attention() -> ModelFile {
    let mut g = Graph::default();
    let ids = g.input("ids", DType::I64, &[1, 4]);
    let table = g.weight("embed", &[16, 8]);
    let e = g.op(
        "embed",
        Op::Gather { axis: 0 },
        &[table, ids],
        DType::F32,
        &[1, 4, 8],
    );
    let pos_table = g.weight("pos", &[6, 8]);
    let pos_idx = g.constant(
        "pos.idx",
        DType::I64,
        &[4],
        (0i64..4).flat_map(|v| v.to_le_bytes()).collect(),
    );
    let pe = g.op(
        "pos",
        Op::Gather { axis: 0 },
        &[pos_table, pos_idx],
        DType::F32,
        &[4, 8],
    );
    let h = g.op(
        "add",
        Op::Binary(BinaryKind::Add),
        &[e, pe],
        DType::F32,
        &[1, 4, 8],
    );
    let gamma = g.weight("ln.g", &[8]);
    let beta = g.weight("ln.b", &[8]);
    let n = g.op(
        "ln",
        Op::LayerNorm {
            axis: 2,
            eps: 1e-5,
            rms: false,
        },
        &[h, gamma, beta],
        DType::F32,
        &[1, 4, 8],
    );
    let qk = MatMul {
        a_m: 1,
        a_k: 2,
        b_k: 2,
        b_n: 1,
        y_m: 1,
        y_n: 2,
    };
    let s = g.op("qk", Op::MatMul(qk), &[n, n], DType::F32, &[1, 4, 4]);
    let scale = g.constant("scale", DType::F32, &[1], 0.35f32.to_le_bytes().to_vec());
    let s2 = g.op(
        "scale",
        Op::Binary(BinaryKind::Mul),
        &[s, scale],
        DType::F32,
        &[1, 4, 4],
    );
    let pr = g.op(
        "softmax",
        Op::Softmax { axis: 2 },
        &[s2],
        DType::F32,
        &[1, 4, 4],
    );
    let ctx = g.op(
        "pv",
        Op::MatMul(MatMul::standard(3)),
        &[pr, n],
        DType::F32,
        &[1, 4, 8],
    );
    let t = g.op(
        "transpose",
        Op::Transpose {
            perm: [0, 2, 1, 3, 4, 5],
        },
        &[ctx],
        DType::F32,
        &[1, 8, 4],
    );
    let extra = g.weight("extra", &[1, 8, 2]);
    let cc = g.op(
        "concat",
        Op::Concat { axis: 2 },
        &[t, extra],
        DType::F32,
        &[1, 8, 6],
    );
    let sl = g.op(
        "slice",
        Op::Slice {
            starts: [0, 1, 5, 0, 0, 0],
            steps: [1, 2, -1, 1, 1, 1],
        },
        &[cc],
        DType::F32,
        &[1, 4, 6],
    );
    g.output("out", sl);
    g.output("ctx", ctx);
    g.meta("producer", "parse_robustness");
    g.meta("model", "tiny-attention");
    g.finish()
}

/// Element-wise and reduction ops: broadcasting Mul, Reduce, Expand, IsNan, Where, Clip, Cast,
/// comparison with a rank-0 constant, logical And.
fn model_elementwise() -> ModelFile {
    let mut g = Graph::default();
    let a = g.input("a", DType::F32, &[2, 3, 4]);
    let b = g.input("b", DType::F32, &[3, 1]);
    let m = g.op(
        "mul",
        Op::Binary(BinaryKind::Mul),
        &[a, b],
        DType::F32,
        &[2, 3, 4],
    );
    let r = g.op(
        "mean",
        Op::Reduce {
            kind: ReduceKind::Mean,
            axes: 0b100,
            keep_dims: true,
        },
        &[m],
        DType::F32,
        &[2, 3, 1],
    );
    let ex = g.op("expand", Op::Expand, &[r], DType::F32, &[2, 3, 4]);
    let nan = g.op("isnan", Op::IsNan, &[m], DType::Bool, &[2, 3, 4]);
    let w = g.op("where", Op::Where, &[nan, ex, m], DType::F32, &[2, 3, 4]);
    let cl = g.op(
        "clip",
        Op::Unary(Activation {
            kind: ActKind::Clip,
            a: -1.0,
            b: 1.0,
        }),
        &[w],
        DType::F32,
        &[2, 3, 4],
    );
    let ci = g.op("cast", Op::Cast, &[cl], DType::I32, &[2, 3, 4]);
    let zero = g.constant("zero", DType::I32, &[], 0i32.to_le_bytes().to_vec());
    let gt = g.op(
        "gt",
        Op::Binary(BinaryKind::Greater),
        &[ci, zero],
        DType::Bool,
        &[2, 3, 4],
    );
    let and = g.op(
        "and",
        Op::Binary(BinaryKind::And),
        &[gt, nan],
        DType::Bool,
        &[2, 3, 4],
    );
    g.output("ints", ci);
    g.output("mask", and);
    g.meta("producer", "parse_robustness");
    g.finish()
}

/// A mobile-style block: depthwise Conv (plain weight, fused Relu), pointwise Conv (panel weight,
/// Clip), strided 3x3 Conv with Cin = 4 (im2col scratch), padded AvgPool, Reduce, Dense with a
/// panel weight and HardSwish.
fn model_mobile() -> ModelFile {
    let mut g = Graph::default();
    let x = g.input("image", DType::F32, &[1, 2, 6, 6]);
    let dw_w = g.weight("dw.w", &[2, 9]);
    let dw_b = g.weight("dw.b", &[2]);
    let relu = Activation::plain(ActKind::Relu);
    let d = g.op(
        "dw",
        conv([3, 3], [1, 1], [1; 4], 2, relu, 0),
        &[x, dw_w, dw_b],
        DType::F32,
        &[1, 2, 6, 6],
    );
    let pw_w = g.panel_weight("pw.w", 4, 2);
    let clip6 = Activation {
        kind: ActKind::Clip,
        a: 0.0,
        b: 6.0,
    };
    let p = g.op(
        "pw",
        conv([1, 1], [1, 1], [0; 4], 1, clip6, 0),
        &[d, pw_w],
        DType::F32,
        &[1, 4, 6, 6],
    );
    let c_w = g.panel_weight("c3.w", 4, 36);
    let c = g.op(
        "c3",
        conv([3, 3], [2, 2], [1; 4], 1, Activation::NONE, 9),
        &[p, c_w],
        DType::F32,
        &[1, 4, 3, 3],
    );
    let ap = g.op(
        "avgpool",
        pool(false, [3, 3], [2, 2], [1; 4], true),
        &[c],
        DType::F32,
        &[1, 4, 2, 2],
    );
    let gap = g.op(
        "gap",
        Op::Reduce {
            kind: ReduceKind::Mean,
            axes: 0b1100,
            keep_dims: false,
        },
        &[ap],
        DType::F32,
        &[1, 4],
    );
    let fw = g.panel_weight("head.w", 3, 4);
    let hs = Activation {
        kind: ActKind::HardSwish,
        a: 1.0 / 6.0,
        b: 0.5,
    };
    let y = g.op(
        "head",
        Op::Dense(Dense { act: hs }),
        &[gap, fw],
        DType::F32,
        &[1, 3],
    );
    g.output("scores", y);
    g.finish()
}

fn valid_models() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("cnn", model_cnn().to_bytes()),
        ("attention", model_attention().to_bytes()),
        ("elementwise", model_elementwise().to_bytes()),
        ("mobile", model_mobile().to_bytes()),
    ]
}

// ---------------------------------------------------------------------------------------------
// Using an accepted model: everything validation promises must hold and nothing may panic.

/// Walks every tensor, op, graph input/output and metadata entry; returns a digest so the work
/// is not optimized away. Panics (caught by the caller) when a promise of validation is broken.
fn walk(m: &Model<'_>) -> u64 {
    let mut acc = m.arena_bytes() ^ m.file_len() ^ m.checksum() as u64;
    assert!(
        m.bytes().len() as u64 == m.file_len(),
        "bytes() covers the file"
    );
    let n = m.tensor_count();
    for i in 0..n {
        let t = m.tensor(i);
        assert_eq!(t.id, i);
        acc = acc.wrapping_add(
            t.name.len() as u64 ^ t.offset ^ t.len ^ t.live.0 as u64 ^ t.params[0] as u64,
        );
        let s = t.meta.shape;
        assert!(s.rank() <= edgetune_core::MAX_RANK);
        assert!(
            !s.dims().contains(&0),
            "tensor {i}: zero dimension accepted"
        );
        let numel = s.checked_numel().expect("validated shapes do not overflow");
        acc = acc.wrapping_add(numel ^ s.strides()[0] as u64);
        match t.meta.storage {
            Storage::Const => {
                let b = m.const_bytes(i);
                assert_eq!(b.len() as u64, t.len, "tensor {i}: const_bytes length");
                assert_eq!(
                    t.offset % format::ALIGN,
                    0,
                    "tensor {i}: const offset alignment"
                );
                assert_eq!(
                    b.as_ptr() as usize % 8,
                    0,
                    "tensor {i}: const bytes not 8-aligned"
                );
                acc = acc.wrapping_add(b.iter().take(16).map(|&v| v as u64).sum::<u64>());
            }
            Storage::Arena => {
                assert_eq!(
                    t.meta.encoding,
                    Encoding::Plain,
                    "tensor {i}: encoded arena tensor"
                );
                assert_eq!(t.offset % 16, 0, "tensor {i}: arena offset alignment");
                let end = t.offset.checked_add(t.len).expect("arena range overflows");
                assert!(end <= m.arena_bytes(), "tensor {i}: outside the arena");
                assert!(t.live.0 <= t.live.1, "tensor {i}: empty live range");
                if let Some(r) = t.alias_of {
                    assert!(r < n, "tensor {i}: alias of missing tensor");
                    let root = m.tensor(r);
                    assert!(root.alias_of.is_none(), "tensor {i}: alias of an alias");
                    assert_eq!(
                        (root.offset, root.len, root.live),
                        (t.offset, t.len, t.live)
                    );
                }
            }
        }
    }
    let n_ops = m.op_count();
    for (k, op) in m.ops().enumerate() {
        assert_eq!(op.index, k as u32);
        acc = acc
            .wrapping_add(op.name.len() as u64 + op.op.name().len() as u64 + op.op.code() as u64);
        let words = op.op.encode();
        let again = Op::decode(op.op.code() as u16, words.as_slice(), Place::Op(op.index))
            .expect("a validated op re-decodes from its own encoding");
        assert_eq!(again.encode(), words, "op {k}: encode/decode round trip");
        assert!(op.n_inputs() <= format::MAX_OP_INPUTS);
        for j in 0..op.n_inputs() {
            let id = op.input(j);
            assert!(id < n, "op {k}: input id {id} out of range");
            let t = m.tensor(id);
            if t.meta.storage == Storage::Arena {
                assert!(
                    t.live.0 < k as u32 + 1 && t.live.1 > k as u32,
                    "op {k}: input {id} not live"
                );
            }
        }
        let mut outs = 0;
        for id in op.outputs() {
            outs += 1;
            assert!(id < n, "op {k}: output id {id} out of range");
            let t = m.tensor(id);
            assert_eq!(t.meta.storage, Storage::Arena, "op {k}: writes a constant");
            assert_eq!(t.live.0, k as u32 + 1, "op {k}: output {id} live range");
            acc = acc.wrapping_add(op.output(0) as u64);
        }
        assert_eq!(outs, 1, "op {k}: output count");
        assert_eq!(op.inputs().count(), op.n_inputs());
        if let Some(s) = op.scratch {
            assert!(s < n, "op {k}: scratch id out of range");
            let t = m.tensor(s);
            assert_eq!(
                t.live,
                (k as u32 + 1, k as u32 + 1),
                "op {k}: scratch not private"
            );
        }
    }
    let (mut ni, mut no) = (0, 0);
    for io in m.inputs() {
        assert!(io.tensor < n);
        assert_eq!(m.tensor(io.tensor).live.0, 0);
        acc = acc.wrapping_add(io.name.len() as u64);
        ni += 1;
    }
    for io in m.outputs() {
        assert!(io.tensor < n);
        assert_eq!(m.tensor(io.tensor).live.1, n_ops + 1);
        acc = acc.wrapping_add(io.name.len() as u64);
        no += 1;
    }
    assert!(no >= 1, "accepted model without outputs");
    assert!(m.input(ni).is_none() && m.output(no).is_none());
    let _ = (m.input(0), m.output(0));
    for (k, v) in m.meta_entries() {
        acc = acc.wrapping_add(k.len() as u64 ^ v.len() as u64);
        assert!(m.meta(k).is_some());
    }
    acc
}

// ---------------------------------------------------------------------------------------------
// Panic capture.

thread_local! {
    /// Set while a mutation runs: the panic hook records instead of printing.
    static CAPTURE: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn install_quiet_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let captured = CAPTURE.with(|c| {
                let mut c = c.borrow_mut();
                match c.as_mut() {
                    Some(slot) => {
                        *slot = info.to_string();
                        true
                    }
                    None => false,
                }
            });
            if !captured {
                prev(info);
            }
        }));
    });
}

/// Outcome of one parse: the walk's digest when accepted, else the typed error.
type Parsed = Result<u64, FormatError>;

/// Parses `bytes` from an aligned buffer and walks the model on success; a panic anywhere is
/// returned as `Err(message)`.
fn parse_and_walk(bytes: &[u8]) -> Result<Parsed, String> {
    install_quiet_hook();
    let buf = Aligned::new(bytes);
    CAPTURE.with(|c| *c.borrow_mut() = Some(String::new()));
    let r = catch_unwind(AssertUnwindSafe(|| {
        Model::from_bytes(buf.bytes()).map(|m| walk(&m))
    }));
    let msg = CAPTURE.with(|c| c.borrow_mut().take()).unwrap_or_default();
    r.map_err(|_| msg)
}

// ---------------------------------------------------------------------------------------------
// File surgery.

fn header(b: &[u8]) -> FileHeader {
    FileHeader::read_from_prefix(b).expect("64-byte header").0
}

fn sections(b: &[u8]) -> Vec<SectionEntry> {
    let h = header(b);
    let n = h.section_count.get() as usize;
    <[SectionEntry]>::ref_from_bytes(&b[64..64 + n * size_of::<SectionEntry>()])
        .expect("section table")
        .to_vec()
}

fn section_of(b: &[u8], kind: format::SectionKind) -> (usize, usize) {
    let s = sections(b)
        .into_iter()
        .find(|s| s.kind.get() == kind as u32)
        .expect("section present");
    (s.offset.get() as usize, s.len.get() as usize)
}

fn fix_crc(b: &mut [u8]) {
    if b.len() >= CRC_OFFSET + 4 {
        let crc = format::file_crc(b);
        b[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    if at < b.len() {
        let n = v.len().min(b.len() - at);
        b[at..at + n].copy_from_slice(&v[..n]);
    }
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    put(b, at, &v.to_le_bytes())
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    put(b, at, &v.to_le_bytes())
}

const H_MAJOR: usize = offset_of!(FileHeader, version_major);
const H_HEADER_LEN: usize = offset_of!(FileHeader, header_len);
const H_FILE_LEN: usize = offset_of!(FileHeader, file_len);
const H_SECTION_COUNT: usize = offset_of!(FileHeader, section_count);
const H_ARENA: usize = offset_of!(FileHeader, arena_bytes);
const S_KIND: usize = offset_of!(SectionEntry, kind);
const S_COUNT: usize = offset_of!(SectionEntry, count);
const S_OFFSET: usize = offset_of!(SectionEntry, offset);
const S_LEN: usize = offset_of!(SectionEntry, len);

const INTERESTING_U32: [u32; 16] = [
    0,
    1,
    2,
    3,
    7,
    16,
    64,
    0x7F,
    0x80,
    0xFF,
    0xFFFF,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFF0,
    0xFFFF_FFFE,
    0xFFFF_FFFF,
];

const INTERESTING_U64: [u64; 8] = [
    0,
    1,
    64,
    0x1_0000_0000,
    0x7FFF_FFFF_FFFF_FFFF,
    0x8000_0000_0000_0000,
    0xFFFF_FFFF_FFFF_FFC0,
    u64::MAX,
];

// ---------------------------------------------------------------------------------------------
// The harness.

/// Counts and failures of one run.
#[derive(Default)]
struct Stats {
    cases: usize,
    accepted: usize,
    failures: Vec<String>,
}

impl Stats {
    /// Runs one mutated file; `check` may assert on the result (its panics are failures too).
    fn run(
        &mut self,
        what: impl FnOnce() -> String,
        bytes: &[u8],
        check: impl FnOnce(&Parsed) -> Result<(), String>,
    ) {
        self.cases += 1;
        match parse_and_walk(bytes) {
            Err(panic) => self.fail(what(), format!("PANIC: {panic}"), bytes),
            Ok(parsed) => {
                if parsed.is_ok() {
                    self.accepted += 1;
                }
                if let Err(e) = check(&parsed) {
                    self.fail(what(), e, bytes);
                }
            }
        }
    }

    fn fail(&mut self, what: String, why: String, bytes: &[u8]) {
        if self.failures.len() < 40 {
            let mut hex = String::new();
            if bytes.len() <= 2048 {
                for b in bytes {
                    let _ = write!(hex, "{b:02x}");
                }
            } else {
                hex = format!("<{} bytes>", bytes.len());
            }
            self.failures
                .push(format!("{what}: {why}\n    bytes: {hex}"));
        } else if self.failures.len() == 40 {
            self.failures.push("... (more failures)".into());
        }
    }
}

fn any(_: &Parsed) -> Result<(), String> {
    Ok(())
}

fn must_reject(p: &Parsed) -> Result<(), String> {
    match p {
        Err(_) => Ok(()),
        Ok(_) => Err("accepted a file that cannot be valid".into()),
    }
}

/// What the parser must say about a same-length mutation whose CRC was NOT recomputed, by the
/// header fields checked before the checksum: magic, major version and header length, file
/// length, then the checksum itself.
fn expect_stale_crc(orig: &[u8], m: &[u8], p: &Parsed) -> Result<(), String> {
    if m == orig {
        return if p.is_ok() {
            Ok(())
        } else {
            Err(format!("unchanged file rejected: {p:?}"))
        };
    }
    let (ho, hm) = (header(orig), header(m));
    let ok = if hm.magic != MAGIC {
        matches!(p, Err(FormatError::BadMagic))
    } else if hm.version_major.get() != format::VERSION_MAJOR || hm.header_len.get() != 64 {
        *p == Err(FormatError::UnsupportedVersion {
            major: hm.version_major.get(),
            minor: hm.version_minor.get(),
        })
    } else if hm.file_len.get() > m.len() as u64 || hm.file_len.get() < 64 {
        *p == Err(FormatError::Truncated {
            place: Place::Header,
            needed: hm.file_len.get(),
            available: m.len() as u64,
        })
    } else {
        let _ = ho;
        matches!(p, Err(FormatError::Checksum { stored, computed }) if *stored == hm.crc32.get() && computed != stored)
    };
    if ok {
        Ok(())
    } else {
        Err(format!("stale-CRC mutation gave {p:?}"))
    }
}

/// Runs `mutate` on a copy of `orig` twice: with the stale CRC (asserting the exact error the
/// header checks give) and with a recomputed CRC (asserting no panic and `extra`).
fn both(
    st: &mut Stats,
    name: &str,
    orig: &[u8],
    what: &str,
    mutate: impl FnOnce(&mut Vec<u8>),
    extra: impl FnOnce(&Parsed) -> Result<(), String>,
) {
    let mut m = orig.to_vec();
    mutate(&mut m);
    let same_len = m.len() == orig.len();
    st.run(
        || format!("[{name}] {what} (stale CRC)"),
        &m,
        |p| {
            if same_len && m.len() >= 64 {
                expect_stale_crc(orig, &m, p)
            } else {
                Ok(())
            }
        },
    );
    fix_crc(&mut m);
    st.run(|| format!("[{name}] {what} (CRC fixed)"), &m, extra);
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn valid_models_are_accepted() {
    for (name, bytes) in valid_models() {
        assert_eq!(bytes.len() % 64, 0, "{name}: writer pads to 64");
        let buf = Aligned::new(&bytes);
        let m = Model::from_bytes(buf.bytes())
            .unwrap_or_else(|e| panic!("{name}: valid model rejected: {e} ({e:?})"));
        walk(&m);
        assert!(
            m.op_count() >= 5 && m.tensor_count() >= 8,
            "{name}: model too small"
        );
        assert!(m.outputs().count() >= 1);
        // Trailing bytes past file_len (a flash partition) are ignored.
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0xA5; 100]);
        let buf = Aligned::new(&longer);
        let m2 = Model::from_bytes(buf.bytes())
            .unwrap_or_else(|e| panic!("{name}: trailing bytes rejected: {e}"));
        assert_eq!(m2.file_len(), bytes.len() as u64);
    }
}

#[test]
fn specific_errors() {
    for (name, bytes) in valid_models() {
        let crc = header(&bytes).crc32.get();
        let len = bytes.len() as u64;

        // Misaligned buffer.
        let (words, n) = Aligned::misaligned_copy(&bytes);
        let view = &words.as_bytes()[1..1 + n];
        assert_eq!(
            Model::from_bytes(view).err(),
            Some(FormatError::MisalignedBuffer { required: 8 }),
            "{name}"
        );

        // Truncations: shorter than the header, and cut anywhere after it.
        for cut in [0usize, 1, 8, 63] {
            let buf = Aligned::new(&bytes[..cut]);
            assert_eq!(
                Model::from_bytes(buf.bytes()).err(),
                Some(FormatError::Truncated {
                    place: Place::Header,
                    needed: 64,
                    available: cut as u64
                }),
                "{name}: cut at {cut}"
            );
        }
        for cut in [64usize, 100, bytes.len() / 2, bytes.len() - 1] {
            let buf = Aligned::new(&bytes[..cut]);
            assert_eq!(
                Model::from_bytes(buf.bytes()).err(),
                Some(FormatError::Truncated {
                    place: Place::Header,
                    needed: len,
                    available: cut as u64
                }),
                "{name}: cut at {cut}"
            );
        }

        // Bad magic (even with a recomputed CRC).
        for at in 0..MAGIC.len() {
            let mut m = bytes.clone();
            m[at] ^= 0x20;
            fix_crc(&mut m);
            assert_eq!(
                Model::from_bytes(Aligned::new(&m).bytes()).err(),
                Some(FormatError::BadMagic),
                "{name}"
            );
        }

        // Unsupported major version.
        let mut m = bytes.clone();
        put(&mut m, H_MAJOR, &(format::VERSION_MAJOR + 1).to_le_bytes());
        fix_crc(&mut m);
        assert_eq!(
            Model::from_bytes(Aligned::new(&m).bytes()).err(),
            Some(FormatError::UnsupportedVersion {
                major: format::VERSION_MAJOR + 1,
                minor: format::VERSION_MINOR
            }),
            "{name}"
        );
        // A newer minor version is read (it may only add sections).
        let mut m = bytes.clone();
        put(
            &mut m,
            H_MAJOR + 2,
            &(format::VERSION_MINOR + 1).to_le_bytes(),
        );
        fix_crc(&mut m);
        assert!(
            Model::from_bytes(Aligned::new(&m).bytes()).is_ok(),
            "{name}: newer minor rejected"
        );

        // A flipped byte anywhere past the CRC field, with the old CRC: checksum error.
        for at in [CRC_OFFSET + 4, 64, 200, bytes.len() / 2, bytes.len() - 1] {
            let mut m = bytes.clone();
            m[at] ^= 0x01;
            match Model::from_bytes(Aligned::new(&m).bytes()) {
                Err(FormatError::Checksum { stored, computed }) => {
                    assert_eq!(stored, crc, "{name}");
                    assert_ne!(computed, crc, "{name}");
                }
                other => panic!(
                    "{name}: flip at {at}: expected Checksum, got {:?}",
                    other.err()
                ),
            }
        }
        // A wrong stored CRC.
        let mut m = bytes.clone();
        put_u32(&mut m, CRC_OFFSET, crc ^ 1);
        assert_eq!(
            Model::from_bytes(Aligned::new(&m).bytes()).err(),
            Some(FormatError::Checksum {
                stored: crc ^ 1,
                computed: crc
            }),
            "{name}"
        );

        // Section table damage past the checksum (CRC recomputed).
        let secs = sections(&bytes);
        let entry = |i: usize| 64 + i * size_of::<SectionEntry>();
        let tensors_idx = secs
            .iter()
            .position(|s| s.kind.get() == format::SectionKind::Tensors as u32)
            .unwrap();
        let check = |mutate: &dyn Fn(&mut Vec<u8>), want: FormatError| {
            let mut m = bytes.clone();
            mutate(&mut m);
            fix_crc(&mut m);
            assert_eq!(
                Model::from_bytes(Aligned::new(&m).bytes()).err(),
                Some(want),
                "{name}"
            );
        };
        // Unknown kind: the tensor section goes missing.
        check(
            &|m| put_u32(m, entry(tensors_idx) + S_KIND, 1000),
            FormatError::Section {
                kind: 2,
                problem: edgetune_core::error::SectionProblem::Missing,
            },
        );
        // Same kind twice.
        let other = (tensors_idx + 1) % secs.len();
        check(
            &|m| put_u32(m, entry(other) + S_KIND, 2),
            FormatError::Section {
                kind: 2,
                problem: edgetune_core::error::SectionProblem::Duplicate,
            },
        );
        // Ragged length (not a whole number of tensor records).
        let tlen = secs[tensors_idx].len.get();
        check(
            &|m| put_u64(m, entry(tensors_idx) + S_LEN, tlen - 1),
            FormatError::Section {
                kind: 2,
                problem: edgetune_core::error::SectionProblem::RaggedLength,
            },
        );
        // Misaligned section offset.
        let toff = secs[tensors_idx].offset.get();
        check(
            &|m| put_u64(m, entry(tensors_idx) + S_OFFSET, toff + 8),
            FormatError::Misaligned {
                place: Place::Section(tensors_idx as u32),
                offset: toff + 8,
                required: 64,
            },
        );
        // Section past the end of the file.
        check(
            &|m| put_u64(m, entry(tensors_idx) + S_LEN, len),
            FormatError::OutOfBounds {
                place: Place::Section(tensors_idx as u32),
                offset: toff,
                len,
                limit: len,
            },
        );
        // Section table longer than the file.
        check(
            &|m| put_u32(m, H_SECTION_COUNT, u32::MAX),
            FormatError::Truncated {
                place: Place::Header,
                needed: 64 + u32::MAX as u64 * 24,
                available: len,
            },
        );
    }
}

/// The property test: >= 10,000 mutated files, none may panic the parser or a walk of what it
/// accepts.
#[test]
fn mutated_files_never_panic() {
    let models = valid_models();
    let mut st = Stats::default();
    for (mi, (name, orig)) in models.iter().enumerate() {
        let name = *name;
        let orig = orig.as_slice();
        let len = orig.len();
        let buf = Aligned::new(orig);
        assert!(
            Model::from_bytes(buf.bytes()).is_ok(),
            "{name} must be valid before mutating it"
        );
        let data_start = section_of(orig, format::SectionKind::Data).0;
        let last_section_end = sections(orig)
            .iter()
            .map(|s| (s.offset.get() + s.len.get()) as usize)
            .max()
            .unwrap_or(64);

        // 1. Truncation at every length: exact error with the stored file_len; with file_len
        //    rewritten to the cut (and CRC fixed), any cut into a section is rejected.
        for cut in 0..len {
            let t = &orig[..cut];
            let want_needed = if cut < 64 { 64 } else { len as u64 };
            st.run(
                || format!("[{name}] truncate to {cut}"),
                t,
                |p| match p {
                    Err(FormatError::Truncated {
                        place: Place::Header,
                        needed,
                        available,
                    }) if *needed == want_needed && *available == cut as u64 => Ok(()),
                    other => Err(format!("expected Truncated, got {other:?}")),
                },
            );
            if cut >= 64 {
                let mut m = t.to_vec();
                put_u64(&mut m, H_FILE_LEN, cut as u64);
                fix_crc(&mut m);
                let into_content = cut < last_section_end;
                st.run(
                    || format!("[{name}] truncate to {cut} with file_len rewritten"),
                    &m,
                    |p| if into_content { must_reject(p) } else { Ok(()) },
                );
            }
        }

        // 2. Every single bit of the metadata (everything before the weights), both CRC modes.
        for at in 0..data_start.min(len) {
            for bit in 0..8 {
                both(
                    &mut st,
                    name,
                    orig,
                    &format!("flip bit {bit} of byte {at}"),
                    |m| m[at] ^= 1 << bit,
                    any,
                );
            }
        }

        let mut rng = Rng::new(0xE7A0_0000 + mi as u64);

        // 3. Interesting values over every word (and byte) of every record section.
        for kind in [
            format::SectionKind::Tensors,
            format::SectionKind::Ops,
            format::SectionKind::OpTensors,
            format::SectionKind::Attrs,
            format::SectionKind::GraphIo,
            format::SectionKind::Meta,
        ] {
            let (off, slen) = section_of(orig, kind);
            for at in (off..off + slen).step_by(4) {
                for &v in &INTERESTING_U32 {
                    let mut m = orig.to_vec();
                    put_u32(&mut m, at, v);
                    fix_crc(&mut m);
                    st.run(
                        || format!("[{name}] {kind:?} word at {at} := {v:#x} (CRC fixed)"),
                        &m,
                        any,
                    );
                }
                // Neighbours of the stored value (off-by-one ids, lengths, offsets).
                let cur = u32::from_le_bytes(orig[at..at + 4].try_into().unwrap());
                for v in [
                    cur.wrapping_add(1),
                    cur.wrapping_sub(1),
                    cur.wrapping_add(16),
                    cur ^ 0x8000_0000,
                ] {
                    let mut m = orig.to_vec();
                    put_u32(&mut m, at, v);
                    fix_crc(&mut m);
                    st.run(
                        || format!("[{name}] {kind:?} word at {at} := {v:#x} (CRC fixed)"),
                        &m,
                        any,
                    );
                }
                if at + 8 <= off + slen && rng.below(4) == 0 {
                    let v = rng.pick(&INTERESTING_U64);
                    let mut m = orig.to_vec();
                    put_u64(&mut m, at, v);
                    fix_crc(&mut m);
                    st.run(
                        || format!("[{name}] {kind:?} u64 at {at} := {v:#x} (CRC fixed)"),
                        &m,
                        any,
                    );
                }
            }
            // Byte-sized fields (dtype, encoding, rank, storage, arity).
            if matches!(
                kind,
                format::SectionKind::Tensors | format::SectionKind::Ops
            ) {
                let rec = if kind == format::SectionKind::Tensors {
                    size_of::<TensorRecord>()
                } else {
                    size_of::<OpRecord>()
                };
                for r0 in (off..off + slen).step_by(rec) {
                    for at in r0..r0 + 4 {
                        for v in [0u8, 1, 2, 3, 5, 6, 7, 8, 33, 0x7F, 0xFF] {
                            let mut m = orig.to_vec();
                            m[at] = v;
                            fix_crc(&mut m);
                            st.run(
                                || format!("[{name}] {kind:?} byte at {at} := {v} (CRC fixed)"),
                                &m,
                                any,
                            );
                        }
                    }
                }
            }
        }

        // 3b. Pairs of adjacent attribute words (kernel h/w, strides, pads...) both set large.
        {
            let (off, slen) = section_of(orig, format::SectionKind::Attrs);
            let big = [0xFFFF_FFFFu32, 0x8000_0001, 0x0001_0000];
            for at in (off..(off + slen).saturating_sub(4)).step_by(4) {
                for &v in &big {
                    for &w in &big {
                        let mut m = orig.to_vec();
                        put_u32(&mut m, at, v);
                        put_u32(&mut m, at + 4, w);
                        fix_crc(&mut m);
                        st.run(
                            || {
                                format!(
                                    "[{name}] Attrs words at {at} := {v:#x}, {w:#x} (CRC fixed)"
                                )
                            },
                            &m,
                            any,
                        );
                    }
                }
            }
        }

        // 3c. One dimension of one tensor made huge, with the tensor's byte length recomputed to
        //     match (arena tensors cost nothing at validation time, so op shape checks see it).
        {
            let (off, slen) = section_of(orig, format::SectionKind::Tensors);
            let rec = size_of::<TensorRecord>();
            for r0 in (off..off + slen).step_by(rec) {
                let t = TensorRecord::read_from_bytes(&orig[r0..r0 + rec]).unwrap();
                let (Some(dtype), Some(enc)) =
                    (DType::from_code(t.dtype), Encoding::from_code(t.encoding))
                else {
                    continue;
                };
                for d in 0..(t.rank as usize).min(edgetune_core::MAX_RANK) {
                    for v in [
                        0xFFFF_FFFFu32,
                        0xFFFF_FFFE,
                        0x8000_0000,
                        0x0001_0000,
                        0xFFFF,
                    ] {
                        let mut dims = [0u32; edgetune_core::MAX_RANK];
                        for (o, s) in dims.iter_mut().zip(&t.dims) {
                            *o = s.get();
                        }
                        dims[d] = v;
                        let Some(sh) = Shape::from_stored(t.rank, dims) else {
                            continue;
                        };
                        let Some(new_len) =
                            edgetune_core::tensor::encoded_len(dtype, enc, &sh, [0; 4])
                        else {
                            continue;
                        };
                        let mut m = orig.to_vec();
                        put_u32(&mut m, r0 + offset_of!(TensorRecord, dims) + 4 * d, v);
                        put_u64(&mut m, r0 + offset_of!(TensorRecord, len), new_len);
                        put_u64(&mut m, H_ARENA, u64::MAX);
                        fix_crc(&mut m);
                        st.run(
                            || {
                                format!(
                                    "[{name}] tensor record at {r0}: dim {d} := {v:#x}, len := {new_len} (CRC fixed)"
                                )
                            },
                            &m,
                            any,
                        );
                    }
                }
            }
        }

        // 4. Header fields and the section table, each stale and CRC-fixed.
        let h_fields: [(usize, usize, &str); 5] = [
            (H_FILE_LEN, 8, "file_len"),
            (H_SECTION_COUNT, 4, "section_count"),
            (H_ARENA, 8, "arena_bytes"),
            (H_HEADER_LEN, 4, "header_len"),
            (H_MAJOR, 2, "version_major"),
        ];
        let special_len = [
            0u64,
            1,
            63,
            64,
            65,
            len as u64 - 64,
            len as u64 - 1,
            len as u64 + 1,
            len as u64 + 64,
        ];
        for (at, width, field) in h_fields {
            let mut values: Vec<u64> = INTERESTING_U64.to_vec();
            values.extend(INTERESTING_U32.iter().map(|&v| v as u64));
            values.extend(special_len);
            for _ in 0..8 {
                values.push(rng.next() >> rng.below(64));
            }
            for v in values {
                let bytes = v.to_le_bytes();
                both(
                    &mut st,
                    name,
                    orig,
                    &format!("header {field} := {v:#x}"),
                    |m| put(m, at, &bytes[..width]),
                    any,
                );
            }
        }
        let n_sec = sections(orig).len();
        for i in 0..n_sec {
            let e = 64 + i * size_of::<SectionEntry>();
            let sec = sections(orig)[i];
            let (so, sl) = (sec.offset.get(), sec.len.get());
            let mut offs = vec![
                0,
                64,
                so.wrapping_sub(64),
                so + 64,
                so + 8,
                len as u64,
                u64::MAX - 63,
                1 << 63,
            ];
            offs.push((rng.below(len) as u64) & !63);
            let mut lens = vec![
                0,
                1,
                sl.wrapping_sub(1),
                sl + 1,
                sl + 4,
                sl + 16,
                sl + 80,
                len as u64,
                u64::MAX,
            ];
            lens.push(rng.below(len) as u64);
            let kinds = [0u32, 3, 9, 0xFFFF_FFFF, (sec.kind.get() % 8) + 1];
            for v in offs {
                both(
                    &mut st,
                    name,
                    orig,
                    &format!("section {i} offset := {v:#x}"),
                    |m| put_u64(m, e + S_OFFSET, v),
                    any,
                );
            }
            for v in lens {
                both(
                    &mut st,
                    name,
                    orig,
                    &format!("section {i} len := {v:#x}"),
                    |m| put_u64(m, e + S_LEN, v),
                    any,
                );
            }
            for v in kinds {
                both(
                    &mut st,
                    name,
                    orig,
                    &format!("section {i} kind := {v}"),
                    |m| put_u32(m, e + S_KIND, v),
                    any,
                );
            }
            for v in [0u32, 1, u32::MAX, rng.next() as u32] {
                both(
                    &mut st,
                    name,
                    orig,
                    &format!("section {i} count := {v}"),
                    |m| put_u32(m, e + S_COUNT, v),
                    any,
                );
            }
            // Swap two entries' offsets (sections read each other's bytes).
            let j = (i + 1 + rng.below(n_sec - 1)) % n_sec;
            let other = sections(orig)[j];
            both(
                &mut st,
                name,
                orig,
                &format!("section {i} takes section {j}'s offset and len"),
                |m| {
                    put_u64(m, e + S_OFFSET, other.offset.get());
                    put_u64(m, e + S_LEN, other.len.get());
                },
                any,
            );
        }

        // 5. Random bit flips, byte overwrites and interesting words anywhere in the file.
        for round in 0..600 {
            let seed = rng.next();
            let mut r = Rng::new(seed);
            let kind = round % 4;
            let what = format!("random mutation kind {kind} seed {seed:#x}");
            both(
                &mut st,
                name,
                orig,
                &what,
                |m| match kind {
                    0 => {
                        for _ in 0..1 + r.below(16) {
                            let at = r.below(m.len());
                            m[at] ^= 1 << r.below(8);
                        }
                    }
                    1 => {
                        let at = r.below(m.len());
                        for k in 0..1 + r.below(8) {
                            if at + k < m.len() {
                                m[at + k] = r.byte();
                            }
                        }
                    }
                    2 => {
                        // Metadata only: most interesting for validation past the CRC.
                        for _ in 0..1 + r.below(3) {
                            let at = r.below(data_start) & !3;
                            put_u32(m, at, r.pick(&INTERESTING_U32));
                        }
                    }
                    _ => {
                        // Weights and names only: such files usually stay valid, so the walk runs.
                        let at = data_start + r.below(len - data_start);
                        m[at] = r.byte();
                    }
                },
                any,
            );
        }

        // 6. Splices with another model at random points (prefix of one, suffix of the other),
        //    raw, with CRC fixed, and with file_len fixed too.
        let (other_name, other) = &models[(mi + 1) % models.len()];
        for _ in 0..300 {
            let a = rng.below(len + 1);
            let b = rng.below(other.len() + 1);
            let mut m = orig[..a].to_vec();
            m.extend_from_slice(&other[b..]);
            let what = format!("splice {name}[..{a}] + {other_name}[{b}..]");
            st.run(|| format!("{what} (raw)"), &m, any);
            fix_crc(&mut m);
            st.run(|| format!("{what} (CRC fixed)"), &m, any);
            if m.len() >= 64 {
                let n = m.len() as u64;
                put_u64(&mut m, H_FILE_LEN, n);
                fix_crc(&mut m);
                st.run(|| format!("{what} (file_len and CRC fixed)"), &m, any);
            }
        }
        // Whole record sections swapped between models (same layout, other content).
        for kind in [
            format::SectionKind::Tensors,
            format::SectionKind::Ops,
            format::SectionKind::Attrs,
        ] {
            let (ao, al) = section_of(orig, kind);
            let (bo, bl) = section_of(other, kind);
            let n = al.min(bl);
            let mut m = orig.to_vec();
            m[ao..ao + n].copy_from_slice(&other[bo..bo + n]);
            fix_crc(&mut m);
            st.run(
                || format!("[{name}] {kind:?} bytes from {other_name} (CRC fixed)"),
                &m,
                any,
            );
        }
    }

    // 7. Random garbage: pure noise, noise behind a plausible header, and noise-filled tables.
    let mut rng = Rng::new(0x6A5B_A6E0);
    for i in 0..1500 {
        let seed = rng.next();
        let mut r = Rng::new(seed);
        let n = r.below(700);
        let mut m: Vec<u8> = (0..n).map(|_| r.byte()).collect();
        let mode = i % 3;
        if mode >= 1 && n >= 64 {
            m[..8].copy_from_slice(&MAGIC);
            put(&mut m, H_MAJOR, &format::VERSION_MAJOR.to_le_bytes());
            put_u32(&mut m, H_HEADER_LEN, 64);
            put_u64(&mut m, H_FILE_LEN, n as u64);
            if mode == 2 {
                // A plausible section table of 8 aligned entries.
                put_u32(&mut m, H_SECTION_COUNT, 8);
                for k in 0..8usize {
                    let e = 64 + k * size_of::<SectionEntry>();
                    put_u32(&mut m, e + S_KIND, k as u32 + 1);
                    put_u64(&mut m, e + S_OFFSET, (r.below(n) & !63) as u64);
                    put_u64(&mut m, e + S_LEN, r.below(200) as u64);
                }
            }
            fix_crc(&mut m);
        }
        st.run(
            || format!("garbage mode {mode} seed {seed:#x} len {n}"),
            &m,
            any,
        );
    }

    // 8. The fuzz seeds, if present, must not panic either (any verdict).
    for (path, bytes) in seed_files() {
        st.run(|| format!("fuzz seed {path}"), &bytes, any);
    }

    eprintln!(
        "parse_robustness: {} mutated files, {} accepted, {} failures",
        st.cases,
        st.accepted,
        st.failures.len()
    );
    assert!(st.cases >= 10_000, "only {} cases", st.cases);
    assert!(
        st.accepted > 0,
        "no mutation was accepted: the walk never ran"
    );
    if !st.failures.is_empty() {
        panic!(
            "{} failing mutations:\n{}",
            st.failures.len(),
            st.failures.join("\n")
        );
    }
}

fn seed_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/parse")
}

fn seed_files() -> Vec<(String, Vec<u8>)> {
    let Ok(dir) = std::fs::read_dir(seed_dir()) else {
        return Vec::new();
    };
    let mut out: Vec<_> = dir
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter_map(|p| Some((p.display().to_string(), std::fs::read(&p).ok()?)))
        .collect();
    out.sort();
    out
}

/// Writes the valid models as `cargo fuzz` seeds when `EDGETUNE_WRITE_FUZZ_SEEDS` is set.
#[test]
fn write_fuzz_seeds() {
    if std::env::var_os("EDGETUNE_WRITE_FUZZ_SEEDS").is_none() {
        return;
    }
    let dir = seed_dir();
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in valid_models() {
        assert!(bytes.len() < 20 * 1024, "{name}: seed too large");
        std::fs::write(dir.join(format!("{name}.etm")), &bytes).unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Reproducers for problems found in `core` (reported, not fixed here). Each builds a small file
// (a few hundred bytes) whose arena tensors are huge, which costs nothing at validation time.
// They assert the behaviour `Model::from_bytes` promises (a typed error, never a panic), so they
// fail until core is fixed; run them with `--ignored`.

/// An arena tensor with an explicit placement and live range.
fn placed(name: &str, dtype: DType, dims: &[usize], offset: u64, live: (u32, u32)) -> TensorSpec {
    let mut t = TensorSpec::arena(name, dtype, shape(dims));
    t.arena_offset = offset;
    t.live = live;
    t
}

fn one_op(op: Op, inputs: Vec<u32>, output: u32, scratch: Option<u32>) -> OpSpec {
    OpSpec {
        op,
        inputs,
        outputs: vec![output],
        scratch,
        name: "op".into(),
    }
}

/// Parses with panics caught; `Err(message)` on panic.
fn outcome(f: &ModelFile) -> Result<Result<(), FormatError>, String> {
    let bytes = f.to_bytes();
    parse_and_walk(&bytes).map(|p| p.map(|_| ()))
}

/// Pool: `fl + 1` overflows u32 when the floor-mode output size is u32::MAX (ops.rs, `ok_axis`).
fn repro_pool_fl_plus_one() -> ModelFile {
    let h = u32::MAX as usize;
    let x = placed("x", DType::F32, &[1, 1, h, 1], 0, (0, 1));
    let y_off = x.arena_len.div_ceil(64) * 64;
    let y = placed("y", DType::F32, &[1, 1, 1, 1], y_off, (1, 2));
    ModelFile {
        arena_bytes: y_off + 64,
        tensors: vec![x, y],
        ops: vec![one_op(
            pool(true, [1, 1], [1, 1], [0; 4], false),
            vec![0],
            1,
            None,
        )],
        inputs: vec![("x".into(), 0)],
        outputs: vec![("y".into(), 1)],
        meta: vec![],
    }
}

/// Pool: `(out - 1) * stride` overflows u32 (ops.rs, `ok_axis`). With overflow checks off the
/// product wraps to 0 and a third window that starts past the input (row 2^32) is accepted.
fn repro_pool_ceil_window_wraps() -> ModelFile {
    let h = u32::MAX as usize;
    let x = placed("x", DType::F32, &[1, 1, h, 1], 0, (0, 1));
    let y_off = x.arena_len.div_ceil(64) * 64;
    let y = placed("y", DType::F32, &[1, 1, 3, 1], y_off, (1, 2));
    ModelFile {
        arena_bytes: y_off + 64,
        tensors: vec![x, y],
        ops: vec![one_op(
            pool(true, [1, 1], [0x8000_0000, 1], [0; 4], false),
            vec![0],
            1,
            None,
        )],
        inputs: vec![("x".into(), 0)],
        outputs: vec![("y".into(), 1)],
        meta: vec![],
    }
}

/// Conv: `ho * wo` overflows u32 in the im2col tile check (ops.rs, `Op::Conv` in `check`).
fn repro_conv_ho_wo() -> ModelFile {
    let x = placed("x", DType::F32, &[1, 1, 1, 1], 0, (0, 1));
    let w = TensorSpec::constant("w", DType::F32, Encoding::Plain, shape(&[1, 1]), vec![0; 4]);
    let y = placed("y", DType::F32, &[1, 1, 65536, 65536], 64, (1, 2));
    let s = placed("s", DType::F32, &[1], 64 + (1 << 34), (1, 1));
    let c = conv(
        [1, 1],
        [1, 1],
        [0x8000, 0x8000, 0x7FFF, 0x7FFF],
        1,
        Activation::NONE,
        1,
    );
    ModelFile {
        arena_bytes: (1 << 34) + 128,
        tensors: vec![x, w, y, s],
        ops: vec![one_op(c, vec![0, 1], 2, Some(3))],
        inputs: vec![("x".into(), 0)],
        outputs: vec![("y".into(), 2)],
        meta: vec![],
    }
}

/// Conv: `Cin/groups · kh · kw` overflows usize (ops.rs, `Op::Conv` in `check`) and the im2col
/// scratch size overflows u64 (`scratch_bytes`). With overflow checks off both wrap: a conv whose
/// kernel is (2^32-1)x(2^31+1) over 2 channels is accepted with a weight of only 2^32-2 columns
/// and a scratch of 2^34-8 bytes, so a kernel indexing w[co][ci·kh·kw + ...] reads far past it.
fn repro_conv_k_wraps() -> ModelFile {
    let x = placed("x", DType::F32, &[1, 2, 1, 1], 0, (0, 1));
    let w = placed("w", DType::F32, &[1, 0xFFFF_FFFE], 64, (0, 1));
    let s_off = 64 + w.arena_len.div_ceil(64) * 64;
    let s = placed("s", DType::F32, &[0xFFFF_FFFE], s_off, (1, 1));
    let y_off = s_off + s.arena_len.div_ceil(64) * 64;
    let y = placed("y", DType::F32, &[1, 1, 1, 1], y_off, (1, 2));
    let c = conv(
        [0xFFFF_FFFF, 0x8000_0001],
        [1, 1],
        [0xFFFF_FFFE, 0x8000_0000, 0, 0],
        1,
        Activation::NONE,
        1,
    );
    ModelFile {
        arena_bytes: y_off + 64,
        tensors: vec![x, w, s, y],
        ops: vec![one_op(c, vec![0, 1], 3, Some(2))],
        inputs: vec![("x".into(), 0), ("w".into(), 1)],
        outputs: vec![("y".into(), 3)],
        meta: vec![],
    }
}

/// MatMul: the packed-panel scratch size `k · ceil16(n) · 16 · 4` overflows u64
/// (`scratch_bytes`); with overflow checks off it wraps to 0 and the op is accepted without the
/// scratch its kernel needs.
fn repro_matmul_scratch() -> ModelFile {
    let (k, n) = (1usize << 31, (1usize << 31) - 8);
    let a = placed("a", DType::F32, &[1, k], 0, (0, 1));
    let y = placed("y", DType::F32, &[1, n], 1 << 33, (1, 2));
    let b = placed("b", DType::F32, &[k, n], 1 << 34, (0, 1));
    let end = (1u64 << 34) + b.arena_len;
    ModelFile {
        arena_bytes: end,
        tensors: vec![a, b, y],
        ops: vec![one_op(Op::MatMul(MatMul::standard(2)), vec![0, 1], 2, None)],
        inputs: vec![("a".into(), 0), ("b".into(), 1)],
        outputs: vec![("y".into(), 2)],
        meta: vec![],
    }
}

/// Arena plan check: `bo + bl` overflows u64 for a tensor placed at the top of the address space
/// that is live together with an earlier one (model.rs, the overlap loop in `validate`).
fn repro_arena_end_overflow() -> ModelFile {
    let x = placed("x", DType::F32, &[1, 4], 0, (0, 1));
    let y = placed("y", DType::F32, &[1, 4], u64::MAX - 15, (1, 2));
    ModelFile {
        arena_bytes: u64::MAX,
        tensors: vec![x, y],
        ops: vec![one_op(
            Op::Unary(Activation::plain(ActKind::Relu)),
            vec![0],
            1,
            None,
        )],
        inputs: vec![("x".into(), 0)],
        outputs: vec![("y".into(), 1)],
        meta: vec![],
    }
}

/// Validation hole (no panic): an op may name its own output as its scratch when the output is
/// dead after the op, so the kernel's scratch writes land in the bytes it is producing.
fn repro_scratch_is_output() -> ModelFile {
    // x -> conv (scratch = its own output y1, which nothing reads) ; x -> relu -> output.
    let x = placed("x", DType::F32, &[1, 1, 8, 8], 0, (0, 2));
    let w = TensorSpec::constant(
        "w",
        DType::F32,
        Encoding::PanelF32,
        shape(&[4, 9]),
        vec![0; 576],
    );
    let y1 = placed("y1", DType::F32, &[1, 4, 8, 8], 256, (1, 1));
    let y2 = placed("y2", DType::F32, &[1, 1, 8, 8], 256 + 1024, (2, 3));
    ModelFile {
        arena_bytes: 256 + 1024 + 256,
        tensors: vec![x, w, y1, y2],
        ops: vec![
            one_op(conv3(16), vec![0, 1], 2, Some(2)),
            one_op(
                Op::Unary(Activation::plain(ActKind::Relu)),
                vec![0],
                3,
                None,
            ),
        ],
        inputs: vec![("x".into(), 0)],
        outputs: vec![("y".into(), 3)],
        meta: vec![],
    }
}

fn conv3(col_tile: u32) -> Op {
    conv([3, 3], [1, 1], [1; 4], 1, Activation::NONE, col_tile)
}

fn assert_no_panic(name: &str, f: ModelFile) {
    if let Err(panic) = outcome(&f) {
        panic!("{name}: from_bytes panicked: {panic}");
    }
}

fn assert_rejected_without_panic(name: &str, f: ModelFile) {
    match outcome(&f) {
        Err(panic) => panic!("{name}: from_bytes panicked: {panic}"),
        Ok(Ok(())) => panic!("{name}: accepted a model that breaks the kernels' assumptions"),
        Ok(Err(e)) => eprintln!("{name}: rejected with {e:?}"),
    }
}

#[test]
fn regression_pool_fl_plus_one() {
    assert_rejected_without_panic("pool fl+1", repro_pool_fl_plus_one());
}

#[test]
fn regression_pool_ceil_window_wraps() {
    assert_rejected_without_panic("pool (out-1)*stride", repro_pool_ceil_window_wraps());
}

#[test]
fn regression_conv_ho_wo() {
    // A huge but consistent output (16 GiB of padding) is a valid plan; it must only not panic.
    assert_no_panic("conv ho*wo", repro_conv_ho_wo());
}

/// The crash `cargo fuzz` found within a minute: the mobile seed with the 1x1 pointwise conv
/// (Cin = 2) given a huge kernel, `Cin/groups · kh · kw` overflows (ops.rs, `Op::Conv` in `check`).
/// A realistic-size file: no huge tensors needed.
fn repro_conv_kernel_overflow_small() -> ModelFile {
    let mut f = model_mobile();
    let Op::Conv(c) = &mut f.ops[1].op else {
        panic!("op 1 of the mobile model is the pointwise conv")
    };
    c.kernel = [0xFFF6_0001, 0xFFFF_FFFE];
    f
}

#[test]
fn regression_conv_kernel_overflow_small() {
    assert_rejected_without_panic("conv kernel (fuzz)", repro_conv_kernel_overflow_small());
}

#[test]
fn regression_conv_k_wraps() {
    assert_rejected_without_panic("conv K", repro_conv_k_wraps());
}

#[test]
fn regression_matmul_scratch() {
    assert_rejected_without_panic("matmul scratch", repro_matmul_scratch());
}

#[test]
fn regression_arena_end_overflow() {
    assert_rejected_without_panic("arena end", repro_arena_end_overflow());
}

#[test]
fn regression_scratch_is_output() {
    assert_rejected_without_panic("scratch is output", repro_scratch_is_output());
}
